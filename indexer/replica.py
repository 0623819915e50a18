"""One process's copy of the index, kept in step with the log of the state store.

Every process (API, worker, embedded server) holds a :class:`Replica`: a
:class:`~indexer.pipeline.Vitrine` loaded from the published snapshot in
``VITRINE_DATA_DIR/index``, then brought up to date by applying the log from the position
stored *inside* that snapshot, then tailing it. Nobody writes an index directly: results are
committed to the store's log (:meth:`~indexer.state.StateStore.commit`) and every replica,
the committer's included, applies the entries.

* **Highest version wins, per id.** The replica keeps the version of every listing it holds
  and of every delete (a tombstone), and skips an entry whose version is not higher. So an
  entry applied twice, a replay from an older position, or entries out of order can never
  undo a newer write.
* **One writer at a time.** Applying entries and writing a snapshot take the replica's
  writer lock (the tail thread, or a caller of :meth:`catch_up`/:meth:`snapshot`); readers
  never take it: they take ``replica.v.state()`` once per request.
* **No silent gaps.** If the log was trimmed past this replica's position (it lagged behind
  a snapshot), it reloads the published snapshot instead of skipping entries.
* **Snapshots.** One process at a time (a lease in the store) writes a snapshot of its
  replica, only when it is caught up and ahead of the published one, and then trims the log
  up to the snapshot's position: never past what the published snapshot holds.

With ``VITRINE_VECTOR_STORE=milvus://...`` (:func:`open_replica`) a process holds no copy:
:class:`indexer.milvus.MilvusReplica` applies the same entries, by the same rules, to one
Milvus, from one process at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IndexMismatch, NotFound, public_reason
from .index import CURRENT, current_snapshot
from .pipeline import ListingMeta, Vitrine
from .settings import Settings
from .state import LogEntry, StateStore, StoreUnavailable

log = logging.getLogger(__name__)
SNAPSHOT_LEASE = "snapshot"


class Replica:
    def __init__(self, settings: Settings, store: StateStore, vitrine: Vitrine) -> None:
        self.settings = settings
        self.store = store
        self.v = vitrine  # replaced whole on reload; readers take self.v.state() once
        extra = getattr(vitrine, "extra", {}) or {}
        self.pos: int = int(extra.get("log_pos", 0))
        # versions of the listings held and of deletes (tombstones), from the snapshot on
        self.versions: dict[str, int] = {k: int(x) for k, x in extra.get("versions", {}).items()}
        self.applied = 0
        self.last_error: str | None = None
        self.skipped = 0  # log entries built for another fusion layout (see apply)
        self.last_snapshot_error: str | None = None
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._cond = threading.Condition()
        self._writer = threading.RLock()  # writers only: searches never wait for it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._digest: tuple[tuple[int, int], str] = ((-1, -1), "")

    @property
    def root(self) -> Path:
        return self.settings.data_dir / "index"

    @property
    def dim(self) -> int:
        fusion = self.v.state().fusion
        return fusion.dim if fusion is not None else -1

    @classmethod
    def open(cls, settings: Settings, store: StateStore, registry: Any = None) -> Replica:
        self = cls(settings, store, _load(settings, registry))
        self.catch_up()
        return self

    # --- applying ---------------------------------------------------------------------------
    def apply(self, batch: list[tuple[int, LogEntry]]) -> None:
        """Apply log entries in order (one publish for the lot); the tail thread's job."""
        upserts: dict[str, tuple[str, np.ndarray, ListingMeta]] = {}
        deletes: set[str] = set()
        changed: dict[str, int] = {}
        held = self._stored_versions([e["id"] for _, e in batch if "id" in e])
        applied = 0
        for pos, e in batch:
            applied += 1
            op = e.get("op")
            if op == "reload":
                # a new base snapshot (a seed): what follows is read again, after it
                self._publish(upserts, deletes, changed, self.pos)
                self._reload()
                with self._cond:
                    # entries before the reload were built for the layout it replaced
                    self.pos = max(self.pos, pos)
                batch = []
                break
            lid, version = e["id"], int(e["version"])
            if version <= changed.get(lid, held.get(lid, -1)):
                continue  # a newer write of this listing is already here
            if op == "upsert" and len(e["vec"]) != self.dim:
                # built against another fusion layout (a seed replaced it meanwhile): it
                # cannot go in this index, and must not wedge every entry behind it
                self.skipped += 1
                log.error("log entry %d for %r has a vector of %d dimensions, the index %d: "
                          "skipped", pos, lid, len(e["vec"]), self.dim)
                continue
            changed[lid] = version
            if op == "upsert":
                deletes.discard(lid)
                m = e["meta"]
                upserts[lid] = (lid, np.asarray(e["vec"], np.float32),
                                ListingMeta(m["title"], m.get("category"),
                                            m.get("source", "seller"),
                                            list(m.get("category_path", []))))
            elif op == "label":
                # an operator's category: the same vector, the payload's label replaced
                # (the one this replica holds at the version before, like every replica)
                # a listing deleted earlier in this batch stays deleted: the published view
                # still holds its old vector, which a label must not bring back
                got = None if lid in deletes else self._labelled(lid, e["label"], upserts)
                if got is None:
                    log.error("log entry %d relabels %r, which this index does not hold: "
                              "skipped", pos, lid)
                    continue
                upserts[lid] = got
            elif op == "delete":
                upserts.pop(lid, None)
                deletes.add(lid)
        if batch:
            self._publish(upserts, deletes, changed, batch[-1][0])
        with self._cond:
            self.applied += applied
            self._since_snapshot += applied

    def _stored_versions(self, ids: Sequence[str]) -> Mapping[str, int]:
        """The versions of ``ids`` the index holds (this replica's; Milvus's there)."""
        return self.versions

    def _labelled(self, lid: str, label: dict[str, Any],
                  upserts: dict[str, tuple[str, np.ndarray, ListingMeta]]
                  ) -> tuple[str, np.ndarray, ListingMeta] | None:
        """``lid`` with ``label`` (category, category_path, source) as its metadata: its vector
        and title from this batch's upserts, else from the index (None: not held)."""
        if lid in upserts:
            _, vec, meta = upserts[lid]
        else:
            st = self.v.state()
            try:
                vec = st.view.get([lid])[0]
            except KeyError:
                return None
            meta = st.meta(lid) or ListingMeta("")
        path = [str(c) for c in label.get("category_path") or []]
        return lid, vec, ListingMeta(meta.title, label.get("category") or (path[0] if path
                                                                           else None),
                                     str(label.get("source", "confirmed")), path)

    def _publish(self, upserts: dict[str, tuple[str, np.ndarray, ListingMeta]],
                 deletes: set[str], changed: dict[str, int], pos: int) -> None:
        """Write the collected changes to the index (one new view), then say so."""
        self._write(upserts, deletes, changed, pos)
        with self._cond:
            # the versions change under the lock that digest() and the waiters read under
            self._hold(changed)
            self.pos = pos
            self._cond.notify_all()
        upserts.clear()
        deletes.clear()
        changed.clear()

    def _write(self, upserts: dict[str, tuple[str, np.ndarray, ListingMeta]],
               deletes: set[str], changed: dict[str, int], pos: int) -> None:
        """Put the changes of the entries up to ``pos`` in the index (``changed``: the
        versions they bring)."""
        if upserts or deletes:
            self.v.apply(list(upserts.values()), sorted(deletes))

    def _hold(self, changed: dict[str, int]) -> None:
        """Remember the versions now in the index (under ``_cond``)."""
        self.versions.update(changed)

    def _reload(self) -> None:
        """Swap in the published snapshot (a seed, or the log was trimmed past us)."""
        fresh = _load(self.settings, self.v.registry)
        extra = getattr(fresh, "extra", {}) or {}
        with self._cond:
            self.v = fresh
            self.versions = {k: int(x) for k, x in extra.get("versions", {}).items()}
            self.pos = int(extra.get("log_pos", 0))
            self._cond.notify_all()
        log.info("loaded the published snapshot (log position %d)", self.pos)

    def catch_up(self, block_ms: int = 0) -> int:
        """Apply what the log holds past our position; reload first if it was trimmed away."""
        with self._writer:
            return self._catch_up(block_ms)

    def _catch_up(self, block_ms: int) -> int:
        n = 0
        while True:
            if self.store.trimmed_upto() > self.pos:
                self._reload_trimmed()
            batch = self.store.read(self.pos, count=1000, block_ms=block_ms if n == 0 else 0)
            if batch and batch[0][0] != self.pos + 1:
                # positions are gap-free: a trim landed between the check and the read
                self._reload_trimmed()
                continue
            if batch:
                self.apply(batch)
            n += len(batch)
            if len(batch) < 1000:
                return n

    def _reload_trimmed(self) -> None:
        log.warning("the log was trimmed past position %d: reloading the snapshot", self.pos)
        for _ in range(3):  # a newer snapshot may be published (and trimmed to) meanwhile
            self._reload()
            if self.store.trimmed_upto() <= self.pos:
                return
        if self.store.trimmed_upto() > self.pos:
            raise IndexMismatch(
                f"the log is trimmed up to {self.store.trimmed_upto()} but the published "
                f"snapshot holds only up to {self.pos}"
            )

    def version_of(self, lid: str) -> int:
        """The version of ``lid`` the index holds, a delete's included (-1: none)."""
        with self._cond:
            return self.versions.get(lid, -1)

    def wait_version(self, lid: str, version: int, timeout: float = 1.0) -> bool:
        """Block until this replica holds ``lid`` at ``version`` or newer."""
        with self._cond:
            return self._cond.wait_for(lambda: self.versions.get(lid, -1) >= version, timeout)

    def lag(self) -> int:
        """Log entries appended but not applied here."""
        return max(0, self.store.last_pos() - self.pos)

    def digest(self) -> str:
        """A digest of the (id, version) pairs this replica holds, tombstones included:
        two processes that applied the same log agree on it."""
        with self._cond:
            key, items = (self.pos, self.applied), sorted(self.versions.items())
        if self._digest[0] != key:
            h = hashlib.sha256()
            for lid, version in items:
                h.update(f"{lid}\t{version}\n".encode())
            self._digest = (key, h.hexdigest()[:16])
        return self._digest[1]

    # --- background tailing and snapshots ---------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="replica-tail", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def close(self) -> None:
        """Let go of what this replica holds outside the process, after :meth:`stop` (with
        FAISS, nothing: see :class:`indexer.milvus.MilvusReplica`)."""

    @property
    def stalled(self) -> bool:
        """Started, but the tail thread is gone."""
        return self._thread is not None and not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.catch_up(block_ms=200)
                self.last_error = None
                self.maybe_snapshot()
            except Exception as e:  # keep tailing: a broker blip must not kill the replica
                self.last_error = public_reason(e)
                log.warning("replication tail failed; retrying", exc_info=True)
                self._stop.wait(0.5)

    def maybe_snapshot(self, force: bool = False) -> bool:
        s = self.settings
        due = self._since_snapshot >= s.snapshot_every or (
            self._since_snapshot and time.monotonic() - self._last_snapshot > s.snapshot_interval
        )
        if not (due or (force and self._since_snapshot)):
            return False
        # whatever the outcome, wait a full interval before trying again
        self._last_snapshot = time.monotonic()
        try:
            written = self.snapshot()
            self.last_snapshot_error = None
            return written
        except StoreUnavailable:
            raise
        except Exception as e:  # e.g. disk full: report it, keep serving, try again later
            self.last_snapshot_error = public_reason(e)
            log.warning("writing a snapshot failed", exc_info=True)
            return False

    def snapshot(self) -> bool:
        """Publish this replica as the snapshot and trim the log up to it, under the lease."""
        with self._writer:
            return self._snapshot()

    def _snapshot(self) -> bool:
        ttl = max(60.0, self.settings.snapshot_interval)
        if not self.store.lease(SNAPSHOT_LEASE, self._owner, ttl):
            return False  # another process is writing one
        try:
            self.catch_up()  # never publish a state that misses committed entries
            pos = self.pos
            if pos <= max(_published_pos(self.root), self.store.trimmed_upto()):
                # the published snapshot already holds all we hold (or more): another
                # process wrote it, and one more copy of the same state is only disk work
                self._since_snapshot = 0
                return False

            def supersedes(current: Path | None) -> bool:
                # under the publish lock: never replace a snapshot that holds more
                return _published_pos(self.root) < pos if current is not None else True

            if not self.store.lease(SNAPSHOT_LEASE, self._owner, ttl):
                return False  # the lease expired while we caught up: someone else writes
            if self.v.save(self.root, {"log_pos": pos, "versions": self.versions},
                           supersedes) is None:
                return False
            self._since_snapshot = 0
            # trim only up to what the published snapshot holds (a newer one may be there)
            self.store.trim(min(pos, max(_published_pos(self.root), 0)))
            return True
        finally:
            self.store.unlease(SNAPSHOT_LEASE, self._owner)


def open_replica(settings: Settings, store: StateStore, registry: Any = None) -> Replica:
    """The replica of the configured vector store (``VITRINE_VECTOR_STORE``): a copy of the
    FAISS index, or a handle on the vectors in Milvus (:mod:`indexer.milvus`)."""
    if settings.vector_store == "faiss":
        return Replica.open(settings, store, registry)
    from .milvus import MilvusReplica

    return MilvusReplica.open(settings, store, registry)


def _published_pos(root: Path) -> int:
    """The log position the published snapshot holds (-1 when there is none)."""
    snap = current_snapshot(root)
    extra = snap / "extra.json" if snap is not None else None
    if extra is None or not extra.is_file():
        return -1
    return int(json.loads(extra.read_text()).get("log_pos", -1))


def _load(settings: Settings, registry: Any) -> Vitrine:
    root = settings.data_dir / "index"
    try:
        return Vitrine.load(root, settings, registry)
    except NotFound:
        if (root / CURRENT).exists():
            # a snapshot was published but its folder is gone: starting empty would pass
            # off an empty index (and a trimmed log) as the state
            raise IndexMismatch(f"{root / CURRENT} names a snapshot that is missing") from None
        v = Vitrine(settings, registry)
        v.create_empty()
        v.extra = {}
        return v
