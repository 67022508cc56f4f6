"""``python -m bench.http_ab --baseline DIR``: this checkout's server against another checkout's, side by side.

Two real uvicorn servers, one worker each, every thread of both pinned to the same core; the
load generator, on the other core, drives them in alternation: each round runs every phase on
each server in a shuffled order (64 sessions of single steps and of the batch form, 10 steps a
request, and read-only predictions from 64 clients, 1 and 64 images a request, for each image
form; GET /healthz at 64 connections). ``--model`` and ``--compile`` set what both servers
serve and whether they compile the step. Per server and phase it reports the median steps/s
(images/s for predictions), the server's CPU time per step (user + system time of all its threads,
from /proc) as a median and a minimum over the rounds, and its context switches per step.

Why CPU time: on a shared machine other tenants slow a run down by minutes at a time, so
rates from different minutes do not compare; CPU time per step is the server's own work, and
noise can only add to it, so its minimum is the steadiest figure. Context switches show the
GIL changing hands between the event loop and the model thread. Linux only (/proc).

``--otlp-sink`` turns tracing on in this checkout's server (``service.tracing``): its spans go over
OTLP/HTTP to a sink in this process that answers every export with 200, so the server's CPU time
per step includes making, batching and exporting every span. Run with ``--baseline`` another
checkout of the same tree for the cost of tracing on, or of the tree before tracing for its cost off.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.common import markdown_table, pin_process, thread_stats, write_json
from bench.http import PREDICT_IMAGES, open_sessions, predict_requests, server_env, step_requests
from bench.loadgen import RequestFactory, generate_load, http_request
from tests.servers import ROOT, ServerProcess


def cpu_and_switches(pid: int) -> tuple[float, int]:
    """(CPU seconds, context switches) of every thread of ``pid`` so far."""
    stats = thread_stats(pid).values()
    return sum(seconds for seconds, _ in stats), sum(switches for _, switches in stats)


def phases(url: str, images: list[str]) -> dict[tuple[str, str], tuple[RequestFactory, int]]:
    """(image, phase) -> (request factory, steps per request) for one server."""
    sessions = open_sessions(url, 64)
    out: dict[tuple[str, str], tuple[RequestFactory, int]] = {}
    for image in images:
        single, batch = step_requests(sessions, image)
        out[(image, "single")] = (lambda c, n, r=single: r[c][n % 16], 1)
        out[(image, "batch")] = (lambda c, n, r=batch: r[c], 10)
        one_image, many_images = predict_requests(sessions[0], image)
        out[(image, "predict 1")] = (lambda c, n, r=one_image: r, 1)
        out[(image, f"predict {PREDICT_IMAGES}")] = (lambda c, n, r=many_images: r, PREDICT_IMAGES)
    healthz = http_request("GET", "/healthz")
    out[("-", "healthz")] = (lambda c, n: healthz, 1)
    return out


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint that reads and drops every export (200, an empty response); its URL."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout (git worktree add DIR REV)")
    parser.add_argument("--image", nargs="+", choices=["pixels", "png", "gray8"], default=["pixels", "png", "gray8"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each phase in each round")
    parser.add_argument("--model", default=None, help="checkpoint directory both servers serve (default: the shipped)")
    parser.add_argument("--compile", choices=["0", "1"], default="0", help="NTM_COMPILE of both servers")
    parser.add_argument("--otlp-sink", action="store_true", help="trace this checkout's server to an OTLP sink")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        this_env = server_env(model=args.model, compile=args.compile)
        if args.otlp_sink:
            this_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = stack.enter_context(otlp_sink())
        return compare(args, this_env)


def compare(args: argparse.Namespace, this_env: dict[str, str]) -> int:
    """Both servers through every phase, alternating; prints and writes the table."""
    cpus = (0, 1) if (os.cpu_count() or 1) > 1 else (0, 0)
    env = server_env(model=args.model, compile=args.compile)
    servers = {"baseline": ServerProcess(env, cwd=args.baseline.resolve())}
    servers["this"] = ServerProcess(this_env, cwd=ROOT)
    samples: dict[tuple[str, str, str], list[tuple[float, float, float, int]]] = {}
    try:
        work = {}
        for name, server in servers.items():
            server.wait_ready()
            if args.compile == "1":  # a package build in the background would take CPU from the measurement
                server.wait_packages()
            pin_process(server.process.pid, cpus[0])
            for key, value in phases(server.url, args.image).items():
                work[(name, *key)] = value
        for (name, _, _), (factory, _) in work.items():  # warm-up
            generate_load("127.0.0.1", servers[name].port, 64, factory, 0.5, cpus[1])
        for _ in range(args.rounds):
            for key in random.sample(list(work), len(work)):
                factory, steps = work[key]
                server = servers[key[0]]
                cpu0, switches0 = cpu_and_switches(server.process.pid)
                load = generate_load("127.0.0.1", server.port, 64, factory, args.seconds, cpus[1])
                cpu1, switches1 = cpu_and_switches(server.process.pid)
                done = steps * load.requests
                samples.setdefault(key, []).append(
                    (steps * load.rate, 1e6 * (cpu1 - cpu0) / done, (switches1 - switches0) / done, load.errors)
                )
    finally:
        for server in servers.values():
            server.stop()
    results = [
        {
            "server": name,
            "image": image,
            "phase": phase,
            "steps_per_s": statistics.median(s[0] for s in runs),
            "cpu_us_per_step": statistics.median(s[1] for s in runs),
            "cpu_us_per_step_min": min(s[1] for s in runs),
            "switches_per_step": statistics.median(s[2] for s in runs),
            "errors": sum(s[3] for s in runs),
        }
        for (name, image, phase), runs in sorted(samples.items(), key=lambda item: (item[0][1], item[0][2], item[0][0]))
    ]
    rows = [
        [
            r["image"],
            r["phase"],
            r["server"],
            f"{r['steps_per_s']:,.0f}",
            f"{r['cpu_us_per_step']:.1f}",
            f"{r['cpu_us_per_step_min']:.1f}",
            f"{r['switches_per_step']:.2f}",
            str(r["errors"]),
        ]
        for r in results
    ]
    headers = ["image", "phase", "server", "steps/s (median)", "CPU us/step (median)", "CPU us/step (min)"]
    print(markdown_table([*headers, "context switches/step", "errors"], rows))
    traced = "; this server traced to an OTLP sink" if args.otlp_sink else ""
    print(
        f"\nbaseline: {args.baseline.resolve()}; {args.rounds} rounds of {args.seconds:g} s per phase{traced}, "
        f"{time.ctime()}"
    )
    record = {
        "baseline": str(args.baseline.resolve()),
        "rounds": args.rounds,
        "traced": args.otlp_sink,
        "model": args.model,
        "compile": args.compile,
    }
    write_json(args.json, {**record, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
