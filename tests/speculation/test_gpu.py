"""The GPU path: bf16 on CUDA (the default there). Skipped cleanly on machines without a GPU.

In bf16 a forward over [pending + drafts] and a one-token forward round differently, so the
oracle comparison allows divergences only at near-ties -- reported with their logit gap -- and
the threshold is bf16's resolution at logit scale, not fp32's."""

import copy
import random

import pytest
import torch

import exactness
from exactness import assert_same_tokens, hf_greedy
from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.models import ModelConfig
from tinymodels import TinyTokenizer, tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def test_auto_config_picks_cuda_bf16():
    cfg = ModelConfig()
    assert cfg.resolved_device() == "cuda" and cfg.resolved_dtype() == torch.bfloat16


@pytest.mark.parametrize("drafters", [("reference",), ("reference", "draft_model"), ("draft_model",)])
def test_bf16_cuda_greedy_matches_hf_generate(monkeypatch, drafters):
    monkeypatch.setattr(exactness, "NEAR_TIE_LOW_PRECISION", 0.125)   # ~ bf16 spacing for logits of magnitude 8-16
    # copies: tiny_llama() is cached and .to() would move the CPU tests' models too
    target = copy.deepcopy(tiny_llama(seed=0)).to("cuda", torch.bfloat16)
    draft = copy.deepcopy(tiny_llama(seed=1)).to("cuda", torch.bfloat16)
    engine = SpeculativeEngine(target, TinyTokenizer(96), draft, EngineConfig(drafters=drafters))
    rng = random.Random(7)
    accepted = 0
    for n in range(30):
        prompt = [1] + [rng.randrange(3, 96) for _ in range(rng.randrange(2, 30))]
        expected = hf_greedy(target, prompt, 32)
        ref = expected[:] if n % 2 == 0 else []
        res = engine.generate_one(GenerationRequest(prompt, [ref], max_new_tokens=32))
        assert_same_tokens(target, prompt, expected, res.token_ids, f"cuda bf16 {drafters} case {n}")
        accepted += res.stats.accepted_tokens
    assert accepted > 0


def test_cuda_sampling_in_a_batch_uses_per_request_cuda_generators():
    """Sampled rows on CUDA: each request's generator lives on the GPU (no CPU generator handed
    to a CUDA multinomial), a seed alone reproduces its tokens, and torch's global RNG is left
    alone."""
    from speculation.scheduler import EngineLoop
    from speculation.verify import SamplingParams

    target = copy.deepcopy(tiny_llama(seed=0)).to("cuda", torch.bfloat16)
    draft = copy.deepcopy(tiny_llama(seed=1)).to("cuda", torch.bfloat16)
    engine = SpeculativeEngine(target, TinyTokenizer(96), draft, EngineConfig(drafters=("draft_model",)))
    req = lambda seed: GenerationRequest([1, 5, 6, 7], [], max_new_tokens=24,  # noqa: E731
                                         sampling=SamplingParams(temperature=0.8), seed=seed)
    state = engine.new_state(req(3))
    assert state.generator.device.type == "cuda"
    global_state = torch.cuda.get_rng_state()
    assert engine.generate_one(req(3)).token_ids == engine.generate_one(req(3)).token_ids
    loop = EngineLoop(engine)
    outs = [h.result(120) for h in [loop.submit(req(s)) for s in range(16)]]
    loop.close()
    assert all(len(o.token_ids) >= 1 for o in outs) and len({tuple(o.token_ids) for o in outs}) > 1
    assert torch.equal(torch.cuda.get_rng_state(), global_state)
