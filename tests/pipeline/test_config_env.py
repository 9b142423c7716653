"""The documented environment variables are read: SPECRAG_REDIS_URL and SPECRAG_EMBEDDING_MODEL
are the defaults of the pipeline's config and of the retrieval commands' flags; an explicit
value wins."""

from __future__ import annotations

from deploy.cli import build_parser
from pipeline.config import PipelineConfig


def test_pipeline_config_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPECRAG_REDIS_URL", "redis://cache.example:6380/2")
    monkeypatch.setenv("SPECRAG_EMBEDDING_MODEL", "/models/my-embedder")
    cfg = PipelineConfig()
    assert cfg.redis_url == "redis://cache.example:6380/2"
    assert cfg.embedding_model == "/models/my-embedder"
    assert PipelineConfig(redis_url="redis://other:1/0").redis_url == "redis://other:1/0"
    assert PipelineConfig.model_validate({"embedding_model": "x"}).embedding_model == "x"
    monkeypatch.setenv("SPECRAG_REDIS_URL", "  ")
    monkeypatch.delenv("SPECRAG_EMBEDDING_MODEL")
    cfg = PipelineConfig()
    assert cfg.redis_url is None and cfg.embedding_model is None


def test_retrieval_commands_take_their_defaults_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPECRAG_REDIS_URL", "redis://cache.example:6380/2")
    monkeypatch.setenv("SPECRAG_EMBEDDING_MODEL", "/models/my-embedder")
    for argv in (["ingest", "docs/", "--index", "idx"], ["search", "q", "--index", "idx"]):
        args = build_parser().parse_args(argv)
        assert (args.redis_url, args.embedding_model) == ("redis://cache.example:6380/2", "/models/my-embedder")
    args = build_parser().parse_args(["search", "q", "--index", "idx", "--embedding-model", "mine"])
    assert args.embedding_model == "mine"
