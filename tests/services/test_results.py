"""What a search hit and a status carry (photo, title, path), the thumbnail route and its
cache headers, the search options (`min_score`, the category filter at any level, any case)
and /stats: on the embedded default with the real models and a seeded index."""

from __future__ import annotations

import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.runtime import Runtime
from services.api import create_app
from tests.support.service import b64, copy_seed, png, settled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory, settings, registry, seed_dir):  # type: ignore[no-untyped-def]
    data = copy_seed(seed_dir, tmp_path_factory.mktemp("results") / "data")
    s = settings.model_copy(update={"data_dir": data, "broker_url": None})
    with TestClient(create_app(s, Runtime(s, registry))) as client:
        yield client


def _post(client: TestClient, lid: str, title: str, photo: bytes | None) -> dict:
    body = {"id": lid, "title": title}
    if photo is not None:
        body["image_base64"] = b64(photo)
    assert client.post("/listings", json=body).status_code == 202
    st = settled(client, lid)
    assert st["status"] == "indexed", st
    return st


def test_posted_photo_is_a_cached_thumbnail_until_deleted(api) -> None:  # type: ignore[no-untyped-def]
    big = png(1200, 800, (20, 90, 200))
    st = _post(api, "thumb-1", "Blue analog wrist watch", big)
    assert st["title"] == "Blue analog wrist watch"
    url = st["photo_url"]
    assert re.search(r"/listings/thumb-1/photo\?v=[0-9a-f]+$", url), url
    r = api.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    # a thumbnail, not the upload: at most 256 px, same aspect ratio, same colour
    assert img.format == "JPEG" and img.size == (256, 171), img.size
    assert max(abs(a - b) for a, b in zip(img.getpixel((128, 85)), (20, 90, 200), strict=True)) < 12
    # with v equal to its etag the URL is immutable; without, it must be revalidated
    tag = r.headers["etag"]
    assert tag == f'"{url.rsplit("=", 1)[1]}"'
    assert "max-age=86400" in r.headers["cache-control"]
    assert r.headers["cache-control"].startswith("public")
    plain = api.get("/listings/thumb-1/photo")
    assert plain.headers["cache-control"] == "public, no-cache" and plain.content == r.content
    again = api.get("/listings/thumb-1/photo", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    assert api.get("/listings/thumb-1/photo",
                   headers={"If-None-Match": '"other"'}).status_code == 200
    # search hits carry it too, with the title and the path
    own = api.post("/search", json={"text": "Blue analog wrist watch", "k": 3}).json()
    mine = next(h for h in own["results"] if h["id"] == "thumb-1")
    assert mine["photo_url"] == url and mine["category_path"] == st["category_path"]
    assert api.delete("/listings/thumb-1").status_code == 200
    assert api.get("/listings/thumb-1/photo").status_code == 404


def test_repost_without_photo_drops_the_old_thumbnail(api) -> None:  # type: ignore[no-untyped-def]
    st = _post(api, "thumb-2", "Red ceramic coffee mug", png(300, 300, (200, 20, 20)))
    assert api.get(st["photo_url"]).status_code == 200
    st = _post(api, "thumb-2", "Red ceramic coffee mug, no photo", None)
    assert "photo_url" not in st
    r = api.get("/listings/thumb-2/photo")
    assert r.status_code == 404 and r.json()["detail"]
    assert api.get("/listings/never-posted/photo").status_code == 404


def test_min_score_leaves_nothing_under_it(api) -> None:  # type: ignore[no-untyped-def]
    q = {"text": "analog wrist watch for men", "k": 50}
    all_hits = api.post("/search", json=q).json()["results"]
    cut = all_hits[4]["score"]
    kept = api.post("/search", json={**q, "min_score": cut}).json()["results"]
    assert kept and all(h["score"] >= cut for h in kept)
    assert len(kept) < len(all_hits)  # the option really removed results
    assert [h["id"] for h in kept] == [h["id"] for h in all_hits if h["score"] >= cut]
    assert api.post("/search", json={**q, "min_score": 1.5}).status_code == 422


def test_category_filter_any_level_any_case(api) -> None:  # type: ignore[no-untyped-def]
    q = {"text": "soft cotton double bedsheet", "k": 10}
    exact = api.post("/search", json={**q, "category": "Home Furnishing"}).json()["results"]
    lower = api.post("/search", json={**q, "category": "home furnishing"}).json()["results"]
    assert exact and [h["id"] for h in exact] == [h["id"] for h in lower]
    assert all(h["category"] == "Home Furnishing" for h in exact)
    # a second level, by itself in another case, and as a path from the first level
    second = next(h["category_path"][1] for h in exact if len(h["category_path"]) > 1)
    by_name = api.post("/search", json={**q, "category": second.upper()}).json()["results"]
    by_path = api.post("/search", json={
        **q, "category": f"home furnishing >>  {second.lower()}"}).json()["results"]
    assert by_name and all(h["category_path"][1] == second for h in by_name)
    assert [h["id"] for h in by_name] == [h["id"] for h in by_path]
    # the unfiltered neighbours are not all under it: the filter did something
    unfiltered = api.post("/search", json={**q, "k": 70}).json()["results"]
    assert any(second not in h["category_path"] for h in unfiltered)
    for none in ("Nothing Like This", "Watches >> Bed Linen", " >> "):
        assert api.post("/search", json={**q, "category": none}).json()["results"] == []


def test_stats_are_the_metrics_numbers(api) -> None:  # type: ignore[no-untyped-def]
    s = api.get("/stats").json()
    assert s["mode"] == "embedded" and s["pending"] == 0
    assert sum(s["by_category"].values()) == s["index_size"] >= 70
    assert s["by_status"].get("indexed", 0) >= 1  # posted by the tests above (or not yet)
    metrics = api.get("/metrics").text
    assert f"vitrine_index_size {float(s['index_size'])}" in metrics
    for cat, n in s["by_category"].items():
        assert f'vitrine_listings{{category="{cat}"}} {float(n)}' in metrics


def test_pages_are_served_and_say_when_a_key_is_needed(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # no runtime needed: the pages are shells that call the API from the browser
    free = TestClient(create_app(settings.model_copy(update={"data_dir": tmp_path})))
    for path in ("/", "/sell", "/status"):
        r = free.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert not re.search(r"(?:src|href)=\"https?://", r.text)  # nothing from a CDN
        assert 'data-read-key="false"' in r.text
    assert free.get("/static/vitrine.js").status_code == 200
    keyed = TestClient(create_app(settings.model_copy(update={
        "data_dir": tmp_path, "read_api_key": "r" * 20, "api_key": "w" * 20})))
    page = keyed.get("/sell").text
    assert 'data-read-key="true"' in page and 'data-write-key="true"' in page
    assert 'id="write-key"' in page  # the seller form asks for the write key
    assert keyed.get("/listings/x/photo").status_code == 401  # photos are reads too


def _ranked(api, body: dict) -> list[tuple[str, float]]:  # type: ignore[no-untyped-def]
    r = api.post("/search", json=body)
    assert r.status_code == 200, r.text
    return [(h["id"], round(h["score"], 4)) for h in r.json()["results"]]


def test_modality_weights_lean_a_query_on_its_words_or_its_photo(api, seed_dir) -> None:  # type: ignore[no-untyped-def]
    photo = b64(png(96, 96, (230, 200, 40)))
    text = "yellow cotton bedsheet"
    both = _ranked(api, {"text": text, "image_base64": photo, "k": 10})
    words = _ranked(api, {"text": text, "k": 10})
    pixels = _ranked(api, {"image_base64": photo, "k": 10})
    assert both != words and both != pixels  # the photo and the words both count by default
    # a weight of 0 leaves that modality out: the same ranking and scores as without it
    assert _ranked(api, {"text": text, "image_base64": photo, "k": 10,
                         "image_weight": 0}) == words
    assert _ranked(api, {"text": text, "image_base64": photo, "k": 10,
                         "text_weight": 0}) == pixels
    # in between, the scores move towards the favoured modality
    leaning = _ranked(api, {"text": text, "image_base64": photo, "k": 10, "image_weight": 0.2})
    assert leaning not in (both, pixels)
    r = api.post("/search", json={"text": text, "k": 5, "text_weight": 0})
    assert r.status_code == 422 and "weights" in r.json()["detail"]
    assert api.post("/search", json={"text": text, "text_weight": -1}).status_code == 422


def test_more_like_several_listings_at_once(api) -> None:  # type: ignore[no-untyped-def]
    watches = [h["id"] for h in api.post("/search", json={
        "text": "analog wrist watch", "k": 3, "category": "Watches"}).json()["results"]]
    a, b = watches[:2]
    # one id: the same as "more like this"
    assert _ranked(api, {"listing_ids": [a], "k": 8}) == _ranked(api, {"listing_id": a, "k": 8})
    both = _ranked(api, {"listing_ids": [a, b, a], "k": 8})  # a repeated id counts once
    ids = [x for x, _ in both]
    assert a not in ids and b not in ids and len(ids) == 8  # the examples are left out
    assert both != _ranked(api, {"listing_id": a, "k": 8})[:8]
    cats = [h["category"] for h in api.post("/search", json={
        "listing_ids": [a, b], "k": 5}).json()["results"]]
    assert cats.count("Watches") >= 4
    assert api.post("/search", json={"listing_ids": [a, "no-such"]}).status_code == 404
    assert api.post("/search", json={"listing_ids": [a], "text": "x"}).status_code == 422
    assert api.post("/search", json={"listing_ids": []}).status_code == 422
