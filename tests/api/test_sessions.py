"""Sessions, models, health, metrics and docs of the /v1 API, in process and over a real server."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models import load_checkpoint
from service.settings import PRETRAINED_DIR, Settings
from tests.api.support import (
    ISO_PATTERN,
    MAX_BODY_BYTES,
    NUM_WAYS,
    SESSION_ID_PATTERN,
    VALID_STEP,
    api_settings,
    app_client,
    assert_error,
    new_session,
    random_pixels,
    running_app,
    session_info,
    step_body,
)

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


def parse_iso(text: str) -> float:
    assert re.fullmatch(ISO_PATTERN, text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


# ----------------------------------------------------------------------------------- lifecycle


async def test_create_session_defaults(client: httpx.AsyncClient) -> None:
    before = time.time()
    response = await client.post("/v1/sessions")
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"session_id", "model", "num_ways", "expires_at"}
    assert re.fullmatch(SESSION_ID_PATTERN, body["session_id"])
    assert body["model"] == "tiny" and body["num_ways"] == NUM_WAYS
    assert before + 3600 - 1 <= parse_iso(body["expires_at"]) <= time.time() + 3600 + 1


async def test_create_session_with_model_and_ttl(client: httpx.AsyncClient) -> None:
    before = time.time()
    response = await client.post("/v1/sessions", json={"model": "default", "ttl_seconds": 120})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["model"] == "default" and body["num_ways"] == NUM_WAYS
    assert before + 119 <= parse_iso(body["expires_at"]) <= time.time() + 121
    info = await session_info(client, body["session_id"])
    assert info["model"] == "default"


async def test_session_ids_are_unique(client: httpx.AsyncClient) -> None:
    ids = await asyncio.gather(*(new_session(client) for _ in range(20)))
    assert len(set(ids)) == 20


async def test_create_session_unknown_model(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.post("/v1/sessions", json={"model": "nope"}), 404, "model_not_found")
    assert "nope" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"ttl_seconds": 0},
        {"ttl_seconds": -1},
        {"ttl_seconds": 10 * 24 * 3600.0},
        {"ttl_seconds": "soon"},
        {"model": 3},
        {"colour": "blue"},
    ],
    ids=["ttl-zero", "ttl-negative", "ttl-over-max", "ttl-string", "model-int", "unknown-field"],
)
async def test_create_session_bad_body(client: httpx.AsyncClient, body: dict) -> None:
    assert_error(await client.post("/v1/sessions", json=body), 422, "invalid_request")


async def test_get_session(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    info = await session_info(client, session_id)
    assert info["session_id"] == session_id
    assert info["model"] == "tiny" and info["num_ways"] == NUM_WAYS
    assert info["steps"] == 0 and info["labels"] == [None] * NUM_WAYS and info["accuracy"] is None
    parse_iso(info["expires_at"])
    await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(1), "x"))
    await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(2)))
    info = await session_info(client, session_id)
    assert info["steps"] == 2 and info["labels"] == ["x", None, None, None, None]
    assert info["accuracy"] in (0.0, 1.0)


async def test_reset_starts_a_fresh_episode(client: httpx.AsyncClient) -> None:
    session_id, fresh_id = await new_session(client), await new_session(client)
    first = step_body(random_pixels(7), "a")
    for seed, label in [(1, "a"), (2, "b"), (3, None)]:
        response = await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(seed), label))
        assert response.status_code == 200
    response = await client.post(f"/v1/sessions/{session_id}/reset")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["session_id"] == session_id and info["steps"] == 0
    assert info["labels"] == [None] * NUM_WAYS and info["accuracy"] is None
    assert await session_info(client, session_id) == info
    after_reset = (await client.post(f"/v1/sessions/{session_id}/steps", json=first)).json()
    on_fresh = (await client.post(f"/v1/sessions/{fresh_id}/steps", json=first)).json()
    assert after_reset["step"] == 0 and after_reset["labels"] == ["a", None, None, None, None]
    assert after_reset["probabilities"] == pytest.approx(on_fresh["probabilities"], abs=1e-6)


async def test_delete_session(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    response = await client.delete(f"/v1/sessions/{session_id}")
    assert response.status_code == 204 and response.content == b""
    assert_error(await client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")
    assert_error(await client.delete(f"/v1/sessions/{session_id}"), 404, "session_not_found")
    assert_error(await client.post(f"/v1/sessions/{session_id}/steps", json=VALID_STEP), 404, "session_not_found")


async def test_unknown_session(client: httpx.AsyncClient) -> None:
    unknown = "A" * 22
    assert_error(await client.get(f"/v1/sessions/{unknown}"), 404, "session_not_found")
    assert_error(await client.post(f"/v1/sessions/{unknown}/steps", json=VALID_STEP), 404, "session_not_found")
    batch = {"steps": [VALID_STEP]}
    assert_error(await client.post(f"/v1/sessions/{unknown}/steps", json=batch), 404, "session_not_found")
    assert_error(await client.post(f"/v1/sessions/{unknown}/reset"), 404, "session_not_found")
    assert_error(await client.delete(f"/v1/sessions/{unknown}"), 404, "session_not_found")
    assert_error(await client.get(f"/v1/sessions/{'x' * 65}"), 422, "invalid_request")


async def test_expired_session(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client, ttl_seconds=0.2)
    kept_id = await new_session(client)
    await asyncio.sleep(0.4)
    assert_error(await client.post(f"/v1/sessions/{session_id}/steps", json=VALID_STEP), 404, "session_not_found")
    assert_error(await client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")
    assert (await client.post(f"/v1/sessions/{kept_id}/steps", json=VALID_STEP)).status_code == 200


async def test_a_step_extends_the_ttl(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client, ttl_seconds=0.5)
    for _ in range(2):  # the session lives past its first 0.5 s
        await asyncio.sleep(0.3)
        assert (await client.post(f"/v1/sessions/{session_id}/steps", json=VALID_STEP)).status_code == 200
    assert (await session_info(client, session_id))["steps"] == 2


# ----------------------------------------------------------------------------------- store capacity


async def test_store_capacity(tiny_checkpoint: Path) -> None:
    async with app_client(api_settings(tiny_checkpoint, max_sessions=2)) as client:
        first, second = await new_session(client), await new_session(client)
        response = await client.post("/v1/sessions")
        assert_error(response, 503, "store_full")
        assert int(response.headers["retry-after"]) > 0
        for session_id in (first, second):  # a live session is never evicted to make room
            assert (await client.post(f"/v1/sessions/{session_id}/steps", json=VALID_STEP)).status_code == 200
            assert (await session_info(client, session_id))["steps"] == 1
        assert (await client.delete(f"/v1/sessions/{first}")).status_code == 204
        await new_session(client)
        assert_error(await client.post("/v1/sessions"), 503, "store_full")


async def test_store_capacity_frees_expired_sessions(tiny_checkpoint: Path) -> None:
    async with app_client(api_settings(tiny_checkpoint, max_sessions=2)) as client:
        await new_session(client, ttl_seconds=0.2)
        live = await new_session(client)
        await asyncio.sleep(0.3)
        await new_session(client)  # the expired one makes room
        assert (await session_info(client, live))["steps"] == 0
        assert_error(await client.post("/v1/sessions"), 503, "store_full")


async def test_expired_sessions_are_not_counted_live(asgi_client: httpx.AsyncClient) -> None:
    await new_session(asgi_client, ttl_seconds=0.2)
    await new_session(asgi_client)
    await asyncio.sleep(0.3)  # expired, and not yet swept (every 30 s by default)
    samples = metric_samples((await asgi_client.get("/metrics")).text)
    assert samples["ntm_active_sessions"][0].value == 1


async def test_the_sweeper_drops_expired_sessions(tiny_checkpoint: Path) -> None:
    async with running_app(api_settings(tiny_checkpoint, sweep_interval_seconds=0.05)) as (app, client):
        await new_session(client, ttl_seconds=0.2)
        live = await new_session(client)
        records = app.state.engine.store._records  # what the store holds, expired or not
        deadline = time.monotonic() + 10
        while len(records) > 1 and time.monotonic() < deadline:  # no request touches the store meanwhile
            await asyncio.sleep(0.05)
        assert list(records) == [live]


async def test_no_new_session_while_draining(tiny_checkpoint: Path) -> None:
    async with running_app(api_settings(tiny_checkpoint)) as (app, client):
        app.state.engine.draining = True  # as the lifespan sets it on SIGTERM
        response = await client.post("/v1/sessions")
        assert_error(response, 503, "unavailable")
        assert response.headers["retry-after"] == "1"


# ----------------------------------------------------------------------------------- models and health


async def test_models(client: httpx.AsyncClient, tiny_checkpoint: Path) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert list(models) == ["tiny", "default"]
    assert models["tiny"] == {
        "name": "tiny",
        "num_ways": 5,
        "image_size": 28,
        "encoder": "conv",
        "memory": [16, 8],
        "addressing": "ntm",
        "read_heads": 1,
        "hidden_size": 32,
        "fingerprint": load_checkpoint(tiny_checkpoint).fingerprint(),
        "default": True,
    }
    shipped = load_checkpoint(PRETRAINED_DIR)
    assert models["default"]["fingerprint"] == shipped.fingerprint()
    assert models["default"]["default"] is False
    assert models["default"]["memory"] == [shipped.config.memory_slots, shipped.config.memory_width]


async def test_shipped_model_is_the_default_without_models_setting() -> None:
    async with app_client(Settings(store="memory://", access_log=False)) as client:
        models = (await client.get("/v1/models")).json()["models"]
        assert [(m["name"], m["default"]) for m in models] == [("default", True), ("fast", False)]
        response = await client.post("/v1/sessions")
        assert response.status_code == 201 and response.json()["model"] == "default"


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status_code == 200 and response.json() == {"status": "ready", "models": ["tiny", "default"]}
    assert response.headers["x-request-id"]


async def test_request_id(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    one, two = await client.get("/healthz"), await client.get("/healthz")
    assert one.headers["x-request-id"] != two.headers["x-request-id"]


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v2/sessions"), 404, "not_found")
    assert_error(await client.put("/v1/sessions"), 405, "method_not_allowed")


def metric_samples(text: str) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


async def test_metrics(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    for seed in range(3):
        await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(seed)))
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("ntm_request_duration_seconds", "ntm_batch_size", "ntm_active_sessions", "ntm_steps"):
        assert name in text
    samples = metric_samples(text)
    assert samples["ntm_active_sessions"][0].value >= 1
    assert sum(s.value for s in samples["ntm_steps_total"] if s.labels["model"] == "tiny") >= 3
    routes = {s.labels["route"] for s in samples["ntm_request_duration_seconds_count"]}
    assert "/v1/sessions/{session_id}/steps" in routes


async def test_metrics_count_exactly(asgi_client: httpx.AsyncClient) -> None:
    client = asgi_client
    ids = [await new_session(client) for _ in range(2)]
    for seed in range(4):
        await client.post(f"/v1/sessions/{ids[0]}/steps", json=step_body(random_pixels(seed)))
    await client.post(f"/v1/sessions/{ids[1]}/steps", json={"steps": [VALID_STEP, VALID_STEP]})
    samples = metric_samples((await client.get("/metrics")).text)
    assert samples["ntm_active_sessions"][0].value == 2
    assert [(s.labels["model"], s.value) for s in samples["ntm_steps_total"]] == [("tiny", 6)]
    batches = [s for s in samples["ntm_batch_size_sum"] if s.labels["model"] == "tiny"]
    assert batches[0].value == 6  # every step went through the model once
    posts = [
        s.value
        for s in samples["ntm_request_duration_seconds_count"]
        if s.labels["route"] == "/v1/sessions/{session_id}/steps" and s.labels["status"] == "200"
    ]
    assert posts == [5]


async def test_metrics_count_errors_by_code(asgi_client: httpx.AsyncClient) -> None:
    """Every error answer counts once under its code: the engine's, the schema's, the middleware's, /v2's."""
    client = asgi_client
    session_id = await new_session(client)
    await client.post("/v1/sessions/nope/steps", json=VALID_STEP)
    await client.get("/v1/sessions/nope")
    await client.post(f"/v1/sessions/{session_id}/steps", json={"image": {"png": "bm90IGFuIGltYWdl"}})
    await client.post(f"/v1/sessions/{session_id}/steps", json={"image": {"pixels": [[0]]}, "label": []})
    await client.post(f"/v1/sessions/{session_id}/steps", content=b"x" * (MAX_BODY_BYTES + 1), headers=JSON)
    await client.get("/v1/nowhere")
    await client.get("/v2/models/nope")
    await client.post(f"/v1/sessions/{session_id}/steps", json=VALID_STEP)  # no error: nothing counted
    samples = metric_samples((await client.get("/metrics")).text)
    counted = {s.labels["code"]: s.value for s in samples["ntm_errors_total"]}
    assert counted == {
        "session_not_found": 2,
        "invalid_image": 1,
        "invalid_request": 1,
        "payload_too_large": 1,
        "not_found": 2,
    }


# ----------------------------------------------------------------------------------- docs


async def test_docs(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


async def test_openapi_examples_work_when_pasted(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    schemas = spec["components"]["schemas"]
    body_schema = spec["paths"]["/v1/sessions/{session_id}/steps"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    refs = {option["$ref"] for option in body_schema["oneOf"]}
    assert refs == {"#/components/schemas/StepIn", "#/components/schemas/StepsIn"}
    step_examples = schemas["StepIn"]["examples"]
    image_examples = schemas["ImageIn"]["examples"]
    create_examples = schemas["CreateSessionIn"]["examples"]
    assert step_examples and image_examples and create_examples

    for example in create_examples:
        response = await client.post("/v1/sessions", json=example)
        assert response.status_code == 201, response.text
    session_id = response.json()["session_id"]
    named = spec["paths"]["/v1/sessions/{session_id}/steps"]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]  # the ones /docs offers in its drop-down
    assert named
    named_bodies = [example["value"] for example in named.values()]
    singles = [*step_examples, *({"image": image} for image in image_examples)]
    singles += [body for body in named_bodies if "steps" not in body]
    batches = [body for body in named_bodies if "steps" in body]
    bodies = [*singles, *batches, {"steps": singles}]
    steps_so_far = 0
    for body in bodies:
        response = await client.post(f"/v1/sessions/{session_id}/steps", json=body)
        assert response.status_code == 200, (body, response.text)
        results = response.json()["results"] if "steps" in body else [response.json()]
        assert [r["step"] for r in results] == list(range(steps_so_far, steps_so_far + len(results)))
        steps_so_far += len(results)

    predict_examples = schemas["PredictIn"]["examples"]
    assert predict_examples
    for body in predict_examples:
        response = await client.post(f"/v1/sessions/{session_id}/predict", json=body)
        assert response.status_code == 200, (body, response.text)
        assert len(response.json()["results"]) == len(body["images"]) and response.json()["steps"] == steps_so_far

    for path, methods in spec["paths"].items():  # every documented error answer uses the one error shape
        for method, operation in methods.items():
            for status, answer in operation.get("responses", {}).items():
                if status.startswith(("4", "5")):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (path, method, status)
