"""Text encoders: sentence-transformers models (hub or local) and a fitted TF-IDF/LSA view."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexMismatch, ModelSpecError
from .backends import OnBackend
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

    def for_lane(self) -> SentenceTransformerEncoder:
        """PyTorch's thread count is process-wide: lanes share this encoder (the pipeline sets
        one torch thread while they run)."""
        return self

    def encode(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # encode sorts the texts by length itself (similar lengths share a batch: little
        # padding) and returns the vectors in the order given
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        if progress:  # once, when done: the pipeline calls this per chunk of listings
            progress(len(texts))
        return np.asarray(out, dtype=np.float32)


def _sentence_graph(model: Any, names: Sequence[str], constants: Mapping[str, Any]) -> Any:
    """What is exported of a sentence-transformers model: its whole module chain (transformer,
    pooling, normalisation), from the tokenizer's tensors (positional, in the order of
    ``names``) to the sentence embedding. ``constants`` are the non-tensor entries of its
    features (e.g. ``modality``)."""
    import torch

    class SentenceGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            features = dict(zip(names, tensors, strict=True))
            return self.model({**features, **constants})["sentence_embedding"]

    return SentenceGraph().eval()


class BackendTextEncoder(OnBackend):
    """A sentence-transformers model run on ONNX Runtime or OpenVINO (see
    :mod:`indexer.encoders.backends`). Texts are tokenized by the model's own
    ``preprocess`` (its tokenizer and maximum length) and run through the exported graph
    one text per run, whatever the batch size:

    * a text's vector then depends on that text only: int8's activations are quantized with
      one scale per run, so in a batch a text's vector moved with its batch mates (cosine
      down to 0.994 between two batchings of the same catalog texts);
    * and it is faster on the CPU, where padding a batch to its longest text is wasted work
      (400 catalog texts, MiniLM, one thread: int8 172 texts/s one by one, 156 in fours,
      139 in eights; fp32 78, 77, 69).

    Ingestion's parallelism comes from its lanes (:meth:`for_lane`), not from batches."""

    def __init__(self, spec: str, base: str, backend: str, *, identity: Callable[[], str],
                 export_root: Path, threads: int) -> None:
        from .backends import export_onnx, exported_runner, require

        require(backend, spec)
        st = SentenceTransformerEncoder(base, device="cpu")
        self.spec, self.dim = spec, st.dim
        self._model = st.model  # its tokenizer; the weights run in the exported graph

        def export(path: Path) -> None:
            import torch

            features = self._model.preprocess(["an example listing title", "a second one"])
            tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
            constants = {k: v for k, v in features.items() if k not in tensors}
            export_onnx(_sentence_graph(self._model, list(tensors), constants), tensors,
                        {k: {0: "batch", 1: "sequence"} for k in tensors}, path)

        self.runner = exported_runner(export_root, f"text-{Path(base).name or base}-{backend}",
                                      identity(), backend, export, transformer=True,
                                      threads=threads)

    def encode(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            features = self._model.preprocess([text])
            feed = {k: v.numpy() for k, v in features.items() if isinstance(v, torch.Tensor)}
            out[row] = self.runner.run(feed)[0]
        if progress:
            progress(len(texts))
        return l2_normalize(out)


class TfidfEncoder:
    """Weight-free lexical encoder: TF-IDF of word uni+bigrams, reduced by truncated SVD (LSA).

    It has no neural weights but is fitted on a catalog (vocabulary, IDF, SVD basis); the
    fitted state is saved with the index snapshot **as data** (:meth:`to_state`: JSON and
    arrays, never a pickle), and :meth:`from_state` rebuilds the same transform from it.
    ``encode`` before ``fit`` fits on the texts given. Dense ``dim``-sized output keeps it
    usable inside a FAISS index.

    The transform is scikit-learn's ``TfidfVectorizer`` rebuilt from the stored vocabulary,
    IDF and parameters (tokenisation stays scikit-learn's), then the projection on the SVD
    basis, ``x @ components.T``, done here: that is all ``TruncatedSVD.transform`` does.
    """

    def __init__(self, spec: str = "tfidf", dim: int = 256) -> None:
        self.spec = spec
        self.dim = dim
        self._vec: Any = None  # the fitted (or rebuilt) TfidfVectorizer
        self._components: np.ndarray | None = None  # (dim, n_terms) SVD basis

    def fit(self, texts: Sequence[str]) -> TfidfEncoder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

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
        self._vec, self._components = vec, svd.components_
        self.dim = n_comp
        return self

    def for_lane(self) -> TfidfEncoder:
        return self  # no threads of its own

    @property
    def fitted(self) -> bool:
        return self._vec is not None and self._components is not None

    def encode(self, texts: Sequence[str], progress: Progress | None = None) -> np.ndarray:
        if not self.fitted:
            self.fit(texts)
        assert self._vec is not None and self._components is not None
        out = l2_normalize(self._vec.transform(list(texts)) @ self._components.T)
        if progress:
            progress(len(texts))
        return out

    # --- fitted state as data -------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata (parameters, vocabulary, a tokenisation probe) and arrays
        (``idf``, ``components``) that :meth:`from_state` turns back into this encoder."""
        meta: dict[str, Any] = {"spec": self.spec, "dim": self.dim, "fitted": self.fitted}
        if not self.fitted:
            return meta, {}
        vec = self._vec
        params = {k: vec.get_params()[k] for k in _VECTORIZER_PARAMS}
        # the stop-word list itself, not "english": it shapes the bigrams, and the list
        # bundled with scikit-learn may change from one release to the next
        stop = vec.get_stop_words()
        params["stop_words"] = sorted(stop) if stop is not None else None
        params["ngram_range"] = list(params["ngram_range"])
        params["dtype"] = np.dtype(params["dtype"]).name
        vocab = vec.vocabulary_
        terms = [""] * len(vocab)
        for term, col in vocab.items():
            terms[col] = term
        meta.update(
            vectorizer=params,
            vocabulary=terms,
            probe={"text": TOKEN_PROBE, "tokens": vec.build_analyzer()(TOKEN_PROBE)},
        )
        arrays = {"idf": np.asarray(vec.idf_), "components": np.asarray(self._components)}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                   ) -> TfidfEncoder:
        """Rebuild the encoder of :meth:`to_state`. ``ValueError`` on malformed data;
        :class:`~indexer.errors.IndexMismatch` when this scikit-learn tokenises the stored
        probe text differently from the one that fitted the vocabulary."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not isinstance(meta, Mapping):
            raise ValueError("lexical state is not an object")
        spec, dim = meta.get("spec"), meta.get("dim")
        if not isinstance(spec, str) or isinstance(dim, bool) or not isinstance(dim, int) \
                or dim <= 0:
            raise ValueError(f"bad spec/dim {spec!r}/{dim!r}")
        enc = cls(spec, dim)
        if not meta.get("fitted"):
            return enc
        params = dict(_checked_params(meta.get("vectorizer")))
        terms = meta.get("vocabulary")
        if not isinstance(terms, list) or not terms or not all(
                isinstance(t, str) for t in terms):
            raise ValueError("the vocabulary is not a list of terms")
        vocab = {t: i for i, t in enumerate(terms)}
        if len(vocab) != len(terms):
            raise ValueError("the vocabulary repeats a term")
        idf, comp = arrays.get("idf"), arrays.get("components")
        if idf is None or comp is None:
            raise ValueError("idf or components array missing")
        if idf.dtype.kind != "f" or idf.shape != (len(terms),) or not np.isfinite(idf).all():
            raise ValueError(f"idf of {idf.dtype} {idf.shape} for {len(terms)} terms")
        if comp.dtype.kind != "f" or comp.shape != (dim, len(terms)) \
                or not np.isfinite(comp).all():
            raise ValueError(f"components of {comp.dtype} {comp.shape}, "
                             f"expected ({dim}, {len(terms)})")
        params["ngram_range"] = tuple(params["ngram_range"])
        params["dtype"] = np.dtype(params["dtype"]).type
        vec = TfidfVectorizer(vocabulary=vocab, **params)
        vec.idf_ = idf  # public setter: fixes the vocabulary and the IDF weights
        probe = meta.get("probe")
        if not isinstance(probe, Mapping) or not isinstance(probe.get("text"), str) \
                or not isinstance(probe.get("tokens"), list):
            raise ValueError("the tokenisation probe is missing")
        got = vec.build_analyzer()(probe["text"])
        if got != probe["tokens"]:
            import sklearn

            raise IndexMismatch(
                f"scikit-learn {sklearn.__version__} tokenises text differently from the "
                "scikit-learn that fitted this index's lexical view, so its vectors would "
                "not match the indexed ones: rebuild the index with `vitrine index`"
            )
        enc._vec, enc._components = vec, comp
        return enc


# The probe text whose tokens (uni+bigrams) are stored with a fitted lexical view and compared
# on load: it catches a tokenisation change (case folding, word boundaries, accents, stop
# words) of a newer scikit-learn.
TOKEN_PROBE = ("Buy the Café-Racer's 2-Pack: STAINLESS steel mugs (350ml) & a non-stick "
               "pan, naïve «Ünïcode» e-mail_ok 4K/UHD; it's not for them, is it?")

# TfidfVectorizer parameters that shape ``transform`` given a fixed vocabulary and IDF, and
# the JSON types a snapshot may give them (min_df, max_df, max_features and smooth_idf only
# shape ``fit``; preprocessor/tokenizer/analyzer callables are never used: none is stored).
_VECTORIZER_PARAMS: dict[str, tuple[type, ...]] = {
    "input": (str,),
    "encoding": (str,),
    "decode_error": (str,),
    "strip_accents": (str, type(None)),
    "lowercase": (bool,),
    "token_pattern": (str,),
    "stop_words": (list, type(None)),
    "ngram_range": (list,),
    "analyzer": (str,),
    "binary": (bool,),
    "norm": (str, type(None)),
    "use_idf": (bool,),
    "sublinear_tf": (bool,),
    "dtype": (str,),
}


def _checked_params(raw: object) -> dict[str, Any]:
    """The stored vectorizer parameters, refused unless each is present with a plain value."""
    if not isinstance(raw, Mapping) or set(raw) != set(_VECTORIZER_PARAMS):
        raise ValueError("the vectorizer parameters are missing or unknown ones are present")
    for key, types in _VECTORIZER_PARAMS.items():
        if not isinstance(raw[key], types):
            raise ValueError(f"vectorizer parameter {key}={raw[key]!r}")
    ngram = raw["ngram_range"]
    if (len(ngram) != 2 or not all(isinstance(n, int) and not isinstance(n, bool)
                                   for n in ngram) or not 1 <= ngram[0] <= ngram[1]):
        raise ValueError(f"ngram_range={ngram!r}")
    if raw["stop_words"] is not None and not all(isinstance(w, str) for w in raw["stop_words"]):
        raise ValueError("stop_words is not a list of words")
    allowed = {
        # "content" only: "filename"/"file" would make a query text name a file to read
        "input": ("content",),
        "decode_error": ("strict", "ignore", "replace"),
        "strip_accents": (None, "ascii", "unicode"),
        "analyzer": ("word", "char", "char_wb"),
        "norm": (None, "l1", "l2"),
        "use_idf": (True,),  # the IDF is stored and set
        "dtype": ("float32", "float64"),
    }
    for key, values in allowed.items():
        if raw[key] not in values:
            raise ValueError(f"vectorizer parameter {key}={raw[key]!r}")
    try:
        re.compile(raw["token_pattern"])
    except re.error as e:
        raise ValueError(f"token_pattern {raw['token_pattern']!r}: {e}") from None
    return dict(raw)


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
