"""Verification of drafted tokens: pure functions over logits.

Greedy: the longest draft prefix equal to the target's argmax is accepted, then the target's own
token follows. Sampling: the speculative-sampling rule of Leviathan et al. / Chen et al., which
makes the output distributed exactly as the target's (warped) distribution p whatever the
draft distribution q is. A draft copied from a document is deterministic: q is one-hot.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def speculative_verify(
    draft: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule, without a host synchronisation.

    target_probs: [len(draft) + 1, V] warped target distributions p.
    draft_probs:  [len(draft), V] warped draft distributions q, or None for a deterministic
                  (copied) draft, i.e. q = one-hot at the drafted token.
    Accept draft x_i with probability min(1, p(x_i) / q(x_i)); at the first rejection i sample
    from normalise(max(0, p_i - q_i)); if all are accepted, sample a bonus token from p.
    One uniform is drawn per draft position (those after the first rejection are unused, which
    leaves the distribution unchanged) and the sampled index is chosen on the device, so the
    caller syncs once per step for all rows.
    Returns (number accepted, next token) as 0-d tensors on the probabilities' device.
    """
    device = target_probs.device
    k = len(draft)
    vocab = target_probs.shape[-1]
    # q with a zero row after the drafts: the "residual" at position k is then p_k itself
    q = torch.zeros(k + 1, vocab, device=device, dtype=target_probs.dtype)
    if k:
        x = torch.tensor(draft, device=device)
        if draft_probs is None:
            q[torch.arange(k, device=device), x] = 1.0
        else:
            q[:k] = draft_probs.to(q.dtype)
        rows = torch.arange(k, device=device)
        p_x, q_x = target_probs[rows, x], q[rows, x]
        ratio = torch.where(q_x > 0, p_x / q_x.clamp_min(1e-30), (p_x > 0).to(p_x.dtype))
        u = torch.rand(k, generator=generator, device=device)
        n = (u < ratio.clamp(max=1.0)).to(torch.long).cumprod(0).sum()
    else:
        n = torch.zeros((), dtype=torch.long, device=device)
    p_n = target_probs.index_select(0, n.view(1))[0]
    residual = (p_n - q.index_select(0, n.view(1))[0]).clamp_min(0.0)
    total = residual.sum()
    # p == q exactly: a rejection has probability zero; sample from p rather than divide by 0
    residual = torch.where(total > 0, residual, p_n)
    nxt = torch.multinomial(residual / residual.sum(), 1, generator=generator)[0]
    return n, nxt
