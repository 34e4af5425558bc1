"""The counter store: per-deployment usage windows, in-flight leases and latency samples.

One interface, two backends: in memory (the default; exact within one processor) and Redis (exact across
any number of processors, at most one round trip per routing decision; see redis_store.py). Both implement the
same semantics, tested side by side:

- **Sliding 60 s windows** for rpm and tpm: a request counts against its deployment for exactly the 60 s
  after it was admitted, so no 60 s interval ever holds more than ``rpm`` requests (fixed calendar
  minutes, as LiteLLM uses, let up to 2 x rpm through across a minute boundary).
- **Reservation** is check-and-increment in one atomic step over the candidates in the order the strategy
  chose: the first that fits gets the request (``rpm_used + 1 <= rpm``: no rpm-1 off-by-one, LiteLLM #8430).
  The input-token estimate counts against ``tpm`` at once and is replaced by the actual total when the
  response completes.
- **In-flight leases** with an expiry, so a request whose end is never reported stops counting after its
  lease instead of leaking forever.
"""

from __future__ import annotations

import abc
import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .cooldown import Failure

WINDOW_S = 60.0
TIMEOUT_PENALTY_S = 1000.0  # LiteLLM's latency sample for a timed-out call: avoid it until samples age out


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the store needs to know about one deployment: its key and its limits (None = no limit)."""

    key: str
    rpm: int | None
    tpm: int | None


@dataclass(slots=True)  # not frozen: made for every decision (frozen costs ~1.5 µs each)
class DeploymentState:
    """A snapshot of one deployment, the input of every strategy."""

    rpm_used: int = 0
    tpm_used: int = 0
    in_flight: int = 0
    latency: float | None = None  # mean seconds per output token over the sample window; None: untried
    ttft: float | None = None  # mean time to first token (streams); None: no sample
    frees_in_s: float = 0.0  # seconds until the oldest request in the window stops counting
    cooldown_s: float = 0.0  # seconds of cooldown left (skipped by every strategy until then)


@dataclass(slots=True)  # not frozen: made for every decision (frozen costs ~1.5 µs each)
class Reservation:
    chosen: int | None  # index into the candidates, or None when none fits
    states: tuple[DeploymentState, ...]  # after the reservation, in candidate order
    admitted_at: float  # the store's clock; identifies the window entry for the token correction


@dataclass(slots=True)  # not frozen: one per finished request (frozen costs ~1.5 µs each)
class Outcome:
    """How a routed request ended, reported once (from Envoy's access log) for every request."""

    group: str
    key: str  # deployment key
    request_id: str
    status: int  # the HTTP status the client got (0 when it went away before a response)
    reserved_tokens: int
    total_tokens: int | None  # from the response's usage; None when unknown
    latency_s: float | None  # the latency sample (per output token), or None to record none
    ttft_s: float | None


@dataclass(frozen=True, slots=True)
class SampleSettings:
    max_samples: int = 10
    ttl_s: float = 3600.0
    # Only latency-based routing orders on the means; other strategies leave them out of each decision
    # (half of Redis' time per decision) and read them when asked (metrics).
    in_decisions: bool = True


class CounterStore(abc.ABC):
    backend: str = "abstract"

    @abc.abstractmethod
    async def reserve(
        self, group: str, candidates: Sequence[Candidate], order: Sequence[int], request_id: str,
        tokens: int, lease_s: float,
    ) -> Reservation:
        """Admit the request on the first candidate in ``order`` that fits its limits."""

    @abc.abstractmethod
    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        """Record finished requests: end their lease, correct tokens, add latency samples."""

    @abc.abstractmethod
    async def record_failures(self, failures: Sequence[tuple[str, str, Failure]]) -> None:
        """Count failed attempts (group, key, failure); start or extend cooldowns they call for."""

    @abc.abstractmethod
    def snapshot(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        """The freshest state known without I/O: what strategies rank on (limits are re-checked atomically
        by ``reserve``, so a slightly old snapshot can change the preference but never break a limit)."""

    @abc.abstractmethod
    async def states(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        """A fresh snapshot (for metrics and tests, not the hot path)."""

    def start(self) -> None:
        """Begin background work the store needs (called once the event loop runs)."""
        return None

    async def close(self) -> None:
        return None


def _mean(samples: Sequence[float]) -> float | None:
    return sum(samples) / len(samples) if samples else None


@dataclass(slots=True)
class _Deployment:
    window: collections.deque[tuple[float, str, int]] = field(default_factory=collections.deque)
    tokens_by_request: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    # lease length -> {request id: expiry}. Each inner dict is in expiry order (same length, added in time
    # order), so expiring is O(expired) and ending a lease O(1), however many are in flight.
    leases: dict[float, dict[str, float]] = field(default_factory=dict)
    latency: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    ttft: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    cooldown_until: float = 0.0
    failures: collections.deque[float] = field(default_factory=collections.deque)


class MemoryStore(CounterStore):
    """Per-process counters: exact for one processor, per processor when several run without Redis."""

    backend = "memory"

    def __init__(
        self, samples: SampleSettings | None = None, clock: collections.abc.Callable[[], float] = time.monotonic
    ) -> None:
        self._samples = samples or SampleSettings()
        self._clock = clock
        self._deployments: dict[str, _Deployment] = collections.defaultdict(_Deployment)

    def _expire(self, dep: _Deployment, now: float) -> None:
        horizon = now - WINDOW_S
        window = dep.window
        while window and window[0][0] <= horizon:
            _, request_id, _ = window.popleft()
            dep.tokens -= dep.tokens_by_request.pop(request_id, 0)
        for leases in dep.leases.values():
            while leases:
                request_id, until = next(iter(leases.items()))
                if until > now:
                    break
                del leases[request_id]

    def _state(self, dep: _Deployment, now: float, samples: bool = True) -> DeploymentState:
        """``samples``: with the latency means (only latency-based routing and metrics read them)."""
        oldest = dep.window[0][0] if dep.window else now - WINDOW_S
        latency = ttft = None
        if samples:
            ttl = self._samples.ttl_s
            latency = _mean([s for t, s in dep.latency if now - t < ttl])
            ttft = _mean([s for t, s in dep.ttft if now - t < ttl])
        leases = dep.leases
        return DeploymentState(
            len(dep.window), dep.tokens,
            sum(len(held) for held in leases.values()) if leases else 0,
            latency, ttft, max(0.0, oldest + WINDOW_S - now), max(0.0, dep.cooldown_until - now),
        )

    async def reserve(
        self, group: str, candidates: Sequence[Candidate], order: Sequence[int], request_id: str,
        tokens: int, lease_s: float,
    ) -> Reservation:
        now = self._clock()
        deps = [self._deployments[c.key] for c in candidates]
        for dep in deps:
            self._expire(dep, now)
        chosen = None
        for index in order:
            candidate, dep = candidates[index], deps[index]
            if dep.cooldown_until > now:
                continue
            if candidate.rpm is not None and len(dep.window) + 1 > candidate.rpm:
                continue
            if candidate.tpm is not None and dep.tokens + tokens > candidate.tpm:
                continue
            dep.window.append((now, request_id, tokens))
            dep.tokens_by_request[request_id] = tokens
            dep.tokens += tokens
            dep.leases.setdefault(lease_s, {})[request_id] = now + lease_s
            chosen = index
            break
        # The reservation's states feed the rate headers and a 429's details: no latency means needed.
        return Reservation(chosen, tuple([self._state(dep, now, samples=False) for dep in deps]), now)

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        now = self._clock()
        for outcome in outcomes:
            dep = self._deployments[outcome.key]
            for leases in dep.leases.values():
                if leases.pop(outcome.request_id, None) is not None:
                    break
            if outcome.total_tokens is not None and outcome.request_id in dep.tokens_by_request:
                dep.tokens += outcome.total_tokens - dep.tokens_by_request[outcome.request_id]
                dep.tokens_by_request[outcome.request_id] = outcome.total_tokens
            for value, series in ((outcome.latency_s, dep.latency), (outcome.ttft_s, dep.ttft)):
                if value is not None:
                    series.append((now, value))
                    while len(series) > self._samples.max_samples:  # keep the newest (LiteLLM freezes the first 9)
                        series.popleft()

    async def record_failures(self, failures: Sequence[tuple[str, str, Failure]]) -> None:
        now = self._clock()
        for _group, key, failure in failures:
            dep = self._deployments[key]
            dep.failures.append(now)
            while dep.failures and dep.failures[0] <= now - failure.cooldown_s:
                dep.failures.popleft()  # LiteLLM counts fails within the cooldown period
            if failure.immediate or len(dep.failures) > failure.allowed_fails:
                # extend, never shorten (LiteLLM #40130 keeps the first, shorter deadline)
                dep.cooldown_until = max(dep.cooldown_until, now + failure.cooldown_s)

    def _states(self, candidates: Sequence[Candidate], samples: bool) -> tuple[DeploymentState, ...]:
        now = self._clock()
        result = []
        for candidate in candidates:
            dep = self._deployments[candidate.key]
            self._expire(dep, now)
            result.append(self._state(dep, now, samples))
        return tuple(result)

    def snapshot(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        return self._states(candidates, samples=self._samples.in_decisions)

    async def states(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        return self._states(candidates, samples=True)


class FallbackStore(CounterStore):
    """Redis when it answers, this processor's own counters while it does not.

    A Redis outage must not fail requests: decisions fall back to per-processor counting (logged once,
    visible as a metric) and Redis is tried again every ``retry_s``; shared counting resumes by itself.
    """

    def __init__(self, primary: CounterStore, fallback: CounterStore, errors: tuple[type[BaseException], ...],
                 retry_s: float = 1.0, clock: collections.abc.Callable[[], float] = time.monotonic) -> None:
        import logging

        self.primary = primary
        self.fallback = fallback
        self.backend = primary.backend
        self._errors = errors
        self._retry_s = retry_s
        self._clock = clock
        self._down_until = 0.0
        self.degraded = False
        self._log = logging.getLogger("extproc.store")

    def _use_primary(self) -> bool:
        return not self.degraded or self._clock() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        if not self.degraded:
            self._log.error("%s store unavailable (%s): counting per processor until it is back",
                            self.primary.backend, type(exc).__name__)
        self.degraded = True
        self._down_until = self._clock() + self._retry_s

    def _recovered(self) -> None:
        if self.degraded:
            self._log.warning("%s store is back: shared counting resumed", self.primary.backend)
        self.degraded = False

    async def reserve(
        self, group: str, candidates: Sequence[Candidate], order: Sequence[int], request_id: str,
        tokens: int, lease_s: float,
    ) -> Reservation:
        if self._use_primary():
            try:
                reservation = await self.primary.reserve(group, candidates, order, request_id, tokens, lease_s)
            except self._errors as exc:
                self._failed(exc)
            else:
                self._recovered()
                return reservation
        return await self.fallback.reserve(group, candidates, order, request_id, tokens, lease_s)

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        await self.fallback.settle(outcomes)  # harmless where nothing was reserved: ends leases, adds samples
        if self._use_primary():
            try:
                await self.primary.settle(outcomes)
            except self._errors as exc:
                self._failed(exc)

    async def record_failures(self, failures: Sequence[tuple[str, str, Failure]]) -> None:
        await self.fallback.record_failures(failures)
        if self._use_primary():
            try:
                await self.primary.record_failures(failures)
            except self._errors as exc:
                self._failed(exc)

    def snapshot(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        store = self.fallback if self.degraded else self.primary
        return store.snapshot(group, candidates)

    async def states(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        if self._use_primary():
            try:
                return await self.primary.states(group, candidates)
            except self._errors as exc:
                self._failed(exc)
        return await self.fallback.states(group, candidates)

    def start(self) -> None:
        self.primary.start()
        self.fallback.start()

    async def close(self) -> None:
        await self.primary.close()
        await self.fallback.close()
