from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.services.helpers import build_seed, copy_seed, seed_listings

from .helpers import REDIS


@pytest.fixture(scope="session")
def seed_dir(tmp_path_factory: pytest.TempPathFactory, settings, registry,  # type: ignore[no-untyped-def]
             small_catalog) -> Path:
    """A read-only data dir with a 70-listing index; tests copy it with ``copy_seed``."""
    return build_seed(tmp_path_factory.mktemp("seed"), settings, registry,
                      seed_listings(small_catalog))


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test module's own (its keys are deleted afterwards)."""
    p = f"vt-{uuid.uuid4().hex[:10]}"
    yield p
    time.sleep(0.5)  # the stopped worker's last writes land before the clean-up
    r = redis.Redis.from_url(REDIS)
    for key in r.scan_iter(f"{p}*", count=1000):
        r.delete(key)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, seed_dir) -> Path:  # type: ignore[no-untyped-def]
    return copy_seed(seed_dir, tmp_path_factory.mktemp("celery") / "data")
