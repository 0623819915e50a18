from pathlib import Path

import pytest

from indexer.catalog import make_listing, parse_category_tree, read_listings
from indexer.errors import InvalidInput
from tests.support.offline import CSV


def test_category_tree_first_level_and_full_path():
    tree = '["Home Furnishing >> Curtains & Accessories >> Curtains >> Elegance Po..."]'
    assert parse_category_tree(tree) == (
        "Home Furnishing", "Curtains & Accessories", "Curtains", "Elegance Po...",
    )
    assert parse_category_tree("Watches >> Wrist Watches") == ("Watches", "Wrist Watches")


def test_reads_the_study_dataset():
    listings, bad = read_listings(CSV)
    assert len(listings) == 1050
    assert len({x.category for x in listings}) == 7
    no_photo = {x.id for x in listings if x.image is None}
    assert no_photo == {
        "22ac36ba254a68d7dd6173f099771147",
        "994f1d8ade16b9fddce3c127eb7f38ed",
        "c4ac93e194281d6d1450ffdaa52f5f99",
    }
    # the three are kept (text only) and reported
    assert {b.id for b in bad} == no_photo
    assert all("not found" in b.reason for b in bad)
    first = listings[0]
    assert first.category_path[0] == first.category and len(first.category_path) >= 3


def _write(p: Path, text: str) -> Path:
    p.write_text(text, encoding="utf-8")
    return p


def test_bad_rows_are_reported_and_the_rest_goes_through(tmp_path):
    csv = _write(
        tmp_path / "in.csv",
        "uniq_id,product_name,description,image\n"
        "a1,Steel Mug,,\n"                      # empty description: valid
        "a2,Cotton Towel,soft,missing.jpg\n"    # photo missing: kept, reported
        "a1,Duplicate,dup,\n"                   # duplicate id
        ",No id,text,\n"                        # missing id
        "a3,,,\n"                               # nothing at all
        "a4,Too,many,fields,here\n"             # malformed row
        "bad id!,Weird id,x,\n"                 # invalid id characters
        "a5,Analog Watch,for men,\n",
    )
    listings, bad = read_listings(csv)
    assert [x.id for x in listings] == ["a1", "a2", "a5"]
    reasons = {b.line: b.reason for b in bad}
    assert "not found" in reasons[3]
    assert "duplicate" in reasons[4]
    assert "empty" in reasons[5]
    assert "no title, no description and no photo" in reasons[6]
    assert "more fields" in reasons[7]
    assert "characters" in reasons[8]


def test_missing_required_column_is_a_clear_error(tmp_path):
    csv = _write(tmp_path / "x.csv", "id,name\n1,foo\n")
    with pytest.raises(InvalidInput, match="uniq_id"):
        read_listings(csv)
    with pytest.raises(InvalidInput, match="not found"):
        read_listings(tmp_path / "nope.csv")


def test_make_listing_validates_types_and_sizes():
    with pytest.raises(InvalidInput, match="string"):
        make_listing(12, "title")
    with pytest.raises(InvalidInput, match="title must be a string"):
        make_listing("x", ["title"])
    with pytest.raises(InvalidInput, match="longer than"):
        make_listing("x", "t", "d" * 60_000)
    x = make_listing("x", "  Steel   Mug ", None, category="Kitchen & Dining")
    assert x.title == "Steel Mug" and x.description == "" and x.text == "Steel Mug"
