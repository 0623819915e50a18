"""The embedded server under faults: kill -9 during ingest, many times; a full disk.

Real ``vitrine serve`` subprocesses on a real data dir; the disk is a real (small) tmpfs
mounted by the test (root, as in CI). Nothing in the product knows it is being tested.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.service import PhotoServer, Server, copy_seed, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def server_factory(tmp_path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    servers: list[Server] = []

    def make(data: Path, **env: str) -> Server:
        # VITRINE_ALLOW_PRIVATE_URLS: the test's photo server is on loopback
        s = Server(data, tmp_path / "serve.log", VITRINE_RETRY_DELAY="0.5",
                   VITRINE_ALLOW_PRIVATE_URLS="true", **env)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def test_kill9_during_ingest_many_times_loses_nothing(tmp_path, seed_dir, server_factory) -> None:  # type: ignore[no-untyped-def]
    data = copy_seed(seed_dir, tmp_path / "data")
    rng = random.Random(7)
    acked: dict[str, int] = {}  # id -> version of its last acknowledged post
    n = 0
    for _ in range(6):
        # every kill mid-round counts an attempt of the listings in the round (a consumer
        # that dies is how poison shows): more attempts than kills, so that none of the six
        # kills dead-letters a listing (CI once saw one given up after 3, on a slow run)
        server = server_factory(data, VITRINE_MAX_ATTEMPTS="10")
        deadline = time.monotonic() + rng.uniform(0.5, 3.0)
        while time.monotonic() < deadline:  # posts (some re-posts) while it indexes
            lid = f"kk-{rng.randrange(max(1, n // 2 + 1))}" if n % 3 == 0 else f"kk-{n}"
            code, body = server.call("POST", "/listings",
                                     {"id": lid, "title": f"Cotton cushion cover {n}"})
            assert code == 202, body
            acked[lid] = body["version"]
            n += 1
        server.kill9()  # mid-ingest, no snapshot, no clean shutdown
    server = server_factory(data, VITRINE_MAX_ATTEMPTS="10")

    def final() -> bool:
        return all(server.call("GET", f"/listings/{lid}")[1].get("status") == "indexed"
                   for lid in acked)

    wait_until(final, 180, every=0.5)
    for lid, version in acked.items():
        st = server.call("GET", f"/listings/{lid}")[1]
        assert st["version"] == version, (lid, st)  # the last acknowledged post won
    health = server.call("GET", "/health")[1]
    assert health["status"] == "ok" and health["pending"] == 0, health
    assert len(acked) >= 12


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (CI runs as root): {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Take every free byte of the filesystem of ``path``."""
    with path.open("wb", buffering=0) as f:  # unbuffered: close has nothing left to flush
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def test_a_full_disk_degrades_health_and_ingest_carries_on_after(small_disk, seed_dir,  # type: ignore[no-untyped-def]
                                                                 server_factory) -> None:
    data = copy_seed(seed_dir, small_disk / "data")
    server = server_factory(data)
    filler = small_disk / "filler"
    _fill(filler)
    code, body = server.call("POST", "/listings", {"id": "df-0", "title": "Glass water bottle"})
    # refused whole (nothing half-accepted), with the reason, and the server stays up
    assert code == 503 and "full" in body["detail"].lower(), body
    assert server.call("GET", "/listings/df-0")[0] == 404
    filler.unlink()
    photos = PhotoServer()
    try:
        # the photo server holds the consumer inside the round while the disk fills up again
        code, body = server.call("POST", "/listings", {
            "id": "df-1", "title": "Steel water bottle", "image_url": photos.url("df-1.png")})
        assert code == 202, body
        photos.wait_requested("df-1.png")
        _fill(filler)
        photos.release("df-1.png")
        wait_until(lambda: server.call("GET", "/health")[1]["status"] == "degraded", 60)
        problems = server.call("GET", "/health")[1]["problems"]
        assert any("full" in p.lower() or "no space" in p.lower() for p in problems), problems
        assert not any(str(small_disk) in p for p in problems), problems  # no paths shown
        assert server.call("GET", "/listings/df-1")[1]["status"] == "queued"
        filler.unlink()
        wait_until(lambda: server.call("GET", "/listings/df-1")[1]["status"] == "indexed", 90)
        wait_until(lambda: server.call("GET", "/health")[1]["status"] == "ok", 30)
    finally:
        photos.close()
