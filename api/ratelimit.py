"""Rate limits per API key: a token bucket each, refused with 429 before any route runs.

A bucket holds `burst` tokens and refills at `rate` a second; a request takes one, and one
that finds less than a token is refused with `Retry-After`. Every answer of a limited route
carries the IETF `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers.
A key is known by its SHA-256 (as the database knows it), never by itself; requests
without a bearer key share a bucket per client address.

Where Redis is the broker, the buckets live there (an atomic Lua script, keys that expire
once full again), so every API process of a deployment counts against the same bucket;
the embedded stack has one API process, and keeps them in memory. A limiter that cannot
reach Redis lets requests through (and says so in the log): an outage of the limiter must
never become an outage of the API.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis
from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import problems
from tuneq.errors import TuneqError
from tuneq.settings import Settings
from tuneq.teams.service import hash_key

log = logging.getLogger(__name__)

# Never limited: probes, the metrics scrape, the OpenAPI document and the dashboard's files.
EXEMPT_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/"}
)
EXEMPT_PREFIXES = ("/ui/",)  # and "/ui" itself
REDIS_PREFIX = "tuneq:ratelimit:"
REDIS_TIMEOUT_SECONDS = 0.5  # a request waits this long for Redis at most, then goes through
# (Settings.rate_limit_redis_timeout_seconds; the default of the setting)
REDIS_PAUSE_SECONDS = 5.0  # after a failure, Redis is left alone (limits off) this long


class RateLimited(TuneqError):
    status, code, title = 429, "rate_limited", "Too many requests"


@dataclass(frozen=True)
class Policy:
    rate: float  # tokens added a second
    burst: int  # the bucket's size: requests that may come at once


@dataclass(frozen=True)
class Decision:
    """What a bucket said to one request: allowed or not, and the tokens left after it."""

    allowed: bool
    tokens: float
    policy: Policy

    @property
    def retry_after(self) -> int:
        """Whole seconds until the bucket holds a token again (at least 1)."""
        return max(1, _whole_seconds((1 - self.tokens) / self.policy.rate))

    def headers(self) -> dict[str, str]:
        """The IETF RateLimit fields: the bucket's size, the requests left now, and the
        seconds until it is full again."""
        full_in = _whole_seconds((self.policy.burst - self.tokens) / self.policy.rate)
        return {
            "RateLimit-Limit": str(self.policy.burst),
            "RateLimit-Remaining": str(max(0, math.floor(self.tokens))),
            "RateLimit-Reset": str(max(0, full_in)),
        }


def _whole_seconds(seconds: float) -> int:
    """Seconds rounded up, but not for the last bits of a float (3.0000000000000004 is 3)."""
    return math.ceil(seconds - 1e-9)


def take_token(tokens: float, elapsed: float, policy: Policy) -> tuple[bool, float]:
    """The token bucket's arithmetic: refill for `elapsed` seconds, then take one token if
    there is one. The Redis script below is this function in Lua."""
    tokens = min(float(policy.burst), tokens + max(0.0, elapsed) * policy.rate)
    if tokens >= 1:
        return True, tokens - 1
    return False, tokens


class Buckets(Protocol):
    async def take(self, identity: str) -> Decision | None:
        """Take a token from `identity`'s bucket; None when that cannot be known now."""

    async def close(self) -> None: ...


class LocalBuckets:
    """The buckets of one process (the embedded stack). Used from the event loop only."""

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._max_entries = max_entries
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, at)

    async def take(self, identity: str) -> Decision:
        now = self._clock()
        tokens, at = self._buckets.pop(identity, (float(self.policy.burst), now))
        allowed, tokens = take_token(tokens, now - at, self.policy)
        self._buckets[identity] = (tokens, max(now, at))  # the most recently used last
        if len(self._buckets) > self._max_entries:
            self._forget(now)
        return Decision(allowed, tokens, self.policy)

    def _forget(self, now: float) -> None:
        """Forget the buckets that filled up again (a new one is the same), then, while
        there are still too many, the least recently used (the fullest of the others)."""
        burst, rate = self.policy.burst, self.policy.rate
        self._buckets = {
            k: (t, at) for k, (t, at) in self._buckets.items() if t + (now - at) * rate < burst
        }
        excess = len(self._buckets) - self._max_entries * 9 // 10  # room for a while
        for identity in list(itertools.islice(self._buckets, max(0, excess))):
            del self._buckets[identity]

    async def close(self) -> None:
        pass


# KEYS[1]: the bucket; ARGV: rate, burst, now (s). Returns {allowed (0/1), tokens left}.
# The caller's clock, not Redis's TIME, so that tests can drive it; the API processes'
# clocks are the hosts' wall clocks, and a clock behind the last writer's refills nothing.
TAKE_TOKEN_LUA = """
local function exact(x) return string.format('%.17g', x) end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', exact(tokens), 'at', exact(math.max(now, at)))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, exact(tokens)}
"""


class RedisBuckets:
    """The buckets of every API process of a deployment, in Redis.

    A failure (Redis down, slow, refusing) lets the request through and leaves Redis alone
    for REDIS_PAUSE_SECONDS, with one warning per outage, so that a dead Redis costs the
    API neither a timeout per request nor a log line per request.
    """

    def __init__(
        self,
        url: str,
        policy: Policy,
        *,
        prefix: str = REDIS_PREFIX,
        clock: Callable[[], float] = time.time,
        timeout: float = REDIS_TIMEOUT_SECONDS,
    ) -> None:
        self.policy = policy
        self._url = url
        self._timeout = timeout
        self._prefix = prefix
        self._clock = clock
        # (the event loop, a client whose connections belong to it, the script on it)
        self._connection: tuple[asyncio.AbstractEventLoop, redis.Redis, AsyncScript] | None = None
        self._paused_until = 0.0
        self._failing = False

    async def take(self, identity: str) -> Decision | None:
        if time.monotonic() < self._paused_until:
            return None
        args = (self.policy.rate, self.policy.burst, self._clock())
        try:
            allowed, tokens = await self._script()(keys=[self._prefix + identity], args=args)
        except (redis.RedisError, OSError) as exc:
            if not self._failing:
                log.warning("rate limits are off until Redis answers: %r", exc)
            self._failing = True
            self._paused_until = time.monotonic() + REDIS_PAUSE_SECONDS
            return None
        if self._failing:
            log.info("rate limits are on again: Redis answers")
            self._failing = False
        return Decision(bool(allowed), float(tokens), self.policy)

    def _script(self) -> AsyncScript:
        # A client's connections belong to the event loop that opened them (a test's
        # clients each run the app on a loop of their own): one client per loop.
        loop = asyncio.get_running_loop()
        if self._connection is None or self._connection[0] is not loop:
            client = redis.Redis.from_url(
                self._url,
                socket_connect_timeout=self._timeout,
                socket_timeout=self._timeout,
                retry=Retry(NoBackoff(), 0),  # not redis-py's 10 retries: the request waits
            )
            self._connection = (loop, client, client.register_script(TAKE_TOKEN_LUA))
        return self._connection[2]

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection[1].aclose()
        self._connection = None


def open_buckets(settings: Settings, policy: Policy) -> Buckets:
    """Redis when it is the broker (shared by every API process), else this process's."""
    broker = settings.resolved_broker_url.split(";")[0]  # Celery's failover list: the first
    if broker.startswith(("redis://", "rediss://")):
        return RedisBuckets(broker, policy, timeout=settings.rate_limit_redis_timeout_seconds)
    return LocalBuckets(policy)


def identity(scope: Scope) -> str:
    """Whose bucket a request takes from: its bearer key's SHA-256, else its address."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return "key:" + hash_key(key.strip())
    client = scope.get("client")
    return "addr:" + (client[0] if client else "unknown")


def is_exempt(path: str) -> bool:
    return path in EXEMPT_PATHS or path == "/ui" or path.startswith(EXEMPT_PREFIXES)


class RateLimit:
    """ASGI middleware: a token from the caller's bucket, or 429 in the road's style.

    Plain ASGI, as api.metrics explains: no task or stream per request."""

    def __init__(self, app: ASGIApp, *, buckets: Buckets) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            try:
                await self.app(scope, receive, send)
            finally:
                await self.buckets.close()
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or is_exempt(path):
            await self.app(scope, receive, send)
            return
        decision = await self.buckets.take(identity(scope))
        if decision is None:  # the limiter cannot tell: let it through
            await self.app(scope, receive, send)
            return
        headers = decision.headers()
        if not decision.allowed:
            retry = decision.retry_after
            refused = RateLimited(
                f"too many requests: at most {decision.policy.burst} at once and "
                f"{decision.policy.rate:g} a second after that; retry in {retry} s",
                extra={"retry_after": retry},
            )
            headers["Retry-After"] = str(retry)
            response = problems.render(Request(scope), refused, headers)
            await response(scope, receive, send)
            return
        fields = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        await self.app(scope, receive, send_with_fields)


def install(app: FastAPI, settings: Settings) -> None:
    """Limit every route but the exempt ones, unless the rate is 0 (no limiter at all)."""
    if settings.rate_limit_per_second <= 0:
        return
    policy = Policy(settings.rate_limit_per_second, settings.rate_limit_burst)
    app.add_middleware(RateLimit, buckets=open_buckets(settings, policy))
