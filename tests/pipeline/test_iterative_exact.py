"""Iterative retrieval: every mode's output (baseline, KV reuse, RaLMSpec with and without token
speculation) == an independent In-Context RALM loop on Hugging Face ``generate``
(``ralm_oracle``), token for token, for flat, HNSW and BM25; rollbacks forced by a cache
seeded with wrong chunks."""

from __future__ import annotations

import pytest

from pipeline.api import AskRequest, RetrievalOptions
from pipeline.config import PipelineConfig
from pipeline.iterative import IterativeOptions
from pipeline.rag import GenerationStage, RetrievalStage
from questions import ITERATIVE_QUESTIONS as QUESTIONS
from ralm_oracle import logit_gap_at, ralm_oracle

BASELINE = IterativeOptions(speculative_retrieval=False, kv_reuse=False, token_speculation=False)
# mode -> (options, what the request sets)
MODES = {
    "kv_reuse": (IterativeOptions(speculative_retrieval=False, kv_reuse=True, token_speculation=False), {}),
    "speculative": (IterativeOptions(), {}),
    "speculative_sync_s3": (IterativeOptions(), {"async_verification": False, "speculation_stride": 3}),
}


def _stages(index_dir, models):
    retrieval = RetrievalStage(PipelineConfig(index_dir=str(index_dir)))
    return retrieval, GenerationStage(PipelineConfig(index_dir=str(index_dir)), retrieval=retrieval, models=models)


def _answer(gen, retrieval, question, retriever, options, max_tokens=16, **params):
    req = AskRequest(question, max_tokens=max_tokens,
                     retrieval=RetrievalOptions(k=1, retriever=retriever, iterative=True, stride=4, query_tokens=32,
                                                **params))
    return gen.iterative(req, options, retrieval=retrieval).run()


def _same(oracle, got, what, models, retrieval, question, retriever):
    """Token-for-token equality with the oracle; a difference reports the oracle's logit gap there."""
    if got == oracle:
        return
    at = next(i for i, (a, b) in enumerate(zip(oracle + [-1], got + [-2])) if a != b)
    gap = logit_gap_at(models.target, models.tokenizer, retrieval, question, oracle, at, retriever=retriever)
    pytest.fail(f"{what}: first difference from the In-Context RALM oracle at token {at} "
                f"(oracle's top-2 logit gap there {gap:.3g})")


@pytest.mark.parametrize("index_kind, retriever", [("flat", "dense"), ("hnsw", "dense"), ("flat", "bm25")])
def test_speculative_iterative_equals_baseline(small_indexes, tiny_models, index_kind, retriever):
    retrieval, gen = _stages(small_indexes[index_kind], tiny_models)
    totals = {name: {"speculated": 0, "mismatched": 0} for name in MODES}
    names = list(MODES)
    for n, question in enumerate(QUESTIONS):
        oracle = ralm_oracle(tiny_models.target, tiny_models.tokenizer, retrieval, question, retriever=retriever)
        base = _answer(gen, retrieval, question, retriever, BASELINE)
        assert base.stats["retrievals"]["speculated"] == 0
        _same(oracle, base.token_ids, f"{index_kind}/{retriever}/baseline question {n}", tiny_models, retrieval,
              question, retriever)
        for name in (names[n % len(names)],):          # each mode on a third of the questions
            opts, params = MODES[name]
            res = _answer(gen, retrieval, question, retriever, opts, **params)
            _same(oracle, res.token_ids, f"{index_kind}/{retriever}/{name} question {n}", tiny_models, retrieval,
                  question, retriever)
            for key in totals[name]:
                totals[name][key] += res.stats["retrievals"][key]
            if name == "kv_reuse":
                assert res.stats["prefills"] <= base.stats["prefills"]
    assert totals["speculative"]["speculated"] > 0


def test_rollback_with_a_cache_seeded_with_wrong_chunks(small_indexes, tiny_models):
    """The cache holds only chunks the retriever never returns first: every speculation is wrong,
    every verification rolls back -- and the output still equals the baseline."""
    retrieval, gen = _stages(small_indexes["flat"], tiny_models)
    wrong_pool = retrieval.retrieve(["zzzz unrelated bytes and sockets"], 3, "dense")[0]
    mismatches = 0
    for question in QUESTIONS[:4]:
        base = _answer(gen, retrieval, question, "dense", BASELINE, max_tokens=20)
        truth_ids = {s.id for s in base.sources}
        wrong = [s for s in wrong_pool if s.id not in truth_ids]
        assert wrong
        opts = IterativeOptions(seed_cache=wrong, seed_with_first_retrieval=False)
        res = _answer(gen, retrieval, question, "dense", opts, max_tokens=20, prefetch=1, speculation_stride=2,
                      async_verification=True)
        assert res.token_ids == base.token_ids
        mismatches += res.stats["retrievals"]["mismatched"]
    assert mismatches >= 2, "the forced-mismatch runs never rolled back"


def test_query_embedded_once_and_cached_chunks_drafted_from(small_indexes, tiny_models, monkeypatch):
    """RaLMSpec's verification reuses the embedding computed for the speculation (one model call
    per query), and token speculation gets the cached chunks -- all but the one already in the
    prompt -- as drafting references."""
    retrieval, gen = _stages(small_indexes["flat"], tiny_models)
    embedder = retrieval.retriever.embedder
    encoded: list[int] = []
    encode = embedder.encode

    def counting_encode(texts, *args, **kwargs):
        encoded.append(len(texts))
        return encode(texts, *args, **kwargs)

    monkeypatch.setattr(embedder, "encode", counting_encode)
    prefills: list[tuple[list[int], list[list[int]]]] = []
    engine_request = gen.requests.engine_request

    def spy(request, prompt_ids, references, *args, **kwargs):
        prefills.append((prompt_ids, references))
        return engine_request(request, prompt_ids, references, *args, **kwargs)

    monkeypatch.setattr(gen.requests, "engine_request", spy)
    question = QUESTIONS[0]
    base = _answer(gen, retrieval, question, "dense", BASELINE, max_tokens=24)
    assert sum(encoded) == base.stats["retrievals"]["real"]        # the baseline: one per stride
    assert all(refs == [] for _, refs in prefills)                   # and no token speculation
    encoded.clear()
    prefills.clear()
    res = _answer(gen, retrieval, question, "dense",
                  IterativeOptions(), max_tokens=24, async_verification=False, speculation_stride=2)
    assert res.token_ids == base.token_ids
    r = res.stats["retrievals"]
    assert r["speculated"] >= 2 and r["verified"] >= 1
    assert sum(encoded) == 1 + r["speculated"], (encoded, r)        # first real retrieval + one per speculation
    assert prefills and all(refs for _, refs in prefills)
    chunks = {tuple(h.token_ids) for h in retrieval.retriever.get_chunks(list(retrieval.retriever.ids))}
    for prompt_ids, refs in prefills:
        assert all(tuple(ref) in chunks for ref in refs)                # whole chunks of the index
        # the chunk in the prompt is not repeated as a reference
        assert not any(len(ref) > 8 and _contains(prompt_ids, ref) for ref in refs)


def _contains(seq: list[int], sub: list[int]) -> bool:
    n = len(sub)
    return any(seq[i:i + n] == sub for i in range(len(seq) - n + 1))


class _ScriptedRetrieval:
    """Real chunks, but the top-1 for a query is picked by a fixed function of its text among
    three, so the chunk changes back and forth between strides -- the case where KV reuse
    resumes an earlier chunk's sequence. Local scoring agrees with it."""

    def __init__(self, real, chunks):
        self.real, self.chunks = real, chunks

    def _pick(self, query):
        return self.chunks[sum(map(ord, query)) % len(self.chunks)]

    def retrieve(self, queries, k, retriever="dense", query_vecs=None):
        out = []
        for q in queries:
            top = self._pick(q)
            out.append(([top] + [c for c in self.chunks if c.id != top.id])[:k])
        return out

    def score_local(self, query, chunk_ids, retriever="dense", query_vec=None):
        return [1.0 if cid == self._pick(query).id else 0.0 for cid in chunk_ids]


def test_kv_reuse_resumes_an_earlier_chunks_sequence(small_indexes, tiny_models):
    """A chunk seen before continues its own sequence (fed only the answer tokens it missed):
    one prefill per distinct chunk, and the output equals the baseline's re-prefill-every-stride
    output, with and without speculation."""
    real, gen = _stages(small_indexes["flat"], tiny_models)
    hits = real.retrieve(["json dumps indent", "heapq merge sorted", "textwrap dedent"], 1, "dense")
    scripted = _ScriptedRetrieval(real, [h[0] for h in hits])
    assert len({c.id for c in scripted.chunks}) == 3
    resumed = 0
    for question in QUESTIONS[:6]:
        base = _answer(gen, scripted, question, "dense", BASELINE, max_tokens=40)
        for name in ("kv_reuse", "speculative"):
            opts, params = MODES[name]
            res = _answer(gen, scripted, question, "dense", opts, max_tokens=40, **params)
            assert res.token_ids == base.token_ids, question
            seqs = res.stats["chunk_sequences"]
            if name == "kv_reuse":
                assert res.stats["prefills"] == seqs["new"] <= 3
                assert seqs["new"] + seqs["continued"] + seqs["resumed"] == base.stats["prefills"]
            resumed += seqs["resumed"]
    assert resumed >= 6, "no stride went back to an earlier chunk"
