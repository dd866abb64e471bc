/* format/gguf_write.h — GGUF v3 writer (the counterpart of format/gguf.h).
 *
 * Format: ggml/docs/gguf.md, gguf-py/gguf/gguf_writer.py (see
 * docs/formats.md §3): magic "GGUF", version 3, u64 tensor
 * count, u64 KV count, the KVs (u64-length key, u32 type, value), the tensor
 * infos (name, u32 n_dims, u64 ne[n_dims] in ggml order, u32 ggml_type, u64
 * offset into the data section), zero padding to the alignment (32), then
 * each tensor's bytes, each padded with zeros to the alignment, as
 * gguf_writer.py does. Everything little-endian.
 *
 * Usage: gguf_writer_init, any number of gguf_writer_add_* (KVs are written in
 * the order added; a key added twice is an error), gguf_writer_add_tensor
 * (data is referenced, not copied: it must stay valid until the write), then
 * gguf_writer_write (path: written to path.tmp, fsync'ed, renamed) or
 * gguf_writer_write_fd, and gguf_writer_free. Errors are sticky: the first
 * failing add is reported by the write.
 */
#ifndef QLORA_FORMAT_GGUF_WRITE_H
#define QLORA_FORMAT_GGUF_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

typedef struct gguf_writer gguf_writer; /* opaque */

int gguf_writer_init(gguf_writer **out, qerr *e);
void gguf_writer_free(gguf_writer *w);

/* Scalar KVs. Strings are NUL-terminated UTF-8 (or, for _strn, len bytes). */
void gguf_writer_add_u32(gguf_writer *w, const char *key, uint32_t v);
void gguf_writer_add_i32(gguf_writer *w, const char *key, int32_t v);
void gguf_writer_add_f32(gguf_writer *w, const char *key, float v);
void gguf_writer_add_bool(gguf_writer *w, const char *key, int v);
void gguf_writer_add_str(gguf_writer *w, const char *key, const char *v);
void gguf_writer_add_strn(gguf_writer *w, const char *key, const char *v, size_t len);

/* Array KVs: n strings (lens may be NULL: NUL-terminated), or n int32. */
void gguf_writer_add_arr_str(gguf_writer *w, const char *key, const char *const *v, const size_t *lens, uint64_t n);
void gguf_writer_add_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n);
void gguf_writer_add_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n);

/* A tensor: name (< 64 bytes), n_dims 1..4, ne in ggml order (ne[0] fastest:
 * a PyTorch [out, in] matrix is ne = {in, out}), ggml type, nbytes =
 * nelements / blck * type_size (checked). data must outlive the write. */
void gguf_writer_add_tensor(gguf_writer *w, const char *name, uint32_t tensor_type, int n_dims, const uint64_t *ne,
                            const void *data, size_t nbytes);

/* Write everything. _write: to path.tmp then rename (an existing file is
 * never half-overwritten). _write_fd: to an open file descriptor at its
 * current position (e.g. a memfd). Returns 0 or -1 with a message. */
int gguf_writer_write(gguf_writer *w, const char *path, qerr *e);
int gguf_writer_write_fd(gguf_writer *w, int fd, const char *what, qerr *e);

#endif
