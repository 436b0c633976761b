"""A training run directory owned by one process: locked, cleaned, never silently mixed or deleted.

Opening a :class:`RunDir` takes an exclusive lock on ``OUT_DIR/.lock`` (``utils.lock``: released by
the kernel when the process dies, so a SIGKILL leaves no stale lock) and then, under that lock,
removes what interrupted writes leave behind (``checkpoints/.tmp-step_*`` half-built checkpoints,
``checkpoints/.trash-step_*`` half-deleted ones, ``.*.tmp`` files of atomic writes): nobody else
can be writing them while we hold the lock.

:meth:`RunDir.claim` then decides what a new or resumed run may do with what is already there:

* a fresh run into a directory that holds a run (checkpoints, config.json, metrics.jsonl or
  summary.json) is refused: it would truncate the old metrics and the old, higher-numbered
  checkpoints would win every later prune and resume;
* resuming from a checkpoint older than the directory's newest one is refused for the same reason;
* with ``overwrite`` the old run (or the newer checkpoints) is *moved aside*, never deleted, to the
  sibling directory ``OUT_DIR.old-<UTC time>/``. A sibling rather than a subdirectory keeps one run
  per directory (listing, eval, plot, copying the new run never drag the old one along, and repeated
  overwrites do not nest), and the old run stays a complete run directory usable as is. Entries are
  renamed one by one under the lock; a kill mid-way leaves the rest in OUT_DIR, which then still
  "holds a run" (leftover SSD table files count) and is refused or moved aside again, so nothing is lost.

SSD tables (``engram.table_tier=ssd``) live in ``OUT_DIR/engram_tables/``, named by each checkpoint by a
path relative to itself, so they move with the run. Moving only the newer checkpoints (``--resume
--overwrite`` from an older one) hard-links the table files they name into the aside directory (a base is
immutable and a log is appended only by the session that made it, so sharing an inode is safe): the resumed
run's garbage collection, which deletes what its own checkpoints no longer name, never takes a file the
moved checkpoints need.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from engramlm.errors import ConfigError
from engramlm.models.locate import checkpoint_step, checkpoints_dir, list_checkpoints
from engramlm.store.trainable import link_table_files
from engramlm.train.metrics import METRICS_NAME
from engramlm.train.ssd import TABLES_DIR
from engramlm.utils.io import fsync_path
from engramlm.utils.lock import DirLock

LOCK_NAME = ".lock"
# what a run writes at the top of its directory (anything else there is left where it is)
RUN_FILES = ("config.json", METRICS_NAME, "summary.json")
# moved aside with the run by --overwrite: its files plus what commands wrote about it (analyze's default output)
RUN_ENTRIES = ("checkpoints", TABLES_DIR, *RUN_FILES, "tb", "analysis")
_ORPHAN_FILE = re.compile(r"^\..+\.tmp$")  # utils.io.atomic_open temp files
_ORPHAN_CKPT = re.compile(r"^\.(tmp-step_\d{8}-.+|trash-step_\d{8}-\d+)$")  # checkpoint.save_checkpoint / _remove


class RunDir:
    """``path`` locked by this process until :meth:`close` (or exit); orphans removed on open."""

    def __init__(self, path: str | os.PathLike[str], *, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = DirLock(self.path / LOCK_NAME, f"run directory {self.path}")
        try:
            self.removed = self.clean_orphans()
        except BaseException:
            self._lock.release()
            raise

    # ---- state ---------------------------------------------------------------------------------
    def clean_orphans(self) -> list[Path]:
        """Delete leftovers of interrupted writes (safe: only the lock holder writes here)."""
        found = [p for p in self.path.iterdir() if _ORPHAN_FILE.match(p.name) and p.is_file()]
        ck = checkpoints_dir(self.path)
        if ck.is_dir():
            found += [p for p in ck.iterdir() if _ORPHAN_CKPT.match(p.name) and p.is_dir()]
        for p in found:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        if found:
            self.log(f"{self.path}: removed {len(found)} leftover(s) of an interrupted run: "
                     + ", ".join(str(p.relative_to(self.path)) for p in found))  # fmt: skip
        return found

    def run_contents(self) -> list[str]:
        """What makes this directory hold a run (empty: it holds none)."""
        ckpts = list_checkpoints(self.path)
        out = [f"checkpoints up to {ckpts[-1].name}"] if ckpts else []
        tables = self.path / TABLES_DIR  # SSD table files (maybe left by a move cut short): never reused
        if tables.is_dir() and any(tables.iterdir()):
            out.append(f"{TABLES_DIR}/")
        return out + [name for name in RUN_FILES if (self.path / name).exists()]

    # ---- policy --------------------------------------------------------------------------------
    def claim(self, *, resume_from: Path | None = None, overwrite: bool = False) -> Path | None:
        """Make the directory ready for a run (resuming checkpoint ``resume_from``, or fresh).

        Refuses (:class:`ConfigError` naming ``out_dir``) what would mix two runs, unless
        ``overwrite``: then the conflicting part is moved aside. Returns the aside directory, if any.
        """
        ck_root = checkpoints_dir(self.path).resolve()
        if resume_from is not None and Path(resume_from).resolve().parent == ck_root:
            newer = [c for c in list_checkpoints(self.path) if checkpoint_step(c) > checkpoint_step(Path(resume_from))]
            if not newer:
                return None
            if not overwrite:
                raise ConfigError(
                    f"out_dir: {self.path} has checkpoints newer than {Path(resume_from).name} (up to "
                    f"{newer[-1].name}); resuming from it would mix two runs. Resume from the latest, use another "
                    "out_dir, or pass --overwrite to move the newer checkpoints aside"
                )
            return self.move_aside([*newer], copies=RUN_FILES)
        have = self.run_contents()
        if not have:
            return None
        if not overwrite:
            hint = "" if resume_from is not None else "pass --resume to continue it, or "
            raise ConfigError(
                f"out_dir: {self.path} already holds a run ({', '.join(have)}); {hint}pass --overwrite to move it "
                f"aside to {self.path.name}.old-<time>/ (nothing is deleted), or choose another out_dir"
            )
        return self.move_aside()

    def move_aside(self, entries: list[Path] | None = None, copies: tuple[str, ...] = ()) -> Path:
        """Rename ``entries`` (default: every run entry) into a new sibling ``NAME.old-<UTC time>/``;
        ``copies`` (top-level file names) are copied there too, so it reads as a run record."""
        if entries is None:
            entries = [self.path / n for n in RUN_ENTRIES if (self.path / n).exists()]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.parent / f"{self.path.name}.old-{stamp}"
        n = 0
        while True:
            try:
                aside.mkdir()
                break
            except FileExistsError:
                n += 1
                aside = self.path.parent / f"{self.path.name}.old-{stamp}-{n}"
        for name in copies:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, aside / name)
        moving_tables = any(src.name == TABLES_DIR and src.parent == self.path for src in entries)
        shared = [] if moving_tables else _shared_tables(self.path, entries)
        for src in entries:
            dst = aside / src.relative_to(self.path)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(src, dst)
            except OSError as exc:
                raise ConfigError(f"out_dir: could not move {src} aside to {dst} ({exc}); nothing was deleted") from exc
        for old, rel, names in shared:  # the moved checkpoints' table files, where they now look for them
            link_table_files(old, aside / rel, names)
        for d in (aside / "checkpoints", aside, checkpoints_dir(self.path), self.path, self.path.parent):
            if d.is_dir():
                fsync_path(d)
        self.log(f"{self.path}: moved the previous run aside to {aside}")
        return aside

    # ---- lifetime ------------------------------------------------------------------------------
    @property
    def locked(self) -> bool:
        return self._lock.held

    def close(self) -> None:
        """Release the lock (idempotent)."""
        self._lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shared_tables(run: Path, entries: list[Path]) -> list[tuple[Path, Path, set[str]]]:
    """(table directory, its path relative to ``run``, file names) for the SSD table files that checkpoints
    among ``entries`` name inside ``run``: what they keep needing once moved away from ``run/engram_tables``."""
    from engramlm.errors import CorruptFileError
    from engramlm.store.trainable import checkpoint_table_docs, manifest_files, read_tables_doc

    root = run.resolve()
    found: dict[Path, set[str]] = {}
    for ckpt in entries:
        for doc in checkpoint_table_docs(ckpt) if ckpt.is_dir() else []:
            try:
                layers = read_tables_doc(doc).values()
            except CorruptFileError:  # an unreadable checkpoint still moves aside; it had no usable tables
                continue
            for d, man in layers:
                if d.is_relative_to(root) and all((d / n).is_file() for n in manifest_files(man)):
                    found.setdefault(d, set()).update(manifest_files(man))
    return [(d, d.relative_to(root), names) for d, names in sorted(found.items())]


__all__ = ["LOCK_NAME", "RUN_ENTRIES", "RunDir"]
