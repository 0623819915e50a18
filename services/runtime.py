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
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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

    def get_many(self, lids: list[str]) -> list[dict[str, Any] | None]:
        with self._lock:
            return [self._d.get(lid) for lid in lids]

    def set(self, lid: str, status: dict[str, Any]) -> None:
        self.set_many({lid: status})

    def set_many(self, statuses: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            self._d.update(statuses)
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

    def get_many(self, lids: list[str]) -> list[dict[str, Any] | None]:
        if not lids:
            return []
        return [json.loads(raw) if raw else None for raw in self.r.hmget(self.key, lids)]

    def set(self, lid: str, status: dict[str, Any], pipe: Any = None) -> None:
        """Write now, or as part of ``pipe`` (a Redis pipeline the caller executes)."""
        (pipe or self.r).hset(self.key, lid, json.dumps(status))

    def set_many(self, statuses: dict[str, dict[str, Any]]) -> None:
        if statuses:
            self.r.hset(self.key, mapping={k: json.dumps(v) for k, v in statuses.items()})

    def delete(self, lid: str) -> None:
        self.r.hdel(self.key, lid)


class Ledger:
    """Redis mode: every accepted ingestion event until its outcome is final, with its payload.

    The Celery message is what normally carries an event to a worker, but kombu's Redis
    transport pops a message and records it as unacknowledged in two steps, so a worker killed
    at that instant loses it. The ledger is the safety net: an event enters it atomically with
    its ``queued`` status (:meth:`Runtime.enqueue`), leaves it once its listing is indexed or
    failed (or the event is superseded), and a worker's sweep re-sends an event that stayed
    past the visibility timeout while no queue holds it (``workers/app.py``). Re-sending is
    harmless: events are idempotent by (id, version).
    """

    def __init__(self, client: Any, prefix: str) -> None:
        self.r = client
        self.since = f"{prefix}:pending"  # zset: version -> time accepted (or last re-sent)
        self.payloads = f"{prefix}:pending-payload"  # hash: version -> payload JSON

    def add(self, pipe: Any, payload: dict[str, Any]) -> None:
        pipe.zadd(self.since, {payload["version"]: time.time()})
        pipe.hset(self.payloads, payload["version"], json.dumps(payload))

    def done(self, versions: list[str]) -> None:
        if versions:
            pipe = self.r.pipeline(transaction=True)
            pipe.zrem(self.since, *versions)
            pipe.hdel(self.payloads, *versions)
            pipe.execute()

    def overdue(self, older_than: float, limit: int = 500) -> list[dict[str, Any]]:
        """Payloads of events pending for more than ``older_than`` seconds, oldest first."""
        versions = self.r.zrangebyscore(self.since, "-inf", time.time() - older_than,
                                        start=0, num=limit)
        if not versions:
            return []
        raws = self.r.hmget(self.payloads, versions)
        out = []
        for v, raw in zip(versions, raws, strict=True):
            if raw:
                out.append(json.loads(raw))
            else:  # no payload (cannot happen through enqueue): nothing to re-send
                self.r.zrem(self.since, v)
        return out

    def touch(self, versions: list[str]) -> None:
        if versions:
            now = time.time()
            self.r.zadd(self.since, {v: now for v in versions}, xx=True)

    def __len__(self) -> int:
        return int(self.r.zcard(self.since))


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
            self.ledger: Ledger | None = Ledger(self.redis, self.prefix)
            lock = self.redis.lock(f"{self.prefix}:snapshot-lock", timeout=600)
        else:
            self.ledger = None
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
        if self.mode == "redis":
            assert self.ledger is not None
            # status, photo and ledger entry in one transaction, then the task: an event that
            # is accepted is always in the ledger, whatever happens to its message
            pipe = self.redis.pipeline(transaction=True)
            if image is not None:
                key = f"{self.prefix}:blob:{version}"
                pipe.set(key, image, ex=BLOB_TTL_S)
                payload["image_key"] = key
            self.status.set(lid, {"status": "queued", "version": version}, pipe=pipe)
            self.ledger.add(pipe, payload)
            pipe.execute()
            self.celery.send_task("vitrine.ingest", args=[payload], queue=self.queue_name)
        else:
            self.status.set(lid, {"status": "queued", "version": version})
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
            # drain what is waiting, up to a worker batch (as a Celery worker task takes them)
            paths = [self._inbox.get()]
            while len(paths) < self.settings.worker_batch:
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


Item = tuple[dict[str, Any], bytes | None]


def ingest_many(rt: Runtime, items: list[Item], *, batch: str | None = None
                ) -> list[dict[str, Any]]:
    """Embed (in one batch), vote and index accepted listings. Idempotent by (id, version).

    Runs in a Celery worker (one call per claimed batch, see workers/app.py) or the embedded
    ingest thread. Returns one status per item, in order.

    * An event whose status is already ``indexed``/``failed``, superseded by a newer version
      or deleted is skipped; the same event twice in ``items`` (a duplicated delivery) is
      done once.
    * Each upsert is appended to the log *before* the status says "indexed", so a crash in
      between only repeats an idempotent upsert.
    * One listing never sinks the others: a listing that cannot be indexed (no text and an
      unusable photo...) fails alone, and if the batch as a whole raises (other than a broker
      error, which propagates so that the events are redelivered), each listing is retried
      alone and only those that raise again are marked failed.
    """
    batch = batch or uuid.uuid4().hex[:12]
    results: list[dict[str, Any]] = [{} for _ in items]
    first: dict[tuple[str, str], int] = {}
    dups: list[tuple[int, int]] = []
    current = rt.status.get_many([p["id"] for p, _ in items])
    todo: list[tuple[int, dict[str, Any], bytes | None]] = []
    for i, (payload, image) in enumerate(items):
        key = (payload["id"], payload["version"])
        if key in first:
            dups.append((i, first[key]))
            continue
        first[key] = i
        st = current[i]
        if st is None:
            results[i] = {"status": "deleted"}
        elif st.get("version") != payload["version"]:
            results[i] = st  # a newer submission superseded this event
        elif st.get("status") in ("indexed", "failed"):
            results[i] = st  # a redelivered or duplicated event
        else:
            todo.append((i, payload, image))
    if todo:
        try:
            _index(rt, todo, results, batch)
        except Exception as e:
            if is_broker_error(e):
                raise
            log.exception("indexing a batch of %d listings failed%s", len(todo),
                          "; retrying them one by one" if len(todo) > 1 else "")
            for i, payload, image in todo:
                if len(todo) > 1:  # alone, it may go through
                    try:
                        _index(rt, [(i, payload, image)], results, batch)
                        continue
                    except Exception as e1:
                        if is_broker_error(e1):
                            raise
                        log.exception("indexing listing %r failed", payload["id"])
                results[i] = _failed(rt, payload["id"], payload["version"],
                                     "internal error while indexing")
    for i, j in dups:
        results[i] = results[j]
    if rt.ledger is not None:
        # every event here has a final outcome now (or was superseded/deleted/duplicated)
        rt.ledger.done(list({p["version"] for p, _ in items}))
    return results


def is_broker_error(e: BaseException) -> bool:
    """Redis or kombu could not be reached: the event must be redelivered, not failed."""
    return isinstance(e, BrokerUnavailable) or type(e).__module__.split(".")[0] in (
        "redis", "kombu", "amqp")


def _index(rt: Runtime, todo: list[tuple[int, dict[str, Any], bytes | None]],
           results: list[dict[str, Any]], batch: str) -> None:
    s = rt.settings
    # photos: the queued blobs in one round trip, image URLs fetched concurrently
    keys = [p["image_key"] for _, p, im in todo if im is None and p.get("image_key")]
    blobs = dict(zip(keys, rt.redis.mget(keys), strict=True)) if keys and rt.redis else {}
    urls = [p["image_url"] for _, p, im in todo
            if im is None and not p.get("image_key") and p.get("image_url")]
    fetched = _fetch_all(urls, s)
    rows: list[tuple[int, dict[str, Any], Any, str | None]] = []
    for i, payload, image in todo:
        lid, version = payload["id"], payload["version"]
        warning = None
        if image is None and payload.get("image_key"):
            image = blobs.get(payload["image_key"])
        if image is None and payload.get("image_url"):
            got = fetched.get(payload["image_url"])
            if isinstance(got, bytes):
                image = got
            elif got is not None:
                warning = f"photo not used: {got}"
        try:
            listing = make_listing(lid, payload.get("title") or "",
                                   payload.get("description") or "",
                                   image=image, category=payload.get("category"))
        except VitrineError as e:
            results[i] = _failed(rt, lid, version, str(e))
            continue
        rows.append((i, payload, listing, warning))
    if not rows:
        return
    v = rt.replica.v
    emb = v.embed([r[2] for r in rows])
    fused = v.fuse(emb)
    entries: list[dict[str, Any]] = []
    done: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    for j, (i, payload, listing, warning) in enumerate(rows):
        lid, version = listing.id, payload["version"]
        if j in emb.failed:
            results[i] = _failed(rt, lid, version, emb.problems[j])
            continue
        vote = v.vote_vector(fused[j], exclude=lid)
        category = listing.category or vote.category
        source = "seller" if listing.category else "predicted"
        entries.append({
            "op": "upsert", "id": lid, "vec": fused[j],
            "meta": {"title": listing.title, "category": category, "source": source},
            "confidence": vote.confidence, "uncertain": vote.uncertain,
        })
        status: dict[str, Any] = {
            "status": "indexed", "version": version, "category": category,
            "confidence": vote.confidence, "uncertain": vote.uncertain, "source": source,
            "predicted": vote.category, "batch": batch, "batch_size": len(rows),
        }
        warning = warning or emb.problems.get(j)
        if warning:
            status["warning"] = warning
        done.append((i, payload, status))
    if not entries:
        return
    last = rt.oplog.append_many(entries)[-1]
    # "indexed" means searchable here: wait for this process's replica to apply the log
    if not rt.replica.wait_for(last, timeout=5):
        log.warning("the log entry %s is not applied here after 5 s", last)
    rt.status.set_many({payload["id"]: status for _, payload, status in done})
    for i, _, status in done:
        results[i] = status
    used = [p["image_key"] for _, p, _ in done if p.get("image_key")]
    if used and rt.redis is not None:
        rt.redis.delete(*used)


def _fetch_all(urls: list[str], s: Settings) -> dict[str, bytes | ImageError]:
    """Fetch image URLs (each SSRF-checked), several at a time: the wait is network I/O."""
    def one(url: str) -> bytes | ImageError:
        try:
            return fetch_image(url, max_bytes=s.max_image_bytes, timeout=s.fetch_timeout,
                               allow_private=s.allow_private_urls)
        except ImageError as e:
            return e

    uniq = list(dict.fromkeys(urls))
    if len(uniq) <= 1:
        return {u: one(u) for u in uniq}
    with ThreadPoolExecutor(max_workers=min(8, len(uniq)),
                            thread_name_prefix="fetch") as pool:
        return dict(zip(uniq, pool.map(one, uniq), strict=True))


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
        ids = {x.id for x in listings}
        refused = [b for b in bad if b.id not in ids]
        notes = [f"{len(refused)} rows refused"] if refused else []
        if len(bad) > len(refused):
            notes.append(f"{len(bad) - len(refused)} indexed from their text only (photo missing)")
        return (f"seeded the index with {len(v)} listings from {catalog}"
                + (f" ({'; '.join(notes)})" if notes else ""))
    finally:
        if isinstance(oplog, LocalLog):
            oplog.close()
