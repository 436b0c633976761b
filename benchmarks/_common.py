"""Shared plumbing for the benchmarks: machine info, interleaved timing, robust stats, results.

Why this exists: the benchmark machines are shared and noisy, so a number is only trustworthy
when (a) the contenders are timed interleaved in the same run, so a noisy neighbour hits all
of them alike, (b) it is a median over many repeats with its IQR as the spread, and (c) it is
stored with enough context (machine, versions, exact command, parameters) to be reproduced.
README tables are generated from the JSON files written here, never typed by hand.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent


# ---------------------------------------------------------------------------- machine info


def _proc_field(path: str, key: str) -> str | None:
    """First ``key: value`` line of a /proc file; None where /proc is absent (macOS, Windows)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    """HEAD's sha, or None (no git, not a repo, or no commit yet). Read-only: never touches the
    index, so it is safe while other people work in the same tree."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and sha else None


def _version(module: str) -> str | None:
    """A module's ``__version__`` or None if it is not importable (numba is optional)."""
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", None))


# Threading knobs that change results: numba's OpenMP pool and torch's OpenMP pool share the cores,
# and with the default spin-wait policy they can stall each other for a scheduler time slice.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
)


def sched_seconds(tid: int | None = None) -> tuple[float, float]:
    """(on-CPU, runnable-but-waiting) seconds of thread ``tid`` (native id; default the calling thread), from
    Linux's schedstat; (0, 0) elsewhere.

    On a shared machine a thread spends part of a call waiting for a CPU that other processes hold; that time
    says nothing about the code timed. Blocking on the GIL or on I/O is sleeping, not waiting to run, so it
    stays in ``wall - runnable``: the call time with the neighbours' share removed.
    """
    try:
        with open(f"/proc/self/task/{tid or threading.get_native_id()}/schedstat", encoding="ascii") as f:
            cpu_ns, wait_ns, _ = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(cpu_ns) / 1e9, int(wait_ns) / 1e9


def machine_info() -> dict[str, Any]:
    """Everything needed to judge whether two result files are comparable."""
    import torch

    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    ram_gib = round(int(mem_kb.split()[0]) / 2**20, 2) if mem_kb else None
    mhz = _proc_field("/proc/cpuinfo", "cpu MHz")
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    info: dict[str, Any] = {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or None,
        "cpu_mhz_reported": float(mhz) if mhz else None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "ram_gib": ram_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "git_commit": _git_commit(),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV_VARS},
    }
    # The hasher's own thread count. Not numba.get_num_threads(): that launches Numba's OpenMP layer,
    # which resets torch's thread count mid-run (the library does not use that layer at all).
    from engramlm.hashing.batch import default_threads

    info["hash_threads"] = default_threads()
    return info


def command_line() -> str:
    """The exact command that produced a result, runnable from the repository root.

    Run as ``python -m benchmarks.<name>``, ``sys.argv[0]`` is the module's file path; the record names the
    module instead, so it can be pasted back as it was typed.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return shlex.join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


# ---------------------------------------------------------------------------- results


def write_result(name: str, payload: Mapping[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``results/<name>.json`` atomically (a crash never leaves a torn file that
    ``make_tables.py`` would then choke on) and return its path."""
    from engramlm.utils.io import atomic_write_json

    out_dir = results_dir or RESULTS_DIR
    path = out_dir / f"{name}.json"
    doc = {
        "benchmark": name,
        "kind": name,  # payload may override: several result files can feed one README table
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(),
        "machine": machine_info(),
        **payload,
    }
    atomic_write_json(path, doc)
    return path


def save_png(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (a crash never leaves a torn plot next to a result)."""
    from engramlm.utils.io import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


# ---------------------------------------------------------------------------- timing


def gemm_rate(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 FLOP/s of one square matmul at ``threads`` torch threads (the machine's matmul rate).

    The best of ``repeats`` (the rate the machine can reach, not its average under a neighbour's load), so
    "fraction of the matmul rate" is a lower bound on how well a workload uses the cores. Restores torch's
    thread count.
    """
    import math

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / best


def interleaved_timings(
    contenders: Mapping[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    desc: str = "timing",
    progress: bool = True,
    block: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call for every contender, ``repeats`` samples each.

    Within one repeat every contender runs once (or ``block`` times back to back, recording the
    mean: a throughput sample, in the steady state a loop of calls reaches); the order rotates between
    repeats so no contender always runs right after the same neighbour (cache and turbo-state effects).
    Sample i of every contender comes from the same repeat, so paired ratios
    (:func:`paired_ratios`) cancel slow drifts of the machine.
    """
    from tqdm import tqdm

    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(repeats), desc=desc, disable=not progress, leave=False):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            fn = contenders[n]
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            out[n].append((time.perf_counter() - t0) / block)
    return out


def stats(samples: Sequence[float]) -> dict[str, float | int]:
    """Median and IQR (robust to the outliers a shared machine produces), plus min/mean/max."""
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {
        "median": med,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean()),
        "n": int(a.size),
    }


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-repeat ratios ``numerator[i] / denominator[i]`` (e.g. baseline time / new time)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"need paired samples, got {len(numerator)} and {len(denominator)}")
    return [float(a) / float(b) for a, b in zip(numerator, denominator, strict=True)]
