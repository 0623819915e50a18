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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Neighbour:
    id: str
    score: float
    category: str | None
    title: str = ""
    category_path: tuple[str, ...] = ()  # its labelled levels (payload ``category_path``)


UncertainReason = Literal["no_neighbours", "low_confidence", "out_of_catalog"]
# why a category path stopped where it did
PathStop = Literal["leaf", "disagreement", "unknown_below"]


@dataclass(frozen=True)
class Vote:
    """Outcome of a vote. ``category`` is None when no labelled neighbour was found.

    ``confidence`` is the calibrated probability that ``category`` is right when the index
    holds a calibration (else the raw vote share, ``raw_confidence``). ``category_path``
    starts with ``category`` and goes as deep as the neighbours agree; ``path_confidence``
    gives, per level, the share of the vote for that level among the neighbours that
    share the level above (the first is ``confidence``); ``path_stopped`` says why it went
    no deeper.
    """

    category: str | None
    confidence: float
    uncertain: bool
    scores: dict[str, float] = field(default_factory=dict)
    neighbours: list[Neighbour] = field(default_factory=list)
    category_path: list[str] = field(default_factory=list)
    path_confidence: list[float] = field(default_factory=list)
    path_stopped: PathStop | None = None
    uncertain_reason: UncertainReason | None = None
    raw_confidence: float = 0.0


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
    w = _modality_weights(query, candidates, k, temperature)
    out: dict[str, float] = {}
    if w is None:
        return out
    for j in np.flatnonzero(w):
        out[labels[int(j)]] = out.get(labels[int(j)], 0.0) + float(w[j])
    return out


def _modality_weights(query: np.ndarray, candidates: np.ndarray, k: int,
                      temperature: float) -> np.ndarray | None:
    """Each candidate's share of one modality's vote (summing to 1), None when the
    modality cannot vote (the query or every candidate lacks it)."""
    if not np.any(query):
        return None
    has = np.abs(candidates).sum(axis=1) > 0
    if not has.any():
        return None
    idx = np.flatnonzero(has)
    sims = candidates[idx] @ query
    top = np.argsort(-sims, kind="stable")[:k]
    s = sims[top]
    w = np.exp((s - s.max()) / max(temperature, 1e-6))
    out = np.zeros(len(candidates))
    out[idx[top]] = w / w.sum()
    return out


def candidate_weights(
    query_blocks: dict[str, np.ndarray],
    candidate_blocks: dict[str, np.ndarray],
    weights: dict[str, float],
    *,
    k: int = 10,
    temperature: float = 0.05,
) -> np.ndarray:
    """Each candidate's share of the late-fusion vote (sums to 1; all 0 when nothing can
    vote): what :func:`vote` sums by category and :func:`path_vote` by path level."""
    n = len(next(iter(candidate_blocks.values()))) if candidate_blocks else 0
    total = np.zeros(n)
    weight_sum = 0.0
    for name, q in query_blocks.items():
        w = weights.get(name, 0.0)
        if w <= 0:
            continue
        v = _modality_weights(q, candidate_blocks[name], k, temperature)
        if v is None:
            continue
        weight_sum += w
        total += w * v
    return total / weight_sum if weight_sum else total


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
    shares = candidate_weights(query_blocks, candidate_blocks, weights, k=k,
                               temperature=temperature)
    return vote_shares(shares, labels, uncertain_below)


def vote_shares(shares: np.ndarray, labels: Sequence[str], uncertain_below: float = 0.5,
                ) -> tuple[str | None, float, bool, dict[str, float]]:
    """:func:`vote`'s outcome from the candidates' shares (:func:`candidate_weights`)."""
    total: dict[str, float] = {}
    for j in np.flatnonzero(shares):
        label = labels[int(j)]
        total[label] = total.get(label, 0.0) + float(shares[j])
    if not total:
        return None, 0.0, True, {}
    scores = dict(sorted(total.items(), key=lambda t: -t[1]))
    best = next(iter(scores))
    conf = float(min(1.0, max(0.0, scores[best])))
    return best, conf, conf < uncertain_below, scores


def path_vote(
    shares: np.ndarray,
    paths: Sequence[Sequence[str]],
    first: str,
    *,
    min_share: float = 0.5,
) -> tuple[list[str], list[float], PathStop]:
    """The category path below ``first``, one level at a time, from the same neighbours
    and the same vote shares as the first level.

    At level ``L`` the candidates whose path starts with the levels chosen so far vote for
    their level ``L``, or for "the path ends here" when theirs does. A candidate that
    only knows its first level (a seller's label) abstains below it: its depth is
    unknown, not zero. The level with the largest share is taken when it holds at least
    ``min_share`` of the vote (the neighbours agree); the path stops when they do not
    (``"disagreement"``), when ending wins (``"leaf"``) or when no candidate knows a
    deeper level (``"unknown_below"``).

    Returns:
        ``(levels below first, each level's share among the voters, why it stopped)``.
    """
    chosen: list[str] = []
    confs: list[float] = []
    while True:
        depth = 1 + len(chosen)
        prefix = (first, *chosen)
        votes: dict[str | None, float] = {}
        for j in np.flatnonzero(shares):
            p = paths[int(j)]
            if len(p) < 2 or tuple(p[:depth]) != prefix:
                continue
            level = p[depth] if len(p) > depth else None  # None: the path ends here
            votes[level] = votes.get(level, 0.0) + float(shares[j])
        total = sum(votes.values())
        if total <= 0:
            return chosen, confs, "unknown_below"
        best = max(votes, key=lambda c: votes[c])
        if best is None:
            return chosen, confs, "leaf"
        share = votes[best] / total
        if share < min_share:
            return chosen, confs, "disagreement"
        chosen.append(best)
        confs.append(share)
