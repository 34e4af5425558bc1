"""Tools the benchmark installs into their own virtualenvs under .bench-venv/ (git-ignored), once."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.procs import ROOT


def venv_tool(venv: Path, requirement: str, executable: str, log: Callable[[str], None]) -> tuple[Path | None, str]:
    """`venv/bin/<executable>` with `requirement` installed, on first use; (None, reason) if that fails.

    Own venvs keep LiteLLM's large dependency tree (and its pins) away from the project's environment."""
    tool = venv / "bin" / executable
    python = venv / "bin" / "python"
    marker = venv / "bench-installed.txt"
    if tool.exists() and marker.exists() and marker.read_text().strip() == requirement:
        return tool, "cached"
    log(f"installing {requirement} into {venv.relative_to(ROOT)} (once; cached afterwards)")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement],
            check=True, timeout=900, capture_output=True, text=True,
        )
    except subprocess.CalledProcessError as error:
        return None, f"pip install {requirement} failed (exit {error.returncode}): {error.stderr.strip()[-500:]}"
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"pip install {requirement} failed: {error}"
    if not tool.exists():
        return None, f"{requirement} installed but {tool} is missing"
    marker.write_text(requirement + "\n")
    return tool, "installed"
