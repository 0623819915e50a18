"""Clustering and classification scores as pure functions over numpy arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def adjusted_rand(labels_true: Sequence[object], labels_pred: Sequence[object]) -> float:
    """Adjusted Rand index: 1 = identical partitions, ~0 = chance agreement."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(list(labels_true), list(labels_pred)))


def match_clusters(
    categories: Sequence[str], clusters: Sequence[int]
) -> tuple[dict[int, str], np.ndarray, list[str]]:
    """Match each cluster to one category (Hungarian algorithm on the contingency table).

    Returns ``(cluster -> category, confusion matrix rows=category cols=matched category,
    category names)``. Clusters left without a category (more clusters than categories)
    map to ``"(unmatched)"`` and are not counted in the matrix.
    """
    from scipy.optimize import linear_sum_assignment

    names = sorted(set(categories))
    cl_ids = sorted(set(int(c) for c in clusters))
    cat_idx = {c: i for i, c in enumerate(names)}
    cl_idx = {c: j for j, c in enumerate(cl_ids)}
    table = np.zeros((len(names), len(cl_ids)), dtype=np.int64)
    for cat, cl in zip(categories, clusters, strict=True):
        table[cat_idx[cat], cl_idx[int(cl)]] += 1
    rows, cols = linear_sum_assignment(-table)
    mapping = {cl: "(unmatched)" for cl in cl_ids}
    for r, c in zip(rows, cols, strict=True):
        mapping[cl_ids[c]] = names[r]
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    for cat, cl in zip(categories, clusters, strict=True):
        pred = mapping[int(cl)]
        if pred in cat_idx:
            confusion[cat_idx[cat], cat_idx[pred]] += 1
    return mapping, confusion, names


def matched_accuracy(categories: Sequence[str], clusters: Sequence[int]) -> float:
    """Share of listings whose cluster's matched category is their own."""
    _, confusion, _ = match_clusters(categories, clusters)
    return float(np.trace(confusion) / max(1, len(categories)))
