"""Helpers shared by the subcommands: model flags -> Settings, progress bars, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from indexer.settings import Settings


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """``--text-model`` / ``--image-model`` / ``--data-dir`` override VITRINE_* settings."""
    g = p.add_argument_group("models (default: VITRINE_TEXT_MODEL / VITRINE_IMAGE_MODEL)")
    g.add_argument("--text-model", help="sentence-transformers id or directory, 'tfidf', 'none'")
    g.add_argument("--image-model", help="open_clip:/timm:/torchvision: spec, or 'none'")
    g.add_argument("--threads", type=int, help="torch threads (default: all cores)")


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {}
    for flag, field in (
        ("text_model", "text_model"),
        ("image_model", "image_model"),
        ("threads", "torch_threads"),
        ("data_dir", "data_dir"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    overrides.update({k: v for k, v in extra.items() if v is not None})
    # init kwargs take precedence over the environment, and are validated like it
    settings = Settings(**overrides)
    # a local model by its absolute path, as `make` names it: an index records the spec,
    # and a relative one would depend on the folder the command ran in
    from indexer.encoders.registry import absolute_spec

    changed = False
    for kind, field in (("text", "text_model"), ("image", "image_model")):
        spec = absolute_spec(kind, getattr(settings, field))
        if spec != getattr(settings, field):
            overrides[field], changed = spec, True
    return Settings(**overrides) if changed else settings


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar on stderr (hidden when not a TTY unless forced); yields its ``update``."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="listing", disable=not enabled, file=sys.stderr,
              dynamic_ncols=True) as bar:
        yield bar.update


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")
