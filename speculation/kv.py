"""KV-cache bookkeeping: one place that knows how this transformers version crops a cache."""

from __future__ import annotations

import inspect
from typing import Any


def new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length())


def rollback(cache: Any, length: int) -> None:
    """Drop cached positions past ``length`` (rejected drafts) -- never a re-prefill."""
    current = cache_length(cache)
    if length >= current:
        return
    params = list(inspect.signature(cache.crop).parameters)
    if params and params[0] == "tokens_to_remove":   # transformers >= 5: negative count
        cache.crop(length - current)
    else:                                             # older: absolute max length
        cache.crop(length)
