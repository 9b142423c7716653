"""The verifier on hand-built distributions."""

import torch
from scipy.stats import chisquare

from speculation.verify import SamplingParams, greedy_verify, keyed_uniforms, sample_at, warp_probs


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


def test_keyed_uniforms_are_a_function_of_seed_and_position():
    a = keyed_uniforms(7, list(range(1000)))
    assert a == keyed_uniforms(7, list(range(1000)))                   # same key, same numbers
    assert keyed_uniforms(7, [500, 3]) == [a[500], a[3]]               # whatever the order asked
    assert a != keyed_uniforms(8, list(range(1000)))
    assert all(0.0 <= u < 1.0 for u in a) and len(set(a)) == len(a)
    counts = torch.histc(torch.tensor(keyed_uniforms(1, list(range(20000)))), bins=20, min=0, max=1)
    assert chisquare(counts.numpy()).pvalue > 1e-3                      # uniform


def test_sampling_at_keyed_uniforms_is_distributed_as_p():
    n = 20000
    for row in P:
        tokens = sample_at(row.expand(n, -1), keyed_uniforms(3, list(range(n))))
        counts = torch.bincount(tokens, minlength=4).float()
        assert chisquare(counts.numpy(), (row * n).numpy()).pvalue > 1e-3


def test_chi_square_detects_a_biased_sampler():
    """Test of the test: inverse CDF at u ** 2 (biased towards the first tokens) must fail it."""
    n = 20000
    u = [x * x for x in keyed_uniforms(3, list(range(n)))]
    counts = torch.bincount(sample_at(P[0].expand(n, -1), u), minlength=4).float()
    assert chisquare(counts.numpy(), (P[0] * n).numpy()).pvalue < 1e-6


def test_zero_probability_tokens_are_never_sampled():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0]]).expand(4, -1)
    tokens = sample_at(probs, [0.0, 0.2, 0.9999999999999999, 1.0 - 2 ** -53]).tolist()
    assert tokens == [1, 1, 3, 3]
    assert sample_at(torch.tensor([[0.0, 1.0, 0.0]]), [0.99999])[0] == 1
