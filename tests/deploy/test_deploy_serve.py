"""The real application on a local Ray Serve, called over real HTTP: the official openai client
(streaming and not), raw HTTP for every error status, the real Redis as document store and
cache, answers compared with the in-process pipeline. One Serve app for the whole module
(Ray start-up is the slow part on a small machine)."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from deploy_helpers import QUESTIONS, REDIS_URL, chat, free_port, stop_process_group

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

API_KEY = "test-key-123"
K = 2  # sources per question: short prompts keep CPU generation quick
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def index(deploy_index):
    return deploy_index


def _config(index_dir, redis_url, **extra):
    from deploy.config import ServeConfig

    return ServeConfig.model_validate({
        "pipeline": {"index_dir": str(index_dir), "redis_url": redis_url, "max_tokens": MAX_TOKENS, "k": K},
        "api_key": API_KEY,
        "torch_threads": 1,
        "generator": {"num_cpus": 0.5, "max_ongoing_requests": 8, "health_check_timeout_s": 60},
        **extra,
    })


DIRECT_PORT = free_port()  # the Ingress replica's own HTTP port (Ray Serve's direct ingress)


@pytest.fixture(scope="module")
def service(index):
    """The URL of Serve's HTTP proxy (the app is also reachable directly, see ``direct``)."""
    from deploy import local

    local.init_ray(num_cpus=2, log_to_driver=False, direct_ingress_port=DIRECT_PORT)
    try:
        url = local.start_service(_config(index, REDIS_URL), port=free_port())
        local.wait_healthy(url, timeout_s=120)
        yield url
    finally:
        local.shutdown()


@pytest.fixture(scope="module")
def direct(service):
    """The Ingress replica's own URL: the same app without the proxy hop."""
    from deploy import local

    url = local.direct_url("127.0.0.1")
    assert url is not None, "the Ingress replica does not answer on a direct ingress port"
    assert int(url.rsplit(":", 1)[1]) in range(DIRECT_PORT, DIRECT_PORT + local.DIRECT_INGRESS_PORTS)
    return url


@pytest.fixture(scope="module")
def inproc(index):
    from pipeline.config import PipelineConfig
    from pipeline.rag import RAGPipeline

    return RAGPipeline(PipelineConfig(index_dir=str(index), redis_url=REDIS_URL, max_tokens=MAX_TOKENS, k=K))


@pytest.fixture(scope="module")
def client(direct):
    """The openai client on the URL ``specrag serve`` prints first (direct ingress)."""
    from openai import OpenAI

    return OpenAI(base_url=direct + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _ask(client, question, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(model="smollm2-135m-instruct",
                                          messages=[{"role": "user", "content": question}], **kw)


def _stream_text(client, question, **kw):
    chunks = list(_ask(client, question, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_openai_client_non_streaming(client):
    r = _ask(client, QUESTIONS[0])
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    extra = r.model_extra
    assert extra["sources"] and {"id", "title", "source", "score", "text"} <= set(extra["sources"][0])
    assert set(extra["metrics"]) == {"speculation", "retrieval", "seconds"}
    seconds = extra["metrics"]["seconds"]
    assert seconds["retrieval"] > 0 and seconds["total_endpoint"] >= seconds["total"]


def test_streamed_text_equals_non_streamed(client):
    for q in QUESTIONS[:2]:
        plain = _ask(client, q).choices[0].message.content
        text, chunks = _stream_text(client, q, stream_options={"include_usage": True})
        assert text == plain
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens > 0
        # the one Generator replica answered this very prompt just before: its prefix cache
        # holds all of it but the pending token
        assert last.usage.prompt_tokens_details.cached_tokens == last.usage.prompt_tokens - 1
        assert last.model_extra["sources"]
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finishes) == 1


def test_answers_equal_in_process_pipeline(client, inproc):
    from pipeline.api import AskRequest, RetrievalOptions

    for q in QUESTIONS[:2]:
        http = _ask(client, q)
        local = inproc.answer(AskRequest(question=q, max_tokens=MAX_TOKENS, retrieval=RetrievalOptions(k=K)))
        assert http.choices[0].message.content == local.answer, q
        assert [s["id"] for s in http.model_extra["sources"]] == [s.id for s in local.sources]


def test_iterative_mode_over_http_equals_in_process(client, inproc):
    """Iterative retrieval runs inside the Generator and calls the Retriever deployment."""
    from pipeline.api import AskRequest, RetrievalOptions

    q = QUESTIONS[0]
    http = _ask(client, q, extra_body={"retrieval": {"iterative": True, "stride": 4, "k": 1}})
    local = inproc.answer(AskRequest(question=q, max_tokens=MAX_TOKENS,
                                     retrieval=RetrievalOptions(k=1, iterative=True, stride=4)))
    assert http.choices[0].message.content == local.answer
    # streamed, it arrives stride by stride: the first text left the Generator after the first
    # stride of four (MAX_TOKENS 16 / stride 4), not with the rest at the end
    text, chunks = _stream_text(client, q, extra_body={"retrieval": {"iterative": True, "stride": 4, "k": 1}})
    assert text == local.answer
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    seconds = next(c.model_extra["metrics"]["seconds"] for c in reversed(chunks) if (c.model_extra or {}).get("metrics"))
    assert seconds["first_text"] < 0.75 * seconds["total"], seconds


def test_speculation_off_gives_the_same_text(client):
    """Speculation on, off, and with the drafters a request picks (draft trees): one text."""
    q = QUESTIONS[1]
    on = _ask(client, q).choices[0].message.content
    off = _ask(client, q, extra_body={"speculation": {"enabled": False}}).choices[0].message.content
    tree = _ask(client, q, extra_body={"speculation": {"drafters": ["tree", "prompt_lookup"]}})
    assert on == off == tree.choices[0].message.content
    assert "tree" in tree.model_extra["metrics"]["speculation"]["by_drafter"] or \
        tree.model_extra["metrics"]["speculation"]["draft_tokens"] == 0


def test_sampling_params_are_honoured(client):
    """seed makes sampling reproducible; a stop string cuts the greedy answer right before it."""
    q = QUESTIONS[0]
    a = _ask(client, q, temperature=0.9, top_p=0.95, seed=7).choices[0].message.content
    b = _ask(client, q, temperature=0.9, top_p=0.95, seed=7).choices[0].message.content
    assert a == b
    greedy = _ask(client, q).choices[0].message.content
    words = greedy.split()
    assert len(words) >= 3, greedy
    stop = words[2]
    cut = _ask(client, q, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == greedy[:greedy.index(stop)]


def test_proxy_and_direct_ingress_answer_alike(service, direct):
    """Both ways into the app: same greedy answer, same sources, same error body."""
    a = chat(service, QUESTIONS[3], api_key=API_KEY, max_tokens=8)
    b = chat(direct, QUESTIONS[3], api_key=API_KEY, max_tokens=8)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
    assert [s["id"] for s in a.json()["sources"]] == [s["id"] for s in b.json()["sources"]]
    a, b = chat(service, QUESTIONS[3]), chat(direct, QUESTIONS[3])  # no API key
    assert a.status_code == b.status_code == 401 and a.json() == b.json()


@pytest.mark.parametrize("way", ["proxy", "direct"])
def test_error_statuses_over_raw_http(way, request):
    import httpx

    service = request.getfixturevalue("service" if way == "proxy" else "direct")
    h = {"Authorization": f"Bearer {API_KEY}"}
    url = service + "/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{broken", headers={**h, "content-type": "application/json"}), 422),
        (httpx.post(url, json={"messages": "x"}, headers=h), 422),
        (httpx.post(url, json={"messages": [{"role": "user", "content": ""}]}, headers=h), 400),
        (httpx.post(url, json={"messages": [{"role": "system", "content": "hi"}]}, headers=h), 400),
        (httpx.post(url, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}, headers=h), 404),
        (httpx.post(url, json={"messages": [{"role": "user", "content": "q"}]}), 401),
        (httpx.post(url, json={"messages": [{"role": "user", "content": "q"}]},
                    headers={"Authorization": "Bearer wrong"}), 401),
        (httpx.get(service + "/v1/models"), 401),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["message"] and err["type"]
        assert "Traceback" not in resp.text


def test_prompt_beyond_context_is_400_with_limits(service):
    long_q = "Explain this: " + "lorem ipsum dolor sit amet " * 2500  # ~12k tokens > 8k context
    r = chat(service, long_q, api_key=API_KEY)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert any(ch.isdigit() for ch in msg), msg  # the limits are in the message
    r = chat(service, long_q, api_key=API_KEY, stream=True)
    assert r.status_code == 400


def test_models_health_metrics(service, client):
    import httpx

    assert [m.id for m in client.models.list().data][0] == "smollm2-135m-instruct"
    h = httpx.get(service + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["threads"] == 1             # torch_threads as configured (Ray's own would be 1 too)
    _ask(client, QUESTIONS[2])
    text = httpx.get(service + "/metrics").text
    for name in ("specrag_requests_total", "specrag_errors_total", "specrag_request_latency_seconds_bucket",
                 "specrag_tokens_generated_total", "specrag_mean_accepted_tokens_per_forward",
                 "specrag_draft_acceptance_rate", "specrag_retrieval_speculation_hit_rate"):
        assert name in text
    line = next(l for l in text.splitlines() if l.startswith("specrag_tokens_generated_total"))
    assert float(line.split()[-1]) > 0


def _retrieval_batch(response) -> int:
    """The queries in the Retriever's stage call that served a request: that call's retrieval-cache
    hits + misses (one of either per query), which the response's metrics carry."""
    r = response.json()["metrics"]["retrieval"]
    return r["cache_hits"] + r["cache_misses"]


def _drop_cached_queries(index_dir) -> None:
    """Empty the retrieval cache of the module's index (its chunks stay): queries missing the
    cache embed, which keeps the Retriever busy long enough for concurrent ones to queue."""
    import redis

    from retrieval.manifest import Manifest

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"specrag:{Manifest.load(index_dir).index_name}:q:*", count=1000))
    if keys:
        r.delete(*keys)


def test_concurrent_requests_share_one_engine_loop(service, index):
    """8 clients at once: the Retriever takes their queries in batches (``@serve.batch``), the one
    Generator replica steps them together in one engine loop (their forwards hold several rows),
    and each gets the answer it gets alone."""
    import concurrent.futures as cf

    import httpx

    questions = QUESTIONS + [q + " Answer in one sentence." for q in QUESTIONS]
    alone = [chat(service, q, api_key=API_KEY, max_tokens=12) for q in questions]
    assert [r.status_code for r in alone] == [200] * 8
    assert [_retrieval_batch(r) for r in alone] == [1] * 8       # one at a time: batches of one
    steps_before = httpx.get(service + "/health").json()["engine"]["steps"]
    _drop_cached_queries(index)
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: chat(service, q, api_key=API_KEY, max_tokens=12), questions))
    assert [r.status_code for r in together] == [200] * 8
    for q, a, b in zip(questions, alone, together):
        assert b.json()["choices"][0]["message"]["content"] == a.json()["choices"][0]["message"]["content"], q
    # every request reports the size of the Retriever's stage call that served it (n requests
    # reporting a size s: n is a multiple of s). With retrieval_batch_wait_s 0 a query joins a
    # batch only when it arrives while another is embedding, so whether these 8 batch depends on
    # the machine's timing (seen: [1,1,1,2,2,3,3,3], and all 1s): that the replica batches the
    # queries queued behind one in flight is proven with events in test_deploy_units.py
    batches = sorted(_retrieval_batch(r) for r in together)
    print(f"Retriever batch sizes seen by the 8 concurrent requests: {batches}")
    assert all(batches.count(s) % s == 0 for s in set(batches)), batches
    assert [r.json()["metrics"]["retrieval"]["cache_hits"] for r in together] == [0] * 8   # all embedded anew
    rows = [r.json()["metrics"]["speculation"]["mean_rows_per_step"] for r in together]
    assert max(rows) >= 2, rows
    engine = httpx.get(service + "/health").json()["engine"]
    assert engine["max_rows_per_step"] >= 4 and engine["steps"] > steps_before
    metrics = httpx.get(service + "/metrics").text
    assert "specrag_engine_batch_rows_bucket" in metrics and "specrag_engine_step_seconds_bucket" in metrics


def test_cancelled_stream_frees_its_slot(service):
    """A client that goes away mid-stream: its sequence leaves the engine loop at once."""
    import httpx

    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": QUESTIONS[0]}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", service + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while "content" not in next(lines):
            pass
        assert httpx.get(service + "/health").json()["engine"]["running"] == 1
    deadline = time.monotonic() + 20
    while httpx.get(service + "/health").json()["engine"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(service + "/health").json()["engine"]["running"] == 0


def test_redis_outage_is_503_and_recovers(service, index, tmp_path):
    """A second app on a private redis-server, under a steady load: stop Redis -> every request
    in that window fails fast with 503 (not 500, no hang), restart -> everything answers again,
    with no restart of the service."""
    import shutil

    import httpx
    from ray import serve

    from deploy.app import build_app

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.fail("redis-server binary not found (scripts/ensure_redis.sh installs it)")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis():
        proc = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        import redis

        for _ in range(50):
            try:
                redis.Redis(port=port).ping()
                return proc
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise AssertionError("private redis-server did not start")

    proc = start_redis()
    load_stop = threading.Event()
    log: list[tuple[float, float, int, str]] = []      # (start, seconds, status, error type)

    def load(worker: int) -> None:
        i = 0
        while not load_stop.is_set():
            i += 1
            q = f"{QUESTIONS[(worker + i) % len(QUESTIONS)]} (load {worker}.{i})"   # never cached
            t = time.monotonic()
            r = chat(base, q, api_key=API_KEY, max_tokens=2)
            kind = r.json().get("error", {}).get("type", "") if r.status_code != 200 else ""
            log.append((t, time.monotonic() - t, r.status_code, kind))

    try:
        cfg = _config(index, url)
        serve.run(build_app(cfg.model_dump(mode="json")), name="outage", route_prefix="/outage")
        base = service + "/outage"
        first = chat(base, QUESTIONS[0], api_key=API_KEY, max_tokens=4)
        assert first.status_code == 200, first.text
        workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(3)]
        for w in workers:
            w.start()
        time.sleep(3)                                   # load running against a healthy store
        t_down = time.monotonic()
        stop_process_group(proc, sig=15, timeout=10)
        time.sleep(4)                                   # requests keep arriving while Redis is down
        down = chat(base, QUESTIONS[1] + " (down)", api_key=API_KEY, max_tokens=4)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(base + "/health", timeout=30).status_code == 503
        # on a loaded machine a load request may take seconds: keep Redis down until at least one
        # started (and was answered) inside the window checked below
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(t > t_down + 0.5 for t, _, _, _ in log):
            time.sleep(0.2)
        time.sleep(1.1)
        t_up = time.monotonic()
        proc = start_redis()  # empty: the store refills itself from the index directory
        deadline = time.monotonic() + 30
        while True:
            again = chat(base, QUESTIONS[1], api_key=API_KEY, max_tokens=4)
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert again.status_code == 200, again.text
        t_ok = time.monotonic()
        assert httpx.get(base + "/health", timeout=30).status_code == 200
        # the load answers again after the restart: wait for load requests started after it (a
        # fixed sleep saw none finish on a loaded machine)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(1 for t, _, _, _ in log if t > t_ok) < 3:
            time.sleep(0.2)
        load_stop.set()
        for w in workers:
            w.join(60)
        statuses = {s for _, _, s, _ in log}
        assert statuses <= {200, 503}, sorted(statuses)
        assert all(kind == "service_unavailable" for _, _, s, kind in log if s == 503)
        # requests made while Redis was down (not those racing its restart, which may wait for the
        # store to refill and then answer) fail fast with 503: no hang on a dead socket
        during = [(sec, s) for t, sec, s, _ in log if t_down + 0.5 < t < t_up - 1.0]
        assert during and all(s == 503 for _, s in during), during
        assert max(sec for sec, _ in during) < 10, during
        after = [s for t, _, s, _ in log if t > t_ok]
        assert after and set(after) == {200}, after
        print(f"\nload during the outage: {len(during)} requests, all 503, slowest "
              f"{max(sec for sec, _ in during):.2f} s; answering again {t_ok - t_up:.1f} s after the restart, "
              f"then {len(after)} answered")
    finally:
        load_stop.set()
        try:
            serve.delete("outage")
        finally:
            stop_process_group(proc, sig=15, timeout=10)


def _check_spans(answer, sources):
    """Every span's answer text equals its source's text at its range; spans never overlap."""
    taken = []
    for src in sources:
        for sp in src["spans"]:
            assert sp["kind"] in ("copied", "matched")
            assert answer[sp["answer_start"]:sp["answer_end"]] == src["text"][sp["source_start"]:sp["source_end"]]
            taken.append((sp["answer_start"], sp["answer_end"]))
    taken.sort()
    assert all(a[1] <= b[0] for a, b in zip(taken, taken[1:])), taken
    return len(taken)


def test_provenance_over_http_streamed_and_not(client):
    """Sources carry spans, the message its provenance; a stream's deltas carry the origins of
    their text, which joined are the final provenance (what was streamed never changes)."""
    q = QUESTIONS[0]
    r = _ask(client, q, max_tokens=48)
    answer = r.choices[0].message.content
    segments = r.choices[0].message.model_extra["provenance"]
    assert segments and segments[0]["answer_start"] == 0 and segments[-1]["answer_end"] == len(answer)
    assert all(a["answer_end"] == b["answer_start"] for a, b in zip(segments, segments[1:]))
    assert {s["origin"] for s in segments} <= {"copied", "prompt", "answer", "history", "draft_model", "target"}
    sources = r.model_extra["sources"]
    assert all(s["source"] is None or 0 <= s["source"] < len(sources) for s in segments)
    spans = _check_spans(answer, sources)
    text, chunks = _stream_text(client, q, max_tokens=48)
    assert text == answer
    streamed = [seg for c in chunks if c.choices for seg in (c.choices[0].delta.model_extra or {}).get("provenance", [])]
    merged = []
    for seg in streamed:
        if merged and merged[-1]["answer_end"] == seg["answer_start"] and \
                (merged[-1]["origin"], merged[-1]["source"]) == (seg["origin"], seg["source"]):
            merged[-1] = {**merged[-1], "answer_end": seg["answer_end"]}
        else:
            merged.append(seg)
    final = [c for c in chunks if c.model_extra.get("sources")][-1]
    assert merged == final.model_extra["provenance"]
    # the same text; which of its tokens were copied depends on what was drafted, and the cost
    # model sizes drafts from what it has measured so far (the second run's prompt also came
    # from the prefix cache), so the two runs' segments may differ: each is checked on its own
    stream_segments = final.model_extra["provenance"]
    assert stream_segments[0]["answer_start"] == 0 and stream_segments[-1]["answer_end"] == len(text)
    assert all(a["answer_end"] == b["answer_start"] for a, b in zip(stream_segments, stream_segments[1:]))
    _check_spans(text, final.model_extra["sources"])


def _chromium():
    import shutil

    path = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if path is None:
        pytest.skip("no Chromium on this machine (make install installs Debian's chromium as root): "
                    "the playground page was not tested in a browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (it is in the dev extras): the playground page was not tested")
    return path, sync_playwright


def test_playground_page_in_a_real_browser(service, tmp_path):
    """GET / in headless Chromium: a question streams an answer coloured by origin, hovering a
    copied piece highlights its source, the metrics show; a bad key and an empty question are
    shown as messages."""
    import os

    chromium, sync_playwright = _chromium()
    shot = os.environ.get("SPECRAG_PLAYGROUND_SCREENSHOT") or str(tmp_path / "playground.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(service + "/")
            assert page.title() == "specrag playground"
            # no key: the server's 401 message is shown, nothing else
            page.fill("#question", QUESTIONS[0])
            page.click("#ask")
            page.wait_for_selector("#error", state="visible", timeout=30_000)
            assert "API key" in page.inner_text("#error")
            assert page.inner_text("#answer") == ""
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.fill("#question", "   ")
            page.click("#ask")
            page.wait_for_function("document.getElementById('error').textContent.includes('empty')", timeout=30_000)
            # a real question streams in
            page.fill("#question", QUESTIONS[0])
            page.fill("#max_tokens", "48")
            page.click("#ask")
            page.wait_for_selector("#error", state="hidden", timeout=30_000)
            page.wait_for_selector("#sources .source", timeout=180_000)
            page.wait_for_selector("#ask:not([disabled])", timeout=60_000)
            answer = page.inner_text("#answer")
            assert answer.strip()
            assert page.locator("#metrics td", has_text="tokens per target forward").count() == 1
            copied = page.locator("#answer .seg.o-copied")
            assert copied.count() > 0, "no piece of the answer was shown as copied from a source"
            copied.first.hover()
            src = copied.first.get_attribute("data-source")
            assert "hl" in page.get_attribute(f"#source-{src}", "class")
            page.screenshot(path=shot, full_page=True)
            assert not errors, errors
        finally:
            browser.close()
