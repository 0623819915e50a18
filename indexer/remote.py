"""Fetch a seller's ``image_url`` safely: public addresses only, bounded size and time."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlsplit

import httpx

from .errors import ImageError, ImageTooLarge, InvalidInput

MAX_REDIRECTS = 3


def check_url(url: str, allow_private: bool = False) -> None:
    """Refuse non-http(s) URLs and hosts resolving to loopback/private/link-local addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("image_url must be an http(s) URL with a host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise ImageError(f"image_url host {parts.hostname!r} does not resolve") from e
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise InvalidInput(
                f"image_url host {parts.hostname!r} is a non-public address ({addr}); "
                "refused (set VITRINE_ALLOW_PRIVATE_URLS=true to allow)"
            )


def fetch_image(url: str, *, max_bytes: int, timeout: float, allow_private: bool = False) -> bytes:
    """Download at most ``max_bytes`` within ``timeout`` seconds; every redirect is re-checked.

    The host is resolved and checked before each request; a DNS answer that changes between
    the check and the connection (rebinding) is the residual risk, bounded by the timeout.
    """
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url, allow_private)
            try:
                with client.stream("GET", url) as r:
                    if r.is_redirect and "location" in r.headers:
                        url = urljoin(url, r.headers["location"])
                        continue
                    if r.status_code != 200:
                        raise ImageError(f"image_url answered HTTP {r.status_code}")
                    size = int(r.headers.get("content-length") or 0)
                    if size > max_bytes:
                        raise ImageTooLarge(f"image_url is larger than {max_bytes} bytes")
                    buf = bytearray()
                    for chunk in r.iter_bytes():
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise ImageTooLarge(f"image_url is larger than {max_bytes} bytes")
                    return bytes(buf)
            except httpx.HTTPError as e:
                raise ImageError(f"cannot fetch image_url: {type(e).__name__}: {e}") from e
    raise ImageError("image_url redirects too many times")
