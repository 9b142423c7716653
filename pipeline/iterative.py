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
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from .api import AskRequest, AskResult, Source
from .prompts import iterative_prompt
from .scheduler import StrideScheduler


NO_DOC = Source(id="", title="", source="", score=0.0, text="")   # a retriever that found nothing


def _top1(hits: list[Source]) -> Source:
    return hits[0] if hits else NO_DOC


@dataclass
class _Stride:
    query: str
    doc: Source
    answer_start: int        # answer length when the stride began
    state: Any               # engine SequenceState that generated it
    gen_start: int           # len(state.generated) when the stride began
    vec: Any = None          # the query's embedding, computed once for speculation and verification


@dataclass
class IterativeOptions:
    stride: int = 4
    query_tokens: int = 32
    speculative_retrieval: bool = True
    kv_reuse: bool = True
    token_speculation: bool = True
    speculation_stride: int | str = "auto"
    async_verification: bool = True
    prefetch: int = 20
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
    def from_request(cls, request: AskRequest) -> "IterativeOptions":
        r, spec = request.retrieval, request.speculation.enabled
        return cls(stride=r.stride, query_tokens=r.query_tokens, speculative_retrieval=spec, kv_reuse=spec,
                   token_speculation=spec, speculation_stride=r.speculation_stride,
                   async_verification=r.async_verification, prefetch=r.prefetch)


class IterativeAnswer:
    """One iterative answer. ``stage`` is a GenerationStage; ``retrieval`` has ``retrieve`` and
    ``score_local``."""

    def __init__(self, stage: Any, retrieval: Any, request: AskRequest,
                 options: IterativeOptions | None = None) -> None:
        if request.retrieval.stride < 1 or request.retrieval.query_tokens < 1:
            from .errors import QuestionError

            raise QuestionError("stride and query_tokens must be at least 1")
        self.stage, self.retrieval, self.request = stage, retrieval, request
        self.opt = options or IterativeOptions.from_request(request)
        self.engine = stage.engine
        self.tok = stage.tokenizer
        self.question_ids = self.tok.encode(request.question, add_special_tokens=False)
        self.answer: list[int] = []
        self.finished = False
        self.finish_reason = "length"
        self.states: dict[int, Any] = {}       # every engine state used, for the stats
        self.counts = {"real": 0, "speculated": 0, "verified": 0, "mismatched": 0, "batches": 0}
        self.seconds = {"retrieval": 0.0}
        self._lock = threading.Lock()          # counts/seconds are updated from the verification thread too
        # embed each query once and reuse the vector for local scoring and verification; only for a
        # retrieval stage in this process (a remote one embeds where the model lives)
        self._vectors = callable(getattr(type(retrieval), "embed_queries", None))
        fixed = None if self.opt.speculation_stride == "auto" else int(self.opt.speculation_stride)
        self.scheduler = StrideScheduler(fixed=fixed, asynchronous=self.opt.async_verification)
        self.cache: dict[str, Source] = {}
        self.doc_states: OrderedDict[str, tuple[Any, int]] = OrderedDict()   # chunk id -> (sequence, head length)
        # strides that prefilled a new sequence / continued the previous stride's / resumed an earlier one
        self.chunk_sequences = {"new": 0, "continued": 0, "resumed": 0}
        self.sources_used: dict[str, Source] = {}

    # ---- building blocks ---------------------------------------------------------------------
    def _query(self, answer_len: int) -> str:
        ids = (self.question_ids + self.answer[:answer_len])[-self.opt.query_tokens:]
        return self.tok.decode(ids, skip_special_tokens=True)

    def _real(self, queries: list[str], k: int, vecs: list[Any] | None = None) -> list[list[Source]]:
        t0 = time.perf_counter()
        retriever = self.request.retrieval.retriever
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
        retriever = self.request.retrieval.retriever
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

    def _references(self, doc: Source) -> list[list[int]]:
        """Token ids of the cached chunks other than ``doc`` (which is in the prompt), most
        recently cached first, up to ``reference_tokens`` tokens: drafting material for token
        speculation."""
        if not self.opt.token_speculation or self.opt.reference_tokens <= 0:
            return []
        refs: list[list[int]] = []
        total = 0
        for source in reversed(list(self.cache.values())):
            if source.id == doc.id or not source.id:
                continue
            ids = self.stage.reference_ids(source)
            if total + len(ids) > self.opt.reference_tokens:
                break
            refs.append(ids)
            total += len(ids)
        return refs

    def _use(self, doc: Source) -> None:
        if doc.id:
            self.sources_used.setdefault(doc.id, doc)

    def _add_to_cache(self, sources: list[Source]) -> None:
        for s in sources:
            self.cache.setdefault(s.id, s)

    def _run_stride(self, doc: Source) -> _Stride:
        """Generate one stride with ``doc`` before the question. With KV reuse, a chunk used
        before (by the previous stride or any earlier one) continues its own sequence: the
        answer tokens it has not seen are fed with the next step's draft in one forward (none
        when the previous stride had the same chunk); only a new chunk costs a full prefill."""
        start = len(self.answer)
        budget = self.request.max_tokens - start
        state = self._resume(doc, start) if self.opt.kv_reuse else None
        if state is not None:
            gen_start = len(state.generated)
            state.pause_at = gen_start + self.opt.stride
            self.engine.run([state])
        else:
            head = iterative_prompt(self.tok, self.request.question, doc)
            req = self.stage.engine_request(self.request, head + self.answer, self._references(doc), budget, stop=[])
            req.speculate = self.opt.token_speculation
            req.pause_at = self.opt.stride
            req.draft_past_pause = self.opt.draft_across_strides and self.opt.kv_reuse
            (state,) = self.engine.begin([req])
            self.engine.run([state])
            gen_start = 0
            self.states[id(state)] = state
            self.chunk_sequences["new"] += 1
            if self.opt.kv_reuse:
                self.doc_states[doc.id] = (state, len(head))
                while len(self.doc_states) > self.opt.kv_chunks:
                    self.doc_states.popitem(last=False)
        if doc.id in self.doc_states:
            self.doc_states.move_to_end(doc.id)
        new = state.generated[gen_start:]
        self.answer.extend(new)
        stride = _Stride(query="", doc=doc, answer_start=start, state=state, gen_start=gen_start)
        if state.finished or len(self.answer) >= self.request.max_tokens:
            self.finished = True
            self.finish_reason = state.finish_reason or "length"
        return stride

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

    def _rollback(self, stride: _Stride) -> None:
        """Forget ``stride`` and everything after it."""
        del self.answer[stride.answer_start:]
        self.finished = False
        self.finish_reason = "length"

    # ---- the loops -----------------------------------------------------------------------------
    def run(self, on_text: Callable[[str], None] | None = None) -> AskResult:
        t0 = time.perf_counter()
        try:
            if self.opt.speculative_retrieval:
                self._run_speculative()
            else:
                self._run_baseline()
        finally:
            for state in self.states.values():     # the chunks' KV slots go back to the pool
                self.engine.release(state)
        return self._result(t0, on_text)

    def _run_baseline(self) -> None:
        while not self.finished:
            query = self._query(len(self.answer))
            doc = _top1(self._real([query], 1)[0])
            self._use(doc)
            self._run_stride(doc)

    def _run_speculative(self) -> None:
        anchor: _Stride | None = None       # the last verified stride
        pending: list[_Stride] = []
        if self.opt.seed_cache:
            self._add_to_cache(self.opt.seed_cache)
        pool = ThreadPoolExecutor(max_workers=1) if self.opt.async_verification else None
        try:
            # the first retrieval is real: it seeds the cache and its stride is verified
            query = self._query(0)
            first = self._real([query], max(1, self.opt.prefetch))[0]
            if self.opt.seed_with_first_retrieval:
                self._add_to_cache(first)
            anchor = self._run_stride(_top1(first))
            anchor.query = query
            self._use(_top1(first))
            while True:
                target = self.scheduler.next_stride()
                while not self.finished and len(pending) < target:
                    pending.append(self._speculative_stride())
                if not pending:
                    break
                verification: Future | None = None
                t_verify = time.perf_counter()
                queries = [p.query for p in pending]
                vecs = [p.vec for p in pending]
                if pool is not None:
                    verification = pool.submit(self._real, queries, max(1, self.opt.prefetch), vecs)
                    extra = None
                    if not self.finished:   # overlap one more speculative stride with the verification
                        extra = self._speculative_stride()
                    truth = verification.result()
                else:
                    extra = None
                    truth = self._real(queries, max(1, self.opt.prefetch), vecs)
                verify_seconds = time.perf_counter() - t_verify
                for hits in truth:
                    self._add_to_cache(hits)
                m = next((i for i, (p, hits) in enumerate(zip(pending, truth)) if p.doc.id != _top1(hits).id), None)
                matched = len(pending) if m is None else m
                self.counts["verified"] += matched
                self.scheduler.observe_verification(verify_seconds, matched, len(pending))
                for p in pending[:matched]:
                    self._use(p.doc)
                if m is None:
                    anchor = pending[-1]
                    pending = [extra] if extra is not None else []
                    continue
                # mismatch at stride m: roll back to it and redo it with the true chunk
                self.counts["mismatched"] += 1
                bad = pending[m]
                self._rollback(bad)      # the sequences are cut back when next used (_resume)
                true_doc = _top1(truth[m])
                redo = self._run_stride(true_doc)
                redo.query, redo.vec = bad.query, bad.vec
                self._use(true_doc)
                anchor, pending = redo, []
                if self.finished:
                    break
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _speculative_stride(self) -> _Stride:
        t0 = time.perf_counter()
        query = self._query(len(self.answer))
        doc, vec = self._speculate(query)
        stride = self._run_stride(doc)
        stride.query, stride.vec = query, vec
        self.scheduler.observe_step(time.perf_counter() - t0)
        return stride

    # ---- result ------------------------------------------------------------------------------
    def _result(self, t0: float, on_text: Callable[[str], None] | None) -> AskResult:
        from speculation.engine import GenerationStats
        from speculation.text import StopStringStreamer

        from .rag import engine_stats

        answer = self.answer[:self.request.max_tokens]
        streamer = StopStringStreamer(self.tok, self.request.stop)
        kept: list[int] = []
        eos = self.engine.eos_ids
        finish = "length" if len(answer) >= self.request.max_tokens else self.finish_reason
        for t in answer:
            kept.append(t)
            if t in eos:
                finish = "stop"
                break
            if on_text is not None:
                delta = streamer.push(t)
                if delta:
                    on_text(delta)
            else:
                streamer.push(t)
            if streamer.stopped:
                finish = "stop"
                break
        last = streamer.finish()
        if on_text is not None and last:
            on_text(last)
        total = GenerationStats()
        for state in self.states.values():
            total.merge(state.stats)
        stats = engine_stats(total)
        stats["retrievals"] = dict(self.counts)
        stats["speculation_strides"] = list(self.scheduler.rounds)
        stats["chunk_sequences"] = dict(self.chunk_sequences)
        stats["seconds"] = {"retrieval": round(self.seconds["retrieval"], 4),
                            "prefill": round(total.prefill_seconds, 4), "decode": round(total.decode_seconds, 4),
                            "total": round(time.perf_counter() - t0, 4)}
        return AskResult(answer=streamer.text, token_ids=kept, sources=list(self.sources_used.values()),
                         finish_reason="stop" if finish == "stop" else "length",
                         prompt_tokens=len(self.question_ids), stats=stats)
