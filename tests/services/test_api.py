"""The HTTP API on the embedded default (no broker): real models, real index, real disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.runtime import Runtime
from indexer.state.sqlite_store import SqliteStore
from services.api import create_app
from tests.support.service import b64, bomb_png, copy_seed, png, settled, wait_until

pytestmark = pytest.mark.slow


def _client(settings, registry, data_dir: Path, **kw):  # type: ignore[no-untyped-def]
    s = settings.model_copy(update={"data_dir": data_dir, "broker_url": None, **kw})
    rt = Runtime(s, registry)
    return TestClient(create_app(s, rt)), rt


@pytest.fixture(scope="module")
def api(tmp_path_factory, settings, registry, seed_dir):  # type: ignore[no-untyped-def]
    data = copy_seed(seed_dir, tmp_path_factory.mktemp("api") / "data")
    client, rt = _client(settings, registry, data)
    with client:
        yield client, rt


def test_ingest_indexed_then_searchable(api) -> None:  # type: ignore[no-untyped-def]
    client, rt = api
    before = len(rt.replica.v)
    r = client.post("/listings", json={
        "id": "new-watch-1", "title": "Titan analog wrist watch for men",
        "description": "Stainless steel strap, water resistant", "image_base64": b64(png()),
    })
    assert r.status_code == 202, r.text
    assert r.json()["status_url"].endswith("/listings/new-watch-1")
    st = settled(client, "new-watch-1", 30)
    assert st["status"] == "indexed", st
    assert st["source"] == "predicted" and st["category"] == "Watches"
    assert st["category_path"][0] == "Watches"
    assert len(st["path_confidence"]) == len(st["category_path"])
    assert 0 <= st["confidence"] <= 1 and isinstance(st["uncertain"], bool)
    assert len(rt.replica.v) == before + 1
    hits = client.post("/search", json={"text": "analog wrist watch steel strap", "k": 5}).json()
    assert "new-watch-1" in [h["id"] for h in hits["results"]]
    by_id = client.post("/search", json={"listing_id": "new-watch-1", "k": 3}).json()["results"]
    assert len(by_id) == 3 and all(h["id"] != "new-watch-1" for h in by_id)
    within = client.post("/search", json={"text": "watch", "k": 3,
                                           "category": "Baby Care"}).json()["results"]
    assert within and all(h["category"] == "Baby Care" for h in within)


def test_seller_label_kept_and_multipart(api) -> None:  # type: ignore[no-untyped-def]
    client, _ = api
    r = client.post("/listings", data={"id": "mp-1", "title": "Cotton bath towel set",
                                       "category": "Home Furnishing"},
                    files={"image": ("t.png", png(color=(20, 90, 200)), "image/png")})
    assert r.status_code == 202, r.text
    st = settled(client, "mp-1", 30)
    assert st["status"] == "indexed" and st["source"] == "seller"
    assert st["category"] == "Home Furnishing"


def test_resubmitting_an_id_replaces_it(api) -> None:  # type: ignore[no-untyped-def]
    client, rt = api
    for title in ("Ceramic coffee mug", "Ceramic coffee mug, blue"):
        assert client.post("/listings", json={"id": "dup-1", "title": title}).status_code == 202
        settled(client, "dup-1", 30)
    state = rt.replica.v.state()
    assert state.view.ids().count("dup-1") == 1
    assert state.meta("dup-1").title == "Ceramic coffee mug, blue"


def test_classify_does_not_index(api) -> None:  # type: ignore[no-untyped-def]
    client, rt = api
    n = len(rt.replica.v)
    r = client.post("/classify", json={"title": "Baby diaper pants, large, 40 count"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["category"] == "Baby Care" and body["neighbours"]
    assert body["category_path"][0] == "Baby Care"
    assert len(body["path_confidence"]) == len(body["category_path"])
    assert body["path_stopped"] in ("leaf", "disagreement", "unknown_below")
    assert len(rt.replica.v) == n


@pytest.mark.parametrize("title", [
    "Bosch GSB 500W Impact Drill Machine",
    "The Alchemist by Paulo Coelho Paperback",
    "Aashirvaad Whole Wheat Atta 5 kg",
])
def test_out_of_catalog_is_flagged_not_confident(api, title) -> None:  # type: ignore[no-untyped-def]
    """Products of categories the catalog does not hold (evaluation/data/out_of_catalog.csv)
    are far from every listing of the category they would be voted: uncertain, with the
    reason, from the reference fitted when the seeded index was built and saved in its
    snapshot, or too weakly voted to be taken. (The 70-listing seed is a loose reference,
    so either reason may come first: docs/evaluation.md measures the flagged share on the
    whole catalog.)"""
    client, _ = api
    body = client.post("/classify", json={"title": title}).json()
    assert body["uncertain"] is True, body
    assert body["uncertain_reason"] in ("out_of_catalog", "low_confidence"), body


def test_catalog_listing_status_has_its_path(api) -> None:  # type: ignore[no-untyped-def]
    client, rt = api
    state = rt.replica.v.state()
    lid = next(i for i in state.view.ids() if state.meta(i).category == "Watches")
    st = client.get(f"/listings/{lid}").json()
    assert st["category_path"][:2] == ["Watches", "Wrist Watches"]


def test_delete(api) -> None:  # type: ignore[no-untyped-def]
    client, rt = api
    assert client.post("/listings", json={"id": "del-1", "title": "Wall clock"}).status_code == 202
    settled(client, "del-1", 30)
    r = client.delete("/listings/del-1")
    assert r.status_code == 200
    assert "del-1" not in rt.replica.v
    assert client.get("/listings/del-1").status_code == 404
    ids = [h["id"] for h in client.post("/search", json={"text": "wall clock", "k": 50}).json()[
        "results"]]
    assert "del-1" not in ids
    assert client.delete("/listings/del-1").status_code == 404


def _truncated() -> bytes:
    data = png(256, 256)
    return data[: len(data) // 2]


BAD_LISTINGS = [
    ({"id": "x", "title": "t", "image_base64": b64(b"not an image at all")}, 422, "image"),
    ({"id": "x", "title": "t", "image_base64": b64(_truncated())}, 422, ""),
    ({"id": "x", "title": "t", "image_base64": b64(bomb_png())}, 422, "pixels"),
    ({"id": "x", "title": "t", "image_base64": "!!!notbase64"}, 422, "base64"),
    ({"id": "x", "title": ""}, 422, "no title"),
    ({"id": "x", "title": "   ", "description": ""}, 422, "no title"),
    ({"id": "x", "title": "t" * 5000}, 422, "at most 1000 characters"),
    ({"id": 12, "title": "t"}, 422, "id"),
    ({"id": "x", "title": ["a"]}, 422, "title"),
    ({"id": "x", "title": "t", "category": 3}, 422, "category"),
    ({"id": "bad id/../", "title": "t"}, 422, "pattern"),
    ({"title": "t"}, 422, "id"),
    ({"id": "x", "title": "t", "colour": "red"}, 422, "colour"),
    ({"id": "x", "title": "t", "image_url": "file:///etc/passwd"}, 422, "http"),
    ({"id": "x", "title": "t", "image_url": "http://127.0.0.1/a.png"}, 422, "non-public"),
    ({"id": "x", "title": "t", "image_url": "http://169.254.169.254/latest"}, 422, "non-public"),
    ({"id": "x", "title": "t", "image_url": "http://10.0.0.1/a.png"}, 422, "non-public"),
]


@pytest.mark.parametrize("body,code,needle", BAD_LISTINGS)
def test_bad_listing_is_refused_clearly(api, body, code, needle) -> None:  # type: ignore[no-untyped-def]
    client, rt = api
    r = client.post("/listings", json=body)
    assert r.status_code == code, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle.lower() in detail.lower()
    assert "Traceback" not in r.text
    assert rt.store.status("x") is None  # nothing was accepted


def test_bad_requests(api) -> None:  # type: ignore[no-untyped-def]
    client, _ = api
    r = client.post("/listings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    assert client.post("/listings", json=[1, 2]).status_code == 422
    r = client.post("/listings", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "content type" in r.json()["detail"]
    assert client.get("/listings/nope-404").status_code == 404
    assert "unknown listing" in client.get("/listings/nope-404").json()["detail"]
    assert client.post("/search", json={"listing_id": "nope-404"}).status_code == 404
    assert client.post("/search", json={}).status_code == 422
    assert client.post("/search", json={"text": ""}).status_code == 422
    assert client.post("/search", json={"text": "x", "k": 0}).status_code == 422
    assert client.post("/search", json={"text": "x", "k": "5"}).status_code == 422
    r = client.post("/search", json={"image_base64": b64(b"garbage")})
    assert r.status_code == 422
    assert client.post("/classify", json={"title": 5}).status_code == 422


def test_body_size_limit_and_api_key(tmp_path, settings, registry, seed_dir) -> None:  # type: ignore[no-untyped-def]
    client, _ = _client(settings, registry, copy_seed(seed_dir, tmp_path / "d"),
                        api_key="s3cret", max_request_bytes=4096)
    with client:
        body = {"id": "k1", "title": "Pen"}
        assert client.post("/listings", json=body).status_code == 401
        assert client.post("/listings", json=body, headers={"X-API-Key": "no"}).status_code == 401
        r = client.post("/listings", json=body, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 202
        big = {"id": "k2", "title": "Pen", "description": "x" * 10_000}
        r = client.post("/listings", json=big, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 413 and "larger than" in r.json()["detail"]
        assert client.post("/search", json={"text": "pen"}).status_code == 200  # reads: no key
        # a chunked body (no Content-Length) is counted as it arrives
        key = {"X-API-Key": "s3cret", "Content-Type": "application/json"}
        r = client.post("/listings", content=iter([b'{"id": "k3", "title": "Pen", ',
                                                   b'"description": "' + b"x" * 8000 + b'"}']),
                        headers=key)
        assert r.status_code == 413 and "larger than" in r.json()["detail"]
        r = client.post("/listings", content=iter([b'{"id": "k4", ', b'"title": "Pen"}']),
                        headers=key)
        assert r.status_code == 202, r.text


def test_health_metrics_openapi(api) -> None:  # type: ignore[no-untyped-def]
    client, rt = api
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["problems"] == [], h
    assert h["mode"] == "embedded" and h["models_loaded"] and h["lag"] == 0
    assert h["index_size"] == len(rt.replica.v) and h["digest"] == rt.replica.digest()
    client.post("/search", json={"text": "shoes"})
    m = client.get("/metrics").text
    for name in ("vitrine_pending_events", "vitrine_replica_lag",
                 "vitrine_search_seconds_bucket", "vitrine_requests",
                 "vitrine_ingest_accept_seconds"):
        assert name in m
    spec = client.get("/openapi.json").json()
    assert {"/listings", "/listings/{listing_id}", "/search", "/classify", "/health"} <= set(
        spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/listings"]["post"]["requestBody"]["content"]


def test_restart_keeps_everything(tmp_path, settings, registry, seed_dir) -> None:  # type: ignore[no-untyped-def]
    data = copy_seed(seed_dir, tmp_path / "d")
    client, rt = _client(settings, registry, data)
    with client:
        for i in range(3):
            client.post("/listings", json={"id": f"r{i}", "title": f"Steel water bottle {i}"})
        for i in range(3):
            settled(client, f"r{i}", 30)
        client.delete("/listings/r1")
        n = len(rt.replica.v)
    # a crash after the 202 of a listing, before any consumer took it: only the store has it
    store = SqliteStore.open(data)
    late = store.accept({"id": "late-1", "title": "Glass water bottle"}, None)
    store.close()
    client2, rt2 = _client(settings, registry, data)
    with client2:
        t0 = time.monotonic()
        ids = rt2.replica.v.state().view.ids()
        assert {"r0", "r2"} <= set(ids) and "r1" not in ids
        st = settled(client2, "late-1", 30)
        assert st["status"] == "indexed" and rt2.store.status("late-1")["version"] == late
        assert len(rt2.replica.v) == n + 1
        assert client2.get("/listings/r0").json()["status"] == "indexed"
        assert client2.get("/listings/r1").status_code == 404
        assert time.monotonic() - t0 < 30


def test_a_second_server_on_the_same_data_dir_exits_at_once(tmp_path, seed_dir) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.support.offline import ROOT
    from tests.support.workers import worker_env

    data = copy_seed(seed_dir, tmp_path / "d")
    env = worker_env("unused", data)
    env.pop("VITRINE_BROKER_URL")
    first = subprocess.Popen([sys.executable, "-m", "vitrine.cli", "serve", "--port", "0"],
                             cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (data / "LOCK").exists() and (data / "LOCK").read_text().strip(),
                   60)
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "vitrine.cli", "serve", "--port", "0"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert "already" in second.stderr and str(data) in second.stderr, second.stderr
        assert time.monotonic() - t0 < 30
        assert first.poll() is None  # the first one is unharmed
    finally:
        first.terminate()
        first.wait(30)
