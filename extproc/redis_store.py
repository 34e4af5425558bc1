"""The Redis backend of the counter store: exact limits across processors, at most one round trip per decision.

A routing decision is one EVALSHA of RESERVE: it trims the candidates' sliding windows, reads their state and
admits the request on the first candidate (in the strategy's order) that fits, atomically, using Redis' clock
so processors on different hosts agree. Two cases skip the wait for its reply:
- a first choice without rpm/tpm (nothing to check): RESERVE is sent after the decision's reply;
- a first choice with ample room, on which this processor holds slots allotted ahead (ALLOT): the slot is
  used at once and USE_SLOT sent after the reply (see "allotments" in RedisStore).
Finished requests are settled in batches (one pipeline per access-log message), off the request path, and
cooldowns are published to every processor.

All keys of a model group share one hash tag, so the scripts also work on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from .cooldown import Failure
from .resp import RespConnection, RespError
from .store import WINDOW_S, Candidate, CounterStore, DeploymentState, Outcome, Reservation, SampleSettings

log = logging.getLogger("extproc.redis")

_KINDS = ("w", "t", "b", "l", "f", "c", "x")  # window, tokens, leases, latency, ttft, cooldown, failures

# Allotments (ALLOT below): slots asked for at a time, the count left that triggers the next request, how
# long unused slots are kept before they go back, the room (in slots) a deployment must have left before any
# are allotted (below it every decision is checked in Redis, so allotments never cost a small deployment its
# last requests), and the least tokens a slot carries.
ALLOT_SLOTS = 8
ALLOT_REFILL_BELOW = 4
ALLOT_S = 1.0
ALLOT_LEAST_ROOM = 64
ALLOT_LEAST_TOKENS = 256

# KEYS: per candidate (in candidate order) window zset, token sum, lease zset, latency list, ttft list,
#       cooldown marker, failure counter (7 each).
# ARGV: request id, tokens, lease ms, window ms, sample ttl ms (0: leave the latency means out), then per
#       candidate rpm and tpm (0 = none), then the preference order (1-based candidate indexes).
# Returns: chosen index (0 = none), now (ms), then per candidate rpm_used, tpm_used, in_flight, frees_in_ms,
#          latency mean, ttft mean (as strings; "" when no sample), cooldown ms left.
# Drops a window's entries older than the window and takes their tokens (the member's "|tokens" suffix) off
# the token sum.
_TRIM = """
local function trim(w, tk, now, window)
  local expired = redis.call('ZRANGEBYSCORE', w, '-inf', now - window)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do
      freed = freed + tonumber(string.match(member, '|(%-?%d+)$') or '0')
    end
    redis.call('ZREMRANGEBYSCORE', w, '-inf', now - window)
    if freed ~= 0 then redis.call('DECRBY', tk, freed) end
  end
end
"""

RESERVE = _TRIM + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local request_id, tokens = ARGV[1], tonumber(ARGV[2])
local lease, window, sample_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = #KEYS / 7
local rpm_used, tpm_used, cooling = {}, {}, {}
for i = 1, n do
  local w, tk = KEYS[i*7-6], KEYS[i*7-5]
  cooling[i] = math.max(0, redis.call('PTTL', KEYS[i*7-1]))
  trim(w, tk, now, window)
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
# ARGV: cooldown ms, immediate (1/0), allowed fails, the cooldown channel, the deployment key.
FAIL = """
local cooldown, immediate, allowed = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
local fails = redis.call('INCR', KEYS[2])
if fails == 1 then redis.call('PEXPIRE', KEYS[2], cooldown) end
if immediate or fails > allowed then
  -- extend, never shorten (LiteLLM #40130 keeps the first, shorter deadline)
  if redis.call('PTTL', KEYS[1]) < cooldown then
    redis.call('SET', KEYS[1], '1', 'PX', cooldown)
    -- every processor hears of it at once (decisions taken without a round trip must skip it too)
    redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. cooldown)
  end
end
return fails
"""

# Allotments: window slots a processor reserves ahead for one deployment, so that its decisions there need
# no round trip while the deployment has ample room (see RedisStore). A slot is a window entry like any
# admitted request ("<prefix><n>|<tokens>"), so rpm and tpm count it from the moment it is allotted.
# KEYS: window zset, token sum, cooldown marker. ARGV: window ms, rpm, tpm (0 = none), slots wanted, tokens per
#       slot, member prefix, least room (in slots) left for the per-request check before any slot is allotted.
# Returns: slots allotted, rpm used, tpm used (after the allotment), cooldown ms left (nothing is allotted then).
ALLOT = _TRIM + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w, tk = KEYS[1], KEYS[2]
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want, each, prefix, least = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
trim(w, tk, now, window)
local used, tokens_used = redis.call('ZCARD', w), tonumber(redis.call('GET', tk) or '0')
local granted = 0
local cooling = math.max(0, redis.call('PTTL', KEYS[3]))
if cooling == 0 then
  local room = math.huge
  if rpm > 0 then room = rpm - used end
  if tpm > 0 then room = math.min(room, math.floor((tpm - tokens_used) / each)) end
  if room >= least then granted = math.min(want, math.floor(room / 8)) end
end
for i = 1, granted do
  redis.call('ZADD', w, now, prefix .. i .. '|' .. each)
end
if granted > 0 then
  redis.call('INCRBY', tk, granted * each)
  redis.call('PEXPIRE', w, window * 2)
  redis.call('PEXPIRE', tk, window * 2)
end
return {granted, used + granted, tokens_used + granted * each, cooling}
"""

# A request admitted on an allotted slot: its own entry replaces the slot's, stamped now, with its tokens;
# its in-flight lease starts. (If the slot was gone, returned or expired, the request is counted anew.)
# KEYS: window zset, token sum, lease zset. ARGV: slot member, request id, tokens, tokens per slot, lease ms,
#       window ms.
USE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tokens, each, lease, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  if tokens ~= each then redis.call('INCRBY', KEYS[2], tokens - each) end
else
  redis.call('INCRBY', KEYS[2], tokens)
end
redis.call('ZADD', KEYS[1], now, ARGV[2] .. '|' .. tokens)
redis.call('ZADD', KEYS[3], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], window * 2)
redis.call('PEXPIRE', KEYS[2], window * 2)
redis.call('PEXPIRE', KEYS[3], lease * 2)
return 1
"""

# Unused slots given back. KEYS: window zset, token sum. ARGV: tokens per slot, then the slot members.
RETURN_SLOTS = """
local freed = 0
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then freed = freed + tonumber(ARGV[1]) end
end
if freed > 0 then redis.call('DECRBY', KEYS[2], freed) end
return freed
"""



def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # Redis names scripts by their SHA-1


@dataclasses.dataclass(slots=True, eq=False)
class _Allotment:
    slots: list[str]  # unused slot members
    each: int  # tokens per slot
    expires: float  # monotonic; then the unused slots go back
    window_key: str
    tokens_key: str


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
        # The latest end of a cooldown this processor has heard of, per deployment (monotonic). Kept apart from
        # the view: a reply Redis produced before the cooldown began can arrive after its announcement, and a
        # cooldown never ends early, so only a later end may replace a known one.
        self._cooling_until: dict[str, float] = {}
        self._resending: set[asyncio.Task[None]] = set()
        # Script calls not awaited, to be written after this loop turn (_send_unawaited): script source (for a
        # NOSCRIPT), the command, what to do with the reply.
        self._unsent: list[tuple[str, list[bytes | str | int], Callable[[object], object] | None]] = []
        self._allotments: dict[str, list[_Allotment]] = {}  # deployment key -> slots held, oldest first
        self._allotting: dict[str, asyncio.Task[None]] = {}  # deployment key -> the ALLOT under way
        self._allot_serial = 0
        self._slot_scripts_loaded = False
        self._cooldown_channel = f"{prefix}:cooldowns"
        self._cooldown_watch: asyncio.Task[None] | None = None
        # Set while subscribed to the cooldown channel. Decisions without a round trip (slots, deployments
        # without limits) are taken only then: a cooldown announced while not subscribed would go unheard.
        self._subscribed = asyncio.Event()
        self._closing = False
        self._no_allotment_until: dict[str, float] = {}  # deployment key -> monotonic time to ask again
        self._processor_tag = secrets.token_hex(4)  # keeps this processor's slot names apart from others'
        self._allot_sha = _sha1(ALLOT)
        self._use_slot_sha = _sha1(USE_SLOT)
        self._return_slots_sha = _sha1(RETURN_SLOTS)

    def keys(self, group: str, key: str) -> list[str]:
        cached = self._key_cache.get((group, key))
        if cached is None:
            tag = group.replace("{", "(").replace("}", ")")
            base = f"{self._prefix}:{{{tag}}}"
            cached = [f"{base}:{kind}:{key}" for kind in _KINDS]
            self._key_cache[(group, key)] = cached
        return cached

    def start(self) -> None:
        """Subscribe to cooldown announcements (in the background; again whenever the connection drops)."""
        if self._cooldown_watch is None and not self._closing:
            self._cooldown_watch = asyncio.get_running_loop().create_task(self._watch_cooldowns())

    async def subscribed(self, timeout: float) -> bool:
        """Whether the cooldown channel is subscribed, waiting up to ``timeout`` for it."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        return self._subscribed.is_set()

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def reserve(
        self, group: str, candidates: Sequence[Candidate], order: Sequence[int], request_id: str,
        tokens: int, lease_s: float,
    ) -> Reservation:
        first = self._first_choice(candidates, order)
        if self._cooldown_watch is None:
            self.start()
        lean = self._lean if self._lean is not None and self._lean.connected else None
        if first is not None and lean is not None and self._subscribed.is_set():
            candidate = candidates[first]
            if not (candidate.rpm or candidate.tpm):
                # No limit to check, so nothing to wait for: the reservation (usage, lease, sample window) is
                # sent after this decision's reply and not awaited; its reply refreshes the view.
                keys, args = self._reserve_call(group, candidates, request_id, tokens, lease_s)
                command = [b"EVALSHA", self._reserve.sha, len(keys), *keys, *args, first + 1]
                self._send_later(RESERVE, command, functools.partial(self._update_view, candidates))
                return self._admit_in_view(candidates, first, tokens)
            slot = self._take_slot(candidate, tokens)
            if slot is not None:
                # A slot allotted ahead: the limit was checked when it was allotted.
                member, each = slot
                w, tk, b = self.keys(group, candidate.key)[:3]
                self._send_later(USE_SLOT, [b"EVALSHA", self._use_slot_sha, 3, w, tk, b, member, request_id,
                                            tokens, each, int(lease_s * 1000), int(WINDOW_S * 1000)], None)
                self._allot_ahead(group, candidate, tokens)
                return self._admit_in_view(candidates, first, tokens)
        keys, args = self._reserve_call(group, candidates, request_id, tokens, lease_s)
        args += [i + 1 for i in order]
        reservation = self._update_view(candidates, await self._run_reserve(keys, args))
        if reservation.chosen is not None and self._lean is not None:
            self._allot_ahead(group, candidates[reservation.chosen], tokens)
        return reservation

    def _reserve_call(
        self, group: str, candidates: Sequence[Candidate], request_id: str, tokens: int, lease_s: float
    ) -> tuple[list[str], list[str | int]]:
        keys: list[str] = []
        sample_ttl_ms = int(self._samples.ttl_s * 1000) if self._samples.in_decisions else 0
        args: list[str | int] = [request_id, tokens, int(lease_s * 1000), int(WINDOW_S * 1000), sample_ttl_ms]
        for candidate in candidates:
            keys += self.keys(group, candidate.key)
            args += [candidate.rpm or 0, candidate.tpm or 0]
        return keys, args

    def _first_choice(self, candidates: Sequence[Candidate], order: Sequence[int]) -> int | None:
        """The first candidate in ``order`` not cooling down, as far as this processor knows."""
        now = time.monotonic()
        cooling = self._cooling_until
        for index in order:
            if cooling.get(candidates[index].key, 0.0) <= now:
                return index
        return None

    def _heard_of_cooldown(self, key: str, seconds: float) -> bool:
        """Note a cooldown of ``seconds`` left (from any reply or announcement); True if it is running."""
        if seconds <= 0:
            return self._cooling_until.get(key, 0.0) > time.monotonic()
        until = time.monotonic() + seconds
        if until > self._cooling_until.get(key, 0.0):
            self._cooling_until[key] = until
        return True

    # -- allotments -------------------------------------------------------------------------------------
    #
    # A deployment with rpm/tpm and ample room gets a few window slots reserved ahead by this processor
    # (ALLOT, off the request path), and decisions there use one each without a round trip. The limits stay
    # exact: a slot counts in the window from the moment it is allotted and is replaced by the request's own
    # entry when used (USE_SLOT, sent after the reply, ahead of the settle), so Redis never holds more than
    # rpm entries. Unused slots go back after ALLOT_S; near the limit nothing is allotted and every decision
    # is checked in Redis. A slot carries a fixed number of tokens; a request estimated above it is checked
    # in Redis too.

    def _take_slot(self, candidate: Candidate, tokens: int) -> tuple[str, int] | None:
        allotments = self._allotments.get(candidate.key)
        if not allotments:
            return None
        now = time.monotonic()
        for index, allotment in enumerate(allotments):
            if allotment.slots and allotment.expires > now and (candidate.tpm is None or tokens <= allotment.each):
                slot = allotment.slots.pop()
                if not allotment.slots:
                    # Used up: out of the list at once (its timer finds nothing to return), so the lists
                    # stay short however many allotments a busy deployment goes through each second.
                    del allotments[index]
                return slot, allotment.each
        return None

    def _allot_ahead(self, group: str, candidate: Candidate, tokens: int) -> None:
        """Ask for slots on this deployment when this processor has few left there (one request at a time)."""
        key = candidate.key
        now = time.monotonic()
        if not self._subscribed.is_set() or key in self._allotting or self._no_allotment_until.get(key, 0.0) > now:
            return
        left = sum(len(a.slots) for a in self._allotments.get(key, ()) if a.expires > now)
        if left >= ALLOT_REFILL_BELOW:
            return
        each = max(ALLOT_LEAST_TOKENS, 2 * tokens)
        # Only where the last figures seen leave ample room: a small or busy deployment costs no extra calls.
        state = self._view.get(key) or DeploymentState()
        if candidate.rpm and candidate.rpm - state.rpm_used < ALLOT_LEAST_ROOM:
            return
        if candidate.tpm and (candidate.tpm - state.tpm_used) // each < ALLOT_LEAST_ROOM:
            return
        task = asyncio.get_running_loop().create_task(self._allot(group, candidate, each))
        self._allotting[key] = task
        task.add_done_callback(lambda _: self._allotting.pop(key, None))

    async def _allot(self, group: str, candidate: Candidate, each: int) -> None:
        assert self._lean is not None
        if not self._slot_scripts_loaded:
            # Loaded before any slot exists, so using or returning one never meets NOSCRIPT (whose resend
            # would land after later commands) unless Redis restarts meanwhile.
            try:
                for script in (USE_SLOT, RETURN_SLOTS):
                    await self._lean.call(b"SCRIPT", b"LOAD", script)
            except (RespError, OSError, TimeoutError) as exc:
                log.debug("no slots allotted: %s", exc)
                return
            self._slot_scripts_loaded = True
        self._allot_serial += 1
        prefix = f"~{self._processor_tag}:{self._allot_serial}:"
        w, tk = self.keys(group, candidate.key)[:2]
        cooldown = self.keys(group, candidate.key)[5]
        command: list[bytes | str | int] = [
            b"EVALSHA", self._allot_sha, 3, w, tk, cooldown, int(WINDOW_S * 1000), candidate.rpm or 0,
            candidate.tpm or 0, ALLOT_SLOTS, each, prefix, ALLOT_LEAST_ROOM,
        ]
        try:
            reply = await self._call_script(ALLOT, command)
        except (RespError, RedisError, OSError, TimeoutError) as exc:
            log.debug("no slots allotted: %s", exc)
            return
        assert isinstance(reply, list)
        granted, rpm_used, tpm_used, cooling_ms = (int(value) for value in reply)  # type: ignore[call-overload]
        state = self._view.get(candidate.key) or DeploymentState()
        self._view[candidate.key] = dataclasses.replace(
            state, rpm_used=rpm_used, tpm_used=tpm_used, cooldown_s=cooling_ms / 1000
        )
        if self._heard_of_cooldown(candidate.key, cooling_ms / 1000):
            # Cooling (this reply may predate a cooldown announced meanwhile): no requests there from slots.
            self._return_all_slots(candidate.key)
            if granted:
                self._send_later(RETURN_SLOTS, [b"EVALSHA", self._return_slots_sha, 2, w, tk, each,
                                                *(f"{prefix}{i}|{each}" for i in range(granted, 0, -1))], None)
                granted = 0
        if not granted:
            self._no_allotment_until[candidate.key] = time.monotonic() + ALLOT_S  # cooling, or others took the room
            return
        if granted:
            allotment = _Allotment(
                [f"{prefix}{i}|{each}" for i in range(granted, 0, -1)], each, time.monotonic() + ALLOT_S, w, tk
            )
            self._allotments.setdefault(candidate.key, []).append(allotment)
            asyncio.get_running_loop().call_later(ALLOT_S, self._return_slots, candidate.key, allotment)

    def _return_slots(self, key: str, allotment: _Allotment) -> None:
        allotments = self._allotments.get(key, [])
        if allotment in allotments:
            allotments.remove(allotment)
        if allotment.slots:
            slots, allotment.slots = allotment.slots, []
            self._send_later(RETURN_SLOTS, [b"EVALSHA", self._return_slots_sha, 2, allotment.window_key,
                                            allotment.tokens_key, allotment.each, *slots], None)

    def _return_all_slots(self, key: str) -> None:
        for allotment in list(self._allotments.get(key, ())):
            self._return_slots(key, allotment)

    async def _watch_cooldowns(self) -> None:
        """Cooldowns any processor starts reach this one at once (FAIL publishes them), so decisions taken
        without a round trip (allotted slots, deployments without limits) stop going there. Those decisions
        are taken only while subscribed, and the slots held go back when the subscription is lost: every
        slot in use was allotted (ALLOT checks the cooldown in Redis) while announcements were heard."""
        this = asyncio.current_task()
        assert this is not None

        def running() -> bool:  # redis-py may swallow a cancellation mid-read; cancelling() still tells
            return not self._closing and not this.cancelling()

        while running():
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._cooldown_channel)
                while running():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":  # Redis confirms: from now on nothing is missed
                        self._subscribed.set()
                    elif message["type"] == "message":
                        self._on_cooldown(message["data"])
            except (RedisError, OSError) as exc:
                log.debug("cooldown channel: %s; subscribing again", exc)
                self._unsubscribed()
                await asyncio.sleep(1.0)
            finally:
                self._unsubscribed()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _unsubscribed(self) -> None:
        if self._subscribed.is_set():
            self._subscribed.clear()
            for key in list(self._allotments):
                self._return_all_slots(key)

    def _on_cooldown(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        key, _, milliseconds = text.rpartition(" ")
        state = self._view.get(key) or DeploymentState()
        self._view[key] = dataclasses.replace(state, cooldown_s=int(milliseconds) / 1000)
        self._heard_of_cooldown(key, int(milliseconds) / 1000)
        self._return_all_slots(key)

    # -- the view ---------------------------------------------------------------------------------------

    def _admit_in_view(self, candidates: Sequence[Candidate], chosen: int, tokens: int) -> Reservation:
        key = candidates[chosen].key
        state = self._view.get(key) or DeploymentState()
        # A new state, never changed in place: earlier reservations hold the old one. (Positional: ~10x
        # cheaper than dataclasses.replace, and this runs for every decision taken without a round trip.)
        self._view[key] = DeploymentState(
            state.rpm_used + 1, state.tpm_used + tokens, state.in_flight + 1, state.latency, state.ttft,
            state.frees_in_s, state.cooldown_s,
        )
        return Reservation(chosen, self.snapshot("", candidates), time.time())

    def _update_view(self, candidates: Sequence[Candidate], reply: object) -> Reservation:
        assert isinstance(reply, list)
        reservation = _parse_reservation(reply, len(candidates))
        for candidate, state in zip(candidates, reservation.states, strict=True):
            self._view[candidate.key] = state
            if self._heard_of_cooldown(candidate.key, state.cooldown_s) and candidate.key in self._allotments:
                self._return_all_slots(candidate.key)  # cooling down: no more requests there from slots
        return reservation

    # -- commands sent without waiting --------------------------------------------------------------------

    def _send_later(
        self, script: str, command: list[bytes | str | int], on_reply: Callable[[object], object] | None
    ) -> None:
        """Queue a script call to be written after this loop turn (writing before the decision's reply would
        let Redis take the CPU while Envoy waits), in one write with the others of the turn, not awaited."""
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._send_unawaited)
        self._unsent.append((script, command, on_reply))

    def _send_unawaited(self) -> None:
        """Write the queued calls; called soon after each decision, and before any settle so that a request's
        reservation always reaches Redis ahead of its settle."""
        unsent, self._unsent = self._unsent, []
        if not unsent:
            return
        assert self._lean is not None
        futures = self._lean.send_nowait([command for _, command, _ in unsent])
        if futures is None:
            log.warning("%d reservations not sent: the Redis connection closed", len(unsent))
            return
        for future, (script, command, on_reply) in zip(futures, unsent, strict=True):
            future.add_done_callback(functools.partial(self._on_unawaited_reply, script=script, command=command,
                                                       on_reply=on_reply))

    def _on_unawaited_reply(
        self, done: asyncio.Future[object], script: str, command: list[bytes | str | int],
        on_reply: Callable[[object], object] | None,
    ) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None:
            if on_reply is not None:
                on_reply(done.result())
        elif isinstance(error, RespError) and "NOSCRIPT" in str(error):
            task = asyncio.get_running_loop().create_task(self._resend(script, command, on_reply))
            self._resending.add(task)
            task.add_done_callback(self._resending.discard)
        elif not self._closing:
            # The request was admitted already; only the shared figures miss it.
            log.warning("a reservation sent without waiting failed: %s", error)

    async def _resend(
        self, script: str, command: list[bytes | str | int], on_reply: Callable[[object], object] | None
    ) -> None:
        try:
            reply = await self._call_script(script, command)
        except (RespError, RedisError, OSError, TimeoutError) as exc:
            log.warning("a reservation sent without waiting failed: %s", exc)
            return
        if on_reply is not None:
            on_reply(reply)

    async def _call_script(self, script: str, command: list[bytes | str | int]) -> object:
        """EVALSHA on the lean connection, loading the script once if Redis forgot it (a restart)."""
        assert self._lean is not None
        try:
            return await self._lean.call(*command)
        except RespError as exc:
            if "NOSCRIPT" not in str(exc):
                raise RedisError(str(exc)) from None
        await self._lean.call(b"SCRIPT", b"LOAD", script)
        return await self._lean.call(*command)

    async def _run_reserve(self, keys: list[str], args: list[str | int]) -> list[object]:
        if self._lean is None:
            return await self._reserve(keys=keys, args=args)  # type: ignore[no-any-return]
        reply = await self._call_script(RESERVE, [b"EVALSHA", self._reserve.sha, len(keys), *keys, *args])
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
                self._view[outcome.key] = DeploymentState(
                    state.rpm_used, state.tpm_used, state.in_flight - 1, state.latency, state.ttft,
                    state.frees_in_s, state.cooldown_s,
                )
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
                                          failure.allowed_fails, self._cooldown_channel, key])
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
        self._closing = True
        if self._cooldown_watch is not None:
            self._cooldown_watch.cancel()  # redis-py may swallow it mid-read: the loop also checks _closing
            await asyncio.wait({self._cooldown_watch}, timeout=2.0)
        for task in self._allotting.values():
            task.cancel()
        for key in list(self._allotments):
            self._return_all_slots(key)  # not wasted until they would expire
        if self._lean is not None and self._lean.connected:
            self._send_unawaited()
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
