"""The vector index: FAISS with string listing ids, upsert, delete and atomic snapshots.

* Listing ids are strings; FAISS wants int64. Each stored vector gets a fresh int64 from a
  monotonic counter, and ``_ids`` maps listing id -> int64 (``_keys`` the reverse). Upserting
  an id that is already there replaces its vector (old int removed, new one added).
* **Index choice by size.** Up to ``exact_max`` vectors the index is exact
  (``IndexFlatIP``: brute force, 100% recall). Past it, the index is rebuilt as the
  approximate kind ``ann`` (see ``vitrine bench search`` for the measurements behind it):

  - ``ivf_sq8`` (default): an inverted file with ``nlist ~ 4 sqrt(n)`` lists and 8-bit scalar
    quantised vectors (d + 8 bytes per vector); it removes vectors natively, and is retrained
    (more lists) whenever the catalog has grown 4x since the last training;
  - ``hnsw``: HNSW over full float vectors; fastest, but 4x the memory and it cannot remove
    vectors: deletes are tombstones skipped at search time (``IDSelectorNot``) until
    :meth:`compact` rebuilds without them.
* **Rebuilds without downtime.** A rebuild (switch, retraining, compaction) copies the live
  vectors under the lock, trains and fills the new index *outside* it while searches and
  writes go on against the old one, then replays the writes made meanwhile and swaps.
* Inner product over the fused vectors (see :mod:`indexer.fusion`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from .errors import IndexMismatch, InvalidInput

# faiss's bundled stubs describe the SWIG C++ signatures (remove_ids(IDSelector), ...), not
# the numpy-friendly methods its Python layer installs, so it is typed as Any here.
faiss: Any = _faiss
CURRENT = "CURRENT"


def configure_faiss(threads: int) -> None:
    """FAISS's OpenMP threads for this process (process-wide, like torch's)."""
    faiss.omp_set_num_threads(threads)


ANN_KINDS = ("ivf_sq8", "hnsw")
KINDS = ("flat", *ANN_KINDS)


@dataclass(frozen=True)
class IndexConfig:
    exact_max: int = 10_000
    ann: str = "ivf_sq8"
    nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    compact_ratio: float = 0.2  # rebuild an HNSW index when tombstones exceed this share
    retrain_growth: float = 4.0  # retrain IVF when the catalog grew this much since training
    background: bool = True  # rebuild in a thread (False: inline, e.g. in batch jobs)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists: ~4 sqrt(n), a power of two, at least 16."""
    return int(max(16, 2 ** round(np.log2(4 * np.sqrt(max(n, 1))))))


def build_faiss_index(
    kind: str,
    x: np.ndarray,
    ids: np.ndarray | None = None,
    config: IndexConfig | None = None,
) -> faiss.Index:
    """A filled inner-product index of ``kind`` over ``x`` (ids default to row numbers).

    Every kind answers ``add_with_ids``, ``search`` and ``reconstruct(id)`` on external ids.
    """
    cfg = config or IndexConfig()
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
        hnsw.hnsw.efSearch = cfg.hnsw_ef_search
        index = faiss.IndexIDMap2(hnsw)
    elif kind == "ivf_sq8":
        nlist = ivf_nlist(n)
        ivf = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT,
        )
        # faiss wants >= 39 points per centroid; more only slows training
        rng = np.random.default_rng(0)
        sample = x if n <= 40 * nlist else x[rng.choice(n, 40 * nlist, replace=False)]
        ivf.train(np.ascontiguousarray(sample))
        ivf.nprobe = cfg.nprobe
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct + remove by id
        index = ivf
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")
    if n:
        index.add_with_ids(np.ascontiguousarray(x), ids)
    return index


def kind_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexIVF):
        return "ivf_sq8"
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"


def index_bytes(index: faiss.Index) -> int:
    """Serialized size: what the vectors, codes, ids and graph take in memory."""
    return int(faiss.serialize_index(index).nbytes)


@dataclass(frozen=True)
class SearchKnob:
    name: str
    value: int

    def apply(self, index: faiss.Index) -> None:
        if self.name == "nprobe":
            faiss.extract_index_ivf(index).nprobe = self.value
        elif self.name == "efSearch":
            faiss.downcast_index(index.index).hnsw.efSearch = self.value


def tune_ann(kind: str) -> list[SearchKnob]:
    """The search-time knob values a benchmark sweeps for ``kind``, cheapest first."""
    if kind == "ivf_sq8":
        return [SearchKnob("nprobe", v) for v in (4, 8, 16, 32, 64, 128)]
    if kind == "hnsw":
        return [SearchKnob("efSearch", v) for v in (16, 32, 64, 128, 256)]
    return [SearchKnob("exact", 0)]


class VectorIndex:
    """A FAISS inner-product index keyed by string ids. Thread-safe (one lock)."""

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        if dim <= 0:
            raise ValueError("index dimension must be positive")
        self.dim = dim
        self.config = config or IndexConfig()
        if self.config.ann not in ANN_KINDS:
            raise ValueError(f"unknown approximate index {self.config.ann!r}; use {ANN_KINDS}")
        self._lock = threading.RLock()
        self._ids: dict[str, int] = {}
        self._keys: dict[int, str] = {}
        self._next = 0
        self._tombstones: set[int] = set()
        self._trained_at = 0  # catalog size the approximate index was trained for
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        self._rebuild_thread: threading.Thread | None = None
        self._index = build_faiss_index("flat", np.zeros((0, dim), np.float32))

    @property
    def kind(self) -> str:
        return kind_of(self._index)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, listing_id: object) -> bool:
        return listing_id in self._ids

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    # --- writes -------------------------------------------------------------------------
    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add or replace vectors. The last occurrence of a repeated id wins."""
        x = self._check(vectors)
        if len(ids) != len(x):
            raise InvalidInput(f"{len(ids)} ids for {len(x)} vectors")
        last = {lid: i for i, lid in enumerate(ids)}
        rows = np.fromiter(last.values(), dtype=np.int64, count=len(last))
        with self._lock:
            self._remove_ints([self._ids[lid] for lid in last if lid in self._ids])
            new = np.arange(self._next, self._next + len(last), dtype=np.int64)
            self._next += len(last)
            for lid, n in zip(last, new, strict=True):
                self._ids[lid] = int(n)
                self._keys[int(n)] = lid
            xs = np.ascontiguousarray(x[rows])
            self._index.add_with_ids(xs, new)
            if self._journal is not None:
                self._journal.append(("add", new, xs))
            self._maybe_rebuild()

    def delete(self, ids: Iterable[str]) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were removed."""
        with self._lock:
            ints = [self._ids.pop(lid) for lid in ids if lid in self._ids]
            self._remove_ints(ints)
            self._maybe_rebuild()
            return len(ints)

    def _remove_ints(self, ints: list[int]) -> None:
        if not ints:
            return
        for n in ints:
            self._keys.pop(n, None)
        arr = np.asarray(ints, dtype=np.int64)
        if self.kind == "hnsw":
            self._tombstones.update(ints)
        else:
            self._index.remove_ids(arr)
        if self._journal is not None:
            self._journal.append(("remove", arr, None))

    def _target_kind(self) -> str:
        return self.config.ann if len(self._ids) > self.config.exact_max else "flat"

    def _maybe_rebuild(self) -> None:
        if self._rebuild_thread is not None:
            return
        n, kind, target = len(self._ids), self.kind, self._target_kind()
        due = (
            kind != target and (target != "flat" or n < self.config.exact_max // 2)
        ) or (
            kind == "ivf_sq8" and n > self.config.retrain_growth * max(self._trained_at, 1)
        ) or (
            self._tombstones and len(self._tombstones) > self.config.compact_ratio * max(1, n)
        )
        if not due:
            return
        if self.config.background:
            self._rebuild_thread = threading.Thread(
                target=self._rebuild, name="vitrine-index-rebuild", daemon=True
            )
            self._rebuild_thread.start()
        else:
            self._rebuild()

    def compact(self) -> None:
        """Rebuild now (inline) from the live vectors: right kind for the size, no tombstones."""
        self.wait_for_rebuild()
        self._rebuild()

    def wait_for_rebuild(self, timeout: float | None = None) -> None:
        t = self._rebuild_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def _rebuild(self) -> None:
        """Build the index anew outside the lock, replay concurrent writes, then swap."""
        try:
            with self._lock:
                ints = np.fromiter(self._ids.values(), dtype=np.int64, count=len(self._ids))
                x = self._reconstruct_ints(ints)
                kind = self._target_kind()
                self._journal = []
            fresh = build_faiss_index(kind, x, ints, self.config)
            with self._lock:
                for op, ids, xs in self._journal:
                    if op == "add":
                        fresh.add_with_ids(xs, ids)
                    elif kind == "hnsw":
                        pass  # handled by the tombstone set below
                    else:
                        fresh.remove_ids(ids)
                live = set(self._keys)
                self._tombstones = (
                    {int(n) for n in ints if int(n) not in live} if kind == "hnsw" else set()
                )
                if kind == "hnsw":
                    for op, ids, _ in self._journal:
                        if op == "add":
                            continue
                        self._tombstones.update(int(n) for n in ids)
                self._index = fresh
                self._trained_at = len(ints) if kind == "ivf_sq8" else 0
        finally:
            with self._lock:
                self._journal = None
                self._rebuild_thread = None

    # --- reads --------------------------------------------------------------------------
    def _check(self, vectors: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise IndexMismatch(f"vectors of shape {x.shape} for an index of dimension {self.dim}")
        if not np.isfinite(x).all():
            raise InvalidInput("vectors contain NaN or infinity")
        return x

    def _reconstruct_ints(self, ints: np.ndarray) -> np.ndarray:
        if len(ints) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.vstack([self._index.reconstruct(int(n)) for n in ints]).astype(np.float32)

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids`` (raises KeyError for an unknown id).

        Exact for flat and HNSW; 8-bit quantised (error ~1e-3) for ``ivf_sq8``.
        """
        with self._lock:
            ints = np.asarray([self._ids[lid] for lid in ids], dtype=np.int64)
            return self._reconstruct_ints(ints)

    def search(
        self, queries: np.ndarray, k: int, *, effort: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(id, inner product)`` per query row, best first.

        ``effort`` overrides the approximate index's knob (HNSW efSearch, IVF nprobe).
        """
        q = self._check(queries)
        with self._lock:
            if not self._ids or k <= 0:
                return [[] for _ in range(len(q))]
            kk = min(k, len(self._ids))
            kind = self.kind
            params: faiss.SearchParameters | None = None
            if kind == "hnsw":
                ef = max(effort or self.config.hnsw_ef_search, kk)
                params = faiss.SearchParametersHNSW(efSearch=ef)
                if self._tombstones:
                    ts = np.fromiter(self._tombstones, dtype=np.int64)
                    params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(ts))
            elif kind == "ivf_sq8":
                params = faiss.SearchParametersIVF(nprobe=effort or self.config.nprobe)
            scores, ints = self._index.search(q, kk, params=params)
            keys = self._keys
            return [
                [(keys[int(n)], float(s)) for s, n in zip(srow, nrow, strict=True) if n in keys]
                for srow, nrow in zip(scores, ints, strict=True)
            ]

    # --- persistence --------------------------------------------------------------------
    def state(self) -> dict[str, object]:
        return {"dim": self.dim, "next": self._next, "ids": self._ids,
                "tombstones": sorted(self._tombstones), "kind": self.kind,
                "trained_at": self._trained_at}

    def write(self, directory: Path) -> None:
        with self._lock:
            faiss.write_index(self._index, str(directory / "vectors.faiss"))
            (directory / "ids.json").write_text(json.dumps(self.state()))

    @classmethod
    def read(cls, directory: Path, config: IndexConfig | None = None) -> VectorIndex:
        state = json.loads((directory / "ids.json").read_text())
        self = cls(int(state["dim"]), config)
        self._index = faiss.read_index(str(directory / "vectors.faiss"))
        self._ids = {str(k): int(v) for k, v in state["ids"].items()}
        self._keys = {v: k for k, v in self._ids.items()}
        self._next = int(state["next"])
        self._tombstones = set(state["tombstones"])
        self._trained_at = int(state.get("trained_at", 0))
        return self


def write_snapshot(root: Path, write: object) -> Path:
    """Write a snapshot atomically: a crash at any point leaves the last good one readable.

    ``write(tmpdir)`` fills a fresh folder; the folder is fsynced and renamed to
    ``snap-<n>``, then the ``CURRENT`` pointer file is replaced atomically (``os.replace``),
    and older snapshots are removed only after that.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write(tmp)  # type: ignore[operator]
        for f in tmp.iterdir():
            _fsync(f)
        previous = _current_name(root)
        n = int(previous.split("-")[1]) + 1 if previous else 1
        final = root / f"snap-{n:08d}"
        os.rename(tmp, final)
        _fsync(root)
        pointer = root / f".{CURRENT}.tmp"
        pointer.write_text(final.name)
        _fsync(pointer)
        os.replace(pointer, root / CURRENT)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.glob("snap-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _current_name(root: Path) -> str | None:
    p = root / CURRENT
    return p.read_text().strip() if p.is_file() else None


def current_snapshot(root: Path) -> Path | None:
    """The last complete snapshot folder under ``root``, or None."""
    name = _current_name(Path(root))
    if not name:
        return None
    p = Path(root) / name
    return p if p.is_dir() else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
