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

from evaluation.knn_cv import path_vote_cv, title_only
from indexer.calibration import reliability
from indexer.catalog import Listing, read_listings, taxonomy_path
from indexer.encoders.registry import ModelRegistry
from indexer.knn import Vote
from indexer.pipeline import Embedded, Vitrine, lexical_text
from indexer.settings import Settings

CSV_NAME = "flipkart_com-ecommerce_sample_1050.csv"
# hand-written listings of other marketplace categories (text only): the out-of-catalog test
OUT_OF_CATALOG = Path(__file__).parent / "data" / "out_of_catalog.csv"
PATH_DEPTHS = 4  # path levels reported
# confidence thresholds the operating-point table shows (uncertain_below is one of them)
OPERATING_POINTS = (0.5, 0.6, 0.7, 0.8, 0.9)

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
            # the variants compare first-level votes on raw shares (as before calibration)
            v.build_from_embedded([listings[i] for i in train], _subset(fold_emb, train),
                                  calibrate=False)
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


def path_accuracy(listings: list[Listing], votes: list[Vote],
                  depths: int = PATH_DEPTHS) -> dict[str, dict[str, float]]:
    """Per depth ``L``, over the listings whose true taxonomy path has ``L`` levels or more:
    ``accuracy`` (the first ``L`` predicted levels equal the truth; a path that stopped
    above ``L`` is wrong), ``coverage`` (the prediction went ``L`` deep) and
    ``accuracy_when_covered``."""
    truth = [taxonomy_path(x.category_path, x.title) for x in listings]
    out: dict[str, dict[str, float]] = {}
    for depth in range(1, depths + 1):
        rows = [i for i, t in enumerate(truth) if len(t) >= depth]
        if not rows:
            break
        right = np.array([tuple(votes[i].category_path[:depth]) == truth[i][:depth]
                          for i in rows])
        deep = np.array([len(votes[i].category_path) >= depth for i in rows])
        out[f"level_{depth}"] = {
            "listings": len(rows), "accuracy": float(right.mean()),
            "coverage": float(deep.mean()),
            "accuracy_when_covered": float(right[deep].mean()) if deep.any() else 0.0,
        }
    return out


def confidence_report(listings: list[Listing], votes: list[Vote]) -> dict[str, Any]:
    """ECE and reliability curve of the raw vote share and of the calibrated confidence;
    the share of listings kept confident (not ``uncertain``) and how often those are right;
    why the others were flagged."""
    ok = np.array([v.category == x.category for v, x in zip(votes, listings, strict=True)])
    raw_ece, raw_curve = reliability([v.raw_confidence for v in votes], ok)
    cal_ece, cal_curve = reliability([v.confidence for v in votes], ok)
    sure = np.array([not v.uncertain for v in votes])
    reasons: dict[str, int] = {}
    for v in votes:
        if v.uncertain_reason:
            reasons[v.uncertain_reason] = reasons.get(v.uncertain_reason, 0) + 1
    return {
        "ece_raw": raw_ece, "ece_calibrated": cal_ece,
        "reliability_raw": raw_curve, "reliability_calibrated": cal_curve,
        "confident_coverage": float(sure.mean()),
        "confident_precision": float(ok[sure].mean()) if sure.any() else 0.0,
        "uncertain_reasons": reasons,
    }


def operating_points(votes: list[Vote], right: np.ndarray, ooc: list[Vote]
                     ) -> list[dict[str, float]]:
    """In-catalog confident coverage and precision, and the out-of-catalog share flagged,
    had ``uncertain_below`` been each of :data:`OPERATING_POINTS` (the out-of-catalog test
    unchanged)."""
    def flagged(v: Vote, below: float) -> bool:
        return v.uncertain_reason in ("out_of_catalog", "no_neighbours") or v.confidence < below

    rows = []
    for below in OPERATING_POINTS:
        sure = np.array([not flagged(v, below) for v in votes])
        rows.append({
            "uncertain_below": below,
            "confident_coverage": round(float(sure.mean()), 4),
            "confident_precision": round(float(right[sure].mean()), 4) if sure.any() else 0.0,
            "out_of_catalog_flagged": round(float(np.mean([flagged(v, below) for v in ooc])),
                                            4) if ooc else 0.0,
        })
    return rows


def out_of_catalog_votes(v: Vitrine) -> tuple[list[Listing], dict[str, list[Vote]]]:
    """The hand-written out-of-catalog products (:data:`OUT_OF_CATALOG`) voted against
    ``v`` (an index of the whole catalog, with its calibration), whole and by title only."""
    ooc, _ = read_listings(OUT_OF_CATALOG)
    return ooc, {"full": v.classify_many(ooc), "title": v.classify_many(title_only(ooc))}


def out_of_catalog_report(ooc: list[Listing], votes: dict[str, list[Vote]]
                          ) -> dict[str, Any]:
    """How many of the out-of-catalog products were flagged ``uncertain``, why, and the
    ones that were not (what a confident wrong category looks like)."""
    return {
        "listings": len(ooc), "data": str(OUT_OF_CATALOG.name),
        **{f"flagged_{mode}": round(float(np.mean([x.uncertain for x in vs])), 4)
           for mode, vs in votes.items()},
        "reasons": {mode: {r: sum(x.uncertain_reason == r for x in vs)
                           for r in ("out_of_catalog", "low_confidence", "no_neighbours")}
                    for mode, vs in votes.items()},
        "missed": [{"title": x.title, "category": vt.category,
                    "confidence": round(vt.confidence, 3)}
                   for x, vt in zip(ooc, votes["full"], strict=True) if not vt.uncertain],
    }


def _mean_dicts(runs: list[Any]) -> Any:
    """Element-wise mean of equally shaped JSON-like results (numbers averaged)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _mean_dicts([r[k] for r in runs]) for k in first}
    if isinstance(first, list):
        # lists of rows (curves, operating points) average row by row when the runs have
        # the same rows; a reliability curve whose empty bins differ is the first run's
        same = all(len(r) == len(first) for r in runs) and all(
            [row.get("lo") for row in r] == [row.get("lo") for row in first] for r in runs)
        return [_mean_dicts([r[i] for r in runs]) for i in range(len(first))] if same \
            else first
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    return round(float(np.mean(runs)), 4)


def reduction_cost(
    listings: list[Listing],
    emb: Embedded,
    settings: Settings,
    registry: ModelRegistry,
    *,
    folds: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """What the approximate index's reduction (``ann_reduce``) costs the fused vote.

    The catalog is below ``exact_max``, so the approximate kind is forced (``exact_max=0``)
    twice, with the vectors whole and reduced: the difference is the reduction's alone (an
    IVF over a few hundred listings loses some neighbours of its own, in both).
    """
    fused = {"fused_vote": VARIANTS["fused"]}
    out: dict[str, Any] = {}
    for name, reduce in (("ann_whole", "none"), ("ann_reduced", settings.ann_reduce)):
        s = settings.model_copy(update={"exact_max": 0, "ann_reduce": reduce})
        runs = [cross_validate(listings, emb, s, registry, folds=folds, seed=seed + r,
                               variants=fused)["fused_vote"] for r in range(repeats)]
        out[name] = {
            "ann": settings.ann, "reduce": reduce,
            "macro_f1": round(float(np.mean([r["macro_f1"] for r in runs])), 4),
            "macro_f1_per_repeat": [round(r["macro_f1"], 4) for r in runs],
        }
    out["cost_macro_f1"] = round(out["ann_whole"]["macro_f1"] - out["ann_reduced"]["macro_f1"],
                                 4)
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
    emb_titles = text_only.embed(title_only(listings))
    # One 5-fold split is noisy at this size (a few listings move macro-F1 by 0.005), so the
    # CV is repeated with different shuffles and the mean is the headline number.
    t0 = time.perf_counter()
    runs = [cross_validate(listings, emb, settings, registry, folds=folds, seed=seed + r)
            for r in range(repeats)]
    cv_s = time.perf_counter() - t0
    reduction = reduction_cost(listings, emb, settings, registry, folds=folds,
                               repeats=repeats, seed=seed)
    cv = {
        name: {
            metric: round(float(np.mean([r[name][metric] for r in runs])), 4)
            for metric in runs[0][name]
        }
        | {"macro_f1_per_repeat": [round(r[name]["macro_f1"], 4) for r in runs]}
        for name in runs[0]
    }

    # Category paths and calibrated confidence: out-of-fold votes of whole listings and of
    # title-only copies, each fold's index fitting its own calibration.
    t0 = time.perf_counter()
    path_runs = [path_vote_cv(listings, emb, emb_titles, settings, registry, folds=folds,
                              seed=seed + r) for r in range(repeats)]
    paths_s = time.perf_counter() - t0

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

    ooc, ooc_votes = out_of_catalog_votes(v)
    in_catalog = {
        mode: {
            "paths": _mean_dicts([path_accuracy(listings, r[mode]) for r in path_runs]),
            "confidence": _mean_dicts([confidence_report(listings, r[mode])
                                       for r in path_runs]),
            "operating_points": _mean_dicts([
                operating_points(r[mode], np.array([x.category == vt.category for x, vt in
                                                    zip(listings, r[mode], strict=True)]),
                                 ooc_votes[mode]) for r in path_runs]),
        }
        for mode in ("full", "title")
    }
    out_of_catalog = out_of_catalog_report(ooc, ooc_votes)

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
        # the approximate index with and without its reduction, on the same folds
        "reduction": reduction,
        # the "fused" product vote, out of fold, on whole listings and on title-only copies
        "paths": {"folds": folds, "repeats": repeats, "seconds": round(paths_s, 1),
                  "path_min_share": settings.path_min_share,
                  "ooc_quantile": settings.ooc_quantile, **in_catalog},
        "out_of_catalog": out_of_catalog,
        "speed": speed,
        "latency_ms": {"index_size": len(v), "index_kind": v.index.kind,
                       "search_k10": pct(search_ms), "vote": pct(vote_ms)},
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch_threads": settings.torch_threads or "all"},
    }
