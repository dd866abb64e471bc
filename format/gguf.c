/* format/gguf.c — GGUF v2/v3 reader: mmap, parse, validate against the file size.
 *
 * Format: ggml/docs/gguf.md, gguf-py/gguf/constants.py and gguf_reader.py, and
 * the checks of ggml/src/gguf.cpp (gguf_init_from_file_impl) and
 * llama-model-loader.cpp (tensor data within file bounds); see
 * docs/formats.md §3.
 *
 * Every read goes through a cursor that checks the remaining byte count first,
 * so a truncated or corrupt file produces one error line, never an
 * out-of-bounds read. Counts are capped and also checked against the bytes
 * left (each KV needs at least 13 bytes, each tensor info 32), so a corrupt
 * count cannot make us allocate more than a small multiple of the file size.
 * Multi-byte fields are read with memcpy (the host must be little-endian, as
 * the format is).
 */
#include "format/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "format/gguf.c reads little-endian fields with memcpy: port it for big-endian hosts"
#endif

#define GGUF_MAGIC 0x46554747u /* "GGUF" */
#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_HEADER_BYTES 24u        /* magic, version, tensor_count, kv_count */
#define GGUF_MAX_KV (1u << 20)       /* real models have ~40 */
#define GGUF_MAX_TENSORS (1u << 20)  /* real models have hundreds to a few thousand */
#define GGUF_MAX_KEY_LEN 65535u
#define GGUF_MAX_NAME 64u            /* GGML_MAX_NAME: names must be shorter */
#define GGUF_MAX_ARRAY_DEPTH 8
#define GGUF_MIN_KV_BYTES 13u        /* key len 8 + type 4 + 1-byte value */
#define GGUF_MIN_TI_BYTES 32u        /* name len 8 + n_dims 4 + 1 dim 8 + type 4 + offset 8 */

typedef struct gguf_kv {
    char *key;          /* NUL-terminated copy */
    uint32_t type;      /* gguf_vtype */
    uint64_t off;       /* file offset of the value; arrays: of the first element */
    uint32_t arr_type;  /* arrays only */
    uint64_t arr_count;
    uint64_t *str_off;  /* string arrays: file offset of each element's u64 length */
} gguf_kv;

struct gguf_file {
    char *path;
    const uint8_t *map;
    uint64_t size;
    uint32_t version, alignment;
    uint64_t data_off;
    uint64_t n_kv, n_tensors;
    gguf_kv *kv;           /* (n_kv) */
    gguf_tensor *tensors;  /* (n_tensors) */
    uint32_t *kv_hash;     /* open addressing, index + 1, 0 = empty; (kv_cap) */
    uint32_t *t_hash;      /* (t_cap) */
    uint64_t kv_cap, t_cap;
};

/* ---- bounds-checked cursor over the mapping ---- */

typedef struct rd {
    const uint8_t *map;
    uint64_t size, pos;
    const char *path;
    const char *ctx; /* what is being parsed, for messages */
    qerr *e;
} rd;

static int rd_need(rd *r, uint64_t n, const char *what) {
    if (n <= r->size - r->pos) return 0;
    return qerr_set(r->e, "%s: truncated or corrupt: %s%s%s at byte %llu needs %llu bytes, only %llu left (file size %llu)",
                    r->path, r->ctx, r->ctx[0] ? " " : "", what, (unsigned long long)r->pos,
                    (unsigned long long)n, (unsigned long long)(r->size - r->pos), (unsigned long long)r->size);
}

static int rd_u32(rd *r, const char *what, uint32_t *v) {
    if (rd_need(r, 4, what)) return -1;
    memcpy(v, r->map + r->pos, 4);
    r->pos += 4;
    return 0;
}

static int rd_u64(rd *r, const char *what, uint64_t *v) {
    if (rd_need(r, 8, what)) return -1;
    memcpy(v, r->map + r->pos, 8);
    r->pos += 8;
    return 0;
}

/* A GGUF string: u64 length + bytes. *off = file offset of the bytes. */
static int rd_str(rd *r, const char *what, uint64_t *off, uint64_t *len) {
    if (rd_u64(r, what, len)) return -1;
    if (rd_need(r, *len, what)) return -1;
    *off = r->pos;
    r->pos += *len;
    return 0;
}

/* ---- value types ---- */

static const char *vtype_name(uint32_t t) {
    static const char *const names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                        "bool", "string", "array", "uint64", "int64", "float64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

uint64_t gguf_vtype_size(uint32_t t) {
    switch (t) {
    case GGUF_VTYPE_UINT8: case GGUF_VTYPE_INT8: case GGUF_VTYPE_BOOL: return 1;
    case GGUF_VTYPE_UINT16: case GGUF_VTYPE_INT16: return 2;
    case GGUF_VTYPE_UINT32: case GGUF_VTYPE_INT32: case GGUF_VTYPE_FLOAT32: return 4;
    case GGUF_VTYPE_UINT64: case GGUF_VTYPE_INT64: case GGUF_VTYPE_FLOAT64: return 8;
    default: return 0;
    }
}

static int parse_value(rd *r, uint32_t type, int depth);

/* Array body after its element type and count have been read. */
static int parse_array_body(rd *r, uint32_t elem, uint64_t count, int depth) {
    uint64_t left = r->size - r->pos, esz = gguf_vtype_size(elem);
    if (esz) {
        if (count > left / esz)
            return qerr_set(r->e, "%s: truncated or corrupt: %s: array of %llu %s needs %llu bytes each, only %llu left",
                            r->path, r->ctx, (unsigned long long)count, vtype_name(elem),
                            (unsigned long long)esz, (unsigned long long)left);
        if (elem == GGUF_VTYPE_BOOL)
            for (uint64_t i = 0; i < count; i++)
                if (r->map[r->pos + i] > 1)
                    return qerr_set(r->e, "%s: %s: bool array element %llu has value %u (must be 0 or 1)", r->path,
                                    r->ctx, (unsigned long long)i, r->map[r->pos + i]);
        r->pos += count * esz;
        return 0;
    }
    if (elem != GGUF_VTYPE_STRING && elem != GGUF_VTYPE_ARRAY)
        return qerr_set(r->e, "%s: %s: unknown array element type %u", r->path, r->ctx, elem);
    uint64_t min_sz = elem == GGUF_VTYPE_STRING ? 8 : 12;
    if (count > left / min_sz)
        return qerr_set(r->e, "%s: truncated or corrupt: %s: array of %llu %s needs at least %llu bytes each, only %llu left",
                        r->path, r->ctx, (unsigned long long)count, vtype_name(elem),
                        (unsigned long long)min_sz, (unsigned long long)left);
    for (uint64_t i = 0; i < count; i++)
        if (parse_value(r, elem, depth)) return -1;
    return 0;
}

/* Validate and skip one value of `type`; depth counts enclosing arrays. */
static int parse_value(rd *r, uint32_t type, int depth) {
    uint64_t esz = gguf_vtype_size(type);
    if (esz) {
        if (rd_need(r, esz, "value")) return -1;
        if (type == GGUF_VTYPE_BOOL && r->map[r->pos] > 1)
            return qerr_set(r->e, "%s: %s: bool value %u (must be 0 or 1)", r->path, r->ctx, r->map[r->pos]);
        r->pos += esz;
        return 0;
    }
    if (type == GGUF_VTYPE_STRING) {
        uint64_t off, len;
        return rd_str(r, "string value", &off, &len);
    }
    if (type == GGUF_VTYPE_ARRAY) {
        if (depth >= GGUF_MAX_ARRAY_DEPTH)
            return qerr_set(r->e, "%s: %s: arrays nested deeper than %d", r->path, r->ctx, GGUF_MAX_ARRAY_DEPTH);
        uint32_t elem;
        uint64_t count;
        if (rd_u32(r, "array element type", &elem) || rd_u64(r, "array count", &count)) return -1;
        return parse_array_body(r, elem, count, depth + 1);
    }
    return qerr_set(r->e, "%s: %s: unknown value type %u", r->path, r->ctx, type);
}

/* ---- hashing (FNV-1a) for key and tensor-name lookup ---- */

static uint64_t hash_str(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t hash_cap(uint64_t n) {
    uint64_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    return cap;
}

/* Slot holding `name` or the empty slot where it would go. */
static uint64_t hash_slot(const uint32_t *tab, uint64_t cap, const char *name, size_t n,
                          const char *(*name_of)(const gguf_file *, uint32_t), const gguf_file *f) {
    uint64_t i = hash_str(name, n) & (cap - 1);
    while (tab[i]) {
        const char *other = name_of(f, tab[i] - 1);
        if (strlen(other) == n && memcmp(other, name, n) == 0) return i;
        i = (i + 1) & (cap - 1);
    }
    return i;
}

static const char *kv_name_of(const gguf_file *f, uint32_t i) { return f->kv[i].key; }
static const char *t_name_of(const gguf_file *f, uint32_t i) { return f->tensors[i].name; }

static const gguf_kv *kv_find(const gguf_file *f, const char *key) {
    if (!f || !key || !f->kv_hash) return NULL;
    uint64_t s = hash_slot(f->kv_hash, f->kv_cap, key, strlen(key), kv_name_of, f);
    return f->kv_hash[s] ? &f->kv[f->kv_hash[s] - 1] : NULL;
}

/* ---- open ---- */

static char *copy_name(const uint8_t *p, uint64_t n, qerr *e) {
    char *s = qmalloc((size_t)n + 1, e);
    if (!s) return NULL;
    memcpy(s, p, (size_t)n);
    s[n] = '\0';
    return s;
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static int cmp_offset(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int parse_kvs(gguf_file *f, rd *r, qerr *e) {
    char ctx[160];
    r->ctx = ctx;
    for (uint64_t i = 0; i < f->n_kv; i++) {
        gguf_kv *kv = &f->kv[i];
        snprintf(ctx, sizeof ctx, "KV #%llu", (unsigned long long)i);
        uint64_t koff, klen;
        if (rd_str(r, "key", &koff, &klen)) return -1;
        if (klen == 0) return qerr_set(e, "%s: %s: empty key", f->path, ctx);
        if (klen > GGUF_MAX_KEY_LEN)
            return qerr_set(e, "%s: %s: key length %llu exceeds %u", f->path, ctx, (unsigned long long)klen,
                            GGUF_MAX_KEY_LEN);
        if (memchr(r->map + koff, 0, klen)) return qerr_set(e, "%s: %s: key contains a NUL byte", f->path, ctx);
        if (!(kv->key = copy_name(r->map + koff, klen, e))) return -1;
        snprintf(ctx, sizeof ctx, "KV #%llu '%.100s'", (unsigned long long)i, kv->key);

        uint64_t slot = hash_slot(f->kv_hash, f->kv_cap, kv->key, klen, kv_name_of, f);
        if (f->kv_hash[slot]) return qerr_set(e, "%s: %s: duplicate key", f->path, ctx);
        f->kv_hash[slot] = (uint32_t)i + 1;

        if (rd_u32(r, "value type", &kv->type)) return -1;
        if (kv->type == GGUF_VTYPE_ARRAY) {
            if (rd_u32(r, "array element type", &kv->arr_type) || rd_u64(r, "array count", &kv->arr_count)) return -1;
            kv->off = r->pos;
            if (parse_array_body(r, kv->arr_type, kv->arr_count, 1)) return -1;
            if (kv->arr_type == GGUF_VTYPE_STRING) { /* second pass: index the validated strings */
                if (!(kv->str_off = qmalloc((size_t)(kv->arr_count ? kv->arr_count : 1) * sizeof(uint64_t), e)))
                    return -1;
                uint64_t p = kv->off;
                for (uint64_t j = 0; j < kv->arr_count; j++) {
                    uint64_t len;
                    kv->str_off[j] = p;
                    memcpy(&len, r->map + p, 8);
                    p += 8 + len;
                }
            }
        } else {
            kv->off = r->pos;
            if (parse_value(r, kv->type, 0)) return -1;
        }
    }
    r->ctx = "";
    return 0;
}

static int parse_tensor_infos(gguf_file *f, rd *r, qerr *e) {
    char ctx[160];
    r->ctx = ctx;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        snprintf(ctx, sizeof ctx, "tensor info #%llu", (unsigned long long)i);
        uint64_t noff, nlen;
        if (rd_str(r, "name", &noff, &nlen)) return -1;
        if (nlen >= GGUF_MAX_NAME)
            return qerr_set(e, "%s: %s: name length %llu exceeds %u bytes (GGML_MAX_NAME)", f->path, ctx,
                            (unsigned long long)nlen, GGUF_MAX_NAME - 1);
        if (memchr(r->map + noff, 0, nlen)) return qerr_set(e, "%s: %s: name contains a NUL byte", f->path, ctx);
        char *name = copy_name(r->map + noff, nlen, e);
        if (!name) return -1;
        t->name = name;
        snprintf(ctx, sizeof ctx, "tensor '%s'", name);

        uint64_t slot = hash_slot(f->t_hash, f->t_cap, name, nlen, t_name_of, f);
        if (f->t_hash[slot]) return qerr_set(e, "%s: %s: duplicate tensor name", f->path, ctx);
        f->t_hash[slot] = (uint32_t)i + 1;

        if (rd_u32(r, "n_dims", &t->n_dims)) return -1;
        if (t->n_dims < 1 || t->n_dims > 4)
            return qerr_set(e, "%s: %s: n_dims %u out of range 1..4", f->path, ctx, t->n_dims);
        uint64_t nel = 1;
        for (uint32_t d = 0; d < 4; d++) {
            t->ne[d] = 1;
            if (d >= t->n_dims) continue;
            if (rd_u64(r, "dims", &t->ne[d])) return -1;
            if (t->ne[d] == 0) return qerr_set(e, "%s: %s: dimension %u is zero", f->path, ctx, d);
            if (t->ne[d] > (uint64_t)INT64_MAX / nel)
                return qerr_set(e, "%s: %s: element count overflows (dimension %u = %llu)", f->path, ctx, d,
                                (unsigned long long)t->ne[d]);
            nel *= t->ne[d];
        }
        t->nelements = nel;
        if (rd_u32(r, "type", &t->type) || rd_u64(r, "offset", &t->offset)) return -1;

        uint32_t blck, tsize;
        if (ggml_type_info(t->type, &blck, &tsize) != 0)
            return qerr_set(e, "%s: %s: unknown ggml tensor type %u", f->path, ctx, t->type);
        if (t->ne[0] % blck != 0)
            return qerr_set(e, "%s: %s: ne0 = %llu is not a multiple of the %s block size %u", f->path, ctx,
                            (unsigned long long)t->ne[0], ggml_type_name(t->type), blck);
        uint64_t nblocks = nel / blck;
        if (nblocks > UINT64_MAX / tsize)
            return qerr_set(e, "%s: %s: byte size overflows", f->path, ctx);
        t->nbytes = nblocks * tsize;
    }
    r->ctx = "";
    return 0;
}

/* Alignment from general.alignment (u32, power of two) or the default. */
static int read_alignment(gguf_file *f, qerr *e) {
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    const gguf_kv *kv = kv_find(f, "general.alignment");
    if (!kv) return 0;
    if (kv->type != GGUF_VTYPE_UINT32)
        return qerr_set(e, "%s: general.alignment has type %s, expected uint32", f->path, vtype_name(kv->type));
    uint32_t a;
    memcpy(&a, f->map + kv->off, 4);
    if (a == 0 || (a & (a - 1)) != 0)
        return qerr_set(e, "%s: general.alignment = %u is not a power of two", f->path, a);
    f->alignment = a;
    return 0;
}

/* Every tensor's data inside the file, aligned, and no two overlapping. */
static int check_tensor_data(gguf_file *f, qerr *e) {
    if (f->n_tensors == 0) return 0;
    if (f->data_off > f->size)
        return qerr_set(e, "%s: truncated: the data section would start at byte %llu but the file is %llu bytes",
                        f->path, (unsigned long long)f->data_off, (unsigned long long)f->size);
    uint64_t data_size = f->size - f->data_off;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        if (t->offset % f->alignment != 0)
            return qerr_set(e, "%s: tensor '%s': data offset %llu is not a multiple of the alignment %u", f->path,
                            t->name, (unsigned long long)t->offset, f->alignment);
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return qerr_set(e,
                            "%s: truncated or corrupt: tensor '%s' (%s, %llu bytes at data offset %llu) ends past the "
                            "end of the file (data section holds %llu bytes, file size %llu)",
                            f->path, t->name, ggml_type_name(t->type), (unsigned long long)t->nbytes,
                            (unsigned long long)t->offset, (unsigned long long)data_size, (unsigned long long)f->size);
        t->data = f->map + f->data_off + t->offset;
    }
    gguf_tensor **by_off = qmalloc((size_t)f->n_tensors * sizeof *by_off, e);
    if (!by_off) return -1;
    for (uint64_t i = 0; i < f->n_tensors; i++) by_off[i] = &f->tensors[i];
    qsort(by_off, (size_t)f->n_tensors, sizeof *by_off, cmp_offset);
    int rc = 0;
    for (uint64_t i = 0; i + 1 < f->n_tensors; i++) {
        if (by_off[i]->offset + by_off[i]->nbytes > by_off[i + 1]->offset) {
            rc = qerr_set(e, "%s: tensors '%s' and '%s' overlap (data offsets %llu + %llu bytes > %llu)", f->path,
                          by_off[i]->name, by_off[i + 1]->name, (unsigned long long)by_off[i]->offset,
                          (unsigned long long)by_off[i]->nbytes, (unsigned long long)by_off[i + 1]->offset);
            break;
        }
    }
    free(by_off);
    return rc;
}

static int parse(gguf_file *f, qerr *e) {
    rd r = {.map = f->map, .size = f->size, .pos = 0, .path = f->path, .ctx = "", .e = e};
    if (f->size < GGUF_HEADER_BYTES)
        return qerr_set(e, "%s: file is %llu bytes, too small for a GGUF header (%u bytes)", f->path,
                        (unsigned long long)f->size, GGUF_HEADER_BYTES);
    uint32_t magic;
    rd_u32(&r, "magic", &magic);
    if (magic != GGUF_MAGIC)
        return qerr_set(e, "%s: not a GGUF file (magic bytes %02x %02x %02x %02x, expected \"GGUF\")", f->path,
                        f->map[0], f->map[1], f->map[2], f->map[3]);
    rd_u32(&r, "version", &f->version);
    if (f->version != 2 && f->version != 3) {
        if (f->version == 1) return qerr_set(e, "%s: GGUF version 1 is not supported (need 2 or 3)", f->path);
        if (f->version != 0 && (f->version & 0xffffu) == 0)
            return qerr_set(e, "%s: GGUF version field is 0x%08x: a big-endian file? only little-endian v2/v3 are supported",
                            f->path, f->version);
        return qerr_set(e, "%s: unsupported GGUF version %u (need 2 or 3)", f->path, f->version);
    }
    rd_u64(&r, "tensor count", &f->n_tensors);
    rd_u64(&r, "KV count", &f->n_kv);
    uint64_t left = f->size - r.pos;
    if (f->n_kv > GGUF_MAX_KV)
        return qerr_set(e, "%s: corrupt header: KV count %llu exceeds the limit %u", f->path,
                        (unsigned long long)f->n_kv, GGUF_MAX_KV);
    if (f->n_tensors > GGUF_MAX_TENSORS)
        return qerr_set(e, "%s: corrupt header: tensor count %llu exceeds the limit %u", f->path,
                        (unsigned long long)f->n_tensors, GGUF_MAX_TENSORS);
    if (f->n_kv * GGUF_MIN_KV_BYTES + f->n_tensors * GGUF_MIN_TI_BYTES > left)
        return qerr_set(e, "%s: truncated or corrupt: %llu KVs and %llu tensor infos need at least %llu bytes, only %llu left",
                        f->path, (unsigned long long)f->n_kv, (unsigned long long)f->n_tensors,
                        (unsigned long long)(f->n_kv * GGUF_MIN_KV_BYTES + f->n_tensors * GGUF_MIN_TI_BYTES),
                        (unsigned long long)left);

    f->kv_cap = hash_cap(f->n_kv);
    f->t_cap = hash_cap(f->n_tensors);
    if (!(f->kv = qcalloc((size_t)f->n_kv, sizeof *f->kv, e))) return -1;
    if (!(f->tensors = qcalloc((size_t)f->n_tensors, sizeof *f->tensors, e))) return -1;
    if (!(f->kv_hash = qcalloc((size_t)f->kv_cap, sizeof *f->kv_hash, e))) return -1;
    if (!(f->t_hash = qcalloc((size_t)f->t_cap, sizeof *f->t_hash, e))) return -1;

    if (parse_kvs(f, &r, e)) return -1;
    if (read_alignment(f, e)) return -1;
    if (parse_tensor_infos(f, &r, e)) return -1;
    f->data_off = align_up(r.pos, f->alignment);
    return check_tensor_data(f, e);
}

int gguf_open(const char *path, gguf_file **out, qerr *e) {
    *out = NULL;
    gguf_file *f = qcalloc(1, sizeof *f, e);
    if (!f) return -1;
    size_t plen = strlen(path);
    if (!(f->path = qmalloc(plen + 1, e))) {
        free(f);
        return -1;
    }
    memcpy(f->path, path, plen + 1);

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        qerr_set(e, "%s: cannot open: %s", path, strerror(errno));
        gguf_close(f);
        return -1;
    }
    struct stat st;
    int st_rc = fstat(fd, &st);
    if (st_rc != 0 || !S_ISREG(st.st_mode)) {
        qerr_set(e, "%s: %s", path, st_rc != 0 ? strerror(errno) : "not a regular file");
        close(fd);
        gguf_close(f);
        return -1;
    }
    f->size = (uint64_t)st.st_size;
    if (f->size >= GGUF_HEADER_BYTES) {
        void *m = mmap(NULL, (size_t)f->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            qerr_set(e, "%s: mmap of %llu bytes failed: %s", path, (unsigned long long)f->size, strerror(errno));
            close(fd);
            gguf_close(f);
            return -1;
        }
        f->map = m;
    }
    close(fd);
    if (parse(f, e)) {
        gguf_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    if (f->kv)
        for (uint64_t i = 0; i < f->n_kv; i++) {
            free(f->kv[i].key);
            free(f->kv[i].str_off);
        }
    if (f->tensors)
        for (uint64_t i = 0; i < f->n_tensors; i++) free((char *)f->tensors[i].name);
    free(f->kv);
    free(f->tensors);
    free(f->kv_hash);
    free(f->t_hash);
    if (f->map) munmap((void *)f->map, (size_t)f->size);
    free(f->path);
    free(f);
}

/* ---- file-level accessors ---- */

uint32_t gguf_version(const gguf_file *f) { return f->version; }
uint32_t gguf_alignment(const gguf_file *f) { return f->alignment; }
uint64_t gguf_data_offset(const gguf_file *f) { return f->data_off; }
uint64_t gguf_n_kv(const gguf_file *f) { return f->n_kv; }

const char *gguf_kv_key(const gguf_file *f, uint64_t i) { return i < f->n_kv ? f->kv[i].key : NULL; }

int gguf_kv_type(const gguf_file *f, uint64_t i) { return i < f->n_kv ? (int)f->kv[i].type : -1; }

/* ---- metadata lookups ---- */

static const gguf_kv *kv_get(const gguf_file *f, const char *key, qerr *e) {
    const gguf_kv *kv = kv_find(f, key);
    if (!kv) qerr_set(e, "%s: key '%s' not found", f ? f->path : "gguf", key ? key : "(null)");
    return kv;
}

static int kv_wrong_type(const gguf_file *f, const gguf_kv *kv, const char *want, qerr *e) {
    if (kv->type == GGUF_VTYPE_ARRAY)
        return qerr_set(e, "%s: key '%s' is an array of %s, expected %s", f->path, kv->key, vtype_name(kv->arr_type),
                        want);
    return qerr_set(e, "%s: key '%s' has type %s, expected %s", f->path, kv->key, vtype_name(kv->type), want);
}

/* Integer value as (negative?, magnitude-or-value). Returns -1 if not an integer type. */
static int kv_int(const gguf_file *f, const gguf_kv *kv, int *neg, uint64_t *u, int64_t *s) {
    const uint8_t *p = f->map + kv->off;
    uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32; uint64_t u64 = 0; int64_t i64 = 0;
    int is_signed = 0;
    switch (kv->type) {
    case GGUF_VTYPE_UINT8: memcpy(&u8, p, 1); u64 = u8; break;
    case GGUF_VTYPE_UINT16: memcpy(&u16, p, 2); u64 = u16; break;
    case GGUF_VTYPE_UINT32: memcpy(&u32, p, 4); u64 = u32; break;
    case GGUF_VTYPE_UINT64: memcpy(&u64, p, 8); break;
    case GGUF_VTYPE_INT8: memcpy(&i8, p, 1); i64 = i8; is_signed = 1; break;
    case GGUF_VTYPE_INT16: memcpy(&i16, p, 2); i64 = i16; is_signed = 1; break;
    case GGUF_VTYPE_INT32: memcpy(&i32, p, 4); i64 = i32; is_signed = 1; break;
    case GGUF_VTYPE_INT64: memcpy(&i64, p, 8); is_signed = 1; break;
    default: return -1;
    }
    if (is_signed) {
        *neg = i64 < 0;
        *s = i64;
        *u = (uint64_t)i64;
    } else {
        *neg = 0;
        *u = u64;
        *s = (int64_t)u64; /* meaningful only if u64 <= INT64_MAX */
    }
    return 0;
}

static int get_int(const gguf_file *f, const char *key, uint64_t umax, int allow_neg, uint64_t *u, int64_t *s,
                   qerr *e) {
    const gguf_kv *kv = kv_get(f, key, e);
    if (!kv) return -1;
    int neg;
    if (kv_int(f, kv, &neg, u, s) != 0) return kv_wrong_type(f, kv, "an integer", e);
    if (neg ? !allow_neg : *u > umax)
        return qerr_set(e, "%s: key '%s' = %s%llu does not fit the requested type", f->path, key, neg ? "-" : "",
                        neg ? (unsigned long long)(0 - *u) : (unsigned long long)*u);
    return 0;
}

int gguf_has_key(const gguf_file *f, const char *key) { return kv_find(f, key) != NULL; }

int gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out, qerr *e) {
    uint64_t u = 0;
    int64_t s = 0;
    if (get_int(f, key, UINT32_MAX, 0, &u, &s, e)) return -1;
    *out = (uint32_t)u;
    return 0;
}

int gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out, qerr *e) {
    uint64_t u = 0;
    int64_t s = 0;
    if (get_int(f, key, UINT64_MAX, 0, &u, &s, e)) return -1;
    *out = u;
    return 0;
}

int gguf_get_i64(const gguf_file *f, const char *key, int64_t *out, qerr *e) {
    uint64_t u = 0;
    int64_t s = 0;
    if (get_int(f, key, (uint64_t)INT64_MAX, 1, &u, &s, e)) return -1;
    *out = s;
    return 0;
}

int gguf_get_f32(const gguf_file *f, const char *key, float *out, qerr *e) {
    const gguf_kv *kv = kv_get(f, key, e);
    if (!kv) return -1;
    if (kv->type == GGUF_VTYPE_FLOAT32) {
        memcpy(out, f->map + kv->off, 4);
    } else if (kv->type == GGUF_VTYPE_FLOAT64) {
        double d;
        memcpy(&d, f->map + kv->off, 8);
        *out = (float)d;
    } else {
        return kv_wrong_type(f, kv, "float32 or float64", e);
    }
    return 0;
}

int gguf_get_bool(const gguf_file *f, const char *key, int *out, qerr *e) {
    const gguf_kv *kv = kv_get(f, key, e);
    if (!kv) return -1;
    if (kv->type != GGUF_VTYPE_BOOL) return kv_wrong_type(f, kv, "bool", e);
    *out = f->map[kv->off] != 0;
    return 0;
}

/* The string whose u64 length prefix is at file offset off (validated at open). */
static void str_at(const gguf_file *f, uint64_t off, const char **s, size_t *len) {
    uint64_t n;
    memcpy(&n, f->map + off, 8);
    *s = (const char *)f->map + off + 8;
    *len = (size_t)n;
}

int gguf_get_str(const gguf_file *f, const char *key, const char **s, size_t *len, qerr *e) {
    const gguf_kv *kv = kv_get(f, key, e);
    if (!kv) return -1;
    if (kv->type != GGUF_VTYPE_STRING) return kv_wrong_type(f, kv, "string", e);
    str_at(f, kv->off, s, len);
    return 0;
}

int gguf_get_arr_info(const gguf_file *f, const char *key, gguf_vtype *elem, uint64_t *count, qerr *e) {
    const gguf_kv *kv = kv_get(f, key, e);
    if (!kv) return -1;
    if (kv->type != GGUF_VTYPE_ARRAY) return kv_wrong_type(f, kv, "array", e);
    if (elem) *elem = (gguf_vtype)kv->arr_type;
    if (count) *count = kv->arr_count;
    return 0;
}

int gguf_get_arr_data(const gguf_file *f, const char *key, const void **data, qerr *e) {
    const gguf_kv *kv = kv_get(f, key, e);
    if (!kv) return -1;
    if (kv->type != GGUF_VTYPE_ARRAY || !gguf_vtype_size(kv->arr_type))
        return kv_wrong_type(f, kv, "an array of numbers or bools", e);
    *data = f->map + kv->off;
    return 0;
}

int gguf_get_arr_str(const gguf_file *f, const char *key, uint64_t i, const char **s, size_t *len, qerr *e) {
    const gguf_kv *kv = kv_get(f, key, e);
    if (!kv) return -1;
    if (kv->type != GGUF_VTYPE_ARRAY || kv->arr_type != GGUF_VTYPE_STRING)
        return kv_wrong_type(f, kv, "an array of strings", e);
    if (i >= kv->arr_count)
        return qerr_set(e, "%s: key '%s': index %llu out of range (array has %llu strings)", f->path, key,
                        (unsigned long long)i, (unsigned long long)kv->arr_count);
    str_at(f, kv->str_off[i], s, len);
    return 0;
}

/* ---- tensors ---- */

uint64_t gguf_n_tensors(const gguf_file *f) { return f->n_tensors; }

const gguf_tensor *gguf_tensor_at(const gguf_file *f, uint64_t i) {
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    if (!f || !name || !f->t_hash) return NULL;
    uint64_t s = hash_slot(f->t_hash, f->t_cap, name, strlen(name), t_name_of, f);
    return f->t_hash[s] ? &f->tensors[f->t_hash[s] - 1] : NULL;
}

int gguf_tensor_rows_to_f32(const gguf_tensor *t, uint64_t row0, uint64_t nrows, float *dst, qerr *e) {
    if (!t) return qerr_set(e, "gguf_tensor_rows_to_f32: no tensor");
    if (!ggml_type_can_dequantize(t->type))
        return qerr_set(e, "tensor '%s': type %s (%u) cannot be dequantized (supported: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K)",
                        t->name, ggml_type_name(t->type), t->type);
    uint32_t blck, tsize;
    ggml_type_info(t->type, &blck, &tsize);
    const uint64_t ne0 = t->ne[0], rows = t->nelements / ne0, row_bytes = ne0 / blck * tsize;
    if (row0 > rows || nrows > rows - row0)
        return qerr_set(e, "tensor '%s': rows [%llu, %llu) out of range (it has %llu rows of %llu)", t->name,
                        (unsigned long long)row0, (unsigned long long)(row0 + nrows), (unsigned long long)rows,
                        (unsigned long long)ne0);
    for (uint64_t r = 0; r < nrows; r++)
        if (ggml_dequantize_row(t->type, t->data + (row0 + r) * row_bytes, dst + r * ne0, (int64_t)ne0) != 0)
            return qerr_set(e, "tensor '%s': cannot dequantize %s row", t->name, ggml_type_name(t->type));
    return 0;
}

int gguf_tensor_to_f32(const gguf_tensor *t, float *dst, qerr *e) {
    if (!t) return qerr_set(e, "gguf_tensor_to_f32: no tensor");
    const int64_t cols = (int64_t)t->ne[0], rows = (int64_t)(t->nelements / t->ne[0]);
    int err = 0;
    qerr e2 = {{0}};
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += 64) {
        int64_t n = rows - r0 < 64 ? rows - r0 : 64;
        qerr el;
        if (gguf_tensor_rows_to_f32(t, (uint64_t)r0, (uint64_t)n, dst + r0 * cols, &el)) {
#pragma omp critical
            {
                err = 1;
                e2 = el;
            }
        }
    }
    if (err) {
        if (e) *e = e2;
        return -1;
    }
    return 0;
}
