"""The speculative decoding engine: draft -> one target forward -> verify -> commit -> roll back.

Invariant of every sequence: the target's KV cache holds a prefix of ``tokens[:-1]``; a step
feeds what it lacks (the pending last token; the whole prompt for a new sequence; tokens a caller
appended with ``extend``) together with the drafts, in one forward. So a prefill verifies a draft
as well, and a sequence can be continued with known tokens without a re-prefill. A sequence
paused at a stride boundary may have drafted past it: the tokens verified there wait in
``ahead`` (their KV kept) and are committed without a forward if it continues. Rejected drafts
are removed from the cache by cropping it (never a re-prefill), so a step costs one target
forward whatever happens.

The step API takes a list of sequences; today it runs them one after another, so batched
verification can slot in later without callers changing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .drafters import ChainDrafter, Draft, Drafter, ModelDrafter, NgramDrafter
from .errors import GenerationInputError
from .kv import cache_length, new_cache, rollback
from .text import StopStringStreamer
from .verify import SamplingParams, greedy_verify, sample_from, speculative_verify, warp_probs

# on_commit(state, new_token_ids, text_delta)
CommitCallback = Callable[["SequenceState", list[int], str], None]


@dataclass
class EngineConfig:
    """Which drafters run, in order of preference, and how long their drafts may be.

    drafters: any of "reference" (LLMA: references + prompt + output), "prompt_lookup"
    (prompt + output only), "draft_model" (needs a draft model). Empty: no speculation.
    """

    drafters: tuple[str, ...] = ("reference", "draft_model")
    max_draft_tokens: int = 16
    max_ngram: int = 8
    prompt_lookup_max_ngram: int = 3
    # Shortest suffix match the reference drafter drafts from. None: 1 on a GPU, where a forward over 16 tokens
    # costs about one over 1; 3 on a CPU, where any multi-token forward costs ~1.8x a one-token
    # one and 1-2 token matches were measured to yield only ~0.3 accepted tokens per step
    # (benchmarks/bench_engine.py profile). Speed only: verification decides every token.
    min_ngram: int | None = None
    draft_model_max_tokens: int = 6


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
    pause_at: int | None = None             # initial SequenceState.pause_at (the prefill respects it)
    # draft and verify past a pause; the verified tokens there wait in SequenceState.ahead
    draft_past_pause: bool = False


@dataclass
class DrafterStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    target_forwards: int = 0          # prefills + decode steps; each yields >= 1 token
    prefills: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    by_drafter: dict[str, DrafterStats] = field(default_factory=dict)

    @property
    def mean_accepted_per_forward(self) -> float:
        return self.generated_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        seconds = self.prefill_seconds + self.decode_seconds
        return self.generated_tokens / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_accepted_per_forward"] = round(self.mean_accepted_per_forward, 4)
        d["tokens_per_second"] = round(self.tokens_per_second, 3)
        d["acceptance_rate"] = round(self.accepted_tokens / self.draft_tokens, 4) if self.draft_tokens else 0.0
        return d

    def merge(self, other: "GenerationStats") -> None:
        """Add another run's counts (the iterative pipeline runs several sequences per answer)."""
        for name in ("generated_tokens", "target_forwards", "prefills", "draft_tokens", "accepted_tokens",
                     "prefill_seconds", "decode_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.by_drafter.items():
            mine = self.by_drafter.setdefault(k, DrafterStats())
            mine.steps += v.steps
            mine.drafted += v.drafted
            mine.accepted += v.accepted


@dataclass
class SequenceState:
    request: GenerationRequest
    tokens: list[int]                       # prompt + generated; tokens[-1] is pending
    n_prompt: int
    cache: Any
    sampling: SamplingParams
    generator: torch.Generator | None
    streamer: StopStringStreamer
    drafter: Drafter | None
    references: list[list[int]]
    stats: GenerationStats
    drafter_state: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    finish_reason: str | None = None        # "stop" (EOS / stop string) | "length"
    pause_at: int | None = None             # generated-token count at which run() returns
    # tokens verified past the pause, committed (without a forward) when the sequence continues;
    # the cache holds the KV of all but the last of them
    ahead: list[int] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    @property
    def text(self) -> str:
        return self.streamer.text


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats


class SpeculativeEngine:
    """Owns the decoding loop for one target model (and optional draft model)."""

    def __init__(self, target: Any, tokenizer: Any, draft: Any | None = None,
                 config: EngineConfig | None = None) -> None:
        self.target = target
        self.tokenizer = tokenizer
        self.draft = draft
        self.config = config or EngineConfig()
        self.device = next(target.parameters()).device
        self.eos_ids = self._eos_ids()
        self.context_tokens = int(getattr(target.config, "max_position_embeddings", 0) or 0)

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
        if self.config.min_ngram is not None:
            return max(1, self.config.min_ngram)
        return 1 if self.device.type == "cuda" else 3

    def _make_drafter(self, request: GenerationRequest) -> Drafter | None:
        if not request.speculate:
            return None
        max_draft = request.max_draft_tokens or self.config.max_draft_tokens
        drafters: list[Drafter] = []
        for name in self.config.drafters:
            if name == "reference":
                drafters.append(NgramDrafter("reference", max_draft, self.config.max_ngram,
                                             min(self._min_ngram(), self.config.max_ngram)))
            elif name == "prompt_lookup":
                # kept like transformers' / vLLM's n-gram lookup (matches down to 1 token)
                drafters.append(NgramDrafter("prompt_lookup", max_draft, self.config.prompt_lookup_max_ngram,
                                             use_references=False))
            elif name == "draft_model":
                if self.draft is not None:
                    drafters.append(ModelDrafter(self.draft, max_draft=min(max_draft, self.config.draft_model_max_tokens)))
            else:
                raise GenerationInputError(f"unknown drafter {name!r}: use reference, prompt_lookup or draft_model")
        if not drafters:
            return None
        return drafters[0] if len(drafters) == 1 else ChainDrafter(drafters)

    # ---- lifecycle ------------------------------------------------------------------------
    def _new_state(self, request: GenerationRequest) -> SequenceState:
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
        generator = None
        if not request.sampling.greedy:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        state = SequenceState(
            request=request, tokens=list(request.prompt_ids), n_prompt=len(request.prompt_ids),
            cache=new_cache(self.target), sampling=request.sampling, generator=generator,
            streamer=StopStringStreamer(self.tokenizer, request.stop), drafter=self._make_drafter(request),
            references=[list(r) for r in request.references], stats=GenerationStats(prompt_tokens=len(request.prompt_ids)),
            pause_at=request.pause_at,
        )
        if state.drafter is not None:
            state.drafter.begin(state)
        return state

    def _forward(self, state: SequenceState, ids: list[int], keep: int) -> torch.Tensor:
        out = self.target(input_ids=torch.tensor([ids], device=self.device), past_key_values=state.cache,
                          use_cache=True, logits_to_keep=keep)
        state.stats.target_forwards += 1
        return out.logits[0].float()

    def _pick(self, state: SequenceState, logits: torch.Tensor) -> int:
        if state.sampling.greedy:
            return int(logits.argmax())
        return sample_from(warp_probs(logits, state.sampling), state.generator)

    def _commit(self, state: SequenceState, new_tokens: list[int], on_commit: CommitCallback | None) -> None:
        """Append tokens one by one, stopping at EOS, a stop string, the length limit or a pause
        (where the rest waits in ``state.ahead``); then make the cache hold exactly
        (tokens + ahead)[:-1]."""
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
        state.ahead = list(new_tokens[len(committed):]) if paused and not state.finished else []
        rollback(state.cache, len(state.tokens) + len(state.ahead) - 1)
        state.stats.generated_tokens += len(committed)
        if on_commit is not None and (committed or delta):
            on_commit(state, committed, delta)

    # ---- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, states: list[SequenceState], on_commit: CommitCallback | None = None) -> None:
        """One draft + verify round for every active sequence."""
        for state in states:
            if not state.finished and not self._paused(state):
                self._step_one(state, on_commit)

    def _paused(self, state: SequenceState) -> bool:
        return state.pause_at is not None and len(state.generated) >= state.pause_at

    def _step_one(self, state: SequenceState, on_commit: CommitCallback | None) -> None:
        t0 = time.perf_counter()
        if state.ahead:        # verified by an earlier forward: no forward now
            ahead, state.ahead = state.ahead, []
            self._commit(state, ahead, on_commit)
            state.stats.decode_seconds += time.perf_counter() - t0
            return
        remaining = state.request.max_new_tokens - len(state.generated)
        if state.pause_at is not None and not state.request.draft_past_pause:
            remaining = min(remaining, state.pause_at - len(state.generated))
        draft: Draft | None = None
        if state.drafter is not None and remaining > 1:
            # `remaining` drafts + the bonus token may overshoot the limit by one: _commit trims
            draft = state.drafter.propose(state, remaining)
        drafted = draft.tokens if draft else []
        cached = cache_length(state.cache)
        assert cached <= len(state.tokens) - 1, "KV cache out of step with tokens"
        fed = state.tokens[cached:]          # the pending token, or a prompt / extension to prefill
        logits = self._forward(state, fed + drafted, keep=len(drafted) + 1)
        if state.sampling.greedy:
            n_acc, nxt = greedy_verify(drafted, logits)
        else:
            n_acc, nxt = speculative_verify(drafted, warp_probs(logits, state.sampling),
                                            draft.probs if draft else None, state.generator)
        if draft is not None:
            st = state.stats.by_drafter.setdefault(draft.source, DrafterStats())
            st.steps += 1
            st.drafted += len(drafted)
            st.accepted += n_acc
            state.stats.draft_tokens += len(drafted)
            state.stats.accepted_tokens += n_acc
        self._commit(state, drafted[:n_acc] + [nxt], on_commit)
        if draft is not None:
            state.drafter.accepted(state, draft, n_acc)
        if cached == 0:        # a prompt; an extension is a decode step over a few tokens
            state.stats.prefills += 1
            state.stats.prefill_seconds += time.perf_counter() - t0
        else:
            state.stats.decode_seconds += time.perf_counter() - t0

    # ---- driving loops --------------------------------------------------------------------
    def begin(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None) -> list[SequenceState]:
        """Prefill each request (verifying a first draft in the same forward) and commit its
        first token(s)."""
        states = [self._new_state(req) for req in requests]
        with torch.inference_mode():
            for state in states:
                self._step_one(state, on_commit)
        return states

    def run(self, states: list[SequenceState], on_commit: CommitCallback | None = None) -> None:
        """Step until every sequence is finished or has reached its ``pause_at``."""
        while any(not s.finished and not self._paused(s) for s in states):
            self.step(states, on_commit)

    def truncate(self, state: SequenceState, n_generated: int) -> None:
        """Roll a sequence back to its first ``n_generated`` generated tokens (tokens and KV)."""
        del state.tokens[state.n_prompt + n_generated:]
        state.ahead = []
        rollback(state.cache, len(state.tokens) - 1)
        state.streamer.truncate(n_generated)
        state.finished, state.finish_reason = False, None

    def extend(self, state: SequenceState, tokens: list[int]) -> None:
        """Append known tokens to a sequence as if it had generated them (a caller continuing it
        after tokens chosen elsewhere); the next step feeds them with its draft in one forward
        instead of a re-prefill of the whole sequence."""
        if state.finished:
            raise GenerationInputError("cannot extend a finished sequence")
        if state.ahead:       # verified for a continuation that did not happen
            state.ahead = []
            rollback(state.cache, len(state.tokens) - 1)
        state.tokens.extend(tokens)
        for tok in tokens:
            state.streamer.push(tok)

    def generate(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None) -> list[GenerationResult]:
        states = self.begin(requests, on_commit)
        self.run(states, on_commit)
        return [GenerationResult(s.generated, s.text, s.finish_reason or "length", s.stats) for s in states]

    def generate_one(self, request: GenerationRequest, on_commit: CommitCallback | None = None) -> GenerationResult:
        return self.generate([request], on_commit)[0]
