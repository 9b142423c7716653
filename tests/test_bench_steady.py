"""The batching benchmark's steady window: what it counts, what it leaves out."""

import pytest

from bench_batching import _median_run, _open_loop, _steady


def test_steady_window_leaves_out_the_drain():
    # two clients, four requests of 10 tokens; the last request starts at 2 and runs alone
    # from 3 (the other client found nothing left): the drain, 3..5, is not in the window
    spans = [(0.0, 1.0, 10), (0.0, 2.0, 10), (1.0, 3.0, 10), (2.0, 5.0, 10)]
    t0, t1, tokens = _steady(spans, 2)
    assert (t0, t1) == (0.0, 3.0)
    # all of the first three, a third of the last (1 of its 3 s inside the window)
    assert tokens == pytest.approx(30 + 10 / 3)


def test_steady_rate_of_a_lockstep_run_is_its_whole_rate():
    # two waves of two requests finishing together: no drain, so the two rates agree
    spans = [(0.0, 2.0, 8), (0.0, 2.0, 8), (2.0, 4.0, 8), (2.0, 4.0, 8)]
    t0, t1, tokens = _steady(spans, 2)
    assert (t0, t1) == (0.0, 4.0)
    assert tokens / (t1 - t0) == pytest.approx(32 / 4)


def test_median_run_keeps_every_round():
    rounds = [{"tokens_per_s": x, "steady_tokens_per_s": x + 1, "p50_s": 1.0, "wall_s": 2.0, "answers": [str(x)]}
              for x in (3.0, 1.0, 2.0)]
    out = _median_run(rounds)
    assert out["tokens_per_s"] == 2.0 and out["steady_tokens_per_s"] == 3.0
    assert [r["tokens_per_s"] for r in out["rounds"]] == [3.0, 1.0, 2.0]
    assert out["answers"] == ["3.0", "1.0", "2.0"]


def test_open_loop_sends_when_due_not_when_answered():
    import time

    def send(q):
        time.sleep(0.2)           # answers take longer than the gaps between arrivals
        return q.upper(), {"generated_tokens": 4, "target_forwards": 2}

    questions = [f"q{i}" for i in range(8)]
    r = _open_loop(send, questions, rate=200.0, seed=1)
    assert r["answers"] == [q.upper() for q in questions]       # in the questions' order
    assert r["mean_in_flight"] > 2                               # overlapping, not one after another
    assert r["wall_s"] < 8 * 0.2 and r["tokens_per_forward"] == 2.0
