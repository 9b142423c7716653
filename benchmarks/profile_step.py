"""Where a batched engine step's time goes: ``--rows`` RAG requests stepped together.

    .venv/bin/python benchmarks/profile_step.py                  # 16 rows, reference drafting
    .venv/bin/python benchmarks/profile_step.py --rows 8 --no-speculation --dtype float32
    .venv/bin/python benchmarks/profile_step.py --out benchmarks/results/profile_step.md

The requests are the batching benchmark's: SERVE_QUESTIONS over the python-docs index, k
retrieved chunks in the prompt (``one_shot_prompt``) and as drafting references, greedy. They
are stepped together on one ``SpeculativeEngine`` (the engine loop's work without its thread),
each step split into its phases -- slot bookkeeping and planning, drafting (with the cost
model's sizing), the target forward, verification, commit -- with the forward further split by
torch.profiler into its operators (matmuls, attention, KV writes, the rest). Decode steps (no
prompt chunk in them) and prefill steps are reported apart. Not a timed test: run it alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import QUESTIONS, add_index_args, ensure_index  # noqa: E402

PHASES = ("plan", "draft", "forward", "verify", "commit")
# operator families of the forward (torch.profiler names, matched by prefix / substring)
FAMILIES = (("matmul (linear layers, LM head)", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul",
                                                  "aten::bmm")),
            ("attention (SDPA / chunked)", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "flash")),
            ("KV writes, packing, gathers", ("aten::index_put", "aten::index", "aten::copy_", "aten::scatter",
                                             "aten::gather", "aten::cat")))


def build_requests(index_dir: Path, n: int, k: int, max_tokens: int, speculate: bool,
                   dtype: str = "auto") -> tuple[object, list]:
    from pipeline.config import PipelineConfig
    from pipeline.generation import RequestBuilder
    from pipeline.prompts import one_shot_prompt
    from pipeline.rag import RetrievalStage
    from speculation.engine import GenerationRequest
    from speculation.models import ModelConfig, load_models

    models = load_models(ModelConfig(dtype=dtype))
    questions = (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    sources = RetrievalStage(PipelineConfig(index_dir=str(index_dir), k=k)).retrieve(questions, k)
    context = int(getattr(models.target.config, "max_position_embeddings", 2048) or 2048)
    builder = RequestBuilder(models.tokenizer)
    reqs = []
    for q, srcs in zip(questions, sources):
        prompt, used = one_shot_prompt(models.tokenizer, q, srcs, context, max_tokens)
        refs = [builder.reference_ids(s) for s in used]
        reqs.append(GenerationRequest(prompt, refs, max_new_tokens=max_tokens, speculate=speculate))
    return models, reqs


def instrument(engine) -> dict[str, list[float]]:
    """Wrap the step's phases with timers; per step, seconds of each (appended in order)."""
    spent: dict[str, float] = defaultdict(float)
    per_step: dict[str, list[float]] = defaultdict(list)

    def timed(owner, name: str, phase: str):
        inner = getattr(owner, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[phase] += time.perf_counter() - t0
        setattr(owner, name, wrapper)

    timed(engine, "_plan", "plan")
    timed(engine, "_draft", "draft")
    timed(engine.runner, "forward", "forward")
    timed(engine, "_verify", "verify")
    timed(engine, "_commit", "commit")

    def on_step(rec):
        per_step["rows"].append(rec.rows)
        per_step["tokens"].append(rec.tokens)
        per_step["prefill_rows"].append(rec.prefill_rows)
        per_step["seconds"].append(rec.seconds)
        for p in PHASES:
            per_step[p].append(spent.pop(p, 0.0))
    engine.on_step = on_step
    return per_step


def operator_profile(engine, reqs, steps: int) -> list[tuple[str, float]]:
    """Self CPU time per operator family over ``steps`` decode steps of the batch."""
    from torch.profiler import ProfilerActivity, profile

    states = engine.begin(reqs)
    for _ in range(2):
        engine.step(states)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step(states)
    for s in states:
        engine.release(s)
    fam = defaultdict(float)
    for evt in prof.key_averages():
        us = evt.self_cpu_time_total
        for label, keys in FAMILIES:
            if any(evt.key.startswith(k) or k in evt.key for k in keys):
                fam[label] += us
                break
        else:
            fam["other operators (elementwise, norms, rotary, argmax, ...)"] += us
    return [(label, us / steps / 1e6) for label, us in sorted(fam.items(), key=lambda kv: -kv[1])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--no-speculation", action="store_true")
    ap.add_argument("--drafters", default="reference", help="comma-separated drafters (reference, tree, ...)")
    ap.add_argument("--dtype", default="auto", help="auto (measured on this CPU), float32 or bfloat16")
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = ap.parse_args()

    import torch

    from speculation.engine import EngineConfig, SpeculativeEngine
    from speculation.models import cpu_info

    load0 = os.getloadavg()
    models, reqs = build_requests(ensure_index(args), args.rows, args.k, args.max_tokens, not args.no_speculation,
                                   args.dtype)
    engine = SpeculativeEngine(models.target, models.tokenizer, None,
                               EngineConfig(drafters=tuple(args.drafters.split(",")), max_batch=max(16, args.rows)))
    engine.generate_one(reqs[0])                                   # warm-up (first forwards, allocator)
    per_step = instrument(engine)
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    wall = time.perf_counter() - t0
    engine.on_step = None
    ops = operator_profile(engine, reqs, args.profile_steps)
    load1 = os.getloadavg()

    decode = [i for i, p in enumerate(per_step["prefill_rows"]) if p == 0 and per_step["rows"][i] == args.rows]
    prefill = [i for i, p in enumerate(per_step["prefill_rows"]) if p > 0]
    tokens = sum(len(r.token_ids) for r in results)
    prompt = statistics.fmean(len(r.prompt_ids) for r in reqs)
    lines = [f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {cpu_info()['model'] or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
             f"{str(engine.runner.dtype).replace('torch.', '')}; load average {[round(x, 2) for x in load0]} at "
             f"start, {[round(x, 2) for x in load1]} at end.  ",
             f"{args.rows} requests stepped together (mean prompt {prompt:.0f} tokens, k = {args.k}), "
             f"{args.max_tokens} new tokens, speculation {'off' if args.no_speculation else f'on ({args.drafters})'}: "
             f"{tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} tokens/s, "
             f"{sum(r.stats.cached_prompt_tokens for r in results)} prompt tokens from the prefix cache.", ""]
    lines += ["| steps | count | mean s/step | mean tokens fed | " + " | ".join(PHASES) + " |",
              "|---|---|---|---|" + "---|" * len(PHASES)]
    for label, idx in ((f"decode, {args.rows} rows", decode), ("with a prompt chunk", prefill)):
        if not idx:
            continue
        mean = lambda key: statistics.fmean(per_step[key][i] for i in idx)  # noqa: E731
        lines.append(f"| {label} | {len(idx)} | {mean('seconds'):.4f} | {mean('tokens'):.1f} | "
                     + " | ".join(f"{mean(p):.4f}" for p in PHASES) + " |")
    lines += ["", f"Operators of {args.profile_steps} full-batch decode steps (self CPU seconds per step, "
              "torch.profiler; the profiler adds its own overhead):", "",
              "| operator family | s/step |", "|---|---|"]
    lines += [f"| {label} | {s:.4f} |" for label, s in ops]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
