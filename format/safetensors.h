/* format/safetensors.h — safetensors writer and memory-mapped reader.
 *
 * Format (huggingface/safetensors README, src/tensor.rs): u64 little-endian
 * header size N, N bytes of UTF-8 JSON, then the byte buffer. The JSON maps
 * each tensor name to {"dtype", "shape", "data_offsets": [begin, end)} with
 * offsets relative to the buffer; an optional "__metadata__" maps strings to
 * strings. Data is row-major little-endian; the tensors must cover the buffer
 * exactly, without holes or overlaps. Max header size 100,000,000 bytes.
 *
 * The writer reproduces the Rust writer byte for byte (tensor.rs `prepare`):
 * tensors sorted by dtype (descending, in the Rust `Dtype` enum order, which
 * keeps larger elements first and aligned) then by name, compact JSON with
 * "__metadata__" first, header padded with spaces to a multiple of 8.
 */
#ifndef QLORA_FORMAT_SAFETENSORS_H
#define QLORA_FORMAT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

#define ST_MAX_DIMS 4
#define ST_MAX_HEADER 100000000ull

typedef struct st_tensor {
    const char *name;   /* e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" */
    const char *dtype;  /* "F32", "BF16", "F16", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
                           "F64", "BOOL", "F8_E4M3", "F8_E5M2" */
    int n_dims;         /* 0..ST_MAX_DIMS (0 = scalar) */
    int64_t shape[ST_MAX_DIMS]; /* PyTorch order, e.g. lora_A [r, in] */
    const void *data;   /* nbytes of row-major little-endian elements */
    size_t nbytes;      /* = prod(shape) * dtype size */
} st_tensor;

/* Bytes per element of a safetensors dtype string; 0 if unknown. */
size_t safetensors_dtype_size(const char *dtype);

/* Write `n` tensors to `path`. metadata_json: a JSON object of string values
 * for "__metadata__"; NULL means {"format":"pt"} (what PyTorch / PEFT write);
 * "{}" writes no "__metadata__" at all. The file is written to path.tmp,
 * fsync'ed and renamed over path, so an existing file is never damaged: on any
 * error path is untouched and path.tmp removed. Checks every tensor first
 * (known dtype, 0..4 dims, nbytes = prod(shape) * size, unique non-empty names)
 * and reports the first bad one by name. */
int safetensors_write(const char *path, const st_tensor *tensors, int n, const char *metadata_json, qerr *e);

typedef struct safetensors_file safetensors_file; /* opaque */

/* Map and validate `path`: size >= 8, header size <= 100 MB and inside the
 * file, header valid UTF-8 JSON object starting with '{' (trailing spaces
 * only), every entry {dtype known, shape of <= 4 non-negative ints,
 * data_offsets [b, e] with e - b = nbytes}, no duplicate names, offsets
 * covering the buffer contiguously from 0 to its end (= file size - 8 - N).
 * Errors name the file and the offending tensor. */
int safetensors_open(const char *path, safetensors_file **out, qerr *e);
void safetensors_close(safetensors_file *f);

/* Number of tensors. */
int safetensors_count(const safetensors_file *f);

/* Tensor i in file (offset) order, 0 <= i < count. Pointers (name, data) stay
 * valid until safetensors_close. data points into the read-only mapping and
 * is aligned only as far as the writer ordered the tensors (this writer and
 * the Rust one align every element); use memcpy when in doubt. */
void safetensors_get(const safetensors_file *f, int i, st_tensor *out);

/* Look a tensor up by name: 0 and *out filled, or -1 with
 * "<path>: no tensor named \"x\"". */
int safetensors_find(const safetensors_file *f, const char *name, st_tensor *out, qerr *e);

/* A "__metadata__" value, or NULL if absent. Valid until close. */
const char *safetensors_metadata(const safetensors_file *f, const char *key);

#endif
