"""Verification of drafted tokens: pure functions over logits.

Greedy: the longest draft prefix equal to the target's argmax is accepted, then the target's own
token follows.

Sampling is made deterministic per position, so that it verifies the same way: the token at
answer position j is the inverse CDF of the target's (warped) distribution p_j at a uniform
u_j that is a pure function of (seed, j) (:func:`keyed_uniforms`). Each u_j is uniform and the
u_j are independent, so every token is distributed exactly as p_j given the tokens before it;
and because u_j does not depend on how the answer was reached, speculation -- any drafts, any
draft lengths, rollbacks, re-prefills -- gives the very tokens the plain loop gives for the same
seed. A draft is accepted while it equals those sampled tokens; a draft tree likewise along the
one branch that carries them (:func:`tree_accept`, each node's distribution drawn at the uniform
of its depth's position). For a copied (one-hot) draft
the acceptance probability is p(x), as in the speculative-sampling rule of Leviathan et al.; a
draft model draws its own tokens at the same u_j from its q (inverse-CDF coupling), so drafts
agree with the target wherever the two CDFs put u_j in the same token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) over the last dim; returns probabilities.

    The same warping must be applied to the target's and the draft's logits: the rule is exact
    for whatever distribution p the warped target defines.
    """
    logits = logits.float()
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return probs
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top one stays)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def greedy_verify(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """target_logits: [len(draft) + 1, V], row i predicts the token after draft[:i].

    Returns (number of draft tokens accepted, the target's next token after them).
    """
    return greedy_accept(draft, target_logits.argmax(-1).tolist())


def greedy_accept(draft: list[int], predicted: list[int]) -> tuple[int, int]:
    """``greedy_verify`` on the target's argmax ids already on the host (a batched step takes
    the argmax of all its rows at once)."""
    n = 0
    while n < len(draft) and draft[n] == predicted[n]:
        n += 1
    return n, predicted[n]


def tree_accept(tokens: list[int], parents: list[int], predicted: list[int]) -> tuple[list[int], int]:
    """Greedy (or keyed-sampled) verification of a draft tree. ``predicted[0]`` is the target's
    token after the pending one, ``predicted[1 + i]`` its token after tree node ``i``. From the
    root, follow the child whose token is the target's own, as far as it goes: returns the
    accepted path (node indices, root first) and the target's token after it. Siblings carry
    distinct tokens, so at most one child matches -- the path is the one the plain loop takes."""
    children: dict[tuple[int, int], int] = {}
    for i, (tok, parent) in enumerate(zip(tokens, parents)):
        children[(parent, tok)] = i
    path: list[int] = []
    node = -1
    while True:
        want = predicted[node + 1]
        nxt = children.get((node, want))
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_uniforms(seed: int, positions: list[int]) -> list[float]:
    """A uniform in [0, 1) for each answer position: a pure function of (seed, position)
    (SplitMix64 of the pair, 53 bits), so a position draws the same number however often and
    in whichever sequence it is generated."""
    base = _splitmix64(seed & _MASK64)
    return [(_splitmix64(base ^ (pos & _MASK64)) >> 11) * (1.0 / (1 << 53)) for pos in positions]


def draws(state: Any, n: int, ahead: int = 0) -> list[float]:
    """The keyed uniforms of a sampled sequence's next ``n`` tokens, ``ahead`` tokens past its
    end (a draft model drafting): answer positions ``len(tokens) + ahead - answer_start`` on."""
    first = len(state.tokens) + ahead - state.answer_start
    return keyed_uniforms(state.seed or 0, list(range(first, first + n)))


def sample_at(probs: torch.Tensor, uniforms: list[float]) -> torch.Tensor:
    """Inverse-CDF sampling: row i's token is the first whose cumulative probability exceeds
    ``uniforms[i]`` (scaled by the row's total). A zero-probability token is never chosen.
    probs: [n, V]; returns [n] token ids on the probabilities' device (no host sync)."""
    cdf = probs.double().cumsum(-1)    # float64: a uniform of 53 bits is never rounded to 1
    total = cdf[:, -1]
    x = torch.tensor(uniforms, dtype=cdf.dtype, device=cdf.device) * total
    # strictly below the total, so the first cdf value above x exists and has a positive step
    x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x.unsqueeze(-1), right=True).squeeze(-1)
