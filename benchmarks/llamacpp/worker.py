"""llama.cpp anchor for the engine benchmark: runs in benchmarks/llamacpp/.venv (setup.sh), never
imported by the project. Reads one JSON request per line on stdin and answers one JSON line:

    {"prompt": [token ids], "max_tokens": 128, "eos": [ids]}
    -> {"tokens": [...], "seconds": s, "prefill_seconds": s, "decode_ms_per_token": ms, "forwards": n}

Greedy (top-k 1), the prompt fed as the same token ids the other methods get, a fresh KV cache
per request (no prefix reuse across questions, as for every other method).

    benchmarks/llamacpp/.venv/bin/python benchmarks/llamacpp/worker.py MODEL.gguf --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=2048)
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=args.ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    print(json.dumps({"ready": True, "version": llama_cpp.__version__,
                      "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        eos = set(req.get("eos") or [llm.token_eos()])
        out: list[int] = []
        llm.reset()          # else generate() reuses the KV of a common prefix with the last request
        t0 = time.perf_counter()
        first = None
        for tok in llm.generate(req["prompt"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                reset=True):
            if first is None:
                first = time.perf_counter()
            out.append(int(tok))      # EOS included, as HF generate and specrag count it
            if tok in eos or len(out) >= req["max_tokens"]:
                break
        end = time.perf_counter()
        first = first or end
        decoded = max(1, len(out) - 1)
        print(json.dumps({"tokens": out, "seconds": end - t0, "prefill_seconds": first - t0,
                          "decode_ms_per_token": 1000 * (end - first) / decoded,
                          "forwards": 1 + max(0, len(out) - 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
