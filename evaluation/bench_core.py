"""``vitrine bench core``: cross-validated kNN voting per modality and fused, plus speed.

Each listing is embedded once (timed: that is the encoder throughput). Then, for each of the
stratified folds, everything that is *fitted* is fitted on the training part only (the
TF-IDF/LSA vocabulary and basis, the centring means), the training listings are indexed,
and every held-out listing is voted by its labelled neighbours, exactly as
``Vitrine.classify`` would. Predictions are pooled over the folds into one macro-F1.

Beside the variants, a **reference** that is not the product: a multinomial logistic
regression trained on the same fused vectors of the same training folds (a "linear probe").
It answers "how far can these features go with a supervised model?", so a kNN result can be
read against the features' own ceiling rather than against an absolute number.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer.catalog import Listing, read_listings
from indexer.encoders.registry import ModelRegistry
from indexer.pipeline import Embedded, Vitrine, lexical_text
from indexer.settings import Settings

CSV_NAME = "flipkart_com-ecommerce_sample_1050.csv"

# the supervised reference's key in the results, and its inverse L2 strength (the fused rows
# are unit-norm blocks)
PROBE = "linear_probe_reference"
PROBE_C = 10.0

# name -> which blocks take part (the others get weight 0)
VARIANTS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "lexical": ("lexical",),
    "image": ("image",),
    "text+lexical": ("text", "lexical"),
    "fused": ("text", "lexical", "image"),
}


def _subset(emb: Embedded, rows: np.ndarray) -> Embedded:
    return Embedded(
        {k: v[rows] for k, v in emb.vectors.items()},
        {k: v[rows] for k, v in emb.present.items()},
    )


def cross_validate(
    listings: list[Listing],
    emb: Embedded,
    settings: Settings,
    registry: ModelRegistry,
    *,
    folds: int = 5,
    seed: int = 0,
    variants: dict[str, tuple[str, ...]] = VARIANTS,
) -> dict[str, dict[str, float]]:
    """Out-of-fold kNN voting per variant -> ``{variant: {accuracy, macro_f1, ...}}``.

    ``emb`` holds the ``text`` and ``image`` vectors of ``listings``; the lexical view is
    refitted inside each fold. When ``fused`` is among the variants, its vectors also train
    the linear-probe reference (key ``PROBE``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold

    y = np.array([x.category for x in listings])
    names = list(variants) + ([PROBE] if "fused" in variants else [])
    preds: dict[str, np.ndarray] = {name: np.empty(len(y), dtype=object) for name in names}
    confs: dict[str, np.ndarray] = {name: np.zeros(len(y)) for name in names}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(np.zeros(len(y)), y):
        lexical_owner = Vitrine(settings, registry)
        lexical_owner.fit_lexical([listings[i] for i in train])
        fold_emb = Embedded(dict(emb.vectors), dict(emb.present))
        if lexical_owner.lexical is not None:
            texts = [lexical_text(x) for x in listings]
            fold_emb.vectors["lexical"] = lexical_owner.lexical.encode(texts)
            fold_emb.present["lexical"] = np.array([bool(x.title or x.description)
                                                    for x in listings])
        for name, blocks in variants.items():
            if any(b not in fold_emb.vectors for b in blocks):
                continue
            weights = {
                f"{b}_weight": getattr(settings, f"{b}_weight") if b in blocks else 0.0
                for b in ("text", "lexical", "image")
            }
            v = Vitrine(settings.model_copy(update=weights), registry)
            v.lexical = lexical_owner.lexical
            v.build_from_embedded([listings[i] for i in train], _subset(fold_emb, train))
            assert v.fusion is not None
            fused = v.fusion.fuse(
                {k: fold_emb.vectors[k][test] for k in v.fusion.names},
                {k: fold_emb.present[k][test] for k in v.fusion.names},
            )
            for row, i in enumerate(test):
                vote = v.vote_vector(fused[row], exclude=listings[i].id)
                preds[name][i] = vote.category
                confs[name][i] = vote.confidence
            if name == "fused" and PROBE in names:
                seen = v.fusion.fuse(
                    {k: fold_emb.vectors[k][train] for k in v.fusion.names},
                    {k: fold_emb.present[k][train] for k in v.fusion.names},
                )
                clf = LogisticRegression(C=PROBE_C, max_iter=2000).fit(seen, y[train])
                proba = clf.predict_proba(fused)
                preds[PROBE][test] = clf.classes_[proba.argmax(axis=1)]
                confs[PROBE][test] = proba.max(axis=1)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        if preds[name][0] is None and not any(preds[name]):
            continue
        p = preds[name].astype(str)
        sure = confs[name] >= settings.uncertain_below
        out[name] = {
            "accuracy": float(accuracy_score(y, p)),
            # over the real categories only: a listing the variant cannot vote on (no photo
            # for "image") is a miss, not an extra "None" class dragging the average down
            "macro_f1": float(f1_score(y, p, average="macro", labels=sorted(set(y)))),
            "uncertain_share": float(1 - sure.mean()),
            "accuracy_when_certain": (
                float(accuracy_score(y[sure], p[sure])) if sure.any() else 0.0
            ),
        }
    return out


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def run_core_bench(
    data: Path,
    settings: Settings,
    *,
    folds: int = 5,
    limit: int | None = None,
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Run the whole benchmark and return its JSON-able result."""
    csv_path = data / CSV_NAME if data.is_dir() else data
    listings, bad = read_listings(csv_path, require_category=True)
    if limit:
        listings = listings[:limit]
    registry = ModelRegistry(settings)
    v = Vitrine(settings, registry)
    t0 = time.perf_counter()
    v.load_models()
    load_s = time.perf_counter() - t0

    # Encoder throughput, one modality at a time, on the whole catalog.
    speed: dict[str, Any] = {"model_load_s": round(load_s, 2)}
    text_only = Vitrine(settings.model_copy(update={"image_model": "none", "lexical": False}),
                        registry)
    t0 = time.perf_counter()
    emb_text = text_only.embed(listings)
    speed["text_listings_per_s"] = _rate(len(listings), time.perf_counter() - t0)
    image_only = Vitrine(settings.model_copy(update={"text_model": "none", "lexical": False}),
                         registry)
    t0 = time.perf_counter()
    emb_image = image_only.embed(listings)
    with_photo = int(emb_image.present.get("image", np.zeros(0)).sum())
    speed["image_listings_per_s"] = _rate(with_photo, time.perf_counter() - t0)
    speed["image_includes_decoding"] = True
    lex = Vitrine(settings, registry)
    t0 = time.perf_counter()
    lex.fit_lexical(listings)
    if lex.lexical is not None:
        lex.lexical.encode([lexical_text(x) for x in listings])
    speed["lexical_fit_and_encode_listings_per_s"] = _rate(len(listings),
                                                           time.perf_counter() - t0)

    emb = Embedded({**emb_text.vectors, **emb_image.vectors},
                   {**emb_text.present, **emb_image.present})
    # One 5-fold split is noisy at this size (a few listings move macro-F1 by 0.005), so the
    # CV is repeated with different shuffles and the mean is the headline number.
    t0 = time.perf_counter()
    runs = [cross_validate(listings, emb, settings, registry, folds=folds, seed=seed + r)
            for r in range(repeats)]
    cv_s = time.perf_counter() - t0
    cv = {
        name: {
            metric: round(float(np.mean([r[name][metric] for r in runs])), 4)
            for metric in runs[0][name]
        }
        | {"macro_f1_per_repeat": [round(r[name]["macro_f1"], 4) for r in runs]}
        for name in runs[0]
    }

    # Search and vote latency on the full catalog index.
    v.fit_lexical(listings)
    full = Embedded(dict(emb.vectors), dict(emb.present))
    if v.lexical is not None:
        full.vectors["lexical"] = v.lexical.encode([lexical_text(x) for x in listings])
        full.present["lexical"] = np.ones(len(listings), dtype=bool)
    v.build_from_embedded(listings, full)
    assert v.fusion is not None and v.index is not None
    fused = v.fusion.fuse(full.vectors, full.present)
    rng = np.random.default_rng(seed)
    qs = rng.choice(len(listings), size=min(300, len(listings)), replace=False)
    search_ms, vote_ms = [], []
    for i in qs:
        t0 = time.perf_counter()
        v.search_vector(fused[i], 10)
        search_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        v.vote_vector(fused[i], exclude=listings[i].id)
        vote_ms.append((time.perf_counter() - t0) * 1e3)

    def pct(xs: list[float]) -> dict[str, float]:
        return {"p50": round(float(np.percentile(xs, 50)), 3),
                "p99": round(float(np.percentile(xs, 99)), 3)}

    return {
        "benchmark": "core",
        "dataset": str(csv_path),
        "listings": len(listings),
        "bad_rows": len(bad),
        "models": {"text": v.text_spec, "image": v.image_spec, "lexical": v.use_lexical},
        "fusion": v.fusion.describe(),
        "knn": {"k": settings.knn_k, "pool": settings.knn_pool,
                "temperature": settings.knn_temperature,
                "uncertain_below": settings.uncertain_below},
        "cv": {"folds": folds, "repeats": repeats, "first_seed": seed,
               "seconds": round(cv_s, 1), "results": cv},
        "speed": speed,
        "latency_ms": {"index_size": len(v), "index_kind": v.index.kind,
                       "search_k10": pct(search_ms), "vote": pct(vote_ms)},
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch_threads": settings.torch_threads or "all"},
    }
