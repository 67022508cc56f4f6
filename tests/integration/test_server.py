"""The ``ntm-serve`` process: it starts, serves, logs JSON with request IDs and drains on SIGTERM.

The API itself runs against the real uvicorn server in tests/api (the ``client`` fixture's
``uvicorn`` half); these tests are about the process around it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from models import load_checkpoint
from tests.api.support import assert_error, random_pixels, reference_probabilities, step_body
from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.anyio

NTM_SERVE = str(Path(sys.executable).with_name("ntm-serve"))
WAITING = "Waiting for connections to close. (CTRL+C to force quit)"


@pytest.fixture
def ntm_serve(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """``ntm-serve --port P --model <tiny>`` with its access log on, ready; stopped at the end if still running."""
    port = free_port()
    args = [NTM_SERVE, "--host", "127.0.0.1", "--port", str(port), "--model", str(tiny_checkpoint)]
    server = ServerProcess(
        args=[*args, "--log-level", "info"], port=port, log_path=tmp_path / "serve.log", log_level="info"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def log_entries(server: ServerProcess) -> list[dict]:
    """Every line the server wrote is one JSON object."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def wait_for_log(server: ServerProcess, message: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(entry["message"] == message for entry in log_entries(server)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no log line {message!r}:\n{server.log()}")


async def check_serving(server: ServerProcess, tiny_checkpoint: Path) -> None:
    """Models, a session and an episode that matches the model, an error; each request logged with its ID."""
    labels = ["a", "b", "a", None, "b"]
    grays = [np.array(random_pixels(seed), dtype=np.float32) for seed in range(len(labels))]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        models = (await client.get("/v1/models")).json()["models"]
        assert [(m["name"], m["default"]) for m in models] == [("tiny", True)]
        created = await client.post("/v1/sessions", headers={"X-Request-ID": "create-1"})
        assert created.status_code == 201 and created.headers["x-request-id"] == "create-1"
        session_id = created.json()["session_id"]
        results = []
        for t, (gray, label) in enumerate(zip(grays, labels, strict=True)):
            response = await client.post(
                f"/v1/sessions/{session_id}/steps",
                json=step_body(gray.astype(int).tolist(), label),
                headers={"X-Request-ID": f"step-{t}"},
            )
            assert response.status_code == 200, response.text
            results.append(response.json()["probabilities"])
        assert_error(await client.post(f"/v1/sessions/{session_id}/steps", json={"image": {}}), 422)
    expected = reference_probabilities(load_checkpoint(tiny_checkpoint), grays, labels)
    assert np.abs(np.array(results) - expected).max() <= 1e-5

    entries = log_entries(server)
    ready = [e for e in entries if e["message"] == "ready"]
    assert ready and ready[0]["models"] == ["tiny"] and ready[0]["store"] == "memory://"
    requests = {e["request_id"]: e for e in entries if e["message"] == "request"}
    assert requests["create-1"]["status"] == 201 and requests["create-1"]["method"] == "POST"
    for t in range(len(labels)):
        assert requests[f"step-{t}"]["status"] == 200
        assert requests[f"step-{t}"]["path"] == f"/v1/sessions/{session_id}/steps"
    assert any(e.get("status") == 422 for e in requests.values())
    for entry in entries:
        assert {"time", "level", "logger", "message", "request_id"} <= set(entry)


async def check_sigterm_drains(server: ServerProcess) -> None:
    """SIGTERM while a request's body is still arriving: that request completes, then the lifespan stops."""
    body = json.dumps(step_body(random_pixels(1), "a")).encode()
    headers_sent = asyncio.Event()
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:10]
        headers_sent.set()
        await release.wait()
        yield body[10:]

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        session_id = (await client.post("/v1/sessions")).json()["session_id"]  # also opens the connection
        url = f"/v1/sessions/{session_id}/steps"
        in_flight = asyncio.create_task(
            client.post(url, content=slow_body(), headers={"content-type": "application/json"})
        )
        await asyncio.wait_for(headers_sent.wait(), 10)
        await asyncio.sleep(0.5)  # the idle server reads the request line and headers
        server.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_for_log, server, WAITING)
        release.set()
        response = await asyncio.wait_for(in_flight, 30)
    assert response.status_code == 200, response.text
    assert response.json()["step"] == 0 and response.json()["labels"][0] == "a"
    code = await asyncio.to_thread(server.process.wait, 30)
    assert code in (0, -signal.SIGTERM), server.log()
    messages = [entry["message"] for entry in log_entries(server)]
    assert messages.index(WAITING) < messages.index("stopped")


async def test_ntm_serve_lifecycle(ntm_serve: ServerProcess, tiny_checkpoint: Path) -> None:
    """One process (a start costs seconds): it serves and logs, then drains on SIGTERM."""
    await check_serving(ntm_serve, tiny_checkpoint)
    await check_sigterm_drains(ntm_serve)
