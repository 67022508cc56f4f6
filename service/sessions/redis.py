"""redis:// and redis+cluster://: sessions in Redis (6+, or Valkey) or a Redis Cluster (6.2+), shared by any
number of replicas.

Layout on one Redis, under a key prefix (default ``ntm:``):

- ``{prefix}s:{id}``: a hash with ``v`` (the record's version), ``h`` (JSON header), ``s``
  (raw float32 state) and ``c`` (the tokens of the last writes that landed on it); its TTL is
  the session's idle TTL, refreshed on every commit.
- ``{prefix}index``: a sorted set of live session IDs scored by expiry time, for the
  capacity limit and the count of live sessions; ``{prefix}owner:{owner}``, the same per owner.

Every write is one Lua script, so it is atomic: ``commit`` compares the stored version with
the one the step started from and writes only if they match (compare-and-set), so two
replicas racing on one session never both apply a step, and nothing is ever half-written.

On a Redis Cluster a script may touch the keys of one hash slot only, so the layout is another
(``ClusterLayout``): a session's hash is ``{prefix}s:{<id>}``, its own slot (the ID is its hash tag),
and the indexes are ``INDEX_SHARDS`` shards, ``{prefix}index:{<tag>}`` and ``{prefix}owner:{<tag>}:{owner}``,
a session's shard the one whose tag's slot lies in the same sixteenth of the slot space as the
session's own. The compare-and-set scripts touch only the session's hash, exactly as on one Redis;
the index entries are separate steps: a create reserves its entry in its shard first (one script on
the shard's slot, which checks the shard's share of the capacity) and writes the record after, and a
commit refreshes its entries (``ZADD GT``) in the same pipeline as its compare-and-set. What that
keeps exact and what it makes approximate: docs/operations.md, "Redis Cluster".

Reads and commits issued concurrently by the micro-batched requests of one replica are
coalesced into one pipeline per event-loop turn, so a batch costs one round trip, not one
per session (on a cluster, one pipeline per master, sent at once and answered each on its own,
so that a master down fails only the commands it would have served).

Broken connections are retried, within ``timeout``. A pooled connection that Redis closed
(a restart, a failover, an idle timeout on the server or a proxy) fails with redis-py's
``ConnectionError`` on first use; redis-py's own ``Retry`` (``retry_on_error=[ConnectionError,
TimeoutError]``, with exponential backoff and jitter, so replicas that lost Redis together do
not come back in lockstep) then disconnects it and sends the command, or the whole pipeline,
again on a fresh connection. On a cluster the store re-sends itself, with the same backoff: a
pipeline a master did not take, and a command whose connection broke (or that met CLUSTERDOWN),
which the cluster pipeline hands back as that command's answer; it reads the slots' owners again
before each re-send. The cluster client's own attempts are none: before each, redis-py would close
every connection to every master, so that one master down broke the others' pipelines too (and
its table of commands is read once, ``CommandTable``, not again from the first master after every
error). Re-sending a read is harmless. Re-sending a write is made safe by
its token: each ``create`` and ``commit`` call carries a random token that its script keeps in
``c`` when it writes, so a write whose first send landed before the connection broke (Redis ran
it, the answer was lost) finds its own token on the re-send and answers "applied", instead of
a compare-and-set failure that the engine would take for a race and apply the step again.
The scripts are loaded once (``SCRIPT LOAD``, on every master of a cluster) and sent as ``EVALSHA``;
after a restart Redis has forgotten them: an ``EVALSHA`` answered ``NOSCRIPT`` never ran, so
those commands are sent once more as ``EVAL``, with the script's text.

Every operation, retries included, is bounded by ``timeout``; past it, or when Redis refuses
the operation, it raises ``StoreUnavailable``: a read or refused write changed nothing, and a
commit whose answer timed out may have landed (clients that send their expected step index
retry safely).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.commands.core import AsyncScript
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ClusterDownError, NoScriptError, RedisClusterException, RedisError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.sessions.codec import decode_record, encode_header
from service.sessions.store import OwnerLimit, SessionExists, SessionRecord, SessionStore, StoreFull, StoreUnavailable

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SCHEMES = ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)
INDEX_SHARDS = 16  # cluster: index shards, each its own slot (spread over the slot space, so over the masters)
RETRY_BASE_SECONDS = 0.02  # the first backoff: 20-40 ms, doubling on each failure
RETRY_CAP_SECONDS = 1.0  # the longest backoff (redis-py's own default cap)
TOKENS_KEPT = 8  # recent write tokens per session: a re-send finds its own even after other replicas' commits
# a command's answer that says "send me again": a broken connection, a cluster whose layout is changing
RESEND_ON = (RedisConnectionError, RedisTimeoutError, ClusterDownError, SlotNotCoveredError)
STORE_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

# A write's token is kept in ``c`` as "," .. token, newest first, the last TOKENS_KEPT of them;
# tokens are hex, so a search for "," .. token .. "," in c .. "," matches whole tokens only.
KEEP_TOKEN = f"""
local function landed(c, token) return string.find(c .. ',', ',' .. token .. ',', 1, true) ~= nil end
local function kept(c, token) return string.sub(',' .. token .. c, 1, {TOKENS_KEPT} * (#token + 1)) end
"""

# KEYS: session key, then, where they share its slot (one Redis), the index and the owner index.
# ARGV: id, version, header, state, ttl ms, expires at, now, max sessions, max per owner (0: none), token
CREATE = (
    KEEP_TOKEN
    + """
if redis.call('EXISTS', KEYS[1]) == 1 and landed(redis.call('HGET', KEYS[1], 'c') or '', ARGV[10]) then return 1 end
for i = 2, #KEYS do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[7]) end
if tonumber(ARGV[8]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[8]) then return -1 end
if tonumber(ARGV[9]) > 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[9]) then return -2 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'h', ARGV[3], 's', ARGV[4], 'c', kept('', ARGV[10]))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], ARGV[6], ARGV[1]) end
return 1
"""
)

# KEYS: session key, then, where they share its slot (one Redis), the index and the owner index.
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
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], ARGV[7], ARGV[1]) end
return 1
"""
)

# Cluster only. KEYS: an index shard, the owner's part of it (one slot: the shard's hash tag).
# ARGV: id, expires at, now, the shard's share of the capacity (-1: none).
# 1: reserved; 2: the ID was indexed already (a re-send, or a live session's ID); -1: the shard is full.
RESERVE = """
for i = 1, 2 do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[3]) end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 2 end
if tonumber(ARGV[4]) >= 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
for i = 1, 2 do redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1]) end
return 1
"""


def backoff(timeout: float) -> EqualJitterBackoff:
    """Waits doubling from ``RETRY_BASE_SECONDS`` up to a quarter of ``timeout`` or ``RETRY_CAP_SECONDS``,
    each between half and all of that."""
    return EqualJitterBackoff(cap=min(timeout / 4, RETRY_CAP_SECONDS), base=RETRY_BASE_SECONDS)


def retry_policy(timeout: float) -> Retry:
    """redis-py's ``Retry`` for broken connections: ``backoff(timeout)``, and enough retries to keep trying
    for the whole ``timeout``; the store's own deadline (``asyncio.wait_for``) ends the attempts at
    ``timeout`` in any case."""
    cap = min(timeout / 4, RETRY_CAP_SECONDS)
    retries, waited = 0, 0.0
    while waited < timeout:
        retries += 1
        waited += min(cap, RETRY_BASE_SECONDS * 2**retries) / 2  # the shortest wait EqualJitterBackoff draws
    return Retry(backoff(timeout), retries)


def new_token() -> str:
    """A write's identity: 128 random bits, hex (never a comma, see ``KEEP_TOKEN``)."""
    return secrets.token_hex(16)


class CommandTable(AsyncCommandsParser):
    """The cluster client's table of commands (where each keeps its keys), read once from whichever master
    answers. redis-py reads it again from the first master each time it re-reads the cluster's layout,
    which it does after any broken connection, so while that one master was down no command reached any."""

    def __init__(self, client: RedisCluster) -> None:
        super().__init__()
        self.client = client

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node
        candidates = [self.node, *(other for other in self.client.get_primaries() if other != self.node)]
        for candidate in candidates if not self.commands else []:
            try:
                await super().initialize(candidate)
                return
            except (RedisConnectionError, RedisTimeoutError):
                if candidate is candidates[-1]:
                    raise


def cluster_client(url: str, **options: Any) -> RedisCluster:
    """The cluster client of ``redis+cluster://[user:password@]host:port[,host:port...][?option=value...]``
    (``rediss+cluster://``: TLS): it starts from whichever named node answers and discovers the rest.
    The query's options are redis-py's, as in a ``redis://`` URL."""
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = [urlsplit(f"//{host}") for host in hosts.split(",") if host]
    if not nodes:
        raise ValueError(f"{url!r} names no node: write redis+cluster://host:port[,host:port...]")
    first = f"{auth}@{nodes[0].netloc}" if auth else nodes[0].netloc
    first_url = urlunsplit((parts.scheme.removesuffix("+cluster"), first, parts.path, parts.query, ""))
    others = [ClusterNode(node.hostname, node.port or 6379) for node in nodes[1:]]
    client = RedisCluster.from_url(first_url, startup_nodes=others, **options)
    client.commands_parser = CommandTable(client)
    return client


def shard_tags(shards: int) -> list[str]:
    """A hash tag per index shard, shard k's in the k-th of ``shards`` equal ranges of the slot space
    (``ix{k}.{n}``, the first n that lands there), so that every master, owning a range of slots,
    holds its share of the shards."""
    tags = []
    for k in range(shards):
        candidates = (f"ix{k}.{n}" for n in itertools.count())
        tags.append(next(t for t in candidates if key_slot(t.encode()) * shards // REDIS_CLUSTER_HASH_SLOTS == k))
    return tags


@dataclass(frozen=True)
class Op:
    """One command of a pipeline: ``args`` as redis-py's ``execute_command`` takes them, or, with
    ``script``, its keys count, keys and arguments (sent as EVALSHA, or as EVAL after NOSCRIPT).
    ``needed``: False for index upkeep, whose failure fails nothing (it is not re-sent either)."""

    args: tuple
    script: AsyncScript | None = None
    needed: bool = True

    @property
    def key(self) -> str:
        """Its first key, which names its node on a cluster (after the command's name, or the keys count)."""
        return self.args[1]

    def command(self, as_eval: bool = False) -> tuple:
        if self.script is None:
            return self.args
        return ("EVAL", self.script.script, *self.args) if as_eval else ("EVALSHA", self.script.sha, *self.args)


def script_op(script: AsyncScript, keys: list[str], args: list[Any]) -> Op:
    return Op((len(keys), *keys, *args), script)


class _Pipeliner:
    """Coalesces the commands issued in one event-loop turn into one pipeline round trip: on a cluster, one
    pipeline per master, sent at once and answered each on its own, so that a master down fails only its
    own commands."""

    def __init__(self, client: aioredis.Redis | RedisCluster, timeout: float, scripts: list[AsyncScript]) -> None:
        self.client, self.timeout, self.scripts = client, timeout, scripts
        self.cluster = isinstance(client, RedisCluster)
        self._backoff = backoff(timeout)
        self._scripts_loaded = False
        self._pending: list[tuple[Op, asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def run(self, ops: list[Op]) -> list[Any]:
        """The answers to ``ops``, sent with whatever else this turn sends; StoreUnavailable if a needed one
        failed. The answer of an op not needed may be missing (None) when its master is slower than the rest."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in ops]
        self._pending += zip(ops, futures, strict=True)
        if self._task is None:
            self._task = asyncio.ensure_future(self._flush())
        needed = [future for op, future in zip(ops, futures, strict=True) if op.needed]
        if needed:
            await asyncio.wait(needed)  # a cancelled caller leaves the futures to the flush
        answers = [future.result() if future.done() else None for future in futures]
        failed = [a for op, a in zip(ops, answers, strict=True) if op.needed and isinstance(a, BaseException)]
        if failed:
            raise StoreUnavailable(str(failed[0]) or type(failed[0]).__name__)
        return answers

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let every request of this turn queue its commands
        batch, self._pending, self._task = self._pending, [], None
        deadline = asyncio.get_running_loop().time() + self.timeout
        with contextlib.suppress(*STORE_ERRORS):
            await asyncio.wait_for(self._prepare(), self.timeout)
        groups: dict[str, list[tuple[Op, asyncio.Future]]] = {}
        for op, future in batch:
            groups.setdefault(self._node_of(op), []).append((op, future))
        await asyncio.gather(*(self._send(group, deadline) for group in groups.values()))

    async def _prepare(self) -> None:
        """The scripts loaded (``SCRIPT LOAD``, on a cluster on every master) before the first pipeline, and a
        cluster's layout known (``CLUSTER SLOTS`` once, and again after an error). Where either fails, the
        pipelines try again themselves: NOSCRIPT answers load the scripts."""
        if self.cluster:
            await self.client.initialize()
        if not self._scripts_loaded:
            self._scripts_loaded = True  # tried once: a master that missed them answers NOSCRIPT
            for script in self.scripts:
                await self.client.script_load(script.script)

    def _node_of(self, op: Op) -> str:
        """The name of the master serving ``op``'s key (one Redis, or a slot no master serves: "")."""
        if not self.cluster:
            return ""
        try:
            return self.client.get_node_from_key(op.key).name
        except (RedisClusterException, KeyError, IndexError):
            return ""

    async def _send(self, group: list[tuple[Op, asyncio.Future]], deadline: float) -> None:
        ops = [op for op, _ in group]
        try:
            remaining = deadline - asyncio.get_running_loop().time()
            results = await asyncio.wait_for(self._execute(ops), max(remaining, 0.0))
        except STORE_ERRORS as exc:
            results = [exc] * len(ops)
        except BaseException as exc:  # never leave a request waiting on a future that nobody sets
            results = [StoreUnavailable(repr(exc))] * len(ops)
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)  # an exception too, as the answer: run() raises for the needed ones

    async def _execute(self, ops: list[Op]) -> list[Any]:
        """One pipeline of ``ops`` (redis-py re-sends it on a fresh connection if one breaks), then once more
        for those answered NOSCRIPT (a restarted Redis forgot the script, so the command did not run), as
        EVAL, and, after a backoff, again for the needed ones answered a broken connection or CLUSTERDOWN
        (the cluster pipeline's answer where a connection broke while it read), until the caller's deadline."""
        results: list[Any] = [None] * len(ops)
        todo, as_eval, failures = list(range(len(ops))), set(), 0
        while todo:
            pipe = self.client.pipeline(transaction=False)
            for index in todo:
                pipe.execute_command(*ops[index].command(index in as_eval))
            try:
                answers = await pipe.execute(raise_on_error=False)
            except RESEND_ON as exc:  # not sent (a cluster's master down), or one Redis past its own retries
                answers = [exc] * len(todo)
            for index, result in zip(todo, answers, strict=True):
                results[index] = result
            unknown = {index for index in todo if isinstance(results[index], NoScriptError)}
            broken = {index for index in todo if ops[index].needed and isinstance(results[index], RESEND_ON)}
            as_eval |= unknown
            todo = sorted(unknown | broken)
            if broken:
                failures += 1
                await asyncio.sleep(self._backoff.compute(failures))
                if self.cluster:  # a master may have moved: the slots' owners read again, no connection closed
                    with contextlib.suppress(*STORE_ERRORS):
                        await self.client.nodes_manager.initialize()
        return results


class RedisStore(SessionStore):
    """Sessions in one Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster (``redis+cluster://``,
    ``rediss+cluster://``), whose key layout then spreads them and their indexes over the slots."""

    def __init__(self, url: str, prefix: str = "ntm:", timeout: float = 1.0, index_shards: int = INDEX_SHARDS) -> None:
        self.prefix, self.timeout = prefix, timeout
        self.cluster = url.startswith(CLUSTER_SCHEMES)
        # A socket silent for half the budget is taken for dead (a half-open connection, a hung
        # server), which leaves the other half for a fresh connection to answer.
        options: dict[str, Any] = {
            "socket_timeout": timeout / 2,
            "socket_connect_timeout": timeout / 2,
            "retry": retry_policy(timeout),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        if self.cluster:
            # The cluster client's own attempts: none. Before each it would close every connection, to every
            # master, so that one master down broke the others' pipelines too; the store re-sends instead.
            options["retry"] = Retry(backoff(timeout), 0)
            if "{" in prefix or "}" in prefix:
                raise ValueError(
                    f"a Redis Cluster key prefix may not hold a hash tag ({prefix!r}): it would pin every key"
                )
            self.client: aioredis.Redis | RedisCluster = cluster_client(url, **options)
            self.tags = shard_tags(index_shards)
            self.index_keys = [f"{prefix}index:{{{tag}}}" for tag in self.tags]
        else:
            self.client = aioredis.Redis.from_url(url, **options)
            self.index_keys = [f"{prefix}index"]
        self.index_key = self.index_keys[0]  # the index of a single Redis
        self._create = self.client.register_script(CREATE)
        self._commit = self.client.register_script(COMMIT)
        self._reserve = self.client.register_script(RESERVE)
        scripts = [self._create, self._commit, self._reserve] if self.cluster else [self._create, self._commit]
        self._pipeliner = _Pipeliner(self.client, timeout, scripts)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}s:{{{session_id}}}" if self.cluster else f"{self.prefix}s:{session_id}"

    def shard(self, session_id: str) -> int:
        """A session's index shard: the one whose range of slots holds its key's slot (one Redis: the index)."""
        if not self.cluster:
            return 0
        return key_slot(self.key(session_id).encode()) * len(self.index_keys) // REDIS_CLUSTER_HASH_SLOTS

    def owner_key(self, owner: str, shard: int = 0) -> str:
        """The owner's index (on a cluster, its part in ``shard``)."""
        if self.cluster:
            return f"{self.prefix}owner:{{{self.tags[shard]}}}:{owner}"
        return f"{self.prefix}owner:{owner}"

    def _slot_mates(self, record: SessionRecord) -> list[str]:
        """The index keys a write script on the session's key updates too: those in its slot (one Redis: all)."""
        return [] if self.cluster else self._index_entry(record.owner, 0)

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except StoreUnavailable:
            raise
        except STORE_ERRORS as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from None

    def _write_args(self, record: SessionRecord) -> list[Any]:
        return [encode_header(record), record.state.to_bytes(), int(record.ttl_seconds * 1000), record.expires_at]

    async def create(
        self, record: SessionRecord, max_sessions: int | None = None, max_per_owner: int | None = None
    ) -> None:
        await self._call(self._create_once(record, max_sessions, max_per_owner))

    async def _create_once(self, record: SessionRecord, max_sessions: int | None, max_per_owner: int | None) -> None:
        header, state, ttl_ms, expires = self._write_args(record)
        now, reserved, limits = time.time(), 0, [max_sessions or 0, max_per_owner or 0]
        if self.cluster:  # the limits are the reservation's, before the record is written
            reserved, limits = await self._reserve_entry(record, now, max_sessions, max_per_owner), [0, 0]
        keys = [self.key(record.session_id), *self._slot_mates(record)]
        args = [record.session_id, record.version, header, state, ttl_ms, expires, now, *limits]
        args.append(new_token())  # the same on every re-send of this call: see the module docstring
        (result,) = await self._pipeliner.run([script_op(self._create, keys, args)])
        if result == 0 and reserved == 1:  # a live session's ID: what was reserved for it goes again
            shard = self.shard(record.session_id)
            await self._pipeliner.run(
                [Op(("ZREM", key, record.session_id), needed=False) for key in self._index_entry(record.owner, shard)]
            )
        if result == -1:
            raise StoreFull
        if result == -2:
            raise OwnerLimit
        if result == 0:
            raise SessionExists(record.session_id)

    def _index_entry(self, owner: str, shard: int) -> list[str]:
        """Where a session of ``owner`` in ``shard`` is indexed: the live index and its owner's."""
        return [self.index_keys[shard], self.owner_key(owner, shard)]

    async def _reserve_entry(
        self, record: SessionRecord, now: float, max_sessions: int | None, max_per_owner: int | None
    ) -> int:
        """Cluster: the session's index entries, taken before its record is written; 1 when taken now, 2 when
        they were there. StoreFull when its shard holds its share of ``max_sessions``; OwnerLimit when the owner's
        live sessions over all shards (counted just before) are ``max_per_owner``."""
        shards = len(self.index_keys)
        if max_per_owner:
            counts = await self._pipeliner.run(
                [Op(("ZCOUNT", self.owner_key(record.owner, k), now, "+inf")) for k in range(shards)]
            )
            if sum(counts) >= max_per_owner:
                raise OwnerLimit
        shard = self.shard(record.session_id)
        share = -1 if max_sessions is None else max_sessions // shards + (shard < max_sessions % shards)
        keys = self._index_entry(record.owner, shard)
        (reserved,) = await self._pipeliner.run(
            [script_op(self._reserve, keys, [record.session_id, record.expires_at, now, share])]
        )
        if reserved == -1:
            raise StoreFull
        return reserved

    async def get(self, session_id: str) -> SessionRecord | None:
        ((header, state),) = await self._pipeliner.run([Op(("HMGET", self.key(session_id), "h", "s"))])
        if header is None or state is None:
            return None
        return decode_record(header, state)

    async def commit(self, record: SessionRecord, expected_version: int) -> bool:
        header, state, ttl_ms, expires = self._write_args(record)
        keys = [self.key(record.session_id), *self._slot_mates(record)]
        token = new_token()  # the same on every re-send of this call: see the module docstring
        args = [record.session_id, str(expected_version), str(record.version), header, state, ttl_ms, expires, token]
        ops = [script_op(self._commit, keys, args)]
        if self.cluster:  # the index entries' expiry, beside the compare-and-set (GT: never moved back)
            entries = self._index_entry(record.owner, self.shard(record.session_id))
            ops += [Op(("ZADD", key, "GT", expires, record.session_id), needed=False) for key in entries]
        return (await self._pipeliner.run(ops))[0] in (1, 2)  # 2: this commit's first send had landed

    async def delete(self, session_id: str, owner: str = "") -> bool:
        """The record, then its index entries (which, failing, stay till their expiry)."""
        ops = [Op(("DEL", self.key(session_id)))]
        ops += [Op(("ZREM", key, session_id), needed=False) for key in self._index_entry(owner, self.shard(session_id))]
        return bool((await self._call(self._pipeliner.run(ops)))[0])

    async def count(self) -> int:
        now = time.time()
        counts = await self._call(self._pipeliner.run([Op(("ZCOUNT", key, now, "+inf")) for key in self.index_keys]))
        return sum(int(count) for count in counts)

    async def sweep(self) -> int:
        """Drop expired entries from the live index and from every owner's index (Redis expires the records)."""

        async def both() -> int:
            now = time.time()
            removed = 0
            for key in self.index_keys:
                removed += await self.client.zremrangebyscore(key, "-inf", now)
            async for key in self.client.scan_iter(match=f"{self.prefix}owner:*", count=1000):
                await self.client.zremrangebyscore(key, "-inf", now)
            return removed

        return int(await self._call(both()))

    async def ping(self) -> bool:
        """Whether Redis answers; on a cluster, any master (those a master down holds answer 503 meanwhile)."""
        return bool(await self._call(self._ping_any() if self.cluster else self.client.ping()))

    async def _ping_any(self) -> bool:
        await self.client.initialize()
        answers = await asyncio.gather(
            *(self.client.ping(target_nodes=node) for node in self.client.get_primaries()), return_exceptions=True
        )
        return any(answer is True for answer in answers)

    async def close(self) -> None:
        await self.client.aclose()
