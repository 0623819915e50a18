"""The web pages: ``/`` (buyers), ``/sell`` (sellers), ``/review`` (operators' review
queue: the same URL as the API's ``GET /review``, which answers a browser's navigation, whose
Accept names HTML, with the page) and ``/status`` (operators' panel).

Server-rendered shells (Jinja2 templates in ``services/templates``) and one small script
(``services/static/vitrine.js``, no framework, nothing from a CDN). The pages hold no data
of their own: the script reads and writes through the public API (``/search``,
``/classify``, ``/listings``, ``/review``, ``/categories``, ``/stats``), so the pages need
exactly the keys the API needs, sent as ``X-API-Key`` (typed once, kept in the tab's
sessionStorage); the templates say which keys the service is configured with, so a page
asks for one before the first refusal.
Photos load as plain ``<img>`` without a read key, through ``fetch`` with one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from indexer.settings import Settings

HERE = Path(__file__).parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
# No inline script or style, nothing from another origin; photos as blob: when a read key
# is needed (fetched with the header), as data: for a dropped photo's preview.
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def render(app: FastAPI, settings: Settings, name: str, title: str,
           request: Request) -> HTMLResponse:
    """The page ``name`` (``templates/{name}.html``) with its security headers."""
    ctx: dict[str, Any] = {
        "title": title, "page": name,
        "root": request.scope.get("root_path", "").rstrip("/"),
        "read_key": bool(settings.read_api_key),
        "write_key": bool(settings.api_key),
        "docs": app.openapi_url is not None,
    }
    r = TEMPLATES.TemplateResponse(request, f"{name}.html", ctx)
    r.headers["Content-Security-Policy"] = CSP
    r.headers["X-Content-Type-Options"] = "nosniff"
    return r


def wants_html(request: Request) -> bool:
    """A browser navigating to the URL (its Accept names HTML), not a script's ``fetch``."""
    return "text/html" in request.headers.get("accept", "")


def mount_pages(app: FastAPI, settings: Settings) -> None:
    """The pages; ``/review`` is the API's route, which answers a browser with the page."""
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def buyer(request: Request) -> HTMLResponse:
        return render(app, settings, "buyer", "Find products", request)

    @app.get("/sell", include_in_schema=False, response_class=HTMLResponse)
    def sell(request: Request) -> HTMLResponse:
        return render(app, settings, "sell", "Sell a product", request)

    @app.get("/status", include_in_schema=False, response_class=HTMLResponse)
    def status(request: Request) -> HTMLResponse:
        return render(app, settings, "status", "Service status", request)
