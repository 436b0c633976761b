"""Exceptions raised at the library's edges, so callers can catch one family."""


class EngramError(Exception):
    """Base class of every engramlm error."""


class ConfigError(EngramError, ValueError):
    """A config field has a bad value. The message names the field and the allowed values."""


class HashSpecMismatch(EngramError):
    """A table or checkpoint was written under a different hash spec than the one asked for."""


class CorruptFileError(EngramError):
    """A file is truncated, has a bad checksum, or is not of the expected format."""


class CorruptModelFileError(CorruptFileError):
    """A file of a saved model, a training checkpoint or the tokenizer found for it is unreadable, truncated
    or fails its checksum. The message starts with the file's path."""


class ModelNotFoundError(CorruptFileError):
    """A path is neither a saved model, a training checkpoint nor a run directory with checkpoints: the files
    a model consists of are absent (as elsewhere in this family, a missing file is a CorruptFileError)."""


class TokenizerNotFoundError(ConfigError):
    """No tokenizer matching a saved model was found; the message lists where it looked and what it skipped."""


class ForeignTokenizerError(HashSpecMismatch):
    """A tokenizer is not the one a saved model was trained with (its n-grams would map to other rows)."""
