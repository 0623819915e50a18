"""The core end to end with the offline models and real FAISS."""

import io

import numpy as np
import pytest
from PIL import Image

from indexer.catalog import Listing
from indexer.errors import ImageError, IndexMismatch, InvalidInput, NotFound
from indexer.index import current_snapshot
from indexer.pipeline import ListingMeta, Vitrine
from tests.support.offline import offline_settings


@pytest.fixture(scope="module")
def held_out(catalog, small_catalog):
    inside = {x.id for x in small_catalog}
    per: dict[str, list] = {}
    for x in catalog:
        if x.id not in inside and len(per.setdefault(x.category, [])) < 10:
            per[x.category].append(x)
    return [x for g in per.values() for x in g]


def test_build_indexes_every_listing_with_fused_blocks(built, small_catalog):
    assert len(built) == len(small_catalog)
    assert built.fusion.names == ["text", "lexical", "image"]
    assert built.index.kind == "flat"


def test_held_out_listings_are_categorized(built, held_out):
    votes = built.classify_many(held_out)
    correct = sum(v.category == x.category for v, x in zip(votes, held_out, strict=True))
    assert correct / len(held_out) >= 0.85
    for v in votes:
        assert 0.0 <= v.confidence <= 1.0
        assert v.neighbours and all(n.category for n in v.neighbours)
        # uncertain: calibrated confidence under the threshold, or out of the catalog
        assert v.uncertain == (v.uncertain_reason is not None)
        if v.confidence < built.settings.uncertain_below:
            assert v.uncertain


def test_text_only_and_photo_only_listings(built, held_out):
    watch = next(x for x in held_out if x.category == "Watches")
    text_only = Listing("t1", title=watch.title, description=watch.description)
    assert built.classify(text_only).category == "Watches"
    photo_only = Listing("p1", title="", image=watch.image)
    vote = built.classify(photo_only)
    assert vote.category is not None and vote.neighbours


def test_search_by_text_photo_and_id(built, small_catalog):
    hits = built.search(text="analog wrist watch for men", k=5)
    assert len(hits) == 5 and all(h.category == "Watches" for h in hits)
    assert hits == sorted(hits, key=lambda h: -h.score) and -1 <= hits[-1].score <= 1
    some = small_catalog[0]
    by_id = built.search(listing_id=some.id, k=3)
    assert some.id not in {h.id for h in by_id}
    by_photo = built.search(image=open(some.image, "rb").read(), k=1)
    assert by_photo[0].id == some.id  # its own photo finds it
    within = built.search(text="analog watch", k=3, category="Kitchen & Dining")
    assert within and all(h.category == "Kitchen & Dining" for h in within)


def test_bad_queries_get_clear_errors(built):
    with pytest.raises(InvalidInput, match="give a text"):
        built.search(text="  ")
    with pytest.raises(NotFound):
        built.search(listing_id="nope")
    with pytest.raises(ImageError):
        built.search(image=b"garbage")
    with pytest.raises(InvalidInput, match="k must be"):
        built.search(text="mug", k=0)


def test_corrupt_photo_is_indexed_from_text_and_reported(tmp_path, settings, registry,
                                                        small_catalog):
    v = Vitrine(settings, registry)
    v.build(small_catalog[:30])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, "PNG")
    problems = v.upsert([
        Listing("c1", "Steel coffee mug", image=bad),
        Listing("c2", "Ceramic tea cup", image=buf.getvalue()),
        Listing("c3", "", image=b"junk"),
    ])
    assert "c1" in v and "c2" in v and "c3" not in v
    assert "corrupt" in problems[0] and "decompression bomb" in problems[1]
    assert "no text either" in problems[2]


def test_upsert_replaces_delete_removes_save_load(tmp_path, settings, registry, small_catalog):
    v = Vitrine(settings, registry)
    v.build(small_catalog[:40])
    x = small_catalog[0]
    v.upsert([Listing(x.id, "Cotton bath towel", category="Home Furnishing")])
    assert len(v) == 40 and v.state().meta(x.id).title == "Cotton bath towel"
    assert v.delete([small_catalog[1].id]) == 1 and len(v) == 39
    v.save(tmp_path)
    back = Vitrine.load(tmp_path, settings, registry)
    assert len(back) == 39
    q = back.search(text="bath towel", k=3)
    assert q == v.search(text="bath towel", k=3)
    other = offline_settings(image_model="torchvision:resnet18@random")
    with pytest.raises(IndexMismatch, match="image_model"):
        Vitrine.load(tmp_path, other)
    with pytest.raises(NotFound):
        Vitrine.load(tmp_path / "empty", settings)


def test_predicted_labels_do_not_vote(settings, registry, small_catalog):
    v = Vitrine(settings, registry)
    v.build(small_catalog[:20])
    v.upsert([Listing("u1", "Analog watch for men")])  # no category: predicted, not a voter
    assert not v.state().meta("u1").labelled
    vote = v.classify(Listing("q", "Analog watch for boys"))
    assert "u1" not in {n.id for n in vote.neighbours}
    np.testing.assert_equal(len(v), 21)


def test_parallel_lanes_embed_like_one_lane(settings, registry, small_catalog):
    """Lanes split a batch over threads: same vectors, problems at their own rows."""
    bad = Listing("bad", "", image=b"junk")  # no text and an unusable photo
    listings = [*small_catalog[:23], bad, *small_catalog[23:40]]
    serial = Vitrine(settings.model_copy(update={"encode_lanes": 1, "batch_size": 4}), registry)
    lanes = Vitrine(settings.model_copy(update={"encode_lanes": 3, "batch_size": 4}), registry)
    assert serial.encode_lanes(len(listings)) == 1 and lanes.encode_lanes(len(listings)) == 3
    seen: list[int] = []
    a = serial.embed(listings)
    b = lanes.embed(listings, progress=seen.append)
    assert sum(seen) == len(listings)
    assert a.vectors.keys() == b.vectors.keys()
    for key in a.vectors:
        np.testing.assert_allclose(a.vectors[key], b.vectors[key], atol=1e-4)
        assert (a.present[key] == b.present[key]).all()
    assert a.failed == b.failed == {23}
    assert a.problems == b.problems and "no text either" in b.problems[23]


@pytest.fixture()
def copy_of_built(built, tmp_path, settings, registry):
    """A writable copy of ``built`` (through a snapshot: no embedding)."""
    built.save(tmp_path / "built")
    return Vitrine.load(tmp_path / "built", settings, registry)


def test_a_state_taken_before_writes_answers_as_before(copy_of_built, held_out):
    v = copy_of_built
    watch = next(x for x in held_out if x.category == "Watches")
    st = v.state()
    fused = v.query_vector(text=watch.title, state=st)[0]
    hits = v.search_vector(fused, 5, state=st)
    vote = v.vote_vector(fused, state=st)
    v.apply([(hits[1].id, fused, ListingMeta("moved", "Kitchen & Dining"))], [hits[0].id])
    assert v.search_vector(fused, 5, state=st) == hits
    assert v.vote_vector(fused, state=st) == vote
    now = v.search_vector(fused, 5)
    assert hits[0].id not in {n.id for n in now}
    assert now[0].id == hits[1].id and now[0].title == "moved"
    assert st.meta(hits[1].id).title != "moved" and v.state().meta(hits[1].id).title == "moved"


def test_votes_ignore_a_flood_of_unlabelled_listings(copy_of_built, held_out):
    """19 unlabelled near-copies per labelled listing: the vote and its pool do not move."""
    v = copy_of_built
    queries = held_out[::7]
    before = v.classify_many(queries)
    st = v.state()
    ids = st.view.ids()
    x = st.view.get(ids)
    rng = np.random.default_rng(0)
    flood = [
        (f"{lid}~{j}", x[i] + 0.01 * rng.normal(size=x.shape[1]).astype(np.float32),
         ListingMeta("near copy", "Watches", "predicted"))
        for i, lid in enumerate(ids) for j in range(19)
    ]
    v.apply(flood)
    assert len(v) == 20 * len(ids)
    after = v.classify_many(queries)
    assert [a.category for a in after] == [b.category for b in before]
    assert [[n.id for n in a.neighbours] for a in after] == [
        [n.id for n in b.neighbours] for b in before]
    # plain search does see them, and a category filter includes predicted categories
    some = v.search(text="analog watch", k=20, category="Watches")
    assert any("~" in h.id for h in some)


def test_load_reads_extra_from_the_snapshot_it_loads(copy_of_built, tmp_path, settings,
                                                     registry):
    copy_of_built.save(tmp_path / "a", {"log_pos": 7})
    back = Vitrine.load(tmp_path / "a", settings, registry)
    assert back.extra == {"log_pos": 7} and back.snapshot == current_snapshot(tmp_path / "a")
    copy_of_built.save(tmp_path / "a")
    assert Vitrine.load(tmp_path / "a", settings, registry).extra == {}


def test_held_out_listings_get_category_paths(built, held_out):
    """The path level by level from the labelled neighbours, on the real catalog: the
    first level is the category vote, deeper levels as far as the neighbours agree."""
    from indexer.catalog import taxonomy_path

    votes = built.classify_many(held_out)
    truth = [taxonomy_path(x.category_path, x.title) for x in held_out]
    two = [t for t in truth if len(t) >= 2]
    right2 = sum(tuple(v.category_path[:2]) == t[:2]
                 for v, t in zip(votes, truth, strict=True) if len(t) >= 2)
    # 280 listings index only a part of the taxonomy: far above chance, below the full
    # catalog's level-2 accuracy (docs/evaluation.md)
    assert right2 / len(two) >= 0.6
    for v in votes:
        assert v.category_path[0] == v.category
        assert len(v.path_confidence) == len(v.category_path)
        assert v.path_confidence[0] == v.confidence
        assert all(0.5 <= c <= 1.0 for c in v.path_confidence[1:])  # a majority each
        assert v.path_stopped in ("leaf", "disagreement", "unknown_below")
    # the payload keeps the labelled levels of a catalog listing, not its product name
    meta = built.state().meta(built.state().view.ids()[0])
    assert meta is not None and meta.category_path and meta.title not in meta.category_path


def test_calibration_is_saved_and_read_back_as_data(built, held_out, tmp_path, settings,
                                                    registry):
    cal = built.calibration
    assert cal is not None and cal.calibrated and cal.votes == len(built)
    assert cal.pooled_threshold is not None and set(cal.thresholds) == {
        x.category for x in held_out}  # 40 listings per category: each its own quantile
    snap = built.save(tmp_path)
    assert (snap / "calibration.json").exists() and (snap / "calibration.npz").exists()
    back = Vitrine.load(tmp_path, settings, registry)
    assert back.calibration is not None
    assert back.calibration.thresholds == cal.thresholds
    assert np.array_equal(back.calibration.x, cal.x) and np.array_equal(back.calibration.y,
                                                                         cal.y)
    listing = held_out[0]
    a, b = built.classify(listing), back.classify(listing)
    assert (a.category_path, a.confidence, a.uncertain_reason) == (
        b.category_path, b.confidence, b.uncertain_reason)
    # a pickle in place of the arrays is refused, not loaded
    (snap / "calibration.npz").write_bytes(b"\x80\x04\x95 not arrays")
    with pytest.raises(IndexMismatch):
        Vitrine.load(tmp_path, settings, registry)


def test_far_from_the_catalog_is_uncertain(built, small_catalog):
    """Products of categories the catalog does not hold (evaluation/data/out_of_catalog.csv,
    75 of 15 other categories) are mostly flagged, while listings of the catalog's own
    categories keep a confident vote. The detection is not perfect (on the whole catalog
    `vitrine bench core` flags 0.72 of them; on this 280-listing index 49 of 75): the bound
    is under the measured rate and far above what a broken detector gives. (With the int8
    text encoder only 27 of 75 were flagged: why the offline default is `+onnx`.)"""
    from evaluation.bench_core import OUT_OF_CATALOG
    from indexer.catalog import read_listings

    far, _ = read_listings(OUT_OF_CATALOG)
    votes = built.classify_many(far)
    flagged = [v for v in votes if v.uncertain]
    assert len(flagged) >= 0.5 * len(votes), [(v.category, v.confidence) for v in votes]
    assert all(v.uncertain_reason for v in flagged)
    # in-catalog: the catalog's own listings, each voted by the others
    own = built.classify_many(small_catalog[::7])
    assert sum(not v.uncertain for v in own) >= 0.8 * len(own)
