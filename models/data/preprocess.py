"""The one preprocessing function, shared by training, evaluation and serving.

Input: a grayscale image with dark strokes on a light background, values 0-255 (a decoded
Omniglot PNG, an uploaded PNG or JPEG, or a client's pixel array). Output: a float32
[size, size] array with strokes near 1.0 and background near 0.0.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Pillow's decompression-bomb guard stays on; callers may lower it further.
MAX_DECODE_PIXELS = 4096 * 4096


IMAGE_FORMATS = ("PNG", "JPEG")


def decode_grayscale(data: bytes, max_pixels: int = MAX_DECODE_PIXELS) -> np.ndarray:
    """Decode PNG or JPEG bytes to a uint8 [H, W] array of 0-255 gray levels.

    The size is checked from the header before any pixel is decoded; transparency is
    composited onto white, since a transparent background means "no ink".
    """
    with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"image has {width}x{height} pixels, more than {max_pixels}")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        gray = image if image.mode == "L" else image.convert("L")
        return np.frombuffer(gray.tobytes(), dtype=np.uint8).reshape(height, width)


def check_gray(gray: np.ndarray) -> np.ndarray:
    """A non-empty 2-D array of finite gray levels in [0, 255], else ValueError. 8-bit levels always are."""
    array = np.asarray(gray)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"expected a non-empty 2-D gray image, got shape {array.shape}")
    if array.dtype != np.uint8 and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 255):
        raise ValueError("gray levels must be finite numbers in [0, 255]")
    return array


def fit_size(gray: np.ndarray, size: int) -> np.ndarray:
    """Checked gray levels [H, W] -> gray levels [size, size]: uint8 when the input is 8-bit at that size, else float32.

    Resizing uses Pillow's antialiasing bilinear filter on the float image (its support
    widens with the downscale factor, so thin strokes are averaged rather than dropped).
    """
    if gray.dtype == np.uint8 and gray.shape == (size, size):
        return gray
    array = np.asarray(gray, dtype=np.float32)
    if array.shape != (size, size):
        image = Image.fromarray(array, mode="F").resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32)
    return array


def _ink(levels: np.ndarray) -> np.ndarray:
    """float32 gray levels 0-255 -> ink: 1 - level / 255, clipped to [0, 1]."""
    return np.clip(1.0 - levels / 255.0, 0.0, 1.0)


_INK_OF_UINT8 = _ink(np.arange(256, dtype=np.float32))  # the ink of each 8-bit level, by the same arithmetic


def ink(levels: np.ndarray) -> np.ndarray:
    """Gray levels (uint8 or float32, any shape: one image or a stack) -> float32 ink, strokes 1, background 0.

    8-bit levels take a table lookup of the same arithmetic (the same values, a fifth of the
    time), so a stack mixing both kinds gives each image what it would get alone.
    """
    if levels.dtype == np.uint8:
        return _INK_OF_UINT8[levels]
    return _ink(np.asarray(levels, dtype=np.float32))


def preprocess(gray: np.ndarray, size: int) -> np.ndarray:
    """Gray levels [H, W] in 0-255, dark on light -> float32 [size, size], strokes 1, background 0.

    ``ink(fit_size(check_gray(gray), size))``. The service runs the same three steps, the
    last on the model's thread over a whole batch at once (``service.batching``).
    """
    return ink(fit_size(check_gray(gray), size))
