"""The pages a person opens in a browser: an index at ``/`` and the drawing demo at ``/demo/``.

The demo is plain HTML, CSS and JavaScript shipped in the package (``service/static/demo``),
with no build step and nothing fetched from elsewhere. It is a client of the public /v1 API
like any other (sessions, steps, predict, preprocess), so it shows what the API does and
needs no route of its own beyond serving its files.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

DEMO_DIR = Path(__file__).resolve().parent.parent / "static" / "demo"

# Relative to the index, so that they hold behind a proxy that serves the service under a prefix.
LINKS = {
    "demo": ("demo/", "draw characters, teach them, ask"),
    "docs": ("docs", "the API, to try in the browser (Swagger UI)"),
    "redoc": ("redoc", "the API reference (ReDoc)"),
    "openapi": ("openapi.json", "the OpenAPI document"),
    "models": ("v1/models", "the served models"),
    "health": ("healthz", "liveness"),
}

INDEX_HTML = (
    "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
    "<meta name='viewport' content='width=device-width, initial-scale=1'><link rel='icon' href='data:,'>"
    "<title>ntm-fewshot</title></head><body style='font-family: system-ui, sans-serif; margin: 2rem'>"
    "<h1>ntm-fewshot</h1><p>Few-shot character recognition by a Neural Turing Machine.</p><ul>"
    + "".join(f"<li><a href='{href}'>{name}</a>: {what}</li>" for name, (href, what) in LINKS.items())
    + "</ul></body></html>"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: Request) -> Response:
    """Links to the demo and the docs: a page for a browser, JSON for any other client (curl, scripts)."""
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(INDEX_HTML)
    return JSONResponse({"service": "ntm-fewshot", "links": {name: href for name, (href, _) in LINKS.items()}})


@router.get("/demo")
async def demo_without_slash() -> RedirectResponse:
    """To ``/demo/``, where the page's relative links to its files and to the API resolve."""
    return RedirectResponse("demo/", status_code=308)


def install_demo(app: FastAPI) -> None:
    """The index, and the demo's files at /demo/ (index.html for the folder itself)."""
    app.include_router(router)
    app.mount("/demo", StaticFiles(directory=DEMO_DIR, html=True), name="demo")
