"""Property tests (hypothesis) of the byte-level edges: request images, preprocessing, state and record codecs.

Whatever a client or a corrupted store hands these functions, they either return a valid
value or raise the one error type their caller turns into a clean answer (a 422, a
StateFormatError, a RecordFormatError): never any other exception, never a warning.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from models import NTMState
from models.data.preprocess import fit_size, ink, preprocess
from models.state import STATE_FORMAT_VERSION, STATE_MAGIC, StateFormatError
from service.api.v1 import parse_step_request, update_digest
from service.errors import APIError
from service.images import decode_base64, decode_png, pixels_array
from service.sessions.codec import RecordFormatError, decode_record, encode_header
from service.sessions.store import SessionRecord

MAX_SIDE = 512
IMAGE_SIZE = 28
HEADER = struct.Struct("<4sHHIIII")  # models/state.py's layout, spelled out: a format change must fail here


def bounded(examples: int):
    """Small, deterministic-in-time runs: no deadline (CI machines are noisy), no example database on disk."""
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def flush_denormal_is_on() -> bool:
    return (torch.tensor([1e-40]) * 1.0).item() == 0.0


@pytest.fixture(autouse=True, scope="module")
def ieee_floats():
    """hypothesis refuses to draw floats while denormals flush to zero, which training (and the service's model
    thread) turn on: should an earlier test have left it on in this thread, this module turns it off, then back."""
    was_on = flush_denormal_is_on()
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(was_on)


# ------------------------------------------------------------------------------------------ images

gray_images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 64), st.integers(1, 64)))


def encode(gray: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, image_format)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def to_model_input(gray: np.ndarray) -> torch.Tensor:
    """What the service makes of checked gray levels: ``fit_size`` on the event loop, ``ink`` in the batcher."""
    return torch.from_numpy(ink(fit_size(gray, IMAGE_SIZE)))


def assert_model_input(tensor: torch.Tensor) -> None:
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.isnan(tensor).any()
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0


def assert_invalid_image(exc: APIError) -> None:
    assert exc.status == 422 and exc.code == "invalid_image"


def decode_or_422(data: bytes) -> np.ndarray | None:
    """decode_png's contract: gray levels, or an APIError 422; anything else propagates and fails."""
    try:
        gray = decode_png(data, MAX_SIDE)
    except APIError as exc:
        assert_invalid_image(exc)
        return None
    assert gray.ndim == 2 and min(gray.shape) >= 1 and max(gray.shape) <= MAX_SIDE
    assert gray.dtype == np.uint8
    assert_model_input(to_model_input(gray))
    return gray


def png_of_step_body(encoded: str) -> bytes | None:
    """The png field of a /v1 step body as the schema decodes it, or None after its 422 invalid_image."""
    try:
        return parse_step_request(json.dumps({"image": {"png": encoded}}).encode()).image.png
    except APIError as exc:
        assert_invalid_image(exc)
        return None


def base64_or_422(encoded: str) -> bytes | None:
    """decode_base64's contract (the /v2 BYTES path): bytes, or an APIError 422."""
    try:
        return decode_base64(encoded, "BYTES data")
    except APIError as exc:
        assert_invalid_image(exc)
        return None


@bounded(60)
@given(gray_images)
def test_png_round_trips_gray_levels_exactly(gray):
    decoded = decode_png(encode(gray, "PNG"), MAX_SIDE)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, gray)
    assert_model_input(to_model_input(decoded))


@bounded(60)
@given(gray_images)
def test_jpeg_decodes_to_a_valid_model_input(gray):
    decoded = decode_png(encode(gray, "JPEG"), MAX_SIDE)
    assert decoded.shape == gray.shape
    assert decoded.min() >= 0 and decoded.max() <= 255
    assert_model_input(to_model_input(decoded))


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(7)
    gray = rng.integers(0, 256, size=(20, 17), dtype=np.uint8)
    seeds = []
    for mode in ("L", "1", "P", "RGB", "RGBA", "LA", "I;16"):
        buffer = io.BytesIO()
        Image.fromarray(gray).convert(mode).save(buffer, "PNG")
        seeds.append(buffer.getvalue())
    for mode in ("L", "RGB", "CMYK"):
        buffer = io.BytesIO()
        Image.fromarray(gray).convert(mode).save(buffer, "JPEG")
        seeds.append(buffer.getvalue())
    return seeds


IMAGE_SEEDS = _image_seeds()


def _jpeg_claiming(height: int, width: int) -> bytes:
    """A valid small JPEG whose frame header claims another size (past Pillow's decompression-bomb limits)."""
    data = IMAGE_SEEDS[-3]
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def _png_with_broken_chunk_after_idat() -> bytes:
    """A PNG whose IDAT is split in two, the second chunk's type garbled: Pillow fails while decoding."""
    data = IMAGE_SEEDS[0]
    idat = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[idat : idat + 4])
    payload = data[idat + 8 : idat + 8 + length]
    half = len(payload) // 2
    first = struct.pack(">I", half) + b"IDAT" + payload[:half]
    first += struct.pack(">I", zlib.crc32(b"IDAT" + payload[:half]))
    second = struct.pack(">I", len(payload) - half) + b"\x00\x00\x00\x00" + payload[half:] + b"\x00" * 4
    return data[:idat] + first + second + data[idat + 12 + length :]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid PNG or JPEG, truncated, spliced into or with bytes overwritten: mostly past the header checks."""
    data = bytearray(draw(st.sampled_from(IMAGE_SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 32))]
        if not data:
            break
    return bytes(data)


@bounded(400)
@given(
    st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=128).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
        st.binary(max_size=128).map(lambda tail: b"\xff\xd8\xff" + tail),
        mutated_images(),
    )
)
@example(_jpeg_claiming(10_000, 10_000))  # > Image.MAX_IMAGE_PIXELS: Pillow warns (an error here)
@example(_jpeg_claiming(60_000, 60_000))  # > 2 x MAX_IMAGE_PIXELS: DecompressionBombError
@example(_jpeg_claiming(600, 600))  # under Pillow's limit, over max_side ** 2
@example(_png_with_broken_chunk_after_idat())  # Pillow raises SyntaxError while decoding
def test_arbitrary_bytes_decode_or_give_422(data):
    assert png_of_step_body(b64(data)) == base64_or_422(b64(data)) == data
    decode_or_422(data)


@bounded(150)
@given(
    st.one_of(
        st.text(max_size=200),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=200),
        st.binary(max_size=120).map(b64).map(lambda s: s.rstrip("=")),  # valid alphabet, bad padding
    )
)
@example("")
@example("é")
@example("====")
@example("QR==")
@example("0000000=")
def test_arbitrary_text_as_base64_decodes_or_gives_422(text):
    """Both base64 decoders, each bytes or a 422, the same bytes where both decode.

    /v1's schema takes the URL-safe alphabet and missing padding too, and refuses non-zero
    trailing bits ("QR==") that /v2's ``binascii`` passes: neither accepts all the other does.
    """
    v1, v2 = png_of_step_body(text), base64_or_422(text)
    if v1 is not None and v2 is not None:
        assert v1 == v2
    for data in (v1, v2):
        if data is not None:
            decode_or_422(data)


pixel_values = st.one_of(
    st.floats(0, 255),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, -1e-30, 255.00001, 1e300, -1e300, math.inf, -math.inf, math.nan]),
)


@bounded(200)
@given(st.lists(st.lists(pixel_values, max_size=12), max_size=12))
@example([])
@example([[]])
@example([[], [1.0]])
@example([[1.0], []])
@example([[1.0, 2.0], [3.0]])
@example([[1e300]])  # overflows float32
@example([[0.0] * (MAX_SIDE + 1)])
def test_arbitrary_pixel_lists_are_valid_or_give_422(pixels):
    """Through the step route's parsing: the schema checks each level, ``pixels_array`` the shape."""
    body = json.dumps({"image": {"pixels": pixels}}).encode()  # NaN and Infinity as JavaScript writes them
    try:
        array = pixels_array(parse_step_request(body).image.pixels, MAX_SIDE)
    except APIError as exc:
        assert exc.status == 422 and exc.code == "invalid_image"
        return
    assert array.dtype == np.float32 and array.shape == (len(pixels), len(pixels[0]))
    assert np.isfinite(array).all() and array.min() >= 0 and array.max() <= 255
    assert_model_input(to_model_input(array))


@bounded(60)
@given(st.integers(1, 16), st.integers(1, 16), st.data())
def test_rectangular_pixels_in_range_are_accepted(height, width, data):
    pixels = data.draw(
        st.lists(st.lists(st.floats(0, 255), min_size=width, max_size=width), min_size=height, max_size=height)
    )
    array = pixels_array(pixels, MAX_SIDE)
    np.testing.assert_array_equal(array, np.asarray(pixels, dtype=np.float32))


# ------------------------------------------------------------------------------------------ preprocess

finite_gray = hnp.arrays(
    st.sampled_from([np.dtype(np.uint8), np.dtype(np.float32), np.dtype(np.float64)]),
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    elements={"min_value": 0, "max_value": 255},
)


@bounded(80)
@given(finite_gray, st.sampled_from([1, 5, 28, 40]))
def test_preprocess_output_shape_dtype_range(gray, size):
    out = preprocess(gray, size)
    assert out.dtype == np.float32 and out.shape == (size, size)
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0


@bounded(40)
@given(st.integers(1, 64), st.integers(1, 64), st.sampled_from([np.uint8, np.float32, np.float64]))
def test_white_is_no_ink_and_black_is_all_ink(height, width, dtype):
    assert (preprocess(np.full((height, width), 255, dtype=dtype), IMAGE_SIZE) == 0.0).all()
    assert (preprocess(np.zeros((height, width), dtype=dtype), IMAGE_SIZE) == 1.0).all()


# ------------------------------------------------------------------------------------------ state codec

# Values are drawn as raw bit patterns: every float32 (-0.0, denormals, inf, NaN payloads) and no float
# arithmetic, so they survive flush-to-zero; ordinary values come from floats() through their bits.
SPECIAL_BITS = [
    0x00000000,  # 0.0
    0x80000000,  # -0.0
    0x00000001,  # smallest denormal
    0x807FFFFF,  # largest negative denormal
    0x00800000,  # smallest normal
    0x7F7FFFFF,  # largest finite
    0xFF7FFFFF,  # most negative finite
    0x7F800000,  # inf
    0xFF800000,  # -inf
    0x7FC00000,  # quiet NaN
    0x7F800001,  # signalling NaN
    0xFFFFFFFF,  # NaN, sign and full payload
]
float32_bits = st.one_of(
    st.integers(0, 2**32 - 1),
    st.sampled_from(SPECIAL_BITS),
    st.floats(-1e6, 1e6, width=32).map(lambda x: struct.unpack("<I", struct.pack("<f", x))[0]),
)


@st.composite
def states(draw) -> NTMState:
    """A batch-1 state of NTMConfig's shapes (heads 0: the LSTM-only baseline, with no read vector)."""
    slots, width, hidden = draw(st.integers(0, 6)), draw(st.integers(0, 5)), draw(st.integers(0, 6))
    heads = draw(st.integers(0, 3))
    reads = draw(st.integers(1, 4)) if heads else 0  # lrua reads R vectors; the baseline none
    read_width = reads * width
    shapes = [(1, slots, width), (1, read_width), (1, heads, slots), (1, hidden), (1, hidden)]
    arrays = [draw(hnp.arrays(np.uint32, shape, elements=float32_bits)).view(np.float32) for shape in shapes]
    return NTMState(*(torch.from_numpy(a) for a in arrays))


def bits(state: NTMState) -> list[torch.Tensor]:
    return [t.contiguous().view(torch.int32) for t in state.tensors()]


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "flush-denormal"])  # the service runs with it
@bounded(80)
@given(state=states())
def test_state_bytes_round_trip_bit_identically(flush_denormal, state):
    torch.set_flush_denormal(flush_denormal)
    try:
        data = state.to_bytes()
        restored = NTMState.from_bytes(data)
        again = NTMState.from_bytes(bytearray(data)), NTMState.from_bytes(memoryview(data))
    finally:
        torch.set_flush_denormal(False)
    _, slots, width = state.memory.shape
    heads, hidden, read_width = state.weights.shape[1], state.h.shape[1], state.read.shape[1]
    assert len(data) == 24 + 4 * (slots * width + read_width + heads * slots + 2 * hidden)
    if read_width == (1 if heads else 0) * width:  # what format 1 can say: written as format 1
        assert HEADER.unpack_from(data) == (STATE_MAGIC, 1, 0, slots, width, hidden, heads)
    else:
        reads = read_width // width
        assert HEADER.unpack_from(data) == (STATE_MAGIC, STATE_FORMAT_VERSION, reads, slots, width, hidden, heads)
    for before, after in zip(bits(state), bits(restored), strict=True):
        assert before.shape == after.shape and torch.equal(before, after)  # -0.0, denormals, NaN payloads kept
    assert all(t.dtype == torch.float32 for t in restored.tensors())
    assert restored.to_bytes() == data
    assert all(other.to_bytes() == data for other in again)


def _header(
    slots: int, width: int, hidden: int, heads: int, reads: int = 1, version: int = STATE_FORMAT_VERSION
) -> bytes:
    return HEADER.pack(STATE_MAGIC, version, reads, slots, width, hidden, heads)


@st.composite
def state_like_bytes(draw) -> bytes:
    """A well-formed header of either format (sizes anywhere in uint32) with a body of arbitrary length."""
    u32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
    reads, version = draw(st.one_of(st.integers(0, 4), st.integers(0, 2**16 - 1))), draw(st.sampled_from([1, 2]))
    header = _header(draw(u32), draw(u32), draw(u32), draw(u32), reads, version)
    return header + draw(st.binary(max_size=200))


def _canonical(data: bytes) -> bytes:
    """What ``to_bytes`` writes for a state decoded from ``data``: format 1 where it can say the
    layout (its reserved field 0), else format 2 with the number of read vectors."""
    _, version, reads, slots, width, hidden, heads = HEADER.unpack_from(data)
    implied = 1 if heads else 0
    if version == 1 or width == 0 or reads == implied:
        return _header(slots, width, hidden, heads, 0, version=1) + bytes(data[HEADER.size :])
    return _header(slots, width, hidden, heads, reads) + bytes(data[HEADER.size :])


@bounded(300)
@given(st.one_of(st.binary(max_size=200), state_like_bytes(), st.binary(max_size=64).map(lambda b: STATE_MAGIC + b)))
@example(b"")
@example(_header(0, 0, 0, 0))  # the smallest valid state: no tensors at all
@example(_header(2**32 - 1, 2**32 - 1, 1, 1) + b"\x00" * 4)  # sizes that wrap int64 to a total of one float
@example(_header(2, 1, 0, 1, reads=0, version=1) + b"\x00" * 20)  # format 1: one read vector implied
def test_arbitrary_bytes_decode_or_raise_state_format_error(data):
    try:
        state = NTMState.from_bytes(data)
    except StateFormatError:
        return
    assert state.batch_size == 1
    assert state.to_bytes() == _canonical(data)


# ------------------------------------------------------------------------------------------ session records

labels = st.lists(st.one_of(st.text(max_size=8), st.integers(-(2**40), 2**40), st.sampled_from(["1", 1, "∑", "🙂"])))
# Empty containers are leaves: hypothesis (6.170+) warns about an extend that works without its argument.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.just([])
    | st.just({}),
    lambda inner: (
        st.lists(inner, min_size=1, max_size=4) | st.dictionaries(st.text(max_size=6), inner, min_size=1, max_size=4)
    ),
    max_leaves=12,
)
finite_times = st.floats(0, 1e10, allow_nan=False)


@st.composite
def records(draw) -> SessionRecord:
    return SessionRecord(
        session_id=draw(st.text(min_size=1, max_size=24)),
        model=draw(st.text(max_size=12)),
        fingerprint=draw(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)),
        state=draw(states()),
        ttl_seconds=draw(st.floats(1e-3, 1e7)),
        expires_at=draw(finite_times),
        owner=draw(st.text(max_size=12)),
        steps=draw(st.integers(0, 2**31)),
        version=draw(st.integers(0, 2**31)),
        labels=draw(labels),
        pending_slot=draw(st.integers(-1, 64)),
        labeled_steps=draw(st.integers(0, 2**31)),
        correct_steps=draw(st.integers(0, 2**31)),
        last_request=draw(st.text(max_size=64)),
        last_request_start=draw(st.integers(-1, 2**31)),
        last_response=draw(json_values),
    )


@bounded(100)
@given(records())
def test_session_record_round_trips(record):
    header, state = encode_header(record), record.state.to_bytes()
    decoded = decode_record(header, state)
    for field in dataclasses.fields(SessionRecord):
        if field.name != "state":
            assert getattr(decoded, field.name) == getattr(record, field.name), field.name
    assert [type(label) for label in decoded.labels] == [type(label) for label in record.labels]  # 1 vs "1"
    assert decoded.state.to_bytes() == state
    assert encode_header(decoded) == header


GOOD_STATE = _header(2, 2, 1, 2) + b"\x00" * 4 * (4 + 2 + 4 + 1 + 1)  # memory, read, weights, h, c


@bounded(200)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=100).map(str.encode),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.text(max_size=12), json_values, max_size=6).map(
            lambda d: json.dumps({"format": 1, **d}).encode()
        ),
    )
)
@example(b"")
@example(b"\xff\xfe\x00")
@example(b'{"format": 2}')
@example(b"[" * 100_000)  # deeper than the JSON decoder recurses
@example(b'{"a":' * 100_000)
def test_garbage_headers_raise_record_format_error(header):
    with pytest.raises(RecordFormatError):
        decode_record(header, GOOD_STATE)


@bounded(100)
@given(records(), st.one_of(st.binary(max_size=100), state_like_bytes()))
def test_garbage_state_under_a_good_header_raises_record_format_error(record, state):
    try:
        NTMState.from_bytes(state)
    except StateFormatError:
        with pytest.raises(RecordFormatError):
            decode_record(encode_header(record), state)


@bounded(60)
@given(st.binary(max_size=10_000))
def test_digest_in_pieces_equals_the_digest_in_one(data):
    whole, pieces = hashlib.sha256(data), hashlib.sha256()
    update_digest(pieces, data)
    assert pieces.hexdigest() == whole.hexdigest()
