"""Listing thumbnails: the small photo shown in search results and on the pages.

A thumbnail is made once, when a listing is indexed (:func:`indexer.ingest.decide`) or its
catalog is seeded (:func:`indexer.runtime.seed`), and kept by the state store next to the
listing's status (SQLite table ``thumbs`` in the data dir, or Redis hashes ``thumb`` and
``thumbtag``), so every API process of a Redis deployment serves the same bytes. It is
committed with the listing's outcome and removed with its delete, in the same atomic step.

The photo is decoded with the process's image limits (:func:`indexer.images.decode_image`:
the same refusals as the encoders), reduced to :data:`THUMB_PX` on its longest side and
saved as JPEG: ~5-15 KB per listing.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ImageError
from .images import ImageLimits, decode_image, read_image_bytes

if TYPE_CHECKING:
    from PIL.Image import Image as Photo

THUMB_PX = 256  # longest side: a results grid shows them at 128-200 CSS px (2x screens)
THUMB_QUALITY = 80
THUMB_TYPE = "image/jpeg"


def etag(data: bytes) -> str:
    """The thumbnail's entity tag (content hash): it changes exactly when the bytes do."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def make_thumbnail(image: bytes | str | Path | Photo | None,
                   limits: ImageLimits) -> bytes | None:
    """A JPEG of ``image`` (bytes, a file, or a decoded photo) at most :data:`THUMB_PX` on
    its longest side; None when there is no photo or it cannot be decoded (the listing is
    then indexed from its text, and the pipeline reports why)."""
    if image is None:
        return None
    try:
        if isinstance(image, str | Path):
            image = read_image_bytes(image, limits.get("max_bytes", 20 * 1024 * 1024))
        if isinstance(image, bytes):
            img = decode_image(image, **limits, thumbnail=THUMB_PX)
        else:
            img = image.convert("RGB") if image.mode != "RGB" else image.copy()
            img.thumbnail((THUMB_PX, THUMB_PX))
    except ImageError:
        return None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return buf.getvalue()


def make_thumbnails(items: Iterable[tuple[str, bytes | str | Path | Photo | None]],
                    limits: ImageLimits, threads: int = 2
                    ) -> Iterator[tuple[str, str, bytes]]:
    """``(id, etag, jpeg)`` for each item whose photo decodes; Pillow releases the GIL
    while decoding, so a few threads shorten a catalog's seeding."""
    listed: Sequence[tuple[str, bytes | str | Path | Photo | None]] = list(items)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="thumbs") as pool:
        for (lid, _), jpeg in zip(listed, pool.map(lambda x: make_thumbnail(x[1], limits),
                                                   listed), strict=True):
            if jpeg is not None:
                yield lid, etag(jpeg), jpeg
