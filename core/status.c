/* core/status.c — see status.h. */
#include "core/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int qerr_set(qerr *e, const char *fmt, ...) {
    if (!e) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int qerr_prefix(qerr *e, const char *fmt, ...) {
    if (!e) return -1;
    char pre[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    char old[sizeof e->msg];
    memcpy(old, e->msg, sizeof old);
    size_t n = strlen(pre);
    if (n + 2 >= sizeof e->msg) n = sizeof e->msg - 3;
    memcpy(e->msg, pre, n);
    memcpy(e->msg + n, ": ", 2);
    size_t rest = sizeof e->msg - n - 3;
    size_t ol = strnlen(old, sizeof old);
    if (ol > rest) ol = rest;
    memcpy(e->msg + n + 2, old, ol);
    e->msg[n + 2 + ol] = 0;
    return -1;
}

void *qmalloc(size_t n, qerr *e) {
    void *p = malloc(n ? n : 1);
    if (!p) qerr_set(e, "out of memory allocating %zu bytes", n);
    return p;
}

void *qcalloc(size_t count, size_t size, qerr *e) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) qerr_set(e, "out of memory allocating %zu x %zu bytes", count, size);
    return p;
}
