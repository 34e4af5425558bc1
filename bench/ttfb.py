"""Time to first SSE event, interleaved: plain Envoy against product set-ups (``python -m bench.ttfb``).

The streaming point of ``bench.run`` in more detail and with more samples: each round sends N sequential
``stream: true`` requests to every system in turn on one keep-alive connection, so all of them see the same
machine. Besides the memory store, it runs usage-based routing on Redis twice: with the streaming deployment
unlimited (its decision does not wait for Redis) and with rpm/tpm set (one Redis round trip before the
request may leave), and the in-memory set-up with ext_proc on grpc.aio instead of the lean listener. It
reports p50/p99 time to first event, their difference to plain Envoy, and the processor's mean decision time
(from its /metrics).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.load import run_ttfb, stream_body
from bench.systems import ROOT, STREAM_MODEL, start_backends, start_plain_envoy, write_config
from extproc.launcher import Stack


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
    try:
        for index, setup in enumerate(SETUPS):
            config = write_config(run_dir / f"setup-{index}.yaml", backends, setup.strategy,
                                  f"ttfb-{index}" if setup.redis else None, stream_limits=setup.stream_limits)
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


if __name__ == "__main__":
    sys.exit(main())
