"""Weight layout of the linear layers: the target forward with its weights stored [out, in] (as
loaded) vs [in, out] (the same values, transposed in memory), interleaved.

A lever measurement for issue 13. ``F.linear(x, W)`` multiplies by ``W.T``; with ``W`` a
transposed view of an [in, out] tensor the GEMM gets other transpose flags, and so another
kernel path, whose speed depends on the number of rows (tokens in the forward) and on the CPU.
Not a timed test: run it alone on a quiet machine.

    .venv/bin/python benchmarks/bench_layout.py [--context 700] [--rounds 4]

Layouts: ``out_in`` (as loaded), ``in_out`` (every linear, the LM head included -- SmolLM2 ties
it to the embedding, which then reads strided rows), ``in_out_body`` (the decoder layers only,
the LM head as loaded). Shapes (rows x tokens per row): decode 1x1, verification 1x2 / 1x4 /
1x16, a decode batch 8x1. Prints the median over rounds (each the median of 3 forwards) per
layout and shape, and whether the layouts' logits are bitwise equal.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from speculation.cost import fill_context, time_forward
from speculation.forward import PooledModel, Row
from speculation.models import DEFAULT_MODEL, load_causal_lm

LAYOUTS = ("out_in", "in_out", "in_out_body")
SHAPES = ((1, 1), (1, 2), (1, 4), (1, 16), (8, 1))


def relayout(model: torch.nn.Module, layout: str) -> None:
    """Store the linear weights in ``layout``; the values (and the maths) stay the same."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            head = mod is model.get_output_embeddings()
            transposed = layout == "in_out" or (layout == "in_out_body" and not head)
            w = mod.weight.data
            mod.weight.data = w.t().contiguous().t() if transposed else w.contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load average before:", os.getloadavg())
    model = load_causal_lm(DEFAULT_MODEL, "cpu", torch.float32).eval()
    pm = PooledModel(model, 8, args.context + 64)
    ids = torch.randint(0, 1000, (8, args.context + 16), generator=torch.Generator().manual_seed(0)).tolist()
    times: dict[tuple[str, tuple[int, int]], list[float]] = {(lay, s): [] for lay in LAYOUTS for s in SHAPES}
    logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        fill_context(pm, ids, 8, args.context, extra=16)
        for r in range(args.rounds):
            for lay in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
                relayout(model, lay)
                for rows, t in SHAPES:
                    batch = [Row(i, args.context, ids[i][args.context:args.context + t], 0) for i in range(rows)]
                    times[(lay, (rows, t))].append(time_forward(pm, batch, 3))
        for lay in LAYOUTS:
            relayout(model, lay)
            logits[lay] = pm.forward([Row(0, args.context, ids[0][args.context:args.context + 1], 0)])
    print(f"ms per forward at a {args.context}-token context, median of {args.rounds} interleaved rounds")
    print(f"{'layout':12s}" + "".join(f"{f'{r}x{t}':>16s}" for r, t in SHAPES))
    base = {s: statistics.median(times[("out_in", s)]) for s in SHAPES}
    for lay in LAYOUTS:
        cells = []
        for s in SHAPES:
            ms = statistics.median(times[(lay, s)])
            cells.append(f"{ms * 1e3:7.1f} ({ms / base[s]:.2f}x)")
        print(f"{lay:12s}" + "".join(f"{c:>16s}" for c in cells))
    for lay in LAYOUTS[1:]:
        diff = (logits["out_in"] - logits[lay]).abs().max().item()
        print(f"{lay}: one-token logits bitwise equal to out_in: {torch.equal(logits['out_in'], logits[lay])} "
              f"(max |diff| {diff:.3g}), argmax same: {torch.equal(logits['out_in'].argmax(-1), logits[lay].argmax(-1))}")
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
