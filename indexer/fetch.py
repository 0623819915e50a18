"""Download the feasibility study's public dataset (users with internet).

The zip holds ``Flipkart/flipkart_com-ecommerce_sample_1050.csv`` and ``Flipkart/Images/``;
it is unpacked as ``<out>/flipkart_com-ecommerce_sample_1050.csv`` + ``<out>/images/`` so that
``vitrine index --catalog <out>/flipkart_com-ecommerce_sample_1050.csv`` finds the photos.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from .errors import VitrineError

DATASET_URL = (
    "https://s3-eu-west-1.amazonaws.com/static.oc-static.com/prod/courses/files/"
    "Parcours_data_scientist/Projet+-+Textimage+DAS+V2/"
    "Dataset+projet+pre%CC%81traitement+textes+images.zip"
)
CSV_NAME = "flipkart_com-ecommerce_sample_1050.csv"


def fetch_dataset(out: str | Path, url: str = DATASET_URL, timeout: float = 60.0) -> Path:
    """Download and unpack the dataset into ``out``; returns the CSV path."""
    out = Path(out)
    csv_path = out / CSV_NAME
    if csv_path.is_file() and (out / "images").is_dir():
        return csv_path
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        archive = Path(tmp) / "dataset.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, archive.open("wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise VitrineError(f"cannot download the dataset from {url}: {e}") from e
        unpack(archive, out)
    return csv_path


def unpack(archive: Path, out: Path) -> None:
    """Extract the CSV and the photos, flattening the zip's folders, refusing unsafe names."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir() or ".." in name.parts or name.name.startswith("."):
                continue
            if name.name == CSV_NAME:
                target = out / CSV_NAME
            elif name.suffix.lower() in {".jpg", ".jpeg", ".png"}:
                target = out / "images" / name.name
            else:
                continue
            with z.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    if not (out / CSV_NAME).is_file():
        raise VitrineError(f"{archive} does not contain {CSV_NAME}")
