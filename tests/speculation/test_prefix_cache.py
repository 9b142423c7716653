"""Prefix caching: a new sequence whose prompt starts like what a KV slot holds starts from
there. It changes what is prefilled, never a token: outputs are compared with the engine
without the cache, token for token, and with Hugging Face ``generate``; on the batch-invariant
forward the reused keys and values are bitwise what a prefill computes."""

import copy
import random

import pytest
import torch

from exactness import assert_same_tokens, hf_greedy
from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.invariant import rows_are_invariant
from tinymodels import TinyTokenizer, tiny_llama

VOCAB = 96


@pytest.fixture(scope="module")
def models():
    return tiny_llama(seed=0), tiny_llama(seed=1)


def _engine(models, **config):
    target, draft = models
    return SpeculativeEngine(target, TinyTokenizer(VOCAB), draft, EngineConfig(**config))


def _family(seed=3, shared=90, n=6):
    """Prompts that share a long first part (a system prompt and the same sources) and end in
    different questions; the second repeats the first exactly, the last shares only a few tokens."""
    rng = random.Random(seed)
    head = [1] + [rng.randrange(3, VOCAB) for _ in range(shared)]
    prompts = [head + [rng.randrange(3, VOCAB) for _ in range(rng.choice([3, 12, 40]))] for _ in range(n)]
    prompts.insert(1, list(prompts[0]))
    prompts.append(head[:5] + [rng.randrange(3, VOCAB) for _ in range(30)])
    return prompts


def _requests(prompts, target, drafters):
    reqs = []
    for i, p in enumerate(prompts):
        refs = [hf_greedy(target, p, 24)] if i % 2 == 0 else []
        reqs.append(GenerationRequest(p, refs, max_new_tokens=24, drafters=drafters))
    return reqs


@pytest.mark.parametrize("drafters", [(), ("reference",), ("reference", "draft_model")])
def test_one_after_another_reuses_released_slots_and_changes_no_token(models, drafters):
    target = models[0]
    prompts = _family()
    cached = _engine(models)
    plain = _engine(models, prefix_cache=False)
    for i, req in enumerate(_requests(prompts, target, drafters)):
        got = cached.generate_one(req)
        want = plain.generate_one(req)
        assert got.token_ids == want.token_ids, f"request {i}: prefix cache changed the output"
        assert_same_tokens(target, req.prompt_ids, hf_greedy(target, req.prompt_ids, 24), got.token_ids,
                           f"prefix cache, request {i}")
        assert want.stats.cached_prompt_tokens == 0
        if i == 0:
            assert got.stats.cached_prompt_tokens == 0
        elif i == 1:                         # the exact repeat: all but the pending token
            assert got.stats.cached_prompt_tokens == len(req.prompt_ids) - 1
        elif i == len(prompts) - 1:          # 5 shared tokens: below the minimum, prefilled
            assert got.stats.cached_prompt_tokens == 0
        else:
            assert got.stats.cached_prompt_tokens >= 91
        assert got.stats.prefills == 1


def test_concurrent_requests_copy_from_running_rows_and_leave_them_untouched(models):
    """Requests that join while others run get the shared prefix copied from a running row's
    slot; the donor's keys and values stay bit-identical, and every output is what it is alone."""
    target = models[0]
    prompts = _family(seed=5)[:5]
    reqs = _requests(prompts, target, ("reference",))
    alone = [_engine(models, prefix_cache=False).generate_one(r).token_ids for r in reqs]
    engine = _engine(models)
    first = engine.begin([reqs[0]])[0]
    pool = engine.runner.pool
    slot, n = first.slot, first.cached
    before = [(k[slot, :, :n].clone(), v[slot, :, :n].clone()) for k, v in zip(pool.keys, pool.values)]
    late = [engine.new_state(r) for r in reqs[1:]]
    engine.step([first] + late)                           # the newcomers' first (prefix-copied) step
    for (k0, v0), k, v in zip(before, pool.keys, pool.values):
        assert torch.equal(k0, k[slot, :, :n]) and torch.equal(v0, v[slot, :, :n])
    assert all(s.slot != slot for s in late)
    assert all(s.stats.cached_prompt_tokens >= 91 for s in late)
    states = [first] + late
    engine.run(states)
    for i, (state, want) in enumerate(zip(states, alone)):
        assert state.generated == want, f"request {i}"
        engine.release(state)


def test_a_released_slot_is_taken_over_in_place_when_no_slot_is_empty(models):
    engine = _engine(models, drafters=(), max_batch=2)
    prompts = _family(seed=9)
    b = engine.begin([GenerationRequest([1] + [5] * 40, max_new_tokens=4)])[0]
    a = engine.begin([GenerationRequest(prompts[0], max_new_tokens=4)])[0]
    engine.run([a, b])
    slot_a = a.slot
    assert slot_a > b.slot
    engine.release(a)
    engine.release(b)
    c = engine.begin([GenerationRequest(prompts[1], max_new_tokens=4)])[0]
    assert c.slot == slot_a, "the slot holding the shared prefix is handed out, not the lowest free one"
    assert c.stats.cached_prompt_tokens >= 91


def test_a_slot_taken_over_in_place_keeps_what_it_held_past_the_shared_part(models):
    """A newcomer sharing only the first part of what a released slot held (the same system
    prompt and sources, another question) takes that slot over in place; what the slot held past
    the shared part is copied out first, so the first prompt, asked again, is not prefilled."""
    engine = _engine(models, drafters=(), max_batch=1)
    prompts = _family(seed=9)
    first = engine.generate_one(GenerationRequest(prompts[0], max_new_tokens=4))
    other = engine.generate_one(GenerationRequest(prompts[2], max_new_tokens=4))
    shared = _common(prompts[0], prompts[2])
    assert 91 <= shared < len(prompts[0]) - 1
    assert other.stats.cached_prompt_tokens == shared, "taken over in place from the shared part"
    again = engine.generate_one(GenerationRequest(prompts[0], max_new_tokens=4))
    assert again.stats.cached_prompt_tokens == len(prompts[0]) - 1
    assert again.token_ids == first.token_ids


def test_an_empty_slot_gets_a_copy_and_the_released_one_keeps_its_prefix(models):
    engine = _engine(models, drafters=(), max_batch=4)
    prompts = _family(seed=9)
    a = engine.generate_one(GenerationRequest(prompts[0], max_new_tokens=4))
    c = engine.begin([GenerationRequest(prompts[2], max_new_tokens=4)])[0]
    assert c.slot == 1 and c.stats.cached_prompt_tokens >= 91           # copied out of slot 0
    engine.run([c])
    again = engine.generate_one(GenerationRequest(prompts[0], max_new_tokens=4))
    assert again.stats.cached_prompt_tokens == len(prompts[0]) - 1     # slot 0 still held all of it
    assert again.token_ids == a.token_ids


def test_an_overwritten_slot_is_not_reused_without_kept_prefixes(models):
    """With no room for kept prefixes, once a released slot is handed to an unrelated prompt,
    what it held is gone."""
    engine = _engine(models, drafters=(), max_batch=1, prefix_cache_mb=0)
    prompts = _family(seed=11)
    engine.generate_one(GenerationRequest(prompts[0], max_new_tokens=4))
    other = engine.generate_one(GenerationRequest([1] + [7] * 60, max_new_tokens=4))
    assert other.stats.cached_prompt_tokens == 0
    again = engine.generate_one(GenerationRequest(prompts[1], max_new_tokens=4))
    assert again.stats.cached_prompt_tokens == 0 and len(engine.kept) == 0
    assert again.token_ids == hf_greedy(models[0], prompts[1], 4)


def test_what_an_overwritten_slot_held_is_kept_and_restored_bit_for_bit(models):
    """One slot, turned over by an unrelated prompt: what it held is copied out first, and the
    repeat of the first prompt starts from that copy -- the same bits its prefill wrote, the
    same tokens as without the cache and as HF generate."""
    target = models[0]
    engine = _engine(models, drafters=(), max_batch=1)
    prompts = _family(seed=11)
    first = engine.generate_one(GenerationRequest(prompts[0], max_new_tokens=4))
    pool = engine.runner.pool
    n = len(prompts[0]) - 1
    written = [(k[0, :, :n].clone(), v[0, :, :n].clone()) for k, v in zip(pool.keys, pool.values)]
    other = engine.generate_one(GenerationRequest([1] + [7] * 60, max_new_tokens=4))
    assert other.stats.cached_prompt_tokens == 0 and len(engine.kept) == 1
    (entry,) = engine.kept.entries()
    assert entry.tokens[:len(prompts[0])] == prompts[0]
    for (k0, v0), k, v in zip(written, entry.keys, entry.values):
        assert torch.equal(k0, k[:, :n]) and torch.equal(v0, v[:, :n])
    again = engine.generate_one(GenerationRequest(prompts[1], max_new_tokens=4))
    assert again.stats.cached_prompt_tokens == n
    assert again.token_ids == first.token_ids
    assert_same_tokens(target, prompts[1], hf_greedy(target, prompts[1], 4), again.token_ids, "kept prefix")
    # the unrelated prompt went to the kept prefixes in turn (its slot was handed over again)
    assert any(e.tokens[:61] == [1] + [7] * 60 for e in engine.kept.entries())


def test_kept_prefixes_stay_within_their_budget_least_recently_used_first(models):
    engine = _engine(models, drafters=(), max_batch=1)
    # room for two ~64-token prompts, not three
    engine.kept.budget_bytes = engine.runner.pool.position_bytes * 150
    prompts = [[1] + [c] * 60 for c in (7, 8, 9, 10)]
    for p in prompts:
        engine.generate_one(GenerationRequest(p, max_new_tokens=2))
    assert engine.kept.nbytes <= engine.kept.budget_bytes
    kept = [e.tokens[1] for e in engine.kept.entries()]
    assert kept == [8, 9], "the two most recently overwritten prompts, oldest first"
    # the oldest kept entry is dropped for the slot's prompt (10s) -- after it was matched
    assert engine.generate_one(GenerationRequest(prompts[1], max_new_tokens=2)).stats.cached_prompt_tokens == 60
    assert engine.generate_one(GenerationRequest(prompts[0], max_new_tokens=2)).stats.cached_prompt_tokens == 0


def test_a_newcomer_overwrites_the_slot_released_longest_ago(models):
    engine = _engine(models, drafters=(), max_batch=2, prefix_cache_mb=0)
    a, b = engine.begin([GenerationRequest([1] + [7] * 40, max_new_tokens=2),
                         GenerationRequest([1] + [8] * 40, max_new_tokens=2)])
    engine.run([a, b])
    slot_a, slot_b = a.slot, b.slot
    engine.release(b)
    engine.release(a)                                   # b released first: b's slot goes first
    c = engine.begin([GenerationRequest([1] + [9] * 40, max_new_tokens=2)])[0]
    assert c.slot == slot_b
    again = engine.generate_one(GenerationRequest([1] + [7] * 40, max_new_tokens=2))
    assert again.stats.cached_prompt_tokens == 40, "the later-released prompt was still there"
    assert slot_a != slot_b


def test_an_evicted_sequence_restarts_from_the_cache(models):
    """A parked sequence evicted for a newcomer with the same sources gets its prefix back from
    the newcomer's slot when it steps again, and still gives its own tokens."""
    target = models[0]
    prompts = _family(seed=13)
    engine = _engine(models, drafters=(), max_batch=1)
    x = engine.begin([GenerationRequest(prompts[0], max_new_tokens=12, pause_at=4)])[0]
    engine.run([x])
    y = engine.begin([GenerationRequest(prompts[2], max_new_tokens=6)])[0]   # evicts x
    assert x.slot is None
    engine.run([y])
    x.pause_at = None
    engine.run([x])
    assert x.stats.prefills == 2 and x.stats.cached_prompt_tokens >= 91
    assert_same_tokens(target, prompts[0], hf_greedy(target, prompts[0], 12), x.generated, "evicted, resumed")


def test_reused_prefix_is_bitwise_a_prefill_on_the_batch_invariant_forward(models):
    """In bf16 on the batch-invariant forward the reused keys and values are the very bits a
    prefill computes, so the output is bitwise the uncached one and the next logits are equal."""
    target = copy.deepcopy(models[0]).to(torch.bfloat16)
    if not rows_are_invariant(target):
        pytest.skip("bf16 matmuls on this CPU compute a row differently with other rows beside it")
    prompts = _family(seed=17)
    tok = TinyTokenizer(VOCAB)
    cached = SpeculativeEngine(target, tok, None, EngineConfig(batch_invariant=True, drafters=("reference",)))
    plain = SpeculativeEngine(target, tok, None, EngineConfig(batch_invariant=True, drafters=("reference",),
                                                               prefix_cache=False))
    reqs = _requests(prompts[:4], target, ("reference",))
    for i, req in enumerate(reqs):
        a, b = cached.generate_one(req), plain.generate_one(req)
        assert a.token_ids == b.token_ids, f"request {i}"
    assert a.stats.cached_prompt_tokens >= 91
    # the cached slot's keys and values for the shared prefix equal a fresh prefill's, bitwise
    with torch.inference_mode():
        state = cached.new_state(GenerationRequest(prompts[1], max_new_tokens=1))
        fresh = plain.new_state(GenerationRequest(prompts[1], max_new_tokens=1))
        cached.step([state])
        plain.step([fresh])
        n = state.stats.cached_prompt_tokens
        assert n >= 91
        for k1, k2 in zip(cached.runner.pool.keys, plain.runner.pool.keys):
            assert torch.equal(k1[state.slot, :, :n], k2[fresh.slot, :, :n])
    assert state.generated == fresh.generated


def test_a_newcomer_waiting_for_room_picks_up_the_prefix_fed_meanwhile(models):
    """Two prompts sharing 91 tokens arrive together; the step's token budget feeds the first
    one's prompt in chunks while the second waits, and the second then starts from what the
    first has fed so far instead of prefilling the shared part itself."""
    target = models[0]
    prompts = _family(seed=19)
    a_prompt, b_prompt = prompts[0], prompts[2]
    engine = _engine(models, drafters=(), max_tokens_per_step=64, max_prefill_tokens=64)
    a, b = (engine.new_state(GenerationRequest(p, max_new_tokens=8)) for p in (a_prompt, b_prompt))
    engine.step([a, b])
    assert a.cached == 64 and b.cached == 0           # b waited for room
    engine.run([a, b])
    shared = _common(a_prompt, b_prompt)
    assert b.stats.cached_prompt_tokens == shared and b.stats.prefills == 1
    for s, p in ((a, a_prompt), (b, b_prompt)):
        assert_same_tokens(target, p, hf_greedy(target, p, 8), s.generated, "waited for room")


def _common(x, y):
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n
