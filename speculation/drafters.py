"""Drafters: cheap guesses of the next tokens, verified afterwards by the target.

One protocol, several implementations; the engine never knows which one it talks to
(the shape of transformers' candidate generators and vLLM's proposers):

* ``NgramDrafter`` with references  -- LLMA reference drafting: copy the continuation of the
  longest suffix match of the text so far, searched in the retrieved documents, the prompt and
  the output.
* ``NgramDrafter`` without references -- prompt lookup (the transformers / vLLM n-gram baseline).
* ``ModelDrafter`` -- a small causal LM with its own KV cache, rolled back on rejection.
* ``ChainDrafter`` -- asks each drafter in turn, the first that proposes anything wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from .verify import SamplingParams, warp_probs

if TYPE_CHECKING:
    from .engine import SequenceState


@dataclass
class Draft:
    tokens: list[int]
    source: str                          # drafter name, for per-drafter stats
    probs: torch.Tensor | None = None    # [len(tokens), V] draft distributions; None: one-hot


@dataclass
class AdaptiveLength:
    """Draft length that grows when drafts are fully accepted and shrinks when they are not
    (the transformers heuristic): long copies are cheap to verify only if they are right."""

    max_len: int
    min_len: int = 1
    current: int = field(default=0)

    def __post_init__(self) -> None:
        self.current = self.current or self.max_len

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.max_len, self.current + 2)
        else:
            self.current = max(self.min_len, min(self.current - 1, accepted + 2))


class Drafter(Protocol):
    name: str

    def begin(self, state: "SequenceState") -> None:
        """Called once per sequence after its prompt is known."""

    def propose(self, state: "SequenceState", max_tokens: int) -> Draft | None:
        """Up to ``max_tokens`` guesses of the tokens after ``state.tokens``; None: no guess."""

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        """Told how many of its tokens were accepted (``state.tokens`` is already updated)."""


class _NgramIndex:
    """Maps every n-gram (n = 1..max_n) of a set of token lists to where its continuation starts.

    Built once per request and extended as tokens are committed, so a lookup is max_n dict
    probes -- never a scan of the references. The first occurrence of an n-gram wins (LLMA's
    rule), documents before the prompt before the output.
    """

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.seqs: list[list[int]] = []
        self._table: dict[tuple[int, ...], tuple[int, int]] = {}
        self._indexed: list[int] = []    # per seq: continuation positions already indexed
        self._owned: list[list[tuple[int, tuple[int, ...]]]] = []   # per seq: (position, key) it owns

    def add(self, tokens: Sequence[int]) -> int:
        self.seqs.append(list(tokens))
        self._indexed.append(1)
        self._owned.append([])
        self._index(len(self.seqs) - 1)
        return len(self.seqs) - 1

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        self.seqs[seq_id].extend(tokens)
        self._index(seq_id)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget tokens past ``length`` (rollback), with the n-grams that contained them."""
        del self.seqs[seq_id][length:]
        owned = self._owned[seq_id]
        while owned and owned[-1][0] > length:
            del self._table[owned.pop()[1]]
        self._indexed[seq_id] = min(self._indexed[seq_id], max(1, length))

    def _index(self, seq_id: int) -> None:
        seq, table, owned = self.seqs[seq_id], self._table, self._owned[seq_id]
        # an n-gram ending at j-1 is useful only once its continuation seq[j] exists
        for j in range(self._indexed[seq_id], len(seq)):
            for n in range(1, min(self.max_n, j) + 1):
                key = tuple(seq[j - n:j])
                if key not in table:
                    table[key] = (seq_id, j)
                    owned.append((j, key))
        self._indexed[seq_id] = max(self._indexed[seq_id], len(seq))

    def lookup(self, suffix_source: Sequence[int], max_tokens: int, min_n: int = 1) -> list[int]:
        """Continuation of the longest suffix of ``suffix_source`` found in the index."""
        for n in range(min(self.max_n, len(suffix_source)), min_n - 1, -1):
            hit = self._table.get(tuple(suffix_source[len(suffix_source) - n:]))
            if hit is not None:
                seq_id, start = hit
                cont = self.seqs[seq_id][start:start + max_tokens]
                if cont:
                    return cont
        return []


class NgramDrafter:
    """LLMA reference drafting (with references) or prompt lookup (without).

    The index holds the references, the prompt and the generated text; the query is the
    longest suffix (``max_ngram`` down to ``min_ngram`` tokens) of prompt + output.
    """

    def __init__(self, name: str, max_draft: int = 16, max_ngram: int = 8, min_ngram: int = 1,
                 use_references: bool = True) -> None:
        self.name = name
        self.max_draft = max_draft
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.use_references = use_references

    def begin(self, state: "SequenceState") -> None:
        index = _NgramIndex(self.max_ngram)
        if self.use_references:
            for ref in state.references:
                if ref:
                    index.add(ref)
        state.drafter_state[self.name] = {
            "index": index,
            "own": index.add(state.tokens),   # prompt + output, extended as tokens commit
            "length": AdaptiveLength(self.max_draft),
        }

    def _sync(self, state: "SequenceState") -> dict[str, Any]:
        st = state.drafter_state[self.name]
        index: _NgramIndex = st["index"]
        own = index.seqs[st["own"]]
        if len(own) > len(state.tokens) or own[-1:] != state.tokens[len(own) - 1:len(own)]:
            keep = 0
            while keep < min(len(own), len(state.tokens)) and own[keep] == state.tokens[keep]:
                keep += 1
            index.truncate(st["own"], keep)
            own = index.seqs[st["own"]]
        if len(own) < len(state.tokens):
            index.extend(st["own"], state.tokens[len(own):])
        return st

    def propose(self, state: "SequenceState", max_tokens: int) -> Draft | None:
        st = self._sync(state)
        k = min(max_tokens, st["length"].current)
        if k <= 0:
            return None
        tokens = st["index"].lookup(state.tokens, k, self.min_ngram)
        return Draft(tokens, self.name) if tokens else None

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        state.drafter_state[self.name]["length"].update(len(draft.tokens), n_accepted)


class ModelDrafter:
    """A small causal LM sharing the target's tokenizer. Greedy drafts when the request is
    greedy; otherwise samples from its warped distribution and returns those probabilities
    (q in the rejection rule). Keeps its own KV cache, cropped back to the committed tokens."""

    def __init__(self, model: Any, name: str = "draft_model", max_draft: int = 6) -> None:
        self.model = model
        self.name = name
        self.max_draft = max_draft

    def begin(self, state: "SequenceState") -> None:
        from .kv import new_cache

        state.drafter_state[self.name] = {
            "cache": new_cache(self.model),
            "cached": [],                       # tokens whose keys/values are in the cache
            "length": AdaptiveLength(self.max_draft),
            "last_logits": None,
        }

    @torch.inference_mode()
    def propose(self, state: "SequenceState", max_tokens: int) -> Draft | None:
        from .kv import rollback

        st = state.drafter_state[self.name]
        k = min(max_tokens, st["length"].current)
        if k <= 0:
            return None
        cached: list[int] = st["cached"]
        keep = 0
        limit = min(len(cached), len(state.tokens) - 1)   # always feed at least one token
        while keep < limit and cached[keep] == state.tokens[keep]:
            keep += 1
        rollback(st["cache"], keep)
        del cached[keep:]
        device = next(self.model.parameters()).device
        feed = state.tokens[keep:]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        params: SamplingParams = state.sampling
        for _ in range(k):
            out = self.model(input_ids=torch.tensor([feed], device=device), past_key_values=st["cache"],
                             use_cache=True, logits_to_keep=1)
            cached.extend(feed)
            logits = out.logits[0, -1].float()
            if params.greedy:
                tok = int(logits.argmax())
            else:
                p = warp_probs(logits, params)
                tok = int(torch.multinomial(p, 1, generator=state.generator).item())
                probs.append(p)
            tokens.append(tok)
            feed = [tok]
        # the last drafted token was never fed: the cache covers state.tokens + tokens[:-1]
        return Draft(tokens, self.name, torch.stack(probs) if probs else None)

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        state.drafter_state[self.name]["length"].update(len(draft.tokens), n_accepted)


class ChainDrafter:
    """Asks its drafters in order; the first non-empty draft is used (reference drafting first,
    the draft model only when no reference matches)."""

    def __init__(self, drafters: list[Drafter]) -> None:
        self.drafters = drafters
        self.name = "+".join(d.name for d in drafters)

    def begin(self, state: "SequenceState") -> None:
        for d in self.drafters:
            d.begin(state)

    def propose(self, state: "SequenceState", max_tokens: int) -> Draft | None:
        for d in self.drafters:
            draft = d.propose(state, max_tokens)
            if draft is not None and draft.tokens:
                return draft
        return None

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        for d in self.drafters:
            if d.name == draft.source:
                d.accepted(state, draft, n_accepted)
