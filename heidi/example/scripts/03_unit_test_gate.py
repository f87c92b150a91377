#!/usr/bin/env python3
"""Stage 3 of the heidi example pipeline (RUN_UNIT_TESTS=1): keep samples whose tests pass.

Each sample's code and tests run together in a fresh, isolated interpreter (sys.executable -I)
in an empty temporary directory, with a timeout; the process group is killed on timeout. A few
run in parallel. Generated code is untrusted: on a shared box, run this stage in a sandbox.

Contract: --input CLEAN --output TESTED [--timeout-s 5]; exit 0 when TESTED is written, 1 if no
sample passes.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor


def run_one(sample, timeout_s, workdir):
    """'passed', 'failed' or 'timeout', and the last line of the sample's error output."""
    source = "{}\n\n{}\n".format(sample.get("code", ""), sample.get("tests", ""))
    proc = subprocess.Popen([sys.executable, "-I", "-c", source], cwd=workdir,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.communicate()
        return "timeout", "no result after {:g} s".format(timeout_s)
    if proc.returncode == 0:
        return "passed", ""
    lines = out.decode("utf-8", "replace").strip().splitlines()
    return "failed", lines[-1][:200] if lines else "exit code {}".format(proc.returncode)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="clean JSONL")
    parser.add_argument("--output", required=True, help="JSONL of the samples that pass")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="per sample (default 5)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    lines, samples = [], []
    invalid = 0
    with open(args.input, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                sample = json.loads(line)
            except ValueError:
                invalid += 1
                continue
            if not isinstance(sample, dict):
                invalid += 1
                continue
            lines.append(line)
            samples.append(sample)

    with tempfile.TemporaryDirectory(prefix="heidi-gate-") as workdir:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda s: run_one(s, args.timeout_s, workdir), samples))

    counts = {"passed": 0, "failed": 0, "timeout": 0}
    kept = []
    for line, sample, (verdict, detail) in zip(lines, samples, results):
        counts[verdict] += 1
        if verdict == "passed":
            kept.append(line)
        else:
            print("  {} {}: {}".format(sample.get("id", "?"), verdict, detail), flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in kept))
    os.replace(tmp, args.output)

    print("test gate: {} samples, passed {}, failed {}, timeout {}, invalid {}".format(
        len(samples) + invalid, counts["passed"], counts["failed"], counts["timeout"], invalid),
        flush=True)
    if not kept:
        print("test gate: no sample passed its tests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
