"""OS^3, RaLMSpec's stride scheduler: how many speculative retrieval steps before a verification.

a = latency of a speculation step, b = latency of a verification, gamma = probability that a
speculated retrieval is right. Verified documents per unit time:
  synchronous:  (1 - g^s) / ((1 - g) (s a + b))
  asynchronous: (1 - g^s) / ((1 - g) [g^s ((s - 1) a + max(a, b)) + (1 - g^s)(s a + b)])
gamma is estimated over the last 5 rounds as sum(M) / (sum(M) + #rounds with M < s), capped at 0.6;
s is raised from 1 while the objective improves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class StrideScheduler:
    fixed: int | None = None          # a number: always that stride (no scheduling)
    asynchronous: bool = True
    window: int = 5
    gamma_cap: float = 0.6
    max_stride: int = 16
    a: float | None = None            # seconds per speculation step (running mean)
    b: float | None = None            # seconds per verification (running mean)
    rounds: deque = field(default_factory=lambda: deque(maxlen=5))

    def __post_init__(self) -> None:
        self.rounds = deque(maxlen=self.window)

    def observe_step(self, seconds: float) -> None:
        self.a = seconds if self.a is None else 0.8 * self.a + 0.2 * seconds

    def observe_verification(self, seconds: float, matched: int, stride: int) -> None:
        self.b = seconds if self.b is None else 0.8 * self.b + 0.2 * seconds
        self.rounds.append((matched, stride))

    def gamma(self) -> float:
        total = sum(m for m, _ in self.rounds)
        misses = sum(1 for m, s in self.rounds if m < s)
        if total + misses == 0:
            return 0.0 if self.rounds else self.gamma_cap
        return min(self.gamma_cap, total / (total + misses))

    def objective(self, s: int) -> float:
        g, a, b = self.gamma(), self.a or 1e-3, self.b or 1e-3
        if g >= 1.0:
            g = 1.0 - 1e-9
        gs = g ** s
        if self.asynchronous:
            denom = (1 - g) * (gs * ((s - 1) * a + max(a, b)) + (1 - gs) * (s * a + b))
        else:
            denom = (1 - g) * (s * a + b)
        return (1 - gs) / denom if denom > 0 else 0.0

    def next_stride(self) -> int:
        if self.fixed is not None:
            return self.fixed
        s = 1
        while s < self.max_stride and self.objective(s + 1) > self.objective(s):
            s += 1
        return s
