"""Against a real redis-server: store round trip, namespacing, cache TTL, idempotent re-ingest,
failure and recovery. Tests that kill Redis use their own server (``own_redis``)."""

from __future__ import annotations

import socket
import time

import pytest

from retrieval import IngestConfig, Retriever, RetrievalConfig, StoreUnavailableError, ingest
from retrieval.chunking import Chunk
from retrieval.store import RedisDocStore, redis_client

CFG = IngestConfig(chunk_tokens=48, chunk_overlap=8, show_progress=False)


def _chunk(cid: str, text: str) -> Chunk:
    return Chunk(cid, "doc", f"title {cid}", f"src/{cid}", text, [1, 2, 300000, -1][: len(text) % 4 + 1])


def test_store_round_trip_and_namespacing(redis_url, index_name):
    a = RedisDocStore(redis_url, index_name + "-a", "fp")
    b = RedisDocStore(redis_url, index_name + "-b", "fp")
    try:
        chunks = [_chunk(f"c{i}", f"text {i} ünïcødé\x00nul") for i in range(25)]
        assert a.write(chunks) == 25
        got = a.get([c.id for c in chunks[::-1]] + ["missing"])
        assert got[-1] is None
        for c, g in zip(chunks[::-1], got):
            assert (g.id, g.title, g.source, g.text, g.token_ids) == (c.id, c.title, c.source, c.text, c.token_ids)
        assert b.get(["c1"]) == [None]                      # other index name: nothing shared
        b.write([_chunk("c1", "b's own c1")])
        assert a.get(["c1"])[0].text.startswith("text 1") and b.get(["c1"])[0].text == "b's own c1"
        assert all(k.decode().startswith(f"specrag:{index_name}-a:") for k in a.client.keys(a.prefix + "*"))
    finally:
        for s in (a, b):
            s.delete([f"c{i}" for i in range(25)])
            s.close()


def test_ingest_to_redis_is_idempotent_and_search_reads_redis(tmp_path, corpus_dir, tokenizer, fake_embedder,
                                                             redis_url, index_name):
    index = tmp_path / "idx"
    cfg = CFG.with_(redis_url=redis_url, index_name=index_name)
    first = ingest([str(corpus_dir)], index, tokenizer, cfg, embedder=fake_embedder)
    assert first.new_chunks > 0 and first.redis_written == first.index_chunks
    second = ingest([str(corpus_dir)], index, tokenizer, cfg, embedder=fake_embedder)
    assert second.new_chunks == 0 and second.redis_written == 0
    client = redis_client(redis_url)
    try:
        keys = client.keys(f"specrag:{index_name}:c:*")
        assert len(keys) == first.index_chunks
        with Retriever.open(index, redis_url=redis_url, embedder=fake_embedder) as r:
            # prove the hits come from Redis: change one chunk there
            hit = r.retrieve(["patch the inner tube"], k=1, retriever="bm25")[0][0]
            r.store.write([Chunk(hit.id, "x", hit.title, hit.source, "EDITED IN REDIS", [7])])
            again = r.get_chunks([hit.id])[0]
            assert again.text == "EDITED IN REDIS" and again.token_ids == [7]
    finally:
        for key in client.scan_iter(f"specrag:{index_name}:*"):
            client.delete(key)
        client.close()


def test_retrieval_cache_hits_and_ttl(tmp_path, corpus_dir, tokenizer, fake_embedder, redis_url, index_name):
    index = tmp_path / "idx"
    ingest([str(corpus_dir)], index, tokenizer, CFG.with_(index_name=index_name), embedder=fake_embedder)
    config = RetrievalConfig(cache_ttl_s=1)
    with Retriever.open(index, redis_url=redis_url, embedder=fake_embedder, config=config) as r:
        try:
            fresh = r.retrieve(["steep the leaves", "tectonic plates"], k=3)
            calls = fake_embedder.calls
            cached = r.retrieve(["  steep   the leaves ", "tectonic plates"], k=3)  # normalised whitespace
            assert fake_embedder.calls == calls                     # answered from the cache
            assert [[(h.id, h.score) for h in hs] for hs in cached] == [[(h.id, h.score) for h in hs] for hs in fresh]
            stats = r.cache_stats()
            assert (stats["hits"], stats["misses"]) == (2, 2) and stats["shared_hits"] >= 2
            r.retrieve(["steep the leaves"], k=4)                   # other k: other key
            assert r.cache_stats()["misses"] == 3
            ttl = r.cache.client.ttl(r.cache.key("steep the leaves", "dense", 3))
            assert 0 < ttl <= 1
            time.sleep(1.2)
            r.retrieve(["steep the leaves"], k=3)
            assert r.cache_stats()["misses"] == 4                   # expired
        finally:
            for key in r.cache.client.scan_iter(f"specrag:{index_name}:*"):
                r.cache.client.delete(key)


def test_unreachable_redis_fails_fast_with_clear_error(tmp_path, corpus_dir, tokenizer, fake_embedder, own_redis):
    index = tmp_path / "idx"
    ingest([str(corpus_dir)], index, tokenizer, CFG, embedder=fake_embedder)
    own_redis.kill()                                        # a port nothing listens on now
    silent = socket.socket()                                # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for url in (own_redis.url, f"redis://127.0.0.1:{silent.getsockname()[1]}/0"):
            t = time.perf_counter()
            with pytest.raises(StoreUnavailableError, match="unreachable"):
                Retriever.open(index, redis_url=url, embedder=fake_embedder,
                               config=RetrievalConfig(connect_timeout_s=1.0))
            assert time.perf_counter() - t < 5
    finally:
        silent.close()
    t = time.perf_counter()
    with pytest.raises(StoreUnavailableError):
        ingest([str(corpus_dir)], tmp_path / "idx2", tokenizer, CFG.with_(redis_url=own_redis.url),
               embedder=fake_embedder)
    assert time.perf_counter() - t < 6


def test_redis_killed_and_restarted_mid_run(tmp_path, corpus_dir, tokenizer, fake_embedder, own_redis):
    index = tmp_path / "idx"
    ingest([str(corpus_dir)], index, tokenizer, CFG.with_(redis_url=own_redis.url), embedder=fake_embedder)
    queries = ["patch the inner tube", "lighthouses at night"]
    with Retriever.open(index, redis_url=own_redis.url, embedder=fake_embedder) as r:
        before = [[(h.id, h.text) for h in hs] for hs in r.retrieve(queries, k=3)]
        own_redis.kill()
        t = time.perf_counter()
        with pytest.raises(StoreUnavailableError, match="next call retries"):
            r.retrieve(queries, k=3)
        with pytest.raises(StoreUnavailableError):
            r.get_chunks([before[0][0][0]])
        assert time.perf_counter() - t < 10
        own_redis.start()                                    # same port, empty (no persistence)
        after = [[(h.id, h.text) for h in hs] for hs in r.retrieve(queries, k=3)]
        assert after == before                               # same object, no reopen
        assert r.store.syncs == 1                            # refilled from the index directory
        assert r.get_chunks([before[1][0][0]])[0].text == before[1][0][1]
