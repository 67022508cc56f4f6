"""Enroll, then classify: teach a session a few labeled drawings once, then classify many images
against it read-only, and keep what it learned as a snapshot.

Usage: python examples/enroll.py [BASE_URL]   (default http://127.0.0.1:8000)

The predictions leave the session as it was, so they can run in parallel and in any number;
the snapshot restores the taught session in any replica serving the same weights.
"""

import base64
import io
import random
import sys

import httpx
from PIL import Image, ImageDraw, ImageFont


def drawing(char: str, seed: int) -> str:
    """A dark character on white paper, jittered per drawing, as base64 PNG."""
    rng = random.Random(seed)
    image = Image.new("L", (64, 64), 255)
    font = ImageFont.load_default(size=40)
    ImageDraw.Draw(image).text((14 + rng.randint(-3, 3), 6 + rng.randint(-3, 3)), char, fill=0, font=font)
    image = image.rotate(rng.uniform(-8, 8), fillcolor=255)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
with httpx.Client(base_url=base, timeout=30) as client:
    session = client.post("/v1/sessions", json={}).json()["session_id"]
    teach = [{"image": {"png": drawing(c, seed)}, "label": c} for seed, c in enumerate("XOTXOT")]
    client.post(f"/v1/sessions/{session}/steps", json={"steps": teach})  # two drawings of each, one request

    queries = [(c, drawing(c, 1000 + i)) for i, c in enumerate("XOTOXT")]
    answer = client.post(f"/v1/sessions/{session}/predict", json={"images": [{"png": png} for _, png in queries]})
    for (drawn, _), result in zip(queries, answer.json()["results"], strict=True):
        print(f"drew {drawn!r}: model says {result['prediction']!r} (novelty {result['novelty']:.2f})")
    print("steps after the predictions:", answer.json()["steps"])

    snapshot = client.get(f"/v1/sessions/{session}/snapshot").content  # keep it: a file, a bucket, a database
    restored = client.post("/v1/sessions", json={"snapshot": base64.b64encode(snapshot).decode()}).json()
    again = client.post(f"/v1/sessions/{restored['session_id']}/predict", json={"images": [{"png": queries[0][1]}]})
    print(f"restored session {restored['session_id']} says {again.json()['results'][0]['prediction']!r}")
