"""A server that compiles its model step (NTM_COMPILE=1): not ready until warm, then the eager answers, then its packages."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.api.support import random_pixels, step_body
from tests.servers import ServerProcess

pytestmark = pytest.mark.inductor

TOLERANCE = 1e-5


def first_readiness(server: ServerProcess, timeout: float = 60.0) -> httpx.Response:
    """The first /readyz answer the server gives (it listens before its models are warm)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(server.url + "/readyz", timeout=5.0)
        time.sleep(0.02)
    raise AssertionError(f"no answer from /readyz:\n{server.log()}")


def episode(server: ServerProcess, images: list[list[list[int]]]) -> list[list[float]]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        session = client.post("/v1/sessions", json={}).json()["session_id"]
        answers = [
            client.post(f"/v1/sessions/{session}/steps", json=step_body(image, label=t % 3))
            for t, image in enumerate(images)
        ]
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    return [answer.json()["probabilities"] for answer in answers]


def test_a_compiling_server_says_503_until_warm_then_answers_as_an_eager_one_before_and_after_its_packages(
    tiny_checkpoint: Path, tmp_path: Path
):
    common = {"NTM_MODELS": str(tiny_checkpoint), "NTM_MAX_BATCH": "4"}
    # A cache of its own, empty: the warm-up compiles, so it outlasts the server's start.
    compiled = ServerProcess({**common, "NTM_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
                             log_path=tmp_path / "compiled.log", log_level="info")  # fmt: skip
    eager = ServerProcess(common, log_path=tmp_path / "eager.log")
    try:
        first = first_readiness(compiled)
        assert first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "not_ready" and "warm-up" in first.json()["error"]["message"]
        compiled.wait_ready(timeout=300)
        eager.wait_ready()
        assert '"runner": "compiled"' in compiled.log() and '"message": "model warm"' in compiled.log()
        images = [random_pixels(seed) for seed in range(8)]
        want = episode(eager, images)
        np.testing.assert_allclose(episode(compiled, images), want, rtol=0, atol=TOLERANCE)
        # Once ready it builds the one-row packages in the background; lone steps then run through them.
        # The build autotunes its GEMMs: 1-2 minutes alone, twice that beside the other test worker.
        compiled.wait_packages(timeout=480)
        assert '"message": "one-row packages loaded"' in compiled.log()
        np.testing.assert_allclose(episode(compiled, images), want, rtol=0, atol=TOLERANCE)
    finally:
        compiled.stop()
        eager.stop()
