"""The embedded state store: one SQLite file in the data dir, owned by one process.

Threads: one connection guarded by one lock. SQLite admits one writer at a time anyway, so
per-thread connections would only add ``SQLITE_BUSY`` retries between our own threads; one
lock also lets the :class:`threading.Condition` that wakes blocked ``read`` calls share it
(no append can slip between a reader's query and its wait), and lets ``close`` from any
thread close the only connection. The cost, reads waiting behind a commit's fsync, is a
few milliseconds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

from .model import (
    Claimed,
    DataDirLocked,
    Event,
    LogEntry,
    Outcome,
    Status,
    StoreUnavailable,
    check_relabel,
    decode_entry,
    encode_entry,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS statuses (id TEXT PRIMARY KEY, version INTEGER NOT NULL,
                                     status TEXT NOT NULL);
-- status_ids pages and status_counts counts by status without reading every record
CREATE INDEX IF NOT EXISTS statuses_by_status
  ON statuses (json_extract(status, '$.status'), version);
CREATE TABLE IF NOT EXISTS pending (id TEXT PRIMARY KEY, version INTEGER NOT NULL,
                                    payload TEXT NOT NULL, photo BLOB,
                                    attempts INTEGER NOT NULL DEFAULT 0,
                                    ready_at REAL NOT NULL, accepted_at REAL NOT NULL,
                                    leased INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS pending_ready ON pending (ready_at, version);
CREATE TABLE IF NOT EXISTS log (pos INTEGER PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('version', 0), ('trimmed_upto', 0), ('last_pos', 0);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL,
                                   expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS corrections (id TEXT PRIMARY KEY, history TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS thumbs (id TEXT PRIMARY KEY, etag TEXT NOT NULL, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS review (id TEXT NOT NULL, reason TEXT NOT NULL,
                                   version INTEGER NOT NULL, PRIMARY KEY (id, reason));
CREATE INDEX IF NOT EXISTS review_order ON review (reason, version);
"""

# Primary result codes that mean "not now" rather than a bug in a statement.
_TRANSIENT_SQLITE = {
    sqlite3.SQLITE_FULL: "disk full",
    sqlite3.SQLITE_IOERR: "I/O error",
    sqlite3.SQLITE_BUSY: "database locked",
    sqlite3.SQLITE_LOCKED: "database locked",
    sqlite3.SQLITE_CANTOPEN: "cannot open the database file",
    sqlite3.SQLITE_READONLY: "database is read-only",
}
_TRANSIENT_ERRNO = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def _unavailable(e: Exception) -> StoreUnavailable | None:
    if isinstance(e, sqlite3.DatabaseError):
        code = getattr(e, "sqlite_errorcode", None)
        # extended codes (SQLITE_IOERR_WRITE...) carry the primary code in the low byte
        reason = None if code is None else _TRANSIENT_SQLITE.get(code & 0xFF)
        return StoreUnavailable(f"SQLite state store: {reason}: {e}") if reason else None
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
        # the reason only: the message reaches HTTP clients, the path stays in the log
        return StoreUnavailable(f"SQLite state store: {os.strerror(e.errno or 0)}")
    return None


class SqliteStore:
    def __init__(self, conn: sqlite3.Connection, lock_fd: int, data_dir: Path) -> None:
        self._conn = conn
        self._lock_fd = lock_fd
        self.data_dir = data_dir
        self._cond = threading.Condition(threading.RLock())

    @classmethod
    def open(cls, data_dir: Path) -> SqliteStore:
        data_dir = Path(data_dir)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise (_unavailable(e) or e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLocked(
                f"data dir {data_dir.resolve()} is already in use (locked by pid {holder}); "
                "stop it or point VITRINE_DATA_DIR elsewhere"
            ) from None
        conn = None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            # isolation_level=None: every method opens its own transaction explicitly. The
            # flock keeps other vitrine processes out, so only an outside tool (the sqlite3
            # shell, a backup) can hold the file's lock: wait for it a while, not forever.
            conn = sqlite3.connect(data_dir / "state.sqlite3", isolation_level=None,
                                   check_same_thread=False, timeout=5.0)
            conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL syncs only at checkpoints: a power cut could lose commits
            # that were already acknowledged to a client as accepted. FULL syncs the WAL at
            # every commit.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        except (sqlite3.Error, OSError) as e:
            if conn is not None:
                conn.close()
            os.close(fd)  # also releases the flock
            raise (_unavailable(e) or e) from e
        return cls(conn, fd, data_dir)

    def close(self) -> None:
        with self._cond:
            if self._lock_fd < 0:
                return
            self._conn.close()
            os.close(self._lock_fd)
            self._lock_fd = -1
            self._cond.notify_all()  # blocked readers fail now rather than at their timeout

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        with self._cond:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except BaseException as e:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                err = _unavailable(e) if isinstance(e, Exception) else None
                if err:
                    raise err from e
                raise

    @staticmethod
    def _next_version(conn: sqlite3.Connection) -> int:
        row = conn.execute(
            "UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value").fetchone()
        return int(row[0])

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @staticmethod
    def _put_status(conn: sqlite3.Connection, lid: str, status: Status) -> None:
        conn.execute("INSERT OR REPLACE INTO statuses VALUES (?, ?, ?)",
                     (lid, int(status["version"]), json.dumps(status)))
        # every status write passes here: the review queue can never disagree with it
        conn.execute("DELETE FROM review WHERE id = ?", (lid,))
        if status.get("status") == "indexed" and status.get("review"):
            conn.executemany("INSERT OR IGNORE INTO review VALUES (?, ?, ?)",
                             [(lid, str(r), int(status["version"])) for r in status["review"]])

    def _append(self, conn: sqlite3.Connection, entries: Sequence[LogEntry]) -> list[int]:
        last = self._meta(conn, "last_pos")
        positions = list(range(last + 1, last + 1 + len(entries)))
        conn.executemany("INSERT INTO log VALUES (?, ?)",
                         [(p, encode_entry(e)) for p, e in zip(positions, entries, strict=True)])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_pos'", (last + len(entries),))
        # Waiters run once the lock is free, after the COMMIT (or after a rollback, when they
        # find nothing and wait again). Only this process writes here (the flock), so this
        # reaches every reader.
        self._cond.notify_all()
        return positions

    # --- writes the API accepts -----------------------------------------------------------
    def accept(self, payload: dict[str, Any], photo: bytes | None) -> int:
        lid = str(payload["id"])
        now = time.time()
        with self._tx() as conn:
            v = self._next_version(conn)
            self._put_status(conn, lid, {"status": "queued", "version": v})
            conn.execute("INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?, 0, ?, ?, 0)",
                         (lid, v, json.dumps(payload), photo, now, now))
        return v

    def delete(self, lid: str) -> int:
        with self._tx() as conn:
            v = self._next_version(conn)
            self._put_status(conn, lid, {"status": "deleted", "version": v})
            conn.execute("DELETE FROM pending WHERE id = ?", (lid,))
            conn.execute("DELETE FROM thumbs WHERE id = ?", (lid,))
            conn.execute("DELETE FROM corrections WHERE id = ?", (lid,))
            self._append(conn, [{"op": "delete", "id": lid, "version": v}])
        return v

    def relabel(self, lid: str, expected: int, status: Status, entry: LogEntry,
                corrections: Sequence[dict[str, Any]] | None = None) -> int:
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM statuses WHERE id = ?", (lid,)).fetchone()
            pending = conn.execute("SELECT 1 FROM pending WHERE id = ?", (lid,)).fetchone()
            # raises before anything is written: the transaction rolls back empty
            check_relabel(lid, expected, None if row is None else json.loads(row[0]),
                          pending is not None)
            v = self._next_version(conn)
            self._put_status(conn, lid, {**status, "version": v})
            # the entry is about the listing whose version was checked, whatever it said
            self._append(conn, [{**entry, "id": lid, "version": v}])
            if corrections is not None:
                conn.execute("INSERT OR REPLACE INTO corrections VALUES (?, ?)",
                             (lid, json.dumps(list(corrections))))
        return v

    def corrections(self, lid: str) -> list[dict[str, Any]]:
        with self._tx(write=False) as conn:
            row = conn.execute("SELECT history FROM corrections WHERE id = ?",
                               (lid,)).fetchone()
        return cast(list[dict[str, Any]], json.loads(row[0])) if row is not None else []

    # --- the ingest use case --------------------------------------------------------------
    def claim(self, limit: int, lease_s: float, max_attempts: int) -> Claimed:
        out = Claimed()
        now = time.time()
        after = -1  # a version cursor: with lease_s <= 0 a claimed row stays "ready"
        with self._tx() as conn:
            while len(out.events) < limit:
                rows = conn.execute(
                    "SELECT id, version, payload, attempts, photo IS NOT NULL, leased "
                    "FROM pending WHERE ready_at <= ? AND version > ? ORDER BY version LIMIT ?",
                    (now, after, limit - len(out.events))).fetchall()
                if not rows:
                    break
                for lid, v, payload, attempts, has_photo, leased in rows:
                    after = v
                    if attempts >= max_attempts:
                        why = ("the last lease expired without a result" if leased
                               else "the last attempt was released for a retry")
                        status = {"status": "failed", "version": v,
                                  "error": f"gave up after {attempts} attempts: {why}"}
                        self._put_status(conn, lid, status)
                        conn.execute("DELETE FROM pending WHERE id = ?", (lid,))
                        out.given_up.append(Outcome(lid, v, status))
                        continue
                    conn.execute("UPDATE pending SET attempts = ?, ready_at = ?, leased = 1 "
                                 "WHERE id = ?", (attempts + 1, now + lease_s, lid))
                    out.events.append(Event(lid, v, json.loads(payload), attempts + 1,
                                            bool(has_photo)))
        return out

    def photo(self, event: Event) -> bytes | None:
        with self._tx(write=False) as conn:
            row = conn.execute("SELECT photo FROM pending WHERE id = ? AND version = ?",
                               (event.id, event.version)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def commit(self, outcomes: Sequence[Outcome]) -> list[bool]:
        done = []
        with self._tx() as conn:
            for o in outcomes:
                # The pending event at this version is the proof that it is still the latest
                # write and not yet committed: a re-post replaces it, a delete or an earlier
                # commit of the same outcome removes it.
                cur = conn.execute("DELETE FROM pending WHERE id = ? AND version = ?",
                                   (o.id, o.version))
                if cur.rowcount != 1:
                    done.append(False)
                    continue
                self._put_status(conn, o.id, o.status)
                if o.entry is not None:
                    self._append(conn, [o.entry])
                    if o.thumbnail is None:
                        conn.execute("DELETE FROM thumbs WHERE id = ?", (o.id,))
                    else:
                        conn.execute("INSERT OR REPLACE INTO thumbs VALUES (?, ?, ?)",
                                     (o.id, *o.thumbnail))
                done.append(True)
        return done

    def release(self, events: Sequence[Event], delay_s: float = 0.0, *,
                refund: bool = False) -> None:
        ready_at = time.time() + delay_s
        with self._tx() as conn:
            conn.executemany("UPDATE pending SET ready_at = ?, leased = 0, "
                             "attempts = MAX(0, attempts - ?) WHERE id = ? AND version = ?",
                             [(ready_at, int(refund), e.id, e.version) for e in events])

    def is_pending(self, lid: str, version: int) -> float | None:
        with self._tx(write=False) as conn:
            row = conn.execute("SELECT ready_at FROM pending WHERE id = ? AND version = ?",
                               (lid, version)).fetchone()
        return None if row is None else max(0.0, row[0] - time.time())

    def pending_count(self) -> int:
        with self._tx(write=False) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    # --- reads ----------------------------------------------------------------------------
    def status(self, lid: str) -> Status | None:
        return self.statuses([lid])[0]

    def statuses(self, lids: Sequence[str]) -> list[Status | None]:
        with self._tx(write=False) as conn:
            rows = [conn.execute("SELECT status FROM statuses WHERE id = ?", (lid,)).fetchone()
                    for lid in lids]
        return [None if r is None else json.loads(r[0]) for r in rows]

    def review_queue(self, reason: str | None, offset: int, limit: int
                     ) -> tuple[int, list[str]]:
        where, args = ("WHERE reason = ?", [reason]) if reason else ("", [])
        with self._tx(write=False) as conn:
            total = conn.execute(f"SELECT COUNT(DISTINCT id) FROM review {where}",
                                 args).fetchone()[0]
            rows = conn.execute(f"SELECT id, MIN(version) AS v FROM review {where} GROUP BY id "
                                "ORDER BY v, id LIMIT ? OFFSET ?",
                                [*args, int(limit), int(offset)]).fetchall()
        return int(total), [str(r[0]) for r in rows]

    def status_ids(self, status: str, offset: int, limit: int, after: int = 0
                   ) -> tuple[int, list[tuple[str, int]]]:
        with self._tx(write=False) as conn:
            total = conn.execute("SELECT COUNT(*) FROM statuses WHERE "
                                 "json_extract(status, '$.status') = ?", (status,)).fetchone()[0]
            rows = conn.execute("SELECT id, version FROM statuses WHERE "
                                "json_extract(status, '$.status') = ? AND version > ? "
                                "ORDER BY version LIMIT ? OFFSET ?",
                                (status, int(after), max(0, int(limit)), int(offset))).fetchall()
        return int(total), [(str(r[0]), int(r[1])) for r in rows]

    def status_counts(self) -> dict[str, int]:
        with self._tx(write=False) as conn:
            rows = conn.execute("SELECT json_extract(status, '$.status'), COUNT(*) "
                                "FROM statuses GROUP BY 1").fetchall()
        return {str(k): int(n) for k, n in rows}

    # --- thumbnails -----------------------------------------------------------------------
    def put_thumbnails(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        with self._tx() as conn:
            conn.executemany("INSERT OR REPLACE INTO thumbs VALUES (?, ?, ?)", items)

    def thumbnail(self, lid: str) -> tuple[str, bytes] | None:
        with self._tx(write=False) as conn:
            row = conn.execute("SELECT etag, jpeg FROM thumbs WHERE id = ?", (lid,)).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def thumbnail_tags(self, lids: Sequence[str]) -> list[str | None]:
        with self._tx(write=False) as conn:
            rows = [conn.execute("SELECT etag FROM thumbs WHERE id = ?", (lid,)).fetchone()
                    for lid in lids]
        return [None if r is None else str(r[0]) for r in rows]

    # --- the log --------------------------------------------------------------------------
    def append(self, entries: Sequence[LogEntry]) -> list[int]:
        with self._tx() as conn:
            return self._append(conn, entries)

    def read(self, after: int, count: int = 1000, block_ms: int = 0) -> list[tuple[int, LogEntry]]:
        deadline = time.monotonic() + block_ms / 1000
        # the lock is held from the query to the wait: an append cannot slip in between
        with self._cond:
            while True:
                with self._tx(write=False) as conn:
                    rows = conn.execute("SELECT pos, entry FROM log WHERE pos > ? ORDER BY pos "
                                        "LIMIT ?", (after, count)).fetchall()
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0:
                    return [(int(p), decode_entry(e)) for p, e in rows]
                self._cond.wait(remaining)

    def last_pos(self) -> int:
        with self._tx(write=False) as conn:
            return self._meta(conn, "last_pos")

    def trimmed_upto(self) -> int:
        with self._tx(write=False) as conn:
            return self._meta(conn, "trimmed_upto")

    def trim(self, upto: int) -> None:
        with self._tx() as conn:
            # clamped to last_pos: positions not yet appended must not count as trimmed
            upto = min(upto, self._meta(conn, "last_pos"))
            conn.execute("DELETE FROM log WHERE pos <= ?", (upto,))
            conn.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'trimmed_upto'",
                         (upto,))

    # --- coordination ---------------------------------------------------------------------
    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT owner, expires_at FROM leases WHERE name = ?",
                               (name,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)",
                         (name, owner, now + ttl_s))
            return True

    def unlease(self, name: str, owner: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def ping(self) -> None:
        with self._tx(write=False) as conn:
            conn.execute("SELECT 1").fetchone()
