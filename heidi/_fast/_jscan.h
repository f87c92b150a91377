/* One pass over a journal line that proves it valid without parsing it into Python objects: the
 * compiled verify loop's fast path (_chain_c.verify_stream).
 *
 * heidi_fast_line() returns 1 only when the line is a schema v1.0 event in exactly the canonical
 * form orjson writes (keys in order, compact, orjson's escaping and number format), every field
 * within its limits, chained on `prev`. It returns 0 whenever it is not sure -- a float it cannot
 * prove canonical, an unusual escape, anything wrong -- and the caller then checks that line the
 * slow way (orjson.loads + the schema + orjson.dumps), which also names what is wrong. So this
 * code only has to be right when it says yes.
 */
#ifndef HEIDI_JSCAN_H
#define HEIDI_JSCAN_H

#include <stddef.h>
#include <string.h>

typedef struct {
    const unsigned char *p;   /* next byte */
    const unsigned char *end; /* one past the line's last byte (its newline) */
} heidi_scan;

static int hs_lit(heidi_scan *s, const char *lit, size_t n)
{
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, lit, n) != 0)
        return 0;
    s->p += n;
    return 1;
}

#define HS_LIT(s, lit) hs_lit((s), (lit), sizeof(lit) - 1)

static int hs_is_name_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
        || c == '.' || c == '_' || c == '-';
}

/* 1..max characters of [A-Za-z0-9._-] and the closing quote; start and len: where the name is */
static int hs_name(heidi_scan *s, size_t max, const unsigned char **start, size_t *len)
{
    const unsigned char *q = s->p;
    while (q < s->end && hs_is_name_char(*q))
        q++;
    if (q == s->p || (size_t)(q - s->p) > max || q >= s->end || *q != '"')
        return 0;
    if (start) {
        *start = s->p;
        *len = (size_t)(q - s->p);
    }
    s->p = q + 1;
    return 1;
}

/* One UTF-8 sequence starting at q (a byte >= 0x80), strictly: no overlong forms, no
 * surrogates, nothing above U+10FFFF. Its length, or 0. */
static size_t hs_utf8(const unsigned char *q, const unsigned char *end)
{
    unsigned char c = q[0], lo = 0x80, hi = 0xBF;
    size_t n, i;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    if ((size_t)(end - q) < n || q[1] < lo || q[1] > hi)
        return 0;
    for (i = 2; i < n; i++)
        if (q[i] < 0x80 || q[i] > 0xBF)
            return 0;
    return n;
}

static int hs_hex_lower(unsigned char c)
{
    return (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
}

/* The rest of a string after its opening quote, escaped exactly as orjson escapes: at most max
 * characters (code points, as Python counts them), and the closing quote. */
static int hs_string(heidi_scan *s, size_t max)
{
    const unsigned char *q = s->p, *end = s->end;
    size_t chars = 0;
    while (q < end) {
        unsigned char c = *q;
        if (c == '"') {
            s->p = q + 1;
            return chars <= max;
        }
        if (c == '\\') {
            if (end - q < 2)
                return 0;
            c = q[1];
            if (c == '"' || c == '\\' || c == 'b' || c == 't' || c == 'n' || c == 'f' || c == 'r') {
                q += 2;
            } else if (c == 'u') {
                /* orjson writes \u00XX (lowercase) for control characters without a short form */
                int h, l, v;
                if (end - q < 6 || q[2] != '0' || q[3] != '0')
                    return 0;
                h = hs_hex_lower(q[4]);
                l = hs_hex_lower(q[5]);
                if (h < 0 || l < 0)
                    return 0;
                v = h * 16 + l;
                if (v >= 0x20 || v == 0x08 || v == 0x09 || v == 0x0a || v == 0x0c || v == 0x0d)
                    return 0;
                q += 6;
            } else {
                return 0;
            }
        } else if (c < 0x20) {
            return 0;
        } else if (c < 0x80) {
            q++;
        } else {
            size_t n = hs_utf8(q, end);
            if (!n)
                return 0;
            q += n;
        }
        chars++;
    }
    return 0;
}

/* A number exactly as orjson writes it back: 1 (an integer that fits 64 bits), or a float in
 * plain decimal notation whose digits are provably the shortest that round-trip (at most 15
 * significant digits, no redundant trailing zero, 1e-4 <= |x| < 1e15 or zero). 0 otherwise. */
static int hs_number(heidi_scan *s)
{
    const unsigned char *q = s->p, *end = s->end, *int_start, *frac_start;
    size_t int_digits, frac_digits, lead_zeros = 0;
    int negative = 0;
    if (q < end && *q == '-') {
        negative = 1;
        q++;
    }
    int_start = q;
    while (q < end && *q >= '0' && *q <= '9')
        q++;
    int_digits = (size_t)(q - int_start);
    if (int_digits == 0 || (int_digits > 1 && *int_start == '0'))
        return 0;
    if (q >= end)
        return 0;
    if (*q == 'e' || *q == 'E')
        return 0;
    if (*q != '.') {
        if (int_digits > 18 || (negative && int_digits == 1 && *int_start == '0'))
            return 0;  /* beyond 64 bits orjson reads a float; -0 reads as 0 */
        s->p = q;
        return 1;
    }
    q++;
    frac_start = q;
    while (q < end && *q >= '0' && *q <= '9')
        q++;
    frac_digits = (size_t)(q - frac_start);
    if (frac_digits == 0 || q >= end || *q == 'e' || *q == 'E')
        return 0;
    if (frac_digits == 1 && *frac_start == '0') {
        if (int_digits > 15)
            return 0;
    } else {
        if (q[-1] == '0')
            return 0;
        if (int_digits == 1 && *int_start == '0') {
            while (lead_zeros < frac_digits && frac_start[lead_zeros] == '0')
                lead_zeros++;
            if (lead_zeros > 3 || frac_digits - lead_zeros > 15)
                return 0;
        } else if (int_digits + frac_digits > 15) {
            return 0;
        }
    }
    s->p = q;
    return 1;
}

/* {} or {"key":number,...} without a repeated key (orjson would keep only the last). */
static int hs_number_object(heidi_scan *s)
{
    const unsigned char *keys[32];
    size_t lens[32], count = 0, i;
    if (!HS_LIT(s, "{"))
        return 0;
    if (HS_LIT(s, "}"))
        return 1;
    for (;;) {
        const unsigned char *key;
        if (!HS_LIT(s, "\"") || count == 32)
            return 0;
        key = s->p;
        if (!hs_string(s, (size_t)-1))
            return 0;
        keys[count] = key;
        lens[count] = (size_t)(s->p - 1 - key);
        for (i = 0; i < count; i++)
            if (lens[i] == lens[count] && memcmp(keys[i], key, lens[count]) == 0)
                return 0;
        count++;
        if (!HS_LIT(s, ":") || !hs_number(s))
            return 0;
        if (HS_LIT(s, "}"))
            return 1;
        if (!HS_LIT(s, ","))
            return 0;
    }
}

/* [] or ["...",...], each string at most max characters. */
static int hs_string_array(heidi_scan *s, size_t max)
{
    if (!HS_LIT(s, "["))
        return 0;
    if (HS_LIT(s, "]"))
        return 1;
    for (;;) {
        if (!HS_LIT(s, "\"") || !hs_string(s, max))
            return 0;
        if (HS_LIT(s, "]"))
            return 1;
        if (!HS_LIT(s, ","))
            return 0;
    }
}

static int hs_ts(heidi_scan *s)
{
    /* 2026-02-20T07:45:38.307Z" */
    static const char shape[] = "dddd-dd-ddTdd:dd:dd.dddZ\"";
    size_t i;
    if ((size_t)(s->end - s->p) < sizeof(shape) - 1)
        return 0;
    for (i = 0; i < sizeof(shape) - 1; i++) {
        unsigned char c = s->p[i];
        if (shape[i] == 'd' ? !(c >= '0' && c <= '9') : c != (unsigned char)shape[i])
            return 0;
    }
    s->p += sizeof(shape) - 1;
    return 1;
}

/* p[0..n) is one line, its newline included. prev/prev_len: the hash it must chain on, or NULL
 * for the journal's first line (whose prev_hash is its own run_id). rid/rid_len: the run every
 * event belongs to, or NULL (then the line's run_id is returned in rid_at and rid_n). */
static int heidi_fast_line(const unsigned char *p, size_t n, const char *prev, size_t prev_len,
                           const char *rid, size_t rid_len,
                           const unsigned char **rid_at, size_t *rid_n)
{
    heidi_scan s = {p, p + n - 1};
    const unsigned char *run, *name;
    size_t run_len, name_len;
    if (n < 2 || p[n - 1] != '\n')
        return 0;
    if (!HS_LIT(&s, "{\"event_version\":\"1.0\",\"ts\":\"") || !hs_ts(&s))
        return 0;
    if (!HS_LIT(&s, ",\"run_id\":\"") || !hs_name(&s, 128, &run, &run_len))
        return 0;
    if (rid && (run_len != rid_len || memcmp(run, rid, rid_len) != 0))
        return 0;
    if (!HS_LIT(&s, ",\"round\":"))
        return 0;
    {   /* a non-negative integer */
        const unsigned char *q = s.p;
        while (q < s.end && *q >= '0' && *q <= '9')
            q++;
        if (q == s.p || q - s.p > 18 || (q - s.p > 1 && *s.p == '0'))
            return 0;
        s.p = q;
    }
    if (!HS_LIT(&s, ",\"stage\":\"") || !hs_name(&s, 64, &name, &name_len))
        return 0;
    if (!HS_LIT(&s, ",\"level\":\""))
        return 0;
    if (!HS_LIT(&s, "info\"") && !HS_LIT(&s, "warn\"") && !HS_LIT(&s, "error\"")
            && !HS_LIT(&s, "success\"") && !HS_LIT(&s, "critical\""))
        return 0;
    if (!HS_LIT(&s, ",\"event_type\":\"") || !hs_name(&s, 64, &name, &name_len))
        return 0;
    if (!HS_LIT(&s, ",\"message\":\"") || !hs_string(&s, 500))
        return 0;
    if (!HS_LIT(&s, ",\"counters_delta\":") || !hs_number_object(&s))
        return 0;
    if (!HS_LIT(&s, ",\"usage_delta\":") || !hs_number_object(&s))
        return 0;
    if (!HS_LIT(&s, ",\"artifact_paths\":") || !hs_string_array(&s, 100))
        return 0;
    if (!HS_LIT(&s, ",\"error\":"))
        return 0;
    if (!HS_LIT(&s, "null") && !(HS_LIT(&s, "\"") && hs_string(&s, 200)))
        return 0;
    if (!HS_LIT(&s, ",\"prev_hash\":\""))
        return 0;
    if (prev == NULL) {  /* the genesis: chained on its own run id */
        prev = (const char *)run;
        prev_len = run_len;
    }
    if ((size_t)(s.end - s.p) != prev_len + 2 || memcmp(s.p, prev, prev_len) != 0
            || s.p[prev_len] != '"' || s.p[prev_len + 1] != '}')
        return 0;
    if (rid_at) {
        *rid_at = run;
        *rid_n = run_len;
    }
    return 1;
}

#endif
