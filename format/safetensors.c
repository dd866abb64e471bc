/* format/safetensors.c — safetensors writer (byte-compatible with the Rust
 * writer, huggingface/safetensors src/tensor.rs `prepare`/`serialize`) and a
 * validating mmap reader (the checks of `read_metadata` and
 * `Metadata::validate`). The JSON header is built by hand for the writer, so
 * its bytes are fully determined; the reader parses it with cJSON. */
#include "format/safetensors.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file.h"
#include "core/strbuf.h"

/* The Rust `Dtype` enum order ("MUST be in increasing alignment order"); the
 * writer sorts by it descending. */
typedef struct st_dtype {
    const char *name;
    size_t size;
} st_dtype;

static const st_dtype DTYPES[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
    {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8},
};
#define N_DTYPES ((int)(sizeof DTYPES / sizeof DTYPES[0]))

static int dtype_index(const char *s) {
    if (!s) return -1;
    for (int i = 0; i < N_DTYPES; i++)
        if (!strcmp(DTYPES[i].name, s)) return i;
    return -1;
}

size_t safetensors_dtype_size(const char *dtype) {
    int i = dtype_index(dtype);
    return i < 0 ? 0 : DTYPES[i].size;
}

/* ------------------------------------------------------------------------ */
/* Header text                                                                */

/* JSON string as serde_json writes it: escapes " \ \b \f \n \r \t, other
 * control bytes as \u00xx (lowercase hex); UTF-8 passes through. */
static void sb_json_str(strbuf *b, const char *s) {
    strbuf_put(b, "\"", 1);
    for (const unsigned char *q = (const unsigned char *)s; *q; q++) {
        switch (*q) {
        case '"': strbuf_puts(b, "\\\""); break;
        case '\\': strbuf_puts(b, "\\\\"); break;
        case '\b': strbuf_puts(b, "\\b"); break;
        case '\f': strbuf_puts(b, "\\f"); break;
        case '\n': strbuf_puts(b, "\\n"); break;
        case '\r': strbuf_puts(b, "\\r"); break;
        case '\t': strbuf_puts(b, "\\t"); break;
        default:
            if (*q < 0x20)
                strbuf_printf(b, "\\u%04x", *q);
            else
                strbuf_put(b, (const char *)q, 1);
        }
    }
    strbuf_put(b, "\"", 1);
}

/* ------------------------------------------------------------------------ */
/* Writer                                                                     */

typedef struct wentry {
    const st_tensor *t;
    int rank;
} wentry;

static int cmp_by_name(const void *a, const void *b) {
    return strcmp(((const wentry *)a)->t->name, ((const wentry *)b)->t->name);
}

static int cmp_rust_order(const void *a, const void *b) {
    const wentry *x = a, *y = b;
    if (x->rank != y->rank) return y->rank - x->rank; /* dtype descending */
    return strcmp(x->t->name, y->t->name);
}

/* nbytes implied by shape and dtype; -1 on overflow. */
static int shape_nbytes(const int64_t *shape, int n_dims, size_t elem, uint64_t *out) {
    uint64_t n = 1;
    for (int d = 0; d < n_dims; d++) {
        if (shape[d] < 0 || __builtin_mul_overflow(n, (uint64_t)shape[d], &n)) return -1;
    }
    if (__builtin_mul_overflow(n, (uint64_t)elem, &n)) return -1;
    *out = n;
    return 0;
}

/* The "__metadata__" object text, or "" for none. */
static int build_metadata(const char *path, const char *json, strbuf *out, qerr *e) {
    if (!json) {
        strbuf_puts(out, "{\"format\":\"pt\"}");
        return 0;
    }
    cJSON *m = cJSON_Parse(json);
    if (!m || !cJSON_IsObject(m)) {
        cJSON_Delete(m);
        return qerr_set(e, "%s: metadata must be a JSON object of strings, got %.60s", path, json);
    }
    int n = 0;
    for (const cJSON *it = m->child; it; it = it->next) {
        if (!cJSON_IsString(it)) {
            qerr_set(e, "%s: metadata value for \"%s\" is not a string", path, it->string);
            cJSON_Delete(m);
            return -1;
        }
        strbuf_puts(out, n++ ? "," : "{");
        sb_json_str(out, it->string);
        strbuf_put(out, ":", 1);
        sb_json_str(out, it->valuestring);
    }
    if (n) strbuf_put(out, "}", 1);
    cJSON_Delete(m);
    return 0;
}

int safetensors_write(const char *path, const st_tensor *tensors, int n, const char *metadata_json, qerr *e) {
    if (n < 0 || (n > 0 && !tensors)) return qerr_set(e, "%s: invalid tensor list", path);
    wentry *ord = qcalloc((size_t)(n ? n : 1), sizeof *ord, e);
    if (!ord) return -1;
    strbuf hdr = {0}, meta = {0};
    file_atomic out;
    int opened = 0, rc = -1;

    for (int i = 0; i < n; i++) {
        const st_tensor *t = &tensors[i];
        uint64_t nb;
        if (!t->name || !*t->name) {
            qerr_set(e, "%s: tensor %d has no name", path, i);
            goto done;
        }
        if (!strcmp(t->name, "__metadata__")) {
            qerr_set(e, "%s: \"__metadata__\" is reserved and cannot name a tensor", path);
            goto done;
        }
        int di = dtype_index(t->dtype);
        if (di < 0) {
            qerr_set(e, "%s: tensor \"%s\": unknown dtype \"%s\"", path, t->name, t->dtype ? t->dtype : "(null)");
            goto done;
        }
        if (t->n_dims < 0 || t->n_dims > ST_MAX_DIMS) {
            qerr_set(e, "%s: tensor \"%s\": %d dimensions (0..%d supported)", path, t->name, t->n_dims, ST_MAX_DIMS);
            goto done;
        }
        if (shape_nbytes(t->shape, t->n_dims, DTYPES[di].size, &nb)) {
            qerr_set(e, "%s: tensor \"%s\": negative or overflowing shape", path, t->name);
            goto done;
        }
        if (nb != (uint64_t)t->nbytes) {
            qerr_set(e, "%s: tensor \"%s\": nbytes %zu does not match shape x %s (%llu bytes)", path, t->name,
                     t->nbytes, t->dtype, (unsigned long long)nb);
            goto done;
        }
        if (nb > 0 && !t->data) {
            qerr_set(e, "%s: tensor \"%s\": no data", path, t->name);
            goto done;
        }
        ord[i].t = t;
        ord[i].rank = di;
    }
    qsort(ord, (size_t)n, sizeof *ord, cmp_by_name);
    for (int i = 1; i < n; i++)
        if (!strcmp(ord[i].t->name, ord[i - 1].t->name)) {
            qerr_set(e, "%s: tensor name \"%s\" used twice", path, ord[i].t->name);
            goto done;
        }
    qsort(ord, (size_t)n, sizeof *ord, cmp_rust_order);

    if (build_metadata(path, metadata_json, &meta, e)) goto done;
    strbuf_put(&hdr, "{", 1);
    if (meta.n) {
        strbuf_puts(&hdr, "\"__metadata__\":");
        strbuf_put(&hdr, meta.p, meta.n);
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const st_tensor *t = ord[i].t;
        if (i || meta.n) strbuf_put(&hdr, ",", 1);
        sb_json_str(&hdr, t->name);
        strbuf_printf(&hdr, ":{\"dtype\":\"%s\",\"shape\":[", DTYPES[ord[i].rank].name);
        for (int d = 0; d < t->n_dims; d++) strbuf_printf(&hdr, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        strbuf_printf(&hdr, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                  (unsigned long long)(off + t->nbytes));
        off += t->nbytes;
    }
    strbuf_put(&hdr, "}", 1);
    while (hdr.n % 8) strbuf_put(&hdr, " ", 1);
    if (hdr.oom || meta.oom) {
        qerr_set(e, "out of memory building the safetensors header of %s", path);
        goto done;
    }
    if (hdr.n > ST_MAX_HEADER) {
        qerr_set(e, "%s: header of %zu bytes exceeds the 100 MB safetensors limit", path, hdr.n);
        goto done;
    }

    if (file_atomic_begin(&out, path, e)) goto done;
    opened = 1;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hdr.n >> (8 * i));
    if (file_atomic_write(&out, len8, 8, e) || file_atomic_write(&out, hdr.p, hdr.n, e)) goto done;
    for (int i = 0; i < n; i++)
        if (ord[i].t->nbytes && file_atomic_write(&out, ord[i].t->data, ord[i].t->nbytes, e)) goto done;
    opened = 0;
    if (file_atomic_commit(&out, e)) goto done;
    rc = 0;
done:
    if (opened) file_atomic_abort(&out);
    free(hdr.p);
    free(meta.p);
    free(ord);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Reader                                                                     */

typedef struct st_entry {
    char *name;
    int dtype;
    int n_dims;
    int64_t shape[ST_MAX_DIMS];
    uint64_t begin, end;
} st_entry;

struct safetensors_file {
    char *path;
    uint8_t *map;
    size_t size;
    size_t data_off; /* 8 + N */
    int n;
    st_entry *ents;  /* in offset order */
    int *by_name;    /* indices into ents, sorted by name */
    int n_meta;
    char **meta_kv;  /* 2 * n_meta: key, value, ... */
};

void safetensors_close(safetensors_file *f) {
    if (!f) return;
    if (f->map) munmap(f->map, f->size);
    for (int i = 0; i < f->n; i++) free(f->ents[i].name);
    free(f->ents);
    free(f->by_name);
    for (int i = 0; i < 2 * f->n_meta; i++) free(f->meta_kv[i]);
    free(f->meta_kv);
    free(f->path);
    free(f);
}

/* Strict UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) len = 2, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef) len = 3, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4) len = 4, cp = c & 0x07;
        else return 0;
        if (i + (size_t)len > n) return 0;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += (size_t)len;
    }
    return 1;
}

/* A JSON number that is a whole number in [0, 2^53]. */
static int get_u53(const cJSON *it, uint64_t *out) {
    if (!cJSON_IsNumber(it)) return -1;
    double v = it->valuedouble;
    if (!(v >= 0 && v <= 9007199254740992.0) || v != (double)(uint64_t)v) return -1;
    *out = (uint64_t)v;
    return 0;
}

static int cmp_entry_offsets(const void *a, const void *b) {
    const st_entry *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* qsort has no context argument: sort (name, index) pairs instead. */
typedef struct name_idx {
    const char *name;
    int idx;
} name_idx;

static int cmp_name_idx(const void *a, const void *b) {
    return strcmp(((const name_idx *)a)->name, ((const name_idx *)b)->name);
}

static int parse_entry(const char *path, const cJSON *it, st_entry *en, qerr *e) {
    const char *name = it->string;
    if (!cJSON_IsObject(it)) return qerr_set(e, "%s: tensor \"%s\": entry is not a JSON object", path, name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(it, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
    if (!cJSON_IsString(dt) || (en->dtype = dtype_index(dt->valuestring)) < 0)
        return qerr_set(e, "%s: tensor \"%s\": missing or unknown dtype", path, name);
    if (!cJSON_IsArray(sh)) return qerr_set(e, "%s: tensor \"%s\": shape is not a list", path, name);
    int nd = cJSON_GetArraySize(sh);
    if (nd > ST_MAX_DIMS)
        return qerr_set(e, "%s: tensor \"%s\": %d dimensions (at most %d supported)", path, name, nd, ST_MAX_DIMS);
    en->n_dims = nd;
    int d = 0;
    for (const cJSON *x = sh->child; x; x = x->next, d++) {
        uint64_t v;
        if (get_u53(x, &v)) return qerr_set(e, "%s: tensor \"%s\": shape entries must be integers >= 0", path, name);
        en->shape[d] = (int64_t)v;
    }
    if (!cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2 || get_u53(of->child, &en->begin) ||
        get_u53(of->child->next, &en->end) || en->end < en->begin)
        return qerr_set(e, "%s: tensor \"%s\": data_offsets must be [begin, end] with begin <= end", path, name);
    uint64_t nb;
    if (shape_nbytes(en->shape, en->n_dims, DTYPES[en->dtype].size, &nb))
        return qerr_set(e, "%s: tensor \"%s\": shape overflows", path, name);
    if (en->end - en->begin != nb)
        return qerr_set(e, "%s: tensor \"%s\": data_offsets [%llu, %llu] hold %llu bytes, dtype and shape need %llu",
                        path, name, (unsigned long long)en->begin, (unsigned long long)en->end,
                        (unsigned long long)(en->end - en->begin), (unsigned long long)nb);
    if (!(en->name = strdup(name))) return qerr_set(e, "out of memory");
    return 0;
}

int safetensors_open(const char *path, safetensors_file **out, qerr *e) {
    *out = NULL;
    safetensors_file *f = qcalloc(1, sizeof *f, e);
    if (!f) return -1;
    cJSON *root = NULL;
    name_idx *ni = NULL;
    if (!(f->path = strdup(path))) {
        qerr_set(e, "out of memory");
        goto fail;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        qerr_set(e, "cannot open %s: %s", path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st)) {
        qerr_set(e, "cannot stat %s: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    if (st.st_size < 8) {
        qerr_set(e, "%s: %lld bytes is too small for a safetensors file", path, (long long)st.st_size);
        close(fd);
        goto fail;
    }
    f->size = (size_t)st.st_size;
    void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        qerr_set(e, "cannot map %s: %s", path, strerror(errno));
        goto fail;
    }
    f->map = m;

    uint64_t hn = 0;
    for (int i = 0; i < 8; i++) hn |= (uint64_t)f->map[i] << (8 * i);
    if (hn > ST_MAX_HEADER) {
        qerr_set(e, "%s: header size %llu exceeds the 100 MB safetensors limit", path, (unsigned long long)hn);
        goto fail;
    }
    if (hn > f->size - 8) {
        qerr_set(e, "%s: header size %llu runs past the end of the file (%zu bytes)", path, (unsigned long long)hn,
                 f->size);
        goto fail;
    }
    const char *hdr = (const char *)f->map + 8;
    f->data_off = 8 + (size_t)hn;
    if (hn == 0 || hdr[0] != '{') {
        qerr_set(e, "%s: header does not start with '{'", path);
        goto fail;
    }
    if (!utf8_valid((const uint8_t *)hdr, (size_t)hn)) {
        qerr_set(e, "%s: header is not valid UTF-8", path);
        goto fail;
    }
    const char *end = NULL;
    root = cJSON_ParseWithLengthOpts(hdr, (size_t)hn, &end, 0);
    if (!root || !cJSON_IsObject(root)) {
        qerr_set(e, "%s: header is not a valid JSON object (error near header byte %lld)", path,
                 end ? (long long)(end - hdr) : -1LL);
        goto fail;
    }
    for (const char *q = end; q < hdr + hn; q++)
        if (*q != ' ' && *q != '\t' && *q != '\n' && *q != '\r') {
            qerr_set(e, "%s: unexpected bytes after the header JSON at header byte %lld", path, (long long)(q - hdr));
            goto fail;
        }

    int cnt = 0;
    for (const cJSON *it = root->child; it; it = it->next) cnt += strcmp(it->string, "__metadata__") != 0;
    f->ents = qcalloc((size_t)(cnt ? cnt : 1), sizeof *f->ents, e);
    f->by_name = qcalloc((size_t)(cnt ? cnt : 1), sizeof *f->by_name, e);
    ni = qcalloc((size_t)(cnt ? cnt : 1), sizeof *ni, e);
    if (!f->ents || !f->by_name || !ni) goto fail;
    int seen_meta = 0;
    for (const cJSON *it = root->child; it; it = it->next) {
        if (!strcmp(it->string, "__metadata__")) {
            if (seen_meta++ || !cJSON_IsObject(it)) {
                qerr_set(e, "%s: __metadata__ must appear once, as an object of strings", path);
                goto fail;
            }
            int nm = cJSON_GetArraySize(it);
            f->meta_kv = qcalloc((size_t)(2 * nm + 1), sizeof *f->meta_kv, e);
            if (!f->meta_kv) goto fail;
            for (const cJSON *kv = it->child; kv; kv = kv->next) {
                if (!cJSON_IsString(kv)) {
                    qerr_set(e, "%s: __metadata__ value for \"%s\" is not a string", path, kv->string);
                    goto fail;
                }
                f->meta_kv[2 * f->n_meta] = strdup(kv->string);
                f->meta_kv[2 * f->n_meta + 1] = strdup(kv->valuestring);
                f->n_meta++;
                if (!f->meta_kv[2 * f->n_meta - 2] || !f->meta_kv[2 * f->n_meta - 1]) {
                    qerr_set(e, "out of memory");
                    goto fail;
                }
            }
            continue;
        }
        if (parse_entry(path, it, &f->ents[f->n], e)) goto fail;
        f->n++;
    }

    /* contiguous coverage of the buffer, in offset order */
    qsort(f->ents, (size_t)f->n, sizeof *f->ents, cmp_entry_offsets);
    uint64_t pos = 0, data_size = (uint64_t)(f->size - f->data_off);
    for (int i = 0; i < f->n; i++) {
        if (f->ents[i].begin != pos) {
            qerr_set(e, "%s: tensor \"%s\" starts at buffer offset %llu, expected %llu (%s)", path, f->ents[i].name,
                     (unsigned long long)f->ents[i].begin, (unsigned long long)pos,
                     f->ents[i].begin > pos ? "a hole" : "an overlap");
            goto fail;
        }
        pos = f->ents[i].end;
    }
    if (pos != data_size) {
        qerr_set(e, "%s: tensors cover %llu bytes but the data section has %llu", path, (unsigned long long)pos,
                 (unsigned long long)data_size);
        goto fail;
    }
    for (int i = 0; i < f->n; i++) ni[i] = (name_idx){f->ents[i].name, i};
    qsort(ni, (size_t)f->n, sizeof *ni, cmp_name_idx);
    for (int i = 0; i < f->n; i++) {
        if (i && !strcmp(ni[i].name, ni[i - 1].name)) {
            qerr_set(e, "%s: tensor \"%s\" appears twice in the header", path, ni[i].name);
            goto fail;
        }
        f->by_name[i] = ni[i].idx;
    }
    free(ni);
    cJSON_Delete(root);
    *out = f;
    return 0;
fail:
    free(ni);
    cJSON_Delete(root);
    safetensors_close(f);
    return -1;
}

int safetensors_count(const safetensors_file *f) { return f->n; }

void safetensors_get(const safetensors_file *f, int i, st_tensor *out) {
    const st_entry *en = &f->ents[i];
    memset(out, 0, sizeof *out);
    out->name = en->name;
    out->dtype = DTYPES[en->dtype].name;
    out->n_dims = en->n_dims;
    for (int d = 0; d < en->n_dims; d++) out->shape[d] = en->shape[d];
    out->data = f->map + f->data_off + en->begin;
    out->nbytes = (size_t)(en->end - en->begin);
}

int safetensors_find(const safetensors_file *f, const char *name, st_tensor *out, qerr *e) {
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(name, f->ents[f->by_name[mid]].name);
        if (c == 0) {
            safetensors_get(f, f->by_name[mid], out);
            return 0;
        }
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return qerr_set(e, "%s: no tensor named \"%s\"", f->path, name);
}

const char *safetensors_metadata(const safetensors_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_kv[2 * i], key)) return f->meta_kv[2 * i + 1];
    return NULL;
}
