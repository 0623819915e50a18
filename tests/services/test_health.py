"""Honest health in Redis mode: the state store goes away and comes back (a real Redis of the
test's own, with AOF, killed with SIGKILL and restarted on the same files)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from indexer.runtime import Runtime
from services.api import create_app
from tests.support.aof_redis import AofRedis
from tests.support.service import copy_seed, wait_until

pytestmark = pytest.mark.slow


def test_health_degrades_when_the_store_is_down_and_recovers(tmp_path, settings, registry,  # type: ignore[no-untyped-def]
                                                             seed_dir) -> None:
    redis = AofRedis(tmp_path)
    redis.start()
    s = settings.model_copy(update={"data_dir": copy_seed(seed_dir, tmp_path / "d"),
                                    "broker_url": redis.url, "redis_prefix": "vh"})
    rt = Runtime(s, registry)
    rt.notify = lambda lid, version: None  # no worker in this test: only the store matters
    try:
        with TestClient(create_app(s, rt)) as client:
            assert client.get("/health").json()["status"] == "ok"
            r = client.post("/listings", json={"id": "h-1", "title": "Wall clock"})
            assert r.status_code == 202
            version = r.json()["version"]
            redis.kill9()
            h = client.get("/health").json()
            assert h["status"] == "degraded", h
            assert any("state store unavailable" in p for p in h["problems"]), h
            r = client.post("/listings", json={"id": "h-2", "title": "Table lamp"})
            assert r.status_code == 503 and "Redis" in r.json()["detail"], r.text
            assert r.headers["retry-after"].isdigit()
            # no traceback, and nothing of where Redis lives
            for secret in ("Traceback", str(redis.port), "127.0.0.1", "localhost"):
                assert secret not in r.text and secret not in str(h["problems"]), secret
            redis.start()  # the same AOF: the accepted listing is still there
            wait_until(lambda: client.get("/health").json()["status"] == "ok", 30, every=0.2)
            st = client.get("/listings/h-1").json()
            assert st["status"] == "queued" and st["version"] == version
            assert client.get("/listings/h-2").status_code == 404
    finally:
        redis.kill9()
