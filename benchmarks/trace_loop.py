"""Where a closed loop's time goes, step by step: ``--concurrency`` client threads ask RAG questions
of one in-process pipeline (one engine loop, no Ray), with speculation on and off in ABBA rounds,
and every engine step is recorded (``SpeculativeEngine.on_step``).

    .venv/bin/python benchmarks/trace_loop.py                          # c = 16, 64 requests, 2 rounds
    .venv/bin/python benchmarks/trace_loop.py --concurrency 8 --requests 32

Only the steady window counts (from the c-th request's start to the first finish after the last
start, as ``bench_batching``'s steady rate): its steps split into those where all c rows decode
("full"), those with a row missing and no prompt fed ("partial": a request between two answers),
and those feeding a newcomer's prompt or its uncached part ("join"). Per kind: steps, ms per step
and per committed token, tokens fed, drafted and accepted per step, the cost model's predicted ms.
Also the prompt tokens the requests had and those the prefix cache supplied, and the loop
thread's seconds spent starting requests (their drafters' indexes) outside the steps.
Not a timed test: run it alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_batching import _send_all, _steady  # noqa: E402
from bench_serve import QUESTIONS, add_index_args, ensure_index  # noqa: E402


def _kinds(records: list, concurrency: int) -> dict[str, list]:
    kinds: dict[str, list] = {"full": [], "partial": [], "join": []}
    for rec in records:
        kind = "join" if rec.prefill_rows else "full" if rec.rows == concurrency else "partial"
        kinds[kind].append(rec)
    return kinds


def _row(name: str, recs: list) -> str:
    if not recs:
        return f"| {name} | 0 | - | - | - | - | - | - |"
    n = len(recs)
    seconds = sum(r.seconds for r in recs)
    committed = sum(r.rows + r.accepted for r in recs)      # a join step's prompt chunks counted too
    predicted = [r.predicted_seconds for r in recs if r.predicted_seconds]
    return (f"| {name} | {n} | {1e3 * seconds / n:.1f} | {1e3 * seconds / max(committed, 1):.2f} | "
            f"{sum(r.tokens for r in recs) / n:.1f} | {sum(r.drafted for r in recs) / n:.1f} | "
            f"{sum(r.accepted for r in recs) / n:.2f} | "
            f"{1e3 * statistics.mean(predicted) if predicted else 0:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_index_args(ap)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="requests per run")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each: one run with, one without)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=2)
    args = ap.parse_args()
    if args.requests < args.concurrency:
        ap.error("--requests must be at least --concurrency")

    from pipeline.api import AskRequest, RetrievalOptions, SpeculationOptions
    from pipeline.config import PipelineConfig
    from pipeline.rag import RAGPipeline

    index = ensure_index(args)
    pipe = RAGPipeline(PipelineConfig(index_dir=str(index), max_tokens=args.max_tokens, k=args.k))
    loop = pipe.generation.loop
    engine = loop.engine
    steps: list[tuple[float, object]] = []
    observe = loop._observe

    def on_step(rec) -> None:
        steps.append((time.perf_counter(), rec))
        observe(rec)
    engine.on_step = on_step
    starting = [0.0]
    new_state = engine.new_state

    def timed_new_state(request):
        t0 = time.perf_counter()
        try:
            return new_state(request)
        finally:
            starting[0] += time.perf_counter() - t0
    engine.new_state = timed_new_state

    def ask(question: str, spec: bool) -> tuple[str, dict]:
        res = pipe.answer(AskRequest(question=question, max_tokens=args.max_tokens,
                                     retrieval=RetrievalOptions(k=args.k),
                                     speculation=SpeculationOptions(enabled=spec)))
        return res.answer, dict(res.stats, prompt_tokens=res.prompt_tokens)

    for q in QUESTIONS:                      # every prompt cached once, as bench_batching's warm-up
        ask(q, True)
        ask(q, False)

    def run(spec: bool) -> None:
        steps.clear()
        starting[0] = 0.0
        results, wall = _send_all(lambda q: ask(q, spec),
                                  [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)], args.concurrency)
        w0, w1, _ = _steady([(s, e, 0) for s, e, _, _ in results], args.concurrency)
        window = [rec for t, rec in steps if w0 <= t <= w1]
        busy = sum(r.seconds for r in window) / (w1 - w0)
        tokens = sum(st["generated_tokens"] for *_, st in results)
        prompt = sum(st["prompt_tokens"] for *_, st in results)
        cached = sum(st["cached_prompt_tokens"] for *_, st in results)
        print(f"\n**speculation {'on' if spec else 'off'}**, c = {args.concurrency}: {tokens / wall:.1f} tokens/s "
              f"whole run; steady window {w1 - w0:.1f} s, {100 * busy:.0f}% of it in steps; prompt tokens "
              f"{prompt}, from the prefix cache {cached}; starting requests (outside steps) "
              f"{starting[0]:.2f} s\n")
        print("| steps | n | ms/step | ms/committed token | fed/step | drafted/step | accepted/step | predicted ms |")
        print("|---|---|---|---|---|---|---|---|")
        for name, recs in _kinds(window, args.concurrency).items():
            print(_row(name, recs))
        sys.stdout.flush()

    print(f"load average {os.getloadavg()[:3]} at the start")
    for r in range(args.rounds):
        for spec in ((True, False) if r % 2 == 0 else (False, True)):
            run(spec)
    print(f"\nload average {os.getloadavg()[:3]} at the end")
    pipe.close()


if __name__ == "__main__":
    main()
