"""torch.compile of the target forward: one-row forward cost eager vs compiled, and compile time.

A lever measurement for issue 13 (about a third of a one-token fp32 forward is per-op
dispatch, which inductor fuses). Not a timed test: run it alone on a quiet machine.

    .venv/bin/python benchmarks/bench_compile.py [--tokens 1 4 16] [--context 700]

Prints, per number of tokens fed (decode = 1, verification of drafts = more): the first call
(compile included) and the median of 15 calls, eager and compiled, and whether the compiled
logits pick the same argmax as eager.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from speculation.cost import fill_context, time_forward
from speculation.forward import PooledModel, Row
from speculation.models import DEFAULT_MODEL, load_causal_lm


def _bench(pm: PooledModel, tag: str, tokens: list[int], context: int) -> None:
    ids = [list(range(100, 100 + context))]
    with torch.inference_mode():
        fill_context(pm, ids, 1, context, extra=max(tokens))
        for n in tokens:
            rows = [Row(0, context, list(range(5, 5 + n)), 0)]
            t0 = time.perf_counter()
            pm.forward(rows)
            first = time.perf_counter() - t0
            median = time_forward(pm, rows, 15, warm_up=False)
            print(f"{tag:9s} tokens={n:3d}  first call {first * 1e3:9.0f} ms  median {median * 1e3:6.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--context", type=int, default=700)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load average before:", os.getloadavg())
    model = load_causal_lm(DEFAULT_MODEL, "cpu", torch.float32).eval()
    pm = PooledModel(model, 2, args.context + 64)
    _bench(pm, "eager", args.tokens, args.context)
    with torch.inference_mode():
        ref = pm.forward([Row(0, args.context, [5, 6, 7], 0)])
    model.forward = torch.compile(model.forward, dynamic=True)
    t0 = time.perf_counter()
    _bench(pm, "compiled", args.tokens, args.context)
    print(f"compiled run total {time.perf_counter() - t0:.0f} s (compilation included)")
    with torch.inference_mode():
        out = pm.forward([Row(0, args.context, [5, 6, 7], 0)])
    print(f"max |logit diff| {(out - ref).abs().max().item():.3g}, argmax same: {torch.equal(out.argmax(-1), ref.argmax(-1))}")
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
