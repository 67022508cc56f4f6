"""The Redis store on a real 3-master Redis Cluster: exactly once across replicas, spread over the masters,
the single-Redis store's answers, re-sent writes, rate limits, and a master restarted under load.

The module builds its own cluster (``tests.servers.RedisCluster``: three redis-servers in cluster
mode with append-only files, joined by ``redis-cli --cluster create``) and serves two replicas on
it; the restart test, last, kills one master and starts it again on its port.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import replace

import httpx
import pytest
import redis

from service.sessions.redis import RedisStore
from tests.integration import test_redis as single_redis
from tests.integration.test_redis_reconnect import TOKEN_ANSWERS, CuttingProxy, pixels, small_record, token_answers
from tests.servers import RedisCluster, server

TIMEOUT_SECONDS = 3.0  # NTM_REDIS_TIMEOUT_SECONDS of the replicas: a master's restart fits in it
# the in-process stores': generous, for their first call learns the cluster's layout (CLUSTER SLOTS, COMMAND)
# from redis-servers that may share a busy machine
STORE_TIMEOUT_SECONDS = 10.0
PREFIX = "ntmtest:"


@pytest.fixture(scope="module")
def cluster():
    throwaway = RedisCluster(masters=3)
    try:
        yield throwaway
    finally:
        throwaway.close()


@pytest.fixture(scope="module")
def two_replicas(tiny_checkpoint, cluster):
    env = {
        "NTM_MODELS": str(tiny_checkpoint),
        "NTM_STORE": cluster.url,
        "NTM_REDIS_PREFIX": PREFIX,
        "NTM_REDIS_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS),
    }
    with server(env) as a, server(env) as b:
        yield a, b


def cluster_store(cluster: RedisCluster, name: str, **options) -> RedisStore:
    """A store of this test's own prefix."""
    return RedisStore(cluster.url, f"{PREFIX}{name}:", STORE_TIMEOUT_SECONDS, **options)


def keys_by_master(cluster: RedisCluster, pattern: str) -> dict[int, set[bytes]]:
    found = {}
    for node in cluster.nodes:
        client = redis.Redis(port=node.port)
        found[node.port] = set(client.scan_iter(match=pattern, count=1000))
        client.close()
    return found


def test_alternating_replicas_equal_a_single_process(two_replicas, tiny_checkpoint):
    single_redis.test_alternating_replicas_equal_a_single_process(two_replicas, tiny_checkpoint)


def test_racing_clients_over_two_replicas_lose_and_double_nothing(two_replicas):
    single_redis.test_racing_clients_over_two_replicas_lose_and_double_nothing(two_replicas)


def test_sessions_and_their_indexes_spread_over_every_master(two_replicas, cluster):
    a, b = two_replicas
    with httpx.Client(timeout=30) as client:
        sessions = [client.post(f"{(a, b)[i % 2].url}/v1/sessions").json()["session_id"] for i in range(24)]
        for i, session in enumerate(sessions):
            step = client.post(
                f"{(b, a)[i % 2].url}/v1/sessions/{session}/steps", json={"image": {"pixels": pixels(i)}}
            )
            assert step.status_code == 200, step.text
    held = keys_by_master(cluster, f"{PREFIX}s:*")
    holders = {
        session: [port for port, keys in held.items() if f"{PREFIX}s:{{{session}}}".encode() in keys]
        for session in sessions
    }
    assert all(len(ports) == 1 for ports in holders.values()), "each session is one key, on one master"
    assert holders[sessions[0]] == [cluster.node_of(f"{PREFIX}s:{{{sessions[0]}}}").port]
    per_master = Counter(ports[0] for ports in holders.values())
    assert len(per_master) == 3, f"sessions on every master: {per_master}"
    index_keys = RedisStore(cluster.url, PREFIX).index_keys  # the 16 shards: 5 or 6 a master
    assert sorted(Counter(cluster.node_of(key).port for key in index_keys).values()) == [5, 5, 6]
    for pattern in (f"{PREFIX}index:*", f"{PREFIX}owner:*"):  # and those the sessions filled, on every master
        assert all(keys_by_master(cluster, pattern).values())


def test_the_cluster_store_answers_as_one_redis_does(cluster):
    """One shard: the split reservation gives the single store's exact answers; a batch is one pipeline a master;
    a re-sent commit knows its token."""
    one_shard = cluster_store(cluster, "limits", index_shards=1)
    assert asyncio.run(single_redis.limits_and_sweep(one_shard)) == single_redis.LIMITS_AND_SWEEP
    gets, commits, committed = asyncio.run(single_redis.pipelines_of_a_batch(cluster_store(cluster, "p")))
    layout = cluster_store(cluster, "p")  # where the batch's 16 sessions (p0 to p15) and their index shards live
    sessions = {cluster.node_of(layout.key(f"p{i}")) for i in range(16)}
    shards = {cluster.node_of(layout.index_keys[layout.shard(f"p{i}")]) for i in range(16)}
    assert (gets, commits) == (len(sessions), len(sessions | shards)) == (3, 3), "a pipeline a master, at once"
    assert all(committed)
    assert asyncio.run(token_answers(cluster_store(cluster, "tokens"))) == TOKEN_ANSWERS


def test_sharded_capacity_is_never_passed_and_the_owner_limit_holds(cluster):
    async def scenario() -> tuple[int, int, int, str]:
        from service.sessions.store import OwnerLimit, StoreFull

        store = cluster_store(cluster, "cap")
        try:
            created = 0
            for n in range(48):  # 16 shards of one session each: some IDs meet a shard already full
                try:
                    await store.create(small_record(f"c{n}"), max_sessions=16)
                    created += 1
                except StoreFull:
                    pass
            owned = [replace(small_record(f"o{n}"), owner="key") for n in range(4)]
            for record in owned[:3]:
                await store.create(record, max_per_owner=3)
            try:
                await store.create(owned[3], max_per_owner=3)
                fourth = "created"
            except OwnerLimit:
                fourth = "OwnerLimit"
            return created, await store.count(), len({store.shard(f"c{n}") for n in range(48)}), fourth
        finally:
            await store.close()

    created, count, shards_hit, fourth = asyncio.run(scenario())
    assert created == shards_hit <= 16 and count == created + 3
    assert fourth == "OwnerLimit"


def test_scripts_forgotten_by_every_master_are_sent_again(cluster):
    def forget_scripts() -> None:
        for node in cluster.nodes:
            direct = redis.Redis(port=node.port)
            direct.script_flush()
            direct.close()

    async def scenario() -> tuple[bool, int]:
        store = cluster_store(cluster, "flushed")
        try:
            record = small_record("flushed")
            await store.create(record)
            forget_scripts()
            committed = await store.commit(replace(record, version=1, steps=1), 0)
            return committed, (await store.get("flushed")).steps
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (True, 1)


def test_a_commit_whose_answer_was_lost_is_seen_as_applied(cluster):
    """Through a cutting proxy in front of every master: the cluster pipeline hands the broken connection back
    as the commit's answer, the store sends it again, and its token says it had landed."""
    proxies = {node.port: CuttingProxy(node.port) for node in cluster.nodes}

    async def scenario() -> tuple[bool, bool, int, int]:
        startup = f"redis+cluster://127.0.0.1:{proxies[cluster.nodes[0].port].port}"
        store = RedisStore(startup, f"{PREFIX}lost:", STORE_TIMEOUT_SECONDS)
        remap = {port: proxy.port for port, proxy in proxies.items()}  # the nodes the cluster names: their proxies
        store.client.nodes_manager.address_remap = lambda address: (address[0], remap.get(address[1], address[1]))
        try:
            record = small_record("lost-reply")
            await store.create(record)
            proxy = proxies[cluster.node_of(store.key("lost-reply")).port]
            proxy.lose_next_commit_reply()
            landed = await store.commit(replace(record, version=1, steps=1), 0)
            raced = await store.commit(replace(record, version=1, steps=1), 0)
            stored = await store.get("lost-reply")
            return landed, raced, proxy.cuts, stored.version
        finally:
            await store.close()

    try:
        assert asyncio.run(scenario()) == (True, False, 1, 1)
    finally:
        for proxy in proxies.values():
            proxy.close()


def test_rate_limits_count_in_the_cluster(cluster):
    from service.errors import APIError
    from service.metrics import Metrics
    from service.ratelimit import RateLimits
    from service.settings import Settings

    async def scenario(strategy: str) -> list[int]:
        settings = Settings(
            store=cluster.url,
            redis_prefix=f"{PREFIX}{strategy}:",
            rate_limit_steps="3/minute",
            rate_limit_strategy=strategy,
            redis_timeout_seconds=STORE_TIMEOUT_SECONDS,
        )
        store = RedisStore(settings.store, settings.redis_prefix, settings.redis_timeout_seconds)
        limits = RateLimits(settings, store, Metrics())
        answers = []
        try:
            for _ in range(4):
                try:
                    await limits.charge("steps", "", "192.0.2.1")
                    answers.append(200)
                except APIError as refused:
                    answers.append(refused.status)
        finally:
            await limits.close()
            await store.close()
        return answers

    for strategy in ("moving-window", "sliding-window-counter"):  # one key a caller; two keys of one hash tag
        assert asyncio.run(scenario(strategy)) == [200, 200, 200, 429]


def test_a_master_restarted_mid_run_costs_bounded_503s_and_no_other_error(two_replicas, cluster):
    """Clients step on both replicas (naming the step, retrying on 503) while a master is killed and started
    again: 503s only, few, each within the timeout and only for the sessions on that master; the replicas
    stay ready; every step is applied once. The master is slot 0's, the cluster client's first (its default
    node, where redis-py would read the command table again after every broken connection)."""
    import signal

    a, b = two_replicas
    urls = [a.url, b.url]
    victim = cluster.node_of(slot=0)

    def on(session: str) -> bool:
        return cluster.node_of(f"{PREFIX}s:{{{session}}}") == victim

    sessions: list[str] = []
    with httpx.Client(timeout=30) as client:  # two sessions on the victim, four on the other masters
        while sum(on(s) for s in sessions) < 2 or sum(not on(s) for s in sessions) < 4:
            sessions.append(client.post(f"{urls[len(sessions) % 2]}/v1/sessions").json()["session_id"])
    on_victim = {i for i, session in enumerate(sessions) if on(session)}
    answers: list[tuple[int, int, float]] = []  # (client, status, seconds)
    steps = [0] * len(sessions)
    stop = threading.Event()

    def stepper(index: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set() or steps[index] < 3:
                t = steps[index]
                started = time.monotonic()
                body = {"image": {"pixels": pixels(t)}, "label": t % 3, "step": t}
                response = http.post(f"{urls[t % 2]}/v1/sessions/{sessions[index]}/steps", json=body)
                answers.append((index, response.status_code, time.monotonic() - started))
                if response.status_code == 200:
                    steps[index] += 1
                else:
                    time.sleep(0.05)

    threads = [threading.Thread(target=stepper, args=(i,)) for i in range(len(sessions))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        victim.stop(signal.SIGKILL)
        time.sleep(0.5)
        ready_while_down = [httpx.get(f"{url}/readyz", timeout=30).status_code for url in urls]
        victim.start()
        cluster.wait_ok()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    statuses = Counter(status for _, status, _ in answers)
    assert set(statuses) <= {200, 503}, statuses
    unavailable = Counter(i for i, status, _ in answers if status == 503)
    assert all(count <= 5 for count in unavailable.values()), unavailable
    assert set(unavailable) <= on_victim, f"503s for sessions of the other masters: {unavailable}, {on_victim}"
    assert ready_while_down == [200, 200]
    refused = [seconds for _, status, seconds in answers if status == 503]
    assert all(seconds < TIMEOUT_SECONDS + 2 for seconds in refused), refused
    felt = [unavailable[i] or max(seconds for j, _, seconds in answers if j == i) > 0.2 for i in on_victim]
    assert all(felt), "the victim's sessions waited for it"
    with httpx.Client(timeout=30) as client:
        for index, session in enumerate(sessions):
            assert client.get(f"{urls[index % 2]}/v1/sessions/{session}").json()["steps"] == steps[index]
