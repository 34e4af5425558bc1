"""Mock Azure OpenAI resource: one HTTP/1.1 server that serves any number of deployments.

Used as the upstream in tests, the demo and benchmarks, so it is written directly on
``asyncio.start_server`` streams (no framework) to stay fast and dependency free
(stdlib + orjson). It mimics the parts of ``https://<res>.openai.azure.com`` that the load
balancer cares about: routing by deployment, ``api-version``, ``api-key`` auth, realistic
JSON / SSE bodies with usage, Azure-like headers, and injectable faults (status, delay,
hang, reset, ...). A small control API under ``/_mock/`` lets another process inspect the
recorded requests and set faults.

Run standalone with ``python -m extproc.mock_azure --port P --api-key K --name N``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import hashlib
import http
import logging
import math
import re
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

__all__ = ["Fault", "MockAzureServer", "RecordedRequest", "main"]

log = logging.getLogger(__name__)

# Limits. Bodies of at least 16 MiB must be accepted; a bigger cap keeps a runaway client from
# exhausting memory. The head limit doubles as the StreamReader limit (max line / head size).
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024

# Rate-limit figures used to fill the x-ratelimit-* headers (per deployment, per minute).
RPM_LIMIT = 10_000
TPM_LIMIT = 1_000_000

_OPERATIONS = {
    "chat/completions": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
}
_API_PATH = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")
# Azure deployment names are alphanumerics, '-', '_' and '.'; anything else is not a route.
# Restricting them also makes echoing the name in a response header injection-safe.
_DEPLOYMENT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

_ERR_404 = orjson.dumps({"error": {"code": "404", "message": "Resource not found"}})
_ERR_401 = orjson.dumps(
    {
        "error": {
            "code": "401",
            "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
            "provide a valid key for an active subscription and use a correct regional API endpoint "
            "for your resource.",
        }
    }
)
_ERR_405 = orjson.dumps({"error": {"code": "405", "message": "Method Not Allowed"}})
_BAD_JSON_MSG = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
    "JSON. If you have trouble figuring out how to fix this, please contact us through our help center "
    "at help.openai.com.)"
)
_JSON = "application/json"


@dataclass
class Fault:
    """A misbehaviour injected for one deployment name ("*" = every deployment)."""

    status: int | None = None  # answer with this status and an Azure-style error body
    retry_after: float | None = None  # adds `Retry-After` (seconds, rounded up) to the error
    delay: float = 0.0  # seconds to wait before answering (success too)
    hang: bool = False  # never answer; keep the connection until the client closes it
    reset: bool = False  # abort the TCP connection (RST) without answering
    count: int | None = None  # apply to the next `count` requests only (None = until cleared)
    chunk_delay: float | None = None  # streams: seconds between SSE events
    reset_after_events: int | None = None  # streams: abort the connection (RST) after this many events


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    deployment: str | None
    status: int  # status answered; 0 = no answer (hang / pending), -1 = connection reset
    received_at: float  # time.monotonic() when the request head was read
    response_body: bytes = b""  # the body bytes sent (for streams: the SSE events, without chunk framing)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body.decode("utf-8", errors="replace"),
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
            "deployment": self.deployment,
            "status": self.status,
            "received_at": self.received_at,
        }


class _HttpError(Exception):
    """Protocol-level error: answer `status` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    received_at: float


@dataclass
class _Window:
    """Per-deployment one-minute window feeding the x-ratelimit-remaining-* headers."""

    minute: int = 0
    requests: int = 0
    tokens: int = 0


@dataclass
class _Reply:
    """A buffered (content-length) response."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = _JSON


_REASONS: dict[int, str] = {s.value: s.phrase for s in http.HTTPStatus}


def _status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"


def _openai_error(message: str, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    )


def _ceil_div4(n: int) -> int:
    return (n + 3) // 4


def _content_chars(content: Any) -> int:
    """Characters of a chat message `content`: a string or a list of typed parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += len(part["text"])
            elif isinstance(part, str):
                total += len(part)
        return total
    return 0


def _max_words(body: dict[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
    return None


def _fault_from_json(data: Any) -> Fault:
    """Validate a control-API JSON object into a Fault (raises ValueError with a reason)."""
    if not isinstance(data, dict):
        raise ValueError("fault must be a JSON object")
    known = {f.name for f in dataclasses.fields(Fault)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown fault fields: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        is_num = isinstance(value, int | float) and not isinstance(value, bool)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if name in ("hang", "reset"):
            ok = isinstance(value, bool)
        elif name == "delay":
            ok = is_num and value >= 0
        elif name in ("status", "count", "reset_after_events"):
            ok = value is None or (is_int and value >= 0)
        else:  # retry_after, chunk_delay
            ok = value is None or (is_num and value >= 0)
        if not ok:
            raise ValueError(f"invalid value for {name}: {value!r}")
        kwargs[name] = value
    return Fault(**kwargs)


class MockAzureServer:
    """An in-process mock Azure OpenAI resource. `start()` binds, `stop()` tears everything down."""

    def __init__(
        self,
        api_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "mock",
        *,
        max_recorded: int | None = None,
    ) -> None:
        # The name is echoed in a header: keep it to printable ASCII so it can't break the framing.
        if not name or not all(32 < ord(c) < 127 for c in name):
            raise ValueError(f"mock name must be printable ASCII without spaces: {name!r}")
        self.api_key = api_key
        self.host = host
        self.port = port
        self.name = name
        # None = keep every request; otherwise keep roughly the newest `max_recorded` (useful for
        # long benchmarks where recording everything would grow without bound).
        self.max_recorded = max_recorded
        self.requests: list[RecordedRequest] = []
        self._faults: dict[str, Fault] = {}
        self._windows: dict[str, _Window] = {}
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closing = False
        self._date_sec = -1
        self._date = ""
        self._name_header = f"x-mock-name: {name}\r\n"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._closing = False
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, limit=MAX_HEAD_BYTES, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, cancel every connection (including hung ones) and wait for them."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        # Loop: a connection accepted while we were waiting may have added a task meanwhile.
        while self._conn_tasks:
            tasks = list(self._conn_tasks)
            for w in list(self._writers):
                w.transport.abort()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._conn_tasks.difference_update(tasks)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> MockAzureServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ faults

    def set_fault(self, deployment: str, fault: Fault | None) -> None:
        """Set (or clear with None) the fault for a deployment; "*" matches every deployment."""
        if fault is None or fault.count == 0:
            self._faults.pop(deployment, None)
        else:
            # Store a copy: `count` is decremented in place and must not touch the caller's object.
            self._faults[deployment] = dataclasses.replace(fault)

    def _take_fault(self, deployment: str) -> Fault | None:
        key = deployment if deployment in self._faults else "*"
        fault = self._faults.get(key)
        if fault is None:
            return None
        if fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                del self._faults[key]
        return fault

    # ------------------------------------------------------------------ connection handling

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain (non-async) callback so we own the task: it is tracked from the moment the
        # connection exists (stop() can't miss it), and a cancelled task doesn't trip
        # asyncio 3.11's client_connected_cb done-callback (it calls task.exception()).
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._handle_connection(reader, writer))
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Small responses: don't let Nagle hold them back (asyncio sets it, but be sure).
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._closing:
                if not await self._serve_one(reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, BrokenPipeError):
            pass  # peer went away mid-request: nothing to answer
        except asyncio.CancelledError:
            raise  # stop(): let the cancellation finish the task
        except Exception:
            # Never let a bad request take the server down; drop just this connection.
            log.exception("mock %s: connection handler failed", self.name)
        finally:
            self._writers.discard(writer)
            writer.transport.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request. Returns False when the connection must close."""
        try:
            req = await self._read_request(reader, writer)
        except _HttpError as e:
            body = orjson.dumps({"error": {"code": str(e.status), "message": e.message}})
            await self._send(writer, _Reply(e.status, body), keep_alive=False)
            return False
        if req is None:
            return False  # clean EOF between requests

        if req.path.startswith("/_mock/"):
            reply = self._control(req)
            await self._send(writer, reply, keep_alive=req.keep_alive)
            return req.keep_alive

        m = _API_PATH.match(req.path)
        deployment: str | None = None
        if m is not None:
            dep = unquote(m.group(1))
            if _DEPLOYMENT_NAME.match(dep):
                deployment = dep
        rec = RecordedRequest(
            req.method, req.path, req.query, req.headers, req.body, deployment, 0, req.received_at
        )
        self._record(rec)
        if m is None or deployment is None:
            rec.status = 404
            await self._send(writer, _Reply(404, _ERR_404), keep_alive=req.keep_alive)
            return req.keep_alive
        operation = m.group(2)

        # Faults come right after routing (before auth) so a deployment can be made to fail
        # regardless of how the request is formed.
        fault = self._take_fault(deployment)
        chunk_delay = 0.0
        if fault is not None:
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.reset:
                rec.status = -1
                self._reset(writer)
                return False
            if fault.hang:
                # Discard anything else the client sends until it closes (or stop() cancels us).
                while await reader.read(65536):
                    pass
                return False
            if fault.status is not None:
                reply = self._fault_reply(fault, deployment, operation, req)
                rec.status = reply.status
                await self._send(writer, reply, keep_alive=req.keep_alive, deployment=deployment)
                return req.keep_alive
            chunk_delay = fault.chunk_delay or 0.0

        reset_after = fault.reset_after_events if fault is not None else None
        return await self._api(req, rec, writer, deployment, operation, chunk_delay, reset_after)

    def _record(self, rec: RecordedRequest) -> None:
        self.requests.append(rec)
        if self.max_recorded is not None and len(self.requests) > 2 * self.max_recorded:
            # Trim in bulk so the amortised cost stays O(1) per request.
            del self.requests[: len(self.requests) - self.max_recorded]

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        """Abort with SO_LINGER=0 so the peer sees a TCP RST, not an orderly FIN."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    # ------------------------------------------------------------------ HTTP parsing

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                raise _HttpError(400, "Bad Request") from None
            return None
        except asyncio.LimitOverrunError:
            raise _HttpError(431, "Request Header Fields Too Large") from None
        received_at = time.monotonic()

        lines = head[:-4].decode("latin-1").split("\r\n")
        while lines and not lines[0]:
            lines.pop(0)  # RFC 9112 2.2: ignore empty lines before the request line
        if not lines:
            raise _HttpError(400, "Bad Request")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]):
            raise _HttpError(400, "Bad Request")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HttpError(505, "HTTP Version Not Supported")

        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not _TOKEN.match(name):  # also rejects obs-fold and "name :"
                raise _HttpError(400, "Bad Request")
            key = name.lower()
            value = value.strip(" \t")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value

        # Absolute-form targets (sent to proxies) carry scheme and authority: keep only the path.
        if target.startswith(("http://", "https://")):
            slash = target.find("/", target.find("//") + 2)
            target = target[slash:] if slash >= 0 else "/"
        if not target.startswith("/"):
            raise _HttpError(400, "Bad Request")
        path, _, qs = target.partition("?")
        query = dict(parse_qsl(qs, keep_blank_values=True)) if qs else {}

        conn = headers.get("connection", "").lower()
        # HTTP/1.1 is persistent unless told otherwise; HTTP/1.0 only when asked to be.
        keep_alive = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn

        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        body = b""
        if te is not None:
            # A message with both framings is a request-smuggling vector: refuse it.
            if cl is not None or te.strip().lower() != "chunked":
                raise _HttpError(400, "Bad Request")
            self._maybe_continue(headers, writer)
            body = await self._read_chunked(reader)
        elif cl is not None:
            values = {v.strip() for v in cl.split(",")}
            if len(values) != 1:
                raise _HttpError(400, "Bad Request")
            raw = values.pop()
            if not raw.isdigit():
                raise _HttpError(400, "Bad Request")
            length = int(raw)
            if length > MAX_BODY_BYTES:
                raise _HttpError(413, "Request Entity Too Large")
            if length:
                self._maybe_continue(headers, writer)
                body = await reader.readexactly(length)
        return _Request(method, path, query, headers, body, keep_alive, received_at)

    @staticmethod
    def _maybe_continue(headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        # curl (and some proxies) wait for this before sending large bodies.
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise _HttpError(400, "Bad Request") from None
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _HttpError(400, "Bad Request") from None
            if size < 0 or not size_text.isalnum():
                raise _HttpError(400, "Bad Request")
            if size == 0:
                # Skip trailers up to the blank line.
                while True:
                    try:
                        trailer = await reader.readuntil(b"\r\n")
                    except asyncio.LimitOverrunError:
                        raise _HttpError(400, "Bad Request") from None
                    if trailer == b"\r\n":
                        return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise _HttpError(413, "Request Entity Too Large")
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise _HttpError(400, "Bad Request")

    # ------------------------------------------------------------------ HTTP writing

    def _date_header(self) -> str:
        now = int(time.time())
        if now != self._date_sec:  # formatting a date per request is measurable; cache per second
            self._date_sec = now
            self._date = email.utils.formatdate(now, usegmt=True)
        return self._date

    def _head(
        self,
        status: int,
        content_type: str,
        headers: Iterable[tuple[str, str]],
        keep_alive: bool,
        deployment: str | None,
        length: int | None,
    ) -> bytes:
        """Response head; `length` None means chunked transfer encoding."""
        out = [
            _status_line(status),
            f"content-type: {content_type}\r\n",
            f"content-length: {length}\r\n" if length is not None else "transfer-encoding: chunked\r\n",
            f"date: {self._date_header()}\r\n",
            self._name_header,
        ]
        if deployment is not None:
            out.append(f"x-mock-deployment: {deployment}\r\n")
        for k, v in headers:
            out.append(f"{k}: {v}\r\n")
        if not keep_alive:
            out.append("connection: close\r\n")
        out.append("\r\n")
        return "".join(out).encode("latin-1")

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        reply: _Reply,
        *,
        keep_alive: bool,
        deployment: str | None = None,
    ) -> None:
        head = self._head(
            reply.status, reply.content_type, reply.headers, keep_alive, deployment, len(reply.body)
        )
        writer.write(head + reply.body)
        await writer.drain()

    # ------------------------------------------------------------------ control API

    def _control(self, req: _Request) -> _Reply:
        ok = orjson.dumps({"status": "ok"})
        path, method = req.path, req.method
        if path == "/_mock/health":
            return _Reply(200, ok) if method in ("GET", "HEAD") else _Reply(405, _ERR_405)
        if path == "/_mock/requests":
            if method == "GET":
                return _Reply(200, orjson.dumps([r.to_json() for r in self.requests]))
            if method == "DELETE":
                self.requests.clear()
                return _Reply(200, ok)
            return _Reply(405, _ERR_405)
        if path == "/_mock/faults":
            if method == "GET":
                return _Reply(200, orjson.dumps({k: dataclasses.asdict(v) for k, v in self._faults.items()}))
            return _Reply(405, _ERR_405)
        if path.startswith("/_mock/faults/"):
            deployment = unquote(path[len("/_mock/faults/") :])
            if not deployment:
                return _Reply(404, _ERR_404)
            if method == "PUT":
                try:
                    data = orjson.loads(req.body) if req.body.strip() else {}
                    fault = _fault_from_json(data)
                except (orjson.JSONDecodeError, ValueError) as e:
                    return _Reply(400, _openai_error(f"invalid fault: {e}"))
                self.set_fault(deployment, fault)
                return _Reply(200, ok)
            if method == "DELETE":
                self.set_fault(deployment, None)
                return _Reply(200, ok)
            return _Reply(405, _ERR_405)
        return _Reply(404, _ERR_404)

    # ------------------------------------------------------------------ Azure API

    def _fault_reply(self, fault: Fault, deployment: str, operation: str, req: _Request) -> _Reply:
        status = fault.status if fault.status is not None else 500
        headers = [("apim-request-id", str(uuid.uuid4()))]
        wait = math.ceil(fault.retry_after) if fault.retry_after is not None else None
        if wait is not None:
            headers.append(("retry-after", str(wait)))
        if status == 429:
            api_version = req.query.get("api-version", "unknown")
            message = (
                f"Requests to the {_OPERATIONS[operation]} Operation under Azure OpenAI API version "
                f"{api_version} have exceeded call rate limit of your current OpenAI S0 pricing tier. "
                f"Please retry after {wait if wait is not None else 1} seconds. Please go here: "
                "https://aka.ms/oai/quotaincrease if you would like to further increase the default "
                "rate limit."
            )
            error = {"code": "429", "message": message}
            headers += [("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-remaining-tokens", "0")]
        elif status == 500:
            error = {
                "code": "InternalServerError",
                "message": "The server had an error while processing your request.",
            }
        elif status == 503:
            error = {
                "code": "ServiceUnavailable",
                "message": "The service is temporarily unable to process your request. "
                "Please try again later.",
            }
        elif status == 408:
            error = {"code": "Timeout", "message": "The operation was timeout."}
        else:
            error = {"code": str(status), "message": f"Mock fault: {_REASONS.get(status, 'Error')}"}
        return _Reply(status, orjson.dumps({"error": error}), headers)

    def _rate_headers(self, deployment: str, tokens: int) -> list[tuple[str, str]]:
        minute = int(time.monotonic() // 60)
        w = self._windows.get(deployment)
        if w is None:
            w = self._windows[deployment] = _Window(minute)
        if w.minute != minute:
            w.minute, w.requests, w.tokens = minute, 0, 0
        w.requests += 1
        w.tokens += tokens
        return [
            ("apim-request-id", str(uuid.uuid4())),
            ("x-ratelimit-remaining-requests", str(max(0, RPM_LIMIT - w.requests))),
            ("x-ratelimit-remaining-tokens", str(max(0, TPM_LIMIT - w.tokens))),
        ]

    async def _api(
        self,
        req: _Request,
        rec: RecordedRequest,
        writer: asyncio.StreamWriter,
        deployment: str,
        operation: str,
        chunk_delay: float,
        reset_after: int | None = None,
    ) -> bool:
        keep = req.keep_alive

        async def reply(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> bool:
            rec.status = status
            if headers is None:
                headers = [("apim-request-id", str(uuid.uuid4()))]
            r = _Reply(status, body, headers)
            rec.response_body = body
            if status == 405:
                r.headers.append(("allow", "POST"))
            await self._send(writer, r, keep_alive=keep, deployment=deployment)
            return keep

        if req.method != "POST":
            return await reply(405, _ERR_405)
        if "api-version" not in req.query:
            return await reply(404, _ERR_404)
        if req.headers.get("api-key") != self.api_key:
            return await reply(401, _ERR_401)
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            return await reply(400, _openai_error(_BAD_JSON_MSG))
        if not isinstance(body, dict):
            return await reply(400, _openai_error(f"{req.body[:100]!r} is not of type 'object'"))

        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            msg = f"{stream!r} is not of type 'boolean' - 'stream'"
            return await reply(400, _openai_error(msg, "stream"))
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True

        if operation == "embeddings":
            result = self._embeddings(body, deployment)
            if isinstance(result, str):
                return await reply(400, _openai_error(result, "input"))
            emb_payload, tokens = result
            return await reply(200, orjson.dumps(emb_payload), self._rate_headers(deployment, tokens))

        words = f"Hello from {self.name}/{deployment}.".split(" ")
        limit = _max_words(body)
        finish = "stop"
        if limit is not None and limit < len(words):
            words, finish = words[:limit], "length"
        content = " ".join(words)

        if operation == "chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return await reply(400, _openai_error("'messages' is a required property", "messages"))
            chars = sum(_content_chars(m.get("content")) for m in messages if isinstance(m, dict))
            prompt_tokens = _ceil_div4(chars) + 3 * len(messages)
            n_prompts = 1
        else:
            prompts = body.get("prompt", "")
            if isinstance(prompts, str):
                prompts = [prompts]
            elif isinstance(prompts, list) and prompts and all(isinstance(p, int) for p in prompts):
                prompts = [prompts]  # a single token array
            if not isinstance(prompts, list) or not prompts:
                return await reply(400, _openai_error("Invalid prompt", "prompt"))
            prompt_tokens = 0
            for p in prompts:
                if isinstance(p, str):
                    prompt_tokens += _ceil_div4(len(p))
                elif isinstance(p, list):
                    prompt_tokens += len(p)
                else:
                    return await reply(400, _openai_error("Invalid prompt", "prompt"))
            n_prompts = len(prompts)

        completion_tokens = len(words) * n_prompts
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        rate = self._rate_headers(deployment, prompt_tokens + completion_tokens)
        created = int(time.time())
        chat = operation == "chat/completions"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]

        if stream:
            if chat:
                events = self._chat_events(rid, created, deployment, words, finish, usage, include_usage)
            else:
                events = self._completion_events(
                    rid, created, deployment, words, finish, n_prompts, usage, include_usage
                )
            rec.status = 200
            return await self._stream(writer, events, rate, keep, deployment, chunk_delay, rec, reset_after)

        if chat:
            payload: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": deployment,
                "system_fingerprint": "fp_mock",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }
        else:
            payload = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": deployment,
                "choices": [
                    {"text": content, "index": i, "finish_reason": finish, "logprobs": None}
                    for i in range(n_prompts)
                ],
                "usage": usage,
            }
        return await reply(200, orjson.dumps(payload), rate)

    def _embeddings(self, body: dict[str, Any], deployment: str) -> tuple[dict[str, Any], int] | str:
        """Embedding response and its token count, or an error message."""
        inp = body.get("input")
        items: list[Any]
        if isinstance(inp, str):
            items = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            items = [inp]  # one token array
        elif isinstance(inp, list) and inp:
            items = inp
        else:
            return "'input' is a required property"
        dims = body.get("dimensions")
        if not (isinstance(dims, int) and not isinstance(dims, bool) and 1 <= dims <= 3072):
            dims = 8
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for i, item in enumerate(items):
            if isinstance(item, str):
                key = item.encode("utf-8", errors="replace")
                tokens += max(1, _ceil_div4(len(item)))
            elif isinstance(item, list) and all(isinstance(x, int) for x in item):
                key = orjson.dumps(item)
                tokens += len(item)
            else:
                return f"Invalid type for 'input[{i}]'"
            vec = _vector(key, dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        payload = {
            "object": "list",
            "data": data,
            "model": deployment,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return payload, tokens

    # ------------------------------------------------------------------ streaming

    @staticmethod
    def _chat_events(
        rid: str,
        created: int,
        model: str,
        words: list[str],
        finish: str,
        usage: dict[str, int],
        include_usage: bool,
    ) -> list[bytes]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            obj: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_mock",
                "choices": choices,
            }
            if include_usage:
                obj["usage"] = None  # like OpenAI: null on every chunk but the last
            obj.update(extra)
            return orjson.dumps(obj)

        events = []
        last = len(words) - 1
        for i, w in enumerate(words):
            delta: dict[str, Any] = {"content": w if i == last else w + " "}
            if i == 0:
                delta = {"role": "assistant", **delta}
            events.append(chunk([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]))
        events.append(chunk([{"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}]))
        if include_usage:
            events.append(chunk([], usage=usage))
        return events

    @staticmethod
    def _completion_events(
        rid: str,
        created: int,
        model: str,
        words: list[str],
        finish: str,
        n_prompts: int,
        usage: dict[str, int],
        include_usage: bool,
    ) -> list[bytes]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            obj: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                obj["usage"] = None
            obj.update(extra)
            return orjson.dumps(obj)

        events = []
        last = len(words) - 1
        for p in range(n_prompts):
            for i, w in enumerate(words):
                text = w if i == last else w + " "
                events.append(chunk([{"text": text, "index": p, "logprobs": None, "finish_reason": None}]))
            events.append(chunk([{"text": "", "index": p, "logprobs": None, "finish_reason": finish}]))
        if include_usage:
            events.append(chunk([], usage=usage))
        return events

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        events: list[bytes],
        headers: list[tuple[str, str]],
        keep_alive: bool,
        deployment: str,
        chunk_delay: float,
        rec: RecordedRequest,
        reset_after: int | None,
    ) -> bool:
        """Send SSE events as individual HTTP chunks, each flushed, `chunk_delay` apart. Returns keep-alive."""
        head = self._head(
            200, "text/event-stream", [("cache-control", "no-cache"), *headers], keep_alive, deployment, None
        )
        writer.write(head)
        for i, data in enumerate([*events, b"[DONE]"]):
            if i and chunk_delay > 0:
                await asyncio.sleep(chunk_delay)
            if reset_after is not None and i >= reset_after:
                rec.status = -1
                self._reset(writer)
                return False
            event = b"data: " + data + b"\n\n"
            rec.response_body += event
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep_alive


def _vector(key: bytes, dims: int) -> list[float]:
    """Deterministic unit vector derived from the input bytes (so equal inputs embed equally)."""
    raw = hashlib.shake_256(key).digest(4 * dims)
    vals = [v / 2147483648.0 - 1.0 for v in struct.unpack(f"<{dims}I", raw)]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 6) for v in vals]


# ---------------------------------------------------------------------- CLI


async def _serve(args: argparse.Namespace) -> int:
    server = MockAzureServer(
        args.api_key, host=args.host, port=args.port, name=args.name, max_recorded=args.max_recorded
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Parents wait for this exact line (and read the real port from it when --port 0).
    print(f"mock {server.name} listening on {server.host}:{server.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.mock_azure", description="Mock Azure OpenAI resource"
    )
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 = pick a free one)")
    parser.add_argument("--api-key", required=True, help="value the api-key header must carry")
    parser.add_argument("--name", default="mock", help="name echoed in responses and x-mock-name")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument(
        "--max-recorded",
        type=int,
        default=None,
        help="keep only about this many recorded requests (default: all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
