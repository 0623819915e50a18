"""What one vitrine process holds: the state store, the replica, the ingest use case.

:class:`Runtime` is built once per process (``vitrine serve``, each Celery worker process)
and passed around explicitly. The adapters are thin: the HTTP API accepts and deletes
through it and reads ``runtime.replica``; the Celery task calls ``runtime.ingestor.run()``;
in embedded mode (no broker) :meth:`Runtime.start` runs the same ingestor in a thread.

Two modes, chosen by ``VITRINE_BROKER_URL`` (see :func:`indexer.state.open_store`):

* **redis**: statuses, pending listings and the log live in Redis, shared by any number of
  API and worker processes; the API wakes workers with Celery messages (services/queue.py);
* **embedded**: the same in one SQLite file in the data dir, which one process owns.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .encoders.registry import ModelRegistry
from .errors import Overloaded, VitrineError, public_reason
from .ingest import Ingestor
from .remote import fetch_image, url_policy
from .replica import open_replica
from .settings import Settings
from .state import StateStore, StoreUnavailable, open_store

if TYPE_CHECKING:
    from .catalog import Listing
    from .pipeline import Progress

log = logging.getLogger(__name__)

INGEST_TASK = "vitrine.ingest"
# the replica may trail the log by this many entries before /health calls it lagging
MAX_HEALTHY_LAG = 1000
# seconds a client refused for backpressure is told to wait (HTTP Retry-After)
BACKLOG_RETRY_AFTER = 5


def queue_name(settings: Settings) -> str:
    return f"{settings.redis_prefix}.ingest"


def celery_conf(settings: Settings) -> dict[str, Any]:
    """The Celery settings the API (sender) and the workers (consumers) must share."""
    return {
        "task_default_queue": queue_name(settings),
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "global_keyprefix": f"{settings.redis_prefix}:kombu:",
            "socket_connect_timeout": settings.broker_timeout,
        },
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "worker_hijack_root_logger": False,
    }


class Runtime:
    def __init__(self, settings: Settings, registry: ModelRegistry | None = None,
                 store: StateStore | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or open_store(settings)
        self.replica = open_replica(settings, self.store, self.registry)
        self.ingestor = Ingestor(settings, self.store, lambda: self.replica.v, self._fetch)
        # called after each accepted post: wakes whoever consumes (Celery message, thread)
        self.notify: Callable[[str, int], None] | None = None
        self.consumer_error: str | None = None
        self._consumer: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stopped = False
        self._backlog, self._backlog_at = 0, -1.0

    @property
    def mode(self) -> str:
        return "redis" if self.settings.broker_url else "embedded"

    def _fetch(self, url: str) -> bytes:
        s = self.settings
        return fetch_image(url, max_bytes=s.max_image_bytes, timeout=s.fetch_timeout,
                           deadline=s.fetch_deadline, **url_policy(s))

    # --- lifecycle --------------------------------------------------------------------------
    def start(self, *, consume: bool | None = None) -> None:
        """Load the models, tail the log, and (embedded, by default) consume in a thread."""
        self.replica.v.load_models()
        self.replica.start()
        if consume if consume is not None else self.mode == "embedded":
            self._stop.clear()
            self._consumer = threading.Thread(target=self._consume, name="ingest", daemon=True)
            self._consumer.start()

    def stop(self) -> None:
        """Finish the round in hand, stop tailing, snapshot, close. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._wake.set()
        if self._consumer is not None:
            self._consumer.join(timeout=60)
            self._consumer = None
        self.replica.stop()
        try:
            self.replica.catch_up()
            self.replica.maybe_snapshot(force=True)
        except VitrineError as e:
            log.warning("no snapshot at shutdown: %s", e)
        try:
            self.replica.close()  # with Milvus: hand the writer lease on now, not at its TTL
        except VitrineError as e:
            log.warning("closing the vector store: %s", e)
        self.store.close()

    def _consume(self) -> None:
        """The embedded consumer: rounds of the ingest use case until stopped."""
        while not self._stop.is_set():
            try:
                r = self.ingestor.run()
                self.consumer_error = None
            except StoreUnavailable as e:  # disk full, I/O error: report, wait, carry on
                self.consumer_error = str(e)
                log.warning("ingest paused: %s", e)
                self._stop.wait(1.0)
                continue
            except Exception as e:  # never let the consumer die: /health says why
                self.consumer_error = public_reason(e)
                log.exception("ingest round failed")
                self._stop.wait(1.0)
                continue
            if not r.claimed and not r.committed:
                # nothing claimable: sleep until a post arrives, or a lease/delay may expire
                self._wake.wait(0.5)
                self._wake.clear()

    # --- writes (API side) ------------------------------------------------------------------
    def accept(self, payload: dict[str, Any], photo: bytes | None) -> int:
        """Record an accepted post durably, then wake a consumer. Returns its version.

        Raises :class:`Overloaded` past ``max_pending`` listings not indexed yet.
        """
        self._check_backlog()
        version = self.store.accept(payload, photo)
        self._wake.set()
        if self.notify is not None:
            try:
                self.notify(payload["id"], version)
            except Exception:  # it is pending in the store: a worker's sweep picks it up
                log.warning("could not send the wake-up for %r", payload["id"], exc_info=True)
        return version

    def _check_backlog(self) -> None:
        # Counted at most once a second (a count per post would cost SQLite a scan): the
        # limit is a bound on the backlog, not an exact number.
        limit = self.settings.max_pending
        if not limit:
            return
        now = time.monotonic()
        if now - self._backlog_at >= 1.0:
            self._backlog, self._backlog_at = self.store.pending_count(), now
        if self._backlog >= limit:
            raise Overloaded(f"{self._backlog} listings are waiting to be indexed (limit "
                             f"{limit}); retry later", retry_after=BACKLOG_RETRY_AFTER)

    def delete(self, lid: str) -> int:
        version = self.store.delete(lid)
        self.replica.wait_version(lid, version, timeout=5)  # read-your-writes here
        return version

    # --- health -----------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Why this process is degraded (empty when healthy)."""
        out = []
        try:
            self.store.ping()
            if self.store.last_pos() < self.replica.pos:
                out.append("the state store has fewer log entries than this process applied "
                           "(a Redis without persistence restarted?): accepted writes were lost")
            lag = self.replica.lag()
            if lag > MAX_HEALTHY_LAG:
                out.append(f"the index replica lags {lag} log entries behind")
        except StoreUnavailable as e:
            out.append(f"state store unavailable: {e}")
            log.warning("health: the state store is unavailable", exc_info=e)
        if self.replica.stalled:
            out.append("the replica stopped tailing the log")
        if self.replica.last_error:
            out.append(f"replication: {self.replica.last_error}")
        if self.replica.skipped:
            out.append(f"{self.replica.skipped} log entries were built for another index layout "
                       "(written while a catalog was seeded) and skipped: post them again")
        if self.replica.last_snapshot_error:
            out.append(f"snapshot: {self.replica.last_snapshot_error}")
        if self._consumer is not None and not self._consumer.is_alive():
            out.append("the ingest consumer is not running")
        if self.consumer_error:
            out.append(f"ingest: {self.consumer_error}")
        return out


def seed(settings: Settings, store: StateStore, catalog: Path, images: Path | None = None,
         registry: ModelRegistry | None = None,
         progress: Callable[[int], AbstractContextManager[Progress]] | None = None) -> str:
    """Build the base index from a labelled catalog CSV, once: refused when one exists.

    The snapshot is published first, then a ``reload`` entry tells running replicas to load
    it. Returns a line for the operator. ``progress(total)``, when given, is entered around
    the embedding (a minute or more on CPU) and gives the callable told of each listing
    embedded (the CLI's progress bar).
    """
    from .catalog import read_listings
    from .index import current_snapshot
    from .pipeline import Vitrine

    root = settings.data_dir / "index"
    if current_snapshot(root) is not None or store.last_pos() > 0:
        return f"--catalog ignored: {settings.data_dir} already holds an index"
    listings, bad = read_listings(catalog, images, require_category=True)
    if not listings:
        raise VitrineError(f"no usable listing in {catalog}")
    v = Vitrine(settings, registry)
    with progress(len(listings)) if progress else nullcontext(None) as update:
        v.fit_lexical(listings)
        emb = v.embed(listings, update)
        v.build_from_embedded(listings, emb)
    if settings.vector_store != "faiss":
        from .milvus import move_to_milvus
        from .pipeline import entries

        # the fused vectors themselves, not what the FAISS index built for the calibration
        # gives back (past exact_max, a reduced, quantised reconstruction); before the
        # snapshot that names the collection
        move_to_milvus(v, settings, entries(listings, v.fuse(emb), emb.failed))
    v.save(root, {"log_pos": 0, "versions": {}})
    thumbs = _seed_thumbnails(settings, store, listings)
    [pos] = store.append([{"op": "reload"}])
    if pos != 1:
        # Seeding is meant for a service that has accepted nothing yet (`vitrine serve
        # --catalog` seeds before it serves). Listings indexed while the catalog was being
        # built were embedded for the empty index's layout and cannot join the new one.
        log.error("%d log entries were written while seeding; their listings must be posted "
                  "again", pos - 1)
    ids = {x.id for x in listings}
    refused = [b for b in bad if b.id not in ids]
    notes = [f"{len(refused)} rows refused"] if refused else []
    notes.append(f"{thumbs} thumbnails")
    if len(bad) > len(refused):
        notes.append(f"{len(bad) - len(refused)} indexed from their text only (photo missing)")
    return (f"seeded the index with {len(v)} listings from {catalog}"
            + (f" ({'; '.join(notes)})" if notes else ""))


def _seed_thumbnails(settings: Settings, store: StateStore, listings: list[Listing]) -> int:
    """The catalog's thumbnails, stored a chunk at a time. Returns how many were made."""
    from .images import image_limits
    from .thumbs import make_thumbnails

    limits = image_limits(settings)
    threads = max(1, len(os.sched_getaffinity(0)))
    made = 0
    for start in range(0, len(listings), 256):  # bounded memory, one store write per chunk
        chunk = [(x.id, x.image) for x in listings[start:start + 256] if x.image is not None]
        items = list(make_thumbnails(chunk, limits, threads))
        store.put_thumbnails(items)
        made += len(items)
    return made
