"""Side-by-side benchmark: plain Envoy, the product in four set-ups, and LiteLLM Proxy (`python -m bench.run`).

Everything runs on this machine on loopback, in one invocation: the systems are started once and stay up,
and each repetition visits them in a rotated order so that drift (other work on the machine, thermal,
caches) hits all of them alike. A visit measures each load after a warm-up: wrk closed loop at 16 and 64
connections, a fixed offered rate (bench.openloop), and a few sequential streaming requests for time to
first byte. Upstream is an Envoy `direct_response` (cheap), or the project's mock for streams.
Writes results.json, results.md and throughput_vs_p99.png (and profile.md) into docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from bench import profiling, report
from bench.load import WRK, ClosedLoop, FixedRate, Load, chat_body, run_ttfb, stream_body, write_wrk_script
from bench.measure import UPSTREAM_ROLE, Target, measure_point, settle
from bench.procs import ROOT, http_status
from bench.systems import (
    MODEL,
    STREAM_MODEL,
    Backends,
    RunningSystem,
    litellm_executable,
    litellm_version,
    start_backends,
    start_litellm,
    start_plain_envoy,
    start_product,
    write_config,
)
from extproc.launcher import envoy_binary

DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks"
SCRATCH_OUTPUT = ROOT / ".run" / "bench"  # smoke runs (--quick, --only) must not overwrite the published results
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    kind: str  # "envoy" | "product" | "litellm"
    strategy: str = "simple-shuffle"
    redis: bool = False
    processes: int = 1  # processors for the product, uvicorn workers for LiteLLM
    all_loads: bool = True  # False: only the 16-connection point (a cheap side comparison)
    lean_ext_proc: bool = True  # False: Envoy's ext_proc streams go to grpc.aio, not the lean listener


SPECS = (
    SystemSpec("envoy", "plain Envoy → mock (floor)", "envoy"),
    SystemSpec("shuffle", "product: simple-shuffle, in memory, 1 processor", "product"),
    SystemSpec("usage-redis", "product: usage-based, Redis, 1 processor", "product", "usage-based-routing", True),
    SystemSpec("usage-redis-2p", "product: usage-based, Redis, 2 processors", "product", "usage-based-routing",
               True, 2),
    # The lean ext_proc listener's baseline (h2front.py replaced grpc.aio on the hot path; this keeps it checkable).
    SystemSpec("shuffle-grpc", "product: simple-shuffle, in memory, 1 processor, ext_proc over grpc.aio",
               "product", all_loads=False, lean_ext_proc=False),
    SystemSpec("litellm", "LiteLLM Proxy: simple-shuffle, 2 workers", "litellm", processes=2),
    SystemSpec("litellm-1w", "LiteLLM Proxy: simple-shuffle, 1 worker", "litellm", processes=1, all_loads=False),
)
PROFILED = "usage-redis"


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    repetitions: int
    ttfb_requests: int
    profile_seconds: int
    rate: float
    connections: tuple[int, ...]
    output_dir: Path

    def loads(self, spec: SystemSpec) -> list[Load]:
        closed: list[Load] = [ClosedLoop(c) for c in self.connections]
        return [*closed, FixedRate(self.rate)] if spec.all_loads else closed[:1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per point (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of the same load before each point")
    parser.add_argument("--repetitions", type=int, default=2, help="visits per system, order rotated (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: short points, 1 repetition, no profile")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM Proxy out")
    names = ", ".join(s.name for s in SPECS)
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these systems (repeatable or comma-separated): {names}")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of the processor")
    parser.add_argument("--rate", type=float, default=500.0, help="offered rate of the fixed-rate point (req/s)")
    parser.add_argument("--ttfb-requests", type=int, default=200, help="streaming requests per system in total")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"default {DEFAULT_OUTPUT.relative_to(ROOT)}; {SCRATCH_OUTPUT.relative_to(ROOT)} "
                             "for --quick/--only")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    scratch = args.quick or bool(args.only)
    output_dir = args.output_dir or (SCRATCH_OUTPUT if scratch else DEFAULT_OUTPUT)
    if args.quick:
        return Settings(min(args.duration, 2.0), min(args.warmup, 1.0), 1, min(args.ttfb_requests, 20), 0,
                        args.rate, (16, 64), output_dir)
    return Settings(args.duration, args.warmup, max(1, args.repetitions), args.ttfb_requests,
                    0 if args.no_profile else max(1, round(args.duration)), args.rate, (16, 64), output_dir)


def select_specs(args: argparse.Namespace) -> list[SystemSpec]:
    wanted = {name.strip() for value in args.only for name in value.split(",") if name.strip()}
    unknown = wanted - {s.name for s in SPECS}
    if unknown:
        raise SystemExit(f"unknown system(s) {sorted(unknown)}; choose from {[s.name for s in SPECS]}")
    specs = [s for s in SPECS if not wanted or s.name in wanted]
    if args.skip_litellm:
        specs = [s for s in specs if s.kind != "litellm"]
    if args.quick:
        specs = [s for s in specs if s.all_loads]  # the 1-worker LiteLLM side point is not worth a smoke run
    return specs


def estimate_seconds(specs: list[SystemSpec], settings: Settings) -> float:
    per_point = settings.duration + settings.warmup + 1
    points = sum(len(settings.loads(s)) for s in specs) * settings.repetitions
    profile = 2 * (settings.profile_seconds + settings.warmup + 2) if settings.profile_seconds else 0
    startup = sum(40 if s.kind == "litellm" else 3 for s in specs)
    return points * per_point + profile + startup + 5 * len(specs)


# --- starting -------------------------------------------------------------------------------------------------


def write_configs(backends: Backends, run_dir: Path) -> dict[str, Path]:
    return {
        "shuffle": write_config(run_dir / "shuffle.yaml", backends, "simple-shuffle"),
        "usage-redis": write_config(run_dir / "usage-redis.yaml", backends, "usage-based-routing", "bench-1p"),
        "usage-redis-2p": write_config(run_dir / "usage-redis-2p.yaml", backends, "usage-based-routing", "bench-2p"),
    }


def start_system(spec: SystemSpec, backends: Backends, configs: dict[str, Path], litellm: Path | None) -> RunningSystem:
    if spec.kind == "envoy":
        return start_plain_envoy(spec.name, backends)
    if spec.kind == "product":
        config = configs["shuffle" if spec.name == "shuffle-grpc" else spec.name]
        return start_product(spec.name, config, spec.processes, spec.redis, backends, spec.lean_ext_proc)
    assert litellm is not None
    # LiteLLM gets the very file the product's simple-shuffle set-up uses.
    return start_litellm(spec.name, configs["shuffle"], spec.processes, backends, litellm)


def smoke_check(system: RunningSystem, files: dict[str, Path]) -> str | None:
    """One chat request and one stream must succeed before a system is measured; the reason if not."""
    status = http_status(f"http://127.0.0.1:{system.port}{CHAT_PATH}", files["body"].read_bytes(), timeout=30)
    if status != 200:
        return f"chat request got HTTP {status} (logs: {system.log_hint})"
    try:
        streamed = run_ttfb(system.stream.port, system.stream.path, system.stream.headers,
                            stream_body(STREAM_MODEL), count=1, warmup=0)
    except (OSError, TimeoutError, ValueError) as error:
        return f"streaming request failed: {error!r} (logs: {system.log_hint})"
    if streamed["failures"]:
        return f"streaming request did not get HTTP 200 (logs: {system.log_hint})"
    return None


def start_all(
    specs: list[SystemSpec], backends: Backends, configs: dict[str, Path], litellm: Path | None,
    files: dict[str, Path], exits: contextlib.ExitStack, skipped: dict[str, str],
) -> dict[str, RunningSystem]:
    running: dict[str, RunningSystem] = {}
    for spec in specs:
        log(f"starting {spec.name}: {spec.label}")
        try:
            system = start_system(spec, backends, configs, litellm)
        except Exception as error:
            if spec.kind != "litellm":
                raise
            skipped[spec.name] = f"LiteLLM did not start: {error}"
            log(f"!! skipping {spec.name}: {skipped[spec.name]}")
            continue
        exits.callback(system.stop)
        problem = smoke_check(system, files)
        if problem is not None:
            if spec.kind != "litellm":
                raise RuntimeError(f"{spec.name}: {problem}")
            skipped[spec.name] = problem
            log(f"!! skipping {spec.name}: {problem}")
            continue
        log(f"   {spec.name} up in {system.startup_s:.1f} s on 127.0.0.1:{system.port}")
        running[spec.name] = system
    return running


# --- measuring ------------------------------------------------------------------------------------------------


def all_pids(backends: Backends, running: dict[str, RunningSystem]) -> set[int]:
    pids = {m.pid for m in backends.all()}
    for system in running.values():
        for role_pids in system.roles().values():
            pids.update(role_pids)
    return pids


def target_for(system: RunningSystem, backends: Backends, running: dict[str, RunningSystem]) -> Target:
    roles = {**system.roles(), UPSTREAM_ROLE: [backends.upstream.pid]}
    mine = {pid for pids in roles.values() for pid in pids}
    client = redis.Redis(host="127.0.0.1", port=backends.redis_port) if "redis" in roles else None
    others = sorted(all_pids(backends, running) - mine)
    return Target(system.name, system.port, CHAT_PATH, roles, others, client)


def describe(point: dict[str, Any]) -> str:
    lat, cpu = point["latency_ms"], point["cpu_us_per_request"]
    roles = ", ".join(f"{r} {cpu[r]:.0f}" for r in ("processor", "envoy", "redis") if r in cpu)
    text = (f"{point['rps']:>9,.0f} req/s  p50 {lat['p50']:6.2f}  p99 {lat['p99']:7.2f} ms  "
            f"errors {point['errors']['total']}  CPU µs/req: {roles}  foreign {point['cores_busy']['foreign']:.2f}")
    if "redis" in point:
        text += f"  EVALSHA/req {point['redis']['evalsha_per_request']:.2f}"
    return text


def visit(
    spec: SystemSpec, system: RunningSystem, target: Target, settings: Settings, files: dict[str, Path],
    rep: int, ttfb: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    points = []
    for load in settings.loads(spec):
        point = measure_point(target, load, settings.duration, settings.warmup, files)
        point["repetition"] = rep
        points.append(point)
        log(f"   [{rep + 1}/{settings.repetitions}] {spec.name:<15} {load.name:<8} {describe(point)}")
    settle(target.roles.get("processor", []) + target.roles.get("envoy", []))  # no backlog into the next visit
    if (spec.all_loads or spec.kind == "product") and settings.ttfb_requests:
        count = math.ceil(settings.ttfb_requests / settings.repetitions)
        samples = run_ttfb(system.stream.port, system.stream.path, system.stream.headers,
                           stream_body(STREAM_MODEL), count=count, warmup=10)
        merged = ttfb.setdefault(spec.name, {"headers_s": [], "first_chunk_s": [], "total_s": [], "failures": 0})
        for key in ("headers_s", "first_chunk_s", "total_s"):
            merged[key].extend(samples[key])
        merged["failures"] += samples["failures"]
    return points


def run_repetitions(
    specs: list[SystemSpec], running: dict[str, RunningSystem], backends: Backends, settings: Settings,
    files: dict[str, Path],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    points: list[dict[str, Any]] = []
    ttfb: dict[str, dict[str, Any]] = {}
    order = [s for s in specs if s.name in running]
    for rep in range(settings.repetitions):
        shift = rep % len(order)
        rotated = order[shift:] + order[:shift]
        log(f"repetition {rep + 1}/{settings.repetitions}: {' → '.join(s.name for s in rotated)}")
        for spec in rotated:
            system = running[spec.name]
            points += visit(spec, system, target_for(system, backends, running), settings, files, rep, ttfb)
    return points, ttfb


def run_profiles(
    system: RunningSystem, backends: Backends, running: dict[str, RunningSystem], settings: Settings,
    files: dict[str, Path], run_dir: Path,
) -> dict[str, Any]:
    py_spy, why = profiling.py_spy_executable(log)
    if py_spy is None:
        return {"skipped": why}
    pid = system.roles()["processor"][0]
    result: dict[str, Any] = {"py_spy_version": profiling.py_spy_version(py_spy), "pid": pid}
    for kind in ("python", "native"):
        output = run_dir / f"profile-{kind}.speedscope.json"
        recorder: list[subprocess.Popen[bytes]] = []

        def attach(kind: str = kind, output: Path = output, recorder: list[subprocess.Popen[bytes]] = recorder) -> None:
            recorder.append(profiling.start_recording(py_spy, pid, settings.profile_seconds, output, kind == "native"))
            time.sleep(0.5)  # let py-spy attach before the window opens

        log(f"profiling {system.name} processor-0 with py-spy ({kind}, {settings.profile_seconds} s)")
        point = measure_point(target_for(system, backends, running), ClosedLoop(16), settings.profile_seconds,
                              settings.warmup, files, before_window=attach)
        _, stderr = recorder[0].communicate(timeout=settings.profile_seconds + 60)
        if recorder[0].returncode != 0 or not output.exists():
            return {"skipped": f"py-spy failed (exit {recorder[0].returncode}): {stderr.decode()[-500:]}"}
        cpu_us = point["cpu_us_per_request"]["processor"]
        samples = profiling.load_samples(output)
        result[kind] = {"rps": point["rps"], "cpu_us": cpu_us, "cpu_seconds": cpu_us * point["completed"] / 1e6,
                        "file": str(output), "summary": profiling.summarize(samples, cpu_us)}
        log(f"   {describe(point)}")
    return result


# --- machine and versions -------------------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command_output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "unavailable"
    return (done.stdout or done.stderr).strip()


def git_state() -> dict[str, Any]:
    """HEAD and the changed or new files under extproc/, read when the systems start: the benchmark measures
    the working tree as the processes import it, and others may commit while it runs."""
    commit = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "extproc"],
                            capture_output=True, text=True, timeout=30, check=False).stdout
    changed = [line[3:] for line in status.splitlines() if line.strip()]  # "XY path": no strip() before this
    return {"commit": f"{commit} (with uncommitted changes)" if changed else commit, "changed_files": changed}


def versions(with_litellm: bool) -> dict[str, str]:
    envoy = command_output([envoy_binary(), "--version"]).split("version:")[-1].strip().split("/")[1:2]
    found = {
        "envoy": envoy[0] if envoy else "unknown",
        "python": platform.python_version(),
        "grpcio": metadata.version("grpcio"),
        "redis-server": command_output(["redis-server", "--version"]).split(" v=")[-1].split(" ")[0],
        "wrk": command_output(["wrk", "-v"]).splitlines()[0].split(" [")[0].removeprefix("wrk "),
    }
    if with_litellm:
        found["litellm"] = litellm_version()
    return found


def machine_info(load_before: float, points: list[dict[str, Any]], git: dict[str, Any]) -> dict[str, Any]:
    foreign = [p["cores_busy"]["foreign"] for p in points]
    busiest = max(foreign, default=0.0)
    quiet = load_before < 0.5 and busiest < 0.2
    verdict = ("quiet: no other work ran" if quiet else
               f"not quiet: other processes used up to {busiest:.2f} cores during the points "
               "(see 'foreign cores' per point), so absolute figures are pessimistic")
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "commit": git["commit"],
        "extproc_changes_not_committed": git["changed_files"],
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "foreign_cores_max": round(busiest, 3),
        "verdict": verdict,
    }


# --- main -----------------------------------------------------------------------------------------------------


def prepare_files(run_dir: Path) -> dict[str, Path]:
    body = chat_body(MODEL)
    body_file = run_dir / "chat-body.json"
    body_file.write_bytes(body)
    return {"body": body_file, "wrk_script": write_wrk_script(run_dir / "post.lua", body)}


def prepare_litellm(specs: list[SystemSpec], skipped: dict[str, str]) -> tuple[list[SystemSpec], Path | None]:
    if not any(s.kind == "litellm" for s in specs):
        return specs, None
    executable, why = litellm_executable(log)
    if executable is None:
        for spec in specs:
            if spec.kind == "litellm":
                skipped[spec.name] = why
        log(f"!! skipping LiteLLM: {why}")
        return [s for s in specs if s.kind != "litellm"], None
    return specs, executable


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every process this run started is stopped by the ExitStack."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    began = time.monotonic()
    args = parse_args(argv)
    if not Path(WRK).exists():
        sys.exit(f"{WRK} is missing: the closed-loop load is Debian's wrk (apt-get install -y wrk)")
    settings = settings_from(args)
    skipped: dict[str, str] = {}
    specs, litellm = prepare_litellm(select_specs(args), skipped)
    load_before = os.getloadavg()[0]
    log(f"plan: {', '.join(s.name for s in specs)}; {settings.repetitions} repetition(s) of "
        f"{settings.duration:g} s points; about {estimate_seconds(specs, settings) / 60:.0f} min. "
        f"1-min load average now {load_before:.2f} on {os.cpu_count()} cores.")
    stop_on_sigterm()
    run_dir = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    log(f"logs and configs in {run_dir}")
    files = prepare_files(run_dir)
    git = git_state()
    with contextlib.ExitStack() as exits:
        backends = start_backends(run_dir, with_redis=any(s.redis for s in specs))
        exits.callback(backends.stop)
        configs = write_configs(backends, run_dir)
        running = start_all(specs, backends, configs, litellm, files, exits, skipped)
        points, ttfb = run_repetitions(specs, running, backends, settings, files)
        profile: dict[str, Any] = {}
        if settings.profile_seconds and PROFILED in running:
            profile = run_profiles(running[PROFILED], backends, running, settings, files, run_dir)
        startup = {name: round(system.startup_s, 1) for name, system in running.items()}
    finish(args, settings, specs, points, ttfb, profile, skipped, startup, load_before, began, litellm is not None,
           git)


def finish(
    args: argparse.Namespace, settings: Settings, specs: list[SystemSpec], points: list[dict[str, Any]],
    ttfb: dict[str, dict[str, Any]], profile: dict[str, Any], skipped: dict[str, str], startup: dict[str, float],
    load_before: float, began: float, with_litellm: bool, git: dict[str, Any],
) -> None:
    summary = report.aggregate(points)
    labels = {s.name: s.label for s in specs}
    document = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.run", shlex.join(sys.argv[1:])]).strip(),
        "runtime_s": round(time.monotonic() - began, 1),
        "machine": machine_info(load_before, points, git),
        "versions": versions(with_litellm),
        "settings": settings_document(settings),
        "labels": labels,
        "systems": {s.name: {**asdict(s), "startup_s": startup.get(s.name)} for s in specs},
        "skipped": skipped,
        "summary": summary,
        "ttfb": report.summarize_ttfb(ttfb),
        "targets": report.check_targets(summary, report.summarize_ttfb(ttfb)),
        "points": points,
        "profile": profile,
    }
    output = settings.output_dir
    output.mkdir(parents=True, exist_ok=True)
    report.write_json(output / "results.json", document)
    report.write_markdown(output / "results.md", document)
    if why := report.write_plot(output / "throughput_vs_p99.png", summary, labels):
        log(f"!! {why}")
    if profile.get("native") and profile.get("python"):
        write_profile(output / "profile.md", document, summary)
    elif profile.get("skipped"):
        log(f"!! profile skipped: {profile['skipped']}")
    print((output / "results.md").read_text())
    log(f"wrote {output} in {document['runtime_s']:.0f} s")


def write_profile(path: Path, document: dict[str, Any], summary: dict[str, Any]) -> None:
    profile = document["profile"]
    baseline = summary.get(PROFILED, {}).get("c16", {})
    profiling.write_profile_md(path, {
        **profile,
        "generated_at": document["generated_at"],
        "commit": document["machine"]["commit"],
        "label": document["labels"][PROFILED],
        "load": "-t2 -c16",
        "seconds": document["settings"]["profile_seconds"],
        "baseline_rps": baseline.get("rps", math.nan),
        "baseline_cpu_us": baseline.get("cpu_us_per_request", {}).get("processor", math.nan),
    })


def settings_document(settings: Settings) -> dict[str, Any]:
    rate = f"rate{settings.rate:g}"
    titles = {f"c{c}": f"Closed loop, {c} connections (wrk -t2 -c{c})" for c in settings.connections}
    titles[rate] = f"Fixed offered rate, {settings.rate:g} req/s (bench.openloop)"
    return {
        "duration_s": settings.duration,
        "warmup_s": settings.warmup,
        "repetitions": settings.repetitions,
        "ttfb_requests": settings.ttfb_requests,
        "profile_seconds": settings.profile_seconds,
        "offered_rate": settings.rate,
        "connections": list(settings.connections),
        "load_titles": titles,
        "load_description": (
            f"POST {CHAT_PATH} with a {len(chat_body(MODEL))}-byte chat body to model group '{MODEL}' (two "
            "deployments on an Envoy direct_response upstream returning an Azure chat.completion with usage); "
            "closed loop: wrk 4.1 with a Lua done() reporting its percentiles, --timeout 10s; fixed rate: "
            "bench.openloop (asyncio, evenly spaced sends on keep-alive connections, a new connection "
            "whenever none is idle; latency from send to the last byte; send_lag_ms in results.json shows "
            "the schedule held within about 1 ms)."
        ),
    }


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted: every process this run started has been stopped")
        sys.exit(130)
