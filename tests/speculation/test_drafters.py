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
    """Lookups are dict probes: with a reference 100x larger a lookup still makes at most max_n
    of them and reads no reference token but the continuation it returns. Counted, not timed,
    so a loaded machine cannot fail it."""
    import random

    rng = random.Random(0)

    class Probes(dict):
        count = 0

        def get(self, key, default=None):
            Probes.count += 1
            return super().get(key, default)

        def __getitem__(self, key):
            Probes.count += 1
            return super().__getitem__(key)

        def __contains__(self, key):
            Probes.count += 1
            return super().__contains__(key)

    class Reads(list):
        count = 0

        def __getitem__(self, i):
            out = super().__getitem__(i)
            Reads.count += len(out) if isinstance(i, slice) else 1
            return out

        def __iter__(self):
            for token in super().__iter__():
                Reads.count += 1
                yield token

    def costs(n):
        """(most probes in one lookup, reference tokens read beyond the continuations returned)"""
        index = _NgramIndex(max_n=8)
        index.add([rng.randrange(50000) for _ in range(n)])
        index._table, index.seqs = Probes(index._table), [Reads(s) for s in index.seqs]
        queries = [[rng.randrange(50000) for _ in range(8)] for _ in range(2000)]
        most, returned = 0, 0
        Reads.count = 0
        for q in queries:
            Probes.count = 0
            returned += len(index.lookup(q, 8))
            most = max(most, Probes.count)
        return most, Reads.count - returned

    small, large = costs(500), costs(50000)
    assert small == (8, 0) and large[0] <= 8 and large[1] == 0, (small, large)
