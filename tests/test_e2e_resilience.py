"""Outages under load: Redis goes away and comes back; the processor goes away and comes back."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from extproc.launcher import Stack

from .conftest import Mock, RedisServer

pytestmark = pytest.mark.e2e

MockFactory = Callable[..., Mock]
StackFactory = Callable[..., Stack]
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}


def config(a: Mock, b: Mock, redis_url: str) -> str:
    return f"""
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/dep-a, api_base: "{a.base}", api_key: ka, rpm: 100000}}
  - model_name: gpt-4o
    litellm_params: {{model: azure/dep-b, api_base: "{b.base}", api_key: kb, rpm: 100000}}
router_settings: {{routing_strategy: usage-based-routing, redis_url: "{redis_url}", num_retries: 0}}
"""


class SteadyLoad:
    """Sequential requests in a background thread until stopped; counts statuses."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.bodies: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                response = client.post(f"{self.url}/v1/chat/completions", json=CHAT)
                self.statuses[response.status_code] += 1
                if response.status_code != 200:
                    self.bodies.append(response.text[:300])

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_redis_outage_falls_back_without_failing_requests(
    mock_factory: MockFactory, stack_factory: StackFactory, tmp_path: Path
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    redis = RedisServer(tmp_path / "r1")
    try:
        stack = stack_factory(config(a, b, redis.url))
        with SteadyLoad(stack.base_url) as load:
            time.sleep(0.8)
            redis.stop()  # Redis dies under load
            time.sleep(1.0)
            assert stack.metric("llm_store_degraded") == 1
            served_while_down = load.statuses[200]
            time.sleep(0.5)
            assert load.statuses[200] > served_while_down  # still serving, from local counters
            redis = RedisServer(tmp_path / "r2", port=redis.port)  # back on the same address
            time.sleep(2.0)
        assert set(load.statuses) == {200}, load.bodies[:3]
        assert stack.metric("llm_store_degraded") == 0  # shared counting resumed without a restart
        client = redis.client()
        assert client.keys("llm-extproc:*")  # decisions are counted in Redis again
        client.close()
    finally:
        redis.stop()


def test_processor_outage_gives_fast_503_then_traffic_resumes(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(config(a, b, "").replace('redis_url: "", ', ""))
    assert httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT).status_code == 200
    processor = stack.process("processor-0")
    processor.send_signal(signal.SIGKILL)
    processor.wait(5)
    started = time.monotonic()
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10)
    assert time.monotonic() - started < 1.0  # fast, not a hang
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(f"{stack.base_url}/health/readiness").status_code == 503  # not ready without it
    stack.start_processor(0)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT).status_code == 200:
            break
        time.sleep(0.1)
    else:
        pytest.fail("traffic did not resume after the processor came back")
