"""The cost model's choices on synthetic cost curves, and the measured curve's shape."""

import pytest

from speculation.cost import Acceptance, Candidate, CostCurve, choose_lengths


def _acceptance(rates: dict[tuple[str, int], float], n: int = 400) -> Acceptance:
    """Acceptance learned from n drafts of 16 tokens per (drafter, match length), each position
    accepted with the given conditional rate."""
    acc = Acceptance(prior_weight=0.0)
    for (name, match), rate in rates.items():
        for d in range(n):
            # deterministic: draft d accepts k tokens with frequency rate^k (1 - rate)
            k, u = 0, (d + 0.5) / n
            while k < 16 and u < rate ** (k + 1):
                k += 1
            acc.update(name, match, 16, k)
    return acc


def test_curve_interpolates_and_extrapolates():
    c = CostCurve([1, 4], [[1, 16], [4, 64]], [[0.04, 0.06], [0.05, 0.10]])
    assert c(1, 1) == pytest.approx(0.04)
    assert c(8, 1) == pytest.approx(0.04 + 0.02 * 7 / 15)
    assert c(32, 1) == pytest.approx(0.04 + 0.02 * 31 / 15)         # beyond the last point
    assert c(4, 2) == pytest.approx((c(4, 1) * 2 + c(4, 4)) / 3)     # between row counts


def test_flat_curve_drafts_long_even_on_short_matches():
    acc = _acceptance({("reference", 1): 0.6, ("reference", 5): 0.9})
    flat = CostCurve.synthetic(per_token=0.00005)
    lengths, _, _ = choose_lengths([Candidate("reference", 1, 16), Candidate("reference", 5, 16)], 2, 2, flat, acc)
    assert lengths[0] >= 6 and lengths[1] == 16


def test_steep_curve_drafts_only_long_matches():
    acc = _acceptance({("reference", 1): 0.3, ("reference", 5): 0.9})
    steep = CostCurve.synthetic(per_token=0.01, base=0.04)      # each drafted token costs 25% of a forward
    lengths, _, _ = choose_lengths([Candidate("reference", 1, 16), Candidate("reference", 5, 16)], 1, 1, steep, acc)
    assert lengths[0] == 0 and lengths[1] >= 4


def test_full_batch_drafts_nothing_when_it_does_not_pay():
    acc = _acceptance({("reference", 2): 0.5})
    # a full batch where every extra token costs as much as a row's whole step yields
    costly = CostCurve.synthetic(per_token=0.006, base=0.04, per_row=0.0)
    cands = [Candidate("reference", 2, 16)] * 16
    lengths, predicted, goodput = choose_lengths(cands, 16, 16, costly, acc)
    assert lengths == [0] * 16
    assert predicted == pytest.approx(costly(16, 16)) and goodput == pytest.approx(16 / costly(16, 16))
    # the same drafts at batch 1 on the same curve do pay
    alone, _, _ = choose_lengths([Candidate("reference", 2, 16)], 1, 1, costly, acc)
    assert alone[0] >= 1


def test_step_overhead_makes_drafts_pay_that_the_bare_forward_would_not():
    """A step costs the curve's forward plus what the engine does beside it (its own work, a
    longer context than the calibration's): that overhead dilutes a draft's extra cost, so the
    same acceptance drafts where the curve alone says no."""
    acc = _acceptance({("reference", 1): 0.15})
    steep = CostCurve.synthetic(per_token=0.01, base=0.04)     # a drafted token: +25 % of a forward
    cand = [Candidate("reference", 1, 16)]
    assert choose_lengths(cand, 1, 1, steep, acc)[0] == [0]
    lengths, predicted, goodput = choose_lengths(cand, 1, 1, steep, acc, overhead=0.1)
    assert lengths[0] >= 1
    # the predicted seconds stay the curve's forward (what the engine's estimate is learned against)
    assert predicted == pytest.approx(steep(1 + lengths[0], 1))
    assert goodput > 1 / (steep(1, 1) + 0.1)


def test_engine_learns_its_step_overhead_from_decode_steps():
    """The engine's estimate of the overhead is what its one-row decode steps took beyond the
    curve's prediction: a curve that predicts almost nothing gives an estimate near a real step's
    time; one that predicts more than a step takes gives 0 (never negative); batched steps
    neither teach it nor use it."""
    from speculation.engine import OVERHEAD_EWMA, EngineConfig, GenerationRequest, SpeculativeEngine
    from tinymodels import TinyTokenizer, tiny_llama

    target = tiny_llama(seed=0)
    for base, positive in ((1e-7, True), (10.0, False)):
        engine = SpeculativeEngine(target, TinyTokenizer(96), None,
                                   EngineConfig(drafters=("reference",),
                                                cost_curve=CostCurve.synthetic(per_token=1e-9, base=base)))
        assert engine.step_overhead == 0.0
        steps = []
        engine.on_step = steps.append
        engine.generate_one(GenerationRequest([1, 5, 9, 13, 17], [[5, 9, 13, 17, 21, 25]], max_new_tokens=12))
        assert any(s.prefill_rows == 0 for s in steps), "no decode step"
        expected = 0.0           # the estimate replayed from the step records: decode steps only
        for s in steps:
            if s.prefill_rows == 0 and s.predicted_seconds is not None and s.rows == 1:
                expected = max(0.0, (1 - OVERHEAD_EWMA) * expected + OVERHEAD_EWMA * (s.seconds - s.predicted_seconds))
        assert engine.step_overhead == pytest.approx(expected)
        assert (engine.step_overhead > 0.0) == positive
    # two requests in one batch: their shared steps leave the estimate where it was
    learned = engine.step_overhead = 0.5
    steps.clear()
    engine.generate([GenerationRequest([1, 5, 9, 13], [[5, 9, 13, 17, 21]], max_new_tokens=6),
                     GenerationRequest([1, 7, 11], [], max_new_tokens=6)])
    assert any(s.rows == 2 and s.prefill_rows == 0 for s in steps), "the requests never shared a decode step"
    for s in steps:           # only the steps one request ran alone move it
        if s.prefill_rows == 0 and s.predicted_seconds is not None and s.rows == 1:
            learned = max(0.0, (1 - OVERHEAD_EWMA) * learned + OVERHEAD_EWMA * (s.seconds - s.predicted_seconds))
    assert engine.step_overhead == pytest.approx(learned)


def test_acceptance_is_per_position_and_smoothed():
    acc = Acceptance(prior=0.5, prior_weight=2.0)
    assert acc.rates("reference", 3, 3) == [0.5, 0.5, 0.5]
    for _ in range(8):
        acc.update("reference", 3, 4, 2)       # positions 1, 2 accepted, 3 rejected, 4 never reached
    r = acc.rates("reference", 3, 4)
    # position 1 toward the prior, each later one toward the position before it; position 4,
    # never reached, is priced like position 3
    assert r[0] == pytest.approx(9 / 10) and r[1] == pytest.approx((8 + 2 * r[0]) / 10)
    assert r[2] == pytest.approx(2 * r[1] / 10) and r[3] == pytest.approx(r[2])
    assert acc.table()["reference/3"] == [1.0, 1.0, 0.0]
    assert acc.rates("reference", 5, 3) == [0.5, 0.5, 0.5]       # another bucket: the prior


def test_a_draft_goes_past_the_positions_measured_so_far_when_they_were_accepted():
    """Drafts of 4 tokens always accepted: positions 5-8, never reached, are priced like
    position 4, so on a curve where a token pays only above ~0.5 the cost model drafts 8 (a
    flat 0.5 prior stopped it at 4, and the positions past 4 were never measured)."""
    acc = Acceptance()
    for _ in range(20):
        acc.update("reference", 5, 4, 4)
    assert acc.rates("reference", 5, 8)[4:] == [pytest.approx(acc.rates("reference", 5, 4)[3])] * 4
    assert choose_lengths([Candidate("reference", 5, 8)], 1, 1, CostCurve.synthetic(0.008, base=0.04), acc)[0] == [8]


def _engine(curve=None, **config):
    from speculation.engine import EngineConfig, SpeculativeEngine
    from tinymodels import TinyTokenizer, tiny_llama

    cfg = EngineConfig(drafters=("reference",), **({"cost_curve": curve} if curve else {}), **config)
    return SpeculativeEngine(tiny_llama(seed=0), TinyTokenizer(96), None, cfg)


def test_engine_drafts_long_on_a_flat_curve_and_little_on_a_steep_one():
    """The same copying requests: a flat cost curve verifies long drafts, a steep one shorter
    ones, and both give the same tokens, with predicted step costs recorded."""
    from exactness import hf_greedy
    from speculation.engine import GenerationRequest
    from tinymodels import tiny_llama

    target = tiny_llama(seed=0)
    prompts = [[1, 20 + i, 21, 22, 23] for i in range(6)]
    outs = {}
    for name, curve in (("flat", CostCurve.synthetic(per_token=1e-6)), ("steep", CostCurve.synthetic(per_token=0.02))):
        engine = _engine(curve)
        res = [engine.generate_one(GenerationRequest(p, [p[-2:] + hf_greedy(target, p, 30)], max_new_tokens=30))
               for p in prompts]
        outs[name] = res
        assert all(r.stats.predicted_seconds > 0 for r in res)
    assert [r.token_ids for r in outs["flat"]] == [r.token_ids for r in outs["steep"]]
    def mean_draft(name):
        return (sum(r.stats.draft_tokens for r in outs[name])
                / max(1, sum(d.steps for r in outs[name] for d in r.stats.by_drafter.values())))

    # the references are right, so both draft; the flat curve's drafts are longer
    assert mean_draft("flat") > 1.5 * mean_draft("steep"), (mean_draft("flat"), mean_draft("steep"))
    assert sum(r.stats.target_forwards for r in outs["flat"]) < sum(r.stats.target_forwards for r in outs["steep"])


@pytest.mark.measured_cost
def test_measured_curve_is_cached_per_machine(tmp_path, monkeypatch):
    """The curve is measured once and read back from the cache (no second measurement)."""
    import speculation.cost as cost

    monkeypatch.setenv("SPECRAG_CACHE_DIR", str(tmp_path))
    calls = []
    real = cost.measure
    monkeypatch.setattr(cost, "measure", lambda runner, **kw: calls.append(1) or real(runner, rows=(1, 2),
                                                                                         tokens=(1, 4), passes=1))
    first = _engine()
    second = _engine()
    assert len(calls) == 1
    assert first.cost.rows == second.cost.rows == [1, 2] and first.cost(4, 1) > 0
    # the attention's price per cached position, measured at a second context on a pool of its own
    assert first.cost.per_position == second.cost.per_position >= 0
    assert first.runner.pool.length < cost.CALIBRATION_LONG_CONTEXT       # the engine's pool did not grow to it
    assert list((tmp_path / "cost").glob("*.json"))


def test_draft_cost_beyond_the_curve_makes_a_batch_draft_less():
    """A slope per draft token on top of the curve (what ragged rows really cost) prices drafts
    out that the curve alone would take; the predicted seconds stay the curve's."""
    acc = _acceptance({("reference", 2): 0.6})
    flat = CostCurve.synthetic(per_token=0.001, base=0.2)
    cands = [Candidate("reference", 2, 8)] * 4 + [None] * 12
    free, _, _ = choose_lengths(cands, 16, 16, flat, acc)
    assert sum(free) > 0
    priced, predicted, _ = choose_lengths(cands, 16, 16, flat, acc, per_draft=0.05)
    assert sum(priced) < sum(free)
    assert predicted == pytest.approx(flat(16 + sum(priced), 16))


def test_a_longer_context_prices_every_fed_token_and_a_batch_drafts_less_there():
    """The curve is measured at a short context; its per-position price adds each fed token's
    attention over the positions past it, so at a RAG request's context the same drafts cost
    more and fewer pay."""
    acc = _acceptance({("reference", 2): 0.65})
    curve = CostCurve.synthetic(per_token=0.002, base=0.03, per_position=3e-6)
    assert curve(16, 16) == pytest.approx(curve(16, 16, context=100))          # at or below: the grid's
    assert curve(16, 16, context=756) == pytest.approx(curve(16, 16) + 3e-6 * 16 * 500)
    cands = [Candidate("reference", 2, 8)] * 16
    short, predicted_short, _ = choose_lengths(cands, 16, 16, curve, acc, context=256)
    long, predicted_long, _ = choose_lengths(cands, 16, 16, curve, acc, context=1256)
    assert sum(short) > sum(long)
    assert predicted_long == pytest.approx(curve(16 + sum(long), 16, context=1256))
    # a curve without the price (measured before it existed, or synthetic) ignores the context
    flat = CostCurve.synthetic(per_token=0.002, base=0.03)
    assert choose_lengths(cands, 16, 16, flat, acc, context=1256)[0] == choose_lengths(cands, 16, 16, flat, acc)[0]
    assert CostCurve.from_json(curve.to_json()).per_position == curve.per_position


def test_the_curve_key_changes_with_how_idle_openmp_threads_wait(monkeypatch):
    """A curve measured under OMP_WAIT_POLICY=PASSIVE (as the test suite once ran) prices every forward's
    parallel regions with a sleep and a wake-up: a serving process must not read it."""
    from tinymodels import tiny_llama

    from speculation.cost import curve_key

    model = tiny_llama(seed=0)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    default = curve_key(model, "float32", "cpu", "k")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    passive = curve_key(model, "float32", "cpu", "k")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert len({default, passive, curve_key(model, "float32", "cpu", "k")}) == 3


def test_step_residual_fits_overhead_and_slope_and_forgets_an_unmeasurable_slope():
    from speculation.cost import StepResidual

    res = StepResidual(weight=0.2)
    assert res.terms(8) == (0.0, 0.0)
    for i in range(200):
        drafted = (i * 7) % 11
        res.update(8, drafted, 0.03 + 0.004 * drafted)
    a, b = res.terms(8)
    assert a == pytest.approx(0.03, abs=1e-6) and b == pytest.approx(0.004, abs=1e-6)
    assert res.terms(6) == (a, b)                # same bucket (5-8 rows)
    assert res.terms(16) == (0.0, 0.0)           # another bucket learned nothing
    for _ in range(60):                          # drafting stopped: the slope cannot be measured
        res.update(8, 0, 0.03)
    a, b = res.terms(8)
    assert b < 0.004 * 0.01 and a == pytest.approx(0.03, abs=1e-3)
    res.update(2, 3, -1.0)                       # a curve that overprices: no negative terms
    assert res.terms(2) == (0.0, 0.0)


def test_engine_fits_the_batch_residual_from_shared_steps_only():
    """Batched decode steps teach the residual fit (with the curve's price of the tokens they
    actually fed); one-row steps and prefill steps do not."""
    from speculation.engine import GenerationRequest

    engine = _engine(CostCurve.synthetic(per_token=1e-9, base=1e-7))
    steps = []
    engine.on_step = steps.append
    engine.generate_one(GenerationRequest([1, 5, 9, 13, 17], [[5, 9, 13, 17, 21, 25]], max_new_tokens=8))
    assert engine.batch_residual.steps == 0
    engine.generate([GenerationRequest([1, 5, 9, 13], [[5, 9, 13, 17, 21]], max_new_tokens=8),
                     GenerationRequest([1, 7, 11], [], max_new_tokens=8)])
    shared = [s for s in steps if s.rows > 1 and s.prefill_rows == 0]
    assert shared and engine.batch_residual.steps == len(shared)
    overhead, slope = engine.batch_residual.terms(2)
    assert overhead > 0.0 and slope >= 0.0       # a real step costs more than a 100-ns curve


def test_a_batch_whose_drafts_never_pay_stops_proposing_them_and_resumes_where_they_do():
    """Proposing costs every row a lookup; where the cost model keeps taking none of a batch's
    drafts (a steep curve), the batch pauses its proposals, for longer each time, with the same
    output; on a flat curve it proposes at every step."""
    from exactness import hf_greedy
    from speculation.cost import StepResidual
    from speculation.engine import PROPOSAL_PAUSE_MAX, GenerationRequest
    from tinymodels import tiny_llama

    target = tiny_llama(seed=0)
    # prompts whose greedy answers run the whole 40 tokens (no EOS): 4 rows share every step
    prompts = [p for p in ([1, 30 + i, 31 + i % 3, 32, 33] for i in range(40)) if len(hf_greedy(target, p, 40)) == 40][:4]
    assert len(prompts) == 4
    reqs = [GenerationRequest(p, [p[-2:] + hf_greedy(target, p, 40)], max_new_tokens=40) for p in prompts]
    outs, proposals = {}, {}
    for name, curve in (("steep", CostCurve.synthetic(per_token=0.5, base=0.01)),
                        ("flat", CostCurve.synthetic(per_token=1e-6))):
        engine = _engine(curve)
        real = engine.drafters["reference"].propose_batch
        calls = proposals[name] = []

        def spy(states, limits, real=real, calls=calls):
            if len(states) > 1:
                calls.append(len(states))
            return real(states, limits)

        engine.drafters["reference"].propose_batch = spy
        steps = []
        engine.on_step = steps.append
        outs[name] = [r.token_ids for r in engine.generate(reqs)]
        batched = [s for s in steps if s.rows > 1 and s.prefill_rows == 0]
        if name == "steep":
            # proposals at steps 1, 3, 6, 11, ... (pauses of 1, 2, 4, 8, ...): a few, not one per step
            assert 2 <= len(calls) <= 7 < len(batched), (len(calls), len(batched))
            assert 1 < engine._proposal_pause[StepResidual.bucket(4)][1] <= PROPOSAL_PAUSE_MAX
        else:
            assert len(calls) >= len(batched) - 1
    assert outs["steep"] == outs["flat"] == [hf_greedy(target, p, 40) for p in prompts]


def test_measured_gain_compares_steps_with_and_without_drafts_per_row_count():
    from speculation.cost import MeasuredGain

    gain = MeasuredGain(weight=0.5, explore_every=3)
    gain.update(1, 4, 5, 0.01)                          # one row: not a batch, not measured
    assert gain.speeds(1) == (None, None)
    gain.update(4, 6, 10, 0.02)                         # 500 tokens/s with drafts
    assert gain.speeds(4) == (500.0, None) and not gain.loses(4)   # nothing to compare with yet
    gain.update(4, 0, 4, 0.005)                         # 800 without
    assert gain.loses(4) and not gain.loses(8)
    gain.update(4, 6, 12, 0.01)                         # 1200: EWMA 850
    assert gain.speeds(4) == (850.0, 800.0) and not gain.loses(4)
    # a run of drafting steps at a row count asks for one without, which ends the run
    assert not gain.explore(4)
    gain.update(4, 6, 12, 0.01)
    gain.update(4, 6, 12, 0.01)
    assert gain.explore(4) and not gain.explore(8)
    gain.update(4, 0, 4, 0.005)
    assert not gain.explore(4)


def test_a_batch_whose_drafts_measure_slower_stops_drafting_with_the_same_output():
    """The cost model is told drafts are free (a flat curve, and its residual fit kept from
    learning otherwise: an error of the model it cannot see) and every draft is right, but each
    drafted token really costs the forward 20 ms: steps with drafts commit fewer tokens per
    second than steps without. Measured (``MeasuredGain``, exploring every other drafting step
    here), the batch stops proposing, for longer each time; where drafts cost what the curve
    says, it keeps drafting. Both give HF greedy's tokens."""
    import time

    from exactness import hf_greedy
    from speculation.cost import MeasuredGain
    from speculation.engine import GenerationRequest
    from tinymodels import tiny_llama

    target = tiny_llama(seed=0)
    prompts = [p for p in ([1, 30 + i, 31 + i % 3, 32, 33] for i in range(40)) if len(hf_greedy(target, p, 60)) == 60][:4]
    assert len(prompts) == 4
    want = [hf_greedy(target, p, 60) for p in prompts]
    reqs = [GenerationRequest(p, [p[-2:] + w], max_new_tokens=60) for p, w in zip(prompts, want)]
    drafting = {}
    for name, per_draft in (("dear drafts", 0.02), ("free drafts", 0.0)):
        engine = _engine(CostCurve.synthetic(per_token=1e-6), max_draft_tokens=2)      # many steps per request
        engine.measured_gain = MeasuredGain(explore_every=2)
        engine.batch_residual.update = lambda *args: None
        forward = engine.runner.forward

        def slowed(rows, forward=forward, per_draft=per_draft):
            time.sleep(per_draft * (sum(len(r.tokens) for r in rows) - len(rows)))
            return forward(rows)

        engine.runner.forward = slowed
        steps = []
        engine.on_step = steps.append
        assert [r.token_ids for r in engine.generate(reqs)] == want
        batched = [s for s in steps if s.rows == 4 and s.prefill_rows == 0]
        drafting[name] = sum(1 for s in batched if s.drafted) / len(batched)
        if name == "dear drafts":
            with_drafts, without = engine.measured_gain.speeds(4)
            assert with_drafts < without
    assert drafting["dear drafts"] < 0.5 < drafting["free drafts"], drafting
