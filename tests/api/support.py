"""Helpers of the API and integration tests: apps, servers, images, and the model's own answer."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from PIL import Image

from models import NTM
from models.data.preprocess import preprocess
from service.app import create_app
from service.settings import PRETRAINED_DIR, Settings
from tests.servers import ServerProcess

MAX_BODY_BYTES = 1024 * 1024  # room for a 513x513 pixel array (about 0.5 MB), so that it meets the image check
MAX_STEPS_PER_REQUEST = 16
MIN_SESSION_TTL_SECONDS = 0.1  # the expiry tests wait out sessions of 0.2 s (the service's own minimum is 1 s)
NUM_WAYS = 5
SESSION_ID_PATTERN = r"[A-Za-z0-9_-]{22}"
ISO_PATTERN = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"
TOLERANCE = 1e-5

# ----------------------------------------------------------------------------------- apps


def api_settings(tiny_checkpoint: Path, **overrides: Any) -> Settings:
    """The settings every API test app and the test server share: the tiny model (default) and the shipped one."""
    values: dict[str, Any] = {
        "models": [tiny_checkpoint, PRETRAINED_DIR],
        "store": "memory://",
        "max_body_bytes": MAX_BODY_BYTES,
        "max_steps_per_request": MAX_STEPS_PER_REQUEST,
        "min_session_ttl_seconds": MIN_SESSION_TTL_SECONDS,
        "access_log": False,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, tracer_provider: TracerProvider | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An in-process app with its lifespan running, and a client over the ASGI transport."""
    app = create_app(settings, tracer_provider)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        yield app, client


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """``running_app``'s client alone."""
    async with running_app(settings) as (_, client):
        yield client


# ----------------------------------------------------------------------------------- servers


def start_uvicorn(tiny_checkpoint: Path, log_path: Path) -> ServerProcess:
    """``python -m uvicorn service.app:app_from_env --factory`` with the settings of ``api_settings``."""
    env = {
        "NTM_MODELS": f"{tiny_checkpoint},{PRETRAINED_DIR}",
        "NTM_ACCESS_LOG": "false",
        "NTM_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "NTM_MAX_STEPS_PER_REQUEST": str(MAX_STEPS_PER_REQUEST),
        "NTM_MIN_SESSION_TTL_SECONDS": str(MIN_SESSION_TTL_SECONDS),
    }
    # log level info: the log then shows the lifespan's "ready" and "stopped"
    return ServerProcess(env, log_path=log_path, log_level="info").wait_ready()


# ----------------------------------------------------------------------------------- images and bodies


def random_pixels(seed: int, height: int = 28, width: int = 28) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width)).tolist()


def png_base64(gray: np.ndarray | list, mode: str = "L", image_format: str = "PNG") -> str:
    image = Image.fromarray(np.asarray(gray, dtype=np.uint8), "L")
    if mode != "L":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def blank_png_base64(width: int, height: int) -> str:
    return png_base64(np.full((height, width), 255, dtype=np.uint8))


def step_body(pixels: list, label: Any = None, step: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"image": {"pixels": pixels}}
    if label is not None:
        body["label"] = label
    if step is not None:
        body["step"] = step
    return body


VALID_STEP = step_body([[255, 0], [0, 255]])


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error shape: {"error": {"code": str, "message": str, ...}}; returns the inner object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"], body
    assert isinstance(error["message"], str) and error["message"], body
    if code is not None:
        assert error["code"] == code, body
    return error


async def new_session(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/sessions", json=body or None)
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


async def session_info(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def assert_healthy(client: httpx.AsyncClient, session_id: str) -> None:
    """The server answers /healthz and still applies a valid step to ``session_id``."""
    health = await client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    steps = (await session_info(client, session_id))["steps"]
    response = await client.post(f"/v1/sessions/{session_id}/steps", json=VALID_STEP)
    assert response.status_code == 200, response.text
    assert response.json()["step"] == steps


# ----------------------------------------------------------------------------------- the model's own answer


def label_key(label: Any) -> tuple[type, Any]:
    """JSON keeps 1 and "1" apart; so does the service."""
    return (type(label), label)


def reference_probabilities(model: NTM, grays: Sequence[np.ndarray], labels: Sequence[Any]) -> np.ndarray:
    """What ``forward_sequence`` gives for one episode: probabilities [T, K], each predicted before its label.

    Slots follow the order of first appearance of each distinct label; step t's label input is the
    one-hot slot of step t-1's label (zeros at t = 0 and after a step without a label).
    """
    size, ways = model.config.image_size, model.config.num_ways
    images = torch.from_numpy(np.stack([preprocess(np.asarray(g, dtype=np.float32), size) for g in grays]))
    label_inputs = torch.zeros(len(grays), 1, ways)
    slots: dict[tuple[type, Any], int] = {}
    previous = -1
    for t, label in enumerate(labels):
        if previous >= 0:
            label_inputs[t, 0, previous] = 1.0
        previous = -1 if label is None else slots.setdefault(label_key(label), len(slots))
    with torch.inference_mode():
        logits, _ = model.forward_sequence(images.unsqueeze(1), label_inputs)
    return torch.softmax(logits[:, 0].float(), dim=-1).numpy()
