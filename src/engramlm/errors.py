"""Exceptions raised at the library's edges, so callers can catch one family.

Callers branch on the exception class, never on its message: a condition some caller must tell
apart (a table not populated yet, a field path) gets its own subclass or attribute here.
"""

from __future__ import annotations


class EngramError(Exception):
    """Base class of every engramlm error."""


class ConfigError(EngramError, ValueError):
    """A config field has a bad value. The message names the field and the allowed values.

    ``field`` is the dotted path of the offending field (``"optim.lr"``), or None when the error is
    not about one field; ``message`` is the text after it. ``str(err)`` reads ``"optim.lr: message"``.
    Code that nests one config inside another moves the error with :meth:`under`, never by editing text.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.message = message
        self.field = field or None
        super().__init__(f"{self.field}: {message}" if self.field else message)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str | None]]:
        return type(self), (self.message, self.field)

    def under(self, path: str, section: str | None = None) -> ConfigError:
        """This error as seen from a parent that holds the raising object at ``path``.

        ``section`` is the name the raising object gives itself when standalone (e.g. ``"engram"``
        for fields it reports as ``engram.head_dim``); it is replaced by ``path`` rather than nested.
        """
        parts = self.field.split(".") if self.field else []
        own = section.split(".") if section else []
        if own and parts[: len(own)] == own:
            parts = parts[len(own) :]
        new = ".".join(p for p in [path, *parts] if p)
        return ConfigError(self.message, new or None)


class HashSpecMismatch(EngramError):
    """A table or checkpoint was written under a different hash spec than the one asked for."""


class MissingFingerprint(HashSpecMismatch):
    """A table carries no hash-spec fingerprint at all (e.g. a Mooncake layer not populated yet)."""


class ForeignStoreError(HashSpecMismatch):
    """A store directory was built from another model's weights (same hash spec, different tables)."""


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
