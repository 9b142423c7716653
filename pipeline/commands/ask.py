"""``specrag ask``: one question answered from the corpus (one-shot or iterative retrieval)."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.errors import CLIError


def _stride(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a positive integer or 'auto'") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be a positive integer or 'auto'")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer a question from the indexed corpus",
                       description="Retrieve, then generate with the speculative engine. Without --index the "
                                   "embedded python-docs index is built on first use and reused.")
    p.add_argument("question")
    p.add_argument("--index", help="index directory (default: the embedded python-docs index)")
    p.add_argument("--redis-url", help="Redis document store / retrieval cache, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("-k", type=int, default=4, help="sources retrieved (one-shot mode)")
    p.add_argument("--retriever", choices=["dense", "bm25", "hybrid"], default="dense")
    p.add_argument("--iterative", action="store_true", help="re-retrieve every --stride tokens (In-Context RALM)")
    p.add_argument("--stride", type=int, default=4, help="iterative: tokens between retrievals")
    p.add_argument("--query-tokens", type=int, default=32, help="iterative: query = last N tokens")
    p.add_argument("--speculation-stride", type=_stride, default="auto",
                   help="iterative: speculative strides per verification, or 'auto' (OS3 scheduler)")
    p.add_argument("--prefetch", type=int, default=20, help="iterative: verified results add their top-N to the cache")
    p.add_argument("--no-speculation", action="store_true", help="no token or retrieval speculation (reference output)")
    p.add_argument("--no-async", action="store_true", help="iterative: verify retrievals synchronously")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--draft-model")
    p.add_argument("--drafters", help="comma-separated drafter order: reference, tree, prompt_lookup, draft_model "
                                      "(default: the engine's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise CLIError("empty question")
    if args.max_tokens < 1 or args.k < 1 or args.stride < 1 or args.query_tokens < 1:
        raise CLIError("--max-tokens, -k, --stride and --query-tokens must be at least 1")
    if args.iterative and args.retriever == "hybrid":
        raise CLIError("--iterative supports the dense and bm25 retrievers")
    drafters = None
    if args.drafters:
        from speculation.engine import parse_drafters

        drafters = parse_drafters(args.drafters)
    from pipeline.api import AskRequest, RetrievalOptions, SpeculationOptions
    from pipeline.config import PipelineConfig
    from pipeline.rag import RAGPipeline

    config = PipelineConfig(index_dir=args.index, redis_url=args.redis_url, model=args.model,
                            draft_model=args.draft_model, k=args.k, retriever=args.retriever)
    pipe = RAGPipeline(config)
    request = AskRequest(
        question=args.question, max_tokens=args.max_tokens, temperature=args.temperature,
        retrieval=RetrievalOptions(k=args.k, retriever=args.retriever, iterative=args.iterative, stride=args.stride,
                                   query_tokens=args.query_tokens, speculation_stride=args.speculation_stride,
                                   async_verification=not args.no_async, prefetch=args.prefetch),
        speculation=SpeculationOptions(enabled=not args.no_speculation, drafters=drafters),
    )
    stream = None
    if not args.json and sys.stdout.isatty():
        def stream(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()
    try:
        result = pipe.answer(request, on_text=stream)
    finally:
        pipe.close()
    if args.json:
        print(json.dumps({"answer": result.answer, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason,
                          "sources": result.public_sources(), **result.public_provenance(),
                          "stats": result.stats}))
        return 0
    if stream is None:
        sys.stdout.write(result.answer)
    print()
    print()
    for n, s in enumerate(result.sources, 1):
        print(f"[{n}] {s.title} ({s.source})  score {s.score:.3f}")
    st = result.stats
    r = st["retrievals"]
    print(f"[{len(result.token_ids)} tokens in {st['seconds']['total']:.2f}s; {st['target_forwards']} target forwards, "
          f"{st['mean_accepted_per_forward']:.2f} tokens/forward; retrievals real {r['real']}, speculated "
          f"{r['speculated']}, mismatched {r['mismatched']}]", file=sys.stderr)
    return 0
