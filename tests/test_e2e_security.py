"""Secrets stay secret; malformed input at scale gets JSON errors and never hurts the processor."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.launcher import Stack
from extproc.mock_azure import Fault

from .conftest import LoopThread, Mock

pytestmark = pytest.mark.e2e

MockFactory = Callable[..., Mock]
StackFactory = Callable[..., Stack]
KEY_A, KEY_B, MASTER = "azure-secret-AAAA1111", "azure-secret-BBBB2222", "sk-master-CCCC3333"


def config(a: Mock, b: Mock) -> str:
    return f"""
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/dep-a, api_base: "{a.base}", api_key: {KEY_A}, rpm: 5}}
  - model_name: gpt-4o
    litellm_params: {{model: azure/dep-b, api_base: "{b.base}", api_key: {KEY_B}, rpm: 5}}
router_settings: {{num_retries: 1}}
general_settings: {{master_key: {MASTER}}}
"""


@pytest.mark.parametrize("envoy_level", ["info", "trace"])
def test_no_key_in_logs_errors_metrics_or_config_dump(
    envoy_level: str, mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    """At trace level Envoy prints every header and ext_proc message; the launcher's redactor keeps the log
    clean (Envoy cannot redact them itself, envoyproxy/envoy#9652)."""
    a, b = mock_factory(KEY_A, "a"), mock_factory(KEY_B, "b")
    stack = stack_factory(config(a, b), processor_log_level="DEBUG", envoy_log_level=envoy_level)
    authed = {"authorization": f"Bearer {MASTER}"}
    url = f"{stack.base_url}/v1/chat/completions"
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    seen: list[str] = []

    def record(response: httpx.Response) -> None:
        seen.append(str(response.headers) + response.text)

    a.fault("*", Fault(status=429, count=1))  # a failover
    for _ in range(12):  # past the rpm limits: the processor's own 429 with usage details
        record(httpx.post(url, json=chat, headers=authed))
    record(httpx.post(url, json=chat))  # no key
    record(httpx.post(url, json=chat, headers={"api-key": "wrong"}))
    record(httpx.post(url, content=b"{bad", headers=authed))
    record(httpx.get(f"{stack.base_url}/v1/models", headers=authed))
    assert any('"code":"rate_limit_exceeded"' in text for text in seen)
    assert all(r.headers["api-key"] in (KEY_A, KEY_B) for r in a.requests + b.requests)  # keys did work
    assert all("authorization" not in r.headers for r in a.requests + b.requests)
    time.sleep(0.3)
    seen.append(stack.metrics_text())
    for path in ("/config_dump?include_eds", "/clusters", "/stats", "/runtime", "/server_info"):
        seen.append(httpx.get(f"{stack.admin_url}{path}").text)
    stack.stop()
    assert stack.run_dir is not None
    for log in Path(stack.run_dir).glob("*.log"):
        seen.append(log.read_text(errors="replace"))
    seen.append(stack.envoy_config_path.read_text())
    if envoy_level == "trace":  # the secrets were there to be printed, and were masked
        envoy_log = (Path(stack.run_dir) / "envoy.log").read_text(errors="replace")
        assert "'authorization', '[redacted]'" in envoy_log
        assert "'api-key', '[redacted]'" in envoy_log
    for secret in (KEY_A, KEY_B, MASTER):
        leaks = [text[max(0, text.find(secret) - 80): text.find(secret) + 40] for text in seen if secret in text]
        assert not leaks, f"{secret} leaked: {leaks[:2]}"


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Mock]]:
    loop = LoopThread()
    a, b = Mock(loop, KEY_A, "a"), Mock(loop, KEY_B, "b")
    a.server.max_recorded = 100
    b.server.max_recorded = 100
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    text = config(a, b).replace("rpm: 5", "rpm: 10000000").replace("}\n\"\"\"", "")
    path.write_text(text.replace(f"master_key: {MASTER}}}", f"master_key: {MASTER}, max_request_size_mb: 1}}"))
    stack = Stack(path, run_dir=path.parent / "run").start()
    try:
        yield stack, a
    finally:
        stack.stop()
        a.stop()
        b.stop()
        loop.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: __import__("orjson").dumps(v)),
    st.fixed_dictionaries(
        {"model": st.one_of(st.text(max_size=12), st.integers(0, 99), st.none(), st.sampled_from(["gpt-4o", "gpt-4"])),
         "messages": json_values, "stream": json_values},
    ).map(lambda v: __import__("orjson").dumps(v)),
)
paths = st.one_of(
    st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                     "/openai/deployments/x/chat/completions", "/v1/models", "/health/readiness"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-_.%~", max_size=40).map(lambda p: "/" + p),
)
# what a client library can send: printable ASCII without surrounding blanks
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    lambda v: v.strip() or "x")


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"]), path=paths, body=bodies,
       auth=st.one_of(st.just(f"Bearer {MASTER}"), header_values), extra=header_values)
def test_malformed_input_gets_json_errors(
    fuzz_stack: tuple[Stack, Mock], method: str, path: str, body: bytes, auth: str, extra: str
) -> None:
    stack, _ = fuzz_stack
    headers = {"authorization": auth, "x-llm-cluster": extra, "content-type": "application/json"}
    response = httpx.request(method, f"{stack.base_url}{path}", content=body if method != "GET" else None,
                             headers=headers, timeout=10)
    if response.status_code < 400:
        return  # a valid request, served
    assert response.status_code < 600
    error = response.json()["error"]
    assert error["message"]
    assert "type" in error or "code" in error


def test_processor_survives_the_fuzzing_with_flat_memory(fuzz_stack: tuple[Stack, Mock]) -> None:
    stack, _ = fuzz_stack
    processor = stack.process("processor-0")
    before = rss_kib(processor.pid)
    with httpx.Client(timeout=10) as client:
        for i in range(2000):
            client.post(f"{stack.base_url}/v1/chat/completions", content=b"{" * (i % 7),
                        headers={"authorization": f"Bearer {MASTER}"})
            client.post(f"{stack.base_url}/v1/chat/completions", json={"model": "nope", "messages": []},
                        headers={"authorization": f"Bearer {MASTER}"})
    after = rss_kib(processor.pid)
    assert processor.poll() is None
    assert after - before < 8 * 1024, (before, after)  # no growth per request (4000 requests)
    assert httpx.get(f"{stack.base_url}/health/readiness").status_code == 200
