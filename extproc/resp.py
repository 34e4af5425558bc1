"""A lean pipelined Redis connection for the hot path (one EVALSHA per routing decision).

redis-py's asyncio client costs ~150 µs of CPU per call (connection pool, command packing, response
callbacks); this costs a fraction: concurrent callers share one connection, each request is one socket
write, replies are parsed by hiredis as they arrive and handed back in order. Everything off the hot path (settling
batches, cooldowns, metrics) keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import typing
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import hiredis


class RespError(Exception):
    """An error reply from Redis (for example NOSCRIPT)."""


class _RespProtocol(asyncio.Protocol):
    """Replies are parsed and handed to their callers in ``data_received`` itself: no reader task, no
    StreamReader buffer, one event-loop step from socket to caller."""

    def __init__(self) -> None:
        self.parser = hiredis.Reader()
        self.pending: collections.deque[asyncio.Future[object]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (not necessarily an asyncio.Transport subclass: uvloop's are not)
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        try:
            while (reply := self.parser.gets()) is not False:
                future = self.pending.popleft()
                if future.done():
                    continue  # its caller timed out; the reply stream stays in order
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(RespError(str(reply)))
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self._fail(ConnectionError(f"redis protocol error: {exc}"))
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"redis connection failed: {exc}" if exc else "redis connection closed"
        self._fail(ConnectionError(reason))

    def _fail(self, error: BaseException) -> None:
        self.closed = True
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


class RespConnection:
    def __init__(self, url: str, timeout: float = 0.5) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("only redis:// URLs (no TLS) use the lean connection")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._db = int(parts.path.lstrip("/") or 0)
        self._timeout = timeout
        self._protocol: _RespProtocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> _RespProtocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            _transport, protocol = await asyncio.wait_for(
                loop.create_connection(_RespProtocol, self._host, self._port), self._timeout
            )
            if self._password is not None:
                auth = [b"AUTH", self._password.encode()]
                if self._username:
                    auth.insert(1, self._username.encode())
                await self._send(protocol, auth)
            if self._db:
                await self._send(protocol, [b"SELECT", str(self._db).encode()])
            self._protocol = protocol
            return protocol

    async def _send(self, protocol: _RespProtocol, args: list[bytes]) -> object:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        protocol.pending.append(future)
        assert protocol.transport is not None
        protocol.transport.write(_pack(args))
        # A timer on the future itself: asyncio.wait_for would wrap every call in another task.
        timer = loop.call_later(self._timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def call(self, *args: bytes | str | int) -> object:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await self._send(protocol, [a if isinstance(a, bytes) else str(a).encode() for a in args])

    def send_nowait(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[asyncio.Future[object]] | None:
        """Write these commands now, in one write, and return their replies' futures (with the same timeout
        as ``call``), or None when the connection is not up: for callers that must not wait for the replies,
        only have the commands sent before anything they send later."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[object]] = [loop.create_future() for _ in commands]
        protocol.pending.extend(futures)
        assert protocol.transport is not None
        protocol.transport.write(b"".join(
            _pack([a if isinstance(a, bytes) else str(a).encode() for a in args]) for args in commands
        ))
        timer = loop.call_later(self._timeout, _expire_all, futures)
        futures[-1].add_done_callback(lambda _: timer.cancel())  # replies arrive in order: the last is last
        return futures

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.closed

    async def call_many(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[object]:
        """Several commands in one write (a pipeline): their replies in order, an error reply as a RespError
        in its place rather than raised."""
        futures = self.send_nowait(commands)
        if futures is None:
            await self._connect()
            futures = self.send_nowait(commands)
            assert futures is not None
        replies: list[object] = []
        for future in futures:
            try:
                replies.append(await future)
            except RespError as exc:
                replies.append(exc)
        return replies

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


def _expire_all(futures: list[asyncio.Future[object]]) -> None:
    for future in futures:
        _expire(future)


def _expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("redis did not answer in time"))


def _pack(args: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)
