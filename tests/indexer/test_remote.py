"""indexer.remote: the public-address predicate, URL validation and the pinned, bounded fetch.

Real sockets only: threaded ``http.server`` servers on 127.0.0.1 (and a trap on 127.0.0.2);
the DNS answers of made-up names come from a resolver passed to the function under test.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from indexer.errors import ImageError, ImageTooLarge, InvalidInput
from indexer.remote import MAX_REDIRECTS, check_url, fetch_image, is_public_address

BODY = b"\x89PNG fake photo bytes" * 10
ALLOW = ["127.0.0.1/32"]  # the test server, as an operator's internal CDN would be
FAST: dict[str, Any] = {"max_bytes": 10_000, "timeout": 5.0, "deadline": 5.0}


# --- the predicate ------------------------------------------------------------------------
@pytest.mark.parametrize("addr,public", [
    ("8.8.8.8", True),
    ("1.1.1.1", True),
    ("2606:4700:4700::1111", True),
    ("::ffff:8.8.8.8", True),          # IPv4-mapped public
    ("64:ff9b::808:808", True),        # NAT64 of a public IPv4
    ("2002:808:808::1", True),         # 6to4 of a public IPv4
    ("127.0.0.1", False),
    ("127.255.255.254", False),
    ("0.0.0.0", False),
    ("0.1.2.3", False),
    ("10.1.2.3", False),
    ("172.16.0.1", False),
    ("192.168.1.1", False),
    ("169.254.169.254", False),        # cloud metadata (link-local)
    ("100.64.0.1", False),             # shared address space
    ("192.0.0.8", False),
    ("192.0.2.1", False),
    ("198.18.0.1", False),
    ("224.0.0.1", False),              # multicast
    ("240.0.0.1", False),
    ("255.255.255.255", False),
    ("::1", False),
    ("::", False),
    ("fe80::1", False),
    ("fe80::1%2", False),
    ("fec0::1", False),                # site-local
    ("fc00::1", False),                # unique local
    ("fd12:3456::1", False),
    ("ff02::1", False),                # multicast
    ("2001:db8::1", False),
    ("100::1", False),
    ("::ffff:127.0.0.1", False),       # IPv4-mapped loopback
    ("::ffff:10.0.0.1", False),
    ("::ffff:169.254.169.254", False),
    ("::7f00:1", False),               # IPv4-compatible 127.0.0.1
    ("::8.8.8.8", False),              # IPv4-compatible: deprecated, refused outright
    ("64:ff9b::7f00:1", False),        # NAT64 of loopback
    ("64:ff9b::a9fe:a9fe", False),     # NAT64 of 169.254.169.254
    ("64:ff9b:1::808:808", False),     # local-use NAT64
    ("2002:7f00:1::", False),          # 6to4 of loopback
    ("2002:a00:1::1", False),          # 6to4 of 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ("not an address", False),
])
def test_public_address_predicate(addr: str, public: bool) -> None:
    assert is_public_address(addr) is public


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.png",
    "http://127.1/a.png",
    "http://0x7f.1/a.png",
    "http://0x7f000001/a.png",
    "http://2130706433/a.png",
    "http://0177.0.0.1/a.png",
    "http://017700000001/a.png",
    "http://127.0.0.1./a.png",
    "http://0/a.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://0xa9fea9fe/",
    "http://[::1]/a.png",
    "http://[::ffff:127.0.0.1]/a.png",
    "http://[::ffff:7f00:1]/a.png",
    "http://[::7f00:1]/a.png",
    "http://[64:ff9b::7f00:1]/a.png",
    "http://[2002:7f00:1::]/a.png",
    "http://[fe80::1]/a.png",
    "https://10.0.0.1:8443/a.png",
])
def test_every_spelling_of_a_non_public_literal_is_refused(url: str) -> None:
    def resolve(*a: Any, **k: Any) -> Any:
        raise AssertionError("an IP literal must not go to the resolver")

    with pytest.raises(InvalidInput, match="non-public"):
        check_url(url, resolve=resolve)
    with pytest.raises(ImageError, match="non-public"):
        fetch_image(url, resolve=resolve, **FAST)
    with pytest.raises(ImageError, match="non-public"):  # also when a proxy is configured
        fetch_image(url, resolve=resolve, proxy="http://127.0.0.1:9", **FAST)


def _answer(*addrs: str) -> Callable[..., list[tuple[Any, ...]]]:
    """A resolver giving ``addrs`` for any name (the shape of ``socket.getaddrinfo``)."""
    def resolve(host: str, port: int, *a: Any, **k: Any) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for addr in addrs:
            if ":" in addr:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port)))
        return out
    return resolve


def _nxdomain(host: str, port: int, *a: Any, **k: Any) -> Any:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.mark.parametrize("answer", [
    _answer("10.1.2.3"),
    _answer("93.184.215.14", "10.1.2.3"),  # one bad address is enough
    _answer("::ffff:10.1.2.3"),
    _answer("64:ff9b::a01:203"),
    _nxdomain,
])
def test_refusal_names_the_host_but_not_what_it_resolves_to(answer: Any) -> None:
    with pytest.raises(InvalidInput) as e:
        check_url("http://cdn.example.com/a.png", resolve=answer)
    msg = str(e.value)
    # the same message whatever the DNS said: no address, no hint of which names exist
    assert msg == ("image_url host 'cdn.example.com' is refused: it does not resolve or "
                   "resolves to a non-public address")
    with pytest.raises(ImageError) as e2:
        fetch_image("http://cdn.example.com/a.png", resolve=answer, **FAST)
    assert str(e2.value) == msg


def test_check_url_allows_public_names_and_the_allowlist() -> None:
    check_url("https://cdn.example.com/a.png", resolve=_answer("93.184.215.14", "2606:2800::1"))
    check_url("http://img.corp/a.png", resolve=_answer("10.20.1.2"),
              allow_networks=["10.20.0.0/16"])
    with pytest.raises(InvalidInput):
        check_url("http://img.corp/a.png", resolve=_answer("10.21.1.2"),
                  allow_networks=["10.20.0.0/16"])
    check_url("http://img.corp/a.png", allow_private=True, resolve=_nxdomain)
    # with a proxy, names are the proxy's to resolve and filter
    check_url("http://img.corp/a.png", proxy="http://proxy:3128", resolve=_nxdomain)


# --- malformed URLs -------------------------------------------------------------------------
@pytest.mark.parametrize("url,needle", [
    ("http://a.com:99999/x", "port"),
    ("http://a.com:abc/", "port"),
    ("http://a.com:0/", "port"),
    ("http://a.com:-1/", "port"),
    ("http://a.com:80:81/", "port"),
    ("http://[::1/x", "bracket"),
    ("http://::1]/x", "bracket"),
    ("http://[::1]x/", "bracket"),
    ("http://[not-v6]/", ""),
    ("http://[fe80::1%25eth0]/", "zone"),
    ("http://xn--a.com/", "xn--"),
    ("http://xn--zz.com/", "xn--"),
    ("http://-a-.com/", "domain name"),
    ("http://a-.com/", "domain name"),
    ("http://" + "a" * 64 + ".com/", "63"),
    ("http://" + ".".join(["a" * 60] * 5) + "/", "253"),
    ("http://a..com/", "domain name"),
    ("http://a_b!.com/", "domain name"),
    ("http://a b.com/", "domain name"),
    ("http://%61.com/", "percent"),
    ("http://1.2.3.4.5/", "IPv4"),
    ("http://256.1.1.1/", "IPv4"),
    ("http://08.1.1.1/", "IPv4"),
    ("http://1.0x100.1.1/", "IPv4"),
    ("http://user:pw@a.com/", "user"),
    ("http://a.com@127.0.0.1/", "user"),
    ("http://a.com\\@127.0.0.1/", ""),
    ("http://", "host"),
    ("http:///x.png", "host"),
    ("http://:80/x.png", "host"),
    ("https://", "host"),
    ("ftp://a.com/x.png", "http"),
    ("file:///etc/passwd", "http"),
    ("javascript:alert(1)", "http"),
    ("//a.com/x.png", "http"),
    ("a.com/x.png", "http"),
    ("", "http"),
    ("http://a.com/\nHost: evil", "control"),
    ("http://a.com/\x00", "control"),
    ("http://a.com/" + "x" * 2048, "2048"),
])
def test_malformed_urls_are_invalid_input(url: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match=f"(?i){needle}"):
        check_url(url, resolve=_nxdomain)
    with pytest.raises(ImageError, match=f"(?i){needle}"):  # what a worker catches
        fetch_image(url, resolve=_nxdomain, **FAST)


def test_odd_but_valid_urls_are_accepted() -> None:
    ok = _answer("93.184.215.14")
    for url in ["HTTP://CDN.Example.COM./a.png", "https://bücher.de/ä b.png?x=1&y=é#frag",
                "http://xn--bcher-kva.de:8080/a", "http://a_b.example.com/", "http://a.com:/x",
                "https://[2606:2800:220:1:248:1893:25c8:1946]:8443/x", "http://93.184.215.14/"]:
        check_url(url, resolve=ok)


# --- a real server --------------------------------------------------------------------------
class Server:
    """A threaded HTTP server with a few behaviours, recording what it was asked."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str | None]] = []  # (path, Host header)
        self.sni: list[str | None] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append((self.path, self.headers.get("Host")))
                path, _, query = self.path.partition("?")
                query = unquote(query)
                if path == "/img":
                    self._send(200, BODY)
                elif path == "/redirect":  # /redirect?<location>
                    self.send_response(302)
                    self.send_header("Location", query)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/loop":
                    self.send_response(301)
                    self.send_header("Location", "/loop")
                    self.end_headers()
                elif path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**9))
                    self.end_headers()
                elif path == "/big-unannounced":  # no Content-Length, close-delimited
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(100):
                        self.wfile.write(b"x" * 4096)
                elif path == "/trickle":  # one byte every 0.1 s, for ever
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    while not server.stop.wait(0.1):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                elif path == "/silent":  # headers, then nothing at all
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.flush()
                    server.stop.wait(30)
                elif path == "/missing":
                    self._send(404, b"no")
                else:  # a proxy gets absolute-form targets
                    self._send(200, b"via proxy " + self.path.encode())

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle(self) -> None:
                try:
                    super().handle()
                except (OSError, ssl.SSLError):
                    pass  # the client hung up (deadline, size limit, bad certificate)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            def sni(sock: Any, name: str | None, ctx: Any) -> None:
                self.sni.append(name)
            tls.sni_callback = sni
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True,
                                                do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class Trap:
    """A listening socket that only counts the connections it gets (it must get none)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        try:
            self.sock.bind((host, 0))
        except OSError:
            self.sock.close()
            pytest.skip(f"cannot listen on {host}")
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def trap() -> Iterator[Trap]:
    t = Trap("127.0.0.2")
    yield t
    t.close()


def test_fetch_needs_the_allowlist_for_a_private_server(server: Server) -> None:
    assert fetch_image(server.url("/img"), allow_networks=ALLOW, **FAST) == BODY
    assert fetch_image(server.url("/img"), allow_private=True, **FAST) == BODY
    with pytest.raises(ImageError, match="non-public"):
        fetch_image(server.url("/img"), **FAST)
    with pytest.raises(ImageError, match="non-public"):
        fetch_image(server.url("/img"), allow_networks=["127.0.0.2/32"], **FAST)
    assert len(server.requests) == 2  # the refused fetches never connected


def test_redirects_are_followed_and_each_hop_is_checked(server: Server, trap: Trap) -> None:
    # within the allowlist: followed (relative and absolute Location)
    assert fetch_image(server.url("/redirect?/img"), allow_networks=ALLOW, **FAST) == BODY
    absolute = server.url("/redirect?" + server.url("/img"))
    assert fetch_image(absolute, allow_networks=ALLOW, **FAST) == BODY
    # to a private address outside the allowlist, however spelled: refused before connecting
    for target in [f"http://127.0.0.2:{trap.port}/x", f"http://0x7f.2:{trap.port}/x",
                   f"http://[::ffff:127.0.0.2]:{trap.port}/x",
                   "http://169.254.169.254/latest/meta-data/", "http://[::1]/x"]:
        with pytest.raises(ImageError, match="redirects to a refused URL.*non-public"):
            fetch_image(server.url("/redirect?" + target), allow_networks=ALLOW, **FAST)
    # to another scheme, or to a malformed URL
    for target in ["file:///etc/passwd", "gopher://127.0.0.1:6379/_", "http://a.com:99999/"]:
        with pytest.raises(ImageError, match="redirects to a refused URL"):
            fetch_image(server.url("/redirect?" + target), allow_networks=ALLOW, **FAST)
    assert trap.connections == 0
    with pytest.raises(ImageError, match=f"more than {MAX_REDIRECTS}"):
        fetch_image(server.url("/loop"), allow_networks=ALLOW, **FAST)
    assert sum(p == "/loop" for p, _ in server.requests) == MAX_REDIRECTS + 1


def test_dns_rebinding_connects_to_the_checked_address_only(server: Server, trap: Trap) -> None:
    calls: list[str] = []

    def rebinding(host: str, port: int, *a: Any, **k: Any) -> Any:
        """Allowed the first time, the trap's address afterwards."""
        calls.append(host)
        addr = "127.0.0.1" if len(calls) == 1 else "127.0.0.2"
        return socket.getaddrinfo(addr, port, *a, **k)  # the real resolver, for real tuples

    url = f"http://photos.test:{server.port}/img"
    assert fetch_image(url, allow_networks=ALLOW, resolve=rebinding, **FAST) == BODY
    assert calls == ["photos.test"]  # resolved once: the check and the connection share it
    assert server.requests[-1] == ("/img", f"photos.test:{server.port}")  # name in Host
    # a second hop to the same name opens a new connection (HTTP/1.0 server): it is resolved
    # and checked again, and the rebound answer is refused instead of used
    calls.clear()
    hop = server.url("/redirect?/img", host="photos.test")
    with pytest.raises(ImageError, match="'photos.test' is refused"):
        fetch_image(hop, allow_networks=ALLOW, resolve=rebinding, **FAST)
    assert calls == ["photos.test", "photos.test"]
    # a forbidden first answer: refused, nothing connected anywhere
    calls.clear()
    calls.append("already answered once")
    with pytest.raises(ImageError, match="refused"):
        fetch_image(url, allow_networks=ALLOW, resolve=rebinding, **FAST)
    assert trap.connections == 0


def test_proxy_environment_variables_are_ignored(server: Server,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                     "all_proxy"):
            monkeypatch.setenv(name, proxy)
        monkeypatch.setenv("NO_PROXY", "")
        assert fetch_image(server.url("/img"), allow_networks=ALLOW, **FAST) == BODY
        assert server.requests == [("/img", f"127.0.0.1:{server.port}")]  # direct, not proxied
    finally:
        dead.close()


def test_an_explicit_proxy_resolves_names_itself(server: Server) -> None:
    def resolve(*a: Any, **k: Any) -> Any:
        raise AssertionError("with a proxy, the target's name is not resolved here")

    got = fetch_image("http://photos.example/a.png", proxy=server.url(""), resolve=resolve,
                      **FAST)
    assert got == b"via proxy http://photos.example/a.png"
    assert server.requests == [("http://photos.example/a.png", "photos.example")]


# a trickling server, and a silent one: each read waits at most until the deadline, not for
# the (longer) per-read timeout
@pytest.mark.parametrize("path", ["/trickle", "/silent"])
def test_a_slow_server_is_cut_off_at_the_deadline(server: Server, path: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="took longer than 1 s"):
        fetch_image(server.url(path), max_bytes=10**6, timeout=30.0, deadline=1.0,
                    allow_networks=ALLOW)
    assert time.monotonic() - t0 < 1.0 + 0.75


def test_a_too_large_photo_is_refused(server: Server) -> None:
    with pytest.raises(ImageTooLarge):  # announced in Content-Length: nothing read
        fetch_image(server.url("/big"), allow_networks=ALLOW, **FAST)
    t0 = time.monotonic()
    with pytest.raises(ImageTooLarge, match="10000 bytes"):  # found while reading
        fetch_image(server.url("/big-unannounced"), allow_networks=ALLOW, **FAST)
    assert time.monotonic() - t0 < 2


def test_fetch_errors_are_image_errors_without_internal_details(server: Server) -> None:
    with pytest.raises(ImageError, match="HTTP 404"):
        fetch_image(server.url("/missing"), allow_networks=ALLOW, **FAST)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    try:
        url = f"http://internal-cdn.test:{dead.getsockname()[1]}/a.png"
        with pytest.raises(ImageError) as e:
            fetch_image(url, allow_networks=ALLOW, resolve=_answer("127.0.0.1"), **FAST)
    finally:
        dead.close()
    assert str(e.value) == "cannot fetch image_url: the connection failed"
    assert e.value.__cause__ is None and e.value.__suppress_context__


# --- TLS on a pinned address ----------------------------------------------------------------
def _certificate(tmp: Path, name: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return key, cert


def test_tls_uses_the_host_name_while_connecting_to_the_pinned_address(tmp_path: Path) -> None:
    key, cert = _certificate(tmp_path, "photos.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server = Server(tls=server_ctx)
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        url = f"https://photos.test:{server.port}/img"
        got = fetch_image(url, allow_networks=ALLOW, resolve=_answer("127.0.0.1"),
                          ssl_context=trusted, **FAST)
        assert got == BODY
        assert server.sni == ["photos.test"]  # SNI: the name, not the address
        assert server.requests == [("/img", f"photos.test:{server.port}")]
        # the certificate is checked against the name in the URL
        other = f"https://other.test:{server.port}/img"
        with pytest.raises(ImageError, match="certificate is not valid"):
            fetch_image(other, allow_networks=ALLOW, resolve=_answer("127.0.0.1"),
                        ssl_context=ssl.create_default_context(cafile=str(cert)), **FAST)
    finally:
        server.close()


def test_a_slow_resolver_is_cut_off_at_the_deadline() -> None:
    def slow(*a: Any, **k: Any) -> Any:
        time.sleep(3)
        return _answer("93.184.215.14")(*a, **k)

    t0 = time.monotonic()
    with pytest.raises(ImageError, match="took longer than 0.5 s"):
        fetch_image("http://slow-dns.example/a.png", max_bytes=1000, timeout=10.0,
                    deadline=0.5, resolve=slow)
    assert time.monotonic() - t0 < 0.5 + 0.75
