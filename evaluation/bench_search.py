"""``vitrine bench search``: index types side by side on clustered synthetic vectors.

Data with the structure of real embeddings, not uniform noise: cluster centres drawn on the
sphere, cluster sizes from a Zipf law (a marketplace has a few huge categories and a long
tail), and within-cluster noise of low intrinsic dimension (most of the variance in a few
directions, as in sentence and CLIP embeddings). Queries are fresh points from the same
distribution, never in the index. Ground truth is exact inner-product search in the same
run (``faiss.knn``: brute force, no index, no copy of the data), recall@k is
``faiss.contrib.evaluation.knn_intersection_measure``, and every index type is measured on the
same data and queries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

from indexer.index import ANN_KINDS, build_faiss_index, index_bytes, tune_ann


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
        "bytes_per_vector": round(index_bytes(index) / len(x), 1),
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
        "benchmark": "search",
        "n": n,
        "dim": dim,
        "k": k,
        "queries": queries,
        "single_queries": single_queries,
        "target_recall": target_recall,
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "generate_s": round(gen_s, 1),
        "exact_batch_s": round(exact_batch_s, 2),
        "indexes": results,
    }
