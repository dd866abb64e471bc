/* model/llama_fsdp.c — FULL_SHARD of the frozen base (see llama_fsdp.h). */
#include "model/llama_fsdp.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "autograd/backend.h"
#include "core/bf16.h"

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

void llama_fsdp_range(const llama_fsdp *f, int r, int64_t *x0, int64_t *x1) {
    const int64_t bs = f->lo.blocksize, nb = f->lo.elem[LLAMA_N_LINEAR] / bs;
    int64_t b0 = (int64_t)r * f->blocks_per_rank, b1 = b0 + f->blocks_per_rank;
    if (b0 > nb) b0 = nb;
    if (b1 > nb) b1 = nb;
    *x0 = b0 * bs;
    *x1 = b1 * bs;
}

/* The byte ranges of rank r's shard; in the shard each section's bytes start
 * at at[s], a multiple of LLAMA_BLOB_ALIGN (so the fp32 sections stay
 * aligned). Returns the shard's size. */
static size_t rank_ranges_at(const llama_fsdp *f, int r, llama_byte_range out[LLAMA_BLOB_N_SECTIONS],
                             size_t at[LLAMA_BLOB_N_SECTIONS]) {
    int64_t x0, x1;
    llama_fsdp_range(f, r, &x0, &x1);
    qerr e;
    if (llama_layer_range_bytes(&f->lo, x0, x1, out, &e)) abort(); /* block boundaries by construction */
    size_t n = 0;
    for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++) {
        n = align_up(n, LLAMA_BLOB_ALIGN);
        at[s] = n;
        n += out[s].len;
    }
    return n;
}

static size_t rank_ranges(const llama_fsdp *f, int r, llama_byte_range out[LLAMA_BLOB_N_SECTIONS]) {
    size_t at[LLAMA_BLOB_N_SECTIONS];
    return rank_ranges_at(f, r, out, at);
}

int llama_fsdp_init(llama_fsdp *f, comm *c, const llama_layer_layout *lo, int n_layer, qerr *e) {
    memset(f, 0, sizeof *f);
    f->c = c;
    f->lo = *lo;
    f->n_layer = n_layer;
    const int64_t nb = lo->elem[LLAMA_N_LINEAR] / lo->blocksize;
    f->blocks_per_rank = (nb + c->world_size - 1) / c->world_size;
    llama_byte_range rg[LLAMA_BLOB_N_SECTIONS];
    for (int r = 0; r < c->world_size; r++) {
        size_t n = rank_ranges(f, r, rg);
        if (n > f->shard_cap) f->shard_cap = n;
        if (r == c->rank) f->own_bytes = n;
    }
    f->slot_layer = -1;
    f->req_layer = -1;
    const size_t cap = align_up(f->shard_cap ? f->shard_cap : 1, LLAMA_BLOB_ALIGN);
    const size_t blob = align_up(lo->nbytes ? lo->nbytes : 1, LLAMA_BLOB_ALIGN);
    f->shard = calloc((size_t)n_layer, sizeof *f->shard);
    f->recv = aligned_alloc(LLAMA_BLOB_ALIGN, cap * (size_t)c->world_size);
    f->slot = aligned_alloc(LLAMA_BLOB_ALIGN, blob);
    int ok = f->shard && f->recv && f->slot;
    for (int l = 0; ok && l < n_layer; l++) ok = (f->shard[l] = aligned_alloc(LLAMA_BLOB_ALIGN, cap)) != NULL;
    if (!ok) {
        llama_fsdp_free(f);
        return qerr_set(e, "out of memory (FULL_SHARD: %d layer shards of %zu bytes and a %zu-byte layer scratch)",
                        n_layer, f->shard_cap, lo->nbytes);
    }
    for (int l = 0; l < n_layer; l++) memset(f->shard[l], 0, cap);
    memset(f->slot, 0, blob);
    return 0;
}

/* Where blob byte `off` of section s lies in this rank's shard of layer l (off within the rank's range). */
static uint8_t *shard_at(const llama_fsdp *f, int l, const llama_byte_range rg[LLAMA_BLOB_N_SECTIONS],
                         const size_t at[LLAMA_BLOB_N_SECTIONS], int s, size_t off) {
    return f->shard[l] + at[s] + (off - rg[s].off);
}

/* Elements per streamed piece of a linear (whole rows, whole blocks). */
static int64_t piece_rows(int64_t cols, int bs) {
    int64_t q = 1; /* rows whose elements make whole blocks */
    while ((q * cols) % bs) q++;
    int64_t r = (1 << 20) / cols / q * q;
    return r > q ? r : q;
}

int llama_fsdp_load_layer(llama_fsdp *f, int l, llama_rows_fn rows, void *arg, qerr *e) {
    const llama_layer_layout *lo = &f->lo;
    llama_byte_range rg[LLAMA_BLOB_N_SECTIONS];
    size_t at[LLAMA_BLOB_N_SECTIONS];
    rank_ranges_at(f, f->c->rank, rg, at);
    int64_t x0, x1;
    llama_fsdp_range(f, f->c->rank, &x0, &x1);
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        const int64_t a = x0 > lo->elem[k] ? x0 : lo->elem[k], b = x1 < lo->elem[k + 1] ? x1 : lo->elem[k + 1];
        if (a >= b) continue;
        const int64_t R = lo->rows[k], C = lo->cols[k], n = R * C, bs = lo->blocksize;
        const int64_t i0 = a - lo->elem[k], i1 = b - lo->elem[k]; /* the linear's own elements */
        const int64_t iend = i1 < n ? i1 : n;
        float *absmax = NULL;
        nf4_tensor geom;
        memset(&geom, 0, sizeof geom);
        if (lo->kind == FROZEN_NF4) {
            /* geometry and nested_code only: the buffers are never touched */
            static float dummy[16];
            if (nf4_view(&geom, R, C, lo->blocksize, lo->double_quant, (uint8_t *)dummy, dummy, dummy, e))
                return -1;
        }
        if (lo->kind == FROZEN_NF4 && lo->double_quant) {
            /* every block's absmax of the linear: the offset is their mean, a cut group needs all of its blocks */
            const int64_t pr = piece_rows(C, lo->blocksize);
            absmax = malloc((size_t)geom.nblocks * sizeof(float));
            float *piece = malloc((size_t)(pr * C) * sizeof(float));
            int rc = absmax && piece ? 0 : qerr_set(e, "out of memory (FULL_SHARD load)");
            for (int64_t r0 = 0; !rc && r0 < R; r0 += pr) {
                const int64_t nr = R - r0 < pr ? R - r0 : pr;
                rc = rows(arg, l, k, r0, nr, piece, e);
                if (!rc) nf4_absmax_blocks(piece, nr * C, lo->blocksize, absmax + r0 * C / bs);
            }
            free(piece);
            /* a non-finite weight anywhere in the linear: every rank refuses it (not only its holder) */
            for (int64_t b0 = 0; !rc && b0 < geom.nblocks; b0++)
                if (absmax[b0] != absmax[b0])
                    rc = qerr_set(e, "layer %d, %s: a non-finite weight in rows %lld..%lld", l, llama_linears[k].peft,
                                  (long long)(b0 * bs / C), (long long)(((b0 + 1) * bs - 1) / C));
            if (rc) {
                free(absmax);
                return -1;
            }
        }
        /* the own rows (the range may start and end inside a row) */
        const int64_t r0 = i0 / C, r1 = (iend + C - 1) / C;
        float *w = malloc((size_t)((r1 - r0) * C) * sizeof(float));
        if (!w) {
            free(absmax);
            return qerr_set(e, "out of memory (FULL_SHARD load)");
        }
        int rc = rows(arg, l, k, r0, r1 - r0, w, e);
        const float *wr = w + (i0 - r0 * C);
        if (!rc && lo->kind == FROZEN_BF16) {
            bf16 *dst = (bf16 *)(void *)shard_at(f, l, rg, at, LLAMA_BLOB_DATA, lo->off[LLAMA_BLOB_DATA] + (size_t)a * 2);
            for (int64_t i = 0; i < iend - i0; i++) dst[i] = f32_to_bf16(wr[i]);
        } else if (!rc) {
            const size_t ss = lo->double_quant ? 1 : sizeof(float);
            uint8_t *packed = shard_at(f, l, rg, at, LLAMA_BLOB_DATA, lo->off[LLAMA_BLOB_DATA] + (size_t)(a / 2));
            uint8_t *scales = shard_at(f, l, rg, at, LLAMA_BLOB_SCALES, lo->off[LLAMA_BLOB_SCALES] + (size_t)(a / bs) * ss);
            float nested_tmp[1], off = 0;
            float *nested = nested_tmp;
            float *ofs = &off;
            if (lo->double_quant) {
                const int64_t g = lo->group[k] + i0 / bs / NF4_NESTED_BLOCKSIZE;
                nested = (float *)(void *)shard_at(f, l, rg, at, LLAMA_BLOB_NESTED,
                                                   lo->off[LLAMA_BLOB_NESTED] + (size_t)g * sizeof(float));
                ofs = (float *)(void *)shard_at(f, l, rg, at, LLAMA_BLOB_OFFSETS,
                                                lo->off[LLAMA_BLOB_OFFSETS] + (size_t)k * sizeof(float));
            }
            rc = nf4_quantize_range(wr, i0, i1, &geom, absmax, packed, scales, nested, ofs, e);
        }
        free(w);
        free(absmax);
        if (rc) return qerr_prefix(e, "layer %d, %s", l, llama_linears[k].peft);
    }
    return 0;
}

static void fsdp_fail(const llama_fsdp *f, const qerr *e);
static int finish(llama_fsdp *f, int use, qerr *e);

/* Rank q's rows [lo, hi) of a table. */
static void table_range(const llama_fsdp *f, int q, int64_t *lo, int64_t *hi) {
    int64_t a = (int64_t)q * f->tab_rows, b = a + f->tab_rows;
    if (b > f->tab_V) b = f->tab_V;
    if (a > b) a = b;
    *lo = a;
    *hi = b;
}

static void table_rows(void *arg, int64_t r0, int64_t n, bf16 *dst) {
    const struct llama_fsdp_table *t = arg;
    const llama_fsdp *f = t->f;
    const int64_t D = f->tab_D;
    qerr e;
    for (int q = 0; q < f->c->world_size; q++) {
        int64_t lo, hi;
        table_range(f, q, &lo, &hi);
        const int64_t x = r0 > lo ? r0 : lo, y = r0 + n < hi ? r0 + n : hi;
        if (y <= x) continue;
        bf16 *d = dst + (x - r0) * D;
        if (q == f->c->rank) memcpy(d, t->rows + (x - lo) * D, (size_t)((y - x) * D) * sizeof(bf16));
        if (comm_broadcast(f->c, d, (size_t)((y - x) * D) * sizeof(bf16), COMM_U8, q, &e)) fsdp_fail(f, &e);
    }
}

/* The whole table into the gather scratch: every rank's rows broadcast from it. The layer the scratch held is
 * gone (the next acquire gathers it again); a gather in flight is completed first. */
static const bf16 *table_gather_all(void *arg) {
    const struct llama_fsdp_table *t = arg;
    llama_fsdp *f = t->f;
    qerr e;
    if (f->req && finish(f, 0, &e)) fsdp_fail(f, &e);
    f->slot_layer = -1;
    f->slot_dirty = 1;
    bf16 *dst = (bf16 *)(void *)f->slot;
    for (int q = 0; q < f->c->world_size; q++) {
        int64_t lo, hi;
        table_range(f, q, &lo, &hi);
        if (hi <= lo) continue;
        bf16 *d = dst + lo * f->tab_D;
        if (q == f->c->rank) memcpy(d, t->rows, (size_t)((hi - lo) * f->tab_D) * sizeof(bf16));
        if (comm_broadcast(f->c, d, (size_t)((hi - lo) * f->tab_D) * sizeof(bf16), COMM_U8, q, &e)) fsdp_fail(f, &e);
    }
    return dst;
}

/* Rows per chunk of the embedding's gather: ~2 MiB of bf16 rows, at least 16. */
static int64_t embed_chunk_rows(int64_t D, int64_t V) {
    int64_t p = ((int64_t)2 << 20) / (2 * (D > 0 ? D : 1));
    if (p < 16) p = 16;
    return p < V ? p : V;
}

/* This rank's rows of a whole table (V × D bf16) into a new buffer. */
static bf16 *table_shard(const llama_fsdp *f, const bf16 *whole, qerr *e) {
    int64_t lo, hi;
    table_range(f, f->c->rank, &lo, &hi);
    bf16 *s = calloc((size_t)(f->tab_rows > 0 ? f->tab_rows : 1) * (size_t)f->tab_D, sizeof(bf16));
    if (!s) {
        qerr_set(e, "out of memory (FULL_SHARD: %lld table rows)", (long long)f->tab_rows);
        return NULL;
    }
    if (hi > lo) memcpy(s, whole + lo * f->tab_D, (size_t)((hi - lo) * f->tab_D) * sizeof(bf16));
    return s;
}

/* Whether sharding the tables pays: the bytes it frees (the whole tables less this rank's rows) exceed what it
 * adds (the gather scratch grown to hold the whole head, the embedding's chunk). QLORA_FSDP_SHARD_TABLES=1 or 0
 * forces it (tests: the tiny model's tables are smaller than what the rule weighs them against). */
static int tables_pay(const llama_fsdp *f, int tied, int64_t V, int64_t D) {
    const char *force = getenv("QLORA_FSDP_SHARD_TABLES");
    if (force && (!strcmp(force, "1") || !strcmp(force, "0"))) return force[0] == '1';
    const double W = f->c->world_size, row = 2.0 * (double)D, whole = (double)V * row;
    const double freed = whole * (tied ? 1 : 2) - ceil((double)V / W) * row * (tied ? 1 : 2);
    const double have = (double)llama_fsdp_scratch_bytes(f);
    const double added = (whole > have ? whole - have : 0) + (double)embed_chunk_rows(D, V) * row;
    return freed > added;
}

static int shard_tables(llama_fsdp *f, llama_model *m, qerr *e) {
    if (f->c->world_size < 2 || !m->tok_embd || m->embed.kind != FROZEN_BF16 || m->lm_head.kind != FROZEN_BF16)
        return 0;
    const int tied = m->lm_head_w == m->tok_embd;
    if (!tables_pay(f, tied, m->embed.out, m->embed.in)) return 0;
    f->tab_V = m->embed.out;
    f->tab_D = m->embed.in;
    f->tab_rows = (f->tab_V + f->c->world_size - 1) / f->c->world_size;
    /* one gather scratch for a layer (slot, then the receive buffer) or the whole head */
    const size_t blob = align_up(f->lo.nbytes ? f->lo.nbytes : 1, LLAMA_BLOB_ALIGN);
    const size_t cap = align_up(f->shard_cap ? f->shard_cap : 1, LLAMA_BLOB_ALIGN);
    const size_t head = align_up((size_t)(f->tab_V * f->tab_D) * sizeof(bf16), LLAMA_BLOB_ALIGN);
    const size_t need = blob + cap * (size_t)f->c->world_size > head ? blob + cap * (size_t)f->c->world_size : head;
    uint8_t *scratch = aligned_alloc(LLAMA_BLOB_ALIGN, need);
    if (!scratch) return qerr_set(e, "out of memory (FULL_SHARD: a %zu-byte gather scratch)", need);
    free(f->slot);
    free(f->recv);
    f->scratch = scratch;
    f->scratch_bytes = need;
    f->slot = scratch;
    f->recv = scratch + blob;
    memset(f->slot, 0, blob);
    if (!(f->tab_embd = table_shard(f, m->tok_embd, e))) return -1;
    if (!tied && !(f->tab_head = table_shard(f, m->lm_head_w, e))) return -1;
    f->ta_embd = (struct llama_fsdp_table){.f = f, .rows = f->tab_embd};
    f->ta_head = (struct llama_fsdp_table){.f = f, .rows = tied ? f->tab_embd : f->tab_head};
    f->sh_embd = (frozen_shards){.arg = &f->ta_embd, .chunk_rows = embed_chunk_rows(f->tab_D, f->tab_V),
                                 .rows = table_rows, .gather_all = table_gather_all};
    f->sh_head = f->sh_embd;
    f->sh_head.arg = &f->ta_head;
    if (!tied) free(m->lm_head_w);
    free(m->tok_embd);
    m->tok_embd = m->lm_head_w = NULL;
    m->embed.w_bf16 = m->lm_head.w_bf16 = NULL;
    m->embed.shards = &f->sh_embd;
    m->lm_head.shards = &f->sh_head;
    return 0;
}

int llama_fsdp_attach(llama_fsdp *f, llama_model *m, qerr *e) {
    if (shard_tables(f, m, e)) return -1;
    f->m = m;
    for (int l = 0; l < f->n_layer; l++) {
        llama_layer *L = &m->layers[l];
        if (llama_layer_views(L, &f->lo, f->slot, e)) return qerr_prefix(e, "layer %d", l);
        L->blob = NULL; /* owned by f: bound only while acquired */
    }
    m->fsdp = f;
    return 0;
}

static void fsdp_fail(const llama_fsdp *f, const qerr *e) {
    dprintf(f->c->err_fd, "qlora-train: FULL_SHARD gather of the frozen base: %s\n", e->msg);
    comm_abort(f->c, 1);
}

/* Every rank's ranges from the receive buffer into dst. */
static void unpack(const llama_fsdp *f, uint8_t *dst) {
    const size_t cap = align_up(f->shard_cap ? f->shard_cap : 1, LLAMA_BLOB_ALIGN);
    for (int r = 0; r < f->c->world_size; r++) {
        llama_byte_range rg[LLAMA_BLOB_N_SECTIONS];
        size_t at[LLAMA_BLOB_N_SECTIONS];
        rank_ranges_at(f, r, rg, at);
        const uint8_t *src = f->recv + (size_t)r * cap;
        for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++)
            if (rg[s].len) memcpy(dst + rg[s].off, src + at[s], rg[s].len);
    }
}

static int start(llama_fsdp *f, int l, qerr *e) {
    const size_t cap = align_up(f->shard_cap ? f->shard_cap : 1, LLAMA_BLOB_ALIGN);
    f->n_gathers++;
    f->req_layer = l;
    return comm_all_gather_start(f->c, f->shard[l], f->recv, cap, COMM_U8, &f->req, e);
}

/* Complete the gather in flight; into the scratch when `use` (the layer in the scratch is done), else
 * only completed (every rank waits for every gather it started, in the same order). */
static int finish(llama_fsdp *f, int use, qerr *e) {
    comm_request *rq = f->req;
    f->req = NULL;
    if (comm_wait(f->c, rq, e)) return -1;
    if (use) {
        if (f->slot_dirty) { /* the whole head was here: the alignment gaps must read 0 again */
            memset(f->slot, 0, align_up(f->lo.nbytes ? f->lo.nbytes : 1, LLAMA_BLOB_ALIGN));
            f->slot_dirty = 0;
        }
        unpack(f, f->slot);
        f->slot_layer = f->req_layer;
    }
    f->req_layer = -1;
    return 0;
}

int llama_fsdp_gather_into(llama_fsdp *f, int l, uint8_t *dst, qerr *e) {
    if (f->req && finish(f, 0, e)) return -1;
    comm_request *rq;
    const size_t cap = align_up(f->shard_cap ? f->shard_cap : 1, LLAMA_BLOB_ALIGN);
    if (comm_all_gather_start(f->c, f->shard[l], f->recv, cap, COMM_U8, &rq, e) || comm_wait(f->c, rq, e)) return -1;
    memset(dst, 0, f->lo.nbytes);
    unpack(f, dst);
    return 0;
}

void llama_fsdp_prefetch(llama_fsdp *f, int l) {
    qerr e;
    if (l < 0 || l >= f->n_layer || f->slot_layer == l || f->req_layer == l) return;
    /* another layer in flight (not in the trainer's order of calls): completed, its bytes dropped — the
     * scratch may be in use */
    if (f->req && finish(f, 0, &e)) fsdp_fail(f, &e);
    if (start(f, l, &e)) fsdp_fail(f, &e);
}

void llama_fsdp_acquire(llama_fsdp *f, int l) {
    qerr e;
    if (f->slot_layer != l) {
        if (f->req_layer != l) llama_fsdp_prefetch(f, l);
        if (finish(f, 1, &e)) fsdp_fail(f, &e);
    }
    llama_layer_bind(&f->m->layers[l], f->slot);
    f->m->layers[l].blob = NULL; /* not owned */
}

void llama_fsdp_idle_forward(llama_fsdp *f) {
    bf16 *tmp = NULL;
    if (f->tab_embd) { /* the embedding's chunks (op_embedding) */
        tmp = malloc(llama_fsdp_table_chunk_bytes(f));
        if (!tmp) {
            qerr e;
            qerr_set(&e, "rank %d: out of memory", f->c->rank);
            fsdp_fail(f, &e);
        }
        for (int64_t r0 = 0; r0 < f->tab_V; r0 += f->sh_embd.chunk_rows)
            table_rows(&f->ta_embd, r0, f->tab_V - r0 < f->sh_embd.chunk_rows ? f->tab_V - r0 : f->sh_embd.chunk_rows,
                       tmp);
    }
    for (int l = 0; l < f->n_layer; l++) {
        llama_fsdp_acquire(f, l);
        llama_fsdp_prefetch(f, l + 1);
    }
    if (f->tab_embd) table_gather_all(&f->ta_head); /* the LM head's */
    free(tmp);
}

size_t llama_fsdp_table_bytes(const llama_fsdp *f) {
    return (size_t)f->tab_rows * (size_t)f->tab_D * sizeof(bf16) * (f->tab_head ? 2 : f->tab_embd ? 1 : 0);
}

size_t llama_fsdp_table_chunk_bytes(const llama_fsdp *f) {
    return f->tab_embd ? (size_t)(f->sh_embd.chunk_rows * f->tab_D) * sizeof(bf16) : 0;
}

size_t llama_fsdp_resident_bytes(const llama_fsdp *f) {
    return (size_t)f->n_layer * align_up(f->shard_cap ? f->shard_cap : 1, LLAMA_BLOB_ALIGN);
}

size_t llama_fsdp_scratch_bytes(const llama_fsdp *f) {
    if (f->scratch) return f->scratch_bytes;
    return align_up(f->lo.nbytes ? f->lo.nbytes : 1, LLAMA_BLOB_ALIGN) +
           (size_t)(f->c ? f->c->world_size : 1) * align_up(f->shard_cap ? f->shard_cap : 1, LLAMA_BLOB_ALIGN);
}

void llama_fsdp_free(llama_fsdp *f) {
    if (f->req) {
        qerr e;
        if (comm_wait(f->c, f->req, &e)) fsdp_fail(f, &e);
        f->req = NULL;
    }
    if (f->m)
        for (int l = 0; l < f->n_layer; l++) f->m->layers[l].blob = NULL;
    if (f->m && f->tab_embd) {
        f->m->embed.shards = f->m->lm_head.shards = NULL;
    }
    free(f->tab_embd);
    free(f->tab_head);
    for (int l = 0; f->shard && l < f->n_layer; l++) free(f->shard[l]);
    free(f->shard);
    if (f->scratch) {
        free(f->scratch);
    } else {
        free(f->slot);
        free(f->recv);
    }
    memset(f, 0, sizeof *f);
}

/* ------------------------------------------------------------------ gradient buckets */

void llama_release_zero(void *p, size_t n) {
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t a = (uintptr_t)p, b = a + n;
    const uintptr_t a0 = (a + pg - 1) / pg * pg, b0 = b / pg * pg;
    if (b0 <= a0) {
        memset(p, 0, n);
        return;
    }
    memset(p, 0, a0 - a);
    memset((void *)b0, 0, b - b0);
    if (madvise((void *)a0, b0 - a0, MADV_DONTNEED)) memset((void *)a0, 0, b0 - a0); /* cannot: zero it */
}

int llama_grad_buckets_init(llama_grad_buckets *g, comm *c, const lora_set *ls, const struct ag_backend *be,
                            const int64_t *cuts, int release, qerr *e) {
    memset(g, 0, sizeof *g);
    g->c = c;
    g->ls = ls;
    g->be = be;
    g->reduce_scatter = cuts != NULL;
    g->cuts = cuts;
    g->release = release && cuts != NULL;
    g->n_layer = ls->n_layer;
    g->shard_len = (ls->n_params + c->world_size - 1) / c->world_size;
    g->req = calloc((size_t)g->n_layer + 1, sizeof *g->req);
    g->state = calloc((size_t)g->n_layer + 1, 1);
    g->order = calloc((size_t)g->n_layer + 1, sizeof *g->order);
    g->counts = calloc((size_t)c->world_size, sizeof *g->counts);
    if (!g->req || !g->state || !g->order || !g->counts) {
        llama_grad_buckets_free(g);
        return qerr_set(e, "out of memory (gradient buckets of %d layers)", ls->n_layer);
    }
    return 0;
}

void llama_grad_buckets_arm(llama_grad_buckets *g, float *acc) {
    g->armed = 1;
    g->acc = acc;
    g->n_order = g->n_waited = 0;
    memset(g->state, 0, (size_t)g->n_layer + 1);
}

static void buckets_fail(const llama_grad_buckets *g, const qerr *e) {
    dprintf(g->c->err_fd, "qlora-train: gradient bucket reduction: %s\n", e->msg);
    comm_abort(g->c, 1);
}

/* This rank's shard [lo, hi) of the flat arena. */
static void own_shard(const llama_grad_buckets *g, int r, int64_t *lo, int64_t *hi) {
    *lo = g->cuts[r];
    *hi = g->cuts[r + 1];
}

/* Bucket l's elements [*a, *b) of the flat arena: layer l's adapters for l < n_layer; bucket n_layer is the tail
 * after the last layer, the lora_modules_to_save copies (model/llama.h save_offset), empty without them. */
static void bucket_range(const llama_grad_buckets *g, int l, int64_t *a, int64_t *b) {
    *a = g->ls->layer_offset[l];
    *b = l < g->n_layer ? g->ls->layer_offset[l + 1] : g->ls->n_params;
}

/* Wait for the oldest bucket in flight; with release, give back its pages outside the own shard. */
static int wait_oldest(llama_grad_buckets *g, qerr *e) {
    const int l = g->order[g->n_waited++];
    comm_request *rq = g->req[l];
    g->req[l] = NULL;
    if (comm_wait(g->c, rq, e)) return -1;
    g->state[l] = 2;
    if (g->release) {
        int64_t a, b;
        bucket_range(g, l, &a, &b);
        int64_t lo, hi;
        own_shard(g, g->c->rank, &lo, &hi);
        float *gr = g->ls->grads;
        /* whole pages only: a page shared with the own shard or another bucket keeps its bytes */
        const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
        const int64_t cut[2][2] = {{a, b < lo ? b : lo}, {a > hi ? a : hi, b}};
        for (int k = 0; k < 2; k++) {
            if (cut[k][1] <= cut[k][0]) continue;
            const uintptr_t x = (uintptr_t)(gr + cut[k][0]), y = (uintptr_t)(gr + cut[k][1]);
            const uintptr_t x0 = (x + pg - 1) / pg * pg, y0 = y / pg * pg;
            if (y0 > x0) madvise((void *)x0, y0 - x0, MADV_DONTNEED);
        }
    }
    return 0;
}

static int start_bucket(llama_grad_buckets *g, int l, qerr *e) {
    const lora_set *ls = g->ls;
    int64_t a, b;
    bucket_range(g, l, &a, &b);
    float *buf = ls->grads + a;
    if (g->acc && b > a) g->be->add(g->acc + a, buf, buf, b - a); /* the trainer's acc + grads, per bucket */
    g->be->sync();
    int rc;
    if (!g->reduce_scatter) {
        rc = comm_all_reduce_start(g->c, buf, (size_t)(b - a), COMM_F32, &g->req[l], e);
    } else {
        for (int r = 0; r < g->c->world_size; r++) {
            int64_t lo, hi;
            own_shard(g, r, &lo, &hi);
            const int64_t x = a > lo ? a : lo, y = b < hi ? b : hi;
            g->counts[r] = y > x ? (size_t)(y - x) : 0;
        }
        rc = comm_reduce_scatter_start(g->c, buf, g->counts, COMM_F32, &g->req[l], e);
    }
    if (rc) return -1;
    g->state[l] = 1;
    g->order[g->n_order++] = l;
    g->n_buckets++;
    return 0;
}

void llama_grad_buckets_layer_done(llama_grad_buckets *g, int l) {
    qerr e;
    if (!g->armed || l < 0 || l >= g->n_layer || g->state[l]) return;
    /* at most two in flight: the one started two layers ago completes first (its pages go back) */
    while (g->n_order - g->n_waited >= 2)
        if (wait_oldest(g, &e)) buckets_fail(g, &e);
    if (start_bucket(g, l, &e)) buckets_fail(g, &e);
}

int llama_grad_buckets_finish(llama_grad_buckets *g, qerr *e) {
    if (!g->armed) return 0;
    for (int l = g->n_layer - 1; l >= 0; l--) {
        if (g->state[l]) continue;
        while (g->n_order - g->n_waited >= 2)
            if (wait_oldest(g, e)) return -1;
        if (start_bucket(g, l, e)) return -1;
    }
    /* the tail (lora_modules_to_save copies): the LM head's gradient is made in forward, the embedding's at the
     * very end of backward, so it is reduced here, after every layer, in the same order on every rank */
    if (g->ls->n_params > g->ls->layer_offset[g->n_layer] && !g->state[g->n_layer]) {
        while (g->n_order - g->n_waited >= 2)
            if (wait_oldest(g, e)) return -1;
        if (start_bucket(g, g->n_layer, e)) return -1;
    }
    while (g->n_waited < g->n_order)
        if (wait_oldest(g, e)) return -1;
    g->armed = 0;
    g->acc = NULL;
    return 0;
}

void llama_grad_buckets_zero(llama_grad_buckets *g) {
    const size_t bytes = (size_t)g->ls->n_params * sizeof(float);
    if (g->release) llama_release_zero(g->ls->grads, bytes);
    else g->be->zero(g->ls->grads, bytes);
}

void llama_grad_buckets_free(llama_grad_buckets *g) {
    if (g->req && g->c) {
        qerr e;
        while (g->n_waited < g->n_order)
            if (wait_oldest(g, &e)) buckets_fail(g, &e);
    }
    free(g->req);
    free(g->state);
    free(g->order);
    free(g->counts);
    memset(g, 0, sizeof *g);
}
