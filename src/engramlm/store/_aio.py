"""Off-GIL page reads for the direct tier: one Numba ``nogil`` call plans, reads, verifies and copies.

Why: the tier's first I/O loop was Python (NumPy page planning, a ``preadv`` per run in 64 threads, a
zlib CRC per page), so a gather held the GIL for about as long as it took, against the model's own
Python dispatch on the other thread: decode paid ~30% although it waited for rows only ~2% of the time.
Here a gather is ONE call into compiled code that never takes the GIL:

1. plan: sorted unique row ids -> unique pages (a linear pass, ids being sorted), runs of at most
   ``max_run_pages`` consecutive pages, each row's byte offset in the read buffer;
2. submit and complete: glibc POSIX AIO, ``lio_listio(LIO_WAIT)``, whose helper threads are plain
   pthreads (no interpreter). glibc serialises requests on one file descriptor, so the table reads
   through ``n_fds`` duplicated descriptors, runs dealt round-robin: that is the queue depth.
   A short read is completed synchronously with ``pread`` (EOF ends it, as in the threaded path);
3. verify: zlib's own ``crc32`` (the function Python's ``zlib.crc32`` calls, so bit-exact) per page,
   against the file's page table;
4. copy every row out of the page buffer into ``out`` [n, row_bytes].

The C functions are called through ctypes function pointers, which Numba compiles into direct
calls. The ``aiocb`` layout is glibc's (x86-64 / aarch64 LP64, a stable ABI); :func:`available`
requires glibc on a 64-bit Linux, and the table probes the engine against ``os.preadv`` at open,
falling back to the threaded path if anything differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import threading
from functools import lru_cache
from typing import Any

import numpy as np

from engramlm.utils import affinity

# struct aiocb (glibc, LP64): 168 bytes = 21 int64 words.
_CB_WORDS = 21
_CB_BYTES = 8 * _CB_WORDS
_W_FD_OPCODE = 0  # int aio_fildes @0, int aio_lio_opcode @4 (LIO_READ = 0)
_W_BUF = 2  # volatile void *aio_buf @16
_W_NBYTES = 3  # size_t aio_nbytes @24
_W_SIGEV_NOTIFY = 5  # struct sigevent @32: sigev_signo @40, sigev_notify @44
_W_OFFSET = 16  # off_t aio_offset @128
_SIGEV_NONE = 1
_LIO_WAIT = 0
_EINPROGRESS = 115
_EINTR = 4
PAGE = 4096

# Status codes of fetch_rows (>= 0: the number of pages whose CRC32 differs).
OK = 0


def _lib(name: str) -> ctypes.CDLL | None:
    found = ctypes.util.find_library(name)
    if found is None:
        return None
    try:
        return ctypes.CDLL(found, use_errno=True)
    except OSError:
        return None


def _fn(lib: ctypes.CDLL, name: str, res: type, *args: type) -> ctypes._CFuncPtr:
    f = getattr(lib, name)
    f.restype, f.argtypes = res, list(args)
    return f


def _supported_platform() -> str | None:
    """None when glibc AIO with this module's struct layout can be used, else why not."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if platform.machine() not in ("x86_64", "aarch64"):
        return f"aiocb layout not known for {platform.machine()}"
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return f"not glibc ({libc_name or 'unknown libc'})"
    return None


_why_not = _supported_platform()
_libc = _lib("c") if _why_not is None else None
_libz = _lib("z") if _why_not is None else None
if _why_not is None and (_libc is None or _libz is None):
    _why_not = "libc or libz not found"
if _why_not is None:
    try:
        _c_int, _c_vp, _c_ssize, _c_size = ctypes.c_int, ctypes.c_size_t, ctypes.c_ssize_t, ctypes.c_size_t
        _lio_listio = _fn(_libc, "lio_listio", _c_int, _c_int, _c_vp, _c_int, _c_vp)
        _aio_error = _fn(_libc, "aio_error", _c_int, _c_vp)
        _aio_return = _fn(_libc, "aio_return", _c_ssize, _c_vp)
        _aio_suspend = _fn(_libc, "aio_suspend", _c_int, _c_vp, _c_int, _c_vp)
        _pread = _fn(_libc, "pread", _c_ssize, _c_int, _c_vp, _c_size, ctypes.c_int64)
        _errno_loc = _fn(_libc, "__errno_location", ctypes.POINTER(ctypes.c_int))
        _crc32 = _fn(_libz, "crc32", ctypes.c_ulong, ctypes.c_ulong, _c_vp, ctypes.c_uint)
        _c_long = ctypes.c_long  # syscall(2) is variadic; integer arguments pass alike on x86-64 and aarch64 Linux
        _syscall = _fn(_libc, "syscall", _c_long, _c_long, _c_long, _c_long, _c_long, _c_long, _c_long)
    except AttributeError as exc:  # a libc without POSIX AIO
        _why_not = f"missing symbol: {exc}"


# Linux native AIO (io_setup/io_submit/io_getevents): syscall numbers per architecture.
_SYS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}  # setup, destroy, getevents, submit
_SYS_SETUP, _SYS_DESTROY, _SYS_GETEVENTS, _SYS_SUBMIT = _SYS.get(platform.machine(), (-1, -1, -1, -1))
KAIO_EVENTS = 256  # requests in flight per context
_SYS_FUTEX = 202 if platform.machine() == "x86_64" else -1  # the I/O thread relies on x86's store order (TSO)
_FUTEX_WAIT, _FUTEX_WAKE = 128, 129  # FUTEX_WAIT / FUTEX_WAKE | FUTEX_PRIVATE_FLAG
_EAGAIN = 11


def why_unavailable() -> str | None:
    """None when the engine can run here, else the reason (reported by the table as its fallback reason)."""
    return _why_not


def available() -> bool:
    return _why_not is None


@lru_cache(maxsize=1)
def _kernels() -> tuple:
    """Compile on first use (a few seconds), cached on disk by Numba afterwards."""
    import numba as nb

    from engramlm.store._dedup import unique_inverse_kernel

    lio_listio, aio_error, aio_return, aio_suspend = _lio_listio, _aio_error, _aio_return, _aio_suspend
    pread, errno_loc, crc32, syscall = _pread, _errno_loc, _crc32, _syscall
    sys_getevents, sys_submit, n_events = _SYS_GETEVENTS, _SYS_SUBMIT, KAIO_EVENTS

    @nb.njit(nogil=True, cache=True)
    def plan(ids, row_bytes, data_offset, max_run_pages):
        """Sorted unique ``ids`` -> (pages, run_slot, run_count, row_offset): the same plan as plan_pages."""
        n = ids.size
        span = (row_bytes + PAGE - 1) // PAGE + 1
        pages = np.empty(n * span, np.int64)
        row_offset = np.empty(n, np.int64)
        m = 0
        for i in range(n):
            start = data_offset + ids[i] * row_bytes
            first = start // PAGE
            last = (start + row_bytes - 1) // PAGE
            # ids ascend, so pages do: a page is new iff it is past the last one recorded.
            slot = m - 1 if m > 0 and pages[m - 1] == first else m
            row_offset[i] = slot * PAGE + start % PAGE
            p = first if m == 0 else max(first, pages[m - 1] + 1)
            while p <= last:
                pages[m] = p
                m += 1
                p += 1
        pages = pages[:m]
        run_slot = np.empty(m, np.int64)
        run_count = np.empty(m, np.int64)
        r = 0
        i = 0
        while i < m:
            j = i + 1
            while j < m and j - i < max_run_pages and pages[j] == pages[j - 1] + 1:
                j += 1
            run_slot[r] = i
            run_count[r] = j - i
            r += 1
            i = j
        return pages, run_slot[:r], run_count[:r], row_offset

    @nb.njit(nogil=True)
    def keep_alive(cbs, err):
        """``err``, after a read of ``cbs``: Numba frees an array after its last use in the code, and the kernel
        (or glibc) reads and writes the control blocks by address until the last request completes, so without
        this use the block array could be freed and reused by another thread's allocation mid-read."""
        return err | (cbs[0, 1] & 0)

    @nb.njit(nogil=True)
    def read(fds, buf_addr, pages, run_slot, run_count):
        """Read every run into ``buf_addr + slot * PAGE``; 0 or a positive errno."""
        n = run_slot.size
        if n == 0:
            return 0
        cbs = np.zeros((n, _CB_WORDS), np.int64)
        ptrs = np.empty(n, np.int64)
        base = cbs.ctypes.data
        nfd = fds.size
        for i in range(n):
            cbs[i, _W_FD_OPCODE] = fds[i % nfd]
            cbs[i, _W_BUF] = buf_addr + run_slot[i] * PAGE
            cbs[i, _W_NBYTES] = run_count[i] * PAGE
            cbs[i, _W_SIGEV_NOTIFY] = _SIGEV_NONE << 32
            cbs[i, _W_OFFSET] = pages[run_slot[i]] * PAGE
            ptrs[i] = base + i * _CB_BYTES
        lio_listio(_LIO_WAIT, ptrs.ctypes.data, n, 0)
        # Whatever lio_listio returned (EINTR, EAGAIN, EIO), each request's own status decides.
        err = 0
        for i in range(n):
            cb = ptrs[i]
            e = aio_error(cb)
            while e == _EINPROGRESS:
                aio_suspend(ptrs[i:].ctypes.data, 1, 0)
                e = aio_error(cb)
            got = aio_return(cb)
            done = got if e == 0 and got > 0 else 0
            want = run_count[i] * PAGE
            off = pages[run_slot[i]] * PAGE
            dst = buf_addr + run_slot[i] * PAGE
            if e != 0 and e != _EINTR and e != 11:  # 11 = EAGAIN: not queued, read it here instead
                err = e
                continue
            while done < want:  # a short read (or an unqueued request): finish it synchronously
                k = pread(fds[0], dst + done, want - done, off + done)
                if k == 0:
                    break  # EOF: the last page of the file is partial
                if k < 0:
                    code = nb.carray(errno_loc(), 1)[0]
                    if code == _EINTR:
                        continue
                    err = code if code > 0 else 5  # EIO when errno cannot be read
                    break
                done += k
        return keep_alive(cbs, err)

    @nb.njit(nogil=True)
    def crcs_of(buf_addr, n, out):
        """zlib CRC32 of ``n`` consecutive pages at ``buf_addr``."""
        for i in range(n):
            out[i] = crc32(0, buf_addr + i * PAGE, PAGE)

    @nb.njit(nogil=True)
    def check(buf_addr, pages, crcs, page0):
        """(pages whose CRC32 differs, index of the first); page ``pages[i]`` sits at ``i * PAGE``."""
        got = np.empty(pages.size, np.uint32)
        crcs_of(buf_addr, pages.size, got)
        bad = 0
        first = -1
        for i in range(pages.size):
            if got[i] != crcs[pages[i] - page0]:
                if bad == 0:
                    first = i
                bad += 1
        return bad, first

    @nb.njit(nogil=True, cache=True)
    def copy_rows(buf, row_offset, out):
        rb = out.shape[1]
        for i in range(row_offset.size):
            o = row_offset[i]
            for j in range(rb):
                out[i, j] = buf[o + j]

    @nb.njit(nogil=True)
    def fetch(ids, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, out, ctx):
        """The whole gather: (errno or 0, pages read, bad pages, first bad page or -1)."""
        pages, run_slot, run_count, row_offset = plan(ids, row_bytes, data_offset, max_run_pages)
        if pages.size * PAGE > buf.size:
            return -1, pages.size, 0, -1
        addr = buf.ctypes.data
        err = read_any(ctx, fds, addr, pages, run_slot, run_count)
        if err:
            return err, pages.size, 0, -1
        bad, first = 0, -1
        if verify:
            bad, first = check(addr, pages, crcs, data_offset // PAGE)
            if bad:
                return 0, pages.size, bad, pages[first]
        copy_rows(buf, row_offset, out)
        return 0, pages.size, 0, -1

    @nb.njit(nogil=True)
    def gather(flat, num_rows, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, out, ctx):
        """Dedupe + fetch + expand: rows of any int64 ids ``flat`` (duplicates, any order) into ``out`` [n, row_bytes].

        Returns (status, pages, bad pages, first bad page, unique ids, min id, max id); status is 0, an
        errno, -1 (``buf`` too small: pages says how many it needs) or -2 (an id out of [0, num_rows)).
        """
        unique, inverse = unique_inverse_kernel(flat)
        nu = unique.size
        lo, hi = unique[0], unique[nu - 1]
        if lo < 0 or hi >= num_rows:
            return -2, 0, 0, -1, nu, lo, hi
        pages, run_slot, run_count, row_offset = plan(unique, row_bytes, data_offset, max_run_pages)
        if pages.size * PAGE > buf.size:
            return -1, pages.size, 0, -1, nu, lo, hi
        addr = buf.ctypes.data
        err = read_any(ctx, fds, addr, pages, run_slot, run_count)
        if err:
            return err, pages.size, 0, -1, nu, lo, hi
        if verify:
            bad, first = check(addr, pages, crcs, data_offset // PAGE)
            if bad:
                return 0, pages.size, bad, pages[first], nu, lo, hi
        rb = out.shape[1]
        for i in range(flat.size):  # expand straight into the caller's staging buffer: no second copy
            o = row_offset[inverse[i]]
            for j in range(rb):
                out[i, j] = buf[o + j]
        return 0, pages.size, 0, -1, nu, lo, hi

    # ---- split phase: submit now (start), reap + verify + copy later (finish), on the caller's thread ----------
    @nb.njit(nogil=True)
    def iocbs(fd, buf_addr, pages, run_slot, run_count):
        """The control blocks of the page runs' reads into ``buf_addr``, and their addresses for io_submit."""
        n = run_slot.size
        cbs = np.zeros((n, 8), np.int64)  # struct iocb, 64 bytes (LE): data, key|rw_flags, opcode|prio|fd, buf,
        ptrs = np.empty(n, np.int64)  # nbytes, offset, reserved, flags|resfd
        base = cbs.ctypes.data
        for i in range(n):
            cbs[i, 0] = i
            cbs[i, 2] = fd << 32  # aio_lio_opcode 0 = IOCB_CMD_PREAD, aio_reqprio 0, aio_fildes
            cbs[i, 3] = buf_addr + run_slot[i] * PAGE
            cbs[i, 4] = run_count[i] * PAGE
            cbs[i, 5] = pages[run_slot[i]] * PAGE
            ptrs[i] = base + i * 64
        return cbs, ptrs

    @nb.njit(nogil=True)
    def pump(ctx, ptrs, got, status, events, st, submit, finish):
        """Submit what ``ctx`` has room for (``submit``), then with ``finish`` reap until nothing is in flight.

        ``st`` = [submitted, in flight]. A request the kernel refuses is marked EAGAIN (read by ``pread`` later).
        Returns 0 or io_getevents' errno (unreachable with a valid context)."""
        n = ptrs.size
        while True:
            if submit and st[0] < n and st[1] < n_events:
                k = min(n - st[0], n_events - st[1])
                r = syscall(sys_submit, ctx, k, ptrs.ctypes.data + st[0] * 8, 0, 0)
                if r > 0:
                    st[0] += r
                    st[1] += r
                    continue
                code = nb.carray(errno_loc(), 1)[0] if r < 0 else _EAGAIN
                if code == _EINTR:
                    continue
                if not (code == _EAGAIN and st[1]):  # refused: the rest is read synchronously at the end
                    for i in range(st[0], n):
                        status[i] = _EAGAIN
                    st[0] = n
                    continue
            if not finish or st[1] == 0:
                return 0
            r = syscall(sys_getevents, ctx, 1, min(st[1], n_events), events.ctypes.data, 0)
            if r < 0:
                code = nb.carray(errno_loc(), 1)[0]
                if code == _EINTR:
                    continue
                return code if code > 0 else 5
            for j in range(r):
                i = events[j, 0]
                res = events[j, 2]
                if res < 0:
                    status[i] = -res
                else:
                    got[i] = res
            st[1] -= r

    @nb.njit(nogil=True)
    def complete(fd, buf_addr, pages, run_slot, run_count, got, status):
        """After every request was reaped: finish short reads and refused requests with ``pread``; 0 or an errno."""
        err = 0
        for i in range(run_slot.size):
            e = status[i]
            if e != 0 and e != _EINTR and e != _EAGAIN:
                err = e
                continue
            done = got[i]
            want = run_count[i] * PAGE
            off = pages[run_slot[i]] * PAGE
            dst = buf_addr + run_slot[i] * PAGE
            while done < want:
                k = pread(fd, dst + done, want - done, off + done)
                if k == 0:
                    break  # EOF: the last page of the file is partial
                if k < 0:
                    code = nb.carray(errno_loc(), 1)[0]
                    if code == _EINTR:
                        continue
                    err = code if code > 0 else 5
                    break
                done += k
        return err

    @nb.njit(nogil=True)
    def kread(ctx, fd, buf_addr, pages, run_slot, run_count):
        """``read`` through the kernel's own AIO context ``ctx``: no helper thread. glibc's POSIX AIO runs each
        request in one of up to 20 helper threads, which, woken together, preempt the decode thread on the
        other core (issue 18: ~14 involuntary switches per decode step); here the block layer completes the
        O_DIRECT reads and only the calling thread wakes. Anything the kernel refuses is read with ``pread``."""
        n = run_slot.size
        if n == 0:
            return 0
        cbs, ptrs = iocbs(fd, buf_addr, pages, run_slot, run_count)
        got = np.zeros(n, np.int64)
        status = np.zeros(n, np.int64)  # errno of a request; EAGAIN: finish it with pread
        events = np.zeros((n_events, 4), np.int64)
        err = pump(ctx, ptrs, got, status, events, np.zeros(2, np.int64), True, True)
        if err == 0:
            err = complete(fd, buf_addr, pages, run_slot, run_count, got, status)
        return keep_alive(cbs, err)

    @nb.njit(nogil=True)
    def read_any(ctx, fds, buf_addr, pages, run_slot, run_count):
        """Kernel AIO when the thread has a context (``ctx`` != 0), else glibc's POSIX AIO."""
        if ctx != 0:
            return kread(ctx, fds[0], buf_addr, pages, run_slot, run_count)
        return read(fds, buf_addr, pages, run_slot, run_count)

    @nb.njit(nogil=True)
    def start_read(ctx, fd, ids, row_bytes, data_offset, max_run_pages, buf):
        """Plan the pages of sorted unique ``ids`` and submit their reads into ``buf``; returns at once.

        (status, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st): status 0, or -1 when
        ``buf`` is too small (nothing submitted; ``pages`` says how many it needs). The caller keeps every array
        and ``buf`` alive until :func:`finish_read` or :func:`reap` ran: the kernel reads the control blocks
        and writes ``buf`` by address."""
        pages, run_slot, run_count, row_offset = plan(ids, row_bytes, data_offset, max_run_pages)
        n = run_slot.size
        got = np.zeros(n, np.int64)
        rstatus = np.zeros(n, np.int64)
        st = np.zeros(2, np.int64)
        if pages.size * PAGE > buf.size:
            cbs, ptrs = np.zeros((n, 8), np.int64), np.empty(n, np.int64)  # nothing submitted
            return -1, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st
        cbs, ptrs = iocbs(fd, buf.ctypes.data, pages, run_slot, run_count)
        pump(ctx, ptrs, got, rstatus, np.zeros((0, 4), np.int64), st, True, False)
        return 0, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st

    @nb.njit(nogil=True)
    def finish_read(ctx, fd, buf, pages, run_slot, run_count, cbs, ptrs, got, rstatus, st, crcs, verify, page0):
        """Submit the rest, reap everything, finish short reads, verify: (errno or 0, bad pages, first bad page)."""
        events = np.zeros((n_events, 4), np.int64)
        addr = buf.ctypes.data
        err = pump(ctx, ptrs, got, rstatus, events, st, True, True)
        if err == 0:
            err = complete(fd, addr, pages, run_slot, run_count, got, rstatus)
        err = keep_alive(cbs, err)
        if err:
            return err, 0, -1
        if verify:
            bad, first = check(addr, pages, crcs, page0)
            if bad:
                return 0, bad, pages[first]
        return 0, 0, -1

    @nb.njit(nogil=True)
    def reap(ctx, cbs, ptrs, got, rstatus, st):
        """Wait for the reads in flight and submit nothing more: after it the buffers may be freed."""
        events = np.zeros((n_events, 4), np.int64)
        err = pump(ctx, ptrs, got, rstatus, events, st, False, True)
        return keep_alive(cbs, err)

    @nb.njit(nogil=True)
    def gather_start(flat, num_rows, row_bytes, data_offset, max_run_pages, buf, ctx, fd):
        """Dedupe ``flat``, range-check, :func:`start_read` the unique ids: (status, lo, hi, unique count,
        inverse, then start_read's arrays); status -2 when an id is outside [0, num_rows) (nothing submitted)."""
        unique, inverse = unique_inverse_kernel(flat)
        nu = unique.size
        lo, hi = unique[0], unique[nu - 1]
        if lo < 0 or hi >= num_rows:
            unique = unique[:0]
        status, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st = start_read(
            ctx, fd, unique, row_bytes, data_offset, max_run_pages, buf
        )
        if unique.size == 0:
            status = -2
        return status, lo, hi, nu, inverse, pages, run_slot, run_count, row_offset, cbs, ptrs, got, rstatus, st

    @nb.njit(nogil=True)
    def gather_finish(
        ctx, fd, buf, pages, run_slot, run_count, row_offset, inverse, cbs, ptrs, got, rstatus, st, crcs, verify,
        page0, out,
    ):  # fmt: skip
        """:func:`finish_read`, then expand the rows into ``out`` [n, row_bytes] in request order."""
        err, bad, first = finish_read(ctx, fd, buf, pages, run_slot, run_count, cbs, ptrs, got, rstatus, st, crcs,
                                      verify, page0)  # fmt: skip
        if err or bad:
            return err, bad, first
        rb = out.shape[1]
        for i in range(inverse.size):
            o = row_offset[inverse[i]]
            for j in range(rb):
                out[i, j] = buf[o + j]
        return 0, 0, -1

    # ---- the I/O thread: a Python thread that enters io_loop once and never takes the GIL again -------------
    sys_futex, f_wait, f_wake = _SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE

    @nb.njit(nogil=True)
    def barrier():
        """An opaque call: the compiler keeps the stores before it before it and the loads after it after it
        (x86 keeps stores in order in hardware, so a flag written after the data is seen after the data)."""
        return errno_loc()

    @nb.njit(nogil=True)
    def aligned(pages):
        """A page-aligned buffer of ``pages`` pages."""
        raw = np.empty((pages + 1) * PAGE, np.uint8)
        off = (PAGE - raw.ctypes.data % PAGE) % PAGE
        return raw[off : off + pages * PAGE]

    @nb.njit(nogil=True)
    def gather_job(ids, out, status, a):
        """The I/O thread's default job: :func:`gather` of ``ids`` into ``out`` (bytes), its seven numbers into
        ``status``; a gather larger than the standing buffer (a prefill) reads through a page-aligned one of the size
        the plan needs. Nothing to settle afterwards."""
        num_rows, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, ctx = a
        n = ids.size
        rows = out[: n * row_bytes].reshape((n, row_bytes))
        st, pages, bad, first, nu, lo, hi = gather(
            ids, num_rows, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, rows, ctx
        )
        if st == -1:
            big = aligned(pages)
            st, pages, bad, first, nu, lo, hi = gather(
                ids, num_rows, row_bytes, data_offset, max_run_pages, fds, big, crcs, verify, rows, ctx
            )
        status[0], status[1], status[2], status[3], status[4], status[5], status[6] = st, pages, bad, first, nu, lo, hi
        return 0

    @nb.njit(nogil=True)
    def no_settle(carry, a):
        return 0

    @nb.njit(nogil=True)
    def io_loop(ctl, jobs_ids, jobs_n, jobs_out, jobs_status, done, job, settle, args):
        """Serve posted jobs in order until a job with ``n < 0``: ``carry = job(ids, out, status, args)`` (the
        part a waiter needs), then ``done[k] = 1`` and a futex wake, then ``settle(carry, args)`` (work nobody waits
        for, e.g. a cache's admission), then ``ctl[1] += 1`` (jobs settled) and a wake. ``ctl[0]``: jobs posted."""
        n_slots = done.size
        seq = np.int32(0)
        count = 0
        ctl_addr = ctl.ctypes.data
        while True:
            while ctl[0] == seq:
                syscall(sys_futex, ctl_addr, f_wait, seq, 0, 0)
                barrier()
            k = count % n_slots
            count += 1
            n = jobs_n[k]
            if n < 0:
                return 0
            carry = job(jobs_ids[k, :n], jobs_out[k], jobs_status[k], args)
            barrier()
            done[k] = 1
            barrier()
            syscall(sys_futex, done.ctypes.data + 4 * k, f_wake, 1, 0, 0)
            settle(carry, args)
            seq = np.int32(seq + 1)
            barrier()
            ctl[1] = seq
            barrier()
            syscall(sys_futex, ctl_addr + 4, f_wake, 1, 0, 0)

    @nb.njit(nogil=True)
    def publish(ctl, jobs_n, done, k, n):
        """Job ``k`` of ``n`` ids (already in the ring; ``n = -1`` stops the loop) made visible: the thread woken."""
        jobs_n[k] = n
        done[k] = 0
        barrier()
        ctl[0] = np.int32(ctl[0] + 1)
        barrier()
        syscall(sys_futex, ctl.ctypes.data, f_wake, 1, 0, 0)
        return 0

    @nb.njit(nogil=True)
    def post(ctl, jobs_ids, jobs_n, done, k, ids):
        """Write job ``k`` (``ids``) into the ring and publish it."""
        for i in range(ids.size):
            jobs_ids[k, i] = ids[i]
        return publish(ctl, jobs_n, done, k, ids.size)

    @nb.njit(nogil=True)
    def post_stop(ctl, jobs_n, done, k):
        """Publish job ``k`` as the stop job."""
        return publish(ctl, jobs_n, done, k, -1)

    @nb.njit(nogil=True)
    def wait_done(done, k):
        addr = done.ctypes.data + 4 * k
        while done[k] == 0:
            syscall(sys_futex, addr, f_wait, 0, 0, 0)
            barrier()
        barrier()
        return 0

    @nb.njit(nogil=True)
    def wait_settled(ctl, target):
        """Block until the loop has settled ``target`` jobs (``ctl[1]``, an int32 count that wraps as ``ctl[0]``)."""
        addr = ctl.ctypes.data + 4
        while True:
            seen = ctl[1]
            if seen == target:
                break
            syscall(sys_futex, addr, f_wait, seen, 0, 0)
            barrier()
        barrier()
        return 0

    return (plan, read, crcs_of, copy_rows, fetch, gather, start_read, finish_read, reap, gather_start,
            gather_finish, io_loop, post, post_stop, wait_done, gather_job, no_settle, wait_settled,
            aligned)  # fmt: skip


def plan(ids: np.ndarray, row_bytes: int, data_offset: int, max_run_pages: int) -> tuple[np.ndarray, ...]:
    """(pages, run_slot, run_count, row_offset) for sorted unique int64 ``ids`` (see plan_pages)."""
    return _kernels()[0](np.ascontiguousarray(ids, np.int64), row_bytes, data_offset, max_run_pages)


def page_crcs(buf: np.ndarray, n_pages: int) -> np.ndarray:
    """zlib CRC32 of the first ``n_pages`` pages of ``buf`` (uint8), by the kernels' own call of zlib."""
    if buf.size < n_pages * PAGE:
        raise ValueError(f"buffer holds {buf.size} bytes, {n_pages} pages need {n_pages * PAGE}")
    out = np.empty(n_pages, np.uint32)
    _kernels()[2](buf.ctypes.data, n_pages, out)
    return out


def max_pages(n_ids: int, row_bytes: int) -> int:
    """Buffer pages a gather of ``n_ids`` rows can touch at most."""
    return n_ids * ((row_bytes + PAGE - 1) // PAGE + 1)


def fetch(
    ids: np.ndarray,
    row_bytes: int,
    data_offset: int,
    max_run_pages: int,
    fds: np.ndarray,
    buf: np.ndarray,
    crcs: np.ndarray,
    verify: bool,
    out: np.ndarray,
    ctx: int = 0,
) -> tuple[int, int, int, int]:
    """One gather off the GIL: see the module docstring; returns (errno or 0, pages, bad pages, first bad page).
    ``ctx``: the calling thread's kernel AIO context (:class:`KernelContexts`), 0 for glibc's POSIX AIO."""
    return _kernels()[4](ids, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, out, ctx)


def gather(
    flat: np.ndarray,
    num_rows: int,
    row_bytes: int,
    data_offset: int,
    max_run_pages: int,
    fds: np.ndarray,
    buf: np.ndarray,
    crcs: np.ndarray,
    verify: bool,
    out: np.ndarray,
    ctx: int = 0,
) -> tuple[int, int, int, int, int, int, int]:
    """A whole gather off the GIL, dedupe and expansion included: see the kernel's docstring (``ctx``: as in fetch)."""
    return _kernels()[5](flat, num_rows, row_bytes, data_offset, max_run_pages, fds, buf, crcs, verify, out, ctx)


class IoSlot:
    """One gather in flight: a kernel AIO context of its own (``io_getevents`` reaps whatever the context
    completed, so two gathers never share one) and the page-aligned buffer its reads write."""

    __slots__ = ("arr", "ctx")

    def __init__(self, ctx: int) -> None:
        self.ctx = ctx
        self.arr: np.ndarray | None = None

    def buffer(self, nbytes: int) -> np.ndarray:
        return aligned_buffer(self, nbytes)


class IoSlots:
    """A pool of :class:`IoSlot`, as many as gathers were ever in flight at once (a decode step: one per table).

    ``acquire`` is None where kernel AIO cannot run (``reason`` says why): the caller then reads synchronously.
    ``close`` destroys the contexts; the caller first reaps every slot still in flight."""

    def __init__(self, reason: str | None = None) -> None:
        self._free: list[IoSlot] = []
        self._all: list[IoSlot] = []
        self._lock = threading.Lock()
        self.reason = reason or why_unavailable() or (None if _SYS_SETUP >= 0 else "no AIO syscalls known")

    def acquire(self, nbytes: int) -> IoSlot | None:
        with self._lock:
            slot = self._free.pop() if self._free else None
        if slot is None:
            if self.reason is not None:
                return None
            box = ctypes.c_ulong(0)
            if _syscall(_SYS_SETUP, KAIO_EVENTS, ctypes.addressof(box), 0, 0, 0) != 0:
                self.reason = f"io_setup failed: {os.strerror(ctypes.get_errno())}"
                return None
            slot = IoSlot(int(box.value))
            with self._lock:
                self._all.append(slot)
        slot.buffer(nbytes)
        return slot

    def release(self, slot: IoSlot) -> None:
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        """Destroy every context; later ``acquire`` calls return None (the table is closed)."""
        with self._lock:
            slots, self._all, self._free = self._all, [], []
            self.reason = self.reason or "closed"
        for slot in slots:
            _syscall(_SYS_DESTROY, slot.ctx, 0, 0, 0, 0)


def start_read(ctx: int, fd: int, ids: np.ndarray, row_bytes: int, data_offset: int, max_run_pages: int,
               buf: np.ndarray) -> tuple:  # fmt: skip
    """Submit the page reads of sorted unique int64 ``ids`` into ``buf`` through ``ctx`` (see the kernel)."""
    return _kernels()[6](ctx, fd, ids, row_bytes, data_offset, max_run_pages, buf)


def finish_read(ctx: int, fd: int, buf: np.ndarray, state: tuple, crcs: np.ndarray, verify: bool,
                page0: int) -> tuple[int, int, int]:  # fmt: skip
    """Complete a :func:`start_read`; ``state`` = its (pages, run_slot, run_count, cbs, ptrs, got, rstatus, st)."""
    return _kernels()[7](ctx, fd, buf, *state, crcs, verify, page0)


def reap(ctx: int, cbs: np.ndarray, ptrs: np.ndarray, got: np.ndarray, rstatus: np.ndarray, st: np.ndarray) -> int:
    """Wait for a started read's requests in flight, submit nothing more: its buffers may be freed after."""
    return _kernels()[8](ctx, cbs, ptrs, got, rstatus, st)


def gather_start(flat: np.ndarray, num_rows: int, row_bytes: int, data_offset: int, max_run_pages: int,
                 buf: np.ndarray, ctx: int, fd: int) -> tuple:  # fmt: skip
    """Dedupe, range-check and submit a gather of any int64 ids ``flat`` (see the kernel)."""
    return _kernels()[9](flat, num_rows, row_bytes, data_offset, max_run_pages, buf, ctx, fd)


def gather_finish(*args: Any) -> tuple[int, int, int]:
    """Complete a :func:`gather_start`: reap, verify, expand into ``out`` (see the kernel)."""
    return _kernels()[10](*args)


class IoThread:
    """One thread per table that reads for the decode thread without ever taking the GIL: it enters
    ``io_loop`` (a ``nogil`` kernel) once and serves a ring of ``slots`` jobs, signalled by futexes.

    The decode thread posts a gather (ids copied into the ring, one futex wake: ~2 µs) and later waits on the
    job's futex and copies its rows out; the planning, ``io_submit``, reaping, CRCs and expansion run on the
    other core, and no GIL changes hands (a worker pool's thread takes the GIL 3-8 times a step; issue 18).
    x86-64 only (the flags rely on its store order); ``reason`` says why not elsewhere.

    ``job``/``settle``/``extra`` replace the plain gather: ``job(ids, out, status, args)`` fills the job's ring row
    and status (eight int64s; status 0 = ok) and returns a carry, ``settle(carry, args)`` then runs after the waiter
    was woken (a cache admits its misses there); ``args`` is the table's read arguments (num_rows, row_bytes,
    data_offset, max_run_pages, fds, buf, crcs, verify, ctx) + ``extra``. :meth:`settle_all` waits for every posted
    job's settle: the one way for another thread to touch what a settle writes. If the loop ever raises (a failed
    allocation), every job not yet done fails with that error instead of hanging its waiter, and no job is taken
    after it."""

    DIED = -3  # a job's status when the thread failed before finishing it

    @staticmethod
    def why_unavailable() -> str | None:
        return why_unavailable() or (None if _SYS_FUTEX >= 0 else "I/O thread: x86-64 only")

    def __init__(
        self,
        table: Any,
        max_ids: int,
        slots: int = 8,
        *,
        job: Any = None,
        settle: Any = None,
        extra: tuple = (),
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.reason: str | None = IoThread.why_unavailable()
        self._cpus = cpus
        self.error: str | None = None
        h = table.header
        self.max_ids, self.row_bytes = max_ids, h.row_bytes
        self._ctl = np.zeros(2, np.int32)  # jobs posted, jobs settled
        self._ids = np.zeros((slots, max_ids), np.int64)
        self._n = np.zeros(slots, np.int64)
        self._out = np.zeros((slots, max_ids * h.row_bytes), np.uint8)
        self._status = np.zeros((slots, 8), np.int64)
        self._done = np.ones(slots, np.int32)
        self._busy = [False] * slots
        self._posted = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if self.reason is not None:
            return
        box = ctypes.c_ulong(0)
        if _syscall(_SYS_SETUP, KAIO_EVENTS, ctypes.addressof(box), 0, 0, 0) != 0:
            self.reason = f"io_setup failed: {os.strerror(ctypes.get_errno())}"
            return
        self._ctx = int(box.value)
        self._buf = aligned_buffer(threading.local(), max_pages(min(max_ids, 1024), h.row_bytes) * PAGE)
        crcs = table._crcs if table._crcs is not None else table._no_crcs
        verify = table._crcs is not None
        k = _kernels()
        read_args = (h.num_rows, h.row_bytes, h.data_offset, table.max_run_pages, table._fds, self._buf, crcs, verify,
                     self._ctx)  # fmt: skip
        args = (self._ctl, self._ids, self._n, self._out, self._status, self._done, job or k[15], settle or k[16],
                read_args + tuple(extra))  # fmt: skip
        self._thread = threading.Thread(target=self._serve, args=(k[11], args), name="engram-io", daemon=True)
        self._thread.start()

    def _serve(self, loop: Any, args: tuple) -> None:
        with self._lock:  # against set_cpus: the thread takes the latest CPU set, never a stale one
            if self._cpus is not None:
                affinity.pin([0], self._cpus)
        try:
            loop(*args)
        except BaseException as exc:  # handed to every waiter: a silent death would hang them
            with self._lock:
                self.error = f"{type(exc).__name__}: {exc}"
                pending = self._done == 0
                self._status[pending, 0] = IoThread.DIED
                self._done[:] = 1
                self._ctl[1] = self._ctl[0]
            for addr in (*(self._done.ctypes.data + 4 * i for i in range(self._done.size)), self._ctl.ctypes.data + 4):
                _syscall(_SYS_FUTEX, addr, _FUTEX_WAKE, 1 << 30, 0, 0)

    @property
    def running(self) -> bool:
        return self._thread is not None and self.error is None

    @property
    def native_id(self) -> int | None:
        return None if self._thread is None else self._thread.native_id

    def set_cpus(self, cpus: frozenset[int] | None) -> None:
        """Confine the thread to ``cpus`` (None: every CPU), now if it runs, else when it starts."""
        with self._lock:
            self._cpus = cpus
            tid = self.native_id
            if tid is not None:
                affinity.pin([tid], cpus)

    def post(self, ids: np.ndarray) -> int | None:
        """Post a gather of int64 ``ids`` (any order, duplicates); the job's slot, or None (ring full, too many ids,
        the thread stopped)."""
        if self._thread is None or ids.size > self.max_ids:
            return None
        with self._lock:
            k = self._posted % self._done.size
            if self._busy[k] or self.error is not None:
                return None
            self._busy[k] = True
            self._posted += 1
            _kernels()[12](self._ctl, self._ids, self._n, self._done, k, ids)
        return k

    def can_post(self, n: int) -> bool:
        return self.running and n <= self.max_ids and not self._busy[self._posted % self._done.size]

    def wait(self, k: int) -> tuple[np.ndarray, tuple[int, ...]]:
        """Block (off the GIL) until job ``k`` is done: (its rows [n, row_bytes], a view into the ring, valid until
        :meth:`release`; its status: eight numbers, the job's). RuntimeError if the thread failed first."""
        _kernels()[14](self._done, k)
        status = tuple(int(v) for v in self._status[k])
        if status[0] == IoThread.DIED:
            raise RuntimeError(f"the I/O thread stopped before reading this gather: {self.error}")
        n = int(self._n[k])
        return self._out[k, : n * self.row_bytes].reshape(n, self.row_bytes), status

    def release(self, k: int) -> None:
        with self._lock:
            self._busy[k] = False

    def collect(self, k: int, out: np.ndarray) -> tuple[int, ...]:
        """:meth:`wait` for job ``k``, its rows copied into ``out`` (bytes [n, row_bytes]) when its status is 0
        with no bad page, then :meth:`release`; returns the status."""
        try:
            rows, status = self.wait(k)
            if status[0] == 0 and not status[2]:
                np.copyto(out, rows)
        finally:
            self.release(k)
        return status

    def discard(self, k: int) -> None:
        """Let job ``k`` finish unread (its ring slot must not be reused while the thread writes it), release it."""
        try:
            self.wait(k)
        finally:
            self.release(k)

    def settle_all(self) -> None:
        """Block (off the GIL) until every job posted so far has settled. Call it holding whatever lock the callers
        of :meth:`post` hold, so no job starts before the caller is done."""
        if self._thread is not None:
            _kernels()[17](self._ctl, self._ctl[0])

    def close(self) -> None:
        """Let the thread finish the jobs posted, stop it, free its context. Idempotent."""
        if self._thread is None:
            return
        for k in range(self._done.size):  # jobs never waited for: finished before the stop job takes a slot
            _kernels()[14](self._done, k)
        with self._lock:
            if self.error is None:
                k = self._posted % self._done.size
                self._posted += 1
                _kernels()[13](self._ctl, self._n, self._done, k)
        self._thread.join()
        self._thread = None
        _syscall(_SYS_DESTROY, self._ctx, 0, 0, 0, 0)


class KernelContexts:
    """One Linux AIO context per thread that reads (``io_getevents`` reaps whatever its context completed, so
    two threads never share one), created on a thread's first read and destroyed by :meth:`close`.

    ``get()`` is 0, meaning glibc's POSIX AIO, where the syscalls are refused (seccomp, ``fs.aio-max-nr``
    reached) or after :meth:`disable`; ``reason`` then says why."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[int] = []
        self.reason: str | None = why_unavailable() or (None if _SYS_SETUP >= 0 else "no AIO syscalls known")

    def get(self) -> int:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = 0
            if self.reason is None:
                box = ctypes.c_ulong(0)
                if _syscall(_SYS_SETUP, KAIO_EVENTS, ctypes.addressof(box), 0, 0, 0) == 0:
                    ctx = int(box.value)
                    with self._lock:
                        self._all.append(ctx)
                else:
                    self.reason = f"io_setup failed: {os.strerror(ctypes.get_errno())}"
            self._local.ctx = ctx
        return ctx

    def disable(self, reason: str) -> None:
        """Every thread reads through glibc's POSIX AIO from now on."""
        self.reason = reason
        self.close()

    def close(self) -> None:
        with self._lock:
            ctxs, self._all = self._all, []
        for ctx in ctxs:
            _syscall(_SYS_DESTROY, ctx, 0, 0, 0, 0)
        self._local = threading.local()  # a thread's next read makes a fresh context (or none, once disabled)


def aligned_buffer(local: Any, nbytes: int) -> np.ndarray:
    """A thread's page-aligned NumPy buffer of at least ``nbytes``, kept on ``local`` (a ``threading.local``) and
    grown when too small: the kernel writes by address, so O_DIRECT reads need page-aligned memory."""
    arr = getattr(local, "arr", None)
    if arr is None or arr.size < nbytes:
        raw = np.empty(max(nbytes, PAGE) + PAGE, dtype=np.uint8)
        skip = -raw.ctypes.data % PAGE
        arr = raw[skip : skip + max(nbytes, PAGE)]
        local.arr = arr
    return arr


def dup_fds(fd: int, n: int) -> np.ndarray:
    """``fd`` and ``n - 1`` duplicates: glibc runs one request per descriptor at a time."""
    fds = [fd]
    try:
        for _ in range(n - 1):
            fds.append(os.dup(fd))
    except OSError:
        for extra in fds[1:]:
            os.close(extra)
        raise
    return np.asarray(fds, dtype=np.int64)
