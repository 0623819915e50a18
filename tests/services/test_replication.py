"""The local log and the URL guard: pure, no models."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.errors import InvalidInput
from services.fetch import check_url
from services.replication import LocalLog, _pos_ge, decode_entry, encode_entry


def test_entry_roundtrip_keeps_the_vector_exactly() -> None:
    vec = np.random.default_rng(0).normal(size=17).astype(np.float32)
    e = decode_entry(encode_entry({"op": "upsert", "id": "a", "vec": vec, "meta": {"t": 1}}))
    assert e["id"] == "a" and e["meta"] == {"t": 1}
    np.testing.assert_array_equal(e["vec"], vec)


def test_local_log_survives_reopen_and_trim(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "log.jsonl"
    log = LocalLog(path)
    positions = [log.append({"op": "delete", "id": f"x{i}"}) for i in range(5)]
    assert positions == ["1", "2", "3", "4", "5"]
    assert [e["id"] for _, e in log.read("2")] == ["x2", "x3", "x4"]
    log.trim("5")  # everything is in a snapshot: the numbering must still go on
    log.close()
    with path.open("a") as f:
        f.write('6\t{"op": "del')  # a torn last line, as after a crash mid-write
    log = LocalLog(path)
    assert log.last() == "5"
    assert log.append({"op": "delete", "id": "y"}) == "6"
    assert [e["id"] for _, e in log.read("5")] == ["y"]
    log.close()
    log = LocalLog(path)  # the torn line is gone, "y" is intact
    assert [e["id"] for _, e in log.read("5")] == ["y"]
    log.ensure_after("40")
    assert log.append({"op": "delete", "id": "z"}) == "41"
    log.close()


def test_positions_compare_like_stream_ids() -> None:
    assert _pos_ge("1700-1", "1700-0") and _pos_ge("12", "9") and not _pos_ge("0-0", "1-0")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.png", "http://localhost/a.png", "http://[::1]/a.png",
    "http://192.168.1.10/x", "http://172.16.0.1/x", "http://169.254.169.254/meta",
    "http://0.0.0.0/x", "ftp://example.com/a.png", "file:///etc/passwd", "http:///nohost",
])
def test_private_and_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        check_url(url)


def test_private_urls_allowed_when_configured() -> None:
    check_url("http://127.0.0.1:8000/a.png", allow_private=True)
