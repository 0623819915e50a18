"""The API's port to the workers: a Celery wake-up per accepted listing (public API only).

The listing itself is already pending in the state store when this runs; the message only
tells a worker to look (see workers/app.py). The API never imports the workers' code: it
sends the task by name, with the configuration both sides take from
:func:`indexer.runtime.celery_conf`.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

from indexer.runtime import INGEST_TASK, celery_conf, queue_name
from indexer.settings import Settings


def celery_notifier(settings: Settings) -> Callable[[str, int], None]:
    app = Celery("vitrine-api", broker=settings.broker_url, backend=None,
                 set_as_current=False)
    app.conf.update(celery_conf(settings))
    queue = queue_name(settings)

    def notify(lid: str, version: int) -> None:
        app.send_task(INGEST_TASK, args=[lid, version], queue=queue)

    return notify
