"""What the one-shot (``rag.py``) and iterative (``iterative.py``) answers share: turning an
:class:`AskRequest` into engine requests, a source's drafting reference, the question check and
the answer's stats dict. Both modules import this one, never each other."""

from __future__ import annotations

from typing import Any

from .api import AskRequest, Source
from .errors import QuestionError


def check_question(request: AskRequest) -> None:
    if not request.question or not request.question.strip():
        raise QuestionError("the question is empty")
    if request.max_tokens < 1:
        raise QuestionError(f"max_tokens must be at least 1 (got {request.max_tokens})")
    if request.retrieval.iterative and (request.retrieval.stride < 1 or request.retrieval.query_tokens < 1):
        raise QuestionError("stride and query_tokens must be at least 1")


class RequestBuilder:
    """Engine requests for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def engine_request(self, request: AskRequest, prompt_ids: list[int], references: list[list[int]],
                       max_new_tokens: int, *, stop: list[str] | None = None, speculate: bool | None = None,
                       pause_at: int | None = None, draft_past_pause: bool = False,
                       answer_start: int | None = None) -> Any:
        """``speculate`` None: as the request asks. ``answer_start``: where in ``prompt_ids``
        the answer begins (iterative prompts carry the answer so far); the sampler keys its
        random draws by answer position, so a re-prefilled or rolled-back stride draws the same."""
        from speculation.engine import GenerationRequest
        from speculation.verify import SamplingParams

        return GenerationRequest(
            prompt_ids=prompt_ids, references=references, max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=request.temperature, top_p=request.top_p),
            stop=list(request.stop if stop is None else stop), seed=request.seed,
            speculate=request.speculation.enabled if speculate is None else speculate,
            max_draft_tokens=request.speculation.max_draft_tokens, drafters=request.speculation.drafters,
            pause_at=pause_at, draft_past_pause=draft_past_pause, answer_start=answer_start,
        )

    def reference_ids(self, source: Source) -> list[int]:
        """The source's generator token ids (drafting reference), tokenized once."""
        if source.token_ids is None:
            source.token_ids = self.tokenizer.encode(source.text, add_special_tokens=False)
        return source.token_ids


def answer_stats(engine: Any, retrievals: dict[str, int], retrieval_seconds: float, total_seconds: float,
                 **extra: Any) -> dict[str, Any]:
    """The pipeline's stats of one answer: the engine's numbers (a ``GenerationStats``), the
    retrieval counts, and every duration under "seconds"."""
    stats = engine.to_dict(timings=False)
    stats["retrievals"] = dict(retrievals)
    stats.update(extra)
    stats["seconds"] = {"retrieval": round(retrieval_seconds, 4), "prefill": round(engine.prefill_seconds, 4),
                        "decode": round(engine.decode_seconds, 4), "total": round(total_seconds, 4)}
    return stats
