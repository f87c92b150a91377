"""Secret redaction, pure-Python twin of _redact_c: same API, same output for every input.

A rule's regex runs only when one of its keywords occurs in the lowercased text (_redact_rules).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

from heidi._fast import _redact_rules as _rules

__all__ = ("RULE_NAMES", "Redactor", "default_redactor", "redact", "reset_default_redactor")

RULE_NAMES: tuple[str, ...] = tuple(rule[0] for rule in _rules.RULES)


_GATE_CHARS = 3


def _compile(rule: tuple[str, str, tuple[str, ...], str, int]
             ) -> tuple[re.Pattern[str], str, tuple[tuple[str, tuple[str, ...]], ...]]:
    _name, placeholder, keywords, pattern, flags = rule
    regex = re.compile(pattern, flags)
    template = placeholder
    if "pre" in regex.groupindex:
        template = r"\g<pre>" + template
    if "post" in regex.groupindex:
        template += r"\g<post>"
    # Keywords grouped by their first chars: one absent gate rules out its whole group ("tok"
    # stands for "token=", "token:", ...), so clean text costs a few searches per rule, not dozens.
    gates: dict[str, list[str]] = {}
    for keyword in keywords:
        gates.setdefault(keyword[:_GATE_CHARS], []).append(keyword)
    return regex, template, tuple((gate, tuple(group)) for gate, group in gates.items())


_COMPILED = tuple(_compile(rule) for rule in _rules.RULES)
_ANSI = re.compile(_rules.ANSI_PATTERN)


def _any_keyword(gates: tuple[tuple[str, tuple[str, ...]], ...], lowered: str) -> bool:
    for gate, keywords in gates:
        if gate in lowered:
            for keyword in keywords:
                if keyword in lowered:
                    return True
    return False


class Redactor:
    """Replaces secrets in text with placeholders naming their kind ([GITHUB_TOKEN], [SECRET] ...).

    `env` (default os.environ, read now) supplies literal secrets: the values of variables whose
    names look secret (HF_TOKEN, DB_PASS, X_KEY_B64 ...) become [ENV_SECRET] anywhere, and so
    do their base64, hex and percent-encoded forms (_redact_rules.encoded_forms).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        secrets = _rules.env_secrets(os.environ if env is None else env)
        self._env_forms = secrets.forms
        self._env_gates = secrets.gates

    def redact(self, text: str) -> str:
        """`text` with ANSI escapes stripped and every secret replaced; clean text is returned as is."""
        if not isinstance(text, str):
            raise TypeError(f"redact() takes str, not {type(text).__name__}")
        if "\x1b" in text:
            text = _ANSI.sub("", text)
        # One C-level pass over the gates (map, not a Python loop): most texts hold none.
        if self._env_gates and any(map(text.__contains__, self._env_gates)):
            for value in self._env_forms:
                if value in text:
                    text = text.replace(value, _rules.ENV_PLACEHOLDER)
        lowered = text.lower()
        for regex, template, gates in _COMPILED:
            if not _any_keyword(gates, lowered):
                continue
            new_text, count = regex.subn(template, text)
            if count:
                # A placeholder can bring a later rule's keyword in ("[GITHUB_TOKEN]" has "token").
                text = new_text
                lowered = text.lower()
        return text


_default: Redactor | None = None


def default_redactor() -> Redactor:
    """The Redactor built from os.environ on first use, then cached."""
    global _default
    redactor = _default
    if redactor is None:
        redactor = _default = Redactor()
    return redactor


def reset_default_redactor() -> None:
    """Forget the cached default Redactor (the environment changed); the next use rebuilds it."""
    global _default
    _default = None


def redact(text: str) -> str:
    """`text` redacted by the default Redactor (environment secrets from os.environ)."""
    return default_redactor().redact(text)
