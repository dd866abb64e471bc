/* format/gguf.h — GGUF v2/v3 reader (memory-mapped, read-only).
 *
 * Format: ggml/docs/gguf.md and gguf-py/gguf/constants.py (see
 * docs/formats.md §3). Little-endian; strings are u64 length +
 * bytes; tensor dims are in ggml order (ne[0] is the fastest-varying, i.e. the
 * last PyTorch dimension: PyTorch [out, in] is ne = {in, out}). The data
 * section starts at the first multiple of `general.alignment` (default 32)
 * after the tensor infos; every offset is checked against the file size.
 */
#ifndef QLORA_FORMAT_GGUF_H
#define QLORA_FORMAT_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "quant/ggml_quants.h"

typedef enum gguf_vtype {
    GGUF_VTYPE_UINT8 = 0, GGUF_VTYPE_INT8 = 1, GGUF_VTYPE_UINT16 = 2, GGUF_VTYPE_INT16 = 3,
    GGUF_VTYPE_UINT32 = 4, GGUF_VTYPE_INT32 = 5, GGUF_VTYPE_FLOAT32 = 6, GGUF_VTYPE_BOOL = 7,
    GGUF_VTYPE_STRING = 8, GGUF_VTYPE_ARRAY = 9, GGUF_VTYPE_UINT64 = 10, GGUF_VTYPE_INT64 = 11,
    GGUF_VTYPE_FLOAT64 = 12,
} gguf_vtype;

/* Bytes of one value of a fixed-size type (1, 2, 4 or 8); 0 for string,
 * array and unknown types. */
uint64_t gguf_vtype_size(uint32_t t);

/* ggml_type (tensor type numbers), ggml_type_name and the block dequantizers
 * live in quant/ggml_quants.h. */

typedef struct gguf_tensor {
    const char *name;     /* NUL-terminated copy */
    uint32_t n_dims;      /* 1..4 */
    uint64_t ne[4];       /* ggml order; unused dims are 1 */
    uint32_t type;        /* ggml_type */
    uint64_t offset;      /* relative to the data section */
    const uint8_t *data;  /* points into the mapping */
    uint64_t nbytes;      /* size of the data in bytes */
    uint64_t nelements;
} gguf_tensor;

typedef struct gguf_file gguf_file; /* opaque */

/* Open and validate `path` (magic, version 2 or 3, sizes, alignment, every
 * tensor's extent inside the file, known tensor types). Returns 0 and sets
 * *out, or -1 with a message naming the file and what was wrong.
 * "Known" means ggml_type_info knows the block size: a file holding e.g. Q5_0
 * opens, and gguf_tensor_rows_to_f32 reports that type as unsupported.
 * Also rejected: duplicate keys or tensor names, overlapping or misaligned
 * tensor data, ne0 not a multiple of the block size, zero or overflowing
 * dims, tensor names of 64+ bytes (GGML_MAX_NAME). Like llama.cpp's loader,
 * the padding after the last tensor may be missing. */
int gguf_open(const char *path, gguf_file **out, qerr *e);
void gguf_close(gguf_file *f);

/* File-level facts: GGUF version (2 or 3), data alignment in bytes, and the
 * byte offset of the data section from the start of the file. */
uint32_t gguf_version(const gguf_file *f);
uint32_t gguf_alignment(const gguf_file *f);
uint64_t gguf_data_offset(const gguf_file *f);

/* Iterate over the KVs in file order: key i (NUL-terminated) and its type
 * (gguf_vtype); NULL / -1 when i >= gguf_n_kv. */
uint64_t gguf_n_kv(const gguf_file *f);
const char *gguf_kv_key(const gguf_file *f, uint64_t i);
int gguf_kv_type(const gguf_file *f, uint64_t i);

/* Metadata lookups. Each returns 0 on success, -1 if the key is missing or
 * has an incompatible type (message names the key and the type found).
 * gguf_get_u32/u64/i64 accept any integer type whose value fits;
 * gguf_get_f32 accepts f32/f64. The string is NOT NUL-terminated: use len. */
int gguf_has_key(const gguf_file *f, const char *key);
int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, qerr *e);
int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, qerr *e);
int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out, qerr *e);
int gguf_get_f32(const gguf_file *f, const char *key, float *out, qerr *e);
int gguf_get_bool(const gguf_file *f, const char *key, int *out, qerr *e);
int gguf_get_str(const gguf_file *f, const char *key, const char **s, size_t *len, qerr *e);

/* Arrays: element type and count; numeric arrays are exposed as a pointer to
 * the raw little-endian elements in the mapping (may be unaligned: memcpy);
 * string arrays element by element (O(1) per element). Arrays of arrays are
 * parsed and validated; only their element type and count are exposed. */
int gguf_get_arr_info(const gguf_file *f, const char *key, gguf_vtype *elem, uint64_t *count, qerr *e);
int gguf_get_arr_data(const gguf_file *f, const char *key, const void **data, qerr *e);
int gguf_get_arr_str(const gguf_file *f, const char *key, uint64_t i, const char **s, size_t *len, qerr *e);

/* Tensors. */
uint64_t gguf_n_tensors(const gguf_file *f);
const gguf_tensor *gguf_tensor_at(const gguf_file *f, uint64_t i);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name); /* NULL if absent */
/* ggml_type_name(type): declared in quant/ggml_quants.h. */

/* Dequantize rows [row0, row0+nrows) of a tensor viewed as (nelements/ne0, ne0)
 * into dst (nrows * ne0 fp32). Supports F32, F16, BF16, Q8_0, Q4_0, Q4_1,
 * Q4_K, Q6_K (block layouts: ggml-common.h / ggml-quants.c). Returns -1 with a
 * message for unsupported types or out-of-range rows. */
int gguf_tensor_rows_to_f32(const gguf_tensor *t, uint64_t row0, uint64_t nrows, float *dst, qerr *e);
/* The whole tensor, (nelements/ne0, ne0), into dst as fp32: the rows in
 * blocks of 64 over the OpenMP threads (each row is converted on its own, so
 * the result does not depend on the thread count). Errors as
 * gguf_tensor_rows_to_f32 (the message of one failing block). */
int gguf_tensor_to_f32(const gguf_tensor *t, float *dst, qerr *e);

#endif
