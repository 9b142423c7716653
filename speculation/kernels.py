"""Our fp32 linear-layer kernel for CPUs (``csrc/linear_f32.c``): built with the system's C
compiler on first use, cached, loaded with ctypes, and checked before it is trusted.

Why: a decode step and the verification of a few drafted tokens are products of 1-16 rows
against every weight of the model. torch's fp32 GEMM reads the weights at about half the
memory bandwidth for one row, and slows down per row from 2 to ~8 rows, so verifying drafts
cost 1.7x a decode step and speculation rarely paid. This kernel reads the weights once per
block of rows at close to the memory bandwidth (SmolLM2's 30 layers on a 2-core AMD EPYC: 16
ms at 1 row, 18 at 2, 26 at 8, against torch's 33 / 46 / 43), and it computes each row the
same way whatever shares its product, so the fp32 forward's linear layers are batch-invariant.

It is used by the pooled forward only (:class:`speculation.forward.PooledModel`); the model
stays a plain torch model for every other caller (Hugging Face ``generate``, the tests'
oracle). Without a C compiler, AVX2 or FMA, or with ``SPECRAG_LINEAR_KERNEL=torch``, the
forward keeps torch's kernels and says why in the log.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "linear_f32.c"
ENV = "SPECRAG_LINEAR_KERNEL"
NAME = "specrag-f32"


class LinearKernel:
    """The loaded kernel: ``linear(x, weight, bias)`` for fp32 CPU tensors."""

    def __init__(self, path: Path, digest: str) -> None:
        self.path = path
        self.name = f"{NAME}-{digest[:10]}"
        lib = ctypes.CDLL(str(path))
        fn = lib.specrag_linear_f32
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        fn.restype = None
        self._fn = fn

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``torch.nn.functional.linear`` for fp32 CPU tensors; each row of ``x`` computed as
        it would be alone. ``weight`` must be contiguous (a layer's own weight is)."""
        k = x.shape[-1]
        flat = x.reshape(-1, k)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        m, n = flat.shape[0], weight.shape[0]
        out = torch.empty(m, n, dtype=torch.float32)
        if m:
            self._fn(flat.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                     out.data_ptr(), m, k, n, flat.stride(0), torch.get_num_threads())
        return out.reshape(*x.shape[:-1], n)


def _openmp_dir() -> Path | None:
    """The folder of the OpenMP runtime torch itself loaded: the kernel links to that very
    library, so its threads are torch's threads (two runtimes on 2 cores would fight)."""
    lib = Path(torch.__file__).parent / "lib"
    return lib if (lib / "libgomp.so.1").exists() else None


def _why_unavailable() -> str | None:
    from .models import cpu_info

    if os.environ.get(ENV, "").lower() == "torch":
        return f"{ENV}=torch"
    flags = cpu_info()["flags"]
    if not {"avx2", "fma"} <= flags:
        return "this CPU lacks AVX2 or FMA"
    if not shutil.which(os.environ.get("CC", "cc")):
        return "no C compiler (cc) on PATH"
    if _openmp_dir() is None:
        return "torch ships no libgomp here (not a GNU/Linux torch build)"
    return None


def _build(cache: Path) -> tuple[Path, str]:
    cc = os.environ.get("CC", "cc")
    omp = _openmp_dir()
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, " ".join(flags), str(omp)]).encode()).hexdigest()
    path = cache / f"linear_f32-{digest[:16]}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / path.name
            cmd = [cc, *flags, str(SOURCE), "-o", str(out), f"-L{omp}", "-l:libgomp.so.1", f"-Wl,-rpath,{omp}"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"building the linear kernel failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
            os.replace(out, path)     # atomic: processes building at once each get a whole file
        log.info("built the fp32 linear kernel: %s", path)
    return path, digest


def _self_check(kernel: LinearKernel) -> str | None:
    """Trust the kernel only where it computes what torch computes (to fp32 rounding) and each
    row alike whatever the row count, on this machine, with this compiler."""
    gen = torch.Generator().manual_seed(0)
    for n, k in ((37, 29), (64, 576), (200, 1536)):
        w = torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen)
        x = torch.randn(130, k, generator=gen)
        got = kernel.linear(x, w, b)
        if not torch.allclose(got, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4):
            return f"its product differs from torch's for a {n}x{k} weight"
        for m in (1, 2, 3, 5, 17, 96, 97, 130):
            if not (torch.equal(kernel.linear(x[:m], w, b), got[:m])
                    and torch.equal(kernel.linear(x[130 - m:], w, b), got[130 - m:])):
                return f"a row's result changed with {m} rows in the product"
    return None


@functools.lru_cache(maxsize=1)
def linear_kernel() -> LinearKernel | None:
    """The fp32 linear kernel of this machine, or None (with the reason logged) where it cannot
    be had or fails its check. Built once per compiler and source, under the cache folder."""
    why = _why_unavailable()
    if why is None:
        from .models import cache_dir

        try:
            path, digest = _build(cache_dir() / "kernels")
            kernel = LinearKernel(path, digest)
            why = _self_check(kernel)
        except (RuntimeError, OSError) as exc:
            why = str(exc)
        if why is None:
            return kernel
    log.info("fp32 linear layers use torch's kernels: %s", why)
    return None


def kernel_for(dtype: Any, device: Any) -> LinearKernel | None:
    """The kernel that computes a pooled forward's linear layers for this dtype and device: ours
    for fp32 on a CPU where it loads, else None (torch's)."""
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        return None
    return linear_kernel()


def kernel_name(dtype: Any, device: Any) -> str:
    """What computes the pooled forward's linear layers for this dtype and device ("torch" or
    our kernel's name with its build digest): part of a cost curve's cache key."""
    kernel = kernel_for(dtype, device)
    return kernel.name if kernel is not None else "torch"
