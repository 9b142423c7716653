"""Iterative retrieval (In-Context RALM) and its speculative form (RaLMSpec).

Every ``stride`` generated tokens the last ``query_tokens`` tokens of question + answer so far
are the query; the top-1 chunk sits before the question, replacing the previous one.

Modes (all give the same tokens; the first is the reference output):
* baseline (``speculation.enabled`` False): real retrieval every stride, a fresh prefill of
  [chunk; question; answer so far] every stride, plain greedy decoding -- as RaLMSpec's baseline.
* ``kv_reuse``: the same, but every chunk keeps its own sequence (KV cache): when a stride's chunk
  equals the previous one generation just continues; when it is one used earlier, that sequence
  is fed the answer tokens it has not seen (one forward over a few tokens, with the step's draft)
  instead of a re-prefill of [chunk; question; answer so far]. Only a new chunk costs a prefill.
* speculative (``speculation.enabled``): a per-request cache of chunks answers retrievals (best
  chunk in the cache by the retriever's own metric); every s strides one batched real retrieval
  verifies them (in a background thread while the next stride is generated, unless
  ``async_verification`` is off); at the first mismatch the answer and the KV cache roll back to
  that stride, which is redone with the true chunk. Verified results add their top ``prefetch``
  to the cache. Token speculation runs inside every stride.

Exactness: a speculated chunk is used only until its verification; any mismatch rolls back, so
every committed stride was generated with the chunk the real retriever returns for its query.

Streaming: text is sent as strides commit -- every stride in the baseline, the verified prefix
after each verification in the speculative mode -- so a rolled-back stride is never sent and
text sent is never retracted. Stop strings and EOS are applied as tokens commit (generation
stops there); ``cancelled`` is polled before every stride.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

from .api import AskRequest, AskResult, Source, TextDelta
from .errors import RequestStopped
from .generation import RequestBuilder, answer_stats, check_question
from .prompts import iterative_prompt
from .provenance import OriginStream, TokenOrigin, attribute, token_origins
from .scheduler import StrideScheduler

NO_DOC = Source(id="", title="", source="", score=0.0, text="")   # a retriever that found nothing


def _top1(hits: list[Source]) -> Source:
    return hits[0] if hits else NO_DOC


@dataclass
class _Stride:
    query: str
    doc: Source
    answer_start: int        # answer length when the stride began
    answer_end: int          # ... and when it ended
    vec: Any = None          # the query's embedding, computed once for speculation and verification


@dataclass
class IterativeOptions:
    """How the iterative answer runs. What a request sets (stride, query length, speculation
    stride, asynchronous verification, prefetch) is read from its ``RetrievalOptions``; these
    are the mode switches and the knobs a request does not expose."""

    speculative_retrieval: bool = True
    kv_reuse: bool = True
    token_speculation: bool = True
    # token speculation drafts from the cached chunks too (most recent first, up to this many tokens)
    reference_tokens: int = 4096
    # KV reuse keeps the sequences of this many most recently used chunks
    kv_chunks: int = 8
    # token speculation drafts past the stride's end; what verifies there is used if the next
    # stride keeps the chunk (else dropped)
    draft_across_strides: bool = True
    # tests force rollbacks by seeding the cache with wrong chunks
    seed_cache: list[Source] | None = None
    seed_with_first_retrieval: bool = True

    @classmethod
    def for_request(cls, request: AskRequest) -> "IterativeOptions":
        spec = request.speculation.enabled
        return cls(speculative_retrieval=spec, kv_reuse=spec, token_speculation=spec)


class IterativeAnswer:
    """One iterative answer.

    ``engine`` is the stage's engine (``begin``/``run``/``truncate``/``extend``/``release``,
    ``eos_ids``), ``retrieval`` has ``retrieve`` and ``score_local`` (and, in this process,
    ``embed_queries``), ``requests`` builds the engine requests."""

    def __init__(self, engine: Any, tokenizer: Any, retrieval: Any, requests: RequestBuilder,
                 request: AskRequest, options: IterativeOptions | None = None) -> None:
        check_question(request)
        self.engine, self.tok, self.retrieval, self.requests = engine, tokenizer, retrieval, requests
        if request.temperature > 0 and request.seed is None:
            # one key for the draws of all this answer's sequences: the sampler keys them by
            # answer position, so every stride, rolled back or re-prefilled, draws the same
            request = replace(request, seed=secrets.randbits(63))
        self.request = request
        self.params = request.retrieval
        self.opt = options or IterativeOptions.for_request(request)
        self.question_ids = self.tok.encode(request.question, add_special_tokens=False)
        self.answer: list[int] = []            # committed tokens, then those of unverified strides
        self.answer_origins: list[TokenOrigin] = []   # their provenance (pipeline/provenance.py)
        self.stride_log: list[tuple[int, int, str]] = []   # (answer start, end, chunk id) per stride
        self.state_refs: dict[int, list[Source]] = {}      # per sequence: the sources of its references
        self.finished = False                  # the generated answer reached EOS or its budget
        self.finish_reason = "length"
        self.states: dict[int, Any] = {}       # every engine state used, for the stats
        self.counts = {"real": 0, "speculated": 0, "verified": 0, "mismatched": 0, "batches": 0}
        self.seconds = {"retrieval": 0.0}
        self._lock = threading.Lock()          # counts/seconds are updated from the verification thread too
        # embed each query once and reuse the vector for local scoring and verification; only for a
        # retrieval stage in this process (a remote one embeds where the model lives)
        self._vectors = callable(getattr(type(retrieval), "embed_queries", None))
        fixed = None if self.params.speculation_stride == "auto" else int(self.params.speculation_stride)
        self.scheduler = StrideScheduler(fixed=fixed, asynchronous=self.params.async_verification)
        self.cache: dict[str, Source] = {}
        self.doc_states: OrderedDict[str, tuple[Any, int]] = OrderedDict()   # chunk id -> (sequence, head length)
        # strides that prefilled a new sequence / continued the previous stride's / resumed an earlier one
        self.chunk_sequences = {"new": 0, "continued": 0, "resumed": 0}
        self.sources_used: dict[str, Source] = {}
        self.source_index: dict[str, int] = {}         # position of each in sources_used
        # the committed answer: what has been verified, streamed through the stop-string filter
        self.committed = 0
        self.kept: list[int] = []
        self.kept_origins: list[TokenOrigin] = []
        self._origins: OriginStream | None = None
        self.done = False                      # committed text reached EOS, a stop string or the budget
        self._streamer: Any = None
        self._on_text: Callable[[str], None] | None = None
        self._cancelled: Callable[[], bool] | None = None

    # ---- building blocks ---------------------------------------------------------------------
    def _query(self, answer_len: int) -> str:
        ids = (self.question_ids + self.answer[:answer_len])[-self.params.query_tokens:]
        return self.tok.decode(ids, skip_special_tokens=True)

    def _real(self, queries: list[str], k: int, vecs: list[Any] | None = None) -> list[list[Source]]:
        t0 = time.perf_counter()
        retriever = self.params.retriever
        if vecs is not None and all(v is not None for v in vecs):
            import numpy as np

            hits = self.retrieval.retrieve(queries, k, retriever, query_vecs=np.stack(vecs))
        else:
            hits = self.retrieval.retrieve(queries, k, retriever)
        with self._lock:
            self.seconds["retrieval"] += time.perf_counter() - t0
            self.counts["real"] += len(queries)
            self.counts["batches"] += 1
        return hits

    def _speculate(self, query: str) -> tuple[Source, Any]:
        """The best chunk in the local cache by the retriever's own metric, and the query's
        embedding (None for bm25) for the verification to reuse."""
        t0 = time.perf_counter()
        ids = list(self.cache)
        if not ids:
            return NO_DOC, None
        retriever = self.params.retriever
        vec = self.retrieval.embed_queries([query], retriever) if self._vectors else None
        vec = None if vec is None else vec[0]
        if vec is not None:
            scores = self.retrieval.score_local(query, ids, retriever, query_vec=vec)
        else:
            scores = self.retrieval.score_local(query, ids, retriever)
        best = max(range(len(ids)), key=lambda i: (scores[i], -i))
        with self._lock:
            self.seconds["retrieval"] += time.perf_counter() - t0
            self.counts["speculated"] += 1
        return self.cache[ids[best]], vec

    def _references(self, doc: Source) -> list[Source]:
        """The cached chunks other than ``doc`` (which is in the prompt), most recently cached
        first, up to ``reference_tokens`` tokens: drafting material for token speculation."""
        if not self.opt.token_speculation or self.opt.reference_tokens <= 0:
            return []
        refs: list[Source] = []
        total = 0
        for source in reversed(list(self.cache.values())):
            if source.id == doc.id or not source.id:
                continue
            n = len(self.requests.reference_ids(source))
            if total + n > self.opt.reference_tokens:
                break
            refs.append(source)
            total += n
        return refs

    def _use(self, doc: Source) -> None:
        if doc.id and doc.id not in self.sources_used:
            self.sources_used[doc.id] = doc
            self.source_index[doc.id] = len(self.source_index)

    def _add_to_cache(self, sources: list[Source]) -> None:
        for s in sources:
            self.cache.setdefault(s.id, s)

    def _check_cancelled(self) -> None:
        if self._cancelled is not None and self._cancelled():
            raise RequestStopped("the client went away")

    def _run_stride(self, doc: Source, query: str = "", vec: Any = None) -> _Stride:
        """Generate one stride with ``doc`` before the question. With KV reuse, a chunk used
        before (by the previous stride or any earlier one) continues its own sequence: the
        answer tokens it has not seen are fed with the next step's draft in one forward (none
        when the previous stride had the same chunk); only a new chunk costs a full prefill."""
        self._check_cancelled()
        start = len(self.answer)
        budget = self.request.max_tokens - start
        state = self._resume(doc, start) if self.opt.kv_reuse else None
        if state is not None:
            gen_start = len(state.generated)
            state.pause_at = gen_start + self.params.stride
            self.engine.run([state])
        else:
            head = iterative_prompt(self.tok, self.request.question, doc)
            refs = self._references(doc)
            req = self.requests.engine_request(
                self.request, head + self.answer, [self.requests.reference_ids(r) for r in refs], budget, stop=[],
                speculate=self.opt.token_speculation, pause_at=self.params.stride,
                draft_past_pause=self.opt.draft_across_strides and self.opt.kv_reuse, answer_start=len(head))
            (state,) = self.engine.begin([req])
            self.engine.run([state])
            gen_start = 0
            self.states[id(state)] = state
            self.state_refs[id(state)] = refs
            self.chunk_sequences["new"] += 1
            if self.opt.kv_reuse:
                self.doc_states[doc.id] = (state, len(head))
                while len(self.doc_states) > self.opt.kv_chunks:
                    self.doc_states.popitem(last=False)
        if doc.id in self.doc_states:
            self.doc_states.move_to_end(doc.id)
        self.answer.extend(state.generated[gen_start:])
        self.answer_origins.extend(token_origins(state.origins[gen_start:], self.state_refs[id(state)]))
        self.stride_log.append((start, len(self.answer), doc.id))
        if state.finished or len(self.answer) >= self.request.max_tokens:
            self.finished = True
            self.finish_reason = state.finish_reason or "length"
        return _Stride(query=query, doc=doc, answer_start=start, answer_end=len(self.answer), vec=vec)

    def _resume(self, doc: Source, start: int) -> Any:
        """The sequence last generated with ``doc``, brought to ``self.answer[:start]``: cut
        back to the part it shares with the answer (rollbacks leave it ahead or off course),
        then extended with the answer tokens it lacks. None when there is none, or when it
        diverges inside its prompt."""
        entry = self.doc_states.get(doc.id)
        if entry is None:
            return None
        state, head = entry
        had = state.tokens[head:]                  # the answer as this sequence knows it
        in_prompt = state.n_prompt - head          # answer tokens that were part of its prompt
        common, limit = 0, min(len(had), start)
        while common < limit and had[common] == self.answer[common]:
            common += 1
        if common < in_prompt:
            return None
        if common < len(had):
            self.engine.truncate(state, common - in_prompt)
        if common < start:
            self.engine.extend(state, self.answer[common:start])
        self.chunk_sequences["continued" if common == len(had) == start else "resumed"] += 1
        return state

    def _commit(self, upto: int) -> None:
        """The answer up to ``upto`` is verified: stream it, applying EOS, stop strings and
        the token budget as the tokens commit. What follows a stop is dropped."""
        eos = self.engine.eos_ids
        for t, origin in zip(self.answer[self.committed:upto], self.answer_origins[self.committed:upto]):
            self.committed += 1
            self.kept.append(t)
            self.kept_origins.append(origin)
            if origin[0] == "reference" and origin[1] in self.cache:
                self._use(self.cache[origin[1]])      # a chunk the answer copies from is one it used
            if t in eos:
                self.done, self.finish_reason = True, "stop"
                break
            delta = self._streamer.push(t)
            if delta:
                self._emit(delta)
            if self._streamer.stopped:
                self.done, self.finish_reason = True, "stop"
                break
            if len(self.kept) >= self.request.max_tokens:
                self.done, self.finish_reason = True, "length"
                break
        if self.done:
            del self.answer[self.committed:]
            del self.answer_origins[self.committed:]
        elif self.finished and self.committed >= len(self.answer):
            self.done = True

    def _roll_back(self, stride: _Stride) -> None:
        """Forget ``stride`` and everything after it (the sequences are cut back when next used,
        by ``_resume``)."""
        del self.answer[stride.answer_start:]
        del self.answer_origins[stride.answer_start:]
        while self.stride_log and self.stride_log[-1][0] >= stride.answer_start:
            self.stride_log.pop()
        self.finished = False
        self.finish_reason = "length"

    # ---- the loops -----------------------------------------------------------------------------
    def run(self, on_text: Callable[[str], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> AskResult:
        """The answer; ``on_text`` gets the text as strides commit. ``cancelled`` True (polled
        before every stride) raises :class:`RequestStopped`."""
        from speculation.text import StopStringStreamer

        t0 = time.perf_counter()
        self._streamer = StopStringStreamer(self.tok, self.request.stop)
        self._origins = OriginStream(self.source_index)   # grows as chunks are used; positions never change
        self._on_text, self._cancelled = on_text, cancelled
        try:
            if self.opt.speculative_retrieval:
                self._run_speculative()
            else:
                self._run_baseline()
        finally:
            for state in self.states.values():     # the chunks' KV slots go back to the pool
                self.engine.release(state)
        last = self._streamer.finish()
        if last:
            self._emit(last)
        return self._result(t0)

    def _emit(self, delta: str) -> None:
        if self._on_text is not None:
            assert self._origins is not None
            self._on_text(TextDelta(delta, self._origins.take(delta, self._streamer.ends, self.kept_origins)))

    def _run_baseline(self) -> None:
        """In-Context RALM: retrieve for real, generate a stride, commit it."""
        while not self.done:
            query = self._query(len(self.answer))
            doc = _top1(self._real([query], 1)[0])
            self._use(doc)
            stride = self._run_stride(doc, query)
            self._commit(stride.answer_end)

    def _run_speculative(self) -> None:
        """RaLMSpec as a loop of four steps:

        1. speculate: generate strides on chunks chosen from the local cache, as many as the
           scheduler's stride (the first stride retrieves for real: it seeds the cache);
        2. verify: one batched real retrieval for their queries (in a background thread,
           overlapped with one more speculative stride, when asynchronous);
        3. commit the strides whose chunk the real retriever returned, up to the first mismatch;
        4. roll back at a mismatch: forget that stride and the ones after it, redo it with the
           true chunk (verified by construction) and commit it."""
        if self.opt.seed_cache:
            self._add_to_cache(self.opt.seed_cache)
        prefetch = max(1, self.params.prefetch)
        pool = ThreadPoolExecutor(max_workers=1) if self.params.async_verification else None
        try:
            query = self._query(0)
            first = self._real([query], prefetch)[0]
            if self.opt.seed_with_first_retrieval:
                self._add_to_cache(first)
            self._use(_top1(first))
            self._commit(self._run_stride(_top1(first), query).answer_end)
            pending: list[_Stride] = []
            while not self.done:
                # 1. speculate
                target = self.scheduler.next_stride()
                while not self.finished and len(pending) < target:
                    pending.append(self._speculative_stride())
                if not pending:
                    break
                # 2. verify (overlapping one more speculative stride)
                truth, extra, matched = self._verify(pending, pool, prefetch)
                m = None if matched == len(pending) else matched
                self.counts["verified"] += matched
                for p in pending[:matched]:
                    self._use(p.doc)
                # 3. commit the verified prefix
                self._commit(pending[matched - 1].answer_end if matched else pending[0].answer_start)
                if m is None:
                    pending = [extra] if extra is not None and not self.done else []
                    continue
                if self.done:
                    break
                # 4. roll back to the mismatch and redo it with the true chunk
                self.counts["mismatched"] += 1
                bad, true_doc = pending[m], _top1(truth[m])
                self._roll_back(bad)
                self._use(true_doc)
                self._commit(self._run_stride(true_doc, bad.query, bad.vec).answer_end)
                pending = []
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _verify(self, pending: list[_Stride], pool: ThreadPoolExecutor | None,
                prefetch: int) -> tuple[list[list[Source]], _Stride | None, int]:
        """The real top-``prefetch`` for every pending stride's query (added to the cache), the
        speculative stride generated meanwhile (asynchronous verification only), and how many
        pending strides had the true top-1 chunk before the first that did not."""
        t0 = time.perf_counter()
        queries, vecs = [p.query for p in pending], [p.vec for p in pending]
        extra = None
        if pool is not None:
            verification: Future = pool.submit(self._real, queries, prefetch, vecs)
            if not self.finished:
                extra = self._speculative_stride()
            truth = verification.result()
        else:
            truth = self._real(queries, prefetch, vecs)
        for hits in truth:
            self._add_to_cache(hits)
        matched = next((i for i, (p, hits) in enumerate(zip(pending, truth)) if p.doc.id != _top1(hits).id),
                       len(pending))
        self.scheduler.observe_verification(time.perf_counter() - t0, matched, len(pending))
        return truth, extra, matched

    def _speculative_stride(self) -> _Stride:
        t0 = time.perf_counter()
        query = self._query(len(self.answer))
        doc, vec = self._speculate(query)
        stride = self._run_stride(doc, query, vec)
        self.scheduler.observe_step(time.perf_counter() - t0)
        return stride

    # ---- result ------------------------------------------------------------------------------
    def _result(self, t0: float) -> AskResult:
        from speculation.engine import GenerationStats

        total = GenerationStats()
        for state in self.states.values():
            total.merge(state.stats)
        stats = answer_stats(total, self.counts, self.seconds["retrieval"], time.perf_counter() - t0,
                             speculation_strides=list(self.scheduler.rounds),
                             chunk_sequences=dict(self.chunk_sequences))
        text, sources = self._streamer.text, list(self.sources_used.values())
        ends = self._streamer.token_ends(len(self.kept))
        spans, segments = attribute(text, self.kept, ends, self.kept_origins, sources,
                                    self.requests.reference_ids, self.tok)
        strides = []
        for start, end, doc_id in self.stride_log:
            if start >= len(self.kept):
                break
            a, b = (ends[start - 1] if start else 0), ends[min(end, len(self.kept)) - 1]
            if b > a:
                strides.append({"answer_start": a, "answer_end": b, "source": self.source_index.get(doc_id)})
        return AskResult(answer=text, token_ids=list(self.kept), sources=sources,
                         finish_reason="stop" if self.finish_reason == "stop" else "length",
                         prompt_tokens=len(self.question_ids), stats=stats, spans=spans, provenance=segments,
                         strides=strides)
