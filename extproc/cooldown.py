"""When a failed attempt puts its deployment in cooldown, and for how long (LiteLLM's rules, pure logic).

LiteLLM (router_utils/cooldown_handlers.py): 429, 401, 404, 408 and 5xx are eligible; a 429 cools a
deployment at once when its group has others, 401/404 at once always; other failures once more than
``allowed_fails`` happened within the cooldown period. A group's only deployment cools down for 401/404
only. The duration is the deployment's ``cooldown_time``
(0 disables), else the deployment's ``Retry-After``, else the router's ``cooldown_time``, else 5 s.

One deliberate difference: connection failures and resets (status 0 here) are eligible too; LiteLLM
never cools an APIConnectionError, so a dead endpoint keeps receiving (and failing) first attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_COOLDOWN_S = 5.0
DEFAULT_ALLOWED_FAILS = 3
_IMMEDIATE_ALWAYS = (401, 404)


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed attempt asks of the store: count it, and cool down at once or past allowed_fails."""

    cooldown_s: float
    immediate: bool
    allowed_fails: int


def is_eligible(status: int) -> bool:
    return status in (0, 401, 404, 408, 429) or status >= 500


def failure_for(
    status: int,
    retry_after_s: float | None,
    group_size: int,
    deployment_cooldown_s: float | None,
    router_cooldown_s: float | None,
    allowed_fails: int | None,
) -> Failure | None:
    if not is_eligible(status) or deployment_cooldown_s == 0:
        return None
    if group_size == 1 and status not in _IMMEDIATE_ALWAYS:
        return None  # a group's only deployment is not taken away for transient errors (LiteLLM)
    if deployment_cooldown_s is not None:
        seconds = deployment_cooldown_s
    elif retry_after_s is not None and retry_after_s > 0:
        seconds = retry_after_s
    elif router_cooldown_s is not None:
        seconds = router_cooldown_s
    else:
        seconds = DEFAULT_COOLDOWN_S
    if seconds <= 0:
        return None
    immediate = status in _IMMEDIATE_ALWAYS or (status == 429 and group_size > 1)
    return Failure(seconds, immediate, DEFAULT_ALLOWED_FAILS if allowed_fails is None else allowed_fails)


def parse_retry_after(value: str) -> float | None:
    """Seconds from a Retry-After header (delta-seconds; HTTP dates are rare from Azure and ignored)."""
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds > 0 else None
