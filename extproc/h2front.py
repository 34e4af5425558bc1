"""ext_proc on a lean HTTP/2 listener of its own: the hot path without grpc.aio's per-stream machinery.

grpc.aio spends about 350 µs of CPU per ext_proc stream before any of our code runs (a do-nothing grpc.aio
server, ``python -m bench.processor``), more than routing itself, and on a busy machine that CPU is time to
first byte. Envoy's ext_proc client needs little of gRPC: one method, small messages, no compression, no TLS
on a loopback or pod-local hop. This listener speaks exactly that much HTTP/2 (RFC 9113) and gRPC framing,
in one ``asyncio.Protocol`` per connection, and hands each message to the same ``ExternalProcessor`` the
grpc.aio server uses. Envoy's access logs (one entry per request, batched) come here too: grpc.aio costs
~0.5 ms of CPU per access-log message on this machine, against ~4 µs to decode one. Cluster discovery (and
both services, for an Envoy pointed there) stays on grpc.aio at the processor's main address.

Header blocks are never decoded, so no HPACK state is needed. The two services are told apart by a
stream's first message: Envoy's access-log stream opens with the log's ``identifier`` (field 1), a field
no ext_proc ``ProcessingRequest`` has (its fields are 2-11). Our own header blocks are literals that never
enter the peer's dynamic table, which keeps them valid whatever that table holds.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import logging
import struct
import typing
from pathlib import Path

from google.protobuf.message import DecodeError

log = logging.getLogger("extproc.h2front")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x3, 0x4, 0x5
DEFAULT_HEADER_TABLE_SIZE = 4096
NO_ERROR, PROTOCOL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x0, 0x1, 0x6, 0x7
DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_MAX_FRAME = 16_384
# We take frames up to the protocol's largest, so a prompt of a few MB arrives in a frame or two.
OUR_MAX_FRAME = 2**24 - 1
# Our receive windows start at the largest allowed; the connection's is topped up once half is used, a
# stream's every MiB (an access-log stream lives as long as Envoy's connection and would run dry).
WINDOW_REFILL = MAX_WINDOW // 2
STREAM_WINDOW_REFILL = 1 << 20
_FIRST_FIELD_OF_ACCESS_LOGS = 0x0A  # StreamAccessLogsMessage.identifier: field 1, length-delimited
GRPC_OK, GRPC_INVALID_ARGUMENT, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 0, 3, 8, 12, 13

_FRAME_HEADER = struct.Struct(">BHBBI")  # 24-bit length as a high byte and a low 16 bits, type, flags, stream
_SETTING = struct.Struct(">HI")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _FRAME_HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def hpack_integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a first byte whose high bits are ``flags``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_length(size: int) -> bytes:
    """The length of a string sent without Huffman coding (a 7-bit prefix, H bit clear)."""
    return hpack_integer(size, 7)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, new name (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_length(len(name)) + name + _hpack_length(len(value)) + value


# ":status: 200" is static table entry 8 (one byte); content-type (entry 31) with a literal value.
RESPONSE_HEADERS = b"\x88" + hpack_integer(31, 4) + _hpack_length(16) + b"application/grpc"
OK_TRAILERS = _literal(b"grpc-status", b"0")


def error_trailers(code: int, message: str) -> bytes:
    # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses").
    encoded = "".join(
        chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}" for byte in message.encode()
    )
    return _literal(b"grpc-status", str(code).encode()) + _literal(b"grpc-message", encoded.encode())


class Service(typing.Protocol):
    """What a stream's messages go to: the ext_proc processor, or the access-log receiver."""

    final_message: bytes | None  # sent when the client ends its side, if not None (client-streaming calls)

    def open_exchange(self) -> typing.Any: ...

    async def handle(self, exchange: typing.Any, data: bytes) -> tuple[bytes | None, bool]:
        """One message in: the response to send (None: none) and whether the call ends with it."""
        ...


class _Stream:
    __slots__ = (
        "answered", "buffer", "exchange", "headers_sent", "id", "inbox", "received", "remote_closed",
        "send_window", "service", "task",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.service: Service | None = None  # known from the first message
        self.exchange: typing.Any = None
        self.received = 0  # DATA bytes since our last WINDOW_UPDATE for this stream
        self.buffer = bytearray()  # gRPC message bytes not yet complete
        self.inbox: collections.deque[bytes] = collections.deque()  # complete messages not yet answered
        self.task: asyncio.Task[None] | None = None
        self.remote_closed = False
        self.headers_sent = False
        self.answered = False  # the last response is out, or waiting for window: the trailers follow it
        self.send_window = send_window


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy. Frames are parsed in ``data_received``; each stream's messages are
    answered in order by one task, which exists only while the stream has messages to answer."""

    def __init__(self, front: ExtProcFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface_seen = False
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        self.headers_stream = 0  # a header block continues on this stream (CONTINUATION frames follow)
        self.headers_end_stream = False
        self.received_unacknowledged = 0
        self.send_window = DEFAULT_WINDOW  # what the peer still lets us send on the connection
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        # Responses waiting for flow-control window: (stream, remaining DATA payload, ends the stream).
        self.blocked: collections.deque[tuple[_Stream, bytes, bool]] = collections.deque()
        self.going_away = False
        # A dynamic table size update owed to the peer's decoder, sent at the start of our next header block.
        self.table_size_update = b""

    # -- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (not necessarily an asyncio.Transport subclass: uvloop's are not).
        self.transport = typing.cast(asyncio.Transport, transport)
        settings = b"".join(_SETTING.pack(key, value) for key, value in (
            (SETTINGS_MAX_CONCURRENT_STREAMS, 1 << 20),
            (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, OUR_MAX_FRAME),
        ))
        self.transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))
        )
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()  # Envoy is gone: a pending decision is abandoned (routing.py releases it)
        self.streams.clear()
        self.blocked.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        if not self.preface_seen:
            if len(buffer) < len(PREFACE):
                return
            if buffer[: len(PREFACE)] != PREFACE:
                self._abort(PROTOCOL_ERROR, "not an HTTP/2 client (a gRPC listener: Envoy's ext_proc only)")
                return
            offset = len(PREFACE)
            self.preface_seen = True
        available = len(buffer)
        while available - offset >= 9:
            high, low, kind, flags, stream_id = _FRAME_HEADER.unpack_from(buffer, offset)
            size = high << 16 | low
            if size > OUR_MAX_FRAME:
                self._abort(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                return
            end = offset + 9 + size
            if end > available:
                break
            payload = bytes(buffer[offset + 9 : end])
            offset = end
            if not self._on_frame(kind, flags, stream_id & 0x7FFFFFFF, payload):
                return
        del buffer[:offset]

    # -- frames in ---------------------------------------------------------------------------------------

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> bool:
        """Handles one frame; False when the connection was closed because of it."""
        if self.headers_stream and kind != CONTINUATION:
            self._abort(PROTOCOL_ERROR, "header block interrupted")
            return False
        if kind == DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id)
        elif kind == CONTINUATION:
            if stream_id != self.headers_stream:
                self._abort(PROTOCOL_ERROR, "CONTINUATION without a header block")
                return False
            if flags & END_HEADERS:
                self.headers_stream = 0
                stream = self.streams.get(stream_id)
                if self.headers_end_stream and stream is not None:
                    self._on_remote_close(stream)
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream_id == 0:
                self.send_window += increment
            elif (stream := self.streams.get(stream_id)) is not None:
                stream.send_window += increment
            self._flush_blocked()
        # PRIORITY, GOAWAY (Envoy closes the connection itself once its streams end) and unknown types: nothing
        return True

    def _on_headers(self, flags: int, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None and stream_id > self.last_stream_id:
            self.last_stream_id = stream_id
            if self.going_away:
                self._write(frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            else:
                stream = _Stream(stream_id, self.peer_initial_window)
                self.streams[stream_id] = stream
        # Otherwise trailers (or anything) on a stream we already answered: dropped.
        if not flags & END_HEADERS:
            self.headers_stream = stream_id
            self.headers_end_stream = bool(flags & END_STREAM)
        elif flags & END_STREAM and stream is not None:
            self._on_remote_close(stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        # Every DATA byte counts against the connection window, even on a stream we no longer track.
        self.received_unacknowledged += len(payload)
        if self.received_unacknowledged >= WINDOW_REFILL:
            self._write(frame(WINDOW_UPDATE, 0, 0, self.received_unacknowledged.to_bytes(4, "big")))
            self.received_unacknowledged = 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.received += len(payload)
        if stream.received >= STREAM_WINDOW_REFILL and not flags & END_STREAM:
            self._write(frame(WINDOW_UPDATE, 0, stream_id, stream.received.to_bytes(4, "big")))
            stream.received = 0
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        stream.buffer += payload
        self._take_messages(stream)
        if flags & END_STREAM and stream.id in self.streams:
            self._on_remote_close(stream)

    def _on_settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value
            elif key == SETTINGS_HEADER_TABLE_SIZE and value < DEFAULT_HEADER_TABLE_SIZE:
                # Our blocks never use the dynamic table, but a decoder that shrank it may insist on the
                # encoder acknowledging that with a size update (RFC 7541 4.2; nghttp2 does).
                self.table_size_update = hpack_integer(value, 5, 0x20)
        self._write(frame(SETTINGS, ACK, 0))
        self._flush_blocked()

    def _take_messages(self, stream: _Stream) -> None:
        buffer = stream.buffer
        while len(buffer) >= 5:
            size = int.from_bytes(buffer[1:5], "big")
            if size > self.front.max_message_bytes:
                self._finish(stream, error_trailers(
                    GRPC_RESOURCE_EXHAUSTED, f"message of {size} bytes exceeds {self.front.max_message_bytes}"
                ))
                return
            if buffer[0]:
                self._finish(stream, error_trailers(GRPC_UNIMPLEMENTED, "compressed messages are not accepted"))
                return
            if len(buffer) < 5 + size:
                break
            if stream.service is None:
                logs = size > 0 and buffer[5] == _FIRST_FIELD_OF_ACCESS_LOGS
                stream.service = self.front.access_log if logs else self.front.processor
                stream.exchange = stream.service.open_exchange()
            stream.inbox.append(bytes(buffer[5 : 5 + size]))
            del buffer[: 5 + size]
        if stream.inbox and stream.task is None:
            if stream.service is self.front.access_log:
                # Never urgent: a decision that arrived in the same read is answered first.
                stream.task = asyncio.get_running_loop().create_task(self._answer(stream))
            else:
                self._answer_eagerly(stream)

    def _answer_eagerly(self, stream: _Stream) -> None:
        """Runs the answer in this callback, up to the first thing it must wait for. Most decisions wait for
        nothing (in memory, or on Redis from allotted slots), so the reply is written before this returns:
        no task to create and no loop turn to wait for (~25 µs per request on a 2-core VM, and no queueing
        behind other ready callbacks). A decision that waits (a Redis round trip) goes on in a task."""
        coro = self._answer(stream)
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return
        stream.task = asyncio.get_running_loop().create_task(_Started(coro, waiting_on))

    def _on_remote_close(self, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.task is None and not stream.inbox and not stream.answered:
            self._end_call(stream)

    def _end_call(self, stream: _Stream) -> None:
        """Envoy finished its side and every message was handled: the final message, if any, and OK."""
        final = stream.service.final_message if stream.service is not None else None
        if final is not None:
            self._send(stream, final, last=True)
        else:
            self._finish(stream, OK_TRAILERS)

    # -- answers out -------------------------------------------------------------------------------------

    async def _answer(self, stream: _Stream) -> None:
        assert stream.service is not None
        try:
            while stream.inbox:
                response, last = await stream.service.handle(stream.exchange, stream.inbox.popleft())
                if self.streams.get(stream.id) is not stream:
                    return  # reset while we decided
                if response is not None:
                    self._send(stream, response, last)
                if last:
                    return
        except DecodeError:
            self._finish(stream, error_trailers(GRPC_INVALID_ARGUMENT, "the message does not parse"))
            return
        except Exception as exc:  # a bug must fail this request, not the connection
            log.exception("stream failed")
            self._finish(stream, error_trailers(GRPC_INTERNAL, f"processor error: {type(exc).__name__}"))
            return
        stream.task = None
        if stream.remote_closed:
            self._end_call(stream)

    def _send(self, stream: _Stream, message: bytes, last: bool) -> None:
        data = b"\x00" + len(message).to_bytes(4, "big") + message
        stream.answered = last
        out = b""
        if not stream.headers_sent:
            stream.headers_sent = True
            out = frame(HEADERS, END_HEADERS, stream.id, self._header_block(RESPONSE_HEADERS))
        size = len(data)
        if not self.blocked and size <= self.send_window and size <= stream.send_window and size <= self.peer_max_frame:
            # The common case, in one write: headers, the message, and the trailers when it is the last.
            self.send_window -= size
            stream.send_window -= size
            out += frame(DATA, 0, stream.id, data)
            if last:
                out += frame(HEADERS, END_STREAM | END_HEADERS, stream.id, self._header_block(OK_TRAILERS))
                self.streams.pop(stream.id, None)
            self._write(out)
            return
        if out:
            self._write(out)
        self.blocked.append((stream, data, last))
        self._flush_blocked()

    def _flush_blocked(self) -> None:
        while self.blocked:
            stream, data, last = self.blocked[0]
            if self.streams.get(stream.id) is not stream:
                self.blocked.popleft()  # reset meanwhile
                continue
            while data:
                size = min(len(data), self.send_window, stream.send_window, self.peer_max_frame)
                if size <= 0:
                    self.blocked[0] = (stream, data, last)
                    return
                self.send_window -= size
                stream.send_window -= size
                self._write(frame(DATA, 0, stream.id, data[:size]))
                data = data[size:]
            self.blocked.popleft()
            if last:
                self._finish(stream, OK_TRAILERS)

    def _finish(self, stream: _Stream, trailers: bytes) -> None:
        """Ends the call with these trailers (a trailers-only response if nothing was sent yet)."""
        if self.streams.pop(stream.id, None) is None:
            return
        if stream.task is not None and stream.task is not asyncio.current_task():
            stream.task.cancel()
        block = trailers if stream.headers_sent else RESPONSE_HEADERS + trailers
        self._write(frame(HEADERS, END_STREAM | END_HEADERS, stream.id, self._header_block(block)))

    def _header_block(self, block: bytes) -> bytes:
        if self.table_size_update:
            block, self.table_size_update = self.table_size_update + block, b""
        return block

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _abort(self, code: int, reason: str) -> None:
        log.warning("closing an ext_proc connection: %s", reason)
        self._write(frame(GOAWAY, 0, 0, self.last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big")))
        if self.transport is not None:
            self.transport.close()

    def go_away(self) -> None:
        """Shutdown: no new streams; the ones under way finish."""
        self.going_away = True
        self._write(frame(GOAWAY, 0, 0, self.last_stream_id.to_bytes(4, "big") + NO_ERROR.to_bytes(4, "big")))


class _Started(collections.abc.Coroutine[typing.Any, typing.Any, None]):
    """A coroutine that was started outside any task, given to a task from the point where it waits: the
    task's first step gets what it yielded (the future it waits on), later steps and every exception thrown
    in (a cancellation, even before the first step) go on to the coroutine itself."""

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: typing.Coroutine[typing.Any, typing.Any, None], waiting_on: typing.Any) -> None:
        self._coro = coro
        self._waiting_on: typing.Any = [waiting_on]

    def send(self, value: typing.Any) -> typing.Any:
        if self._waiting_on:
            return self._waiting_on.pop()
        return self._coro.send(value)

    def throw(self, *exc: typing.Any) -> typing.Any:  # type: ignore[override]
        self._waiting_on = []
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> typing.Generator[typing.Any, None, None]:
        raise TypeError("a started coroutine is only run by a task")


class ExtProcFront:
    """The lean listener (TCP or a Unix socket): ext_proc streams to ``processor``, access-log streams to
    ``access_log``."""

    def __init__(self, processor: Service, access_log: Service, max_message_bytes: int) -> None:
        self.processor = processor
        self.access_log = access_log
        self.max_message_bytes = max_message_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start_tcp(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)  # left behind by a processor that was killed
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), path)

    async def stop(self, grace: float) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        for connection in list(self.connections):
            connection.go_away()
        deadline = asyncio.get_running_loop().time() + grace
        while any(c.streams for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
