"""Safe image decoding: size limits, decompression-bomb refusal, EXIF orientation.

Photos come from untrusted sellers. Pillow decodes lazily, so the header is checked
(pixel count) before any pixel is decoded, and a truncated or corrupt file fails here with
an :class:`ImageError` that names the reason instead of deep inside an encoder.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLarge

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000


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


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    thumbnail: int | None = 1024,
) -> Image.Image:
    """Decode untrusted image bytes into an upright RGB ``PIL.Image``.

    Args:
        data: the encoded image (JPEG, PNG, WebP, GIF first frame...).
        max_bytes: refuse larger payloads before decoding.
        max_pixels: refuse images whose header announces more pixels (decompression bombs).
        thumbnail: downscale so the longest side is at most this many pixels (the encoders
            work at 224-299 px; decoding a 9000 px photo at full size wastes memory). JPEGs
            are downscaled during decoding via ``draft``, which is much cheaper.

    Raises:
        ImageError: empty, oversized, bomb, truncated, corrupt or unknown-format input.
    """
    if not data:
        raise ImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image too large: {len(data)} bytes > limit {max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and 2x; we enforce our own limit instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError("image has no pixels")
            if w * h > max_pixels:
                raise ImageError(
                    f"image refused as a decompression bomb: {w}x{h} = {w * h} pixels "
                    f"> limit {max_pixels}"
                )
            if thumbnail and img.format == "JPEG":
                img.draft("RGB", (thumbnail, thumbnail))
            img.load()
            out: Image.Image = ImageOps.exif_transpose(img) or img
            if out.mode != "RGB":
                out = _to_rgb(out)
            if thumbnail and max(out.size) > thumbnail:
                out.thumbnail((thumbnail, thumbnail), Image.Resampling.BILINEAR)
            return out
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow raises OSError for truncated files ("image file is truncated") and
        # SyntaxError/ValueError for some corrupt headers.
        raise ImageError(f"corrupt or truncated image: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten transparency onto white (product photos are shot on white backgrounds)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")
