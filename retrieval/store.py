"""Document stores: chunk text, metadata and generator token ids, by chunk id.

One interface (:class:`DocStore`), two implementations:

- :class:`SQLiteDocStore` -- the embedded default, a SQLite file inside the index directory.
  It is always written: it is the durable copy (it also holds each chunk's embedding, so a
  re-ingest embeds only new chunks and the FAISS index can be rebuilt without the model).
- :class:`RedisDocStore` -- the store shared by all replicas (``--redis-url``). Keys are
  namespaced ``specrag:<index name>:``; reads are one MGET per batch. Redis here runs without
  persistence, so the store carries a marker key holding the index fingerprint: when a read
  finds it missing (Redis restarted and came back empty) the store refills itself from the
  embedded copy and answers -- no restart of the caller needed.

Redis errors become :class:`~retrieval.errors.StoreUnavailableError` within the connect
timeout (a few seconds), never a hang; redis-py reconnects by itself on the next call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from .chunking import Chunk
from .errors import StoreUnavailableError

logger = logging.getLogger(__name__)

SQLITE_NAME = "store.sqlite"
# SQLite's default limit on host parameters is 999 on old builds; stay below it.
_SQL_BATCH = 900


@dataclass(frozen=True)
class StoredChunk:
    id: str
    title: str
    source: str
    text: str
    token_ids: list[int]


class DocStore(Protocol):
    """Batched chunk storage; ``get`` answers in the order asked, ``None`` for unknown ids."""

    def get(self, ids: Sequence[str]) -> list[StoredChunk | None]: ...

    def close(self) -> None: ...


def _ids_blob(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i4").tobytes()


def _blob_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype="<i4").tolist()


# ------------------------------------------------------------------------------ SQLite


class SQLiteDocStore:
    """The embedded store. Thread-safe (one connection behind a lock): the pipeline verifies
    retrievals in a background thread while the main thread reads chunks."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS chunks (
                    id TEXT PRIMARY KEY, doc_key TEXT NOT NULL, title TEXT, source TEXT,
                    text TEXT NOT NULL, token_ids BLOB NOT NULL, vector BLOB NOT NULL);
                CREATE TABLE IF NOT EXISTS docs (doc_key TEXT PRIMARY KEY, chunk_ids TEXT NOT NULL);
                """
            )
        self._lock = threading.Lock()
        self._writable = not readonly

    # reads ---------------------------------------------------------------------------
    def get(self, ids: Sequence[str]) -> list[StoredChunk | None]:
        found: dict[str, StoredChunk] = {}
        unique = list(dict.fromkeys(ids))
        with self._lock:
            for i in range(0, len(unique), _SQL_BATCH):
                part = unique[i : i + _SQL_BATCH]
                q = f"SELECT id, title, source, text, token_ids FROM chunks WHERE id IN ({','.join('?' * len(part))})"
                for cid, title, source, text, blob in self._db.execute(q, part):
                    found[cid] = StoredChunk(cid, title, source, text, _blob_ids(blob))
        return [found.get(i) for i in ids]

    def existing(self, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        with self._lock:
            for i in range(0, len(ids), _SQL_BATCH):
                part = list(ids[i : i + _SQL_BATCH])
                q = f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(part))})"
                out.update(r[0] for r in self._db.execute(q, part))
        return out

    def doc_chunk_ids(self, doc_key: str) -> list[str] | None:
        with self._lock:
            row = self._db.execute("SELECT chunk_ids FROM docs WHERE doc_key=?", (doc_key,)).fetchone()
        return json.loads(row[0]) if row else None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def iter_vectors(self, batch: int = 4096) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, vectors) in id order, in batches -- rebuilding the index never loads all rows."""
        last = ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, vector FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [r[0] for r in rows], np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])

    def iter_chunks(self, batch: int = 1024) -> Iterator[list[StoredChunk]]:
        """All chunks in id order (the FAISS row order), in batches."""
        last = ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, title, source, text, token_ids FROM chunks WHERE id > ? ORDER BY id LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [StoredChunk(r[0], r[1], r[2], r[3], _blob_ids(r[4])) for r in rows]

    # writes --------------------------------------------------------------------------
    def put(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        rows = [
            (c.id, c.doc_key, c.title, c.source, c.text, _ids_blob(c.token_ids),
             np.asarray(v, dtype="<f4").tobytes())
            for c, v in zip(chunks, vectors)
        ]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?,?,?,?,?,?,?)", rows)

    def delete(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        with self._lock:
            for i in range(0, len(ids), _SQL_BATCH):
                part = ids[i : i + _SQL_BATCH]
                self._db.execute(f"DELETE FROM chunks WHERE id IN ({','.join('?' * len(part))})", part)

    def set_doc(self, doc_key: str, chunk_ids: list[str]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?)", (doc_key, json.dumps(chunk_ids)))

    def commit(self) -> None:
        with self._lock:
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            if self._writable:
                # back to a single self-contained file: readers may open the index read-only
                # (a read-only mount, another user) and WAL mode would need its -shm file
                self._db.commit()
                self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.close()


# ------------------------------------------------------------------------------- Redis


def redis_client(url: str, connect_timeout_s: float = 3.0) -> Any:
    """A redis-py client that fails fast: connect/read timeouts of a few seconds, one retry.

    The one retry is what makes recovery transparent: after a Redis restart the pooled
    connection is dead, the first attempt fails and the retry reconnects.
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        health_check_interval=0,
    )


@contextlib.contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """Turn redis-py's connection failures into :class:`StoreUnavailableError`."""
    import redis

    try:
        yield
    except redis.exceptions.InvalidResponse as exc:
        raise StoreUnavailableError(
            f"{redact_url(url)} did not answer as a Redis server ({exc}); check --redis-url"
        ) from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise StoreUnavailableError(
            f"Redis at {redact_url(url)} is unreachable ({exc.__class__.__name__}: {exc}); "
            "start it or fix --redis-url -- the next call retries"
        ) from exc


def redact_url(url: str) -> str:
    """Hide a password in redis://user:pass@host URLs before they reach logs and messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _pack(c: StoredChunk | Chunk) -> bytes:
    meta = json.dumps({"title": c.title, "source": c.source, "text": c.text}).encode("utf-8")
    return struct.pack("<I", len(meta)) + meta + _ids_blob(c.token_ids)


def _unpack(cid: str, raw: bytes) -> StoredChunk:
    (n,) = struct.unpack_from("<I", raw)
    meta = json.loads(raw[4 : 4 + n])
    return StoredChunk(cid, meta["title"], meta["source"], meta["text"], _blob_ids(raw[4 + n :]))


class RedisDocStore:
    """Chunks in Redis under ``specrag:<name>:c:<id>``; self-healing from ``backing``.

    ``fingerprint`` is the index's corpus fingerprint; the marker key ``specrag:<name>:fp``
    holds it once the store is complete, and is read in the same MGET as the chunks.
    """

    def __init__(self, url: str, name: str, fingerprint: str, backing: SQLiteDocStore | None = None,
                 connect_timeout_s: float = 3.0, client: Any = None) -> None:
        self.url = url
        self.prefix = f"specrag:{name}:"
        self.fingerprint = fingerprint
        self.backing = backing
        self.client = client if client is not None else redis_client(url, connect_timeout_s)
        self.syncs = 0

    @property
    def marker_key(self) -> str:
        return self.prefix + "fp"

    def key(self, cid: str) -> str:
        return f"{self.prefix}c:{cid}"

    def ping(self) -> None:
        with redis_errors(self.url):
            self.client.ping()

    def marker(self) -> str | None:
        with redis_errors(self.url):
            raw = self.client.get(self.marker_key)
        return raw.decode() if raw is not None else None

    def get(self, ids: Sequence[str]) -> list[StoredChunk | None]:
        if not ids:
            return []
        with redis_errors(self.url):
            raw = self.client.mget([self.marker_key] + [self.key(i) for i in ids])
            if self.backing is not None and (raw[0] is None or raw[0].decode() != self.fingerprint):
                logger.warning("Redis store %s is missing or stale: refilling it from the index directory",
                               self.prefix)
                self.sync_all()
                raw = self.client.mget([self.marker_key] + [self.key(i) for i in ids])
        return [None if r is None else _unpack(cid, r) for cid, r in zip(ids, raw[1:])]

    def write(self, chunks: Iterable[StoredChunk | Chunk], batch: int = 500) -> int:
        n = 0
        with redis_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            for c in chunks:
                pipe.set(self.key(c.id), _pack(c))
                n += 1
                if n % batch == 0:
                    pipe.execute()
            pipe.execute()
        return n

    def delete(self, ids: Iterable[str]) -> None:
        keys = [self.key(i) for i in ids]
        with redis_errors(self.url):
            for i in range(0, len(keys), 1000):
                self.client.delete(*keys[i : i + 1000])

    def set_marker(self, fingerprint: str) -> None:
        with redis_errors(self.url):
            self.client.set(self.marker_key, fingerprint)
        self.fingerprint = fingerprint

    def sync_all(self) -> int:
        """Write every chunk of the backing store, then the marker (which makes it complete)."""
        if self.backing is None:
            return 0
        n = 0
        for batch in self.backing.iter_chunks():
            n += self.write(batch)
        self.set_marker(self.fingerprint)
        self.syncs += 1
        logger.info("Redis store %s refilled with %d chunks", self.prefix, n)
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
