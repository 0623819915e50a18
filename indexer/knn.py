"""kNN voting: a category from the labelled neighbours, with a confidence and an explanation.

Pure functions over numpy arrays. Voting is done **per modality** and the per-modality
votes are mixed with the fusion weights ("late fusion"): each modality ranks the candidate
pool on its own similarity, its top ``k`` vote with softmax weights
``exp((s - s_max) / temperature)``, and each modality's vote sums to 1. A modality the query
lacks (no photo) does not vote. Compared to voting once on the concatenated vector, this
keeps a strong modality from being drowned by a weaker one whose similarities happen to be
spread wider, and measured on the study's dataset it is the better method (README).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Neighbour:
    id: str
    score: float
    category: str | None
    title: str = ""


@dataclass(frozen=True)
class Vote:
    """Outcome of a vote. ``category`` is None when no labelled neighbour was found."""

    category: str | None
    confidence: float
    uncertain: bool
    scores: dict[str, float] = field(default_factory=dict)
    neighbours: list[Neighbour] = field(default_factory=list)


def modality_votes(
    query: np.ndarray,
    candidates: np.ndarray,
    labels: list[str],
    k: int,
    temperature: float,
) -> dict[str, float]:
    """One modality's vote: softmax-weighted top-``k`` over unit (or zero) vectors.

    Candidates without this modality (zero rows) are skipped. Returns ``{}`` when the query
    has no vector for this modality or no candidate has one.
    """
    if not np.any(query):
        return {}
    has = np.abs(candidates).sum(axis=1) > 0
    if not has.any():
        return {}
    idx = np.flatnonzero(has)
    sims = candidates[idx] @ query
    top = np.argsort(-sims, kind="stable")[:k]
    s = sims[top]
    w = np.exp((s - s.max()) / max(temperature, 1e-6))
    w /= w.sum()
    out: dict[str, float] = {}
    for j, wj in zip(idx[top], w, strict=True):
        out[labels[j]] = out.get(labels[j], 0.0) + float(wj)
    return out


def vote(
    query_blocks: dict[str, np.ndarray],
    candidate_blocks: dict[str, np.ndarray],
    labels: list[str],
    weights: dict[str, float],
    *,
    k: int = 10,
    temperature: float = 0.05,
    uncertain_below: float = 0.5,
) -> tuple[str | None, float, bool, dict[str, float]]:
    """Late-fusion vote over a candidate pool.

    Args:
        query_blocks: ``{modality: (d,)}`` unit or zero vectors of the query.
        candidate_blocks: ``{modality: (n, d)}`` the labelled candidates' block vectors.
        labels: the ``n`` candidates' categories.
        weights: ``{modality: weight}``; a modality's vote counts with this weight.
        k: neighbours per modality.
        temperature: softmax temperature over cosine similarities (lower = sharper).
        uncertain_below: confidence under which the outcome is flagged uncertain.

    Returns:
        ``(category, confidence, uncertain, scores)`` with ``scores`` summing to 1 over
        categories and ``confidence = scores[category]``.
    """
    total: dict[str, float] = {}
    weight_sum = 0.0
    for name, q in query_blocks.items():
        w = weights.get(name, 0.0)
        if w <= 0:
            continue
        v = modality_votes(q, candidate_blocks[name], labels, k, temperature)
        if not v:
            continue
        weight_sum += w
        for c, p in v.items():
            total[c] = total.get(c, 0.0) + w * p
    if not total:
        return None, 0.0, True, {}
    scores = {c: p / weight_sum for c, p in sorted(total.items(), key=lambda t: -t[1])}
    best = next(iter(scores))
    conf = float(min(1.0, max(0.0, scores[best])))
    return best, conf, conf < uncertain_below, scores
