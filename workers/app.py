"""The Celery app: batched ingestion tasks on Redis, one :class:`~services.runtime.Runtime` each.

Models and the index replica are loaded in ``worker_process_init`` (once per prefork child,
after the fork: threads and torch pools do not survive a fork), and torch gets
``cores // concurrency`` threads so that N children don't oversubscribe the CPU.

**Batching.** Every accepted listing is one ``vitrine.ingest`` message (``acks_late``,
``reject_on_worker_lost``). A task, when it starts, *claims* up to
``VITRINE_WORKER_BATCH - 1`` more ingestion messages straight from the same queue
(:class:`Claimer`, kombu's ``basic_get`` with acknowledgement: a claimed message sits in
kombu's ``unacked`` set, exactly like the message Celery gave the task) and indexes them
together (:func:`services.runtime.ingest_many`: one embedding call, the encoders running in
batches of ``VITRINE_BATCH_SIZE``, one pipelined log append, one status write). The claimed
messages are acknowledged only after their listings are indexed (or failed for good), so a
``kill -9`` anywhere in the batch leaves every one of them unacknowledged and Redis
redelivers them after ``VITRINE_VISIBILITY_TIMEOUT``; events are idempotent by (id, version),
so a redelivery never duplicates a listing. A task claims a fair share (the queue depth split
between this worker's processes), so a short burst is spread over every process rather than
piled on one.

**Sweep.** kombu pops a message and records it as unacknowledged in two steps; a process
killed between the two loses the message. Every accepted event is therefore also in the
ledger (:class:`services.runtime.Ledger`) until its outcome is final, and one worker process
at a time (a Redis lock) sweeps it every ``visibility_timeout / 2`` seconds (at most 30):
when the queue is empty, an event pending for longer than the visibility timeout that no
unacknowledged message carries is sent again (:func:`sweep`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from indexer.settings import Settings, get_settings

log = logging.getLogger(__name__)
TASK = "vitrine.ingest"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (used by the API to enqueue, and by ``vitrine worker``)."""
    app = Celery("vitrine", broker=settings.broker_url, backend=None, set_as_current=False)
    vt = settings.visibility_timeout
    app.conf.update(
        task_default_queue=queue_name(settings),
        # a worker killed mid-task must not lose its event: ack after the work is done,
        # requeue when the child process dies, and redeliver what a dead host held after a
        # deliberate visibility timeout. Tasks are idempotent, so a redelivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": vt,
            "global_keyprefix": f"{settings.redis_prefix}:kombu:",
            "socket_connect_timeout": settings.broker_timeout,
            # look for messages a dead worker held every vt/4 (at most every 10 s), so that
            # they come back about one visibility timeout after the death, not minutes later
            "unacked_restore_interval": max(1.0, min(10.0, vt / 4)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
    )
    app.conf.state = {}
    register_tasks(app)
    return app


def queue_name(settings: Settings) -> str:
    return f"{settings.redis_prefix}.ingest"


def register_tasks(app: Celery) -> None:
    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True)
    def ingest_task(payload: dict[str, Any]) -> dict[str, Any]:
        return ingest_batch(app, payload)


def ingest_batch(app: Celery, payload: dict[str, Any]) -> dict[str, Any]:
    """Index ``payload`` together with the ingestion messages claimed from the queue."""
    from services.runtime import ingest_many, is_broker_error

    rt = runtime(app)
    state = app.conf.state
    if "claimer" not in state:
        state["claimer"] = Claimer(app, rt.settings)
    claimer: Claimer = state["claimer"]
    claimed = claimer.claim(claimer.share(rt.settings.worker_batch, rt.queue_depth) - 1)
    items: list[tuple[dict[str, Any], bytes | None]] = [(payload, None)]
    items += [(p, None) for _, p in claimed]
    t0 = time.perf_counter()
    try:
        results = ingest_many(rt, items)
    except Exception as e:
        # give the claimed events back now rather than after the visibility timeout
        claimer.release(claimed)
        if is_broker_error(e):
            # never ack an event whose listing was not indexed: back to the queue (or, if
            # Redis is gone, redelivered after the visibility timeout)
            time.sleep(1)
            raise Reject(f"broker error while indexing: {e}", requeue=True) from e
        raise
    claimer.ack(claimed)
    log.info("indexed a batch of %d events (%d claimed) in %.2f s", len(items), len(claimed),
             time.perf_counter() - t0)
    first = results[0]
    return {"id": payload["id"], "status": first.get("status"), "batch": len(items)}


class Claimer:
    """Takes more ingestion messages from the task queue, with acknowledgement (kombu).

    ``basic_get(no_ack=False)`` moves a message into kombu's ``unacked`` set (with its
    delivery time) just as Celery's own consumer does, so a claimed message that is never
    acknowledged (the process died) is put back in the queue by any worker after the
    visibility timeout. One connection per process, opened on first use (after the fork).
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.queue = queue_name(settings)
        self.concurrency = max(1, settings.worker_concurrency)
        self._conn: Any = None
        self._channel: Any = None

    def _chan(self) -> Any:
        if self._channel is None:
            self._conn = self.app.connection_for_read()
            self._channel = self._conn.default_channel
        return self._channel

    def _reset(self) -> None:
        try:
            if self._conn is not None:
                self._conn.release()
        except Exception:  # already broken
            pass
        self._conn = self._channel = None

    def share(self, batch_size: int, depth: Any) -> int:
        """How many events this task takes: its fair share of the queue, up to a batch."""
        if batch_size <= 1:
            return 1
        try:
            waiting = int(depth())
        except Exception:  # the claim below reports a broken broker
            waiting = batch_size
        return max(1, min(batch_size, math.ceil((waiting + 1) / self.concurrency)))

    def claim(self, n: int) -> list[tuple[Any, dict[str, Any]]]:
        out: list[tuple[Any, dict[str, Any]]] = []
        while len(out) < n:
            try:
                message = self._chan().basic_get(self.queue, no_ack=False)
            except Exception:  # claiming is an optimisation: go on with what we have
                log.warning("could not claim more events from %s", self.queue, exc_info=True)
                self._reset()
                break
            if message is None:
                break
            payload = _ingest_payload(message)
            if payload is None:  # not an ingestion event: leave it to Celery
                self.release([(message, {})])
                break
            out.append((message, payload))
        return out

    def ack(self, claimed: list[tuple[Any, dict[str, Any]]]) -> None:
        for message, _ in claimed:
            try:
                message.ack()
            except Exception:  # redelivered after the visibility timeout, then skipped
                log.warning("could not acknowledge a claimed event", exc_info=True)

    def release(self, claimed: list[tuple[Any, dict[str, Any]]]) -> None:
        for message, _ in claimed:
            try:
                message.reject(requeue=True)
            except Exception:  # still in the unacked set: redelivered after the timeout
                log.warning("could not requeue a claimed event", exc_info=True)


def _ingest_payload(message: Any) -> dict[str, Any] | None:
    """The payload of a ``vitrine.ingest`` message (Celery protocol 2), else None."""
    try:
        if (message.headers or {}).get("task") != TASK:
            return None
        args = message.decode()[0]
        payload = args[0]
        return payload if isinstance(payload, dict) and "id" in payload else None
    except Exception:
        return None


def sweep(app: Celery, rt: Any) -> int:
    """Re-send ledger events that no queue holds any more; returns how many were re-sent."""
    s = rt.settings
    ledger = rt.ledger
    if ledger is None or rt.queue_depth() > 0:
        return 0  # messages are still flowing: what is pending may just be waiting its turn
    overdue = ledger.overdue(older_than=s.visibility_timeout)
    if not overdue:
        return 0
    in_flight = _unacked_versions(rt)
    current = rt.status.get_many([p["id"] for p in overdue])
    final, resend = [], []
    for payload, st in zip(overdue, current, strict=True):
        v = payload["version"]
        if st is None or st.get("version") != v or st.get("status") != "queued":
            final.append(v)  # its outcome is known (or it was superseded or deleted)
        elif v not in in_flight:
            resend.append(payload)
    ledger.done(final)
    for payload in resend:
        rt.celery.send_task(TASK, args=[payload], queue=queue_name(s))
    ledger.touch([p["version"] for p in resend])
    if resend:
        log.warning("re-sent %d accepted events that were in no queue (a worker died while "
                    "taking them): %s", len(resend), ", ".join(p["id"] for p in resend[:10]))
    return len(resend)


def _unacked_versions(rt: Any) -> set[str]:
    """Versions carried by the messages kombu holds as unacknowledged (in flight)."""
    import base64
    import json

    out: set[str] = set()
    for raw in rt.redis.hvals(f"{rt.prefix}:kombu:unacked"):
        try:
            message = json.loads(raw)[0]
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            out.add(json.loads(body)[0][0]["version"])
        except Exception:  # not an ingestion message
            continue
    return out


def _sweeper(app: Celery, rt: Any) -> None:
    import threading

    s = rt.settings
    every = max(1.0, min(30.0, s.visibility_timeout / 2))

    def loop() -> None:
        while True:
            time.sleep(every)
            try:
                # one sweeping process at a time, across every worker
                if rt.redis.set(f"{rt.prefix}:sweep-lock", os.getpid(), nx=True,
                                px=int(every * 900)):
                    sweep(app, rt)
            except Exception:  # a Redis blip: next time
                log.warning("the ledger sweep failed", exc_info=True)

    threading.Thread(target=loop, name="ledger-sweep", daemon=True).start()


def runtime(app: Celery) -> Any:
    """This process's runtime, built on first use (normally at ``worker_process_init``)."""
    state = app.conf.state
    if "runtime" not in state:
        from indexer.encoders.base import configure_torch
        from indexer.index import configure_faiss
        from services.runtime import Runtime

        settings: Settings = state["settings"]
        cores = os.cpu_count() or 1
        threads = settings.torch_threads or max(1, cores // settings.worker_concurrency)
        configure_torch(threads)
        configure_faiss(threads)
        # the registry sets torch threads again when it loads a model: give it the same count
        rt = Runtime(settings.model_copy(update={"torch_threads": threads}))
        rt.celery = app  # the sweep re-sends events through it
        rt.start(consume_inbox=False)
        _warm_up(rt)
        if rt.ledger is not None:
            _sweeper(app, rt)
        state["runtime"] = rt
    return state["runtime"]


def _warm_up(rt: Any) -> None:
    """One tiny forward pass per encoder, so that the first real batch is not the slow one."""
    import io

    from PIL import Image

    from indexer.catalog import Listing

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, "PNG")
    try:
        rt.replica.v.embed([Listing(id="warm-up", title="warm up", image=buf.getvalue())])
    except Exception:  # never fatal: the real batch reports real problems
        log.warning("encoder warm-up failed", exc_info=True)


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = make_celery(settings)
    app.conf.state["settings"] = settings

    @signals.worker_process_init.connect(weak=False)
    def _init(**_: Any) -> None:
        runtime(app)

    @signals.worker_process_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        rt = app.conf.state.get("runtime")
        if rt is not None:
            rt.stop()

    return app
