"""redis://: sessions in Redis (6+, or Valkey), shared by any number of replicas.

Layout, under a key prefix (default ``ntm:``):

- ``{prefix}s:{id}``: a hash with ``v`` (the record's version), ``h`` (JSON header), ``s``
  (raw float32 state) and ``c`` (the tokens of the last writes that landed on it); its TTL is
  the session's idle TTL, refreshed on every commit.
- ``{prefix}index``: a sorted set of live session IDs scored by expiry time, for the
  capacity limit and the count of live sessions.

Every write is one Lua script, so it is atomic: ``commit`` compares the stored version with
the one the step started from and writes only if they match (compare-and-set), so two
replicas racing on one session never both apply a step, and nothing is ever half-written.

Reads and commits issued concurrently by the micro-batched requests of one replica are
coalesced into one pipeline per event-loop turn, so a batch costs one round trip, not one
per session.

Broken connections are retried, within ``timeout``. A pooled connection that Redis closed
(a restart, a failover, an idle timeout on the server or a proxy) fails with redis-py's
``ConnectionError`` on first use; redis-py's own ``Retry`` (``retry_on_error=[ConnectionError,
TimeoutError]``, with exponential backoff and jitter, so replicas that lost Redis together do
not come back in lockstep) then disconnects it and sends the command, or the whole pipeline,
again on a fresh connection. Re-sending a read is harmless. Re-sending a write is made safe by
its token: each ``create`` and ``commit`` call carries a random token that its script keeps in
``c`` when it writes, so a write whose first send landed before the connection broke (Redis ran
it, the answer was lost) finds its own token on the re-send and answers "applied", instead of
a compare-and-set failure that the engine would take for a race and apply the step again.
After a restart Redis has forgotten its scripts: a pipelined ``EVALSHA`` answered ``NOSCRIPT``
never ran, so those commands are sent once more with the script loaded.

Every operation, retries included, is bounded by ``timeout``; past it, or when Redis refuses
the operation, it raises ``StoreUnavailable``: a read or refused write changed nothing, and a
commit whose answer timed out may have landed (clients that send their expected step index
retry safely).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.sessions.codec import decode_record, encode_header
from service.sessions.store import OwnerLimit, SessionExists, SessionRecord, SessionStore, StoreFull, StoreUnavailable

RETRY_BASE_SECONDS = 0.02  # the first backoff: 20-40 ms, doubling on each failure
RETRY_CAP_SECONDS = 1.0  # the longest backoff (redis-py's own default cap)
TOKENS_KEPT = 8  # recent write tokens per session: a re-send finds its own even after other replicas' commits

# A write's token is kept in ``c`` as "," .. token, newest first, the last TOKENS_KEPT of them;
# tokens are hex, so a search for "," .. token .. "," in c .. "," matches whole tokens only.
KEEP_TOKEN = f"""
local function landed(c, token) return string.find(c .. ',', ',' .. token .. ',', 1, true) ~= nil end
local function kept(c, token) return string.sub(',' .. token .. c, 1, {TOKENS_KEPT} * (#token + 1)) end
"""

# KEYS: session key, index, owner index.
# ARGV: id, version, header, state, ttl ms, expires at, now, max sessions, max per owner (0: none), token
CREATE = (
    KEEP_TOKEN
    + """
if redis.call('EXISTS', KEYS[1]) == 1 and landed(redis.call('HGET', KEYS[1], 'c') or '', ARGV[10]) then return 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[7])
if tonumber(ARGV[8]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[8]) then return -1 end
if tonumber(ARGV[9]) > 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[9]) then return -2 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'h', ARGV[3], 's', ARGV[4], 'c', kept('', ARGV[10]))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return 1
"""
)

# KEYS: session key, index, owner index.
# ARGV: id, expected version, new version, header, state, ttl ms, expires at, token.
# 1: written; 2: this very write had landed already (a re-send); 0: the version moved on (a race).
COMMIT = (
    KEEP_TOKEN
    + """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 0 end
local c = redis.call('HGET', KEYS[1], 'c') or ''
if v ~= ARGV[2] then
  if landed(c, ARGV[8]) then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'h', ARGV[4], 's', ARGV[5], 'c', kept(c, ARGV[8]))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
return 1
"""
)


def retry_policy(timeout: float) -> Retry:
    """redis-py's ``Retry`` for broken connections: backoff doubling from ``RETRY_BASE_SECONDS`` up to a
    quarter of ``timeout`` or ``RETRY_CAP_SECONDS`` (``EqualJitterBackoff``: each wait between half and
    all of that), and enough retries to keep trying for the whole ``timeout``; the store's own deadline
    (``asyncio.wait_for``) ends the attempts at ``timeout`` in any case."""
    cap = min(timeout / 4, RETRY_CAP_SECONDS)
    retries, waited = 0, 0.0
    while waited < timeout:
        retries += 1
        waited += min(cap, RETRY_BASE_SECONDS * 2**retries) / 2  # the shortest wait EqualJitterBackoff draws
    return Retry(EqualJitterBackoff(cap=cap, base=RETRY_BASE_SECONDS), retries)


def new_token() -> str:
    """A write's identity: 128 random bits, hex (never a comma, see ``KEEP_TOKEN``)."""
    return secrets.token_hex(16)


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
            results = await asyncio.wait_for(self._execute([queue for queue, _ in batch]), self.timeout)
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

    async def _execute(self, commands: list[Callable[[Any], Any]]) -> list[Any]:
        """One pipeline of ``commands`` (redis-py re-sends it on a fresh connection if one breaks), then
        once more for those answered NOSCRIPT: a restarted Redis forgot a script between the pipeline's
        ``SCRIPT EXISTS`` and its ``EVALSHA``, which therefore did not run; the new pipeline loads it."""
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for index in todo:
                commands[index](pipe)
            for index, result in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
                results[index] = result
            todo = [index for index in todo if isinstance(results[index], NoScriptError)]
            if not todo:
                break
        return results


class RedisStore(SessionStore):
    def __init__(self, url: str, prefix: str = "ntm:", timeout: float = 1.0) -> None:
        self.prefix, self.timeout = prefix, timeout
        # A socket silent for half the budget is taken for dead (a half-open connection, a hung
        # server), which leaves the other half for a fresh connection to answer.
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout / 2,
            socket_connect_timeout=timeout / 2,
            retry=retry_policy(timeout),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
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
            new_token(),  # the same on every re-send of this call: see the module docstring
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
        token = new_token()  # the same on every re-send of this call: see the module docstring
        args = [record.session_id, str(expected_version), str(record.version), header, state, ttl_ms, expires, token]

        def queue(pipe: Any) -> None:
            pipe.scripts.add(self._commit)  # the pipeline loads it first if Redis lacks it
            pipe.evalsha(self._commit.sha, len(keys), *keys, *args)

        return await self._pipeliner.run(queue) in (1, 2)  # 2: this commit's first send had landed

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
