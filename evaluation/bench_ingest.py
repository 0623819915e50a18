"""``vitrine bench ingest``: listings/s through decode -> encode -> fuse -> index.

The same listings are ingested twice in one run, into two copies of one seeded index: batched
(``Vitrine.upsert`` on a slice: the embed -> fuse -> index steps the ingestion workers run,
encoder batches of ``batch_size`` split over ``encode_lanes`` threads) and with a naive loop
that upserts one listing at a time. The two are **interleaved** in rounds (a slice batched,
the same slice one by one, next slice...) so that whatever else the machine is doing weighs on
both alike; the ratio is the headline number. Then the batched path once more in a single
lane, stage by stage, for the time of each stage.

``sweep=True`` adds the encoder speed grid: listings/s of each encoder per batch size and
torch thread count, on the same listings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from indexer.catalog import Listing, read_listings
from indexer.encoders.base import configure_torch
from indexer.encoders.registry import ModelRegistry
from indexer.images import image_limits, load_photo
from indexer.pipeline import Embedded, Vitrine, entries, lexical_text, semantic_text
from indexer.settings import Settings

CSV_NAME = "flipkart_com-ecommerce_sample_1050.csv"


def _seeded(settings: Settings, registry: ModelRegistry, seed_listings: list[Listing]) -> Vitrine:
    v = Vitrine(settings, registry)
    v.build(seed_listings)
    return v


def _ingest_batched(v: Vitrine, listings: Sequence[Listing], stages: dict[str, float]) -> None:
    """``Vitrine.upsert`` stage by stage (the same calls, each one timed)."""

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0

    registry = v.registry
    vectors: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    if v.text_spec:
        with stage("text_encode"):
            tenc = registry.text()
            if tenc is None:
                raise RuntimeError("text_model is off but the index has a text view")
            vectors["text"] = tenc.encode([semantic_text(x) for x in listings])
        present["text"] = np.ones(len(listings), bool)
    if v.lexical is not None:
        with stage("lexical_encode"):
            vectors["lexical"] = v.lexical.encode([lexical_text(x) for x in listings])
        present["lexical"] = np.ones(len(listings), bool)
    if v.image_spec:
        ienc = registry.image()
        if ienc is None:
            raise RuntimeError("image_model is off but the index has an image view")
        with stage("image_decode"):
            limits = image_limits(v.settings)
            imgs = [load_photo(x.image, limits) for x in listings]
        ok = [i for i, im in enumerate(imgs) if im is not None]
        img_vec = np.zeros((len(listings), ienc.dim), np.float32)
        if ok:
            with stage("image_encode"):
                img_vec[ok] = ienc.encode([imgs[i] for i in ok])
        vectors["image"] = img_vec
        present["image"] = np.isin(np.arange(len(listings)), ok)
    with stage("fuse"):
        fused = v.fuse(Embedded(vectors, present))
    with stage("index_upsert"):
        v.apply(entries(listings, fused))


def encoder_sweep(
    registry: ModelRegistry,
    v: Vitrine,
    listings: Sequence[Listing],
    batch_sizes: Sequence[int] = (1, 8, 32, 64),
    threads: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """listings/s of each encoder per (torch threads, batch size), decoding excluded."""
    cores = os.cpu_count() or 1
    threads = threads or sorted({1, cores})
    texts = [semantic_text(x) for x in listings]
    limits = image_limits(v.settings)
    imgs = [im for im in (load_photo(x.image, limits) for x in listings) if im is not None]
    encoders = {"text": registry.text() if v.text_spec else None,
                "image": registry.image() if v.image_spec else None}
    rows: list[dict[str, Any]] = []
    for t in threads:
        configure_torch(t)
        for bs in batch_sizes:
            row: dict[str, Any] = {"torch_threads": t, "batch_size": bs}
            for name, enc in encoders.items():
                # a backend text encoder runs one text per session run: no batch to sweep
                if enc is None or not hasattr(enc, "batch_size"):
                    continue
                items: list[Any] = list(texts if name == "text" else imgs)
                old = enc.batch_size
                enc.batch_size = bs
                try:
                    enc.encode(items[:bs])  # warm-up at this shape
                    t0 = time.perf_counter()
                    enc.encode(items)
                    row[f"{name}_per_s"] = round(len(items) / (time.perf_counter() - t0), 1)
                finally:
                    enc.batch_size = old
            rows.append(row)
    return rows


def run_ingest_bench(
    data: Path,
    settings: Settings,
    *,
    n: int = 200,
    seed_size: int = 70,
    rounds: int = 4,
    sweep: bool = False,
    sweep_batch_sizes: Sequence[int] = (1, 8, 32, 64),
    sweep_threads: Sequence[int] | None = None,
) -> dict[str, Any]:
    csv_path = data / CSV_NAME if data.is_dir() else data
    listings, _ = read_listings(csv_path)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(listings))
    seed = [listings[i] for i in order[:seed_size]]
    batch = [listings[i] for i in order[seed_size : seed_size + n]]
    registry = ModelRegistry(settings)
    registry.text(), registry.image()  # model loading is not ingest time

    batched = _seeded(settings, registry, seed)
    naive = _seeded(settings, registry, seed)
    batched_s = naive_s = 0.0
    rounds = max(1, min(rounds, len(batch)))
    for part in np.array_split(np.arange(len(batch)), rounds):
        chunk = [batch[i] for i in part]
        t0 = time.perf_counter()
        batched.upsert(chunk)  # the steps the ingestion workers run
        batched_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for x in chunk:
            naive.upsert([x])
        naive_s += time.perf_counter() - t0
    assert len(naive) == len(batched), "both runs must index the same listings"

    # the stages, one after the other in one lane (re-adding the same listings replaces them)
    stages: dict[str, float] = {}
    bs = settings.batch_size
    t0 = time.perf_counter()
    for start in range(0, len(batch), bs):
        _ingest_batched(batched, batch[start : start + bs], stages)
    serial_s = time.perf_counter() - t0

    result: dict[str, Any] = {
        "benchmark": "ingest",
        "listings": len(batch),
        "rounds": rounds,
        "batch_size": bs,
        "encode_lanes": batched.encode_lanes(len(batch) // rounds),
        "models": {"text": batched.text_spec, "image": batched.image_spec,
                   "lexical": batched.lexical is not None},
        "batched_listings_per_s": round(len(batch) / batched_s, 2),
        "one_by_one_listings_per_s": round(len(batch) / naive_s, 2),
        "speedup": round(naive_s / batched_s, 2),
        "target_speedup": 2.0,
        "one_lane_batched_listings_per_s": round(len(batch) / serial_s, 2),
        "stages_listings_per_s": {k: round(len(batch) / s, 1) for k, s in stages.items()},
        "stages_share": {k: round(s / serial_s, 3) for k, s in stages.items()},
        "torch_threads": settings.torch_threads or "all",
        "cpus": os.cpu_count(),
    }
    if sweep:
        result["encoder_sweep"] = encoder_sweep(registry, batched, batch[:128],
                                                sweep_batch_sizes, sweep_threads)
        configure_torch(settings.torch_threads)
    return result
