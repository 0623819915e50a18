"""Encoder protocols and shared helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

Progress = Callable[[int], None]
"""Called with the number of items just encoded (e.g. ``tqdm.update``)."""


@runtime_checkable
class TextEncoder(Protocol):
    spec: str
    dim: int

    def encode(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        """Return an ``(n, dim)`` float32 array of L2-normalised embeddings."""
        ...

    def for_lane(self) -> TextEncoder:
        """The encoder an ingestion lane (a thread running beside others) calls: one with
        its own one-thread session, or this one where threads are process-wide (PyTorch)."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    spec: str
    dim: int

    def encode(self, images: Sequence[object], progress: Progress | None = None) -> np.ndarray:
        """Encode decoded RGB ``PIL.Image`` objects into ``(n, dim)`` L2-normalised float32."""
        ...

    def for_lane(self) -> ImageEncoder:
        """As :meth:`TextEncoder.for_lane`."""
        ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def configure_torch(threads: int = 0) -> int:
    """Set torch's intra-op threads for this process (0 = all cores). Returns the count.

    A prefork Celery worker with N processes should give each ``cores // N`` threads,
    otherwise N processes each spawn ``cores`` threads and thrash the CPU.
    """
    import torch

    n = threads or os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
