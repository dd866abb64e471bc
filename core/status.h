/* core/status.h — error reporting shared by every subsystem.
 *
 * Library code never prints and never exits: a function that can fail returns
 * 0 on success or -1 on failure and fills a caller-owned `qerr` with one line
 * that names the file / field and what was expected. The CLI prints that line
 * and exits non-zero. (Pattern: sqlite3_errmsg / zlib's z_stream.msg.)
 */
#ifndef QLORA_CORE_STATUS_H
#define QLORA_CORE_STATUS_H

#include <stddef.h>

typedef struct qerr {
    char msg[1024];
} qerr;

/* qerr_set: printf-style; writes the message into e (if e != NULL) and
 * returns -1 so callers can write `return qerr_set(e, "...")`. */
int qerr_set(qerr *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* qerr_prefix: prepend "prefix: " to an existing message (context while
 * unwinding, e.g. the config file name). Returns -1. */
int qerr_prefix(qerr *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Allocation helpers that report out-of-memory through qerr instead of
 * crashing. Return NULL (and set e) on failure. */
void *qmalloc(size_t n, qerr *e);
void *qcalloc(size_t count, size_t size, qerr *e);

#endif
