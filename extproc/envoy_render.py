"""Render the Envoy bootstrap (or the pieces an existing Envoy needs) from the same LiteLLM config.

Data in (a RouterConfig plus addresses), plain dicts out, YAML at the edge. Envoy owns connections, TLS,
streaming, retries and timeouts; the processor only decides where each request goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from . import errors
from .accounting import ATTEMPT_LOG_NAME, REQUEST_LOG_NAME, USAGE_NAMESPACE
from .config import Deployment, RouterConfig
from .protocol import PROCESSOR_REPLY_DETAILS_PREFIX, REQUEST_ATTRIBUTES
from .routing import CLUSTER_HEADER, ENDPOINT_NAMESPACE, KEYS_NAMESPACE, METADATA_NAMESPACE

PROCESSOR_CLUSTER = "llm_extproc"  # the processors' grpc.aio address: cluster discovery
EXT_PROC_CLUSTER = "llm_extproc_lean"  # their lean listeners (h2front.py): every ext_proc and access-log stream
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
LUA_REPLY_DETAILS = "lua_response"  # what Envoy records for a Lua handle:respond()
LLM_ROUTE_NAME = "llm"
CONTROL_ROUTE_NAME = "llm_control"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Envoy's default cluster circuit breakers (1024 requests, 3 concurrent retries) are far too low for
# long-lived LLM streams and bursts of 429s; these are generous ceilings, not targets.
UPSTREAM_CIRCUIT_BREAKERS = {
    "max_connections": 100000,
    "max_pending_requests": 100000,
    "max_requests": 100000,
    "max_retries": 10000,
}
PROCESSOR_CIRCUIT_BREAKERS = {
    "max_connections": 1000000,
    "max_pending_requests": 1000000,
    "max_requests": 1000000,
    "max_retries": 1000000,
}
RETRIABLE_STATUS_CODES = [408, 429, 500, 502, 503, 504]
# Added by the LLM route to every response it forwards (from the routing metadata): how the usage filter
# tells a routed response from the processor's and Envoy's own replies.
ROUTED_RESPONSE_HEADER = "x-litellm-model-group"


def response_headers() -> dict[str, str]:
    """What the client learns: which deployment served it (the endpoint of the last attempt, so a failover
    shows), how many attempts it took, and the model group's rate figures. LiteLLM's names where they
    exist, so its tooling works."""
    served = {"x-litellm-model-id": "id", "x-llm-deployment": "deployment", "x-litellm-model-api-base": "api_base"}
    routed = {
        ROUTED_RESPONSE_HEADER: "model_group",
        "x-ratelimit-limit-requests": "limit_requests",
        "x-ratelimit-remaining-requests": "remaining_requests",
        "x-ratelimit-limit-tokens": "limit_tokens",
        "x-ratelimit-remaining-tokens": "remaining_tokens",
    }
    headers = {name: f"%UPSTREAM_METADATA({ENDPOINT_NAMESPACE}:{key})%" for name, key in served.items()}
    headers |= {name: f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%" for name, key in routed.items()}
    headers["x-llm-attempts"] = "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"
    return headers


# Reads token usage from responses as they stream through, without buffering them: the `usage` object of
# JSON bodies and of a stream's final chunk, else a count of streamed content events. Results go to dynamic
# metadata, which the access log brings back to the processor. Each chunk waits for this code before it
# goes on to the client, so it uses plain finds only (the pattern scan of every chunk it replaced cost
# ~0.2 ms of time to first event, interleaved A/B), runs the usage patterns only on text that holds a usage object, and
# tells a routed response by the response header the route adds (reading the routing metadata would
# convert all of it into a Lua table).
USAGE_LUA = """
local NS = "__USAGE_NS__"
local TAIL = 512
local find, sub, byte, gmatch = string.find, string.sub, string.byte, string.gmatch

-- Handles obtained before a yield (each body chunk) are invalid after it: look them up every time.
local function set(handle, key, value)
  handle:streamInfo():dynamicMetadata():set(NS, key, value)
end

-- Content events with a non-empty "content" string, in text made of whole SSE events.
local function content_events(text)
  local count, from = 0, 1
  while true do
    local _, e = find(text, '"content":', from, true)
    if e == nil then return count end
    local c = byte(text, e + 1)
    while c == 32 do e = e + 1; c = byte(text, e + 1) end
    if c == 34 and byte(text, e + 2) ~= 34 then count = count + 1 end
    from = e + 1
  end
end

local function last_number(text, key)
  local value = nil
  for digits in gmatch(text, '"' .. key .. '"%s*:%s*(%d+)') do value = digits end
  return value
end

local function read_usage(handle, text)
  if find(text, '"total_tokens"', 1, true) == nil then return end
  local total = last_number(text, "total_tokens")
  if total == nil then return end
  set(handle, "total_tokens", tonumber(total))
  local completion = last_number(text, "completion_tokens")
  if completion ~= nil then set(handle, "completion_tokens", tonumber(completion)) end
  local prompt = last_number(text, "prompt_tokens")
  if prompt ~= nil then set(handle, "prompt_tokens", tonumber(prompt)) end
end

function envoy_on_response(handle)
  if handle:headers():get("__ROUTED_HEADER__") == nil then return end
  local content_type = handle:headers():get("content-type") or ""
  local stream = find(content_type, "text/event-stream", 1, true) ~= nil
  local pending, events = "", 0
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      local text = chunk:getBytes(0, size)
      if pending ~= "" then text = pending .. text end
      if stream then
        -- whole SSE events only; an incomplete last one waits for the next chunk
        local scan = text
        pending = ""
        if sub(text, -2) ~= "\\n\\n" then
          local cut, from = nil, 1
          while true do
            local _, e = find(text, "\\n\\n", from, true)
            if e == nil then break end
            cut, from = e, e + 1
          end
          if cut then scan, pending = sub(text, 1, cut), sub(text, cut + 1) else scan, pending = "", text end
        end
        if scan ~= "" then
          local found = content_events(scan)
          if found > 0 then
            events = events + found
            set(handle, "stream_events", events)
          end
          read_usage(handle, scan)
        end
      else
        read_usage(handle, text)
        pending = sub(text, -TAIL)
      end
    end
  end
end
""".replace("__USAGE_NS__", USAGE_NAMESPACE).replace("__ROUTED_HEADER__", ROUTED_RESPONSE_HEADER)


def _lua_string(text: str) -> str:
    """A Lua long-bracket literal: no escaping inside, a level that does not occur in the text."""
    level = "="
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


# Envoy sends a POST to the processor once, with its body (headers skipped, so one gRPC message per
# request); decisions come back as dynamic metadata, and this turns them into the headers the route and the
# router read. ext_proc lets the headers pass at once and holds only the body, so this waits for the body
# (handle:body()): ext_proc releases it with the decision. A POST without a body never reaches the processor.
# (Other methods never get here: the processor answers all of them itself.)
_BODY_REQUIRED = errors.body_required()
DECISION_LUA = """
function envoy_on_request(handle)
  handle:body()
  local routed = handle:streamInfo():dynamicMetadata():get("__ROUTED_NS__")
  if routed == nil then
    handle:respond({[":status"] = "__STATUS__", ["content-type"] = "application/json"}, __BODY__)
    return
  end
  local headers = handle:headers()
  headers:replace("__CLUSTER_HEADER__", routed["cluster"])
  headers:replace("x-envoy-upstream-rq-timeout-ms", routed["timeout_ms"])
  local per_try = routed["per_try_timeout_ms"]
  if per_try ~= nil then headers:replace("x-envoy-upstream-rq-per-try-timeout-ms", per_try) end
  handle:clearRouteCache()
end
""".replace("__ROUTED_NS__", METADATA_NAMESPACE).replace("__CLUSTER_HEADER__", CLUSTER_HEADER).replace(
    "__STATUS__", str(_BODY_REQUIRED.status)).replace("__BODY__", _lua_string(_BODY_REQUIRED.body.decode()))
# One Lua filter for both directions (one filter instance per request instead of two).
ROUTER_LUA = DECISION_LUA + USAGE_LUA


@dataclass(frozen=True)
class RenderOptions:
    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    # One or more processor addresses (host, port); Envoy balances ext_proc streams across them.
    processors: tuple[tuple[str, int], ...] = (("127.0.0.1", 50051),)
    processor_dns: bool = False  # processors named by DNS (compose, Kubernetes) instead of IP literals
    # Unix socket paths (`serve --socket`), used instead of `processors` when given: Envoy and the processors
    # on one machine or in one pod; about 90 µs less per request than loopback TCP.
    processor_sockets: tuple[str, ...] = ()
    # The processors' lean ext_proc listeners (h2front.py), in the same order. None: each processor's port
    # + 1, as `serve` defaults. Empty, or processor sockets without ext_proc sockets: ext_proc goes to the
    # processors' grpc.aio address instead (about 0.3 ms more per request).
    ext_proc_processors: tuple[tuple[str, int], ...] | None = None
    ext_proc_sockets: tuple[str, ...] = ()
    message_timeout_s: float = 2.0
    dynamic_clusters: bool = True  # deployment clusters over CDS from the processor; False: in the file
    access_log_flush_ms: int = 20
    ca_bundle: str = SYSTEM_CA_BUNDLE
    extra_runtime: dict[str, Any] = field(default_factory=dict)


def render_bootstrap(config: RouterConfig, options: RenderOptions) -> dict[str, Any]:
    bootstrap: dict[str, Any] = {
        "node": {"id": "llm-extproc", "cluster": "llm-extproc"},
        "admin": {"address": _socket(options.admin_address, options.admin_port)},
        "layered_runtime": {"layers": [{"name": "static", "static_layer": _runtime(options)}]},
        "static_resources": {
            "listeners": [listener(config, options)],
            "clusters": processor_clusters(options),
        },
    }
    if options.dynamic_clusters:
        # The processor serves the deployment clusters (xds.py), so a reload needs no Envoy restart.
        bootstrap["dynamic_resources"] = {
            "cds_config": {
                "resource_api_version": "V3",
                "api_config_source": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": PROCESSOR_CLUSTER}}],
                    "set_node_on_first_message_only": True,
                },
            }
        }
    else:
        bootstrap["static_resources"]["clusters"] += upstream_clusters(config, options)
    return bootstrap


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases: every piece must stay copyable into another Envoy config."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=120)


def _runtime(options: RenderOptions) -> dict[str, Any]:
    # Without graceful close Envoy resets every ext_proc stream at request end; grpc.aio then leaks memory
    # per request (measured: 42 -> 99 MiB over 506k requests). With it: flat RSS, same throughput.
    return {"envoy.reloadable_features.ext_proc_graceful_grpc_close": True, **options.extra_runtime}


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def listener(config: RouterConfig, options: RenderOptions) -> dict[str, Any]:
    return {
        "name": "llm_listener",
        "address": _socket(options.listen_address, options.listen_port),
        # The whole body is buffered for ext_proc and for retries: this is the request size limit (413 above).
        "per_connection_buffer_limit_bytes": config.max_request_bytes,
        "filter_chains": [{"filters": [http_connection_manager(config, options)]}],
    }


def http_connection_manager(config: RouterConfig, options: RenderOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": "llm",
            "codec_type": "AUTO",
            "local_reply_config": local_reply_config(),
            "route_config": route_config(config),
            "http_filters": [ext_proc_filter(options), lua_filter(), router_filter(options)],
            "access_log": [request_access_log(options)],
        },
    }


def lua_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": ROUTER_LUA},
        },
    }


def request_access_log(options: RenderOptions) -> dict[str, Any]:
    """One entry per finished request, streamed in batches to the processor (see accounting.py).

    Every request, not only routed ones: a POST whose client left while the processor decided has no
    routing metadata, and its entry is what releases that reservation."""
    return _processor_access_log(REQUEST_LOG_NAME, options)


def router_filter(options: RenderOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "upstream_log": [attempt_access_log(options)],
        },
    }


def attempt_access_log(options: RenderOptions) -> dict[str, Any]:
    """One entry per upstream attempt (a failover makes several per request): which deployment answered
    what, with its Retry-After, so the processor can start cooldowns on every replica."""

    def host_tag(tag: str, field: str) -> dict[str, Any]:
        return {
            "tag": tag,
            "metadata": {"kind": {"host": {}}, "metadata_key": {"key": ENDPOINT_NAMESPACE, "path": [{"key": field}]}},
        }

    log = _processor_access_log(
        ATTEMPT_LOG_NAME, options, custom_tags=[host_tag("deployment_id", "id"), host_tag("model_group", "model_group")]
    )
    # Only failed attempts matter for cooldowns: a successful one costs nothing to log.
    log["filter"] = {
        "or_filter": {
            "filters": [
                {"status_code_filter": {"comparison": {"op": "GE", "value": _runtime_uint(400)}}},
                {"response_flag_filter": {}},  # no response at all: reset, refused, timeout
            ]
        }
    }
    return log


def _processor_access_log(log_name: str, options: RenderOptions, **common: Any) -> dict[str, Any]:
    """A gRPC access log streamed to the processor in small batches, sent often, so in-flight counts, token
    windows and cooldowns stay current."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": log_name,
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": ext_proc_cluster_name(options)}},
                "buffer_flush_interval": f"{options.access_log_flush_ms / 1000:.3f}s",
                "buffer_size_bytes": 16384,
                **common,
            },
            "additional_response_headers_to_log": ["retry-after"],
        },
    }


# One message per POST: the body, with the headers routing needs as request attributes; responses pass by.
EXT_PROC_MODE = {
    "request_header_mode": "SKIP",
    "request_body_mode": "BUFFERED",
    "request_trailer_mode": "SKIP",
    "response_header_mode": "SKIP",
    "response_body_mode": "NONE",
    "response_trailer_mode": "SKIP",
}


def ext_proc_filter(options: RenderOptions) -> dict[str, Any]:
    return {
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": ext_proc_cluster_name(options)}},
            "failure_mode_allow": False,  # failing open would skip routing and send requests nowhere useful
            "processing_mode": EXT_PROC_MODE,
            # 200 ms (the default) is too tight for a Python processor on a busy 2-core machine.
            "message_timeout": f"{options.message_timeout_s}s",
            "max_message_timeout": "10s",
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE, KEYS_NAMESPACE]}},
            "status_on_error": {"code": "ServiceUnavailable"},
            "request_attributes": list(REQUEST_ATTRIBUTES),
        },
    }


def route_config(config: RouterConfig) -> dict[str, Any]:
    return {
        "name": "llm_routes",
        "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": llm_routes(config, EXT_PROC_FILTER)}],
    }


def llm_routes(config: RouterConfig, ext_proc_name: str) -> list[dict[str, Any]]:
    return [llm_route(config), control_route(ext_proc_name)]


def control_route(ext_proc_name: str) -> dict[str, Any]:
    """Every method but POST: health, /v1/models and the errors for anything else. The processor answers
    all of these from the headers, so here ext_proc sends headers and no body."""
    overrides = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": {**EXT_PROC_MODE, "request_header_mode": "SEND", "request_body_mode": "NONE"}},
    }
    return {
        "name": CONTROL_ROUTE_NAME,
        "match": {"prefix": "/"},
        # Never reached: the processor replies to every such request (or Envoy's 503 when it is down).
        "direct_response": {"status": 404},
        "typed_per_filter_config": {ext_proc_name: overrides},
    }


def llm_route(config: RouterConfig) -> dict[str, Any]:
    return {
        "name": LLM_ROUTE_NAME,
        # Inference calls. Other methods take the control route (ext_proc is configured differently there).
        "match": {"prefix": "/", "headers": [{"name": ":method", "string_match": {"exact": "POST"}}]},
        "route": {
            # Chosen per request by the processor; a client-sent value is overwritten or the request refused.
            "cluster_header": CLUSTER_HEADER,
            "timeout": _duration(config.timeout),
            # Streams get no total deadline from the processor; this bounds the silence between chunks.
            "idle_timeout": _duration(max([config.timeout, *(d.timeout or 0 for d in config.deployments)])),
            "auto_host_rewrite": True,
            "retry_policy": {
                "retry_on": "reset,connect-failure,refused-stream,retriable-status-codes",
                "retriable_status_codes": RETRIABLE_STATUS_CODES,
                "num_retries": config.num_retries,
                # Each retry moves to the next priority: the next deployment of the group (LiteLLM re-picks a
                # deployment on every try), starting over when all were tried.
                "retry_priority": {
                    "name": "envoy.retry_priorities.previous_priorities",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3"
                        ".PreviousPrioritiesConfig",
                        "update_frequency": 1,
                    },
                },
                # Another deployment is tried at once (LiteLLM sleeps 0 s when the group has others).
                "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
            },
        },
        # Our routing header has done its job once the route is chosen, and the client's credentials never
        # reach a deployment (each attempt's api-key is set by the cluster's upstream filters).
        "request_headers_to_remove": [CLUSTER_HEADER, "authorization", "api-key"],
        "response_headers_to_add": [
            {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for name, value in response_headers().items()
        ],
    }


def local_reply_config() -> dict[str, Any]:
    """Envoy's own error replies (413, 503, 504, ...) as OpenAI-style JSON.

    The processor's immediate responses are already JSON; they carry details starting with
    PROCESSOR_REPLY_DETAILS_PREFIX and are left alone, as is the Lua filter's one reply (DECISION_LUA).
    """
    not_from_processor = {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": f"!response.code_details.startsWith('{PROCESSOR_REPLY_DETAILS_PREFIX}')"
                f" && response.code_details != '{LUA_REPLY_DETAILS}'",
            },
        }
    }
    mappers = []
    for status, error_type, code in (
        (413, "invalid_request_error", "request_too_large"),
        (408, "timeout", "timeout"),
        (504, "timeout", "timeout"),
        (503, "service_unavailable", "service_unavailable"),
        (404, "invalid_request_error", "not_found"),
    ):
        mappers.append(
            {
                "filter": {
                    "and_filter": {
                        "filters": [
                            not_from_processor,
                            {"status_code_filter": {"comparison": {"op": "EQ", "value": _runtime_uint(status)}}},
                        ]
                    }
                },
                "body_format_override": _json_error(error_type, code),
            }
        )
    mappers.append({"filter": not_from_processor, "body_format_override": _json_error("api_error", None)})
    return {"mappers": mappers}


def _runtime_uint(value: int) -> dict[str, Any]:
    return {"default_value": value, "runtime_key": f"llm.local_reply.status_{value}"}


def _json_error(error_type: str, code: str | None) -> dict[str, Any]:
    return {
        "json_format": {
            "error": {
                "message": "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)",
                "type": error_type,
                "code": code if code is not None else "%RESPONSE_CODE%",
            }
        },
        "content_type": "application/json",
    }


def processor_clusters(options: RenderOptions) -> list[dict[str, Any]]:
    if options.processor_sockets:
        addresses = [{"pipe": {"path": path}} for path in options.processor_sockets]
    else:
        addresses = [_socket(host, port) for host, port in options.processors]
    clusters = [_processor_cluster(PROCESSOR_CLUSTER, addresses, options)]
    if lean := ext_proc_addresses(options):
        clusters.append(_processor_cluster(EXT_PROC_CLUSTER, lean, options))
    return clusters


def ext_proc_addresses(options: RenderOptions) -> list[dict[str, Any]]:
    """The lean ext_proc listeners' addresses; empty when ext_proc goes to grpc.aio."""
    if options.processor_sockets:
        return [{"pipe": {"path": path}} for path in options.ext_proc_sockets]
    lean = options.ext_proc_processors
    if lean is None:
        lean = tuple((host, port + 1) for host, port in options.processors)
    return [_socket(host, port) for host, port in lean]


def ext_proc_cluster_name(options: RenderOptions) -> str:
    return EXT_PROC_CLUSTER if ext_proc_addresses(options) else PROCESSOR_CLUSTER


def _processor_cluster(name: str, addresses: list[dict[str, Any]], options: RenderOptions) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STRICT_DNS" if options.processor_dns and not options.processor_sockets else "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": _protocol_options({"http2_protocol_options": {}}),
        # Each HTTP request holds one ext_proc stream; the default limit of 1024 would refuse load.
        "circuit_breakers": {"thresholds": [PROCESSOR_CIRCUIT_BREAKERS]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}} for address in addresses]}],
        },
    }


def upstream_clusters(config: RouterConfig, options: RenderOptions) -> list[dict[str, Any]]:
    return [
        failover_cluster(dep, config.groups[dep.model_name], options) for dep in config.deployments
    ]


def failover_cluster(primary: Deployment, group: tuple[Deployment, ...], options: RenderOptions) -> dict[str, Any]:
    """The cluster the processor picks for ``primary``: it at priority 0, the group's other deployments at
    priorities 1, 2, ... in config order, so Envoy's retries (previous_priorities) fail over inside the
    same client request. Upstream filters rewrite path, api-key and Host for whichever endpoint each
    attempt lands on."""
    ordered = [primary, *(dep for dep in group if dep is not primary)]
    cluster: dict[str, Any] = {
        "name": primary.cluster,
        "type": "STATIC" if all(dep.host_is_ip for dep in ordered) else "STRICT_DNS",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [UPSTREAM_CIRCUIT_BREAKERS]},
        "typed_extension_protocol_options": _protocol_options(
            {"http_protocol_options": {}}, http_filters=attempt_filters()
        ),
        "load_assignment": {
            "cluster_name": primary.cluster,
            "endpoints": [
                {"priority": priority, "lb_endpoints": [_endpoint(dep)]} for priority, dep in enumerate(ordered)
            ],
        },
    }
    if not all(dep.host_is_ip for dep in ordered):
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if any(dep.tls for dep in ordered):
        cluster["transport_socket_matches"] = [
            {"name": "tls", "match": {"tls": True}, "transport_socket": _upstream_tls(options)}
        ]
    return cluster


def _endpoint(dep: Deployment) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        ENDPOINT_NAMESPACE: {
            "id": dep.id,
            "model_group": dep.model_name,
            "deployment": dep.deployment,
            "api_base": dep.api_base,
            "prefix": f"{dep.base_path}/openai/deployments/{dep.deployment}/",
            "query": f"?api-version={dep.api_version}",
            "key": f"key_{dep.index}",
        }
    }
    if dep.tls:
        metadata["envoy.transport_socket_match"] = {"tls": True}
    return {
        # hostname feeds auto_host_rewrite (Azure routes on Host) and, for TLS, SNI and SAN checks.
        "endpoint": {"address": _socket(dep.host, dep.port), "hostname": dep.host if dep.tls else dep.authority},
        "metadata": {"filter_metadata": metadata},
    }


def _upstream_tls(options: RenderOptions) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            # One cluster reaches several Azure resources: SNI and the certificate check follow the endpoint.
            "auto_host_sni": True,
            "auto_sni_san_validation": True,
            "common_tls_context": {"validation_context": {"trusted_ca": {"filename": options.ca_bundle}}},
        },
    }


# Runs once per attempt, after Envoy picked the endpoint: the attempt's path and api-key come from that
# endpoint's metadata (copied into helper headers by header_mutation) and the request's key slots, which
# the processor sends as dynamic metadata, so no key is ever written into Envoy's configuration.
ATTEMPT_LUA = """
function envoy_on_request(handle)
  local headers = handle:headers()
  local prefix = headers:get("x-llm-attempt-prefix")
  local routed = handle:streamInfo():dynamicMetadata():get("__ROUTED_NS__")
  if prefix ~= nil and prefix ~= "" and routed ~= nil then
    headers:replace(":path", prefix .. routed["operation"] .. headers:get("x-llm-attempt-query"))
    local keys = handle:streamInfo():dynamicMetadata():get("__KEYS_NS__")
    local key = keys and keys[headers:get("x-llm-attempt-key")]
    if key ~= nil then headers:replace("api-key", key) end
  end
  headers:remove("x-llm-attempt-prefix")
  headers:remove("x-llm-attempt-query")
  headers:remove("x-llm-attempt-key")
end
""".replace("__ROUTED_NS__", METADATA_NAMESPACE).replace("__KEYS_NS__", KEYS_NAMESPACE)


def attempt_filters() -> list[dict[str, Any]]:
    def copy(header: str, field: str) -> dict[str, Any]:
        value = f"%UPSTREAM_METADATA({ENDPOINT_NAMESPACE}:{field})%"
        return {"append": {"header": {"key": header, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}

    return [
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                "mutations": {
                    "request_mutations": [
                        copy("x-llm-attempt-prefix", "prefix"),
                        copy("x-llm-attempt-query", "query"),
                        copy("x-llm-attempt-key", "key"),
                    ]
                },
            },
        },
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": ATTEMPT_LUA},
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            },
        },
    ]


def _protocol_options(explicit: dict[str, Any], http_filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": explicit,
    }
    if http_filters:
        options["http_filters"] = http_filters
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


# ---------------------------------------------------------------------------------------------------------
# Targets other than the local stack: docker compose (and Kubernetes, which reuses it) and the pieces an
# existing Envoy needs (`render-envoy --target snippet`).

# The compose service name and the port `serve` listens on (its lean ext_proc listener: the next port).
COMPOSE_PROCESSOR = ("processor", 50051)
# In a shared connection manager the LLM pieces act on the LLM routes only: its filters are disabled by default
# and enabled by the routes, and its logs and error bodies are filtered on the route names.
SNIPPET_EXT_PROC_FILTER = "llm.ext_proc"
SNIPPET_LUA_FILTER = "llm.lua"
SNIPPET_LUA_SOURCE = "llm_lua"  # the Lua source the LLM route names
ON_LLM_ROUTE = f"xds.route_name == '{LLM_ROUTE_NAME}'"
ON_LLM_ROUTES = f"xds.route_name in ['{LLM_ROUTE_NAME}', '{CONTROL_ROUTE_NAME}']"
SNIPPET_KEYS = (
    "http_filters",
    "router_upstream_log",
    "access_log",
    "routes",
    "clusters",
    "runtime",
    "listener_buffer_limit_bytes",
    "local_reply_config",
)


def compose_options(
    listen_port: int = 10000,
    admin_port: int = 9901,
    processors: tuple[tuple[str, int], ...] = (COMPOSE_PROCESSOR,),
    listen_address: str = "0.0.0.0",
) -> RenderOptions:
    """A containerised Envoy: the listener on every interface (the container's port is what gets published),
    the admin on loopback only, processors named by DNS (a compose service, a Kubernetes headless Service)."""
    return RenderOptions(
        listen_address=listen_address,
        listen_port=listen_port,
        admin_address="127.0.0.1",
        admin_port=admin_port,
        processors=processors,
        processor_dns=needs_dns(processors),
    )


def needs_dns(processors: tuple[tuple[str, int], ...]) -> bool:
    """STRICT_DNS when any processor is named by a hostname (STATIC clusters take IP literals only)."""
    import ipaddress

    for host, _port in processors:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True
    return False


def _cel_filter(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _on_llm_route(access_log: dict[str, Any]) -> dict[str, Any]:
    return {**access_log, "filter": _cel_filter(ON_LLM_ROUTE)}


def snippet_http_filters(options: RenderOptions) -> list[dict[str, Any]]:
    """ext_proc and the Lua filter under names of their own, disabled unless a route enables them, so
    other routes never reach the processor and an existing ext_proc or Lua filter is not confused with them."""
    usage = {
        "name": SNIPPET_LUA_FILTER,
        "disabled": True,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "source_codes": {SNIPPET_LUA_SOURCE: {"inline_string": ROUTER_LUA}},
        },
    }
    ext_proc = {
        "name": SNIPPET_EXT_PROC_FILTER,
        "disabled": True,
        "typed_config": ext_proc_filter(options)["typed_config"],
    }
    return [ext_proc, usage]


def snippet_routes(config: RouterConfig) -> list[dict[str, Any]]:
    """The LLM routes, each enabling the snippet's filters it needs for itself."""

    def enable(per_route: dict[str, Any]) -> dict[str, Any]:
        return {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": per_route}

    inference, control = llm_routes(config, SNIPPET_EXT_PROC_FILTER)
    # the snippet's logs and local replies are filtered on these names
    assert (inference["name"], control["name"]) == (LLM_ROUTE_NAME, CONTROL_ROUTE_NAME)
    inference["typed_per_filter_config"] = {
        SNIPPET_EXT_PROC_FILTER: enable(
            {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "overrides": {}}
        ),
        SNIPPET_LUA_FILTER: enable(
            {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute",
             "name": SNIPPET_LUA_SOURCE}
        ),
    }
    control["typed_per_filter_config"] = {
        name: enable(per_route) for name, per_route in control["typed_per_filter_config"].items()
    }
    return [inference, control]


def snippet_local_reply_config() -> dict[str, Any]:
    """local_reply_config applies to every route of a connection manager (a direct_response is a local reply
    too): each mapper is narrowed to the LLM routes, so other routes keep their own bodies."""
    mappers = []
    for mapper in local_reply_config()["mappers"]:
        narrowed = {"and_filter": {"filters": [_cel_filter(ON_LLM_ROUTES), mapper["filter"]]}}
        mappers.append({**mapper, "filter": narrowed})
    return {"mappers": mappers}


def render_snippet(config: RouterConfig, options: RenderOptions) -> dict[str, Any]:
    """What an existing Envoy needs, by where it goes (docs/deploy.md shows a merged bootstrap)."""
    snippet = {
        "http_filters": snippet_http_filters(options),
        "router_upstream_log": [_on_llm_route(attempt_access_log(options))],
        "access_log": [_on_llm_route(request_access_log(options))],
        "routes": snippet_routes(config),
        "clusters": [*processor_clusters(options), *upstream_clusters(config, options)],
        "runtime": _runtime(options),
        "listener_buffer_limit_bytes": config.max_request_bytes,
        "local_reply_config": snippet_local_reply_config(),
    }
    assert tuple(snippet) == SNIPPET_KEYS
    return snippet


SNIPPET_HEADER = """\
# Envoy pieces for llm-extproc, to merge into an existing Envoy (see docs/deploy.md):
#   http_filters                 -> the HTTP connection manager's http_filters, before the router (both are
#                                   disabled by default; the LLM routes enable them)
#   router_upstream_log          -> append to the router filter's upstream_log
#   access_log                   -> append to the HTTP connection manager's access_log
#   routes                       -> a virtual host's routes, after your own, in this order (together they match
#                                   every path; keep their names)
#   clusters                     -> static_resources.clusters (the processors' two addresses, one cluster per
#                                   deployment)
#   runtime                      -> a static layer of layered_runtime
#   listener_buffer_limit_bytes  -> the listener's per_connection_buffer_limit_bytes (at least this)
#   local_reply_config           -> the HTTP connection manager's local_reply_config (narrowed to the LLM routes)
# Cluster names come from deployment ids: run the processor with the same config file.
"""


def render_snippet_yaml(config: RouterConfig, options: RenderOptions) -> str:
    return SNIPPET_HEADER + render_yaml(render_snippet(config, options))
