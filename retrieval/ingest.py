"""Ingest: corpus -> token chunks -> embeddings of *new* chunks only -> stores -> indexes.

The corpus is streamed: documents are chunked one at a time and new chunks are embedded and
written in batches, so memory is flat in corpus size apart from the index itself (vectors,
BM25 matrix, the id list). Unchanged chunks (same content hash) are neither embedded nor
written; a changed document replaces exactly its own chunks. When nothing changed, the
indexes are not rebuilt at all -- a re-ingest of the same corpus is cheap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import dense
from .chunking import Chunk, chunk_document
from .config import DEFAULT_EMBEDDING_MODEL, IngestConfig
from .corpus import CorpusReader, SkippedFile
from .embeddings import Embedder, canonical_model_name
from .errors import EmptyCorpusError, IndexMismatchError, IndexNotFoundError
from .manifest import MANIFEST_NAME, Manifest, fingerprint, tokenizer_name, write_ids
from .sparse import BM25Index
from .store import SQLITE_NAME, RedisDocStore, SQLiteDocStore

logger = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What an ingest did. ``chunks``: chunks of the corpus given to this run; ``new_chunks``:
    those embedded and written (0 on an identical re-ingest); ``index_chunks``: the index total."""

    files: int
    chunks: int
    new_chunks: int
    removed_chunks: int
    index_chunks: int
    skipped_files: list[SkippedFile] = field(default_factory=list)
    seconds: float = 0.0
    rebuilt: bool = False
    redis_written: int = 0
    embedding_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``--json`` contract (other tools parse it: keep these keys)."""
        return {
            "files": self.files,
            "chunks": self.chunks,
            "new_chunks": self.new_chunks,
            "skipped_files": [asdict(s) for s in self.skipped_files],
            "seconds": round(self.seconds, 3),
        }


def _check_compatible(old: Manifest, model: str, tok: str, index_dir: Path) -> None:
    if old.embedding_model != model:
        raise IndexMismatchError(
            f"index {index_dir} was built with embedding model {old.embedding_model!r}, not {model!r}; "
            f"pass --embedding-model {old.embedding_model} or use a new --index directory"
        )
    if old.tokenizer != tok:
        raise IndexMismatchError(
            f"index {index_dir} holds token ids of tokenizer {old.tokenizer!r}, not {tok!r}; "
            "use a new --index directory"
        )


def ingest(
    inputs: Sequence[str] | str,
    index_dir: str | Path,
    tokenizer: Any,
    config: IngestConfig | None = None,
    embedder: Embedder | None = None,
    pydocs_modules: list[str] | None = None,
) -> IngestReport:
    """Ingest ``inputs`` (paths, folders, JSONL files, ``python-docs[:mod,...]``) into ``index_dir``.

    ``tokenizer`` is the generator's (``encode``/``decode``/``name_or_path``); ``embedder`` may be
    passed to reuse a loaded model (tests, benchmarks), otherwise it is loaded only if there is
    something new to embed. Raises EmptyCorpusError, IndexMismatchError, StoreUnavailableError.
    """
    t0 = time.perf_counter()
    config = config or IngestConfig()
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    old: Manifest | None = None
    if (index_dir / MANIFEST_NAME).exists():
        try:
            old = Manifest.load(index_dir)
        except IndexNotFoundError:
            old = None
    model_name = canonical_model_name(
        config.embedding_model if config.embedding_model else (old.embedding_model if old else DEFAULT_EMBEDDING_MODEL)
    )
    if embedder is not None:
        model_name = embedder.name
    tok = tokenizer_name(tokenizer)
    if old is not None:
        _check_compatible(old, model_name, tok, index_dir)
    index_name = config.index_name or (old.index_name if old else index_dir.resolve().name)

    redis_store: RedisDocStore | None = None
    store = SQLiteDocStore(index_dir / SQLITE_NAME)
    try:
        if config.redis_url:  # fail fast, before minutes of embedding
            redis_store = RedisDocStore(config.redis_url, index_name, "", backing=store)
            redis_store.ping()

        reader = CorpusReader(inputs, pydocs_modules=pydocs_modules)
        state = _Run(store, config, embedder, model_name)
        from tqdm.auto import tqdm

        with tqdm(desc="ingest", unit="chunk", disable=not config.show_progress) as bar:
            for doc in reader:
                chunks = list(chunk_document(doc, tokenizer, config.chunk_tokens, config.chunk_overlap))
                state.add_document(doc.doc_key, chunks)
                bar.update(len(chunks))
                bar.set_postfix(new=state.new, docs=reader.files, refresh=False)
            state.flush()
        store.commit()
        if state.seen == 0:
            reasons = f"; {len(reader.skipped)} input(s) skipped" if reader.skipped else ""
            raise EmptyCorpusError(f"no text to index in {', '.join(inputs)}{reasons}")

        embedder = state.embedder
        dim = embedder.dim if embedder is not None else (old.embedding_dim if old else 0)
        if old is not None and dim != old.embedding_dim:
            raise IndexMismatchError(f"embedding dimension {dim} != index dimension {old.embedding_dim}")
        changed = bool(state.new or state.removed)
        needs_build = (
            changed or old is None or old.index_type != config.index_type
            or not (index_dir / dense.FAISS_NAME).exists()
        )
        manifest = old
        if needs_build:
            manifest = _build_indexes(index_dir, store, config, index_name, model_name, dim, tok)
        assert manifest is not None
        written = 0
        if redis_store is not None:
            written = _sync_redis(redis_store, store, manifest.corpus_fingerprint,
                                  old.corpus_fingerprint if old else None, state)
        report = IngestReport(
            files=reader.files, chunks=state.seen, new_chunks=state.new, removed_chunks=state.removed,
            index_chunks=manifest.chunk_count, skipped_files=reader.skipped,
            seconds=time.perf_counter() - t0, rebuilt=needs_build, redis_written=written,
            embedding_seconds=state.embed_seconds,
        )
        logger.info("ingest: %s", report)
        return report
    finally:
        store.close()
        if redis_store is not None:
            redis_store.close()


class _Run:
    """Per-ingest bookkeeping: pending new chunks, counters, the lazily loaded embedder."""

    def __init__(self, store: SQLiteDocStore, config: IngestConfig, embedder: Embedder | None, model: str) -> None:
        self.store = store
        self.config = config
        self.embedder = embedder
        self.model = model
        self.pending: list[Chunk] = []
        self.pending_docs: list[tuple[str, list[str]]] = []
        self.seen = self.new = self.removed = 0
        self.added_ids: list[str] = []
        self.removed_ids: list[str] = []
        self.embed_seconds = 0.0

    def add_document(self, doc_key: str, chunks: list[Chunk]) -> None:
        ids = [c.id for c in chunks]
        self.seen += len(ids)
        previous = self.store.doc_chunk_ids(doc_key)
        if previous == ids:
            return
        gone = sorted(set(previous or []) - set(ids))
        if gone:
            self.store.delete(gone)
            self.removed += len(gone)
            self.removed_ids.extend(gone)
        have = self.store.existing(ids) | {c.id for c in self.pending}
        fresh = [c for c in chunks if c.id not in have]
        self.pending.extend(fresh)
        self.pending_docs.append((doc_key, ids))
        if len(self.pending) >= self.config.embedding_batch_size * 4:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            if self.embedder is None:
                self.embedder = Embedder.load(self.model, device=self.config.device,
                                              batch_size=self.config.embedding_batch_size)
            t = time.perf_counter()
            vecs = self.embedder.encode([c.text for c in self.pending], show_progress=False)
            self.embed_seconds += time.perf_counter() - t
            self.store.put(self.pending, vecs)
            self.new += len(self.pending)
            self.added_ids.extend(c.id for c in self.pending)
            self.pending = []
        for doc_key, ids in self.pending_docs:  # after their chunks: a crash leaves no dangling doc
            self.store.set_doc(doc_key, ids)
        self.pending_docs = []
        self.store.commit()


def _build_indexes(index_dir: Path, store: SQLiteDocStore, config: IngestConfig, name: str,
                   model: str, dim: int, tok: str) -> Manifest:
    """Rebuild FAISS + BM25 from the store, streaming rows in id order into ``vectors.npy``."""
    n = store.count()
    vec_path = index_dir / dense.VECTORS_NAME
    tmp_path = index_dir / (dense.VECTORS_NAME + ".tmp.npy")
    vectors = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32, shape=(n, dim))
    ids: list[str] = []
    for batch_ids, batch_vecs in store.iter_vectors():
        vectors[len(ids) : len(ids) + len(batch_ids)] = batch_vecs
        ids.extend(batch_ids)
    vectors.flush()
    del vectors
    tmp_path.replace(vec_path)
    vectors = np.load(vec_path, mmap_mode="r")
    t = time.perf_counter()
    index = dense.build_index(np.asarray(vectors), config.index_type, nlist=config.ivf_nlist,
                              hnsw_m=config.hnsw_m, ef_construction=config.hnsw_ef_construction)
    dense.save_index(index, index_dir)
    logger.info("built %s index over %d chunks in %.1fs", config.index_type, n, time.perf_counter() - t)
    bm25 = BM25Index.build([c.text for c in batch] for batch in store.iter_chunks())
    bm25.save(index_dir)
    write_ids(index_dir, ids)
    base = faiss_nlist(index)
    manifest = Manifest(
        index_name=name, embedding_model=model, embedding_dim=dim, index_type=config.index_type,
        tokenizer=tok, chunk_tokens=config.chunk_tokens, chunk_overlap=config.chunk_overlap,
        chunk_count=n, corpus_fingerprint=fingerprint(ids), ivf_nlist=base,
        hnsw_m=config.hnsw_m if config.index_type == "hnsw" else None,
    )
    manifest.save(index_dir)  # last: an interrupted build leaves the old manifest or none
    return manifest


def faiss_nlist(index: Any) -> int | None:
    import faiss

    base = faiss.downcast_index(index)
    return int(base.nlist) if isinstance(base, faiss.IndexIVF) else None


def _sync_redis(redis_store: RedisDocStore, store: SQLiteDocStore, new_fp: str, old_fp: str | None,
                state: _Run) -> int:
    """Bring Redis to ``new_fp`` writing as little as possible (nothing when already there)."""
    redis_store.fingerprint = new_fp
    marker = redis_store.marker()
    if marker == new_fp:
        return 0
    if marker is not None and marker == old_fp:
        added = [c for c in store.get(state.added_ids) if c is not None]
        written = redis_store.write(added)
        redis_store.delete(state.removed_ids)
        redis_store.set_marker(new_fp)
        return written
    return redis_store.sync_all()
