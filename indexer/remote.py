"""Fetch a seller's ``image_url`` safely: public addresses only, bounded size and time.

How the address check cannot be bypassed:

* **One resolution, pinned.** The download runs on httpcore with a network backend of our own
  (:class:`_PinnedBackend`): when a connection is opened, the host is resolved *once*, every
  address it resolves to is checked, and the TCP connection goes to one of those checked
  addresses. Nothing resolves the name a second time, so a DNS answer that changes between
  the check and the connection (rebinding) is never used. The Host header, TLS SNI and the
  certificate check still use the host name of the URL.
* **Every hop.** Redirects are followed here (at most :data:`MAX_REDIRECTS`); each new origin
  opens a new connection, which goes through the same resolve-check-connect step.
* **No proxy from the environment.** ``HTTP_PROXY`` & co are never read. A proxy is used only
  when one is named explicitly (``fetch_proxy`` setting); host names are then resolved by the
  proxy, *which is responsible for egress filtering* (only IP literals are checked here).
* **One predicate.** :func:`is_public_address` decides for every address, whatever its
  spelling: IPv4-mapped, IPv4-compatible, NAT64, 6to4 and Teredo IPv6 addresses are unwrapped
  and their embedded IPv4 checked too; numeric hosts are parsed the way browsers and
  ``inet_aton`` do (``0x7f.1``, ``2130706433``, ``0177.0.0.1``, ``127.1``).
* **Whole-download deadline.** Every socket operation (DNS, connect, TLS handshake, each read
  and write) is bounded by the time left before the deadline, and the deadline is checked
  between chunks, so a server trickling one byte at a time is cut off at the deadline.
* **Quiet errors.** Messages name the host the caller gave, never what it resolved to, and
  never an exception text that could carry internal addresses. Every problem, a malformed
  URL included, is an :class:`~indexer.errors.ImageError` (an ``InvalidInput``).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpcore

from .errors import ImageError, ImageTooLarge

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
MAX_URL_LENGTH = 2048
DEFAULT_DEADLINE = 15.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``socket.getaddrinfo`` or a callable with its signature and result.
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

# Ranges that are not publicly routable but that some Python versions' ``is_global`` misses.
_NOT_PUBLIC_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8",        # "this network"
    "100.64.0.0/10",    # shared address space (carrier-grade NAT)
    "192.0.0.0/24",     # IETF protocol assignments
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation
    "192.88.99.0/24",   # 6to4 relay anycast (deprecated)
    "198.18.0.0/15",    # benchmarking
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, broadcast
))
_NOT_PUBLIC_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96",            # IPv4-compatible (deprecated), unspecified, loopback
    "64:ff9b:1::/48",   # local-use NAT64 (RFC 8215): not globally reachable
    "100::/64",         # discard-only
    "2001::/23",        # IETF protocol assignments (Teredo included)
    "2001:db8::/32", "3fff::/20",  # documentation
    "fc00::/7",         # unique local
    "fe80::/10", "fec0::/10",  # link-local, site-local (deprecated)
    "ff00::/8",         # multicast
))
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"(?:0[x][0-9a-f]*|[0-9]+)")
_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}


# --- the address predicate ----------------------------------------------------------------
def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, NAT64, compatible, 6to4, Teredo)."""
    found: list[ipaddress.IPv4Address] = []
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if addr in _NAT64_WELL_KNOWN or addr in _NAT64_LOCAL or addr in _IPV4_COMPATIBLE:
        # NAT64 (both prefixes, /96 layout) and IPv4-compatible ``::a.b.c.d``: the low 32 bits
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    return found


def _is_public_v4(addr: ipaddress.IPv4Address) -> bool:
    return (addr.is_global and not (
        addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
        or addr.is_reserved or addr.is_unspecified
    ) and not any(addr in net for net in _NOT_PUBLIC_V4))


def is_public_address(addr: IPAddress | str) -> bool:
    """Whether ``addr`` is a public unicast address that may be fetched from.

    Refuses loopback, private, link-local, unique-local, site-local, unspecified, multicast,
    reserved, shared (100.64/10), documentation and benchmarking ranges. An IPv6 address that
    embeds an IPv4 one (``::ffff:a.b.c.d``, ``::a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``, 6to4
    ``2002:aabb:ccdd::``, Teredo) is public only if the IPv4 it carries is public too; the
    IPv4-compatible, local-use NAT64 and Teredo forms are refused outright. A string that is
    not an IP address is not public.
    """
    if isinstance(addr, str):
        try:
            addr = ipaddress.ip_address(addr)
        except ValueError:
            return False
    if isinstance(addr, ipaddress.IPv4Address):
        return _is_public_v4(addr)
    if addr.scope_id:
        return False
    embedded = _embedded_ipv4(addr)
    if embedded and not all(_is_public_v4(v4) for v4 in embedded):
        return False
    if addr in _IPV4_MAPPED or addr in _NAT64_WELL_KNOWN:
        return True  # a translation of the (public) IPv4 checked above
    return (addr.is_global and not (
        addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_site_local
        or addr.is_multicast or addr.is_reserved or addr.is_unspecified
    ) and not any(addr in net for net in _NOT_PUBLIC_V6))


def parse_networks(networks: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """CIDR strings (``10.20.0.0/16``, ``fd00:1::/64``) as networks; ValueError if invalid."""
    return tuple(n if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network)
                 else ipaddress.ip_network(n.strip()) for n in networks)


@dataclass(frozen=True)
class _Policy:
    allow_private: bool
    allow_networks: tuple[IPNetwork, ...]

    def allows(self, addr: IPAddress) -> bool:
        return (self.allow_private or any(addr in net for net in self.allow_networks)
                or is_public_address(addr))


# --- URL parsing --------------------------------------------------------------------------
def _ipv4_from_numeric(host: str) -> ipaddress.IPv4Address:
    """A host whose last label is a number, parsed like ``inet_aton``/browsers do."""
    parts = host.split(".")
    if parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4:
        raise ValueError(host)
    if not all(_NUMERIC_LABEL.fullmatch(p) for p in parts):
        raise ValueError(host)
    nums = []
    for p in parts:
        if p.startswith("0x"):
            nums.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            nums.append(int(p, 8))  # ValueError on 8 or 9
        else:
            nums.append(int(p))
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise ValueError(host)
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _hostname(host: str) -> str:
    """The ASCII (IDNA) form of a DNS name, or ValueError with the reason."""
    if "%" in host:
        raise ValueError("a host must not be percent-encoded")
    ascii_host = host
    if not host.isascii():
        try:
            ascii_host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise ValueError("not a valid internationalized domain name") from None
    labels = ascii_host.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()  # the root of a fully qualified name
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a valid domain name (letters, digits and hyphens, labels of "
                         "1 to 63 characters, no hyphen at either end, 253 characters at most)")
    try:
        ascii_host.encode("ascii").decode("idna")  # a bad 'xn--' label does not round-trip
    except UnicodeError:
        raise ValueError("not a valid internationalized domain name (bad 'xn--' label)") \
            from None
    return ascii_host


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # IDNA, lower case, or the canonical IP literal (no brackets)
    ip: IPAddress | None  # set when the host is an IP literal
    port: int
    target: str  # path and query, ASCII

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _parse(url: object) -> _Target:
    """Validate an image URL; every problem is an ImageError with a plain message."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url must be an http(s) URL with a host")
    if len(url) > MAX_URL_LENGTH:
        raise ImageError(f"image_url is longer than {MAX_URL_LENGTH} characters")
    if any(c < " " or c == "\x7f" for c in url):
        raise ImageError("image_url must not contain control characters")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ImageError("image_url is not a valid URL (check the brackets around the host)") \
            from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc:
        raise ImageError("image_url must be an http(s) URL with a host")
    netloc = parts.netloc
    if "@" in netloc:
        raise ImageError("image_url must not contain a user name or password")
    if "\\" in netloc:
        raise ImageError("image_url host must not contain a backslash")
    if netloc.startswith("["):
        end = netloc.find("]")
        host_text, port_text = netloc[1:end], netloc[end + 1:]
        if end < 0 or (port_text and not port_text.startswith(":")):
            raise ImageError("image_url has unbalanced brackets around its host")
        try:
            ip: IPAddress | None = ipaddress.IPv6Address(host_text)
        except ValueError:
            raise ImageError("image_url has an invalid IPv6 address in brackets") from None
        if "%" in host_text:
            raise ImageError("image_url must not name an IPv6 zone")
        host = str(ip)
        port_text = port_text[1:] if port_text else ""
    else:
        if "[" in netloc or "]" in netloc:
            raise ImageError("image_url has unbalanced brackets around its host")
        host_text, _, port_text = netloc.partition(":")
        if not host_text:
            raise ImageError("image_url has an empty host")
        host_text = host_text.lower()
        labels = host_text.rstrip(".").split(".") if host_text.rstrip(".") else [""]
        if _NUMERIC_LABEL.fullmatch(labels[-1]):
            try:
                ip = _ipv4_from_numeric(host_text)
            except ValueError:
                raise ImageError("image_url host is not a valid IPv4 address") from None
            host = str(ip)
        else:
            ip = None
            try:
                host = _hostname(host_text)
            except ValueError as e:
                raise ImageError(f"image_url host is invalid: {e}") from None
    port = _DEFAULT_PORTS[scheme]
    if port_text:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ImageError("image_url has an invalid port (a number from 1 to 65535)")
        port = int(port_text)
    # the request target: keep %-escapes, escape the rest (non-ASCII included)
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return _Target(url=url, scheme=scheme, host=host, ip=ip, port=port, target=target)


def _refused(host: str, ip: IPAddress | None) -> ImageError:
    # the same message whether the name does not resolve or resolves to a refused address:
    # an answer must not tell which internal names exist, nor what they resolve to
    if ip is not None:
        return ImageError(f"image_url host {host!r} is refused: non-public address")
    return ImageError(f"image_url host {host!r} is refused: it does not resolve or "
                      "resolves to a non-public address")


# --- resolution, bounded in time ----------------------------------------------------------
def _resolve(resolve: Resolver, host: str, port: int, timeout: float) -> list[IPAddress]:
    """``resolve`` in a helper thread, so that a slow DNS server cannot outlast ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["infos"] = resolve(host, port, type=socket.SOCK_STREAM)
        except Exception as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, name="resolve", daemon=True)
    thread.start()
    thread.join(max(timeout, 0.0))
    if thread.is_alive():
        raise TimeoutError(host)
    if "error" in box:
        raise OSError("does not resolve") from box["error"]
    addrs: list[IPAddress] = []
    for info in box["infos"]:
        addr = ipaddress.ip_address(str(info[4][0]))  # ValueError on anything odd
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise OSError("no address")
    return addrs


def _vetted(host: str, port: int, policy: _Policy, resolve: Resolver,
            timeout: float) -> list[IPAddress]:
    """The addresses of ``host`` (a name or an IP literal) if every one is allowed."""
    ip = _ip_or_none(host)
    if ip is not None:
        addrs = [ip]
    else:
        try:
            addrs = _resolve(resolve, host, port, timeout)
        except (OSError, ValueError):  # TimeoutError is an OSError
            raise _refused(host, None) from None
    if not all(policy.allows(a) for a in addrs):
        raise _refused(host, ip)
    return addrs


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class UrlPolicy(TypedDict):
    """Keyword arguments of :func:`check_url` and :func:`fetch_image` taken from the
    settings: which hosts a photo may come from, and through what."""

    allow_private: bool
    allow_networks: Sequence[str]
    proxy: str | None


def url_policy(settings: Settings) -> UrlPolicy:
    """The URL policy configured in ``settings``: the API checks a posted ``image_url`` and
    the consumer fetches it under the same one."""
    return UrlPolicy(allow_private=settings.allow_private_urls,
                     allow_networks=settings.fetch_allow_networks, proxy=settings.fetch_proxy)


def check_url(
    url: str,
    allow_private: bool = False,
    *,
    allow_networks: Iterable[str | IPNetwork] = (),
    proxy: str | None = None,
    resolve: Resolver = socket.getaddrinfo,
    timeout: float = 5.0,
) -> None:
    """Refuse a malformed URL, or one whose host is not public, with an ImageError.

    The URL must be ``http(s)://host[:port]/...`` with no user info, at most
    :data:`MAX_URL_LENGTH` characters, a valid DNS/IDNA name or IP literal and a port in
    1..65535. Unless ``allow_private``, the host is resolved (``resolve``, within ``timeout``
    seconds) and every address it resolves to must be public (:func:`is_public_address`) or in
    ``allow_networks``. With a ``proxy``, host names are not resolved here (the proxy resolves
    and filters them); IP literals are still checked. This is the early check of the API;
    :func:`fetch_image` does its own, on the addresses it then connects to.
    """
    t = _parse(url)
    policy = _Policy(allow_private, parse_networks(allow_networks))
    if allow_private or (proxy is not None and t.ip is None):
        return
    _vetted(t.host, t.port, policy, resolve, timeout)


# --- the download -------------------------------------------------------------------------
class _Clock:
    """The deadline of one download: bounds every socket operation by the time left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def expired(self) -> ImageError:
        return ImageError(f"image_url took longer than {self.seconds:g} s to download")

    def check(self) -> None:
        if time.monotonic() >= self.end:
            raise self.expired()

    def bound(self, timeout: float | None) -> tuple[float, bool]:
        """(the timeout to use, whether it is the deadline's); raises once past it."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.expired()
        if timeout is None or left < timeout:
            return left, True
        return timeout, False


class _Stream(httpcore.NetworkStream):
    """A network stream whose every read, write and handshake ends by the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, clock: _Clock) -> None:
        self._inner = inner
        self._clock = clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        t, by_deadline = self._clock.bound(timeout)
        try:
            return self._inner.read(max_bytes, t)
        except httpcore.ReadTimeout:
            if by_deadline:
                raise self._clock.expired() from None
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        t, by_deadline = self._clock.bound(timeout)
        try:
            self._inner.write(buffer, t)
        except httpcore.WriteTimeout:
            if by_deadline:
                raise self._clock.expired() from None
            raise

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        t, by_deadline = self._clock.bound(timeout)
        try:
            return _Stream(self._inner.start_tls(ssl_context, server_hostname, t), self._clock)
        except httpcore.ConnectTimeout:
            if by_deadline:
                raise self._clock.expired() from None
            raise

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens TCP connections to checked addresses only, resolving each host once.

    With ``vet`` false (a proxy is configured) it connects to the proxy as named, still
    within the deadline.
    """

    def __init__(self, policy: _Policy, resolve: Resolver, clock: _Clock, *, vet: bool) -> None:
        self._policy = policy
        self._resolve = resolve
        self._clock = clock
        self._vet = vet
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                    ) -> httpcore.NetworkStream:
        t, _ = self._clock.bound(timeout)
        if self._vet:
            try:
                addrs = _vetted(host, port, self._policy, self._resolve, t)
            except ImageError:
                self._clock.check()  # a resolution the deadline cut short says so
                raise
        elif (ip := _ip_or_none(host)) is not None:
            addrs = [ip]
        else:
            try:
                addrs = _resolve(self._resolve, host, port, t)
            except (OSError, ValueError):
                raise ImageError("cannot fetch image_url: the proxy does not resolve") from None
        error: Exception | None = None
        for addr in addrs:  # each is checked: connect to it, never to the name
            t, by_deadline = self._clock.bound(timeout)
            try:
                stream = self._sockets.connect_tcp(str(addr), port, timeout=t,
                                                   local_address=local_address,
                                                   socket_options=socket_options)
                return _Stream(stream, self._clock)
            except httpcore.ConnectTimeout as e:
                if by_deadline:
                    raise self._clock.expired() from None
                error = e
            except httpcore.ConnectError as e:
                error = e
        assert error is not None
        raise error

    def sleep(self, seconds: float) -> None:
        t, _ = self._clock.bound(seconds)
        time.sleep(t)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return value.decode("latin-1")
    return None


def _describe(e: Exception) -> str:
    """A short, address-free description of a network failure."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "its TLS certificate is not valid for the host"
        if isinstance(cause, ssl.SSLError):
            return "the TLS handshake failed"
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, httpcore.ConnectTimeout):
        return "the connection timed out"
    if isinstance(e, httpcore.ConnectError):
        return "the connection failed"
    if isinstance(e, httpcore.TimeoutException):
        return "the server stopped answering"
    if isinstance(e, httpcore.ProxyError):
        return "the proxy refused the request"
    if isinstance(e, httpcore.ProtocolError):
        return "the server's answer is not valid HTTP"
    return "the connection was lost"


@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    """certifi's CAs, loaded once (an SSLContext may be shared between threads)."""
    return httpcore.default_ssl_context()


def _proxy_pool(proxy: str, ssl_context: ssl.SSLContext,
                backend: httpcore.NetworkBackend) -> httpcore.HTTPProxy:
    parts = urlsplit(proxy)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("fetch_proxy must be an http:// or https:// URL")
    auth = None
    if parts.username is not None:
        auth = (unquote(parts.username), unquote(parts.password or ""))
    netloc = parts.netloc.rpartition("@")[2]
    return httpcore.HTTPProxy(proxy_url=f"{parts.scheme}://{netloc}/", proxy_auth=auth,
                              ssl_context=ssl_context, network_backend=backend, retries=0)


def fetch_image(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    deadline: float = DEFAULT_DEADLINE,
    allow_private: bool = False,
    allow_networks: Iterable[str | IPNetwork] = (),
    proxy: str | None = None,
    resolve: Resolver = socket.getaddrinfo,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """Download the photo at ``url``: at most ``max_bytes``, within ``deadline`` seconds.

    ``timeout`` bounds each connect, read and write; ``deadline`` the whole download (DNS,
    connections, TLS, redirects, body). Each connection goes to an address that was checked
    (public, in ``allow_networks``, or anything with ``allow_private``), resolved once by
    ``resolve``; at most :data:`MAX_REDIRECTS` redirects, each checked the same way. Proxy
    environment variables are ignored; with ``proxy`` (an ``http(s)://`` URL), requests go
    through it and it must filter egress itself. ``ssl_context``: the certificates trusted
    (default: certifi's). Raises ImageTooLarge over ``max_bytes`` and ImageError for anything
    else (a refused or malformed URL, an HTTP error status, the deadline...), with messages
    that do not reveal resolved addresses.
    """
    t = _parse(url)
    clock = _Clock(deadline)
    policy = _Policy(allow_private, parse_networks(allow_networks))
    if t.ip is not None and not policy.allows(t.ip):  # before anything, proxy or not
        raise _refused(t.host, t.ip)
    context = ssl_context if ssl_context is not None else _default_ssl_context()
    backend = _PinnedBackend(policy, resolve, clock, vet=proxy is None)
    pool: httpcore.ConnectionPool | httpcore.HTTPProxy = (
        httpcore.ConnectionPool(ssl_context=context, network_backend=backend, retries=0)
        if proxy is None else _proxy_pool(proxy, context, backend))
    timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    with pool:
        for _ in range(MAX_REDIRECTS + 1):
            port = None if t.port == _DEFAULT_PORTS[t.scheme] else t.port
            request_url = httpcore.URL(scheme=t.scheme.encode(), host=t.host.encode(),
                                       port=port, target=t.target.encode())
            headers = [(b"Host", t.host_header.encode()), (b"User-Agent", b"vitrine-fetch/1"),
                       (b"Accept", b"image/*"), (b"Accept-Encoding", b"identity")]
            try:
                with pool.stream("GET", request_url, headers=headers,
                                 extensions={"timeout": timeouts}) as r:
                    location = _header(r.headers, b"location")
                    if r.status in _REDIRECTS and location:
                        try:
                            t = _parse(urljoin(t.url, location))
                            if t.ip is not None and not policy.allows(t.ip):
                                raise _refused(t.host, t.ip)
                        except ImageError as e:
                            raise ImageError(f"image_url redirects to a refused URL: {e}") \
                                from None
                        continue
                    if r.status != 200:
                        raise ImageError(f"image_url answered HTTP {r.status}")
                    size = _header(r.headers, b"content-length")
                    if size is not None and size.strip().isdigit() and int(size) > max_bytes:
                        raise ImageTooLarge(f"image_url is larger than {max_bytes} bytes")
                    buf = bytearray()
                    for chunk in r.iter_stream():
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise ImageTooLarge(f"image_url is larger than {max_bytes} bytes")
                        clock.check()
                    return bytes(buf)
            except ImageError:
                raise
            except Exception as e:  # noqa: BLE001 - network input: never a 500, never a leak
                log.info("fetching an image_url failed: %r", e)
                raise ImageError(f"cannot fetch image_url: {_describe(e)}") from None
    raise ImageError(f"image_url redirects more than {MAX_REDIRECTS} times")
