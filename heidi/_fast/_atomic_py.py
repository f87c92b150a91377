"""Atomic file replacement and whole writes, pure-Python twin of `_atomic_c`.

A reader sees the old file or the new one, never a torn one: tmp file in the same directory,
write, fsync (when durable), rename, fsync of the directory.
"""
from __future__ import annotations

import itertools
import os

__all__ = ["atomic_write", "write_all", "fsync_dir", "replace_file", "fingerprint", "fd_fingerprint"]

_counter = itertools.count()


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of data to fd (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(dirname: str) -> None:
    """fsync a directory so a rename or create in it survives a power cut."""
    fd = os.open(dirname or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, dirname or ".") from None
    finally:
        os.close(fd)


def _finish(fd: int, tmp: str, path: str, data: bytes, mode: int, fsync: bool) -> os.stat_result:
    """A replacement once tmp is open as fd (atomic_write's and replace_file's): the data
    written whole, the mode made exact (the umask may have cleared bits we asked for), synced
    when asked, closed, tmp renamed to path; tmp's fstat. On an error tmp is removed and an
    OSError names path, as the compiled twin's does."""
    try:
        try:
            write_all(fd, data)
            st = os.fstat(fd)
            if st.st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
        raise
    return st


def atomic_write(path: str, data: bytes, mode: int = 0o600, fsync: bool = True) -> None:
    """Replace path with data atomically; the file is created with mode (default 0600)."""
    dirname, base = os.path.split(os.fspath(path))
    tmp = os.path.join(dirname, f".{base}.{os.getpid()}.{next(_counter)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    _finish(fd, tmp, path, data, mode, fsync)
    if fsync:
        fsync_dir(dirname)


def _fp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def fingerprint(path: str) -> tuple[int, int, int, int] | None:
    """(inode, device, size, mtime in ns) of path, None when it is missing."""
    try:
        return _fp(os.stat(path))
    except FileNotFoundError:
        return None


def fd_fingerprint(fd: int) -> tuple[int, int, int, int]:
    """(inode, device, size, mtime in ns) of the file open as fd."""
    return _fp(os.fstat(fd))


def replace_file(path: str, tmp: str, data: bytes) -> tuple[int, int, int, int]:
    """Replace path with data (mode 0600) by writing tmp (a name in its directory that only the
    caller uses; one left by a dead process is removed) and renaming it: not synced. Returns
    the fingerprint of the file renamed into place (its fstat: a rename leaves its mtime).

    The compiled twin swaps tmp in with renameat2(RENAME_EXCHANGE) and unlinks the old file,
    which the standard library cannot reach: the same files for readers, less I/O on ext4."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:
        os.unlink(tmp)  # left by a process that had this pid and died before its rename
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    return _fp(_finish(fd, tmp, path, data, 0o600, False))
