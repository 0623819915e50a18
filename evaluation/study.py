"""``vitrine evaluate``: the feasibility study end to end, as report.html + metrics.json.

Steps: features (text BoW / TF-IDF / sentence model, image ORB-BoVW / CNN, fused) ->
per feature set KMeans(7) ARI, Hungarian-matched confusion, t-SNE, cosine kNN (5-fold) ->
a separate, clearly supervised entry (KMeans on out-of-fold LDA scores of the fused features)
-> fine-tuned CNN classifier -> vitrine's kNN vote cross-validated -> suspects.
Encoder outputs are cached in ``cache_dir`` keyed by the listing ids and the model spec.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.catalog import Listing, read_listings
from indexer.encoders.registry import ModelRegistry
from indexer.images import ImageLimits, load_photo
from indexer.pipeline import Embedded, Vitrine, lexical_text, semantic_text
from indexer.settings import Settings

from . import features as F
from .classifier import CLASSIFIER_VERSION, ClassifierResult
from .metrics import adjusted_rand, match_clusters

log = logging.getLogger(__name__)
CSV_NAME = "flipkart_com-ecommerce_sample_1050.csv"


@dataclass
class StudyConfig:
    data: Path
    out: Path
    cache_dir: Path | None = None
    limit_per_category: int | None = None  # reduced runs (tests)
    epochs: int = 10
    views: int = 4  # cached augmented views of the training photos (see classifier.py)
    tsne: bool = True
    tsne_iter: int = 500
    folds: int = 5
    suspect_confidence: float = 0.8
    # sentence model and image encoder on an equal footing, TF-IDF as a lighter third view
    fusion_weights: dict[str, float] = field(
        default_factory=lambda: {"sentence": 1.0, "tfidf": 0.5, "cnn": 1.0})
    # PCA dimensions before KMeans; None: number of categories + 1 (spectral-clustering rule)
    cluster_dim: int | None = None
    kmeans_init: int = 10
    progress: bool = True
    seed: int = 0


def _bar(total: int, desc: str, enabled: bool) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


class Cache:
    """``<dir>/<name>-<hash>.npy``; the hash covers the listing ids and the producing spec."""

    def __init__(self, root: Path | None, ids: list[str]) -> None:
        self.root = root
        self.key = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
        if root:
            root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, spec: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        if self.root is None:
            return make()
        h = hashlib.sha1(f"{self.key}|{spec}".encode()).hexdigest()[:12]
        path = self.root / f"{name}-{h}.npy"
        if path.exists():
            return np.load(path)
        arr = make()
        np.save(path, arr)
        return arr

    def get_classifier(self, spec: str, make: Callable[[], ClassifierResult]
                       ) -> tuple[ClassifierResult, bool]:
        """The fine-tuned classifier's outcome (not its weights), cached like the features.
        Returns ``(result, loaded from the cache)``."""
        if self.root is None:
            return make(), False
        h = hashlib.sha1(f"{self.key}|{spec}".encode()).hexdigest()[:12]
        path = self.root / f"classifier-{h}.npz"
        if path.exists():
            with np.load(path) as z:
                meta = json.loads(str(z["meta"]))
                return ClassifierResult(
                    val_rows=z["val_rows"], val_pred=z["val_pred"], val_proba=z["val_proba"],
                    **meta), True
        r = make()
        meta = {"backbone": r.backbone, "val_accuracy": r.val_accuracy, "epochs": r.epochs,
                "history": r.history, "seconds": r.seconds, "views": r.views,
                "trained_from": r.trained_from}
        np.savez(path, val_rows=r.val_rows, val_pred=r.val_pred, val_proba=r.val_proba,
                 meta=np.array(json.dumps(meta)))
        return r, False


def load_catalog(data: Path, limit_per_category: int | None) -> list[Listing]:
    csv = data / CSV_NAME if data.is_dir() else data
    if not csv.exists():
        found = sorted(data.glob("*.csv")) if data.is_dir() else []
        if not found:
            raise FileNotFoundError(f"no catalog CSV in {data}")
        csv = found[0]
    listings, _ = read_listings(csv)
    listings = [x for x in listings if x.category]
    if limit_per_category:
        per: dict[str, int] = {}
        keep = []
        for x in listings:
            cat = x.category
            if cat is None:  # never: filtered out above
                continue
            if per.get(cat, 0) < limit_per_category:
                per[cat] = per.get(cat, 0) + 1
                keep.append(x)
        listings = keep
    return listings


def load_images(listings: list[Listing], progress: bool) -> list[Any]:
    """Decoded photos, shrunk to 384 px max side (enough for 224/299 px models and ORB)."""
    out: list[Any] = []
    with _bar(len(listings), "photos", progress) as bar:
        for x in listings:
            try:
                im = load_photo(x.image, ImageLimits())
                if im is not None:
                    if im is x.image:  # given decoded: shrunk next, so not in place
                        im = im.copy()
                    im.thumbnail((384, 384))
            except Exception as e:  # noqa: BLE001 - a bad photo is reported, not fatal
                log.warning("photo of %s unusable: %s", x.id, e)
                im = None
            out.append(im)
            bar.update(1)
    return out


def _image_name(image: object) -> str:
    """The photo's file name; "" when there is none or it is not a file."""
    return Path(image).name if isinstance(image, str | Path) and image else ""


def _blank_like(images: list[Any]) -> list[Any]:
    from PIL import Image

    return [im if im is not None else Image.new("RGB", (224, 224), "white") for im in images]


def run_study(cfg: StudyConfig, settings: Settings,
              registry: ModelRegistry | None = None) -> dict[str, Any]:
    from sklearn.cluster import KMeans

    from . import report
    from .bench_core import (
        confidence_report,
        out_of_catalog_report,
        out_of_catalog_votes,
        path_accuracy,
    )
    from .classifier import fine_tune
    from .knn_cv import cosine_knn_cv, path_vote_cv, title_only

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    registry = registry or ModelRegistry(settings)
    listings = load_catalog(cfg.data, cfg.limit_per_category)
    ids = [x.id for x in listings]
    y = np.array([x.category for x in listings])
    names = sorted(set(y))
    y_idx = np.array([names.index(c) for c in y])
    cache = Cache(cfg.cache_dir, ids)
    images = _blank_like(load_images(listings, cfg.progress))
    has_photo = np.array([x.image is not None for x in listings])
    texts = [F.study_text(x.title, x.description) for x in listings]
    timings["load"] = time.perf_counter() - t0

    # --- features -------------------------------------------------------------------------
    t = time.perf_counter()
    feats: dict[str, np.ndarray] = {}
    feats["bow"] = F.bow_features(texts)
    feats["tfidf"] = F.tfidf_features(texts)

    def encode_text() -> np.ndarray:
        enc = registry.get("text", settings.text_model)
        with _bar(len(listings), "sentence model", cfg.progress) as bar:
            return enc.encode([semantic_text(x) for x in listings], progress=bar.update)

    def encode_image() -> np.ndarray:
        enc = registry.get("image", settings.image_model)
        with _bar(len(listings), "image model", cfg.progress) as bar:
            return enc.encode(images, progress=bar.update)

    def orb() -> np.ndarray:
        with _bar(len(listings), "ORB descriptors", cfg.progress) as bar:
            desc = []
            for i in range(0, len(images), 50):
                desc.extend(F.orb_descriptors(images[i : i + 50]))
                bar.update(len(images[i : i + 50]))
        return F.bovw_features(desc, seed=cfg.seed)

    def encode_titles() -> np.ndarray:
        enc = registry.get("text", settings.text_model)
        with _bar(len(listings), "sentence model, titles", cfg.progress) as bar:
            return enc.encode([semantic_text(x) for x in title_only(listings)],
                              progress=bar.update)

    feats["sentence"] = cache.get("sentence", settings.text_model, encode_text)
    titles = cache.get("title_sentence", settings.text_model, encode_titles)
    feats["orb_bovw"] = cache.get("orb_bovw", "orb400-bovw256-v1", orb)
    feats["cnn"] = cache.get("cnn", settings.image_model, encode_image)
    fused = F.fuse_blocks({k: feats[k] for k in cfg.fusion_weights}, cfg.fusion_weights)
    feats["fused"] = fused
    timings["features"] = time.perf_counter() - t

    # --- unsupervised: KMeans ARI, confusion, t-SNE, kNN --------------------------------
    t = time.perf_counter()
    per_feature: dict[str, dict[str, Any]] = {}
    k = len(names)
    cdim = cfg.cluster_dim or k + 1
    with _bar(len(feats), "KMeans / t-SNE / kNN", cfg.progress) as bar:
        for name, x in feats.items():
            z = F.spectral_embed(x, cdim) if x.shape[1] > cdim else x
            clusters = KMeans(k, n_init=cfg.kmeans_init, random_state=cfg.seed).fit_predict(z)
            mapping, confusion, _ = match_clusters(list(y), list(clusters))
            entry: dict[str, Any] = {
                "ari": adjusted_rand(list(y), list(clusters)),
                "matched_accuracy": float(np.trace(confusion) / len(y)),
                "dim": int(x.shape[1]),
                **cosine_knn_cv(x, y, folds=cfg.folds, seed=cfg.seed),
                "_clusters": clusters, "_confusion": confusion,
            }
            if cfg.tsne:
                entry["_xy"] = tsne(x, cfg.tsne_iter, cfg.seed)
            per_feature[name] = entry
            bar.update(1)
    timings["clustering"] = time.perf_counter() - t

    # --- SUPERVISED projection of the fused features (a separate, labelled entry) -------
    t = time.perf_counter()
    scores, _ = F.oof_lda_scores(fused, y, folds=cfg.folds, seed=cfg.seed)
    sp_clusters = KMeans(k, n_init=cfg.kmeans_init, random_state=cfg.seed).fit_predict(scores)
    _, sp_confusion, _ = match_clusters(list(y), list(sp_clusters))
    supervised_projection: dict[str, Any] = {
        "ari": adjusted_rand(list(y), list(sp_clusters)),
        "matched_accuracy": float(np.trace(sp_confusion) / len(y)),
        "supervised": True,
        "folds": cfg.folds,
        "oof_lda_accuracy": float(np.mean(np.array(names)[scores.argmax(axis=1)] == y)),
        "method": (
            f"SUPERVISED, not clustering discovery: the fused features are mapped by a "
            f"shrinkage LDA (Ledoit-Wolf) fitted on the real categories of the other "
            f"{cfg.folds - 1} of {cfg.folds} stratified folds (each listing mapped by a model "
            "that never saw its label) to one discriminant score per category; the scores "
            f"are row-centred, L2-normalised and clustered by KMeans({k})."),
    }
    timings["supervised_projection"] = time.perf_counter() - t

    # --- supervised: fine-tuned CNN ---------------------------------------------------
    t = time.perf_counter()
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    photo_rows = rows[has_photo]
    tr, va = train_test_split(photo_rows, test_size=0.2, stratify=y_idx[photo_rows],
                              random_state=cfg.seed)
    clf_spec = (f"{settings.image_model}|epochs={cfg.epochs}|views={cfg.views}|"
                f"seed={cfg.seed}|{CLASSIFIER_VERSION}|train={','.join(map(str, tr))}")

    def train() -> ClassifierResult:
        with _bar(0, f"fine-tune {settings.image_model.split('@')[0]}", cfg.progress) as bar:

            def set_total(n: int) -> None:
                bar.total = n
                bar.refresh()

            return fine_tune(images, y_idx, tr, va, settings.image_model, n_classes=k,
                             epochs=cfg.epochs, views=cfg.views, seed=cfg.seed,
                             progress=bar.update, on_total=set_total)

    clf, clf_cached = cache.get_classifier(clf_spec, train)
    clf_confusion = np.zeros((k, k), dtype=np.int64)
    for a, b in zip(y_idx[va], clf.val_pred, strict=True):
        clf_confusion[a, b] += 1
    timings["classifier"] = time.perf_counter() - t

    # --- vitrine's kNN vote, cross-validated ------------------------------------------
    t = time.perf_counter()
    emb = Embedded(
        {"text": feats["sentence"], "image": feats["cnn"]},
        {"text": np.ones(len(y), bool), "image": has_photo.copy()},
    )
    # out-of-fold votes of whole listings and of title-only copies (each fold's index
    # fitting its own lexical view, centring and calibration): the first level for the
    # study's comparison, the paths and the confidence for the section on them
    votes = path_vote_cv(listings, emb, Embedded({"text": titles},
                                                 {"text": np.ones(len(y), bool)}),
                         settings, registry, folds=cfg.folds, seed=cfg.seed)
    vote_pred = np.array([v.category or "" for v in votes["full"]])
    vote_conf = np.array([v.confidence for v in votes["full"]])
    from sklearn.metrics import accuracy_score, f1_score

    knn_cv = {"accuracy": float(accuracy_score(y, vote_pred)),
              "macro_f1": float(f1_score(y, vote_pred, average="macro", labels=names)),
              "folds": cfg.folds}
    vote_confusion = np.zeros((k, k), dtype=np.int64)
    for a, b in zip(y, vote_pred, strict=True):
        if b in names:
            vote_confusion[names.index(a), names.index(b)] += 1
    paths = {mode: {"paths": path_accuracy(listings, vs), "confidence":
                    confidence_report(listings, vs)} for mode, vs in votes.items()}
    # products of none of the catalog's categories, against an index of the whole catalog
    whole = Vitrine(settings, registry)
    whole.fit_lexical(listings)
    if whole.lexical is not None:
        emb.vectors["lexical"] = whole.lexical.encode([lexical_text(x) for x in listings])
        emb.present["lexical"] = np.array([bool(x.title or x.description) for x in listings])
    whole.build_from_embedded(listings, emb)
    out_of_catalog = out_of_catalog_report(*out_of_catalog_votes(whole))
    timings["knn_cv"] = time.perf_counter() - t

    # --- suspects -------------------------------------------------------------------
    suspect_rows = [i for i in range(len(y))
                    if vote_pred[i] != y[i] and vote_conf[i] >= cfg.suspect_confidence]
    suspect_rows.sort(key=lambda i: -vote_conf[i])
    suspects = [{
        "id": listings[i].id, "title": listings[i].title,
        "seller_category": y[i], "predicted": vote_pred[i],
        "confidence": round(float(vote_conf[i]), 3),
        "category_path": " >> ".join(listings[i].category_path),
        "image": _image_name(listings[i].image),
        "description": listings[i].description[:300],
        "_row": i,
    } for i in suspect_rows]

    metrics: dict[str, Any] = {
        "features": {n: {kk: v for kk, v in e.items() if not kk.startswith("_")}
                     for n, e in per_feature.items()},
        "fused": {"ari": per_feature["fused"]["ari"],
                  "supervised": False,
                  "blocks": cfg.fusion_weights,
                  "cluster_dim": cdim,
                  "knn_accuracy": per_feature["fused"]["knn_accuracy"],
                  "method": (
                      "unsupervised: each block centred and L2-normalised, weighted, "
                      f"concatenated, L2-normalised; PCA to {cdim} dimensions, rows "
                      f"re-normalised; KMeans({k}, n_init={cfg.kmeans_init})")},
        "fused_supervised_projection": supervised_projection,
        "classifier": {"backbone": settings.image_model, "val_accuracy": clf.val_accuracy,
                       "ari": adjusted_rand(list(y_idx[va]), list(clf.val_pred)),
                       "epochs": clf.epochs, "cached_views": clf.views,
                       "trained_from": clf.trained_from, "test_time_flip": True,
                       "epoch_selection": "none (fixed schedule, validation scored once)",
                       "split": f"stratified 80/20, random_state={cfg.seed}",
                       "train_size": int(len(tr)),
                       "val_size": int(len(va)), "seconds": round(clf.seconds, 1),
                       "from_cache": clf_cached},
        "knn_cv": knn_cv,
        "paths": {"folds": cfg.folds, "path_min_share": settings.path_min_share,
                  "ooc_quantile": settings.ooc_quantile, **paths},
        "out_of_catalog": out_of_catalog,
        "suspects": len(suspects),
        "dataset": {"listings": len(y), "categories": names,
                    "with_photo": int(has_photo.sum())},
        "models": {"text": settings.text_model, "image": settings.image_model},
    }
    timings["total"] = time.perf_counter() - t0
    metrics["seconds"] = {kk: round(v, 1) for kk, v in timings.items()}

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report.write_suspects_csv(cfg.out / "suspects.csv", suspects)
    report.write_report(
        cfg.out / "report.html", metrics=metrics, per_feature=per_feature, y=y, names=names,
        clf_confusion=clf_confusion, vote_confusion=vote_confusion, suspects=suspects,
        sp_confusion=sp_confusion,
        images=images, listings=listings, preprocessing=F.PREPROCESSING,
        history=clf.history,
    )
    return metrics


def tsne(x: np.ndarray, n_iter: int, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    z = F.spectral_embed(x, 50) if x.shape[1] > 50 else x
    perplexity = float(min(30, max(5, (len(x) - 1) // 4)))
    try:
        t = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, max_iter=n_iter,
                 metric="cosine")
    except TypeError:  # scikit-learn < 1.5
        t = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, n_iter=n_iter,
                 metric="cosine")
    return t.fit_transform(z).astype(np.float32)
