"""Fixtures of the retrieval tests: Redis servers, the generator tokenizer, a fast embedder.

Redis: ``redis_url`` is the shared server on 127.0.0.1:6379 when it answers, else a
``redis-server`` started on a free port for the session. ``own_redis`` starts a private server
(tests that kill Redis must never touch the shared one). Every test gets its own index name,
so namespaces never collide between tests or with other users of the shared server.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisProcess:
    """A redis-server this test session started (and only ever stops by its own pid)."""

    port: int
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (scripts/ensure_redis.sh installs it)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if _answers("127.0.0.1", self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if _answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    server = RedisProcess(_free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess(_free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def index_name(request: pytest.FixtureRequest) -> str:
    digest = hashlib.sha1(f"{request.node.nodeid}{time.time_ns()}".encode()).hexdigest()[:10]
    return f"test-{digest}"


@pytest.fixture(scope="session")
def tokenizer():
    """The generator's real tokenizer (SmolLM2, loads in well under a second)."""
    from speculation.models import load_tokenizer

    return load_tokenizer()


class HashingModel:
    """A deterministic stand-in for a sentence-transformers model: hashed bag of words.

    Texts sharing words get a high inner product, so rankings are meaningful, and it costs
    microseconds -- the real MiniLM is exercised by the end-to-end test.
    """

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim

    def encode(self, texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
               show_progress_bar=False):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                h = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little")
                out[i, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
            out[i, 0] += 1e-3  # never the zero vector
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


@pytest.fixture
def fake_embedder():
    from retrieval.embeddings import Embedder

    return Embedder(name="hashing-64", model=HashingModel(64), dim=64)


CORPUS_FILES = {
    "guide.md": "# Brewing guide\n\n" + "\n\n".join(
        f"Step {i}: heat the water to {80 + i} degrees and steep the leaves for {i} minutes." for i in range(40)
    ),
    "notes.txt": "Plain notes about gardening. Tomatoes need sun and regular watering. " * 30,
    "page.html": "<html><head><title>Bicycle repair</title><style>p{color:red}</style>"
                 "<script>var secret = 'dropme';</script></head><body><h1>Fixing a flat</h1>"
                 "<p>Remove the wheel, find the puncture &amp; patch the inner tube.</p>"
                 "<p>Inflate to the pressure printed on the tyre.</p></body></html>",
    "records.jsonl": "\n".join([
        '{"id": "r1", "text": "Lighthouses guide ships along rocky coasts at night.", "title": "Lighthouses"}',
        '{"id": "r2", "text": "Volcanoes form where tectonic plates diverge or converge.", "url": "https://example.org/volcano"}',
    ]) + "\n",
}


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for name, text in CORPUS_FILES.items():
        (root / name).write_text(text)
    (root / "sub" / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00binary")
    (root / "sub" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return root
