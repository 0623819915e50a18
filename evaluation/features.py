"""Feature sets of the study: text (BoW, TF-IDF, sentence model), image (ORB BoVW, CNN), fused.

Every function returns an ``(n, d)`` float32 array, L2-normalised row by row, so that
KMeans, t-SNE and cosine kNN see the same geometry.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from indexer.encoders.base import l2_normalize
from indexer.encoders.text import strip_boilerplate

TOKEN = re.compile(r"[a-z][a-z]+")
# longest first: the first matching suffix is stripped
SUFFIXES = ("ational", "ations", "ation", "ings", "ness", "ment", "ing", "ies", "ed", "es", "s")

PREPROCESSING = (
    "Title + description, marketplace boilerplate removed (prices, 'Buy ... online', "
    "'Cash On Delivery', 'Flipkart.com'); lower-cased; tokenized on runs of 2+ letters "
    "(numbers and model codes dropped); scikit-learn's English stop-word list removed; "
    "each token reduced by a light suffix-stripping stemmer (-ation(s), -ings, -ness, -ment, "
    "-ing, -ies, -ed, -es, -s, keeping a stem of at least 3 letters). Title repeated twice "
    "as it names the product. Words kept if in at least 2 listings. BoW = raw counts; "
    "TF-IDF = sublinear tf x idf on uni- and bigrams; both reduced to 100 dimensions by "
    "truncated SVD (LSA) and L2-normalised. The sentence model reads the title, a full stop "
    "and the cleaned description as is (it has its own tokenizer; input truncated at its "
    "maximum sequence length)."
)


def stem(word: str) -> str:
    # Hand-written on purpose: it is the stemmer of the feasibility study (PREPROCESSING
    # above), kept so that the study's BoW/TF-IDF numbers can be reproduced. A library stemmer
    # (nltk's Porter/Snowball, not a dependency) cuts words differently and would change them.
    for suf in SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            return word[: -len(suf)]
    return word


def tokenize(text: str) -> list[str]:
    """The documented preprocessing: tokens, stop words out, light stemming."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [
        stem(t)
        for t in TOKEN.findall(strip_boilerplate(text).lower())
        if t not in ENGLISH_STOP_WORDS
    ]


def study_text(title: str, description: str) -> str:
    return f"{title} {title} {description}"


def _lsa(x: Any, dim: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD

    n_comp = max(1, min(dim, x.shape[0] - 1, x.shape[1] - 1))
    z = TruncatedSVD(n_components=n_comp, random_state=0).fit_transform(x)
    return l2_normalize(z.astype(np.float32))


def bow_features(texts: Sequence[str], dim: int = 100) -> np.ndarray:
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                          min_df=2 if len(texts) >= 50 else 1)
    return _lsa(vec.fit_transform(list(texts)), dim)


def tfidf_features(texts: Sequence[str], dim: int = 100) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                          ngram_range=(1, 2), sublinear_tf=True,
                          min_df=2 if len(texts) >= 50 else 1)
    return _lsa(vec.fit_transform(list(texts)), dim)


def orb_descriptors(images: Sequence[Any], n_features: int = 400) -> list[np.ndarray]:
    """ORB descriptors (32-byte binary) of each RGB PIL image, resized to 320 px max side."""
    import cv2

    orb = cv2.ORB.create(nfeatures=n_features)  # = ORB_create, which the stubs lack
    out: list[np.ndarray] = []
    for im in images:
        if im is None:
            out.append(np.zeros((0, 32), np.uint8))
            continue
        a = np.asarray(im.convert("L"))
        scale = 320 / max(a.shape)
        if scale < 1:
            a = cv2.resize(a, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        a = cv2.equalizeHist(a)
        _, d = orb.detectAndCompute(a, None)
        out.append(d if d is not None else np.zeros((0, 32), np.uint8))
    return out


def bovw_features(descriptors: Sequence[np.ndarray], words: int = 256,
                  seed: int = 0) -> np.ndarray:
    """Bag of visual words: MiniBatchKMeans vocabulary on the descriptors (unpacked to bits),
    then a TF-IDF weighted histogram per image."""
    from sklearn.cluster import MiniBatchKMeans

    bits = [np.unpackbits(d, axis=1).astype(np.float32) for d in descriptors]
    stacked = np.concatenate([b for b in bits if len(b)]) if any(len(b) for b in bits) else None
    n = len(descriptors)
    if stacked is None or len(stacked) < words:
        return np.zeros((n, 1), np.float32)
    rng = np.random.default_rng(seed)
    sample = stacked[rng.choice(len(stacked), size=min(len(stacked), 60_000), replace=False)]
    km = MiniBatchKMeans(n_clusters=words, random_state=seed, n_init=3,
                         batch_size=4096).fit(sample)
    hist = np.zeros((n, words), np.float32)
    for i, b in enumerate(bits):
        if len(b):
            hist[i] = np.bincount(km.predict(b), minlength=words)
    df = (hist > 0).sum(axis=0)
    idf = np.log((1 + n) / (1 + df)) + 1
    return l2_normalize(np.sqrt(hist) * idf)


def centre(x: np.ndarray) -> np.ndarray:
    """Subtract the mean, then L2-normalise (as the index's fusion does per block)."""
    return l2_normalize((x - x.mean(axis=0)).astype(np.float32))


def fuse_blocks(blocks: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Centred, L2-normalised blocks, weighted and concatenated, then L2-normalised."""
    parts = [centre(blocks[k]) * w for k, w in weights.items() if k in blocks and w > 0]
    return l2_normalize(np.concatenate(parts, axis=1))


def spectral_embed(x: np.ndarray, dim: int = 32) -> np.ndarray:
    """PCA (not whitened) to the ``dim`` leading directions, rows re-normalised: drops the
    low-variance directions that only add noise to KMeans' distances."""
    from sklearn.decomposition import PCA

    d = max(1, min(dim, x.shape[0] - 1, x.shape[1]))
    return l2_normalize(PCA(n_components=d, random_state=0).fit_transform(x).astype(np.float32))


def oof_lda_scores(x: np.ndarray, y: np.ndarray, *, folds: int = 5,
                   seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """SUPERVISED: out-of-fold linear discriminant scores.

    For each of ``folds`` stratified folds, a shrinkage LDA (Ledoit-Wolf covariance) is fitted
    on the other folds' rows and their real categories, and its affine decision function
    (one column per category, so the columns mean the same in every fold) maps this fold's
    rows. No row is ever mapped by a model that saw its own label. Returns the ``(n, classes)``
    scores, centred per row and L2-normalised, and the class order.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold

    classes = sorted(set(y.tolist()))
    z = np.zeros((len(y), len(classes)), np.float32)
    n_splits = max(2, min(folds, min(int((y == c).sum()) for c in classes)))
    for tr, te in StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(x, y):
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[tr], y[tr])
        scores = lda.decision_function(x[te])
        if scores.ndim == 1:  # two classes: one signed score
            scores = np.stack([-scores, scores], axis=1)
        cols = [list(lda.classes_).index(c) for c in classes]
        z[te] = scores[:, cols]
    return l2_normalize(z - z.mean(axis=1, keepdims=True)), classes


FeatureFn = Callable[[], np.ndarray]
