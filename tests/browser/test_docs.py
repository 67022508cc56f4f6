"""/docs and /redoc with no network but this machine: every script and style comes from the service."""

from __future__ import annotations

import time

from playwright.sync_api import expect

from tests.servers import ServerProcess

REDOC_LOGO = "image https://cdn.redoc.ly/redoc/logo-mini.svg"


def test_swagger_ui_lists_the_operations_and_runs_one_offline(demo_server: ServerProcess, open_page) -> None:
    watched = open_page(f"{demo_server.url}/docs")
    page = watched.page
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    paths = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/v1/sessions", "/v1/sessions/{session_id}/steps", "/v1/preprocess", "/healthz"} <= paths

    create = page.locator("#operations-v1-create_session_v1_sessions_post")
    create.locator(".opblock-summary").click()
    create.get_by_role("button", name="Try it out").click()
    create.get_by_role("button", name="Execute").click()
    status = create.locator(".live-responses-table tbody .response-col_status")
    expect(status).to_have_text("201")
    expect(create.locator(".live-responses-table tbody .response-col_description")).to_contain_text("session_id")

    assert watched.blocked == [], f"the docs reached for other hosts: {watched.blocked}"
    assert watched.page_errors == [] and watched.console_errors == []


def test_redoc_renders_offline(demo_server: ServerProcess, open_page) -> None:
    watched = open_page(f"{demo_server.url}/redoc")
    page = watched.page
    expect(page.locator("h2", has_text="Open a session (a fresh episode)")).to_be_visible()
    expect(page.locator("h2", has_text="An image as a model's input")).to_be_visible()
    page.wait_for_load_state("networkidle")
    # ReDoc's one request elsewhere: its attribution logo, an image that hides itself when it cannot load
    # (the browser logs the aborted request; nothing else is logged).
    assert set(watched.blocked) <= {REDOC_LOGO}, f"ReDoc reached for other hosts: {watched.blocked}"
    assert watched.page_errors == []
    # The aborted request's console line reaches Playwright after the abort itself: let it arrive.
    deadline = time.monotonic() + 10
    while len(watched.console_errors) < len(watched.blocked) and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    assert watched.console_errors == ["Failed to load resource: net::ERR_FAILED"] * len(watched.blocked)


def test_the_index_links_to_the_demo_and_the_docs(demo_server: ServerProcess, open_page) -> None:
    watched = open_page(f"{demo_server.url}/")
    page = watched.page
    page.get_by_role("link", name="demo").click()
    expect(page).to_have_url(f"{demo_server.url}/demo/")
    expect(page.locator("h1")).to_have_text("Draw, teach, ask")
    page.get_by_role("link", name="API docs").click()
    expect(page).to_have_url(f"{demo_server.url}/docs")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    assert watched.blocked == [] and watched.page_errors == []
