"""The rendered Envoy bootstrap: its shape, and the real binary's `--mode validate` verdict on every file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import RouterConfig, load_config, parse_config
from extproc.envoy_render import EXT_PROC_CLUSTER, PROCESSOR_CLUSTER, RenderOptions, render_bootstrap, render_yaml
from extproc.launcher import validate_envoy_config

from .test_config import SEED_ENV

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def load(path: Path) -> RouterConfig:
    return load_config(path, environ=SEED_ENV)


def clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def hcm(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


STATIC = RenderOptions(dynamic_clusters=False)  # deployment clusters in the file, to inspect them here


@pytest.mark.parametrize("dynamic", [True, False], ids=["cds", "static"])
@pytest.mark.parametrize("path", configs(), ids=lambda p: p.name)
def test_every_example_renders_and_validates(path: Path, tmp_path: Path, dynamic: bool) -> None:
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(render_bootstrap(load(path), RenderOptions(dynamic_clusters=dynamic))))
    result = validate_envoy_config(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def _ext_proc_target(doc: dict[str, Any]) -> tuple[str, list[Any]]:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    name = hcm["http_filters"][0]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    endpoints = clusters(doc)[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return name, [endpoint["endpoint"]["address"] for endpoint in endpoints]


@pytest.mark.parametrize(
    ("options", "target"),
    [
        # `serve` puts its lean listener at --port + 1 by default
        (RenderOptions(processors=(("10.0.0.1", 7000), ("10.0.0.2", 7000))),
         (EXT_PROC_CLUSTER, [{"socket_address": {"address": a, "port_value": 7001}}
                             for a in ("10.0.0.1", "10.0.0.2")])),
        (RenderOptions(ext_proc_processors=(("127.0.0.1", 9),)),
         (EXT_PROC_CLUSTER, [{"socket_address": {"address": "127.0.0.1", "port_value": 9}}])),
        (RenderOptions(processor_sockets=("/run/p.sock",), ext_proc_sockets=("/run/p.ext_proc.sock",)),
         (EXT_PROC_CLUSTER, [{"pipe": {"path": "/run/p.ext_proc.sock"}}])),
        # no lean listener: ext_proc over grpc.aio at the processor's own address
        (RenderOptions(ext_proc_processors=()),
         (PROCESSOR_CLUSTER, [{"socket_address": {"address": "127.0.0.1", "port_value": 50051}}])),
        (RenderOptions(processor_sockets=("/run/p.sock",)), (PROCESSOR_CLUSTER, [{"pipe": {"path": "/run/p.sock"}}])),
    ],
    ids=["port+1", "explicit", "sockets", "grpc-aio", "socket-grpc-aio"],
)
def test_ext_proc_and_access_logs_go_to_the_lean_listener_when_there_is_one(
    options: RenderOptions, target: tuple[str, list[Any]]
) -> None:
    config = load(CONFIG_DIR / "seed-router-settings.yaml")
    doc = render_bootstrap(config, options)
    assert _ext_proc_target(doc) == target
    # the access logs (one entry per request) go where ext_proc goes; discovery stays on grpc.aio
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    router = next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.router")
    for log in [*manager["access_log"], *router["typed_config"]["upstream_log"]]:
        assert log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"] == {"cluster_name": target[0]}
    assert doc["dynamic_resources"]["cds_config"]["api_config_source"]["grpc_services"][0]["envoy_grpc"] == {
        "cluster_name": PROCESSOR_CLUSTER
    }
    assert (EXT_PROC_CLUSTER in clusters(doc)) == (target[0] == EXT_PROC_CLUSTER)


def test_deployment_clusters_come_from_the_processor_over_cds() -> None:
    from extproc.xds import ClusterDiscovery

    config = load(CONFIG_DIR / "seed-router-settings.yaml")
    doc = render_bootstrap(config, RenderOptions())
    assert list(clusters(doc)) == [PROCESSOR_CLUSTER, EXT_PROC_CLUSTER]  # the processor's two listeners
    source = doc["dynamic_resources"]["cds_config"]["api_config_source"]
    assert source["grpc_services"] == [{"envoy_grpc": {"cluster_name": PROCESSOR_CLUSTER}}]
    # what the processor serves is the same clusters a static render holds, as protobuf
    served = ClusterDiscovery(config)._current
    assert [r.type_url for r in served.resources] == [
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"] * len(config.deployments)
    from envoy.config.cluster.v3 import cluster_pb2

    names = []
    for resource in served.resources:
        cluster = cluster_pb2.Cluster()
        resource.Unpack(cluster)
        names.append(cluster.name)
    assert names == [dep.cluster for dep in config.deployments]


def test_tls_clusters_verify_against_system_cas() -> None:
    config = load(CONFIG_DIR / "seed-router-settings.yaml")
    doc = render_bootstrap(config, STATIC)
    dep = config.deployments[1]
    cluster = clusters(doc)[dep.cluster]
    match = cluster["transport_socket_matches"][0]
    assert match["match"] == {"tls": True}
    tls = match["transport_socket"]["typed_config"]
    # SNI and SAN check follow the endpoint each attempt lands on (one cluster reaches several resources)
    assert tls["auto_host_sni"] is True and tls["auto_sni_san_validation"] is True
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"] == "/etc/ssl/certs/ca-certificates.crt"
    assert cluster["type"] == "STRICT_DNS"
    first = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert first["endpoint"]["address"]["socket_address"] == {"address": dep.host, "port_value": 443}
    assert first["endpoint"]["hostname"] == "my-endpoint-canada-berri992.openai.azure.com"
    assert first["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tls": True}


def test_failover_clusters_put_the_primary_first_and_never_hold_keys() -> None:
    config = load(CONFIG_DIR / "seed-router-settings.yaml")
    doc = render_bootstrap(config, STATIC)
    a, b = config.deployments
    for primary, other in ((a, b), (b, a)):
        endpoints = clusters(doc)[primary.cluster]["load_assignment"]["endpoints"]
        assert [e["priority"] for e in endpoints] == [0, 1]
        ids = [e["lb_endpoints"][0]["metadata"]["filter_metadata"]["llm"]["id"] for e in endpoints]
        assert ids == [primary.id, other.id]
    text = render_yaml(doc)
    assert SEED_ENV["AZURE_API_KEY_A"] not in text.replace("key_", "") and "key-b" not in text


def test_processors_on_unix_sockets(tmp_path: Path) -> None:
    config = load(CONFIG_DIR / "seed-router-settings.yaml")
    sockets = ("/run/llm/processor-0.sock", "/run/llm/processor-1.sock")
    options = RenderOptions(processor_sockets=sockets)
    doc = render_bootstrap(config, options)
    processor = clusters(doc)[PROCESSOR_CLUSTER]
    assert processor["type"] == "STATIC"
    addresses = [e["endpoint"]["address"] for e in processor["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert addresses == [{"pipe": {"path": path}} for path in sockets]
    out = tmp_path / "envoy.yaml"
    out.write_text(render_yaml(doc))
    assert validate_envoy_config(out).returncode == 0


def test_plain_http_for_local_endpoints() -> None:
    config = parse_config(
        'model_list: [{model_name: m, litellm_params: {model: azure/d, api_base: "http://127.0.0.1:8080", '
        "api_key: k}}]", environ={},
    )
    cluster = clusters(render_bootstrap(config, STATIC))[config.deployments[0].cluster]
    assert "transport_socket" not in cluster
    assert cluster["type"] == "STATIC"


def test_filter_chain_processor_and_admin() -> None:
    config = load(CONFIG_DIR / "seed-router-settings.yaml")
    options = RenderOptions(listen_port=10123, admin_port=9123, processors=(("127.0.0.1", 5001), ("127.0.0.1", 5002)))
    doc = render_bootstrap(config, options)
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9123}
    manager = hcm(doc)
    names = [f["name"] for f in manager["http_filters"]]
    assert names == ["envoy.filters.http.ext_proc", "envoy.filters.http.lua", "envoy.filters.http.router"]
    ext_proc = manager["http_filters"][0]["typed_config"]
    # POSTs: one message (the body, with header facts as attributes); other methods: headers only
    assert ext_proc["processing_mode"]["request_header_mode"] == "SKIP"
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext_proc["processing_mode"]["response_header_mode"] == "SKIP"
    assert "request.path" in ext_proc["request_attributes"]
    inference, control = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert inference["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "POST"}}]
    control_mode = control["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]["processing_mode"]
    assert (control_mode["request_header_mode"], control_mode["request_body_mode"]) == ("SEND", "NONE")
    processor = clusters(doc)[PROCESSOR_CLUSTER]
    assert "http2_protocol_options" in str(processor["typed_extension_protocol_options"])
    assert processor["circuit_breakers"]["thresholds"][0]["max_requests"] >= 100000
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in processor["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [5001, 5002]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["retry_policy"]["num_retries"] == 2
    assert 429 in route["retry_policy"]["retriable_status_codes"]
    assert route["timeout"] == "30.000s"
    runtime = doc["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime["envoy.reloadable_features.ext_proc_graceful_grpc_close"] is True


def test_cli_render_envoy_writes_a_valid_file(tmp_path: Path) -> None:
    from extproc.cli import main

    out = tmp_path / "envoy.yaml"
    assert main(["render-envoy", "--config", str(CONFIG_DIR / "demo.yaml"), "--out", str(out), "--port", "10777"]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 10777
    assert validate_envoy_config(out).returncode == 0
