/* core/file.h — whole files: reads of a config, a JSON document, a template
 * in one piece (small files; models and shards are mmap'ed by their own
 * readers), crash-safe replacement of a file, and `mkdir -p`. The one place
 * these are written (docs/design.md, "One source of truth").
 */
#ifndef QLORA_CORE_FILE_H
#define QLORA_CORE_FILE_H

#include <stddef.h>

#include "core/status.h"

struct cJSON;

/* file_read_all: the bytes of `path` in one malloc'd buffer (the caller frees
 * it) with a NUL after the last byte, so text can be used as a C string.
 * len: NULL, or receives the number of bytes read (without the NUL).
 * Errors (returns NULL; e may be NULL): "<path>: cannot open" when fopen
 * fails; "<path>: cannot read" when the size cannot be taken, memory runs
 * out or fewer bytes arrive than the file held. */
char *file_read_all(const char *path, size_t *len, qerr *e);

/* file_read_json_object: `path` parsed by cJSON; the top level must be a JSON
 * object. The caller frees the tree with cJSON_Delete. Errors (returns NULL;
 * e may be NULL): those of file_read_all, and "<path>: not a JSON object"
 * for text that does not parse or whose top level is not an object. */
struct cJSON *file_read_json_object(const char *path, qerr *e);

/* file_write_atomic: replace `path` by the `len` bytes at `data`, crash-safely:
 * written to "<path>.tmp", flushed and fsync'ed, then renamed over `path`, so
 * a reader (or a crash at any moment) sees the old file or the new one, never
 * a mix. Errors (returns -1, the temporary removed, `path` untouched):
 * "cannot create <path>.tmp: <strerror>", "cannot write <path>: <strerror>". */
int file_write_atomic(const char *path, const void *data, size_t len, qerr *e);

/* file_mkdir_p: create directory `path` and any missing parents (mode 0755),
 * as `mkdir -p`; an existing directory is success. Errors (returns -1):
 * "invalid path \"<path>\"" (empty or longer than 4095 bytes), "cannot create
 * \"<dir>\": <strerror>" naming the component that failed. */
int file_mkdir_p(const char *path, qerr *e);

#endif
