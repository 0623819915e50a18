"""Ingestion through real Redis and a real ``celery worker`` subprocess (never eager).

Each test module uses its own Redis key prefix (and the keys are deleted afterwards), so runs
can share the Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from indexer.runtime import Runtime
from services.api import create_app
from tests.support.offline import ROOT
from tests.support.service import PhotoServer, b64, png, wait_until
from tests.support.workers import REDIS, Worker, inject, worker_env

pytestmark = pytest.mark.slow
# batches of 4 (so that a kill -9 lands between two of them); photos from the local server
SMALL_BATCH = {"VITRINE_WORKER_BATCH": "4", "VITRINE_ALLOW_PRIVATE_URLS": "true"}


@pytest.fixture
def photo_server() -> Iterator[PhotoServer]:
    server = PhotoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stack(prefix, data_dir, settings, registry, tmp_path_factory) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Two API replicas (one serving HTTP) and one worker, all on the same Redis and data dir."""
    s = settings.model_copy(update={"data_dir": data_dir, "broker_url": REDIS,
                                    "redis_prefix": prefix, "lease_seconds": 6,
                                    "allow_private_urls": True})  # the local photo server
    logs = tmp_path_factory.mktemp("logs")
    rt = Runtime(s, registry)
    other = Runtime(s, registry)  # a second API process' replica
    other.start()
    client = TestClient(create_app(s, rt))
    state = {"client": client, "rt": rt, "other": other, "settings": s, "logs": logs,
             "worker": Worker(prefix, data_dir, logs / "worker.log", **SMALL_BATCH)}
    try:
        with client:
            yield state
    finally:
        state["worker"].stop()  # the kill -9 test replaces the worker
        other.stop()


def _status(client: TestClient, lid: str) -> dict[str, Any]:
    r = client.get(f"/listings/{lid}")
    return r.json() if r.status_code == 200 else {"status": "missing"}


def _agree(stack: dict[str, Any]) -> None:
    """Every process applied the whole log and holds the same (id, version) pairs."""
    rt, other = stack["rt"], stack["other"]
    wait_until(lambda: rt.replica.lag() == 0 and other.replica.lag() == 0
               and rt.replica.digest() == other.replica.digest(), 5, every=0.02)


def test_ingest_through_the_queue_is_searchable_everywhere(stack) -> None:  # type: ignore[no-untyped-def]
    client, other = stack["client"], stack["other"]
    r = client.post("/listings", json={"id": "q-1", "title": "Leather analog watch for women",
                                       "image_base64": b64(png())})
    assert r.status_code == 202, r.text
    version = r.json()["version"]
    assert _status(client, "q-1")["status"] in ("queued", "indexed")
    wait_until(lambda: _status(client, "q-1")["status"] == "indexed", 120, every=0.02)
    t_done = time.monotonic()
    # committed -> searchable through every API replica within 1 s
    wait_until(lambda: other.replica.versions.get("q-1") == version, 1.0, every=0.01)
    assert time.monotonic() - t_done < 1.0
    st = _status(client, "q-1")
    assert st["category"] == "Watches" and st["source"] == "predicted"
    assert st["version"] == version
    ids = [h["id"] for h in client.post("/search", json={"text": "analog watch women"}).json()[
        "results"]]
    assert "q-1" in ids
    _agree(stack)
    h = client.get("/health").json()
    assert h["mode"] == "redis" and h["status"] == "ok" and h["pending"] == 0, h
    assert h["digest"] == other.replica.digest()


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
        wait_until(lambda: all(_status(client, x)["status"] == "indexed" for x in ids), 120,
                   every=0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]


def test_a_repost_and_a_delete_racing_a_batch_in_a_real_worker(stack, photo_server) -> None:  # type: ignore[no-untyped-def]
    """The worker is held inside a batch (the photo of race-a v1 is held by the server);
    meanwhile the seller re-posts race-a and an operator deletes race-b, both in that batch."""
    client = stack["client"]
    v1 = client.post("/listings", json={"id": "race-a", "title": "Steel water bottle",
                                        "image_url": photo_server.url("race-a.png")}).json()
    client.post("/listings", json={"id": "race-b", "title": "Glass water bottle"})
    photo_server.wait_requested("race-a.png")  # the batch holds race-a v1 (and race-b)
    v2 = client.post("/listings", json={"id": "race-a",
                                        "title": "Steel water bottle, 1 litre"}).json()
    assert client.delete("/listings/race-b").status_code == 200
    photo_server.release("race-a.png")
    wait_until(lambda: _status(client, "race-a").get("version") == v2["version"]
               and _status(client, "race-a")["status"] == "indexed", 120, every=0.05)
    assert v2["version"] > v1["version"]
    _agree(stack)
    for replica in (stack["rt"].replica, stack["other"].replica):
        state = replica.v.state()
        assert state.meta("race-a").title == "Steel water bottle, 1 litre"
        assert state.meta("race-b") is None
        assert replica.versions["race-a"] == v2["version"]
    assert client.get("/listings/race-b").status_code == 404


def test_kill9_mid_batch_loses_and_duplicates_nothing(stack, photo_server) -> None:  # type: ignore[no-untyped-def]
    """kill -9 while the worker holds a batch: its claimed listings come back after the lease.

    The photo server holds the first request for a path until released, which pins the worker
    inside a batch at a known point: batch 1 is k9-0 alone (held while k9-1..15 are queued),
    batch 2 is k9-1..4 (k9-2's photo is held: the kill lands there).
    """
    client, rt, other = stack["client"], stack["rt"], stack["other"]
    before = set(rt.replica.v.state().view.ids())
    ids = [f"k9-{i}" for i in range(16)]

    def post(i: int) -> None:
        body = {"id": ids[i], "title": f"Cotton kurta for men, size {i}",
                "category": "Clothing" if i % 2 else None}
        if i in (0, 2):
            body["image_url"] = photo_server.url(f"k9-{i}.png")
        assert client.post("/listings", json=body).status_code == 202

    post(0)
    photo_server.wait_requested("k9-0.png")  # the worker is inside batch 1, on k9-0
    for i in range(1, 16):
        post(i)
    photo_server.release("k9-0.png")
    photo_server.wait_requested("k9-2.png")  # ... and now inside batch 2
    stack["worker"].kill9()
    assert _status(client, "k9-0")["status"] == "indexed"
    assert sum(_status(client, x)["status"] == "indexed" for x in ids) == 1
    stack["worker"] = Worker(rt.settings.redis_prefix, rt.settings.data_dir,
                             stack["logs"] / "worker2.log", **SMALL_BATCH)
    wait_until(lambda: all(_status(client, x)["status"] == "indexed" for x in ids), 180,
               every=0.2)
    _agree(stack)
    for replica in (rt.replica, other.replica):
        all_ids = replica.v.state().view.ids()
        assert len(all_ids) == len(set(all_ids)), "a listing was indexed twice"
        assert set(all_ids) == before | set(ids)
    assert "warning" not in _status(client, "k9-2")  # its photo was fetched after the restart
    assert rt.store.pending_count() == 0


def test_delete_reaches_every_replica(stack) -> None:  # type: ignore[no-untyped-def]
    client, other = stack["client"], stack["other"]
    client.post("/listings", json={"id": "d-1", "title": "Baby feeding bottle"})
    wait_until(lambda: _status(client, "d-1")["status"] == "indexed", 120)
    wait_until(lambda: "d-1" in other.replica.versions, 1)
    assert client.delete("/listings/d-1").status_code == 200
    wait_until(lambda: other.replica.v.state().meta("d-1") is None, 1)
    assert client.get("/listings/d-1").status_code == 404


def test_api_restart_gets_the_index_back(stack, registry) -> None:  # type: ignore[no-untyped-def]
    rt = stack["rt"]
    assert rt.replica.snapshot()  # a snapshot plus a log tail: both paths are exercised
    client = stack["client"]
    client.post("/listings", json={"id": "after-snap", "title": "Decorative wall clock"})
    wait_until(lambda: _status(client, "after-snap")["status"] == "indexed", 120)
    _agree(stack)
    fresh = Runtime(stack["settings"], registry)
    try:
        assert fresh.replica.digest() == rt.replica.digest()
        assert sorted(fresh.replica.v.state().view.ids()) == sorted(
            rt.replica.v.state().view.ids())
    finally:
        fresh.stop()


POISON = """
import os, signal
from indexer.pipeline import Vitrine
_embed = Vitrine.embed
def embed(self, listings, *args, **kwargs):
    if any("POISON" in x.title for x in listings):
        os.kill(os.getpid(), signal.SIGKILL)  # like the OOM killer
    return _embed(self, listings, *args, **kwargs)
Vitrine.embed = embed
"""


def test_a_listing_that_kills_its_worker_ends_failed(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A listing that kills its worker process each time ends ``failed`` after
    VITRINE_MAX_ATTEMPTS claims, and the listings claimed with it are indexed."""
    client, rt = stack["client"], stack["rt"]
    stack["worker"].stop()
    stack["worker"] = Worker(rt.settings.redis_prefix, rt.settings.data_dir,
                             stack["logs"] / "worker-poison.log", VITRINE_MAX_ATTEMPTS="2",
                             **SMALL_BATCH, **inject(tmp_path / "inject", POISON))
    client.post("/listings", json={"id": "p-ok", "title": "Analog wrist watch for men"})
    client.post("/listings", json={"id": "p-bad", "title": "POISON cotton bed sheet"})
    wait_until(lambda: _status(client, "p-bad")["status"] == "failed", 150, every=0.2)
    st = _status(client, "p-bad")
    assert "gave up after 2 attempts" in st["error"], st
    wait_until(lambda: _status(client, "p-ok")["status"] == "indexed", 120, every=0.2)
    assert rt.replica.v.state().meta("p-bad") is None


SLOW_LOAD = """
import time
from indexer.encoders.registry import ModelRegistry
_get = ModelRegistry.get
def get(self, *args, **kwargs):
    time.sleep(3)  # each model: 6 s in all, past Celery's 4 s worker_proc_alive_timeout
    return _get(self, *args, **kwargs)
ModelRegistry.get = get
"""


def test_a_slow_model_load_does_not_stop_the_worker(stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client, rt = stack["client"], stack["rt"]
    stack["worker"].stop()
    stack["worker"] = w = Worker(rt.settings.redis_prefix, rt.settings.data_dir,
                                 stack["logs"] / "worker-slow.log", **SMALL_BATCH,
                                 **inject(tmp_path / "inject", SLOW_LOAD))
    client.post("/listings", json={"id": "slow-1", "title": "Wooden wall clock"})
    wait_until(lambda: _status(client, "slow-1")["status"] == "indexed", 180, every=0.2)
    assert w.proc.poll() is None
    assert "Timed out waiting for UP message" not in w.log.read_text()


def test_unreachable_redis_fails_fast_and_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for cmd in (["serve", "--port", "0"], ["worker"]):
        env = worker_env("vt-down", tmp_path, VITRINE_BROKER_URL="redis://127.0.0.1:1/0")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "vitrine.cli", *cmd], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stderr[-2000:]
        assert "cannot reach Redis at redis://127.0.0.1:1/0" in p.stderr
        assert "Traceback" not in p.stderr
        assert time.monotonic() - t0 < 30
