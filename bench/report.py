"""Aggregate the points over repetitions and write results.json, results.md and throughput_vs_p99.png."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.stats import median, percentiles_ms

ENVOY = "envoy"  # the floor
LITELLM = "litellm"  # LiteLLM Proxy with 2 workers
PRODUCT_SYSTEMS = ("shuffle", "usage-redis", "usage-redis-2p")

# Targets the product is held to (from the task that asked for this benchmark).
TARGET_RATIO_TO_LITELLM = 15.0
TARGET_P99_MS = 10.0
TARGET_PROCESSOR_US = 150.0
TARGET_TTFB_EXCESS_MS = 1.0  # streams: time to first event within this of plain Envoy (p50)
X = "\N{MULTIPLICATION SIGN}"  # by name: the literal sign is flagged as a confusable "x" (RUF001)


# --- aggregation ----------------------------------------------------------------------------------------------


def aggregate(points: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """summary[system][load]: the median over repetitions of every figure; errors are summed."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for point in points:
        grouped.setdefault((point["system"], point["load"]), []).append(point)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for (system, load), reps in grouped.items():
        summary.setdefault(system, {})[load] = aggregate_reps(reps)
    return summary


def _median_of(reps: list[dict[str, Any]], *path: str) -> float:
    """Median over repetitions of the figure at `path` (missing counts as NaN and is left out)."""
    values = []
    for rep in reps:
        value: Any = rep
        for key in path:
            value = value.get(key, math.nan) if isinstance(value, dict) else math.nan
        values.append(float(value))
    return median(values)


def aggregate_reps(reps: list[dict[str, Any]]) -> dict[str, Any]:
    roles = sorted({role for r in reps for role in r["cpu_us_per_request"]})
    result: dict[str, Any] = {
        "repetitions": len(reps),
        "rps": _median_of(reps, "rps"),
        "rps_each": [round(r["rps"], 1) for r in reps],
        "latency_ms": {p: _median_of(reps, "latency_ms", p) for p in ("p50", "p90", "p99")},
        "errors": sum(int(r["errors"]["total"]) for r in reps),
        "completed": sum(int(r["completed"]) for r in reps),
        "cpu_us_per_request": {role: _median_of(reps, "cpu_us_per_request", role) for role in roles},
        "foreign_cores": _median_of(reps, "cores_busy", "foreign"),
        "foreign_each": [r["cores_busy"]["foreign"] for r in reps],
        "load_average_1min": _median_of(reps, "load_average_1min_at_start"),
    }
    if all("redis" in r for r in reps):
        result["redis"] = {
            key: _median_of(reps, "redis", key) for key in ("evalsha_per_request", "commands_per_request")
        }
    if all("offered_rps" in r for r in reps):
        result["offered_rps"] = reps[0]["offered_rps"]
        result["send_lag_p99_ms"] = _median_of(reps, "send_lag_ms", "p99")
    return result


def summarize_ttfb(samples: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        system: {
            "requests": len(data["first_chunk_s"]),
            "failures": data["failures"],
            "to_headers_ms": percentiles_ms(data["headers_s"]),
            "to_first_chunk_ms": percentiles_ms(data["first_chunk_s"]),
            "to_end_ms": percentiles_ms(data["total_s"]),
        }
        for system, data in samples.items()
    }


# --- targets --------------------------------------------------------------------------------------------------


def check_targets(
    summary: dict[str, dict[str, dict[str, Any]]], ttfb: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    product = summary.get("usage-redis", {}).get("c16")
    litellm = summary.get(LITELLM, {}).get("c16")
    if product and litellm:
        ratio = product["rps"] / litellm["rps"]
        # Also the ratio of the repetitions least disturbed by other work on the machine.
        quiet = _least_disturbed(product) / _least_disturbed(litellm)
        checks.append(_check(
            f"usage-based on Redis, 16 connections: throughput ≥ 15{X} LiteLLM (2 workers)",
            f"{ratio:.1f}{X} ({product['rps']:,.0f} vs {litellm['rps']:,.0f} req/s); {quiet:.1f}{X} between the "
            "repetitions with the least foreign CPU", ratio >= TARGET_RATIO_TO_LITELLM,
        ))
    for system in PRODUCT_SYSTEMS:
        point = summary.get(system, {}).get("c16")
        if not point:
            continue
        p99 = point["latency_ms"]["p99"]
        checks.append(_check(f"{system}, 16 connections: p99 ≤ 10 ms", f"{p99:.1f} ms", p99 <= TARGET_P99_MS))
        cpu = point["cpu_us_per_request"].get("processor", math.nan)
        checks.append(_check(
            f"{system}, 16 connections: processor CPU ≤ 150 µs per request", f"{cpu:.0f} µs",
            cpu <= TARGET_PROCESSOR_US,
        ))
    floor = (ttfb or {}).get(ENVOY)
    for system in PRODUCT_SYSTEMS:
        streamed = (ttfb or {}).get(system)
        if not floor or not streamed:
            continue
        excess = streamed["to_first_chunk_ms"]["p50"] - floor["to_first_chunk_ms"]["p50"]
        checks.append(_check(
            f"{system}, streams: time to first event ≤ plain Envoy + 1 ms (p50)",
            f"+{excess:.2f} ms ({streamed['to_first_chunk_ms']['p50']:.2f} vs {floor['to_first_chunk_ms']['p50']:.2f})",
            excess <= TARGET_TTFB_EXCESS_MS,
        ))
    return checks


def _least_disturbed(point: dict[str, Any]) -> float:
    pairs = sorted(zip(point["foreign_each"], point["rps_each"], strict=True))
    return float(pairs[0][1])


def _check(target: str, measured: str, met: bool) -> dict[str, Any]:
    return {"target": target, "measured": measured, "met": met}


# --- Markdown -------------------------------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(value: float, base: float | None) -> str:
    if base is None or math.isnan(base) or base == 0 or math.isnan(value):
        return "—"
    r = value / base
    if r >= 10:
        return f"{r:,.0f}{X}"
    return f"{r:.2f}{X}" if r >= 0.1 else f"{r:.2g}{X}"  # two significant digits for small ratios


def cell(value: float, envoy: float | None, litellm: float | None, digits: int = 1) -> str:
    return f"{fmt(value, digits)} ({ratio(value, envoy)} / {ratio(value, litellm)})"


METRICS: list[tuple[str, Callable[[dict[str, Any]], float], int]] = [
    ("req/s", lambda p: p["rps"], 0),
    ("p50 ms", lambda p: p["latency_ms"]["p50"], 2),
    ("p90 ms", lambda p: p["latency_ms"]["p90"], 2),
    ("p99 ms", lambda p: p["latency_ms"]["p99"], 2),
    ("system CPU µs/req", lambda p: p["cpu_us_per_request"].get("system", math.nan), 0),
    ("processor CPU µs/req", lambda p: p["cpu_us_per_request"].get("processor", math.nan), 0),
    ("Envoy CPU µs/req", lambda p: p["cpu_us_per_request"].get("envoy", math.nan), 0),
]


def load_table(load: str, summary: dict[str, dict[str, dict[str, Any]]], labels: dict[str, str]) -> str:
    envoy = summary.get(ENVOY, {}).get(load)
    litellm = summary.get(LITELLM, {}).get(load)
    header = ["system", *(name for name, _, _ in METRICS), "errors", "Redis EVALSHA/req", "foreign cores",
              "per repetition: req/s (foreign cores)"]
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for system, loads in summary.items():
        point = loads.get(load)
        if point is None:
            continue
        cells = [labels.get(system, system)]
        for _, get, digits in METRICS:
            cells.append(cell(get(point), get(envoy) if envoy else None, get(litellm) if litellm else None, digits))
        if point.get("offered_rps") and point["rps"] < 0.95 * point["offered_rps"]:
            cells[1] += " **saturated**"  # could not keep up with the offered rate: its queue grew all along
        cells.append(str(point["errors"]))
        cells.append(fmt(point["redis"]["evalsha_per_request"], 2) if "redis" in point else "—")
        cells.append(fmt(point["foreign_cores"], 2))
        cells.append(" · ".join(f"{fmt(r, 0)} ({fmt(f, 2)})" for r, f in zip(point["rps_each"], point["foreign_each"],
                                                                             strict=True)))
        rows.append(cells)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def ttfb_table(ttfb: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    envoy, litellm = ttfb.get(ENVOY), ttfb.get(LITELLM)
    rows = [["system", "requests", "p50 ms", "p99 ms", "headers p50 ms", "whole stream p50 ms"],
            ["---", "---:", "---:", "---:", "---:", "---:"]]
    for system, data in ttfb.items():
        first = data["to_first_chunk_ms"]

        def pick(d: dict[str, Any] | None, key: str) -> float | None:
            return d["to_first_chunk_ms"][key] if d else None

        rows.append([
            labels.get(system, system), f"{data['requests']} ({data['failures']} failed)",
            cell(first["p50"], pick(envoy, "p50"), pick(litellm, "p50"), 2),
            cell(first["p99"], pick(envoy, "p99"), pick(litellm, "p99"), 2),
            fmt(data["to_headers_ms"]["p50"], 2), fmt(data["to_end_ms"]["p50"], 2),
        ])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def targets_list(checks: Sequence[dict[str, Any]]) -> str:
    return "\n".join(
        f"- {'met' if c['met'] else '**missed**'}: {c['target']} — measured {c['measured']}" for c in checks
    )


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    summary, labels = report["summary"], report["labels"]
    settings, machine = report["settings"], report["machine"]
    parts = [
        "# Side-by-side benchmark: plain Envoy, the product, LiteLLM Proxy",
        "",
        f"Generated by `python -m bench.run` at {report['generated_at']} on commit `{machine['commit']}`. "
        "Raw figures, every repetition and the machine details are in `results.json`.",
        "",
        "Each cell: the value, then its ratio to plain Envoy and to LiteLLM Proxy with 2 workers at the same "
        f"load (`value ({X}Envoy / {X}LiteLLM)`). Values are medians over "
        f"{settings['repetitions']} repetitions ({settings['duration_s']:g} s each after a "
        f"{settings['warmup_s']:g} s warm-up; systems interleaved). Errors are summed over repetitions. "
        "CPU per request is utime+stime from /proc over the measured window divided by completed requests; "
        "*system* = everything the system runs (processors + Envoy + Redis, or LiteLLM's processes), not the "
        "upstream mock nor the load generator. *Foreign cores*: CPU used during the window by processes this "
        "benchmark did not start (other people's work on a shared machine).",
        "",
    ]
    for load, title in settings["load_titles"].items():
        parts += [f"## {title}", "", load_table(load, summary, labels), ""]
    if report.get("ttfb"):
        parts += [
            "## Streaming: time to first SSE event",
            "",
            f"{settings['ttfb_requests']} sequential `stream: true` chat requests per system on one keep-alive "
            "connection, upstream = the project's mock (`extproc.mock_azure`), which sends its first event "
            f"at once. Cells: `value ({X}Envoy / {X}LiteLLM)`.",
            "",
            ttfb_table(report["ttfb"], labels),
            "",
        ]
    parts += ["## Targets", "", targets_list(report["targets"]) or "(not evaluated: systems missing)", ""]
    parts += ["## Machine and versions", "", *machine_lines(report), ""]
    if report.get("skipped"):
        parts += ["## Skipped", "", *(f"- {name}: {why}" for name, why in report["skipped"].items()), ""]
    path.write_text("\n".join(parts))


def machine_lines(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    lines = [
        f"- CPU: {m['cpu_model']}, {m['cores']} cores; {m['platform']}",
        f"- Load average (1 min): {m['load_average_before']} before, {m['load_average_after']} after; "
        f"{m['verdict']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- Command: `{report['command']}`; total runtime {report['runtime_s']:.0f} s",
        "- Load: " + report["settings"]["load_description"],
    ]
    return lines


# --- plot -----------------------------------------------------------------------------------------------------


def write_plot(path: Path, summary: dict[str, dict[str, dict[str, Any]]], labels: dict[str, str]) -> str | None:
    """Throughput against p99 per system (one marker per load). Returns why not, if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this venv: no plot"
    figure, axes = plt.subplots(figsize=(9, 6))
    for system, loads in summary.items():
        # Lightest load first (the fixed rate), then 16 and 64 connections: the line follows rising load.
        names = sorted(loads, key=lambda name: (name.startswith("c"), int(name[1:]) if name[1:].isdigit() else 0))
        xs = [loads[n]["rps"] for n in names]
        ys = [loads[n]["latency_ms"]["p99"] for n in names]
        axes.plot(xs, ys, marker="o", linestyle=":", label=labels.get(system, system))
        for name, x, y in zip(names, xs, ys, strict=True):
            axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("throughput (req/s, log)")
    axes.set_ylabel("p99 latency (ms, log)")
    axes.set_title("Throughput vs p99 (c16/c64: wrk closed loop; rate: fixed offered rate)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
