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
  4x the memory, rebuilt at each merge since HNSW cannot drop a vector). The approximate base
  first projects each vector on its leading principal components (``IndexConfig.reduce``,
  ``PCAR512,IVF4096,SQ8``: the PCA is trained with the IVF, on the merge's vectors), which
  takes the product's 1792-d fused vectors from ~1.8 kB to ~560 bytes a listing.
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
* **Snapshots are mapped.** :meth:`VectorIndex.read` maps a snapshot's base and per-slot
  tables read-only (:class:`SlotTable`, :class:`SlotMap`, :class:`BaseWhere`): the
  processes of a host that load one share its pages, and only the writes since the
  snapshot (and a base a merge built) are private (docs/scale.md, "Replicas that share
  memory").
* Inner product over the fused vectors (see :mod:`indexer.fusion`).
"""

from __future__ import annotations

import hashlib
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
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    # what the approximate base does to a vector before indexing it: "pca<d>" projects it
    # on the d leading principal components of the merge's vectors (then a random rotation,
    # faiss's "PCAR", which spreads the variance evenly for SQ8), "none" keeps it whole
    # pca512: the widest that fits 600 bytes a listing (`vitrine bench search --product`,
    # docs/scale.md: at 1M, recall@10 0.92 against exact search on the full vectors; 0.79
    # with pca256)
    reduce: str = "pca512"


def reduced_dim(config: IndexConfig, dim: int, n: int) -> int | None:
    """The width an approximate base over ``n`` vectors of ``dim`` projects to, or None.

    None when ``reduce`` is "none", when it would not make the vector narrower, or when there
    are fewer vectors than components to fit (the next retrain, on more, reduces).
    """
    spec = config.reduce
    if spec == "none":
        return None
    if not (spec.startswith("pca") and spec[3:].isdigit() and int(spec[3:]) > 0):
        raise ValueError(f"unknown reduction {spec!r}: use 'none' or 'pca<width>'")
    out = int(spec[3:])
    return out if out < dim and n >= out else None


def ivf_nlist(n: int) -> int:
    """Number of IVF lists: ~4 sqrt(n), a power of two, at least 16."""
    return int(max(16, 2 ** round(np.log2(4 * np.sqrt(max(n, 1))))))


def factory_string(
    kind: str, n: int, config: IndexConfig | None = None, dim: int | None = None
) -> str:
    """The ``faiss.index_factory`` description of a ``kind`` index over ``n`` vectors of
    ``dim`` (None: no reduction), e.g. ``PCAR256,IVF4096,SQ8``. The exact base is never
    reduced: it is what the approximate kinds are measured against."""
    cfg = config or IndexConfig()
    if kind == "flat":
        return "IDMap2,Flat"
    out = reduced_dim(cfg, dim, n) if dim is not None else None
    pre = f"PCAR{out}," if out else ""
    if kind == "hnsw":
        return f"IDMap2,{pre}HNSW{cfg.hnsw_m}"
    if kind == "ivf_sq8":
        # k-means needs at least as many points as lists
        return f"{pre}IVF{min(ivf_nlist(n), max(1, n))},SQ8"
    raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")


def index_parameters(kind: str, config: IndexConfig | None = None) -> str:
    """The ``faiss.ParameterSpace`` settings a ``kind`` index gets when built ("" for none)."""
    cfg = config or IndexConfig()
    if kind == "hnsw":
        return f"efConstruction={cfg.hnsw_ef_construction},efSearch={cfg.hnsw_ef_search}"
    if kind == "ivf_sq8":
        return f"nprobe={cfg.nprobe}"
    return ""


def _empty_index(
    kind: str, x: np.ndarray, config: IndexConfig, n: int | None = None
) -> tuple[Any, str]:
    """An empty ``kind`` index for ``n`` vectors (default ``len(x)``), trained on ``x``, and
    its factory string."""
    m, d = x.shape
    n = m if n is None else n
    desc = factory_string(kind, n, config, d)
    index = faiss.index_factory(d, desc, faiss.METRIC_INNER_PRODUCT)
    params = index_parameters(kind, config)
    if params:  # before any add: efConstruction shapes the graph
        faiss.ParameterSpace().set_index_parameters(index, params)
    if not index.is_trained:  # IVF, and a reduction
        # faiss wants >= 39 points per IVF centroid, more only slows training; a PCA alone
        # fits well on a few times its input width
        cap = 40 * faiss.extract_index_ivf(index).nlist if kind == "ivf_sq8" else 8 * d
        rng = np.random.default_rng(0)
        sample = np.ascontiguousarray(
            x if m <= cap else x[np.sort(rng.choice(m, cap, replace=False))])
        pre = _pretransform(index)
        if pre is not None:
            _train_projection(pre, sample)
        index.train(sample)  # the rest of the chain (IVF, SQ8) on the projected sample
    if kind == "ivf_sq8":
        faiss.extract_index_ivf(index).set_direct_map_type(faiss.DirectMap.Hashtable)
    return index, desc


def _pretransform(index: Any) -> Any | None:
    """The ``IndexPreTransform`` of a reduced base (under its ``IDMap2`` for HNSW), or None."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexPreTransform) else None


def _train_projection(pre: Any, sample: np.ndarray) -> None:
    """Fit the PCA of ``pre`` on ``sample`` as a projection *without* its offset.

    faiss's PCA maps x to A (x - mean): right for L2, but under inner product it adds
    -A mean . A x to every score, a per-vector bias that reorders neighbours. A x alone keeps
    q . x up to the dropped components. The fused vectors are centred per block (fusion.py),
    so their mean is near zero and the centred principal directions are the right ones.
    ``IndexPreTransform.train`` skips a transform already trained, so the index trained
    after this sees A x.
    """
    vt = faiss.downcast_VectorTransform(pre.chain.at(0))
    vt.train(sample)
    faiss.copy_array_to_vector(np.zeros(vt.d_out, dtype=np.float32), vt.b)


def trained_faiss_index(
    kind: str, sample: np.ndarray, n: int, config: IndexConfig | None = None
) -> tuple[Any, str]:
    """An empty ``kind`` index sized for ``n`` vectors, trained on ``sample`` (of the same
    distribution), and its factory string: for filling in chunks what does not fit twice in
    memory (``vitrine bench search --product``)."""
    return _empty_index(kind, sample, config or IndexConfig(), n)


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
    pre = _pretransform(index)
    if pre is not None:  # a reduced approximate base
        inner = faiss.downcast_index(pre.index)
    else:
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) \
            else index
    if isinstance(inner, faiss.IndexIVF):
        return "ivf_sq8"
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


def _top_projected(q: np.ndarray, x: np.ndarray, rows: np.ndarray, k: int, pre: Any
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_top` of the delta rows ``x`` scored as a reduced base scores its own: (A q) .
    (A x), A the base's projection. Scored whole, a listing still in the delta would outrank
    an equally close one in the base by what the projection drops (the near neighbours'
    shared residual), and a calibrated threshold would read the two on different scales.
    Candidates are taken by the whole score (one product with the delta) and only they are
    projected: 4 k of them hold the projected top k (the two orders differ by the small
    residual part)."""
    m = min(4 * k, len(rows))
    _, cand = _top(q @ x.T, np.arange(len(rows)), m)  # per query row: positions in x
    project = pre.chain.at(0).apply
    uniq = np.unique(cand)
    xa = project(np.ascontiguousarray(x[uniq]))
    qa = project(np.ascontiguousarray(q))
    sc = np.einsum("rd,rkd->rk", qa, xa[np.searchsorted(uniq, cand)])
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(sc, order, axis=1),
            rows[np.take_along_axis(cand, order, axis=1)])


@dataclass(frozen=True)
class _Match:
    """The slots of a view a search may return: alive and passing its filters."""

    mask: np.ndarray  # bool per slot of the view
    base: int  # how many of them are in the base
    delta_rows: np.ndarray  # delta rows of the others
    bits: np.ndarray | None  # packed base part, for IDSelectorBitmap; None: all of the base


class VectorView(Protocol):
    """What a request reads of the vector store, taken once per request: an
    :class:`IndexView` (FAISS, frozen) or an :class:`indexer.milvus.MilvusView` (a handle
    on a Milvus collection)."""

    @property
    def dim(self) -> int: ...
    def __len__(self) -> int: ...
    def __contains__(self, listing_id: object) -> bool: ...
    def ids(self) -> list[str]: ...
    def payload(self, listing_id: str) -> Payload: ...
    def get(self, ids: Sequence[str]) -> np.ndarray: ...
    def search(self, queries: np.ndarray, k: int, *, effort: int | None = None,
               category: str | None = None, labelled_only: bool = False
               ) -> list[list[Hit]]: ...
    @property
    def categories(self) -> Mapping[str, int]: ...
    def labelled_categories(self) -> list[str]: ...
    def listing_payloads(self, *, labelled: bool) -> Iterator[Payload]: ...
    def category_counts(self) -> dict[str, int]: ...
    def state(self) -> dict[str, Any]: ...
    def write(self, directory: Path) -> None: ...


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
    slot_ids: SlotTable  # shared like labelled; str, None once dead and reclaimed
    payloads: SlotTable  # shared like labelled; Payload or None
    slot_of: Mapping[str, int]  # listing id -> slot at the last merge
    base_where: BaseWhere | None  # a mapped IVF base's vector locations; None: its direct map
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
        return [self.slot_ids[s] for s in np.flatnonzero(self.alive).tolist()]

    def payload(self, listing_id: str) -> Payload:
        """A copy of the listing's payload (raises KeyError for an unknown id)."""
        s = self._slot(listing_id)
        if s is None:
            raise KeyError(listing_id)
        return dict(self.payloads[s] or {})

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids`` (raises KeyError for an unknown id).

        Exact for the delta and a flat base; 8-bit quantised (error ~1e-3) for ``ivf_sq8``;
        for a reduced base (``IndexConfig.reduce``) the projection mapped back to full width,
        which keeps the leading components only (see docs/scale.md for what the vote loses).
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
            out[~in_delta] = self.reconstruct(slots[~in_delta])
        return out

    def reconstruct(self, slots: np.ndarray) -> np.ndarray:
        """The base's vectors of ``slots`` (slots in the base), as ``reconstruct_batch``."""
        if self.base_where is None:
            return np.asarray(self.base.reconstruct_batch(slots))
        return self.base_where.reconstruct(self.base, slots)

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
            pre = _pretransform(self.base)
            if pre is None:
                s, cols = _top(q @ x.T, rows, min(kk, len(rows)))
            else:
                s, cols = _top_projected(q, x, rows, min(kk, len(rows)), pre)
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
            s, ids = _top(q @ self.reconstruct(slots).T, slots, k)
            return s, ids
        _apply_faiss_threads()
        sel = None
        if match.bits is not None:
            sel = faiss.IDSelectorBitmap(len(match.bits), faiss.swig_ptr(match.bits))
        # a filter passing a share p of the base leaves ~p of the lists/graph nodes visited
        # usable, so the effort grows by 1/p, within a fixed cap: bounded work per query
        boost = ntotal / max(match.base, 1)
        # every knob of this search in its own params object: the shared base is never set.
        # A reduced base's IndexPreTransform hands parameters that are not its own to the
        # index it wraps (tests/indexer/test_index.py checks nprobe and filters through it).
        if self.kind == "hnsw":
            ef = max(effort or cfg.hnsw_ef_search, k)
            ef = max(ef, min(math.ceil(ef * boost), cfg.max_effort))
            params = faiss.SearchParametersHNSW(efSearch=ef, sel=sel)
        elif self.kind == "ivf_sq8":
            nprobe = effort or cfg.nprobe
            nprobe = max(nprobe, min(math.ceil(nprobe * boost), cfg.max_effort))
            nlist = faiss.extract_index_ivf(self.base).nlist
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, nlist), sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, ids = self.base.search(q, k, params=params)
        return scores, ids

    # --- what the operators' pages count (the VectorView port) ---------------------------
    def labelled_categories(self) -> list[str]:
        """The first-level categories at least one alive, labelled listing has."""
        n = self.n_slots
        codes = np.unique(self.category[:n][self.alive[:n] & self.labelled[:n]])
        names = {code: name for name, code in self.categories.items()}
        return [names[c] for c in codes.tolist() if c in names]

    def listing_payloads(self, *, labelled: bool) -> Iterator[Payload]:
        """The payloads of the alive listings that are (not) labelled."""
        n = self.n_slots
        wanted = self.labelled[:n] if labelled else ~self.labelled[:n]
        return (self.payloads[s] or {} for s in np.flatnonzero(self.alive[:n] & wanted).tolist())

    def category_counts(self) -> dict[str, int]:
        """Alive listings per first-level category (one bincount)."""
        n = self.n_slots
        codes = self.category[:n][self.alive[:n]]
        codes = codes[codes >= 0]
        counts = np.bincount(codes) if len(codes) else np.zeros(0, np.int64)
        names = {code: name for name, code in self.categories.items()}
        return {names[i]: int(c) for i, c in enumerate(counts.tolist()) if c and i in names}

    # --- persistence --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "dim": self.dim, "version": self.version, "factory": self.factory,
            "kind": self.kind, "trained_at": self.trained_at, "slots": self.n_slots,
            "delta_start": self.delta_start, "live": self.n_live,
            "categories": sorted(self.categories, key=self.categories.__getitem__),
        }

    def write(self, directory: Path) -> None:
        """The files of :meth:`VectorIndex.read` (layout :data:`LAYOUT`): the base
        (``base.faiss``), delta and per-slot arrays (``.npy``), ids and payloads as JSON
        blobs with offsets (:class:`SlotTable`), the id look-up table (:class:`SlotMap`) and
        ``index.json``. Every file is one a reader can map as it is."""
        n = self.n_slots
        _write_base(self.base, directory / "base.faiss", self.kind)
        np.save(directory / "delta.npy", self.delta[: n - self.delta_start])
        np.save(directory / "alive.npy", self.alive)
        np.save(directory / "labelled.npy", self.labelled[:n])
        np.save(directory / "category.npy", self.category[:n])
        # dead slots' ids and payloads are no use to a fresh process (no older view exists)
        self.slot_ids.write(directory, "ids", self.alive)
        self.payloads.write(directory, "payloads", self.alive)
        SlotMap.write(directory, self.slot_ids, self.alive)
        if self.kind == "ivf_sq8":
            rows = self.base_where.rows if self.base_where else BaseWhere.of(self.base)
            np.save(directory / "base_where.npy", rows)
        (directory / "index.json").write_text(json.dumps({**self.state(), "layout": LAYOUT}))


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


# --- slot tables ---------------------------------------------------------------------------
LAYOUT = 2  # the files VectorIndex.write makes (index.json "layout"); 1: slots.json
# A snapshot's per-slot ids and payloads and its id -> slot map are read-only mappings of
# its files, shared by every process on the host that loaded it (the page cache holds them
# once); only what was written since lives in Python objects. At 1M listings the tables as
# Python lists and dicts took more private memory per process than the IVF base itself.


class SlotTable:
    """One JSON value (or None) per slot: the snapshot's slots decoded on access from a
    mapped blob, the slots written since in a list. Append-only, like the other per-slot
    arrays: a view reads only slots below its ``n_slots``.

    ``blob[offsets[s]:offsets[s + 1]]`` is slot ``s``'s JSON; an empty range is None (a
    slot that was dead when the snapshot was written).
    """

    def __init__(self, blob: np.ndarray | None = None, offsets: np.ndarray | None = None,
                 tail: list[Any] | None = None) -> None:
        self._blob = blob if blob is not None else np.zeros(0, np.uint8)
        self._offsets = offsets if offsets is not None else np.zeros(1, np.int64)
        self.mapped = len(self._offsets) - 1  # slots below it are the snapshot's
        self._tail: list[Any] = tail if tail is not None else []

    def __len__(self) -> int:
        return self.mapped + len(self._tail)

    def __getitem__(self, slot: int) -> Any:
        if slot >= self.mapped:
            return self._tail[slot - self.mapped]
        raw = self.raw(slot)
        return json.loads(raw) if raw else None

    def __setitem__(self, slot: int, value: None) -> None:
        """Drop a dead slot's value (the writer's clean-up). A mapped slot holds no private
        memory to free: it is left as it is, and no view reads a dead slot."""
        if slot >= self.mapped:
            self._tail[slot - self.mapped] = value

    def extend(self, values: Iterable[Any]) -> None:
        self._tail.extend(values)

    def raw(self, slot: int) -> bytes:
        """Slot ``slot``'s JSON as stored (b"" for None)."""
        if slot >= self.mapped:
            v = self._tail[slot - self.mapped]
            # ASCII-escaped: a lone surrogate in a payload cannot make a snapshot unwritable
            return b"" if v is None else json.dumps(v).encode()
        start, end = self._offsets[slot], self._offsets[slot + 1]
        return bytes(self._blob[start:end])

    def write(self, directory: Path, name: str, keep: np.ndarray) -> None:
        """``name.bin`` (the JSON of the slots where ``keep`` is set, one after the other)
        and ``name.npy`` (the offsets); streamed: no second copy of the table in memory."""
        offsets = np.zeros(len(keep) + 1, np.int64)
        with (directory / f"{name}.bin").open("wb") as f:
            for s in np.flatnonzero(keep).tolist():
                offsets[s + 1] = f.write(self.raw(s))
        np.cumsum(offsets, out=offsets)
        np.save(directory / f"{name}.npy", offsets)

    @classmethod
    def read(cls, directory: Path, name: str) -> SlotTable:
        offsets = _load(directory / f"{name}.npy", mapped=True)
        if offsets.dtype != np.int64 or offsets.ndim != 1 or not len(offsets):
            raise IndexMismatch(f"{name}.npy in {directory} holds no offsets")
        path = directory / f"{name}.bin"
        size = path.stat().st_size
        if int(offsets[-1]) != size:
            raise IndexMismatch(f"{name}.bin in {directory} does not match its offsets")
        blob = np.memmap(path, np.uint8, "r") if size else np.zeros(0, np.uint8)
        return cls(blob, offsets)


def _key(listing_id: str) -> int:
    """A listing id's 64-bit key in a snapshot's sorted look-up table (ids of any length
    get one fixed-width key; a collision only costs a second comparison)."""
    return int.from_bytes(
        hashlib.blake2b(listing_id.encode(), digest_size=8).digest(), "little")


class SlotMap(MutableMapping[str, int]):
    """Listing id -> slot: the snapshot's live ids as a mapped table sorted by key
    (:func:`_key`, ``np.searchsorted``) under a dict of what changed since (-1: gone).

    The writer mutates its own map; views get :meth:`frozen` copies, which copy only the
    changes since the snapshot. An index that was not read from a snapshot has an empty
    table and keeps everything in the dict, as a plain dict would.
    """

    def __init__(self, keys: np.ndarray | None = None, slots: np.ndarray | None = None,
                 ids: SlotTable | None = None, over: dict[str, int] | None = None,
                 size: int | None = None) -> None:
        self._keys = keys if keys is not None else np.zeros(0, np.uint64)
        self._slots = slots if slots is not None else np.zeros(0, np.int64)
        self._ids = ids if ids is not None else SlotTable()  # reads the mapped slots only
        self._over: dict[str, int] = over if over is not None else {}
        # (without ``size``: ``over`` holds only ids that the table does not)
        self._size = len(self._slots) + len(self._over) if size is None else size

    def frozen(self) -> SlotMap:
        return SlotMap(self._keys, self._slots, self._ids, dict(self._over), self._size)

    def _mapped(self, listing_id: str) -> int | None:
        if not len(self._keys):
            return None
        key = np.uint64(_key(listing_id))
        lo = int(np.searchsorted(self._keys, key, "left"))
        hi = int(np.searchsorted(self._keys, key, "right"))
        for p in range(lo, hi):
            s = int(self._slots[p])
            if self._ids[s] == listing_id:
                return s
        return None

    def __getitem__(self, listing_id: str) -> int:
        s = self._over.get(listing_id)
        if s is None:
            s = self._mapped(listing_id)
        if s is None or s < 0:
            raise KeyError(listing_id)
        return s

    def __setitem__(self, listing_id: str, slot: int) -> None:
        if listing_id not in self:
            self._size += 1
        self._over[listing_id] = slot

    def __delitem__(self, listing_id: str) -> None:
        if listing_id not in self:
            raise KeyError(listing_id)
        self._size -= 1
        if self._mapped(listing_id) is None:
            del self._over[listing_id]
        else:
            self._over[listing_id] = -1  # hides the mapped entry

    def __iter__(self) -> Iterator[str]:
        for s in self._slots.tolist():
            lid = self._ids[s]
            if lid not in self._over:
                yield lid
        yield from (lid for lid, s in self._over.items() if s >= 0)

    def __len__(self) -> int:
        return self._size

    @staticmethod
    def write(directory: Path, ids: SlotTable, live: np.ndarray) -> None:
        """``lookup_keys.npy`` / ``lookup_slots.npy``: the ``live`` slots by id key."""
        slots = np.flatnonzero(live).astype(np.int64)
        keys = np.fromiter((_key(ids[s]) for s in slots.tolist()), np.uint64, len(slots))
        order = np.argsort(keys, kind="stable")
        np.save(directory / "lookup_keys.npy", keys[order])
        np.save(directory / "lookup_slots.npy", slots[order])

    @classmethod
    def read(cls, directory: Path, ids: SlotTable) -> SlotMap:
        keys = _load(directory / "lookup_keys.npy", mapped=True)
        slots = _load(directory / "lookup_slots.npy", mapped=True)
        if keys.dtype != np.uint64 or slots.dtype != np.int64 or keys.shape != slots.shape:
            raise IndexMismatch(f"the id look-up table in {directory} is malformed")
        return cls(keys, slots, ids)


@dataclass(frozen=True)
class BaseWhere:
    """Where each vector of a mapped IVF base is: columns ``(slot, list, offset)`` sorted
    by slot (``base_where.npy``, mapped), so that the base needs no id -> list hash table.

    faiss rebuilds an IVF's ``DirectMap.Hashtable`` (what ``reconstruct`` by id needs) in
    private memory at each read: ~40 bytes a vector, 14 % of a ``PCAR256,IVF,SQ8`` base
    (measured with ``vitrine bench replicas``), more than the whole goal of issue 15. This
    table holds the same and is shared. Reconstructing one vector at a time through it
    (``reconstruct_from_offset``) took as long as ``reconstruct_batch`` through the hash
    table: 7.8 ms for 2048 vectors of a PCAR64,IVF256,SQ8 index on one thread.
    """

    rows: np.ndarray  # int64 (3, m): slots (searched: one contiguous row), lists, offsets

    @staticmethod
    def of(base: Any) -> np.ndarray:
        """The table of an IVF ``base`` (the library's own reader of its lists)."""
        from faiss.contrib.inspect_tools import get_invlist

        ivf = faiss.extract_index_ivf(base)
        parts = [np.zeros((3, 0), np.int64)]
        for lst in range(ivf.nlist):
            ids = get_invlist(ivf.invlists, lst)[0]
            parts.append(np.stack([ids, np.full(len(ids), lst), np.arange(len(ids))]))
        rows = np.concatenate(parts, axis=1).astype(np.int64)
        return np.ascontiguousarray(rows[:, np.argsort(rows[0], kind="stable")])

    @classmethod
    def read(cls, directory: Path, base: Any) -> BaseWhere:
        rows = _load(directory / "base_where.npy", mapped=True)
        if rows.dtype != np.int64 or rows.ndim != 2 or rows.shape != (3, base.ntotal):
            raise IndexMismatch(f"base_where.npy in {directory} does not fit base.faiss")
        return cls(rows)

    def reconstruct(self, base: Any, slots: np.ndarray) -> np.ndarray:
        ivf = faiss.extract_index_ivf(base)
        at = np.searchsorted(self.rows[0], slots)
        m = self.rows.shape[1]
        if len(slots) and not (m and np.array_equal(self.rows[0, np.minimum(at, m - 1)], slots)):
            raise KeyError("a slot that is not in the base")
        # one call a vector, written in place (faiss's pointer cast, as faiss.contrib does);
        # a reduced base maps each one back through its chain on its own, as faiss's
        # reconstruct_batch does: the same floats to the last bit as an unmapped base
        reduced = np.empty(ivf.d, np.float32)
        red = faiss.swig_ptr(reduced)
        out = np.empty((len(slots), base.d), np.float32)
        addr, step = out.ctypes.data, out.strides[0]
        cast, chain = faiss.cast_integer_to_float_ptr, base.d != ivf.d
        for i, (lst, off) in enumerate(zip(self.rows[1, at].tolist(),
                                           self.rows[2, at].tolist(), strict=True)):
            row = cast(addr + i * step)
            if chain:
                ivf.reconstruct_from_offset(lst, off, red)
                base.reverse_chain(1, red, row)
            else:
                ivf.reconstruct_from_offset(lst, off, row)
        return out


def _load(path: Path, *, mapped: bool) -> np.ndarray:
    """An ``.npy`` array, read-only mapped when ``mapped``; never unpickles."""
    return np.load(path, mmap_mode="r" if mapped else None, allow_pickle=False)


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
        self._slot_ids = SlotTable()
        self._payloads = SlotTable()
        self._slot_of = SlotMap()  # the live map, writer-only
        self._merged_map = SlotMap()  # shared by views: never changed once published
        self._base_where: BaseWhere | None = None  # set by read() for a mapped IVF base
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
            base_where=self._base_where,
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
            x[in_base] = view.reconstruct(slots[in_base])
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
        self._base_where = None  # a merged base has its own direct map
        # slots deleted while the merge ran are in the new base but dead
        self._base_dead = int(np.count_nonzero(~self._alive[merged.slots]))
        self._merged_map = self._slot_of.frozen()
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
        """The index :meth:`write` wrote, mapped: the base and every per-slot table of the
        snapshot are read-only mappings of its files, which all processes of the host that
        read the same snapshot share; only the ``alive`` mask (1 byte a slot) and the writes
        that follow are private. A layout 1 folder (ids and payloads in ``slots.json``,
        before mapping) is still read, into private memory; a newer layout is refused."""
        state = json.loads((directory / "index.json").read_text())
        layout = state.get("layout", 1)
        if layout not in (1, LAYOUT):
            raise IndexMismatch(f"the index in {directory} has layout {layout!r}; this vitrine "
                                f"reads layouts 1 and {LAYOUT}: rebuild it with `vitrine index`")
        self = cls(int(state["dim"]), config)
        with self._write_lock:
            self._base = _read_base(directory / "base.faiss")
            self._factory, self._kind = str(state["factory"]), str(state["kind"])
            self._trained_at = int(state["trained_at"])
            n = self._n_slots = int(state["slots"])
            self._delta_start = int(state["delta_start"])
            # the mapped arrays are never written: the first append grows each into a
            # private copy (_grow), as it would any full array
            self._delta = _grow(_load(directory / "delta.npy", mapped=True),
                                n - self._delta_start)
            self._alive = _load(directory / "alive.npy", mapped=False)  # the writer's to clear
            self._labelled = _load(directory / "labelled.npy", mapped=True)
            self._category = _load(directory / "category.npy", mapped=True)
            if self._category.dtype != np.int32:
                raise IndexMismatch(f"category.npy in {directory} is not int32")
            if layout == 1:
                slots = json.loads((directory / "slots.json").read_text())
                self._slot_ids = SlotTable(tail=list(slots["ids"]))
                self._payloads = SlotTable(tail=list(slots["payloads"]))
                self._slot_of = SlotMap(over={
                    self._slot_ids[s]: s for s in np.flatnonzero(self._alive).tolist()})
                log.info("%s: an index of layout 1, read into private memory; the next "
                         "snapshot is written mappable (layout %d)", directory, LAYOUT)
            else:
                self._slot_ids = SlotTable.read(directory, "ids")
                self._payloads = SlotTable.read(directory, "payloads")
                self._slot_of = SlotMap.read(directory, self._slot_ids)
            self._merged_map = self._slot_of.frozen()
            if layout != 1 and self._kind == "ivf_sq8":
                self._base_where = BaseWhere.read(directory, self._base)
            self._categories = {c: i for i, c in enumerate(state["categories"])}
            self._n_live = int(np.count_nonzero(self._alive))
            self._base_dead = self._base.ntotal - int(
                np.count_nonzero(self._alive[: self._delta_start]))
            if not (len(self._alive) == len(self._labelled) == len(self._slot_ids) == n
                    == len(self._payloads)) or len(self._slot_of) != self._n_live:
                raise IndexMismatch(f"index files in {directory} disagree on the slot count")
            if len(self._category) != n or (n and not (
                    -1 <= int(self._category.min())
                    and int(self._category.max()) < len(self._categories))):
                raise IndexMismatch(f"category.npy in {directory} does not fit its categories")
            self._view = self._publish([])
            self._maybe_merge()
        return self


def _write_base(base: Any, path: Path, kind: str) -> None:
    """``base.faiss``; an IVF base without its direct map (see :class:`BaseWhere`).

    The shared base cannot drop its hash table (a reader may be reconstructing through it),
    and a copy of it would double the writer's memory for a moment: the file is written as
    it is, mapped back (which costs the hash table once more, briefly) and written again
    from that mapped copy without the table.
    """
    faiss.write_index(base, str(path))
    if kind != "ivf_sq8" or faiss.extract_index_ivf(base).direct_map.type == (
            faiss.DirectMap.NoMap):
        return
    mapped = _read_base(path)
    faiss.extract_index_ivf(mapped).set_direct_map_type(faiss.DirectMap.NoMap)
    bare = path.with_name(f".{path.name}.bare")
    faiss.write_index(mapped, str(bare))
    del mapped
    os.replace(bare, path)


def _read_base(path: Path) -> Any:
    """A snapshot's FAISS base, mapped read-only where this faiss can.

    ``IO_FLAG_MMAP_IFC`` maps the codes of flat indexes, the inverted lists of IVF ones and
    the HNSW graph (measured on faiss 1.15.1: IDMap2,Flat; IVF,SQ8; PCAR,IVF,SQ8;
    IDMap2,HNSW); ``IO_FLAG_MMAP`` alone maps only IVF lists. What faiss rebuilds while
    reading stays private: an ``IDMap2``'s reverse map (the flat base, up to ``exact_max``
    vectors, and HNSW) and an IVF's direct map, which :func:`_write_base` leaves out
    (:class:`BaseWhere`). The file may be removed while mapped (a newer snapshot replaces
    it): its pages live until the last process unmaps them. A faiss without the flag, or
    one that refuses it for an index type, reads the file into memory.
    """
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    if flag is not None:
        try:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            log.warning("%s cannot be mapped (%s): read into private memory", path, e)
    return faiss.read_index(str(path))


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
