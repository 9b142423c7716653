"""The two ways to start the service from a shell: Ray's own CLI (``serve run deploy/serve.yaml``)
and ``specrag serve`` (prints ready-to-paste examples, Ctrl-C shuts down cleanly). Each runs in
its own process with its own local Ray, one after the other."""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest
import yaml

from deploy_helpers import (BIN, QUESTIONS, REDIS_URL, REPO, chat, free_port,
                            sigint_as_in_a_terminal, stop_process_group, subprocess_env, wait_banner,
                            wait_http_ok)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def index(deploy_index):
    return deploy_index


def test_serve_run_with_rays_cli(index, tmp_path):
    """`serve run deploy/serve.yaml` (the committed file, with the index, Redis and port changed)."""
    spec = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    port = free_port()
    spec["http_options"]["port"] = port
    args = spec["applications"][0]["args"]
    args["pipeline"].update(index_dir=str(index), redis_url=REDIS_URL, max_tokens=8)
    for name in ("ingress", "retriever", "generator"):   # no second replica on a 2-core machine
        args[name]["autoscaling"]["max_replicas"] = 1
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "serve"), "run", str(cfg)], cwd=REPO, env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=240, proc=proc)
        r = chat(f"http://127.0.0.1:{port}", QUESTIONS[0], max_tokens=8)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip()
    except AssertionError:
        log.flush()
        print((tmp_path / "serve.log").read_text()[-5000:])
        raise
    finally:
        stop_process_group(proc, signal.SIGINT, timeout=60)
        log.close()


def test_specrag_serve_prints_examples_and_stops_on_ctrl_c(index, tmp_path):
    proxy_port, port = free_port(), free_port()
    out = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "specrag"), "serve", "--index", str(index), "--redis-url", REDIS_URL, "--port", str(proxy_port),
         "--direct-port", str(port), "--api-key", "k1", "--num-cpus", "2"],
        cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=240, proc=proc)
        text = wait_banner(tmp_path / "out.log")
        # the examples use the Ingress replica's own port (direct ingress); the proxy serves too
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in text
        assert f"http://127.0.0.1:{proxy_port} (Serve's proxy" in text
        assert httpx.get(f"http://127.0.0.1:{proxy_port}/health").status_code == 200
        assert "Authorization: Bearer k1" in text and "from openai import OpenAI" in text
        # the printed curl command, pasted into a shell, works
        curl = text[text.index("curl "):text.index("python - <<")].strip()
        done = subprocess.run(["bash", "-c", curl.replace('"max_tokens": 64', '"max_tokens": 4')],
                              capture_output=True, text=True, timeout=120)
        assert '"chat.completion"' in done.stdout, done.stdout + done.stderr
    finally:
        rc = stop_process_group(proc, signal.SIGINT, timeout=90)
        out.close()
    text = (tmp_path / "out.log").read_text()
    assert rc == 0, text[-3000:]
    assert "specrag serve: stopped" in text
    assert "Traceback" not in text, text[-3000:]


def test_specrag_serve_proxy_only_stops_on_sigterm(index, tmp_path):
    """--no-direct-ingress serves through Serve's proxy alone; SIGTERM (what a process manager
    sends) shuts down as cleanly as Ctrl-C (ray.init replaces the handler; serve puts it back)."""
    port = free_port()
    out = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "specrag"), "serve", "--index", str(index), "--redis-url", REDIS_URL, "--port", str(port),
         "--no-direct-ingress", "--num-cpus", "2"],
        cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=240, proc=proc)
        text = wait_banner(tmp_path / "out.log")
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in text
        assert "(Ingress replica, direct)" not in text
    finally:
        rc = stop_process_group(proc, signal.SIGTERM, timeout=90)
        out.close()
    text = (tmp_path / "out.log").read_text()
    assert rc == 0, text[-3000:]
    assert "specrag serve: shutting down" in text and "specrag serve: stopped" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
