"""API keys, per-key limits, per-session step limits, and start-up refusal of bad checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.auth import key_id
from tests.api.support import api_settings, app_client, random_pixels, step_body

pytestmark = pytest.mark.anyio

KEYS = ["alpha-key-1", "beta-key-2"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_guard_v1_and_sessions_belong_to_their_key(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint, api_keys=KEYS)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}):
            response = await client.post("/v1/sessions", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        created = await client.post("/v1/sessions", headers=bearer(KEYS[0]))
        assert created.status_code == 201
        session = created.json()["session_id"]
        step = step_body(random_pixels(0), "a")
        assert (
            await client.post(f"/v1/sessions/{session}/steps", json=step, headers=bearer(KEYS[0]))
        ).status_code == 200
        for call in (
            client.get(f"/v1/sessions/{session}", headers=bearer(KEYS[1])),
            client.post(f"/v1/sessions/{session}/steps", json=step, headers=bearer(KEYS[1])),
            client.post(f"/v1/sessions/{session}/reset", headers=bearer(KEYS[1])),
            client.delete(f"/v1/sessions/{session}", headers=bearer(KEYS[1])),
        ):
            response = await call
            assert response.status_code == 404, "another key's session looks like no session at all"
            assert response.json()["error"]["code"] == "session_not_found"
        assert (await client.get(f"/v1/sessions/{session}", headers=bearer(KEYS[0]))).json()["steps"] == 1


async def test_metrics_can_require_a_key_and_keys_can_come_from_a_file(tiny_checkpoint, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# one key per line\nfile-key-3\n")
    async with app_client(api_settings(tiny_checkpoint, api_keys_file=key_file, metrics_require_key=True)) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=bearer("file-key-3"))).status_code == 200
        assert (await client.get("/v1/models", headers=bearer("file-key-3"))).status_code == 200


async def test_sessions_per_key_limit_is_429(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint, api_keys=KEYS, max_sessions_per_key=2)) as client:
        for _ in range(2):
            assert (await client.post("/v1/sessions", headers=bearer(KEYS[0]))).status_code == 201
        refused = await client.post("/v1/sessions", headers=bearer(KEYS[0]))
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "too_many_sessions"
        assert (await client.post("/v1/sessions", headers=bearer(KEYS[1]))).status_code == 201


async def test_steps_per_session_limit(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint, max_steps_per_session=3)) as client:
        session = (await client.post("/v1/sessions")).json()["session_id"]
        batch = {"steps": [step_body(random_pixels(i), "a") for i in range(3)]}
        assert (await client.post(f"/v1/sessions/{session}/steps", json=batch)).status_code == 200
        refused = await client.post(f"/v1/sessions/{session}/steps", json=step_body(random_pixels(4), "a"))
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "session_step_limit"
        assert (await client.post(f"/v1/sessions/{session}/reset")).status_code == 200
        assert (
            await client.post(f"/v1/sessions/{session}/steps", json=step_body(random_pixels(4), "a"))
        ).status_code == 200


async def test_keys_are_never_logged(tiny_checkpoint, caplog):
    caplog.set_level("DEBUG")
    async with app_client(api_settings(tiny_checkpoint, api_keys=KEYS, access_log=True)) as client:
        await client.post("/v1/sessions", headers=bearer(KEYS[0]))
        await client.post("/v1/sessions", headers=bearer("wrong-" + KEYS[1]))
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "/v1/sessions" in logged, "the access log ran"
    assert KEYS[0] not in logged and KEYS[1] not in logged
    assert len(key_id(KEYS[0])) == 16 and KEYS[0] not in key_id(KEYS[0])


def test_a_bad_checkpoint_stops_startup_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"num_ways": 5}')
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"{tmp_path}/model.safetensors" in result.stderr and "safetensors" in result.stderr


async def test_without_keys_the_per_key_limit_does_not_apply(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint, max_sessions_per_key=2, max_sessions=5)) as client:
        statuses = [(await client.post("/v1/sessions")).status_code for _ in range(5)]
        assert statuses == [201] * 5
        assert (await client.post("/v1/sessions")).status_code == 503  # the store's own limit still holds
