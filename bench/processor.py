"""The processor alone against a do-nothing ext_proc server: how much of the per-request CPU is ours.

``python -m bench.processor`` starts, in turn, a minimal grpc.aio ExternalProcessor (answers with a constant
response, no parsing, no routing) and the real processor (``python -m extproc serve``), driven once through
its grpc.aio port and once through its lean ext_proc listener (h2front.py), and drives each with a grpc.aio
client in this process: one stream per request carrying one message (a ~1 KB chat body with the request
attributes Envoy adds), 16 streams at a time, as Envoy does for a POST. It reports streams per second and
the server process's CPU per stream (utime + stime from /proc). The minimal server's figure is the floor
grpc.aio itself sets; the lean listener's shows what routing, accounting hooks and encoding cost without it
(its streams per second are bounded by the grpcio client driving it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.launcher import free_port
from extproc.protocol import EXT_PROC_ATTRIBUTES

MINIMAL_SERVER = '''
import asyncio, sys
import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
BODY = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()
async def process(requests, context):
    async for request in requests:
        yield BODY
        return
async def main():
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        process, request_deserializer=pb.ProcessingRequest.FromString, response_serializer=lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "envoy.service.ext_proc.v3.ExternalProcessor", {"Process": handler}),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
'''
CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/a, api_base: "https://a.openai.azure.com", api_key: ka}
  - model_name: gpt-4o
    litellm_params: {model: azure/b, api_base: "https://b.openai.azure.com", api_key: kb}
"""
BODY = pb.ProcessingRequest(
    request_body=pb.HttpBody(
        body=orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 900}]}),
        end_of_stream=True,
    ),
    attributes={EXT_PROC_ATTRIBUTES: struct_pb2.Struct(fields={
        "request.path": struct_pb2.Value(string_value="/v1/chat/completions"),
        "request.id": struct_pb2.Value(string_value="0c5e4a8e-7d51-4c1f-9a55-3f6f0b1c2d3e"),
    })},
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, pid: int, streams: int, concurrency: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(
            "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
            request_serializer=pb.ProcessingRequest.SerializeToString,
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                call = method()
                await call.write(BODY)
                await call.read()
                await call.done_writing()

        await asyncio.gather(*(one() for _ in range(300)))  # warm up
        started, cpu = time.monotonic(), cpu_seconds(pid)
        await asyncio.gather(*(one() for _ in range(streams)))
        elapsed, used = time.monotonic() - started, cpu_seconds(pid) - cpu
        return streams / elapsed, used / streams * 1e6


GRPC_AIO = "extproc serve, grpc.aio"
LEAN = "extproc serve, lean HTTP/2 listener"
SERVERS = ("minimal grpc.aio server", GRPC_AIO, LEAN)


def main() -> None:
    workdir = Path(tempfile.mkdtemp())
    (workdir / "minimal.py").write_text(MINIMAL_SERVER)
    (workdir / "config.yaml").write_text(CONFIG)
    print("| server | streams/s | server CPU µs/stream |\n|---|---:|---:|")
    for name in SERVERS * 2:
        port, front_port = free_port(), free_port()
        if name.startswith("minimal"):
            cmd = [sys.executable, str(workdir / "minimal.py"), str(port)]
        else:
            cmd = [sys.executable, "-m", "extproc", "serve", "--config", str(workdir / "config.yaml"),
                   "--port", str(port), "--ext-proc-port", str(front_port)]
            if name == LEAN:
                port = front_port
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            rate, cpu = asyncio.run(drive(port, proc.pid, 3000, 16))
            print(f"| {name} | {rate:,.0f} | {cpu:.0f} |")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
