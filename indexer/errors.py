"""Domain errors of the core. Adapters (HTTP, queue, CLI) map them to their own outcomes."""

from __future__ import annotations

import os


class VitrineError(Exception):
    """Base class of every error vitrine raises on purpose."""


class InvalidInput(VitrineError):
    """A listing, query or file the caller sent is not acceptable (a 4xx, a bad CSV row)."""


class PayloadTooLarge(InvalidInput):
    """A request body or photo over its size limit (HTTP 413)."""


class ImageError(InvalidInput):
    """A photo that cannot be used: missing, empty, corrupt, truncated, too large, a bomb."""


class ImageTooLarge(ImageError, PayloadTooLarge):
    """A photo over the configured byte limit."""


class Overloaded(VitrineError):
    """Too much accepted work not done yet: the caller should retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelSpecError(VitrineError):
    """An encoder spec string that cannot be parsed or loaded."""


class IndexMismatch(VitrineError):
    """An index built with other encoders/fusion than the ones configured now."""


class NotFound(VitrineError):
    """An unknown listing id."""


class VersionConflict(VitrineError):
    """A conditional write whose expected version is no longer the listing's latest (HTTP
    409): someone else changed it since it was read. ``current`` is the latest version now
    (None when the listing cannot take the write at all: queued, deleted)."""

    def __init__(self, message: str, current: int | None = None) -> None:
        super().__init__(message)
        self.current = current


def public_reason(e: BaseException) -> str:
    """What an error may say outside the process (``/health``): its kind, and for an OS error
    the system's reason ("No space left on device"); never its message, which can carry
    paths, hosts or addresses (those go to the log). Our own store errors are written to be
    shown."""
    from .state.model import StoreUnavailable

    if isinstance(e, StoreUnavailable):
        return str(e)
    if isinstance(e, OSError) and e.errno:
        return f"{type(e).__name__}: {os.strerror(e.errno)}"
    return type(e).__name__
