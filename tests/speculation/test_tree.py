"""Draft trees: every continuation of the suffix match, from every reference, verified in one
forward with tree attention. Greedy output equals HF generate and specrag without speculation
on cases where the references disagree; a node's logits equal those of its path fed as a plain
sequence; the accepted branch's KV is moved into place."""

import functools
import random

import pytest
import torch

import exactness
from exactness import assert_same_tokens, hf_greedy
from speculation.cost import CostCurve
from speculation.drafters import Draft, History, _NgramIndex, build_tree
from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.forward import PooledModel, Row
from speculation.kv import KVPool
from tinymodels import TinyTokenizer, tiny_llama

VOCAB = 96


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=0)


# ---- the index and the tree ----------------------------------------------------------------

def test_index_returns_every_occurrence_and_rolls_back():
    index = _NgramIndex(4)
    index.add([7, 8, 9, 10, 11])
    index.add([5, 8, 9, 12])
    own = index.add([3, 8, 9])
    # the 2-token suffix (8, 9) continues in both documents: both returned, documents in order
    assert index.occurrences([3, 8, 9], min_n=1, shorter=0) == [(2, 0, 3), (2, 1, 3)]
    # the single-path rule still copies the first occurrence
    assert index.lookup_match([3, 8, 9], 4) == ([10, 11], 2)
    index.extend(own, [13, 8, 9])
    assert (2, 2, 3) in index.occurrences([13, 8, 9], shorter=0)      # the output's own (8, 9) -> 13
    index.truncate(own, 3)
    assert index.occurrences([3, 8, 9], shorter=0) == [(2, 0, 3), (2, 1, 3)]
    assert index.seqs[own] == [3, 8, 9]
    # shorter matches add the places only they have, weighted down in the tree
    occ = index.occurrences([4, 9], min_n=1, shorter=1)
    assert occ[0][0] == 1 and {(s, j) for _, s, j in occ} == {(0, 3), (1, 3)}


def test_build_tree_merges_continuations_by_weight():
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 7], [9, 9]]
    occ = [(2, 0, 0), (2, 1, 0), (2, 2, 0), (1, 3, 0)]
    tokens, parents, weights, places = build_tree(seqs, occ, max_depth=3, max_nodes=32)
    draft = Draft(tokens, "tree", 2, parents, weights)
    # a node's place is where the first occurrence that made it has its token
    assert all(seqs[s][j] == t for t, (s, j) in zip(tokens, places))
    assert places[tokens.index(5)] == (1, 2) and places[tokens.index(9)] == (3, 0)
    paths = set()
    for i in range(len(tokens)):             # every root-to-node path is a prefix of a continuation
        path, j = [], i
        while j >= 0:
            path.append(tokens[j])
            j = parents[j]
        paths.add(tuple(reversed(path)))
    assert {(1, 2, 3), (1, 2, 5), (9, 9)} <= paths
    assert all(p < i for i, p in enumerate(parents)), "parents first"
    assert weights == sorted(weights, reverse=True)
    # the three occurrences of the longest match share 0.8, the shorter match's one 0.2
    assert weights[0] == pytest.approx(0.8) and weights[tokens.index(9)] == pytest.approx(0.2)
    assert weights[tokens.index(3)] == pytest.approx(0.8 * 2 / 3)
    assert draft.depth() == 3
    # any first k nodes are a tree (a node's parent comes before it)
    small = draft.trimmed(4)
    assert all(p < 4 for p in small.parents)
    # where every match agrees the tree is a chain with weight 1
    tokens, parents, weights, places = build_tree([[4, 5, 6], [4, 5, 6]], [(3, 0, 0), (3, 1, 0)], 8, 8)
    assert (tokens, parents, weights, places) == ([4, 5, 6], [-1, 0, 1], [1.0, 1.0, 1.0], [(0, 0), (0, 1), (0, 2)])


def test_best_path_follows_the_heaviest_child():
    origins = [("reference", 0, i) for i in range(5)]
    draft = Draft([5, 6, 7, 8, 9], "tree", 3, [-1, -1, 0, 0, 2], [0.6, 0.4, 0.4, 0.2, 0.4], origins)
    chain = draft.best_path()
    assert (chain.tokens, chain.parents, chain.source) == ([5, 7, 9], None, "tree")
    assert chain.origins == [origins[0], origins[2], origins[4]]


def test_ranked_keeps_parents_first():
    draft = Draft([5, 6, 7, 8], "tree", 3, [-1, 0, -1, 2], [0.6, 0.6, 0.4, 0.4])
    ranked = draft.ranked([0.3, 0.2, 0.35, 0.1])
    assert ranked.tokens == [7, 5, 6, 8]
    assert ranked.origins is None
    assert ranked.parents == [-1, -1, 1, 0]
    assert all(p < i for i, p in enumerate(ranked.parents))


# ---- tree attention ------------------------------------------------------------------------

def _plain_logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _assert_close_or_near_tie(got, want, label):
    """Equal logits up to fp32 rounding; the argmax may differ only at a reported near-tie."""
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), f"{label}: max diff {(got - want).abs().max():.3g}"
    if got.argmax() != want.argmax():
        top2 = torch.topk(want, 2).values
        assert float(top2[0] - top2[1]) < exactness.NEAR_TIE, f"{label}: argmax differs off a near-tie"


def test_tree_node_logits_equal_the_path_fed_as_a_sequence(target):
    runner = PooledModel(target, 4)
    prompt = [1, 17, 33, 45, 8, 60, 12]
    # pending token 12, then a tree: 20 -> (21 -> 22, 23), 30 -> 31; and a chain row beside it
    fed = [12]
    tree_tokens = [20, 30, 21, 23, 31, 22]
    tree_parents = [-1, -1, 0, 0, 1, 2]
    with torch.inference_mode():
        runner.forward([Row(0, 0, prompt[:-1], len(prompt) - 1)])            # the cached prefix
        runner.forward([Row(1, 0, [1, 5, 9], 3)])
        parents = [-1] + [0 if p < 0 else 1 + p for p in tree_parents]
        logits = runner.forward([Row(0, len(prompt) - 1, fed + tree_tokens, 0, parents),
                                 Row(1, 3, [4, 4, 7], 0)])
    depth_path = {}
    for i, p in enumerate(tree_parents):
        depth_path[i] = (depth_path[p] if p >= 0 else []) + [tree_tokens[i]]
    plain_root = _plain_logits(target, prompt)[-1]
    _assert_close_or_near_tie(logits[0], plain_root, "root")
    for i, path in depth_path.items():
        want = _plain_logits(target, prompt + path)[-1]
        _assert_close_or_near_tie(logits[1 + i], want, f"node {i} {path}")
    chain = _plain_logits(target, [1, 5, 9, 4, 4, 7])[-3:]
    for j in range(3):
        _assert_close_or_near_tie(logits[1 + len(tree_tokens) + j], chain[j], f"chain row token {j}")


def test_moved_branch_decodes_like_a_plain_sequence(target):
    """Accept the second branch (nodes 1 and 4 of the tree above), move its KV behind the prefix,
    and decode one more token from the pool: the logits are those of the plain sequence."""
    runner = PooledModel(target, 2)
    prompt = [1, 17, 33, 45, 8, 60, 12]
    tree_tokens = [20, 30, 21, 23, 31, 22]
    tree_parents = [-1, -1, 0, 0, 1, 2]
    n = len(prompt)
    with torch.inference_mode():
        runner.forward([Row(0, 0, prompt[:-1], n - 1)])
        runner.forward([Row(0, n - 1, [12] + tree_tokens, 0, [-1] + [0 if p < 0 else 1 + p for p in tree_parents])])
        runner.pool.move(0, [n + 1, n + 4], [n, n + 1])                       # the path 30 -> 31
        logits = runner.forward([Row(0, n + 2, [5], 0)])
    _assert_close_or_near_tie(logits[0], _plain_logits(target, prompt + [30, 31, 5])[-1], "after the move")


def test_kv_pool_move_copies_positions():
    pool = KVPool(2, 1, 2, torch.float32, torch.device("cpu"), 2, 16, initial_slots=2, initial_length=8)
    for layer in pool.keys + pool.values:
        layer[1, 0, :, 0] = torch.arange(8, dtype=torch.float32)
    other = [layer[0].clone() for layer in pool.keys]
    pool.move(1, [3, 5, 6], [2, 3, 4])
    for layer in pool.keys + pool.values:
        assert layer[1, 0, :, 0].tolist() == [0, 1, 3, 5, 6, 5, 6, 7]
    assert all(torch.equal(a, layer[0]) for a, layer in zip(other, pool.keys)), "another slot was touched"


# ---- greedy exactness ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cases(target, n=36):
    """Prompts whose references disagree: the oracle's continuation only in the second document
    (the first is a corrupted copy), in none (two corrupted copies), in several (beside a
    corrupted copy); limits that fall inside accepted branches, EOS included."""
    rng = random.Random(99)
    cases = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 30))]
        oracle = hf_greedy(target, prompt, 48)

        def corrupt(seq):
            cut = rng.randrange(0, min(10, len(seq)))
            return seq[:cut] + [rng.randrange(3, VOCAB)] + seq[cut + 1:]
        tail = prompt[-3:]                     # the documents continue the prompt's last tokens
        kind = i % 3
        if kind == 0:
            refs = [tail + corrupt(oracle), tail + oracle]
        elif kind == 1:
            refs = [tail + corrupt(oracle), tail + corrupt(oracle)]
        else:
            refs = [tail + oracle, tail + corrupt(oracle), tail + oracle]
        cases.append((prompt, refs, rng.choice([5, 17, 40]), oracle, kind))
    return tuple(cases)


POLICIES = {
    "fixed": {"draft_policy": "fixed", "min_ngram": 1},
    "flat": {"cost_curve": CostCurve.synthetic(per_token=1e-6)},
    "steep": {"cost_curve": CostCurve.synthetic(per_token=0.01)},
    "measured": {},
}


@pytest.mark.parametrize("policy", [pytest.param(p, marks=pytest.mark.measured_cost) if p == "measured" else p
                                    for p in POLICIES])
def test_tree_greedy_equals_hf_generate_and_no_speculation(target, policy, monkeypatch):
    moves = []
    real_move = KVPool.move
    monkeypatch.setattr(KVPool, "move", lambda self, *a: (moves.append(a), real_move(self, *a)))
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig(drafters=("tree",), **POLICIES[policy]))
    plain_engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig(drafters=()))
    drafter = engine.drafters["tree"]
    proposed = []
    real_propose = drafter.propose
    monkeypatch.setattr(drafter, "propose", lambda s, k: proposed.append(real_propose(s, k)) or proposed[-1])
    accepted = eos_inside = limit_inside = 0
    for n, (prompt, refs, max_new, oracle, kind) in enumerate(_cases(target)):
        chunks = []
        result = engine.generate_one(GenerationRequest(prompt, refs, max_new_tokens=max_new),
                                     lambda s, ids, d: chunks.append(ids))
        plain = plain_engine.generate_one(GenerationRequest(prompt, [], max_new_tokens=max_new))
        assert_same_tokens(target, prompt, oracle[:max_new], result.token_ids, f"tree case {n} ({policy})")
        assert_same_tokens(target, prompt, plain.token_ids, result.token_ids, f"tree case {n} vs plain")
        accepted += result.stats.accepted_tokens
        last = chunks[-1] if chunks else []
        eos_inside += result.token_ids[-1:] == [2] and len(last) > 1
        limit_inside += result.finish_reason == "length" and len(last) > 1
    branched = sum(1 for d in proposed if d is not None and len(d.tokens) > d.depth())
    if policy == "steep":
        return
    if policy == "measured" and accepted == 0:
        pytest.skip("this machine's measured curve makes drafting a loss for the tiny model")
    assert accepted > 0 and branched > 0, "no branching tree was verified: the comparison proved nothing"
    assert moves, "no accepted branch needed its KV moved: a later branch was never accepted"
    if policy == "flat":
        assert eos_inside >= 1 and limit_inside >= 1, (eos_inside, limit_inside)


@pytest.mark.parametrize("whole", [True, False])
def test_invariant_forward_verifies_whole_trees_bitwise_on_the_attention_kernel(target, whole, monkeypatch):
    """Under the batch-invariant forward on our attention kernel, whole trees (branches verified,
    accepted branches moved into place) give bitwise the plain output; the engine's default
    there verifies the heaviest path only, with the same output."""
    from speculation import kernels

    if kernels.attention_kernel() is None:
        pytest.skip("the attention kernel needs AVX-512 or AVX2 + FMA (and a C compiler); this CPU lacks them")
    moves = []
    real_move = KVPool.move
    monkeypatch.setattr(KVPool, "move", lambda self, *a: (moves.append(a), real_move(self, *a)))
    cfg = {"draft_policy": "fixed", "min_ngram": 1, "batch_invariant": True, "history_tokens": 0}
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig(drafters=("tree",), **cfg))
    engine.invariant_trees = whole
    plain_engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig(drafters=(), **cfg))
    requests = [GenerationRequest(p, r, max_new_tokens=m) for p, r, m, _, _ in _cases(target)[:18]]
    together = engine.generate(requests)              # tree rows beside each other and chain rows
    for n, (req, got) in enumerate(zip(requests, together)):
        plain = plain_engine.generate_one(GenerationRequest(req.prompt_ids, [], max_new_tokens=req.max_new_tokens))
        assert got.token_ids == plain.token_ids, f"case {n}: not bitwise the plain output"
        assert engine.generate_one(req).token_ids == plain.token_ids, f"case {n} alone"
    assert bool(moves) == whole, "whole trees move accepted branches; heaviest paths never need to"


def test_tree_beats_the_single_path_where_the_right_document_is_second(target):
    """Where the first document is the wrong one, the tree still verifies the second's
    continuation: more tokens per forward than single-path reference drafting."""
    cfg = {"draft_policy": "fixed", "min_ngram": 1}
    tree = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig(drafters=("tree",), **cfg))
    single = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig(drafters=("reference",), **cfg))
    forwards = {"tree": 0, "single": 0}
    for prompt, refs, _, oracle, kind in _cases(target):
        if kind != 0:
            continue
        for name, engine in (("tree", tree), ("single", single)):
            result = engine.generate_one(GenerationRequest(prompt, refs, max_new_tokens=40))
            assert result.token_ids == oracle[:40] or result.token_ids[-1:] == [2]
            forwards[name] += result.stats.target_forwards
    assert forwards["tree"] < forwards["single"], forwards


def test_tree_rows_share_a_batch_with_chain_rows(target):
    """Tree, single-path and undrafted rows in one engine step: each equals its output alone."""
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), None,
                               EngineConfig(drafters=("tree",), draft_policy="fixed", min_ngram=1))
    cases = _cases(target)[:12]
    drafters = [("tree",), ("reference",), ()]
    requests = [GenerationRequest(p, r, max_new_tokens=m, drafters=drafters[i % 3])
                for i, (p, r, m, _, _) in enumerate(cases)]
    rows = []
    engine.on_step = lambda rec: rows.append(rec.rows)
    together = engine.generate(requests)
    assert max(rows) >= 6
    for i, (req, res, case) in enumerate(zip(requests, together, cases)):
        assert_same_tokens(target, req.prompt_ids, case[3][:req.max_new_tokens], res.token_ids, f"row {i}")


# ---- the draft model extends the best branch -------------------------------------------------

def test_extended_draft_hangs_placeholders_below_the_best_leaf():
    tree = Draft([5, 6, 7, 8], "tree", 2, [-1, 0, -1, 1], [0.6, 0.6, 0.4, 0.3], [("reference", 0, i) for i in range(4)])
    ext = tree.extended(2)
    assert ext.tokens == [5, 6, 7, 8, -1, -1] and ext.parents == [-1, 0, -1, 1, 3, 4]
    assert ext.weights[4:] == [0.3, 0.3] and ext.origins[4:] == [("draft_model", -1, -1)] * 2
    assert ext.best_nodes() == [0, 1, 3, 4, 5] and ext.path_to(4) == [0, 1, 3, 4] and ext.parent(4) == 3
    chain = Draft([5, 6], "reference", 3).extended(3)
    assert chain.tokens == [5, 6, -1, -1, -1] and chain.parents is None
    assert chain.parent(2) == 1 and chain.path_to(2) == [0, 1, 2]
    # dropping nodes keeps the rest a tree, parents re-indexed
    kept = ext.kept([0, 1, 2, 3])
    assert kept.parents == [-1, 0, -1, 1] and kept.tokens == [5, 6, 7, 8]


def _short_document_cases(target, n=12):
    """Documents holding only the first few tokens of the answer (a right copy, then a corrupted
    one, so trees branch): a copy draft runs out where the document ends, and a draft model may
    go on."""
    rng = random.Random(7)
    cases = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 20))]
        oracle = hf_greedy(target, prompt, 40)
        cut = rng.randrange(3, 7)
        wrong = oracle[:cut - 1] + [(oracle[cut - 1] + 1) % VOCAB or 3]
        cases.append((prompt, [prompt[-3:] + oracle[:cut], prompt[-3:] + wrong], rng.choice([17, 40]), oracle))
    return cases


@pytest.mark.parametrize("policy", ["fixed", "flat"])
@pytest.mark.parametrize("drafters", [("tree", "draft_model"), ("reference", "draft_model")])
@pytest.mark.parametrize("draft_seed", [0, 1], ids=["right-draft", "unrelated-draft"])
def test_draft_model_extends_the_best_branch(target, drafters, policy, draft_seed):
    """Where the documents run out, the draft model continues the copy draft's best branch in
    the same forward: output equals HF generate and no speculation; with a draft model that is
    right (the target's own weights) some single commit holds copied tokens followed by the
    draft model's; with an unrelated one the extensions are drafted and rejected."""
    draft = tiny_llama(seed=draft_seed)
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), draft,
                               EngineConfig(drafters=drafters, **POLICIES[policy]))
    plain = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig(drafters=()))
    extensions = []        # per verified draft with an extension: (its tokens, accepted, leaf reached)
    real_tally = engine._tally

    def tally(plan, path):
        if plan.extended:
            leaf = plan.draft.parent(plan.extended[0])
            extensions.append((len(plan.extended), sum(i in plan.extended for i in path), leaf in path))
        return real_tally(plan, path)
    engine._tally = tally
    mixed = 0
    for n, (prompt, refs, max_new, oracle) in enumerate(_short_document_cases(target)):
        result = engine.generate_one(GenerationRequest(prompt, refs, max_new_tokens=max_new))
        assert_same_tokens(target, prompt, oracle[:max_new], result.token_ids, f"case {n} ({drafters}, {policy})")
        assert result.token_ids == plain.generate_one(GenerationRequest(prompt, [], max_new_tokens=max_new)).token_ids
        origins = [o[0] for o in result.origins]
        # one commit = a run of drafted tokens ending at the target's own token
        commits, run = [], []
        for kind in origins:
            run.append(kind)
            if kind == "target":
                commits.append(run)
                run = []
        mixed += any("reference" in c and "draft_model" in c[c.index("reference"):] for c in commits)
        by = result.stats.by_drafter
        assert sum(s.drafted for s in by.values()) == result.stats.draft_tokens
        assert sum(s.accepted for s in by.values()) == result.stats.accepted_tokens
    assert extensions, "the draft model never extended a branch"
    reached = [(n, a) for n, a, hit in extensions if hit]
    print(f"{len(extensions)} extensions, {len(reached)} reached, {sum(a for _, a in reached)} of "
          f"{sum(n for n, _ in reached)} of their tokens accepted")
    if draft_seed == 0:
        # the target's own weights continue the right branch with the target's own tokens
        assert mixed > 0, "no commit held copied tokens followed by the draft model's"
        assert reached and sum(a == n for n, a in reached) >= 0.9 * len(reached), reached


def test_validated_drafter_names_are_the_engines():
    """Configs and HTTP requests validate drafter names against one Literal: it must list
    exactly the drafters the engine knows."""
    import typing

    from pipeline.api import DrafterName
    from speculation.engine import DRAFTERS

    assert typing.get_args(DrafterName) == DRAFTERS


# ---- history: earlier requests' outputs as drafting sources --------------------------------

def test_history_keeps_the_latest_outputs_within_its_budget():
    history = History(max_tokens=10, max_n=4)
    history.add([1, 2, 3, 4])
    history.add([5, 2, 3, 6])
    history.add([9])                          # too short to continue anything: not kept
    history.add(list(range(20, 40)))          # longer than the budget: not kept
    assert len(history) == 2 and history.tokens == 8
    assert [(n, j) for n, _, j in history.occurrences([7, 2, 3], 1, 0, 64)] == [(2, 3), (2, 3)]
    history.add([7, 2, 3, 8])                 # 12 tokens > 10: the oldest output goes
    assert len(history) == 2 and history.tokens == 8
    conts = {tuple(history.index.seqs[s][j:j + 1]) for _, s, j in history.occurrences([0, 2, 3], 1, 0, 64)}
    assert conts == {(6,), (8,)}, "the dropped output still drafts"
    # its sequence id is reused; the index agrees with one built afresh from what is kept
    fresh = _NgramIndex(4)
    for ids in ([5, 2, 3, 6], [7, 2, 3, 8]):
        fresh.add(ids)
    for suffix in ([2, 3], [3], [5, 2], [0, 7], [6]):
        got = sorted(tuple(history.index.seqs[s][j:]) for _, s, j in history.occurrences(suffix, 1, 1, 64))
        want = sorted(tuple(fresh.seqs[s][j:]) for _, s, j in fresh.occurrences(suffix, 1, 1, 64))
        assert got == want, suffix
    history.clear()
    assert len(history) == 0 and history.tokens == 0 and history.occurrences([2, 3], 1, 0, 64) == []


@pytest.mark.parametrize("history_tokens", [0, 4096])
def test_tree_drafts_from_an_earlier_answer_exactly(target, history_tokens):
    """A question asked again (no documents): with the history on, the tree drafts the earlier
    answer and commits it in a few forwards, marked "history"; the output is HF's and the plain
    engine's either way."""
    engine = SpeculativeEngine(target, TinyTokenizer(VOCAB), None,
                               EngineConfig(drafters=("tree",), draft_policy="fixed", min_ngram=1,
                                            history_tokens=history_tokens))
    rng = random.Random(5)
    forwards, origins = [], []
    for n in range(3):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(12)]
        oracle = hf_greedy(target, prompt, 32)
        for _ in range(2):
            result = engine.generate_one(GenerationRequest(prompt, [], max_new_tokens=32))
            assert_same_tokens(target, prompt, oracle, result.token_ids, f"history case {n}")
            forwards.append(result.stats.target_forwards)
            origins.append({kind for kind, _, _ in result.origins})
    first, again = forwards[0::2], forwards[1::2]
    if history_tokens:
        assert all(a < f for a, f in zip(again, first)), forwards
        # (a later question's first answer may draw on the others' too: these tiny models repeat)
        assert all("history" in o for o in origins[1::2]) and "history" not in origins[0]
    else:
        assert engine.history is None and not any("history" in o for o in origins)
