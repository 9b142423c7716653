"""Errors of the RAG pipeline a user can act on. The CLI prints them as one line; each class
carries the HTTP status and OpenAI-style error type the endpoint answers with (``deploy.errors``
reads them, so a rename cannot silently turn a 400 into a 500)."""


class PipelineError(Exception):
    """Base class for pipeline errors a user can act on (HTTP 400)."""

    http_status = 400
    error_type = "invalid_request_error"


class QuestionError(PipelineError):
    """The question is empty or otherwise unusable (HTTP 400)."""


class PromptTooLongError(PipelineError):
    """The question (with the minimum of sources) does not fit the model's context (HTTP 400)."""

    def __init__(self, message: str, *, prompt_tokens: int, context_tokens: int, max_tokens: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens
        self.max_tokens = max_tokens

    def __reduce__(self):
        # keyword-only arguments: pickle (Ray) would call cls(message) and fail
        return (_prompt_too_long, (str(self), self.prompt_tokens, self.context_tokens, self.max_tokens))

    def public_message(self) -> str:
        msg = str(self).strip()
        limits = [f"{name}={value}" for name, value in (("prompt_tokens", self.prompt_tokens),
                                                        ("context_tokens", self.context_tokens),
                                                        ("max_tokens", self.max_tokens))
                  if name not in msg and str(value) not in msg]
        return f"{msg} ({', '.join(limits)})" if limits else msg


def _prompt_too_long(message: str, prompt_tokens: int, context_tokens: int, max_tokens: int) -> PromptTooLongError:
    return PromptTooLongError(message, prompt_tokens=prompt_tokens, context_tokens=context_tokens,
                              max_tokens=max_tokens)


class CLIError(PipelineError):
    """A user error found by the CLI itself (bad flag combination, missing file, ...)."""


class RequestStopped(Exception):
    """The caller cancelled the answer (its client went away); not a user error, so no status."""
