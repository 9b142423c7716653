"""The lean forward (speculation/lean.py): a Llama model's pooled forward as one loop over its
layers on our kernels. It computes what transformers' path computes (to fp32 rounding: its
RMSNorm sums in another order), each token bitwise alike whatever shares its forward, for the
forwards it is given (chains of decode and draft rows; everything in the batch-invariant
forward), and stays out of the others; models it does not compute keep transformers' path.
In bf16 (where our bf16 linear kernel builds: AVX512-BF16) the loop runs in Python and rounds
where transformers' bf16 modules round."""

import copy
import random

import pytest
import torch

from speculation import kernels, lean
from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.forward import SHORT_ROW, PooledModel, Row
from exactness import assert_same_tokens, hf_greedy
from tinymodels import TinyTokenizer, tiny_llama


def _needs_kernels():
    if kernels.linear_kernel(torch.float32) is None or kernels.attention_kernel() is None or kernels.layer_ops() is None:
        pytest.skip("the lean forward needs our fp32 linear and attention kernels (AVX-512 or AVX2 + FMA, and a C compiler)")


@pytest.fixture(scope="module")
def model():
    """The tiny seeded Llama with RMSNorm weights and epsilons of their own (the tiny model's are
    1 and 1e-6 everywhere: a swapped norm would go unseen)."""
    _needs_kernels()
    m = copy.deepcopy(tiny_llama(seed=0))
    gen = torch.Generator().manual_seed(11)
    norms = [m.model.norm] + [n for layer in m.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    with torch.no_grad():
        for i, norm in enumerate(norms):
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=gen))
            norm.variance_epsilon = 10.0 ** -(2 + i)
    return m


def _needs_bf16():
    if kernels.linear_kernel(torch.bfloat16) is None:
        pytest.skip("the bf16 lean forward needs our bf16 linear kernel (AVX512-BF16 and a C compiler)")


def _in_dtype(model, dtype):
    """``model`` in ``dtype`` (bf16: where our bf16 kernel and the C loop's bf16 build exist)."""
    if dtype == "bfloat16":
        _needs_bf16()
        if not kernels.lean_kernel().bf16:
            pytest.skip("the C layer loop's bf16 half is in its AVX-512 build only")
        return copy.deepcopy(model).to(torch.bfloat16)
    return model


def _biased():
    """A tiny Llama with attention and MLP biases, 4 query heads per kv head, head dim 64 (the
    attention kernel's unrolled layout) and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=64, max_position_embeddings=512, attention_bias=True,
                      mlp_bias=True, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return m


def _prefill(runner, seqs):
    for slot, seq in enumerate(seqs):
        runner.forward([Row(slot, 0, seq[:60], 60)])


def test_it_takes_every_forward_trees_included(model, monkeypatch):
    runner = PooledModel(model, 4)
    assert runner.lean is not None and "lean" in runner.kernels and runner.forward_path == "lean"
    taken = []
    real = runner.lean.forward
    monkeypatch.setattr(runner.lean, "forward", lambda *a: taken.append(a[0].numel()) or real(*a))
    rng = random.Random(1)
    seq = [1] + [rng.randrange(3, 96) for _ in range(200)]
    with torch.inference_mode():
        runner.forward([Row(0, 0, seq[:100], 99)])                       # a prompt chunk
        runner.forward([Row(0, 100, seq[100:101], 0), Row(1, 0, seq[:SHORT_ROW], 0)])
        assert taken == [100, SHORT_ROW + 1]
        tree = runner.forward([Row(0, 101, seq[101:104], 0, parents=[-1, 0, 0])])   # a tree: ours too
        assert taken == [100, SHORT_ROW + 1, 3]
        # its nodes as transformers' modules compute them (on the same attention kernel)
        lean, runner.lean = runner.lean, None
        again = runner.forward([Row(0, 101, seq[101:104], 0, parents=[-1, 0, 0])])
        runner.lean = lean
    torch.testing.assert_close(tree, again, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["tiny", "biased"])
def test_its_logits_and_kv_are_transformers_paths_to_the_dtypes_rounding(model, which, dtype):
    """fp32: to fp32 rounding, decode and draft rows beside a prompt chunk whose products go to
    torch's GEMM in both. bf16, in the batch-invariant forward (every product ours): bitwise but
    where the RMSNorm's sum of squares (another order) or the SiLU (another exp) rounds a bf16
    value the other way."""
    if which == "biased":
        model = _biased()
    bf16 = dtype == "bfloat16"
    model = _in_dtype(model, dtype)
    rng = random.Random(2)
    seqs = [[1] + [rng.randrange(3, 96) for _ in range(120)] for _ in range(3)]
    ours, theirs = PooledModel(model, 4, invariant=bf16), PooledModel(model, 4, invariant=bf16, lean=False)
    assert ours.lean is not None and ours.forward_path == "lean" and theirs.lean is None
    taken = []
    real = ours.lean.forward
    ours.lean.forward = lambda *a: taken.append(a[0].numel()) or real(*a)
    rows = [Row(0, 60, seqs[0][60:61], 0), Row(1, 60, seqs[1][60:77], 0), Row(2, 60, seqs[2][60:64], 2),
            Row(3, 0, seqs[0][:SHORT_ROW + 40], SHORT_ROW + 39)]
    with torch.inference_mode():
        _prefill(ours, seqs)
        _prefill(theirs, seqs)
        got, want = ours.forward(rows), theirs.forward(rows)
    assert taken == [60, 60, 60, 1 + 17 + 4 + SHORT_ROW + 40]
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (1 + 17 + 2 + 1, 96)
    tol = 0.02 if bf16 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if bf16:
        assert (got == want).float().mean() > 0.9
    for layer in range(len(model.model.layers)):
        for slot, n in ((0, 61), (1, 77), (2, 64), (3, SHORT_ROW + 40)):
            for pool_ours, pool_theirs in ((ours.pool.keys, theirs.pool.keys), (ours.pool.values, theirs.pool.values)):
                assert pool_ours[layer].dtype == model.dtype
                torch.testing.assert_close(pool_ours[layer][slot, :, :n], pool_theirs[layer][slot, :, :n],
                                           rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tokens_logits_are_bitwise_the_same_alone_among_drafts_and_beside_other_rows(model, dtype):
    rng = random.Random(3)
    seqs = [[1] + [rng.randrange(3, 96) for _ in range(100)] for _ in range(4)]
    runner = PooledModel(_in_dtype(model, dtype), 4)
    assert runner.forward_path == "lean"
    with torch.inference_mode():
        _prefill(runner, seqs)
        alone = [runner.forward([Row(0, 60 + i, seqs[0][60 + i:61 + i], 0)]) for i in range(16)]
        block = runner.forward([Row(0, 60, seqs[0][60:76], 0)])
        batch = runner.forward([Row(2, 60, seqs[2][60:63], 0), Row(0, 60, seqs[0][60:76], 0),
                                Row(1, 60, seqs[1][60:61], 0), Row(3, 60, seqs[3][60:69], 0)])
    for i in range(16):
        assert torch.equal(alone[i][0], block[i]), i
        assert torch.equal(alone[i][0], batch[3 + i]), i


def _forced_python_loop(runner, rows):
    """The forward of ``rows`` through the lean loop in Python with every token on our kernels
    (routed as a mixed forward would route them, with no prompt-chunk tokens): what the C loop
    must give bitwise."""
    from speculation.forward import _KernelRows

    batch, keep, _ = runner._plan(rows)
    ids = torch.tensor([t for r in rows for t in r.tokens])
    positions = torch.tensor([p for r in rows for p in r.positions()])
    n = ids.numel()
    return runner.lean.forward(ids, positions, batch, torch.tensor(keep),
                               _KernelRows(n, torch.arange(n), torch.empty(0, dtype=torch.long)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("which", ["tiny", "biased"])
def test_the_layer_loop_in_c_gives_the_python_loops_bits_and_kv(model, which, dtype):
    """csrc/lean.c runs the layers by calling the very kernels the Python loop calls: its
    logits and the KV it writes are bitwise the Python loop's, one row or several, biases and
    4 query heads per kv head included; in fp32 and in bf16 (its packed weights, its SiLU)."""
    if kernels.lean_kernel() is None:
        pytest.skip("the C layer loop did not build here")
    if which == "biased":
        model = _biased()
    model = _in_dtype(model, dtype)
    rng = random.Random(4)
    seqs = [[1] + [rng.randrange(3, 96) for _ in range(120)] for _ in range(3)]
    in_c, in_python = PooledModel(model, 4), PooledModel(model, 4)
    assert in_c.lean.loop is not None and "specrag-lean" in in_c.kernels
    called = []
    real = in_c.lean._layers_in_c
    in_c.lean._layers_in_c = lambda *a: called.append(1) or real(*a)
    for rows in ([Row(0, 60, seqs[0][60:61], 0)],
                 [Row(0, 61, seqs[0][61:77], 0), Row(2, 60, seqs[2][60:61], 0), Row(1, 60, seqs[1][60:64], 1)]):
        with torch.inference_mode():
            if not called:
                _prefill(in_c, seqs)
                _prefill(in_python, seqs)
            got = in_c.forward(rows)
            want = _forced_python_loop(in_python, rows)
        assert torch.equal(got, want)
        for layer in range(len(model.model.layers)):
            assert torch.equal(in_c.pool.keys[layer], in_python.pool.keys[layer])
            assert torch.equal(in_c.pool.values[layer], in_python.pool.values[layer])
    assert len(called) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_c_loop_reads_the_weights_as_they_are_now_and_refuses_ones_it_cannot_read(model, dtype):
    if kernels.lean_kernel() is None:
        pytest.skip("the C layer loop did not build here")
    m = copy.deepcopy(_in_dtype(model, dtype))
    runner = PooledModel(m, 2)
    assert runner.lean.loop is not None
    row = [Row(0, 0, [1, 5, 9], 0)]
    with torch.inference_mode():
        before = runner.forward(row)
    down = m.model.layers[1].mlp.down_proj
    down.weight = torch.nn.Parameter(down.weight * 1.5)           # another tensor: read from now on
    with torch.inference_mode():
        after = runner.forward(row)
        assert not torch.equal(before, after)
        assert torch.equal(after, PooledModel(copy.deepcopy(m), 2).forward(row))
    with torch.no_grad():
        down.weight.mul_(0.5)                                      # the same tensor changed in place
    with torch.inference_mode():
        changed = runner.forward(row)
        assert not torch.equal(changed, after)
        assert torch.equal(changed, PooledModel(copy.deepcopy(m), 2).forward(row))
    down.weight = torch.nn.Parameter(down.weight[:, :-1].clone())  # one column short: refused, not read
    with pytest.raises(ValueError, match=f"contiguous {'fp32' if dtype == 'float32' else 'bf16'} CPU weights"):
        runner.forward(row)


def test_a_model_with_another_activation_keeps_the_python_loop_with_its_own(model):
    from transformers.activations import ACT2FN

    gelu = copy.deepcopy(model)
    for layer in gelu.model.layers:
        layer.mlp.act_fn = ACT2FN["gelu"]
    ours, theirs = PooledModel(gelu, 2), PooledModel(gelu, 2, lean=False)
    assert ours.lean is not None and ours.lean.loop is None
    row = [Row(0, 0, [1, 5, 9, 14], 0)]
    with torch.inference_mode():
        torch.testing.assert_close(ours.forward(row), theirs.forward(row), rtol=1e-4, atol=1e-4)


def test_models_it_does_not_compute_keep_transformers_path(model):
    assert lean.why_not(model) is None
    refused = {}
    refused["fp32 or bf16"] = copy.deepcopy(model).to(torch.float16)
    dynamic = refused["dynamic"] = copy.deepcopy(model)
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    hooked = refused["hook on its Linear"] = copy.deepcopy(model)
    hooked.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: o * 2)

    class Adapter(torch.nn.Linear):      # a module type of someone else's (a LoRA layer, a quantized linear)
        pass

    adapted = refused["Adapter where"] = copy.deepcopy(model)
    old = adapted.model.layers[0].mlp.up_proj
    adapted.model.layers[0].mlp.up_proj = Adapter(old.in_features, old.out_features, bias=False)
    for why, m in refused.items():
        assert why in lean.why_not(m), (why, lean.why_not(m))
        if why != "dynamic":
            assert PooledModel(m, 2).lean is None, why
    assert PooledModel(copy.deepcopy(model), 2, linear_kernel="torch").lean is None
    # a hook on the model itself observes calls only: pooled forwards do not call it either way
    observed = copy.deepcopy(model)
    observed.register_forward_hook(lambda *a: None)
    assert lean.why_not(observed) is None


def test_rows_outside_the_pool_are_refused_before_any_kernel_runs(model):
    runner = PooledModel(model, 2)
    for row in (Row(-1, 0, [3], 0), Row(2, 0, [3], 0), Row(0, -1, [3], 0), Row(0, 0, [], 0), Row(0, 0, [3], 2)):
        with pytest.raises(ValueError, match="a row must feed"):
            runner.forward([row])


@pytest.mark.parametrize("drafters", [("reference",), ("prompt_lookup",)])
def test_the_engine_on_it_gives_hf_generate_and_its_own_plain_output(model, drafters):
    tok = TinyTokenizer(96)
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(3, 96) for _ in range(n)] for n in (7, 40, 90)]
    refs = [[rng.randrange(3, 96) for _ in range(60)] + p[1:30] for p in prompts]
    outs = {}
    for name, cfg in (("spec", EngineConfig(drafters=drafters)), ("plain", EngineConfig(drafters=()))):
        engine = SpeculativeEngine(model, tok, config=cfg)
        assert engine.runner.lean is not None
        reqs = [GenerationRequest(p, max_new_tokens=40, references=[r]) for p, r in zip(prompts, refs)]
        outs[name] = [r.token_ids for r in engine.generate(reqs)]
    for p, spec, plain in zip(prompts, outs["spec"], outs["plain"]):
        assert spec == plain
        assert_same_tokens(model, p, hf_greedy(model, p, 40), spec, "lean forward vs HF generate")


def test_bf16_the_engine_on_it_gives_hf_generate_and_its_own_plain_output(model, monkeypatch):
    import exactness

    _needs_bf16()
    m = copy.deepcopy(model).to(torch.bfloat16)
    tok = TinyTokenizer(96)
    rng = random.Random(14)
    prompts = [[1] + [rng.randrange(3, 96) for _ in range(n)] for n in (7, 40, 90)]
    refs = [[rng.randrange(3, 96) for _ in range(60)] + p[1:30] for p in prompts]
    outs = {}
    for name, cfg in (("spec", EngineConfig(drafters=("reference", "prompt_lookup"))), ("plain", EngineConfig(drafters=()))):
        engine = SpeculativeEngine(m, tok, config=cfg)
        assert engine.batch_invariant and engine.runner.forward_path == "lean"
        reqs = [GenerationRequest(p, max_new_tokens=40, references=[r]) for p, r in zip(prompts, refs)]
        outs[name] = [r.token_ids for r in engine.generate(reqs)]
    assert outs["spec"] == outs["plain"]
    monkeypatch.setattr(exactness, "NEAR_TIE_LOW_PRECISION", 0.125)      # bf16 spacing at logit scale
    for p, plain in zip(prompts, outs["plain"]):
        assert_same_tokens(m, p, hf_greedy(m, p, 40), plain, "bf16 lean forward vs HF generate")
