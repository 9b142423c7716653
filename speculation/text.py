"""Incremental detokenisation with stop strings.

Text is emitted only when it can no longer change: a suffix that could still grow into a stop
string, or an incomplete UTF-8 character, is held back. The concatenation of the emitted deltas
is always the final text, so a streaming client and a non-streaming one see the same answer.
"""

from __future__ import annotations

from typing import Any


class StopStringStreamer:
    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False
        self.final_text: str | None = None

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one committed token; returns the text that became final. Sets ``stopped`` when a
        stop string completed (the stop string itself is not part of the text)."""
        self.ids.append(token_id)
        text = self._decode()
        for s in self.stop:
            # a new match can only start within len(s) chars before the old emitted end
            pos = text.find(s, max(0, len(self.emitted) - len(s)))
            if pos != -1:
                self.stopped = True
                self.final_text = text[:pos]
                return self._emit(self.final_text)
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe = min(safe, len(text[:safe]) - n)
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
        del self.ids[n_ids:]
        text = self._decode()
        self.emitted = self.emitted if text.startswith(self.emitted) else text
        self.stopped = False
        self.final_text = None

    def finish(self) -> str:
        """Flush held-back text at the end of generation; returns the last delta."""
        if self.final_text is None:
            self.final_text = self._decode()
        return self._emit(self.final_text)

    @property
    def text(self) -> str:
        return self.final_text if self.final_text is not None else self._decode()
