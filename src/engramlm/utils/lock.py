"""Exclusive, process-lifetime locks on directories (run directories, prepared-data outputs).

A lock is ``fcntl.flock`` on a small lock file that is never deleted (deleting a lock file lets two
processes lock two different inodes under one name). The kernel drops a flock when its last file
descriptor closes, so a process killed with SIGKILL never leaves a stale lock, and no "is the pid
still alive" guessing is needed. The holder writes its pid into the file only so that the next
process can name it in its error message.

flock is per open file description: a second ``open`` in the *same* process would conflict with
the first. Locks are therefore shared within one process (counted per lock file), so several
objects of one program may own the same directory; the exclusion that matters is between processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from engramlm.errors import EngramError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (documented limitation)
    fcntl = None  # type: ignore[assignment]


class LockedError(EngramError):
    """Another live process holds the lock."""


_HELD: dict[str, list[int]] = {}  # lock file (resolved) -> [fd, number of holders in this process]


def lock_holder(lock_file: str | os.PathLike[str]) -> int | None:
    """The pid recorded by the process holding (or that last held) ``lock_file``, if readable."""
    try:
        text = Path(lock_file).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class DirLock:
    """An exclusive lock on ``lock_file``, held until :meth:`release` or the process ends.

    ``wait=False`` raises :class:`LockedError` at once (message: ``what`` and the holder's pid);
    ``wait=True`` calls ``on_wait`` once with that message, then blocks until the holder is gone.
    """

    def __init__(
        self,
        lock_file: str | os.PathLike[str],
        what: str,
        *,
        wait: bool = False,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(lock_file).resolve()
        self._key = str(self.path)
        self._held = False
        if fcntl is None:
            return
        entry = _HELD.get(self._key)
        if entry is not None:
            entry[1] += 1
            self._held = True
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = lock_holder(self.path)
                msg = f"{what} is in use by another process" + (f" (pid {pid})" if pid else "") + f"; lock {self.path}"
                if not wait:
                    raise LockedError(msg) from None
                (on_wait or (lambda m: print(m, file=sys.stderr)))(f"waiting: {msg}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        _HELD[self._key] = [fd, 1]
        self._held = True

    def release(self) -> None:
        """Give up this holder's share; the flock goes when the last holder in the process releases."""
        if not self._held:
            return
        self._held = False
        entry = _HELD.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            os.close(entry[0])  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["DirLock", "LockedError", "lock_holder"]
