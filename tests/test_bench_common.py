"""benchmarks/_common: the timing protocol and the machine record every benchmark result carries.

Why: every README ratio comes from ``interleaved_timings``; a block sample that were not a per-call mean,
or a machine record that changed torch's thread count while it was being taken, would skew every table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks import _common as common

REPO = Path(__file__).resolve().parents[1]


class _Clock:
    """A fake perf_counter that advances only when a contender runs: call costs are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_block_samples_are_per_call_means_and_order_rotates(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(common.time, "perf_counter", clock)
    calls: list[str] = []

    def contender(name: str, cost: float):
        def run() -> None:
            calls.append(name)
            clock.now += cost

        return run

    out = common.interleaved_timings(
        {"slow": contender("slow", 5.0), "fast": contender("fast", 1.0)}, 4, warmup=1, progress=False, block=3
    )
    assert out == {"slow": [5.0] * 4, "fast": [1.0] * 4}  # a block of 3 calls records the mean per call
    assert len(calls) == 2 * (1 + 4 * 3)
    timed = calls[2:]
    firsts = [timed[i * 6] for i in range(4)]  # the contender that opens each repeat
    assert firsts == ["slow", "fast", "slow", "fast"]
    assert common.paired_ratios(out["slow"], out["fast"]) == [5.0] * 4


def test_machine_info_leaves_torch_threads_alone_and_records_hash_threads() -> None:
    """numba.get_num_threads() would launch Numba's OpenMP layer and reset torch's threads (1 -> all cores)."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "assert torch.get_num_threads() == 1\n"
        "from benchmarks._common import machine_info\n"
        "from engramlm.hashing.batch import default_threads\n"
        "info = machine_info()\n"
        "assert info['hash_threads'] == default_threads(), info\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=REPO
    )
    assert out.stdout.strip() == "1"
