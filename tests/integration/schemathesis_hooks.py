"""Schemathesis hooks of the conformance run (``SCHEMATHESIS_HOOKS=tests.integration.schemathesis_hooks``).

A body can be valid by the OpenAPI schema and still be refused for what it holds, which JSON
Schema cannot say: a PNG that does not decode, ``gray8`` bytes that do not fill ``shape``, pixel
rows of unequal length, a snapshot not signed by this server, more distinct labels than a
session has slots, step indices that do not follow each other. The API answers those with 422
and a code naming the rule (docs/api.md). Two hooks deal with them:

- ``map_case`` gives the schema-valid (positive) bodies content the server can take: real PNGs,
  ``gray8`` bytes that fill their shape, rows cut to one length, labels from a set of five, a
  snapshot this server signed, a model it serves. Generated bodies then reach the model instead
  of ending, nearly all, in a 422 for their content. Only what the schema leaves open changes:
  every repaired body is still valid by it, and negative bodies are left as generated.
- ``refused_only_for_content``, a check: a 422 to a positive body must name one of those content
  rules (``schemathesis.toml`` lets ``positive_data_acceptance`` take a 422 from the operations
  with such bodies), never the body's structure, which would mean that the schema and the
  validator disagree, as they did on ``{"gray8": null, "shape": [1, 1]}``.

The test passes the served model's name and a snapshot it made in ``CONFORMANCE_MODEL`` and
``CONFORMANCE_SNAPSHOT``.
"""

from __future__ import annotations

import base64
import io
import os
import zlib
from typing import Any

import numpy as np
import schemathesis
from PIL import Image

# The error codes of refusals for content (service.images, service.sessions.snapshot, service.engine).
CONTENT_CODES = frozenset({"invalid_image", "invalid_snapshot", "too_many_labels"})
# The one content rule whose refusal carries the generic code (service.engine._check_expected_step).
STEP_ORDER_MESSAGE = "step indices within one request must be consecutive"
LABELS = ["a", "b", "c", 3, 4]  # at most the five slots of the served model, across every session's steps


def _png(seed: int) -> str:
    buffer = io.BytesIO()
    gray = np.random.default_rng(seed).integers(0, 256, size=(28, 28), dtype=np.uint8)
    Image.fromarray(gray, "L").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PNGS = [_png(seed) for seed in range(4)]


def _pick(options: list[Any], value: Any) -> Any:
    """One of ``options``, the same for the same generated value (so that shrinking stays stable)."""
    return options[zlib.crc32(repr(value).encode()) % len(options)]


def _repair_image(image: Any) -> None:
    if not isinstance(image, dict):
        return
    pixels, gray8, shape = image.get("pixels"), image.get("gray8"), image.get("shape")
    if isinstance(pixels, list) and pixels and all(isinstance(row, list) and row for row in pixels):
        width = min(len(row) for row in pixels)
        image["pixels"] = [row[:width] for row in pixels]
    if isinstance(gray8, str) and isinstance(shape, list) and len(shape) == 2:
        height, width = (int(side) for side in shape)
        image["gray8"] = base64.b64encode(bytes(i % 256 for i in range(height * width))).decode()
    if isinstance(image.get("png"), str):
        image["png"] = _pick(PNGS, image["png"])


def _repair_step(step: Any) -> None:
    if isinstance(step, dict):
        _repair_image(step.get("image"))
        if step.get("label") is not None:
            step["label"] = _pick(LABELS, step["label"])


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Content the server can take, in schema-valid bodies of the create, step, predict and preprocess routes."""
    meta, body = case.meta, case.body
    if meta is None or not meta.generation.mode.is_positive or not isinstance(body, dict):
        return case
    path = case.operation.path
    if path.endswith("/steps"):
        for step in body["steps"] if isinstance(body.get("steps"), list) else [body]:
            _repair_step(step)
    elif path.endswith("/predict") and isinstance(body.get("images"), list):
        for image in body["images"]:
            _repair_image(image)
    elif path == "/v1/preprocess":
        _repair_image(body.get("image"))
        if isinstance(body.get("model"), str):
            body["model"] = os.environ["CONFORMANCE_MODEL"]
    elif path == "/v1/sessions":
        if isinstance(body.get("snapshot"), str):
            body["snapshot"] = os.environ["CONFORMANCE_SNAPSHOT"]
        if isinstance(body.get("model"), str):
            body["model"] = os.environ["CONFORMANCE_MODEL"]
    return case


@schemathesis.check
def refused_only_for_content(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 422 to a body that the schema admits names a content rule, not the body's structure."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    error = response.json().get("error", {})
    if error.get("code") in CONTENT_CODES or error.get("message") == STEP_ORDER_MESSAGE:
        return None
    raise AssertionError(
        f"a body valid by the schema was refused for its structure: {error.get('code')}: {error.get('message')}"
    )
