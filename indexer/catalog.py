"""Listings and the catalog CSV formats.

Two CSV shapes are read:

* the Flipkart export of the feasibility study (``uniq_id``, ``product_name``,
  ``description``, ``image``, ``product_category_tree``...): the category is the first level
  of ``product_category_tree``, the full path is kept;
* vitrine's input for ``vitrine predict``: at least ``uniq_id`` and ``product_name``;
  ``description``, ``image`` and ``category`` optional and possibly empty.

Both go through :func:`read_listings`, which never stops at a bad row: it returns the good
listings and a list of :class:`BadRow` with line number and reason.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidInput

if TYPE_CHECKING:
    from PIL.Image import Image as Photo

MAX_TITLE_CHARS = 1_000
MAX_DESCRIPTION_CHARS = 50_000
MAX_ID_CHARS = 200
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$"
_ID_RE = re.compile(ID_PATTERN)


@dataclass(slots=True)
class Listing:
    """A marketplace listing: the seller's text, an optional photo and optional category.

    ``image`` is a path (str/Path) to a photo file, raw photo bytes, a photo already decoded
    by :func:`indexer.images.decode_image` (a ``PIL.Image``, not decoded again), or None.
    """

    id: str
    title: str
    description: str = ""
    image: str | Path | bytes | Photo | None = None
    category: str | None = None
    category_path: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Title and description as one text (the title first: it is the densest signal)."""
        if self.description:
            return f"{self.title}. {self.description}"
        return self.title


@dataclass(slots=True, frozen=True)
class BadRow:
    """A row that could not be turned into a listing, and why."""

    line: int
    id: str | None
    reason: str


def validate_id(listing_id: object) -> str:
    """Return a clean listing id or raise :class:`InvalidInput`."""
    if not isinstance(listing_id, str):
        raise InvalidInput(f"listing id must be a string, got {type(listing_id).__name__}")
    s = listing_id.strip()
    if not s:
        raise InvalidInput("listing id is empty")
    if len(s) > MAX_ID_CHARS:
        raise InvalidInput(f"listing id longer than {MAX_ID_CHARS} characters")
    if not _ID_RE.match(s):
        raise InvalidInput(f"listing id {s[:40]!r} has characters outside [A-Za-z0-9._:-]")
    return s


def make_listing(
    listing_id: object,
    title: object,
    description: object = "",
    image: str | Path | bytes | Photo | None = None,
    category: object = None,
    category_path: Iterable[str] = (),
) -> Listing:
    """Build a validated :class:`Listing`; raise :class:`InvalidInput` with a clear reason."""
    lid = validate_id(listing_id)
    if not isinstance(title, str):
        raise InvalidInput(f"title must be a string, got {type(title).__name__}")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise InvalidInput(f"description must be a string, got {type(description).__name__}")
    title, description = _clean(title), _clean(description)
    if not title and not description and image is None:
        raise InvalidInput("listing has no title, no description and no photo")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidInput(f"title longer than {MAX_TITLE_CHARS} characters")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidInput(f"description longer than {MAX_DESCRIPTION_CHARS} characters")
    if category is not None and not isinstance(category, str):
        raise InvalidInput(f"category must be a string, got {type(category).__name__}")
    cat = _clean(category) if category else None
    return Listing(
        id=lid,
        title=title,
        description=description,
        image=image,
        category=cat or None,
        category_path=tuple(category_path),
    )


def _clean(s: str) -> str:
    return " ".join(s.split())


def parse_category_tree(tree: str) -> tuple[str, ...]:
    """``'["A >> B >> C..."]'`` -> ``('A', 'B', 'C...')``. Plain ``'A >> B'`` works too."""
    s = tree.strip()
    if s.startswith("["):
        try:
            parsed = json.loads(s)
            s = parsed[0] if isinstance(parsed, list) and parsed else ""
        except json.JSONDecodeError:
            s = s.strip('[]"')
    return tuple(part.strip() for part in str(s).split(">>") if part.strip())


def _key(level: str) -> str:
    return " ".join(level.lower().replace("...", " ").split())


def taxonomy_path(path: Iterable[str], title: str) -> tuple[str, ...]:
    """The category levels of a seller's path: it stops before a level that names the
    listing rather than a category.

    Flipkart paths end below the categories with levels that are the listing's own:
    its product name, possibly cut (``"Sathiyas Cotton Bath Towel (3 Bath Towel, Red,
    Y..."``), and often a brand level, ``"<brand> <parent level>"`` (``"Titan Wrist
    Watches"`` under ``"Wrist Watches"``) where the title starts with the brand. Such a
    level is unique to one listing or one brand, so neighbours cannot vote for it; the
    levels above it are the taxonomy.
    """
    t = _key(title)
    out: list[str] = []
    for level in path:
        k = _key(level)
        if not k:
            break
        if level.rstrip().endswith("...") or t.startswith(k) or (t and k.startswith(t)):
            break  # the product name
        if out:
            parent = _key(out[-1])
            brand = k[: -len(parent)].strip() if k.endswith(" " + parent) else ""
            if brand and t.startswith(brand):
                break  # "<brand> <parent>"
        out.append(level)
    return tuple(out)


def _raise_csv_field_limit() -> None:
    # Flipkart descriptions and specifications can exceed csv's 128 KiB default field size.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def iter_csv_rows(path: str | Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` of a CSV file, with a clear error if it is not one."""
    _raise_csv_field_limit()
    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"CSV file not found: {p}")
    with p.open(newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise InvalidInput(f"{p} is empty or has no header row")
        for row in reader:
            yield reader.line_num, row


def read_listings(
    csv_path: str | Path,
    images_dir: str | Path | None = None,
    *,
    require_category: bool = False,
) -> tuple[list[Listing], list[BadRow]]:
    """Read a Flipkart or vitrine CSV into listings, reporting bad rows instead of failing.

    Args:
        csv_path: the CSV file.
        images_dir: folder where the ``image`` column's file names live (default: an
            ``images`` folder beside the CSV, if there is one). A named photo that is not
            there keeps the listing (it is indexed from its text) and is reported.
        require_category: rows without a category are bad rows (for labelled catalogs).

    Returns:
        ``(listings, bad_rows)``; a listing whose photo is missing is in both, with
        ``image=None``.
    """
    csv_path = Path(csv_path)
    if images_dir is None and (csv_path.parent / "images").is_dir():
        images_dir = csv_path.parent / "images"
    img_root = Path(images_dir) if images_dir is not None else None
    listings: list[Listing] = []
    bad: list[BadRow] = []
    seen: set[str] = set()
    rows = iter_csv_rows(csv_path)
    first = True
    for line, row in rows:
        if first:
            missing = {"uniq_id", "product_name"} - set(row)
            if missing:
                raise InvalidInput(
                    f"{csv_path}: missing required column(s) {sorted(missing)}; "
                    f"found {sorted(k for k in row if k)}"
                )
            first = False
        rid = (row.get("uniq_id") or "").strip() or None
        if None in row:  # csv.DictReader puts surplus fields under the None key
            bad.append(BadRow(line, rid, "row has more fields than the header"))
            continue
        if rid is not None and rid in seen:
            bad.append(BadRow(line, rid, "duplicate uniq_id (first occurrence kept)"))
            continue
        tree = row.get("product_category_tree") or ""
        path = parse_category_tree(tree) if tree else ()
        category = (row.get("category") or "").strip() or (path[0] if path else None)
        if require_category and not category:
            bad.append(BadRow(line, rid, "no category"))
            continue
        image_name = (row.get("image") or "").strip()
        image: Path | None = None
        image_problem = None
        if image_name:
            candidate = (img_root / image_name) if img_root else Path(image_name)
            if Path(image_name).name != image_name and img_root is not None:
                image_problem = f"image {image_name!r} is not a plain file name"
            elif candidate.is_file():
                image = candidate
            else:
                image_problem = f"photo {image_name!r} not found; indexed from text only"
        try:
            listing = make_listing(
                rid or "",
                row.get("product_name") or "",
                row.get("description") or "",
                image,
                category,
                path,
            )
        except InvalidInput as e:
            bad.append(BadRow(line, rid, str(e)))
            continue
        seen.add(listing.id)
        listings.append(listing)
        if image_problem:
            bad.append(BadRow(line, rid, image_problem))
    return listings, bad


def write_bad_rows(bad: list[BadRow], out: str | Path) -> None:
    """Write bad rows as a CSV report (line, id, reason)."""
    with Path(out).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["line", "uniq_id", "reason"])
        for b in bad:
            w.writerow([b.line, b.id or "", b.reason])
