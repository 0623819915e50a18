"""The vectors in Milvus: the vector store of ``VITRINE_VECTOR_STORE=milvus://HOST:PORT``.

With FAISS (the default) every process holds its replica of the index and applies the log to
it (:mod:`indexer.replica`). Past one machine's memory, or with many API processes, the
vectors live in one Milvus instead, and a process holds only the fitted fusion (centring,
lexical view, calibration): the snapshot under ``VITRINE_DATA_DIR/index``, whose index part
is then a marker naming the collection.

* **One collection per fitted fusion**, named after the deployment (``redis_prefix``), the
  dimension and a digest of the fusion's fitted state: a re-seed fits new centring means, so
  its vectors, which live in another space, never mix with the old ones.
* **Rows**: ``id`` (primary key), ``vec`` (inner product), ``version``, ``deleted`` (a
  delete is a *tombstone* row, so that an older upsert applied after it cannot bring the
  listing back), ``labelled`` and ``category`` (what the labelled-only and first-level
  filters of a search are: Milvus filter expressions), ``payload`` (the listing's metadata,
  category path included, as JSON). The reserved row :data:`LOG_ROW` (no listing id can
  start with ``#``: ``indexer.catalog.ID_PATTERN``) holds the log position applied, as its
  version, and the first-level categories ever written.
* **Views are handles.** Milvus cannot freeze a version for the length of a request, so a
  :class:`MilvusView` asks Milvus each time with consistency level ``Strong``: every question
  sees every write acknowledged before it, but two questions of one request may see two
  versions (a write landed between them), which the frozen FAISS views exclude.
* **One writer**, under a lease in the state store: see :class:`MilvusReplica`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from .catalog import MAX_ID_CHARS
from .errors import IndexMismatch, VitrineError
from .fusion import Fusion
from .replica import Replica
from .settings import Settings
from .state import StateStore, StoreUnavailable

if TYPE_CHECKING:
    from .pipeline import Upsert, Vitrine

log = logging.getLogger(__name__)
_T = TypeVar("_T")
LOG_ROW = "#log"
WRITER_LEASE = "milvus-writer"
# Seconds the writer's lease lasts unless renewed (it is, at every catch-up, five times a
# second): the longest a crashed writer leaves the log unapplied.
WRITER_TTL = 15.0
CATEGORY_CHARS = 4096
STRONG = "Strong"
# Seconds one Milvus call may take: a server that stops answering fails the request (503)
# instead of holding its thread for ever
CALL_TIMEOUT = 30.0
BATCH = 256  # rows per insert: ~1.8 MB of 1792-dim vectors, far under gRPC's 64 MB
Payload = dict[str, Any]


class VectorStoreUnavailable(StoreUnavailable):
    """Milvus cannot be reached or refused a call (transient, like the state store's)."""


class WriterLeaseLost(VitrineError):
    """This process stopped being the one that writes to Milvus while it applied the log."""


def milvus_uri(settings: Settings) -> str | None:
    """``http://HOST:PORT`` of the configured Milvus; None with the FAISS store."""
    store = settings.vector_store
    return None if store == "faiss" else "http://" + store.removeprefix("milvus://")


def collection_name(settings: Settings, fusion: Fusion) -> str:
    """The collection of a fitted fusion in this deployment (see the module doc)."""
    meta, arrays = fusion.to_state()
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key], np.float32).tobytes())
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", settings.redis_prefix)
    return f"vitrine_{prefix}_{fusion.dim}_{h.hexdigest()[:12]}"


def _literal(s: str) -> str:
    """``s`` as a string literal of a Milvus filter expression (C-style escapes)."""
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def _ids_in(ids: Sequence[str]) -> str:
    return f"id in [{', '.join(_literal(x) for x in ids)}]"


class MilvusIndex:
    """One collection of a Milvus server: what :class:`~indexer.pipeline.Vitrine` holds in
    place of a :class:`~indexer.index.VectorIndex` with the Milvus store."""

    kind = "milvus"

    def __init__(self, client: MilvusClient, name: str, dim: int) -> None:
        self.client = client
        self.name = name
        self.dim = dim

    @classmethod
    def open(cls, settings: Settings, fusion: Fusion, *, fresh: bool = False,
             create: bool = True) -> MilvusIndex:
        """The collection of ``fusion``: created when absent (``create``; else refused: a
        seeded index whose collection is gone must not pass for an empty one); ``fresh``:
        emptied first."""
        uri = milvus_uri(settings)
        if uri is None:
            raise IndexMismatch("VITRINE_VECTOR_STORE is faiss: there is no Milvus to open")
        try:
            client = MilvusClient(uri=uri, timeout=settings.broker_timeout)
        except MilvusException as e:
            log.error("cannot connect to Milvus at %s: %s", uri, e)
            raise VectorStoreUnavailable("the Milvus vector store cannot be reached") from e
        self = cls(client, collection_name(settings, fusion), fusion.dim)
        if not create and not self._rpc(client.has_collection, self.name,
                                              timeout=CALL_TIMEOUT):
            raise IndexMismatch(f"the Milvus collection {self.name} of this index is missing: "
                                "seed the index again")
        self._rpc(self._create, fresh)
        return self

    def _create(self, fresh: bool) -> None:
        c = self.client
        if fresh and c.has_collection(self.name):
            c.drop_collection(self.name)
        if c.has_collection(self.name):
            return
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_CHARS)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("version", DataType.INT64)
        schema.add_field("deleted", DataType.BOOL)
        schema.add_field("labelled", DataType.BOOL)
        schema.add_field("category", DataType.VARCHAR, max_length=CATEGORY_CHARS)
        schema.add_field("payload", DataType.JSON)
        params = c.prepare_index_params()
        # AUTOINDEX: the server picks its best index for the metric (HNSW on a standalone
        # Milvus); inner product over the fused vectors, as with FAISS (indexer/fusion.py)
        params.add_index("vec", index_type="AUTOINDEX", metric_type="IP")
        try:
            c.create_collection(self.name, schema=schema, index_params=params,
                                consistency_level=STRONG)
        except MilvusException:
            if not c.has_collection(self.name):  # else another process created it first
                raise

    def _rpc(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return call(*args, **kwargs)
        except MilvusException as e:
            # the details (addresses, expressions) go to the log, not to clients
            log.error("Milvus call on %s failed: %s", self.name, e)
            raise VectorStoreUnavailable("the Milvus vector store failed a call") from e

    def close(self) -> None:
        self._rpc(self.client.close)

    # --- reads (each on a handle: see the module doc) -----------------------------------------
    def view(self) -> MilvusView:
        return MilvusView(self)

    def __len__(self) -> int:
        return len(self.view())

    def __contains__(self, listing_id: object) -> bool:
        return listing_id in self.view()

    def query(self, expr: str, fields: list[str], limit: int | None = None) -> list[dict[str, Any]]:
        kw: dict[str, Any] = {"limit": limit} if limit is not None else {}
        return self._rpc(self.client.query, self.name, filter=expr, output_fields=fields,
                         consistency_level=STRONG, timeout=CALL_TIMEOUT, **kw)

    def scan(self, expr: str, fields: list[str]) -> Iterator[dict[str, Any]]:
        """Every row passing ``expr``, a batch at a time (no query-size limit)."""
        it = self._rpc(self.client.query_iterator, self.name, batch_size=1000, filter=expr,
                       output_fields=fields, consistency_level=STRONG, timeout=CALL_TIMEOUT)
        try:
            while batch := self._rpc(it.next):
                yield from batch
        finally:
            it.close()

    def stored_versions(self, ids: Sequence[str]) -> dict[str, int]:
        """The version Milvus holds of each of ``ids`` (a delete's included); absent: none."""
        out: dict[str, int] = {}
        ids = list(dict.fromkeys(ids))
        for a in range(0, len(ids), 1000):
            rows = self.query(_ids_in(ids[a:a + 1000]), ["version"])
            out.update({r["id"]: int(r["version"]) for r in rows})
        return out

    def applied(self) -> int:
        """The log position applied to this collection (0: none)."""
        rows = self.query(_ids_in([LOG_ROW]), ["version"])
        return int(rows[0]["version"]) if rows else 0

    def categories(self) -> list[str]:
        """Every first-level category a listing was written with, in order of appearance."""
        rows = self.query(_ids_in([LOG_ROW]), ["payload"])
        return list(rows[0]["payload"].get("categories", [])) if rows else []

    def digest(self) -> str:
        """A digest of the (id, version) pairs held, deletes included (see Replica.digest)."""
        pairs = sorted((r["id"], int(r["version"])) for r in
                       self.scan(f"id != {_literal(LOG_ROW)}", ["version"]))
        h = hashlib.sha256()
        for lid, version in pairs:
            h.update(f"{lid}\t{version}\n".encode())
        return h.hexdigest()[:16]

    # --- writes ---------------------------------------------------------------------------
    def apply(self, *args: Any, **kwargs: Any) -> int:
        raise IndexMismatch("with the Milvus vector store the vectors are written by applying "
                            "the state store's log (indexer.milvus.MilvusReplica), with the "
                            "versions that decide what wins")

    def write(self, upserts: Sequence[Upsert], deletes: Sequence[str],
              versions: Mapping[str, int], pos: int) -> None:
        """Upsert ``upserts`` and tombstone ``deletes`` at their ``versions``, then record
        ``pos`` as the log position applied. Rows first: a crash between the two replays the
        entries, which the versions then skip."""
        rows = [self._row(lid, vec, meta.payload(), meta.labelled, meta.category,
                          versions[lid]) for lid, vec, meta in upserts]
        rows += [self._row(lid, None, {}, False, None, versions[lid], deleted=True)
                 for lid in deletes]
        for a in range(0, len(rows), BATCH):
            self._rpc(self.client.upsert, self.name, rows[a:a + BATCH], timeout=CALL_TIMEOUT)
        self._record(pos, [meta.category for _, _, meta in upserts])

    def _row(self, lid: str, vec: np.ndarray | None, payload: Payload, labelled: bool,
             category: str | None, version: int, *, deleted: bool = False) -> dict[str, Any]:
        return {"id": lid, "vec": np.zeros(self.dim, np.float32) if vec is None else
                np.asarray(vec, np.float32).reshape(-1),
                "version": int(version), "deleted": deleted, "labelled": labelled,
                "category": category or "", "payload": payload}

    def _record(self, pos: int, categories: Sequence[str | None]) -> None:
        # the stored list, read again each time: a writer that held the lease meanwhile may
        # have added to it, and a list cached here would write its categories away
        known = self.categories()
        new = [c for c in dict.fromkeys(categories) if c and c not in known]
        row = self._row(LOG_ROW, None, {"categories": known + new}, False, None, pos,
                        deleted=True)  # a tombstone: no search or listing ever sees it
        self._rpc(self.client.upsert, self.name, [row], timeout=CALL_TIMEOUT)


class MilvusView:
    """A handle on the collection with :class:`~indexer.index.IndexView`'s reads (see the
    module doc: not frozen). Take it once per request like a FAISS view."""

    kind = "milvus"

    def __init__(self, index: MilvusIndex) -> None:
        self.index = index
        self.dim = index.dim

    def __repr__(self) -> str:
        return f"MilvusView({self.index.name!r})"

    def __len__(self) -> int:
        rows = self.index.query("deleted == false", ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def __contains__(self, listing_id: object) -> bool:
        return isinstance(listing_id, str) and bool(self.index.query(
            f"{_ids_in([listing_id])} and deleted == false", ["version"]))

    def ids(self) -> list[str]:
        """The live listing ids, by id (Milvus keeps no order of writes)."""
        return sorted(r["id"] for r in self.index.scan("deleted == false", ["version"]))

    def payload(self, listing_id: str) -> Payload:
        rows = self.index.query(f"{_ids_in([listing_id])} and deleted == false", ["payload"])
        if not rows:
            raise KeyError(listing_id)
        return dict(rows[0]["payload"] or {})

    def get(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of ``ids`` (raises KeyError for an unknown id); exact."""
        out = np.empty((len(ids), self.dim), np.float32)
        if not ids:
            return out
        rows = {r["id"]: r["vec"] for a in range(0, len(ids), 1000) for r in self.index.query(
            f"{_ids_in(ids[a:a + 1000])} and deleted == false", ["vec"])}
        for i, lid in enumerate(ids):
            if lid not in rows:
                raise KeyError(lid)
            out[i] = rows[lid]
        return out

    @cached_property
    def categories(self) -> dict[str, int]:
        """The first-level categories ever written (name -> a code, as IndexView's)."""
        return {c: i for i, c in enumerate(self.index.categories())}

    def labelled_categories(self) -> list[str]:
        """The categories at least one live labelled listing has (one query each)."""
        return [c for c in self.categories if self.index.query(
            f"category == {_literal(c)} and labelled == true and deleted == false",
            ["version"], limit=1)]

    def category_counts(self) -> dict[str, int]:
        """Live listings per first-level category (one count each)."""
        out = {}
        for c in self.categories:
            rows = self.index.query(f"category == {_literal(c)} and deleted == false",
                                    ["count(*)"])
            if rows and rows[0]["count(*)"]:
                out[c] = int(rows[0]["count(*)"])
        return out

    def listing_payloads(self, *, labelled: bool) -> Iterator[Payload]:
        """The payloads of the live listings that are (not) labelled."""
        expr = f"deleted == false and labelled == {'true' if labelled else 'false'}"
        return (dict(r["payload"] or {}) for r in self.index.scan(expr, ["payload"]))

    def search(self, queries: np.ndarray, k: int, *, effort: int | None = None,
               category: str | None = None, labelled_only: bool = False,
               ) -> list[list[tuple[str, float, Payload]]]:
        """Top-``k`` ``(id, inner product, payload)`` per query row, best first; the filters
        are Milvus filter expressions, applied inside its search. ``effort`` (a FAISS knob)
        has no Milvus counterpart here: the server's AUTOINDEX tunes itself."""
        q = np.ascontiguousarray(np.asarray(queries, np.float32))
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatch(f"vectors of shape {q.shape} for an index of dimension "
                                f"{self.dim}")
        if k <= 0 or not len(q):
            return [[] for _ in range(len(q))]
        expr = ["deleted == false"]
        if labelled_only:
            expr.append("labelled == true")
        if category is not None:
            expr.append(f"category == {_literal(category)}")
        found = self.index._rpc(
            self.index.client.search, self.index.name, data=list(q), limit=min(k, 16384),
            filter=" and ".join(expr), output_fields=["payload"],
            search_params={"metric_type": "IP"}, consistency_level=STRONG,
            timeout=CALL_TIMEOUT)
        return [[(h["id"], float(h["distance"]), dict(h["entity"]["payload"] or {}))
                 for h in hits] for hits in found]

    def state(self) -> dict[str, Any]:
        return {"dim": self.dim, "kind": self.kind, "collection": self.index.name,
                "live": len(self), "categories": list(self.categories)}

    def write(self, directory: Path) -> None:
        """The snapshot's index part: a marker naming the collection (the vectors are in
        Milvus)."""
        (directory / "index.json").write_text(json.dumps(
            {"store": "milvus", "collection": self.index.name, "dim": self.dim}))


def move_to_milvus(v: Vitrine, settings: Settings, catalog: Sequence[Upsert]) -> None:
    """Write the catalog ``v`` was just built from (``catalog``: its fused vectors, in FAISS
    where the calibration was fitted) into a new collection for its fusion, at version 0
    (every log entry, from version 1 on, wins over it), and keep ``v``'s vectors there from
    then on."""
    index = MilvusIndex.open(settings, v.state().fusion, fresh=True)
    index.write(catalog, [], {lid: 0 for lid, _, _ in catalog}, 0)
    v.keep_vectors_in(index)


class MilvusReplica(Replica):
    """A process's handle on the vectors in Milvus: it holds no copy of them.

    * **One writer.** Milvus has no conditional write: two processes applying the log at
      once could lose an update (one reads version 3, the other writes 5, the first writes
      4). So exactly one process applies the log, the holder of the :data:`WRITER_LEASE`
      in the state store (renewed at each catch-up, checked again before each write); it
      skips an entry whose version is not higher than the one Milvus holds (tombstones
      included) and records the position applied in Milvus, after the rows: a replay is
      harmless. The others only follow: their position is the one Milvus records, and a
      seed (a new published snapshot, a new fusion) is loaded when it appears.
    * **The window left.** The lease is checked before a write, not during it: a writer
      stalled past :data:`WRITER_TTL` between its check and its write (a stop-the-world
      pause of 15 s) can write over a newer version its successor wrote meanwhile. It is
      accepted rather than closed because closing it needs a fenced write, which Milvus
      does not have, the pause it takes is far longer than any batch, and it heals: the
      listing's next post or delete is applied with a higher version.
    * ``wait_version`` (read-your-writes in the API) asks Milvus for the listing's version.
    * No snapshot of vectors is written: Milvus holds them, and the published snapshot
      holds the fitted fusion, which only a seed changes. The writer trims the log up to the
      position Milvus holds instead.
    """

    def __init__(self, settings: Settings, store: StateStore, vitrine: Vitrine) -> None:
        super().__init__(settings, store, vitrine)
        self._recorded = -1  # the position last recorded in Milvus by this process
        self._digests: tuple[int, str] = (-1, "")

    def _index(self) -> MilvusIndex:
        index = self.v.index
        if not isinstance(index, MilvusIndex):
            raise IndexMismatch("the loaded index is not in Milvus")
        return index

    def _lead(self) -> bool:
        """Take or renew the writer lease: True while this process writes to Milvus."""
        if not self.store.lease(WRITER_LEASE, self._owner, WRITER_TTL):
            return False
        applied = self._index().applied()  # a previous writer may have gone further
        with self._cond:
            self.pos = max(self.pos, applied)
        return True

    def _follow(self) -> None:
        from .index import current_snapshot

        if current_snapshot(self.root) != self.v.snapshot:
            self._reload()  # a seed published a new fusion (and collection)
        applied = self._index().applied()
        with self._cond:
            self.pos = applied
            self._cond.notify_all()

    def catch_up(self, block_ms: int = 0) -> int:
        with self._writer:
            if self._lead():
                n = self._catch_up(block_ms)
                if self.pos != self._recorded:  # e.g. a reload: record where we are
                    self._index().write([], [], {}, self.pos)
                    self._recorded = self.pos
                return n
            self._follow()
        if block_ms:  # the tail thread's pace while another process writes
            self._stop.wait(block_ms / 1000)
        return 0

    def _stored_versions(self, ids: Sequence[str]) -> Mapping[str, int]:
        return self._index().stored_versions(ids)

    def _write(self, upserts: dict[str, Upsert], deletes: set[str],
               changed: dict[str, int], pos: int) -> None:
        if upserts or deletes or pos != self._recorded:
            if not self.store.lease(WRITER_LEASE, self._owner, WRITER_TTL):
                raise WriterLeaseLost("another process took over writing to Milvus")
            self._index().write(list(upserts.values()), sorted(deletes), changed, pos)
            self._recorded = pos

    def _hold(self, changed: dict[str, int]) -> None:
        """Nothing: the versions are in Milvus (:meth:`version_of` asks it)."""

    def _reload(self) -> None:
        super()._reload()
        applied = self._index().applied()
        with self._cond:
            self.pos = max(self.pos, applied)
            self._recorded = applied
            self._cond.notify_all()

    def version_of(self, lid: str) -> int:
        return self._index().stored_versions([lid]).get(lid, -1)

    def wait_version(self, lid: str, version: int, timeout: float = 1.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.version_of(lid) < version:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:  # woken early when this process is the writer
                self._cond.wait(min(left, 0.02))
        return True

    def digest(self) -> str:
        pos: int = self.pos
        if self._digests[0] != pos:
            self._digests = (pos, self._index().digest())
        return self._digests[1]

    def _snapshot(self) -> bool:
        if not self._lead():
            return False
        self._since_snapshot = 0
        applied = self._index().applied()
        if applied <= self.store.trimmed_upto():
            return False
        self.store.trim(applied)
        return True

    def close(self) -> None:
        self.store.unlease(WRITER_LEASE, self._owner)
        self._index().close()


__all__ = ["MilvusIndex", "MilvusReplica", "MilvusView", "VectorStoreUnavailable",
           "WriterLeaseLost", "collection_name", "milvus_uri", "move_to_milvus"]
