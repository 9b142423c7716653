"""Starting Ray and the service from Python: used by ``specrag serve`` / ``batch``, the tests
and the benchmark, so all of them run the exact same application."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .config import ServeConfig

log = logging.getLogger(__name__)

APP_NAME = "specrag"
MB = 1024 * 1024

# Ray Serve's latency settings (its "throughput optimized" mode; direct ingress is switched on
# apart, see direct_ingress_env): handle calls between deployments over gRPC instead of Ray
# actor calls, user code and router on the replica's own event loop instead of extra threads,
# request-path (access) log lines written in batches of up to 1000 instead of one flush per
# request in every process a request passes (an ERROR line flushes at once), and objects made
# during start-up frozen out of the garbage collector's scans. Each Ingress -> Retriever /
# Generator hop then costs ~5 ms instead of ~7-11 ms on a 2-core machine; the log batching took
# ~1 ms off the paired overhead in probes there (benchmarks/results/serve.md).
# Read by every Ray process at import, so they go into the job's runtime_env, which the Serve
# controller, the proxy and the replicas inherit; an explicit value in the environment wins.
SERVE_LATENCY_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


# Ports handed to Ingress replicas under direct ingress: [port, port + DIRECT_INGRESS_PORTS).
DIRECT_INGRESS_PORTS = 100


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's direct ingress: every Ingress replica also answers HTTP itself, on its own
    port (the first replica on ``port`` if it is free, further ones on the next free ports of
    the range; :func:`direct_url` finds the one given), so
    a request skips the HTTP proxy and its proxy -> Ingress hop (~6-7 ms of the ~20 ms serving
    overhead on a 2-core machine, benchmarks/results/serve.md). Serve's proxy keeps serving the
    app on its own port, load-balanced over the Ingress replicas. A replica being stopped keeps
    its port open for the draining period (Ray's default 30 s, for external load balancers to
    deregister it); 1 s here, so Ctrl-C is quick. Read by the Serve controller and the replicas
    at import: goes into the job's runtime_env with :data:`SERVE_LATENCY_ENV`."""
    if not 0 < port <= 65536 - DIRECT_INGRESS_PORTS:
        raise ValueError(f"direct ingress port {port} out of range 1..{65536 - DIRECT_INGRESS_PORTS}")
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_INGRESS_PORTS - 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
            os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1"),
    }


def init_ray(*, address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 256,
             log_to_driver: bool = True, runtime_env: dict[str, Any] | None = None,
             direct_ingress_port: int | None = None) -> None:
    """Connect to ``address`` (a running cluster: "auto", "ray://host:10001") or start a small
    local Ray in this process: no dashboard, a modest object store (answers are tiny), workers
    at normal priority (Ray starts them at nice 15, so on a shared machine every replica, the
    model's forward passes included, yields to any other process), Serve's latency settings.
    ``direct_ingress_port``: Ingress replicas also answer HTTP themselves from that port on
    (:func:`direct_ingress_env`); takes effect where this job starts the Serve controller."""
    import ray

    if ray.is_initialized():
        return
    env = dict(runtime_env or {})
    # Only for Ray's processes (controller, proxy, replicas), not this driver: a handle whose
    # router runs on the current loop cannot be used from plain synchronous driver code.
    env_vars = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                **{key: os.environ.get(key, value) for key, value in SERVE_LATENCY_ENV.items()}}
    if direct_ingress_port is not None:
        env_vars.update(direct_ingress_env(direct_ingress_port))
    for key in ("SPECRAG_CACHE_DIR", "SPECRAG_API_KEY"):
        if os.environ.get(key):
            env_vars[key] = os.environ[key]
    env["env_vars"] = {**env_vars, **env.get("env_vars", {})}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
        return
    ray.init(
        num_cpus=num_cpus or max(2, os.cpu_count() or 2),
        include_dashboard=False,
        object_store_memory=object_store_mb * MB,
        log_to_driver=log_to_driver,
        runtime_env=env,
        _system_config={"worker_niceness": int(os.environ.get("RAY_worker_niceness", "0"))},
    )


def start_service(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
                  app_name: str = APP_NAME) -> str:
    """Deploy the app (blocks until every replica has loaded its models) and return its URL."""
    from ray import serve

    from .app import build_app

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config.model_dump(mode="json")), name=app_name, route_prefix="/")
    return _url(host, port)


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def direct_url(host: str, app_name: str = APP_NAME, timeout_s: float = 30.0) -> str | None:
    """The URL of the app's first Ingress replica under direct ingress (the lowest port the
    Serve controller gave one; it moves up the range when a port is taken), once it answers
    /health; None when there is none (direct ingress off, as on a cluster whose Serve
    controller was started without it)."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    # Not a public API yet: the controller's target groups are what Serve hands external load
    # balancers (HAProxy) in direct-ingress mode; they carry each Ingress replica's port.
    try:
        groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
    except Exception as exc:  # noqa: BLE001 - a Ray without it has no direct ingress either
        log.warning("cannot list the direct ingress ports (%s); serving through the proxy only", exc)
        return None
    ports = sorted(t.port for g in groups
                   if g.protocol == RequestProtocol.HTTP and g.app_name == app_name and g.ingress_deployment_name
                   for t in g.targets)
    if not ports:
        return None
    url = _url(host, ports[0])
    try:
        wait_healthy(url, timeout_s=timeout_s)
    except TimeoutError:
        return None
    return url


def wait_healthy(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll /health until 200 (the app answers 503 while something is not ready)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=10)
            if r.status_code == 200:
                return r.json()
            last = r.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not ready after {timeout_s:.0f}s: {last}")


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def examples(url: str, model: str, api_key: str | None) -> str:
    """The ready-to-paste curl and openai-python examples printed by ``specrag serve``."""
    auth = f' \\\n  -H "Authorization: Bearer {api_key}"' if api_key else ""
    key = repr(api_key) if api_key else '"unused"'
    return f"""\
curl {url}/v1/chat/completions \\
  -H "Content-Type: application/json"{auth} \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What does functools.lru_cache do?"}}], "max_tokens": 64}}'

python - <<'EOF'
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key={key})
stream = client.chat.completions.create(
    model="{model}", stream=True, max_tokens=64,
    messages=[{{"role": "user", "content": "What does functools.lru_cache do?"}}])
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
EOF"""
