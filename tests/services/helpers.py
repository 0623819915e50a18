"""Shared helpers of the service and worker tests: a small seeded data dir, photos, polling."""

from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

SEED_PER_CATEGORY = 10  # 70 listings: enough for a vote, quick to embed


def seed_listings(small_catalog: list) -> list:
    per: dict[str, list] = {}
    for x in small_catalog:
        per.setdefault(x.category, [])
        if len(per[x.category]) < SEED_PER_CATEGORY:
            per[x.category].append(x)
    return [x for g in per.values() for x in g]


def build_seed(root: Path, settings: Any, registry: Any, listings: list) -> Path:
    """A data dir whose index snapshot holds ``listings`` (what `vitrine serve --catalog` does)."""
    from indexer.pipeline import Vitrine

    v = Vitrine(settings, registry)
    v.build(listings)
    v.save(root / "index", {"log_pos": 0, "versions": {}})
    return root


def copy_seed(seed: Path, dest: Path) -> Path:
    shutil.copytree(seed, dest)
    return dest


def png(w: int = 64, h: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png() -> bytes:
    """A tiny file that decodes to 20000 x 20000 pixels (400 MP): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


def wait_until(cond: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)
