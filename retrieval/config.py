"""Configuration of the retrieval layer: one object per concern, built from CLI flags or env.

Environment variables (read by :func:`from_environment` when a default is needed, never at
import time; an explicit flag or config value wins):

- ``SPECRAG_REDIS_URL``: Redis URL used for the document store and the retrieval cache.
- ``SPECRAG_EMBEDDING_MODEL``: sentence-transformers model name or path.
- ``SPECRAG_PYDOCS_MODULES``: comma-separated module names restricting the built-in
  ``python-docs`` corpus (e.g. ``json,textwrap``) -- keeps tests and demos fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Literal

IndexType = Literal["flat", "ivf", "hnsw"]
RetrieverKind = Literal["dense", "bm25", "hybrid"]

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class IngestConfig:
    """How a corpus becomes an index.

    ``chunk_tokens`` / ``chunk_overlap`` count *generator* tokens, because the chunks' token ids
    are what reference drafting copies from and what fills the prompt budget.
    """

    chunk_tokens: int = 256
    chunk_overlap: int = 32
    embedding_model: str | None = None  # None: the existing index's model, else all-MiniLM-L6-v2
    embedding_batch_size: int = 64
    index_type: IndexType = "flat"
    # IVF: number of lists (None: ~4*sqrt(N), clamped so every list gets >= 39 training points)
    ivf_nlist: int | None = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    redis_url: str | None = None
    index_name: str | None = None  # Redis namespace; default: the index directory's name
    show_progress: bool = True
    device: str | None = None  # embedding device; None: cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.chunk_tokens < 8:
            raise ValueError("chunk_tokens must be >= 8")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ValueError("chunk_overlap must be >= 0 and < chunk_tokens")
        if self.index_type not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown index type {self.index_type!r} (flat, ivf, hnsw)")

    def with_(self, **changes: object) -> "IngestConfig":
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RetrievalConfig:
    """How an opened index answers queries."""

    redis_url: str | None = None
    embedding_model: str | None = None  # None: the one recorded in the manifest
    cache_ttl_s: int = 3600  # retrieval cache in Redis (only with a redis_url); 0 disables
    ivf_nprobe: int = 16
    hnsw_ef_search: int = 128  # recall@10 ~0.97 vs flat on clustered 64-d data (tests)
    hybrid_weight: float = 0.3  # weight of the saturated BM25 score in the hybrid score
    hybrid_bm25_saturation: float = 5.0
    hybrid_depth: int = 50  # candidates taken from each retriever before hybrid re-scoring
    use_gpu: bool | None = None  # None: GPU when faiss sees one
    device: str | None = None  # embedding device
    connect_timeout_s: float = 3.0
    extra: dict[str, str] = field(default_factory=dict)


ENVIRONMENT = {"redis_url": "SPECRAG_REDIS_URL", "embedding_model": "SPECRAG_EMBEDDING_MODEL"}


def from_environment(setting: str) -> str | None:
    """The documented environment variable for ``setting`` (a key of :data:`ENVIRONMENT`), or
    None when it is unset or blank: the default of the CLI flags and of ``PipelineConfig``."""
    return os.environ.get(ENVIRONMENT[setting], "").strip() or None
