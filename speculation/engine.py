"""The speculative decoding engine: draft -> one target forward for every row -> verify -> commit.

A step takes every running sequence at once. Each row feeds what its KV cache lacks (the pending
last token; a prompt, in chunks while others decode; tokens a caller appended with ``extend``)
together with its drafts, and all rows go through one target forward over the KV pool
(``forward.PooledModel``). Every row is then verified from that forward -- greedy rows by one
argmax, sampled rows by the speculative-sampling rule -- and committed on its own, with its stop
strings, EOS and length limit. Rejected drafts cost nothing to undo: a row's cache length is set
back (``SequenceState.cached``), never cropped or re-prefilled, and no other row is touched.

Invariant of every sequence: its slot holds the KV of a prefix of ``tokens[:-1]`` (of
``(tokens + ahead)[:-1]`` when it drafted past a pause: the tokens verified there wait in
``ahead`` and are committed without a forward if it continues).

This object is driven by one thread at a time: the step API (``begin`` / ``step`` / ``run`` /
``truncate`` / ``extend`` / ``release``) for callers that own their loop (the iterative pipeline,
tests, the CLI), or ``scheduler.EngineLoop`` for many concurrent requests.
"""

from __future__ import annotations

import itertools
import logging
import operator
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .cost import (Acceptance, Candidate, CostCurve, MeasuredGain, StepResidual, choose_lengths, copy_gains,
                   load_or_measure, tally_positions)
from .drafters import (EXTENSION, GIVEN, TARGET, Draft, Drafter, History, ModelDrafter, NgramDrafter, Origin,
                       TreeDrafter)
from .errors import GenerationInputError
from .forward import SHORT_ROW, PooledModel, Row
from .kv import KeptPrefix, PrefixStore, SlotTable
from .text import StopStringStreamer
from .verify import SamplingParams, draws, greedy_accept, sample_at, tree_accept, warp_probs

DRAFTERS = ("reference", "tree", "prompt_lookup", "draft_model")
# the longest pause, in steps, of draft proposals in a batch whose drafts the cost model keeps dropping
PROPOSAL_PAUSE_MAX = 32
# weight of the latest decode step in the step-overhead estimate the cost model adds to its curve
OVERHEAD_EWMA = 0.2

log = logging.getLogger(__name__)


def _common_prefix(a: list[int], b: list[int], bound: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``bound`` (bisection
    on slice equality: C-speed comparisons)."""
    lo, hi = 0, min(len(a), len(b), bound)
    if hi == 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi - 1:                  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def parse_drafters(text: str) -> tuple[str, ...]:
    """A comma-separated drafter order (a CLI flag) as names, each one checked."""
    names = tuple(d.strip() for d in text.split(",") if d.strip())
    for name in names:
        if name not in DRAFTERS:
            raise GenerationInputError(f"unknown drafter {name!r}: use {', '.join(DRAFTERS)}")
    return names

# on_commit(state, new_token_ids, text_delta); the new tokens' provenance is
# state.origins[-len(new_token_ids):]
CommitCallback = Callable[["SequenceState", list[int], str], None]


@dataclass
class EngineConfig:
    """Which drafters run, in order of preference, how long their drafts may be, and how much
    one step may hold.

    drafters: any of "reference" (LLMA: references + prompt + output), "tree" (the same
    sources, every continuation of the match, verified as a token tree), "prompt_lookup"
    (prompt + output only), "draft_model" (needs a draft model). Empty: no speculation. A step
    asks them in this order; each drafts for the rows the ones before it left without a draft,
    and a draft model after a copy drafter also continues that drafter's best branch.
    """

    drafters: tuple[str, ...] = ("reference", "draft_model")
    max_draft_tokens: int = 16
    max_ngram: int = 8
    prompt_lookup_max_ngram: int = 3
    # How long each row's draft is. "cost": the length (0 included) that maximises the step's
    # expected committed tokens per second, from the forward's cost measured on this machine and
    # the drafters' measured acceptance by position and match length (speculation/cost.py).
    # "fixed": the drafters' adaptive lengths, from suffix matches of >= min_ngram tokens.
    # Speed only: verification decides every token.
    draft_policy: str = "cost"
    # a CostCurve to use instead of the measured one (tests, what-ifs); None: measured and cached
    cost_curve: Any = None
    # "fixed" only: shortest suffix match the reference drafter drafts from. None: 1 on a GPU,
    # 3 on a CPU (the rule the cost model replaces). The cost model drafts from any match.
    min_ngram: int | None = None
    draft_model_max_tokens: int = 6
    # "tree": nodes one row's draft tree may hold (its depth is bounded by max_draft_tokens)
    max_tree_nodes: int = 32
    # "tree": the outputs of this engine's finished requests, up to this many tokens (the oldest
    # dropped first), are drafting sources beside each request's own documents (drafters.History:
    # the phrasing the model repeats from answer to answer); 0: each request drafts from its own
    # documents, prompt and output only
    history_tokens: int = 16384
    # KV slots: sequences resident at once (running, parked, or finished and not yet released)
    max_batch: int = 16
    # tokens one forward feeds while some row is decoding: a newcomer's prompt is fed in chunks
    # of what is left, so it does not stall the others for a whole prompt
    max_tokens_per_step: int = 512
    # tokens one forward feeds when every row in it is a prompt
    max_prefill_tokens: int = 4096
    # record every committed token's origin (SequenceState.origins: which reference and offset a
    # copied token came from, ...); off only to measure what the bookkeeping costs
    provenance: bool = True
    # a forward whose result for a token does not depend on what shares it (speculation/
    # invariant.py), so speculative greedy output is bitwise the non-speculative one even in
    # bf16. None: on for a low-precision model on a CPU whose matmuls compute rows independently
    # (checked at start-up); fp32 stays on the plain kernels (exact up to fp32 near-ties).
    batch_invariant: bool | None = None
    # a new sequence whose prompt starts like what a KV slot holds (a released sequence's, or a
    # running one's) starts from there instead of prefilling it (speculation/kv.py), when the
    # shared prefix is at least prefix_cache_min_tokens long
    prefix_cache: bool = True
    prefix_cache_min_tokens: int = 16
    # what a slot held when it is handed to an unrelated sequence is copied out and kept, up to
    # this many MB (least recently used dropped), so prefixes outlive slot turnover at full batch
    prefix_cache_mb: float = 256
    # what computes fp32 / bf16 linear layers on a CPU: "auto", our kernels (speculation/
    # kernels.py: read the weights at close to memory bandwidth for 1-16 rows, compute a row
    # alike whatever shares its product; bf16 needs AVX512-BF16) where they build, else
    # torch's; "torch": torch's always
    linear_kernel: str = "auto"


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    references: list[list[int]] = field(default_factory=list)
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    speculate: bool = True
    max_draft_tokens: int | None = None
    # drafters for this request, in order of preference; None: the engine's (EngineConfig.drafters)
    drafters: tuple[str, ...] | None = None
    pause_at: int | None = None             # initial SequenceState.pause_at (the prefill respects it)
    # draft and verify past a pause; the verified tokens there wait in SequenceState.ahead
    draft_past_pause: bool = False
    # index in prompt_ids where the answer starts (None: after the prompt). Sampling keys its
    # random draw for a token by its answer position, so sequences that carry the same answer
    # (iterative strides, rolled back or re-prefilled) draw the same numbers at the same place
    answer_start: int | None = None


@dataclass
class DrafterStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    # per draft position (1st, 2nd, ...): drafts that reached it, and those that had it accepted
    reached: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    # verified drafts by the number of their tokens accepted (0, 1, 2, ...)
    accepted_lengths: list[int] = field(default_factory=list)

    def add(self, drafted: int, accepted: int, depth: int | None = None) -> None:
        """One verified draft of ``drafted`` tokens (a tree: nodes, ``depth`` its depth)."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        tally_positions(self.reached, self.accepted_at, drafted if depth is None else depth, accepted)
        while len(self.accepted_lengths) <= accepted:
            self.accepted_lengths.append(0)
        self.accepted_lengths[accepted] += 1

    def merge(self, other: "DrafterStats") -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        for i, (r, a) in enumerate(zip(other.reached, other.accepted_at)):
            if i == len(self.reached):
                self.reached.append(0)
                self.accepted_at.append(0)
            self.reached[i] += r
            self.accepted_at[i] += a
        for n, c in enumerate(other.accepted_lengths):
            if n == len(self.accepted_lengths):
                self.accepted_lengths.append(0)
            self.accepted_lengths[n] += c


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    target_forwards: int = 0          # forwards this sequence took part in (prompt chunks + decode steps)
    prefills: int = 0
    cached_prompt_tokens: int = 0     # prompt positions taken from the prefix cache, not prefilled
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    batch_rows: int = 0               # rows of all the forwards it took part in (itself included)
    predicted_seconds: float = 0.0    # the cost model's predicted seconds of those forwards
    by_drafter: dict[str, DrafterStats] = field(default_factory=dict)

    @property
    def mean_rows_per_step(self) -> float:
        return self.batch_rows / self.target_forwards if self.target_forwards else 0.0

    @property
    def mean_accepted_per_forward(self) -> float:
        return self.generated_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        seconds = self.prefill_seconds + self.decode_seconds
        return self.generated_tokens / seconds if seconds > 0 else 0.0

    def to_dict(self, timings: bool = True) -> dict[str, Any]:
        """The numbers every caller reports (CLI --json, the pipeline's stats, HTTP metrics).
        ``timings`` False leaves out the prompt size and the prefill/decode seconds, which the
        pipeline reports under its own "seconds"."""
        d = asdict(self)
        d["prefill_seconds"] = round(self.prefill_seconds, 4)
        d["decode_seconds"] = round(self.decode_seconds, 4)
        d["predicted_seconds"] = round(self.predicted_seconds, 4)
        d["mean_accepted_per_forward"] = round(self.mean_accepted_per_forward, 4)
        d["tokens_per_second"] = round(self.tokens_per_second, 3)
        d["mean_rows_per_step"] = round(self.mean_rows_per_step, 3)
        d["mean_step_seconds"] = (round((self.prefill_seconds + self.decode_seconds) / self.target_forwards, 5)
                                  if self.target_forwards else 0.0)
        d["acceptance_rate"] = round(self.accepted_tokens / self.draft_tokens, 4) if self.draft_tokens else 0.0
        if not timings:
            for key in ("prompt_tokens", "prefill_seconds", "decode_seconds"):
                del d[key]
        return d

    def summary(self) -> str:
        """One line for a terminal."""
        return (f"{self.generated_tokens} tokens, {self.tokens_per_second:.1f} tok/s, {self.target_forwards} "
                f"target forwards, {self.mean_accepted_per_forward:.2f} tokens/forward, accepted "
                f"{self.accepted_tokens}/{self.draft_tokens} drafted")

    def merge(self, other: "GenerationStats") -> None:
        """Add another run's counts (the iterative pipeline runs several sequences per answer)."""
        for name in ("generated_tokens", "target_forwards", "prefills", "cached_prompt_tokens", "draft_tokens", "accepted_tokens",
                     "prefill_seconds", "decode_seconds", "batch_rows", "predicted_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.by_drafter.items():
            self.by_drafter.setdefault(k, DrafterStats()).merge(v)


@dataclass
class SequenceState:
    request: GenerationRequest
    tokens: list[int]                       # prompt + generated; tokens[-1] is pending
    n_prompt: int
    sampling: SamplingParams
    seed: int | None                        # sampling: the key of the per-position draws (None: greedy)
    answer_start: int                       # index in tokens of answer position 0 (the draws' keys)
    streamer: StopStringStreamer
    drafters: tuple[str, ...]               # engine drafters this sequence uses, in order
    max_draft: int
    references: list[list[int]]
    stats: GenerationStats
    drafter_state: dict[str, Any] = field(default_factory=dict)
    slot: int | None = None                 # KV pool slot; None: none held (new, released, evicted)
    cached: int = 0                         # positions of the slot holding this sequence's KV
    fresh: bool = False                     # on a new slot, not fed yet: its next feed is a prefill
    finished: bool = False
    finish_reason: str | None = None        # "stop" (EOS / stop string) | "length" | "cancelled"
    error: BaseException | None = None      # raised by the commit callback; the sequence ended there
    pause_at: int | None = None             # generated-token count at which run() returns
    # tokens verified past the pause, committed (without a forward) when the sequence continues;
    # the slot holds the KV of all but the last of them
    ahead: list[int] = field(default_factory=list)
    ahead_origins: list[Origin] = field(default_factory=list)
    # provenance of every generated token (parallel to ``generated``): copied from reference r
    # at offset o, from the prompt or the output, drafted by the draft model, or the target's own
    origins: list[Origin] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def draft_room(self) -> int:
        """Tokens a draft may usefully hold: up to the length limit, and up to the pause unless
        the request drafts past it (a draft of all of them + the bonus token overshoots by one,
        which the commit trims)."""
        remaining = self.request.max_new_tokens - len(self.generated)
        if self.pause_at is not None and not self.request.draft_past_pause:
            remaining = min(remaining, self.pause_at - len(self.generated))
        return remaining

    @property
    def text(self) -> str:
        return self.streamer.text


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats
    origins: list[Origin] = field(default_factory=list)     # per token (SequenceState.origins)
    token_ends: list[int] = field(default_factory=list)     # per token: its text's end in ``text``


@dataclass
class StepRecord:
    """One step of the engine, for metrics: rows in the forward, tokens fed, wall seconds."""

    rows: int
    tokens: int
    seconds: float
    prefill_rows: int
    predicted_seconds: float | None = None  # the cost model's prediction for this step
    drafted: int = 0                        # draft tokens verified
    accepted: int = 0                       # of them, accepted


@dataclass
class _RowPlan:
    state: SequenceState
    fed: list[int]                          # tokens the cache lacks, fed this step (maybe a chunk)
    complete: bool                          # fed reaches the pending token: logits, verify, commit
    draft_limit: int = 0                    # tokens a chain draft may hold
    node_limit: int = 0                     # nodes a draft tree may hold
    draft: Draft | None = None
    defer: bool = False                     # the draft model drafts for it once its length is chosen
    extended: list[int] = field(default_factory=list)   # the draft's nodes the draft model drafted

    @property
    def drafted(self) -> list[int]:
        return self.draft.tokens if self.draft else []


class SpeculativeEngine:
    """Owns the KV pool and the decoding steps for one target model (and optional draft model)."""

    def __init__(self, target: Any, tokenizer: Any, draft: Any | None = None,
                 config: EngineConfig | None = None) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.config = config or EngineConfig()
        if self.config.max_batch < 1 or self.config.max_tokens_per_step < 1:
            raise GenerationInputError("max_batch and max_tokens_per_step must be at least 1")
        self.device = next(target.parameters()).device
        self.eos_ids = self._eos_ids()
        self.context_tokens = int(getattr(target.config, "max_position_embeddings", 0) or 0)
        if self.config.linear_kernel not in ("auto", "torch"):
            raise GenerationInputError(f"unknown linear_kernel {self.config.linear_kernel!r}: use auto or torch")
        self.batch_invariant = self._batch_invariant()
        self.runner = PooledModel(target, self.config.max_batch, invariant=self.batch_invariant,
                                  linear_kernel=self.config.linear_kernel)
        self.slots = SlotTable(self.config.max_batch, self._evict)
        self.kept = PrefixStore(int(self.config.prefix_cache_mb * 2**20) if self.config.prefix_cache else 0)
        if self.config.draft_policy not in ("cost", "fixed"):
            raise GenerationInputError(f"unknown draft_policy {self.config.draft_policy!r}: use cost or fixed")
        self.cost: CostCurve | None = None
        if self.config.draft_policy == "cost":
            self.cost = self.config.cost_curve or load_or_measure(self.runner)
        self.acceptance = Acceptance()
        # whole draft trees in the batch-invariant forward (on our attention kernel only; off:
        # their heaviest path, measured no worse -- a what-if for tests and benchmarks)
        self.invariant_trees = False
        # finished outputs, drafting sources for the tree drafter (None: off)
        self.history = (History(self.config.history_tokens, self.config.max_ngram)
                        if self.config.history_tokens > 0 else None)
        self.drafters: dict[str, Drafter] = self._make_drafters()
        self.on_step: Callable[[StepRecord], None] | None = None
        self._predicted: float | None = None
        self._context: float | None = None
        # per batch size (StepResidual's buckets): steps left in which no row proposes a draft, and
        # the next such pause, doubled each time the cost model takes none of the drafts proposed
        self._proposal_pause: dict[int, list[int]] = {}
        # per row count, the measured speed of steps with drafts and without: a pause also starts
        # where drafting measured slower, and now and then a step goes without to measure that side
        self.measured_gain = MeasuredGain()
        # seconds a one-row decode step costs beyond the curve's forward (EWMA of measured -
        # predicted, >= 0). In a batch the gap grows with the drafts (ragged rows cost more than
        # the curve's uniform shapes), so there it is fitted as overhead + slope x draft tokens
        self.step_overhead = 0.0
        self.batch_residual = StepResidual()

    def _batch_invariant(self) -> bool:
        from .invariant import rows_are_invariant

        wanted = self.config.batch_invariant
        kernel = self.config.linear_kernel == "auto"
        dtype = next(self.target.parameters()).dtype
        if wanted is None:
            wanted = self.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            if not wanted:
                return False
            if not rows_are_invariant(self.target, kernel):
                log.warning("%s matmuls on this CPU compute a row differently with other rows beside it: the "
                            "forward is not batch-invariant, so speculative output may differ from "
                            "non-speculative output where rounding flips an argmax", dtype)
                return False
            return True
        if wanted and not rows_are_invariant(self.target, kernel):
            raise GenerationInputError(f"batch_invariant asked for, but {dtype} matmuls on this machine compute a row "
                                       "differently with other rows beside it")
        return bool(wanted)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.target, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is None:
                continue
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return ids

    # ---- drafters -------------------------------------------------------------------------
    def _min_ngram(self) -> int:
        if self.cost is not None:
            return 1
        if self.config.min_ngram is not None:
            return max(1, self.config.min_ngram)
        return 1 if self.device.type == "cuda" else 3

    def _make_drafters(self) -> dict[str, Drafter]:
        """Every drafter this engine can run (a request picks among them); the draft model's only
        when there is one."""
        cfg = self.config
        self._check_drafter_names(cfg.drafters, explicit=False)
        adaptive = self.cost is None
        drafters: dict[str, Drafter] = {
            "reference": NgramDrafter("reference", cfg.max_draft_tokens, cfg.max_ngram,
                                      min(self._min_ngram(), cfg.max_ngram), adaptive=adaptive,
                                      provenance=cfg.provenance),
            # kept like transformers' / vLLM's n-gram lookup (matches down to 1 token)
            "tree": TreeDrafter("tree", cfg.max_draft_tokens, cfg.max_tree_nodes, cfg.max_ngram,
                                min(self._min_ngram(), cfg.max_ngram), adaptive=adaptive,
                                provenance=cfg.provenance, history=self.history),
            "prompt_lookup": NgramDrafter("prompt_lookup", cfg.max_draft_tokens, cfg.prompt_lookup_max_ngram,
                                          use_references=False, adaptive=adaptive, provenance=cfg.provenance),
        }
        if self.draft is not None:
            drafters["draft_model"] = ModelDrafter(self.draft, max_draft=min(cfg.max_draft_tokens,
                                                                             cfg.draft_model_max_tokens),
                                                   max_slots=cfg.max_batch, adaptive=adaptive)
        return drafters

    def _check_drafter_names(self, names: tuple[str, ...], explicit: bool) -> None:
        for name in names:
            if name not in DRAFTERS:
                raise GenerationInputError(f"unknown drafter {name!r}: use {', '.join(DRAFTERS)}")
            if explicit and name == "draft_model" and self.draft is None:
                raise GenerationInputError("drafter 'draft_model' needs a draft model, and none is loaded")

    def _chain(self, request: GenerationRequest) -> tuple[str, ...]:
        if not request.speculate:
            return ()
        if request.drafters is None:      # the engine's default: a missing draft model is skipped
            return tuple(n for n in self.config.drafters if n in self.drafters)
        self._check_drafter_names(tuple(request.drafters), explicit=True)
        return tuple(dict.fromkeys(request.drafters))

    # ---- lifecycle ------------------------------------------------------------------------
    def new_state(self, request: GenerationRequest) -> SequenceState:
        """Validate a request and make its sequence; the prompt is fed by the first step."""
        if not request.prompt_ids:
            raise GenerationInputError("empty prompt")
        if request.max_new_tokens < 1:
            raise GenerationInputError(f"max tokens must be at least 1 (got {request.max_new_tokens})")
        if self.context_tokens and len(request.prompt_ids) + request.max_new_tokens > self.context_tokens:
            raise GenerationInputError(
                f"prompt of {len(request.prompt_ids)} tokens + {request.max_new_tokens} new tokens exceeds "
                f"the model's context of {self.context_tokens} tokens"
            )
        if request.answer_start is not None and not 0 <= request.answer_start <= len(request.prompt_ids):
            raise GenerationInputError(f"answer_start {request.answer_start} is outside the prompt")
        seed = None
        if not request.sampling.greedy:
            # the request's key for its per-position draws; torch's global RNG is never touched
            seed = request.seed if request.seed is not None else secrets.randbits(63)
        chain = self._chain(request)
        state = SequenceState(
            request=request, tokens=list(request.prompt_ids), n_prompt=len(request.prompt_ids),
            sampling=request.sampling, seed=seed,
            answer_start=len(request.prompt_ids) if request.answer_start is None else request.answer_start,
            streamer=StopStringStreamer(self.tokenizer, request.stop), drafters=chain,
            max_draft=request.max_draft_tokens or self.config.max_draft_tokens,
            references=[list(r) for r in request.references], stats=GenerationStats(prompt_tokens=len(request.prompt_ids)),
            pause_at=request.pause_at,
        )
        for name in chain:
            self.drafters[name].begin(state)
        return state

    def _evict(self, state: SequenceState) -> None:
        """``state`` lost its slot: its KV is gone (it re-prefills if stepped again)."""
        state.slot = None
        state.cached = 0
        state.ahead, state.ahead_origins = [], []
        for name in state.drafters:
            evicted = getattr(self.drafters[name], "evicted", None)
            if evicted is not None:
                evicted(state)

    def release(self, state: SequenceState) -> None:
        """Give the sequence's slot back (a finished request; the iterative pipeline's chunks).
        Its keys and values stay there for a later prompt that starts the same way."""
        if state.slot is not None:
            self.slots.release(state.slot, self._held(state) if self.config.prefix_cache else None)
            self._evict(state)

    @staticmethod
    def _held(state: SequenceState) -> list[int]:
        """The tokens whose keys and values the sequence's slot holds."""
        return (state.tokens + state.ahead)[:state.cached]

    def _cached_prefix(self, state: SequenceState) -> tuple[int | KeptPrefix | None, int]:
        """(donor, length): the slot or kept prefix holding the longest prefix of the sequence's
        tokens (at least ``prefix_cache_min_tokens``, at most all but the pending token); a slot
        wins a tie (no copy when it is handed out); (None, 0): none."""
        donor: int | KeptPrefix | None = None
        length = 0
        if self.config.prefix_cache:
            bound = len(state.tokens) - 1
            for slot, held in self.slots.contents(self._held):
                n = _common_prefix(held, state.tokens, bound)
                if n > length:
                    donor, length = slot, n
            for entry in self.kept.entries():
                n = _common_prefix(entry.tokens, state.tokens, bound)
                if n > length:
                    donor, length = entry, n
        if length < max(1, self.config.prefix_cache_min_tokens):
            return None, 0
        return donor, length

    def _acquire(self, state: SequenceState, busy: set[int]) -> None:
        """A slot for a sequence without one, starting from the longest cached prefix of its
        tokens (copied in, or in place when the slot holding it is the one handed out); it
        always feeds at least its pending token. What the slot held past that prefix goes to the
        kept prefixes first (all of it, unless the slot is the donor: a slot taken over in place
        for the system prompt and sources it shares keeps the question and answer it held)."""
        donor, length = self._cached_prefix(state)
        slot, overwritten = self.slots.acquire(state, busy, prefer=donor if isinstance(donor, int) else None,
                                               allocated=self.runner.pool.slots, held=self._held)
        if overwritten and (slot != donor or length < len(overwritten)) and self.config.prefix_cache:
            self._keep(overwritten, slot)
        state.slot = slot
        state.cached, state.fresh = 0, True
        self._reuse(state, donor, length)

    def _keep(self, tokens: list[int], slot: int) -> None:
        """Copy what ``slot`` holds to the kept prefixes, unless another slot holds all of it."""
        n = len(tokens)
        if n < max(1, self.config.prefix_cache_min_tokens):
            return
        for other, held in self.slots.contents(self._held):
            if other != slot and _common_prefix(held, tokens, n) == n:
                return
        self.kept.put(tokens, self.runner.pool, slot)

    def _reuse(self, state: SequenceState, donor: int | KeptPrefix | None, length: int) -> None:
        """Start the sequence's (not yet fed) slot from ``donor``'s first ``length`` positions."""
        if donor is None or length <= state.cached:
            return
        if isinstance(donor, KeptPrefix):
            self.kept.restore(donor, self.runner.pool, state.slot, length)  # type: ignore[arg-type]
        elif donor != state.slot:
            self.runner.pool.copy_prefix(donor, state.slot, length)  # type: ignore[arg-type]
        state.stats.cached_prompt_tokens += min(length, state.n_prompt) - min(state.cached, state.n_prompt)
        state.cached = length

    def _commit(self, state: SequenceState, new_tokens: list[int], origins: list[Origin],
                on_commit: CommitCallback | None) -> None:
        """Append tokens (with their provenance) one by one, stopping at EOS, a stop string,
        the length limit or a pause (where the rest waits in ``state.ahead``); then make the
        cache length cover exactly (tokens + ahead)[:-1]."""
        paused = False
        committed: list[int] = []
        delta = ""
        limit = state.request.max_new_tokens
        for tok in new_tokens:
            n_gen = len(state.tokens) - state.n_prompt
            if n_gen >= limit:
                break
            if state.pause_at is not None and n_gen >= state.pause_at:
                paused = True
                break
            state.tokens.append(tok)
            committed.append(tok)
            if tok in self.eos_ids:
                state.finished, state.finish_reason = True, "stop"
                break
            delta += state.streamer.push(tok)
            if state.streamer.stopped:
                state.finished, state.finish_reason = True, "stop"
                break
        if not state.finished and len(state.tokens) - state.n_prompt >= limit:
            state.finished, state.finish_reason = True, "length"
        if state.finished:
            delta += state.streamer.finish()
            if state.finish_reason in ("stop", "length") and self.history is not None:
                self.history.add(state.generated)
        state.origins.extend(origins[:len(committed)])
        if paused and not state.finished:
            state.ahead, state.ahead_origins = list(new_tokens[len(committed):]), list(origins[len(committed):])
        else:
            state.ahead, state.ahead_origins = [], []
        state.cached = min(state.cached, len(state.tokens) + len(state.ahead) - 1)
        state.stats.generated_tokens += len(committed)
        if on_commit is not None and (committed or delta):
            try:
                on_commit(state, committed, delta)
            except BaseException as exc:  # noqa: BLE001 - ends this row only; the others' step goes on
                state.error = exc
                state.finished, state.finish_reason = True, "cancelled"

    # ---- the step -------------------------------------------------------------------------
    def active(self, state: SequenceState) -> bool:
        return not state.finished and not self._paused(state)

    def _paused(self, state: SequenceState) -> bool:
        return state.pause_at is not None and len(state.generated) >= state.pause_at

    @torch.inference_mode()
    def step(self, states: list[SequenceState], on_commit: CommitCallback | None = None) -> None:
        """One draft + verify round for every active sequence (at most ``max_batch`` rows; the
        rest wait for the next step). A callback that raises ends its own row only
        (``state.error``)."""
        t0 = time.perf_counter()
        self._predicted = None
        rows: list[SequenceState] = []
        for state in states:
            if not self.active(state):
                continue
            if state.ahead:        # verified by an earlier forward: no forward now
                self._commit(state, state.ahead, state.ahead_origins, on_commit)
            elif len(rows) < self.config.max_batch:
                rows.append(state)
        if not rows:
            return
        busy = {id(s) for s in rows}
        for state in rows:
            if state.slot is None:
                self._acquire(state, busy)
            else:
                self.slots.touch(state.slot)
                if state.fresh:         # waited for room: a row fed since may hold its prefix now
                    self._reuse(state, *self._cached_prefix(state))
        plans = self._plan(rows)
        # the cached positions the step's tokens see, on average (the cost curve prices attention by it)
        self._context = sum(p.state.cached + len(p.fed) for p in plans) / len(plans)
        self._draft(plans)
        logits = self.runner.forward([self._row(p) for p in plans])
        verdicts = self._verify(plans, logits)
        seconds = time.perf_counter() - t0
        prefill_rows = accepted = 0
        for plan in plans:
            state = plan.state
            first_chunk, state.fresh = state.fresh, False
            base = state.cached + len(plan.fed)        # where the draft's keys and values start
            state.cached = base + len(plan.drafted)
            st = state.stats
            st.target_forwards += 1
            st.batch_rows += len(plans)
            if self._predicted is not None:
                st.predicted_seconds += self._predicted
            if first_chunk:
                st.prefills += 1
            if first_chunk or not plan.complete:
                prefill_rows += 1
                st.prefill_seconds += seconds
            else:
                st.decode_seconds += seconds
            if not plan.complete:
                continue
            path, nxt = verdicts[id(state)]
            n_acc = len(path)
            accepted += n_acc
            draft, verified = plan.draft, []
            if draft is not None:
                st.draft_tokens += len(draft.tokens)
                st.accepted_tokens += n_acc
                verified = self._tally(plan, path)
                if draft.is_tree:
                    # the accepted branch's keys and values, moved behind the prefix; the rest dropped
                    if path != list(range(n_acc)):
                        self.runner.pool.move(state.slot, [base + i for i in path],  # type: ignore[arg-type]
                                              [base + k for k in range(n_acc)])
                    state.cached = base + n_acc
            tokens = [draft.tokens[i] for i in path] + [nxt] if draft else [nxt]
            origins = ([draft.origin(i) for i in path] if draft else []) + [TARGET] if self.config.provenance else []
            self._commit(state, tokens, origins, on_commit)
            for part, n_part in verified:
                self.drafters[part.source].accepted(state, part, n_part)
        drafted = sum(len(p.drafted) for p in plans)
        step_tokens = sum(len(p.fed) for p in plans) + drafted
        if self._predicted is not None and prefill_rows == 0 and len(plans) == 1:
            self.step_overhead = max(0.0, (1 - OVERHEAD_EWMA) * self.step_overhead
                                     + OVERHEAD_EWMA * (seconds - self._predicted))
        elif self.cost is not None and prefill_rows == 0 and len(plans) > 1:
            self.batch_residual.update(len(plans), drafted,
                                       seconds - self.cost(step_tokens, len(plans), self._context))
            self.measured_gain.update(len(plans), drafted, len(plans) + accepted, seconds)
        if self.on_step is not None:
            self.on_step(StepRecord(len(plans), step_tokens, seconds, prefill_rows, self._predicted,
                                    drafted, accepted))

    def _tally(self, plan: _RowPlan, path: list[int]) -> list[tuple[Draft, int]]:
        """A verified draft's tokens into its request's stats and the measured acceptance: a
        copy draft's own nodes for its drafter, the nodes the draft model added below its best
        branch (``plan.extended``) for the draft model, whose first token was reached only if
        the accepted path went through the branch's leaf. Returns each drafter's part and how
        many of its tokens were accepted."""
        draft, st = plan.draft, plan.state.stats
        assert draft is not None
        parts = [(draft, len(path))]
        if plan.extended:
            ext = set(plan.extended)
            n_ext = sum(i in ext for i in path)
            parts = [(draft.kept([i for i in range(len(draft.tokens)) if i not in ext]), len(path) - n_ext)]
            if draft.parent(plan.extended[0]) in path:          # the branch's leaf was accepted
                parts.append((Draft([draft.tokens[i] for i in plan.extended], "draft_model"), n_ext))
            else:               # never reached: drafted, not verified
                st.by_drafter.setdefault("draft_model", DrafterStats()).drafted += len(ext)
        for part, n_acc in parts:
            depth = part.depth() if part.is_tree else None
            st.by_drafter.setdefault(part.source, DrafterStats()).add(len(part.tokens), n_acc, depth)
            self.acceptance.update(part.source, part.match_len, depth or len(part.tokens), n_acc)
        return parts

    @staticmethod
    def _row(plan: _RowPlan) -> Row:
        """The forward's row for a plan: the tokens the cache lacks, then the draft (a tree's
        nodes hang below the pending token, the last fed one)."""
        fed, draft = plan.fed, plan.draft
        parents = None
        if draft is not None and draft.is_tree:
            root = len(fed) - 1
            parents = list(range(-1, root)) + [root if p < 0 else len(fed) + p for p in draft.parents]  # type: ignore[union-attr]
        return Row(plan.state.slot, plan.state.cached, fed + plan.drafted,  # type: ignore[arg-type]
                   len(fed) - 1 if plan.complete else len(fed), parents)

    def _plan(self, rows: list[SequenceState]) -> list[_RowPlan]:
        """What each row feeds. Short rows (decode tokens, small extensions) are fed whole; long
        ones (prompts) get what is left of the step's token budget, in chunks, oldest first. A
        row whose feed reaches its pending token may draft, within what is left after that."""
        cfg = self.config
        feeds = [s.tokens[s.cached:] for s in rows]
        decoding = any(len(f) <= SHORT_ROW for f in feeds)
        budget = cfg.max_tokens_per_step if decoding else max(cfg.max_prefill_tokens, cfg.max_tokens_per_step)
        used = sum(len(f) for f in feeds if len(f) <= SHORT_ROW)
        plans: list[_RowPlan] = []
        for state, fed in zip(rows, feeds):
            if len(fed) > SHORT_ROW:
                avail = budget - used
                if len(fed) > avail:
                    if avail < SHORT_ROW and used > 0:
                        continue             # waits for a step with room
                    fed = fed[:max(avail, SHORT_ROW)]
                    plans.append(_RowPlan(state, fed, complete=False))
                    used += len(fed)
                    continue
                used += len(fed)
            plans.append(_RowPlan(state, fed, complete=True))
        left = budget - used
        for plan in plans:
            state = plan.state
            if not plan.complete or not state.drafters:
                continue
            remaining = state.draft_room
            if remaining > 1:
                plan.draft_limit = max(0, min(remaining, state.max_draft, left))
                plan.node_limit = (max(0, min(cfg.max_tree_nodes, left)) if "tree" in state.drafters
                                   else plan.draft_limit)
                left -= max(plan.draft_limit, plan.node_limit)
        return plans

    def _draft(self, plans: list[_RowPlan]) -> None:
        """Each row's drafters in its order of preference: at every rank, each drafter drafts
        (batched) for the rows that put it there and are still without a draft. With the cost
        model, copy drafters propose their longest draft, a row whose turn reaches the draft
        model waits, then every row's length is chosen for the whole step and the draft model
        drafts just that many tokens."""
        if self.cost is not None and self._skip_proposals(plans):
            return
        depth = max((len(p.state.drafters) for p in plans), default=0)
        for rank in range(depth):
            for name, drafter in self.drafters.items():
                want = [p for p in plans if p.draft_limit > 0 and p.draft is None and not p.defer
                        and len(p.state.drafters) > rank and p.state.drafters[rank] == name]
                if not want:
                    continue
                if self.cost is not None and isinstance(drafter, ModelDrafter):
                    for p in want:
                        p.defer = True
                    continue
                tree = isinstance(drafter, TreeDrafter)
                self._assign(want, drafter.propose_batch([p.state for p in want],
                                                         [p.node_limit if tree else p.draft_limit for p in want]))
        if self.cost is not None:
            self._size(plans)
        else:
            model = self.drafters.get("draft_model")
            for p in plans:
                room = self._extension_room(p, model)
                if room and p.draft is not None:
                    p.draft = p.draft.extended(room)
        self._fill_extensions(plans)

    def _extension_room(self, plan: _RowPlan, model: Drafter | None) -> int:
        """How many draft-model tokens may follow the best branch of a row's copy draft (a
        tree's or a chain's): where the row asks the draft model after the copy drafter, within
        the row's depth and node limits and the draft model's own."""
        draft = plan.draft
        order = plan.state.drafters
        if (not isinstance(model, ModelDrafter) or draft is None or draft.source == model.name
                or model.name not in order or order.index(model.name) < order.index(draft.source)):
            return 0
        room = min(plan.draft_limit - len(draft.best_nodes()), model.max_draft)
        if draft.is_tree:
            room = min(room, plan.node_limit - len(draft.tokens))
        return max(0, room)

    def _fill_extensions(self, plans: list[_RowPlan]) -> None:
        """The draft model drafts, in one batch, the placeholders ``Draft.extended`` put below
        rows' best branches, continuing from each branch; placeholders it leaves unfilled (its
        adaptive length is shorter) are dropped."""
        todo = [(p, [i for i, t in enumerate(p.draft.tokens) if t == EXTENSION])
                for p in plans if p.draft is not None and EXTENSION in p.draft.tokens]
        if not todo:
            return
        model = self.drafters["draft_model"]
        branches = [[p.draft.tokens[i] for i in p.draft.path_to(p.draft.parent(holes[0]))]  # type: ignore[union-attr]
                    for p, holes in todo]
        drafts = model.propose_batch([p.state for p, _ in todo], [len(h) for _, h in todo],  # type: ignore[call-arg]
                                     after=branches)
        for (p, holes), got in zip(todo, drafts):
            filled = got.tokens[:len(holes)] if got is not None else []
            draft = p.draft
            assert draft is not None
            for i, tok in zip(holes, filled):
                draft.tokens[i] = tok
            dropped = set(holes[len(filled):])
            keep = [i for i in range(len(draft.tokens)) if i not in dropped]
            new_index = {old: new for new, old in enumerate(keep)}
            p.draft = draft.kept(keep) if dropped else draft
            p.extended = [new_index[i] for i in holes[:len(filled)]]

    def _skip_proposals(self, plans: list[_RowPlan]) -> bool:
        """Whether this step's rows skip drafting: a batch whose size's last sizings took none of
        the drafts proposed (a full batch where verification does not pay) or whose steps with
        drafts measured slower than its steps without (``measured_gain``); and now and then a
        step of a batch that drafts, to measure the other side (``MeasuredGain.explore``).
        Proposing costs every row a lookup (~0.1 ms each in Python: ~1.5 ms of a 16-row step)
        for drafts that would be dropped; the pause doubles (up to PROPOSAL_PAUSE_MAX steps)
        while they keep being dropped or losing, and ends when a sizing takes one and drafting
        has not measured slower, so drafting resumes where it pays again."""
        if len(plans) < 2:
            return False
        pause = self._proposal_pause.get(StepResidual.bucket(len(plans)))
        if pause and pause[0] > 0:
            pause[0] -= 1
        elif not self.measured_gain.explore(len(plans)):
            return False
        self._predicted = self.cost(sum(len(p.fed) for p in plans), len(plans), self._context)  # type: ignore[misc]
        return True

    def _note_choice(self, rows: int, proposed: bool, chosen: int) -> None:
        """After a batch's sizing: its size's pause of proposals ends where the cost model took a
        draft and drafting has not measured slower than not drafting at this row count
        (``measured_gain``); otherwise the next pause, twice the last, starts."""
        if rows < 2 or not proposed:
            return
        pause = self._proposal_pause.setdefault(StepResidual.bucket(rows), [0, 1])
        if chosen and not self.measured_gain.loses(rows):
            pause[:] = [0, 1]
        else:
            pause[:] = [pause[1], min(2 * pause[1], PROPOSAL_PAUSE_MAX)]

    def _assign(self, plans: list[_RowPlan], drafts: list[Draft | None]) -> None:
        for plan, draft in zip(plans, drafts):
            if draft is not None and draft.is_tree and self.batch_invariant and not self.invariant_trees:
                # the batch-invariant forward verifies a tree as its heaviest path: torch's
                # invariant attention cannot compute a node whose ancestors are not where plain
                # decoding puts them, and with our kernel, which can, whole bf16 trees measured
                # no more tokens per forward than their heaviest path and cost more per step
                # (README, Draft trees)
                draft = draft.best_path()
            if draft is not None and draft.tokens:
                plan.draft = draft.trimmed(plan.node_limit if draft.is_tree else plan.draft_limit)

    def _size(self, plans: list[_RowPlan]) -> None:
        """The cost model's draft length for every row of the step (0: no draft)."""
        model = self.drafters.get("draft_model")
        candidates: list[Candidate | None] = []
        for p in plans:
            if p.draft is not None:
                candidates.append(self._copy_candidate(p, model))
            elif p.defer and isinstance(model, ModelDrafter):
                candidates.append(Candidate(model.name, 0, min(p.draft_limit, model.max_draft)))
            else:
                candidates.append(None)
        overhead, per_draft = ((self.step_overhead, 0.0) if len(plans) == 1
                               else self.batch_residual.terms(len(plans)))
        lengths, self._predicted, _ = choose_lengths(candidates, sum(len(p.fed) for p in plans), len(plans),
                                                     self.cost, self.acceptance,  # type: ignore[arg-type]
                                                     overhead, per_draft, self._context)
        self._note_choice(len(plans), any(c is not None for c in candidates), sum(lengths))
        deferred: list[_RowPlan] = []
        for p, k in zip(plans, lengths):
            if p.draft is not None:
                p.draft = None if k == 0 else p.draft.trimmed(k)
            elif p.defer and k > 0:
                p.draft_limit = k
                deferred.append(p)
        if deferred and model is not None:
            self._assign(deferred, model.propose_batch([p.state for p in deferred], [p.draft_limit for p in deferred]))

    def _copy_candidate(self, plan: _RowPlan, model: Drafter | None) -> Candidate:
        """A copy draft's candidate for the cost model, with the gain of every token
        (``copy_gains``: a tree's nodes ranked by it, so any first k are a tree). Where the
        draft model may extend the best branch, placeholders for its tokens follow the branch's
        leaf, each gaining the leaf's gain x the draft model's measured rates."""
        assert plan.draft is not None
        draft, gains = copy_gains(plan.draft, self.acceptance)
        room = self._extension_room(plan, model)
        if room:
            leaf = gains[draft.best_nodes()[-1]]
            rates = self.acceptance.rates(model.name, 0, room)  # type: ignore[union-attr]
            gains = gains + [leaf * g for g in itertools.accumulate(rates, operator.mul)]
            draft = draft.extended(room)
            if draft.is_tree:
                draft = draft.ranked(gains)
                gains = sorted(gains, reverse=True)
        plan.draft = draft
        return Candidate(draft.source, draft.match_len, len(draft.tokens), gains)

    def _verify(self, plans: list[_RowPlan], logits: torch.Tensor) -> dict[int, tuple[list[int], int]]:
        """(accepted draft indices, next token) per complete row, from the one forward's logits,
        with one host synchronisation for the greedy rows and one for the sampled rows. A row's
        logits are the pending token's, then one per draft token (tree nodes included)."""
        spans: list[tuple[_RowPlan, int, int]] = []
        offset = 0
        for plan in plans:
            if plan.complete:
                n = len(plan.drafted) + 1
                spans.append((plan, offset, n))
                offset += n
        out: dict[int, tuple[list[int], int]] = {}
        greedy = [s for s in spans if s[0].state.sampling.greedy]
        if greedy:
            predicted = logits.argmax(-1).tolist()
            for plan, off, n in greedy:
                out[id(plan.state)] = self._accept(plan, predicted[off:off + n])
        sampled = [s for s in spans if not s[0].state.sampling.greedy]
        if sampled:
            # every sampled row's tokens at once: the logits after a draft token at depth d give
            # the token at index len(tokens) + d, drawn at its answer position's keyed uniform
            probs = torch.cat([warp_probs(logits[off:off + n], plan.state.sampling) for plan, off, n in sampled])
            uniforms = []
            for plan, _, n in sampled:
                depths = [0] + (plan.draft.depths() if plan.draft else [])
                keyed = draws(plan.state, max(depths) + 1)
                uniforms += [keyed[d] for d in depths]
            tokens = sample_at(probs, uniforms).tolist()
            at = 0
            for plan, _, n in sampled:
                out[id(plan.state)] = self._accept(plan, tokens[at:at + n])
                at += n
        return out

    @staticmethod
    def _accept(plan: _RowPlan, target_tokens: list[int]) -> tuple[list[int], int]:
        """The accepted draft indices and the next token, given the target's token after the
        pending token and after each draft token."""
        draft = plan.draft
        if draft is not None and draft.is_tree:
            return tree_accept(draft.tokens, draft.parents, target_tokens)  # type: ignore[arg-type]
        n, nxt = greedy_accept(plan.drafted, target_tokens)
        return list(range(n)), nxt

    # ---- driving loops --------------------------------------------------------------------
    def begin(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None) -> list[SequenceState]:
        """Prefill the requests together (each verifying a first draft in the same forward) and
        commit their first token(s)."""
        states = [self.new_state(req) for req in requests]
        while any(s.cached < s.n_prompt and self.active(s) for s in states):
            self.step(states, on_commit)
            self._raise_errors(states)
        return states

    def run(self, states: list[SequenceState], on_commit: CommitCallback | None = None) -> None:
        """Step until every sequence is finished or has reached its ``pause_at``."""
        while any(self.active(s) for s in states):
            self.step(states, on_commit)
            self._raise_errors(states)

    @staticmethod
    def _raise_errors(states: list[SequenceState]) -> None:
        for state in states:
            if state.error is not None:
                raise state.error

    def truncate(self, state: SequenceState, n_generated: int) -> None:
        """Roll a sequence back to its first ``n_generated`` generated tokens (tokens and KV)."""
        del state.tokens[state.n_prompt + n_generated:]
        del state.origins[n_generated:]
        state.ahead, state.ahead_origins = [], []
        state.cached = min(state.cached, len(state.tokens) - 1)
        state.streamer.truncate(n_generated)
        state.finished, state.finish_reason = False, None

    def extend(self, state: SequenceState, tokens: list[int]) -> None:
        """Append known tokens to a sequence as if it had generated them (a caller continuing it
        after tokens chosen elsewhere); the next step feeds them with its draft in one forward
        instead of a re-prefill of the whole sequence."""
        if state.finished:
            raise GenerationInputError("cannot extend a finished sequence")
        if state.ahead:       # verified for a continuation that did not happen
            state.ahead, state.ahead_origins = [], []
            state.cached = min(state.cached, len(state.tokens) - 1)
        state.tokens.extend(tokens)
        if self.config.provenance:
            state.origins.extend([GIVEN] * len(tokens))
        for tok in tokens:
            state.streamer.push(tok)

    def result(self, state: SequenceState) -> GenerationResult:
        return GenerationResult(state.generated, state.text, state.finish_reason or "length", state.stats,
                                list(state.origins), state.streamer.token_ends(len(state.generated)))

    def generate(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None) -> list[GenerationResult]:
        states: list[SequenceState] = []
        try:
            states = self.begin(requests, on_commit)
            self.run(states, on_commit)
        finally:
            for state in states:
                self.release(state)
        return [self.result(s) for s in states]

    def generate_one(self, request: GenerationRequest, on_commit: CommitCallback | None = None) -> GenerationResult:
        return self.generate([request], on_commit)[0]
