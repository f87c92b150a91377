"""Peak RSS of the train/val split on a generated 1 GB dataset: heidi's streamed split against the
interpreter's own floor and against reading the whole file into memory (what the split did before).

Run: python -m pytest bench/bench_split.py --benchmark-only -s   (needs ~3 GB free in $TMPDIR)
Target (hostile-input issue): heidi's peak RSS under 100 MB while splitting 1 GB.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

SIZE_BYTES = 1 << 30
TARGET_MB = 100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STREAMED = """
import sys
from heidi.split import split_file
print(split_file(sys.argv[1], sys.argv[2], sys.argv[3], 0.1, 42, fsync=False))
"""
IN_MEMORY = """
import sys
with open(sys.argv[1], "rb") as fh:
    lines = [line for line in fh if line.strip()]
print(len(lines))
"""
FLOOR = "import heidi.split"
_PEAKS: dict[str, float] = {}


_HWM = """
with open("/proc/self/status") as _status:
    print(next(line for line in _status if line.startswith("VmHWM:")), file=sys.stderr)
"""


def _peak_rss_mb(code: str, *args: str) -> float:
    """The child's own high-water RSS (VmHWM: rusage would count the parent's pages until exec)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", "import sys\n" + code + _HWM, *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return int(done.stderr.split()[-2]) / 1024


@pytest.fixture(scope="module")
def dataset():
    root = tempfile.mkdtemp(prefix="heidi-bench-split-")
    if shutil.disk_usage(root).free < 3 * SIZE_BYTES:
        shutil.rmtree(root)
        pytest.skip("needs 3 GB free for a 1 GB dataset and its two halves")
    path = os.path.join(root, "clean_round_1.jsonl")
    block = b"".join(b'{"id": "%08d", "instruction": "write a function", "output": "%s"}\n'
                     % (i, b"x" * (i % 300)) for i in range(4096))
    with open(path, "wb") as fh:
        while fh.tell() < SIZE_BYTES:
            fh.write(block)
    yield root, path
    shutil.rmtree(root)
    reporter_lines = [f"  {name:10s} peak RSS {mb:7.1f} MB" for name, mb in _PEAKS.items()]
    if reporter_lines:
        print("\nsplit of a 1 GB dataset:\n" + "\n".join(reporter_lines))
        streamed = _PEAKS.get("streamed")
        if streamed is not None:
            verdict = "MET" if streamed < TARGET_MB else "NOT MET"
            print(f"  target: streamed < {TARGET_MB} MB -> {verdict}")


@pytest.mark.benchmark(group="split peak RSS")
@pytest.mark.parametrize("case", ["floor", "streamed", "in-memory"])
def test_split_peak_rss(benchmark, dataset, case):
    root, path = dataset
    train, val = os.path.join(root, "train.jsonl"), os.path.join(root, "val.jsonl")
    code, args = {"floor": (FLOOR, ()), "streamed": (STREAMED, (path, train, val)),
                  "in-memory": (IN_MEMORY, (path,))}[case]
    _PEAKS[case] = benchmark.pedantic(_peak_rss_mb, args=(code, *args), rounds=1, iterations=1)
