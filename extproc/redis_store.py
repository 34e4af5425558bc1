"""The Redis backend of the counter store: exact limits across processors, one round trip per decision.

Each routing decision is one EVALSHA of RESERVE: it trims the candidates' sliding windows, reads their
state and admits the request on the first candidate (in the strategy's order) that fits, atomically,
using Redis' clock so processors on different hosts agree. Finished requests are settled in batches
(one pipeline per access-log message), off the request path.

All keys of a model group share one hash tag, so the scripts also work on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from .cooldown import Failure
from .resp import RespConnection, RespError
from .store import WINDOW_S, Candidate, CounterStore, DeploymentState, Outcome, Reservation, SampleSettings

log = logging.getLogger("extproc.redis")

_KINDS = ("w", "t", "b", "l", "f", "c", "x")  # window, tokens, leases, latency, ttft, cooldown, failures

# KEYS: per candidate (in candidate order) window zset, token sum, lease zset, latency list, ttft list,
#       cooldown marker, failure counter (7 each).
# ARGV: request id, tokens, lease ms, window ms, sample ttl ms (0: leave the latency means out), then per
#       candidate rpm and tpm (0 = none), then the preference order (1-based candidate indexes).
# Returns: chosen index (0 = none), now (ms), then per candidate rpm_used, tpm_used, in_flight, frees_in_ms,
#          latency mean, ttft mean (as strings; "" when no sample), cooldown ms left.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local request_id, tokens = ARGV[1], tonumber(ARGV[2])
local lease, window, sample_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS / 7
local rpm_used, tpm_used, cooling = {}, {}, {}
for i = 1, n do
  local w, tk = KEYS[i*7-6], KEYS[i*7-5]
  cooling[i] = math.max(0, redis.call('PTTL', KEYS[i*7-1]))
  local expired = redis.call('ZRANGEBYSCORE', w, '-inf', now - window)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do
      freed = freed + tonumber(string.match(member, '|(%-?%d+)$') or '0')
    end
    redis.call('ZREMRANGEBYSCORE', w, '-inf', now - window)
    if freed ~= 0 then redis.call('DECRBY', tk, freed) end
  end
  rpm_used[i] = redis.call('ZCARD', w)
  tpm_used[i] = tonumber(redis.call('GET', tk) or '0')
end
local chosen = 0
for j = 5 + 2 * n + 1, #ARGV do
  local i = tonumber(ARGV[j])
  local rpm, tpm = tonumber(ARGV[5 + 2*i - 1]), tonumber(ARGV[5 + 2*i])
  if cooling[i] == 0 and (rpm == 0 or rpm_used[i] + 1 <= rpm) and (tpm == 0 or tpm_used[i] + tokens <= tpm) then
    chosen = i
    local w, tk, b = KEYS[i*7-6], KEYS[i*7-5], KEYS[i*7-4]
    redis.call('ZADD', w, now, request_id .. '|' .. tokens)
    redis.call('INCRBY', tk, tokens)
    redis.call('PEXPIRE', w, window * 2)
    redis.call('PEXPIRE', tk, window * 2)
    redis.call('ZADD', b, now + lease, request_id)
    redis.call('PEXPIRE', b, lease * 2)
    rpm_used[i] = rpm_used[i] + 1
    tpm_used[i] = tpm_used[i] + tokens
    break
  end
end
local out = {chosen, now}
for i = 1, n do
  local w, b, l, f = KEYS[i*7-6], KEYS[i*7-4], KEYS[i*7-3], KEYS[i*7-2]
  redis.call('ZREMRANGEBYSCORE', b, '-inf', now)
  local oldest = redis.call('ZRANGE', w, 0, 0, 'WITHSCORES')
  local frees_in = 0
  if #oldest > 0 then frees_in = tonumber(oldest[2]) + window - now end
  local means = {'', ''}
  local sampled = {}
  if sample_ttl > 0 then sampled = {l, f} end  -- 0: the caller does not need the means
  for k, key in ipairs(sampled) do
    local samples = redis.call('LRANGE', key, 0, -1)
    local sum, count = 0, 0
    for _, s in ipairs(samples) do
      local at, value = string.match(s, '^(%d+):(.+)$')
      if at and now - tonumber(at) < sample_ttl then
        sum = sum + tonumber(value)
        count = count + 1
      end
    end
    means[k] = count > 0 and tostring(sum / count) or ''
  end
  table.insert(out, rpm_used[i])
  table.insert(out, tpm_used[i])
  table.insert(out, redis.call('ZCARD', b))
  table.insert(out, frees_in)
  table.insert(out, means[1])
  table.insert(out, means[2])
  table.insert(out, cooling[i])
end
return out
"""

# KEYS: window zset, token sum, lease zset, latency list, ttft list (the first five keys of a deployment).
# ARGV: request id, reserved tokens, actual total tokens (-1 unknown), latency sample ("" none),
#       ttft sample ("" none), max samples, sample ttl ms.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local request_id, reserved, actual = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREM', KEYS[3], request_id)
if actual >= 0 and actual ~= reserved then
  local old = request_id .. '|' .. reserved
  local admitted = redis.call('ZSCORE', KEYS[1], old)
  if admitted then
    redis.call('ZREM', KEYS[1], old)
    redis.call('ZADD', KEYS[1], admitted, request_id .. '|' .. actual)
    redis.call('INCRBY', KEYS[2], actual - reserved)
  end
end
local max_samples, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
for k, key in ipairs({KEYS[4], KEYS[5]}) do
  local value = ARGV[3 + k]
  if value ~= '' then
    redis.call('LPUSH', key, now .. ':' .. value)
    redis.call('LTRIM', key, 0, max_samples - 1)
    redis.call('PEXPIRE', key, ttl)
  end
end
return 1
"""

# KEYS: cooldown marker, failure counter of one deployment.
# ARGV: cooldown ms, immediate (1/0), allowed fails.
FAIL = """
local cooldown, immediate, allowed = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
local fails = redis.call('INCR', KEYS[2])
if fails == 1 then redis.call('PEXPIRE', KEYS[2], cooldown) end
if immediate or fails > allowed then
  -- extend, never shorten (LiteLLM #40130 keeps the first, shorter deadline)
  if redis.call('PTTL', KEYS[1]) < cooldown then redis.call('SET', KEYS[1], '1', 'PX', cooldown) end
end
return fails
"""


class RedisStore(CounterStore):
    backend = "redis"

    def __init__(self, url: str, prefix: str = "llm-extproc", samples: SampleSettings | None = None,
                 max_connections: int = 64) -> None:
        # Short timeouts: a decision normally takes a few ms, and an unreachable Redis must fall back to
        # local counting well within Envoy's ext_proc message timeout (2 s).
        self._redis: Redis = Redis.from_url(url, max_connections=max_connections, socket_connect_timeout=0.5,
                                            socket_timeout=0.5, health_check_interval=30)
        self._prefix = prefix
        self._samples = samples or SampleSettings()
        self._reserve = self._redis.register_script(RESERVE)
        # The decision's single round trip goes over a lean pipelined connection (resp.py) when it can.
        self._lean = RespConnection(url, timeout=0.5) if url.startswith("redis://") else None
        self._settle = self._redis.register_script(SETTLE)
        self._fail = self._redis.register_script(FAIL)
        self._key_cache: dict[tuple[str, str], list[str]] = {}
        # This processor's latest view of each deployment: from every reserve reply, with in-flight counts
        # lowered as this processor settles requests. Other processors' activity shows at the next reply.
        self._view: dict[str, DeploymentState] = {}
        self._view_at: dict[str, float] = {}  # when each view entry came from Redis (monotonic)
        self._resending: set[asyncio.Task[None]] = set()
        # Reservations decided without waiting, to be written after this loop turn (_send_unawaited).
        self._unsent: list[tuple[Sequence[Candidate], list[bytes | str | int]]] = []

    def keys(self, group: str, key: str) -> list[str]:
        cached = self._key_cache.get((group, key))
        if cached is None:
            tag = group.replace("{", "(").replace("}", ")")
            base = f"{self._prefix}:{{{tag}}}"
            cached = [f"{base}:{kind}:{key}" for kind in _KINDS]
            self._key_cache[(group, key)] = cached
        return cached

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def reserve(
        self, group: str, candidates: Sequence[Candidate], order: Sequence[int], request_id: str,
        tokens: int, lease_s: float,
    ) -> Reservation:
        keys: list[str] = []
        sample_ttl_ms = int(self._samples.ttl_s * 1000) if self._samples.in_decisions else 0
        args: list[str | int] = [request_id, tokens, int(lease_s * 1000), int(WINDOW_S * 1000), sample_ttl_ms]
        for candidate in candidates:
            keys += self.keys(group, candidate.key)
            args += [candidate.rpm or 0, candidate.tpm or 0]
        unlimited = self._first_without_limits(candidates, order)
        if unlimited is not None and self._lean is not None and self._lean.connected:
            # No limit to check, so nothing to wait for: the reservation (usage, lease, sample window) goes
            # to Redis right after this decision's reply (writing first would let Redis take the CPU before
            # Envoy has the reply), in one write with any others of this loop turn, and is not awaited; its
            # reply refreshes this processor's view when it lands.
            if not self._unsent:
                asyncio.get_running_loop().call_soon(self._send_unawaited)
            self._unsent.append((candidates, [b"EVALSHA", self._reserve.sha, len(keys), *keys, *args, unlimited + 1]))
            return self._admit_in_view(candidates, unlimited, tokens)
        args += [i + 1 for i in order]
        reply = await self._run_reserve(keys, args)
        return self._update_view(candidates, reply)

    def _first_without_limits(self, candidates: Sequence[Candidate], order: Sequence[int]) -> int | None:
        """The candidate RESERVE would admit when that needs no shared check: the first in ``order`` not
        cooling down (as last seen), if it has neither rpm nor tpm. None when a limited one comes first."""
        now = time.monotonic()
        for index in order:
            candidate = candidates[index]
            state = self._view.get(candidate.key)
            if state is not None and state.cooldown_s > now - self._view_at[candidate.key]:
                continue
            return None if candidate.rpm or candidate.tpm else index
        return None

    def _admit_in_view(self, candidates: Sequence[Candidate], chosen: int, tokens: int) -> Reservation:
        key = candidates[chosen].key
        state = self._view.get(key) or DeploymentState()
        self._view[key] = dataclasses.replace(
            state, rpm_used=state.rpm_used + 1, tpm_used=state.tpm_used + tokens, in_flight=state.in_flight + 1
        )
        self._view_at.setdefault(key, time.monotonic())
        return Reservation(chosen, self.snapshot("", candidates), time.time())

    def _update_view(self, candidates: Sequence[Candidate], reply: list[object]) -> Reservation:
        reservation = _parse_reservation(reply, len(candidates))
        now = time.monotonic()
        for candidate, state in zip(candidates, reservation.states, strict=True):
            self._view[candidate.key] = state
            self._view_at[candidate.key] = now
        return reservation

    def _send_unawaited(self) -> None:
        """Write the reservations not awaited so far; called soon after each decision, and before any settle
        so that a request's reservation always reaches Redis ahead of its settle."""
        unsent, self._unsent = self._unsent, []
        if not unsent:
            return
        assert self._lean is not None
        futures = self._lean.send_nowait([command for _, command in unsent])
        if futures is None:
            log.warning("%d unawaited reservations lost: the Redis connection closed", len(unsent))
            return
        for future, (candidates, command) in zip(futures, unsent, strict=True):
            future.add_done_callback(functools.partial(self._on_unawaited_reserve, candidates=candidates,
                                                       command=command))

    def _on_unawaited_reserve(
        self, done: asyncio.Future[object], candidates: Sequence[Candidate], command: list[bytes | str | int]
    ) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None:
            reply = done.result()
            if isinstance(reply, list):
                self._update_view(candidates, reply)
        elif isinstance(error, RespError) and "NOSCRIPT" in str(error):
            task = asyncio.get_running_loop().create_task(self._resend(candidates, command))
            self._resending.add(task)
            task.add_done_callback(self._resending.discard)
        else:
            # The request went to a deployment without limits; only its usage figures miss it.
            log.warning("an unawaited reservation failed: %s", error)

    async def _resend(self, candidates: Sequence[Candidate], command: list[bytes | str | int]) -> None:
        assert self._lean is not None
        try:
            await self._lean.call(b"SCRIPT", b"LOAD", RESERVE)  # Redis restarted and forgot it
            reply = await self._lean.call(*command)
        except (RespError, OSError, TimeoutError) as exc:
            log.warning("an unawaited reservation failed: %s", exc)
            return
        if isinstance(reply, list):
            self._update_view(candidates, reply)

    async def _run_reserve(self, keys: list[str], args: list[str | int]) -> list[object]:
        if self._lean is None:
            return await self._reserve(keys=keys, args=args)  # type: ignore[no-any-return]
        try:
            reply = await self._lean.call(b"EVALSHA", self._reserve.sha, len(keys), *keys, *args)
        except RespError as exc:
            if "NOSCRIPT" not in str(exc):
                raise RedisError(str(exc)) from None
            await self._lean.call(b"SCRIPT", b"LOAD", RESERVE)  # Redis restarted and forgot it
            reply = await self._lean.call(b"EVALSHA", self._reserve.sha, len(keys), *keys, *args)
        assert isinstance(reply, list)
        return reply

    def snapshot(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        empty = DeploymentState()
        return tuple(self._view.get(candidate.key, empty) for candidate in candidates)

    async def settle(self, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        self._send_unawaited()  # a request's reservation goes before its settle
        for outcome in outcomes:
            state = self._view.get(outcome.key)
            if state is not None and state.in_flight > 0:
                self._view[outcome.key] = dataclasses.replace(state, in_flight=state.in_flight - 1)
        await self._pipelined(self._settle, [
            (
                self.keys(outcome.group, outcome.key)[:5],
                [
                    outcome.request_id, outcome.reserved_tokens,
                    -1 if outcome.total_tokens is None else outcome.total_tokens,
                    "" if outcome.latency_s is None else repr(outcome.latency_s),
                    "" if outcome.ttft_s is None else repr(outcome.ttft_s),
                    self._samples.max_samples, int(self._samples.ttl_s * 1000),
                ],
            )
            for outcome in outcomes
        ])

    async def record_failures(self, failures: Sequence[tuple[str, str, Failure]]) -> None:
        if not failures:
            return
        await self._pipelined(self._fail, [
            (self.keys(group, key)[5:], [max(1, int(failure.cooldown_s * 1000)), int(failure.immediate),
                                          failure.allowed_fails])
            for group, key, failure in failures
        ])

    async def _pipelined(self, script: AsyncScript, calls: list[tuple[list[str], list[str | int]]]) -> None:
        """One round trip for a batch of script calls, on the lean connection when there is one (redis-py's
        pipeline costs ~40 µs of CPU per settled request). A NOSCRIPT (Redis restarted) loads the script once
        and retries just the calls that got it."""
        if self._lean is not None:
            commands: list[list[bytes | str | int]] = [
                [b"EVALSHA", script.sha, len(keys), *keys, *args] for keys, args in calls
            ]
            for attempt in range(2):
                replies = await self._lean.call_many(commands)
                failed = [(command, reply) for command, reply in zip(commands, replies, strict=True)
                          if isinstance(reply, RespError)]
                if not failed:
                    return
                if attempt or not all("NOSCRIPT" in str(reply) for _, reply in failed):
                    raise RedisError(str(failed[0][1]))
                await self._lean.call(b"SCRIPT", b"LOAD", str(script.script))
                commands = [command for command, _ in failed]
            return
        # EVALSHA directly, not redis-py's Script objects, which add a SCRIPT EXISTS round trip per pipeline.
        for _ in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                await pipe.execute()
                return
            except NoScriptError:
                await self._redis.script_load(script.script)

    async def states(self, group: str, candidates: Sequence[Candidate]) -> tuple[DeploymentState, ...]:
        # RESERVE with an empty preference order admits nothing and only reports.
        keys: list[str] = []
        args: list[str | int] = ["-", 0, 0, int(WINDOW_S * 1000), int(self._samples.ttl_s * 1000)]
        for candidate in candidates:
            keys += self.keys(group, candidate.key)
            args += [candidate.rpm or 0, candidate.tpm or 0]
        reply = await self._run_reserve(keys, args)
        return _parse_reservation(reply, len(candidates)).states

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        await self._redis.aclose()


def _float_or_none(value: bytes | str) -> float | None:
    text = value.decode() if isinstance(value, bytes) else value
    return float(text) if text else None


def _parse_reservation(reply: list[object], count: int) -> Reservation:
    chosen = int(reply[0])  # type: ignore[call-overload]
    states = []
    for i in range(count):
        rpm, tpm, busy, frees_in_ms, latency, ttft, cooling_ms = reply[2 + 7 * i : 9 + 7 * i]
        states.append(
            DeploymentState(
                rpm_used=int(rpm),  # type: ignore[call-overload]
                tpm_used=int(tpm),  # type: ignore[call-overload]
                in_flight=int(busy),  # type: ignore[call-overload]
                latency=_float_or_none(latency),  # type: ignore[arg-type]
                ttft=_float_or_none(ttft),  # type: ignore[arg-type]
                frees_in_s=max(0.0, int(frees_in_ms) / 1000),  # type: ignore[call-overload]
                cooldown_s=int(cooling_ms) / 1000,  # type: ignore[call-overload]
            )
        )
    return Reservation(chosen - 1 if chosen else None, tuple(states), int(reply[1]) / 1000)  # type: ignore[call-overload]
