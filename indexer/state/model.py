"""The state model: every accepted write gets a version; a result commits only if still latest.

Words used throughout (docs/service.md draws them):

* **version** — an integer from one counter per store that only grows. ``accept`` (a post or
  re-post) and ``delete`` take the next one when the write is accepted; the listing's
  *latest version* is the one of its last accepted write. Listings of a seeded catalog have
  version 0.
* **status** — one JSON record per listing id: ``{"status": "queued"|"indexed"|"failed"|
  "deleted", "version": int, ...}``. A deleted listing keeps a ``deleted`` record (a
  tombstone): its version is what a late result of an older write is compared with.
* **pending event** — at most one per listing id: the latest accepted post, waiting to be
  indexed. A re-post replaces it (the older photo goes with it); a delete removes it. An
  event is *claimed* for ``lease_s`` seconds by a consumer (``attempts`` += 1); a lease
  that expires (the consumer died) makes it claimable again. Past ``max_attempts`` the
  claim itself ends it ``failed`` (the dead-letter record, with the reason).
* **commit** — per outcome, one atomic step: if ``(id, version)`` is still the pending
  event (so ``version`` is the listing's latest and has no outcome yet), write its status,
  append its log entry (an upsert) and drop the pending event; else change nothing (a
  newer write won, or this outcome was committed already: a duplicated or redelivered
  event changes nothing).
* **thumbnail** — per listing id, the small JPEG of its indexed photo and its etag: set or
  removed by the commit of an outcome that carries a log entry, removed by ``delete``;
  ``put_thumbnails`` writes those of a seeded catalog.
* **review queue** — the indexed listings whose status holds a non-empty ``review`` (the
  reasons, :data:`REVIEW_REASONS`): kept by the store in the same atomic step as every
  status write (a listing leaves it when re-posted, deleted or relabelled), read in pages
  by :meth:`StateStore.review_queue`, oldest version first.
* **relabel** — an operator's category write, conditional on the version the operator saw
  (:meth:`StateStore.relabel`): next version, the new status and a ``label`` log entry,
  atomically; every replica applies the entry to its copy of the listing's payload. The
  listing's *corrections* (who, when, the previous value) are kept in the same step, apart
  from the status, so that a re-post (voted again) keeps them; a delete removes them.
* **per-status index** — the ids of each status by version, kept by every status write in
  the same atomic step: what ``status_ids`` pages (with a version cursor) and
  ``status_counts`` counts, without reading every status.
* **log** — entries ``{"op": "upsert"|"delete"|"label"|"reload", "id", "version", ...}`` at
  positions 1, 2, 3... (integers, gap-free when appended). Every replica applies them in
  order, highest version per id winning. ``trim(upto)`` drops entries ``<= upto`` and
  records ``trimmed_upto``; a reader whose position is below it must reload a snapshot.

Every method is atomic on its own. Transient backend failures (Redis unreachable, disk
full, database locked for too long) raise :class:`StoreUnavailable`; nothing is half done,
though a write whose reply was lost may have been applied whole (a retried ``accept`` then
takes a new version, which is harmless: the latest one wins). ``claim`` takes the events
that became claimable first (accepted, or released, or whose lease expired, earliest
first); given-up events do not count against its ``limit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import VersionConflict, VitrineError

if TYPE_CHECKING:
    from ..settings import Settings

Status = dict[str, Any]
LogEntry = dict[str, Any]
# why a listing is in the review queue (a status's ``review``): its seller's category
# disagrees with a confident vote; the vote is uncertain; the seller's category is not in
# the taxonomy; it is a near-duplicate of an indexed listing
REVIEW_REASONS = ("mislabel", "uncertain", "unknown_category", "duplicate")
# what a status record's ``status`` can be
STATUSES = ("queued", "indexed", "failed", "deleted")


class StoreUnavailable(VitrineError):
    """The state store cannot be reached or written right now (broker down, disk full...).

    Transient: the same call may succeed later. Nothing was changed by the failed call.
    """


class DataDirLocked(VitrineError):
    """Another embedded process already owns this data dir."""


@dataclass(frozen=True)
class Event:
    """An accepted post, as claimed by a consumer. ``payload`` is what the API validated:
    ``title``, ``description``, ``category``, ``image_url`` (all optional) — never the photo
    bytes, which are read with :meth:`StateStore.photo`."""

    id: str
    version: int
    payload: dict[str, Any]
    attempts: int = 1
    has_photo: bool = False


@dataclass(frozen=True)
class Outcome:
    """The result of one event: its final status and, when indexed, the log entry."""

    id: str
    version: int
    status: Status  # must hold "status" and "version" (== self.version)
    entry: LogEntry | None = None  # an upsert with "id" and "version"; None for failed
    # with an entry: the listing's thumbnail (indexer.thumbs) as (etag, jpeg), committed
    # with it; None removes the one of an earlier version (the new post has no photo)
    thumbnail: tuple[str, bytes] | None = None


@dataclass
class Claimed:
    events: list[Event] = field(default_factory=list)
    # events past max_attempts, already committed ``failed`` by the claim (dead letters)
    given_up: list[Outcome] = field(default_factory=list)


class StateStore(Protocol):
    # --- writes the API accepts -----------------------------------------------------------
    def accept(self, payload: dict[str, Any], photo: bytes | None) -> int:
        """Record a post of ``payload["id"]``: next version, status ``queued``, pending event
        (replacing any older one) with its photo. Returns the version."""
        ...

    def delete(self, lid: str) -> int:
        """Record a delete: next version, status ``deleted``, pending event dropped, and a
        ``{"op": "delete", "id", "version"}`` log entry appended, atomically. Returns the
        version. Whether the id is known is the caller's question."""
        ...

    def relabel(self, lid: str, expected: int, status: Status, entry: LogEntry,
                corrections: Sequence[dict[str, Any]] | None = None) -> int:
        """An operator's category write, conditional on ``expected``: if the listing's latest
        version is ``expected`` and it is ``indexed`` (or ``expected`` is 0 and it has no
        status at all: a listing of the seeded catalog, which the caller checked exists) and
        no post of it is pending, then take the next version, write ``status`` and append
        ``entry`` with it (both get ``"version"``), and replace the listing's
        :meth:`corrections` with ``corrections`` (None: leave them), atomically, and return
        the version. Else change nothing and raise :class:`~indexer.errors.VersionConflict`."""
        ...

    def corrections(self, lid: str) -> list[dict[str, Any]]:
        """The operators' category writes of a listing, oldest first: an audit trail kept
        across its re-posts (a re-post is voted again, but who corrected what stays), gone
        with a delete."""
        ...

    # --- the ingest use case --------------------------------------------------------------
    def claim(self, limit: int, lease_s: float, max_attempts: int) -> Claimed:
        """Take up to ``limit`` claimable events (oldest first) for ``lease_s`` seconds."""
        ...

    def photo(self, event: Event) -> bytes | None:
        """The photo accepted with ``event`` (None if it had none or was superseded)."""
        ...

    def commit(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Commit each outcome conditionally (see the module doc), all in one atomic step.
        Returns, per outcome, whether it was committed."""
        ...

    def release(self, events: Sequence[Event], delay_s: float = 0.0, *,
                refund: bool = False) -> None:
        """Make claimed events claimable again after ``delay_s``. Their attempt counts,
        unless ``refund`` (the consumer gives them back untried). Events no longer pending
        at that version are left alone."""
        ...

    def is_pending(self, lid: str, version: int) -> float | None:
        """If ``(lid, version)`` is still pending: seconds until it is claimable (0 = now,
        > 0 = leased or delayed). None when it is final or superseded."""
        ...

    def pending_count(self) -> int: ...

    # --- reads ----------------------------------------------------------------------------
    def status(self, lid: str) -> Status | None: ...

    def statuses(self, lids: Sequence[str]) -> list[Status | None]: ...

    def review_queue(self, reason: str | None, offset: int, limit: int
                     ) -> tuple[int, list[str]]:
        """``(total, ids)``: a page of the review queue (all reasons, or one of
        :data:`REVIEW_REASONS`), oldest version first."""
        ...

    def status_ids(self, status: str, offset: int, limit: int, after: int = 0
                   ) -> tuple[int, list[tuple[str, int]]]:
        """``(total, [(id, version)])``: a page of the listings whose status is ``status``,
        oldest version first, from those with a version above ``after`` (a cursor: the last
        version of the previous page, so that listings leaving the status meanwhile shift
        nothing) and past ``offset`` of them; ``total`` counts every one. From an index
        the status writes keep: no scan."""
        ...

    def status_counts(self) -> dict[str, int]:
        """How many listings have each status (``queued``, ``indexed``, ``failed``,
        ``deleted``); listings of a seeded catalog have none. From the same index."""
        ...

    # --- thumbnails -----------------------------------------------------------------------
    def put_thumbnails(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        """Store ``(id, etag, jpeg)`` thumbnails unconditionally (a seeded catalog's)."""
        ...

    def thumbnail(self, lid: str) -> tuple[str, bytes] | None:
        """``(etag, jpeg)`` of a listing's thumbnail, None when it has none."""
        ...

    def thumbnail_tags(self, lids: Sequence[str]) -> list[str | None]:
        """The etag of each listing's thumbnail (None: no thumbnail), without the bytes."""
        ...

    # --- the log --------------------------------------------------------------------------
    def append(self, entries: Sequence[LogEntry]) -> list[int]:
        """Append unconditionally (``reload`` after seeding). Returns the positions."""
        ...

    def read(self, after: int, count: int = 1000, block_ms: int = 0) -> list[tuple[int, LogEntry]]:
        """Entries at positions > ``after``, in order; waits up to ``block_ms`` for one."""
        ...

    def last_pos(self) -> int:
        """The position of the last entry ever appended (0 when none)."""
        ...

    def trimmed_upto(self) -> int:
        """Entries at positions <= this were trimmed (0 when never)."""
        ...

    def trim(self, upto: int) -> None:
        """Drop entries at positions <= ``upto`` (a published snapshot holds them)."""
        ...

    # --- coordination ---------------------------------------------------------------------
    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the named lease for ``owner``; False while another owner holds it."""
        ...

    def unlease(self, name: str, owner: str) -> None: ...

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the store cannot be used now."""
        ...

    def close(self) -> None: ...


def open_store(settings: Settings) -> StateStore:
    """Redis when ``VITRINE_BROKER_URL`` is set, else SQLite in the (locked) data dir."""
    if settings.broker_url:
        from .redis_store import RedisStore

        return RedisStore.connect(settings.broker_url, settings.redis_prefix,
                                  timeout=settings.broker_timeout)
    from .sqlite_store import SqliteStore

    return SqliteStore.open(settings.data_dir)


def check_relabel(lid: str, expected: int, current: Status | None, pending: bool) -> None:
    """Raise :class:`VersionConflict` unless ``(current, pending)`` can take a relabel that
    expects ``expected`` (see :meth:`StateStore.relabel`); SQLite's rule (Redis's script
    says the same in Lua)."""
    version = int(current["version"]) if current is not None else 0
    if current is None and expected == 0 and not pending:
        return
    if current is not None and current.get("status") == "indexed" and not pending \
            and version == expected:
        return
    if current is not None and current.get("status") != "indexed":
        raise VersionConflict(f"listing {lid!r} is {current.get('status')} (version "
                              f"{version}): reload it before changing its category", version)
    raise VersionConflict(f"listing {lid!r} is at version {version}, not {expected}: it "
                          "changed since it was read; reload it and try again", version)


def encode_entry(entry: LogEntry) -> str:
    """A log entry as JSON text; a ``vec`` (float32) travels as base64, bit for bit."""
    import base64
    import json

    import numpy as np

    e = dict(entry)
    if "vec" in e:
        e["vec"] = base64.b64encode(np.asarray(e["vec"], np.float32).tobytes()).decode()
    return json.dumps(e)


def decode_entry(raw: str | bytes) -> LogEntry:
    import base64
    import json

    import numpy as np

    e = json.loads(raw)
    if "vec" in e:
        e["vec"] = np.frombuffer(base64.b64decode(e["vec"]), np.float32)
    return dict(e)
