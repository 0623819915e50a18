"""Where the offline models and the study's dataset are (``VITRINE_TEST_SHARED``, default
``../shared`` beside the repository), and settings that use them."""

from __future__ import annotations

import os
from pathlib import Path

from indexer.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("VITRINE_TEST_SHARED", ROOT.parent / "shared")).resolve()
TEXT_MODEL = SHARED / "models" / "all-MiniLM-L6-v2"
IMAGE_WEIGHTS = SHARED / "models" / "mobilenet_v2_imagenet" / "model.safetensors"
DATA_DIR = SHARED / "data" / "flipkart-1050"
CSV = DATA_DIR / "flipkart_com-ecommerce_sample_1050.csv"
# the specs `make demo` runs (Makefile): the offline models on their CPU backends; tests of
# the PyTorch path itself name the plain models
TEXT_SPEC = f"{TEXT_MODEL}+onnx"
IMAGE_SPEC = f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}+onnx"


def offline_settings(**kw: object) -> Settings:
    """Settings with the offline models; keyword arguments override."""
    base: dict[str, object] = {
        "text_model": TEXT_SPEC,
        "image_model": IMAGE_SPEC,
        "torch_threads": 2,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]
