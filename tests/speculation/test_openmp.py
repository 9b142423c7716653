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


def _tids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _team_of(kernel) -> set[str]:
    """The worker threads ``kernel`` starts on this thread (which holds no team before)."""
    assert release_team()
    before = _tids()
    kernel()
    return _tids() - before


def _gone(tids: set[str], timeout: float = 5.0) -> bool:
    """Whether ``tids`` exit (freed workers leave on their own time); other threads may come
    and go meanwhile, so only these are watched."""
    deadline = time.monotonic() + timeout
    while tids & _tids() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not tids & _tids()


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
    workers = _team_of(_parallel_kernel)
    assert workers, "a 2-thread parallel kernel started no OpenMP worker"
    assert release_team()
    assert _gone(workers), "the thread's OpenMP worker did not exit"
    assert release_team()                      # nothing left to free: still fine
    assert _team_of(_parallel_kernel)          # the next parallel kernel starts a team again


def test_the_engine_loop_takes_the_team_from_the_threads_that_feed_it(two_threads):
    engine = SpeculativeEngine(tiny_llama(seed=0), TinyTokenizer(96), None,
                               EngineConfig(draft_policy="fixed", min_ngram=1))
    workers = _team_of(_parallel_kernel)        # as loading a model does, on this thread
    assert workers
    loop = EngineLoop(engine)                   # built here: this thread's team is let go
    try:
        assert _gone(workers)
        result = loop.generate(GenerationRequest(prompt_ids=[1, 5, 9, 13], max_new_tokens=4))
        assert len(result.token_ids) == 4
        workers = _team_of(_parallel_kernel)    # this thread works again, then submits
        assert workers
        loop.generate(GenerationRequest(prompt_ids=[1, 5, 9], max_new_tokens=2))
        assert _gone(workers), "submitting did not give this thread's team back"
        workers = _team_of(_parallel_kernel)
        loop.call(lambda: None)
        assert _gone(workers), "a call into the loop did not give this thread's team back"
    finally:
        loop.close()
