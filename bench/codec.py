"""Codec micro-benchmark: xds-protos (upb) against envoy-data-plane (betterproto2) on one ext_proc request.

One "request" is the protobuf work extproc/protocol.py does for one inference call:

1. parse the ProcessingRequest carrying ``request_headers`` and read every header as the processor does;
2. parse the ProcessingRequest carrying ``request_body`` (~1 KB chat JSON, end_of_stream) and read the body;
3. build and serialize the headers-phase ProcessingResponse (an empty HeadersResponse);
4. build and serialize the body-phase ProcessingResponse (header mutation, clear_route_cache, dynamic metadata).

This is the two-message exchange the processor used before POSTs went to one message (body plus request
attributes, decision as dynamic metadata); it stays the workload because it is a superset of the codec work
per request either way, and the comparison between the two libraries is what this benchmark is for.
Only the codec is timed: no gRPC, no routing, no JSON parsing of the body. The xds-protos half runs in this
interpreter. envoy-data-plane must stay out of the project's venv, so its half runs in a subprocess
(``python -m bench.codec --worker``) inside a cached venv at .bench-venv/codec-dataplane, created on first use.

Run from the repository root:  .venv/bin/python -m bench.codec
It prints a Markdown table on stdout (progress goes to stderr) and writes docs/benchmarks/codec.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATAPLANE_VENV = ROOT / ".bench-venv" / "codec-dataplane"
DATAPLANE_REQUIREMENT = "envoy-data-plane==2.2.0"  # pinned so reruns compare like with like
JSON_OUTPUT = ROOT / "docs" / "benchmarks" / "codec.json"
DEFAULT_REPEAT = 7

# --- the request and response every codec handles (plain data, shared by both interpreters) -----------------

CHAT_BODY: bytes = json.dumps(
    {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "system",
                "content": "You are a careful assistant for an internal engineering team. Answer concisely, cite "
                "the internal runbook section when one applies, and say so plainly when you do not know.",
            },
            {
                "role": "user",
                "content": "Our Envoy ext_proc processor routes chat completions to several Azure OpenAI "
                "deployments. Latency at p99 went up by 40 ms after yesterday's rollout, but only for "
                "streaming requests in the eastus region. Which metrics should I look at first, and what "
                "would distinguish a slow upstream from a slow processor? Please list the checks in the "
                "order you would run them, with the Envoy stats names where possible. We already checked that the "
                "deployments' own latency dashboards look normal and that no quota (429) responses were returned, "
                "so I suspect something between the gateway and the upstream itself.",
            },
        ],
        "temperature": 0.2,
        "top_p": 1,
        "max_tokens": 800,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "n": 1,
        "stream": False,
        "user": "team-platform-oncall",
    },
    separators=(",", ":"),
).encode()

# What Envoy 1.40 sends: every header as key + raw_value bytes, value left empty.
REQUEST_HEADERS: tuple[tuple[str, str], ...] = (
    (":method", "POST"),
    (":path", "/v1/chat/completions"),
    (":authority", "llm-gateway.internal.example.com:10000"),
    (":scheme", "http"),
    ("content-type", "application/json"),
    ("content-length", str(len(CHAT_BODY))),
    ("authorization", "Bearer sk-llm-gw-7Hq2vR9xK4mN8pT1wZ6bC3dF5gJ0aL2e"),
    ("user-agent", "OpenAI/Python 1.54.4"),
    ("x-request-id", "3f2b8c1e-9d4a-4e7b-a6c5-0b1d2e3f4a5b"),
    ("x-forwarded-proto", "http"),
    ("accept", "application/json"),
    ("x-stainless-lang", "python"),
    ("x-stainless-package-version", "1.54.4"),
)

# What the router's Forward for one deployment carries (see extproc/routing.py, Router._forward).
SET_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-llm-cluster", "azure_eastus_gpt_4o"),
    (":path", "/openai/deployments/gpt-4o-eastus/chat/completions?api-version=2024-10-21"),
    ("api-key", "0f9e8d7c6b5a49382716a5b4c3d2e1f0"),
    ("x-envoy-upstream-rq-timeout-ms", "600000"),
)
REMOVE_HEADERS: tuple[str, ...] = ("authorization",)
METADATA: dict[str, dict[str, str]] = {
    "llm": {
        "model_id": "gpt-4o-eastus",
        "model_group": "gpt-4o",
        "deployment": "gpt-4o-eastus",
        "api_base": "https://contoso-eastus.openai.azure.com",
    }
}

STEPS: tuple[tuple[str, str], ...] = (
    ("parse_headers", f"parse `request_headers` ({len(REQUEST_HEADERS)} headers, raw_value)"),
    ("parse_body", f"parse `request_body` ({len(CHAT_BODY)} B JSON, end_of_stream)"),
    ("build_headers_response", "build + serialize headers-phase response"),
    ("build_body_response", "build + serialize body-phase response"),
)


@dataclass(frozen=True)
class Codec:
    """One library's version of the four steps; the parse steps return what the processor extracts."""

    library: str
    versions: dict[str, str]
    parse_headers: Callable[[bytes], tuple[dict[str, str], bool]]
    parse_body: Callable[[bytes], tuple[bytes, bool]]
    build_headers_response: Callable[[], bytes]
    build_body_response: Callable[[], bytes]


@dataclass(frozen=True)
class WireInputs:
    """The two serialized ProcessingRequests, as Envoy would put them on the wire."""

    headers_request: bytes
    body_request: bytes

    def to_json(self) -> dict[str, str]:
        return {
            "headers_request": base64.b64encode(self.headers_request).decode(),
            "body_request": base64.b64encode(self.body_request).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> WireInputs:
        return cls(base64.b64decode(data["headers_request"]), base64.b64decode(data["body_request"]))


# --- xds-protos (upb), the project's codec: mirrors extproc/protocol.py -------------------------------------


def xds_protos_codec() -> Codec:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2
    from google.protobuf.internal import api_implementation

    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

    def parse_headers(data: bytes) -> tuple[dict[str, str], bool]:
        request = pb.ProcessingRequest.FromString(data)
        assert request.WhichOneof("request") == "request_headers"
        message = request.request_headers
        headers: dict[str, str] = {}
        for header in message.headers.headers:
            headers[header.key] = header.raw_value.decode("latin-1") if header.raw_value else header.value
        return headers, message.end_of_stream

    def parse_body(data: bytes) -> tuple[bytes, bool]:
        request = pb.ProcessingRequest.FromString(data)
        assert request.WhichOneof("request") == "request_body"
        return request.request_body.body, request.request_body.end_of_stream

    def build_headers_response() -> bytes:
        return bytes(pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString())

    def header(key: str, value: str) -> base_pb2.HeaderValueOption:
        return base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=overwrite
        )

    def build_body_response() -> bytes:
        dynamic_metadata = struct_pb2.Struct()
        dynamic_metadata.update(METADATA)
        response = pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(
                        set_headers=[header(k, v) for k, v in SET_HEADERS],
                        remove_headers=list(REMOVE_HEADERS),
                    ),
                    clear_route_cache=True,
                )
            ),
            dynamic_metadata=dynamic_metadata,
        )
        return bytes(response.SerializeToString())

    return Codec(
        library="xds-protos",
        versions={
            "xds-protos": metadata.version("xds-protos"),
            "protobuf": metadata.version("protobuf"),
            "protobuf backend": api_implementation.Type(),
        },
        parse_headers=parse_headers,
        parse_body=parse_body,
        build_headers_response=build_headers_response,
        build_body_response=build_body_response,
    )


def xds_protos_wire_inputs() -> WireInputs:
    """Serialize the two requests once with xds-protos; both codecs then parse the very same bytes."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    header_map = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in REQUEST_HEADERS]
    )
    headers_request = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map, end_of_stream=False))
    body_request = pb.ProcessingRequest(request_body=pb.HttpBody(body=CHAT_BODY, end_of_stream=True))
    return WireInputs(bytes(headers_request.SerializeToString()), bytes(body_request.SerializeToString()))


def xds_protos_response_mismatches(codec: Codec, other: dict[str, bytes]) -> list[str]:
    """Names of the responses whose bytes (from another codec) do not decode to what xds-protos builds."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    ours = {
        "build_headers_response": codec.build_headers_response(),
        "build_body_response": codec.build_body_response(),
    }
    decode = pb.ProcessingResponse.FromString
    return [name for name, data in ours.items() if decode(data) != decode(other[name])]


# --- envoy-data-plane (betterproto2): the same steps, idiomatic for that library ---------------------------


def dataplane_codec() -> Codec:
    import betterproto2
    from envoy_data_plane.envoy.config.core.v3 import (
        HeaderValue,
        HeaderValueOption,
        HeaderValueOptionHeaderAppendAction,
    )
    from envoy_data_plane.envoy.service.ext_proc.v3 import (
        BodyResponse,
        CommonResponse,
        HeaderMutation,
        HeadersResponse,
        ProcessingRequest,
        ProcessingResponse,
    )
    from envoy_data_plane.google.protobuf import Struct

    overwrite = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD

    def parse_headers(data: bytes) -> tuple[dict[str, str], bool]:
        request = ProcessingRequest.parse(data)
        phase, message = betterproto2.which_one_of(request, "request")
        assert phase == "request_headers"
        headers: dict[str, str] = {}
        for header in message.headers.headers:
            headers[header.key] = header.raw_value.decode("latin-1") if header.raw_value else header.value
        return headers, bool(message.end_of_stream)

    def parse_body(data: bytes) -> tuple[bytes, bool]:
        request = ProcessingRequest.parse(data)
        phase, message = betterproto2.which_one_of(request, "request")
        assert phase == "request_body"
        return bytes(message.body), bool(message.end_of_stream)

    def build_headers_response() -> bytes:
        return bytes(ProcessingResponse(request_headers=HeadersResponse()))

    def header(key: str, value: str) -> Any:
        return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()), append_action=overwrite)

    def build_body_response() -> bytes:
        response = ProcessingResponse(
            request_body=BodyResponse(
                response=CommonResponse(
                    header_mutation=HeaderMutation(
                        set_headers=[header(k, v) for k, v in SET_HEADERS],
                        remove_headers=list(REMOVE_HEADERS),
                    ),
                    clear_route_cache=True,
                )
            ),
            dynamic_metadata=Struct.from_dict(METADATA),
        )
        return bytes(response)

    try:
        rust_codec = metadata.version("betterproto2-rust-codec")
    except metadata.PackageNotFoundError:
        rust_codec = "not installed (pure Python)"
    return Codec(
        library="envoy-data-plane",
        versions={
            "envoy-data-plane": metadata.version("envoy-data-plane"),
            "betterproto2": metadata.version("betterproto2"),
            "betterproto2-rust-codec": rust_codec,
        },
        parse_headers=parse_headers,
        parse_body=parse_body,
        build_headers_response=build_headers_response,
        build_body_response=build_body_response,
    )


# --- measuring ----------------------------------------------------------------------------------------------


def check_parses(codec: Codec, inputs: WireInputs) -> None:
    """Fail loudly if a codec does not read the inputs back exactly: a fast wrong answer is no answer."""
    headers, headers_end = codec.parse_headers(inputs.headers_request)
    body, body_end = codec.parse_body(inputs.body_request)
    if headers != dict(REQUEST_HEADERS) or headers_end or body != CHAT_BODY or not body_end:
        raise SystemExit(f"{codec.library}: parsed requests differ from what was sent")


def time_call(function: Callable[..., object], argument: bytes | None, repeat: int) -> tuple[float, list[float]]:
    """Median over `repeat` timeit runs of the mean µs per call; each run lasts at least 0.2 s (autorange)."""
    if argument is None:
        timer = timeit.Timer("function()", globals={"function": function})
    else:
        timer = timeit.Timer("function(argument)", globals={"function": function, "argument": argument})
    number, _ = timer.autorange()
    runs = [seconds / number * 1e6 for seconds in timer.repeat(repeat=repeat, number=number)]
    return statistics.median(runs), runs


def measure(codec: Codec, inputs: WireInputs, repeat: int) -> dict[str, Any]:
    check_parses(codec, inputs)
    calls: dict[str, tuple[Callable[..., object], bytes | None]] = {
        "parse_headers": (codec.parse_headers, inputs.headers_request),
        "parse_body": (codec.parse_body, inputs.body_request),
        "build_headers_response": (codec.build_headers_response, None),
        "build_body_response": (codec.build_body_response, None),
    }
    steps: dict[str, dict[str, Any]] = {}
    for step, (function, argument) in calls.items():
        median, runs = time_call(function, argument, repeat)
        steps[step] = {"median_us": median, "runs_us": runs}
    return {
        "library": codec.library,
        "versions": codec.versions,
        "python": platform.python_version(),
        "per_request_us": sum(step["median_us"] for step in steps.values()),
        "steps": steps,
        "responses": {
            "build_headers_response": base64.b64encode(codec.build_headers_response()).decode(),
            "build_body_response": base64.b64encode(codec.build_body_response()).decode(),
        },
    }


def worker(repeat: int) -> None:
    """Subprocess entry point inside the envoy-data-plane venv: inputs as JSON on stdin, result on stdout."""
    inputs = WireInputs.from_json(json.load(sys.stdin))
    json.dump(measure(dataplane_codec(), inputs, repeat), sys.stdout)


# --- the envoy-data-plane venv ------------------------------------------------------------------------------


def dataplane_python(requirement: str) -> Path | None:
    """The cached venv's interpreter with `requirement` installed, creating it on first use; None if impossible."""
    python = DATAPLANE_VENV / "bin" / "python"
    marker = DATAPLANE_VENV / "bench-installed.txt"
    if python.exists() and marker.exists() and marker.read_text().strip() == requirement:
        return python
    log(f"setting up {DATAPLANE_VENV.relative_to(ROOT)} with {requirement} (once; cached afterwards)")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(DATAPLANE_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement], check=True
        )
    except (OSError, subprocess.CalledProcessError) as error:
        reason = f"exit status {error.returncode}" if isinstance(error, subprocess.CalledProcessError) else error
        log(
            f"!! could not install {requirement} into {DATAPLANE_VENV.relative_to(ROOT)} ({reason});"
            " reporting the xds-protos half only"
        )
        return None
    marker.write_text(requirement + "\n")
    return python


def run_dataplane(python: Path, inputs: WireInputs, repeat: int) -> dict[str, Any] | None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    completed = subprocess.run(
        [str(python), "-m", "bench.codec", "--worker", "--repeat", str(repeat)],
        cwd=ROOT,
        env=env,
        input=json.dumps(inputs.to_json()),
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        log(f"!! the envoy-data-plane worker failed (exit {completed.returncode}):\n{completed.stderr}")
        return None
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


# --- reporting ----------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_us(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    baseline = results[0]
    header = ["step", *(f"{r['library']} {r['versions'][r['library']]} (µs)" for r in results)]
    if len(results) > 1:
        header.append(f"ratio {results[1]['library']} / {baseline['library']}")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]

    def row(label: str, values: list[float]) -> list[str]:
        cells = [label, *(format_us(v) for v in values)]
        if len(values) > 1:
            cells.append(f"{values[1] / values[0]:.0f}x")
        return cells

    for step, label in STEPS:
        rows.append(row(label, [r["steps"][step]["median_us"] for r in results]))
    total = row("**per request (sum)**", [r["per_request_us"] for r in results])
    rows.append([f"**{cell}**" if i else cell for i, cell in enumerate(total)])
    return "\n".join("| " + " | ".join(cells) + " |" for cells in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="timeit repetitions per step (median)")
    parser.add_argument("--no-dataplane", action="store_true", help="skip the envoy-data-plane half")
    parser.add_argument("--dataplane-requirement", default=DATAPLANE_REQUIREMENT, help="pip requirement to compare")
    parser.add_argument("--output", type=Path, default=JSON_OUTPUT, help="where to write the JSON results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.repeat)
        return

    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        log(f"!! the machine is busy (1-min load {load_before:.2f} on {os.cpu_count()} CPUs): numbers may be inflated")
    inputs = xds_protos_wire_inputs()
    xds = xds_protos_codec()
    log(f"measuring xds-protos ({args.repeat} repetitions per step)")
    results = [measure(xds, inputs, args.repeat)]
    if not args.no_dataplane:
        python = dataplane_python(args.dataplane_requirement)
        dataplane = run_dataplane(python, inputs, args.repeat) if python else None
        if dataplane is not None:
            responses = {name: base64.b64decode(data) for name, data in dataplane["responses"].items()}
            if mismatches := xds_protos_response_mismatches(xds, responses):
                raise SystemExit(f"envoy-data-plane built different responses than xds-protos: {mismatches}")
            results.append(dataplane)

    machine = {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_1min_before": round(load_before, 2),
    }
    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "repeat": args.repeat,
        "inputs": {
            "request_headers": len(REQUEST_HEADERS),
            "chat_body_bytes": len(CHAT_BODY),
            "headers_request_bytes": len(inputs.headers_request),
            "body_request_bytes": len(inputs.body_request),
        },
        "results": [{k: v for k, v in r.items() if k != "responses"} for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print(markdown_table(results))
    print()
    for r in results:
        print(
            f"- {r['library']}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + f"; Python {r['python']}"
        )
    print(
        f"- CPU: {machine['cpu']} ({machine['cpus']} CPUs, 1-min load {machine['load_1min_before']} at start);"
        f" {machine['implementation']} {machine['python']}; {machine['platform']}"
    )
    print(f"- median of {args.repeat} timeit repetitions per step; results in {display_path(args.output)}")


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
