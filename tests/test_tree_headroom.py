"""The drafting replay of benchmarks/tree_headroom.py, with and without the cost model."""

import pytest

from speculation.cost import Acceptance, CostCurve
from tree_headroom import replay, replay_costed

# the answer copies the reference past the prompt's last three tokens, then writes its own
REF = list(range(100, 140))
PROMPT = [1, 2, 100, 101, 102]
ANSWER = list(range(103, 125)) + [7, 8, 9]


def test_a_free_verification_lets_the_cost_model_draft_what_the_replay_drafts():
    bound = replay("chain", {}, PROMPT, [REF], ANSWER)
    costed = replay_costed("chain", {}, PROMPT, [REF], ANSWER, [], CostCurve.synthetic(0.0, base=0.04),
                           Acceptance(), 0.0)
    assert costed["steps"] == bound["steps"] < len(ANSWER)
    assert costed["accepted"] == bound["accepted"] == len(ANSWER) - bound["steps"]
    assert costed["seconds"] == pytest.approx(bound["steps"] * 0.04)


def test_a_dear_verification_drafts_nothing():
    costed = replay_costed("chain", {}, PROMPT, [REF], ANSWER, [], CostCurve.synthetic(1.0, base=0.04),
                           Acceptance(), 0.0)
    assert costed["steps"] == len(ANSWER) and costed["drafted"] == costed["accepted"] == 0


def test_the_costed_tree_replay_reads_earlier_answers():
    """A question whose answer an earlier one wrote: with the history the tree drafts it."""
    opts = {"max_nodes": 32, "history": True, "best_path": True}
    curve = CostCurve.synthetic(0.0, base=0.04)
    alone = replay_costed("tree", opts, [5, 6], [], ANSWER, [], curve, Acceptance(), 0.0)
    with_history = replay_costed("tree", opts, [5, 6], [], ANSWER, [[5, 6] + ANSWER], curve, Acceptance(), 0.0)
    assert with_history["steps"] < alone["steps"]
