"""Iterative answers stream stride by stride as strides commit, apply stop strings as tokens
commit, stop at the next stride when the caller cancels, and sample the same answer in every
mode for the same seed."""

from __future__ import annotations

import pytest

from pipeline.api import AskRequest, RetrievalOptions
from pipeline.config import PipelineConfig
from pipeline.errors import RequestStopped
from pipeline.iterative import IterativeOptions
from pipeline.rag import GenerationStage, RetrievalStage

QUESTIONS = ["How do I pretty-print JSON with indentation?", "What does textwrap.dedent remove?",
             "How do I merge several sorted inputs?"]
BASELINE = IterativeOptions(speculative_retrieval=False, kv_reuse=False, token_speculation=False)


@pytest.fixture(scope="module")
def stages(small_indexes, tiny_models):
    retrieval = RetrievalStage(PipelineConfig(index_dir=str(small_indexes["flat"])))
    return retrieval, GenerationStage(PipelineConfig(index_dir=str(small_indexes["flat"])), retrieval=retrieval,
                                      models=tiny_models)


def _request(question, max_tokens=24, stop=(), temperature=0.0, seed=None, **params):
    return AskRequest(question, max_tokens=max_tokens, stop=list(stop), temperature=temperature, seed=seed,
                      retrieval=RetrievalOptions(k=1, iterative=True, stride=4, query_tokens=32, **params))


class _Recorder:
    """on_text: each delta with the retrieval counts at the moment it arrived."""

    def __init__(self, answer):
        self.answer, self.deltas, self.at = answer, [], []

    def __call__(self, delta):
        self.deltas.append(delta)
        self.at.append(dict(self.answer.counts))


@pytest.mark.parametrize("mode", ["baseline", "speculative_rollbacks"])
def test_text_streams_as_strides_commit_and_is_never_retracted(stages, mode):
    retrieval, gen = stages
    for question in QUESTIONS:
        if mode == "baseline":
            answer = gen.iterative(_request(question), BASELINE)
        else:   # a cache of wrong chunks: every verification rolls back
            truth = {s.id for s in gen.iterative(_request(question), BASELINE).run().sources}
            wrong = [s for s in retrieval.retrieve(["zzzz unrelated bytes and sockets"], 3, "dense")[0]
                     if s.id not in truth]
            answer = gen.iterative(_request(question, prefetch=1, speculation_stride=2, async_verification=False),
                                   IterativeOptions(seed_cache=wrong, seed_with_first_retrieval=False))
        rec = _Recorder(answer)
        result = answer.run(on_text=rec)
        assert "".join(rec.deltas) == result.answer
        assert len(rec.deltas) >= 2, "the answer came in one piece"
        # text arrived before the answer was done: the first delta came before the last retrieval
        assert rec.at[0]["real"] < result.stats["retrievals"]["real"]
        if mode != "baseline":
            assert result.stats["retrievals"]["mismatched"] >= 1
            # nothing is sent before its stride was verified: the first delta (the first stride, a
            # real retrieval) arrives before any speculation was checked
            assert rec.at[0]["verified"] == 0
        reference = gen.iterative(_request(question), BASELINE).run()
        assert result.token_ids == reference.token_ids


def test_stop_string_stops_generation_where_it_commits(stages):
    retrieval, gen = stages
    for question in QUESTIONS:
        full = gen.iterative(_request(question, max_tokens=40), IterativeOptions()).run()
        text = full.answer
        if len(text) < 12:
            continue
        stop = text[len(text) // 3: len(text) // 3 + 3]
        for options in (BASELINE, IterativeOptions()):
            res = gen.iterative(_request(question, max_tokens=40, stop=[stop]), options).run()
            assert res.answer == text[:text.index(stop)], (question, stop)
            assert res.finish_reason == "stop"
            # generation ended at the stop: fewer tokens generated than the full answer's
            assert res.stats["generated_tokens"] < full.stats["generated_tokens"], (question, stop)
        return
    pytest.fail("no answer long enough to cut")


def test_cancel_stops_the_loop_at_the_next_stride(stages):
    retrieval, gen = stages
    for options, params in ((BASELINE, {}), (IterativeOptions(), {"async_verification": False})):
        answer = gen.iterative(_request(QUESTIONS[0], max_tokens=40, **params), options)
        strides: list[int] = []
        original = answer._run_stride

        def counting(*args, **kwargs):
            strides.append(1)
            return original(*args, **kwargs)

        answer._run_stride = counting
        sent: list[str] = []
        with pytest.raises(RequestStopped):
            answer.run(on_text=sent.append, cancelled=lambda: bool(sent))
        # the first stride's text arrived; the next stride was entered and stopped before it ran
        assert sent and len(strides) == 2, strides
        assert answer.states and all(state.slot is None for state in answer.states.values())  # KV released


def test_sampled_answer_is_the_same_in_every_mode_for_a_seed(stages):
    """One key for all of a request's sequences, draws keyed by answer position: the baseline
    (a fresh prefill every stride), KV reuse and RaLMSpec with token speculation and rollbacks
    sample the same tokens; different seeds give different answers."""
    retrieval, gen = stages
    modes = [BASELINE, IterativeOptions(speculative_retrieval=False, kv_reuse=True, token_speculation=False),
             IterativeOptions()]
    answers = set()
    for seed in range(4):
        request = _request(QUESTIONS[0], max_tokens=32, temperature=1.0, seed=seed, async_verification=False,
                           speculation_stride=2)
        outs = [gen.iterative(request, options).run().token_ids for options in modes]
        assert outs[1] == outs[0] and outs[2] == outs[0], seed
        answers.add(tuple(outs[0]))
    assert len(answers) > 1
