"""``specrag calibrate``: measure the target forward's cost on this machine for the cost model."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure the forward's cost on this machine (the cost model's curve)",
                       description="Time the target forward by rows and tokens per step, and cache the curve the "
                                   "cost model sizes drafts with (once per model, dtype, device and thread count; "
                                   "the engine measures it on first use when missing).")
    p.add_argument("--model", default="smollm2-135m-instruct", help="target model name or local path")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch", type=int, default=16, help="rows measured up to this many")
    p.add_argument("--json", action="store_true", help="print the curve as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speculation.cost import cache_path, curve_key, load_or_measure
    from speculation.forward import PooledModel
    from speculation.models import ModelConfig, load_models

    models = load_models(ModelConfig(model=args.model, device=args.device, dtype=args.dtype))
    runner = PooledModel(models.target, max(1, args.max_batch))
    curve = load_or_measure(runner, remeasure=True)
    path = cache_path(curve_key(runner.model, runner.dtype, runner.device, runner.kernels))
    if args.json:
        print(json.dumps({"path": str(path), "dtype": str(runner.dtype).replace("torch.", ""),
                          "device": str(runner.device), **curve.to_json()}))
        return 0
    print(f"forward cost of {args.model} ({str(runner.dtype).replace('torch.', '')} on {runner.device}), "
          f"measured in {curve.meta['seconds_to_measure']} s, cached in {path}")
    print("ms per forward; columns: tokens per row")
    per_row = [t // curve.rows[0] for t in curve.tokens[0]]
    print("rows " + "".join(f"{t:>8}" for t in per_row))
    for r, seconds in zip(curve.rows, curve.seconds):
        print(f"{r:>4} " + "".join(f"{s * 1e3:>8.1f}" for s in seconds))
    print(f"at a cached context of {curve.meta['context']} tokens; each fed token costs "
          f"{curve.per_position * 1e6:.2f} us more per cached position beyond it (its attention)")
    return 0
