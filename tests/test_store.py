"""The counter store's semantics, the same for the memory and the Redis backend (a real redis-server)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from extproc.redis_store import RedisStore
from extproc.store import WINDOW_S, Candidate, CounterStore, MemoryStore, Outcome, SampleSettings

from .conftest import RedisServer

A = Candidate("dep-a", rpm=3, tpm=None)
B = Candidate("dep-b", rpm=None, tpm=100)
SAMPLES = SampleSettings(max_samples=3, ttl_s=3600)


def outcome(key: str, request_id: str, reserved: int, total: int | None = None, latency: float | None = None,
            ttft: float | None = None) -> Outcome:
    return Outcome("g", key, request_id, 200, reserved, total, latency, ttft)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CounterStore]:
    if request.param == "memory":
        yield MemoryStore(SAMPLES)
        return
    url = request.getfixturevalue("redis_url")
    redis_store = RedisStore(url, prefix="test", samples=SAMPLES)
    yield redis_store
    await redis_store.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def test_rpm_is_exact_and_full_deployments_fall_through(store: CounterStore) -> None:
    chosen = []
    for i in range(5):
        reservation = await store.reserve("g", (A, B), (0, 1), f"r{i}", 10, 30)
        chosen.append(reservation.chosen)
    # rpm 3: exactly three on A (not rpm-1), then B takes over
    assert chosen == [0, 0, 0, 1, 1]
    states = await store.states("g", (A, B))
    assert [s.rpm_used for s in states] == [3, 2]
    assert 58 < states[0].frees_in_s <= WINDOW_S


async def test_tpm_checks_the_estimate_and_settles_actual_tokens(store: CounterStore) -> None:
    assert (await store.reserve("g", (B,), (0,), "r1", 60, 30)).chosen == 0
    assert (await store.reserve("g", (B,), (0,), "r2", 60, 30)).chosen is None  # 60 + 60 > 100
    await store.settle([outcome("dep-b", "r1", 60, total=20)])  # actual usage replaces the estimate
    assert (await store.states("g", (B,)))[0].tpm_used == 20
    refused = await store.reserve("g", (B,), (0,), "r3", 81, 30)
    assert refused.chosen is None and refused.states[0].tpm_used == 20
    assert (await store.reserve("g", (B,), (0,), "r4", 80, 30)).chosen == 0
    assert (await store.states("g", (B,)))[0].tpm_used == 100


async def test_leases_end_on_settle_exactly_once(store: CounterStore) -> None:
    for i in range(3):
        await store.reserve("g", (A, B), (1,), f"r{i}", 1, 30)
    assert (await store.states("g", (A, B)))[1].in_flight == 3
    await store.settle([outcome("dep-b", "r0", 1), outcome("dep-b", "r0", 1), outcome("dep-b", "r1", 1)])
    assert (await store.states("g", (A, B)))[1].in_flight == 1


async def test_leases_expire_when_the_end_is_never_reported(store: CounterStore) -> None:
    await store.reserve("g", (B,), (0,), "lost", 1, 0.2)
    assert (await store.states("g", (B,)))[0].in_flight == 1
    await asyncio.sleep(0.3)
    assert (await store.states("g", (B,)))[0].in_flight == 0


async def test_latency_window_keeps_the_newest_samples(store: CounterStore) -> None:
    await store.reserve("g", (A,), (0,), "r", 1, 30)
    for i, sample in enumerate([9.0, 9.0, 1.0, 2.0, 3.0]):
        await store.settle([outcome("dep-a", f"x{i}", 1, latency=sample, ttft=sample / 10)])
    state = (await store.states("g", (A,)))[0]
    assert state.latency == pytest.approx(2.0)  # LiteLLM would keep the first samples frozen: 9, 9, ...
    assert state.ttft == pytest.approx(0.2)
    assert (await store.states("g", (B,)))[0].latency is None


async def test_redis_decisions_leave_latency_out_unless_the_strategy_orders_on_it(redis_url: str) -> None:
    """Computing the means is half of Redis' time per decision: only latency-based routing pays for it;
    metrics still read them (states)."""
    for in_decisions in (False, True):
        samples = SampleSettings(max_samples=3, ttl_s=3600, in_decisions=in_decisions)
        store = RedisStore(redis_url, prefix=f"means-{in_decisions}", samples=samples)
        await store.settle([outcome("dep-a", f"x{i}", 1, latency=2.0, ttft=0.5) for i in range(3)])
        decided = (await store.reserve("g", (A,), (0,), "r", 1, 30)).states[0]
        assert (decided.latency, decided.ttft) == ((2.0, 0.5) if in_decisions else (None, None))
        assert store.snapshot("g", (A,))[0].latency == decided.latency
        asked = (await store.states("g", (A,)))[0]
        assert (asked.latency, asked.ttft) == (pytest.approx(2.0), pytest.approx(0.5))
        await store.close()


async def test_empty_order_admits_nothing(store: CounterStore) -> None:
    reservation = await store.reserve("g", (A, B), (), "r", 1, 30)
    assert reservation.chosen is None
    assert [s.rpm_used for s in reservation.states] == [0, 0]


def test_memory_window_slides() -> None:
    now = [1000.0]
    store = MemoryStore(SAMPLES, clock=lambda: now[0])
    for i in range(3):
        assert run(store.reserve("g", (A,), (0,), f"r{i}", 1, 30)).chosen == 0
        now[0] += 10
    assert run(store.reserve("g", (A,), (0,), "r3", 1, 30)).chosen is None
    assert run(store.states("g", (A,)))[0].frees_in_s == pytest.approx(30)
    now[0] += 30  # the first request is now 60 s old: one slot frees, not the whole minute
    assert run(store.reserve("g", (A,), (0,), "r4", 1, 30)).chosen == 0
    assert run(store.reserve("g", (A,), (0,), "r5", 1, 30)).chosen is None


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def test_redis_reserve_is_one_round_trip(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="rt")
    await store.reserve("g", (A, B), (0, 1), "warm", 1, 30)  # loads the script once
    client = redis_server.client()
    sent: list[tuple[Any, ...]] = []
    assert store._lean is not None
    lean_call: Callable[..., Any] = store._lean.call
    execute: Callable[..., Any] = store._redis.execute_command

    async def counting_lean(*args: Any) -> Any:
        sent.append(args)
        return await lean_call(*args)

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(args)
        return await execute(*args, **kwargs)

    store._lean.call = counting_lean  # type: ignore[method-assign]
    store._redis.execute_command = counting  # type: ignore[method-assign]
    before = commandstats(client)
    for i in range(10):
        await store.reserve("g", (A, B), (1, 0), f"r{i}", 1, 30)
    after = commandstats(client)
    # client side: exactly one command per decision
    assert [args[0] for args in sent] == [b"EVALSHA"] * 10
    # server side: ten EVALSHA; every other command counted ran inside the script
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    delta.pop("info", None)
    for command in ("hello", "ping", "subscribe", "client|setinfo"):  # the cooldown channel's connection
        delta.pop(command, None)
    assert delta.pop("evalsha") == 10
    inside_script = {"time", "zrangebyscore", "zremrangebyscore", "zcard", "get", "zadd", "incrby", "pexpire", "pttl",
                     "zrange", "lrange", "decrby"}
    assert set(delta) <= inside_script, delta
    await store.close()
    client.close()


async def test_redis_limits_hold_across_processors(redis_url: str) -> None:
    """Two stores (two processors) racing: the seed's 2 x rpm 6 admits exactly 12 of 40."""
    stores = [RedisStore(redis_url, prefix="race") for _ in range(2)]
    seed = (Candidate("a", 6, None), Candidate("b", 6, None))
    results = await asyncio.gather(
        *(stores[i % 2].reserve("gpt-3.5-turbo", seed, (i % 2, 1 - i % 2), f"r{i}", 5, 30) for i in range(40))
    )
    chosen = [r.chosen for r in results]
    assert chosen.count(0) == 6 and chosen.count(1) == 6 and chosen.count(None) == 28
    for s in stores:
        await s.close()


async def test_redis_keys_share_a_hash_tag_and_prefix(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="team-a")
    await store.reserve("gpt-4o", (A,), (0,), "r", 1, 30)
    client = redis_server.client()
    keys = sorted(k.decode() for k in client.keys("*"))
    assert keys and all(k.startswith("team-a:{gpt-4o}:") for k in keys)
    assert all(client.ttl(k) > 0 for k in keys)  # nothing lives forever
    await store.close()
    client.close()


async def test_redis_settle_is_one_pipeline(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="p")
    for i in range(5):
        await store.reserve("g", (B,), (0,), f"r{i}", 10, 30)
    assert store._lean is not None
    calls: list[int] = []
    original: Callable[..., Any] = store._lean.call_many

    async def counting_call_many(commands: Any) -> Any:
        calls.append(len(commands))
        return await original(commands)

    store._lean.call_many = counting_call_many  # type: ignore[method-assign]
    await store.settle([outcome("dep-b", f"r{i}", 10, total=1) for i in range(5)])
    assert calls == [5]  # one write, five EVALSHA
    assert (await store.states("g", (B,)))[0].tpm_used == 5
    await store.close()


async def test_redis_settle_survives_a_flushed_script_cache(redis_url: str) -> None:
    """Redis restarted (or SCRIPT FLUSH): the batch's NOSCRIPT replies load the script and are sent again,
    once each; nothing is settled twice."""
    store = RedisStore(redis_url, prefix="flush")
    for i in range(3):
        await store.reserve("g", (B,), (0,), f"r{i}", 10, 30)
    redis.Redis.from_url(redis_url).script_flush()
    await store.settle([outcome("dep-b", f"r{i}", 10, total=4) for i in range(3)])
    state = (await store.states("g", (B,)))[0]
    assert (state.tpm_used, state.in_flight) == (12, 0)
    await store.close()


U1 = Candidate("dep-u1", rpm=None, tpm=None)
U2 = Candidate("dep-u2", rpm=None, tpm=None)


def finished_at_once(coro: Any) -> Any:
    """The coroutine's result if it completes without suspending (no I/O awaited); fails otherwise."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine waited for I/O")


async def test_redis_admits_a_deployment_without_limits_without_waiting(redis_url: str) -> None:
    """No limit to check, so the decision does not wait for Redis; the reservation still lands there (usage,
    lease) on the same connection, ahead of the settle."""
    store = RedisStore(redis_url, prefix="unlimited")
    await store.reserve("g", (A, U1), (0,), "warm", 1, 30)  # opens the connection and loads the script
    assert await store.subscribed(2.0)  # decisions skip the wait only while cooldowns are heard
    reservation = finished_at_once(store.reserve("g", (U1, U2), (1, 0), "r1", 7, 30))
    assert reservation.chosen == 1
    assert (reservation.states[1].rpm_used, reservation.states[1].in_flight) == (1, 1)  # counted in the view
    await store.settle([outcome("dep-u2", "r1", 7, total=3)])
    state = (await store.states("g", (U1, U2)))[1]
    assert (state.rpm_used, state.tpm_used, state.in_flight) == (1, 3, 0)
    # A limited first choice is checked in Redis, as before.
    with pytest.raises(AssertionError, match="waited"):
        finished_at_once(store.reserve("g", (A, U1), (0, 1), "r2", 1, 30))
    await store.close()


async def test_unawaited_reservations_learn_cooldowns_and_survive_a_flushed_script_cache(redis_url: str) -> None:

    store = RedisStore(redis_url, prefix="unlimited-cool")
    await store.reserve("g", (A, U1), (0,), "warm", 1, 30)
    assert await store.subscribed(2.0)
    client = redis.Redis.from_url(redis_url)
    client.script_flush()  # the next unawaited reservation gets NOSCRIPT
    # A cooldown whose announcement this processor never heard (written straight into Redis): the first
    # decision still picks U1, and its reply (once the script is reloaded) teaches the view.
    client.set(store.keys("g", "dep-u1")[5], "1", px=5000)
    assert finished_at_once(store.reserve("g", (U1, U2), (0, 1), "r1", 1, 30)).chosen == 0
    for _ in range(100):
        if store.snapshot("g", (U1,))[0].cooldown_s > 0:
            break
        await asyncio.sleep(0.01)
    assert finished_at_once(store.reserve("g", (U1, U2), (0, 1), "r2", 1, 30)).chosen == 1
    await asyncio.sleep(0.05)
    states = await store.states("g", (U1, U2))
    assert [s.rpm_used for s in states] == [0, 1]  # Redis refused U1 while cooling; U2 counted r2
    await store.close()


async def test_cooldown_skips_a_deployment_then_lets_it_back(store: CounterStore) -> None:
    from extproc.cooldown import Failure

    await store.record_failures([("g", "dep-a", Failure(cooldown_s=0.4, immediate=True, allowed_fails=3))])
    reservation = await store.reserve("g", (A, B), (0, 1), "r1", 1, 30)
    assert reservation.chosen == 1  # A is cooling: every strategy's first choice falls through to B
    assert 0.2 < reservation.states[0].cooldown_s <= 0.4
    refused = await store.reserve("g", (A,), (0,), "r2", 1, 30)
    assert refused.chosen is None
    await asyncio.sleep(0.45)
    assert (await store.reserve("g", (A, B), (0, 1), "r3", 1, 30)).chosen == 0


async def test_cooldown_after_allowed_fails_and_never_shortened(store: CounterStore) -> None:
    from extproc.cooldown import Failure

    soft = Failure(cooldown_s=5.0, immediate=False, allowed_fails=2)
    await store.record_failures([("g", "dep-b", soft), ("g", "dep-b", soft)])
    assert (await store.states("g", (B,)))[0].cooldown_s == 0  # two fails allowed
    await store.record_failures([("g", "dep-b", soft)])
    assert 4 < (await store.states("g", (B,)))[0].cooldown_s <= 5
    await store.record_failures([("g", "dep-b", Failure(cooldown_s=1.0, immediate=True, allowed_fails=2))])
    assert (await store.states("g", (B,)))[0].cooldown_s > 4  # a shorter cooldown does not cut it short


async def test_a_decision_cancelled_mid_reservation_gives_its_lease_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Envoy drops the ext_proc stream while the EVALSHA is in flight (the client left): the reservation still
    lands in Redis, and the router releases it by request id once it must have."""
    from extproc import routing
    from extproc.config import parse_config

    monkeypatch.setattr(routing, "ORPHAN_RELEASE_DELAY_S", 0.2)
    config = parse_config(
        'model_list: [{model_name: m, litellm_params: {model: azure/d, api_base: "https://r.openai.azure.com", '
        f"api_key: k, rpm: 1000}}}}]\nrouter_settings: {{routing_strategy: least-busy, redis_url: '{redis_url}'}}",
        environ={},
    )
    store = RedisStore(redis_url, prefix="cancel")
    router = routing.Router(config, store)
    candidates = router.groups()["m"].candidates
    body = b'{"model": "m", "messages": []}'
    # a first decision opens the connection, so the next EVALSHA is written at once
    assert isinstance(await router.on_body(routing.Flow("chat/completions", None, "warm"), body), routing.Routed)
    assert (await store.states("m", candidates))[0].in_flight == 1
    deciding = asyncio.ensure_future(router.on_body(routing.Flow("chat/completions", None, "gone-1"), body))
    await asyncio.sleep(0)  # the EVALSHA is on its way; its reply has not been read
    deciding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deciding
    await asyncio.sleep(0.05)
    assert (await store.states("m", candidates))[0].in_flight == 2  # it did land
    await asyncio.sleep(0.4)
    assert (await store.states("m", candidates))[0].in_flight == 1  # released; the warm-up request remains
    await store.close()


# -- allotments: slots reserved ahead on a deployment with ample room -----------------------------------------


@types.coroutine
def _resume(coro: Any, pending: Any) -> Any:
    """Go on driving a coroutine that was started by hand and suspended on ``pending``."""
    while True:
        try:
            yield pending
        except BaseException as exc:  # thrown in by the task (cancellation)
            try:
                pending = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                pending = coro.send(None)
            except StopIteration as done:
                return done.value


async def decide(coro: Any) -> tuple[Any, bool]:
    """The coroutine's result, and whether it came without waiting for any I/O."""
    try:
        pending = coro.send(None)
    except StopIteration as done:
        return done.value, True
    return await _resume(coro, pending), False


async def settled(store: RedisStore) -> None:
    """Let background work finish: allotments asked for, slot uses and returns written and answered."""
    for _ in range(5):
        await asyncio.sleep(0.02)
        store._send_unawaited()


async def test_allotted_slots_admit_without_waiting(redis_url: str) -> None:
    from extproc import redis_store

    big = Candidate("dep-big", rpm=1000, tpm=None)
    store = RedisStore(redis_url, prefix="allot")
    assert await store.subscribed(2.0)  # slots are allotted only while cooldowns are heard
    assert (await store.reserve("g", (big,), (0,), "r0", 10, 30)).chosen == 0  # checked in Redis
    await settled(store)
    # The first decision asked for slots: they count in the window at once.
    assert (await store.states("g", (big,)))[0].rpm_used == 1 + redis_store.ALLOT_SLOTS
    reservation = finished_at_once(store.reserve("g", (big,), (0,), "r1", 10, 30))
    assert reservation.chosen == 0
    await settled(store)
    state = (await store.states("g", (big,)))[0]
    # r1 took a slot's place: still 1 + ALLOT_SLOTS entries (or more, if a refill came), and r1 is in flight.
    assert state.in_flight == 2
    await store.settle([outcome("dep-big", "r1", 10, total=4)])
    assert (await store.states("g", (big,)))[0].in_flight == 1
    await store.close()  # gives the unused slots back
    store = RedisStore(redis_url, prefix="allot")
    state = (await store.states("g", (big,)))[0]
    assert (state.rpm_used, state.tpm_used) == (2, 14)  # r0 and r1, r1 with its actual tokens
    await store.close()


async def test_used_up_allotments_are_dropped_at_once(redis_url: str) -> None:
    """A busy deployment goes through many allotments a second: used-up ones must not pile up until their
    timer, or every decision pays for walking them."""
    big = Candidate("dep-big", rpm=100_000, tpm=None)
    store = RedisStore(redis_url, prefix="allot-busy")
    assert await store.subscribed(2.0)
    at_once = 0
    for i in range(300):
        reservation, without_waiting = await decide(store.reserve("g", (big,), (0,), f"r{i}", 10, 30))
        assert reservation.chosen == 0
        at_once += without_waiting
        await asyncio.sleep(0)  # let the refills be asked for and answered
        if i % 10 == 0:
            await settled(store)
        assert len(store._allotments.get("dep-big", [])) <= 2
    assert at_once > 200  # most decisions came from slots
    await store.close()


async def test_unused_slots_go_back_and_small_deployments_get_none(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from extproc import redis_store

    monkeypatch.setattr(redis_store, "ALLOT_S", 0.2)
    big = Candidate("dep-big", rpm=1000, tpm=None)
    store = RedisStore(redis_url, prefix="allot-back")
    assert await store.subscribed(2.0)
    await store.reserve("g", (big,), (0,), "r0", 10, 30)
    await settled(store)
    assert (await store.states("g", (big,)))[0].rpm_used > 1
    await asyncio.sleep(0.3)
    await settled(store)
    assert (await store.states("g", (big,)))[0].rpm_used == 1
    # rpm 3 (A): far below the least room; every decision is checked in Redis and nothing else is sent.
    for i in range(3):
        await store.reserve("g", (A,), (0,), f"a{i}", 1, 30)
    await settled(store)
    assert not store._allotments.get("dep-a") and (await store.states("g", (A,)))[0].rpm_used == 3
    await store.close()


async def test_slots_carry_tokens_and_a_larger_estimate_is_checked_in_redis(redis_url: str) -> None:
    from extproc import redis_store

    tokens = Candidate("dep-tpm", rpm=None, tpm=1_000_000)
    store = RedisStore(redis_url, prefix="allot-tpm")
    assert await store.subscribed(2.0)
    await store.reserve("g", (tokens,), (0,), "r0", 100, 30)
    await settled(store)
    each = redis_store.ALLOT_LEAST_TOKENS  # max(256, 2 x 100)
    assert (await store.states("g", (tokens,)))[0].tpm_used == 100 + redis_store.ALLOT_SLOTS * each
    finished_at_once(store.reserve("g", (tokens,), (0,), "r1", 100, 30))  # fits a slot
    reservation, at_once = await decide(store.reserve("g", (tokens,), (0,), "r2", each + 1, 30))
    assert reservation.chosen == 0 and not at_once  # larger than a slot: Redis decides
    await store.close()
    store = RedisStore(redis_url, prefix="allot-tpm")
    # r0, r1 and r2 with their own estimates; every unused slot given back
    assert (await store.states("g", (tokens,)))[0].tpm_used == 100 + 100 + each + 1
    await store.close()


async def test_limits_stay_exact_across_processors_with_allotments(redis_url: str) -> None:
    """Two processors share a deployment of rpm 120 and keep asking: exactly 120 get through, some from
    slots, and Redis never holds more than 120 entries."""
    limited = Candidate("dep-120", rpm=120, tpm=None)
    stores = [RedisStore(redis_url, prefix="allot-exact") for _ in range(2)]
    for store in stores:
        assert await store.subscribed(2.0)
    admitted = 0
    from_slots = 0
    for i in range(400):
        store = stores[i % 2]
        reservation, at_once = await decide(store.reserve("g", (limited,), (0,), f"r{i}", 1, 30))
        admitted += reservation.chosen is not None
        from_slots += at_once
        if i % 10 == 0:
            await settled(store)
            assert (await store.states("g", (limited,)))[0].rpm_used <= 120
    for store in stores:
        await store.close()
    assert from_slots > 0
    assert admitted == 120
    check = RedisStore(redis_url, prefix="allot-exact")
    assert (await check.states("g", (limited,)))[0].rpm_used == 120
    await check.close()


async def test_no_decision_skips_redis_while_cooldowns_could_go_unheard(redis_url: str) -> None:
    """Slots are used only while the cooldown channel is subscribed: when the subscription drops, the slots
    go back and decisions are checked in Redis until it is back (a cooldown announced meanwhile is missed)."""
    big = Candidate("dep-big", rpm=1000, tpm=None)
    store = RedisStore(redis_url, prefix="cool-lost")
    assert await store.subscribed(2.0)
    await store.reserve("g", (big,), (0,), "r0", 1, 30)
    await settled(store)
    assert finished_at_once(store.reserve("g", (big,), (0,), "r1", 1, 30)).chosen == 0  # from a slot
    redis.Redis.from_url(redis_url).client_kill_filter(_type="pubsub")
    for _ in range(100):
        if not store._subscribed.is_set():
            break
        await asyncio.sleep(0.01)
    await settled(store)
    assert not any(a.slots for a in store._allotments.get("dep-big", []))  # given back
    assert (await store.states("g", (big,)))[0].rpm_used == 2  # r0 and r1 only
    reservation, at_once = await decide(store.reserve("g", (big,), (0,), "r2", 1, 30))
    assert reservation.chosen == 0 and not at_once
    assert await store.subscribed(3.0)  # subscribed again after a second
    await store.close()


async def test_a_cooldown_reaches_every_processor_at_once(redis_url: str) -> None:
    """Decisions taken without a round trip (slots, deployments without limits) must skip a deployment as
    soon as any processor starts its cooldown: FAIL publishes it, and the others drop their slots there."""
    from extproc.cooldown import Failure

    big = Candidate("dep-big", rpm=1000, tpm=None)
    other = Candidate("dep-other", rpm=None, tpm=None)
    deciding, failing = RedisStore(redis_url, prefix="cool-pub"), RedisStore(redis_url, prefix="cool-pub")
    assert await deciding.subscribed(2.0)
    for i in range(2):
        await deciding.reserve("g", (big, other), (0, 1), f"w{i}", 1, 30)  # slots allotted, channel subscribed
    await settled(deciding)
    assert deciding._allotments.get("dep-big")
    reservation, at_once = await decide(deciding.reserve("g", (big, other), (0, 1), "r1", 1, 30))
    assert (reservation.chosen, at_once) == (0, True)
    await failing.record_failures([("g", "dep-big", Failure(cooldown_s=5.0, immediate=True, allowed_fails=1))])
    for _ in range(100):
        if deciding.snapshot("g", (big,))[0].cooldown_s > 0:
            break
        await asyncio.sleep(0.01)
    reservation, at_once = await decide(deciding.reserve("g", (big, other), (0, 1), "r2", 1, 30))
    assert (reservation.chosen, at_once) == (1, True)  # the unlimited one, without waiting either
    assert not any(a.slots for a in deciding._allotments.get("dep-big", []))  # given back
    for store in (deciding, failing):
        await store.close()
