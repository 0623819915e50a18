"""The vector index: FAISS with string listing ids, upsert, delete and atomic snapshots.

* Listing ids are strings; FAISS wants int64. Each stored vector gets a fresh int64 from a
  monotonic counter, and ``_ids`` maps listing id -> int64 (``_keys`` the reverse). Upserting
  an id that is already there replaces its vector (old int removed, new one added).
* **Index choice by size.** Up to ``exact_max`` vectors the index is exact
  (``IndexFlatIP``: brute force, 100% recall, fast enough below ~200k on two cores). When an
  upsert crosses the threshold the index is rebuilt as HNSW (``IndexHNSWFlat``, inner
  product) from the stored vectors. HNSW cannot remove vectors, so deletes on it are
  tombstones that searches skip (``IDSelectorNot``), and :meth:`compact` rebuilds without
  them once they pile up.
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

import faiss
import numpy as np

from .errors import IndexMismatch, InvalidInput

CURRENT = "CURRENT"


@dataclass(frozen=True)
class IndexConfig:
    exact_max: int = 200_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    compact_ratio: float = 0.2  # rebuild an HNSW index when tombstones exceed this share


class VectorIndex:
    """A FAISS inner-product index keyed by string ids. Thread-safe (one lock)."""

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        if dim <= 0:
            raise ValueError("index dimension must be positive")
        self.dim = dim
        self.config = config or IndexConfig()
        self._lock = threading.RLock()
        self._ids: dict[str, int] = {}
        self._keys: dict[int, str] = {}
        self._next = 0
        self._tombstones: set[int] = set()
        self._index = self._new_flat()

    # --- construction -------------------------------------------------------------------
    def _new_flat(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_hnsw(self) -> faiss.Index:
        hnsw = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.config.hnsw_ef_construction
        hnsw.hnsw.efSearch = self.config.hnsw_ef_search
        return faiss.IndexIDMap2(hnsw)

    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(self._inner, faiss.IndexHNSW) else "flat"

    @property
    def _inner(self) -> faiss.Index:
        return faiss.downcast_index(self._index.index)

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
            self._index.add_with_ids(np.ascontiguousarray(x[rows]), new)
            if self.kind == "flat" and len(self._ids) > self.config.exact_max:
                self._rebuild(hnsw=True)

    def delete(self, ids: Iterable[str]) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were removed."""
        with self._lock:
            ints = [self._ids.pop(lid) for lid in ids if lid in self._ids]
            for n in ints:
                self._keys.pop(n, None)
            self._remove_ints(ints)
            if self._tombstones and len(self._tombstones) > self.config.compact_ratio * max(
                1, len(self._ids)
            ):
                self.compact()
            return len(ints)

    def _remove_ints(self, ints: list[int]) -> None:
        if not ints:
            return
        for n in ints:
            self._keys.pop(n, None)
        if self.kind == "flat":
            self._index.remove_ids(np.asarray(ints, dtype=np.int64))
        else:
            self._tombstones.update(ints)

    def compact(self) -> None:
        """Rebuild the index from the live vectors (drops HNSW tombstones)."""
        with self._lock:
            self._rebuild(hnsw=len(self._ids) > self.config.exact_max)

    def _rebuild(self, *, hnsw: bool) -> None:
        ints = np.fromiter(self._ids.values(), dtype=np.int64, count=len(self._ids))
        x = self._reconstruct_ints(ints)
        self._index = self._new_hnsw() if hnsw else self._new_flat()
        self._tombstones.clear()
        if len(ints):
            self._index.add_with_ids(x, ints)

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
        """The stored vectors of ``ids`` (raises KeyError for an unknown id)."""
        with self._lock:
            ints = np.asarray([self._ids[lid] for lid in ids], dtype=np.int64)
            return self._reconstruct_ints(ints)

    def search(
        self, queries: np.ndarray, k: int, *, ef_search: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(id, inner product)`` per query row, best first."""
        q = self._check(queries)
        with self._lock:
            if not self._ids or k <= 0:
                return [[] for _ in range(len(q))]
            kk = min(k, len(self._ids))
            params = None
            if self.kind == "hnsw":
                ef = max(ef_search or self.config.hnsw_ef_search, kk)
                params = faiss.SearchParametersHNSW(efSearch=ef)
                if self._tombstones:
                    ts = np.fromiter(self._tombstones, dtype=np.int64)
                    params.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(ts))
            scores, ints = self._index.search(q, kk, params=params)
            keys = self._keys
            return [
                [(keys[int(n)], float(s)) for s, n in zip(srow, nrow, strict=True) if n in keys]
                for srow, nrow in zip(scores, ints, strict=True)
            ]

    # --- persistence --------------------------------------------------------------------
    def state(self) -> dict[str, object]:
        return {"dim": self.dim, "next": self._next, "ids": self._ids,
                "tombstones": sorted(self._tombstones), "kind": self.kind}

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
        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.config.hnsw_ef_search
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
