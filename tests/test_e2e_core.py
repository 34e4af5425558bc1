"""End to end: real Envoy + real processor + mock Azure resources, driven by the official openai client."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import orjson
import pytest

from extproc.launcher import Stack
from extproc.mock_azure import Fault

from .conftest import Mock, wait_for

pytestmark = pytest.mark.e2e

MockFactory = Callable[..., Mock]
StackFactory = Callable[..., Stack]
MESSAGES = [{"role": "user", "content": "Say hello"}]


def two_deployments(a: Mock, b: Mock, extra_a: str = "", extra_b: str = "", router: str = "") -> str:
    """The seed document's shape: one model group, two Azure deployments on two resources."""
    return f"""
model_list:
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: azure/gpt-35-eastus
      api_base: {a.base}
      api_key: {a.api_key}
      {extra_a}
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: azure/gpt-turbo-small-ca
      api_base: {b.base}/
      api_key: {b.api_key}
      {extra_b}
router_settings:
  model_group_alias: {{"gpt-4": "gpt-3.5-turbo"}}
  num_retries: 2
  timeout: 30
  {router}
"""


def client(stack: Stack, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="client-secret-token", max_retries=0, **kwargs)


def spread(stack: Stack, n: int, model: str = "gpt-3.5-turbo") -> Counter[str]:
    api = client(stack)

    def one(i: int) -> str:
        raw = api.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, user=f"u{i}")
        return raw.headers["x-llm-deployment"]

    with ThreadPoolExecutor(8) as pool:
        return Counter(pool.map(one, range(n)))


def within(count: int, n: int, p: float) -> bool:
    sd = (n * p * (1 - p)) ** 0.5
    return abs(count - n * p) <= 6 * sd  # ~2e-9 false alarm: cannot flake, still catches wrong weights


def test_seed_config_spreads_evenly_and_keys_stay_separate(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("key-eastus", "eastus"), mock_factory("key-canada", "canada")
    # the seed's rpm is 6 per deployment; limits are hard now, so the spread is measured with room for 400
    stack = stack_factory(two_deployments(a, b, "rpm: 6000", "rpm: 6000"))
    n = 400
    counts = spread(stack, n)
    assert counts["gpt-35-eastus"] + counts["gpt-turbo-small-ca"] == n
    assert within(counts["gpt-35-eastus"], n, 0.5), counts
    # each resource saw only its own deployment, its own key, the Azure path, and never the client's token
    for mock, deployment in ((a, "gpt-35-eastus"), (b, "gpt-turbo-small-ca")):
        assert {r.deployment for r in mock.requests} == {deployment}
        assert {r.headers.get("api-key") for r in mock.requests} == {mock.api_key}
        assert all("authorization" not in r.headers for r in mock.requests)
        assert all("client-secret-token" not in str(r.headers) for r in mock.requests)
        assert {r.path for r in mock.requests} == {f"/openai/deployments/{deployment}/chat/completions"}
        assert {r.query.get("api-version") for r in mock.requests} == {"2024-10-21"}
        assert all(r.status == 200 for r in mock.requests)


def test_rpm_weights_spread_one_to_three(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(two_deployments(a, b, "rpm: 100000", "rpm: 300000"))
    n = 400
    counts = spread(stack, n)
    assert within(counts["gpt-35-eastus"], n, 0.25), counts


def test_alias_routes_to_target_group_and_headers_name_the_deployment(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(two_deployments(a, b))
    raw = client(stack).chat.completions.with_raw_response.create(model="gpt-4", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0
    served = raw.headers["x-llm-deployment"]
    assert served in ("gpt-35-eastus", "gpt-turbo-small-ca")
    assert raw.headers["x-litellm-model-group"] == "gpt-3.5-turbo"
    ids = {d.deployment: d.id for d in stack.config.deployments}
    assert raw.headers["x-litellm-model-id"] == ids[served]
    assert len(a.served()) + len(b.served()) == 1


@pytest.mark.parametrize(
    ("unix_sockets", "event_loop", "lean_ext_proc"),
    [(True, "uvloop", True), (False, "asyncio", True), (True, "uvloop", False), (False, "uvloop", False)],
    ids=["unix-socket-uvloop", "tcp-asyncio", "grpc-aio-unix-socket", "grpc-aio-tcp"],
)
def test_processor_transports(
    unix_sockets: bool, event_loop: str, lean_ext_proc: bool, mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    """The local stack talks to its processors over Unix sockets; `serve --port` (other hosts, containers) over
    TCP. Both carry decisions, replies, the access log and the clusters, on either event loop, with ext_proc on
    the lean listener or (rendered with it left out) on grpc.aio."""
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(
        two_deployments(a, b), unix_sockets=unix_sockets, event_loop=event_loop, lean_ext_proc=lean_ext_proc
    )
    assert all(address.startswith("unix:") == unix_sockets for address in stack.processor_addresses)
    assert len(stack.ext_proc_addresses) == (1 if lean_ext_proc else 0)
    rendered = stack.envoy_config_path.read_text()
    assert ("pipe:" in rendered) == unix_sockets
    assert ("llm_extproc_lean" in rendered) == lean_ext_proc
    completion = client(stack).chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert completion.choices[0].message.content
    assert [m.id for m in client(stack).models.list()] == ["gpt-3.5-turbo", "gpt-4"]
    assert wait_for(lambda: stack.metric("litellm_deployment_success_responses") == 1)  # the access log came back
    chunks = list(client(stack).chat.completions.create(model="gpt-4", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_azure_client_embeddings_completions_and_models(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(two_deployments(a, b))
    azure = openai.AzureOpenAI(azure_endpoint=stack.base_url, api_key="client-key", api_version="2024-02-01",
                               max_retries=0)
    chat = azure.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert chat.choices[0].message.content
    plain = client(stack)
    embedding = plain.embeddings.create(model="gpt-3.5-turbo", input=["one", "two"])
    assert len(embedding.data) == 2 and embedding.usage.prompt_tokens > 0
    legacy = plain.completions.create(model="gpt-3.5-turbo", prompt="Once upon a time")
    assert legacy.choices[0].text
    assert [m.id for m in plain.models.list()] == ["gpt-3.5-turbo", "gpt-4"]
    recorded = a.requests + b.requests
    # the client's api-version is replaced by the deployment's; its key never reaches Azure
    assert {r.query["api-version"] for r in recorded} == {"2024-10-21"}
    assert {r.path.rsplit("/", 1)[-1] for r in recorded} == {"completions", "embeddings"}
    assert all(r.headers["api-key"] in ("ka", "kb") for r in recorded)


def test_streaming_passes_through(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(two_deployments(a, b))
    stream = client(stack).chat.completions.create(
        model="gpt-3.5-turbo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip().startswith("Hello from")
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_upstream_500_is_retried_num_retries_times(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a = mock_factory("ka", "a")
    stack = stack_factory(f"""
model_list:
  - model_name: m
    litellm_params: {{model: azure/only, api_base: "{a.base}", api_key: ka}}
router_settings: {{num_retries: 2}}
""")
    api = client(stack)
    a.fault("only", Fault(status=500))
    with pytest.raises(openai.InternalServerError):
        api.chat.completions.create(model="m", messages=MESSAGES)
    assert [r.status for r in a.requests] == [500, 500, 500]  # 1 try + num_retries
    a.fault("only", Fault(status=500, count=2))
    completion = api.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content
    assert [r.status for r in a.requests] == [500, 500, 500, 500, 500, 200]
    a.fault("only", Fault(status=400, count=1))  # other 4xx are the caller's problem: never retried
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="m", messages=MESSAGES)
    assert [r.status for r in a.requests][-1:] == [400]
    assert len(a.requests) == 7


def test_slow_deployment_times_out(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a = mock_factory("ka", "a")
    stack = stack_factory(f"""
model_list:
  - model_name: m
    litellm_params: {{model: azure/slow, api_base: "{a.base}", api_key: ka}}
  - model_name: fast-timeout
    litellm_params: {{model: azure/slow, api_base: "{a.base}", api_key: ka, timeout: 0.5}}
router_settings: {{num_retries: 0, timeout: 1.5}}
""")
    a.fault("slow", Fault(delay=10))
    for model, limit in (("m", 1.5), ("fast-timeout", 0.5)):
        started = time.monotonic()
        response = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": model, "messages": MESSAGES},
                              timeout=20)
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout"
        assert limit <= elapsed < limit + 1.0, elapsed


def test_bad_input_gets_openai_errors_and_the_processor_keeps_serving(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(two_deployments(a, b) + "general_settings: {max_request_size_mb: 1}\n")
    url = f"{stack.base_url}/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
        (httpx.post(url, json={"messages": MESSAGES}), 400, "missing_model"),
        (httpx.post(url, json={"model": "gpt-5", "messages": MESSAGES}), 404, "model_not_found"),
        (httpx.get(url), 405, "method_not_allowed"),
        (httpx.post(url), 400, "missing_body"),
        (httpx.post(url, content=b"x" * (2 * 1024 * 1024)), 413, "request_too_large"),
        (httpx.post(f"{stack.base_url}/v2/unknown", json={}), 404, "not_found"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == code
        assert error["message"] and error["type"]
    assert "gpt-3.5-turbo" in cases[2][0].json()["error"]["message"]  # lists the available models
    with pytest.raises(openai.NotFoundError):
        client(stack).chat.completions.create(model="nope", messages=MESSAGES)
    assert client(stack).chat.completions.create(model="gpt-4", messages=MESSAGES).choices
    assert a.requests + b.requests and all(r.status == 200 for r in a.requests + b.requests)


def test_health_and_readiness_through_the_listener(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(two_deployments(a, b) + "general_settings: {master_key: sk-proxy-key}\n")
    assert httpx.get(f"{stack.base_url}/health/readiness").json()["status"] == "healthy"
    assert httpx.get(f"{stack.base_url}/health/liveliness").status_code == 200
    assert httpx.get(f"{stack.base_url}/v1/models").status_code == 401
    api = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-proxy-key", max_retries=0)
    assert api.chat.completions.create(model="gpt-4", messages=MESSAGES).choices
    with pytest.raises(openai.AuthenticationError):
        client(stack).chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert all("sk-proxy-key" not in str(r.headers) for r in a.requests + b.requests)


def test_client_cannot_pick_the_cluster(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(two_deployments(a, b))
    target = stack.config.deployments[0].cluster
    for _ in range(30):
        response = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": "gpt-4", "messages": MESSAGES},
                              headers={"x-llm-cluster": target, "api-key": "stolen"})
        assert response.status_code == 200
    assert len(b.served()) > 0  # the client's header was overwritten by the processor's choice
    assert all(r.headers["api-key"] in ("ka", "kb") for r in a.requests + b.requests)
    body = orjson.loads(response.content)
    assert body["object"] == "chat.completion"
