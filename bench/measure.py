"""One measured point: warm-up, then the load with CPU and Redis counters read before and after.

CPU is utime+stime from /proc per role (processor, envoy, redis, upstream), divided by the requests that
completed in the window. The rest of the machine is accounted for too, so a busy machine is visible in
the results: the load generator's own CPU (wait4), the other idle systems of this benchmark, and
"foreign" CPU (everything else: other people's tests on a shared machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.load import Load, run_load
from bench.procs import machine_busy_seconds, total_cpu_seconds

UPSTREAM_ROLE = "upstream"


@dataclass
class Snapshot:
    at: float
    roles: dict[str, float]
    other_bench: float
    machine_busy: float
    redis_calls: dict[str, int]


def redis_calls(client: redis.Redis | None) -> dict[str, int]:
    """Calls per command since Redis started (INFO commandstats); our own INFO calls left out."""
    if client is None:
        return {}
    stats: dict[str, Any] = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    calls.pop("info", None)
    return calls


def snapshot(roles: dict[str, list[int]], other_pids: list[int], client: redis.Redis | None) -> Snapshot:
    return Snapshot(
        at=time.monotonic(),
        roles={role: total_cpu_seconds(pids) for role, pids in roles.items()},
        other_bench=total_cpu_seconds(other_pids),
        machine_busy=machine_busy_seconds(),
        redis_calls=redis_calls(client),
    )


@dataclass
class Target:
    """What a point needs to know about the system under test."""

    system: str
    port: int
    path: str
    roles: dict[str, list[int]]  # including the upstream mock's pid
    other_pids: list[int]  # every other process this benchmark started
    redis_client: redis.Redis | None


def settle(pids: list[int], idle_cores: float = 0.1, interval: float = 0.25, limit: float = 20.0) -> float:
    """Wait until `pids` are nearly idle (at most `limit` s); returns the seconds waited.

    An overloaded system keeps working through its backlog after the load generator has gone (abandoned
    requests): that work must not be charged to the next window, nor steal CPU from the next system."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        before = total_cpu_seconds(pids)
        time.sleep(interval)
        if (total_cpu_seconds(pids) - before) / interval < idle_cores:
            break
    return time.monotonic() - began


def measure_point(
    target: Target, load: Load, duration: float, warmup: float, files: dict[str, Path],
    before_window: Callable[[], None] | None = None,
) -> dict[str, Any]:
    system_pids = [pid for role, pids in target.roles.items() if role != UPSTREAM_ROLE for pid in pids]
    if warmup > 0:
        run_load(load, target.port, target.path, warmup, files)
    settled_s = settle(system_pids)
    if before_window is not None:
        before_window()  # e.g. attach a profiler, outside the measured window
    load_average = os.getloadavg()[0]
    before = snapshot(target.roles, target.other_pids, target.redis_client)
    result = run_load(load, target.port, target.path, duration, files)
    after = snapshot(target.roles, target.other_pids, target.redis_client)
    return {
        "system": target.system,
        "load": load.name,
        "load_average_1min_at_start": round(load_average, 2),
        "settle_before_s": round(settled_s, 2),
        **result,
        **cpu_figures(before, after, result),
        **redis_figures(before, after, result["completed"]),
    }


def cpu_figures(before: Snapshot, after: Snapshot, result: dict[str, Any]) -> dict[str, Any]:
    completed = max(1, int(result["completed"]))
    elapsed = after.at - before.at
    spent = {role: after.roles[role] - before.roles[role] for role in after.roles}
    other_bench = after.other_bench - before.other_bench
    loadgen = float(result["loadgen_cpu_s"])
    machine = after.machine_busy - before.machine_busy
    per_request = {role: round(seconds / completed * 1e6, 1) for role, seconds in spent.items()}
    system_seconds = sum(s for role, s in spent.items() if role != UPSTREAM_ROLE)
    return {
        "window_s": round(elapsed, 3),
        "cpu_us_per_request": {
            **per_request,
            "system": round(system_seconds / completed * 1e6, 1),
            "loadgen": round(loadgen / completed * 1e6, 1),
        },
        # Average cores busy during the window, by whom. "foreign" is whatever else ran on the machine.
        "cores_busy": {
            **{role: round(seconds / elapsed, 3) for role, seconds in spent.items()},
            "loadgen": round(loadgen / elapsed, 3),
            "other_bench_processes": round(other_bench / elapsed, 3),
            # /proc/stat is tick-sampled while per-process times are exact, so at light load this can come out
            # a little below zero: read it as "about zero".
            "foreign": round(max(0.0, machine - sum(spent.values()) - other_bench - loadgen) / elapsed, 3),
            "machine": round(machine / elapsed, 3),
        },
    }


def redis_figures(before: Snapshot, after: Snapshot, completed: int) -> dict[str, Any]:
    if not after.redis_calls:
        return {}
    delta = {name: calls - before.redis_calls.get(name, 0) for name, calls in after.redis_calls.items()}
    delta = {name: calls for name, calls in delta.items() if calls > 0}
    completed = max(1, completed)
    return {
        "redis": {
            "evalsha_per_request": round(delta.get("evalsha", 0) / completed, 3),
            # Redis counts the commands a script runs, too: this is total work, not round trips.
            "commands_per_request": round(sum(delta.values()) / completed, 2),
            "calls": delta,
        }
    }
