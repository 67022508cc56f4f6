"""Redis restarts through real replicas: dead pooled connections are retried, commits stay exactly once.

Every test here starts its own redis-server (append-only file, fsync always: a restart keeps
every acknowledged write) on a free port, and stops and starts it under real uvicorn servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import httpx
import numpy as np
import pytest

from service.sessions.redis import RedisStore
from service.sessions.store import SessionRecord
from tests.servers import RedisServer, free_port, server

TIMEOUT_SECONDS = 3.0  # NTM_REDIS_TIMEOUT_SECONDS of the replicas: a restart of a local redis-server fits in it
COMMIT_COMMAND = b"EVALSHA"  # how redis-py sends a registered script (the commit) in a pipeline


def pixels(seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 256, size=(28, 28)).tolist()


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    redis_server = RedisServer()
    try:
        yield redis_server
    finally:
        redis_server.close()


class CuttingProxy:
    """A TCP proxy in front of a real redis-server that breaks one connection at a chosen moment.

    ``lose_next_commit_reply()``: the next request holding a script call goes through, Redis runs
    it, and the connection is closed as its reply comes back, which the client never gets: what a
    Redis crash or a network cut right after a write looks like to the writer.
    ``drop_next_commit(before_close)``: the next request holding a script call never reaches Redis;
    ``before_close`` runs, then the connection is closed.
    It runs its own event loop in a thread, so that it serves servers in other processes too.
    """

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.mode: str | None = None
        self.before_close: Callable[[], None] = lambda: None
        self.cuts = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def lose_next_commit_reply(self) -> None:
        self.mode = "lose reply"

    def drop_next_commit(self, before_close: Callable[[], None]) -> None:
        self.before_close, self.mode = before_close, "drop request"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self.writers += [client_writer, redis_writer]
        cut_on_reply = asyncio.Event()

        def close() -> None:
            client_writer.close()
            redis_writer.close()

        async def requests() -> None:
            while data := await client_reader.read(1 << 16):
                if self.mode is not None and COMMIT_COMMAND in data:
                    mode, self.mode = self.mode, None
                    self.cuts += 1
                    if mode == "drop request":
                        self.before_close()
                        close()
                        return
                    cut_on_reply.set()
                redis_writer.write(data)
                await redis_writer.drain()
            close()

        async def replies() -> None:
            while data := await redis_reader.read(1 << 16):
                if cut_on_reply.is_set():
                    close()
                    return
                client_writer.write(data)
                await client_writer.drain()
            close()

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(requests(), replies())

    def close(self) -> None:
        """Closes the listener and every connection, then the loop and its thread."""

        async def shutdown() -> None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@pytest.fixture
def proxy(restartable_redis: RedisServer) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(restartable_redis.port)
    try:
        yield cutting
    finally:
        cutting.close()


def replica_env(tiny_checkpoint, redis_server: RedisServer | CuttingProxy, timeout: float = TIMEOUT_SECONDS) -> dict:
    return {
        "NTM_MODELS": str(tiny_checkpoint),
        "NTM_STORE": redis_server.url,
        "NTM_REDIS_TIMEOUT_SECONDS": str(timeout),
    }


def test_first_step_of_each_replica_after_a_restart_succeeds(tiny_checkpoint, restartable_redis):
    """The symptom of the issue: each replica's pooled connections die with the restart; none may surface."""
    env = replica_env(tiny_checkpoint, restartable_redis)
    with server(env) as a, server(env) as b, httpx.Client(timeout=30) as client:
        sessions = {}
        for replica in (a, b):
            session = client.post(f"{replica.url}/v1/sessions").json()["session_id"]
            for t in range(3):  # several requests, so the pool holds connections that the restart kills
                step = client.post(f"{replica.url}/v1/sessions/{session}/steps", json={"image": {"pixels": pixels(t)}})
                assert step.status_code == 200, step.text
            sessions[replica.url] = session
        restartable_redis.stop()
        restartable_redis.start()
        for url, session in sessions.items():
            first = client.post(f"{url}/v1/sessions/{session}/steps", json={"image": {"pixels": pixels(9)}, "step": 3})
            assert first.status_code == 200, first.text
            assert first.json()["step"] == 3
            assert client.get(f"{url}/v1/sessions/{session}").json()["steps"] == 4


def test_steps_running_through_a_restart_all_succeed_exactly_once(tiny_checkpoint, restartable_redis):
    """Clients keep stepping on both replicas while Redis stops and starts: no failed step, none lost or doubled."""
    env = replica_env(tiny_checkpoint, restartable_redis)
    with server(env) as a, server(env) as b:
        urls = [a.url, b.url]
        with httpx.Client(timeout=30) as client:
            sessions = [client.post(f"{urls[i % 2]}/v1/sessions").json()["session_id"] for i in range(4)]
        answers: list[tuple[int, int, str, float]] = []  # (client, status, body, seconds)
        stop = threading.Event()

        def stepper(index: int) -> None:
            session = sessions[index]
            with httpx.Client(timeout=30) as http:
                t = 0
                while not stop.is_set() or t < 3:
                    body = {"image": {"pixels": pixels(t)}, "label": t % 3}  # no step index: a retry would double
                    started = time.monotonic()
                    response = http.post(f"{urls[t % 2]}/v1/sessions/{session}/steps", json=body)
                    answers.append((index, response.status_code, response.text, time.monotonic() - started))
                    t += 1

        threads = [threading.Thread(target=stepper, args=(i,)) for i in range(len(sessions))]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        restartable_redis.stop()
        time.sleep(0.3)  # Redis down for a while: the steps in flight wait for it within the timeout
        restartable_redis.start()
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(60)

        failed = [(i, status, text) for i, status, text, _ in answers if status != 200]
        assert not failed, failed[:3]
        assert max(seconds for *_, seconds in answers) > 0.2, "some step was in flight while Redis was down"
        with httpx.Client(timeout=30) as client:
            for index, session in enumerate(sessions):
                sent = sum(1 for i, *_ in answers if i == index)
                assert sent > 3
                assert client.get(f"{urls[index % 2]}/v1/sessions/{session}").json()["steps"] == sent


def test_past_the_timeout_steps_answer_503_in_bounded_time_then_continue(tiny_checkpoint, restartable_redis):
    timeout = 1.0
    env = replica_env(tiny_checkpoint, restartable_redis, timeout)
    with server(env) as replica, httpx.Client(base_url=replica.url, timeout=30) as client:
        session = client.post("/v1/sessions").json()["session_id"]
        assert client.post(f"/v1/sessions/{session}/steps", json={"image": {"pixels": pixels(0)}}).status_code == 200
        restartable_redis.stop()
        durations = []
        for t in range(3):
            started = time.monotonic()
            down = client.post(f"/v1/sessions/{session}/steps", json={"image": {"pixels": pixels(t)}, "step": 1})
            durations.append(time.monotonic() - started)
            assert down.status_code == 503, down.text
            assert down.headers["retry-after"] and down.json()["error"]["code"] == "unavailable"
        assert max(durations) < timeout + 0.5, durations
        assert min(durations) > timeout * 0.5, f"the store was retried for a while before the 503: {durations}"
        restartable_redis.start()
        back = client.post(f"/v1/sessions/{session}/steps", json={"image": {"pixels": pixels(1)}, "step": 1})
        assert back.status_code == 200 and back.json()["step"] == 1


# ----------------------------------------------------------------------------------- writes re-sent


def small_record(session_id: str) -> SessionRecord:
    from models import NTM, NTMConfig

    state = NTM(NTMConfig(memory_slots=8, memory_width=4, hidden_size=8)).initial_state(1).sessions()[0]
    return SessionRecord(session_id, "default", "fp", state, 60.0, time.time() + 60)


def test_a_commit_whose_answer_was_lost_is_seen_as_applied(proxy, restartable_redis):
    """Redis ran the commit, the connection broke before its answer: the re-sent commit reports it applied,
    and a real race (another writer from the same version) is still refused."""

    async def scenario() -> tuple[bool, bool, int, int, int]:
        store = RedisStore(proxy.url, "ntmtest:", timeout=2.0)
        try:
            record = small_record("lost-reply")
            await store.create(record)
            proxy.lose_next_commit_reply()
            landed = await store.commit(replace(record, version=1, steps=1), 0)
            raced = await store.commit(replace(record, version=1, steps=1), 0)
            stored = await store.get("lost-reply")
            return landed, raced, proxy.cuts, stored.version, stored.steps
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (True, False, 1, 1, 1)


def test_a_create_whose_answer_was_lost_is_not_taken_for_a_collision(proxy, restartable_redis):
    async def scenario() -> tuple[int, bool]:
        store = RedisStore(proxy.url, "ntmtest:", timeout=2.0)
        try:
            proxy.lose_next_commit_reply()
            await store.create(small_record("lost-create"), max_sessions=1, max_per_owner=1)
            return proxy.cuts, (await store.get("lost-create")) is not None
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (1, True)


def test_a_commit_that_meets_a_forgotten_script_is_sent_again(proxy, restartable_redis):
    """A restart between the pipeline's SCRIPT EXISTS and its EVALSHA: NOSCRIPT, so it did not run; sent again."""
    import redis

    def forget_scripts() -> None:
        direct = redis.Redis(port=restartable_redis.port)
        direct.script_flush()
        direct.close()

    async def scenario() -> tuple[bool, int, int]:
        store = RedisStore(proxy.url, "ntmtest:", timeout=2.0)
        try:
            record = small_record("flushed")
            await store.create(record)
            proxy.drop_next_commit(forget_scripts)
            committed = await store.commit(replace(record, version=1, steps=1), 0)
            return committed, proxy.cuts, (await store.get("flushed")).steps
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (True, 1, 1)


async def token_answers(store: RedisStore) -> list[int]:
    """The commit script's answers to a re-send of a write among later ones, to a stranger's stale write, and
    to a re-send after its token fell out of the last ``TOKENS_KEPT``: ``TOKEN_ANSWERS``."""
    try:
        record = small_record("tokens")
        await store.create(record)
        keys = [store.key("tokens"), *store._slot_mates(record)]

        async def commit(expected: int, token: str) -> int:
            header, state, ttl_ms, expires = store._write_args(replace(record, version=expected + 1))
            args = ["tokens", str(expected), str(expected + 1), header, state, ttl_ms, expires, token]
            return await store._commit(keys=keys, args=args)

        mine, others = "a" * 32, [f"{n:032x}" for n in range(1, 12)]
        answers = [await commit(0, mine)]  # written: version 1
        answers += [await commit(n + 1, token) for n, token in enumerate(others[:3])]  # versions 2-4
        answers += [await commit(0, mine), await commit(0, "b" * 32)]  # a re-send; a stranger's stale write
        answers += [await commit(n + 4, token) for n, token in enumerate(others[3:10])]  # mine falls out
        answers.append(await commit(0, mine))
        return answers
    finally:
        await store.close()


TOKEN_ANSWERS = [1, 1, 1, 1, 2, 0] + [1] * 7 + [0]


def test_a_resent_commit_finds_its_token_after_later_commits(restartable_redis):
    """The script's own rule, through real Redis: a token is recognised among the last writes, and only its own."""
    assert asyncio.run(token_answers(RedisStore(restartable_redis.url, "ntmtest:"))) == TOKEN_ANSWERS


def test_a_step_whose_commit_answer_was_lost_is_applied_once(tiny_checkpoint, proxy):
    """Through a real server: a step with no step index, whose commit landed unanswered, is not applied twice."""
    with (
        server(replica_env(tiny_checkpoint, proxy)) as replica,
        httpx.Client(base_url=replica.url, timeout=30) as client,
    ):
        session = client.post("/v1/sessions").json()["session_id"]
        proxy.lose_next_commit_reply()
        step = client.post(f"/v1/sessions/{session}/steps", json={"image": {"pixels": pixels(0)}, "label": "a"})
        assert step.status_code == 200, step.text
        assert proxy.cuts == 1
        info = client.get(f"/v1/sessions/{session}").json()
        assert info["steps"] == 1 and info["labels"][0] == "a"
