"""Exceptions raised at the library's edges, so callers can catch one family."""


class EngramError(Exception):
    """Base class of every engramlm error."""


class ConfigError(EngramError, ValueError):
    """A config field has a bad value. The message names the field and the allowed values."""


class HashSpecMismatch(EngramError):
    """A table or checkpoint was written under a different hash spec than the one asked for."""


class CorruptFileError(EngramError):
    """A file is truncated, has a bad checksum, or is not of the expected format."""
