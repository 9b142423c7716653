"""Suite-wide settings: nothing may reach a model hub while testing."""

import os
import sys
from pathlib import Path

# The one place the tests go offline: set here for the test process, inherited from it by every
# process a test starts (deploy_helpers.subprocess_env starts from os.environ).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# test helpers (tiny models) and the question lists shared with the benchmarks
# (benchmarks/questions.py) importable as plain modules
sys.path.insert(0, str(Path(__file__).parent / "speculation"))
sys.path.append(str(Path(__file__).parents[1] / "benchmarks"))   # last: shadows nothing


import pytest  # noqa: E402

# Each extra token fed costs 5% of a 40 ms forward: the shape of a real model's measured curve
# (SmolLM2-135M in bf16 on AMX: 43 ms for 1 token, 62 ms for 32).
PINNED_CURVE = {"per_token": 0.002, "base": 0.04}


@pytest.fixture(autouse=True)
def _pinned_cost_curve(request, monkeypatch):
    """Engines on the tiny seeded test models get a fixed cost curve instead of the one measured
    on this machine. Their forward costs ~1 ms, so timer noise and fixed Python overhead decide
    their measured curve: on one machine a 2-token forward measured 3x a 1-token one, the cost
    model (rightly, for that curve) never drafted, and the tests of the drafting paths proved
    nothing. Tests marked ``measured_cost`` keep the measured curve; real models always do."""
    if request.node.get_closest_marker("measured_cost"):
        return
    engine = sys.modules.get("speculation.engine")
    if engine is None:
        return
    from speculation.cost import CostCurve

    measured = engine.load_or_measure

    def pinned(runner, remeasure=False):
        if getattr(runner.model.config, "hidden_size", 1024) < 256:
            return CostCurve.synthetic(**PINNED_CURVE)
        return measured(runner, remeasure)

    monkeypatch.setattr(engine, "load_or_measure", pinned)
