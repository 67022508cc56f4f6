"""A complete few-shot episode against a running service, in a few lines of httpx.

Usage: python examples/episode.py [BASE_URL]   (default http://127.0.0.1:8000)

It draws three made-up "characters" (letters in Pillow's built-in font, each drawing
jittered), teaches the session one labeled example of each, then asks it to recognise new
drawings it has not seen.
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
    steps = client.post(
        f"/v1/sessions/{session}/steps",
        json={"steps": [{"image": {"png": drawing(c, seed)}, "label": c} for seed, c in enumerate("XOT")]},
    ).json()["results"]
    for c in "XOT":
        result = client.post(f"/v1/sessions/{session}/steps", json={"image": {"png": drawing(c, 100 + ord(c))}}).json()
        best = max(result["probabilities"])
        print(f"drew {c!r}: model says {result['prediction']!r} (p={best:.2f}, novelty={result['novelty']:.2f})")
    print(client.get(f"/v1/sessions/{session}").json())
    client.delete(f"/v1/sessions/{session}")
