"""Iterative retrieval (In-Context RALM) benchmark: RaLMSpec speculative retrieval vs the paper's baseline.

    # 1. (optional) export local documentation as JSONL: docstrings of every module in the venv's
    #    site-packages (parsed with ast, nothing imported), /usr/share/doc, English man pages
    .venv/bin/python benchmarks/bench_ralmspec.py export-corpus /tmp/local-docs.jsonl [--max-chars N]
    # 2. build the indexes (flat, and hnsw over the same chunks -- embeddings are reused) and run
    .venv/bin/python benchmarks/bench_ralmspec.py run --index-dir /tmp/ralmspec/idx \\
        --corpus python-docs [--corpus /tmp/local-docs.jsonl] --questions 30 --max-tokens 128

Side by side in one process, interleaved per question (the mode order rotates from question to
question, so drift in machine load hits every mode alike), for flat, hnsw and bm25 (bm25 = the
``bm25`` retriever on the flat index):

- ``baseline``: the paper's baseline -- real retrieval every stride, a fresh prefill of
  [chunk; question; answer so far] every stride, plain greedy decoding. The reference output.
- ``kv_reuse``: the same, but every chunk keeps its sequence (KV cache): an unchanged chunk
  continues it, a chunk used earlier resumes it (fed only the answer tokens it missed), only a new
  chunk is prefilled.
- ``spec_sync``: speculative retrieval (local cache + prefetch 20 + OS3 scheduler), verification
  in the foreground, no token speculation.
- ``spec_async``: the same with asynchronous verification (the saving is measured, not computed).
- ``all``: speculative retrieval (async) + KV reuse + token speculation inside each stride.

Every output is compared token by token with ``baseline`` (the first differing token is
reported). Results are written to benchmarks/results/ralmspec.json and ralmspec.md after every
question, so an interrupted run still leaves its numbers.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch/faiss load OpenMP: spinning waits make torch and FAISS stall each other on a small,
# shared CPU machine (see bench_retrieval.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RESULTS = ROOT / "benchmarks" / "results"

from questions import RALMSPEC_QUESTIONS as QUESTIONS  # noqa: E402

MODES = ["baseline", "kv_reuse", "spec_sync", "spec_async", "all"]
MODE_LABELS = {
    "baseline": "(1) baseline: real retrieval + re-prefill every stride",
    "kv_reuse": "(2) + KV reuse",
    "spec_sync": "(3s) speculative retrieval + prefetch + OS3, sync verification",
    "spec_async": "(3) speculative retrieval + prefetch + OS3 + async verification",
    "all": "(4) (3) + token speculation",
}
RETRIEVERS = {"flat": ("flat", "dense"), "hnsw": ("hnsw", "dense"), "bm25": ("flat", "bm25")}


def mode_options(name: str) -> Any:
    """(IterativeOptions, whether the request verifies asynchronously) of a mode."""
    from pipeline.iterative import IterativeOptions

    return {
        "baseline": (IterativeOptions(speculative_retrieval=False, kv_reuse=False, token_speculation=False), True),
        "kv_reuse": (IterativeOptions(speculative_retrieval=False, kv_reuse=True, token_speculation=False), True),
        "spec_sync": (IterativeOptions(token_speculation=False), False),
        "spec_async": (IterativeOptions(token_speculation=False), True),
        "all": (IterativeOptions(), True),
    }[name]


# ---- local documentation as JSONL -------------------------------------------------------------
def _py_docs(site: Path) -> Iterator[dict[str, str]]:
    """One record per module of ``site``: module docstring + every class/function docstring with
    its signature, read from the source with ast (importing thousands of modules is slow and has
    side effects)."""
    for path in sorted(site.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError, OSError, RecursionError):
            continue
        rel = path.relative_to(site).with_suffix("")
        mod = ".".join(p for p in rel.parts if p != "__init__")
        parts = [f"Module {mod}", ast.get_docstring(tree) or ""]

        def visit(body: list[ast.stmt], prefix: str) -> None:
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if node.name.startswith("_") and node.name != "__init__":
                        continue
                    doc = ast.get_docstring(node)
                    qual = f"{prefix}.{node.name}"
                    if isinstance(node, ast.ClassDef):
                        if doc:
                            parts.append(f"\nclass {qual}\n{doc}")
                        visit(node.body, qual)
                    elif doc:
                        try:
                            sig = ast.unparse(node.args)
                        except Exception:  # noqa: BLE001
                            sig = "..."
                        parts.append(f"\n{qual}({sig})\n{doc}")

        visit(tree.body, mod)
        text = "\n".join(p for p in parts if p).strip()
        if len(text.split()) > 20:
            yield {"id": f"site-packages:{mod}", "title": mod, "url": f"site-packages/{rel}.py", "text": text}


_ROFF = re.compile(r"\\f[BIRP]|\\\(\w\w|\\[-&e|^ ]|\\\*\(\w\w|\\\*\w")


def _man_text(raw: str) -> str:
    lines = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            words = line.split(None, 1)
            if words[0] in (".SH", ".SS", ".TH", ".B", ".I", ".BR", ".IR", ".BI", ".RB", ".IP", ".TP", ".Nm",
                            ".Nd", ".Sh", ".Fl", ".Ar", ".It"):
                line = words[1] if len(words) > 1 else ""
            else:
                continue
        lines.append(_ROFF.sub("", line).replace('"', ""))
    return "\n".join(lines).strip()


def _read_maybe_gz(path: Path) -> str | None:
    try:
        data = gzip.open(path).read(2_000_000) if path.suffix == ".gz" else path.read_bytes()[:2_000_000]
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def _share_docs() -> Iterator[dict[str, str]]:
    """/usr/share/doc text files (license boilerplate skipped) and English man pages."""
    doc = Path("/usr/share/doc")
    if doc.is_dir():
        for path in sorted(doc.rglob("*")):
            name = path.name.lower()
            if not path.is_file() or name.startswith("copyright") or path.suffix.lower() in (
                    ".js", ".css", ".png", ".svg", ".jpg", ".gif", ".pdf", ".py", ".c", ".h"):
                continue
            text = _read_maybe_gz(path)
            if text and len(text.split()) > 20:
                rel = str(path.relative_to(doc))
                yield {"id": f"doc:{rel}", "title": rel, "url": str(path), "text": text}
    man = Path("/usr/share/man")
    for section in sorted(man.glob("man[1-8]")):
        for path in sorted(section.iterdir()):
            raw = _read_maybe_gz(path) if path.is_file() else None
            text = _man_text(raw) if raw else ""
            if len(text.split()) > 20:
                yield {"id": f"man:{path.name}", "title": f"man {path.name.removesuffix('.gz')}",
                       "url": str(path), "text": text}


def export_corpus(out: Path, max_chars: int | None, sources: list[str] | None = None,
                  seed: int | None = None) -> dict[str, Any]:
    """Write local documentation as JSONL.

    ``sources`` picks ``site-packages`` and/or ``share``; with ``seed`` the records are shuffled
    (deterministically) before ``max_chars`` cuts them, so a capped corpus samples every package
    instead of only the alphabetically first ones. Chunk estimate: ~3.5 characters per generator
    token, so ~900 characters per 256-token chunk (224 new tokens with the 32-token overlap) and
    ~390 per 128-token chunk with a 16-token overlap."""
    import random
    import site as site_mod

    sources = sources or ["site-packages", "share"]
    sites = [Path(p) for p in site_mod.getsitepackages() if Path(p).is_dir()]
    t = time.perf_counter()
    counts: dict[str, int] = {}
    chars = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    readers = {"site-packages": lambda: (r for s in sites for r in _py_docs(s)), "share": _share_docs}
    records: Iterator[tuple[str, dict[str, str]]] = ((k, r) for k in sources for r in readers[k]())
    if seed is not None:
        pool = list(records)
        random.Random(seed).shuffle(pool)
        records = iter(pool)
    with out.open("w", encoding="utf-8") as f:
        for kind, rec in records:
            if max_chars is not None and chars >= max_chars:
                break
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts[kind] = counts.get(kind, 0) + 1
            chars += len(rec["text"])
    info = {"path": str(out), "records": counts, "chars": chars,
            "estimated_chunks": {"256/32": chars // 900, "128/16": chars // 390},
            "seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps(info))
    return info


# ---- indexes ------------------------------------------------------------------------------------
def build_indexes(inputs: list[str], index_dir: Path, tokenizer: Any, chunk_tokens: int = 128,
                  chunk_overlap: int = 16) -> dict[str, Any]:
    """``index_dir/flat`` (ingest; incremental, so an existing one is reused) and ``index_dir/hnsw``
    (a copy of the flat one re-indexed: same chunks, same embeddings, only the FAISS index built).

    128-token chunks by default: In-Context RALM and RaLMSpec retrieve 100-word Wikipedia
    passages (DPR's split), which is about 128 tokens."""
    from retrieval import IngestConfig, ingest

    flat, hnsw = index_dir / "flat", index_dir / "hnsw"
    t = time.perf_counter()
    sizes = dict(chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap)
    rep = ingest(inputs, flat, tokenizer, IngestConfig(index_type="flat", **sizes))
    out = {"flat": {"chunks": rep.index_chunks, "new_chunks": rep.new_chunks, "seconds": round(time.perf_counter() - t, 1)}}
    if hnsw.exists():
        shutil.rmtree(hnsw)
    shutil.copytree(flat, hnsw)
    t = time.perf_counter()
    rep = ingest(inputs, hnsw, tokenizer, IngestConfig(index_type="hnsw", show_progress=False, **sizes))
    out["hnsw"] = {"chunks": rep.index_chunks, "new_chunks": rep.new_chunks, "seconds": round(time.perf_counter() - t, 1)}
    return out


# ---- the benchmark ------------------------------------------------------------------------------
def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per (retriever, mode); speedups are paired (same question, same retriever)."""
    out: dict[str, Any] = {}
    for ret in RETRIEVERS:
        base = {r["q"]: r for r in runs if r["retriever"] == ret and r["mode"] == "baseline"}
        for mode in MODES:
            rs = [r for r in runs if r["retriever"] == ret and r["mode"] == mode and r["q"] in base]
            if not rs:
                continue
            total = [r["seconds"]["total"] for r in rs]
            ratios = [base[r["q"]]["seconds"]["total"] / r["seconds"]["total"] for r in rs]
            btotal = [base[r["q"]]["seconds"]["total"] for r in rs]
            out.setdefault(ret, {})[mode] = {
                "n": len(rs),
                "mean_s": round(_mean(total), 3),
                "median_s": round(statistics.median(total), 3),
                "split_mean_s": {k: round(_mean([r["seconds"][k] for r in rs]), 3)
                                 for k in ("retrieval", "prefill", "decode", "total")},
                "prefills_mean": round(_mean([r["prefills"] for r in rs]), 2),
                "resumed_mean": (round(_mean([r["chunk_sequences"]["resumed"] for r in rs]), 2)
                                 if all(r.get("chunk_sequences") for r in rs) else None),
                "target_forwards_mean": round(_mean([r["target_forwards"] for r in rs]), 2),
                "tokens_mean": round(_mean([r["tokens"] for r in rs]), 2),
                "retrievals_mean": {k: round(_mean([r["retrievals"][k] for r in rs]), 2)
                                    for k in ("real", "speculated", "verified", "mismatched", "batches")},
                "speedup_of_means": round(_mean(btotal) / _mean(total), 3),
                "speedup_median_paired": round(statistics.median(ratios), 3),
                "identical": sum(r["identical"] for r in rs),
                "accepted_per_forward_mean": round(_mean([r["mean_accepted_per_forward"] or 1.0 for r in rs]), 3),
            }
    return out


def write_results(meta: dict[str, Any], runs: list[dict[str, Any]], final: bool) -> dict[str, Any]:
    summary = summarize(runs)
    per_retriever = [len({r["q"] for r in runs if r["retriever"] == ret}) for ret in meta["config"]["retrievers"]]
    done = min(per_retriever) if per_retriever else 0
    meta["questions_per_retriever"] = dict(zip(meta["config"]["retrievers"], per_retriever))
    meta = dict(meta, finished=final, questions_done=done, load_average_now=list(os.getloadavg()))
    dev = list(meta["spec_deviations"])
    if done < 30:
        dev.append(f"{done} questions (fewest of any retriever), not >= 30")
    if meta["config"]["max_tokens"] != 128:
        dev.append(f"max {meta['config']['max_tokens']} new tokens, not 128")
    if meta["corpus"]["chunks"] < 100_000:
        dev.append(f"{meta['corpus']['chunks']} chunks, not >= 100k")
    meta["spec_deviations"] = dev
    diffs = [{"question": r["question"], "retriever": r["retriever"], "mode": r["mode"],
              "first_differing_token": r["first_diff"]} for r in runs if not r["identical"]]
    data = {"meta": meta, "summary": summary, "differences": diffs, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "ralmspec.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS / "ralmspec.json")
    (RESULTS / "ralmspec.md").write_text(markdown(meta, summary, diffs))
    return data


def markdown(meta: dict[str, Any], summary: dict[str, Any], diffs: list[dict[str, Any]]) -> str:
    c = meta["config"]
    la = meta.get("load_average_samples") or []
    lines = [
        f"Machine: {meta['machine']}; torch threads {meta['torch_threads']}; OMP_WAIT_POLICY={meta['omp_wait_policy']}; "
        f"load average (1 min) during the run: min {min(la):.1f} / median {statistics.median(la):.1f} / max {max(la):.1f} "
        f"(other jobs share the cores)." if la else f"Machine: {meta['machine']}.",
        f"Corpus: {meta['corpus']['description']} -- {meta['corpus']['chunks']} chunks of <={c.get('chunk_tokens', 256)} "
        "generator tokens "
        f"(all-MiniLM-L6-v2 embeddings); hnsw = the same chunks and vectors in FAISS HNSW (M=32); bm25 = the bm25 "
        "retriever on the flat index.",
        f"Model {c['model']}, CPU, batch 1, greedy, stride {c['stride']}, query {c['query_tokens']} tokens, top-1 chunk, "
        f"max {c['max_tokens']} new tokens; questions per retriever: "
        + ", ".join(f"{k} {v}" for k, v in meta.get("questions_per_retriever", {}).items()) + "; every mode on every question, "
        f"mode order rotated per question; order {c.get('order', 'question')}-major." + ("" if meta["finished"] else " **(run not finished: partial results)**")
        + (f" {meta['stopped_early']}." if meta.get("stopped_early") else "")
        + (f" Earlier run: {meta['earlier_stopped_early']}." if meta.get("earlier_stopped_early") else "")
        + (" Questions measured by earlier runs of the same script on the same corpus (see the command), "
           "merged in: " + ", ".join(f"{k} {v}" for k, v in meta["appended_to"]["questions_from_earlier_runs"].items())
           + "." if meta.get("appended_to", {}).get("questions_from_earlier_runs") else ""),
        "Deviations from the issue's benchmark spec: " + "; ".join(meta["spec_deviations"]) + "."
        if meta["spec_deviations"] else "Config as the issue specifies.",
        "",
        "| retriever | mode | mean s/request | median s | retrieval / prefill / decode s | prefills (chunks resumed) | "
        "real retrievals (batches) | speculated / mismatched | tokens / forward | speedup (means) | "
        "speedup (median paired) | identical |",
        "|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for ret, modes in summary.items():
        for mode, s in modes.items():
            sp, rt = s["split_mean_s"], s["retrievals_mean"]
            lines.append(
                f"| {ret} | {MODE_LABELS[mode]} | {s['mean_s']:.2f} | {s['median_s']:.2f} | "
                f"{sp['retrieval']:.2f} / {sp['prefill']:.2f} / {sp['decode']:.2f} | {s['prefills_mean']:.1f}"
                + (f" ({s['resumed_mean']:.1f})" if s.get("resumed_mean") else "") + " | "
                f"{rt['real']:.1f} ({rt['batches']:.1f}) | {rt['speculated']:.1f} / {rt['mismatched']:.1f} | "
                f"{s.get('accepted_per_forward_mean', 1.0):.2f} | "
                f"{s['speedup_of_means']:.2f}x | {s['speedup_median_paired']:.2f}x | {s['identical']}/{s['n']} |")
    lines += [
        "",
        "Columns are means per request. The split is the pipeline's own `stats[\"seconds\"]`: retrieval = real "
        "retrievals + local-cache scoring (with async verification the background retrieval overlaps decoding, "
        "so the parts can add up to more than the total); prefill / decode = target-model forward time.",
        "Prefills = full prompt prefills; (chunks resumed) = strides that went back to an earlier chunk's sequence "
        "and fed it only the answer tokens it had not seen (a decode-sized forward, counted as decode).",
        "Speedup (means) = mean baseline latency / mean latency; speedup (median paired) = median over questions "
        "of baseline / mode on the same question (robust to load spikes on the shared machine).",
    ]
    if diffs:
        lines += ["", "Outputs that differ from the baseline:", ""]
        lines += [f"- {d['retriever']} / {d['mode']}: \"{d['question']}\" first differing token "
                  f"{d['first_differing_token']}" for d in diffs]
    else:
        lines += ["", "Every output is token-identical to the baseline's."]
    return "\n".join(lines) + "\n"


def run_benchmark(args: argparse.Namespace) -> None:
    import torch

    from pipeline.api import AskRequest, RetrievalOptions
    from pipeline.config import PipelineConfig
    from pipeline.rag import GenerationStage, RetrievalStage
    from speculation.models import ModelConfig, load_models

    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_models(ModelConfig(model=args.model, device="cpu"))
    index_dir = Path(args.index_dir)
    corpus_build = None
    if args.corpus:
        corpus_build = build_indexes(args.corpus, index_dir, models.tokenizer, args.chunk_tokens, args.chunk_overlap)
    retrievers = [r for r in args.retrievers.split(",") if r]
    kinds = ["flat"] + sorted({RETRIEVERS[r][0] for r in retrievers} - {"flat"})   # open only the indexes used
    stages = {kind: RetrievalStage(PipelineConfig(index_dir=str(index_dir / kind))) for kind in kinds}
    gen = GenerationStage(PipelineConfig(index_dir=str(index_dir / "flat"), model=args.model, device="cpu"),
                          retrieval=stages["flat"], models=models)
    modes = [m for m in args.modes.split(",") if m]
    assert modes[0] == "baseline", "baseline must be the first mode (the reference output)"
    questions = QUESTIONS[: args.questions]
    chunks = len(stages["flat"].retriever)
    meta = {
        "command": "benchmarks/bench_ralmspec.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "config": {"model": args.model, "device": "cpu", "batch": 1, "stride": 4, "query_tokens": 32, "k": 1,
                   "max_tokens": args.max_tokens, "questions": len(questions), "retrievers": retrievers,
                   "modes": modes, "prefetch": 20, "speculation_stride": "auto (OS3)", "order": args.order,
                   "chunk_tokens": args.chunk_tokens, "chunk_overlap": args.chunk_overlap},
        "spec_deviations": args.deviation or [],
        "corpus": {"description": args.corpus_description, "chunks": chunks,
                   "index_dirs": {k: str(index_dir / k) for k in stages}, "build": corpus_build},
        "load_average_samples": [],
    }

    def one(question: str, retriever: str, mode: str, max_tokens: int = args.max_tokens) -> Any:
        kind, metric = RETRIEVERS[retriever]
        options, asynchronous = mode_options(mode)
        req = AskRequest(question, max_tokens=max_tokens,
                         retrieval=RetrievalOptions(k=1, retriever=metric, iterative=True, stride=4, query_tokens=32,
                                                    async_verification=asynchronous))
        return gen.iterative(req, options, retrieval=stages[kind]).run()

    # warm-up (model, embedder, BM25 load, first-call allocations), not recorded
    for retriever in retrievers:
        for mode in ("baseline", "all"):
            one("How do I warm up?", retriever, mode, max_tokens=12)

    runs: list[dict[str, Any]] = []
    done_pairs: set[tuple[str, int]] = set()
    if args.append and (RESULTS / "ralmspec.json").exists():
        # keep an earlier run's retrievers (e.g. flat run alone first), replace the ones run now --
        # except, with --resume, the (retriever, question) pairs it already measured in every mode
        old = json.loads((RESULTS / "ralmspec.json").read_text())
        if args.resume:
            have: dict[tuple[str, int], set[str]] = {}
            for r in old["runs"]:
                have.setdefault((r["retriever"], r["q"]), set()).add(r["mode"])
            done_pairs = {k for k, v in have.items() if k[0] in retrievers and set(modes) <= v}
        runs = [r for r in old["runs"] if r["retriever"] not in retrievers or (r["retriever"], r["q"]) in done_pairs]
        kept = sorted({r["retriever"] for r in runs})
        meta["command"] = old["meta"]["command"] + " && " + meta["command"]
        meta["load_average_samples"] = old["meta"].get("load_average_samples", []) + meta["load_average_samples"]
        meta["config"]["retrievers"] = [r for r in RETRIEVERS if r in kept or r in retrievers]
        meta["appended_to"] = dict(old["meta"].get("appended_to") or {}, elapsed_s=old["meta"].get("elapsed_s"))
        earlier = {r["retriever"]: len({x["q"] for x in runs if x["retriever"] == r["retriever"]}) for r in runs}
        meta["appended_to"]["questions_from_earlier_runs"] = earlier
        if old["meta"].get("stopped_early"):
            meta["earlier_stopped_early"] = old["meta"]["stopped_early"]
    t_start = time.perf_counter()
    if args.order == "question":
        # every retriever on question 1, then question 2, ...: drift in machine load hits all alike
        plan = [(qi, [r for r in retrievers]) for qi in range(len(questions))]
    else:
        # all questions on one retriever, then the next: with a time budget each retriever gets an
        # equal share, so a run cut short still has every retriever on its first questions
        plan = [(qi, [r]) for r in retrievers for qi in range(len(questions))]
    share = args.time_budget_s / (1 if args.order == "question" else len(retrievers))
    t_group: dict[str, float] = {}
    n_group: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for qi, group in plan:
        question = questions[qi]
        group = [r for r in group if (r, qi) not in done_pairs]
        if not group:
            continue
        key = "all" if args.order == "question" else group[0]
        t_group.setdefault(key, time.perf_counter())
        elapsed, n = time.perf_counter() - t_group[key], n_group.get(key, 0)
        if args.time_budget_s and n and elapsed + elapsed / n > share:
            skipped[key] = skipped.get(key, 0) + 1
            continue
        n_group[key] = n + 1
        meta["load_average_samples"].append(round(os.getloadavg()[0], 2))
        for retriever in group:
            # baseline first (the reference), the others rotated so each takes every slot in turn
            rest = modes[1:]
            shift = qi % len(rest) if rest else 0
            order = ["baseline"] + rest[shift:] + rest[:shift]
            ref: list[int] | None = None
            for mode in order:
                res = one(question, retriever, mode)
                if mode == "baseline":
                    ref = res.token_ids
                diff = first_difference(ref, res.token_ids)
                st = res.stats
                runs.append({
                    "q": qi, "question": question, "retriever": retriever, "mode": mode,
                    "identical": diff is None, "first_diff": diff, "tokens": len(res.token_ids),
                    "seconds": st["seconds"], "prefills": st["prefills"], "target_forwards": st["target_forwards"],
                    "retrievals": st["retrievals"], "speculation_strides": st.get("speculation_strides"),
                    "chunk_sequences": st.get("chunk_sequences"),
                    "mean_accepted_per_forward": st.get("mean_accepted_per_forward"),
                    "draft_tokens": st.get("draft_tokens"), "accepted_tokens": st.get("accepted_tokens"),
                })
                if diff is not None:
                    print(f"DIFFERENT: q{qi} {retriever}/{mode} first differing token {diff}", flush=True)
            line = ", ".join(f"{r['mode']} {r['seconds']['total']:.2f}s" for r in runs if r["q"] == qi
                             and r["retriever"] == retriever)
            print(f"q{qi} {retriever}: {line}", flush=True)
        if skipped:
            meta["stopped_early"] = "time budget of {}s: {}".format(
                args.time_budget_s, ", ".join(f"{k} skipped its last {v} questions" for k, v in skipped.items()))
        meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_results(meta, runs, final=False)
    if skipped:
        meta["stopped_early"] = "time budget of {}s: {}".format(
            args.time_budget_s, ", ".join(f"{k} skipped its last {v} questions" for k, v in skipped.items()))
        print(meta["stopped_early"], flush=True)
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    data = write_results(meta, runs, final=True)
    print((RESULTS / "ralmspec.md").read_text())
    if data["differences"]:
        raise SystemExit(f"{len(data['differences'])} outputs differ from the baseline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export-corpus", help="local documentation as JSONL")
    ex.add_argument("out", type=Path)
    ex.add_argument("--max-chars", type=int, default=None,
                    help="stop after this many characters (~390 per 128-token chunk, ~900 per 256-token chunk)")
    ex.add_argument("--sources", default="site-packages,share", help="site-packages and/or share")
    ex.add_argument("--seed", type=int, default=None, help="shuffle the records with this seed before --max-chars")
    bu = sub.add_parser("build", help="build index-dir/flat and index-dir/hnsw only")
    ru = sub.add_parser("run", help="the benchmark")
    for p in (bu, ru):
        p.add_argument("--index-dir", required=True, help="holds flat/ and hnsw/ (built with --corpus)")
        p.add_argument("--corpus", action="append", default=[],
                       help="ingest these inputs first (python-docs, JSONL, folders); repeatable")
        p.add_argument("--chunk-tokens", type=int, default=128)
        p.add_argument("--chunk-overlap", type=int, default=16)
    ru.add_argument("--corpus-description", default="python-docs")
    ru.add_argument("--questions", type=int, default=30)
    ru.add_argument("--max-tokens", type=int, default=128)
    ru.add_argument("--model", default="smollm2-135m-instruct")
    ru.add_argument("--retrievers", default="flat,hnsw,bm25")
    ru.add_argument("--modes", default=",".join(MODES))
    ru.add_argument("--time-budget-s", type=float, default=0,
                    help="start no new question when it would end past this many seconds (0: no limit)")
    ru.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ru.add_argument("--append", action="store_true",
                    help="merge into the existing results: keep its runs of the retrievers not run now")
    ru.add_argument("--resume", action="store_true",
                    help="with --append: keep the (retriever, question) pairs already measured in every mode "
                         "and run only the rest")
    ru.add_argument("--order", choices=["question", "retriever"], default="question",
                    help="question-major (interleaved, default) or retriever-major (each retriever's questions in a row)")
    ru.add_argument("--deviation", action="append", help="a deviation from the issue's spec, recorded in the results")
    args = ap.parse_args()
    if args.cmd == "export-corpus":
        export_corpus(args.out, args.max_chars, [x for x in args.sources.split(",") if x], args.seed)
    elif args.cmd == "build":
        from speculation.models import load_tokenizer

        print(json.dumps(build_indexes(args.corpus, Path(args.index_dir), load_tokenizer("smollm2-135m-instruct"),
                                       args.chunk_tokens, args.chunk_overlap)))
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
