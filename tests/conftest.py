"""Shared fixtures: the offline models and dataset in ../shared, loaded once per session.

The tests run against the real models (../shared/models) and the real dataset; when they are
missing the session fails instead of skipping: a green run must mean the models were used.
``VITRINE_TEST_SHARED`` points elsewhere (default: ``../shared`` beside the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from indexer.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITRINE_TEST_SHARED", ROOT.parent / "shared")).resolve()
TEXT_MODEL = SHARED / "models" / "all-MiniLM-L6-v2"
IMAGE_WEIGHTS = SHARED / "models" / "mobilenet_v2_imagenet" / "model.safetensors"
DATA_DIR = SHARED / "data" / "flipkart-1050"
CSV = DATA_DIR / "flipkart_com-ecommerce_sample_1050.csv"


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [p for p in (TEXT_MODEL / "modules.json", IMAGE_WEIGHTS, CSV) if not p.exists()]
    if missing:
        raise pytest.UsageError(
            "offline models/data not found (set VITRINE_TEST_SHARED): "
            + ", ".join(str(p) for p in missing)
        )


def offline_settings(**kw: object) -> Settings:
    """Settings with the offline models; keyword arguments override."""
    base: dict[str, object] = {
        "text_model": str(TEXT_MODEL),
        "image_model": f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}",
        "torch_threads": 2,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def settings() -> Settings:
    return offline_settings()


@pytest.fixture(scope="session")
def registry(settings: Settings):  # type: ignore[no-untyped-def]
    """One set of loaded encoders for the whole test session."""
    from indexer.encoders.registry import ModelRegistry

    return ModelRegistry(settings)


@pytest.fixture(scope="session")
def catalog():  # type: ignore[no-untyped-def]
    """All 1050 listings of the study's dataset."""
    from indexer.catalog import read_listings

    listings, _ = read_listings(CSV)
    return listings


@pytest.fixture(scope="session")
def small_catalog(catalog):  # type: ignore[no-untyped-def]
    """40 listings per category (280), in a fixed order: quick to embed, enough to vote."""
    per: dict[str, list] = {}
    for x in catalog:
        per.setdefault(x.category, [])
        if len(per[x.category]) < 40:
            per[x.category].append(x)
    return [x for group in per.values() for x in group]


@pytest.fixture(scope="session")
def built(settings, registry, small_catalog):  # type: ignore[no-untyped-def]
    """A Vitrine built on ``small_catalog`` (read-only: copy it with save/load to modify)."""
    from indexer.pipeline import Vitrine

    v = Vitrine(settings, registry)
    v.build(small_catalog)
    return v


@pytest.fixture(scope="session")
def seed_dir(tmp_path_factory: pytest.TempPathFactory, settings, registry,  # type: ignore[no-untyped-def]
             small_catalog) -> Path:
    """A read-only data dir with a 70-listing index; tests copy it with ``copy_seed``."""
    from tests.services.helpers import build_seed, seed_listings

    return build_seed(tmp_path_factory.mktemp("seed"), settings, registry,
                      seed_listings(small_catalog))
