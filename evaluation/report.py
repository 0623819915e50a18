"""report.html (self-contained: every figure and photo is a base64 data URI) and suspects.csv.

The page is the Jinja2 template ``evaluation/templates/report.html`` (autoescaped: catalog
strings are escaped by the template); this module draws the figures and prepares the values.

Needs the ``eval`` extra (matplotlib, OpenCV, Jinja2), which the API/worker image leaves out.
``run_study`` imports this module before any work, so a missing extra stops ``vitrine
evaluate`` at once with the command that installs it.
"""

from __future__ import annotations

import base64
import csv
import functools
import importlib.util
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from indexer.encoders.text import strip_boilerplate
from indexer.errors import VitrineError

# module -> distribution of the `eval` extra (cv2 is used by evaluation.features, the
# study's ORB features; it is checked here too so that the study fails before it starts)
EVAL_MODULES = {"matplotlib": "matplotlib", "cv2": "opencv-python-headless",
                "jinja2": "jinja2"}
EVAL_INSTALL = "pip install 'vitrine[eval]'"


class MissingEvalExtra(VitrineError):
    """The study and its report need the ``eval`` extra, which is not installed."""


def require_eval_extra() -> None:
    """Raise :class:`MissingEvalExtra` naming what is missing and how to install it."""
    missing = [dist for mod, dist in EVAL_MODULES.items()
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise MissingEvalExtra(
            f"the evaluation study needs {', '.join(missing)} (the 'eval' extra), which this "
            f"install lacks: {EVAL_INSTALL}")


require_eval_extra()

import jinja2  # noqa: E402 - after the check, which names the extra to install

FEATURE_LABELS = {
    "bow": "Text - bag of words (counts, LSA 100)",
    "tfidf": "Text - TF-IDF (uni+bigrams, LSA 100)",
    "sentence": "Text - sentence model",
    "orb_bovw": "Image - ORB bag of visual words (256 words)",
    "cnn": "Image - CNN/CLIP encoder",
    "fused": "Fused - sentence + TF-IDF + image",
}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(im: Any, size: int = 110) -> str:
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _wrap(name: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(name, width)) or name


def tsne_figure(xy: np.ndarray, y: np.ndarray, clusters: np.ndarray, names: list[str],
                title: str) -> str:
    """Two panels on one t-SNE map: real categories, and KMeans clusters drawn in the colour
    of the category each cluster is matched to (so that agreement reads as equal colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import match_clusters

    mapping, _, _ = match_clusters(list(y), [int(c) for c in clusters])
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    cmap = plt.get_cmap("tab10")
    for i, n in enumerate(names):
        m = y == n
        axes[0].scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i), label=n)
    for c in sorted(set(clusters.tolist())):
        m = clusters == c
        cat = mapping.get(int(c), "")
        color = cmap(names.index(cat)) if cat in names else "black"
        axes[1].scatter(xy[m, 0], xy[m, 1], s=6, color=color)
    axes[0].set_title("coloured by seller category", fontsize=10)
    axes[1].set_title("coloured by KMeans cluster (colour of its matched category)",
                      fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center",
               ncol=min(4, len(names)), fontsize=8, markerscale=2, frameon=False)
    fig.suptitle(f"t-SNE - {title}", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _png(fig)


def confusion_figure(cm: np.ndarray, names: list[str], title: str, xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    ax.imshow(cm, cmap="Blues")
    wrapped = [_wrap(n) for n in names]
    ax.set_xticks(range(len(names)), wrapped, rotation=45, ha="right", fontsize=8,
                  rotation_mode="anchor")
    ax.set_yticks(range(len(names)), wrapped, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_ylabel("seller category")
    ax.set_xlabel(xlabel)
    ax.set_title(_wrap(title, 48), fontsize=10)
    return _png(fig)


def reliability_figure(paths: dict[str, Any]) -> str:
    """Reliability curves (accuracy per confidence bin) of the raw vote share and of the
    calibrated confidence, whole listings and title-only copies side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [(m, t) for m, t in (("full", "whole listings"), ("title", "titles only"))
             if m in paths]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.0), squeeze=False)
    for ax, (mode, title) in zip(axes[0], modes, strict=True):
        conf = paths[mode]["confidence"]
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--", label="perfectly calibrated")
        for key, label, style in (("raw", "raw vote share", "o-"),
                                  ("calibrated", "calibrated", "s-")):
            curve = conf[f"reliability_{key}"]
            ax.plot([b["confidence"] for b in curve], [b["accuracy"] for b in curve], style,
                    ms=4, label=f"{label} (ECE {conf[f'ece_{key}']:.3f})")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def bar_figure(metrics: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["features"])
    ari = [metrics["features"][n]["ari"] for n in names]
    acc = [metrics["features"][n]["knn_accuracy"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar(x - 0.2, ari, 0.4, label="KMeans(7) ARI")
    ax.bar(x + 0.2, acc, 0.4, label="5-fold kNN accuracy")
    ax.axhline(0.8, ls="--", color="grey", lw=0.8, label="0.8 (target ARI)")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    ax.set_title("Feature sets side by side (unsupervised KMeans ARI; supervised kNN)",
                 pad=28, fontsize=10)
    return _png(fig)


def write_suspects_csv(path: Path, suspects: list[dict[str, Any]]) -> None:
    cols = ["id", "title", "seller_category", "predicted", "confidence", "category_path",
            "image", "description"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for s in suspects:
            w.writerow(s)


def _shown_description(title: str, description: str) -> str:
    """The description without marketplace boilerplate; empty when all that is left is the
    title again ("<title> at" once "Buy <title> at Rs. 529 ..." is stripped)."""
    desc = strip_boilerplate(description)
    rest = desc[len(title):] if desc.lower().startswith(title.lower()) else desc
    return "" if len(rest.strip(" .,:;-")) < 20 else desc


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("evaluation", "templates"),
        autoescape=jinja2.select_autoescape(),
        undefined=jinja2.StrictUndefined,  # a misspelt name fails instead of rendering ""
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["f3"] = _fmt
    env.filters["json"] = json.dumps
    env.filters["feature_label"] = lambda n: FEATURE_LABELS.get(n, n)
    return env


@functools.cache
def template(name: str = "report.html") -> jinja2.Template:
    return _environment().get_template(name)


def write_report(path: Path, *, metrics: dict[str, Any], per_feature: dict[str, dict[str, Any]],
                 y: np.ndarray, names: list[str], clf_confusion: np.ndarray,
                 vote_confusion: np.ndarray, suspects: list[dict[str, Any]],
                 images: list[Any], listings: list[Any], preprocessing: str,
                 history: list[dict[str, float]],
                 sp_confusion: np.ndarray | None = None, shown: int = 40) -> None:
    m = metrics
    sp = m.get("fused_supervised_projection")
    # figures in page order
    figures: dict[str, Any] = {"bar": bar_figure(m), "sp_confusion": None}
    if sp and sp_confusion is not None:
        figures["sp_confusion"] = confusion_figure(
            sp_confusion, names, "KMeans on out-of-fold LDA scores (supervised)",
            "matched category")
    figures["per_feature"] = [
        {"name": n, "ari": f["ari"],
         "tsne": tsne_figure(f["_xy"], y, f["_clusters"], names, n) if "_xy" in f else None,
         "confusion": confusion_figure(f["_confusion"], names,
                                       f"KMeans clusters matched to categories ({n})",
                                       "matched category")}
        for n, f in per_feature.items()]
    figures["classifier_confusion"] = confusion_figure(
        clf_confusion, names, "CNN classifier, validation split", "predicted")
    figures["vote_confusion"] = confusion_figure(
        vote_confusion, names, "kNN vote, out-of-fold", "predicted")
    figures["reliability"] = reliability_figure(m["paths"]) if "paths" in m else None

    rows = []
    for s in suspects[:shown]:
        i = s["_row"]
        has_photo = images[i] is not None and listings[i].image is not None
        rows.append({
            "photo": _thumb(images[i]) if has_photo else None,
            "title": s["title"],
            "description": _shown_description(s["title"], s["description"])[:200],
            "seller_category": s["seller_category"], "predicted": s["predicted"],
            "confidence": s["confidence"],
        })
    page = template().render(
        m=m, ds=m["dataset"], sp=sp, c=m["classifier"], k=m["knn_cv"], names=names,
        views=m["classifier"].get("cached_views", 0),
        sp_method=_sentence(sp["method"].split(": ", 1)[-1]) if sp else "",
        preprocessing=preprocessing, history=history, figures=figures,
        suspects=rows, n_suspects=len(suspects), paths=m.get("paths"),
        ooc=m.get("out_of_catalog"),
    )
    path.write_text(page, encoding="utf-8")
