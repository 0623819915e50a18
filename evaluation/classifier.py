"""The study's supervised baseline: a pretrained CNN, a new softmax head, last layers fine-tuned.

The backbone comes from the same spec as vitrine's image encoder (``timm:``/``torchvision:``),
loaded by :func:`indexer.encoders.image.load_image_encoder`, which already strips the ImageNet
head. Only the last ``train_fraction`` of the backbone's parameter tensors and the new head
are trained; the frozen layers build no autograd graph, which keeps an epoch cheap on CPU.
BatchNorm statistics stay frozen (eval mode): a few hundred photos are too few to re-estimate
them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexer.encoders.image import load_image_encoder


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


def _augment() -> Any:
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomHorizontalFlip(),
        transforms.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.85, 1.1),
                                fill=(255, 255, 255)),
        transforms.ColorJitter(0.2, 0.2, 0.2),
    ])


def fine_tune(
    images: Sequence[Any],
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    spec: str,
    *,
    n_classes: int,
    epochs: int = 4,
    batch_size: int = 32,
    train_fraction: float = 0.15,
    seed: int = 0,
    progress: Any = None,
) -> ClassifierResult:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    enc = load_image_encoder(spec, batch_size=batch_size)
    backbone = enc.model
    params = list(backbone.parameters())
    n_train = max(1, int(round(len(params) * train_fraction)))
    for p in params[:-n_train]:
        p.requires_grad_(False)
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(enc.dim, n_classes))
    model = nn.Sequential(backbone, head)
    opt = torch.optim.AdamW([
        {"params": [p for p in params[-n_train:]], "lr": 3e-4},
        {"params": head.parameters(), "lr": 2e-3},
    ], weight_decay=1e-4)
    steps = epochs * int(np.ceil(len(train_rows) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[3e-4, 2e-3], total_steps=max(1, steps), pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    aug = _augment()
    rng = np.random.default_rng(seed)
    y = torch.as_tensor(labels, dtype=torch.long)
    history: list[dict[str, float]] = []

    def predict(rows: np.ndarray) -> np.ndarray:
        model.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(rows), batch_size):
                x = torch.stack([enc.preprocess(images[i]) for i in rows[s : s + batch_size]])
                out.append(torch.softmax(model(x), dim=1).numpy())
                if progress:
                    progress(len(rows[s : s + batch_size]))
        return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)

    for epoch in range(epochs):
        model.eval()  # BatchNorm frozen ...
        head.train()  # ... dropout active in the head
        order = rng.permutation(train_rows)
        total = 0.0
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            x = torch.stack([enc.preprocess(aug(images[i])) for i in rows])
            loss = loss_fn(model(x), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
            if progress:
                progress(len(rows))
        history.append({"epoch": epoch + 1, "train_loss": total / max(1, len(order))})
    proba = predict(val_rows)
    pred = proba.argmax(axis=1)
    acc = float((pred == labels[val_rows]).mean()) if len(val_rows) else 0.0
    history[-1]["val_accuracy"] = acc
    return ClassifierResult(spec, acc, val_rows, pred, proba, epochs, history,
                            time.perf_counter() - t0)
