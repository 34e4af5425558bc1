"""Run the ext_proc gRPC processor (``python -m extproc serve``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc

from . import accounting, xds
from .config import ConfigError, RouterConfig, load_config, redis_endpoint_for_display
from .h2front import ExtProcFront
from .metrics import Metrics, serve_metrics
from .protocol import ExternalProcessor, add_to_server
from .routing import Router, samples_of
from .store import CounterStore, FallbackStore, MemoryStore

log = logging.getLogger("extproc.server")

GRPC_HEADROOM_BYTES = 1 << 20
# How long a reload waits between publishing the clusters and routing to them. Envoy applies a CDS update in
# milliseconds; the margin covers processors that do not hold Envoy's CDS stream and cannot see its ack.
CLUSTER_SETTLE_S = 1.0  # room for headers and framing beyond the largest accepted body


def grpc_options(config: RouterConfig) -> list[tuple[str, int]]:
    limit = config.max_request_bytes + GRPC_HEADROOM_BYTES
    return [
        # grpcio's 4 MiB default would fail large prompts with "Received message larger than max".
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_concurrent_streams", 100000),
    ]


class ProcessorServer:
    def __init__(
        self, config_path: str | Path, host: str = "127.0.0.1", port: int = 50051, metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1", socket_path: str | None = None,
        ext_proc_port: int | None = None, ext_proc_socket: str | None = None,
    ) -> None:
        self.metrics_host = metrics_host
        self.socket_path = socket_path  # a Unix socket instead of host:port
        self.config_path = Path(config_path)
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.metrics = Metrics()
        self._metrics_server: asyncio.Server | None = None
        self.config = load_config(self.config_path)
        self.store = make_store(self.config)
        self.processor = ExternalProcessor(Router(self.config, self.store), self.metrics)
        self.access_log = accounting.AccessLogReceiver(lambda: self.processor.router, self.metrics)
        self.discovery = xds.ClusterDiscovery(self.config)
        self._server: grpc.aio.Server | None = None
        # The lean ext_proc listener (h2front.py) the rendered Envoy sends its ext_proc streams to; grpc.aio
        # serves ext_proc as well, at the main address, for an Envoy configured that way.
        self.ext_proc_port = ext_proc_port
        self.ext_proc_socket = ext_proc_socket
        self.front = ExtProcFront(
            self.processor, self.access_log, self.config.max_request_bytes + GRPC_HEADROOM_BYTES
        )

    async def start(self) -> int:
        self.store.start()
        server = grpc.aio.server(options=grpc_options(self.config))
        add_to_server(server, self.processor)
        accounting.add_to_server(server, self.access_log)
        xds.add_to_server(server, self.discovery)
        if self.socket_path is not None:
            Path(self.socket_path).unlink(missing_ok=True)  # left behind by a processor that was killed
            server.add_insecure_port(f"unix:{self.socket_path}")
            bound = 0
        else:
            bound = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server
        self.port = bound
        if self.ext_proc_socket is not None:
            await self.front.start_unix(self.ext_proc_socket)
        elif self.ext_proc_port is not None:
            self.ext_proc_port = await self.front.start_tcp(self.host, self.ext_proc_port)
        if self.metrics_port is not None:
            # Loopback by default: metrics name deployments and usage, not for the open network.
            self._metrics_server = await serve_metrics(
                self.metrics, lambda: self.processor.router, self.metrics_host, self.metrics_port
            )
            self.metrics_port = self._metrics_server.sockets[0].getsockname()[1]
        log.info(
            "processor listening on %s; %d deployments in %d model groups; strategy %s; counters: %s",
            self.address, len(self.config.deployments), len(self.config.groups),
            self.config.routing_strategy, redis_endpoint_for_display(self.config.redis_url),
        )
        return bound

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path is not None else f"{self.host}:{self.port}"

    @property
    def ext_proc_address(self) -> str | None:
        if self.ext_proc_socket is not None:
            return f"unix:{self.ext_proc_socket}"
        return f"{self.host}:{self.ext_proc_port}" if self.ext_proc_port is not None else None

    def reload(self) -> bool:
        """Apply an edited config without failing a request; a bad one is rejected and the old one serves on.

        Envoy first gets clusters for the old and the new deployments (requests routed by either config find
        theirs); routing switches to the new config once Envoy has had time to apply them."""
        try:
            config = load_config(self.config_path)
        except (ConfigError, OSError) as exc:
            log.error("reload rejected, still serving the previous config: %s", exc)
            self.metrics.rejected_reloads += 1
            return False
        if config.redis_url != self.config.redis_url:
            log.warning("redis settings changed: restart the processor to use them; keeping the current store")
        version = self.discovery.publish(xds.with_leaving_clusters(self.config, config))
        self.config = config
        asyncio.get_running_loop().call_later(CLUSTER_SETTLE_S, self._switch, config, version)
        return True

    def _switch(self, config: RouterConfig, version: str) -> None:
        if config is not self.config:
            return  # a newer reload superseded this one
        self.processor.set_router(Router(config, self.store))
        self.metrics.generation += 1
        log.info("reloaded %s: %d deployments (clusters version %s, Envoy acked %s)", self.config_path,
                 len(config.deployments), version, self.discovery.acked_version or "none here")

    async def stop(self, grace: float = 5.0) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        await self.front.stop(grace)
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.store.close()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await stop.wait()
        log.info("stopping processor")
        await self.stop()


def make_store(config: RouterConfig) -> CounterStore:
    if config.redis_url:
        from redis.exceptions import RedisError

        from .redis_store import RedisStore

        redis = RedisStore(config.redis_url, prefix=config.redis_key_prefix, samples=samples_of(config))
        return FallbackStore(redis, MemoryStore(samples_of(config)), errors=(RedisError, OSError, TimeoutError))
    return MemoryStore(samples_of(config))


async def serve(
    config_path: str | Path, host: str, port: int, metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
    socket_path: str | None = None, ext_proc_port: int | None = None, ext_proc_socket: str | None = None,
) -> None:
    server = ProcessorServer(
        config_path, host, port, metrics_port, metrics_host, socket_path, ext_proc_port, ext_proc_socket
    )
    await server.start()
    metrics = f", metrics on http://{metrics_host}:{server.metrics_port}/metrics" if metrics_port is not None else ""
    front = f", ext_proc on {server.ext_proc_address}" if server.ext_proc_address is not None else ""
    print(f"processor ready on {server.address}{front}{metrics}", flush=True)
    await server.run_until_signalled()
