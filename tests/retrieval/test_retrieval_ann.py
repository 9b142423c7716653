"""Approximate indexes against exact search; FAISS placement (GPU when present, else CPU)."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest

from retrieval import RetrievalConfig, dense

RECALL_FLOOR = {"hnsw": 0.90, "ivf": 0.85}


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres: the shape real embeddings have (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall_at_10_against_flat(kind, record_property):
    base = clustered(5000, 64, 40, seed=1)
    queries = clustered(200, 64, 40, seed=2)
    flat = dense.build_index(base, "flat")
    _, truth = dense.search(flat, queries, 10)
    approx = dense.build_index(base, kind)
    defaults = RetrievalConfig()  # the shipped search-time defaults must meet the floor
    dense.set_search_params(approx, nprobe=defaults.ivf_nprobe, ef_search=defaults.hnsw_ef_search)
    _, got = dense.search(approx, queries, 10)
    recall = np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got)])
    record_property(f"recall@10_{kind}", float(recall))
    logging.getLogger(__name__).info("recall@10 %s = %.3f", kind, recall)
    assert recall >= RECALL_FLOOR[kind], f"{kind} recall@10 {recall:.3f} below {RECALL_FLOOR[kind]}"


def test_flat_scores_are_inner_products():
    base = clustered(500, 32, 5, seed=3)
    q = clustered(9, 32, 5, seed=4)
    scores, rows = dense.search(dense.build_index(base, "flat"), q, 5)
    assert np.allclose(scores, np.take_along_axis(q @ base.T, rows, axis=1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_index_stays_on_cpu_without_gpu(caplog):
    index = dense.build_index(clustered(100, 16, 3, seed=5), "flat")
    caplog.set_level(logging.INFO, logger="retrieval.dense")
    moved, device, _ = dense.maybe_to_gpu(index, use_gpu=False)
    assert moved is index and device == "cpu"
    assert "CPU" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0,
                    reason="needs a FAISS GPU build and a CUDA GPU")
def test_index_moves_to_gpu_and_answers_the_same():  # pragma: no cover - GPU machines only
    base = clustered(2000, 64, 10, seed=6)
    q = clustered(16, 64, 10, seed=7)
    cpu = dense.build_index(base, "flat")
    gpu, device, res = dense.maybe_to_gpu(cpu)
    assert device.startswith("cuda") and res is not None
    s_cpu, r_cpu = dense.search(cpu, q, 10)
    s_gpu, r_gpu = dense.search(gpu, q, 10)
    assert np.allclose(s_cpu, s_gpu, atol=1e-4)
