"""The state of record: accepted writes, their versions, statuses and the replication log.

One port (:class:`~indexer.state.model.StateStore`), two backends chosen by
``VITRINE_BROKER_URL``: Redis (:mod:`indexer.state.redis_store`, shared by every process)
and SQLite (:mod:`indexer.state.sqlite_store`, one embedded process per data dir).
"""

from .model import (
    Claimed,
    DataDirLocked,
    Event,
    LogEntry,
    Outcome,
    StateStore,
    StoreUnavailable,
    open_store,
)

__all__ = [
    "Claimed",
    "DataDirLocked",
    "Event",
    "LogEntry",
    "Outcome",
    "StateStore",
    "StoreUnavailable",
    "open_store",
]
