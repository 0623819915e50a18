"""``vitrine bench ingest``: listings/s through decode -> encode -> fuse -> index.

The same listings are ingested twice in one run, into two copies of one seeded index: in
batches (the way ``Vitrine.upsert`` and the workers do it) with the time of each stage, and
with a naive loop that upserts one listing at a time. The ratio is the headline number.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from indexer.catalog import read_listings
from indexer.encoders.registry import ModelRegistry
from indexer.pipeline import Embedded, Vitrine, lexical_text, semantic_text
from indexer.settings import Settings

CSV_NAME = "flipkart_com-ecommerce_sample_1050.csv"


def _seeded(settings: Settings, registry: ModelRegistry, seed_listings: list) -> Vitrine:
    v = Vitrine(settings, registry)
    v.build(seed_listings)
    return v


def run_ingest_bench(
    data: Path, settings: Settings, *, n: int = 200, seed_size: int = 70
) -> dict[str, Any]:
    csv_path = data / CSV_NAME if data.is_dir() else data
    listings, _ = read_listings(csv_path)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(listings))
    seed = [listings[i] for i in order[:seed_size]]
    batch = [listings[i] for i in order[seed_size : seed_size + n]]
    registry = ModelRegistry(settings)
    registry.text(), registry.image()  # model loading is not ingest time

    # Batched, stage by stage (the same calls Vitrine.embed makes, timed separately).
    v = _seeded(settings, registry, seed)
    stages: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0

    bs = settings.batch_size
    t_all = time.perf_counter()
    for start in range(0, len(batch), bs):
        chunk = batch[start : start + bs]
        vectors: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        if v.text_spec:
            with stage("text_encode"):
                vectors["text"] = registry.text().encode([semantic_text(x) for x in chunk])
            present["text"] = np.ones(len(chunk), bool)
        if v.lexical is not None:
            with stage("lexical_encode"):
                vectors["lexical"] = v.lexical.encode([lexical_text(x) for x in chunk])
            present["lexical"] = np.ones(len(chunk), bool)
        if v.image_spec:
            ienc = registry.image()
            with stage("image_decode"):
                imgs = [v._decode(x) for x in chunk]
            ok = [i for i, im in enumerate(imgs) if im is not None]
            img_vec = np.zeros((len(chunk), ienc.dim), np.float32)
            if ok:
                with stage("image_encode"):
                    img_vec[ok] = ienc.encode([imgs[i] for i in ok])
            vectors["image"] = img_vec
            present["image"] = np.isin(np.arange(len(chunk)), ok)
        with stage("fuse"):
            fused = v.fuse(Embedded(vectors, present))
        with stage("index_upsert"):
            v._add(chunk, fused, set())
    batched_s = time.perf_counter() - t_all

    # Naive: one listing per upsert call, into a fresh copy of the same seeded index.
    naive = _seeded(settings, registry, seed)
    t0 = time.perf_counter()
    for x in batch:
        naive.upsert([x])
    naive_s = time.perf_counter() - t0
    assert len(naive) == len(v), "both runs must index the same listings"

    return {
        "benchmark": "ingest",
        "listings": len(batch),
        "batch_size": bs,
        "models": {"text": v.text_spec, "image": v.image_spec, "lexical": v.lexical is not None},
        "batched_listings_per_s": round(len(batch) / batched_s, 2),
        "one_by_one_listings_per_s": round(len(batch) / naive_s, 2),
        "speedup": round(naive_s / batched_s, 2),
        "stages_listings_per_s": {k: round(len(batch) / s, 1) for k, s in stages.items()},
        "stages_share": {k: round(s / batched_s, 3) for k, s in stages.items()},
        "torch_threads": settings.torch_threads or "all",
    }
