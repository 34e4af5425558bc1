"""The routing core without I/O: classification, errors, and the forwarding plan for each deployment."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from extproc.config import parse_config
from extproc.errors import Reply
from extproc.routing import Flow, Forward, Routed, Router

CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/dep-a, api_base: "https://a.openai.azure.com/", api_key: key-a,
                     api_version: "2024-06-01", timeout: 7}
  - model_name: gpt-4o
    litellm_params: {model: azure/dep-b, api_base: "https://b.openai.azure.com/apim", api_key: key-b}
router_settings:
  model_group_alias: {gpt-4: gpt-4o, hidden-one: {model: gpt-4o, hidden: true}}
  timeout: 30
"""


@pytest.fixture
def router() -> Router:
    return Router(parse_config(CONFIG, environ={}), rng=random.Random(1))


def headers(method: str = "POST", path: str = "/v1/chat/completions", end: bool = False, router: Router | None = None,
            **extra: str) -> Flow | Reply:
    assert router is not None
    return router.on_headers(method, path, {":method": method, ":path": path, **extra}, end)


def decide(router: Router, flow: Flow, raw: bytes) -> Routed | Reply:
    return asyncio.run(router.on_body(flow, raw))


def body(router: Router, payload: object, flow: Flow | None = None) -> Forward | Reply:
    decision = decide(router, flow or Flow("chat/completions", None, "rid"), orjson.dumps(payload))
    return decision.forward if isinstance(decision, Routed) else decision


def error_of(reply: Forward | Flow | Reply | Routed) -> tuple[int, str]:
    assert isinstance(reply, Reply)
    parsed = orjson.loads(reply.body)
    assert set(parsed["error"]) == {"message", "type", "param", "code"}
    return reply.status, parsed["error"]["code"]


@pytest.mark.parametrize(
    ("path", "operation", "model"),
    [
        ("/v1/chat/completions", "chat/completions", None),
        ("/chat/completions", "chat/completions", None),
        ("/v1/completions", "completions", None),
        ("/v1/embeddings", "embeddings", None),
        ("/embeddings?x=1", "embeddings", None),
        ("/openai/deployments/gpt-4/chat/completions?api-version=2024-02-01", "chat/completions", "gpt-4"),
        ("/openai/deployments/gpt-4o/embeddings", "embeddings", "gpt-4o"),
    ],
)
def test_classify(router: Router, path: str, operation: str, model: str | None) -> None:
    assert headers(path=path, router=router, **{"x-request-id": "rid-1"}) == Flow(operation, model, "rid-1")


def test_forward_plan(router: Router) -> None:
    seen = {}
    for _ in range(50):
        forward = body(router, {"model": "gpt-4", "messages": []})
        assert isinstance(forward, Forward)
        seen[forward.deployment.deployment] = (dict(forward.routing), forward)
    (a, fa), (b, fb) = seen["dep-a"], seen["dep-b"]
    assert (a["cluster"], b["cluster"]) == (fa.deployment.cluster, fb.deployment.cluster)
    assert a["cluster"] != b["cluster"]
    assert (a["timeout_ms"], b["timeout_ms"]) == ("7000", "30000")
    # path, api-key and host are set per attempt by the cluster's filters, from these key slots
    assert dict(fa.keys) == dict(fb.keys) == {"key_0": "key-a", "key_1": "key-b"}
    assert set(a) == {"cluster", "timeout_ms"}


def test_stream_has_no_total_deadline(router: Router) -> None:
    forward = body(router, {"model": "gpt-4o", "stream": True})
    assert isinstance(forward, Forward)
    assert forward.routing["timeout_ms"] == "0"


def test_azure_path_model_wins(router: Router) -> None:
    flow = headers(path="/openai/deployments/hidden-one/chat/completions", router=router)
    assert isinstance(flow, Flow)
    forward = body(router, {"model": "not-a-model"}, flow)
    assert isinstance(forward, Forward) and forward.deployment.model_name == "gpt-4o"


def test_bad_inputs(router: Router) -> None:
    assert error_of(decide(router, Flow("chat/completions", None, "rid"), b"{not json")) == (400, "invalid_json")
    assert error_of(decide(router, Flow("chat/completions", None, "rid"), b"[1, 2]")) == (400, "invalid_json")
    assert error_of(body(router, {"messages": []})) == (400, "missing_model")
    assert error_of(body(router, {"model": 5})) == (400, "missing_model")
    status, code = error_of(reply := body(router, {"model": "gpt-5"}))
    assert (status, code) == (404, "model_not_found")
    assert isinstance(reply, Reply) and b"gpt-4o, gpt-4" in reply.body and b"hidden-one" not in reply.body
    assert error_of(headers(method="GET", router=router)) == (405, "method_not_allowed")
    assert error_of(headers(end=True, router=router)) == (400, "missing_body")
    assert error_of(headers(path="/v2/nothing", router=router)) == (404, "not_found")
    assert error_of(headers(method="POST", path="/v1/models", router=router)) == (405, "method_not_allowed")


def test_models_and_health(router: Router) -> None:
    models = headers(method="GET", path="/v1/models", end=True, router=router)
    assert isinstance(models, Reply) and models.status == 200
    assert [m["id"] for m in orjson.loads(models.body)["data"]] == ["gpt-4o", "gpt-4"]
    for path in ("/health/liveliness", "/health/readiness"):
        reply = headers(method="GET", path=path, end=True, router=router)
        assert isinstance(reply, Reply) and reply.status == 200


def test_master_key() -> None:
    router = Router(parse_config(CONFIG + "general_settings: {master_key: sk-proxy}", environ={}))
    assert error_of(headers(router=router)) == (401, "invalid_api_key")
    assert error_of(headers(router=router, authorization="Bearer wrong")) == (401, "invalid_api_key")
    assert isinstance(headers(router=router, authorization="Bearer sk-proxy"), Flow)
    assert isinstance(headers(router=router, **{"api-key": "sk-proxy"}), Flow)
    # health stays open; the model list does not
    assert headers(method="GET", path="/health/readiness", end=True, router=router).status == 200  # type: ignore[union-attr]
    assert error_of(headers(method="GET", path="/v1/models", end=True, router=router)) == (401, "invalid_api_key")
