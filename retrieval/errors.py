"""Errors of the retrieval layer.

Every error a user can act on derives from :class:`RetrievalError`: the CLI prints it as one
line (exit 1) and ``deploy`` maps the subclasses to HTTP statuses:

================================  ======  ==============================================
error                             HTTP    meaning
================================  ======  ==============================================
:class:`IndexNotFoundError`       404     no index (manifest) in the given directory
:class:`IndexMismatchError`       409     index built with another embedding model,
                                          dimension or generator tokenizer
:class:`EmptyCorpusError`         400     ingest found no text at all
:class:`StoreUnavailableError`    503     Redis cannot be reached (retry later: the next
                                          call reconnects by itself)
================================  ======  ==============================================
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class for retrieval errors a user can act on."""


class IndexNotFoundError(RetrievalError):
    """The index directory has no manifest: run ``specrag ingest`` first (HTTP 404)."""


class IndexMismatchError(RetrievalError):
    """The index was built with another embedding model / dimension / tokenizer (HTTP 409)."""


class EmptyCorpusError(RetrievalError):
    """Nothing to index: every input was empty, unreadable or binary (HTTP 400)."""


class StoreUnavailableError(RetrievalError):
    """The Redis document store / cache cannot be reached (HTTP 503); transient by nature."""


class UnknownChunkError(RetrievalError):
    """A chunk id asked for is not in the index (HTTP 404)."""
