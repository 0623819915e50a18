"""Batching in a real ``vitrine worker``: events waiting in the queue are indexed together.

The events are queued first and the worker started afterwards, so that its first task finds
them all waiting and claims them into one batch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from services.runtime import Runtime, new_version
from tests.services.helpers import png, wait_until
from workers.app import make_celery

from .helpers import REDIS, Worker

pytestmark = pytest.mark.slow
# a batch is never redelivered while it runs, however slow the shared machine is
SLOW_OK = {"VITRINE_VISIBILITY_TIMEOUT": "120"}


@pytest.fixture(scope="module")
def rt(prefix, data_dir, settings, registry) -> Iterator[Runtime]:  # type: ignore[no-untyped-def]
    """The API's side of the queue (enqueue, statuses, a replica), without HTTP."""
    s = settings.model_copy(update={"data_dir": data_dir, "broker_url": REDIS,
                                    "redis_prefix": prefix, "visibility_timeout": 30})
    runtime = Runtime(s, registry)
    runtime.celery = make_celery(s)
    runtime.start()
    yield runtime
    runtime.stop()


def _enqueue(rt: Runtime, lid: str, title: str, image: bytes | None = None) -> dict[str, Any]:
    payload = {"id": lid, "title": title, "description": "", "category": None,
               "image_url": None, "version": new_version()}
    rt.enqueue(payload, image)
    return payload


def _upserts(rt: Runtime) -> Counter[str]:
    """How many upserts of each id the log holds."""
    entries = rt.redis.xrange(f"{rt.prefix}:log")
    return Counter(e["id"] for _, f in entries
                   if (e := json.loads(f[b"e"]))["op"] == "upsert")


def test_waiting_events_are_indexed_as_one_batch(rt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = redis.Redis.from_url(REDIS)
    good = [_enqueue(rt, f"b-{i}", f"Cotton printed double bed sheet, design {i}")
            for i in range(6)]
    good.append(_enqueue(rt, "b-photo", "Analog wrist watch for men", png()))
    # a duplicated delivery of an event, inside the same batch
    rt.celery.send_task("vitrine.ingest", args=[good[0]], queue=rt.queue_name)
    # a photo that cannot be decoded: with a title the listing is indexed from its text, with
    # no text at all it fails; either way, only that listing is affected
    _enqueue(rt, "b-badphoto-text", "Baby feeding bottle, 250 ml", b"\x89PNG not really")
    _enqueue(rt, "b-badphoto-only", "", b"\xff\xd8\xff truncated jpeg")
    assert rt.queue_depth() == 10

    worker = Worker(rt.prefix, rt.settings.data_dir, tmp_path / "worker.log", **SLOW_OK)
    try:
        ids = [p["id"] for p in good] + ["b-badphoto-text", "b-badphoto-only"]
        wait_until(lambda: all((rt.status.get(x) or {}).get("status") in ("indexed", "failed")
                               for x in ids), 120, every=0.05)
        st = {x: rt.status.get(x) for x in ids}
        # one batch: every indexed listing carries the same batch id
        indexed = [x for x in ids if st[x]["status"] == "indexed"]
        assert set(indexed) == set(ids) - {"b-badphoto-only"}
        assert len({st[x]["batch"] for x in indexed}) == 1, st
        assert st["b-0"]["batch_size"] == len(indexed) + 1  # the failed one was embedded too
        # the bad photo failed only its own listing
        bad = st["b-badphoto-only"]
        assert bad["status"] == "failed" and "photo" in bad["error"], bad
        assert "photo" in st["b-badphoto-text"].get("warning", "")
        assert st["b-photo"]["category"] == "Watches" and "warning" not in st["b-photo"]
        # the duplicated event was indexed once: one upsert in the log, one vector everywhere
        wait_until(lambda: set(indexed) <= set(rt.replica.v.index.ids()), 5)
        ups = _upserts(rt)
        assert all(ups[x] == 1 for x in indexed), ups
        assert "b-badphoto-only" not in ups
        ids_now = rt.replica.v.index.ids()
        assert len(ids_now) == len(set(ids_now))
        # every event (own, claimed and duplicate) was acknowledged: nothing to redeliver
        wait_until(lambda: rt.queue_depth() == 0
                   and r.hlen(f"{rt.prefix}:kombu:unacked") == 0, 30, every=0.1)
        assert len(rt.ledger) == 0  # every event has its final outcome
        log = (tmp_path / "worker.log").read_text()
        assert "indexed a batch of 10 events (9 claimed)" in log, log[-3000:]
    finally:
        worker.stop()


def test_a_burst_is_shared_between_processes(rt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two processes: each task takes its fair share of the waiting events, not all of them."""
    ids = [f"s-{i}" for i in range(8)]
    for lid in ids:
        _enqueue(rt, lid, f"Stainless steel water bottle {lid}")
    worker = Worker(rt.prefix, rt.settings.data_dir, tmp_path / "worker.log", concurrency=2,
                    **SLOW_OK)
    try:
        wait_until(lambda: all((rt.status.get(x) or {}).get("status") == "indexed"
                               for x in ids), 120, every=0.05)
        sizes = [rt.status.get(x)["batch_size"] for x in ids]
        assert max(sizes) < len(ids), sizes  # not everything in one process' batch
        assert max(sizes) > 1, sizes  # but batched
        ups = _upserts(rt)
        assert all(ups[x] == 1 for x in ids), ups
    finally:
        worker.stop()


def test_an_event_whose_message_was_lost_is_sent_again(rt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kombu pops a message and records it as unacknowledged in two steps: a worker killed in
    between loses the message. The ledger sweep finds the accepted event and sends it again."""
    r = redis.Redis.from_url(REDIS)
    _enqueue(rt, "lost-1", "Ceramic coffee mug with lid")
    # the message vanishes, as it would in that instant: popped, never recorded
    assert r.rpop(f"{rt.prefix}:kombu:{rt.queue_name}") is not None
    assert rt.queue_depth() == 0 and len(rt.ledger) == 1
    worker = Worker(rt.prefix, rt.settings.data_dir, tmp_path / "worker.log",
                    VITRINE_VISIBILITY_TIMEOUT="4")
    try:
        wait_until(lambda: (rt.status.get("lost-1") or {}).get("status") == "indexed", 120,
                   every=0.1)
        assert len(rt.ledger) == 0  # done with: nothing left to sweep
        assert "re-sent 1 accepted events" in (tmp_path / "worker.log").read_text()
    finally:
        worker.stop()
