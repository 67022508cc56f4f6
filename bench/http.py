"""``python -m bench.http``: the service over real HTTP, one uvicorn worker, per session store.

For each store (``--store``, repeatable; memory:// by default) it starts a real server pinned
to one core and drives it from a load generator pinned to the other core:

- single-client step latency (one connection, one session, sequential steps): p50 / p99;
- steps/s with 64 concurrent sessions, next to GET /healthz requests/s at the same
  concurrency in the same run (the HTTP stack's ceiling on this machine);
- steps/s through the batch form ({"steps": [...]}, 10 steps a request, 64 sessions), with the
  CPU time a step costs in it on the event loop's thread and on the others (the model thread):
  on the one core both share, steps/s is about 1e6 / their sum; a worker whose model thread had
  a core of its own would be bound by the event loop's figure alone;
- read-only predictions against one taught session: images/s with 64 concurrent clients sending
  one image each, and sending 64-image requests, next to the step route's steps/s of the same run
  (64 sessions), and next to what the step route does for the same job: 64 clients sending
  label-less steps to that one session, which the session's lock runs one at a time, each
  changing what the next one sees.

With a redis:// store it also reports the bytes one session takes in Redis (MEMORY USAGE)
and Redis' memory for ``--idle-sessions`` idle sessions written through the store.
``--store redis://auto`` and ``--store redis+cluster://auto`` start a throwaway redis-server and a
throwaway 3-master Redis Cluster for the run (``tests.servers``), so one run sets them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.common import cpu_split, markdown_table, pin_process, thread_stats, write_json
from bench.loadgen import generate_load, http_request
from models.allocator import DEFAULT_KEEP_MB
from tests.servers import RedisCluster, RedisServer, ServerProcess

TARGETS = {
    "single_client_p50_ms": 2.0,
    "sessions_vs_healthz": 0.40,
    "batch_steps_per_s": 10_000,
    "predict_64_vs_steps": 3.0,
}
DEFAULT_MALLOC_KEEP_MB = str(DEFAULT_KEEP_MB)  # the service's NTM_MALLOC_KEEP_MB


def step_payload(seed: int, label: int | None, image: str = "pixels") -> dict:
    """A 28x28 step body: the image as a pixel array, base64 PNG or base64 raw gray levels (gray8)."""
    gray = np.random.default_rng(seed).integers(0, 256, size=(28, 28))
    if image == "png":
        buffer = io.BytesIO()
        Image.fromarray(gray.astype(np.uint8), mode="L").save(buffer, "PNG")
        body: dict = {"image": {"png": base64.b64encode(buffer.getvalue()).decode()}}
    elif image == "gray8":
        body = {"image": {"gray8": base64.b64encode(gray.astype(np.uint8).tobytes()).decode(), "shape": [28, 28]}}
    else:
        body = {"image": {"pixels": gray.tolist()}}
    if label is not None:
        body["label"] = label
    return body


def server_env(
    store: str = "memory://", model: str | None = None, compile: str = "0", malloc_keep_mb: str = DEFAULT_MALLOC_KEEP_MB
) -> dict[str, str]:
    """The benchmarked server's settings: one torch thread, no access log, room for every session."""
    env = {
        "NTM_MALLOC_KEEP_MB": malloc_keep_mb,
        "NTM_STORE": store,
        "NTM_COMPILE": compile,
        "NTM_ACCESS_LOG": "false",
        "NTM_LOG_LEVEL": "warning",
        "NTM_THREADS": "1",
        "NTM_MAX_SESSIONS": "1000000",
        "NTM_REDIS_PREFIX": f"ntmbench:{os.getpid()}:",
    }
    if model:
        env["NTM_MODELS"] = model
    return env


def step_requests(sessions: list[str], image: str) -> tuple[list[list[bytes]], list[bytes]]:
    """Per session: 16 single-step requests (labels 0-4 in turn), and one batch-form request of 10 steps."""
    bodies = [step_payload(i, i % 5, image) for i in range(16)]
    encoded = [json.dumps(body).encode() for body in bodies]
    batch_body = json.dumps({"steps": bodies[:10]}).encode()
    single = [[http_request("POST", f"/v1/sessions/{sid}/steps", body) for body in encoded] for sid in sessions]
    batch = [http_request("POST", f"/v1/sessions/{sid}/steps", batch_body) for sid in sessions]
    return single, batch


PREDICT_IMAGES = 64


def predict_requests(session: str, image: str) -> tuple[bytes, bytes]:
    """A one-image and a 64-image read-only predict request against ``session``."""
    images = [step_payload(100 + i, None, image)["image"] for i in range(PREDICT_IMAGES)]
    path = f"/v1/sessions/{session}/predict"
    one = json.dumps({"images": images[:1]}).encode()
    return http_request("POST", path, one), http_request("POST", path, json.dumps({"images": images}).encode())


def one_session_requests(session: str, image: str) -> list[bytes]:
    """16 label-less step requests to ``session``: classifying against it through the step route."""
    bodies = [json.dumps(step_payload(200 + i, None, image)).encode() for i in range(16)]
    return [http_request("POST", f"/v1/sessions/{session}/steps", body) for body in bodies]


def open_sessions(url: str, count: int) -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as client:
        return [client.post("/v1/sessions", json={}).json()["session_id"] for _ in range(count)]


def measure_store(
    store: str,
    model: str | None,
    seconds: float,
    concurrency: int,
    cpus: tuple[int, int],
    image: str = "pixels",
    compile: str = "0",
    malloc_keep_mb: str = DEFAULT_MALLOC_KEEP_MB,
) -> dict:
    env = server_env(store, model, compile, malloc_keep_mb)
    server = ServerProcess(env).wait_ready(timeout=600)  # a cold warm-up: minutes
    if compile == "1":  # a package build in the background would take CPU from the measurement
        server.wait_packages(timeout=600)
    try:
        pin_process(server.process.pid, cpus[0])  # every thread: the model thread too
        host, port = "127.0.0.1", server.port

        single_req = step_requests(open_sessions(server.url, 1), image)[0][0]
        generate_load(host, port, 1, lambda c, n: single_req[n % 16], 1.0, cpus[1])  # warm-up
        latency = generate_load(host, port, 1, lambda c, n: single_req[n % 16], seconds, cpus[1])

        healthz_req = http_request("GET", "/healthz")
        healthz = generate_load(host, port, concurrency, lambda c, n: healthz_req, seconds, cpus[1])

        sessions = open_sessions(server.url, concurrency)
        step_reqs, batch_reqs = step_requests(sessions, image)
        steps = generate_load(host, port, concurrency, lambda c, n: step_reqs[c][n % 16], seconds, cpus[1])

        before = thread_stats(server.process.pid)
        batch = generate_load(host, port, concurrency, lambda c, n: batch_reqs[c], seconds, cpus[1])
        loop_cpu, other_cpu = cpu_split(server.process.pid, before, thread_stats(server.process.pid))

        one_image, many_images = predict_requests(sessions[0], image)  # a session the step phases taught
        predict_one = generate_load(host, port, concurrency, lambda c, n: one_image, seconds, cpus[1])
        predict_many = generate_load(host, port, concurrency, lambda c, n: many_images, seconds, cpus[1])
        label_less = one_session_requests(sessions[0], image)
        one_session = generate_load(host, port, concurrency, lambda c, n: label_less[n % 16], seconds, cpus[1])
        errors = sum(load.errors for load in (latency, healthz, steps, batch, predict_one, predict_many, one_session))
    finally:
        server.stop()
    return {
        "store": store,
        "image": image,
        "compile": compile,
        "malloc_keep_mb": malloc_keep_mb,
        "single_client_p50_ms": 1000 * latency.percentile(0.50),
        "single_client_p99_ms": 1000 * latency.percentile(0.99),
        "single_client_steps_per_s": latency.rate,
        "healthz_per_s": healthz.rate,
        "sessions_steps_per_s": steps.rate,
        "sessions_p99_ms": 1000 * steps.percentile(0.99),
        "sessions_vs_healthz": steps.rate / healthz.rate,
        "batch_steps_per_s": 10 * batch.rate,
        # CPU per step in the batch phase: the event loop's thread (HTTP, JSON, images, sessions) and the
        # others' (the model thread, mostly): 1e6 / the loop's figure bounds one worker with a core to spare
        "batch_event_loop_us_per_step": 1e6 * loop_cpu / max(1, 10 * batch.requests),
        "batch_model_threads_us_per_step": 1e6 * other_cpu / max(1, 10 * batch.requests),
        "predict_images_per_s": predict_one.rate,
        "predict_64_images_per_s": PREDICT_IMAGES * predict_many.rate,
        "predict_vs_steps": predict_one.rate / steps.rate,
        "predict_64_vs_steps": PREDICT_IMAGES * predict_many.rate / steps.rate,
        "one_session_steps_per_s": one_session.rate,
        "predict_vs_one_session_steps": predict_one.rate / one_session.rate,
        "predict_64_vs_one_session_steps": PREDICT_IMAGES * predict_many.rate / one_session.rate,
        "errors": errors,
    }


def redis_memory(url: str, sessions: int) -> dict:
    """Bytes per session (MEMORY USAGE) and Redis' used_memory growth for ``sessions`` idle sessions."""
    import redis as redis_sync

    from models import NTM, NTMConfig
    from service.sessions.redis import RedisStore
    from service.sessions.store import SessionRecord

    prefix = f"ntmbench-mem:{os.getpid()}:"
    client = redis_sync.Redis.from_url(url)
    state = NTM(NTMConfig()).initial_state(1).sessions()[0]

    async def fill() -> None:
        store = RedisStore(url, prefix, timeout=30)
        for start in range(0, sessions, 50):
            records = [
                SessionRecord(f"idle{i:07d}", "default", "0123456789abcdef", state, 3600, time.time() + 3600)
                for i in range(start, min(start + 50, sessions))
            ]
            await asyncio.gather(*[store.create(r) for r in records])
        await store.close()

    before = client.info("memory")["used_memory"]
    asyncio.run(fill())
    after = client.info("memory")["used_memory"]
    per_key = client.memory_usage(f"{prefix}s:idle0000000")
    keys = list(client.scan_iter(match=f"{prefix}*", count=10_000))
    for i in range(0, len(keys), 10_000):
        client.delete(*keys[i : i + 10_000])
    client.close()
    return {
        "sessions": sessions,
        "bytes_per_session": per_key,
        "used_memory_bytes": after - before,
        "per_100k_sessions_bytes": (after - before) * 100_000 / sessions,
    }


THROWAWAY = {"redis://auto": RedisServer, "redis+cluster://auto": RedisCluster}  # --store names started for the run


@contextlib.contextmanager
def store_urls(stores: list[str]) -> Iterator[dict[str, str]]:
    """Each ``--store`` and the URL it is served from: itself, or for a ``THROWAWAY`` name the URL of the
    redis-server or cluster started for it, which are stopped and removed afterwards."""
    urls, started = {store: store for store in stores}, []
    try:
        for store in urls.keys() & THROWAWAY.keys():
            started.append(THROWAWAY[store]())
            urls[store] = started[-1].url
        yield urls
    finally:
        for server in started:
            server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--store",
        action="append",
        default=None,
        help="memory:// (default), redis://host:port/db, redis+cluster://host:port[,host:port...]; "
        "redis://auto, redis+cluster://auto: a throwaway redis-server, a throwaway 3-master cluster",
    )
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load phase")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--idle-sessions", type=int, default=10_000, help="idle sessions written to measure Redis memory"
    )
    parser.add_argument(
        "--image",
        nargs="+",
        choices=["pixels", "png", "gray8"],
        default=["pixels", "png", "gray8"],
        help="step image encodings to measure",
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=["0", "1"],
        default=["0"],
        help="NTM_COMPILE of the server: 0 eager, 1 the compiled step; both: side by side",
    )
    parser.add_argument(
        "--malloc-keep-mb",
        nargs="+",
        default=[DEFAULT_MALLOC_KEEP_MB],
        help="NTM_MALLOC_KEEP_MB of the server (0: glibc's defaults); several: side by side",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    stores = args.store or ["memory://"]
    cpus = (0, 1) if (os.cpu_count() or 1) > 1 else (0, 0)
    with store_urls(stores) as urls:
        results = [
            {
                **measure_store(urls[store], args.model, args.seconds, args.concurrency, cpus, image, compile, malloc),
                "store": store,
            }
            for store in stores
            for image in args.image
            for compile in args.compile
            for malloc in args.malloc_keep_mb
        ]
        memory = first_redis_memory(stores, urls, args.idle_sessions)
    rows = [
        [
            r["store"],
            r["image"]
            + (", compiled" if r["compile"] == "1" else "")
            + ("" if r["malloc_keep_mb"] == DEFAULT_MALLOC_KEEP_MB else f", malloc keep {r['malloc_keep_mb']} MB"),
            f"{r['single_client_p50_ms']:.2f} / {r['single_client_p99_ms']:.2f}",
            f"{r['healthz_per_s']:,.0f}",
            f"{r['sessions_steps_per_s']:,.0f}",
            f"{100 * r['sessions_vs_healthz']:.0f}%",
            f"{r['batch_steps_per_s']:,.0f}",
            f"{r['batch_event_loop_us_per_step']:.0f} / {r['batch_model_threads_us_per_step']:.0f}",
            f"{r['predict_images_per_s']:,.0f} ({r['predict_vs_steps']:.1f}x)",
            f"{r['predict_64_images_per_s']:,.0f} ({r['predict_64_vs_steps']:.1f}x)",
            str(r["errors"]),
        ]
        for r in results
    ]
    rows.append(
        [
            "target",
            "",
            f"p50 <= {TARGETS['single_client_p50_ms']}",
            "",
            "",
            f">= {100 * TARGETS['sessions_vs_healthz']:.0f}%",
            f">= {TARGETS['batch_steps_per_s']:,}",
            "",
            "",
            f">= {TARGETS['predict_64_vs_steps']:.0f}x steps/s",
            "0",
        ]
    )
    print(
        markdown_table(
            [
                "store",
                "image",
                "1 client p50 / p99 ms",
                f"/healthz req/s ({args.concurrency} conns)",
                f"steps/s ({args.concurrency} sessions)",
                "steps vs /healthz",
                "batch-form steps/s",
                "batch CPU us/step: event loop / model",
                f"predict images/s, 1 a request ({args.concurrency} clients; x steps/s)",
                f"predict images/s, {PREDICT_IMAGES} a request (x steps/s)",
                "errors",
            ],
            rows,
        )
    )
    print(f"\nClassifying against one taught session, {args.concurrency} clients:\n")
    print(
        markdown_table(
            [
                "store",
                "image",
                "label-less steps/s on the session",
                "predict images/s, 1 a request (x those steps)",
                f"predict images/s, {PREDICT_IMAGES} a request (x those steps)",
            ],
            [
                [
                    r["store"],
                    r["image"] + (", compiled" if r["compile"] == "1" else ""),
                    f"{r['one_session_steps_per_s']:,.0f}",
                    f"{r['predict_images_per_s']:,.0f} ({r['predict_vs_one_session_steps']:.1f}x)",
                    f"{r['predict_64_images_per_s']:,.0f} ({r['predict_64_vs_one_session_steps']:.1f}x)",
                ]
                for r in results
            ],
        )
    )
    report: dict = {"targets": TARGETS, "concurrency": args.concurrency, "seconds": args.seconds, "results": results}
    if memory is not None:
        report["redis_memory"] = memory
        print(
            f"\nRedis: {memory['bytes_per_session']:,} bytes per session (MEMORY USAGE); {memory['used_memory_bytes'] / 2**20:,.1f} MiB for {memory['sessions']:,} idle sessions -> {memory['per_100k_sessions_bytes'] / 2**30:,.2f} GiB per 100,000"
        )
    write_json(args.json, report)
    return 0


def first_redis_memory(stores: list[str], urls: dict[str, str], sessions: int) -> dict | None:
    """``redis_memory`` of the first single Redis among ``stores``, if any (a session takes as much in a cluster)."""
    single = [urls[store] for store in stores if urls[store].startswith(("redis://", "rediss://"))]
    return redis_memory(single[0], sessions) if single and sessions > 0 else None


if __name__ == "__main__":
    sys.exit(main())
