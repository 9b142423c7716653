"""Continuous batching: one thread owns the engine and steps every running request together.

Requests join between steps and leave when they finish; a cancelled one (its client gone) is
released at the next step boundary; beyond ``max_batch`` they wait in a queue. Whatever thread
submits gets a :class:`RequestHandle` to wait on, stream from (the commit callback runs on the
loop thread: keep it cheap, hand the text over to your own thread) or cancel.

Callers that drive sequences themselves (the iterative pipeline: strides, truncations, chunks
it keeps) use :class:`LoopEngine`, the engine's step API with every call carried out on the
loop thread; their sequences step in the same forwards as everybody else's.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import CommitCallback, GenerationRequest, GenerationResult, SequenceState, SpeculativeEngine, StepRecord
from .openmp import release_team

log = logging.getLogger(__name__)


class RequestCancelled(Exception):
    """The request was cancelled before it finished."""


class RequestHandle:
    """One submitted request: wait for its result, or cancel it."""

    def __init__(self, loop: "EngineLoop", request: GenerationRequest, on_commit: CommitCallback | None) -> None:
        self.request = request
        self.on_commit = on_commit
        self.state: SequenceState | None = None
        self.cancelled = False
        self._loop = loop
        self._future: Future[GenerationResult] = Future()

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step boundary."""
        self._loop._cancel(self)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self._future.result(timeout)


@dataclass
class _Group:
    """Sequences a caller steps until ``done`` holds for each (LoopEngine.run / begin)."""

    states: list[SequenceState]
    on_commit: CommitCallback | None
    done: Callable[[SequenceState], bool]
    future: Future = field(default_factory=Future)


@dataclass
class LoopStats:
    """Counters of the loop, for metrics: steps, rows and tokens fed, seconds stepping."""

    steps: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    max_rows: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=1024))   # StepRecords, newest last

    def observe(self, rec: StepRecord) -> None:
        self.steps += 1
        self.rows += rec.rows
        self.tokens += rec.tokens
        self.seconds += rec.seconds
        self.max_rows = max(self.max_rows, rec.rows)
        self.recent.append(rec)


class EngineLoop:
    """The engine's only driver while it runs: a daemon thread started on first use."""

    def __init__(self, engine: SpeculativeEngine) -> None:
        self.engine = engine
        self.max_batch = engine.config.max_batch
        self.stats = LoopStats()
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[RequestHandle] = []
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._groups: list[_Group] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._turn = 0
        engine.on_step = self._observe
        self._hand_over()

    # ---- API (any thread) ---------------------------------------------------------------
    def submit(self, request: GenerationRequest, on_commit: CommitCallback | None = None) -> RequestHandle:
        handle = RequestHandle(self, request, on_commit)
        self._hand_over()
        with self._cond:
            self._check_open()
            self._waiting.append(handle)
            self._start()
            self._cond.notify()
        return handle

    def generate(self, request: GenerationRequest, on_commit: CommitCallback | None = None) -> GenerationResult:
        """Submit and wait; an interrupted wait cancels the request."""
        handle = self.submit(request, on_commit)
        try:
            return handle.result()
        except BaseException:
            handle.cancel()
            raise

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread between two steps and return what it returns."""
        if threading.current_thread() is self._thread:
            return fn()
        self._hand_over()
        future: Future = Future()
        with self._cond:
            self._check_open()
            self._calls.append((fn, future))
            self._start()
            self._cond.notify()
        return future.result()

    def run_states(self, states: list[SequenceState], on_commit: CommitCallback | None = None,
                   done: Callable[[SequenceState], bool] | None = None) -> None:
        """Step ``states`` with everything else until ``done`` (default: finished or paused)
        holds for each; raises what their commit callback raised."""
        group = _Group(list(states), on_commit, done or (lambda s: not self.engine.active(s)))
        self._hand_over()
        with self._cond:
            self._check_open()
            self._groups.append(group)
            self._start()
            self._cond.notify()
        group.future.result()

    def pending(self) -> int:
        """Requests running or queued."""
        with self._cond:
            return len(self._running) + len(self._waiting)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # ---- internals ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the engine loop is closed")

    def _hand_over(self) -> None:
        """Free the calling thread's OpenMP team (the one that loaded the model has one), so
        that the loop's is the only team and its idle workers spin between kernels instead of
        sleeping (``speculation.openmp``: a bf16 decode step 49 ms against 66-91 ms)."""
        if threading.current_thread() is not self._thread:
            release_team()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="specrag-engine", daemon=True)
            self._thread.start()

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            handle.cancelled = True
            self._cond.notify()

    def _observe(self, rec: StepRecord) -> None:
        self.stats.observe(rec)

    def _main(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._running or self._calls or self._groups):
                    self._cond.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
                waiting_cancelled = [h for h in self._waiting if h.cancelled]
                for h in waiting_cancelled:
                    self._waiting.remove(h)
                groups = list(self._groups)
                room = self.max_batch - len(self._running) - sum(len(g.states) for g in groups)
                admitted: list[RequestHandle] = []
                while self._waiting and room > 0:
                    admitted.append(self._waiting.popleft())
                    room -= 1
            for h in waiting_cancelled:
                h._future.set_exception(RequestCancelled("cancelled before it started"))
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            for h in admitted:
                try:
                    h.state = self.engine.new_state(h.request)
                except BaseException as exc:  # noqa: BLE001 - bad input: that request fails
                    h._future.set_exception(exc)
                    continue
                self._running.append(h)
            self._step(groups)
        self._fail_all(RuntimeError("the engine loop was closed"))

    def _step(self, groups: list[_Group]) -> None:
        for h in [h for h in self._running if h.cancelled]:
            self._finish(h, RequestCancelled("cancelled"))
        callbacks: dict[int, CommitCallback | None] = {}
        states: list[SequenceState] = []
        for h in self._running:
            callbacks[id(h.state)] = h.on_commit
            states.append(h.state)  # type: ignore[arg-type]
        for g in groups:
            for s in g.states:
                if not g.done(s):
                    callbacks[id(s)] = g.on_commit
                    states.append(s)
        if states:
            # rotate, so that beyond max_batch rows nobody waits for long
            self._turn = (self._turn + 1) % len(states)
            states = states[self._turn:] + states[:self._turn]

            def dispatch(state: SequenceState, ids: list[int], delta: str) -> None:
                cb = callbacks.get(id(state))
                if cb is not None:
                    cb(state, ids, delta)

            try:
                self.engine.step(states, dispatch)
            except BaseException as exc:  # noqa: BLE001 - a failed step fails its requests, not the loop
                log.exception("engine step failed")
                for h in list(self._running):
                    self._finish(h, exc)
                for g in groups:
                    self._resolve(g, exc)
                return
        for h in [h for h in self._running if h.state.finished]:  # type: ignore[union-attr]
            self._finish(h, h.state.error)  # type: ignore[union-attr]
        for g in groups:
            error = next((s.error for s in g.states if s.error is not None), None)
            if error is not None or all(g.done(s) for s in g.states):
                self._resolve(g, error)

    def _finish(self, h: RequestHandle, error: BaseException | None) -> None:
        self._running.remove(h)
        state = h.state
        if state is not None:
            self.engine.release(state)
        if error is not None:
            h._future.set_exception(error)
        else:
            h._future.set_result(self.engine.result(state))  # type: ignore[arg-type]

    def _resolve(self, g: _Group, error: BaseException | None) -> None:
        with self._cond:
            if g in self._groups:
                self._groups.remove(g)
        if error is not None:
            g.future.set_exception(error)
        else:
            g.future.set_result(None)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            groups, self._groups = list(self._groups), []
            calls, self._calls = list(self._calls), deque()
        for h in waiting + list(self._running):
            if not h.done():
                h._future.set_exception(error)
        self._running = []
        for g in groups:
            g.future.set_exception(error)
        for _, future in calls:
            future.set_exception(error)


class LoopEngine:
    """The step API of :class:`SpeculativeEngine` for a caller on another thread: every call
    runs on the loop's thread, and ``run`` steps the caller's sequences in the shared forwards."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self._engine = loop.engine

    def __getattr__(self, name: str) -> Any:   # eos_ids, context_tokens, tokenizer, config, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._engine, name)

    def begin(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None) -> list[SequenceState]:
        engine = self._engine
        states = self.loop.call(lambda: [engine.new_state(r) for r in requests])
        self.loop.run_states(states, on_commit, done=lambda s: not engine.active(s) or s.cached >= s.n_prompt)
        return states

    def run(self, states: list[SequenceState], on_commit: CommitCallback | None = None) -> None:
        self.loop.run_states(states, on_commit)

    def step(self, states: list[SequenceState], on_commit: CommitCallback | None = None) -> None:
        self.loop.call(lambda: self._engine.step(states, on_commit))

    def truncate(self, state: SequenceState, n_generated: int) -> None:
        self.loop.call(lambda: self._engine.truncate(state, n_generated))

    def extend(self, state: SequenceState, tokens: list[int]) -> None:
        self.loop.call(lambda: self._engine.extend(state, tokens))

    def release(self, state: SequenceState) -> None:
        self.loop.call(lambda: self._engine.release(state))

    def generate(self, requests: list[GenerationRequest], on_commit: CommitCallback | None = None) -> list[GenerationResult]:
        handles = [self.loop.submit(r, on_commit) for r in requests]
        return [h.result() for h in handles]

    def generate_one(self, request: GenerationRequest, on_commit: CommitCallback | None = None) -> GenerationResult:
        return self.loop.generate(request, on_commit)
