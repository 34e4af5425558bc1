"""Failover inside one request, timeouts and cooldowns: real Envoy, processors, mocks with injected faults."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import httpx
import pytest

from extproc.launcher import Stack, free_port
from extproc.mock_azure import Fault

from .conftest import Mock

pytestmark = pytest.mark.e2e

MockFactory = Callable[..., Mock]
StackFactory = Callable[..., Stack]
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello"}]}


def config(a_base: str, b_base: str, router: str = "", a_extra: str = "weight: 999", b_extra: str = "weight: 1") -> str:
    """Two deployments; A is almost always the first choice, so B is where failovers land."""
    return f"""
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/dep-a, api_base: "{a_base}", api_key: key-a, api_version: "2024-06-01", {a_extra}}}
  - model_name: gpt-4o
    litellm_params: {{model: azure/dep-b, api_base: "{b_base}", api_key: key-b, api_version: "2024-10-21", {b_extra}}}
router_settings:
  num_retries: 2
  timeout: 10
{router}"""


def post(stack: Stack, body: dict[str, object] = CHAT, timeout: float = 20) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=timeout)


@pytest.mark.parametrize("fault", [Fault(status=429, retry_after=30), Fault(status=500)], ids=["429", "500"])
def test_failed_attempt_is_retried_on_the_other_deployment(
    mock_factory: MockFactory, stack_factory: StackFactory, fault: Fault
) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    stack = stack_factory(config(a.base, b.base, "  disable_cooldowns: true\n"))
    a.fault("dep-a", fault)
    responses = [post(stack) for _ in range(5)]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert {r.headers["x-llm-deployment"] for r in responses} == {"dep-b"}
    assert {r.headers["x-litellm-model-id"] for r in responses} == {stack.config.deployments[1].id}
    assert "2" in {r.headers["x-llm-attempts"] for r in responses}  # A first, then B, in the same request
    failed = [r for r in a.requests if r.status == fault.status]
    assert failed
    for request in failed:  # A's attempt carried A's own path, version and key
        assert (request.path, request.query["api-version"], request.headers["api-key"]) == (
            "/openai/deployments/dep-a/chat/completions", "2024-06-01", "key-a")
    for request in b.served():  # B's attempt carried B's, never A's
        assert (request.path, request.query["api-version"], request.headers["api-key"]) == (
            "/openai/deployments/dep-b/chat/completions", "2024-10-21", "key-b")
        assert request.body == failed[0].body
        assert not any(name.startswith("x-llm") for name in request.headers)


def test_connection_refused_fails_over(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    b = mock_factory("key-b", "b")
    stack = stack_factory(config(f"http://127.0.0.1:{free_port()}", b.base, "  disable_cooldowns: true\n"))
    responses = [post(stack) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.headers["x-llm-deployment"] for r in responses} == {"dep-b"}


def test_one_mebibyte_body_fails_over_intact(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    stack = stack_factory(config(a.base, b.base, "  disable_cooldowns: true\n", a_extra="weight: 1000000"))
    a.fault("dep-a", Fault(status=429))
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (1024 * 1024)}]}
    response = post(stack, big)
    assert response.status_code == 200 and response.headers["x-llm-attempts"] == "2"
    sent = a.requests[-1].body
    assert len(sent) > 1024 * 1024
    assert hashlib.sha256(b.served()[-1].body).digest() == hashlib.sha256(sent).digest()


def test_num_retries_bounds_attempts(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    text = config(a.base, b.base, "  disable_cooldowns: true\n").replace("num_retries: 2", "num_retries: 1")
    stack = stack_factory(text)
    a.fault("*", Fault(status=503))
    b.fault("*", Fault(status=503))
    response = post(stack)
    assert response.status_code == 503
    assert len(a.requests) + len(b.requests) == 2  # 1 try + num_retries
    assert response.headers["x-llm-attempts"] == "2"


def test_hung_deployment_gives_a_clean_timeout(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    stack = stack_factory(config(a.base, b.base).replace("timeout: 10", "timeout: 1"))
    a.fault("*", Fault(hang=True))
    b.fault("*", Fault(hang=True))
    started = time.monotonic()
    response = post(stack)
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert 1.0 <= elapsed < 2.0


def test_cooldown_skips_a_deployment_for_retry_after_then_it_returns(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    # equal weights; the router's cooldown_time (30 s) loses to the deployment's Retry-After (2 s)
    stack = stack_factory(config(a.base, b.base, "  cooldown_time: 30\n", a_extra="rpm: 1000", b_extra="rpm: 1000"))
    a.fault("dep-a", Fault(status=429, retry_after=2, count=1))
    for _ in range(60):  # until A was chosen first once (a coin flip each time)
        assert post(stack).status_code == 200
        if any(r.status == 429 for r in a.requests):
            break
    cooled_at = next(r.received_at for r in a.requests if r.status == 429)
    time.sleep(0.1)  # the attempt log reaches the processor
    during = [post(stack).headers["x-llm-deployment"] for _ in range(12)]
    assert set(during) == {"dep-b"}, during
    assert time.monotonic() - cooled_at < 1.9
    time.sleep(max(0.0, cooled_at + 2.2 - time.monotonic()))
    after = [post(stack).headers["x-llm-deployment"] for _ in range(20)]
    assert "dep-a" in after  # back in rotation once its cooldown ended


def test_everything_cooling_gives_429_with_retry_after(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    stack = stack_factory(config(a.base, b.base).replace("num_retries: 2", "num_retries: 1"))
    a.fault("*", Fault(status=429, retry_after=4))
    b.fault("*", Fault(status=429, retry_after=6))
    assert post(stack).status_code == 429  # both tried in one request; Azure's 429 is passed on
    time.sleep(0.1)
    response = post(stack)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "cooldown_seconds_left" in error["message"]
    assert 3 <= int(response.headers["retry-after"]) <= 4  # the shortest remaining cooldown
    assert len(a.requests) + len(b.requests) == 2  # the second request reached no deployment


def test_cooldown_is_shared_by_processor_replicas(
    mock_factory: MockFactory, stack_factory: StackFactory, redis_url: str
) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    stack = stack_factory(config(a.base, b.base, f"  redis_url: {redis_url}\n", "rpm: 1000", "rpm: 1000"),
                          processors=2)
    a.fault("dep-a", Fault(status=429, retry_after=30, count=1))
    while not any(r.status == 429 for r in a.requests):
        assert post(stack).status_code == 200
    time.sleep(0.1)
    served = [post(stack).headers["x-llm-deployment"] for _ in range(20)]
    assert set(served) == {"dep-b"}, served
    assert stack.metric("llm_routing_decision_seconds_count", index=0) > 0
    assert stack.metric("llm_routing_decision_seconds_count", index=1) > 0


def test_stream_timeout_bounds_time_to_first_byte_not_the_stream(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("key-a", "a"), mock_factory("key-b", "b")
    stack = stack_factory(config(a.base, b.base, "  stream_timeout: 1\n  disable_cooldowns: true\n",
                                 a_extra="weight: 1000000"))
    body = {**CHAT, "stream": True}

    def stream() -> tuple[httpx.Response, bytes, float]:
        started = time.monotonic()
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=30) as response:
            data = response.read()
        return response, data, time.monotonic() - started

    a.fault("*", Fault(delay=5))  # A never starts within stream_timeout: the attempt fails over to B
    response, data, elapsed = stream()
    assert response.status_code == 200 and response.headers["x-llm-deployment"] == "dep-b"
    assert data.endswith(b"data: [DONE]\n\n") and 1.0 <= elapsed < 2.5
    a.fault("*", Fault(chunk_delay=0.4))  # A starts at once and streams slowly: longer than stream_timeout
    response, data, elapsed = stream()
    assert response.status_code == 200 and response.headers["x-llm-deployment"] == "dep-a"
    assert data.endswith(b"data: [DONE]\n\n") and elapsed > 1.5
