"""One typed settings object for every vitrine process.

Every knob is read from the environment with the ``VITRINE_`` prefix (``VITRINE_TEXT_MODEL``,
``VITRINE_IMAGE_MODEL``, ``VITRINE_DATA_DIR``...), from a ``.env`` file, or passed explicitly
by the CLI. Nothing else in the code base reads ``os.environ`` for configuration.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# On CPU through the backends `vitrine bench encoders` measured fastest among the faithful
# ones for these architectures (README, Fast encoders): both are full precision, so their
# fidelity does not depend on the weights (int8's would, and the real weights of these two
# cannot be measured offline; on the offline MiniLM int8 also halved the out-of-catalog
# flags). On a GPU the defaults drop their suffix (see _defaults_on_the_device).
DEFAULT_TEXT_MODEL = "sentence-transformers/all-mpnet-base-v2+openvino"
DEFAULT_IMAGE_MODEL = "open_clip:ViT-B-32@laion2b_s34b_b79k+onnx"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VITRINE_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    # --- encoders -------------------------------------------------------------------------
    text_model: str = Field(
        DEFAULT_TEXT_MODEL,
        description="sentence-transformers hub id or local directory, or 'tfidf' / 'none'; "
        "'+onnx', '+onnx-int8' or '+openvino' after it picks a CPU backend "
        "(indexer/encoders/backends.py).",
    )
    image_model: str = Field(
        DEFAULT_IMAGE_MODEL,
        description="'open_clip:<arch>@<tag|file>', 'timm:<model>@<tag|file>', "
        "'torchvision:<arch>@<file.safetensors>' or 'none'; a backend suffix as for "
        "text_model.",
    )
    lexical: bool = Field(
        True,
        description="Add the weight-free TF-IDF/LSA lexical text view to the fused vector "
        "(see indexer/fusion.py).",
    )
    lexical_dim: int = Field(128, ge=2, le=4096, description="LSA size of the lexical view.")
    batch_size: int = Field(
        4, ge=1, le=1024,
        description="Encoder batch size. Small batches are fastest on CPU, their activations "
        "stay in cache (`vitrine bench ingest --sweep`, 2 cores: MobileNetV2 67 photos/s at 8, "
        "37 at 32); raise it on a GPU.",
    )
    encode_lanes: int = Field(
        0, ge=0, le=64,
        description="Parallel encoding lanes for a large batch: the listings are split into "
        "this many shards, each encoded in its own thread with one torch thread (inter-op "
        "instead of intra-op parallelism). 0 = one lane per torch thread; 1 = off.",
    )
    torch_threads: int = Field(
        0, ge=0, description="Intra-op threads of the encoders per process (PyTorch's, and "
        "those of a `+onnx`/`+openvino` backend's single-query session); 0 = number of CPU "
        "cores."
    )
    device: str = Field("cpu", description="torch device for the encoders.")
    export_dir: Path | None = Field(
        None, description="Where `+onnx`/`+onnx-int8`/`+openvino` model exports are cached "
        "(made once, shared by every process); default ~/.cache/vitrine/exports."
    )

    # --- fusion ---------------------------------------------------------------------------
    text_weight: float = Field(1.0, ge=0.0)
    lexical_weight: float = Field(1.0, ge=0.0)
    image_weight: float = Field(0.5, ge=0.0)

    # --- index and voting -----------------------------------------------------------------
    knn_k: int = Field(10, ge=1, le=1000, description="Neighbours voting per modality.")
    knn_pool: int = Field(
        50, ge=1, le=10_000, description="Candidates fetched from the fused index for a vote."
    )
    knn_temperature: float = Field(
        0.05, gt=0.0, description="Softmax temperature of the similarity-weighted vote."
    )
    uncertain_below: float = Field(
        0.5, ge=0.0, le=1.0, description="Confidence under which a vote is 'uncertain'."
    )
    path_min_share: float = Field(
        0.5, gt=0.0, le=1.0, description="Share of the vote, among the neighbours under "
        "the levels chosen so far, that a deeper level of the category path needs (below: "
        "the path stops there)."
    )
    ooc_quantile: float = Field(
        0.05, ge=0.0, lt=1.0, description="Out-of-catalog test: a query less similar to its "
        "nearest neighbour of the voted category than this quantile of the same-category "
        "nearest similarities measured on the catalog is uncertain (0: never)."
    )
    duplicate_quantile: float = Field(
        0.99, ge=0.0, lt=1.0, description="Near-duplicates: a new listing at least as "
        "similar to an indexed one as this quantile of the nearest-neighbour similarities "
        "between distinct catalog listings names it among its `duplicates` (0: only the "
        "same photo does). Measured when the index is built."
    )
    exact_max: int = Field(
        10_000, ge=0, description="Catalogs up to this size use an exact flat index."
    )
    ann: Literal["ivf_sq8", "hnsw"] = Field(
        "ivf_sq8", description="The approximate index used past exact_max."
    )
    nprobe: int = Field(32, ge=1, description="IVF lists visited per query.")
    ann_reduce: str = Field(
        "pca512", pattern=r"^(none|pca[1-9][0-9]*)$",
        description="What the approximate index does to a fused vector first: `pca<d>` "
        "projects it on its d leading principal components (fitted with the index on the "
        "catalog; 1792-d fused vectors then cost ~560 bytes a listing instead of ~1.8 kB, "
        "for some recall: see docs/scale.md), `none` keeps it whole. The exact index is "
        "never reduced."
    )
    hnsw_m: int = Field(32, ge=4, le=128)
    hnsw_ef_search: int = Field(64, ge=8)
    hnsw_ef_construction: int = Field(80, ge=8)

    # --- images ---------------------------------------------------------------------------
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Images with more pixels are refused as decompression bombs.",
    )
    max_image_decode_mb: int = Field(
        160, ge=16, le=65_536,
        description="Memory one photo decode may hold, priced from the header per format "
        "(indexer/images.py): ~37 MP for an RGBA PNG, ~9.5 MP for a WebP, 100 MP for a "
        "baseline JPEG (decoded at reduced scale) at 160.",
    )
    image_formats: list[Literal["JPEG", "PNG", "WEBP", "GIF"]] = Field(
        ["JPEG", "PNG", "WEBP", "GIF"],
        description="Photo formats accepted (JPEG includes MPO; GIF: first frame); others "
        "(TIFF, BMP, PSD, ICO...) are refused before decoding.",
    )
    image_decode_slots: int = Field(
        0, ge=0, le=1024,
        description="Photo decodes over 16 MiB running at once per process (the others "
        "wait); 0 = one per CPU core.",
    )

    # --- state and service ----------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="Where index, snapshots and logs live.")
    broker_url: str | None = Field(None, description="redis://... ; unset = embedded mode.")
    vector_store: str = Field(
        "faiss", pattern=r"^(faiss|milvus://[^\s/:]+:\d+)$",
        description="Where the vectors live: 'faiss' (each process holds its replica of the "
        "index) or 'milvus://HOST:PORT' (a Milvus server holds them for every process; "
        "indexer/milvus.py).")
    api_key: str | None = Field(
        None, description="Key for the write endpoints (X-API-Key); required in production.")
    read_api_key: str | None = Field(
        None, description="If set, reads (GET /listings/{id}, /search, /classify) need "
        "X-API-Key equal to it or to api_key; unset = reads are public.")
    environment: Literal["development", "production"] = Field(
        "development", description="production: refuses to start without api_key and "
        "serves /docs and /openapi.json only if docs=true.")
    docs: bool | None = Field(
        None, description="Serve /docs and /openapi.json; unset = in development only.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the API from "
        "(JSON list); empty = no CORS headers, same-origin only.")
    max_pending: int = Field(
        100_000, ge=0, description="Past this many accepted listings not indexed yet, "
        "POST /listings answers 503 with Retry-After (backpressure); 0 = no limit.")
    max_query_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest body of /search and /classify (a "
        "query photo; listings get max_request_bytes).")

    # --- service (services/, workers/) ----------------------------------------------------
    redis_prefix: str = Field(
        "vitrine", description="Namespace of every Redis key, stream and Celery queue."
    )
    allow_private_urls: bool = Field(
        False, description="Let workers fetch image_url from loopback/private/link-local hosts."
    )
    fetch_timeout: float = Field(
        10.0, gt=0, description="Seconds each connect, read or write of an image_url fetch "
        "may wait (the whole download is bounded by fetch_deadline)."
    )
    fetch_deadline: float = Field(
        15.0, gt=0, description="Seconds for the whole download of an image_url (DNS, "
        "connections, redirects, body): a slower or trickling server is cut off."
    )
    fetch_allow_networks: list[str] = Field(
        default_factory=list, description="CIDRs image_url may be fetched from although not "
        "public, e.g. an internal image CDN (JSON list: '[\"10.20.0.0/16\"]')."
    )
    fetch_proxy: str | None = Field(
        None, description="http(s):// proxy for image_url fetches. Unset: proxy environment "
        "variables are ignored and every address is checked here. Set: the proxy resolves "
        "host names and must do the egress filtering (only IP literals are checked here)."
    )

    @field_validator("fetch_allow_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        return [str(ipaddress.ip_network(n.strip())) for n in v]  # ValueError names the CIDR

    @field_validator("fetch_proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("fetch_proxy must be an http:// or https:// URL")
        return v

    max_request_bytes: int = Field(
        30 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted."
    )
    snapshot_every: int = Field(
        1000, ge=1, description="Write an index snapshot after this many log entries."
    )
    snapshot_interval: float = Field(
        60.0, gt=0, description="...or this many seconds after the last change."
    )
    worker_concurrency: int = Field(1, ge=1, description="Prefork processes per `vitrine worker`.")
    worker_batch: int = Field(
        32, ge=1, le=1024,
        description="Ingestion events a worker task takes from the queue at once (its own and "
        "claimed ones); the encoders still run in batches of batch_size.",
    )
    visibility_timeout: float = Field(
        300.0, gt=0, description="Seconds before a Celery message a dead worker held is "
        "redelivered (a wake-up only: the claimed listings come back after lease_seconds)."
    )
    lease_seconds: float = Field(
        120.0, gt=0, description="Seconds a consumer holds the listings it claimed; if it "
        "dies, they are claimable again after this. Keep it above the slowest batch.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Claims of one listing (each failure or dead consumer counts "
        "one) before it ends `failed` with the reason.",
    )
    retry_delay: float = Field(
        5.0, ge=0, description="Seconds before a listing whose indexing raised is retried."
    )
    task_time_limit: float = Field(
        900.0, gt=0, description="Hard time limit of one ingestion task (the soft limit is "
        "90 % of it); it includes waiting for the models to load at worker start.",
    )
    broker_timeout: float = Field(
        3.0, gt=0, description="Seconds before an unreachable broker is reported."
    )

    @field_validator("text_model", "image_model")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    @model_validator(mode="after")
    def _defaults_on_the_device(self) -> Settings:
        """The default models carry a CPU backend suffix; on another device (a GPU) a
        default that was not set explicitly runs in PyTorch there instead."""
        if self.device != "cpu":
            for name, default in (("text_model", DEFAULT_TEXT_MODEL),
                                  ("image_model", DEFAULT_IMAGE_MODEL)):
                if name not in self.model_fields_set and getattr(self, name) == default:
                    setattr(self, name, default.rpartition("+")[0])
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
