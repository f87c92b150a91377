"""Built-in code tasks for `heidi generate` without --prompts: completion, bug fixing and
refactoring of small Python functions, each with its tests, drawn deterministically from the seed
and the round. Each task also knows a reference answer, which the mock teacher gives back.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KINDS = ("completion", "bugfix", "refactor")
SYSTEM_PROMPT = ("You write training data for a code model. Answer with the complete Python "
                 "function in a single ```python code block, then nothing else.")

# (name stem, argument, what it does with {k}, return expression, test arguments for k)
FAMILIES: tuple[tuple[str, str, str, str, object], ...] = (
    ("add", "x", "returns x plus {k}", "x + {k}", lambda k: [1, -k, 10]),
    ("scale", "x", "multiplies x by {k}", "x * {k}", lambda k: [2, 0, -3]),
    ("clamp", "x", "limits x to the range 0..{k}", "max(0, min({k}, x))", lambda k: [-5, k + 7, k // 2]),
    ("is_multiple_of", "n", "tells whether n is a multiple of {k}", "n % {k} == 0",
     lambda k: [k * 3, k * 3 + 1, 0]),
    ("repeat", "s", "returns the string s repeated {k} times", "s * {k}", lambda k: ["ab", ""]),
    ("take", "items", "returns the first {k} elements of a list as a new list", "list(items[:{k}])",
     lambda k: [list(range(k + 3)), []]),
    ("pad", "s", "left-pads s with zeros to {k} characters", "s.rjust({k}, '0')",
     lambda k: ["7", "x" * (k + 1)]),
    ("power", "x", "returns x raised to the power {k}", "x ** {k}", lambda k: [2, 1, 0]),
    ("count_above", "items", "counts the numbers in a list that are greater than {k}",
     "sum(1 for v in items if v > {k})", lambda k: [[k - 1, k, k + 1, k + 5], []]),
)


@dataclass(frozen=True)
class Task:
    """One built-in prompt: what the teacher is asked, and the answer a perfect teacher gives."""

    kind: str
    instruction: str
    input: str
    reference: str      # the correct function, source code
    tests: str          # assert lines


def _fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _function(name: str, arg: str, doc: str, body: str) -> str:
    return f'def {name}({arg}):\n    """{doc[0].upper()}{doc[1:]}."""\n{body}'


def make_task(seed: int, round_: int, index: int) -> Task:
    """The index-th built-in task of a round; the same (seed, round, index) gives the same task."""
    rng = random.Random(f"heidi-task:{seed}:{round_}:{index}")
    stem, arg, what, expr, cases = FAMILIES[rng.randrange(len(FAMILIES))]
    k = rng.randint(2, 40)
    kind = KINDS[rng.randrange(len(KINDS))]
    # The index keeps names distinct, so two tasks never share a function.
    name = f"{stem}_{k}_v{index}"
    doc = what.format(k=k)
    correct_expr = expr.format(k=k)
    reference = _function(name, arg, doc, f"    return {correct_expr}\n")
    namespace: dict = {}
    exec(compile(reference, f"<task {name}>", "exec"), namespace)  # our own template, not input
    func = namespace[name]
    tests = "".join(f"assert {name}({a!r}) == {func(a)!r}\n" for a in cases(k))  # type: ignore[operator]
    if kind == "completion":
        stub = _function(name, arg, doc, "    raise NotImplementedError\n")
        instruction = f"Complete the Python function `{name}` so that it {doc} and the tests pass."
        given = stub
    elif kind == "bugfix":
        given = _function(name, arg, doc, f"    return {_bug(correct_expr, rng)}\n")
        instruction = f"The function `{name}` should {_verb(doc)}, but it has a bug. Fix it."
    else:
        given = _function(name, arg, doc, f"    value = {correct_expr}\n    result = value\n"
                          "    if result is not None:\n        return result\n    return result\n")
        instruction = f"Refactor `{name}` into a clear one-line body without changing what it does."
    task_input = f"{_fence(given)}\n\nTests:\n{_fence(tests)}"
    return Task(kind, instruction, task_input, reference, tests)


def _verb(doc: str) -> str:
    # "returns x plus 3" -> "return x plus 3"; "tells whether ..." -> "tell whether ..."
    first, _, rest = doc.partition(" ")
    return (first[:-1] if first.endswith("s") else first) + " " + rest


def _bug(expr: str, rng: random.Random) -> str:
    """A plausible bug: an off-by-one or a flipped comparison."""
    for old, new in ((" > ", " >= "), (" == ", " != "), ("min(", "max(")):
        if old in expr:
            return expr.replace(old, new, 1)
    return f"({expr}) + 1" if rng.random() < 0.5 else f"({expr}) - 1"


def user_content(instruction: str, task_input: str) -> str:
    """What the teacher is sent for a sample: the instruction, then its input if any."""
    return f"{instruction}\n\n{task_input}" if task_input else instruction


class MockTeacher:
    """Replies for MockProvider that answer built-in tasks from their reference solutions, the
    way a good but imperfect teacher would: about one answer in ten carries a bug and about one in
    twenty a (fake) leaked credential, so validation and the test gate have work to do."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.answers: dict[str, str] = {}

    def add(self, task: Task, index: int, round_: int) -> None:
        rng = random.Random(f"heidi-mock-teacher:{self.seed}:{round_}:{index}")
        roll = rng.random()
        code = task.reference
        if roll < 0.1:
            code = code.replace("    return ", "    return 1 + ", 1)
        elif roll < 0.15:
            # Built by concatenation so no credential-shaped literal sits in this file.
            code = f'API_TOKEN = "{"ghp_" + "x" * 36}"\n\n{code}'
        self.answers[user_content(task.instruction, task.input)] = _fence(code)

    def __call__(self, messages: Sequence[Mapping[str, str]]) -> str | None:
        last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        return self.answers.get(last)
