"""``specrag generate``: the speculative engine on one prompt, optionally grounded in reference files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt with the speculative engine",
                       description="Generate for one prompt. Reference files are drafting sources (LLMA).")
    p.add_argument("--prompt", help="the prompt (a user message unless --raw)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--reference", action="append", default=[], metavar="FILE",
                   help="plain-text reference file to draft from (repeatable)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="target model name or local path")
    p.add_argument("--draft-model", help="draft model name or local path (same tokenizer)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-draft-tokens", type=int, default=16)
    p.add_argument("--drafters", default="reference,draft_model",
                   help="comma-separated drafter order: reference, tree, prompt_lookup, draft_model")
    p.add_argument("--no-speculation", action="store_true", help="plain decoding (the reference output)")
    p.add_argument("--draft-policy", choices=("cost", "fixed"), default="cost",
                   help="cost: draft lengths from the forward's measured cost and the drafters' acceptance; "
                        "fixed: the drafters' adaptive lengths")
    p.add_argument("--linear-kernel", choices=("auto", "torch"), default="auto",
                   help="fp32 / bf16 linear layers and attention on a CPU: auto = our kernels where they build (speculation/kernels.py), "
                        "torch = torch's GEMM")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _read_text(path: str, what: str) -> str:
    f = Path(path)
    if not f.is_file():
        raise CLIError(f"{what} {path!r} not found")
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"{what} {path!r} is not UTF-8 text") from None


def run(args: argparse.Namespace) -> int:
    if args.prompt is not None and args.prompt_file:
        raise CLIError("give either --prompt or --prompt-file, not both")
    prompt = _read_text(args.prompt_file, "prompt file") if args.prompt_file else args.prompt
    if prompt is None or not prompt.strip():
        raise CLIError("empty prompt: pass --prompt TEXT or --prompt-file FILE")
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise CLIError("--temperature must be >= 0 and --top-p in (0, 1]")
    references = [_read_text(r, "reference file") for r in args.reference]

    from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine, parse_drafters
    from speculation.models import ModelConfig, load_models
    from speculation.verify import SamplingParams

    drafters = parse_drafters(args.drafters)       # a typo fails before the models load
    models = load_models(ModelConfig(model=args.model, draft_model=args.draft_model,
                                     device=args.device, dtype=args.dtype))
    tok = models.tokenizer
    if args.raw:
        prompt_ids = tok.encode(prompt, add_special_tokens=True)
    else:
        prompt_ids = list(tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    engine = SpeculativeEngine(models.target, tok, models.draft,
                               EngineConfig(drafters=drafters, max_draft_tokens=args.max_draft_tokens,
                                            draft_policy=args.draft_policy, linear_kernel=args.linear_kernel))
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        references=[tok.encode(r, add_special_tokens=False) for r in references],
        max_new_tokens=args.max_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        stop=args.stop, seed=args.seed, speculate=not args.no_speculation,
    )
    stream = None
    if not args.json and sys.stdout.isatty():
        def stream(_state, _ids, delta):  # noqa: ANN001 - engine callback
            sys.stdout.write(delta)
            sys.stdout.flush()
    result = engine.generate_one(request, on_commit=stream)
    stats = result.stats
    if args.json:
        print(json.dumps({
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "dtype": str(engine.runner.dtype).replace("torch.", ""),
            "device": str(engine.device),
            "linear_kernel": engine.runner.linear_kernel,
            "attention_kernel": engine.runner.attention_kernel,
            "forward": engine.runner.forward_path,
            "stats": stats.to_dict(),
        }))
        return 0
    if stream is None:
        sys.stdout.write(result.text)
    print()
    print(f"[{stats.summary()}]", file=sys.stderr)
    return 0
