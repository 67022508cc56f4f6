"""``python -m bench.grpc``: steps over gRPC, unary and streaming, next to /v2 REST and /v1, in one run.

One real server (one uvicorn worker, HTTP and gRPC in its one process) is pinned to one core and a
load generator to the other. ``--concurrency`` sequences (64 by default), each a closed loop of steps
(send, wait for the answer, send the next), run through each transport in turn:

- ``grpc-unary``: one ModelInfer call a step, every sequence's calls multiplexed on one channel;
- ``grpc-stream``: one ModelStreamInfer stream per sequence, a request and its response a step;
- ``v2-rest``: POST /v2/models/{model}/infer with binary tensor data, as tritonclient.http sends it,
  one keep-alive connection per sequence;
- ``v1``: POST /v1/sessions/{id}/steps with a ``gray8`` image (the cheapest /v1 form), likewise.

Each transport runs ``--rounds`` times, the order rotating every round (so a slow spell of the machine
falls on all of them); the table has the median steps/s of the rounds, p50 / p99 latency over all
of their steps, and the server's CPU time a step (its event loop's thread, and the others: the model
thread, grpcio's poller) over all rounds. Every step is a 28x28 image and a label (0-4 in turn),
every request pre-encoded, so the load generator's own cost stays small: raw HTTP/1.1 for REST (``bench.loadgen``), grpcio with
serialized messages for gRPC. The sequences are started over /v2 REST before the load (one store,
either transport finds them), so that no gRPC channel exists in the parent when load processes fork.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import cpu_split, markdown_table, median, percentile, pin_process, thread_stats, write_json
from bench.http import server_env
from bench.loadgen import LoadResult, generate_load, http_request, run_in_child
from tests.servers import ServerProcess

TRANSPORTS = ("grpc-unary", "grpc-stream", "v2-rest", "v1")
TARGET_STREAM_RATIO = 1.5  # gRPC streaming's steps/s over REST /v2's
REQUESTS_PER_SEQUENCE = 16  # distinct pre-encoded steps each sequence cycles through
SERVICE = "/inference.GRPCInferenceService"
STREAM_ERROR_TAG = b"\x0a"  # ModelStreamInferResponse field 1 (error_message), which leads only an error answer


def step_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)


def v2_body(sequence: int, seed: int, label: int, start: bool = False) -> tuple[bytes, int]:
    """A /v2 infer body with binary tensor data (tritonclient.http's layout) and its JSON header's length."""
    header = {
        "inputs": [
            {"name": "IMAGE", "datatype": "UINT8", "shape": [28, 28], "parameters": {"binary_data_size": 784}},
            {"name": "LABEL", "datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": 4}},
        ],
        "outputs": [{"name": "PROBABILITIES", "parameters": {"binary_data": True}}],
        "parameters": {"sequence_id": sequence, "sequence_start": start, "sequence_end": False},
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + step_image(seed).tobytes() + np.array([label], dtype="<i4").tobytes(), len(encoded)


def v2_request(model: str, sequence: int, seed: int, label: int) -> bytes:
    body, length = v2_body(sequence, seed, label)
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {length}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def v1_request(session: str, seed: int, label: int) -> bytes:
    image = {"gray8": base64.b64encode(step_image(seed).tobytes()).decode(), "shape": [28, 28]}
    return http_request("POST", f"/v1/sessions/{session}/steps", json.dumps({"image": image, "label": label}).encode())


def start_sequences(url: str, model: str, sequences: list[int]) -> None:
    """Each sequence's first step (sequence_start) over /v2 REST; the load goes on from there."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for sequence in sequences:
            body, length = v2_body(sequence, 0, 0, start=True)
            answer = client.post(
                f"/v2/models/{model}/infer", content=body, headers={"Inference-Header-Content-Length": str(length)}
            )
            answer.raise_for_status()


def resolve_model(url: str, model: str | None) -> str:
    """The served model's name: the one asked for (a checkpoint directory's name), else the default."""
    with httpx.Client(base_url=url, timeout=30) as client:
        names = [m["name"] for m in client.get("/v1/models").json()["models"]]
    if model is None:
        return names[0]
    name = Path(model).name
    return name if name in names else names[0]


# ----------------------------------------------------------------------------------- gRPC load (its own process)


def grpc_requests(model: str, sequences: list[int]) -> list[list[bytes]]:
    """Per sequence: serialized ModelInferRequests of its next steps (raw_input_contents, as tritonclient.grpc)."""
    from tritonclient.grpc import service_pb2

    out = []
    for sequence in sequences:
        encoded = []
        for i in range(REQUESTS_PER_SEQUENCE):
            request = service_pb2.ModelInferRequest(model_name=model)
            request.inputs.add(name="IMAGE", datatype="UINT8", shape=[28, 28])
            request.inputs.add(name="LABEL", datatype="INT32", shape=[1])
            request.raw_input_contents.extend([step_image(i).tobytes(), np.array([i % 5], dtype="<i4").tobytes()])
            request.parameters["sequence_id"].int64_param = sequence
            request.parameters["sequence_start"].bool_param = False
            request.parameters["sequence_end"].bool_param = False
            encoded.append(request.SerializeToString())
        out.append(encoded)
    return out


async def _grpc_load(target: str, mode: str, requests: list[list[bytes]], seconds: float) -> LoadResult:
    import grpc

    latencies: list[float] = []
    errors = [0]
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        unary = channel.unary_unary(f"{SERVICE}/ModelInfer")  # no serializers: requests and answers stay bytes
        stream = channel.stream_stream(f"{SERVICE}/ModelStreamInfer")

        async def unary_loop(encoded: list[bytes], stop: float) -> None:
            n = 0
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    await unary(encoded[n % len(encoded)])
                except grpc.RpcError:
                    errors[0] += 1
                latencies.append(time.perf_counter() - started)
                n += 1

        async def stream_loop(encoded: list[bytes], stop: float) -> None:
            call = stream()
            n = 0
            try:
                while time.perf_counter() < stop:
                    started = time.perf_counter()
                    await call.write(encoded[n % len(encoded)])
                    answer = await call.read()
                    if answer is grpc.aio.EOF or answer[:1] == STREAM_ERROR_TAG:
                        errors[0] += 1
                    latencies.append(time.perf_counter() - started)
                    n += 1
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.RpcError:
                errors[0] += 1

        loop = unary_loop if mode == "grpc-unary" else stream_loop
        started = time.perf_counter()
        await asyncio.gather(*(loop(encoded, started + seconds) for encoded in requests))
        elapsed = time.perf_counter() - started
    return LoadResult(len(latencies), errors[0], elapsed, latencies)


def _grpc_child(results: multiprocessing.Queue, cpu: int | None, args: tuple) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    target, mode, model, sequences, seconds = args
    results.put(asyncio.run(_grpc_load(target, mode, grpc_requests(model, sequences), seconds)))


def generate_grpc_load(
    target: str, mode: str, model: str, sequences: list[int], seconds: float, cpu: int | None
) -> LoadResult:
    """gRPC load in a fresh process (pinned to ``cpu``), so that no gRPC state crosses a fork."""
    return run_in_child(_grpc_child, (target, mode, model, sequences, seconds), cpu, seconds, start="spawn")


# ----------------------------------------------------------------------------------- the run


def measure(
    model: str | None, store: str, seconds: float, concurrency: int, rounds: int, cpus: tuple[int, int]
) -> dict[str, Any]:
    server = ServerProcess(server_env(store, model)).wait_ready()
    runs: dict[str, list[LoadResult]] = {name: [] for name in TRANSPORTS}
    cpu: dict[str, list[tuple[float, float, int]]] = {name: [] for name in TRANSPORTS}  # loop s, others s, steps
    try:
        pin_process(server.process.pid, cpus[0])
        name = resolve_model(server.url, model)
        host, port = "127.0.0.1", server.port
        base = 10_000_000 * (os.getpid() % 1000)  # sequence IDs of this run alone, one block per transport
        sequences = {
            t: [base + 1_000_000 * k + i + 1 for i in range(concurrency)] for k, t in enumerate(TRANSPORTS[:3])
        }
        for transport in ("grpc-unary", "grpc-stream", "v2-rest"):
            start_sequences(server.url, name, sequences[transport])
        v2 = [[v2_request(name, s, i, i % 5) for i in range(REQUESTS_PER_SEQUENCE)] for s in sequences["v2-rest"]]
        with httpx.Client(base_url=server.url, timeout=30) as client:
            sessions = [
                client.post("/v1/sessions", json={"model": name}).json()["session_id"] for _ in range(concurrency)
            ]
        v1 = [[v1_request(s, i, i % 5) for i in range(REQUESTS_PER_SEQUENCE)] for s in sessions]

        def run(transport: str, duration: float) -> LoadResult:
            if transport.startswith("grpc"):
                target = server.grpc_target
                return generate_grpc_load(target, transport, name, sequences[transport], duration, cpus[1])
            bodies = v2 if transport == "v2-rest" else v1
            return generate_load(host, port, concurrency, lambda c, n: bodies[c][n % len(bodies[c])], duration, cpus[1])

        for transport in TRANSPORTS:  # warm-up: every path, compiled and cached, before anything counts
            run(transport, min(1.0, seconds))
        for r in range(rounds):
            for transport in TRANSPORTS[r % len(TRANSPORTS) :] + TRANSPORTS[: r % len(TRANSPORTS)]:
                before = thread_stats(server.process.pid)
                runs[transport].append(run(transport, seconds))
                spent = cpu_split(server.process.pid, before, thread_stats(server.process.pid))
                cpu[transport].append((*spent, runs[transport][-1].requests))
    finally:
        server.stop()
    results = []
    for transport, done in runs.items():
        latencies = sorted(x for result in done for x in result.latencies)
        steps = max(1, sum(n for _, _, n in cpu[transport]))
        results.append(
            {
                "transport": transport,
                "steps_per_s": median([result.rate for result in done]),
                "steps_per_s_runs": [result.rate for result in done],
                "p50_ms": 1000 * percentile(latencies, 0.50),
                "p99_ms": 1000 * percentile(latencies, 0.99),
                "steps": sum(result.requests for result in done),
                "errors": sum(result.errors for result in done),
                "server_event_loop_us_per_step": 1e6 * sum(loop for loop, _, _ in cpu[transport]) / steps,
                "server_other_threads_us_per_step": 1e6 * sum(other for _, other, _ in cpu[transport]) / steps,
            }
        )
    return {"model": name, "store": store, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped default model)")
    parser.add_argument("--store", default="memory://", help="memory:// (default) or redis://host:port/db")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each transport's run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each transport, interleaved")
    parser.add_argument("--concurrency", type=int, default=64, help="sequences stepping at once")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cpus = (0, 1) if (os.cpu_count() or 1) > 1 else (0, 0)
    report = measure(args.model, args.store, args.seconds, args.concurrency, args.rounds, cpus)
    rows = [
        [
            r["transport"],
            f"{r['steps_per_s']:,.0f}",
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}",
            " ".join(f"{rate:,.0f}" for rate in r["steps_per_s_runs"]),
            f"{r['server_event_loop_us_per_step']:.0f} / {r['server_other_threads_us_per_step']:.0f}",
            str(r["errors"]),
        ]
        for r in report["results"]
    ]
    header = [
        "transport",
        f"steps/s ({args.concurrency} sequences, median)",
        "p50 / p99 ms",
        "steps/s of each round",
        "server CPU us/step: event loop / other threads",
        "errors",
    ]
    print(f"model {report['model']}, store {report['store']}")
    print(markdown_table(header, rows))
    rates = {r["transport"]: r["steps_per_s"] for r in report["results"]}
    report["ratios_to_v2_rest"] = {t: rates[t] / rates["v2-rest"] for t in TRANSPORTS[:2] if rates["v2-rest"]}
    for transport, ratio in report["ratios_to_v2_rest"].items():
        print(f"{transport} / v2-rest: {ratio:.2f}x")
    print(f"Target: grpc-stream >= {TARGET_STREAM_RATIO}x REST /v2's steps/s")
    report.update({"concurrency": args.concurrency, "seconds": args.seconds, "rounds": args.rounds})
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
