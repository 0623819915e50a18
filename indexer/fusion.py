"""Fusion: one vector per listing from its modality vectors ("blocks").

Method (see README, "How fusion works"):

1. Each modality gives an L2-normalised vector: ``text`` (the sentence encoder on title +
   cleaned description), ``lexical`` (TF-IDF/LSA of the words, fitted on the catalog) and
   ``image`` (the photo encoder). They are good at different things: the sentence encoder
   knows that a "tumbler" and a "mug" are kitchenware, the lexical view catches brand and
   product-type words exactly, and the photo settles listings whose text is thin.
2. Each block is **centred** (the catalog mean is subtracted, then re-normalised). Embedding
   spaces are anisotropic: every product photo shares a "white background product shot"
   component, and centring removes what all listings have in common so that cosine
   similarity measures what tells them apart.
3. Blocks are scaled by their weight and concatenated. A missing modality (no photo, or no
   text) is an all-zero block, so the inner product of two fused vectors is
   ``sum_m w_m^2 * cos_m`` over the modalities *both* listings have: a text-only listing is
   compared on text alone, with no penalty for its missing photo.
4. Search scores are divided by the query's ``sum w_m^2``, so a score is the weighted mean
   cosine over the query's modalities, in [-1, 1].

Categorization then votes per modality (see :mod:`indexer.knn`), which is where most of the
gain over plain concatenation comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoders.base import l2_normalize


@dataclass
class Block:
    """One modality's slot in the fused vector."""

    name: str
    dim: int
    weight: float
    mean: np.ndarray | None = None  # centring vector, fitted on the catalog

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dim": self.dim, "weight": self.weight}


@dataclass
class Fusion:
    """The layout of the fused vector: named blocks with weights and centring means."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return sum(b.dim for b in self.blocks)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for b in self.blocks:
            out[b.name] = slice(start, start + b.dim)
            start += b.dim
        return out

    def fit(self, vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> Fusion:
        """Fit each block's centring mean on the catalog's vectors (present rows only)."""
        for b in self.blocks:
            rows = vectors[b.name][present[b.name]]
            b.mean = rows.mean(axis=0).astype(np.float32) if len(rows) > 1 else None
        return self

    def fuse(self, vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
        """``{block: (n, d)}`` + ``{block: (n,) bool}`` -> ``(n, dim)`` float32 fused vectors."""
        n = len(next(iter(present.values())))
        out = np.zeros((n, self.dim), dtype=np.float32)
        for b, sl in zip(self.blocks, self.slices().values(), strict=True):
            mask = present[b.name]
            if not mask.any():
                continue
            x = vectors[b.name][mask]
            if b.mean is not None:
                x = x - b.mean
            out[mask, sl] = l2_normalize(x) * b.weight
        return out

    def query_norm(self, fused: np.ndarray,
                   factors: Mapping[str, float] | None = None) -> np.ndarray:
        """``sum f_m w_m^2`` over the blocks present in each fused row (0 for an empty row);
        ``f_m``: the query's :meth:`reweight` factors (1 when not given)."""
        total = np.zeros(len(fused), dtype=np.float32)
        for b, sl in zip(self.blocks, self.slices().values(), strict=True):
            has = np.abs(fused[:, sl]).sum(axis=1) > 0
            total += has * (b.weight**2) * (factors or {}).get(b.name, 1.0)
        return total

    def reweight(self, fused: np.ndarray, factors: Mapping[str, float]) -> np.ndarray:
        """A query's fused rows with block ``m`` scaled by ``factors[m]`` (default 1): its
        inner product with an indexed vector is then ``sum f_m w_m^2 cos_m``, and divided by
        :meth:`query_norm` with the same factors, a score is the mean cosine weighted by
        ``f_m w_m^2``: a per-query say in how much each modality counts."""
        out = np.array(fused, dtype=np.float32, copy=True)
        for b, sl in zip(self.blocks, self.slices().values(), strict=True):
            out[..., sl] *= factors.get(b.name, 1.0)
        return out

    def centroid(self, fused: np.ndarray) -> np.ndarray:
        """One fused row for several (``(n, dim)``): per block, the mean of the rows that
        have it, re-normalised and weighted like any fused block ("more like these")."""
        out = np.zeros((1, self.dim), dtype=np.float32)
        for b, sl in zip(self.blocks, self.slices().values(), strict=True):
            x = fused[:, sl]
            x = x[np.abs(x).sum(axis=1) > 0]
            if len(x):
                out[:, sl] = l2_normalize(x.mean(axis=0, keepdims=True)) * b.weight
        return out

    def split(self, fused: np.ndarray) -> dict[str, np.ndarray]:
        """Fused rows back to unit-norm (or zero) block vectors."""
        return {
            b.name: fused[:, sl] / b.weight if b.weight else fused[:, sl]
            for b, sl in zip(self.blocks, self.slices().values(), strict=True)
        }

    def describe(self) -> list[dict[str, object]]:
        return [b.to_json() for b in self.blocks]

    # --- fitted state as data (an index snapshot stores it; no pickle) -------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The layout as JSON-able data and the centring means as arrays (``mean_<name>``)."""
        blocks = [{**b.to_json(), "centred": b.mean is not None} for b in self.blocks]
        arrays = {f"mean_{b.name}": np.asarray(b.mean, np.float32)
                  for b in self.blocks if b.mean is not None}
        return {"blocks": blocks}, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Fusion:
        """The inverse of :meth:`to_state`; ``ValueError`` on anything malformed."""
        raw = meta.get("blocks") if isinstance(meta, Mapping) else None
        if not isinstance(raw, list) or not raw:
            raise ValueError("no block list")
        blocks, seen = [], set()
        for item in raw:
            if not isinstance(item, Mapping):
                raise ValueError(f"block {item!r} is not an object")
            name, dim, weight = item.get("name"), item.get("dim"), item.get("weight")
            if not isinstance(name, str) or not name.isidentifier() or name in seen:
                raise ValueError(f"bad or repeated block name {name!r}")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"block {name!r}: bad dim {dim!r}")
            if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                    or not np.isfinite(weight) or weight < 0):
                raise ValueError(f"block {name!r}: bad weight {weight!r}")
            seen.add(name)
            mean = None
            if item.get("centred"):
                mean = arrays.get(f"mean_{name}")
                if mean is None:
                    raise ValueError(f"block {name!r}: its centring mean is missing")
                if (mean.dtype.kind != "f" or mean.shape != (dim,)
                        or not np.isfinite(mean).all()):
                    raise ValueError(f"block {name!r}: a centring mean of {mean.dtype} "
                                     f"{mean.shape} for dim {dim}")
                mean = mean.astype(np.float32)
            blocks.append(Block(name, dim, float(weight), mean))
        return cls(blocks)
