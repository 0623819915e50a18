"""report.html (self-contained: every figure and photo is a base64 data URI) and suspects.csv."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

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
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(im: Any, size: int = 110) -> str:
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def tsne_figure(xy: np.ndarray, y: np.ndarray, clusters: np.ndarray, names: list[str],
                title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, n in enumerate(names):
        m = y == n
        axes[0].scatter(xy[m, 0], xy[m, 1], s=7, color=cmap(i), label=n)
    for c in sorted(set(clusters.tolist())):
        m = clusters == c
        axes[1].scatter(xy[m, 0], xy[m, 1], s=7, color=cmap(int(c) % 10), label=f"cluster {c}")
    axes[0].set_title("coloured by seller category")
    axes[1].set_title("coloured by KMeans cluster")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle(f"t-SNE - {title}")
    return _png(fig)


def confusion_figure(cm: np.ndarray, names: list[str], title: str, xlabel: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.imshow(cm, cmap="Blues")
    short = [n[:14] for n in names]
    ax.set_xticks(range(len(names)), short, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), short, fontsize=7)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_ylabel("seller category")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def bar_figure(metrics: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["features"])
    ari = [metrics["features"][n]["ari"] for n in names]
    acc = [metrics["features"][n]["knn_accuracy"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.bar(x - 0.2, ari, 0.4, label="KMeans(7) ARI")
    ax.bar(x + 0.2, acc, 0.4, label="5-fold kNN accuracy")
    ax.axhline(0.8, ls="--", color="grey", lw=0.8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Feature sets side by side")
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
.row{display:flex;gap:1em;flex-wrap:wrap}
"""


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def write_report(path: Path, *, metrics: dict[str, Any], per_feature: dict[str, dict[str, Any]],
                 y: np.ndarray, names: list[str], clf_confusion: np.ndarray,
                 vote_confusion: np.ndarray, suspects: list[dict[str, Any]],
                 images: list[Any], listings: list[Any], preprocessing: str,
                 history: list[dict[str, float]]) -> None:
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
    parts.append("<div>"
                 f"<div class='kpi'>fused KMeans ARI<b>{_fmt(m['fused']['ari'])}</b>"
                 "study: 0.7</div>"
                 f"<div class='kpi'>fine-tuned CNN val. accuracy"
                 f"<b>{_fmt(m['classifier']['val_accuracy'])}</b>study: 0.76</div>"
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
        f"then weighted ({e(json.dumps(m['fused']['blocks']))}) and concatenated. Before "
        "KMeans every feature set is reduced by PCA to 32 dimensions and re-normalised.</p>")
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

    parts.append("<h2>2. Projections and confusion matrices per feature set</h2>")
    for n, f in per_feature.items():
        parts.append(f"<h3>{e(FEATURE_LABELS.get(n, n))} - ARI {_fmt(f['ari'])}</h3>"
                     "<div class='row'>")
        if "_xy" in f:
            parts.append(f"<img class='fig' src='{tsne_figure(f['_xy'], y, f['_clusters'], names, n)}'>")  # noqa: E501
        parts.append(f"<img class='fig' src='{confusion_figure(f['_confusion'], names, f'KMeans clusters matched to categories ({n})', 'matched category')}'>")  # noqa: E501
        parts.append("</div>")

    c = m["classifier"]
    parts.append("<h2>3. Supervised: the fine-tuned CNN classifier</h2>")
    parts.append(
        f"<p>Backbone <code>{e(c['backbone'])}</code> pretrained on ImageNet, its head "
        "replaced by a new 7-way softmax layer; the last layers (about 15% of the backbone's "
        "weights) and the head fine-tuned for "
        f"{c['epochs']} epochs with data augmentation (flips, small rotations/shifts/zooms, "
        "colour jitter), label smoothing and a one-cycle learning rate, on a stratified "
        f"80/20 split ({c['train_size']} train / {c['val_size']} validation photos). "
        f"Validation accuracy <b>{_fmt(c['val_accuracy'])}</b>, ARI of its predictions "
        f"<b>{_fmt(c['ari'])}</b> (study, Xception: 0.76 / 0.83).</p>")
    hist = ", ".join(f"epoch {int(h['epoch'])}: loss {h['train_loss']:.3f}" for h in history)
    parts.append(f"<p class='small'>{e(hist)}</p>")
    parts.append(f"<img class='fig' src='{confusion_figure(clf_confusion, names, 'CNN classifier, validation split', 'predicted')}'>")  # noqa: E501

    k = m["knn_cv"]
    parts.append("<h2>4. Supervised: vitrine's kNN vote, cross-validated</h2>")
    parts.append(
        f"<p>What the product does: each listing is voted by its labelled neighbours in "
        f"the fused index, per modality (late fusion), {k['folds']}-fold cross-validated "
        "(TF-IDF vocabulary and centring fitted on the training folds only). Accuracy "
        f"<b>{_fmt(k['accuracy'])}</b>, macro-F1 <b>{_fmt(k['macro_f1'])}</b>, on all "
        "listings, text and photo together.</p>")
    parts.append(f"<img class='fig' src='{confusion_figure(vote_confusion, names, 'kNN vote, out-of-fold', 'predicted')}'>")  # noqa: E501

    parts.append("<h2>5. Error analysis: suspect seller categories</h2>")
    parts.append(
        "<p>Listings where the out-of-fold kNN vote is confident (&ge; 0.8) and disagrees "
        "with the seller's category. As in the study, many of these model 'errors' are "
        "seller errors (a mug filed under Home Decor, a watch box under Kitchen). They are "
        f"exported to <code>suspects.csv</code>. {len(suspects)} suspects; the 40 most "
        "confident are shown.</p>")
    parts.append("<table class='sus'><tr><th>photo</th><th>listing</th><th>seller says</th>"
                 "<th>model says</th></tr>")
    for s in suspects[:40]:
        i = s["_row"]
        img = f"<img src='{_thumb(images[i])}'>" if images[i] is not None else ""
        parts.append(f"<tr><td>{img}</td><td><b>{e(s['title'])}</b><br><span class='small'>"
                     f"{e(s['description'][:200])}</span></td><td>{e(s['seller_category'])}"
                     f"</td><td>{e(s['predicted'])} ({s['confidence']:.2f})</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Timings (s)</h2><table>" + "".join(
        f"<tr><td>{e(kk)}</td><td class=n>{v}</td></tr>" for kk, v in m["seconds"].items())
        + "</table></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")

