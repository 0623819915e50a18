"""Shared fixtures: the offline models and dataset in ../shared, loaded once per session.

The tests run against the real models (../shared/models) and the real dataset; when they are
missing the session fails instead of skipping: a green run must mean the models were used.
``VITRINE_TEST_SHARED`` points elsewhere (default: ``../shared`` beside the repository).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.settings import Settings
from tests.support.offline import CSV, IMAGE_WEIGHTS, TEXT_MODEL, offline_settings

# Fixtures that load the offline models or the dataset: a test using one is ``slow`` (left
# out of `make test-fast`, which runs what needs neither, on small synthetic data).
MODEL_FIXTURES = {"registry", "catalog", "small_catalog", "built", "seed_dir"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionstart(session: pytest.Session) -> None:
    if "not slow" in (session.config.option.markexpr or ""):
        return  # `make test-fast`: nothing selected needs the models
    missing = [p for p in (TEXT_MODEL / "modules.json", IMAGE_WEIGHTS, CSV) if not p.exists()]
    if missing:
        raise pytest.UsageError(
            "offline models/data not found (set VITRINE_TEST_SHARED): "
            + ", ".join(str(p) for p in missing)
        )


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
    from tests.support.service import build_seed, seed_listings

    return build_seed(tmp_path_factory.mktemp("seed"), settings, registry,
                      seed_listings(small_catalog))
