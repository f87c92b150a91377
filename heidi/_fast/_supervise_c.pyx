# cython: language_level=3, boundscheck=False, wraparound=False, annotation_typing=False
"""Stage supervision, compiled twin of `_supervise_py` (same API, same watchdog).

The wait loop polls and reads in C with the GIL released, so a daemon's HTTP thread runs freely
while a stage trains for hours; each chunk is read straight into a bytes object sized by FIONREAD.
"""
import os

from . import _supervise_watchdog as _wd
from ._supervise_types import StageResult

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport EINTR, errno
from libc.math cimport INFINITY, ceil
from posix.unistd cimport read as c_read

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    const short POLLIN

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clock_id, timespec *ts)
    const int CLOCK_MONOTONIC

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, int *arg)
    const unsigned long FIONREAD

__all__ = ("StageResult", "run_supervised", "COMPILED")
# Imports made here are invisible to PyInstaller's analysis of the .so: list them.
HIDDEN_IMPORTS = ("heidi._fast._supervise_watchdog", "heidi._fast._supervise_types", "os")

COMPILED = True
# Largest chunk handed to on_output (the output pipe holds 1 MiB).
cdef Py_ssize_t READ_MAX = 1 << 20
# Read size when FIONREAD has nothing to say (end of file, or a racing writer).
cdef Py_ssize_t READ_DEFAULT = 1 << 16
# Longest single poll(): the loop looks at pending signals at least this often.
cdef double MAX_WAIT_MS = 1000.0


cdef inline double _now() noexcept nogil:
    # CLOCK_MONOTONIC: the clock time.monotonic() reads, which the launch time comes from.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef object _read_chunk(int fd):
    """One read(); b"" at end of file."""
    cdef int avail = 0
    cdef Py_ssize_t want, n
    with nogil:
        if ioctl(fd, FIONREAD, &avail) < 0 or avail <= 0:
            want = READ_DEFAULT
        else:
            want = avail if avail < READ_MAX else READ_MAX
    buf = PyBytes_FromStringAndSize(NULL, want)
    cdef char *p = PyBytes_AS_STRING(buf)
    while True:
        # The bytes object is ours alone until returned: filling it without the GIL is safe.
        with nogil:
            n = c_read(fd, p, want)
        if n >= 0:
            break
        if errno != EINTR:
            PyErr_SetFromErrno(OSError)
        PyErr_CheckSignals()
    if n == want:
        return buf
    return buf[:n]


def run_supervised(argv, *, cwd=None, env=None, timeout_s=None, grace_s=5.0, on_output=None,
                   should_stop=None, check_interval_s=0.25, rlimits=None):
    """Run argv as a stage and wait for it; see `heidi._fast.supervise` for the contract."""
    _wd.check_args(timeout_s, grace_s, check_interval_s)
    launch = _wd.launch(argv, cwd, env, rlimits, grace_s)
    reader = _wd.StatusReader()
    if launch.error is not None:
        return _wd.build_result(launch, reader, timed_out=False, timeout_s=timeout_s,
                                stopped=False, output_bytes=0)
    cdef int out_fd = launch.out_fd
    cdef int st_fd = launch.status_fd
    cdef pollfd fds[2]
    cdef int rc, timeout_ms
    cdef double now, wake
    cdef double t0 = launch.t0
    cdef double deadline = t0 + timeout_s if timeout_s is not None else INFINITY
    cdef double interval = check_interval_s
    cdef double next_check = t0 + interval if should_stop is not None else INFINITY
    cdef double drain_until = INFINITY
    cdef double w_deadline = INFINITY
    cdef double grace = grace_s
    cdef double w_silent = _wd.W_SILENT_S
    cdef double drain_s = _wd.DRAIN_S
    cdef bint out_open = True, st_open = True, grown = False
    cdef Py_ssize_t pipe_full = _wd.PIPE_DEFAULT_SIZE
    cdef bint ending = False, timed_out = False, stopped = False
    cdef long long total = 0
    cdef Py_ssize_t size
    fds[0].fd = out_fd
    fds[0].events = POLLIN
    fds[1].fd = st_fd
    fds[1].events = POLLIN
    try:
        while out_open and (st_open or reader.final is not None):
            now = _now()
            if reader.final is not None:
                # The stage is over (W reports only when none of its processes is left): read
                # what is still in the pipe, bounded in case a writer escaped.
                if drain_until == INFINITY:
                    drain_until = now + drain_s
                elif now >= drain_until:
                    break
                wake = drain_until
            elif ending:
                wake = w_deadline
            else:
                wake = deadline if deadline < next_check else next_check
            # Capped: a signal (^C) that lands between the check below and poll() would otherwise
            # wait for the next event; Cython code has no bytecode boundary to notice it at.
            if wake <= now:
                timeout_ms = 0
            else:
                timeout_ms = <int>min(ceil((wake - now) * 1000.0), MAX_WAIT_MS)
            PyErr_CheckSignals()
            fds[0].fd = out_fd if out_open else -1
            fds[1].fd = st_fd if st_open else -1
            fds[0].revents = 0
            fds[1].revents = 0
            with nogil:
                rc = poll(fds, 2, timeout_ms)
            if rc < 0:
                if errno != EINTR:
                    PyErr_SetFromErrno(OSError)
                PyErr_CheckSignals()  # ^C while waiting: KeyboardInterrupt, handled below
                continue
            if fds[0].revents:
                data = _read_chunk(out_fd)
                size = len(data)
                if size:
                    total += size
                    if not grown and size >= pipe_full:
                        _wd.grow_pipe(out_fd)
                        grown = True
                    if on_output is not None:
                        on_output(data)
                else:
                    out_open = False
            if fds[1].revents:
                data = os.read(st_fd, 4096)
                if data:
                    reader.feed(data)
                else:
                    st_open = False
            if reader.final is not None or not st_open:
                continue
            now = _now()
            if ending:
                if now >= w_deadline:  # W should have reported long ago
                    _wd.kill_watchdog()
                    w_deadline = INFINITY
                continue
            if now >= deadline:
                timed_out = ending = True
            elif now >= next_check:
                next_check = now + interval
                stopped = ending = bool(should_stop())
            if ending:
                _wd.request_term(launch.sid)
                w_deadline = now + grace + w_silent
        if reader.final is None and st_open:
            reader.settle(st_fd)
    except BaseException:
        # A callback (or ^C) interrupts us: the stage must not outlive this call.
        _wd.abort(launch, reader, st_open, grace_s)
        raise
    finally:
        launch.close()
    return _wd.build_result(launch, reader, timed_out=timed_out, timeout_s=timeout_s,
                            stopped=stopped, output_bytes=total)
