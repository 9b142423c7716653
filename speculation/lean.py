"""The lean forward: a Llama model's pooled forward as one loop over its layers, on our kernels.

Through transformers, a one-token fp32 forward of SmolLM2 (30 layers) runs ~1000 torch
operators and ~450 module calls around 211 matrix products; on a 2-core AMD EPYC they cost
~30 ms of a 68 ms decode forward, as much as the products. This loop computes the same model
with per layer: two calls of ``csrc/layer_f32.c`` (residual add + RMSNorm; rotary embedding +
KV write), our attention kernel, the seven linear layers on our fp32 kernel, and the MLP's
activation in torch (``act_fn(gate) * up``, as the model defines it).

It runs every pooled forward whose rows are all chains (:class:`speculation.forward.PooledModel`;
draft trees keep transformers' path), with the products routed as there: decode and draft rows
on our kernel, long prompt chunks on torch's GEMM (as fast as ours from ~100 rows on), except in
the batch-invariant forward, where everything is ours. Every token is computed alike whatever shares its forward (per-token C,
per-row products, per-token attention), so speculative output stays bitwise the plain output.
Its logits differ from transformers' path in the last bits only (the RMSNorm's reduction order),
which the engine's tests compare against Hugging Face ``generate`` with the near-tie rule.

Models: ``LlamaForCausalLM`` in fp32 on a CPU (SmolLM2, Llama, TinyLlama), default rotary
embeddings, no attention bias; anything else keeps transformers' path (``why_not`` says why).
"""

from __future__ import annotations

from typing import Any

import torch


def why_not(model: Any) -> str | None:
    """None where the lean forward computes ``model`` exactly as transformers does (up to the
    last bits of its RMSNorm); else the reason."""
    if type(model).__name__ != "LlamaForCausalLM" or not type(model).__module__.startswith("transformers."):
        return f"{type(model).__name__} is not transformers' LlamaForCausalLM"
    cfg = model.config
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        return "the lean forward is fp32 on a CPU"
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        return f"rotary embeddings of type {rope.get('rope_type') or rope.get('type')}"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biases in attention or MLP"
    inner = model.model
    for layer in inner.layers:
        if type(layer).__name__ != "LlamaDecoderLayer" or type(layer.self_attn).__name__ != "LlamaAttention":
            return f"a {type(layer).__name__} layer"
    if getattr(inner.rotary_emb, "attention_scaling", 1.0) != 1.0:
        return "scaled rotary embeddings"
    head_dim = inner.layers[0].self_attn.head_dim
    if head_dim % 2 or head_dim > 512:
        return f"head dimension {head_dim}"
    return None


class LeanLlama:
    """The loop; ``forward`` takes what ``PooledModel.forward`` planned."""

    def __init__(self, model: Any, linear: Any, attention: Any, ops: Any) -> None:
        self.model, self.linear, self.attention, self.ops = model, linear, attention, ops
        inner = model.model
        attn = inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scale = float(attn.scaling)
        self.layers = list(inner.layers)
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.name = f"lean+{ops.name}"

    def _lin(self, module: torch.nn.Linear, x: torch.Tensor, rows: Any = None) -> torch.Tensor:
        """``module(x)``: on our kernel, except the prompt-chunk tokens of ``rows`` (a
        ``_KernelRows``; None: every token ours), which go to torch's GEMM as a whole."""
        if rows is None or rows.fast is None:
            return self.linear.linear(x, module.weight, module.bias, module.weight)
        if not rows.fast.numel():
            return torch.nn.functional.linear(x, module.weight, module.bias)
        out = x.new_empty(x.shape[0], module.weight.shape[0])
        out[rows.fast] = self.linear.linear(x[rows.fast], module.weight, module.bias, module.weight)
        out[rows.slow] = torch.nn.functional.linear(x[rows.slow], module.weight, module.bias)
        return out

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, batch: Any, keep: torch.Tensor,
                rows: Any = None) -> torch.Tensor:
        """ids, positions: [T]; batch: the plan (every row a chain, on the attention kernel);
        keep: the packed indices whose logits are wanted; rows: which tokens' products go to
        torch's GEMM (``_KernelRows``; None: none). Returns [len(keep), vocab] fp32."""
        ops, d = self.ops, self.head_dim
        lin = self._lin
        pool = batch.pool
        slot, pos = batch.slot_idx, batch.pos_idx
        h = torch.nn.functional.embedding(ids, self.embed)             # [T, hidden], a new tensor
        cos, sin = self.rotary(h[None], positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        x = torch.empty_like(h)
        delta = None
        for i, layer in enumerate(self.layers):
            ops.add_rmsnorm(h, delta, layer.input_layernorm.weight, x, layer.input_layernorm.variance_epsilon)
            attn = layer.self_attn
            q = lin(attn.q_proj, x, rows)
            ops.rope_kv(q, lin(attn.k_proj, x, rows), lin(attn.v_proj, x, rows), cos, sin, pool.keys[i],
                        pool.values[i], slot, pos, d)
            a = self.attention(q.view(q.shape[0], -1, d), pool.keys[i], pool.values[i], slot, batch.nvis,
                               self.scale, batch.max_visible)
            ops.add_rmsnorm(h, lin(attn.o_proj, a.view(a.shape[0], -1), rows), layer.post_attention_layernorm.weight,
                            x, layer.post_attention_layernorm.variance_epsilon)
            mlp = layer.mlp
            delta = lin(mlp.down_proj, mlp.act_fn(lin(mlp.gate_proj, x, rows)) * lin(mlp.up_proj, x, rows), rows)
        ops.add_rmsnorm(h, delta, self.norm.weight, x, self.norm.variance_epsilon)
        return lin(self.lm_head, x[keep])              # the kept logit rows: all ours
