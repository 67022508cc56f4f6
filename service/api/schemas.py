"""Request and response models of the /v1 API, with examples that work when pasted."""

from __future__ import annotations

import base64
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_LABEL_CHARS = 256  # a label is kept in the session and sent back in every answer
MAX_JSON_INTEGER = 2**53 - 1  # the largest integer every JSON client reads exactly (RFC 8259, section 6)


def _json_integer(value: Any) -> Any:
    """JSON Schema's "integer" is a number without a fraction, ``3.0`` as much as ``3`` (JSON Schema
    validation, 6.1.1): pydantic's lax ``int`` takes both (and makes ``3``), but also strings and
    booleans, which the schema's "integer" refuses, so those are refused here first."""
    if isinstance(value, (str, bool)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def json_int(ge: int = -MAX_JSON_INTEGER, le: int = MAX_JSON_INTEGER) -> Any:
    """An integer as JSON Schema has it, within [ge, le]. The bounds sit on ``int`` itself, before the
    validator, so that they reach the schema as "minimum"/"maximum": placed after a function validator,
    or on a union, pydantic emits them under its own names ("ge"), which are no JSON Schema keywords."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_json_integer)]


JSONInt = json_int()


def _short_label(label: str | int) -> str | int:
    if isinstance(label, str) and len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"a label has at most {MAX_LABEL_CHARS} characters; this one has {len(label)}")
    return label


Label = Annotated[
    Annotated[StrictStr, WithJsonSchema({"type": "string", "maxLength": MAX_LABEL_CHARS})] | JSONInt,
    AfterValidator(_short_label),
    Field(description=f"the client's label: a string (at most {MAX_LABEL_CHARS} characters) or an integer"),
]
# Checked while the JSON is parsed (in Rust, no Python per pixel); service.images names a bad one.
PixelLevel = Annotated[float, Field(strict=True, ge=0, le=255, allow_inf_nan=False)]
# base64 in the JSON, decoded by pydantic-core as it parses (ImageIn's val_json_bytes): the
# standard or the URL-safe alphabet, padding optional, no line breaks, the last character's unused
# bits zero. service.images names a bad one.
Base64Data = Annotated[bytes, WithJsonSchema({"type": "string", "contentEncoding": "base64", "minLength": 1})]

EXAMPLE_PIXELS = [[255, 255, 255, 255], [255, 0, 0, 255], [255, 0, 0, 255], [255, 255, 255, 255]]
EXAMPLE_GRAY8 = {"gray8": base64.b64encode(bytes(sum(EXAMPLE_PIXELS, []))).decode(), "shape": [4, 4]}


IMAGE_FIELD_TYPES = {"png": "string", "pixels": "array", "gray8": "string", "shape": "array"}


def given(*fields: str) -> dict[str, Any]:
    """JSON Schema for "each of ``fields`` is present and not null": the validator, like pydantic's
    defaults, takes an explicit null for an image field as absent, so "present" alone (``required``)
    would admit a body the validator refuses (``{"gray8": null, "shape": [1, 1]}``)."""
    return {"required": list(fields), "properties": {f: {"type": IMAGE_FIELD_TYPES[f]} for f in fields}}


def given_none_of(*fields: str) -> dict[str, Any]:
    return {"not": {"anyOf": [given(f) for f in fields]}}


class ImageIn(BaseModel):
    """Grayscale, dark strokes on a light background, up to 512x512: exactly one of png, pixels or gray8."""

    model_config = ConfigDict(
        extra="forbid",
        val_json_bytes="base64",
        json_schema_extra={
            "examples": [{"pixels": EXAMPLE_PIXELS}, EXAMPLE_GRAY8],
            # the rule of ``_exactly_one``, null being absent
            "oneOf": [
                {"allOf": [given("png"), given_none_of("pixels", "gray8", "shape")]},
                {"allOf": [given("pixels"), given_none_of("png", "gray8", "shape")]},
                {"allOf": [given("gray8", "shape"), given_none_of("png", "pixels")]},
            ],
        },
    )

    png: Base64Data | None = Field(
        None, description="base64 of a PNG or JPEG file (standard or URL-safe alphabet, padding optional)"
    )
    pixels: list[list[PixelLevel]] | None = Field(
        None,
        description="rows of 0-255 gray levels (255 = white paper), at most 512x512",
        # Documented here, checked by service.images (so that a bad size gets an image error).
        json_schema_extra={"minItems": 1, "maxItems": 512, "items": {"minItems": 1, "maxItems": 512}},
    )

    gray8: Base64Data | None = Field(
        None,
        description="base64 (one line, no line breaks; standard or URL-safe alphabet, padding optional) of the raw "
        "gray levels, one byte per pixel, row by row "
        "(NumPy: base64.b64encode(image.astype(numpy.uint8).tobytes())); the compact form, cheapest to send and to decode",
    )
    shape: list[JSONInt] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[height, width] of gray8 (only with gray8)",
        # Documented here, checked by service.images (so that a bad value gets an image error).
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": 512}},
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageIn:
        if (self.png is None) + (self.pixels is None) + (self.gray8 is None) != 2:  # runs per image: no generator
            raise ValueError("give exactly one of png, pixels or gray8")
        if (self.gray8 is None) != (self.shape is None):
            raise ValueError("gray8 needs shape [height, width], and shape goes only with gray8")
        return self


class StepIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": {"pixels": EXAMPLE_PIXELS}, "label": "a"}]}
    )

    image: ImageIn
    label: Label | None = Field(None, description="the image's label; omit it for a query")
    step: json_int(ge=0) | None = Field(  # type: ignore[valid-type]
        None, description="the step index the client expects (for exactly-once retries)"
    )


class StepsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[StepIn] = Field(min_length=1, description="steps applied in order, as one change of the session")


class CreateSessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ttl_seconds": 600}]})

    model: str | None = Field(
        None, description="a name from GET /v1/models; the default model when omitted (with snapshot: the snapshot's)"
    )
    snapshot: StrictStr | None = Field(
        None,
        description="base64 (standard or URL-safe) of a GET /v1/sessions/{id}/snapshot answer: the new session "
        "starts as that session was, with a new ID and the caller as owner",
        json_schema_extra={"contentEncoding": "base64", "minLength": 1},
    )
    # A plain float with its bounds, so that they land in the JSON Schema as standard keywords
    # (constraints on a union are emitted under pydantic's own names, such as "gt"); the server's
    # bounds replace them in the OpenAPI document (``document_limits``), and the engine checks them.
    ttl_seconds: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | None = Field(
        None,
        description="idle time before the session expires (a step or a reset starts it again): at least the "
        "server's NTM_MIN_SESSION_TTL_SECONDS (1 second by default), at most its NTM_MAX_SESSION_TTL_SECONDS "
        "(7 days by default)",
    )


class SessionOut(BaseModel):
    session_id: str
    model: str
    num_ways: int
    expires_at: str


class SessionInfoOut(SessionOut):
    steps: int
    labels: list[Label | None]
    accuracy: float | None = Field(description="online accuracy over the session's labeled steps")


class StepOut(BaseModel):
    step: int = Field(description="this step's index, from 0")
    probabilities: list[float] = Field(description="one per slot, in slot order, predicted before this step's label")
    labels: list[Label | None] = Field(description="each slot's label after this step (null: free slot)")
    prediction: Label | None = Field(
        description="the label the most probable slot held before this step (null if it was still free); "
        "labels, by contrast, is the table after this step's label"
    )
    predicted_slot: int
    novelty: float = Field(description="probability mass on slots with no label yet: 'a class not seen before'")


class StepsOut(BaseModel):
    results: list[StepOut]


class PredictIn(BaseModel):
    """Images to classify against the session as it is: no label, no change to the session."""

    model_config = ConfigDict(
        extra="forbid",
        val_json_bytes="base64",
        json_schema_extra={"examples": [{"images": [{"pixels": EXAMPLE_PIXELS}, EXAMPLE_GRAY8]}]},
    )

    images: list[ImageIn] = Field(min_length=1, description="1 to NTM_MAX_PREDICT_IMAGES (256) images, any form")


class PredictionOut(BaseModel):
    probabilities: list[float] = Field(description="one per slot, in slot order")
    prediction: Label | None = Field(description="the label of the most probable slot (null: a free slot)")
    predicted_slot: int
    novelty: float = Field(description="probability mass on slots with no label yet")


class PredictOut(BaseModel):
    results: list[PredictionOut] = Field(description="one per image, in order")
    steps: int = Field(description="the session's step count, which a prediction leaves unchanged")


class PreprocessIn(BaseModel):
    """An image to see as a model sees it: the preprocessing every step and prediction runs, and nothing else."""

    model_config = ConfigDict(
        extra="forbid",
        val_json_bytes="base64",
        json_schema_extra={"examples": [{"image": {"pixels": EXAMPLE_PIXELS}}]},
    )

    image: ImageIn
    model: str | None = Field(None, description="a name from GET /v1/models (its input size); the default when omitted")


class PreprocessOut(BaseModel):
    model: str = Field(description="the model whose input this is")
    size: int = Field(description="the side of the model's square input")
    ink: list[list[float]] = Field(
        description="size rows of size values: the model's input exactly, 1.0 for a stroke, 0.0 for paper"
    )


class ModelOut(BaseModel):
    name: str
    num_ways: int
    image_size: int
    encoder: str
    memory: list[int] | None = Field(description="[slots, width] of the memory matrix; null for the LSTM-only baseline")
    addressing: str | None = Field(description="ntm (the seed's heads) or lrua (least recently used access)")
    read_heads: int
    hidden_size: int
    fingerprint: str
    default: bool


class ModelsOut(BaseModel):
    models: list[ModelOut]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


def document_limits(
    components: dict[str, Any], max_side: int, max_steps: int, max_images: int, min_ttl: float, max_ttl: float
) -> None:
    """The server's own limits in the OpenAPI components: a body the schema admits is then one the server
    takes, as far as JSON Schema can say (not, say, whether a PNG decodes)."""
    image = components["ImageIn"]["properties"]
    image["pixels"].update(maxItems=max_side, items={"minItems": 1, "maxItems": max_side})
    image["shape"]["items"]["maximum"] = max_side
    components["StepsIn"]["properties"]["steps"]["maxItems"] = max_steps
    components["PredictIn"]["properties"]["images"]["maxItems"] = max_images
    ttl = next(s for s in components["CreateSessionIn"]["properties"]["ttl_seconds"]["anyOf"] if s["type"] == "number")
    ttl.pop("exclusiveMinimum", None)
    ttl.update(minimum=min_ttl, maximum=max_ttl)
