"""The batched engine: many sequences in one forward give each the tokens it gives alone.

Every greedy output is compared with its batch-1 output and with Hugging Face ``generate``
(``exactness.assert_same_tokens`` reports a divergence at a near-tie with its logit gap);
sampled rows share the batch and are checked in distribution by test_sampling_engine."""

import random
import threading
import time

import pytest
import torch

from exactness import assert_same_tokens, hf_greedy
from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.errors import GenerationInputError
from speculation.scheduler import EngineLoop, LoopEngine, RequestCancelled
from speculation.verify import SamplingParams
from tinymodels import TinyTokenizer, tiny_llama

VOCAB = 96
DRAFTERS = [(), ("reference",), ("prompt_lookup",), ("draft_model",), ("reference", "draft_model")]


@pytest.fixture(scope="module")
def models():
    return tiny_llama(seed=0), tiny_llama(seed=1)


def _engine(models, **config):
    target, draft = models
    return SpeculativeEngine(target, TinyTokenizer(VOCAB), draft, EngineConfig(min_ngram=1, **config))


def _mixed_requests(target, n=20, seed=7):
    """Prompts of 2-120 tokens; every drafter; references that are right, half right, wrong or
    absent; limits that fall inside accepted drafts; EOS; stop strings; a few sampled rows."""
    rng = random.Random(seed)
    tok = TinyTokenizer(VOCAB)
    cases = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.choice([2, 9, 30, 120]))]
        oracle = hf_greedy(target, prompt, 40)
        kind = i % 4
        if kind == 0:
            refs = [oracle]
        elif kind == 1:
            cut = rng.randrange(1, 10)
            refs = [oracle[:cut] + [rng.randrange(3, VOCAB)] + oracle[cut + 1:]]
        elif kind == 2:
            refs = [[rng.randrange(3, VOCAB) for _ in range(30)]]
        else:
            refs = []
        max_new = rng.choice([1, 3, 17, 40])
        stop = []
        if i % 5 == 4 and 2 not in oracle[:12]:
            stop = [tok.decode(oracle[8:10])]
        sampled = i % 7 == 6
        req = GenerationRequest(prompt, refs, max_new_tokens=max_new, drafters=DRAFTERS[i % len(DRAFTERS)],
                                stop=stop, seed=100 + i,
                                sampling=SamplingParams(temperature=0.9, top_k=20) if sampled else SamplingParams())
        cases.append((req, oracle))
    return cases


def _hf_expected(oracle, req, tok):
    expected = oracle[:req.max_new_tokens]
    for s in req.stop:      # generation stops at the token that completes the stop string
        for j in range(1, len(expected) + 1):
            if s in tok.decode(expected[:j]):
                return expected[:j]
    return expected


def test_batched_generate_matches_batch1_and_hf(models):
    target, _ = models
    tok = TinyTokenizer(VOCAB)
    cases = _mixed_requests(target)
    # no kept prefixes: the batched run prefills as the batch-1 run did (restored prompts would
    # change the step mix the cost model sizes drafts on, and which drafters it takes)
    engine = _engine(models, prefix_cache_mb=0)
    alone = [engine.generate_one(req) for req, _ in cases]
    steps = []
    engine.on_step = steps.append
    together = engine.generate([req for req, _ in cases])
    assert max(s.rows for s in steps) >= 16, "the requests never shared a forward"
    for n, ((req, oracle), a, b) in enumerate(zip(cases, alone, together)):
        if not req.sampling.greedy:
            # exact in distribution (test_sampling_engine), but not seed-for-seed: how many
            # tokens a row drafts -- and so draws -- depends on the step's token budget
            assert 1 <= len(b.token_ids) <= req.max_new_tokens
            continue
        assert b.token_ids == a.token_ids, f"case {n}: batched output differs from batch 1"
        assert b.finish_reason == a.finish_reason
        assert b.text == a.text
        assert_same_tokens(target, req.prompt_ids, _hf_expected(oracle, req, tok), b.token_ids, f"case {n}")
    assert sum(r.stats.accepted_tokens for r in together) > 0
    assert {d for r in together for d in r.stats.by_drafter} == {"reference", "prompt_lookup", "draft_model"}
    # the step records account for every draft token and acceptance the requests report
    assert sum(s.drafted for s in steps) == sum(r.stats.draft_tokens for r in together)
    assert sum(s.accepted for s in steps) == sum(r.stats.accepted_tokens for r in together)
    assert all(0 <= s.accepted <= s.drafted for s in steps)


def test_loop_requests_join_leave_and_cancel(models):
    """Requests submitted from many threads at different times step together; a cancelled one
    frees its slot at once and the others are unaffected."""
    target, _ = models
    cases = _mixed_requests(target, n=18, seed=11)
    engine = _engine(models)
    alone = [engine.generate_one(req).token_ids if req.sampling.greedy else None for req, _ in cases]
    loop = EngineLoop(engine)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    steps = []
    step_seen = threading.Event()

    def on_step(rec):
        loop.stats.observe(rec)
        steps.append(rec)
        if len(steps) >= 3:
            step_seen.set()
    engine.on_step = on_step

    def client(i):
        try:
            results[i] = loop.generate(cases[i][0]).token_ids
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    # hold the loop thread until the first ten are queued, so that they join in one step (these
    # tiny requests take a few milliseconds: threads starting one by one need not overlap)
    entered, gate = threading.Event(), threading.Event()

    def hold():
        entered.set()
        gate.wait(30)
    blocker = threading.Thread(target=loop.call, args=(hold,))
    blocker.start()
    assert entered.wait(30)
    first = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in first:
        t.start()
    long = loop.submit(GenerationRequest([1, 5, 6, 7], [], max_new_tokens=400))
    deadline = time.monotonic() + 30
    while loop.pending() < 11 and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    blocker.join(30)
    assert step_seen.wait(30)
    late = [threading.Thread(target=client, args=(i,)) for i in range(10, 18)]   # join mid-run
    for t in late:
        t.start()
    long.cancel()
    with pytest.raises(RequestCancelled):
        long.result(30)
    for t in first + late:
        t.join(60)
    loop.close()
    assert not errors, errors
    for i in range(18):
        if alone[i] is not None:
            assert results[i] == alone[i], f"request {i}: output in the loop differs from batch 1"
    assert max(s.rows for s in steps) >= 8
    assert len(engine.slots) == 0, "finished and cancelled requests must give their slots back"


def test_one_rows_rollback_leaves_other_rows_cache_bit_identical(models):
    target, _ = models
    engine = _engine(models)
    a_prompt, b_prompt = [1, 5, 6, 7, 8], [1, 30, 31, 32]
    # every token is in the reference, followed by its successor: A drafts at every step, and
    # the drafts are (nearly always) wrong, so A's row is rolled back
    wrong = [list(range(3, VOCAB)) * 2]
    a, b = engine.begin([GenerationRequest(a_prompt + [9], wrong, max_new_tokens=30, drafters=("reference",)),
                         GenerationRequest(b_prompt, [], max_new_tokens=30, drafters=())])
    pool = engine.runner.pool
    for _ in range(5):
        snap = [(k[b.slot, :, :b.cached].clone(), v[b.slot, :, :b.cached].clone())
                for k, v in zip(pool.keys, pool.values)]
        drafted = a.stats.draft_tokens
        engine.step([a, b])
        assert a.stats.draft_tokens > drafted
        for (k0, v0), k, v in zip(snap, pool.keys, pool.values):
            assert torch.equal(k0, k[b.slot, :, :k0.shape[1]]) and torch.equal(v0, v[b.slot, :, :v0.shape[1]])
    assert a.stats.accepted_tokens < a.stats.draft_tokens
    whole = [(k[b.slot].clone(), v[b.slot].clone()) for k, v in zip(pool.keys, pool.values)]
    engine.truncate(a, 2)
    engine.step([a])                # A alone: B's slot is not even read
    for (k0, v0), k, v in zip(whole, pool.keys, pool.values):
        assert torch.equal(k0, k[b.slot]) and torch.equal(v0, v[b.slot])
    engine.run([a, b])
    assert_same_tokens(target, b_prompt, hf_greedy(target, b_prompt, 30), b.generated, "B")
    assert_same_tokens(target, a_prompt + [9], hf_greedy(target, a_prompt + [9], 30), a.generated, "A")


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(models):
    target, _ = models
    engine = _engine(models, max_tokens_per_step=64)
    short = GenerationRequest([1, 40, 41], [], max_new_tokens=30, drafters=())
    (s,) = engine.begin([short])
    rng = random.Random(3)
    long_prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(300)]
    l_state = engine.new_state(GenerationRequest(long_prompt, [], max_new_tokens=10, drafters=()))
    before = len(s.generated)
    engine.run([s, l_state])
    assert l_state.stats.prefills == 1 and l_state.stats.target_forwards >= 300 // 64
    # the short one kept decoding while the long prompt went in: one token per chunk step
    assert s.stats.target_forwards - 1 >= l_state.stats.target_forwards - 1
    assert len(s.generated) > before
    assert_same_tokens(target, long_prompt, hf_greedy(target, long_prompt, 10), l_state.generated, "long")
    assert_same_tokens(target, [1, 40, 41], hf_greedy(target, [1, 40, 41], 30), s.generated, "short")


def test_slots_are_evicted_least_recently_used_and_refilled(models):
    """With 2 slots and 3 sequences, the parked one loses its KV and re-prefills when it comes
    back -- with the same tokens."""
    target, _ = models
    engine = _engine(models, max_batch=2)
    prompts = [[1, 10 + i, 11, 12] for i in range(3)]
    x, y = engine.begin([GenerationRequest(p, [], max_new_tokens=20, drafters=(), pause_at=5) for p in prompts[:2]])
    engine.run([x, y])
    (z,) = engine.begin([GenerationRequest(prompts[2], [], max_new_tokens=20, drafters=())])
    assert x.slot is None and x.cached == 0, "the least recently used sequence is evicted"
    x.pause_at = y.pause_at = None
    engine.run([z])
    engine.run([x, z] if not z.finished else [x])
    engine.run([y])
    assert x.stats.prefills == 2
    for p, st in zip(prompts, (x, y, z)):
        assert_same_tokens(target, p, hf_greedy(target, p, 20), st.generated, f"prompt {p}")
    with pytest.raises(RuntimeError, match="slots"):
        engine.slots.acquire(object(), busy={id(engine.slots.owner(0)), id(engine.slots.owner(1))})


def test_loop_engine_runs_the_step_api_on_the_loop_thread(models):
    """The iterative pipeline's calls (begin / run / truncate / extend / release) through the
    loop, interleaved with other requests, give the same tokens as the engine driven directly."""
    target, _ = models
    engine = _engine(models)
    loop = EngineLoop(engine)
    view = LoopEngine(loop)
    prompt = [1, 60, 61, 62]
    expected = hf_greedy(target, prompt, 30)
    other = loop.submit(GenerationRequest([1, 70, 71], [], max_new_tokens=40))
    (state,) = view.begin([GenerationRequest(prompt, [prompt[-3:] + expected], max_new_tokens=30, pause_at=4,
                                             draft_past_pause=True)])
    while not state.finished:
        state.pause_at = len(state.generated) + 4
        view.run([state])
    assert_same_tokens(target, prompt, expected, state.generated, "paused in the loop")
    view.truncate(state, 6)
    view.run([state])
    assert_same_tokens(target, prompt, expected, state.generated, "truncated in the loop")
    view.release(state)
    assert other.result(30).token_ids == hf_greedy(target, [1, 70, 71], 40)
    loop.close()


def test_bad_requests_fail_alone(models):
    engine = _engine(models)
    loop = EngineLoop(engine)
    good = loop.submit(GenerationRequest([1, 5, 6], [], max_new_tokens=5))
    bad = loop.submit(GenerationRequest([], [], max_new_tokens=5))
    unknown = loop.submit(GenerationRequest([1, 5], [], max_new_tokens=5, drafters=("lookahead",)))
    with pytest.raises(GenerationInputError, match="empty prompt"):
        bad.result(30)
    with pytest.raises(GenerationInputError, match="unknown drafter"):
        unknown.result(30)
    target, _ = models
    assert good.result(30).token_ids == hf_greedy(target, [1, 5, 6], 5)
    loop.close()
    no_draft = SpeculativeEngine(target, TinyTokenizer(VOCAB), None, EngineConfig())
    with pytest.raises(GenerationInputError, match="needs a draft model"):
        no_draft.generate_one(GenerationRequest([1, 5], [], max_new_tokens=3, drafters=("draft_model",)))


def test_callback_error_ends_its_row_only(models):
    engine = _engine(models)
    loop = EngineLoop(engine)

    def boom(_state, _ids, _delta):
        raise KeyError("client went away")
    bad = loop.submit(GenerationRequest([1, 5, 6, 7], [], max_new_tokens=30), on_commit=boom)
    good = loop.submit(GenerationRequest([1, 8, 9], [], max_new_tokens=30))
    with pytest.raises(KeyError):
        bad.result(30)
    target, _ = models
    assert good.result(30).token_ids == hf_greedy(target, [1, 8, 9], 30)
    loop.close()


def test_short_rows_share_attention_calls_where_one_call_is_cheaper():
    """Length buckets scattered over the pool merge into one padded call (each call reads every
    slot in its range); a lone long draft beside many decode rows keeps its own call."""
    from speculation.forward import Row, _short_groups

    def rows(lens, start=100):
        return [Row(slot, start, [1] * n, 0) for slot, n in enumerate(lens)]

    assert _short_groups(rows([2, 1, 5, 1, 2, 1, 1, 5])) == [list(range(8))]
    assert _short_groups(rows([1] * 15 + [9])) == [list(range(15)), [15]]
    # rows in separate parts of the pool: no call spans the other's slots
    lone = [Row(0, 100, [1], 0), Row(15, 100, [1] * 3, 0)]
    assert _short_groups(lone) == [[0], [1]]
    # rows too long to pad anybody to: not in any short call
    assert _short_groups([Row(0, 0, [1] * 40, 0), Row(1, 5, [1], 0)]) == [[1]]


@pytest.mark.parametrize("layout", [
    [(0, 4), (1, 3)],            # one bucket, slot order, the last row shorter: padding at the end
    [(0, 1), (1, 1), (2, 1)],    # a decode batch in slot order: no padding at all
    [(2, 2), (0, 2)],            # slots out of order
    [(1, 1)],                    # a lone decode token
    [(0, 1), (2, 1)],            # a gap between the slots
    [(3, 5)],                    # a lone row of drafts
    [(0, 1), (1, 5), (2, 2), (3, 1)],   # decode rows and drafts interleaved: one call, padded to 5
])
def test_pooled_forward_equals_hf_forward_for_every_row_layout(models, layout):
    """Each row's logits from one pooled forward equal HF's forward of that row's whole sequence,
    whatever the rows' slots, order and lengths (the attention's fast paths and its padded path)."""
    from speculation.forward import PooledModel, Row

    target, _ = models
    runner = PooledModel(target, 4)
    rng = random.Random(len(layout) * 10 + layout[0][1])
    seqs, rows = [], []
    with torch.inference_mode():
        for slot, n in layout:
            prefix = [1] + [rng.randrange(3, VOCAB) for _ in range(2 + 2 * slot)]
            new = [rng.randrange(3, VOCAB) for _ in range(n)]
            runner.forward([Row(slot, 0, prefix, len(prefix))])          # its cached prefix
            seqs.append((prefix, new))
            rows.append(Row(slot, len(prefix), new, 0))
        logits = runner.forward(rows)
        at = 0
        for (prefix, new), row in zip(seqs, rows):
            expected = target(input_ids=torch.tensor([prefix + new])).logits[0, len(prefix):].float()
            got = logits[at:at + len(new)]
            at += len(new)
            assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (layout, row.slot, (got - expected).abs().max())
