"""One-shot RAG: prompt with numbered sources fitted to the context, chunks as references."""

from __future__ import annotations

import pytest

from pipeline.api import AskRequest, RetrievalOptions, Source
from pipeline.config import PipelineConfig
from pipeline.errors import PromptTooLongError, QuestionError
from pipeline.prompts import one_shot_prompt
from pipeline.rag import GenerationStage, RetrievalStage


def _src(i, text):
    return Source(id=f"c{i}", title=f"title {i}", source=f"doc{i}.txt", score=1.0 - i / 10, text=text)


def test_sources_are_numbered_and_trimmed_to_fit(smol_tokenizer):
    long = "word " * 400
    sources = [_src(1, "alpha beta"), _src(2, long), _src(3, "gamma")]
    ids, used = one_shot_prompt(smol_tokenizer, "What is alpha?", sources, context_tokens=300, max_new_tokens=64)
    text = smol_tokenizer.decode(ids)
    assert len(ids) <= 300 - 64
    assert "[1] title 1" in text and "[2] title 2" in text and "[3]" not in text
    assert [s.id for s in used] == ["c1", "c2"]          # the second one cut, the third dropped
    ids_all, used_all = one_shot_prompt(smol_tokenizer, "What is alpha?", sources[:1] + sources[2:], 2048, 64)
    assert [s.id for s in used_all] == ["c1", "c3"]


def test_question_too_long_names_the_limits(smol_tokenizer):
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 200 tokens") as err:
        one_shot_prompt(smol_tokenizer, "why " * 300, [], context_tokens=200, max_new_tokens=50)
    assert err.value.context_tokens == 200 and err.value.max_tokens == 50


def test_one_shot_answer_uses_retrieved_chunks_as_references(small_indexes, tiny_models):
    retrieval = RetrievalStage(PipelineConfig(index_dir=str(small_indexes["flat"])))
    gen = GenerationStage(PipelineConfig(), retrieval=retrieval, models=tiny_models)
    streamed: list[str] = []
    req = AskRequest("How do I pretty-print JSON?", max_tokens=12, retrieval=RetrievalOptions(k=2))
    res = gen.answer(req, on_text=streamed.append)
    assert len(res.sources) == 2 and all(s.token_ids for s in res.sources)
    assert "".join(streamed) == res.answer
    assert res.stats["retrievals"]["real"] == 1
    assert set(res.stats["seconds"]) == {"retrieval", "prefill", "decode", "total"}
    plain = gen.generate(AskRequest(req.question, max_tokens=12, speculation=req.speculation.__class__(enabled=False)),
                         res.sources)
    assert plain.token_ids == res.token_ids          # speculation changes nothing
    with pytest.raises(QuestionError):
        gen.answer(AskRequest("   "))
