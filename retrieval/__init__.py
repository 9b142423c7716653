"""specrag's retrieval layer: corpus -> chunks -> embeddings -> FAISS / BM25 -> document store.

Public API (stable; see the docstrings of each)::

    from retrieval import ingest, IngestConfig, Retriever, RetrievalConfig, Hit
    report = ingest(["docs/", "python-docs:json,textwrap"], "idx", tokenizer, IngestConfig())
    r = Retriever.open("idx", redis_url=None)
    hits = r.retrieve(["how do I parse JSON?"], k=4, retriever="dense")

Heavy dependencies (sentence-transformers/torch) load only when something is embedded.
"""

from .config import IngestConfig, RetrievalConfig
from .errors import (
    EmptyCorpusError,
    IndexMismatchError,
    IndexNotFoundError,
    RetrievalError,
    StoreUnavailableError,
    UnknownChunkError,
)
from .ingest import IngestReport, ingest
from .retriever import Hit, Retriever

__all__ = [
    "EmptyCorpusError", "Hit", "IndexMismatchError", "IndexNotFoundError", "IngestConfig",
    "IngestReport", "RetrievalConfig", "RetrievalError", "Retriever", "StoreUnavailableError",
    "UnknownChunkError", "ingest",
]
