"""Which saved model, which tokenizer: the one resolver every command that reads a trained model uses.

Three kinds of path name a trained model:

- a *saved model* directory (:func:`engramlm.models.io.save_pretrained`: ``config.json``,
  ``model.safetensors``, ``engram_hash.safetensors``);
- a training *checkpoint*, ``RUN/checkpoints/step_00000120/``: ``model/`` (a saved model),
  ``trainer_state.json`` (with the sha256 of every file) and the optimizer state;
- a *run* directory (training output): its latest checkpoint.

:func:`locate_model` turns any of them into :class:`ModelFiles`; :func:`load_trained_model` loads the
model for inference or analysis (checkpoint files verified against their recorded sha256 first);
:func:`find_tokenizer` finds the tokenizer it was trained with. Training state (optimizer, loader,
RNG) stays in :mod:`engramlm.train.checkpoint`, which writes what this module reads.

**The tokenizer check** (:func:`verify_tokenizer`, the only one): the candidate's compression map,
rebuilt here, must equal the map stored in the model's hash artefact (same digest). That map is what
decides which row an n-gram goes to (the hash fingerprint is a function of it and the model's own
spec), every Engram model stores it, and it does not depend on how the tokenizer file is serialised.
The file's sha256, which the map also records, is absent when the map was built from a tokenizer
object and refuses a byte-different copy of the same tokenizer, so it is not used. A model without
Engram layers records nothing about its tokenizer: only its id count is checked.

Errors: a corrupt file is :class:`CorruptModelFileError` (naming the file), a path that is no model
:class:`ModelNotFoundError`, no matching tokenizer :class:`TokenizerNotFoundError`, a tokenizer named
by the caller that does not match :class:`ForeignTokenizerError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engramlm.errors import (
    ConfigError,
    CorruptFileError,
    CorruptModelFileError,
    ForeignTokenizerError,
    ModelNotFoundError,
    TokenizerNotFoundError,
)
from engramlm.utils.io import sha256_file

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from engramlm.models.model import EngramLM

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MODEL_SUBDIR",
    "TOKENIZER_FILE",
    "TRAINER_STATE",
    "ModelFiles",
    "TrainedModel",
    "checkpoint_step",
    "checkpoints_dir",
    "find_tokenizer",
    "list_checkpoints",
    "load_trained_model",
    "locate_model",
    "read_tokenizer",
    "read_trainer_state",
    "resolve_checkpoint",
    "verify_checkpoint_files",
    "verify_tokenizer",
]

CHECKPOINT_FORMAT = "engramlm.train_checkpoint"
CHECKPOINT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"
MODEL_SUBDIR = "model"
TOKENIZER_FILE = "tokenizer.json"
_CONFIG, _WEIGHTS = "config.json", "model.safetensors"


# ------------------------------------------------------------------------------------ runs and checkpoints


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step a checkpoint directory is named for (``step_00000120`` -> 120)."""
    m = STEP_RE.match(Path(path).name)
    if m is None:
        raise ModelNotFoundError(f"checkpoint: {path} is not named step_NNNNNNNN")
    return int(m.group(1))


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp-*`` / ``.trash-*`` directories are not listed)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A training checkpoint directory: ``path`` itself, or the latest checkpoint of the run ``path``."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise ModelNotFoundError(
            f"checkpoint: {p} is neither a training checkpoint (no {TRAINER_STATE}) nor a run directory "
            "with checkpoints"
        )
    return ckpts[-1]


def read_trainer_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, checked to be an engramlm training checkpoint."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptModelFileError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CorruptModelFileError(f"{path}: not an engramlm training checkpoint state")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CorruptModelFileError(
            f"{path}: training checkpoint version {state.get('version')!r}, this library reads {CHECKPOINT_VERSION}"
        )
    if not isinstance(state.get("files"), dict):
        raise CorruptModelFileError(f"{path}: no 'files' table of sha256 digests")
    return state


def verify_checkpoint_files(checkpoint: str | os.PathLike[str], state: dict[str, Any], under: str = "") -> None:
    """Check every file the state lists (only those below ``under``, e.g. ``"model/"``) against its sha256."""
    root = Path(checkpoint)
    for rel, digest in state["files"].items():
        if not str(rel).startswith(under):
            continue
        f = root / rel
        if not f.is_file():
            raise CorruptModelFileError(f"{f}: missing, but {root / TRAINER_STATE} lists it; the checkpoint is corrupt")
        if sha256_file(f) != digest:
            raise CorruptModelFileError(f"{f}: sha256 does not match {TRAINER_STATE}; the checkpoint is corrupt")


# ------------------------------------------------------------------------------------ saved models


@dataclass(frozen=True)
class ModelFiles:
    """Where a trained model's files are.

    ``given``: the path as passed; ``model_dir``: its saved-model directory; ``checkpoint``: the
    training checkpoint it belongs to (None for a bare saved model)."""

    given: Path
    model_dir: Path
    checkpoint: Path | None

    @property
    def weights(self) -> Path:
        return self.model_dir / _WEIGHTS

    @property
    def config_file(self) -> Path:
        return self.model_dir / _CONFIG

    def trainer_state(self) -> dict[str, Any] | None:
        """The checkpoint's trainer state (None for a bare saved model); a corrupt one raises."""
        return None if self.checkpoint is None else read_trainer_state(self.checkpoint)

    def verify(self) -> dict[str, Any] | None:
        """Check the model's files against the sha256 its training checkpoint recorded, or, for a bare saved
        model, against its ``checksums.json`` (one warning if it has none); returns the trainer state."""
        from engramlm.models.io import verify_saved_model

        state = self.trainer_state()
        if state is not None:
            verify_checkpoint_files(self.checkpoint, state, under=f"{MODEL_SUBDIR}/")
        else:
            verify_saved_model(self.model_dir)
        return state

    def weights_sha256(self) -> str:
        """The sha256 of ``model.safetensors``: the model's identity a store is bound to. Read from the
        checkpoint's or the saved model's recorded digests (checked by :meth:`verify`), else computed."""
        from engramlm.models.io import CHECKSUMS, recorded_checksums

        state = self.trainer_state()
        recorded = None
        if state is not None:
            recorded = state["files"].get(f"{MODEL_SUBDIR}/{_WEIGHTS}")
        elif (self.model_dir / CHECKSUMS).is_file():
            with contextlib.suppress(CorruptModelFileError):  # unreadable: compute it instead
                recorded = recorded_checksums(self.model_dir).get(_WEIGHTS)
        return recorded if isinstance(recorded, str) else sha256_file(self.weights)

    def read_config(self) -> dict[str, Any]:
        """``config.json`` as written by ``save_pretrained`` (format checks are ``load_pretrained``'s)."""
        try:
            doc = json.loads(self.config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptModelFileError(f"{self.config_file}: not a readable JSON file ({exc})") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
            raise CorruptModelFileError(f"{self.config_file}: no 'model' section (is this a saved engramlm model?)")
        return doc


def _is_saved_model(d: Path) -> bool:
    return (d / _CONFIG).is_file() and (d / _WEIGHTS).is_file()


def locate_model(path: str | os.PathLike[str]) -> ModelFiles:
    """A saved model directory, a training checkpoint or a run directory (its latest checkpoint) -> its files."""
    p = Path(path)
    if _is_saved_model(p):
        parent = p.parent
        return ModelFiles(p, p, parent if p.name == MODEL_SUBDIR and (parent / TRAINER_STATE).is_file() else None)
    if not p.is_dir():
        raise ModelNotFoundError(f"checkpoint: {p} does not exist or is not a directory")
    if (p / TRAINER_STATE).is_file() or list_checkpoints(p):
        ckpt = resolve_checkpoint(p)
        if not _is_saved_model(ckpt / MODEL_SUBDIR):
            raise CorruptModelFileError(
                f"{ckpt / MODEL_SUBDIR}: missing or incomplete ({_CONFIG} + {_WEIGHTS}); the checkpoint is corrupt"
            )
        return ModelFiles(p, ckpt / MODEL_SUBDIR, ckpt)
    raise ModelNotFoundError(
        f"checkpoint: {p} is not a saved model (no {_CONFIG} + {_WEIGHTS}), a training checkpoint (no "
        f"{TRAINER_STATE}) or a run directory with checkpoints"
    )


@dataclass
class TrainedModel:
    """A model loaded by :func:`load_trained_model`, with where it came from and its training state."""

    model: EngramLM
    files: ModelFiles
    state: dict[str, Any] | None  # trainer_state.json when it came from a training checkpoint

    @property
    def step(self) -> int | None:
        return None if self.state is None else int(self.state["step"])


def load_trained_model(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    inference: bool = True,
) -> TrainedModel:
    """Load the model at ``path`` (saved model, checkpoint or run directory).

    ``verify``: check the model files' sha256 first (against the training checkpoint's digests, or the
    saved model's ``checksums.json``).
    ``inference``: eval mode with gradients off (generation, evaluation and analysis never train).
    Any unreadable file raises :class:`CorruptModelFileError` naming it.
    """
    from engramlm.models.io import load_pretrained

    files = locate_model(path)
    state = files.verify() if verify else files.trainer_state()
    try:
        model = load_pretrained(files.model_dir, map_location=map_location, verify=False)  # checked just above
    except CorruptModelFileError:
        raise
    except CorruptFileError as exc:  # raised by io/artifact with the file's path first
        raise CorruptModelFileError(str(exc)) from exc
    if inference:
        model.eval()
        model.requires_grad_(False)
    return TrainedModel(model, files, state)


# ------------------------------------------------------------------------------------ tokenizers


def read_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load any ``tokenizer.json`` (HF tokenizers format); an unreadable one is :class:`CorruptModelFileError`."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise CorruptModelFileError(f"{path}: not a readable tokenizer.json ({exc})") from exc


def verify_tokenizer(model: EngramLM, path: str | os.PathLike[str], *, what: str = "the model") -> Tokenizer:
    """Load ``path`` and refuse it (:class:`ForeignTokenizerError`) unless ``model`` was trained with it.

    The check is the module's one check (see the module docstring): the tokenizer's compression map must
    be the model's; for a model without Engram layers, its ids must fit the embedding.
    """
    from engramlm.hashing.compression import IDENTITY_NORMALIZER, CompressionMap

    tok = read_tokenizer(path)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > model.config.vocab_size:
        raise ForeignTokenizerError(
            f"tokenizer {path} has {size} ids, {what} only {model.config.vocab_size}: not the tokenizer it was "
            "trained with"
        )
    layout = model.layout
    if layout is None:
        return tok
    cmap = layout.compression
    if cmap.normalizer == IDENTITY_NORMALIZER:  # P = id: any tokenizer whose ids fit hashes identically
        if size > cmap.vocab_size:
            raise ForeignTokenizerError(
                f"tokenizer {path} has {size} ids, the compression map of {what} covers {cmap.vocab_size}"
            )
        return tok
    mine = CompressionMap.from_tokenizer(tok, enabled=True)
    if mine.digest() != cmap.digest():
        why = "" if mine.normalizer == cmap.normalizer else f" (built with normalizer {cmap.normalizer!r})"
        raise ForeignTokenizerError(
            f"tokenizer {path} is not the one {what} was trained with: its compression map (sha256 "
            f"{mine.digest()[:16]}...) differs from the model's{why} ({cmap.digest()[:16]}...), so the hash "
            "fingerprint differs and its n-grams would map to other rows; pass the tokenizer it was trained with"
        )
    return tok


def _near(files: ModelFiles) -> list[Path]:
    """Directories that may hold the tokenizer, nearest first: the model, its checkpoint, the path given
    and three levels above it, then the training data the checkpoint's trainer state names."""
    dirs = [files.model_dir, files.model_dir.parent, files.given, *files.given.parents[:3]]
    state = files.trainer_state()  # a corrupt state raises here: it is not "no tokenizer"
    config = state.get("config") if state is not None else None
    data = config.get("data") if isinstance(config, dict) else None
    data_dir = data.get("dir") if isinstance(data, dict) else None
    if isinstance(data_dir, str) and data_dir:
        dirs.append(Path(data_dir))
    return list(dict.fromkeys(dirs))


def find_tokenizer(
    path: str | os.PathLike[str] | ModelFiles,
    model: EngramLM,
    *,
    explicit: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
) -> Path:
    """The ``tokenizer.json`` that the model at ``path`` was trained with, checked by :func:`verify_tokenizer`.

    A tokenizer the caller names (``explicit``: a path or a known name; else the prepared corpus
    ``data``'s) must match, or :class:`ForeignTokenizerError`. Otherwise candidates are tried in order:
    next to the model (see :func:`_near`), then the config's ``engram.tokenizer``; ones that do not
    match are skipped and, when none matches, listed in :class:`TokenizerNotFoundError`. A corrupt
    candidate raises :class:`CorruptModelFileError`.
    """
    from engramlm.assets import resolve_tokenizer

    files = path if isinstance(path, ModelFiles) else locate_model(path)
    what = f"model {files.model_dir}"
    named = resolve_tokenizer(explicit) if explicit else None
    if named is None and data is not None and (Path(data) / TOKENIZER_FILE).is_file():
        named = Path(data) / TOKENIZER_FILE
    if named is not None:
        verify_tokenizer(model, named, what=what)
        return named
    dirs = _near(files)
    candidates = [d / TOKENIZER_FILE for d in dirs if (d / TOKENIZER_FILE).is_file()]
    engram = model.config.engram
    if engram is not None and engram.tokenizer:
        try:
            candidates.append(resolve_tokenizer(engram.tokenizer))
        except ConfigError:  # the config names a file that is not here and no known name
            pass
    skipped = []
    for candidate in dict.fromkeys(candidates):
        try:
            verify_tokenizer(model, candidate, what=what)
        except ForeignTokenizerError:
            skipped.append(str(candidate))
            continue
        return candidate
    raise TokenizerNotFoundError(
        f"tokenizer: none found for {what} (pass --tokenizer, or --data with a prepared corpus); looked for "
        f"{TOKENIZER_FILE} in {[str(d) for d in dirs]} and at config.engram.tokenizer"
        + (f"; skipped, compression map sha256 mismatch: {skipped}" if skipped else "")
    )
