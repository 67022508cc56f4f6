"""``python -m bench.soak``: many episodes from many clients against one server, watched over time.

A real uvicorn server (memory:// store, NTM_SWEEP_INTERVAL_SECONDS=1) is pinned to one core;
a load generator on raw asyncio streams runs in its own process, pinned to the other core.
Each of ``--clients`` keep-alive connections loops: open a session with a short
``ttl_seconds``, run an episode of ``--steps`` steps through the batch form
({"steps": [...]}, ``--chunk`` steps a request), then delete the session (every
``--delete-every``-th episode) or leave it to expire. Every ``--seconds-per-window`` the
generator reports a window: steps/s, step-request latency p50/p99, the server's RSS
(/proc/<pid>/status VmRSS) and its live sessions (ntm_active_sessions on /metrics). At the
end it waits for the sweeper to reap the expired sessions and reads RSS and live sessions
again: they should be back where they started, with zero errors on the way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.common import fmt, machine_load, markdown_table, percentile, pin_process, write_json
from bench.loadgen import http_request, prepare_load_process
from tests.servers import ServerProcess

BODIES = 16  # distinct pre-encoded step chunks; an episode walks through them
NUM_LABELS = 5  # the shipped model is 5-way: labels 0..4, every 10th step a query without a label
MIB = 2**20


# ----------------------------------------------------------------------------------- server side


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def parse_active_sessions(metrics_text: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith("ntm_active_sessions "):
            return int(float(line.split()[1]))
    raise ValueError("no ntm_active_sessions in /metrics")


# ----------------------------------------------------------------------------------- requests


def chunk_bodies(chunk: int, seed: int = 0) -> list[bytes]:
    """BODIES pre-encoded {"steps": [...]} bodies of ``chunk`` 28x28 random-pixel steps each."""
    rng = np.random.default_rng(seed)
    bodies = []
    for b in range(BODIES):
        items = []
        for i in range(chunk):
            item: dict = {"image": {"pixels": rng.integers(0, 256, size=(28, 28)).tolist()}}
            if (b * chunk + i) % 10 != 9:
                item["label"] = (b * chunk + i) % NUM_LABELS
            items.append(item)
        bodies.append(json.dumps({"steps": items}, separators=(",", ":")).encode())
    return bodies


@dataclass
class Plan:
    host: str
    port: int
    server_pid: int
    episodes: int
    clients: int
    steps: int
    chunk: int
    ttl: float
    delete_every: int
    window: float
    bodies: list[bytes]
    tail_bodies: list[bytes]  # the last, shorter chunk when steps % chunk != 0


@dataclass
class Window:
    """What completed in one reporting window (requests are counted when their response arrives)."""

    started: float
    steps: int = 0
    requests: int = 0
    episodes: int = 0
    errors: int = 0
    step_latencies: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.claimed = 0
        self.started = time.monotonic()
        self.window = Window(time.monotonic())
        self.totals = {"episodes": 0, "steps": 0, "requests": 0, "errors": 0, "deleted": 0, "left_to_expire": 0}
        self.error_samples: list[str] = []
        self.all_step_latencies: list[float] = []

    def error(self, what: str) -> None:
        self.window.errors += 1
        self.totals["errors"] += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)

    async def exchange(self, reader, writer, request: bytes) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        writer.write(request)
        head_in = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head_in.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await reader.readexactly(length)
        latency = time.perf_counter() - started
        self.window.requests += 1
        self.totals["requests"] += 1
        return int(head_in[9:12]), payload, latency

    async def episode(self, reader, writer, number: int) -> None:
        plan = self.plan
        create = json.dumps({"ttl_seconds": plan.ttl}).encode()
        status, payload, _ = await self.exchange(reader, writer, http_request("POST", "/v1/sessions", create))
        if status != 201:
            self.error(f"create -> {status}: {payload[:200]!r}")
            return
        session = json.loads(payload)["session_id"]
        path = f"/v1/sessions/{session}/steps"
        full, rest = divmod(plan.steps, plan.chunk)
        sizes = [plan.chunk] * full + ([rest] if rest else [])
        for i, size in enumerate(sizes):
            bodies = plan.bodies if size == plan.chunk else plan.tail_bodies
            body = bodies[(number + i) % BODIES]
            status, payload, latency = await self.exchange(reader, writer, http_request("POST", path, body))
            if status != 200:
                self.error(f"steps -> {status}: {payload[:200]!r}")
                return
            self.window.steps += size
            self.totals["steps"] += size
            self.window.step_latencies.append(latency)
            self.all_step_latencies.append(latency)
        if plan.delete_every and number % plan.delete_every == 0:
            status, payload, _ = await self.exchange(reader, writer, http_request("DELETE", f"/v1/sessions/{session}"))
            if status != 204:
                self.error(f"delete -> {status}: {payload[:200]!r}")
                return
            self.totals["deleted"] += 1
        else:
            self.totals["left_to_expire"] += 1
        self.window.episodes += 1
        self.totals["episodes"] += 1

    async def client(self) -> None:
        reader = writer = None
        try:
            while self.claimed < self.plan.episodes:
                number = self.claimed
                self.claimed += 1
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.plan.host, self.plan.port)
                try:
                    await self.episode(reader, writer, number)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                    self.error(f"connection: {exc!r}")
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    async def server_sample(self) -> tuple[dict[str, int], int]:
        memory = rss_bytes(self.plan.server_pid)
        reader, writer = await asyncio.open_connection(self.plan.host, self.plan.port)
        try:
            writer.write(http_request("GET", "/metrics"))
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(h[15:]) for h in head.split(b"\r\n") if h[:15].lower() == b"content-length:")
            live = parse_active_sessions((await reader.readexactly(length)).decode())
        finally:
            writer.close()
        return memory, live

    async def report(self, queue, final: bool = False) -> None:
        window, now = self.window, time.monotonic()
        at = now - self.started
        self.window = Window(now)
        memory, live = await self.server_sample()
        seconds = now - window.started
        latencies = sorted(window.step_latencies)

        queue.put(
            (
                "window",
                {
                    "t": at,
                    "seconds": seconds,
                    "steps": window.steps,
                    "steps_per_s": window.steps / seconds if seconds else 0.0,
                    "requests_per_s": window.requests / seconds if seconds else 0.0,
                    "episodes": window.episodes,
                    "errors": window.errors,
                    "p50_ms": 1000 * percentile(latencies, 0.50),
                    "p99_ms": 1000 * percentile(latencies, 0.99),
                    "rss_bytes": memory["VmRSS"],
                    "hwm_bytes": memory["VmHWM"],
                    "live_sessions": live,
                    "final": final,
                },
            )
        )

    async def run(self, queue) -> None:
        started = self.started = time.monotonic()
        self.window = Window(started)
        clients = asyncio.gather(*[self.client() for _ in range(self.plan.clients)])
        tick = started
        while True:
            tick += self.plan.window
            try:
                await asyncio.wait_for(asyncio.shield(clients), timeout=max(0.0, tick - time.monotonic()))
                break
            except asyncio.TimeoutError:
                await self.report(queue)
        elapsed = time.monotonic() - started
        await self.report(queue, final=True)
        latencies = sorted(self.all_step_latencies)

        queue.put(
            (
                "done",
                {
                    **self.totals,
                    "seconds": elapsed,
                    "p50_ms": 1000 * percentile(latencies, 0.50),
                    "p99_ms": 1000 * percentile(latencies, 0.99),
                    "max_ms": 1000 * latencies[-1] if latencies else float("nan"),
                    "error_samples": self.error_samples,
                },
            )
        )


def _child(queue, cpu: int | None, plan: Plan) -> None:
    prepare_load_process(cpu)
    try:
        asyncio.run(Soak(plan).run(queue))
    except BaseException as exc:  # the parent must hear about it rather than wait forever
        queue.put(("failed", repr(exc)))
        raise


# ----------------------------------------------------------------------------------- driver


def live_sessions(url: str) -> int:
    return parse_active_sessions(httpx.get(f"{url}/metrics", timeout=10).text)


def soak(args: argparse.Namespace, cpus: tuple[int, int]) -> dict:
    env = {
        "NTM_STORE": "memory://",
        "NTM_ACCESS_LOG": "false",
        "NTM_LOG_LEVEL": "warning",
        "NTM_THREADS": "1",
        "NTM_MAX_SESSIONS": "1000000",
        "NTM_MAX_SESSIONS_PER_KEY": "1000000",
        "NTM_SWEEP_INTERVAL_SECONDS": str(args.sweep_interval),
    }
    if args.model:
        env["NTM_MODELS"] = args.model
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    server = ServerProcess(env).wait_ready()
    try:
        pin_process(server.process.pid, cpus[0])
        if affinity is not None:
            os.sched_setaffinity(0, {cpus[1]})  # this driver too keeps off the server's core
        pid = server.process.pid
        start_memory, start_live = rss_bytes(pid), live_sessions(server.url)
        rest = args.steps % args.chunk
        plan = Plan(
            "127.0.0.1",
            server.port,
            pid,
            args.episodes,
            args.clients,
            args.steps,
            args.chunk,
            args.ttl,
            args.delete_every,
            args.seconds_per_window,
            chunk_bodies(args.chunk, seed=0),
            chunk_bodies(rest, seed=1) if rest else [],
        )
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child, args=(queue, cpus[1], plan))
        child.start()
        windows: list[dict] = []
        while True:
            kind, data = queue.get(timeout=max(600.0, 10 * args.seconds_per_window))
            if kind == "failed":
                raise RuntimeError(f"load generator failed: {data}")
            if kind == "done":
                totals = data
                break
            windows.append(data)
            print(
                f"  t={windows[-1]['t']:6.1f}s  {data['steps_per_s']:8,.0f} steps/s  p99 {data['p99_ms']:7.1f} ms  "
                f"RSS {data['rss_bytes'] / MIB:7.1f} MiB  live {data['live_sessions']:5d}  errors {data['errors']}",
                file=sys.stderr,
                flush=True,
            )
        child.join()

        # The sweeper's turn: every session left to expire must go, and its memory with it.
        reap_started = time.monotonic()
        deadline = reap_started + args.ttl + 10 * args.sweep_interval + 30
        live = live_sessions(server.url)
        while live > start_live and time.monotonic() < deadline:
            time.sleep(0.25)
            live = live_sessions(server.url)
        reaped_after = time.monotonic() - reap_started
        time.sleep(1.0)
        end_memory, end_live = rss_bytes(pid), live_sessions(server.url)
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    peak_window = max((w["rss_bytes"] for w in windows), default=start_memory["VmRSS"])
    first_rss = windows[0]["rss_bytes"] if windows else start_memory["VmRSS"]
    return {
        "windows": windows,
        "totals": totals,
        "rss_start_bytes": start_memory["VmRSS"],
        "rss_first_window_bytes": first_rss,
        "rss_peak_bytes": max(peak_window, end_memory["VmRSS"]),
        "rss_hwm_bytes": end_memory["VmHWM"],
        "rss_end_bytes": end_memory["VmRSS"],
        "live_sessions_start": start_live,
        "live_sessions_end": end_live,
        "reaped_after_seconds": reaped_after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64, help="concurrent keep-alive connections, one episode each")
    parser.add_argument("--steps", type=int, default=50, help="steps per episode")
    parser.add_argument("--chunk", type=int, default=10, help="steps per request (the batch form)")
    parser.add_argument("--ttl", type=float, default=5.0, help="ttl_seconds of each session")
    parser.add_argument(
        "--delete-every", type=int, default=2, help="delete every n-th episode's session (0: none); the rest expire"
    )
    parser.add_argument("--seconds-per-window", type=float, default=10.0)
    parser.add_argument("--sweep-interval", type=float, default=1.0, help="the server's NTM_SWEEP_INTERVAL_SECONDS")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.clients < 1 or args.steps < 1 or args.chunk < 1:
        parser.error("--episodes, --clients, --steps and --chunk must be >= 1")
    cpus = (0, 1) if (os.cpu_count() or 1) > 1 else (0, 0)
    load_before = machine_load()
    result = soak(args, cpus)
    totals = result["totals"]
    rows = [
        [
            f"{w['t']:.1f}" + (" (end)" if w["final"] else ""),
            fmt(w["steps_per_s"]),
            fmt(w["requests_per_s"]),
            f"{w['p50_ms']:.1f}",
            f"{w['p99_ms']:.1f}",
            str(w["episodes"]),
            str(w["errors"]),
            f"{w['rss_bytes'] / MIB:.1f}",
            str(w["live_sessions"]),
        ]
        for w in result["windows"]
    ]
    print(
        markdown_table(
            ["t (s)", "steps/s", "requests/s", "p50 ms", "p99 ms", "episodes", "errors", "RSS MiB", "live sessions"],
            rows,
        )
    )
    summary = [
        ["episodes", f"{totals['episodes']:,} of {args.episodes:,} ({args.clients} clients)"],
        ["steps", f"{totals['steps']:,} in {totals['seconds']:.1f} s: {fmt(totals['steps'] / totals['seconds'])}/s"],
        [
            "step requests p50 / p99 / max",
            f"{totals['p50_ms']:.1f} / {totals['p99_ms']:.1f} / {totals['max_ms']:.1f} ms",
        ],
        ["errors", str(totals["errors"])],
        ["sessions deleted / left to expire", f"{totals['deleted']:,} / {totals['left_to_expire']:,}"],
        [
            "RSS start / first window / peak / end",
            " / ".join(
                f"{result[k] / MIB:.1f}"
                for k in ("rss_start_bytes", "rss_first_window_bytes", "rss_peak_bytes", "rss_end_bytes")
            )
            + " MiB",
        ],
        ["RSS end - first window", f"{(result['rss_end_bytes'] - result['rss_first_window_bytes']) / MIB:+.1f} MiB"],
        [
            "live sessions start / end",
            f"{result['live_sessions_start']} / {result['live_sessions_end']} (reaped {result['reaped_after_seconds']:.1f} s after the load)",
        ],
        ["load average before", f"{load_before:.2f}"],
    ]
    print()
    print(markdown_table(["summary", ""], summary))
    for sample in totals["error_samples"]:
        print(f"error: {sample}", file=sys.stderr)
    write_json(
        args.json,
        {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **result},
    )
    ok = totals["errors"] == 0 and totals["episodes"] == args.episodes and result["live_sessions_end"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
