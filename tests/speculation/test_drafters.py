"""Drafters in isolation: longest suffix match, incremental index, adaptive length."""

from dataclasses import dataclass, field

from speculation.drafters import AdaptiveLength, NgramDrafter, _NgramIndex


@dataclass
class FakeState:          # only what NgramDrafter reads
    tokens: list
    references: list
    drafter_state: dict = field(default_factory=dict)


def test_longest_suffix_match_wins_over_first_short_match():
    index = _NgramIndex(max_n=4)
    index.add([7, 1, 2, 3, 50, 51])            # "2 3" continues with 50...
    index.add([9, 9, 1, 2, 3, 60, 61])         # but no: "1 2 3" continues with 50 too (first occurrence)
    index.add([4, 5, 2, 3, 70, 71])
    assert index.lookup([0, 1, 2, 3], 2) == [50, 51]
    assert index.lookup([4, 5, 2, 3], 3) == [70, 71]      # 4-gram "4 5 2 3" beats "2 3"
    assert index.lookup([8, 8, 8], 3) == []


def test_index_extends_incrementally_and_truncates():
    index = _NgramIndex(max_n=3)
    own = index.add([1, 2])
    assert index.lookup([1], 5) == [2]
    index.extend(own, [3, 1, 5])
    assert index.lookup([3, 1], 5) == [5]
    index.truncate(own, 3)                      # [1, 2, 3]
    assert index.lookup([3, 1], 5) == [2, 3]    # "3 1" is gone: falls back to "1"
    index.extend(own, [7, 7, 9])
    assert index.lookup([3, 1], 5) == [2, 3, 7, 7, 9]   # no stale "3 1" -> 9
    assert index.lookup([7, 7], 5) == [9]


def test_reference_drafter_copies_from_references_prompt_lookup_does_not():
    ref = [10, 11, 12, 13, 14, 15]
    state = FakeState(tokens=[1, 2, 11, 12], references=[ref])
    reference = NgramDrafter("reference", max_draft=3)
    reference.begin(state)
    assert reference.propose(state, 10).tokens == [13, 14, 15]
    lookup = NgramDrafter("prompt_lookup", max_draft=3, use_references=False)
    lookup.begin(state)
    assert lookup.propose(state, 10) is None
    state.tokens += [5, 2, 11]                   # "2 11" occurred in the prompt, followed by 12
    assert lookup.propose(state, 10).tokens == [12, 5, 2]
    # the 2-gram "2 11" (prompt) beats the 1-gram "11" (reference); capped by max_tokens
    assert reference.propose(state, 2).tokens == [12, 5]


def test_adaptive_length_grows_on_full_acceptance_and_shrinks_on_rejection():
    length = AdaptiveLength(max_len=10, current=4)
    length.update(4, 4)
    assert length.current == 6
    length.update(6, 1)
    assert length.current == 3
    length.update(3, 0)
    assert length.current == 2
    for _ in range(10):
        length.update(length.current, length.current)
    assert length.current == 10


def test_lookup_cost_does_not_grow_with_reference_size():
    """Lookups are dict probes: a reference 100x larger costs about the same per lookup."""
    import random
    import time

    rng = random.Random(0)

    def per_lookup(n):
        index = _NgramIndex(max_n=8)
        index.add([rng.randrange(50000) for _ in range(n)])
        queries = [[rng.randrange(50000) for _ in range(8)] for _ in range(2000)]
        t = time.perf_counter()
        for q in queries:
            index.lookup(q, 8)
        return time.perf_counter() - t

    small, large = per_lookup(500), per_lookup(50000)
    assert large < small * 5, (small, large)
