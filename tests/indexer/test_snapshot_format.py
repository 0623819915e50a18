"""Index snapshots hold their fitted state as data (JSON + ``.npz``), never as a pickle.

Loading one runs no code from the snapshot folder; a tampered, truncated or foreign file, an
old pickled snapshot and a scikit-learn of another MAJOR.MINOR each get a clear
:class:`IndexMismatch` that says to rebuild.
"""

import json
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sklearn

from indexer.encoders.base import l2_normalize
from indexer.encoders.text import TfidfEncoder
from indexer.errors import IndexMismatch
from indexer.index import current_snapshot
from indexer.pipeline import SNAPSHOT_FORMAT, Vitrine, lexical_text

FILES = {"manifest.json", "fusion.json", "fusion.npz", "lexical.json", "lexical.npz",
         "calibration.json", "calibration.npz",
         "base.faiss", "delta.npy", "alive.npy", "labelled.npy", "category.npy",
         "ids.bin", "ids.npy", "payloads.bin", "payloads.npy", "lookup_keys.npy",
         "lookup_slots.npy", "index.json"}


class _Payload:
    """Unpickling it creates ``path``: proof that a pickle was run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.makedirs, (str(self.path),))


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """A snapshot of ``built``, read-only: tests tamper with copies."""
    root = tmp_path_factory.mktemp("snapshot") / "index"
    built.save(root)
    return root


@pytest.fixture()
def root(saved, tmp_path):
    dst = tmp_path / "index"
    shutil.copytree(saved, dst)
    return dst


def snap_of(root: Path) -> Path:
    snap = current_snapshot(root)
    assert snap is not None
    return snap


def edit_json(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_lexical_view_round_trips_as_data_to_the_same_vectors(catalog):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import Pipeline

    texts = [lexical_text(x) for x in catalog]
    enc = TfidfEncoder(dim=64).fit(texts)
    meta, arrays = enc.to_state()
    meta = json.loads(json.dumps(meta))  # what the snapshot stores is plain JSON
    assert meta["vectorizer"]["stop_words"] and meta["vectorizer"]["ngram_range"] == [1, 2]
    assert all(a.dtype.kind == "f" for a in arrays.values())
    back = TfidfEncoder.from_state(meta, arrays)
    assert back.dim == enc.dim == 64
    np.testing.assert_array_equal(back.encode(texts), enc.encode(texts))
    # and the same as the fitted scikit-learn pipeline that the old snapshots pickled
    vec = TfidfVectorizer(sublinear_tf=True, stop_words="english", ngram_range=(1, 2), min_df=2)
    x = vec.fit_transform(texts)
    svd = TruncatedSVD(n_components=64, random_state=0).fit(x)
    ref = l2_normalize(Pipeline([("tfidf", vec), ("svd", svd)]).transform(texts))
    np.testing.assert_allclose(back.encode(texts), ref, atol=1e-6)
    # an unfitted encoder stays unfitted
    assert not TfidfEncoder.from_state(*TfidfEncoder(dim=8).to_state()).fitted


def test_save_load_gives_the_same_fusion_lexical_view_and_answers(built, root, settings,
                                                                  registry, small_catalog):
    back = Vitrine.load(root, settings, registry)
    assert back.fusion.describe() == built.fusion.describe()
    for a, b in zip(back.fusion.blocks, built.fusion.blocks, strict=True):
        np.testing.assert_array_equal(a.mean, b.mean)
    texts = [lexical_text(x) for x in small_catalog]
    np.testing.assert_array_equal(back.lexical.encode(texts), built.lexical.encode(texts))
    assert back.search(text="analog wrist watch", k=5) == built.search(
        text="analog wrist watch", k=5)


def test_a_snapshot_holds_no_pickle(root):
    snap = snap_of(root)
    assert {p.name for p in snap.iterdir()} == FILES
    for p in snap.iterdir():
        assert not p.read_bytes().startswith(b"\x80"), f"{p.name} looks like a pickle"
        if p.suffix == ".npz":
            with zipfile.ZipFile(p) as z:
                for member in z.namelist():
                    assert z.read(member).startswith(b"\x93NUMPY")
            with np.load(p, allow_pickle=False) as arrays:  # would raise on object arrays
                assert all(arrays[k].dtype.kind == "f" for k in arrays.files)
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["format"] == SNAPSHOT_FORMAT
    assert manifest["libraries"]["scikit-learn"] == sklearn.__version__
    assert {"numpy", "faiss", "torch"} <= set(manifest["libraries"])
    assert json.loads((snap / "fusion.json").read_text())["blocks"][1]["name"] == "lexical"


def _garbage(snap: Path, marker: Path) -> None:
    (snap / "lexical.npz").write_bytes(b"this is not an npz at all" * 10)


def _truncated(snap: Path, marker: Path) -> None:
    data = (snap / "lexical.npz").read_bytes()
    (snap / "lexical.npz").write_bytes(data[: len(data) // 2])


def _a_pickle_instead(snap: Path, marker: Path) -> None:
    (snap / "fusion.npz").write_bytes(pickle.dumps(_Payload(marker)))


def _object_array(snap: Path, marker: Path) -> None:
    with (snap / "fusion.npz").open("wb") as f:
        np.savez(f, mean_text=np.array([_Payload(marker)], dtype=object))


def _wrong_shape(snap: Path, marker: Path) -> None:
    with np.load(snap / "lexical.npz") as z:
        idf, comp = z["idf"], z["components"]
    with (snap / "lexical.npz").open("wb") as f:
        np.savez(f, idf=idf, components=comp[:, :-1])


def _file_input(snap: Path, marker: Path) -> None:
    # "filename" would make the vectorizer open a file named by each query text
    edit_json(snap / "lexical.json", lambda d: d["vectorizer"].update(input="filename"))


def _bad_json(snap: Path, marker: Path) -> None:
    (snap / "fusion.json").write_text('{"blocks": [')


def _bad_block(snap: Path, marker: Path) -> None:
    edit_json(snap / "fusion.json", lambda d: d["blocks"][0].update(dim="384"))


def _pickled_npy(snap: Path, marker: Path) -> None:
    np.save(snap / "delta.npy", np.array([_Payload(marker)], dtype=object))


def _garbage_faiss(snap: Path, marker: Path) -> None:
    (snap / "base.faiss").write_bytes(b"half written")


def _no_lexical_view(snap: Path, marker: Path) -> None:
    (snap / "lexical.json").write_text("null")


@pytest.mark.parametrize("tamper, says", [
    (_garbage, "lexical.npz is not a valid array file"),
    (_truncated, "lexical.npz is not a valid array file"),
    (_a_pickle_instead, "fusion.npz is not a valid array file"),
    (_object_array, "fusion.npz is not a valid array file"),
    (_wrong_shape, "components of float64"),
    (_file_input, "input='filename'"),
    (_bad_json, "fusion.json cannot be read"),
    (_bad_block, "bad dim"),
    (_no_lexical_view, "lexical block but no fitted lexical view"),
    (_pickled_npy, "index files of snapshot .* cannot be read"),
    (_garbage_faiss, "index files of snapshot .* cannot be read"),
], ids=lambda p: getattr(p, "__name__", "")[1:] or None)
def test_a_tampered_snapshot_is_a_clear_error_and_runs_nothing(root, tmp_path, settings,
                                                               registry, tamper, says):
    marker = tmp_path / "pwned"
    tamper(snap_of(root), marker)
    with pytest.raises(IndexMismatch, match=says) as e:
        Vitrine.load(root, settings, registry)
    assert "vitrine index" in str(e.value)
    assert not marker.exists()


def test_another_scikit_learn_minor_is_refused_naming_both_versions(root, settings, registry):
    snap = snap_of(root)
    edit_json(snap / "manifest.json",
              lambda d: d["libraries"].update({"scikit-learn": "0.24.2"}))
    with pytest.raises(IndexMismatch) as e:
        Vitrine.load(root, settings, registry)
    msg = str(e.value)
    assert "scikit-learn 0.24.2" in msg and f"scikit-learn {sklearn.__version__}" in msg
    assert "vitrine index" in msg


def test_a_patch_release_loads_other_libraries_only_warn(root, settings, registry, caplog):
    snap = snap_of(root)
    major, minor = sklearn.__version__.split(".")[:2]
    edit_json(snap / "manifest.json", lambda d: d["libraries"].update(
        {"scikit-learn": f"{major}.{minor}.999", "torch": "0.1.0"}))
    with caplog.at_level(logging.WARNING, logger="indexer.pipeline"):
        back = Vitrine.load(root, settings, registry)
    assert back.lexical is not None and back.lexical.fitted
    assert "torch 0.1.0" in caplog.text


def test_missing_library_versions_are_refused(root, settings, registry):
    edit_json(snap_of(root) / "manifest.json", lambda d: d.pop("libraries"))
    with pytest.raises(IndexMismatch, match="records no library versions"):
        Vitrine.load(root, settings, registry)


def test_a_changed_tokenisation_is_refused(root, settings, registry):
    edit_json(snap_of(root) / "lexical.json",
              lambda d: d["probe"].update(tokens=d["probe"]["tokens"][1:]))
    with pytest.raises(IndexMismatch, match="tokenises text differently"):
        Vitrine.load(root, settings, registry)


def test_an_old_pickled_snapshot_is_refused_without_unpickling(root, tmp_path, settings,
                                                               registry):
    snap = snap_of(root)
    marker = tmp_path / "pwned"
    for name in ("fusion.json", "fusion.npz", "lexical.json", "lexical.npz"):
        (snap / name).unlink()
    (snap / "fusion.pkl").write_bytes(pickle.dumps({"fusion": _Payload(marker)}))
    edit_json(snap / "manifest.json", lambda d: (d.update(format=1), d.pop("libraries")))
    with pytest.raises(IndexMismatch, match=r"old snapshot .*fusion\.pkl.*vitrine index"):
        Vitrine.load(root, settings, registry)
    assert not marker.exists()


def test_a_newer_format_is_refused(root, settings, registry):
    edit_json(snap_of(root) / "manifest.json", lambda d: d.update(format=SNAPSHOT_FORMAT + 1))
    with pytest.raises(IndexMismatch, match="snapshot format"):
        Vitrine.load(root, settings, registry)


def test_an_index_moves_to_where_its_models_live_at_another_path(root, settings, registry):
    """The manifest records what the model specs name (local models by content): an index
    built where the models were at one path loads where the same models are at another."""
    snap = snap_of(root)
    elsewhere = "/nonexistent/checkout/shared/models/all-MiniLM-L6-v2"
    edit_json(snap / "manifest.json", lambda d: d.update(text_model=elsewhere))
    Vitrine.load(root, settings, registry)  # the configured path has the same contents
    edit_json(snap / "manifest.json", lambda d: d["model_identity"].update(text_model="other"))
    with pytest.raises(IndexMismatch, match="text_model"):
        Vitrine.load(root, settings, registry)
