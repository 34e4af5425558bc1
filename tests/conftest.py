"""Shared fixtures: mock Azure resources on a background event loop, and whole stacks of real processes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.launcher import Stack
from extproc.mock_azure import Fault, MockAzureServer, RecordedRequest


class LoopThread:
    """One asyncio loop in a daemon thread, so in-process mocks serve while tests block on clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mock-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Mock:
    """A running mock Azure resource (one host:port, any number of deployments)."""

    def __init__(self, loop: LoopThread, api_key: str, name: str) -> None:
        self._loop = loop
        self.api_key = api_key
        self.server = MockAzureServer(api_key=api_key, name=name)
        loop.run(self.server.start())

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self.server.requests)

    def served(self, deployment: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.status == 200 and (deployment is None or r.deployment == deployment)]

    def fault(self, deployment: str, fault: Fault | None) -> None:
        async def apply() -> None:  # the mock's state belongs to its loop thread
            self.server.set_fault(deployment, fault)

        self._loop.run(apply())

    def stop(self) -> None:
        self._loop.run(self.server.stop())


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def mock_factory(loop_thread: LoopThread) -> Iterator[Callable[..., Mock]]:
    started: list[Mock] = []

    def make(api_key: str = "azure-key", name: str = "mock") -> Mock:
        mock = Mock(loop_thread, api_key, name)
        started.append(mock)
        return mock

    yield make
    for mock in started:
        mock.stop()


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start Envoy + processor(s) for a config text; everything is stopped after the test."""
    started: list[Stack] = []

    def make(config_text: str, name: str = "config.yaml", **kwargs: Any) -> Stack:
        path = tmp_path / name
        path.write_text(config_text)
        run_dir = tmp_path / f"run-{len(started)}"
        stack = Stack(path, run_dir=run_dir, **kwargs)
        started.append(stack)
        return stack.start()

    yield make
    for stack in started:
        stack.stop()


def fault(**kwargs: Any) -> Fault:
    return Fault(**kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll until ``predicate`` holds (things reported asynchronously, e.g. through the access log)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class RedisServer:
    """A real redis-server on a free loopback port, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        import shutil
        import socket
        import subprocess
        import time

        from extproc.launcher import free_port

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        pytest.fail("redis-server did not start")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database for each test on the session's redis-server."""
    client = redis_server.client()
    client.flushall()
    client.config_resetstat()
    client.close()
    return redis_server.url
