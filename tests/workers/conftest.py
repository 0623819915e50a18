from __future__ import annotations

from pathlib import Path

import pytest

from tests.services.helpers import build_seed, seed_listings


@pytest.fixture(scope="session")
def seed_dir(tmp_path_factory: pytest.TempPathFactory, settings, registry,  # type: ignore[no-untyped-def]
             small_catalog) -> Path:
    """A read-only data dir with a 70-listing index; tests copy it with ``copy_seed``."""
    return build_seed(tmp_path_factory.mktemp("seed"), settings, registry,
                      seed_listings(small_catalog))
