"""report.html (self-contained: every figure and photo is a base64 data URI) and suspects.csv."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from indexer.encoders.text import strip_boilerplate

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


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:4px 8px;
font-size:14px}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kpi{display:inline-block;background:#f5f8ff;border:1px solid #cdd9f5;border-radius:6px;
padding:.6em 1em;margin:.3em;min-width:150px}.kpi b{font-size:1.6em;display:block}
img.fig{max-width:100%}.sus td{vertical-align:top}.small{font-size:12px;color:#555}
.row{display:flex;gap:1%;align-items:flex-start}.row img.tsne{width:65%}
.row img.cm{width:34%}.row img.cm:only-child{width:auto}
.kpi.sup{background:#fff6e8;border-color:#f0c987}
.kpi b.inl{display:inline;font-size:1em}
"""


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


def write_report(path: Path, *, metrics: dict[str, Any], per_feature: dict[str, dict[str, Any]],
                 y: np.ndarray, names: list[str], clf_confusion: np.ndarray,
                 vote_confusion: np.ndarray, suspects: list[dict[str, Any]],
                 images: list[Any], listings: list[Any], preprocessing: str,
                 history: list[dict[str, float]],
                 sp_confusion: np.ndarray | None = None) -> None:
    e = html.escape
    m = metrics
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vitrine evaluation"
             f"</title><style>{CSS}</style></head><body>"]
    parts.append("<h1>vitrine: can text and photos tell product categories apart?</h1>")
    ds = m["dataset"]
    parts.append(
        f"<p>The feasibility study, reproduced: {ds['listings']} Flipkart listings "
        f"({ds['with_photo']} with a photo) in {len(names)} seller categories. We extract "
        "text and image features, check whether <b>unsupervised</b> KMeans with 7 clusters "
        "rediscovers the categories (adjusted Rand index, ARI: 1 = the same partition, "
        "0 = chance), then train <b>supervised</b> baselines, and finally list listings whose "
        "seller category looks wrong.</p>")
    sp = m.get("fused_supervised_projection")
    parts.append("<div>"
                 f"<div class='kpi'>fused features, KMeans ARI (unsupervised)"
                 f"<b>{_fmt(m['fused']['ari'])}</b>study (combined features): &ge; 0.7</div>")
    if sp:
        parts.append(f"<div class='kpi sup'>fused, out-of-fold LDA projection, KMeans ARI "
                     f"(<b class='inl'>supervised</b>)<b>{_fmt(sp['ari'])}</b>"
                     "no study counterpart, see 1b</div>")
    parts.append(f"<div class='kpi'>fine-tuned CNN val. accuracy"
                 f"<b>{_fmt(m['classifier']['val_accuracy'])}</b>study (Xception): 0.76</div>"
                 f"<div class='kpi'>fine-tuned CNN, ARI of its val. predictions"
                 f"<b>{_fmt(m['classifier']['ari'])}</b>study (Xception): 0.83</div>"
                 f"<div class='kpi'>vitrine kNN vote (CV) accuracy"
                 f"<b>{_fmt(m['knn_cv']['accuracy'])}</b>macro-F1 "
                 f"{_fmt(m['knn_cv']['macro_f1'])}</div>"
                 f"<div class='kpi'>suspect labels<b>{m['suspects']}</b>see section 5</div>"
                 "</div>")
    parts.append(f"<p class='small'>Models: text <code>{e(m['models']['text'])}</code>, "
                 f"image <code>{e(m['models']['image'])}</code>. Run time "
                 f"{m['seconds']['total']:.0f} s.</p>")

    parts.append("<h2>1. Features and preprocessing</h2>")
    parts.append(f"<p><b>Text preprocessing.</b> {e(preprocessing)}</p>")
    parts.append(
        "<p><b>Image features.</b> Classical baseline: ORB keypoints (OpenCV, 400 per photo, "
        "grey, histogram-equalised, 320 px), their binary descriptors clustered into a "
        "256-word visual vocabulary (MiniBatchKMeans), one TF-IDF weighted histogram per "
        "photo. Deep features: the configured CNN/CLIP encoder, pooled features of the "
        "photo letterboxed on white.</p>"
        "<p><b>Fused.</b> As vitrine's index fuses modalities: each block (sentence "
        "embedding, TF-IDF/LSA, image) is centred on the catalog mean and L2-normalised, "
        f"then weighted ({e(json.dumps(m['fused']['blocks']))}) and concatenated. No label "
        "is used. Before KMeans every feature set is reduced by PCA to "
        f"{m['fused'].get('cluster_dim', 32)} dimensions (number of categories + 1, as in "
        "spectral clustering) and its rows re-normalised.</p>")
    parts.append(f"<img class='fig' src='{bar_figure(m)}'>")
    parts.append("<table><tr><th>feature set</th><th>dim</th><th>KMeans(7) ARI</th>"
                 "<th>matched accuracy</th><th>kNN accuracy (5-fold)</th><th>kNN macro-F1</th>"
                 "</tr>")
    for n, f in m["features"].items():
        parts.append(f"<tr><td>{e(FEATURE_LABELS.get(n, n))}</td><td class=n>{f['dim']}</td>"
                     f"<td class=n>{_fmt(f['ari'])}</td><td class=n>"
                     f"{_fmt(f['matched_accuracy'])}</td><td class=n>{_fmt(f['knn_accuracy'])}"
                     f"</td><td class=n>{_fmt(f['knn_macro_f1'])}</td></tr>")
    parts.append("</table><p class='small'>Matched accuracy: each cluster is assigned the "
                 "category it overlaps most, one-to-one (Hungarian algorithm). kNN: "
                 "cosine, 10 neighbours, similarity-weighted, out-of-fold.</p>")

    if sp:
        parts.append("<h3>1b. Supervised reference: fused features projected by a linear map "
                     "learned out of fold</h3>")
        parts.append(
            "<p><b>This entry uses the real categories; it is not an unsupervised result and "
            "is not comparable with the ARIs above.</b> "
            f"{e(_sentence(sp['method'].split(': ', 1)[-1]))} ARI <b>{_fmt(sp['ari'])}</b>, "
            "matched accuracy "
            f"{_fmt(sp['matched_accuracy'])}, accuracy of the out-of-fold LDA itself "
            f"{_fmt(sp['oof_lda_accuracy'])}. It shows how well a linear map of the same "
            "features separates the categories when a labelled catalog is available, which "
            "is vitrine's setting.</p>")
        if sp_confusion is not None:
            parts.append(f"<img class='fig' src='{confusion_figure(sp_confusion, names, 'KMeans on out-of-fold LDA scores (supervised)', 'matched category')}'>")  # noqa: E501

    parts.append("<h2>2. Projections and confusion matrices per feature set</h2>")
    for n, f in per_feature.items():
        parts.append(f"<h3>{e(FEATURE_LABELS.get(n, n))} - ARI {_fmt(f['ari'])}</h3>"
                     "<div class='row'>")
        if "_xy" in f:
            parts.append(f"<img class='fig tsne' src='{tsne_figure(f['_xy'], y, f['_clusters'], names, n)}'>")  # noqa: E501
        parts.append(f"<img class='fig cm' src='{confusion_figure(f['_confusion'], names, f'KMeans clusters matched to categories ({n})', 'matched category')}'>")  # noqa: E501
        parts.append("</div>")

    c = m["classifier"]
    parts.append("<h2>3. Supervised: the fine-tuned CNN classifier</h2>")
    views = c.get("cached_views", 0)
    how = (f"the frozen layers are run once on {views} views of each training photo (the "
           f"photo, then {views - 1} random augmentations) and epoch <i>e</i> trains on view "
           f"<i>e</i> mod {views}" if views else "a fresh augmentation every epoch")
    parts.append(
        f"<p>Backbone <code>{e(c['backbone'])}</code> pretrained on ImageNet, its head "
        f"replaced by a new {len(names)}-way softmax layer. The last layers (from "
        f"<code>{e(c.get('trained_from', ''))}</code> on: the blocks holding the last 15% "
        "of the backbone's parameter tensors) and the head are fine-tuned for "
        f"{c['epochs']} epochs, with label smoothing (0.1), AdamW and a one-cycle learning "
        "rate; BatchNorm statistics stay frozen. Photos are letterboxed on white (no centre "
        "crop); augmentation: horizontal flips, small rotations/shifts/zooms, colour "
        f"jitter; {how}. Stratified 80/20 split with a fixed seed ({c['train_size']} train / "
        f"{c['val_size']} validation photos). The schedule is fixed: the validation photos "
        "are scored once, after the last epoch, and never used to choose an epoch. "
        "Validation predictions average the photo and its mirror image (test-time flip). "
        f"Validation accuracy <b>{_fmt(c['val_accuracy'])}</b>, ARI of its predictions "
        f"against the categories on those photos <b>{_fmt(c['ari'])}</b>. The study's "
        "fine-tuned Xception reached a validation accuracy of 0.76 and an ARI of 0.83.</p>")
    hist = ", ".join(f"epoch {int(h['epoch'])}: loss {h['train_loss']:.3f}" for h in history)
    parts.append(f"<p class='small'>{e(hist)}</p>")
    parts.append(f"<img class='fig' src='{confusion_figure(clf_confusion, names, 'CNN classifier, validation split', 'predicted')}'>")  # noqa: E501

    k = m["knn_cv"]
    parts.append("<h2>4. Supervised: vitrine's kNN vote, cross-validated</h2>")
    parts.append(
        f"<p>What the product does: neighbours are retrieved from the fused index, then "
        f"each modality votes separately (late fusion); {k['folds']}-fold cross-validated "
        "(TF-IDF vocabulary and centring fitted on the training folds only). Accuracy "
        f"<b>{_fmt(k['accuracy'])}</b>, macro-F1 <b>{_fmt(k['macro_f1'])}</b>, on all "
        "listings, text and photo together.</p>")
    parts.append(f"<img class='fig' src='{confusion_figure(vote_confusion, names, 'kNN vote, out-of-fold', 'predicted')}'>")  # noqa: E501

    parts.append("<h2>5. Error analysis: suspect seller categories</h2>")
    parts.append(
        "<p>Listings where the out-of-fold kNN vote is confident (&ge; 0.8) and disagrees "
        "with the seller's category: some are model errors, many are listings whose "
        "category is doubtful (an item that fits another category as well or better). They "
        f"are exported to <code>suspects.csv</code>. {len(suspects)} suspects; the "
        f"{min(40, len(suspects))} most confident are shown.</p>")
    parts.append("<table class='sus'><tr><th>photo</th><th>listing</th><th>seller says</th>"
                 "<th>model says</th></tr>")
    for s in suspects[:40]:
        i = s["_row"]
        has_photo = images[i] is not None and listings[i].image is not None
        img = (f"<img src='{_thumb(images[i])}'>" if has_photo
               else "<span class='small'>(no photo)</span>")
        desc = _shown_description(s["title"], s["description"])
        parts.append(f"<tr><td>{img}</td><td><b>{e(s['title'])}</b><br><span class='small'>"
                     f"{e(desc[:200])}</span></td><td>{e(s['seller_category'])}"
                     f"</td><td>{e(s['predicted'])} ({s['confidence']:.2f})</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Timings (s)</h2><table>" + "".join(
        f"<tr><td>{e(kk)}</td><td class=n>{v}</td></tr>" for kk, v in m["seconds"].items())
        + "</table></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")

