"""A lean pipelined Redis connection for the hot path (one EVALSHA per routing decision).

redis-py's asyncio client costs ~150 µs of CPU per call (connection pool, command packing, response
callbacks); this costs a fraction: concurrent callers share one connection, each request is one socket
write, replies are parsed by hiredis and handed back in order. Everything off the hot path (settling
batches, cooldowns, metrics) keeps using redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from urllib.parse import unquote, urlsplit

import hiredis


class RespError(Exception):
    """An error reply from Redis (for example NOSCRIPT)."""


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
        self._writer: asyncio.StreamWriter | None = None
        self._pending: collections.deque[asyncio.Future[object]] = collections.deque()
        self._connecting: asyncio.Lock | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def _connect(self) -> asyncio.StreamWriter:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self._timeout
            )
            self._writer = writer
            self._reader_task = asyncio.ensure_future(self._read(reader, writer))
            if self._password is not None:
                auth = [b"AUTH", self._password.encode()]
                if self._username:
                    auth.insert(1, self._username.encode())
                await self._send(writer, auth)
            if self._db:
                await self._send(writer, [b"SELECT", str(self._db).encode()])
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        error: BaseException = ConnectionError("redis connection closed")
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = self._pending.popleft()
                    if future.done():
                        continue  # its caller timed out; the reply stream stays in order
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(RespError(str(reply)))
                    else:
                        future.set_result(reply)
        except (OSError, hiredis.ProtocolError) as exc:
            error = ConnectionError(f"redis connection failed: {exc}")
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            while self._pending:
                future = self._pending.popleft()
                if not future.done():
                    future.set_exception(error)

    async def _send(self, writer: asyncio.StreamWriter, args: list[bytes]) -> object:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self._pending.append(future)
        writer.write(_pack(args))
        # A timer on the future itself: asyncio.wait_for would wrap every call in another task.
        timer = loop.call_later(self._timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def call(self, *args: bytes | str | int) -> object:
        writer = self._writer or await self._connect()
        return await self._send(writer, [a if isinstance(a, bytes) else str(a).encode() for a in args])

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()


def _expire(future: asyncio.Future[object]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("redis did not answer in time"))


def _pack(args: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)
