"""CPU affinity of threads: which cores the decode thread and the I/O threads may run on.

Why: on a machine with few cores, a tier's I/O thread woken beside the decode thread either preempts it or
pushes it to the other core, where it starts with a cold L2 (2 MiB per core on this project's VM). Keeping
the decode thread on some cores and the readers on the others removes both (``bench_generate --pin``).
Linux only: elsewhere :func:`supported` is False and asking for a CPU set is a :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Iterable, Iterator

from engramlm.errors import ConfigError


def supported() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def cpu_set(cpus: Iterable[int] | None, field: str) -> frozenset[int] | None:
    """``cpus`` checked against the CPUs this machine has: a non-empty frozenset of them, or None (any CPU).

    One precise ConfigError naming ``field`` otherwise (not CPU numbers, empty, a CPU that does not exist, or a
    platform without thread affinity). A CPU outside this process's cpuset is dropped by the kernel."""
    if cpus is None:
        return None
    if not supported():
        raise ConfigError(f"{field}: thread affinity needs Linux (os.sched_setaffinity); pass None")
    try:
        if isinstance(cpus, (str, bytes)):
            raise TypeError
        items = [operator.index(c) if not isinstance(c, bool) else operator.index(None) for c in cpus]  # no bools
    except TypeError:
        raise ConfigError(f"{field}: must be CPU numbers (ints) or None, got {cpus!r}") from None
    if not items:
        raise ConfigError(f"{field}: must name at least one CPU, got {cpus!r}")
    known = every_cpu()
    if not set(items) <= known:
        raise ConfigError(f"{field}: CPUs {sorted(set(items) - known)} do not exist here; CPUs are {sorted(known)}")
    return frozenset(items)


def every_cpu() -> frozenset[int]:
    """The CPUs a thread may be allowed to run on (the kernel drops any outside this process's cpuset)."""
    return frozenset(range(os.cpu_count() or 1))


def pin(tids: Iterable[int], cpus: frozenset[int] | None) -> int:
    """Confine threads ``tids`` (native ids; 0 = the calling thread) to ``cpus`` (None: every CPU); returns how
    many were set. A thread that has exited is skipped. No-op (0) where thread affinity is unsupported."""
    if not supported():
        return 0
    target = every_cpu() if cpus is None else cpus
    done = 0
    for tid in tids:
        try:
            os.sched_setaffinity(tid, target)
        except ProcessLookupError:
            continue
        done += 1
    return done


@contextlib.contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """The calling thread confined to ``cpus`` for the block, its own CPU set restored after (None: untouched)."""
    if cpus is None or not supported():
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
