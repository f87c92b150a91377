"""Atomic file replacement (heidi/_fast atomic twins): what lands on disk, with which mode, and
that no tmp file is ever left behind."""
from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import stat
import threading

import pytest


@pytest.fixture
def umask():
    """Set a umask for the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)
    yield set_
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("fsync", [True, False])
def test_replaces_content(fast_impl, tmp_path, fsync):
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.write_bytes(b'{"old": true, "padding": "' + b"x" * 5000 + b'"}\n')
    mod.atomic_write(str(target), b'{"new":1}\n', fsync=fsync)
    assert target.read_bytes() == b'{"new":1}\n'
    assert os.listdir(tmp_path) == ["state.json"]


def test_creates_missing_file_and_accepts_pathlike(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    target = tmp_path / "fresh.json"
    mod.atomic_write(target, b"hello")
    assert target.read_bytes() == b"hello"


def test_empty_data_gives_empty_file(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.write_bytes(b"something")
    mod.atomic_write(str(target), b"")
    assert target.read_bytes() == b""
    assert os.listdir(tmp_path) == ["state.json"]


def test_relative_path_in_cwd(fast_impl, tmp_path, monkeypatch):
    mod = fast_impl("atomic")
    monkeypatch.chdir(tmp_path)
    mod.atomic_write("state.json", b"abc")
    assert (tmp_path / "state.json").read_bytes() == b"abc"
    assert os.listdir(tmp_path) == ["state.json"]


def test_large_data_written_whole(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    data = os.urandom(3 << 20)
    mod.atomic_write(str(tmp_path / "big"), data, fsync=False)
    assert (tmp_path / "big").read_bytes() == data


@pytest.mark.parametrize("mask", [0o077, 0o000, 0o022, 0o777])
def test_mode_0600_whatever_the_umask(fast_impl, tmp_path, umask, mask):
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)  # the file it replaces was readable by others
    umask(mask)
    mod.atomic_write(str(target), b"new")
    assert _mode(target) == 0o600
    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("mask", [0o077, 0o000])
def test_requested_mode_is_exact_despite_umask(fast_impl, tmp_path, umask, mask):
    mod = fast_impl("atomic")
    umask(mask)
    mod.atomic_write(str(tmp_path / "a"), b"x", 0o640)
    assert _mode(tmp_path / "a") == 0o640


# Both ways a file is replaced: atomic_write (synced, its own tmp name), replace_file (state.json
# each tick: not synced, the caller's tmp name, swapped in by the compiled twin).
REPLACERS = {
    "atomic_write": lambda mod, target, data: mod.atomic_write(str(target), data, fsync=False),
    "replace_file": lambda mod, target, data: mod.replace_file(
        str(target), os.path.join(os.path.dirname(target), ".t.tmp"), data),
}


@pytest.mark.parametrize("replace", sorted(REPLACERS))
def test_no_tmp_left_when_rename_fails(fast_impl, tmp_path, replace):
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.mkdir()  # a non-empty directory where the file should go: rename(2) fails
    (target / "keep").write_bytes(b"k")
    with pytest.raises(OSError) as info:
        REPLACERS[replace](mod, target, b"data")
    assert info.value.filename == str(target)
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
    assert os.listdir(target) == ["keep"]  # the directory is where it was, whole


@pytest.mark.parametrize("bad", [12345, "text, not bytes", None])
def test_no_tmp_left_on_data_type_error(fast_impl, tmp_path, bad):
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        mod.atomic_write(str(target), bad)
    assert os.listdir(tmp_path) == ["state.json"]
    assert target.read_bytes() == b"old"


@pytest.mark.parametrize("replace", sorted(REPLACERS))
def test_no_tmp_left_when_write_fails_midway(fast_impl, tmp_path, replace):
    """A write that fails after the tmp file exists (file size limit: EFBIG)."""
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        with pytest.raises(OSError) as info:
            REPLACERS[replace](mod, target, b"y" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.errno == errno.EFBIG and info.value.filename == str(target)
    assert os.listdir(tmp_path) == ["state.json"]
    assert target.read_bytes() == b"old"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir_fails_cleanly(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(PermissionError):
            mod.atomic_write(str(target), b"new")
    finally:
        os.chmod(tmp_path, 0o700)
    assert os.listdir(tmp_path) == ["state.json"]
    assert target.read_bytes() == b"old"


def test_missing_dir_raises_and_names_path(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    with pytest.raises(FileNotFoundError):
        mod.atomic_write(str(tmp_path / "nope" / "state.json"), b"x")
    assert os.listdir(tmp_path) == []


def test_fsync_flag_controls_fsync_calls_pure(tmp_path, monkeypatch):
    """The pure twin calls fsync (file + directory) only when asked; the compiled twin makes the
    same calls in C, where they cannot be counted from Python."""
    from heidi._fast import _atomic_py as mod
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    mod.atomic_write(str(tmp_path / "a"), b"1", fsync=False)
    assert calls == []
    mod.atomic_write(str(tmp_path / "a"), b"2", fsync=True)
    assert len(calls) == 2
    assert (tmp_path / "a").read_bytes() == b"2"


@contextlib.contextmanager
def _reading(target):
    """A thread reading target whole, again and again, while the block runs: the set of every
    content it read."""
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            with open(target, "rb") as fh:
                seen.add(fh.read())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield seen
    finally:
        stop.set()
        reader.join()


def test_readers_never_see_a_torn_file(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    a, b = b"A" * 50_000, b"B" * 70_000
    mod.atomic_write(str(target), a, fsync=False)
    with _reading(target) as seen:
        for i in range(300):
            mod.atomic_write(str(target), b if i % 2 == 0 else a, fsync=False)
    assert seen <= {a, b}
    assert os.listdir(tmp_path) == ["state.json"]


def test_fsync_dir(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    mod.fsync_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        mod.fsync_dir(str(tmp_path / "missing"))


# -- write_all -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_write_all_to_pipe_delivers_every_byte(fast_impl, kind):
    mod = fast_impl("atomic")
    data = os.urandom(1 << 20)  # 16x a pipe's buffer: the writer blocks and resumes many times
    rfd, wfd = os.pipe()
    received = bytearray()

    def drain():
        while chunk := os.read(rfd, 7000):
            received.extend(chunk)

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        mod.write_all(wfd, kind(data))
    finally:
        os.close(wfd)
        thread.join()
        os.close(rfd)
    assert bytes(received) == data


def test_write_all_to_file_and_empty(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    path = tmp_path / "out"
    data = os.urandom(5 << 20) + b"tail"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        mod.write_all(fd, data)
        mod.write_all(fd, b"")
        mod.write_all(fd, b"\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == data + b"\n"


def test_write_all_bad_fd_raises(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError):
            mod.write_all(fd, b"x")
    finally:
        os.close(fd)


def test_write_all_refuses_none(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(TypeError):
            mod.write_all(fd, None)
    finally:
        os.close(fd)


# -- fingerprint, fd_fingerprint, replace_file: state.json's per-tick path (not synced) -------

def _os_fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def test_fingerprint_is_os_stat_or_none(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"x" * 123)
    assert mod.fingerprint(str(path)) == _os_fingerprint(os.stat(path))
    assert mod.fingerprint(path) == _os_fingerprint(os.stat(path))  # a PathLike too
    assert mod.fingerprint(str(tmp_path / "missing")) is None


def test_fingerprint_other_errors_name_the_path(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    (tmp_path / "file").write_bytes(b"")
    bad = str(tmp_path / "file" / "below")  # ENOTDIR: not "missing", an error
    with pytest.raises(NotADirectoryError) as info:
        mod.fingerprint(bad)
    assert info.value.filename == bad


def test_fd_fingerprint_follows_the_open_file(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    path = tmp_path / "j"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"line\n")
        assert mod.fd_fingerprint(fd) == _os_fingerprint(os.fstat(fd))
        os.rename(path, tmp_path / "moved")  # the fd's file, whatever its name is now
        (tmp_path / "j").write_bytes(b"another file")
        assert mod.fd_fingerprint(fd) == _os_fingerprint(os.stat(tmp_path / "moved"))
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        mod.fd_fingerprint(fd)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o277])
def test_replace_file_content_mode_and_fingerprint(fast_impl, tmp_path, umask, mask):
    mod = fast_impl("atomic")
    umask(mask)
    target, tmp = tmp_path / "state.json", tmp_path / ".state.json.1.0.tmp"
    target.write_bytes(b"old")
    seen = mod.replace_file(str(target), str(tmp), b'{"new":1}\n')
    assert target.read_bytes() == b'{"new":1}\n'
    assert _mode(target) == 0o600  # whatever the umask cleared
    assert seen == _os_fingerprint(os.stat(target))  # the file renamed into place
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
    mod.replace_file(str(target), str(tmp), b"")  # the same tmp name, tick after tick
    assert target.read_bytes() == b""


def test_replace_file_takes_over_a_dead_writers_tmp(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    target, tmp = tmp_path / "state.json", tmp_path / ".state.json.7.0.tmp"
    tmp.write_bytes(b"left by a process that died before its rename")
    mod.replace_file(str(target), str(tmp), b"fresh")
    assert target.read_bytes() == b"fresh"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_replace_file_swaps_out_a_symlink_not_its_target(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not heidi's")
    (tmp_path / "state.json").symlink_to(elsewhere)
    mod.replace_file(str(tmp_path / "state.json"), str(tmp_path / ".t.tmp"), b"new")
    assert not os.path.islink(tmp_path / "state.json")
    assert (tmp_path / "state.json").read_bytes() == b"new"
    assert elsewhere.read_bytes() == b"not heidi's"
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "state.json"]


def test_replace_file_readers_see_old_or_new(fast_impl, tmp_path):
    """Another process reading state.json while it is replaced tick after tick never sees it
    torn, missing or empty."""
    mod = fast_impl("atomic")
    target, tmp = tmp_path / "state.json", str(tmp_path / ".t.tmp")
    versions = [b"A" * 3000 + b"\n", b"B" * 10 + b"\n"]
    mod.replace_file(str(target), tmp, versions[0])
    with _reading(target) as seen:
        for i in range(2000):
            mod.replace_file(str(target), tmp, versions[i % 2])
    assert seen <= set(versions) and seen
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_none_is_refused_and_the_file_kept(fast_impl, tmp_path):
    """None is no data: refused before anything is written (the compiled twin's memoryview would
    take it as empty, and blank the file)."""
    mod = fast_impl("atomic")
    target = tmp_path / "state.json"
    target.write_bytes(b"kept\n")
    with pytest.raises(TypeError):
        mod.atomic_write(str(target), None, fsync=False)
    with pytest.raises(TypeError):
        mod.replace_file(str(target), str(tmp_path / ".t.tmp"), None)
    assert target.read_bytes() == b"kept\n" and os.listdir(tmp_path) == ["state.json"]


def test_replace_file_missing_dir_names_the_path(fast_impl, tmp_path):
    mod = fast_impl("atomic")
    target = str(tmp_path / "gone" / "state.json")
    with pytest.raises(FileNotFoundError) as info:
        mod.replace_file(target, str(tmp_path / "gone" / ".t.tmp"), b"x")
    assert info.value.filename == target
