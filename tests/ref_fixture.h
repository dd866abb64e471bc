/* tests/ref_fixture.h — reader for the reference fixtures that
 * scripts/make_reference.py writes into tests/fixtures/ (*.qref.gz).
 *
 * A fixture is a gzip stream of a flat list of named, typed n-d arrays
 * (little-endian; sizes checked against the real stream length):
 *
 *   "QLREF001"                          8-byte magic + version
 *   u32 count
 *   count × { u32 name_len, name bytes (UTF-8, no NUL),
 *             u32 dtype (REF_F32 .. REF_F64), u32 ndim (<= 8), u64 shape[ndim],
 *             u64 nbytes (== numel × dtype size), data }
 *
 * Each array is copied into its own malloc'd buffer (so any element type is
 * properly aligned). Used only by tests: no Python or torch at test time.
 */
#ifndef QLORA_TESTS_REF_FIXTURE_H
#define QLORA_TESTS_REF_FIXTURE_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

typedef enum ref_dtype { REF_F32 = 0, REF_I32 = 1, REF_U8 = 2, REF_U16 = 3, REF_I64 = 4, REF_F64 = 5 } ref_dtype;

typedef struct ref_array {
    char *name;       /* NUL-terminated */
    ref_dtype dtype;
    int ndim;
    int64_t shape[8];
    int64_t numel;
    void *data;       /* numel elements of dtype */
} ref_array;

typedef struct ref_file {
    char *path;
    int n;
    ref_array *arr;
} ref_file;

/* ref_open: read and validate the whole file. Errors (-1, *e): cannot open,
 * bad gzip stream, bad magic, truncated or oversized records. */
int ref_open(const char *path, ref_file *f, qerr *e);
void ref_close(ref_file *f);

/* The array named `name`, or NULL. */
const ref_array *ref_find(const ref_file *f, const char *name);

/* Typed accessors that abort the test (cmocka fail_msg) when the array is
 * missing, has another dtype, or (numel >= 0) another element count. */
const float *ref_f32(const ref_file *f, const char *name, int64_t numel);
const int32_t *ref_i32(const ref_file *f, const char *name, int64_t numel);
const uint8_t *ref_u8(const ref_file *f, const char *name, int64_t numel);
const uint16_t *ref_u16(const ref_file *f, const char *name, int64_t numel);
const int64_t *ref_i64(const ref_file *f, const char *name, int64_t numel);
const double *ref_f64(const ref_file *f, const char *name, int64_t numel);
/* A scalar stored as a 1-element f64/f32/i64/i32 array, as double. */
double ref_scalar(const ref_file *f, const char *name);
/* A UTF-8 string stored as a u8 array: malloc'd, NUL-terminated. */
char *ref_str(const ref_file *f, const char *name);

/* A gzip'd JSON fixture (tests/fixtures/NAME.json.gz, written by scripts/ with
 * Python's gzip + json) parsed by cJSON; the caller cJSON_Delete()s it. NULL
 * when the file cannot be read or is not JSON. */
struct cJSON *ref_read_gz_json(const char *path);

/* Opens a fixture relative to the repo root (tests run from there) or fails
 * the test with a message that names the regeneration command. */
void ref_open_or_fail(const char *path, ref_file *f);

#endif
