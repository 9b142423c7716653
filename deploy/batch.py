"""Batch document QA: a JSONL of questions through an actor pool of pipelines on Ray Data.

Resumable by construction: the output file is the only state. A rerun reads the ids already
answered and skips them; each answer is appended as one whole line (a single ``write`` of the
full line, then flush + fsync), and a line torn by a kill in the middle of that write is cut off
on resume, so every id ends up exactly once. Failed questions are reported and not written, so
a rerun retries them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .cpus import usable_cpus

log = logging.getLogger(__name__)


@dataclass
class Question:
    id: str
    question: str
    line: int
    max_tokens: int | None = None
    raw_id: Any = None  # the id as given (int or str), written back unchanged


@dataclass
class InputReport:
    questions: list[Question] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)   # (line number, why)
    duplicates: list[tuple[int, str]] = field(default_factory=list)  # (line number, id)


def read_questions(path: str | Path) -> InputReport:
    """Parse the input JSONL; bad lines are collected with their 1-based line numbers."""
    report = InputReport()
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                report.malformed.append((n, f"not JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                report.malformed.append((n, "not a JSON object"))
                continue
            qid, question = obj.get("id"), obj.get("question")
            if qid is None or isinstance(qid, (dict, list, bool)) or str(qid) == "":
                report.malformed.append((n, "missing or invalid 'id'"))
                continue
            if not isinstance(question, str) or not question.strip():
                report.malformed.append((n, "missing or empty 'question'"))
                continue
            max_tokens = obj.get("max_tokens")
            if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
                report.malformed.append((n, "'max_tokens' must be a positive integer"))
                continue
            if str(qid) in seen:
                report.duplicates.append((n, str(qid)))
                continue
            seen.add(str(qid))
            report.questions.append(Question(str(qid), question, n, max_tokens, raw_id=qid))
    return report


def load_done_ids(path: str | Path) -> set[str]:
    """Ids already in the output file. A torn final line (killed mid-write) is truncated away."""
    path = Path(path)
    if not path.exists():
        return set()
    done: set[str] = set()
    with open(path, "rb+") as f:
        data = f.read()
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # no newline: torn tail
            line = data[pos:nl]
            try:
                obj = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                obj = None
                if nl + 1 < len(data):
                    log.warning("%s: skipping a corrupt line at byte %d", path, pos)
            if isinstance(obj, dict) and "id" in obj:
                done.add(str(obj["id"]))
            pos = nl + 1
            good_end = pos
        if good_end < len(data):
            log.warning("%s: removing a torn last line (%d bytes) left by an interrupted run",
                        path, len(data) - good_end)
            f.truncate(good_end)
    return done


class AnswerWriter:
    """Appends whole lines durably: one write per line, flushed and fsynced."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "ab")

    def write(self, line: str) -> None:
        data = line.rstrip("\n").encode("utf-8") + b"\n"
        self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class QAWorker:
    """One pipeline per actor (Ray Data ``map_batches`` callable class). Returns each answer as
    a ready JSON line, so nested sources/metrics do not go through Arrow's type inference.

    Ray Data calls it from several threads at once (``calls_per_actor``): each call is one
    question, and the pipeline's engine loop batches the questions in flight into shared
    forwards (continuous batching)."""

    def __init__(self, pipeline: dict[str, Any], stages_module: str = "pipeline.rag",
                 torch_threads: int | None = None, max_tokens: int | None = None,
                 retrieval: dict[str, Any] | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        from pipeline.config import PipelineConfig

        from .config import load_stages

        cfg = PipelineConfig.model_validate(pipeline)
        self._pipe = load_stages(stages_module).RAGPipeline(cfg)
        self._cfg = cfg
        self._max_tokens = max_tokens
        self._retrieval = dict(retrieval or {})     # RetrievalOptions fields (iterative, stride)

    def answer_one(self, qid: str, question: str, max_tokens: int | None, raw_id: Any = None) -> dict[str, Any]:
        from pipeline.api import AskRequest, RetrievalOptions

        from .errors import to_service_error
        from .openai_api import public_provenance, public_sources, response_metrics

        request = AskRequest(question=question,
                             max_tokens=max_tokens or self._max_tokens or self._cfg.max_tokens,
                             retrieval=RetrievalOptions(k=self._cfg.k, retriever=self._cfg.retriever,  # type: ignore[arg-type]
                                                        **self._retrieval))
        try:
            res = self._pipe.answer(request)
        except Exception as exc:  # noqa: BLE001 - reported per question, the batch goes on
            err = to_service_error(exc)
            return {"id": qid, "ok": False, "line": "", "error": f"{err.type}: {err.message}",
                    "tokens": 0, "forwards": 0}
        out = {"id": qid if raw_id is None else raw_id, "question": question, "answer": res.answer,
               "sources": public_sources(res), **public_provenance(res), "metrics": response_metrics(res),
               "finish_reason": res.finish_reason,
               "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}}
        return {"id": qid, "ok": True, "line": json.dumps(out, ensure_ascii=False), "error": "",
                "tokens": res.completion_tokens, "forwards": int((res.stats or {}).get("target_forwards") or 0)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [self.answer_one(str(i), str(q), int(m) if m and m > 0 else None, json.loads(str(r)))
                for i, q, m, r in zip(batch["id"], batch["question"], batch["max_tokens"], batch["raw_id"])]
        return {k: [r[k] for r in rows] for k in ("id", "ok", "line", "error", "tokens", "forwards")}


@dataclass
class BatchSummary:
    total_lines: int = 0
    already_done: int = 0
    answered: int = 0
    failed: int = 0
    malformed: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0     # until the first answer: Ray + actor start + model loading
    last_answer_seconds: float = 0.0
    tokens: int = 0
    forwards: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def questions_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    @property
    def steady_questions_per_s(self) -> float:
        """Throughput after the first answer (start-up excluded)."""
        span = self.last_answer_seconds - self.startup_seconds
        return (self.answered - 1) / span if self.answered > 1 and span > 0 else 0.0

    @property
    def mean_accepted_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"answered": self.answered, "failed": self.failed, "already_done": self.already_done,
                "malformed": self.malformed, "duplicates": self.duplicates, "seconds": round(self.seconds, 3),
                "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                "questions_per_s": round(self.questions_per_s, 3),
                "startup_seconds": round(self.startup_seconds, 3),
                "steady_questions_per_s": round(self.steady_questions_per_s, 3),
                "mean_accepted_tokens_per_forward": round(self.mean_accepted_per_forward, 3)}


def _results(report: list[Question], *, pipeline: dict[str, Any], stages_module: str, concurrency: int,
             cpus_per_actor: float, torch_threads: int | None, max_tokens: int | None,
             calls_per_actor: int, retrieval: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (tqdm, with throughput) is the one shown
    ctx.print_on_execution_start = False
    items = [{"id": q.id, "question": q.question, "max_tokens": q.max_tokens or 0,
              "raw_id": json.dumps(q.raw_id if q.raw_id is not None else q.id)} for q in report]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        QAWorker,
        fn_constructor_kwargs={"pipeline": pipeline, "stages_module": stages_module,
                               "torch_threads": torch_threads, "max_tokens": max_tokens, "retrieval": retrieval},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=concurrency, max_concurrent_calls_per_actor=calls_per_actor,
                                           max_tasks_in_flight_per_actor=calls_per_actor,
                                           enable_true_multi_threading=calls_per_actor > 1),
        num_cpus=cpus_per_actor,
    )
    yield from ds.iter_rows()


def _calls_per_actor(pipeline: dict[str, Any], questions: int, actors: int) -> int:
    """Questions in flight per actor: what its engine loop batches (``max_batch``), no more
    than there are questions for it."""
    from pipeline.config import PipelineConfig

    max_batch = PipelineConfig.model_validate(pipeline).max_batch
    return max(1, min(max_batch, -(-questions // max(1, actors))))


def run_batch(input_path: str | Path, output_path: str | Path, *,
              pipeline: dict[str, Any] | Callable[[], dict[str, Any]],
              concurrency: int = 1, stages_module: str = "pipeline.rag", max_tokens: int | None = None,
              cpus_per_actor: float | None = None, progress: bool = True, err=sys.stderr,
              init_ray: Callable[[], None] | None = None, retrieval: dict[str, Any] | None = None) -> BatchSummary:
    """Answer every not-yet-answered question of ``input_path`` into ``output_path``.
    ``init_ray`` is called only when there is work (else Ray must already be initialised).
    ``retrieval``: ``RetrievalOptions`` fields for every question (``{"iterative": True,
    "stride": 4}``: In-Context RALM with RaLMSpec, streamed stride by stride inside the actor)."""
    from tqdm import tqdm

    summary = BatchSummary()
    report = read_questions(input_path)
    for n, why in report.malformed:
        print(f"{input_path}:{n}: skipped malformed line: {why}", file=err)
    for n, qid in report.duplicates:
        print(f"{input_path}:{n}: skipped duplicate id {qid!r}", file=err)
    summary.malformed, summary.duplicates = len(report.malformed), len(report.duplicates)
    done = load_done_ids(output_path)
    todo = [q for q in report.questions if q.id not in done]
    summary.total_lines = len(report.questions)
    summary.already_done = len(report.questions) - len(todo)
    if not todo:
        return summary
    if init_ray is not None:
        init_ray()
    if callable(pipeline):  # resolved after init_ray, which may fill in the default index
        pipeline = pipeline()
    cpus = usable_cpus()        # a container's CPU quota, not the host's core count
    threads = max(1, cpus // concurrency)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="q", desc="answering", file=err, disable=not progress, dynamic_ncols=True)
    with AnswerWriter(output_path) as writer:
        try:
            for row in _results(todo, pipeline=pipeline, stages_module=stages_module, concurrency=concurrency,
                                cpus_per_actor=cpus_per_actor if cpus_per_actor is not None else min(1.0, cpus / concurrency),
                                torch_threads=threads, max_tokens=max_tokens,
                                calls_per_actor=_calls_per_actor(pipeline, len(todo), concurrency),
                                retrieval=retrieval):
                now = time.perf_counter() - t0
                if not summary.answered and not summary.failed:
                    summary.startup_seconds = now
                summary.last_answer_seconds = now
                if row["ok"]:
                    writer.write(row["line"])
                    summary.answered += 1
                    summary.tokens += int(row["tokens"])
                    summary.forwards += int(row["forwards"])
                else:
                    summary.failed += 1
                    summary.failures.append((str(row["id"]), str(row["error"])))
                    bar.write(f"id {row['id']!r} failed: {row['error']}", file=err)
                summary.seconds = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{summary.tokens_per_s:.1f}", q_s=f"{summary.questions_per_s:.2f}")
                bar.update(1)
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - t0
    return summary
