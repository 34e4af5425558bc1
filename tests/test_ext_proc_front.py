"""The lean ext_proc listener (h2front.py) against real gRPC: grpcio's client, and raw HTTP/2 frames for the
edges a client library never produces. Envoy's own ext_proc client drives it in every end-to-end test."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc import h2front, routing
from extproc.h2front import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    OK_TRAILERS,
    PADDED,
    PING,
    PREFACE,
    PROTOCOL_ERROR,
    RESPONSE_HEADERS,
    RST_STREAM,
    SETTINGS,
    frame,
)
from extproc.protocol import EXT_PROC_ATTRIBUTES
from extproc.server import ProcessorServer

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/a, api_base: "https://a.openai.azure.com", api_key: key-a}
  - model_name: gpt-4o
    litellm_params: {model: azure/b, api_base: "https://b.openai.azure.com", api_key: key-b}
general_settings:
  max_request_size_mb: 1
"""
LIMIT = 1024 * 1024 + 1024 * 1024  # max_request_size_mb plus the gRPC headroom (server.GRPC_HEADROOM_BYTES)


def chat_body(content: str = "hello") -> bytes:
    return orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]})


def body_message(body: bytes | None = None, request_id: str = "req-1") -> pb.ProcessingRequest:
    """What Envoy sends for a POST: the buffered body, the headers routing needs as attributes."""
    return pb.ProcessingRequest(
        request_body=pb.HttpBody(body=chat_body() if body is None else body, end_of_stream=True),
        attributes={EXT_PROC_ATTRIBUTES: struct_pb2.Struct(fields={
            "request.path": struct_pb2.Value(string_value="/v1/chat/completions"),
            "request.id": struct_pb2.Value(string_value=request_id),
        })},
    )


def headers_message(method: str, path: str, end_of_stream: bool) -> pb.ProcessingRequest:
    headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
               ((":method", method), (":path", path), ("x-request-id", "req-2"))]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=headers), end_of_stream=end_of_stream
    ))


def routed_cluster(response: pb.ProcessingResponse) -> str:
    assert response.HasField("request_body"), response
    return response.dynamic_metadata.fields["llm"].struct_value.fields["cluster"].string_value


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ProcessorServer]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    server = ProcessorServer(config, port=0, ext_proc_port=0)
    await server.start()
    yield server
    # Nothing is left behind: every stream ended, whichever way it ended.
    assert all(not connection.streams for connection in server.front.connections)
    await server.stop(grace=0.5)


async def call(
    port: int, *messages: pb.ProcessingRequest | bytes
) -> tuple[list[pb.ProcessingResponse], grpc.StatusCode]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(
            PROCESS,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        stream = method()
        responses: list[pb.ProcessingResponse] = []
        try:
            for message in messages:
                await stream.write(message)
            await stream.done_writing()
            responses = [response async for response in stream]
        except grpc.aio.AioRpcError:
            pass  # the status is the test's business
        return responses, await stream.code()


async def test_both_fronts_route_a_post_the_same_way(server: ProcessorServer) -> None:
    assert server.ext_proc_port is not None and server.ext_proc_port != server.port
    for port in (server.ext_proc_port, server.port):
        responses, code = await call(port, body_message())
        assert code == grpc.StatusCode.OK
        assert len(responses) == 1
        assert routed_cluster(responses[0]) in {d.cluster for d in server.config.deployments}
        keys = responses[0].dynamic_metadata.fields["llm_keys"].struct_value.fields
        assert {value.string_value for value in keys.values()} <= {"key-a", "key-b"}


async def test_headers_then_body_on_one_stream(server: ProcessorServer) -> None:
    assert server.ext_proc_port is not None
    responses, code = await call(
        server.ext_proc_port, headers_message("POST", "/v1/chat/completions", False), body_message()
    )
    assert code == grpc.StatusCode.OK
    assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert routed_cluster(responses[1])


async def test_the_processor_answers_other_methods_itself(server: ProcessorServer) -> None:
    assert server.ext_proc_port is not None
    responses, code = await call(server.ext_proc_port, headers_message("GET", "/v1/models", True))
    assert code == grpc.StatusCode.OK
    (reply,) = responses
    assert reply.immediate_response.status.code == 200
    assert [m["id"] for m in orjson.loads(reply.immediate_response.body)["data"]] == ["gpt-4o"]


async def test_a_large_prompt_arrives_whole(server: ProcessorServer) -> None:
    assert server.ext_proc_port is not None
    body = chat_body("x" * 900_000)  # many HTTP/2 frames from grpcio; one gRPC message
    responses, code = await call(server.ext_proc_port, body_message(body))
    assert code == grpc.StatusCode.OK
    assert routed_cluster(responses[0])


async def test_many_streams_at_once_on_one_connection(server: ProcessorServer) -> None:
    port = server.ext_proc_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(
            PROCESS, request_serializer=pb.ProcessingRequest.SerializeToString,
            response_deserializer=pb.ProcessingResponse.FromString,
        )

        async def one() -> str:
            stream = method()
            await stream.write(body_message())
            response = await stream.read()
            assert isinstance(response, pb.ProcessingResponse)
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
            return routed_cluster(response)

        clusters = await asyncio.gather(*(one() for _ in range(300)))
    assert len(set(clusters)) == 2  # both deployments, from simple-shuffle over 300 draws


async def test_bad_messages_end_the_call_with_a_grpc_status(server: ProcessorServer) -> None:
    port = server.ext_proc_port
    assert port is not None
    _, code = await call(port, b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    _, code = await call(port, body_message(chat_body("x" * (LIMIT + 1000))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    responses, code = await call(port, body_message())  # the listener serves on
    assert code == grpc.StatusCode.OK and routed_cluster(responses[0])


# -- raw frames ------------------------------------------------------------------------------------------


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def frame(self) -> tuple[int, int, int, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(9), 5)
        size = int.from_bytes(header[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(size), 5)
        return header[3], header[4], int.from_bytes(header[5:], "big") & 0x7FFFFFFF, payload

    async def until(self, kind: int, stream_id: int) -> list[tuple[int, int, int, bytes]]:
        """Frames up to and including the first of ``kind`` on ``stream_id``."""
        seen = []
        while True:
            seen.append(await self.frame())
            if seen[-1][0] == kind and seen[-1][2] == stream_id:
                return seen

    def close(self) -> None:
        self.writer.close()


def grpc_message(message: pb.ProcessingRequest) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


async def test_raw_frames_continuation_padding_ping_and_reset(server: ProcessorServer) -> None:
    assert server.ext_proc_port is not None
    client = await RawClient.connect(server.ext_proc_port)
    try:
        ping = os.urandom(8)
        # A header block split over CONTINUATION (its content is never decoded), then a padded DATA frame
        # with the whole message and END_STREAM.
        padding = 5
        data = bytes((padding,)) + grpc_message(body_message()) + b"\x00" * padding
        client.send(
            PREFACE, frame(SETTINGS, 0, 0), frame(PING, 0, 0, ping),
            frame(HEADERS, 0, 1, b"\x83\x86"), frame(CONTINUATION, END_HEADERS, 1, b"\x84"),
            frame(DATA, PADDED | END_STREAM, 1, data),
        )
        frames = await client.until(DATA, 1)
        kinds = [(kind, flags) for kind, flags, _, _ in frames]
        assert (SETTINGS, 0) in kinds and (SETTINGS, ACK) in kinds  # the server's settings, and our ack
        assert (PING, ACK, 0, ping) in frames
        assert (HEADERS, END_HEADERS, 1, RESPONSE_HEADERS) in frames
        message = frames[-1][3]
        assert int.from_bytes(message[1:5], "big") == len(message) - 5
        assert routed_cluster(pb.ProcessingResponse.FromString(message[5:]))
        assert await client.frame() == (HEADERS, END_STREAM | END_HEADERS, 1, OK_TRAILERS)

        # A stream reset by the client before its message is forgotten; the connection serves the next one.
        client.send(frame(HEADERS, END_HEADERS, 3, b"\x83"), frame(RST_STREAM, 0, 3, (8).to_bytes(4, "big")))
        client.send(frame(HEADERS, END_HEADERS, 5, b"\x83"), frame(DATA, END_STREAM, 5, grpc_message(body_message())))
        frames = await client.until(HEADERS, 5)  # the response headers
        assert all(stream_id != 3 for _, _, stream_id, _ in frames)
        assert (await client.frame())[0] == DATA
        assert await client.frame() == (HEADERS, END_STREAM | END_HEADERS, 5, OK_TRAILERS)

        # Shutdown: GOAWAY naming the last stream seen.
        await server.front.stop(grace=0.1)
        kind, _, _, payload = await client.frame()
        assert (kind, payload) == (GOAWAY, (5).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    finally:
        client.close()


async def test_a_response_waits_for_flow_control_window(server: ProcessorServer) -> None:
    assert server.ext_proc_port is not None
    client = await RawClient.connect(server.ext_proc_port)
    try:
        settings = b"".join(key.to_bytes(2, "big") + value.to_bytes(4, "big") for key, value in (
            (h2front.SETTINGS_INITIAL_WINDOW_SIZE, 10), (h2front.SETTINGS_HEADER_TABLE_SIZE, 0)
        ))
        client.send(PREFACE, frame(SETTINGS, 0, 0, settings), frame(HEADERS, END_HEADERS, 1, b"\x83"),
                    frame(DATA, END_STREAM, 1, grpc_message(body_message())))
        *_, (_, _, _, block) = await client.until(HEADERS, 1)
        assert block == b"\x20" + RESPONSE_HEADERS  # the table size update our shrunken decoder expects
        kind, _, stream_id, first = await client.frame()
        assert (kind, stream_id, len(first)) == (DATA, 1, 10)  # all the stream's window allows
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.reader.readexactly(1), 0.3)
        client.send(frame(h2front.WINDOW_UPDATE, 0, 1, (100_000).to_bytes(4, "big")))
        kind, _, _, rest = await client.frame()
        assert kind == DATA
        message = first + rest
        assert int.from_bytes(message[1:5], "big") == len(message) - 5
        assert routed_cluster(pb.ProcessingResponse.FromString(message[5:]))
        assert await client.frame() == (HEADERS, END_STREAM | END_HEADERS, 1, OK_TRAILERS)
    finally:
        client.close()


async def test_a_compressed_message_gets_unimplemented(server: ProcessorServer) -> None:
    # grpcio's client leaves small messages uncompressed, so the flag is set by hand: we never advertise
    # grpc-accept-encoding, and Envoy's ext_proc client does not compress.
    assert server.ext_proc_port is not None
    client = await RawClient.connect(server.ext_proc_port)
    try:
        message = b"\x01" + grpc_message(body_message())[1:]
        client.send(PREFACE, frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS, 1, b"\x83"), frame(DATA, 0, 1, message))
        *_, (_, flags, _, block) = await client.until(HEADERS, 1)
        assert flags == END_STREAM | END_HEADERS  # trailers only
        assert block == RESPONSE_HEADERS + h2front.error_trailers(
            h2front.GRPC_UNIMPLEMENTED, "compressed messages are not accepted"
        )
    finally:
        client.close()


async def test_a_client_that_is_not_http2_is_refused(server: ProcessorServer) -> None:
    assert server.ext_proc_port is not None
    client = await RawClient.connect(server.ext_proc_port)
    try:
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        *_, (_, _, _, goaway) = await client.until(GOAWAY, 0)  # after our SETTINGS and WINDOW_UPDATE
        assert int.from_bytes(goaway[4:8], "big") == PROTOCOL_ERROR
        assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed
    finally:
        client.close()
    responses, code = await call(server.ext_proc_port, body_message())
    assert code == grpc.StatusCode.OK and routed_cluster(responses[0])


def test_hpack_integers() -> None:
    assert h2front.hpack_integer(10, 5) == b"\x0a"  # RFC 7541 C.1.1
    assert h2front.hpack_integer(1337, 5) == b"\x1f\x9a\x0a"  # C.1.2
    assert h2front.hpack_integer(42, 8) == b"\x2a"  # C.1.3
    assert h2front.hpack_integer(127, 7) == b"\x7f\x00"
    assert h2front.hpack_integer(0, 5, 0x20) == b"\x20"  # a dynamic table size update to 0


async def test_random_frames_never_break_the_listener(
    server: ProcessorServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Seeded fuzzing over real connections: any sequence of frames (wrong types, flags, stream ids, lengths,
    padding, garbage or half-valid messages) ends in a reply, an error status or a closed connection, never in
    an exception, and the listener serves a proper call afterwards."""
    import random

    assert server.ext_proc_port is not None
    rng = random.Random(20261125)
    valid = grpc_message(body_message())
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    for _ in range(150):
        frames = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.randint(0, 12)
            flags = rng.choice((0, END_STREAM, END_HEADERS, PADDED, END_STREAM | END_HEADERS, rng.randint(0, 255)))
            stream_id = rng.choice((0, 1, 1, 3, 5, 2))
            payload = rng.choice((
                b"", os.urandom(rng.randint(1, 48)), valid, valid[: rng.randint(1, len(valid))],
                b"\x00" + (5_000_000).to_bytes(4, "big"), bytes((rng.randint(0, 255),)) + valid,
            ))
            frames.append(frame(kind, flags, stream_id, payload))
        if rng.random() < 0.1:  # a frame header announcing more than the largest frame
            frames.append(b"\xff\xff\xff\x00\x00\x00\x00\x00\x01")
        client = await RawClient.connect(server.ext_proc_port)
        try:
            client.send(PREFACE, *frames)
            with contextlib.suppress(TimeoutError, ConnectionError):
                while await asyncio.wait_for(client.reader.read(65536), 0.05):
                    pass
        finally:
            client.close()
    await asyncio.sleep(0.1)  # answers still running finish
    assert not unhandled
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    responses, code = await call(server.ext_proc_port, body_message())
    assert code == grpc.StatusCode.OK and routed_cluster(responses[0])


async def test_a_decision_that_waits_for_redis_is_answered_or_cancelled_from_a_task(
    tmp_path: Path, redis_url: str
) -> None:
    """A deployment with little room is checked in Redis on every decision, so the answer cannot be written
    in the frame's callback: it goes on in a task, which a reset cancels (and the lease is given back)."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("api_key: key-a}", "api_key: key-a, rpm: 10}").replace(
        "api_key: key-b}", "api_key: key-b, rpm: 10}") + f"router_settings:\n  redis_url: {redis_url}\n")
    server = ProcessorServer(config, port=0, ext_proc_port=0)
    await server.start()
    try:
        assert server.ext_proc_port is not None
        client = await RawClient.connect(server.ext_proc_port)
        try:
            client.send(PREFACE, frame(SETTINGS, 0, 0))
            warm, reset, answered = (grpc_message(body_message(request_id=name)) for name in ("warm", "reset", "req"))
            # Stream 1 warms up the Redis connection. Stream 3's decision is sent to Redis at once and then reset
            # while it waits for the reply; stream 5 is answered when Redis replies.
            client.send(frame(HEADERS, END_HEADERS, 1, b"\x83"), frame(DATA, END_STREAM, 1, warm))
            await client.until(HEADERS, 1)
            await client.until(HEADERS, 1)
            client.send(frame(HEADERS, END_HEADERS, 3, b"\x83"), frame(DATA, END_STREAM, 3, reset),
                        frame(RST_STREAM, 0, 3, (8).to_bytes(4, "big")))
            client.send(frame(HEADERS, END_HEADERS, 5, b"\x83"), frame(DATA, END_STREAM, 5, answered))
            frames = await client.until(DATA, 5)
            assert all(stream_id in (0, 5) for _, _, stream_id, _ in frames)
            assert routed_cluster(pb.ProcessingResponse.FromString(frames[-1][3][5:]))
            assert await client.frame() == (HEADERS, END_STREAM | END_HEADERS, 5, OK_TRAILERS)
        finally:
            client.close()
        router = server.processor.router
        group = router.groups()["gpt-4o"]
        states = await router.store.states(group.name, group.candidates)
        assert sum(state.in_flight for state in states) == 3  # the reset decision had reached Redis
        await asyncio.sleep(routing.ORPHAN_RELEASE_DELAY_S + 0.5)
        states = await router.store.states(group.name, group.candidates)
        assert sum(state.in_flight for state in states) == 2  # the reset one was given back
    finally:
        await server.stop(grace=0.5)


def access_log_message(request_id: str, routed: pb.ProcessingResponse, first: bool) -> als_pb2.StreamAccessLogsMessage:
    """What Envoy's access logger sends when a routed request ends: the routing metadata it was given back."""
    message = als_pb2.StreamAccessLogsMessage()
    if first:
        message.identifier.log_name = "llm_requests"
    entry = message.http_logs.log_entry.add()
    entry.common_properties.metadata.filter_metadata["llm"].CopyFrom(routed.dynamic_metadata.fields["llm"].struct_value)
    entry.request.request_id = request_id
    entry.response.response_code.value = 200
    return message


async def in_flight(server: ProcessorServer) -> int:
    group = server.processor.router.groups()["gpt-4o"]
    return sum(s.in_flight for s in await server.store.states(group.name, group.candidates))


async def test_access_logs_reach_the_lean_listener_too(server: ProcessorServer) -> None:
    """Envoy's access-log stream goes to the same listener as ext_proc (told apart by its first message):
    the request's lease ends there, and the client-streaming call ends with its (empty) response."""
    assert server.ext_proc_port is not None
    responses, code = await call(server.ext_proc_port, body_message())
    assert code == grpc.StatusCode.OK and await in_flight(server) == 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ext_proc_port}") as channel:
        method = channel.stream_unary(
            "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
            request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )
        reply = await method(iter([access_log_message("req-1", responses[0], first=True),
                                   access_log_message("not-routed-here", responses[0], first=False)]))
    assert reply == als_pb2.StreamAccessLogsResponse()
    assert await in_flight(server) == 0
    assert server.access_log.settled == 2


async def test_a_long_stream_gets_its_window_topped_up(server: ProcessorServer) -> None:
    """An access-log stream lives as long as Envoy's connection: past each MiB received, the stream's window
    is given back, so it never runs dry."""
    assert server.ext_proc_port is not None
    client = await RawClient.connect(server.ext_proc_port)
    try:
        message = als_pb2.StreamAccessLogsMessage()
        message.identifier.log_name = "llm_requests"
        for i in range(1200):  # ~1.2 MiB of entries that were not routed by us (nothing to settle)
            message.http_logs.log_entry.add().request.path = f"/{i}/" + "x" * 1000
        data = grpc_message(message)
        client.send(PREFACE, frame(SETTINGS, 0, 0), frame(HEADERS, END_HEADERS, 1, b"\x83"))
        client.send(*(frame(DATA, 0, 1, data[i : i + 16_384]) for i in range(0, len(data), 16_384)))
        frames = await client.until(h2front.WINDOW_UPDATE, 1)
        assert int.from_bytes(frames[-1][3], "big") >= h2front.STREAM_WINDOW_REFILL
        client.send(frame(DATA, END_STREAM, 1))
        frames = await client.until(HEADERS, 1)  # the response's headers, its empty message, then OK
        assert (await client.frame())[:3] == (DATA, 0, 1)
        assert await client.frame() == (HEADERS, END_STREAM | END_HEADERS, 1, OK_TRAILERS)
    finally:
        client.close()
