"""The :class:`~indexer.state.model.StateStore` on Redis, shared by every process.

Keys, all under ``{prefix}:``:

* ``version`` (INCR counter), ``latest`` (hash id -> latest version), ``status`` (hash id ->
  status JSON);
* ``pending`` (zset id -> µs when claimable), ``events`` (hash id -> event JSON);
* ``log`` (a stream whose entry ids are ``<pos>-0``), ``logpos`` (its INCR counter),
  ``trimmed`` (trimmed_upto);
* ``lease:{name}`` (the owner, expiring by PX);
* ``thumb`` (hash id -> thumbnail JPEG) and ``thumbtag`` (hash id -> its etag), written by
  the commit of an indexed outcome and removed by a delete, in the same script;
* ``review`` (zset id -> version: the review queue) and ``review:{reason}`` (one per
  reason), and ``bystatus:{status}`` (zset id -> version, one per status: what
  ``status_ids`` pages and ``status_counts`` counts without scanning), updated by every
  script that writes a status;
* ``photos`` (hash ``{id}:{version}`` -> the photo bytes, for exactly as long as their event
  is pending);
* ``corrections`` (hash id -> JSON list: operators' category writes, kept across re-posts,
  removed by a delete);
* ``schema`` (the layout's number: :meth:`RedisStore.connect` upgrades an older one).

Every key a script touches is one of its declared ``KEYS`` (Redis's rule for scripts, which
a cluster enforces): the per-reason and per-status keys are a fixed list, and photos are
fields of one hash rather than one key per event.

Every write that must be atomic is one Lua script: Redis runs a script alone, so no other
client sees it half done, and no MULTI/WATCH retry loop is needed. A script is all-or-nothing
only if it cannot fail half way: arguments are checked here before it is sent.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    TimeoutError,
)
from redis.retry import Retry

from .model import (
    REVIEW_REASONS,
    STATUSES,
    Claimed,
    Event,
    LogEntry,
    Outcome,
    Status,
    StoreUnavailable,
    check_relabel,
    decode_entry,
    encode_entry,
)

# OOM (maxmemory reached) and READONLY (a failed-over primary) are refused before a script
# writes anything, and pass like an outage: both are the "disk full" of Redis.
_TRANSIENT = (ConnectionError, TimeoutError, BusyLoadingError, OutOfMemoryError, ReadOnlyError)

SCHEMA = 2  # the key layout (1: photos as keys of their own, no per-status indexes)
P = ParamSpec("P")
R = TypeVar("R")


def _transient(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except _TRANSIENT as e:
            # the message reaches HTTP clients: the reason's kind, not Redis's host and port
            # (those stay in the chained exception, for the log)
            raise StoreUnavailable(f"Redis unavailable ({type(e).__name__})") from e

    return wrapper


def redact(url: str) -> str:
    """``url`` without its password (in the netloc or a ``?password=`` query)."""
    u = urlsplit(url)
    netloc = u.netloc
    if u.password is not None:
        netloc = f"{u.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(u.query)],
                      safe="*")
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


# Time comes from redis.call('TIME'), not from the caller: the API, the workers and the
# sweeper may run on different hosts, and leases must expire on one clock, whatever their
# skew. Redis >= 5 replicates scripts by their effects, so TIME inside a write is allowed.
# Scores are integer µs (exact in a double), passed as "%.0f" text: Lua numbers otherwise
# reach redis.call as "%.14g", which would round them to 0.1 ms and make ties ordered by id.
# An event's payload travels inside its JSON as a string: cjson would re-encode floats with
# 14 digits and turn an empty list into {}, so Lua never decodes it.
_PRELUDE = """
local K_VERSION, K_LATEST, K_STATUS, K_PENDING, K_EVENTS, K_LOG, K_LOGPOS, K_TRIMMED =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_THUMB, K_THUMBTAG, K_REVIEW = KEYS[9], KEYS[10], KEYS[11]
local K_PHOTOS, K_CORRECTIONS = KEYS[12], KEYS[13]
local REASONS, STATUSES = {@REASONS@}, {@STATUSES@}
local K_REASON, K_BYSTATUS = {}, {}
for i, r in ipairs(REASONS) do K_REASON[r] = KEYS[13 + i] end
for i, s in ipairs(STATUSES) do K_BYSTATUS[s] = KEYS[13 + #REASONS + i] end
local function review_drop(id)
  redis.call('ZREM', K_REVIEW, id)
  for _, r in ipairs(REASONS) do redis.call('ZREM', K_REASON[r], id) end
end
-- every status write goes through here: the status, its per-status index and the review
-- queue change together (the JSON is decoded only to read status, version and review)
local function put_status(id, status_json)
  local st = cjson.decode(status_json)
  local v = string.format('%.0f', st.version)
  redis.call('HSET', K_STATUS, id, status_json)
  for _, s in ipairs(STATUSES) do redis.call('ZREM', K_BYSTATUS[s], id) end
  redis.call('ZADD', K_BYSTATUS[st.status], v, id)
  review_drop(id)
  if st.status == 'indexed' and type(st.review) == 'table' and #st.review > 0 then
    for _, r in ipairs(st.review) do redis.call('ZADD', K_REASON[r], v, id) end
    redis.call('ZADD', K_REVIEW, v, id)
  end
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function make_claimable(id, at_us)
  redis.call('ZADD', K_PENDING, string.format('%.0f', at_us), id)
end
local function pending_version(id)
  local raw = redis.call('HGET', K_EVENTS, id)
  return raw and cjson.decode(raw).version
end
local function drop_event(id)
  local v = pending_version(id)
  if v then
    redis.call('HDEL', K_PHOTOS, id .. ':' .. v)
    redis.call('HDEL', K_EVENTS, id)
    redis.call('ZREM', K_PENDING, id)
  end
end
local function log_append(json)
  local pos = redis.call('INCR', K_LOGPOS)
  redis.call('XADD', K_LOG, pos .. '-0', 'e', json)
  return pos
end
""".replace("@REASONS@", ", ".join(f"'{r}'" for r in REVIEW_REASONS)).replace(
    "@STATUSES@", ", ".join(f"'{x}'" for x in STATUSES))

_ACCEPT = """
local id, has_photo = ARGV[1], ARGV[3] == '1'
local v = redis.call('INCR', K_VERSION)
drop_event(id)
redis.call('HSET', K_LATEST, id, v)
put_status(id, cjson.encode({status = 'queued', version = v}))
redis.call('HSET', K_EVENTS, id,
  cjson.encode({version = v, attempts = 0, has_photo = has_photo, leased = false,
                payload = ARGV[2]}))
make_claimable(id, now_us())
if has_photo then redis.call('HSET', K_PHOTOS, id .. ':' .. v, ARGV[4]) end
return v
"""

_DELETE = """
local id = ARGV[1]
local v = redis.call('INCR', K_VERSION)
drop_event(id)
redis.call('HSET', K_LATEST, id, v)
put_status(id, cjson.encode({status = 'deleted', version = v}))
redis.call('HDEL', K_CORRECTIONS, id)
redis.call('HDEL', K_THUMB, id)
redis.call('HDEL', K_THUMBTAG, id)
log_append(cjson.encode({op = 'delete', id = id, version = v}))
return v
"""

# Given-up events do not count against limit, so claimable ones are read again until limit
# events are claimed; with lease_s == 0 a claimed event stays claimable, hence `seen`.
_CLAIM = """
local limit, lease_us, max_attempts = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_us()
local out, seen, claimed, stayed = {}, {}, 0, 0
while claimed < limit do
  local fresh = false
  local ids = redis.call('ZRANGEBYSCORE', K_PENDING, '-inf', string.format('%.0f', now),
                         'LIMIT', 0, limit - claimed + stayed)
  for _, id in ipairs(ids) do
    if not seen[id] and claimed < limit then
      seen[id], fresh = true, true
      local ev = cjson.decode(redis.call('HGET', K_EVENTS, id))
      ev.id = id
      if ev.attempts >= max_attempts then
        local why = ev.leased and 'the last lease expired without a result'
                    or 'the last attempt was released for a retry'
        local status = cjson.encode({status = 'failed', version = ev.version,
          error = 'gave up after ' .. ev.attempts .. ' attempts: ' .. why})
        put_status(id, status)
        drop_event(id)
        out[#out + 1] = cjson.encode({id = id, version = ev.version, given_up = status})
      else
        ev.attempts, ev.leased = ev.attempts + 1, true
        redis.call('HSET', K_EVENTS, id, cjson.encode(ev))
        make_claimable(id, now + lease_us)
        claimed = claimed + 1
        if lease_us <= 0 then stayed = stayed + 1 end
        out[#out + 1] = cjson.encode(ev)
      end
    end
  end
  if not fresh then break end
end
return out
"""

# The pending event is always the latest accepted post (accept replaces it, delete drops
# it), so finding it at the outcome's version means that version is still latest; and a
# duplicate or late commit of it finds it gone and changes nothing. Per outcome: id, version,
# status, entry ('' for none), thumbnail etag ('' to remove it) and bytes.
_COMMIT = """
local res = {}
for i = 1, #ARGV, 6 do
  local id = ARGV[i]
  local ok = pending_version(id) == tonumber(ARGV[i + 1])
  if ok then
    put_status(id, ARGV[i + 2])
    if ARGV[i + 3] ~= '' then
      log_append(ARGV[i + 3])
      if ARGV[i + 4] == '' then
        redis.call('HDEL', K_THUMB, id)
        redis.call('HDEL', K_THUMBTAG, id)
      else
        redis.call('HSET', K_THUMB, id, ARGV[i + 5])
        redis.call('HSET', K_THUMBTAG, id, ARGV[i + 4])
      end
    end
    drop_event(id)
  end
  res[#res + 1] = ok and 1 or 0
end
return res
"""

# The condition of StateStore.relabel (model.check_relabel says the same in Python). The
# status and the entry come without "version" (ARGV 3, 4: JSON objects, never empty): it is
# spliced into their text, so Lua never re-encodes them.
_RELABEL = """
local id, expected = ARGV[1], tonumber(ARGV[2])
local raw = redis.call('HGET', K_STATUS, id)
local pending = redis.call('HEXISTS', K_EVENTS, id) == 1
local cur = raw and cjson.decode(raw)
local version = cur and tonumber(cur.version) or 0
local ok = (not cur and expected == 0 and not pending) or
           (cur and cur.status == 'indexed' and not pending and version == expected)
if not ok then
  return {0, version, cur and cur.status or '', pending and 1 or 0}
end
local v = redis.call('INCR', K_VERSION)
local status = string.sub(ARGV[3], 1, -2) .. ', "version": ' .. v .. '}'
redis.call('HSET', K_LATEST, id, v)
put_status(id, status)
log_append(string.sub(ARGV[4], 1, -2) .. ', "version": ' .. v .. '}')
if ARGV[5] ~= '' then redis.call('HSET', K_CORRECTIONS, id, ARGV[5]) end
return {1, v, '', 0}
"""

_RELEASE = """
local at, refund = now_us() + tonumber(ARGV[1]), ARGV[2] == '1'
for i = 3, #ARGV, 2 do
  local id, raw = ARGV[i], redis.call('HGET', K_EVENTS, ARGV[i])
  local ev = raw and cjson.decode(raw)
  if ev and ev.version == tonumber(ARGV[i + 1]) then
    ev.leased = false
    if refund and ev.attempts > 0 then ev.attempts = ev.attempts - 1 end
    redis.call('HSET', K_EVENTS, id, cjson.encode(ev))
    make_claimable(id, at)
  end
end
"""

# the upgrade's re-index (see RedisStore._upgrade)
_REINDEX = """
for i = 1, #ARGV do
  local raw = redis.call('HGET', K_STATUS, ARGV[i])
  if raw then put_status(ARGV[i], raw) end
end
"""

_APPEND = """
local res = {}
for i = 1, #ARGV do res[#res + 1] = log_append(ARGV[i]) end
return res
"""

# A snapshot cannot hold entries not appended yet: upto is capped at the last position, and
# trimmed_upto never goes back.
_TRIM = """
local upto = math.min(tonumber(ARGV[1]), tonumber(redis.call('GET', K_LOGPOS) or 0))
if upto > tonumber(redis.call('GET', K_TRIMMED) or 0) then
  redis.call('XTRIM', K_LOG, 'MINID', (upto + 1) .. '-0')
  redis.call('SET', K_TRIMMED, upto)
end
"""

_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_UNLEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""


def _check_review(lid: str, status: Status) -> None:
    """Checked before a script runs (a script cannot fail half way): the scripts keep one
    set per known reason, and an unknown one would never leave the queue."""
    unknown = set(status.get("review") or ()) - set(REVIEW_REASONS)
    if unknown:
        raise ValueError(f"status of {lid!r}: unknown review reasons {sorted(unknown)}")


class RedisStore:
    def __init__(self, client: redis.Redis, prefix: str, timeout: float) -> None:
        self._r = client
        self._p = prefix
        self._keys = [f"{prefix}:{k}" for k in
                      ("version", "latest", "status", "pending", "events", "log", "logpos",
                       "trimmed", "thumb", "thumbtag", "review", "photos", "corrections",
                       *(f"review:{r}" for r in REVIEW_REASONS),
                       *(f"bystatus:{x}" for x in STATUSES))]
        self._log = f"{prefix}:log"
        # a blocked XREAD must answer before the socket times out, or it reads as an outage
        self._max_block_ms = int(timeout * 1000) + 4000
        def state(body: str) -> Any:
            return client.register_script(_PRELUDE + body)

        self._accept, self._delete, self._claim = state(_ACCEPT), state(_DELETE), state(_CLAIM)
        self._commit, self._release = state(_COMMIT), state(_RELEASE)
        self._relabel, self._reindex = state(_RELABEL), state(_REINDEX)
        self._append, self._trim = state(_APPEND), state(_TRIM)
        self._lease = client.register_script(_LEASE)
        self._unlease = client.register_script(_UNLEASE)

    @classmethod
    def connect(cls, url: str, prefix: str, timeout: float = 3.0) -> RedisStore:
        # No retries: a script whose reply was lost may have run, and running accept or
        # claim again would take a second version or count a second attempt.
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout,
                                      socket_timeout=timeout + 5, retry=Retry(NoBackoff(), 0))
        try:
            client.ping()
        except redis.RedisError as e:  # whatever answers there, it is no Redis we can use
            client.close()
            raise StoreUnavailable(
                f"cannot reach Redis at {redact(url)} within {timeout:g} s: {e}") from e
        store = cls(client, prefix, timeout)
        store._upgrade()
        return store

    @_transient
    def _upgrade(self) -> None:
        """Bring keys written by an older vitrine to this layout (:data:`SCHEMA`): per-status
        indexes built from the statuses, one key per pending photo moved into ``photos``.

        Idempotent, and safe beside other processes (old or new) writing meanwhile: each
        status is re-indexed by a script that reads it then (never from a stale copy), and
        each photo moves in a WATCH transaction that does nothing if its event ended since.
        """
        key = f"{self._p}:schema"
        if int(self._r.get(key) or 1) >= SCHEMA:
            return
        batch: list[str] = []
        for lid, _ in self._r.hscan_iter(f"{self._p}:status", count=1000):
            batch.append(lid.decode())
            if len(batch) == 1000:
                self._run(self._reindex, *batch)
                batch = []
        if batch:
            self._run(self._reindex, *batch)
        photos, events = f"{self._p}:photos", f"{self._p}:events"
        for old in self._r.scan_iter(match=f"{self._p}:photo:*", count=1000):
            field = old.decode()[len(f"{self._p}:photo:"):]
            lid, _, version = field.rpartition(":")

            def move(pipe: Any, old: bytes = old, field: str = field, lid: str = lid,
                     version: str = version) -> None:
                raw, event = pipe.get(old), pipe.hget(events, lid)
                pipe.multi()
                # only the photo of an event still pending at that version: any other is
                # an orphan (layout 1 could leave one when a process died mid-way)
                if raw is not None and event is not None and \
                        str(json.loads(event)["version"]) == version:
                    pipe.hset(photos, field, raw)
                pipe.delete(old)

            self._r.transaction(move, old, events)
        self._r.set(key, SCHEMA)

    def _run(self, script: Any, *args: Any) -> Any:
        return script(keys=self._keys, args=list(args))

    # --- writes the API accepts -----------------------------------------------------------
    @_transient
    def accept(self, payload: dict[str, Any], photo: bytes | None) -> int:
        lid = payload["id"]
        if not isinstance(lid, str):
            raise TypeError(f"payload id must be a str, not {type(lid).__name__}")
        flag = "0" if photo is None else "1"
        return int(self._run(self._accept, lid, json.dumps(payload), flag, photo or b""))

    @_transient
    def delete(self, lid: str) -> int:
        return int(self._run(self._delete, lid))

    @_transient
    def relabel(self, lid: str, expected: int, status: Status, entry: LogEntry,
                corrections: Sequence[dict[str, Any]] | None = None) -> int:
        body = json.dumps({k: v for k, v in status.items() if k != "version"})
        # the entry is about the listing whose version is checked, whatever it said
        raw_entry = encode_entry({**{k: v for k, v in entry.items() if k != "version"},
                                  "id": lid})
        _check_review(lid, status)
        history = "" if corrections is None else json.dumps(list(corrections))
        ok, version, current, pending = self._run(self._relabel, lid, int(expected), body,
                                                  raw_entry, history)
        if ok:
            return int(version)
        state = current.decode() if isinstance(current, bytes) else str(current)
        check_relabel(lid, expected, {"status": state, "version": int(version)} if state
                      else None, bool(pending))
        raise AssertionError("the relabel script refused a write check_relabel accepts")

    # --- the ingest use case --------------------------------------------------------------
    @_transient
    def claim(self, limit: int, lease_s: float, max_attempts: int) -> Claimed:
        out = Claimed()
        for raw in self._run(self._claim, int(limit), int(lease_s * 1e6), int(max_attempts)):
            d = json.loads(raw)
            if "given_up" in d:
                out.given_up.append(Outcome(d["id"], d["version"], json.loads(d["given_up"])))
            else:
                out.events.append(Event(d["id"], d["version"], json.loads(d["payload"]),
                                        d["attempts"], d["has_photo"]))
        return out

    @_transient
    def photo(self, event: Event) -> bytes | None:
        if not event.has_photo:
            return None
        raw = self._r.hget(f"{self._p}:photos", f"{event.id}:{event.version}")
        if raw is None:  # accepted by a vitrine of the first layout after the upgrade ran
            raw = self._r.get(f"{self._p}:photo:{event.id}:{event.version}")
        return cast(bytes | None, raw)

    @_transient
    def commit(self, outcomes: Sequence[Outcome]) -> list[bool]:
        if not outcomes:
            return []
        args: list[Any] = []
        for o in outcomes:
            if o.status.get("version") != o.version or "status" not in o.status:
                raise ValueError(f"status of {o.id!r} must hold status and version {o.version}")
            _check_review(o.id, o.status)
            entry = "" if o.entry is None else encode_entry(o.entry)
            tag, jpeg = o.thumbnail or ("", b"")
            args += [o.id, int(o.version), json.dumps(o.status), entry, tag, jpeg]
        return [bool(x) for x in self._run(self._commit, *args)]

    @_transient
    def release(self, events: Sequence[Event], delay_s: float = 0.0, *,
                refund: bool = False) -> None:
        if events:
            pairs = [x for e in events for x in (e.id, int(e.version))]
            self._run(self._release, int(delay_s * 1e6), int(refund), *pairs)

    @_transient
    def is_pending(self, lid: str, version: int) -> float | None:
        pipe = self._r.pipeline()  # MULTI/EXEC: the event, its score and the clock at once
        pipe.hget(f"{self._p}:events", lid)
        pipe.zscore(f"{self._p}:pending", lid)
        pipe.time()
        raw, score, (sec, usec) = pipe.execute()
        if raw is None or score is None or json.loads(raw)["version"] != version:
            return None
        return max(0.0, (score - (sec * 1_000_000 + usec)) / 1e6)

    @_transient
    def pending_count(self) -> int:
        return int(self._r.zcard(f"{self._p}:pending"))

    # --- reads ----------------------------------------------------------------------------
    @_transient
    def status(self, lid: str) -> Status | None:
        return self.statuses([lid])[0]

    @_transient
    def corrections(self, lid: str) -> list[dict[str, Any]]:
        raw = self._r.hget(f"{self._p}:corrections", lid)
        return cast(list[dict[str, Any]], json.loads(raw)) if raw is not None else []

    @_transient
    def statuses(self, lids: Sequence[str]) -> list[Status | None]:
        if not lids:
            return []
        raws = self._r.hmget(f"{self._p}:status", list(lids))
        return [json.loads(r) if r is not None else None for r in raws]

    @_transient
    def review_queue(self, reason: str | None, offset: int, limit: int
                     ) -> tuple[int, list[str]]:
        return self._page(f"{self._p}:review" + (f":{reason}" if reason else ""), offset,
                          limit)

    def _page(self, key: str, offset: int, limit: int) -> tuple[int, list[str]]:
        """A zset's size and its members ``offset .. offset + limit``, lowest score first."""
        if limit <= 0:
            return int(self._r.zcard(key)), []
        pipe = self._r.pipeline()  # MULTI/EXEC: the count and the page of one state
        pipe.zcard(key)
        pipe.zrange(key, int(offset), int(offset) + int(limit) - 1)
        total, ids = pipe.execute()
        return int(total), [i.decode() for i in ids]

    @_transient
    def status_ids(self, status: str, offset: int, limit: int, after: int = 0
                   ) -> tuple[int, list[tuple[str, int]]]:
        if status not in STATUSES:
            return 0, []
        key = f"{self._p}:bystatus:{status}"
        pipe = self._r.pipeline()  # MULTI/EXEC: the count and the page of one state
        pipe.zcard(key)
        pipe.zrangebyscore(key, f"({int(after)}", "+inf", start=int(offset),
                           num=max(0, int(limit)), withscores=True)
        total, rows = pipe.execute()
        return int(total), [(lid.decode(), int(v)) for lid, v in rows] if limit > 0 else []

    @_transient
    def status_counts(self) -> dict[str, int]:
        pipe = self._r.pipeline()  # MULTI/EXEC: the counts of one state
        for x in STATUSES:
            pipe.zcard(f"{self._p}:bystatus:{x}")
        return {x: int(n) for x, n in zip(STATUSES, pipe.execute(), strict=True) if n}

    # --- thumbnails -----------------------------------------------------------------------
    @_transient
    def put_thumbnails(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        if not items:
            return
        pipe = self._r.pipeline()  # MULTI/EXEC: a tag never names bytes not stored
        pipe.hset(f"{self._p}:thumb", mapping={lid: jpeg for lid, _, jpeg in items})
        pipe.hset(f"{self._p}:thumbtag", mapping={lid: tag for lid, tag, _ in items})
        pipe.execute()

    @_transient
    def thumbnail(self, lid: str) -> tuple[str, bytes] | None:
        pipe = self._r.pipeline()
        pipe.hget(f"{self._p}:thumbtag", lid)
        pipe.hget(f"{self._p}:thumb", lid)
        tag, jpeg = pipe.execute()
        return None if tag is None or jpeg is None else (tag.decode(), bytes(jpeg))

    @_transient
    def thumbnail_tags(self, lids: Sequence[str]) -> list[str | None]:
        if not lids:
            return []
        raws: list[bytes | None] = self._r.hmget(f"{self._p}:thumbtag", list(lids))  # type: ignore[assignment]
        return [r.decode() if r is not None else None for r in raws]

    # --- the log --------------------------------------------------------------------------
    @_transient
    def append(self, entries: Sequence[LogEntry]) -> list[int]:
        if not entries:
            return []
        return [int(p) for p in self._run(self._append, *map(encode_entry, entries))]

    @_transient
    def read(self, after: int, count: int = 1000, block_ms: int = 0) -> list[tuple[int, LogEntry]]:
        start = f"{int(after)}-0"
        rows: Any
        if block_ms <= 0:
            rows = self._r.xrange(self._log, min=f"({start}", max="+", count=count)
        else:
            block = min(int(block_ms), self._max_block_ms)
            res: Any = self._r.xread({self._log: start}, count=count, block=block)
            rows = res[0][1] if res else []
        return [(int(rid.split(b"-")[0]), decode_entry(fields[b"e"])) for rid, fields in rows]

    @_transient
    def last_pos(self) -> int:
        return int(self._r.get(f"{self._p}:logpos") or 0)

    @_transient
    def trimmed_upto(self) -> int:
        return int(self._r.get(f"{self._p}:trimmed") or 0)

    @_transient
    def trim(self, upto: int) -> None:
        self._run(self._trim, int(upto))

    # --- coordination ---------------------------------------------------------------------
    @_transient
    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = max(1, int(ttl_s * 1000))
        return bool(self._lease(keys=[f"{self._p}:lease:{name}"], args=[owner, ttl_ms]))

    @_transient
    def unlease(self, name: str, owner: str) -> None:
        self._unlease(keys=[f"{self._p}:lease:{name}"], args=[owner])

    @_transient
    def ping(self) -> None:
        self._r.ping()

    def close(self) -> None:
        self._r.close()
