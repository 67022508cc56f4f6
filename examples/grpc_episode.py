"""The README's tritonclient.grpc episode: the Open Inference Protocol over gRPC, unary then streaming; the tests run it."""

import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw

client = grpcclient.InferenceServerClient(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8001")  # make serve


def glyph(kind: int, seed: int) -> np.ndarray:
    """A toy handwritten character: strokes fixed by kind, jittered by seed; dark ink on white, 0-255."""
    shape, jitter = np.random.default_rng(kind), np.random.default_rng(100 + 10 * kind + seed)
    image = Image.new("L", (105, 105), 255)
    for _ in range(3):
        points = shape.uniform(15, 90, size=(3, 2)) + jitter.normal(0, 2, size=(3, 2))
        ImageDraw.Draw(image).line([tuple(p) for p in points], fill=0, width=4)
    return np.asarray(image)


def tensors(image: np.ndarray, label: int | None) -> list[grpcclient.InferInput]:
    """IMAGE (UINT8 [H, W]) and, when known, its LABEL (INT32 [1])."""
    inputs = [grpcclient.InferInput("IMAGE", list(image.shape), "UINT8")]
    inputs[0].set_data_from_numpy(image)
    if label is not None:
        inputs.append(grpcclient.InferInput("LABEL", [1], "INT32"))
        inputs[1].set_data_from_numpy(np.array([label], dtype=np.int32))
    return inputs


# Each of 5 characters twice, with its label, then a new drawing of character 3 with none: a query.
steps = [(glyph(label, seed), label) for seed in range(2) for label in range(5)] + [(glyph(3, seed=9), None)]

# Unary: one ModelInfer call a step, sequence 42.
for t, (image, label) in enumerate(steps):
    result = client.infer(
        "default", tensors(image, label), sequence_id=42, sequence_start=t == 0, sequence_end=t == len(steps) - 1
    )
unary = result.as_numpy("PROBABILITIES")[0]
print("unary: ", unary.round(3), "->", unary.argmax())

# Streaming: the same episode as sequence 43 over one ModelStreamInfer stream; a sequence's answers come in order.
answers: queue.Queue = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
for t, (image, label) in enumerate(steps):
    client.async_stream_infer(
        "default", tensors(image, label), sequence_id=43, sequence_start=t == 0, sequence_end=t == len(steps) - 1
    )
for _ in steps:
    result, error = answers.get(timeout=60)
    if error is not None:
        raise SystemExit(f"step failed: {error}")
client.stop_stream()
streamed = result.as_numpy("PROBABILITIES")[0]
print("stream:", streamed.round(3), "->", streamed.argmax())
