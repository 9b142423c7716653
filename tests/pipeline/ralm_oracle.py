"""An independent In-Context RALM: the plain loop the iterative pipeline must reproduce, written
without any of its machinery (no engine, no KV reuse, no speculation, no stop-string streamer).

Every ``stride`` tokens: the query is the last ``query_tokens`` tokens of question + answer so
far, decoded; retrieve the top-1 chunk with the real retriever; prefill [chunk; question; answer
so far] and greedy-decode ``stride`` tokens with Hugging Face ``generate``; repeat until EOS or
``max_tokens``."""

from __future__ import annotations

import torch

from pipeline.prompts import iterative_prompt


def ralm_oracle(model, tokenizer, retrieval, question: str, *, retriever: str = "dense", stride: int = 4,
                query_tokens: int = 32, max_tokens: int = 16) -> list[int]:
    eos = {t for t in ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int)
                       else list(model.generation_config.eos_token_id or [])) if t is not None}
    question_ids = tokenizer.encode(question, add_special_tokens=False)
    answer: list[int] = []
    while len(answer) < max_tokens:
        query = tokenizer.decode((question_ids + answer)[-query_tokens:], skip_special_tokens=True)
        hits = retrieval.retrieve([query], 1, retriever)[0]
        prompt = iterative_prompt(tokenizer, question, hits[0] if hits else None) + answer
        n = min(stride, max_tokens - len(answer))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        new = out[0, len(prompt):].tolist()
        for t in new:
            answer.append(t)
            if t in eos:
                return answer
    return answer


def logit_gap_at(model, tokenizer, retrieval, question: str, answer: list[int], at: int, *, retriever: str = "dense",
                 query_tokens: int = 32, stride: int = 4) -> float:
    """The gap between the top two logits where two answers first differ (index ``at``): a
    floating-point near-tie is reported with it, never accepted silently."""
    start = at - at % stride
    query = tokenizer.decode((tokenizer.encode(question, add_special_tokens=False) + answer[:start])[-query_tokens:],
                             skip_special_tokens=True)
    hits = retrieval.retrieve([query], 1, retriever)[0]
    prompt = iterative_prompt(tokenizer, question, hits[0] if hits else None) + answer[:at]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])
