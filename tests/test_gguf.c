/* tests/test_gguf.c — GGUF reader and ggml block (de)quantizers.
 *
 * 1. A GGUF built here byte by byte (every KV type, arrays incl. arrays of
 *    arrays of strings, alignment 64 with padding, six tensors) reads back exactly.
 * 2. Corrupt inputs fail with one line naming the file: bad magic / version,
 *    truncation at every byte offset, tensors past EOF, unknown types, bad
 *    alignment, duplicates, overflowing dims, ... and random byte flips never
 *    crash or yield pointers outside the file.
 * 3. Dequantization of F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K is bit-exact
 *    against gguf-py (tests/fixtures/ggml_types.gguf, written by
 *    scripts/make_ggml_fixtures.py), and our Q8_0/Q4_0/Q4_1 reference quantizers
 *    produce the same bytes as gguf.quants.quantize.
 * 4. The real SmolLM2-135M-Instruct Q4_1 model: metadata and dequantized rows
 *    against gguf-py (tests/fixtures/smollm2_expected.gguf).
 * Run from the repo root.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/bf16.h"
#include "core/rng.h"
#include "format/gguf.h"
#include "format/gguf_write.h"
#include "model/llama.h"
#include "quant/ggml_quants.h"

#define MODEL_PATH "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define TYPES_FIXTURE "tests/fixtures/ggml_types.gguf"
#define MODEL_FIXTURE "tests/fixtures/smollm2_expected.gguf"

/* ---- byte buffer for building GGUF files ---- */

typedef struct buf {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *x, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (n) memcpy(b->p + b->n, x, n);
    b->n += n;
}
static void put_u8(buf *b, uint8_t v) { put(b, &v, 1); }
static void put_u16(buf *b, uint16_t v) { put(b, &v, 2); }
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_f32(buf *b, float v) { put(b, &v, 4); }
static void put_f64(buf *b, double v) { put(b, &v, 8); }
static void put_str(buf *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void put_key(buf *b, const char *key, uint32_t type) {
    put_str(b, key);
    put_u32(b, type);
}
static void put_pad(buf *b, size_t align) {
    while (b->n % align) put_u8(b, 0);
}

/* ---- the sample file ---- */

#define N_SAMPLE_T 6

typedef struct sample_opts {
    int no_align_key;        /* omit general.alignment (default 32 applies) */
    uint32_t align;          /* value of general.alignment */
    uint32_t align_type;     /* its type (GGUF_VTYPE_UINT32 normally) */
    int dup_key;             /* write t.u8 twice */
    const char *name0;       /* name of tensor 0 (default "a") */
    int nest_depth;          /* extra KV: arrays nested this deep (0 = none) */
    uint64_t last_ne0;       /* ne0 of the last (F32) tensor, default 16 */
    int no_tail_pad;         /* drop the padding after the last tensor */
} sample_opts;

typedef struct sample_layout {
    size_t off_version, off_n_tensors, off_n_kv;
    size_t off_key0_chars;          /* first byte of the first key */
    size_t off_bool_value;          /* value byte of t.bool */
    size_t off_str_len;             /* u64 length of t.str's value */
    size_t off_u8_type;             /* u32 type field of t.u8 */
    size_t off_arr_u8_elem, off_arr_u8_count;
    size_t off_name[N_SAMPLE_T];    /* first char of each tensor name */
    size_t off_ndims[N_SAMPLE_T], off_dim0[N_SAMPLE_T], off_type[N_SAMPLE_T], off_offset[N_SAMPLE_T];
    size_t data_off;
    uint64_t t_off[N_SAMPLE_T];     /* data offsets */
} sample_layout;

typedef struct tspec {
    const char *name;
    uint32_t type, n_dims;
    uint64_t ne[4];
    buf data;
} tspec;

static const char *const ARR_STR[] = {"alpha", "", "gamma \xc3\xa9"};

/* Tensor contents: a F32 {4,3}; b F16 {8}; c Q8_0 {64,2}; d Q5_0 {32}
 * (known size, not dequantizable); e Q4_K {256,1,1,2}; f F32 {last_ne0}. */
static void sample_tensors(tspec t[N_SAMPLE_T], uint64_t last_ne0) {
    memset(t, 0, sizeof(tspec) * N_SAMPLE_T);
    t[0] = (tspec){"a", GGML_TYPE_F32, 2, {4, 3, 1, 1}, {0}};
    for (int i = 0; i < 12; i++) put_f32(&t[0].data, (float)i * 0.25f - 1.0f);
    t[1] = (tspec){"b", GGML_TYPE_F16, 1, {8, 1, 1, 1}, {0}};
    for (int i = 0; i < 8; i++) put_u16(&t[1].data, f32_to_f16((float)i - 3.5f));
    t[2] = (tspec){"c", GGML_TYPE_Q8_0, 2, {64, 2, 1, 1}, {0}};
    for (int blk = 0; blk < 4; blk++) { /* d = 0.5 * (blk + 1), q = j - 16 */
        put_u16(&t[2].data, f32_to_f16(0.5f * (float)(blk + 1)));
        for (int j = 0; j < 32; j++) put_u8(&t[2].data, (uint8_t)(int8_t)(j - 16));
    }
    t[3] = (tspec){"d", 20 /* IQ4_NL: a type not dequantized */, 1, {32, 1, 1, 1}, {0}};
    for (int i = 0; i < 18; i++) put_u8(&t[3].data, (uint8_t)i);
    t[4] = (tspec){"e", GGML_TYPE_Q4_K, 4, {256, 1, 1, 2}, {0}};
    for (int i = 0; i < 288; i++) put_u8(&t[4].data, (uint8_t)(i * 37 + 11));
    t[5] = (tspec){"f", GGML_TYPE_F32, 1, {last_ne0, 1, 1, 1}, {0}};
    for (uint64_t i = 0; i < last_ne0; i++) put_f32(&t[5].data, (float)i);
}

static void free_tensors(tspec t[N_SAMPLE_T]) {
    for (int i = 0; i < N_SAMPLE_T; i++) free(t[i].data.p);
}

static void put_nested(buf *b, int depth) {
    if (depth == 0) {
        put_u32(b, GGUF_VTYPE_UINT8);
        put_u64(b, 1);
        put_u8(b, 7);
        return;
    }
    put_u32(b, GGUF_VTYPE_ARRAY);
    put_u64(b, 1);
    put_nested(b, depth - 1);
}

/* Build the sample GGUF into b; positions of interesting fields go to lay. */
static void build_sample(buf *b, const sample_opts *o_in, sample_layout *lay) {
    sample_opts o = o_in ? *o_in : (sample_opts){0};
    if (!o.align) o.align = 64;
    if (!o.align_type) o.align_type = GGUF_VTYPE_UINT32;
    if (!o.last_ne0) o.last_ne0 = 16;
    /* Layout alignment; a bogus general.alignment value still lays out at 64. */
    uint32_t align = o.no_align_key ? 32 : (o.align & (o.align - 1)) == 0 ? o.align : 64;
    sample_layout L;
    memset(&L, 0, sizeof L);
    tspec t[N_SAMPLE_T];
    sample_tensors(t, o.last_ne0);
    if (o.name0) t[0].name = o.name0;

    b->n = 0;
    put_u32(b, 0x46554747u);
    L.off_version = b->n;
    put_u32(b, 3);
    L.off_n_tensors = b->n;
    put_u64(b, N_SAMPLE_T);
    L.off_n_kv = b->n;
    put_u64(b, 0); /* patched below */
    uint64_t n_kv = 0;

    L.off_key0_chars = b->n + 8;
    put_key(b, "general.architecture", GGUF_VTYPE_STRING), put_str(b, "llama"), n_kv++;
    if (!o.no_align_key) {
        put_key(b, "general.alignment", o.align_type);
        if (o.align_type == GGUF_VTYPE_UINT64) put_u64(b, o.align);
        else put_u32(b, o.align);
        n_kv++;
    }
    put_str(b, "t.u8");
    L.off_u8_type = b->n;
    put_u32(b, GGUF_VTYPE_UINT8), put_u8(b, 200), n_kv++;
    put_key(b, "t.i8", GGUF_VTYPE_INT8), put_u8(b, (uint8_t)(int8_t)-100), n_kv++;
    put_key(b, "t.u16", GGUF_VTYPE_UINT16), put_u16(b, 60000), n_kv++;
    put_key(b, "t.i16", GGUF_VTYPE_INT16), put_u16(b, (uint16_t)(int16_t)-30000), n_kv++;
    put_key(b, "t.u32", GGUF_VTYPE_UINT32), put_u32(b, 4000000000u), n_kv++;
    put_key(b, "t.i32", GGUF_VTYPE_INT32), put_u32(b, (uint32_t)(int32_t)-2000000000), n_kv++;
    put_key(b, "t.f32", GGUF_VTYPE_FLOAT32), put_f32(b, 1.5f), n_kv++;
    put_key(b, "t.bool", GGUF_VTYPE_BOOL);
    L.off_bool_value = b->n;
    put_u8(b, 1), n_kv++;
    put_key(b, "t.str", GGUF_VTYPE_STRING);
    L.off_str_len = b->n;
    put_str(b, "hello, gguf"), n_kv++;
    put_key(b, "t.u64", GGUF_VTYPE_UINT64), put_u64(b, 0x123456789abcull), n_kv++;
    put_key(b, "t.i64", GGUF_VTYPE_INT64), put_u64(b, (uint64_t)-0x123456789abcll), n_kv++;
    put_key(b, "t.f64", GGUF_VTYPE_FLOAT64), put_f64(b, 0.1), n_kv++;
    put_key(b, "t.big_u64", GGUF_VTYPE_UINT64), put_u64(b, UINT64_MAX), n_kv++;
    put_key(b, "t.arr_u8", GGUF_VTYPE_ARRAY);
    L.off_arr_u8_elem = b->n;
    put_u32(b, GGUF_VTYPE_UINT8);
    L.off_arr_u8_count = b->n;
    put_u64(b, 4), put_u8(b, 1), put_u8(b, 2), put_u8(b, 3), put_u8(b, 250), n_kv++;
    put_key(b, "t.arr_i32", GGUF_VTYPE_ARRAY), put_u32(b, GGUF_VTYPE_INT32), put_u64(b, 3);
    put_u32(b, 1), put_u32(b, (uint32_t)-2), put_u32(b, 3), n_kv++;
    put_key(b, "t.arr_f32", GGUF_VTYPE_ARRAY), put_u32(b, GGUF_VTYPE_FLOAT32), put_u64(b, 2);
    put_f32(b, 0.5f), put_f32(b, -1.25f), n_kv++;
    put_key(b, "t.arr_str", GGUF_VTYPE_ARRAY), put_u32(b, GGUF_VTYPE_STRING), put_u64(b, 3);
    for (int i = 0; i < 3; i++) put_str(b, ARR_STR[i]);
    n_kv++;
    /* [["x", "yy"], ["zzz"], []] */
    put_key(b, "t.arr_nested", GGUF_VTYPE_ARRAY), put_u32(b, GGUF_VTYPE_ARRAY), put_u64(b, 3);
    put_u32(b, GGUF_VTYPE_STRING), put_u64(b, 2), put_str(b, "x"), put_str(b, "yy");
    put_u32(b, GGUF_VTYPE_STRING), put_u64(b, 1), put_str(b, "zzz");
    put_u32(b, GGUF_VTYPE_STRING), put_u64(b, 0), n_kv++;
    put_key(b, "t.arr_empty", GGUF_VTYPE_ARRAY), put_u32(b, GGUF_VTYPE_UINT32), put_u64(b, 0), n_kv++;
    put_key(b, "t.arr_bool", GGUF_VTYPE_ARRAY), put_u32(b, GGUF_VTYPE_BOOL), put_u64(b, 3);
    put_u8(b, 1), put_u8(b, 0), put_u8(b, 1), n_kv++;
    put_key(b, "t.arr_i64", GGUF_VTYPE_ARRAY), put_u32(b, GGUF_VTYPE_INT64), put_u64(b, 1);
    put_u64(b, (uint64_t)-1), n_kv++;
    if (o.dup_key) put_key(b, "t.u8", GGUF_VTYPE_UINT8), put_u8(b, 1), n_kv++;
    if (o.nest_depth) put_key(b, "t.deep", GGUF_VTYPE_ARRAY), put_nested(b, o.nest_depth - 1), n_kv++;
    memcpy(b->p + L.off_n_kv, &n_kv, 8);

    uint64_t off = 0;
    for (int i = 0; i < N_SAMPLE_T; i++) {
        L.off_name[i] = b->n + 8;
        put_str(b, t[i].name);
        L.off_ndims[i] = b->n;
        put_u32(b, t[i].n_dims);
        L.off_dim0[i] = b->n;
        for (uint32_t d = 0; d < t[i].n_dims; d++) put_u64(b, t[i].ne[d]);
        L.off_type[i] = b->n;
        put_u32(b, t[i].type);
        L.off_offset[i] = b->n;
        put_u64(b, off);
        L.t_off[i] = off;
        off += (t[i].data.n + align - 1) / align * align;
    }
    put_pad(b, align);
    L.data_off = b->n;
    for (int i = 0; i < N_SAMPLE_T; i++) {
        put(b, t[i].data.p, t[i].data.n);
        if (i + 1 < N_SAMPLE_T || !o.no_tail_pad) put_pad(b, align);
    }
    free_tensors(t);
    if (lay) *lay = L;
}

/* ---- temp files and open helpers ---- */

static char tmp_path[64];

static void tmp_init(void) {
    if (tmp_path[0]) return;
    strcpy(tmp_path, "/tmp/qlora_test_gguf_XXXXXX");
    int fd = mkstemp(tmp_path);
    assert_true(fd >= 0);
    close(fd);
}

static void write_file(const char *path, const uint8_t *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (n) assert_int_equal(fwrite(p, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

static gguf_file *open_bytes(const uint8_t *p, size_t n, qerr *e) {
    tmp_init();
    write_file(tmp_path, p, n);
    gguf_file *f = (gguf_file *)0x1;
    int rc = gguf_open(tmp_path, &f, e);
    if (rc != 0) assert_null(f);
    return rc == 0 ? f : NULL;
}

/* gguf_open must fail with a one-line message naming the file and containing `want`. */
static void expect_fail(const uint8_t *p, size_t n, const char *want) {
    qerr e = {{0}};
    gguf_file *f = open_bytes(p, n, &e);
    if (f) {
        gguf_close(f);
        fail_msg("gguf_open accepted a corrupt file (%zu bytes), expected an error containing '%s'", n, want);
    }
    if (!strstr(e.msg, tmp_path)) fail_msg("error does not name the file: %s", e.msg);
    if (strchr(e.msg, '\n')) fail_msg("error is not one line: %s", e.msg);
    if (want && !strstr(e.msg, want)) fail_msg("error '%s' does not contain '%s'", e.msg, want);
}

static void patch_u32(buf *b, size_t off, uint32_t v) { memcpy(b->p + off, &v, 4); }
static void patch_u64(buf *b, size_t off, uint64_t v) { memcpy(b->p + off, &v, 8); }

static int float_bits_equal(const float *a, const float *b, size_t n, size_t *bad) {
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], 4) != 0) {
            *bad = i;
            return 0;
        }
    return 1;
}

/* ---- 1. round trip ---- */

static void test_sample_roundtrip(void **state) {
    (void)state;
    buf b = {0};
    sample_layout L;
    build_sample(&b, NULL, &L);
    qerr e = {{0}};
    gguf_file *f = open_bytes(b.p, b.n, &e);
    if (!f) fail_msg("%s", e.msg);

    assert_int_equal(gguf_version(f), 3);
    assert_int_equal(gguf_alignment(f), 64);
    assert_int_equal(gguf_data_offset(f), L.data_off);
    assert_int_equal(gguf_data_offset(f) % 64, 0);
    assert_int_equal(gguf_n_kv(f), 23);
    assert_string_equal(gguf_kv_key(f, 0), "general.architecture");
    assert_int_equal(gguf_kv_type(f, 0), GGUF_VTYPE_STRING);
    assert_string_equal(gguf_kv_key(f, 2), "t.u8");
    assert_string_equal(gguf_kv_key(f, 22), "t.arr_i64");
    assert_int_equal(gguf_kv_type(f, 22), GGUF_VTYPE_ARRAY);
    assert_null(gguf_kv_key(f, 23));
    assert_int_equal(gguf_kv_type(f, 23), -1);

    const char *s;
    size_t len;
    assert_int_equal(gguf_get_str(f, "general.architecture", &s, &len, &e), 0);
    assert_int_equal(len, 5);
    assert_memory_equal(s, "llama", 5);
    assert_int_equal(gguf_get_str(f, "t.str", &s, &len, &e), 0);
    assert_int_equal(len, 11);
    assert_memory_equal(s, "hello, gguf", 11);

    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f32;
    int bo;
    assert_int_equal(gguf_get_u32(f, "t.u8", &u32, &e), 0), assert_int_equal(u32, 200);
    assert_int_equal(gguf_get_i64(f, "t.i8", &i64, &e), 0), assert_int_equal(i64, -100);
    assert_int_equal(gguf_get_u32(f, "t.u16", &u32, &e), 0), assert_int_equal(u32, 60000);
    assert_int_equal(gguf_get_i64(f, "t.i16", &i64, &e), 0), assert_int_equal(i64, -30000);
    assert_int_equal(gguf_get_u32(f, "t.u32", &u32, &e), 0), assert_int_equal(u32, 4000000000u);
    assert_int_equal(gguf_get_i64(f, "t.i32", &i64, &e), 0), assert_int_equal(i64, -2000000000);
    assert_int_equal(gguf_get_u64(f, "t.u64", &u64, &e), 0), assert_int_equal(u64, 0x123456789abcull);
    assert_int_equal(gguf_get_i64(f, "t.u64", &i64, &e), 0), assert_int_equal(i64, 0x123456789abcll);
    assert_int_equal(gguf_get_i64(f, "t.i64", &i64, &e), 0), assert_true(i64 == -0x123456789abcll);
    assert_int_equal(gguf_get_u64(f, "t.big_u64", &u64, &e), 0), assert_true(u64 == UINT64_MAX);
    assert_int_equal(gguf_get_u64(f, "t.u8", &u64, &e), 0), assert_int_equal(u64, 200);
    assert_int_equal(gguf_get_u32(f, "general.alignment", &u32, &e), 0), assert_int_equal(u32, 64);
    assert_int_equal(gguf_get_f32(f, "t.f32", &f32, &e), 0), assert_true(f32 == 1.5f);
    assert_int_equal(gguf_get_f32(f, "t.f64", &f32, &e), 0), assert_true(f32 == (float)0.1);
    assert_int_equal(gguf_get_bool(f, "t.bool", &bo, &e), 0), assert_int_equal(bo, 1);
    assert_true(gguf_has_key(f, "t.arr_nested"));
    assert_false(gguf_has_key(f, "t.nope"));
    assert_false(gguf_has_key(f, "t.u"));  /* prefix of a key */
    assert_false(gguf_has_key(f, "t.u88")); /* extension of a key */

    /* Values that do not fit, wrong types, missing keys: one message naming the key. */
    assert_int_equal(gguf_get_u32(f, "t.i8", &u32, &e), -1);
    assert_non_null(strstr(e.msg, "t.i8"));
    assert_int_equal(gguf_get_u64(f, "t.i64", &u64, &e), -1);
    assert_int_equal(gguf_get_u32(f, "t.u64", &u32, &e), -1);
    assert_int_equal(gguf_get_i64(f, "t.big_u64", &i64, &e), -1);
    assert_int_equal(gguf_get_u32(f, "t.str", &u32, &e), -1);
    assert_non_null(strstr(e.msg, "t.str"));
    assert_non_null(strstr(e.msg, "string"));
    assert_int_equal(gguf_get_f32(f, "t.u32", &f32, &e), -1);
    assert_non_null(strstr(e.msg, "uint32"));
    assert_int_equal(gguf_get_bool(f, "t.u8", &bo, &e), -1);
    assert_int_equal(gguf_get_str(f, "t.arr_str", &s, &len, &e), -1);
    assert_non_null(strstr(e.msg, "array of string"));
    assert_int_equal(gguf_get_u32(f, "llama.block_count", &u32, &e), -1);
    assert_non_null(strstr(e.msg, "llama.block_count"));
    assert_non_null(strstr(e.msg, "not found"));
    assert_non_null(strstr(e.msg, tmp_path));

    /* Arrays. */
    gguf_vtype et;
    uint64_t cnt;
    const void *data;
    assert_int_equal(gguf_get_arr_info(f, "t.arr_u8", &et, &cnt, &e), 0);
    assert_int_equal(et, GGUF_VTYPE_UINT8), assert_int_equal(cnt, 4);
    assert_int_equal(gguf_get_arr_data(f, "t.arr_u8", &data, &e), 0);
    assert_memory_equal(data, "\x01\x02\x03\xfa", 4);
    assert_int_equal(gguf_get_arr_info(f, "t.arr_i32", &et, &cnt, &e), 0);
    assert_int_equal(et, GGUF_VTYPE_INT32), assert_int_equal(cnt, 3);
    assert_int_equal(gguf_get_arr_data(f, "t.arr_i32", &data, &e), 0);
    int32_t i32s[3];
    memcpy(i32s, data, sizeof i32s);
    assert_int_equal(i32s[0], 1), assert_int_equal(i32s[1], -2), assert_int_equal(i32s[2], 3);
    assert_int_equal(gguf_get_arr_data(f, "t.arr_f32", &data, &e), 0);
    float f32s[2];
    memcpy(f32s, data, sizeof f32s);
    assert_true(f32s[0] == 0.5f && f32s[1] == -1.25f);
    assert_int_equal(gguf_get_arr_info(f, "t.arr_str", &et, &cnt, &e), 0);
    assert_int_equal(et, GGUF_VTYPE_STRING), assert_int_equal(cnt, 3);
    for (uint64_t i = 0; i < 3; i++) {
        assert_int_equal(gguf_get_arr_str(f, "t.arr_str", i, &s, &len, &e), 0);
        assert_int_equal(len, strlen(ARR_STR[i]));
        assert_memory_equal(s, ARR_STR[i], len);
    }
    assert_int_equal(gguf_get_arr_str(f, "t.arr_str", 3, &s, &len, &e), -1);
    assert_non_null(strstr(e.msg, "out of range"));
    assert_int_equal(gguf_get_arr_data(f, "t.arr_str", &data, &e), -1);
    assert_int_equal(gguf_get_arr_info(f, "t.arr_nested", &et, &cnt, &e), 0);
    assert_int_equal(et, GGUF_VTYPE_ARRAY), assert_int_equal(cnt, 3);
    assert_int_equal(gguf_get_arr_str(f, "t.arr_nested", 0, &s, &len, &e), -1);
    assert_int_equal(gguf_get_arr_data(f, "t.arr_nested", &data, &e), -1);
    assert_int_equal(gguf_get_arr_info(f, "t.arr_empty", &et, &cnt, &e), 0);
    assert_int_equal(et, GGUF_VTYPE_UINT32), assert_int_equal(cnt, 0);
    assert_int_equal(gguf_get_arr_data(f, "t.arr_bool", &data, &e), 0);
    assert_memory_equal(data, "\x01\x00\x01", 3);
    assert_int_equal(gguf_get_arr_data(f, "t.arr_i64", &data, &e), 0);
    memcpy(&i64, data, 8), assert_int_equal(i64, -1);
    assert_int_equal(gguf_get_arr_info(f, "t.u8", &et, &cnt, &e), -1);

    /* Tensors. */
    tspec t[N_SAMPLE_T];
    sample_tensors(t, 16);
    assert_int_equal(gguf_n_tensors(f), N_SAMPLE_T);
    for (int i = 0; i < N_SAMPLE_T; i++) {
        const gguf_tensor *g = gguf_tensor_at(f, (uint64_t)i);
        assert_non_null(g);
        assert_ptr_equal(gguf_find_tensor(f, t[i].name), g);
        assert_string_equal(g->name, t[i].name);
        assert_int_equal(g->n_dims, t[i].n_dims);
        uint64_t nel = 1;
        for (int d = 0; d < 4; d++) assert_int_equal(g->ne[d], t[i].ne[d]), nel *= t[i].ne[d];
        assert_int_equal(g->nelements, nel);
        assert_int_equal(g->type, t[i].type);
        assert_int_equal(g->offset, L.t_off[i]);
        assert_int_equal(g->offset % 64, 0);
        assert_int_equal(g->nbytes, t[i].data.n);
        assert_memory_equal(g->data, t[i].data.p, t[i].data.n);
        assert_memory_equal(g->data, b.p + L.data_off + L.t_off[i], t[i].data.n);
    }
    assert_null(gguf_tensor_at(f, N_SAMPLE_T));
    assert_null(gguf_find_tensor(f, "zz"));
    assert_null(gguf_find_tensor(f, ""));

    float out[512];
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "a"), 1, 2, out, &e), 0);
    for (int i = 0; i < 8; i++) assert_true(out[i] == (float)(i + 4) * 0.25f - 1.0f);
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "b"), 0, 1, out, &e), 0);
    for (int i = 0; i < 8; i++) assert_true(out[i] == (float)i - 3.5f);
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "c"), 0, 2, out, &e), 0);
    for (int i = 0; i < 128; i++) assert_true(out[i] == 0.5f * (float)(i / 32 + 1) * (float)(i % 32 - 16));
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "e"), 0, 2, out, &e), 0);
    float row1[256];
    ggml_dequantize_row_q4_k(gguf_find_tensor(f, "e")->data + 144, row1, 256);
    assert_memory_equal(out + 256, row1, sizeof row1);
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "c"), 1, 2, out, &e), -1);
    assert_non_null(strstr(e.msg, "out of range"));
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "c"), UINT64_MAX, 2, out, &e), -1);
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "c"), 2, 0, out, &e), 0); /* empty range */
    assert_int_equal(gguf_tensor_rows_to_f32(gguf_find_tensor(f, "d"), 0, 1, out, &e), -1);
    assert_non_null(strstr(e.msg, "IQ4_NL"));
    assert_int_equal(gguf_tensor_rows_to_f32(NULL, 0, 1, out, &e), -1);

    free_tensors(t);
    gguf_close(f);
    gguf_close(NULL);
    free(b.p);
}

static void test_variants_open(void **state) {
    (void)state;
    buf b = {0};
    sample_layout L;
    qerr e = {{0}};
    gguf_file *f;

    /* No general.alignment: default 32. */
    build_sample(&b, &(sample_opts){.no_align_key = 1}, &L);
    f = open_bytes(b.p, b.n, &e);
    if (!f) fail_msg("%s", e.msg);
    assert_int_equal(gguf_alignment(f), 32);
    assert_int_equal(gguf_data_offset(f) % 32, 0);
    assert_int_equal(gguf_find_tensor(f, "c")->offset, 96);
    gguf_close(f);

    /* Version 2 has the same layout. */
    build_sample(&b, NULL, &L);
    patch_u32(&b, L.off_version, 2);
    f = open_bytes(b.p, b.n, &e);
    if (!f) fail_msg("%s", e.msg);
    assert_int_equal(gguf_version(f), 2);
    gguf_close(f);

    /* The last tensor may lack its trailing padding (llama.cpp accepts that). */
    build_sample(&b, &(sample_opts){.last_ne0 = 10, .no_tail_pad = 1}, &L);
    assert_int_equal(b.n % 64, 40);
    f = open_bytes(b.p, b.n, &e);
    if (!f) fail_msg("%s", e.msg);
    gguf_close(f);

    /* A 63-byte tensor name is the longest allowed; nesting 8 deep is allowed. */
    build_sample(&b, &(sample_opts){.name0 = "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn",
                                    .nest_depth = 8},
                 &L);
    f = open_bytes(b.p, b.n, &e);
    if (!f) fail_msg("%s", e.msg);
    gguf_close(f);

    /* No tensors, no KVs: a bare header. */
    buf h = {0};
    put_u32(&h, 0x46554747u), put_u32(&h, 3), put_u64(&h, 0), put_u64(&h, 0);
    f = open_bytes(h.p, h.n, &e);
    if (!f) fail_msg("%s", e.msg);
    assert_int_equal(gguf_n_tensors(f), 0);
    assert_int_equal(gguf_n_kv(f), 0);
    assert_null(gguf_find_tensor(f, "a"));
    assert_false(gguf_has_key(f, "a"));
    gguf_close(f);
    free(h.p);
    free(b.p);
}

/* ---- 2. corrupt inputs ---- */

static void test_corrupt_header(void **state) {
    (void)state;
    buf b = {0};
    sample_layout L;
    build_sample(&b, NULL, &L);
    buf c = {0};
    put(&c, b.p, b.n);
#define RESET() memcpy(c.p, b.p, b.n)

    RESET(), c.p[0] = 'X';
    expect_fail(c.p, c.n, "not a GGUF file");
    RESET(), patch_u32(&c, L.off_version, 1);
    expect_fail(c.p, c.n, "version 1");
    RESET(), patch_u32(&c, L.off_version, 4);
    expect_fail(c.p, c.n, "version 4");
    RESET(), patch_u32(&c, L.off_version, 0x03000000u);
    expect_fail(c.p, c.n, "big-endian");
    RESET(), patch_u64(&c, L.off_n_kv, 1ull << 40);
    expect_fail(c.p, c.n, "KV count 1099511627776 exceeds the limit");
    RESET(), patch_u64(&c, L.off_n_kv, 1000);
    expect_fail(c.p, c.n, "1000 KVs and 6 tensor infos need at least");
    RESET(), patch_u64(&c, L.off_n_tensors, UINT64_MAX);
    expect_fail(c.p, c.n, "tensor count 18446744073709551615 exceeds the limit");
    RESET(), patch_u64(&c, L.off_n_tensors, 1u << 20);
    expect_fail(c.p, c.n, "need at least");
    /* One more tensor than written: the data gets parsed as a tensor info. */
    RESET(), patch_u64(&c, L.off_n_tensors, N_SAMPLE_T + 1);
    expect_fail(c.p, c.n, NULL);

    expect_fail(b.p, 0, "too small");
    expect_fail(b.p, 23, "too small");

    qerr e = {{0}};
    gguf_file *f = (gguf_file *)0x1;
    assert_int_equal(gguf_open("/nonexistent/dir/x.gguf", &f, &e), -1);
    assert_null(f);
    assert_non_null(strstr(e.msg, "/nonexistent/dir/x.gguf"));
    assert_non_null(strstr(e.msg, "No such file"));
    assert_int_equal(gguf_open("tests", &f, &e), -1);
    assert_non_null(strstr(e.msg, "not a regular file"));
#undef RESET
    free(b.p);
    free(c.p);
}

static void test_corrupt_kv(void **state) {
    (void)state;
    buf b = {0}, c = {0};
    sample_layout L;
    build_sample(&b, NULL, &L);
    put(&c, b.p, b.n);
#define RESET() memcpy(c.p, b.p, b.n)

    RESET(), c.p[L.off_bool_value] = 2;
    expect_fail(c.p, c.n, "bool value 2");
    RESET(), patch_u32(&c, L.off_u8_type, 13);
    expect_fail(c.p, c.n, "unknown value type 13");
    RESET(), patch_u32(&c, L.off_arr_u8_elem, 77);
    expect_fail(c.p, c.n, "unknown array element type 77");
    RESET(), patch_u64(&c, L.off_arr_u8_count, 1ull << 60);
    expect_fail(c.p, c.n, "t.arr_u8");
    RESET(), patch_u64(&c, L.off_str_len, 1ull << 62);
    expect_fail(c.p, c.n, "truncated");
    RESET(), patch_u64(&c, L.off_str_len, UINT64_MAX);
    expect_fail(c.p, c.n, "truncated");
    RESET(), patch_u64(&c, L.off_key0_chars - 8, 0);
    expect_fail(c.p, c.n, "empty key");
    RESET(), patch_u64(&c, L.off_key0_chars - 8, 1ull << 40);
    expect_fail(c.p, c.n, "key");
    RESET(), c.p[L.off_key0_chars + 3] = 0;
    expect_fail(c.p, c.n, "NUL");
#undef RESET

    build_sample(&b, &(sample_opts){.dup_key = 1}, &L);
    expect_fail(b.p, b.n, "duplicate key");
    build_sample(&b, &(sample_opts){.nest_depth = 9}, &L);
    expect_fail(b.p, b.n, "nested deeper");
    build_sample(&b, &(sample_opts){.nest_depth = 5000}, &L);
    expect_fail(b.p, b.n, "nested deeper");
    build_sample(&b, &(sample_opts){.align = 48}, &L);
    expect_fail(b.p, b.n, "power of two");
    build_sample(&b, &(sample_opts){.align = 0x80000001u}, &L);
    expect_fail(b.p, b.n, "power of two");
    build_sample(&b, &(sample_opts){.align = 64, .align_type = GGUF_VTYPE_UINT64}, &L);
    expect_fail(b.p, b.n, "general.alignment has type uint64");
    free(b.p);
    free(c.p);
}

static void test_corrupt_tensors(void **state) {
    (void)state;
    buf b = {0}, c = {0};
    sample_layout L;
    build_sample(&b, NULL, &L);
    put(&c, b.p, b.n);
#define RESET() memcpy(c.p, b.p, b.n)
    const int F = N_SAMPLE_T - 1; /* last tensor "f", F32 {16} */

    RESET(), patch_u64(&c, L.off_offset[F], L.t_off[F] + 64);
    expect_fail(c.p, c.n, "ends past the end of the file");
    RESET(), patch_u64(&c, L.off_offset[F], 1ull << 62);
    expect_fail(c.p, c.n, "ends past the end of the file");
    RESET(), patch_u64(&c, L.off_offset[F], UINT64_MAX - 63);
    expect_fail(c.p, c.n, "ends past the end of the file");
    RESET(), patch_u64(&c, L.off_dim0[F], 17);
    expect_fail(c.p, c.n, "ends past the end of the file");
    RESET(), patch_u64(&c, L.off_dim0[F], 1ull << 61);
    expect_fail(c.p, c.n, "ends past the end of the file");
    RESET(), patch_u32(&c, L.off_type[1], 200);
    expect_fail(c.p, c.n, "unknown ggml tensor type 200");
    RESET(), patch_u32(&c, L.off_type[1], 4); /* removed Q4_2 */
    expect_fail(c.p, c.n, "unknown ggml tensor type 4");
    RESET(), patch_u32(&c, L.off_type[0], GGML_TYPE_Q8_0); /* ne0 = 4 */
    expect_fail(c.p, c.n, "not a multiple of the Q8_0 block size");
    RESET(), patch_u32(&c, L.off_ndims[0], 0);
    expect_fail(c.p, c.n, "n_dims 0");
    RESET(), patch_u32(&c, L.off_ndims[0], 5);
    expect_fail(c.p, c.n, "n_dims 5");
    RESET(), patch_u64(&c, L.off_dim0[0], 0);
    expect_fail(c.p, c.n, "dimension 0 is zero");
    RESET(), patch_u64(&c, L.off_dim0[0], 1ull << 40), patch_u64(&c, L.off_dim0[0] + 8, 1ull << 40);
    expect_fail(c.p, c.n, "overflows");
    RESET(), patch_u64(&c, L.off_offset[1], 65);
    expect_fail(c.p, c.n, "not a multiple of the alignment");
    RESET(), patch_u64(&c, L.off_offset[1], 0);
    expect_fail(c.p, c.n, "overlap");
    RESET(), c.p[L.off_name[1]] = 'a';
    expect_fail(c.p, c.n, "duplicate tensor name");
    RESET(), c.p[L.off_name[1]] = 0;
    expect_fail(c.p, c.n, "NUL");
#undef RESET
    build_sample(&b, &(sample_opts){.name0 = "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn"}, &L);
    expect_fail(b.p, b.n, "name length 64");
    free(b.p);
    free(c.p);
}

/* Truncating a valid file anywhere must fail cleanly. The sample's last tensor
 * ends on an alignment boundary, so every proper prefix is missing data. */
static void test_truncation_every_offset(void **state) {
    (void)state;
    buf b = {0};
    sample_layout L;
    build_sample(&b, NULL, &L);
    for (size_t n = 0; n < b.n; n++) expect_fail(b.p, n, NULL);
    /* And a few with the kv/tensor section messages we expect. */
    expect_fail(b.p, L.off_str_len + 4, "truncated");
    expect_fail(b.p, L.off_ndims[2] + 2, "n_dims");
    expect_fail(b.p, L.data_off + 10, "ends past the end of the file");
    free(b.p);
}

/* Random byte corruption: gguf_open either fails with a message or returns a
 * file whose every pointer lies inside the file and whose every accessor works. */
static void test_random_corruption(void **state) {
    (void)state;
    buf b = {0}, c = {0};
    sample_layout L;
    build_sample(&b, NULL, &L);
    put(&c, b.p, b.n);
    int n_ok = 0;
    float *row = malloc(4096 * sizeof(float));
    for (uint64_t it = 0; it < 3000; it++) {
        memcpy(c.p, b.p, b.n);
        int nflip = 1 + (int)(rng_u64(7, it, 0) % 4);
        for (int k = 0; k < nflip; k++) {
            uint64_t r = rng_u64(7, it, (uint64_t)k + 1);
            /* Mostly the metadata region, where structure lives. */
            size_t pos = (size_t)((r >> 8) % (k == 0 ? L.data_off : b.n));
            c.p[pos] = (r & 1) ? (uint8_t)(r >> 1) : (uint8_t)(c.p[pos] ^ (1u << ((r >> 1) % 8)));
        }
        qerr e = {{0}};
        gguf_file *f = open_bytes(c.p, c.n, &e);
        if (!f) {
            assert_true(e.msg[0] != 0);
            assert_null(strchr(e.msg, '\n'));
            continue;
        }
        n_ok++;
        for (uint64_t i = 0; i < gguf_n_kv(f); i++) {
            const char *key = gguf_kv_key(f, i);
            assert_non_null(key);
            gguf_vtype et;
            uint64_t cnt, u;
            const char *s;
            size_t len;
            if (gguf_get_arr_info(f, key, &et, &cnt, &e) == 0 && et == GGUF_VTYPE_STRING)
                for (uint64_t j = 0; j < cnt; j++) {
                    assert_int_equal(gguf_get_arr_str(f, key, j, &s, &len, &e), 0);
                    volatile char sink = len ? s[len - 1] : 0;
                    (void)sink;
                }
            if (gguf_get_str(f, key, &s, &len, &e) == 0 && len) {
                volatile char sink = s[len - 1];
                (void)sink;
            }
            (void)gguf_get_u64(f, key, &u, &e);
        }
        for (uint64_t i = 0; i < gguf_n_tensors(f); i++) {
            const gguf_tensor *t = gguf_tensor_at(f, i);
            assert_true(gguf_data_offset(f) + t->offset + t->nbytes <= c.n);
            assert_ptr_equal(gguf_find_tensor(f, t->name), t);
            uint64_t rows = t->nelements / t->ne[0];
            if (ggml_type_can_dequantize(t->type) && t->ne[0] <= 4096)
                for (uint64_t r = 0; r < rows; r++) assert_int_equal(gguf_tensor_rows_to_f32(t, r, 1, row, &e), 0);
        }
        gguf_close(f);
    }
    print_message("[gguf] random corruption: %d of 3000 mutated files still opened (all accessors in bounds)\n",
                  n_ok);
    free(row);
    free(b.p);
    free(c.p);
}

/* ---- 3. dequantization and quantization against gguf-py ---- */

static gguf_file *open_fixture(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0)
        fail_msg("fixture %s is missing: run `python3 scripts/make_ggml_fixtures.py --model %s` from the repo root",
                 path, MODEL_PATH);
    qerr e = {{0}};
    gguf_file *f = NULL;
    if (gguf_open(path, &f, &e) != 0) fail_msg("%s", e.msg);
    return f;
}

static void test_dequant_vs_gguf_py(void **state) {
    (void)state;
    gguf_file *f = open_fixture(TYPES_FIXTURE);
    static const struct { const char *name; uint32_t type; } cases[] = {
        {"f32", GGML_TYPE_F32},   {"f16", GGML_TYPE_F16},   {"bf16", GGML_TYPE_BF16}, {"q8_0", GGML_TYPE_Q8_0},
        {"q4_0", GGML_TYPE_Q4_0}, {"q4_1", GGML_TYPE_Q4_1}, {"q4_k", GGML_TYPE_Q4_K}, {"q6_k", GGML_TYPE_Q6_K},
        {"q5_0", GGML_TYPE_Q5_0}, {"q5_1", GGML_TYPE_Q5_1}, {"q5_k", GGML_TYPE_Q5_K},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char ename[64];
        snprintf(ename, sizeof ename, "%s.expected", cases[c].name);
        const gguf_tensor *t = gguf_find_tensor(f, cases[c].name), *x = gguf_find_tensor(f, ename);
        if (!t || !x) fail_msg("fixture lacks %s or %s", cases[c].name, ename);
        assert_int_equal(t->type, cases[c].type);
        assert_int_equal(x->type, GGML_TYPE_F32);
        assert_int_equal(t->ne[0], x->ne[0]);
        assert_int_equal(t->nelements, x->nelements);
        const uint64_t n = t->nelements, rows = n / t->ne[0];
        float *got = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
        qerr e = {{0}};
        if (gguf_tensor_rows_to_f32(t, 0, rows, got, &e) != 0) fail_msg("%s", e.msg);
        memcpy(want, x->data, n * sizeof(float));
        size_t bad;
        if (!float_bits_equal(got, want, n, &bad))
            fail_msg("%s: element %zu (row %zu col %zu) = %.9g, gguf-py says %.9g", cases[c].name, bad,
                     bad / (size_t)t->ne[0], bad % (size_t)t->ne[0], got[bad], want[bad]);
        /* Row ranges agree with the whole. */
        if (rows > 1) {
            assert_int_equal(gguf_tensor_rows_to_f32(t, 1, rows - 1, got, &e), 0);
            assert_memory_equal(got, want + t->ne[0], (rows - 1) * t->ne[0] * sizeof(float));
        }
        free(got);
        free(want);
    }
    gguf_close(f);
}

static void test_quantizers_vs_gguf_py(void **state) {
    (void)state;
    gguf_file *f = open_fixture(TYPES_FIXTURE);
    const gguf_tensor *src = gguf_find_tensor(f, "src");
    assert_non_null(src);
    assert_int_equal(src->type, GGML_TYPE_F32);
    const uint64_t n = src->nelements;
    float *x = malloc(n * sizeof(float));
    memcpy(x, src->data, n * sizeof(float));
    uint8_t *q = malloc(n / 32 * 34);
    static const struct {
        const char *name;
        void (*quantize)(const float *, void *, int64_t);
        size_t bytes;
    } cases[] = {
        {"q8_0", ggml_quantize_row_q8_0_ref, 34},
        {"q4_0", ggml_quantize_row_q4_0_ref, 18},
        {"q4_1", ggml_quantize_row_q4_1_ref, 20},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const gguf_tensor *t = gguf_find_tensor(f, cases[c].name);
        assert_non_null(t);
        assert_int_equal(t->nbytes, n / 32 * cases[c].bytes);
        /* Row by row, as the caller would. */
        for (uint64_t r = 0; r < n / src->ne[0]; r++)
            cases[c].quantize(x + r * src->ne[0], q + r * src->ne[0] / 32 * cases[c].bytes, (int64_t)src->ne[0]);
        for (uint64_t blk = 0; blk < n / 32; blk++)
            if (memcmp(q + blk * cases[c].bytes, t->data + blk * cases[c].bytes, cases[c].bytes) != 0)
                fail_msg("%s: block %llu (row %llu) differs from gguf.quants.quantize", cases[c].name,
                         (unsigned long long)blk, (unsigned long long)(blk * 32 / src->ne[0]));
    }
    free(x);
    free(q);
    gguf_close(f);
}

static void test_quants_api(void **state) {
    (void)state;
    uint32_t blck, ts;
    assert_int_equal(ggml_type_info(GGML_TYPE_Q4_K, &blck, &ts), 0);
    assert_int_equal(blck, 256), assert_int_equal(ts, 144);
    assert_int_equal(ggml_type_info(GGML_TYPE_Q6_K, &blck, &ts), 0);
    assert_int_equal(blck, 256), assert_int_equal(ts, 210);
    assert_int_equal(ggml_type_info(GGML_TYPE_Q4_1, &blck, &ts), 0);
    assert_int_equal(blck, 32), assert_int_equal(ts, 20);
    assert_int_equal(ggml_type_info(4, &blck, &ts), -1);
    assert_int_equal(ggml_type_info(9, &blck, &ts), -1);
    assert_int_equal(ggml_type_info(1000, &blck, &ts), -1);
    assert_string_equal(ggml_type_name(GGML_TYPE_BF16), "BF16");
    assert_string_equal(ggml_type_name(6), "Q5_0");
    assert_string_equal(ggml_type_name(99), "unknown");
    float dst[64];
    uint8_t src[68] = {0};
    assert_int_equal(ggml_dequantize_row(GGML_TYPE_Q8_0, src, dst, 33), -1);
    assert_int_equal(ggml_dequantize_row(20, src, dst, 32), -1);
    assert_int_equal(ggml_dequantize_row(GGML_TYPE_Q8_0, src, dst, 64), 0);
    for (int i = 0; i < 64; i++) assert_true(dst[i] == 0.0f);
    /* Q8_0 ties round away from zero (roundf), as ggml and numpy's np_roundf. */
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)j - 15.5f;
    x[0] = -127.0f;
    uint8_t blk[34];
    ggml_quantize_row_q8_0_ref(x, blk, 32);
    assert_int_equal(blk[0] | blk[1] << 8, 0x3c00); /* d = 1.0 */
    assert_int_equal((int8_t)blk[2 + 1], -15);       /* -14.5 -> -15 */
    assert_int_equal((int8_t)blk[2 + 16], 1);        /* 0.5 -> 1 */
    assert_int_equal((int8_t)blk[2 + 31], 16);       /* 15.5 -> 16 */
}

/* ---- 4. the real model ---- */

static void test_real_model(void **state) {
    (void)state;
    struct stat st;
    if (stat(MODEL_PATH, &st) != 0)
        fail_msg("%s is missing: run `make model` (the real-model test needs it)", MODEL_PATH);
    qerr e = {{0}};
    gguf_file *f = NULL;
    if (gguf_open(MODEL_PATH, &f, &e) != 0) fail_msg("%s", e.msg);

    uint32_t u;
    float fv;
    assert_int_equal(gguf_n_tensors(f), 272);
    assert_int_equal(gguf_get_u32(f, "llama.block_count", &u, &e), 0), assert_int_equal(u, 30);
    assert_int_equal(gguf_get_u32(f, "llama.embedding_length", &u, &e), 0), assert_int_equal(u, 576);
    assert_int_equal(gguf_get_u32(f, "llama.attention.head_count", &u, &e), 0), assert_int_equal(u, 9);
    assert_int_equal(gguf_get_u32(f, "llama.attention.head_count_kv", &u, &e), 0), assert_int_equal(u, 3);
    assert_int_equal(gguf_get_f32(f, "llama.rope.freq_base", &fv, &e), 0), assert_true(fv == 100000.0f);
    gguf_vtype et;
    uint64_t cnt;
    assert_int_equal(gguf_get_arr_info(f, "tokenizer.ggml.tokens", &et, &cnt, &e), 0);
    assert_int_equal(et, GGUF_VTYPE_STRING), assert_int_equal(cnt, 49152);
    const char *s;
    size_t len;
    assert_int_equal(gguf_get_arr_str(f, "tokenizer.ggml.tokens", 1, &s, &len, &e), 0);
    assert_int_equal(len, strlen("<|im_start|>"));
    assert_memory_equal(s, "<|im_start|>", len);
    assert_int_equal(gguf_get_arr_str(f, "tokenizer.ggml.tokens", 49151, &s, &len, &e), 0);
    assert_int_equal(gguf_get_str(f, "general.architecture", &s, &len, &e), 0);
    assert_int_equal(len, 5), assert_memory_equal(s, "llama", 5);

    const gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    assert_non_null(emb);
    assert_int_equal(emb->type, GGML_TYPE_Q8_0);
    assert_int_equal(emb->n_dims, 2);
    assert_int_equal(emb->ne[0], 576), assert_int_equal(emb->ne[1], 49152);
    assert_null(gguf_find_tensor(f, "output.weight")); /* tied embeddings */
    const gguf_tensor *q = gguf_find_tensor(f, "blk.0.attn_q.weight");
    assert_non_null(q);
    assert_int_equal(q->type, GGML_TYPE_Q4_1);
    for (uint64_t i = 0; i < gguf_n_tensors(f); i++) assert_true(ggml_type_can_dequantize(gguf_tensor_at(f, i)->type));

    /* Dequantized rows against gguf-py. */
    gguf_file *x = open_fixture(MODEL_FIXTURE);
    uint64_t msize;
    assert_int_equal(gguf_get_u64(x, "fixture.model_size", &msize, &e), 0);
    if (msize != (uint64_t)st.st_size)
        fail_msg("%s is %lld bytes but %s was made from a %llu-byte model: regenerate it", MODEL_PATH,
                 (long long)st.st_size, MODEL_FIXTURE, (unsigned long long)msize);
    static const struct { const char *tensor, *expected; uint64_t row0, nrows; } cases[] = {
        {"blk.0.attn_q.weight", "attn_q.rows_0_2", 0, 2},
        {"token_embd.weight", "token_embd.row_100", 100, 1},
        {"blk.0.attn_norm.weight", "attn_norm", 0, 1},
    };
    float got[2 * 576], want[2 * 576];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const gguf_tensor *t = gguf_find_tensor(f, cases[c].tensor), *w = gguf_find_tensor(x, cases[c].expected);
        assert_non_null(t);
        assert_non_null(w);
        const uint64_t n = cases[c].nrows * t->ne[0];
        assert_int_equal(w->nelements, n);
        if (gguf_tensor_rows_to_f32(t, cases[c].row0, cases[c].nrows, got, &e) != 0) fail_msg("%s", e.msg);
        memcpy(want, w->data, n * sizeof(float));
        size_t bad;
        if (!float_bits_equal(got, want, n, &bad))
            fail_msg("%s rows %llu+: element %zu = %.9g, gguf-py says %.9g", cases[c].tensor,
                     (unsigned long long)cases[c].row0, bad, got[bad], want[bad]);
    }
    gguf_close(x);

    /* The real file's metadata truncated at 41 places (inside the 49152-token
     * and merges arrays, the tensor infos, the first tensor) fails cleanly. */
    const uint64_t head = gguf_data_offset(f) + 4096;
    uint8_t *bytes = malloc(head);
    FILE *fp = fopen(MODEL_PATH, "rb");
    assert_non_null(fp);
    assert_int_equal(fread(bytes, 1, head, fp), head);
    fclose(fp);
    for (uint64_t k = 0; k <= 40; k++) expect_fail(bytes, (size_t)(head * k / 41 + k), k == 0 ? NULL : "truncated");
    free(bytes);
    gguf_close(f);
}

/* ---- model metadata that changes the maths: refused by name, never trained as another model ---- */

/* A minimal llama GGUF: the hyper-parameter keys, token_embd and one block's
 * attn_norm, plus one extra key or tensor chosen by `what`; returns
 * llama_hparams_from_gguf's result with its message in e. */
/* "<arch>.<suffix>" for the variants' keys (a ring of buffers: several per expression). */
static const char *vkey(const char *arch, const char *suffix) {
    static char ring[8][96];
    static unsigned next;
    char *b = ring[next++ % 8];
    snprintf(b, sizeof ring[0], "%s.%s", arch, suffix);
    return b;
}

static int hparams_of_variant_hp(const char *what, llama_hparams *hp, qerr *e) {
    const char *arch = !strncmp(what, "phi3", 4) ? "phi3" : !strcmp(what, "gemma2") ? "gemma2"
                       : !strncmp(what, "qwen2", 5) ? "qwen2" : "llama";
    static float emb[16 * 8], norm[8], freqs[4];
    for (int i = 0; i < 16 * 8; i++) emb[i] = 0.01f * (float)i;
    for (int i = 0; i < 8; i++) norm[i] = 1.0f;
    for (int i = 0; i < 4; i++) freqs[i] = 1.0f + (float)i;
    gguf_writer *w;
    assert_int_equal(gguf_writer_init(&w, e), 0);
    gguf_writer_add_str(w, "general.architecture", arch);
    gguf_writer_add_u32(w, vkey(arch, "block_count"), 1);
    if (!strcmp(what, "experts")) gguf_writer_add_u32(w, vkey(arch, "expert_count"), 8);
    gguf_writer_add_u32(w, vkey(arch, "embedding_length"), 8);
    gguf_writer_add_u32(w, vkey(arch, "attention.head_count"), 1);
    gguf_writer_add_u32(w, vkey(arch, "feed_forward_length"), 16);
    gguf_writer_add_f32(w, vkey(arch, "rope.freq_base"), strcmp(what, "theta0") ? 10000.0f : 0.0f);
    gguf_writer_add_f32(w, vkey(arch, "attention.layer_norm_rms_epsilon"),
                        !strcmp(what, "epsnan") ? NAN : !strcmp(what, "epsneg") ? -1.0f : 1e-5f);
    if (!strcmp(what, "scaling_type")) gguf_writer_add_str(w, vkey(arch, "rope.scaling.type"), "yarn");
    if (!strcmp(what, "scaling_none")) gguf_writer_add_str(w, vkey(arch, "rope.scaling.type"), "none");
    if (!strcmp(what, "scaling_factor")) gguf_writer_add_f32(w, vkey(arch, "rope.scaling.factor"), 8.0f);
    if (!strcmp(what, "scaling_linear")) gguf_writer_add_str(w, vkey(arch, "rope.scaling.type"), "linear");
    if (!strcmp(what, "scaling_linear")) gguf_writer_add_f32(w, vkey(arch, "rope.scaling.factor"), 4.0f);
    if (!strcmp(what, "attn_factor")) gguf_writer_add_f32(w, vkey(arch, "rope.scaling.attn_factor"), 1.5f);
    if (!strcmp(what, "softcap")) gguf_writer_add_f32(w, vkey(arch, "final_logit_softcapping"), 30.0f);
    if (!strcmp(what, "window")) gguf_writer_add_u32(w, vkey(arch, "attention.sliding_window"), 4096);
    if (!strcmp(what, "rotary")) gguf_writer_add_u32(w, vkey(arch, "rope.dimension_count"), 4);
    uint64_t ne_emb[2] = {8, 16}, ne_norm[1] = {8}, ne_f[1] = {4};
    gguf_writer_add_tensor(w, "token_embd.weight", GGML_TYPE_F32, 2, ne_emb, emb, sizeof emb);
    gguf_writer_add_tensor(w, "blk.0.attn_norm.weight", GGML_TYPE_F32, 1, ne_norm, norm, sizeof norm);
    if (!strcmp(what, "rope_freqs")) gguf_writer_add_tensor(w, "rope_freqs.weight", GGML_TYPE_F32, 1, ne_f, freqs, sizeof freqs);
    uint64_t ne_f3[1] = {3};
    if (!strcmp(what, "rope_freqs_len"))
        gguf_writer_add_tensor(w, "rope_freqs.weight", GGML_TYPE_F32, 1, ne_f3, freqs, 3 * sizeof(float));
    if (!strcmp(what, "extra_block"))
        gguf_writer_add_tensor(w, "blk.1.attn_norm.weight", GGML_TYPE_F32, 1, ne_norm, norm, sizeof norm);
    if (!strcmp(what, "bias") || !strcmp(what, "qwen2"))
        gguf_writer_add_tensor(w, "blk.0.attn_q.bias", GGML_TYPE_F32, 1, ne_norm, norm, sizeof norm);
    if (!strcmp(what, "qwen2_obias"))
        gguf_writer_add_tensor(w, "blk.0.attn_output.bias", GGML_TYPE_F32, 1, ne_norm, norm, sizeof norm);
    if (!strcmp(what, "qknorm"))
        gguf_writer_add_tensor(w, "blk.0.attn_q_norm.weight", GGML_TYPE_F32, 1, ne_norm, norm, sizeof norm);
    /* Phi-3 128k's longrope factors; a separate linear in a phi3 file; a fused one in a llama file */
    if (!strcmp(what, "phi3_longrope"))
        gguf_writer_add_tensor(w, "rope_factors_long.weight", GGML_TYPE_F32, 1, ne_f, freqs, sizeof freqs);
    if (!strcmp(what, "phi3_split"))
        gguf_writer_add_tensor(w, "blk.0.attn_q.weight", GGML_TYPE_F32, 1, ne_norm, norm, sizeof norm);
    if (!strcmp(what, "fused_on_llama"))
        gguf_writer_add_tensor(w, "blk.0.attn_qkv.weight", GGML_TYPE_F32, 1, ne_norm, norm, sizeof norm);
    tmp_init();
    assert_int_equal(gguf_writer_write(w, tmp_path, e), 0);
    gguf_writer_free(w);
    gguf_file *f = NULL;
    assert_int_equal(gguf_open(tmp_path, &f, e), 0);
    int rc = llama_hparams_from_gguf(f, hp, e);
    gguf_close(f);
    return rc;
}

static int hparams_of_variant(const char *what, qerr *e) {
    llama_hparams hp;
    return hparams_of_variant_hp(what, &hp, e);
}

static void test_model_metadata_refused(void **state) {
    (void)state;
    qerr e = {{0}};
    if (hparams_of_variant("plain", &e)) fail_msg("the plain variant must load: %s", e.msg);
    if (hparams_of_variant("scaling_none", &e)) fail_msg("rope scaling none must load: %s", e.msg);
    /* RoPE scaling that is implemented: read into hp.rope_scaling, never dropped (a Llama 3.1/3.2 GGUF's
     * rope_freqs must not train with the default RoPE; tests/test_reference_family.c checks the maths) */
    llama_hparams hp;
    if (hparams_of_variant_hp("rope_freqs", &hp, &e)) fail_msg("rope_freqs must load: %s", e.msg);
    assert_int_equal(hp.rope_scaling.type, LLAMA_ROPE_FREQ_FACTORS);
    for (int i = 0; i < 4; i++) assert_true(hp.rope_scaling.freq_factors[i] == 1.0f + (float)i);
    if (hparams_of_variant_hp("scaling_factor", &hp, &e)) fail_msg("a linear factor must load: %s", e.msg);
    assert_int_equal(hp.rope_scaling.type, LLAMA_ROPE_LINEAR);
    assert_true(hp.rope_scaling.factor == 8.0f);
    if (hparams_of_variant_hp("scaling_linear", &hp, &e)) fail_msg("linear scaling must load: %s", e.msg);
    assert_int_equal(hp.rope_scaling.type, LLAMA_ROPE_LINEAR);
    assert_true(hp.rope_scaling.factor == 4.0f);
    /* qwen2: the same keys under qwen2.*, q/k/v biases allowed */
    if (hparams_of_variant_hp("qwen2", &hp, &e)) fail_msg("a qwen2 file must load: %s", e.msg);
    assert_int_equal(hp.arch, LLAMA_ARCH_QWEN2);
    assert_int_equal(hp.qkv_bias, 1);
    if (hparams_of_variant_hp("phi3", &hp, &e)) fail_msg("a phi3 file must load: %s", e.msg);
    assert_int_equal(hp.arch, LLAMA_ARCH_PHI3);
    assert_int_equal(hp.qkv_bias, 0);
    if (hparams_of_variant_hp("window", &hp, &e)) fail_msg("a sliding window must load: %s", e.msg);
    assert_int_equal(hp.sliding_window, 4096); /* bounds sequence_len (trainer/run.c) */
    float inv[4];
    if (hparams_of_variant_hp("scaling_linear", &hp, &e)) fail_msg("linear scaling must load: %s", e.msg);
    llama_rope_inv_freq(&hp, inv);
    assert_true(inv[0] == 0.25f); /* 1/theta^0 / factor */
    static const struct { const char *what, *want; } cases[] = {
        {"rope_freqs_len", "rope_freqs.weight"},        /* not head_dim/2 factors */
        {"scaling_type", "llama.rope.scaling.type"},    /* yarn */
        {"attn_factor", "llama.rope.scaling.attn_factor"},
        {"softcap", "llama.final_logit_softcapping"},
        {"experts", "llama.expert_count"},              /* Mixtral */
        {"gemma2", "general.architecture"},             /* an architecture not implemented: named */
        {"phi3_longrope", "rope_factors_long.weight"},  /* longrope (Phi-3 128k) */
        {"phi3_split", "blk.0.attn_q.weight"},          /* phi3 is read fused (attn_qkv) */
        {"fused_on_llama", "blk.0.attn_qkv.weight"},    /* llama is read separate */
        {"qwen2_obias", "blk.0.attn_output.bias"},      /* qwen2 has q/k/v biases only */
        {"rotary", "llama.rope.dimension_count"},
        {"extra_block", "blk.1.attn_norm.weight"},      /* more layers than block_count */
        {"bias", "blk.0.attn_q.bias"},
        {"qknorm", "blk.0.attn_q_norm.weight"},
        {"theta0", "llama.rope.freq_base"},
        {"epsnan", "llama.attention.layer_norm_rms_epsilon"},
        {"epsneg", "llama.attention.layer_norm_rms_epsilon"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        memset(&e, 0, sizeof e);
        if (hparams_of_variant(cases[i].what, &e) == 0) fail_msg("%s: loaded, expected a refusal", cases[i].what);
        if (!strstr(e.msg, cases[i].want)) fail_msg("%s: message does not name %s: %s", cases[i].what, cases[i].want, e.msg);
        if (strchr(e.msg, '\n')) fail_msg("%s: not one line: %s", cases[i].what, e.msg);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sample_roundtrip),
        cmocka_unit_test(test_variants_open),
        cmocka_unit_test(test_corrupt_header),
        cmocka_unit_test(test_corrupt_kv),
        cmocka_unit_test(test_corrupt_tensors),
        cmocka_unit_test(test_truncation_every_offset),
        cmocka_unit_test(test_random_corruption),
        cmocka_unit_test(test_quants_api),
        cmocka_unit_test(test_dequant_vs_gguf_py),
        cmocka_unit_test(test_quantizers_vs_gguf_py),
        cmocka_unit_test(test_real_model),
        cmocka_unit_test(test_model_metadata_refused),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    if (tmp_path[0]) unlink(tmp_path);
    return rc;
}
