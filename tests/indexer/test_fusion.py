import numpy as np

from indexer.fusion import Block, Fusion


def test_missing_modality_is_a_zero_block_and_scores_are_weighted_mean_cosines():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(4, 3)).astype(np.float32)
    image = rng.normal(size=(4, 2)).astype(np.float32)
    present = {"text": np.array([1, 1, 1, 1], bool), "image": np.array([1, 1, 0, 1], bool)}
    f = Fusion([Block("text", 3, 1.0), Block("image", 2, 0.5)])
    f.fit({"text": text, "image": image}, present)
    fused = f.fuse({"text": text, "image": image}, present)
    assert fused.shape == (4, 5)
    assert not fused[2, 3:].any()  # no photo -> zero image block
    blocks = f.split(fused)
    np.testing.assert_allclose(np.linalg.norm(blocks["text"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(blocks["image"][[0, 1, 3]], axis=1), 1, atol=1e-5)
    norms = f.query_norm(fused)
    np.testing.assert_allclose(norms, [1.25, 1.25, 1.0, 1.25])
    # a photo-less listing is compared on text alone
    s = fused[2] @ fused[0] / norms[2]
    np.testing.assert_allclose(s, blocks["text"][2] @ blocks["text"][0], atol=1e-5)


def test_centring_removes_the_shared_component():
    rng = np.random.default_rng(1)
    shared = np.full(8, 5.0, np.float32)
    x = shared + rng.normal(size=(50, 8)).astype(np.float32)
    present = {"image": np.ones(50, bool)}
    raw = Fusion([Block("image", 8, 1.0)]).fuse({"image": x}, present)
    centred = Fusion([Block("image", 8, 1.0)]).fit({"image": x}, present).fuse(
        {"image": x}, present)
    # raw vectors all look alike (cosine ~1); centred ones are spread around 0
    assert (raw @ raw.T).mean() > 0.9
    assert abs((centred @ centred.T)[~np.eye(50, dtype=bool)].mean()) < 0.1


def test_state_round_trips_as_data_and_malformed_state_is_refused():
    import json

    import pytest

    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    present = {"text": np.ones(10, bool), "image": np.zeros(10, bool)}
    f = Fusion([Block("text", 3, 1.0), Block("image", 2, 0.5)])
    f.fit({"text": x, "image": np.zeros((10, 2), np.float32)}, present)
    meta, arrays = f.to_state()
    assert set(arrays) == {"mean_text"}  # no photo: the image block is not centred
    back = Fusion.from_state(json.loads(json.dumps(meta)), arrays)
    assert back.describe() == f.describe() and back.blocks[1].mean is None
    np.testing.assert_array_equal(back.blocks[0].mean, f.blocks[0].mean)
    np.testing.assert_array_equal(back.fuse({"text": x, "image": x[:, :2]}, present),
                                  f.fuse({"text": x, "image": x[:, :2]}, present))
    bad = [
        ({"blocks": []}, arrays),
        ({"blocks": [{"name": "text", "dim": 3, "weight": 1.0, "centred": True}]}, {}),
        ({"blocks": [{"name": "text", "dim": 4, "weight": 1.0, "centred": True}]}, arrays),
        ({"blocks": [{"name": "text", "dim": True, "weight": 1.0}]}, {}),
        ({"blocks": [{"name": "a b", "dim": 3, "weight": 1.0}]}, {}),
        ({"blocks": [{"name": "text", "dim": 3, "weight": "1"}]}, {}),
        ({"blocks": [{"name": "t", "dim": 3, "weight": 1.0}] * 2}, {}),
        ({"blocks": [{"name": "text", "dim": 3, "weight": 1.0, "centred": True}]},
         {"mean_text": np.array([1, 2, 3])}),
    ]
    for m, a in bad:
        with pytest.raises(ValueError):
            Fusion.from_state(m, a)


def test_per_query_factors_weigh_each_modality_and_centroids_stay_unit_blocks():
    rng = np.random.default_rng(2)
    text = rng.normal(size=(3, 3)).astype(np.float32)
    image = rng.normal(size=(3, 2)).astype(np.float32)
    present = {"text": np.ones(3, bool), "image": np.array([1, 1, 0], bool)}
    f = Fusion([Block("text", 3, 1.0), Block("image", 2, 0.5)])
    fused = f.fuse({"text": text, "image": image}, present)
    blocks = f.split(fused)
    cos_t = blocks["text"][0] @ blocks["text"][1]
    cos_i = blocks["image"][0] @ blocks["image"][1]
    for factors in ({"text": 2.0, "image": 1.0}, {"text": 1.0, "image": 0.0}):
        q = f.reweight(fused[:1], factors)
        s = float(q[0] @ fused[1] / f.query_norm(fused[:1], factors)[0])
        ft, fi = factors["text"], factors["image"]
        want = (ft * 1.0 * cos_t + fi * 0.25 * cos_i) / (ft * 1.0 + fi * 0.25)
        np.testing.assert_allclose(s, want, atol=1e-5)
    np.testing.assert_array_equal(f.reweight(fused, {}), fused)  # no factor: unchanged
    # a centroid: per block the normalised mean of the rows that have it, weighted
    c = f.split(f.centroid(fused))
    mean_t = blocks["text"].mean(axis=0)
    np.testing.assert_allclose(c["text"][0], mean_t / np.linalg.norm(mean_t), atol=1e-5)
    mean_i = blocks["image"][:2].mean(axis=0)  # the third row has no photo: not averaged in
    np.testing.assert_allclose(c["image"][0], mean_i / np.linalg.norm(mean_i), atol=1e-5)
    np.testing.assert_allclose(f.centroid(fused[:1]), fused[:1], atol=1e-6)  # one row: itself
