"""The batch-invariant forward: a position's logits are the same bits computed alone, inside
a 16-token forward and inside a batch of rows -- where the machine's matmul kernels compute a
row independently of the others (checked first; the test says so when they do not)."""

import copy
import random

import pytest
import torch

from speculation.forward import PooledModel, Row
from speculation.invariant import rows_are_invariant
from tinymodels import tiny_llama


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def model(request):
    m = copy.deepcopy(tiny_llama(seed=0)).to(getattr(torch, request.param))
    if not rows_are_invariant(m):
        pytest.skip(f"{request.param} matmuls on this CPU compute a row differently with other rows beside it: "
                    "the forward cannot be batch-invariant in this dtype here")
    return m


@pytest.fixture(params=["kernel", "torch-ops"])
def attention(request, monkeypatch):
    """The invariant forward's attention: our kernel (speculation/csrc/attention.c, where the CPU
    has AVX-512 or AVX2; in fp32 with the lean loop, speculation/lean.py) or the fixed-chunk
    attention in torch ops (everywhere else, and tree rows)."""
    from speculation import kernels

    if request.param == "kernel":
        if kernels.attention_kernel() is None:
            pytest.skip("the attention kernel needs AVX-512 or AVX2 + FMA and a C compiler; this machine has not both")
    else:
        monkeypatch.setattr(kernels, "attention_kernel", lambda: None)
    return request.param


def test_position_logits_are_bitwise_the_same_alone_in_a_block_and_in_a_batch(model, attention):
    rng = random.Random(0)
    seq = [1] + [rng.randrange(3, 96) for _ in range(300)]
    others = [[1] + [rng.randrange(3, 96) for _ in range(n)] for n in (40, 600, 5)]
    with torch.inference_mode():
        alone = PooledModel(model, 8, invariant=True)
        alone.forward([Row(0, 0, seq[:280], 280)])
        one_by_one = []
        for p in range(280, 296):                       # plain decoding: one token per forward
            one_by_one.append(alone.forward([Row(0, p, [seq[p]], 0)])[0])
        one_by_one = torch.stack(one_by_one)

        block = PooledModel(model, 8, invariant=True)   # verification: 16 tokens in one forward
        block.forward([Row(0, 0, seq[:280], 280)])
        in_block = block.forward([Row(0, 280, seq[280:296], 0)])

        batched = PooledModel(model, 8, invariant=True)  # other rows beside it, other lengths
        batched.forward([Row(3, 0, seq[:280], 280), Row(0, 0, others[0], 0), Row(5, 0, others[1], 0)])
        in_batch = batched.forward([Row(0, len(others[0]), [7, 8, 9], 0), Row(3, 280, seq[280:296], 0),
                                    Row(5, len(others[1]), [11], 0), Row(1, 0, others[2], 0)])[3:3 + 16]
    assert torch.equal(one_by_one, in_block), (one_by_one - in_block).abs().max()
    assert torch.equal(one_by_one, in_batch), (one_by_one - in_batch).abs().max()


def test_a_long_prompt_chunk_computes_every_position_as_decoding_it_alone_does(model, attention):
    """A 600-token prompt in one forward: its early queries skip the key chunks past what they
    may see (``invariant.attention`` groups queries by the chunks they need), and every
    position's logits are still bitwise those of feeding that token alone after its prefix."""
    from speculation import invariant

    rng = random.Random(2)
    seq = [1] + [rng.randrange(3, 96) for _ in range(599)]
    calls = []
    inner = invariant.chunked_attention

    def spy(q, keys, *args):
        calls.append(keys.shape[2])
        return inner(q, keys, *args)

    with torch.inference_mode():
        invariant.chunked_attention = spy
        try:
            whole = PooledModel(model, 2, invariant=True).forward([Row(0, 0, seq, 0)])
        finally:
            invariant.chunked_attention = inner
        alone = PooledModel(model, 2, invariant=True)
        one_by_one = torch.stack([alone.forward([Row(0, p, [seq[p]], 0)])[0] for p in range(len(seq))])
    if attention == "kernel":
        assert not calls, "the chunked attention ran beside the kernel"
    else:
        assert min(calls) < max(calls), "no query skipped a key chunk"
    assert torch.equal(whole, one_by_one), (whole - one_by_one).abs().max()


def test_invariant_attention_is_close_to_sdpa(model, attention):
    """Exactness against HF is checked elsewhere; here: the fixed-chunk attention computes the
    same function as SDPA up to rounding."""
    rng = random.Random(1)
    seq = [1] + [rng.randrange(3, 96) for _ in range(400)]
    with torch.inference_mode():
        ref = PooledModel(model, 2).forward([Row(0, 0, seq, 0)])
        inv = PooledModel(model, 2, invariant=True).forward([Row(0, 0, seq, 0)])
    tol = 0.15 if model.dtype == torch.bfloat16 else 1e-3
    assert (ref - inv).abs().max() < tol


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_speculative_greedy_is_bitwise_the_plain_output(monkeypatch, dtype, attention):
    """The batch-invariant forward on this CPU (bf16 by default where its matmuls allow; fp32 on
    our linear kernel when asked for): every drafter's greedy output equals the no-speculation
    output token for token (no near-tie allowance), alone and 24 in a batch; and HF generate in
    the same dtype agrees up to reported near-ties."""
    import exactness
    from exactness import assert_same_tokens, hf_greedy
    from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
    from tinymodels import TinyTokenizer

    target = copy.deepcopy(tiny_llama(seed=0)).to(getattr(torch, dtype))
    draft = copy.deepcopy(tiny_llama(seed=1)).to(getattr(torch, dtype))
    if not rows_are_invariant(target):
        pytest.skip(f"{dtype} matmuls on this CPU are not row-invariant")
    # bf16: on by default; fp32: asked for (its default is the plain attention)
    engine = SpeculativeEngine(target, TinyTokenizer(96), draft,
                               EngineConfig(batch_invariant=True if dtype == "float32" else None))
    assert engine.batch_invariant
    rng = random.Random(5)
    reqs = []
    for n in range(24):
        prompt = [1] + [rng.randrange(3, 96) for _ in range(rng.randrange(2, 60))]
        oracle = hf_greedy(target, prompt, 40)
        ref = [oracle] if n % 3 == 0 else [oracle[:5] + [7] + oracle[6:]] if n % 3 == 1 else []
        drafters = [("reference",), ("draft_model",), ("reference", "draft_model"), ("prompt_lookup",)][n % 4]
        reqs.append((GenerationRequest(prompt, ref, max_new_tokens=40, drafters=drafters), oracle))
    plain = [engine.generate_one(GenerationRequest(r.prompt_ids, [], max_new_tokens=40, speculate=False)).token_ids
             for r, _ in reqs]
    alone = [engine.generate_one(r).token_ids for r, _ in reqs]
    together = [res.token_ids for res in engine.generate([r for r, _ in reqs])]
    assert alone == plain, f"speculative {dtype} output differs from plain {dtype} output"
    assert together == plain, f"batched speculative {dtype} output differs from plain {dtype} output"
    monkeypatch.setattr(exactness, "NEAR_TIE_LOW_PRECISION", 0.125)      # bf16 spacing at logit scale
    for (r, oracle), got in zip(reqs, plain):
        assert_same_tokens(target, r.prompt_ids, oracle, got, f"{dtype} vs HF generate")


def test_tiled_attention_is_invariant_too(model, monkeypatch):
    """The fixed-tile fallback (for machines whose fp32 kernel is not row-invariant in M) keeps
    the property as well."""
    import speculation.invariant as inv
    from speculation import kernels

    monkeypatch.setattr(kernels, "attention_kernel", lambda: None)
    monkeypatch.setattr(inv, "_BLOCK_INVARIANT", {"cpu": False})
    test_position_logits_are_bitwise_the_same_alone_in_a_block_and_in_a_batch(model, "torch-ops")


def test_row_probe_finds_every_block_size_and_a_rare_odd_row(monkeypatch):
    """``invariant._linear_block`` on a product computed row by row (every size is invariant:
    512) and on one whose products of 4+ rows round one row in 97 differently (the Xeon's bf16
    GEMM: 2), without tripping over its own largest size."""
    from speculation import invariant

    layer = torch.nn.Linear(24, 10).to(torch.bfloat16)
    real = torch.nn.functional.linear

    def row_by_row(x, w, b=None):
        return torch.cat([real(x[i:i + 1], w, b) for i in range(x.shape[0])])

    monkeypatch.setattr(torch.nn.functional, "linear", row_by_row)
    assert invariant._linear_block(layer) == 512

    calls = []

    def odd_rows(x, w, b=None):
        out = row_by_row(x, w, b)
        calls.append(x.shape[0])
        if x.shape[0] >= 4 and len(calls) % 97 == 0:       # value-independent stand-in for rounding
            out[1] = out[1] + 1
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", odd_rows)
    assert invariant._linear_block(layer) == 2


def test_row_probe_result_is_kept_per_machine_and_shape(tmp_path, monkeypatch):
    """``row_block`` probes a CPU layer's shape once per machine: the answer is read back from
    the cache directory by a later process (the in-process memo cleared), the probe is not run
    again; another shape, or another CPU (same model name, other flags), is probed."""
    from speculation import invariant, models

    monkeypatch.setenv("SPECRAG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(invariant, "_ROW_BLOCK", {})
    probed = []
    real = invariant._linear_block

    def counting(module):
        probed.append(tuple(module.weight.shape))
        return real(module)

    monkeypatch.setattr(invariant, "_linear_block", counting)
    model = torch.nn.Sequential(torch.nn.Linear(24, 10), torch.nn.Linear(10, 24, bias=False)).to(torch.bfloat16)
    first = invariant.row_block(model)
    assert first is not None and probed == [(10, 24), (24, 10)]
    assert len(list((tmp_path / "row_block").glob("*.json"))) == 2

    monkeypatch.setattr(invariant, "_ROW_BLOCK", {})          # a new process
    assert invariant.row_block(model) == first and len(probed) == 2

    monkeypatch.setattr(invariant, "_ROW_BLOCK", {})
    assert invariant.row_block(torch.nn.Linear(24, 12).to(torch.bfloat16)) is not None
    assert probed[2:] == [(12, 24)]

    info = models.cpu_info()
    monkeypatch.setattr(invariant, "_ROW_BLOCK", {})
    monkeypatch.setattr(models, "cpu_info", lambda: {"model": info["model"], "flags": info["flags"] | {"avx9"}})
    invariant.row_block(model)
    assert probed[3:] == [(10, 24), (24, 10)]
