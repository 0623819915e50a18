"""The web pages in a real browser: Debian's chromium driven by Playwright, against a real
`vitrine serve --catalog` process (offline models, a 70-listing catalog seeded through the
same path as `make demo`, so its thumbnails are made by the seeding).

Screenshots go to /tmp/shots/ (VITRINE_SHOTS elsewhere): look at them when a page changes.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from indexer.catalog import parse_category_tree
from tests.support.offline import CSV, DATA_DIR
from tests.support.service import SEED_PER_CATEGORY, Server, b64, wait_until

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api")  # a dev dependency (see README)
CHROMIUM = Path(os.environ.get("VITRINE_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(os.environ.get("VITRINE_SHOTS", "/tmp/shots"))


def _small_catalog(out: Path) -> list[dict[str, str]]:
    """SEED_PER_CATEGORY rows per first-level category of the study's CSV, as a CSV."""
    with CSV.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        per: dict[str, list[dict[str, str]]] = {}
        for row in reader:
            first = parse_category_tree(row["product_category_tree"])[0]
            per.setdefault(first, [])
            if len(per[first]) < SEED_PER_CATEGORY:
                per[first].append(row)
    rows = [r for g in per.values() for r in g]
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)
    return rows


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[dict]]]:
    if not CHROMIUM.exists():  # CI installs it with apt (Playwright's download cannot run)
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium")
    tmp = tmp_path_factory.mktemp("pages")
    rows = _small_catalog(tmp / "catalog.csv")
    server = Server(tmp / "data", tmp / "serve.log", start_timeout=600,
                    args=("--catalog", str(tmp / "catalog.csv"),
                          "--images", str(DATA_DIR / "images")))
    try:
        yield server, rows
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield pg
    ctx.close()
    assert not errors, errors  # no script error, no CSP violation, no failed load


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _loaded_photos(page: Any) -> int:
    """Result cards whose thumbnail really decoded in the browser (not a broken image)."""
    return int(page.eval_on_selector_all(
        "#results .card img:not([hidden])",
        "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length"))


def test_buyer_search_shows_photos_and_more_like_this(service, page) -> None:  # type: ignore[no-untyped-def]
    server, _ = service
    page.goto(server.url + "/")
    page.get_by_label("Search by words").fill("analog wrist watch for men")
    page.keyboard.press("Enter")  # the keyboard alone runs a search
    page.wait_for_selector("#results .card")
    page.wait_for_function("() => document.querySelectorAll('#results .card img').length > 0 && "
                           "[...document.querySelectorAll('#results .card img')]"
                           ".every(i => i.hidden || (i.complete && i.naturalWidth > 0))")
    cards = page.locator("#results .card")
    assert cards.count() == 24
    assert _loaded_photos(page) == 24  # every seeded listing has its thumbnail
    first = cards.nth(0)
    assert first.locator(".path").inner_text().startswith("Watches")
    assert float(first.locator(".score").inner_text().split()[-1]) > 0.3
    shot(page, "buyer-search")
    # "more like this" on the first card: the results become its neighbours
    before = page.locator("#results .card .card-title").all_inner_texts()
    first.get_by_role("button", name="More like").click()
    page.wait_for_function("() => document.querySelector('#search-status').textContent"
                           ".includes('like')")
    after = page.locator("#results .card .card-title").all_inner_texts()
    assert after and after != before
    # the category filter, typed in lower case, keeps only that category
    page.get_by_label("Category").fill("beauty and personal care")
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_function("() => document.querySelector('#search-status').textContent"
                           ".includes('in beauty')")
    paths = page.locator("#results .card .path").all_inner_texts()
    assert paths and all(p.startswith("Beauty and Personal Care") for p in paths)


def test_photo_upload_search_finds_the_product(service, page) -> None:  # type: ignore[no-untyped-def]
    server, rows = service
    watch = next(r for r in rows if r["product_category_tree"].startswith('["Watches'))
    page.goto(server.url + "/")
    page.set_input_files("#photo", str(DATA_DIR / "images" / watch["image"]))
    assert page.locator(".preview").is_visible()  # the chosen photo is shown
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_function("() => document.querySelector('#search-status').textContent"
                           ".includes('your photo')")
    page.wait_for_function("() => [...document.querySelectorAll('#results .card img')]"
                           ".every(i => i.hidden || (i.complete && i.naturalWidth > 0))")
    # the same photo is in the catalog: its listing comes first
    assert page.locator("#results .card .id").first.inner_text() == watch["uniq_id"]
    assert page.locator("#results .card .path").first.inner_text().startswith("Watches")
    assert _loaded_photos(page) > 0
    shot(page, "buyer-photo")


def test_seller_sees_a_suggestion_before_submitting_then_the_status(service, page) -> None:  # type: ignore[no-untyped-def]
    server, rows = service
    watch = next(r for r in rows if r["product_category_tree"].startswith('["Watches'))
    page.goto(server.url + "/sell")
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.get_by_label("Title").type("Analog wrist watch for men, steel strap", delay=15)
    page.wait_for_selector("#suggest-path li")
    assert page.locator("#suggest-path li").first.inner_text().startswith("Watches")
    assert page.locator("#suggest-alts li").count() >= 1
    page.wait_for_function("() => [...document.querySelectorAll('#suggest-neighbours img')]"
                           ".some(i => i.complete && i.naturalWidth > 0)")
    # debounced: one suggestion for the whole title, not one per key, and nothing posted
    assert not any(u.endswith("/listings") for u in posts)
    assert sum(u.endswith("/classify") for u in posts) <= 3, posts
    shot(page, "seller-suggestion")
    page.set_input_files("#photo", str(DATA_DIR / "images" / watch["image"]))
    page.get_by_role("button", name="Publish listing").click()
    page.wait_for_selector("#result .badge.indexed", timeout=60_000)
    assert "Published" in page.locator("#sell-status").inner_text()
    fields = page.locator("#result-fields").inner_text()
    assert "Watches" in fields
    page.wait_for_function("() => document.querySelector('#result-fields img')?.naturalWidth > 0")
    shot(page, "seller-published")
    # what the page showed is what the API says
    lid = page.locator("#result-fields dd").first.inner_text()
    code, st = server.call("GET", f"/listings/{lid}")
    assert code == 200 and st["status"] == "indexed" and st["photo_url"]


def test_status_panel_shows_the_counts(service, page) -> None:  # type: ignore[no-untyped-def]
    server, rows = service
    page.goto(server.url + "/status")
    page.wait_for_function("() => document.querySelector('#t-mode').textContent === 'embedded'")
    code, stats = server.call("GET", "/stats")
    assert page.locator("#t-index").inner_text() == f"{stats['index_size']:,}"
    assert page.locator("#t-review").inner_text() == f"{stats['review']:,}"
    assert page.locator("#by-category tr").count() == len(stats["by_category"]) == 7
    shot(page, "status")


def test_operator_correction_changes_the_category_and_its_later_votes(service, page) -> None:  # type: ignore[no-untyped-def]
    server, rows = service
    watch = next(r for r in rows if r["product_category_tree"].startswith('["Watches'))
    title = f"{watch['product_name']}, gift box"
    # a seller files a watch under a known, wrong category: a suspected mislabel
    code, _ = server.call("POST", "/listings", {"id": "op-1", "title": title,
                                                 "category": "Kitchen & Dining"})
    assert code == 202
    wait_until(lambda: server.call("GET", "/listings/op-1")[1].get("status") == "indexed", 60)
    code, st = server.call("GET", "/listings/op-1")
    assert st["category"] == "Kitchen & Dining" and "mislabel" in st["review"], st
    # until an operator decides, it votes with the seller's label
    code, vote = server.call("POST", "/classify", {"title": title})
    assert {n["id"]: n["category"] for n in vote["neighbours"]}["op-1"] == "Kitchen & Dining"

    # another seller reuses a catalog listing's photo: a near-duplicate by its photo
    photo = (DATA_DIR / "images" / watch["image"]).read_bytes()
    code, _ = server.call("POST", "/listings", {"id": "op-2", "title": "Men's watch, boxed",
                                                 "image_base64": b64(photo)})
    assert code == 202
    wait_until(lambda: server.call("GET", "/listings/op-2")[1].get("status") == "indexed", 60)

    page.goto(server.url + "/review")
    entry = page.locator('#queue .entry[data-id="op-1"]')
    entry.wait_for()
    assert "disagrees" in entry.locator(".reasons").inner_text()
    assert entry.locator(".predicted").inner_text().startswith("Watches")
    # the evidence: the neighbours' photos, side by side with the listing; every photo
    # loaded (none left blank)
    page.wait_for_function("() => [...document.querySelectorAll('#queue img')]"
                           ".every(i => i.hidden || (i.complete && i.naturalWidth > 0))")
    assert entry.locator(".neighbours .card").count() >= 3
    dup = page.locator('#queue .entry[data-id="op-2"] .duplicates .card').filter(
        has=page.locator(".id", has_text=watch["uniq_id"]))
    assert dup.locator(".score").inner_text().startswith("same photo")
    shot(page, "review-queue")
    before = page.locator("#page-info").inner_text()
    page.get_by_label("Your name").fill("ana")
    use = entry.get_by_role("button", name=re.compile(r"^Use Watches"))
    use.focus()
    page.keyboard.press("Enter")  # one key press decides
    page.wait_for_function("() => document.querySelector('#review-status').textContent"
                           ".startsWith('Saved')")
    assert page.locator('#queue .entry[data-id="op-1"]').count() == 0
    assert page.locator("#page-info").inner_text() != before  # the count moved on
    shot(page, "review-decided")

    code, st = server.call("GET", "/listings/op-1")
    assert st["category"] == "Watches" and st["source"] == "confirmed"
    assert st["category_path"][0] == "Watches" and "review" not in st
    assert st["corrections"][0]["previous"]["category"] == "Kitchen & Dining"
    assert st["corrections"][0]["by"] == "ana"
    # and its later votes: a near-copy of it now gets Watches from that neighbour
    code, vote = server.call("POST", "/classify", {"title": title})
    assert {n["id"]: n["category"] for n in vote["neighbours"]}["op-1"] == "Watches"
    assert vote["category"] == "Watches"


def test_export_writes_every_listing_of_the_running_server(service, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    from tests.support.offline import ROOT

    server, rows = service
    code, stats = server.call("GET", "/stats")
    out = {}
    for fmt in ("csv", "json"):
        path = tmp_path / f"listings.{fmt}"
        r = subprocess.run([sys.executable, "-m", "vitrine.cli", "export", "--server",
                            server.url, "--format", fmt, "-o", str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"exported {stats['index_size']} listings" in r.stderr
        out[fmt] = path
    with out["csv"].open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["id", "title", "category_path", "source", "confidence", "status"]
    assert len(table) == stats["index_size"] and {r["uniq_id"] for r in rows} <= {
        t["id"] for t in table}
    catalog = next(t for t in table if t["id"] == rows[0]["uniq_id"])
    assert catalog["status"] == "indexed" and catalog["source"] == "seller"
    assert catalog["confidence"] == "1.0000"  # a catalog label
    assert sum(" >> " in t["category_path"] for t in table) > len(table) / 2  # paths
    data = json.loads(out["json"].read_text())
    assert [d["id"] for d in data] == [t["id"] for t in table]
    assert data[0]["category_path"] == table[0]["category_path"].split(" >> ")
    # an operator's correction is what the export says (the test above confirmed op-1)
    op = next((t for t in table if t["id"] == "op-1"), None)
    if op is not None:
        assert op["category_path"].startswith("Watches") and op["source"] == "confirmed"
    bad = subprocess.run([sys.executable, "-m", "vitrine.cli", "export", "--server",
                          "http://127.0.0.1:9"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "no vitrine server answers" in bad.stderr
