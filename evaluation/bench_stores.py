"""``vitrine bench stores``: one search, two engines: the FAISS index a vitrine process holds
and a Milvus server (``VITRINE_VECTOR_STORE=milvus://...``), side by side in one run.

Both get the same ``n`` vectors made like the product's (:class:`evaluation.bench_search.
ProductVectors`), reduced the way the product's approximate index reduces them (the PCA the
FAISS index trains, applied before the Milvus insert as well, so that both engines search
the same 256-d vectors with the same IVF + 8-bit scalar quantisation), and the same held-out
queries. Recall@k is against exact search on the *full* fused vectors, for both.

What differs is the engine: FAISS answers in-process from one index over everything; Milvus
answers over gRPC from sealed segments of at most ~100k rows, each with its own IVF index,
merged per query. Milvus's lists per segment (``nlist``) and lists probed are swept; FAISS
uses the product's settings (``ivf_nlist(n)`` lists, ``nprobe`` 32).

Without ``--milvus`` the run starts a local milvus-lite server (the pure-Python Milvus of the
dev extra): what this machine can run. A standalone Milvus would be measured by pointing
``--milvus`` at it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from .bench_search import Catalog, ProductVectors, recall_at_k

# faiss's bundled stubs describe the SWIG C++ signatures, not its Python layer (as in
# indexer/index.py)
faiss: Any = _faiss

MILVUS_BATCH = 5000  # rows per insert call


@contextlib.contextmanager
def milvus_lite_server(data_dir: Path, within_s: float = 60.0) -> Iterator[str]:
    """Run a milvus-lite server on ``data_dir`` in its own process, on a free loopback port;
    yields its ``milvus://HOST:PORT``. Needs the dev extra (``milvus-lite``)."""
    from pymilvus import MilvusClient, MilvusException

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir.parent / f"{data_dir.name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + within_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"milvus-lite exited with {proc.returncode}: see {log.name}")
            try:
                client = MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=2)
                client.list_collections()
                client.close()
                break
            except MilvusException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"milvus://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _pct(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _timed(search: Callable[[np.ndarray], np.ndarray], q: np.ndarray
           ) -> tuple[np.ndarray, list[float]]:
    """Each query alone (what a request does): the ids found and the milliseconds."""
    found, ms = [], []
    for row in q:
        t0 = time.perf_counter()
        found.append(search(row[None, :]))
        ms.append((time.perf_counter() - t0) * 1e3)
    return np.concatenate(found), ms


def run_stores_bench(
    n: int,
    catalog: Catalog,
    k: int = 10,
    *,
    milvus: str | None = None,
    reduce: str = "pca512",
    nprobe: int = 32,
    milvus_nlist: int = 1024,
    milvus_nprobes: tuple[int, ...] = (8, 16, 32),
    queries: int = 200,
    seed: int = 0,
    chunk: int = 50_000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from faiss.contrib.exhaustive_search import knn_ground_truth
    from pymilvus import DataType, MilvusClient

    from indexer.index import IndexConfig, ivf_nlist, trained_faiss_index

    say = progress or (lambda _m: None)
    gen = ProductVectors(catalog)
    dim = catalog.vectors.shape[1]
    q = np.ascontiguousarray(gen.sample(queries, np.random.default_rng([seed, 1 << 30])))
    say(f"exact ground truth over {n} x {dim} product vectors")
    _, truth = knn_ground_truth(q, gen.chunks(n, seed, chunk), k,
                                metric_type=faiss.METRIC_INNER_PRODUCT)

    # FAISS: the product's approximate index, trained on the stream's head as a merge is
    say("FAISS: training and filling the product's index")
    t0 = time.perf_counter()
    stream = gen.chunks(n, seed, chunk)
    need = min(n, 40 * ivf_nlist(n))
    head: list[np.ndarray] = []
    while sum(map(len, head)) < need:
        head.append(next(stream))
    index, factory = trained_faiss_index("ivf_sq8", np.concatenate(head), n,
                                         IndexConfig(reduce=reduce))
    start = 0
    for x in (*head, *stream):
        index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        start += len(x)
    del head
    faiss_build_s = time.perf_counter() - t0
    ivf = faiss.extract_index_ivf(index)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    # warm up, then each query alone
    index.search(q[:10], k, params=params)
    found, ms = _timed(lambda row: index.search(row, k, params=params)[1], q)
    faiss_row = {"engine": "faiss", "factory": factory, "nlist": int(ivf.nlist),
                 "nprobe": nprobe, "build_s": round(faiss_build_s, 1),
                 "recall_at_k": round(recall_at_k(found, truth), 4), **_pct(ms),
                 "in_process": True}

    # the same reduction applied before Milvus: the PCA the FAISS index trained
    pre = faiss.downcast_index(index)
    if isinstance(pre, faiss.IndexPreTransform):
        transform = pre.chain.at(0)

        def reduced(x: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(transform.apply(np.ascontiguousarray(x)))
    else:
        def reduced(x: np.ndarray) -> np.ndarray:
            return x
    width = int(reduced(q[:1]).shape[1])  # (the transform lives in ``index``: kept alive)

    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if milvus is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-milvus-")))
            milvus = stack.enter_context(milvus_lite_server(tmp / "milvus"))
            server = "milvus-lite (local, pure Python)"
        else:
            server = "given"
        client = MilvusClient(uri="http://" + milvus.removeprefix("milvus://"), timeout=60)
        stack.callback(client.close)
        name = f"bench_stores_{n}"
        if client.has_collection(name):
            client.drop_collection(name)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=width)
        index_params = client.prepare_index_params()
        index_params.add_index("vec", index_type="IVF_SQ8", metric_type="IP",
                               params={"nlist": milvus_nlist})
        client.create_collection(name, schema=schema, index_params=index_params)
        say(f"Milvus ({server}): inserting {n} x {width}")
        t0 = time.perf_counter()
        start = 0
        for x in gen.chunks(n, seed, chunk):
            r = reduced(x)
            for a in range(0, len(r), MILVUS_BATCH):
                part = r[a:a + MILVUS_BATCH]
                client.insert(name, [{"id": start + a + i, "vec": part[i]}
                                     for i in range(len(part))])
            start += len(x)
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.flush(name)
        client.load_collection(name)
        flush_s = time.perf_counter() - t0
        rq = reduced(q)
        for probe in milvus_nprobes:
            def search(row: np.ndarray, probe: int = probe) -> np.ndarray:
                hits = client.search(name, data=[row[0]], limit=k,
                                     search_params={"metric_type": "IP",
                                                    "params": {"nprobe": probe}})[0]
                ids = [int(h["id"]) for h in hits] + [-1] * (k - len(hits))
                return np.asarray([ids], dtype=np.int64)

            say(f"Milvus: {queries} queries, nprobe {probe}")
            for row in rq[:20]:  # warm-up: milvus-lite builds a segment's index on first use
                search(row[None, :])
            found, ms = _timed(search, rq)
            rows.append({"engine": "milvus", "server": server, "index": "IVF_SQ8",
                         "nlist_per_segment": milvus_nlist, "nprobe": probe,
                         "insert_s": round(insert_s, 1), "flush_and_load_s": round(flush_s, 1),
                         "insert_per_s": round(n / insert_s, 1),
                         "recall_at_k": round(recall_at_k(found, truth), 4), **_pct(ms),
                         "in_process": False})
        client.drop_collection(name)
    return {
        "benchmark": "stores",
        "n": n, "dim": dim, "searched_dim": width, "k": k, "queries": queries,
        "reduce": reduce,
        "generator": gen.describe(),
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "results": [faiss_row, *rows],
        "notes": "recall against exact search on the full fused vectors; FAISS in-process, "
                 "Milvus over gRPC on loopback; one query at a time",
    }
