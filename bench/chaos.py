"""``python -m bench.chaos``: two replicas on one Redis, clients that retry, and faults on purpose.

Two real uvicorn replicas share a real redis-server with persistence on (append-only file,
fsync on every write). ``--clients`` clients each loop over episodes: open a session, then send
its ``--steps`` steps one request at a time, alternating replicas, each step with the index it
expects (``"step": i``). A request that fails with 503, 429, a connection error or a timeout is
sent again, the same body, to the other replica, after a short backoff, until it succeeds.

During the run (``--seconds``), at a third of it one replica is killed with SIGKILL and
started again on its port, and at two thirds redis-server is stopped and started again (it
reloads its append-only file). Then every session a client finished is checked:

- its stored step count equals the steps its client saw succeed (none lost, none added);
- its stored state equals a one-process replay of its episode (``forward_sequence``), and so do
  the probabilities the client was answered at every step (nothing applied twice): to 1e-4 plus
  1e-3 of the value. The replay sums in batches of other sizes than the served steps did, which
  moves float32 results of the shipped ``fast`` model by up to 5.5e-5 over 50 steps (measured over
  41,800 steps); a step applied twice, or one lost, moves them by tenths;
- no request was answered with an error other than the retryable ones.

It reports steps/s (successful steps over the run's wall time, faults included), the requests
that had to be retried, and the longest unavailability each client saw: the longest time from a
step's first attempt to its success. ``tests/integration/test_chaos.py`` runs a small one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import fmt, machine_load, markdown_table, percentile, write_json
from models import load_checkpoint
from models.data.preprocess import preprocess
from service.sessions.redis import RedisStore
from tests.servers import RedisServer, ServerProcess

RETRYABLE = {429, 503}
ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE = 1e-4, 1e-3
BACKOFF_SECONDS = 0.05
NUM_LABELS = 5


@dataclass
class Episode:
    """One session as its client saw it: the images and labels sent, and the probabilities answered."""

    session_id: str
    seed: int
    labels: list[int | None]
    probabilities: list[list[float]] = field(default_factory=list)

    def images(self, steps: int) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return [rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(steps)]


@dataclass
class ClientLog:
    episodes: list[Episode] = field(default_factory=list)
    retries: int = 0
    longest_unavailable: float = 0.0
    errors: list[str] = field(default_factory=list)


def step_body(image: np.ndarray, label: int | None, index: int) -> dict:
    body: dict = {"image": {"gray8": base64.b64encode(image.tobytes()).decode(), "shape": [28, 28]}, "step": index}
    if label is not None:
        body["label"] = label
    return body


class Replicas:
    """The replicas' base URLs, and their processes, which the fault schedule kills and restarts."""

    def __init__(self, env: dict[str, str], count: int = 2) -> None:
        self.env = env
        self.servers = [ServerProcess(env).wait_ready() for _ in range(count)]
        self.urls = [server.url for server in self.servers]

    def kill_and_restart(self, index: int) -> float:
        """SIGKILL replica ``index``, start it again on its port; the seconds until it was ready again."""
        old = self.servers[index]
        started = time.monotonic()
        old.stop(signal.SIGKILL)
        old.log_path.unlink(missing_ok=True)
        self.servers[index] = ServerProcess(self.env, port=old.port).wait_ready()
        return time.monotonic() - started

    def close(self) -> None:
        for server in self.servers:
            server.stop()
            server.log_path.unlink(missing_ok=True)


async def request_until_done(
    http: httpx.AsyncClient, urls: list[str], first: int, method: str, path: str, body: dict | None, log: ClientLog
) -> dict:
    """Send ``body`` until a replica answers it (2xx); retryable failures go to the next replica."""
    started, attempt = time.monotonic(), 0
    while True:
        url = urls[(first + attempt) % len(urls)] + path
        try:
            response = await http.request(method, url, json=body)
            if response.status_code < 300:
                log.longest_unavailable = max(log.longest_unavailable, time.monotonic() - started)
                return response.json()
            if response.status_code not in RETRYABLE:
                raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        except httpx.TransportError:
            pass
        attempt += 1
        log.retries += 1
        await asyncio.sleep(BACKOFF_SECONDS)


async def client(index: int, urls: list[str], steps: int, deadline: float, log: ClientLog) -> None:
    """Episodes until ``deadline``; a started episode is finished."""
    rng = np.random.default_rng(index)
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline:
            created = await request_until_done(http, urls, index, "POST", "/v1/sessions", {}, log)
            labels = [None if rng.random() < 0.1 else int(rng.integers(NUM_LABELS)) for _ in range(steps)]
            episode = Episode(created["session_id"], int(rng.integers(2**31)), labels)
            for step, image in enumerate(episode.images(steps)):
                path = f"/v1/sessions/{episode.session_id}/steps"
                answer = await request_until_done(
                    http, urls, index + step, "POST", path, step_body(image, labels[step], step), log
                )
                if answer["step"] != step:
                    log.errors.append(f"{episode.session_id}: step {step} answered as {answer['step']}")
                episode.probabilities.append(answer["probabilities"])
            log.episodes.append(episode)


async def run_clients(
    replicas: Replicas, redis: RedisServer, clients: int, steps: int, seconds: float
) -> tuple[list[ClientLog], dict]:
    """The clients, and the fault schedule beside them; the logs and when each fault happened."""
    logs = [ClientLog() for _ in range(clients)]
    started = time.monotonic()
    deadline = started + seconds
    tasks = [asyncio.create_task(client(i, replicas.urls, steps, deadline, logs[i])) for i in range(clients)]
    faults: dict = {}
    await asyncio.sleep(seconds / 3)
    faults["replica_killed_at_s"] = round(time.monotonic() - started, 2)
    faults["replica_back_after_s"] = round(await asyncio.to_thread(replicas.kill_and_restart, 0), 2)
    await asyncio.sleep(max(0.0, started + 2 * seconds / 3 - time.monotonic()))
    faults["redis_restarted_at_s"] = round(time.monotonic() - started, 2)
    restarted = time.monotonic()
    await asyncio.to_thread(redis.stop)
    await asyncio.to_thread(redis.start)
    faults["redis_back_after_s"] = round(time.monotonic() - restarted, 2)
    await asyncio.gather(*tasks)
    faults["wall_seconds"] = round(time.monotonic() - started, 2)
    return logs, faults


def replay(model_dir: Path, episodes: list[Episode], steps: int) -> tuple[np.ndarray, torch.Tensor]:
    """One process's probabilities [E, T, K] and packed final states [E, n] for every episode."""
    model = load_checkpoint(model_dir)
    size, ways = model.config.image_size, model.config.num_ways
    images = torch.from_numpy(
        np.stack(
            [np.stack([preprocess(image.astype(np.float32), size) for image in e.images(steps)]) for e in episodes],
            axis=1,
        )
    )  # [T, E, S, S]
    label_inputs = torch.zeros(steps, len(episodes), ways)
    for column, episode in enumerate(episodes):
        slots: dict[int, int] = {}
        previous = -1
        for t, label in enumerate(episode.labels):
            if previous >= 0:
                label_inputs[t, column, previous] = 1.0
            previous = -1 if label is None else slots.setdefault(label, len(slots))
    with torch.inference_mode():
        logits, state = model.forward_sequence(images, label_inputs)
    probabilities = torch.softmax(logits.float(), dim=-1).transpose(0, 1).numpy()
    return probabilities, state.pack()


async def stored_records(url: str, prefix: str, session_ids: list[str]) -> list:
    store = RedisStore(url, prefix, 5.0)
    try:
        return [await store.get(session_id) for session_id in session_ids]
    finally:
        await store.close()


def verify(model_dir: Path, logs: list[ClientLog], records: list, steps: int) -> dict:
    """Each finished session against its client's view and a one-process replay."""
    episodes = [episode for log in logs for episode in log.episodes]
    problems = [error for log in logs for error in log.errors]
    probabilities, states = replay(model_dir, episodes, steps)
    worst_probability = worst_state = 0.0
    mismatched = 0
    for index, (episode, record) in enumerate(zip(episodes, records, strict=True)):
        if record is None:
            problems.append(f"{episode.session_id}: not in the store")
            continue
        if record.steps != len(episode.probabilities):
            seen = len(episode.probabilities)
            problems.append(f"{episode.session_id}: stored {record.steps} steps, its client saw {seen} succeed")
        answered, stored = np.asarray(episode.probabilities), record.state.data.numpy()
        worst_probability = max(worst_probability, float(np.abs(answered - probabilities[index]).max()))
        worst_state = max(worst_state, float(np.abs(stored - states[index].numpy()).max()))
        close = [
            np.allclose(ours, reference, rtol=RELATIVE_TOLERANCE, atol=ABSOLUTE_TOLERANCE)
            for ours, reference in ((answered, probabilities[index]), (stored, states[index].numpy()))
        ]
        mismatched += not all(close)
    if mismatched:
        problems.append(
            f"{mismatched} sessions differ from the replay (largest differences: probabilities "
            f"{worst_probability:.2e}, states {worst_state:.2e})"
        )
    return {
        "sessions": len(episodes),
        "steps": sum(len(e.probabilities) for e in episodes),
        "max_probability_difference": worst_probability,
        "max_state_difference": worst_state,
        "problems": problems,
    }


def run_chaos(model_dir: Path, clients: int, steps: int, seconds: float, redis_timeout: float = 3.0) -> dict:
    """The whole run: servers up, clients and faults, verification; the result record."""
    redis = RedisServer()
    prefix = f"chaos-{secrets.token_hex(4)}:"
    env = {
        "NTM_STORE": redis.url,
        "NTM_REDIS_PREFIX": prefix,
        "NTM_MODELS": str(model_dir),
        "NTM_REDIS_TIMEOUT_SECONDS": str(redis_timeout),
        "NTM_ACCESS_LOG": "false",
    }
    replicas = None
    try:
        replicas = Replicas(env)
        logs, faults = asyncio.run(run_clients(replicas, redis, clients, steps, seconds))
        session_ids = [episode.session_id for log in logs for episode in log.episodes]
        records = asyncio.run(stored_records(redis.url, prefix, session_ids))
    finally:
        if replicas is not None:
            replicas.close()
        redis.close()
    verdict = verify(model_dir, logs, records, steps)
    unavailable = [log.longest_unavailable for log in logs]
    return {
        "model": str(model_dir),
        "clients": clients,
        "steps_per_episode": steps,
        "seconds": seconds,
        "redis_timeout_seconds": redis_timeout,
        "faults": faults,
        "steps_per_s": verdict["steps"] / faults["wall_seconds"],
        "retried_requests": sum(log.retries for log in logs),
        "longest_unavailable_s": {
            "max": max(unavailable),
            "p50": percentile(sorted(unavailable), 0.5),
            "per_client": [round(value, 3) for value in unavailable],
        },
        "load_average": machine_load(),
        **verdict,
        "ok": not verdict["problems"],
    }


def report(result: dict) -> str:
    faults, unavailable = result["faults"], result["longest_unavailable_s"]
    rows = [
        ["sessions checked", str(result["sessions"])],
        ["steps checked", str(result["steps"])],
        ["steps/s (faults included)", fmt(result["steps_per_s"], 0)],
        ["requests retried", str(result["retried_requests"])],
        ["replica SIGKILLed at / ready again after", f"{faults['replica_killed_at_s']} s / {faults['replica_back_after_s']} s"],
        ["redis-server restarted at / back after", f"{faults['redis_restarted_at_s']} s / {faults['redis_back_after_s']} s"],
        ["longest unavailability a client saw: max / median", f"{unavailable['max']:.2f} s / {unavailable['p50']:.2f} s"],
        ["largest difference from a one-process replay", f"{max(result['max_probability_difference'], result['max_state_difference']):.1e}"],
        ["problems", str(len(result["problems"]))],
    ]  # fmt: skip
    lines = [
        f"## Chaos: {result['clients']} clients, 2 replicas, one Redis, {result['seconds']:g} s",
        "",
        markdown_table(["", ""], rows),
        "",
        "Every session: stored steps = steps its client saw succeed, state and answers = a one-process replay."
        if result["ok"]
        else "FAILED: " + "; ".join(result["problems"][:10]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/fast"), help="checkpoint the replicas serve")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="steps per episode")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long clients start new episodes")
    parser.add_argument("--redis-timeout", type=float, default=3.0, help="NTM_REDIS_TIMEOUT_SECONDS of the replicas")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    result = run_chaos(args.model, args.clients, args.steps, args.seconds, args.redis_timeout)
    print(report(result))
    write_json(args.json, result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
