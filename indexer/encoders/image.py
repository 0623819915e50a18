"""Image encoders: OpenCLIP, timm and torchvision backbones, one pooled vector per photo.

Specs (``<family>:<arch>@<weights>``):

* ``open_clip:ViT-B-32@laion2b_s34b_b79k`` - an OpenCLIP tag, or a local checkpoint file;
* ``timm:legacy_xception`` / ``timm:<model>@<tag or local file>`` - a timm model; no ``@``
  means timm's default pretrained tag;
* ``torchvision:mobilenet_v2@/path/model.safetensors`` - a torchvision architecture with a
  local state dict (safetensors or .pt), or a torchvision weights enum name (``DEFAULT``).

``@random`` builds any of them with random weights: the same code path as the pretrained
model, without a download (used by the tests and for smoke runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelSpecError
from .backends import OnBackend
from .base import Progress, l2_normalize

log = logging.getLogger(__name__)

RANDOM = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_image_spec(spec: str) -> tuple[str, str, str | None]:
    """``'family:arch@weights'`` -> ``(family, arch, weights or None)``."""
    family, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ModelSpecError(
            f"image model spec {spec!r} must look like 'open_clip:<arch>@<tag>', "
            "'timm:<model>[@<tag|file>]' or 'torchvision:<arch>@<file|DEFAULT>'"
        )
    arch, at, weights = rest.partition("@")
    family = family.strip().lower().replace("-", "_")
    if family not in {"open_clip", "timm", "torchvision"}:
        raise ModelSpecError(f"unknown image model family {family!r} in {spec!r}")
    return family, arch.strip(), (weights.strip() or None) if at else None


# Product photos are letterboxed, not centre-cropped: the longest side is resized to the
# model's input size and the short side padded to a square on white (the background of
# product shots). A crop cuts off the ends of long products; on the dataset letterboxing gives
# +2 to +3 points of image-only kNN accuracy (README). Every family gets it from a library
# option: OpenCLIP's ``resize_mode="longest"`` + ``fill_color``, timm's ``crop_mode="border"``
# (torchvision models get timm's too: see imagenet_preprocess).
WHITE = (255, 255, 255)


def timm_letterbox(data_config: dict[str, Any]) -> Callable[[Any], Any]:
    """timm's eval transform for ``data_config`` (input size, interpolation, mean, std) in its
    "border" crop mode at ``crop_pct=1``: the longest side resized to the input size, then
    padded to it, nothing cropped. Composed from timm's public transforms, as
    ``create_transform(crop_mode="border")`` composes them, with one change: the padding is
    white, the background of product shots (timm pads with the mean colour, a grey)."""
    from timm.data.transforms import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio
    from torchvision import transforms

    size = data_config["input_size"][-2:]
    return transforms.Compose([
        ResizeKeepRatio(size, interpolation=data_config.get("interpolation", "bilinear"),
                        longest=1.0),
        CenterCropOrPad(size, fill=WHITE),
        MaybeToTensor(),
        transforms.Normalize(mean=data_config["mean"], std=data_config["std"]),
    ])


class TorchImageEncoder:
    """A torch module mapping a batch of preprocessed images to pooled features."""

    def __init__(
        self,
        spec: str,
        model: Any,
        preprocess: Callable[[Any], Any],
        dim: int,
        *,
        batch_size: int = 32,
        device: str = "cpu",
        forward: Callable[[Any], Any] | None = None,
        optimize: bool = True,
    ) -> None:
        self.spec = spec
        self.device = device
        self.model = model.eval().to(device)
        if optimize and forward is None:
            self.model = optimize_for_inference(self.model)
        self.preprocess = preprocess
        self.dim = dim
        self.batch_size = batch_size
        self._forward = forward or self.model

    def for_lane(self) -> TorchImageEncoder:
        """PyTorch's thread count is process-wide: lanes share this encoder (the pipeline sets
        one torch thread while they run)."""
        return self

    def encode(self, images: Sequence[Any], progress: Progress | None = None) -> np.ndarray:
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                x = torch.stack([self.preprocess(im) for im in chunk]).to(self.device)
                x = x.contiguous(memory_format=torch.channels_last)
                feats = self._forward(x)
                out[start : start + len(chunk)] = feats.float().cpu().numpy()
                if progress:
                    progress(len(chunk))
        return l2_normalize(out)


class BackendImageEncoder(OnBackend):
    """An image encoder's network run on ONNX Runtime or OpenVINO (see
    :mod:`indexer.encoders.backends`); photos are preprocessed as for PyTorch (the same
    letterbox transform), then run through the exported graph."""

    def __init__(self, spec: str, source: TorchImageEncoder, backend: str, *, identity: str,
                 export_root: Path, threads: int) -> None:
        from .backends import export_onnx, exported_runner, split_backend

        self.spec, self.dim, self.batch_size = spec, source.dim, source.batch_size
        self.preprocess = source.preprocess

        def export(path: Path) -> None:
            import torch

            class Graph(torch.nn.Module):  # the encoder's forward (e.g. encode_image)
                def __init__(self) -> None:
                    super().__init__()
                    self.net = source.model

                def forward(self, pixels: Any) -> Any:
                    return source._forward(pixels)

            size = _input_size(source)
            export_onnx(Graph().eval(), {"pixels": torch.zeros(2, 3, size, size)},
                        {"pixels": {0: "batch"}}, path)

        family, arch, _weights = parse_image_spec(split_backend(spec)[0])
        self.runner = exported_runner(export_root, f"image-{family}-{arch}-{backend}",
                                      identity, backend, export, transformer=False,
                                      threads=threads)

    def encode(self, images: Sequence[Any], progress: Progress | None = None) -> np.ndarray:
        import torch

        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = torch.stack([self.preprocess(im) for im in chunk]).numpy()
            out[start : start + len(chunk)] = self.runner.run({"pixels": x})
            if progress:
                progress(len(chunk))
        return l2_normalize(out)


def _input_size(enc: TorchImageEncoder) -> int:
    """The square input side the encoder's transform produces."""
    from PIL import Image

    return int(enc.preprocess(Image.new("RGB", (64, 48), WHITE)).shape[-1])


def optimize_for_inference(model: Any) -> Any:
    """Fold each BatchNorm into the convolution before it, and lay weights out channels-last.

    Both are exact rewrites for inference (outputs equal to ~1e-6). On CPU they make a
    convolutional backbone about 2x faster (MobileNetV2, 1 thread: 60 -> 112 photos/s at
    batch 4; ``vitrine bench ingest`` measures the whole path). A model that torch.fx
    cannot trace keeps its batch norms; a model without any (a ViT) is left as it is.
    """
    import torch

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: keep the model unfused
        log.info("batch-norm folding skipped for %s: %s", type(model).__name__, e)
    return model.to(memory_format=torch.channels_last)


def _probe_dim(forward: Callable[[Any], Any], size: int) -> int:
    import torch

    with torch.inference_mode():
        return int(forward(torch.zeros(1, 3, size, size)).shape[-1])


def load_open_clip(spec: str, arch: str, weights: str | None, **kw: Any) -> TorchImageEncoder:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if weights is None:
        raise ModelSpecError(
            f"{spec!r}: name the weights, e.g. 'open_clip:{arch}@laion2b_s34b_b79k' "
            "(or '@random')"
        )
    if arch not in open_clip.list_models():
        raise ModelSpecError(f"{spec!r}: unknown OpenCLIP architecture {arch!r}")
    pretrained = None if weights == RANDOM else weights
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise ModelSpecError(f"{spec!r}: checkpoint file {pretrained!r} not found")
    try:
        # letterboxed on white instead of OpenCLIP's default resize + centre crop
        model = open_clip.create_model(
            arch, pretrained=pretrained,
            force_preprocess_cfg={"resize_mode": "longest", "fill_color": WHITE[0]},
        )
    except (RuntimeError, OSError) as e:  # unknown tag, offline hub
        raise ModelSpecError(f"cannot load {spec!r}: {e}") from e
    # what create_model_and_transforms builds from the model's (here forced) preprocess cfg
    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    preprocess = image_transform_v2(cfg, is_train=False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    return TorchImageEncoder(
        spec, model, preprocess, _probe_dim(model.encode_image, size),
        forward=model.encode_image, **kw,
    )


def load_timm(spec: str, arch: str, weights: str | None, **kw: Any) -> TorchImageEncoder:
    import timm
    from timm.data import resolve_data_config

    options: dict[str, Any] = {"num_classes": 0}  # num_classes=0: pooled features, no head
    if weights == RANDOM:
        options["pretrained"] = False
    elif weights is None:
        options["pretrained"] = True
    elif Path(weights).suffix:  # a local file
        if not Path(weights).is_file():
            raise ModelSpecError(f"{spec!r}: weights file {weights!r} not found")
        options.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
    else:  # a pretrained tag
        arch = f"{arch}.{weights}"
        options["pretrained"] = True
    try:
        model = timm.create_model(arch, **options)
    except RuntimeError as e:  # unknown model
        raise ModelSpecError(f"cannot load {spec!r}: {e}") from e
    except OSError as e:
        raise ModelSpecError(f"cannot load {spec!r} (offline?): {e}") from e
    preprocess = timm_letterbox(resolve_data_config({}, model=model))
    dim = int(getattr(model, "num_features"))  # noqa: B009 - typed as Tensor|Module
    return TorchImageEncoder(spec, model, preprocess, dim, **kw)


def build_torchvision_backbone(arch: str, weights: str | None, spec: str) -> Any:
    """A torchvision classification model with its weights loaded (head still attached)."""
    import torch
    import torchvision

    if weights is None:
        raise ModelSpecError(
            f"{spec!r}: name the weights: a local .safetensors/.pt file, a torchvision "
            "weights name such as 'DEFAULT', or 'random'"
        )
    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise ModelSpecError(f"{spec!r}: unknown torchvision architecture {arch!r}") from None
    if weights == RANDOM:
        return builder(weights=None)
    path = Path(weights).expanduser()
    if path.suffix in {".safetensors", ".pt", ".pth", ".bin"}:
        if not path.is_file():
            raise ModelSpecError(f"{spec!r}: weights file {str(path)!r} not found")
        model = builder(weights=None)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelSpecError(f"{spec!r}: weights do not fit {arch}: {e}") from e
        return model
    try:
        return builder(weights=weights)
    except (ValueError, KeyError) as e:
        raise ModelSpecError(f"{spec!r}: unknown torchvision weights {weights!r}") from e
    except OSError as e:
        raise ModelSpecError(f"cannot download {spec!r} (offline?): {e}") from e


def strip_head(model: Any) -> Any:
    """Replace a torchvision classifier's last layer by Identity so it returns pooled features."""
    import torch

    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, torch.nn.Sequential):
            # keep everything before the final Linear (e.g. ConvNeXt's LayerNorm+Flatten)
            layers = list(head.children())
            while layers and not isinstance(layers[-1], torch.nn.Linear):
                layers.pop()
            if layers:
                layers.pop()
            setattr(model, attr, torch.nn.Sequential(*layers))
        else:
            setattr(model, attr, torch.nn.Identity())
        return model
    raise ModelSpecError(f"cannot find the classification head of {type(model).__name__}")


def imagenet_preprocess(size: int = 224) -> Callable[[Any], Any]:
    """Letterbox on white for a torchvision model (ImageNet mean/std, bicubic).

    torchvision has no pad-to-square with a fill colour (``v2.Resize(size=None, max_size=)``
    resizes the longest side, but ``v2.CenterCrop`` pads with black and ``v2.Pad`` takes fixed
    amounts), so it is timm's border-mode transform, the one timm models get: one letterbox
    for both, no hand-written one (timm is a dependency anyway). It resizes then pads where
    the former hand-written one padded then resized: on the 1050-photo catalog MobileNetV2's
    kNN accuracy is the same (0.8575 vs 0.8569, mean of 5 fold seeds; vectors' cosine
    0.997 on average) and preprocessing is a little faster."""
    return timm_letterbox({"input_size": (3, size, size), "interpolation": "bicubic",
                           "mean": IMAGENET_MEAN, "std": IMAGENET_STD})


def load_torchvision(spec: str, arch: str, weights: str | None, **kw: Any) -> TorchImageEncoder:
    model = strip_head(build_torchvision_backbone(arch, weights, spec)).eval()
    size = 299 if arch.startswith("inception") else 224
    return TorchImageEncoder(spec, model, imagenet_preprocess(size), _probe_dim(model, size), **kw)


LOADERS = {"open_clip": load_open_clip, "timm": load_timm, "torchvision": load_torchvision}


def load_image_encoder(
    spec: str, *, batch_size: int = 32, device: str = "cpu", optimize: bool = True,
    export_root: Path | None = None, threads: int = 0,
) -> Any:
    """The encoder named by ``spec`` (``+onnx``/``+onnx-int8``/``+openvino`` for a backend,
    see :mod:`indexer.encoders.backends`). ``optimize=False`` keeps a PyTorch model as built
    (batch norms unfolded), for code that trains it rather than only running it.

    ``@random`` weights are drawn from a fixed seed, so that every process building the same
    random spec gets the same network (an index built by one is queried by another)."""
    from .backends import TORCH, default_threads, export_dir_default, require, split_backend

    base, backend = split_backend(spec)
    family, arch, weights = parse_image_spec(base)
    if backend != TORCH:
        require(backend, spec)
        device, optimize = "cpu", False  # the export takes the model as built
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        enc = LOADERS[family](base, arch, weights, batch_size=batch_size, device=device,
                              optimize=optimize)
    if backend == TORCH:
        return enc
    from .registry import model_identity

    return BackendImageEncoder(
        spec, enc, backend, identity=model_identity("image", base),
        export_root=export_root or export_dir_default(), threads=default_threads(threads),
    )
