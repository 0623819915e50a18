"""Request bodies: JSON or multipart, size-limited per route, parsed off the event loop.

Every body-taking route reads one flat object, as JSON (a photo as ``image_base64``) or as
``multipart/form-data`` (the photo as the file ``image``). Why this is not FastAPI's own body
handling: FastAPI binds a route to one content type and parses JSON on the event loop, with
no size or structure limit; a public API needs both content types on the same route, a size
limit per route (a search needs far less than a listing with its photo), and a bound on the
parser's work before it starts (30 MB of tiny JSON objects costs pydantic ~4 s and ~1.4 GB).
So: the size is capped while the body streams in (:func:`_capped`), the JSON's values are
counted before parsing (at most what a valid body can hold: :func:`_max_values`),
pydantic-core parses and validates in one step in a worker thread (its depth limit refuses
deep nesting; lone surrogates are refused), and multipart goes through Starlette's parser
with its per-part and per-field limits.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message

from indexer.errors import ImageTooLarge, InvalidInput, PayloadTooLarge
from indexer.images import decode_cost, decode_image, image_limits
from indexer.settings import Settings

M = TypeVar("M", bound=BaseModel)
MAX_FORM_FIELDS = 16


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: the field's name (or path)")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, string_too_long")

    @classmethod
    def of(cls, e: Mapping[str, Any]) -> FieldError:
        loc = [x if isinstance(x, str | int) else str(x) for x in e.get("loc", ())
               if x != "body"]
        return cls(loc=loc, msg=str(e.get("msg", "")), type=str(e.get("type", "")))


class Problem(BaseModel):
    """The body of every error answer."""

    detail: str = Field(description="What went wrong, in a sentence")
    errors: list[FieldError] | None = Field(
        None, description="Per field, when a body or parameter is malformed (422)")


@dataclass(frozen=True)
class Parsed(Generic[M]):
    data: M
    photo: bytes | None  # from image_base64 or the multipart file ``image``


class body(Generic[M]):  # noqa: N801 (used like a function: ``Depends(body(Model, limit))``)
    """A FastAPI dependency that reads a ``model`` as JSON or multipart, at most
    ``limit(settings)`` bytes; ``.openapi`` is the request body to declare with the route's
    ``openapi_extra``."""

    def __init__(self, model: type[M], limit: Callable[[Settings], int], *,
                 json_only: bool = False, max_values: int | None = None) -> None:
        """``json_only``: a body without a photo (multipart is refused, 415);
        ``max_values``: the bound of :func:`_max_values`, for a model it cannot compute
        (lists of strings)."""
        self.model, self.limit, self.json_only = model, limit, json_only
        self.max_values = max_values or _max_values(model)
        json_schema = model.model_json_schema()
        content: dict[str, Any] = {"application/json": {"schema": json_schema}}
        if not json_only:
            form = {**json_schema, "properties": dict(json_schema["properties"])}
            form["properties"].pop("image_base64", None)
            form["properties"]["image"] = {"type": "string", "format": "binary",
                                           "description": "the photo"}
            content["multipart/form-data"] = {"schema": form}
        self.openapi = {"requestBody": {"required": True, "content": content}}

    async def __call__(self, request: Request) -> Parsed[M]:
        settings: Settings = request.app.state.settings
        request = _capped(request, self.limit(settings))
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "multipart/form-data" and not self.json_only:
            data, photo = await self._form(request)
        elif media in ("application/json", ""):
            raw = await request.body()
            # every JSON value but the first follows a ',' '[' or '{': a cheap upper bound on
            # what the parser would build, checked before it runs
            if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > self.max_values:
                raise InvalidInput(f"the JSON body has more than {self.max_values} values; "
                                   "send one flat object")
            data = await run_in_threadpool(self._json, raw)
            photo = None
        else:
            raise UnsupportedMediaType(
                f"unsupported content type {media!r}: send application/json"
                + ("" if self.json_only else " or multipart/form-data"))
        b64 = getattr(data, "image_base64", None)
        if b64 is not None:
            if photo is not None:
                raise InvalidInput("give image_base64 or an image file, not both")
            photo = _b64(b64, settings.max_image_bytes)
        return Parsed(data, photo)

    def _json(self, raw: bytes) -> M:
        try:
            return self.model.model_validate_json(raw, strict=True)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None

    async def _form(self, request: Request) -> tuple[M, bytes | None]:
        try:
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS,
                                      max_part_size=self.limit(request.app.state.settings))
        except HTTPException as e:  # Starlette's (FastAPI's is a subclass of it)
            # its answer (400) to a malformed multipart body: a 422 like any bad input (a part
            # over max_part_size cannot happen: the whole body is capped at the same size)
            raise InvalidInput(f"malformed multipart body: {e.detail}") from None
        try:
            fields: dict[str, str] = {}
            photo = None
            for key, value in form.multi_items():
                if key in fields or (key == "image" and photo is not None):
                    raise InvalidInput(f"multipart field {key!r} given twice")
                if key == "image":
                    if not isinstance(value, UploadFile):
                        raise InvalidInput("multipart field 'image' must be a file")
                    photo = await value.read()
                elif isinstance(value, str):
                    fields[key] = value
                else:
                    raise InvalidInput(f"multipart field {key!r} must be text, not a file")
        finally:
            await form.close()
        try:
            return self.model.model_validate(fields), photo
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None


def _max_values(model: type[BaseModel]) -> int:
    """The most ',' '[' '{' a valid body of ``model`` can hold: one per field, plus every
    character of its length-limited strings (commas inside a description count too). Fields
    without a length limit hold no such character when valid (base64), so this bound never
    refuses a valid body and keeps the parser's work small (~60,000 values for a listing,
    against 5 million in 25 MB of tiny objects, which cost pydantic ~4 s and ~1.4 GB)."""
    total = len(model.model_fields) + 2
    for field in model.model_fields.values():
        total += max((getattr(m, "max_length", None) or 0 for m in field.metadata), default=0)
    return total


class UnsupportedMediaType(InvalidInput):
    """A body in a content type the route does not read (HTTP 415)."""


def _capped(request: Request, limit: int) -> Request:
    """``request`` whose body stops with :class:`PayloadTooLarge` past ``limit`` bytes.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives,
    so nothing past the limit is buffered or spooled. Not FastAPI's ``max_body_size``
    (Starlette's ``RequestBodyLimitMiddleware``): that one answers ``text/plain``, and replaces
    whatever the route answers (a 401 included) when the declared length is over the limit,
    where every error of this API is the JSON ``Problem`` its schema declares.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    upstream, seen = request.receive, 0

    async def receive() -> Message:
        nonlocal seen
        message = await upstream()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
        return message

    return Request(request.scope, receive)


def _b64(data: str, max_bytes: int) -> bytes:
    if len(data) > max_bytes * 4 // 3 + 8:
        raise ImageTooLarge(f"image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("image_base64 is not valid base64") from None


def validate_photo(raw: bytes, settings: Settings) -> None:
    """Refuse a corrupt photo or a bomb before it is accepted (the worker decodes it later).

    Decoded small (every byte is still read, so truncation is caught), but priced at the
    size the worker will decode it: a photo accepted here is never refused there."""
    limits = image_limits(settings)
    decode_image(raw, **limits, thumbnail=64)  # first: it prices WebP before opening it
    if decode_cost(raw, formats=limits["formats"]) > limits["max_decode_bytes"]:
        raise ImageTooLarge(f"photo too large to decode within "
                            f"{settings.max_image_decode_mb} MiB")


def decode_photo(raw: bytes, settings: Settings) -> Image.Image:
    """A query's photo, decoded once, at the size the encoders use."""
    return decode_image(raw, **image_limits(settings))
