"""VectorIndex against exact brute force on synthetic clustered data (faiss contrib style)."""

import threading

import numpy as np
import pytest

import indexer.index as index_mod
from indexer.errors import IndexMismatch, InvalidInput
from indexer.index import (
    IndexConfig,
    VectorIndex,
    current_snapshot,
    read_snapshot,
    write_snapshot,
)


def clustered(n, d, centers=20, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(x, q, k):
    return np.argsort(-(q @ x.T), axis=1)[:, :k]


def recall(index, x, ids, q, k):
    truth = exact_top(x, q, k)
    got = index.search(q, k)
    pairs = zip(truth, got, strict=True)
    hits = sum(len({ids[j] for j in t} & {h[0] for h in g}) for t, g in pairs)
    return hits / (len(q) * k)


def brute(live, q, k, keep=lambda _lid: True):
    """Exact top-``k`` ids over ``live`` ({id: vector}) restricted to ``keep``."""
    ids = [lid for lid in live if keep(lid)]
    if not ids:
        return [[] for _ in q]
    x = np.stack([live[i] for i in ids])
    return [[ids[j] for j in row] for row in exact_top(x, q, min(k, len(ids)))]


def test_flat_is_exact_and_upsert_replaces():
    x = clustered(500, 32)
    ids = [f"l{i}" for i in range(len(x))]
    idx = VectorIndex(32)
    idx.upsert(ids, x)
    assert idx.kind == "flat" and len(idx) == 500
    assert recall(idx, x, ids, x[:50], 10) == 1.0
    # re-adding an id replaces its vector instead of duplicating it
    idx.upsert(["l0"], x[1:2])
    assert len(idx) == 500
    np.testing.assert_allclose(idx.get(["l0"])[0], x[1])
    assert idx.search(x[1:2], 2)[0][0][1] == pytest.approx(1.0, abs=1e-5)
    assert idx.state()["factory"] == "IDMap2,Flat"


def test_delete_removes_from_results():
    x = clustered(100, 16)
    ids = [f"l{i}" for i in range(100)]
    idx = VectorIndex(16)
    idx.upsert(ids, x)
    assert idx.delete(["l3", "unknown"]) == 1
    assert "l3" not in idx and len(idx) == 99
    assert all(h[0] != "l3" for h in idx.search(x[3:4], 99)[0])
    with pytest.raises(KeyError):
        idx.get(["l3"])


def test_payloads_travel_with_hits_and_are_copies():
    idx = VectorIndex(4)
    idx.upsert(["a", "b"], np.eye(4, dtype=np.float32)[:2],
               [{"title": "A"}, {"title": "B"}], labelled=[True, False], categories=["x", None])
    (lid, score, payload), = idx.search(np.eye(4, dtype=np.float32)[:1], 1)[0]
    assert (lid, payload) == ("a", {"title": "A"}) and score == pytest.approx(1.0)
    payload["title"] = "changed by a reader"
    assert idx.payload("a") == {"title": "A"}
    with pytest.raises(InvalidInput, match="both upserted and deleted"):
        idx.apply(["a"], np.ones((1, 4), np.float32), deletes=["a"])


@pytest.mark.parametrize("ann", ["hnsw", "ivf_sq8"])
def test_switches_to_ann_above_threshold_with_high_recall_and_working_deletes(ann):
    x = clustered(3000, 32, seed=1)
    ids = [f"l{i}" for i in range(len(x))]
    idx = VectorIndex(32, IndexConfig(exact_max=1000, ann=ann, background=False, nprobe=16))
    idx.upsert(ids[:800], x[:800])
    assert idx.kind == "flat"
    idx.upsert(ids[800:], x[800:])
    assert idx.kind == ann
    assert idx.state()["factory"] == ("IDMap2,HNSW32" if ann == "hnsw" else "IVF256,SQ8")
    rng = np.random.default_rng(2)
    q = x[rng.choice(len(x), 100)] + 0.2 * rng.normal(size=(100, 32)).astype(np.float32)
    assert recall(idx, x, ids, q, 10) >= 0.95  # stated tolerance vs exact search
    # delete on the approximate index: never returned again
    gone = {h[0] for h in idx.search(q[:1], 5)[0]}
    idx.delete(gone)
    assert not gone & {h[0] for h in idx.search(q[:1], 20)[0]}
    # upsert on the approximate index replaces
    idx.upsert(["l5"], x[6:7])
    top = idx.search(x[6:7], 2)[0]
    assert {h[0] for h in top} == {"l5", "l6"}
    assert len(idx) == 3000 - len(gone)


def test_background_merge_keeps_serving_and_loses_no_write():
    """Writes and searches during a flat -> IVF switch in a thread: nothing lost."""
    x = clustered(6000, 32, seed=3)
    ids = [f"l{i}" for i in range(len(x))]
    idx = VectorIndex(32, IndexConfig(exact_max=2000, ann="ivf_sq8", nprobe=64))
    idx.upsert(ids[:2500], x[:2500])  # crosses the threshold: a merge starts in a thread
    for start in range(2500, 6000, 100):  # keep writing and reading while it runs
        idx.upsert(ids[start : start + 100], x[start : start + 100])
        assert idx.search(x[start : start + 1], 1)[0][0][0] == ids[start]
    idx.delete(ids[:50])
    idx.wait_for_merge()
    assert idx.kind == "ivf_sq8" and len(idx) == 5950
    for i in (60, 2600, 5999):
        assert idx.search(x[i : i + 1], 1)[0][0][0] == ids[i]
    assert all(h[0] not in set(ids[:50]) for h in idx.search(x[:50], 5)[0])


def test_merge_while_writing_equals_brute_force_on_the_live_set(monkeypatch):
    """Deletes, replacements and adds made while a merge builds stay right once it lands."""
    x = clustered(800, 16, seed=4)
    ids = [f"l{i}" for i in range(len(x))]
    building, release = threading.Event(), threading.Event()
    real = index_mod._empty_index

    def held_merge(kind, data, config):
        if threading.current_thread().name == "vitrine-index-merge":
            building.set()
            release.wait(20)
        return real(kind, data, config)

    monkeypatch.setattr(index_mod, "_empty_index", held_merge)
    idx = VectorIndex(16, IndexConfig(merge_min=500))
    idx.upsert(ids[:600], x[:600])
    assert building.wait(20)  # the merge of slots 0..599 is under way
    q = clustered(20, 16, seed=5)
    before = idx.view()
    before_hits = before.search(q, 10)
    live = {ids[i]: x[i] for i in range(600)}
    idx.delete(ids[:50])
    replaced = np.flip(x[50:60], axis=1).copy()
    idx.upsert(ids[50:60], replaced)
    idx.upsert(ids[600:], x[600:])
    for i in range(50):
        del live[ids[i]]
    live.update({ids[50 + i]: replaced[i] for i in range(10)})
    live.update({ids[i]: x[i] for i in range(600, 800)})
    release.set()
    idx.wait_for_merge()
    v = idx.view()
    assert v.delta_start == 600 and v.base.ntotal == 600  # merged what was alive at its start
    assert len(v) == len(live) == 750
    got = [[h[0] for h in row] for row in v.search(q, 10)]
    assert got == brute(live, q, 10)
    np.testing.assert_allclose(v.get(ids[50:60]), replaced)
    assert before.search(q, 10) == before_hits  # the old version still answers as it did
    idx.compact()
    assert idx.view().delta_start == 810 and idx.view().base.ntotal == 750
    assert [[h[0] for h in row] for row in idx.search(q, 10)] == got


def labelled_catalog(n, d, seed=0):
    """Vectors, labelled flags (5%) and categories (predicted ones too) for filter tests."""
    rng = np.random.default_rng(seed)
    x = clustered(n, d, seed=seed)
    labelled = rng.random(n) < 0.05
    cats = [str(c) if (lab or rng.random() < 0.3) else None
            for c, lab in zip(rng.integers(0, 4, n), labelled, strict=True)]
    return x, labelled, cats


def test_filtered_search_is_exact_with_95_percent_unlabelled():
    x, labelled, cats = labelled_catalog(4000, 32, seed=6)
    ids = [f"l{i}" for i in range(len(x))]
    idx = VectorIndex(32, IndexConfig(merge_min=2000, background=False))
    idx.upsert(ids[:3000], x[:3000], labelled=labelled[:3000], categories=cats[:3000])
    idx.upsert(ids[3000:], x[3000:], labelled=labelled[3000:], categories=cats[3000:])
    view = idx.view()
    assert view.delta_start == 3000  # both the base and the delta answer
    dropped = [ids[i] for i in np.flatnonzero(labelled)[:20]]
    idx.delete(dropped)
    live = {ids[i]: x[i] for i in range(len(x)) if ids[i] not in set(dropped)}
    lab = {ids[i] for i in range(len(x)) if labelled[i]}
    cat = {ids[i]: cats[i] for i in range(len(x))}
    q = clustered(50, 32, seed=7)
    for kw, keep in (
        ({"labelled_only": True}, lambda i: i in lab),
        ({"category": "2"}, lambda i: cat[i] == "2"),
        ({"category": "1", "labelled_only": True}, lambda i: i in lab and cat[i] == "1"),
    ):
        got = idx.search(q, 10, **kw)
        assert [[h[0] for h in row] for row in got] == brute(live, q, 10, keep)
        assert all(keep(h[0]) for row in got for h in row)
    assert idx.search(q[:1], 10, category="no such category") == [[]]


@pytest.mark.parametrize("ann", ["ivf_sq8", "hnsw"])
@pytest.mark.parametrize("exact_max_filter", [0, 2048])
def test_filtered_search_on_an_approximate_base(ann, exact_max_filter):
    """Only matching hits; with few matches (<= filter_exact_max) the answer is exact."""
    x, labelled, cats = labelled_catalog(6000, 32, seed=8)
    ids = [f"l{i}" for i in range(len(x))]
    cfg = IndexConfig(exact_max=1000, ann=ann, background=False,
                      filter_exact_max=exact_max_filter)
    idx = VectorIndex(32, cfg)
    idx.upsert(ids, x, labelled=labelled, categories=cats)
    assert idx.kind == ann
    live = dict(zip(ids, x, strict=True))
    lab = {ids[i] for i in np.flatnonzero(labelled)}
    q = clustered(50, 32, seed=9)
    got = idx.search(q, 10, labelled_only=True)
    assert all(h[0] in lab for row in got for h in row)
    truth = brute(live, q, 10, lambda i: i in lab)
    rec = np.mean([len({h[0] for h in g} & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert rec >= (0.99 if exact_max_filter else 0.8)


@pytest.mark.parametrize("ann", ["ivf_sq8", "hnsw"])
def test_concurrent_readers_never_see_a_deleted_id_and_old_views_stay_fixed(ann):
    """Readers search while one writer upserts, replaces, deletes and merges (flat -> ANN)."""
    d = 16
    rng = np.random.default_rng(10)
    pool = clustered(6000, d, seed=10)
    cfg = IndexConfig(exact_max=1500, ann=ann, merge_min=300, nprobe=16)
    idx = VectorIndex(d, cfg)
    idx.upsert([f"w{i}" for i in range(1000)], pool[:1000],
               [{"id": f"w{i}"} for i in range(1000)], labelled=True)
    first = idx.view()
    q = pool[rng.choice(1000, 8)]
    first_hits = first.search(q, 10)
    deleted: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                n = len(deleted)
                view = idx.view()
                forbidden = set(deleted[:n])  # deleted before the view was taken
                qq = pool[r.choice(len(pool), 4)]
                hits = view.search(qq, 10, labelled_only=bool(r.integers(2)))
                for row in hits:
                    for lid, _, payload in row:
                        assert lid not in forbidden, f"{lid} deleted before view {view.version}"
                        assert payload["id"] == lid and lid in view
                    view.get([lid for lid, _, _ in row])
                assert view.search(qq, 10, labelled_only=False) == view.search(qq, 10)
                assert view.search(qq, 10) == view.search(qq, 10)  # a view never changes
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    alive = [f"w{i}" for i in range(1000)]
    nxt = 1000
    try:
        for step in range(120):
            if stop.is_set():
                break
            new = [f"w{i}" for i in range(nxt, nxt + 40)]
            again = list(rng.choice(alive, 5, replace=False))
            vecs = pool[rng.integers(0, len(pool), len(new) + len(again))]
            idx.upsert(new + again, vecs, [{"id": i} for i in new + again],
                       labelled=rng.random(len(vecs)) < 0.5)
            alive += new
            nxt += 40
            gone = list(rng.choice([a for a in alive if a not in again], 15, replace=False))
            idx.delete(gone)
            deleted.extend(gone)
            alive = [a for a in alive if a not in set(gone)]
            if step == 60:
                idx.wait_for_merge()
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    idx.wait_for_merge()
    assert idx.kind == ann and len(idx) == len(alive)
    assert sorted(idx.ids()) == sorted(alive)
    assert first.search(q, 10) == first_hits  # taken before every write: still the same


def test_a_held_view_keeps_its_payloads_and_dead_ones_are_dropped_after():
    idx = VectorIndex(4)
    v1 = np.eye(4, dtype=np.float32)[:1]
    idx.upsert(["a"], v1, [{"n": 1}])
    held = idx.view()
    idx.upsert(["a"], 2 * v1, [{"n": 2}])
    idx.upsert(["b"], v1, [{"n": 3}])
    assert held.payload("a") == {"n": 1} and idx.payload("a") == {"n": 2}
    np.testing.assert_allclose(held.get(["a"]), v1)
    assert "b" not in held and len(held) == 1
    del held
    idx.upsert(["c"], v1)  # the next publish finds no view that still sees slot 0 alive
    assert idx.view().payloads[0] is None and idx.view().slot_ids[0] is None


def test_save_load_roundtrip(tmp_path):
    x = clustered(200, 8)
    ids = [f"l{i}" for i in range(200)]
    for kind_cfg in (IndexConfig(), IndexConfig(exact_max=100, background=False)):
        idx = VectorIndex(8, kind_cfg)
        idx.upsert(ids, x, [{"i": i} for i in ids], labelled=[True, False] * 100,
                   categories=["a", None] * 100)
        idx.upsert(["extra"], x[:1])  # in the delta of the ivf one
        idx.delete(["l7"])
        write_snapshot(tmp_path / idx.kind, idx.write)
        back = VectorIndex.read(current_snapshot(tmp_path / idx.kind), kind_cfg)
        assert back.kind == idx.kind and back.ids() == idx.ids()
        assert back.state() | {"version": 0} == idx.state() | {"version": 0}
        for kw in ({}, {"labelled_only": True}, {"category": "a"}):
            assert back.search(x[:3], 5, **kw) == idx.search(x[:3], 5, **kw)
        np.testing.assert_allclose(back.get(ids[:5]), idx.get(ids[:5]))
        back.upsert(["after"], x[1:2])  # a loaded index takes writes
        assert "after" in back and len(back) == len(idx) + 1


def test_crash_during_save_keeps_the_last_good_snapshot(tmp_path):
    idx = VectorIndex(4)
    idx.upsert(["a"], np.ones((1, 4), np.float32))

    def write(d):
        idx.write(d)
        (d / "extra.json").write_text('{"pos": 1}')

    first = write_snapshot(tmp_path, write)

    def crash(d):
        (d / "base.faiss").write_bytes(b"half written")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_snapshot(tmp_path, crash)
    assert current_snapshot(tmp_path) == first
    assert read_snapshot(tmp_path) == (first, {"pos": 1})
    assert VectorIndex.read(first).ids() == ["a"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_wrong_dimension_and_nan_are_refused():
    idx = VectorIndex(4)
    with pytest.raises(IndexMismatch):
        idx.upsert(["a"], np.ones((1, 5), np.float32))
    with pytest.raises(InvalidInput, match="NaN"):
        idx.upsert(["a"], np.full((1, 4), np.nan, np.float32))


# --- a reduced approximate base (IndexConfig.reduce: PCA before the IVF / HNSW) ------------
def low_rank(n, d, rank, seed=0):
    """Clustered vectors living near a ``rank``-dimensional subspace of ``d`` dimensions, as
    fused embeddings do (most of their variance in a few directions)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0].T
    x = clustered(n, rank, seed=seed) @ basis + 0.003 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("ann", ["ivf_sq8", "hnsw"])
def test_reduced_base_recall_writes_across_merges_and_search_knobs(ann):
    data = low_rank(3100, 128, 24, seed=11)
    x, q = data[:3000], data[3000:]  # queries held out
    ids = [f"l{i}" for i in range(len(x))]
    cfg = IndexConfig(exact_max=1000, ann=ann, background=False, nprobe=16, reduce="pca32",
                      merge_min=500)
    idx = VectorIndex(128, cfg)
    idx.upsert(ids[:800], x[:800])
    assert idx.kind == "flat" and idx.state()["factory"] == "IDMap2,Flat"  # exact: full width
    idx.upsert(ids[800:], x[800:])
    assert idx.kind == ann
    assert idx.state()["factory"] == ("IDMap2,PCAR32,HNSW32" if ann == "hnsw"
                                      else "PCAR32,IVF256,SQ8")
    assert index_mod.kind_of(idx.view().base) == ann
    assert recall(idx, x, ids, q, 10) >= 0.95  # against exact search on the full vectors
    # the knob reaches the wrapped index through the IndexPreTransform
    at = {e: idx.view().search(q, 10, effort=e) for e in (1, 256)}
    assert at[1] != at[256]
    # get(): the projection back at full width, close to the stored vector
    back = idx.get(ids[:50])
    assert back.shape == (50, 128)
    assert np.min(np.sum(back * x[:50], axis=1)) > 0.97
    # deletes and replaces, then merged into a new (retrained) base: still right
    gone = {h[0] for h in idx.search(q[:1], 5)[0]}
    idx.delete(gone)
    idx.upsert(["l5"], x[6:7])
    rng = np.random.default_rng(2)
    idx.upsert([f"n{i}" for i in range(600)], q[rng.integers(0, 100, 600)])  # a merge
    idx.compact()
    assert idx.view().delta_start == idx.view().n_slots  # all of it in the new base
    assert not gone & {h[0] for h in idx.search(q[:1], 20)[0]}
    assert {h[0] for h in idx.search(x[6:7], 2)[0]} == {"l5", "l6"}
    assert len(idx) == 3600 - len(gone)


@pytest.mark.parametrize("ann", ["ivf_sq8", "hnsw"])
@pytest.mark.parametrize("exact_max_filter", [0, 2048])
def test_filtered_search_on_a_reduced_base(ann, exact_max_filter):
    """IDSelectorBitmap through the IndexPreTransform (0), exact over the back-projected
    vectors of the few matches (2048)."""
    data = low_rank(6050, 96, 20, seed=8)
    x, q = data[:6000], data[6000:]
    rng = np.random.default_rng(8)
    labelled = rng.random(len(x)) < 0.05
    ids = [f"l{i}" for i in range(len(x))]
    cfg = IndexConfig(exact_max=1000, ann=ann, background=False, reduce="pca24",
                      filter_exact_max=exact_max_filter)
    idx = VectorIndex(96, cfg)
    idx.upsert(ids, x, labelled=labelled)
    assert idx.state()["factory"].count("PCAR24") == 1
    lab = {ids[i] for i in np.flatnonzero(labelled)}
    got = idx.search(q, 10, labelled_only=True)
    assert all(h[0] in lab for row in got for h in row)
    truth = brute(dict(zip(ids, x, strict=True)), q, 10, lambda i: i in lab)
    rec = np.mean([len({h[0] for h in g} & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert rec >= 0.9


def test_reduction_width_rules():
    cfg = IndexConfig(reduce="pca64")
    assert index_mod.reduced_dim(cfg, 128, 10_000) == 64
    assert index_mod.reduced_dim(cfg, 64, 10_000) is None  # not narrower
    assert index_mod.reduced_dim(cfg, 128, 50) is None  # fewer vectors than components
    assert index_mod.reduced_dim(IndexConfig(reduce="none"), 128, 10_000) is None
    assert index_mod.factory_string("ivf_sq8", 10_000, cfg, 128) == "PCAR64,IVF512,SQ8"
    assert index_mod.factory_string("flat", 10_000, cfg, 128) == "IDMap2,Flat"
    with pytest.raises(ValueError, match="reduction"):
        index_mod.reduced_dim(IndexConfig(reduce="opq"), 128, 10_000)


def test_reduced_base_save_load_roundtrip(tmp_path):
    x = low_rank(2000, 64, 12)
    ids = [f"l{i}" for i in range(len(x))]
    cfg = IndexConfig(exact_max=500, background=False, reduce="pca16")
    idx = VectorIndex(64, cfg)
    idx.upsert(ids, x, labelled=[True, False] * 1000)
    idx.upsert(["extra"], x[:1])
    write_snapshot(tmp_path, idx.write)
    back = VectorIndex.read(current_snapshot(tmp_path), cfg)
    assert back.state() | {"version": 0} == idx.state() | {"version": 0}
    assert back.state()["factory"].startswith("PCAR16,")
    for kw in ({}, {"labelled_only": True}):
        assert back.search(x[:3], 5, **kw) == idx.search(x[:3], 5, **kw)
    np.testing.assert_allclose(back.get(ids[:5]), idx.get(ids[:5]))


@pytest.mark.parametrize("ann", ["ivf_sq8", "hnsw"])
def test_delta_rows_score_like_the_reduced_base(ann):
    """A listing still in the delta and the same vector in a reduced base score alike: the
    delta is scored in the base's projected space, not whole (which would rank recent posts
    above equally close listings by what the projection drops)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 64)).astype(np.float32)  # full rank: pca16 drops ~3/4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"l{i}" for i in range(len(x))]
    idx = VectorIndex(64, IndexConfig(exact_max=500, ann=ann, background=False,
                                      reduce="pca16", merge_min=10_000))
    idx.upsert(ids, x)
    assert "PCAR16" in idx.state()["factory"]
    idx.upsert(["copy-of-l0"], x[:1])  # in the delta, until the next merge
    assert idx.view().delta_start <= idx.view().n_slots - 1
    hits = {h[0]: h[1] for h in idx.search(x[:1], 5, effort=256)[0]}
    assert "l0" in hits and "copy-of-l0" in hits
    assert abs(hits["copy-of-l0"] - hits["l0"]) < 0.05 * hits["l0"]
    assert hits["l0"] < 0.6  # what the projection keeps of a unit vector, not its whole 1.0
