"""What the engine loop gains from being the process's only OpenMP team (speculation.openmp).

    .venv/bin/python benchmarks/bench_threads.py                       # --dtype auto, c = 1 and 4
    .venv/bin/python benchmarks/bench_threads.py --dtype float32 --out benchmarks/results/threads_fp32.md

RAG requests (the batching benchmark's questions over python-docs, k retrieved chunks in the
prompt and as references, reference drafting, greedy) through one in-process ``EngineLoop``,
each round run twice, interleaved: as built (the threads that load the model and submit give
their OpenMP team back) and with that hand-over switched off while the submitting thread keeps
a team of its own (as the loading thread does), so that two teams are alive. Outputs must be
identical. Not a timed test: run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import add_index_args, ensure_index  # noqa: E402
from profile_step import build_requests  # noqa: E402

MODES = ("one team (hand-over)", "two teams (no hand-over)")


def _parallel_kernel() -> None:
    """What loading a model leaves behind: a parallel kernel run on this thread (its team)."""
    import torch

    x = torch.ones(4_000_000)
    x.add_(1.0)


def run_round(loop, reqs, concurrency: int) -> tuple[float, float, list[list[int]]]:
    """tokens/s and seconds of ``reqs`` through ``loop``, ``concurrency`` in flight at once."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(loop.generate, reqs))
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    return tokens / seconds, seconds, [r.token_ids for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--requests", type=int, default=4, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args()

    import torch

    import speculation.scheduler as scheduler
    from speculation.engine import EngineConfig, SpeculativeEngine
    from speculation.models import cpu_info

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    models, reqs = build_requests(ensure_index(args), args.requests, args.k, args.max_tokens, True, args.dtype)
    engine = SpeculativeEngine(models.target, models.tokenizer, None, EngineConfig())
    loop = scheduler.EngineLoop(engine)
    release = scheduler.release_team
    levels = [int(c) for c in args.concurrency.split(",")]
    rates: dict[tuple[str, int], list[float]] = {(m, c): [] for m in MODES for c in levels}
    outputs: dict[str, list] = {m: [] for m in MODES}
    loop.generate(reqs[0])          # warm-up: the loop's thread and its team exist from here
    for rnd in range(args.rounds):
        for c in levels:
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                if mode == MODES[1]:
                    scheduler.release_team = lambda: True
                    _parallel_kernel()
                else:               # as EngineLoop() did for the loading thread
                    scheduler.release_team = release
                    release()
                rate, seconds, ids = run_round(loop, reqs, c)
                rates[(mode, c)].append(rate)
                outputs[mode].append(ids)
                print(f"round {rnd} c={c} {mode}: {rate:.1f} tokens/s ({seconds:.1f} s)", flush=True)
    scheduler.release_team = release
    loop.close()
    same = all(a == b for a, b in zip(outputs[MODES[0]], outputs[MODES[1]]))
    load_after = os.getloadavg()[0]
    dtype = str(next(models.target.parameters()).dtype).replace("torch.", "")
    lines = [f"{args.requests} RAG requests per round ({args.max_tokens} new tokens, k = {args.k}, reference drafting),"
             f" one in-process engine loop, {args.rounds} interleaved rounds, {dtype}, {args.threads} threads,"
             f" {cpu_info()['model'] or platform.machine()}, {os.cpu_count()} CPUs; load average {load_before:.2f} before, {load_after:.2f} after;"
             f" outputs identical between the two: {same}.", "",
             "| concurrency | " + " | ".join(f"{m}, tokens/s (median)" for m in MODES) + " | one / two |",
             "|---|---|---|---|"]
    for c in levels:
        a, b = (statistics.median(rates[(m, c)]) for m in MODES)
        lines.append(f"| {c} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
