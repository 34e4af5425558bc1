"""Routing strategies as pure logic: (request facts, a snapshot of candidate state) -> a choice.

No I/O here, so each strategy is unit-tested in microseconds and the counter store can apply the choice
atomically (one Redis round trip) without knowing how it was made.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .config import Deployment
from .store import DeploymentState


@dataclass(frozen=True, slots=True)
class ShuffleWeights:
    """Cumulative weights for simple-shuffle, computed once per model group at config load."""

    cumulative: tuple[float, ...] | None  # None: uniform
    source: str  # "weight", "rpm", "tpm" or "uniform": which field the weights came from


def shuffle_weights(deployments: Sequence[Deployment]) -> ShuffleWeights:
    """LiteLLM weighs by ``weight``, else ``rpm``, else ``tpm``, but looks only at the first deployment (#33329).

    We look at every deployment: the first field that any of them sets wins, and deployments that do not set
    it get the mean of those that do, so one missing value neither starves nor floods a deployment.
    """
    for source in ("weight", "rpm", "tpm"):
        values = [getattr(dep, source) for dep in deployments]
        given = [float(v) for v in values if v is not None]
        if given:
            mean = sum(given) / len(given)
            weights = [float(v) if v is not None else mean for v in values]
            return ShuffleWeights(tuple(itertools.accumulate(weights)), source)
    return ShuffleWeights(None, "uniform")


def simple_shuffle(count: int, weights: ShuffleWeights, rng: random.Random) -> int:
    """Index of the chosen deployment among ``count`` candidates."""
    if weights.cumulative is None:
        return rng.randrange(count)
    return rng.choices(range(count), cum_weights=weights.cumulative)[0]


# --------------------------------------------------------------------------------------------------------
# Orderings: each strategy ranks every candidate; the counter store admits the request on the first one
# that fits its rpm/tpm limits, so limits hold under every strategy and a full deployment falls through
# to the next best.


def order_simple_shuffle(count: int, weights: ShuffleWeights, rng: random.Random) -> list[int]:
    """A weighted draw for the first place; the rest follow in a weighted random order (for fallbacks)."""
    first = simple_shuffle(count, weights, rng)
    if count == 1:
        return [first]
    rest = [i for i in range(count) if i != first]
    rng.shuffle(rest)
    return [first, *rest]


def order_least_busy(states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
    """Fewest requests in flight first; ties in random order (LiteLLM takes the first, #37622)."""
    ranked = list(range(len(states)))
    rng.shuffle(ranked)
    ranked.sort(key=lambda i: states[i].in_flight)
    return ranked


def order_usage_based(states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
    """Lowest tokens used this window first, then fewest requests; ties in random order."""
    ranked = list(range(len(states)))
    rng.shuffle(ranked)
    ranked.sort(key=lambda i: (states[i].tpm_used, states[i].rpm_used))
    return ranked


def order_latency_based(
    states: Sequence[DeploymentState], stream: bool, buffer: float, rng: random.Random
) -> list[int]:
    """Untried deployments first; then a random one among those within ``buffer`` of the fastest; then by latency.

    Latency is seconds per output token (LiteLLM's measure); for streams, time to first token when sampled.
    """

    def latency(i: int) -> float | None:
        state = states[i]
        return state.ttft if stream and state.ttft is not None else state.latency

    untried = [i for i in range(len(states)) if latency(i) is None]
    rng.shuffle(untried)
    tried = sorted((i for i in range(len(states)) if latency(i) is not None), key=lambda i: latency(i) or 0.0)
    if tried:
        fastest = latency(tried[0]) or 0.0
        close = [i for i in tried if (latency(i) or 0.0) <= fastest * (1 + buffer)]
        pick = rng.choice(close)
        tried.remove(pick)
        tried.insert(0, pick)
    return untried + tried
