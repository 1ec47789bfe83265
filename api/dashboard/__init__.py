"""The dashboard: a page served by the API itself at `/`, with its scripts under `/ui/`.

Plain HTML, CSS and JavaScript modules (no build step, no library, no CDN): the page signs
in with an API key kept in the tab's sessionStorage and calls the same routes as any other
client, so it shows the key's team only. Charts are SVG drawn by the page's own code.

Every response of the page carries a Content-Security-Policy that allows scripts, styles
and requests from this origin only: text from a job or a file (a name, an error, a model's
answer) is put in the page as text, and a policy that forbids inline script is a second
wall behind that.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
PREFIX = "/ui"

SECURITY_HEADERS = {
    # connect-src 'self' covers the API; downloads from S3 are navigations, not fetches.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def install(app: FastAPI) -> None:
    """Serve the page at `/` (and `/ui`), its files under `/ui/`."""

    @app.get("/", include_in_schema=False)
    def dashboard() -> Response:
        # no-cache: a new deployment's page is fetched again (its scripts are revalidated).
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    @app.get(PREFIX, include_in_schema=False)
    def dashboard_alias() -> Response:
        return RedirectResponse("/", status_code=307)

    app.mount(PREFIX, _PageFiles(directory=STATIC), name="dashboard")


class _PageFiles(StaticFiles):
    """The page's files, with its security headers (not a middleware: every API request
    would pay for it)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = "no-cache"
        return response
