# cython: language_level=3
"""Atomic file replacement and whole writes, compiled twin of `_atomic_py`.

The syscalls (open, write, fsync, rename) run without the GIL, so a daemon's HTTP thread keeps
serving while state.json is made durable.
"""
import os

from libc.errno cimport errno, EINTR
from libc.string cimport strerror
from posix.fcntl cimport open as c_open, O_WRONLY, O_CREAT, O_EXCL, O_RDONLY
from posix.unistd cimport write as c_write, close as c_close, fsync as c_fsync, getpid, unlink
from posix.stat cimport fchmod, struct_stat

cdef extern from "<sys/stat.h>" nogil:
    int c_stat "stat"(const char *path, struct_stat *buf)
    int c_fstat "fstat"(int fd, struct_stat *buf)

cdef extern from *:
    """
    /* st_mtim (POSIX.1-2008) as integer nanoseconds, what os.stat's st_mtime_ns holds */
    #define HEIDI_MTIME_NS(st) ((long long)(st).st_mtim.tv_sec * 1000000000LL + (st).st_mtim.tv_nsec)
    """
    long long HEIDI_MTIME_NS(struct_stat st) nogil

from libc.errno cimport ENOENT, EEXIST

cdef extern from *:
    """
    #include <sys/syscall.h>
    #include <fcntl.h>
    #include <errno.h>
    /* renameat2(RENAME_EXCHANGE) by number: the glibc wrapper is 2.28+, the kernel call 3.15+ */
    static int heidi_rename_exchange(const char *a, const char *b)
    {
    #if defined(SYS_renameat2)
        return (int)syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, 2 /* RENAME_EXCHANGE */);
    #else
        errno = ENOSYS;
        return -1;
    #endif
    }
    """
    int heidi_rename_exchange(const char *a, const char *b) nogil

# False once the kernel or the filesystem has refused RENAME_EXCHANGE: plain rename from then on
cdef bint _exchange = True


cdef int _swap_in(const char *tmp, const char *path) noexcept nogil:
    """Put tmp in place of path (tmp's name is gone after it); -1 and errno on failure.

    An exchange and an unlink of what it swapped out, where the filesystem can: readers see the
    old file or the new one, as with rename(2), but ext4 does not start writing the new file's
    data back as it does for a rename over an existing file (auto_da_alloc) -- I/O a cache of
    the journal does not need, ~60 us a tick on this disk. Anything but a file at path (a
    directory, say) is swapped back and left to rename(2), which fails as it always did."""
    global _exchange
    cdef int e
    if _exchange:
        if heidi_rename_exchange(tmp, path) == 0:
            if unlink(tmp) == 0:
                return 0
            heidi_rename_exchange(tmp, path)  # swap back what tmp names now: not ours to remove
        else:
            e = errno
            if e != ENOENT:  # ENOENT: no file at path yet; anything else: no exchange here
                _exchange = False
    return c_rename(tmp, path)

cdef extern from "Python.h":
    bytes PyUnicode_EncodeFSDefault(object unicode)


cdef inline bytes _fsencode(path):
    # os.fsencode without its Python frame, for a str (a path asked for every tick)
    if type(path) is str:
        return PyUnicode_EncodeFSDefault(path)
    return os.fsencode(path)

cdef extern from "<fcntl.h>":
    int O_CLOEXEC
    int O_DIRECTORY

cdef extern from "<stdio.h>":
    int c_rename "rename"(const char *old, const char *new) nogil

__all__ = ["atomic_write", "write_all", "fsync_dir", "replace_file", "fingerprint", "fd_fingerprint"]
HIDDEN_IMPORTS = ("os",)

cdef unsigned long long _counter = 0


cdef int _write_all(int fd, const char *buf, Py_ssize_t size) nogil:
    cdef Py_ssize_t done = 0
    cdef Py_ssize_t n
    while done < size:
        n = c_write(fd, buf + done, size - done)
        if n < 0:
            if errno == EINTR:
                continue
            return -1
        done += n
    return 0


cdef _raise(bytes path=None):
    # Without a path (write_all: the caller knows which file the fd is), as os.write raises it:
    # the caller adds its path, never a syscall's name where a path belongs.
    cdef int err = errno
    if path is None:
        raise OSError(err, strerror(err).decode())
    raise OSError(err, strerror(err).decode(), os.fsdecode(path))


cdef int _finish(int fd, const char *tmp, const char *path, const char *buf, Py_ssize_t size,
                 int mode, bint fsync, bint swap, struct_stat *st) noexcept nogil:
    """A replacement once tmp is open as fd (atomic_write's and replace_file's): the data
    written whole, the mode made exact (the umask may have cleared bits we asked for), synced
    when asked, closed, tmp put in place of path -- swapped in (_swap_in) or renamed. 0, or the
    errno of what failed, tmp removed; st: tmp's fstat."""
    cdef int rc = 0, err = 0
    if size:
        rc = _write_all(fd, buf, size)
    if rc == 0:
        rc = c_fstat(fd, st)
    if rc == 0 and st.st_mode & 0o7777 != mode:
        rc = fchmod(fd, mode)
    if rc == 0 and fsync:
        rc = c_fsync(fd)
    if rc < 0:
        err = errno
    c_close(fd)
    if rc == 0:
        rc = _swap_in(tmp, path) if swap else c_rename(tmp, path)
        if rc < 0:
            err = errno
    if rc < 0:
        unlink(tmp)
    return err


def write_all(int fd, const unsigned char[:] data not None):
    """Write every byte of data to fd (write(2) may write less than asked)."""
    cdef int rc
    cdef Py_ssize_t size = data.shape[0]
    if size == 0:
        return
    with nogil:
        rc = _write_all(fd, <const char *>&data[0], size)
    if rc < 0:
        _raise()


def fsync_dir(dirname):
    """fsync a directory so a rename or create in it survives a power cut."""
    cdef bytes bdir = os.fsencode(dirname or ".")
    cdef const char *cdir = bdir
    cdef int fd, rc
    with nogil:
        fd = c_open(cdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd < 0:
        _raise(bdir)
    with nogil:
        rc = c_fsync(fd)
        c_close(fd)
    if rc < 0:
        _raise(bdir)


cdef const unsigned char[:] _view(object data):
    """data's bytes; None refused (a typed memoryview would take it as empty data and blank the
    file)."""
    if data is None:
        raise TypeError("a bytes-like object is required, not 'NoneType'")
    return data


def atomic_write(path, data, int mode=0o600, bint fsync=True):
    """Replace path with data atomically; the file is created with mode (default 0600)."""
    global _counter
    cdef bytes bpath = os.fsencode(path)
    dirname, base = os.path.split(bpath)
    cdef bytes btmp = os.path.join(dirname, b".%s.%d.%d.tmp" % (base, getpid(), _counter))
    _counter += 1
    cdef const unsigned char[:] view = _view(data)
    cdef const char *ctmp = btmp
    cdef const char *cpath = bpath
    cdef const char *buf = <const char *>&view[0] if view.shape[0] else NULL
    cdef Py_ssize_t size = view.shape[0]
    cdef struct_stat st
    cdef int fd, err
    with nogil:
        fd = c_open(ctmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
    if fd < 0:
        _raise(btmp)
    with nogil:
        err = _finish(fd, ctmp, cpath, buf, size, mode, fsync, False, &st)
    if err:
        raise OSError(err, strerror(err).decode(), os.fsdecode(bpath))
    if fsync:
        fsync_dir(os.fsdecode(dirname))


cdef inline tuple _fp(struct_stat *st):
    return (st.st_ino, st.st_dev, st.st_size, HEIDI_MTIME_NS(st[0]))


def fingerprint(path):
    """(inode, device, size, mtime in ns) of path, None when it is missing: os.stat's fields
    without building a stat_result (asked twice a tick)."""
    cdef bytes bpath = _fsencode(path)
    cdef const char *cpath = bpath
    cdef struct_stat st
    cdef int rc
    with nogil:
        rc = c_stat(cpath, &st)
    if rc < 0:
        if errno == ENOENT:
            return None
        _raise(bpath)
    return _fp(&st)


def fd_fingerprint(int fd):
    """(inode, device, size, mtime in ns) of the file open as fd."""
    cdef struct_stat st
    if c_fstat(fd, &st) < 0:
        _raise()
    return _fp(&st)


def replace_file(path, tmp, data):
    """Replace path with data (mode 0600) by writing tmp (a name in its directory that only the
    caller uses; one left by a dead process is removed) and putting it in place (_swap_in): not
    synced. Returns the fingerprint of the file put in place (its fstat: a rename keeps mtime)."""
    cdef bytes bpath = _fsencode(path)
    cdef bytes btmp = _fsencode(tmp)
    cdef const unsigned char[:] view = _view(data)
    cdef const char *ctmp = btmp
    cdef const char *cpath = bpath
    cdef const char *buf = <const char *>&view[0] if view.shape[0] else NULL
    cdef Py_ssize_t size = view.shape[0]
    cdef struct_stat st
    cdef int fd, err
    with nogil:
        fd = c_open(ctmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0 and errno == EEXIST:
            unlink(ctmp)  # left by a process that had this pid and died before its rename
            fd = c_open(ctmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
    if fd < 0:
        _raise(bpath)
    with nogil:
        err = _finish(fd, ctmp, cpath, buf, size, 0o600, False, True, &st)
    if err:
        raise OSError(err, strerror(err).decode(), os.fsdecode(bpath))
    return _fp(&st)
