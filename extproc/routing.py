"""The routing core: classify a request, pick a deployment, and say how Envoy must forward it.

Everything that does not depend on the request (paths, headers, metadata per deployment and operation) is
built once per config, so a decision is a JSON parse, a few dict look-ups and one random draw.
"""

from __future__ import annotations

import hmac
import random
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from . import errors
from .config import Deployment, RouterConfig
from .errors import Reply
from .strategies import ShuffleWeights, shuffle_weights, simple_shuffle

__version__ = "0.1.0"

CLUSTER_HEADER = "x-llm-cluster"
METADATA_NAMESPACE = "llm"

OPERATIONS = ("chat/completions", "completions", "embeddings")
_OPENAI_PATHS = {
    f"{prefix}/{op}": op for prefix in ("/v1", "", "/openai") for op in OPERATIONS
}
_AZURE_PREFIX = "/openai/deployments/"
_MODELS_PATHS = ("/v1/models", "/models", "/openai/models")
_LIVELINESS_PATHS = ("/health/liveliness", "/health/liveness")
_READINESS_PATH = "/health/readiness"


@dataclass(frozen=True, slots=True)
class Flow:
    """What the headers phase learned about an inference request, for the body phase."""

    operation: str
    path_model: str | None  # the Azure form names the model in the path; it wins over the body


@dataclass(frozen=True, slots=True)
class Forward:
    """How Envoy must forward one request to one deployment (prebuilt, shared by all such requests)."""

    deployment: Deployment
    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _Group:
    name: str
    deployments: tuple[Deployment, ...]
    weights: ShuffleWeights
    # forwards[operation][stream][i] for deployment i
    forwards: Mapping[str, tuple[tuple[Forward, ...], tuple[Forward, ...]]]


class Router:
    def __init__(self, config: RouterConfig, rng: random.Random | None = None, cache_backend: str = "memory"):
        self.config = config
        self.rng = rng or random.Random()
        self.cache_backend = cache_backend
        self._groups = {name: self._plan_group(name, deps) for name, deps in config.groups.items()}
        self._master_key = config.master_key.encode() if config.master_key else None
        self._models_reply = errors.json_reply(200, self._model_list(), "models")

    # -- headers phase ---------------------------------------------------------------------------------

    def on_headers(self, method: str, path: str, headers: Mapping[str, str], end_of_stream: bool) -> Flow | Reply:
        route = path.split("?", 1)[0]
        if route in _LIVELINESS_PATHS:
            return errors.json_reply(200, "I'm alive!", "liveliness")
        if route == _READINESS_PATH:
            return errors.json_reply(
                200, {"status": "healthy", "cache": self.cache_backend, "version": __version__}, "readiness"
            )
        if self._master_key is not None and not self._authorized(headers):
            return errors.unauthorized()
        if route in _MODELS_PATHS:
            if method != "GET":
                return errors.method_not_allowed(method, route, "GET")
            return self._models_reply
        flow = self._classify(route)
        if flow is None:
            return errors.not_found(route)
        if method != "POST":
            return errors.method_not_allowed(method, route, "POST")
        if end_of_stream:
            return errors.body_required()
        return flow

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        assert self._master_key is not None
        presented = headers.get("authorization", "")
        if presented[:7].lower() == "bearer ":
            presented = presented[7:].strip()
        else:
            presented = headers.get("api-key", "")
        return hmac.compare_digest(presented.encode(), self._master_key)

    @staticmethod
    def _classify(route: str) -> Flow | None:
        operation = _OPENAI_PATHS.get(route)
        if operation is not None:
            return Flow(operation, None)
        if route.startswith(_AZURE_PREFIX):
            model, _, operation = route[len(_AZURE_PREFIX) :].partition("/")
            if model and operation in OPERATIONS:
                return Flow(operation, model)
        return None

    # -- body phase ------------------------------------------------------------------------------------

    def on_body(self, flow: Flow, body: bytes) -> Forward | Reply:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return errors.invalid_json()
        if not isinstance(payload, dict):
            return errors.invalid_json()
        model = flow.path_model or payload.get("model")
        if not isinstance(model, str) or not model:
            return errors.missing_model()
        group_name = self.config.resolve_group(model)
        group = self._groups.get(group_name) if group_name is not None else None
        if group is None:
            return errors.unknown_model(model, self.config.public_model_names())
        stream = payload.get("stream") is True
        index = simple_shuffle(len(group.deployments), group.weights, self.rng)
        return group.forwards[flow.operation][stream][index]

    # -- built once per config -------------------------------------------------------------------------

    def _plan_group(self, name: str, deployments: tuple[Deployment, ...]) -> _Group:
        forwards = {
            op: (
                tuple(self._forward(dep, op, stream=False) for dep in deployments),
                tuple(self._forward(dep, op, stream=True) for dep in deployments),
            )
            for op in OPERATIONS
        }
        return _Group(name, deployments, shuffle_weights(deployments), forwards)

    def _forward(self, dep: Deployment, operation: str, stream: bool) -> Forward:
        path = f"{dep.base_path}/openai/deployments/{dep.deployment}/{operation}?api-version={dep.api_version}"
        if stream:
            # A stream may run longer than `timeout`; the route's idle timeout bounds the gaps instead
            # (what LiteLLM's httpx read timeout does).
            timeout_ms = 0
        else:
            timeout_ms = round((dep.timeout or self.config.timeout) * 1000)
        return Forward(
            deployment=dep,
            set_headers=(
                (CLUSTER_HEADER, dep.cluster),
                (":path", path),
                ("api-key", dep.api_key),
                ("x-envoy-upstream-rq-timeout-ms", str(timeout_ms)),
            ),
            remove_headers=("authorization",),
            metadata=(
                ("model_id", dep.id),
                ("model_group", dep.model_name),
                ("deployment", dep.deployment),
                ("api_base", dep.api_base),
            ),
        )

    def _model_list(self) -> dict[str, object]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 1677610602, "owned_by": "openai"}
                for name in self.config.public_model_names()
            ],
        }
