"""What only the Redis store promises: AOF durability across a kill -9 of Redis, a fast and
redacted failure when Redis is unreachable, and commits atomic against concurrent re-posts.
The contract shared with SQLite is tested in test_state_store.py."""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from indexer.state.model import Event, Outcome, StoreUnavailable
from indexer.state.redis_store import RedisStore
from tests.support.aof_redis import AofRedis
from tests.support.service import free_port

pytestmark = pytest.mark.slow
REDIS_URL = "redis://127.0.0.1:6379/0"


def wait_up(store: RedisStore, within_s: float = 15.0) -> None:
    """Until ``store`` answers: StoreUnavailable while Redis restarts or loads its AOF."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            store.ping()
            return
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path)
    server.start()
    yield server
    server.kill9()


@pytest.fixture
def store() -> Iterator[RedisStore]:
    prefix = f"vitrine-test-{uuid.uuid4().hex[:12]}"
    s = RedisStore.connect(REDIS_URL, prefix)
    yield s
    s.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def indexed(lid: str, version: int) -> Outcome:
    return Outcome(lid, version, {"status": "indexed", "version": version},
                   {"op": "upsert", "id": lid, "version": version,
                    "vec": np.full(4, version, np.float32)})


def test_aof_restart_after_kill_9_loses_nothing_acknowledged(aof_redis: AofRedis):
    store = RedisStore.connect(aof_redis.url, "aof", timeout=1.0)
    wait_up(store)
    rng = random.Random(5)
    posted: dict[str, tuple[int, dict, bytes | None]] = {}  # id -> latest post
    for i in range(200):
        lid = f"l{rng.randrange(160)}"  # some ids are re-posted
        payload = {"id": lid, "title": f"post {i}", "price": 0.1 + i}
        photo = f"photo {i}".encode() if i % 3 else None
        posted[lid] = (store.accept(payload, photo), payload, photo)
    deleted = {lid: store.delete(lid) for lid in rng.sample(sorted(posted), 20)}
    queued = {lid: p for lid, p in posted.items() if lid not in deleted}
    log = [(i + 1, {"op": "delete", "id": lid, "version": v})
           for i, (lid, v) in enumerate(deleted.items())]
    assert store.read(0) == log

    aof_redis.kill9()
    with pytest.raises(StoreUnavailable):
        store.ping()
    aof_redis.start()
    wait_up(store)  # the same store reconnects by itself

    lids = sorted(posted)
    assert store.statuses(lids) == [
        {"status": "deleted", "version": deleted[lid]} if lid in deleted
        else {"status": "queued", "version": queued[lid][0]} for lid in lids]
    assert store.read(0) == log and store.last_pos() == len(log)
    assert store.pending_count() == len(queued)
    claimed = store.claim(1000, 30, 5)
    assert not claimed.given_up
    assert {e.id: (e.version, e.payload, e.has_photo) for e in claimed.events} == {
        lid: (v, payload, photo is not None) for lid, (v, payload, photo) in queued.items()}
    for e in claimed.events:
        assert store.photo(e) == queued[e.id][2]
    for lid in deleted:  # a deleted listing's photo went with its event
        assert store.photo(Event(lid, posted[lid][0], {}, has_photo=True)) is None
    every = [v for v, _, _ in posted.values()] + list(deleted.values())
    assert store.accept({"id": "after"}, None) > max(every)
    assert store.append([{"op": "reload"}]) == [len(log) + 1]
    store.close()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops new SYNs, so a connect hangs."""
    with socket.socket() as srv, socket.socket() as filler:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        filler.connect(srv.getsockname())
        yield int(srv.getsockname()[1])


@pytest.mark.parametrize("url", [
    "redis://:s3cret@127.0.0.1:{closed}/0",  # refused at once
    "redis://admin:s3cret@127.0.0.1:{blackhole}/0",  # the connect times out
    "redis://127.0.0.1:{blackhole}/0?password=s3cret&db=0",
])
def test_unreachable_redis_fails_fast_with_the_password_redacted(url: str, blackhole: int):
    url, timeout = url.format(closed=free_port(), blackhole=blackhole), 0.5
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        RedisStore.connect(url, "x", timeout=timeout)
    assert time.monotonic() - t0 < timeout + 1
    assert url.replace("s3cret", "***") in str(caught.value)
    assert "s3cret" not in str(caught.value.__cause__)


def test_commit_is_atomic_against_a_concurrent_repost(store: RedisStore):
    """A poster alternates re-post and delete of one id while a committer commits the latest
    version it saw. Deletes are logged, so the log orders every write but the posts: a commit
    that landed after a newer write would put its upsert after a higher version."""
    rounds, lid = 1500, "a"
    seen: list[int] = []
    done = threading.Event()
    committed: list[tuple[int, bool]] = []

    def poster() -> None:
        rng = random.Random(1)
        for _ in range(rounds):
            seen.append(store.accept({"id": lid}, b"photo"))
            if rng.random() < 0.5:
                time.sleep(0.0002)  # leave the committer a window now and then
            store.delete(lid)
        done.set()

    def committer() -> None:
        while not done.is_set():
            if seen:
                v = seen[-1]
                committed.append((v, store.commit([indexed(lid, v)])[0]))

    threads = [threading.Thread(target=poster), threading.Thread(target=committer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    wins = sorted(v for v, ok in committed if ok)
    assert wins and len(wins) < len(committed), "the race never went both ways"
    log = [e for _, e in store.read(0, count=10 * rounds)]
    upserts = [e["version"] for e in log if e["op"] == "upsert"]
    assert sorted(upserts) == wins  # one upsert per successful commit, none twice
    versions = [e["version"] for e in log]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert len(log) == rounds + len(wins)
    assert store.status(lid) == {"status": "deleted", "version": versions[-1]}
    assert store.pending_count() == 0


def test_connect_upgrades_the_first_key_layout(store: RedisStore):
    """Keys written by a vitrine of layout 1 (statuses without per-status indexes, a pending
    photo under a key of its own) are brought to this layout when a process connects: the
    photo of a pending event is still there for its worker, the statuses are paged."""
    client = redis.Redis.from_url(REDIS_URL)
    p = store._p
    try:
        v = store.accept({"id": "a", "title": "a"}, b"photo of a")
        store.accept({"id": "b", "title": "b"}, None)
        # back to layout 1: the photo under its own key, no per-status index, no schema
        client.hdel(f"{p}:photos", f"a:{v}")
        client.set(f"{p}:photo:a:{v}", b"photo of a")
        client.delete(f"{p}:bystatus:queued", f"{p}:schema")
        client.set(f"{p}:photo:gone:7", b"photo of an event that ended")
        upgraded = RedisStore.connect(REDIS_URL, p)
        try:
            total, page = upgraded.status_ids("queued", 0, 10)
            assert (total, [lid for lid, _ in page]) == (2, ["a", "b"])
            e = next(x for x in upgraded.claim(10, 30, 5).events if x.id == "a")
            assert upgraded.photo(e) == b"photo of a"
            assert not list(client.scan_iter(match=f"{p}:photo:*"))
            assert client.hkeys(f"{p}:photos") == [f"a:{v}".encode()]  # no orphan moved
            assert client.get(f"{p}:schema") == b"2"
        finally:
            upgraded.close()
    finally:
        client.close()
