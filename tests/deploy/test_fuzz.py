"""The endpoint's own OpenAPI schema, fuzzed with schemathesis (bounded examples per operation):
no 5xx, every error in the ``{"error": {...}}`` shape, and with an API key configured every
``/v1/*`` operation without it is a 401. The HTTP app is the one the Ingress serves, over the
in-process backend and the stand-in stages (instant answers, so hundreds of examples stay cheap;
the real pipeline over real HTTP is test_deploy_serve.py / test_scale.py)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

import fake_stages  # noqa: E402
from deploy.http import HttpSettings, create_api  # noqa: E402
from deploy.runners import LocalBackend  # noqa: E402

API_KEY = "fuzz-key"
EXAMPLES = 60


def _app(api_key=None):
    backend = LocalBackend(fake_stages.RetrievalStage(None), fake_stages.GenerationStage(None))
    backend.generation.stage.retrieval = backend.retrieval.stage
    return create_api(backend, HttpSettings(model_name="smollm2-135m-instruct",
                                            accepted_models={"smollm2-135m-instruct"}, api_key=api_key))


open_schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
keyed_app = _app(API_KEY)
keyed_schema = schemathesis.openapi.from_asgi("/openapi.json", keyed_app)


def _check_shape(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert {"message", "type", "code"} <= set(body["error"]), body
        assert body["error"]["code"] == response.status_code
        assert "Traceback" not in response.text


@open_schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_5xx_and_errors_have_one_shape(case):
    _check_shape(case.call())


@keyed_schema.parametrize()
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
def test_v1_operations_without_the_key_are_401(case):
    if not case.path.startswith("/v1/") or case.method.upper() != case.operation.method.upper():
        _check_shape(case.call())          # other routes, and methods the schema does not define (405)
        return
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    response = case.call()
    assert response.status_code == 401, (response.status_code, response.text[:300])
    _check_shape(response)
    # ... and with it, the same request is not refused for auth
    case.headers["Authorization"] = f"Bearer {API_KEY}"
    response = case.call()
    assert response.status_code != 401
    _check_shape(response)
