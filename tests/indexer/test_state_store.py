"""The StateStore contract, on both backends (real SQLite files, a real Redis), plus what only
the embedded SQLite store promises: one process per data dir, disk full, kill -9."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.state.model import DataDirLocked, Event, Outcome, StateStore, StoreUnavailable
from indexer.state.sqlite_store import SqliteStore

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]


class Backend:
    """Opens stores on one backing (a data dir, a Redis prefix) and closes them after the test."""

    def __init__(self, make: Callable[[], StateStore]) -> None:
        self._make = make
        self.opened: list[StateStore] = []

    def open(self) -> StateStore:
        self.opened.append(self._make())
        return self.opened[-1]

    def reopen(self, store: StateStore) -> StateStore:
        store.close()
        self.opened.remove(store)
        return self.open()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        b = Backend(lambda: SqliteStore.open(tmp_path / "data"))
        yield b
    else:
        import redis

        from indexer.state.redis_store import RedisStore

        prefix = f"vitrine-test-{uuid.uuid4().hex[:12]}"
        b = Backend(lambda: RedisStore.connect(REDIS_URL, prefix))
        yield b
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    for s in b.opened:
        s.close()


@pytest.fixture
def store(backend: Backend) -> StateStore:
    return backend.open()


def post(store: StateStore, lid: str, photo: bytes | None = None, **fields: str) -> int:
    return store.accept({"id": lid, "title": f"title of {lid}", **fields}, photo)


def indexed(lid: str, version: int) -> Outcome:
    vec = np.arange(4, dtype=np.float32) + version
    return Outcome(lid, version, {"status": "indexed", "version": version, "category": "Watches"},
                   {"op": "upsert", "id": lid, "version": version, "vec": vec})


def claim_one(store: StateStore, lease_s: float = 30.0, max_attempts: int = 5) -> Event:
    claimed = store.claim(10, lease_s, max_attempts)
    assert len(claimed.events) == 1 and not claimed.given_up, claimed
    return claimed.events[0]


# --- versions and accepted writes ------------------------------------------------------------


def test_versions_grow_across_accept_delete_and_reopen(backend: Backend, store: StateStore):
    v1, v2 = post(store, "a"), post(store, "b")
    v3 = store.delete("a")
    v4 = post(store, "a")
    assert 0 < v1 < v2 < v3 < v4
    assert store.status("a") == {"status": "queued", "version": v4}
    store = backend.reopen(store)
    assert store.status("b") == {"status": "queued", "version": v2}
    v5 = post(store, "c")
    v6 = store.delete("never-posted")
    assert v4 < v5 < v6
    assert store.statuses(["never-posted", "zz", "c"]) == [
        {"status": "deleted", "version": v6}, None, {"status": "queued", "version": v5}]


def test_accept_makes_one_claimable_event_with_payload_and_photo(store: StateStore):
    v = post(store, "a", photo=b"\x89PNG photo", category="Watches")
    assert store.pending_count() == 1
    assert store.is_pending("a", v) == 0
    e = claim_one(store)
    assert (e.id, e.version, e.attempts, e.has_photo) == ("a", v, 1, True)
    assert e.payload == {"id": "a", "title": "title of a", "category": "Watches"}
    assert store.photo(e) == b"\x89PNG photo"
    post(store, "b")
    assert claim_one(store).has_photo is False


def test_repost_replaces_pending_event_and_photo(store: StateStore):
    v1 = post(store, "a", photo=b"old photo")
    v2 = post(store, "a", photo=b"new photo", title="second")
    assert v2 > v1 and store.pending_count() == 1
    assert store.photo(Event("a", v1, {}, has_photo=True)) is None
    assert store.is_pending("a", v1) is None
    e = claim_one(store)
    assert (e.version, e.payload["title"], store.photo(e)) == (v2, "second", b"new photo")
    # a re-post while v2 is being processed is a new event, claimable at once, without photo
    v3 = post(store, "a")
    assert store.photo(e) is None and store.pending_count() == 1
    e3 = claim_one(store)
    assert (e3.version, e3.attempts, e3.has_photo, store.photo(e3)) == (v3, 1, False, None)


# --- commit ----------------------------------------------------------------------------------


def test_commit_writes_status_log_and_drops_event_once(store: StateStore):
    v = post(store, "a", photo=b"p")
    e = claim_one(store)
    assert store.commit([indexed("a", e.version)]) == [True]
    assert store.status("a") == {"status": "indexed", "version": v, "category": "Watches"}
    assert store.pending_count() == 0 and store.is_pending("a", v) is None
    assert store.photo(e) is None
    [(pos, entry)] = store.read(0)
    assert pos == store.last_pos() == 1
    assert (entry["op"], entry["id"], entry["version"]) == ("upsert", "a", v)
    assert entry["vec"].dtype == np.float32 and entry["vec"].tolist() == [v, v + 1, v + 2, v + 3]
    # the duplicate (a redelivered event) changes nothing
    assert store.commit([indexed("a", v)]) == [False]
    assert store.last_pos() == 1 and store.status("a")["status"] == "indexed"  # type: ignore[index]


def test_commit_of_failed_outcome_appends_nothing(store: StateStore):
    v = post(store, "a")
    claim_one(store)
    failed = {"status": "failed", "version": v, "error": "unusable photo"}
    assert store.commit([Outcome("a", v, failed)]) == [True]
    assert store.status("a") == failed and store.last_pos() == 0 and store.pending_count() == 0


def test_commit_of_older_version_after_repost_changes_nothing(store: StateStore):
    v1 = post(store, "a")
    claim_one(store)
    v2 = post(store, "a")
    assert store.commit([indexed("a", v1)]) == [False]
    assert store.status("a") == {"status": "queued", "version": v2}
    assert store.last_pos() == 0 and store.read(0) == []
    assert store.is_pending("a", v2) == 0
    assert store.commit([indexed("a", claim_one(store).version)]) == [True]
    assert store.status("a")["version"] == v2  # type: ignore[index]


def test_commit_after_delete_returns_false_and_delete_stands(store: StateStore):
    v1 = post(store, "a")
    claim_one(store)
    v2 = store.delete("a")
    assert store.pending_count() == 0
    assert store.commit([indexed("a", v1)]) == [False]
    assert store.status("a") == {"status": "deleted", "version": v2}
    assert store.read(0) == [(1, {"op": "delete", "id": "a", "version": v2})]


def test_commit_batch_decides_per_outcome(store: StateStore):
    va, vb = post(store, "a"), post(store, "b")
    assert len(store.claim(10, 30, 5).events) == 2
    assert store.commit([indexed("a", va), indexed("a", va), indexed("b", vb)]) == [
        True, False, True]
    assert [(p, e["id"]) for p, e in store.read(0)] == [(1, "a"), (2, "b")]


# --- claim, leases of events, release --------------------------------------------------------


def test_claim_respects_limit_oldest_first(store: StateStore):
    vs = [post(store, f"l{i}") for i in range(5)]
    batches = [[(e.id, e.version) for e in store.claim(2, 30, 5).events] for _ in range(4)]
    assert batches == [[("l0", vs[0]), ("l1", vs[1])], [("l2", vs[2]), ("l3", vs[3])],
                       [("l4", vs[4])], []]
    assert store.pending_count() == 5


def test_claimed_event_is_leased_until_the_lease_expires(store: StateStore):
    v = post(store, "a")
    assert claim_one(store, lease_s=0.4).attempts == 1
    assert store.claim(10, 0.4, 5).events == []
    wait = store.is_pending("a", v)
    assert wait is not None and 0 < wait <= 0.4
    time.sleep(0.7)
    assert store.is_pending("a", v) == 0
    e = claim_one(store)
    assert (e.version, e.attempts) == (v, 2)


def test_claim_past_max_attempts_gives_up(store: StateStore):
    v = post(store, "a")
    for n in (1, 2):
        assert claim_one(store, lease_s=0.2, max_attempts=2).attempts == n
        time.sleep(0.4)
    claimed = store.claim(10, 30, 2)
    assert claimed.events == []
    [dead] = claimed.given_up
    assert (dead.id, dead.version, dead.entry) == ("a", v, None)
    assert dead.status["status"] == "failed" and dead.status["version"] == v
    assert dead.status["error"].startswith("gave up after 2 attempts")
    assert store.status("a") == dead.status
    assert store.pending_count() == 0 and store.is_pending("a", v) is None
    assert store.last_pos() == 0
    # the late result of the abandoned attempt does not resurrect it
    assert store.commit([indexed("a", v)]) == [False]
    assert store.status("a") == dead.status


def test_a_refunded_release_does_not_count_the_attempt(store: StateStore):
    v = post(store, "a")
    e = claim_one(store)
    assert (e.version, e.attempts) == (v, 1)
    store.release([e], refund=True)  # given back untried
    e = claim_one(store)
    assert e.attempts == 1
    store.release([e])  # tried and failed: it counts
    assert claim_one(store).attempts == 2


def test_release_makes_event_claimable_after_delay(store: StateStore):
    v = post(store, "a")
    e = claim_one(store)
    store.release([e], delay_s=0.4)
    assert store.claim(10, 30, 5).events == []
    wait = store.is_pending("a", v)
    assert wait is not None and 0 < wait <= 0.4
    time.sleep(0.6)
    e = claim_one(store)
    assert (e.version, e.attempts) == (v, 2)
    store.release([e])
    assert claim_one(store).attempts == 3
    # releasing a superseded event leaves the newer one alone
    v2 = post(store, "a")
    store.release([e], delay_s=60)
    assert store.is_pending("a", v2) == 0
    assert claim_one(store).version == v2


# --- the log ---------------------------------------------------------------------------------


def test_log_append_and_read(store: StateStore):
    assert (store.last_pos(), store.trimmed_upto(), store.read(0)) == (0, 0, [])
    vec = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    entries: list[dict[str, Any]] = [
        {"op": "reload"},
        {"op": "upsert", "id": "a", "version": 3, "vec": vec},
        {"op": "delete", "id": "b", "version": 4},
    ]
    assert store.append(entries) == [1, 2, 3]
    rows = store.read(0)
    assert [p for p, _ in rows] == [1, 2, 3] and rows[0][1] == {"op": "reload"}
    assert rows[1][1]["vec"].dtype == np.float32
    assert rows[1][1]["vec"].tobytes() == vec.tobytes()  # bit for bit
    assert [p for p, _ in store.read(1, count=1)] == [2]
    assert store.read(3) == []
    assert store.append([{"op": "reload"}]) == [4] and store.last_pos() == 4


def test_trim_keeps_positions_growing(backend: Backend, store: StateStore):
    v = post(store, "a")
    assert store.append([{"op": "reload", "n": i} for i in range(5)]) == [1, 2, 3, 4, 5]
    store.trim(3)
    assert [p for p, _ in store.read(0)] == [4, 5]
    assert (store.trimmed_upto(), store.last_pos()) == (3, 5)
    store.trim(5)
    assert store.read(0) == []
    assert (store.trimmed_upto(), store.last_pos()) == (5, 5)
    store = backend.reopen(store)
    assert (store.trimmed_upto(), store.last_pos()) == (5, 5)
    assert store.append([{"op": "reload"}]) == [6]
    assert store.read(0) == [(6, {"op": "reload"})]
    assert post(store, "b") > v


@pytest.mark.parametrize("writer", ["append", "delete", "commit"])
def test_blocking_read_wakes_up_on_a_write_from_another_thread(store: StateStore, writer: str):
    v = post(store, "a")
    claim_one(store)
    got: list[tuple[float, list]] = []

    def read() -> None:
        rows = store.read(0, block_ms=5000)
        got.append((time.monotonic(), rows))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    assert not got, "read returned before anything was appended"
    written_at = time.monotonic()
    if writer == "append":
        store.append([{"op": "reload"}])
    elif writer == "delete":
        store.delete("a")
    else:
        assert store.commit([indexed("a", v)]) == [True]
    reader.join(5)
    [(woke_at, rows)] = got
    assert [p for p, _ in rows] == [1]
    assert woke_at - written_at < 1.0


def test_read_waits_up_to_block_ms(store: StateStore):
    t0 = time.monotonic()
    assert store.read(0) == []
    assert time.monotonic() - t0 < 0.2
    assert store.read(0, block_ms=300) == []
    assert 0.25 <= time.monotonic() - t0 < 2.0


# --- coordination ----------------------------------------------------------------------------


def test_lease_is_exclusive_and_expires(store: StateStore):
    assert store.lease("snapshot", "a", 0.5)
    assert not store.lease("snapshot", "b", 0.5)
    assert store.lease("snapshot", "a", 0.5)  # renewal
    store.unlease("snapshot", "b")  # not the owner: no effect
    assert not store.lease("snapshot", "b", 0.5)
    assert store.lease("other", "b", 0.5)  # names are independent
    time.sleep(0.8)
    assert store.lease("snapshot", "b", 30)
    assert not store.lease("snapshot", "a", 30)
    store.unlease("snapshot", "b")
    assert store.lease("snapshot", "a", 30)


def test_ping(store: StateStore):
    store.ping()


# --- SQLite only -----------------------------------------------------------------------------


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_sqlite_data_dir_is_locked_against_another_process(tmp_path: Path):
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from indexer.state.model import DataDirLocked\n"
        "from indexer.state.sqlite_store import SqliteStore\n"
        "try:\n    SqliteStore.open(Path(sys.argv[1])).close()\n"
        "except DataDirLocked as e:\n    print(e)\n    sys.exit(3)\n"
    )
    data = tmp_path / "data"
    store = SqliteStore.open(data)
    taken = run_python(code, str(data))
    assert taken.returncode == 3, taken.stderr
    assert str(data.resolve()) in taken.stdout and f"pid {os.getpid()}" in taken.stdout
    with pytest.raises(DataDirLocked):  # a second store in this process too
        SqliteStore.open(data)
    store.close()
    free = run_python(code, str(data))
    assert free.returncode == 0, free.stdout + free.stderr


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem: SQLite meets ENOSPC itself, no fake in between."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_sqlite_disk_full_raises_store_unavailable_and_recovers(tiny_fs: Path):
    store = SqliteStore.open(tiny_fs / "data")
    v1 = post(store, "a", photo=b"small")
    fill(tiny_fs / "filler")
    photo = os.urandom(64_000)
    with pytest.raises(StoreUnavailable, match="disk full"):
        post(store, "b", photo=photo)
    with pytest.raises(StoreUnavailable, match="disk full"):
        store.delete("a")
    # nothing half written
    assert store.statuses(["a", "b"]) == [{"status": "queued", "version": v1}, None]
    assert store.pending_count() == 1 and store.last_pos() == 0
    store.ping()  # reads still work
    (tiny_fs / "filler").unlink()
    v2 = post(store, "b", photo=photo)
    assert v2 > v1 and store.status("b") == {"status": "queued", "version": v2}
    assert store.photo(Event("b", v2, {}, has_photo=True)) == photo
    assert store.delete("a") > v2
    store.close()
    store = SqliteStore.open(tiny_fs / "data")
    assert store.pending_count() == 1
    store.close()


# one os.write per line: print() may be cut between its pieces by the kill
ACCEPT_FOREVER = """
import os, sys
from pathlib import Path
from indexer.state.sqlite_store import SqliteStore
store, run = SqliteStore.open(Path(sys.argv[1])), sys.argv[2]
for i in range(1_000_000):
    lid = f"{run}-{i}"
    v = store.accept({"id": lid}, lid.encode() * 2000)
    os.write(1, f"{lid} {v}\\n".encode())
"""


def test_sqlite_kill_9_during_accepts_leaves_a_consistent_store(tmp_path: Path):
    data, rng = tmp_path / "data", random.Random(7)
    acknowledged: dict[str, int] = {}
    unacknowledged = 0  # accepts that committed but were killed before they could say so
    for run in range(10):
        child = subprocess.Popen([sys.executable, "-c", ACCEPT_FOREVER, str(data), f"r{run}"],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        for _ in range(rng.randint(1, 40)):
            lid, ver = child.stdout.readline().split()
            acknowledged[lid] = int(ver)
        time.sleep(rng.random() * 0.005)  # land anywhere inside the next transaction
        child.kill()
        lines = child.stdout.read().split("\n")  # acknowledged before the kill landed
        acknowledged.update((lid, int(ver)) for lid, ver in (x.split() for x in lines if x))
        child.wait()
        child.stdout.close()

        with closing(sqlite3.connect(data / "state.sqlite3")) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        store = SqliteStore.open(data)
        lids = list(acknowledged)
        assert store.statuses(lids) == [
            {"status": "queued", "version": acknowledged[lid]} for lid in lids]
        this_run = [lid for lid in lids if lid.startswith(f"r{run}-")]
        for lid in this_run[-3:]:
            photo = store.photo(Event(lid, acknowledged[lid], {}, has_photo=True))
            assert photo == lid.encode() * 2000
        # an accept that committed but was never acknowledged still holds its version
        maybe = store.status(f"r{run}-{len(this_run)}")
        if maybe is not None:  # then all of it: status and pending event
            assert store.is_pending(f"r{run}-{len(this_run)}", maybe["version"]) is not None
            unacknowledged += 1
        assert store.pending_count() == len(acknowledged) + unacknowledged
        v = post(store, f"after-{run}")
        assert v > max(acknowledged.values()) and (maybe is None or v > maybe["version"])
        acknowledged[f"after-{run}"] = v
        store.close()


# --- thumbnails ------------------------------------------------------------------------------


def _thumb(lid: str, version: int, jpeg: bytes | None) -> Outcome:
    o = indexed(lid, version)
    return Outcome(o.id, o.version, o.status, o.entry,
                   None if jpeg is None else (f"tag-{jpeg.hex()}", jpeg))


def test_thumbnail_follows_the_listing_commit_repost_and_delete(backend: Backend,
                                                                store: StateStore):
    # binary bytes with a NUL and invalid UTF-8: Redis and SQLite must keep them bit for bit
    jpeg = b"\xff\xd8\x00\xfe-one"
    v1 = post(store, "a", photo=b"raw")
    claim_one(store)
    assert store.thumbnail("a") is None  # nothing until the outcome commits
    assert store.commit([_thumb("a", v1, jpeg)]) == [True]
    assert store.thumbnail("a") == (f"tag-{jpeg.hex()}", jpeg)
    assert store.thumbnail_tags(["a", "nope"]) == [f"tag-{jpeg.hex()}", None]
    store = backend.reopen(store)  # durable
    assert store.thumbnail("a") == (f"tag-{jpeg.hex()}", jpeg)
    # a late (superseded) outcome changes nothing, its thumbnail included
    v2 = post(store, "a")
    assert store.commit([_thumb("a", v1, b"stale")]) == [False]
    assert store.thumbnail("a") == (f"tag-{jpeg.hex()}", jpeg)
    # a failed re-post leaves the indexed version, and its photo, in place
    claim_one(store)
    failed = Outcome("a", v2, {"status": "failed", "version": v2, "error": "x"})
    assert store.commit([failed]) == [True]
    assert store.thumbnail("a") is not None
    # an indexed re-post without a photo removes the old one: it no longer shows the listing
    v3 = post(store, "a")
    claim_one(store)
    assert store.commit([_thumb("a", v3, None)]) == [True]
    assert store.thumbnail("a") is None
    v4 = post(store, "a", photo=b"raw")
    claim_one(store)
    assert store.commit([_thumb("a", v4, b"two")]) == [True]
    store.delete("a")
    assert store.thumbnail("a") is None and store.thumbnail_tags(["a"]) == [None]


def test_seeded_thumbnails_and_status_counts(store: StateStore):
    store.put_thumbnails([("c1", "t1", b"\x00one"), ("c2", "t2", b"two")])
    assert store.thumbnail("c2") == ("t2", b"two")
    assert store.thumbnail_tags(["c1", "c2", "c3"]) == ["t1", "t2", None]
    assert store.status_counts() == {}  # a seeded catalog's listings have no status
    v = post(store, "a")
    post(store, "b")
    post(store, "c")
    store.delete("c")
    claim = store.claim(10, 30, 5)
    assert {e.id for e in claim.events} == {"a", "b"}
    assert store.commit([indexed("a", v)]) == [True]
    assert store.status_counts() == {"indexed": 1, "queued": 1, "deleted": 1}


def test_status_ids_follow_every_status_write(store: StateStore):
    """status_ids/status_counts come from an index kept by the writes themselves: each
    transition (post, claim, commit, give up, re-post, delete, relabel) moves the id."""

    def ids(status: str) -> list[str]:
        return [lid for lid, _ in store.status_ids(status, 0, 10)[1]]

    va = post(store, "a")
    post(store, "b")
    post(store, "c")
    total, page = store.status_ids("queued", 0, 10)
    assert (total, [lid for lid, _ in page]) == (3, ["a", "b", "c"])  # oldest version first
    assert store.status_ids("queued", 1, 1) == (3, [page[1]])
    assert store.status_ids("queued", 0, 10, after=page[0][1]) == (3, page[1:])  # a cursor
    claim = store.claim(10, 30, 1)
    assert store.commit([indexed("a", va)]) == [True]
    store.release([e for e in claim.events if e.id == "b"])
    given_up = store.claim(10, 30, 1).given_up  # b's one attempt is spent: it fails
    assert [o.id for o in given_up] == ["b"]
    store.delete("c")
    assert ids("indexed") == ["a"] and ids("failed") == ["b"]
    assert ids("queued") == []
    assert store.status_counts() == {"indexed": 1, "failed": 1, "deleted": 1}
    vb2 = post(store, "b")  # a re-post leaves failed for queued
    assert ids("failed") == [] and ids("queued") == ["b"]
    v = store.relabel("a", va, {"status": "indexed", "category": "Watches"},
                      {"op": "label", "id": "a", "label": {"category": "Watches"}})
    assert v > vb2 and ids("indexed") == ["a"]
    assert ids("nonsense") == []


# --- the review queue and an operator's relabel ----------------------------------------------


def _reviewed(lid: str, version: int, *reasons: str) -> Outcome:
    o = indexed(lid, version)
    if reasons:
        o.status["review"] = list(reasons)
    return o


def test_review_queue_follows_every_status_write(backend: Backend, store: StateStore):
    va, vb, vc, vd = (post(store, x) for x in "abcd")
    assert len(store.claim(10, 30, 5).events) == 4
    assert store.commit([_reviewed("a", va, "mislabel"),
                         _reviewed("b", vb, "uncertain", "duplicate"),
                         _reviewed("c", vc), _reviewed("d", vd, "unknown_category")]) == [True] * 4
    assert store.review_queue(None, 0, 10) == (3, ["a", "b", "d"])  # oldest version first
    assert store.review_queue("duplicate", 0, 10) == (1, ["b"])
    assert store.review_queue("mislabel", 0, 10) == (1, ["a"])
    assert store.review_queue(None, 1, 1) == (3, ["b"])  # paged
    assert store.review_queue(None, 5, 10) == (3, [])
    store = backend.reopen(store)  # durable, like the statuses it follows
    assert store.review_queue(None, 0, 10) == (3, ["a", "b", "d"])
    # a re-post leaves the queue (queued), a delete too; a failed outcome never enters it
    post(store, "b")
    store.delete("a")
    assert store.review_queue(None, 0, 10) == (1, ["d"])
    assert store.review_queue("duplicate", 0, 10) == (0, [])
    [e] = store.claim(10, 30, 5).events
    failed = {"status": "failed", "version": e.version, "error": "x", "review": ["uncertain"]}
    assert store.commit([Outcome("b", e.version, failed)]) == [True]
    assert store.review_queue(None, 0, 10) == (1, ["d"])


def test_corrections_outlive_a_repost_and_go_with_a_delete(store: StateStore):
    v = post(store, "a")
    store.claim(10, 30, 5)
    assert store.commit([indexed("a", v)]) == [True]
    one = {"by": "ana", "category_path": ["Watches"]}
    store.relabel("a", v, {"status": "indexed", "category": "Watches"},
                  {"op": "label", "id": "a", "label": {"category": "Watches"}}, [one])
    assert store.corrections("a") == [one] and store.corrections("b") == []
    from indexer.errors import VersionConflict

    with pytest.raises(VersionConflict):  # a refused write changes no history either
        store.relabel("a", v, {"status": "indexed"}, {"op": "label", "id": "a", "label": {}},
                      [one, one])
    post(store, "a")  # a re-post: a new version, voted again, the history kept
    assert store.corrections("a") == [one]
    store.delete("a")
    assert store.corrections("a") == []


def test_relabel_is_conditional_on_the_version_the_operator_saw(store: StateStore):
    from indexer.errors import VersionConflict

    v = post(store, "a")
    claim_one(store)
    assert store.commit([_reviewed("a", v, "mislabel")]) == [True]
    before = store.last_pos()
    label = {"op": "label", "id": "a", "label": {"category": "Kitchen", "source": "confirmed",
                                                 "category_path": ["Kitchen", "Cookware"]}}
    status = {"status": "indexed", "category": "Kitchen", "source": "confirmed"}
    with pytest.raises(VersionConflict) as stale:
        store.relabel("a", v - 1, status, label)
    assert stale.value.current == v
    assert store.last_pos() == before and store.review_queue(None, 0, 10) == (1, ["a"])
    v2 = store.relabel("a", v, status, label)
    assert v2 > v
    assert store.status("a") == {**status, "version": v2}
    [(pos, entry)] = store.read(before)
    assert pos == before + 1 and entry == {**label, "version": v2}
    assert store.review_queue(None, 0, 10) == (0, [])  # decided: out of the queue
    # the same decision sent twice (a double click): the second saw an older version
    with pytest.raises(VersionConflict):
        store.relabel("a", v, status, label)
    # the log entry is about the listing whose version was checked, whatever it said
    end = store.last_pos()
    v3 = store.relabel("a", v2, status, {**label, "id": "someone-else"})
    [(_, entry)] = store.read(end)
    assert entry == {**label, "id": "a", "version": v3}
    # a re-post is being indexed: no relabel of the version it replaces, nor of its own
    v3 = post(store, "a")
    for expected in (v2, v3):
        with pytest.raises(VersionConflict, match="queued"):
            store.relabel("a", expected, status, label)
    # a listing of the seeded catalog has no status: version 0, once
    v4 = store.relabel("cat-1", 0, status, {**label, "id": "cat-1"})
    assert v4 > v3 and store.status("cat-1") == {**status, "version": v4}
    with pytest.raises(VersionConflict):
        store.relabel("cat-1", 0, status, {**label, "id": "cat-1"})
    store.delete("cat-1")
    with pytest.raises(VersionConflict, match="deleted"):
        store.relabel("cat-1", store.status("cat-1")["version"], status, label)  # type: ignore[index]


def test_concurrent_relabels_of_one_version_commit_once(backend: Backend, store: StateStore):
    from indexer.errors import VersionConflict

    v = post(store, "a")
    claim_one(store)
    assert store.commit([_reviewed("a", v, "uncertain")]) == [True]
    stores = [store] if isinstance(store, SqliteStore) else [backend.open() for _ in range(8)]
    won: list[int] = []
    lost: list[int | None] = []
    go = threading.Barrier(8)

    def decide(i: int) -> None:
        s = stores[i % len(stores)]
        go.wait()
        try:
            won.append(s.relabel("a", v, {"status": "indexed", "category": f"C{i}"},
                                 {"op": "label", "id": "a", "label": {"category": f"C{i}"}}))
        except VersionConflict as e:
            lost.append(e.current)

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7, (won, lost)
    # exactly one decision is the listing's: its status and one log entry say the same
    st = store.status("a")
    assert st is not None and st["version"] == won[0]
    labels = [e for _, e in store.read(0) if e["op"] == "label"]
    assert len(labels) == 1 and labels[0]["label"]["category"] == st["category"]
