import numpy as np

from indexer.knn import modality_votes, vote


def unit(*v):
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def test_similarity_weighted_vote_prefers_close_neighbours():
    q = unit(1, 0)
    cands = np.stack([unit(1, 0.05), unit(0, 1), unit(0.1, 1), unit(0.2, 1)])
    labels = ["A", "B", "B", "B"]
    # three far B's lose to one very close A under a sharp softmax
    assert max(modality_votes(q, cands, labels, 4, 0.05).items(), key=lambda t: t[1])[0] == "A"
    # with a very flat softmax the majority wins
    flat = modality_votes(q, cands, labels, 4, 100.0)
    assert flat["B"] > flat["A"]


def test_late_fusion_confidence_and_uncertain_flag():
    q = {"text": unit(1, 0), "image": unit(0, 1)}
    cands = {
        "text": np.stack([unit(1, 0), unit(-1, 0)]),
        "image": np.stack([unit(1, 0), unit(0, 1)]),
    }
    labels = ["A", "B"]
    cat, conf, unc, scores = vote(q, cands, labels, {"text": 1.0, "image": 1.0}, k=1,
                                  uncertain_below=0.6)
    # text says A, image says B, equal weights: a tie flagged uncertain
    assert conf == 0.5 and unc and set(scores) == {"A", "B"}
    cat, conf, unc, _ = vote(q, cands, labels, {"text": 1.0, "image": 0.25}, k=1)
    assert cat == "A" and conf == 0.8 and not unc
    assert abs(sum(scores.values()) - 1) < 1e-9


def test_missing_modality_does_not_vote():
    q = {"text": unit(1, 0), "image": np.zeros(2, np.float32)}
    cands = {"text": np.stack([unit(1, 0)]), "image": np.stack([unit(0, 1)])}
    cat, conf, _, _ = vote(q, cands, ["A"], {"text": 1.0, "image": 5.0}, k=3)
    assert cat == "A" and conf == 1.0
    # no neighbours at all
    assert vote(q, {"text": np.zeros((0, 2)), "image": np.zeros((0, 2))}, [],
                {"text": 1.0})[0] is None


def test_vote_shares_sum_like_the_modality_votes():
    from indexer.knn import candidate_weights, vote_shares

    rng = np.random.default_rng(0)
    cands = {m: rng.normal(size=(30, 8)) for m in ("text", "image")}
    cands = {m: c / np.linalg.norm(c, axis=1, keepdims=True) for m, c in cands.items()}
    q = {m: unit(*rng.normal(size=8)) for m in ("text", "image")}
    labels = [f"c{i % 4}" for i in range(30)]
    w = {"text": 1.0, "image": 0.5}
    shares = candidate_weights(q, cands, w, k=7, temperature=0.1)
    assert abs(shares.sum() - 1) < 1e-9 and (shares > 0).sum() <= 14
    by_modality = {c: sum(w[m] * modality_votes(q[m], cands[m], labels, 7, 0.1).get(c, 0.0)
                          for m in w) / 1.5 for c in set(labels)}
    _, _, _, scores = vote_shares(shares, labels)
    assert all(abs(scores.get(c, 0.0) - p) < 1e-9 for c, p in by_modality.items())


def test_path_goes_as_deep_as_the_neighbours_agree():
    from indexer.knn import path_vote

    paths = [("A", "x", "1"), ("A", "x", "1"), ("A", "x", "2"), ("A", "y"), ("B", "z")]
    shares = np.array([0.3, 0.2, 0.2, 0.1, 0.2])
    below, conf, stopped = path_vote(shares, paths, "A")
    # level 2 among the A's: x 0.7 of 0.8; level 3 among the A>x's: 1 with 0.5 of 0.7;
    # then the two "A>x>1" paths end there
    assert below == ["x", "1"] and stopped == "leaf"
    assert np.allclose(conf, [0.7 / 0.8, 0.5 / 0.7])
    # no majority at level 3 under a stricter rule: the path stops at level 2
    below, _, stopped = path_vote(shares, paths, "A", min_share=0.75)
    assert below == ["x"] and stopped == "disagreement"
    # a path's end is a vote too: most A neighbours stop at "A > y"
    below, _, stopped = path_vote(np.array([0.1, 0.0, 0.0, 0.6, 0.3]), paths, "A")
    assert below == ["y"] and stopped == "leaf"


def test_one_level_labels_abstain_below_their_level():
    from indexer.knn import path_vote

    # sellers' one-level labels do not say the path ends at the first level
    paths = [("A",), ("A",), ("A", "x", "1")]
    below, conf, stopped = path_vote(np.array([0.45, 0.45, 0.1]), paths, "A")
    assert below == ["x", "1"] and conf == [1.0, 1.0] and stopped == "leaf"
    assert path_vote(np.array([0.5, 0.5, 0.0]), paths, "A") == ([], [], "unknown_below")


def test_taxonomy_path_drops_the_listings_own_levels():
    from indexer.catalog import taxonomy_path

    assert taxonomy_path(("Watches", "Wrist Watches", "Titan Wrist Watches"),
                         "Titan 1639SL03 Analog Watch") == ("Watches", "Wrist Watches")
    # "Wrist Watches" ends with its parent's name but is no brand: the title starts otherwise
    assert taxonomy_path(("Watches", "Wrist Watches"), "Titan watch") == (
        "Watches", "Wrist Watches")
    assert taxonomy_path(("Home Furnishing", "Living", "Sofa Covers",
                          "Balaji Velvet Sofa Cover (Brown Pack of 6)"),
                         "Balaji Velvet Sofa Cover") == ("Home Furnishing", "Living",
                                                         "Sofa Covers")
    # a product name cut by the catalog ("...") is the product's too
    assert taxonomy_path(("Baby Care", "Baby Bedding", "Baby Bedsheets",
                          "Mahadev Handicrafts Cotton Cartoon Double Bedshe..."),
                         "Mahadev Handicrafts Cotton Cartoon Double Bedsheet") == (
        "Baby Care", "Baby Bedding", "Baby Bedsheets")


def test_calibration_curve_and_reliability():
    from indexer.calibration import Calibration, reliability

    rng = np.random.default_rng(1)
    raw = rng.uniform(0.3, 1.0, 2000)
    # an over-confident vote: right with probability raw**2
    right = rng.uniform(size=2000) < raw**2
    cal = Calibration.fit(raw.tolist(), right.tolist(), {"A": [0.5] * 30, "B": [0.9] * 5},
                          0.05)
    fitted = [cal.confidence(float(r)) for r in raw]
    ece_raw, _ = reliability(raw, right)
    ece_cal, curve = reliability(fitted, right)
    assert ece_raw > 0.1 and ece_cal < 0.03 and sum(b["count"] for b in curve) == 2000
    assert abs(cal.confidence(0.9) - 0.81) < 0.06
    # B has too few references for its own quantile: the pooled one
    assert cal.threshold("A") == 0.5 and cal.threshold("B") == cal.pooled_threshold
    again = Calibration.from_state(*cal.to_state())
    assert again.confidence(0.77) == cal.confidence(0.77) and again.thresholds == {"A": 0.5}


def test_duplicate_threshold_is_a_high_quantile_stored_as_data():
    from indexer.calibration import Calibration

    closest = np.linspace(0.5, 1.0, 101).tolist()  # nearest-other similarities, 0.005 apart
    cal = Calibration.fit([0.9] * 40, [True] * 40, {}, 0.05, closest, 0.99)
    assert cal.duplicate_threshold is not None and abs(cal.duplicate_threshold - 0.995) < 1e-9
    meta, arrays = cal.to_state()
    assert Calibration.from_state(meta, arrays).duplicate_threshold == cal.duplicate_threshold
    # switched off, or too few listings to measure: no threshold (only the same photo counts)
    assert Calibration.fit([], [], {}, 0.05, closest, 0.0).duplicate_threshold is None
    assert Calibration.fit([], [], {}, 0.05, closest[:10], 0.99).duplicate_threshold is None
    # a snapshot written before the threshold existed reads as none
    old = {k: v for k, v in meta.items() if not k.startswith("duplicate")}
    assert Calibration.from_state(old, arrays).duplicate_threshold is None
