"""The vector index: multi-version storage with one writer, lock-free readers, atomic snapshots.

* **Slots.** Every stored vector gets a global int64 *slot* from a counter that never goes
  back, so a slot is never reused: re-upserting a listing gives it a new slot and marks the
  old one dead. Slots are the FAISS ids, and index the per-slot arrays (listing id,
  ``labelled``, category code, the listing's JSON ``payload``).
* **Base + delta.** Vectors live either in the immutable FAISS *base* (built with
  ``faiss.index_factory``, slots below ``delta_start``) or in the append-only float32 *delta*
  (slots ``delta_start..``, row ``slot - delta_start``), which is searched exactly. When the
  delta has grown past ``max(merge_min, merge_ratio * base)`` (or the catalog crossed
  ``exact_max``, or an IVF outgrew its training ``retrain_growth`` times, or a
  ``compact_ratio`` share of the base is dead) the vectors alive at that moment are *merged*
  into a new base, in a background thread by default. When it is done the writer swaps the new
  base in and keeps only the delta rows past the merge point; a slot deleted meanwhile is
  still dead, because ``alive`` is one global mask by slot.
* **Index choice by size.** Up to ``exact_max`` listings the base is exact (``IDMap2,Flat``,
  100% recall); past it the approximate kind ``ann`` (see ``vitrine bench search``):
  ``ivf_sq8`` (``IVF{nlist},SQ8``, ``nlist ~ 4 sqrt(n)``, d + 8 bytes a vector, trained again
  only when the catalog grew ``retrain_growth`` times) or ``hnsw`` (``IDMap2,HNSW{m}``: fastest,
  4x the memory, rebuilt at each merge since HNSW cannot drop a vector).
* **Versions.** Each write publishes a new frozen :class:`IndexView` by swapping one
  reference. A reader takes one view and answers a whole request from it: no lock on the read
  path, and a write or a merge during the request cannot change what it sees. The per-slot
  arrays are shared append-only (a view reads only slots below its ``n_slots``, which the
  writer no longer changes); the ``alive`` mask is copied at each publish, O(slots) bytes,
  which is what lets a view stay fixed while later writes kill slots. The id maps are the
  map at the last merge plus a per-publish copy of the changes since (O(changes)).
* **Filtered search** (``labelled_only``, ``category``) goes through an
  ``IDSelectorBitmap`` of the view's alive-and-matching slots, so its cost does not depend on
  how many listings the filter rejects: no search-again-with-a-larger-k loop.
* Inner product over the fused vectors (see :mod:`indexer.fusion`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from .errors import IndexMismatch, InvalidInput

# faiss's bundled stubs describe the SWIG C++ signatures (remove_ids(IDSelector), ...), not
# the numpy-friendly methods its Python layer installs, so it is typed as Any here.
faiss: Any = _faiss
log = logging.getLogger(__name__)
CURRENT = "CURRENT"
Payload = dict[str, Any]
Hit = tuple[str, float, Payload]


_faiss_threads: int | None = None  # what configure_faiss asked for; None: OpenMP's default
_thread_state = threading.local()


def configure_faiss(threads: int) -> None:
    """FAISS's OpenMP threads for the searches of this process, from now on, in every thread.

    OpenMP's thread count is a per-thread setting: ``omp_set_num_threads`` in one thread
    leaves every other thread (an API's query pool, a Celery worker's task thread) at the
    default, one per core. Searches therefore apply the configured count in the thread they
    run on (:func:`_apply_faiss_threads`). Measured in `vitrine bench service` before this:
    two worker processes searching with two OpenMP threads each on two cores spent 55 % of
    a round in FAISS searches (spinning threads), and `POST /search` by listing id took
    8 ms at p50 over HTTP against 0.3 ms for the same search in-process.
    """
    global _faiss_threads
    _faiss_threads = max(1, threads)
    _apply_faiss_threads()
    # (a process that never calls this, such as `vitrine index`, keeps OpenMP's default
    # everywhere: bulk builds use every core)


def _apply_faiss_threads() -> None:
    want = _faiss_threads
    if want is not None and getattr(_thread_state, "faiss", None) != want:
        faiss.omp_set_num_threads(want)
        _thread_state.faiss = want


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
    compact_ratio: float = 0.2  # merge when this share of the base's vectors is dead
    retrain_growth: float = 4.0  # retrain IVF when the catalog grew this much since training
    merge_min: int = 10_000  # merge the delta once it holds max(merge_min, merge_ratio * base)
    merge_ratio: float = 0.1
    # a filter matching at most this many base vectors of an approximate base is answered by
    # exact search over them: cheap, and a graph or list walk would find few of them
    filter_exact_max: int = 2048
    max_effort: int = 1024  # cap on efSearch/nprobe when they are raised for a filter
    background: bool = True  # merge in a thread (False: inline, e.g. in batch jobs)


def ivf_nlist(n: int) -> int:
    """Number of IVF lists: ~4 sqrt(n), a power of two, at least 16."""
    return int(max(16, 2 ** round(np.log2(4 * np.sqrt(max(n, 1))))))


def factory_string(kind: str, n: int, config: IndexConfig | None = None) -> str:
    """The ``faiss.index_factory`` description of a ``kind`` index over ``n`` vectors."""
    cfg = config or IndexConfig()
    if kind == "flat":
        return "IDMap2,Flat"
    if kind == "hnsw":
        return f"IDMap2,HNSW{cfg.hnsw_m}"
    if kind == "ivf_sq8":
        # k-means needs at least as many points as lists
        return f"IVF{min(ivf_nlist(n), max(1, n))},SQ8"
    raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")


def index_parameters(kind: str, config: IndexConfig | None = None) -> str:
    """The ``faiss.ParameterSpace`` settings a ``kind`` index gets when built ("" for none)."""
    cfg = config or IndexConfig()
    if kind == "hnsw":
        return f"efConstruction={cfg.hnsw_ef_construction},efSearch={cfg.hnsw_ef_search}"
    if kind == "ivf_sq8":
        return f"nprobe={cfg.nprobe}"
    return ""


def _empty_index(kind: str, x: np.ndarray, config: IndexConfig) -> tuple[Any, str]:
    """An empty, trained ``kind`` index for vectors like ``x``, and its factory string."""
    n, d = x.shape
    desc = factory_string(kind, n, config)
    index = faiss.index_factory(d, desc, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivf_sq8":
        ivf = faiss.extract_index_ivf(index)
        # faiss wants >= 39 points per centroid; more only slows training
        rng = np.random.default_rng(0)
        cap = 40 * ivf.nlist
        sample = x if n <= cap else x[np.sort(rng.choice(n, cap, replace=False))]
        index.train(np.ascontiguousarray(sample))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct by id
    params = index_parameters(kind, config)
    if params:  # before any add: efConstruction shapes the graph
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index, desc


def build_faiss_index(
    kind: str,
    x: np.ndarray,
    ids: np.ndarray | None = None,
    config: IndexConfig | None = None,
) -> Any:
    """A filled inner-product index of ``kind`` over ``x`` (ids default to row numbers).

    Every kind answers ``add_with_ids``, ``search`` and ``reconstruct_batch`` on external ids.
    """
    index, _ = _empty_index(kind, x, config or IndexConfig())
    if len(x):
        ids = np.arange(len(x), dtype=np.int64) if ids is None else ids
        index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
    return index


def kind_of(index: Any) -> str:
    if isinstance(index, faiss.IndexIVF):
        return "ivf_sq8"
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"


def index_bytes(index: Any) -> int:
    """Serialized size: what the vectors, codes, ids and graph take in memory."""
    return int(faiss.serialize_index(index).nbytes)


@dataclass(frozen=True)
class SearchKnob:
    name: str  # a faiss.ParameterSpace parameter (nprobe, efSearch); "exact": none
    value: int

    def apply(self, index: Any) -> None:
        if self.name != "exact":
            faiss.ParameterSpace().set_index_parameter(index, self.name, self.value)


def tune_ann(kind: str) -> list[SearchKnob]:
    """The search-time knob values a benchmark sweeps for ``kind``, cheapest first."""
    if kind == "ivf_sq8":
        return [SearchKnob("nprobe", v) for v in (4, 8, 16, 32, 64, 128)]
    if kind == "hnsw":
        return [SearchKnob("efSearch", v) for v in (16, 32, 64, 128, 256)]
    return [SearchKnob("exact", 0)]


def _check(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise IndexMismatch(f"vectors of shape {x.shape} for an index of dimension {dim}")
    if not np.isfinite(x).all():
        raise InvalidInput("vectors contain NaN or infinity")
    return x


def _top(scores: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best ``(scores, slots)``, best first; ``slots`` is per column."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        cols = part
    else:
        cols = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.argsort(-scores, axis=1, kind="stable")
    return (np.take_along_axis(scores, order, axis=1),
            slots[np.take_along_axis(cols, order, axis=1)])


@dataclass(frozen=True)
class _Match:
    """The slots of a view a search may return: alive and passing its filters."""

    mask: np.ndarray  # bool per slot of the view
    base: int  # how many of them are in the base
    delta_rows: np.ndarray  # delta rows of the others
    bits: np.ndarray | None  # packed base part, for IDSelectorBitmap; None: all of the base


@dataclass(frozen=True, eq=False, repr=False)
class IndexView:
    """One published version of the index: never changes, safe to share between threads.

    Take it once per request (:meth:`VectorIndex.view`) and use only it.
    """

    dim: int
    version: int
    config: IndexConfig
    base: Any  # the FAISS index of the slots below delta_start
    factory: str
    kind: str
    trained_at: int  # catalog size the IVF base was trained for (0: not IVF)
    delta: np.ndarray  # rows [0, n_slots - delta_start) are this view's delta
    delta_start: int
    n_slots: int
    alive: np.ndarray  # this view's own copy, one bool per slot
    labelled: np.ndarray  # shared, append-only: read [:n_slots] only
    category: np.ndarray  # int32 code, -1: none; shared like labelled
    slot_ids: list[str | None]  # shared like labelled
    payloads: list[Payload | None]  # shared like labelled
    slot_of: Mapping[str, int]  # listing id -> slot at the last merge
    changed: Mapping[str, int]  # since then; -1: deleted
    categories: Mapping[str, int]  # category -> code
    n_live: int
    _matches: dict[bool, _Match] = field(default_factory=dict, init=False, repr=False)

    def __repr__(self) -> str:
        return (f"IndexView(version={self.version}, kind={self.kind!r}, live={self.n_live}, "
                f"slots={self.n_slots}, delta_start={self.delta_start})")

    def __len__(self) -> int:
        return self.n_live

    def __contains__(self, listing_id: object) -> bool:
        return isinstance(listing_id, str) and self._slot(listing_id) is not None

    def _slot(self, listing_id: str) -> int | None:
        s = self.changed.get(listing_id)
        if s is None:
            s = self.slot_of.get(listing_id)
        return s if s is not None and s >= 0 else None

    def ids(self) -> list[str]:
        """The live listing ids, oldest write first."""
        return [self.slot_ids[s] for s in np.flatnonzero(self.alive).tolist()]  # type: ignore[misc]

    def payload(self, listing_id: str) -> Payload:
        """A copy of the listing's payload (raises KeyError for an unknown id)."""
        s = self._slot(listing_id)
        if s is None:
            raise KeyError(listing_id)
        return dict(self.payloads[s] or {})

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids`` (raises KeyError for an unknown id).

        Exact for the delta, flat and HNSW; 8-bit quantised (error ~1e-3) for ``ivf_sq8``.
        """
        slots = np.empty(len(ids), dtype=np.int64)
        for i, lid in enumerate(ids):
            s = self._slot(lid)
            if s is None:
                raise KeyError(lid)
            slots[i] = s
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        in_delta = slots >= self.delta_start
        out[in_delta] = self.delta[slots[in_delta] - self.delta_start]
        if not in_delta.all():
            out[~in_delta] = self.base.reconstruct_batch(slots[~in_delta])
        return out

    # --- search -------------------------------------------------------------------------
    def _match(self, category: str | None, labelled_only: bool) -> _Match | None:
        """None when the filter matches nothing (an unknown category)."""
        if category is None and labelled_only in self._matches:
            return self._matches[labelled_only]  # racing threads store the same value
        n = self.n_slots
        mask = self.alive
        if labelled_only:
            mask = mask & self.labelled[:n]
        if category is not None:
            code = self.categories.get(category)
            if code is None:
                return None
            mask = mask & (self.category[:n] == code)
        base_mask = mask[: self.delta_start]
        in_base = int(np.count_nonzero(base_mask))
        bits = None
        if in_base < self.base.ntotal:
            bits = np.packbits(base_mask, bitorder="little")
        m = _Match(mask, in_base, np.flatnonzero(mask[self.delta_start :]), bits)
        if category is None:  # per-category masks are not kept: one n-byte mask each
            self._matches[labelled_only] = m
        return m

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        effort: int | None = None,
        category: str | None = None,
        labelled_only: bool = False,
    ) -> list[list[Hit]]:
        """Top-``k`` ``(id, inner product, payload)`` per query row, best first.

        ``category`` / ``labelled_only`` restrict to the listings with that category / a label
        that votes. ``effort`` overrides the approximate base's knob (HNSW efSearch, IVF
        nprobe); a selective filter raises it (up to ``max_effort``), and a filter matching
        at most ``filter_exact_max`` base vectors is answered exactly.
        """
        q = _check(queries, self.dim)
        out: list[list[Hit]] = [[] for _ in range(len(q))]
        match = self._match(category, labelled_only) if k > 0 else None
        if match is None:
            return out
        total = match.base + len(match.delta_rows)
        if total == 0:
            return out
        kk = min(k, total)
        scores: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        rows = match.delta_rows
        if len(rows):
            nd = self.n_slots - self.delta_start
            x = self.delta[:nd] if len(rows) == nd else self.delta[rows]
            s, cols = _top(q @ x.T, rows, min(kk, len(rows)))
            scores.append(s)
            slots.append(cols + self.delta_start)
        if match.base:
            s, ids = self._search_base(q, min(kk, match.base), match, effort)
            scores.append(np.where(ids >= 0, s, -np.inf))
            slots.append(ids)
        all_scores = np.concatenate(scores, axis=1)
        all_slots = np.concatenate(slots, axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :kk]
        for r in range(len(q)):
            for c in order[r]:
                sc = float(all_scores[r, c])
                if sc == -np.inf:
                    continue
                slot = int(all_slots[r, c])
                lid = self.slot_ids[slot]
                assert lid is not None  # a matched slot is alive in this view
                out[r].append((lid, sc, dict(self.payloads[slot] or {})))
        return out

    def _search_base(
        self, q: np.ndarray, k: int, match: _Match, effort: int | None
    ) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        ntotal = self.base.ntotal
        if match.bits is not None and self.kind != "flat" and match.base <= cfg.filter_exact_max:
            slots = np.flatnonzero(match.mask[: self.delta_start]).astype(np.int64)
            s, ids = _top(q @ self.base.reconstruct_batch(slots).T, slots, k)
            return s, ids
        _apply_faiss_threads()
        sel = None
        if match.bits is not None:
            sel = faiss.IDSelectorBitmap(len(match.bits), faiss.swig_ptr(match.bits))
        # a filter passing a share p of the base leaves ~p of the lists/graph nodes visited
        # usable, so the effort grows by 1/p, within a fixed cap: bounded work per query
        boost = ntotal / max(match.base, 1)
        # every knob of this search in its own params object: the shared base is never set
        if self.kind == "hnsw":
            ef = max(effort or cfg.hnsw_ef_search, k)
            ef = max(ef, min(math.ceil(ef * boost), cfg.max_effort))
            params = faiss.SearchParametersHNSW(efSearch=ef, sel=sel)
        elif self.kind == "ivf_sq8":
            nprobe = effort or cfg.nprobe
            nprobe = max(nprobe, min(math.ceil(nprobe * boost), cfg.max_effort))
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.base.nlist), sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, ids = self.base.search(q, k, params=params)
        return scores, ids

    # --- persistence --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "dim": self.dim, "version": self.version, "factory": self.factory,
            "kind": self.kind, "trained_at": self.trained_at, "slots": self.n_slots,
            "delta_start": self.delta_start, "live": self.n_live,
            "categories": sorted(self.categories, key=self.categories.__getitem__),
        }

    def write(self, directory: Path) -> None:
        """Base (``base.faiss``), delta and per-slot arrays (``.npy``), ids/payloads (JSON)."""
        n = self.n_slots
        faiss.write_index(self.base, str(directory / "base.faiss"))
        np.save(directory / "delta.npy", self.delta[: n - self.delta_start])
        np.save(directory / "alive.npy", self.alive)
        np.save(directory / "labelled.npy", self.labelled[:n])
        np.save(directory / "category.npy", self.category[:n])
        # dead slots' ids and payloads are no use to a fresh process (no older view exists)
        live = self.alive.tolist()
        slots = {
            "ids": [self.slot_ids[s] if live[s] else None for s in range(n)],
            "payloads": [self.payloads[s] if live[s] else None for s in range(n)],
        }
        (directory / "slots.json").write_text(json.dumps(slots))
        (directory / "index.json").write_text(json.dumps(self.state()))


@dataclass(frozen=True)
class _Merged:
    base: Any
    factory: str
    kind: str
    trained_at: int
    point: int  # the new delta_start: slots below it are in ``base`` or dead
    slots: np.ndarray  # the slots in ``base``
    template: np.ndarray | None  # the trained empty IVF that later merges copy instead of training


def _grow(a: np.ndarray, need: int, fill: Any = 0) -> np.ndarray:
    """``a`` itself when it has ``need`` rows, else a copy with room to spare.

    A copy, never a resize in place: views published earlier keep reading the old array.
    """
    if len(a) >= need:
        return a
    out = np.full((max(need, 2 * len(a), 1024), *a.shape[1:]), fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


class VectorIndex:
    """String-keyed inner-product vectors: one writer at a time, any number of readers.

    Writers (:meth:`apply`, :meth:`upsert`, :meth:`delete`, :meth:`compact` and the install
    step of a merge) serialize on a writer-only mutex; readers never take a lock: they read
    :meth:`view` (one attribute) and search that frozen version.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        if dim <= 0:
            raise ValueError("index dimension must be positive")
        self.dim = dim
        self.config = config or IndexConfig()
        if self.config.ann not in ANN_KINDS:
            raise ValueError(f"unknown approximate index {self.config.ann!r}; use {ANN_KINDS}")
        self._write_lock = threading.RLock()
        self._base, self._factory = _empty_index("flat", np.zeros((0, dim), np.float32),
                                                 self.config)
        self._kind = "flat"
        self._trained_at = 0
        self._ivf_template: np.ndarray | None = None  # the trained empty IVF, reused until retrain
        self._delta = np.zeros((0, dim), np.float32)
        self._delta_start = 0
        self._n_slots = 0
        self._alive = np.zeros(0, bool)
        self._labelled = np.zeros(0, bool)
        self._category = np.zeros(0, np.int32)
        self._slot_ids: list[str | None] = []
        self._payloads: list[Payload | None] = []
        self._slot_of: dict[str, int] = {}  # the live map, writer-only
        self._merged_map: dict[str, int] = {}  # shared by views: never changed once published
        self._changed: dict[str, int] = {}
        self._categories: dict[str, int] = {}  # copied on change: views keep theirs
        self._n_live = 0
        self._base_dead = 0
        self._version = 0
        # published views still referenced (oldest first) and the slots each write killed:
        # a dead slot's id and payload are dropped once no live view sees it alive
        self._views: deque[tuple[int, weakref.ref[IndexView]]] = deque()
        self._graveyard: deque[tuple[int, list[int]]] = deque()
        self._merge_thread: threading.Thread | None = None
        self._view = self._publish([])

    # --- reads (each on the current view) -------------------------------------------------
    def view(self) -> IndexView:
        """The current version. Hold on to it for the whole request."""
        return self._view

    @property
    def kind(self) -> str:
        return self._view.kind

    def __len__(self) -> int:
        return len(self._view)

    def __contains__(self, listing_id: object) -> bool:
        return listing_id in self._view

    def ids(self) -> list[str]:
        return self._view.ids()

    def get(self, ids: Sequence[str]) -> np.ndarray:
        return self._view.get(ids)

    def payload(self, listing_id: str) -> Payload:
        return self._view.payload(listing_id)

    def search(self, queries: np.ndarray, k: int, **kw: Any) -> list[list[Hit]]:
        return self._view.search(queries, k, **kw)

    def state(self) -> dict[str, Any]:
        return self._view.state()

    # --- writes ---------------------------------------------------------------------------
    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
        *,
        labelled: Sequence[bool] | bool = False,
        categories: Sequence[str | None] | None = None,
    ) -> None:
        """Add or replace vectors. The last occurrence of a repeated id wins."""
        self.apply(ids, vectors, payloads, labelled=labelled, categories=categories)

    def delete(self, ids: Iterable[str]) -> int:
        """Remove ids; unknown ids are ignored. Returns how many were removed."""
        return self.apply([], np.zeros((0, self.dim), np.float32), deletes=list(ids))

    def apply(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
        *,
        labelled: Sequence[bool] | bool = False,
        categories: Sequence[str | None] | None = None,
        deletes: Sequence[str] = (),
    ) -> int:
        """Upsert ``ids`` and delete ``deletes`` as one version (one publish).

        ``payloads`` are JSON-able dicts (copied). An id may not be both upserted and
        deleted. Returns how many of ``deletes`` were there.
        """
        return self._apply(ids, vectors, payloads, labelled, categories, deletes, merge=True)

    @classmethod
    def bulk(
        cls,
        dim: int,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
        *,
        labelled: Sequence[bool] | bool = False,
        categories: Sequence[str | None] | None = None,
        config: IndexConfig | None = None,
    ) -> VectorIndex:
        """A new index with these vectors in a base built now, inline (a catalog build): the
        kind fits the size from the start and no merge is left to do."""
        self = cls(dim, config)
        self._apply(ids, vectors, payloads, labelled, categories, (), merge=False)
        if len(self._view):
            with self._write_lock:
                self._install(self._build_merged(self._view))
        return self

    def _apply(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None,
        labelled: Sequence[bool] | bool,
        categories: Sequence[str | None] | None,
        deletes: Sequence[str],
        *,
        merge: bool,
    ) -> int:
        x = _check(vectors, self.dim)
        ids = list(ids)
        if len(ids) != len(x):
            raise InvalidInput(f"{len(ids)} ids for {len(x)} vectors")
        pl = [dict(p) for p in payloads] if payloads is not None else [{} for _ in ids]
        lab = [bool(labelled)] * len(ids) if isinstance(labelled, bool) else list(labelled)
        cats = list(categories) if categories is not None else [None] * len(ids)
        if not len(pl) == len(lab) == len(cats) == len(ids):
            raise InvalidInput("ids, payloads, labelled and categories differ in length")
        if set(ids) & set(deletes):
            raise InvalidInput("an id is both upserted and deleted in one write")
        last = {lid: i for i, lid in enumerate(ids)}
        rows = list(last.values())
        with self._write_lock:
            died: list[int] = []
            deleted = 0
            for lid in deletes:
                s = self._slot_of.pop(lid, None)
                if s is not None:
                    self._kill(s)
                    died.append(s)
                    self._changed[lid] = -1
                    deleted += 1
            if rows:
                self._append(list(last), x[rows], [pl[i] for i in rows],
                             [lab[i] for i in rows], [cats[i] for i in rows], died)
            self._view = self._publish(died)
            if merge:
                self._maybe_merge()
            return deleted

    def _kill(self, slot: int) -> None:
        self._alive[slot] = False
        self._n_live -= 1
        if slot < self._delta_start:
            self._base_dead += 1

    def _append(self, ids: list[str], x: np.ndarray, payloads: list[Payload],
                labelled: list[bool], categories: list[str | None], died: list[int]) -> None:
        m, start = len(ids), self._n_slots
        end = start + m
        codes = np.empty(m, np.int32)
        for i, c in enumerate(categories):
            if c is None:
                codes[i] = -1
                continue
            if c not in self._categories:
                self._categories = {**self._categories, c: len(self._categories)}
            codes[i] = self._categories[c]
        self._alive = _grow(self._alive, end, False)
        self._labelled = _grow(self._labelled, end, False)
        self._category = _grow(self._category, end, -1)
        self._delta = _grow(self._delta, end - self._delta_start)
        # beyond every published view's n_slots: no reader looks at these rows yet
        self._delta[start - self._delta_start : end - self._delta_start] = x
        self._labelled[start:end] = labelled
        self._category[start:end] = codes
        self._slot_ids.extend(ids)
        self._payloads.extend(payloads)
        for slot, lid in enumerate(ids, start):
            old = self._slot_of.get(lid)
            if old is not None:
                self._kill(old)
                died.append(old)
            self._slot_of[lid] = slot
            self._changed[lid] = slot
        self._alive[start:end] = True
        self._n_live += m
        self._n_slots = end

    def _publish(self, died: list[int]) -> IndexView:
        self._version += 1
        n = self._n_slots
        view = IndexView(
            dim=self.dim, version=self._version, config=self.config, base=self._base,
            factory=self._factory, kind=self._kind, trained_at=self._trained_at,
            delta=self._delta, delta_start=self._delta_start, n_slots=n,
            alive=self._alive[:n].copy(), labelled=self._labelled, category=self._category,
            slot_ids=self._slot_ids, payloads=self._payloads, slot_of=self._merged_map,
            changed=dict(self._changed), categories=self._categories, n_live=self._n_live,
        )
        self._views.append((self._version, weakref.ref(view)))
        if died:
            self._graveyard.append((self._version, died))
        self._reclaim()
        return view

    def _reclaim(self) -> None:
        while self._views and self._views[0][1]() is None:
            self._views.popleft()
        oldest = self._views[0][0] if self._views else self._version
        while self._graveyard and self._graveyard[0][0] <= oldest:
            for s in self._graveyard.popleft()[1]:
                self._slot_ids[s] = None
                self._payloads[s] = None

    # --- merging ------------------------------------------------------------------------
    def _target_kind(self, n: int, current: str) -> str:
        cfg = self.config
        if n > cfg.exact_max:
            return cfg.ann
        # back to exact only well below the threshold: no flip-flopping around it
        return "flat" if current == "flat" or n < cfg.exact_max // 2 else current

    def _merge_due(self) -> bool:
        cfg = self.config
        base_n = self._base.ntotal
        n = self._n_live
        return (
            self._n_slots - self._delta_start >= max(cfg.merge_min, cfg.merge_ratio * base_n)
            or self._target_kind(n, self._kind) != self._kind
            or (self._kind == "ivf_sq8" and n > cfg.retrain_growth * max(self._trained_at, 1))
            or self._base_dead > cfg.compact_ratio * max(1, base_n)
        )

    def _maybe_merge(self) -> None:
        if self._merge_thread is not None or not self._merge_due():
            return
        view = self._view
        if not self.config.background:
            self._install(self._build_merged(view))
            return
        self._merge_thread = threading.Thread(
            target=self._merge_in_background, args=(view,), name="vitrine-index-merge",
            daemon=True,
        )
        self._merge_thread.start()

    def _merge_in_background(self, view: IndexView) -> None:
        # a merge (train, add) runs beside the searches of a live process: with the same
        # OpenMP thread count as they, not one spinning thread per core
        _apply_faiss_threads()
        merged = None
        try:
            merged = self._build_merged(view)
        except Exception:
            # the delta keeps serving every write; the next write tries again
            log.exception("index merge failed")
        with self._write_lock:
            self._merge_thread = None
            if merged is not None:
                self._install(merged)

    def _build_merged(self, view: IndexView) -> _Merged:
        """A new base over the slots alive in ``view``. Reads only ``view``: no lock."""
        slots = np.flatnonzero(view.alive).astype(np.int64)
        in_base = slots < view.delta_start
        x = np.empty((len(slots), self.dim), np.float32)
        if in_base.any():
            x[in_base] = view.base.reconstruct_batch(slots[in_base])
        x[~in_base] = view.delta[slots[~in_base] - view.delta_start]
        n = len(slots)
        kind = self._target_kind(n, view.kind)
        template, trained_at = self._ivf_template, view.trained_at
        retrain = kind == "ivf_sq8" and (
            template is None or view.kind != "ivf_sq8"
            or n > self.config.retrain_growth * max(trained_at, 1)
        )
        if kind == "ivf_sq8" and not retrain:
            assert template is not None
            index = faiss.deserialize_index(template)
            factory = view.factory
        else:
            index, factory = _empty_index(kind, x, self.config)
            if kind == "ivf_sq8":
                template, trained_at = faiss.serialize_index(index), n
        if n:
            index.add_with_ids(x, slots)
        if kind != "ivf_sq8":
            template, trained_at = None, 0
        return _Merged(index, factory, kind, trained_at, view.n_slots, slots, template)

    def _install(self, merged: _Merged) -> None:
        """Swap in a merged base (writer, under the lock)."""
        point = merged.point
        if point < self._delta_start:
            return  # built from a base that compact() has replaced since: drop it
        keep = self._n_slots - point
        delta = np.zeros((max(2 * keep, 1024), self.dim), np.float32)
        delta[:keep] = self._delta[point - self._delta_start : self._n_slots - self._delta_start]
        self._delta, self._delta_start = delta, point
        self._base, self._factory, self._kind = merged.base, merged.factory, merged.kind
        self._ivf_template, self._trained_at = merged.template, merged.trained_at
        # slots deleted while the merge ran are in the new base but dead
        self._base_dead = int(np.count_nonzero(~self._alive[merged.slots]))
        self._merged_map = dict(self._slot_of)
        self._changed = {}
        self._view = self._publish([])
        self._maybe_merge()

    def compact(self) -> None:
        """Merge everything into a fresh base now, inline (e.g. after a bulk load)."""
        self.wait_for_merge()
        with self._write_lock:
            self._install(self._build_merged(self._view))

    def wait_for_merge(self, timeout: float | None = None) -> None:
        """Wait until no merge runs (one may start another when it ends: waits for those)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            t = self._merge_thread
            if t is None or t is threading.current_thread():
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if t.ident is None:
                # published by _maybe_merge an instant before its start(): joining it now
                # would raise; it starts in a moment
                time.sleep(0.001)
                continue
            t.join(left)

    # --- persistence --------------------------------------------------------------------
    def write(self, directory: Path) -> None:
        self._view.write(directory)

    @classmethod
    def read(cls, directory: Path, config: IndexConfig | None = None) -> VectorIndex:
        state = json.loads((directory / "index.json").read_text())
        self = cls(int(state["dim"]), config)
        slots = json.loads((directory / "slots.json").read_text())
        with self._write_lock:
            self._base = faiss.read_index(str(directory / "base.faiss"))
            self._factory, self._kind = str(state["factory"]), str(state["kind"])
            self._trained_at = int(state["trained_at"])
            n = self._n_slots = int(state["slots"])
            self._delta_start = int(state["delta_start"])
            self._delta = _grow(np.load(directory / "delta.npy"), n - self._delta_start)
            self._alive = np.load(directory / "alive.npy")
            self._labelled = np.load(directory / "labelled.npy")
            self._category = np.load(directory / "category.npy").astype(np.int32)
            self._slot_ids = list(slots["ids"])
            self._payloads = list(slots["payloads"])
            live = np.flatnonzero(self._alive).tolist()
            self._slot_of = {self._slot_ids[s]: s for s in live}  # type: ignore[misc]
            self._merged_map = dict(self._slot_of)
            self._categories = {c: i for i, c in enumerate(state["categories"])}
            self._n_live = len(live)
            self._base_dead = self._base.ntotal - int(
                np.count_nonzero(self._alive[: self._delta_start]))
            if not (len(self._alive) == len(self._labelled) == len(self._slot_ids) == n):
                raise IndexMismatch(f"index files in {directory} disagree on the slot count")
            if len(self._category) != n or (n and not (
                    -1 <= int(self._category.min())
                    and int(self._category.max()) < len(self._categories))):
                raise IndexMismatch(f"category.npy in {directory} does not fit its categories")
            self._view = self._publish([])
            self._maybe_merge()
        return self


# --- snapshots ---------------------------------------------------------------------------
def write_snapshot(root: Path, write: Callable[[Path], None],
                   supersedes: Callable[[Path | None], bool] | None = None) -> Path | None:
    """Write a snapshot atomically: a crash at any point leaves the last good one readable.

    ``write(tmpdir)`` fills a fresh ``.tmp-*`` folder; its files and the folder are fsynced,
    it is renamed to a name no other snapshot had (``snap-<time_ns>-<random>``), and only
    then is the ``CURRENT`` pointer replaced atomically (``os.replace`` of an fsynced file).
    Since no name is ever reused, a leftover from a crash can never be in the way of the
    next write.

    Publishing (the check, the rename, the pointer and the clean-up) runs under an ``flock``
    of ``root/.publish.lock``, so that two writers (say, one whose lease expired while it
    wrote) cannot interleave: ``supersedes(current)`` is asked, under that lock, whether the
    new snapshot may replace the published one (None: always); if not, nothing is published
    and None is returned. The clean-up removes only what ``CURRENT`` does not name.
    """
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write(tmp)
        for f in sorted(tmp.rglob("*")):
            _fsync(f)
        _fsync(tmp)
        with (root / ".publish.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if supersedes is not None and not supersedes(current_snapshot(root)):
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            final = root / f"snap-{time.time_ns()}-{secrets.token_hex(4)}"
            os.rename(tmp, final)
            _fsync(root)
            pointer = root / f".{CURRENT}-{secrets.token_hex(4)}.tmp"
            pointer.write_text(final.name)
            _fsync(pointer)
            os.replace(pointer, root / CURRENT)
            _fsync(root)
            for old in sorted(root.iterdir()):
                if old.name in (final.name, CURRENT, ".publish.lock"):
                    continue
                if old.name.startswith("snap-"):
                    shutil.rmtree(old, ignore_errors=True)
                elif old.name.startswith(".tmp-") and _older_than(old, 3600):
                    # another writer may be filling its own .tmp- folder right now: only
                    # what a killed writer left behind long ago goes
                    shutil.rmtree(old, ignore_errors=True)
                elif old.name.startswith(f".{CURRENT}"):
                    old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


def current_snapshot(root: Path) -> Path | None:
    """The last complete snapshot folder under ``root``, or None. Reads ``CURRENT`` once."""
    p = Path(root) / CURRENT
    try:
        name = p.read_text().strip()
    except FileNotFoundError:
        return None
    snap = Path(root) / name
    return snap if name and snap.is_dir() else None


def read_snapshot(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The current snapshot folder and its ``extra.json`` ({} when none), from one look-up.

    Both come from the same folder, so they can never belong to two different snapshots.
    """
    snap = current_snapshot(root)
    if snap is None:
        return None
    try:
        extra = json.loads((snap / "extra.json").read_text())
    except FileNotFoundError:
        extra = {}
    except ValueError as e:
        raise IndexMismatch(f"{snap}/extra.json is not JSON ({e})") from e
    if not isinstance(extra, dict):
        raise IndexMismatch(f"{snap}/extra.json is not a JSON object")
    return snap, extra


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
