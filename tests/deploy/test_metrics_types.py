"""/metrics through prometheus_client and the chat-completion shapes through the openai types:
the exposition is parsed by prometheus_client's own parser, and every response and streamed
chunk of the real builders (deploy/openai_api.py, via the HTTP app over the stand-in stages)
is parsed by ``ChatCompletion`` / ``ChatCompletionChunk``, so a drift in either is caught."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from openai.types import CompletionUsage
from openai.types.completion_usage import PromptTokensDetails
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

import fake_stages
from deploy import openai_api as oa
from deploy.http import HttpSettings, create_api
from deploy.metrics import ServiceMetrics
from deploy.runners import LocalBackend
from pipeline.api import AskResult, Source


def _result(finish_reason: str = "length", **stats) -> AskResult:
    return AskResult(answer="a b c", token_ids=[1, 2, 3], finish_reason=finish_reason,  # type: ignore[arg-type]
                     sources=[Source(id="d1", title="t", source="s.rst", score=0.5, text="x", token_ids=[7])],
                     prompt_tokens=10, stats=stats)


def _samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, read back with prometheus_client's parser."""
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# -- /metrics ------------------------------------------------------------------------------------
def test_hit_rate_is_verified_over_speculated():
    """What the pipeline reports (pipeline/iterative.py): of 4 speculated retrievals 2 were
    verified, 1 mismatched, and the one after the mismatch was dropped unverified. The hit rate
    is 2/4; the old ``speculated - mismatched`` made it 3/4."""
    m = ServiceMetrics()
    m.result(_result(retrievals={"real": 3, "speculated": 4, "verified": 2, "mismatched": 1, "batches": 2}))
    m.result(_result(retrievals={"real": 1, "speculated": 0, "verified": 0, "mismatched": 0, "batches": 1}))
    s = _samples(m)
    assert s[("specrag_retrievals_speculated_total", ())] == 4
    assert s[("specrag_retrieval_speculation_hits_total", ())] == 2
    assert s[("specrag_retrieval_speculation_hit_rate", ())] == 0.5


def test_metrics_come_from_a_registry_of_their_own():
    """Each ServiceMetrics exposes its own prometheus_client registry (not the global one): two
    apps in one process count apart, and the render is prometheus_client's."""
    a, b = ServiceMetrics(), ServiceMetrics()
    assert isinstance(a.registry, CollectorRegistry) and a.registry is not b.registry
    a.request("/v1/chat/completions", 200, 0.02)
    assert a.render() == generate_latest(a.registry)
    assert a.content_type == CONTENT_TYPE_LATEST
    assert ("specrag_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200"))) in _samples(a)
    assert not any(name == "specrag_requests_total" for name, _ in _samples(b))


def test_exposition_keeps_every_name_and_label():
    """The names and labels README.md documents, with the values one request of each kind gives."""
    m = ServiceMetrics()
    m.request("/v1/chat/completions", 200, 0.02)
    m.request("/v1/chat/completions", 401, 0.0)
    m.error("authentication_error")
    m.first_token(0.3)
    m.result(_result(target_forwards=2, draft_tokens=4, accepted_tokens=1, mean_rows_per_step=3.0,
                     mean_step_seconds=0.04, predicted_seconds=0.1,
                     by_drafter={"llma": {"reached": [4, 2], "accepted_at": [2, 1]}},
                     retrievals={"real": 1, "speculated": 2, "verified": 2, "mismatched": 0, "batches": 1}))
    s = _samples(m)
    ep = ("endpoint", "/v1/chat/completions")
    assert s[("specrag_requests_total", (ep, ("status", "200")))] == 1
    assert s[("specrag_requests_total", (ep, ("status", "401")))] == 1
    assert s[("specrag_errors_total", (("type", "authentication_error"),))] == 1
    assert s[("specrag_request_latency_seconds_bucket", (ep, ("le", "0.01")))] == 1     # the 401 at 0 s
    assert s[("specrag_request_latency_seconds_bucket", (ep, ("le", "0.025")))] == 2    # and the 200
    assert s[("specrag_request_latency_seconds_count", (ep,))] == 2
    assert s[("specrag_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 0
    assert s[("specrag_time_to_first_token_seconds_bucket", (("le", "0.5"),))] == 1
    assert s[("specrag_engine_batch_rows_bucket", (("le", "4.0"),))] == 1
    assert s[("specrag_engine_step_seconds_sum", ())] == pytest.approx(0.04)
    assert s[("specrag_engine_predicted_seconds_total", ())] == pytest.approx(0.1)
    assert s[("specrag_engine_measured_seconds_total", ())] == pytest.approx(0.08)
    assert s[("specrag_draft_position_reached_total", (("drafter", "llma"), ("position", "2")))] == 2
    assert s[("specrag_draft_position_accepted_total", (("drafter", "llma"), ("position", "1")))] == 2
    assert s[("specrag_tokens_generated_total", ())] == 3
    assert s[("specrag_prompt_tokens_total", ())] == 10
    assert s[("specrag_target_forwards_total", ())] == 2
    assert s[("specrag_draft_tokens_total", ())] == 4
    assert s[("specrag_accepted_draft_tokens_total", ())] == 1
    assert s[("specrag_mean_accepted_tokens_per_forward", ())] == 1.5
    assert s[("specrag_draft_acceptance_rate", ())] == 0.25
    assert s[("specrag_retrieval_speculation_hit_rate", ())] == 1.0


def test_ratios_are_zero_before_any_request():
    s = _samples(ServiceMetrics())
    for name in ("specrag_mean_accepted_tokens_per_forward", "specrag_draft_acceptance_rate",
                 "specrag_retrieval_speculation_hit_rate"):
        assert s[(name, ())] == 0.0


# -- response shapes -----------------------------------------------------------------------------
def _client() -> TestClient:
    backend = LocalBackend(fake_stages.RetrievalStage(None), fake_stages.GenerationStage(None))
    backend.generation.stage.retrieval = backend.retrieval.stage
    return TestClient(create_api(backend, HttpSettings(model_name="m")), raise_server_exceptions=False)


def _chunks(text: str) -> list[dict]:
    blocks = [b[len("data: "):] for b in text.split("\n\n") if b.strip()]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


def test_every_response_and_chunk_parses_as_the_openai_types():
    body = {"messages": [{"role": "user", "content": "What does lru_cache do?"}], "max_tokens": 6}
    with _client() as c:
        plain = c.post("/v1/chat/completions", json=body)
        streams = [c.post("/v1/chat/completions", json={**body, "stream": True, **opts})
                   for opts in ({}, {"stream_options": {"include_usage": True}})]
        metrics = c.get("/metrics")
    assert plain.status_code == 200, plain.text
    r = ChatCompletion.model_validate(plain.json())
    assert r.usage == CompletionUsage(prompt_tokens=14, completion_tokens=6, total_tokens=20,
                                 prompt_tokens_details=PromptTokensDetails(cached_tokens=0))
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert set(r.model_extra or {}) == {"sources", "metrics"}
    assert set(r.choices[0].message.model_extra or {}) == {"provenance"}
    for stream, with_usage in zip(streams, (False, True)):
        assert stream.status_code == 200, stream.text
        chunks = [ChatCompletionChunk.model_validate(c) for c in _chunks(stream.text)]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content
        carrier = chunks[-1]          # sources and metrics ride on the usage chunk or the finish chunk
        assert set(carrier.model_extra or {}) == {"sources", "metrics", "provenance"}
        assert (carrier.usage == r.usage and carrier.choices == []) if with_usage else \
            (carrier.usage is None and carrier.choices[0].finish_reason == "length")
    assert metrics.headers["content-type"] == CONTENT_TYPE_LATEST
    assert 'specrag_requests_total{endpoint="/v1/chat/completions",status="200"} 3.0' in metrics.text


def test_builders_refuse_what_the_openai_types_refuse():
    """The builders construct the openai types, so a field the types do not accept fails where
    the body is made, not in a client's parser."""
    with pytest.raises(ValidationError):
        oa.completion_body(_result(finish_reason="cancelled"), model="m", completion_id="chatcmpl-1")
    with pytest.raises(ValidationError):
        oa.chunk(model="m", completion_id="chatcmpl-1", created=1, delta={}, finish_reason="cancelled")
    with pytest.raises(ValidationError):
        oa.chunk(model="m", completion_id="chatcmpl-1", created=1, delta={"role": "robot"})


def test_builders_keep_our_extra_fields_and_no_empty_ones():
    body = oa.completion_body(_result(), model="m", completion_id="chatcmpl-1", created=5)
    assert body == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b c", "provenance": []},
                     "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                                                "prompt_tokens_details": {"cached_tokens": 0}},
        "sources": [{"id": "d1", "title": "t", "source": "s.rst", "score": 0.5, "text": "x", "spans": []}],
        "metrics": {"speculation": {}, "retrieval": {}, "seconds": {}},
    }
    last = oa.chunk(model="m", completion_id="chatcmpl-1", created=5, empty_choices=True,
                    usage=oa.usage(_result()), sources=[])
    assert last == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m",
                    "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                                                "prompt_tokens_details": {"cached_tokens": 0}},
                    "sources": []}
