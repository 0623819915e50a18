"""The HTTP API: thin routes over :class:`~indexer.runtime.Runtime` (see docs/service.md).

Blocking work never runs on the event loop. Queries (``/search``, ``/classify``: an index
search, and for text or a photo a forward pass) run in a small pool of ``cores`` query
threads, each forward pass on one torch thread and each FAISS search on one OpenMP thread
(single queries gain nothing from intra-op threads and lose a lot when a core is busy), and
their answers are serialised once, by pydantic-core, straight to JSON bytes. The other
blocking routes are sync functions, which FastAPI runs in its thread pool.

The API faces the public internet (docs/service.md, "Security"): bodies are read with a
per-route size limit and parsed off the event loop (:mod:`services.bodies`), domain errors
map to HTTP errors in one place with the bodies the OpenAPI schema declares, and no error
carries a traceback or an internal address.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import importlib.resources
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from indexer.catalog import (
    ID_PATTERN,
    MAX_DESCRIPTION_CHARS,
    MAX_ID_CHARS,
    MAX_TITLE_CHARS,
    make_listing,
)
from indexer.errors import (
    IndexMismatch,
    InvalidInput,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    VersionConflict,
    VitrineError,
)
from indexer.filters import category_filter
from indexer.index import VectorView
from indexer.knn import Neighbour, PathStop, UncertainReason
from indexer.remote import MAX_URL_LENGTH, check_url, url_policy
from indexer.review import taxonomy
from indexer.runtime import BACKLOG_RETRY_AFTER, Runtime
from indexer.settings import Settings
from indexer.state import StoreUnavailable
from indexer.state.model import REVIEW_REASONS, STATUSES
from indexer.thumbs import THUMB_TYPE

from .bodies import (
    FieldError,
    Parsed,
    Problem,
    UnsupportedMediaType,
    body,
    decode_photo,
    validate_photo,
)
from .web import mount_pages, render, wants_html

log = logging.getLogger(__name__)
T = TypeVar("T")

ListingId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN,
                                 description="Letters, digits and . _ : - ; starts with a "
                                 "letter or digit")]
MAX_QUERY_TEXT = 10_000
MAX_MORE_LIKE = 50  # listing_ids of one "more like these" search


# --- schemas ------------------------------------------------------------------------------
class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListingIn(_In):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "sku-1042", "title": "Titan analog wrist watch for men",
         "description": "Stainless steel strap, water resistant to 50 m",
         "image_url": "https://images.example.com/sku-1042.jpg", "category": "Watches"},
    ]})

    id: ListingId
    title: str = Field(max_length=MAX_TITLE_CHARS)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    image_base64: str | None = Field(None, description="The photo (JPEG, PNG, WebP...), "
                                     "base64; or send it as the multipart file `image`")
    image_url: str | None = Field(None, max_length=MAX_URL_LENGTH, description="A public "
                                  "http(s) URL the workers download the photo from")
    category: str | None = Field(None, max_length=MAX_TITLE_CHARS,
                                 description="The seller's label, optional.")


class Accepted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    version: int = Field(description="The version this write got: it only grows per store, "
                         "and the latest accepted write of a listing is the one that counts")
    status_url: str


Source = Literal["seller", "predicted", "confirmed", "unconfirmed"]
SOURCES = set(Source.__args__)  # type: ignore[attr-defined]
ReviewReason = Literal["mislabel", "uncertain", "unknown_category", "duplicate"]
assert set(REVIEW_REASONS) == set(ReviewReason.__args__)  # type: ignore[attr-defined]
MAX_LEVELS = 12


class Duplicate(BaseModel):
    id: str
    score: float = Field(description="Fused similarity to it")
    same_photo: bool = Field(description="Its thumbnail is the same image")


class Correction(BaseModel):
    by: str = Field(description="The `reviewer` the write named (`operator` when none)")
    at: str = Field(description="When (UTC, ISO 8601)")
    category_path: list[str] = Field(description="The path it set")
    previous: dict[str, Any] = Field(description="`category`, `category_path` and `source` "
                                     "before it")


class ListingStatus(BaseModel):
    id: str
    status: Literal["queued", "indexed", "failed"]
    version: int = Field(0, description="Version of the write this status is about (0: a "
                         "listing of the seeded catalog)")
    title: str | None = Field(None, description="The indexed listing's title")
    photo_url: str | None = Field(None, description="Its thumbnail (GET, same key as this "
                                  "read), when it was indexed with a usable photo")
    category: str | None = None
    category_path: list[str] | None = Field(None, description="The category's levels, "
                                            "first level first (`category` is the first)")
    path_confidence: list[float] | None = Field(None, description="Per level of "
                                                "`category_path`: see ClassifyOut")
    confidence: float | None = None
    uncertain: bool | None = None
    uncertain_reason: UncertainReason | None = None
    source: Source | None = Field(None, description=(
        "Where `category` comes from: `seller` (a label in the taxonomy: it votes), "
        "`unconfirmed` (a seller's category not in the taxonomy: it does not vote until an "
        "operator accepts it), `confirmed` (set or accepted by an operator: it votes), "
        "`predicted` (the vote's)"))
    error: str | None = None
    warning: str | None = None
    duplicates: list[Duplicate] | None = Field(None, description=(
        "Indexed listings near-identical to this one when it was indexed (same photo, or "
        "fused similarity over the catalog's duplicate threshold), closest first"))
    review: list[ReviewReason] | None = Field(None, description=(
        "Why it waits in the review queue (GET /review); absent once an operator set its "
        "category"))
    corrections: list[Correction] | None = Field(None, description=(
        "Operators' category writes, oldest first (PUT /listings/{id}/category); kept "
        "when the listing is posted again"))


class Deleted(BaseModel):
    id: str
    deleted: Literal[True] = True
    version: int = Field(description="The version of the delete (a tombstone in the log)")


class SearchIn(_In):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"text": "analog wrist watch for men", "k": 5},
        {"listing_id": "sku-1042", "k": 5, "category": "Watches"},
    ]})

    text: str | None = Field(None, max_length=MAX_QUERY_TEXT)
    image_base64: str | None = Field(None, description="A photo to search with, base64; or "
                                     "send it as the multipart file `image`")
    listing_id: ListingId | None = Field(None, description="Search with an indexed listing")
    k: int = Field(10, ge=1, le=1000)
    category: str | None = Field(None, max_length=MAX_TITLE_CHARS, description=(
        "Only listings under this category, any level of the path, whatever the case: "
        "`watches`, `Bed Linen`, or a path from its first level, `Home Furnishing >> Bed "
        "Linen`. A first-level name is applied inside the index search; a deeper level is "
        "checked on the 1000 nearest listings at most"))
    min_score: float | None = Field(None, ge=-1, le=1, description="Only results scoring "
                                    "at least this (fewer than `k` then)")
    listing_ids: list[ListingId] | None = Field(None, min_length=1, max_length=MAX_MORE_LIKE,
                                                description="More like these indexed "
                                                "listings (all of them at once; they are "
                                                "left out of the results)")
    text_weight: float | None = Field(None, ge=0, le=10, description=(
        "How much the words count in this query, relative to the index's weight (1: as "
        "configured, 0: not at all); with `image_weight`, a query by text and photo "
        "leans on either"))
    image_weight: float | None = Field(None, ge=0, le=10, description="How much the photo "
                                       "counts in this query (see `text_weight`)")


class Hit(BaseModel):
    id: str
    score: float = Field(description="Similarity, weighted mean cosine of the modalities "
                         "(higher is closer; at most 1)")
    category: str | None
    title: str
    category_path: list[str] = Field(default_factory=list, description=(
        "The category path: the catalog's or seller's labelled levels, or for a listing "
        "whose category was predicted, the predicted path"))
    photo_url: str | None = Field(None, description="Its thumbnail, when it has one")


class SearchOut(BaseModel):
    results: list[Hit]


class CategoryIn(_In):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"category_path": ["Watches", "Wrist Watches"], "version": 12, "reviewer": "ana"},
    ]})

    category_path: list[Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS)]] = \
        Field(min_length=1, max_length=MAX_LEVELS, description="The category path, first "
              "level first: the listing's current one confirms it, another corrects it")
    version: int = Field(ge=0, description="The listing's `version` as the operator saw it "
                         "(its status, or its review entry): the write is refused with 409 "
                         "if the listing changed since")
    reviewer: str | None = Field(None, min_length=1, max_length=100,
                                 description="Who decides, recorded with the correction")


class ReviewItem(BaseModel):
    id: str
    version: int = Field(description="Send it back with PUT /listings/{id}/category")
    title: str | None
    photo_url: str | None
    category: str | None = Field(description="The listing's category now (the seller's "
                                 "when it gave one)")
    category_path: list[str]
    source: Source | None
    predicted_path: list[str] = Field(description="The path the neighbours vote for")
    confidence: float | None = Field(description="The vote's calibrated confidence")
    uncertain_reason: UncertainReason | None = None
    reasons: list[ReviewReason]
    neighbours: list[Hit] = Field(description="The labelled neighbours behind the vote")
    duplicates: list[Hit] = Field(description="Near-identical indexed listings (score: "
                                  "fused similarity)")
    same_photo: list[str] = Field(description="Those of `duplicates` with the same photo")


class ReviewPage(BaseModel):
    total: int = Field(description="Entries in the queue (under `reason`, when given)")
    offset: int
    limit: int
    items: list[ReviewItem]


class CategoryCount(BaseModel):
    path: list[str]
    count: int = Field(description="Labelled listings under this path")


class CategoriesOut(BaseModel):
    categories: list[CategoryCount] = Field(description="The taxonomy: every path the "
                                            "labelled listings have, and each of its "
                                            "prefixes, in path order")
    unconfirmed: dict[str, int] = Field(description="Sellers' categories not in the "
                                        "taxonomy, waiting for an operator, with their "
                                        "listings")


class ListingRow(BaseModel):
    id: str
    status: Literal["queued", "indexed", "failed"]
    version: int
    title: str | None = None
    category: str | None = None
    category_path: list[str] = Field(default_factory=list)
    source: Source | None = None
    confidence: float | None = None
    uncertain: bool | None = None
    error: str | None = None


class ListingsPage(BaseModel):
    total: int = Field(description="Listings that pass the filters")
    offset: int
    limit: int
    items: list[ListingRow]
    next: str | None = Field(None, description="The cursor of the next page (`after`); "
                             "none when this page is the last")


class ClassifyIn(_In):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"title": "Cotton double bedsheet with 2 pillow covers",
         "description": "Floral print, 100% cotton"},
    ]})

    title: str = Field(max_length=MAX_TITLE_CHARS)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    image_base64: str | None = Field(None, description="The photo, base64; or send it as "
                                     "the multipart file `image`")


class ClassifyOut(BaseModel):
    category: str | None = Field(description="The first level of the category path")
    confidence: float = Field(description="Calibrated probability that `category` is right "
                              "(measured on the catalog when the index was built)")
    uncertain: bool
    uncertain_reason: UncertainReason | None = Field(None, description=(
        "Why `uncertain`: `out_of_catalog` (farther from every listing of the voted "
        "category than listings of that category usually are from each other), "
        "`low_confidence` (confidence under VITRINE_UNCERTAIN_BELOW) or `no_neighbours`"))
    category_path: list[str] = Field(description="The category path, as deep as the "
                                     "neighbours agree (the first level is `category`)")
    path_confidence: list[float] = Field(description="Per level: the first is "
                                         "`confidence`; a deeper one is its share of the "
                                         "vote among the neighbours under the level above")
    path_stopped: PathStop | None = Field(None, description=(
        "Why the path goes no deeper: `leaf` (the neighbours' paths end there), "
        "`disagreement` (no level below has a majority) or `unknown_below` (no neighbour "
        "knows a deeper level)"))
    scores: dict[str, float] = Field(description="First-level vote shares (uncalibrated)")
    neighbours: list[Hit]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    problems: list[str] = Field(description="Why the process is degraded (empty when ok)")
    mode: Literal["embedded", "redis"]
    index_size: int
    models_loaded: bool
    pending: int | None = Field(None, description="Accepted listings not indexed yet")
    log_position: int = Field(description="Log entries this process's index has applied")
    lag: int | None = Field(None, description="Log entries not applied here yet")
    digest: str = Field(description="Digest of the (id, version) pairs this process holds: "
                        "processes that agree have the same")


class Stats(BaseModel):
    """The numbers of /metrics, as JSON (the status panel of the pages reads them)."""

    index_size: int = Field(description="Listings this process can search")
    by_category: dict[str, int] = Field(description="Searchable listings per first-level "
                                        "category")
    by_status: dict[str, int] = Field(description="Posted listings per status (a seeded "
                                      "catalog's listings have none)")
    pending: int | None = Field(description="Queue depth: accepted listings not indexed "
                                "yet (null when the state store is unavailable)")
    lag: int | None = Field(description="Log entries not applied here yet")
    review: int | None = Field(None, description="Listings waiting in the review queue "
                               "(GET /review; null when the state store is unavailable)")
    mode: Literal["embedded", "redis"]


LISTING_BODY = body(ListingIn, lambda s: s.max_request_bytes)
SEARCH_BODY = body(SearchIn, lambda s: s.max_query_bytes)
CLASSIFY_BODY = body(ClassifyIn, lambda s: s.max_query_bytes)
CATEGORY_BODY = body(CategoryIn, lambda s: s.max_query_bytes, json_only=True,
                     max_values=MAX_LEVELS * (MAX_TITLE_CHARS + 2) + 8)
MAX_CORRECTIONS = 20  # kept per listing, the latest

# Every error answers a Problem; the schema says which, per route, and why.
_WHY = {
    401: "Missing or wrong X-API-Key",
    404: "Unknown or deleted listing",
    409: "The index was built with other models than the ones configured",
    413: "Body or photo over its size limit",
    415: "Unsupported content type (send JSON or multipart/form-data)",
    422: "Invalid input: `errors` names the fields when the body or a parameter is malformed",
    503: "The state store is unavailable, or too many listings wait to be indexed "
         "(backpressure): retry after Retry-After seconds",
}


def _errors(*codes: int, why: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The Problem responses of a route; ``why`` says what a code means on this route."""
    out: dict[int | str, dict[str, Any]] = {}
    for c in codes:
        out[c] = {"model": Problem, "description": (why or {}).get(c, _WHY[c])}
        if c == 503:
            out[c]["headers"] = {"Retry-After": {"description": "Seconds to wait",
                                                 "schema": {"type": "integer"}}}
    return out


# --- metrics -------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.index_size = Gauge("vitrine_index_size", "Listings in this process's index",
                                registry=r)
        self.pending = Gauge("vitrine_pending_events", "Accepted listings not indexed yet",
                             registry=r)
        self.lag = Gauge("vitrine_replica_lag", "Log entries not applied here yet", registry=r)
        self.review = Gauge("vitrine_review_queue", "Listings waiting for an operator",
                            registry=r)
        self.search_latency = Histogram(
            "vitrine_search_seconds", "POST /search latency", registry=r,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.ingest_latency = Histogram(
            "vitrine_ingest_accept_seconds", "POST /listings latency (validate + enqueue)",
            registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.requests = Counter("vitrine_requests", "Requests by route and outcome",
                                ["route", "outcome"], registry=r)
        self.by_category = Gauge("vitrine_listings", "Searchable listings per first-level "
                                 "category", ["category"], registry=r)
        self.by_status = Gauge("vitrine_statuses", "Posted listings per status",
                               ["status"], registry=r)

    def collect(self, rt: Runtime) -> Stats:
        """The numbers, read once, set on the gauges too: /metrics and /stats agree."""
        pending = lag = review = None
        by_status: dict[str, int] = {}
        try:
            pending, lag = rt.store.pending_count(), rt.replica.lag()
            by_status = rt.store.status_counts()  # per-status indexes: no scan
            review = rt.store.review_queue(None, 0, 0)[0]  # a count (an index, a ZCARD)
        except StoreUnavailable:  # the gauges keep their last value
            pass
        v = rt.replica.v
        view = v.state().view
        by_category = view.category_counts()
        if pending is not None:
            self.pending.set(pending)
        if lag is not None:
            self.lag.set(lag)
        if review is not None:
            self.review.set(review)
        self.index_size.set(len(v))
        for c, n in by_category.items():
            self.by_category.labels(c).set(n)
        if review is not None:  # the store answered: a status gone to none reads 0
            for st in STATUSES:
                self.by_status.labels(st).set(by_status.get(st, 0))
        return Stats(index_size=len(v), by_category=by_category, by_status=by_status,
                     pending=pending, lag=lag, review=review,
                     mode=rt.mode)  # type: ignore[arg-type]



# --- access --------------------------------------------------------------------------------
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                           description="The write key (VITRINE_API_KEY); reads need the read "
                           "key (or the write key) when VITRINE_READ_API_KEY is set")


def _matches(given: str | None, *keys: str | None) -> bool:
    """Constant-time comparison, so that the time taken says nothing about a key."""
    if given is None:
        return False
    raw = given.encode()
    return any(hmac.compare_digest(raw, k.encode()) for k in keys if k)


async def write_access(request: Request,
                       key: Annotated[str | None, Security(_key_header)] = None) -> None:
    s: Settings = request.app.state.settings
    if s.api_key and not _matches(key, s.api_key):
        raise HTTPException(401, "missing or wrong X-API-Key")


async def read_access(request: Request,
                      key: Annotated[str | None, Security(_key_header)] = None) -> None:
    s: Settings = request.app.state.settings
    if s.read_api_key and not _matches(key, s.read_api_key, s.api_key):
        raise HTTPException(401, "missing or wrong X-API-Key")


async def page_or_read_access(request: Request,
                              key: Annotated[str | None, Security(_key_header)] = None) -> None:
    """``read_access``, but a browser navigating to a page URL gets the page without a key
    (the page asks for it, and its script sends it with the JSON reads)."""
    if not wants_html(request):
        await read_access(request, key)


# async: FastAPI would run a sync dependency in its thread pool, a thread hop per request
async def get_rt(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_rt)]
# one sorted copy of a view's ids, made on the first page read from that view: a view never
# changes, and the next write publishes a new one (this entry goes with the old one)
_ids_by_view: weakref.WeakKeyDictionary[VectorView, list[str]] = \
    weakref.WeakKeyDictionary()


def _sorted_ids(view: VectorView) -> list[str]:
    ids = _ids_by_view.get(view)
    if ids is None:
        ids = _ids_by_view[view] = sorted(view.ids())  # racing threads store equal lists
    return ids


PathId = Annotated[str, PathParam(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)]


def _status_code(exc: VitrineError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, UnsupportedMediaType):
        return 415
    if isinstance(exc, StoreUnavailable | Overloaded):
        return 503
    if isinstance(exc, IndexMismatch | VersionConflict):
        return 409
    return 422


# --- app ---------------------------------------------------------------------------------
def check_settings(settings: Settings) -> None:
    """Refuse settings unsafe for a public API (production without a write key)."""
    if settings.environment == "production" and not settings.api_key:
        raise VitrineError("VITRINE_ENVIRONMENT=production needs VITRINE_API_KEY for the "
                           "write endpoints")


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The FastAPI app. ``runtime`` is built in the lifespan unless one is given.

    Raises:
        VitrineError: production mode without an API key.
    """
    check_settings(settings)
    docs = settings.docs if settings.docs is not None else settings.environment != "production"
    queries = QueryPool(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime(settings)
        if rt.mode == "redis" and rt.notify is None:
            from .queue import celery_notifier

            rt.notify = celery_notifier(settings)
        rt.start()  # models load here, before the first request, not during one
        queries.start(rt)
        app.state.runtime = rt
        yield
        queries.stop()
        rt.stop()

    app = FastAPI(
        title="vitrine",
        version="0.1.0",
        description="Categorize marketplace listings and find similar products.",
        lifespan=lifespan,
        docs_url=None,  # served below, with Swagger UI's JS/CSS from the package: no CDN
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    if docs:  # FastAPI's "self-hosting JavaScript and CSS for docs" recipe
        assets = "/docs/assets"  # fastapi-offline's copy of swagger-ui-dist 5 (OpenAPI 3.1)
        app.mount(assets, StaticFiles(directory=str(
            importlib.resources.files("fastapi_offline") / "static")), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def swagger_ui(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return get_swagger_ui_html(
                openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{assets}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{assets}/swagger-ui.css",
                swagger_favicon_url=f"{root}{assets}/favicon.png",
                swagger_ui_parameters=app.swagger_ui_parameters)

    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    taxonomy_cache: dict[str, tuple[VectorView, CategoriesOut]] = {}
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Content-Type", "X-API-Key"])

    @app.exception_handler(VitrineError)
    async def domain_error(request: Request, exc: VitrineError) -> JSONResponse:
        code = _status_code(exc)
        metrics.requests.labels(request.url.path.split("/")[1], f"{code}").inc()
        headers = None
        if isinstance(exc, Overloaded):
            headers = {"Retry-After": str(exc.retry_after)}
        elif isinstance(exc, StoreUnavailable):
            log.warning("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
            headers = {"Retry-After": str(BACKLOG_RETRY_AFTER)}
        return JSONResponse(Problem(detail=str(exc)).model_dump(exclude_none=True), code,
                            headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # never show a traceback (store failures are StoreUnavailable: 503 above)
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [FieldError.of(e) for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" if e.loc else e.msg
                           for e in errors)
        return JSONResponse(Problem(detail=detail, errors=errors).model_dump(), 422)

    # -- listings --
    @app.post(
        "/listings", status_code=202, response_model=Accepted, operation_id="post_listing",
        dependencies=[Depends(write_access)],
        summary="Submit a new listing (JSON or multipart); indexed asynchronously",
        responses={**_errors(401, 413, 415, 422, 503), 202: {"links": {
            "GetListing": {"operationId": "get_listing",
                           "parameters": {"listing_id": "$response.body#/id"},
                           "description": "Its status: queued, then indexed or failed"},
            "DeleteListing": {"operationId": "delete_listing",
                              "parameters": {"listing_id": "$response.body#/id"}},
            "SearchLikeIt": {"operationId": "search",
                             "requestBody": {"listing_id": "$response.body#/id"},
                             "description": "Similar listings, once it is indexed"},
        }}},
        openapi_extra=LISTING_BODY.openapi,
    )
    def post_listing(request: Request, rt: RuntimeDep,
                     parsed: Annotated[Parsed[ListingIn], Depends(LISTING_BODY)]) -> Accepted:
        t0 = time.perf_counter()
        q: ListingIn = parsed.data
        image = parsed.photo
        if image is not None and q.image_url is not None:
            raise InvalidInput("give an image or an image_url, not both")
        if image is not None:
            validate_photo(image, settings)
        if q.image_url is not None:
            check_url(q.image_url, **url_policy(settings))
        listing = make_listing(q.id, q.title, q.description, image=image, category=q.category)
        if not listing.title and not listing.description and image is None \
                and q.image_url is None:
            raise InvalidInput("listing has no title, no description and no photo")
        payload = {
            "id": listing.id, "title": listing.title, "description": listing.description,
            "category": listing.category, "image_url": q.image_url,
        }
        version = rt.accept(payload, image)
        metrics.ingest_latency.observe(time.perf_counter() - t0)
        metrics.requests.labels("listings", "202").inc()
        url = request.url_for("get_listing", listing_id=listing.id)
        return Accepted(id=listing.id, version=version, status_url=str(url))

    @app.get("/listings", response_model=ListingsPage, operation_id="list_listings",
             summary="The listings, paged and filtered (what `vitrine export` reads)",
             dependencies=[Depends(read_access)], responses=_errors(401, 409, 422, 503))
    def list_listings(
        rt: RuntimeDep,
        status: Annotated[Literal["indexed", "queued", "failed"], Query(description=(
            "`indexed`: the searchable listings (the seeded catalog's included), by id; "
            "`queued`, `failed`: posted listings in that state, "
            "oldest first"))] = "indexed",
        category: Annotated[str | None, Query(max_length=MAX_TITLE_CHARS, description=(
            "Only under this category, any level of the path, any case (as in /search); "
            "indexed listings only"))] = None,
        source: Annotated[Source | None, Query(description="Only with this `source`; "
                                               "indexed listings only")] = None,
        after: Annotated[str | None, Query(max_length=MAX_ID_CHARS, description=(
            "A cursor: the `next` of the previous page. Pages read by cursor neither skip "
            "nor repeat a listing while others are written"))] = None,
        offset: Annotated[int, Query(ge=0, le=10_000_000, description=(
            "Listings to skip (after the cursor, when one is given)"))] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> ListingsPage:
        if status != "indexed":
            if category or source:
                raise InvalidInput("category and source filter indexed listings only")
            if after is not None and not after.isdigit():
                raise InvalidInput(f"after: {after!r} is not a cursor of {status} listings")
            total, page = rt.store.status_ids(status, offset, limit, int(after or 0))
            rows = [ListingRow(id=lid, status=st["status"], version=st["version"],
                               error=st.get("error"))
                    for (lid, _), st in zip(page, rt.store.statuses([x for x, _ in page]),
                                            strict=True)
                    if st is not None and st["status"] == status]
            # the cursor is the page's last version: versions only grow, so a listing that
            # leaves the status (or comes back, with a new version) shifts no later page
            return ListingsPage(total=total, offset=offset, limit=limit, items=rows,
                                next=str(page[-1][1]) if len(page) == limit else None)
        view = rt.replica.v.state().view
        cf = category_filter(category, view.categories) if category else None
        if cf is not None and cf.impossible:
            return ListingsPage(total=0, offset=offset, limit=limit, items=[])

        def matching(ids: list[str]) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
            """The listings of ``ids`` that pass the filters, with their paths."""
            for i in range(0, len(ids), 500):
                chunk = []
                for lid in ids[i: i + 500]:
                    try:
                        chunk.append((lid, view.payload(lid)))
                    except KeyError:  # deleted since the ids were read (a Milvus view is
                        continue      # not frozen: see indexer/milvus.py)
                if source:
                    chunk = [(x, p) for x, p in chunk if p.get("source", "seller") == source]
                # a predicted listing's path is in its status (one read per chunk)
                predicted = [x for x, p in chunk if not p.get("category_path")]
                paths = {x: list((st or {}).get("category_path") or [])
                         for x, st in zip(predicted, rt.store.statuses(predicted), strict=True)}
                for x, p in chunk:
                    path = list(p.get("category_path") or paths.get(x) or
                                ([p["category"]] if p.get("category") else []))
                    if cf is None or cf.matches(path):
                        yield x, p, path

        # by id: the one order a write leaves alone (a relabel or a re-post gives a listing a
        # new slot, which moved it in write order and shifted every later page)
        ordered = _sorted_ids(view)
        start = bisect.bisect_right(ordered, after) if after is not None else 0
        if cf is None and source is None:  # every listing passes: the page alone is read
            found = list(matching(ordered[start + offset: start + offset + limit + 1]))
            total = len(ordered)
        else:  # one pass over all of them: the total, and the page on the way
            passing = list(matching(ordered))
            total = len(passing)
            first = bisect.bisect_right([lid for lid, _, _ in passing], after) \
                if after is not None else 0
            found = passing[first + offset: first + offset + limit + 1]
        more = len(found) > limit
        rows_of = found[:limit]
        statuses = rt.store.statuses([lid for lid, _, _ in rows_of])
        items = []
        for (lid, p, path), st in zip(rows_of, statuses, strict=True):
            st = st if st is not None and st.get("status") == "indexed" else None
            labelled = p.get("category") is not None and \
                p.get("source") not in ("predicted", "unconfirmed")
            items.append(ListingRow(
                id=lid, status="indexed",
                version=rt.replica.versions.get(lid, st["version"] if st else 0),
                title=p.get("title"), category=p.get("category"), category_path=path,
                source=p.get("source", "seller"),
                confidence=st.get("confidence") if st else (1.0 if labelled else None),
                uncertain=st.get("uncertain") if st else (False if labelled else None)))
        return ListingsPage(total=total, offset=offset, limit=limit, items=items,
                            next=rows_of[-1][0] if more else None)

    @app.get("/listings/{listing_id}", response_model=ListingStatus, name="get_listing",
             operation_id="get_listing", response_model_exclude_none=True,
             dependencies=[Depends(read_access)], responses=_errors(401, 404, 422, 503))
    def get_listing(request: Request, listing_id: PathId, rt: RuntimeDep) -> ListingStatus:
        st = rt.store.status(listing_id)
        if st is not None and st["status"] == "deleted":
            raise NotFound(f"listing {listing_id!r} was deleted")
        if st is not None:
            if st["status"] == "indexed":
                # committed to the log: wait (briefly) until this process can search it too
                rt.replica.wait_version(listing_id, st["version"], timeout=2)
            return _status_out(request, rt, listing_id, st)
        meta = rt.replica.v.state().meta(listing_id)  # a listing of the seeded catalog
        if meta is None:
            raise NotFound(f"unknown listing {listing_id!r}")
        return _status_out(request, rt, listing_id, {
            "status": "indexed", "version": 0, "category": meta.category, "title": meta.title,
            "category_path": meta.category_path or None,
            "confidence": 1.0 if meta.labelled else None,
            "uncertain": False if meta.labelled else None,
            "source": meta.source if meta.source in SOURCES else "seller"})

    @app.get(
        "/listings/{listing_id}/photo", name="get_photo", operation_id="get_photo",
        summary="A listing's thumbnail (JPEG, at most 256 px), made when it was indexed",
        dependencies=[Depends(read_access)], response_class=Response,
        responses={
            200: {"description": "The thumbnail. `ETag` is its content hash; with `v` "
                  "equal to it (the `photo_url` of a status or a hit) it may be cached a "
                  "day, else revalidated with If-None-Match",
                  "content": {THUMB_TYPE: {"schema": {"type": "string",
                                                      "format": "binary"}}},
                  "headers": {"ETag": {"schema": {"type": "string"}},
                              "Cache-Control": {"schema": {"type": "string"}}}},
            304: {"description": "Not modified: If-None-Match holds its ETag"},
            **_errors(401, 404, 422, 503)},
    )
    def get_photo(request: Request, listing_id: PathId, rt: RuntimeDep,
                  v: Annotated[str | None, Query(max_length=64, description=(
                      "The thumbnail's etag, as in `photo_url`: makes the URL change when "
                      "the photo does, so it can be cached"))] = None) -> Response:
        got = rt.store.thumbnail(listing_id)
        if got is None:
            raise NotFound(f"listing {listing_id!r} has no photo")
        tag, jpeg = got
        # a key-protected thumbnail is no shared cache's to keep
        scope = "private" if settings.read_api_key else "public"
        headers = {"ETag": f'"{tag}"', "Cache-Control": (
            f"{scope}, max-age=86400, immutable" if v == tag else f"{scope}, no-cache")}
        given = request.headers.get("if-none-match", "")
        if any(t.strip().removeprefix("W/").strip('"') in (tag, "*") for t in given.split(",")):
            return Response(status_code=304, headers=headers)
        return Response(jpeg, media_type=THUMB_TYPE, headers=headers)

    @app.delete("/listings/{listing_id}", response_model=Deleted, operation_id="delete_listing",
                dependencies=[Depends(write_access)], responses=_errors(401, 404, 422, 503))
    def delete_listing(listing_id: PathId, rt: RuntimeDep) -> Deleted:
        st = rt.store.status(listing_id)
        if st is None and rt.replica.v.state().meta(listing_id) is None:
            raise NotFound(f"unknown listing {listing_id!r}")
        if st is not None and st["status"] == "deleted":
            raise NotFound(f"listing {listing_id!r} was already deleted")
        return Deleted(id=listing_id, version=rt.delete(listing_id))

    # -- the review loop --
    @app.put(
        "/listings/{listing_id}/category", response_model=ListingStatus,
        operation_id="set_category", response_model_exclude_none=True,
        summary="Confirm or correct a listing's category path (an operator's versioned write)",
        dependencies=[Depends(write_access)],
        responses=_errors(401, 404, 409, 413, 415, 422, 503, why={
            409: "The listing changed since `version` was read (a re-post, a delete or "
                 "another operator's write), or it is being indexed: read it again"}),
        openapi_extra=CATEGORY_BODY.openapi,
    )
    def set_category(request: Request, listing_id: PathId, rt: RuntimeDep,
                     parsed: Annotated[Parsed[CategoryIn], Depends(CATEGORY_BODY)]
                     ) -> ListingStatus:
        q: CategoryIn = parsed.data
        path = [" ".join(level.split()) for level in q.category_path]
        if not all(path):
            raise InvalidInput("category_path: a level is blank")
        st = rt.store.status(listing_id)
        if st is not None and st["status"] == "deleted":
            raise NotFound(f"listing {listing_id!r} was deleted")
        if st is None:  # a listing of the seeded catalog: its status is its index payload
            meta = rt.replica.v.state().meta(listing_id)
            if meta is None:
                raise NotFound(f"unknown listing {listing_id!r}")
            st = {"status": "indexed", "version": 0, "title": meta.title,
                  "category": meta.category, "category_path": meta.category_path,
                  "source": meta.source}
        if st["version"] != q.version:
            # the new status is built from this one: it must be the version the store's
            # condition names, or a write at that version could get these stale fields
            raise VersionConflict(f"listing {listing_id!r} is at version {st['version']}, "
                                  f"not {q.version}: it changed since it was read; reload it "
                                  "and try again", st["version"])
        previous = {k: st.get(k) for k in ("category", "category_path", "source")}
        correction = {"by": q.reviewer or "operator",
                      "at": datetime.now(UTC).isoformat(timespec="seconds"),
                      "category_path": path, "previous": previous}
        # the review is over and the label is the operator's: it votes from now on
        status = {k: v for k, v in st.items()
                  if k not in ("review", "evidence", "uncertain_reason", "version",
                               "corrections")}
        status.update(category=path[0], category_path=path, source="confirmed",
                      confidence=1.0, uncertain=False, path_confidence=[1.0] * len(path))
        # the history is the store's, kept across re-posts (a status written before it was
        # kept apart still holds its own)
        history = rt.store.corrections(listing_id) or st.get("corrections") or []
        history = [*history[-(MAX_CORRECTIONS - 1):], correction]
        label = {"category": path[0], "category_path": path, "source": "confirmed"}
        # conditional on the version the operator saw (the store checks it atomically with
        # the write, the history included): never a read-modify-write that could overwrite
        # a newer change
        version = rt.store.relabel(listing_id, q.version, status,
                                   {"op": "label", "id": listing_id, "label": label}, history)
        rt.replica.wait_version(listing_id, version, timeout=5)  # read-your-writes here
        return _status_out(request, rt, listing_id, {**status, "version": version})

    @app.get("/review", response_model=ReviewPage, operation_id="review_queue",
             summary="Listings waiting for an operator, with the evidence, oldest first",
             description="A browser's navigation here (Accept: text/html) gets the "
             "operators' page instead, which reads this same route as JSON (the page needs "
             "no key itself: its script sends the one typed in)",
             dependencies=[Depends(page_or_read_access)],
             responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}},
                        **_errors(401, 409, 422, 503)})
    def review_queue(request: Request, response: Response, rt: RuntimeDep,
                     reason: Annotated[ReviewReason | None, Query(
                         description="Only entries with this reason")] = None,
                     offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
                     limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Any:
        # one URL, two representations: a cache must key them by Accept
        response.headers["Vary"] = "Accept"
        if wants_html(request):
            page = render(app, settings, "review", "Review queue", request)
            page.headers["Vary"] = "Accept"
            return page
        total, ids = rt.store.review_queue(reason, offset, limit)
        statuses = rt.store.statuses(ids)
        state = rt.replica.v.state()
        items = []
        for lid, st in zip(ids, statuses, strict=True):
            if st is None or st.get("status") != "indexed" or not st.get("review"):
                continue  # changed between the two reads: it left the queue
            ev = st.get("evidence") or {}
            neighbours = [Neighbour(n["id"], float(n["score"]), n.get("category"),
                                    n.get("title", ""), tuple(n.get("category_path") or ()))
                          for n in ev.get("neighbours", [])]
            dups, same_photo = [], []
            for d in st.get("duplicates", []):
                meta = state.meta(d["id"])
                if meta is not None:  # a duplicate deleted since is no longer shown
                    dups.append(Neighbour(d["id"], float(d["score"]), meta.category,
                                          meta.title, tuple(meta.category_path)))
                    if d.get("same_photo"):
                        same_photo.append(d["id"])
            hits = _hits(request, rt, neighbours + dups, _paths(rt, neighbours + dups))
            [tag] = rt.store.thumbnail_tags([lid])
            items.append(ReviewItem(
                id=lid, version=st["version"], title=st.get("title"),
                photo_url=_photo_url(request, lid, tag), category=st.get("category"),
                category_path=st.get("category_path") or [], source=st.get("source"),
                predicted_path=ev.get("predicted_path") or [],
                confidence=ev.get("predicted_confidence", st.get("confidence")),
                uncertain_reason=st.get("uncertain_reason"), reasons=st["review"],
                neighbours=hits[: len(neighbours)], duplicates=hits[len(neighbours):],
                same_photo=same_photo))
        return ReviewPage(total=total, offset=offset, limit=limit, items=items)

    @app.get("/categories", response_model=CategoriesOut, operation_id="categories",
             summary="The taxonomy (category paths of the labelled listings) with counts",
             dependencies=[Depends(read_access)], responses=_errors(401, 409))
    def categories(rt: RuntimeDep) -> CategoriesOut:
        view = rt.replica.v.state().view
        cached = taxonomy_cache.get("out")
        if cached is None or cached[0] is not view:
            paths, unconfirmed = taxonomy(view)
            out = CategoriesOut(
                categories=[CategoryCount(path=list(p), count=n)
                            for p, n in sorted(paths.items())],
                unconfirmed=dict(sorted(unconfirmed.items())))
            taxonomy_cache["out"] = cached = (view, out)  # one scan per index version
        return cached[1]

    # -- queries --
    @app.post("/search", response_model=SearchOut, operation_id="search",
              summary="Similar listings to a text, a photo (JSON or multipart) or a listing",
              dependencies=[Depends(read_access)],
              responses=_errors(401, 404, 409, 413, 415, 422), openapi_extra=SEARCH_BODY.openapi)
    async def search(request: Request, rt: RuntimeDep,
                     parsed: Annotated[Parsed[SearchIn], Depends(SEARCH_BODY)]) -> Response:
        t0 = time.perf_counter()
        q: SearchIn = parsed.data
        photo = parsed.photo
        given = [x for x in (q.text, photo, q.listing_id, q.listing_ids) if x]
        if len(given) == 0:
            raise InvalidInput("give a text, a photo, a listing_id or listing_ids to search "
                               "with")
        if (q.listing_id or q.listing_ids) and len(given) > 1:
            raise InvalidInput("listing_id or listing_ids cannot be combined with anything "
                               "else to search with")
        weights = {m: w for m, w in (("text", q.text_weight), ("image", q.image_weight))
                   if w is not None}

        def run() -> str:
            image = decode_photo(photo, settings) if photo is not None else None
            v = rt.replica.v
            cf = category_filter(q.category, v.state().view.categories) if q.category else None
            if cf is not None and cf.impossible:
                return SearchOut(results=[]).model_dump_json()
            hits = v.search(text=q.text, image=image, listing_id=q.listing_id,
                            k=cf.candidates(q.k) if cf else q.k,
                            category=cf.first if cf else None,
                            listing_ids=list(dict.fromkeys(q.listing_ids or ())),
                            weights=weights or None)
            if q.min_score is not None:  # best first: the rest are under it too
                hits = [h for h in hits if h.score >= q.min_score]
            paths = _paths(rt, hits)
            if cf is not None and not cf.exact:
                hits = [h for h in hits if cf.matches(paths[h.id])][: q.k]
            return SearchOut(results=_hits(request, rt, hits, paths)).model_dump_json()

        out = await queries.run(run)
        metrics.search_latency.observe(time.perf_counter() - t0)
        return Response(out, media_type="application/json")

    @app.post("/classify", response_model=ClassifyOut, operation_id="classify",
              summary="The category of a draft listing (JSON or multipart), without indexing it",
              dependencies=[Depends(read_access)],
              responses=_errors(401, 409, 413, 415, 422), openapi_extra=CLASSIFY_BODY.openapi)
    async def classify(request: Request, rt: RuntimeDep,
                       parsed: Annotated[Parsed[ClassifyIn], Depends(CLASSIFY_BODY)]) -> Response:
        q: ClassifyIn = parsed.data
        photo = parsed.photo

        def run() -> str:
            image = decode_photo(photo, settings) if photo is not None else None
            listing = make_listing("draft", q.title, q.description, image=image)
            vote = rt.replica.v.classify(listing)
            return ClassifyOut(
                category=vote.category, confidence=vote.confidence, uncertain=vote.uncertain,
                uncertain_reason=vote.uncertain_reason, category_path=vote.category_path,
                path_confidence=vote.path_confidence, path_stopped=vote.path_stopped,
                scores=vote.scores,
                neighbours=_hits(request, rt, vote.neighbours, _paths(rt, vote.neighbours)),
            ).model_dump_json()

        return Response(await queries.run(run), media_type="application/json")

    # -- operations --
    @app.get("/health", response_model=Health, operation_id="health")
    def health(rt: RuntimeDep) -> Health:
        problems = rt.problems()
        pending = lag = None
        try:
            pending, lag = rt.store.pending_count(), rt.replica.lag()
        except StoreUnavailable:
            pass  # already among the problems
        v = rt.replica.v
        have = set(rt.registry.loaded())
        loaded = all(f"{kind}:{spec}" in have
                     for kind, spec in (("text", v.text_spec), ("image", v.image_spec)) if spec)
        return Health(status="degraded" if problems else "ok", problems=problems,
                      mode=rt.mode, index_size=len(v), models_loaded=loaded, pending=pending,
                      log_position=rt.replica.pos, lag=lag, digest=rt.replica.digest())

    @app.get("/metrics", include_in_schema=False)
    def prom(rt: RuntimeDep) -> Response:
        metrics.collect(rt)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", response_model=Stats, operation_id="stats",
             summary="Counts by status and category, queue depth: the numbers of /metrics",
             dependencies=[Depends(read_access)], responses=_errors(401))
    def stats(rt: RuntimeDep) -> Stats:
        return metrics.collect(rt)

    mount_pages(app, settings)

    return app


def _status_out(request: Request, rt: Runtime, lid: str, st: dict[str, Any]) -> ListingStatus:
    """A status record of the store as the API shows it, with its photo's URL."""
    fields = {k: st.get(k) for k in ListingStatus.model_fields if k in st}
    if st["status"] in ("queued", "indexed"):
        fields["corrections"] = rt.store.corrections(lid) or st.get("corrections") or None
    if st["status"] == "indexed" and "title" not in fields:  # indexed before titles
        meta = rt.replica.v.state().meta(lid)
        fields["title"] = meta.title if meta is not None else None
    out = ListingStatus(id=lid, **fields)
    [tag] = rt.store.thumbnail_tags([lid])
    out.photo_url = _photo_url(request, lid, tag)
    return out


def _photo_url(request: Request, lid: str, tag: str | None) -> str | None:
    return None if tag is None else f"{request.url_for('get_photo', listing_id=lid)}?v={tag}"


def _paths(rt: Runtime, hits: list[Neighbour]) -> dict[str, list[str]]:
    """Each hit's category path: its labelled levels, or for a listing whose category was
    predicted (no labelled level), the path its status holds (one store read for all)."""
    out = {h.id: list(h.category_path) for h in hits}
    predicted = [h.id for h in hits if not h.category_path]
    if predicted:
        for lid, st in zip(predicted, rt.store.statuses(predicted), strict=True):
            out[lid] = list((st or {}).get("category_path") or [])
    for h in hits:
        if not out[h.id] and h.category:
            out[h.id] = [h.category]
    return out


def _hits(request: Request, rt: Runtime, hits: list[Neighbour],
          paths: dict[str, list[str]]) -> list[Hit]:
    tags = rt.store.thumbnail_tags([h.id for h in hits])
    return [Hit(id=h.id, score=h.score, category=h.category, title=h.title,
                category_path=paths[h.id], photo_url=_photo_url(request, h.id, tag))
            for h, tag in zip(hits, tags, strict=True)]


class QueryPool:
    """``cores`` threads for queries; torch and FAISS on one thread each in a query process.

    torch's and FAISS's thread counts are per process. An API process in Redis mode only
    answers queries, so both get 1 (or ``VITRINE_TORCH_THREADS``) and up to ``cores`` queries
    run side by side; in embedded mode the process also embeds the ingested batches, so torch
    keeps the configured count and only FAISS (single-vector searches) is set to 1.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.size = max(1, len(os.sched_getaffinity(0)))  # the cores this process may use
        self._pool: ThreadPoolExecutor | None = None

    def start(self, rt: Runtime) -> None:
        from indexer.index import configure_faiss

        configure_faiss(1)
        if rt.mode == "redis":
            from indexer.encoders.base import configure_torch

            configure_torch(self.settings.torch_threads or 1)
        self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="vitrine-query")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def run(self, fn: Callable[[], T]) -> T:
        assert self._pool is not None, "the API is not started"
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
