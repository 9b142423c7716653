"""Seeded sampling through the whole engine, one request at a time and many in one batch: with
speculation, a seed gives the very tokens it gives without speculation, and tokens are
distributed exactly as the target's distribution says. The first token comes from the prefill,
so the distribution check is on tokens 2 and 3 -- the ones produced by draft + verify --
against their exact distribution computed from the target."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

import speculation.engine as engine_mod
from speculation.cost import CostCurve
from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.scheduler import EngineLoop
from speculation.verify import SamplingParams, warp_probs
from tinymodels import TinyTokenizer, tiny_llama

VOCAB = 5
PROMPT = [1, 3, 4, 0, 3]
PARAMS = SamplingParams(temperature=1.0)
N = 1000


def _exact_joint(target):
    """P(t2, t3) = sum over t1 of p(t1) p(t2 | t1) p(t3 | t1, t2)."""
    def p(prefix):
        with torch.inference_mode():
            return warp_probs(target(input_ids=torch.tensor([prefix])).logits[0, -1], PARAMS)
    joint = torch.zeros(VOCAB, VOCAB)
    p1 = p(PROMPT)
    for t1 in range(VOCAB):
        if t1 == 2 or p1[t1] == 0:       # EOS ends the sequence: excluded by conditioning below
            continue
        p2 = p(PROMPT + [t1])
        for t2 in range(VOCAB):
            if t2 == 2:
                continue
            joint[t2] += p1[t1] * p2[t2] * p(PROMPT + [t1, t2])
    return joint


def _sampled_joint(engine, references, batched=False):
    """Counts of (t2, t3) over N seeded requests: one at a time, or all submitted at once to an
    engine loop, which steps up to max_batch of them per forward (with greedy rows among them)."""
    requests = [GenerationRequest(PROMPT, references, max_new_tokens=3, sampling=PARAMS, seed=seed)
                for seed in range(N)]
    if batched:
        loop = EngineLoop(engine)
        greedy = [loop.submit(GenerationRequest(PROMPT, references, max_new_tokens=3)) for _ in range(N // 50)]
        outs = [h.token_ids for h in (x.result() for x in [loop.submit(r) for r in requests])]
        assert len({tuple(g.result().token_ids) for g in greedy}) == 1
        loop.close()
    else:
        outs = [engine.generate_one(r).token_ids for r in requests]
    counts = torch.zeros(VOCAB, VOCAB)
    for out in outs:
        if len(out) == 3:                # sequences that ended early (EOS) are not counted
            counts[out[1], out[2]] += 1
    return counts


def _pvalue(counts, joint):
    expected = joint / joint.sum() * counts.sum()
    keep = expected.flatten() >= 5
    obs, exp = counts.flatten()[keep], expected.flatten()[keep]
    rest_obs, rest_exp = counts.sum() - obs.sum(), expected.sum() - exp.sum()
    if rest_exp > 0:   # pool the rare cells into one
        obs, exp = torch.cat([obs, rest_obs.reshape(1)]), torch.cat([exp, rest_exp.reshape(1)])
    pvalue = chisquare(obs.numpy(), exp.numpy()).pvalue
    print(f"chi-square over {len(obs)} cells, {int(counts.sum())} samples: p = {pvalue:.3g}")
    return pvalue


@pytest.fixture(scope="module")
def setup():
    target = tiny_llama(seed=3, vocab_size=VOCAB, eos_boost=0.5)
    draft = tiny_llama(seed=4, vocab_size=VOCAB, eos_boost=0.5)
    return target, draft, _exact_joint(target)


# documents that continue the same suffixes differently: the tree drafter branches at most steps
TREE_REFS = [[3, 4, 0, 3, 4, 1, 0, 1, 3, 3, 4], [0, 3, 1, 1, 4, 0, 3, 0, 1], [4, 0, 3, 3, 0, 1, 4, 3, 1],
             [3, 0, 4, 4, 3, 1, 1, 0, 4]]
CONFIGS = {
    "draft_model": (("draft_model",), [], {}),
    "reference": (("reference",), [[3, 4, 0, 3, 4, 1, 0, 1, 3, 3, 4]], {}),
    "tree": (("tree",), TREE_REFS, {}),
    # documents that run out after a token or two: the draft model extends the tree's best branch
    # (verification priced as free, so the cost model keeps every extension it is offered); of
    # N requests' first steps ~17% reach an extension, ~10% accept one of its tokens
    "tree+draft_model": (("tree", "draft_model"), [r[:4] for r in TREE_REFS],
                         {"cost_curve": CostCurve.synthetic(per_token=1e-6)}),
}


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_speculative_sampling_matches_target_distribution(setup, name, batched):
    target, draft, joint = setup
    drafters, refs, config = CONFIGS[name]
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), draft, EngineConfig(drafters=drafters, **config))
    counts = _sampled_joint(engine, refs, batched)
    assert _pvalue(counts, joint) > 1e-3


@pytest.mark.parametrize("batched", [False, True], ids=["alone", "batched"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_seed_gives_the_same_tokens_with_and_without_speculation(setup, name, batched):
    """The draws are keyed by position, so speculation (any drafts, any draft lengths, the cost
    model's included) cannot change a seeded answer."""
    target, draft, _ = setup
    drafters, refs, config = CONFIGS[name]
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), draft, EngineConfig(drafters=drafters, **config))
    seeds = range(40)
    plain = [engine.generate_one(GenerationRequest(PROMPT, refs, max_new_tokens=24, sampling=PARAMS, seed=s,
                                                   speculate=False)).token_ids for s in seeds]
    spec_requests = [GenerationRequest(PROMPT, refs, max_new_tokens=24, sampling=PARAMS, seed=s) for s in seeds]
    if batched:
        loop = EngineLoop(engine)
        spec = [h.result().token_ids for h in [loop.submit(r) for r in spec_requests]]
        loop.close()
    else:
        spec = [engine.generate_one(r).token_ids for r in spec_requests]
    assert spec == plain
    assert len({tuple(t) for t in plain}) > 20            # the seeds do give different answers
    stats = engine.generate_one(spec_requests[0]).stats
    assert stats.draft_tokens > 0, "nothing was drafted: the test proves nothing"


def test_chi_square_rejects_draws_that_ignore_the_position(setup, monkeypatch):
    """Test of the test: one uniform for every position of a request (the draws repeat) must
    fail the joint distribution check."""
    target, draft, joint = setup
    same = engine_mod.draws

    def repeated(state, n, ahead=0):
        return same(state, 1)[:1] * n

    monkeypatch.setattr(engine_mod, "draws", repeated)
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), draft, EngineConfig(drafters=("draft_model",)))
    assert _pvalue(_sampled_joint(engine, []), joint) < 1e-3


def test_chi_square_rejects_a_tree_rule_that_prefers_the_first_branch(setup, monkeypatch):
    """Test of the test for trees: a rule that, whenever the target's token is one of a node's
    children, follows the node's first (heaviest) child instead of the matching one must fail
    the joint distribution check; the right rule (above) passes it."""
    target, _, joint = setup

    def first_branch(tokens, parents, predicted):
        path, node = [], -1
        while True:
            kids = [i for i, p in enumerate(parents) if p == node]
            want = predicted[node + 1]
            if want not in [tokens[i] for i in kids]:
                return path, want
            path.append(kids[0])
            node = kids[0]

    monkeypatch.setattr(engine_mod, "tree_accept", first_branch)
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), None,
                               EngineConfig(drafters=("tree",), draft_policy="fixed", min_ngram=1))
    assert _pvalue(_sampled_joint(engine, TREE_REFS), joint) < 1e-3
