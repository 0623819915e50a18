"""The same behaviour on both vector stores (``VITRINE_VECTOR_STORE``): the embedded FAISS
replicas and Milvus (a real milvus-lite server, tests/support/milvus.py), driven through the
real core: the ingest use case with the offline models, the state store's log, the replica.

Ingest -> indexed -> searchable; a re-post wins and an older entry replayed after it does not
undo it; a delete holds against an older upsert replayed after it; category and labelled-only
filters; a vote; a restart sees the same state; a seed is followed; and with Milvus, two
processes' runtimes on one Redis, of which one writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.errors import IndexMismatch
from indexer.milvus import MilvusReplica, MilvusView, move_to_milvus
from indexer.pipeline import ListingMeta, Vitrine
from indexer.runtime import Runtime
from indexer.settings import Settings
from indexer.state import LogEntry
from tests.support.milvus import milvus_server
from tests.support.service import copy_seed, seed_listings

pytestmark = pytest.mark.slow
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One milvus-lite server for the session; each test has its own collections (its own
    ``redis_prefix``)."""
    with milvus_server(tmp_path_factory.mktemp("milvus") / "data") as uri:
        yield uri


@pytest.fixture(params=["faiss", "milvus"])
def store_settings(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path
                   ) -> Settings:
    kw: dict[str, Any] = {"data_dir": tmp_path / "data", "broker_url": None,
                          "retry_delay": 0.0, "max_attempts": 3,
                          "redis_prefix": f"vt-{uuid.uuid4().hex[:10]}"}
    if request.param == "milvus":
        kw["vector_store"] = request.getfixturevalue("milvus")
    return settings.model_copy(update=kw)


def seed_data_dir(s: Settings, seed_dir: Path, settings: Settings, registry: Any) -> None:
    """``s.data_dir`` holding the 70-listing seed, in ``s``'s vector store (for Milvus, as
    `indexer.runtime.seed` does it: the catalog built in FAISS, moved to Milvus, saved)."""
    if s.vector_store == "faiss":
        copy_seed(seed_dir, s.data_dir)
        return
    v = Vitrine.load(seed_dir / "index", settings, registry)
    view = v.state().view  # the seed's exact index: its vectors are the fused ones
    ids = view.ids()
    move_to_milvus(v, s, [(lid, vec, ListingMeta.from_payload(view.payload(lid)))
                          for lid, vec in zip(ids, view.get(ids), strict=True)])
    v.save(s.data_dir / "index", {"log_pos": 0, "versions": {}})


@pytest.fixture
def rt(store_settings: Settings, settings: Settings, registry: Any, seed_dir: Path
       ) -> Iterator[Runtime]:
    seed_data_dir(store_settings, seed_dir, settings, registry)
    runtime = Runtime(store_settings, registry)
    try:
        yield runtime
    finally:
        runtime.stop()


def post(rt: Runtime, lid: str, title: str, **kw: Any) -> int:
    return rt.store.accept({"id": lid, "title": title, "description": "", **kw}, None)


def settle(rt: Runtime) -> None:
    while rt.ingestor.run().claimed:
        pass
    rt.replica.catch_up()


def title_of(rt: Runtime, lid: str) -> str | None:
    meta = rt.replica.v.state().meta(lid)
    return None if meta is None else meta.title


def replay(rt: Runtime, lid: str, version: int) -> None:
    """Append ``lid``'s upsert at ``version`` to the log again (a late duplicate) and apply."""
    found = [e for _, e in rt.store.read(0, count=10_000)
             if e.get("id") == lid and e.get("op") == "upsert" and e["version"] == version]
    assert found, f"no upsert of {lid} at version {version} in the log"
    entry: LogEntry = dict(found[0])
    rt.store.append([entry])
    rt.replica.catch_up()


def test_the_store_is_the_configured_one(rt) -> None:  # type: ignore[no-untyped-def]
    view = rt.replica.v.state().view
    milvus = rt.settings.vector_store != "faiss"
    assert isinstance(rt.replica, MilvusReplica) == milvus
    assert isinstance(view, MilvusView) == milvus
    assert len(view) == 70


def test_ingest_index_search(rt) -> None:  # type: ignore[no-untyped-def]
    version = post(rt, "watch-1", "Analog wrist watch for men, leather strap",
                   category="Watches")
    settle(rt)
    st = rt.store.status("watch-1")
    assert st["status"] == "indexed" and st["version"] == version
    assert rt.replica.version_of("watch-1") == version
    assert rt.replica.wait_version("watch-1", version, timeout=1)
    assert "watch-1" in rt.replica.v and len(rt.replica.v) == 71
    hits = rt.replica.v.search(text="analog wrist watch leather strap", k=5)
    assert hits[0].id == "watch-1" and hits[0].category == "Watches"
    # a search by a listing reads its stored vector (and leaves the listing out)
    by_id = rt.replica.v.search(listing_id="watch-1", k=3)
    assert by_id and "watch-1" not in [h.id for h in by_id]
    assert by_id[0].category == "Watches"


def test_a_repost_wins_and_an_older_replay_does_not_undo_it(rt) -> None:  # type: ignore[no-untyped-def]
    v1 = post(rt, "mug-1", "Ceramic coffee mug")
    settle(rt)
    v2 = post(rt, "mug-1", "Ceramic coffee mug, blue")
    settle(rt)
    assert v2 > v1 and title_of(rt, "mug-1") == "Ceramic coffee mug, blue"
    replay(rt, "mug-1", v1)
    assert title_of(rt, "mug-1") == "Ceramic coffee mug, blue"
    assert rt.replica.version_of("mug-1") == v2


def test_a_delete_holds_against_an_older_upsert_replayed_after_it(rt) -> None:  # type: ignore[no-untyped-def]
    v1 = post(rt, "lamp-1", "Brass table lamp")
    settle(rt)
    deleted = rt.store.delete("lamp-1")
    rt.replica.catch_up()
    assert rt.replica.version_of("lamp-1") == deleted > v1
    assert title_of(rt, "lamp-1") is None and "lamp-1" not in rt.replica.v
    replay(rt, "lamp-1", v1)
    assert title_of(rt, "lamp-1") is None
    hits = rt.replica.v.search(text="brass table lamp", k=100)
    assert "lamp-1" not in [h.id for h in hits] and len(rt.replica.v) == 70


def test_category_and_labelled_only_filters(rt) -> None:  # type: ignore[no-untyped-def]
    post(rt, "w-seller", "Stainless steel chronograph watch", category="Watches")
    post(rt, "w-predicted", "Stainless steel chronograph watch for women")
    settle(rt)
    v = rt.replica.v
    st = v.state()
    assert st.meta("w-predicted").category == "Watches" and not st.meta("w-predicted").labelled
    assert "Watches" in st.view.categories
    q = v.query_vector("stainless steel chronograph watch", state=st)[0]
    everything = {n.id for n in v.search_vector(q, 100, state=st)}
    assert {"w-seller", "w-predicted"} <= everything and len(everything) == 72
    labelled = v.search_vector(q, 100, labelled_only=True, state=st)
    assert "w-predicted" not in {n.id for n in labelled} and len(labelled) == 71
    watches = v.search_vector(q, 100, category="Watches", state=st)
    assert {n.category for n in watches} == {"Watches"} and len(watches) == 12
    both = v.search_vector(q, 100, category="Watches", labelled_only=True, state=st)
    assert {n.id for n in both} == {n.id for n in watches} - {"w-predicted"}
    assert v.search_vector(q, 100, category="No such category", state=st) == []
    from indexer.review import known_categories

    assert known_categories(st.view)["watches"] == "Watches"


def test_a_vote_matches_the_faiss_reference(rt: Runtime, settings: Settings, registry: Any,
                                            seed_dir: Path, small_catalog: list) -> None:
    reference = Vitrine.load(seed_dir / "index", settings, registry)
    for x in seed_listings(small_catalog)[::10]:
        got, want = rt.replica.v.classify(x), reference.classify(x)
        assert got.category == want.category
        assert [n.id for n in got.neighbours] == [n.id for n in want.neighbours]
        assert got.confidence == pytest.approx(want.confidence, abs=1e-4)


def test_a_restart_sees_the_same_state(rt, registry) -> None:  # type: ignore[no-untyped-def]
    post(rt, "kettle-1", "Electric kettle 1.5 l")
    post(rt, "pan-1", "Non-stick frying pan 24 cm")
    settle(rt)
    post(rt, "kettle-1", "Electric kettle 1.7 l")
    settle(rt)
    rt.store.delete("pan-1")
    rt.replica.catch_up()
    before = (rt.replica.digest(), len(rt.replica.v), title_of(rt, "kettle-1"),
              [h.id for h in rt.replica.v.search(text="electric kettle", k=10)])
    rt.stop()
    again = Runtime(rt.settings, registry)
    try:
        after = (again.replica.digest(), len(again.replica.v),
                 title_of(again, "kettle-1"),
                 [h.id for h in again.replica.v.search(text="electric kettle", k=10)])
        assert after == before and before[1:3] == (71, "Electric kettle 1.7 l")
        assert again.replica.v.state().meta("pan-1") is None
        post(again, "kettle-2", "Glass electric kettle")  # and it goes on writing
        settle(again)
        assert again.replica.v.state().meta("kettle-2") is not None
    finally:
        again.stop()


def test_a_seed_is_followed(store_settings, registry, small_catalog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from evaluation.bench_service import write_seed_csv
    from indexer.runtime import seed
    from tests.support.offline import CSV

    rt = Runtime(store_settings, registry)  # started before the catalog was seeded
    try:
        assert len(rt.replica.v) == 0
        csv = tmp_path / "catalog.csv"
        write_seed_csv(CSV, csv, {x.id for x in small_catalog[::10]})
        (tmp_path / "images").symlink_to(CSV.parent / "images")
        assert "seeded the index with 28 listings" in seed(store_settings, rt.store, csv,
                                                           registry=registry)
        rt.replica.catch_up()
        assert len(rt.replica.v) == 28 and rt.replica.pos == rt.store.last_pos() == 1
        post(rt, "after-seed", "Analog wrist watch for men", category="Watches")
        settle(rt)
        assert rt.replica.v.state().meta("after-seed") is not None
    finally:
        rt.stop()


def test_a_data_dir_opens_only_with_the_store_it_was_seeded_with(
        store_settings: Settings, settings: Settings, registry: Any, seed_dir: Path) -> None:
    seed_data_dir(store_settings, seed_dir, settings, registry)
    other = ("milvus://127.0.0.1:1" if store_settings.vector_store == "faiss" else "faiss")
    with pytest.raises(IndexMismatch, match="keeps its vectors in"):
        Vitrine.load(store_settings.data_dir / "index",
                     store_settings.model_copy(update={"vector_store": other}), registry)


# --- Milvus only: one writer among many processes ------------------------------------------
def test_one_writer_many_readers_on_one_redis(milvus: str, settings: Settings, registry: Any,
                                              seed_dir: Path, tmp_path: Path) -> None:
    """Two runtimes (as two API processes would be) on one Redis and one Milvus: one
    applies the log, the other holds no vectors and still reads its own writes."""
    s = settings.model_copy(update={
        "data_dir": tmp_path / "data", "broker_url": REDIS_URL, "vector_store": milvus,
        "redis_prefix": f"vt-{uuid.uuid4().hex[:10]}", "retry_delay": 0.0})
    seed_data_dir(s, seed_dir, settings, registry)
    a, b = Runtime(s, registry), Runtime(s, registry)
    try:
        a.replica.catch_up()
        b.replica.catch_up()
        assert isinstance(a.replica, MilvusReplica) and isinstance(b.replica, MilvusReplica)
        writer, reader = a, b  # the first to catch up took the writer lease
        version = post(reader, "shared-1", "Wooden study table")
        while reader.ingestor.run().claimed:  # the reader's process decides...
            pass
        reader.replica.catch_up()  # ...but does not write: the writer does
        assert reader.replica.version_of("shared-1") == -1
        writer.replica.catch_up()
        assert reader.replica.wait_version("shared-1", version, timeout=2)
        assert title_of(reader, "shared-1") == "Wooden study table"
        reader.replica.catch_up()  # it follows the position Milvus records
        assert reader.replica.pos == writer.replica.pos == reader.store.last_pos()
        assert reader.replica.digest() == writer.replica.digest()
        # the writer stops: its lease is handed back and the other process takes over
        writer.stop()
        deleted = reader.store.delete("shared-1")
        reader.replica.catch_up()
        assert reader.replica.version_of("shared-1") == deleted
        assert "shared-1" not in reader.replica.v
    finally:
        a.stop()
        b.stop()
        _drop_redis_prefix(s.redis_prefix)


def _drop_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_views_answer_like_faiss_views(rt) -> None:  # type: ignore[no-untyped-def]
    post(rt, "cup-1", "Porcelain tea cup", category="Kitchen & Dining")
    settle(rt)
    view = rt.replica.v.state().view
    ids = view.ids()
    assert "cup-1" in ids and len(ids) == len(view) == 71
    vec = view.get(["cup-1"])
    assert vec.shape == (1, view.dim) and np.isfinite(vec).all()
    assert view.payload("cup-1")["title"] == "Porcelain tea cup"
    with pytest.raises(KeyError):
        view.get(["cup-1", "nope"])
    with pytest.raises(KeyError):
        view.payload("nope")


# --- through the HTTP API (its runtime started: tail thread and embedded consumer) ----------
def test_the_api_on_either_store(store_settings: Settings, settings: Settings, registry: Any,
                                 seed_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from services.api import create_app
    from tests.support.service import settled

    seed_data_dir(store_settings, seed_dir, settings, registry)
    rt = Runtime(store_settings, registry)
    with TestClient(create_app(store_settings, rt)) as client:
        r = client.post("/listings", json={"id": "api-watch", "category": "Watches",
                                           "title": "Titan analog wrist watch for men"})
        assert r.status_code == 202, r.text
        assert settled(client, "api-watch", 30)["status"] == "indexed"
        hits = client.post("/search", json={"text": "analog wrist watch", "k": 3,
                                            "category": "watches"}).json()["results"]
        assert hits[0]["id"] == "api-watch" and {h["category"] for h in hits} == {"Watches"}
        deep = client.post("/search", json={"text": "curtain", "k": 5,
                                            "category": "home furnishing >> curtains & "
                                            "accessories"}).json()["results"]
        assert deep and all(h["category_path"][:2] == ["Home Furnishing",
                                                       "Curtains & Accessories"] for h in deep)
        stats = client.get("/stats").json()
        assert stats["index_size"] == 71 and stats["by_category"]["Watches"] == 11
        cats = {tuple(c["path"]): c["count"] for c in client.get("/categories").json()[
            "categories"]}
        assert cats[("Watches",)] == 11
        page = client.get("/listings", params={"category": "Watches", "limit": 100}).json()
        assert page["total"] == 11 and "api-watch" in [x["id"] for x in page["items"]]
        # an operator's label: the same vector (read back from the store), a new payload
        before = rt.replica.v.state().view.get(["api-watch"])
        version = client.get("/listings/api-watch").json()["version"]
        r = client.put("/listings/api-watch/category",
                       json={"category_path": ["Watches", "Wrist Watches"], "version": version})
        assert r.status_code == 200, r.text
        meta = rt.replica.v.state().meta("api-watch")
        assert meta is not None and meta.source == "confirmed"
        assert meta.category_path == ["Watches", "Wrist Watches"]
        assert np.array_equal(rt.replica.v.state().view.get(["api-watch"]), before)
        assert client.delete("/listings/api-watch").status_code == 200
        # read-your-writes: the delete is in the index when the call returns
        assert client.get("/stats").json()["index_size"] == 70
        assert client.get("/health").json()["status"] == "ok"


def test_an_unreachable_milvus_is_a_store_failure(settings: Settings) -> None:
    """A 503 with a reason that names no address, like a state store that is down."""
    from indexer.fusion import Block, Fusion
    from indexer.milvus import MilvusIndex, VectorStoreUnavailable
    from indexer.state import StoreUnavailable

    s = settings.model_copy(update={"vector_store": "milvus://127.0.0.1:1",
                                    "broker_timeout": 0.5})
    with pytest.raises(VectorStoreUnavailable) as got:
        MilvusIndex.open(s, Fusion([Block("text", 8, 1.0)]))
    assert isinstance(got.value, StoreUnavailable) and "127.0.0.1" not in str(got.value)
