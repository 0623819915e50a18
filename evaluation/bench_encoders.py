"""``vitrine bench encoders``: every encoder x every installed backend, side by side.

For each encoder - the offline text and photo models with their real weights, and the hub
defaults' architectures (all-mpnet-base-v2, OpenCLIP ViT-B-32, Xception) with random weights
drawn from a fixed seed (speed does not depend on the values) - and each backend (PyTorch
eager, ``+onnx``, ``+onnx-int8``, ``+openvino``: :mod:`indexer.encoders.backends`):

* ``batch_per_s`` - items per second through the product's own batch path
  (``Vitrine.embed``: encoder batches, lanes, for one modality), photos decoded beforehand so
  that only encoding is timed;
* ``single_p50_ms`` / ``single_p99_ms`` - one item at a time on the query path (a listing
  title, or one decoded photo), as a search by words or by photo encodes it;
* ``cosine_mean`` / ``cosine_min`` - fidelity to PyTorch eager fp32 on the same items;
* for the offline models, ``fused_macro_f1``: ``vitrine bench core``'s cross-validated fused
  vote on the catalog with this encoder's vectors (the other modality on PyTorch), and its
  difference from PyTorch's.

Every row of one run shares the machine's state of the moment: compare ratios within a run.
"""

from __future__ import annotations

import gc
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexer.catalog import Listing, read_listings
from indexer.encoders.backends import BACKENDS, TORCH, split_backend, with_backend
from indexer.encoders.registry import ModelRegistry
from indexer.errors import ModelSpecError
from indexer.images import image_limits, load_photo
from indexer.pipeline import Embedded, Vitrine
from indexer.settings import Settings

CSV_NAME = "flipkart_com-ecommerce_sample_1050.csv"
# the hub defaults' photo architectures, built with random weights
HUB_IMAGE = {"open_clip:ViT-B-32@random": "OpenCLIP ViT-B-32 (random weights)",
             "timm:legacy_xception@random": "Xception (random weights)"}
MPNET = "all-mpnet-base-v2 architecture (random weights)"


@dataclass
class Encoder:
    name: str
    kind: str  # "text" or "image"
    spec: str  # PyTorch spec; a backend is appended
    offline: bool  # real weights: fidelity also as fused macro-F1


def random_mpnet(folder: Path, tokenizer_from: str | None) -> str:
    """A sentence-transformers model with all-mpnet-base-v2's architecture (MPNet base:
    12 layers, 768 wide, mean pooling, normalised) and seeded random weights, saved in
    ``folder``; the tokenizer is the offline MiniLM's (BERT word pieces, ids within MPNet's
    vocabulary). Same seed, same files: its exports are cached like a real model's."""
    import torch
    from sentence_transformers import SentenceTransformer, models  # type: ignore[attr-defined]
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    st_dir = folder / "mpnet-random"
    if (st_dir / "modules.json").exists():
        return str(st_dir)
    if tokenizer_from is None:
        raise ModelSpecError("the random MPNet needs a local tokenizer (the offline text model)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        raw = folder / "mpnet-raw"
        MPNetModel(MPNetConfig()).save_pretrained(raw)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(raw)
    word = models.Transformer(str(raw), max_seq_length=256)
    SentenceTransformer(modules=[word, models.Pooling(768), models.Normalize()]).save(
        str(st_dir))
    return str(st_dir)


def available_backends(wanted: list[str] | None) -> list[str]:
    from indexer.encoders.backends import require

    out = [TORCH]
    for b in BACKENDS:
        if wanted is not None and b not in wanted:
            continue
        try:
            require(b, b)
        except ModelSpecError:
            continue
        out.append(b)
    return out


def _percentiles(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _measure(enc_spec: str, kind: str, settings: Settings, listings: list[Listing],
             queries: list[Any], singles: int) -> dict[str, Any]:
    """Batch throughput through Vitrine.embed, single-item latency, the vectors."""
    s = settings.model_copy(update={
        "text_model": enc_spec if kind == "text" else "none",
        "image_model": enc_spec if kind == "image" else "none",
        "lexical": False,
    })
    registry = ModelRegistry(s)
    t0 = time.perf_counter()
    enc = registry.get(kind, enc_spec)
    load_s = time.perf_counter() - t0
    v = Vitrine(s, registry)
    v.embed(listings[: 2 * s.batch_size * 2])  # warm-up: first calls allocate
    t0 = time.perf_counter()
    emb = v.embed(listings)
    batch_s = time.perf_counter() - t0
    vectors = emb.vectors[kind]
    for q in queries[:5]:
        enc.encode([q])
    lat = []
    for i in range(singles):
        q = queries[i % len(queries)]
        t0 = time.perf_counter()
        enc.encode([q])
        lat.append(time.perf_counter() - t0)
    p50, p99 = _percentiles(lat)
    del v, enc, registry
    gc.collect()
    return {"load_s": round(load_s, 2), "batch_per_s": round(len(listings) / batch_s, 2),
            "single_p50_ms": round(p50, 2), "single_p99_ms": round(p99, 2),
            "vectors": vectors}


def run_encoders_bench(
    data: Path, settings: Settings, *, n: int = 256, singles: int = 100,
    backends: list[str] | None = None, include: list[str] | None = None,
    limit: int | None = None, progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """See the module docstring. ``n``: items per random-weight model (the offline models
    take the whole catalog, which their macro-F1 needs; ``limit``: only its first rows);
    ``include``: any of ``offline``, ``hub``."""
    from evaluation.bench_core import cross_validate

    include = include or ["offline", "hub"]
    listings, _ = read_listings(data / CSV_NAME, require_category=True)
    listings = listings[:limit] if limit else listings
    limits = image_limits(settings)
    photos: list[Listing] = []
    for x in listings:  # decoded once: the batch measure times encoding, not JPEG decoding
        try:
            im = load_photo(x.image, limits)
        except Exception:  # noqa: BLE001 - an unusable photo is simply left out here
            im = None
        if im is not None:
            photos.append(replace(x, image=im))
    titles = [x.title for x in listings if x.title]
    texts_only = [replace(x, image=None) for x in listings]
    backends_run = available_backends(backends)

    scratch = tempfile.TemporaryDirectory(prefix="vitrine-bench-enc-")  # the random MPNet
    tmp = Path(scratch.name)
    text_spec, image_spec = split_backend(settings.text_model)[0], \
        split_backend(settings.image_model)[0]
    encoders: list[Encoder] = []
    local_text = Path(text_spec).expanduser().exists()
    if "offline" in include:
        if local_text:
            encoders.append(Encoder(Path(text_spec).name + " (offline)", "text", text_spec, True))
        if "@random" not in image_spec and image_spec.lower() not in {"", "none", "off"}:
            encoders.append(Encoder(image_spec.split("@")[0] + " (offline)", "image",
                                    image_spec, True))
    if "hub" in include:
        try:
            encoders.append(Encoder(MPNET, "text", random_mpnet(
                tmp, text_spec if local_text else None), False))
        except ModelSpecError as err:
            progress(f"skipping {MPNET}: {err}")
        encoders += [Encoder(name, "image", spec, False) for spec, name in HUB_IMAGE.items()]

    rows: list[dict[str, Any]] = []
    offline_vectors: dict[tuple[str, str], np.ndarray] = {}
    for e in encoders:
        items = (texts_only if e.kind == "text" else photos)
        items = items if e.offline else items[:n]
        queries: list[Any] = titles if e.kind == "text" else [
            load_photo(x.image, limits) for x in photos[:20]]
        reference: np.ndarray | None = None
        for b in backends_run:
            spec = with_backend(e.spec, b)
            progress(f"{e.name} [{b}]: {len(items)} items, {singles} single")
            try:
                m = _measure(spec, e.kind, settings, items, queries, singles)
            except ModelSpecError as err:
                progress(f"  skipped: {err}")
                continue
            vecs = m.pop("vectors")
            if b == TORCH:
                reference = vecs
            # no PyTorch reference (it failed to load): no fidelity to report
            cos = (vecs * reference).sum(axis=1) if reference is not None else None
            row = {"model": e.name, "kind": e.kind, "backend": b, "spec": spec, **m,
                   "cosine_mean": round(float(cos.mean()), 5) if cos is not None else None,
                   "cosine_min": round(float(cos.min()), 5) if cos is not None else None}
            rows.append(row)
            progress(f"  {row['batch_per_s']}/s, single p50 {row['single_p50_ms']} ms p99 "
                     f"{row['single_p99_ms']} ms, cosine {row['cosine_mean']}")
            if e.offline:
                offline_vectors[(e.kind, b)] = vecs
    # speed-up over PyTorch eager, within this run
    base = {r["model"]: r for r in rows if r["backend"] == TORCH}
    for r in rows:
        ref = base.get(r["model"])
        if ref:
            r["batch_speedup"] = round(r["batch_per_s"] / ref["batch_per_s"], 2)
            r["single_p50_speedup"] = round(ref["single_p50_ms"] / r["single_p50_ms"], 2)

    # fidelity where it matters: the fused vote with each backend's vectors
    if ("text", TORCH) in offline_vectors and ("image", TORCH) in offline_vectors:
        progress("fused macro-F1 per backend (5-fold cross-validated vote)")
        present_photo = {x.id for x in photos}
        text_rows = {x.id: i for i, x in enumerate(listings)}
        image_of = {x.id: i for i, x in enumerate(photos)}
        registry = ModelRegistry(settings)

        def f1(text_vecs: np.ndarray, image_vecs: np.ndarray) -> float:
            img = np.zeros((len(listings), image_vecs.shape[1]), np.float32)
            has = np.zeros(len(listings), bool)
            for x in listings:
                if x.id in present_photo:
                    img[text_rows[x.id]] = image_vecs[image_of[x.id]]
                    has[text_rows[x.id]] = True
            emb = Embedded({"text": text_vecs, "image": img},
                           {"text": np.ones(len(listings), bool), "image": has})
            res = cross_validate(listings, emb, settings, registry,
                                 variants={"fused": ("text", "lexical", "image")})
            return float(res["fused"]["macro_f1"])

        reference_f1 = f1(offline_vectors[("text", TORCH)], offline_vectors[("image", TORCH)])
        for r in rows:
            key = (r["kind"], r["backend"])
            if key not in offline_vectors or not r["model"].endswith("(offline)"):
                continue
            if r["backend"] == TORCH:
                score = reference_f1
            elif r["kind"] == "text":
                score = f1(offline_vectors[key], offline_vectors[("image", TORCH)])
            else:
                score = f1(offline_vectors[("text", TORCH)], offline_vectors[key])
            r["fused_macro_f1"] = round(score, 4)
            r["fused_macro_f1_delta"] = round(score - reference_f1, 4)
        best = {k: min((r for r in rows if r["kind"] == k and r["model"].endswith(
            "(offline)") and r["cosine_mean"] >= 0.99 and r.get(
            "fused_macro_f1_delta", -1) >= -0.003), key=lambda r: -r["batch_per_s"],
            default=None) for k in ("text", "image")}
        if best["text"] and best["image"]:
            progress("fused macro-F1 of the fastest faithful pair")
            score = f1(offline_vectors[("text", best["text"]["backend"])],
                       offline_vectors[("image", best["image"]["backend"])])
            pair = {"text": best["text"]["spec"], "image": best["image"]["spec"],
                    "fused_macro_f1": round(score, 4),
                    "fused_macro_f1_delta": round(score - reference_f1, 4)}
        else:
            pair = None
    else:
        pair = None

    scratch.cleanup()
    return {
        "bench": "encoders",
        "results": rows,
        "fastest_faithful_pair": pair,
        "faithful_means": "cosine_mean >= 0.99 and fused macro-F1 within 0.003 of PyTorch",
        "settings": {"batch_size": settings.batch_size,
                     "threads": settings.torch_threads or "all",
                     "encode_lanes": settings.encode_lanes or "one per thread",
                     "random_model_items": n, "single_items": singles,
                     "catalog_listings": len(listings)},
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor()
                    or platform.machine(), "python": platform.python_version()},
    }
