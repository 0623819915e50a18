"""Service commands: ``vitrine serve`` (HTTP API) and ``vitrine worker`` (Celery ingestion)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_model_flags, progress_bar, settings_from_args


def register(sub: argparse._SubParsersAction, bench_sub: object = None) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the HTTP API (embedded in-process indexing unless VITRINE_BROKER_URL is set)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--catalog", type=Path,
                   help="seed an empty index with this labelled catalog CSV first")
    p.add_argument("--images", type=Path, help="photos of --catalog (default: images/ beside it)")
    p.add_argument("--data-dir", type=Path, help="state folder (default: VITRINE_DATA_DIR)")
    add_model_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="consume ingestion tasks from VITRINE_BROKER_URL (Celery)")
    p.add_argument("--concurrency", type=int, help="prefork processes (VITRINE_WORKER_CONCURRENCY)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    p.add_argument("--data-dir", type=Path, help="state folder (default: VITRINE_DATA_DIR)")
    add_model_flags(p)
    p.set_defaults(func=cmd_worker)

    if bench_sub is not None:
        p = bench_sub.add_parser(  # type: ignore[attr-defined]
            "service",
            help="through Redis + Celery workers: ingest throughput vs bare encoders, kill -9 "
                 "losses, POST /search latency over HTTP",
        )
        _add_redis_bench_flags(p)
        p.add_argument("--ingest", type=int, default=800,
                       help="listings ingested end to end (default 800: a sustained run of "
                            "~15 s; a short burst mostly measures its ramp and its tail)")
        p.add_argument("--kill9", type=int, default=64,
                       help="listings of the kill -9 run (0: skip it)")
        p.add_argument("--workers", default="2x1",
                       help="worker layouts to measure, comma-separated PROCESSESxTHREADS "
                            "(default 2x1: two processes, one torch thread each); the first "
                            "is the headline and the kill -9 run's")
        p.add_argument("--seed", type=int, default=0,
                       help="seed the index with this many catalog listings (default: all "
                            "the others)")
        p.add_argument("--size", type=int, default=100_000,
                       help="index size for the search latency (synthetic vectors added)")
        p.add_argument("--queries", type=int, default=500, help="queries per kind")
        p.add_argument("--lease-seconds", type=float, default=60.0,
                       help="of the bench's workers: a killed worker's batch comes back after it")
        p.add_argument("--visibility-timeout", type=float, default=60.0,
                       help="of the bench's workers: a killed worker's wake-up message comes "
                            "back after it")
        p.add_argument("--out", type=Path, help="also write the JSON here")
        p.add_argument("--logs", type=Path, help="keep the API's and workers' logs here")
        add_model_flags(p)
        p.set_defaults(func=cmd_bench_service)

        p = bench_sub.add_parser(  # type: ignore[attr-defined]
            "chaos",
            help="2 APIs + 2 workers under a mixed HTTP load, one process killed with "
                 "SIGKILL per cycle: lost / stale / resurrected writes, recovery times",
        )
        p.add_argument("--cycles", type=int, default=10, help="kills, one per cycle (default 10)")
        _add_redis_bench_flags(p)
        p.add_argument("--seed-per-category", type=int, default=10,
                       help="catalog listings per category in the seeded index (default 10)")
        p.add_argument("--clients", type=int, default=3, help="load threads (default 3)")
        p.add_argument("--cycle-seconds", type=float, default=8.0,
                       help="a cycle's kill comes at a random moment within this many seconds")
        p.add_argument("--lease-seconds", type=float, default=5.0,
                       help="of the workers: a killed worker's claimed listings come back "
                            "after it (default 5)")
        p.add_argument("--max-attempts", type=int, default=10,
                       help="of the workers: claims before a listing ends failed (default 10, "
                            "so that kills do not dead-letter)")
        p.add_argument("--photo-share", type=float, default=0.3,
                       help="share of posts that carry a photo (default 0.3)")
        p.add_argument("--random-seed", type=int, help="for the load and the kills")
        p.add_argument("--agree-timeout", type=float, default=600.0,
                       help="seconds for pending 0 and equal digests after the load")
        p.add_argument("--json", action="store_true", help="JSON only on stdout (default too)")
        p.add_argument("--out", type=Path, help="also write the JSON here")
        p.add_argument("--logs", type=Path, help="keep the APIs' and workers' logs here")
        add_model_flags(p)
        p.set_defaults(func=cmd_bench_chaos)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from indexer.encoders.registry import ModelRegistry
    from indexer.runtime import Runtime, seed
    from indexer.state import open_store
    from services.api import check_settings, create_app

    settings = settings_from_args(args)
    check_settings(settings)  # before the models load and the catalog is seeded
    check_port(args.host, args.port)  # now, not after seconds of model loading
    # fails fast, with a clear message, if the broker is down or another process owns the
    # data dir
    store = open_store(settings)
    registry = ModelRegistry(settings)  # one load of each model for the seeding and serving
    try:
        if args.catalog:
            # first run: a bar on stderr while the catalog is embedded (a minute or more)
            print(seed(settings, store, args.catalog, args.images, registry,
                       progress=lambda n: progress_bar(n, "seeding the index")),
                  file=sys.stderr)
        runtime = Runtime(settings, registry, store)
    except BaseException:
        store.close()
        raise
    mode = "redis" if settings.broker_url else "embedded"
    base = f"http://{args.host}:{args.port}"
    print(f"vitrine: serving on {base} ({mode} mode, state in {settings.data_dir}); "
          f"API docs at {base}/docs. Try:\n"
          f"  curl -s {base}/search -H 'content-type: application/json' "
          "-d '{\"text\": \"analog wrist watch for men\", \"k\": 5}'\n"
          f"  vitrine search{_server_flag(base)} --text 'analog wrist watch for men' -k 5",
          file=sys.stderr)
    try:
        uvicorn.run(create_app(settings, runtime), host=args.host, port=args.port,
                    log_level="info", timeout_graceful_shutdown=10)
    finally:
        runtime.stop()
    return 0


def _server_flag(base: str) -> str:
    """The ``--server`` flag `vitrine search` needs to reach ``base`` (none for its default)."""
    from .core import DEFAULT_SERVER

    return "" if base == DEFAULT_SERVER else f" --server {base}"


def check_port(host: str, port: int) -> None:
    """Fail with a clear message when ``host:port`` cannot be listened on (a server there
    already, or an address not of this machine), as uvicorn binds it: SO_REUSEADDR set."""
    import errno
    import socket

    from indexer.errors import VitrineError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as e:
            raise VitrineError(f"--host {host!r}: {e.strerror}") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise VitrineError(
                    f"port {port} on {host} is already in use (another `vitrine serve`, "
                    "`make demo`?): stop it, or pick another port with --port "
                    "(`make demo PORT=...`)"
                ) from None
            raise VitrineError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_worker(args: argparse.Namespace) -> int:
    from indexer.errors import VitrineError
    from indexer.runtime import queue_name
    from indexer.state import open_store
    from workers.app import create_app

    settings = settings_from_args(args, worker_concurrency=args.concurrency)
    if not settings.broker_url:
        raise VitrineError(
            "`vitrine worker` needs VITRINE_BROKER_URL=redis://...; without a broker, "
            "`vitrine serve` indexes in-process"
        )
    open_store(settings).close()  # a clear error now rather than Celery's retry loop
    app = create_app(settings)
    app.worker_main([
        "worker", "--loglevel=INFO", f"--pool={args.pool}",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={queue_name(settings)}",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--hostname={settings.redis_prefix}-worker-{os.getpid()}@%h",
    ])
    return 0


def _add_redis_bench_flags(p: argparse.ArgumentParser) -> None:
    """The flags the benchmarks on a real Redis share."""
    p.add_argument("--data", type=Path, required=True, help="folder with the Flipkart CSV")
    p.add_argument("--broker", default=None,
                   help="Redis URL (default: VITRINE_BROKER_URL, else "
                        "redis://127.0.0.1:6379/0); keys live under a fresh prefix and "
                        "are deleted afterwards")


def _emit(result: dict[str, object], out: Path | None) -> None:
    import json

    from .common import print_json

    print_json(result)
    if out:
        out.write_text(json.dumps(result, indent=2, default=float))


def cmd_bench_service(args: argparse.Namespace) -> int:
    import tempfile

    from evaluation.bench_service import run_service_bench

    with tempfile.TemporaryDirectory(prefix="vitrine-bench-") as tmp:
        settings = settings_from_args(args, data_dir=Path(tmp))
        broker = args.broker or settings.broker_url or "redis://127.0.0.1:6379/0"
        result = run_service_bench(
            settings, args.data, broker_url=broker, n_ingest=args.ingest, n_kill9=args.kill9,
            size=args.size, queries=args.queries, seed_size=args.seed,
            workers=tuple(w.strip() for w in args.workers.split(",") if w.strip()),
            visibility_timeout=args.visibility_timeout, lease_seconds=args.lease_seconds,
            logs=args.logs,
        )
    _emit(result, args.out)
    return 0


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    import tempfile

    from evaluation.bench_chaos import run_chaos_bench

    with tempfile.TemporaryDirectory(prefix="vitrine-chaos-") as tmp:
        settings = settings_from_args(args, data_dir=Path(tmp))
        broker = args.broker or settings.broker_url or "redis://127.0.0.1:6379/0"
        result = run_chaos_bench(
            settings, args.data, broker_url=broker, cycles=args.cycles,
            seed_per_category=args.seed_per_category, clients=args.clients,
            cycle_s=args.cycle_seconds, lease_seconds=args.lease_seconds,
            max_attempts=args.max_attempts, photo_share=args.photo_share,
            agree_timeout=args.agree_timeout, random_seed=args.random_seed, logs=args.logs,
        )
    _emit(result, args.out)
    # non-zero when a write was lost, served stale or resurrected
    return 1 if result["lost"] or result["stale"] or result["resurrected"] else 0
