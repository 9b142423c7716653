"""Our linear-layer kernels for CPUs (``csrc/linear_f32.c``, ``csrc/linear_bf16.c``,
``csrc/linear_amx.c``): built
with the system's C compiler on first use, cached, loaded with ctypes, and checked before they
are trusted.

Why: a decode step and the verification of a few drafted tokens are products of 1-16 rows
against every weight of the model. torch's fp32 GEMM reads the weights at about half the
memory bandwidth for one row, and slows down per row from 2 to ~8 rows, so verifying drafts
cost 1.7x a decode step and speculation rarely paid. The fp32 kernel (AVX-512, else AVX2 + FMA) reads the
weights once per block of rows at close to the memory bandwidth (SmolLM2's 30 layers on a 2-core
AMD EPYC: 16 ms at 1 row, 18 at 2, 26 at 8, against torch's 33 / 46 / 43). The bf16 kernel
(AVX512-BF16, VDPBF16PS) does the same with half the bytes; on CPUs with AMX-BF16 its AMX build
(TDPBF16PS, the same packed weights) computes 16 rows for about the cost of one. Each computes a
row the same way whatever shares its product, so the forward's linear layers are batch-invariant.

They are used by the pooled forward only (:class:`speculation.forward.PooledModel`); the model
stays a plain torch model for every other caller (Hugging Face ``generate``, the tests'
oracle). Without a C compiler or the instructions, or with ``SPECRAG_LINEAR_KERNEL=torch``, the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ENV = "SPECRAG_LINEAR_KERNEL"


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: its source, the C function, the compiler flags and the CPU flags it needs."""

    dtype: torch.dtype | None      # a linear kernel's dtype (None: the attention kernel, fp32 and bf16)
    source: Path
    symbol: str
    cflags: tuple[str, ...]
    cpu_flags: frozenset[str]
    name: str
    rtol: float            # the self-check's tolerance against torch's product
    packed: bool = False   # reads the weight packed (LinearKernel.pack), not as [N, K]
    k_align: int = 2       # packed: k padded with zeros to a multiple of this


_LINEAR_F32 = Path(__file__).with_name("csrc") / "linear_f32.c"
# each dtype's kernels, widest instruction set first: the first this CPU has and that passes its
# check is the one (fp32: one source built for 16 or 8 lanes)
SPECS = {
    torch.float32: (KernelSpec(torch.float32, _LINEAR_F32, "specrag_linear_f32", ("-mavx512f", "-mfma"),
                               frozenset({"avx512f", "fma"}), "specrag-f32", 1e-4),
                    KernelSpec(torch.float32, _LINEAR_F32, "specrag_linear_f32", ("-mavx2", "-mfma"),
                               frozenset({"avx2", "fma"}), "specrag-f32-avx2", 1e-4)),
    torch.bfloat16: (KernelSpec(torch.bfloat16, Path(__file__).with_name("csrc") / "linear_amx.c",
                                "specrag_linear_bf16", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mamx-tile", "-mamx-bf16"),
                                frozenset({"avx512f", "avx512bw", "avx512vl", "amx_tile", "amx_bf16"}), "specrag-bf16-amx",
                                2e-2, packed=True, k_align=32),
                     KernelSpec(torch.bfloat16, Path(__file__).with_name("csrc") / "linear_bf16.c",
                                "specrag_linear_bf16", ("-mavx512f", "-mavx512bf16"),
                                frozenset({"avx512f", "avx512_bf16"}), "specrag-bf16", 2e-2, packed=True),),
}


def _amx_init(lib: ctypes.CDLL) -> None:
    """Ask Linux for the AMX tile state where ``lib`` is an AMX build (``specrag_amx_init``);
    a refusal (Linux < 5.16, a sandbox) raises, and the next build is loaded instead."""
    init = getattr(lib, "specrag_amx_init", None)
    if init is not None and init() != 0:
        raise RuntimeError("the operating system refused this process the AMX tile state (Linux >= 5.16 grants it)")


class LinearKernel:
    """A loaded kernel: ``linear(x, weight, bias)`` for CPU tensors of its ``dtype``."""

    def __init__(self, spec: KernelSpec, path: Path, digest: str) -> None:
        self.path = path
        self.spec = spec
        self.dtype = spec.dtype
        self.packed = spec.packed
        self.name = f"{spec.name}-{digest[:10]}"
        lib = ctypes.CDLL(str(path))
        _amx_init(lib)
        fn = getattr(lib, spec.symbol)
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        fn.restype = None
        self._fn = fn
        # several weights against one input in one call (csrc/linear_f32.c), where the source has it
        self._multi = getattr(lib, spec.symbol + "_multi", None)
        if self._multi is not None:
            self._multi.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            self._multi.restype = None

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [N, K] as the kernel reads it: itself (contiguous) for fp32; for bf16,
        groups of 32 outputs with each k pair side by side, [ceil(N/32), ceil(K/a)*a/2, 32, 2]
        (a: the kernel's ``k_align``, 2, or 32 for AMX tiles), zero past N and K (a copy: pack
        once per weight, see ``PooledModel``)."""
        if not self.packed:
            return weight.contiguous()
        n, k = weight.shape
        a = self.spec.k_align
        groups, pairs = -(-n // 32), -(-k // a) * a // 2
        wp = weight.new_zeros(groups * 32, pairs * 2)
        wp[:n, :k] = weight
        return wp.view(groups, 32, pairs, 2).permute(0, 2, 1, 3).contiguous()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               packed: torch.Tensor | None = None) -> torch.Tensor:
        """``torch.nn.functional.linear`` for CPU tensors of the kernel's dtype; each row of
        ``x`` computed as it would be alone. ``packed``: ``self.pack(weight)``, made once by the
        caller (else packed here, at the cost of a copy)."""
        k = x.shape[-1]
        flat = x.reshape(-1, k)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        w = packed if packed is not None else self.pack(weight)
        m, n = flat.shape[0], weight.shape[0]
        out = torch.empty(m, n, dtype=self.dtype)
        if m:
            self._fn(flat.data_ptr(), w.data_ptr(), bias.data_ptr() if bias is not None else None,
                     out.data_ptr(), m, k, n, flat.stride(0), torch.get_num_threads())
        return out.reshape(*x.shape[:-1], n)

    def linear_multi(self, x: torch.Tensor, weights: list[torch.Tensor],
                     biases: list[torch.Tensor | None], packed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` for a 2-D
        ``x`` (unit stride along its rows), in one call: each weight's columns bitwise those of
        ``linear(x, w, b)``, the call's overhead and the weights' prefetch shared (the query, key
        and value projections; gate and up). ``packed``: a packed kernel's (bf16) ``pack(w)`` of
        each weight, made once by the caller (else packed here, at the cost of copies)."""
        if len(biases) != len(weights) or not weights:
            raise ValueError("linear_multi: one bias (or None) per weight, at least one weight")
        if self.packed:
            packed = packed if packed is not None else [self.pack(w) for w in weights]
        if self._multi is None or len(weights) > 8:
            return torch.cat([self.linear(x, w, b, p) for w, b, p in
                              zip(weights, biases, packed if self.packed else weights)], -1)
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, k = x.shape
        if any(w.dim() != 2 or w.shape[1] != k or not w.is_contiguous() or w.dtype != self.dtype for w in weights) or any(
                b is not None and (b.shape != (w.shape[0],) or not b.is_contiguous() or b.dtype != self.dtype)
                for w, b in zip(weights, biases)):
            raise ValueError(f"linear_multi: contiguous {self.dtype} weights [N, {k}] and biases [N] wanted")
        ns = [w.shape[0] for w in weights]
        out = torch.empty(m, sum(ns), dtype=self.dtype)
        if m:
            n = len(weights)
            ptrs = (ctypes.c_void_p * n)(*[w.data_ptr() for w in (packed if self.packed else weights)])
            bias = (ctypes.c_void_p * n)(*[b.data_ptr() if b is not None else None for b in biases])
            self._multi(x.data_ptr(), n, ptrs, bias if any(b is not None for b in biases) else None,
                        (ctypes.c_int64 * n)(*ns), out.data_ptr(), m, k, x.stride(0), torch.get_num_threads())
        return out


# one source, built for the widest instruction set the CPU has (16 fp32 lanes, else 8)
# widest first: with AVX512-BF16 a bf16 model's scores and weighted values are bf16 products on
# VDPBF16PS (1.4-1.7x the AVX-512 build's speed at a 700-token context; fp32 models as there)
ATTENTION = (KernelSpec(None, Path(__file__).with_name("csrc") / "attention.c", "specrag_attention",
                        ("-mavx512f", "-mavx512bf16"), frozenset({"avx512f", "avx512_bf16"}), "specrag-attn-bf16", 1e-4),
             KernelSpec(None, Path(__file__).with_name("csrc") / "attention.c", "specrag_attention", ("-mavx512f",),
                        frozenset({"avx512f"}), "specrag-attn", 1e-4),
             KernelSpec(None, Path(__file__).with_name("csrc") / "attention.c", "specrag_attention",
                        ("-mavx2", "-mfma"), frozenset({"avx2", "fma"}), "specrag-attn-avx2", 1e-4))


class AttentionKernel:
    """The loaded attention kernel (``csrc/attention.c``): each query token against positions
    [0, nvis) of its own KV slot, computed alike whatever else is in the call."""

    def __init__(self, spec: KernelSpec, path: Path, digest: str) -> None:
        self.path = path
        self.name = f"{spec.name}-{digest[:10]}"
        fn = getattr(ctypes.CDLL(str(path)), spec.symbol)
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 9 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
        fn.restype = None
        self._fn = fn

    @staticmethod
    def supports(dtype: torch.dtype, device: Any, heads: int, kv_heads: int, head_dim: int) -> bool:
        """The models the kernel computes: fp32 or bf16 on a CPU, head dim a multiple of 16 up
        to 256, at most 8 query heads per kv head."""
        return (dtype in (torch.float32, torch.bfloat16) and torch.device(device).type == "cpu"
                and head_dim % 16 == 0 and head_dim <= 256 and heads % kv_heads == 0 and heads // kv_heads <= 8)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                 nvis: torch.Tensor, scale: float, max_visible: int | None = None,
                 tree: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, Hq, D] (unit stride along D); keys, values: the pool's [slots, Hkv, L, D]
        (contiguous); slot, nvis: [T] int64, token t sees positions [0, nvis[t]) of slot[t];
        tree: None, or ``tree_positions``' int64 array for draft-tree nodes (which then see
        their prefix and their ancestors' positions instead). Returns [T, Hq, D] in q's dtype."""
        t, hq, d = q.shape
        out = torch.empty(t, hq, d, dtype=q.dtype)
        if t:
            slot = slot.to(torch.int64).contiguous()
            nvis = nvis.to(torch.int64).contiguous()
            if max_visible is None:     # a caller that has not checked its inputs (the pooled forward has)
                if not (self.supports(q.dtype, q.device, hq, keys.shape[1], d) and keys.dtype == q.dtype
                        and values.shape == keys.shape and values.dtype == keys.dtype and q.stride(-1) == 1
                        and keys.is_contiguous() and values.is_contiguous()):
                    raise ValueError("attention kernel: unsupported shapes, dtypes or layouts (see AttentionKernel.supports)")
                top = int(nvis.max())
                if int(nvis.min()) < 1 or top > keys.shape[2] or int(slot.min()) < 0 or int(slot.max()) >= keys.shape[0]:
                    raise ValueError("attention kernel: every token must see 1..L positions of an existing slot")
                if tree is not None:
                    _check_tree(tree, nvis, keys.shape[2])
            else:
                top = max_visible
            self._fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), slot.data_ptr(),
                     nvis.data_ptr(), tree.data_ptr() if tree is not None else None, t, hq, keys.shape[1], d,
                     q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), top, scale,
                     int(q.dtype == torch.bfloat16), torch.get_num_threads())
        return out


def tree_positions(pre: list[int], ancestors: list[list[int]]) -> torch.Tensor:
    """The attention kernel's ``tree`` argument: token t sees positions [0, pre[t]) of its slot,
    then ``ancestors[t]`` (empty for a chain token, whose pre[t] is its nvis)."""
    offsets, flat = [], []
    for a in ancestors:
        offsets.append(len(flat))
        flat.extend(a)
    return torch.tensor([max(map(len, ancestors), default=0)] + list(pre) + offsets + flat, dtype=torch.int64)


def _check_tree(tree: torch.Tensor, nvis: torch.Tensor, length: int) -> None:
    t = nvis.shape[0]
    if tree.dtype != torch.int64 or not tree.is_contiguous() or tree.shape[0] < 1 + 2 * t:
        raise ValueError("attention kernel: tree must be tree_positions' int64 array")
    pre, off, anc = tree[1:1 + t], tree[1 + t:1 + 2 * t], tree[1 + 2 * t:]
    extra = nvis - pre
    if (int(pre.min()) < 0 or int(extra.max()) > int(tree[0]) or int(extra.min()) < 0
            or int((off + extra).max()) > anc.shape[0]
            or (anc.numel() and (int(anc.min()) < 0 or int(anc.max()) >= length))):
        raise ValueError("attention kernel: a tree node's positions must lie inside its slot")


def _visible(t: int, nvis: torch.Tensor, tree: torch.Tensor | None) -> torch.Tensor:
    """The positions token t sees, in order."""
    if tree is None:
        return torch.arange(int(nvis[t]))
    n = nvis.shape[0]
    pre, off = int(tree[1 + t]), int(tree[1 + n + t])
    return torch.cat([torch.arange(pre), tree[1 + 2 * n + off:1 + 2 * n + off + int(nvis[t]) - pre]])


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                        nvis: torch.Tensor, scale: float, tree: torch.Tensor | None = None) -> torch.Tensor:
    """What the attention kernel computes, in torch ops (fp32, token by token): its check."""
    g = q.shape[1] // keys.shape[1]
    out = []
    for t in range(q.shape[0]):
        seen = _visible(t, nvis, tree)
        k = keys[slot[t], :, seen].float().repeat_interleave(g, 0)
        v = values[slot[t], :, seen].float().repeat_interleave(g, 0)
        p = torch.softmax(torch.einsum("hd,hjd->hj", q[t].float() * scale, k), -1)
        out.append(torch.einsum("hj,hjd->hd", p, v))
    return torch.stack(out).to(q.dtype)


def _check_attention(kernel: AttentionKernel) -> str | None:
    gen = torch.Generator().manual_seed(0)
    # every unrolled (query heads per kv head, head dim / 16) of csrc/attention.c, and a generic one
    for dtype, hkv, g, d in ((torch.float32, 2, 3, 64), (torch.bfloat16, 2, 3, 64), (torch.bfloat16, 1, 4, 64),
                             (torch.float32, 1, 4, 128), (torch.bfloat16, 2, 2, 32)):
        keys = torch.randn(3, hkv, 300, d, generator=gen).to(dtype)
        values = torch.randn(3, hkv, 300, d, generator=gen).to(dtype)
        q = torch.randn(hkv * g, 20, d, generator=gen).to(dtype).transpose(0, 1)     # [20, Hq, D], strided
        slot = torch.tensor([0] * 10 + [2] * 10)
        nvis = torch.tensor(list(range(280, 290)) + list(range(1, 11)))
        got = kernel(q, keys, values, slot, nvis, 0.125)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        if not torch.allclose(got.float(), reference_attention(q, keys, values, slot, nvis, 0.125).float(),
                              rtol=tol, atol=tol):
            return f"its {dtype} attention differs from torch's"
        for i in (0, 9, 10, 19):
            if not torch.equal(kernel(q[i:i + 1], keys, values, slot[i:i + 1], nvis[i:i + 1], 0.125), got[i:i + 1]):
                return "a token's attention changed with the tokens beside it"
        # draft-tree nodes: their prefix and ancestors at scattered positions give the bits of
        # the same positions laid out as a chain (prefix lengths at and off multiples of four)
        for pre in (281, 284, 7):
            depth = 6
            path = [pre + 2 * i + (i % 2) for i in range(depth)]          # siblings between them
            chain_k, chain_v = keys.clone(), values.clone()
            chain_k[1], chain_v[1] = keys[0], values[0]
            chain_k[1, :, pre:pre + depth], chain_v[1, :, pre:pre + depth] = keys[0, :, path], values[0, :, path]
            tree = tree_positions([pre] * depth + [pre + depth], [path[:i + 1] for i in range(depth)] + [[]])
            sl, nv = torch.tensor([0] * (depth + 1)), torch.tensor([pre + i + 1 for i in range(depth)] + [pre + depth])
            got = kernel(q[:depth + 1], keys, values, sl, nv, 0.125, tree=tree)
            want = kernel(q[:depth + 1], chain_k, chain_v, torch.tensor([1] * depth + [0]), nv, 0.125)
            if not torch.equal(got[:depth], want[:depth]) or not torch.equal(got[depth:], kernel(
                    q[depth:depth + 1], keys, values, sl[:1], nv[depth:], 0.125)):
                return "a draft-tree node's attention differs from the same path's as a chain"
            if not torch.allclose(got.float(), reference_attention(q[:depth + 1], keys, values, sl, nv, 0.125,
                                                                   tree).float(), rtol=tol, atol=tol):
                return f"its {dtype} tree attention differs from torch's"
    return None


@functools.lru_cache(maxsize=None)
def attention_kernel() -> AttentionKernel | None:
    """This machine's attention kernel (AVX512-BF16, else AVX-512, else AVX2 + FMA), or None
    with the reasons logged."""
    kernel, why = _load_widest(ATTENTION, AttentionKernel, _check_attention)
    if kernel is None:
        log.info("attention uses torch's operators: %s", why)
    return kernel


# the small operations of a Llama layer in fp32 and bf16 (plain C: any x86-64 or other CPU with a compiler)
LAYER_OPS = KernelSpec(None, Path(__file__).with_name("csrc") / "layer.c", "specrag_add_rmsnorm", (),
                       frozenset(), "specrag-layer", 1e-5)


class LayerOps:
    """The loaded ``csrc/layer.c``: ``add_rmsnorm`` and ``rope_kv`` for the lean forward
    (speculation/lean.py), fp32 or bf16 (by the tensors' dtype; in bf16 rounded where
    transformers' modules round), each token computed alike whatever else is in the call."""

    def __init__(self, spec: KernelSpec, path: Path, digest: str) -> None:
        self.path = path
        self.name = f"{spec.name}-{digest[:10]}"
        lib = ctypes.CDLL(str(path))
        # per dtype: (add_rmsnorm, rope_kv), the pair csrc/lean.c calls for that dtype too
        self._fns = {}
        for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, "_bf16")):
            norm, rope = getattr(lib, "specrag_add_rmsnorm" + suffix), getattr(lib, "specrag_rope_kv" + suffix)
            norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float]
            rope.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 8
            norm.restype = rope.restype = None
            self._fns[dtype] = (norm, rope)

    def add_rmsnorm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                    eps: float) -> None:
        """``h += delta`` (unless None), then ``out = weight * h / sqrt(mean(h^2) + eps)`` per row;
        fp32 or bf16 [T, n] contiguous tensors (``delta`` too), ``weight`` [n], all of one dtype."""
        self._fns[h.dtype][0](h.data_ptr(), delta.data_ptr() if delta is not None else None, weight.data_ptr(), out.data_ptr(),
                   h.shape[0], h.shape[1], eps)

    def rope_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, head_dim: int) -> None:
        """Rotate ``q`` [T, Hq*D] in place; rotate ``k`` and copy ``v`` [T, Hkv*D] into the pool
        ``keys`` / ``values`` [slots, Hkv, L, D] at (slot[t], pos[t]). q, k, v: rows with unit
        stride (contiguous, or column blocks of one fused product), k's and v's rows equally far
        apart; cos, sin: [T, D]; slot, pos: int64 [T]; all fp32 or all bf16, contiguous where
        not said, and inside the pool (the caller checked)."""
        if not (k.stride(0) == v.stride(0) and q.stride(1) == k.stride(1) == v.stride(1) == 1):
            raise ValueError("rope_kv: q, k and v need unit stride along a row, and k and v one row stride")
        self._fns[q.dtype][1](q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),
                   values.data_ptr(), slot.data_ptr(), pos.data_ptr(), q.shape[0], q.shape[1] // head_dim,
                   k.shape[1] // head_dim, head_dim, q.stride(0), k.stride(0), keys.stride(0), keys.stride(1))


def _check_layer_ops(ops: LayerOps) -> str | None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(7, 75, generator=gen)        # 75: the loop's tail past the 8-wide partial sums too
    d = torch.randn(7, 75, generator=gen)
    w = torch.randn(75, generator=gen)
    out = torch.empty(7, 75)
    hh = h.clone()
    ops.add_rmsnorm(hh, d, w, out, 1e-5)
    want_h = h + d
    want = w * (want_h * torch.rsqrt(want_h.pow(2).mean(-1, keepdim=True) + 1e-5))
    if not (torch.equal(hh, want_h) and torch.allclose(out, want, rtol=1e-5, atol=1e-5)):
        return "its RMSNorm differs from torch's"
    t, hq, hkv, dim = 5, 6, 2, 16
    q = torch.randn(t, hq * dim, generator=gen)
    k = torch.randn(t, hkv * dim, generator=gen)
    v = torch.randn(t, hkv * dim, generator=gen)
    ang = torch.randn(t, dim // 2, generator=gen)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    keys, values = torch.zeros(3, hkv, 8, dim), torch.zeros(3, hkv, 8, dim)
    slot, pos = torch.tensor([2, 2, 0, 1, 2]), torch.tensor([0, 1, 7, 3, 2])
    qq = q.clone()
    ops.rope_kv(qq, k, v, cos, sin, keys, values, slot, pos, dim)

    def rot(x: torch.Tensor) -> torch.Tensor:     # [T, H, D], as transformers' apply_rotary_pos_emb
        half = torch.cat((-x[..., dim // 2:], x[..., :dim // 2]), -1)
        return x * cos[:, None] + half * sin[:, None]

    if not torch.equal(qq.view(t, hq, dim), rot(q.view(t, hq, dim))):
        return "its rotary embedding differs from torch's"
    if not (torch.equal(keys[slot, :, pos], rot(k.view(t, hkv, dim))) and torch.equal(values[slot, :, pos], v.view(t, hkv, dim))):
        return "it wrote other keys or values into the pool"
    fused = torch.cat([q, k, v], -1)           # the three as column blocks of one product's output
    keys2, values2 = torch.zeros_like(keys), torch.zeros_like(values)
    ops.rope_kv(fused[:, :hq * dim], fused[:, hq * dim:(hq + hkv) * dim], fused[:, (hq + hkv) * dim:], cos, sin,
                keys2, values2, slot, pos, dim)
    if not (torch.equal(fused[:, :hq * dim], qq) and torch.equal(keys2, keys) and torch.equal(values2, values)):
        return "its rotary embedding of column blocks differs from that of whole tensors"
    return _check_layer_ops_bf16(ops, gen)


def _check_layer_ops_bf16(ops: LayerOps, gen: torch.Generator) -> str | None:
    """bf16: the residual add and the rotary embedding bitwise as transformers' bf16 operators
    give them; the RMSNorm within a bf16 rounding of theirs (its sum of squares runs in another
    order, so a value at a rounding boundary may round the other way)."""
    bf = torch.bfloat16
    h = torch.randn(7, 75, generator=gen).to(bf)
    d = torch.randn(7, 75, generator=gen).to(bf)
    w = (0.5 + torch.rand(75, generator=gen)).to(bf)
    out = torch.empty(7, 75, dtype=bf)
    hh = h.clone()
    ops.add_rmsnorm(hh, d, w, out, 1e-5)
    want_h = h + d
    f = want_h.float()
    want = w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf)      # LlamaRMSNorm
    if not (torch.equal(hh, want_h) and torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2)):
        return "its bf16 RMSNorm differs from transformers'"
    t, hq, hkv, dim = 5, 6, 2, 16
    q, k, v = (torch.randn(t, n * dim, generator=gen).to(bf) for n in (hq, hkv, hkv))
    ang = torch.randn(t, dim // 2, generator=gen)
    cos, sin = torch.cat([ang, ang], -1).cos().to(bf), torch.cat([ang, ang], -1).sin().to(bf)
    keys, values = torch.zeros(3, hkv, 8, dim, dtype=bf), torch.zeros(3, hkv, 8, dim, dtype=bf)
    slot, pos = torch.tensor([2, 2, 0, 1, 2]), torch.tensor([0, 1, 7, 3, 2])
    qq = q.clone()
    ops.rope_kv(qq, k, v, cos, sin, keys, values, slot, pos, dim)

    def rot(x: torch.Tensor) -> torch.Tensor:     # transformers' apply_rotary_pos_emb, on bf16 tensors
        half = torch.cat((-x[..., dim // 2:], x[..., :dim // 2]), -1)
        return (x * cos[:, None]) + (half * sin[:, None])

    if not torch.equal(qq.view(t, hq, dim), rot(q.view(t, hq, dim))):
        return "its bf16 rotary embedding differs from transformers'"
    if not (torch.equal(keys[slot, :, pos], rot(k.view(t, hkv, dim))) and torch.equal(values[slot, :, pos], v.view(t, hkv, dim))):
        return "it wrote other bf16 keys or values into the pool"
    return None


@functools.lru_cache(maxsize=None)
def layer_ops() -> LayerOps | None:
    """This machine's ``csrc/layer.c``, or None with the reason logged."""
    ops, why = _load(LAYER_OPS, LayerOps, _check_layer_ops)
    if ops is None:
        log.info("the lean forward is off: %s", why)
    return ops


# the lean forward's layer loop in C and the MLP's activation (one source, 16 or 8 fp32 lanes)
_LEAN = Path(__file__).with_name("csrc") / "lean.c"
LEAN = (KernelSpec(None, _LEAN, "specrag_lean_layers", ("-mavx512f", "-mfma"), frozenset({"avx512f", "fma"}),
                   "specrag-lean", 1e-5),
        KernelSpec(None, _LEAN, "specrag_lean_layers", ("-mavx2", "-mfma"), frozenset({"avx2", "fma"}),
                   "specrag-lean-avx2", 1e-5))


def _fn_ptr(fn: Any) -> int:
    """The address of a loaded C function (to pass to another C function)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


class LeanKernel:
    """The loaded ``csrc/lean.c``: ``silu_mul`` (the Llama MLP's activation, per element) and
    ``layers``, every decoder layer of the lean forward in one call of C that calls our other
    kernels, the very functions the Python loop calls, with the same arguments; fp32, and bf16
    in the AVX-512 build (``bf16``)."""

    def __init__(self, spec: KernelSpec, path: Path, digest: str) -> None:
        self.path = path
        self.name = f"{spec.name}-{digest[:10]}"
        lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._silu, self._layers = {}, {}
        for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, "_bf16")):
            silu, layers = getattr(lib, "specrag_silu_mul" + suffix, None), getattr(lib, "specrag_lean_layers" + suffix, None)
            if silu is None or layers is None:
                continue             # bf16: the AVX-512 build only
            silu.argtypes = [p] * 2 + [i64] * 2 + [ctypes.c_int]
            layers.argtypes = [p] * 4 + [i64] * 2 + [p] * 6 + [i64] * 2 + [p] * 4 + [i64, ctypes.c_float] + [p] * 9 + [ctypes.c_int]
            silu.restype = layers.restype = None
            self._silu[dtype], self._layers[dtype] = silu, layers
        self.bf16 = torch.bfloat16 in self._layers

    def silu_mul(self, g: torch.Tensor) -> torch.Tensor:
        """``silu(g[:, :n]) * g[:, n:]`` for ``g`` [T, 2n] (gate | up) contiguous: [T, n] (fp32;
        bf16: the SiLU rounded to bf16, then the product, as transformers' bf16 MLP rounds)."""
        t, n2 = g.shape
        out = torch.empty(t, n2 // 2, dtype=g.dtype)
        if t:
            self._silu[g.dtype](g.data_ptr(), out.data_ptr(), t, n2 // 2, torch.get_num_threads())
        return out

    @staticmethod
    def entry_points(linear: LinearKernel, attention: AttentionKernel, ops: LayerOps) -> tuple[int, int, int, int]:
        """The addresses of the kernels ``layers`` calls (the Python loop's own, for the linear
        kernel's dtype): take once, pass to every ``layers`` call."""
        norm, rope = ops._fns[linear.dtype]
        return _fn_ptr(linear._multi), _fn_ptr(attention._fn), _fn_ptr(norm), _fn_ptr(rope)

    def layers(self, kernels: tuple[int, int, int, int], n_layers: int, h: torch.Tensor, dims: Any, wts: Any,
               bias: Any, eps: Any, keys: Any, values: Any, pool_strides: tuple[int, int], slot: torch.Tensor,
               pos: torch.Tensor, nvis: torch.Tensor, max_visible: int, scale: float, cos: torch.Tensor,
               sin: torch.Tensor, tree: torch.Tensor | None = None) -> torch.Tensor:
        """Every decoder layer and the final RMSNorm for the T tokens of ``h`` [T, hidden]
        (contiguous fp32 or bf16 embeddings; the residual stream on return); the normed hidden
        states [T, hidden]. kernels: ``entry_points``; dims / wts / bias / eps / keys / values:
        ctypes arrays laid out as ``specrag_lean_layers`` reads them (``LeanLlama`` builds them);
        slot, pos, nvis: int64 [T], inside the pool (the caller checked); tree: None or the
        attention's draft-tree positions (``tree_positions``); cos, sin: [T, head dim]
        contiguous, of h's dtype."""
        t, hid = h.shape
        nq, nkv, inter = dims[1], dims[2], dims[3]
        x = torch.empty_like(h)
        y, a = h.new_empty(t, nq + 2 * nkv), h.new_empty(t, nq)
        g, p, dn = h.new_empty(t, 2 * inter), h.new_empty(t, inter), h.new_empty(t, hid)
        self._layers[h.dtype](*kernels, n_layers, t, dims, wts, bias, eps, keys, values, pool_strides[0],
                              pool_strides[1], slot.data_ptr(), pos.data_ptr(), nvis.data_ptr(),
                              tree.data_ptr() if tree is not None else None, max_visible, scale,
                              cos.data_ptr(), sin.data_ptr(), h.data_ptr(), x.data_ptr(), y.data_ptr(), a.data_ptr(),
                              g.data_ptr(), p.data_ptr(), dn.data_ptr(), torch.get_num_threads())
        return x


def _check_lean(kernel: LeanKernel) -> str | None:
    gen = torch.Generator().manual_seed(0)
    # 75: a row's tail past the last whole vector; 40 x 75 rows: past the threaded size
    for t, n in ((3, 75), (40, 300), (2, 64)):
        g = torch.randn(t, 2 * n, generator=gen) * 6
        g[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, 200.0, -200.0])
        got = kernel.silu_mul(g)
        want = torch.nn.functional.silu(g[:, :n]) * g[:, n:]
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return "its SiLU differs from torch's"
        for i in (0, t - 1):
            if not torch.equal(kernel.silu_mul(g[i:i + 1].contiguous()), got[i:i + 1]):
                return "a token's SiLU changed with the tokens beside it"
        if kernel.bf16:
            # bf16: torch's bf16 SiLU then product, but where its fp32 SiLU (another exp) rounds a
            # value the other way: at most one bf16 step apart
            gb = g.to(torch.bfloat16)
            got = kernel.silu_mul(gb)
            want = torch.nn.functional.silu(gb[:, :n]) * gb[:, n:]
            if got.dtype != torch.bfloat16 or not torch.allclose(got.float(), want.float(), rtol=1.6e-2, atol=1e-6):
                return "its bf16 SiLU differs from torch's"
            if (got != want).float().mean() > 0.01:
                return "its bf16 SiLU rounds unlike torch's"
            if not torch.equal(kernel.silu_mul(gb[t - 1:].contiguous()), got[t - 1:]):
                return "a token's bf16 SiLU changed with the tokens beside it"
    return None


@functools.lru_cache(maxsize=None)
def lean_kernel() -> LeanKernel | None:
    """This machine's ``csrc/lean.c`` (AVX-512, else AVX2 + FMA), or None with the reasons
    logged (the lean forward then loops over its layers in Python)."""
    kernel, why = _load_widest(LEAN, LeanKernel, _check_lean)
    if kernel is None:
        log.info("the lean forward's layer loop runs in Python: %s", why)
    return kernel


def _load(spec: KernelSpec, make: Any, check: Any) -> tuple[Any, str | None]:
    """(the kernel of ``spec``, built under the cache folder, loaded by ``make`` and passed by
    ``check``; None) or (None, why not)."""
    why = _why_unavailable(spec)
    if why is None:
        from .models import cache_dir

        try:
            path, digest = _build(spec, cache_dir() / "kernels")
            kernel = make(spec, path, digest)
            why = check(kernel)
        except (RuntimeError, OSError) as exc:
            why = str(exc)
        if why is None:
            return kernel, None
    return None, why


def _load_widest(specs: tuple[KernelSpec, ...], make: Any, check: Any) -> tuple[Any, str]:
    """(the first of ``specs`` -- one source's builds, widest instruction set first -- that
    :func:`_load` gives, ""), or (None, each build's reason)."""
    whys = []
    for spec in specs:
        kernel, why = _load(spec, make, check)
        if kernel is not None:
            return kernel, ""
        whys.append(f"{spec.name}: {why}")
    return None, "; ".join(whys)


def _openmp_dir() -> Path | None:
    """The folder of the OpenMP runtime torch itself loaded: the kernel links to that very
    library, so its threads are torch's threads (two runtimes on 2 cores would fight)."""
    lib = Path(torch.__file__).parent / "lib"
    return lib if (lib / "libgomp.so.1").exists() else None


def _why_unavailable(spec: KernelSpec) -> str | None:
    from .models import cpu_info

    if os.environ.get(ENV, "").lower() == "torch":
        return f"{ENV}=torch"
    missing = spec.cpu_flags - cpu_info()["flags"]
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    if not shutil.which(os.environ.get("CC", "cc")):
        return "no C compiler (cc) on PATH"
    if _openmp_dir() is None:
        return "torch ships no libgomp here (not a GNU/Linux torch build)"
    return None


def _build(spec: KernelSpec, cache: Path) -> tuple[Path, str]:
    cc = os.environ.get("CC", "cc")
    omp = _openmp_dir()
    flags = ["-O3", *spec.cflags, "-fopenmp", "-shared", "-fPIC"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    headers = [h.read_text() for h in sorted(spec.source.parent.glob("*.h"))]     # what the source includes
    digest = hashlib.sha256("\n".join([spec.source.read_text(), *headers, cc, version, " ".join(flags),
                                       str(omp)]).encode()).hexdigest()
    path = cache / f"{spec.source.stem}-{digest[:16]}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / path.name
            cmd = [cc, *flags, str(spec.source), "-o", str(out), f"-L{omp}", "-l:libgomp.so.1", f"-Wl,-rpath,{omp}"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"building the {spec.name} kernel failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
            os.replace(out, path)     # atomic: processes building at once each get a whole file
        log.info("built the %s kernel: %s", spec.name, path)
    return path, digest


def _self_check(kernel: LinearKernel) -> str | None:
    """Trust the kernel only where it computes what torch computes (to fp32 rounding) and each
    row alike whatever the row count, on this machine, with this compiler."""
    gen = torch.Generator().manual_seed(0)
    tol = kernel.spec.rtol
    for n, k in ((37, 29), (64, 576), (200, 1536)):
        w = torch.randn(n, k, generator=gen).to(kernel.dtype)
        b = torch.randn(n, generator=gen).to(kernel.dtype)
        x = torch.randn(130, k, generator=gen).to(kernel.dtype)
        got = kernel.linear(x, w, b)
        want = torch.nn.functional.linear(x.float(), w.float(), b.float())
        if not torch.allclose(got.float(), want, rtol=tol, atol=tol * k ** 0.5):
            return f"its product differs from torch's for a {n}x{k} weight"
        for m in (1, 2, 3, 5, 17, 96, 97, 130):
            if not (torch.equal(kernel.linear(x[:m], w, b), got[:m])
                    and torch.equal(kernel.linear(x[130 - m:], w, b), got[130 - m:])):
                return f"a row's result changed with {m} rows in the product"
    if kernel._multi is not None and not kernel.packed:
        ws = [torch.randn(n, 200, generator=gen).to(kernel.dtype) for n in (30, 21, 5)]
        b2 = torch.randn(21, generator=gen).to(kernel.dtype)
        x = torch.randn(50, 200, generator=gen).to(kernel.dtype)
        for biases in ((None, b2, None), (None, None, None)):
            got = kernel.linear_multi(x, ws, list(biases))
            want = torch.cat([kernel.linear(x, ww, bb) for ww, bb in zip(ws, biases)], -1)
            if not torch.equal(got, want):
                return "a product of several weights differs from their products one by one"
    return None


@functools.lru_cache(maxsize=None)
def linear_kernel(dtype: torch.dtype = torch.float32) -> LinearKernel | None:
    """This machine's linear kernel for ``dtype`` (fp32 or bf16), or None (with the reason
    logged) where it cannot be had or fails its check. Built once per compiler and source, under
    the cache folder."""
    kernel, why = _load_widest(SPECS.get(dtype, ()), LinearKernel, _self_check)
    if kernel is None:
        log.info("%s linear layers use torch's kernels: %s", str(dtype).removeprefix("torch."),
                 why or "no kernel of ours for this dtype")
    return kernel


def kernel_for(dtype: Any, device: Any) -> LinearKernel | None:
    """The kernel that computes a pooled forward's linear layers for this dtype and device: ours
    for fp32 or bf16 on a CPU where it loads, else None (torch's)."""
    if dtype not in SPECS or torch.device(device).type != "cpu":
        return None
    return linear_kernel(dtype)


def kernel_name(dtype: Any, device: Any) -> str:
    """What computes the pooled forward's linear layers for this dtype and device ("torch" or
    our kernel's name with its build digest): part of a cost curve's cache key."""
    kernel = kernel_for(dtype, device)
    return kernel.name if kernel is not None else "torch"
