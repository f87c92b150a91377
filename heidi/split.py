"""The train/val split of a round's data, streamed: memory stays flat whatever the input's size.

Two passes over the input: the first counts its non-blank lines, the second sends each line to
train or val by selection sampling (Knuth's Algorithm S), which picks exactly n_val of n lines,
each subset equally likely, from one seeded generator and O(1) state.
"""
from __future__ import annotations

import os
import random
from typing import BinaryIO, Iterator

from heidi._fast.atomic import fsync_dir
from heidi.waiting import with_path

__all__ = ["split_file", "val_count"]

_BUFFER = 1 << 20


def val_count(n: int, val_ratio: float) -> int:
    """How many of n lines go to val: VAL_RATIO of them, at least one and at most n-1 when n >= 2."""
    if n < 2:
        return 0
    return min(max(round(n * val_ratio), 1), n - 1)


def _data_lines(fh: BinaryIO) -> Iterator[bytes]:
    for line in fh:
        if line.strip():
            yield line if line.endswith(b"\n") else line + b"\n"


class _AtomicOutput:
    """A file written in pieces that appears at its path whole, or not at all (tmp + rename)."""

    def __init__(self, path: str, mode: int, fsync: bool) -> None:
        self.path = path
        self.fsync = fsync
        dirname, base = os.path.split(path)
        self.tmp = os.path.join(dirname, f".{base}.{os.getpid()}.split.tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        os.fchmod(fd, mode)  # the umask may have cleared bits we asked for
        self.committed = False
        self.fh = open(fd, "wb", buffering=_BUFFER)  # closed by commit/discard

    def commit(self) -> None:
        try:
            self.fh.flush()
            if self.fsync:
                os.fsync(self.fh.fileno())
            self.fh.close()
            os.rename(self.tmp, self.path)
        except OSError as exc:
            raise with_path(exc, self.path) from None
        self.committed = True

    def discard(self) -> None:
        if self.committed:
            return
        try:
            self.fh.close()  # flushes what is buffered: fails again on a full disk
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def split_file(source: str, train_path: str, val_path: str, val_ratio: float, seed: int,
               fsync: bool = True, mode: int = 0o600) -> tuple[int, int]:
    """Split source's non-blank lines into train_path and val_path; returns (n_train, n_val).

    Deterministic for seed; the outputs are disjoint, together the whole input, in input order,
    and each replaces its path atomically. Raises FileNotFoundError / ValueError (empty input).
    """
    with open(source, "rb", buffering=_BUFFER) as fh:
        n = sum(1 for _ in _data_lines(fh))
    if n == 0:
        raise ValueError(f"no data to train on: {source} is empty")
    n_val = val_count(n, val_ratio)
    rng = random.Random(seed)
    outputs: list[_AtomicOutput] = []
    try:
        outputs.append(_AtomicOutput(train_path, mode, fsync))
        outputs.append(_AtomicOutput(val_path, mode, fsync))
        train_out, val_out = outputs[0].fh, outputs[1].fh
        seen = picked = 0
        with open(source, "rb", buffering=_BUFFER) as fh:
            for line in _data_lines(fh):
                if seen >= n:  # the file grew between the two passes
                    seen += 1
                    continue
                if rng.random() * (n - seen) < n_val - picked:
                    target = val_out
                    picked += 1
                else:
                    target = train_out
                try:  # free unless it raises (3.11)
                    target.write(line)
                except OSError as exc:
                    # a buffered write names no file: name the output it was for
                    raise with_path(exc, val_path if target is val_out else train_path) from None
                seen += 1
        if seen != n:
            raise ValueError(f"{source} changed while it was being split "
                             f"({n} lines counted, then {seen} read)")
        for out in outputs:
            out.commit()
    except BaseException:
        for out in outputs:
            out.discard()
        raise
    if fsync:
        fsync_dir(os.path.dirname(train_path))
        if os.path.dirname(val_path) != os.path.dirname(train_path):
            fsync_dir(os.path.dirname(val_path))
    return n - n_val, n_val
