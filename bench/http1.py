"""A minimal HTTP/1.1 client on asyncio streams, for the open-loop generator and the streaming TTFB probe.

Hand-written rather than httpx/aiohttp so that the client's own cost stays small and equal for every
system, and so that the moment the first body chunk arrives can be timed exactly.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


@dataclass
class Response:
    status: int
    body_bytes: int
    keep_alive: bool
    headers_at: float  # perf_counter when the whole head had arrived
    first_chunk_at: float  # perf_counter when the first body chunk (an SSE event, for streams) had arrived


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """The request bytes, built once and sent many times."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    headers_at = time.perf_counter()
    status = int(head[9:12])
    keep_alive = _CLOSE.search(head) is None
    if _CHUNKED.search(head):
        body_bytes, first_chunk_at = await _read_chunked(reader)
    else:
        match = _CONTENT_LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        if length:
            await reader.readexactly(length)
        first_chunk_at = time.perf_counter()
        body_bytes = length
    return Response(status, body_bytes, keep_alive, headers_at, first_chunk_at)


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[int, float]:
    total = 0
    first_chunk_at = 0.0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # end of the (empty) trailer section
            return total, first_chunk_at or time.perf_counter()
        await reader.readexactly(size + 2)
        if not first_chunk_at:
            first_chunk_at = time.perf_counter()
        total += size
