"""The pipeline's one configuration object, built from CLI flags, YAML (serve config) or env."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from pipeline.api import DrafterName
from retrieval.config import from_environment


def default_index_dir() -> Path:
    """Where the embedded default index of the built-in ``python-docs`` corpus lives."""
    from speculation.models import cache_dir

    return cache_dir() / "indexes" / "python-docs"


class PipelineConfig(BaseModel):
    """Everything needed to load a pipeline. ``index_dir`` None: the embedded default index,
    built on first use."""

    index_dir: str | None = None
    # defaults from SPECRAG_REDIS_URL / SPECRAG_EMBEDDING_MODEL (retrieval.config.from_environment)
    redis_url: str | None = Field(default_factory=lambda: from_environment("redis_url"))
    model: str = "smollm2-135m-instruct"
    draft_model: str | None = None
    # None: the one recorded in the index manifest
    embedding_model: str | None = Field(default_factory=lambda: from_environment("embedding_model"))
    device: str = "auto"
    dtype: str = "auto"
    k: int = Field(4, ge=1, le=50)
    retriever: str = "dense"
    max_draft_tokens: int = Field(16, ge=1, le=64)
    # drafters in order of preference (speculation.engine.DRAFTERS); None: the engine's default
    drafters: list[DrafterName] | None = None
    # continuous batching: sequences one engine loop holds (KV slots), tokens one forward feeds
    max_batch: int = Field(16, ge=1, le=256)
    max_tokens_per_step: int = Field(512, ge=32)
    # reuse the KV of a prompt prefix a slot already holds (the shared system prompt, repeated sources)
    prefix_cache: bool = True
    # MB of prompt prefixes copied out of slots handed to other requests (speculation/kv.py PrefixStore)
    prefix_cache_mb: float = Field(256, ge=0)
    # tokens of earlier answers the tree drafter drafts from (speculation/drafters.py History); 0: off
    history_tokens: int = Field(16384, ge=0)
    # draft lengths: "cost" (the measured cost model) or "fixed" (adaptive lengths, >= 3-token matches on CPU)
    draft_policy: Literal["cost", "fixed"] = "cost"
    max_tokens: int = Field(256, ge=1)
