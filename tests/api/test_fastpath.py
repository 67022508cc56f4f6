"""The step route's direct ASGI path: it answers the route itself, declines what it should, and
answers exactly like the documented FastAPI route (which other tests drive through it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api import v1
from service.api.fastpath import PREDICT_ROUTE_PATH, STEPS_ROUTE_PATH, StepRoute, fast_route_of, route_path
from tests.api.support import api_settings, app_client, new_session, random_pixels, step_body

pytestmark = pytest.mark.anyio


class RouteReached(Exception):
    pass


def test_fast_route_of_a_path() -> None:
    assert fast_route_of("/v1/sessions/abc/steps") == (STEPS_ROUTE_PATH, "abc")
    assert fast_route_of("/v1/sessions/abc/predict") == (PREDICT_ROUTE_PATH, "abc")
    assert fast_route_of("/v1/sessions/" + "x" * 64 + "/steps") == (STEPS_ROUTE_PATH, "x" * 64)
    for declined in (
        "/v1/sessions//steps",
        "/v1/sessions/" + "x" * 65 + "/steps",
        "/v1/sessions/a/b/steps",
        "/v1/sessions/abc/steps/",
        "/v1/sessions/abc/reset",
        "/v1/sessions/abc",
        "/v2/sessions/abc/steps",
        "/v1/sessions/abc/snapshot",
        "/v1/sessions/a/b/predict",
    ):
        assert fast_route_of(declined) is None, declined
    assert route_path({"path": "/api/v1/sessions/a/steps", "root_path": "/api"}) == "/v1/sessions/a/steps"
    assert route_path({"path": "/v1/sessions/a/steps", "root_path": ""}) == "/v1/sessions/a/steps"


async def test_steps_are_answered_without_the_fastapi_route(tiny_checkpoint: Path, monkeypatch) -> None:
    route = next(r for r in v1.router.routes if getattr(r, "path", None) == STEPS_ROUTE_PATH)

    async def reached(*args, **kwargs):
        raise RouteReached

    monkeypatch.setattr(route, "handle", reached)
    async with app_client(api_settings(tiny_checkpoint)) as client:
        session_id = await new_session(client)
        with pytest.raises(RouteReached):  # the patch works: what the fast path declines reaches the route
            await client.post(f"/v1/sessions/{'x' * 65}/steps", json=step_body(random_pixels(1), "a"))
        response = await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(1), "a"))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json" and response.headers["x-request-id"]
        bad = await client.post(f"/v1/sessions/{session_id}/steps", json={"image": {"pixels": [[-1]]}})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_image"
        missing = await client.post("/v1/sessions/nope/steps", json=step_body(random_pixels(1)))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
        metrics = (await client.get("/metrics")).text
        assert 'method="POST",route="/v1/sessions/{session_id}/steps",status="200"' in metrics


async def test_predictions_are_answered_without_the_fastapi_route(tiny_checkpoint: Path, monkeypatch) -> None:
    route = next(r for r in v1.router.routes if getattr(r, "path", None) == PREDICT_ROUTE_PATH)

    async def reached(*args, **kwargs):
        raise RouteReached

    monkeypatch.setattr(route, "handle", reached)
    async with app_client(api_settings(tiny_checkpoint, max_predict_images=2)) as client:
        session_id = await new_session(client)
        images = [{"pixels": random_pixels(seed)} for seed in range(2)]
        with pytest.raises(RouteReached):
            await client.post(f"/v1/sessions/{'x' * 65}/predict", json={"images": images})
        response = await client.post(f"/v1/sessions/{session_id}/predict", json={"images": images})
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 2 and response.headers["content-type"] == "application/json"
        too_many = await client.post(f"/v1/sessions/{session_id}/predict", json={"images": images * 2})
        assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "too_many_images"
        metrics = (await client.get("/metrics")).text
        assert 'method="POST",route="/v1/sessions/{session_id}/predict",status="200"' in metrics


async def test_a_client_gone_before_its_body_gets_no_answer_and_the_session_no_step(tiny_checkpoint: Path) -> None:
    async with app_client(api_settings(tiny_checkpoint)) as client:
        session_id = await new_session(client)
        app = client._transport.app  # the FastAPI app under the ASGI transport
        fast = StepRoute(app)
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": f"/v1/sessions/{session_id}/steps",
            "headers": [],
            "path_params": {"session_id": session_id},
        }
        await fast(scope, receive, send)
        assert sent == []
        assert (await client.get(f"/v1/sessions/{session_id}")).json()["steps"] == 0


async def test_an_unexpected_error_on_the_step_route_is_a_json_500_with_its_request_id(
    tiny_checkpoint: Path, monkeypatch
) -> None:
    """The step route's own stack has no Starlette error middleware: it answers the app's 500 itself,
    through the request middleware (request ID, metrics), and leaves the exception for the server to log."""
    import httpx

    from service.api import fastpath
    from service.app import create_app

    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    app = create_app(api_settings(tiny_checkpoint))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            session_id = await new_session(client)
            monkeypatch.setitem(fastpath.RUNNERS, fastpath.STEPS_ROUTE_PATH, broken)
            response = await client.post(f"/v1/sessions/{session_id}/steps", json=step_body(random_pixels(1)))
            assert response.status_code == 500 and response.headers["x-request-id"]
            assert response.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
            metrics = (await client.get("/metrics")).text
            assert 'method="POST",route="/v1/sessions/{session_id}/steps",status="500"' in metrics
            assert (await client.get("/healthz")).status_code == 200


def test_fastapi_telemetry_is_off_unless_asked_for(tiny_checkpoint: Path) -> None:
    from service.app import create_app

    assert not create_app(api_settings(tiny_checkpoint))._native_telemetry.enabled()
    assert create_app(api_settings(tiny_checkpoint, otel_telemetry=True))._telemetry.get("tracing", True)


async def test_the_startup_heap_is_frozen_while_serving_and_released_at_shutdown(tiny_checkpoint: Path) -> None:
    import gc

    from service.app import GC_THRESHOLDS

    before = gc.get_threshold()
    async with app_client(api_settings(tiny_checkpoint)) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
