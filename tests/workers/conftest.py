from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.service import copy_seed
from tests.support.workers import REDIS


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
