"""Bad requests: each gets its 4xx in the one error shape, applies nothing, and the server stays healthy."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.api.support import (
    MAX_BODY_BYTES,
    MAX_STEPS_PER_REQUEST,
    VALID_STEP,
    assert_error,
    assert_healthy,
    blank_png_base64,
    new_session,
    png_base64,
    random_pixels,
    session_info,
    step_body,
)

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


def raw(text: str | bytes) -> dict[str, Any]:
    return {"content": text.encode() if isinstance(text, str) else text, "headers": JSON}


def compact(body: Any) -> dict[str, Any]:
    return raw(json.dumps(body, separators=(",", ":")))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(**fields: Any) -> dict[str, Any]:
    return {"json": {"image": fields}}


def gif_base64() -> str:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, "GIF")
    return base64.b64encode(buffer.getvalue()).decode()


def truncated_png_base64() -> str:
    data = base64.b64decode(png_base64(random_pixels(0)))
    return base64.b64encode(data[:50]).decode()


def body_over_limit() -> dict[str, Any]:
    return compact(step_body([[0] * 700] * (MAX_BODY_BYTES // 1400 + 1)))


async def chunks_over_limit() -> AsyncIterator[bytes]:
    yield b'{"image": {"pixels": [[0]]}, "label": "'
    for _ in range(MAX_BODY_BYTES // 65536 + 1):
        yield b"a" * 65536
    yield b'"}'


STEP = step_body([[0, 255], [255, 0]])

# (id, request keyword arguments, status, error code)
BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    # images that do not decode or are too small or too large
    ("png-broken-base64", lambda: image(png="not base64!"), 422, "invalid_image"),
    ("png-not-an-image", lambda: image(png=base64.b64encode(b"hello").decode()), 422, "invalid_image"),
    ("png-empty", lambda: image(png=""), 422, "invalid_image"),
    ("png-gif", lambda: image(png=gif_base64()), 422, "invalid_image"),
    ("png-truncated", lambda: image(png=truncated_png_base64()), 422, "invalid_image"),
    ("png-600x600", lambda: image(png=blank_png_base64(600, 600)), 422, "invalid_image"),
    ("png-513x10", lambda: image(png=blank_png_base64(513, 10)), 422, "invalid_image"),
    ("pixels-0x0", lambda: image(pixels=[]), 422, "invalid_image"),
    ("pixels-1x0", lambda: image(pixels=[[]]), 422, "invalid_image"),
    ("pixels-513x513", lambda: compact(step_body([[0] * 513] * 513)), 422, "invalid_image"),
    ("pixels-513x1", lambda: image(pixels=[[0]] * 513), 422, "invalid_image"),
    # pixel values
    ("pixels-nan", lambda: raw('{"image": {"pixels": [[0, NaN], [0, 0]]}}'), 422, "invalid_image"),
    ("pixels-infinity", lambda: raw('{"image": {"pixels": [[0, Infinity]]}}'), 422, "invalid_image"),
    ("pixels-minus-infinity", lambda: raw('{"image": {"pixels": [[-Infinity]]}}'), 422, "invalid_image"),
    ("pixels-negative", lambda: image(pixels=[[0, -1], [0, 0]]), 422, "invalid_image"),
    ("pixels-over-255", lambda: image(pixels=[[0, 255.5], [0, 0]]), 422, "invalid_image"),
    ("pixels-ragged", lambda: image(pixels=[[0, 0, 0], [0, 0]]), 422, "invalid_image"),
    # wrong types
    ("pixels-strings", lambda: image(pixels=[["0", "255"], ["255", "0"]]), 422, "invalid_request"),
    ("pixels-bools", lambda: image(pixels=[[True, False]]), 422, "invalid_request"),
    ("pixels-null-value", lambda: image(pixels=[[0, None]]), 422, "invalid_request"),
    ("pixels-1d", lambda: image(pixels=[0, 255]), 422, "invalid_request"),
    ("pixels-3d", lambda: image(pixels=[[[0]]]), 422, "invalid_request"),
    ("pixels-string", lambda: image(pixels="0,255"), 422, "invalid_request"),
    ("png-number", lambda: image(png=5), 422, "invalid_request"),
    ("image-string", lambda: {"json": {"image": "iVBORw0KGgo="}}, 422, "invalid_request"),
    ("image-null", lambda: {"json": {"image": None}}, 422, "invalid_request"),
    ("image-missing", lambda: {"json": {"label": "a"}}, 422, "invalid_request"),
    ("label-float", lambda: {"json": {**STEP, "label": 1.5}}, 422, "invalid_request"),
    ("label-bool", lambda: {"json": {**STEP, "label": True}}, 422, "invalid_request"),
    ("label-list", lambda: {"json": {**STEP, "label": ["a"]}}, 422, "invalid_request"),
    ("label-object", lambda: {"json": {**STEP, "label": {"a": 1}}}, 422, "invalid_request"),
    ("label-257-chars", lambda: {"json": {**STEP, "label": "x" * 257}}, 422, "invalid_request"),
    ("step-negative", lambda: {"json": {**STEP, "step": -1}}, 422, "invalid_request"),
    ("step-string", lambda: {"json": {**STEP, "step": "first"}}, 422, "invalid_request"),
    # shape of the request
    ("png-and-pixels", lambda: image(png=blank_png_base64(4, 4), pixels=[[0]]), 422, "invalid_request"),
    ("neither-png-nor-pixels", lambda: image(), 422, "invalid_request"),
    # gray8: raw 8-bit gray levels with their shape
    ("gray8-bad-base64", lambda: image(gray8="%%%", shape=[2, 2]), 422, "invalid_image"),
    ("gray8-too-few-bytes", lambda: image(gray8=b64(bytes(3)), shape=[2, 2]), 422, "invalid_image"),
    ("gray8-too-many-bytes", lambda: image(gray8=b64(bytes(5)), shape=[2, 2]), 422, "invalid_image"),
    ("gray8-oversized", lambda: image(gray8=b64(bytes(513)), shape=[1, 513]), 422, "invalid_image"),
    ("gray8-zero-side", lambda: image(gray8="", shape=[0, 4]), 422, "invalid_image"),
    ("gray8-negative-side", lambda: image(gray8=b64(bytes(4)), shape=[-2, -2]), 422, "invalid_image"),
    ("gray8-without-shape", lambda: image(gray8=b64(bytes(4))), 422, "invalid_request"),
    ("gray8-shape-of-three", lambda: image(gray8=b64(bytes(8)), shape=[2, 2, 2]), 422, "invalid_request"),
    ("gray8-fraction-shape", lambda: image(gray8=b64(bytes(4)), shape=[2.5, 2.0]), 422, "invalid_request"),
    ("shape-without-gray8", lambda: image(pixels=[[0]], shape=[1, 1]), 422, "invalid_request"),
    ("gray8-and-pixels", lambda: image(gray8=b64(bytes(1)), shape=[1, 1], pixels=[[0]]), 422, "invalid_request"),
    ("unknown-field", lambda: {"json": {**STEP, "colour": "red"}}, 422, "invalid_request"),
    ("unknown-image-field", lambda: image(pixels=[[0]], jpeg="x"), 422, "invalid_request"),
    ("batch-unknown-field", lambda: {"json": {"steps": [STEP], "colour": "red"}}, 422, "invalid_request"),
    ("batch-and-single", lambda: {"json": {"steps": [STEP], **STEP}}, 422, "invalid_request"),
    ("batch-empty", lambda: {"json": {"steps": []}}, 422, "invalid_request"),
    ("batch-not-a-list", lambda: {"json": {"steps": STEP}}, 422, "invalid_request"),
    ("batch-bad-second-image", lambda: {"json": {"steps": [STEP, step_body([[-5]])]}}, 422, "invalid_image"),
    ("batch-bad-second-label", lambda: {"json": {"steps": [STEP, {**STEP, "label": False}]}}, 422, "invalid_request"),
    (
        "batch-too-many-steps",
        lambda: {"json": {"steps": [STEP] * (MAX_STEPS_PER_REQUEST + 1)}},
        422,
        "too_many_steps",
    ),
    (
        "batch-steps-not-consecutive",
        lambda: {"json": {"steps": [{**STEP, "step": 1}, {**STEP, "step": 3}]}},
        422,
        "invalid_request",
    ),
    # bodies that are not a step
    ("invalid-json", lambda: raw('{"image": {"pixels": [[0]]'), 422, "invalid_request"),
    ("not-json", lambda: raw(b"\xff\xfe\x00garbage"), 422, "invalid_request"),
    ("empty-body", lambda: raw(b""), 422, "invalid_request"),
    ("json-null", lambda: raw("null"), 422, "invalid_request"),
    ("json-list", lambda: raw("[1, 2]"), 422, "invalid_request"),
    ("json-string", lambda: raw('"step"'), 422, "invalid_request"),
    ("body-too-large", body_over_limit, 413, "payload_too_large"),
    ("body-too-large-chunked", lambda: {"content": chunks_over_limit(), "headers": JSON}, 413, "payload_too_large"),
]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [pytest.param(kwargs, status, code, id=name) for name, kwargs, status, code in BAD_REQUESTS],
)
async def test_bad_step_request(client: httpx.AsyncClient, request_kwargs: Any, status: int, code: str) -> None:
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    assert (await client.post(url, json=step_body(random_pixels(1), "a"))).status_code == 200
    error = assert_error(await client.post(url, **request_kwargs()), status, code)
    assert len(error["message"]) < 2000
    info = await session_info(client, session_id)  # nothing applied
    assert info["steps"] == 1 and info["labels"] == ["a", None, None, None, None]
    await assert_healthy(client, session_id)


async def test_bad_image_messages_say_what_is_wrong(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    cases = [
        (image(pixels=[[0] * 513]), "512"),
        (image(png=blank_png_base64(600, 600)), "600"),
        (raw('{"image": {"pixels": [[NaN]]}}'), "NaN"),
        (image(pixels=[[300]]), "[0, 255]"),
        (image(pixels=[[0, 0], [0, -1]]), "image.pixels[1][1]"),
        ({"json": {"steps": [STEP, step_body([[0, 256]])]}}, "steps.1.image.pixels[0][1]"),
        (image(pixels=[[0, 0], [0]]), "rectangular"),
        (image(png="%%%"), "base64"),
        (image(), "exactly one of png, pixels or gray8"),
        (image(gray8=b64(bytes(3)), shape=[2, 2]), "needs 4"),
        ({"json": {**STEP, "colour": "red"}}, "colour"),
        ({"json": {**STEP, "label": "x" * 300}}, "label: a label has at most 256 characters; this one has 300"),
        ({"json": {"steps": [STEP] * (MAX_STEPS_PER_REQUEST + 1)}}, str(MAX_STEPS_PER_REQUEST)),
    ]
    for kwargs, words in cases:
        response = await client.post(url, **kwargs)
        assert words in response.json()["error"]["message"], response.text
    await assert_healthy(client, session_id)


async def test_the_batch_form_is_a_body_with_a_steps_key(client: httpx.AsyncClient) -> None:
    """ "steps" elsewhere in the bytes (a label) is still one step; errors are those of the body's own form."""
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    one = await client.post(url, json={**STEP, "label": "steps"})
    assert one.status_code == 200 and one.json()["labels"][0] == "steps"
    both = await client.post(url, json={"steps": [STEP], "image": STEP["image"]})
    assert both.status_code == 422 and both.json()["error"]["message"].startswith("image: Extra inputs")
    bad_single = await client.post(url, json={"image": STEP["image"], "label": 1.5})
    assert bad_single.status_code == 422 and "label" in bad_single.json()["error"]["message"]
    assert "steps" not in bad_single.json()["error"]["message"]
    listed = await client.post(url, json=[STEP])
    assert listed.status_code == 422 and listed.json()["error"]["code"] == "invalid_request"
    assert (await session_info(client, session_id))["steps"] == 1
    await assert_healthy(client, session_id)


async def test_bad_inputs_in_a_row_leave_the_session_usable(client: httpx.AsyncClient) -> None:
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    for _, kwargs, status, _ in BAD_REQUESTS:
        assert (await client.post(url, **kwargs())).status_code == status
    assert (await session_info(client, session_id))["steps"] == 0
    await assert_healthy(client, session_id)


async def test_images_that_work(client: httpx.AsyncClient) -> None:
    """The accepted forms: PNG in several modes, JPEG, float pixels, 1x1 and 512x512."""
    session_id = await new_session(client)
    url = f"/v1/sessions/{session_id}/steps"
    gray = np.random.default_rng(0).integers(0, 256, size=(30, 20))
    bodies = [
        {"image": {"png": png_base64(gray)}},
        {"image": {"png": png_base64(gray, mode="RGB")}},
        {"image": {"png": png_base64(gray, mode="RGBA")}},
        {"image": {"png": png_base64(gray, mode="1")}},
        {"image": {"png": png_base64(gray, image_format="JPEG")}},
        {"image": {"pixels": [[0.5, 254.5], [128.25, 0.0]]}},
        {"image": {"pixels": [[0]]}},
        {"image": {"png": blank_png_base64(512, 512)}},
        VALID_STEP,
    ]
    for step, body in enumerate(bodies):
        response = await client.post(url, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["step"] == step
