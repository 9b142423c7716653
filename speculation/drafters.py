"""Drafters: cheap guesses of the next tokens, verified afterwards by the target.

One protocol, several implementations; the engine never knows which one it talks to
(the shape of transformers' candidate generators and vLLM's proposers):

* ``NgramDrafter`` with references  -- LLMA reference drafting: copy the continuation of the
  longest suffix match of the text so far, searched in the retrieved documents, the prompt and
  the output.
* ``NgramDrafter`` without references -- prompt lookup (the transformers / vLLM n-gram baseline).
* ``TreeDrafter`` -- reference drafting with every continuation: all the places the longest
  suffix match occurs, merged into a token tree verified in one forward (tree attention).
* ``ModelDrafter`` -- a small causal LM with its own KV pool, drafting for all rows at once.

A step asks its drafters in order of preference (``EngineConfig.drafters``): each fills in the
rows the ones before it left without a draft (``propose_batch``), so reference drafting wins
where a document matches and the draft model covers the rest; a draft model after a copy
drafter also continues the copy draft's best branch where the document runs out
(``Draft.extended``, filled by ``propose_batch(after=...)``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from .forward import tree_depths
from .verify import SamplingParams, draws, sample_at, warp_probs

if TYPE_CHECKING:
    from .engine import SequenceState

# Where a committed token came from (provenance): (kind, reference index, token offset).
# kind: "reference" (copied from the request's references[ref] at token offset), "prompt"
# (copied from the prompt at offset), "output" (copied from the sequence's own output at
# offset), "history" (copied from an earlier request's output), "draft_model", "target" (the
# target's own token: a correction, a bonus token, no draft), "given" (appended by the caller
# with ``extend``); ref and offset -1 where they do not apply.
Origin = tuple[str, int, int]
TARGET: Origin = ("target", -1, -1)
DRAFT_MODEL: Origin = ("draft_model", -1, -1)
GIVEN: Origin = ("given", -1, -1)
# copied from an earlier request's output (``History``): which one is not kept
HISTORY: Origin = ("history", -1, -1)
# a draft token the draft model has yet to fill in (``Draft.extended``): never verified as such
EXTENSION = -1


@dataclass
class Draft:
    """Drafted tokens: a chain, or a tree of candidate continuations (``parents``).

    A tree's nodes are listed parents first (node ``i``'s parent is ``parents[i]`` < ``i``, -1
    for a child of the pending token), in the order they are worth verifying, so the first ``k``
    nodes are always a tree (``trimmed``). ``weights`` is each node's share of the places the
    drafter found it continuing the text (1.0 where every match agrees)."""

    tokens: list[int]
    source: str                          # drafter name, for per-drafter stats
    match_len: int = 0                   # copy drafters: length of the suffix match it continues
    parents: list[int] | None = None     # None: a chain
    weights: list[float] | None = None
    # copy drafters: where each token was copied from, an ``Origin`` (kind, reference, offset);
    # None: the drafter made the tokens up (a draft model)
    origins: list[Origin] | None = None

    @property
    def is_tree(self) -> bool:
        return self.parents is not None

    def trimmed(self, k: int) -> "Draft":
        """The first ``k`` drafted tokens (nodes, for a tree)."""
        return Draft(self.tokens[:k], self.source, self.match_len,
                     None if self.parents is None else self.parents[:k],
                     None if self.weights is None else self.weights[:k],
                     None if self.origins is None else self.origins[:k])

    def origin(self, i: int) -> Origin:
        """Where drafted token ``i`` came from (the draft model's tokens: ``DRAFT_MODEL``)."""
        return DRAFT_MODEL if self.origins is None else self.origins[i]

    def depths(self) -> list[int]:
        """Each token's depth, 1 for the first drafted token (a chain's i-th token: i + 1)."""
        if self.parents is None:
            return list(range(1, len(self.tokens) + 1))
        return tree_depths(self.parents)

    def depth(self) -> int:
        return max(self.depths(), default=0)

    def best_nodes(self) -> list[int]:
        """The heaviest root-to-leaf path's nodes: from the root, the child of the largest weight
        (the first listed), as far as the draft goes (a chain: all of it)."""
        if self.parents is None:
            return list(range(len(self.tokens)))
        path: list[int] = []
        node = -1
        while True:
            child = next((i for i, p in enumerate(self.parents) if p == node), None)
            if child is None:
                return path
            path.append(child)
            node = child

    def best_path(self) -> "Draft":
        """The tree's heaviest root-to-leaf path, as a chain."""
        return self if self.parents is None else self.kept(self.best_nodes(), chain=True)

    def kept(self, nodes: list[int], chain: bool = False) -> "Draft":
        """The draft of ``nodes`` only (they must hold every kept node's parent), in that order;
        ``chain``: as a chain (the nodes are one path)."""
        tokens = [self.tokens[i] for i in nodes]
        origins = None if self.origins is None else [self.origins[i] for i in nodes]
        if self.parents is None or chain:
            return Draft(tokens, self.source, self.match_len, origins=origins)
        _, parents, weights = _reorder(nodes, self.tokens, self.parents, self.weights or [1.0] * len(self.tokens))
        return Draft(tokens, self.source, self.match_len, parents, weights, origins)

    def extended(self, n: int) -> "Draft":
        """The draft with ``n`` EXTENSION placeholders chained below its best path's leaf, for
        the draft model to fill in (``ModelDrafter.propose_batch(after=...)``); a tree's
        placeholders carry the leaf's weight."""
        holes = [EXTENSION] * n
        origins = None if self.origins is None else self.origins + [DRAFT_MODEL] * n
        if self.parents is None:
            return Draft(self.tokens + holes, self.source, self.match_len, origins=origins)
        leaf = self.best_nodes()[-1]
        first = len(self.tokens)
        parents = self.parents + [leaf] + list(range(first, first + n - 1))
        weights = (self.weights or [1.0] * first) + [self.weights[leaf] if self.weights else 1.0] * n
        return Draft(self.tokens + holes, self.source, self.match_len, parents[:first + n], weights, origins)

    def parent(self, node: int) -> int:
        """The node ``node`` hangs below (-1: the pending token)."""
        return node - 1 if self.parents is None else self.parents[node]

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root down to ``node`` (-1: none)."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parent(node)
        return path[::-1]

    def ranked(self, gains: list[float]) -> "Draft":
        """The tree's nodes reordered by ``gains`` (largest first; a node's gain never exceeds
        its parent's, and ties keep the current order, so parents stay first)."""
        assert self.parents is not None and self.weights is not None
        order = _by_score(gains, len(self.tokens))
        tokens, parents, weights = _reorder(order, self.tokens, self.parents, self.weights)
        origins = None if self.origins is None else [self.origins[i] for i in order]
        return Draft(tokens, self.source, self.match_len, parents, weights, origins)


def _by_score(scores: list[float], limit: int) -> list[int]:
    """The first ``limit`` nodes of a parents-first tree by score, largest first, ties in the
    current order. A node's score must never exceed its parent's: then parents stay first and
    any prefix is a tree."""
    return sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:limit]    # stable: ties keep their order


def _reorder(order: list[int], tokens: list[int], parents: list[int],
             weights: list[float]) -> tuple[list[int], list[int], list[float]]:
    """The nodes ``order`` picks, in that order, parents re-indexed."""
    new_index = {old: new for new, old in enumerate(order)}
    return ([tokens[i] for i in order], [-1 if parents[i] < 0 else new_index[parents[i]] for i in order],
            [weights[i] for i in order])


def build_tree(seqs: list[list[int]], occurrences: list[tuple[int, int, int]], max_depth: int,
               max_nodes: int, shorter_share: float = 0.2
               ) -> tuple[list[int], list[int], list[float], list[tuple[int, int]]]:
    """Merge the continuations of ``occurrences`` ((match length, seq, start), from
    ``_NgramIndex.occurrences``) into one token trie of depth <= ``max_depth``: (tokens, parents,
    weights, places), at most ``max_nodes`` nodes ordered by weight, parents first; a node's
    place is the (seq, position) of the first occurrence that made it. A node's weight is
    the share of the occurrences that continue through it: the occurrences of the longest match
    share ``1 - shorter_share`` equally (all of it when there are no others), those of shorter
    matches -- candidates the longest match does not have -- share ``shorter_share``."""
    if not occurrences or max_depth <= 0 or max_nodes <= 0:
        return [], [], [], []
    usable = [(n, s, j) for n, s, j in occurrences if j < len(seqs[s])]
    if not usable:
        return [], [], [], []
    longest = max(n for n, _, _ in usable)
    n_long = sum(1 for n, _, _ in usable if n == longest)
    n_short = len(usable) - n_long
    long_w = (1.0 - shorter_share) / n_long if n_short else 1.0 / n_long
    short_w = shorter_share / n_short if n_short else 0.0
    children: dict[tuple[int, int], int] = {}       # (parent node, token) -> node
    tokens: list[int] = []
    parents: list[int] = []
    weight: list[float] = []
    places: list[tuple[int, int]] = []
    for n, seq_id, start in usable:
        w = long_w if n == longest else short_w
        node = -1
        cont = seqs[seq_id][start:start + max_depth]
        for d, tok in enumerate(cont):
            nxt = children.get((node, tok))
            if nxt is None:
                nxt = len(tokens)
                children[(node, tok)] = nxt
                tokens.append(tok)
                parents.append(node)
                weight.append(0.0)
                places.append((seq_id, start + d))
            weight[nxt] += w
            node = nxt
    # creation order is parents first; a child's weight never exceeds its parent's
    weight = [min(1.0, w) for w in weight]
    order = _by_score(weight, max_nodes)
    return (*_reorder(order, tokens, parents, weight), [places[i] for i in order])


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
    """Every place where each n-gram (n = 1..max_n) of a set of token lists is continued, in
    order: documents before the prompt before the output, earlier before later.

    Built once per request and extended as tokens are committed (rolled back with them). Only
    unigrams and bigrams are keys -- two entries per position, a quarter of what keying every
    n-gram up to 8 cost (the build is on the engine loop's thread, once per request) -- and a
    lookup extends the suffix's bigram places backwards to their match length: a few
    comparisons per place, never a scan of the references. The single-path drafters copy the
    first occurrence of the longest match (LLMA's rule); the tree drafter reads them all.
    """

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.seqs: list[list[int]] = []
        self._table: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self._indexed: list[int] = []    # per seq: continuation positions already indexed
        self._owned: list[list[tuple[int, tuple[int, ...]]]] = []   # per seq: (position, key) of its occurrences

    def add(self, tokens: Sequence[int]) -> int:
        self.seqs.append(list(tokens))
        self._indexed.append(1)
        self._owned.append([])
        self._index(len(self.seqs) - 1)
        return len(self.seqs) - 1

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        self.seqs[seq_id].extend(tokens)
        self._index(seq_id)

    def reset(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Replace sequence ``seq_id``'s tokens (its occurrences forgotten, the new ones indexed)."""
        self.truncate(seq_id, 0)
        self.seqs[seq_id] = list(tokens)
        self._index(seq_id)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget tokens past ``length`` (rollback), with the occurrences that contained them."""
        del self.seqs[seq_id][length:]
        owned = self._owned[seq_id]
        while owned and owned[-1][0] >= length:     # continuations that start at or past the cut
            j, key = owned.pop()
            hits = self._table[key]
            if hits[-1] == (seq_id, j):      # the usual case: the latest occurrence is the one going
                hits.pop()
            else:
                hits.remove((seq_id, j))
            if not hits:
                del self._table[key]
        self._indexed[seq_id] = min(self._indexed[seq_id], max(1, length))

    def _index(self, seq_id: int) -> None:
        seq, table, owned = self.seqs[seq_id], self._table, self._owned[seq_id]
        bigrams = self.max_n > 1
        # an n-gram ending at j-1 is useful only once its continuation seq[j] exists
        for j in range(self._indexed[seq_id], len(seq)):
            at = (seq_id, j)
            for key in ((seq[j - 1],), (seq[j - 2], seq[j - 1])) if bigrams and j > 1 else ((seq[j - 1],),):
                hits = table.get(key)
                if hits is None:
                    table[key] = [at]
                else:
                    hits.append(at)
                owned.append((j, key))
        self._indexed[seq_id] = max(self._indexed[seq_id], len(seq))

    def _matches(self, suffix_source: Sequence[int], scan: int | None = None) -> list[tuple[int, int, int]]:
        """(match length, seq, position) of every place continuing the suffix's last token or two,
        in the index's order: a bigram's places extended backwards up to ``max_n`` tokens, or, where
        the last two tokens occur nowhere, the last token's places. ``scan``: only the last that
        many places of the key (a large index's common bigrams)."""
        m = len(suffix_source)
        if m == 0:
            return []
        if m > 1 and self.max_n > 1:
            hits = self._table.get((suffix_source[-2], suffix_source[-1]))
            if hits:
                if scan is not None:
                    hits = hits[-scan:]
                out = []
                for seq_id, j in hits:
                    seq = self.seqs[seq_id]
                    cap = min(self.max_n, j, m)
                    n = 2
                    while n < cap and seq[j - 1 - n] == suffix_source[m - 1 - n]:
                        n += 1
                    out.append((n, seq_id, j))
                return out
        return [(1, seq_id, j) for seq_id, j in self._table.get((suffix_source[-1],), ())[-(scan or 0):]]

    def lookup(self, suffix_source: Sequence[int], max_tokens: int, min_n: int = 1) -> list[int]:
        """Continuation of the longest suffix of ``suffix_source`` found in the index."""
        return self.lookup_match(suffix_source, max_tokens, min_n)[0]

    def lookup_match(self, suffix_source: Sequence[int], max_tokens: int, min_n: int = 1) -> tuple[list[int], int]:
        """(continuation of the first occurrence, length of the suffix match it follows); ([], 0)
        when none."""
        cont, n, _ = self.lookup_place(suffix_source, max_tokens, min_n)
        return cont, n

    def lookup_place(self, suffix_source: Sequence[int], max_tokens: int,
                     min_n: int = 1) -> tuple[list[int], int, tuple[int, int]]:
        """``lookup_match`` and where the continuation starts, (seq, position)."""
        best = None
        for hit in self._matches(suffix_source):
            if best is None or hit[0] > best[0]:
                best = hit                           # the first place of the longest match
        if best is None or best[0] < min_n or max_tokens <= 0:
            return [], 0, (-1, -1)
        n, seq_id, start = best
        return self.seqs[seq_id][start:start + max_tokens], n, (seq_id, start)

    def occurrences(self, suffix_source: Sequence[int], min_n: int = 1, shorter: int = 1,
                    limit: int = 64, scan: int | None = None) -> list[tuple[int, int, int]]:
        """(match length, seq, start) of every occurrence of the longest suffix of
        ``suffix_source`` found, then of the suffixes up to ``shorter`` tokens shorter (the places
        they add), at most ``limit`` in all, in the index's order within a length. ``scan``: as
        in ``_matches``."""
        matches = self._matches(suffix_source, scan)
        longest = max((n for n, _, _ in matches), default=0)
        if longest < max(min_n, 1):
            return []
        floor = max(min_n, longest - shorter)
        out = sorted((hit for hit in matches if hit[0] >= floor), key=lambda hit: -hit[0])   # stable
        if floor <= 1 < longest:               # the last token's places its bigram lacks
            seen = {(s, j) for _, s, j in matches}
            last = self._table.get((suffix_source[-1],), ())[-(scan or 0):]
            out += [(1, s, j) for s, j in last if (s, j) not in seen]
        return out[:limit]


class History:
    """The outputs of the engine's finished requests, indexed for drafting: what the model
    wrote for earlier questions, the phrasing it repeats ("Here's an example:", a code block's
    opening, an enumeration), offered to the tree drafter beside the request's own documents
    (SuffixDecoding's global suffix tree over previous outputs; here the same bigram index as a
    request's). At most ``max_tokens`` tokens, the oldest outputs dropped first; an output
    longer than that is not kept. Drafting only: verification decides every token, so what is
    kept here never changes an output, only how many tokens a forward commits. Used on the
    engine loop's thread only."""

    SCAN = 256        # places of a key a lookup reads at most: the latest (a common bigram's)

    def __init__(self, max_tokens: int, max_n: int) -> None:
        self.max_tokens = max(0, int(max_tokens))
        self.index = _NgramIndex(max_n)
        self._order: deque[int] = deque()     # seq ids, oldest first
        self._free: list[int] = []            # seq ids of dropped outputs, reused
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, tokens: Sequence[int]) -> None:
        """Keep ``tokens`` (a finished output), dropping the oldest outputs to make room."""
        n = len(tokens)
        if n < 2 or n > self.max_tokens:
            return
        while self.tokens + n > self.max_tokens:
            self._drop()
        if self._free:
            seq_id = self._free.pop()
            self.index.reset(seq_id, tokens)
        else:
            seq_id = self.index.add(tokens)
        self._order.append(seq_id)
        self.tokens += n

    def clear(self) -> None:
        while self._order:
            self._drop()

    def _drop(self) -> None:
        seq_id = self._order.popleft()
        self.tokens -= len(self.index.seqs[seq_id])
        self.index.truncate(seq_id, 0)
        self._free.append(seq_id)

    def occurrences(self, suffix_source: Sequence[int], min_n: int, shorter: int,
                    limit: int) -> list[tuple[int, int, int]]:
        return self.index.occurrences(suffix_source, min_n, shorter, limit, self.SCAN) if self._order else []


class NgramDrafter:
    """LLMA reference drafting (with references) or prompt lookup (without).

    The index holds the references, the prompt and the generated text; the query is the
    longest suffix (``max_ngram`` down to ``min_ngram`` tokens) of prompt + output.
    """

    def __init__(self, name: str, max_draft: int = 16, max_ngram: int = 8, min_ngram: int = 1,
                 use_references: bool = True, adaptive: bool = True, provenance: bool = True) -> None:
        self.name = name
        self.provenance = provenance          # give drafts their tokens' origins
        self.max_draft = max_draft
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.use_references = use_references
        # adaptive: the draft length heuristic; off when the engine's cost model sizes drafts
        self.adaptive = adaptive

    def begin(self, state: "SequenceState") -> None:
        index = _NgramIndex(self.max_ngram)
        ref_of: dict[int, int] = {}           # index seq -> reference number (provenance)
        if self.use_references:
            for r, ref in enumerate(state.references):
                if ref:
                    ref_of[index.add(ref)] = r
        state.drafter_state[self.name] = {
            "index": index,
            "own": index.add(state.tokens),   # prompt + output, extended as tokens commit
            "ref_of": ref_of,
            "n_prompt": len(state.tokens),
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
        tokens, match, (seq_id, start) = st["index"].lookup_place(state.tokens, k, self.min_ngram)
        if not tokens:
            return None
        origins = [self._origin(st, seq_id, start + i) for i in range(len(tokens))] if self.provenance else None
        return Draft(tokens, self.name, match_len=match, origins=origins)

    @staticmethod
    def _origin(st: dict[str, Any], seq_id: int, pos: int) -> Origin:
        """The provenance of the token at ``pos`` of indexed sequence ``seq_id``."""
        ref = st["ref_of"].get(seq_id)
        if ref is not None:
            return ("reference", ref, pos)
        if pos < st["n_prompt"]:
            return ("prompt", -1, pos)
        return ("output", -1, pos - st["n_prompt"])

    def propose_batch(self, states: list["SequenceState"], limits: list[int]) -> list[Draft | None]:
        return [self.propose(s, k) for s, k in zip(states, limits)]

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        state.drafter_state[self.name]["length"].update(len(draft.tokens), n_accepted)


class TreeDrafter(NgramDrafter):
    """Draft trees from every retrieved document: all continuations of the longest suffix match
    (and of matches ``shorter`` tokens shorter, weighted down), found in the references, the
    prompt and the output, merged into one token tree (``build_tree``) and verified in one
    forward with tree attention. Where the documents agree the tree is the single-path draft;
    where they disagree, every continuation is a branch instead of the first one found.

    ``max_tokens`` (the engine's per-row budget) bounds the nodes, the depth is bounded by the
    sequence's room to draft and ``max_draft`` (and, with ``adaptive``, by the accepted depth)."""

    def __init__(self, name: str = "tree", max_draft: int = 16, max_nodes: int = 32, max_ngram: int = 8,
                 min_ngram: int = 1, adaptive: bool = True, shorter: int = 1, max_occurrences: int = 64,
                 provenance: bool = True, history: History | None = None) -> None:
        super().__init__(name, max_draft, max_ngram, min_ngram, use_references=True, adaptive=adaptive,
                         provenance=provenance)
        self.max_nodes = max_nodes
        self.shorter = shorter
        self.max_occurrences = max_occurrences
        self.history = history

    def propose(self, state: "SequenceState", max_tokens: int) -> Draft | None:
        st = self._sync(state)
        depth = min(state.draft_room, self.max_draft, max_tokens)
        nodes = min(max_tokens, self.max_nodes)
        if self.adaptive:      # no cost model: the accepted depth bounds the depth, twice it the nodes
            depth = min(depth, st["length"].current)
            nodes = min(nodes, 2 * depth)
        if depth <= 0 or nodes <= 0:
            return None
        index: _NgramIndex = st["index"]
        occ = index.occurrences(state.tokens, self.min_ngram, self.shorter, self.max_occurrences)
        seqs = index.seqs
        if self.history is not None and len(self.history):
            # earlier requests' outputs: their places after the request's own within a match
            # length (the longest match still sets the weights), numbered after its sequences
            past = self.history.occurrences(state.tokens, self.min_ngram, self.shorter, self.max_occurrences)
            if past:
                own = len(seqs)
                seqs = seqs + self.history.index.seqs
                occ = sorted(occ + [(n, own + s, j) for n, s, j in past], key=lambda hit: -hit[0])   # stable
        tokens, parents, weights, places = build_tree(seqs, occ, depth, nodes)
        if not tokens:
            return None
        origins = ([self._origin(st, seq_id, pos) if seq_id < len(index.seqs) else HISTORY for seq_id, pos in places]
                   if self.provenance else None)
        return Draft(tokens, self.name, match_len=occ[0][0], parents=parents, weights=weights, origins=origins)

    def accepted(self, state: "SequenceState", draft: Draft, n_accepted: int) -> None:
        state.drafter_state[self.name]["length"].update(draft.depth(), n_accepted)


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
    def propose_batch(self, states: list["SequenceState"], limits: list[int],
                      after: list[list[int]] | None = None) -> list[Draft | None]:
        """Drafts for ``states``, at most ``limits`` tokens each; ``after``: per state, tokens
        another drafter guessed (a copy draft's best branch) that the draft continues from."""
        from .forward import Row

        drafts: list[Draft | None] = [None] * len(states)
        # per drafting row: [index, state, k, feed, start, tokens, ahead]
        active: list[list[Any]] = []
        for i, (state, limit) in enumerate(zip(states, limits)):
            st = state.drafter_state[self.name]
            k = min(limit, st["length"].current) if self.adaptive else min(limit, self.max_draft)
            if k <= 0 or state.slot is None:
                continue
            ahead = after[i] if after is not None else []
            seq = state.tokens + ahead if ahead else state.tokens
            cached: list[int] = st["cached"]
            keep, bound = 0, min(len(cached), len(seq) - 1)   # always feed at least one token
            while keep < bound and cached[keep] == seq[keep]:
                keep += 1
            del cached[keep:]
            active.append([i, state, k, seq[keep:], keep, [], len(ahead)])
        while active:
            logits = self.runner.forward([Row(s.slot, start, feed, len(feed) - 1)
                                          for _, s, _, feed, start, _, _ in active])
            greedy = logits.argmax(-1).tolist()
            still: list[list[Any]] = []
            for j, row in enumerate(active):
                i, state, k, feed, start, tokens, ahead = row
                st = state.drafter_state[self.name]
                st["cached"].extend(feed)
                params: SamplingParams = state.sampling
                if params.greedy:
                    tok = greedy[j]
                else:   # the target's draw at this position, from q: drafts agree where the CDFs do
                    tok = int(sample_at(warp_probs(logits[j:j + 1], params), draws(state, 1, ahead + len(tokens)))[0])
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
