"""The study's supervised baseline: a pretrained CNN, a new softmax head, last layers fine-tuned.

The backbone comes from the same spec as vitrine's image encoder (``timm:``/``torchvision:``),
loaded by :func:`indexer.encoders.image.load_image_encoder`, which already strips the ImageNet
head. Only the last ``train_fraction`` of the backbone's parameter tensors and the new head
are trained. BatchNorm statistics stay frozen (eval mode): a few hundred photos are too few to
re-estimate them.

Backbones whose layers form a ``features`` sequence (torchvision MobileNet, EfficientNet,
ConvNeXt, VGG, DenseNet...) are split at the start of the block holding the first trained
tensor. The frozen prefix is then run once per *view* of each training photo (view 1: the
photo as is; views 2..V: one random augmentation each) and its outputs are kept in memory;
epoch ``e`` trains the suffix and the head on view ``e mod V``. Only the cheap suffix runs
per epoch, so a dozen epochs cost about as much as V passes of the network. Other backbones
(timm, OpenCLIP) fall back to a fresh augmentation per epoch through the whole network (the
frozen layers build no autograd graph).

The schedule is fixed (``epochs``, one-cycle learning rate): the validation split is used
once, after the last epoch, never to pick an epoch. Validation predictions average the
softmax of the photo and of its mirror image (test-time flip).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.encoders.backends import split_backend
from indexer.encoders.image import load_image_encoder

# part of the study's cache key: bump when the recipe changes so that cached outcomes expire
CLASSIFIER_VERSION = "views-tta-v1"


@dataclass
class ClassifierResult:
    backbone: str
    val_accuracy: float
    val_rows: np.ndarray
    val_pred: np.ndarray  # category indices
    val_proba: np.ndarray
    epochs: int
    history: list[dict[str, float]]
    seconds: float
    views: int = 0  # cached augmented views (0: fresh augmentation every epoch)
    trained_from: str = ""  # first trained layer


def _augment() -> Any:
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.85, 1.1),
                                fill=(255, 255, 255)),
        transforms.ColorJitter(0.2, 0.2, 0.2),
    ])


def _identity(im: Any) -> Any:
    return im


def _mirror(im: Any) -> Any:
    from PIL import ImageOps

    return ImageOps.mirror(im)


def split_backbone(backbone: Any, train_fraction: float) -> tuple[Any, int, str]:
    """``(frozen prefix or None, number of trained tensors, first trained parameter name)``.

    With a ``features`` sequence the backbone is cut in place: ``backbone.features`` keeps the
    trained blocks only and the returned prefix holds the frozen ones.
    """
    from torch import nn

    named = list(backbone.named_parameters())
    n_train = max(1, int(round(len(named) * train_fraction)))
    first = named[-n_train][0]
    feats = getattr(backbone, "features", None)
    if not isinstance(feats, nn.Sequential) or not first.startswith("features."):
        return None, n_train, first
    cut = int(first.split(".")[1])
    blocks = list(feats.children())
    backbone.features = nn.Sequential(*blocks[cut:])
    n_suffix = sum(1 for _ in backbone.parameters())
    return nn.Sequential(*blocks[:cut]), n_suffix, f"features.{cut}"


def fine_tune(
    images: Sequence[Any],
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    spec: str,
    *,
    n_classes: int,
    epochs: int = 10,
    views: int = 4,
    batch_size: int = 32,
    train_fraction: float = 0.15,
    tta: bool = True,
    seed: int = 0,
    progress: Callable[[int], Any] | None = None,
    on_total: Callable[[int], Any] | None = None,
) -> ClassifierResult:
    """Fine-tune on ``train_rows``, score ``val_rows`` once at the end.

    ``progress(n)`` is called as photos go through the network or a training step;
    ``on_total(n)`` once with the number of such units.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # the network is trained, so it is the PyTorch model whatever backend serves the spec
    enc = load_image_encoder(split_backend(spec)[0], batch_size=batch_size, optimize=False)
    backbone = enc.model
    prefix, n_train, first = split_backbone(backbone, train_fraction)
    params = list(backbone.parameters())
    for p in params[:-n_train]:
        p.requires_grad_(False)
    if prefix is not None:
        for p in prefix.parameters():
            p.requires_grad_(False)
        prefix.eval()
    views = max(1, min(views, epochs)) if prefix is not None else 0
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(enc.dim, n_classes))
    model = nn.Sequential(backbone, head)
    n_val_passes = 2 if tta else 1
    if on_total:
        on_total(views * len(train_rows) + epochs * len(train_rows)
                 + n_val_passes * len(val_rows))

    def tick(n: int) -> None:
        if progress:
            progress(n)

    def frozen(rows: np.ndarray, transform: Callable[[Any], Any],
               count: bool = True) -> Iterator[Any]:
        """Batches of ``rows`` transformed, preprocessed and run through the frozen prefix."""
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            x = torch.stack([enc.preprocess(transform(images[i])) for i in chunk])
            if prefix is not None:
                with torch.inference_mode():
                    x = prefix(x)
                x = x.clone()  # an ordinary tensor again, usable by autograd
            if count:
                tick(len(chunk))
            yield x

    aug = _augment()
    cached: list[Any] = []
    for v in range(views):
        cached.append(torch.cat(list(frozen(train_rows, _identity if v == 0 else aug))))

    opt = torch.optim.AdamW([
        {"params": params[-n_train:], "lr": 3e-4},
        {"params": head.parameters(), "lr": 2e-3},
    ], weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(train_rows) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[3e-4, 2e-3], total_steps=max(1, steps), pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    rng = np.random.default_rng(seed)
    y_train = torch.as_tensor(labels[train_rows], dtype=torch.long)
    history: list[dict[str, float]] = []

    for epoch in range(epochs):
        model.eval()  # BatchNorm frozen ...
        head.train()  # ... dropout active in the head
        order = rng.permutation(len(train_rows))
        if cached:
            feats = cached[epoch % views]
            batches: Iterator[Any] = (feats[order[s : s + batch_size]]
                                      for s in range(0, len(order), batch_size))
        else:
            batches = frozen(train_rows[order], aug, count=False)
        total = 0.0
        for s, x in zip(range(0, len(order), batch_size), batches, strict=True):
            pos = order[s : s + batch_size]
            loss = loss_fn(model(x), y_train[pos])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(pos)
            tick(len(pos))
        history.append({"epoch": epoch + 1, "train_loss": total / max(1, len(order))})

    model.eval()
    proba = np.zeros((len(val_rows), n_classes), np.float32)
    transforms = [_identity, _mirror] if tta else [_identity]
    with torch.inference_mode():
        for transform in transforms:
            out = [torch.softmax(model(x), dim=1).numpy() for x in frozen(val_rows, transform)]
            if out:
                proba += np.concatenate(out) / len(transforms)
    pred = proba.argmax(axis=1)
    acc = float((pred == labels[val_rows]).mean()) if len(val_rows) else 0.0
    if history:
        history[-1]["val_accuracy"] = acc
    return ClassifierResult(spec, acc, val_rows, pred, proba, epochs, history,
                            time.perf_counter() - t0, views=views, trained_from=first)
