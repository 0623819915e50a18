"""The HTTP API: thin routes over :class:`~services.runtime.Runtime` (see docs/service.md).

Blocking work never runs on the event loop. Queries (``/search``, ``/classify``: an index
search, and for text or a photo a forward pass) run in a small pool of ``cores`` query
threads, each forward pass on one torch thread and each FAISS search on one OpenMP thread
(single queries gain nothing from intra-op threads and lose a lot when a core is busy), and
their answers are serialised once, by pydantic-core, straight to JSON bytes. The other
blocking routes are sync functions, which FastAPI runs in its thread pool. Domain errors map
to HTTP errors in one place.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from indexer.catalog import make_listing, validate_id
from indexer.errors import (
    ImageTooLarge,
    IndexMismatch,
    InvalidInput,
    NotFound,
    VitrineError,
)
from indexer.images import decode_image
from indexer.remote import check_url
from indexer.runtime import Runtime
from indexer.settings import Settings
from indexer.state import StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


# --- schemas ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListingIn(_Strict):
    id: StrictStr
    title: StrictStr
    description: StrictStr | None = None
    image_base64: StrictStr | None = None
    image_url: StrictStr | None = None
    category: StrictStr | None = Field(None, description="The seller's label, optional.")


class Accepted(BaseModel):
    id: str
    status: Literal["queued"] = "queued"
    version: int = Field(description="The version this write got: it only grows per store, "
                         "and the latest accepted write of a listing is the one that counts")
    status_url: str


class ListingStatus(BaseModel):
    id: str
    status: Literal["queued", "indexed", "failed"]
    version: int = Field(0, description="Version of the write this status is about (0: a "
                         "listing of the seeded catalog)")
    category: str | None = None
    confidence: float | None = None
    uncertain: bool | None = None
    source: Literal["seller", "predicted"] | None = None
    error: str | None = None
    warning: str | None = None


class SearchIn(_Strict):
    text: StrictStr | None = None
    image_base64: StrictStr | None = None
    listing_id: StrictStr | None = None
    k: int = Field(10, ge=1, le=1000, strict=True)
    category: StrictStr | None = None


class Hit(BaseModel):
    id: str
    score: float
    category: str | None
    title: str


class SearchOut(BaseModel):
    results: list[Hit]


class ClassifyIn(_Strict):
    title: StrictStr
    description: StrictStr | None = None
    image_base64: StrictStr | None = None


class ClassifyOut(BaseModel):
    category: str | None
    confidence: float
    uncertain: bool
    scores: dict[str, float]
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


# --- helpers -------------------------------------------------------------------------------
def _b64(data: str, settings: Settings) -> bytes:
    if len(data) > settings.max_image_bytes * 4 // 3 + 8:
        raise ImageTooLarge(f"image is larger than {settings.max_image_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput("image_base64 is not valid base64") from e


def _check_image(raw: bytes, settings: Settings) -> bytes:
    # decode now so that a corrupt photo or a bomb is refused before it is accepted; a JPEG
    # is decoded at 1/8 scale (every byte is still read, so truncation is still caught), which
    # takes the check from 1.3 to 0.6 ms for the study's photos
    decode_image(raw, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                 thumbnail=64)
    return raw


# async: FastAPI would run a sync dependency in its thread pool, a thread hop per request
async def get_rt(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_rt)]


async def require_key(request: Request,
                      x_api_key: Annotated[str | None, Header()] = None) -> None:
    expected = request.app.state.settings.api_key
    if expected and x_api_key != expected:
        raise HTTPException(401, "missing or wrong X-API-Key")


WriteAccess = Depends(require_key)


# --- app ---------------------------------------------------------------------------------
def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """The FastAPI app. ``runtime`` is built in the lifespan unless one is given."""

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
    )
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)

    @app.exception_handler(VitrineError)
    async def domain_error(request: Request, exc: VitrineError) -> JSONResponse:
        code = 422
        if isinstance(exc, NotFound):
            code = 404
        elif isinstance(exc, ImageTooLarge):
            code = 413
        elif isinstance(exc, StoreUnavailable):
            code = 503
        elif isinstance(exc, IndexMismatch):
            code = 409
        metrics.requests.labels(request.url.path.split("/")[1], f"{code}").inc()
        return JSONResponse({"detail": str(exc)}, code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # never show a traceback (store failures are StoreUnavailable: 503 above)
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msgs.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return JSONResponse({"detail": "; ".join(msgs), "errors": _jsonable(exc.errors())}, 422)

    # -- listings --
    @app.post("/listings", status_code=202, response_model=Accepted, dependencies=[WriteAccess],
              summary="Submit a new listing (JSON or multipart); indexed asynchronously",
              responses={401: {}, 404: {}, 413: {}, 422: {}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ListingIn.model_json_schema()},
                  "multipart/form-data": {"schema": _multipart_schema()},
              }}})
    def post_listing(request: Request, rt: RuntimeDep, body: BodyDep) -> Accepted:
        t0 = time.perf_counter()
        data, image = body["data"], body["image"]
        if isinstance(data, dict):
            try:
                parsed = ListingIn.model_validate(data)
            except Exception as e:
                raise RequestValidationError(getattr(e, "errors", lambda: [])()) from e
        else:
            raise InvalidInput("the body must be a JSON object")
        if parsed.image_base64 is not None:
            if image is not None:
                raise InvalidInput("give image_base64 or an image file, not both")
            image = _b64(parsed.image_base64, settings)
        if image is not None and parsed.image_url is not None:
            raise InvalidInput("give an image or an image_url, not both")
        if image is not None:
            _check_image(image, settings)
        if parsed.image_url is not None:
            check_url(parsed.image_url, settings.allow_private_urls)
        listing = make_listing(parsed.id, parsed.title, parsed.description,
                               image=image, category=parsed.category)
        if not listing.title and not listing.description and image is None \
                and parsed.image_url is None:
            raise InvalidInput("listing has no title, no description and no photo")
        payload = {
            "id": listing.id, "title": listing.title, "description": listing.description,
            "category": listing.category, "image_url": parsed.image_url,
        }
        version = rt.accept(payload, image)
        metrics.ingest_latency.observe(time.perf_counter() - t0)
        metrics.requests.labels("listings", "202").inc()
        url = request.url_for("get_listing", listing_id=listing.id)
        return Accepted(id=listing.id, version=version, status_url=str(url))

    @app.get("/listings/{listing_id}", response_model=ListingStatus, name="get_listing",
             response_model_exclude_none=True)
    def get_listing(listing_id: str, rt: RuntimeDep) -> ListingStatus:
        lid = validate_id(listing_id)
        st = rt.store.status(lid)
        if st is not None and st["status"] == "deleted":
            raise NotFound(f"listing {lid!r} was deleted")
        if st is not None:
            if st["status"] == "indexed":
                # committed to the log: wait (briefly) until this process can search it too
                rt.replica.wait_version(lid, st["version"], timeout=2)
            fields = {k: st.get(k) for k in ListingStatus.model_fields if k in st}
            return ListingStatus(id=lid, **fields)
        meta = rt.replica.v.state().meta(lid)  # a listing of the seeded catalog
        if meta is None:
            raise NotFound(f"unknown listing {lid!r}")
        return ListingStatus(
            id=lid, status="indexed", category=meta.category,
            confidence=1.0 if meta.labelled else None,
            uncertain=False if meta.labelled else None,
            source="predicted" if meta.source == "predicted" else "seller",
        )

    @app.delete("/listings/{listing_id}", dependencies=[WriteAccess])
    def delete_listing(listing_id: str, rt: RuntimeDep) -> dict[str, Any]:
        lid = validate_id(listing_id)
        st = rt.store.status(lid)
        if st is None and rt.replica.v.state().meta(lid) is None:
            raise NotFound(f"unknown listing {lid!r}")
        if st is not None and st["status"] == "deleted":
            raise NotFound(f"listing {lid!r} was already deleted")
        return {"id": lid, "deleted": True, "version": rt.delete(lid)}

    # -- queries --
    @app.post("/search", response_model=SearchOut)
    async def search(q: SearchIn, rt: RuntimeDep) -> Response:
        t0 = time.perf_counter()
        given = [x for x in (q.text, q.image_base64, q.listing_id) if x]
        if len(given) == 0:
            raise InvalidInput("give a text, an image_base64 or a listing_id to search with")
        if q.listing_id and len(given) > 1:
            raise InvalidInput("listing_id cannot be combined with text or image_base64")
        if q.text is not None and len(q.text) > 10_000:
            raise InvalidInput("text longer than 10000 characters")
        lid = validate_id(q.listing_id) if q.listing_id else None

        def run() -> str:
            image = (_check_image(_b64(q.image_base64, settings), settings)
                     if q.image_base64 else None)
            hits = rt.replica.v.search(text=q.text, image=image, listing_id=lid, k=q.k,
                                       category=q.category)
            return SearchOut(results=[Hit(id=h.id, score=h.score, category=h.category,
                                          title=h.title) for h in hits]).model_dump_json()

        body = await queries.run(run)
        metrics.search_latency.observe(time.perf_counter() - t0)
        return Response(body, media_type="application/json")

    @app.post("/classify", response_model=ClassifyOut)
    async def classify(q: ClassifyIn, rt: RuntimeDep) -> Response:
        def run() -> str:
            image = (_check_image(_b64(q.image_base64, settings), settings)
                     if q.image_base64 else None)
            listing = make_listing("draft", q.title, q.description, image=image)
            vote = rt.replica.v.classify(listing)
            return ClassifyOut(
                category=vote.category, confidence=vote.confidence, uncertain=vote.uncertain,
                scores=vote.scores,
                neighbours=[Hit(id=n.id, score=n.score, category=n.category, title=n.title)
                            for n in vote.neighbours],
            ).model_dump_json()

        return Response(await queries.run(run), media_type="application/json")

    # -- operations --
    @app.get("/health", response_model=Health)
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
        try:
            metrics.pending.set(rt.store.pending_count())
            metrics.lag.set(rt.replica.lag())
        except StoreUnavailable:  # the gauges keep their last value
            pass
        metrics.index_size.set(len(rt.replica.v))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class QueryPool:
    """``cores`` threads for queries; torch and FAISS on one thread each in a query process.

    torch's and FAISS's thread counts are per process. An API process in Redis mode only
    answers queries, so both get 1 (or ``VITRINE_TORCH_THREADS``) and up to ``cores`` queries
    run side by side; in embedded mode the process also embeds the ingested batches, so torch
    keeps the configured count and only FAISS (single-vector searches) is set to 1.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.size = max(1, os.cpu_count() or 1)
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


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 (a plain ASGI middleware: no extra task).

    A declared ``Content-Length`` is checked up front; a chunked body is read up to the limit
    first and then handed on.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        too_big = JSONResponse({"detail": f"request body larger than {self.limit} bytes"}, 413)
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _body(request: Request) -> dict[str, Any]:
    """JSON or multipart (an ``image`` file plus the same fields) -> {data, image}."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        data: dict[str, Any] = {}
        image = None
        for key, value in form.multi_items():
            if key == "image":
                if isinstance(value, str):
                    raise InvalidInput("multipart field 'image' must be a file")
                image = await value.read()
            else:
                if not isinstance(value, str):
                    raise InvalidInput(f"multipart field {key!r} must be text, not a file")
                data[key] = value
        return {"data": data, "image": image}
    if ctype.startswith("application/json") or not ctype:
        try:
            data = await request.json()
        except ValueError as e:
            raise InvalidInput(f"body is not valid JSON: {e}") from e
        return {"data": data, "image": None}
    raise InvalidInput(f"unsupported content-type {ctype!r}: send JSON or multipart/form-data")


BodyDep = Annotated[dict[str, Any], Depends(_body)]


def _multipart_schema() -> dict[str, Any]:
    schema = ListingIn.model_json_schema()
    props = dict(schema["properties"])
    props.pop("image_base64", None)
    props["image"] = {"type": "string", "format": "binary", "description": "the photo"}
    return {**schema, "properties": props}


def _jsonable(errors: Any) -> Any:
    out = []
    for e in errors:
        out.append({k: (v if isinstance(v, str | int | float | list | type(None)) else str(v))
                    for k, v in e.items() if k in ("loc", "msg", "type")})
    return out
