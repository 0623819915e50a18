"""The study helpers (exact answers on toy partitions) and a reduced end-to-end run."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from evaluation.metrics import adjusted_rand, match_clusters, matched_accuracy

from ..conftest import DATA_DIR, IMAGE_WEIGHTS, TEXT_MODEL


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
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8
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
