"""The KV pool: the keys and values of every running sequence, one slot each.

A sequence's cache is a slot of a pre-allocated tensor per layer, ``[slots, kv_heads, length,
head_dim]``, plus a length kept on the host (``SequenceState.cached``). Rolling a row back is
setting that length -- positions past it are never read (the attention mask stops there) and are
overwritten by the next forward -- so it never touches the other rows' memory. The tensors grow
(doubling) when more slots or positions are needed, up to ``max_slots`` and the model's context.

Slots are handed out lowest first, so the running rows stay packed at the front of the pool and
the batched attention reads one contiguous range. When every slot is taken, the least recently
used sequence that is not stepping now (a finished one nobody released, a parked iterative
chunk) is evicted: its slot is reused and it re-prefills if it is ever stepped again.

Prefix caching: a released slot keeps its keys and values until it is handed out again, and the
table keeps the tokens they belong to. A new sequence whose prompt starts like what a slot holds
(a released one, or one in use) starts from those positions instead of prefilling them: it gets
a copy of the prefix (``KVPool.copy_prefix``) in a slot that holds nothing kept, or, when there
is none, takes the released slot over. A position's keys and values depend only on the tokens
up to it, so the reused prefix is what a prefill would compute (bitwise on the batch-invariant
forward; up to fp32 rounding otherwise, as with chunked prefill). Before a slot is handed to a
sequence that does not start from what it holds, that is copied out to a ``PrefixStore`` (a
byte budget, least recently used dropped) and copied back for a later prompt that starts so.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch


class KVPool:
    """Per-layer key and value storage for ``max_slots`` sequences."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 max_slots: int, max_length: int, initial_slots: int = 4, initial_length: int = 256) -> None:
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_slots, self.max_length = max_slots, max_length
        self.slots = min(initial_slots, max_slots)
        self.length = min(initial_length, max_length)
        self.keys = [self._zeros(self.slots, self.length) for _ in range(n_layers)]
        self.values = [self._zeros(self.slots, self.length) for _ in range(n_layers)]

    def _zeros(self, slots: int, length: int) -> torch.Tensor:
        # zeros, not empty: padding queries read position 0 of idle slots, and must stay finite
        return torch.zeros(slots, self.kv_heads, length, self.head_dim, dtype=self.dtype, device=self.device)

    def ensure(self, slots: int, length: int) -> None:
        """Grow (doubling) so that slot indices < ``slots`` and positions < ``length`` exist."""
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} positions exceeds the KV pool's limit of {self.max_length}")
        if slots <= self.slots and length <= self.length:
            return
        new_slots, new_length = self.slots, self.length
        while new_slots < slots:
            new_slots = min(self.max_slots, new_slots * 2)
        while new_length < length:
            new_length = min(self.max_length, new_length * 2)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = self._zeros(new_slots, new_length)
                grown[:self.slots, :, :self.length] = old
                store[i] = grown
        self.slots, self.length = new_slots, new_length

    def move(self, slot: int, src: list[int], dst: list[int]) -> None:
        """Copy the keys and values at positions ``src`` of ``slot`` to positions ``dst`` (an
        accepted path of a draft tree, moved in place behind the prefix)."""
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for store in (self.keys, self.values):
            for layer in store:
                layer[slot, :, d] = layer[slot, :, s]     # the right side is gathered first

    @property
    def position_bytes(self) -> int:
        """Bytes one position of one slot takes: keys and values of every layer."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * self.keys[0].element_size()

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy positions ``[0, length)`` of slot ``src`` into slot ``dst`` (a shared prompt prefix)."""
        self.write_prefix(dst, [k[src] for k in self.keys], [v[src] for v in self.values], length)

    def write_prefix(self, dst: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Write positions ``[0, length)`` of per-layer ``[kv_heads, >= length, head_dim]``
        keys and values into slot ``dst``."""
        self.ensure(dst + 1, length)
        for store, part in ((self.keys, keys), (self.values, values)):
            for layer, src in zip(store, part):
                layer[dst, :, :length] = src[:, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class SlotTable:
    """Which sequence holds which slot, least recently used first; and, for a free slot, the
    tokens whose keys and values it still holds (a released sequence's, for prefix caching)."""

    def __init__(self, max_slots: int, on_evict: Callable[[Any], None]) -> None:
        self.max_slots = max_slots
        self._owners: OrderedDict[int, Any] = OrderedDict()   # slot -> owner, LRU order
        self._left: dict[int, list[int]] = {}                   # free slot -> tokens its KV holds
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._owners)

    def acquire(self, owner: Any, busy: set[Hashable], prefer: int | None = None, allocated: int = 0,
                held: Callable[[Any], list[int]] | None = None) -> tuple[int, list[int]]:
        """A slot for ``owner``, and the tokens whose keys and values it held and the owner will
        overwrite (empty: none). A free one if any: the lowest of those that hold nothing kept
        and are already ``allocated`` (so what the others hold stays for later prompts; the
        caller copies the shared prefix in), else ``prefer`` (the slot holding the owner's
        prefix, taken over in place), else the one released longest ago. Else the least
        recently used owner whose ``id`` is not in ``busy`` is evicted (``held(owner)``: what
        its slot held)."""
        free = [slot for slot in range(self.max_slots) if slot not in self._owners]
        if free:
            empty = [slot for slot in free if slot not in self._left and slot < allocated]
            slot = empty[0] if empty else prefer if prefer in free else next(iter(self._left), free[0])
            self._owners[slot] = owner
            return slot, self._left.pop(slot, [])
        for slot, other in self._owners.items():
            if id(other) not in busy:
                overwritten = held(other) if held is not None else []
                self._on_evict(other)
                del self._owners[slot]
                self._owners[slot] = owner
                return slot, overwritten
        raise RuntimeError(f"all {self.max_slots} KV slots are in use by sequences stepping now: "
                           "step fewer sequences at once or raise max_batch")

    def touch(self, slot: int) -> None:
        self._owners.move_to_end(slot)

    def release(self, slot: int, tokens: list[int] | None = None) -> None:
        """Free ``slot``; ``tokens``: those whose keys and values it holds, kept for reuse."""
        self._owners.pop(slot, None)
        self._left.pop(slot, None)
        if tokens:
            self._left[slot] = tokens          # last in the dict: the most recently released

    def contents(self, held: Callable[[Any], list[int]]) -> list[tuple[int, list[int]]]:
        """(slot, tokens its KV holds) for every slot: ``held(owner)`` for one in use, the
        released sequence's tokens for a free one."""
        return [(slot, held(owner)) for slot, owner in self._owners.items()] + list(self._left.items())

    def owner(self, slot: int) -> Any:
        return self._owners.get(slot)


class KeptPrefix:
    """Keys and values of a token prefix copied out of the pool: ``[kv_heads, len(tokens), head_dim]`` per layer."""

    __slots__ = ("tokens", "keys", "values", "nbytes")

    def __init__(self, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.tokens, self.keys, self.values = tokens, keys, values
        self.nbytes = sum(t.numel() * t.element_size() for t in keys + values)


class PrefixStore:
    """What a slot held when it was handed to a sequence that shares none of it (or its owner
    was evicted): the keys and values copied out, exactly their length, so that a later prompt
    starting the same way still skips that prefill although every slot has turned over -- a
    server at full batch hands each newcomer the slot just freed. Least recently used entries
    are dropped past ``budget_bytes``; an entry another one extends is dropped for it."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[int, KeptPrefix] = OrderedDict()     # id -> entry, LRU first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[KeptPrefix]:
        return list(self._entries.values())

    def put(self, tokens: list[int], pool: KVPool, slot: int) -> KeptPrefix | None:
        """Copy the keys and values of ``tokens`` (positions ``[0, len(tokens))`` of ``slot``)
        in, unless an entry already holds them; None: nothing kept (over the budget)."""
        n = len(tokens)
        for key, entry in list(self._entries.items()):
            if entry.tokens[:n] == tokens:                 # already kept, maybe with more
                self._entries.move_to_end(key)
                return entry
            if len(entry.tokens) < n and tokens[:len(entry.tokens)] == entry.tokens:
                self._drop(key)                            # the new one extends it
        size = n * pool.position_bytes
        if n == 0 or size > self.budget_bytes:
            return None
        while self.nbytes + size > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        entry = KeptPrefix(list(tokens), [k[slot, :, :n].clone() for k in pool.keys],
                           [v[slot, :, :n].clone() for v in pool.values])
        self._entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        return entry

    def restore(self, entry: KeptPrefix, pool: KVPool, slot: int, length: int) -> None:
        """Copy the entry's first ``length`` positions into ``slot`` (a cache hit)."""
        pool.write_prefix(slot, entry.keys, entry.values, length)
        if id(entry) in self._entries:
            self._entries.move_to_end(id(entry))

    def _drop(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
