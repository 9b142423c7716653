"""The RAG pipeline: retrieval and generation stages, and the two together.

The stages are plain classes so that Ray Serve can host them as separate deployments
(deploy/app.py) while the CLI, batch jobs and tests run them in one process.
"""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path
from typing import Any, Callable

from .api import AskRequest, AskResult, Source, TextDelta
from .config import PipelineConfig, default_index_dir
from .errors import PipelineError
from .generation import RequestBuilder, answer_stats, check_question
from .iterative import IterativeAnswer, IterativeOptions
from .prompts import one_shot_prompt
from .provenance import OriginStream, attribute, token_origins

log = logging.getLogger(__name__)

TextCallback = Callable[[str], None]


def ensure_default_index(config: PipelineConfig, show_progress: bool = True) -> Path:
    """The embedded default index (the built-in ``python-docs`` corpus), built on first use.

    A file lock makes concurrent first uses (several replicas, CLI + server) build it once."""
    from retrieval import IngestConfig, ingest
    from retrieval.manifest import MANIFEST_NAME
    from speculation.models import load_tokenizer

    index_dir = default_index_dir()
    if (index_dir / MANIFEST_NAME).exists():
        return index_dir
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(index_dir.parent / ".python-docs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (index_dir / MANIFEST_NAME).exists():
            log.warning("building the default python-docs index in %s (first use only, a few minutes)", index_dir)
            ingest(["python-docs"], index_dir, load_tokenizer(config.model),
                   IngestConfig(embedding_model=config.embedding_model, show_progress=show_progress))
    return index_dir


class RetrievalStage:
    """Index + document store + cache behind the batched calls the pipeline needs."""

    def __init__(self, config: PipelineConfig, retriever: Any = None) -> None:
        from retrieval import Retriever

        self.config = config
        if retriever is None:
            index_dir = config.index_dir or ensure_default_index(config)
            retriever = Retriever.open(index_dir, redis_url=config.redis_url,
                                       embedding_model=config.embedding_model)
        self.retriever = retriever

    def retrieve(self, queries: list[str], k: int, retriever: str = "dense",
                 query_vecs: Any = None) -> list[list[Source]]:
        """Top-``k`` per query; ``query_vecs`` (from :meth:`embed_queries`) skips the embedding."""
        return self.retriever.retrieve(list(queries), k, retriever, query_vecs=query_vecs)

    def cache_counts(self) -> tuple[int, int] | None:
        """This process's retrieval-cache (hits, misses) so far; None without a cache (no Redis)."""
        cache = getattr(self.retriever, "cache", None)
        return None if cache is None else (cache.hits, cache.misses)

    def embed_queries(self, queries: list[str], retriever: str = "dense") -> Any:
        """Query embeddings for ``retrieve(query_vecs=)`` / ``score_local(query_vec=)``; None for
        ``bm25``, which embeds nothing."""
        return None if retriever == "bm25" else self.retriever.embed_queries(list(queries))

    def score_local(self, query: str, chunk_ids: list[str], retriever: str = "dense",
                    query_vec: Any = None) -> list[float]:
        """Scores of candidate chunks with the index's own metric (RaLMSpec's local cache)."""
        return self.retriever.score_local(query, list(chunk_ids), retriever, query_vec=query_vec)

    def info(self) -> dict[str, Any]:
        m = self.retriever.manifest
        return {"index": str(self.retriever.index_dir), "chunks": len(self.retriever),
                "index_type": m.index_type, "embedding_model": m.embedding_model}

    def close(self) -> None:
        self.retriever.close()


class GenerationStage:
    """Models + speculative engine. ``retrieval`` (a RetrievalStage or anything with the same
    methods, e.g. a remote handle) is needed for ``answer``; ``generate`` takes given sources."""

    def __init__(self, config: PipelineConfig, retrieval: Any = None, models: Any = None) -> None:
        from speculation.engine import EngineConfig, SpeculativeEngine
        from speculation.models import ModelConfig, load_models
        from speculation.scheduler import EngineLoop, LoopEngine

        self.config = config
        self.retrieval = retrieval
        self.models = models or load_models(ModelConfig(model=config.model, draft_model=config.draft_model,
                                                        device=config.device, dtype=config.dtype))
        self.tokenizer = self.models.tokenizer
        self.requests = RequestBuilder(self.tokenizer)
        chosen = {} if config.drafters is None else {"drafters": tuple(config.drafters)}
        core = SpeculativeEngine(self.models.target, self.tokenizer, self.models.draft,
                                 EngineConfig(max_draft_tokens=config.max_draft_tokens, max_batch=config.max_batch,
                                              max_tokens_per_step=config.max_tokens_per_step,
                                              draft_policy=config.draft_policy,
                                              prefix_cache=config.prefix_cache,
                                              prefix_cache_mb=config.prefix_cache_mb,
                                              history_tokens=config.history_tokens, **chosen))
        # one engine loop: every request of this stage, from any thread, steps in shared forwards
        self.loop = EngineLoop(core)
        self.engine = LoopEngine(self.loop)
        self.context_tokens = core.context_tokens or 2048

    @property
    def concurrency(self) -> int:
        """Requests worth handing to this stage at once: what the engine loop holds, plus a few
        waiting in its queue so that a slot never idles between two requests."""
        return self.config.max_batch + 4

    def close(self) -> None:
        self.loop.close()

    def health(self) -> dict[str, Any]:
        """What /health shows of this stage: the model's dtype and device, the threads its
        forwards use, and the engine loop
        (requests running and queued, steps so far, the most rows one step held)."""
        st = self.loop.stats
        import torch

        return {"generation": "ok", "dtype": str(self.engine.runner.dtype).replace("torch.", ""),
                "threads": torch.get_num_threads(),
                "device": str(self.engine.device), "linear_kernel": self.engine.runner.linear_kernel,
                "attention_kernel": self.engine.runner.attention_kernel, "forward": self.engine.runner.forward_path,
                "engine": {"running": self.loop.pending(), "max_batch": self.loop.max_batch, "steps": st.steps,
                           "max_rows_per_step": st.max_rows,
                           "mean_rows_per_step": round(st.rows / st.steps, 3) if st.steps else 0.0,
                           "draft_policy": self.config.draft_policy,
                           # prompt prefixes copied out of slots handed to other requests
                           "kept_prefixes": len(self.engine.kept),
                           "kept_prefix_mb": round(self.engine.kept.nbytes / 2**20, 1),
                           # measured conditional acceptance by drafter/match length and draft position
                           "acceptance": self.engine.acceptance.table()}}

    # ---- one-shot --------------------------------------------------------------------------
    def generate(self, request: AskRequest, sources: list[Source], on_text: TextCallback | None = None,
                 retrieval_seconds: float = 0.0) -> AskResult:
        """Answer from the given sources: a prompt with numbered sources, their token ids as
        drafting references. The answer's provenance: each source's spans and the segments
        (``pipeline/provenance.py``); ``on_text`` gets each delta with its segments."""
        t0 = time.perf_counter()
        check_question(request)
        prompt_ids, used = one_shot_prompt(self.tokenizer, request.question, sources, self.context_tokens,
                                           request.max_tokens)
        req = self.requests.engine_request(request, prompt_ids, [self.requests.reference_ids(s) for s in used],
                                           request.max_tokens)
        stream = OriginStream({s.id: i for i, s in enumerate(used)}, used)

        def callback(state: Any, _ids: list[int], delta: str) -> None:
            if delta and on_text is not None:
                on_text(TextDelta(delta, stream.take(delta, state.streamer.ends, state.origins)))
        result = self.engine.generate_one(req, callback if on_text is not None else None)
        spans, segments = attribute(result.text, result.token_ids, result.token_ends,
                                    token_origins(result.origins, used), used, self.requests.reference_ids,
                                    self.tokenizer)
        n = 1 if sources else 0
        stats = answer_stats(result.stats, {"real": n, "speculated": 0, "verified": 0, "mismatched": 0, "batches": n},
                             retrieval_seconds, time.perf_counter() - t0 + retrieval_seconds)
        return AskResult(answer=result.text, token_ids=result.token_ids, sources=used,
                         finish_reason="length" if result.finish_reason == "length" else "stop",
                         prompt_tokens=len(prompt_ids), stats=stats, spans=spans, provenance=segments)

    def iterative(self, request: AskRequest, options: IterativeOptions | None = None,
                  retrieval: Any = None) -> IterativeAnswer:
        """An iterative answer on this stage's engine (``options`` None: the request's mode;
        ``retrieval`` None: this stage's)."""
        return IterativeAnswer(self.engine, self.tokenizer, retrieval or self.retrieval, self.requests, request, options)

    def answer(self, request: AskRequest, on_text: TextCallback | None = None,
               cancelled: Callable[[], bool] | None = None) -> AskResult:
        """Retrieve, then generate; iterative retrieval (with RaLMSpec) when the request asks.
        ``cancelled`` (iterative mode) is polled before every stride: True stops the answer."""
        check_question(request)
        if self.retrieval is None:
            raise PipelineError("this generation stage has no retrieval stage to answer with")
        if request.retrieval.iterative:
            return self.iterative(request).run(on_text, cancelled)
        t0 = time.perf_counter()
        sources = self.retrieval.retrieve([request.question], request.retrieval.k, request.retrieval.retriever)[0]
        return self.generate(request, sources, on_text, retrieval_seconds=time.perf_counter() - t0)


class RAGPipeline:
    """Both stages in one process: what the CLI, batch jobs and tests use."""

    def __init__(self, config: PipelineConfig | None = None, *, retrieval: RetrievalStage | None = None,
                 models: Any = None) -> None:
        self.config = config or PipelineConfig()
        self.retrieval = retrieval or RetrievalStage(self.config)
        self.generation = GenerationStage(self.config, retrieval=self.retrieval, models=models)

    def retrieve(self, queries: list[str], k: int, retriever: str = "dense") -> list[list[Source]]:
        return self.retrieval.retrieve(queries, k, retriever)

    def generate(self, request: AskRequest, sources: list[Source], on_text: TextCallback | None = None) -> AskResult:
        return self.generation.generate(request, sources, on_text)

    def answer(self, request: AskRequest, on_text: TextCallback | None = None,
               cancelled: Callable[[], bool] | None = None) -> AskResult:
        return self.generation.answer(request, on_text, cancelled)

    def close(self) -> None:
        self.generation.close()
        self.retrieval.close()
