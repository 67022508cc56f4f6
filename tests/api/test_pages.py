"""The browser-facing routes without a browser: the index, the demo's files, the self-hosted docs, /v1/preprocess."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.data.preprocess import preprocess
from service.api.docs import ASSETS_DIR
from tests.api.support import api_settings, app_client, assert_error, png_base64, random_pixels, running_app

pytestmark = pytest.mark.anyio
DEMO_FILES = ("index.html", "demo.js", "demo.css")


async def test_the_index_links_to_the_demo_and_the_docs(client: httpx.AsyncClient) -> None:
    as_json = await client.get("/")
    assert as_json.status_code == 200
    links = as_json.json()["links"]
    assert links["demo"] == "demo/" and links["docs"] == "docs"
    as_page = await client.get("/", headers={"accept": "text/html,application/xhtml+xml"})
    assert as_page.headers["content-type"].startswith("text/html")
    assert "href='demo/'" in as_page.text and "href='docs'" in as_page.text
    for href in links.values():  # every link answers
        assert (await client.get("/" + href, follow_redirects=True)).status_code == 200, href


async def test_the_demo_is_served_with_its_files(client: httpx.AsyncClient) -> None:
    redirect = await client.get("/demo")
    assert redirect.status_code == 308 and redirect.headers["location"] == "demo/"
    page = await client.get("/demo/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in DEMO_FILES[1:]:
        assert f'"{name}"' in page.text, f"the page loads {name}"
        asset = await client.get(f"/demo/{name}")
        assert asset.status_code == 200 and asset.content, name
    assert (await client.get("/demo/missing.js")).status_code == 404


async def test_the_demo_uses_nothing_but_this_server() -> None:
    """No URL with a host in the demo's files: everything it loads or calls is relative to the page."""
    folder = Path(__file__).resolve().parents[2] / "service" / "static" / "demo"
    for name in DEMO_FILES:
        text = (folder / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name


async def test_the_docs_pages_load_their_assets_from_the_service(client: httpx.AsyncClient) -> None:
    for page_path in ("/docs", "/redoc"):
        page = await client.get(page_path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in page.text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
        assert assets, page_path
        for url in assets:
            assert url.startswith("/docs-assets/"), f"{page_path} loads {url}"
            asset = await client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"} <= {p.name for p in ASSETS_DIR.iterdir()}


async def test_docs_urls_follow_the_root_path(tiny_checkpoint: Path) -> None:
    """Behind a proxy serving the app under a prefix, the docs' URLs carry that prefix."""
    async with running_app(api_settings(tiny_checkpoint)) as (app, _):
        transport = httpx.ASGITransport(app=app, root_path="/ntm")  # as uvicorn --root-path sets it in every scope
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            page = await client.get("/ntm/docs")
    assert page.status_code == 200, page.text
    assert "/ntm/openapi.json" in page.text and "/ntm/docs-assets/swagger-ui-bundle.js" in page.text


# ----------------------------------------------------------------------------------- /v1/preprocess


def gray8_base64(gray: np.ndarray) -> str:
    return base64.b64encode(np.asarray(gray, dtype=np.uint8).tobytes()).decode()


async def test_preprocess_answers_the_model_input_of_every_image_form(client: httpx.AsyncClient) -> None:
    gray = np.asarray(random_pixels(7, height=40, width=33), dtype=np.uint8)
    expected = preprocess(gray, 28)
    forms = [
        {"pixels": gray.tolist()},
        {"png": png_base64(gray)},
        {"gray8": gray8_base64(gray), "shape": [40, 33]},
    ]
    for image in forms:
        response = await client.post("/v1/preprocess", json={"image": image})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "tiny" and body["size"] == 28
        ink = np.array(body["ink"], dtype=np.float32)
        assert ink.shape == (28, 28)
        np.testing.assert_array_equal(ink, expected)  # float32 survives JSON exactly
    named = await client.post("/v1/preprocess", json={"image": forms[0], "model": "default"})
    assert named.status_code == 200 and named.json()["model"] == "default"


async def test_preprocess_refuses_what_a_step_refuses(client: httpx.AsyncClient) -> None:
    unknown = await client.post("/v1/preprocess", json={"image": {"pixels": [[0]]}, "model": "nope"})
    assert_error(unknown, 404, "model_not_found")
    level = await client.post("/v1/preprocess", json={"image": {"pixels": [[0, 300]]}})
    assert "image.pixels[0][1]" in assert_error(level, 422, "invalid_image")["message"]
    not_png = await client.post("/v1/preprocess", json={"image": {"png": base64.b64encode(b"nope").decode()}})
    assert_error(not_png, 422, "invalid_image")
    too_big = await client.post("/v1/preprocess", json={"image": {"gray8": "AA==", "shape": [1, 513]}})
    assert_error(too_big, 422, "invalid_image")
    no_image = await client.post("/v1/preprocess", json={})
    assert_error(no_image, 422, "invalid_request")


async def test_preprocess_needs_an_api_key_when_keys_are_on(tiny_checkpoint: Path) -> None:
    async with app_client(api_settings(tiny_checkpoint, api_keys=["k1"])) as client:
        body = {"image": {"pixels": [[0, 255]]}}
        assert_error(await client.post("/v1/preprocess", json=body), 401, "unauthorized")
        keyed = await client.post("/v1/preprocess", json=body, headers={"authorization": "Bearer k1"})
        assert keyed.status_code == 200, keyed.text
        assert (await client.get("/demo/")).status_code == 200, "the page itself stays open: it asks for the key"
