"""Encoder registry: spec string -> loaded encoder, each loaded once per process.

A :class:`ModelRegistry` is a small container owned by whoever needs models (the API's
``app.state``, a worker process, a CLI command). ``get`` is safe to call from many threads:
the first caller loads, the others wait on the lock and reuse the same object.

Two specs name the same model when :func:`same_model` says so: hub ids and tags compare as
written, a local directory or weights file by a digest of its contents (so an absolute and
a relative spelling of one path, or two copies of one model, are the same model).

Before the first model from the Hugging Face hub is loaded, :func:`hub_offline` probes the
hub once (a few seconds at most); when it cannot be reached the process runs in the hub's
offline mode (``HF_HUB_OFFLINE``): a cached model loads at once, a missing one fails at once
with a clear message, instead of after a minute of retries.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ModelSpecError
from ..settings import Settings
from .backends import split_backend, with_backend
from .base import configure_torch

NONE = {"", "none", "off"}


def is_off(spec: str) -> bool:
    return spec.strip().lower() in NONE


def load_text_encoder(spec: str, *, batch_size: int = 32, device: str = "cpu",
                      export_root: Path | None = None, threads: int = 0) -> Any:
    """``tfidf`` or a sentence-transformers hub id / local directory, optionally followed by
    a backend suffix (``+onnx``, ``+onnx-int8``, ``+openvino``: :mod:`.backends`)."""
    from .backends import TORCH, default_threads, export_dir_default

    base, backend = split_backend(spec)
    if base.lower() == "tfidf":
        if backend != TORCH:
            raise ModelSpecError(f"{spec!r}: tfidf has no network to run on a backend")
        from .text import TfidfEncoder

        return TfidfEncoder()
    from .text import BackendTextEncoder, SentenceTransformerEncoder

    if backend == TORCH:
        return SentenceTransformerEncoder(spec, device=device, batch_size=batch_size)
    return BackendTextEncoder(
        spec, base, backend, identity=lambda: _revisioned_identity("text", base),
        export_root=export_root or export_dir_default(), threads=default_threads(threads),
    )


def _revisioned_identity(kind: str, base: str) -> str:
    """:func:`model_identity`, with the revision of a hub model's local snapshot (called once
    the model is loaded, so it is cached): an export keyed by it is made again when the hub
    model changes upstream, where the id alone would keep serving the old weights."""
    identity = model_identity(kind, base)
    repo = hub_repo(kind, base)
    if repo is None:
        return identity
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache under that id: the id alone
        return identity
    return f"{identity}@{Path(path).name}"


def load_encoder(kind: str, spec: str, *, batch_size: int = 32, device: str = "cpu",
                 export_root: Path | None = None, threads: int = 0) -> Any:
    hub = hub_repo(kind, spec)
    offline = hub is not None and hub_offline()
    try:
        return _load_encoder(kind, spec, batch_size=batch_size, device=device,
                             export_root=export_root, threads=threads)
    except (ModelSpecError, OSError) as e:
        if not offline or not _about_download(e):
            raise
        why = _OFFLINE_REASON or "HF_HUB_OFFLINE is set"
        raise ModelSpecError(
            f"the {kind} model {spec!r} is not in the local Hugging Face cache and the hub "
            f"cannot be reached ({why}): connect once to download it, or point "
            f"VITRINE_{kind.upper()}_MODEL (--{kind}-model) at a local copy (README, "
            "Command line: the offline models)"
        ) from e


def _load_encoder(kind: str, spec: str, *, batch_size: int, device: str,
                  export_root: Path | None, threads: int) -> Any:
    base, backend = split_backend(spec)
    if backend != "torch" and device != "cpu":
        raise ModelSpecError(
            f"{spec!r}: the {backend} backend runs on the CPU, and the device is {device!r}: "
            f"name the model without the suffix ({base!r}) to run it in PyTorch there"
        )
    if kind == "text":
        return load_text_encoder(spec, batch_size=batch_size, device=device,
                                 export_root=export_root, threads=threads)
    if kind == "image":
        from .image import load_image_encoder

        return load_image_encoder(spec, batch_size=batch_size, device=device,
                                  export_root=export_root, threads=threads)
    raise ModelSpecError(f"unknown encoder kind {kind!r}")


def _about_download(e: BaseException) -> bool:
    """Whether a load error comes from a file that would have to be downloaded: the hub
    client's own error types, anywhere in the chain (transformers and open_clip wrap them)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, LocalEntryNotFoundError | OfflineModeIsEnabled):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


# --- the hub: reachable or offline --------------------------------------------------------
HUB_PROBE_TIMEOUT = 3.0
_OFFLINE_REASON: str | None = None
_probe_lock = threading.Lock()
_probed: bool | None = None


def _local_path(spec: str) -> Path | None:
    """The file or directory ``spec`` names on this machine, resolved; None if none."""
    p = Path(spec).expanduser()
    return p.resolve() if p.exists() else None


def hub_repo(kind: str, spec: str) -> str | None:
    """The spec, if loading it goes through the Hugging Face hub; None for a local model,
    ``tfidf``, ``@random`` weights or torchvision's weights enum (download.pytorch.org)."""
    spec = spec.strip()
    if is_off(spec) or spec.lower() == "tfidf":
        return None
    spec = split_backend(spec)[0]
    if kind == "text":
        local = spec.startswith((".", "/", "~")) or _local_path(spec) is not None
        return None if local else spec
    from .image import RANDOM, parse_image_spec

    try:
        family, _arch, weights = parse_image_spec(spec)
    except ModelSpecError:
        return None
    if family == "torchvision" or weights == RANDOM:
        return None
    if weights is not None and (Path(weights).suffix or _local_path(weights) is not None):
        return None  # a local checkpoint
    return spec


def _probe_hub(endpoint: str, timeout: float) -> str | None:
    """None if ``endpoint`` answers HTTP (any status) within ``timeout``, else the reason.

    Run in a thread: name resolution has no timeout of its own."""
    import urllib.error
    import urllib.request

    result: list[str | None] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(endpoint, method="HEAD")
            urllib.request.urlopen(req, timeout=timeout).close()  # noqa: S310 - http(s) only
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # it answered
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            reason = getattr(e, "reason", e)
            result.append(f"{endpoint}: {reason}")

    t = threading.Thread(target=probe, name="vitrine-hub-probe", daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"{endpoint}: no answer within {timeout:g} s"


def hub_offline(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether this process loads hub models offline (from the cache only).

    True when ``HF_HUB_OFFLINE`` is set, or when a probe of the hub (``HF_ENDPOINT``, done
    once per process) fails: ``HF_HUB_OFFLINE=1`` is then set for this process, which
    ``huggingface_hub`` reads when it is first imported. Without it, an unreachable hub is
    retried for over a minute before a model that is not cached is reported missing.
    """
    global _probed, _OFFLINE_REASON
    with _probe_lock:
        if _probed is not None:
            return _probed
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
            _probed = True
            return True
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        reason = _probe_hub(endpoint, timeout)
        _probed = reason is not None
        if reason is not None:
            _OFFLINE_REASON = reason
            if "huggingface_hub" in sys.modules:
                # too late for the variable to be read: a missing model will take the
                # hub's retries, the clear error still follows
                import logging

                logging.getLogger(__name__).warning(
                    "the hub cannot be reached (%s) and huggingface_hub is already "
                    "imported: loading may retry for a while", reason)
            else:
                os.environ["HF_HUB_OFFLINE"] = "1"
        return _probed


# --- model identity ------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# Files of a model directory that do not change the vectors; past MAX_FILES files a
# directory is no model and compares by its resolved path.
_IGNORED_SUFFIXES = {".md", ".lock"}
MAX_FILES = 1000


def fingerprint(path: Path) -> str:
    """A content digest of a model file, or of a model directory's files (relative names
    and contents; README/markdown and hidden files left out). Same contents, same digest,
    wherever the copy lives."""
    path = path.resolve()
    if path.is_file():
        files = [("", path)]  # a file: its contents only, not its name
    else:
        files = []
        for top, dirs, names in os.walk(path, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                f = Path(top, name)
                if name.startswith(".") or f.suffix.lower() in _IGNORED_SUFFIXES \
                        or not f.is_file():
                    continue
                files.append((f.relative_to(path).as_posix(), f))
            if len(files) > MAX_FILES:
                return f"path:{path}"
        files.sort()
    h = hashlib.sha256()
    for name, f in files:
        st = f.stat()
        h.update(f"{name}\0{st.st_size}\0{_file_digest(str(f), st.st_size, st.st_mtime_ns)}\n"
                 .encode())
    return h.hexdigest()[:32]


def model_identity(kind: str, spec: str) -> str:
    """What ``spec`` names, for comparing two specs: a hub id or tag as written; a local
    model directory or weights file (existing on this machine) by :func:`fingerprint`."""
    spec = spec.strip()
    try:
        base, backend = split_backend(spec)
    except ModelSpecError:
        return spec
    suffix = with_backend("", backend)
    if kind == "text":
        local = _local_path(base) if base.lower() != "tfidf" else None
        return f"local:{fingerprint(local)}{suffix}" if local else spec
    if kind == "image":
        from .image import RANDOM, parse_image_spec

        try:
            family, arch, weights = parse_image_spec(base)
        except ModelSpecError:
            return spec
        if weights is None:
            return f"{family}:{arch}{suffix}"
        local = _local_path(weights) if weights != RANDOM else None
        return (f"{family}:{arch}@" + (f"local:{fingerprint(local)}" if local else weights)
                + suffix)
    return spec


def absolute_spec(kind: str, spec: str) -> str:
    """``spec`` with a local model path made absolute (as ``make``'s ``$(abspath)`` does:
    ``..`` folded, links kept), so that what an index records does not depend on the folder
    a command ran in. Hub ids, tags and paths that do not exist are returned as they are."""
    def absolute(path: str) -> str:
        p = Path(path).expanduser()
        return os.path.abspath(p) if p.exists() else path

    try:
        s, backend = split_backend(spec)
    except ModelSpecError:
        return spec
    if kind == "text":
        if is_off(s) or s.lower() == "tfidf":
            return spec
        return with_backend(absolute(s), backend)
    if kind == "image" and not is_off(s):
        from .image import RANDOM, parse_image_spec

        try:
            family, arch, weights = parse_image_spec(s)
        except ModelSpecError:
            return spec
        if weights is not None and weights != RANDOM and _local_path(weights) is not None:
            return with_backend(f"{s.partition(':')[0]}:{arch}@{absolute(weights)}", backend)
    return spec


def same_model(kind: str, a: str, b: str) -> bool:
    """Whether specs ``a`` and ``b`` name the same ``kind`` ("text"/"image") model: equal
    strings, or equal :func:`model_identity` (local paths compared by content)."""
    if a == b:
        return True
    try:
        return model_identity(kind, a) == model_identity(kind, b)
    except OSError:
        return False


def runs_in_torch(settings: Settings) -> bool:
    """Whether a configured model runs in PyTorch (no backend suffix; ``tfidf`` and ``none``
    have no network): PyTorch's process-wide thread count then matters."""
    specs = (settings.text_model, settings.image_model)
    return any(not is_off(x) and x.strip().lower() != "tfidf"
               and split_backend(x)[1] == "torch" for x in specs)


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
                # with every model on a backend PyTorch only preprocesses photos, small
                # tensor operations that one thread does best (more would oversubscribe
                # the cores the backends' lanes already use)
                configure_torch(self.settings.torch_threads if runs_in_torch(self.settings)
                                else 1)
                self._models[key] = load_encoder(
                    kind, spec, batch_size=self.settings.batch_size, device=self.settings.device,
                    export_root=self.settings.export_dir, threads=self.settings.torch_threads,
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
