import io

import pytest
from PIL import Image

from indexer.errors import ImageError
from indexer.images import decode_image, read_image_bytes


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
