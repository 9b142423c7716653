"""Errors of the RAG pipeline; the CLI prints them as one line, HTTP maps them to a status."""


class PipelineError(Exception):
    """Base class for pipeline errors a user can act on."""


class QuestionError(PipelineError):
    """The question is empty or otherwise unusable (HTTP 400)."""


class PromptTooLongError(PipelineError):
    """The question (with the minimum of sources) does not fit the model's context (HTTP 400)."""

    def __init__(self, message: str, *, prompt_tokens: int, context_tokens: int, max_tokens: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens
        self.max_tokens = max_tokens


class CLIError(PipelineError):
    """A user error found by the CLI itself (bad flag combination, missing file, ...)."""
