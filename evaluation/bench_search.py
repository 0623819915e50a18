"""``vitrine bench search``: index types side by side on clustered synthetic vectors.

Data with the structure of real embeddings, not uniform noise: cluster centres drawn on the
sphere, cluster sizes from a Zipf law (a marketplace has a few huge categories and a long
tail), and within-cluster noise of low intrinsic dimension (most of the variance in a few
directions, as in sentence and CLIP embeddings). Queries are fresh points from the same
distribution, never in the index. Ground truth is exact inner-product search in the same
run (``faiss.knn``: brute force, no index, no copy of the data), recall@k is
``faiss.contrib.evaluation.knn_intersection_measure``, and every index type is measured on the
same data and queries.

``--product`` (:func:`run_product_bench`) measures instead on vectors with the layout and
statistics of the product's own fused vectors (:class:`ProductVectors`, docs/scale.md "The
product's own vectors at 1M"), with each approximate index as the product builds it,
reduction included (``IndexConfig.reduce``), against exact search on the full vectors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

from indexer.index import ANN_KINDS, build_faiss_index, index_bytes, tune_ann

if TYPE_CHECKING:
    from indexer.settings import Settings


def clustered_vectors(
    n: int, dim: int, *, clusters: int | None = None, seed: int = 0, chunk: int = 100_000
) -> np.ndarray:
    """``n`` L2-normalised float32 vectors with clustered, anisotropic structure."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(16, int(np.sqrt(n)))
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = 1.0 / np.arange(1, clusters + 1) ** 0.8
    sizes /= sizes.sum()
    # low intrinsic dimension: variance decays along a random basis
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    scale = (0.35 / np.sqrt(np.arange(1, dim + 1)) ** 0.9).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = rng.choice(clusters, size=m, p=sizes)
        noise = (rng.normal(size=(m, dim)).astype(np.float32) * scale) @ basis.T
        x = centres[z] + noise
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_neighbours(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The exact inner-product top ``k`` of each query, and the seconds the search took."""
    t0 = time.perf_counter()
    _, ids = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids, time.perf_counter() - t0


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of the true top ``k`` found (``found`` may hold -1 for no result)."""
    return float(knn_intersection_measure(found, truth))


def _latencies(search: Callable[[np.ndarray], Any], q: np.ndarray) -> list[float]:
    out = []
    for row in q:
        t0 = time.perf_counter()
        search(row[None, :])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(
    kind: str,
    x: np.ndarray,
    q: np.ndarray,
    truth: np.ndarray,
    k: int,
    *,
    single_queries: int,
    target_recall: float,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    index = build_faiss_index(kind, x)
    build_s = time.perf_counter() - t0
    return sweep_index(kind, index, len(x), build_s, q, truth, k,
                       single_queries=single_queries, target_recall=target_recall)


def sweep_index(
    kind: str,
    index: Any,
    n: int,
    build_s: float,
    q: np.ndarray,
    truth: np.ndarray,
    k: int,
    *,
    single_queries: int,
    target_recall: float,
) -> dict[str, Any]:
    """Recall, single-query latency and batch QPS of a built ``index`` at each knob value."""
    sweep = []
    chosen: dict[str, Any] | None = None
    for param in tune_ann(kind):
        param.apply(index)
        t0 = time.perf_counter()
        _, found = index.search(q, k)
        batch_s = time.perf_counter() - t0
        rec = recall_at_k(found, truth)
        lat = _latencies(lambda r: index.search(r, k), q[:single_queries])
        row = {
            param.name: param.value,
            "recall": round(rec, 4),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3),
            "batch_qps": round(len(q) / batch_s, 1),
        }
        sweep.append(row)
        if chosen is None and rec >= target_recall:
            chosen = row
    return {
        "kind": kind,
        "build_s": round(build_s, 2),
        "bytes_per_vector": round(index_bytes(index) / n, 1),
        "sweep": sweep,
        "at_target_recall": chosen,
    }


def run_search_bench(
    n: int,
    dim: int,
    k: int = 10,
    *,
    kinds: list[str] | None = None,
    queries: int = 1000,
    single_queries: int = 300,
    target_recall: float = 0.95,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    say = progress or (lambda _m: None)
    kinds = kinds or ["flat", *ANN_KINDS]
    say(f"generating {n} x {dim} clustered vectors")
    t0 = time.perf_counter()
    data = clustered_vectors(n + queries, dim, seed=seed)
    x, q = data[:n], np.ascontiguousarray(data[n:])
    gen_s = time.perf_counter() - t0
    say("exact ground truth")
    truth, exact_batch_s = exact_neighbours(x, q, k)
    results = []
    for kind in kinds:
        say(f"measuring {kind}")
        results.append(
            measure(kind, x, q, truth, k, single_queries=single_queries,
                    target_recall=target_recall)
        )
    return {
        **_header(n, dim, k, queries, single_queries, target_recall),
        "generate_s": round(gen_s, 1),
        "exact_batch_s": round(exact_batch_s, 2),
        "indexes": results,
    }


def _header(n: int, dim: int, k: int, queries: int, single_queries: int,
            target_recall: float) -> dict[str, Any]:
    """What every ``bench search`` result starts with (clustered or ``--product``)."""
    return {"benchmark": "search", "n": n, "dim": dim, "k": k, "queries": queries,
            "single_queries": single_queries, "target_recall": target_recall,
            "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads()}


# --- the product's own vectors (`bench search --product`) ---------------------------------
CATALOG_CSV = "flipkart_com-ecommerce_sample_1050.csv"


@dataclass(frozen=True)
class Catalog:
    """The real fused vectors of a catalog, their block layout and top-level categories."""

    vectors: np.ndarray  # (m, dim) float32, what Vitrine indexes
    blocks: list[tuple[str, int, float]]  # (name, dim, weight) in fused order
    categories: np.ndarray  # (m,) str
    models: dict[str, str]  # the encoder specs that made them

    def slices(self) -> list[tuple[slice, float]]:
        out, start = [], 0
        for _, dim, weight in self.blocks:
            out.append((slice(start, start + dim), weight))
            start += dim
        return out


def catalog_vectors(data: Path, settings: Settings, cache: Path | None = None, *,
                    limit: int | None = None) -> Catalog:
    """Embed and fuse the catalog at ``data`` (its first ``limit`` listings) exactly as
    ``Vitrine.build`` does, once: the result is kept in ``cache`` (an ``.npz``) and reused
    while the encoder specs match."""
    from indexer.catalog import read_listings
    from indexer.pipeline import Vitrine

    models = {"text": str(settings.text_model), "image": str(settings.image_model),
              "lexical": str(settings.lexical), "limit": str(limit)}
    if cache is not None and cache.exists():
        z = np.load(cache, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        if meta["models"] == models:
            return Catalog(z["vectors"], [tuple(b) for b in meta["blocks"]],  # type: ignore[misc]
                           z["categories"], models)
    csv_path = data / CATALOG_CSV if data.is_dir() else data
    listings, _ = read_listings(csv_path, require_category=True)
    listings = listings[:limit] if limit else listings
    v = Vitrine(settings)
    v.fit_lexical(listings)
    emb = v.embed(listings)
    v.build_from_embedded(listings, emb, calibrate=False)
    assert v.fusion is not None
    fused = v.fusion.fuse(emb.vectors, emb.present)
    keep = np.array([i not in emb.failed for i in range(len(listings))])
    cat = Catalog(
        np.ascontiguousarray(fused[keep], dtype=np.float32),
        [(b.name, b.dim, float(b.weight)) for b in v.fusion.blocks],
        np.array([x.category for x, k in zip(listings, keep, strict=True) if k]),
        models,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        meta = {"models": models, "blocks": cat.blocks}
        with cache.open("wb") as f:
            np.savez(f, vectors=cat.vectors, categories=cat.categories,
                     meta=np.array(json.dumps(meta)))
    return cat


class ProductVectors:
    """Synthetic listings with the layout and statistics of a real catalog's fused vectors.

    A synthetic listing is a real one (the *seed*, drawn uniformly: categories keep their
    real shares) moved by

    * ``spread`` x a draw from its category's own variation: a Gaussian combination of the
      category's within-category residuals (each real listing minus its category's mean),
      whose covariance is the category's empirical covariance: all of its spectrum,
      principal subspace and tail;
    * isotropic Gaussian noise carrying ``noise`` x the mean within-category residual
      energy, so that the data is full rank, as a million real listings would be, not
      confined to the span of the catalog's few hundred listings a category;

    then each block is put back to the fused layout: unit norm times its weight, and a block
    the seed lacks (no photo) stays all zero. Deterministic for a given seed.
    """

    def __init__(self, catalog: Catalog, *, spread: float = 0.5, noise: float = 0.1) -> None:
        self.catalog, self.spread, self.noise = catalog, spread, noise
        f = catalog.vectors
        self.present = np.stack(
            [np.linalg.norm(f[:, sl], axis=1) > 0 for sl, _ in catalog.slices()], axis=1)
        codes, self.code = np.unique(catalog.categories, return_inverse=True)
        self.members = [np.flatnonzero(self.code == c) for c in range(len(codes))]
        resid = np.zeros_like(f)
        for rows in self.members:
            for b, (sl, _) in enumerate(catalog.slices()):
                has = rows[self.present[rows, b]]
                if len(has):
                    resid[has, sl] = f[has, sl] - f[has, sl].mean(axis=0)
        self.resid = resid
        energy = float(np.mean(np.sum(resid**2, axis=1)))
        self.sigma = float(np.sqrt(noise * energy / f.shape[1]))

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        f = self.catalog.vectors
        seeds = rng.integers(0, len(f), m)
        x = f[seeds].copy()
        for c, members in enumerate(self.members):
            rows = np.flatnonzero(self.code[seeds] == c)
            if len(rows):
                g = rng.standard_normal((len(rows), len(members)), dtype=np.float32)
                x[rows] += (self.spread / np.sqrt(len(members))) * (g @ self.resid[members])
        x += self.sigma * rng.standard_normal(x.shape, dtype=np.float32)
        for b, (sl, weight) in enumerate(self.catalog.slices()):
            norms = np.linalg.norm(x[:, sl], axis=1, keepdims=True)
            keep = self.present[seeds, b][:, None]
            x[:, sl] = np.where(keep, x[:, sl] * (weight / np.maximum(norms, 1e-12)), 0.0)
        return x

    def chunks(self, n: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
        """``n`` vectors in chunks, each chunk from its own seed: the same stream twice."""
        for i, start in enumerate(range(0, n, chunk)):
            yield self.sample(min(chunk, n - start), np.random.default_rng([seed, i]))

    def describe(self) -> dict[str, Any]:
        c = self.catalog
        return {
            "catalog_listings": len(c.vectors), "categories": len(self.members),
            "blocks": [{"name": nm, "dim": d, "weight": w} for nm, d, w in c.blocks],
            "models": c.models, "spread": self.spread, "noise": self.noise,
            "noise_sigma": round(self.sigma, 6),
            "method": "seed listing + spread x Gaussian combination of its category's "
                      "residuals + isotropic noise (noise x residual energy), each block "
                      "renormalised to its weight, missing blocks kept zero",
        }


def run_product_bench(
    n: int,
    catalog: Catalog,
    k: int = 10,
    *,
    kinds: list[str] | None = None,
    reduces: list[str] | None = None,
    queries: int = 1000,
    single_queries: int = 300,
    target_recall: float = 0.95,
    seed: int = 0,
    spread: float = 0.5,
    noise: float = 0.1,
    chunk: int = 50_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``bench search`` on vectors made like the product's (:class:`ProductVectors`).

    Nothing holds all ``n`` full-width vectors: the stream is made twice, chunk by chunk
    (same seeds), once for the exact ground truth (``knn_ground_truth`` over the full fused
    vectors) and once to fill each index, which is trained on the stream's first vectors.
    """
    from faiss.contrib.exhaustive_search import knn_ground_truth

    from indexer.index import IndexConfig, ivf_nlist, trained_faiss_index

    say = progress or (lambda _m: None)
    gen = ProductVectors(catalog, spread=spread, noise=noise)
    dim = catalog.vectors.shape[1]
    q = np.ascontiguousarray(gen.sample(queries, np.random.default_rng([seed, 1 << 30])))
    say(f"exact ground truth over {n} x {dim} product vectors")
    t0 = time.perf_counter()
    _, truth = knn_ground_truth(q, gen.chunks(n, seed, chunk), k,
                                metric_type=faiss.METRIC_INNER_PRODUCT)
    exact_s = time.perf_counter() - t0
    results = []
    for kind in kinds or ["ivf_sq8"]:
        for reduce in reduces or ["pca512"]:
            say(f"building {kind} reduce={reduce}")
            cfg = IndexConfig(reduce=reduce)
            t0 = time.perf_counter()
            stream = gen.chunks(n, seed, chunk)
            # trained on the stream's head, as many vectors as a merge would train on
            need = min(n, 40 * ivf_nlist(n) if kind == "ivf_sq8" else 8 * dim)
            head = np.empty((need, dim), np.float32)  # filled in place: no second copy
            start = 0
            while start < need:
                x = next(stream)
                take = min(len(x), need - start)
                head[start : start + take] = x[:take]
                start += take
            index, factory = trained_faiss_index(kind, head, n, cfg)
            index.add_with_ids(head, np.arange(need, dtype=np.int64))
            del head
            if take < len(x):  # the rest of the chunk the head ended in
                index.add_with_ids(x[take:], np.arange(need, need + len(x) - take,
                                                       dtype=np.int64))
            start = need + len(x) - take
            for x in stream:
                index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
                start += len(x)
            build_s = time.perf_counter() - t0
            say(f"measuring {factory}")
            row = sweep_index(kind, index, n, build_s, q, truth, k,
                              single_queries=single_queries, target_recall=target_recall)
            results.append({"factory": factory, "reduce": reduce, **row})
            del index
    return {
        **_header(n, dim, k, queries, single_queries, target_recall),
        "data": "product",
        "generator": gen.describe(),
        "exact_batch_s": round(exact_s, 2),
        "indexes": results,
    }
