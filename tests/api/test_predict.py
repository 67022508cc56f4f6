"""Read-only predictions: each image answered as a label-less next step would be, the session left untouched."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.api.support import (
    TOLERANCE,
    api_settings,
    app_client,
    assert_error,
    new_session,
    png_base64,
    random_pixels,
    running_app,
    session_info,
    step_body,
)

pytestmark = pytest.mark.anyio
TAUGHT = [(random_pixels(1), "a"), (random_pixels(2), "b"), (random_pixels(3), "a"), (random_pixels(4), None)]


async def teach(client: httpx.AsyncClient, session: str, steps=TAUGHT) -> None:
    for pixels, label in steps:
        response = await client.post(f"/v1/sessions/{session}/steps", json=step_body(pixels, label))
        assert response.status_code == 200, response.text


@contextlib.asynccontextmanager
async def app_on(store: str, tiny_checkpoint: Path, request: pytest.FixtureRequest):
    """An in-process app on the memory store, or on a real Redis under this test's own key prefix."""
    overrides = {}
    if store == "redis":
        overrides = {
            "store": request.getfixturevalue("redis_url"),
            "redis_prefix": request.getfixturevalue("redis_prefix"),
        }
    async with running_app(api_settings(tiny_checkpoint, **overrides)) as running:
        yield running


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_prediction_is_the_next_label_less_step_and_changes_nothing(store, tiny_checkpoint, request):
    async with app_on(store, tiny_checkpoint, request) as (app, client):
        session = await new_session(client)
        await teach(client, session)
        before = await app.state.engine.store.get(session)
        queries = [random_pixels(10), random_pixels(11), random_pixels(1)]
        images = [{"pixels": queries[0]}, {"png": png_base64(np.array(queries[1]))}, {"pixels": queries[2]}]
        response = await client.post(f"/v1/sessions/{session}/predict", json={"images": images})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["steps"] == len(TAUGHT) and len(body["results"]) == 3
        after = await app.state.engine.store.get(session)
        assert after.state.data.numpy().tobytes() == before.state.data.numpy().tobytes()
        assert (after.steps, after.version, after.expires_at) == (before.steps, before.version, before.expires_at)
        for query, predicted in zip(queries, body["results"], strict=True):
            fork = await new_session(client)  # the same history, then the query as a step
            await teach(client, fork)
            stepped = (await client.post(f"/v1/sessions/{fork}/steps", json=step_body(query))).json()
            assert np.allclose(predicted["probabilities"], stepped["probabilities"], atol=TOLERANCE)
            for key in ("prediction", "predicted_slot", "novelty"):
                assert predicted[key] == pytest.approx(stepped[key], abs=TOLERANCE)


async def test_predictions_run_beside_steps_without_blocking_reordering_or_doubling_them(client):
    session, reference = await new_session(client), await new_session(client)
    steps = [(random_pixels(20 + t), "abc"[t % 3]) for t in range(8)]
    expected = []
    for pixels, label in steps:
        expected.append((await client.post(f"/v1/sessions/{reference}/steps", json=step_body(pixels, label))).json())

    async def stepping() -> list[dict]:
        return [
            (await client.post(f"/v1/sessions/{session}/steps", json=step_body(pixels, label, t))).json()
            for t, (pixels, label) in enumerate(steps)
        ]

    async def predicting(seed: int) -> list[httpx.Response]:
        body = {"images": [{"pixels": random_pixels(seed)}] * 3}
        return [await client.post(f"/v1/sessions/{session}/predict", json=body) for _ in range(4)]

    stepped, *predicted = await asyncio.gather(stepping(), *(predicting(s) for s in range(6)))
    assert all(r.status_code == 200 for rs in predicted for r in rs)
    assert [r["step"] for r in stepped] == list(range(len(steps)))
    for got, want in zip(stepped, expected, strict=True):
        assert np.allclose(got["probabilities"], want["probabilities"], atol=TOLERANCE)
    assert (await session_info(client, session))["steps"] == len(steps)
    assert all(0 <= r.json()["steps"] <= len(steps) for rs in predicted for r in rs)


async def test_a_session_with_no_step_yet_can_predict(client):
    session = await new_session(client)
    response = await client.post(f"/v1/sessions/{session}/predict", json={"images": [{"pixels": random_pixels(5)}]})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["prediction"] is None and result["novelty"] == pytest.approx(1.0, abs=1e-6)
    assert (await session_info(client, session))["steps"] == 0


async def test_bad_predictions_are_refused_before_the_model(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint, max_predict_images=3, api_keys=["k1", "k2"])) as client:
        own = {"Authorization": "Bearer k1"}
        session = (await client.post("/v1/sessions", headers=own)).json()["session_id"]
        url = f"/v1/sessions/{session}/predict"
        image = {"pixels": random_pixels(1)}
        assert_error(await client.post(url, json={"images": [image] * 4}, headers=own), 422, "too_many_images")
        assert_error(await client.post(url, json={"images": []}, headers=own), 422, "invalid_request")
        assert_error(await client.post(url, json={}, headers=own), 422, "invalid_request")
        error = assert_error(await client.post(url, json={"images": [image, {"pixels": [[0, 300]]}]}, headers=own), 422)
        assert error["code"] == "invalid_image" and "images.1.pixels" in error["message"]
        assert_error(await client.post(url, json={"images": [image]}), 401)
        assert_error(await client.post(url, json={"images": [image]}, headers={"Authorization": "Bearer k2"}), 404)
        assert_error(await client.post("/v1/sessions/nope/predict", json={"images": [image]}, headers=own), 404)
        response = await client.post(url, json={"images": [image] * 3}, headers=own)
        assert (
            response.status_code == 200
            and (await client.get(f"/v1/sessions/{session}", headers=own)).json()["steps"] == 0
        )
