"""``vitrine bench service``: the service's numbers, measured in one run on this machine.

* bare encoder throughput (``Vitrine.embed`` in batches) vs end-to-end ingest throughput
  (POST /listings over HTTP -> embedded queue -> embed, vote, log, index -> "indexed");
* POST /search latency over HTTP with ``size`` listings indexed (the real catalog plus
  synthetic vectors near it), by listing id (index + HTTP) and by text (plus the encoder).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from indexer.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(xs)}


def run_service_bench(settings: Settings, data: Path, *, n_ingest: int = 200,
                      size: int = 100_000, queries: int = 500) -> dict[str, Any]:
    import logging

    import uvicorn

    from indexer.catalog import read_listings
    from indexer.pipeline import ListingMeta

    from .api import create_app
    from .runtime import Runtime, seed

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    csv = next(Path(data).glob("*.csv"))
    listings, _ = read_listings(csv)
    settings = settings.model_copy(update={"broker_url": None})
    seed_part, ingest_part = listings[: len(listings) - n_ingest], listings[-n_ingest:]
    # seed the index from the catalog minus the listings to ingest
    import csv as csvmod
    seed_csv = settings.data_dir / "seed.csv"
    ingest_ids = {x.id for x in ingest_part}
    with csv.open(newline="", encoding="utf-8") as f_in, seed_csv.open("w", newline="") as f_out:
        reader = csvmod.DictReader(f_in)
        writer = csvmod.DictWriter(f_out, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        for row in reader:
            if row.get("uniq_id") not in ingest_ids:
                writer.writerow(row)
    seed(settings, seed_csv, csv.parent / "images")
    rt = Runtime(settings)
    rt.start()
    v = rt.replica.v

    # bare encoders, batched, on the same listings
    t0 = time.perf_counter()
    v.embed(ingest_part)
    bare = len(ingest_part) / (time.perf_counter() - t0)

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, rt), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"seed_size": len(seed_part), "machine_cpus": _cpus()}
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            import base64

            t0 = time.perf_counter()
            for x in ingest_part:
                body: dict[str, Any] = {"id": x.id, "title": x.title,
                                        "description": x.description}
                if isinstance(x.image, str | Path) and Path(x.image).is_file():
                    body["image_base64"] = base64.b64encode(Path(x.image).read_bytes()).decode()
                r = c.post("/listings", json=body)
                r.raise_for_status()
            while any(x.id not in v for x in ingest_part):
                time.sleep(0.05)
            e2e = len(ingest_part) / (time.perf_counter() - t0)
            out["ingest"] = {
                "listings": len(ingest_part), "bare_encoder_per_s": bare,
                "end_to_end_per_s": e2e, "ratio": e2e / bare,
                "mode": "embedded (in-process queue)",
            }
            # grow the index to `size` with synthetic neighbours of the real vectors
            real_ids = v.index.ids()
            real = v.index.get(real_ids)
            rng = np.random.default_rng(0)
            extra = max(0, size - len(real_ids))
            for start in range(0, extra, 10_000):
                n = min(10_000, extra - start)
                base_rows = real[rng.integers(0, len(real), n)]
                vecs = (base_rows + rng.normal(0, 0.05, base_rows.shape)).astype(np.float32)
                ids = [f"syn-{start + i}" for i in range(n)]
                with v._write_lock:
                    v.index.upsert(ids, vecs)
                    for i in ids:
                        v.meta[i] = ListingMeta(i, None, "predicted")
            out["index_size"] = len(v)
            for kind, make in (
                ("by_listing_id", lambda i: {"listing_id": real_ids[i % len(real_ids)]}),
                ("by_text", lambda i: {"text": listings[i % len(listings)].title}),
            ):
                for i in range(10):
                    c.post("/search", json=make(i))  # warm-up
                lat = []
                for i in range(queries):
                    t = time.perf_counter()
                    r = c.post("/search", json={**make(i), "k": 10})
                    lat.append(time.perf_counter() - t)
                    r.raise_for_status()
                out[f"search_{kind}"] = _pct(lat)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        rt.replica.stop()
    out["kill9_lost"] = "see tests/workers/test_celery.py::test_kill9_mid_batch (asserts 0)"
    return out


def _cpus() -> int:
    import os

    return os.cpu_count() or 1
