"""What one service process holds: the replica, the status store, the queue, the broker.

:class:`Runtime` is built once per process (API lifespan, Celery ``worker_process_init``,
``vitrine serve``) and passed around explicitly; nothing here is a module-level global.

Two modes, chosen by ``VITRINE_BROKER_URL``:

* **redis**: the log is a Redis stream, statuses a Redis hash, photos of queued listings
  short-lived Redis keys, and ingestion Celery tasks consumed by ``vitrine worker``;
* **embedded** (no broker): the log is ``<data_dir>/log.jsonl``, statuses
  ``<data_dir>/status.json``, queued listings fsynced files in ``<data_dir>/inbox/`` processed
  by a thread of the API process. Nothing accepted is lost: the inbox is replayed at start.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

from indexer.catalog import make_listing
from indexer.encoders.registry import ModelRegistry
from indexer.errors import ImageError, VitrineError
from indexer.settings import Settings

from .fetch import fetch_image
from .replication import LocalLog, RedisLog, Replica

log = logging.getLogger(__name__)
BLOB_TTL_S = 7 * 24 * 3600


class BrokerUnavailable(VitrineError):
    """The configured Redis cannot be reached."""


def connect_redis(settings: Settings) -> Any:
    """A Redis client that fails fast, with a clear message, when the broker is down."""
    import redis

    assert settings.broker_url
    t = settings.broker_timeout
    client = redis.Redis.from_url(
        settings.broker_url, socket_connect_timeout=t, socket_timeout=t + 5,
        health_check_interval=30,
    )
    try:
        client.ping()
    except redis.RedisError as e:
        raise BrokerUnavailable(
            f"cannot reach the broker at {redact(settings.broker_url)} within {t:g} s: {e}"
        ) from e
    return client


def redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class LocalStatus:
    """Statuses of ingested listings in one JSON file, rewritten atomically on each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._d: dict[str, dict[str, Any]] = (
            json.loads(path.read_text()) if path.is_file() else {}
        )

    def get(self, lid: str) -> dict[str, Any] | None:
        with self._lock:
            return self._d.get(lid)

    def set(self, lid: str, status: dict[str, Any]) -> None:
        with self._lock:
            self._d[lid] = status
            self._flush()

    def delete(self, lid: str) -> None:
        with self._lock:
            if self._d.pop(lid, None) is not None:
                self._flush()

    def _flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(self._d, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class RedisStatus:
    def __init__(self, client: Any, prefix: str) -> None:
        self.r, self.key = client, f"{prefix}:status"

    def get(self, lid: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.key, lid)
        return json.loads(raw) if raw else None

    def set(self, lid: str, status: dict[str, Any]) -> None:
        self.r.hset(self.key, lid, json.dumps(status))

    def delete(self, lid: str) -> None:
        self.r.hdel(self.key, lid)


class Runtime:
    """Settings + registry + replica + status store + a way to enqueue, for one process."""

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self.prefix = settings.redis_prefix
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis: Any = None
        self.celery: Any = None
        self._inbox: queue.Queue[Path] | None = None
        self._inbox_thread: threading.Thread | None = None
        if settings.broker_url:
            self.redis = connect_redis(settings)
            oplog: Any = RedisLog(self.redis, self.prefix)
            self.status: Any = RedisStatus(self.redis, self.prefix)
            lock = self.redis.lock(f"{self.prefix}:snapshot-lock", timeout=600)
        else:
            oplog = LocalLog(settings.data_dir / "log.jsonl")
            self.status = LocalStatus(settings.data_dir / "status.json")
            lock = None
        self.oplog = oplog
        self.replica = Replica.open(settings, oplog, self.registry, snapshot_lock=lock)
        if isinstance(oplog, LocalLog):
            oplog.ensure_after(self.replica.pos)

    @property
    def mode(self) -> str:
        return "redis" if self.redis is not None else "embedded"

    @property
    def inbox_dir(self) -> Path:
        return self.settings.data_dir / "inbox"

    # --- lifecycle --------------------------------------------------------------------------
    def start(self, *, consume_inbox: bool = True) -> None:
        """Load models, tail the log, and (embedded) start the in-process ingest thread."""
        self.replica.v.load_models()
        self.replica.start()
        if self.mode == "embedded" and consume_inbox:
            self._inbox = queue.Queue()
            self.inbox_dir.mkdir(parents=True, exist_ok=True)
            pending = sorted(self.inbox_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
            for p in pending:  # accepted before a crash or restart: finish them now
                self._inbox.put(p)
            self._inbox_thread = threading.Thread(target=self._consume, daemon=True,
                                                  name="embedded-ingest")
            self._inbox_thread.start()

    def stop(self) -> None:
        """Finish the listing in hand, stop tailing, snapshot. Safe to call twice."""
        if self._inbox is not None:
            self._inbox.put(Path())  # sentinel
            if self._inbox_thread is not None:
                self._inbox_thread.join(timeout=30)
            self._inbox = self._inbox_thread = None
        self.replica.stop()
        self.replica.maybe_snapshot(force=True)
        if isinstance(self.oplog, LocalLog):
            self.oplog.close()

    # --- enqueue (API side) -----------------------------------------------------------------
    def enqueue(self, payload: dict[str, Any], image: bytes | None) -> None:
        """Persist the accepted listing durably, then hand it to a worker."""
        version = payload["version"]
        lid = payload["id"]
        self.status.set(lid, {"status": "queued", "version": version})
        if self.mode == "redis":
            if image is not None:
                key = f"{self.prefix}:blob:{version}"
                self.redis.set(key, image, ex=BLOB_TTL_S)
                payload["image_key"] = key
            self.celery.send_task("vitrine.ingest", args=[payload], queue=self.queue_name)
        else:
            assert self._inbox is not None, "runtime not started"
            if image is not None:
                payload["image_b64"] = base64.b64encode(image).decode()
            p = self.inbox_dir / f"{version}.json"
            tmp = p.with_suffix(".tmp")
            with tmp.open("w") as f:
                json.dump(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
            self._inbox.put(p)

    @property
    def queue_name(self) -> str:
        return f"{self.prefix}.ingest"

    def queue_depth(self) -> int:
        if self.mode == "redis":
            # kombu keeps the queue as a list under its global key prefix (workers/app.py)
            return int(self.redis.llen(f"{self.prefix}:kombu:{self.queue_name}"))
        return len(list(self.inbox_dir.glob("*.json"))) if self.inbox_dir.is_dir() else 0

    def _consume(self) -> None:
        assert self._inbox is not None
        stop = False
        while not stop:
            # drain what is waiting, up to a batch: the encoders are much faster in batches
            paths = [self._inbox.get()]
            while len(paths) < self.settings.batch_size:
                try:
                    paths.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if Path() in paths:
                stop = True
                paths = [p for p in paths if p != Path()]
            items = []
            for p in paths:
                try:
                    payload = json.loads(p.read_text())
                except (OSError, ValueError):
                    log.exception("unreadable inbox file %s; dropped", p.name)
                    p.unlink(missing_ok=True)
                    continue
                image = payload.pop("image_b64", None)
                items.append((p, payload, base64.b64decode(image) if image else None))
            try:
                ingest_many(self, [(pl, im) for _, pl, im in items])
            except Exception:
                log.exception("embedded ingest of %d listings failed", len(items))
                for _, pl, _ in items:
                    _failed(self, pl["id"], pl["version"], "internal error while indexing")
            for p, _, _ in items:
                p.unlink(missing_ok=True)

    # --- delete -----------------------------------------------------------------------------
    def delete(self, lid: str) -> str:
        self.status.delete(lid)
        return self.oplog.append({"op": "delete", "id": lid})


def new_version() -> str:
    return uuid.uuid4().hex


def ingest(rt: Runtime, payload: dict[str, Any], image: bytes | None = None) -> dict[str, Any]:
    """Embed, vote and index one accepted listing (see :func:`ingest_many`)."""
    return ingest_many(rt, [(payload, image)])[0]


def ingest_many(
    rt: Runtime, items: list[tuple[dict[str, Any], bytes | None]]
) -> list[dict[str, Any]]:
    """Embed (in one batch), vote and index accepted listings. Idempotent by (id, version).

    Runs in a Celery worker or the embedded ingest thread. Each upsert is appended to the log
    *before* the status says "indexed", so a crash in between only repeats an idempotent upsert.
    """
    s = rt.settings
    results: list[dict[str, Any]] = [{} for _ in items]
    todo: list[tuple[int, dict[str, Any], Any, str | None]] = []
    for i, (payload, image) in enumerate(items):
        lid, version = payload["id"], payload["version"]
        current = rt.status.get(lid)
        if current is None:
            results[i] = {"status": "deleted"}
            continue
        if current.get("version") != version:
            results[i] = current  # a newer submission superseded this event
            continue
        if current.get("status") in ("indexed", "failed"):
            results[i] = current  # a redelivered or duplicated event
            continue
        warning = None
        try:
            if image is None and payload.get("image_key"):
                image = rt.redis.get(payload["image_key"])
            if image is None and payload.get("image_url"):
                try:
                    image = fetch_image(payload["image_url"], max_bytes=s.max_image_bytes,
                                        timeout=s.fetch_timeout,
                                        allow_private=s.allow_private_urls)
                except ImageError as e:
                    warning = f"photo not used: {e}"
            listing = make_listing(lid, payload.get("title") or "",
                                   payload.get("description") or "",
                                   image=image, category=payload.get("category"))
        except VitrineError as e:
            results[i] = _failed(rt, lid, version, str(e))
            continue
        todo.append((i, payload, listing, warning))
    if not todo:
        return results
    v = rt.replica.v
    emb = v.embed([t[2] for t in todo])
    fused = v.fuse(emb)
    last: str | None = None
    done: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for j, (i, payload, listing, warning) in enumerate(todo):
        lid, version = listing.id, payload["version"]
        if j in emb.failed:
            results[i] = _failed(rt, lid, version, emb.problems[j])
            continue
        vote = v.vote_vector(fused[j], exclude=lid)
        category = listing.category or vote.category
        source = "seller" if listing.category else "predicted"
        last = rt.oplog.append({
            "op": "upsert", "id": lid, "vec": fused[j],
            "meta": {"title": listing.title, "category": category, "source": source},
            "confidence": vote.confidence, "uncertain": vote.uncertain,
        })
        status: dict[str, Any] = {
            "status": "indexed", "version": version, "category": category,
            "confidence": vote.confidence, "uncertain": vote.uncertain, "source": source,
            "predicted": vote.category,
        }
        warning = warning or emb.problems.get(j)
        if warning:
            status["warning"] = warning
        results[i] = status
        done.append((lid, payload, status))
    if last is not None:
        # "indexed" means searchable here: wait for this process's replica to apply the log
        if not rt.replica.wait_for(last, timeout=5):
            log.warning("the log entry %s is not applied here after 5 s", last)
    for lid, payload, status in done:
        rt.status.set(lid, status)
        if payload.get("image_key") and rt.redis is not None:
            rt.redis.delete(payload["image_key"])
    return results


def _failed(rt: Runtime, lid: str, version: str, error: str) -> dict[str, Any]:
    status = {"status": "failed", "version": version, "error": error}
    rt.status.set(lid, status)
    return status


def seed(settings: Settings, catalog: Path, images: Path | None = None,
         registry: ModelRegistry | None = None) -> str:
    """Build the base index from a labelled catalog CSV, once: refused when one exists.

    The snapshot is written first, then a ``reload`` entry tells running replicas to load it.
    Returns a line for the operator.
    """
    from indexer.catalog import read_listings
    from indexer.index import current_snapshot
    from indexer.pipeline import Vitrine

    root = settings.data_dir / "index"
    if settings.broker_url:
        oplog: Any = RedisLog(connect_redis(settings), settings.redis_prefix)
    else:
        oplog = LocalLog(settings.data_dir / "log.jsonl")
    try:
        if current_snapshot(root) is not None or oplog.last() not in ("0", "0-0"):
            return f"--catalog ignored: {settings.data_dir} already holds an index"
        listings, bad = read_listings(catalog, images, require_category=True)
        if not listings:
            raise VitrineError(f"no usable listing in {catalog}")
        v = Vitrine(settings, registry)
        v.build(listings)
        v.save(root, {"log_pos": oplog.last(), "info": {}})
        oplog.append({"op": "reload"})
        return f"seeded the index with {len(v)} listings from {catalog} ({len(bad)} rows refused)"
    finally:
        if isinstance(oplog, LocalLog):
            oplog.close()
