"""The `vitrine` console script as a user runs it (a real subprocess)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from ..conftest import CSV, DATA_DIR, IMAGE_WEIGHTS, TEXT_MODEL

pytestmark = pytest.mark.slow


def run(*args, check=True):
    env = dict(os.environ, VITRINE_TEXT_MODEL=str(TEXT_MODEL),
               VITRINE_IMAGE_MODEL=f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}",
               VITRINE_TORCH_THREADS="2")
    p = subprocess.run([sys.executable, "-m", "vitrine.cli", *args], capture_output=True,
                       text=True, env=env, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    with CSV.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    per: dict[str, int] = {}
    keep = []
    for r in rows:
        cat = r["product_category_tree"].split(">>")[0]
        if per.get(cat, 0) < 6:
            per[cat] = per.get(cat, 0) + 1
            keep.append(r)
    path = d / "catalog.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return d, path, keep


def test_index_predict_search(small_csv):
    d, catalog, rows = small_csv
    idx = d / "index"
    p = run("index", "--catalog", str(catalog), "--images", str(DATA_DIR / "images"),
            "--index", str(idx), "--bad-rows", str(d / "bad.csv"))
    assert f"indexed {len(rows)} listings" in p.stdout
    new = d / "new.csv"
    new.write_text(
        "uniq_id,product_name,description,image\n"
        "n1,Analog Watch For Men,stainless steel strap,\n"
        "n2,,,\n"
        f"n3,Cotton Bath Towel,,{rows[0]['image']}\n"
        "n4,Broken,row,with,too,many\n",
        encoding="utf-8",
    )
    out = d / "out.csv"
    p = run("predict", str(new), "--index", str(idx), "--output", str(out),
            "--images", str(DATA_DIR / "images"))
    got = {r["uniq_id"]: r for r in csv.DictReader(out.open())}
    assert set(got) == {"n1", "n3"}  # the bad rows are reported, the rest goes through
    assert got["n1"]["category"] == "Watches"
    assert 0 <= float(got["n1"]["confidence"]) <= 1
    assert "n2" in p.stderr and "n4" in p.stderr
    p = run("search", "--index", str(idx), "--text", "wrist watch", "-k", "3", "--json")
    hits = json.loads(p.stdout)
    assert len(hits) == 3 and hits[0]["category"] == "Watches"


def test_clear_errors(tmp_path, small_csv):
    p = run("predict", str(tmp_path / "missing.csv"), "--index", str(tmp_path),
            "--output", str(tmp_path / "o.csv"), check=False)
    assert p.returncode == 2 and "no index snapshot" in p.stderr
    d, _, _ = small_csv
    p = run("search", "--index", str(d / "index"), "--id", "nope", check=False)
    assert p.returncode == 2 and "unknown listing" in p.stderr
    p = run("index", "--catalog", str(tmp_path / "none.csv"), "--index", str(tmp_path / "i"),
            check=False)
    assert p.returncode == 2 and "not found" in p.stderr
