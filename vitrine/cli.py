"""``vitrine`` command line. Each layer registers its commands from ``vitrine/commands/``.

Command modules are imported lazily by name so that ``vitrine predict`` never imports
FastAPI or Celery, and ``vitrine --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from indexer.errors import VitrineError

# Modules under vitrine.commands, each with ``register(subparsers)``.
COMMAND_MODULES = ["core", "service", "operate", "evaluate", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitrine",
        description="Categorize marketplace listings and find similar products.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = None
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"vitrine.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vitrine.commands.{name}":
                continue  # a layer not built yet
            raise
        result = mod.register(sub, bench)
        if name == "core":
            bench = result  # the `bench` group, shared with vitrine.commands.bench
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # noisy CPU-feature probing
    try:
        return int(args.func(args) or 0)
    except VitrineError as e:
        print(f"vitrine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
