"""The `vitrine` console script as a user runs it (a real subprocess)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.offline import CSV, DATA_DIR, IMAGE_SPEC, IMAGE_WEIGHTS, TEXT_MODEL, TEXT_SPEC

pytestmark = pytest.mark.slow


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, VITRINE_TEXT_MODEL=TEXT_SPEC, VITRINE_IMAGE_MODEL=IMAGE_SPEC,
               VITRINE_TORCH_THREADS="2", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run(*args, check=True, cwd=None, timeout=600, **env):
    p = subprocess.run([sys.executable, "-m", "vitrine.cli", *args], capture_output=True,
                       text=True, env=offline_env(**env), timeout=timeout, cwd=cwd)
    if check:
        assert p.returncode == 0, p.stderr
    return p


# weight-free models: fast processes for the tests that are not about the models
LIGHT = {"VITRINE_TEXT_MODEL": "tfidf", "VITRINE_IMAGE_MODEL": "none"}


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


@pytest.fixture(scope="module")
def small_index(small_csv):
    """The index of ``small_csv``, built with the models spelled as the README does:
    relative paths (``shared/models/...`` from a folder with a ``shared`` link); the other
    commands name them by other absolute paths (``TEXT_MODEL``, without the link), from
    another folder."""
    d, catalog, rows = small_csv
    (d / "shared").symlink_to(TEXT_MODEL.parents[1])
    p = run("index", "--catalog", str(catalog), "--images", str(DATA_DIR / "images"),
            "--index", "index", "--bad-rows", "bad.csv", cwd=d,
            VITRINE_TEXT_MODEL="shared/models/all-MiniLM-L6-v2+onnx",
            VITRINE_IMAGE_MODEL="torchvision:mobilenet_v2@"
                                "shared/models/mobilenet_v2_imagenet/model.safetensors+onnx")
    assert f"indexed {len(rows)} listings" in p.stdout
    manifest = json.loads(next((d / "index").glob("snap-*/manifest.json")).read_text())
    # recorded absolute (not relative to the folder it ran in), as `make` spells it
    assert manifest["text_model"] == f"{d / 'shared/models/all-MiniLM-L6-v2'}+onnx"
    assert manifest["image_model"] == ("torchvision:mobilenet_v2@"
                                       f"{d / 'shared/models/mobilenet_v2_imagenet'}"
                                       "/model.safetensors+onnx")
    return d / "index"


def test_index_predict_search(small_csv, small_index):
    d, _catalog, rows = small_csv
    idx = small_index
    images = d / "images"
    images.mkdir()
    (images / "good.jpg").symlink_to(DATA_DIR / "images" / rows[0]["image"])
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 10)
    new = d / "new.csv"
    new.write_text(
        "uniq_id,product_name,description,image\n"
        "n1,Analog Watch For Men,stainless steel strap,\n"
        "n2,,,\n"
        "n3,Cotton Bath Towel,,good.jpg\n"
        "n4,Broken,row,with,too,many\n"
        "n5,Analog Watch For Women,leather strap,corrupt.jpg\n",
        encoding="utf-8",
    )
    out = d / "out.csv"
    # the same models by their absolute paths: the same models as the index's relative ones
    p = run("predict", str(new), "--index", str(idx), "--output", str(out),
            "--images", str(images), "--bad-rows", str(d / "predict-bad.csv"))
    got = {r["uniq_id"]: r for r in csv.DictReader(out.open())}
    assert set(got) == {"n1", "n3", "n5"}  # the bad rows are reported, the rest goes through
    assert got["n1"]["category"] == "Watches"
    # the path in one column, its levels joined by " >> ", the first level first; the six
    # catalog watches are all "Watches >> Wrist Watches"
    assert got["n1"]["category_path"].split(" >> ")[:2] == ["Watches", "Wrist Watches"]
    assert all(r["category_path"].split(" >> ")[0] == r["category"] for r in got.values())
    assert got["n5"]["category"] == "Watches"  # from its text: its photo is unusable
    assert 0 <= float(got["n1"]["confidence"]) <= 1
    # every problem is printed, counted and written: refused rows and the corrupt photo
    assert "n2" in p.stderr and "n4" in p.stderr
    assert "n5: photo unusable" in p.stderr, p.stderr
    assert "3 rows with problems" in p.stdout, p.stdout
    bad = {r["uniq_id"]: r["reason"] for r in csv.DictReader((d / "predict-bad.csv").open())}
    assert set(bad) == {"n2", "n4", "n5"} and "photo unusable" in bad["n5"]
    p = run("search", "--index", str(idx), "--text", "wrist watch", "-k", "3", "--json")
    hits = json.loads(p.stdout)
    assert len(hits) == 3 and hits[0]["category"] == "Watches"


def test_model_identity_not_spelling(tmp_path):
    """Two specs of one local model compare equal however they are spelled or wherever the
    copy lives; another model, or other weights, do not."""
    import shutil

    from indexer.encoders.registry import model_identity, same_model

    copy = tmp_path / "copy"
    shutil.copytree(TEXT_MODEL, copy / "minilm")
    shutil.copy(IMAGE_WEIGHTS, copy / "w.safetensors")
    assert same_model("text", str(TEXT_MODEL), str(copy / "minilm"))
    assert same_model("text", f"{TEXT_MODEL}+onnx-int8", f"{copy / 'minilm'}+onnx-int8")
    assert not same_model("text", str(TEXT_MODEL), f"{copy / 'minilm'}+onnx-int8")
    assert not same_model("text", f"{TEXT_MODEL}+onnx", f"{copy / 'minilm'}+openvino")
    assert same_model("image", f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}",
                      f"torchvision:mobilenet_v2@{copy / 'w.safetensors'}")
    assert not same_model("image", f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}",
                          f"torchvision:resnet18@{copy / 'w.safetensors'}")
    # hub ids as written; a path that does not exist here is only its spelling
    assert not same_model("text", "sentence-transformers/all-MiniLM-L6-v2", str(TEXT_MODEL))
    assert model_identity("text", "/nowhere/model") == "/nowhere/model"
    # another model's files: other weights, or a changed config
    (copy / "minilm" / "config.json").write_text(
        (copy / "minilm" / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert not same_model("text", str(TEXT_MODEL), str(copy / "minilm"))
    (copy / "w.safetensors").write_bytes(b"other")
    assert not same_model("image", f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}",
                          f"torchvision:mobilenet_v2@{copy / 'w.safetensors'}")


def test_other_model_refused(small_index):
    p = run("search", "--index", str(small_index), "--text", "watch", check=False,
            VITRINE_IMAGE_MODEL="torchvision:mobilenet_v2@random")
    assert p.returncode == 2
    assert "was built with image_model='torchvision:mobilenet_v2@/" in p.stderr
    assert "but 'torchvision:mobilenet_v2@random' is configured" in p.stderr
    assert "VITRINE_IMAGE_MODEL or --image-model" in p.stderr


def test_clear_errors(tmp_path, small_index):
    p = run("predict", str(tmp_path / "missing.csv"), "--index", str(tmp_path),
            "--output", str(tmp_path / "o.csv"), check=False)
    assert p.returncode == 2 and "no index snapshot" in p.stderr
    p = run("search", "--index", str(small_index), "--id", "nope", check=False)
    assert p.returncode == 2 and "unknown listing" in p.stderr
    p = run("index", "--catalog", str(tmp_path / "none.csv"), "--index", str(tmp_path / "i"),
            check=False)
    assert p.returncode == 2 and "not found" in p.stderr


def test_index_refuses_existing_index(tmp_path, small_csv):
    _, catalog, _ = small_csv
    idx = tmp_path / "index"
    run("index", "--catalog", str(catalog), "--index", str(idx), **LIGHT)
    snaps = sorted(p.name for p in idx.iterdir())
    p = run("index", "--catalog", str(catalog), "--index", str(idx), check=False, **LIGHT)
    assert p.returncode == 2 and "already holds an index" in p.stderr and "--force" in p.stderr
    assert sorted(p.name for p in idx.iterdir()) == snaps  # untouched
    run("index", "--catalog", str(catalog), "--index", str(idx), "--force", **LIGHT)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    p = run("index", "--catalog", str(catalog), "--index", str(tmp_path / "notes"),
            check=False, **LIGHT)
    assert p.returncode == 2 and "holds no vitrine index" in p.stderr


def _serve(data: Path, port: int, catalog: Path, log: Path) -> subprocess.Popen:
    from tests.support.service import wait_until

    proc = subprocess.Popen(
        [sys.executable, "-m", "vitrine.cli", "serve", "--port", str(port),
         "--catalog", str(catalog), "--data-dir", str(data)],
        env=offline_env(**LIGHT), stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(up, 120, every=0.2)
    return proc


@pytest.fixture(scope="module")
def server(small_csv, tmp_path_factory):
    """A running embedded `vitrine serve` (weight-free models) seeded with ``small_csv``."""
    from tests.support.service import free_port

    d = tmp_path_factory.mktemp("served")
    port = free_port()
    proc = _serve(d / "var", port, small_csv[1], d / "serve.log")
    yield d / "var", port
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_index_refuses_a_served_index(server, small_csv):
    data, _port = server
    served = sorted(p.name for p in (data / "index").iterdir())
    for target in (data / "index", data):
        p = run("index", "--catalog", str(small_csv[1]), "--index", str(target), "--force",
                check=False, **LIGHT)
        assert p.returncode == 2, p.stderr
        assert "belongs to a running `vitrine serve` (pid" in p.stderr
    assert sorted(p.name for p in (data / "index").iterdir()) == served
    # beside it is not the server's
    run("index", "--catalog", str(small_csv[1]), "--index", str(data / "my-index"), **LIGHT)


def test_serve_on_a_busy_port_fails_first(server, tmp_path):
    _data, port = server
    t0 = time.monotonic()
    # the real models: the port is checked before they load (seconds) and the store opens
    p = run("serve", "--port", str(port), "--data-dir", str(tmp_path / "var"), check=False,
            timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"vitrine: error: port {port} on 127.0.0.1 is already in use (another `vitrine "
        "serve`, `make demo`?): stop it, or pick another port with --port "
        "(`make demo PORT=...`)")
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "var").exists()  # nothing was opened


def test_search_asks_the_server(server, monkeypatch, capsys):
    _data, port = server
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    p = run("search", "--server", url, "--text", "analog wrist watch", "-k", "3", "--json")
    hits = json.loads(p.stdout)
    assert len(hits) == 3 and hits[0]["category"] == "Watches"
    assert f"searched the server at {url}" in p.stderr
    # without --index, the default server is asked (here pointed at the test's)
    from vitrine import cli
    from vitrine.commands import core

    monkeypatch.setattr(core, "DEFAULT_SERVER", url)
    assert cli.main(["search", "--text", "analog wrist watch", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "Watches" in lines[0]
    assert cli.main(["search", "--id", "nope"]) == 2
    assert "answered 404" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30  # no model loaded by the CLI
    # no server there: said at once
    from tests.support.service import free_port

    monkeypatch.setattr(core, "DEFAULT_SERVER", f"http://127.0.0.1:{free_port()}")
    assert cli.main(["search", "--text", "watch"]) == 2
    err = capsys.readouterr().err
    assert "no --index given and no vitrine server answers at" in err and "--index DIR" in err


def test_serve_offline_without_cached_model_fails_fast(tmp_path):
    """The hub default models, no cache and no hub: a clear error in seconds, not after a
    minute of retries."""
    from tests.support.service import free_port

    env = {k: v for k, v in offline_env().items()
           if k not in {"VITRINE_TEXT_MODEL", "VITRINE_IMAGE_MODEL", "HF_HUB_OFFLINE",
                        "TRANSFORMERS_OFFLINE"}}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "vitrine.cli", "serve", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "var")],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("vitrine: error: the text model 'sentence-transformers/"), last
    assert "is not in the local Hugging Face cache and the hub cannot be reached" in last
    assert "VITRINE_TEXT_MODEL" in last
    assert took < 60, took


def test_cached_hub_model_loads_offline_without_retries(tmp_path):
    """A hub id in the local cache, the hub unreachable: loaded from the cache at once (the
    hub's offline mode), not after the hub's retries."""
    from tests.support.service import free_port

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--vitrine-test--minilm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in TEXT_MODEL.rglob("*"):
        if f.is_file():
            (snap / f.relative_to(TEXT_MODEL)).parent.mkdir(parents=True, exist_ok=True)
            (snap / f.relative_to(TEXT_MODEL)).symlink_to(f)
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE"}}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    p = subprocess.run(
        [sys.executable, "-c",
         "from indexer.encoders.registry import hub_offline, load_encoder\n"
         "enc = load_encoder('text', 'vitrine-test/minilm')\n"
         "print(enc.dim, hub_offline())"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["384", "True"]
    assert "Retrying" not in p.stderr, p.stderr
