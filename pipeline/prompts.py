"""Prompts with numbered sources, rendered through the model's chat template, fitted to its
context. One place decides what the model sees, for one-shot and iterative answers alike."""

from __future__ import annotations

from typing import Any

from .api import Source
from .errors import PromptTooLongError

INSTRUCTION = ("Answer the question using the numbered sources below. Cite the sources you use "
               "as [1], [2], ... If the sources do not contain the answer, say so.")


def _render(tokenizer: Any, content: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        return list(ids)
    return tokenizer.encode(content + "\nAnswer:", add_special_tokens=True)


def _source_block(n: int, s: Source, text: str) -> str:
    head = f"[{n}] {s.title}" + (f" ({s.source})" if s.source and s.source != s.title else "")
    return f"{head}\n{text.strip()}"


def one_shot_prompt(tokenizer: Any, question: str, sources: list[Source], context_tokens: int,
                    max_new_tokens: int) -> tuple[list[int], list[Source]]:
    """Prompt ids and the sources that fit. Sources are kept in rank order; the first one that
    does not fit whole is cut to the tokens left, later ones are dropped. A question that does
    not fit even without sources is a PromptTooLongError naming the limits."""
    budget = context_tokens - max_new_tokens

    def build(blocks: list[str]) -> list[int]:
        body = "\n\n".join(blocks)
        content = f"{INSTRUCTION}\n\nSources:\n{body}\n\nQuestion: {question}" if blocks else f"Question: {question}"
        return _render(tokenizer, content)

    bare = build([])
    if len(bare) > budget:
        raise PromptTooLongError(
            f"the question takes {len(bare)} prompt tokens; with max_tokens={max_new_tokens} that exceeds the "
            f"model's context of {context_tokens} tokens (at most {budget} prompt tokens) -- shorten the question "
            "or lower max_tokens",
            prompt_tokens=len(bare), context_tokens=context_tokens, max_tokens=max_new_tokens)
    blocks: list[str] = []
    used: list[Source] = []
    for s in sources:
        candidate = build(blocks + [_source_block(len(blocks) + 1, s, s.text)])
        if len(candidate) <= budget:
            blocks.append(_source_block(len(blocks) + 1, s, s.text))
            used.append(s)
            continue
        # cut this source to what is left (token-exact, then re-check with the template)
        left = budget - len(build(blocks + [_source_block(len(blocks) + 1, s, "")]))
        ids = tokenizer.encode(s.text, add_special_tokens=False)
        while left > 8:
            text = tokenizer.decode(ids[:left])
            if len(build(blocks + [_source_block(len(blocks) + 1, s, text)])) <= budget:
                blocks.append(_source_block(len(blocks) + 1, s, text))
                used.append(s)
                break
            left -= 8
        break
    return build(blocks), used


def iterative_prompt(tokenizer: Any, question: str, doc: Source | None) -> list[int]:
    """In-Context RALM: the retrieved chunk sits before the question (the answer so far is
    appended after the assistant turn starts, by the caller)."""
    if doc is None or not doc.id:
        return _render(tokenizer, f"Question: {question}")
    return _render(tokenizer, f"{doc.title}\n{doc.text.strip()}\n\nQuestion: {question}")
