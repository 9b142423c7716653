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
    """Lookups are dict probes: with a reference 100x larger a lookup still makes two of them
    (the suffix's last two tokens, then its last one) and, where the suffix's bigram occurs
    nowhere, reads no reference token but the continuation it returns. Counted, not timed, so a
    loaded machine cannot fail it."""
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
    assert small == (2, 0) and large == (2, 0), (small, large)


def _scan(seqs, suffix, max_n):
    """Every place continuing a suffix of ``suffix``, by scanning: (match length, seq, position)
    in the index's order (documents before the prompt before the output, earlier first)."""
    out = []
    for s, seq in enumerate(seqs):
        for j in range(1, len(seq)):
            n = 0
            while n < min(max_n, j, len(suffix)) and seq[j - 1 - n] == suffix[len(suffix) - 1 - n]:
                n += 1
            if n:
                out.append((n, s, j))
    return out


def test_index_agrees_with_a_scan_through_extends_and_rollbacks():
    """The bigram-keyed index returns what scanning every sequence returns: the first place of
    the longest suffix match (the single-path rule) and every place down to ``shorter`` tokens
    shorter (the tree's), as the output grows and is rolled back."""
    import random

    rng = random.Random(5)
    checked = 0
    for _ in range(150):
        vocab, max_n = rng.choice([3, 6, 40]), rng.choice([1, 2, 3, 8])
        index = _NgramIndex(max_n)
        for _ in range(rng.randrange(1, 4)):
            index.add([rng.randrange(vocab) for _ in range(rng.randrange(0, 40))])
        own = index.add([rng.randrange(vocab) for _ in range(4)])
        for _ in range(25):
            if rng.random() < 0.6:
                index.extend(own, [rng.randrange(vocab) for _ in range(rng.randrange(1, 5))])
            else:
                index.truncate(own, rng.randrange(0, len(index.seqs[own]) + 1))
            query = list(index.seqs[own]) if rng.random() < 0.7 else [rng.randrange(vocab) for _ in range(6)]
            places = _scan(index.seqs, query, max_n)
            longest = max((n for n, _, _ in places), default=0)
            for min_n in (1, 2, 3):
                first = next(((n, s, j) for n, s, j in places if n == longest), None)
                want = (([], 0, (-1, -1)) if first is None or longest < min_n
                        else (index.seqs[first[1]][first[2]:first[2] + 5], longest, first[1:]))
                assert index.lookup_place(query, 5, min_n) == want
                for shorter in (0, 1, 3):
                    floor = max(min_n, longest - shorter)
                    want_all = [] if longest < min_n else sorted(
                        (p for p in places if p[0] >= floor), key=lambda p: -p[0])
                    assert index.occurrences(query, min_n, shorter, limit=64) == want_all[:64]
                    checked += 1
    assert checked > 10000
