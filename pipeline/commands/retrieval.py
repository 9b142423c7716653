"""``specrag ingest`` and ``specrag search``: the retrieval layer's command line.

The JSON shapes printed with ``--json`` are a contract other tools parse:

- ingest: ``{"files", "chunks", "new_chunks", "skipped_files": [{"path", "reason"}], "seconds"}``
- search: ``{"hits": [{"id", "score", "title", "source", "text"}]}``

Errors of the retrieval layer (RetrievalError) are printed by ``deploy.cli`` as one line, exit 1.
Heavy imports happen inside the handlers so ``specrag --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from retrieval.config import from_environment


def register(subparsers: argparse._SubParsersAction) -> None:
    ing = subparsers.add_parser(
        "ingest", help="build or update a retrieval index",
        description="Chunk, embed and index files, folders, JSONL, or the built-in corpus "
                    "'python-docs' (restrict it with python-docs:json,textwrap). Re-ingesting "
                    "embeds only new or changed chunks.",
    )
    ing.add_argument("paths", nargs="+", metavar="PATH|python-docs")
    ing.add_argument("--index", required=True, metavar="DIR", help="index directory")
    ing.add_argument("--redis-url", default=from_environment("redis_url"),
                     help="also write chunks to this Redis (shared document store; default $SPECRAG_REDIS_URL)")
    ing.add_argument("--embedding-model", default=from_environment("embedding_model"),
                     help="sentence-transformers model name or path (default $SPECRAG_EMBEDDING_MODEL, "
                          "else all-MiniLM-L6-v2)")
    ing.add_argument("--index-type", choices=("flat", "ivf", "hnsw"), default="flat")
    ing.add_argument("--chunk-tokens", type=int, default=256, metavar="N", help="chunk size in generator tokens")
    ing.add_argument("--chunk-overlap", type=int, default=32, metavar="N")
    ing.add_argument("--index-name", default=None, help="Redis namespace (default: the index directory's name)")
    ing.add_argument("--tokenizer", default=None, help="generator tokenizer (default: the target model's)")
    ing.add_argument("--json", action="store_true", help="print the report as JSON")
    ing.set_defaults(func=run_ingest)

    se = subparsers.add_parser("search", help="query a retrieval index",
                               description="Top-k chunks for a query from an index built by 'specrag ingest'.")
    se.add_argument("query")
    se.add_argument("--index", required=True, metavar="DIR")
    se.add_argument("-k", type=int, default=4)
    se.add_argument("--retriever", choices=("dense", "bm25", "hybrid"), default="dense")
    se.add_argument("--redis-url", default=from_environment("redis_url"), help="default $SPECRAG_REDIS_URL")
    se.add_argument("--embedding-model", default=from_environment("embedding_model"),
                    help="must match the index's (checked; default $SPECRAG_EMBEDDING_MODEL, else the index's)")
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=run_search)


def run_ingest(args: argparse.Namespace) -> int:
    from retrieval import IngestConfig, ingest
    from speculation.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer()
    config = IngestConfig(
        chunk_tokens=args.chunk_tokens, chunk_overlap=args.chunk_overlap,
        embedding_model=args.embedding_model, index_type=args.index_type, redis_url=args.redis_url,
        index_name=args.index_name, show_progress=sys.stderr.isatty(),
    )
    report = ingest(args.paths, args.index, tokenizer, config)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"{report.files} files, {report.chunks} chunks ({report.new_chunks} new, "
              f"{report.removed_chunks} removed), index {report.index_chunks} chunks, {report.seconds:.1f}s")
        for s in report.skipped_files:
            print(f"skipped {s.path}: {s.reason}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from retrieval import Retriever

    with Retriever.open(args.index, redis_url=args.redis_url, embedding_model=args.embedding_model) as r:
        hits = r.retrieve([args.query], k=args.k, retriever=args.retriever)[0]
    if args.json:
        print(json.dumps({"hits": [h.public() for h in hits]}))
        return 0
    for i, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:160]
        print(f"[{i}] {h.score:.4f}  {h.title}  ({h.source})\n    {snippet}")
    if not hits:
        print("no hits")
    return 0
