"""Envoy's deployment clusters served over xDS (CDS) by the processor, so a config reload reaches Envoy
without a restart.

Only the clusters are dynamic: the listener, the route (it names clusters through a header) and the
processor's own cluster stay in the static bootstrap. State of the world: every response carries all
clusters; a new version goes to every open stream at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import envoy.extensions.filters.http.header_mutation.v3.header_mutation_pb2
import envoy.extensions.filters.http.lua.v3.lua_pb2
import envoy.extensions.filters.http.upstream_codec.v3.upstream_codec_pb2
import envoy.extensions.transport_sockets.tls.v3.tls_pb2
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401 - registers the Any types
import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format

from .config import RouterConfig
from .envoy_render import RenderOptions, upstream_clusters

log = logging.getLogger("extproc.xds")

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SERVICE_NAME = "envoy.service.cluster.v3.ClusterDiscoveryService"


class ClusterDiscovery:
    def __init__(self, config: RouterConfig, options: RenderOptions | None = None) -> None:
        self._options = options or RenderOptions()
        self._version = 0
        self._streams: set[asyncio.Queue[discovery_pb2.DiscoveryResponse]] = set()
        self._current = self._response(config)
        self.acked_version = ""

    def _response(self, config: RouterConfig) -> discovery_pb2.DiscoveryResponse:
        self._version += 1
        resources = []
        for cluster in upstream_clusters(config, self._options):
            packed = any_pb2.Any()
            packed.Pack(json_format.ParseDict(cluster, cluster_pb2.Cluster()))
            resources.append(packed)
        version = str(self._version)
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=resources, type_url=CLUSTER_TYPE, nonce=version
        )

    def publish(self, config: RouterConfig) -> str:
        """Send ``config``'s clusters to every connected Envoy; returns the version."""
        self._current = self._response(config)
        for queue in self._streams:
            queue.put_nowait(self._current)
        return str(self._current.version_info)

    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        queue: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()
        self._streams.add(queue)

        async def read() -> None:
            async for request in requests:
                if request.HasField("error_detail"):
                    log.error("Envoy rejected clusters version %s: %s", request.response_nonce,
                              request.error_detail.message)
                elif request.response_nonce:
                    self.acked_version = request.version_info
                elif request.type_url == CLUSTER_TYPE:
                    queue.put_nowait(self._current)  # a new stream asks: send the current state

        reader = asyncio.ensure_future(read())
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return  # Envoy closed the stream
                yield getter.result()
        finally:
            reader.cancel()
            self._streams.discard(queue)


def with_leaving_clusters(old: RouterConfig, new: RouterConfig) -> RouterConfig:
    """``new`` plus the clusters of deployments it drops: requests still routed (or in flight) by the old
    config keep a cluster to go to. They go away at the next reload."""
    clusters = {dep.cluster for dep in new.deployments}
    leaving = tuple(dep for dep in old.deployments if dep.cluster not in clusters)
    if not leaving:
        return new
    old_groups = {dep.model_name: old.groups[dep.model_name] for dep in leaving}
    return replace(new, deployments=new.deployments + leaving, groups={**old_groups, **new.groups})


def add_to_server(server: grpc.aio.Server, discovery: ClusterDiscovery) -> None:
    handler = grpc.stream_stream_rpc_method_handler(
        discovery.stream,
        request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
        response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"StreamClusters": handler}),))
