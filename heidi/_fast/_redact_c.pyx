# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Secret redaction, compiled twin of _redact_py: same API, same output for every input.

One C pass over the str finds every rule keyword per line; only lines holding a keyword see a regex.
"""
import os
import re

from heidi._fast import _redact_rules as _rules

from cpython.unicode cimport PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memset

cdef extern from "Python.h":
    # A no-op on 3.12+; on 3.11 a legacy (wchar) str has no canonical data until it is readied.
    int PyUnicode_READY(object o) except -1

# Imports made here are invisible to PyInstaller: packaging lists these as hidden imports.
HIDDEN_IMPORTS = ("os", "re", "heidi._fast._redact_rules")

__all__ = ("RULE_NAMES", "Redactor", "default_redactor", "redact", "reset_default_redactor")

RULE_NAMES = tuple(rule[0] for rule in _rules.RULES)

cdef enum:
    MAX_RULES = 64       # a line's rule set is one uint64 bit mask
    MAX_KEYWORDS = 255   # bucket ids are uint8, 0 meaning "no keyword starts here"
    MAX_KEYWORD_CHARS = 32

# Keyword tables, filled once at import from _rules.RULES. Keywords are lowercase ASCII, so any
# char >= 128 never matches and folding is a 128-entry table.
cdef uint8_t _LOWER[128]
cdef uint8_t _CHAR_CLASS[128]            # 1: lowercases to a keyword's first char; 2: "\n"
cdef uint8_t _PAIR_BUCKET[128 * 128]     # (lower c0, lower c1) -> 1 + bucket of keywords
cdef uint16_t _BUCKET_START[MAX_KEYWORDS + 1]
cdef uint16_t _BUCKET_COUNT[MAX_KEYWORDS + 1]
cdef uint8_t _KEYWORD[MAX_KEYWORDS][MAX_KEYWORD_CHARS]
cdef Py_ssize_t _KEYWORD_LEN[MAX_KEYWORDS]
cdef uint64_t _KEYWORD_RULES[MAX_KEYWORDS]  # the rules a keyword lets through
cdef uint64_t _MULTILINE_MASK = 0
cdef uint64_t _LINE_MASK = 0
cdef int _N_RULES = 0
cdef int _FIRST_LINE_RULE = 0
cdef list _PATTERNS = []
cdef list _TEMPLATES = []


cdef _build_tables():
    global _MULTILINE_MASK, _LINE_MASK, _N_RULES, _FIRST_LINE_RULE
    cdef int i, c, k, bucket, n_buckets
    rules = _rules.RULES
    if len(rules) > MAX_RULES:
        raise ValueError(f"_redact_rules.RULES: {len(rules)} rules, at most {MAX_RULES} fit a mask")
    keyword_rules = {}
    for i, (name, placeholder, keywords, pattern, flags) in enumerate(rules):
        multiline = name in _rules.MULTILINE_RULES
        if multiline and i != _FIRST_LINE_RULE:
            raise ValueError(f"_redact_rules.RULES: multi-line rule {name!r} must come first")
        if multiline:
            _FIRST_LINE_RULE = i + 1
            _MULTILINE_MASK |= (<uint64_t>1) << i
        else:
            _LINE_MASK |= (<uint64_t>1) << i
        regex = re.compile(pattern, flags)
        template = placeholder
        if "pre" in regex.groupindex:
            template = r"\g<pre>" + template
        if "post" in regex.groupindex:
            template += r"\g<post>"
        _PATTERNS.append(regex)
        _TEMPLATES.append(template)
        for keyword in keywords:
            if (not keyword.isascii() or keyword != keyword.lower()
                    or not 2 <= len(keyword) <= MAX_KEYWORD_CHARS):
                raise ValueError(f"_redact_rules.RULES: rule {name!r} keyword {keyword!r} must be "
                                 f"lowercase ASCII of 2..{MAX_KEYWORD_CHARS} chars")
            keyword_rules[keyword] = keyword_rules.get(keyword, 0) | (1 << i)
    _N_RULES = len(rules)
    if len(keyword_rules) > MAX_KEYWORDS:
        raise ValueError(f"_redact_rules.RULES: {len(keyword_rules)} keywords, at most {MAX_KEYWORDS}")

    for c in range(128):
        _LOWER[c] = c + 32 if 65 <= c <= 90 else c
    memset(_CHAR_CLASS, 0, sizeof(_CHAR_CLASS))
    memset(_PAIR_BUCKET, 0, sizeof(_PAIR_BUCKET))
    # Keywords sorted by their first two chars: each pair's keywords are one contiguous bucket.
    ordered = sorted(keyword_rules)
    n_buckets = 0
    for k, keyword in enumerate(ordered):
        data = keyword.encode("ascii")
        for i in range(len(data)):
            _KEYWORD[k][i] = data[i]
        _KEYWORD_LEN[k] = len(data)
        _KEYWORD_RULES[k] = keyword_rules[keyword]
        pair = (data[0] << 7) | data[1]
        if _PAIR_BUCKET[pair] == 0:
            _BUCKET_START[n_buckets] = k
            _BUCKET_COUNT[n_buckets] = 0
            n_buckets += 1
            _PAIR_BUCKET[pair] = n_buckets
        _BUCKET_COUNT[_PAIR_BUCKET[pair] - 1] += 1
        for c in range(128):
            if _LOWER[c] == data[0]:
                _CHAR_CLASS[c] = 1
    _CHAR_CLASS[10] = 2


_build_tables()


ctypedef fused char_t:
    uint8_t
    uint16_t
    uint32_t


cdef uint64_t _scan(const char_t* data, Py_ssize_t n, list hits) except? 0xFFFFFFFFFFFFFFFF:
    """Bit mask of the rules with a keyword in data; with `hits`, append (start, end, mask) for
    each line (end excludes "\\n") that has one."""
    cdef Py_ssize_t i, j, k, stop, length, line_start = 0
    cdef uint64_t line_mask = 0, all_mask = 0
    cdef uint32_t c, c1
    cdef uint8_t cls, bucket
    for i in range(n):
        c = data[i]
        if c >= 128:
            continue
        cls = _CHAR_CLASS[c]
        if cls == 0:
            continue
        if cls == 2:
            if line_mask:
                if hits is not None:
                    hits.append((line_start, i, line_mask))
                all_mask |= line_mask
                line_mask = 0
            line_start = i + 1
            continue
        if i + 1 >= n:
            continue
        c1 = data[i + 1]
        if c1 >= 128:
            continue
        bucket = _PAIR_BUCKET[(_LOWER[c] << 7) | _LOWER[c1]]
        if bucket == 0:
            continue
        k = _BUCKET_START[bucket - 1]
        stop = k + _BUCKET_COUNT[bucket - 1]
        while k < stop:
            length = _KEYWORD_LEN[k]
            # Skip keywords whose rules this line already lets through.
            if (_KEYWORD_RULES[k] & ~line_mask) and i + length <= n:
                j = 2
                while j < length:
                    c1 = data[i + j]
                    if c1 >= 128 or _LOWER[c1] != _KEYWORD[k][j]:
                        break
                    j += 1
                if j == length:
                    line_mask |= _KEYWORD_RULES[k]
            k += 1
    if line_mask:
        if hits is not None:
            hits.append((line_start, n, line_mask))
        all_mask |= line_mask
    return all_mask


cdef uint64_t _scan_str(object text, list hits) except? 0xFFFFFFFFFFFFFFFF:
    PyUnicode_READY(text)
    cdef int kind = PyUnicode_KIND(text)
    cdef void* data = PyUnicode_DATA(text)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    if kind == 1:
        return _scan(<const uint8_t*>data, n, hits)
    if kind == 2:
        return _scan(<const uint16_t*>data, n, hits)
    return _scan(<const uint32_t*>data, n, hits)


cdef object _apply_rules(object text, uint64_t mask, int first, int stop):
    """Rules first..stop-1 in order, each only if its bit is in mask (the keyword scan)."""
    cdef int r
    cdef Py_ssize_t count
    for r in range(first, stop):
        if (mask >> r) & 1:
            new_text, count = (<object>_PATTERNS[r]).subn(_TEMPLATES[r], text)
            if count:
                text = new_text
                # A placeholder can bring a later rule's keyword in ("[GITHUB_TOKEN]" has "token").
                mask = _scan_str(text, None)
    return text


cdef object _redact_rules_text(object text):
    # `object`, not `str`: a str subclass is accepted and, when clean, returned as itself.
    cdef list hits = []
    cdef uint64_t all_mask = _scan_str(text, hits)
    cdef Py_ssize_t start, end, pos
    cdef uint64_t mask
    cdef list pieces
    if all_mask == 0:
        return text
    if all_mask & _MULTILINE_MASK:
        new_text = _apply_rules(text, all_mask, 0, _FIRST_LINE_RULE)
        if new_text is not text:
            text = new_text
            hits = []
            all_mask = _scan_str(text, hits)
    if not (all_mask & _LINE_MASK):
        return text
    # Line rules never match across "\n", so each line holding a keyword is redacted alone and
    # every other line is copied through untouched.
    pieces = []
    pos = 0
    for start, end, mask in hits:
        if not (mask & _LINE_MASK):
            continue
        line = text[start:end]
        new_line = _apply_rules(line, mask, _FIRST_LINE_RULE, _N_RULES)
        if new_line is not line:
            pieces.append(text[pos:start])
            pieces.append(new_line)
            pos = end
    if not pieces:
        return text
    pieces.append(text[pos:])
    return "".join(pieces)


_ANSI = re.compile(_rules.ANSI_PATTERN)
cdef str _ENV_PLACEHOLDER = _rules.ENV_PLACEHOLDER

# The prefilter of environment secrets: a Redactor keeps each gate's (_rules.EnvSecrets) first
# ANCHOR_CHARS characters as one uint64 window (the low 8 bits of each char) and a bit at its
# hash. A text in which no window of that many characters is one of them holds no gate, hence no
# form, and skips the literal search. Only an optimisation: a hit runs the pure twin's loop.
cdef enum:
    ANCHOR_CHARS = 8             # every gate is at least as long (ENV_MIN_VALUE_CHARS)
    ANCHOR_BYTES = 8192          # 65536 bits: the exact check runs for few windows


cdef inline uint32_t _anchor_hash(uint64_t window):
    return <uint32_t>((window * <uint64_t>0x9E3779B97F4A7C15ULL) >> 48)


cdef bint _anchor_hit(const char_t* data, Py_ssize_t n, const uint8_t* bits,
                      const uint64_t* anchors, Py_ssize_t n_anchors):
    cdef uint64_t window = 0
    cdef uint32_t h
    cdef Py_ssize_t i, k
    for i in range(n):
        window = (window << 8) | (data[i] & 0xFF)
        if i >= ANCHOR_CHARS - 1:
            h = _anchor_hash(window)
            if bits[h >> 3] & (1 << (h & 7)):
                for k in range(n_anchors):
                    if anchors[k] == window:
                        return True
    return False


cdef bint _anchor_hit_str(object text, const uint8_t* bits, const uint64_t* anchors,
                          Py_ssize_t n_anchors) except -1:
    PyUnicode_READY(text)
    cdef int kind = PyUnicode_KIND(text)
    cdef void* data = PyUnicode_DATA(text)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    if kind == 1:
        return _anchor_hit(<const uint8_t*>data, n, bits, anchors, n_anchors)
    if kind == 2:
        return _anchor_hit(<const uint16_t*>data, n, bits, anchors, n_anchors)
    return _anchor_hit(<const uint32_t*>data, n, bits, anchors, n_anchors)


cdef class Redactor:
    """Replaces secrets in text with placeholders naming their kind ([GITHUB_TOKEN], [SECRET] ...).

    `env` (default os.environ, read now) supplies literal secrets: the values of variables whose
    names look secret (HF_TOKEN, DB_PASS, X_KEY_B64 ...) become [ENV_SECRET] anywhere, and so
    do their base64, hex and percent-encoded forms (_redact_rules.encoded_forms).
    """

    cdef tuple _env_forms
    cdef bint _env_any         # there are forms to look for
    cdef bint _env_always      # a gate shorter than a window: no prefilter, always look
    cdef uint8_t _anchor_bits[ANCHOR_BYTES]
    cdef uint64_t* _anchors
    cdef Py_ssize_t _n_anchors

    def __cinit__(self):
        self._anchors = NULL
        self._n_anchors = 0

    def __dealloc__(self):
        PyMem_Free(self._anchors)

    def __init__(self, env=None):
        cdef uint64_t window
        cdef uint32_t h
        secrets = _rules.env_secrets(os.environ if env is None else env)
        self._env_forms = secrets.forms
        self._env_any = len(secrets.forms) > 0
        self._env_always = False
        memset(self._anchor_bits, 0, sizeof(self._anchor_bits))
        PyMem_Free(self._anchors)
        self._n_anchors = 0
        self._anchors = <uint64_t*>PyMem_Malloc(max(1, len(secrets.gates)) * sizeof(uint64_t))
        if self._anchors == NULL:
            raise MemoryError()
        for gate in secrets.gates:
            if len(gate) < ANCHOR_CHARS:
                self._env_always = True
                continue
            window = 0
            for ch in gate[:ANCHOR_CHARS]:
                window = (window << 8) | (<uint64_t>ord(ch) & 0xFF)
            h = _anchor_hash(window)
            self._anchor_bits[h >> 3] |= <uint8_t>(1 << (h & 7))
            self._anchors[self._n_anchors] = window
            self._n_anchors += 1

    def redact(self, text):
        """`text` with ANSI escapes stripped and every secret replaced; clean text is returned as is."""
        if not isinstance(text, str):
            raise TypeError(f"redact() takes str, not {type(text).__name__}")
        if "\x1b" in text:
            text = _ANSI.sub("", text)
        if self._env_any and (self._env_always or _anchor_hit_str(
                text, self._anchor_bits, self._anchors, self._n_anchors)):
            for value in self._env_forms:
                if value in text:
                    text = text.replace(value, _ENV_PLACEHOLDER)
        return _redact_rules_text(text)


_default = None


def default_redactor():
    """The Redactor built from os.environ on first use, then cached."""
    global _default
    redactor = _default
    if redactor is None:
        redactor = _default = Redactor()
    return redactor


def reset_default_redactor():
    """Forget the cached default Redactor (the environment changed); the next use rebuilds it."""
    global _default
    _default = None


def redact(text):
    """`text` redacted by the default Redactor (environment secrets from os.environ)."""
    return default_redactor().redact(text)
