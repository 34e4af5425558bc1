"""Run the ext_proc gRPC processor (``python -m extproc serve``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc

from .config import ConfigError, RouterConfig, load_config, redis_endpoint_for_display
from .protocol import ExternalProcessor, add_to_server
from .routing import Router

log = logging.getLogger("extproc.server")

GRPC_HEADROOM_BYTES = 1 << 20  # room for headers and framing beyond the largest accepted body


def grpc_options(config: RouterConfig) -> list[tuple[str, int]]:
    limit = config.max_request_bytes + GRPC_HEADROOM_BYTES
    return [
        # grpcio's 4 MiB default would fail large prompts with "Received message larger than max".
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_concurrent_streams", 100000),
    ]


class ProcessorServer:
    def __init__(self, config_path: str | Path, host: str = "127.0.0.1", port: int = 50051) -> None:
        self.config_path = Path(config_path)
        self.host = host
        self.port = port
        self.config = load_config(self.config_path)
        self.processor = ExternalProcessor(Router(self.config))
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        server = grpc.aio.server(options=grpc_options(self.config))
        add_to_server(server, self.processor)
        bound: int = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server
        self.port = bound
        log.info(
            "processor listening on %s:%d; %d deployments in %d model groups; strategy %s; counters: %s",
            self.host, bound, len(self.config.deployments), len(self.config.groups),
            self.config.routing_strategy, redis_endpoint_for_display(self.config.redis_url),
        )
        return bound

    def reload(self) -> bool:
        """Swap in a new config; a bad one is rejected and the old one keeps serving."""
        try:
            config = load_config(self.config_path)
        except (ConfigError, OSError) as exc:
            log.error("reload rejected, still serving the previous config: %s", exc)
            return False
        self.config = config
        self.processor.set_router(Router(config))
        log.info("reloaded %s: %d deployments", self.config_path, len(config.deployments))
        return True

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await stop.wait()
        log.info("stopping processor")
        await self.stop()


async def serve(config_path: str | Path, host: str, port: int) -> None:
    server = ProcessorServer(config_path, host, port)
    await server.start()
    print(f"processor ready on {host}:{server.port}", flush=True)
    await server.run_until_signalled()
