/* core/file.h — whole files: reads of a config, a JSON document, a template
 * in one piece (small files; models and shards are mmap'ed by their own
 * readers), crash-safe replacement of a file (whole or streamed), and
 * `mkdir -p`. The one place
 * these are written (docs/design.md, "One source of truth").
 */
#ifndef QLORA_CORE_FILE_H
#define QLORA_CORE_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

struct cJSON;

/* file_read_all: the bytes of `path` in one malloc'd buffer (the caller frees
 * it) with a NUL after the last byte, so text can be used as a C string. It
 * reads to end of file, so pipes and /proc files work too.
 * len: NULL, or receives the number of bytes read (without the NUL).
 * Errors (returns NULL; e may be NULL): "<path>: cannot open: <strerror>"
 * when fopen fails; "<path>: cannot read" when reading fails or memory runs
 * out. */
char *file_read_all(const char *path, size_t *len, qerr *e);

/* file_read_json_object: `path` parsed by cJSON; the top level must be a JSON
 * object. The caller frees the tree with cJSON_Delete. Errors (returns NULL;
 * e may be NULL): those of file_read_all, and "<path>: not a JSON object"
 * for text that does not parse or whose top level is not an object. */
struct cJSON *file_read_json_object(const char *path, qerr *e);

/* file_read_regular: as file_read_all, for inputs that must be files on a
 * disk (datasets): a FIFO, a device (/dev/zero, /dev/urandom), a socket or a
 * directory is refused before a byte is read (the open is O_NONBLOCK, so a
 * FIFO without a writer cannot block), and exactly the st_size bytes are read,
 * never more. max_bytes: 0 = at most half of the machine's physical memory
 * (the bytes are processed in memory beside what is made of them), else that
 * many. Errors (returns NULL): "<path>: cannot open: <strerror>", "<path>: not
 * a regular file (a FIFO|a directory|...)", "<path>: <size>, more than ...",
 * "<path>: read error: <strerror>", out of memory. */
char *file_read_regular(const char *path, size_t max_bytes, size_t *len, qerr *e);

/* file_kind_name: what a non-regular file is, in words for a message: "a
 * directory", "a FIFO", "a character device", "a block device", "a socket",
 * else "not a regular file". mode: a struct stat's st_mode. */
const char *file_kind_name(unsigned mode);

/* file_open_regular: open `path` for reading only if it is a regular file of
 * at most max_bytes bytes (0: any size), for inputs whose reader would block
 * or never finish on anything else (checkpoint files: a FIFO blocks the open,
 * /dev/zero never ends). The open is O_NONBLOCK (a FIFO without a writer
 * cannot block it; it is then refused by type, like a device, a socket or a
 * directory) before a byte is read. Returns the descriptor (O_RDONLY |
 * O_NONBLOCK | O_CLOEXEC; the caller closes it) with the file's size in *size
 * (may be NULL), or -1 with errno set and "<path>: cannot open: <strerror>",
 * "<path>: not a regular file (a FIFO|a directory|...)" or "<path>: <n>
 * bytes, more than the <max> expected". */
int file_open_regular(const char *path, int64_t max_bytes, int64_t *size, qerr *e);

/* file_write_fd_all: write `len` bytes at `data` to `fd`, retrying short
 * writes and EINTR. Returns 0, or -1 with errno set (EIO when write() made no
 * progress). */
int file_write_fd_all(int fd, const void *data, size_t len);

/* file_atomic: a crash-safe replacement of a file written piece by piece
 * (safetensors, GGUF), the streaming form of file_write_atomic:
 *   file_atomic w;
 *   if (file_atomic_begin(&w, path, e)) return -1;     creates "<path>.tmp"
 *   ... file_atomic_write(&w, bytes, n, e) or write(w.fd, ...) ...
 *   return file_atomic_commit(&w, e);                   or file_atomic_abort(&w)
 * commit fsyncs the temporary, closes it, renames it over `path` and fsyncs
 * the directory (best effort: a filesystem that cannot sync a directory still
 * gets the rename), so a reader, or a crash at any moment, sees the old file
 * or the new one, never a mix; `path` is untouched until the rename. */
typedef struct file_atomic {
    int fd;    /* the temporary, open for writing (O_WRONLY | O_TRUNC, 0644) */
    char *path; /* final name (malloc'd) */
    char *tmp;  /* "<path>.tmp" (malloc'd) */
} file_atomic;

/* Create "<path>.tmp" (truncated). Errors (returns -1, nothing to abort):
 * "cannot create <path>.tmp: <strerror>", "out of memory". */
int file_atomic_begin(file_atomic *w, const char *path, qerr *e);

/* Append `len` bytes at `data` (short writes and EINTR retried). Errors
 * (returns -1; the caller still commits nothing and aborts):
 * "cannot write <path>.tmp: <strerror>". */
int file_atomic_write(file_atomic *w, const void *data, size_t len, qerr *e);

/* fsync, close, rename over `path`, fsync the directory; releases w. Errors
 * (returns -1, the temporary removed, `path` untouched): "cannot write
 * <path>: <strerror>" (sync or close failed), "cannot rename <path>.tmp to
 * <path>: <strerror>". */
int file_atomic_commit(file_atomic *w, qerr *e);

/* Close and remove the temporary; `path` is untouched; releases w. */
void file_atomic_abort(file_atomic *w);

/* file_write_atomic: replace `path` by the `len` bytes at `data`, crash-safely
 * (file_atomic_begin, _write, _commit above). Errors (returns -1, the
 * temporary removed, `path` untouched): those of file_atomic_begin,
 * file_atomic_write and file_atomic_commit. */
int file_write_atomic(const char *path, const void *data, size_t len, qerr *e);

/* file_mkdir_p: create directory `path` and any missing parents (mode 0755),
 * as `mkdir -p`; an existing directory is success. Errors (returns -1):
 * "invalid path \"<path>\"" (empty or longer than 4095 bytes), "cannot create
 * \"<dir>\": <strerror>" naming the component that failed. */
int file_mkdir_p(const char *path, qerr *e);

#endif
