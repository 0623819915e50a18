"""Operators' commands: ``vitrine export`` (the listings as CSV or JSON).

Export reads a running ``vitrine serve`` (``GET /listings``, page by page) rather than the
data dir: the embedded server owns its data dir (a lock), and in Redis mode any API process
answers the same. The key, when the service needs one, comes from ``VITRINE_READ_API_KEY``
or ``VITRINE_API_KEY`` as for ``vitrine search --server``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from indexer.errors import VitrineError

from .core import DEFAULT_SERVER

COLUMNS = ("id", "title", "category_path", "source", "confidence", "status")
PAGE = 1000  # GET /listings's largest page


def register(sub: argparse._SubParsersAction, _bench: object = None) -> None:
    p = sub.add_parser(
        "export", help="write the listings of a running server as CSV or JSON",
        description="Id, title, category path, source, confidence and status of every "
                    "listing a running `vitrine serve` holds (GET /listings, paged). In "
                    "the CSV the path's levels are joined with ' >> '.")
    p.add_argument("--server", metavar="URL", default=DEFAULT_SERVER,
                   help=f"a running `vitrine serve` (default {DEFAULT_SERVER})")
    p.add_argument("--format", choices=["csv", "json"], default="csv")
    p.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    p.add_argument("--status", choices=["indexed", "queued", "failed"], default="indexed")
    p.add_argument("--category", help="only under this category (any level, any case)")
    p.add_argument("--source", choices=["seller", "predicted", "confirmed", "unconfirmed"])
    p.set_defaults(func=cmd_export)


def rows(server: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Every listing ``GET /listings`` gives for ``params``, a page at a time."""
    import logging
    from urllib.parse import urlsplit

    import httpx

    from indexer.settings import Settings

    url = server.rstrip("/")
    if urlsplit(url).scheme not in {"http", "https"}:
        raise VitrineError(f"--server {url!r}: an http:// or https:// URL, please")
    s = Settings()
    key = s.read_api_key or s.api_key
    headers = {"X-API-Key": key} if key else {}
    logging.getLogger("httpx").setLevel(logging.WARNING)
    loopback = (urlsplit(url).hostname or "") in {"127.0.0.1", "localhost", "::1"}
    after: str | None = None
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=2.0), trust_env=not loopback) as c:
        while True:
            cursor = {"after": after} if after is not None else {}
            try:
                r = c.get(f"{url}/listings", headers=headers,
                          params={**params, **cursor, "limit": PAGE})
            except httpx.HTTPError as e:
                raise VitrineError(f"no vitrine server answers at {url} ({e})") from None
            try:
                page = r.json()
            except ValueError:
                page = None
            if r.status_code != 200 or not isinstance(page, dict):
                detail = page.get("detail") if isinstance(page, dict) else r.text[:200]
                hint = (" (set VITRINE_READ_API_KEY or VITRINE_API_KEY)"
                        if r.status_code == 401 else "")
                raise VitrineError(f"{url}/listings answered {r.status_code}: {detail}{hint}")
            yield from page["items"]
            # page by cursor: listings written meanwhile shift nothing, none is read twice
            after = page.get("next")
            if after is None:
                return


def write(items: Iterator[dict[str, Any]], fmt: str, out: TextIO) -> int:
    n = 0
    if fmt == "json":
        out.write("[")
        for n, x in enumerate(items, 1):
            out.write(("\n  " if n == 1 else ",\n  ")
                      + json.dumps({k: x.get(k) for k in COLUMNS}, ensure_ascii=False))
        out.write("\n]\n" if n else "]\n")
        return n
    w = csv.writer(out)
    w.writerow(COLUMNS)
    for x in items:
        n += 1
        conf = x.get("confidence")
        w.writerow([x["id"], x.get("title") or "", " >> ".join(x.get("category_path") or []),
                    x.get("source") or "", "" if conf is None else f"{conf:.4f}",
                    x["status"]])
    return n


def cmd_export(args: argparse.Namespace) -> int:
    params = {"status": args.status}
    if args.category:
        params["category"] = args.category
    if args.source:
        params["source"] = args.source
    items = rows(args.server, params)
    if args.output is None:
        n = write(items, args.format, sys.stdout)
    else:
        tmp = args.output.with_name(args.output.name + ".part")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            n = write(items, args.format, f)
        tmp.replace(args.output)  # no half-written export under the real name
    print(f"vitrine: exported {n} listings from {args.server}", file=sys.stderr)
    return 0
