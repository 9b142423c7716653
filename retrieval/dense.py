"""Dense index: FAISS over L2-normalised embeddings, inner-product metric.

``flat`` is exact (the RaLMSpec setting where retrieval dominates latency); ``ivf`` and
``hnsw`` are approximate. Row r of the FAISS index is row r of ``vectors.npy`` and the r-th id
of ``ids.json`` (sorted chunk ids), so a chunk's stored vector -- and hence its exact score
for any query -- is one array lookup away; local scoring relies on that.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)

FAISS_NAME = "dense.faiss"
VECTORS_NAME = "vectors.npy"


def default_nlist(n: int) -> int:
    """~4*sqrt(N) lists, but at least 39 training points per list (FAISS warns below that)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(vectors: np.ndarray, index_type: str, *, nlist: int | None = None, hnsw_m: int = 32,
                ef_construction: int = 80) -> faiss.Index:
    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    elif index_type == "ivf":
        nlist = nlist or default_nlist(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)  # faiss' Python wrapper keeps `quantizer` alive with the index
    else:
        raise ValueError(f"unknown index type {index_type!r}")
    index.add(vectors)
    return index


def set_search_params(index: faiss.Index, *, nprobe: int = 16, ef_search: int = 64) -> None:
    """Search-time knobs of the approximate types (ignored by flat)."""
    base = faiss.downcast_index(index) if hasattr(faiss, "downcast_index") else index
    if isinstance(base, faiss.IndexIVF):
        base.nprobe = min(nprobe, base.nlist)
    elif hasattr(base, "nprobe"):
        base.nprobe = nprobe
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = ef_search


def maybe_to_gpu(index: faiss.Index, use_gpu: bool | None = None) -> tuple[faiss.Index, str, Any]:
    """Move the index to GPU 0 when FAISS has a GPU build and sees a GPU.

    Returns (index, device, resources): the caller keeps ``resources`` (the GPU memory pool)
    alive as long as the index. HNSW has no GPU implementation in FAISS: it stays on the CPU.
    """
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is False or ngpu == 0 or not hasattr(faiss, "StandardGpuResources"):
        if use_gpu:
            logger.warning("GPU FAISS asked for but this FAISS build sees no GPU: using CPU")
        logger.info("FAISS index on CPU (%d GPUs visible)", ngpu)
        return index, "cpu", None
    try:
        res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    except Exception as exc:  # noqa: BLE001 -- e.g. HNSW is CPU-only
        logger.info("FAISS index stays on CPU (%s cannot move to GPU: %s)", type(index).__name__, exc)
        return index, "cpu", None
    logger.info("FAISS index moved to GPU 0 (%d GPUs visible)", ngpu)
    return gpu_index, "cuda:0", res


def save_index(index: faiss.Index, index_dir: Path) -> None:
    faiss.write_index(index, str(index_dir / FAISS_NAME))


def load_index(index_dir: Path) -> faiss.Index:
    return faiss.read_index(str(index_dir / FAISS_NAME))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS call for all queries: (scores, rows), each (len(queries), k); rows -1 = none."""
    k = max(1, min(k, index.ntotal))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def describe(index: Any) -> str:
    return type(faiss.downcast_index(index)).__name__ if hasattr(faiss, "downcast_index") else type(index).__name__
