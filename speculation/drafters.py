"""Drafters: cheap guesses of the next tokens, verified afterwards by the target.

One protocol, several implementations; the engine never knows which one it talks to
(the shape of transformers' candidate generators and vLLM's proposers):

* ``NgramDrafter`` with references  -- LLMA reference drafting: copy the continuation of the
  longest suffix match of the text so far, searched in the retrieved documents, the prompt and
  the output.
* ``NgramDrafter`` without references -- prompt lookup (the transformers / vLLM n-gram baseline).
* ``ModelDrafter`` -- a small causal LM with its own KV pool, drafting for all rows at once.

A step asks its drafters in order of preference (``EngineConfig.drafters``): each fills in the
rows the ones before it left without a draft (``propose_batch``), so reference drafting wins
where a document matches and the draft model covers the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from .verify import SamplingParams, draws, sample_at, warp_probs

if TYPE_CHECKING:
    from .engine import SequenceState


@dataclass
class Draft:
    tokens: list[int]
    source: str                          # drafter name, for per-drafter stats
    match_len: int = 0                   # copy drafters: length of the suffix match it continues

    def trimmed(self, k: int) -> "Draft":
        """The first ``k`` drafted tokens."""
        return Draft(self.tokens[:k], self.source, self.match_len)


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

    def propose_batch(self, states: list["SequenceState"], limits: list[int]) -> list[Draft | None]:
        """``propose`` for several sequences at once (a model drafter batches its forwards)."""

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
        return self.lookup_match(suffix_source, max_tokens, min_n)[0]

    def lookup_match(self, suffix_source: Sequence[int], max_tokens: int, min_n: int = 1) -> tuple[list[int], int]:
        """(continuation, length of the suffix match it follows); ([], 0) when none."""
        for n in range(min(self.max_n, len(suffix_source)), min_n - 1, -1):
            hit = self._table.get(tuple(suffix_source[len(suffix_source) - n:]))
            if hit is not None:
                seq_id, start = hit
                cont = self.seqs[seq_id][start:start + max_tokens]
                if cont:
                    return cont, n
        return [], 0


class NgramDrafter:
    """LLMA reference drafting (with references) or prompt lookup (without).

    The index holds the references, the prompt and the generated text; the query is the
    longest suffix (``max_ngram`` down to ``min_ngram`` tokens) of prompt + output.
    """

    def __init__(self, name: str, max_draft: int = 16, max_ngram: int = 8, min_ngram: int = 1,
                 use_references: bool = True, adaptive: bool = True) -> None:
        self.name = name
        self.max_draft = max_draft
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.use_references = use_references
        # adaptive: the draft length heuristic; off when the engine's cost model sizes drafts
        self.adaptive = adaptive

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
        k = min(max_tokens, st["length"].current) if self.adaptive else max_tokens
        if k <= 0:
            return None
        tokens, match = st["index"].lookup_match(state.tokens, k, self.min_ngram)
        return Draft(tokens, self.name, match_len=match) if tokens else None

    def propose_batch(self, states: list["SequenceState"], limits: list[int]) -> list[Draft | None]:
        return [self.propose(s, k) for s, k in zip(states, limits)]

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        state.drafter_state[self.name]["length"].update(len(draft.tokens), n_accepted)


class ModelDrafter:
    """A small causal LM sharing the target's tokenizer. Greedy drafts when the request is
    greedy; otherwise draws each token from its warped distribution q at the uniform the target
    will use at that position (``verify.keyed_uniforms``). Drafts for all rows of a step
    together: one batched forward of the draft model per drafted position, over its own KV pool
    (a sequence uses the slot it has in the target's pool), rolled back to the committed tokens
    by setting a length."""

    def __init__(self, model: Any, name: str = "draft_model", max_draft: int = 6, max_slots: int = 16,
                 adaptive: bool = True) -> None:
        from .forward import PooledModel

        self.model = model
        self.name = name
        self.max_draft = max_draft
        self.adaptive = adaptive
        self.runner = PooledModel(model, max_slots)

    def begin(self, state: "SequenceState") -> None:
        state.drafter_state[self.name] = {
            "cached": [],                       # tokens whose keys/values are in the draft pool
            "length": AdaptiveLength(self.max_draft),
        }

    def evicted(self, state: "SequenceState") -> None:
        """The sequence lost its slot: nothing of it is cached any more."""
        state.drafter_state[self.name]["cached"] = []

    def propose(self, state: "SequenceState", max_tokens: int) -> Draft | None:
        return self.propose_batch([state], [max_tokens])[0]

    @torch.inference_mode()
    def propose_batch(self, states: list["SequenceState"], limits: list[int]) -> list[Draft | None]:
        from .forward import Row

        drafts: list[Draft | None] = [None] * len(states)
        # per drafting row: [index, state, k, feed, start, tokens]
        active: list[list[Any]] = []
        for i, (state, limit) in enumerate(zip(states, limits)):
            st = state.drafter_state[self.name]
            k = min(limit, st["length"].current) if self.adaptive else min(limit, self.max_draft)
            if k <= 0 or state.slot is None:
                continue
            cached: list[int] = st["cached"]
            keep, bound = 0, min(len(cached), len(state.tokens) - 1)   # always feed at least one token
            while keep < bound and cached[keep] == state.tokens[keep]:
                keep += 1
            del cached[keep:]
            active.append([i, state, k, state.tokens[keep:], keep, []])
        while active:
            logits = self.runner.forward([Row(s.slot, start, feed, len(feed) - 1)
                                          for _, s, _, feed, start, _ in active])
            greedy = logits.argmax(-1).tolist()
            still: list[list[Any]] = []
            for j, row in enumerate(active):
                i, state, k, feed, start, tokens = row
                st = state.drafter_state[self.name]
                st["cached"].extend(feed)
                params: SamplingParams = state.sampling
                if params.greedy:
                    tok = greedy[j]
                else:   # the target's draw at this position, from q: drafts agree where the CDFs do
                    tok = int(sample_at(warp_probs(logits[j:j + 1], params), draws(state, 1, len(tokens)))[0])
                tokens.append(tok)
                if len(tokens) < k:
                    row[3], row[4] = [tok], start + len(feed)
                    still.append(row)
                else:
                    # the last drafted token was never fed: the cache covers state.tokens + tokens[:-1]
                    drafts[i] = Draft(tokens, self.name)
            active = still
        return drafts

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        state.drafter_state[self.name]["length"].update(len(draft.tokens), n_accepted)
