"""Every user-facing error class keeps its HTTP status across a Ray process boundary.

Exceptions raised in a replica reach the caller pickled; one that does not survive pickling
(keyword-only constructor arguments, as ``PromptTooLongError`` has) arrives as Ray's
``UnserializableException`` and would be a 500. Each class is raised in a Ray actor (what a
Serve replica is), both raw and as the replicas convert it (``to_service_error``)."""

from __future__ import annotations

import pickle

import pytest

import pipeline.errors
import retrieval.errors
import speculation.errors
from deploy.errors import USER_ERRORS, ServiceError, _unwrap, classify

SPECIAL_ARGS = {pipeline.errors.PromptTooLongError: lambda: pipeline.errors.PromptTooLongError(
    "the question does not fit", prompt_tokens=9000, context_tokens=8192, max_tokens=256)}


def _all_error_classes() -> list[type[Exception]]:
    seen: list[type[Exception]] = []
    todo = list(USER_ERRORS)
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _instance(cls: type[Exception]) -> Exception:
    return SPECIAL_ARGS[cls]() if cls in SPECIAL_ARGS else cls(f"{cls.__name__} happened")


# control flow, not a user error: a cancelled answer has no client left to send a status to
NOT_USER_ERRORS = {pipeline.errors.RequestStopped}


def test_every_layer_error_is_covered():
    names = {c.__name__ for c in _all_error_classes()}
    # the modules' own classes, found by walking USER_ERRORS: a new class is picked up by itself
    for module in (pipeline.errors, retrieval.errors, speculation.errors):
        own = {n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Exception)
               and v.__module__ == module.__name__ and v not in NOT_USER_ERRORS}
        assert own <= names, own - names
    assert classify(pipeline.errors.RequestStopped("gone")) is None


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_status_is_the_class_attribute_and_survives_pickle(cls):
    exc = _instance(cls)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls and str(again) == str(exc)
    err = classify(again)
    assert (err.status, err.type) == (cls.http_status, cls.error_type)
    assert err.status in (400, 404, 503)


def test_errors_round_trip_through_a_ray_actor():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        @ray.remote
        class Replica:
            # the error arrives pickled too (the test module is not importable in the worker)
            def raise_raw(self, exc):
                raise exc

            def raise_converted(self, exc):
                from deploy.errors import to_service_error

                try:
                    raise exc
                except Exception as raised:
                    raise to_service_error(raised) from None

        replica = Replica.remote()
        for cls in _all_error_classes():
            for method in (replica.raise_raw, replica.raise_converted):
                with pytest.raises(Exception) as info:
                    ray.get(method.remote(_instance(cls)))
                err = classify(info.value)
                assert err is not None, (cls, method, repr(info.value))
                assert not isinstance(_unwrap(info.value), ray.exceptions.RayActorError), repr(info.value)
                assert (err.status, err.type) == (cls.http_status, cls.error_type), (cls, method)
                assert isinstance(err, ServiceError) and err.message
    finally:
        ray.shutdown()


def test_generator_replica_uses_every_cpu_unless_told_otherwise(monkeypatch):
    """Ray sets OMP_NUM_THREADS=1 in an actor with num_cpus 0.5 (the Generator's default); the
    replica's threads are the CPUs it may use, or ``torch_threads`` when set."""
    from deploy.cpus import usable_cpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)      # Ray keeps a value it inherits
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        @ray.remote(num_cpus=0.5)
        class Replica:
            def threads(self, configured):
                import os

                import torch

                from deploy.app import set_generator_threads

                before = (os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
                return before, set_generator_threads(configured), torch.get_num_threads()

        replica = Replica.remote()
        before, chosen, now = ray.get(replica.threads.remote(None))
        assert before == ("1", 1)                          # what Ray gives it
        assert chosen == now == usable_cpus()
        assert ray.get(replica.threads.remote(1))[1:] == (1, 1)
    finally:
        ray.shutdown()
