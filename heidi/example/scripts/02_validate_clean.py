#!/usr/bin/env python3
"""Stage 2 of the heidi example pipeline: keep only well-formed, unique, secret-free samples.

Samples are what `heidi generate` writes: {"id", "instruction", "input", "output", "metadata"}.
Drops, in this order: lines that are not a JSON object, samples missing a required field (id,
instruction and output non-empty strings; input a string if present), samples carrying something
that looks like a credential, and duplicates (same instruction, input and output as an earlier
sample). Writes the rest unchanged and prints the count per reason.

Contract: --input RAW --output CLEAN; exit 0 when CLEAN is written, 1 if no sample survives.
"""
import argparse
import hashlib
import json
import os
import re
import sys

REQUIRED = ("id", "instruction", "output")
TEXT_FIELDS = ("instruction", "input", "output")
# Credential shapes a teacher (or its training data) may leak; a hit drops the whole sample.
SECRET_RE = re.compile(
    r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{30,}"      # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{20,}"                    # GitHub fine-grained tokens
    r"|(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}"           # OpenAI / Anthropic keys
    r"|(?<![A-Z0-9])AKIA[A-Z0-9]{16}(?![A-Z0-9])"       # AWS access key ids
    r"|(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}"             # Hugging Face tokens
    r"|-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY-----"       # PEM private keys
)
REASONS = ("malformed", "missing_fields", "secret", "duplicate")


def check(line, seen):
    """The reason to drop a line, or None to keep it."""
    try:
        sample = json.loads(line)
    except ValueError:
        return "malformed"
    if not isinstance(sample, dict):
        return "malformed"
    if not all(isinstance(sample.get(key), str) and sample[key].strip() for key in REQUIRED) \
            or not isinstance(sample.get("input", ""), str):
        return "missing_fields"
    if any(SECRET_RE.search(sample.get(key, "")) for key in TEXT_FIELDS):
        return "secret"
    key = "\0".join(sample.get(name, "") for name in TEXT_FIELDS)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    if digest in seen:
        return "duplicate"
    seen.add(digest)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="raw JSONL from the teacher")
    parser.add_argument("--output", required=True, help="clean JSONL to write")
    args = parser.parse_args(argv)

    dropped = dict.fromkeys(REASONS, 0)
    kept = []
    seen: set[str] = set()
    total = 0
    with open(args.input, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            total += 1
            reason = check(line, seen)
            if reason is None:
                kept.append(line)
            else:
                dropped[reason] += 1

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in kept))
    os.replace(tmp, args.output)

    print("validate: read {}, kept {}, dropped {}".format(
        total, len(kept), " ".join("{}={}".format(r, dropped[r]) for r in REASONS)), flush=True)
    if not kept:
        print("validate: no sample survived; nothing to train on", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
