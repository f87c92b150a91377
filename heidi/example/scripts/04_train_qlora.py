#!/usr/bin/env python3
"""Stage 4 of the heidi example pipeline: a toy stand-in for QLoRA fine-tuning.

A real deployment loads BASE_MODEL in 4 bits and trains a LoRA adapter (LORA_R, LR, SEQ_LEN,
BATCH_SIZE, GRAD_ACCUM, TRAIN_STEPS) on --data, checking --val-data. This stand-in "trains" a
unigram model of the tokens of the teacher's answers (`output`): each step moves the model from
uniform towards the observed token frequencies, so the loss (mean negative log-likelihood per
token) goes down like a real run's, and prints `step S/N loss X` per step.
Steps: TRAIN_STEPS, capped at 20 so the example stays fast.

Contract: --data TRAIN --val-data VAL --output DIR; writes DIR/final/adapter.json and
DIR/metrics.json; exit 0 on success, 1 if there is no training data.
"""
import argparse
import collections
import json
import math
import os
import re
import sys

MAX_STEPS = 20
VOCAB_LIMIT = 5000
TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[^\sA-Za-z0-9_]")


def tokens(sample):
    return TOKEN_RE.findall(str(sample.get("output", "")) if isinstance(sample, dict) else "")


def read_jsonl(path):
    samples = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                samples.append(json.loads(line))
    return samples


def nll(counts, total, weight, samples):
    """Mean negative log-likelihood per token of a mix of uniform (over the vocabulary plus one
    slot for unknown tokens) and the observed frequencies, `weight` on the frequencies."""
    uniform = (1.0 - weight) / (len(counts) + 1)
    loss, n = 0.0, 0
    for sample in samples:
        for tok in tokens(sample):
            loss -= math.log(uniform + weight * counts.get(tok, 0) / total)
            n += 1
    return loss / n if n else None


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training JSONL")
    parser.add_argument("--val-data", required=True, help="validation JSONL (may be empty)")
    parser.add_argument("--output", required=True, help="adapter directory to write")
    args = parser.parse_args(argv)

    base_model = os.environ.get("BASE_MODEL", "microsoft/phi-2")
    try:
        steps = int(os.environ.get("TRAIN_STEPS", "10"))
    except ValueError:
        steps = 10
    steps = max(1, min(steps, MAX_STEPS))

    train = read_jsonl(args.data)
    val = read_jsonl(args.val_data) if os.path.exists(args.val_data) else []
    seen = collections.Counter(tok for sample in train for tok in tokens(sample))
    if not train or not seen:
        print("train: no training data in {}".format(args.data), file=sys.stderr)
        return 1
    counts = dict(seen.most_common(VOCAB_LIMIT))
    total = sum(counts.values())

    print("train: base model {}, {} train / {} val samples, {} steps".format(
        base_model, len(train), len(val), steps), flush=True)
    weight = train_loss = 0.0  # steps >= 1: both set by the loop
    for step in range(1, steps + 1):
        # The loss is convex in weight with its minimum at 1 on the training data: it only falls.
        weight = 1.0 - 0.7 ** step
        train_loss = nll(counts, total, weight, train)
        print("step {}/{} loss {:.4f}".format(step, steps, train_loss), flush=True)
    val_loss = nll(counts, total, weight, val)

    final_dir = os.path.join(args.output, "final")
    os.makedirs(final_dir, exist_ok=True)
    write_json(os.path.join(final_dir, "adapter.json"), {
        "kind": "toy-unigram", "base_model": base_model, "weight": weight,
        "round": int(os.environ.get("HEIDI_ROUND", "0") or 0), "vocab": counts})
    metrics = {"train_loss": round(train_loss, 6),
               "val_loss": None if val_loss is None else round(val_loss, 6),
               "steps": steps, "n_train": len(train), "n_val": len(val), "base_model": base_model}
    write_json(os.path.join(args.output, "metrics.json"), metrics)
    print("train: final loss {:.4f}, val loss {}, adapter in {}".format(
        train_loss, "n/a" if val_loss is None else "{:.4f}".format(val_loss), final_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
