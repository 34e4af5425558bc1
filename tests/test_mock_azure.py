"""Tests for extproc.mock_azure: the mock Azure OpenAI resource used as upstream everywhere.

The server runs on its own event loop in a background thread so the tests can drive it with
ordinary blocking clients (httpx and the real `openai` package), exactly like an external
upstream. Every server / process a test starts is torn down by its fixture.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from openai import AzureOpenAI
from openai.types.chat import ChatCompletionMessageParam

from extproc.mock_azure import Fault, MockAzureServer

API_KEY = "test-key"
API_VERSION = "2024-02-01"
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class ThreadedMock:
    """A MockAzureServer running on a private event loop in a daemon thread."""

    def __init__(self, name: str = "m1") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = MockAzureServer(API_KEY, name=name)
        self.run(self.server.start())
        self.base = f"http://127.0.0.1:{self.server.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def set_fault(self, deployment: str, fault: Fault | None) -> None:
        async def _set() -> None:  # mutate server state on its own loop thread
            self.server.set_fault(deployment, fault)

        self.run(_set())

    def url(self, deployment: str, op: str = "chat/completions", version: str | None = API_VERSION) -> str:
        q = f"?api-version={version}" if version else ""
        return f"{self.base}/openai/deployments/{deployment}/{op}{q}"

    def leftover_tasks(self) -> int:
        async def _count() -> int:
            me = asyncio.current_task()
            return len([t for t in asyncio.all_tasks() if t is not me])

        return self.run(_count())

    def close(self) -> None:
        try:
            self.run(self.server.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture
def mock() -> Iterator[ThreadedMock]:
    m = ThreadedMock()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def azure(mock: ThreadedMock, **kw: Any) -> AzureOpenAI:
    return AzureOpenAI(azure_endpoint=mock.base, api_key=API_KEY, api_version=API_VERSION, **kw)


MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
]
CHAT: dict[str, Any] = {"messages": MESSAGES}
HDR = {"api-key": API_KEY}


# ---------------------------------------------------------------------------- happy paths


def test_chat_completion_openai_client(mock: ThreadedMock, http: httpx.Client) -> None:
    client = azure(mock, max_retries=0)
    r = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "gpt-4o"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello from m1/gpt-4o."
    assert r.choices[0].finish_reason == "stop"
    # 8 + 11 chars -> ceil(19/4)=5, plus 3 per message.
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 3, 14)

    raw = http.post(mock.url("gpt-4o"), json=CHAT, headers=HDR)
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-mock-name"] == "m1"
    assert raw.headers["x-mock-deployment"] == "gpt-4o"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) > 0
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 0
    assert len(raw.headers["apim-request-id"]) == 36

    rec = mock.server.requests[-1]
    assert (rec.method, rec.deployment, rec.status) == ("POST", "gpt-4o", 200)
    assert rec.query == {"api-version": API_VERSION}
    assert rec.headers["api-key"] == API_KEY


def test_max_tokens_limits_words(mock: ThreadedMock, http: httpx.Client) -> None:
    r = http.post(mock.url("d"), json={**CHAT, "max_tokens": 2}, headers=HDR).json()
    assert r["choices"][0]["message"]["content"] == "Hello from"
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 2


def test_completions_legacy(mock: ThreadedMock) -> None:
    client = azure(mock, max_retries=0)
    r = client.completions.create(model="davinci", prompt=["abcd", "abcdefgh"])
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == "Hello from m1/davinci."
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 6, 9)


def test_embeddings(mock: ThreadedMock, http: httpx.Client) -> None:
    client = azure(mock, max_retries=0)
    # The openai client asks for base64 by default and decodes it: exercise that path.
    r = client.embeddings.create(model="emb", input=["alpha", "beta", "alpha"])
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == 8 for d in r.data)
    assert r.data[0].embedding == r.data[2].embedding != r.data[1].embedding
    assert r.usage.prompt_tokens == r.usage.total_tokens == 2 + 1 + 2  # ceil(len/4) each

    raw = http.post(mock.url("emb", "embeddings"), json={"input": "alpha"}, headers=HDR).json()
    assert raw["object"] == "list" and raw["model"] == "emb"
    vec = raw["data"][0]["embedding"]
    assert len(vec) == 8 and all(isinstance(v, float) for v in vec)
    assert vec == pytest.approx(r.data[0].embedding, abs=1e-6)
    assert raw["usage"] == {"prompt_tokens": 2, "total_tokens": 2}

    b64 = http.post(
        mock.url("emb", "embeddings"), json={"input": "x", "encoding_format": "base64"}, headers=HDR
    ).json()
    assert len(struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))) == 8


# ---------------------------------------------------------------------------- streaming


def test_stream_with_usage_openai_client(mock: ThreadedMock) -> None:
    client = azure(mock, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from m1/gpt-4o."
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 14
    assert mock.server.requests[-1].status == 200


def test_stream_completions_without_usage(mock: ThreadedMock, http: httpx.Client) -> None:
    body = {"prompt": "hi", "stream": True}
    with http.stream("POST", mock.url("d", "completions"), json=body, headers=HDR) as r:
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(events)
    assert '"finish_reason":"stop"' in events[-2]


def test_chunk_delay_spreads_events(mock: ThreadedMock, http: httpx.Client) -> None:
    mock.set_fault("slow", Fault(chunk_delay=0.15))
    arrivals: list[float] = []
    t0 = time.monotonic()
    with http.stream("POST", mock.url("slow"), json={**CHAT, "stream": True}, headers=HDR) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - t0)
    # 3 words + stop chunk + [DONE] = 5 events, 4 gaps of 0.15 s.
    assert len(arrivals) == 5
    assert arrivals[0] < 0.3
    assert arrivals[-1] - arrivals[0] >= 0.5


# ---------------------------------------------------------------------------- request errors


def test_auth_and_routing_errors(mock: ThreadedMock, http: httpx.Client) -> None:
    r = http.post(mock.url("d"), json=CHAT, headers={"api-key": "wrong"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "401"
    assert r.json()["error"]["message"].startswith("Access denied due to invalid subscription key")
    assert http.post(mock.url("d"), json=CHAT).status_code == 401

    r = http.post(mock.url("d", version=None), json=CHAT, headers=HDR)
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "404", "message": "Resource not found"}}
    assert http.post(f"{mock.base}/openai/other?api-version=1", headers=HDR).status_code == 404
    assert http.get(mock.url("d"), headers=HDR).status_code == 405

    r = http.post(mock.url("d"), content=b"{not json", headers=HDR)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert http.post(mock.url("d"), json=[1, 2], headers=HDR).status_code == 400

    statuses = [rq.status for rq in mock.server.requests]
    assert statuses == [401, 401, 404, 404, 405, 400, 400]


def test_openai_client_sees_auth_error(mock: ThreadedMock) -> None:
    client = AzureOpenAI(azure_endpoint=mock.base, api_key="nope", api_version=API_VERSION, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="d", messages=MESSAGES)


# ---------------------------------------------------------------------------- faults


def test_fault_429_retry_after_then_count_expires(mock: ThreadedMock, http: httpx.Client) -> None:
    mock.set_fault("d", Fault(status=429, retry_after=1.2, count=1))
    r = http.post(mock.url("d"), json=CHAT, headers=HDR)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    err = r.json()["error"]
    assert err["code"] == "429"
    assert "ChatCompletions_Create" in err["message"] and "retry after 2 seconds" in err["message"]
    # count=1: the next request is normal again.
    assert http.post(mock.url("d"), json=CHAT, headers=HDR).status_code == 200
    assert [rq.status for rq in mock.server.requests] == [429, 200]


def test_fault_500_before_auth_and_wildcard(mock: ThreadedMock, http: httpx.Client) -> None:
    mock.set_fault("*", Fault(status=500))
    mock.set_fault("ok", Fault())  # a specific entry overrides "*"
    r = http.post(mock.url("any"), json=CHAT, headers={"api-key": "wrong"})
    assert r.status_code == 500
    assert r.json() == {
        "error": {
            "code": "InternalServerError",
            "message": "The server had an error while processing your request.",
        }
    }
    assert "retry-after" not in r.headers
    assert http.post(mock.url("ok"), json=CHAT, headers=HDR).status_code == 200
    mock.set_fault("*", None)
    assert http.post(mock.url("any"), json=CHAT, headers=HDR).status_code == 200


def test_fault_delay(mock: ThreadedMock, http: httpx.Client) -> None:
    mock.set_fault("d", Fault(delay=0.4))
    t0 = time.monotonic()
    r = http.post(mock.url("d"), json=CHAT, headers=HDR)
    assert r.status_code == 200
    assert time.monotonic() - t0 >= 0.38


def test_fault_hang_until_client_gives_up(mock: ThreadedMock) -> None:
    mock.set_fault("d", Fault(hang=True))
    with httpx.Client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post(mock.url("d"), json=CHAT, headers=HDR)
    assert mock.server.requests[-1].status == 0
    # The hung connection is released once the client is gone.
    deadline = time.monotonic() + 3
    while mock.leftover_tasks() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mock.leftover_tasks() == 0


def test_stop_cancels_hung_requests(mock: ThreadedMock) -> None:
    mock.set_fault("*", Fault(hang=True))
    errors: list[BaseException] = []

    def client() -> None:
        try:
            httpx.post(mock.url("d"), json=CHAT, headers=HDR, timeout=10)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 3
    while len(mock.server.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(mock.server.requests) == 3
    t0 = time.monotonic()
    mock.run(mock.server.stop())  # the fixture's second stop() is a no-op
    for t in threads:
        t.join(5)
    assert time.monotonic() - t0 < 2
    assert len(errors) == 3 and all(isinstance(e, httpx.TransportError) for e in errors)
    assert mock.leftover_tasks() == 0


def test_fault_reset(mock: ThreadedMock, http: httpx.Client) -> None:
    mock.set_fault("d", Fault(reset=True, count=1))
    with pytest.raises(httpx.TransportError):
        http.post(mock.url("d"), json=CHAT, headers=HDR)
    assert mock.server.requests[-1].status == -1
    assert http.post(mock.url("d"), json=CHAT, headers=HDR).status_code == 200


def test_openai_client_retries_through_429(mock: ThreadedMock) -> None:
    mock.set_fault("d", Fault(status=429, retry_after=0, count=1))
    r = azure(mock, max_retries=2).chat.completions.create(model="d", messages=MESSAGES)
    assert r.choices[0].message.content == "Hello from m1/d."
    assert [rq.status for rq in mock.server.requests] == [429, 200]


# ---------------------------------------------------------------------------- HTTP framing


def test_large_chunked_and_sized_bodies_recorded_intact(mock: ThreadedMock, http: httpx.Client) -> None:
    filler = os.urandom(3 * 1024 * 1024).hex()[: 2 * 1024 * 1024]
    body = ('{"messages":[{"role":"user","content":"' + filler + '"}]}').encode()
    assert len(body) > 2 * 1024 * 1024
    r = http.post(mock.url("d"), content=body, headers={**HDR, "content-type": "application/json"})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == (len(filler) + 3) // 4 + 3

    def gen() -> Iterator[bytes]:  # no length -> httpx uses transfer-encoding: chunked
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    assert http.post(mock.url("d"), content=gen(), headers=HDR).status_code == 200
    sha = hashlib.sha256(body).hexdigest()
    assert [hashlib.sha256(rq.body).hexdigest() for rq in mock.server.requests] == [sha, sha]
    assert mock.server.requests[1].headers["transfer-encoding"] == "chunked"


def _raw_exchange(port: int, data: bytes, wait: float = 1.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def test_pipelined_keepalive_and_malformed(mock: ThreadedMock, http: httpx.Client) -> None:
    port = mock.server.port
    body = b'{"messages":[{"role":"user","content":"x"}]}'
    req = (
        f"POST /openai/deployments/d/chat/completions?api-version=1 HTTP/1.1\r\nhost: x\r\n"
        f"api-key: {API_KEY}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    last = req.replace(b"host: x\r\n", b"host: x\r\nconnection: close\r\n")
    out = _raw_exchange(port, req + req + last)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.rstrip().endswith(b"}")

    out = _raw_exchange(port, b"GARBAGE\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"connection: close" in out
    out = _raw_exchange(port, b"POST / HTTP/1.1\r\ncontent-length: nope\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    out = _raw_exchange(port, b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    out = _raw_exchange(port, b"GET / HTTP/1.1\r\n" + b"x-big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    # Expect: 100-continue gets an interim response before the body is read.
    out = _raw_exchange(port, req.replace(b"host: x\r\n", b"host: x\r\nexpect: 100-continue\r\n"), 0.5)
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")
    # Still healthy after all that.
    assert http.get(f"{mock.base}/_mock/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------- subprocess + control API


@pytest.fixture
def proc_mock() -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.Popen(
        [sys.executable, "-m", "extproc.mock_azure", "--port", "0", "--api-key", API_KEY, "--name", "sub"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        assert line.startswith("mock sub listening on 127.0.0.1:"), line
        yield p, "http://" + line.rsplit(" ", 1)[1]
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p.stdout is not None:
            p.stdout.close()


def test_control_api_subprocess(proc_mock: tuple[subprocess.Popen[str], str]) -> None:
    p, base = proc_mock
    url = f"{base}/openai/deployments/dep/chat/completions?api-version={API_VERSION}"
    with httpx.Client(timeout=5) as c:
        assert c.get(f"{base}/_mock/health").json() == {"status": "ok"}
        assert c.put(f"{base}/_mock/faults/dep", json={"status": 503, "count": 2}).status_code == 200
        assert c.put(f"{base}/_mock/faults/dep", json={"bogus": 1}).status_code == 400
        assert c.get(f"{base}/_mock/faults").json()["dep"]["status"] == 503
        assert c.post(url, json=CHAT, headers=HDR).status_code == 503
        assert c.delete(f"{base}/_mock/faults/dep").status_code == 200
        ok = c.post(url, json=CHAT, headers=HDR)
        assert ok.status_code == 200 and ok.headers["x-mock-name"] == "sub"
        assert c.put(f"{base}/_mock/faults/*", json={"status": 429, "retry_after": 3}).status_code == 200
        assert c.post(url.replace("/dep/", "/other/"), json=CHAT, headers=HDR).headers["retry-after"] == "3"

        recs = c.get(f"{base}/_mock/requests").json()
        assert [r["status"] for r in recs] == [503, 200, 429]
        assert recs[1]["deployment"] == "dep" and recs[2]["deployment"] == "other"
        assert recs[1]["body_sha256"] == hashlib.sha256(recs[1]["body"].encode()).hexdigest()
        assert recs[1]["headers"]["api-key"] == API_KEY
        assert c.delete(f"{base}/_mock/requests").status_code == 200
        assert c.get(f"{base}/_mock/requests").json() == []

    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0
