"""The `specrag generate` contract, through the real console script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SPECRAG = [str(Path(sys.executable).with_name("specrag"))]   # the installed console script
ROOT = Path(__file__).resolve().parents[2]


def run(*args, timeout=300):
    return subprocess.run([*SPECRAG, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_json_output_contract():
    ref = ROOT / "scripts" / "demo_reference.txt"
    out = run("generate", "--prompt", "What does maxsize=None mean for lru_cache?", "--reference", str(ref),
              "--max-tokens", "24", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) >= {"text", "token_ids", "stats", "dtype", "device", "linear_kernel", "attention_kernel", "forward"}
    assert data["device"] == "cpu" and data["dtype"] in ("float32", "bfloat16")
    # the lean loop runs fp32 and bf16 on both our kernels, and nothing else
    assert data["forward"] == ("lean" if data["linear_kernel"] != "torch" and data["attention_kernel"] != "torch"
                               else "transformers")
    assert set(data["stats"]) >= {"target_forwards", "draft_tokens", "accepted_tokens",
                                  "mean_accepted_per_forward", "tokens_per_second", "by_drafter"}
    assert 0 < len(data["token_ids"]) <= 24 and data["text"]
    plain = run("generate", "--prompt", "What does maxsize=None mean for lru_cache?", "--reference", str(ref),
                "--max-tokens", "24", "--json", "--no-speculation")
    assert json.loads(plain.stdout)["token_ids"] == data["token_ids"]
    assert json.loads(plain.stdout)["stats"]["draft_tokens"] == 0


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "hi", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--prompt", "hi", "--reference", "/no/such/file.txt"], "not found"),
    (["--prompt-file", "/no/such/prompt.txt"], "not found"),
    (["--prompt", "hi", "--model", "no-such-model"], "unknown model"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    out = run("generate", *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
