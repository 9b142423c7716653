"""Errors of the decoding engine. Each carries a message a user can act on."""


class SpeculationError(Exception):
    """Base class: the CLI and the HTTP layer turn these into one-line messages."""


class ModelNotFoundError(SpeculationError):
    """A model name or path that resolves to nothing on this machine."""


class TokenizerMismatchError(SpeculationError):
    """A draft model whose tokenizer differs from the target's."""


class GenerationInputError(SpeculationError):
    """Bad generation input: empty prompt, max_tokens < 1, prompt beyond context, ..."""
