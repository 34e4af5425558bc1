"""The three kinds of load: wrk closed loop, the open-loop generator at a fixed rate, and the streaming TTFB probe.

Each load generator runs as its own process so its CPU is measured apart from the systems (wait4 rusage).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.http1 import build_request, read_response
from bench.procs import ROOT, run_measured

WRK = "/usr/bin/wrk"
RESULT_PREFIX = "BENCH_RESULT "


def chat_body(model: str, target_bytes: int = 1024) -> bytes:
    """A chat request of about `target_bytes`: a system prompt and a user question, like a small RAG call."""

    def render(question: str) -> bytes:
        return json.dumps(
            {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are a concise assistant for an internal knowledge base."},
                    {"role": "user", "content": question},
                ],
                "temperature": 0.2,
                "max_tokens": 128,
            }
        ).encode()

    question = "Summarize the following notes in two sentences:"
    while len(render(question)) < target_bytes:
        question += " Deployments are balanced by their rpm and tpm limits."
    return render(question)


def stream_body(model: str) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


# --- wrk (closed loop) ----------------------------------------------------------------------------------------

# done() prints wrk's own summary as JSON: latency percentiles in µs from wrk's HdrHistogram-like store, and
# the error counters (status = responses with a status above 399).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[__BODY__]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '__PREFIX__{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def write_wrk_script(path: Path, body: bytes) -> Path:
    path.write_text(WRK_SCRIPT.replace("__BODY__", body.decode()).replace("__PREFIX__", RESULT_PREFIX))
    return path


@dataclass(frozen=True)
class ClosedLoop:
    connections: int
    threads: int = 2

    @property
    def name(self) -> str:
        return f"c{self.connections}"


@dataclass(frozen=True)
class FixedRate:
    rate: float

    @property
    def name(self) -> str:
        return f"rate{self.rate:g}"


Load = ClosedLoop | FixedRate


def run_load(load: Load, port: int, path: str, duration: float, files: dict[str, Path]) -> dict[str, Any]:
    if isinstance(load, ClosedLoop):
        return run_wrk(load, port, path, duration, files["wrk_script"])
    return run_open_loop(load, port, path, duration, files["body"])


def run_wrk(load: ClosedLoop, port: int, path: str, duration: float, script: Path) -> dict[str, Any]:
    seconds = max(1, round(duration))
    cmd = [WRK, f"-t{load.threads}", f"-c{load.connections}", f"-d{seconds}s", "--timeout", "10s",
           "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    done = run_measured(cmd, timeout=seconds + 30)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result (exit {done.returncode}):\n{done.stdout[-2000:]}")
    raw = json.loads(line[len(RESULT_PREFIX):])
    errors = raw["errors"]
    completed = int(raw["requests"])
    return {
        "tool": "wrk",
        "completed": completed,
        "ok": completed - errors["status"],
        "rps": completed / (raw["duration_us"] / 1e6),
        "latency_ms": {k: v / 1000 for k, v in raw["latency_us"].items()},
        "errors": {**errors, "total": sum(errors.values())},
        "loadgen_cpu_s": done.cpu_s,
    }


def run_open_loop(load: FixedRate, port: int, path: str, duration: float, body_file: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.openloop", "--port", str(port), "--path", path,
           "--body-file", str(body_file), "--rate", str(load.rate), "--duration", str(duration)]
    done = run_measured(cmd, timeout=duration + 30, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench.openloop failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
    raw: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    errors = raw["errors"]
    return {
        **raw,
        "rps": raw["achieved_rps"],
        "errors": {**errors, "total": sum(errors.values())},
        "loadgen_cpu_s": done.cpu_s,
    }


# --- streaming time to first byte -----------------------------------------------------------------------------


async def _stream_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[
    int, float, float, float
]:
    began = time.perf_counter()
    writer.write(request)
    response = await read_response(reader)
    done = time.perf_counter()
    return response.status, response.headers_at - began, response.first_chunk_at - began, done - began


async def _stream_many(port: int, request: bytes, count: int, warmup: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers_s, first_s, total_s, failures = [], [], [], 0
    try:
        for index in range(warmup + count):
            status, to_headers, to_first, to_end = await asyncio.wait_for(_stream_once(reader, writer, request), 10)
            if index < warmup:
                continue
            if status != 200:
                failures += 1
                continue
            headers_s.append(to_headers)
            first_s.append(to_first)
            total_s.append(to_end)
    finally:
        writer.close()
    return {"headers_s": headers_s, "first_chunk_s": first_s, "total_s": total_s, "failures": failures}


def run_ttfb(port: int, path: str, headers: dict[str, str], body: bytes, count: int, warmup: int) -> dict[str, Any]:
    """Sequential `stream: true` requests on one keep-alive connection; times to headers, first SSE event, end."""
    request = build_request("127.0.0.1", port, path, body, headers)
    return asyncio.run(_stream_many(port, request, count, warmup))
