"""The engine loop's thread is the only one that keeps an OpenMP team (speculation.openmp):
a thread that built the engine or hands it work gives its worker threads back."""

import os
import time

import pytest
import torch

from speculation.engine import EngineConfig, GenerationRequest, SpeculativeEngine
from speculation.openmp import _pause_fn, release_team
from speculation.scheduler import EngineLoop
from tinymodels import TinyTokenizer, tiny_llama

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or _pause_fn() is None,
                                reason="needs Linux and an OpenMP runtime with omp_pause_resource_all")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _until(n: int, timeout: float = 5.0) -> int:
    """The process's thread count once it is ``n`` (freed workers exit on their own time)."""
    deadline = time.monotonic() + timeout
    while _threads() != n and time.monotonic() < deadline:
        time.sleep(0.01)
    return _threads()


def _parallel_kernel() -> None:
    """A kernel large enough that torch runs it on this thread's OpenMP team."""
    x = torch.ones(4_000_000)
    for _ in range(3):
        x.add_(1.0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_release_frees_this_threads_workers_and_a_new_team_comes_back(two_threads):
    _parallel_kernel()
    with_team = _threads()
    assert release_team()
    assert _until(with_team - 1) == with_team - 1, "the thread's OpenMP worker did not exit"
    assert release_team()                      # nothing left to free: still fine
    _parallel_kernel()
    assert _until(with_team) == with_team      # the next parallel kernel starts a team again


def test_the_engine_loop_takes_the_team_from_the_threads_that_feed_it(two_threads):
    engine = SpeculativeEngine(tiny_llama(seed=0), TinyTokenizer(96), None,
                               EngineConfig(draft_policy="fixed", min_ngram=1))
    _parallel_kernel()                          # as loading a model does, on this thread
    with_team = _threads()
    loop = EngineLoop(engine)                   # built here: this thread's team is let go
    try:
        assert _until(with_team - 1) == with_team - 1
        result = loop.generate(GenerationRequest(prompt_ids=[1, 5, 9, 13], max_new_tokens=4))
        assert len(result.token_ids) == 4
        _parallel_kernel()                      # this thread works again, then submits
        loop.generate(GenerationRequest(prompt_ids=[1, 5, 9], max_new_tokens=2))
        loop.call(lambda: None)
        # the loop thread (and its team, if its tiny forwards went parallel) remain; this
        # thread's new worker was given back by the submit
        settled = _threads()
        _parallel_kernel()
        assert _until(settled + 1) == settled + 1
    finally:
        loop.close()
