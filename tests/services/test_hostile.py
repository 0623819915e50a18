"""Hostile input against the API: no 5xx, bounded work, keys, backpressure, honest errors.

Where the behaviour depends on the network or the event loop (big bodies while /health is
polled, the server's memory), the tests talk to a real ``vitrine serve`` process; the rest
use the app in-process with the real models and store.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from indexer.errors import VitrineError
from indexer.runtime import Runtime
from services.api import create_app
from tests.support.service import PhotoServer, Server, b64, copy_seed, png, wait_until

pytestmark = pytest.mark.slow

BAD_URLS = [
    "http://example.com:99999/a.jpg", "http://example.com:abc/a.jpg", "http://[::1/a.jpg",
    "http://xn--a.com/a.jpg", "http://-bad-.com/a.jpg", f"http://{'a' * 64}.com/a.jpg",
    "ftp://example.com/a.jpg", "http:///a.jpg", "javascript:alert(1)", "http://ex ample.com/",
    "http://example.com/" + "a" * 3000,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, seed_dir):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("hostile")
    s = Server(copy_seed(seed_dir, tmp / "data"), tmp / "serve.log")
    yield s
    s.stop()


class HealthProbe:
    """Polls /health in a thread; ``worst`` is the slowest answer seen."""

    def __init__(self, server: Server) -> None:
        self.server, self.times, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            code, _ = self.server.call("GET", "/health", timeout=60)
            assert code == 200
            self.times.append(time.perf_counter() - t0)
            time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    @property
    def worst(self) -> float:
        return max(self.times)


def _declared(path: str, length: int, server: Server) -> int:
    """The answer to a POST that announces ``length`` bytes and waits (``Expect:
    100-continue``, as curl does for big uploads) before sending them."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        for k, v in (("Content-Type", "application/json"), ("Content-Length", str(length)),
                     ("Expect", "100-continue")):
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        assert "larger than" in json.loads(r.read())["detail"]
        return r.status
    finally:
        conn.close()


def test_big_and_deep_json_is_refused_without_stalling_the_server(server: Server) -> None:
    many = json.dumps({"id": "x1", "title": "t",
                       "description": [{"a": 1}] * 2_500_000}).encode()  # 25 MB of objects
    deep = b'{"id": "x2", "title": ' + b"[" * 5_000_000 + b"}"
    big = b'{"id": "x3", "title": "' + b"a" * (31 * 1024 * 1024) + b'"}'  # > 30 MiB
    before = server.rss_peak_mb()
    with HealthProbe(server) as probe:
        time.sleep(0.2)
        for body in (many, deep):
            got, answer = server.call("POST", "/listings", raw=body, timeout=60)
            assert got == 422, (got, answer)
        # over the limit: refused on its Content-Length, before a byte of it is read
        assert _declared("/listings", len(big), server) == 413
        assert _declared("/search", 9 * 1024 * 1024, server) == 413  # the queries' limit
        time.sleep(0.2)
    # the loop kept answering: the 27 MB of small objects once blocked every route for 2.5 s
    assert probe.worst < 0.5, sorted(probe.times)[-5:]
    assert server.rss_peak_mb() - before < 250, (before, server.rss_peak_mb())


def _big_png(w: int, h: int) -> bytes:
    """A flat RGBA PNG of ``w`` x ``h`` pixels: megapixels in a few hundred KB."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (w, h), (200, 30, 30, 255)).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def test_big_photos_cost_bounded_memory_on_the_server(server: Server) -> None:
    import httpx

    before = server.rss_peak_mb()
    p25 = _big_png(5000, 5000)  # 25 MP: decoded (within the budget), never at full size twice
    p100 = _big_png(10000, 10000)  # 100 MP: refused from its header
    for _ in range(2):
        r = httpx.post(f"{server.url}/search", data={"k": "3"},
                       files={"image": ("p.png", p25, "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/search", data={"k": "3"},
                   files={"image": ("p.png", p100, "image/png")}, timeout=60)
    assert r.status_code == 413 and "decode" in r.json()["detail"], r.text
    # the 25 MP PNG took ~400 MB to decode before, a 100 MP one 1.6 GB
    assert server.rss_peak_mb() - before < 200, (before, server.rss_peak_mb())


def test_malformed_input_answers_4xx_never_5xx(server: Server) -> None:
    for url in BAD_URLS:
        code, body = server.call("POST", "/listings",
                                 {"id": "u1", "title": "Mug", "image_url": url})
        assert code == 422, (url, code, body)
        assert "detail" in body
    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("/search", b'{"text": "\\ud800"}', {}, 422),  # a lone surrogate
        ("/search", b'{"text": ' + b"[" * 300 + b"}", {}, 422),  # deeper than pydantic's 200
        ("/search", b'{"text": "watch", "k": "5"}', {}, 422),
        ("/search", b'{"text": "watch", "k": 0}', {}, 422),
        ("/search", b'{"text": "' + b"a" * 10_001 + b'"}', {}, 422),
        ("/search", b"[1, 2", {}, 422),
        ("/search", b"", {}, 422),
        ("/search", b"text=watch", {"content-type": "text/plain"}, 415),
        ("/search", b"--x\r\nbroken", {"content-type": "multipart/form-data; boundary=x"}, 422),
        ("/search", b"garbage", {"content-type": "multipart/form-data"}, 422),  # no boundary
        ("/search", b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n",
         {"content-type": "multipart/form-data; boundary=x"}, 422),  # a part with no name
        ("/classify", b'{"title": 5}', {}, 422),
        ("/listings", b'{"id": " bad id", "title": "Mug"}', {}, 422),
        ("/listings", b'{"id": "ok-1", "title": "Mug", "image_base64": "%%%"}', {}, 422),
    ]
    for path, raw, headers, want in cases:
        code, body = server.call("POST", path, raw=raw, headers=headers)
        assert code == want, (path, raw[:40], code, body)
        assert isinstance(body["detail"], str) and "Traceback" not in body["detail"]
    # commas in the text are not JSON values: a description full of them is accepted
    code, body = server.call("POST", "/listings", {"id": "commas-1", "title": "Spice rack",
                                                   "description": "salt, pepper, " * 3000})
    assert code == 202, body
    code, body = server.call("GET", "/listings/" + "a" * 300)
    assert code == 422 and body["errors"][0]["loc"] == ["path", "listing_id"], body


def test_a_photo_upload_searches_and_classifies(server: Server) -> None:
    import httpx

    photo = ("p.png", png(color=(40, 40, 200)), "image/png")
    r = httpx.post(f"{server.url}/search", data={"k": "3"}, files={"image": photo})
    assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
    r = httpx.post(f"{server.url}/classify", data={"title": "Blue cotton towel"},
                   files={"image": photo})
    assert r.status_code == 200 and r.json()["category"], r.text
    r = httpx.post(f"{server.url}/search", data={"k": "3"},
                   files={"image": ("p.png", b"not a photo", "image/png")})
    assert r.status_code == 422, r.text


def test_deletes_racing_queries_never_5xx(server: Server) -> None:
    ids = [f"race-{i}" for i in range(6)]
    for lid in ids:
        assert server.call("POST", "/listings", {"id": lid, "title": f"Wall clock {lid}"})[0] \
            == 202
    wait_until(lambda: all(server.call("GET", f"/listings/{x}")[1].get("status") == "indexed"
                           for x in ids), 60)
    codes: list[int] = []
    stop = threading.Event()

    def query() -> None:
        while not stop.is_set():
            for lid in ids:
                codes.append(server.call("POST", "/search", {"listing_id": lid, "k": 3})[0])
                codes.append(server.call("GET", f"/listings/{lid}")[0])

    readers = [threading.Thread(target=query) for _ in range(2)]
    for t in readers:
        t.start()
    for round_ in range(3):
        for lid in ids:
            codes.append(server.call("DELETE", f"/listings/{lid}")[0])
            codes.append(server.call("POST", "/listings",
                                     {"id": lid, "title": f"Clock {round_}"})[0])
    stop.set()
    for t in readers:
        t.join(30)
    assert set(codes) <= {200, 202, 404}, sorted(set(codes))


# --- in-process: keys, modes, backpressure ---------------------------------------------------
def _app(settings: Any, registry: Any, data: Path, **kw: Any) -> tuple[TestClient, Runtime]:
    s = settings.model_copy(update={"data_dir": data, "broker_url": None, **kw})
    rt = Runtime(s, registry)
    return TestClient(create_app(s, rt)), rt


def test_keys_guard_writes_and_optionally_reads(tmp_path, settings, registry, seed_dir) -> None:  # type: ignore[no-untyped-def]
    client, _ = _app(settings, registry, copy_seed(seed_dir, tmp_path / "d"),
                     api_key="write-secret", read_api_key="read-secret")
    listing = {"id": "k-1", "title": "Steel water bottle"}
    with client:
        for key in (None, "read-secret", "write-secre", "write-secret\u00e9".encode("latin-1")):
            headers = {"X-API-Key": key} if key else {}
            r = client.post("/listings", json=listing, headers=headers)
            assert r.status_code == 401 and r.json() == {"detail": "missing or wrong X-API-Key"}
        assert client.post("/listings", json=listing,
                           headers={"X-API-Key": "write-secret"}).status_code == 202
        assert client.post("/search", json={"text": "bottle"}).status_code == 401
        for key in ("read-secret", "write-secret"):
            r = client.post("/search", json={"text": "bottle"}, headers={"X-API-Key": key})
            assert r.status_code == 200, r.text
        assert client.get("/health").status_code == 200  # for load balancers, no key


def test_production_needs_a_key_and_hides_docs(tmp_path, settings, registry, seed_dir) -> None:  # type: ignore[no-untyped-def]
    data = copy_seed(seed_dir, tmp_path / "d")
    with pytest.raises(VitrineError, match="VITRINE_API_KEY"):
        create_app(settings.model_copy(update={"environment": "production", "api_key": None}))
    client, _ = _app(settings, registry, data, environment="production", api_key="k")
    with client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
        r = client.options("/search", headers={"Origin": "https://shop.example",
                                                "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers  # CORS is opt-in
    client, _ = _app(settings, registry, data, environment="production", api_key="k",
                     docs=True, cors_origins=["https://shop.example"])
    with client:
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
        r = client.options("/search", headers={"Origin": "https://shop.example",
                                                "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://shop.example"


def test_backpressure_past_max_pending(tmp_path, settings, registry, seed_dir) -> None:  # type: ignore[no-untyped-def]
    photos = PhotoServer()  # holds the consumer inside its round: the listings stay pending
    client, rt = _app(settings, registry, copy_seed(seed_dir, tmp_path / "d"), max_pending=2,
                      allow_private_urls=True)
    try:
        with client:
            for i in range(2):
                r = client.post("/listings", json={"id": f"bp-{i}", "title": "Desk lamp",
                                                   "image_url": photos.url(f"bp-{i}.png")})
                assert r.status_code == 202, r.text
            photos.wait_requested("bp-0.png")
            time.sleep(1.1)  # the backlog is counted at most once a second
            r = client.post("/listings", json={"id": "bp-2", "title": "Desk lamp"})
            assert r.status_code == 503 and r.headers["retry-after"].isdigit(), r.text
            assert client.get("/listings/bp-2").status_code == 404  # nothing half-accepted
            photos.release("bp-0.png")
            photos.release("bp-1.png")
            wait_until(lambda: rt.store.pending_count() == 0, 60)
            time.sleep(1.1)
            r = client.post("/listings", json={"id": "bp-2", "title": "Desk lamp",
                                               "image_base64": b64(png())})
            assert r.status_code == 202, r.text
    finally:
        photos.close()


# --- photo URLs through the running server ----------------------------------------------------
class HostileHttp:
    """A loopback server of slow, redirecting and good photos, and a trap on 127.0.0.2 that
    counts the connections it gets (there must be none)."""

    def __init__(self) -> None:
        import socket
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.trap = socket.socket()
        self.trap.bind(("127.0.0.2", 0))
        self.trap.listen()
        self.trap.settimeout(0.1)
        trap_port = self.trap.getsockname()[1]
        photo = png(color=(200, 120, 20))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/trickle.png":  # one byte every half second, for ever
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(10_000):
                            self.wfile.write(b"\x89")
                            self.wfile.flush()
                            time.sleep(0.5)
                    except OSError:
                        return
                elif self.path == "/redirect.png":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.2:{trap_port}/x.png")
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(photo)))
                    self.end_headers()
                    self.wfile.write(photo)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def trapped(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.trap.accept()
            except TimeoutError:
                return n
            conn.close()
            n += 1

    def close(self) -> None:
        self.httpd.shutdown()
        self.trap.close()


def test_photo_urls_trickle_and_redirects_are_cut_off(tmp_path, seed_dir) -> None:  # type: ignore[no-untyped-def]
    web = HostileHttp()
    # only the test's own server is allowed (an operator's internal photo CDN, say)
    server = Server(copy_seed(seed_dir, tmp_path / "data"), tmp_path / "serve.log",
                    VITRINE_FETCH_ALLOW_NETWORKS='["127.0.0.1/32"]', VITRINE_FETCH_DEADLINE="3")
    try:
        post = {"trickle": web.url("trickle.png"), "redirect": web.url("redirect.png"),
                "good": web.url("good.png")}
        t0 = time.monotonic()
        for name, url in post.items():
            code, body = server.call("POST", "/listings", {"id": f"url-{name}",
                                                           "title": "Leather office chair",
                                                           "image_url": url})
            assert code == 202, body
        # a photo URL on a non-allowed private address is refused when it is posted
        code, body = server.call("POST", "/listings", {"id": "url-private", "title": "Chair",
                                                       "image_url": "http://127.0.0.2/x.png"})
        assert code == 422 and "127.0.0.2" in body["detail"] and "non-public" in body["detail"]

        def done(lid: str) -> dict[str, Any] | None:
            st = server.call("GET", f"/listings/{lid}")[1]
            return st if st.get("status") in ("indexed", "failed") else None

        trickle = wait_until(lambda: done("url-trickle"), 60)
        # indexed from its text, the photo dropped at the deadline, with the reason
        assert trickle["status"] == "indexed" and "longer than" in trickle["warning"], trickle
        redirect = wait_until(lambda: done("url-redirect"), 60)
        assert redirect["status"] == "indexed" and "refused" in redirect["warning"], redirect
        assert "warning" not in wait_until(lambda: done("url-good"), 60)
        assert time.monotonic() - t0 < 3 + 30  # the deadline held: no trickle for hours
        assert web.trapped() == 0  # nothing ever connected to the private address
        # later listings keep flowing
        assert server.call("POST", "/listings", {"id": "url-after", "title": "Desk"})[0] == 202
        assert wait_until(lambda: done("url-after"), 30)["status"] == "indexed"
    finally:
        server.stop()
        web.close()
