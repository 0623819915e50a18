"""What a vote's confidence means, and how close an in-catalog listing usually is.

Both are fitted on the catalog when the index is built, from **leave-one-out votes**: each
labelled listing is voted by the others exactly as a new listing would be.

* **Calibration**: isotonic regression of "the vote was right" on the vote's raw share
  (scikit-learn's ``IsotonicRegression``). The fitted step function is kept as its knots
  and applied with ``np.interp``, so a snapshot stores two arrays, not a model object.
* **Out-of-catalog reference**: for each category, the similarity between a listing and
  its nearest labelled neighbour of the same category. A query whose nearest neighbour in
  the voted category is less similar than the ``ooc_quantile`` of that category's
  reference (by construction: about that share of in-catalog listings) is far from
  everything that category holds: ``uncertain`` with reason ``out_of_catalog``. A category
  with too few listings for its own quantile takes the quantile over all categories.
* **Duplicate threshold**: the ``duplicate_quantile`` (a high one) of the similarity between
  each labelled listing and its nearest other listing: a new listing at least that close
  to an indexed one is a near-duplicate candidate (:mod:`indexer.review`).

The leave-one-out votes see a lexical view and centring means fitted with the listing
itself in the catalog, so they are a little optimistic; listings with no description
(titles only) were not among them (see docs/evaluation.md, "Paths and calibration").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# a category's own quantile needs this many references; fewer: the pooled quantile
MIN_PER_CATEGORY = 20
# fewer leave-one-out votes than this: no calibration (confidence stays the raw share)
MIN_VOTES = 30


@dataclass
class Calibration:
    """Isotonic knots (``x``: raw share, ``y``: probability right) and the per-category
    out-of-catalog thresholds on the nearest same-category similarity."""

    x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    quantile: float = 0.05
    thresholds: dict[str, float] = field(default_factory=dict)
    pooled_threshold: float | None = None
    votes: int = 0
    # None: no duplicate test by similarity (an old snapshot, or switched off)
    duplicate_threshold: float | None = None
    duplicate_quantile: float = 0.0

    @classmethod
    def fit(cls, raw: Sequence[float], correct: Sequence[bool],
            nearest: Mapping[str, Sequence[float]], quantile: float,
            closest: Sequence[float] = (), duplicate_quantile: float = 0.0) -> Calibration:
        """``raw``/``correct``: the leave-one-out votes' shares and whether each was right;
        ``nearest``: by category, the listings' nearest same-category similarities;
        ``closest``: each listing's similarity to its nearest other listing."""
        from sklearn.isotonic import IsotonicRegression

        out = cls(quantile=quantile, votes=len(raw), duplicate_quantile=duplicate_quantile)
        if duplicate_quantile > 0 and len(closest) >= MIN_VOTES:
            out.duplicate_threshold = float(np.quantile(closest, duplicate_quantile))
        if len(raw) >= MIN_VOTES:
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            iso.fit(np.asarray(raw, float), np.asarray(correct, float))
            out.x = np.asarray(iso.X_thresholds_, np.float64)
            out.y = np.asarray(iso.y_thresholds_, np.float64)
        every = [s for v in nearest.values() for s in v]
        if every:
            out.pooled_threshold = float(np.quantile(every, quantile))
        out.thresholds = {c: float(np.quantile(v, quantile)) for c, v in nearest.items()
                          if len(v) >= MIN_PER_CATEGORY}
        return out

    @property
    def calibrated(self) -> bool:
        return len(self.x) > 0

    def confidence(self, raw: float) -> float:
        """The probability that a vote with share ``raw`` is right (``raw`` uncalibrated)."""
        if not self.calibrated:
            return raw
        return float(np.interp(raw, self.x, self.y))

    def threshold(self, category: str) -> float | None:
        """Under this nearest same-category similarity a query is out of the catalog."""
        return self.thresholds.get(category, self.pooled_threshold)

    # --- as data in a snapshot (calibration.json / calibration.npz) -----------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {"quantile": self.quantile, "thresholds": self.thresholds,
                "pooled_threshold": self.pooled_threshold, "votes": self.votes,
                "duplicate_threshold": self.duplicate_threshold,
                "duplicate_quantile": self.duplicate_quantile}
        return meta, {"x": self.x.astype(np.float64), "y": self.y.astype(np.float64)}

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                   ) -> Calibration:
        if not isinstance(meta, Mapping):
            raise TypeError("calibration.json is not an object")
        x, y = np.asarray(arrays["x"], np.float64), np.asarray(arrays["y"], np.float64)
        if x.shape != y.shape or x.ndim != 1 or np.any(np.diff(x) < 0):
            raise ValueError("calibration knots are not one increasing curve")
        thresholds = meta.get("thresholds") or {}
        if not isinstance(thresholds, Mapping):
            raise TypeError("calibration thresholds are not an object")
        pooled = meta.get("pooled_threshold")
        dup = meta.get("duplicate_threshold")  # absent from snapshots written before it
        return cls(x, y, float(meta["quantile"]),
                   {str(k): float(v) for k, v in thresholds.items()},
                   None if pooled is None else float(pooled), int(meta.get("votes", 0)),
                   None if dup is None else float(dup),
                   float(meta.get("duplicate_quantile", 0.0)))


def reliability(confidence: ArrayLike, correct: ArrayLike, bins: int = 10
                ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability curve over ``bins`` equal-width
    confidence bins: ``[{lo, hi, count, confidence (mean), accuracy}]`` (empty bins left
    out); ECE is the count-weighted mean of ``|accuracy - confidence|``."""
    c = np.asarray(confidence, float)
    ok = np.asarray(correct, float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(c, edges[1:-1], right=True), 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, acc = float(c[m].mean()), float(ok[m].mean())
        ece += m.sum() / max(1, len(c)) * abs(acc - conf)
        curve.append({"lo": round(float(edges[b]), 2), "hi": round(float(edges[b + 1]), 2),
                      "count": int(m.sum()), "confidence": round(conf, 4),
                      "accuracy": round(acc, 4)})
    return float(ece), curve
