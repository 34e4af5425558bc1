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
