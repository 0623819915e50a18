"""``vitrine bench search``, ``ingest`` and ``encoders`` (scale and speed, JSON output)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_flags, print_json, settings_from_args


def register(_sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("search", help="index types side by side on clustered vectors")
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", default="flat,ivf_sq8,hnsw",
                   help="comma-separated: flat, ivf_sq8, hnsw")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and QPS")
    p.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    p.add_argument("--json", action="store_true", help="JSON only on stdout (default too)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.set_defaults(func=cmd_search)

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


def cmd_search(args: argparse.Namespace) -> int:
    from evaluation.bench_search import run_search_bench

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    result = run_search_bench(
        args.n, args.dim, args.k, kinds=kinds, queries=args.queries,
        single_queries=args.single, progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    return _emit(result, args.out)


def cmd_ingest(args: argparse.Namespace) -> int:
    from evaluation.bench_ingest import run_ingest_bench

    result = run_ingest_bench(args.data, settings_from_args(args), n=args.n,
                              rounds=args.rounds, sweep=args.sweep)
    return _emit(result, args.out)


def cmd_encoders(args: argparse.Namespace) -> int:
    from evaluation.bench_encoders import run_encoders_bench

    def split(v: str | None) -> list[str] | None:
        return [x.strip() for x in v.split(",") if x.strip()] if v else None

    result = run_encoders_bench(
        args.data, settings_from_args(args), n=args.n, singles=args.single,
        backends=split(args.backends), include=split(args.models), limit=args.limit,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    return _emit(result, args.out)
