"""A stand-in for ``pipeline.rag``'s stages with the same methods, for the HTTP layer's fast
tests (status codes, SSE framing, auth, metrics). Deterministic and instant; the tests that
prove the feature use the real pipeline instead (test_deploy_serve.py)."""

from __future__ import annotations

import time

from pipeline.api import AskRequest, AskResult, Source
from pipeline.errors import PromptTooLongError, QuestionError
from retrieval.errors import StoreUnavailableError

CORPUS = [
    ("d1", "lru_cache", "functools.rst", "functools.lru_cache memoizes a function; maxsize=None means unbounded."),
    ("d2", "pathlib", "pathlib.rst", "pathlib.Path offers object-oriented filesystem paths."),
    ("d3", "itertools", "itertools.rst", "itertools.chain iterates over several iterables in turn."),
]


def _check(question: str) -> None:
    if not question.strip():
        raise QuestionError("the question is empty")
    if "STORE_DOWN" in question:
        raise StoreUnavailableError("redis at redis://127.0.0.1:1 refused the connection")
    if "CRASH" in question:
        raise ZeroDivisionError("a bug")


class RetrievalStage:
    def __init__(self, config):
        self.config = config
        self.calls: list[list[str]] = []

    def retrieve(self, questions, k, retriever="dense"):
        self.calls.append(list(questions))
        out = []
        for q in questions:
            _check(q)
            words = set(q.lower().replace("?", " ").replace(".", " ").split())
            scored = []
            for cid, title, src, text in CORPUS:
                overlap = len(words & set(text.lower().replace(".", " ").replace(";", " ").split()))
                scored.append(Source(id=cid, title=title, source=src, score=float(overlap), text=text))
            scored.sort(key=lambda s: (-s.score, s.id))
            out.append(scored[:k])
        return out


class GenerationStage:
    def __init__(self, config, retrieval=None):
        self.config = config
        self.retrieval = retrieval

    def generate(self, request: AskRequest, sources: list[Source], on_text=None) -> AskResult:
        _check(request.question)
        if len(request.question) > 2000:
            raise PromptTooLongError("prompt too long", prompt_tokens=len(request.question),
                                     context_tokens=2048, max_tokens=request.max_tokens)
        words = (" ".join(s.text for s in sources) or "no sources").split()
        pieces = []
        finish = "length"
        for i in range(request.max_tokens):
            w = (" " if i else "") + words[i % len(words)]
            if any(st in "".join(pieces) + w for st in request.stop):
                finish = "stop"
                break
            pieces.append(w)
            if on_text is not None:
                on_text(w)
            if "SLOW" in request.question:
                time.sleep(0.05)
        answer = "".join(pieces)
        return AskResult(
            answer=answer, token_ids=list(range(len(pieces))), sources=sources, finish_reason=finish,
            prompt_tokens=len(request.question.split()) + 10,
            stats={"target_forwards": max(1, len(pieces) // 2), "draft_tokens": len(pieces),
                   "accepted_tokens": len(pieces) // 2, "mean_accepted_per_forward": 2.0,
                   "retrievals": {"speculated": 4, "verified": 4, "mismatched": 1},
                   "seconds": {"generate": 0.001}},
        )

    def answer(self, request: AskRequest, on_text=None, cancelled=None) -> AskResult:
        sources = self.retrieval.retrieve([request.question], request.retrieval.k, request.retrieval.retriever)[0]
        return self.generate(request, sources, on_text=on_text)


class RAGPipeline:
    def __init__(self, config):
        self.retrieval = RetrievalStage(config)
        self.generation = GenerationStage(config, retrieval=self.retrieval)

    def retrieve(self, questions, k, retriever="dense"):
        return self.retrieval.retrieve(questions, k, retriever)

    def generate(self, request, sources, on_text=None):
        return self.generation.generate(request, sources, on_text=on_text)

    def answer(self, request, on_text=None, cancelled=None):
        return self.generation.answer(request, on_text=on_text, cancelled=cancelled)
