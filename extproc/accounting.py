"""Request outcomes from Envoy's access log, off the request path.

Envoy streams one entry per finished request (gRPC access log service, batched) carrying the dynamic
metadata the processor attached (request id, deployment, reserved tokens) and what the usage filter read
from the response. Every routed request is reported exactly once, however it ended (success, upstream
error, timeout, client disconnect), which is what ends its in-flight lease and settles its tokens.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from .cooldown import parse_retry_after
from .metrics import Metrics
from .protocol import PROCESSOR_REPLY_DETAILS_PREFIX
from .routing import METADATA_NAMESPACE, Attempt, Router
from .store import TIMEOUT_PENALTY_S, Outcome

log = logging.getLogger("extproc.accounting")

SERVICE_NAME = "envoy.service.accesslog.v3.AccessLogService"
USAGE_NAMESPACE = "llm_usage"  # written by the Lua usage filter (envoy_render.USAGE_LUA)
REQUEST_LOG_NAME = "llm_requests"
ATTEMPT_LOG_NAME = "llm_attempts"  # the router's upstream log: one entry per attempt


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def orphan_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> str | None:
    """The request id of a POST that Envoy ended without our decision (client gone during the decision);
    None for everything else (routed requests, our own replies, health checks, other routes)."""
    if METADATA_NAMESPACE in entry.common_properties.metadata.filter_metadata:
        return None
    if entry.request.request_method != base_pb2.POST or not entry.request.request_id:
        return None
    if entry.response.response_code_details.startswith(PROCESSOR_REPLY_DETAILS_PREFIX):
        return None  # we answered it ourselves: nothing was reserved
    return str(entry.request.request_id)


def outcome_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> Outcome | None:
    common = entry.common_properties
    filter_metadata = common.metadata.filter_metadata
    if METADATA_NAMESPACE not in filter_metadata:
        return None  # not routed by us (a local reply, or another route in a shared Envoy)
    routed = filter_metadata[METADATA_NAMESPACE].fields
    usage = filter_metadata[USAGE_NAMESPACE].fields if USAGE_NAMESPACE in filter_metadata else {}
    reserved = int(routed["tokens"].number_value)
    status = entry.response.response_code.value
    total: int | None = None
    completion = 0
    if "total_tokens" in usage:
        total = int(usage["total_tokens"].number_value)
        completion = int(usage["completion_tokens"].number_value) if "completion_tokens" in usage else 0
    elif "stream_events" in usage:
        # A stream without a usage chunk: each content event carries about one token.
        completion = int(usage["stream_events"].number_value)
        total = reserved + completion
    stream = routed["stream"].bool_value if "stream" in routed else False
    latency: float | None = None
    ttft: float | None = None
    flags = common.response_flags
    timed_out = status in (408, 504) or flags.upstream_request_timeout or flags.stream_idle_timeout
    if 200 <= status < 300:
        duration = _seconds(common.time_to_last_upstream_rx_byte) or _seconds(common.duration)
        latency = duration / completion if completion > 0 else duration
        if stream and common.HasField("time_to_first_upstream_rx_byte"):
            ttft = _seconds(common.time_to_first_upstream_rx_byte)
    elif timed_out:
        latency = TIMEOUT_PENALTY_S
        ttft = TIMEOUT_PENALTY_S if stream else None
    return Outcome(
        group=routed["model_group"].string_value,
        key=routed["model_id"].string_value,
        request_id=routed["request_id"].string_value,
        status=status,
        reserved_tokens=reserved,
        total_tokens=total,
        latency_s=latency,
        ttft_s=ttft,
    )


class LogStream:
    """One access-log stream's state: Envoy names the log (requests or attempts) in its first message only."""

    __slots__ = ("log_name",)

    def __init__(self) -> None:
        self.log_name = ""


class AccessLogReceiver:
    """The AccessLogService: settles each batch with one store call (one Redis pipeline). Served on the lean
    listener (h2front.py) for the rendered Envoy, and on grpc.aio for an Envoy pointed there."""

    # A client-streaming call ends with one response message: StreamAccessLogsResponse is empty.
    final_message: bytes | None = b""

    def __init__(self, router: Callable[[], Router], metrics: Metrics) -> None:
        self._router = router
        self._metrics = metrics
        self.settled = 0

    def open_exchange(self) -> LogStream:
        return LogStream()

    async def handle(self, stream: LogStream, data: bytes) -> tuple[bytes | None, bool]:
        """One serialized StreamAccessLogsMessage in (from h2front); nothing is sent back until the end."""
        await self.on_message(stream, als_pb2.StreamAccessLogsMessage.FromString(data))
        return None, False

    async def stream(
        self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        state = LogStream()
        async for message in requests:
            await self.on_message(state, message)
        return als_pb2.StreamAccessLogsResponse()

    async def on_message(self, stream: LogStream, message: als_pb2.StreamAccessLogsMessage) -> None:
        stream.log_name = message.identifier.log_name or stream.log_name
        entries = message.http_logs.log_entry
        if stream.log_name == ATTEMPT_LOG_NAME:
            attempts = [a for a in map(attempt_of, entries) if a is not None]
            if attempts:
                await self._record_attempts(attempts)
            return
        outcomes = [o for o in map(outcome_of, entries) if o is not None]
        router = self._router()
        if len(outcomes) < len(entries):
            orphans = [r for r in map(orphan_of, entries) if r is not None]
            if orphans:
                self._metrics.abandoned += len(orphans)
                router.release_orphans(orphans)
        if not outcomes:
            return
        self._metrics.record_outcomes(outcomes)
        try:
            await router.store.settle(outcomes)
            self.settled += len(outcomes)
        except Exception:  # a lost batch only delays lease expiry; never break the log stream
            log.exception("could not settle %d request outcomes", len(outcomes))

    async def _record_attempts(self, attempts: list[Attempt]) -> None:
        try:
            await self._router().record_attempts(attempts)
        except Exception:  # cooldowns are an optimisation; never break the log stream
            log.exception("could not record %d attempts", len(attempts))


def _upstream_failed(flags: Any) -> bool:
    return bool(
        flags.upstream_connection_failure or flags.upstream_remote_reset or flags.upstream_connection_termination
        or flags.upstream_request_timeout or flags.upstream_protocol_error or flags.stream_idle_timeout
        or flags.no_healthy_upstream or flags.upstream_overflow
    )


def attempt_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> Attempt | None:
    tags = entry.common_properties.custom_tags
    key = tags.get("deployment_id", "")
    if not key or key == "-":
        return None
    status = entry.response.response_code.value
    if status == 0 and not _upstream_failed(entry.common_properties.response_flags):
        return None  # no response and no upstream fault: the client left, not the deployment's failure
    retry_after = entry.response.response_headers.get("retry-after")
    return Attempt(
        group=tags.get("model_group", ""),
        key=key,
        status=status,
        retry_after_s=parse_retry_after(retry_after) if retry_after else None,
    )


def add_to_server(server: grpc.aio.Server, receiver: AccessLogReceiver) -> None:
    handler = grpc.stream_unary_rpc_method_handler(
        receiver.stream,
        request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
        response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"StreamAccessLogs": handler}),)
    )
