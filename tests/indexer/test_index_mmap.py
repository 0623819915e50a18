"""A snapshot read back mapped (issue 15, part 2): the base and the per-slot tables are
read-only mappings of the snapshot's files, shared by the processes of a host, with the
writes since the snapshot in private memory on top.

Real FAISS, real files, real processes (the two-process check reads ``/proc``).
"""

import hashlib
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from evaluation.bench_replicas import run_replicas_bench
from indexer.errors import IndexMismatch
from indexer.index import IndexConfig, IndexView, VectorIndex, current_snapshot, write_snapshot

DIM = 32
CONFIGS = {
    "flat": IndexConfig(background=False),
    "ivf_sq8": IndexConfig(exact_max=500, background=False, reduce="none"),
    "pca_ivf_sq8": IndexConfig(exact_max=500, background=False, reduce="pca16"),
    "hnsw": IndexConfig(exact_max=500, ann="hnsw", background=False, reduce="none"),
}
CATEGORIES = ("Watches", "Clothing", "Footwear")


def vectors(n: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (an approximate index on uniform noise says little): the same
    clusters for every ``seed``, other points."""
    centres = np.random.default_rng(0).normal(size=(20, DIM))
    rng = np.random.default_rng(seed + 1)
    x = centres[rng.integers(20, size=n)] + 0.3 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def payload(i: int) -> dict:
    cat = CATEGORIES[i % 3]
    return {"title": f"listing n°{i} ✓", "category": cat, "source": "seller",
            "category_path": [cat, f"{cat} sub"]}


def build(config: IndexConfig, n: int = 1200) -> tuple[VectorIndex, list[str], np.ndarray]:
    """An index with a base, dead slots and a delta (the state a snapshot is taken in)."""
    x = vectors(n)
    ids = [f"l{i}" for i in range(n)]
    idx = VectorIndex(DIM, config)
    idx.upsert(ids, x, [payload(i) for i in range(n)], labelled=[i % 2 == 0 for i in range(n)],
               categories=[CATEGORIES[i % 3] for i in range(n)])
    idx.compact()
    idx.delete(ids[:40:4])
    # re-posts with other vectors from the same distribution (an IVF's 8-bit codes are
    # trained on it: a vector far outside it would come back clipped after a merge)
    idx.upsert(ids[1:30:3], x[31:60:3], [{"title": "re-posted"}] * 10)
    idx.upsert(["new-1", "new-2"], vectors(2, seed=1), [payload(7), {}])
    return idx, ids, x


def snapshot(idx: VectorIndex, root: Path) -> Path:
    snap = write_snapshot(root, idx.write)
    assert snap is not None
    return snap


def same_answers(a: VectorIndex, b: VectorIndex, q: np.ndarray) -> None:
    assert len(a) == len(b) and sorted(a.ids()) == sorted(b.ids())
    assert a.state() | {"version": 0} == b.state() | {"version": 0}
    for kw in ({}, {"labelled_only": True}, {"category": "Watches"},
               {"category": "Clothing", "labelled_only": True}, {"category": "nope"}):
        assert a.search(q, 10, **kw) == b.search(q, 10, **kw), kw
    some = a.ids()[::37]
    np.testing.assert_array_equal(a.get(some), b.get(some))
    assert [a.payload(i) for i in some] == [b.payload(i) for i in some]


def mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split()) >= 6}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_mapped_snapshot_answers_as_the_index_it_was_written_from(tmp_path, name):
    idx, _, x = build(CONFIGS[name])
    snap = snapshot(idx, tmp_path)
    back = VectorIndex.read(snap, CONFIGS[name])
    assert back.kind == idx.kind == ("flat" if name == "flat" else CONFIGS[name].ann)
    same_answers(idx, back, x[::50])
    # what the snapshot holds is mapped, not copied: the base and the per-slot tables
    maps = mapped_files()
    for f in ("base.faiss", "ids.bin", "payloads.bin", "lookup_keys.npy", "labelled.npy"):
        assert str(snap / f) in maps, f
    view = back.view()
    assert view.slot_ids.mapped == view.payloads.mapped == view.n_slots
    assert len(view.slot_of) == len(back) and sorted(view.slot_of) == sorted(back.ids())
    if back.kind == "ivf_sq8":  # no private id -> list hash table: the mapped table instead
        ivf = faiss.extract_index_ivf(view.base)
        assert ivf.direct_map.type == faiss.DirectMap.NoMap and view.base_where is not None


@pytest.mark.parametrize("name", ["flat", "ivf_sq8", "pca_ivf_sq8"])
def test_writes_after_a_mapped_load_behave_as_on_the_index_written(tmp_path, name):
    """Upserts, deletes, a re-post of a mapped listing, held views and a merge: the mapped
    index and the one it was written from, given the same writes, answer the same; the
    snapshot's files are never written."""
    cfg = CONFIGS[name]
    a, ids, x = build(cfg)
    snap = snapshot(a, tmp_path)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in snap.iterdir()}
    b = VectorIndex.read(snap, cfg)
    held_a, held_b = a.view(), b.view()
    q = x[::60]
    before = held_b.search(q, 10)
    y = vectors(50, seed=2)
    for idx in (a, b):
        idx.upsert([f"more-{i}" for i in range(50)], y, [payload(i) for i in range(50)],
                   labelled=True, categories=["Footwear"] * 50)
        idx.upsert(["l500", "l501"], x[300:302], [{"title": "moved"}] * 2,
                   categories=["Clothing", None])
        assert idx.delete(["l600", "more-3", "never-there"]) == 2
        idx.delete(["l700"])
        idx.upsert(["l700"], x[700:701], [{"title": "back"}])  # re-post of a deleted one
    assert b.payload("l500") == {"title": "moved"} and "l600" not in b and "more-3" not in b
    assert b.payload("l700") == {"title": "back"} and held_b.payload("l500") == payload(500)
    assert "l600" in held_b and "more-0" not in held_b
    assert held_b.search(q, 10) == before == held_a.search(q, 10)
    same_answers(a, b, q)
    for idx in (a, b):
        idx.compact()  # a merge: a private base from the mapped one's vectors
    assert b.view().base_where is None
    if name == "flat":
        same_answers(a, b, q)
    else:  # a read index has no trained IVF to reuse: its merge trains again (the same
        # vectors, another sample), so the quantised answers may differ in the last places
        assert sorted(a.ids()) == sorted(b.ids())
        assert [a.payload(i) for i in a.ids()] == [b.payload(i) for i in a.ids()]
        live = b.ids()[::25]  # each found by its stored vector (a reduced base stores a
        # projection: near neighbours may then come first)
        hits = b.search(b.get(live), 10)
        found = [lid in {h[0] for h in row} for lid, row in zip(live, hits, strict=True)]
        assert np.mean(found) >= (0.9 if name.startswith("pca") else 1.0)
    assert held_b.search(q, 10) == before  # a view taken before it all still answers
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in snap.iterdir()} == digest


def test_a_snapshot_of_a_mapped_index_reads_back_the_same(tmp_path):
    cfg = CONFIGS["pca_ivf_sq8"]
    a, ids, x = build(cfg)
    b = VectorIndex.read(snapshot(a, tmp_path / "one"), cfg)
    b.upsert(["after"], vectors(1, seed=3), [{"title": "written after the load"}])
    b.delete(["l900", "l1"])
    c = VectorIndex.read(snapshot(b, tmp_path / "two"), cfg)  # mapped slots and new ones
    same_answers(b, c, x[::70])
    assert c.payload("after") == {"title": "written after the load"}
    assert "l900" not in c and "l1" not in c


def test_two_processes_share_the_snapshot_pages():
    """Measured from /proc: the second process serving the snapshot maps the base and the
    tables the first one paged in, and adds little private memory (loose bounds: the
    bench's numbers at 1M are in docs/scale.md)."""
    r = run_replicas_bench(20_000, 64, config=IndexConfig(background=False, reduce="pca32"))
    assert r["factory"].startswith("PCAR32,IVF") and r["kind"] == "ivf_sq8"
    first, second = r["processes"]["first"], r["processes"]["second"]
    assert first["found"] == second["found"] == 200 and second["live"] == 20_000
    assert second["shared"] - r["processes"]["empty"]["shared"] > 0.5 * r["index_bytes"]
    assert r["extra_process_private_bytes"] < 0.5 * r["index_bytes"]
    assert json.loads(json.dumps(r)) == r  # the JSON the command prints


def to_layout_1(view: IndexView, snap: Path) -> None:
    """Rewrite ``snap``'s index files (of ``view``) as vitrine wrote them before they were
    mapped: ids and payloads in ``slots.json``, an IVF base with its own id -> list table."""
    faiss.write_index(view.base, str(snap / "base.faiss"))
    live = view.alive.tolist()
    slots = {"ids": [view.slot_ids[s] if live[s] else None for s in range(view.n_slots)],
             "payloads": [view.payloads[s] if live[s] else None for s in range(view.n_slots)]}
    (snap / "slots.json").write_text(json.dumps(slots))
    for f in ("ids.bin", "ids.npy", "payloads.bin", "payloads.npy", "lookup_keys.npy",
              "lookup_slots.npy", "base_where.npy"):
        (snap / f).unlink(missing_ok=True)
    state = json.loads((snap / "index.json").read_text())
    del state["layout"]
    (snap / "index.json").write_text(json.dumps(state))


@pytest.mark.parametrize("name", ["flat", "ivf_sq8"])
def test_an_older_layout_is_read_and_a_newer_one_refused(tmp_path, name):
    idx, _, x = build(CONFIGS[name])
    snap = snapshot(idx, tmp_path)
    shutil.copytree(snap, tmp_path / "newer")
    to_layout_1(idx.view(), snap)
    back = VectorIndex.read(snap, CONFIGS[name])
    same_answers(idx, back, x[::50])
    back.upsert(["l3"], -x[3:4])  # writes work on it as before
    assert back.get(["l3"])[0] @ x[3] < 0 and len(back) == len(idx)
    state = json.loads((tmp_path / "newer" / "index.json").read_text())
    (tmp_path / "newer" / "index.json").write_text(json.dumps(state | {"layout": 99}))
    with pytest.raises(IndexMismatch, match="layout 99"):
        VectorIndex.read(tmp_path / "newer", CONFIGS[name])


def test_a_format_2_snapshot_still_loads(built, settings, registry, tmp_path):
    """The pipeline's snapshot format 2 (index layout 1) loads; the next save writes 3."""
    from indexer.pipeline import SNAPSHOT_FORMAT, Vitrine

    root = tmp_path / "index"
    built.save(root)
    snap = current_snapshot(root)
    assert snap is not None and SNAPSHOT_FORMAT == 3
    to_layout_1(built.state().view, snap)
    manifest = json.loads((snap / "manifest.json").read_text())
    (snap / "manifest.json").write_text(json.dumps(manifest | {"format": 2}))
    back = Vitrine.load(root, settings, registry)
    assert back.search(text="analog wrist watch", k=5) == built.search(
        text="analog wrist watch", k=5)
    back.save(root)
    assert json.loads((current_snapshot(root) / "manifest.json").read_text())["format"] == 3
