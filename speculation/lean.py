"""The lean forward: a Llama model's pooled forward as one loop over its layers, on our kernels.

Through transformers, a one-token fp32 forward of SmolLM2 (30 layers) runs ~1000 torch
operators and ~450 module calls around 211 matrix products; on a 2-core AMD EPYC they cost
~30 ms of a 68 ms decode forward, as much as the products. This loop computes the same model
with per layer: two calls of ``csrc/layer.c`` (residual add + RMSNorm; rotary embedding +
KV write), our attention kernel, the seven linear layers in four calls of our fp32 kernel (the
query, key and value projections in one, gate and up in one: one parallel region each, the next
weight's prefetch running on from the last), and the MLP's activation (SiLU(gate) * up in
``csrc/lean.c``; another activation in torch, as the model defines it).

Even so, the loop in Python cost ~7 ms of a 36 ms decode forward on that EPYC (ctypes calls,
slices, views). Where every token of a forward is on our kernels (decode and draft rows; the
batch-invariant forward), the whole loop runs in one call of ``csrc/lean.c``, which calls
the same kernels' C functions with the same arguments in the same order (function pointers of
the loaded builds): bitwise the Python loop's result in a quarter less time for a one-token
decode (26.5 against 35.1 ms at a 700-token context on that EPYC, interleaved medians), 11% less
for 16 rows of one token (80 against 90 ms).

It runs every pooled forward on the attention kernel, draft trees included
(:class:`speculation.forward.PooledModel`), with the products routed as there:
decode and draft rows on our kernel, long prompt chunks on torch's GEMM (as fast as ours from
~100 rows on), except in the batch-invariant forward, where everything is ours. There a token is
computed alike whatever shares its forward (per-token C, per-row products, per-token attention,
per-element activation), so speculative output stays bitwise the plain output. Outside it
(fp32 by default), prompt chunks on torch's GEMM and tree forwards on transformers' path round
differently, so equality with plain output is up to fp32 near-ties, as before.
Its logits differ from transformers' path in the last bits only (the RMSNorm's reduction order),
which the engine's tests compare against Hugging Face ``generate`` with the near-tie rule.

bf16 (where our bf16 linear kernel builds: AVX512-BF16) runs the same loop, in C too (the AVX-512
build of ``csrc/lean.c``), with the layer operations rounded where transformers' bf16 modules
round (``csrc/layer.c``: the residual add, the normalised row cast to bf16 and then times the
weight, the rotary embedding's products and sum; the SiLU rounded to bf16 before its product with
up) and the products on the packed bf16 kernel (q / k / v and gate / up one call each). Its
logits are transformers' path's but where the RMSNorm's sum of squares (in another order) or the
SiLU (another exp) rounds a value the other way: in bf16 that moved SmolLM2's logits by up to 0.5
(tests compare against HF ``generate`` with the bf16 near-tie rule). On a 2-core AMD EPYC with
AVX512-BF16, SmolLM2 at a 700-token context, fastest of 12 in two runs, transformers' path ->
the C loop: decode 19.2-19.4 -> 9.4-10.0 ms (15.6-16.6 in other runs), 8-token verification
23.2-23.7 -> 13.5-14.0, 8 rows 25.2-26.8 -> 14.8-16.0, 16 rows 36.5-37.2 -> 25.0-26.0, 16 rows
x 2 tokens 54.7-55.8 -> 42.7-43.3.

Models: transformers' ``LlamaForCausalLM`` in fp32 or bf16 on a CPU (SmolLM2, Llama, TinyLlama), built
of its own module types without hooks, rotary embeddings other than dynamic / longrope; anything
else keeps transformers' path (``why_not`` says why).
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import torch

from .forward import _version, packed_weight


def why_not(model: Any) -> str | None:
    """None where the lean forward computes ``model`` exactly as transformers does (up to the
    last bits of its RMSNorm); else the reason. It reads the weights of transformers' own Llama
    modules and calls none of their forwards: a module of another type (a LoRA adapter's layer,
    a quantized linear) or a hook on one (which would change what it computes) keeps
    transformers' path. Hooks on the model itself are not called by pooled forwards either way
    (count forwards with the engine's ``stats.target_forwards``)."""
    if type(model).__name__ != "LlamaForCausalLM" or not type(model).__module__.startswith("transformers."):
        return f"{type(model).__name__} is not transformers' LlamaForCausalLM"
    cfg = model.config
    param = next(model.parameters())
    if param.dtype not in (torch.float32, torch.bfloat16) or param.device.type != "cpu":
        return "the lean forward is fp32 or bf16 on a CPU"
    # transformers' rotary module computes cos / sin for the positions (linear, llama3, yarn
    # scaling and attention_scaling included); types whose frequencies depend on the whole call
    # are left to it
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in ("dynamic", "longrope"):
        return f"rotary embeddings of type {kind}"
    inner = model.model
    if len(inner.layers) != cfg.num_hidden_layers:
        return "a model whose layers are not its config's"
    kinds = {"LlamaDecoderLayer": inner.layers, "LlamaRMSNorm": [inner.norm]}
    for layer in inner.layers:
        kinds.setdefault("LlamaAttention", []).append(layer.self_attn)
        kinds.setdefault("LlamaMLP", []).append(layer.mlp)
        kinds["LlamaRMSNorm"] += [layer.input_layernorm, layer.post_attention_layernorm]
        kinds.setdefault("Linear", []).extend([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                               layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                                               layer.mlp.down_proj])
    kinds["Linear"].append(model.lm_head)
    kinds["Embedding"] = [inner.embed_tokens]
    for name, modules in kinds.items():
        for m in modules:
            if type(m).__name__ != name:
                return f"a {type(m).__name__} where transformers' Llama has a {name}"
    for m in inner.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"a hook on its {type(m).__name__}"
    if model.lm_head._forward_hooks or model.lm_head._forward_pre_hooks:
        return "a hook on its LM head"
    head_dim = inner.layers[0].self_attn.head_dim
    if head_dim % 2 or head_dim > 512:
        return f"head dimension {head_dim}"
    return None


class LeanLlama:
    """The loop; ``forward`` takes what ``PooledModel.forward`` planned."""

    def __init__(self, model: Any, linear: Any, attention: Any, ops: Any, loop: Any = None) -> None:
        """``loop``: the loaded ``csrc/lean.c`` (``kernels.lean_kernel()``) or None: the layer
        loop in C where every token is on our kernels, and the MLP's SiLU in C everywhere."""
        self.linear, self.attention, self.ops = linear, attention, ops
        inner = model.model
        attn = inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        # per layer, the modules in the order the loop uses them (their weights are read at
        # every forward, so the loop computes the model as it is then)
        self.layers = [(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,),
                        layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj),
                        (layer.mlp.down_proj,), layer.mlp.act_fn)
                       for layer, attn in ((layer, layer.self_attn) for layer in inner.layers)]
        self.q_width = attn.q_proj.out_features
        self.kv_width = attn.k_proj.out_features
        self.inter = inner.layers[0].mlp.gate_proj.out_features
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = (model.lm_head,)
        # the MLP's activation in C (csrc/lean.c) where it is SiLU (Llama's), and with it
        # the whole layer loop in C for forwards that are all on our kernels
        act = inner.layers[0].mlp.act_fn
        silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
        self.dtype = self.embed.dtype
        self.loop = loop if silu and all(layer.mlp.act_fn is act or type(layer.mlp.act_fn) is type(act)
                                         for layer in inner.layers) and (
            loop is None or self.dtype == torch.float32 or loop.bf16) else None
        self.name = f"lean+{ops.name}" + (f"+{self.loop.name}" if self.loop is not None else "")
        # what the C loop reads, per layer in its order (csrc/lean.c, specrag_lean_layers)
        self._w_modules = [m for n1, qkv, o, n2, gu, dn, _ in self.layers for m in (n1, *qkv, *o, n2, *gu, *dn)]
        self._w_modules.append(self.norm)
        self._b_modules = [m for _, qkv, o, _, gu, dn, _ in self.layers for m in (*qkv, *o, *gu, *dn)]
        self._w_shapes = [tuple(m.weight.shape) for m in self._w_modules]
        self._eps = (ctypes.c_float * (2 * len(self.layers) + 1))(
            *[e for n1, _, _, n2, *_ in self.layers for e in (n1.variance_epsilon, n2.variance_epsilon)],
            self.norm.variance_epsilon)
        self._dims = (ctypes.c_int64 * 5)(inner.layers[0].input_layernorm.weight.shape[0], self.q_width,
                                          self.kv_width, self.inter, self.head_dim)
        self._kernels = self.loop.entry_points(linear, attention, ops) if self.loop is not None else None
        self._w_params = [m._parameters for m in self._w_modules]
        self._b_params = [m._parameters for m in self._b_modules]
        self._checked: list[int] = []          # the weights' addresses the arrays below hold
        self._kv: list[int] = []
        self._wts = self._bias = self._keys = self._values = None

    def _lin(self, modules: tuple[torch.nn.Linear, ...], x: torch.Tensor, rows: Any = None) -> torch.Tensor:
        """``torch.cat([m(x) for m in modules], -1)``: one call of our kernel for all of them
        (the query, key and value projections share their input, as do gate and up), except the
        prompt-chunk tokens of ``rows`` (a ``_KernelRows``; None: every token ours), which go
        to torch's GEMM as a whole."""
        weights = [m.weight for m in modules]
        biases = [m.bias for m in modules]

        # bf16: each weight as the kernel reads it, packed once
        packed = [packed_weight(m, self.linear) for m in modules] if self.linear.packed else weights

        def ours(xs: torch.Tensor) -> torch.Tensor:
            if len(weights) == 1:
                return self.linear.linear(xs, weights[0], biases[0], packed[0])
            return self.linear.linear_multi(xs, weights, biases, packed)

        def theirs(xs: torch.Tensor) -> torch.Tensor:
            outs = [torch.nn.functional.linear(xs, w, b) for w, b in zip(weights, biases)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

        return ours(x) if rows is None else rows.route(x, ours, theirs)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: Any, keep: torch.Tensor,
                rows: Any = None) -> torch.Tensor:
        """ids, positions: [T]; batch: the plan (on the attention kernel; ``batch.tree``: tree nodes);
        keep: the packed indices whose logits are wanted; rows: which tokens' products go to
        torch's GEMM (``_KernelRows``; None: none). Returns [len(keep), vocab] fp32 (a bf16
        model's logits cast up, as transformers' path does)."""
        ops, d = self.ops, self.head_dim
        lin = self._lin
        pool = batch.pool
        slot, pos = batch.slot_idx, batch.pos_idx
        nq, nkv = self.q_width, self.kv_width
        h = torch.nn.functional.embedding(ids, self.embed)             # [T, hidden], a new tensor
        cos, sin = self.rotary(h[None], positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        if self.loop is not None and (rows is None or rows.fast is None):
            # every token on our kernels: the whole loop in one call of C
            x = self._layers_in_c(h, batch, cos, sin)
            return lin(self.head, x[keep]).float()
        x = torch.empty_like(h)
        delta = None
        silu_mul = self.loop.silu_mul if self.loop is not None else None
        for i, (norm1, qkv, o_proj, norm2, gate_up, down, act) in enumerate(self.layers):
            ops.add_rmsnorm(h, delta, norm1.weight, x, norm1.variance_epsilon)
            y = lin(qkv, x, rows)                                       # [T, q | k | v]
            q = y[:, :nq]
            ops.rope_kv(q, y[:, nq:nq + nkv], y[:, nq + nkv:], cos, sin, pool.keys[i], pool.values[i], slot, pos, d)
            a = self.attention(q.view(q.shape[0], -1, d), pool.keys[i], pool.values[i], slot, batch.nvis,
                               self.scale, batch.max_visible, batch.tree)
            ops.add_rmsnorm(h, lin(o_proj, a.view(a.shape[0], -1), rows), norm2.weight, x, norm2.variance_epsilon)
            g = lin(gate_up, x, rows)                                   # [T, gate | up]
            delta = lin(down, silu_mul(g) if silu_mul else act(g[:, :self.inter]) * g[:, self.inter:], rows)
        ops.add_rmsnorm(h, delta, self.norm.weight, x, self.norm.variance_epsilon)
        return lin(self.head, x[keep]).float()      # the kept logit rows: all ours

    def _layers_in_c(self, h: torch.Tensor, batch: Any, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The layers and the final norm through ``specrag_lean_layers``: the weights as they are
        now (their addresses read at every forward; checked whenever one moved -- a new
        parameter, new data for one --, since C reads them without bounds), the pool's layers
        where they are now."""
        ws = list(map(dict.get, self._w_params, itertools.repeat("weight")))
        bs = list(map(dict.get, self._b_params, itertools.repeat("bias")))
        now = list(map(torch.Tensor.data_ptr, ws)) + [b.data_ptr() if b is not None else 0 for b in bs]
        if self.linear.packed:        # bf16: C reads packed copies, made again when a weight changes in place
            now += list(map(_version, ws))
        if now != self._checked:
            # another tensor somewhere (a new parameter, or new data for one): check them all
            kind = "fp32" if self.dtype == torch.float32 else "bf16"
            for w, shape in zip(ws, self._w_shapes):
                if tuple(w.shape) != shape or w.dtype != self.dtype or not w.is_contiguous() or w.device.type != "cpu":
                    raise ValueError(f"the lean forward needs contiguous {kind} CPU weights of shape {shape}, "
                                     f"got {tuple(w.shape)} {w.dtype} on {w.device}")
            for m, b in zip(self._b_modules, bs):
                if b is not None and (tuple(b.shape) != (m.out_features,) or b.dtype != self.dtype
                                      or not b.is_contiguous() or b.device.type != "cpu"):
                    raise ValueError(f"the lean forward needs contiguous {kind} CPU biases of shape ({m.out_features},)")
            wts = now[:len(ws)]
            if self.linear.packed:
                wts = [packed_weight(m, self.linear).data_ptr() if isinstance(m, torch.nn.Linear) else ptr
                       for m, ptr in zip(self._w_modules, wts)]
            self._wts = (ctypes.c_void_p * len(ws))(*wts)
            self._bias = (ctypes.c_void_p * len(bs))(*[p or None for p in now[len(ws):len(ws) + len(bs)]])
            self._checked = now
        n = len(self.layers)
        pool = batch.pool
        kv = list(map(torch.Tensor.data_ptr, pool.keys[:n])) + list(map(torch.Tensor.data_ptr, pool.values[:n]))
        if kv != self._kv:             # the pool grew (new tensors)
            self._keys = (ctypes.c_void_p * n)(*kv[:n])
            self._values = (ctypes.c_void_p * n)(*kv[n:])
            self._kv = kv
        k0 = pool.keys[0]
        return self.loop.layers(self._kernels, n, h, self._dims, self._wts, self._bias,
                                self._eps, self._keys, self._values, (k0.stride(0), k0.stride(1)),
                                batch.slot_idx.contiguous(), batch.pos_idx.contiguous(), batch.nvis.contiguous(),
                                batch.max_visible, self.scale, cos, sin, batch.tree)
