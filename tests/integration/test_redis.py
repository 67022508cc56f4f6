"""The Redis store across real replicas: exactly once, outages, rolling upgrades, compactness."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import redis
import torch

from service.sessions.redis import RedisStore
from service.sessions.store import SessionStore
from tests.conftest import write_tiny_checkpoint
from tests.servers import RedisServer, server

LABELS = ["a", "b", "a", None, "c", "b", 7, "a", None, "c", 7, "b"]


def episode_images(count: int, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(28, 28)).tolist() for _ in range(count)]


def step_body(image, label, step=None) -> dict:
    body = {"image": {"pixels": image}}
    if label is not None:
        body["label"] = label
    if step is not None:
        body["step"] = step
    return body


def run_episode(urls: list[str], images, labels) -> list[list[float]]:
    """Step one session through ``urls`` in turn (round robin); returns each step's probabilities."""
    with httpx.Client(timeout=30) as client:
        session = client.post(f"{urls[0]}/v1/sessions").json()["session_id"]
        out = []
        for t, (image, label) in enumerate(zip(images, labels, strict=True)):
            response = client.post(
                f"{urls[t % len(urls)]}/v1/sessions/{session}/steps", json=step_body(image, label, t)
            )
            assert response.status_code == 200, response.text
            assert response.json()["step"] == t
            out.append(response.json()["probabilities"])
    return out


@pytest.fixture(scope="module")
def two_replicas(tiny_checkpoint, redis_url, tmp_path_factory):
    prefix = f"ntmtest:replicas{int(time.time() * 1000)}:"
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_STORE": redis_url, "NTM_REDIS_PREFIX": prefix}
    with server(env) as a, server(env) as b:
        yield a, b
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_alternating_replicas_equal_a_single_process(two_replicas, tiny_checkpoint):
    a, b = two_replicas
    images = episode_images(len(LABELS))
    hopping = run_episode([a.url, b.url], images, LABELS)
    with server({"NTM_MODELS": str(tiny_checkpoint)}) as single:
        alone = run_episode([single.url], images, LABELS)
    assert np.abs(np.array(hopping) - np.array(alone)).max() <= 1e-5


def test_racing_clients_over_two_replicas_lose_and_double_nothing(two_replicas):
    a, b = two_replicas
    image = episode_images(1)[0]

    async def race() -> tuple[list[httpx.Response], list[httpx.Response], dict]:
        async with httpx.AsyncClient(timeout=60) as client:
            session = (await client.post(f"{a.url}/v1/sessions")).json()["session_id"]
            urls = [a.url, b.url]
            free = await asyncio.gather(
                *[
                    client.post(f"{urls[i % 2]}/v1/sessions/{session}/steps", json=step_body(image, i % 3))
                    for i in range(40)
                ]
            )
            pinned = await asyncio.gather(
                *[
                    client.post(f"{urls[i % 2]}/v1/sessions/{session}/steps", json=step_body(image, "x", 40))
                    for i in range(20)
                ]
            )
            info = (await client.get(f"{b.url}/v1/sessions/{session}")).json()
            return free, pinned, info

    free, pinned, info = asyncio.run(race())
    assert all(r.status_code == 200 for r in free), [r.text for r in free if r.status_code != 200][:3]
    assert sorted(r.json()["step"] for r in free) == list(range(40))
    assert all(r.status_code in (200, 409) for r in pinned)
    applied = {r.json()["step"] for r in pinned if r.status_code == 200}
    assert applied == {40}, "every 200 for step 40 is that one application, replayed"
    assert len({str(r.json()) for r in pinned if r.status_code == 200}) == 1
    assert info["steps"] == 41


def test_state_from_other_weights_is_refused_with_409(redis_url, redis_prefix, tmp_path):
    old = write_tiny_checkpoint(tmp_path / "v1" / "tiny", seed=1)
    new = write_tiny_checkpoint(tmp_path / "v2" / "tiny", seed=2)
    env = {"NTM_STORE": redis_url, "NTM_REDIS_PREFIX": redis_prefix}
    image = episode_images(1)[0]
    with server({**env, "NTM_MODELS": str(old)}) as before, server({**env, "NTM_MODELS": str(new)}) as after:
        session = httpx.post(f"{before.url}/v1/sessions").json()["session_id"]
        assert httpx.post(f"{before.url}/v1/sessions/{session}/steps", json=step_body(image, "a")).status_code == 200
        response = httpx.post(f"{after.url}/v1/sessions/{session}/steps", json=step_body(image, "a"))
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "state_incompatible"
        assert httpx.get(f"{before.url}/v1/sessions/{session}").json()["steps"] == 1


def test_redis_outage_answers_503_then_sessions_continue(tiny_checkpoint):
    redis_server = RedisServer()
    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_STORE": redis_server.url, "NTM_REDIS_TIMEOUT_SECONDS": "0.5"}
    image = episode_images(1)[0]
    try:
        with server(env) as replica, httpx.Client(base_url=replica.url, timeout=30) as client:
            session = client.post("/v1/sessions").json()["session_id"]
            for t in range(2):
                assert client.post(f"/v1/sessions/{session}/steps", json=step_body(image, "a", t)).status_code == 200
            redis_server.stop()
            started = time.monotonic()
            down = client.post(f"/v1/sessions/{session}/steps", json=step_body(image, "b", 2))
            assert down.status_code == 503 and down.headers["retry-after"]
            assert down.json()["error"]["code"] == "unavailable"
            assert time.monotonic() - started < 5
            assert client.get("/readyz").status_code == 503
            assert client.post("/v1/sessions").status_code == 503
            redis_server.start()
            assert client.get("/readyz").status_code == 200
            back = client.post(f"/v1/sessions/{session}/steps", json=step_body(image, "b", 2))
            assert back.status_code == 200 and back.json()["step"] == 2
            assert client.get(f"/v1/sessions/{session}").json()["steps"] == 3
    finally:
        redis_server.close()


def test_records_are_compact_and_ttl_refreshes_on_commit(redis_url, redis_prefix):
    from dataclasses import replace

    from models import NTM, NTMConfig
    from service.sessions.store import SessionRecord

    async def scenario() -> tuple[int, int, int, bool, bool]:
        store = RedisStore(redis_url, redis_prefix)
        state = NTM(NTMConfig()).initial_state(1).sessions()[0]
        record = SessionRecord("s1", "default", "fp", state, 100.0, time.time() + 100, labels=["a", 3])
        await store.create(record)
        await store.client.pexpire(store.key("s1"), 5_000)
        assert await store.commit(replace(record, version=1, steps=1), 0)
        stale = await store.commit(replace(record, version=1, steps=1), 0)
        ttl = await store.client.pttl(store.key("s1"))
        size = await store.client.memory_usage(store.key("s1"))
        loaded = await store.get("s1")
        count = await store.count()
        await store.close()
        return size, ttl, count, stale, loaded.state.equal(state) and loaded.labels == ["a", 3]

    size, ttl, count, stale, identical = asyncio.run(scenario())
    assert size < 26_000, "state 23,288 bytes plus a small header"
    assert ttl > 90_000, "the commit refreshed the TTL"
    assert count == 1 and not stale and identical


def test_lrua_states_round_trip_through_redis(redis_url, redis_prefix):
    """Four read vectors and a usage row: the state header carries the layout, so any replica decodes it."""
    from models import NTM, NTMConfig
    from service.sessions.store import SessionRecord

    model = NTM(NTMConfig(addressing="lrua", read_heads=4, memory_slots=32, memory_width=8, hidden_size=16))
    _, batch = model.forward_sequence(torch.rand(3, 1, 28, 28), model.label_input(torch.tensor([[0], [1], [-1]])))
    state = batch.detach().sessions()[0]

    async def scenario() -> SessionRecord | None:
        store = RedisStore(redis_url, redis_prefix)
        await store.create(SessionRecord("lrua", "m", "fp", state, 100.0, time.time() + 100))
        loaded = await store.get("lrua")
        await store.close()
        return loaded

    loaded = asyncio.run(scenario())
    assert loaded is not None and loaded.state.layout == state.layout and loaded.state.equal(state)
    assert loaded.state.layout.read_width == 32 and loaded.state.layout.heads == 5


async def pipelines_of_a_batch(store: RedisStore) -> tuple[int, int, list[bool]]:
    """Pipelines that 16 sessions' concurrent gets, then their concurrent commits, took; whether each commit landed."""
    from dataclasses import replace

    from models import NTM, NTMConfig
    from service.sessions.store import SessionRecord

    state = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8)).initial_state(1).sessions()[0]
    records = [SessionRecord(f"p{i}", "default", "fp", state, 60.0, time.time() + 60) for i in range(16)]
    for record in records:
        await store.create(record)
    pipelines = 0
    real_pipeline = store.client.pipeline

    def counting_pipeline(*args, **kwargs):
        nonlocal pipelines
        pipelines += 1
        return real_pipeline(*args, **kwargs)

    store.client.pipeline = counting_pipeline
    loaded = await asyncio.gather(*[store.get(r.session_id) for r in records])
    after_gets = pipelines
    committed = await asyncio.gather(*[store.commit(replace(r, version=1, steps=1), 0) for r in loaded])
    after_commits = pipelines - after_gets
    await store.close()
    return after_gets, after_commits, committed


def test_concurrent_reads_and_commits_share_one_round_trip(redis_url, redis_prefix):
    """The micro-batch's store traffic is pipelined: 16 sessions' gets (and commits) in one round trip each."""
    gets, commits, committed = asyncio.run(pipelines_of_a_batch(RedisStore(redis_url, redis_prefix)))
    assert (gets, commits) == (1, 1)
    assert all(committed)


def test_unreadable_or_taken_records_are_refused_clearly(redis_url, redis_prefix, tiny_checkpoint):
    from models import NTM, NTMConfig
    from service.sessions.memory import MemoryStore
    from service.sessions.store import SessionExists, SessionRecord

    async def taken(store) -> bool:
        state = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8)).initial_state(1).sessions()[0]
        record = SessionRecord("same-id", "default", "fp", state, 60.0, time.time() + 60)
        await store.create(record)
        try:
            await store.create(record)
        except SessionExists:
            return True
        finally:
            await store.close()
        return False

    assert asyncio.run(taken(MemoryStore()))
    assert asyncio.run(taken(RedisStore(redis_url, redis_prefix)))

    env = {"NTM_MODELS": str(tiny_checkpoint), "NTM_STORE": redis_url, "NTM_REDIS_PREFIX": redis_prefix}
    with server(env) as replica:
        session = httpx.post(f"{replica.url}/v1/sessions").json()["session_id"]
        client = redis.Redis.from_url(redis_url)
        client.hset(f"{redis_prefix}s:{session}", "h", b'{"format": 99}')
        client.close()
        response = httpx.get(f"{replica.url}/v1/sessions/{session}")
        assert response.status_code == 409 and response.json()["error"]["code"] == "state_incompatible"


# what limits_and_sweep sees on every store
LIMITS_AND_SWEEP = {
    "full": "StoreFull",
    "owner": "OwnerLimit",
    "count": 2,
    "count_after_expiry": 1,
    "swept": 1,
    "live_kept": True,
}


async def limits_and_sweep(store: SessionStore) -> dict:
    """Full -> StoreFull, an owner at its limit -> OwnerLimit, a live session never evicted, expired ones
    counting for nothing and leaving at the sweep: what ``store`` answers (``LIMITS_AND_SWEEP``)."""
    from models import NTM, NTMConfig
    from service.sessions.store import OwnerLimit, SessionRecord, StoreFull

    state = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8)).initial_state(1).sessions()[0]

    def record(session_id: str, ttl: float, owner: str = "") -> SessionRecord:
        return SessionRecord(session_id, "default", "fp", state, ttl, time.time() + ttl, owner=owner)

    seen: dict = {}
    try:
        await store.count()  # connected first: the short session's 0.2 s is for the creates below
        await store.create(record("short", 0.2), max_sessions=2)
        await store.create(record("live", 60.0, owner="k"), max_sessions=2, max_per_owner=1)
        for name, limits in (("full", {"max_sessions": 2}), ("owner", {"max_sessions": 3, "max_per_owner": 1})):
            try:
                await store.create(record(name, 60.0, owner="k"), **limits)
                seen[name] = "created"
            except (StoreFull, OwnerLimit) as exc:
                seen[name] = type(exc).__name__
        seen["count"] = await store.count()
        await asyncio.sleep(0.3)
        seen["count_after_expiry"] = await store.count()
        seen["swept"] = await store.sweep()
        seen["live_kept"] = (await store.get("live")) is not None
    finally:
        await store.close()
    return seen


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_store_limits_and_sweep_agree_across_stores(kind, redis_url, redis_prefix):
    """Both stores: full -> StoreFull, an owner at its limit -> OwnerLimit, a live session is never evicted,
    expired ones count for nothing and leave at the sweep."""
    from service.sessions.memory import MemoryStore

    store = MemoryStore() if kind == "memory" else RedisStore(redis_url, redis_prefix)
    assert asyncio.run(limits_and_sweep(store)) == LIMITS_AND_SWEEP
