/* core/parse.c — see parse.h. */
#include "core/parse.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The value as the message shows it: at most 60 bytes, so a pasted file
 * cannot make the line unreadable. */
static const char *shown(const char *s, char *buf, size_t n) {
    if (strlen(s) <= 60) return s;
    snprintf(buf, n, "%.57s...", s);
    return buf;
}

int parse_int_range(const char *what, const char *s, int64_t lo, int64_t hi, int64_t *out, qerr *e) {
    char buf[64];
    const char *p = s;
    if (*p == '-' || *p == '+') p++;
    int ok = isdigit((unsigned char)*p) != 0;
    for (const char *q = p; ok && *q; q++) ok = isdigit((unsigned char)*q) != 0;
    long long v = 0;
    if (ok) {
        errno = 0;
        v = strtoll(s, NULL, 10);
        ok = errno != ERANGE && v >= lo && v <= hi;
    }
    if (ok) {
        *out = (int64_t)v;
        return 0;
    }
    if (hi == INT64_MAX)
        return qerr_set(e, "%s: expected an integer >= %lld, got \"%s\"", what, (long long)lo, shown(s, buf, sizeof buf));
    return qerr_set(e, "%s: expected an integer in [%lld, %lld], got \"%s\"", what, (long long)lo, (long long)hi,
                    shown(s, buf, sizeof buf));
}

int parse_u64(const char *what, const char *s, uint64_t *out, qerr *e) {
    char buf[64];
    int ok = isdigit((unsigned char)*s) != 0;
    for (const char *q = s; ok && *q; q++) ok = isdigit((unsigned char)*q) != 0;
    unsigned long long v = 0;
    if (ok) {
        errno = 0;
        v = strtoull(s, NULL, 10);
        ok = errno != ERANGE;
    }
    if (ok) {
        *out = (uint64_t)v;
        return 0;
    }
    return qerr_set(e, "%s: expected an integer in [0, %llu], got \"%s\"", what, (unsigned long long)UINT64_MAX,
                    shown(s, buf, sizeof buf));
}

int parse_double_range(const char *what, const char *s, double lo, double hi, int lo_open, double *out, qerr *e) {
    char buf[64];
    /* strtod alone would take blanks, hex floats, "nan", "inf" and "infinity" */
    int ok = *s != 0 && !isspace((unsigned char)*s);
    for (const char *q = s; ok && *q; q++)
        ok = isdigit((unsigned char)*q) || *q == '.' || *q == 'e' || *q == 'E' || *q == '+' || *q == '-';
    double v = 0;
    if (ok) {
        char *end;
        errno = 0;
        v = strtod(s, &end);
        ok = end != s && !*end && errno != ERANGE && isfinite(v) && (lo_open ? v > lo : v >= lo) && v <= hi;
    }
    if (ok) {
        *out = v;
        return 0;
    }
    if (isinf(hi))
        return qerr_set(e, "%s: expected a number %s %g, got \"%s\"", what, lo_open ? ">" : ">=", lo,
                        shown(s, buf, sizeof buf));
    return qerr_set(e, "%s: expected a number in %c%g, %g], got \"%s\"", what, lo_open ? '(' : '[', lo, hi,
                    shown(s, buf, sizeof buf));
}

int env_switch_off(const char *name) {
    const char *v = getenv(name);
    return v && strcmp(v, "0") == 0;
}
