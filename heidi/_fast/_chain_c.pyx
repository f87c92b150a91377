# cython: language_level=3, boundscheck=False, wraparound=False
"""Journal lines, compiled twin of `_chain_py`: build a v1.0 line, hash it, check lines strictly.

verify_stream proves most lines valid in one C pass (_jscan.h: canonical form, schema and chain
together, no Python object per line) and hashes them in C (_sha256.h: OpenSSL's SHA-256 where
the build found it); a line the fast path is not sure of is checked as the twin checks it
(orjson.loads + the schema + orjson.dumps), which also names what is wrong.
"""
import hashlib

import orjson

from heidi._fast._chain_types import (EVENT_VERSION, KEYS, LEVELS, MAX_ARTIFACT_CHARS,
                                      MAX_ERROR_CHARS, MAX_LINE_BYTES, MAX_MESSAGE_CHARS,
                                      MAX_NAME_CHARS, MAX_RUN_ID_CHARS, READ_CHUNK_BYTES,
                                      JournalError, artifact_list, clean_str, encode_event,
                                      event_line, nan_literal, new_event, numbers, truncate)

from libc.string cimport memchr, memcpy

cdef extern from "_sha256.h":
    void heidi_sha256_hex(const unsigned char *data, size_t n, char *out) nogil
    const char *HEIDI_SHA256_IMPL

cdef extern from "_jscan.h":
    int heidi_fast_line(const unsigned char *p, size_t n, const char *prev, size_t prev_len,
                        const char *rid, size_t rid_len, const unsigned char **rid_at,
                        size_t *rid_n) nogil
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_Next, PyDict_Size
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.math cimport isfinite

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

__all__ = ["KEYS", "EVENT_VERSION", "LEVELS", "MAX_LINE_BYTES", "MAX_MESSAGE_CHARS",
           "MAX_ERROR_CHARS", "MAX_ARTIFACT_CHARS", "MAX_RUN_ID_CHARS", "MAX_NAME_CHARS",
           "JournalError", "line_hash", "emit_line", "new_event", "event_line", "encode_event", "check_event",
           "parse_line", "check_line", "verify_stream"]
SHA256_IMPL = (<bytes>HEIDI_SHA256_IMPL).decode()  # "openssl" or "portable" (bench, tests)
HIDDEN_IMPORTS = ("hashlib", "orjson", "heidi._fast._chain_types")

# The schema's limits are _chain_types' (one statement each), read into C variables at import.
cdef Py_ssize_t _READ_CHUNK = READ_CHUNK_BYTES
cdef Py_ssize_t C_MAX_LINE = MAX_LINE_BYTES
cdef Py_ssize_t _MAX_MESSAGE = MAX_MESSAGE_CHARS
cdef Py_ssize_t _MAX_ERROR = MAX_ERROR_CHARS
cdef Py_ssize_t _MAX_ARTIFACT = MAX_ARTIFACT_CHARS
cdef Py_ssize_t _MAX_RUN_ID = MAX_RUN_ID_CHARS
cdef Py_ssize_t _MAX_NAME = MAX_NAME_CHARS
cdef str _EVENT_VERSION = EVENT_VERSION
cdef Py_ssize_t _N_KEYS = len(KEYS)
cdef enum:
    _KEYS_CAPACITY = 16  # room in _check_event's values array
if _N_KEYS > _KEYS_CAPACITY:
    raise ImportError(f"_chain_c holds at most {_KEYS_CAPACITY} keys, the schema has {_N_KEYS}")
# Reasons naming a limit, formatted once.
cdef str _BAD_VERSION = f"expected {EVENT_VERSION!r}"
cdef str _BAD_RUN_ID = f"run_id is not 1-{MAX_RUN_ID_CHARS} characters of [A-Za-z0-9._-]"
cdef str _BAD_STAGE = f"stage is not a name of 1-{MAX_NAME_CHARS} characters [A-Za-z0-9_.-]"
cdef str _BAD_EVENT_TYPE = (f"event_type is not a name of 1-{MAX_NAME_CHARS} characters "
                            "[A-Za-z0-9_.-]")
cdef str _BAD_MESSAGE = f"message is not a string of at most {MAX_MESSAGE_CHARS} characters"
cdef str _BAD_ARTIFACT = ("artifact_paths has an entry that is not a string of at most "
                          f"{MAX_ARTIFACT_CHARS} characters")
cdef str _BAD_ERROR = f"error is not null or a string of at most {MAX_ERROR_CHARS} characters"

cdef tuple _KEYS = KEYS
cdef object _LEVELS = LEVELS
cdef object _sha256 = hashlib.sha256
cdef object _loads = orjson.loads
cdef object _dumps = orjson.dumps
cdef object _DecodeError = orjson.JSONDecodeError


# Field formats checked with C loops over the str (the twin uses the equivalent regexes).
cdef inline bint _is_digit(Py_UCS4 c):
    return c >= u'0' and c <= u'9'


cdef bint _ts_ok(str s):
    # 2026-02-20T07:45:38.307Z
    cdef Py_ssize_t i
    cdef Py_UCS4 c
    if len(s) != 24:
        return False
    for i in range(24):
        c = s[i]
        if i == 4 or i == 7:
            if c != u'-':
                return False
        elif i == 10:
            if c != u'T':
                return False
        elif i == 13 or i == 16:
            if c != u':':
                return False
        elif i == 19:
            if c != u'.':
                return False
        elif i == 23:
            if c != u'Z':
                return False
        elif not _is_digit(c):
            return False
    return True


cdef bint _name_ok(str s, Py_ssize_t max_len):
    # 1..max_len characters of [A-Za-z0-9._-]
    cdef Py_ssize_t n = len(s)
    cdef Py_UCS4 c
    if n < 1 or n > max_len:
        return False
    for c in s:
        if not (_is_digit(c) or (c >= u'a' and c <= u'z') or (c >= u'A' and c <= u'Z')
                or c == u'.' or c == u'_' or c == u'-'):
            return False
    return True


cdef bint _hex64_ok(str s):
    cdef Py_UCS4 c
    if len(s) != 64:
        return False
    for c in s:
        if not (_is_digit(c) or (c >= u'a' and c <= u'f')):
            return False
    return True



cdef object _event_line = event_line


# OpenSSL's SHA-256 called from C saves hashlib's object and hexdigest call per line; the
# portable fallback is slower than hashlib's, so without OpenSSL the line goes to hashlib.
cdef bint _C_SHA256 = SHA256_IMPL == "openssl"


cdef inline str _hex_hash(bytes line):
    cdef char out[64]
    if not _C_SHA256:
        return _sha256(line).hexdigest()
    heidi_sha256_hex(<const unsigned char *>PyBytes_AS_STRING(line), <size_t>PyBytes_GET_SIZE(line),
                     out)
    return PyUnicode_DecodeASCII(out, 64, NULL)


def line_hash(bytes line):
    """Lowercase hex SHA-256 of a whole journal line, its newline included."""
    return _hex_hash(line)


cdef object _clean_str = clean_str
cdef object _truncate = truncate
cdef object _numbers_checked = numbers
cdef object _artifact_list = artifact_list
cdef str _BAD_LEVEL_TAIL = ", ".join(sorted(LEVELS))


cdef dict _numbers(str name, object delta):
    """numbers() of _chain_types for a dict of str keys and finite numbers, without a Python
    frame; anything else goes to numbers() itself (which also says what is wrong)."""
    cdef Py_ssize_t pos = 0
    cdef PyObject *key
    cdef PyObject *value
    cdef dict out
    if not delta:
        return {}
    if type(delta) is not dict:
        return _numbers_checked(name, delta)
    out = {}
    while PyDict_Next(delta, &pos, &key, &value):
        if type(<object>key) is not str:
            return _numbers_checked(name, delta)
        if type(<object>value) is float:
            if not isfinite(<double><object>value):
                return _numbers_checked(name, delta)
        elif type(<object>value) is not int:
            return _numbers_checked(name, delta)
        out[<object>key] = <object>value
    return out


def emit_line(ts, run_id, round_, stage, level, event_type, message, counters_delta,
              usage_delta, artifact_paths, error, prev_hash, redact):
    """A new event as JournalWriter.emit writes it: (the event, its line, the line's hash).

    What the pure twin does, the common case (ASCII text, no error, no paths, deltas of str
    keys) without a Python frame; the dict has new_event's keys in KEYS order (test_twins
    compares the two), the line is event_line's."""
    if level not in _LEVELS:
        raise ValueError(f"level {level!r}: must be one of {_BAD_LEVEL_TAIL}")
    if not (type(message) is str and PyUnicode_IS_ASCII(message)):
        message = _clean_str(message)
    message = redact(message)
    if len(message) > _MAX_MESSAGE:
        message = _truncate(message, _MAX_MESSAGE)
    if error is not None:
        error = _truncate(redact(_clean_str(str(error))), _MAX_ERROR)
    cdef dict event = {
        "event_version": _EVENT_VERSION, "ts": ts, "run_id": run_id, "round": round_,
        "stage": stage, "level": level, "event_type": event_type, "message": message,
        "counters_delta": _numbers("counters_delta", counters_delta),
        "usage_delta": _numbers("usage_delta", usage_delta),
        "artifact_paths": _artifact_list(artifact_paths, redact) if artifact_paths else [],
        "error": error, "prev_hash": prev_hash,
    }
    cdef bytes line = _event_line(event)
    return event, line, _hex_hash(line)


cdef inline bint _is_number(object value):
    return type(value) is int or type(value) is float


cdef str _key_problem(dict d):
    """Why the keys of d are not exactly KEYS in order (the slow path's message)."""
    for key in d:
        if key not in _KEYS:
            return f"unknown key {key!r}"
    for key in _KEYS:
        if key not in d:
            return f"missing key {key!r}"
    return "keys out of order"


cdef str _delta_problem(object delta, str key):
    cdef PyObject *k
    cdef PyObject *v
    cdef Py_ssize_t pos = 0
    if type(delta) is not dict:
        return f"{key} is not an object"
    while PyDict_Next(<dict>delta, &pos, &k, &v):
        if not _is_number(<object>v):
            return f"{key} has a value that is not a number"
    return None


cdef str _check_event(object obj, str expected_prev, str run_id):
    cdef dict d
    cdef PyObject *k
    cdef PyObject *v
    cdef PyObject *values[_KEYS_CAPACITY]
    cdef Py_ssize_t pos = 0, i = 0
    if type(obj) is not dict:
        return "not a JSON object"
    d = <dict>obj
    if PyDict_Size(d) != _N_KEYS:
        return _key_problem(d)
    # One walk over the dict: its keys must be KEYS in order, and then its values come in the
    # schema's order too (no lookups by key).
    while PyDict_Next(d, &pos, &k, &v):
        key = <object>k
        if key is not _KEYS[i] and key != _KEYS[i]:
            return _key_problem(d)
        values[i] = v
        i += 1
    if <object>values[0] != _EVENT_VERSION:
        return f"event_version {<object>values[0]!r}, {_BAD_VERSION}"
    ts = <object>values[1]
    if type(ts) is not str or not _ts_ok(<str>ts):
        return "ts is not a UTC timestamp like 2026-02-20T07:45:38.307Z"
    rid = <object>values[2]
    if type(rid) is not str or not _name_ok(<str>rid, _MAX_RUN_ID):
        return _BAD_RUN_ID
    if run_id is not None and rid != run_id:
        return f"run_id {rid!r} differs from the journal's run {run_id!r}"
    rnd = <object>values[3]
    if type(rnd) is not int or rnd < 0:
        return "round is not a non-negative integer"
    value = <object>values[4]
    if type(value) is not str or not _name_ok(<str>value, _MAX_NAME):
        return _BAD_STAGE
    value = <object>values[6]
    if type(value) is not str or not _name_ok(<str>value, _MAX_NAME):
        return _BAD_EVENT_TYPE
    if <object>values[5] not in _LEVELS:
        return "level is not one of info, warn, error, success, critical"
    msg = <object>values[7]
    if type(msg) is not str or len(<str>msg) > _MAX_MESSAGE:
        return _BAD_MESSAGE
    problem = _delta_problem(<object>values[8], "counters_delta")
    if problem is None:
        problem = _delta_problem(<object>values[9], "usage_delta")
    if problem is not None:
        return problem
    paths = <object>values[10]
    if type(paths) is not list:
        return "artifact_paths is not an array"
    for path in <list>paths:
        if type(path) is not str or len(<str>path) > _MAX_ARTIFACT:
            return _BAD_ARTIFACT
    err = <object>values[11]
    if err is not None and (type(err) is not str or len(<str>err) > _MAX_ERROR):
        return _BAD_ERROR
    prev = <object>values[12]
    if type(prev) is not str:
        return "prev_hash is not a string"
    if expected_prev is None:
        if prev != rid:
            return "first event's prev_hash is not its run_id (wrong genesis)"
    elif prev != expected_prev:
        if not _hex64_ok(<str>prev):
            return "prev_hash is not a lowercase hex SHA-256"
        return ("prev_hash does not match the previous line (chain broken: that line was changed, "
                "or lines were deleted, swapped or inserted before this one)")
    return None


def check_event(obj, expected_prev, run_id):
    """Reason why a parsed line is not a valid v1.0 event, or None when it is."""
    return _check_event(obj, expected_prev, run_id)


cdef tuple _parse(bytes line):
    cdef Py_ssize_t size = PyBytes_GET_SIZE(line)
    if size > C_MAX_LINE:
        return None, f"line longer than {C_MAX_LINE} bytes"
    if size == 0 or PyBytes_AS_STRING(line)[size - 1] != b'\n':
        return None, "last line is cut off (no newline)"
    try:
        obj = _loads(line)
    except _DecodeError as exc:
        text = str(exc)
        if "UTF-8" in text or "utf-8" in text or "surrogate" in text:
            return None, "invalid UTF-8"
        if nan_literal(line):
            return None, "NaN/Infinity is not valid JSON"
        return None, f"invalid JSON ({text})"
    canon = <bytes>_dumps(obj)
    if PyBytes_GET_SIZE(canon) != size - 1 or canon != line[:size - 1]:
        return None, "not in canonical form (extra whitespace, other escaping or duplicate keys)"
    return obj, None


def parse_line(bytes line):
    """(parsed object, None) or (None, reason) for one line including its newline."""
    return _parse(line)


def check_line(bytes line, expected_prev, run_id=None):
    """Parse and check one line; raise ValueError(reason) when it is not a valid event."""
    obj, reason = _parse(line)
    if reason is None:
        reason = _check_event(obj, expected_prev, run_id)
    if reason is not None:
        raise ValueError(reason)
    return obj


def verify_stream(stream, Py_ssize_t line_no=0, prev_hash=None, run_id=None):
    """Check every line of a journal read from stream; return (events, head hash, run id).

    Streams in chunks (the file is never loaded whole). Raises JournalError naming the first
    bad line. line_no/prev_hash/run_id let a caller continue from a known position.
    """
    cdef bytes buf = b""
    cdef bytes line, prev_b, rid_b = None
    cdef str rid = run_id
    cdef const unsigned char *base
    cdef const unsigned char *nl
    cdef const unsigned char *rid_at = NULL
    cdef size_t rid_n = 0
    cdef Py_ssize_t size, start, n
    cdef char head_hex[64]
    cdef char prev_buf[256]
    cdef const char *prev = NULL   # what the next line must chain on; NULL: the genesis
    cdef size_t prev_len = 0
    cdef bint have_head = False     # head_hex holds the last line's hash
    if prev_hash is not None:
        prev_b = (<str>prev_hash).encode("utf-8", "surrogatepass")
        if len(prev_b) > 256:
            prev_b = prev_b[:256]  # cannot match a line's prev_hash: the slow path says why
        memcpy(prev_buf, <const char *>prev_b, len(prev_b))
        prev, prev_len = prev_buf, len(prev_b)
    if rid is not None:
        rid_b = rid.encode("utf-8", "surrogatepass")
    while True:
        chunk = stream.read(_READ_CHUNK)
        if not chunk:
            break
        buf = buf + chunk if buf else bytes(chunk)
        base = <const unsigned char *>PyBytes_AS_STRING(buf)
        size = PyBytes_GET_SIZE(buf)
        start = 0
        while start < size:
            nl = <const unsigned char *>memchr(base + start, b'\n', size - start)
            if nl == NULL:
                break
            n = (nl - base) - start + 1
            line_no += 1
            if n <= C_MAX_LINE and heidi_fast_line(
                    base + start, n, prev, prev_len,
                    <const char *>rid_b if rid_b is not None else NULL,
                    len(rid_b) if rid_b is not None else 0, &rid_at, &rid_n):
                if rid_b is None:
                    rid_b = PyBytes_FromStringAndSize(<const char *>rid_at, rid_n)
                    rid = rid_b.decode("ascii")
            else:
                # the fast path is not sure: check this line as the pure twin does
                line = PyBytes_FromStringAndSize(<const char *>base + start, n)
                obj, reason = _parse(line)
                if reason is None:
                    reason = _check_event(
                        obj, (<bytes>prev[:prev_len]).decode("utf-8", "surrogatepass")
                        if prev != NULL else None, rid)
                if reason is not None:
                    raise JournalError(line_no, reason)
                if rid is None:
                    rid = (<dict>obj)["run_id"]
                    rid_b = rid.encode("utf-8", "surrogatepass")
            heidi_sha256_hex(base + start, n, head_hex)
            prev, prev_len, have_head = head_hex, 64, True
            start = (nl - base) + 1
        buf = buf[start:]
        if PyBytes_GET_SIZE(buf) > C_MAX_LINE:
            raise JournalError(line_no + 1, f"line longer than {C_MAX_LINE} bytes")
    if buf:
        _, reason = _parse(buf)
        raise JournalError(line_no + 1, reason or "last line is cut off (no newline)")
    if have_head:
        return line_no, PyBytes_FromStringAndSize(head_hex, 64).decode("ascii"), rid
    return line_no, prev_hash, rid
