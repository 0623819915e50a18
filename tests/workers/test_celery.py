"""Ingestion through real Redis and a real ``celery worker`` subprocess (never eager).

Each test module uses its own Redis key prefix (and the keys are deleted afterwards), so runs
can share the Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from services.api import create_app
from services.runtime import Runtime
from tests.conftest import IMAGE_WEIGHTS, ROOT, TEXT_MODEL
from tests.services.helpers import b64, copy_seed, png, wait_until

pytestmark = pytest.mark.slow
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    p = f"vt-{uuid.uuid4().hex[:10]}"
    yield p
    time.sleep(0.5)  # the stopped worker's last writes land before the clean-up
    r = redis.Redis.from_url(REDIS)
    for key in r.scan_iter(f"{p}*", count=1000):
        r.delete(key)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, seed_dir) -> Path:  # type: ignore[no-untyped-def]
    return copy_seed(seed_dir, tmp_path_factory.mktemp("celery") / "data")


def worker_env(prefix: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VITRINE_TEXT_MODEL": str(TEXT_MODEL),
        "VITRINE_IMAGE_MODEL": f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}",
        "VITRINE_BROKER_URL": REDIS,
        "VITRINE_REDIS_PREFIX": prefix,
        "VITRINE_DATA_DIR": str(data_dir),
        "VITRINE_TORCH_THREADS": "1",
        "VITRINE_VISIBILITY_TIMEOUT": "4",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


class Worker:
    """``vitrine worker`` in its own process group, so that kill -9 reaches its children."""

    def __init__(self, prefix: str, data_dir: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitrine.cli", "worker", "--concurrency", "1"],
            cwd=ROOT, env=worker_env(prefix, data_dir), stdout=log.open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture(scope="module")
def stack(prefix, data_dir, settings, registry, tmp_path_factory) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Two API replicas (one serving HTTP) and one worker, all on the same Redis and data dir."""
    s = settings.model_copy(update={"data_dir": data_dir, "broker_url": REDIS,
                                    "redis_prefix": prefix, "visibility_timeout": 4})
    logs = tmp_path_factory.mktemp("logs")
    worker = Worker(prefix, data_dir, logs / "worker.log")
    rt = Runtime(s, registry)
    other = Runtime(s, registry)  # a second API process' replica
    other.start()
    client = TestClient(create_app(s, rt))
    state = {"client": client, "rt": rt, "other": other, "worker": worker, "settings": s,
             "logs": logs}
    try:
        with client:
            yield state
    finally:
        state["worker"].stop()  # the kill -9 test replaces the worker
        worker.stop()
        other.stop()


def _status(client: TestClient, lid: str) -> str:
    r = client.get(f"/listings/{lid}")
    return r.json()["status"] if r.status_code == 200 else "missing"


def test_ingest_through_the_queue_is_searchable_everywhere(stack) -> None:  # type: ignore[no-untyped-def]
    client, other = stack["client"], stack["other"]
    r = client.post("/listings", json={"id": "q-1", "title": "Leather analog watch for women",
                                       "image_base64": b64(png())})
    assert r.status_code == 202, r.text
    assert client.get("/listings/q-1").json()["status"] in ("queued", "indexed")
    wait_until(lambda: _status(client, "q-1") == "indexed", 120, every=0.02)
    t_acked = time.monotonic()
    # acknowledged by the worker -> searchable through every API replica within 1 s
    wait_until(lambda: "q-1" in stack["rt"].replica.v and "q-1" in other.replica.v, 1.0,
               every=0.01)
    assert time.monotonic() - t_acked < 1.0
    st = client.get("/listings/q-1").json()
    assert st["category"] == "Watches" and st["source"] == "predicted"
    ids = [h["id"] for h in client.post("/search", json={"text": "analog watch women"}).json()[
        "results"]]
    assert "q-1" in ids
    h = client.get("/health").json()
    assert h["mode"] == "redis" and h["broker"] == "ok"


def test_concurrent_ingest_and_search(stack) -> None:  # type: ignore[no-untyped-def]
    import threading

    client = stack["client"]
    errors: list[str] = []
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            r = client.post("/search", json={"text": "cotton bed sheet", "k": 5})
            if r.status_code != 200 or not r.json()["results"]:
                errors.append(r.text)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    ids = [f"cc-{i}" for i in range(6)]
    try:
        for lid in ids:
            r = client.post("/listings", json={"id": lid, "title": f"Printed bed sheet {lid}"})
            assert r.status_code == 202
        wait_until(lambda: all(_status(client, x) == "indexed" for x in ids), 120, every=0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]


def test_kill9_mid_batch_loses_and_duplicates_nothing(stack) -> None:  # type: ignore[no-untyped-def]
    client, rt, other = stack["client"], stack["rt"], stack["other"]
    before = set(rt.replica.v.index.ids())
    ids = [f"k9-{i}" for i in range(16)]
    for i, lid in enumerate(ids):
        r = client.post("/listings", json={"id": lid, "title": f"Cotton kurta for men, size {i}",
                                           "category": "Clothing" if i % 2 else None})
        assert r.status_code == 202
    # wait until the worker is in the middle of the batch, then kill it and its children
    wait_until(lambda: sum(_status(client, x) == "indexed" for x in ids) >= 2, 120, every=0.02)
    stack["worker"].kill9()
    done = sum(_status(client, x) == "indexed" for x in ids)
    assert done < len(ids), "the batch finished before the kill: nothing was tested"
    stack["worker"] = Worker(rt.prefix, rt.settings.data_dir,
                             stack["logs"] / "worker2.log")
    wait_until(lambda: all(_status(client, x) == "indexed" for x in ids), 180, every=0.2)
    wait_until(lambda: set(ids) <= set(other.replica.v.index.ids()), 2)
    for replica in (rt.replica, other.replica):
        all_ids = replica.v.index.ids()
        assert len(all_ids) == len(set(all_ids)), "a listing was indexed twice"
        assert set(all_ids) == before | set(ids)


def test_delete_reaches_every_replica(stack) -> None:  # type: ignore[no-untyped-def]
    client, other = stack["client"], stack["other"]
    client.post("/listings", json={"id": "d-1", "title": "Baby feeding bottle"})
    wait_until(lambda: _status(client, "d-1") == "indexed", 120)
    wait_until(lambda: "d-1" in other.replica.v, 1)
    assert client.delete("/listings/d-1").status_code == 200
    wait_until(lambda: "d-1" not in other.replica.v, 1)
    assert client.get("/listings/d-1").status_code == 404


def test_api_restart_gets_the_index_back(stack, registry) -> None:  # type: ignore[no-untyped-def]
    rt = stack["rt"]
    rt.replica.snapshot()  # a snapshot plus a log tail: both paths are exercised
    client = stack["client"]
    client.post("/listings", json={"id": "after-snap", "title": "Decorative wall clock"})
    wait_until(lambda: _status(client, "after-snap") == "indexed", 120)
    wait_until(lambda: "after-snap" in rt.replica.v, 1)
    expected = sorted(rt.replica.v.index.ids())
    fresh = Runtime(stack["settings"], registry)
    try:
        assert sorted(fresh.replica.v.index.ids()) == expected
    finally:
        fresh.stop()


def test_unreachable_redis_fails_fast_and_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for cmd in (["serve", "--port", "0"], ["worker"]):
        env = worker_env("vt-down", tmp_path, VITRINE_BROKER_URL="redis://127.0.0.1:1/0")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "vitrine.cli", *cmd], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "cannot reach the broker at redis://127.0.0.1:1/0" in p.stderr
        assert "Traceback" not in p.stderr
        assert time.monotonic() - t0 < 30
