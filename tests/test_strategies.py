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


# -- orderings ---------------------------------------------------------------------------------------------

from extproc.store import DeploymentState  # noqa: E402
from extproc.strategies import (  # noqa: E402
    order_latency_based,
    order_least_busy,
    order_simple_shuffle,
    order_usage_based,
)


def test_simple_shuffle_order_puts_the_weighted_draw_first_and_lists_everyone() -> None:
    deps = deployments(", rpm: 100", ", rpm: 300", ", rpm: 600")
    weights = shuffle_weights(deps)
    rng = random.Random(3)
    n = 20000
    firsts: Counter[int] = Counter()
    for _ in range(n):
        order = order_simple_shuffle(3, weights, rng)
        assert sorted(order) == [0, 1, 2]
        firsts[order[0]] += 1
    for index, share in enumerate((0.1, 0.3, 0.6)):
        assert within(firsts[index], n, share), firsts


def test_least_busy_orders_by_in_flight_with_random_ties() -> None:
    states = [DeploymentState(in_flight=n) for n in (3, 1, 1, 0)]
    rng = random.Random(5)
    orders = Counter(tuple(order_least_busy(states, rng)) for _ in range(2000))
    assert set(orders) == {(3, 1, 2, 0), (3, 2, 1, 0)}  # LiteLLM always takes the first of a tie (#37622)
    assert within(orders[(3, 1, 2, 0)], 2000, 0.5)


def test_usage_based_orders_by_tokens_then_requests() -> None:
    states = [DeploymentState(tpm_used=500, rpm_used=1), DeploymentState(tpm_used=100, rpm_used=9),
              DeploymentState(tpm_used=100, rpm_used=2)]
    assert order_usage_based(states, random.Random(1)) == [2, 1, 0]


def test_latency_based_tries_untried_first_then_the_fastest() -> None:
    states = [DeploymentState(latency=0.5), DeploymentState(latency=None), DeploymentState(latency=0.1)]
    order = order_latency_based(states, stream=False, buffer=0.0, rng=random.Random(1))
    assert order == [1, 2, 0]
    tried = [DeploymentState(latency=0.5), DeploymentState(latency=0.1), DeploymentState(latency=0.3)]
    assert order_latency_based(tried, stream=False, buffer=0.0, rng=random.Random(1)) == [1, 2, 0]


def test_latency_based_uses_ttft_for_streams() -> None:
    states = [DeploymentState(latency=0.1, ttft=2.0), DeploymentState(latency=0.2, ttft=0.5)]
    assert order_latency_based(states, stream=True, buffer=0.0, rng=random.Random(1))[0] == 1
    assert order_latency_based(states, stream=False, buffer=0.0, rng=random.Random(1))[0] == 0


def test_latency_buffer_spreads_over_deployments_within_it() -> None:
    states = [DeploymentState(latency=v) for v in (0.100, 0.140, 0.149, 0.200)]
    rng = random.Random(9)
    n = 9000
    firsts = Counter(order_latency_based(states, False, 0.5, rng)[0] for _ in range(n))
    # within 1.5 x the fastest (<= 0.15): 0, 1, 2 uniformly; 0.2 never first
    assert firsts[3] == 0
    for index in (0, 1, 2):
        assert within(firsts[index], n, 1 / 3), firsts
