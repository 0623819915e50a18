"""The core of vitrine: listings -> fused vectors -> FAISS index -> categories and neighbours.

:class:`Vitrine` is what every adapter (CLI, Celery worker, HTTP API, evaluation) drives. It
owns the fusion layout, the fitted lexical encoder, the vector index and each listing's
metadata, and saves/loads them together as one atomic snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import Listing
from .encoders.registry import ModelRegistry, is_off
from .encoders.text import TfidfEncoder, strip_boilerplate
from .errors import ImageError, IndexMismatch, InvalidInput, NotFound
from .fusion import Block, Fusion
from .images import decode_image, read_image_bytes
from .index import IndexConfig, VectorIndex, current_snapshot, write_snapshot
from .knn import Neighbour, Vote, vote
from .settings import Settings

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
SNAPSHOT_FORMAT = 1
CHUNK = 256  # listings decoded and encoded at a time: bounds memory for decoded photos


@dataclass
class ListingMeta:
    title: str
    category: str | None = None
    source: str = "seller"  # "seller" / "catalog": a label that votes; "predicted": does not
    category_path: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.category is not None and self.source != "predicted"


@dataclass
class Embedded:
    """Modality vectors of a batch; ``problems[i]`` explains a dropped modality or row."""

    vectors: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    problems: dict[int, str] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)  # rows with no usable modality at all

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
    """Encoders + fusion + index + metadata. Thread-safe for concurrent reads and writes."""

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self.fusion: Fusion | None = None
        self.lexical: TfidfEncoder | None = None
        self.index: VectorIndex | None = None
        self.meta: dict[str, ListingMeta] = {}
        self._write_lock = threading.RLock()

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

    def manifest(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "text_model": self.text_spec,
            "image_model": self.image_spec,
            "fusion": self.fusion.describe() if self.fusion else [],
        }

    def _index_config(self) -> IndexConfig:
        s = self.settings
        return IndexConfig(
            exact_max=s.exact_max,
            ann=s.ann,
            nprobe=s.nprobe,
            hnsw_m=s.hnsw_m,
            hnsw_ef_construction=s.hnsw_ef_construction,
            hnsw_ef_search=s.hnsw_ef_search,
        )

    @property
    def ready(self) -> bool:
        return self.fusion is not None and self.index is not None

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else 0

    def __contains__(self, listing_id: object) -> bool:
        return self.index is not None and listing_id in self.index

    # --- embedding ------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load the configured encoders now (at service start-up) instead of on first use."""
        if self.text_spec:
            self.registry.get("text", self.text_spec)
        if self.image_spec:
            self.registry.get("image", self.image_spec)

    def _decode(self, listing: Listing) -> Any:
        s = self.settings
        data = listing.image
        if data is None:
            return None
        raw = data if isinstance(data, bytes) else read_image_bytes(data, s.max_image_bytes)
        return decode_image(raw, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def embed(self, listings: Sequence[Listing], progress: Progress | None = None) -> Embedded:
        """Encode every modality of ``listings``. Bad photos drop the image modality only.

        A batch of several encoder batches is run by ``lanes`` threads, each running the
        encoders with one torch thread: small-batch CNN/transformer passes scale badly over
        intra-op threads, and whole passes side by side keep every core busy. The batch is
        cut into pieces of two encoder batches, longest texts first (similar lengths share
        a text batch, so little padding), and each lane takes the next piece when it is
        done with one: no lane idles while another still has a long shard to go.
        """
        lanes = self._lanes(len(listings))
        if lanes <= 1:
            return self._embed_serial(listings, progress)
        self.load_models()  # once, before the threads share them
        # raw text length orders well enough, without cleaning every text twice
        order = np.argsort([-(len(x.title) + len(x.description)) for x in listings],
                           kind="stable")
        step = 2 * max(1, self.settings.batch_size)
        pieces = [order[a : a + step].tolist() for a in range(0, len(order), step)]

        def run(rows: list[int]) -> tuple[list[int], Embedded]:
            return rows, self._embed_serial([listings[i] for i in rows], progress)

        with _single_torch_thread(self.settings.torch_threads):
            parts = list(_lane_pool(lanes).map(run, pieces))
        return Embedded.gather(parts, len(listings))

    def _lanes(self, n: int) -> int:
        s = self.settings
        want = s.encode_lanes or s.torch_threads or os.cpu_count() or 1
        # a lane must get at least two encoder batches to be worth a thread
        return max(1, min(want, n // (2 * max(1, s.batch_size))))

    def _embed_serial(self, listings: Sequence[Listing],
                      progress: Progress | None = None) -> Embedded:
        n = len(listings)
        vectors: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        problems: dict[int, str] = {}
        has_text = np.array([bool(x.title or x.description) for x in listings], dtype=bool)
        if self.text_spec:
            enc = self.registry.get("text", self.text_spec)
            vectors["text"] = np.zeros((n, enc.dim), np.float32)
            present["text"] = has_text.copy()
        if self.use_lexical and self.lexical is not None:
            vectors["lexical"] = np.zeros((n, self.lexical.dim), np.float32)
            present["lexical"] = has_text.copy()
        if self.image_spec:
            ienc = self.registry.get("image", self.image_spec)
            vectors["image"] = np.zeros((n, ienc.dim), np.float32)
            present["image"] = np.zeros(n, dtype=bool)
        for start in range(0, n, CHUNK):
            chunk = listings[start : start + CHUNK]
            rows = [start + i for i, x in enumerate(chunk) if has_text[start + i]]
            if "text" in vectors and rows:
                vectors["text"][rows] = enc.encode([semantic_text(listings[r]) for r in rows])
            if "lexical" in vectors and rows:
                assert self.lexical is not None
                vectors["lexical"][rows] = self.lexical.encode(
                    [lexical_text(listings[r]) for r in rows]
                )
            if "image" in vectors:
                imgs, img_rows = [], []
                for i, x in enumerate(chunk):
                    try:
                        im = self._decode(x)
                    except ImageError as e:
                        problems[start + i] = f"photo unusable ({e}); indexed from text only"
                        continue
                    if im is not None:
                        imgs.append(im)
                        img_rows.append(start + i)
                if imgs:
                    vectors["image"][img_rows] = ienc.encode(imgs)
                    present["image"][img_rows] = True
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
        return Embedded(vectors, present, problems, failed)

    def fuse(self, emb: Embedded) -> np.ndarray:
        if self.fusion is None:
            raise IndexMismatch("the index is not built yet: run `vitrine index` first")
        return self.fusion.fuse(emb.vectors, emb.present)

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

    def build_from_embedded(self, listings: Sequence[Listing], emb: Embedded) -> None:
        """Fit the fusion (block layout, centring) on ``emb`` and index ``listings`` with it."""
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
        with self._write_lock:
            self.fusion = fusion
            self.index = VectorIndex(fusion.dim, self._index_config())
            self.meta = {}
            self._add(listings, fused, emb.failed)

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
        with self._write_lock:
            self.lexical = None
            self.fusion = Fusion(blocks)
            self.index = VectorIndex(self.fusion.dim, self._index_config())
            self.meta = {}

    def _add(self, listings: Sequence[Listing], fused: np.ndarray, failed: set[int]) -> None:
        keep = [i for i in range(len(listings)) if i not in failed]
        assert self.index is not None
        self.index.upsert([listings[i].id for i in keep], fused[keep])
        for i in keep:
            x = listings[i]
            self.meta[x.id] = ListingMeta(
                x.title, x.category, "seller" if x.category else "predicted",
                list(x.category_path),
            )

    def upsert(
        self, listings: Sequence[Listing], progress: Progress | None = None
    ) -> dict[int, str]:
        """Embed and add/replace listings. Returns ``{row: problem}`` like :meth:`build`."""
        if not self.ready:
            self.create_empty()
        emb = self.embed(listings, progress)
        fused = self.fuse(emb)
        with self._write_lock:
            self._add(listings, fused, emb.failed)
        return emb.problems

    def set_category(self, listing_id: str, category: str | None, source: str) -> None:
        if listing_id not in self.meta:
            raise NotFound(f"unknown listing {listing_id!r}")
        self.meta[listing_id].category = category
        self.meta[listing_id].source = source

    def delete(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        with self._write_lock:
            n = self.index.delete(ids) if self.index is not None else 0
            for i in ids:
                self.meta.pop(i, None)
            return n

    # --- reading --------------------------------------------------------------------------
    def _require_ready(self) -> tuple[Fusion, VectorIndex]:
        if self.fusion is None or self.index is None:
            raise IndexMismatch("the index is empty: index a catalog first (`vitrine index`)")
        return self.fusion, self.index

    def query_vector(
        self,
        text: str | None = None,
        image: bytes | str | Path | None = None,
        listing_id: str | None = None,
    ) -> np.ndarray:
        """The fused vector of a query: a stored listing, or text and/or a photo."""
        fusion, index = self._require_ready()
        if listing_id is not None:
            if listing_id not in index:
                raise NotFound(f"unknown listing {listing_id!r}")
            return index.get([listing_id])
        if not (text and text.strip()) and image is None:
            raise InvalidInput("give a text, a photo or a listing id to search with")
        q = Listing(id="query", title=(text or "").strip(), image=image)
        emb = self.embed([q])
        if 0 in emb.problems and "image" in emb.vectors and image is not None:
            if 0 in emb.failed or not (text and text.strip()):
                raise ImageError(emb.problems[0].split("(", 1)[-1].split(")")[0])
        if 0 in emb.failed:
            raise InvalidInput(emb.problems[0])
        return self.fuse(emb)

    def search_vector(
        self,
        fused: np.ndarray,
        k: int = 10,
        *,
        category: str | None = None,
        exclude: str | None = None,
        labelled_only: bool = False,
    ) -> list[Neighbour]:
        """Nearest listings to one fused vector; scores are weighted mean cosines."""
        fusion, index = self._require_ready()
        norm = float(fusion.query_norm(fused.reshape(1, -1))[0]) or 1.0
        want = k + (1 if exclude else 0)
        fetch = want if category is None and not labelled_only else max(4 * want, 64)
        while True:
            hits = index.search(fused.reshape(1, -1), fetch)[0]
            out: list[Neighbour] = []
            for lid, s in hits:
                m = self.meta.get(lid)
                if m is None or lid == exclude:
                    continue
                if category is not None and m.category != category:
                    continue
                if labelled_only and not m.labelled:
                    continue
                out.append(Neighbour(lid, s / norm, m.category, m.title))
                if len(out) == k:
                    return out
            if fetch >= len(index):
                return out
            fetch = min(4 * fetch, len(index))

    def search(
        self,
        *,
        text: str | None = None,
        image: bytes | str | Path | None = None,
        listing_id: str | None = None,
        k: int = 10,
        category: str | None = None,
    ) -> list[Neighbour]:
        if not 1 <= k <= 1000:
            raise InvalidInput("k must be between 1 and 1000")
        fused = self.query_vector(text, image, listing_id)
        return self.search_vector(fused[0], k, category=category, exclude=listing_id)

    def vote_vector(self, fused: np.ndarray, *, exclude: str | None = None) -> Vote:
        """kNN vote for one fused vector among the labelled listings (late fusion)."""
        fusion, index = self._require_ready()
        s = self.settings
        pool = self.search_vector(
            fused, max(s.knn_pool, s.knn_k), exclude=exclude, labelled_only=True
        )
        if not pool:
            return Vote(None, 0.0, True, {}, [])
        cand = fusion.split(index.get([n.id for n in pool]))
        query = {k: v[0] for k, v in fusion.split(fused.reshape(1, -1)).items()}
        labels = [n.category or "" for n in pool]
        weights = {b.name: b.weight for b in fusion.blocks}
        category, conf, uncertain, scores = vote(
            query, cand, labels, weights,
            k=s.knn_k, temperature=s.knn_temperature, uncertain_below=s.uncertain_below,
        )
        return Vote(category, conf, uncertain, scores, pool[: s.knn_k])

    def classify(self, listing: Listing) -> Vote:
        """Category of a listing from its labelled neighbours, without indexing it."""
        return self.classify_many([listing])[0]

    def classify_many(
        self, listings: Sequence[Listing], progress: Progress | None = None
    ) -> list[Vote]:
        emb = self.embed(listings, progress)
        fused = self.fuse(emb)
        out = []
        for i, x in enumerate(listings):
            if i in emb.failed:
                out.append(Vote(None, 0.0, True, {}, []))
            else:
                out.append(self.vote_vector(fused[i], exclude=x.id))
        return out

    def classify_indexed(self, listing_id: str) -> Vote:
        """Vote for a listing already in the index, from its stored vector (itself excluded)."""
        fused = self.query_vector(listing_id=listing_id)
        return self.vote_vector(fused[0], exclude=listing_id)

    # --- persistence ----------------------------------------------------------------------
    def save(self, root: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write an atomic snapshot under ``root`` (see :func:`indexer.index.write_snapshot`).

        ``extra`` (JSON) is stored in the same snapshot, e.g. the replication log position the
        snapshot includes, so that the two can never disagree; read it with :func:`snapshot_extra`.
        """
        fusion, index = self._require_ready()

        def write(d: Path) -> None:
            if extra is not None:
                (d / "extra.json").write_text(json.dumps(extra))
            index.write(d)
            (d / "manifest.json").write_text(json.dumps(self.manifest(), indent=2))
            (d / "meta.json").write_text(
                json.dumps({k: asdict(v) for k, v in self.meta.items()})
            )
            with (d / "fusion.pkl").open("wb") as f:
                pickle.dump({"fusion": fusion, "lexical": self.lexical}, f)

        with self._write_lock:
            return write_snapshot(Path(root), write)

    @classmethod
    def load(
        cls, root: str | Path, settings: Settings, registry: ModelRegistry | None = None
    ) -> Vitrine:
        """Load the current snapshot; refuse one built with other encoders than configured."""
        snap = current_snapshot(Path(root))
        if snap is None:
            raise NotFound(f"no index snapshot in {root}: build one with `vitrine index`")
        self = cls(settings, registry)
        manifest = json.loads((snap / "manifest.json").read_text())
        for key, mine in (("text_model", self.text_spec), ("image_model", self.image_spec)):
            if manifest.get(key) != mine:
                raise IndexMismatch(
                    f"index in {root} was built with {key}={manifest.get(key)!r} but "
                    f"{mine!r} is configured (VITRINE_{key.upper()}); rebuild it or "
                    "configure the same model"
                )
        # The snapshot is written by vitrine itself into VITRINE_DATA_DIR; like any pickle it
        # must not come from an untrusted source.
        with (snap / "fusion.pkl").open("rb") as f:
            state = pickle.load(f)
        self.fusion, self.lexical = state["fusion"], state["lexical"]
        self.index = VectorIndex.read(snap, self._index_config())
        meta = json.loads((snap / "meta.json").read_text())
        self.meta = {k: ListingMeta(**v) for k, v in meta.items()}
        return self


def snapshot_extra(root: str | Path) -> dict[str, Any]:
    """The ``extra`` dict saved with the current snapshot under ``root`` ({} when none)."""
    snap = current_snapshot(Path(root))
    if snap is None or not (snap / "extra.json").is_file():
        return {}
    return dict(json.loads((snap / "extra.json").read_text()))
