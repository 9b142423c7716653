"""A forward whose result for a token does not depend on what shares its forward.

Speculation verifies k drafted tokens in one forward where plain decoding runs k one-token
forwards, and a batch puts other rows beside a sequence. If the numbers for a token depend on
that (matmul kernels chosen by shape, attention split by length), greedy output with
speculation can differ from greedy output without it at any place where low-precision
rounding flips an argmax -- measured with bf16 on CPU: 3 of 6 answers differed. This module
makes the forward batch-invariant (the idea of Thinking Machines' "Defeating Nondeterminism
in LLM Inference", which vLLM offers on GPUs as VLLM_BATCH_INVARIANT):

* Attention: fp32, over the pool in fixed chunks of ``KV_CHUNK`` positions aligned at
  position 0: the softmax against the row's exact maximum, per-chunk sums and products, the
  chunks added in order; a chunk past a row's length adds exact zeros (a bitwise no-op), so
  a long prompt chunk's queries are grouped by the chunks they can see and skip the rest. The products are [M, D] @ [D, C] with at least ``Q_TILE`` query rows
  where this machine's fp32 kernel computes a row independently of M (measured: AMD EPYC, M >=
  4), else in fixed tiles of ``Q_TILE`` rows (one shape whatever the batch). Either way a
  query's output depends only on its own row.
* Linear layers, norms and the rest: row-wise by construction *if* the matmul kernel computes
  a row the same way whatever the number of rows. Kernels pick their path by shape, so the
  machine is probed (:func:`row_block`): up to how many rows does every linear layer compute a
  row the same? Products are then split into blocks of that many rows and a lone row is padded
  to two (:func:`make_rows_invariant`). Measured: bf16 on an AMD EPYC with AVX512-BF16, any
  number of rows; bf16 with AMX on an Intel Xeon, up to 32; bf16 on an Intel Xeon without
  AVX512-BF16, 2 (4-row products round a row differently now and then); fp32 with torch's GEMM
  on the AMD, never (a one-row product takes another path than a many-row one). fp32 on a CPU with AVX2 and
  FMA runs every linear layer on our kernel instead (speculation/kernels.py), which computes
  each row alike whatever the number of rows.
"""

from __future__ import annotations

import threading
import types
from typing import Any

import torch

KV_CHUNK = 256
Q_TILE = 4


# queries one attention call must hold before it is split by the chunks they see
SPLIT_QUERIES = 64


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
              scaling: float) -> torch.Tensor:
    """:func:`chunked_attention` of every query over the chunks up to the last position it
    may see, the queries grouped by that count: a long prompt chunk's early queries skip the
    later chunks (a prefill of 900 tokens computes ~45 % fewer scores). Bitwise the same as
    over every chunk: a chunk past a query's last visible position adds exact zeros there, and a
    query's row never depends on the other queries of its product."""
    b, hkv, m, d = q.shape
    length = keys.shape[2]
    if m < SPLIT_QUERIES or length <= KV_CHUNK:
        return chunked_attention(q, keys, values, mask, scaling)
    cols = torch.arange(1, length + 1, device=mask.device)
    last = (mask[:, 0] * cols).amax(dim=(0, 2))                 # [M]: 1 + last visible position
    need = ((last + KV_CHUNK - 1) // KV_CHUNK).clamp_min(1)
    counts = need.unique().tolist()                              # sorted
    if counts[0] * KV_CHUNK >= length:
        return chunked_attention(q, keys, values, mask, scaling)
    out = q.new_empty(b, hkv, m, d)
    for n in counts:
        rows = (need == n).nonzero().squeeze(1)
        span = min(n * KV_CHUNK, length)
        out[:, :, rows] = chunked_attention(q[:, :, rows], keys[:, :, :span], values[:, :, :span],
                                            mask[:, :, rows, :span], scaling)
    return out


def chunked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """q: [B, Hkv, M, D] (M = query heads per kv head x padded tokens), keys / values:
    [B, Hkv, L, D] views of the pool, mask: [B, 1, M, L] bool. Returns [B, Hkv, M, D] in q's
    dtype, each query's row computed with the same operations whatever B, M and L are.

    All chunks at once: the scores of every (query tile, chunk) pair in one product of fixed
    [Q_TILE | M, D] @ [D, KV_CHUNK] matrices, the softmax against the row's exact maximum over
    every visible position (a max is order-free), per-chunk sums and P @ V products of fixed
    shape, then the chunks added in order. A chunk past a row's length is all -inf scores: it
    adds exact zeros. Fewer, larger operations than a loop over chunks (this is the part of the
    forward that costs what bf16 saves)."""
    b, hkv, m, d = q.shape
    length = keys.shape[2]
    tiled = not _block_matmul_invariant(q.device)
    pad_m = -m % Q_TILE if tiled else max(0, Q_TILE - m)
    qf = q.float() * scaling
    if pad_m:
        qf = torch.cat([qf, qf.new_zeros(b, hkv, pad_m, d)], dim=2)
        mask = torch.cat([mask, mask.new_zeros(b, 1, pad_m, length)], dim=2)
    mp = m + pad_m
    k = keys.float()
    v = values.float()
    fill = -length % KV_CHUNK
    if fill:                            # the pool's tail: pad to whole chunks (masked)
        k = torch.cat([k, k.new_zeros(b, hkv, fill, d)], dim=2)
        v = torch.cat([v, v.new_zeros(b, hkv, fill, d)], dim=2)
        mask = torch.cat([mask, mask.new_zeros(b, 1, mp, fill)], dim=-1)
    n = (length + fill) // KV_CHUNK
    # tiled: fixed [Q_TILE, D] @ [D, C] products; else one product per (row, head), whose rows
    # this machine's kernel computes independently of M (checked by _block_matmul_invariant)
    t, qt = (mp // Q_TILE, Q_TILE) if tiled else (1, mp)
    tiles = qf.view(b, hkv, 1, t, qt, d)
    kc = k.view(b, hkv, n, 1, KV_CHUNK, d)
    vc = v.view(b, hkv, n, 1, KV_CHUNK, d)
    visible = mask.reshape(b, 1, t, qt, n, KV_CHUNK).permute(0, 1, 4, 2, 3, 5)      # [b, 1, n, t, qt, C]
    scores = torch.matmul(tiles, kc.transpose(-1, -2)).masked_fill_(~visible, float("-inf"))
    top = scores.amax(-1, keepdim=True).amax(2, keepdim=True)                    # [b, hkv, 1, t, qt, 1]
    # rows with nothing visible (padding) keep -inf: subtract 0 there instead (p = 0, finite)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    p = torch.exp(scores - top)
    sums = p.sum(-1, keepdim=True)                                               # [b, hkv, n, t, qt, 1]
    parts = torch.matmul(p, vc)                                                  # [b, hkv, n, t, qt, D]
    acc, total = parts[:, :, 0], sums[:, :, 0]
    for c in range(1, n):               # in chunk order, whatever n is
        acc = acc + parts[:, :, c]
        total = total + sums[:, :, c]
    out = (acc / total.clamp_min(1e-30)).reshape(b, hkv, mp, d)[:, :, :m]
    return out.to(q.dtype)


_BLOCK_INVARIANT: dict[str, bool] = {}


def _block_matmul_invariant(device: torch.device) -> bool:
    """Whether fp32 products [M, D] @ [D, C] and [M, C] @ [C, D] compute a row the same for
    every M >= Q_TILE on this machine (measured once per device type)."""
    key = device.type
    if key not in _BLOCK_INVARIANT:
        gen = torch.Generator().manual_seed(1)
        ok = True
        for kdim, n in ((64, KV_CHUNK), (KV_CHUNK, 64), (128, KV_CHUNK), (KV_CHUNK, 128)):
            a = torch.randn(2, 1200, kdim, generator=gen).to(device)
            w = torch.randn(2, kdim, n, generator=gen).to(device)
            ref = torch.matmul(a[:, :Q_TILE], w)
            for rows in (Q_TILE, 5, 8, 17, 64, 300, 1200):
                ok &= bool(torch.equal(torch.matmul(a[:, :rows], w)[:, :Q_TILE], ref))
            ok &= bool(torch.equal(torch.matmul(a[:, 3:3 + 64], w)[:, :Q_TILE], torch.matmul(a[:, 3:3 + Q_TILE], w)))
        _BLOCK_INVARIANT[key] = ok
    return _BLOCK_INVARIANT[key]


# rows a linear layer's product may hold and still compute each row as it would in any other
# product of 2..that many rows: per linear shape / dtype / device, probed once per machine (kept
# on disk: _stored_block) and held here per process
_ROW_BLOCK: dict[tuple, int | None] = {}
ROW_BLOCKS = (512, 256, 128, 64, 32, 16, 8, 4, 2)
_PROBE_CHECKED = 256      # rows compared per product size, input and alignment (at least)
_PROBE_ROWS = (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512)


def row_block(model: Any) -> int | None:
    """The largest block of rows (from ``ROW_BLOCKS``) up to which every linear layer of
    ``model`` computes a row the same, bit for bit, whatever other rows (2 .. block of them)
    share the product and wherever it sits among them; None when not even two rows do. The
    batch-invariant forward splits longer products into blocks of that many rows and pads a
    lone row to two (``make_rows_invariant``), so every row is computed by the same kernel path.
    Measured: bf16 on an AMD EPYC, any number of rows; bf16 with AMX on an Intel Xeon, up to 32
    (the 576 -> 1536 projection takes another kernel from 33 rows on); bf16 on a Xeon without
    AVX512-BF16, 2; fp32 on the AMD, never (one row vs several). The kernel path depends on the
    shape (the values only decide where a different path shows): one probe per shape."""
    block = None
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight
        key = (tuple(w.shape), w.dtype, w.device.type, module.bias is not None)
        if key not in _ROW_BLOCK:
            _ROW_BLOCK[key] = _stored_block(module, key)
        b = _ROW_BLOCK[key]
        if b is None:
            return None
        block = b if block is None else min(block, b)
    return block


# what a stored probe result depends on beside the shape and the machine: bump when the probe changes
_PROBE_VERSION = "v1"


def _stored_block(module: Any, key: tuple) -> int | None:
    """``_linear_block`` of a CPU layer, kept on disk per shape / dtype / bias, CPU (model and
    flags), torch version and threads: the probe is the dearest thing a bf16 model does at load
    where torch computes bf16 (minutes on a CPU without bf16 instructions, mostly the LM head's
    products), and its answer only changes with those. A GPU's layer is probed in every process."""
    if key[2] != "cpu":
        return _linear_block(module)
    import hashlib
    import json
    import os

    from .models import cache_dir, cpu_fingerprint

    parts = [repr(key), torch.__version__, str(torch.get_num_threads()), cpu_fingerprint(),
             repr((ROW_BLOCKS, _PROBE_ROWS, _PROBE_CHECKED)), _PROBE_VERSION]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    path = cache_dir() / "row_block" / f"{digest}.json"
    try:
        block = json.loads(path.read_text())["block"]
        if block is None or block in ROW_BLOCKS:
            return block
    except (OSError, ValueError, KeyError, TypeError):
        pass
    block = _linear_block(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"block": block, "shape": list(key[0]), "dtype": str(key[1]), "bias": key[3]}))
    os.replace(tmp, path)      # atomic: processes probing at once each leave a whole file
    return block


def rows_are_invariant(model: Any, kernel: bool = True) -> bool:
    """Whether the batch-invariant forward can hold for ``model`` on this machine: an fp32 or
    bf16 CPU model's linear layers on our kernel (``kernel``; speculation/kernels.py computes
    every row alike by construction, and checks it before it is used), else its own matmuls'
    probe."""
    weight = next(model.parameters())
    if kernel:
        from .kernels import kernel_for

        if kernel_for(weight.dtype, weight.device) is not None:
            return True
    return row_block(model) is not None


def _linear_block(module: Any) -> int | None:
    """Rows of products of n = 2 .. 512 rows against the same rows computed in products of two
    (the path a lone row takes, padded), on plain random inputs and on inputs whose sums cancel,
    the rows cut into products of n at two alignments -- as the batch-invariant forward cuts a
    prompt chunk into blocks. A kernel that accumulates another way for more rows shows only
    where the rounding to the dtype lands on the other side (bf16 on an Intel Xeon without
    AVX512-BF16: 1 row in ~150 of 4-row products differs from 2-row ones, neither the first nor
    the last of a 512-row product), so every row of the products is compared, at least
    ``_PROBE_CHECKED`` rows per size (more when one product is longer)."""
    w, bias = module.weight, module.bias
    gen = torch.Generator().manual_seed(0)
    functional = torch.nn.functional.linear
    top = max(_PROBE_ROWS) + 2               # room for one product of the largest size at either alignment
    # magnitudes spread over 2^-12 .. 2^12: sums that cancel, where the order of the
    # accumulation shows in the rounded result
    scale = torch.exp2(torch.randint(-12, 13, (top, w.shape[1]), generator=gen).float())
    inputs = [torch.randn(top, w.shape[1], generator=gen) * s for s in (torch.ones(1), scale)]
    with torch.inference_mode():
        xs = [x.to(w.device, w.dtype) for x in inputs]
        pairs = [torch.cat([functional(x[i:i + 2], w, bias)[:1] for i in range(top - 1)]) for x in xs]

        def same(n: int, x: torch.Tensor, want: torch.Tensor, first: int) -> bool:
            # whole products of n rows from row `first`: at least _PROBE_CHECKED rows, within x
            end = min(first + -(-_PROBE_CHECKED // n) * n, first + (top - 1 - first) // n * n)
            got = torch.cat([functional(x[i:i + n], w, bias) for i in range(first, end, n)])
            return torch.equal(got, want[first:end])

        good = 0
        for n in _PROBE_ROWS:
            if not all(same(n, x, want, first) for x, want in zip(xs, pairs) for first in (0, 1)):
                break
            good = n
    return next((b for b in ROW_BLOCKS if b <= good), None)


_ROWS = threading.local()


def make_rows_invariant(model: Any) -> None:
    """Make every linear layer of ``model`` compute its product in blocks of at most
    ``row_block(model)`` rows, a lone row padded to two (the row twice), while
    :func:`invariant_rows` is active on this thread: then each row is computed by the kernel
    path every other product of its rows takes, whatever shares the forward. Other callers of
    the model (HF generate) are unaffected."""
    from .forward import unbound_forward

    if getattr(model, "_specrag_rows_invariant", False):
        return
    block = row_block(model)
    if block is None:
        raise ValueError("this model's matmuls are not row-invariant on this machine")

    def patched(prev: Any) -> Any:
        # prev: what the layer did before (torch's product, or our kernel's patch, which acts
        # only inside its own pooled forwards), unbound so that a deep copy's layer calls it on
        # itself: taken when invariant_rows is off
        def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
            if not getattr(_ROWS, "on", False):
                return prev(self, x)
            return _blocks(self, x, block)
        return forward

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = types.MethodType(patched(unbound_forward(module)), module)
    model._specrag_rows_invariant = True


def _blocks(layer: torch.nn.Linear, x: torch.Tensor, block: int) -> torch.Tensor:
    """``layer``'s product in blocks of at most ``block`` rows, a lone row padded to two."""
    functional = torch.nn.functional.linear
    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    if 2 <= m <= block:
        out = functional(flat, layer.weight, layer.bias)
    else:
        parts = []
        for i in range(0, m, block):
            piece = flat[i:i + block]
            if piece.shape[0] == 1:
                parts.append(functional(torch.cat([piece, piece]), layer.weight, layer.bias)[:1])
            else:
                parts.append(functional(piece, layer.weight, layer.bias))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class invariant_rows:
    """Context: linear layers of models prepared by :func:`make_rows_invariant` compute in
    blocks of rows (see there)."""

    def __enter__(self) -> None:
        _ROWS.on = True

    def __exit__(self, *exc: Any) -> None:
        _ROWS.on = False
