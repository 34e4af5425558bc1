"""Where a processor's CPU goes under load: py-spy recordings, boiled down into docs/benchmarks/profile.md.

Two recordings of the same processor under the same wrk load:
- `--native`: also unwinds C frames, so time inside grpc.aio's Cython/C-core, protobuf (upb) and the
  system calls shows up by library. This gives the breakdown by category. It slows the processor more.
- Python frames only: cheaper, and names the product's own functions exactly (inclusive time).
A category's µs per request is its share of samples times the processor CPU per request measured (from
/proc) in the same window.
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from bench.venvs import venv_tool

PY_SPY_VENV = ROOT / ".bench-venv" / "tools"
PY_SPY_REQUIREMENT = "py-spy"
SAMPLE_RATE_HZ = 100

# Leaf frames of a thread that is waiting for events, not working. py-spy samples them all the same (it
# cannot tell a blocking epoll_wait from a busy one), so they are left out of the shares.
WAITING_LEAVES = frozenset({
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect",
    "EpollSelector.select", "PollSelector.select", "SelectSelector.select",
})

GRPC = "gRPC (grpc.aio Cython + C-core)"
ASYNCIO = "asyncio event loop"
REDIS_PY = "redis-py client"
PROTOBUF = "protobuf (upb)"
INTERPRETER = "CPython interpreter, other C code"


@dataclass(frozen=True)
class Frame:
    name: str
    file: str


@dataclass(frozen=True)
class Sample:
    thread: str
    stack: tuple[Frame, ...]  # root first, leaf last
    seconds: float


def py_spy_executable(log: Callable[[str], None]) -> tuple[Path | None, str]:
    return venv_tool(PY_SPY_VENV, PY_SPY_REQUIREMENT, "py-spy", log)


def start_recording(py_spy: Path, pid: int, seconds: int, output: Path, native: bool) -> subprocess.Popen[bytes]:
    cmd = [str(py_spy), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(SAMPLE_RATE_HZ),
           "--format", "speedscope", "--output", str(output)]
    if native:
        cmd.append("--native")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def load_samples(path: Path) -> list[Sample]:
    """py-spy's speedscope file: shared frames, one sampled profile per thread, weights in seconds."""
    document = json.loads(path.read_text())
    frames = [Frame(f["name"], f.get("file") or "") for f in document["shared"]["frames"]]
    samples = []
    for profile in document["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            samples.append(Sample(profile["name"], tuple(frames[i] for i in stack), float(weight)))
    return samples


def is_waiting(sample: Sample) -> bool:
    if sample.stack[-1].name in WAITING_LEAVES:
        return True
    # Without --native, grpc.aio's poller thread shows no frame below Thread.run; the --native recording shows
    # it is nearly always blocked in epoll_wait there.
    return "_poll_wrapper" in sample.thread and not any(is_libc(f) or "cygrpc" in f.file for f in sample.stack)


# --- classification -------------------------------------------------------------------------------------------


def is_libc(frame: Frame) -> bool:
    return "libc.so" in frame.file or frame.file.startswith("[kernel")


def code_category(frame: Frame) -> str | None:
    """The library a frame belongs to, or None for interpreter internals and libc (look further up)."""
    path = frame.file
    if "/extproc/" in path:
        return f"product: {Path(path).name}"
    if "cygrpc" in path or "/grpc/" in path:
        return GRPC
    if "/redis/" in path:
        return REDIS_PY
    if "asyncio" in path or "selector" in path or "selectmodule" in path:
        return ASYNCIO
    if "_message" in path or "protobuf" in path:
        return PROTOBUF
    if "orjson" in path:
        return "orjson"
    return None


def category(sample: Sample) -> str:
    """System calls are charged to the library that made them; C code to its library; else the interpreter."""
    leaf = sample.stack[-1]
    owner = next((c for c in map(code_category, reversed(sample.stack)) if c is not None), None)
    if "_poll_wrapper" in sample.thread:
        owner = GRPC  # grpc.aio's poller thread: nothing but gRPC runs there
    if is_libc(leaf):
        return f"system calls by {owner or 'the interpreter'}"
    return code_category(leaf) or (owner if owner == GRPC else INTERPRETER)


def shares(samples: Iterable[Sample], key: Callable[[Sample], str | None]) -> list[tuple[str, float]]:
    counts: defaultdict[str, float] = defaultdict(float)
    total = 0.0
    for sample in samples:
        total += sample.seconds
        name = key(sample)
        if name is not None:
            counts[name] += sample.seconds
    return ranked(counts, total)


def ranked(counts: dict[str, float], total: float) -> list[tuple[str, float]]:
    ordered = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    return [(name, seconds / total) for name, seconds in ordered] if total else []


def inclusive_product_shares(samples: list[Sample]) -> list[tuple[str, float]]:
    """Share of samples in which each product function is on the stack (it or its callees running)."""
    counts: defaultdict[str, float] = defaultdict(float)
    total = sum(s.seconds for s in samples)
    for sample in samples:
        for name in {f"{Path(f.file).name}: {f.name}" for f in sample.stack if is_product_function(f)}:
            counts[name] += sample.seconds
    return ranked(counts, total)


def is_product_function(frame: Frame) -> bool:
    # The entry point (cli.py, __main__.py) is under every sample of the main thread: it says nothing.
    return "/extproc/" in frame.file and Path(frame.file).name not in ("cli.py", "__main__.py")


def leaf_name(sample: Sample) -> str:
    leaf = sample.stack[-1]
    return f"{leaf.name} ({Path(leaf.file).name})"


def summarize(samples: list[Sample], cpu_us_per_request: float, top: int = 12) -> dict[str, Any]:
    def with_us(rows: list[tuple[str, float]]) -> list[dict[str, Any]]:
        return [{"name": n, "share": round(s, 4), "us_per_request": round(s * cpu_us_per_request, 1)} for n, s in rows]

    busy = [s for s in samples if not is_waiting(s)]
    return {
        "samples": len(samples),
        "sampled_seconds": round(sum(s.seconds for s in samples), 2),
        "busy_seconds": round(sum(s.seconds for s in busy), 2),
        "categories": with_us(shares(busy, category)),
        "top_leaves": with_us(shares(busy, leaf_name)[:top]),
        "product_inclusive": with_us(inclusive_product_shares(busy)[:top]),
    }


# --- profile.md -----------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], first: str) -> str:
    lines = [f"| {first} | share of samples | ≈ µs per request |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['share'] * 100:.1f}% | {r['us_per_request']:.0f} |" for r in rows]
    return "\n".join(lines)


def interpretation(native: dict[str, Any], cpu_us: float) -> list[str]:
    by_name: dict[str, float] = {c["name"]: float(c["share"]) for c in native["categories"]}

    def total(predicate: Callable[[str], bool]) -> float:
        return sum(share for name, share in by_name.items() if predicate(name))

    # System calls are charged to the library that made them, so each total below includes its own.
    grpc = total(lambda n: GRPC in n)
    loop = total(lambda n: ASYNCIO in n)
    product = total(lambda n: "product:" in n)
    redis_client = total(lambda n: REDIS_PY in n)
    syscalls = total(lambda n: n.startswith("system calls"))
    lines = [
        f"- The processor spends about {cpu_us:.0f} µs of CPU per request. Of the samples, {grpc * 100:.0f}% are "
        f"gRPC's own machinery (grpc.aio's Cython layer, C-core, its poller thread and the system calls they "
        f"make), {loop * 100:.0f}% the asyncio event loop, {redis_client * 100:.0f}% the redis-py client and "
        f"{product * 100:.0f}% the product's own Python code (routing, protocol, accounting); the rest is the "
        "interpreter and other C code.",
        f"- System calls of all kinds (socket reads and writes, epoll, eventfd wake-ups between gRPC's poller "
        f"thread and the event loop) are {syscalls * 100:.0f}% of the samples.",
    ]
    if grpc + loop > 0.5:
        lines.append(
            "- So most of the cost per request is the transport, not the routing decision: every request is an "
            "ext_proc stream with one message each way plus an access-log entry, and each crosses grpc.aio's "
            "thread hand-off and the event loop. Making the routing code faster cannot get far below that floor; "
            "fewer gRPC events per request or a cheaper gRPC server is the lever."
        )
    else:
        lines.append("- Most of the cost is in the product's own code: that is where to optimize first.")
    return lines


def write_profile_md(path: Path, info: dict[str, Any]) -> None:
    native, python = info["native"], info["python"]
    parts = [
        "# Processor profile under load",
        "",
        f"Generated by `python -m bench.run` at {info['generated_at']} on commit `{info['commit']}`. "
        f"System: {info['label']}; load: wrk {info['load']} for {info['seconds']} s per recording after a warm-up; "
        f"py-spy {info['py_spy_version']} at {SAMPLE_RATE_HZ} Hz attached to `processor-0` (pid changes every run).",
        "",
        f"- Without a profiler (this run's main results): {info['baseline_rps']:,.0f} req/s, processor "
        f"{info['baseline_cpu_us']:.0f} µs CPU per request.",
        f"- Python-only recording: {python['rps']:,.0f} req/s, {python['cpu_us']:.0f} µs/request; "
        f"`--native` recording: {native['rps']:,.0f} req/s, {native['cpu_us']:.0f} µs/request (unwinding C stacks "
        "costs the processor time, so shares matter more than absolute µs).",
        "- Shares are of the samples in which a thread was not waiting for events (epoll/select leaves are left "
        "out); ≈ µs per request = share times the processor CPU per request measured (/proc) in that window.",
        f"- Caveat: py-spy samples a thread that is runnable but waiting for a CPU too, at the point where it was "
        f"stopped, so on a saturated machine it over-weights the places where threads give up the CPU (system "
        f"calls that wake another process). Here the `--native` busy samples add up to "
        f"{native['summary']['busy_seconds']:.1f} s while /proc says the processor used "
        f"{native['cpu_seconds']:.1f} s of CPU in that window: read the shares as rough proportions.",
        "",
        "## Where the CPU goes, by library (`--native`)",
        "",
        table(native["summary"]["categories"], "category"),
        "",
        "## Hottest leaf frames (`--native`)",
        "",
        table(native["summary"]["top_leaves"], "frame (library)"),
        "",
        "## Product functions, inclusive (Python-only recording)",
        "",
        "Share of samples in which the function is on the stack (itself or anything it calls, including awaited "
        "Redis and gRPC work that shows up as Python frames).",
        "",
        table(python["summary"]["product_inclusive"], "function"),
        "",
        "## Interpretation",
        "",
        *interpretation(native["summary"], native["cpu_us"]),
        "",
        "Raw recordings (open in https://www.speedscope.app): see `profile` in `results.json` for their paths "
        "(kept in the run's temporary directory, not committed).",
        "",
    ]
    path.write_text("\n".join(parts))


def py_spy_version(py_spy: Path) -> str:
    completed = subprocess.run([str(py_spy), "--version"], capture_output=True, text=True, timeout=30, check=False)
    return completed.stdout.strip().removeprefix("py-spy ").strip() or "unknown"
