"""/v1: sessions and steps over JSON REST."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter, ValidationError

from models.data.preprocess import fit_size, preprocess
from service.api.schemas import (
    EXAMPLE_PIXELS,
    CreateSessionIn,
    ErrorOut,
    ImageIn,
    ModelsOut,
    PredictIn,
    PredictOut,
    PreprocessIn,
    PreprocessOut,
    SessionInfoOut,
    SessionOut,
    StepIn,
    StepOut,
    StepsIn,
    StepsOut,
)
from service.engine import SessionEngine, StepInput, iso_time
from service.errors import APIError
from service.images import (
    decode_gray8,
    decode_png_async,
    image_error_message,
    invalid_image,
    pixels_array,
)
from service.ratelimit import client_address

SESSION_ID_MAX_LENGTH = 64
SessionId = Annotated[
    str, Path(min_length=1, max_length=SESSION_ID_MAX_LENGTH, description="the ID from POST /v1/sessions")
]
ERRORS = {code: {"model": ErrorOut} for code in (404, 409, 413, 422, 429, 503)}

router = APIRouter(prefix="/v1", tags=["v1"], responses=ERRORS)


def get_engine(request: Request) -> SessionEngine:
    return request.app.state.engine


def get_owner(request: Request) -> str:
    return getattr(request.state, "owner", "")


Engine = Annotated[SessionEngine, Depends(get_engine)]
Owner = Annotated[str, Depends(get_owner)]


def inline_gray(image: ImageIn, max_side: int) -> np.ndarray:
    """A gray8 or pixels image as 0-255 gray levels (PNG/JPEG: ``decode_png_async``, which may leave the loop)."""
    if image.gray8 is not None:
        return decode_gray8(image.gray8, image.shape or [], max_side)
    return pixels_array(image.pixels or [], max_side)


def schema_ref(name: str) -> dict:
    """A reference to one of the components ``app._openapi_with_step_schemas`` adds."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_body_doc(schema: dict, required: bool = True, **media: object) -> dict:
    """OpenAPI's ``requestBody`` of a route that validates its JSON body itself from the raw bytes."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema, **media}}}}


@router.get("/models", response_model=ModelsOut, summary="The models this replica serves")
async def list_models(engine: Engine) -> JSONResponse:
    return JSONResponse({"models": [m.describe() for m in engine.registry.models.values()]})


CREATE_FORM = TypeAdapter(CreateSessionIn | None)


@router.post(
    "/sessions",
    status_code=201,
    response_model=SessionOut,
    summary="Open a session (a fresh episode)",
    openapi_extra=json_body_doc({"anyOf": [schema_ref("CreateSessionIn"), {"type": "null"}]}, required=False),
)
async def create_session(request: Request, engine: Engine, owner: Owner) -> JSONResponse:
    """The body is validated here, from the raw bytes, as the step and predict routes do: a body that is
    not JSON (not even UTF-8) is then a 422 like any other invalid body, where FastAPI's own body
    parsing would answer it with an undocumented 400."""
    raw_body = await request.body()
    try:
        body = CREATE_FORM.validate_json(raw_body) if raw_body.strip() else None
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None
    body = body or CreateSessionIn()
    snapshot = None if body.snapshot is None else decode_snapshot_field(body.snapshot)
    record = await engine.create(
        body.model, body.ttl_seconds, owner, snapshot=snapshot, client=client_address(request.scope)
    )
    served = engine.served(record.model)
    return JSONResponse(
        {
            "session_id": record.session_id,
            "model": record.model,
            "num_ways": served.num_ways,
            "expires_at": iso_time(record.expires_at),
        },
        status_code=201,
    )


def decode_snapshot_field(text: str) -> bytes:
    """The snapshot's bytes from base64 in either alphabet, padding optional; 422 when it is not base64."""
    normalized = text.translate(str.maketrans("-_", "+/"))
    try:
        return base64.b64decode(normalized + "=" * (-len(normalized) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_snapshot", "snapshot: not base64") from None


@router.get("/sessions/{session_id}", response_model=SessionInfoOut, summary="A session's progress")
async def get_session(session_id: SessionId, engine: Engine, owner: Owner) -> JSONResponse:
    return JSONResponse(engine.describe(await engine.load(session_id, owner)))


STEP_FORMS = {False: TypeAdapter(StepIn), True: TypeAdapter(StepsIn)}  # keyed by: is it the batch form?
STEP_BODY_DOC = json_body_doc(
    {"oneOf": [schema_ref("StepIn"), schema_ref("StepsIn")]},
    examples={
        "one step": {"value": {"image": {"pixels": EXAMPLE_PIXELS}, "label": "a"}},
        "a query": {"value": {"image": {"pixels": EXAMPLE_PIXELS}}},
        "several steps": {"value": {"steps": [{"image": {"pixels": EXAMPLE_PIXELS}, "label": "a"}]}},
    },
)


@router.post(
    "/sessions/{session_id}/steps",
    response_model=StepOut | StepsOut,
    summary="Send a step (or several): predict, then learn from the label",
    description="Body: one step {image, label?, step?} -> one result; or {steps: [...]} -> {results: [...]}, applied in order.",
    openapi_extra=STEP_BODY_DOC,
)
async def post_steps(session_id: SessionId, request: Request) -> JSONResponse:
    """Documents the step route; requests are answered by ``service.api.fastpath`` (see ``run_steps``)."""
    engine, owner, client = request.app.state.engine, get_owner(request), client_address(request.scope)
    result = await run_steps(engine, owner, session_id, await request.body(), client)
    return JSONResponse(result)


def parse_step_request(raw_body: bytes) -> StepIn | StepsIn:
    """The step body, parsed and validated straight from the JSON; a bad pixel level is an image error (422 invalid_image).

    A body is the batch form when it is an object with a "steps" key. Each form has its own
    adapter, so that pydantic-core validates the JSON directly: a discriminator function would
    need the body as Python objects first, and a pixel array's 784 numbers made twice. The form
    a "steps" in the bytes suggests goes first; only a body that fails it is tried as the other,
    and when both fail, the errors are those of the form the body has.
    """
    guess = b'"steps"' in raw_body
    try:
        return STEP_FORMS[guess].validate_json(raw_body)
    except ValidationError as exc:
        failed = {guess: exc}
    try:
        return STEP_FORMS[not guess].validate_json(raw_body)
    except ValidationError as exc:
        failed[not guess] = exc
    batch_errors = failed[True].errors(include_url=False, include_input=False)
    is_batch = not any(e["loc"] == () or (e["loc"] == ("steps",) and e["type"] == "missing") for e in batch_errors)
    raise_body_error(failed[is_batch])


async def run_steps(engine: SessionEngine, owner: str, session_id: str, raw_body: bytes, client: str = "") -> dict:
    """The step route's work, from the raw JSON body to the response body (``client``: the caller's address).

    The body is parsed and validated in one pass (pydantic-core); the images are decoded and
    preprocessed before the session is touched, so bad input never reaches the model. The
    session is read once, by the engine, unless the served models differ in input size (then
    the session's model must be known first).
    """
    body = parse_step_request(raw_body)
    batch = isinstance(body, StepsIn)
    items = body.steps if isinstance(body, StepsIn) else [body]
    if len(items) > engine.settings.max_steps_per_request:
        raise APIError(
            422, "too_many_steps", f"{len(items)} steps in one request; at most {engine.settings.max_steps_per_request}"
        )
    image_size = await session_image_size(engine, session_id, owner)
    digest = hashlib.sha256()
    max_side = engine.settings.max_image_side
    inputs = []
    for item in items:
        image = item.image
        png = image.png is not None
        gray = await decode_png_async(image.png, max_side) if png else inline_gray(image, max_side)
        digest.update(f"{item.label!r}|{png}|{gray.shape}|".encode())
        update_digest(digest, gray.tobytes())
        inputs.append(StepInput(fit_size(gray, image_size), item.label, item.step))
    results = await engine.step(session_id, inputs, digest.hexdigest(), owner, client)
    return {"results": results} if batch else results[0]


async def session_image_size(engine: SessionEngine, session_id: str, owner: str) -> int:
    """The input side of the session's model: known without reading the session when every served model agrees."""
    image_size = engine.registry.image_size
    if image_size is None:
        image_size = engine.served_for(await engine.load(session_id, owner)).model.config.image_size
    return image_size


def raise_body_error(exc: ValidationError) -> None:
    """A validation error as the API's answer: an image error (422 invalid_image) by name, else 422 invalid_request."""
    errors = exc.errors(include_url=False, include_input=False)
    for error in errors:
        message = image_error_message(error)
        if message is not None:
            raise invalid_image(message) from None
    raise RequestValidationError(errors) from None


PREDICT_FORM = TypeAdapter(PredictIn)


@router.post(
    "/sessions/{session_id}/predict",
    response_model=PredictOut,
    summary="Classify images against the session as it is (read-only)",
    description="Each image is answered as the session's next step without a label would be; the session does not "
    "change (no step, no commit, its expiry is not moved), so predictions run in parallel with each other and with steps.",
    openapi_extra=json_body_doc(schema_ref("PredictIn")),
)
async def predict(session_id: SessionId, request: Request) -> JSONResponse:
    """Documents the predict route; requests are answered by ``service.api.fastpath`` (see ``run_predict``)."""
    engine, owner, client = request.app.state.engine, get_owner(request), client_address(request.scope)
    return JSONResponse(await run_predict(engine, owner, session_id, await request.body(), client))


async def run_predict(engine: SessionEngine, owner: str, session_id: str, raw_body: bytes, client: str = "") -> dict:
    """The predict route's work, from the raw JSON body to the response body, as ``run_steps`` is for steps."""
    try:
        body = PREDICT_FORM.validate_json(raw_body)
    except ValidationError as exc:
        raise_body_error(exc)
    limit = engine.settings.max_predict_images
    if len(body.images) > limit:
        raise APIError(422, "too_many_images", f"{len(body.images)} images in one request; at most {limit}")
    image_size = await session_image_size(engine, session_id, owner)
    max_side = engine.settings.max_image_side
    grays = [
        fit_size(
            await decode_png_async(image.png, max_side) if image.png is not None else inline_gray(image, max_side),
            image_size,
        )
        for image in body.images
    ]
    return await engine.predict(session_id, grays, owner, client)


PREPROCESS_FORM = TypeAdapter(PreprocessIn)


@router.post(
    "/preprocess",
    response_model=PreprocessOut,
    summary="An image as a model's input: the preprocessing of every step, and nothing else",
    description="Decodes and checks the image as a step does, then runs the preprocessing training and serving share "
    "(models.data.preprocess): the answer is the model's input exactly, to show a drawing as the model saw it. No "
    "session is read or changed.",
    openapi_extra=json_body_doc(schema_ref("PreprocessIn")),
)
async def preprocess_image(request: Request, engine: Engine) -> JSONResponse:
    """``models.data.preprocess`` itself, so that a client showing the model's input never needs a copy of it.

    The body is validated from the raw JSON as a step's is, so that a bad image is the same named
    422 ``invalid_image``. Unlike a step's, the last stage (``ink``) runs here on the event loop:
    this route shows images to people and is off the hot path.
    """
    try:
        body = PREPROCESS_FORM.validate_json(await request.body())
    except ValidationError as exc:
        raise_body_error(exc)
    served = engine.served(body.model)
    size = served.model.config.image_size
    max_side = engine.settings.max_image_side
    image = body.image
    gray = await decode_png_async(image.png, max_side) if image.png is not None else inline_gray(image, max_side)
    return JSONResponse({"model": served.name, "size": size, "ink": preprocess(gray, size).tolist()})


@router.get(
    "/sessions/{session_id}/snapshot",
    summary="The session as a signed snapshot, to restore later with POST /v1/sessions {snapshot}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the snapshot's bytes"}},
)
async def get_snapshot(session_id: SessionId, engine: Engine, owner: Owner) -> Response:
    data = await engine.snapshot(session_id, owner)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{session_id}.ntmsnap"'},
    )


GIL_FREE_HASH_BYTES = 2047  # hashlib releases the GIL for 2 KiB or more (see service.images on why that costs here)


def update_digest(digest: hashlib._Hash, data: bytes) -> None:
    """``digest.update(data)``, in pieces small enough that hashlib keeps the GIL: the same digest."""
    view = memoryview(data)
    for start in range(0, len(view), GIL_FREE_HASH_BYTES):
        digest.update(view[start : start + GIL_FREE_HASH_BYTES])


@router.post(
    "/sessions/{session_id}/reset", response_model=SessionInfoOut, summary="Start a fresh episode in the same session"
)
async def reset_session(session_id: SessionId, engine: Engine, owner: Owner) -> JSONResponse:
    return JSONResponse(engine.describe(await engine.reset(session_id, owner)))


@router.delete("/sessions/{session_id}", status_code=204, summary="End a session")
async def delete_session(session_id: SessionId, engine: Engine, owner: Owner) -> Response:
    await engine.delete(session_id, owner)
    return Response(status_code=204)
