"""`vitrine bench chaos` on two cycles: kill -9 under load loses, serves stale and
resurrects nothing (the full run, >= 10 cycles, is the benchmark)."""

import json
import uuid

import pytest
import redis

from tests.support.offline import DATA_DIR, IMAGE_SPEC, TEXT_SPEC
from vitrine.cli import main

REDIS = "redis://127.0.0.1:6379/0"


@pytest.mark.slow
def test_chaos_two_cycles_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VITRINE_TEXT_MODEL", TEXT_SPEC)
    monkeypatch.setenv("VITRINE_IMAGE_MODEL", IMAGE_SPEC)
    monkeypatch.delenv("VITRINE_API_KEY", raising=False)
    out = tmp_path / "chaos.json"
    before = {k for k in redis.Redis.from_url(REDIS).scan_iter("vchaos-*", count=1000)}
    rc = main(["bench", "chaos", "--cycles", "2", "--data", str(DATA_DIR), "--json",
               "--broker", REDIS, "--seed-per-category", "5", "--cycle-seconds", "4",
               "--random-seed", str(uuid.uuid4().int % 1000), "--out", str(out),
               "--logs", str(tmp_path / "logs")])
    r = json.loads(out.read_text())
    assert (r["lost"], r["stale"], r["resurrected"]) == (0, 0, 0), r["examples"]
    assert rc == 0
    assert r["cycles"] == 2 and len(r["kills"]) == 2
    assert all(k["recovery_s"] is not None for k in r["kills"])
    assert r["accepted"] > 0 and r["agree_s"] >= 0 and r["api_digests_match"]
    assert r["seed_missing"] == 0 and r["anomalies"] == 0
    # every key of the bench's prefix is gone
    after = {k for k in redis.Redis.from_url(REDIS).scan_iter("vchaos-*", count=1000)}
    assert not after - before
