"""/v2: the Open Inference Protocol over HTTP/REST (KServe v2), with Triton's sequence and binary tensor data
extensions.

So that ``tritonclient.http``, KServe and Seldon clients run a few-shot episode with no code of ours. This
module is the REST transport only: it reads the JSON header and BIN's binary data into the protocol core's
``InferenceRequest`` (``service.api.oip``, which the gRPC transport calls too) and writes its answer back as
JSON or binary. Sections cited below are those of:

- OIP: the Open Inference Protocol, HTTP/REST
  (https://github.com/kserve/open-inference-protocol, specification/protocol/inference_rest.md);
- BIN: Triton's binary tensor data extension (server docs/protocol/extension_binary_data.md);
- SEQ: Triton's sequence extension (server docs/protocol/extension_sequence.md).
"""

from __future__ import annotations

import json
import zlib
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import oip
from service.api.oip import ProtocolError, bad
from service.api.v1 import get_engine, get_owner
from service.errors import APIError, is_protocol_path, v2_error_response
from service.ratelimit import client_address
from service.registry import ServedModel

HEADER_LENGTH = "Inference-Header-Content-Length"  # BIN "HTTP/REST"

# Not in /openapi.json: the protocol is specified elsewhere, its bodies may be binary, and its error shape
# is not /v1's ErrorOut, which every documented error answer there uses.
router = APIRouter(prefix="/v2", tags=["v2"], include_in_schema=False)


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
        raise ProtocolError(413, f"the decompressed body is over {limit} bytes")
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


def binary_outputs(request: InferenceRequest) -> dict[str, bool]:
    """Output name -> whether its data goes binary (BIN: per output binary_data, else binary_data_output)."""
    default = request.parameters.get("binary_data_output", False)
    wanted = request.outputs or [RequestOutput(name=oip.OUTPUT)]
    oip.check_outputs([oip.RequestedOutput(output.name, output.parameters) for output in wanted])
    chosen: dict[str, bool] = {}
    for output in wanted:
        binary = output.parameters.get("binary_data", default)
        if not isinstance(binary, bool):
            raise bad(f"binary_data of output '{output.name}' must be true or false")
        chosen[output.name] = binary
    return chosen


def tensors(request: InferenceRequest, binary: bytes) -> list[oip.Tensor]:
    """The inputs with their BIN binary data: each input's ``binary_data_size`` bytes, in order, all of them."""
    inputs = []
    offset = 0
    for item in request.inputs:
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
        inputs.append(oip.Tensor(item.name, item.datatype, item.shape, item.parameters, raw, item.data))
    if offset != len(binary):
        raise bad(f"the body holds {len(binary) - offset} bytes after the inputs' binary data")
    return inputs


def inference_response(answer: oip.InferenceResponse, outputs: dict[str, bool]) -> Response:
    """OIP "Inference Response JSON Object"; binary outputs follow the JSON header (BIN)."""
    header: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version}
    if answer.id is not None:
        header["id"] = answer.id
    header["outputs"], blobs = [], []
    array = answer.probabilities
    for name, binary in outputs.items():
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blobs.append(array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = array[0].tolist()
        header["outputs"].append(tensor)
    body = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(body))}
    return Response(body + b"".join(blobs), media_type="application/octet-stream", headers=headers)


# ----------------------------------------------------------------------------------- routes


def served_model(request: Request, name: str) -> ServedModel:
    return oip.served_model(get_engine(request), name, request.path_params.get("version"))


@router.get("/health/live")
async def server_live() -> Response:
    """OIP "Server Live": 200, empty body."""
    return Response(status_code=200)


@router.get("/health/ready")
async def server_ready(request: Request) -> Response:
    """OIP "Server Ready": models loaded and the session store reachable; 503 otherwise."""
    reason = await oip.not_ready_reason(getattr(request.app.state, "engine", None))
    if reason is not None:
        raise ProtocolError(503, reason)
    return Response(status_code=200)


@router.get("")
async def server_metadata(request: Request) -> JSONResponse:
    """OIP "Server Metadata"."""
    return JSONResponse(oip.server_metadata(request.app.version))


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def get_model_metadata(request: Request, name: str) -> JSONResponse:
    """OIP "Model Metadata"."""
    return JSONResponse(oip.model_metadata(served_model(request, name), get_engine(request)))


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str) -> Response:
    """OIP "Model Ready": 200, empty body; 503 while the server drains."""
    if not oip.model_ready(get_engine(request), name, request.path_params.get("version")):
        raise ProtocolError(503, "the service is shutting down")
    return Response(status_code=200)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str) -> Response:
    """OIP "Inference" of one step of a sequence (SEQ); the body is read here, binary or JSON (BIN)."""
    engine, owner = get_engine(request), get_owner(request)
    served = served_model(request, name)
    body = decompress(await request.body(), request.headers.get("content-encoding"), engine.settings.max_body_bytes)
    infer_request, binary = parse_request(body, request.headers.get(HEADER_LENGTH))
    oip.sequence_of(infer_request.parameters, served.name)  # SEQ's refusals before any tensor's
    outputs = binary_outputs(infer_request)
    core_request = oip.InferenceRequest(
        tensors(infer_request, binary),
        infer_request.parameters,
        infer_request.id,
        [oip.RequestedOutput(o.name, o.parameters) for o in infer_request.outputs or []] or None,
    )
    answer = await oip.infer(engine, owner, served, core_request, client_address(request.scope))
    return inference_response(answer, outputs)


# ----------------------------------------------------------------------------------- errors (OIP "Errors")


def _as_v2(exc: Exception) -> JSONResponse:
    if isinstance(exc, ProtocolError):
        return v2_error_response(exc.status, exc.message, exc.headers)
    if isinstance(exc, APIError):  # the engine's: 422 and 409 are invalid arguments here
        return v2_error_response(oip.protocol_status(exc), exc.message, exc.headers, exc.code)
    if isinstance(exc, RequestValidationError):
        message = "; ".join(str(e.get("msg", "invalid")) for e in exc.errors()[:5])
        return v2_error_response(400, message, code="invalid_request")
    if isinstance(exc, StarletteHTTPException):
        return v2_error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
    return v2_error_response(500, "internal server error", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """On the protocol's paths every error, FastAPI's own included, leaves as {"error": "..."}; elsewhere
    the handlers installed before (``service.errors``) answer as they did."""
    for exc_class in (ProtocolError, APIError, RequestValidationError, StarletteHTTPException, Exception):
        fallback = app.exception_handlers.get(exc_class)

        async def handler(request: Request, exc: Exception, fallback=fallback) -> Response:
            if fallback is None or is_protocol_path(request.url.path):
                return _as_v2(exc)
            return await fallback(request, exc)

        app.add_exception_handler(exc_class, handler)
