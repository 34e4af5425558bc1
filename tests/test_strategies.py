"""simple-shuffle weights: every deployment's fields count (not only the first's, LiteLLM #33329)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from extproc.config import parse_config
from extproc.strategies import shuffle_weights, simple_shuffle


def deployments(*params: str):  # type: ignore[no-untyped-def]
    entries = "".join(
        f"""
  - model_name: g
    litellm_params: {{model: azure/d{i}, api_base: "https://r{i}.openai.azure.com", api_key: k{i}{p}}}"""
        for i, p in enumerate(params)
    )
    return parse_config("model_list:" + entries, environ={}).groups["g"]


def draw(params: tuple[str, ...], n: int, seed: int = 7) -> Counter[int]:
    deps = deployments(*params)
    weights = shuffle_weights(deps)
    rng = random.Random(seed)
    return Counter(simple_shuffle(len(deps), weights, rng) for _ in range(n))


def within(count: int, n: int, p: float, sds: float = 6.0) -> bool:
    """Binomial bound wide enough (6 sd, ~2e-9 false alarm) that a correct implementation never flakes."""
    sd = (n * p * (1 - p)) ** 0.5
    return abs(count - n * p) <= sds * sd


@pytest.mark.parametrize(
    ("params", "source", "shares"),
    [
        (("", ""), "uniform", (0.5, 0.5)),
        ((", rpm: 100", ", rpm: 300"), "rpm", (0.25, 0.75)),
        ((", tpm: 1000", ", tpm: 3000"), "tpm", (0.25, 0.75)),
        ((", weight: 1, rpm: 900", ", weight: 3, rpm: 1"), "weight", (0.25, 0.75)),
        # LiteLLM reads only the first deployment: here it would ignore the weights entirely. The one
        # without a weight gets the mean of the others (4), so shares are 4:2:6.
        (("", ", weight: 2", ", weight: 6"), "weight", (1 / 3, 1 / 6, 1 / 2)),
    ],
)
def test_weights_source_and_shares(params: tuple[str, ...], source: str, shares: tuple[float, ...]) -> None:
    assert shuffle_weights(deployments(*params)).source == source
    n = 20000
    counts = draw(params, n)
    for index, share in enumerate(shares):
        assert within(counts[index], n, share), (index, counts)


def test_single_deployment_always_chosen() -> None:
    assert draw(("",), 100) == Counter({0: 100})
    assert draw((", weight: 5",), 100) == Counter({0: 100})
