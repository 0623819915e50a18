"""Text encoders: sentence-transformers models (hub or local) and a fitted TF-IDF/LSA view."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ModelSpecError
from .base import Progress, l2_normalize


class SentenceTransformerEncoder:
    """A sentence-transformers model from the hub (``org/name``) or a local directory.

    Hub ids and local directories go through the same ``SentenceTransformer(...)`` call;
    only where the files come from differs.
    """

    def __init__(
        self, spec: str, *, device: str = "cpu", batch_size: int = 32, max_seq_length: int = 256
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.spec = spec
        self.batch_size = batch_size
        local = Path(spec).expanduser()
        looks_local = local.exists() or spec.startswith((".", "/", "~"))
        if looks_local and not (local / "modules.json").is_file() and not (
            local / "config.json"
        ).is_file():
            raise ModelSpecError(
                f"text model directory {spec!r} does not exist or holds no "
                "sentence-transformers model (modules.json/config.json)"
            )
        try:
            self.model = SentenceTransformer(str(local) if looks_local else spec, device=device)
        except OSError as e:  # hub id not found / offline
            raise ModelSpecError(f"cannot load text model {spec!r}: {e}") from e
        # Listings are title + description; past ~256 word pieces the tail adds little and
        # attention cost grows quadratically.
        if self.model.max_seq_length and self.model.max_seq_length > max_seq_length:
            self.model.max_seq_length = max_seq_length
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ModelSpecError(f"text model {spec!r} does not declare its embedding size")
        self.dim = int(dim)

    def quantize_int8(self) -> None:
        """Dynamic int8 quantization of every ``nn.Linear`` (weights int8, activations
        quantized per batch): about 2x faster on CPU. Its cost, measured by
        ``vitrine bench core`` with the ``+int8`` spec, is in docs/scale.md."""
        import warnings

        import torch

        if str(self.model.device) != "cpu":
            raise ModelSpecError("+int8 (dynamic quantization) runs on the CPU only")
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError as e:  # removed from a future torch: say so, don't fall back
            raise ModelSpecError(f"this torch has no dynamic quantization for +int8: {e}") from e
        with warnings.catch_warnings():  # torch announces the move of this API to torchao
            warnings.simplefilter("ignore")
            self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)

    def encode(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sorting by length keeps padding small inside each batch.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            emb = self.model.encode(
                [texts[i] for i in idx],
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            out[idx] = emb
            if progress:
                progress(len(idx))
        return out


class TfidfEncoder:
    """Weight-free lexical encoder: TF-IDF of word uni+bigrams, reduced by truncated SVD (LSA).

    It has no neural weights but is fitted on a catalog (vocabulary, IDF, SVD basis); the
    fitted state is saved with the index snapshot. ``encode`` before ``fit`` fits on the
    texts given. Dense ``dim``-sized output keeps it usable inside a FAISS index.
    """

    def __init__(self, spec: str = "tfidf", dim: int = 256) -> None:
        self.spec = spec
        self.dim = dim
        self._pipe = None

    def fit(self, texts: Sequence[str]) -> TfidfEncoder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import Pipeline

        vec = TfidfVectorizer(
            sublinear_tf=True,
            stop_words="english",
            ngram_range=(1, 2),
            # words seen once are mostly model numbers: noise for neighbours
            min_df=2 if len(texts) >= 50 else 1,
        )
        x = vec.fit_transform(list(texts))
        n_comp = max(1, min(self.dim, x.shape[0] - 1, x.shape[1] - 1))
        svd = TruncatedSVD(n_components=n_comp, random_state=0).fit(x)
        self._pipe = Pipeline([("tfidf", vec), ("svd", svd)])
        self.dim = n_comp
        return self

    @property
    def fitted(self) -> bool:
        return self._pipe is not None

    def encode(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        if self._pipe is None:
            self.fit(texts)
        assert self._pipe is not None
        out = l2_normalize(self._pipe.transform(list(texts)))
        if progress:
            progress(len(texts))
        return out


_BOILERPLATE = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bKey Features of\b",
        r"\bSpecifications of\b",
        r"\bPrice:\s*Rs\.?\s*[\d,.]+",
        r"\b(?:for|at)\s+Rs\.?\s*[\d,.]+",
        r"\bRs\.?\s*[\d,.]+",
        r"\bBuy\b",
        r"\bonline\b(?: in India)?",
        r"\bOnly (?:Genuine Products|at Flipkart\.com)\.?",
        r"\bat best prices?\b",
        r"\bwith FREE shipping\b",
        r"\bGreat Discounts,?",
        r"\b\d+ Day Replacement Guarantee\.?,?",
        r"\bFree Shipping\.?",
        r"&?\s*Cash On Delivery!?",
        r"\bFlipkart\.com\b",
    )
]


def strip_boilerplate(text: str) -> str:
    """Remove marketplace boilerplate ("Buy ... for Rs. 450 online ... Cash On Delivery!").

    The same sentence ends thousands of listings in every category, so it pulls unrelated
    products together in a sentence embedding; prices are noise for a category.
    """
    for pat in _BOILERPLATE:
        text = pat.sub(" ", text)
    return " ".join(text.replace(" - ", " ").split()).strip(" .,-")
