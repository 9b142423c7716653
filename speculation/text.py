"""Incremental detokenisation with stop strings.

Text is emitted only when it can no longer change: a suffix that could still grow into a stop
string, or an incomplete UTF-8 character, is held back. The concatenation of the emitted deltas
is always the final text, so a streaming client and a non-streaming one see the same answer.

Each committed token costs work proportional to that token, not to the text so far: a fast
(Rust) tokenizer decodes through ``tokenizers.decoders.DecodeStream``; anything else is decoded
whole on each token (the tests' tiny tokenizer). The final text is the tokenizer's own decode
of all ids, checked against the incremental one.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class _Detokenizer:
    """The text of a growing list of token ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream
        except ImportError:  # pragma: no cover - tokenizers ships with transformers
            backend = None
        self._backend = backend if backend is not None and isinstance(backend, Tokenizer) else None
        self._stream_cls = DecodeStream if self._backend is not None else None
        self.ids: list[int] = []
        self.ends: list[int] = []     # per token: the length of the text once it was added
        self._reset()

    def _reset(self) -> None:
        self._stream = self._stream_cls(skip_special_tokens=True) if self._stream_cls else None
        self._text = ""

    @property
    def incremental(self) -> bool:
        return self._stream is not None

    def push(self, token_id: int) -> str:
        """Add a token; the text so far (an incomplete character at the end is left out)."""
        self.ids.append(token_id)
        if self._stream is None:
            text = self.decode_all()
            text = text[:-1] if text.endswith("\ufffd") else text
        else:
            piece = self._stream.step(self._backend, token_id)
            if piece:
                self._text += piece
            text = self._text
        self.ends.append(len(text))
        return text

    def truncate(self, n: int) -> str:
        del self.ids[n:]
        del self.ends[n:]       # a prefix decodes to the same text
        self._reset()
        if self._stream is not None:
            for t in self.ids:
                piece = self._stream.step(self._backend, t)
                if piece:
                    self._text += piece
            return self._text
        return self.decode_all()

    def decode_all(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class StopStringStreamer:
    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._detok = _Detokenizer(tokenizer)
        self.emitted = ""
        self.stopped = False
        self.final_text: str | None = None

    @property
    def ids(self) -> list[int]:
        return self._detok.ids

    @property
    def ends(self) -> list[int]:
        """The live list behind ``token_ends`` (not clipped at a stop string; pushed tokens only)."""
        return self._detok.ends

    def token_ends(self, n_tokens: int | None = None) -> list[int]:
        """Per token, where its text ends in ``text``: token i's text is
        ``text[ends[i-1]:ends[i]]`` (a character split over several tokens belongs to the one
        that completes it; tokens past a stop string end at the end). ``n_tokens``: the
        sequence's token count, when tokens were committed without being pushed (EOS): those
        end at the end too."""
        n = len(self.text)
        ends = [min(e, n) for e in self._detok.ends]
        return ends + [n] * ((n_tokens or 0) - len(ends))

    def push(self, token_id: int) -> str:
        """Add one committed token; returns the text that became final. Sets ``stopped`` when a
        stop string completed (the stop string itself is not part of the text)."""
        text = self._detok.push(token_id)
        for s in self.stop:
            # a new match can only start within len(s) chars before the old emitted end
            pos = text.find(s, max(0, len(self.emitted) - len(s)))
            if pos != -1:
                self.stopped = True
                self.final_text = text[:pos]
                return self._emit(self.final_text)
        safe = len(text)
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text.endswith(s[:n]):
                    safe = min(safe, len(text) - n)
                    break
        return self._emit(text[:max(safe, len(self.emitted))])

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.emitted):  # decoding changed earlier text (rare merges)
            return ""
        delta = upto[len(self.emitted):]
        self.emitted = upto
        return delta

    def truncate(self, n_ids: int) -> None:
        """Roll back to the first ``n_ids`` tokens (only text not yet emitted may be dropped)."""
        text = self._detok.truncate(n_ids)
        self.emitted = self.emitted if text.startswith(self.emitted) else text
        self.stopped = False
        self.final_text = None

    def finish(self) -> str:
        """Flush held-back text at the end of generation; returns the last delta."""
        if self.final_text is None:
            self.final_text = self._full_text()
        return self._emit(self.final_text)

    def _full_text(self) -> str:
        full = self._detok.decode_all()
        if self._detok.incremental and full != self._detok._text:
            log.warning("incremental detokenisation differs from the tokenizer's decode; using the decode")
        return full

    @property
    def text(self) -> str:
        return self.final_text if self.final_text is not None else self._detok.decode_all()
