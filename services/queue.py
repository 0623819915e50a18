"""The API's port to the workers: Celery wake-ups after accepted listings (public API only).

The listing itself is already pending in the state store when this runs; a message only
tells a worker to drain what is claimable (see workers/app.py). Since a drain takes every
claimable listing, one message per listing would mostly wake tasks that find their listing
already in a batch (800 messages for 28 batches in ``vitrine bench service``): wake-ups are
coalesced to at most one per ``window`` seconds per API process, with one more at the end of
the window after the last accept, so the last listings of a burst never wait for the
workers' sweep. The API never imports the workers'
code: it sends the task by name, with the configuration both sides take from
:func:`indexer.runtime.celery_conf`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from celery import Celery

from indexer.runtime import INGEST_TASK, celery_conf, queue_name
from indexer.settings import Settings

log = logging.getLogger(__name__)


class WakeUps:
    """Calls ``send()`` at most once per ``window`` seconds, and once after the last call."""

    def __init__(self, send: Callable[[], None], window: float = 0.05) -> None:
        self._send, self.window = send, window
        self._lock = threading.Lock()
        self._last = -float("inf")
        self._timer: threading.Timer | None = None

    def __call__(self, lid: str, version: int) -> None:
        with self._lock:
            if self._timer is not None:
                return  # the wake-up already scheduled covers this listing
            wait = self._last + self.window - time.monotonic()
            if wait > 0:
                self._timer = threading.Timer(wait, self._trailing)
                self._timer.daemon = True
                self._timer.start()
                return
            self._last = time.monotonic()
        self._send()

    def _trailing(self) -> None:
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
        try:
            self._send()
        except Exception:  # the listing is pending in the store: the workers' sweep finds it
            log.warning("could not send a wake-up to the workers", exc_info=True)


def celery_notifier(settings: Settings) -> Callable[[str, int], None]:
    app = Celery("vitrine-api", broker=settings.broker_url, backend=None,
                 set_as_current=False)
    app.conf.update(celery_conf(settings))
    queue = queue_name(settings)
    return WakeUps(lambda: app.send_task(INGEST_TASK, queue=queue))
