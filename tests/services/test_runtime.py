"""``ingest_many`` when a whole batch raises: each listing is retried alone.

No real input makes the embedding of a batch raise (inputs are validated and a bad photo
only drops its own modality), so the fault is injected: ``Vitrine.embed`` is wrapped to raise
whenever the batch holds the "poison" listing. Everything else is real: the embedded
runtime, the models, the index, the log and the statuses.
"""

from __future__ import annotations

from typing import Any

import pytest

from services.runtime import Runtime, ingest_many, new_version

from .helpers import copy_seed

pytestmark = pytest.mark.slow


def _item(lid: str, title: str) -> tuple[dict[str, Any], None]:
    return {"id": lid, "title": title, "description": "", "category": None,
            "image_url": None, "version": new_version()}, None


def test_a_failing_batch_is_retried_one_by_one(tmp_path, settings, registry, seed_dir,
                                               monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s = settings.model_copy(update={"data_dir": copy_seed(seed_dir, tmp_path / "data"),
                                    "broker_url": None})
    rt = Runtime(s, registry)
    rt.start(consume_inbox=False)
    try:
        v = rt.replica.v
        real_embed = v.embed
        calls: list[list[str]] = []

        def embed(listings, progress=None):  # type: ignore[no-untyped-def]
            calls.append([x.id for x in listings])
            if any(x.id == "poison" for x in listings):
                raise RuntimeError("injected fault")
            return real_embed(listings, progress)

        monkeypatch.setattr(v, "embed", embed)
        items = [_item("r-1", "Analog wrist watch for men"),
                 _item("poison", "Cotton double bed sheet"),
                 _item("r-2", "Stainless steel pressure cooker 5 l")]
        for payload, _ in items:
            rt.status.set(payload["id"], {"status": "queued", "version": payload["version"]})
        before = len(v)
        results = ingest_many(rt, items)

        # one try with the whole batch, then each listing alone
        assert calls == [["r-1", "poison", "r-2"], ["r-1"], ["poison"], ["r-2"]]
        assert [r["status"] for r in results] == ["indexed", "failed", "indexed"]
        assert results[1]["error"] == "internal error while indexing"
        assert rt.status.get("poison")["status"] == "failed"
        assert rt.status.get("r-1")["status"] == rt.status.get("r-2")["status"] == "indexed"
        assert len(v) == before + 2 and "r-1" in v and "r-2" in v and "poison" not in v
        # a redelivery of the same events changes nothing: their outcomes are final
        calls.clear()
        assert [r["status"] for r in ingest_many(rt, items)] == ["indexed", "failed", "indexed"]
        assert calls == [] and len(v) == before + 2
    finally:
        rt.stop()
