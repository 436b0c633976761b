"""The direct tier's off-GIL engine (``aio``) against the threaded one and the NumPy/zlib references, bit for bit."""

from __future__ import annotations

import errno
import os
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engramlm.errors import ConfigError, CorruptFileError
from engramlm.store import _aio
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import open_store, write_store
from engramlm.store.pages import PAGE, plan_pages
from tests.test_store_tiers import FORMATS, FP, ROWS, _ids, _reference, _store, direct_dir  # noqa: F401

# CI (glibc Linux) must run these; elsewhere the engine is honestly unavailable and the threaded path serves.
pytestmark = pytest.mark.skipif(
    not _aio.available() and not os.environ.get("CI"), reason=f"aio engine unavailable: {_aio.why_unavailable()}"
)


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 50_000), min_size=0, max_size=300, unique=True),
    row_bytes=st.sampled_from([1, 100, 256, 4096, 5000, 9000]),
    data_offset=st.sampled_from([4096, 8192]),
    max_run=st.integers(1, 8),
)
def test_plan_equals_numpy_plan(ids: list[int], row_bytes: int, data_offset: int, max_run: int) -> None:
    arr = np.array(sorted(ids), dtype=np.int64)
    pages, run_slot, run_count, row_offset = _aio.plan(arr, row_bytes, data_offset, max_run)
    ref = plan_pages(arr, row_bytes, data_offset, max_run)
    assert np.array_equal(pages, ref.pages)
    assert np.array_equal(run_slot, ref.run_slot)
    assert np.array_equal(run_count, ref.run_count)
    assert np.array_equal(pages[run_slot] if run_slot.size else run_slot, ref.run_page)
    assert np.array_equal(row_offset, ref.row_offset)


def test_page_crcs_equal_zlib() -> None:
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 256, 9 * PAGE, dtype=np.uint8)
    buf[PAGE : 2 * PAGE] = 0  # a zero page, whose CRC32 is not zero
    want = [zlib.crc32(buf[i * PAGE : (i + 1) * PAGE].tobytes()) for i in range(9)]
    assert _aio.page_crcs(buf, 9).tolist() == want


@pytest.mark.parametrize("fmt", FORMATS)
def test_aio_equals_threads_and_memory(direct_dir: Path, fmt: str) -> None:  # noqa: F811
    path = _store(direct_dir, fmt)
    want = _reference(fmt).gather(_ids())
    with (
        DirectFileTable(path, FP, queue_depth=8, io_engine="aio") as aio,
        DirectFileTable(path, FP, queue_depth=8, io_engine="threads") as threads,
    ):
        assert (aio.io_engine, threads.io_engine) == ("aio", "threads") and aio.direct_io
        for ids in (_ids(), torch.tensor([ROWS - 1]), torch.arange(ROWS), _ids(50, seed=7)):
            a, t = aio.gather(ids), threads.gather(ids)
            assert torch.equal(a, t) and torch.equal(a, _reference(fmt).gather(ids))
        assert aio.stats.bytes_read == threads.stats.bytes_read  # the same plan: the same pages read
        assert torch.equal(aio.gather(_ids()), want)


def test_aio_runs_longer_than_the_buffer_and_short_max_run(direct_dir: Path) -> None:  # noqa: F811
    """Every page of the file in one gather (the buffer grows), in runs of 1 page over 3 descriptors."""
    path = _store(direct_dir, "fp32")
    with DirectFileTable(path, FP, queue_depth=3, max_run_pages=1, io_engine="aio") as table:
        ids = torch.arange(ROWS)
        assert torch.equal(table.gather(ids), _reference("fp32").gather(ids))
        h = open_store(path)
        assert table.stats.bytes_read == h.num_pages * PAGE


def test_aio_refuses_a_flipped_byte_like_threads(direct_dir: Path) -> None:  # noqa: F811
    path = _store(direct_dir, "bf16")
    h = open_store(path)
    data = bytearray(path.read_bytes())
    row = 2000
    data[h.data_offset + row * h.row_bytes + 3] ^= 0x04
    path.write_bytes(bytes(data))
    page = row * h.row_bytes // PAGE
    messages = []
    for engine in ("aio", "threads"):
        with DirectFileTable(path, FP, io_engine=engine) as table:
            table.gather(torch.tensor([0, 1, 5]))  # pages elsewhere still read
            with pytest.raises(CorruptFileError, match=rf"\(page\) {page} at byte") as exc:
                table.gather(torch.tensor([3, row, ROWS - 1]))
            messages.append(str(exc.value))
    assert messages[0] == messages[1]
    with DirectFileTable(path, FP, io_engine="aio", verify=False) as table:  # unverified: reads the bad row
        assert not torch.equal(table.gather(torch.tensor([row])), _reference("bf16").gather(torch.tensor([row])))


def test_aio_read_error_is_an_oserror(direct_dir: Path) -> None:  # noqa: F811
    path = _store(direct_dir, "fp32")
    table = DirectFileTable(path, FP, io_engine="aio")
    fds = table._fds
    table._fds = np.array([1 << 20] * fds.size, dtype=np.int64)  # descriptors that do not exist
    with pytest.raises(OSError) as exc:
        table.gather(torch.tensor([1, 2000]))
    assert exc.value.errno == errno.EBADF and str(path) in str(exc.value)
    table._fds = fds
    table.close()


def test_aio_concurrent_gathers(direct_dir: Path) -> None:  # noqa: F811
    path = _store(direct_dir, "fp8_e4m3_ue8m0")
    ref = _reference("fp8_e4m3_ue8m0")
    table = DirectFileTable(path, FP, queue_depth=4, io_engine="aio")
    errors: list[int] = []

    def worker(seed: int) -> None:
        for k in range(30):
            ids = _ids(300, seed=seed * 100 + k)
            if not torch.equal(table.gather(ids), ref.gather(ids)):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table.close()
    assert not errors


def test_engine_choice(direct_dir: Path) -> None:  # noqa: F811
    path = _store(direct_dir, "fp32")
    with DirectFileTable(path, FP) as table:
        assert table.io_engine == "aio" and table.engine_reason is None
        assert table._fds.size == 16  # min(queue_depth 64, AIO_MAX_FDS)
    with pytest.raises(ConfigError, match="io_engine must be one of"):
        DirectFileTable(path, FP, io_engine="uring")


def test_empty_and_one_row_tables(direct_dir: Path) -> None:  # noqa: F811
    for rows in (1, 17):
        path = direct_dir / f"t{rows}.engst"
        w = torch.randn(rows, 8)
        write_store(path, w, "fp32", FP)
        with DirectFileTable(path, FP, io_engine="aio") as table:
            ids = torch.tensor([rows - 1, 0, rows - 1])
            assert torch.equal(table.gather(ids), w[ids])


def test_probe_disagreement_falls_back_to_threads(direct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """If the kernel ever read other bytes than os.preadv (an unexpected aiocb layout), auto uses threads."""
    path = _store(direct_dir, "fp32")
    real = _aio.fetch

    def corrupting(*args: object, **kw: object) -> tuple[int, int, int, int]:
        res = real(*args, **kw)  # type: ignore[arg-type]
        args[-1][:] ^= 0xFF  # type: ignore[index]
        return res

    monkeypatch.setattr(_aio, "fetch", corrupting)
    with DirectFileTable(path, FP, io_engine="auto") as table:
        assert table.io_engine == "threads" and "different bytes" in (table.engine_reason or "")
        assert table._fds.size == 0  # the duplicated descriptors were closed
        ids = _ids(200)
        assert torch.equal(table.gather(ids), _reference("fp32").gather(ids))
    with pytest.raises(ConfigError, match="io_engine 'aio' cannot run here: aio probe read different bytes"):
        DirectFileTable(path, FP, io_engine="aio")


@pytest.mark.parametrize("submit", ["kernel", "glibc"])
def test_kernel_and_glibc_submission_under_concurrent_gathers(direct_dir: Path, submit: str) -> None:  # noqa: F811
    """Linux AIO (one context per thread) and glibc's POSIX AIO read the same rows while four threads gather at once,
    one page per request (hundreds in flight): the control blocks must outlive the reads, whoever allocates next."""
    rows = 60_000  # 3,750 pages: a gather is up to ~1,500 one-page requests
    weights = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))
    path = direct_dir / "big.engst"
    write_store(path, weights, "fp32", FP)
    table = DirectFileTable(path, FP, max_run_pages=1, io_engine="aio")
    if submit == "glibc":
        table._kctx.disable("test: glibc's POSIX AIO")
    elif table._kctx.reason is not None:  # CI runs on x86-64 Linux with AIO (as test_store_inline's guard): fail there
        if os.environ.get("CI"):
            pytest.fail(f"Linux AIO unavailable on CI: {table._kctx.reason}")
        pytest.skip(f"Linux AIO unavailable here: {table._kctx.reason}")
    assert table.aio_submit == submit
    errors: list[int] = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(40):
            ids = torch.randint(0, rows, (int(torch.randint(1, 1500, (1,), generator=g)),), generator=g)
            try:
                if not torch.equal(table.gather(ids), weights[ids]):
                    errors.append(seed)
            except (OSError, CorruptFileError):  # garbage control blocks: EBADF, EINVAL, a CRC mismatch
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    contexts = list(table._kctx._all)
    table.close()
    assert not errors
    assert len(set(contexts)) == len(contexts) and (len(contexts) >= 4 if submit == "kernel" else not contexts)
    assert table._kctx._all == []  # destroyed at close
