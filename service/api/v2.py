"""/v2: the Open Inference Protocol (KServe v2 REST) with Triton's sequence and binary tensor data extensions.

So that ``tritonclient.http``, KServe and Seldon clients run a few-shot episode with no code of ours.
Sections cited below are those of:

- OIP: the Open Inference Protocol, HTTP/REST
  (https://github.com/kserve/open-inference-protocol, specification/protocol/inference_rest.md);
- BIN: Triton's binary tensor data extension (server docs/protocol/extension_binary_data.md);
- SEQ: Triton's sequence extension (server docs/protocol/extension_sequence.md).

One request is one step of an episode. A sequence is a session of the one session store (so any replica
finds it) whose ID derives from the API key (owner), the model name and the sequence ID, and cannot collide
with a /v1 session ID (those never contain ``:``). Steps go through ``SessionEngine.step`` like /v1's:
micro-batched, one at a time per session, committed exactly once, in order. PROBABILITIES come in the
client's label order: the engine answers in slot order, and the i-th distinct label takes slot i.
"""

from __future__ import annotations

import json
import math
import secrets
import struct
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.data.preprocess import fit_size
from service.api.v1 import get_engine, get_owner
from service.engine import COMMIT_ATTEMPTS, SessionEngine, StepInput, unavailable
from service.errors import APIError, is_protocol_path, v2_error_response
from service.images import decode_base64, decode_png_async, gray_array
from service.logs import log
from service.ratelimit import client_address
from service.registry import ServedModel
from service.sessions.store import SessionExists, SessionRecord

VERSION = "1"  # every model is served as version "1"
EXTENSIONS = ["binary_tensor_data", "sequence"]
MAX_SEQUENCE_ID_CHARS = 256
ORDER_ATTEMPTS = COMMIT_ATTEMPTS  # re-reads while concurrent requests of one sequence move it on
HEADER_LENGTH = "Inference-Header-Content-Length"  # BIN "HTTP/REST"
DTYPES = {"UINT8": np.dtype("<u1"), "INT32": np.dtype("<i4"), "FP32": np.dtype("<f4")}  # BIN: little-endian
# The protocol's URL trees: their errors leave in its shape; other /v2 paths (none served) keep /v1's.

IMAGE_DOC = (
    "one grayscale image, 0-255, dark strokes on light paper, at most {side}x{side}: UINT8 or FP32 of shape "
    "[H, W] or [1, H, W], or BYTES of shape [1] holding one PNG or JPEG file (base64 in JSON 'data')"
)
LABEL_DOC = (
    "optional: the image's label, an integer 0..{last} (the i-th distinct label takes slot i, as /v1 labels do); "
    "-1 or no LABEL for a query"
)
PROBABILITIES_DOC = (
    "the prediction for this image, made before its LABEL is seen, in label order: element j is the "
    "probability of label j; the mass of slots not yet labeled is shared evenly among label values not yet seen"
)

# Not in /openapi.json: the protocol is specified elsewhere, its bodies may be binary, and its error shape
# is not /v1's ErrorOut, which every documented error answer there uses.
router = APIRouter(prefix="/v2", tags=["v2"], include_in_schema=False)


class V2Error(Exception):
    """An error in the protocol's shape: OIP "Errors", {"error": "message"}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ----------------------------------------------------------------------------------- request JSON (OIP "Inference")


class RequestInput(BaseModel):
    """OIP "Request Input"; BIN adds parameters.binary_data_size (its bytes follow the JSON header)."""

    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    """OIP "Request Output"; BIN adds parameters.binary_data."""

    name: StrictStr
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """OIP "Inference Request JSON Object"; SEQ's flags and BIN's binary_data_output live in parameters."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class Sequence:
    """SEQ's parameters of one request."""

    id: int | str
    start: bool
    end: bool


def bad(message: str) -> V2Error:
    return V2Error(400, message)


def unknown_model(name: str, version: str | None = None) -> V2Error:
    which = f"'{name}'" if version is None else f"'{name}' version {version}"
    return V2Error(404, f"Request for unknown model: {which} is not found")


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate body (tritonclient's request_compression_algorithm), inflated to at most ``limit`` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise bad(f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad(f"the body is not valid {encoding}: {exc}") from None
    if len(data) > limit:
        raise V2Error(413, f"the decompressed body is over {limit} bytes")
    if not inflater.eof:
        raise bad(f"the {encoding} body is truncated")
    return data


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """BIN: the JSON header is the first ``Inference-Header-Content-Length`` bytes (all of them without it)."""
    split = len(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise bad(f"{HEADER_LENGTH} {header_length!r} is not a length within the body's {len(body)} bytes")
        split = int(header_length)
    try:
        document = json.loads(body[:split])
    except (ValueError, RecursionError) as exc:
        raise bad(f"the inference header is not valid JSON: {exc}") from None
    try:
        return InferenceRequest.model_validate(document), body[split:]
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise bad(f"invalid inference request: {where}") from None


def sequence_of(parameters: dict[str, Any], model: str) -> Sequence:
    """SEQ: sequence_id (uint64 or string; 0 and "" mean none) and the START and END flags."""
    value = parameters.get("sequence_id")
    if isinstance(value, bool) or not isinstance(value, int | str) or value in (0, ""):
        raise bad(f"inference request to model '{model}' must specify a non-zero or non-empty sequence_id")
    if isinstance(value, int) and not 0 < value < 2**64:
        raise bad(f"sequence_id {value} is not an unsigned 64-bit integer")
    if isinstance(value, str) and len(value) > MAX_SEQUENCE_ID_CHARS:
        raise bad(f"sequence_id has {len(value)} characters; at most {MAX_SEQUENCE_ID_CHARS}")
    flags = {key: parameters.get(key, False) for key in ("sequence_start", "sequence_end")}
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise bad(f"{key} must be true or false, not {flag!r}")
    return Sequence(value, flags["sequence_start"], flags["sequence_end"])


def session_id_of(model: str, sequence_id: int | str, owner: str) -> str:
    """Deterministic, so every replica finds the sequence; per API key (owner), so keys never meet;
    5 and "5" stay apart; and no /v1 session ID contains ':'."""
    return "v2:" + json.dumps([owner, model, sequence_id], separators=(",", ":"))


def requested_outputs(request: InferenceRequest) -> dict[str, bool]:
    """Output name -> whether its data goes binary (BIN: per output binary_data, else binary_data_output)."""
    default = request.parameters.get("binary_data_output", False)
    wanted = request.outputs or [RequestOutput(name="PROBABILITIES")]
    chosen: dict[str, bool] = {}
    for output in wanted:
        if output.name != "PROBABILITIES":
            raise bad(f"unexpected inference output '{output.name}': the only output is 'PROBABILITIES'")
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in output.parameters:
                raise bad(f"output parameter '{unsupported}' is not supported")
        binary = output.parameters.get("binary_data", default)
        if not isinstance(binary, bool):
            raise bad(f"binary_data of output '{output.name}' must be true or false")
        chosen[output.name] = binary
    return chosen


# ----------------------------------------------------------------------------------- tensors


def flatten(data: Any) -> list[Any]:
    """OIP "Tensor Data": row-major, nested or flat."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def numeric(item: RequestInput, raw: bytes | None) -> np.ndarray:
    """A UINT8, INT32 or FP32 input as an array of its shape, from binary data or JSON data."""
    dtype = DTYPES[item.datatype]
    count = math.prod(item.shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise bad(
                f"input '{item.name}': binary_data_size is {len(raw)} bytes; shape {item.shape} of {item.datatype} "
                f"takes {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(item.shape)
    values = flatten(item.data)
    if len(values) != count:
        raise bad(f"input '{item.name}': data holds {len(values)} values; shape {item.shape} takes {count}")
    number = (int, float) if dtype.kind == "f" else (int,)
    if any(isinstance(v, bool) or not isinstance(v, number) for v in values):
        kind = "numbers" if dtype.kind == "f" else "integers"
        raise bad(f"input '{item.name}': {item.datatype} data must hold {kind}")
    if dtype.kind != "f":
        info = np.iinfo(dtype)
        if values and not info.min <= min(values) <= max(values) <= info.max:
            raise bad(f"input '{item.name}': {item.datatype} data out of range [{info.min}, {info.max}]")
    return np.asarray(values, dtype=dtype).reshape(item.shape)


def image_file(item: RequestInput, raw: bytes | None) -> bytes:
    """A BYTES input of one element: the file after BIN's 4-byte length prefix, or from a base64 string in JSON."""
    if math.prod(item.shape) != 1 or len(item.shape) not in (1, 2):
        raise bad(f"input 'IMAGE': BYTES shape must be [1] or [1, 1], not {item.shape}")
    if raw is None:
        values = flatten(item.data)
        if len(values) != 1 or not isinstance(values[0], str):
            raise bad("input 'IMAGE': BYTES data in JSON must be one string, the base64 of a PNG or JPEG file")
        return decode_base64(values[0], "BYTES data")
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
        raise bad("input 'IMAGE': binary BYTES must be one element: a 4-byte little-endian length, then the file")
    return raw[4:]


def image_side(item: RequestInput, max_side: int) -> None:
    if item.datatype == "BYTES":
        return
    if item.datatype not in ("UINT8", "FP32"):
        raise bad(f"input 'IMAGE': datatype {item.datatype} is not one of UINT8, FP32 or BYTES")
    shape = item.shape[1:] if len(item.shape) == 3 and item.shape[0] == 1 else item.shape
    if len(shape) != 2:
        raise bad(f"input 'IMAGE': shape must be [H, W] or [1, H, W], not {item.shape}")
    if not all(1 <= side <= max_side for side in shape):
        raise bad(f"input 'IMAGE' is {shape[1]}x{shape[0]}: each side must be 1 to {max_side}")


async def image_input(item: RequestInput, raw: bytes | None, max_side: int, image_size: int) -> np.ndarray:
    """The gray levels at the model's size, through the same checks and preprocessing as /v1 images."""
    try:
        if item.datatype == "BYTES":
            gray = await decode_png_async(image_file(item, raw), max_side)
        else:
            gray = gray_array(numeric(item, raw).reshape(item.shape[-2:]), max_side)
    except APIError as exc:
        raise bad(f"input 'IMAGE': {exc.message}") from None
    return fit_size(gray, image_size)


def label_input(item: RequestInput, raw: bytes | None, num_ways: int) -> int | None:
    if item.datatype != "INT32" or item.shape not in ([1], [1, 1]):
        raise bad(f"input 'LABEL' must be INT32 of shape [1] or [1, 1], not {item.datatype} {item.shape}")
    label = int(numeric(item, raw).item())
    if not -1 <= label < num_ways:
        raise bad(f"input 'LABEL' is {label}: use 0..{num_ways - 1}, or -1 (or no LABEL) for a query")
    return None if label == -1 else label


async def read_inputs(request: InferenceRequest, binary: bytes, served: ServedModel, max_side: int) -> StepInput:
    """OIP "Request Input" with BIN's binary data, checked in full before anything reaches the model."""
    items: dict[str, tuple[RequestInput, bytes | None]] = {}
    offset = 0
    for item in request.inputs:
        if item.name not in ("IMAGE", "LABEL"):
            raise bad(f"unexpected inference input '{item.name}': the inputs are 'IMAGE' and 'LABEL'")
        if item.name in items:
            raise bad(f"input '{item.name}' is given twice")
        if item.name == "IMAGE":
            image_side(item, max_side)
        if "shared_memory_region" in item.parameters:
            raise bad(f"input '{item.name}': shared memory is not supported; send the data in the request")
        size = item.parameters.get("binary_data_size")
        raw = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad(f"input '{item.name}': binary_data_size must be a non-negative integer")
            if item.data is not None:
                raise bad(f"input '{item.name}' has both data and binary_data_size")
            if offset + size > len(binary):
                raise bad(
                    f"input '{item.name}': binary_data_size {size} runs past the body's {len(binary)} binary bytes"
                )
            raw, offset = binary[offset : offset + size], offset + size
        elif item.data is None:
            raise bad(f"input '{item.name}' has neither data nor binary_data_size")
        items[item.name] = (item, raw)
    if offset != len(binary):
        raise bad(f"the body holds {len(binary) - offset} bytes after the inputs' binary data")
    if "IMAGE" not in items:
        raise bad("input 'IMAGE' is missing")
    image = await image_input(*items["IMAGE"], max_side, served.model.config.image_size)
    label = label_input(*items["LABEL"], served.num_ways) if "LABEL" in items else None
    return StepInput(image, label)


def by_label(probabilities: list[float], labels: list[Any], num_ways: int) -> list[float]:
    """Slot order -> label order, from the labels the slots held when the prediction was made."""
    slots = {label: slot for slot, label in enumerate(labels) if type(label) is int and 0 <= label < num_ways}
    unseen = [j for j in range(num_ways) if j not in slots]
    free = sum(p for slot, p in enumerate(probabilities) if slot not in slots.values())
    return [probabilities[slots[j]] if j in slots else free / len(unseen) for j in range(num_ways)]


def inference_response(
    served: ServedModel, request_id: str | None, values: list[float], outputs: dict[str, bool]
) -> Response:
    """OIP "Inference Response JSON Object"; binary outputs follow the JSON header (BIN)."""
    header: dict[str, Any] = {"model_name": served.name, "model_version": VERSION}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"], blobs = [], []
    array = np.asarray(values, dtype=DTYPES["FP32"])
    for name, binary in outputs.items():
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": [1, len(values)]}
        if binary:
            blobs.append(array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = array.tolist()
        header["outputs"].append(tensor)
    body = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(body))}
    return Response(body + b"".join(blobs), media_type="application/octet-stream", headers=headers)


# ----------------------------------------------------------------------------------- sequences (SEQ)


async def open_sequence(
    engine: SessionEngine, session_id: str, model: str, owner: str, client: str = ""
) -> SessionRecord:
    """sequence_start: a fresh episode under this ID, replacing a live one (a new one counts as a session create)."""
    for _ in range(2):  # a racing sequence_start may create it between our reset and create
        try:
            return await engine.reset(session_id, owner)
        except APIError as exc:
            if exc.code != "session_not_found":
                raise
        try:
            return await engine.create(model, None, owner, session_id, client=client)
        except SessionExists:
            continue
    raise unavailable("the sequence is being started by another request; retry")


async def step_in_order(
    engine: SessionEngine, record: SessionRecord, step: StepInput, owner: str, client: str = ""
) -> tuple[dict, list[Any]]:
    """One step after those already applied; returns its result and the labels its prediction saw.

    The step names the index it follows, so the labels read with the record are the ones the step
    used; a concurrent request of the sequence that got there first makes it re-read and follow that
    one. Each request gets its own digest: the protocol has no retry identity, so nothing is replayed.
    """
    for attempt in range(ORDER_ATTEMPTS):
        pinned = StepInput(step.image, step.label, record.steps)
        try:
            digest = secrets.token_hex(16)  # counted against the step rate limit once, on its first attempt
            results = await engine.step(record.session_id, [pinned], digest, owner, client, rate_limited=attempt == 0)
            return results[0], record.labels
        except APIError as exc:
            if exc.code != "step_conflict":
                raise
        record = await engine.load(record.session_id, owner)
    raise unavailable("the sequence changed under this request too many times; retry")


async def end_sequence(engine: SessionEngine, session_id: str, owner: str) -> None:
    """sequence_end: drop the state once the step is answered (a failure leaves it to the idle timeout)."""
    try:
        await engine.delete(session_id, owner)
    except APIError as exc:
        if exc.code != "session_not_found":
            log.warning("could not drop an ended sequence", extra={"fields": {"session_id": session_id}})


# ----------------------------------------------------------------------------------- routes


def served_model(request: Request, name: str) -> ServedModel:
    version = request.path_params.get("version")
    served = get_engine(request).registry.models.get(name)
    if served is None or version not in (None, VERSION):
        raise unknown_model(name, version)
    return served


def model_metadata(served: ServedModel, engine: SessionEngine) -> dict[str, Any]:
    """OIP "Model Metadata Response JSON Object", with a description of each tensor in its parameters."""
    num_ways, side = served.num_ways, engine.settings.max_image_side

    def tensor(name: str, datatype: str, shape: list[int], doc: str) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"description": doc}}

    return {
        "name": served.name,
        "versions": [VERSION],
        "platform": "pytorch",
        "inputs": [
            tensor("IMAGE", "UINT8", [-1, -1], IMAGE_DOC.format(side=side)),
            tensor("LABEL", "INT32", [1], LABEL_DOC.format(last=num_ways - 1)),
        ],
        "outputs": [tensor("PROBABILITIES", "FP32", [1, num_ways], PROBABILITIES_DOC)],
        "parameters": {
            "num_ways": num_ways,
            "image_size": served.model.config.image_size,
            "fingerprint": served.fingerprint,
            "sequence_idle_timeout_seconds": engine.settings.session_ttl_seconds,
        },
    }


@router.get("/health/live")
async def server_live() -> Response:
    """OIP "Server Live": 200, empty body."""
    return Response(status_code=200)


@router.get("/health/ready")
async def server_ready(request: Request) -> Response:
    """OIP "Server Ready": models loaded and the session store reachable; 503 otherwise."""
    engine: SessionEngine | None = getattr(request.app.state, "engine", None)
    reason = "the service is starting" if engine is None else await engine.not_ready_reason()
    if reason is not None:
        raise V2Error(503, reason)
    return Response(status_code=200)


@router.get("")
async def server_metadata(request: Request) -> JSONResponse:
    """OIP "Server Metadata"."""
    return JSONResponse({"name": "ntm-fewshot", "version": request.app.version, "extensions": EXTENSIONS})


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def get_model_metadata(request: Request, name: str) -> JSONResponse:
    """OIP "Model Metadata"."""
    return JSONResponse(model_metadata(served_model(request, name), get_engine(request)))


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str) -> Response:
    """OIP "Model Ready": 200, empty body; 503 while the server drains."""
    served_model(request, name)
    if get_engine(request).draining:
        raise V2Error(503, "the service is shutting down")
    return Response(status_code=200)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str) -> Response:
    """OIP "Inference" of one step of a sequence (SEQ); the body is read here, binary or JSON (BIN)."""
    engine, owner, client = get_engine(request), get_owner(request), client_address(request.scope)
    served = served_model(request, name)
    body = decompress(await request.body(), request.headers.get("content-encoding"), engine.settings.max_body_bytes)
    infer_request, binary = parse_request(body, request.headers.get(HEADER_LENGTH))
    sequence = sequence_of(infer_request.parameters, served.name)
    outputs = requested_outputs(infer_request)
    step = await read_inputs(infer_request, binary, served, engine.settings.max_image_side)

    session_id = session_id_of(served.name, sequence.id, owner)
    try:
        if sequence.start:
            record = await open_sequence(engine, session_id, served.name, owner, client)
        else:
            record = await engine.load(session_id, owner)
        result, labels = await step_in_order(engine, record, step, owner, client)
    except APIError as exc:
        if exc.code != "session_not_found":
            raise
        raise bad(
            f"inference request for sequence {sequence.id} to model '{served.name}' must specify the START flag "
            "on the first request of the sequence (unknown, ended or idle past the timeout)"
        ) from None
    if sequence.end:
        await end_sequence(engine, session_id, owner)
    values = by_label(result["probabilities"], labels, served.num_ways)
    return inference_response(served, infer_request.id, values, outputs)


# ----------------------------------------------------------------------------------- errors (OIP "Errors")


def _as_v2(exc: Exception) -> JSONResponse:
    if isinstance(exc, V2Error):
        return v2_error_response(exc.status, exc.message, exc.headers)
    if isinstance(exc, APIError):  # the engine's: 422 and 409 are invalid arguments here
        status = 400 if exc.status in (409, 422) or exc.code == "session_not_found" else exc.status
        return v2_error_response(status, exc.message, exc.headers, exc.code)
    if isinstance(exc, RequestValidationError):
        message = "; ".join(str(e.get("msg", "invalid")) for e in exc.errors()[:5])
        return v2_error_response(400, message, code="invalid_request")
    if isinstance(exc, StarletteHTTPException):
        return v2_error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
    return v2_error_response(500, "internal server error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """On the protocol's paths every error, FastAPI's own included, leaves as {"error": "..."}; elsewhere
    the handlers installed before (``service.errors``) answer as they did."""
    for exc_class in (V2Error, APIError, RequestValidationError, StarletteHTTPException, Exception):
        fallback = app.exception_handlers.get(exc_class)

        async def handler(request: Request, exc: Exception, fallback=fallback) -> Response:
            if fallback is None or is_protocol_path(request.url.path):
                return _as_v2(exc)
            return await fallback(request, exc)

        app.add_exception_handler(exc_class, handler)
