/* format/gguf_write.c — GGUF v3 writer (see gguf_write.h). The byte layout is
 * that of gguf-py's GGUFWriter (write_header_to_file, write_kv_data_to_file,
 * write_ti_data_to_file, write_tensors_to_file): KVs in insertion order,
 * tensor offsets aligned to 32, the data section padded to 32 before and
 * after every tensor. Files written here are read back by format/gguf.c in the
 * tests and by llama.cpp / gguf-py in `make test-interop`.
 */
#include "format/gguf_write.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/strbuf.h"
#include "format/gguf.h"
#include "quant/ggml_quants.h"

#define GGUFW_ALIGN 32u
#define GGUFW_MAX_NAME 64u

typedef struct gw_tensor {
    char *name;
    uint32_t type, n_dims;
    uint64_t ne[4];
    const void *data;
    uint64_t nbytes, offset;
} gw_tensor;

struct gguf_writer {
    strbuf kv;        /* serialized KVs */
    uint64_t n_kv;
    char **keys;
    size_t keys_cap;
    gw_tensor *t;
    uint64_t n_t, t_cap;
    int failed;
    qerr err;
};

int gguf_writer_init(gguf_writer **out, qerr *e) {
    *out = qcalloc(1, sizeof **out, e);
    return *out ? 0 : -1;
}

void gguf_writer_free(gguf_writer *w) {
    if (!w) return;
    free(w->kv.p);
    for (uint64_t i = 0; i < w->n_kv; i++) free(w->keys[i]);
    free(w->keys);
    for (uint64_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->t);
    free(w);
}

static void gw_fail(gguf_writer *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void gw_fail(gguf_writer *w, const char *fmt, ...) {
    if (w->failed) return;
    w->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->err.msg, sizeof w->err.msg, fmt, ap);
    va_end(ap);
}

static void gw_put(gguf_writer *w, const void *p, size_t n) {
    if (w->failed) return;
    strbuf_put(&w->kv, p, n);
    if (w->kv.oom) gw_fail(w, "out of memory building GGUF metadata");
}

static void gw_u32(gguf_writer *w, uint32_t v) { gw_put(w, &v, 4); }
static void gw_u64(gguf_writer *w, uint64_t v) { gw_put(w, &v, 8); }
static void gw_str(gguf_writer *w, const char *s, size_t n) {
    gw_u64(w, (uint64_t)n);
    gw_put(w, s, n);
}

/* Key + type; registers the key (duplicates are an error). */
static void gw_key(gguf_writer *w, const char *key, uint32_t type) {
    if (w->failed) return;
    if (!key || !*key) {
        gw_fail(w, "GGUF writer: empty key");
        return;
    }
    for (uint64_t i = 0; i < w->n_kv; i++)
        if (!strcmp(w->keys[i], key)) {
            gw_fail(w, "GGUF writer: key \"%s\" added twice", key);
            return;
        }
    if (w->n_kv == w->keys_cap) {
        size_t cap = w->keys_cap ? 2 * w->keys_cap : 32;
        char **nk = realloc(w->keys, cap * sizeof *nk);
        if (!nk) {
            gw_fail(w, "out of memory");
            return;
        }
        w->keys = nk;
        w->keys_cap = cap;
    }
    if (!(w->keys[w->n_kv] = strdup(key))) {
        gw_fail(w, "out of memory");
        return;
    }
    w->n_kv++;
    gw_str(w, key, strlen(key));
    gw_u32(w, type);
}

void gguf_writer_add_u32(gguf_writer *w, const char *key, uint32_t v) {
    gw_key(w, key, GGUF_VTYPE_UINT32);
    gw_u32(w, v);
}

void gguf_writer_add_i32(gguf_writer *w, const char *key, int32_t v) {
    gw_key(w, key, GGUF_VTYPE_INT32);
    gw_put(w, &v, 4);
}

void gguf_writer_add_f32(gguf_writer *w, const char *key, float v) {
    gw_key(w, key, GGUF_VTYPE_FLOAT32);
    gw_put(w, &v, 4);
}

void gguf_writer_add_bool(gguf_writer *w, const char *key, int v) {
    gw_key(w, key, GGUF_VTYPE_BOOL);
    uint8_t b = v ? 1 : 0;
    gw_put(w, &b, 1);
}

void gguf_writer_add_strn(gguf_writer *w, const char *key, const char *v, size_t len) {
    gw_key(w, key, GGUF_VTYPE_STRING);
    gw_str(w, v, len);
}

void gguf_writer_add_str(gguf_writer *w, const char *key, const char *v) { gguf_writer_add_strn(w, key, v, strlen(v)); }

void gguf_writer_add_arr_str(gguf_writer *w, const char *key, const char *const *v, const size_t *lens, uint64_t n) {
    gw_key(w, key, GGUF_VTYPE_ARRAY);
    gw_u32(w, GGUF_VTYPE_STRING);
    gw_u64(w, n);
    for (uint64_t i = 0; i < n; i++) gw_str(w, v[i], lens ? lens[i] : strlen(v[i]));
}

void gguf_writer_add_arr_i32(gguf_writer *w, const char *key, const int32_t *v, uint64_t n) {
    gw_key(w, key, GGUF_VTYPE_ARRAY);
    gw_u32(w, GGUF_VTYPE_INT32);
    gw_u64(w, n);
    gw_put(w, v, (size_t)n * 4);
}

void gguf_writer_add_arr_f32(gguf_writer *w, const char *key, const float *v, uint64_t n) {
    gw_key(w, key, GGUF_VTYPE_ARRAY);
    gw_u32(w, GGUF_VTYPE_FLOAT32);
    gw_u64(w, n);
    gw_put(w, v, (size_t)n * 4);
}

void gguf_writer_add_tensor(gguf_writer *w, const char *name, uint32_t tensor_type, int n_dims, const uint64_t *ne,
                            const void *data, size_t nbytes) {
    if (w->failed) return;
    size_t nl = name ? strlen(name) : 0;
    if (nl == 0 || nl >= GGUFW_MAX_NAME) {
        gw_fail(w, "GGUF writer: tensor name \"%s\" must have 1..63 bytes", name ? name : "");
        return;
    }
    if (n_dims < 1 || n_dims > 4) {
        gw_fail(w, "GGUF writer: tensor %s: %d dims (1..4)", name, n_dims);
        return;
    }
    uint32_t blck, tsz;
    if (ggml_type_info(tensor_type, &blck, &tsz)) {
        gw_fail(w, "GGUF writer: tensor %s: unknown ggml type %u", name, tensor_type);
        return;
    }
    uint64_t nel = 1;
    for (int d = 0; d < n_dims; d++) {
        if (ne[d] == 0) {
            gw_fail(w, "GGUF writer: tensor %s: dimension %d is 0", name, d);
            return;
        }
        nel *= ne[d];
    }
    if (ne[0] % blck || nel / blck * tsz != (uint64_t)nbytes) {
        gw_fail(w, "GGUF writer: tensor %s: %zu bytes do not match %llu elements of %s", name, nbytes,
                (unsigned long long)nel, ggml_type_name(tensor_type));
        return;
    }
    for (uint64_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name)) {
            gw_fail(w, "GGUF writer: tensor %s added twice", name);
            return;
        }
    if (w->n_t == w->t_cap) {
        uint64_t cap = w->t_cap ? 2 * w->t_cap : 64;
        gw_tensor *nt = realloc(w->t, cap * sizeof *nt);
        if (!nt) {
            gw_fail(w, "out of memory");
            return;
        }
        w->t = nt;
        w->t_cap = cap;
    }
    gw_tensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name))) {
        gw_fail(w, "out of memory");
        return;
    }
    t->type = tensor_type;
    t->n_dims = (uint32_t)n_dims;
    for (int d = 0; d < 4; d++) t->ne[d] = d < n_dims ? ne[d] : 1;
    t->data = data;
    t->nbytes = nbytes;
    w->n_t++;
}

static uint64_t pad_to(uint64_t x) { return (x + GGUFW_ALIGN - 1) / GGUFW_ALIGN * GGUFW_ALIGN; }

int gguf_writer_write_fd(gguf_writer *w, int fd, const char *what, qerr *e) {
    if (w->failed) {
        if (e) *e = w->err;
        return -1;
    }
    /* header + KVs + tensor infos, built in one buffer */
    gguf_writer hw;
    memset(&hw, 0, sizeof hw);
    gw_u32(&hw, 0x46554747u);
    gw_u32(&hw, 3);
    gw_u64(&hw, w->n_t);
    gw_u64(&hw, w->n_kv);
    gw_put(&hw, w->kv.p, w->kv.n);
    uint64_t off = 0;
    for (uint64_t i = 0; i < w->n_t; i++) {
        gw_tensor *t = &w->t[i];
        gw_str(&hw, t->name, strlen(t->name));
        gw_u32(&hw, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) gw_u64(&hw, t->ne[d]);
        gw_u32(&hw, t->type);
        t->offset = off;
        gw_u64(&hw, off);
        off = pad_to(off + t->nbytes);
    }
    static const uint8_t zeros[GGUFW_ALIGN];
    size_t hpad = (size_t)(pad_to(hw.kv.n) - hw.kv.n);
    gw_put(&hw, zeros, hpad);
    if (hw.failed) {
        free(hw.kv.p);
        return qerr_set(e, "%s: %s", what, hw.err.msg);
    }
    int bad = file_write_fd_all(fd, hw.kv.p, hw.kv.n);
    free(hw.kv.p);
    for (uint64_t i = 0; i < w->n_t && !bad; i++) {
        const gw_tensor *t = &w->t[i];
        bad = file_write_fd_all(fd, t->data, (size_t)t->nbytes);
        size_t tp = (size_t)(pad_to(t->nbytes) - t->nbytes);
        if (!bad && tp) bad = file_write_fd_all(fd, zeros, tp);
    }
    if (bad) return qerr_set(e, "cannot write %s: %s", what, strerror(errno));
    return 0;
}

int gguf_writer_write(gguf_writer *w, const char *path, qerr *e) {
    if (w->failed) {
        if (e) *e = w->err;
        return qerr_prefix(e, "%s", path);
    }
    file_atomic out;
    if (file_atomic_begin(&out, path, e)) return -1;
    if (gguf_writer_write_fd(w, out.fd, out.tmp, e)) {
        file_atomic_abort(&out);
        return -1;
    }
    return file_atomic_commit(&out, e);
}
