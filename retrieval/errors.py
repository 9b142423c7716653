"""Errors of the retrieval layer.

Every error a user can act on derives from :class:`RetrievalError`: the CLI prints it as one
line (exit 1). Behind the endpoint each is the server's problem, not the request's: the class
attributes ``http_status`` / ``error_type`` (read by ``deploy.errors``) make every one a 503
"retrieval unavailable; retry later":

================================  ==============================================
error                             meaning
================================  ==============================================
:class:`IndexNotFoundError`       no index (manifest) in the given directory
:class:`IndexMismatchError`       index built with another embedding model,
                                  dimension or generator tokenizer
:class:`EmptyCorpusError`         ingest found no text at all
:class:`StoreUnavailableError`    Redis cannot be reached (transient: the next
                                  call reconnects by itself)
:class:`UnknownChunkError`        a chunk id asked for is not in the index
================================  ==============================================
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class for retrieval errors a user can act on (HTTP 503 behind the endpoint)."""

    http_status = 503
    error_type = "service_unavailable"

    def public_message(self) -> str:
        return f"retrieval unavailable: {str(self).strip() or type(self).__name__}; retry later"


class IndexNotFoundError(RetrievalError):
    """The index directory has no manifest: run ``specrag ingest`` first."""


class IndexMismatchError(RetrievalError):
    """The index was built with another embedding model / dimension / tokenizer."""


class EmptyCorpusError(RetrievalError):
    """Nothing to index: every input was empty, unreadable or binary."""


class StoreUnavailableError(RetrievalError):
    """The Redis document store / cache cannot be reached; transient by nature."""


class UnknownChunkError(RetrievalError):
    """A chunk id asked for is not in the index."""
