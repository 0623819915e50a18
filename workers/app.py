"""The Celery app: ingestion tasks on Redis, one :class:`~services.runtime.Runtime` per process.

Models and the index replica are loaded in ``worker_process_init`` (once per prefork child,
after the fork: threads and torch pools do not survive a fork), and torch gets
``cores // concurrency`` threads so that N children don't oversubscribe the CPU.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from indexer.settings import Settings, get_settings

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (used by the API to enqueue, and by ``vitrine worker``)."""
    app = Celery("vitrine", broker=settings.broker_url, backend=None, set_as_current=False)
    app.conf.update(
        task_default_queue=f"{settings.redis_prefix}.ingest",
        # a worker killed mid-task must not lose its event: ack after the work is done,
        # requeue when the child process dies, and redeliver what a dead host held after a
        # deliberate visibility timeout. Tasks are idempotent, so a redelivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "global_keyprefix": f"{settings.redis_prefix}:kombu:",
            "socket_connect_timeout": settings.broker_timeout,
        },
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
    )
    app.conf.state = {}
    register_tasks(app)
    return app


def register_tasks(app: Celery) -> None:
    @app.task(name="vitrine.ingest", acks_late=True, reject_on_worker_lost=True)
    def ingest_task(payload: dict[str, Any]) -> dict[str, Any]:
        from services.runtime import ingest

        rt = runtime(app)
        return ingest(rt, payload)


def runtime(app: Celery) -> Any:
    """This process's runtime, built on first use (normally at ``worker_process_init``)."""
    state = app.conf.state
    if "runtime" not in state:
        from indexer.encoders.base import configure_torch
        from services.runtime import Runtime

        settings: Settings = state["settings"]
        cores = os.cpu_count() or 1
        threads = settings.torch_threads or max(1, cores // settings.worker_concurrency)
        configure_torch(threads)
        # the registry sets torch threads again when it loads a model: give it the same count
        rt = Runtime(settings.model_copy(update={"torch_threads": threads}))
        rt.start(consume_inbox=False)
        state["runtime"] = rt
    return state["runtime"]


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
