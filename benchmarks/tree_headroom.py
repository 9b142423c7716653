"""How much can draft trees buy over single-path reference drafting on these documents?

    .venv/bin/python benchmarks/tree_headroom.py     # writes benchmarks/results/tree_headroom.{json,md}

An upper bound, independent of the cost model and of the machine: the greedy answers are
generated once without speculation (SmolLM2, the same RAG prompts as ``bench_tree.py``: k = 4
retrieved python-docs chunks in the prompt and as references); then every drafter
configuration is replayed over each answer as if it drafted at every step, with the real
drafter classes (``NgramDrafter``, ``TreeDrafter``, their index and ``build_tree``). Greedy
verification is known without a forward: a drafted path is accepted as far as it equals the
answer, then the target's own token commits. Reported per configuration: tokens per forward if
every step drafted, drafted tokens (nodes) per step -- what each forward verifies beyond its
one token -- and accepted tokens per drafted token.

The engine drafts less than this (its cost model drafts only what pays on the machine), so the
engine's tokens per forward is below these numbers; the ratio tree / chain here is the most
trees can give with these documents, this model and this drafting. The "+ earlier answers"
rows give the tree drafter a ``History`` holding the answers to the questions before this one
(never its own), and "heaviest path" rows verify only the tree's heaviest root-to-leaf path (the
engine's rule under the batch-invariant bf16 forward).

A second table replays the same drafting under the engine's cost model at batch 1, without
timing anything: this machine's measured cost curve (``engine.cost``), a fresh acceptance table
per configuration learning as the questions go (``Acceptance``, as the engine's does), each
step's draft sized by ``choose_lengths`` from the same gains the engine computes
(``copy_gains``), a step priced at the curve's forward plus ``--overhead-ms``. Deterministic:
what the cost model's choices give on this machine, tokens per forward and predicted tokens/s
(plain decoding priced the same way), without the benchmark's timing noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_engine import machine_info  # noqa: E402
from bench_tree import rag_cases, save  # noqa: E402

# name -> (drafter kind, options); depth 16 everywhere (the engine's max_draft)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "chain (LLMA: first occurrence of the longest match)": ("chain", {}),
    "tree, 16 nodes": ("tree", {"max_nodes": 16}),
    "tree, 32 nodes (the engine's default)": ("tree", {"max_nodes": 32}),
    "tree, 64 nodes, matches up to 3 tokens shorter": ("tree", {"max_nodes": 64, "shorter": 3}),
    "tree, every occurrence of every match (bound)": ("tree", {"max_nodes": 4096, "shorter": 8,
                                                               "max_occurrences": 4096}),
    "tree, 32 nodes, heaviest path": ("tree", {"max_nodes": 32, "best_path": True}),
    "tree, 32 nodes + earlier answers, heaviest path": ("tree", {"max_nodes": 32, "history": True,
                                                                 "best_path": True}),
    "tree, 32 nodes + earlier answers": ("tree", {"max_nodes": 32, "history": True}),
}
DEPTH = 16
# replayed under the cost model too: the chain and the engine's two ways of verifying a tree
COSTED = ("chain (LLMA: first occurrence of the longest match)",
          "tree, 32 nodes + earlier answers, heaviest path", "tree, 32 nodes + earlier answers")


def _drafter(kind: str, opts: dict[str, Any], earlier: list[list[int]]) -> Any:
    from speculation.drafters import History, NgramDrafter, TreeDrafter

    if kind == "chain":
        return NgramDrafter("reference", max_draft=DEPTH, adaptive=False, provenance=False)
    opts = {k: v for k, v in opts.items() if k not in ("history", "best_path")}
    history = None
    if earlier:
        history = History(1 << 30, 8)
        for ids in earlier:
            history.add(ids)
    return TreeDrafter(max_draft=DEPTH, adaptive=False, provenance=False, history=history, **opts)


def _accepted(draft: Any, rest: list[int]) -> int:
    """Tokens of ``draft`` greedy verification accepts when the target's answer goes on with ``rest``."""
    if draft is None:
        return 0
    parents = draft.parents if draft.parents is not None else list(range(-1, len(draft.tokens) - 1))
    best, depth, ok = 0, [0] * len(draft.tokens), [False] * len(draft.tokens)
    for i, (tok, p) in enumerate(zip(draft.tokens, parents)):
        depth[i] = 1 if p < 0 else depth[p] + 1
        ok[i] = (p < 0 or ok[p]) and depth[i] <= len(rest) and rest[depth[i] - 1] == tok
        if ok[i]:
            best = max(best, depth[i])
    return best


def replay(kind: str, opts: dict[str, Any], prompt: list[int], refs: list[list[int]], answer: list[int],
           earlier: list[list[int]] | None = None, cost: tuple[Any, Any, float] | None = None) -> dict[str, float]:
    """Steps, drafted nodes and accepted tokens of drafting at every step of ``answer``
    (``earlier``: the answers the history holds, where ``opts`` asks for it). ``cost``: (curve,
    acceptance, overhead seconds): every draft sized by the cost model at batch 1 instead, the
    acceptance table learning from the verified drafts as the engine's does, and the steps'
    predicted seconds counted."""
    from speculation.cost import Candidate, choose_lengths, copy_gains

    drafter = _drafter(kind, opts, (earlier or []) if opts.get("history") else [])
    state = SimpleNamespace(tokens=list(prompt), references=refs, drafter_state={}, draft_room=DEPTH)
    drafter.begin(state)
    curve, acceptance, overhead = cost if cost is not None else (None, None, 0.0)
    t = steps = drafted = accepted = 0
    seconds = 0.0
    while t < len(answer):
        state.tokens = list(prompt) + answer[:t]
        state.draft_room = min(DEPTH, len(answer) - t - 1)
        draft = drafter.propose(state, opts.get("max_nodes", DEPTH)) if state.draft_room > 0 else None
        if draft is not None and opts.get("best_path"):
            draft = draft.best_path()
        if draft is not None and curve is not None:
            draft, gains = copy_gains(draft, acceptance)
            k = choose_lengths([Candidate(draft.source, draft.match_len, len(draft.tokens), gains)], 1, 1, curve,
                               acceptance, overhead, 0.0, len(state.tokens))[0][0]
            draft = draft.trimmed(k) if k else None
        n = _accepted(draft, answer[t:])
        k = len(draft.tokens) if draft is not None else 0
        if curve is not None:
            if draft is not None:
                acceptance.update(draft.source, draft.match_len, draft.depth(), n)
            seconds += curve(1 + k, 1, len(state.tokens)) + overhead
        steps += 1
        drafted += k
        accepted += n
        t += n + 1
    out = {"tokens": len(answer), "steps": steps, "drafted": drafted, "accepted": accepted}
    return out if curve is None else {**out, "seconds": seconds}


def replay_costed(kind: str, opts: dict[str, Any], prompt: list[int], refs: list[list[int]], answer: list[int],
                  earlier: list[list[int]], curve: Any, acceptance: Any, overhead: float) -> dict[str, float]:
    """``replay`` with every draft sized by the cost model (``curve``, ``acceptance``, a step's
    ``overhead`` seconds beside the curve's forward)."""
    return replay(kind, opts, prompt, refs, answer, earlier, (curve, acceptance, overhead))


def costed_rows(cases: list[Any], answers: list[list[int]], curve: Any, overhead: float) -> dict[str, Any]:
    """Per ``COSTED`` configuration (and plain decoding): tokens per forward and predicted
    tokens/s under the cost model, each configuration's acceptance table learning over the
    questions in order."""
    from speculation.cost import Acceptance

    tokens = sum(len(a) for a in answers)
    plain_s = sum(curve(1, 1, len(prompt) + t) + overhead for (_, prompt, _), ans in zip(cases, answers)
                  for t in range(len(ans)))
    rows: dict[str, Any] = {"plain decoding": {"tokens_per_forward": 1.0,
                                               "predicted_tokens_per_second": round(tokens / plain_s, 1)}}
    for name in COSTED:
        kind, opts = CONFIGS[name]
        acceptance = Acceptance()
        per = [replay_costed(kind, opts, prompt, refs, ans, answers[:i], curve, acceptance, overhead)
               for i, ((_, prompt, refs), ans) in enumerate(zip(cases, answers))]
        tot = {key: sum(p[key] for p in per) for key in per[0]}
        rows[name] = {"tokens_per_forward": round(tot["tokens"] / tot["steps"], 3),
                      "predicted_tokens_per_second": round(tot["tokens"] / tot["seconds"], 1),
                      "drafted_per_step": round(tot["drafted"] / tot["steps"], 2)}
    chain = rows[COSTED[0]]
    for r in rows.values():
        r["over_chain"] = round(r["tokens_per_forward"] / chain["tokens_per_forward"], 3)
        r["speed_over_chain"] = round(r["predicted_tokens_per_second"] / chain["predicted_tokens_per_second"], 3)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--index", type=Path, help="index dir (default: built under the cache)")
    ap.add_argument("--overhead-ms", type=float, default=1.5,
                    help="a step's cost beyond the curve's forward in the cost-model replay (the engine measures "
                         "its own: 1-3 ms on a 2-core EPYC)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tree_headroom")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from speculation.engine import GenerationRequest, SpeculativeEngine
    from speculation.models import ModelConfig, load_models

    models = load_models(ModelConfig())
    engine = SpeculativeEngine(models.target, models.tokenizer)
    cases = rag_cases(models.tokenizer, engine.context_tokens or 2048, args.questions, args.k, args.max_tokens,
                      args.index)
    t0 = time.perf_counter()
    answers = []
    for i, (q, prompt, refs) in enumerate(cases):
        res = engine.generate_one(GenerationRequest(prompt, refs, max_new_tokens=args.max_tokens, speculate=False))
        answers.append(res.token_ids)
        print(f"[{i + 1}/{len(cases)}] {len(res.token_ids)} tokens: {q}", flush=True)
    generate_s = time.perf_counter() - t0

    rows = {}
    for name, (kind, opts) in CONFIGS.items():
        per = [replay(kind, opts, prompt, refs, ans, answers[:i])
               for i, ((_, prompt, refs), ans) in enumerate(zip(cases, answers))]
        tot = {key: sum(p[key] for p in per) for key in per[0]}
        rows[name] = {"tokens_per_forward": round(tot["tokens"] / tot["steps"], 3),
                      "drafted_per_step": round(tot["drafted"] / tot["steps"], 2),
                      "accepted_per_drafted": round(tot["accepted"] / max(1, tot["drafted"]), 3),
                      "per_question_tokens_per_forward": [round(p["tokens"] / p["steps"], 3) for p in per], **tot}
    chain = rows[next(iter(CONFIGS))]["tokens_per_forward"]
    for r in rows.values():
        r["over_chain"] = round(r["tokens_per_forward"] / chain, 3)
    assert engine.cost is not None, "the cost-model replay needs draft_policy='cost'"
    costed = costed_rows(cases, answers, engine.cost, args.overhead_ms / 1000)
    dtype = str(next(models.target.parameters()).dtype).replace("torch.", "")
    result = {"machine": machine_info(), "questions": len(cases), "k": args.k, "max_tokens": args.max_tokens,
              "depth": DEPTH, "generate_s": round(generate_s, 1), "configs": rows, "cost_model": costed,
              "overhead_ms": args.overhead_ms, "dtype": dtype,
              "command": "benchmarks/tree_headroom.py" + (f" --max-tokens {args.max_tokens}"
                                                          if args.max_tokens != 128 else "")}
    save(args.out, result, render_markdown(result))
    return 0


def render_markdown(r: dict[str, Any]) -> str:
    lines = [f"Drafting replayed at every step over the greedy answers of {r['questions']} RAG questions "
             f"(SmolLM2-135M, k = {r['k']} python-docs chunks, {r['max_tokens']} new tokens, draft depth "
             f"{r['depth']}); `{r['command']}`. No forward is timed: an upper bound for each drafter.", "",
             "| drafter | tokens/forward if every step drafts | x chain | drafted tokens/step | "
             "accepted per drafted token |", "|---|---|---|---|---|"]
    for name, x in r["configs"].items():
        lines.append(f"| {name} | {x['tokens_per_forward']} | {x['over_chain']} | {x['drafted_per_step']} | "
                     f"{x['accepted_per_drafted']} |")
    lines += ["", f"The same drafting replayed under the cost model at batch 1 ({r['dtype']}, this machine's "
              f"measured curve, {r['overhead_ms']} ms a step beside it, each configuration's acceptance table "
              "learning over the questions in order); tokens/s predicted, not timed:", "",
              "| drafter | tokens/forward | x chain | predicted tokens/s | x chain | drafted tokens/step |",
              "|---|---|---|---|---|---|"]
    for name, x in r["cost_model"].items():
        lines.append(f"| {name} | {x['tokens_per_forward']} | {x['over_chain']} | {x['predicted_tokens_per_second']} | "
                     f"{x['speed_over_chain']} | {x.get('drafted_per_step', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
