/* tests/ref_fixture.c — reader for scripts/make_reference.py's fixtures (see ref_fixture.h). */
#include "tests/ref_fixture.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>
#include <zlib.h>

static const size_t ref_dtype_size[] = {4, 4, 1, 2, 8, 8};
static const char *const ref_dtype_name[] = {"f32", "i32", "u8", "u16", "i64", "f64"};

/* Whole gzip stream into memory. */
static unsigned char *ref_slurp(const char *path, size_t *len, qerr *e) {
    gzFile gz = gzopen(path, "rb");
    if (!gz) {
        qerr_set(e, "%s: cannot open", path);
        return NULL;
    }
    size_t cap = 1 << 20, n = 0;
    unsigned char *buf = malloc(cap);
    for (;;) {
        if (!buf) {
            gzclose(gz);
            qerr_set(e, "%s: out of memory", path);
            return NULL;
        }
        int got = gzread(gz, buf + n, (unsigned)(cap - n > (1u << 30) ? (1u << 30) : cap - n));
        if (got < 0) {
            int zerr;
            const char *msg = gzerror(gz, &zerr);
            qerr_set(e, "%s: gzip error: %s", path, msg);
            free(buf);
            gzclose(gz);
            return NULL;
        }
        if (got == 0) break;
        n += (size_t)got;
        if (n == cap) {
            cap *= 2;
            unsigned char *nb = realloc(buf, cap);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    gzclose(gz);
    *len = n;
    return buf;
}

static int ref_take(const unsigned char *buf, size_t len, size_t *pos, void *dst, size_t n) {
    if (n > len - *pos) return -1;
    memcpy(dst, buf + *pos, n);
    *pos += n;
    return 0;
}

int ref_open(const char *path, ref_file *f, qerr *e) {
    memset(f, 0, sizeof *f);
    size_t len = 0, pos = 0;
    unsigned char *buf = ref_slurp(path, &len, e);
    if (!buf) return -1;
    char magic[8];
    uint32_t count = 0;
    if (ref_take(buf, len, &pos, magic, 8) || memcmp(magic, "QLREF001", 8) != 0) {
        free(buf);
        return qerr_set(e, "%s: not a QLREF001 fixture", path);
    }
    if (ref_take(buf, len, &pos, &count, 4) || count > 100000) {
        free(buf);
        return qerr_set(e, "%s: bad array count", path);
    }
    f->path = strdup(path);
    f->arr = calloc(count ? count : 1, sizeof *f->arr);
    if (!f->arr || !f->path) {
        free(buf);
        ref_close(f);
        return qerr_set(e, "%s: out of memory", path);
    }
    for (uint32_t i = 0; i < count; i++) {
        ref_array *a = &f->arr[i];
        uint32_t nl, dt, nd;
        uint64_t nbytes;
        if (ref_take(buf, len, &pos, &nl, 4) || nl > 4096) goto bad;
        a->name = malloc(nl + 1);
        if (!a->name || ref_take(buf, len, &pos, a->name, nl)) goto bad;
        a->name[nl] = 0;
        f->n = (int)i + 1;
        if (ref_take(buf, len, &pos, &dt, 4) || dt > REF_F64) goto bad;
        if (ref_take(buf, len, &pos, &nd, 4) || nd > 8) goto bad;
        a->dtype = (ref_dtype)dt;
        a->ndim = (int)nd;
        a->numel = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t s;
            if (ref_take(buf, len, &pos, &s, 8) || s > ((uint64_t)1 << 40)) goto bad;
            a->shape[d] = (int64_t)s;
            a->numel *= (int64_t)s;
        }
        if (ref_take(buf, len, &pos, &nbytes, 8) || nbytes != (uint64_t)a->numel * ref_dtype_size[dt]) goto bad;
        a->data = malloc(nbytes ? nbytes : 1);
        if (!a->data || ref_take(buf, len, &pos, a->data, nbytes)) goto bad;
    }
    if (pos != len) {
        free(buf);
        ref_close(f);
        return qerr_set(e, "%s: %zu trailing bytes", path, len - pos);
    }
    free(buf);
    return 0;
bad:
    free(buf);
    qerr_set(e, "%s: truncated or malformed record %d", path, f->n);
    ref_close(f);
    return -1;
}

void ref_close(ref_file *f) {
    if (f->arr)
        for (int i = 0; i < f->n; i++) {
            free(f->arr[i].name);
            free(f->arr[i].data);
        }
    free(f->arr);
    free(f->path);
    memset(f, 0, sizeof *f);
}

const ref_array *ref_find(const ref_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (f->arr[i].name && !strcmp(f->arr[i].name, name)) return &f->arr[i];
    return NULL;
}

static const void *ref_typed(const ref_file *f, const char *name, ref_dtype dt, int64_t numel) {
    const ref_array *a = ref_find(f, name);
    if (!a) fail_msg("%s: array \"%s\" missing (regenerate with `make reference-fixtures`)", f->path, name);
    if (a->dtype != dt)
        fail_msg("%s: array \"%s\" is %s, expected %s", f->path, name, ref_dtype_name[a->dtype], ref_dtype_name[dt]);
    if (numel >= 0 && a->numel != numel)
        fail_msg("%s: array \"%s\" has %lld elements, expected %lld", f->path, name, (long long)a->numel,
                 (long long)numel);
    return a->data;
}

const float *ref_f32(const ref_file *f, const char *name, int64_t numel) { return ref_typed(f, name, REF_F32, numel); }
const int32_t *ref_i32(const ref_file *f, const char *name, int64_t numel) { return ref_typed(f, name, REF_I32, numel); }
const uint8_t *ref_u8(const ref_file *f, const char *name, int64_t numel) { return ref_typed(f, name, REF_U8, numel); }
const uint16_t *ref_u16(const ref_file *f, const char *name, int64_t numel) { return ref_typed(f, name, REF_U16, numel); }
const int64_t *ref_i64(const ref_file *f, const char *name, int64_t numel) { return ref_typed(f, name, REF_I64, numel); }
const double *ref_f64(const ref_file *f, const char *name, int64_t numel) { return ref_typed(f, name, REF_F64, numel); }

double ref_scalar(const ref_file *f, const char *name) {
    const ref_array *a = ref_find(f, name);
    if (!a) fail_msg("%s: scalar \"%s\" missing", f->path, name);
    if (a->numel != 1) fail_msg("%s: \"%s\" is not a scalar", f->path, name);
    switch (a->dtype) {
    case REF_F64: return ((const double *)a->data)[0];
    case REF_F32: return ((const float *)a->data)[0];
    case REF_I64: return (double)((const int64_t *)a->data)[0];
    case REF_I32: return ((const int32_t *)a->data)[0];
    default: fail_msg("%s: \"%s\" has an unsupported scalar type", f->path, name);
    }
    return 0.0;
}

char *ref_str(const ref_file *f, const char *name) {
    const ref_array *a = ref_find(f, name);
    if (!a || a->dtype != REF_U8) fail_msg("%s: string \"%s\" missing", f->path, name);
    char *s = malloc((size_t)a->numel + 1);
    if (!s) fail_msg("out of memory");
    memcpy(s, a->data, (size_t)a->numel);
    s[a->numel] = 0;
    return s;
}

void ref_open_or_fail(const char *path, ref_file *f) {
    qerr e = {{0}};
    if (ref_open(path, f, &e))
        fail_msg("%s (the fixtures are committed; regenerate with `make reference-fixtures`)", e.msg);
}

cJSON *ref_read_gz_json(const char *path) {
    qerr e = {0};
    size_t len = 0;
    unsigned char *buf = ref_slurp(path, &len, &e);
    if (!buf) return NULL;
    cJSON *j = cJSON_ParseWithLength((const char *)buf, len);
    free(buf);
    return j;
}
