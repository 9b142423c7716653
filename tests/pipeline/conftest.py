"""Pipeline fixtures: a small real index (python-docs subset, real MiniLM, flat and HNSW) and a
tiny random Llama that speaks the real SmolLM2 tokenizer, so iterative runs are fast."""

from __future__ import annotations

import pytest

MODULES = "json,textwrap,heapq,functools,itertools,bisect"


@pytest.fixture(scope="session")
def smol_tokenizer():
    from speculation.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def small_indexes(tmp_path_factory, smol_tokenizer):
    from retrieval import IngestConfig, ingest
    from retrieval.embeddings import Embedder

    root = tmp_path_factory.mktemp("pipeline-indexes")
    embedder = Embedder.load("all-MiniLM-L6-v2")
    out = {}
    for kind in ("flat", "hnsw"):
        ingest([f"python-docs:{MODULES}"], root / kind, smol_tokenizer,
               IngestConfig(index_type=kind, show_progress=False, chunk_tokens=128, chunk_overlap=16),
               embedder=embedder)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="session")
def tiny_models(smol_tokenizer):
    from speculation.models import LoadedModels, ModelConfig
    from tinymodels import tiny_llama

    target = tiny_llama(seed=11, vocab_size=len(smol_tokenizer), hidden=64, layers=2, eos_boost=1.0)
    return LoadedModels(target=target, tokenizer=smol_tokenizer, draft=None, config=ModelConfig())
