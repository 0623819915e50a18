"""One index across processes: a durable log of vector upserts/deletes, replayed and tailed.

Every process (API, worker) holds a :class:`Replica`: a :class:`~indexer.pipeline.Vitrine`
loaded from the shared snapshot in ``VITRINE_DATA_DIR/index``, then brought up to date by
replaying the log from the position stored *inside* that snapshot, then tailing it. Writers
never touch their index directly: they append to the log and every replica (including their
own) applies the entry. Entries are idempotent (upsert-by-id with the fused vector, delete
by id), so replaying from an older position than needed is harmless; this is what makes
snapshots and restarts safe.

Two log backends:

* :class:`RedisLog`, a Redis stream (``<prefix>:log``), when a broker is configured;
* :class:`LocalLog`, an fsynced JSON-lines file, for the embedded single-process mode.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from indexer.errors import NotFound
from indexer.pipeline import ListingMeta, Vitrine, snapshot_extra
from indexer.settings import Settings

log = logging.getLogger(__name__)


class OpLog(Protocol):
    def append(self, entry: dict[str, Any]) -> str: ...
    def append_many(self, entries: list[dict[str, Any]]) -> list[str]: ...
    def read(self, after: str, block_ms: int = 0, count: int = 1000) -> list[tuple[str, dict]]: ...
    def last(self) -> str: ...
    def trim(self, upto: str) -> None: ...


def encode_entry(entry: dict[str, Any]) -> str:
    e = dict(entry)
    if "vec" in e:
        e["vec"] = base64.b64encode(np.asarray(e["vec"], np.float32).tobytes()).decode()
    return json.dumps(e)


def decode_entry(raw: str | bytes) -> dict[str, Any]:
    e = json.loads(raw)
    if "vec" in e:
        e["vec"] = np.frombuffer(base64.b64decode(e["vec"]), np.float32)
    return dict(e)


class RedisLog:
    """A Redis stream: positions are stream ids; XREAD BLOCK tails it with low latency."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.r = client
        self.key = f"{prefix}:log"

    def append(self, entry: dict[str, Any]) -> str:
        pos = self.r.xadd(self.key, {"e": encode_entry(entry)})
        return pos.decode() if isinstance(pos, bytes) else str(pos)

    def append_many(self, entries: list[dict[str, Any]]) -> list[str]:
        """Append in order, in one round trip (a pipeline; each XADD is still atomic)."""
        pipe = self.r.pipeline(transaction=False)
        for entry in entries:
            pipe.xadd(self.key, {"e": encode_entry(entry)})
        return [p.decode() if isinstance(p, bytes) else str(p) for p in pipe.execute()]

    def read(self, after: str, block_ms: int = 0, count: int = 1000) -> list[tuple[str, dict]]:
        if block_ms:
            res = self.r.xread({self.key: after}, count=count, block=block_ms)
            items = res[0][1] if res else []
        else:
            items = self.r.xrange(self.key, min=f"({after}" if after != "0-0" else "-",
                                  count=count)
        out = []
        for pos, fields in items:
            p = pos.decode() if isinstance(pos, bytes) else pos
            out.append((p, decode_entry(fields[b"e"] if b"e" in fields else fields["e"])))
        return out

    def last(self) -> str:
        items = self.r.xrevrange(self.key, count=1)
        if not items:
            return "0-0"
        p = items[0][0]
        return p.decode() if isinstance(p, bytes) else p

    def trim(self, upto: str) -> None:
        # entries up to a snapshot's position are in the snapshot; later ones must stay
        self.r.xtrim(self.key, minid=upto, approximate=True)


class LocalLog:
    """An append-only JSON-lines file, fsynced per entry; positions are sequence numbers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: list[tuple[int, str]] = []
        torn = False
        if path.is_file():
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    seq, raw = line.split("\t", 1)
                    json.loads(raw)
                    self._entries.append((int(seq), raw))
                except ValueError:
                    log.warning("dropping a torn last line of %s", path)  # crash mid-write
                    torn = True
        self._seq = self._entries[-1][0] if self._entries else 0
        if torn:  # rewrite it clean, or the next append would be glued to the torn line
            self._rewrite()
        self._f = path.open("a")

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.writelines(f"{s}\t{r}\n" for s, r in self._entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, entry: dict[str, Any]) -> str:
        return self.append_many([entry])[0]

    def append_many(self, entries: list[dict[str, Any]]) -> list[str]:
        """Append in order with one fsync for all of them."""
        raws = [encode_entry(e) for e in entries]
        with self._cond:
            new = []
            for raw in raws:
                self._seq += 1
                self._f.write(f"{self._seq}\t{raw}\n")
                new.append((self._seq, raw))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._entries.extend(new)  # readable only once durable
            self._cond.notify_all()
            return [str(s) for s, _ in new]

    def read(self, after: str, block_ms: int = 0, count: int = 1000) -> list[tuple[str, dict]]:
        a = int(after.split("-")[0]) if after else 0
        with self._cond:
            if block_ms and self._seq <= a:
                self._cond.wait(block_ms / 1000)
            items = [(s, r) for s, r in self._entries if s > a][:count]
        return [(str(s), decode_entry(r)) for s, r in items]

    def last(self) -> str:
        return str(self._seq)

    def ensure_after(self, pos: str) -> None:
        """Number new entries after ``pos`` (a snapshot's position, if the log file was lost)."""
        with self._cond:
            self._seq = max(self._seq, int(pos.split("-")[0]))

    def trim(self, upto: str) -> None:
        n = int(upto)
        with self._cond:
            # keep the last entry even when the snapshot has it: it carries the sequence number
            # on (replaying it is harmless, entries are idempotent)
            self._entries = [(s, r) for s, r in self._entries if s > n] or self._entries[-1:]
            self._f.close()
            self._rewrite()
            self._f = self.path.open("a")

    def close(self) -> None:
        self._f.close()


@dataclass
class IndexedInfo:
    confidence: float | None = None
    uncertain: bool | None = None


class Replica:
    """A Vitrine kept in step with the log; ``info`` keeps each ingested listing's vote."""

    def __init__(self, settings: Settings, oplog: OpLog, vitrine: Vitrine,
                 snapshot_lock: Any = None) -> None:
        self.settings = settings
        self.log = oplog
        self.v = vitrine
        self.pos = "0-0"
        self.info: dict[str, dict[str, Any]] = {}
        self.applied = 0
        self._since_snapshot = 0
        self._last_snapshot = time.monotonic()
        self._lock = threading.RLock()
        self._applied_cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot_lock = snapshot_lock  # a cross-process lock in Redis mode

    @property
    def root(self) -> Path:
        return self.settings.data_dir / "index"

    @classmethod
    def open(cls, settings: Settings, oplog: OpLog, registry: Any = None,
             snapshot_lock: Any = None) -> Replica:
        root = settings.data_dir / "index"
        try:
            v = Vitrine.load(root, settings, registry)
            extra = snapshot_extra(root)
        except NotFound:
            v = Vitrine(settings, registry)
            v.create_empty()
            extra = {}
        self = cls(settings, oplog, v, snapshot_lock)
        self.pos = str(extra.get("log_pos", "0-0"))
        self.info = dict(extra.get("info", {}))
        self.catch_up()
        return self

    # --- applying ---------------------------------------------------------------------------
    def apply(self, pos: str, e: dict[str, Any]) -> None:
        op = e.get("op")
        with self._lock:
            if op == "upsert":
                lid = e["id"]
                assert self.v.index is not None
                self.v.index.upsert([lid], np.asarray(e["vec"], np.float32).reshape(1, -1))
                m = e["meta"]
                self.v.meta[lid] = ListingMeta(m["title"], m.get("category"),
                                               m.get("source", "seller"),
                                               list(m.get("category_path", [])))
                self.info[lid] = {k: e.get(k) for k in ("confidence", "uncertain")}
            elif op == "delete":
                self.v.delete([e["id"]])
                self.info.pop(e["id"], None)
            elif op == "reload":
                # a freshly seeded base snapshot (see services.runtime.seed)
                fresh = Vitrine.load(self.root, self.settings, self.v.registry)
                self.v.fusion, self.v.lexical = fresh.fusion, fresh.lexical
                self.v.index, self.v.meta = fresh.index, fresh.meta
                self.info = dict(snapshot_extra(self.root).get("info", {}))
            self.pos = pos
            self.applied += 1
            self._since_snapshot += 1
            self._applied_cond.notify_all()

    def catch_up(self, block_ms: int = 0) -> int:
        n = 0
        while True:
            batch = self.log.read(self.pos, block_ms=block_ms if n == 0 else 0)
            for pos, e in batch:
                try:
                    self.apply(pos, e)
                except Exception:  # one bad entry must not wedge every replica behind it
                    log.exception("cannot apply log entry %s; skipped", pos)
                    with self._lock:
                        self.pos = pos
            n += len(batch)
            if len(batch) < 1000:
                return n

    def wait_for(self, pos: str, timeout: float = 5.0) -> bool:
        """Block until the entry at ``pos`` (from :meth:`OpLog.append`) is applied here."""
        deadline = time.monotonic() + timeout
        with self._applied_cond:
            while not _pos_ge(self.pos, pos):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._applied_cond.wait(left)
        return True

    # --- background tailing and snapshots ---------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="replica-tail", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.catch_up(block_ms=100)
                self.maybe_snapshot()
            except Exception:  # keep tailing: a Redis blip must not kill the replica
                log.exception("replication tail failed; retrying")
                time.sleep(0.5)

    def maybe_snapshot(self, force: bool = False) -> bool:
        s = self.settings
        due = self._since_snapshot >= s.snapshot_every or (
            self._since_snapshot and time.monotonic() - self._last_snapshot > s.snapshot_interval
        )
        if not (force and self._since_snapshot) and not due:
            return False
        return self.snapshot()

    def snapshot(self) -> bool:
        lock = self._snapshot_lock
        if lock is not None and not lock.acquire(blocking=False):
            return False  # another process is writing one
        try:
            with self._lock:
                pos = self.pos
                self.v.save(self.root, {"log_pos": pos, "info": self.info})
                self._since_snapshot = 0
                self._last_snapshot = time.monotonic()
            self.log.trim(pos)
            return True
        finally:
            if lock is not None:
                try:
                    lock.release()
                except Exception:  # expired: harmless, the snapshot is atomic anyway
                    pass


def _pos_ge(a: str, b: str) -> bool:
    def key(p: str) -> tuple[int, int]:
        x, _, y = p.partition("-")
        return int(x), int(y or 0)

    return key(a) >= key(b)
