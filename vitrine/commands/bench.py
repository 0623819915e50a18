"""``vitrine bench search``, ``replicas``, ``ingest`` and ``encoders`` (scale, speed, memory;
JSON output)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_flags, print_json, settings_from_args


def register(_sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("search", help="index types side by side on clustered vectors, or "
                         "(--product) on vectors made from the catalog's own fused vectors")
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=512, help="clustered vectors' width")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", help="comma-separated: flat, ivf_sq8, hnsw (default: all three; "
                   "ivf_sq8 with --product)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and QPS")
    p.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    g = p.add_argument_group("the product's own vectors (docs/scale.md)")
    g.add_argument("--product", action="store_true",
                   help="vectors with the layout and statistics of the catalog's fused vectors")
    g.add_argument("--data", type=Path, default=Path("../shared/data/flipkart-1050"),
                   help="folder with the Flipkart CSV, embedded once with the configured models")
    g.add_argument("--cache", type=Path,
                   help="the catalog's fused vectors (.npz; default DATA_DIR/bench/catalog.npz)")
    g.add_argument("--reduce", default="pca512",
                   help="comma-separated reductions to compare (VITRINE_ANN_REDUCE values)")
    g.add_argument("--spread", type=float, default=0.5,
                   help="how far a synthetic listing strays from its seed, in units of its "
                   "category's variation")
    g.add_argument("--noise", type=float, default=0.1,
                   help="isotropic noise energy, as a share of the within-category energy")
    p.add_argument("--json", action="store_true", help="JSON only on stdout (default too)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    add_model_flags(p)
    p.set_defaults(func=cmd_search)

    p = bench.add_parser("replicas", help="memory of a second API process on one host: "
                         "private vs shared (mapped snapshot), from /proc")
    p.add_argument("--n", type=int, default=1_000_000, help="listings in the snapshot")
    p.add_argument("--dim", type=int, default=768,
                   help="vector width before the base's reduction (the base's bytes per "
                   "listing depend on the reduced width, not on this)")
    p.add_argument("--ann", default="ivf_sq8", help="approximate index kind: ivf_sq8, hnsw")
    p.add_argument("--reduce", default="pca512",
                   help="the base's reduction: pca<d> or none (VITRINE_ANN_REDUCE)")
    p.add_argument("--workdir", type=Path, help="where the snapshots are written (a temporary "
                   "folder under it; default the system's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_replicas)

    p = bench.add_parser("stores", help="the same search through the FAISS index and a Milvus "
                         "server (VITRINE_VECTOR_STORE), side by side on the product's vectors")
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in each store")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=200, help="queries, each timed alone")
    p.add_argument("--data", type=Path, default=Path("../shared/data/flipkart-1050"),
                   help="folder with the Flipkart CSV, embedded once with the configured models")
    p.add_argument("--cache", type=Path,
                   help="the catalog's fused vectors (.npz; default DATA_DIR/bench/catalog.npz)")
    p.add_argument("--reduce", default="pca512", help="the approximate index's reduction")
    p.add_argument("--milvus", help="milvus://HOST:PORT of a running Milvus (default: start a "
                   "local milvus-lite server, which needs the dev extra)")
    p.add_argument("--milvus-nlist", type=int, default=1024,
                   help="IVF lists of each Milvus segment (<= ~100k rows each in milvus-lite)")
    p.add_argument("--milvus-nprobe", default="8,16,32", help="lists probed, comma-separated")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path)
    add_model_flags(p)
    p.set_defaults(func=cmd_stores)

    p = bench.add_parser("ingest", help="encode -> fuse -> index listings/s, batched vs one by one")
    p.add_argument("--data", type=Path, required=True, help="folder with the Flipkart CSV")
    p.add_argument("--n", type=int, default=200, help="listings to ingest")
    p.add_argument("--rounds", type=int, default=4,
                   help="interleaved rounds of batched vs one-by-one (noise control)")
    p.add_argument("--sweep", action="store_true",
                   help="also time each encoder per batch size and torch thread count")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path)
    add_model_flags(p)
    p.set_defaults(func=cmd_ingest)

    p = bench.add_parser("encoders", help="every encoder x every installed backend (PyTorch, "
                         "ONNX Runtime, OpenVINO): speed and fidelity side by side")
    p.add_argument("--data", type=Path, required=True, help="folder with the Flipkart CSV")
    p.add_argument("--n", type=int, default=256,
                   help="items per random-weight hub model (the offline models take the "
                   "whole catalog)")
    p.add_argument("--single", type=int, default=100, help="items timed one at a time")
    p.add_argument("--limit", type=int, help="only the catalog's first LIMIT listings")
    p.add_argument("--backends", help="comma-separated subset of onnx,onnx-int8,openvino "
                   "(PyTorch always runs: it is the reference)")
    p.add_argument("--models", help="offline, hub or both (default)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path)
    add_model_flags(p)
    p.set_defaults(func=cmd_encoders)


def _emit(result: dict, out: Path | None) -> int:
    if out:
        out.write_text(json.dumps(result, indent=2))
    print_json(result)
    return 0


def _split(v: str | None) -> list[str] | None:
    return [x.strip() for x in v.split(",") if x.strip()] if v else None


def cmd_search(args: argparse.Namespace) -> int:
    from evaluation.bench_search import catalog_vectors, run_product_bench, run_search_bench

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    kinds = _split(args.kinds)
    if args.product:
        settings = settings_from_args(args)
        cache = args.cache or settings.data_dir / "bench" / "catalog.npz"
        say(f"the catalog's fused vectors ({cache})")
        catalog = catalog_vectors(args.data, settings, cache)
        result = run_product_bench(
            args.n, catalog, args.k, kinds=kinds, reduces=_split(args.reduce),
            queries=args.queries, single_queries=args.single, spread=args.spread,
            noise=args.noise, progress=say,
        )
    else:
        result = run_search_bench(
            args.n, args.dim, args.k, kinds=kinds, queries=args.queries,
            single_queries=args.single, progress=say,
        )
    return _emit(result, args.out)


def cmd_replicas(args: argparse.Namespace) -> int:
    from evaluation.bench_replicas import run_replicas_bench
    from indexer.index import IndexConfig

    config = IndexConfig(ann=args.ann, reduce=args.reduce, background=False)
    result = run_replicas_bench(args.n, args.dim, config=config, workdir=args.workdir,
                                progress=lambda m: print(m, file=sys.stderr, flush=True))
    return _emit(result, args.out)


def cmd_stores(args: argparse.Namespace) -> int:
    from evaluation.bench_search import catalog_vectors
    from evaluation.bench_stores import run_stores_bench

    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    settings = settings_from_args(args)
    cache = args.cache or settings.data_dir / "bench" / "catalog.npz"
    say(f"the catalog's fused vectors ({cache})")
    catalog = catalog_vectors(args.data, settings, cache)
    result = run_stores_bench(
        args.n, catalog, args.k, milvus=args.milvus, reduce=args.reduce,
        queries=args.queries, milvus_nlist=args.milvus_nlist,
        milvus_nprobes=tuple(int(x) for x in _split(args.milvus_nprobe) or ()),
        progress=say,
    )
    return _emit(result, args.out)


def cmd_ingest(args: argparse.Namespace) -> int:
    from evaluation.bench_ingest import run_ingest_bench

    result = run_ingest_bench(args.data, settings_from_args(args), n=args.n,
                              rounds=args.rounds, sweep=args.sweep)
    return _emit(result, args.out)


def cmd_encoders(args: argparse.Namespace) -> int:
    from evaluation.bench_encoders import run_encoders_bench

    result = run_encoders_bench(
        args.data, settings_from_args(args), n=args.n, singles=args.single,
        backends=_split(args.backends), include=_split(args.models), limit=args.limit,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    return _emit(result, args.out)
