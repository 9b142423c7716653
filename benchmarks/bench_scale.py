"""Scale benchmark: the endpoint at 1 and 2 Generator replicas, and the autoscaling timeline.

    .venv/bin/python benchmarks/bench_scale.py            # writes benchmarks/results/scale.{json,md,png}
    .venv/bin/python benchmarks/bench_scale.py --quick    # fewer requests, a shorter ramp

1. Fixed replicas: a local Ray (2 CPUs), the real app over HTTP (Serve's proxy), 1 then 2
   Generator replicas (``num_replicas``), ``--requests`` RAG questions over python-docs at
   concurrency ``--concurrency``, closed loop: requests/s, tokens/s, p50/p99 latency.
2. Autoscaling timeline: a local autoscaling cluster (``deploy.fakecluster``: Ray's real
   autoscaler, fake worker nodes on this machine), the Generator needing a resource only worker
   nodes have, Serve autoscaling 1..2 replicas with short delays, a load ramp of concurrency
   phases; Generator replicas (``serve.status()``), worker nodes (Ray's state API) and requests
   in flight sampled every second, plotted against time.

Bounded and loopback only. Not a timed test: run it alone on a quiet machine (load average
recorded at start and end).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serve import QUESTIONS, add_index_args, ensure_index, pct  # noqa: E402

APP = "specrag"
NODE_RESOURCE = "generator_node"
FAST_METRICS = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(index_dir: Path, max_tokens: int, k: int, generator: dict) -> object:
    from deploy.config import ServeConfig

    return ServeConfig.model_validate({
        "pipeline": {"index_dir": str(index_dir), "max_tokens": max_tokens, "k": k},
        "torch_threads": 1,
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64},
        "retriever": {"num_cpus": 0.2},
        "generator": {"num_cpus": 0.5, "max_ongoing_requests": 16, "health_check_timeout_s": 60, **generator},
    })


def _post(url: str, question: str, max_tokens: int) -> tuple[int, int]:
    import httpx

    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0})
    return r.status_code, (r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0)


def fixed_replicas(index_dir: Path, replicas: int, n: int, concurrency: int, max_tokens: int, k: int) -> dict:
    from deploy import local

    local.init_ray(num_cpus=2, log_to_driver=False)
    try:
        url = local.start_service(_config(index_dir, max_tokens, k, {"num_replicas": replicas}), port=free_port(),
                                  app_name=APP)
        local.wait_healthy(url, timeout_s=300)
        for q in QUESTIONS[:2]:
            _post(url, q, 4)                                   # warm-up
        questions = [f"{QUESTIONS[i % len(QUESTIONS)]} ({i})" for i in range(n)]
        lat: list[float] = []
        tokens = errors = 0

        def one(q: str) -> None:
            nonlocal tokens, errors
            t0 = time.perf_counter()
            status, used = _post(url, q, max_tokens)
            lat.append(time.perf_counter() - t0)
            tokens += used
            errors += status != 200

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, questions))
        wall = time.perf_counter() - t0
        return {"replicas": replicas, "requests": n, "concurrency": concurrency, "errors": errors,
                "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 3),
                "tokens_per_s": round(tokens / wall, 2), "p50_s": round(pct(lat, 0.5), 3),
                "p99_s": round(pct(lat, 0.99), 3)}
    finally:
        local.shutdown()


def ramp(index_dir: Path, phases: list[tuple[int, float]], max_tokens: int, k: int) -> dict:
    """The autoscaling timeline under a load ramp of (concurrency, seconds) phases."""
    from ray import serve

    from deploy import local
    from deploy.fakecluster import LocalAutoscalingCluster, alive_nodes

    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"generator.worker": {"resources": {"CPU": 1, NODE_RESOURCE: 1}, "node_config": {},
                                                "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=0.1)
    cluster.start({**FAST_METRICS, "RAY_USAGE_STATS_ENABLED": "0"})
    samples: list[dict] = []
    try:
        local.init_ray(address="auto", log_to_driver=False, runtime_env={"env_vars": FAST_METRICS})
        cfg = _config(index_dir, max_tokens, k, {
            "resources": {NODE_RESOURCE: 1},
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                            "upscale_delay_s": 2, "downscale_delay_s": 10, "look_back_period_s": 4, "metrics_interval_s": 0.5}})
        url = local.start_service(cfg, port=free_port(), app_name=APP)
        local.wait_healthy(url, timeout_s=300)
        state = {"concurrency": 0, "in_flight": 0, "done": 0, "errors": 0}
        stop = threading.Event()
        t0 = time.monotonic()

        def sampler() -> None:
            while not stop.is_set():
                try:
                    states = serve.status().applications[APP].deployments["Generator"].replica_states
                    samples.append({"t": round(time.monotonic() - t0, 1), "replicas": int(states.get("RUNNING", 0)),
                                    "nodes": alive_nodes(NODE_RESOURCE), **state})
                except Exception:  # noqa: BLE001 - a status call during a scale event
                    pass
                stop.wait(1.0)

        def client(i: int, until: float) -> None:
            n = 0
            while time.monotonic() < until:
                n += 1
                state["in_flight"] += 1
                status, _ = _post(url, f"{QUESTIONS[(i + n) % len(QUESTIONS)]} ({i}.{n})", max_tokens)
                state["in_flight"] -= 1
                state["done"] += 1
                state["errors"] += status != 200

        threading.Thread(target=sampler, daemon=True).start()
        for concurrency, seconds in phases:
            state["concurrency"] = concurrency
            until = time.monotonic() + seconds
            threads = [threading.Thread(target=client, args=(i, until)) for i in range(concurrency)]
            for th in threads:
                th.start()
            if not threads:
                time.sleep(seconds)
            for th in threads:
                th.join()
        stop.set()
        return {"phases": phases, "samples": samples, "requests": state["done"], "errors": state["errors"]}
    finally:
        try:
            serve.shutdown()
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()


def markdown(res: dict) -> str:
    lines = [f"Generator replicas on one {res['machine']} (closed loop, {res['max_tokens']} new tokens, k = {res['k']}):",
             "", "| Generator replicas | requests | concurrency | errors | requests/s | tokens/s | p50 s | p99 s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["fixed"]:
        lines.append(f"| {r['replicas']} | {r['requests']} | {r['concurrency']} | {r['errors']} | {r['requests_per_s']} "
                     f"| {r['tokens_per_s']} | {r['p50_s']} | {r['p99_s']} |")
    if len(res["fixed"]) == 2 and res["fixed"][0]["tokens_per_s"]:
        lines += ["", f"2 replicas / 1 replica, tokens/s: {res['fixed'][1]['tokens_per_s'] / res['fixed'][0]['tokens_per_s']:.2f}x "
                      "(each replica runs torch on one thread, `torch_threads: 1`: a second replica puts the "
                      "second core to work; one engine loop per replica batches its own requests)."]
    r = res.get("ramp")
    if r:
        peak_r = max((s["replicas"] for s in r["samples"]), default=0)
        peak_n = max((s["nodes"] for s in r["samples"]), default=0)
        lines += ["", f"Autoscaling under a load ramp (phases of (concurrency, seconds): {r['phases']}): "
                      f"{r['requests']} requests, {r['errors']} errors; Generator replicas peaked at {peak_r}, "
                      f"worker nodes at {peak_n}, final {r['samples'][-1]['replicas'] if r['samples'] else '?'} "
                      f"replica(s) on {r['samples'][-1]['nodes'] if r['samples'] else '?'} node(s). Plot: scale.png."]
    lines += ["", f"Command: `{res['command']}`; load average at start {res['load_average_at_start']}, "
                  f"at end {res['load_average_at_end']}."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["ramp"]["samples"]
    t = [x["t"] for x in s]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(t, [x["replicas"] for x in s], where="post", label="Generator replicas (serve.status)")
    ax.step(t, [x["nodes"] for x in s], where="post", linestyle="--", label="alive worker nodes")
    ax.set_xlabel("seconds")
    ax.set_ylabel("count")
    ax.set_ylim(0, 3)
    ax2 = ax.twinx()
    ax2.plot(t, [x["concurrency"] for x in s], color="grey", alpha=0.5, label="client concurrency")
    ax2.plot(t, [x["in_flight"] for x in s], color="tab:red", alpha=0.4, label="requests in flight")
    ax2.set_ylabel("requests")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.suptitle(f"Serve + Ray autoscaling under a load ramp, {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_index_args(ap)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--ramp", default="1:15,4:20,8:40,0:45", help="load phases, concurrency:seconds")
    ap.add_argument("--skip-ramp", action="store_true")
    ap.add_argument("--ramp-only", action="store_true", help="keep the fixed-replica rows of the last results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.ramp = 16, 32, "4:15,8:25,0:40"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    index_dir = ensure_index(args)
    load_start = [round(x, 2) for x in os.getloadavg()]
    fixed = []
    previous = args.out / "scale.json"
    if args.ramp_only and previous.exists():
        fixed = json.loads(previous.read_text())["fixed"]
    for replicas in () if args.ramp_only else (1, 2):
        print(f"{replicas} Generator replica(s) ...", file=sys.stderr, flush=True)
        fixed.append(fixed_replicas(index_dir, replicas, args.requests, args.concurrency, args.max_tokens, args.k))
        print(json.dumps(fixed[-1]), file=sys.stderr, flush=True)
    ramp_res = None
    if not args.skip_ramp:
        phases = [(int(c), float(s)) for c, s in (p.split(":") for p in args.ramp.split(","))]
        print(f"autoscaling ramp {phases} ...", file=sys.stderr, flush=True)
        ramp_res = ramp(index_dir, phases, args.max_tokens, args.k)
    res = {"command": "python benchmarks/bench_scale.py " + shlex.join(sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "load_average_at_start": load_start, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "max_tokens": args.max_tokens, "k": args.k, "fixed": fixed, "ramp": ramp_res}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "scale.md").write_text(markdown(res))
    if ramp_res:
        plot(res, args.out / "scale.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
