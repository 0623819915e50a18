"""The search's category filter: any level of the category path, whatever the case.

``"watches"`` and ``"Home Furnishing >> Bed Linen"`` both work. A filter whose first level is
a first-level category of the index runs inside the index search (exact, bounded work,
:meth:`indexer.index.IndexView.search`); what remains (deeper levels) is checked on the
candidates' paths. A single name that is no first-level category is looked for at every
level of the candidates' paths, among the :data:`POOL` nearest listings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

POOL = 1000  # candidates read for a filter the index cannot apply itself (the API's max k)
OVERSAMPLE = 20  # candidates per wanted result under such a filter (at least 200)
SEPARATOR = ">>"


def _key(level: str) -> str:
    return " ".join(level.split()).casefold()


@dataclass(frozen=True)
class CategoryFilter:
    """``first``: the index's own first-level name to filter on (None: no index filter);
    ``levels``: the casefolded levels a path must hold, from its first level (``anywhere``
    False) or at any position (``anywhere`` True, a single name)."""

    first: str | None
    levels: tuple[str, ...]
    anywhere: bool = False
    impossible: bool = False  # a path whose first level no listing has: nothing matches

    @property
    def exact(self) -> bool:
        """True when the index filter alone decides (no candidate check)."""
        return self.first is not None and len(self.levels) == 1 and not self.anywhere

    def candidates(self, k: int) -> int:
        """How many nearest listings to read to return ``k`` that pass."""
        return k if self.exact else min(POOL, max(k * OVERSAMPLE, 200))

    def matches(self, path: Sequence[str]) -> bool:
        keys = [_key(p) for p in path]
        if self.anywhere:
            return self.levels[0] in keys
        return keys[: len(self.levels)] == list(self.levels)


def category_filter(text: str, first_levels: Iterable[str]) -> CategoryFilter:
    """Parse a filter against the index's first-level categories (``IndexView.categories``)."""
    levels = tuple(k for k in (_key(x) for x in text.split(SEPARATOR)) if k)
    if not levels:
        return CategoryFilter(None, (), impossible=True)
    firsts = {_key(c): c for c in first_levels}
    first = firsts.get(levels[0])
    if first is not None:
        return CategoryFilter(first, levels)
    if len(levels) == 1:
        return CategoryFilter(None, levels, anywhere=True)
    return CategoryFilter(None, levels, impossible=True)
