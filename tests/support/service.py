"""Shared helpers of the service and worker tests: a small seeded data dir, photos, polling."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

SEED_PER_CATEGORY = 10  # 70 listings: enough for a vote, quick to embed


def seed_listings(small_catalog: list) -> list:
    per: dict[str, list] = {}
    for x in small_catalog:
        per.setdefault(x.category, [])
        if len(per[x.category]) < SEED_PER_CATEGORY:
            per[x.category].append(x)
    return [x for g in per.values() for x in g]


def build_seed(root: Path, settings: Any, registry: Any, listings: list) -> Path:
    """A data dir whose index snapshot holds ``listings`` (what `vitrine serve --catalog` does)."""
    from indexer.pipeline import Vitrine

    v = Vitrine(settings, registry)
    v.build(listings)
    v.save(root / "index", {"log_pos": 0, "versions": {}})
    return root


def copy_seed(seed: Path, dest: Path) -> Path:
    shutil.copytree(seed, dest)
    return dest


def png(w: int = 64, h: int = 64, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png() -> bytes:
    """A tiny file that decodes to 20000 x 20000 pixels (400 MP): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


def wait_until(cond: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)


def settled(client: Any, lid: str, timeout: float = 60) -> dict[str, Any]:
    """The status of ``lid`` once it is no longer ``queued`` (``client``: a TestClient or
    anything with its ``get``)."""
    def done() -> dict[str, Any] | None:
        r = client.get(f"/listings/{lid}")
        return r.json() if r.status_code == 200 and r.json()["status"] != "queued" else None

    return wait_until(done, timeout)  # type: ignore[no-any-return]


class PhotoServer:
    """A local HTTP server of PNGs that holds the first request for each path until released."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requested: dict[str, threading.Event] = {}
        self.released: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                name = self.path.lstrip("/")
                with server._lock:
                    first = name not in server.requested or not server.requested[name].is_set()
                    server._events(name)[0].set()
                if first:
                    server._events(name)[1].wait(60)
                body = png(color=(30, 120, 60))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _events(self, name: str) -> tuple[Any, Any]:
        import threading

        self.requested.setdefault(name, threading.Event())
        self.released.setdefault(name, threading.Event())
        return self.requested[name], self.released[name]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def wait_requested(self, name: str, timeout: float = 120) -> None:
        with self._lock:
            ev = self._events(name)[0]
        assert ev.wait(timeout), f"the worker never asked for {name}"

    def release(self, name: str) -> None:
        with self._lock:
            self._events(name)[1].set()

    def close(self) -> None:
        for ev in self.released.values():
            ev.set()
        self.httpd.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``vitrine serve`` (embedded: no broker) in its own process group, with the offline
    models, on ``data``; ``env`` adds or overrides settings (``VITRINE_...``)."""

    def __init__(self, data: Path, log: Path, *, args: tuple[str, ...] = (),
                 start_timeout: float = 120, **env: str) -> None:
        from tests.support.offline import ROOT
        from tests.support.workers import worker_env

        self.port = free_port()
        full = worker_env("unused", data, **env)
        full.pop("VITRINE_BROKER_URL")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vitrine.cli", "serve", "--port", str(self.port), *args],
            cwd=ROOT, env=full, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self.up, start_timeout, every=0.2)

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("vitrine serve exited")
        try:
            return self.call("GET", "/health")[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else raw
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"content-type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def rss_peak_mb(self) -> float:
        """The server process's peak resident memory (VmHWM), in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()
