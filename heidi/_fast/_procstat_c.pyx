# cython: language_level=3, boundscheck=False, wraparound=False, annotation_typing=False
"""/proc metrics for the governor and usage_delta, compiled twin of `_procstat_py`.

The parsers walk the bytes with C loops (no split, no intermediate objects); Sampler re-reads its
two open files with pread into one buffer and parses there, without the GIL.
"""
import os

from ._procstat_types import Snapshot

from cpython.exc cimport PyErr_SetFromErrno
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.errno cimport EINTR, errno
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp
from posix.fcntl cimport O_RDONLY, open as c_open
from posix.unistd cimport close as c_close, pread as c_pread, read as c_read, sysconf

cdef extern from "<fcntl.h>" nogil:
    const int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    const int _SC_PAGESIZE

__all__ = ("COMPILED", "Snapshot", "Sampler", "parse_stat", "parse_meminfo", "parse_statm",
           "read_cpu_times", "read_meminfo")
# Imports made here are invisible to PyInstaller's analysis of the .so: list them.
HIDDEN_IMPORTS = ("heidi._fast._procstat_types", "os")

COMPILED = True
cdef enum:
    # The first line of /proc/stat is all we need; the rest can be tens of kB on a big box.
    STAT_READ = 16 * 1024
    MEMINFO_READ = 64 * 1024
    MAX_DIGITS = 19  # fits in 64 bits; the pure twin accepts the same

cdef long long _PAGE_KB = sysconf(_SC_PAGESIZE) // 1024


cdef inline bint _is_space(unsigned char c) noexcept nogil:
    # The set bytes.split() splits on: the pure twin's parser must agree byte for byte.
    return c == 32 or (9 <= c <= 13)


# ---- parsers over a raw buffer (no GIL needed) -----------------------------------------------

cdef struct StatResult:
    int error            # 0 ok, 1 no cpu line, 2 too few fields, 3 bad number
    int nfields
    Py_ssize_t bad_at    # bad field: offset and length
    Py_ssize_t bad_len
    unsigned long long busy
    unsigned long long total


cdef void _parse_stat(const unsigned char *p, Py_ssize_t n, StatResult *r) noexcept nogil:
    cdef Py_ssize_t i = 0, start = -1, fs
    cdef const unsigned char *nl
    cdef unsigned long long vals[8]
    cdef unsigned long long v
    cdef int count = 0, k
    r.error = 0
    while i + 4 <= n:
        if memcmp(p + i, b"cpu ", 4) == 0:
            start = i
            break
        nl = <const unsigned char *>memchr(p + i, 10, n - i)
        if nl == NULL:
            break
        i = nl - p + 1
    if start < 0:
        r.error = 1
        return
    i = start + 3
    while count < 8:
        while i < n and p[i] != 10 and _is_space(p[i]):
            i += 1
        if i >= n or p[i] == 10:
            break
        fs = i
        v = 0
        while i < n and not _is_space(p[i]):
            if p[i] < 48 or p[i] > 57:
                v = <unsigned long long>-1
            elif v != <unsigned long long>-1:
                v = v * 10 + (p[i] - 48)
            i += 1
        if v == <unsigned long long>-1 or i - fs > MAX_DIGITS:
            r.error, r.bad_at, r.bad_len = 3, fs, i - fs
            return
        vals[count] = v
        count += 1
    r.nfields = count
    if count < 4:
        r.error = 2
        return
    r.total = 0
    for k in range(count):
        r.total += vals[k]
    r.busy = r.total - vals[3] - (vals[4] if count > 4 else 0)


cdef inline long long _parse_number(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    """The first whitespace-delimited token of p[i:end] as a number; -1 if it is not one."""
    cdef Py_ssize_t fs
    cdef long long v = 0
    while i < end and _is_space(p[i]):
        i += 1
    fs = i
    while i < end and 48 <= p[i] <= 57:
        v = v * 10 + (p[i] - 48)
        i += 1
    if i == fs or i - fs > MAX_DIGITS or (i < end and not _is_space(p[i])):
        return -1
    return v


cdef long long _meminfo_value(const unsigned char *p, Py_ssize_t n, const char *key,
                              Py_ssize_t keylen) noexcept nogil:
    """The value of one key (-1 if absent or malformed), for Sampler: no dict needed."""
    cdef Py_ssize_t i = 0, end
    cdef const unsigned char *nl
    while i < n:
        nl = <const unsigned char *>memchr(p + i, 10, n - i)
        end = nl - p if nl != NULL else n
        if end - i > keylen and memcmp(p + i, key, keylen) == 0 and p[i + keylen] == 58:
            return _parse_number(p, i + keylen + 1, end)
        i = end + 1
    return -1


cdef _stat_error(const unsigned char *p, StatResult *r):
    if r.error == 1:
        raise ValueError("/proc/stat: no 'cpu ' line")
    if r.error == 2:
        raise ValueError(f"/proc/stat: the cpu line has {r.nfields} fields, "
                         "expected at least 4 (user nice system idle)")
    field = (<const char *>p)[r.bad_at:r.bad_at + r.bad_len]
    raise ValueError(f"/proc/stat: bad number {field[:24]!r} in the cpu line")


# ---- public API ----------------------------------------------------------------------------

def parse_stat(const unsigned char[::1] data not None):
    """(busy_jiffies, total_jiffies) from the aggregate "cpu " line of /proc/stat.

    total = user+nice+system+idle+iowait+irq+softirq+steal (guest time is already counted in
    user/nice); busy = total - idle - iowait."""
    cdef StatResult r
    cdef Py_ssize_t n = data.shape[0]
    cdef const unsigned char *p = &data[0] if n else <const unsigned char *>b""
    with nogil:
        _parse_stat(p, n, &r)
    if r.error:
        _stat_error(p, &r)
    return int(r.busy), int(r.total)


def parse_meminfo(const unsigned char[::1] data not None):
    """{"MemTotal": kB, "MemAvailable": kB, ...} from /proc/meminfo (counts such as
    HugePages_Total are kept as they are). MemTotal and MemAvailable must be present."""
    cdef Py_ssize_t n = data.shape[0]
    cdef const unsigned char *p = &data[0] if n else <const unsigned char *>b""
    cdef Py_ssize_t i = 0, end, colon
    cdef const unsigned char *hit
    cdef long long value
    info = {}
    while i < n:
        hit = <const unsigned char *>memchr(p + i, 10, n - i)
        end = hit - p if hit != NULL else n
        if end == i:
            i += 1
            continue
        hit = <const unsigned char *>memchr(p + i, 58, end - i)
        if hit == NULL:
            line = (<const char *>p)[i:end]
            raise ValueError(f"/proc/meminfo: no ':' in line {line[:40]!r}")
        colon = hit - p
        key = PyUnicode_DecodeLatin1(<const char *>p + i, colon - i, NULL)
        value = _parse_number(p, colon + 1, end)
        if value < 0:
            raise ValueError(f"/proc/meminfo: bad value for {key}")
        info[key] = value
        i = end + 1
    for key in ("MemTotal", "MemAvailable"):
        if key not in info:
            raise ValueError(f"/proc/meminfo: {key} missing")
    return info


def parse_statm(const unsigned char[::1] data not None):
    """Resident pages (the second field) from /proc/<pid>/statm."""
    cdef Py_ssize_t n = data.shape[0], i = 0
    cdef const unsigned char *p = &data[0] if n else <const unsigned char *>b""
    cdef long long value
    while i < n and _is_space(p[i]):
        i += 1
    while i < n and not _is_space(p[i]):
        i += 1
    value = _parse_number(p, i, n) if i < n else -1
    if value < 0:
        raise ValueError("statm: no resident page count")
    return value


cdef Py_ssize_t _read_file(const char *path, char *buf, Py_ssize_t size) noexcept nogil:
    """One read() of a whole /proc file into buf; -errno on failure."""
    cdef int fd = c_open(path, O_RDONLY | O_CLOEXEC)
    cdef Py_ssize_t n
    if fd < 0:
        return -errno
    while True:
        n = c_read(fd, buf, size)
        if n >= 0:
            break
        if errno != EINTR:
            n = -errno
            break
    c_close(fd)
    return n


cdef _raise_errno(Py_ssize_t negative_errno, path):
    code = <int>-negative_errno
    raise OSError(code, os.strerror(code), path)


cdef bytes _read_path(const char *path, Py_ssize_t size):
    cdef char *buf = <char *>malloc(size)
    cdef Py_ssize_t n
    if buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            n = _read_file(path, buf, size)
        if n < 0:
            _raise_errno(n, (<bytes>path).decode())
        return buf[:n]
    finally:
        free(buf)


def read_cpu_times():
    """(busy_jiffies, total_jiffies) now; see parse_stat."""
    return parse_stat(_read_path(b"/proc/stat", STAT_READ))


def read_meminfo():
    """/proc/meminfo as a dict of kB values; see parse_meminfo."""
    return parse_meminfo(_read_path(b"/proc/meminfo", MEMINFO_READ))


cdef class Sampler:
    """Keeps /proc/stat and /proc/meminfo open and re-reads them from offset 0 (pread), so a
    sample costs two syscalls; safe to share between threads."""

    cdef int _stat_fd
    cdef int _mem_fd

    def __cinit__(self):
        self._stat_fd = -1
        self._mem_fd = -1

    def __init__(self):
        self._stat_fd = os.open("/proc/stat", os.O_RDONLY | os.O_CLOEXEC)
        self._mem_fd = os.open("/proc/meminfo", os.O_RDONLY | os.O_CLOEXEC)

    def sample(self):
        cdef char *buf = <char *>malloc(MEMINFO_READ)
        cdef StatResult r
        cdef Py_ssize_t n_stat = 0, n_mem = 0
        cdef long long total_kb = -1, avail_kb = -1
        cdef int failed = 0
        if buf == NULL:
            raise MemoryError()
        try:
            with nogil:
                n_stat = c_pread(self._stat_fd, buf, STAT_READ, 0)
                if n_stat < 0:
                    failed = 1
                else:
                    _parse_stat(<const unsigned char *>buf, n_stat, &r)
                    if r.error == 0:
                        n_mem = c_pread(self._mem_fd, buf, MEMINFO_READ, 0)
                        if n_mem < 0:
                            failed = 1
                        else:
                            total_kb = _meminfo_value(<const unsigned char *>buf, n_mem,
                                                      b"MemTotal", 8)
                            avail_kb = _meminfo_value(<const unsigned char *>buf, n_mem,
                                                      b"MemAvailable", 12)
            if failed:
                PyErr_SetFromErrno(OSError)
            if r.error:
                _stat_error(<const unsigned char *>buf, &r)
            if total_kb < 0:
                raise ValueError("/proc/meminfo: MemTotal missing")
            if avail_kb < 0:
                raise ValueError("/proc/meminfo: MemAvailable missing")
            return Snapshot(int(r.busy), int(r.total), total_kb, avail_kb)
        finally:
            free(buf)

    def system_cpu_pct(self, before, after):
        """Busy share of all CPUs between two samples, 0..100 (0 if no time passed)."""
        total = after.cpu_total - before.cpu_total
        if total <= 0:
            return 0.0
        return min(100.0, max(0.0, 100.0 * (after.cpu_busy - before.cpu_busy) / total))

    def mem_used_pct(self, snapshot):
        if snapshot.mem_total_kb <= 0:
            return 0.0
        used = snapshot.mem_total_kb - snapshot.mem_available_kb
        return min(100.0, max(0.0, 100.0 * used / snapshot.mem_total_kb))

    def mem_available_kb(self, snapshot):
        return snapshot.mem_available_kb

    def process_rss_kb(self, pid=None):
        """Resident set size of pid (default: this process) in kB, from /proc/<pid>/statm."""
        cdef char path[64]
        cdef char buf[256]
        cdef Py_ssize_t n
        cdef long long cpid
        if pid is None:
            snprintf(path, sizeof(path), b"/proc/self/statm")
        else:
            cpid = pid
            snprintf(path, sizeof(path), b"/proc/%lld/statm", cpid)
        with nogil:
            n = _read_file(path, buf, sizeof(buf))
        if n < 0:
            _raise_errno(n, (<bytes>path).decode())
        return parse_statm(buf[:n]) * _PAGE_KB

    def close(self):
        if self._stat_fd >= 0:
            c_close(self._stat_fd)
            self._stat_fd = -1
        if self._mem_fd >= 0:
            c_close(self._mem_fd)
            self._mem_fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __dealloc__(self):
        self.close()
