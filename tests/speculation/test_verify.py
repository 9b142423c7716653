"""The verifier on hand-built distributions."""

import torch
from scipy.stats import chisquare

from speculation.verify import SamplingParams, greedy_verify, speculative_verify, warp_probs


def one_hot_logits(tokens, vocab=6):
    logits = torch.full((len(tokens), vocab), -5.0)
    for i, t in enumerate(tokens):
        logits[i, t] = 5.0
    return logits


def test_greedy_accepts_longest_matching_prefix_then_target_token():
    logits = one_hot_logits([3, 1, 4, 0])           # target's argmax after each draft prefix
    assert greedy_verify([3, 1, 5], logits) == (2, 4)
    assert greedy_verify([3, 1, 4], logits) == (3, 0)   # all accepted: bonus token
    assert greedy_verify([2, 1, 4], logits) == (0, 3)
    assert greedy_verify([], logits[:1]) == (0, 3)


def test_warp_temperature_topk_topp():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = warp_probs(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(p, logits.softmax(-1))
    p = warp_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p, (logits / 0.5).softmax(-1))
    p = warp_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert p[2] == 0 and p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)                        # [0.64, 0.24, 0.09, 0.03]
    p = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (p > 0).tolist() == [True, True, False, False]
    assert torch.allclose(p[:2], full[:2] / full[:2].sum())
    p = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))   # top token alone
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert warp_probs(logits, SamplingParams()).tolist() == [1.0, 0.0, 0.0, 0.0]


P = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]])   # target, 2 positions
Q = torch.tensor([[0.1, 0.1, 0.7, 0.1]])                         # draft far from target


def _first_token_counts(verify, draft, draft_probs, n=20000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(4)
    for _ in range(n):
        # the drafted token itself is sampled from q (or fixed, for a copied draft)
        x = draft if draft is not None else int(torch.multinomial(draft_probs[0], 1, generator=gen))
        n_acc, nxt = verify([x], P, None if draft is not None else draft_probs, gen)
        counts[x if n_acc == 1 else nxt] += 1
    return counts


def _wrong_residual_verify(draft, target_probs, draft_probs, generator):
    """The classic bug: on rejection, resample from p instead of max(0, p - q)."""
    x = draft[0]
    q = draft_probs[0] if draft_probs is not None else torch.nn.functional.one_hot(torch.tensor(x), 4).float()
    if float(torch.rand((), generator=generator)) < min(1.0, float(target_probs[0, x] / q[x])):
        return 1, 0
    return 0, int(torch.multinomial(target_probs[0], 1, generator=generator))


def test_speculative_sampling_output_distributed_as_target():
    n = 20000
    for draft, q in ((None, Q), (2, None)):          # sampled draft model; copied (one-hot) draft
        counts = _first_token_counts(speculative_verify, draft, q, n)
        assert chisquare(counts.numpy(), (P[0] * n).numpy()).pvalue > 1e-3


def test_chi_square_detects_wrong_residual():
    """Test of the test: the same check must reject the wrong residual."""
    n = 20000
    for draft, q in ((None, Q), (2, None)):
        counts = _first_token_counts(_wrong_residual_verify, draft, q, n)
        assert chisquare(counts.numpy(), (P[0] * n).numpy()).pvalue < 1e-6


def test_bonus_token_sampled_from_last_position_when_all_accepted():
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(1)
    n_acc, nxt = speculative_verify([2], target, None, gen)
    assert (int(n_acc), int(nxt)) == (1, 3)
