"""`specrag ask` end to end with the real SmolLM2 + MiniLM on a python-docs index: the
speculative iterative answer equals the baseline on 3 questions, for flat, hnsw and bm25."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SPECRAG = str(Path(sys.executable).with_name("specrag"))
QUESTIONS = ["How do I pretty-print JSON with indentation?", "What does textwrap.dedent do?",
             "How do I merge sorted iterables with heapq?"]


def _ask(*args):
    out = subprocess.run([SPECRAG, "ask", *args, "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("index_kind, retriever", [("flat", "dense"), ("hnsw", "dense"), ("flat", "bm25")])
def test_speculative_iterative_equals_baseline_with_real_models(small_indexes, index_kind, retriever):
    from pipeline.api import AskRequest, RetrievalOptions
    from pipeline.config import PipelineConfig
    from pipeline.iterative import IterativeOptions
    from pipeline.rag import RAGPipeline

    pipe = RAGPipeline(PipelineConfig(index_dir=str(small_indexes[index_kind])))
    for q in QUESTIONS:
        req = AskRequest(q, max_tokens=24, retrieval=RetrievalOptions(k=1, retriever=retriever, iterative=True))
        base = pipe.generation.iterative(req, IterativeOptions(speculative_retrieval=False, kv_reuse=False,
                                                                token_speculation=False)).run()
        spec = pipe.generation.iterative(req, IterativeOptions()).run()
        assert spec.token_ids == base.token_ids, (q, base.answer, spec.answer)
        assert spec.stats["retrievals"]["speculated"] > 0
        assert spec.stats["prefills"] <= base.stats["prefills"]
    pipe.close()


def test_cli_ask_json_contract(small_indexes):
    data = _ask(QUESTIONS[0], "--index", str(small_indexes["flat"]), "--max-tokens", "16", "-k", "2")
    assert set(data) >= {"answer", "token_ids", "sources", "stats"}
    assert set(data["stats"]["retrievals"]) == {"real", "speculated", "verified", "mismatched", "batches"}
    assert set(data["stats"]["seconds"]) == {"retrieval", "prefill", "decode", "total"}
    assert {"prefills", "target_forwards", "mean_accepted_per_forward"} <= set(data["stats"])
    assert set(data["sources"][0]) == {"id", "title", "source", "score", "text"}
    it = _ask(QUESTIONS[0], "--index", str(small_indexes["flat"]), "--max-tokens", "12", "--iterative")
    base = _ask(QUESTIONS[0], "--index", str(small_indexes["flat"]), "--max-tokens", "12", "--iterative",
                "--no-speculation")
    assert it["token_ids"] == base["token_ids"]
    assert base["stats"]["retrievals"]["speculated"] == 0


def test_cli_ask_errors_are_one_line(tmp_path):
    out = subprocess.run([SPECRAG, "ask", "hello", "--index", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = subprocess.run([SPECRAG, "ask", " "], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "empty question" in out.stderr


def test_tree_drafting_on_retrieved_chunks_equals_hf_generate(small_indexes):
    """SmolLM2 with draft trees over k = 4 real retrieved chunks (their continuations disagree):
    the answer equals the non-speculative one and Hugging Face generate on the same prompt."""
    from exactness import assert_same_tokens, hf_greedy
    from pipeline.api import AskRequest, RetrievalOptions, SpeculationOptions
    from pipeline.config import PipelineConfig
    from pipeline.prompts import one_shot_prompt
    from pipeline.rag import RAGPipeline

    pipe = RAGPipeline(PipelineConfig(index_dir=str(small_indexes["flat"]), draft_policy="fixed"))
    try:
        trees = 0
        for q in QUESTIONS[:2]:
            sources = pipe.retrieve([q], k=4)[0]
            assert len(sources) == 4
            tree = pipe.generate(AskRequest(q, max_tokens=40, speculation=SpeculationOptions(drafters=("tree",)),
                                            retrieval=RetrievalOptions(k=4)), sources)
            plain = pipe.generate(AskRequest(q, max_tokens=40, speculation=SpeculationOptions(enabled=False),
                                             retrieval=RetrievalOptions(k=4)), sources)
            prompt, _ = one_shot_prompt(pipe.generation.tokenizer, q, sources, pipe.generation.context_tokens, 40)
            target = pipe.generation.models.target
            assert_same_tokens(target, prompt, plain.token_ids, tree.token_ids, f"{q}: tree vs plain")
            assert_same_tokens(target, prompt, hf_greedy(target, prompt, 40), tree.token_ids, f"{q}: tree vs HF")
            trees += tree.stats["by_drafter"].get("tree", {}).get("accepted", 0)
        assert trees > 0, "no tree token was accepted: the comparison proved nothing"
    finally:
        pipe.close()
