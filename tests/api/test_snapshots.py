"""Snapshots: a taught session saved as signed bytes and restored into a new session; anything else refused."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.sessions.snapshot import MAGIC, SnapshotContent, SnapshotError, decode_snapshot, encode_snapshot
from tests.api.support import (
    TOLERANCE,
    api_settings,
    app_client,
    assert_error,
    new_session,
    random_pixels,
    session_info,
    step_body,
)
from tests.conftest import write_tiny_checkpoint

pytestmark = pytest.mark.anyio
KEY = "a test snapshot key of 32 bytes!"
TAUGHT = [(random_pixels(1), "a"), (random_pixels(2), "b"), (random_pixels(3), 7), (random_pixels(4), None)]


async def taught_snapshot(client) -> tuple[str, bytes]:
    session = await new_session(client)
    for pixels, label in TAUGHT:
        assert (await client.post(f"/v1/sessions/{session}/steps", json=step_body(pixels, label))).status_code == 200
    response = await client.get(f"/v1/sessions/{session}/snapshot")
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    return session, response.content


def restore_body(data: bytes) -> dict:
    return {"snapshot": base64.b64encode(data).decode()}


async def test_a_restored_session_goes_on_exactly_where_the_snapshot_was_taken(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint, snapshot_key=KEY, api_keys=["k1", "k2"])) as client:
        client.headers["Authorization"] = "Bearer k1"
        session, data = await taught_snapshot(client)
        client.headers["Authorization"] = "Bearer k2"  # restored by another key: the caller owns the copy
        response = await client.post("/v1/sessions", json=restore_body(data))
        assert response.status_code == 201, response.text
        copy = response.json()["session_id"]
        assert copy != session and response.json()["model"] == "tiny"
        info = await session_info(client, copy)
        assert info["steps"] == len(TAUGHT) and info["labels"][:3] == ["a", "b", 7]
        query = step_body(random_pixels(9), "b")
        from_copy = (await client.post(f"/v1/sessions/{copy}/steps", json=query)).json()
        client.headers["Authorization"] = "Bearer k1"
        from_original = (await client.post(f"/v1/sessions/{session}/steps", json=query)).json()
        assert from_copy["step"] == from_original["step"] == len(TAUGHT)
        assert np.allclose(from_copy["probabilities"], from_original["probabilities"], atol=TOLERANCE)
        assert_error(await client.get(f"/v1/sessions/{copy}"), 404)  # k1 does not own the copy


async def test_a_snapshot_of_other_weights_is_refused_with_409(tiny_checkpoint, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "tiny", seed=999)  # the same model name, other weights
    async with app_client(api_settings(tiny_checkpoint, snapshot_key=KEY)) as client:
        _, data = await taught_snapshot(client)
    async with app_client(api_settings(other, snapshot_key=KEY)) as client:
        assert_error(await client.post("/v1/sessions", json=restore_body(data)), 409, "state_incompatible")


async def test_without_a_configured_key_snapshots_restore_only_where_they_were_made(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint)) as client:
        _, data = await taught_snapshot(client)
        assert (await client.post("/v1/sessions", json=restore_body(data))).status_code == 201
    async with app_client(api_settings(tiny_checkpoint)) as client:
        error = assert_error(await client.post("/v1/sessions", json=restore_body(data)), 422, "invalid_snapshot")
        assert "signature" in error["message"]


async def test_damaged_or_foreign_snapshots_get_a_422_naming_why(tiny_checkpoint):
    async with app_client(api_settings(tiny_checkpoint, snapshot_key=KEY, max_snapshot_bytes=64 * 1024)) as client:
        _, data = await taught_snapshot(client)
        middle = len(data) // 2
        cases = {
            "signature": data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :],
            "truncated": data[:-10],
            "past its end": data + b"\x00",
            "not a session snapshot": b"PNG\x00" + data[4:],
            "format version 2": data[:4] + struct.pack("<H", 2) + data[6:],
            "at most": data + bytes(64 * 1024),
            "not base64": None,
        }
        for reason, damaged in cases.items():
            body = {"snapshot": "!!not base64!!"} if damaged is None else restore_body(damaged)
            error = assert_error(await client.post("/v1/sessions", json=body), 422, "invalid_snapshot")
            assert reason in error["message"], (reason, error)
        assert_error(await client.get("/v1/sessions/nope/snapshot"), 404, "session_not_found")
        assert (await client.post("/v1/sessions", json=restore_body(data))).status_code == 201


def a_snapshot() -> bytes:
    from models.state import PackedState

    state = PackedState(torch.arange(4 * 4 + 4 + 2 * 4 + 2 * 3, dtype=torch.float32), _layout())
    content = SnapshotContent("tiny", "f" * 16, ["a", 7], 1, 5, 4, 2, state)
    return encode_snapshot(content, KEY.encode())


def _layout():
    from models.state import StateLayout

    return StateLayout(slots=4, width=4, read_width=4, heads=2, hidden=3)


def test_a_snapshot_round_trips_under_its_key():
    content = decode_snapshot(a_snapshot(), KEY.encode(), 1 << 20)
    assert (content.model, content.labels, content.pending_slot, content.steps) == ("tiny", ["a", 7], 1, 5)
    assert a_snapshot()[:4] == MAGIC


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_changed_byte_is_refused_before_anything_is_parsed(data):
    """Random flips anywhere (header, state, signature) never decode: the model cannot be handed a forged state."""
    original = bytearray(a_snapshot())
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), min_size=1, max_size=4)
    )
    for index, mask in flips:
        original[index] ^= mask
    if bytes(original) == a_snapshot():
        return  # the flips cancelled out
    with pytest.raises(SnapshotError):
        decode_snapshot(bytes(original), KEY.encode(), 1 << 20)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 10_000), mask=st.integers(1, 255))
async def test_flipped_snapshots_over_http_are_4xx_never_5xx(tiny_checkpoint, index, mask):
    async with app_client(api_settings(tiny_checkpoint, snapshot_key=KEY)) as client:
        _, data = await taught_snapshot(client)
        damaged = bytearray(data)
        damaged[index % len(damaged)] ^= mask
        response = await client.post("/v1/sessions", json=restore_body(bytes(damaged)))
        assert 400 <= response.status_code < 500, response.text
