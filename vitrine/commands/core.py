"""Core commands: fetch-data, index, predict, search, and the ``bench`` group."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .common import add_model_flags, print_json, progress_bar, settings_from_args


def register(sub: argparse._SubParsersAction, _bench: object = None) -> argparse._SubParsersAction:
    p = sub.add_parser("fetch-data", help="download the study's Flipkart dataset (needs internet)")
    p.add_argument("--out", type=Path, default=Path("data/flipkart"), help="destination folder")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("index", help="build an index from a labelled catalog CSV")
    p.add_argument("--catalog", type=Path, required=True, help="Flipkart-format CSV")
    p.add_argument("--images", type=Path, help="photos folder (default: images/ beside the CSV)")
    p.add_argument("--index", type=Path, required=True, help="index folder to write")
    p.add_argument("--bad-rows", type=Path, help="write rejected/degraded rows to this CSV")
    add_model_flags(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("predict", help="categorize the listings of a CSV with an index")
    p.add_argument("input", type=Path, help="CSV with uniq_id, product_name[, description, image]")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="CSV to write")
    p.add_argument("--images", type=Path, help="photos folder for the image column")
    add_model_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("search", help="print the listings most similar to a text, photo or id")
    p.add_argument("--index", type=Path, required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--image", type=Path)
    q.add_argument("--id", dest="listing_id")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--category", help="only within this category")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_flags(p)
    p.set_defaults(func=cmd_search)

    bench = sub.add_parser("bench", help="benchmarks with JSON output")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    p = bench_sub.add_parser(
        "core", help="kNN cross-validation per modality and fused, encoder and search speed"
    )
    p.add_argument("--data", type=Path, required=True, help="folder with the Flipkart CSV")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="CV repeats with other shuffles")
    p.add_argument("--limit", type=int, help="use only the first N listings (smoke runs)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    add_model_flags(p)
    p.set_defaults(func=cmd_bench_core)
    return bench_sub


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from indexer.pipeline import Vitrine

    return Vitrine.load(args.index, settings_from_args(args))


def cmd_fetch(args: argparse.Namespace) -> int:
    from indexer.fetch import fetch_dataset

    csv_path = fetch_dataset(args.out)
    print(f"dataset ready: {csv_path}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.catalog import read_listings
    from indexer.pipeline import Vitrine

    settings = settings_from_args(args)
    listings, bad = read_listings(args.catalog, args.images, require_category=True)
    if not listings:
        print(f"vitrine: error: no usable listing in {args.catalog}", file=sys.stderr)
        return 2
    v = Vitrine(settings)
    with progress_bar(len(listings), "indexing") as update:
        problems = v.build(listings, update)
    bad_rows = list(bad) + _problem_rows(listings, problems)
    snap = v.save(args.index)
    _report_bad(bad_rows, args.bad_rows)
    print(f"indexed {len(v)} listings ({v.index.kind if v.index else '-'}, "
          f"dim {v.fusion.dim if v.fusion else 0}) -> {snap}")
    return 0


def _problem_rows(listings, problems):  # type: ignore[no-untyped-def]
    from indexer.catalog import BadRow

    return [BadRow(0, listings[i].id, msg) for i, msg in sorted(problems.items())]


def _report_bad(bad, path: Path | None) -> None:  # type: ignore[no-untyped-def]
    from indexer.catalog import write_bad_rows

    if not bad:
        return
    print(f"{len(bad)} row(s) with problems:", file=sys.stderr)
    for b in bad[:20]:
        where = f"line {b.line}" if b.line else "listing"
        print(f"  {where} {b.id or '?'}: {b.reason}", file=sys.stderr)
    if len(bad) > 20:
        print(f"  ... {len(bad) - 20} more", file=sys.stderr)
    if path:
        write_bad_rows(bad, path)
        print(f"problems written to {path}", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from indexer.catalog import read_listings

    v = _load(args)
    listings, bad = read_listings(args.input, args.images)
    with progress_bar(len(listings), "predicting") as update:
        votes = v.classify_many(listings, update)
    failed = {b.id for b in bad}
    with args.output.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["uniq_id", "category", "confidence", "uncertain", "neighbours"])
        for x, vote in zip(listings, votes, strict=True):
            w.writerow([
                x.id, vote.category or "", f"{vote.confidence:.4f}", int(vote.uncertain),
                " ".join(n.id for n in vote.neighbours[:5]),
            ])
    _report_bad(bad, None)
    n_unc = sum(v.uncertain for v in votes)
    print(f"predicted {len(votes)} listings ({n_unc} uncertain, {len(failed)} with problems) "
          f"-> {args.output}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from indexer.images import read_image_bytes

    v = _load(args)
    image = read_image_bytes(args.image) if args.image else None
    hits = v.search(text=args.text, image=image, listing_id=args.listing_id, k=args.k,
                    category=args.category)
    if args.json:
        print_json([{"id": h.id, "score": h.score, "category": h.category, "title": h.title}
                    for h in hits])
        return 0
    for rank, h in enumerate(hits, 1):
        cat = (h.category or "-")[:28]
        print(f"{rank:>3}  {h.score:6.3f}  {cat:<28}  {h.title[:70]}  [{h.id}]")
    return 0


def cmd_bench_core(args: argparse.Namespace) -> int:
    from evaluation.bench_core import run_core_bench

    result = run_core_bench(
        args.data, settings_from_args(args), folds=args.folds, limit=args.limit,
        repeats=args.repeats,
    )
    if args.out:
        import json

        args.out.write_text(json.dumps(result, indent=2))
    print_json(result)
    return 0
