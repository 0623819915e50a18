"""`vitrine bench encoders` on a slice of the catalog (the full run is the benchmark)."""

import json

import pytest

from tests.support.offline import DATA_DIR, IMAGE_WEIGHTS, TEXT_MODEL
from vitrine.cli import main


@pytest.mark.slow
def test_encoders_bench_compares_backends_to_pytorch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITRINE_EXPORT_DIR", str(tmp_path / "exports"))
    out = tmp_path / "bench.json"
    rc = main(["bench", "encoders", "--data", str(DATA_DIR), "--models", "offline",
               "--backends", "onnx", "--limit", "140", "--single", "5", "--json",
               "--out", str(out), "--text-model", str(TEXT_MODEL),
               "--image-model", f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == r
    rows = {(x["kind"], x["backend"]): x for x in r["results"]}
    assert set(rows) == {("text", "torch"), ("text", "onnx"), ("image", "torch"),
                         ("image", "onnx")}
    for x in r["results"]:
        assert {"model", "backend", "batch_per_s", "single_p50_ms", "single_p99_ms",
                "cosine_mean", "cosine_min"} <= set(x)
        assert x["batch_per_s"] > 0 and 0 < x["single_p50_ms"] <= x["single_p99_ms"]
        assert 0 <= x["fused_macro_f1"] <= 1
    for kind in ("text", "image"):  # fp32 on ONNX Runtime: PyTorch's vectors and votes
        assert rows[(kind, "onnx")]["cosine_min"] > 0.9999
        assert abs(rows[(kind, "onnx")]["fused_macro_f1_delta"]) <= 0.01
        assert rows[(kind, "torch")]["cosine_mean"] == 1.0
    assert r["settings"]["catalog_listings"] == 140
