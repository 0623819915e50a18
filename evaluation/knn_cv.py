"""Cross-validated kNN: plain cosine kNN per feature set, and vitrine's late-fusion vote."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from indexer.catalog import Listing
from indexer.encoders.registry import ModelRegistry
from indexer.knn import Vote
from indexer.pipeline import Embedded, Vitrine, lexical_text
from indexer.settings import Settings


def cosine_knn_cv(x: np.ndarray, y: np.ndarray, *, k: int = 10, folds: int = 5,
                  seed: int = 0) -> dict[str, float]:
    """Out-of-fold accuracy and macro-F1 of a distance-weighted cosine kNN."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold

    pred = np.empty(len(y), dtype=object)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        sims = x[te] @ x[tr].T
        kk = min(k, len(tr))
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        for r, i in enumerate(te):
            scores: dict[str, float] = {}
            for j in top[r]:
                scores[y[tr][j]] = scores.get(y[tr][j], 0.0) + float(np.exp(sims[r, j] / 0.1))
            pred[i] = max(scores, key=scores.__getitem__)
    p = pred.astype(str)
    return {"knn_accuracy": float(accuracy_score(y, p)),
            "knn_macro_f1": float(f1_score(y, p, average="macro"))}


def title_only(listings: Sequence[Listing]) -> list[Listing]:
    """Copies of ``listings`` with their title only: no description, no photo, no label."""
    return [Listing(id=x.id, title=x.title) for x in listings]


def path_vote_cv(
    listings: Sequence[Listing], emb: Embedded, title_emb: Embedded, settings: Settings,
    registry: ModelRegistry, *, folds: int = 5, seed: int = 0,
) -> dict[str, list[Vote]]:
    """Out-of-fold votes (first level, path, calibrated confidence, uncertainty) of every
    listing, queried whole (``"full"``) and by its title only (``"title"``), against an
    index of the training folds that fitted its own lexical view, centring and calibration.

    ``emb``: the text and image vectors of ``listings``; ``title_emb``: the text vectors of
    their titles alone.
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.array([x.category for x in listings])
    out: dict[str, list[Vote | None]] = {"full": [None] * len(y), "title": [None] * len(y)}
    titles = title_only(listings)
    n = len(listings)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(y, y):
        v = Vitrine(settings, registry)
        v.fit_lexical([listings[i] for i in tr])
        queries = {"full": Embedded(dict(emb.vectors), dict(emb.present)),
                   "title": Embedded({k: a for k, a in title_emb.vectors.items() if k == "text"},
                                     {k: a for k, a in title_emb.present.items() if k == "text"})}
        if v.lexical is not None:
            queries["full"].vectors["lexical"] = v.lexical.encode(
                [lexical_text(x) for x in listings])
            queries["full"].present["lexical"] = np.array(
                [bool(x.title or x.description) for x in listings])
            queries["title"].vectors["lexical"] = v.lexical.encode(
                [lexical_text(x) for x in titles])
            queries["title"].present["lexical"] = np.array([bool(x.title) for x in titles])
        full = queries["full"]
        v.build_from_embedded([listings[i] for i in tr],
                              Embedded({k: a[tr] for k, a in full.vectors.items()},
                                       {k: a[tr] for k, a in full.present.items()}))
        assert v.fusion is not None
        for mode, q in queries.items():
            vectors = {k: q.vectors[k][te] if k in q.vectors
                       else np.zeros((len(te), full.vectors[k].shape[1]), np.float32)
                       for k in v.fusion.names}
            present = {k: q.present[k][te] if k in q.present else np.zeros(len(te), bool)
                       for k in v.fusion.names}
            fused = v.fusion.fuse(vectors, present)
            for r, i in enumerate(te):
                out[mode][i] = v.vote_vector(fused[r], exclude=listings[i].id)
    assert n == len(y)
    return {mode: [x for x in votes if x is not None] for mode, votes in out.items()}
