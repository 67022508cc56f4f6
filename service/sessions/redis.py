"""redis://: sessions in Redis (6+, or Valkey), shared by any number of replicas.

Layout, under a key prefix (default ``ntm:``):

- ``{prefix}s:{id}``: a hash with ``v`` (the record's version), ``h`` (JSON header) and ``s``
  (raw float32 state); its TTL is the session's idle TTL, refreshed on every commit.
- ``{prefix}index``: a sorted set of live session IDs scored by expiry time, for the
  capacity limit and the count of live sessions.

Every write is one Lua script, so it is atomic: ``commit`` compares the stored version with
the one the step started from and writes only if they match (compare-and-set), so two
replicas racing on one session never both apply a step, and nothing is ever half-written.

Reads and commits issued concurrently by the micro-batched requests of one replica are
coalesced into one pipeline per event-loop turn, so a batch costs one round trip, not one
per session. Every operation is bounded by ``timeout``; past it, or when Redis cannot be
reached, it raises ``StoreUnavailable``: a read or refused write changed nothing, and a commit
whose answer timed out may have landed (clients that send their expected step index retry safely).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.sessions.codec import decode_record, encode_header
from service.sessions.store import OwnerLimit, SessionExists, SessionRecord, SessionStore, StoreFull, StoreUnavailable

# KEYS: session key, index, owner index.
# ARGV: id, version, header, state, ttl ms, expires at, now, max sessions, max per owner (0: none)
CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[7])
if tonumber(ARGV[8]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[8]) then return -1 end
if tonumber(ARGV[9]) > 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[9]) then return -2 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'h', ARGV[3], 's', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
"""

# KEYS: session key, index, owner index. ARGV: id, expected version, new version, header, state, ttl ms, expires at
COMMIT = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v or v ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'h', ARGV[4], 's', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
return 1
"""


class _Pipeliner:
    """Coalesces the commands issued in one event-loop turn into one pipeline round trip."""

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self.client, self.timeout = client, timeout
        self._pending: list[tuple[Callable[[Any], Any], asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def run(self, queue_command: Callable[[Any], Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((queue_command, future))
        if self._task is None:
            self._task = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let every request of this turn queue its command
        batch, self._pending, self._task = self._pending, [], None
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue_command, _ in batch:
                queue_command(pipe)
            results = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            results = [exc] * len(batch)
        except BaseException as exc:  # never leave a request waiting on a future that nobody sets
            results = [StoreUnavailable(repr(exc))] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(StoreUnavailable(str(result) or type(result).__name__))
            else:
                future.set_result(result)


class RedisStore(SessionStore):
    def __init__(self, url: str, prefix: str = "ntm:", timeout: float = 1.0) -> None:
        self.prefix, self.timeout = prefix, timeout
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._create = self.client.register_script(CREATE)
        self._commit = self.client.register_script(COMMIT)
        self._pipeliner = _Pipeliner(self.client, timeout)
        self.index_key = f"{prefix}index"

    def key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except StoreUnavailable:
            raise
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from None

    def _write_args(self, record: SessionRecord) -> list[Any]:
        return [encode_header(record), record.state.to_bytes(), int(record.ttl_seconds * 1000), record.expires_at]

    def owner_key(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    async def create(
        self, record: SessionRecord, max_sessions: int | None = None, max_per_owner: int | None = None
    ) -> None:
        header, state, ttl_ms, expires = self._write_args(record)
        args = [
            record.session_id,
            record.version,
            header,
            state,
            ttl_ms,
            expires,
            time.time(),
            max_sessions or 0,
            max_per_owner or 0,
        ]
        keys = [self.key(record.session_id), self.index_key, self.owner_key(record.owner)]
        result = await self._call(self._create(keys=keys, args=args))
        if result == -1:
            raise StoreFull
        if result == -2:
            raise OwnerLimit
        if result == 0:
            raise SessionExists(record.session_id)

    async def get(self, session_id: str) -> SessionRecord | None:
        key = self.key(session_id)
        values = await self._pipeliner.run(lambda pipe: pipe.hmget(key, "h", "s"))
        header, state = values
        if header is None or state is None:
            return None
        return decode_record(header, state)

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        header, state, ttl_ms, expires = self._write_args(record)
        keys = [self.key(record.session_id), self.index_key, self.owner_key(record.owner)]
        args = [record.session_id, str(expected_version), str(record.version), header, state, ttl_ms, expires]

        def queue(pipe: Any) -> None:
            pipe.scripts.add(self._commit)  # the pipeline loads it first if Redis lacks it
            pipe.evalsha(self._commit.sha, len(keys), *keys, *args)

        return await self._pipeliner.run(queue) == 1

    async def delete(self, session_id: str, owner: str = "") -> bool:
        async def both() -> int:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.key(session_id))
            pipe.zrem(self.index_key, session_id)
            pipe.zrem(self.owner_key(owner), session_id)
            return (await pipe.execute())[0]

        return bool(await self._call(both()))

    async def count(self) -> int:
        return int(await self._call(self.client.zcount(self.index_key, time.time(), "+inf")))

    async def sweep(self) -> int:
        """Drop expired entries from the live index and from every owner's index (Redis expires the records)."""

        async def both() -> int:
            now = time.time()
            removed = await self.client.zremrangebyscore(self.index_key, "-inf", now)
            async for key in self.client.scan_iter(match=f"{self.prefix}owner:*", count=1000):
                await self.client.zremrangebyscore(key, "-inf", now)
            return removed

        return int(await self._call(both()))

    async def ping(self) -> bool:
        return bool(await self._call(self.client.ping()))

    async def close(self) -> None:
        await self.client.aclose()
