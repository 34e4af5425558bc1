"""Child processes of the benchmark, and what /proc says about their CPU use."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Managed:
    """A process the benchmark started: it alone is ever signalled, by its own pid."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(name: str, cmd: Sequence[str], run_dir: Path, env: dict[str, str] | None = None) -> Managed:
    log_path = run_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
    return Managed(name, proc, log_path)


def wait_until(check: Iterable[Managed], ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `ready()` until it is true; fail early with the log if one of `check` died meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for managed in check:
            if not managed.alive():
                raise RuntimeError(f"{managed.name} exited with {managed.proc.returncode}:\n{managed.log_tail()}")
        with contextlib.suppress(OSError, urllib.error.URLError, ConnectionError):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


def http_status(url: str, body: bytes | None = None, timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the ")" of comm: state is field 3, so utime (14) and stime (15) are at indexes 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def total_cpu_seconds(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (LiteLLM forks its uvicorn workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle by all cores since boot (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class Completed:
    stdout: str
    returncode: int
    cpu_s: float  # the child's own utime + stime, from wait4's rusage
    timed_out: bool


def run_measured(cmd: Sequence[str], timeout: float, cwd: Path | None = None) -> Completed:
    """Run a load generator to completion and report its own CPU use (so it can be told apart from the rest)."""
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd) as proc:
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            stdout = proc.stdout.read().decode(errors="replace")
            _, status, rusage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Completed(stdout, proc.returncode, rusage.ru_utime + rusage.ru_stime, timed_out.is_set())
