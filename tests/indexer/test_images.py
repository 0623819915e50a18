import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer import images
from indexer.errors import ImageError, ImageTooLarge
from indexer.images import decode_cost, decode_image, image_limits, read_image_bytes


def _jpeg(w=64, h=32, color=(200, 10, 10), exif=None) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), color)
    kw = {"exif": exif} if exif is not None else {}
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_decodes_to_rgb():
    img = decode_image(_jpeg())
    assert img.mode == "RGB" and img.size == (64, 32)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img = decode_image(_jpeg(64, 32, exif=exif.tobytes()))
    assert img.size == (32, 64)


def test_transparency_is_flattened_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buf, "PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_large_photos_are_downscaled():
    img = decode_image(_jpeg(3000, 1500), thumbnail=1024)
    assert max(img.size) <= 1024


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image"),
        (_jpeg()[:200], "corrupt or truncated"),
    ],
)
def test_bad_bytes_get_a_clear_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, "PNG")  # 144 Mpx, a few KB compressed
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(buf.getvalue(), max_pixels=100_000_000)


def test_size_limits(tmp_path):
    data = _jpeg()
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_bytes=100)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    assert read_image_bytes(p) == data
    with pytest.raises(ImageError, match="too large"):
        read_image_bytes(p, max_bytes=100)
    with pytest.raises(ImageError, match="not found"):
        read_image_bytes(tmp_path / "missing.jpg")


# --- bounded memory per decode -------------------------------------------------------------
# The big photos are made (and measured) in child processes: their pixels never live in the
# test process, and ``ru_maxrss`` (a high-water mark) measures one decode only.

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024

_MAKE = r"""
import sys
from pathlib import Path
from PIL import Image, ImageDraw

out = Path(sys.argv[1])

def photo(mode, w, h):
    # a product on a plain background: compresses to ~100 KB however many pixels
    im = Image.new(mode, (w, h), 0 if mode == "P" else (255,) * len(mode))
    d = ImageDraw.Draw(im)
    fill = 7 if mode == "P" else (200, 30, 30, 255)[: len(mode)]
    d.rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=fill)
    if mode == "RGBA":
        d.rectangle((0, 0, w // 8, h // 8), fill=(0, 0, 0, 0))
    return im

photo("RGBA", 5000, 5000).save(out / "rgba_25mp.png")
photo("P", 5000, 5000).save(out / "p_25mp.gif")
photo("RGB", 2500, 2500).save(out / "rgb_6mp.webp", lossless=True)
photo("RGB", 5000, 5000).save(out / "rgb_25mp.webp", lossless=True)
photo("RGB", 8000, 6000).save(out / "rgb_48mp.jpg", quality=90)
photo("RGB", 40000, 800).save(out / "rgb_long_32mp.jpg", quality=90)
photo("RGB", 5000, 5000).save(out / "prog420_25mp.jpg", quality=90, progressive=True)
photo("RGB", 6000, 5000).save(out / "prog444_30mp.jpg", quality=90, progressive=True,
                              subsampling=0)
"""

# decodes one file after a warm-up decode of a small photo of the same format; prints the
# peak RSS growth of the decode
_MEASURE = r"""
import io, json, resource, sys
from PIL import Image
from indexer.errors import ImageError
from indexer.images import decode_image

path, fmt = sys.argv[1], sys.argv[2]
data = open(path, "rb").read()
small = io.BytesIO()
Image.new("RGBA" if fmt in ("PNG", "WEBP") else "RGB", (700, 500), "white").save(small, fmt)
decode_image(small.getvalue())
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    out = {"size": list(decode_image(data).size)}
except ImageError as e:
    out = {"error": type(e).__name__, "message": str(e)}
out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(out))
"""


def _png_header(w: int, h: int, color_type: int = 6) -> bytes:
    """A PNG announcing ``w`` x ``h`` pixels with a few rows of data: what a refusal reads."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    rows = zlib.compress(b"\0" + b"\xff" * 4 * w)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("big-photos")
    subprocess.run([sys.executable, "-c", _MAKE, str(out)], check=True, cwd=ROOT, timeout=120)
    (out / "rgba_100mp.png").write_bytes(_png_header(10_000, 10_000))
    return out


def _measure(path: Path) -> dict:
    fmt = {".png": "PNG", ".gif": "GIF", ".webp": "WEBP", ".jpg": "JPEG"}[path.suffix]
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize(
    "name, size, bound_mib",
    [
        # 110 KB; the previous decoder took 400 MiB (4 full-size copies)
        ("rgba_25mp.png", (1024, 1024), 128),
        # palette: 1 B/px decoded, converted tile by tile (before: 153 MiB)
        ("p_25mp.gif", (1024, 1024), 48),
        # 16 B/px (libwebp's canvases + Pillow's copies): 6 MP is ~100 MiB
        ("rgb_6mp.webp", (1024, 1024), 128),
        # decoded at 1/8 scale
        ("rgb_48mp.jpg", (1024, 768), 24),
        # elongated: drafted on its long side (before: decoded at full size, ~300 MiB)
        ("rgb_long_32mp.jpg", (1024, 20), 16),
        # progressive: libjpeg holds every coefficient, 3 B/px in 4:2:0
        ("prog420_25mp.jpg", (1024, 1024), 100),
    ],
)
def test_large_photos_decode_within_their_price(big, name, size, bound_mib):
    data = (big / name).read_bytes()
    price = decode_cost(data)
    assert price <= images.DEFAULT_MAX_DECODE_BYTES
    got = _measure(big / name)
    assert got.get("size") == list(size), got
    # the price is an upper bound of what the decode holds, and the decode fits the bound
    assert got["peak_mib"] <= price / MiB + 4, (got, price / MiB)
    assert got["peak_mib"] < bound_mib, got


@pytest.mark.parametrize("name", ["rgba_100mp.png", "rgb_25mp.webp", "prog444_30mp.jpg"])
def test_photos_over_the_budget_are_refused_before_decoding(big, name):
    data = (big / name).read_bytes()
    assert decode_cost(data) > images.DEFAULT_MAX_DECODE_BYTES
    got = _measure(big / name)
    assert got.get("error") == "ImageTooLarge", got
    assert "too large to decode" in got["message"]
    assert got["peak_mib"] < 8, got  # nothing was decoded


def _rgba_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (w, h), (10, 200, 10, 128)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _webp(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 10)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def test_the_pixel_cap_depends_on_the_format():
    png, webp = _rgba_png(2000, 2000), _webp(2000, 2000)
    # the same 4 MP: ~4 B/px decoded as a PNG, ~16 B/px as a WebP
    assert decode_cost(png) < 48 * MiB < 64 * MiB < decode_cost(webp)
    assert decode_image(png, max_decode_bytes=48 * MiB).size == (1024, 1024)
    with pytest.raises(ImageTooLarge, match="WEBP 2000x2000 would take"):
        decode_image(webp, max_decode_bytes=48 * MiB)
    assert decode_image(webp, max_decode_bytes=80 * MiB).size == (1024, 1024)
    # JPEG: decoded at reduced scale, the price hardly depends on the pixels
    assert decode_cost(_jpeg(8000, 6000)) < 24 * MiB


def test_limits_come_from_the_settings():
    from indexer.settings import Settings

    limits = image_limits(
        Settings(max_image_decode_mb=32, image_formats=["PNG"], image_decode_slots=3)
    )
    assert limits == {
        "max_bytes": 20 * MiB,
        "max_pixels": 100_000_000,
        "max_decode_bytes": 32 * MiB,
        "formats": ("PNG",),
        "decode_slots": 3,
    }
    with pytest.raises(ImageTooLarge):
        decode_image(_rgba_png(3000, 3000), **limits)
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(_jpeg(), **limits)
    defaults = image_limits(Settings())
    assert defaults["formats"] == ("JPEG", "PNG", "WEBP", "GIF")
    assert defaults["max_decode_bytes"] == images.DEFAULT_MAX_DECODE_BYTES


@pytest.mark.parametrize(
    "fmt, kw", [("TIFF", {}), ("BMP", {}), ("ICO", {}), ("PCX", {}), ("PPM", {})]
)
def test_other_formats_are_refused(fmt, kw):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, fmt, **kw)
    with pytest.raises(ImageError, match="not a recognised image format"):
        decode_image(buf.getvalue())


def test_tiled_conversion_equals_the_whole_image_one():
    # RGBA with varying alpha, bigger than a tile: flattening + reducing tile by tile must
    # give exactly the whole-image result
    w, h = 1500, 1100
    r = Image.linear_gradient("L").resize((w, h))
    g = r.transpose(Image.Transpose.ROTATE_180)
    a = Image.radial_gradient("L").resize((w, h))
    rgba = Image.merge("RGBA", (r, g, r, a))
    buf = io.BytesIO()
    rgba.save(buf, "PNG", compress_level=1)
    got = decode_image(buf.getvalue(), thumbnail=400)
    flat = Image.new("RGB", (w, h), (255, 255, 255))
    flat.paste(rgba, mask=a)
    want = flat.reduce((3, 3)).resize(got.size, Image.Resampling.BILINEAR, box=(0, 0, w / 3, h / 3))
    assert got.size == (400, 293)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_exif_orientation_is_applied_to_a_large_photo():
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise on display
    assert decode_image(_jpeg(3000, 1500, exif=exif.tobytes())).size == (512, 1024)
    buf = io.BytesIO()
    Image.new("RGBA", (3000, 1500), (0, 0, 0, 0)).save(buf, "PNG", exif=exif.tobytes())
    img = decode_image(buf.getvalue())
    assert img.size == (512, 1024) and img.getpixel((5, 5)) == (255, 255, 255)


def test_jpeg_scans_are_counted_like_libjpeg_does():
    baseline = _jpeg(640, 480)
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), "red").save(buf, "JPEG", progressive=True)
    progressive = buf.getvalue()
    assert images._jpeg_frame(baseline) == (0xC0, 1)
    assert images._jpeg_frame(progressive) == (0xC2, 2)
    # a JPEG inside a metadata segment (an EXIF thumbnail) has scans that are not counted
    app = b"\xff\xe2" + struct.pack(">H", len(progressive) + 2) + progressive
    with_thumb = baseline[:2] + app + baseline[2:]
    assert images._jpeg_frame(with_thumb) == (0xC0, 1)
    assert decode_image(with_thumb).size == (640, 480)
    # a sequential JPEG with several scans: libjpeg buffers its coefficients, priced so
    i = progressive.find(b"\xff\xc2")
    multi_scan = progressive[:i] + b"\xff\xc0" + progressive[i + 2 :]
    assert images._jpeg_frame(multi_scan) == (0xC0, 2)
    big_multi = _jpeg_like(multi_scan, 8000, 6000)
    assert decode_cost(big_multi) > decode_cost(_jpeg_like(baseline, 8000, 6000)) + 70 * MiB


def _jpeg_like(data: bytes, w: int, h: int) -> bytes:
    """``data`` with the frame header announcing ``w`` x ``h`` (for pricing only)."""
    for sof in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(sof)
        if i >= 0:
            return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9 :]
    raise AssertionError("no frame header")


# --- concurrent large decodes --------------------------------------------------------------
@pytest.fixture
def in_decode(monkeypatch):
    """Counts the decodes running their full-size part at once (a test wrapper)."""
    state = {"now": 0, "max": 0}
    lock = threading.Lock()
    real = images._decode_large

    def counting(img, target):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.05)  # make overlaps likely
            return real(img, target)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(images, "_decode_large", counting)
    return state


def test_large_decodes_never_exceed_the_slots(in_decode):
    data = _rgba_png(2000, 2000)
    assert decode_cost(data) > images.LARGE_DECODE_BYTES
    errors: list[BaseException] = []

    def work():
        try:
            decode_image(data, decode_slots=2)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert in_decode["max"] == 2
    assert images._SLOTS.busy == 0


def test_small_decodes_do_not_wait_for_a_slot():
    small, large = _jpeg(400, 300), _rgba_png(2000, 2000)
    assert decode_cost(small) <= images.LARGE_DECODE_BYTES < decode_cost(large)
    done: dict[str, Image.Image] = {}
    threads = {
        k: threading.Thread(
            target=lambda k=k, d=d: done.update({k: decode_image(d, decode_slots=1)})
        )
        for k, d in (("small", small), ("large", large))
    }
    with images._SLOTS.hold(1):  # every slot taken
        for t in threads.values():
            t.start()
        threads["small"].join(10)
        assert "small" in done
        time.sleep(0.2)
        assert "large" not in done and threads["large"].is_alive()
    threads["large"].join(10)
    assert done["large"].size == (1024, 1024)


# --- each photo decoded once per request -----------------------------------------------------
class _PhotoEncoder:
    dim = 4

    def __init__(self) -> None:
        self.seen: list[Image.Image] = []
        self.calls: list[int] = []

    def encode(self, imgs, progress=None):
        self.seen.extend(imgs)
        self.calls.append(len(imgs))
        return np.ones((len(imgs), self.dim), np.float32)


class _Registry:
    def __init__(self) -> None:
        self.encoder = _PhotoEncoder()

    def get(self, kind, spec):
        assert kind == "image"
        return self.encoder


@pytest.fixture
def photo_only(monkeypatch):
    """A Vitrine with only a (fake) image encoder, and a count of the pipeline's decodes."""
    from indexer import pipeline
    from indexer.catalog import Listing
    from indexer.settings import Settings

    calls = []
    original = images.decode_image

    def counting(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    # where the pipeline's photos are decoded (load_photo)
    monkeypatch.setattr(images, "decode_image", counting)
    registry = _Registry()
    v = pipeline.Vitrine(
        Settings(text_model="none", image_model="fake:photo", lexical=False, encode_lanes=1),
        registry,
    )  # type: ignore[arg-type]
    v.create_empty()
    v.upsert([Listing("a", "", image=_jpeg(640, 480))])
    calls.clear()
    registry.encoder.seen.clear()
    registry.encoder.calls.clear()
    return v, registry.encoder, calls


def test_a_decoded_photo_is_not_decoded_again(photo_only):
    from indexer.catalog import make_listing
    from indexer.settings import Settings

    v, encoder, calls = photo_only
    raw = _jpeg(3000, 2000)
    photo = decode_image(raw, **image_limits(Settings()))  # what the API does to validate
    assert [h.id for h in v.search(image=photo, k=1)] == ["a"]
    v.classify(make_listing("draft", "", image=photo))
    assert calls == []
    assert len(encoder.seen) == 2 and all(x is photo for x in encoder.seen)
    # bytes (the ingestion path, or a caller that did not decode) are decoded once
    v.search(image=raw, k=1)
    assert len(calls) == 1 and encoder.seen[-1].size == photo.size


def test_a_photo_decoded_elsewhere_is_normalised_without_decoding(photo_only):
    v, encoder, calls = photo_only
    v.search(image=Image.new("RGBA", (3000, 1000), (0, 0, 0, 0)), k=1)
    got = encoder.seen[-1]
    assert calls == [] and got.mode == "RGB" and got.size == (1024, 341)
    assert got.getpixel((0, 0)) == (255, 255, 255)


def test_a_batch_holds_a_bounded_number_of_decoded_photos(photo_only):
    from indexer.catalog import Listing
    from indexer.pipeline import PHOTO_GROUP

    v, encoder, calls = photo_only
    photo = _jpeg(64, 48)
    listings = [Listing(f"l{i}", "", image=b"broken" if i == 69 else photo) for i in range(70)]
    problems = v.upsert(listings)
    assert list(problems) == [69] and len(calls) == 70  # each photo decoded once
    assert sum(encoder.calls) == 69 and max(encoder.calls) <= PHOTO_GROUP


def test_png_text_chunks_cannot_inflate_memory():
    # 63 zTXt chunks of 1 MiB of text each, in a 66 KB file: Pillow inflates them all when
    # the file is opened (64 MiB by default)
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    png = buf.getvalue()
    text = zlib.compress(b"a" * (1024 * 1024 - 1), 9)
    chunks = b"".join(chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(63))
    with pytest.raises(ImageError, match="text chunks"):
        decode_image(png[:33] + chunks + png[33:])
    assert decode_image(png[:33] + chunks[: len(chunks) // 63] + png[33:]).size == (16, 16)
