"""GPU serving check: the service with ``NTM_DEVICE=cuda`` answers as it does on the CPU.

Run on a machine with a GPU: ``python bench/gpu/serving_check.py`` (exit status 0: all good).
It starts two apps on the shipped model, one on ``cuda`` and one on ``cpu``, drives the same
16 concurrent sessions through both over the ASGI transport (single steps and the batch form,
so that sessions share micro-batches and jobs of several steps run on the device), and
compares every probability. CI has no GPU; this is the check the README cites for GPU serving.
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

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

SESSIONS, STEPS, TOLERANCE = 16, 30, 1e-4


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
    app = create_app(Settings(device=device, access_log=False, log_level="warning"))
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
