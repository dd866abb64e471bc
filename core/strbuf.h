/* core/strbuf.h — a growable, always NUL-terminated byte buffer for text that
 * is built piece by piece (JSON headers and configs written by hand so that
 * their bytes are fully determined, rendered examples and prompts, serialized
 * GGUF metadata): the project's one growable byte buffer.
 *
 * Out of memory is sticky: the first failed growth sets `oom`, later appends
 * do nothing, and the caller checks `oom` once at the end.
 */
#ifndef QLORA_CORE_STRBUF_H
#define QLORA_CORE_STRBUF_H

#include <stddef.h>

typedef struct strbuf {
    char *p;    /* n bytes + NUL (malloc'd; NULL while empty); the caller frees it */
    size_t n;   /* bytes written, without the NUL */
    size_t cap; /* bytes allocated */
    int oom;    /* 1 once a growth failed: the content is incomplete */
} strbuf;        /* start as `strbuf b = {0};` */

/* Append n bytes of s (may hold NULs). */
void strbuf_put(strbuf *b, const char *s, size_t n);

/* Append the C string s. */
void strbuf_puts(strbuf *b, const char *s);

/* Empty the buffer, keeping its allocation (and a sticky oom). */
void strbuf_clear(strbuf *b);

/* Append printf-style formatted text (any length). */
void strbuf_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
