"""Encoder backends (``+onnx``, ``+onnx-int8``, ``+openvino``): fidelity to PyTorch on the
offline models, the export path of the hub architectures with random weights, the export
cache, lanes, and the errors a wrong spec gets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from indexer.catalog import read_listings
from indexer.encoders.backends import BACKENDS, split_backend
from indexer.encoders.image import load_image_encoder
from indexer.encoders.registry import ModelRegistry, load_encoder, load_text_encoder
from indexer.errors import ModelSpecError
from indexer.images import decode_image, read_image_bytes
from indexer.pipeline import Vitrine, semantic_text
from tests.support.offline import CSV, IMAGE_WEIGHTS, ROOT, TEXT_MODEL, offline_settings

IMAGE_SPEC = f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):  # type: ignore[no-untyped-def]
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def sample():  # type: ignore[no-untyped-def]
    """60 catalog listings: their texts and decoded photos."""
    listings, _ = read_listings(CSV)
    rows = listings[::17][:60]
    texts = [semantic_text(x) for x in rows]
    photos = [decode_image(read_image_bytes(x.image)) for x in rows if x.image]
    return texts, photos


@pytest.fixture(scope="module")
def eager(sample):  # type: ignore[no-untyped-def]
    texts, photos = sample
    return (load_encoder("text", str(TEXT_MODEL)).encode(texts),
            load_encoder("image", IMAGE_SPEC).encode(photos))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offline_models_are_faithful_on_every_backend(backend, exports, sample, eager):
    """The vectors of a backend are those of PyTorch eager fp32, within the bar the defaults
    are chosen by (cosine >= 0.99 on average; `vitrine bench encoders` measures it on the
    whole catalog), and still unit length."""
    texts, photos = sample
    text = load_encoder("text", f"{TEXT_MODEL}+{backend}", export_root=exports, threads=2)
    image = load_encoder("image", f"{IMAGE_SPEC}+{backend}", export_root=exports, threads=2)
    assert text.spec.endswith(f"+{backend}") and text.dim == 384 and image.dim == 1280
    for enc, items, ref in ((text, texts, eager[0]), (image, photos, eager[1])):
        got = enc.encode(items)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
        cos = cosines(got, ref)
        assert cos.mean() >= 0.99 and cos.min() >= 0.97, (backend, cos.mean(), cos.min())
        if backend == "onnx":  # fp32 on ONNX Runtime: the same numbers, up to rounding
            assert cos.min() > 0.9999
    if backend == "onnx-int8":  # quantized: close, not equal (it is a different model)
        assert cosines(text.encode(texts), eager[0]).min() < 0.9999


def test_export_is_cached_and_made_once_across_processes(tmp_path):
    """Two processes loading the same backend spec at once: one exports, the other waits and
    reuses the folder; a later load reuses it too (nothing exported again)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from pathlib import Path; from indexer.encoders.registry import load_encoder;"
            "e = load_encoder('text', sys.argv[2], export_root=Path(sys.argv[3]));"
            "print(e.encode(['a watch']).shape)")
    spec = f"{TEXT_MODEL}+onnx"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), spec, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all("(1, 384)" in o[0] for o in outs)
    folders = [d for d in tmp_path.iterdir() if not d.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "DONE").exists()
    assert not [d for d in tmp_path.iterdir() if d.is_dir() and d.name.startswith(".")]
    made = (folders[0] / "DONE").stat().st_mtime_ns
    load_encoder("text", spec, export_root=tmp_path)
    assert (folders[0] / "DONE").stat().st_mtime_ns == made
    assert [d for d in tmp_path.iterdir() if not d.name.startswith(".")] == folders


@pytest.mark.parametrize("spec, dim, backend", [
    ("open_clip:ViT-B-32@random", 512, "onnx-int8"),
    ("timm:legacy_xception@random", 2048, "openvino"),
])
def test_hub_image_architectures_export_with_random_weights(spec, dim, backend, exports):
    """The hub defaults' photo architectures go through the same export path (random weights
    from a fixed seed: the eager model and the export have the same ones)."""
    photos = [Image.new("RGB", (300, 200), (i * 40, 90, 200)) for i in range(3)]
    ref = load_image_encoder(spec, batch_size=2).encode(photos)
    got = load_image_encoder(f"{spec}+{backend}", batch_size=2, export_root=exports,
                             threads=2).encode(photos)
    assert got.shape == (3, dim)
    assert cosines(got, ref).min() > 0.99


def test_hub_text_architecture_exports(tmp_path, exports):
    """A sentence-transformers model of MPNet's architecture (random, tiny) exports and runs
    on ONNX Runtime with the vectors PyTorch gives it: the path all-mpnet-base-v2 takes."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    raw = tmp_path / "raw"
    MPNetModel(MPNetConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128)).save_pretrained(raw)
    AutoTokenizer.from_pretrained(str(TEXT_MODEL)).save_pretrained(raw)
    SentenceTransformer(modules=[models.Transformer(str(raw)), models.Pooling(64),
                                 models.Normalize()]).save(str(tmp_path / "st"))
    texts = ["a watch", "cotton door curtain for the living room, set of two", "mug"]
    ref = load_text_encoder(str(tmp_path / "st")).encode(texts)
    got = load_text_encoder(f"{tmp_path / 'st'}+onnx", export_root=exports).encode(texts)
    assert got.shape == (3, 64)
    assert cosines(got, ref).min() > 0.9999


def test_lanes_give_the_serial_vectors(exports):
    """A batch split over lanes (sharing the lane runner, each run on its lane's thread)
    gives each listing the vector the single-query path gives it."""
    listings, _ = read_listings(CSV)
    rows = listings[:48]
    s = offline_settings(text_model=f"{TEXT_MODEL}+onnx", image_model=f"{IMAGE_SPEC}+onnx",
                         lexical=False, batch_size=4, encode_lanes=2, export_dir=exports)
    v = Vitrine(s, ModelRegistry(s))
    assert v.encode_lanes(len(rows)) == 2
    lanes = v.embed(rows)
    serial = v._embed_serial(rows)
    for kind in ("text", "image"):
        np.testing.assert_allclose(lanes.vectors[kind], serial.vectors[kind], atol=1e-5)


def test_spec_errors_are_clear(monkeypatch):
    with pytest.raises(ModelSpecError, match=r"\+onnx-int8"):
        split_backend(f"{TEXT_MODEL}+int8")
    assert split_backend("/models/a+b") == ("/models/a+b", "torch")  # a '+' in a path stays
    assert split_backend(f"{IMAGE_SPEC}+OpenVINO") == (IMAGE_SPEC, "openvino")

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ModelSpecError, match=r"needs openvino.*pip install"):
        load_encoder("image", f"{IMAGE_SPEC}+openvino")


def test_an_index_records_the_backend(tmp_path, exports):
    """Vectors of two backends do not mix: an index built with `+onnx-int8` text refuses to
    load with the PyTorch spec of the same model."""
    from indexer.errors import IndexMismatch

    listings, _ = read_listings(CSV)
    s = offline_settings(text_model=f"{TEXT_MODEL}+onnx-int8", image_model="none",
                         export_dir=exports)
    v = Vitrine(s, ModelRegistry(s))
    v.build(listings[:40])
    v.save(tmp_path / "index")
    assert Vitrine.load(tmp_path / "index", s).manifest()["text_model"].endswith("+onnx-int8")
    plain = offline_settings(text_model=str(TEXT_MODEL), image_model="none")
    with pytest.raises(IndexMismatch, match="text_model"):
        Vitrine.load(tmp_path / "index", plain)
