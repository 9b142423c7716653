"""How much to speculate: the target forward's cost measured on this machine, and a goodput rule
that sizes every row's draft from the drafters' measured acceptance.

A step commits, per row, one token plus the accepted part of its draft, and costs one forward
whose time depends on the tokens fed and the rows held. The rule (SmartSpec / TurboSpec's
goodput, see REFERENCES.md) picks the draft lengths that maximise the expected committed tokens
per second of the whole step:

    goodput(k_1..k_R) = (R + sum_r E[accepted_r(k_r)]) / cost(T_0 + sum_r k_r, R)

with E[accepted(k)] = sum_{i<=k} prod_{j<=i} a_j, a_j the measured probability that draft
position j is accepted given that the ones before it were (per drafter, and per suffix-match
length for the reference drafter). The marginal gain of a row's next draft token only falls
with k, so taking draft tokens in order of marginal gain and stopping at the best total is
exact for this objective. A draft tree is the same with its nodes as the tokens: a node's gain
is the chance the accepted path reaches its depth times its share of the matches, never more
than its parent's, so nodes taken in order of gain always form a tree. Where verification is nearly free (bf16 on AMX, a GPU) drafts grow;
where a multi-token forward is dear (fp32 on a CPU) only likely drafts are made; in a full batch
that costs more per token, none. Speed only: verification decides every token.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import logging
import operator
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CALIBRATION_ROWS = (1, 2, 4, 8, 16)
CALIBRATION_TOKENS = (1, 2, 4, 8, 16)          # per row (a draft of 16 + the pending token)
CALIBRATION_CONTEXT = 256
CALIBRATION_LONG_CONTEXT = 768      # the second context, for the per-position (attention) price
PER_POSITION_SHAPE = (4, 4)         # rows x tokens per row timed at both contexts
CURVE_VERSION = "v3"                # v2: per_position; v3: weights in memory of their own (models.own_weights)


@dataclass
class CostCurve:
    """Seconds of one target forward by rows and total tokens fed: per measured row count a
    piecewise-linear curve in tokens (extrapolated from its last two points), interpolated
    linearly between row counts."""

    rows: list[int]
    tokens: list[list[int]]          # per row count, ascending totals
    seconds: list[list[float]]
    meta: dict[str, Any] = field(default_factory=dict)
    # seconds each fed token costs per cached position past the context the grid was measured
    # at (``meta["context"]``): its attention, which the grid's short context underprices at a
    # RAG request's context (16 rows x 1 token at 700 tokens: ~1 ms more per token on a 2-core EPYC)
    per_position: float = 0.0

    def __call__(self, tokens: int, rows: int, context: float | None = None) -> float:
        """Seconds of a forward feeding ``tokens`` in all over ``rows`` rows whose tokens see
        ``context`` cached positions on average (None: the calibration's context)."""
        extra = 0.0
        if context is not None and self.per_position > 0:
            extra = self.per_position * tokens * max(0.0, context - self.meta.get("context", CALIBRATION_CONTEXT))
        return self._at(tokens, rows) + extra

    def _at(self, tokens: int, rows: int) -> float:
        rows = max(1, rows)
        i = bisect.bisect_left(self.rows, rows)
        if i < len(self.rows) and self.rows[i] == rows:
            return self._in_tokens(i, tokens)
        if i == 0:
            return self._in_tokens(0, tokens)
        if i == len(self.rows):       # more rows than measured: extrapolate from the last two
            i = len(self.rows) - 1
        r0, r1 = self.rows[i - 1], self.rows[i]
        c0, c1 = self._in_tokens(i - 1, tokens), self._in_tokens(i, tokens)
        return max(c0 + (c1 - c0) * (rows - r0) / (r1 - r0), 1e-6)

    def _in_tokens(self, i: int, tokens: int) -> float:
        xs, ys = self.tokens[i], self.seconds[i]
        if len(xs) == 1:
            return ys[0]
        j = bisect.bisect_left(xs, tokens)
        if j < len(xs) and xs[j] == tokens:
            return ys[j]
        j = min(max(j, 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
        return max(y0 + (y1 - y0) * (tokens - x0) / (x1 - x0), 1e-6)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "tokens": self.tokens, "seconds": self.seconds, "meta": self.meta,
                "per_position": self.per_position}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CostCurve":
        return cls(list(d["rows"]), [list(x) for x in d["tokens"]], [list(x) for x in d["seconds"]],
                   dict(d.get("meta") or {}), float(d.get("per_position") or 0.0))

    @classmethod
    def synthetic(cls, per_token: float, base: float = 0.04, per_row: float = 0.0,
                  max_rows: int = 16, max_tokens: int = 512, per_position: float = 0.0) -> "CostCurve":
        """A linear curve, base + per_token * tokens + per_row * rows (+ per_position * tokens *
        positions past CALIBRATION_CONTEXT) (tests, what-ifs)."""
        rows = [r for r in CALIBRATION_ROWS if r <= max_rows] or [1]
        toks = [1, max_tokens]
        return cls(rows, [toks for _ in rows],
                   [[base + per_row * r + per_token * t for t in toks] for r in rows],
                   {"synthetic": True, "context": CALIBRATION_CONTEXT}, per_position)


def tally_positions(reached: list, accepted_at: list, drafted: int, accepted: int,
                    limit: int | None = None) -> None:
    """Count one verified draft per draft position: positions 1..accepted+1 (at most ``drafted``,
    and at most ``limit``) were reached, the first ``accepted`` of them accepted. The one rule
    behind both the per-request stats and the cost model's acceptance table; lists grow as needed."""
    n = min(accepted + 1, drafted) if limit is None else min(accepted + 1, drafted, limit)
    while len(reached) < n:
        reached.append(0)
        accepted_at.append(0)
    for i in range(n):
        reached[i] += 1
        accepted_at[i] += i < accepted


class Acceptance:
    """Measured acceptance per drafter (and match-length bucket) and draft position: of the
    drafts that reached position i, how many had it accepted. Position 1 is smoothed toward
    ``prior``, every later one toward the smoothed rate of the position before it: a position
    no draft has reached yet is priced like the last one measured, not like a fresh guess. A
    copy that has gone right for four tokens usually goes on (the rates rise with depth); with
    a flat 0.5 prior past the measured positions the cost model rarely drafted past them, so
    they stayed unmeasured (bench_tree's questions replayed at batch 1: no verified draft of
    either drafter reached a fifth token)."""

    def __init__(self, max_positions: int = 64, prior: float = 0.5, prior_weight: float = 2.0) -> None:
        self.max_positions = max_positions
        self.prior, self.prior_weight = prior, prior_weight
        self._tried: dict[tuple[str, int], list[float]] = {}
        self._accepted: dict[tuple[str, int], list[float]] = {}

    @staticmethod
    def bucket(match_len: int) -> int:
        """Suffix-match lengths 1, 2, 3-4, 5+ (0: not a copy drafter)."""
        if match_len <= 0:
            return 0
        return 1 if match_len == 1 else 2 if match_len == 2 else 3 if match_len <= 4 else 5

    def _lists(self, key: tuple[str, int]) -> tuple[list[float], list[float]]:
        if key not in self._tried:
            self._tried[key] = [0.0] * self.max_positions
            self._accepted[key] = [0.0] * self.max_positions
        return self._tried[key], self._accepted[key]

    def update(self, drafter: str, match_len: int, drafted: int, accepted: int) -> None:
        tried, acc = self._lists((drafter, self.bucket(match_len)))
        tally_positions(tried, acc, drafted, accepted, self.max_positions)

    def rates(self, drafter: str, match_len: int, n: int) -> list[float]:
        """Conditional acceptance of positions 1..n."""
        tried, acc = self._lists((drafter, self.bucket(match_len)))
        w, p, out = self.prior_weight, self.prior, []
        for i in range(min(n, self.max_positions)):
            if tried[i] + w > 0:
                p = (acc[i] + w * p) / (tried[i] + w)
            out.append(p)
        return out

    def table(self) -> dict[str, list[float]]:
        """{"drafter/bucket": [rate at position 1, 2, ...]} for the positions seen (stats, /metrics)."""
        out = {}
        for (name, b), tried in self._tried.items():
            seen = [i for i, t in enumerate(tried) if t > 0]
            if seen:
                acc = self._accepted[(name, b)]
                out[f"{name}/{b}"] = [round(acc[i] / tried[i], 3) for i in range(seen[-1] + 1)]
        return out


def copy_gains(draft: Any, acceptance: Acceptance) -> tuple[Any, list[float]]:
    """A copy draft's gain per token -- P(the verified path reaches its depth), from the
    drafter's measured rates by depth, times its share of the matches (a tree node's weight; 1
    in a chain) -- and the draft with a tree's nodes ranked by it, largest first (a node's gain
    never exceeds its parent's, so any first k nodes are a tree); the gains in that order."""
    depths = draft.depths()
    reach = list(itertools.accumulate(acceptance.rates(draft.source, draft.match_len, max(depths)), operator.mul))
    gains = [reach[d - 1] * w for d, w in zip(depths, draft.weights)] if draft.weights else reach
    if draft.is_tree:
        return draft.ranked(gains), sorted(gains, reverse=True)
    return draft, gains


@dataclass
class Candidate:
    """A row that may draft: up to ``max_len`` tokens from ``drafter`` (``match_len``: the
    reference drafter's suffix match)."""

    drafter: str
    match_len: int
    max_len: int
    # the expected accepted tokens each next draft token adds, non-increasing (a draft tree's
    # ranked nodes); None: the chain's, from the measured acceptance by position
    gains: list[float] | None = None


def choose_lengths(candidates: list[Candidate | None], base_tokens: int, rows: int, curve: CostCurve,
                   acceptance: Acceptance, overhead: float = 0.0,
                   per_draft: float = 0.0, context: float | None = None) -> tuple[list[int], float, float]:
    """Draft length per candidate (0 for None) maximising the step's goodput; also the predicted
    forward seconds (the curve's) and goodput (tokens/s) of the choice. ``overhead``: seconds a
    step costs beside the curve's forward, whatever its drafts (the engine's measured gap: its
    own work, and a context longer than the calibration's); it dilutes what drafting adds.
    ``per_draft``: seconds each draft token costs beyond the curve's price for it (in a batch,
    ragged rows pad each other's attention; the draft model's own forwards). ``context``: the
    cached positions the step's tokens see on average (the curve prices their attention)."""
    lengths = [0] * len(candidates)
    heap: list[tuple[float, int, int]] = []          # (-marginal gain, candidate, position)
    chains: dict[int, list[float]] = {}
    for c, cand in enumerate(candidates):
        if cand is None or cand.max_len <= 0:
            continue
        if cand.gains is not None:
            gains = list(cand.gains[:cand.max_len])
        else:
            gains = list(itertools.accumulate(acceptance.rates(cand.drafter, cand.match_len, cand.max_len),
                                              lambda x, y: x * y))
        chains[c] = gains
        if gains:
            heapq.heappush(heap, (-gains[0], c, 0))
    best_n, best_goodput = 0, rows / (curve(base_tokens, rows, context) + overhead)
    expected, picks = float(rows), []
    while heap:
        neg, c, i = heapq.heappop(heap)
        expected += -neg
        picks.append(c)
        goodput = expected / (curve(base_tokens + len(picks), rows, context) + overhead + per_draft * len(picks))
        if goodput > best_goodput:
            best_n, best_goodput = len(picks), goodput
        if i + 1 < len(chains[c]):
            heapq.heappush(heap, (-chains[c][i + 1], c, i + 1))
    for c in picks[:best_n]:
        lengths[c] += 1
    return lengths, curve(base_tokens + best_n, rows, context), best_goodput


class StepResidual:
    """What batched steps cost beyond the curve's price, fitted as ``a + b * draft tokens`` per
    row-count bucket (2, 3-4, 5-8, 9-16, ...) by exponentially weighted least squares over the
    latest steps (``weight``: the latest step's). The curve is measured on uniform rows at a short
    context; a real batch has ragged rows (one row's drafts pad the others' attention), longer
    contexts and the engine's own work, and the gap grows with the drafts. ``b`` is the slope;
    while a bucket's steps do not vary their drafts enough to measure it (fewer than ``min_var``
    tokens squared of variance, e.g. because ``b`` stopped drafting) it decays toward 0, so that
    drafting is retried and the slope measured again. Both terms are clamped at 0."""

    def __init__(self, weight: float = 0.1, min_var: float = 1.0) -> None:
        self.weight, self.min_var = weight, min_var
        self._moments: dict[int, list[float]] = {}          # bucket -> [x, y, xx, xy] means
        self._slope: dict[int, float] = {}
        self.steps = 0

    @staticmethod
    def bucket(rows: int) -> int:
        return (max(rows, 2) - 1).bit_length()

    def update(self, rows: int, drafted: int, residual: float) -> None:
        b = self.bucket(rows)
        x, y, w = float(drafted), float(residual), self.weight
        m = self._moments.get(b)
        if m is None:
            m = self._moments[b] = [x, y, x * x, x * y]
        else:
            for i, v in enumerate((x, y, x * x, x * y)):
                m[i] += w * (v - m[i])
        var = m[2] - m[0] * m[0]
        if var >= self.min_var:
            self._slope[b] = max(0.0, (m[3] - m[0] * m[1]) / var)
        else:
            self._slope[b] = (1 - w) * self._slope.get(b, 0.0)
        self.steps += 1

    def terms(self, rows: int) -> tuple[float, float]:
        """(overhead seconds, seconds per draft token) for a step of ``rows`` rows."""
        b = self.bucket(rows)
        m = self._moments.get(b)
        if m is None:
            return 0.0, 0.0
        slope = self._slope.get(b, 0.0)
        return max(0.0, m[1] - slope * m[0]), slope


class MeasuredGain:
    """Whether drafting pays in a batch of a given number of rows, as measured rather than as
    predicted. The cost model's choice rests on a curve timed on uniform shapes and on measured
    acceptance, and in a full batch, where each drafted token is bought with compute, a small
    error in either turns a gain into a loss (bf16 on an AMD EPYC, 8 rows, closed loop: the
    drafts the model chose made the engine 4-7% slower). Per row count (decode steps of two rows
    or more), an EWMA of committed tokens per second, apart for steps that verified drafts and
    steps that did not; drafting loses at a row count once both are measured and its side is the
    slower. While drafting runs, every ``explore_every``-th step at a row count goes without
    drafts (``explore``), so the plain side stays measured: speed only -- verification decides
    every token, with drafts or without."""

    def __init__(self, weight: float = 0.1, explore_every: int = 32) -> None:
        self.weight, self.explore_every = weight, explore_every
        self._speed: dict[tuple[int, bool], float] = {}     # (rows, drafted) -> EWMA tokens/s
        self._drafting_run: dict[int, int] = {}             # rows -> drafting steps since a plain one

    def update(self, rows: int, drafted: int, committed: int, seconds: float) -> None:
        if rows < 2 or seconds <= 0:
            return
        key = (rows, drafted > 0)
        speed = committed / seconds
        old = self._speed.get(key)
        self._speed[key] = speed if old is None else old + self.weight * (speed - old)
        self._drafting_run[rows] = self._drafting_run.get(rows, 0) + 1 if drafted else 0

    def speeds(self, rows: int) -> tuple[float | None, float | None]:
        """(tokens/s with drafts, without) at ``rows``; None where not measured yet."""
        return self._speed.get((rows, True)), self._speed.get((rows, False))

    def explore(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows should go without drafts to measure that side again."""
        return self._drafting_run.get(rows, 0) >= self.explore_every

    def loses(self, rows: int) -> bool:
        drafting, plain = self.speeds(rows)
        return drafting is not None and plain is not None and drafting < plain


# ---- calibration ------------------------------------------------------------------------------

def curve_key(model: Any, dtype: Any, device: Any, kernel: str = "torch") -> str:
    """What the cost depends on: architecture, dtype, device, threads, CPU, torch version, what
    computes the linear layers and the attention (``PooledModel.kernels``), and how idle OpenMP
    threads wait (``OMP_WAIT_POLICY=PASSIVE``, as the test suite ran, puts every parallel region
    of a forward through a sleep and a wake-up: ~80 us each on 2 cores, ~10 ms of a decode
    forward, so a curve measured there overprices every forward alike and makes drafts look cheap)."""
    import torch

    from .models import cpu_fingerprint

    cfg = model.config.to_json_string() if hasattr(model.config, "to_json_string") else repr(model.config)
    parts = [cfg, str(dtype), str(device), str(torch.get_num_threads()), torch.__version__, cpu_fingerprint(), kernel,
             os.environ.get("OMP_WAIT_POLICY", ""), os.environ.get("GOMP_SPINCOUNT", ""), CURVE_VERSION]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def fill_context(runner: Any, ids: list[list[int]], slots: int, context: int, extra: int = 0) -> None:
    """Give slots 0..slots-1 the same cached context of ``context`` tokens: one prefill of
    ``ids[0]``, its KV copied into the other slots (room for ``extra`` more tokens each)."""
    from .forward import Row

    runner.forward([Row(0, 0, ids[0][:context], context)])
    runner.pool.ensure(slots, context + extra)
    for store in (runner.pool.keys, runner.pool.values):
        for layer in store:
            layer[1:slots, :, :context] = layer[0, :, :context]


def time_forward(runner: Any, rows: list[Any], repeats: int, warm_up: bool = True, fastest: bool = False) -> float:
    """Median (``fastest``: least) seconds of ``repeats`` forwards over ``rows``, after one
    warm-up of the shape (unless ``warm_up`` is False). Rows write past their slot's length
    only, so repeating them leaves the context intact."""
    if warm_up:
        runner.forward(rows)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.forward(rows)
        times.append(time.perf_counter() - t0)
    return min(times) if fastest else statistics.median(times)


def rag_forward_ms(model: Any, invariant: bool, context: int = 700) -> dict[str, float]:
    """Least ms of 3 of each forward a RAG request is made of, at a RAG request's context (k
    sources in the prompt): the prefill, a one-token decode step, a 16-token verification,
    8 rows x 1 token (``--dtype auto`` compares fp32 and bf16 on these). The least, not the
    median: load on a shared machine only ever adds time, and the decision is cached."""
    import torch

    from .forward import PooledModel, Row

    runner = PooledModel(model, 8, invariant=invariant)
    ids = torch.randint(0, 1000, (8, context + 20), generator=torch.Generator().manual_seed(0)).tolist()
    shapes = {"prefill": [Row(0, 0, ids[0][:context], context)],
              "decode_1": [Row(0, context, ids[0][context:context + 1], 0)],
              "verify_16": [Row(0, context, ids[0][context:context + 16], 0)],
              "rows_8": [Row(r, context, ids[r][context:context + 1], 0) for r in range(8)]}
    with torch.inference_mode():
        fill_context(runner, ids, 8, context, extra=20)
        return {name: round(time_forward(runner, rows, 3, fastest=True) * 1e3, 2) for name, rows in shapes.items()}


def measure(runner: Any, rows: tuple[int, ...] = CALIBRATION_ROWS, tokens: tuple[int, ...] = CALIBRATION_TOKENS,
            context: int = CALIBRATION_CONTEXT, passes: int = 3, max_total: int = 128) -> CostCurve:
    """Time the forward over ``rows`` x ``tokens`` per row at a cached context of ``context``
    tokens per row, on the runner's own pool; shapes past ``max_total`` tokens are left to
    extrapolation (they are rarely chosen and the dearest to measure).

    Robust to a busy machine (the curve is cached and decides every draft length after): the
    grid is timed in ``passes`` interleaved passes and each shape keeps its fastest time (load
    only ever adds time), and a row count's times are made non-decreasing in tokens (feeding
    more tokens never costs less; an inversion is noise)."""
    import torch

    from .forward import Row

    rows = tuple(r for r in rows if r <= runner.pool.max_slots) or (1,)
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    vocab = int(runner.model.config.get_text_config().vocab_size if hasattr(runner.model.config, "get_text_config")
                else runner.model.config.vocab_size)
    ids = torch.randint(0, vocab, (max(rows), context + max(tokens)), generator=gen).tolist()
    grid: list[list[int]] = []        # per row count, the tokens per row measured
    for n_rows in rows:
        ts: list[int] = []
        for t in tokens:
            if ts and n_rows * t > max_total:
                break                    # beyond: extrapolated from the last two points
            ts.append(t)
        grid.append(ts)
    best = [[float("inf")] * len(ts) for ts in grid]
    with torch.inference_mode():
        fill_context(runner, ids, max(rows), context, extra=max(tokens))
        for n in range(passes):
            for i, (n_rows, ts) in enumerate(zip(rows, grid)):
                for j, t in enumerate(ts):
                    batch = [Row(r, context, ids[r][context:context + t], 0) for r in range(n_rows)]
                    best[i][j] = min(best[i][j], time_forward(runner, batch, 1, warm_up=n == 0))
        per_position = _per_position(runner, vocab, context, passes)
    curve_tokens = [[n_rows * t for t in ts] for n_rows, ts in zip(rows, grid)]
    curve_seconds = [list(itertools.accumulate(ys, max)) for ys in best]
    meta = {"context": context, "passes": passes, "seconds_to_measure": round(time.perf_counter() - t_start, 2),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return CostCurve(list(rows), curve_tokens, curve_seconds, meta, per_position)


def _per_position(runner: Any, vocab: int, context: int, passes: int) -> float:
    """Seconds per fed token per cached position: PER_POSITION_SHAPE (rows x tokens, a verification
    step's shape) timed at ``context`` and at CALIBRATION_LONG_CONTEXT, fastest of ``passes``
    interleaved, on a pool of its own (the runner's keeps its size: it grows for every slot at
    once). 0 where the model's context cannot hold the longer one."""
    import torch

    from .forward import PooledModel, Row

    n_rows, t = PER_POSITION_SHAPE
    long = min(CALIBRATION_LONG_CONTEXT, runner.pool.max_length - t)
    if long <= context:
        return 0.0
    probe = PooledModel(runner.model, n_rows, long + t, invariant=runner.invariant,
                        linear_kernel="auto" if runner.kernel is not None else "torch", lean=runner.lean is not None)
    ids = torch.randint(0, vocab, (n_rows, long + t), generator=torch.Generator().manual_seed(1)).tolist()
    fill_context(probe, ids, n_rows, long, extra=t)
    best = {context: float("inf"), long: float("inf")}
    for n in range(passes):
        for at in best:
            batch = [Row(r, at, ids[r][at:at + t], 0) for r in range(n_rows)]
            best[at] = min(best[at], time_forward(probe, batch, 1, warm_up=n == 0))
    return max(0.0, (best[long] - best[context]) / (n_rows * t * (long - context)))


def cache_path(key: str) -> Path:
    from .models import cache_dir

    return cache_dir() / "cost" / f"{key}.json"


def load_or_measure(runner: Any, remeasure: bool = False) -> CostCurve:
    """The cached curve of this model / dtype / device / threads / CPU, measured if missing."""
    key = curve_key(runner.model, runner.dtype, runner.device, runner.kernels)
    path = cache_path(key)
    if path.exists() and not remeasure:
        try:
            return CostCurve.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError):
            log.warning("ignoring an unreadable cost curve at %s", path)
    log.info("measuring the forward's cost on this machine (once per model, dtype and thread count) ...")
    curve = measure(runner)
    curve.meta["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(curve.to_json(), indent=1))
    os.replace(tmp, path)
    log.info("forward cost measured in %.1f s: 1 row x 1 token %.1f ms, 1 x 16 %.1f ms, 16 rows x 1 %.1f ms, "
             "%.2f us per fed token per cached position past %d; cached in %s",
             curve.meta["seconds_to_measure"], curve(1, 1) * 1e3, curve(16, 1) * 1e3,
             curve(16, min(16, runner.pool.max_slots)) * 1e3, curve.per_position * 1e6, curve.meta["context"], path)
    return curve
