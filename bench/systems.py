"""The systems under test and the backends they share, each started on free loopback ports.

Shared backends (started once): the direct-response upstream Envoy, the project's streaming mock (for the
time-to-first-byte point) and one redis-server. Systems: the plain Envoy floor, the product (`Stack`)
with a given config and processor count, and LiteLLM Proxy from its own virtualenv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
import yaml

from bench.envoy_configs import plain_proxy_bootstrap, upstream_mock_bootstrap
from bench.procs import ROOT, Managed, http_status, process_tree, spawn, wait_until
from bench.venvs import venv_tool
from extproc.launcher import Stack, envoy_binary, free_port

LITELLM_VENV = ROOT / ".bench-venv" / "litellm"
LITELLM_REQUIREMENT = "litellm[proxy]"

API_KEY = "bench-key"
API_VERSION = "2024-10-21"
MODEL = "gpt-4o"  # two deployments behind the direct-response mock
STREAM_MODEL = "gpt-4o-stream"  # one deployment behind the streaming mock
STREAM_DEPLOYMENT = "bench-stream"
# High enough never to refuse at any rate a 2-core machine reaches, so the limit path runs but never 429s.
NEVER_REFUSING_RPM = 10_000_000
NEVER_REFUSING_TPM = 10_000_000_000


@dataclass
class Backends:
    run_dir: Path
    upstream: Managed
    upstream_port: int
    stream_mock: Managed
    stream_mock_port: int
    redis: Managed | None = None
    redis_port: int = 0

    def all(self) -> list[Managed]:
        return [m for m in (self.upstream, self.stream_mock, self.redis) if m is not None]

    def stop(self) -> None:
        for managed in self.all():
            managed.stop()


@dataclass(frozen=True)
class StreamTarget:
    """Where the streaming TTFB probe sends its `stream: true` chat request."""

    port: int
    path: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RunningSystem:
    name: str
    port: int
    stream: StreamTarget
    roles: Callable[[], dict[str, list[int]]]  # pids by role ("processor", "envoy", "redis"), read when measured
    stop: Callable[[], None]
    startup_s: float
    log_hint: str


# --- backends -------------------------------------------------------------------------------------------------


def start_backends(run_dir: Path, with_redis: bool) -> Backends:
    upstream, upstream_port = start_upstream_mock(run_dir)
    try:
        stream_mock, stream_mock_port = start_stream_mock(run_dir)
        backends = Backends(run_dir, upstream, upstream_port, stream_mock, stream_mock_port)
        if with_redis:
            backends.redis, backends.redis_port = start_redis(run_dir)
    except BaseException:
        upstream.stop()
        raise
    return backends


def start_upstream_mock(run_dir: Path) -> tuple[Managed, int]:
    port, admin_port = free_port(), free_port()
    config = run_dir / "upstream-mock-envoy.json"
    config.write_text(json.dumps(upstream_mock_bootstrap(port, admin_port)))
    managed = spawn("upstream-mock-envoy", _envoy_cmd(config), run_dir)
    wait_until([managed], lambda: http_status(f"http://127.0.0.1:{admin_port}/ready") == 200, 30, "upstream Envoy")
    return managed, port


def start_stream_mock(run_dir: Path) -> tuple[Managed, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "extproc.mock_azure", "--port", str(port), "--api-key", API_KEY,
           "--name", "stream-mock", "--max-recorded", "1000"]
    managed = spawn("stream-mock", cmd, run_dir, env=_env_with_project_path())
    wait_until([managed], lambda: "listening on" in managed.log_path.read_text(errors="replace"), 30, "stream mock")
    return managed, port


def start_redis(run_dir: Path) -> tuple[Managed, int]:
    port = free_port()
    # No persistence: a benchmark's counters are throwaway, and fork-for-save would steal CPU mid-point.
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--loglevel", "warning"]
    managed = spawn("redis", cmd, run_dir)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    wait_until([managed], lambda: bool(client.ping()), 30, "redis-server")
    return managed, port


def _envoy_cmd(config: Path) -> list[str]:
    return [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "error"]


def _env_with_project_path() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# --- configs (LiteLLM Proxy files, read unchanged by the product and by LiteLLM) ------------------------------


def write_config(
    path: Path, backends: Backends, strategy: str, redis_prefix: str | None = None, stream_limits: bool = False
) -> Path:
    def deployment(model_name: str, azure_name: str, port: int, limits: bool) -> dict[str, object]:
        params: dict[str, object] = {
            "model": f"azure/{azure_name}",
            "api_base": f"http://127.0.0.1:{port}",
            "api_key": API_KEY,
            "api_version": API_VERSION,
        }
        if limits:
            params.update(rpm=NEVER_REFUSING_RPM, tpm=NEVER_REFUSING_TPM)
        return {"model_name": model_name, "litellm_params": params}

    router_settings: dict[str, object] = {"routing_strategy": strategy, "num_retries": 2, "timeout": 30}
    if redis_prefix is not None:
        # redis_key_prefix is the product's own key: one prefix per system keeps their counters apart. Only
        # these Redis variants carry it; LiteLLM is given the simple-shuffle file.
        router_settings.update(redis_host="127.0.0.1", redis_port=backends.redis_port, redis_key_prefix=redis_prefix)
    document = {
        "model_list": [
            deployment(MODEL, "gpt-4o-a", backends.upstream_port, limits=True),
            deployment(MODEL, "gpt-4o-b", backends.upstream_port, limits=True),
            # No rpm/tpm by default: on Redis its decisions do not wait for Redis (bench.ttfb measures both).
            deployment(STREAM_MODEL, STREAM_DEPLOYMENT, backends.stream_mock_port, limits=stream_limits),
        ],
        "router_settings": router_settings,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# --- systems --------------------------------------------------------------------------------------------------


def start_plain_envoy(name: str, backends: Backends) -> RunningSystem:
    began = time.monotonic()
    port, stream_port, admin_port = free_port(), free_port(), free_port()
    config = backends.run_dir / f"{name}-envoy.json"
    bootstrap = plain_proxy_bootstrap(port, stream_port, admin_port, backends.upstream_port, backends.stream_mock_port)
    config.write_text(json.dumps(bootstrap))
    managed = spawn(f"{name}-envoy", _envoy_cmd(config), backends.run_dir)
    wait_until([managed], lambda: http_status(f"http://127.0.0.1:{admin_port}/ready") == 200, 30, "plain Envoy")
    # The client itself sends what the product would forward: the Azure path and the deployment's key.
    stream = StreamTarget(
        stream_port,
        f"/openai/deployments/{STREAM_DEPLOYMENT}/chat/completions?api-version={API_VERSION}",
        {"api-key": API_KEY},
    )
    return RunningSystem(
        name, port, stream, lambda: {"envoy": [managed.pid]}, managed.stop, time.monotonic() - began,
        str(managed.log_path),
    )


def start_product(
    name: str, config: Path, processors: int, uses_redis: bool, backends: Backends, lean_ext_proc: bool = True
) -> RunningSystem:
    began = time.monotonic()
    stack = Stack(config, processors=processors, run_dir=backends.run_dir / name, env={"PYTHONPATH": str(ROOT)},
                  lean_ext_proc=lean_ext_proc)
    stack.start(timeout=60)

    def roles() -> dict[str, list[int]]:
        found = {
            "processor": [stack.process(f"processor-{i}").pid for i in range(processors)],
            "envoy": [stack.process("envoy").pid],
        }
        if uses_redis and backends.redis is not None:
            found["redis"] = [backends.redis.pid]
        return found

    assert stack.listen_port is not None
    return RunningSystem(
        name, stack.listen_port, StreamTarget(stack.listen_port, "/v1/chat/completions"), roles, stack.stop,
        time.monotonic() - began, str(stack.run_dir),
    )


def start_litellm(name: str, config: Path, workers: int, backends: Backends, executable: Path) -> RunningSystem:
    began = time.monotonic()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        # No master key in the shared config: LiteLLM refuses to start open unless told this is intended.
        LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
        # There is no network here: use the bundled model cost map instead of retrying a download at start.
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    cmd = [str(executable), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
           "--num_workers", str(workers)]
    managed = spawn(name, cmd, backends.run_dir, env=env)
    try:
        url = f"http://127.0.0.1:{port}/health/liveliness"
        wait_until([managed], lambda: http_status(url) == 200, 180, f"LiteLLM ({name})")
    except BaseException:
        managed.stop()
        raise
    return RunningSystem(
        name, port, StreamTarget(port, "/v1/chat/completions"),
        lambda: {"processor": process_tree(managed.pid)}, managed.stop, time.monotonic() - began,
        str(managed.log_path),
    )


# --- LiteLLM's virtualenv -------------------------------------------------------------------------------------


def litellm_executable(log: Callable[[str], None]) -> tuple[Path | None, str]:
    """The `litellm` CLI from .bench-venv/litellm, installed on first use; (None, reason) if impossible."""
    return venv_tool(LITELLM_VENV, LITELLM_REQUIREMENT, "litellm", log)


def litellm_version() -> str:
    python = LITELLM_VENV / "bin" / "python"
    completed = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return completed.stdout.strip() or "unknown"
