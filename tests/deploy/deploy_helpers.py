"""Shared set-up for the deploy tests that run the real pipeline: a small real index (two
python-docs modules) written to the real Redis, free ports, subprocess handling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from questions import SERVE_QUESTIONS

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REDIS_URL = os.environ.get("SPECRAG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PYDOCS = "python-docs:functools,json"

QUESTIONS = SERVE_QUESTIONS[:4]   # the ones PYDOCS answers (the serving benchmarks ask them all)


def require_redis(url: str = REDIS_URL) -> None:
    """Fail (not skip) when the real Redis is absent: these tests exist to prove we use it."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis is not reachable at {url} ({exc}); start it with scripts/ensure_redis.sh "
                    f"(make test does this)", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """The test process's environment (offline: tests/conftest.py), no Ray usage reports,
    unbuffered output (tests read it as it comes), and a local Ray of its own."""
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def build_index(index_dir: Path, redis_url: str | None = REDIS_URL, name: str | None = None) -> str:
    """Ingest the two-module python-docs corpus; returns the Redis namespace used."""
    name = name or f"deploytest-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "specrag"), "ingest", PYDOCS, "--index", str(index_dir), "--index-name", name, "--json"]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return name


def drop_redis_namespace(name: str, url: str = REDIS_URL) -> None:
    import redis

    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=2)
        keys = list(r.scan_iter(f"specrag:{name}:*", count=1000))
        if keys:
            r.delete(*keys)
    except Exception:  # noqa: BLE001 - best effort clean-up
        pass


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a service the test stops with Ctrl-C (SIGINT): SIGINT handled as in a
    terminal. A test run started in the background by a non-interactive shell (``cmd &``)
    inherits SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt in the
    children either (seen: `specrag serve` ignoring the test's Ctrl-C in such a CI run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60.0) -> int:
    """Send ``sig`` to the process's group, wait, then SIGKILL whatever is left."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(timeout=30)


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} not ready within {timeout:.0f}s")


BANNER_END = "from openai import OpenAI"   # in the last example `specrag serve` prints


def wait_banner(log: Path, timeout_s: float = 15.0) -> str:
    """The output of a `specrag serve` writing to ``log`` once its banner (the ready-to-paste
    examples, printed right after /health turns green) is there; fails if it does not come."""
    def banner() -> str:
        text = log.read_text()
        return text if BANNER_END in text else ""

    return wait_for(banner, timeout_s, f"the banner of `specrag serve` in {log}")


def chat(url: str, question: str, *, api_key: str | None = None, **extra) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": question}],
            "max_tokens": 24, "temperature": 0}
    body.update(extra)
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll ``predicate`` until it returns something true (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what} not within {timeout_s:.0f}s")


def running_replicas(app: str, deployment: str) -> int:
    """RUNNING replicas of a deployment, from Serve's own status API."""
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def load_until(send, done, *, clients: int, min_requests: int, max_requests: int) -> list:
    """A closed-loop load of ``clients`` threads calling ``send(i)`` (i = 0, 1, ...): at least
    ``min_requests``, then on until ``done()`` is true (what the load is for was seen) or
    ``max_requests`` were sent. A faster engine answers a fixed load before Serve's scale-up
    lands; this keeps the load on until it has. Returns the results in request order."""
    import threading

    lock = threading.Lock()
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    issued = [0]

    def client() -> None:
        while not errors:
            with lock:
                i = issued[0]
                if i >= max_requests or (i >= min_requests and done()):
                    return
                issued[0] += 1
            try:
                results[i] = send(i)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[i] for i in sorted(results)]
