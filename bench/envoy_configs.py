"""Envoy bootstraps for the two Envoys the side-by-side benchmark adds around the product.

- The *upstream mock*: an Envoy answering every request with a fixed, realistic Azure chat.completion
  (`direct_response`), so the upstream costs almost no CPU and never limits the systems under test.
- The *plain front proxy* (the floor): one listener routing everything to that mock, no ext_proc, plus a
  second listener routing to the project's streaming mock for the time-to-first-byte point.
"""

from __future__ import annotations

import json
from typing import Any

# The same generous limits the product renders, so the floor is not held back by Envoy's defaults.
CIRCUIT_BREAKERS = {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}

# What Azure returns for a short chat completion, including `usage` (the product's Lua filter scans it).
CHAT_COMPLETION = {
    "id": "chatcmpl-BENCH0123456789abcdefghijkl",
    "object": "chat.completion",
    "created": 1732550400,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_bench",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Load balancing spreads requests across deployments so that no single one is overloaded.",
                "refusal": None,
            },
            "finish_reason": "stop",
            "logprobs": None,
            "content_filter_results": {
                name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")
            },
        }
    ],
    "prompt_filter_results": [
        {
            "prompt_index": 0,
            "content_filter_results": {
                name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")
            },
        }
    ],
    "usage": {"prompt_tokens": 231, "completion_tokens": 17, "total_tokens": 248},
}

# Azure-like response headers: a realistic header count matters for Envoy's and LiteLLM's per-request work.
AZURE_RESPONSE_HEADERS = {
    "apim-request-id": "0c5e4a8e-7d51-4c1f-9a55-3f6f0b1c2d3e",
    "x-request-id": "0c5e4a8e-7d51-4c1f-9a55-3f6f0b1c2d3e",
    "x-ms-region": "Sweden Central",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-tokens": "999752",
    "x-ratelimit-limit-tokens": "1000000",
    "azureml-model-session": "d001-20241121041616",
    "openai-processing-ms": "412",
}


def _socket(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _http_connection_manager(stat_prefix: str, route: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
            },
            "http_filters": [
                *filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        },
    }


def _listener(name: str, port: int, manager: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": _socket(port), "filter_chains": [{"filters": [manager]}]}


def _bootstrap(admin_port: int, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": _socket(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def upstream_mock_bootstrap(port: int, admin_port: int) -> dict[str, Any]:
    """Every request, any path, gets 200 and CHAT_COMPLETION.

    The buffer filter makes Envoy read the whole request body before answering: a reply sent while the body
    is still arriving would make Envoy close the HTTP/1.1 connection, and every request would then pay for
    a new upstream connection in the proxy under test."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": json.dumps(CHAT_COMPLETION)}},
        "response_headers_to_add": [
            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in {"content-type": "application/json", **AZURE_RESPONSE_HEADERS}.items()
        ],
    }
    buffer_filter = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 16 * 1024 * 1024,
        },
    }
    manager = _http_connection_manager("mock", route, [buffer_filter])
    return _bootstrap(admin_port, [_listener("mock", port, manager)], [])


def _proxy_cluster(name: str, upstream_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "circuit_breakers": {"thresholds": [CIRCUIT_BREAKERS]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(upstream_port)}}]}],
        },
    }


def _proxy_route(cluster: str) -> dict[str, Any]:
    # Same route timeout as the product's rendered config (router_settings.timeout in the bench configs).
    return {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "30s"}}


def plain_proxy_bootstrap(
    port: int, stream_port: int, admin_port: int, upstream_port: int, stream_upstream_port: int
) -> dict[str, Any]:
    """`port` → the direct-response mock; `stream_port` → the streaming mock (Azure paths sent by the client)."""
    listeners = [
        _listener("plain", port, _http_connection_manager("plain", _proxy_route("mock"), [])),
        _listener("stream", stream_port, _http_connection_manager("stream", _proxy_route("stream_mock"), [])),
    ]
    clusters = [_proxy_cluster("mock", upstream_port), _proxy_cluster("stream_mock", stream_upstream_port)]
    return _bootstrap(admin_port, listeners, clusters)
