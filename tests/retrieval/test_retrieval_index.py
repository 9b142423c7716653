"""Ingest + search on the embedded store with a fast hashing embedder (the real MiniLM runs in
test_retrieval_e2e.py): idempotence, replacement, exactness of flat search, local scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval import (
    EmptyCorpusError, IndexMismatchError, IndexNotFoundError, IngestConfig, Retriever, ingest,
)
from retrieval.errors import UnknownChunkError
from retrieval.manifest import Manifest

CFG = IngestConfig(chunk_tokens=48, chunk_overlap=8, show_progress=False)


@pytest.fixture
def built(tmp_path, corpus_dir, tokenizer, fake_embedder):
    index = tmp_path / "idx"
    report = ingest([str(corpus_dir)], index, tokenizer, CFG, embedder=fake_embedder)
    return index, report


def open_(index, fake_embedder, **kw):
    return Retriever.open(index, embedder=fake_embedder, **kw)


def test_ingest_reports_and_reingest_is_a_noop(built, corpus_dir, tokenizer, fake_embedder):
    index, report = built
    assert report.files == 4 and report.new_chunks == report.chunks == report.index_chunks > 4
    assert sorted(s.reason for s in report.skipped_files) == ["binary file", "not UTF-8 text"]
    assert set(report.to_json()) == {"files", "chunks", "new_chunks", "skipped_files", "seconds"}
    before = (index / "ids.json").read_text(), (index / "manifest.json").read_text()
    fake_embedder.calls = 0
    again = ingest([str(corpus_dir)], index, tokenizer, CFG, embedder=fake_embedder)
    assert again.new_chunks == 0 and again.chunks == report.chunks and not again.rebuilt
    assert fake_embedder.calls == 0                                    # nothing embedded
    assert ((index / "ids.json").read_text(), (index / "manifest.json").read_text()) == before


def test_changed_file_replaces_only_its_own_chunks(built, corpus_dir, tokenizer, fake_embedder):
    index, report = built
    with open_(index, fake_embedder) as r:
        by_source = {}
        for h in r.get_chunks(r.ids):
            by_source.setdefault(h.source, set()).add(h.id)
    notes = str(corpus_dir / "notes.txt")
    (corpus_dir / "notes.txt").write_text("Completely new notes about sailing boats and knots.")
    again = ingest([str(corpus_dir)], index, tokenizer, CFG, embedder=fake_embedder)
    assert again.new_chunks == 1 and again.removed_chunks == len(by_source[notes])
    with open_(index, fake_embedder) as r:
        after = {}
        for h in r.get_chunks(r.ids):
            after.setdefault(h.source, set()).add(h.id)
        assert after[notes].isdisjoint(by_source[notes])
        for source, ids in by_source.items():
            if source != notes:
                assert after[source] == ids
        hit = r.retrieve(["sailing boats knots"], k=1, retriever="bm25")[0][0]
        assert hit.source == notes
    assert Manifest.load(index).chunk_count == report.index_chunks - len(by_source[notes]) + 1


def test_flat_search_equals_brute_force_inner_product(built, fake_embedder):
    index, _ = built
    queries = ["steep the leaves", "puncture inner tube", "volcano plates", "tomatoes sun", "zebra"]
    with open_(index, fake_embedder) as r:
        vectors = r.chunk_vectors(r.ids)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        qv = r.embed_queries(queries)
        k = 7
        results = r.retrieve(queries, k=k)
        for q, v, hits in zip(queries, qv, results):
            brute = vectors @ v
            order = np.argsort(-brute, kind="stable")[:k]
            assert len(hits) == k
            assert np.allclose([h.score for h in hits], brute[order], atol=1e-5)
            # ids agree except where scores tie: each hit's own brute-force score is the one at its rank
            for h, row in zip(hits, order):
                assert abs(brute[r.row_of[h.id]] - brute[row]) < 1e-5, (q, h.id, r.ids[row])
        # one batched call == the same queries one by one
        single = [r.retrieve([q], k=k)[0] for q in queries]
        assert [[h.id for h in hs] for hs in single] == [[h.id for h in hs] for hs in results]


@pytest.mark.parametrize("kind", ["dense", "bm25", "hybrid"])
def test_local_scoring_equals_index_scores(built, fake_embedder, kind):
    index, _ = built
    with open_(index, fake_embedder) as r:
        for q in ["heat the water to 90 degrees", "patch the inner tube", "tectonic plates"]:
            hits = r.retrieve([q], k=5, retriever=kind)[0]
            assert hits
            ids = [h.id for h in hits]
            local = r.score_local(q, ids[::-1], retriever=kind)[::-1]
            assert np.allclose(local, [h.score for h in hits], atol=1e-5)
            # ranking within a local candidate set is the index's ranking (up to ties)
            assert np.allclose(sorted(local, reverse=True), local, atol=1e-6), (q, ids, local)
            if kind == "dense":
                vec = r.embed_queries([q])[0]
                assert np.allclose(r.score_local_vec(vec, ids), local, atol=1e-6)
        with pytest.raises(UnknownChunkError):
            r.score_local("x", ["not-a-chunk"], retriever=kind)


def test_bm25_ranks_planted_exact_phrase_first(tmp_path, corpus_dir, tokenizer, fake_embedder):
    (corpus_dir / "planted.txt").write_text("The quokka photosynthesis anomaly was catalogued in 1987.")
    index = tmp_path / "idx"
    ingest([str(corpus_dir)], index, tokenizer, CFG, embedder=fake_embedder)
    with open_(index, fake_embedder) as r:
        hits = r.retrieve(["quokka photosynthesis anomaly"], k=3, retriever="bm25")[0]
        assert hits[0].source.endswith("planted.txt") and hits[0].score > 0
        assert all(h.score > 0 for h in hits)                           # no zero-score filler
        assert r.retrieve(["xylophone"], k=3, retriever="bm25") == [[]]  # no shared word


def test_hits_carry_generator_token_ids(built, fake_embedder, tokenizer):
    index, _ = built
    with open_(index, fake_embedder) as r:
        hit = r.retrieve(["bicycle wheel"], k=1)[0][0]
        assert hit.token_ids and tokenizer.decode(hit.token_ids) == hit.text
        assert set(hit.public()) == {"id", "score", "title", "source", "text"}
        got = r.get_chunks([hit.id, hit.id])
        assert [g.id for g in got] == [hit.id, hit.id] and got[0].text == hit.text


def test_errors_users_can_act_on(tmp_path, corpus_dir, tokenizer, fake_embedder, built):
    index, _ = built
    with pytest.raises(IndexNotFoundError, match="specrag ingest"):
        Retriever.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(EmptyCorpusError):
        ingest([str(tmp_path / "empty")], tmp_path / "idx2", tokenizer, CFG, embedder=fake_embedder)
    with pytest.raises(IndexMismatchError, match="hashing-64"):
        Retriever.open(index, embedding_model="some/other-model")
    from retrieval.embeddings import Embedder
    bigger = Embedder(name="hashing-64", model=None, dim=128)
    with pytest.raises(IndexMismatchError, match="dimension"):
        Retriever.open(index, embedder=bigger)
    with pytest.raises(IndexMismatchError, match="tokenizer"):
        Retriever.open(index, embedder=fake_embedder, expected_tokenizer="/some/where/gpt2")
    other = Embedder(name="other-model", model=fake_embedder.model, dim=64)
    with pytest.raises(IndexMismatchError, match="embedding model"):
        ingest([str(corpus_dir)], index, tokenizer, CFG, embedder=other)


def test_index_types_and_switching(built, corpus_dir, tokenizer, fake_embedder):
    index, report = built
    with open_(index, fake_embedder) as r:
        flat = [h.id for h in r.retrieve(["steep the leaves for 5 minutes"], k=3)[0]]
    for kind in ("hnsw", "ivf"):
        rep = ingest([str(corpus_dir)], index, tokenizer, CFG.with_(index_type=kind), embedder=fake_embedder)
        assert rep.rebuilt and rep.new_chunks == 0
        manifest = json.loads((index / "manifest.json").read_text())
        assert manifest["index_type"] == kind and manifest["chunk_count"] == report.index_chunks
        with open_(index, fake_embedder) as r:
            got = [h.id for h in r.retrieve(["steep the leaves for 5 minutes"], k=3)[0]]
            assert got[0] == flat[0]                      # small index: approximate == exact top-1


def test_concurrent_reads_from_threads_agree(built, fake_embedder):
    """Retrieval speculation verifies in a background thread while the main thread reads."""
    from concurrent.futures import ThreadPoolExecutor

    index, _ = built
    queries = [f"heat the water to {80 + i} degrees" for i in range(12)]
    with open_(index, fake_embedder) as r:
        expected = [[h.id for h in hs] for hs in r.retrieve(queries, k=3, retriever="hybrid")]

        def one(i: int) -> list[str]:
            q = queries[i % len(queries)]
            ids = [h.id for h in r.retrieve([q], k=3, retriever="hybrid")[0]]
            r.get_chunks(ids)
            r.score_local(q, ids, retriever="bm25")
            return ids

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, range(48)))
        assert got == [expected[i % len(queries)] for i in range(48)]
