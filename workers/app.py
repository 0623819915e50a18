"""The Celery app: ingestion tasks on Redis, a thin caller of :class:`indexer.ingest.Ingestor`.

**The store is the queue of record, the Celery message a wake-up.** ``POST /listings``
records the listing as a pending event in the state store (Redis) and then wakes the workers
with a ``vitrine.ingest`` message (coalesced: services/queue.py). The task drains: it runs
ingest rounds (claim a batch of pending events, oldest first, embed, vote, commit) until
nothing is claimable. So:

* **batching** needs nothing from the transport: a round claims from the store, a fair
  share of what is pending (so a burst spreads over every process);
* **kill -9** anywhere loses nothing: a claimed event is leased; if its worker dies the lease
  expires (``VITRINE_LEASE_SECONDS``) and the next round anywhere claims it again. The task's
  own message is ``acks_late`` + ``reject_on_worker_lost``, so it comes back too;
* **a message that is lost** (kombu's Redis transport pops a message and records it as
  unacknowledged in two steps; an API process can die between accept and send) loses
  nothing either: every worker process sweeps every ``min(lease_seconds / 2, 5)`` seconds
  (one at a time, a store lease) and sends a wake-up while events are pending. The sweep is
  also what picks up the listings of a round that died, once their lease has expired;
* **attempts are counted** by the claim: a listing whose rounds raise, or that kills its
  worker, ``VITRINE_MAX_ATTEMPTS`` times ends ``failed`` with the reason, never looping;
* **duplicates are harmless**: an outcome commits only if its version is still the latest.

Models load in a background thread started by ``worker_process_init``: the child answers
Celery at once however long the models take (Celery kills a child that is not up within
``worker_proc_alive_timeout``, 4 s by default); tasks wait for the load, within their time
limit.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

from celery import Celery, signals
from celery.exceptions import SoftTimeLimitExceeded

from indexer.runtime import INGEST_TASK, Runtime, celery_conf, queue_name
from indexer.settings import Settings, get_settings
from indexer.state import StoreUnavailable

log = logging.getLogger(__name__)
SWEEP_LEASE = "sweep"
MAX_ROUNDS = 20  # per task; then the task re-queues itself rather than hold the process


def make_celery(settings: Settings) -> Celery:
    app = Celery("vitrine", broker=settings.broker_url, backend=None, set_as_current=False)
    app.conf.update(
        celery_conf(settings),
        # the message is a wake-up, but still: ack after the work, requeue if the child dies
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=0.9 * settings.task_time_limit,
    )
    app.conf.vitrine = _Process(settings)
    register_tasks(app)
    return app


class _Process:
    """This worker process's runtime, built in a background thread after the fork."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ready = threading.Event()
        self.runtime: Runtime | None = None
        self.error: BaseException | None = None
        self._started = threading.Lock()

    def start(self) -> None:
        """Load in a thread, once (prefork: at ``worker_process_init``; other pools: on the
        first task)."""
        if self._started.acquire(blocking=False):
            threading.Thread(target=self._load, name="load-runtime", daemon=True).start()

    def _load(self) -> None:
        try:
            from indexer.encoders.base import configure_torch
            from indexer.index import configure_faiss

            s = self.settings
            threads = s.torch_threads or max(1, (os.cpu_count() or 1) // s.worker_concurrency)
            configure_torch(threads)
            configure_faiss(threads)
            rt = Runtime(s.model_copy(update={"torch_threads": threads}))
            rt.start(consume=False)
            self.runtime = rt
        except BaseException as e:
            self.error = e
            log.exception("the worker runtime could not start; this process exits")
            # a child that cannot ingest must not take tasks: Celery replaces it, and the
            # next one tries again (a broker blip at start-up) or fails as loudly
            os._exit(1)
        finally:
            self.ready.set()

    def get(self) -> Runtime:
        self.start()
        self.ready.wait()
        if self.runtime is None:
            raise RuntimeError(f"the worker runtime could not start: {self.error}")
        return self.runtime


def register_tasks(app: Celery) -> None:
    @app.task(name=INGEST_TASK, bind=True, acks_late=True, reject_on_worker_lost=True,
              max_retries=None)
    def ingest(self: Any) -> str:
        """Ingest rounds until nothing is claimable (then the next message may come in)."""
        rt = app.conf.vitrine.get()
        s = rt.settings
        try:
            for _ in range(MAX_ROUNDS):
                share = fair_share(s.worker_batch, rt.store.pending_count(),
                                   s.worker_concurrency)
                # the soft time limit is the task's, not the listings': they go back untried
                r = rt.ingestor.run(share, interrupts=(SoftTimeLimitExceeded,))
                if not r.claimed and not r.committed:
                    return "drained"
                log.info("indexed %d of %d claimed listings", len(r.committed), r.claimed)
        except StoreUnavailable as e:
            # the leases expire and the listings come back by themselves; look again later
            # (Celery's own countdown, not a requeue loop)
            raise self.retry(exc=e, countdown=5) from e
        raise self.retry(countdown=0)  # more to do: let the other messages in between


def fair_share(batch: int, pending: int, processes: int) -> int:
    """A round's size: a fair share of what is pending, so a burst spreads over processes."""
    return max(1, min(batch, math.ceil(pending / max(1, processes))))


def _sweeper(app: Celery) -> None:
    """Send a drain wake-up while events are pending, whatever happened to their messages."""
    proc: _Process = app.conf.vitrine
    # bounds how long a listing whose round died waits after its lease expired
    every = max(1.0, min(5.0, proc.settings.lease_seconds / 2))

    def loop() -> None:
        proc.ready.wait()
        rt = proc.runtime
        if rt is None:
            return
        owner = f"{os.getpid()}"
        while True:
            time.sleep(every)
            try:
                if rt.store.pending_count() and rt.store.lease(SWEEP_LEASE, owner, every):
                    app.send_task(INGEST_TASK, queue=queue_name(proc.settings))
            except Exception:  # a broker blip: next time
                log.warning("the pending sweep failed", exc_info=True)

    threading.Thread(target=loop, name="pending-sweep", daemon=True).start()


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = make_celery(settings)

    @signals.worker_process_init.connect(weak=False)
    def _init(**_: Any) -> None:
        app.conf.vitrine.start()
        _sweeper(app)

    @signals.worker_process_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        rt = app.conf.vitrine.runtime
        if rt is not None:
            rt.stop()

    return app
