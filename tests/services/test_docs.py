"""``/docs`` works without internet: Swagger UI's JS and CSS come from the app, not a CDN.

No model is loaded: the app is not started (no lifespan), and the docs need no runtime.
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from services.api import create_app


def _client(settings, tmp_path, **kw) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(create_app(settings.model_copy(update={"data_dir": tmp_path, **kw})))


def test_docs_use_only_local_assets(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = _client(settings, tmp_path, docs=True)
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", r.text), "the docs page points at a remote host"
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
    url = re.findall(r"""url:\s*["']([^"']+)["']""", r.text)
    assert url == ["/openapi.json"], url
    kinds = {}
    for u in urls:
        assert u.startswith("/"), u
        a = client.get(u)
        assert a.status_code == 200, u
        kinds[u.rsplit(".", 1)[-1]] = (a.headers["content-type"], len(a.content))
    assert kinds["js"][0].startswith(("text/javascript", "application/javascript"))
    assert kinds["css"][0].startswith("text/css")
    assert kinds["js"][1] > 500_000 and kinds["css"][1] > 50_000  # the real bundle
    assert client.get(url[0]).json()["openapi"].startswith("3.1")  # what Swagger UI 5 reads
    assert "/docs" not in client.get(url[0]).json()["paths"]


def test_root_path_prefixes_the_asset_urls(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = TestClient(create_app(settings.model_copy(update={"data_dir": tmp_path,
                                                               "docs": True})),
                        root_path="/api")
    html = client.get("/docs").text
    assert "/api/docs/assets/swagger-ui-bundle.js" in html and "'/api/openapi.json'" in html


def test_no_docs_no_assets(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = _client(settings, tmp_path, docs=False)
    for path in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/openapi.json"):
        assert client.get(path).status_code == 404, path


def test_review_routes_declare_their_problems(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = _client(settings, tmp_path, docs=True).get("/openapi.json").json()
    paths = spec["paths"]
    put = paths["/listings/{listing_id}/category"]["put"]
    assert set(put["responses"]) == {"200", "401", "404", "409", "413", "415", "422", "503"}
    assert "changed since" in put["responses"]["409"]["description"]  # this route's 409
    assert put["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Problem")
    assert list(put["requestBody"]["content"]) == ["application/json"]  # no photo: no form
    assert put["security"] == [{"APIKeyHeader": []}]
    review = paths["/review"]["get"]
    assert set(review["responses"]) == {"200", "401", "409", "422", "503"}
    assert set(review["responses"]["200"]["content"]) == {"application/json", "text/html"}
    assert {p["name"] for p in review["parameters"]} == {"reason", "offset", "limit"}
    assert review["security"] == [{"APIKeyHeader": []}]
    assert set(paths["/categories"]["get"]["responses"]) == {"200", "401", "409"}
