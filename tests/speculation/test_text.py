"""Incremental detokenisation: the real tokenizer's DecodeStream path gives exactly the text
of a whole decode, deltas included, on text with multi-byte characters, and stops at stop
strings; per-token cost does not grow with the text."""

import random
import time

import pytest

from speculation.text import StopStringStreamer

pytestmark = pytest.mark.slow

SAMPLES = [
    "Plain ASCII: functools.lru_cache(maxsize=None) caches every call.",
    "Unicode: naïve café — “quotes”, emoji 🐍🚀, CJK 中文字符, and ∑ math.",
    "Code:\n    def f(x):\n        return {'a': [1, 2, 3]}\n",
]


@pytest.fixture(scope="module")
def tok():
    from speculation.models import load_tokenizer

    return load_tokenizer()


def _stream(tok, ids, stop=()):
    s = StopStringStreamer(tok, list(stop))
    deltas = []
    for t in ids:
        deltas.append(s.push(t))
        if s.stopped:
            break
    deltas.append(s.finish())
    return s, "".join(deltas)


def test_incremental_text_equals_whole_decode(tok):
    rng = random.Random(0)
    texts = SAMPLES + ["".join(rng.choice(SAMPLES)[rng.randrange(10):] for _ in range(3))]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        s, streamed = _stream(tok, ids)
        assert s._detok.incremental, "the fast tokenizer should decode incrementally"
        assert streamed == s.text == tok.decode(ids, skip_special_tokens=True)
    # random token ids (byte pieces that do not form whole characters included)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))]
        s, streamed = _stream(tok, ids)
        assert s.text == tok.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=True).startswith(streamed.rstrip("\ufffd")[:len(s.emitted)])


def test_stop_string_and_truncate(tok):
    ids = tok.encode(SAMPLES[1], add_special_tokens=False)
    s, streamed = _stream(tok, ids, stop=["emoji"])
    assert s.stopped and streamed == SAMPLES[1][:SAMPLES[1].index("emoji")]
    s = StopStringStreamer(tok)
    for t in ids:
        s.push(t)
    s.truncate(5)
    assert s.text == tok.decode(ids[:5], skip_special_tokens=True)
    for t in ids[5:]:
        s.push(t)
    assert s.finish() + s.emitted[:0] is not None and s.text == SAMPLES[1]


def test_per_token_cost_does_not_grow_with_the_text(tok):
    ids = tok.encode(" ".join(SAMPLES * 40), add_special_tokens=False)

    def per_token(n):
        s = StopStringStreamer(tok, ["\n\n\n"])
        for t in ids[:n]:
            s.push(t)
        t0 = time.perf_counter()
        for t in ids[n:n + 200]:
            s.push(t)
        return time.perf_counter() - t0

    early, late = per_token(50), per_token(len(ids) - 200)
    assert late < early * 4, (early, late)
