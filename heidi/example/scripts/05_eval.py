#!/usr/bin/env python3
"""Stage 5 of the heidi example pipeline: score the round's adapter on the validation split.

A real deployment generates code with BASE_MODEL + the adapter and runs each sample's tests. This
stand-in scores token coverage: the share of each validation sample's answer tokens that the toy
adapter's vocabulary knows, averaged over samples (score null when there is no validation data).

Contract: --adapter DIR/final --data VAL --output REPORT; exit 0 when REPORT is written. heidi
records a failing eval as a warning and goes on to the next round.
"""
import argparse
import json
import os
import re
import sys

TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[^\sA-Za-z0-9_]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="directory holding adapter.json")
    parser.add_argument("--data", required=True, help="validation JSONL (may be empty)")
    parser.add_argument("--output", required=True, help="report JSON to write")
    parser.add_argument("--round", type=int, dest="round_", help="default: $HEIDI_ROUND")
    args = parser.parse_args(argv)

    adapter_path = os.path.join(args.adapter, "adapter.json")
    try:
        with open(adapter_path, encoding="utf-8") as fh:
            adapter = json.load(fh)
    except (OSError, ValueError) as exc:
        print("eval: cannot load {}: {}".format(adapter_path, exc), file=sys.stderr)
        return 1
    vocab = adapter.get("vocab") or {}

    scores = []
    if os.path.exists(args.data):
        with open(args.data, encoding="utf-8") as fh:
            for line in fh:
                try:
                    sample = json.loads(line) if line.strip() else None
                except ValueError:
                    sample = None
                if not isinstance(sample, dict):
                    continue
                toks = TOKEN_RE.findall(str(sample.get("output", "")))
                scores.append(sum(1 for t in toks if t in vocab) / len(toks) if toks else 0.0)
    round_ = args.round_
    if round_ is None:
        round_ = int(os.environ.get("HEIDI_ROUND") or adapter.get("round") or 0)
    report = {"round": round_, "n_val": len(scores),
              "score": round(sum(scores) / len(scores), 6) if scores else None,
              "adapter": os.path.abspath(args.adapter)}

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, args.output)
    print("eval: round {}, {} val samples, token coverage {}".format(
        round_, report["n_val"], "n/a" if report["score"] is None else "{:.3f}".format(report["score"])),
        flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
