"""Time to first SSE event, interleaved: plain Envoy against product set-ups (``python -m bench.ttfb``).

The streaming point of ``bench.run`` in more detail and with more samples: each round sends N sequential
``stream: true`` requests to every system in turn on one keep-alive connection, so all of them see the same
machine. Besides the memory store, it runs usage-based routing on Redis twice: with the streaming deployment
unlimited (its decision does not wait for Redis) and with rpm/tpm set (one Redis round trip before the
request may leave), and the in-memory set-up with ext_proc on grpc.aio instead of the lean listener. It
reports p50/p99 time to first event, their difference to plain Envoy, the processor's mean decision time
(from its /metrics), and Envoy's own account of each product request (a file access log added to the
rendered bootstrap, medians in µs from the start of the request): when the request was read, how long the
ext_proc call took, when the upstream request began, and when the first byte went back to the client.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.load import run_ttfb, stream_body
from bench.systems import ROOT, STREAM_MODEL, start_backends, start_plain_envoy, write_config
from extproc import envoy_render
from extproc.launcher import Stack

# Envoy's per-request timings (µs), written by a file access log this benchmark adds to the product's bootstrap.
TIMINGS = {
    "read": "%COMMON_DURATION(DS_RX_BEG:DS_RX_END:us)%",
    "ext_proc": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_body_total_latency_us)%",
    "upstream_begins": "%COMMON_DURATION(DS_RX_BEG:US_TX_BEG:us)%",
    "upstream_first_byte": "%COMMON_DURATION(US_TX_BEG:US_RX_BEG:us)%",
    "client_first_byte": "%COMMON_DURATION(DS_RX_BEG:DS_TX_BEG:us)%",
}


_RENDER = envoy_render.http_connection_manager


def with_timing_log(path: Path) -> None:
    """Render the following bootstraps with a JSON file access log of TIMINGS at ``path``."""

    def patched(config: envoy_render.RouterConfig, options: envoy_render.RenderOptions) -> dict[str, object]:
        manager = _RENDER(config, options)
        manager["typed_config"]["access_log"].append({
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path), "log_format": {"json_format": TIMINGS},
            },
        })
        return manager

    envoy_render.http_connection_manager = patched  # type: ignore[assignment]


def timing_medians(path: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    medians = {}
    for field in TIMINGS:
        values = [float(row[field]) for row in rows if row.get(field) not in (None, "", "-")]
        medians[field] = statistics.median(values) if values else float("nan")
    return medians


@dataclass(frozen=True)
class Setup:
    name: str
    strategy: str
    redis: bool = False
    stream_limits: bool = False
    lean_ext_proc: bool = True


SETUPS = (
    Setup("memory: simple-shuffle", "simple-shuffle"),
    Setup("Redis: usage-based, stream deployment without limits", "usage-based-routing", redis=True),
    Setup("Redis: usage-based, stream deployment with rpm/tpm", "usage-based-routing", redis=True,
          stream_limits=True),
    Setup("memory: simple-shuffle, ext_proc over grpc.aio", "simple-shuffle", lean_ext_proc=False),
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="per system per round")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="llm-ttfb-"))
    backends = start_backends(run_dir, with_redis=True)
    plain = start_plain_envoy("envoy", backends)
    stacks: dict[str, Stack] = {}
    logs: dict[str, Path] = {}
    try:
        for index, setup in enumerate(SETUPS):
            config = write_config(run_dir / f"setup-{index}.yaml", backends, setup.strategy,
                                  f"ttfb-{index}" if setup.redis else None, stream_limits=setup.stream_limits)
            logs[setup.name] = run_dir / f"setup-{index}-timings.log"
            with_timing_log(logs[setup.name])
            stacks[setup.name] = Stack(config, run_dir=run_dir / f"setup-{index}", env={"PYTHONPATH": str(ROOT)},
                                       lean_ext_proc=setup.lean_ext_proc).start(60)
        body = stream_body(STREAM_MODEL)
        first: dict[str, list[float]] = {"plain Envoy": [], **{name: [] for name in stacks}}
        decisions = {name: [0.0, 0.0] for name in stacks}
        for _ in range(args.rounds):
            result = run_ttfb(plain.stream.port, plain.stream.path, plain.stream.headers, body, args.requests, 10)
            first["plain Envoy"] += result["first_chunk_s"]
            for name, stack in stacks.items():
                before = (stack.metric("llm_routing_decision_seconds_sum"),
                          stack.metric("llm_routing_decision_seconds_count"))
                assert stack.listen_port is not None
                result = run_ttfb(stack.listen_port, "/v1/chat/completions", {}, body, args.requests, 10)
                first[name] += result["first_chunk_s"]
                decisions[name][0] += stack.metric("llm_routing_decision_seconds_sum") - before[0]
                decisions[name][1] += stack.metric("llm_routing_decision_seconds_count") - before[1]
    finally:
        for stack in stacks.values():
            stack.stop()
        plain.stop()
        backends.stop()
    floor = statistics.median(first["plain Envoy"]) * 1000
    print(f"`python -m bench.ttfb --rounds {args.rounds} --requests {args.requests}`: "
          f"{args.rounds} rounds of {args.requests} sequential streams per system\n")
    print("| system | p50 ms | over plain Envoy | p99 ms | decision mean µs |\n|---|---:|---:|---:|---:|")
    for name, samples in first.items():
        p50 = statistics.median(samples) * 1000
        spent, count = decisions.get(name, (0.0, 0.0))
        decision = f"{spent / count * 1e6:.0f}" if count else "—"
        print(f"| {name} | {p50:.2f} | {p50 - floor:+.2f} | {percentile(samples, 0.99) * 1000:.2f} | {decision} |")
    print("\nEnvoy's account of the product's requests (medians, µs from the start of the request; the ext_proc "
          "call's own duration):\n")
    print("| system | request read | ext_proc call | upstream request begins | upstream's first byte after | "
          "first byte to the client |\n|---|---:|---:|---:|---:|---:|")
    for name, path in logs.items():
        medians = timing_medians(path)
        print(f"| {name} | " + " | ".join(f"{medians[field]:.0f}" for field in TIMINGS) + " |")


if __name__ == "__main__":
    sys.exit(main())
