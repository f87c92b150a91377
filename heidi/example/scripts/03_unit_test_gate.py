#!/usr/bin/env python3
"""Stage 3 of the heidi example pipeline (RUN_UNIT_TESTS=1): keep samples whose tests pass.

A sample's code is the first fenced code block of its `output` (the whole output if it has
none); its tests are the `assert` lines of its `input` (the built-in tasks of `heidi generate`
carry them there). A sample without tests is dropped as untested. Code and tests run together in
a fresh, isolated interpreter (sys.executable -I) in an empty temporary directory, with a timeout
and a minimal environment (no keys, no tokens: see sample_env); the process group is killed on
timeout. A few run in parallel. Generated code is untrusted: on a shared box, run this stage in a
sandbox.

Contract: --input CLEAN --output TESTED [--timeout-s 5]; exit 0 when TESTED is written, 1 if no
sample passes.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor


FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)```", re.DOTALL)


def code_and_tests(sample):
    output, task_input = str(sample.get("output", "")), str(sample.get("input", ""))
    match = FENCE_RE.search(output)
    code = match.group(1) if match else output
    tests = "".join(line.strip() + "\n" for line in task_input.splitlines()
                    if line.strip().startswith("assert "))
    return code, tests


# Variables a sample's interpreter may need to start and to print text; nothing else of this
# stage's environment (API keys, tokens, cloud credentials) reaches generated code.
PASSED_ON = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH")


def sample_env(workdir):
    """The whole environment of a sample's interpreter: HOME and TMPDIR are its empty directory."""
    env = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(HOME=workdir, TMPDIR=workdir, PYTHONDONTWRITEBYTECODE="1")
    return env


def run_one(sample, timeout_s, workdir):
    """'passed', 'failed', 'timeout' or 'untested', and the last line of the error output."""
    code, tests = code_and_tests(sample)
    if not tests:
        return "untested", "no assert lines in its input"
    source = "{}\n\n{}\n".format(code, tests)
    proc = subprocess.Popen([sys.executable, "-I", "-c", source], cwd=workdir,
                            env=sample_env(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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

    with tempfile.TemporaryDirectory(prefix="heidi-gate-") as workdir, \
            ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: run_one(s, args.timeout_s, workdir), samples))

    counts = {"passed": 0, "failed": 0, "timeout": 0, "untested": 0}
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

    print("test gate: {} samples, passed {}, failed {}, timeout {}, untested {}, invalid {}".format(
        len(samples) + invalid, counts["passed"], counts["failed"], counts["timeout"],
        counts["untested"], invalid), flush=True)
    if not kept:
        print("test gate: no sample passed its tests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
