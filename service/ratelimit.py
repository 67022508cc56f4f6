"""Rate limits per caller: steps (``NTM_RATE_LIMIT_STEPS``) and session creates (``NTM_RATE_LIMIT_SESSIONS``).

A caller is its API key (the key's ID, as sessions are owned) or, with no keys configured, its
client address: uvicorn's ``scope["client"]``, which its ``--proxy-headers`` (on by default)
take from ``X-Forwarded-For`` when the peer is a trusted proxy (``FORWARDED_ALLOW_IPS``,
127.0.0.1 by default). A step costs one; a batch of N steps and a prediction of N images
cost N. Both limits are off by default.

The counting is the ``limits`` library's. With the Redis store it is Redis itself, through
``limits.aio``: an async strategy over ``limits.aio.storage.RedisStorage`` on the store's own
connection pool (``implementation="redispy"`` takes a ``connection_pool``), so every replica
counts against the same budget under ``{NTM_REDIS_PREFIX}ratelimit:``, with the store's
timeouts and reconnects. On a Redis Cluster it is ``limits``' ``RedisClusterStorage`` on the
store's own cluster client (``SharedClusterStorage``): each caller's counter is one key (the
sliding window's two share a hash tag), so the callers spread over the slots. With the memory store each replica counts for itself, with the
synchronous strategy over ``limits.storage.MemoryStorage``, called on the event loop: its
operations are a few dictionary and list operations under a lock (about 5 us a hit), where
``limits.aio.storage.MemoryStorage`` starts a sweep after each hit that visits every key through
``asyncio.to_thread`` (measured: 170-270 us of CPU a hit, more than a step's own). A hit that would pass the limit
consumes nothing with the moving window (``limits`` checks and adds atomically, in a Lua
script on Redis) and is answered 429 with ``Retry-After``: the seconds until the oldest hit in
the window leaves it (``get_window_stats``'s reset time), at least 1. A request that costs more
than the whole limit could never pass, so it is a 422 instead (``too_many_steps``,
``too_many_images``), as a request over the per-request limits is.

The engine charges a request before anything else touches the store or the model, so every
transport (/v1, /v2) shares the one budget and a refused request never reaches the model.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Literal

from limits import RateLimitItem, parse, storage, strategies
from limits.aio import strategies as aio_strategies
from limits.aio.storage import RedisClusterStorage, RedisStorage
from limits.errors import StorageError
from limits.util import WindowStats
from starlette.types import Scope

from service.errors import APIError
from service.metrics import Metrics
from service.sessions.store import SessionStore
from service.settings import Settings

Kind = Literal["steps", "sessions"]
STRATEGY_NAMES = {  # NTM_RATE_LIMIT_STRATEGY -> the class name, the same in limits.strategies and limits.aio.strategies
    "moving-window": "MovingWindowRateLimiter",
    "fixed-window": "FixedWindowRateLimiter",
    "sliding-window-counter": "SlidingWindowCounterRateLimiter",
}


def client_address(scope: Scope) -> str:
    """The client's address as the ASGI server reports it (behind a trusted proxy: X-Forwarded-For's)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def caller_of(owner: str, client: str) -> str:
    """Whom a request counts against: its API key's ID, else its client address."""
    return f"key:{owner}" if owner else f"address:{client or 'unknown'}"


class SharedClusterStorage(RedisClusterStorage):
    """``limits``' Redis Cluster storage on a cluster client of ours (``limits`` would build its own, with
    connections, timeouts and retries apart from the store's), its scripts registered on that client."""

    def __init__(self, client: object, key_prefix: str) -> None:
        self.shared_client = client
        super().__init__(
            "async+redis+cluster://", implementation="redispy", key_prefix=key_prefix, wrap_exceptions=True
        )

    def configure_bridge(self) -> None:
        self.bridge.storage = self.shared_client
        self.bridge.connection_getter = lambda _readonly: self.shared_client

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        """redis-py's errors, and its cluster client's own (a slot no node serves) that are not RedisErrors."""
        from redis.exceptions import RedisClusterException, RedisError

        return (RedisError, RedisClusterException)


def redis_storage(store: SessionStore, settings: Settings) -> RedisStorage | None:
    """``limits``' async Redis storage on the session store's own connections, when the store is Redis."""
    from service.sessions.redis import RedisStore

    if not isinstance(store, RedisStore):
        return None
    key_prefix = f"{settings.redis_prefix}ratelimit"
    if store.cluster:
        return SharedClusterStorage(store.client, key_prefix)
    url = settings.store  # limits' schemes: async+redis://, async+rediss://, async+redis+unix://
    return RedisStorage(
        ("async+redis+" if url.startswith("unix://") else "async+") + url,
        implementation="redispy",
        connection_pool=store.client.connection_pool,
        key_prefix=key_prefix,
        wrap_exceptions=True,
    )


class RateLimits:
    """The service's two rate limits, each off when its setting is unset."""

    def __init__(self, settings: Settings, store: SessionStore, metrics: Metrics) -> None:
        self.metrics, self.timeout = metrics, settings.redis_timeout_seconds
        self.items: dict[str, RateLimitItem | None] = {
            "steps": parse(settings.rate_limit_steps) if settings.rate_limit_steps else None,
            "sessions": parse(settings.rate_limit_sessions) if settings.rate_limit_sessions else None,
        }
        self.limiter: aio_strategies.RateLimiter | None = None  # Redis, shared by the replicas
        self.local: strategies.RateLimiter | None = None  # this process's memory
        self.memory: storage.MemoryStorage | None = None
        if any(self.items.values()):
            name = STRATEGY_NAMES[settings.rate_limit_strategy]
            shared = redis_storage(store, settings)
            if shared is not None:
                self.limiter = getattr(aio_strategies, name)(shared)
            else:
                self.memory = storage.MemoryStorage()
                self.local = getattr(strategies, name)(self.memory)

    async def charge(
        self, kind: Kind, owner: str, client: str, cost: int = 1, too_costly: str = "too_many_steps"
    ) -> None:
        """Count ``cost`` against the caller's ``kind`` limit, or refuse the request: 429 with
        ``Retry-After`` over the limit, 422 ``too_costly`` when it costs more than the limit allows
        at all, 503 when the limits' storage (Redis) does not answer within NTM_REDIS_TIMEOUT_SECONDS."""
        item = self.items[kind]
        if item is None:
            return
        caller = caller_of(owner, client)
        if cost > item.amount:
            raise APIError(
                422, too_costly, f"{cost} {kind} in one request: more than the rate limit of {item} allows at once"
            )
        try:
            stats = await self._hit(item, kind, caller, cost)
        except (StorageError, asyncio.TimeoutError):
            raise APIError(
                503, "unavailable", "the rate limits' store is unavailable; retry shortly", headers={"Retry-After": "1"}
            ) from None
        if stats is None:
            return
        self.metrics.rate_limited.labels(kind).inc()
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        whose = "API key" if owner else "client address"
        raise APIError(
            429,
            "rate_limited",
            f"this {whose} is over its rate limit of {item} {kind}; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    async def _hit(self, item: RateLimitItem, kind: Kind, caller: str, cost: int) -> WindowStats | None:
        """None when ``cost`` was counted; else the window as it stands, for ``Retry-After``."""
        if self.local is not None:
            if self.local.hit(item, kind, caller, cost=cost):
                return None
            return self.local.get_window_stats(item, kind, caller)
        if self.limiter is None:
            return None
        if await asyncio.wait_for(self.limiter.hit(item, kind, caller, cost=cost), self.timeout):
            return None
        return await asyncio.wait_for(self.limiter.get_window_stats(item, kind, caller), self.timeout)

    async def close(self) -> None:
        """Stops the memory storage's expiry timer (the Redis storage's connections are the store's)."""
        timer = getattr(self.memory, "timer", None)
        if timer is not None:
            timer.cancel()
