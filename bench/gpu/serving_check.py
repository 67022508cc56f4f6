"""GPU serving check: the service with ``NTM_DEVICE=cuda`` answers as it does on the CPU.

Run on a machine with a GPU: ``python bench/gpu/serving_check.py`` (exit status 0: all good).
It starts two apps on the shipped model, one on ``cuda`` and one on ``cpu``, drives the same
16 concurrent sessions through both over the ASGI transport (single steps and the batch form,
so that sessions share micro-batches and jobs of several steps run on the device), and
compares every probability. CI has no GPU; this is the check the README cites for GPU serving.

Then the batcher alone, in process, on the fast model with its step compiled (NTM_COMPILE's
path: CUDA graphs on the GPU, inductor's C++ on the CPU): session-steps/s with 1,024
concurrent sessions of 20 steps, and the p50 latency of one session stepping alone, on cuda
and on cpu. Targets: cuda >= 10x cpu at 1,024 sessions, p50 <= 1 ms at batch 1. Run it as one
command with a time limit (``timeout 600 python bench/gpu/serving_check.py``): the warm-ups
compile a ladder of 11 batch sizes on each device.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models import PackedState, load_checkpoint  # noqa: E402
from service.app import create_app  # noqa: E402
from service.batching import MicroBatcher  # noqa: E402
from service.settings import FAST_DIR, Settings  # noqa: E402

SESSIONS, STEPS, TOLERANCE = 16, 30, 1e-4
CONCURRENT, CONCURRENT_STEPS, ALONE_STEPS = 1024, 20, 300
TARGET_SPEEDUP, TARGET_P50_MS = 10.0, 1.0


def episode(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    bodies = []
    for t in range(STEPS):
        gray = rng.integers(0, 256, size=(28, 28)).astype(np.uint8)
        body: dict = {"image": {"gray8": base64.b64encode(gray.tobytes()).decode(), "shape": [28, 28]}}
        if t % 4 != 3:
            body["label"] = int(rng.integers(0, 5))
        bodies.append(body)
    return bodies


async def run(device: str) -> tuple[np.ndarray, float]:
    # cuda runs its compiled step (CUDA graphs), cpu the eager reference
    app = create_app(Settings(device=device, compile=device == "cuda", access_log=False, log_level="warning"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://check", timeout=60) as client:

            async def one(seed: int) -> list[list[float]]:
                session = (await client.post("/v1/sessions")).json()["session_id"]
                bodies, results = episode(seed), []
                for start in range(0, STEPS, 10):  # steps one by one, then a batch of the next few
                    for body in bodies[start : start + 5]:
                        response = await client.post(f"/v1/sessions/{session}/steps", json=body)
                        assert response.status_code == 200, response.text
                        results.append(response.json()["probabilities"])
                    response = await client.post(
                        f"/v1/sessions/{session}/steps", json={"steps": bodies[start + 5 : start + 10]}
                    )
                    assert response.status_code == 200, response.text
                    results += [r["probabilities"] for r in response.json()["results"]]
                return results

            started = time.perf_counter()
            probabilities = await asyncio.gather(*(one(seed) for seed in range(SESSIONS)))
            seconds = time.perf_counter() - started
    return np.array(probabilities), SESSIONS * STEPS / seconds


async def batcher_figures(device: str) -> tuple[float, float, float]:
    """(session-steps/s of 1,024 concurrent sessions, p50 ms of one session alone, warm-up s) on ``device``."""
    model = load_checkpoint(FAST_DIR, device)
    batcher = MicroBatcher(model, max_batch=CONCURRENT, max_wait=0.002, name=device, compile=True)
    try:
        await asyncio.to_thread(batcher.ready.wait, 900)
        initial = model.initial_state(1).sessions()[0]
        initial = PackedState(initial.data.to("cpu"), initial.layout)  # as the store hands it over
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(CONCURRENT_STEPS)]
        slots = [-1] + [t % 5 for t in range(CONCURRENT_STEPS - 1)]
        await asyncio.gather(*(batcher.run(initial, images, slots) for _ in range(CONCURRENT)))  # warm
        started = time.perf_counter()
        await asyncio.gather(*(batcher.run(initial, images, slots) for _ in range(CONCURRENT)))
        rate = CONCURRENT * CONCURRENT_STEPS / (time.perf_counter() - started)
        state, latencies = initial, []
        for t in range(ALONE_STEPS):
            started = time.perf_counter()
            _, state = await batcher.step(state, images[t % CONCURRENT_STEPS], slots[t % CONCURRENT_STEPS])
            latencies.append(time.perf_counter() - started)
        return rate, 1000 * float(np.median(latencies)), batcher.warm_up_seconds or 0.0
    finally:
        batcher.close()


async def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here")
        return 2
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    on_gpu, gpu_rate = await run("cuda")
    on_cpu, cpu_rate = await run("cpu")
    difference = float(np.abs(on_gpu - on_cpu).max())
    print(f"{SESSIONS} sessions x {STEPS} steps; largest |cuda - cpu| probability difference: {difference:.2e}")
    print(f"steps/s in process (ASGI, no network): cuda {gpu_rate:,.0f}, cpu {cpu_rate:,.0f}")
    ok = on_gpu.shape == (SESSIONS, STEPS, 5) and difference <= TOLERANCE
    print("OK" if ok else f"FAILED: difference over {TOLERANCE}")
    figures = {device: await batcher_figures(device) for device in ("cuda", "cpu")}
    for device, (rate, p50, warm) in figures.items():
        print(f"batcher, fast model, compiled, {device}: {rate:,.0f} session-steps/s at {CONCURRENT} sessions, "
              f"p50 {p50:.3f} ms alone, warm-up {warm:.0f} s")  # fmt: skip
    speedup, p50 = figures["cuda"][0] / figures["cpu"][0], figures["cuda"][1]
    print(f"cuda / cpu at {CONCURRENT} sessions: {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x); "
          f"p50 alone {p50:.3f} ms (target <= {TARGET_P50_MS} ms)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
