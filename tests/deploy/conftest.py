"""One small real index (two python-docs modules, chunks in the real Redis) shared by every
deploy test module that runs the real pipeline: built once per session."""

from __future__ import annotations

import pytest

from deploy_helpers import build_index, drop_redis_namespace, require_redis


@pytest.fixture(scope="session")
def deploy_index(tmp_path_factory):
    require_redis()
    index_dir = tmp_path_factory.mktemp("deploy-index") / "pydocs"
    name = build_index(index_dir)
    yield index_dir
    drop_redis_namespace(name)
