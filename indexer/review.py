"""The review loop's core: the taxonomy, why a listing needs an operator, near-duplicates.

* **Taxonomy**: the category paths of the listings whose label votes (the seeded catalog's,
  sellers' labels in a known category, operators' confirmed ones), read from one index
  view. A seller's first-level category that is not in it (a typo, "Acessories", or a new
  category) is indexed *unconfirmed*: it does not vote until an operator accepts it
  (``PUT /listings/{id}/category``). An index without any label (a service started without
  a catalog) has no taxonomy yet: there, sellers' labels are taken as they come.
* **Review reasons** (:data:`indexer.state.model.REVIEW_REASONS`), decided when a listing is
  indexed and kept in its status: ``mislabel`` (the seller's category disagrees with a
  confident vote), ``uncertain`` (the vote is uncertain, whatever the reason),
  ``unknown_category`` and ``duplicate``.
* **Near-duplicates**: an indexed listing with the same photo (the same thumbnail content
  hash) among the new listing's nearest by photo, or one whose fused similarity is at least
  the catalog's duplicate threshold (:attr:`indexer.calibration.Calibration.duplicate_threshold`:
  a high quantile of the nearest-neighbour similarity between distinct catalog listings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .knn import Vote

if TYPE_CHECKING:
    from .index import IndexView
    from .pipeline import State, Vitrine

DUPLICATE_CANDIDATES = 5  # nearest listings looked at for a duplicate
EVIDENCE_NEIGHBOURS = 10  # neighbours kept with a review entry
SEPARATOR = " >> "
ThumbTags = Callable[[Sequence[str]], Sequence[str | None]]


def category_key(name: str) -> str:
    """How category names compare: spaces collapsed, case folded."""
    return " ".join(name.split()).casefold()


def _labelled_slots(view: IndexView) -> np.ndarray:
    n = view.n_slots
    return np.flatnonzero(view.alive[:n] & view.labelled[:n])


def known_categories(view: IndexView) -> dict[str, str]:
    """The taxonomy's first levels, by :func:`category_key`: the names of the categories
    that at least one alive, labelled listing of ``view`` has."""
    codes = np.unique(view.category[: view.n_slots][_labelled_slots(view)])
    names = {code: name for name, code in view.categories.items()}
    return {category_key(names[c]): names[c] for c in codes.tolist() if c in names}


def taxonomy(view: IndexView) -> tuple[dict[tuple[str, ...], int], dict[str, int]]:
    """``(paths, unconfirmed)``: labelled listings under each category path (every prefix
    of every labelled path counts once per listing), and unconfirmed sellers' categories
    with their listings."""
    paths: dict[tuple[str, ...], int] = {}
    for s in _labelled_slots(view).tolist():
        p = view.payloads[s] or {}
        levels = tuple(p.get("category_path") or ([p["category"]] if p.get("category") else []))
        for depth in range(1, len(levels) + 1):
            paths[levels[:depth]] = paths.get(levels[:depth], 0) + 1
    unconfirmed: dict[str, int] = {}
    n = view.n_slots
    for s in np.flatnonzero(view.alive[:n] & ~view.labelled[:n]).tolist():
        p = view.payloads[s] or {}
        if p.get("source") == "unconfirmed" and p.get("category"):
            unconfirmed[p["category"]] = unconfirmed.get(p["category"], 0) + 1
    return paths, unconfirmed


def review_reasons(seller: str | None, unknown: bool, vote: Vote,
                   duplicates: Sequence[dict[str, Any]]) -> list[str]:
    """Why an operator should look at a listing (empty: no need)."""
    out = []
    if seller is not None and not unknown and not vote.uncertain \
            and vote.category is not None and vote.category != seller:
        out.append("mislabel")
    if vote.uncertain:
        out.append("uncertain")
    if unknown:
        out.append("unknown_category")
    if duplicates:
        out.append("duplicate")
    return out


def evidence(vote: Vote) -> list[dict[str, Any]]:
    """The neighbours behind a vote, as a review entry shows them."""
    return [{"id": n.id, "score": round(float(n.score), 4), "category": n.category,
             "title": n.title, "category_path": list(n.category_path)}
            for n in vote.neighbours[:EVIDENCE_NEIGHBOURS]]


def find_duplicates(vitrine: Vitrine, fused: np.ndarray, lid: str, state: State,
                    photo_tag: str | None, tags: ThumbTags | None) -> list[dict[str, Any]]:
    """Indexed listings near-identical to the listing ``lid`` (fused vector ``fused``, its
    thumbnail's content hash ``photo_tag``): ``[{id, score, same_photo}]``, closest first
    (``score``: the fused similarity).

    Two small searches: the :data:`DUPLICATE_CANDIDATES` nearest by fused similarity (held
    to the calibrated threshold), and as many nearest by the photo alone (the query's other
    blocks weighted 0), whose thumbnails are compared with this one: the same photo with
    other words is far in fused similarity, never in the photo's."""
    cal = state.calibration
    threshold = cal.duplicate_threshold if cal is not None else None
    found: dict[str, bool] = {}
    if threshold is not None:
        for n in vitrine.search_vector(fused, DUPLICATE_CANDIDATES, exclude=lid, state=state):
            if n.score >= threshold:
                found[n.id] = False
    fusion = state.fusion
    photo_only = {b.name: float(b.name == "image") for b in fusion.blocks}
    if photo_tag is not None and tags is not None and \
            fusion.query_norm(fused.reshape(1, -1), photo_only)[0] > 0:
        near = vitrine.search_vector(fused, DUPLICATE_CANDIDATES, exclude=lid, state=state,
                                     factors=photo_only)
        for n, t in zip(near, tags([n.id for n in near]), strict=True):
            if t == photo_tag:
                found[n.id] = True
    if not found:
        return []
    ids = list(found)
    q = fused.reshape(1, -1)
    norm = float(fusion.query_norm(q)[0]) or 1.0
    scores = (state.view.get(ids) @ q[0]) / norm
    out = [{"id": i, "score": round(float(sc), 4), "same_photo": found[i]}
           for i, sc in zip(ids, scores.tolist(), strict=True)]
    return sorted(out, key=lambda d: -d["score"])
