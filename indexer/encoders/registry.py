"""Encoder registry: spec string -> loaded encoder, each loaded once per process.

A :class:`ModelRegistry` is a small container owned by whoever needs models (the API's
``app.state``, a worker process, a CLI command). ``get`` is safe to call from many threads:
the first caller loads, the others wait on the lock and reuse the same object.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import ModelSpecError
from ..settings import Settings
from .base import configure_torch

NONE = {"", "none", "off"}


def is_off(spec: str) -> bool:
    return spec.strip().lower() in NONE


INT8 = "+int8"


def load_text_encoder(spec: str, *, batch_size: int = 32, device: str = "cpu") -> Any:
    """``tfidf`` or a sentence-transformers hub id / local directory, optionally followed by
    ``+int8``: its Linear layers dynamically quantized to int8 (CPU only)."""
    if spec.lower() == "tfidf":
        from .text import TfidfEncoder

        return TfidfEncoder()
    from .text import SentenceTransformerEncoder

    if spec.endswith(INT8):
        enc = SentenceTransformerEncoder(spec[: -len(INT8)], device=device,
                                         batch_size=batch_size)
        enc.quantize_int8()
        enc.spec = spec  # recorded in the index: int8 and float vectors do not mix
        return enc
    return SentenceTransformerEncoder(spec, device=device, batch_size=batch_size)


def load_encoder(kind: str, spec: str, *, batch_size: int = 32, device: str = "cpu") -> Any:
    if kind == "text":
        return load_text_encoder(spec, batch_size=batch_size, device=device)
    if kind == "image":
        from .image import load_image_encoder

        return load_image_encoder(spec, batch_size=batch_size, device=device)
    raise ModelSpecError(f"unknown encoder kind {kind!r}")


class ModelRegistry:
    """Loaded encoders keyed by ``(kind, spec)``; one load per process, behind a lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, spec: str) -> Any:
        key = (kind, spec)
        model = self._models.get(key)
        if model is not None:
            return model
        with self._lock:
            if key not in self._models:
                configure_torch(self.settings.torch_threads)
                self._models[key] = load_encoder(
                    kind, spec, batch_size=self.settings.batch_size, device=self.settings.device
                )
            return self._models[key]

    def text(self) -> Any | None:
        spec = self.settings.text_model
        return None if is_off(spec) else self.get("text", spec)

    def image(self) -> Any | None:
        spec = self.settings.image_model
        return None if is_off(spec) else self.get("image", spec)

    def loaded(self) -> list[str]:
        return [f"{k}:{s}" for k, s in self._models]
