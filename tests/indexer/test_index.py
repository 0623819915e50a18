"""VectorIndex against exact brute force on synthetic clustered data (faiss contrib style)."""

import numpy as np
import pytest

from indexer.errors import IndexMismatch, InvalidInput
from indexer.index import IndexConfig, VectorIndex, current_snapshot, write_snapshot


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
    hits = sum(len({ids[j] for j in t} & {h for h, _ in g}) for t, g in pairs)
    return hits / (len(q) * k)


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


def test_delete_removes_from_results():
    x = clustered(100, 16)
    ids = [f"l{i}" for i in range(100)]
    idx = VectorIndex(16)
    idx.upsert(ids, x)
    assert idx.delete(["l3", "unknown"]) == 1
    assert "l3" not in idx and len(idx) == 99
    assert all(h != "l3" for h, _ in idx.search(x[3:4], 99)[0])


@pytest.mark.parametrize("ann", ["hnsw", "ivf_sq8"])
def test_switches_to_ann_above_threshold_with_high_recall_and_working_deletes(ann):
    x = clustered(3000, 32, seed=1)
    ids = [f"l{i}" for i in range(len(x))]
    idx = VectorIndex(32, IndexConfig(exact_max=1000, ann=ann, background=False, nprobe=16))
    idx.upsert(ids[:800], x[:800])
    assert idx.kind == "flat"
    idx.upsert(ids[800:], x[800:])
    assert idx.kind == ann
    rng = np.random.default_rng(2)
    q = x[rng.choice(len(x), 100)] + 0.2 * rng.normal(size=(100, 32)).astype(np.float32)
    assert recall(idx, x, ids, q, 10) >= 0.95  # stated tolerance vs exact search
    # delete on the approximate index: never returned again
    gone = {h for h, _ in idx.search(q[:1], 5)[0]}
    idx.delete(gone)
    assert not gone & {h for h, _ in idx.search(q[:1], 20)[0]}
    # upsert on the approximate index replaces
    idx.upsert(["l5"], x[6:7])
    top = idx.search(x[6:7], 2)[0]
    assert {h for h, _ in top} == {"l5", "l6"}
    assert len(idx) == 3000 - len(gone)


def test_background_rebuild_keeps_serving_and_loses_no_write():
    """Writes and searches during a flat -> IVF switch in a thread: nothing lost."""
    x = clustered(6000, 32, seed=3)
    ids = [f"l{i}" for i in range(len(x))]
    idx = VectorIndex(32, IndexConfig(exact_max=2000, ann="ivf_sq8", nprobe=64))
    idx.upsert(ids[:2500], x[:2500])  # crosses the threshold: rebuild starts in a thread
    for start in range(2500, 6000, 100):  # keep writing and reading while it runs
        idx.upsert(ids[start : start + 100], x[start : start + 100])
        assert idx.search(x[start : start + 1], 1)[0][0][0] == ids[start]
    idx.delete(ids[:50])
    idx.wait_for_rebuild()
    assert idx.kind == "ivf_sq8" and len(idx) == 5950
    for i in (60, 2600, 5999):
        assert idx.search(x[i : i + 1], 1)[0][0][0] == ids[i]
    assert all(h not in set(ids[:50]) for h, _ in idx.search(x[:50], 5)[0])


def test_save_load_roundtrip(tmp_path):
    x = clustered(200, 8)
    ids = [f"l{i}" for i in range(200)]
    for kind_cfg in (IndexConfig(), IndexConfig(exact_max=100, background=False)):
        idx = VectorIndex(8, kind_cfg)
        idx.upsert(ids, x)
        write_snapshot(tmp_path / idx.kind, idx.write)
        back = VectorIndex.read(current_snapshot(tmp_path / idx.kind), kind_cfg)
        assert back.kind == idx.kind and back.ids() == idx.ids()
        assert back.search(x[:3], 5) == idx.search(x[:3], 5)


def test_crash_during_save_keeps_the_last_good_snapshot(tmp_path):
    idx = VectorIndex(4)
    idx.upsert(["a"], np.ones((1, 4), np.float32))
    first = write_snapshot(tmp_path, idx.write)

    def crash(d):
        (d / "vectors.faiss").write_bytes(b"half written")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_snapshot(tmp_path, crash)
    assert current_snapshot(tmp_path) == first
    assert VectorIndex.read(first).ids() == ["a"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_wrong_dimension_and_nan_are_refused():
    idx = VectorIndex(4)
    with pytest.raises(IndexMismatch):
        idx.upsert(["a"], np.ones((1, 5), np.float32))
    with pytest.raises(InvalidInput, match="NaN"):
        idx.upsert(["a"], np.full((1, 4), np.nan, np.float32))
