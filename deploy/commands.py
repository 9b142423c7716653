"""``specrag serve``, ``specrag batch`` and ``specrag manifests`` (registered by ``deploy.cli``).

Imports of Ray and the app happen inside the command functions, so ``specrag --help`` and the
other subcommands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any


def _pipeline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", metavar="DIR", help="index directory (default: the built-in python-docs index, built on first run)")
    p.add_argument("--redis-url", metavar="URL", help="Redis document store and retrieval cache, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--config", metavar="FILE", help="serve config: deploy/serve.yaml style, or a YAML/JSON mapping of its args")
    p.add_argument("--model", help="target model name or local path (default: smollm2-135m-instruct)")
    p.add_argument("--draft-model", help="optional draft model sharing the target's tokenizer")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--address", metavar="ADDR",
                   help="a running Ray cluster ('auto', 'ray://head:10001'); default: start a local Ray in this process")
    p.add_argument("--num-cpus", type=int, help="CPUs the local Ray may schedule (default: all)")


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible RAG endpoint on Ray Serve",
        description="Start a local Ray (or join --address), deploy Ingress -> Retriever -> Generator, "
                    "and serve POST /v1/chat/completions until Ctrl-C.")
    _pipeline_flags(s)
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=None,
                   help="HTTP port of Serve's proxy, load-balanced over the Ingress replicas (default 8000)")
    s.add_argument("--direct-port", type=int, default=None,
                   help="first port on which the Ingress replicas answer HTTP themselves, one hop fewer "
                        "than through the proxy (Ray Serve's direct ingress; default: --port + 1)")
    s.add_argument("--no-direct-ingress", action="store_true",
                   help="serve through Serve's proxy only")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or set SPECRAG_API_KEY)")
    s.set_defaults(func=cmd_serve)

    b = subparsers.add_parser(
        "batch", help="answer a JSONL file of questions (resumable) on Ray Data",
        description="Input lines {\"id\", \"question\"[, \"max_tokens\"]}; output lines "
                    "{\"id\", \"question\", \"answer\", \"sources\", \"metrics\"}. A rerun skips ids already in --out.")
    b.add_argument("questions", metavar="QUESTIONS.jsonl")
    b.add_argument("--out", required=True, metavar="ANSWERS.jsonl")
    _pipeline_flags(b)
    b.add_argument("--concurrency", type=int, default=1, help="pipeline actors (each loads the models)")
    b.add_argument("--max-tokens", type=int, help="per-answer token limit (default: the config's)")
    b.add_argument("-k", "--k", dest="k", type=int, help="sources per question")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--iterative", action="store_true",
                   help="re-retrieve every --stride tokens (In-Context RALM, with RaLMSpec's speculative retrieval)")
    b.add_argument("--stride", type=int, default=4, help="--iterative: tokens between retrievals (default 4)")
    b.set_defaults(func=cmd_batch)

    m = subparsers.add_parser(
        "manifests", help="generate the KubeRay RayService and `ray up` cluster YAML from a serve config",
        description="Write rayservice.yaml, serve-cluster.yaml and ray-cluster.yaml into --out from the "
                    "serve config and the cluster overrides (default: OUT/overrides.yaml).")
    m.add_argument("--from", dest="serve_config", default="deploy/serve.yaml", metavar="SERVE.yaml",
                   help="the Serve config (default: deploy/serve.yaml)")
    m.add_argument("--out", default="deploy/cluster", metavar="DIR", help="output directory (default: deploy/cluster)")
    m.add_argument("--overrides", metavar="FILE", help="cluster overrides (default: OUT/overrides.yaml)")
    m.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is missing or stale")
    m.set_defaults(func=cmd_manifests)


def _config(args: argparse.Namespace) -> Any:
    from .config import ServeConfig, load_config_file

    data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    pipe = dict(data.get("pipeline") or {})
    for flag, key in (("index", "index_dir"), ("redis_url", "redis_url"), ("model", "model"),
                      ("draft_model", "draft_model"), ("device", "device"), ("k", "k"), ("max_tokens", "max_tokens")):
        value = getattr(args, flag, None)
        if value is not None:
            pipe[key] = value
    data["pipeline"] = pipe
    if getattr(args, "api_key", None):
        data["api_key"] = args.api_key
    return ServeConfig.model_validate(data)


def _check_cli(args: argparse.Namespace) -> None:
    from pipeline.errors import CLIError

    for name in ("port", "direct_port"):
        v = getattr(args, name, None)
        if v is not None and not 0 < v < 65536:
            raise CLIError(f"--{name} must be within 1..65535")
    if getattr(args, "concurrency", 1) < 1:
        raise CLIError("--concurrency must be at least 1")


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.errors import CLIError

    _check_cli(args)
    config = _config(args)
    from . import local

    host = args.host or "127.0.0.1"
    port = args.port or 8000
    direct_port = None if args.no_direct_ingress else (args.direct_port or port + 1)
    if direct_port is not None and not (0 < direct_port <= 65536 - local.DIRECT_INGRESS_PORTS and direct_port != port):
        raise CLIError(f"--direct-port must be within 1..{65536 - local.DIRECT_INGRESS_PORTS} and differ from "
                       f"--port (the Ingress replicas take ports from it up to {local.DIRECT_INGRESS_PORTS - 1} above)")

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    import faulthandler

    # `kill -USR1 <pid>` prints every thread's stack to stderr: for a service that seems stuck
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGTERM, _term)
    print(f"specrag serve: starting Ray and loading models ({config.model_name}) ...", file=sys.stderr, flush=True)
    try:
        if not config.pipeline.index_dir and not args.address and config.stages_module == "pipeline.rag":
            # Build the embedded default index here, with progress shown, before any replica
            # needs it (replicas would otherwise build it inside their constructors).
            from pipeline.rag import ensure_default_index

            config.pipeline.index_dir = str(ensure_default_index(config.pipeline))
        local.init_ray(address=args.address, num_cpus=args.num_cpus, direct_ingress_port=direct_port)
        signal.signal(signal.SIGTERM, _term)  # ray.init replaced it with a bare sys.exit
        proxy_url = local.start_service(config, host=host, port=port)
        local.wait_healthy(proxy_url)
        url = local.direct_url(host) if direct_port else None
        if url:
            print(f"\nspecrag is serving {config.model_name} at {url} (Ingress replica, direct) and at "
                  f"{proxy_url} (Serve's proxy, load-balanced)  (Ctrl-C stops it)\n", flush=True)
        else:
            if direct_port:
                print(f"specrag serve: no Ingress replica answers on a direct ingress port (a Serve "
                      f"controller started without direct ingress?); serving through the proxy only",
                      file=sys.stderr, flush=True)
            url = proxy_url
            print(f"\nspecrag is serving {config.model_name} at {url}  (Ctrl-C stops it)\n", flush=True)
        print(local.examples(url, config.model_name, config.resolved_api_key()), flush=True)
        print(f"\nalso: GET {url}/health, {url}/metrics, {url}/v1/models, {url}/docs\n", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nspecrag serve: shutting down ...", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the shutdown
        try:
            local.shutdown()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    print("specrag serve: stopped", file=sys.stderr, flush=True)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    _check_cli(args)
    from pathlib import Path

    from pipeline.errors import CLIError

    if not Path(args.questions).is_file():
        raise CLIError(f"no such file: {args.questions}")
    if args.stride < 1:
        raise CLIError("--stride must be at least 1")
    config = _config(args)
    if args.iterative and config.pipeline.retriever == "hybrid":
        raise CLIError("--iterative supports the dense and bm25 retrievers")
    from . import local
    from .batch import run_batch

    def init() -> None:
        if not config.pipeline.index_dir and not args.address and config.stages_module == "pipeline.rag":
            from pipeline.rag import ensure_default_index  # built once here, not in every actor

            config.pipeline.index_dir = str(ensure_default_index(config.pipeline))
        local.init_ray(address=args.address, num_cpus=args.num_cpus, log_to_driver=False)

    try:
        summary = run_batch(args.questions, args.out, pipeline=lambda: config.pipeline.model_dump(mode="json"),
                            concurrency=args.concurrency, stages_module=config.stages_module,
                            max_tokens=args.max_tokens, progress=not args.no_progress, init_ray=init,
                            retrieval={"iterative": True, "stride": args.stride} if args.iterative else None)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    s = summary
    print(f"answered {s.answered}, failed {s.failed}, already done {s.already_done}, "
          f"malformed lines {s.malformed}, duplicate ids {s.duplicates}; "
          f"{s.seconds:.1f} s, {s.questions_per_s:.2f} questions/s, {s.tokens_per_s:.1f} tokens/s, "
          f"mean accepted tokens per forward {s.mean_accepted_per_forward:.2f}", file=sys.stderr)
    print(json.dumps({"summary": s.as_dict(), "out": str(args.out)}))
    return 1 if s.failed else 0


def cmd_manifests(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deploy.manifests import ManifestError, write
    from pipeline.errors import CLIError

    out = Path(args.out)
    try:
        changed = write(Path(args.serve_config), out, Path(args.overrides) if args.overrides else None,
                        check=args.check)
    except ManifestError as exc:
        raise CLIError(str(exc)) from None
    if args.check:
        for name in changed:
            print(f"{out / name}: stale (run specrag manifests --from {args.serve_config} --out {args.out})",
                  file=sys.stderr)
        return 1 if changed else 0
    print(f"wrote {', '.join(str(out / n) for n in changed)}" if changed else f"{out}: up to date")
    return 0
