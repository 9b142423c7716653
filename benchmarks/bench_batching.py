"""Continuous batching benchmark: throughput and latency against concurrency, one engine loop.

    .venv/bin/python benchmarks/bench_batching.py          # writes benchmarks/results/batching.{json,md,png}
    .venv/bin/python benchmarks/bench_batching.py --quick  # concurrency 1, 4, 8; 8 requests; 64 tokens

For each concurrency c (1, 2, 4, 8, 16), ``c`` client threads send RAG questions over a
python-docs index (top-k chunks in the prompt and as drafting references), greedy, a fixed
number of new tokens, closed loop (a client sends its next request when its answer arrives):

* in-process: ``RAGPipeline.answer`` from c threads -- one GenerationStage, one engine loop --
  in a process of its own (``_inproc_worker``; not the one hosting the Ray driver);
* HTTP: the same service on a local Ray Serve, one Generator replica, non-streaming requests;

each with speculation on and off, the four runs interleaved per concurrency level so drifting
machine load hits them alike. Reported: tokens/s and questions/s of the whole run, p50/p99
latency, tokens per target forward, mean rows per engine step, and whether every answer equals
that question's answer at concurrency 1 without speculation. Then ``specrag batch`` (Ray Data)
questions/s at 1 and 2 actors. Not a timed test: run it alone on a quiet machine.

Besides the whole run's rate, each run reports its *steady* rate: tokens per second while all c
clients have a request out, i.e. without the run's final drain, in which ever fewer rows share a
step (``_steady``). A closed loop of equal-length requests keeps runs without speculation in
lockstep -- they all finish at the same step, so the drain is short -- while speculative requests
finish at different steps and drain longer; under a steady load there is no drain.
``--rounds R`` runs each path and mode R times per level, speculation first and second in turn.
``--rates`` adds open-loop runs: requests at Poisson arrival times, sent when due however many
are out, as independent users send them; reported are latency percentiles with speculation on
and off at each arrival rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import QUESTIONS, add_index_args, ensure_index, pct  # noqa: E402


def _steady(spans: list[tuple[float, float, int]], concurrency: int) -> tuple[float, float, float]:
    """(window start, window end, tokens in it) of a closed-loop run's steady part.

    The window runs from the moment every client has a request out (the ``concurrency``-th
    start) to the first finish after the last request started (from then on a client that
    finishes finds no question left: the drain). A request's tokens count in proportion to the
    part of its duration inside the window (tokens committed at an even rate over it). Runs
    whose requests finish at different times (speculation's) drain longer than runs whose
    requests finish together, so the whole-run rate penalises them for the run's end; this rate
    is the one a server under a steady load of ``concurrency`` clients keeps.
    """
    starts = sorted(s for s, _, _ in spans)
    t0 = starts[min(concurrency, len(starts)) - 1]
    t1 = min((e for _, e, _ in spans if e > starts[-1]), default=starts[-1])
    tokens = 0.0
    for s, e, n in spans:
        if e > s:
            tokens += n * max(0.0, min(e, t1) - max(s, t0)) / (e - s)
    return t0, t1, tokens


def _send_all(send, questions: list[str], workers: int,
              due: list[float] | None = None) -> tuple[list[tuple[float, float, str, dict]], float]:
    """Send every question from ``workers`` threads, each when a thread is free (or, given
    ``due``, not before ``due[i]`` seconds from the start); per request (start, end, answer,
    stats), in the questions' order, and the wall seconds of all."""
    results: list[tuple[float, float, str, dict]] = [None] * len(questions)  # type: ignore[list-item]

    def one(i: int) -> None:
        if due is not None:
            time.sleep(max(0.0, start + due[i] - time.perf_counter()))
        t0 = time.perf_counter()
        text, stats = send(questions[i])
        results[i] = (t0, time.perf_counter(), text, stats)

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(questions))))
    return results, time.perf_counter() - start


def _summary(results: list[tuple[float, float, str, dict]], wall: float) -> tuple[dict, list[float]]:
    """What both loops report of a run (tokens, rates, answers), and its requests' latencies."""
    tokens = sum(int(r[3].get("generated_tokens") or 0) for r in results)
    forwards = sum(int(r[3].get("target_forwards") or 0) for r in results)
    return ({"wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
             "tokens_per_forward": round(tokens / forwards, 3) if forwards else 0.0,
             "answers": [r[2] for r in results]},
            [r[1] - r[0] for r in results])


def _closed_loop(send, questions: list[str], concurrency: int) -> dict:
    """Send every question with ``concurrency`` clients; per request (latency, answer, stats)."""
    results, wall = _send_all(send, questions, concurrency)
    out, lat = _summary(results, wall)
    rows = [float(r[3].get("mean_rows_per_step") or 0) for r in results]
    w0, w1, steady_tokens = _steady([(r[0], r[1], int(r[3].get("generated_tokens") or 0)) for r in results],
                                    concurrency)
    return {**out, "questions_per_s": round(len(questions) / wall, 3),
            "steady_s": round(w1 - w0, 3),
            "steady_tokens_per_s": round(steady_tokens / (w1 - w0), 2) if w1 > w0 else None,
            "p50_s": round(pct(lat, 0.5), 3), "p99_s": round(pct(lat, 0.99), 3),
            "mean_rows_per_step": round(statistics.fmean(rows), 2) if rows else 0.0}


def _open_loop(send, questions: list[str], rate: float, seed: int = 0) -> dict:
    """Send the questions at Poisson arrival times, ``rate`` per second on average (seeded: every
    path and mode gets the same schedule), each whenever it is due, however many are out; per
    request (latency, answer, stats). No client waits for an answer before the next arrival, so
    there is neither lockstep nor drain: the load a server sees from many independent users."""
    rng = random.Random(seed)
    due = list(itertools.accumulate(rng.expovariate(rate) for _ in questions))
    results, wall = _send_all(send, questions, len(questions), due)
    out, lat = _summary(results, wall)
    return {**out, "rate": rate,
            "p50_s": round(pct(lat, 0.5), 3), "p90_s": round(pct(lat, 0.9), 3), "p99_s": round(pct(lat, 0.99), 3),
            "mean_in_flight": round(sum(lat) / wall, 2)}


def _median(rounds: list[dict], rank: str, medians: tuple[str, ...], kept: tuple[str, ...]) -> dict:
    """Repeated runs of one path, mode and level (or rate) as one: the round of median ``rank``,
    with the medians of ``medians`` in place of its own, each round's ``kept`` beside them, and
    the answers of every round, one round after another."""
    ranked = sorted(rounds, key=lambda r: r[rank])
    out = dict(ranked[(len(ranked) - 1) // 2])
    for key in medians:
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    out["rounds"] = [{k: r[k] for k in kept} for r in rounds]
    out["answers"] = [a for r in rounds for a in r["answers"]]
    return out


def _median_run(rounds: list[dict]) -> dict:
    """A closed-loop level's rounds: the round of median throughput, medians of both rates."""
    return _median(rounds, "tokens_per_s", ("tokens_per_s", "steady_tokens_per_s"),
                   ("tokens_per_s", "steady_tokens_per_s", "p50_s", "wall_s"))


def _median_open(rounds: list[dict]) -> dict:
    """An open-loop rate's rounds: the round of median p50 latency, medians of the latencies."""
    keys = ("p50_s", "p90_s", "p99_s", "tokens_per_s", "mean_in_flight")
    return _median(rounds, "p50_s", keys, keys + ("wall_s",))


def _rounds(paths: dict, rounds: int, kind: str, args, show) -> dict[str, list[dict]]:
    """Every path's runs of one level (``kind`` "closed") or rate ("open"), ``rounds`` times,
    speculation on and off; per run name ("http_spec", ...), its rounds' results in order.
    ``args(round)``: the run's arguments; ``show(result)``: its progress line. ABBA: speculation
    first in even rounds, second in odd ones, so drifting load and whatever one run leaves the
    next (caches, OpenMP teams) hit both modes alike."""
    per_round: dict[str, list[dict]] = {}
    for rnd in range(rounds):
        for path, run in paths.items():
            for spec in ((True, False) if rnd % 2 == 0 else (False, True)):
                name = f"{path}_{'spec' if spec else 'plain'}"
                r = run(kind, spec, *args(rnd))
                per_round.setdefault(name, []).append(r)
                print(f"  {name}: {show(r)}", file=sys.stderr, flush=True)
    return per_round


def _run(send, kind: str, *args) -> dict:
    return (_closed_loop if kind == "closed" else _open_loop)(send, *args)


def _inproc_worker(conn, pipeline: dict, max_tokens: int, k: int) -> None:
    """The in-process path's own process: one RAGPipeline (one engine loop), driven by the
    benchmark over a pipe. Not the benchmark's process, which hosts the Ray driver of the HTTP
    path: its threads would share the engine loop's GIL and slow it (measured before: 3.2-8.9 s
    against 2.9-5.9 s per request), which is not what a user of the pipeline gets."""
    from pipeline.api import AskRequest, RetrievalOptions, SpeculationOptions
    from pipeline.config import PipelineConfig
    from pipeline.rag import RAGPipeline

    pipe = RAGPipeline(PipelineConfig(**pipeline))

    def make(spec: bool):
        def send(q: str) -> tuple[str, dict]:
            res = pipe.answer(AskRequest(question=q, max_tokens=max_tokens, retrieval=RetrievalOptions(k=k),
                                         speculation=SpeculationOptions(enabled=spec)))
            return res.answer, res.stats
        return send

    try:
        while (msg := conn.recv()) is not None:
            kind, spec, args = msg
            conn.send(pipe.generation.health() if kind == "health" else _run(make(spec), kind, *args))
    finally:
        pipe.close()


def bench(index_dir: Path, questions: list[str], levels: list[int], max_tokens: int, k: int,
          http_too: bool = True, inproc_too: bool = True, waves: int = 1, prefix_cache: bool = True,
          rounds: int = 1, rates: tuple[float, ...] = (), open_requests: int = 32) -> dict:
    import multiprocessing

    import httpx
    import torch

    from deploy import local
    from deploy.config import ServeConfig

    threads = torch.get_num_threads()
    pipeline = {"index_dir": str(index_dir), "max_tokens": max_tokens, "k": k, "prefix_cache": prefix_cache}
    if inproc_too:
        spawn = multiprocessing.get_context("spawn")
        conn, child = spawn.Pipe()
        worker = spawn.Process(target=_inproc_worker, args=(child, pipeline, max_tokens, k), daemon=True)
        worker.start()
    cfg = ServeConfig.model_validate({
        "pipeline": pipeline, "torch_threads": threads,
        "generator": {"num_cpus": 0.5, "max_ongoing_requests": 16},
        "retriever": {"num_cpus": 0.25}, "ingress": {"num_cpus": 0.1},
    })
    if http_too:
        local.init_ray(num_cpus=2, log_to_driver=False, direct_ingress_port=8876)
        local.start_service(cfg, port=8875)
        url = local.direct_url("127.0.0.1") or "http://127.0.0.1:8875"
        local.wait_healthy(url)
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32))

    def inproc(kind: str, spec: bool, *args) -> dict:
        conn.send((kind, spec, args))
        return conn.recv()

    def http_send(spec: bool):
        def send(q: str) -> tuple[str, dict]:
            body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": q}],
                    "max_tokens": max_tokens, "temperature": 0, "speculation": {"enabled": spec}}
            r = client.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            d = r.json()
            return d["choices"][0]["message"]["content"], d["metrics"]["speculation"]
        return send

    def http(kind: str, spec: bool, *args) -> dict:
        return _run(http_send(spec), kind, *args)

    # per path: run(kind, spec, *args) -> a _closed_loop ("closed", questions, c) or _open_loop
    # ("open", questions, rate, seed) result
    paths = {name: run for name, run, on in (("inproc", inproc, inproc_too), ("http", http, http_too)) if on}
    for run in paths.values():
        run("closed", True, ["warm-up question about json"], 1)   # first forwards, Serve's handles
        if prefix_cache:
            # every question once, so every measured run finds the same prefix cache (each
            # question's prompt kept): otherwise the first run of a path pays every prefill and
            # the runs after it -- the other mode, the next level -- find them cached
            run("closed", True, list(dict.fromkeys(questions)), 4)
    runs: dict[str, dict[str, dict]] = {}
    for c in levels:
        print(f"concurrency {c} ...", file=sys.stderr, flush=True)
        # at least `waves` x c requests: with exactly c, every client sends one request and the
        # run ends with a drain in which ever fewer rows share a step (worse where speculation
        # makes requests finish at different times)
        n = max(len(questions), waves * c)
        level_questions = (questions * (n // len(questions) + 1))[:n]
        per_round = _rounds(paths, rounds, "closed", lambda rnd: (level_questions, c),
                            lambda r: f"{r['tokens_per_s']} tok/s (steady {r['steady_tokens_per_s']}), "
                                      f"p50 {r['p50_s']} s, rows/step {r['mean_rows_per_step']}")
        for name, rs in per_round.items():
            runs.setdefault(name, {})[str(c)] = _median_run(rs)
    open_runs: dict[str, dict[str, dict]] = {}
    open_questions = (questions * (open_requests // len(questions) + 1))[:open_requests]
    for rate in rates:
        print(f"open loop, {rate} requests/s ...", file=sys.stderr, flush=True)
        per_round = _rounds(paths, rounds, "open", lambda rnd: (open_questions, rate, rnd),
                            lambda r: f"p50 {r['p50_s']} s, p99 {r['p99_s']} s, in flight {r['mean_in_flight']}")
        for name, rs in per_round.items():
            open_runs.setdefault(name, {})[str(rate)] = _median_open(rs)
    if http_too:
        health = client.get(url + "/health").json()
        client.close()
        local.shutdown()
    else:
        health = inproc("health", False)
    if inproc_too:
        conn.send(None)
        worker.join(timeout=60)
    # each question's answer at the first level without speculation (its first round); a level's
    # answers are its rounds' one after another, each round asking level_questions in order
    reference = runs[f"{next(iter(paths))}_plain"][str(levels[0])]["answers"][:len(questions)]
    for per_level in (*runs.values(), *open_runs.values()):
        for r in per_level.values():
            answers = r.pop("answers")
            n_round = len(answers) // rounds
            r["requests"] = len(answers)
            r["identical_to_reference"] = sum(a == reference[(i % n_round) % len(questions)]
                                              for i, a in enumerate(answers))
    return {"runs": runs, "open_runs": open_runs, "torch_threads": threads, "health": health}


def bench_batch(index_dir: Path, n: int, max_tokens: int, actors: int, k: int) -> dict:
    from deploy import local
    from deploy.batch import run_batch

    with tempfile.TemporaryDirectory() as tmp:
        qfile, out = Path(tmp) / "q.jsonl", Path(tmp) / "a.jsonl"
        qfile.write_text("".join(json.dumps({"id": i, "question": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}) + "\n"
                                 for i in range(n)))
        local.init_ray(num_cpus=2, log_to_driver=False)
        s = run_batch(qfile, out, pipeline={"index_dir": str(index_dir), "max_tokens": max_tokens, "k": k},
                      concurrency=actors, progress=False)
        import ray

        ray.shutdown()
    return s.as_dict()


RUN_NAMES = ("inproc_spec", "inproc_plain", "http_spec", "http_plain")   # the tables' row order


def _label(name: str) -> str:
    """A run name's path and speculation cells: "http_spec" -> "HTTP | on"."""
    path, mode = name.split("_")
    return f"{'in-process' if path == 'inproc' else 'HTTP'} | {'on' if mode == 'spec' else 'off'}"


def markdown(res: dict) -> str:
    levels = res["levels"]
    runs = res["runs"]
    out = [f"Command: `{res['command']}`  ",
           f"Machine: {res['machine']}; load average {res['load_average_at_start']} at start, "
           f"{res['load_average_at_end']} at end.  ",
           f"max({res['requests']}, {res.get('waves', 1)} x concurrency) RAG questions per level "
           f"(k = {res['k']} python-docs chunks), "
           f"{res['max_tokens']} new "
           "tokens, greedy, closed loop; one engine loop (in-process) / one Generator replica (HTTP); "
           + ("prefix cache on, every question answered once per path before the runs (each prompt cached)."
              if res.get("prefix_cache", True) else "no prefix cache (every prompt prefilled)."), "",
           f"{res.get('rounds', 1)} round(s) per level, speculation first and second in turn (ABBA); the medians. "
           "Steady tokens/s: the rate while every client has a request out (the run's start and its final drain "
           "left out; `_steady`).", "",
           "| path | speculation | concurrency | tokens/s | steady tokens/s | questions/s | p50 s | p99 s "
           "| tokens/forward | rows/step | identical |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in RUN_NAMES if n in runs]:
        for c in levels:
            r = runs[name][str(c)]
            out.append(f"| {_label(name)} | {c} "
                       f"| {r['tokens_per_s']} | {r.get('steady_tokens_per_s')} | {r['questions_per_s']} "
                       f"| {r['p50_s']} | {r['p99_s']} "
                       f"| {r['tokens_per_forward']} | {r['mean_rows_per_step']} "
                       f"| {r['identical_to_reference']}/{r['requests']} |")
    out += ["", "| ratio | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---|" * len(levels)]
    first = f"c={levels[0]}"
    ratios = (   # label, run, vs: "c1" (the same run at the first level) or the run without speculation; metric
        (f"HTTP throughput vs {first} (spec on)", "http_spec", "c1", "tokens_per_s"),
        (f"in-process throughput vs {first} (spec on)", "inproc_spec", "c1", "tokens_per_s"),
        ("speculation on / off, HTTP", "http_spec", "http_plain", "tokens_per_s"),
        ("speculation on / off, in-process", "inproc_spec", "inproc_plain", "tokens_per_s"),
        (f"HTTP steady throughput vs {first} (spec on)", "http_spec", "c1", "steady_tokens_per_s"),
        ("speculation on / off, HTTP, steady", "http_spec", "http_plain", "steady_tokens_per_s"),
        ("speculation on / off, in-process, steady", "inproc_spec", "inproc_plain", "steady_tokens_per_s"),
    )
    for label, name, vs, metric in ratios:
        if name not in runs:
            continue
        cells = []
        for c in levels:
            base = runs[name][str(levels[0])] if vs == "c1" else runs[vs][str(c)]
            num, den = runs[name][str(c)].get(metric), base.get(metric)
            cells.append(f"{num / den:.2f}x" if num and den else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    open_runs = res.get("open_runs") or {}
    if open_runs:
        rates = list(next(iter(open_runs.values())))
        out += ["", f"Open loop: {res.get('open_requests')} requests per run at Poisson arrival times (the same "
                "seeded schedule for every path and mode), each sent when due whatever is out; latency in seconds.",
                "", "| path | speculation | requests/s | tokens/s | p50 s | p90 s | p99 s | mean in flight "
                "| tokens/forward | identical |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in [n for n in RUN_NAMES if n in open_runs]:
            for rate in rates:
                r = open_runs[name][rate]
                out.append(f"| {_label(name)} | {rate} | {r['tokens_per_s']} | {r['p50_s']} | {r['p90_s']} | {r['p99_s']} "
                           f"| {r['mean_in_flight']} | {r['tokens_per_forward']} "
                           f"| {r['identical_to_reference']}/{r['requests']} |")
        out += ["", "| latency off / on (> 1: speculation answers sooner) | "
                + " | ".join(f"{rate}/s" for rate in rates) + " |", "|---|" + "---|" * len(rates)]
        for path, label in (("http", "HTTP"), ("inproc", "in-process")):
            if f"{path}_spec" not in open_runs:
                continue
            for key in ("p50_s", "p99_s"):
                cells = [f"{open_runs[f'{path}_plain'][rate][key] / open_runs[f'{path}_spec'][rate][key]:.2f}x"
                         for rate in rates]
                out.append(f"| {label}, {key[:3]} | " + " | ".join(cells) + " |")
    if res.get("batch"):
        out += ["", "| `specrag batch` actors | questions/s | steady questions/s | tokens/s |", "|---|---|---|---|"]
        for a, d in res["batch"].items():
            out.append(f"| {a} | {d['questions_per_s']} | {d['steady_questions_per_s']} | {d['tokens_per_s']} |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = res["levels"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("inproc_spec", "o-"), ("inproc_plain", "o--"), ("http_spec", "s-"), ("http_plain", "s--")):
        if name not in res["runs"]:
            continue
        runs = res["runs"][name]
        a.plot(levels, [runs[str(c)]["tokens_per_s"] for c in levels], style, label=name.replace("_", ", "))
        b.plot(levels, [runs[str(c)]["p50_s"] for c in levels], style, label=name.replace("_", ", "))
    for ax, title in ((a, "throughput (tokens/s)"), (b, "p50 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle(f"one engine loop, {res['max_tokens']} new tokens, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=8,
                    help="requests per concurrency level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--batch-questions", type=int, default=16)
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--in-process-only", action="store_true",
                    help="no Ray Serve run (and no `specrag batch`); writes batching_inproc.{json,md,png}")
    ap.add_argument("--http-only", action="store_true",
                    help="no in-process run (the Ray driver in the benchmark's process slows an in-process engine "
                         "loop; run those with --in-process-only); writes batching_http.{json,md,png}")
    ap.add_argument("--waves", type=int, default=1,
                    help="at least this many requests per client at every level (default 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each path and mode per level, speculation first and second in turn (ABBA); "
                         "the tables give the medians")
    ap.add_argument("--rates", default="",
                    help="open-loop runs after the levels: requests per second, comma-separated (Poisson arrivals, "
                         "no client waits for its answer); latency percentiles with speculation on and off")
    ap.add_argument("--open-requests", type=int, default=32, help="requests per open-loop run")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="engines without prefix caching: every prompt prefilled (with it, the default, each path "
                         "first answers every question once, so every run finds each question's prompt cached)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if args.quick:
        args.levels, args.requests, args.max_tokens = "1,4,8", 8, 64
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from speculation.models import cpu_info

    index_dir = ensure_index(args)
    levels = [int(x) for x in args.levels.split(",")]
    questions = (QUESTIONS * (args.requests // len(QUESTIONS) + 1))[:args.requests]
    load_start = [round(x, 2) for x in os.getloadavg()]
    if args.in_process_only and args.http_only:
        ap.error("--in-process-only and --http-only exclude each other")
    raw = bench(index_dir, questions, levels, args.max_tokens, args.k, http_too=not args.in_process_only,
                inproc_too=not args.http_only, waves=args.waves, prefix_cache=not args.no_prefix_cache,
                rounds=args.rounds, rates=tuple(float(x) for x in args.rates.split(",") if x),
                open_requests=args.open_requests)
    batch = {}
    if not args.skip_batch and not args.in_process_only:
        for a in (1, 2):
            print(f"specrag batch, {a} actor(s) ...", file=sys.stderr, flush=True)
            batch[str(a)] = bench_batch(index_dir, args.batch_questions, args.max_tokens, a, args.k)
    res = {"command": "python benchmarks/bench_batching.py " + shlex.join(sys.argv[1:]),
           "machine": f"{cpu_info()['model'] or platform.machine()}, {os.cpu_count()} CPUs, "
                      f"torch threads {torch.get_num_threads()}",
           "load_average_at_start": load_start, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "levels": levels, "requests": len(questions), "waves": args.waves, "rounds": args.rounds,
           "open_requests": args.open_requests, "prefix_cache": not args.no_prefix_cache,
           "max_tokens": args.max_tokens,
           "k": args.k,
           **raw, "batch": batch}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "batching_inproc" if args.in_process_only else "batching_http" if args.http_only else "batching"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    plot(res, args.out / f"{stem}.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
