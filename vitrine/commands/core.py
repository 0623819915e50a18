"""Core commands: fetch-data, index, predict, search, and the ``bench`` group."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from .common import add_model_flags, print_json, progress_bar, settings_from_args

DEFAULT_SERVER = "http://127.0.0.1:8000"  # where `make demo` / `vitrine serve` listen


def register(sub: argparse._SubParsersAction, _bench: object = None) -> argparse._SubParsersAction:
    p = sub.add_parser("fetch-data", help="download the study's Flipkart dataset (needs internet)")
    p.add_argument("--out", type=Path, default=Path("data/flipkart"), help="destination folder")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("index", help="build an index from a labelled catalog CSV")
    p.add_argument("--catalog", type=Path, required=True, help="Flipkart-format CSV")
    p.add_argument("--images", type=Path, help="photos folder (default: images/ beside the CSV)")
    p.add_argument("--index", type=Path, required=True, help="index folder to write")
    p.add_argument("--bad-rows", type=Path, help="write rejected/degraded rows to this CSV")
    p.add_argument("--force", action="store_true",
                   help="replace the index already in --index (never one a running "
                        "`vitrine serve` holds)")
    add_model_flags(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("predict", help="categorize the listings of a CSV with an index")
    p.add_argument("input", type=Path, help="CSV with uniq_id, product_name[, description, image]")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="CSV to write")
    p.add_argument("--images", type=Path, help="photos folder for the image column")
    p.add_argument("--bad-rows", type=Path, help="write rejected/degraded rows to this CSV")
    add_model_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "search", help="print the listings most similar to a text, photo or id",
        description="Search an index folder (--index: loads the models, seconds) or a running "
                    f"`vitrine serve` (--server; without --index, {DEFAULT_SERVER} is asked).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--index", type=Path, help="index folder to load and search here")
    src.add_argument("--server", metavar="URL",
                     help=f"a running `vitrine serve` (default without --index: "
                          f"{DEFAULT_SERVER})")
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
    check_index_target(args.index, force=args.force)  # before minutes of encoding
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


def _server_lock_holder(folder: Path) -> str | None:
    """The pid of the `vitrine serve` holding ``folder/LOCK`` (its data dir), else None."""
    import fcntl
    import os

    try:
        fd = os.open(folder / "LOCK", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # also releases a lock taken here
    return None


def check_index_target(index: Path, *, force: bool) -> None:
    """Refuse to write an index where one is served or one already is (unless ``force``).

    A running embedded `vitrine serve` holds an flock on ``DATA_DIR/LOCK`` and keeps its
    index in ``DATA_DIR/index``: writing there (or into the data dir itself) would swap the
    index under the server and out of step with its state store, so that is refused even
    with ``--force``. Other folders beside it (``var/my-index``) are not the server's.
    """
    from indexer.errors import VitrineError
    from indexer.index import current_snapshot

    for folder in (index, index.parent) if index.name == "index" else (index,):
        pid = _server_lock_holder(folder)
        if pid is not None:
            raise VitrineError(
                f"{index} belongs to a running `vitrine serve` (pid {pid} holds "
                f"{folder / 'LOCK'}): stop it first, or write the index elsewhere "
                "(e.g. --index var/my-index)"
            )
    if force or not index.exists():
        return
    if not index.is_dir():
        raise VitrineError(f"{index} is a file, not an index folder")
    if current_snapshot(index) is not None:
        raise VitrineError(
            f"{index} already holds an index: pass --force to replace it, or choose another "
            "folder"
        )
    if any(index.iterdir()):
        raise VitrineError(
            f"{index} is not empty and holds no vitrine index: pass --force to write there "
            "anyway, or choose another folder"
        )


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
        votes, problems = v.classify_reporting(listings, update)
    with args.output.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        # new columns go last, so that readers of the first five by position keep working
        w.writerow(["uniq_id", "category", "confidence", "uncertain", "neighbours",
                    "category_path", "uncertain_reason"])
        for x, vote in zip(listings, votes, strict=True):
            w.writerow([
                x.id, vote.category or "", f"{vote.confidence:.4f}", int(vote.uncertain),
                " ".join(n.id for n in vote.neighbours[:5]),
                " >> ".join(vote.category_path), vote.uncertain_reason or "",
            ])
    # refused rows (not in the output), then listings predicted from less than they had
    # (an unusable photo: from the text only) or not at all (nothing usable: empty category)
    bad_rows = list(bad) + _problem_rows(listings, problems)
    _report_bad(bad_rows, args.bad_rows)
    n_unc = sum(vote.uncertain for vote in votes)
    n_bad = len({b.id for b in bad_rows if b.id is not None}) + sum(b.id is None for b in bad_rows)
    print(f"predicted {len(votes)} listings ({n_unc} uncertain, {n_bad} rows with problems"
          f"{', see ' + str(args.bad_rows) if args.bad_rows and n_bad else ''}) "
          f"-> {args.output}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if args.index is None:
        hits = _search_server(args)
    else:
        hits = _search_local(args)
    if args.json:
        print_json(hits)
        return 0
    for rank, h in enumerate(hits, 1):
        cat = (h.get("category") or "-")[:28]
        print(f"{rank:>3}  {h['score']:6.3f}  {cat:<28}  {(h.get('title') or '')[:70]}  "
              f"[{h['id']}]")
    return 0


def _search_local(args: argparse.Namespace) -> list[dict[str, Any]]:
    from indexer.images import read_image_bytes

    v = _load(args)
    image = read_image_bytes(args.image) if args.image else None
    hits = v.search(text=args.text, image=image, listing_id=args.listing_id, k=args.k,
                    category=args.category)
    return [{"id": h.id, "score": h.score, "category": h.category, "title": h.title}
            for h in hits]


def _search_server(args: argparse.Namespace) -> list[dict[str, Any]]:
    """POST /search to a running `vitrine serve`: its models are loaded already."""
    import base64
    import logging
    from urllib.parse import urlsplit

    import httpx

    from indexer.errors import VitrineError
    from indexer.settings import Settings

    url = (args.server or DEFAULT_SERVER).rstrip("/")
    if urlsplit(url).scheme not in {"http", "https"}:
        raise VitrineError(f"--server {url!r}: an http:// or https:// URL, please")
    body: dict[str, object] = {"k": args.k}
    if args.text is not None:
        body["text"] = args.text
    if args.listing_id is not None:
        body["listing_id"] = args.listing_id
    if args.category:
        body["category"] = args.category
    if args.image is not None:
        try:
            body["image_base64"] = base64.b64encode(args.image.read_bytes()).decode()
        except OSError as e:
            raise VitrineError(f"cannot read {args.image}: {e.strerror or e}") from None
    settings = Settings()
    key = settings.read_api_key or settings.api_key
    headers = {"X-API-Key": key} if key else {}
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    host = urlsplit(url).hostname or ""
    loopback = host in {"127.0.0.1", "localhost", "::1"}
    try:
        # a short connect timeout: no server there is said at once
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=2.0),
                          trust_env=not loopback) as client:
            r = client.post(f"{url}/search", json=body, headers=headers)
    except httpx.HTTPError as e:
        if args.server:
            raise VitrineError(f"no vitrine server answers at {url} ({e})") from None
        raise VitrineError(
            f"no --index given and no vitrine server answers at {url}: start one "
            "(`make demo` or `vitrine serve`), pass --server URL, or search an index "
            "folder with --index DIR"
        ) from None
    try:
        payload = r.json()
    except ValueError:
        payload = None
    if r.status_code != 200:
        detail = payload.get("detail") if isinstance(payload, dict) else r.text[:200]
        hint = (" (set VITRINE_READ_API_KEY or VITRINE_API_KEY)"
                if r.status_code == 401 else "")
        raise VitrineError(f"{url}/search answered {r.status_code}: {detail}{hint}")
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
        raise VitrineError(f"{url}/search: not a vitrine server's answer")
    print(f"vitrine: searched the server at {url}", file=sys.stderr)
    return list(payload["results"])


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
