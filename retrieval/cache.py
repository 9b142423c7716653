"""Retrieval cache in Redis, shared by all replicas.

Key: ``specrag:<index name>:q:<fingerprint>:<sha1(retriever, k, normalised query)>`` -> the hit
ids and scores (JSON), with a TTL. The corpus fingerprint in the key makes a re-ingest
invalidate the cache without a scan. Normalisation only collapses whitespace and applies
Unicode NFC -- both leave every retriever's answer unchanged (lower-casing would not, for a
cased embedding model), so a cached answer is always the answer the index would give.
Hit/miss counters live in Redis too (``...:cache:hits`` / ``...:cache:misses``).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Any, Sequence

from .store import redis_errors

Ranked = list[tuple[str, float]]


def normalise_query(query: str) -> str:
    return " ".join(unicodedata.normalize("NFC", query).split())


class RetrievalCache:
    def __init__(self, client: Any, url: str, name: str, fingerprint: str, ttl_s: int) -> None:
        self.client = client
        self.url = url
        self.prefix = f"specrag:{name}:"
        self.fingerprint = fingerprint
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0

    def key(self, query: str, retriever: str, k: int) -> str:
        h = hashlib.sha1(f"{retriever}\x00{k}\x00{normalise_query(query)}".encode()).hexdigest()
        return f"{self.prefix}q:{self.fingerprint}:{h}"

    def get_many(self, queries: Sequence[str], retriever: str, k: int) -> list[Ranked | None]:
        keys = [self.key(q, retriever, k) for q in queries]
        with redis_errors(self.url):
            raw = self.client.mget(keys)
        out: list[Ranked | None] = [None if r is None else [(i, float(s)) for i, s in json.loads(r)] for r in raw]
        hits = sum(r is not None for r in out)
        self.hits += hits
        self.misses += len(out) - hits
        with redis_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            if hits:
                pipe.incrby(self.prefix + "cache:hits", hits)
            if len(out) - hits:
                pipe.incrby(self.prefix + "cache:misses", len(out) - hits)
            pipe.execute()
        return out

    def put_many(self, queries: Sequence[str], retriever: str, k: int, results: Sequence[Ranked]) -> None:
        with redis_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            for q, ranked in zip(queries, results):
                pipe.set(self.key(q, retriever, k), json.dumps([[i, s] for i, s in ranked]), ex=self.ttl_s)
            pipe.execute()

    def stats(self) -> dict[str, int]:
        """This process's hits/misses, and the shared totals across replicas."""
        with redis_errors(self.url):
            shared = self.client.mget([self.prefix + "cache:hits", self.prefix + "cache:misses"])
        return {
            "hits": self.hits,
            "misses": self.misses,
            "shared_hits": int(shared[0] or 0),
            "shared_misses": int(shared[1] or 0),
        }
