"""The study helpers (exact answers on toy partitions), its report (template, packaging, the
`eval` extra) and a reduced end-to-end run."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from evaluation.metrics import adjusted_rand, match_clusters, matched_accuracy
from tests.support.offline import DATA_DIR, IMAGE_WEIGHTS, ROOT, TEXT_MODEL


def test_ari_is_one_for_a_relabelled_partition() -> None:
    cats = ["a", "a", "b", "b", "c", "c"]
    assert adjusted_rand(cats, [2, 2, 0, 0, 1, 1]) == pytest.approx(1.0)


def test_hungarian_matching_is_one_to_one() -> None:
    cats = ["a", "a", "a", "b", "b", "c"]
    clusters = [1, 1, 0, 0, 0, 2]
    mapping, cm, names = match_clusters(cats, clusters)
    assert names == ["a", "b", "c"]
    assert sorted(mapping.values()) == ["a", "b", "c"]
    assert mapping[1] == "a" and mapping[0] == "b" and mapping[2] == "c"
    assert cm.sum() == 6 and np.trace(cm) == 5
    assert matched_accuracy(cats, clusters) == pytest.approx(5 / 6)


def _toy_report_inputs() -> dict:  # type: ignore[type-arg]
    from PIL import Image

    names = ["Baby Care", "Watches"]
    y = np.array(["Baby Care", "Baby Care", "Watches", "Watches"])
    cm = np.array([[2, 0], [1, 1]])
    feature = {"dim": 8, "ari": 0.5, "matched_accuracy": 0.75, "knn_accuracy": 0.75,
               "knn_macro_f1": 0.7}
    metrics = {
        "dataset": {"listings": 4, "with_photo": 3, "categories": names},
        "features": {"tfidf": feature},
        "fused": {"ari": 0.5, "blocks": {"sentence": 1.0, "tfidf": 0.5}, "cluster_dim": 3},
        "fused_supervised_projection": {
            "ari": 0.9, "matched_accuracy": 0.95, "oof_lda_accuracy": 0.9,
            "method": "SUPERVISED, not clustering discovery: the fused features are mapped"},
        "classifier": {"backbone": "mobilenet_v2", "trained_from": "features.17", "epochs": 2,
                       "cached_views": 2, "train_size": 3, "val_size": 1,
                       "val_accuracy": 1.0, "ari": 1.0},
        "knn_cv": {"folds": 2, "accuracy": 0.75, "macro_f1": 0.7},
        "suspects": 2,
        "models": {"text": "<text & model>", "image": "torchvision:mobilenet_v2"},
        "seconds": {"load": 1.0, "total": 12.3},
    }
    photo = Image.new("RGB", (40, 40), "red")
    suspects = [
        {"_row": 0, "title": "<script>alert(1)</script> Tom & Jerry", "seller_category":
         "Baby Care", "predicted": "Watches <b>", "confidence": 0.91,
         "description": "Tom & Jerry <script>alert(2)</script> a mug with a handle and a lid"},
        {"_row": 3, "title": "A watch", "seller_category": "Watches", "predicted": "Baby Care",
         "confidence": 0.85, "description": "A watch"},
    ]
    return {
        "metrics": metrics, "per_feature": {"tfidf": {**feature, "_confusion": cm}},
        "y": y, "names": names, "clf_confusion": cm, "vote_confusion": cm,
        "suspects": suspects, "images": [photo, photo, photo, None],
        "listings": [SimpleNamespace(image="a.jpg")] * 3 + [SimpleNamespace(image=None)],
        "preprocessing": "lower-cased; <stop words> & stems", "history": [
            {"epoch": 1, "train_loss": 1.5}, {"epoch": 2, "train_loss": 0.75}],
        "sp_confusion": cm,
    }


def test_report_template_escapes_catalog_text(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The Jinja2 template: every section filled in, catalog strings escaped, figures inline."""
    from evaluation.report import write_report

    path = tmp_path / "report.html"
    write_report(path, **_toy_report_inputs())
    page = path.read_text()
    text = " ".join(page.split())  # the prose, whatever the template's line breaks
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</body></html>")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Tom &amp; Jerry" in text
    assert "Watches &lt;b&gt; (0.91)" in text and "&lt;text &amp; model&gt;" in text
    assert "&lt;stop words&gt; &amp; stems" in text
    assert "(no photo)" in text and text.count("data:image/jpeg;base64,") == 1
    assert "study (Xception): 0.76" in text and "&ge; 0.7" in text
    assert "not an unsupervised result" in text and "The fused features are mapped" in text
    assert "epoch 1: loss 1.500, epoch 2: loss 0.750</p>" in text
    assert "epoch <i>e</i> trains on view <i>e</i> mod 2. Stratified" in text
    assert "({&#34;sentence&#34;: 1.0, &#34;tfidf&#34;: 0.5}) and concatenated" in text
    assert "2 suspects; the 2 most confident are shown" in text
    assert "<td>total</td><td class=n>12.3</td>" in text
    # the cards: the first two apart, the last four touching, as the f-string page had them
    assert "</div>\n<div class='kpi sup'>" in page
    assert "see 1b</div>\n<div class='kpi'>fine-tuned CNN val. accuracy" in page
    assert "0.76</div><div class='kpi'>fine-tuned CNN, ARI" in page
    _assert_figures_decode(page)
    assert page.count("data:image/png;base64,") == 5  # bar, LDA, tfidf, CNN, vote


def test_report_templates_ship_in_the_wheel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The built wheel carries the templates and the installed package finds them."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend (torch needs it)
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("indexer", "services", "workers", "evaluation", "vitrine"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("vitrine-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert {"evaluation/templates/report.html", "evaluation/templates/report.css"} <= set(
            z.namelist())
        z.extractall(site)
    probe = (
        "import evaluation.report as r, pathlib, sys\n"
        "t = r.template()\n"
        "assert pathlib.Path(r.__file__).is_relative_to(sys.argv[1]), r.__file__\n"
        "assert pathlib.Path(t.filename).is_relative_to(sys.argv[1]), t.filename\n"
        "assert 'body{font-family' in r.template('report.css').render()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    p = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


NO_EVAL_EXTRA = """
import contextlib, importlib, io, pkgutil, sys
for name in ("cv2", "matplotlib"):
    sys.modules[name] = None  # as if the eval extra were not installed
for pkg in ("indexer", "services", "workers", "vitrine", "evaluation"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name != "evaluation.report":
            importlib.import_module(info.name)
from vitrine.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["evaluate", "--data", "nowhere", "--out", "nowhere"])
print(rc, err.getvalue())
"""


def test_the_product_runs_without_the_eval_extra() -> None:
    """matplotlib and OpenCV are the `eval` extra: no product module imports them, and
    `vitrine evaluate` without them stops before any work with the command that installs them."""
    p = subprocess.run([sys.executable, "-c", NO_EVAL_EXTRA], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rc, _, message = p.stdout.partition(" ")
    assert rc == "2"
    assert "matplotlib, opencv-python-headless" in message
    assert "pip install 'vitrine[eval]'" in message


@pytest.mark.slow
def test_reduced_evaluate_writes_metrics_and_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vitrine.cli import main

    out = tmp_path / "eval"
    rc = main([
        "evaluate", "--data", str(DATA_DIR), "--out", str(out), "--fast", "--per-category",
        "12", "--quiet", "--text-model", str(TEXT_MODEL),
        "--image-model", f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}", "--threads", "2",
    ])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["features"]) >= {"bow", "tfidf", "sentence", "orb_bovw", "cnn", "fused"}
    for f in m["features"].values():
        assert -0.5 <= f["ari"] <= 1 and 0 <= f["knn_accuracy"] <= 1
        assert 0 <= f["knn_macro_f1"] <= 1
    assert m["features"]["sentence"]["knn_accuracy"] > 0.5
    assert 0 <= m["fused"]["ari"] <= 1 and m["fused"]["supervised"] is False
    sp = m["fused_supervised_projection"]
    assert sp["supervised"] is True and "SUPERVISED" in sp["method"]
    assert -0.5 <= sp["ari"] <= 1 and 0 <= sp["oof_lda_accuracy"] <= 1
    assert isinstance(m["classifier"]["backbone"], str)
    assert 0 <= m["classifier"]["val_accuracy"] <= 1 and -0.5 <= m["classifier"]["ari"] <= 1
    assert m["knn_cv"]["accuracy"] > 0.5 and 0 <= m["knn_cv"]["macro_f1"] <= 1
    assert isinstance(m["suspects"], int)
    # the section on paths and calibration: per level, whole and by title; ECE; out of catalog
    for mode in ("full", "title"):
        levels = m["paths"][mode]["paths"]
        assert levels["level_1"]["accuracy"] > 0.5 and "level_2" in levels
        assert levels["level_2"]["accuracy"] <= levels["level_1"]["accuracy"]
        conf = m["paths"][mode]["confidence"]
        assert 0 <= conf["ece_calibrated"] <= 1 and conf["reliability_calibrated"]
    ooc = m["out_of_catalog"]
    assert ooc["listings"] >= 50 and 0 <= ooc["flagged_full"] <= 1
    page = (out / "report.html").read_text()
    assert "Category paths and calibrated confidence" in page and "Out of catalog" in page
    assert page.count("data:image/png;base64,") >= 9
    assert "src='http" not in page
    assert (out / "suspects.csv").exists()
    # the study's own numbers, stated as the study states them
    assert "study (Xception): 0.76" in page and "study (Xception): 0.83" in page
    assert "&ge; 0.7" in page
    assert "not an unsupervised result" in page
    _assert_figures_decode(page)
    _assert_renders(out / "report.html", tmp_path)


def _assert_figures_decode(page: str) -> None:
    """Every embedded figure is a real, non-trivial PNG."""
    from PIL import Image

    figures = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert figures
    for b64 in figures:
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def _assert_renders(html_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium lays the page out: a tall screenshot that is not blank."""
    from PIL import Image

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    if browser is None:
        if os.environ.get("CI"):  # CI installs it (.ci/run): a missing browser is a failure
            pytest.fail("no headless Chromium in CI to render report.html")
        pytest.skip("no headless Chromium to render report.html")
    png = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={png}", "--window-size=1400,5000", html_path.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    im = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert im.shape[0] >= 4000
    dark = (im < 200).mean(axis=1)  # share of inked pixels per row
    assert (dark > 0.01).mean() > 0.3  # text and figures fill much of the page
