"""The retrieval facade the pipeline and deployments use: :class:`Retriever`.

Contract (keep stable -- ``pipeline`` and ``deploy`` build on it)::

    r = Retriever.open(index_dir, redis_url=None, embedding_model=None)
    r.retrieve(queries, k, retriever="dense"|"bm25"|"hybrid") -> list[list[Hit]]
    r.embed_queries(queries) -> np.ndarray (n, dim), unit rows
    r.retrieve(queries, k, retriever, query_vecs=vecs)      # reuse embeddings
    r.score_local(query, chunk_ids, retriever) -> list[float]
    r.score_local_vec(query_vec, chunk_ids) -> list[float]  # dense, precomputed embedding
    r.get_chunks(ids) -> list[Hit]                          # score 0.0, one batched read
    r.chunk_vectors(ids) -> np.ndarray (len(ids), dim)

``retrieve`` is batched end to end -- one embedding call, one FAISS search, one BM25 pass per
query, one store read -- because retrieval speculation verifies several steps with a single
call and lives on that call costing less than the steps one by one.

Local scoring uses the index's own metric, so RaLMSpec's per-request cache ranks candidates
exactly as the index would: dense = inner product of the stored (unit) vectors with the query
embedding (for ``flat`` equal to FAISS's scores up to float rounding); bm25 = the BM25 score;
hybrid = ``(1 - w) * dense + w * bm25 / (bm25 + c)`` -- a per-chunk function, which is why
hybrid is that fusion and not reciprocal-rank fusion (ranks cannot be computed locally).
Hybrid top-k re-scores the union of the top ``hybrid_depth`` of each retriever.

Thread-safe for concurrent reads: the pipeline verifies retrievals in a background thread.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import dense
from .cache import Ranked, RetrievalCache
from .config import RetrievalConfig, RetrieverKind
from .embeddings import Embedder, canonical_model_name
from .errors import IndexMismatchError, IndexNotFoundError, RetrievalError, UnknownChunkError
from .hit import Hit
from .manifest import Manifest, read_ids, tokenizer_name
from .sparse import BM25Index, top_k_rows
from .store import SQLITE_NAME, DocStore, RedisDocStore, SQLiteDocStore, StoredChunk

logger = logging.getLogger(__name__)

RETRIEVERS = ("dense", "bm25", "hybrid")


class Retriever:
    """An opened index: FAISS + BM25 + document store (+ Redis cache). Use :meth:`open`."""

    def __init__(self, index_dir: Path, manifest: Manifest, ids: list[str], vectors: np.ndarray,
                 index: Any, store: DocStore, config: RetrievalConfig, embedder: Embedder | None = None,
                 cache: RetrievalCache | None = None, faiss_device: str = "cpu") -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self.ids = ids
        self.row_of = {cid: r for r, cid in enumerate(ids)}
        self.vectors = vectors
        self.index = index
        self.store = store
        self.config = config
        self.cache = cache
        self.faiss_device = faiss_device
        self._embedder = embedder
        self._bm25: BM25Index | None = None
        self._lock = threading.Lock()
        self._gpu_resources: Any = None

    # ------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, index_dir: str | Path, redis_url: str | None = None, embedding_model: str | None = None,
             *, config: RetrievalConfig | None = None, embedder: Embedder | None = None,
             expected_tokenizer: str | None = None) -> "Retriever":
        """Open ``index_dir``; with ``redis_url`` the chunks come from Redis and answers are cached.

        Raises IndexNotFoundError (no index), IndexMismatchError (``embedding_model`` /
        ``embedder`` / ``expected_tokenizer`` differ from the index's), StoreUnavailableError
        (Redis unreachable, within ``connect_timeout_s``).
        """
        config = config or RetrievalConfig()
        redis_url = redis_url or config.redis_url
        embedding_model = embedding_model or config.embedding_model
        index_dir = Path(index_dir)
        manifest = Manifest.load(index_dir)
        want = embedder.name if embedder is not None else (
            canonical_model_name(embedding_model) if embedding_model else None)
        if want is not None and want != manifest.embedding_model:
            raise IndexMismatchError(
                f"index {index_dir} was built with embedding model {manifest.embedding_model!r}, "
                f"not {want!r}; search with the same model or re-ingest into a new --index directory"
            )
        if embedder is not None and embedder.dim != manifest.embedding_dim:
            raise IndexMismatchError(
                f"embedding dimension {embedder.dim} != index dimension {manifest.embedding_dim}")
        if expected_tokenizer is not None:
            tok = tokenizer_name(expected_tokenizer)
            if tok != manifest.tokenizer:
                raise IndexMismatchError(
                    f"index {index_dir} holds token ids of tokenizer {manifest.tokenizer!r}, not {tok!r}")
        try:
            ids = read_ids(index_dir)
            vectors = np.load(index_dir / dense.VECTORS_NAME, mmap_mode="r")
            index = dense.load_index(index_dir)
        except (OSError, ValueError, RuntimeError) as exc:
            raise IndexNotFoundError(f"index {index_dir} is incomplete ({exc}); re-run specrag ingest") from exc
        if len(ids) != manifest.chunk_count or vectors.shape != (len(ids), manifest.embedding_dim) \
                or index.ntotal != len(ids):
            raise IndexMismatchError(f"index {index_dir} is inconsistent (ids, vectors and FAISS disagree); re-ingest")
        dense.set_search_params(index, nprobe=config.ivf_nprobe, ef_search=config.hnsw_ef_search)
        index, device, gpu_resources = dense.maybe_to_gpu(index, config.use_gpu)
        sqlite_store = SQLiteDocStore(index_dir / SQLITE_NAME, readonly=True)
        store: DocStore = sqlite_store
        cache = None
        if redis_url:
            rstore = RedisDocStore(redis_url, manifest.index_name, manifest.corpus_fingerprint,
                                   backing=sqlite_store, connect_timeout_s=config.connect_timeout_s)
            rstore.ping()
            store = rstore
            if config.cache_ttl_s > 0:
                cache = RetrievalCache(rstore.client, redis_url, manifest.index_name,
                                       manifest.corpus_fingerprint, config.cache_ttl_s)
        logger.info("opened index %s: %d chunks, %s (%s), store %s", index_dir, len(ids),
                    manifest.index_type, device, "redis" if redis_url else "embedded")
        self = cls(index_dir, manifest, ids, vectors, index, store, config, embedder, cache, device)
        self._gpu_resources = gpu_resources  # must outlive the GPU index
        return self

    def close(self) -> None:
        self.store.close()
        backing = getattr(self.store, "backing", None)
        if backing is not None:
            backing.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------------- models
    @property
    def embedder(self) -> Embedder:
        """Loaded on first dense use (a BM25-only caller never pays for the model)."""
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    emb = Embedder.load(self.config.embedding_model or self.manifest.embedding_model,
                                        device=self.config.device)
                    if emb.dim != self.manifest.embedding_dim:
                        raise IndexMismatchError(
                            f"embedding dimension {emb.dim} != index dimension {self.manifest.embedding_dim}")
                    self._embedder = emb
        return self._embedder

    @property
    def bm25(self) -> BM25Index:
        if self._bm25 is None:
            with self._lock:
                if self._bm25 is None:
                    self._bm25 = BM25Index.load(self.index_dir)
        return self._bm25

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Unit-norm query embeddings (n, dim), one batched model call; reuse them with
        ``retrieve(..., query_vecs=)`` and :meth:`score_local_vec`."""
        return self.embedder.encode(list(queries))

    # ------------------------------------------------------------------------- search
    def retrieve(self, queries: Sequence[str], k: int, retriever: RetrieverKind = "dense",
                 query_vecs: np.ndarray | None = None) -> list[list[Hit]]:
        """Top-``k`` hits per query, best first (fewer when the index is smaller; BM25 leaves out
        chunks sharing no word with the query). Results are cached in Redis when it is used."""
        ranked = self.retrieve_ids(queries, k, retriever, query_vecs)
        chunks = self._fetch([cid for r in ranked for cid, _ in r])
        return [[_hit(chunks[cid], score) for cid, score in r] for r in ranked]

    def retrieve_ids(self, queries: Sequence[str], k: int, retriever: RetrieverKind = "dense",
                     query_vecs: np.ndarray | None = None) -> list[Ranked]:
        """Like :meth:`retrieve` without the store read: [(chunk id, score)] per query."""
        if retriever not in RETRIEVERS:
            raise RetrievalError(f"unknown retriever {retriever!r} (dense, bm25, hybrid)")
        if k < 1:
            raise RetrievalError(f"k must be >= 1, got {k}")
        queries = list(queries)
        if not queries:
            return []
        results: list[Ranked | None] = [None] * len(queries)
        if self.cache is not None:
            results = self.cache.get_many(queries, retriever, k)
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            vecs = None if query_vecs is None else np.asarray(query_vecs)[todo]
            fresh = self._search([queries[i] for i in todo], k, retriever, vecs)
            for i, r in zip(todo, fresh):
                results[i] = r
            if self.cache is not None:
                self.cache.put_many([queries[i] for i in todo], retriever, k, fresh)
        return [r or [] for r in results]

    def _search(self, queries: list[str], k: int, retriever: str, vecs: np.ndarray | None) -> list[Ranked]:
        if retriever == "dense":
            vecs = self.embed_queries(queries) if vecs is None else vecs
            scores, rows = dense.search(self.index, vecs, k)
            return [[(self.ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                    for srow, rrow in zip(scores, rows)]
        if retriever == "bm25":
            out = []
            for q in queries:
                s, rows = self.bm25.top_k(q, k)
                out.append([(self.ids[r], float(v)) for v, r in zip(s, rows)])
            return out
        # hybrid: union of both candidate lists, re-scored exactly with the fusion
        vecs = self.embed_queries(queries) if vecs is None else vecs
        depth = max(k, self.config.hybrid_depth)
        _, drows = dense.search(self.index, vecs, depth)
        out = []
        for q, v, dr in zip(queries, vecs, drows):
            bm = self.bm25.scores(q)
            _, br = top_k_rows(bm, depth)
            cand = np.union1d(dr[dr >= 0], br)
            fused = self._fuse(np.asarray(self.vectors[cand]) @ v, bm[cand])
            s, local = top_k_rows(fused - fused.min() + 1.0, k)  # shift: top_k_rows keeps > 0
            out.append([(self.ids[cand[j]], float(fused[j])) for j in local])
        return out

    def _fuse(self, dense_scores: np.ndarray, bm25_scores: np.ndarray) -> np.ndarray:
        w, c = self.config.hybrid_weight, self.config.hybrid_bm25_saturation
        return ((1 - w) * dense_scores + w * bm25_scores / (bm25_scores + c)).astype(np.float32)

    # ------------------------------------------------------------------------- local scoring
    def _rows(self, chunk_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self.row_of[c] for c in chunk_ids), dtype=np.int64, count=len(chunk_ids))
        except KeyError as exc:
            raise UnknownChunkError(f"chunk {exc.args[0]!r} is not in index {self.index_dir}") from None

    def chunk_vectors(self, chunk_ids: Sequence[str]) -> np.ndarray:
        """Stored unit embeddings of these chunks, (len(ids), dim) float32."""
        return np.asarray(self.vectors[self._rows(chunk_ids)], dtype=np.float32)

    def score_local_vec(self, query_vec: np.ndarray, chunk_ids: Sequence[str]) -> list[float]:
        """Dense scores of ``chunk_ids`` for a precomputed query embedding (no model call)."""
        if not chunk_ids:
            return []
        return (self.chunk_vectors(chunk_ids) @ np.asarray(query_vec, dtype=np.float32).reshape(-1)).tolist()

    def score_local(self, query: str, chunk_ids: Sequence[str], retriever: RetrieverKind = "dense",
                    query_vec: np.ndarray | None = None) -> list[float]:
        """Scores of ``chunk_ids`` for ``query`` with the index's own metric (see module doc)."""
        if retriever not in RETRIEVERS:
            raise RetrievalError(f"unknown retriever {retriever!r} (dense, bm25, hybrid)")
        if not chunk_ids:
            return []
        rows = self._rows(chunk_ids)
        if retriever == "bm25":
            return self.bm25.scores(query)[rows].tolist()
        vec = self.embed_queries([query])[0] if query_vec is None else np.asarray(query_vec).reshape(-1)
        dense_scores = np.asarray(self.vectors[rows], dtype=np.float32) @ vec.astype(np.float32)
        if retriever == "dense":
            return dense_scores.tolist()
        return self._fuse(dense_scores, self.bm25.scores(query)[rows]).tolist()

    # ------------------------------------------------------------------------- store
    def _fetch(self, ids: list[str]) -> dict[str, StoredChunk]:
        unique = list(dict.fromkeys(ids))
        got = self.store.get(unique)
        missing = [cid for cid, c in zip(unique, got) if c is None]
        if missing:
            raise UnknownChunkError(
                f"{len(missing)} chunk(s) missing from the document store (e.g. {missing[0]}); re-ingest")
        return {c.id: c for c in got if c is not None}

    def get_chunks(self, ids: Sequence[str]) -> list[Hit]:
        """Chunks by id in the order asked (score 0.0), one batched store read."""
        chunks = self._fetch(list(ids))
        return [_hit(chunks[cid], 0.0) for cid in ids]

    def cache_stats(self) -> dict[str, int]:
        return self.cache.stats() if self.cache is not None else {}


def _hit(c: StoredChunk, score: float) -> Hit:
    return Hit(id=c.id, title=c.title, source=c.source, score=float(score), text=c.text, token_ids=list(c.token_ids))
