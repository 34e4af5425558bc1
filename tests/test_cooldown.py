"""Cooldown rules (pure): which failures count, how long, and when at once."""

from __future__ import annotations

from extproc.cooldown import DEFAULT_COOLDOWN_S, Failure, failure_for, parse_retry_after


def test_eligible_statuses() -> None:
    for status in (0, 401, 404, 408, 429, 500, 503):
        assert failure_for(status, None, 2, None, None, None) is not None, status
    for status in (200, 400, 403, 413, 422):
        assert failure_for(status, None, 2, None, None, None) is None, status


def test_duration_precedence() -> None:
    assert failure_for(429, 7, 2, 3, 9, None) == Failure(3, True, 3)  # deployment cooldown_time first
    assert failure_for(429, 7, 2, None, 9, None) == Failure(7, True, 3)  # then Retry-After
    assert failure_for(429, None, 2, None, 9, None) == Failure(9, True, 3)  # then the router's
    assert failure_for(429, None, 2, None, None, None) == Failure(DEFAULT_COOLDOWN_S, True, 3)
    assert failure_for(429, 7, 2, 0, 9, None) is None  # cooldown_time 0 disables


def test_immediate_or_after_allowed_fails() -> None:
    assert failure_for(429, None, 2, None, None, 1).immediate  # group has others: at once
    assert not failure_for(500, None, 2, None, None, 1).immediate  # type: ignore[union-attr]
    assert failure_for(500, None, 2, None, None, 1).allowed_fails == 1  # type: ignore[union-attr]
    assert failure_for(401, None, 1, None, None, None).immediate  # type: ignore[union-attr]
    # a group's only deployment is not taken away for transient errors
    assert failure_for(429, None, 1, None, None, None) is None
    assert failure_for(500, None, 1, None, None, None) is None


def test_parse_retry_after() -> None:
    assert parse_retry_after(" 12 ") == 12
    assert parse_retry_after("0") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
