"""Streaming through Envoy untouched, while tokens, ends and latency are still accounted."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import orjson
import pytest

from extproc.launcher import Stack
from extproc.mock_azure import Fault

from .conftest import Mock, wait_for

pytestmark = pytest.mark.e2e

MockFactory = Callable[..., Mock]
StackFactory = Callable[..., Stack]
MESSAGES = [{"role": "user", "content": "Tell me a story about a quiet lighthouse keeper"}]


def one_deployment(mock: Mock, extra: str = "", router: str = "") -> str:
    return f"""
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/dep, api_base: "{mock.base}", api_key: {mock.api_key}{extra}}}
router_settings: {{num_retries: 0{router}}}
"""



def test_stream_reaches_the_client_chunk_by_chunk_and_byte_for_byte(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    mock = mock_factory("k", "m")
    stack = stack_factory(one_deployment(mock))
    mock.fault("*", Fault(chunk_delay=0.2))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    arrivals: list[float] = []
    received = b""
    started = time.monotonic()
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            arrivals.append(time.monotonic() - started)
            received += chunk
    sent = mock.requests[-1].response_body
    assert received == sent  # no re-encoding, no buffering artefacts
    events = sent.count(b"data: ")
    assert events >= 6
    # the first event arrives long before the last one is even sent (a buffering proxy would deliver them
    # together); measured between arrivals, so a slow machine does not matter
    assert arrivals[-1] - arrivals[0] >= 0.2 * (events - 3), arrivals
    assert len(arrivals) >= events // 2


def test_plain_response_is_byte_for_byte(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    mock = mock_factory("k", "m")
    stack = stack_factory(one_deployment(mock))
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert response.content == mock.requests[-1].response_body


def usage_of(mock: Mock) -> int:
    return usage_in(mock.requests[-1].response_body)


def usage_in(body: bytes) -> int:
    """total_tokens of a response body: a JSON body's usage, or a stream's usage chunk (0 without one)."""
    for line in reversed(body.split(b"\n\n")):
        if b'"usage":{' in line:
            return int(orjson.loads(line.removeprefix(b"data: "))["usage"]["total_tokens"])
    if body.startswith(b"data: "):
        return 0
    return int(orjson.loads(body)["usage"]["total_tokens"])


@pytest.mark.parametrize(
    ("operation", "payload"),
    [
        ("chat/completions", {"messages": MESSAGES}),
        ("chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}),
        ("completions", {"prompt": "Once upon a time"}),
        ("completions", {"prompt": "Once upon a time", "stream": True, "stream_options": {"include_usage": True}}),
        ("embeddings", {"input": ["first text", "second text"]}),
    ],
    ids=["chat", "chat-stream", "completions", "completions-stream", "embeddings"],
)
def test_actual_usage_is_counted(
    mock_factory: MockFactory, stack_factory: StackFactory, operation: str, payload: dict[str, object]
) -> None:
    mock = mock_factory("k", "m")
    stack = stack_factory(one_deployment(mock, ", tpm: 100000"))
    with httpx.stream("POST", f"{stack.base_url}/v1/{operation}", json={"model": "gpt-4o", **payload}) as response:
        response.read()
    assert response.status_code == 200
    expected = usage_of(mock)
    assert wait_for(lambda: stack.metric("litellm_deployment_total_tokens") == expected), stack.metrics_text()
    assert stack.metric("llm_deployment_tpm_used") == expected  # the estimate was replaced by the actual usage


def test_stream_without_usage_counts_streamed_content(mock_factory: MockFactory, stack_factory: StackFactory) -> None:
    mock = mock_factory("k", "m")
    stack = stack_factory(one_deployment(mock, ", tpm: 100000"))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response:
        response.read()
    content_events = mock.requests[-1].response_body.count(b'"content":"') - mock.requests[-1].response_body.count(
        b'"content":""')
    assert wait_for(lambda: stack.metric("litellm_deployment_total_requests") == 1)
    tokens = stack.metric("litellm_deployment_total_tokens")
    # the input estimate plus one token per content event: the client's stream is left exactly as sent
    assert tokens > content_events >= 3


@pytest.mark.parametrize("end", ["client-disconnect", "upstream-reset", "normal"])
def test_every_kind_of_end_closes_the_accounting_once(
    mock_factory: MockFactory, stack_factory: StackFactory, end: str
) -> None:
    mock = mock_factory("k", "m")
    stack = stack_factory(one_deployment(mock, ", tpm: 100000", ", routing_strategy: least-busy"))
    mock.fault("*", Fault(chunk_delay=0.15, reset_after_events=4 if end == "upstream-reset" else None))
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    with httpx.Client(timeout=10) as client:
        try:
            with client.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response:
                for i, _ in enumerate(response.iter_raw()):
                    if end == "client-disconnect" and i == 2:
                        break  # leave mid-stream
        except httpx.RemoteProtocolError:
            assert end == "upstream-reset"
    assert wait_for(lambda: stack.metric("litellm_deployment_total_requests") == 1), stack.metrics_text()
    assert wait_for(lambda: stack.metric("llm_deployment_in_flight") == 0)
    time.sleep(0.3)
    assert stack.metric("litellm_deployment_total_requests") == 1  # reported exactly once
    estimate = stack.metric("llm_deployment_tpm_used")
    assert estimate > 0
    if end != "normal":
        assert stack.metric("litellm_deployment_total_tokens") >= estimate  # tokens seen so far are counted


def test_usage_based_refuses_a_deployment_spent_by_streams(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    stack = stack_factory(f"""
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/small, api_base: "{a.base}", api_key: ka, tpm: 50}}
  - model_name: gpt-4o
    litellm_params: {{model: azure/large, api_base: "{b.base}", api_key: kb, tpm: 100000}}
router_settings: {{routing_strategy: usage-based-routing, num_retries: 0}}
""")
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    served = []
    for _ in range(12):
        with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body) as response:
            response.read()
            served.append(response.headers["x-llm-deployment"])
        time.sleep(0.05)  # the access log settles the stream's actual usage
    spent_on_small = sum(usage_in(r.response_body) for r in a.requests)
    assert spent_on_small <= 50
    assert served[-4:] == ["large"] * 4, served  # small's tpm is spent: every later request goes to large

