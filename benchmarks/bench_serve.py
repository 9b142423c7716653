"""Serving benchmark: what Ray Serve + HTTP cost on top of the in-process pipeline, batch
throughput on Ray Data, and the memory of the whole local service.

    .venv/bin/python benchmarks/bench_serve.py            # writes benchmarks/results/serve.{json,md}

1. Endpoint overhead: the same greedy requests in-process through ``RAGPipeline.answer`` and
   through HTTP streaming and non-streaming on a local Ray Serve, interleaved per question,
   both straight to the Ingress replica (direct ingress) and through Serve's HTTP proxy.
   The overhead (target <= 15 ms at p50) is paired per request: client-observed time minus the
   time the Retriever and Generator replicas report for that request's pipeline work (for time
   to first token: retrieval + the Generator's time to its first text); a per-hop breakdown
   from the Ingress's timestamps; in-process vs served columns side by side as a cross-check.
2. Batch throughput (questions/s, tokens/s) of ``specrag batch``'s Ray Data path at
   concurrency 1 and 2; start-up (Ray, actors, model loading) reported apart (--skip-batch
   keeps the previous numbers).
3. Memory: proportional set size (PSS, shared pages split fairly) of every Ray process of the
   running service, summed (target < 4 GB); RSS sum as well (an over-count).

The in-process pipeline sits in the driver beside the running service; only one of them
computes at any moment. Not a timed test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from questions import SERVE_QUESTIONS as QUESTIONS  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def summarize(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(xs, 0.5) * 1000, 2), "p90_ms": round(pct(xs, 0.9) * 1000, 2),
            "mean_ms": round(statistics.fmean(xs) * 1000, 2), "n": len(xs)}


DEFAULT_CORPUS = "python-docs:functools,json,textwrap,pathlib"


def add_index_args(ap: argparse.ArgumentParser) -> None:
    """--corpus / --index, shared by the serving, batching and scale benchmarks."""
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--index", type=Path, help="index dir (default: built under the cache)")


def ensure_index(args: argparse.Namespace) -> Path:
    """``--index``, or the corpus's index under the cache, built on first use."""
    from speculation.models import cache_dir

    index_dir = args.index or cache_dir() / "indexes" / ("bench-serve-" + args.corpus.replace(":", "-").replace(",", "-"))
    build_index(index_dir, args.corpus)
    return index_dir


def build_index(index_dir: Path, corpus: str) -> None:
    if (index_dir / "manifest.json").exists():
        return
    subprocess.run([str(Path(sys.executable).parent / "specrag"), "ingest", corpus, "--index", str(index_dir)],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _inprocess_request(pipe, q: str, max_tokens: int) -> tuple[float, float, str, dict]:
    from pipeline.api import AskRequest

    first: list[float] = []
    t0 = time.perf_counter()

    def on_text(_delta: str) -> None:
        if not first:
            first.append(time.perf_counter() - t0)

    res = pipe.answer(AskRequest(question=q, max_tokens=max_tokens), on_text=on_text)
    total = time.perf_counter() - t0
    return (first[0] if first else total), total, res.answer, dict(res.stats.get("seconds") or {})


def _body(q: str, max_tokens: int, stream: bool) -> dict:
    return {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": q}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def _stream_request(client, url: str, q: str, max_tokens: int) -> tuple[float, float, str, dict]:
    t0 = time.perf_counter()
    first = None
    text, seconds = [], {}
    with client.stream("POST", url + "/v1/chat/completions", json=_body(q, max_tokens, True)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                if first is None:
                    first = time.perf_counter() - t0
                text.append(chunk["choices"][0]["delta"]["content"])
            if "metrics" in chunk:
                seconds = chunk["metrics"]["seconds"]
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, "".join(text), seconds


def _plain_request(client, url: str, q: str, max_tokens: int) -> tuple[float, str, dict]:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=_body(q, max_tokens, False))
    total = time.perf_counter() - t0
    r.raise_for_status()
    body = r.json()
    return total, body["choices"][0]["message"]["content"], body["metrics"]["seconds"]


def ray_memory() -> dict[str, float]:
    """PSS / RSS of every process under this driver (gcs, raylet, workers, replicas)."""
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True)
    pss = rss = 0
    names: dict[str, float] = {}
    for p in procs:
        try:
            info = p.memory_full_info()
            pss += info.pss
            rss += info.rss
            name = p.name()
            names[name] = names.get(name, 0) + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    driver = me.memory_full_info()
    top = dict(sorted(((k, round(v / 2**20, 1)) for k, v in names.items()), key=lambda kv: -kv[1])[:8])
    return {"processes": len(procs), "pss_mb": round(pss / 2**20, 1), "rss_mb": round(rss / 2**20, 1),
            "driver_pss_mb": round(driver.pss / 2**20, 1), "top_by_name_pss_mb": top}


def bench_endpoint(index_dir: Path, questions: list[str], max_tokens: int) -> dict:
    """The same requests in-process and over HTTP (streaming and not), interleaved per question
    so drifting machine load hits all three alike. The in-process pipeline lives in this
    driver next to the running service; one of them computes at a time."""
    import httpx
    import torch

    from deploy import local
    from deploy.config import ServeConfig
    from pipeline.api import AskRequest
    from pipeline.config import PipelineConfig
    from pipeline.rag import RAGPipeline

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    pipe = RAGPipeline(PipelineConfig(index_dir=str(index_dir), max_tokens=max_tokens))
    load_s = time.perf_counter() - t0
    pipe.answer(AskRequest(question="warm-up question about json", max_tokens=8))
    cfg = ServeConfig.model_validate({
        "pipeline": {"index_dir": str(index_dir), "max_tokens": max_tokens},
        "torch_threads": threads,  # same intra-op threads as in-process (Ray would give 1 for 0.5 CPU)
        "generator": {"num_cpus": 0.5}, "retriever": {"num_cpus": 0.25}, "ingress": {"num_cpus": 0.1},
    })
    t0 = time.perf_counter()
    local.init_ray(num_cpus=2, log_to_driver=False, direct_ingress_port=8766)
    urls = {"proxy": local.start_service(cfg, port=8765)}
    local.wait_healthy(urls["proxy"])
    direct = local.direct_url("127.0.0.1")
    if direct is None:
        raise SystemExit("the Ingress replica does not answer on a direct ingress port")
    urls["direct"] = direct
    start_s = time.perf_counter() - t0
    client = httpx.Client(timeout=300)  # one keep-alive connection per host, like an OpenAI client
    for _ in range(2):
        for url in urls.values():
            _stream_request(client, url, "warm-up question about json", 8)
            _plain_request(client, url, "warm-up question about json", 8)
    rows = []
    for q in questions:
        ip_ttft, ip_total, ip_text, ip_sec = _inprocess_request(pipe, q, max_tokens)
        row = {"question": q, "ip_ttft": ip_ttft, "ip_total": ip_total, "ip_seconds": ip_sec}
        texts = [ip_text]
        for path, url in urls.items():
            st_ttft, st_total, st_text, st_sec = _stream_request(client, url, q, max_tokens)
            pl_total, pl_text, pl_sec = _plain_request(client, url, q, max_tokens)
            row[path] = {"st_ttft": st_ttft, "st_total": st_total, "st_seconds": st_sec,
                         "pl_total": pl_total, "pl_seconds": pl_sec}
            texts += [st_text, pl_text]
        row["same_answer"] = len(set(texts)) == 1
        rows.append(row)
    models: dict[str, list[float]] = {path: [] for path in urls}
    for _ in range(20):
        for path, url in urls.items():
            t1 = time.perf_counter()
            client.get(url + "/v1/models").raise_for_status()
            models[path].append(time.perf_counter() - t1)
    mem = ray_memory()
    client.close()
    local.shutdown()
    del pipe
    gc.collect()
    return {"load_s": round(load_s, 2), "start_s": round(start_s, 2), "torch_threads": threads,
            "memory": mem, "rows": rows, "get_models": {path: summarize(xs) for path, xs in models.items()}}


def endpoint_summary(d: dict) -> dict:
    """Side by side, and the serving overhead paired per request: what the client saw minus the
    time the pipeline stages report for that very request (retrieval in the Retriever replica,
    generation in the Generator replica) -- the in-process pipeline's work, measured where it
    ran, so neither machine load nor run-to-run variation of the model's speed enters."""
    rows = d["rows"]

    def col(f):
        return [f(r) for r in rows]

    stage = lambda s: float(s["total"]) + float(s.get("retrieval", 0.0))  # noqa: E731
    out = {
        "in_process": {"ttft": summarize(col(lambda r: r["ip_ttft"])), "total": summarize(col(lambda r: r["ip_total"])),
                       "retrieval": summarize(col(lambda r: float(r["ip_seconds"].get("retrieval", 0.0)))),
                       "generation": summarize(col(lambda r: float(r["ip_seconds"]["total"]) - float(r["ip_seconds"].get("retrieval", 0.0))))},
        "answers_identical": all(r["same_answer"] for r in rows),
    }
    for path in ("direct", "proxy"):
        def pc(f, path=path):
            return col(lambda r: f(r[path]))

        out[path] = {
            "http_stream": {"ttft": summarize(pc(lambda r: r["st_ttft"])), "total": summarize(pc(lambda r: r["st_total"]))},
            "http_plain": {"total": summarize(pc(lambda r: r["pl_total"])),
                           "retrieval": summarize(pc(lambda r: float(r["pl_seconds"]["retrieval"]))),
                           "generation": summarize(pc(lambda r: float(r["pl_seconds"]["total"])))},
            "paired_overhead": {
                "ttft_stream": summarize(pc(lambda r: r["st_ttft"] - float(r["st_seconds"]["retrieval"])
                                            - float(r["st_seconds"]["first_text"]))),
                "total_stream": summarize(pc(lambda r: r["st_total"] - stage(r["st_seconds"]))),
                "total_plain": summarize(pc(lambda r: r["pl_total"] - stage(r["pl_seconds"]))),
            },
            # where the non-streaming overhead goes, per hop (medians)
            "hops_plain": {
                "client_to_ingress_and_back": summarize(pc(lambda r: r["pl_total"] - float(r["pl_seconds"]["total_endpoint"]))),
                "ingress_to_retriever_and_back": summarize(pc(lambda r: float(r["pl_seconds"]["retrieve_endpoint"]) - float(r["pl_seconds"]["retrieval"]))),
                "ingress_to_generator_and_back": summarize(pc(lambda r: float(r["pl_seconds"]["total_endpoint"]) - float(r["pl_seconds"]["retrieve_endpoint"]) - float(r["pl_seconds"]["total"]))),
            },
            # direct differences, same question, served - in-process: carry the model's own
            # run-to-run variation (seconds of generation on a shared CPU), so only a cross-check
            "direct_difference": {
                "ttft_stream": summarize(col(lambda r: r[path]["st_ttft"] - r["ip_ttft"])),
                "total_stream": summarize(col(lambda r: r[path]["st_total"] - r["ip_total"])),
                "total_plain": summarize(col(lambda r: r[path]["pl_total"] - r["ip_total"])),
            },
            "get_models": d["get_models"][path],
        }
        po = out[path]["paired_overhead"]
        out[path]["meets_target"] = po["total_plain"]["p50_ms"] <= 15.0 and po["ttft_stream"]["p50_ms"] <= 15.0
    return out


def bench_batch(index_dir: Path, n: int, max_tokens: int, concurrency: int) -> dict:
    from deploy import local
    from deploy.batch import run_batch

    with tempfile.TemporaryDirectory() as tmp:
        qfile, out = Path(tmp) / "q.jsonl", Path(tmp) / "a.jsonl"
        qfile.write_text("".join(json.dumps({"id": i, "question": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}) + "\n"
                                 for i in range(n)))
        t0 = time.perf_counter()
        local.init_ray(num_cpus=2, log_to_driver=False)
        s = run_batch(qfile, out, pipeline={"index_dir": str(index_dir), "max_tokens": max_tokens},
                      concurrency=concurrency, progress=False)
        wall = time.perf_counter() - t0
        import ray

        ray.shutdown()
    d = s.as_dict()
    d["wall_with_ray_start_s"] = round(wall, 2)
    steady_span = s.last_answer_seconds - s.startup_seconds
    d["steady_tokens_per_s"] = round(s.tokens * (s.answered - 1) / s.answered / steady_span, 2) if steady_span > 0 and s.answered > 1 else 0.0
    return d


def markdown(res: dict) -> str:
    e = res["endpoint"]
    ip, dr, px = e["in_process"], e["direct"], e["proxy"]

    def ms(d: dict, q: str = "p50_ms") -> str:
        return f"{d[q]} ms"

    def both(f, q: str = "p50_ms") -> str:
        return f"{ms(f(dr), q)} | {ms(f(px), q)}"

    lines = [
        "# Serving benchmark (Ray Serve + HTTP vs in-process)", "",
        f"Machine: {res['machine']}. Model {res['model']}, greedy, max_tokens={res['max_tokens']}, "
        f"{res['requests']} questions, each asked in-process, then over HTTP streaming and non-streaming "
        f"straight to the Ingress replica (Ray Serve's direct ingress, the URL `specrag serve` prints first) "
        f"and the same through Serve's HTTP proxy (interleaved, two warm-ups not counted), index "
        f"`{res['corpus']}`. Torch threads: {res['endpoint_raw']['torch_threads']} in-process and in the "
        f"Generator replica.", "",
        f"Command: `{res['command']}`", "",
        f"Load average (1, 5, 15 min) at start {res['load_average_at_start']}, at end "
        f"{res['load_average_at_end']}. {res.get('load_note', '')}", "",
        "## Endpoint overhead", "",
        "**Serving overhead, paired per request**: what the client saw minus the time the pipeline stages "
        "report for that very request (retrieval inside the Retriever replica + generation inside the "
        "Generator replica; for time to first token, the Generator's own time to its first text). That is "
        "the in-process pipeline's work measured where it ran, so the difference is what Ray Serve, the "
        "deployment hops and HTTP add, free of the model's run-to-run variation.", "",
        "| paired overhead | direct p50 | via proxy p50 | direct p90 | via proxy p90 |", "|---|---|---|---|---|",
    ]
    for label, key in (("time to first token (streaming)", "ttft_stream"), ("total latency, streaming", "total_stream"),
                       ("total latency, non-streaming", "total_plain")):
        lines.append(f"| {label} | {both(lambda p: p['paired_overhead'][key])} | "
                     f"{both(lambda p: p['paired_overhead'][key], 'p90_ms')} |")
    lines += [
        "",
        f"Target ≤ 15 ms at p50 — direct: **{'met' if dr['meets_target'] else 'not met'}**; "
        f"through the proxy: **{'met' if px['meets_target'] else 'not met'}**.", "",
        "Where the non-streaming overhead goes (p50 per hop, from the timestamps the Ingress reports):", "",
        "| hop | direct p50 | via proxy p50 | direct p90 | via proxy p90 |", "|---|---|---|---|---|",
    ]
    for label, key in (("client → Ingress (HTTP, request body, FastAPI, response) and back", "client_to_ingress_and_back"),
                       ("Ingress → Retriever replica and back (beyond its retrieval)", "ingress_to_retriever_and_back"),
                       ("Ingress → Generator replica and back (beyond its generation)", "ingress_to_generator_and_back")):
        lines.append(f"| {label} | {both(lambda p: p['hops_plain'][key])} | {both(lambda p: p['hops_plain'][key], 'p90_ms')} |")
    lines += [
        f"| for scale: `GET /v1/models` (HTTP + Ingress only, no deployment call) | {both(lambda p: p['get_models'])} | "
        f"{both(lambda p: p['get_models'], 'p90_ms')} |",
        "",
        "Side by side (same questions; the served columns' stage times are what the replicas report):", "",
        "| | in-process | direct, streaming | direct, non-streaming | via proxy, streaming | via proxy, non-streaming |",
        "|---|---|---|---|---|---|",
        f"| time to first token p50 | {ms(ip['ttft'])} | {ms(dr['http_stream']['ttft'])} | – | {ms(px['http_stream']['ttft'])} | – |",
        f"| total latency p50 | {ms(ip['total'])} | {ms(dr['http_stream']['total'])} | {ms(dr['http_plain']['total'])} | "
        f"{ms(px['http_stream']['total'])} | {ms(px['http_plain']['total'])} |",
        f"| total latency p90 | {ms(ip['total'], 'p90_ms')} | {ms(dr['http_stream']['total'], 'p90_ms')} | "
        f"{ms(dr['http_plain']['total'], 'p90_ms')} | {ms(px['http_stream']['total'], 'p90_ms')} | {ms(px['http_plain']['total'], 'p90_ms')} |",
        f"| retrieval stage p50 | {ms(ip['retrieval'])} | – | {ms(dr['http_plain']['retrieval'])} | – | {ms(px['http_plain']['retrieval'])} |",
        f"| generation stage p50 | {ms(ip['generation'])} | – | {ms(dr['http_plain']['generation'])} | – | {ms(px['http_plain']['generation'])} |",
        "",
        f"Direct differences, served − in-process on the same question (p50, direct ingress): time to first token "
        f"{ms(dr['direct_difference']['ttft_stream'])}, total {ms(dr['direct_difference']['total_stream'])} streaming, "
        f"{ms(dr['direct_difference']['total_plain'])} non-streaming. These carry the model's own run-to-run "
        f"variation on a shared 2-core CPU (p90 − p50 of the in-process total alone: "
        f"{round(ip['total']['p90_ms'] - ip['total']['p50_ms'], 2)} ms), so they cross-check the sign and size, "
        f"not the milliseconds.", "",
        f"Answers identical in-process, streamed and non-streamed, direct and through the proxy: **{e['answers_identical']}**.",
        f"Service start (Ray + 3 deployments + models): {res['endpoint_raw']['start_s']} s; in-process pipeline load: "
        f"{res['endpoint_raw']['load_s']} s.",
        "",
        "## Batch throughput (`specrag batch`, Ray Data actor pool)", "",
    ]
    if res.get("batch_note"):
        lines += [res["batch_note"], ""]
    lines += [
        "| concurrency | questions | answered | steady questions/s | steady tokens/s | overall questions/s | start-up s | mean accepted tokens/forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, b in res["batch"].items():
        lines.append(f"| {c} | {res['batch_questions']} | {b['answered']} | {b['steady_questions_per_s']} | "
                     f"{b['steady_tokens_per_s']} | {b['questions_per_s']} | {b['startup_seconds']} | "
                     f"{b['mean_accepted_tokens_per_forward']} |")
    m = res["endpoint_raw"]["memory"]
    lines += [
        "", "## Memory of the local service", "",
        f"All {m['processes']} Ray processes (GCS, raylet, Serve controller and proxy, 3 replicas, idle workers) "
        f"together: **{m['pss_mb']} MB PSS** ({m['rss_mb']} MB RSS summed, which double-counts shared pages); "
        f"target < 4096 MB — **{'met' if m['pss_mb'] < 4096 else 'not met'}**. "
        f"The driver itself (which also holds the in-process pipeline here): {m['driver_pss_mb']} MB.", "",
        "Largest by process name (PSS, MB): " + ", ".join(f"{k} {v}" for k, v in m["top_by_name_pss_mb"].items()),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-questions", type=int, default=16)
    ap.add_argument("--skip-batch", action="store_true",
                    help="measure endpoint overhead and memory only; keep the batch numbers of the previous results")
    ap.add_argument("--load-note", default="", help="a sentence on what else ran on the machine")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    index_dir = ensure_index(args)
    questions = (QUESTIONS * ((args.requests // len(QUESTIONS)) + 1))[: args.requests]
    threads = torch.get_num_threads()
    load_start = [round(x, 2) for x in os.getloadavg()]

    print("endpoint: in-process and HTTP, interleaved ...", file=sys.stderr, flush=True)
    raw = bench_endpoint(index_dir, questions, args.max_tokens)
    endpoint = endpoint_summary(raw)
    previous = args.out / "serve.json"
    batch, batch_note = {}, ""
    if args.skip_batch:
        if previous.exists():
            old = json.loads(previous.read_text())
            batch = old.get("batch", {})
            batch_note = old.get("batch_note") or (
                f"Not re-measured in this run (--skip-batch): numbers from the previous run "
                f"(load average then {old.get('load_average_at_start')}).")
    else:
        for c in (1, 2):
            print(f"batch, concurrency {c} ...", file=sys.stderr, flush=True)
            batch[str(c)] = bench_batch(index_dir, args.batch_questions, args.max_tokens, c)
    res = {
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "load_average_at_start": load_start,
        "load_note": args.load_note,
        "command": "python benchmarks/bench_serve.py " + shlex.join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}",
        "model": "smollm2-135m-instruct", "corpus": args.corpus, "requests": len(questions),
        "max_tokens": args.max_tokens, "batch_questions": args.batch_questions if not args.skip_batch else
        (json.loads(previous.read_text()).get("batch_questions") if previous.exists() else 0),
        "endpoint": endpoint, "endpoint_raw": raw, "batch": batch, "batch_note": batch_note,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "serve.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
