"""The review loop over HTTP, on the embedded default with the real models and a seeded index:
what goes to review and why, `GET /review` with its evidence, the operator's versioned
`PUT /listings/{id}/category` and what it changes in later votes, `GET /categories`, and
near-duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.catalog import make_listing
from indexer.runtime import Runtime
from services.api import create_app
from tests.support.service import b64, copy_seed, png, seed_listings, settled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory, settings, registry, seed_dir):  # type: ignore[no-untyped-def]
    data = copy_seed(seed_dir, tmp_path_factory.mktemp("review") / "data")
    s = settings.model_copy(update={"data_dir": data, "broker_url": None})
    with TestClient(create_app(s, Runtime(s, registry))) as client:
        yield client


@pytest.fixture(scope="module")
def seeded(small_catalog):  # type: ignore[no-untyped-def]
    return seed_listings(small_catalog)


def _post(client: TestClient, body: dict) -> dict:
    assert client.post("/listings", json=body).status_code == 202

    st = settled(client, body["id"])
    assert st["status"] == "indexed", st
    return st  # type: ignore[no-any-return]


def _queue(client: TestClient, **params: object) -> dict:
    r = client.get("/review", params={"limit": 100, **params})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    return r.json()  # type: ignore[no-any-return]


def _classify(client: TestClient, title: str) -> dict:
    r = client.post("/classify", json={"title": title})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_suspected_mislabel_is_reviewed_and_corrected_with_a_versioned_write(api, seeded) -> None:  # type: ignore[no-untyped-def]
    watch = next(x for x in seeded if x.category == "Watches")
    title = f"{watch.title} for men"
    st = _post(api, {"id": "ml-1", "title": title, "description": watch.description,
                     "category": "kitchen  &  DINING"})  # known, spelled another way
    # a known category is kept in the taxonomy's spelling and votes as the seller's label
    assert (st["category"], st["source"]) == ("Kitchen & Dining", "seller")
    assert "mislabel" in st["review"], st
    entry = next(e for e in _queue(api, reason="mislabel")["items"] if e["id"] == "ml-1")
    assert entry["version"] == st["version"] and entry["title"] == title
    assert entry["predicted_path"][0] == "Watches" and entry["confidence"] > 0.5
    assert entry["neighbours"] and entry["neighbours"][0]["category"] == "Watches"
    assert all(h["photo_url"] is None or "/photo?v=" in h["photo_url"]
               for h in entry["neighbours"])
    # before the correction, the listing votes as "Kitchen & Dining" for a copy of it
    before = {n["id"]: n for n in _classify(api, title)["neighbours"]}
    assert before["ml-1"]["category"] == st["category"]

    path = ["Watches", "Wrist Watches"]
    stale = api.put("/listings/ml-1/category",
                    json={"category_path": path, "version": st["version"] - 1})
    assert stale.status_code == 409 and str(st["version"]) in stale.json()["detail"]
    r = api.put("/listings/ml-1/category", json={"category_path": path,
                                                  "version": st["version"],
                                                  "reviewer": "ana"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["version"] > st["version"]
    assert (done["category"], done["category_path"], done["source"]) == (
        "Watches", path, "confirmed")
    [c] = done["corrections"]
    assert c["by"] == "ana" and c["category_path"] == path and c["at"].endswith("+00:00")
    assert c["previous"] == {"category": st["category"], "category_path": st["category_path"],
                             "source": "seller"}
    assert "review" not in done and api.get("/listings/ml-1").json() == done
    assert "ml-1" not in {e["id"] for e in _queue(api)["items"]}
    stats = api.get("/stats").json()  # the status panel's count is the queue's
    assert stats["review"] == _queue(api)["total"]
    assert f"vitrine_review_queue {float(stats['review'])}" in api.get("/metrics").text
    # the same decision sent again (a second click) saw a version that is gone
    again = api.put("/listings/ml-1/category", json={"category_path": path,
                                                      "version": st["version"]})
    assert again.status_code == 409
    # from now on it votes as a confirmed Watches label, with the operator's path
    after = {n["id"]: n for n in _classify(api, title)["neighbours"]}
    assert after["ml-1"]["category"] == "Watches" and after["ml-1"]["category_path"] == path
    hits = api.post("/search", json={"text": title, "k": 3}).json()["results"]
    assert next(h for h in hits if h["id"] == "ml-1")["category_path"] == path
    # the seller posts it again: voted again, the operator's correction stays on record
    reposted = _post(api, {"id": "ml-1", "title": title, "category": st["category"]})
    assert reposted["version"] > done["version"]
    assert [c["by"] for c in reposted["corrections"]] == ["ana"]


def _categories(api: TestClient) -> dict[str, int]:
    out = api.get("/categories").json()
    return {" >> ".join(c["path"]): c["count"] for c in out["categories"]}


def test_unknown_category_does_not_vote_until_an_operator_accepts_it(api) -> None:  # type: ignore[no-untyped-def]
    title = "Leather bracelet strap for smart band, brown"
    st = _post(api, {"id": "typo-1", "title": title, "category": "Acessories"})
    assert (st["category"], st["source"]) == ("Acessories", "unconfirmed")
    assert "unknown_category" in st["review"]
    cats = api.get("/categories").json()
    assert cats["unconfirmed"] == {"Acessories": 1}
    assert "Acessories" not in _categories(api)
    first_levels = {c["path"][0] for c in cats["categories"]}
    assert len(first_levels) == 7 and all(n > 0 for n in _categories(api).values())
    # it does not vote: not a neighbour of a copy of itself, and no share for its category
    vote = _classify(api, title)
    assert "typo-1" not in {n["id"] for n in vote["neighbours"]}
    assert "Acessories" not in vote["scores"]
    entry = next(e for e in _queue(api, reason="unknown_category")["items"]
                 if e["id"] == "typo-1")
    r = api.put("/listings/typo-1/category",
                json={"category_path": ["Acessories"], "version": entry["version"]})
    assert r.status_code == 200 and r.json()["source"] == "confirmed"
    assert _categories(api)["Acessories"] == 1
    assert api.get("/categories").json()["unconfirmed"] == {}
    vote = _classify(api, title)
    assert "typo-1" in {n["id"] for n in vote["neighbours"]}
    assert "Acessories" in vote["scores"]
    # now that it is in the taxonomy, the next seller's label votes at once
    st2 = _post(api, {"id": "typo-2", "title": "Brown leather watch strap", "category":
                      "acessories"})
    assert (st2["category"], st2["source"]) == ("Acessories", "seller")
    assert "unknown_category" not in st2.get("review", [])


def test_catalog_listing_is_corrected_from_version_zero_once(api, seeded) -> None:  # type: ignore[no-untyped-def]
    lid = next(x.id for x in seeded if x.category == "Baby Care")
    st = api.get(f"/listings/{lid}").json()
    assert st["version"] == 0 and st["source"] == "seller"
    body = {"category_path": ["Baby Care", "Baby Bedding"], "version": 0}
    r = api.put(f"/listings/{lid}/category", json=body)
    assert r.status_code == 200 and r.json()["category_path"] == body["category_path"]
    assert r.json()["corrections"][0]["previous"]["category_path"] == st["category_path"]
    assert api.put(f"/listings/{lid}/category", json=body).status_code == 409
    assert api.get(f"/listings/{lid}").json()["version"] == r.json()["version"] > 0


def test_category_write_refusals(api) -> None:  # type: ignore[no-untyped-def]
    ok = {"category_path": ["Watches"], "version": 0}
    assert api.put("/listings/nobody/category", json=ok).status_code == 404
    for bad in ({"category_path": [], "version": 0}, {"category_path": ["  "], "version": 0},
                {"category_path": ["Watches"], "version": -1}, {"category_path": ["W"]},
                {"category_path": "Watches", "version": 0}, {**ok, "extra": 1}):
        r = api.put("/listings/nobody/category", json=bad)
        assert r.status_code == 422, (bad, r.text)
    r = api.put("/listings/nobody/category", files={"image": ("a.png", png())},
                data={"version": "0"})
    assert r.status_code == 415
    _post(api, {"id": "gone-1", "title": "Steel water bottle"})
    v = api.delete("/listings/gone-1").json()["version"]
    assert api.put("/listings/gone-1/category",
                   json={"category_path": ["Kitchen & Dining"], "version": v}).status_code == 404
    assert api.get("/review", params={"reason": "nope"}).status_code == 422
    assert api.get("/review", params={"limit": 0}).status_code == 422


def test_write_key_is_required_to_correct(settings, registry, seed_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = settings.model_copy(update={"data_dir": copy_seed(seed_dir, tmp_path / "data"),
                                    "broker_url": None, "api_key": "k" * 24})
    with TestClient(create_app(s, Runtime(s, registry))) as client:
        body = {"category_path": ["Watches"], "version": 0}
        lid = client.get("/review").json()  # reads need no key here
        assert lid["total"] == 0 and lid["items"] == []
        some = client.post("/search", json={"text": "watch", "k": 1}).json()["results"][0]["id"]
        assert client.put(f"/listings/{some}/category", json=body).status_code == 401
        r = client.put(f"/listings/{some}/category", json=body,
                       headers={"X-API-Key": "k" * 24})
        assert r.status_code == 200
        # a browser navigating to /review gets the operators' page, which asks for the key
        page = client.get("/review", headers={"accept": "text/html,*/*"})
        assert page.headers["content-type"].startswith("text/html")
        assert 'data-page="review"' in page.text and 'id="write-key"' in page.text
        assert page.headers["vary"] == "Accept" == client.get("/review").headers["vary"]


def test_near_duplicates_are_named_in_the_status_and_the_queue(api, seeded) -> None:  # type: ignore[no-untyped-def]
    src = next(x for x in seeded if x.category == "Home Furnishing" and x.image)
    photo = Path(src.image).read_bytes()
    st = _post(api, {"id": "dup-1", "title": src.title, "description": src.description,
                     "image_base64": b64(photo), "category": src.category})
    assert st["duplicates"][0]["id"] == src.id and st["duplicates"][0]["score"] > 0.9, st
    assert "duplicate" in st["review"]
    entry = next(e for e in _queue(api, reason="duplicate")["items"] if e["id"] == "dup-1")
    assert entry["duplicates"][0]["id"] == src.id
    assert entry["duplicates"][0]["title"] == src.title
    # the same photo with other words: named as a same-photo duplicate (thumbnail hash)
    st2 = _post(api, {"id": "dup-2", "title": "Handmade decorative item, gift",
                      "image_base64": b64(photo)})
    same = {d["id"]: d for d in st2.get("duplicates", [])}
    assert same.get("dup-1", {}).get("same_photo") is True, st2
    # an ordinary new listing has none and, voted confidently, no review (a product of
    # the catalog's kind that the listings the tests above posted do not come near)
    plain = _post(api, {"id": "plain-1", "title": "Stainless steel pressure cooker, 5 litre",
                        "category": "Kitchen & Dining"})
    assert "duplicates" not in plain and "review" not in plain, plain


def test_review_queue_pages(api) -> None:  # type: ignore[no-untyped-def]
    for i in range(3):
        _post(api, {"id": f"pg-{i}", "title": f"Mystery item number {i}", "category": f"Zz{i}"})
    full = _queue(api, reason="unknown_category")
    ids = [e["id"] for e in full["items"]]
    assert {"pg-0", "pg-1", "pg-2"} <= set(ids) and full["total"] == len(ids)
    versions = [e["version"] for e in full["items"]]
    assert versions == sorted(versions)  # oldest first
    one = _queue(api, reason="unknown_category", offset=1, limit=1)
    assert one["total"] == full["total"] and [e["id"] for e in one["items"]] == ids[1:2]


def test_list_listings_paged_and_filtered(api) -> None:  # type: ignore[no-untyped-def]
    _post(api, {"id": "ls-1", "title": "Hand-knitted wool scarf", "category": "Scarves Qq"})
    everything = api.get("/listings", params={"limit": 1000}).json()
    size = api.get("/stats").json()["index_size"]
    assert everything["total"] == size == len(everything["items"])
    assert len({x["id"] for x in everything["items"]}) == size
    page = api.get("/listings", params={"offset": 5, "limit": 7}).json()
    assert page["total"] == size and page["items"] == everything["items"][5:12]
    mine = next(x for x in everything["items"] if x["id"] == "ls-1")
    assert (mine["category"], mine["source"], mine["status"]) == (
        "Scarves Qq", "unconfirmed", "indexed")
    assert mine["version"] > 0 and mine["confidence"] is not None
    watches = api.get("/listings", params={"category": "WATCHES", "limit": 1000}).json()
    assert 10 <= watches["total"] < size
    assert all(x["category_path"][0] == "Watches" for x in watches["items"])
    second = next(x["category_path"][1] for x in watches["items"]
                  if len(x["category_path"]) > 1)
    deeper = api.get("/listings", params={"category": second.lower(), "limit": 1000}).json()
    assert 0 < deeper["total"] <= watches["total"]
    assert all(second in x["category_path"] for x in deeper["items"])
    unconfirmed = api.get("/listings", params={"source": "unconfirmed"}).json()["items"]
    assert "ls-1" in {x["id"] for x in unconfirmed}
    assert all(x["source"] == "unconfirmed" for x in unconfirmed)
    assert api.get("/listings", params={"status": "queued", "category": "x"}).status_code == 422
    queued = api.get("/listings", params={"status": "queued"}).json()
    assert queued["total"] == len(queued["items"]) == 0  # everything posted was indexed
    assert api.get("/listings", params={"status": "deleted"}).status_code == 422


def test_list_listings_by_cursor_skip_and_repeat_nothing(api) -> None:  # type: ignore[no-untyped-def]
    """Relabelling listings between pages (a new slot each: the write order changes) leaves
    a read by cursor whole: every listing once."""
    everything = [x["id"] for x in api.get("/listings", params={"limit": 1000}).json()["items"]]
    assert everything == sorted(everything)  # by id
    seen: list[str] = []
    after = None
    while True:
        page = api.get("/listings", params={"limit": 50, **({"after": after} if after else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        seen += [x["id"] for x in body["items"]]
        if len(seen) == 50:  # between pages: relabel one read already and one not yet read
            for lid in (seen[0], everything[-1]):
                st = api.get(f"/listings/{lid}").json()
                r = api.put(f"/listings/{lid}/category",
                            json={"category_path": ["Watches"], "version": st["version"]},
                            headers={"X-API-Key": api.app.state.settings.api_key or ""})
                assert r.status_code == 200, r.text
        after = body["next"]
        if after is None:
            break
    assert seen == everything
    queued = api.get("/listings", params={"status": "queued", "after": "x"})
    assert queued.status_code == 422  # not a cursor of that list


@pytest.fixture
def on_redis(tmp_path, settings, registry, seed_dir):  # type: ignore[no-untyped-def]
    """Redis mode without Celery: an API process (its app and replica) and a "worker" (a
    second Runtime on the same Redis and data dir) whose ingest round the test runs."""
    import uuid

    import redis

    url = "redis://127.0.0.1:6379/0"
    prefix = f"vitrine-test-{uuid.uuid4().hex[:12]}"
    s = settings.model_copy(update={"data_dir": copy_seed(seed_dir, tmp_path / "data"),
                                    "broker_url": url, "redis_prefix": prefix})
    api_rt = Runtime(s, registry)
    api_rt.notify = lambda lid, version: None  # no Celery: the test runs the worker's rounds
    worker = Runtime(s, registry)
    try:
        with TestClient(create_app(s, api_rt)) as client:
            yield client, worker
    finally:
        worker.replica.stop()
        worker.store.close()
        r = redis.Redis.from_url(url)
        keys = list(r.scan_iter(match=f"{prefix}*"))
        if keys:
            r.delete(*keys)
        r.close()


def test_review_loop_in_redis_mode_reaches_the_other_process(on_redis) -> None:  # type: ignore[no-untyped-def]
    client, worker = on_redis
    title = "Leather bracelet strap for smart band, brown"
    assert client.post("/listings", json={"id": "rd-1", "title": title,
                                          "category": "Acessories"}).status_code == 202
    assert [o.id for o in worker.ingestor.run().committed] == ["rd-1"]
    st = client.get("/listings/rd-1").json()  # waits until the API's replica holds it
    assert st["source"] == "unconfirmed" and "unknown_category" in st["review"]
    queue = client.get("/review", params={"reason": "unknown_category"}).json()
    assert [e["id"] for e in queue["items"]] == ["rd-1"] and queue["total"] == 1
    assert "rd-1" not in {n["id"] for n in _classify(client, title)["neighbours"]}
    body = {"category_path": ["Acessories", "Straps"], "version": st["version"]}
    assert client.put("/listings/rd-1/category", json={**body, "version": 0}).status_code == 409
    r = client.put("/listings/rd-1/category", json=body)
    assert r.status_code == 200 and r.json()["source"] == "confirmed"
    assert client.get("/review").json()["total"] == 0  # the Lua script took it out
    # the worker's replica applies the label from the log: its votes use it from now on
    worker.replica.catch_up()
    meta = worker.replica.v.state().meta("rd-1")
    assert meta is not None and meta.labelled and meta.category_path == ["Acessories", "Straps"]
    vote = worker.replica.v.classify(make_listing("q", title))
    assert "Acessories" in vote.scores and "rd-1" in {n.id for n in vote.neighbours}
    assert worker.replica.digest() == client.get("/health").json()["digest"]
