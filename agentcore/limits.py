"""Rate limits and budgets of apps and API keys: the check before a request makes a provider call, the usage each
provider call adds, and the counters both read.

Every limit is a counter for the current period (a UTC minute, day or month) compared with the limit. An app's
counters and its key's are checked alike, so a key's limits can only narrow its app's. Budgets are checked before a
turn, never during one: a turn that crosses a budget finishes, and the next request is refused.

The counters live in Redis when REDIS_URL is set (one Lua script per check: read every counter, refuse or count the
request, atomically, so that N workers racing for the last request let exactly one through), else in this process's
memory (a single process; its counters start over when it restarts)."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentcore.errors import AgentError
from opsagent.common.dependencies import DependencyUnavailable, redis_server
from opsagent.common.metrics import rate_limit_refusal_observe

logger = logging.getLogger(__name__)

# Costs are counted as integers of this unit (the precision of Message.total_price), so Redis adds them exactly.
COST_UNIT = Decimal("0.0000001")

# (limit field, counter, period, what the client is told)
LIMITS = (
    ("requests_per_minute", "req", "minute", "requests per minute"),
    ("tokens_per_minute", "tok", "minute", "tokens per minute"),
    ("tokens_per_day", "tok", "day", "tokens per day"),
    ("tokens_per_month", "tok", "month", "tokens per month"),
    ("cost_per_day", "cost", "day", "cost per day"),
    ("cost_per_month", "cost", "month", "cost per month"),
)
LIMIT_FIELDS = tuple(name for name, *_ in LIMITS)


class OverLimit(AgentError):
    """A limit is reached: `budget` tells a budget (tokens or cost per day or month) from a rate (per minute)."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: int, budget: bool):
        super().__init__(message)
        self.retry_after = retry_after
        self.budget = budget


@dataclass(frozen=True)
class Limits:
    """An app's or a key's limits; 0 is no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    cost_per_day: Decimal = Decimal(0)
    cost_per_month: Decimal = Decimal(0)

    @classmethod
    def of(cls, row: Any) -> Limits:
        return cls(**{name: getattr(row, name) or 0 for name in LIMIT_FIELDS})

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in LIMIT_FIELDS)


@dataclass(frozen=True)
class Meter:
    """Who a request's provider calls are charged to: its app and, on /v1, its API key."""

    app_id: str
    app_limits: Limits = field(default_factory=Limits)
    key_id: str = ""
    key_limits: Limits = field(default_factory=Limits)

    @classmethod
    def of_app(cls, app: Any, *, key_id: str = "", key_limits: Limits | None = None) -> Meter:
        return cls(app_id=str(app.pk), app_limits=Limits.of(app), key_id=key_id, key_limits=key_limits or Limits())

    def scopes(self) -> list[tuple[str, Limits]]:
        scopes = [(f"app:{self.app_id}", self.app_limits)]
        if self.key_id:
            scopes.append((f"key:{self.key_id}", self.key_limits))
        return scopes


# ----- periods -----

def _period(period: str, now: float) -> tuple[str, int]:
    """The current `period`'s name and the seconds left in it."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "minute":
        return str(int(now // 60)), 60 - int(now % 60)
    if period == "day":
        end = datetime(moment.year, moment.month, moment.day, tzinfo=UTC).timestamp() + 86400
        return moment.strftime("%Y%m%d"), max(int(end - now), 1)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return moment.strftime("%Y%m"), max(int(datetime(year, month, 1, tzinfo=UTC).timestamp() - now), 1)


def _key(scope: str, counter: str, period: str, now: float) -> tuple[str, int]:
    name, left = _period(period, now)
    return f"usage:{scope}:{counter}:{period[0]}{name}", left


def _amount(name: str, value: Any) -> int:
    return int(Decimal(value) / COST_UNIT) if name.startswith("cost") else int(value)


# ----- the counters -----

# KEYS: the counters to compare; ARGV: per key its limit and 1 if it counts requests (then also its TTL).
# Returns 0 when every counter is below its limit (the request counters are then incremented), else the 1-based
# index of the first counter at its limit.
_CHECK = """
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used >= tonumber(ARGV[3 * i - 2]) then return i end
end
for i = 1, #KEYS do
  if ARGV[3 * i - 1] == '1' and redis.call('INCR', KEYS[i]) == 1 then
    redis.call('EXPIRE', KEYS[i], ARGV[3 * i])
  end
end
return 0
"""


# KEYS: request counters to give one request back to; a counter that expired meanwhile is left alone (not -1).
_UNCOUNT = """
for i = 1, #KEYS do
  if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
end
return 0
"""


class RedisCounters:
    def __init__(self) -> None:
        self._script = None
        self._uncount = None

    def _client(self):
        return cache._cache.get_client(write=True)

    def _call(self, operation):
        redis_server.check()
        try:
            result = operation()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            redis_server.down(exc)
            raise DependencyUnavailable(redis_server.name) from exc
        redis_server.up()
        return result

    def check(self, checks: list[tuple[str, int, bool, int]]) -> int:
        if self._script is None:
            self._script = self._client().register_script(_CHECK)
        args: list[Any] = []
        for _, limit, counts, ttl in checks:
            args += [limit, "1" if counts else "0", ttl]
        return int(self._call(lambda: self._script(keys=[c[0] for c in checks], args=args)))

    def uncount(self, keys: list[str]) -> None:
        if self._uncount is None:
            self._uncount = self._client().register_script(_UNCOUNT)
        self._call(lambda: self._uncount(keys=keys))

    def add(self, amounts: list[tuple[str, int, int]]) -> None:
        def write():
            pipe = self._client().pipeline(transaction=False)
            for key, amount, ttl in amounts:
                pipe.incrby(key, amount)
                pipe.expire(key, ttl, nx=True)
            pipe.execute()

        self._call(write)

    def read(self, keys: list[str]) -> list[int]:
        return [int(v or 0) for v in self._call(lambda: self._client().mget(keys))]


class MemoryCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, float]] = {}

    def _get(self, key: str, now: float) -> int:
        value, expires = self._values.get(key, (0, 0.0))
        return value if expires > now else 0

    def check(self, checks: list[tuple[str, int, bool, int]]) -> int:
        now = time.time()
        with self._lock:
            for index, (key, limit, _, _) in enumerate(checks, 1):
                if self._get(key, now) >= limit:
                    return index
            for key, _, counts, ttl in checks:
                if counts:
                    self._values[key] = (self._get(key, now) + 1, now + ttl)
        return 0

    def uncount(self, keys: list[str]) -> None:
        now = time.time()
        with self._lock:
            for key in keys:
                value, expires = self._values.get(key, (0, 0.0))
                if value > 0 and expires > now:
                    self._values[key] = (value - 1, expires)

    def add(self, amounts: list[tuple[str, int, int]]) -> None:
        now = time.time()
        with self._lock:
            if len(self._values) > 100_000:
                self._values = {k: v for k, v in self._values.items() if v[1] > now}
            for key, amount, ttl in amounts:
                value, expires = self._values.get(key, (0, 0.0))
                self._values[key] = (value + amount, expires) if expires > now else (amount, now + ttl)

    def read(self, keys: list[str]) -> list[int]:
        now = time.time()
        with self._lock:
            return [self._get(key, now) for key in keys]


_memory = MemoryCounters()
_redis = RedisCounters()


def _counters():
    return _redis if settings.REDIS_URL else _memory


# ----- the service -----

@dataclass(frozen=True)
class Counted:
    """The requests-per-minute counters a usage_check added the request to (none when no such limit applies)."""

    keys: tuple[str, ...] = ()


def usage_check(*, meter: Meter) -> Counted:
    """Refuse (OverLimit) a request whose app or key is at one of its limits; else count it against the
    requests-per-minute limits and return what was counted, for `usage_uncount` should the request be refused after
    all. A refusal counts nothing. Nothing to do, and no round trip, when neither has a limit."""
    checks: list[tuple[str, int, bool, int]] = []
    described: list[tuple[str, str, int, bool]] = []
    now = time.time()
    for scope, limits in meter.scopes():
        if not limits:
            continue
        for name, counter, period, label in LIMITS:
            limit = getattr(limits, name)
            if limit:
                key, left = _key(scope, counter, period, now)
                checks.append((key, _amount(name, limit), counter == "req", left + 1))
                described.append((scope.split(":")[0], name, label, left, period != "minute"))
    if not checks:
        return Counted()
    refused = _counters().check(checks)
    if refused:
        whose, name, label, left, budget = described[refused - 1]
        rate_limit_refusal_observe(scope=whose, limit=name)
        who = "this app" if whose == "app" else "this API key"
        raise OverLimit(f"The limit of {label} of {who} is reached; try again in {left} seconds.",
                        retry_after=left, budget=budget)
    return Counted(keys=tuple(key for key, _, counts, _ in checks if counts))


def usage_uncount(counted: Counted | None) -> None:
    """Take back a request that usage_check counted and that was then refused (bad input, an unknown conversation,
    the app's concurrency limit): only requests let through use the requests-per-minute quota. Best effort: with
    Redis down the request stays counted (and logged), the refusal goes out as it is."""
    if counted is None or not counted.keys:
        return
    try:
        _counters().uncount(list(counted.keys))
    except DependencyUnavailable as exc:
        logger.warning("a refused request stays counted: %s", exc.message)


def usage_record(*, meter: Meter, tokens: int, cost: Decimal) -> None:
    """Add a provider call's tokens and cost to the app's and the key's counters (every period), in one round trip.
    Best effort: with Redis down the usage is lost (and logged), the caller goes on."""
    tokens, units = max(int(tokens), 0), max(_amount("cost", cost or 0), 0)
    if not tokens and not units:
        return
    now = time.time()
    amounts = []
    for scope, _ in meter.scopes():
        for counter, amount in (("tok", tokens), ("cost", units)):
            periods = ("minute", "day", "month") if counter == "tok" else ("day", "month")
            if amount:
                for period in periods:
                    key, left = _key(scope, counter, period, now)
                    amounts.append((key, amount, left + 1))
    try:
        _counters().add(amounts)
    except DependencyUnavailable as exc:
        # After the call: the answer is already given and saved; a Redis outage loses this usage, not the turn.
        logger.warning("usage of %s not counted: %s", meter.app_id, exc.message)


def usage_current(*, scope: str) -> dict[str, Any]:
    """The counters of `scope` ("app:<id>" or "key:<id>") for the current periods, by limit field name."""
    now = time.time()
    keys = [_key(scope, counter, period, now)[0] for _, counter, period, _ in LIMITS]
    values = _counters().read(keys)
    return {name: (Decimal(value) * COST_UNIT).quantize(Decimal("0.0001")) if name.startswith("cost") else value
            for (name, *_), value in zip(LIMITS, values, strict=True)}
