"""Per-decision cost of each routing strategy, in process (``python -m bench.decision``).

Runs the processor's routing decision (JSON parse, alias, strategy, reservation, response encoding) for every
strategy, with the memory store and with a real redis-server started for the run, and reports processor CPU
per decision and Redis commands sent per decision. No Envoy and no gRPC: this isolates the routing work that
the strategies differ in; the end-to-end cost per request is in docs/benchmarks/results.md.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time

import orjson

from extproc.config import parse_config
from extproc.launcher import free_port
from extproc.protocol import ExternalProcessor
from extproc.redis_store import RedisStore
from extproc.routing import Flow, Routed, Router, samples_of
from extproc.store import CounterStore, MemoryStore

CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/a, api_base: "https://a.openai.azure.com", api_key: ka, rpm: 99999999, tpm: 999999999}
  - model_name: gpt-4o
    litellm_params: {model: azure/b, api_base: "https://b.openai.azure.com", api_key: kb, rpm: 99999999, tpm: 999999999}
router_settings: {routing_strategy: STRATEGY}
"""
BODY = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 900}]})
STRATEGIES = ("simple-shuffle", "least-busy", "usage-based-routing", "latency-based-routing")


async def measure(store: CounterStore, strategy: str, n: int) -> float:
    router = Router(parse_config(CONFIG.replace("STRATEGY", strategy), environ={}), store)
    processor = ExternalProcessor(router)
    for i in range(200):  # warm: scripts loaded, caches filled
        await router.on_body(Flow("chat/completions", None, f"w{i}"), BODY)
    started = time.process_time()
    for i in range(n):
        decision = await router.on_body(Flow("chat/completions", None, f"r{i}"), BODY)
        assert isinstance(decision, Routed)
        processor.encode_decision(decision)
    return (time.process_time() - started) / n * 1e6


def commands_processed(port: int) -> int:
    """EVALSHA calls so far: the commands a decision sends (a script's inner calls run inside it)."""
    import redis

    client = redis.Redis(port=port)
    try:
        return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        client.close()


async def main_async() -> None:
    server = shutil.which("redis-server")
    port = free_port()
    proc = None
    if server:
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", tempfile.mkdtemp()], stdout=subprocess.DEVNULL)
        time.sleep(0.3)
    try:
        print("| strategy | memory: CPU µs/decision | Redis: CPU µs/decision | Redis EVALSHA/decision |")
        print("|---|---:|---:|---:|")
        for strategy in STRATEGIES:
            settings = samples_of(parse_config(CONFIG.replace("STRATEGY", strategy), environ={}))
            memory = await measure(MemoryStore(settings), strategy, 20000)
            redis_cell = commands = "n/a"
            if proc is not None:
                store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix=f"bench-{strategy}", samples=settings)
                n = 5000
                before = commands_processed(port)
                cpu = await measure(store, strategy, n)
                redis_cell, commands = f"{cpu:.1f}", f"{(commands_processed(port) - before) / (n + 200):.2f}"
                await store.close()
            print(f"| {strategy} | {memory:.1f} | {redis_cell} | {commands} |")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    asyncio.run(main_async())
