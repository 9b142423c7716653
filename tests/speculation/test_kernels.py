"""Our linear kernels (speculation/kernels.py): fp32 (AVX-512 or AVX2 + FMA) and bf16 (AMX tiles, else
AVX512-BF16; packed weights). Each gives torch's product to its dtype's rounding, each row bitwise the same whatever
else shares the product; they are used by pooled forwards only (decode and draft rows always,
long prompt chunks on torch's GEMM), and fall back cleanly where they cannot be built."""

import copy
import logging
import os
import random
import shutil

import pytest
import torch

from speculation import kernels
from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.forward import SHORT_ROW, PooledModel, Row
from speculation.models import cpu_info
from tinymodels import TinyTokenizer, tiny_llama

pytestmark = [
    pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                       reason="no C compiler to build the linear kernels (make install adds Debian's gcc as root)"),
]


def _needs(dtype: torch.dtype):
    """``dtype`` as a parameter, skipped where the CPU lacks what every build of its kernel needs."""
    specs = kernels.SPECS[dtype]
    missing = [spec.cpu_flags - cpu_info()["flags"] for spec in specs]
    return pytest.param(dtype, marks=pytest.mark.skipif(
        all(missing), reason=f"the {specs[-1].name} kernel needs {', '.join(sorted(missing[-1]))}, which this CPU lacks"),
        id=str(dtype).removeprefix("torch."))


DTYPES = [_needs(torch.float32), _needs(torch.bfloat16)]


@pytest.fixture(scope="module", params=DTYPES)
def kernel(request):
    k = kernels.linear_kernel(request.param)
    assert k is not None, f"the {request.param} kernel did not build or failed its check on a CPU with its instructions (see the log)"
    assert k.dtype == request.param
    return k


@pytest.mark.parametrize("n,k,bias", [(576, 576, False), (192, 576, True), (50, 1536, False), (37, 29, True)])
def test_product_matches_torch_and_each_row_is_bitwise_independent_of_the_others(kernel, n, k, bias):
    gen = torch.Generator().manual_seed(n * k)
    dt = kernel.dtype
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dt)
    b = torch.randn(n, generator=gen).to(dt) if bias else None
    x = torch.randn(300, k, generator=gen).to(dt)
    packed = kernel.pack(w)
    full = kernel.linear(x, w, b, packed)
    assert full.dtype == dt
    # torch's product in fp32, rounded once to the kernel's dtype: equal to that rounding
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    tol = 1e-4 if dt == torch.float32 else 8e-3      # bf16: ~1 ulp, the fp32 sums differ in order
    torch.testing.assert_close(full.float(), want.to(dt).float(), rtol=tol, atol=tol)
    assert torch.equal(kernel.linear(x, w, b), full)               # packed on the fly: the same
    # a row alone, in products of every size and at every place in them (row blocks included),
    # and read through a strided view: the same bits
    for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 63, 64, 65, 95, 96, 97, 200, 300):
        for start in (0, 300 - m, (300 - m) // 2):
            assert torch.equal(kernel.linear(x[start:start + m], w, b, packed), full[start:start + m]), (m, start)
    wide = torch.zeros(300, k + 3, dtype=dt)
    wide[:, 1:k + 1] = x
    assert torch.equal(kernel.linear(wide[:, 1:k + 1], w, b, packed), full)
    for m in (1, 5, 16, 17):     # AMX: up to 16 rows are read in place (strided here), more are copied
        assert torch.equal(kernel.linear(wide[7:7 + m, 1:k + 1], w, b, packed), full[7:7 + m]), m
    # leading dimensions are kept, like F.linear's
    assert torch.equal(kernel.linear(x[:12].reshape(3, 4, k), w, b, packed), full[:12].reshape(3, 4, n))


@pytest.mark.parametrize("spec", [s for specs in kernels.SPECS.values() for s in specs], ids=lambda s: s.name)
def test_every_build_this_cpu_has_passes_its_check(spec):
    """The kernel a machine loads is the widest it has; the narrower builds (AVX2 on an AVX-512
    machine) are the ones other machines load, so they are built and checked here too."""
    missing = spec.cpu_flags - cpu_info()["flags"]
    if missing:
        pytest.skip(f"{spec.name} needs {', '.join(sorted(missing))}, which this CPU lacks")
    kernel, why = kernels._load(spec, kernels.LinearKernel, kernels._self_check)
    assert why is None and kernel.name.startswith(spec.name + "-")
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(70, 200, generator=gen).to(spec.dtype)
    x = torch.randn(40, 200, generator=gen).to(spec.dtype)
    full = kernel.linear(x, w)
    torch.testing.assert_close(full.float(), torch.nn.functional.linear(x.float(), w.float()).to(spec.dtype).float(),
                               rtol=1e-4 if spec.dtype == torch.float32 else 8e-3, atol=1e-3)
    assert all(torch.equal(kernel.linear(x[i:i + m], w), full[i:i + m]) for m in (1, 3, 4, 5, 7) for i in (0, 40 - m))
    # several weights against one input in one call: each one's columns bitwise its own product
    # (bf16: the packed weights given, or packed in the call)
    ws = [w, torch.randn(13, 200, generator=gen).to(spec.dtype), w[:6].contiguous()]
    bs = [None, torch.randn(13, generator=gen).to(spec.dtype), torch.randn(6, generator=gen).to(spec.dtype)]
    packed = [kernel.pack(a) for a in ws] if kernel.packed else None
    for m in (1, 2, 5, 40, 70):
        xs = torch.randn(m, 200, generator=gen).to(spec.dtype)
        got = kernel.linear_multi(xs, ws, bs, packed)
        assert got.shape == (m, 70 + 13 + 6)
        assert torch.equal(got, torch.cat([kernel.linear(xs, a, b) for a, b in zip(ws, bs)], -1))
        assert torch.equal(kernel.linear_multi(xs, ws, bs), got)


def test_bf16_products_run_on_the_widest_build_and_amx_gives_way_where_the_os_refuses_its_tiles(monkeypatch):
    """A CPU with AMX-BF16 computes bf16 products on AMX tiles; where Linux refuses the process
    the tile state, the AMX build is not used and the VDPBF16PS build is loaded instead."""
    flags = cpu_info()["flags"]
    amx, vdp = kernels.SPECS[torch.bfloat16]
    if vdp.cpu_flags - flags:
        pytest.skip(f"{vdp.name} needs {', '.join(sorted(vdp.cpu_flags - flags))}, which this CPU lacks")
    widest = vdp if amx.cpu_flags - flags else amx
    assert kernels.linear_kernel(torch.bfloat16).name.startswith(widest.name + "-")
    if widest is not amx:
        pytest.skip(f"{amx.name} needs {', '.join(sorted(amx.cpu_flags - flags))}, which this CPU lacks")

    def refused(lib):
        if hasattr(lib, "specrag_amx_init"):
            raise RuntimeError("the operating system refused this process the AMX tile state (a test)")
    monkeypatch.setattr(kernels, "_amx_init", refused)
    kernel, why = kernels._load(amx, kernels.LinearKernel, kernels._self_check)
    assert kernel is None and "refused" in why
    kernel, _ = kernels._load_widest(kernels.SPECS[torch.bfloat16], kernels.LinearKernel, kernels._self_check)
    assert kernel.name.startswith(vdp.name + "-") and kernel.spec.k_align == 2


@pytest.mark.parametrize("spec", kernels.LEAN, ids=lambda s: s.name)
def test_every_build_of_the_c_layer_loop_this_cpu_has_passes_its_check(spec):
    missing = spec.cpu_flags - cpu_info()["flags"]
    if missing:
        pytest.skip(f"{spec.name} needs {', '.join(sorted(missing))}, which this CPU lacks")
    loop, why = kernels._load(spec, kernels.LeanKernel, kernels._check_lean)
    assert why is None and loop.name.startswith(spec.name + "-")
    # the check's own failure: a token whose SiLU is one ulp off when it has neighbours is caught
    real = loop.silu_mul

    def off_beside_others(g):
        out = real(g)
        if out.shape[0] > 1:
            out[0, 3] = out[0, 3].nextafter(torch.tensor(1e9))
        return out

    loop.silu_mul = off_beside_others
    assert kernels._check_lean(loop) is not None


def test_pooled_forward_uses_the_kernel_for_generation_rows_and_torch_for_prompt_chunks(kernel, monkeypatch):
    model = copy.deepcopy(tiny_llama(seed=0)).to(kernel.dtype)
    rng = random.Random(0)
    seq = [1] + [rng.randrange(3, 96) for _ in range(120)]
    runner = PooledModel(model, 4)
    plain = PooledModel(model, 4, linear_kernel="torch")
    assert runner.linear_kernel == kernel.name and plain.linear_kernel == "torch"
    ours: list[int] = []
    theirs: list[int] = []
    real_linear, real_multi, real_functional = kernel.linear, kernel.linear_multi, torch.nn.functional.linear

    def spy_ours(x, w, b=None, packed=None):
        ours.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real_linear(x, w, b, packed)

    def spy_multi(x, weights, biases, packed=None):      # several layers' products in one call (the lean loop's)
        ours.extend([x.shape[0]] * len(weights))
        return real_multi(x, weights, biases, packed)

    def spy_torch(x, w, b=None):
        theirs.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real_functional(x, w, b)

    monkeypatch.setattr(kernel, "linear", spy_ours)
    monkeypatch.setattr(kernel, "linear_multi", spy_multi)
    monkeypatch.setattr(torch.nn.functional, "linear", spy_torch)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.inference_mode():
        prompt = 100
        assert prompt > SHORT_ROW
        # a prompt chunk beside a decode row with drafts: 5 tokens on ours, 100 on torch's, the
        # two kept logit rows (the prompt's last, the decode row's 5) on ours
        runner.forward([Row(0, 0, seq[:50], 50), Row(1, 0, seq[:40], 40)])
        ours.clear()
        theirs.clear()
        logits = runner.forward([Row(2, 0, seq[:prompt], prompt - 1), Row(0, 50, seq[50:55], 0)])
        assert sorted(set(ours)) == [5, 6] and ours.count(5) == n_linear - 1 and ours.count(6) == 1
        assert theirs == [prompt] * (n_linear - 1)
        # decode rows only: every product on ours
        ours.clear()
        theirs.clear()
        runner.forward([Row(0, 55, seq[55:56], 0), Row(1, 40, seq[40:44], 0)])
        assert theirs == []
        if runner.lean is not None and runner.lean.loop is not None:
            # the layers in one call of C, on our kernel's own functions (test_lean checks it
            # gives the Python loop's bits); the LM head of the 5 kept rows from Python
            assert ours == [5]
        else:
            assert len(ours) == n_linear
        # anybody else's forward of the same model (HF generate, the tests' oracle): torch's
        ours.clear()
        model(torch.tensor([seq[:10]]))
        assert ours == []
        # the logits agree with torch's kernels to the dtype's rounding
        plain.forward([Row(0, 0, seq[:50], 50), Row(1, 0, seq[:40], 40)])
        ref = plain.forward([Row(2, 0, seq[:prompt], prompt - 1), Row(0, 50, seq[50:55], 0)])
    tol = 1e-4 if kernel.dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("drafters", [(), ("reference",), ("tree",)])
def test_engine_output_on_the_kernel_equals_torch_kernels_and_hf_generate(kernel, drafters, monkeypatch):
    import exactness
    from exactness import assert_same_tokens, hf_greedy

    # bf16: equal up to near-ties of bf16's spacing at the logits' scale, reported with their gap
    monkeypatch.setattr(exactness, "NEAR_TIE_LOW_PRECISION", 0.125)
    model = copy.deepcopy(tiny_llama(seed=1)).to(kernel.dtype)
    tok = TinyTokenizer(96)
    rng = random.Random(5)
    prompts = [[1] + [rng.randrange(3, 96) for _ in range(n)] for n in (7, 40, 90)]
    refs = [[rng.randrange(3, 96) for _ in range(60)] + p[1:30] for p in prompts]
    outs = {}
    for name in ("auto", "torch"):
        engine = SpeculativeEngine(model, tok, config=EngineConfig(drafters=drafters, linear_kernel=name))
        assert engine.runner.linear_kernel == (kernel.name if name == "auto" else "torch")
        reqs = [GenerationRequest(p, max_new_tokens=40, references=[r]) for p, r in zip(prompts, refs)]
        outs[name] = [r.token_ids for r in engine.generate(reqs)]
    for p, ours, theirs in zip(prompts, outs["auto"], outs["torch"]):
        assert_same_tokens(model, p, hf_greedy(model, p, 40), ours, "kernel vs HF generate")
        assert_same_tokens(model, p, theirs, ours, "kernel vs torch's kernels")


def test_without_a_compiler_the_forward_keeps_torch_kernels_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SPECRAG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernels.linear_kernel.cache_clear()
    kernels.attention_kernel.cache_clear()
    kernels.layer_ops.cache_clear()
    kernels.lean_kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="speculation.kernels"):
            assert kernels.linear_kernel() is None
        assert "no C compiler" in caplog.text
        runner = PooledModel(tiny_llama(seed=0), 2)
        assert runner.linear_kernel == "torch" and runner.kernel is None
        assert runner.attention_kernel == "torch" and runner.attention is None and runner.lean is None
        monkeypatch.delenv("CC")
        monkeypatch.setenv(kernels.ENV, "torch")
        kernels.linear_kernel.cache_clear()
        kernels.attention_kernel.cache_clear()
        kernels.layer_ops.cache_clear()
        assert kernels.linear_kernel() is None and kernels.linear_kernel(torch.bfloat16) is None
        assert kernels.attention_kernel() is None
    finally:
        kernels.linear_kernel.cache_clear()
        kernels.attention_kernel.cache_clear()
        kernels.layer_ops.cache_clear()
        kernels.lean_kernel.cache_clear()


def test_a_compiler_that_fails_is_reported_not_raised(monkeypatch, tmp_path, caplog):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: broken toolchain' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("SPECRAG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    kernels.linear_kernel.cache_clear()
    kernels.attention_kernel.cache_clear()
    kernels.layer_ops.cache_clear()
    kernels.lean_kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="speculation.kernels"):
            assert kernels.linear_kernel() is None
            assert kernels.attention_kernel() is None and kernels.layer_ops() is None
        assert "broken toolchain" in caplog.text
        assert not list((tmp_path / "cache" / "kernels").glob("*.so"))     # nothing half-written left
    finally:
        kernels.linear_kernel.cache_clear()
        kernels.attention_kernel.cache_clear()
        kernels.layer_ops.cache_clear()
        kernels.lean_kernel.cache_clear()


@pytest.mark.parametrize("spec", kernels.ATTENTION, ids=lambda spec: spec.name)
def test_every_attention_build_this_cpu_can_run_passes_its_check(spec):
    """Each build of csrc/attention.c this CPU runs (the machine uses the widest; the narrower
    ones are what a CPU without its flags gets) passes the check the loader runs: softmax
    attention to the dtype's rounding, a token's bits alone and beside others, a tree node's
    bits those of the same path as a chain."""
    why = kernels._why_unavailable(spec)
    if why is not None:
        pytest.skip(f"{spec.name}: {why}")
    kernel, why = kernels._load(spec, kernels.AttentionKernel, kernels._check_attention)
    assert kernel is not None, why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_attention_kernel_matches_softmax_attention_and_each_token_is_bitwise_independent(dtype):
    """Our attention kernel (csrc/attention.c): every query token against positions [0, nvis) of
    its own slot equals softmax attention in fp32, to the dtype's rounding; a token's result is
    the same bits alone, among other tokens of its slot and beside other slots' tokens."""
    k = kernels.attention_kernel()
    if k is None:
        pytest.skip("the attention kernel needs AVX-512 or AVX2 + FMA (and a C compiler); this CPU lacks them")
    gen = torch.Generator().manual_seed(3)
    # SmolLM2's layout, the other unrolled ones (4 query heads per kv head, head dim 64 / 128), generic ones
    for hkv, g, d in ((3, 3, 64), (2, 4, 64), (1, 4, 128), (2, 4, 32), (1, 1, 16)):
        keys = torch.randn(5, hkv, 700, d, generator=gen).to(dtype)
        values = torch.randn(5, hkv, 700, d, generator=gen).to(dtype)
        # queries as the model hands them over: [Hq, T, D] transposed, so strided
        q = torch.randn(hkv * g, 60, d, generator=gen).to(dtype).transpose(0, 1)
        slot = torch.tensor([4] * 30 + [0] * 20 + [2] * 10)
        nvis = torch.tensor(list(range(671, 701)) + list(range(1, 21)) + [16, 17, 255, 256, 257, 513, 3, 2, 1, 40])
        got = k(q, keys, values, slot, nvis, d ** -0.5)
        want = kernels.reference_attention(q, keys, values, slot, nvis, d ** -0.5)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        for lo, hi in ((0, 1), (29, 30), (30, 50), (45, 60), (10, 55)):
            assert torch.equal(k(q[lo:hi], keys, values, slot[lo:hi], nvis[lo:hi], d ** -0.5), got[lo:hi]), (lo, hi)
        # nothing past a token's visible positions is read: changing them changes nothing
        keys2, values2 = keys.clone(), values.clone()
        keys2[0, :, 20:] = float("nan")
        values2[0, :, 20:] = float("nan")
        assert torch.equal(k(q[30:50], keys2, values2, slot[30:50], nvis[30:50], d ** -0.5), got[30:50])


def test_packed_weights_follow_the_weight_and_deep_copies_use_their_own(kernel):
    """The kernel reads a packed copy of each weight: a weight changed in place is packed again,
    and a deep copy of a patched model computes with its own weights, not the original's."""
    model = copy.deepcopy(tiny_llama(seed=4)).to(kernel.dtype)
    rows = [Row(0, 0, [1, 5, 9, 13, 17], 0)]
    with torch.inference_mode():
        before = PooledModel(model, 2).forward(rows)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight.mul_(1.5)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()       # the original only
    with torch.inference_mode():
        after = PooledModel(model, 2).forward(rows)
        fresh = PooledModel(copy.deepcopy(model), 2).forward(rows)
        of_copy = PooledModel(copied, 2).forward(rows)
        plain_copy = PooledModel(copied, 2, linear_kernel="torch").forward(rows)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)
    tol = 1e-4 if kernel.dtype == torch.float32 else 0.1
    torch.testing.assert_close(of_copy, plain_copy, rtol=tol, atol=tol)
    assert not torch.allclose(of_copy, after, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_invariant_forward_computes_a_tree_node_as_its_path_fed_as_a_chain(dtype):
    """On the attention kernel a draft tree's node reads the cached prefix and then its
    ancestors in path order although siblings sit between them in the slot: under the
    batch-invariant forward its logits are bitwise those of the same path fed as a chain (what
    plain decoding computes), beside a chain row of another slot or not."""
    if kernels.attention_kernel() is None:
        pytest.skip("the attention kernel needs AVX-512 or AVX2 + FMA (and a C compiler); this CPU lacks them")
    if dtype == torch.bfloat16 and kernels.kernel_for(dtype, "cpu") is None:
        pytest.skip("bf16 products on our kernel need AVX512-BF16")
    runner = PooledModel(copy.deepcopy(tiny_llama(seed=0)).to(dtype), 3, invariant=True)
    prompt = [1, 5, 9, 11, 13, 2, 8]            # 7 cached: the prefix ends off a multiple of four
    # nodes: 4 (depth 1), 6 (depth 1), 7 under 4, 3 under 6, 12 under 7 -- siblings interleaved
    tree = Row(0, len(prompt), [4, 6, 7, 3, 12], 0, parents=[-1, -1, 0, 1, 2])
    with torch.inference_mode():
        for slot in range(3):
            runner.forward([Row(slot, 0, prompt, len(prompt))])
        nodes = runner.forward([tree])
        beside = runner.forward([Row(2, len(prompt), [4, 7], 0), tree])      # a chain row in the same forward
        path_a = runner.forward([Row(1, len(prompt), [4, 7, 12], 0)])
        path_b = runner.forward([Row(1, len(prompt), [6, 3], 0)])
    assert torch.equal(nodes[[0, 2, 4]], path_a) and torch.equal(nodes[[1, 3]], path_b)
    assert torch.equal(beside[2:], nodes) and torch.equal(beside[:2], path_a[:2])
