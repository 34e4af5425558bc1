"""Strategies and shared limits end to end: real Envoy, several processors, a real redis-server."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from extproc import redis_store
from extproc.launcher import Stack
from extproc.mock_azure import Fault

from .conftest import Mock, RedisServer, wait_for

pytestmark = pytest.mark.e2e

MockFactory = Callable[..., Mock]
StackFactory = Callable[..., Stack]
CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Say hello"}]}


def seed_config(a: Mock, b: Mock, strategy: str, redis_url: str | None = None, rpm: int = 6,
                extra: str = "") -> str:
    """The seed document's first example: two Azure deployments with rpm 6 each, optionally on Redis."""
    redis = f"  redis_url: {redis_url}\n" if redis_url else ""
    return f"""
model_list:
  - model_name: gpt-3.5-turbo
    litellm_params: {{model: azure/gpt-35-eastus, api_base: "{a.base}", api_key: {a.api_key}, rpm: {rpm}}}
  - model_name: gpt-3.5-turbo
    litellm_params: {{model: azure/gpt-turbo-small-ca, api_base: "{b.base}", api_key: {b.api_key}, rpm: {rpm}}}
router_settings:
  routing_strategy: {strategy}
  num_retries: 0
{redis}{extra}"""


def burst(stack: Stack, n: int, body: dict[str, object] = CHAT) -> list[httpx.Response]:
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: client.post(f"{stack.base_url}/v1/chat/completions", json=body), range(n)))



def test_two_processors_share_exact_rpm_through_redis(
    mock_factory: MockFactory, stack_factory: StackFactory, redis_url: str
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(seed_config(a, b, "usage-based-routing-v2", redis_url), processors=2)
    responses = burst(stack, 20)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 12, 429: 8}, [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
    assert len(a.served()) == 6 and len(b.served()) == 6  # exactly rpm on each, not rpm-1, not rpm x 2
    for response in (r for r in responses if r.status_code == 429):
        assert 1 <= int(response.headers["retry-after"]) <= 60
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "gpt-3.5-turbo" in error["message"]
        assert '"current_rpm":6,"rpm_limit":6' in error["message"]
    # both processors made decisions: the limit held across replicas, not inside one
    assert stack.metric("llm_routing_decision_seconds_count", index=0) > 0
    assert stack.metric("llm_routing_decision_seconds_count", index=1) > 0


def test_two_processors_without_redis_limit_per_processor(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(seed_config(a, b, "usage-based-routing"), processors=2)
    statuses = Counter(r.status_code for r in burst(stack, 20))
    # each processor admits up to 12 on its own: the documented reason to configure Redis
    assert statuses[200] > 12, statuses


def test_one_redis_round_trip_per_request(
    mock_factory: MockFactory, stack_factory: StackFactory, redis_server: RedisServer, redis_url: str
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(seed_config(a, b, "usage-based-routing", redis_url, rpm=1000))
    burst(stack, 2)  # scripts loaded, connections warm
    client: redis.Redis = redis_server.client()
    wait_for(lambda: stack.metric("litellm_deployment_total_requests") == 2)
    client.config_resetstat()
    n = 25
    assert all(r.status_code == 200 for r in burst(stack, n))
    time.sleep(1.0)  # the access log flushes every 20 ms; scraping metrics now would add Redis reads
    stats = {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}
    assert stack.metric("litellm_deployment_total_requests") == n + 2  # every request was settled
    # One EVALSHA per request to decide it (RESERVE, awaited; or, on a slot allotted ahead, USE_SLOT after the
    # reply) and one (pipelined, off the request path) to settle it; allotments add one ALLOT per few
    # decisions and a RETURN_SLOTS when unused slots go back.
    per_allotment = redis_store.ALLOT_SLOTS - redis_store.ALLOT_REFILL_BELOW
    assert 2 * n <= stats["evalsha"] <= 2 * n + 2 * (n // per_allotment + 2), stats
    assert not {"get", "set", "incr", "mget", "hgetall"} & {k for k, v in stats.items() if k != "info" and v > 2 * n}
    client.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_least_busy_counts_return_to_zero_after_random_aborts(
    mock_factory: MockFactory, stack_factory: StackFactory, request: pytest.FixtureRequest, backend: str
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    stack = stack_factory(seed_config(a, b, "least-busy", redis_url, rpm=100000))
    for mock in (a, b):
        mock.fault("*", Fault(delay=0.4, chunk_delay=0.05))
    rng = random.Random(11)

    def one(i: int) -> str:
        body = {**CHAT, "stream": i % 3 == 0}
        try:
            with httpx.Client(timeout=rng.choice([0.05, 0.2, 0.45, 5.0])) as client:
                with client.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response:
                    for _ in response.iter_bytes():
                        pass
            return "completed"
        except httpx.TimeoutException:
            return "aborted"

    with ThreadPoolExecutor(16) as pool:
        results = Counter(pool.map(one, range(48)))
    assert results["aborted"] > 5 and results["completed"] > 5, results
    assert wait_for(lambda: stack.metric("llm_deployment_in_flight") == 0, timeout=10), stack.metrics_text()
    # each request ended exactly once: with a response (or a client abort mid-response), or abandoned
    # before the routing decision reached Envoy
    ended = stack.metric("litellm_deployment_total_requests") + stack.metric("llm_abandoned_requests_total")
    assert ended == 48, stack.metrics_text()


def test_least_busy_prefers_the_idle_deployment(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(seed_config(a, b, "least-busy", rpm=100000))
    a.fault("*", Fault(delay=3.0))  # a holds its requests; b answers at once
    url = f"{stack.base_url}/v1/chat/completions"
    with ThreadPoolExecutor(16) as pool:
        held = []
        # until a holds one in flight (least-busy then sends everything else to b, which is idle)
        while not [r for r in a.requests if r.status == 0]:
            held.append(pool.submit(httpx.post, url, json=CHAT, timeout=10))
            time.sleep(0.05)
            assert len(held) < 40
        quick = []
        for _ in range(10):
            quick.append(httpx.post(url, json=CHAT, timeout=10))
            time.sleep(0.1)  # the access log reports each quick request's end before the next
        for future in held:
            future.result()
    served = Counter(r.headers["x-llm-deployment"] for r in quick)
    assert served["gpt-turbo-small-ca"] == 10, served  # a has one in flight, b none


def test_latency_based_moves_traffic_to_the_faster_deployment(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(seed_config(a, b, "latency-based-routing", rpm=100000))
    a.fault("*", Fault(delay=0.15))
    served: Counter[str] = Counter()
    with httpx.Client(timeout=10) as client:
        for _ in range(30):
            response = client.post(f"{stack.base_url}/v1/chat/completions", json=CHAT)
            served[response.headers["x-llm-deployment"]] += 1
            time.sleep(0.03)  # let the access log report the previous request
    assert served["gpt-turbo-small-ca"] >= 25, served
    assert served["gpt-35-eastus"] >= 1  # untried deployments are tried first


def test_rate_limit_headers_for_the_model_group(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(seed_config(a, b, "simple-shuffle", rpm=50))
    remaining = []
    for _ in range(3):
        response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=CHAT, timeout=10)
        assert response.headers["x-ratelimit-limit-requests"] == "100"
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert "x-ratelimit-limit-tokens" not in response.headers  # no deployment sets tpm
    assert remaining == [99, 98, 97]


def test_tpm_limit_refuses_a_deployment_spent_by_earlier_responses(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a = mock_factory("ka", "a")
    stack = stack_factory(f"""
model_list:
  - model_name: gpt-3.5-turbo
    litellm_params: {{model: azure/small, api_base: "{a.base}", api_key: ka, tpm: 60}}
router_settings: {{routing_strategy: usage-based-routing}}
""")
    statuses = []
    with httpx.Client(timeout=10) as client:
        for _ in range(8):
            response = client.post(f"{stack.base_url}/v1/chat/completions", json=CHAT)
            statuses.append(response.status_code)
            time.sleep(0.05)  # actual usage (about 12 tokens each) replaces the estimate
    assert statuses.count(200) >= 4 and statuses[-1] == 429, statuses
    assert stack.metric("llm_deployment_tpm_used") <= 60
