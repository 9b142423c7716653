"""Retrieval benchmark: ingest throughput and memory, search latency by batch size, Redis MGET.

    .venv/bin/python benchmarks/bench_retrieval.py            # full python-docs corpus (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_retrieval.py --quick    # a few modules, a smaller synthetic index

Writes benchmarks/results/retrieval.json and retrieval.md. What it measures and why:

- ingest: chunks/s of ``specrag ingest python-docs`` (real MiniLM, generator tokenizer), run in a
  child process so its peak RSS is its own; a subset ingest gives a second peak to show memory is
  flat in corpus size (the corpus is streamed; the index itself is what grows).
- search: p50/p99 of one ``Retriever.retrieve`` call (embedding + search + store read) for batches
  of 1, 4 and 16 queries, for flat, hnsw and bm25; and the cost of a batch of s queries relative
  to s single queries -- retrieval speculation verifies s steps with one batched call and gains
  exactly when that ratio is below 1.
- ANN at scale: FAISS search alone (precomputed query vectors) on a synthetic clustered index, since
  the python-docs index is small enough for flat search to be nearly free.
- Redis: ``RedisDocStore.get`` (one MGET + decoding) for 1 and 20 chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch/faiss load their OpenMP runtimes: with the default (active, spinning) wait policy,
# torch's and FAISS's thread pools stall each other on a small or shared CPU machine -- measured
# 2-4x slower query embedding here. Export OMP_WAIT_POLICY=ACTIVE to see the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

QUICK_MODULES = "json,textwrap,heapq,functools,itertools,collections,pathlib,argparse"
SUBSET_MODULES = "json,textwrap,heapq,functools,itertools"


def _ingest_child(spec: str, index: str, index_type: str) -> None:
    """Runs in a child process: one ingest, then its own peak RSS (the number we report)."""
    from retrieval import IngestConfig, ingest
    from speculation.models import load_tokenizer

    t = time.perf_counter()
    report = ingest([spec], index, load_tokenizer(), IngestConfig(index_type=index_type, show_progress=False))
    out = {
        "chunks": report.chunks, "new_chunks": report.new_chunks, "files": report.files,
        "seconds": time.perf_counter() - t, "embedding_seconds": report.embedding_seconds,
        "skipped": len(report.skipped_files),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out))


def run_ingest(spec: str, index: Path, index_type: str = "flat") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_ingest-child", spec, str(index), index_type]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"ingest child failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[7:])


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    a = np.array(samples)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": len(samples)}


def make_queries(retriever: Any, n: int, seed: int = 0, tokens: int = 32) -> list[str]:
    """Queries shaped like In-Context RALM's: the text of a window of 32 generator tokens."""
    from speculation.models import load_tokenizer

    tok = load_tokenizer()
    rng = np.random.default_rng(seed)
    ids = [retriever.ids[i] for i in rng.choice(len(retriever.ids), size=n, replace=True)]
    out = []
    for hit in retriever.get_chunks(ids):
        start = int(rng.integers(0, max(1, len(hit.token_ids) - tokens)))
        out.append(tok.decode(hit.token_ids[start : start + tokens]).strip() or hit.title)
    return out


def _reader_child(spec: str) -> None:
    """Runs in a child process: read + chunk the corpus without embedding, to separate the
    reader's memory (python-docs imports every stdlib module) from the embedding's."""
    from retrieval.chunking import chunk_document
    from retrieval.corpus import CorpusReader
    from speculation.models import load_tokenizer

    tok = load_tokenizer()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = sum(1 for doc in CorpusReader([spec]) for _ in chunk_document(doc, tok))
    print("RESULT " + json.dumps({"chunks": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "rss_before_reading_mb": base}))


def run_reader(spec: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--_reader-child", spec], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"reader child failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])


def bench_search(index: Path, batches: list[int], repeats: int, redis_url: str | None) -> dict[str, Any]:
    from retrieval import Retriever, RetrievalConfig

    results: dict[str, Any] = {}
    for kind in ("flat", "hnsw", "bm25"):
        idx = index if kind != "hnsw" else Path(str(index) + "-hnsw")
        retr = "bm25" if kind == "bm25" else "dense"
        with Retriever.open(idx, config=RetrievalConfig(cache_ttl_s=0)) as r:
            queries = make_queries(r, 16 * (repeats + 4), seed=1)
            per: dict[str, Any] = {}
            for b in batches:
                it = iter(range(10**9))

                def call() -> None:
                    i = next(it) % (len(queries) // b)
                    r.retrieve(queries[i * b : (i + 1) * b], k=4, retriever=retr)

                per[str(b)] = timed(call, repeats)
            single = per["1"]["p50_ms"]
            for b in batches:
                per[str(b)]["vs_singles"] = per[str(b)]["p50_ms"] / (b * single)
            results[kind] = per
    return results


def bench_ann_synthetic(n: int, dim: int, batches: list[int], repeats: int) -> dict[str, Any]:
    from retrieval import RetrievalConfig, dense

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, dim))
    base = centres[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, dim))
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    queries = base[rng.choice(n, 2000, replace=False)] + 0.05 * rng.normal(size=(2000, dim)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    cfg = RetrievalConfig()
    out: dict[str, Any] = {"n": n, "dim": dim}
    truth = None
    for kind in ("flat", "hnsw", "ivf"):
        t = time.perf_counter()
        index = dense.build_index(base, kind)
        build_s = time.perf_counter() - t
        dense.set_search_params(index, nprobe=cfg.ivf_nprobe, ef_search=cfg.hnsw_ef_search)
        _, rows = dense.search(index, queries[:500], 10)
        if truth is None:
            truth = rows
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, rows)]))
        per: dict[str, Any] = {"build_s": build_s, "recall@10": recall}
        for b in batches:
            it = iter(range(10**9))

            def call() -> None:
                i = next(it) % (len(queries) // b)
                dense.search(index, queries[i * b : (i + 1) * b], 4)

            per[str(b)] = timed(call, repeats)
        single = per["1"]["p50_ms"]
        for b in batches:
            per[str(b)]["vs_singles"] = per[str(b)]["p50_ms"] / (b * single)
        out[kind] = per
    return out


def bench_redis(index: Path, redis_url: str, repeats: int) -> dict[str, Any]:
    from retrieval import Retriever

    with Retriever.open(index, redis_url=redis_url) as r:
        rng = np.random.default_rng(2)
        r.get_chunks(r.ids[:1])  # fills Redis from the index directory if needed
        out = {}
        for n in (1, 20):
            def call() -> None:
                ids = [r.ids[i] for i in rng.choice(len(r.ids), size=n, replace=False)]
                r.store.get(ids)

            out[f"mget_{n}"] = timed(call, repeats * 5)
        return out


def to_markdown(res: dict[str, Any]) -> str:
    ing = res["ingest"]
    lines = [
        f"Machine: {res['machine']}; load average {res['load_average_1m_at_end']:.1f} at the end "
        f"(other jobs share the cores); OMP_WAIT_POLICY={res['omp_wait_policy']}.",
        f"Corpus: python-docs ({ing['full']['files']} modules, "
        f"{ing['full']['chunks']} chunks of ≤256 generator tokens), embedding all-MiniLM-L6-v2 on CPU.",
        "",
        "",
        "| ingest | chunks | seconds (incl. model load) | chunks/s | embedding chunks/s | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    corpus_name = "python-docs (quick: 8 modules)" if "--quick" in res["command"] else "python-docs (all)"
    for name, r in ((corpus_name, ing["full"]), (f"subset ({SUBSET_MODULES})", ing["subset"]),
                    ("re-ingest, unchanged", ing["reingest"])):
        rate = r["chunks"] / r["seconds"] if r["seconds"] else 0
        emb = f"{r['new_chunks'] / r['embedding_seconds']:.1f}" if r["embedding_seconds"] else "–"
        lines.append(f"| {name} | {r['chunks']} ({r['new_chunks']} new) | {r['seconds']:.1f} | "
                     f"{rate:.1f} | {emb} | {r['peak_rss_mb']:.0f} MB |")
    ro = ing["reader_only"]
    lines += ["", f"Reading + chunking alone (no model): peak RSS {ro['full']['peak_rss_mb']:.0f} MB for {corpus_name} "
              f"({ro['full']['chunks']} chunks) vs {ro['subset']['peak_rss_mb']:.0f} MB for the subset "
              f"({ro['subset']['chunks']} chunks). Ingest peak minus reader peak (model, embedding batches, "
              f"index build): {ing['full']['peak_rss_mb'] - ro['full']['peak_rss_mb']:.0f} MB vs "
              f"{ing['subset']['peak_rss_mb'] - ro['subset']['peak_rss_mb']:.0f} MB."]
    lines += ["", "`retrieve(queries, k=4)` end to end (query embedding + search + document-store read), "
              "python-docs index, queries = 32 generator tokens of a random chunk, ms per call:", "",
              "| index | batch 1 p50 / p99 | batch 4 p50 / p99 | batch 16 p50 / p99 | batch 4 vs 4 singles | batch 16 vs 16 singles |",
              "|---|---|---|---|---:|---:|"]
    for kind, per in res["search"].items():
        cells = [f"{per[b]['p50_ms']:.2f} / {per[b]['p99_ms']:.2f}" for b in ("1", "4", "16")]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {per['4']['vs_singles']:.2f} | {per['16']['vs_singles']:.2f} |")
    syn = res["ann_synthetic"]
    lines += ["", f"FAISS search alone, synthetic clustered index ({syn['n']:,} × {syn['dim']}), ms per call:", "",
              "| index | build s | recall@10 vs flat | batch 1 p50 / p99 | batch 4 p50 / p99 | batch 16 p50 / p99 | batch 16 vs 16 singles |",
              "|---|---:|---:|---|---|---|---:|"]
    for kind in ("flat", "hnsw", "ivf"):
        per = syn[kind]
        cells = [f"{per[b]['p50_ms']:.3f} / {per[b]['p99_ms']:.3f}" for b in ("1", "4", "16")]
        lines.append(f"| {kind} | {per['build_s']:.1f} | {per['recall@10']:.3f} | " + " | ".join(cells)
                     + f" | {per['16']['vs_singles']:.2f} |")
    if res.get("redis"):
        r = res["redis"]
        lines += ["", "| Redis document store (MGET + decode) | p50 ms | p99 ms |", "|---|---:|---:|",
                  f"| 1 chunk | {r['mget_1']['p50_ms']:.3f} | {r['mget_1']['p99_ms']:.3f} |",
                  f"| 20 chunks | {r['mget_20']['p50_ms']:.3f} | {r['mget_20']['p99_ms']:.3f} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few modules and a 20k synthetic index")
    ap.add_argument("--redis-url", default=os.environ.get("SPECRAG_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--synthetic-n", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--_ingest-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_reader-child", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--render", metavar="JSON", help="only rewrite the Markdown from a results JSON")
    args = ap.parse_args()
    if args.render:
        res = json.loads(Path(args.render).read_text())
        (Path(args.out) / "retrieval.md").write_text(to_markdown(res))
        print(to_markdown(res))
        return
    if args._ingest_child:
        _ingest_child(*args._ingest_child)
        return
    if args._reader_child:
        _reader_child(*args._reader_child)
        return

    spec = f"python-docs:{QUICK_MODULES}" if args.quick else "python-docs"
    work = Path(tempfile.mkdtemp(prefix="specrag-bench-"))
    try:
        index = work / "pydocs"
        print(f"ingest {spec} ...", file=sys.stderr)
        full = run_ingest(spec, index)
        reingest = run_ingest(spec, index)
        subset = run_ingest(f"python-docs:{SUBSET_MODULES}", work / "subset")
        shutil.copytree(index, Path(str(index) + "-hnsw"))  # same chunks: only the index is rebuilt
        hnsw = run_ingest(spec, Path(str(index) + "-hnsw"), "hnsw")
        readers = {"full": run_reader(spec), "subset": run_reader(f"python-docs:{SUBSET_MODULES}")}
        print("search ...", file=sys.stderr)
        batches = [1, 4, 16]
        search = bench_search(index, batches, args.repeats, args.redis_url)
        n = args.synthetic_n or (20_000 if args.quick else 50_000)
        print(f"synthetic ANN ({n}) ...", file=sys.stderr)
        ann = bench_ann_synthetic(n, 384, batches, args.repeats * 2)
        redis_res = None
        try:
            print("redis ...", file=sys.stderr)
            redis_res = bench_redis(index, args.redis_url, args.repeats)
        except Exception as exc:  # noqa: BLE001 -- the rest of the numbers are still worth writing
            print(f"redis benchmark skipped: {exc}", file=sys.stderr)
        import faiss

        res = {
            "load_average_1m_at_end": os.getloadavg()[0],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"python {platform.python_version()}, faiss {faiss.__version__} "
                       f"({'GPU' if faiss.get_num_gpus() else 'CPU'})",
            "command": "python benchmarks/bench_retrieval.py" + (" --quick" if args.quick else ""),
            "ingest": {"full": full, "reingest": reingest, "subset": subset, "hnsw_build": hnsw,
                       "reader_only": readers},
            "search": search,
            "ann_synthetic": ann,
            "redis": redis_res,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "retrieval.json").write_text(json.dumps(res, indent=2) + "\n")
        md = to_markdown(res)
        (out / "retrieval.md").write_text(md)
        print(md)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
