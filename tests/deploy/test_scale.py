"""Scale out and survive, on Ray's own machinery, with the real pipeline over real HTTP: Serve
adds a Generator replica under load and removes it after (read from ``serve.status()``), two
Retriever replicas share one Redis (a query answered by one is a cache hit on the other), 200
mixed requests at concurrency 16 lose nothing, and a Generator replica killed mid-load (through
Ray's API) fails its in-flight requests with a clear 5xx JSON error, never a hang, while Serve
restores it. Bounded in requests and time; loopback only."""

from __future__ import annotations

import concurrent.futures as cf
import json
import statistics
import threading
import time
import uuid

import pytest

from deploy_helpers import QUESTIONS, REDIS_URL, free_port, load_until, running_replicas, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

APP = "specrag"
K = 1                      # one source per question: short prompts keep 200 CPU requests quick
# Serve's autoscaling metrics are pushed every 10 s by default: 0.5 s here, so a bounded load
# of a few tens of seconds is seen (read by the controller and replicas: job runtime_env)
FAST_METRICS = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


def _config(index_dir):
    from deploy.config import ServeConfig

    return ServeConfig.model_validate({
        "pipeline": {"index_dir": str(index_dir), "redis_url": REDIS_URL, "max_tokens": 16, "k": K},
        "torch_threads": 1,
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64},
        # two fixed Retriever replicas on one Redis (shared document store and retrieval cache)
        "retriever": {"num_cpus": 0.2, "num_replicas": 2, "max_ongoing_requests": 32},
        # short delays and windows: 1 -> 2 replicas within seconds of a load, back to 1 after it
        "generator": {"num_cpus": 0.5, "max_ongoing_requests": 8, "health_check_timeout_s": 60,
                      "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                      "upscale_delay_s": 1, "downscale_delay_s": 4,
                                      "look_back_period_s": 2, "metrics_interval_s": 0.5}},
    })


@pytest.fixture(scope="module")
def service(deploy_index):
    from deploy import local

    local.init_ray(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": FAST_METRICS})
    try:
        url = local.start_service(_config(deploy_index), port=free_port(), app_name=APP)
        local.wait_healthy(url, timeout_s=180)
        yield url
    finally:
        local.shutdown()


def running(deployment: str) -> int:
    return running_replicas(APP, deployment)


def post(url: str, question: str, *, stream: bool = False, max_tokens: int = 8, timeout: float = 120):
    """One chat request: (status, answer text, body or final chunk)."""
    import httpx

    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
        data = r.json()
        text = data["choices"][0]["message"]["content"] if r.status_code == 200 else None
        return r.status_code, text, data
    text, last, status = [], None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        status = r.status_code
        if status != 200:
            r.read()
            return status, None, r.json()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return int(event["error"].get("code") or 500), None, event
            last = event
            for choice in event.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    return status, "".join(text), last


class Timeline:
    """Generator replicas over time, polled from serve.status() while a load runs."""

    def __init__(self, deployment: str = "Generator"):
        self.deployment, self.points, self._stop = deployment, [], threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.points.append((round(time.monotonic() - self._t0, 1), running(self.deployment)))
            except Exception:  # noqa: BLE001 - a status call during a scale event; try again
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def test_retriever_replicas_share_the_cache_and_the_store(service):
    """A query first answered by one Retriever replica is a cache hit on the other; both serve
    chunk text from the one store the index was written to once."""
    assert running("Retriever") == 2
    replicas, crossed = set(), 0
    for n in range(3):
        q = f"{QUESTIONS[n % len(QUESTIONS)]} ({uuid.uuid4().hex[:8]})"    # never asked before
        status, _, first = post(service, q, max_tokens=1)
        assert status == 200, first
        r1 = first["metrics"]["retrieval"]
        assert r1["cache_misses"] == 1 and r1["cache_hits"] == 0, r1
        assert first["sources"] and first["sources"][0]["text"]
        replicas.add(r1["replica"])
        for _ in range(16):      # Serve routes at random between idle replicas: try until the other one
            status, _, again = post(service, q, max_tokens=1)
            assert status == 200, again
            r2 = again["metrics"]["retrieval"]
            replicas.add(r2["replica"])
            if r2["replica"] != r1["replica"]:
                assert r2["cache_hits"] == 1 and r2["cache_misses"] == 0, (r1, r2)
                assert [s["id"] for s in again["sources"]] == [s["id"] for s in first["sources"]]
                assert again["sources"][0]["text"] == first["sources"][0]["text"]
                crossed += 1
                break
    assert len(replicas) == 2, replicas
    assert crossed == 3, "a query never reached the second Retriever replica"


def test_generator_scales_up_under_load_and_back_down(service):
    """1 -> 2 Generator replicas under a bounded load, every request answered, back to 1 after."""
    assert wait_for(lambda: running("Generator") == 1, 60, "one Generator replica at rest")
    question = lambda i: f"{QUESTIONS[i % len(QUESTIONS)]} Variant {i}."  # noqa: E731
    with Timeline() as timeline:
        # 32 requests, and on (up to 128) until the second replica runs
        results = load_until(lambda i: post(service, question(i), max_tokens=32),
                             lambda: any(n >= 2 for _, n in timeline.points), clients=8, min_requests=32,
                             max_requests=128)
        peak = max((n for _, n in timeline.points), default=0)
        wait_for(lambda: running("Generator") == 1, 90, "scale-down to one Generator replica")
        timeline.points.append((round(time.monotonic() - timeline._t0, 1), running("Generator")))
    print(f"\nGenerator replicas over time (s, running): {timeline.points}")
    assert len(results) >= 32
    assert [s for s, _, _ in results] == [200] * len(results), [b for s, _, b in results if s != 200][:3]
    assert peak >= 2, f"Serve never added a Generator replica: {timeline.points}"
    assert timeline.points[-1][1] == 1


def test_200_mixed_requests_at_concurrency_16(service):
    """200 requests (half streamed, mixed max_tokens) at concurrency 16: no error, none lost or
    duplicated, every streamed answer equal to its non-streamed twin; latency percentiles printed."""
    jobs = []
    for i in range(100):
        q = f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"
        max_tokens = (1, 4, 8, 16)[i % 4]
        jobs += [(i, q, False, max_tokens), (i, q, True, max_tokens)]

    def run(job):
        i, q, stream, max_tokens = job
        t0 = time.perf_counter()
        status, text, body = post(service, q, stream=stream, max_tokens=max_tokens)
        return i, stream, status, text, body, time.perf_counter() - t0

    with cf.ThreadPoolExecutor(16) as pool:
        out = list(pool.map(run, jobs))
    errors = [(i, s, b) for i, _, s, _, b, _ in out if s != 200]
    assert not errors, errors[:3]
    assert len(out) == 200
    answers = {}
    ids = set()
    for i, stream, _, text, body, _ in out:
        assert (i, stream) not in answers, "a response arrived twice"
        answers[(i, stream)] = text
        ids.add(body["id"])
    assert len(ids) == 200, "completion ids repeat: responses were duplicated or crossed"
    for i in range(100):
        assert answers[(i, True)] == answers[(i, False)], (i, answers[(i, True)], answers[(i, False)])
        assert answers[(i, False)], i
    lat = sorted(t for *_, t in out)
    p50, p99 = statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]
    print(f"\n200 requests at concurrency 16: p50 {p50:.2f} s, p99 {p99:.2f} s, max {lat[-1]:.2f} s")


def test_killed_generator_replica_fails_cleanly_and_is_restored(service):
    """The Generator's replicas killed mid-load (ray.kill of their actors): in-flight requests finish or
    fail with a 5xx JSON error in bounded time, new requests succeed within 30 s, Serve starts a
    replacement replica."""
    import ray

    def replica_actors() -> set[str]:
        """Names of the Generator's replica actors (Serve names them after app and deployment)."""
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and f"{APP}#Generator#" in a["name"]}

    assert wait_for(lambda: running("Generator") >= 1, 60, "a running Generator replica")
    before = replica_actors()
    assert before, ray.util.list_named_actors(all_namespaces=True)
    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} Under fault {i}." for i in range(12)]
    with cf.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(post, service, q, stream=bool(i % 2), max_tokens=48, timeout=90)
                   for i, q in enumerate(questions)]
        time.sleep(3)                       # requests are in flight
        # every Generator replica alive now: with one left, the autoscaler may keep just that one
        # (min_replicas is 1) and no replacement is owed, so the restore would be a race
        victims = replica_actors()
        for victim in sorted(victims):
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        t_kill = time.monotonic()
        done = [f.result(timeout=120) for f in futures]     # never a hang
    statuses = [s for s, _, _ in done]
    print(f"\nstatuses of the in-flight requests after the kill: {statuses}")
    for status, text, body in done:
        if status == 200:
            assert text is not None
        else:
            assert 500 <= status < 600, (status, body)
            assert set(body["error"]) >= {"message", "type", "code"}, body
            assert "Traceback" not in json.dumps(body)

    def answers():
        status, _, _ = post(service, QUESTIONS[0], max_tokens=4, timeout=30)
        return status == 200

    wait_for(answers, 30, "a new request answered after the kill", poll_s=1)
    print(f"answered again {time.monotonic() - t_kill:.1f} s after the kill")
    wait_for(lambda: replica_actors() - before - victims and running("Generator") >= 1, 120,
             "Serve restoring a Generator replica")
