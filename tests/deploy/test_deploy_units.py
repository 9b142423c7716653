"""Pure-Python pieces of deploy/: batch input/output handling, config, error mapping."""

from __future__ import annotations

import json
import pickle
import time

import pytest

from deploy.batch import AnswerWriter, load_done_ids, read_questions
from deploy.config import ServeConfig, load_config_file
from deploy.errors import ServiceError, classify, to_service_error
from pipeline.errors import PromptTooLongError, QuestionError


def test_read_questions_reports_line_numbers(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join([
        '{"id": 1, "question": "a?"}',
        '{"id": 2, "question": ',            # torn JSON
        '["not", "an", "object"]',
        '{"question": "no id"}',
        '{"id": 3, "question": "   "}',
        '',
        '{"id": "1", "question": "dup"}',
        '{"id": 4, "question": "b?", "max_tokens": 8}',
    ]) + "\n")
    rep = read_questions(p)
    assert [q.id for q in rep.questions] == ["1", "4"]
    assert rep.questions[1].max_tokens == 8
    assert [n for n, _ in rep.malformed] == [2, 3, 4, 5]
    assert rep.duplicates == [(7, "1")]


def test_torn_last_line_is_truncated_on_resume(tmp_path):
    out = tmp_path / "a.jsonl"
    with AnswerWriter(out) as w:
        w.write(json.dumps({"id": "a", "answer": "x"}))
        w.write(json.dumps({"id": "b", "answer": "y"}))
    with open(out, "ab") as f:
        f.write(b'{"id": "c", "ans')               # killed mid-write
    assert load_done_ids(out) == {"a", "b"}
    assert out.read_bytes().endswith(b"}\n")
    with AnswerWriter(out) as w:
        w.write(json.dumps({"id": "c", "answer": "z"}))
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["a", "b", "c"]


def test_serve_yaml_validates_and_builds():
    from deploy.app import build_app

    args = load_config_file("deploy/serve.yaml")
    cfg = ServeConfig.model_validate(args)
    assert cfg.generator.autoscaling is not None and cfg.retriever.autoscaling is not None
    opts = cfg.generator.serve_options()
    assert "autoscaling_config" in opts and "num_gpus" in opts["ray_actor_options"]
    build_app(args)  # binds without a cluster


def test_custom_resources_and_autoscaling_window_reach_serve():
    """A Generator pinned to nodes with a custom resource, and Serve's look-back window: both
    are in the options the deployment is built with (and pass Serve's own config model)."""
    from ray.serve.config import AutoscalingConfig

    cfg = ServeConfig.model_validate({"generator": {"resources": {"generator_node": 1},
                                                    "autoscaling": {"max_replicas": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5}}})
    opts = cfg.generator.serve_options()
    assert opts["ray_actor_options"]["resources"] == {"generator_node": 1}
    assert AutoscalingConfig(**opts["autoscaling_config"]).look_back_period_s == 2
    assert "resources" not in ServeConfig().generator.serve_options()["ray_actor_options"]


def test_config_rejects_unknown_keys_and_bad_bounds():
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"nope": 1})
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"generator": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}})


def test_error_mapping_survives_pickling():
    err = classify(PromptTooLongError("question too long", prompt_tokens=9000, context_tokens=8192, max_tokens=256))
    assert err.status == 400 and "context_tokens=8192" in err.message
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ServiceError) and again.status == 400 and again.message == err.message
    assert classify(QuestionError("empty")).status == 400
    from retrieval.errors import IndexNotFoundError, StoreUnavailableError
    from speculation.errors import ModelNotFoundError

    assert classify(StoreUnavailableError("down")).status == 503
    assert classify(IndexNotFoundError("none")).status == 503
    assert classify(ModelNotFoundError("x")).status == 404
    assert classify(ValueError("bug")) is None
    assert classify(ConnectionError("not redis")) is None
    assert to_service_error(KeyError("secret internals")).status == 500
    assert "secret" not in to_service_error(KeyError("secret internals")).message


def test_redis_connection_error_is_503():
    import redis

    assert classify(redis.exceptions.ConnectionError("refused")).status == 503


def test_closing_a_stream_early_stops_the_generation():
    """The stage stops at its first commit after the client closed the stream: commits counted,
    the third held back until the close is done (no sleep for a loaded machine to outlast)."""
    import asyncio
    import threading

    import fake_stages
    from deploy.runners import GenerationRunner
    from pipeline.api import AskRequest

    calls = []
    closed, finished = threading.Event(), threading.Event()

    class Counting(fake_stages.GenerationStage):
        def generate(self, request, sources, on_text=None):
            def counted(t):
                if len(calls) == 2:
                    closed.wait(30)  # the third commit comes after the client went away
                calls.append(t)
                on_text(t)
            try:
                return super().generate(request, sources, on_text=counted)
            finally:
                finished.set()

    runner = GenerationRunner(Counting(None))
    src = fake_stages.RetrievalStage(None).retrieve(["lru_cache"], 2)[0]

    async def consume_two():
        it = runner.stream(AskRequest(question="lru_cache", max_tokens=100), src)
        got = [await it.__anext__(), await it.__anext__()]
        await it.aclose()
        closed.set()
        await asyncio.get_running_loop().run_in_executor(None, finished.wait, 30)
        return got

    got = asyncio.run(consume_two())
    assert len(got) == 2 and finished.is_set()
    assert len(calls) == 3  # stopped at the first commit after the close, not after all 100
    runner.close()


def test_streaming_errors_are_service_errors():
    import asyncio

    import fake_stages
    from deploy.runners import GenerationRunner
    from pipeline.api import AskRequest

    runner = GenerationRunner(fake_stages.GenerationStage(None))

    async def run():
        return [x async for x in runner.stream(AskRequest(question="x" * 3000), [])]

    with pytest.raises(ServiceError) as info:
        asyncio.run(run())
    assert info.value.status == 400


def test_lazy_stage_heals_when_the_store_returns():
    import fake_stages
    from deploy.runners import LazyStage

    state = {"up": False, "builds": 0}

    def factory():
        state["builds"] += 1
        if not state["up"]:
            raise fake_stages.StoreUnavailableError("redis down")
        return fake_stages.RetrievalStage(None)

    lazy = LazyStage(factory, retry_s=0.0)
    with pytest.raises(ServiceError) as info:
        lazy.retrieve(["q"], 1)
    assert info.value.status == 503
    state["up"] = True
    assert lazy.retrieve(["lru_cache"], 1)[0][0].id == "d1"
    n = state["builds"]
    lazy.retrieve(["x"], 1)
    assert state["builds"] == n  # built once, then kept


def test_lazy_stage_fails_loudly_on_config_errors():
    from deploy.runners import LazyStage

    def factory():
        raise ValueError("bad config")

    with pytest.raises(ValueError):
        LazyStage(factory)


def test_stream_result_reports_the_stages_own_time_to_first_text(monkeypatch):
    """The serving benchmark subtracts it from the client's time to first token, per request.
    The runner's clock here counts the stage's steps (one before each text), so the measure is
    exact: one step to the first text, not the three of the whole answer."""
    import asyncio
    import types

    import fake_stages
    from deploy import runners
    from pipeline.api import AskRequest, AskResult

    steps = [0]
    monkeypatch.setattr(runners, "time", types.SimpleNamespace(
        perf_counter=lambda: float(steps[0]), monotonic=time.monotonic, sleep=time.sleep))

    class Stepping(fake_stages.GenerationStage):
        def generate(self, request, sources, on_text=None):
            def stepped(t):
                steps[0] += 1
                on_text(t)
            return super().generate(request, sources, on_text=stepped)

    runner = runners.GenerationRunner(Stepping(None))
    src = fake_stages.RetrievalStage(None).retrieve(["lru_cache"], 2)[0]

    async def run():
        return [x async for x in runner.stream(AskRequest(question="lru_cache", max_tokens=3), src)]

    items = asyncio.run(run())
    result = items[-1]
    assert isinstance(result, AskResult) and [x for x in items[:-1]] and result.answer == "".join(items[:-1])
    assert steps[0] == 3 and result.stats["seconds"]["first_text"] == 1
    assert result.stats["seconds"]["generate"] == 0.001  # the stage's own numbers kept
    runner.close()


def test_public_sources_leave_out_token_ids_and_carry_spans():
    from deploy.openai_api import public_provenance, public_sources
    from pipeline.api import AskResult, Source

    src = Source(id="a", title="t", source="s.rst", score=0.5, text="x", token_ids=[1, 2, 3])
    span = {"answer_start": 0, "answer_end": 1, "source_start": 0, "source_end": 1, "kind": "copied"}
    seg = {"answer_start": 0, "answer_end": 1, "origin": "copied", "source": 0}
    result = AskResult("x", [1], [src, Source(id="b", title="t", source="s", score=1.0, text="y")], "stop", 3,
                       spans=[[span], []], provenance=[seg])
    assert public_sources(result) == [{"id": "a", "title": "t", "source": "s.rst", "score": 0.5, "text": "x",
                                       "spans": [span]},
                                      {"id": "b", "title": "t", "source": "s", "score": 1.0, "text": "y", "spans": []}]
    assert src.token_ids == [1, 2, 3]
    assert public_provenance(result) == {"provenance": [seg]}      # no strides outside iterative mode


def test_lone_retrieval_skips_the_batch_queue_and_concurrent_ones_are_batched():
    """The Retriever deployment's class, driven without Ray: a query with none in flight goes
    straight to the stage; queries arriving while it runs go to the ``@serve.batch`` queue
    (stood in for here: ``serve.batch`` needs a replica context; the real one runs in
    test_deploy_serve.py's concurrent-requests test)."""
    import asyncio
    import threading

    import fake_stages

    from deploy.app import Retriever

    entered, gate = threading.Event(), threading.Event()

    class Slow(fake_stages.RetrievalStage):
        """Holds the first query in the stage until the test has sent the others."""

        def retrieve(self, questions, k, retriever="dense"):
            entered.set()
            gate.wait(30)
            return super().retrieve(questions, k, retriever)

    replica = Retriever.func_or_class({"stages_module": "fake_stages"})
    stage = replica._runner.stage = Slow(None)
    queued = []

    async def batch_queue(query):
        queued.append(query[0])
        (out,) = await replica._runner.retrieve_batch([query])
        return out

    replica._batched = batch_queue

    async def main():
        first = asyncio.ensure_future(replica.retrieve("lru_cache", 1, "dense"))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)  # the first is in the stage
        rest = [asyncio.ensure_future(replica.retrieve(q, 1, "dense")) for q in ("pathlib paths", "itertools chain")]
        for _ in range(100):  # loop turns until both have chosen their way (at most 100)
            if len(queued) == 2:
                break
            await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *rest)

    out = asyncio.run(main())
    assert queued == ["pathlib paths", "itertools chain"]
    assert [c[0] for c in stage.calls] == ["lru_cache", "pathlib paths", "itertools chain"]
    assert [sources[0].id for sources, _seconds in out] == ["d1", "d2", "d3"]
    asyncio.run(replica.retrieve("pathlib", 1, "dense"))  # alone again: straight to the stage
    assert queued == ["pathlib paths", "itertools chain"] and stage.calls[-1] == ["pathlib"]
    replica._config.retrieval_batch_wait_s = 0.01  # a configured wait means: always batch
    asyncio.run(replica.retrieve("pathlib", 1, "dense"))
    assert queued[-1] == "pathlib"


def test_partial_deployment_settings_keep_that_deployments_defaults():
    """`generator: {num_cpus: 1}` changes the CPUs only: the Ingress keeps its 64 ongoing requests
    and the Generator the 16 its engine loop batches (the generic default is 8)."""
    from deploy.config import ServeConfig

    cfg = ServeConfig.model_validate({"ingress": {"num_cpus": 0.2}, "retriever": {"num_cpus": 0.3},
                                      "generator": {"num_cpus": 1}})
    assert (cfg.ingress.max_ongoing_requests, cfg.retriever.max_ongoing_requests,
            cfg.generator.max_ongoing_requests) == (64, 32, 16)
    assert cfg.generator.num_cpus == 1 and cfg.ingress.num_cpus == 0.2
    assert ServeConfig.model_validate({"generator": {"max_ongoing_requests": 3}}).generator.max_ongoing_requests == 3


def test_batch_worker_passes_iterative_retrieval_to_every_question(monkeypatch):
    """`specrag batch --iterative --stride 8` reaches the pipeline as the request's retrieval
    options (the actor's pipeline, here the fake stages, answers in iterative mode)."""
    import fake_stages

    from deploy.batch import QAWorker

    seen = []
    real = fake_stages.GenerationStage.answer
    monkeypatch.setattr(fake_stages.GenerationStage, "answer",
                        lambda self, request, **kw: (seen.append(request.retrieval), real(self, request, **kw))[1])
    worker = QAWorker({"k": 2}, stages_module="fake_stages", retrieval={"iterative": True, "stride": 8})
    row = worker.answer_one("q1", "What does lru_cache do?", 6)
    assert row["ok"], row
    assert json.loads(row["line"])["answer"]
    assert [(r.iterative, r.stride, r.k) for r in seen] == [(True, 8, 2)]
    plain = QAWorker({"k": 2}, stages_module="fake_stages")
    plain.answer_one("q2", "What does lru_cache do?", 6)
    assert [r.iterative for r in seen] == [True, False]
