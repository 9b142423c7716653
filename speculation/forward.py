"""One target forward over the ragged rows of many sequences, reading and writing a KV pool.

The rows are packed into one sequence of tokens (no padding in the linear layers, which are most
of the cost); each token carries its own position id, so rotary embeddings are per row. The
attention is ours, registered with transformers' ``AttentionInterface``: per layer it writes the
new keys and values into each row's slot at its positions, then attends each row to its own
slot only -- the cached prefix plus its new tokens, causally, or along a tree (``Row.parents``:
each token sees the prefix and its ancestors, at the position of its depth). Short rows
(decode tokens + drafts) are attended together in padded calls, one per run of length buckets
(merged where one call costs less than several); a long row (a prompt chunk) alone. Padding
never attends and is never attended: it is masked out and its output dropped.

The model keeps working for everybody else: a call without our batch metadata (Hugging Face
``generate``, the tests' oracle) goes to the SDPA attention the model had.
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass
from typing import Any

import torch

from .kv import KVPool

ATTENTION_NAME = "specrag_pool"
_BATCH_KWARG = "specrag_batch"
SHORT_ROW = 32          # rows up to this many tokens share one padded attention call


def tree_depths(parents: list[int]) -> list[int]:
    """Each node's depth in a tree given parents-first (``parents[i]`` < ``i``; -1: a root),
    roots at depth 1."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


@dataclass
class Row:
    """What one sequence feeds into a forward: ``tokens`` at positions ``start`` onwards of its
    ``slot``; logits are wanted from token index ``logits_from`` on (``len(tokens)``: none)."""

    slot: int
    start: int
    tokens: list[int]
    logits_from: int
    # a tree of tokens: token i's parent among the row's tokens (-1: the cached prefix only).
    # Token i is stored at position start + i and attends to the prefix and its ancestors; its
    # rotary position is start + (its depth - 1). None: a chain (parent i - 1).
    parents: list[int] | None = None

    def positions(self) -> list[int]:
        """The rotary position of each token."""
        if self.parents is None:
            return list(range(self.start, self.start + len(self.tokens)))
        return [self.start + d - 1 for d in tree_depths(self.parents)]

    def paths(self) -> list[list[int]]:
        """Each token's path among the row's tokens: its ancestors, root first, then itself."""
        out: list[list[int]] = []
        for i, p in enumerate(self.parents if self.parents is not None else range(-1, len(self.tokens) - 1)):
            out.append((out[p] if p >= 0 else []) + [i])
        return out

    def visible(self) -> torch.Tensor:
        """[n, n] bool: token i sees token j of the row (j is i or an ancestor of i)."""
        n = len(self.tokens)
        if self.parents is None:
            return torch.ones(n, n, dtype=torch.bool).tril()
        vis = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                vis[i] = vis[p]
            vis[i, i] = True
        return vis


# A padded attention call over `span` slots and `kv_len` positions costs about
# span * kv_len * (ATTN_CALL_TOKENS + t_max): reading the slots' keys and values is worth a few
# query tokens per row (measured with SDPA on 2 CPU cores, 16 slots x 900 positions: 2.0 ms at
# 1 token per row, 2.1 at 2, 3.1 at 4, 5.3 at 8). It decides which length buckets share a call.
ATTN_CALL_TOKENS = 4


def _short_groups(rows: list[Row]) -> list[list[int]]:
    """The short rows (<= SHORT_ROW tokens) partitioned into padded attention calls: bucketed by
    length (1, 2, 3-4, 5-8, ...), then neighbouring buckets merged where one call is cheaper than
    several. Separate calls each read every slot in their range, so decode rows and drafts
    scattered over the pool are cheaper in one call padded to the longest; a lone long draft
    beside many decode rows stays apart, so that it does not pad them all to its length."""
    buckets: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if len(r.tokens) <= SHORT_ROW:
            buckets.setdefault((len(r.tokens) - 1).bit_length(), []).append(i)
    order = [buckets[b] for b in sorted(buckets)]

    def cost(members: list[int]) -> int:
        span = max(rows[i].slot for i in members) - min(rows[i].slot for i in members) + 1
        kv_len = max(rows[i].start + len(rows[i].tokens) for i in members)
        return span * kv_len * (ATTN_CALL_TOKENS + max(len(rows[i].tokens) for i in members))

    # cheapest partition of the ordered buckets into runs: best[j] covers buckets [0, j)
    best: list[tuple[int, list[list[int]]]] = [(0, [])]
    for j in range(1, len(order) + 1):
        options = []
        for i in range(j):
            run = [m for b in order[i:j] for m in b]
            options.append((best[i][0] + cost(run), best[i][1] + [run]))
        best.append(min(options, key=lambda o: o[0]))
    return [sorted(run) for run in best[-1][1]]


@dataclass
class _Group:
    lo: int                      # slot range [lo, hi) read by this attention call
    hi: int
    kv_len: int
    t_max: int
    packed: torch.Tensor         # [n] packed token indices of the group's tokens
    padded: torch.Tensor         # [n] their flat index in the [hi - lo, t_max] padded layout
    mask: torch.Tensor           # [hi - lo, 1, G * t_max, kv_len] bool, True = attend
    # the padded layout is the packed tokens as they are (one group holding every token, no
    # padding, slots in order): no scatter into it, no gather out of it
    whole: bool = False
    # every query attends to every position (a lone decode token): no mask
    full: bool = False


@dataclass
class _Batch:
    pool: KVPool
    slot_idx: torch.Tensor       # [T] slot of every packed token
    pos_idx: torch.Tensor        # [T] its position
    groups: list[_Group]
    invariant: bool = False      # attention that does not depend on the batch (speculation/invariant.py)
    # one row: its tokens go to positions [start, start + T) of one slot, a slice of the pool
    span: tuple[int, int, int] | None = None     # (slot, start, end)
    # our attention kernel (speculation/kernels.py) where it computes this forward (token t sees
    # positions [0, nvis[t]) of its slot; a tree node, its prefix then ``tree``'s ancestors), else None
    attention: Any = None
    nvis: torch.Tensor | None = None             # [T] pos_idx + 1 (a tree node: prefix + depth)
    max_visible: int = 0
    tree: torch.Tensor | None = None             # draft-tree nodes' positions (kernels.tree_positions)


def _pool_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    batch: _Batch | None = kwargs.get(_BATCH_KWARG)
    if batch is None:     # someone else's forward (HF generate): the attention the model had
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layer = module.layer_idx
    pool = batch.pool
    k_store, v_store = pool.keys[layer], pool.values[layer]
    # query/key/value: [1, heads, T, D] over the packed tokens
    if batch.span is not None:           # one row: a slice copy instead of a scatter
        slot, start, end = batch.span
        k_store[slot, :, start:end] = key[0].to(k_store.dtype)
        v_store[slot, :, start:end] = value[0].to(v_store.dtype)
    else:
        k_store[batch.slot_idx, :, batch.pos_idx] = key[0].transpose(0, 1).to(k_store.dtype)
        v_store[batch.slot_idx, :, batch.pos_idx] = value[0].transpose(0, 1).to(v_store.dtype)
    q_packed = query[0].transpose(0, 1)                       # [T, Hq, D]
    if batch.attention is not None:     # PooledModel checked the model's geometry against it
        out = batch.attention(q_packed, k_store, v_store, batch.slot_idx, batch.nvis,
                              scaling if scaling is not None else query.shape[-1] ** -0.5, batch.max_visible,
                              batch.tree)
        return out.unsqueeze(0), None
    n_tokens, hq, d = q_packed.shape
    hkv = k_store.shape[1]
    g = hq // hkv
    out = query.new_empty(n_tokens, hq, d)
    for grp in batch.groups:
        b = grp.hi - grp.lo
        # heads kv-major (query head h reads kv head h // g), the g query heads of a kv head
        # folded into the query length: no copy of the cache for grouped-query attention
        if grp.whole:
            q = query[0].reshape(hkv, g, b, grp.t_max, d).permute(2, 0, 1, 3, 4).reshape(b, hkv, g * grp.t_max, d)
            q = q.contiguous()
        else:
            q = query.new_zeros(b * grp.t_max, hq, d)
            q[grp.padded] = q_packed[grp.packed]
            q = q.view(b, grp.t_max, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * grp.t_max, d)
        if batch.invariant:
            from .invariant import KV_CHUNK, attention

            # whole chunks of the pool (its length is a multiple of the chunk): no padding copies
            span = min(-(-grp.kv_len // KV_CHUNK) * KV_CHUNK, k_store.shape[2])
            mask = grp.mask
            if span > grp.kv_len:
                mask = torch.nn.functional.pad(mask, (0, span - grp.kv_len), value=False)
            o = attention(q, k_store[grp.lo:grp.hi, :, :span], v_store[grp.lo:grp.hi, :, :span], mask,
                          scaling if scaling is not None else d ** -0.5)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k_store[grp.lo:grp.hi, :, :grp.kv_len], v_store[grp.lo:grp.hi, :, :grp.kv_len],
                attn_mask=None if grp.full else grp.mask, scale=scaling)
        o = o.view(b, hkv, g, grp.t_max, d).permute(0, 3, 1, 2, 4).reshape(b * grp.t_max, hq, d)
        if grp.whole:
            return o.contiguous().unsqueeze(0), None
        out[grp.packed] = o[grp.padded]
    return out.unsqueeze(0), None


# Which packed tokens of the running pooled forward go through our linear kernel (this thread's;
# unset outside PooledModel.forward, so every other caller of the model gets torch's kernels)
_LINEAR = threading.local()


@dataclass
class _KernelRows:
    total: int                   # tokens the forward packs
    fast: torch.Tensor | None    # packed indices on our kernel (None: every token; empty: none)
    slow: torch.Tensor | None    # the rest, prompt chunks, on torch's (None when fast is)

    def route(self, x: torch.Tensor, ours: Any, theirs: Any) -> torch.Tensor:
        """A product of the packed tokens ``x`` [total, K]: ``ours`` for the fast tokens,
        ``theirs`` for the prompt chunks' (each called once, on its rows), put back in order."""
        if self.fast is None:
            return ours(x)
        if not self.fast.numel():
            return theirs(x)
        a, b = ours(x[self.fast]), theirs(x[self.slow])
        out = a.new_empty(x.shape[0], a.shape[-1])
        out[self.fast] = a
        out[self.slow] = b
        return out


def _version(t: torch.Tensor) -> int:
    """The tensor's in-place modification counter (-1 for an inference tensor, which has none
    and cannot be modified outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _use_linear_kernel(model: Any, kernel: Any) -> None:
    """Route ``model``'s linear layers of the kernel's dtype through ``kernel`` inside pooled
    forwards (other callers, and other patches' switches, get what the layer did before): the
    tokens of decode and draft rows (at most SHORT_ROW each) always, so a generated token's
    products never depend on what shares its forward; long prompt chunks stay on torch's GEMM,
    which is as fast as ours from ~100 rows on. Logits (the LM head over the kept positions)
    are all ours."""
    if getattr(model, "_specrag_linear_kernel", None) == kernel.name:
        return

    def patched(prev: Any) -> Any:
        # prev: what the layer did before (torch's product, or another patch's, which acts
        # only under its own switch), unbound so that a deep copy's layer calls it on itself:
        # taken outside this kernel's pooled forwards
        def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
            rows: _KernelRows | None = getattr(_LINEAR, "rows", None)
            if rows is None or self.weight.dtype != kernel.dtype or x.dtype != kernel.dtype:
                return prev(self, x)                                   # not a pooled forward of its dtype
            all_ours = rows.fast is None or x.shape[-2] != rows.total  # every token, or the kept logit rows
            if not all_ours and not rows.fast.numel():
                return prev(self, x)                                   # every token a prompt chunk's
            packed = packed_weight(self, kernel)
            if all_ours:
                return kernel.linear(x, self.weight, self.bias, packed)
            out = rows.route(x.reshape(-1, x.shape[-1]), lambda xs: kernel.linear(xs, self.weight, self.bias, packed),
                             lambda xs: prev(self, xs))
            return out.reshape(*x.shape[:-1], out.shape[-1])
        return forward

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == kernel.dtype:
            if not module.weight.is_contiguous():
                module.weight.data = module.weight.data.contiguous()
            module.forward = types.MethodType(patched(unbound_forward(module)), module)
    model._specrag_linear_kernel = kernel.name


def packed_weight(module: torch.nn.Linear, kernel: Any) -> torch.Tensor:
    """``module``'s weight as ``kernel`` reads it, packed once (again if the weight changed: the
    entry holds the tensor it was packed from, so its address cannot be reused)."""
    key = (module.weight.data_ptr(), _version(module.weight), kernel.name)
    cached = getattr(module, "_specrag_packed", None)
    if cached is None or cached[0] != key:
        cached = module._specrag_packed = (key, kernel.pack(module.weight), module.weight.detach())
    return cached[1]


def unbound_forward(module: Any) -> Any:
    """``module``'s current forward as a function of (module, x): its own function where it is a
    bound method (so that a deep copy's module calls it on itself), else a wrapper of the
    callable (a hook's partial) that ignores the module it is given."""
    fn = getattr(module.forward, "__func__", None)
    if fn is not None:
        return fn
    bound = module.forward
    return lambda _module, x: bound(x)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _pool_attention)
    # HF's own calls (generate) build the mask SDPA wants
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _kv_geometry(config: Any) -> tuple[int, int, int]:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


class PooledModel:
    """A causal LM whose forwards run over a KV pool of ``max_slots`` sequences."""

    def __init__(self, model: Any, max_slots: int, max_length: int | None = None, invariant: bool = False,
                 linear_kernel: str = "auto", lean: bool = True) -> None:
        """``linear_kernel``: "auto" computes fp32 / bf16 linear layers on a CPU with our kernel
        (speculation/kernels.py) where it builds and passes its check; "torch" keeps torch's.
        ``invariant``: the batch-invariant forward (speculation/invariant.py); on our kernel
        its linear layers need no row blocks. ``lean``: run the forwards that are all on our
        kernels through the lean loop (speculation/lean.py) where the model is one it computes."""
        if linear_kernel not in ("auto", "torch"):
            raise ValueError(f"linear_kernel must be 'auto' or 'torch', not {linear_kernel!r}")
        _register()
        self.model = model
        self.invariant = invariant
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kernel = None
        if linear_kernel == "auto":
            from .kernels import kernel_for

            self.kernel = kernel_for(self.dtype, self.device)
            if self.kernel is not None:
                _use_linear_kernel(model, self.kernel)
        # what computes the linear layers: part of the cost curve's key
        self.linear_kernel = self.kernel.name if self.kernel is not None else "torch"
        # attention on our kernel (speculation/kernels.py, AVX-512 or AVX2) for every forward, draft
        # trees and the batch-invariant ones included (it computes every token alike): where
        # it loads, for fp32 and bf16 on a CPU, unless linear_kernel is "torch"
        n_layers, kv_heads, head_dim = _kv_geometry(model.config)
        self.attention = None
        if linear_kernel == "auto":
            from .kernels import AttentionKernel, attention_kernel

            heads = kv_heads * self._query_groups(kv_heads)
            if AttentionKernel.supports(self.dtype, self.device, heads, kv_heads, head_dim):
                self.attention = attention_kernel()
        self.attention_kernel = self.attention.name if self.attention is not None else "torch"
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 4096
        self.pool = KVPool(n_layers, kv_heads, head_dim, self.dtype, self.device, max_slots,
                           max_length or context)
        if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
            try:
                model.set_attn_implementation(ATTENTION_NAME)
            except Exception:  # noqa: BLE001 - older transformers: set it on the config
                model.config._attn_implementation = ATTENTION_NAME
        self._dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        if invariant and self.kernel is None:     # on our kernel every row is computed alike already
            from .invariant import make_rows_invariant

            make_rows_invariant(model)
        self.lean = None
        self._check_attention_is_ours(n_layers)
        # the lean loop (fp32 or bf16 Llama on both our kernels), decided once; checked above through
        # transformers' path, which the forwards it does not take still go through
        if lean and self.kernel is not None and self.attention is not None:
            from .kernels import layer_ops, lean_kernel
            from .lean import LeanLlama, why_not

            why = why_not(model)
            ops = layer_ops() if why is None else None
            if ops is not None:
                self.lean = LeanLlama(model, self.kernel, self.attention, ops, lean_kernel())
        self.forward_path = "lean" if self.lean is not None else "transformers"     # reported by generate --json, /health
        # what the forward's cost depends on beyond the model: its kernels (the cost curve's key)
        self.kernels = f"{self.linear_kernel}+{self.attention_kernel}" + (f"+{self.lean.name}" if self.lean else "")

    def _check_attention_is_ours(self, n_layers: int) -> None:
        """A model whose attention does not go through transformers' attention interface would
        silently ignore the pool: refuse it with a message instead."""
        calls: list[int] = []

        def spy(module: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(module.layer_idx)
            return _pool_attention(module, *args, **kwargs)

        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, spy)
        try:
            with torch.inference_mode():
                self.forward([Row(slot=0, start=0, tokens=[0], logits_from=1)])
        finally:
            AttentionInterface.register(ATTENTION_NAME, _pool_attention)
        if sorted(set(calls)) != list(range(n_layers)):
            raise TypeError(f"{type(self.model).__name__} does not route its attention through transformers' "
                            "AttentionInterface; the batched engine cannot run it")

    def _plan(self, rows: list[Row]) -> tuple[_Batch, list[int], list[int]]:
        for r in rows:
            # our kernels index the pool with these as given: refuse what would land outside it
            if not (0 <= r.slot < self.pool.max_slots and r.start >= 0 and r.tokens and 0 <= r.logits_from <= len(r.tokens)):
                raise ValueError(f"a row must feed >= 1 token at a position >= 0 of a slot in [0, {self.pool.max_slots}) "
                                 f"and want logits from inside it (slot {r.slot}, start {r.start}, "
                                 f"{len(r.tokens)} tokens, logits_from {r.logits_from})")
        slot_idx: list[int] = []
        pos_idx: list[int] = []
        keep: list[int] = []
        offsets: list[int] = []
        for row in rows:
            offsets.append(len(slot_idx))
            keep.extend(len(slot_idx) + i for i in range(row.logits_from, len(row.tokens)))
            slot_idx.extend([row.slot] * len(row.tokens))
            pos_idx.extend(range(row.start, row.start + len(row.tokens)))
        max_visible = max(r.start + len(r.tokens) for r in rows)
        self.pool.ensure(max(r.slot for r in rows) + 1, max_visible)
        chains = all(r.parents is None for r in rows)
        if self.attention is None and self.invariant and not chains:
            # torch's invariant attention takes chains only: a tree node's keys would be summed
            # in another order than plain decoding's, and bitwise equality would be lost
            raise ValueError("the batch-invariant forward on torch's attention takes chains only: verify a draft "
                             "tree as its best path")
        on_kernel = self.attention is not None
        groups: list[_Group] = []
        if not on_kernel:            # the attention calls of torch's operators, with their masks
            hq_per_kv = self._query_groups()
            groups = [self._group(rows, offsets, members, hq_per_kv) for members in _short_groups(rows)]
            groups += [self._group(rows, offsets, [i], hq_per_kv) for i, r in enumerate(rows)
                       if len(r.tokens) > SHORT_ROW]
        dev = self.device
        span = (rows[0].slot, rows[0].start, rows[0].start + len(rows[0].tokens)) if len(rows) == 1 else None
        batch = _Batch(self.pool, torch.tensor(slot_idx, device=dev), torch.tensor(pos_idx, device=dev), groups,
                       self.invariant, span)
        if on_kernel:
            # positions [0, pos + 1) of each token's slot: inside the pool (ensured above); a
            # tree node sees its row's cached prefix, then its ancestors' positions, root first
            batch.attention, batch.nvis, batch.max_visible = self.attention, batch.pos_idx + 1, max_visible
            if not chains:
                from .kernels import tree_positions

                pre: list[int] = []
                ancestors: list[list[int]] = []
                nvis: list[int] = []
                for row in rows:
                    if row.parents is None:
                        ends = range(row.start + 1, row.start + len(row.tokens) + 1)
                        pre.extend(ends)
                        nvis.extend(ends)
                        ancestors.extend([] for _ in ends)
                        continue
                    for path in row.paths():
                        pre.append(row.start)
                        nvis.append(row.start + len(path))
                        ancestors.append([row.start + i for i in path])
                batch.nvis = torch.tensor(nvis, device=dev)
                batch.tree = tree_positions(pre, ancestors)
        return batch, keep, offsets

    def _query_groups(self, kv_heads: int | None = None) -> int:
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return cfg.num_attention_heads // (kv_heads or self.pool.kv_heads)

    def _group(self, rows: list[Row], offsets: list[int], members: list[int], g: int) -> _Group:
        lo = min(rows[i].slot for i in members)
        hi = max(rows[i].slot for i in members) + 1
        t_max = max(len(rows[i].tokens) for i in members)
        kv_len = max(rows[i].start + len(rows[i].tokens) for i in members)
        packed: list[int] = []
        padded: list[int] = []
        # padding queries (and idle slots in the range) see position 0 only: finite, discarded
        mask = torch.zeros(hi - lo, t_max, kv_len, dtype=torch.bool)
        mask[:, :, 0] = True
        for i in members:
            r = rows[i]
            b = r.slot - lo
            n = len(r.tokens)
            packed.extend(range(offsets[i], offsets[i] + n))
            padded.extend(b * t_max + t for t in range(n))
            # query t sees the cached prefix and the new tokens up to itself (its ancestors, in a tree)
            mask[b, :n, :r.start] = True
            mask[b, :n, r.start:r.start + n] = r.visible()
        # every token of the forward, in slot order, each row exactly t_max long (no padding at all)
        whole = len(packed) == sum(len(r.tokens) for r in rows) == (hi - lo) * t_max and packed == padded
        # the batch-invariant attention always takes its mask: a row's result must not depend on
        # whether it was alone
        full = not self.invariant and bool(mask.all())
        mask = mask.unsqueeze(1).expand(hi - lo, g, t_max, kv_len).reshape(hi - lo, 1, g * t_max, kv_len)
        dev = self.device
        return _Group(lo, hi, kv_len, t_max, torch.tensor(packed, device=dev), torch.tensor(padded, device=dev),
                      mask.to(dev), whole, full)

    def _kernel_rows(self, rows: list[Row], total: int) -> _KernelRows:
        """Decode and draft rows on our kernel, prompt chunks (rows past SHORT_ROW) on torch's."""
        if all(len(r.tokens) <= SHORT_ROW for r in rows):
            return _KernelRows(total, None, None)
        fast: list[int] = []
        slow: list[int] = []
        at = 0
        for r in rows:
            (fast if len(r.tokens) <= SHORT_ROW else slow).extend(range(at, at + len(r.tokens)))
            at += len(r.tokens)
        return _KernelRows(total, torch.tensor(fast, dtype=torch.long), torch.tensor(slow, dtype=torch.long))

    def forward(self, rows: list[Row]) -> torch.Tensor:
        """Logits ``[sum of wanted positions, vocab]`` (fp32), rows in order. The KV of every
        fed token is written into its row's slot; the caller keeps the lengths."""
        if len({r.slot for r in rows}) != len(rows):
            raise ValueError("two rows of one forward share a KV slot")
        batch, keep, _ = self._plan(rows)
        ids = torch.tensor([[t for r in rows for t in r.tokens]], device=self.device)
        positions = torch.tensor([[p for r in rows for p in r.positions()]], device=self.device)
        if not keep:
            keep_idx = torch.tensor([0], device=self.device)     # HF needs something; dropped below
        else:
            keep_idx = torch.tensor(keep, device=self.device)
        if self.lean is not None and batch.attention is not None:
            # attention on ours (chains and trees): the lean loop, the products routed as below
            logits = self.lean.forward(ids[0], positions[0], batch, keep_idx,
                                       None if self.invariant else self._kernel_rows(rows, ids.shape[1]))
            return logits if keep else logits[:0]
        inputs = dict(input_ids=ids, position_ids=positions, attention_mask=self._dummy_mask, use_cache=False,
                      logits_to_keep=keep_idx, **{_BATCH_KWARG: batch})
        if self.kernel is not None:
            # batch-invariant: every token on our kernel, prompt chunks included
            _LINEAR.rows = _KernelRows(ids.shape[1], None, None) if self.invariant else self._kernel_rows(rows, ids.shape[1])
            try:
                out = self.model(**inputs)
            finally:
                _LINEAR.rows = None
        elif self.invariant:
            from .invariant import invariant_rows

            with invariant_rows():
                out = self.model(**inputs)
        else:
            out = self.model(**inputs)
        logits = out.logits[0].float()
        return logits if keep else logits[:0]
