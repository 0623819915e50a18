"""The ingest use case against the real embedded store (SQLite), real models, real FAISS.

Races are made deterministic by wrapping ``Vitrine.embed`` from the test: the wrapper runs
the racing write (a re-post, a delete) while the batch is in flight, at a known point.
Nothing in the product knows about it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from indexer.replica import Replica
from indexer.runtime import Runtime
from tests.support.service import copy_seed

pytestmark = pytest.mark.slow


@pytest.fixture
def rt(tmp_path, settings, registry, seed_dir) -> Iterator[Runtime]:  # type: ignore[no-untyped-def]
    s = settings.model_copy(update={"data_dir": copy_seed(seed_dir, tmp_path / "data"),
                                    "broker_url": None, "retry_delay": 0.0,
                                    "max_attempts": 3})
    runtime = Runtime(s, registry)
    try:
        yield runtime
    finally:
        runtime.stop()


def post(rt: Runtime, lid: str, title: str, **kw: Any) -> int:
    return rt.store.accept({"id": lid, "title": title, "description": "", **kw}, None)


def during_embed(rt: Runtime, monkeypatch: pytest.MonkeyPatch,
                 action: Callable[[list[str]], None]) -> list[list[str]]:
    """Run ``action(ids)`` inside every embedding call, before it embeds."""
    v = rt.replica.v
    real = v.embed
    calls: list[list[str]] = []

    def embed(listings, *args, **kwargs):  # type: ignore[no-untyped-def]
        ids = [x.id for x in listings]
        calls.append(ids)
        action(ids)
        return real(listings, *args, **kwargs)

    monkeypatch.setattr(v, "embed", embed)
    return calls


def settle(rt: Runtime) -> None:
    """Rounds until nothing is claimable, then apply the log here."""
    while rt.ingestor.run().claimed:
        pass
    rt.replica.catch_up()


def title_of(rt: Runtime, lid: str) -> str | None:
    meta = rt.replica.v.state().meta(lid)
    return None if meta is None else meta.title


def test_a_repost_during_a_batch_wins(rt, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    v1 = post(rt, "mug-1", "Ceramic coffee mug")
    fired: list[int] = []

    def repost(ids: list[str]) -> None:
        if not fired:  # the seller fixes a typo while version 1 is being embedded
            fired.append(post(rt, "mug-1", "Ceramic coffee mug, blue"))

    during_embed(rt, monkeypatch, repost)
    r = rt.ingestor.run()
    assert r.claimed == 1 and r.committed == []  # version 1's result lost the race
    st = rt.store.status("mug-1")
    assert st == {"status": "queued", "version": fired[0]} and fired[0] > v1
    settle(rt)
    st = rt.store.status("mug-1")
    assert st["status"] == "indexed" and st["version"] == fired[0]
    assert title_of(rt, "mug-1") == "Ceramic coffee mug, blue"
    assert rt.replica.versions["mug-1"] == fired[0]


def test_a_delete_during_a_batch_is_not_undone(rt, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    post(rt, "lamp-1", "Brass table lamp")
    post(rt, "pan-1", "Non-stick frying pan 24 cm")
    deleted: list[int] = []

    def delete(ids: list[str]) -> None:
        if not deleted:
            deleted.append(rt.store.delete("lamp-1"))

    during_embed(rt, monkeypatch, delete)
    r = rt.ingestor.run()
    assert r.claimed == 2 and [o.id for o in r.committed] == ["pan-1"]
    settle(rt)
    assert rt.store.status("lamp-1") == {"status": "deleted", "version": deleted[0]}
    assert title_of(rt, "lamp-1") is None and title_of(rt, "pan-1") is not None
    hits = rt.replica.v.search(text="brass table lamp", k=50)
    assert "lamp-1" not in [h.id for h in hits]


def test_a_redelivered_event_changes_nothing(rt) -> None:  # type: ignore[no-untyped-def]
    post(rt, "kettle-1", "Electric kettle 1.5 l")
    settle(rt)
    st = rt.store.status("kettle-1")
    pos = rt.store.last_pos()
    # the same outcome committed again (a duplicate delivery) is refused by the store
    from indexer.state import Outcome

    assert rt.store.commit([Outcome("kettle-1", st["version"], st, None)]) == [False]
    assert rt.store.last_pos() == pos and rt.ingestor.run().claimed == 0


def test_a_poison_listing_fails_after_max_attempts_and_sinks_nothing(rt, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    post(rt, "ok-1", "Analog wrist watch for men")
    post(rt, "poison", "Cotton double bed sheet")
    post(rt, "ok-2", "Stainless steel pressure cooker 5 l")

    def poison(ids: list[str]) -> None:
        if "poison" in ids:
            raise RuntimeError("injected fault")

    calls = during_embed(rt, monkeypatch, poison)
    r = rt.ingestor.run()
    # one try with the whole batch, then each listing alone; the poison one is given back
    assert calls == [["ok-1", "poison", "ok-2"], ["ok-1"], ["poison"], ["ok-2"]]
    assert sorted(o.id for o in r.committed) == ["ok-1", "ok-2"] and r.released == 1
    assert rt.store.status("poison")["status"] == "queued"
    settle(rt)
    st = rt.store.status("poison")
    assert st["status"] == "failed" and "3 attempts" in st["error"], st
    assert calls.count(["poison"]) == 3  # attempts 1, 2, 3; the 4th claim gives up
    assert title_of(rt, "ok-1") and title_of(rt, "ok-2") and title_of(rt, "poison") is None


def test_replicas_converge_to_the_same_digest(rt, registry) -> None:  # type: ignore[no-untyped-def]
    for i in range(6):
        post(rt, f"c-{i}", f"Cotton cushion cover {i}")
    post(rt, "c-0", "Cotton cushion cover, red")
    settle(rt)
    rt.store.delete("c-3")
    rt.replica.catch_up()
    other = Replica.open(rt.settings, rt.store, registry)
    assert other.digest() == rt.replica.digest()
    assert other.versions == rt.replica.versions
    assert other.v.state().meta("c-0").title == "Cotton cushion cover, red"
    assert other.v.state().meta("c-3") is None


def test_a_replica_behind_a_trim_reloads_instead_of_skipping(rt, registry) -> None:  # type: ignore[no-untyped-def]
    lagging = Replica.open(rt.settings, rt.store, registry)
    for i in range(4):
        post(rt, f"t-{i}", f"Steel water bottle {i}")
    settle(rt)
    assert rt.replica.snapshot()  # publishes and trims the log up to its position
    assert rt.store.trimmed_upto() == rt.replica.pos > lagging.pos
    lagging.catch_up()
    assert lagging.digest() == rt.replica.digest()
    assert all(lagging.v.state().meta(f"t-{i}") is not None for i in range(4))


def test_a_stale_snapshot_is_never_published_over_a_newer_one(rt, registry) -> None:  # type: ignore[no-untyped-def]
    behind = Replica.open(rt.settings, rt.store, registry)
    post(rt, "s-1", "Leather office chair")
    settle(rt)
    assert rt.replica.snapshot()
    post(rt, "s-2", "Wooden study table")
    settle(rt)
    # `behind` catches up (through a reload: the log was trimmed) before it may publish
    assert behind.snapshot()
    assert behind.pos == rt.replica.pos and behind.digest() == rt.replica.digest()
    # a process holding nothing the published snapshot lacks writes no copy of it
    root = rt.settings.data_dir / "index"
    published = sorted(p.name for p in root.glob("snap-*"))
    assert not rt.replica.snapshot()
    assert sorted(p.name for p in root.glob("snap-*")) == published


def test_a_running_replica_follows_a_seed_once(tmp_path, settings, registry, small_catalog) -> None:  # type: ignore[no-untyped-def]
    from evaluation.bench_service import write_seed_csv
    from indexer.runtime import seed
    from indexer.state.sqlite_store import SqliteStore
    from tests.support.offline import CSV

    s = settings.model_copy(update={"data_dir": tmp_path / "data", "broker_url": None})
    store = SqliteStore.open(s.data_dir)
    try:
        early = Replica.open(s, store, registry)  # started before the catalog was seeded
        assert len(early.v) == 0
        csv = tmp_path / "catalog.csv"
        write_seed_csv(CSV, csv, {x.id for x in small_catalog[::10]})
        (tmp_path / "images").symlink_to(CSV.parent / "images")
        assert "seeded the index with 28 listings" in seed(s, store, csv, registry=registry)
        assert "ignored" in seed(s, store, csv, registry=registry)  # once only
        early.catch_up()
        assert len(early.v) == 28 and early.pos == store.last_pos() == 1
        applied = early.applied
        early.catch_up()  # the reload entry is behind it now: no reload loop
        assert early.applied == applied and len(early.v) == 28
        late = Replica.open(s, store, registry)  # started after: snapshot + the same entry
        assert late.digest() == early.digest() and len(late.v) == 28
    finally:
        store.close()


def test_an_operators_label_reaches_every_replica_and_then_votes(rt, registry) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    # opened before the post: it applies the upsert and the label in one batch
    other = Replica.open(rt.settings, rt.store, registry)
    post(rt, "lab-1", "Cotton cushion cover, blue", category="Acessories")
    settle(rt)
    st = rt.store.status("lab-1")
    assert st is not None and st["source"] == "unconfirmed" and "unknown_category" in st["review"]
    assert rt.store.review_queue(None, 0, 10) == (1, ["lab-1"])
    held = rt.replica.v.state()
    assert not held.meta("lab-1").labelled  # type: ignore[union-attr]
    vec = held.view.get(["lab-1"])
    assert "lab-1" not in {n.id for n in rt.replica.v.search_vector(vec[0], 5, labelled_only=True)}
    path = ["Home Furnishing", "Cushions, Pillows & Covers"]
    label = {"category": path[0], "category_path": path, "source": "confirmed"}
    # the decided status, as the API writes it: the review is over
    decided = {**{k: x for k, x in st.items() if k not in ("review", "evidence")}, **label}
    v = rt.store.relabel("lab-1", st["version"], decided,
                         {"op": "label", "id": "lab-1", "label": label})
    rt.replica.catch_up()
    other.catch_up()
    for r in (rt.replica, other):
        m = r.v.state().meta("lab-1")
        assert m is not None and (m.title, m.category, m.category_path, m.source) == (
            "Cotton cushion cover, blue", path[0], path, "confirmed")
        assert m.labelled and r.versions["lab-1"] == v
        assert np.array_equal(r.v.state().view.get(["lab-1"]), vec)  # the same vector
        # it votes now: the labelled-only search a vote runs finds it first
        assert r.v.search_vector(vec[0], 5, labelled_only=True)[0].id == "lab-1"
    assert other.digest() == rt.replica.digest()
    assert rt.store.review_queue(None, 0, 10) == (0, [])
    # a replica started from a snapshot written after it holds the label too
    assert rt.replica.snapshot()
    fresh = Replica.open(rt.settings, rt.store, registry)
    assert fresh.v.state().meta("lab-1").source == "confirmed"  # type: ignore[union-attr]
