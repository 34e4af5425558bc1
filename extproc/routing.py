"""The routing core: classify a request, pick a deployment, and say how Envoy must forward it.

Everything that does not depend on the request (paths, headers, metadata per deployment and operation) is
built once per config, so a decision is a JSON parse, a few dict look-ups and one random draw.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from . import errors
from .config import Deployment, RouterConfig
from .cooldown import failure_for
from .errors import Reply
from .store import Candidate, CounterStore, DeploymentState, MemoryStore, Outcome, Reservation, SampleSettings
from .strategies import (
    ShuffleWeights,
    order_latency_based,
    order_least_busy,
    order_simple_shuffle,
    order_usage_based,
    shuffle_weights,
)
from .tokens import estimate_input_tokens

__version__ = "0.1.0"

CLUSTER_HEADER = "x-llm-cluster"
METADATA_NAMESPACE = "llm"  # per-request routing facts (dynamic metadata)
KEYS_NAMESPACE = "llm_keys"  # the group's api-keys by slot, per request: keys never sit in Envoy's config
ENDPOINT_NAMESPACE = "llm"  # per-endpoint facts in the rendered clusters (host metadata)

OPERATIONS = ("chat/completions", "completions", "embeddings")
_OPENAI_PATHS = {
    f"{prefix}/{op}": op for prefix in ("/v1", "", "/openai") for op in OPERATIONS
}
_AZURE_PREFIX = "/openai/deployments/"
_MODELS_PATHS = ("/v1/models", "/models", "/openai/models")
_LIVELINESS_PATHS = ("/health/liveliness", "/health/liveness")
_READINESS_PATH = "/health/readiness"
# Longer than any decision can take: Envoy's ext_proc message timeout (2 s) and the Redis timeout (2 s).
ORPHAN_RELEASE_DELAY_S = 3.0


@dataclass(slots=True)  # not frozen: one per request (see Routed)
class Flow:
    """What the request's headers say about an inference call (path, request id), for the decision."""

    operation: str
    path_model: str | None  # the Azure form names the model in the path; it wins over the body
    request_id: str  # Envoy's x-request-id: its access log reports it even if our decision never lands


MetadataValue = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Forward:
    """How Envoy must forward one request to one deployment (prebuilt, shared by all such requests)."""

    deployment: Deployment
    # cluster and timeouts, as dynamic metadata: Envoy's request-side Lua turns them into routing headers
    routing: Mapping[str, str]
    keys: tuple[tuple[str, str], ...]  # key slot -> api-key for every deployment an attempt may reach
    # The dynamic metadata every request sent this way carries (routing, deployment facts, stream or not)
    metadata: Mapping[str, MetadataValue]


# Not frozen: a frozen dataclass sets each field through object.__setattr__ (~1.5 µs per instance here), and
# a decision is made every request.
@dataclass(slots=True)
class Routed:
    """A decision: the prebuilt forwarding plan plus what is specific to this request.

    Both become Envoy dynamic metadata (``metadata``): response headers are rendered from it, and Envoy's
    access log brings it back to the processor when the request ends (request id, reserved tokens).
    """

    forward: Forward
    operation: str
    request_id: str
    tokens: int
    rates: dict[str, str]  # the x-ratelimit-* figures (strings: Envoy would print numbers as doubles)

    @property
    def request_metadata(self) -> dict[str, MetadataValue]:
        """The per-request part of the metadata (the operation is encoded with the forward's part)."""
        return {"request_id": self.request_id, "tokens": self.tokens, **self.rates}

    @property
    def metadata(self) -> dict[str, MetadataValue]:
        return {**self.forward.metadata, "operation": self.operation, **self.request_metadata}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream attempt as Envoy's upstream log reports it (status 0: no response, e.g. a reset)."""

    group: str
    key: str
    status: int
    retry_after_s: float | None


@dataclass(frozen=True, slots=True)
class _Group:
    name: str
    deployments: tuple[Deployment, ...]
    candidates: tuple[Candidate, ...]
    weights: ShuffleWeights
    # forwards[stream][i] for deployment i (the operation travels as metadata: paths are set per attempt)
    forwards: tuple[tuple[Forward, ...], tuple[Forward, ...]]
    rpm_limit: int  # sum over deployments that set rpm (0: none does), for x-ratelimit-* headers
    tpm_limit: int


class Router:
    def __init__(self, config: RouterConfig, store: CounterStore | None = None, rng: random.Random | None = None):
        self.config = config
        self.store = store or MemoryStore(samples_of(config))
        self.rng = rng or random.Random()
        self._groups = {name: self._plan_group(name, deps) for name, deps in config.groups.items()}
        prefix = os.urandom(5).hex()  # for requests without x-request-id (Envoy normally sets one)
        self._request_ids = (f"{prefix}-{n}" for n in itertools.count())
        self._background: set[asyncio.Task[None]] = set()
        retries = config.num_retries + 1
        self._lease_s = (config.timeout * retries + 30.0, max(config.timeout * retries + 30.0, 3600.0))
        self._master_key = config.master_key.encode() if config.master_key else None
        self._deployments_by_id = {dep.id: dep for dep in config.deployments}
        self._models_reply = errors.json_reply(200, self._model_list(), "models")

    def groups(self) -> Mapping[str, _Group]:
        return self._groups

    # -- headers: path, method, auth (every request) ---------------------------------------------------

    def on_headers(self, method: str, path: str, headers: Mapping[str, str], end_of_stream: bool) -> Flow | Reply:
        route = path.split("?", 1)[0]
        if route in _LIVELINESS_PATHS:
            return errors.json_reply(200, "I'm alive!", "liveliness")
        if route == _READINESS_PATH:
            return errors.json_reply(
                200, {"status": "healthy", "cache": self.store.backend, "version": __version__}, "readiness"
            )
        if self._master_key is not None and not self._authorized(headers):
            return errors.unauthorized()
        if route in _MODELS_PATHS:
            if method != "GET":
                return errors.method_not_allowed(method, route, "GET")
            return self._models_reply
        classified = self._classify(route)
        if classified is None:
            return errors.not_found(route)
        if method != "POST":
            return errors.method_not_allowed(method, route, "POST")
        if end_of_stream:
            return errors.body_required()
        operation, path_model = classified
        return Flow(operation, path_model, headers.get("x-request-id") or next(self._request_ids))

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        assert self._master_key is not None
        presented = headers.get("authorization", "")
        if presented[:7].lower() == "bearer ":
            presented = presented[7:].strip()
        else:
            presented = headers.get("api-key", "")
        return hmac.compare_digest(presented.encode(), self._master_key)

    @staticmethod
    def _classify(route: str) -> tuple[str, str | None] | None:
        operation = _OPENAI_PATHS.get(route)
        if operation is not None:
            return operation, None
        if route.startswith(_AZURE_PREFIX):
            model, _, operation = route[len(_AZURE_PREFIX) :].partition("/")
            if model and operation in OPERATIONS:
                return operation, model
        return None

    # -- body: the routing decision (inference calls) --------------------------------------------------

    async def on_body(self, flow: Flow, body: bytes) -> Routed | Reply:
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
        tokens = estimate_input_tokens(payload, flow.operation)
        request_id = flow.request_id
        reserve = self.store.reserve(
            group.name, group.candidates, self._order(group, stream), request_id, tokens, self._lease_s[stream]
        )
        try:
            reservation = await reserve
        except asyncio.CancelledError:
            # Envoy dropped the stream mid-decision (the client left). The store may still admit the request
            # (the Redis command is on its way), and it will never be forwarded: give its lease back on every
            # candidate once that must have happened. Awaiting directly instead of shielding a task saves
            # ~12 µs per decision; cancellations are rare.
            self._release_later(group, request_id, tokens)
            raise
        if reservation.chosen is None:
            return self._no_capacity(model, group, reservation, tokens)
        forward = group.forwards[stream][reservation.chosen]
        # The limits themselves are in the forward's metadata (they are the group's, fixed per config).
        limited = group.rpm_limit or group.tpm_limit
        rates = self._rate_headers(group, reservation.states, limits=False) if limited else {}
        return Routed(forward, flow.operation, request_id, tokens, rates)

    def _release_later(self, group: _Group, request_id: str, tokens: int) -> None:
        keys = [c.key for c in group.candidates]
        asyncio.get_running_loop().call_later(
            ORPHAN_RELEASE_DELAY_S, self._release, group.name, keys, request_id, tokens
        )

    async def record_attempts(self, attempts: list[Attempt]) -> None:
        """Failed attempts count toward cooldowns, in the store, so every replica skips the deployment."""
        if self.config.disable_cooldowns:
            return
        failures = []
        for attempt in attempts:
            dep = self._deployments_by_id.get(attempt.key)
            if dep is None:
                continue  # from a config this processor no longer serves
            failure = failure_for(
                attempt.status, attempt.retry_after_s, len(self.config.groups[dep.model_name]),
                dep.cooldown_time, self.config.cooldown_time, self.config.allowed_fails,
            )
            if failure is not None:
                failures.append((dep.model_name, dep.id, failure))
        if failures:
            await self.store.record_failures(failures)

    def release_orphans(self, request_ids: list[str]) -> None:
        """Requests Envoy ended before our decision reached it (the client left meanwhile): the reservation
        may exist on any deployment, so end the lease wherever it is (rare; only such aborts get here).

        Delayed past Envoy's ext_proc message timeout, so a decision still running cannot reserve after
        its release."""

        def release() -> None:
            for group in self._groups.values():
                for request_id in request_ids:
                    self._release(group.name, [c.key for c in group.candidates], request_id, 0)

        asyncio.get_running_loop().call_later(ORPHAN_RELEASE_DELAY_S, release)

    def _release(self, group: str, keys: list[str], request_id: str, tokens: int) -> None:
        outcomes = [Outcome(group, key, request_id, 0, tokens, None, None, None) for key in keys]
        task = asyncio.get_running_loop().create_task(self.store.settle(outcomes))
        self._background.add(task)  # keep a reference until done; errors only delay lease expiry
        task.add_done_callback(self._background.discard)

    def _order(self, group: _Group, stream: bool) -> list[int]:
        strategy = self.config.routing_strategy
        if strategy == "simple-shuffle":
            return order_simple_shuffle(len(group.deployments), group.weights, self.rng)
        states = self.store.snapshot(group.name, group.candidates)
        if strategy == "least-busy":
            return order_least_busy(states, self.rng)
        if strategy == "usage-based-routing":
            return order_usage_based(states, self.rng)
        return order_latency_based(states, stream, self.config.strategy_args.lowest_latency_buffer, self.rng)

    @staticmethod
    def _rate_headers(group: _Group, states: tuple[DeploymentState, ...], limits: bool = True) -> dict[str, str]:
        """LiteLLM's x-ratelimit-* for the model group: sum of limits minus sum of current-window usage
        (``limits``: the limits too, else the remaining figures only).

        Strings, because Envoy would print metadata numbers as doubles (1e+05)."""
        headers: dict[str, str] = {}
        if group.rpm_limit:
            used = sum(s.rpm_used for d, s in zip(group.deployments, states, strict=True) if d.rpm)
            if limits:
                headers["limit_requests"] = str(group.rpm_limit)
            headers["remaining_requests"] = str(max(0, group.rpm_limit - used))
        if group.tpm_limit:
            used = sum(s.tpm_used for d, s in zip(group.deployments, states, strict=True) if d.tpm)
            if limits:
                headers["limit_tokens"] = str(group.tpm_limit)
            headers["remaining_tokens"] = str(max(0, group.tpm_limit - used))
        return headers

    def _no_capacity(self, model: str, group: _Group, reservation: Reservation, tokens: int) -> Reply:
        """429 naming each deployment's usage vs limit and cooldown, with Retry-After until the first
        deployment can take a request again (its cooldown ends, or its window frees)."""
        details: dict[str, dict[str, object]] = {}
        waits = []
        for dep, state in zip(group.deployments, reservation.states, strict=True):
            details[dep.id] = {
                "current_rpm": state.rpm_used, "rpm_limit": dep.rpm,
                "current_tpm": state.tpm_used, "tpm_limit": dep.tpm,
            }
            if state.cooldown_s > 0:
                details[dep.id]["cooldown_seconds_left"] = round(state.cooldown_s, 1)
            waits.append(state.cooldown_s if state.cooldown_s > 0 else state.frees_in_s)
        retry_after = max(1, math.ceil(min(waits)))
        headers = [("retry-after", str(retry_after))]
        for name, value in self._rate_headers(group, reservation.states).items():
            headers.append((f"x-ratelimit-{name.replace('_', '-')}", str(value)))
        message = (
            f"No deployments available for selected model: every deployment of model group '{group.name}' "
            f"(requested model '{model}') is cooling down or at its rpm/tpm limit for a request of ~{tokens} "
            "input tokens. "
            f"Try again in {retry_after} seconds. Deployments={orjson.dumps(details).decode()}"
        )
        return errors.error_reply(429, message, "rate_limit_error", "rate_limit_exceeded", headers=tuple(headers))

    # -- built once per config -------------------------------------------------------------------------

    def _plan_group(self, name: str, deployments: tuple[Deployment, ...]) -> _Group:
        keys = tuple((f"key_{dep.index}", dep.api_key) for dep in deployments)
        rpm_limit, tpm_limit = sum(dep.rpm or 0 for dep in deployments), sum(dep.tpm or 0 for dep in deployments)
        limits = {"limit_requests": str(rpm_limit)} if rpm_limit else {}
        if tpm_limit:
            limits["limit_tokens"] = str(tpm_limit)
        forwards = (
            tuple(self._forward(dep, keys, limits, stream=False) for dep in deployments),
            tuple(self._forward(dep, keys, limits, stream=True) for dep in deployments),
        )
        candidates = tuple(Candidate(dep.id, dep.rpm, dep.tpm) for dep in deployments)
        return _Group(
            name, deployments, candidates, shuffle_weights(deployments), forwards,
            rpm_limit=rpm_limit, tpm_limit=tpm_limit,
        )

    def _forward(
        self, dep: Deployment, keys: tuple[tuple[str, str], ...], limits: Mapping[str, str], stream: bool
    ) -> Forward:
        """Path, api-key and Host are set per attempt by the cluster's upstream filters (each retry may reach
        another deployment); the processor names the first choice and hands over the group's keys."""
        routing = {"cluster": dep.cluster}
        if stream:
            # A stream may run longer than `timeout`; the route's idle timeout bounds the gaps instead
            # (what LiteLLM's httpx read timeout does). stream_timeout bounds each attempt's wait for the
            # response to start, and a deployment that misses it fails over to the next.
            routing["timeout_ms"] = "0"
            stream_timeout = dep.stream_timeout or self.config.stream_timeout
            if stream_timeout:
                routing["per_try_timeout_ms"] = str(round(stream_timeout * 1000))
        else:
            routing["timeout_ms"] = str(round((dep.timeout or self.config.timeout) * 1000))
        metadata: dict[str, MetadataValue] = {
            **routing, "model_id": dep.id, "model_group": dep.model_name, "deployment": dep.deployment,
            "api_base": dep.api_base, "stream": stream, **limits,
        }
        return Forward(deployment=dep, routing=routing, keys=keys, metadata=metadata)

    def _model_list(self) -> dict[str, object]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 1677610602, "owned_by": "openai"}
                for name in self.config.public_model_names()
            ],
        }


def samples_of(config: RouterConfig) -> SampleSettings:
    args = config.strategy_args
    return SampleSettings(
        max_samples=args.max_latency_list_size, ttl_s=args.ttl,
        in_decisions=config.routing_strategy == "latency-based-routing",
    )
