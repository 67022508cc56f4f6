"""Request images to model input: decode, validate with limits, then ``models.data.preprocess``.

Bad input stops here with a 422 that says what is wrong; it never reaches the model.
"""

from __future__ import annotations

import base64
import binascii

import anyio.to_thread
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.data.preprocess import decode_grayscale, preprocess
from service.errors import APIError


def invalid_image(message: str) -> APIError:
    return APIError(422, "invalid_image", message)


def _check_side(height: int, width: int, max_side: int) -> None:
    if height < 1 or width < 1:
        raise invalid_image(f"image is {width}x{height}; it needs at least one pixel")
    if height > max_side or width > max_side:
        raise invalid_image(f"image is {width}x{height}; the largest accepted side is {max_side}")


def decode_png(encoded: str, max_side: int) -> np.ndarray:
    """Base64 PNG or JPEG -> gray levels, checking its size before decoding its pixels."""
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_image("png is not valid base64") from None
    if not data:
        raise invalid_image("png is empty")
    try:
        gray = decode_grayscale(data, max_pixels=max_side * max_side)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        # the warning only arrives as an exception where warnings are errors (-W error, pytest here)
        raise invalid_image("png does not hold a PNG or JPEG image") from None
    except ValueError as exc:
        raise invalid_image(f"png: {exc}") from None
    except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for a corrupt PNG chunk while decoding
        raise invalid_image(f"png could not be decoded: {exc}") from None
    _check_side(*gray.shape, max_side)
    return gray


def decode_gray8(encoded: str, shape: list[int], max_side: int) -> np.ndarray:
    """Base64 of raw 8-bit gray levels, row by row, with their [height, width] -> a uint8 array."""
    height, width = shape
    _check_side(height, width, max_side)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_image("gray8 is not valid base64") from None
    if len(data) != height * width:
        raise invalid_image(f"gray8 holds {len(data)} bytes; shape {height}x{width} needs {height * width}")
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width)


INLINE_DECODE_CHARS = 16 * 1024  # a small PNG decodes faster than a hop to a worker thread takes


async def decode_png_async(encoded: str, max_side: int) -> np.ndarray:
    """``decode_png`` for a request handler: small images inline, large ones off the event loop."""
    if len(encoded) <= INLINE_DECODE_CHARS:
        return decode_png(encoded, max_side)
    return await anyio.to_thread.run_sync(decode_png, encoded, max_side)


def pixels_array(pixels: list[list[float]], max_side: int) -> np.ndarray:
    """A 2-D array of 0-255 gray levels, rectangular, finite and in range."""
    if not pixels or not pixels[0]:
        raise invalid_image("pixels is empty")
    width = len(pixels[0])
    _check_side(len(pixels), width, max_side)
    if any(len(row) != width for row in pixels):
        raise invalid_image("pixels rows differ in length; send a rectangular 2-D array")
    array = np.asarray(pixels, dtype=np.float64)  # checked before the cast: to float32, 1e300 overflows (and warns)
    if not (array.min() >= 0 and array.max() <= 255):  # False for NaN too, so one test passes every good image
        if not np.isfinite(array).all():
            raise invalid_image("pixels hold NaN or infinite values")
        raise invalid_image("pixels must be gray levels in [0, 255]")
    return array.astype(np.float32)


def to_model_input(gray: np.ndarray, image_size: int) -> torch.Tensor:
    """The shared preprocessing, as a float32 tensor [S, S]."""
    return torch.from_numpy(preprocess(gray, image_size))
