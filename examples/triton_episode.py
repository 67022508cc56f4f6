"""A tritonclient episode (Open Inference Protocol v2 with sequences), the one the README points to; the tests run it."""

import sys

import numpy as np
import tritonclient.http as httpclient
from PIL import Image, ImageDraw

client = httpclient.InferenceServerClient(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000")  # make serve


def glyph(kind: int, seed: int) -> np.ndarray:
    """A toy handwritten character: strokes fixed by kind, jittered by seed; dark ink on white, 0-255."""
    shape, jitter = np.random.default_rng(kind), np.random.default_rng(100 + 10 * kind + seed)
    image = Image.new("L", (105, 105), 255)
    for _ in range(3):
        points = shape.uniform(15, 90, size=(3, 2)) + jitter.normal(0, 2, size=(3, 2))
        ImageDraw.Draw(image).line([tuple(p) for p in points], fill=0, width=4)
    return np.asarray(image)


def step(image: np.ndarray, label: int | None = None, start: bool = False, end: bool = False) -> np.ndarray:
    """One step of sequence 42: P(label 0..4) for the image, predicted before its label (if any) is learned."""
    inputs = [httpclient.InferInput("IMAGE", list(image.shape), "UINT8")]
    inputs[0].set_data_from_numpy(image)
    if label is not None:
        inputs.append(httpclient.InferInput("LABEL", [1], "INT32"))
        inputs[1].set_data_from_numpy(np.array([label], dtype=np.int32))
    result = client.infer("default", inputs, sequence_id=42, sequence_start=start, sequence_end=end)
    return result.as_numpy("PROBABILITIES")[0]


for seed in range(2):  # show each of 5 characters twice, with its label
    for label in range(5):
        step(glyph(label, seed), label, start=seed == 0 and label == 0)
probabilities = step(glyph(3, seed=9), end=True)  # a new drawing of character 3, no label: a query
print(probabilities.round(3), "->", probabilities.argmax())
