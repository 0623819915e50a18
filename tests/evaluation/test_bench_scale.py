"""`vitrine bench search` / `bench ingest` on small inputs (full runs are the benchmarks)."""

import numpy as np
import pytest

from evaluation.bench_ingest import run_ingest_bench
from evaluation.bench_search import (
    Catalog,
    ProductVectors,
    catalog_vectors,
    clustered_vectors,
    recall_at_k,
    run_product_bench,
    run_search_bench,
)
from tests.support.offline import DATA_DIR


def test_synthetic_vectors_are_clustered_not_uniform():
    x = clustered_vectors(2000, 64, clusters=20)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sims = x[:200] @ x[:200].T
    # same-cluster pairs are far more similar than uniform noise would be (~0 in 64-d)
    assert np.percentile(sims[~np.eye(200, dtype=bool)], 95) > 0.3


def test_recall_of_each_index_type_against_exact_search():
    r = run_search_bench(20_000, 32, 10, kinds=["flat", "ivf_sq8", "hnsw"], queries=200,
                         single_queries=50)
    by_kind = {i["kind"]: i for i in r["indexes"]}
    assert by_kind["flat"]["sweep"][0]["recall"] == 1.0
    for kind in ("ivf_sq8", "hnsw"):
        recalls = [row["recall"] for row in by_kind[kind]["sweep"]]
        assert recalls == sorted(recalls)  # more effort, more recall (monotone)
        assert by_kind[kind]["at_target_recall"] is not None  # reaches 0.95
        assert by_kind[kind]["at_target_recall"]["recall"] >= 0.95
    # SQ8 codes: d bytes + an 8-byte id, far below flat float32 (4 d)
    assert by_kind["ivf_sq8"]["bytes_per_vector"] < by_kind["flat"]["bytes_per_vector"] / 2


def test_product_vectors_keep_the_fused_layout_and_replay():
    rng = np.random.default_rng(0)
    blocks = [("text", 24, 1.0), ("image", 40, 0.5)]
    f = np.concatenate([rng.normal(size=(90, 24)), rng.normal(size=(90, 40))], axis=1)
    f[:, :24] /= np.linalg.norm(f[:, :24], axis=1, keepdims=True)
    f[:, 24:] *= 0.5 / np.linalg.norm(f[:, 24:], axis=1, keepdims=True)
    f[::3, 24:] = 0  # a third without a photo
    cat = Catalog(f.astype(np.float32), blocks, np.array(["a", "b", "c"] * 30), {})
    gen = ProductVectors(cat, spread=0.5, noise=0.1)
    x = np.concatenate(list(gen.chunks(1000, 7, 300)))
    norms = np.linalg.norm(x[:, 24:], axis=1)
    np.testing.assert_allclose(np.linalg.norm(x[:, :24], axis=1), 1.0, atol=1e-5)
    assert np.all(np.isclose(norms, 0.5, atol=1e-5) | (norms == 0))
    assert 0.2 < np.mean(norms == 0) < 0.45  # the seeds' missing photos stay missing
    # the same stream twice (ground truth and index fill are two passes over it)
    np.testing.assert_array_equal(x, np.concatenate(list(gen.chunks(1000, 7, 300))))
    assert gen.describe()["noise_sigma"] > 0


@pytest.mark.slow
def test_product_bench_on_the_catalogs_fused_vectors(settings, tmp_path):
    cat = catalog_vectors(DATA_DIR, settings, tmp_path / "catalog.npz", limit=120)
    assert cat.vectors.shape[1] == sum(d for _, d, _ in cat.blocks)
    r = run_product_bench(6000, cat, 10, reduces=["pca64", "none"], queries=100,
                          single_queries=20, chunk=2500)
    assert r["data"] == "product" and r["dim"] == cat.vectors.shape[1]
    by = {i["reduce"]: i for i in r["indexes"]}
    assert by["pca64"]["factory"] == "PCAR64,IVF256,SQ8"
    assert by["none"]["factory"] == "IVF256,SQ8"
    # 64 bytes of codes instead of one a dimension, plus faiss's PCA matrices (d x d and
    # 64 x d floats: 13 MB at 1792-d, which 6000 vectors do not amortise)
    d = r["dim"]
    fixed = 4 * (d * d + 64 * d) / 6000
    assert by["pca64"]["bytes_per_vector"] - fixed < by["none"]["bytes_per_vector"] / 2
    for row in by["pca64"]["sweep"] + by["none"]["sweep"]:
        assert 0 < row["recall"] <= 1 and row["p99_ms"] >= row["p50_ms"] > 0
    # cached: a second call reads the same vectors without embedding
    again = catalog_vectors(DATA_DIR, settings, tmp_path / "catalog.npz", limit=120)
    np.testing.assert_array_equal(again.vectors, cat.vectors)


def test_recall_helper():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(np.array([[1, 2, 9], [6, 5, 4]]), truth) == pytest.approx(5 / 6)


@pytest.mark.slow
def test_ingest_bench_batched_vs_one_by_one(settings):
    r = run_ingest_bench(DATA_DIR, settings, n=24, seed_size=30, rounds=2, sweep=True,
                         sweep_batch_sizes=(1, 8), sweep_threads=(1,))
    assert r["listings"] == 24 and r["rounds"] == 2
    assert r["batched_listings_per_s"] > 0 and r["one_by_one_listings_per_s"] > 0
    assert {"text_encode", "image_encode", "fuse", "index_upsert"} <= set(
        r["stages_listings_per_s"])
    sweep = r["encoder_sweep"]
    assert {(row["torch_threads"], row["batch_size"]) for row in sweep} >= {(1, 1), (1, 8)}
    assert all(row["image_per_s"] > 0 for row in sweep)
    # a text encoder on a backend runs one text per session run: no batch size to sweep
    assert all("text_per_s" not in row for row in sweep)
