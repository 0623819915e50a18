"""`vitrine bench core` on a slice of the dataset (the full run is the benchmark itself)."""

import pytest

from evaluation.bench_core import PROBE, run_core_bench
from tests.support.offline import DATA_DIR


@pytest.mark.slow
def test_core_bench_reports_every_modality(settings):
    r = run_core_bench(DATA_DIR, settings, folds=2, limit=70, repeats=2)
    assert r["listings"] == 70
    assert set(r["cv"]["results"]) == {"text", "lexical", "image", "text+lexical", "fused", PROBE}
    for m in r["cv"]["results"].values():
        assert 0.0 <= m["macro_f1"] <= 1.0 and len(m["macro_f1_per_repeat"]) == 2
    # 70 listings of one or two categories: voting is still far above chance
    assert r["cv"]["results"]["fused"]["accuracy"] > 0.5
    # the supervised reference, trained on the same fused vectors of the same folds
    assert r["cv"]["results"][PROBE]["accuracy"] > 0.5
    # paths, calibration and out-of-catalog figures beside the first-level results
    for mode in ("full", "title"):
        levels = r["paths"][mode]["paths"]
        assert levels["level_1"]["coverage"] == 1.0 and levels["level_2"]["listings"] > 0
        conf = r["paths"][mode]["confidence"]
        assert 0 <= conf["ece_calibrated"] <= 1 and conf["reliability_calibrated"]
        assert len(r["paths"][mode]["operating_points"]) > 1
    assert r["out_of_catalog"]["listings"] >= 60
    assert 0 <= r["out_of_catalog"]["flagged_full"] <= 1
    assert r["speed"]["text_listings_per_s"] > 0 and r["speed"]["image_listings_per_s"] > 0
    assert r["latency_ms"]["search_k10"]["p99"] >= r["latency_ms"]["search_k10"]["p50"] > 0
    # the approximate index whole and reduced on the same folds, and the difference
    red = r["reduction"]
    assert red["ann_whole"]["reduce"] == "none" and red["ann_reduced"]["reduce"] == "pca512"
    assert red["cost_macro_f1"] == pytest.approx(
        red["ann_whole"]["macro_f1"] - red["ann_reduced"]["macro_f1"], abs=1e-3)
