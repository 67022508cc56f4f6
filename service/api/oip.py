"""The Open Inference Protocol's core: what a request means, whichever transport carried it.

One dataplane behind two thin transports, as MLServer keeps one behind its rest/ and grpc/
servers: ``service.api.v2`` (HTTP/REST, JSON or binary bodies) and ``service.api.grpc``
(gRPC, unary and streaming) each turn their wire form into an ``InferenceRequest`` of
``Tensor`` inputs, call ``infer`` here, and write the ``InferenceResponse`` back in their own
form. Tensor decoding, sequence handling, label mapping, metadata and the errors' meaning live
only here, so both transports answer alike to 1e-5 and refuse alike. Sections cited are:

- OIP: the Open Inference Protocol (https://github.com/kserve/open-inference-protocol,
  specification/protocol/inference_rest.md and inference_grpc.md);
- BIN: Triton's binary tensor data extension (server docs/protocol/extension_binary_data.md),
  whose layout gRPC's ``raw_input_contents`` share (little-endian; BYTES elements length-prefixed);
- SEQ: Triton's sequence extension (server docs/protocol/extension_sequence.md).

One request is one step of an episode. A sequence is a session of the one session store (so any
replica, over either transport, finds it) whose ID derives from the API key (owner), the model
name and the sequence ID, and cannot collide with a /v1 session ID (those never contain ``:``).
Steps go through ``SessionEngine.step`` like /v1's: micro-batched, one at a time per session,
committed exactly once, in order. PROBABILITIES come in the client's label order: the engine
answers in slot order, and the i-th distinct label takes slot i.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.data.preprocess import fit_size
from service.engine import COMMIT_ATTEMPTS, SessionEngine, StepInput, unavailable
from service.errors import APIError
from service.images import decode_base64, decode_png_async, gray_array
from service.logs import log
from service.middleware import new_request_id
from service.registry import ServedModel
from service.sessions.store import SessionExists, SessionRecord

SERVER_NAME = "ntm-fewshot"
VERSION = "1"  # every model is served as version "1"
EXTENSIONS = ["binary_tensor_data", "sequence"]
MAX_SEQUENCE_ID_CHARS = 256
ORDER_ATTEMPTS = COMMIT_ATTEMPTS  # re-reads while concurrent requests of one sequence move it on
DTYPES = {"UINT8": np.dtype("<u1"), "INT32": np.dtype("<i4"), "FP32": np.dtype("<f4")}  # BIN: little-endian
OUTPUT = "PROBABILITIES"

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


class ProtocolError(Exception):
    """An error of the protocol: OIP "Errors" over REST ({"error": "message"} with ``status``), a gRPC
    status over gRPC (``service.api.grpc`` maps the HTTP status to its code: 400 INVALID_ARGUMENT,
    404 NOT_FOUND, 503 UNAVAILABLE, ...)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


def unknown_model(name: str, version: str | None = None) -> ProtocolError:
    """Triton's words for a model it does not serve, over both transports."""
    which = f"'{name}'" if version is None else f"'{name}' version {version}"
    return ProtocolError(404, f"Request for unknown model: {which} is not found")


def protocol_status(exc: APIError) -> int:
    """The status an engine error takes in the protocol: its 409s and 422s, and a sequence that is not
    there, are the client's invalid arguments (400); the rest keep theirs (503 stays unavailable)."""
    return 400 if exc.status in (409, 422) or exc.code == "session_not_found" else exc.status


# ----------------------------------------------------------------------------------- requests (OIP "Inference")


@dataclass(frozen=True)
class Tensor:
    """OIP "Request Input" as either transport gives it: the data as ``raw`` bytes (BIN's binary data,
    gRPC's ``raw_input_contents``), or as ``data`` values (REST's JSON ``data``, nested or flat; gRPC's
    typed ``contents``, flat; BYTES elements are base64 strings from JSON, the bytes themselves from gRPC)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    data: Any = None


@dataclass(frozen=True)
class RequestedOutput:
    """OIP "Request Output"."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceRequest:
    """OIP "Inference Request": SEQ's flags live in ``parameters``; ``outputs`` None asks for every output."""

    inputs: list[Tensor]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None
    outputs: list[RequestedOutput] | None = None


@dataclass(frozen=True)
class InferenceResponse:
    """OIP "Inference Response": the requested outputs, each the FP32 [1, num_ways] PROBABILITIES."""

    model_name: str
    id: str | None
    outputs: list[str]
    probabilities: np.ndarray
    model_version: str = VERSION


@dataclass(frozen=True)
class Sequence:
    """SEQ's parameters of one request."""

    id: int | str
    start: bool
    end: bool


def sequence_of(parameters: Mapping[str, Any], model: str) -> Sequence:
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
    """Deterministic, so every replica and both transports find the sequence; per API key (owner), so keys
    never meet; 5 and "5" stay apart; and no /v1 session ID contains ':'."""
    return "v2:" + json.dumps([owner, model, sequence_id], separators=(",", ":"))


def check_outputs(outputs: list[RequestedOutput] | None) -> list[str]:
    """The names of the outputs to answer (OIP: none requested means all of them, here PROBABILITIES)."""
    wanted = outputs or [RequestedOutput(OUTPUT)]
    for output in wanted:
        if output.name != OUTPUT:
            raise bad(f"unexpected inference output '{output.name}': the only output is '{OUTPUT}'")
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in output.parameters:
                raise bad(f"output parameter '{unsupported}' is not supported")
    return list(dict.fromkeys(output.name for output in wanted))


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


def numeric(item: Tensor) -> np.ndarray:
    """A UINT8, INT32 or FP32 input as an array of its shape, from raw bytes or from data values."""
    dtype = DTYPES[item.datatype]
    count = math.prod(item.shape)
    if item.raw is not None:
        if len(item.raw) != count * dtype.itemsize:
            raise bad(
                f"input '{item.name}': its binary data is {len(item.raw)} bytes; shape {item.shape} of "
                f"{item.datatype} takes {count * dtype.itemsize}"
            )
        return np.frombuffer(item.raw, dtype=dtype).reshape(item.shape)
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


def image_file(item: Tensor) -> bytes:
    """A BYTES input of one element: the file after BIN's 4-byte length prefix, base64 from JSON, or the
    element itself from gRPC's ``bytes_contents``."""
    if math.prod(item.shape) != 1 or len(item.shape) not in (1, 2):
        raise bad(f"input 'IMAGE': BYTES shape must be [1] or [1, 1], not {item.shape}")
    if item.raw is None:
        values = flatten(item.data)
        if len(values) == 1 and isinstance(values[0], bytes):
            return values[0]
        if len(values) != 1 or not isinstance(values[0], str):
            raise bad("input 'IMAGE': BYTES data in JSON must be one string, the base64 of a PNG or JPEG file")
        return decode_base64(values[0], "BYTES data")
    raw = item.raw
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
        raise bad("input 'IMAGE': binary BYTES must be one element: a 4-byte little-endian length, then the file")
    return raw[4:]


def image_side(item: Tensor, max_side: int) -> None:
    if item.datatype == "BYTES":
        return
    if item.datatype not in ("UINT8", "FP32"):
        raise bad(f"input 'IMAGE': datatype {item.datatype} is not one of UINT8, FP32 or BYTES")
    shape = item.shape[1:] if len(item.shape) == 3 and item.shape[0] == 1 else item.shape
    if len(shape) != 2:
        raise bad(f"input 'IMAGE': shape must be [H, W] or [1, H, W], not {item.shape}")
    if not all(1 <= side <= max_side for side in shape):
        raise bad(f"input 'IMAGE' is {shape[1]}x{shape[0]}: each side must be 1 to {max_side}")


async def image_input(item: Tensor, max_side: int, image_size: int) -> np.ndarray:
    """The gray levels at the model's size, through the same checks and preprocessing as /v1 images."""
    try:
        if item.datatype == "BYTES":
            gray = await decode_png_async(image_file(item), max_side)
        else:
            gray = gray_array(numeric(item).reshape(item.shape[-2:]), max_side)
    except APIError as exc:
        raise bad(f"input 'IMAGE': {exc.message}") from None
    return fit_size(gray, image_size)


def label_input(item: Tensor, num_ways: int) -> int | None:
    if item.datatype != "INT32" or item.shape not in ([1], [1, 1]):
        raise bad(f"input 'LABEL' must be INT32 of shape [1] or [1, 1], not {item.datatype} {item.shape}")
    label = int(numeric(item).item())
    if not -1 <= label < num_ways:
        raise bad(f"input 'LABEL' is {label}: use 0..{num_ways - 1}, or -1 (or no LABEL) for a query")
    return None if label == -1 else label


async def read_inputs(inputs: list[Tensor], served: ServedModel, max_side: int) -> StepInput:
    """OIP "Request Input", checked in full before anything reaches the model."""
    items: dict[str, Tensor] = {}
    for item in inputs:
        if item.name not in ("IMAGE", "LABEL"):
            raise bad(f"unexpected inference input '{item.name}': the inputs are 'IMAGE' and 'LABEL'")
        if item.name in items:
            raise bad(f"input '{item.name}' is given twice")
        if item.name == "IMAGE":
            image_side(item, max_side)
        if "shared_memory_region" in item.parameters:
            raise bad(f"input '{item.name}': shared memory is not supported; send the data in the request")
        if item.raw is None and item.data is None:
            raise bad(
                f"input '{item.name}' has no data: neither data (JSON data, gRPC contents) nor binary data "
                "(binary_data_size, raw_input_contents)"
            )
        items[item.name] = item
    if "IMAGE" not in items:
        raise bad("input 'IMAGE' is missing")
    image = await image_input(items["IMAGE"], max_side, served.model.config.image_size)
    label = label_input(items["LABEL"], served.num_ways) if "LABEL" in items else None
    return StepInput(image, label)


def by_label(probabilities: list[float], labels: list[Any], num_ways: int) -> list[float]:
    """Slot order -> label order, from the labels the slots held when the prediction was made."""
    slots = {label: slot for slot, label in enumerate(labels) if type(label) is int and 0 <= label < num_ways}
    unseen = [j for j in range(num_ways) if j not in slots]
    free = sum(p for slot, p in enumerate(probabilities) if slot not in slots.values())
    return [probabilities[slots[j]] if j in slots else free / len(unseen) for j in range(num_ways)]


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
            digest = f"oip-{new_request_id()}"  # unique per attempt; counted against the rate limit on the first
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


# ----------------------------------------------------------------------------------- models, health, metadata


def served_model(engine: SessionEngine, name: str, version: str | None = None) -> ServedModel:
    """The model a request names; every model is served as version "1" (none or "" names it too)."""
    served = engine.registry.models.get(name)
    if served is None or version not in (None, "", VERSION):
        raise unknown_model(name, version or None)
    return served


async def not_ready_reason(engine: SessionEngine | None) -> str | None:
    """OIP "Server Ready": None when models are loaded and the store answers, else why not."""
    return "the service is starting" if engine is None else await engine.not_ready_reason()


def model_ready(engine: SessionEngine, name: str, version: str | None = None) -> bool:
    """OIP "Model Ready": the model is served (unknown: ``unknown_model``) and the server is not draining."""
    served_model(engine, name, version)
    return not engine.draining


def server_metadata(version: str) -> dict[str, Any]:
    """OIP "Server Metadata Response"."""
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


def model_metadata(served: ServedModel, engine: SessionEngine) -> dict[str, Any]:
    """OIP "Model Metadata Response", with a description of each tensor in its parameters (REST only: the
    gRPC message has no parameters)."""
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
        "outputs": [tensor(OUTPUT, "FP32", [1, num_ways], PROBABILITIES_DOC)],
        "parameters": {
            "num_ways": num_ways,
            "image_size": served.model.config.image_size,
            "fingerprint": served.fingerprint,
            "sequence_idle_timeout_seconds": engine.settings.session_ttl_seconds,
        },
    }


# ----------------------------------------------------------------------------------- inference


async def infer(
    engine: SessionEngine, owner: str, served: ServedModel, request: InferenceRequest, client: str = ""
) -> InferenceResponse:
    """OIP "Inference" of one step of a sequence (SEQ), every input checked before the model sees any.

    ``client`` is the caller's address, which the rate limits count when there are no API keys."""
    sequence = sequence_of(request.parameters, served.name)
    outputs = check_outputs(request.outputs)
    step = await read_inputs(request.inputs, served, engine.settings.max_image_side)

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
    probabilities = np.asarray([values], dtype=DTYPES["FP32"])
    return InferenceResponse(served.name, request.id, outputs, probabilities)
