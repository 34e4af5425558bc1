"""Hot reload under steady load: edited config applied by processors and Envoy with zero failed requests."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from extproc.config import ConfigError
from extproc.launcher import Stack

from .conftest import Mock
from .test_e2e_resilience import SteadyLoad

pytestmark = pytest.mark.e2e

MockFactory = Callable[..., Mock]
StackFactory = Callable[..., Stack]


def config(entries: list[tuple[str, Mock]], strategy: str, alias: str = "") -> str:
    listed = "".join(
        f"""
  - model_name: gpt-4o
    litellm_params: {{model: azure/{name}, api_base: "{mock.base}", api_key: {mock.api_key}, rpm: 100000}}"""
        for name, mock in entries
    )
    return f"model_list:{listed}\nrouter_settings: {{routing_strategy: {strategy}, num_retries: 0{alias}}}\n"


def test_reload_under_load_adds_and_removes_deployments_without_a_failed_request(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b, c = mock_factory("ka", "a"), mock_factory("kb", "b"), mock_factory("kc", "c")
    stack = stack_factory(config([("dep-a", a), ("dep-b", b)], "simple-shuffle"))
    with SteadyLoad(stack.base_url) as load:
        time.sleep(0.5)
        # a new deployment on a new resource, one removed, another strategy, and a new alias
        edited = config([("dep-a", a), ("dep-c", c)], "least-busy", ", model_group_alias: {gpt-5: gpt-4o}")
        stack.config_path.write_text(edited)
        new = stack.reload()
        assert new.routing_strategy == "least-busy"
        time.sleep(1.0)
        c_before = len(c.served())
        b_before = len(b.served())
        time.sleep(1.0)
    assert set(load.statuses) == {200}, load.bodies[:3]
    assert len(c.served()) > c_before > 0  # the new deployment's cluster exists and takes traffic
    assert len(b.served()) == b_before  # the removed one gets nothing once the reload is done
    response = httpx.post(f"{stack.base_url}/v1/chat/completions",
                          json={"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200  # the new alias


def test_bad_config_is_rejected_and_the_old_one_keeps_serving(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    a, b = mock_factory("ka", "a"), mock_factory("kb", "b")
    good = config([("dep-a", a), ("dep-b", b)], "simple-shuffle")
    stack = stack_factory(good)
    stack.config_path.write_text(good.replace("rpm: 100000", "rpm: -5", 1))
    with pytest.raises(ConfigError, match=r"model_list\[0\]\.litellm_params\.rpm: must be a positive integer"):
        stack.reload()
    # the processor refuses it too when signalled directly, and says so in its metrics
    stack.process("processor-0").send_signal(__import__("signal").SIGHUP)
    deadline = time.monotonic() + 5
    while stack.metric("llm_config_reloads_rejected_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.metric("llm_config_reloads_rejected_total") == 1
    assert "reload rejected" in stack.log_tail("processor-0")
    response = httpx.post(f"{stack.base_url}/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200


def test_reload_turns_client_auth_on_and_its_key_stays_out_of_envoys_log(
    mock_factory: MockFactory, stack_factory: StackFactory
) -> None:
    """Envoy always sends the credential headers as request attributes, so a master_key added by a reload
    applies at once without re-rendering Envoy; the launcher's redactor learns the new key first."""
    a = mock_factory("ka", "a")
    plain = config([("dep-a", a)], "simple-shuffle")
    stack = stack_factory(plain, envoy_log_level="debug")
    url = f"{stack.base_url}/v1/chat/completions"
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url, json=chat).status_code == 200
    master = "sk-added-by-reload-7777"
    stack.config_path.write_text(plain + f"general_settings: {{master_key: {master}}}\n")
    stack.reload()
    assert httpx.post(url, json=chat).status_code == 401
    assert httpx.post(url, json=chat, headers={"authorization": f"Bearer {master}"}).status_code == 200
    assert httpx.post(url, json=chat, headers={"api-key": master}).status_code == 200
    stack.stop()
    assert stack.run_dir is not None
    envoy_log = (stack.run_dir / "envoy.log").read_text(errors="replace")
    assert "'authorization', '[redacted]'" in envoy_log  # debug level did print the header
    assert master not in envoy_log
