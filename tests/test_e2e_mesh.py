"""An existing Envoy plus `render-envoy --target snippet`: the pieces merged into a hand-written bootstrap that
already serves other routes, `envoy --mode validate` on the result, then a real Envoy, `python -m extproc serve`
alone and mock Azure resources. Both the existing routes and the LLM route must work, side by side."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from extproc.cli import main as cli_main
from extproc.config import parse_config
from extproc.envoy_render import (
    CONTROL_ROUTE_NAME,
    LLM_ROUTE_NAME,
    SNIPPET_KEYS,
    RenderOptions,
    processor_clusters,
    render_bootstrap,
    render_snippet,
    upstream_clusters,
)
from extproc.launcher import envoy_binary, free_port, free_port_pair, validate_envoy_config
from extproc.mock_azure import Fault

from .conftest import Mock
from .conftest import wait_for as eventually

MockFactory = Callable[..., Mock]
ROOT = Path(__file__).resolve().parent.parent

# What "an existing Envoy" looks like before the merge: its own listener, Lua filter, routes and cluster.
EXISTING_BOOTSTRAP = """
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: __ADMIN_PORT__}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: __LISTEN_PORT__}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: ingress_routes
            virtual_hosts:
            - name: default
              domains: ["*"]
              routes:
              - match: {prefix: /other/}
                direct_response: {status: 200, body: {inline_string: existing service}}
              - match: {prefix: /maintenance/}
                direct_response: {status: 503, body: {inline_string: down for maintenance}}
              - match: {prefix: /_mock/}
                route: {cluster: existing_service}
          http_filters:
          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
                  function envoy_on_response(handle) handle:headers():add("x-existing-filter", "ran") end
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: existing_service
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: existing_service
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: __EXISTING_PORT__}}}
"""


def config_text(a: Mock, b: Mock) -> str:
    return f"""
model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/gpt-4o-a, api_base: "{a.base}", api_key: {a.api_key}}}
  - model_name: gpt-4o
    litellm_params: {{model: azure/gpt-4o-b, api_base: "{b.base}", api_key: {b.api_key}}}
router_settings:
  num_retries: 2
  timeout: 30
  cooldown_time: 60  # longer than this test, however slow the machine (the default is 5 s)
general_settings:
  max_request_size_mb: 1
"""


def merge(existing: dict[str, Any], snippet: dict[str, Any]) -> dict[str, Any]:
    """What docs/deploy.md tells an operator to do, one key at a time."""
    listener = existing["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    router = filters.pop()  # the router stays last: the LLM filters go right before it
    assert router["name"] == "envoy.filters.http.router"
    filters.extend(snippet["http_filters"])
    router["typed_config"].setdefault("upstream_log", []).extend(snippet["router_upstream_log"])
    filters.append(router)
    hcm.setdefault("access_log", []).extend(snippet["access_log"])
    hcm["local_reply_config"] = snippet["local_reply_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"].extend(snippet["routes"])  # after the existing routes
    listener["per_connection_buffer_limit_bytes"] = max(
        listener.get("per_connection_buffer_limit_bytes", 0), snippet["listener_buffer_limit_bytes"]
    )
    existing["static_resources"]["clusters"].extend(snippet["clusters"])
    existing["layered_runtime"] = {"layers": [{"name": "static", "static_layer": snippet["runtime"]}]}
    return existing


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait_port(self, name: str, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        proc = dict(self.procs)[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"{name} not listening on {port}:\n{self.log(name)}")

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def envoy_stat(admin_port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=^{name}$", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(int(line.rsplit(": ", 1)[1]) for line in lines if line.startswith(name + ": "))



# ---------------------------------------------------------------------------------------------------------
# The snippet itself (no processes)


SAMPLE = (
    'model_list: [{model_name: m, litellm_params: {model: azure/d, api_base: "https://r.openai.azure.com", '
    "api_key: k}}]"
)


def test_snippet_is_one_document_with_named_keys(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(SAMPLE)
    out = tmp_path / "snippet.yaml"
    assert cli_main(["render-envoy", "--config", str(config), "--target", "snippet",
                     "--processor", "llm-processor.llm.svc.cluster.local:50051", "--out", str(out)]) == 0
    text = out.read_text()
    documents = list(yaml.safe_load_all(text))
    assert len(documents) == 1
    snippet = documents[0]
    assert tuple(snippet) == SNIPPET_KEYS
    for key in SNIPPET_KEYS:  # the header says where each key goes
        assert f"#   {key} " in text
    assert [f["name"] for f in snippet["http_filters"]] == ["llm.ext_proc", "llm.lua"]
    assert all(f["disabled"] is True for f in snippet["http_filters"])
    inference, control = snippet["routes"]
    assert (inference["name"], control["name"]) == (LLM_ROUTE_NAME, CONTROL_ROUTE_NAME)
    assert set(inference["typed_per_filter_config"]) == {"llm.ext_proc", "llm.lua"}
    assert set(control["typed_per_filter_config"]) == {"llm.ext_proc"}  # headers only, no Lua
    # The processor's grpc.aio address (discovery, access logs) and its lean ext_proc listener at the next port.
    for cluster, port in zip(snippet["clusters"][:2], (50051, 50052), strict=True):
        assert cluster["type"] == "STRICT_DNS"  # a hostname was given
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address["socket_address"] == {"address": "llm-processor.llm.svc.cluster.local", "port_value": port}
    ext_proc = snippet["http_filters"][0]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert ext_proc == snippet["clusters"][1]["name"]
    assert snippet["runtime"] == {"envoy.reloadable_features.ext_proc_graceful_grpc_close": True}
    assert snippet["listener_buffer_limit_bytes"] == 16 * 1024 * 1024
    for entry in [*snippet["access_log"], *snippet["router_upstream_log"]]:
        assert LLM_ROUTE_NAME in entry["filter"]["extension_filter"]["typed_config"]["expression"]


def test_snippet_carries_the_same_settings_as_the_full_bootstrap() -> None:
    config = parse_config(SAMPLE, environ={})
    options = RenderOptions()
    snippet = render_snippet(config, options)
    full = render_bootstrap(config, options)
    hcm = full["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert snippet["http_filters"][0]["typed_config"] == hcm["http_filters"][0]["typed_config"]  # ext_proc
    lua_source = snippet["http_filters"][1]["typed_config"]["source_codes"]["llm_lua"]
    assert lua_source == hcm["http_filters"][1]["typed_config"]["default_source_code"]
    full_routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert len(snippet["routes"]) == len(full_routes) == 2
    for route, full_route in zip(snippet["routes"], full_routes, strict=True):
        route, full_route = dict(route), dict(full_route)
        per_filter = route.pop("typed_per_filter_config")
        full_per_filter = full_route.pop("typed_per_filter_config", {})
        assert route == full_route
        if full_per_filter:  # the control route's ext_proc override, wrapped to enable the disabled filter
            assert per_filter["llm.ext_proc"]["config"] == full_per_filter["envoy.filters.http.ext_proc"]
    # Static clusters (an existing Envoy usually has a CDS of its own), the same ones the local target renders.
    assert snippet["clusters"] == [*processor_clusters(options), *upstream_clusters(config, options)]
    assert snippet["clusters"][:2] == full["static_resources"]["clusters"][:2]

    def unfiltered(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in entry.items() if k != "filter"} for entry in entries]

    upstream_log = hcm["http_filters"][2]["typed_config"]["upstream_log"]
    assert unfiltered(snippet["router_upstream_log"]) == unfiltered(upstream_log)
    assert unfiltered(snippet["access_log"]) == unfiltered(hcm["access_log"])
    assert len(snippet["local_reply_config"]["mappers"]) == len(hcm["local_reply_config"]["mappers"])


# ---------------------------------------------------------------------------------------------------------
# Merged into an existing Envoy, running


@pytest.mark.e2e
def test_existing_routes_and_the_llm_route_work_side_by_side(
    mock_factory: MockFactory, processes: Processes, tmp_path: Path
) -> None:
    a, b = mock_factory("key-a", "mock-a"), mock_factory("key-b", "mock-b")
    existing_service = mock_factory("unused", "existing")
    config = tmp_path / "config.yaml"
    config.write_text(config_text(a, b))
    processor_port = free_port_pair()  # the processor's lean ext_proc listener takes the next one
    metrics_port, listen_port, admin_port = (free_port() for _ in range(3))

    snippet_path = tmp_path / "snippet.yaml"
    assert cli_main(["render-envoy", "--config", str(config), "--target", "snippet",
                     "--processor", f"127.0.0.1:{processor_port}", "--out", str(snippet_path)]) == 0
    existing_text = (
        EXISTING_BOOTSTRAP.replace("__ADMIN_PORT__", str(admin_port))
        .replace("__LISTEN_PORT__", str(listen_port))
        .replace("__EXISTING_PORT__", str(existing_service.port))
    )
    merged = merge(yaml.safe_load(existing_text), yaml.safe_load(snippet_path.read_text()))
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(yaml.safe_dump(merged, sort_keys=False))
    verdict = validate_envoy_config(bootstrap)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr

    processes.start("processor", [sys.executable, "-m", "extproc", "serve", "--config", str(config),
                                  "--host", "127.0.0.1", "--port", str(processor_port),
                                  "--metrics-port", str(metrics_port)])
    processes.wait_port("processor", processor_port)
    processes.wait_port("processor", processor_port + 1)
    processes.start("envoy", [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart", "--log-level", "warn"])
    processes.wait_port("envoy", listen_port)
    base = f"http://127.0.0.1:{listen_port}"

    with httpx.Client(base_url=base, timeout=10) as http:
        # Existing routes: untouched by ext_proc (a non-JSON POST would get 400 from the processor), by the
        # LLM route's local_reply_config (the 503 keeps its own body), and their own filter still runs.
        other = http.get("/other/x")
        assert (other.status_code, other.text, other.headers["x-existing-filter"]) == (200, "existing service", "ran")
        assert http.post("/other/x", content=b"not json").text == "existing service"
        maintenance = http.get("/maintenance/")
        assert (maintenance.status_code, maintenance.text) == (503, "down for maintenance")
        upstream = http.get("/_mock/health")
        assert (upstream.status_code, upstream.json()) == (200, {"status": "ok"})
        assert "x-llm-attempts" not in upstream.headers
        time.sleep(0.2)  # ten access-log flush intervals
        # Neither access log sends the existing routes' requests to the processor (filtered on the route name).
        assert envoy_stat(admin_port, "access_logs.grpc_access_log.logs_written") == 0

        # The LLM route: the processor's own replies, Envoy's replies as OpenAI JSON, and the existing filter.
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["gpt-4o"]
        unknown = http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")
        too_large = http.post("/v1/chat/completions", content=b"x" * (1024 * 1024 + 1),
                              headers={"content-type": "application/json"})
        assert (too_large.status_code, too_large.json()["error"]["code"]) == (413, "request_too_large")

    api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    raw = api.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
    assert raw.headers["x-llm-deployment"] in {"gpt-4o-a", "gpt-4o-b"}
    assert raw.headers["x-existing-filter"] == "ran"
    assert raw.parse().choices[0].message.content
    served = raw.headers["x-llm-deployment"]
    # The Lua usage filter and the connection manager's access log reached the processor: tokens are counted.
    assert eventually(lambda: metric(metrics_port, "litellm_deployment_total_tokens", deployment=served) > 0)

    # Failover and cooldowns: the router's upstream log reports A's 429s, so A cools down; B serves everything.
    a.fault("*", Fault(status=429))
    sent = 0
    while sent < 4 or not any(r.status == 429 for r in a.requests):  # until A was tried first at least once
        answer = api.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)  # type: ignore[arg-type]
        assert answer.headers["x-llm-deployment"] == "gpt-4o-b"
        sent += 1
        assert sent < 60
    assert eventually(lambda: metric(metrics_port, "litellm_deployment_cooled_down", deployment="gpt-4o-a") == 1)
    assert envoy_stat(admin_port, "access_logs.grpc_access_log.logs_written") > 0
    assert eventually(lambda: metric(metrics_port, "litellm_deployment_total_requests") == 1 + sent)
