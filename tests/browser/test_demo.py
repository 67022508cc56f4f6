"""The /demo page in a real browser: drawn strokes, taught labels, the real model's answers, errors in words."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable

import httpx
import numpy as np
from playwright.sync_api import Page, Request, expect

from models.data.preprocess import decode_grayscale, preprocess
from tests.browser.conftest import API_KEY, DESKTOP, PHONE, Watched, save_screenshot
from tests.servers import ServerProcess

Strokes = list[list[tuple[float, float]]]  # points in [0, 1] of the pad's side, one list per stroke

RING: Strokes = [
    [(0.5 + 0.3 * math.cos(math.tau * k / 24), 0.5 + 0.3 * math.sin(math.tau * k / 24)) for k in range(25)]
]
CROSS: Strokes = [[(0.25, 0.25), (0.75, 0.75)], [(0.75, 0.25), (0.25, 0.75)]]
ZIGZAG: Strokes = [[(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]]
SHAPES = {"ring": RING, "cross": CROSS, "zigzag": ZIGZAG}


def on_pad(page: Page, point: tuple[float, float], scale: float, shift: tuple[float, float]) -> tuple[float, float]:
    """A point of a shape, scaled about the pad's centre and shifted, in the page's CSS pixels."""
    box = page.locator("#pad").bounding_box()
    assert box is not None
    x = 0.5 + (point[0] - 0.5) * scale + shift[0]
    y = 0.5 + (point[1] - 0.5) * scale + shift[1]
    return box["x"] + x * box["width"], box["y"] + y * box["height"]


def draw_with_mouse(page: Page, strokes: Strokes, scale: float = 1.0, shift: tuple[float, float] = (0, 0)) -> None:
    for stroke in strokes:
        page.mouse.move(*on_pad(page, stroke[0], scale, shift))
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*on_pad(page, point, scale, shift), steps=6)
        page.mouse.up()


def draw_with_finger(page: Page, strokes: Strokes, scale: float = 1.0, shift: tuple[float, float] = (0, 0)) -> None:
    """Real touch input (Chromium's, through the DevTools protocol): touch events, and the pointer events they make."""
    cdp = page.context.new_cdp_session(page)
    for stroke in strokes:
        x, y = on_pad(page, stroke[0], scale, shift)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
        for (x0, y0), (x1, y1) in zip(stroke, stroke[1:], strict=False):
            for t in np.linspace(0, 1, 4)[1:]:
                point = (x0 + t * (x1 - x0), y0 + t * (y1 - y0))
                x, y = on_pad(page, point, scale, shift)
                cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def wait_for_session(page: Page) -> str:
    expect(page.locator("#session-id")).to_contain_text("labels")
    return page.locator("#session-id").inner_text().split()[0]


def teach(page: Page, label: str, strokes: Strokes, draw: Callable[..., None] = draw_with_mouse) -> None:
    draw(page, strokes)
    page.fill("#label", label)
    page.click("#teach")
    expect(page.locator("#status")).to_contain_text(f"Taught “{label}”")


def ask(page: Page, strokes: Strokes, draw: Callable[..., None] = draw_with_mouse) -> None:
    page.click("#clear")
    draw(page, strokes, scale=0.9, shift=(0.04, -0.03))  # not the taught drawing: smaller, elsewhere on the pad
    page.click("#ask")
    expect(page.locator("#answer-kind")).to_have_text("The model answers:")


def thumbnail_levels(page: Page, label: str) -> np.ndarray:
    """The gray levels the page painted for a taught drawing's thumbnail, one per pixel of the canvas."""
    levels = page.evaluate(
        """(label) => {
            const canvas = document.querySelector(`.group[data-label="${label}"] canvas`);
            const rgba = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            return {size: canvas.width, red: Array.from(rgba.filter((_, i) => i % 4 === 0))};
        }""",
        label,
    )
    return np.array(levels["red"]).reshape(levels["size"], -1)


def no_errors(watched: Watched) -> None:
    assert watched.blocked == [], f"requests to other hosts: {watched.blocked}"
    assert watched.page_errors == [], watched.page_errors
    assert watched.console_errors == [], watched.console_errors


def test_taught_drawings_are_recognised_and_shown_as_the_model_saw_them(demo_server: ServerProcess, open_page) -> None:
    watched = open_page(f"{demo_server.url}/demo/", viewport=DESKTOP)
    page = watched.page
    sent: dict[str, str] = {}

    def note_step(request: Request) -> None:
        if request.url.endswith("/steps"):
            body = request.post_data_json
            sent[body["label"]] = body["image"]["png"]

    page.on("request", note_step)
    wait_for_session(page)
    for label, strokes in SHAPES.items():
        teach(page, label, strokes)
    expect(page.locator(".group h3")).to_have_text(list(SHAPES))

    ask(page, CROSS)
    expect(page.locator("#prediction")).to_have_text("It is “cross”")
    expect(page.locator("#bars li")).to_have_count(5)  # one bar per slot of the 5-way model
    expect(page.locator("#bars li.top .name")).to_have_text("cross")
    expect(page.locator("#novelty")).to_contain_text("Novelty")

    # Each thumbnail is the service's preprocessing of the very PNG the page sent, pixel for pixel.
    assert sorted(sent) == sorted(SHAPES)
    for label, png in sent.items():
        ink = preprocess(decode_grayscale(base64.b64decode(png)), 28).astype(np.float64)
        assert ink.max() > 0.5, "the drawing reached the model"
        np.testing.assert_array_equal(thumbnail_levels(page, label), np.floor(255 * (1 - ink) + 0.5))

    save_screenshot(page, "demo-desktop.png")
    no_errors(watched)


def test_a_finger_draws_at_phone_size(demo_server: ServerProcess, open_page) -> None:
    watched = open_page(f"{demo_server.url}/demo/", viewport=PHONE, has_touch=True, is_mobile=True)
    page = watched.page
    page.evaluate(
        "window.kinds = []; document.getElementById('pad')"
        ".addEventListener('pointerdown', (e) => window.kinds.push(e.pointerType))"
    )
    wait_for_session(page)
    teach(page, "ring", RING, draw_with_finger)
    teach(page, "zigzag", ZIGZAG, draw_with_finger)
    ask(page, RING, draw_with_finger)
    expect(page.locator("#prediction")).to_have_text("It is “ring”")
    assert set(page.evaluate("window.kinds")) == {"touch"}
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "nothing wider than the phone"
    save_screenshot(page, "demo-phone.png", full_page=False)  # what a 390x844 screen shows
    save_screenshot(page, "demo-phone-full.png")
    no_errors(watched)


def test_error_answers_are_shown_in_words(demo_server: ServerProcess, open_page) -> None:
    watched = open_page(f"{demo_server.url}/demo/")
    page = watched.page
    session = wait_for_session(page)
    for k in range(5):  # the model has 5 slots: five labels fill them
        teach(page, f"line {k}", [[(0.2, 0.2 + 0.15 * k), (0.8, 0.8 - 0.15 * k)]])
    draw_with_mouse(page, CROSS)
    page.fill("#label", "one too many")
    page.click("#teach")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("Every slot of this session already has a label")
    expect(page.locator("#error-text")).to_contain_text("422 too_many_labels")

    assert httpx.delete(f"{demo_server.url}/v1/sessions/{session}").status_code == 204  # as if it had expired
    page.click("#ask")
    expect(page.locator("#error-text")).to_contain_text("This session is gone")
    expect(page.locator("#error-text")).to_contain_text("404 session_not_found")
    page.click("#new-session")
    expect(page.locator("#session-id")).not_to_contain_text(session)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator(".group")).to_have_count(0)

    assert watched.blocked == [] and watched.page_errors == []
    # The browser itself logs each failed fetch; nothing else was logged as an error.
    assert [e for e in watched.console_errors if "status of 422" not in e and "status of 404" not in e] == []
    assert len(watched.console_errors) == 2


def test_with_api_keys_on_the_page_asks_for_one_and_sends_it(keyed_server: ServerProcess, open_page) -> None:
    watched = open_page(f"{keyed_server.url}/demo/")
    page = watched.page
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("401 unauthorized")
    page.fill("#api-key", "not-the-key")
    page.click("#key-panel button")
    expect(page.locator("#key-reason")).to_have_text("The server refused this API key: enter another.")

    authorizations: list[str | None] = []
    page.on("request", lambda request: authorizations.append(request.headers.get("authorization")))
    page.fill("#api-key", API_KEY)
    page.click("#key-panel button")
    wait_for_session(page)
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    teach(page, "ring", RING)
    expect(page.locator(".group h3")).to_have_text(["ring"])
    assert authorizations and set(authorizations) == {f"Bearer {API_KEY}"}
    assert watched.blocked == [] and watched.page_errors == []
