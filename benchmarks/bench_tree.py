"""Draft trees vs single-path reference drafting vs HF prompt lookup, on RAG questions.

    .venv/bin/python benchmarks/bench_tree.py           # writes benchmarks/results/tree.{json,md}
    .venv/bin/python benchmarks/bench_tree.py --quick   # 6 questions, 64 tokens, one concurrency round
    .venv/bin/python benchmarks/bench_tree.py --whole-trees   # bf16: verify whole trees, not heaviest paths

Each question retrieves k = 4 python-docs chunks (the real index and embedder), which go into
the prompt and, as token ids, to the drafters. Greedy, a fixed number of new tokens.

* batch 1, interleaved per question (the order rotates): specrag without speculation, with
  single-path reference drafting (LLMA: the first occurrence of the longest suffix match), with
  draft trees from the request's documents, prompt and output only (every occurrence, merged,
  tree attention), with draft trees that also draw on earlier answers (the engine's
  ``History``, on by default: here exactly the plain answers to the questions before this one,
  as a server that answered them in this order would hold -- never the question's own answer),
  and HF ``generate`` with prompt lookup
  (``prompt_lookup_num_tokens=10``) on the same prompt. Each question's prompt is prefilled
  into specrag's prefix cache before its timed runs, so every specrag method decodes from the
  cached prompt (else the first of them in the rotation would pay the prefill for the others);
  HF's ``generate`` prefills the prompt in each of its runs;
* concurrency 8: every question through one engine loop, 8 in flight, per method, the methods
  alternated over rounds; the history starts empty in each run and grows as its requests finish.

Reported: tokens/s, tokens per target forward, the accepted-length histogram per drafter, and
whether every output equals specrag's non-speculative one (HF's too, with the logit gap at a
divergence). Not a timed test: run it alone on a quiet machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_engine import ForwardCounter, first_divergence, logit_gap, machine_info  # noqa: E402
from bench_serve import build_index  # noqa: E402
from questions import ITERATIVE_QUESTIONS  # noqa: E402

CORPUS = "python-docs:json,textwrap,heapq,functools,itertools,bisect"
SPEC_METHODS = {"reference": ("reference",), "tree": ("tree",), "tree_history": ("tree",)}
LABELS = {"plain": "specrag, no speculation", "reference": "specrag, single-path reference drafting (LLMA)",
          "tree": "specrag, draft trees (documents, prompt, output)",
          "tree_history": "specrag, draft trees + earlier answers (history)",
          "hf_prompt_lookup": "HF generate, prompt lookup (10)"}
CONC_METHODS = ("plain", "reference", "tree", "tree_history")


def _histogram(results: list[Any], drafter: str) -> list[int]:
    from speculation.engine import DrafterStats

    total = DrafterStats()
    for r in results:
        if drafter in r.stats.by_drafter:
            total.merge(r.stats.by_drafter[drafter])
    return total.accepted_lengths


def rag_cases(tok: Any, context: int, n_questions: int, k: int, max_tokens: int,
              index_dir: Path | None = None) -> list[tuple[str, list[int], list[list[int]]]]:
    """(question, prompt ids, reference ids) for the first ``n_questions`` questions: ``k``
    python-docs chunks retrieved by the real index and embedder, in the prompt and as references."""
    from pipeline.config import PipelineConfig
    from pipeline.prompts import one_shot_prompt
    from pipeline.rag import RetrievalStage
    from speculation.models import cache_dir

    index_dir = index_dir or cache_dir() / "indexes" / "bench-tree"
    build_index(index_dir, CORPUS)
    retrieval = RetrievalStage(PipelineConfig(index_dir=str(index_dir), k=k))
    cases = []
    for q in ITERATIVE_QUESTIONS[:n_questions]:
        sources = retrieval.retrieve([q], k, "dense")[0]
        prompt, used = one_shot_prompt(tok, q, sources, context, max_tokens)
        cases.append((q, prompt, [tok.encode(s.text, add_special_tokens=False) for s in used]))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=len(ITERATIVE_QUESTIONS))
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="concurrency runs per method")
    ap.add_argument("--index", type=Path, help="index dir (default: built under the cache)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--whole-trees", action="store_true",
                    help="verify whole trees on the batch-invariant (bf16) forward too, not their heaviest paths "
                         "(engine.invariant_trees)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tree")
    args = ap.parse_args()
    if args.quick:
        args.questions, args.max_tokens, args.rounds = 6, 64, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()

    import torch

    from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
    from speculation.models import ModelConfig, load_models
    from speculation.scheduler import EngineLoop

    models = load_models(ModelConfig())
    target, tok = models.target, models.tokenizer
    engine = SpeculativeEngine(target, tok, None, EngineConfig(drafters=("reference",)))
    engine.invariant_trees = args.whole_trees
    counter = ForwardCounter(target)
    cases = rag_cases(tok, engine.context_tokens or 2048, args.questions, args.k, args.max_tokens, args.index)

    def request(prompt: list[int], refs: list[list[int]], method: str) -> GenerationRequest:
        return GenerationRequest(prompt, refs, max_new_tokens=args.max_tokens, speculate=method != "plain",
                                 drafters=SPEC_METHODS.get(method))

    def hf_lookup(prompt: list[int]) -> tuple[list[int], int]:
        n0 = counter.n
        with torch.inference_mode():
            out = target.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=args.max_tokens, do_sample=False, num_beams=1,
                                  prompt_lookup_num_tokens=10)
        return out[0, len(prompt):].tolist(), counter.n - n0

    history = engine.history
    assert history is not None, "EngineConfig.history_tokens must be > 0"

    def use_history(method: str, earlier: list[list[int]] | None) -> None:
        """The tree drafter reads the history only for tree_history; then it holds exactly
        ``earlier`` (None: left as it is, the concurrency runs' own)."""
        engine.drafters["tree"].history = history if method == "tree_history" else None  # type: ignore[attr-defined]
        if method == "tree_history" and earlier is not None:
            history.clear()
            for ids in earlier:
                history.add(ids)

    methods = ["plain", "reference", "tree", "tree_history", "hf_prompt_lookup"]
    # warm-up: every method once, and the cost curve measured (cached) before any timing
    q0, p0, r0 = cases[0]
    for m in methods:
        use_history(m, [])
        hf_lookup(p0) if m == "hf_prompt_lookup" else engine.generate_one(request(p0, r0, m))

    per: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    results: dict[str, list[Any]] = {m: [] for m in SPEC_METHODS}
    outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
    divergences: list[dict[str, Any]] = []
    for i, (q, prompt, refs) in enumerate(cases):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        engine.generate_one(GenerationRequest(prompt, [], max_new_tokens=1, speculate=False))  # the prompt cached
        for m in order:
            t0 = time.perf_counter()
            if m == "hf_prompt_lookup":
                ids, forwards = hf_lookup(prompt)
            else:
                use_history(m, outputs["plain"][:i])
                res = engine.generate_one(request(prompt, refs, m))
                ids, forwards = res.token_ids, res.stats.target_forwards
                if m in results:
                    results[m].append(res)
            seconds = time.perf_counter() - t0
            outputs[m].append(ids)
            per[m].append({"tokens": len(ids), "seconds": seconds, "forwards": forwards,
                           "tokens_per_second": len(ids) / seconds, "tokens_per_forward": len(ids) / max(1, forwards)})
        for m in methods[1:]:
            j = first_divergence(outputs["plain"][-1], outputs[m][-1])
            if j is not None:
                divergences.append({"question": q, "method": m, "at": j,
                                    "logit_gap": logit_gap(target, prompt + outputs["plain"][-1][:j])})
        print(f"[{i + 1}/{len(cases)}] " + "  ".join(
            f"{m} {per[m][-1]['tokens_per_second']:.1f} tok/s {per[m][-1]['tokens_per_forward']:.2f} t/f"
            for m in methods), flush=True)

    batch1 = {}
    for m in methods:
        rows = per[m]
        batch1[m] = {"label": LABELS[m],
                     "tokens_per_second": round(sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows), 2),
                     "median_tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in rows), 2),
                     "tokens_per_forward": round(sum(r["tokens"] for r in rows) / max(1, sum(r["forwards"] for r in rows)), 3),
                     "identical_to_plain": sum(a == b for a, b in zip(outputs[m], outputs["plain"])),
                     "n": len(rows)}
        if m in SPEC_METHODS:
            batch1[m]["accepted_length_histogram"] = _histogram(results[m], SPEC_METHODS[m][0])
    for m in ("tree", "tree_history"):
        ratio = [t["tokens_per_second"] / r["tokens_per_second"] for t, r in zip(per[m], per["reference"])]
        batch1[f"{m}_over_reference_median_ratio"] = round(statistics.median(ratio), 3)

    # concurrency: every question through one engine loop, `concurrency` in flight
    loop = EngineLoop(engine)
    conc: dict[str, list[dict[str, Any]]] = {m: [] for m in CONC_METHODS}
    for rnd in range(args.rounds):
        for m in (CONC_METHODS if rnd % 2 == 0 else CONC_METHODS[::-1]):
            use_history(m, [])
            def one(case: tuple[str, list[int], list[list[int]]]) -> Any:
                return loop.submit(request(case[1], case[2], m)).result(1800)
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(args.concurrency) as pool:
                res = list(pool.map(one, cases))
            wall = time.perf_counter() - t0
            tokens = sum(len(r.token_ids) for r in res)
            conc[m].append({"tokens_per_second": tokens / wall, "wall_s": wall,
                            "tokens_per_forward": tokens / max(1, sum(r.stats.target_forwards for r in res)),
                            "mean_rows_per_step": statistics.fmean(r.stats.mean_rows_per_step for r in res),
                            "identical_to_plain": sum(r.token_ids == o for r, o in zip(res, outputs["plain"])),
                            "histogram": _histogram(res, SPEC_METHODS[m][0]) if m in SPEC_METHODS else None})
            print(f"concurrency {args.concurrency}, {m}: {conc[m][-1]['tokens_per_second']:.1f} tok/s", flush=True)
    loop.close()
    concurrency = {m: {"tokens_per_second": round(statistics.median(r["tokens_per_second"] for r in rs), 2),
                       "tokens_per_forward": round(statistics.median(r["tokens_per_forward"] for r in rs), 3),
                       "mean_rows_per_step": round(statistics.median(r["mean_rows_per_step"] for r in rs), 2),
                       "identical_to_plain": min(r["identical_to_plain"] for r in rs), "runs": len(rs),
                       **({"accepted_length_histogram": rs[-1]["histogram"]} if rs[-1]["histogram"] else {})}
                   for m, rs in conc.items()}

    ref = batch1["reference"]
    targets = {}
    for m, suffix in (("tree", ""), ("tree_history", "_history")):
        targets.update({
            f"tokens_per_forward_ratio{suffix}": round(batch1[m]["tokens_per_forward"] / ref["tokens_per_forward"], 3),
            f"tokens_per_second_ratio_batch1{suffix}": round(batch1[m]["tokens_per_second"]
                                                             / ref["tokens_per_second"], 3),
            f"tokens_per_second_ratio_concurrency{suffix}": round(concurrency[m]["tokens_per_second"]
                                                                  / concurrency["reference"]["tokens_per_second"], 3),
        })
    result = {"machine": machine_info(), "dtype": str(next(target.parameters()).dtype).replace("torch.", ""),
              "questions": len(cases), "k": args.k, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "batch1": batch1, "concurrent": concurrency, "targets": targets, "divergences": divergences,
              "whole_trees": args.whole_trees,
              "command": "benchmarks/bench_tree.py" + (" --quick" if args.quick else "")
              + (" --whole-trees" if args.whole_trees else "")}
    save(args.out, result, render_markdown(result))
    return 0


def save(out: Path, result: dict[str, Any], markdown: str) -> None:
    """``out``.json and ``out``.md, and the markdown printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def render_markdown(r: dict[str, Any]) -> str:
    b1, cc, t = r["batch1"], r["concurrent"], r["targets"]
    lines = [f"{r['questions']} RAG questions over python-docs, k = {r['k']} retrieved chunks in the prompt and as "
             f"references, {r['max_tokens']} new tokens, greedy, {r['dtype']}, {r['machine'].get('cpu', '')}; "
             f"load average {r['load_average_before'][0]} before, {r['load_average_after'][0]} after.", "",
             "| batch 1 | tokens/s | median tokens/s | tokens/forward | identical to plain | accepted lengths (0, 1, 2, ...) |",
             "|---|---|---|---|---|---|"]
    for m in ("plain", "reference", "tree", "tree_history", "hf_prompt_lookup"):
        if m not in b1:          # results from before the history method
            continue
        x = b1[m]
        hist = ", ".join(map(str, x.get("accepted_length_histogram", []))) or "-"
        lines.append(f"| {x['label']} | {x['tokens_per_second']} | {x['median_tokens_per_second']} | "
                     f"{x['tokens_per_forward']} | {x['identical_to_plain']}/{x['n']} | {hist} |")
    lines += ["", f"| concurrency {r['concurrency']} | tokens/s | tokens/forward | rows/step | identical to plain |",
              "|---|---|---|---|---|"]
    for m in CONC_METHODS:
        if m not in cc:
            continue
        x = cc[m]
        lines.append(f"| {LABELS[m]} | {x['tokens_per_second']} | {x['tokens_per_forward']} | "
                     f"{x['mean_rows_per_step']} | {x['identical_to_plain']}/{r['questions']} |")
    lines.append("")
    for m, suffix, what in (("tree", "", "trees"), ("tree_history", "_history", "trees + history")):
        if f"tokens_per_forward_ratio{suffix}" not in t:
            continue
        lines += [f"- tokens per forward, {what} / single path: **{t[f'tokens_per_forward_ratio{suffix}']}x** "
                  "(target >= 1.3x)",
                  f"- tokens/s at batch 1, {what} / single path: **{t[f'tokens_per_second_ratio_batch1{suffix}']}x** "
                  f"(per-question median {b1[f'{m}_over_reference_median_ratio']}x; target >= 1.15x)",
                  f"- tokens/s at concurrency {r['concurrency']}, {what} / single path: "
                  f"**{t[f'tokens_per_second_ratio_concurrency{suffix}']}x** (target >= 1.0x)"]
    for d in r["divergences"]:
        lines.append(f"- divergence from plain: {d['method']} on {d['question']!r} at token {d['at']}, "
                     f"logit gap {d['logit_gap']:.3g}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
