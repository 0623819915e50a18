"""Safe image decoding: bounded memory per decode, format allow-list, EXIF orientation.

Photos come from untrusted sellers, and the API's ``/search`` and ``/classify`` need no key.
Pillow decodes lazily, so everything below is decided from the header, before any pixel is
decoded; a truncated or corrupt file fails here with an :class:`ImageError` that names the
reason instead of deep inside an encoder.

Memory per decode
-----------------
Every decode is priced from its header (:func:`decode_cost`) and refused with
:class:`ImageTooLarge` when the price is over ``max_decode_bytes`` (``Settings.
max_image_decode_mb``, 160 MiB by default), so the pixel cap depends on the format; the
price is what the decoder really allocates (measured with ``ru_maxrss``, see the tests):

=========================  ===============================================  ===============
format                     resident memory of the decode                    largest 4:3
                                                                            photo at 160 MiB
=========================  ===============================================  ===============
JPEG, one scan (phones,    decoded at 1/2..1/8 scale (``draft``): 4 B per   100 MP (the
cameras, most of the web)  *output* pixel; 48 MP: 17 MiB                    pixel cap)
JPEG, progressive or       plus libjpeg's whole-image coefficient buffer,   4:2:0 ~44 MP,
several scans              128 B per 8x8 block per component: 3 B/px in     4:4:4 ~24 MP,
                           4:2:0, 6 in 4:4:4, 8 in CMYK                     CMYK ~18 MP
PNG, GIF (first frame)     the full-size decode buffer: 4 B/px (RGB, RGBA), RGB(A) ~37 MP,
                           2 (16-bit grey), 1 (palette, grey)               palette 100 MP
WebP                       libwebp's two RGBA canvases, Pillow's copy of    ~9.5 MP
                           the frame and its image: 16 B/px
=========================  ===============================================  ===============

plus, whatever the format, the reduced intermediate (< 2x the output per side: at most
16 MiB at ``thumbnail=1024``), the output (4 MiB), the tile being converted (4 MiB) and 4 MiB
of decoder state (PNG: 2 MiB more of text chunks and ICC profile, a cap lowered from
Pillow's 64 MiB). The full-size buffer is never copied: conversion to RGB, flattening on
white and the integer-factor reduction run tile by tile (:func:`_shrink`), and the EXIF
orientation is applied to the small result. So one decode holds at most
``max_decode_bytes``, plus the encoded bytes themselves (``max_bytes``, 20 MiB) and the
metadata Pillow copies out of them (less than their size).

Measured peaks (RSS above the process's, one decode, ``thumbnail=1024``; before = the
previous decoder, which copied the full-size image 2-4 times and did not reduce elongated
JPEGs): 25 MP RGBA PNG (110 KB) 107 MiB, before 400 MiB; 25 MP RGB PNG 106 MiB, before
223 MiB; 25 MP GIF 37 MiB, before 153 MiB; 6 MP WebP 89 MiB, before 103 MiB; 40000x800 JPEG
< 1 MiB, before 243 MiB; 48 MP JPEG 17 MiB, before 29 MiB; 100 MP JPEG 11 MiB, before
18 MiB; 25 MP progressive JPEG 75 MiB (4:2:0), 147 MiB (4:4:4), unchanged. Refused now,
in < 1 ms and < 1 MiB: 100 MP RGBA PNG (before 1616 MiB), 25 MP WebP (before 413 MiB),
16 MP WebP (before 258 MiB), 30 MP 4:4:4 progressive JPEG (before 176 MiB).

Concurrency
-----------
A decode priced over :data:`LARGE_DECODE_BYTES` (16 MiB) takes one of ``decode_slots``
process-wide slots (``Settings.image_decode_slots``; 0 = one per CPU core) for as long as its
full-size buffers live, and waits for one when all are taken; small photos (about 1 MP and
less) go through. Decoding is CPU-bound (Pillow releases the GIL), so slots = cores costs
no throughput. So the photo decodes of a process never hold more than about
``slots x max_decode_bytes + threads x 16 MiB`` however many requests arrive at once.

Formats
-------
Only photo formats are opened (``formats``, ``Settings.image_formats``: JPEG -- MPO
included, the multi-picture JPEG of many phones --, PNG, WebP, GIF's first frame). Anything
else (TIFF, BMP, PSD, ICO, EPS...) is "not a recognised image format": those decoders are
more attack surface, and their memory is not priced here.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import ImageError, ImageTooLarge

if TYPE_CHECKING:
    from .settings import Settings

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_DECODE_BYTES = 160 * 1024 * 1024
DEFAULT_THUMBNAIL = 1024  # the encoders letterbox to 224-299 px
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
#: the formats whose decode memory :func:`decode_cost` knows how to price
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
#: decodes priced above this take a slot (see the module docstring)
LARGE_DECODE_BYTES = 16 * 1024 * 1024

#: a decoded photo, as :func:`decode_image` returns it and the pipeline takes it
Photo = Image.Image

_TILE = 512  # pixels per side of the tiles converted and reduced at a time
_WEBP_BYTES_PER_PIXEL = 16  # libwebp's 2 RGBA canvases + Pillow's frame copy and image
#: PNG text chunks (zTXt, iTXt) are inflated when the file is opened, by default up to 64 MiB
#: out of a 70 KB file; a photo's text is of no use here, so Pillow's cap is lowered to this
#: (process-wide: more text is "corrupt or truncated")
PNG_TEXT_BYTES = 1024 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, PNG_TEXT_BYTES)
_OVERHEAD = 4 * 1024 * 1024  # decoder state, allocator slack (measured: < 2 MiB)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageLimits(TypedDict, total=False):
    """Keyword arguments of :func:`decode_image` taken from the settings."""

    max_bytes: int
    max_pixels: int
    max_decode_bytes: int
    formats: Sequence[str]
    decode_slots: int


def image_limits(settings: Settings) -> ImageLimits:
    """The limits of :func:`decode_image` configured in ``settings``.

    Every decode of the process uses them: ``decode_image(raw, **image_limits(settings))``
    is what :class:`indexer.pipeline.Vitrine` runs on a photo given as bytes or a path, so a
    photo decoded by the API this way is the same one the pipeline would have decoded.
    """
    return ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        max_decode_bytes=settings.max_image_decode_mb * 1024 * 1024,
        formats=tuple(settings.image_formats),
        decode_slots=settings.image_decode_slots,
    )


def read_image_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a photo file, refusing files over ``max_bytes`` before reading them."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"photo not found: {p}") from None
    except OSError as e:
        raise ImageError(f"photo unreadable: {p}: {e.strerror}") from None
    if size > max_bytes:
        raise ImageTooLarge(f"photo too large: {size} bytes > limit {max_bytes}")
    if size == 0:
        raise ImageError(f"photo is empty: {p}")
    return p.read_bytes()


def load_photo(image: bytes | str | Path | Photo | None, limits: ImageLimits) -> Photo | None:
    """A listing's photo as the encoders take it: decoded with ``limits`` from bytes or a
    file, or, when given already decoded (a ``PIL.Image``, e.g. by the API, which decodes to
    validate), used as it is (:func:`as_photo`: no second decode). None when there is none."""
    if image is None:
        return None
    if isinstance(image, Photo):
        return as_photo(image)
    max_bytes = limits.get("max_bytes", DEFAULT_MAX_BYTES)
    raw = image if isinstance(image, bytes) else read_image_bytes(image, max_bytes)
    return decode_image(raw, **limits)


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnail: int | None = DEFAULT_THUMBNAIL,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    formats: Sequence[str] = DEFAULT_FORMATS,
    decode_slots: int = 0,
) -> Photo:
    """Decode untrusted image bytes into an upright RGB ``PIL.Image``, in bounded memory.

    Args:
        data: the encoded image (JPEG, PNG, WebP, GIF first frame...).
        max_bytes: refuse larger payloads before decoding.
        max_pixels: refuse images whose header announces more pixels (decompression bombs),
            whatever the format.
        thumbnail: downscale so the longest side is at most this many pixels (the encoders
            work at 224-299 px). JPEGs are downscaled while decoding (``draft``), other
            formats tile by tile. None: full size (the output then adds 4 B/px to the
            price).
        max_decode_bytes: refuse images whose decode would hold more memory than this
            (see the table of the module docstring: ~37 MP for an RGBA PNG, ~9.5 MP for a
            WebP, 100 MP for a baseline JPEG at the default 160 MiB).
        formats: the Pillow formats accepted; others are "not a recognised image format".
        decode_slots: how many decodes over :data:`LARGE_DECODE_BYTES` may run at once in
            this process (0 = the number of CPU cores).

    Returns:
        an RGB image whose longest side is at most ``thumbnail``, EXIF orientation applied,
        transparency flattened on white.

    Raises:
        ImageTooLarge: over ``max_bytes``, or a decode over ``max_decode_bytes``.
        ImageError: empty, bomb (over ``max_pixels``), truncated, corrupt, unknown or
            refused format.
    """
    if not data:
        raise ImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image too large: {len(data)} bytes > limit {max_bytes}")
    accepted = _formats(formats)
    try:
        with warnings.catch_warnings(), ExitStack() as slot:
            # Pillow warns between MAX_IMAGE_PIXELS and 2x; we enforce our own limit instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # the helper's frame, and with it every full-size buffer, is gone when it
            # returns: before ``slot`` gives the decode slot back
            return _decode(
                data, accepted, slot, max_pixels, thumbnail, max_decode_bytes, decode_slots
            )
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        why = f"image refused as a decompression bomb: {e}"
    except UnidentifiedImageError:
        why = "not a recognised image format (accepted: " + ", ".join(accepted) + ")"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow raises OSError for truncated files ("image file is truncated") and
        # SyntaxError/ValueError for some corrupt headers.
        why = f"corrupt or truncated image: {e}"
    # raised out of the except clauses: the ImageError keeps no reference to the failed
    # decode (its traceback would keep the decoder's buffers alive)
    raise ImageError(why)


def _decode(
    data: bytes,
    accepted: list[str],
    slot: ExitStack,
    max_pixels: int,
    thumbnail: int | None,
    max_decode_bytes: int,
    decode_slots: int,
) -> Photo:
    webp = _webp_size(data) if "WEBP" in accepted else None
    if webp is not None:
        # libwebp allocates its canvases when the file is opened: price it first
        _check(
            "WEBP", webp, webp[0] * webp[1] * _WEBP_BYTES_PER_PIXEL, max_pixels, max_decode_bytes
        )
    img = Image.open(io.BytesIO(data), formats=accepted)
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError("image has no pixels")
        _check_pixels(img.format or "?", (w, h), max_pixels)
        target, cost = _prepare(img, data, thumbnail)
        _check(img.format or "?", (w, h), cost, max_pixels, max_decode_bytes)
        if cost > LARGE_DECODE_BYTES:
            slot.enter_context(_SLOTS.hold(decode_slots or len(os.sched_getaffinity(0))))
        return _decode_large(img, target)
    finally:
        img.close()


def decode_cost(
    data: bytes,
    *,
    thumbnail: int | None = DEFAULT_THUMBNAIL,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> int:
    """The resident bytes :func:`decode_image` would hold to decode ``data`` (its price,
    compared with ``max_decode_bytes``), read from the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_formats(formats))
            try:
                return _prepare(img, data, thumbnail)[1]
            finally:
                img.close()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"not a decodable image: {e}") from None


def _prepare(
    img: Image.Image, data: bytes, thumbnail: int | None
) -> tuple[tuple[int, int] | None, int]:
    """Set up the decode of ``img`` (opened, not loaded): ``(output size, price)``."""
    size = img.size
    target = _fit(size, thumbnail)
    if target is not None and _is_jpeg(img):
        img.draft("RGB", target)  # decoded at 1/2, 1/4 or 1/8 scale
    return target, _price(img, data, size, target)


def _formats(formats: Sequence[str]) -> list[str]:
    out = [f.upper() for f in formats]
    unknown = sorted(set(out) - set(SUPPORTED_FORMATS))
    if unknown:
        raise ValueError(
            f"image formats {unknown} are not supported (known: {', '.join(SUPPORTED_FORMATS)})"
        )
    return out  # JPEG opens MPO files too (a phone JPEG with a second picture)


def _is_jpeg(img: Image.Image) -> bool:
    return img.format in ("JPEG", "MPO")


def _check_pixels(fmt: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError(
            f"image refused as a decompression bomb: {fmt} {w}x{h} = {w * h} pixels "
            f"> limit {max_pixels}"
        )


def _check(
    fmt: str, size: tuple[int, int], cost: int, max_pixels: int, max_decode_bytes: int
) -> None:
    _check_pixels(fmt, size, max_pixels)
    if cost > max_decode_bytes:
        w, h = size
        raise ImageTooLarge(
            f"image too large to decode: {fmt} {w}x{h} would take ~{cost >> 20} MiB "
            f"> limit {max_decode_bytes >> 20} MiB; send a smaller photo (a JPEG of up to "
            f"{max_pixels // 1_000_000} MP, or fewer pixels in other formats)"
        )


def _fit(size: tuple[int, int], thumbnail: int | None) -> tuple[int, int] | None:
    """The size of a thumbnail fitting ``thumbnail`` x ``thumbnail``; None: no downscale."""
    w, h = size
    if not thumbnail or thumbnail <= 0 or max(w, h) <= thumbnail:
        return None
    if w >= h:
        return thumbnail, max(1, round(h * thumbnail / w))
    return max(1, round(w * thumbnail / h)), thumbnail


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a Pillow image of ``mode`` in memory (RGB is stored as RGBX)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _price(
    img: Image.Image, data: bytes, size: tuple[int, int], target: tuple[int, int] | None
) -> int:
    """Resident bytes the decode of ``img`` (opened, drafted, not loaded) holds at its peak.

    ``size`` is the size in the header; ``img.size`` is the (drafted) size the decoder
    produces. See the table of the module docstring.
    """
    w, h = size
    ow, oh = img.size
    if _is_jpeg(img):
        sof, scans = _jpeg_frame(data)
        lossless = sof in (0xC3, 0xC7, 0xCB, 0xCF)  # no DCT: no scaled decode
        main = 4 * (w * h if lossless else ow * oh)
        if img.info.get("progressive") or scans > 1:
            main += _jpeg_coefficients(img, size)
    elif img.format == "WEBP":
        main = w * h * _WEBP_BYTES_PER_PIXEL
    else:
        main = w * h * _pixel_bytes(img.mode)
        if img.format == "PNG":
            main += PNG_TEXT_BYTES + PngImagePlugin.MAX_TEXT_CHUNK  # text, ICC profile
    if target is None:
        fx, fy = 1, 1
        rest = 4 * ow * oh  # the full-size RGB output
    else:
        fx, fy = _factors((ow, oh), target)
        if (fx, fy) == (1, 1) and img.mode == "RGB":
            return main + 4 * target[0] * target[1] + _OVERHEAD  # resized at once
        rest = 4 * math.ceil(ow / fx) * math.ceil(oh / fy) + 4 * target[0] * target[1]
    tw, th = _tile((ow, oh), (fx, fy))
    # a tile: its crop, RGBA conversion, white background, alpha band and reduction
    return main + rest + 16 * tw * th + _OVERHEAD


def _jpeg_coefficients(img: Image.Image, size: tuple[int, int]) -> int:
    """libjpeg's whole-image DCT coefficient buffer: 64 int16 per 8x8 block per component."""
    w, h = size
    layers = getattr(img, "layer", None) or [(0, 1, 1, 0)] * 3
    hmax = max(max(c[1] for c in layers), 1)
    vmax = max(max(c[2] for c in layers), 1)
    blocks = 0
    for _, hs, vs, _ in layers:
        bw = math.ceil(math.ceil(w * max(hs, 1) / hmax) / 8)
        bh = math.ceil(math.ceil(h * max(vs, 1) / vmax) / 8)
        # rounded up to whole MCUs
        bw = math.ceil(bw / max(hs, 1)) * max(hs, 1)
        bh = math.ceil(bh / max(vs, 1)) * max(vs, 1)
        blocks += bw * bh
    return blocks * 128


_SEGMENT = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker in entropy-coded data


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """``(marker, offset)`` of the main image's markers after SOI, in file order, the way
    libjpeg reads them (segments skipped by length, scans skipped to the next marker)."""
    pos, n = 2, len(data)
    in_scan = False
    while pos < n - 1:
        if in_scan:
            m = _SEGMENT.search(data, pos)
            if m is None:
                return
            pos = m.start()
        elif data[pos] != 0xFF:
            nxt = data.find(b"\xff", pos)
            if nxt < 0:
                return
            pos = nxt
        while pos < n - 1 and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n - 1:
            return
        marker = data[pos + 1]
        yield marker, pos
        if marker == 0xD9:  # EOI
            return
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > n:
            return
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
        in_scan = marker == 0xDA


def _jpeg_frame(data: bytes) -> tuple[int | None, int]:
    """The main image's SOF marker and its number of scans, counted up to 2 (with more
    than one scan, libjpeg buffers every DCT coefficient of the image, like for a
    progressive JPEG)."""
    sof, scans = None, 0
    for marker, _ in _jpeg_segments(data):
        if sof is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            sof = marker
        elif marker == 0xDA:
            scans += 1
            if scans > 1:
                break
    return sof, scans


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size in a WebP header, None when ``data`` is not a WebP file."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    if chunk == b"VP8X":
        return (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _factors(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Integer reduction factors leaving at least ``target`` (less than 2x it per side)."""
    return max(1, size[0] // target[0]), max(1, size[1] // target[1])


def _tile(size: tuple[int, int], factors: tuple[int, int]) -> tuple[int, int]:
    """The size of the tiles :func:`_shrink` converts at a time (multiples of the factors)."""
    (w, h), (fx, fy) = size, factors
    return min(w, fx * max(1, _TILE // fx)), min(h, fy * max(1, _TILE // fy))


def _decode_large(img: Image.Image, target: tuple[int, int] | None) -> Photo:
    """Decode ``img`` (opened) and return it small, RGB and upright.

    Runs under a decode slot when the decode is large; the full-size buffers live only in
    this call.
    """
    img.load()
    orientation = _orientation(img)
    out = _shrink(img, target)
    method = _ORIENTATION.get(orientation)
    return out.transpose(method) if method is not None else out


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block must not cost the photo
        return 1
    return value if isinstance(value, int) else 1


def _shrink(img: Image.Image, target: tuple[int, int] | None) -> Photo:
    """RGB, flattened on white and resized to ``target``, tile by tile.

    Each tile is cropped, converted and reduced by the integer factors on its own (tiles
    are aligned on the factors, so the result is the one of a whole-image reduction): no
    full-size copy of the decoded image is ever made.
    """
    w, h = img.size
    fx, fy = _factors((w, h), target) if target is not None else (1, 1)
    if target is not None and (fx, fy) == (1, 1) and img.mode == "RGB":
        return img.resize(target, Image.Resampling.BILINEAR)  # e.g. a drafted JPEG
    if w * h <= _TILE * _TILE:
        small = _to_rgb(img)
        if (fx, fy) != (1, 1):
            small = small.reduce((fx, fy))
        elif small is img:
            small = img.copy()  # the opened file is closed after this
    else:
        tw, th = _tile((w, h), (fx, fy))
        small = Image.new("RGB", (math.ceil(w / fx), math.ceil(h / fy)))
        for y in range(0, h, th):
            for x in range(0, w, tw):
                part = _to_rgb(img.crop((x, y, min(w, x + tw), min(h, y + th))))
                if (fx, fy) != (1, 1):
                    part = part.reduce((fx, fy))
                small.paste(part, (x // fx, y // fy))
    if target is None or small.size == target:
        return small
    box = (0.0, 0.0, w / fx, h / fy)  # the partial last row/column of the reduction
    return small.resize(target, Image.Resampling.BILINEAR, box=box)


def _to_rgb(img: Image.Image) -> Photo:
    """Flatten transparency onto white (product photos are shot on white backgrounds)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


class _DecodeSlots:
    """A counting semaphore whose capacity is given by each caller (the settings of the
    process), so that a changed setting never leaves two semaphores side by side."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    @contextmanager
    def hold(self, capacity: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._busy < max(1, capacity))
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                # all: a waiter woken by notify() may hold a smaller capacity and go back to
                # sleep, swallowing the wake-up another waiter needed
                self._cond.notify_all()


_SLOTS = _DecodeSlots()


def as_photo(img: Photo, thumbnail: int | None = DEFAULT_THUMBNAIL) -> Photo:
    """An already decoded photo as :func:`decode_image` returns them: ``img`` itself (no
    copy, no decode) when it is RGB and fits ``thumbnail``, else converted and reduced."""
    if img.mode == "RGB" and (not thumbnail or max(img.size) <= thumbnail):
        return img
    return _shrink(img, _fit(img.size, thumbnail))
