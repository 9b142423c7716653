"""The HTTP layer (status codes, SSE framing, auth, metrics) over an in-process backend and the
stand-in stages: fast, no Ray. The real pipeline through Ray Serve: test_deploy_serve.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

import fake_stages
from deploy.http import HttpSettings, create_api
from deploy.runners import LocalBackend


def make_client(api_key=None) -> TestClient:
    backend = LocalBackend(fake_stages.RetrievalStage(None), fake_stages.GenerationStage(None))
    backend.generation.stage.retrieval = backend.retrieval.stage
    settings = HttpSettings(model_name="smollm2-135m-instruct", accepted_models={"smollm2-135m-instruct"},
                            api_key=api_key)
    return TestClient(create_api(backend, settings), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client():
    with make_client() as c:
        yield c


def ask(client, question="What does lru_cache do?", **kw):
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    body.update(kw)
    return client.post("/v1/chat/completions", json=body)


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_non_streaming_shape(client):
    r = ask(client)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert body["sources"][0]["id"] == "d1" and "token_ids" not in body["sources"][0]
    assert set(body["metrics"]) == {"speculation", "retrieval", "seconds"}
    assert body["metrics"]["retrieval"]["replica"] == "local"     # who answered (a Retriever replica id over Serve)


def test_streaming_equals_non_streaming_and_framing(client):
    plain = ask(client).json()["choices"][0]["message"]["content"]
    r = ask(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert last["sources"][0]["id"] == "d1"


def test_streaming_without_usage_puts_sources_on_finish_chunk(client):
    events = sse_events(ask(client, stream=True).text)
    last = events[-2]
    assert last["choices"][0]["finish_reason"] and last["sources"] and "usage" not in last


def test_stop_string(client):
    """(The iterative mode is tested over HTTP against the real pipeline: test_deploy_serve.py.)"""
    r = ask(client, stop=["maxsize"], max_tokens=30)
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert "maxsize" not in r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body,status", [
    ({"messages": "nope"}, 422),
    ({"model": "x"}, 422),
    ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}, 422),
    ({"messages": [{"role": "user", "content": "q"}], "retrieval": {"k": 0}}, 422),
    ({"messages": [{"role": "user", "content": "q"}], "speculation": {"drafters": ["lookahead"]}}, 422),
    ({"messages": [{"role": "system", "content": "only system"}]}, 400),
    ({"messages": [{"role": "user", "content": "   "}]}, 400),
    ({"messages": [{"role": "user", "content": "q"}], "n": 2}, 400),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}, 404),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, 400),
    ({"messages": [{"role": "user", "content": "STORE_DOWN please"}]}, 503),
    ({"messages": [{"role": "user", "content": "CRASH please"}]}, 500),
])
def test_error_statuses(client, body, status):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert "Traceback" not in r.text and "ZeroDivisionError" not in r.text


def test_prompt_too_long_message_has_limits(client):
    msg = ask(client, "x" * 3000).json()["error"]["message"]
    assert "context_tokens=2048" in msg


def test_invalid_json_is_422(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"


def test_streaming_error_before_first_token_has_status(client):
    r = ask(client, "STORE_DOWN", stream=True)
    assert r.status_code == 503


def _sample(text: str, series: str) -> float:
    """The value of one series in a Prometheus exposition; 0 while it has no line yet."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_models_health_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "smollm2-135m-instruct"
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    unavailable = 'specrag_errors_total{type="service_unavailable"}'
    before = _sample(client.get("/metrics").text, unavailable)
    ask(client)
    assert ask(client, "STORE_DOWN").status_code == 503
    text = client.get("/metrics").text
    assert 'specrag_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "specrag_tokens_generated_total" in text and "specrag_mean_accepted_tokens_per_forward" in text
    assert "specrag_request_latency_seconds_bucket" in text
    assert "specrag_retrieval_speculation_hit_rate 1.0" in text     # the fake stage: 4 of 4 verified
    assert _sample(text, unavailable) == before + 1     # the failed request counted once, by its type


def test_unknown_path_is_json_404(client):
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key():
    with make_client(api_key="s3cret") as c:
        assert ask(c).status_code == 401
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                   json={"messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                   json={"messages": [{"role": "user", "content": "q"}], "max_tokens": 3})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200  # probes stay open
        page = c.get("/")                             # the playground page asks for the key itself
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/playground.js">' in page.text and "https://" not in page.text   # no CDN
        script = c.get("/playground.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "/v1/chat/completions" in script.text
