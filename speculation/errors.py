"""Errors of the decoding engine. Each carries a message a user can act on, and the HTTP
status and OpenAI-style error type the endpoint answers with (read by ``deploy.errors``)."""


class SpeculationError(Exception):
    """Base class: the CLI and the HTTP layer turn these into one-line messages (HTTP 400)."""

    http_status = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(SpeculationError):
    """A model name or path that resolves to nothing on this machine (HTTP 404)."""

    http_status = 404
    error_type = "model_not_found"


class TokenizerMismatchError(SpeculationError):
    """A draft model whose tokenizer differs from the target's (HTTP 503: the server's set-up)."""

    http_status = 503
    error_type = "service_unavailable"


class GenerationInputError(SpeculationError):
    """Bad generation input: empty prompt, max_tokens < 1, prompt beyond context, ... (HTTP 400)."""
