"""The core of vitrine: listings -> fused vectors -> FAISS index -> categories and neighbours.

:class:`Vitrine` is what every adapter (CLI, Celery worker, HTTP API, evaluation) drives. It
owns the fusion layout, the fitted lexical encoder and the vector index (which keeps each
listing's metadata as its payload), and saves/loads them together as one atomic snapshot.

Every read takes one :class:`State` (fusion, lexical encoder, index view) at its start and
uses nothing else, so a write, a merge or a reload during a request never mixes two versions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .calibration import Calibration
from .catalog import Listing, taxonomy_path
from .encoders.registry import ModelRegistry, is_off, runs_in_torch
from .encoders.text import TfidfEncoder, strip_boilerplate
from .errors import ImageError, IndexMismatch, InvalidInput, NotFound
from .fusion import Block, Fusion
from .images import Photo, image_limits, load_photo
from .index import (
    IndexConfig,
    VectorIndex,
    VectorView,
    current_snapshot,
    read_snapshot,
    write_snapshot,
)
from .knn import (
    Neighbour,
    UncertainReason,
    Vote,
    candidate_weights,
    path_vote,
    vote_shares,
)
from .settings import Settings

if TYPE_CHECKING:
    from .milvus import MilvusIndex

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
# 2: fitted state as data (fusion.json/.npz, lexical.json/.npz) and library versions in the
# manifest; 1 (refused): the fitted state pickled in fusion.pkl
# 3: the index's per-slot tables as files a process maps (indexer.index.LAYOUT 2); 2 (ids and
# payloads in slots.json) is still read. A vitrine that reads only 2 refuses a 3 cleanly.
SNAPSHOT_FORMAT = 3
_T = TypeVar("_T")
CHUNK = 256  # listings decoded and encoded at a time: bounds memory for decoded photos
PHOTO_GROUP = 32  # decoded photos held at most before they are encoded (~128 MiB)


@dataclass(frozen=True)
class ListingMeta:
    """A listing's metadata: the typed view of its payload in the index."""

    title: str
    category: str | None = None
    # "seller" / "catalog" / "confirmed" (by an operator): a label that votes; "predicted"
    # and "unconfirmed" (a seller's category not in the taxonomy, indexer.review): do not
    source: str = "seller"
    # the labelled category levels (catalog.taxonomy_path), first level first; a seller's
    # one-level label is [category]: deeper levels are unknown and do not vote
    category_path: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.category is not None and self.source not in ("predicted", "unconfirmed")

    @classmethod
    def of(cls, listing: Listing) -> ListingMeta:
        path = list(taxonomy_path(listing.category_path, listing.title))
        if listing.category and (not path or path[0] != listing.category):
            path = [listing.category]
        return cls(listing.title, listing.category,
                   "seller" if listing.category else "predicted",
                   path if listing.category else [])

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ListingMeta:
        return cls(str(payload.get("title", "")), payload.get("category"),
                   str(payload.get("source", "seller")), list(payload.get("category_path", [])))

    def payload(self) -> dict[str, Any]:
        return asdict(self)


Upsert = tuple[str, np.ndarray, ListingMeta]


def entries(listings: Sequence[Listing], fused: np.ndarray,
            skip: Iterable[int] = ()) -> list[Upsert]:
    """The ``(id, fused vector, metadata)`` upserts of ``listings`` but the rows ``skip``."""
    left_out = set(skip)
    return [(x.id, fused[i], ListingMeta.of(x))
            for i, x in enumerate(listings) if i not in left_out]


def _columns(upserts: Sequence[Upsert], dim: int) -> dict[str, Any]:
    """Upserts as :meth:`VectorIndex.apply` arguments."""
    vectors = (np.stack([np.asarray(v, np.float32).reshape(-1) for _, v, _ in upserts])
               if upserts else np.zeros((0, dim), np.float32))
    return {
        "ids": [lid for lid, _, _ in upserts],
        "vectors": vectors,
        "payloads": [m.payload() for _, _, m in upserts],
        "labelled": [m.labelled for _, _, m in upserts],
        "categories": [m.category for _, _, m in upserts],
    }


@dataclass(frozen=True)
class State:
    """Everything a read needs, in one version: take it once per request, use only it."""

    fusion: Fusion
    lexical: TfidfEncoder | None
    view: VectorView
    calibration: Calibration | None = None

    def meta(self, listing_id: str) -> ListingMeta | None:
        """The stored metadata of a listing, None when it is not indexed."""
        try:
            return ListingMeta.from_payload(self.view.payload(listing_id))
        except KeyError:
            return None


@dataclass(frozen=True)
class _Core:
    """What a build, a load or a reload replaces as a whole (one reference swap)."""

    fusion: Fusion | None = None
    lexical: TfidfEncoder | None = None
    index: VectorIndex | MilvusIndex | None = None
    calibration: Calibration | None = None  # fitted with the index it was fitted on


@dataclass
class Embedded:
    """Modality vectors of a batch; ``problems[i]`` explains a dropped modality or row."""

    vectors: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    problems: dict[int, str] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)  # rows with no usable modality at all
    photo_errors: dict[int, ImageError] = field(default_factory=dict)  # why a photo was dropped

    @staticmethod
    def gather(parts: Sequence[tuple[Sequence[int], Embedded]], n: int) -> Embedded:
        """Join pieces embedded separately; ``parts`` are ``(the piece's rows, piece)``."""
        first = parts[0][1]
        out = Embedded(
            {k: np.zeros((n, v.shape[1]), v.dtype) for k, v in first.vectors.items()},
            {k: np.zeros(n, bool) for k in first.present},
        )
        covered = 0
        for rows, p in parts:
            idx = np.asarray(rows, dtype=np.int64)
            for key in out.vectors:
                out.vectors[key][idx] = p.vectors[key]
                out.present[key][idx] = p.present[key]
            out.problems.update({int(idx[i]): why for i, why in p.problems.items()})
            out.failed.update(int(idx[i]) for i in p.failed)
            out.photo_errors.update({int(idx[i]): e for i, e in p.photo_errors.items()})
            covered += len(idx)
        assert covered == n, "the pieces must cover every row once"
        return out


_lane_lock = threading.Lock()
_lane_users = 0
_lane_pools: dict[int, ThreadPoolExecutor] = {}


def _lane_pool(lanes: int) -> ThreadPoolExecutor:
    """Long-lived lane threads: torch's per-thread state (oneDNN primitives, OpenMP team)
    stays warm from one batch to the next, which fresh threads per call would pay again."""
    with _lane_lock:
        if lanes not in _lane_pools:
            _lane_pools[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix="encode-lane")
        return _lane_pools[lanes]


@contextmanager
def _single_torch_thread(configured: int) -> Iterator[None]:
    """One intra-op torch thread while any parallel embedding runs in this process; the
    configured count back when the last one ends (torch's thread count is process-wide)."""
    from .encoders.base import configure_torch

    global _lane_users
    with _lane_lock:
        _lane_users += 1
        if _lane_users == 1:
            configure_torch(1)
    try:
        yield
    finally:
        with _lane_lock:
            _lane_users -= 1
            if _lane_users == 0:
                configure_torch(configured)


def semantic_text(listing: Listing) -> str:
    desc = strip_boilerplate(listing.description)
    return f"{listing.title}. {desc}" if desc else listing.title


def lexical_text(listing: Listing) -> str:
    # the title twice: it is short and names the product; the description is long and noisy
    return f"{listing.title} {listing.title} {listing.description}"


class Vitrine:
    """Encoders + fusion + one index. Reads are lock-free; see :meth:`state`.

    Writes (:meth:`apply`, :meth:`upsert`, :meth:`delete`) serialize on the index's writer
    mutex; :meth:`build`, :meth:`create_empty`, :meth:`load` and :meth:`adopt` replace
    fusion, lexical encoder and index together in one swap.
    """

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self._core = _Core()
        self.extra: dict[str, Any] = {}  # the extra.json of the snapshot load() read
        self.snapshot: Path | None = None  # that snapshot's folder

    @property
    def fusion(self) -> Fusion | None:
        return self._core.fusion

    @property
    def index(self) -> VectorIndex | MilvusIndex | None:
        return self._core.index

    @property
    def lexical(self) -> TfidfEncoder | None:
        return self._core.lexical

    @lexical.setter
    def lexical(self, encoder: TfidfEncoder | None) -> None:
        # set before a build: a fitted index keeps the encoder it was built with
        self._core = _Core(self._core.fusion, encoder, self._core.index,
                           self._core.calibration)

    @property
    def calibration(self) -> Calibration | None:
        return self._core.calibration

    def adopt(self, other: Vitrine) -> None:
        """Take ``other``'s fusion, lexical encoder, index and snapshot (a reload) in one swap.

        Requests already running keep the :class:`State` they took.
        """
        self._core = other._core
        self.extra, self.snapshot = dict(other.extra), other.snapshot

    def state(self) -> State:
        """The current version of everything a read needs (raises when nothing is built)."""
        core = self._core
        if core.fusion is None or core.index is None:
            raise IndexMismatch("the index is empty: index a catalog first (`vitrine index`)")
        return State(core.fusion, core.lexical, core.index.view(), core.calibration)

    # --- configuration --------------------------------------------------------------------
    @property
    def text_spec(self) -> str | None:
        spec = self.settings.text_model
        return None if is_off(spec) or spec.lower() == "tfidf" else spec

    @property
    def image_spec(self) -> str | None:
        spec = self.settings.image_model
        return None if is_off(spec) else spec

    @property
    def use_lexical(self) -> bool:
        return self.settings.lexical or self.settings.text_model.lower() == "tfidf"

    def manifest(self, fusion: Fusion | None = None) -> dict[str, Any]:
        fusion = fusion or self.fusion
        return {
            "format": SNAPSHOT_FORMAT,
            "text_model": self.text_spec,
            "image_model": self.image_spec,
            # what the specs name (a local model by its contents), so that the index can move
            # to a machine where the same model lives at another path
            "model_identity": {key: _identity(key, spec) for key, spec in
                               (("text_model", self.text_spec), ("image_model", self.image_spec))},
            "fusion": fusion.describe() if fusion else [],
            "libraries": dict(library_versions()),
        }

    def _index_config(self) -> IndexConfig:
        s = self.settings
        return IndexConfig(
            exact_max=s.exact_max,
            ann=s.ann,
            nprobe=s.nprobe,
            reduce=s.ann_reduce,
            hnsw_m=s.hnsw_m,
            hnsw_ef_construction=s.hnsw_ef_construction,
            hnsw_ef_search=s.hnsw_ef_search,
        )

    @property
    def ready(self) -> bool:
        return self.fusion is not None and self.index is not None

    def __len__(self) -> int:
        index = self.index
        return len(index) if index is not None else 0

    def __contains__(self, listing_id: object) -> bool:
        index = self.index
        return index is not None and listing_id in index

    # --- embedding ------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load the configured encoders now (at service start-up) instead of on first use."""
        if self.text_spec:
            self.registry.get("text", self.text_spec)
        if self.image_spec:
            self.registry.get("image", self.image_spec)

    def embed(self, listings: Sequence[Listing], progress: Progress | None = None, *,
              state: State | None = None) -> Embedded:
        """Encode every modality of ``listings``. Bad photos drop the image modality only.

        The lexical view is ``state``'s (a read's), else the current one.

        A batch of several encoder batches is run by ``lanes`` threads, each running the
        encoders with one torch thread: small-batch CNN/transformer passes scale badly over
        intra-op threads, and whole passes side by side keep every core busy. The batch is
        cut into pieces of two encoder batches, longest texts first (similar lengths share
        a text batch, so little padding), and each lane takes the next piece when it is
        done with one: no lane idles while another still has a long shard to go.
        """
        lexical = state.lexical if state is not None else self.lexical
        lanes = self.encode_lanes(len(listings))
        if lanes <= 1:
            return self._embed_serial(listings, progress, lexical)
        self.load_models()  # once, before the threads share them
        # Longest first, then cut into pieces. SentenceTransformer.encode sorts by length only
        # within one call, and each piece is its own call: pieces cut in catalog order mix
        # lengths in every batch (1050 catalog texts, 1 thread: 26% slower at batch 4, 48% at
        # 32; same vectors). Raw text length orders well enough, without cleaning texts twice.
        order = np.argsort([-(len(x.title) + len(x.description)) for x in listings],
                           kind="stable")
        step = 2 * max(1, self.settings.batch_size)
        pieces = [order[a : a + step].tolist() for a in range(0, len(order), step)]

        def run(rows: list[int]) -> tuple[list[int], Embedded]:
            return rows, self._embed_serial([listings[i] for i in rows], progress, lexical,
                                            lane=True)

        # a +onnx/+openvino encoder's lane runner has its own one thread; PyTorch's count is
        # process-wide, so it is set to one while PyTorch encoders run in lanes
        torch_lanes = runs_in_torch(self.settings)
        with _single_torch_thread(self.settings.torch_threads) if torch_lanes else nullcontext():
            parts = list(_lane_pool(lanes).map(run, pieces))
        return Embedded.gather(parts, len(listings))

    def encode_lanes(self, n: int) -> int:
        """How many threads :meth:`embed` runs ``n`` listings on (see there)."""
        s = self.settings
        want = s.encode_lanes or s.torch_threads or os.cpu_count() or 1
        # a lane must get at least two encoder batches to be worth a thread
        return max(1, min(want, n // (2 * max(1, s.batch_size))))

    def _embed_serial(self, listings: Sequence[Listing], progress: Progress | None = None,
                      lexical: TfidfEncoder | None = None, *, lane: bool = False) -> Embedded:
        """Embed ``listings`` on this thread; ``lane``: beside other lanes (each encoder's
        ``for_lane`` runner)."""
        n = len(listings)
        vectors: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        problems: dict[int, str] = {}
        photo_errors: dict[int, ImageError] = {}
        has_text = np.array([bool(x.title or x.description) for x in listings], dtype=bool)
        if self.text_spec:
            enc = self.registry.get("text", self.text_spec)
            enc = enc.for_lane() if lane else enc
            vectors["text"] = np.zeros((n, enc.dim), np.float32)
            present["text"] = has_text.copy()
        if self.use_lexical and lexical is not None:
            vectors["lexical"] = np.zeros((n, lexical.dim), np.float32)
            present["lexical"] = has_text.copy()
        if self.image_spec:
            ienc = self.registry.get("image", self.image_spec)
            ienc = ienc.for_lane() if lane else ienc
            vectors["image"] = np.zeros((n, ienc.dim), np.float32)
            present["image"] = np.zeros(n, dtype=bool)
        for start in range(0, n, CHUNK):
            chunk = listings[start : start + CHUNK]
            rows = [start + i for i, x in enumerate(chunk) if has_text[start + i]]
            if "text" in vectors and rows:
                vectors["text"][rows] = enc.encode([semantic_text(listings[r]) for r in rows])
            if "lexical" in vectors and rows:
                assert lexical is not None
                vectors["lexical"][rows] = lexical.encode(
                    [lexical_text(listings[r]) for r in rows]
                )
            if "image" in vectors:
                limits = image_limits(self.settings)
                # decoded photos (up to 4 MiB each at 1024 px) are encoded as soon as a
                # group of whole encoder batches is ready: a chunk never holds them all
                bs = max(1, int(getattr(ienc, "batch_size", self.settings.batch_size)))
                group = max(1, PHOTO_GROUP // bs) * bs
                imgs, img_rows = [], []
                for i, x in enumerate(chunk):
                    try:
                        im = load_photo(x.image, limits)
                    except ImageError as e:
                        problems[start + i] = f"photo unusable ({e}); indexed from text only"
                        photo_errors[start + i] = e
                        im = None
                    if im is not None:
                        imgs.append(im)
                        img_rows.append(start + i)
                    if imgs and (len(imgs) >= group or i == len(chunk) - 1):
                        vectors["image"][img_rows] = ienc.encode(imgs)
                        present["image"][img_rows] = True
                        imgs, img_rows = [], []
            if progress:
                progress(len(chunk))
        any_present = np.zeros(n, dtype=bool)
        for m in present.values():
            any_present |= m
        failed = set(np.flatnonzero(~any_present).tolist())
        for i in failed:
            problems[i] = problems.get(i, "no text and no usable photo").replace(
                "; indexed from text only", "; listing has no text either"
            )
        return Embedded(vectors, present, problems, failed, photo_errors)

    def fuse(self, emb: Embedded, *, state: State | None = None) -> np.ndarray:
        fusion = state.fusion if state is not None else self.fusion
        if fusion is None:
            raise IndexMismatch("the index is not built yet: run `vitrine index` first")
        return fusion.fuse(emb.vectors, emb.present)

    # --- building and writing -------------------------------------------------------------
    def fit_lexical(self, listings: Sequence[Listing]) -> None:
        """Fit the TF-IDF/LSA lexical view on a catalog's texts (when it is enabled)."""
        self.lexical = None
        if self.use_lexical:
            texts = [lexical_text(x) for x in listings if x.title or x.description]
            if len(texts) >= 2:
                self.lexical = TfidfEncoder(dim=self.settings.lexical_dim).fit(texts)
            else:
                log.warning("catalog too small to fit the lexical view; it is left out")

    def build(
        self, listings: Sequence[Listing], progress: Progress | None = None
    ) -> dict[int, str]:
        """(Re)build from a catalog: fit the lexical encoder and centring, index everything.

        Returns ``{row: problem}`` for listings indexed without a modality or not at all.
        """
        self.fit_lexical(listings)
        emb = self.embed(listings, progress)
        self.build_from_embedded(listings, emb)
        return emb.problems

    def build_from_embedded(self, listings: Sequence[Listing], emb: Embedded, *,
                            calibrate: bool = True) -> None:
        """Fit the fusion (block layout, centring) on ``emb`` and index ``listings`` with it;
        then (``calibrate``) fit the confidence calibration and the out-of-catalog
        reference on leave-one-out votes of the indexed labelled listings."""
        s = self.settings
        weights = {"text": s.text_weight, "lexical": s.lexical_weight, "image": s.image_weight}
        blocks = [
            Block(name, emb.vectors[name].shape[1], weights[name])
            for name in ("text", "lexical", "image")
            if name in emb.vectors and weights[name] > 0
        ]
        if not blocks:
            raise InvalidInput("no modality is configured: set a text or an image model")
        fusion = Fusion(blocks).fit(emb.vectors, emb.present)
        fused = fusion.fuse(emb.vectors, emb.present)
        cols = _columns(entries(listings, fused, emb.failed), fusion.dim)
        index = VectorIndex.bulk(fusion.dim, config=self._index_config(), **cols)
        self._core = _Core(fusion, self.lexical, index)
        if calibrate:
            calibration = self._fit_calibration(cols["ids"], cols["vectors"], cols["payloads"])
            self._core = _Core(fusion, self.lexical, index, calibration)

    def _fit_calibration(self, ids: Sequence[str], fused: np.ndarray,
                         payloads: Sequence[Mapping[str, Any]]) -> Calibration:
        """Vote every labelled listing by the others (see :mod:`indexer.calibration`)."""
        st = self.state()
        raw: list[float] = []
        correct: list[bool] = []
        nearest: dict[str, list[float]] = {}
        closest: list[float] = []
        for lid, vec, payload in zip(ids, fused, payloads, strict=True):
            own = payload.get("category")
            if own is None or not ListingMeta.from_payload(payload).labelled:
                continue
            pool, shares = self._pool_shares(vec, lid, st)
            if pool:  # best first: its nearest other labelled listing
                closest.append(pool[0].score)
            category, share, _, _ = vote_shares(shares, [n.category or "" for n in pool])
            if category is None:
                continue
            raw.append(share)
            correct.append(category == own)
            same = [n.score for n in pool if n.category == own]
            if same:
                nearest.setdefault(own, []).append(max(same))
        return Calibration.fit(raw, correct, nearest, self.settings.ooc_quantile, closest,
                               self.settings.duplicate_quantile)

    def create_empty(self) -> None:
        """An empty index with the configured encoders and no fitted lexical view."""
        s = self.settings
        dims: dict[str, tuple[int, float]] = {}
        if self.text_spec:
            dims["text"] = (self.registry.get("text", self.text_spec).dim, s.text_weight)
        if self.image_spec:
            dims["image"] = (self.registry.get("image", self.image_spec).dim, s.image_weight)
        blocks = [Block(k, d, w) for k, (d, w) in dims.items() if w > 0]
        if not blocks:
            raise InvalidInput("no modality is configured: set a text or an image model")
        fusion = Fusion(blocks)
        index: VectorIndex | MilvusIndex
        if self.settings.vector_store == "faiss":
            index = VectorIndex(fusion.dim, self._index_config())
        else:
            from .milvus import MilvusIndex

            index = MilvusIndex.open(self.settings, fusion)
        self._core = _Core(fusion, None, index)

    def keep_vectors_in(self, index: MilvusIndex) -> None:
        """Serve the vectors from ``index`` from now on, fusion and calibration kept (a
        catalog built here, copied to Milvus: :func:`indexer.milvus.move_to_milvus`)."""
        self._core = replace(self._core, index=index)

    def apply(self, upserts: Sequence[Upsert], deletes: Sequence[str] = ()) -> int:
        """Upsert ``(id, fused vector, metadata)`` and delete ids, published as one version.

        An id may not be in both. Returns how many of ``deletes`` were indexed.
        """
        index = self.index
        if index is None:
            raise IndexMismatch("the index is not built yet: run `vitrine index` first")
        return index.apply(**_columns(upserts, index.dim), deletes=list(deletes))

    def upsert(
        self, listings: Sequence[Listing], progress: Progress | None = None
    ) -> dict[int, str]:
        """Embed and add/replace listings. Returns ``{row: problem}`` like :meth:`build`."""
        if not self.ready:
            self.create_empty()
        st = self.state()
        emb = self.embed(listings, progress, state=st)
        fused = self.fuse(emb, state=st)
        self.apply(entries(listings, fused, emb.failed))
        return emb.problems

    def delete(self, ids: Iterable[str]) -> int:
        return self.apply([], list(ids)) if self.index is not None else 0

    # --- reading --------------------------------------------------------------------------
    def query_vector(
        self,
        text: str | None = None,
        image: bytes | str | Path | Photo | None = None,
        listing_id: str | None = None,
        *,
        state: State | None = None,
    ) -> np.ndarray:
        """The fused vector of a query: a stored listing, or text and/or a photo.

        ``image``: the photo's bytes or path, or the photo already decoded by
        ``decode_image(raw, **image_limits(settings))`` (used without decoding it again).
        """
        st = state or self.state()
        if listing_id is not None:
            if listing_id not in st.view:
                raise NotFound(f"unknown listing {listing_id!r}")
            return st.view.get([listing_id])
        if not (text and text.strip()) and image is None:
            raise InvalidInput("give a text, a photo or a listing id to search with")
        q = Listing(id="query", title=(text or "").strip(), image=image)
        emb = self.embed([q], state=st)
        if 0 in emb.photo_errors and (0 in emb.failed or not (text and text.strip())):
            raise emb.photo_errors[0]  # a query by photo whose photo is unusable
        if 0 in emb.failed:
            raise InvalidInput(emb.problems[0])
        return self.fuse(emb, state=st)

    def search_vector(
        self,
        fused: np.ndarray,
        k: int = 10,
        *,
        category: str | None = None,
        exclude: str | None = None,
        labelled_only: bool = False,
        state: State | None = None,
        factors: Mapping[str, float] | None = None,
        exclude_ids: Iterable[str] = (),
    ) -> list[Neighbour]:
        """Nearest listings to one fused vector; scores are weighted mean cosines.

        The filters run inside the index search (bounded work however few listings pass).
        ``factors``: per-block weights of this query (:meth:`Fusion.reweight`);
        ``exclude_ids``: more listings to leave out than ``exclude``.
        """
        skip = set(exclude_ids) | ({exclude} if exclude else set())
        return self.search_vectors(fused.reshape(1, -1), k, skips=[skip], category=category,
                                   labelled_only=labelled_only, state=state,
                                   factors=factors)[0]

    def search_vectors(
        self,
        fused: np.ndarray,
        k: int = 10,
        *,
        skips: Sequence[set[str]] | None = None,
        category: str | None = None,
        labelled_only: bool = False,
        state: State | None = None,
        factors: Mapping[str, float] | None = None,
    ) -> list[list[Neighbour]]:
        """:meth:`search_vector` for each row of ``fused`` in one index search (a batch's
        rows: one FAISS call instead of one per row); ``skips``: ids each row leaves out."""
        st = state or self.state()
        q = np.asarray(fused, dtype=np.float32)
        norms = st.fusion.query_norm(q, factors)
        if factors:
            q = st.fusion.reweight(q, factors)
        skips = skips if skips is not None else [set() for _ in range(len(q))]
        want = k + max((len(x) for x in skips), default=0)
        rows = st.view.search(q, want, category=category, labelled_only=labelled_only)
        return [
            [Neighbour(lid, s / (float(norm) or 1.0), p.get("category"), p.get("title", ""),
                       tuple(p.get("category_path") or ()))
             for lid, s, p in hits if lid not in skip][:k]
            for hits, norm, skip in zip(rows, norms, skips, strict=True)
        ]

    def search(
        self,
        *,
        text: str | None = None,
        image: bytes | str | Path | Photo | None = None,
        listing_id: str | None = None,
        k: int = 10,
        category: str | None = None,
        listing_ids: Sequence[str] = (),
        weights: Mapping[str, float] | None = None,
    ) -> list[Neighbour]:
        """``listing_ids``: "more like these" (their per-block centroid, themselves left
        out); ``weights``: how much this query counts each modality, ``text`` (the text and
        lexical blocks) and ``image``, relative to the index's weights (default 1 each)."""
        if not 1 <= k <= 1000:
            raise InvalidInput("k must be between 1 and 1000")
        st = self.state()
        if listing_ids:
            missing = [x for x in listing_ids if x not in st.view]
            if missing:
                raise NotFound(f"unknown listing {missing[0]!r}")
            fused = st.fusion.centroid(st.view.get(list(listing_ids)))
        else:
            fused = self.query_vector(text, image, listing_id, state=st)
        factors = None
        if weights:
            factors = {b.name: float(weights.get("image" if b.name == "image" else "text", 1.0))
                       for b in st.fusion.blocks}
            if not st.fusion.query_norm(fused, factors)[0] > 0:
                raise InvalidInput("the modality weights leave nothing of this query: give a "
                                   "positive weight to a modality it has")
        return self.search_vector(fused[0], k, category=category, exclude=listing_id,
                                  state=st, factors=factors, exclude_ids=listing_ids)

    def _pool_shares(self, fused: np.ndarray, exclude: str | None, st: State
                     ) -> tuple[list[Neighbour], np.ndarray]:
        """The labelled candidate pool of a vote and each candidate's share of it."""
        s = self.settings
        pool = self.search_vector(
            fused, max(s.knn_pool, s.knn_k), exclude=exclude, labelled_only=True, state=st
        )
        if not pool:
            return pool, np.zeros(0)
        fusion = st.fusion
        cand = fusion.split(st.view.get([n.id for n in pool]))
        query = {k: v[0] for k, v in fusion.split(fused.reshape(1, -1)).items()}
        weights = {b.name: b.weight for b in fusion.blocks}
        return pool, candidate_weights(query, cand, weights, k=s.knn_k,
                                       temperature=s.knn_temperature)

    def vote_vector(self, fused: np.ndarray, *, exclude: str | None = None,
                    state: State | None = None) -> Vote:
        """kNN vote for one fused vector among the labelled listings (late fusion): the
        first level, then the category path under it from the same neighbours; with the
        snapshot's calibration, a calibrated confidence and the out-of-catalog test."""
        st = state or self.state()
        s = self.settings
        pool, shares = self._pool_shares(fused, exclude, st)
        category, raw, _, scores = vote_shares(shares, [n.category or "" for n in pool])
        if category is None:
            return Vote(None, 0.0, True, {}, [], uncertain_reason="no_neighbours")
        below, below_conf, stopped = path_vote(
            shares, [n.category_path for n in pool], category, min_share=s.path_min_share)
        cal = st.calibration
        conf = cal.confidence(raw) if cal is not None else raw
        reason: UncertainReason | None = None
        threshold = cal.threshold(category) if cal is not None and s.ooc_quantile > 0 else None
        nearest = max(n.score for n in pool if n.category == category)
        if threshold is not None and nearest < threshold:
            reason = "out_of_catalog"  # far from every listing of the voted category
        elif conf < s.uncertain_below:
            reason = "low_confidence"
        return Vote(category, conf, reason is not None, scores, pool[: s.knn_k],
                    [category, *below], [conf, *below_conf], stopped, reason, raw)

    def classify(self, listing: Listing) -> Vote:
        """Category of a listing from its labelled neighbours, without indexing it."""
        return self.classify_many([listing])[0]

    def classify_many(
        self, listings: Sequence[Listing], progress: Progress | None = None
    ) -> list[Vote]:
        return self.classify_reporting(listings, progress)[0]

    def classify_reporting(
        self, listings: Sequence[Listing], progress: Progress | None = None
    ) -> tuple[list[Vote], dict[int, str]]:
        """Votes of ``listings`` from one view of the index, and by row what was wrong
        with a listing (an unusable photo: voted from its text; nothing usable: no vote)."""
        st = self.state()
        emb = self.embed(listings, progress, state=st)
        fused = self.fuse(emb, state=st)
        out = []
        for i, x in enumerate(listings):
            if i in emb.failed:
                out.append(Vote(None, 0.0, True, {}, [], uncertain_reason="no_neighbours"))
            else:
                out.append(self.vote_vector(fused[i], exclude=x.id, state=st))
        return out, emb.problems

    # --- persistence ----------------------------------------------------------------------
    def save(self, root: str | Path, extra: dict[str, Any] | None = None,
             supersedes: Callable[[Path | None], bool] | None = None) -> Path | None:
        """Write an atomic snapshot under ``root`` (see :func:`indexer.index.write_snapshot`).

        ``extra`` (JSON) is stored in the same snapshot, e.g. the replication log position the
        snapshot includes, so that the two can never disagree; :meth:`load` reads it back
        into :attr:`extra`. ``supersedes`` may refuse to replace the published snapshot
        (None is then returned).
        """
        st = self.state()

        def write(d: Path) -> None:
            if extra is not None:
                (d / "extra.json").write_text(json.dumps(extra))
            st.view.write(d)
            (d / "manifest.json").write_text(json.dumps(self.manifest(st.fusion), indent=2))
            _write_state(d, "fusion", *st.fusion.to_state())
            # JSON null: no lexical view
            _write_state(d, "lexical", *(st.lexical.to_state() if st.lexical else (None, {})))
            # JSON null: no calibration (an index grown from empty has no catalog to fit on)
            _write_state(d, "calibration",
                         *(st.calibration.to_state() if st.calibration else (None, {})))

        return write_snapshot(Path(root), write, supersedes)

    @classmethod
    def load(
        cls, root: str | Path, settings: Settings, registry: ModelRegistry | None = None
    ) -> Vitrine:
        """Load the current snapshot; refuse one built with other encoders than configured.

        Index, fusion and :attr:`extra` all come from the one folder ``CURRENT`` named when
        the load began.
        """
        root = Path(root)
        self = cls(settings, registry)
        for _attempt in range(3):
            found = read_snapshot(root)
            if found is None:
                raise NotFound(f"no index snapshot in {root}: build one with `vitrine index`")
            snap, extra = found
            try:
                self._read(snap, root)
            except FileNotFoundError:
                # another process published a newer snapshot and removed this one meanwhile
                if current_snapshot(root) == snap:
                    raise
                continue
            self.extra, self.snapshot = extra, snap
            return self
        # not NotFound: there is a snapshot, and an empty index must not be taken for it
        raise IndexMismatch(f"the snapshot in {root} kept changing while it was read")

    def _read(self, snap: Path, root: Path) -> None:
        """Read one snapshot folder. Nothing in it is executed: JSON, ``.npy``/``.npz``
        arrays without pickles (``allow_pickle=False``) and FAISS's own index format."""
        manifest = _read_json(snap / "manifest.json")
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if (snap / "fusion.pkl").exists() or fmt == 1:
            raise IndexMismatch(
                f"the index in {root} is an old snapshot (format 1: its fitted state pickled "
                "in fusion.pkl), which vitrine no longer loads since unpickling it would run "
                "whatever code the file holds: rebuild the index with `vitrine index`"
            )
        if fmt not in (2, SNAPSHOT_FORMAT):
            raise IndexMismatch(
                f"the index in {root} has snapshot format {fmt!r}; this vitrine reads formats "
                f"2 and {SNAPSHOT_FORMAT}: rebuild the index with `vitrine index` or run the "
                "vitrine that wrote it"
            )
        assert isinstance(manifest, dict)
        for key, mine in (("text_model", self.text_spec), ("image_model", self.image_spec)):
            recorded = (manifest.get("model_identity") or {}).get(key)
            if not _same_model_spec(key, manifest.get(key), mine) and not (
                    recorded is not None and recorded == _identity(key, mine)):
                raise IndexMismatch(
                    f"index in {root} was built with {key}={manifest.get(key)!r} but "
                    f"{mine!r} is configured (VITRINE_{key.upper()} or "
                    f"--{key.replace('_', '-')}); rebuild it or configure the same model"
                )
        fusion_meta, fusion_arrays = _read_state(snap, "fusion")
        lexical_meta, lexical_arrays = _read_state(snap, "lexical")
        fitted = isinstance(lexical_meta, dict) and bool(lexical_meta.get("fitted"))
        check_libraries(manifest.get("libraries"), root, lexical=fitted)
        fusion = _from_state(snap, "fusion", Fusion.from_state, fusion_meta, fusion_arrays)
        lexical = (None if lexical_meta is None else _from_state(
            snap, "lexical", TfidfEncoder.from_state, lexical_meta, lexical_arrays))
        if "lexical" in fusion.names and not (lexical is not None and lexical.fitted):
            raise IndexMismatch(f"snapshot {snap} has a lexical block but no fitted lexical "
                                "view: rebuild the index with `vitrine index`")
        index: VectorIndex | MilvusIndex
        marker = _read_json(snap / "index.json")
        store = marker.get("store", "faiss") if isinstance(marker, dict) else "faiss"
        if (store == "milvus") != (self.settings.vector_store != "faiss"):
            raise IndexMismatch(
                f"the index in {root} keeps its vectors in {store}, but VITRINE_VECTOR_STORE "
                f"is {self.settings.vector_store.split('://')[0]}: configure the store it was "
                "seeded with, or seed a new data dir")
        try:
            if store == "milvus":
                from .milvus import MilvusIndex

                index = MilvusIndex.open(self.settings, fusion, create=False)
                if index.name != marker.get("collection"):
                    raise IndexMismatch(f"snapshot {snap} names the Milvus collection "
                                        f"{marker.get('collection')!r}, these settings "
                                        f"{index.name!r} (another VITRINE_REDIS_PREFIX?)")
            else:
                index = VectorIndex.read(snap, self._index_config())
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, RuntimeError) as e:
            # RuntimeError: FAISS on a corrupt base.faiss; ValueError: a pickled .npy;
            # IndexError: slot tables that disagree
            raise IndexMismatch(f"the index files of snapshot {snap} cannot be read ({e}): "
                                "rebuild the index with `vitrine index`") from e
        if index.dim != fusion.dim:
            raise IndexMismatch(f"snapshot {snap}: an index of dimension {index.dim} for a "
                                f"fusion of {fusion.dim}: rebuild the index with `vitrine index`")
        calibration = None
        # snapshots written before calibration existed have no calibration files: the
        # confidence is then the raw share and there is no out-of-catalog test
        if (snap / "calibration.json").exists():
            cal_meta, cal_arrays = _read_state(snap, "calibration")
            if cal_meta is not None:
                calibration = _from_state(snap, "calibration", Calibration.from_state,
                                          cal_meta, cal_arrays)
        self._core = _Core(fusion, lexical, index, calibration)


def _identity(key: str, spec: str | None) -> str | None:
    from .encoders.registry import model_identity

    if spec is None:
        return None
    try:
        return model_identity(key.removesuffix("_model"), spec)
    except OSError:
        return None


def _same_model_spec(key: str, recorded: object, configured: str | None) -> bool:
    """Whether the model a snapshot recorded (``key`` = text_model/image_model) is the one
    configured: same spec, or the same model by identity (a local path by its contents,
    however it is spelled: see :func:`indexer.encoders.registry.same_model`)."""
    from .encoders.registry import same_model

    if recorded == configured:
        return True
    if not isinstance(recorded, str) or configured is None:
        return False
    return same_model(key.removesuffix("_model"), recorded, configured)


# --- snapshot files ------------------------------------------------------------------------
# A snapshot folder holds, besides the index files of VectorIndex.write:
#   manifest.json  format, the encoders, the fusion layout and the library versions
#   fusion.json    the blocks: name, dim, weight, whether centred   (Fusion.to_state)
#   fusion.npz     mean_<block>: float32 (dim,) centring means
#   lexical.json   null, or the vectorizer parameters, vocabulary (terms in column order)
#                  and tokenisation probe of the lexical view        (TfidfEncoder.to_state)
#   lexical.npz    idf (n_terms,) and components (dim, n_terms): empty without a lexical view
#   calibration.json  null, or the out-of-catalog quantile and thresholds per category
#   calibration.npz   x, y: the isotonic calibration's knots (raw share -> P(right))
#   extra.json     what the caller of save() stored (say, a replication log position)
# JSON and .npz are data only: arrays are read with allow_pickle=False.

# Distributions whose versions shape the vectors; recorded in every manifest.
LIBRARIES = ("scikit-learn", "numpy", "scipy", "faiss", "torch", "torchvision",
             "sentence-transformers", "transformers", "timm", "open_clip_torch", "pillow",
             "onnx", "onnxruntime", "openvino")


@cache
def library_versions() -> dict[str, str]:
    """The installed versions of :data:`LIBRARIES` (those that are installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from .index import faiss

    out: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            out[name] = str(faiss.__version__) if name == "faiss" else version(name)
        except (PackageNotFoundError, AttributeError):
            continue
    return out


def _major_minor(v: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", v)
    return f"{m[1]}.{m[2]}" if m else v


def check_libraries(recorded: object, root: Path, *, lexical: bool) -> None:
    """Compare the library versions a snapshot recorded with the installed ones.

    The rule: a snapshot with a fitted lexical view loads only under the scikit-learn
    MAJOR.MINOR that fitted it, else :class:`IndexMismatch` (HTTP 409) names both versions.
    The view is rebuilt from data (vocabulary, IDF, SVD basis) by our code, but the
    tokenisation (the token pattern, n-grams, case folding) stays scikit-learn's: a new
    release may split words differently and silently move the vectors of new listings and
    queries away from the indexed ones. Patch releases are accepted; the tokenisation probe
    :meth:`TfidfEncoder.from_state` checks still refuses one that tokenises differently.

    The others (numpy, faiss, torch, the model libraries, pillow) read their own versioned
    formats or change new vectors only by numerical noise: a different MAJOR.MINOR is
    logged as a warning (rebuild when convenient), not refused.
    """
    if not isinstance(recorded, dict) or not all(
            isinstance(v, str) for v in recorded.values()):
        raise IndexMismatch(f"the manifest of the index in {root} records no library "
                            "versions: rebuild the index with `vitrine index`")
    mine = library_versions()
    if lexical:
        theirs, ours = recorded.get("scikit-learn"), mine.get("scikit-learn")
        if theirs is None or ours is None or _major_minor(theirs) != _major_minor(ours):
            raise IndexMismatch(
                f"the lexical view of the index in {root} was fitted with scikit-learn "
                f"{theirs or '(unknown)'} but scikit-learn {ours or '(none)'} is installed; "
                "its tokenisation may differ, so new vectors would not match the indexed "
                f"ones: rebuild the index with `vitrine index`, or install scikit-learn "
                f"{_major_minor(theirs) + '.*' if theirs else 'as recorded'}"
            )
    for name, theirs in sorted(recorded.items()):
        ours = mine.get(name)
        if name != "scikit-learn" and ours and _major_minor(theirs) != _major_minor(ours):
            log.warning("the index in %s was built with %s %s, %s is installed: rebuild it "
                        "with `vitrine index` if search quality drops", root, name, theirs,
                        ours)


def _write_state(d: Path, name: str, meta: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """``name.json`` (``meta``) and ``name.npz`` (``arrays``, numbers only)."""
    for key, a in arrays.items():
        if a.dtype.hasobject:
            raise TypeError(f"{name}.{key}: object arrays would be pickled")
    (d / f"{name}.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    with (d / f"{name}.npz").open("wb") as f:
        np.savez(f, allow_pickle=False, **arrays)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise  # load() retries: a newer snapshot may have replaced this one
    except (OSError, ValueError) as e:
        raise IndexMismatch(f"{path} cannot be read ({e}): rebuild the index with "
                            "`vitrine index`") from e


def _read_state(snap: Path, name: str) -> tuple[Any, dict[str, np.ndarray]]:
    """``name.json`` and the arrays of ``name.npz``; never unpickles anything."""
    meta = _read_json(snap / f"{name}.json")
    path = snap / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        # ValueError covers a pickle in place of the arrays and object (pickled) arrays
        raise IndexMismatch(f"{path} is not a valid array file ({e}): rebuild the index "
                            "with `vitrine index`") from e
    return meta, arrays


def _from_state(snap: Path, name: str, build: Callable[[Any, dict[str, np.ndarray]], _T],
                meta: Any, arrays: dict[str, np.ndarray]) -> _T:
    try:
        return build(meta, arrays)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise IndexMismatch(f"{name}.json/{name}.npz of snapshot {snap} do not hold a valid "
                            f"fitted {name} ({e}): rebuild the index with `vitrine index`"
                            ) from e
