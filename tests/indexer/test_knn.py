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
