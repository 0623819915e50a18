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
    from .index import VectorView
    from .pipeline import State, Vitrine

DUPLICATE_CANDIDATES = 5  # nearest listings looked at for a duplicate
EVIDENCE_NEIGHBOURS = 10  # neighbours kept with a review entry
SEPARATOR = " >> "
ThumbTags = Callable[[Sequence[str]], Sequence[str | None]]


def category_key(name: str) -> str:
    """How category names compare: spaces collapsed, case folded."""
    return " ".join(name.split()).casefold()


def known_categories(view: VectorView) -> dict[str, str]:
    """The taxonomy's first levels, by :func:`category_key`: the names of the categories
    that at least one alive, labelled listing of ``view`` has."""
    return {category_key(c): c for c in view.labelled_categories()}


def taxonomy(view: VectorView) -> tuple[dict[tuple[str, ...], int], dict[str, int]]:
    """``(paths, unconfirmed)``: labelled listings under each category path (every prefix
    of every labelled path counts once per listing), and unconfirmed sellers' categories
    with their listings."""
    labelled = view.listing_payloads(labelled=True)
    others = view.listing_payloads(labelled=False)
    paths: dict[tuple[str, ...], int] = {}
    for p in labelled:
        levels = tuple(p.get("category_path") or ([p["category"]] if p.get("category") else []))
        for depth in range(1, len(levels) + 1):
            paths[levels[:depth]] = paths.get(levels[:depth], 0) + 1
    unconfirmed: dict[str, int] = {}
    for p in others:
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


def find_duplicates(vitrine: Vitrine, fused: np.ndarray, ids: Sequence[str], state: State,
                    photo_tags: Sequence[str | None], tags: ThumbTags | None
                    ) -> list[list[dict[str, Any]]]:
    """For each new listing ``ids[i]`` (fused vector ``fused[i]``, its thumbnail's content
    hash ``photo_tags[i]``), the indexed listings near-identical to it:
    ``[{id, score, same_photo}]``, closest first (``score``: the fused similarity).

    Two small searches, each one index search for the whole batch: the
    :data:`DUPLICATE_CANDIDATES` nearest by fused similarity (held to the calibrated
    threshold), and as many nearest by the photo alone (the query's other blocks weighted 0),
    whose thumbnails are compared with the new one's, all read in one call: the same photo
    with other words is far in fused similarity, never in the photo's. (Per listing, the two
    searches and the read took a quarter of a worker's round.)"""
    n = len(ids)
    cal = state.calibration
    threshold = cal.duplicate_threshold if cal is not None else None
    found: list[dict[str, bool]] = [{} for _ in range(n)]
    skips = [{lid} for lid in ids]
    if threshold is not None and n:
        for i, near in enumerate(vitrine.search_vectors(fused, DUPLICATE_CANDIDATES,
                                                        skips=skips, state=state)):
            found[i].update((x.id, False) for x in near if x.score >= threshold)
    fusion = state.fusion
    photo_only = {b.name: float(b.name == "image") for b in fusion.blocks}
    has_photo = fusion.query_norm(fused, photo_only) > 0 if n else np.zeros(0, bool)
    rows = [i for i in range(n) if photo_tags[i] is not None and has_photo[i]]
    if rows and tags is not None:
        near_rows = vitrine.search_vectors(fused[rows], DUPLICATE_CANDIDATES,
                                           skips=[skips[i] for i in rows], state=state,
                                           factors=photo_only)
        candidates = sorted({x.id for near in near_rows for x in near})
        tag_of = dict(zip(candidates, tags(candidates), strict=True)) if candidates else {}
        for i, near in zip(rows, near_rows, strict=True):
            for x in near:
                if tag_of.get(x.id) == photo_tags[i]:
                    found[i][x.id] = True
    out: list[list[dict[str, Any]]] = []
    for i in range(n):
        if not found[i]:
            out.append([])
            continue
        dup_ids = list(found[i])
        q = fused[i].reshape(1, -1)
        norm = float(fusion.query_norm(q)[0]) or 1.0
        scores = (state.view.get(dup_ids) @ q[0]) / norm
        out.append(sorted(({"id": d, "score": round(float(sc), 4), "same_photo": found[i][d]}
                           for d, sc in zip(dup_ids, scores.tolist(), strict=True)),
                          key=lambda d: -d["score"]))
    return out
