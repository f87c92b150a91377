#!/usr/bin/env python3
"""Stage 1 of the heidi example pipeline: a stand-in teacher that writes training samples.

A real deployment calls a teacher model here (TEACHER_MODEL over an OpenAI-compatible API) and
asks it for instruction/code/test triples. This stand-in builds them from templates, so the loop
runs anywhere in well under a second, deterministically from --round and $SEED.

Each output line is a JSON object {"id", "round", "instruction", "code", "tests"}: `code` defines
one small Python function and `tests` is a few `assert` lines. To give the later stages something
to do, a batch of 6 or more samples deliberately contains four bad ones (like a real teacher):
a malformed JSON line, a duplicate of an earlier sample, a sample whose code carries a (fake)
credential, and a sample whose tests fail. --no-faults leaves them out.

Contract: --samples N --output PATH --round R; exit 0 when PATH is written.
"""
import argparse
import json
import os
import random
import sys

# (function name, instruction, body, test cases (args, expected) as a function of k)
TEMPLATES = [
    ("add_k", "Write a function {name}(x) that returns x plus {k}.",
     "def {name}(x):\n    return x + {k}\n",
     lambda k: [((1,), 1 + k), ((-k,), 0), ((10,), 10 + k)]),
    ("scale_k", "Write a function {name}(x) that multiplies x by {k}.",
     "def {name}(x):\n    return x * {k}\n",
     lambda k: [((2,), 2 * k), ((0,), 0), ((-3,), -3 * k)]),
    ("clamp_k", "Write a function {name}(x) that limits x to the range 0..{k}.",
     "def {name}(x):\n    return max(0, min({k}, x))\n",
     lambda k: [((-5,), 0), ((k + 7,), k), ((k // 2,), k // 2)]),
    ("is_multiple_k", "Write a function {name}(n) that tells whether n is a multiple of {k}.",
     "def {name}(n):\n    return n % {k} == 0\n",
     lambda k: [((k * 3,), True), ((k * 3 + 1,), False), ((0,), True)]),
    ("repeat_k", "Write a function {name}(s) that returns the string s repeated {k} times.",
     "def {name}(s):\n    return s * {k}\n",
     lambda k: [(("ab",), "ab" * k), (("",), "")]),
    ("sum_below_k", "Write a function {name}() that returns the sum of the integers from 0 to {k} - 1.",
     "def {name}():\n    total = 0\n    for i in range({k}):\n        total += i\n    return total\n",
     lambda k: [((), k * (k - 1) // 2)]),
    ("take_k", "Write a function {name}(items) that returns the first {k} elements of a list.",
     "def {name}(items):\n    return list(items[:{k}])\n",
     lambda k: [((list(range(k + 3)),), list(range(k))), (([],), [])]),
    ("count_char_k", "Write a function {name}(s) that counts how many characters of s have a code "
     "point divisible by {k}.",
     "def {name}(s):\n    return sum(1 for c in s if ord(c) % {k} == 0)\n",
     lambda k: [(("",), 0), ((chr(k * 40),), 1)]),
    ("power_k", "Write a function {name}(x) that returns x raised to the power {k}.",
     "def {name}(x):\n    result = 1\n    for _ in range({k}):\n        result *= x\n    return result\n",
     lambda k: [((2,), 2 ** k), ((1,), 1)]),
    ("pad_k", "Write a function {name}(s) that left-pads s with zeros to {k} characters.",
     "def {name}(s):\n    return s.rjust({k}, '0')\n",
     lambda k: [(("7",), "7".rjust(k, "0")), (("x" * (k + 1),), "x" * (k + 1))]),
]


def render_tests(name, cases):
    return "".join("assert {}({}) == {!r}\n".format(name, ", ".join(repr(a) for a in args), want)
                   for args, want in cases)


def make_sample(rng, round_, index, used):
    """One good sample; (template, k) pairs are not reused, so good samples never collide."""
    for _ in range(50):
        base, instruction, body, cases = rng.choice(TEMPLATES)
        k = rng.randint(2, 40)
        if (base, k) not in used:
            break
    name = base.replace("_k", "_{}".format(k))
    if (base, k) in used:  # thousands of samples: all pairs taken, keep names unique
        name = "{}_s{}".format(name, index)
    used.add((base, k))
    return {
        "id": "r{}-{:04d}".format(round_, index),
        "round": round_,
        "instruction": instruction.format(name=name, k=k),
        "code": body.format(name=name, k=k),
        "tests": render_tests(name, cases(k)),
    }


def fake_token():
    # Built by concatenation so no credential-shaped literal sits in this file.
    return "ghp_" + "x" * 36


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, required=True, help="number of lines to write")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--round", type=int, required=True, dest="round_")
    parser.add_argument("--no-faults", action="store_true", help="leave out the deliberately bad samples")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be 1 or more")

    seed = int(os.environ.get("SEED", "42"))
    teacher = os.environ.get("TEACHER_MODEL", "(none)")
    rng = random.Random(seed * 1000003 + args.round_)
    n = args.samples
    faults = {}
    if n >= 6 and not args.no_faults:
        # Four distinct positions after the first one (the duplicate needs an earlier sample).
        slots = rng.sample(range(1, n), 4)
        faults = dict(zip(slots, ("malformed", "duplicate", "secret", "failing")))

    used = set()
    good = []
    lines = []
    secret_id = None
    for i in range(n):
        kind = faults.get(i)
        sample = make_sample(rng, args.round_, i, used)
        if kind == "malformed":
            # A truncated object, as a teacher cut off mid-answer produces.
            lines.append(json.dumps(sample)[: rng.randint(10, 40)])
            continue
        if kind == "duplicate" and good:
            dup = dict(rng.choice(good))
            dup["id"] = sample["id"]
            sample = dup
        elif kind == "secret":
            sample["code"] = 'API_TOKEN = "{}"\n\n{}'.format(fake_token(), sample["code"])
            secret_id = sample["id"]
        elif kind == "failing":
            # A plausible-looking off-by-one: the tests expect something the code does not do.
            sample["code"] = sample["code"].replace("return ", "return 1 + ", 1)
        else:
            good.append(sample)
        lines.append(json.dumps(sample, sort_keys=True))

    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    os.replace(tmp, args.output)

    print("teacher {}: round {} seed {}: wrote {} samples to {} ({} deliberately bad: {})".format(
        teacher, args.round_, seed, n, args.output, len(faults),
        ", ".join(sorted(faults.values())) or "none"), flush=True)
    if secret_id is not None:
        # Printed on purpose: heidi must redact it from logs/ and the journal.
        print("sample {} leaks a token ({}); validate must drop it".format(secret_id, fake_token()),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
