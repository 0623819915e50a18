"""Inference backends behind a model spec: ``<model>+onnx``, ``+onnx-int8``, ``+openvino``.

A spec without a suffix runs in PyTorch (eager). With a suffix the same model is exported
once to ONNX (``torch.onnx.export``), cached on disk keyed by
the model's identity, and run by:

* ``onnx`` - ONNX Runtime, fp32; transformer text models get ORT's transformer fusions
  (``onnxruntime.transformers.optimizer``, exact rewrites: attention, GELU, LayerNorm);
* ``onnx-int8`` - the same graph with ORT's dynamic quantization: MatMul/Gemm weights int8
  per output channel, activations quantized per batch (the per-channel weights keep a
  sentence embedding within cosine ~0.994 of fp32 where per-tensor ones fall to ~0.95);
* ``openvino`` - OpenVINO reading the same ONNX file, in full precision (f32, see
  :class:`BackendRunner`); it caches its compiled blob beside the export.

Why not sentence-transformers' own ``backend="onnx"`` / ``"openvino"``: they go through
Hugging Face Optimum, whose ONNX package (optimum-onnx 0.1) requires transformers < 4.58
while sentence-transformers 6 requires transformers >= 5, so they cannot be installed
together. The export here uses the model's own ``forward`` (for a sentence-transformers
model the whole module chain, pooling and normalisation included) so what runs is what
PyTorch runs; ``vitrine bench encoders`` measures the fidelity of every backend.

Threads: a backend encoder's sessions have their thread count fixed when they are made;
single queries use a session with ``threads`` intra-op threads (latency), and the ingestion
lanes share a lane runner (:meth:`BackendRunner.for_lane`) whose runs each stay on one
thread, so that nothing flips a process-wide thread count per call.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import numpy as np

from ..errors import ModelSpecError

log = logging.getLogger(__name__)

TORCH = "torch"
BACKENDS = ("onnx", "onnx-int8", "openvino")
# what each backend needs installed (dependencies of vitrine: pyproject.toml)
_NEEDS = {"onnx": ("onnxruntime", "onnx"), "onnx-int8": ("onnxruntime", "onnx"),
          "openvino": ("openvino", "onnx")}
# bump when the export changes, so that caches made by an older vitrine are not reused
EXPORT_VERSION = 1


def split_backend(spec: str) -> tuple[str, str]:
    """``'model+onnx'`` -> ``('model', 'onnx')``; a spec without a known suffix runs in
    PyTorch: ``('model', 'torch')``. Only the known suffixes are split off, so a local path
    holding a ``+`` stays whole."""
    base, plus, tail = spec.strip().rpartition("+")
    if plus and tail.lower() in BACKENDS:
        return base, tail.lower()
    if plus and tail.lower() == "int8" and not Path(spec.strip()).expanduser().exists():
        raise ModelSpecError(
            f"{spec!r}: '+int8' (PyTorch's dynamic quantization, torch.ao, deprecated) was "
            f"replaced by '+onnx-int8' (ONNX Runtime): use {base + '+onnx-int8'!r} and "
            "rebuild the index"
        )
    return spec.strip(), TORCH


def with_backend(base: str, backend: str) -> str:
    return base if backend == TORCH else f"{base}+{backend}"


def require(backend: str, spec: str) -> None:
    """Fail with what to install when ``backend``'s runtime is missing."""
    import importlib.util

    missing = [m for m in _NEEDS.get(backend, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelSpecError(
            f"{spec!r} runs on the {backend} backend, which needs {', '.join(missing)}: "
            f"install them (`pip install {' '.join(missing)}`; they are dependencies of "
            "vitrine, so reinstalling it does too: README, Fast encoders)"
        )


def default_threads(threads: int) -> int:
    return threads or max(1, len(os.sched_getaffinity(0)))


# --- the export cache ----------------------------------------------------------------------
def export_dir_default() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vitrine" / "exports"


def cache_key(identity: str, backend: str) -> str:
    """What an export depends on: the model (its identity: a hub id or a content digest of
    local files), the backend and the versions of the libraries that write the files."""
    from importlib.metadata import PackageNotFoundError, version

    # the libraries whose code is traced into the graph, and those that write or rewrite it
    # (ONNX Runtime optimizes and quantizes ONNX graphs; OpenVINO caches its own blobs)
    names = ["torch", "torchvision", "transformers", "sentence-transformers", "timm",
             "open_clip_torch", "onnx"]
    if backend.startswith("onnx"):
        names.append("onnxruntime")
    versions: dict[str, str | int | None] = {"export": EXPORT_VERSION}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    blob = json.dumps({"model": identity, "backend": backend, "versions": versions},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_export(root: Path, name: str, key: str, build: Callable[[Path], None]) -> Path:
    """The folder ``root/<name>-<key>``, made by ``build(tmp_folder)`` the first time.

    One process builds while others wait on a file lock (an export takes seconds to a
    minute, and two at once would only waste it); the folder appears whole, by rename."""
    root.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:60]
    final = root / f"{slug}-{key}"
    if (final / "DONE").exists():
        return final
    with open(root / f".{slug}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "DONE").exists():  # made by another process while this one waited
            return final
        for stale in root.glob(f".{slug}-{key}-*"):  # left by an export that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{slug}-{key}-", dir=root))
        try:
            build(tmp)
            (tmp / "DONE").write_text(name + "\n")
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            if final.exists():  # a partial folder from an interrupted export
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("exported %s to %s", name, final)
    return final


def export_onnx(module: Any, example: dict[str, Any], dynamic: dict[str, dict[int, str]],
                path: Path) -> None:
    """``module(*example.values())`` -> one output, exported to ``path`` with the inputs named
    as ``example``'s keys and the given axes dynamic (batch, sequence length).

    PyTorch's TorchScript-based exporter (``dynamo=False``): in torch 2.14 the dynamo exporter
    fails on MPNet (all-mpnet-base-v2, the hub default text model: an internal NameError
    while decomposing its relative-position attention), while this one exports the five
    architectures vitrine runs (MiniLM, MPNet, ViT-B-32, Xception, MobileNetV2) with vectors
    equal to PyTorch's (tests/indexer/test_backends.py)."""
    import warnings

    import torch

    # with gradients on: without them nn.MultiheadAttention (OpenCLIP's ViT) takes its fused
    # inference kernel, which has no ONNX export
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(
            module, tuple(example.values()), str(path), input_names=list(example),
            output_names=["output"], dynamic_axes={**dynamic, "output": {0: "batch"}},
            opset_version=18, dynamo=False,
        )


def optimize_transformer(src: Path, dst: Path) -> bool:
    """ORT's transformer fusions (attention, GELU, LayerNorm). False (``dst`` not written)
    when ORT cannot fuse this graph: the plain graph is then used as it is."""
    import contextlib
    import sys

    from onnxruntime.transformers.optimizer import optimize_model

    try:
        # the optimizer prints some of its notes to stdout, which is a `--json` command's
        # output: they go to stderr with its log
        with contextlib.redirect_stdout(sys.stderr):
            opt = optimize_model(str(src), model_type="bert", num_heads=0, hidden_size=0)
        opt.save_model_to_file(str(dst), use_external_data_format=False)
    except Exception as e:  # noqa: BLE001 - an optimisation, never a requirement
        log.info("ORT transformer fusions skipped for %s: %s", src, e)
        return False
    return True


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization of MatMul/Gemm: weights int8 per output channel.
    Convolutions stay fp32 (dynamic ConvInteger is slower than ORT's fp32 convolutions)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm"],
        # fused graphs carry ORT-domain ops whose output types ONNX's shape inference
        # does not know; they are float
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


# --- running an exported graph -------------------------------------------------------------
class BackendRunner:
    """One exported graph on ONNX Runtime or OpenVINO, with a fixed number of threads.

    ``run(inputs)`` is safe from many threads. :meth:`for_lane` gives the runner that the
    ingestion lanes share, made on first use (an API process that only answers queries
    never makes it): ONNX Runtime with one intra-op thread, so that each lane's run stays
    on the lane's own thread; OpenVINO with one stream per core, so that the lanes' infer
    requests (one per thread) run side by side instead of queueing on a single stream.

    OpenVINO runs in full precision (``INFERENCE_PRECISION_HINT`` f32): left to itself it
    picks bf16 on CPUs that have it (this one does: MobileNetV2's cosine to PyTorch fell to
    0.995), so the vectors would depend on the machine that computed them, and an index
    built on one machine would be queried with slightly different vectors on another. Its
    threads are not pinned to cores: API and worker processes share the machine's cores.
    """

    def __init__(self, path: Path, backend: str, threads: int, *, lanes: int = 0) -> None:
        self.path, self.backend = path, backend
        self._lane: BackendRunner | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        if backend == "openvino":
            import openvino as ov

            core = ov.Core()
            # the compiled blob is cached beside the export: later loads skip compilation
            core.set_property({"CACHE_DIR": str(path.parent / "openvino-cache")})
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32",
                                      "ENABLE_CPU_PINNING": False}
            if lanes:
                config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=lanes,
                              INFERENCE_NUM_THREADS=lanes)
            else:
                config.update(PERFORMANCE_HINT="LATENCY", NUM_STREAMS=1,
                              INFERENCE_NUM_THREADS=threads)
            self._compiled = core.compile_model(str(path), "CPU", config)
            self.input_names = [p.get_any_name() for p in self._compiled.inputs]
        else:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1 if lanes else threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # ORT's pool threads spin between runs by default: on a machine whose cores
            # are shared (an API process ingesting beside its queries, other workers) the
            # spinning steals them; measured on 2 busy cores, MobileNetV2 one photo at 2
            # threads: p50 25.6 ms spinning, 6.7 ms not
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(path), so,
                                                 providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: inputs[k] for k in self.input_names}
        if self.backend == "openvino":
            req = getattr(self._local, "request", None)
            if req is None:  # an infer request serves one thread at a time
                req = self._local.request = self._compiled.create_infer_request()
            return np.asarray(req.infer(feed)[0], dtype=np.float32)
        return np.asarray(self._session.run(None, feed)[0], dtype=np.float32)

    def for_lane(self) -> BackendRunner:
        with self._lock:
            if self._lane is None:
                self._lane = BackendRunner(self.path, self.backend, 1,
                                           lanes=default_threads(0))
            return self._lane


def exported_runner(root: Path, name: str, identity: str, backend: str,
                    export: Callable[[Path], None], *, transformer: bool,
                    threads: int) -> BackendRunner:
    """The runner of a model's export for ``backend``, exported first if it is not cached."""
    folder = cached_export(root, name, cache_key(identity, backend),
                           lambda d: build_graphs(d, export, transformer=transformer,
                                                  backend=backend))
    return BackendRunner(graph_file(folder, backend), backend, threads)


class OnBackend:
    """What text and image encoders on a backend share: their :class:`BackendRunner`, and
    the copy of themselves that ingestion lanes call."""

    runner: BackendRunner

    def for_lane(self) -> Self:
        """This encoder on the runner that ingestion lanes share."""
        lane = copy.copy(self)
        lane.runner = self.runner.for_lane()
        return lane


def graph_file(folder: Path, backend: str) -> Path:
    """The graph a backend runs in an export folder."""
    if backend == "onnx-int8":
        return folder / "model-int8.onnx"
    optimized = folder / "model-opt.onnx"
    return optimized if optimized.exists() else folder / "model.onnx"


def build_graphs(folder: Path, export: Callable[[Path], None], *, transformer: bool,
                 backend: str) -> None:
    """``model.onnx`` from ``export``, then what ``backend`` runs on top of it."""
    export(folder / "model.onnx")
    source = folder / "model.onnx"
    if transformer and backend in ("onnx", "onnx-int8") and optimize_transformer(
            source, folder / "model-opt.onnx"):
        source = folder / "model-opt.onnx"
    if backend == "onnx-int8":
        quantize_int8(source, folder / "model-int8.onnx")
    keep = graph_file(folder, backend)
    for f in folder.glob("model*.onnx*"):  # the intermediate graphs
        if f != keep and not f.name.startswith(keep.name):
            f.unlink()
