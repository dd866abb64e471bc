/* autograd/backend_fenced.c — the `cpu-fenced` backend: the `cpu` kernels with data memory the
 * host cannot read, so that a CPU run behaves like a device run with respect to memory.
 *
 * A device backend's data memory (autograd/backend.h "data") is not addressable by host code:
 * every host read or write of it has to go through copy_d2h/copy_h2d, and every pointer a
 * kernel gets as "data" has to be the backend's memory. A GPU is not needed to check that a
 * code path keeps those rules: here each allocation is its own mmap region kept PROT_NONE
 * except while one of this table's calls runs (it opens every region, calls the `cpu` entry,
 * closes them). So
 *   - host code that touches data memory outside the table faults; the SIGSEGV handler prints
 *     the address, the allocation it falls in and a backtrace naming the code;
 *   - a table call given a "data" pointer that is not this backend's memory (host memory passed
 *     where a device pointer is expected) stops with "[cpu-fenced] <entry>: <arg> is not backend
 *     memory" and a backtrace.
 * QLORA_BACKEND=cpu-fenced selects it for a whole run (trainer/run.c setup_device uses it to
 * show the trainer keeps the rules before `device: cuda` is allowed; tests/test_backend_ops.c
 * runs every entry on it). Not for speed: two mprotect calls per region per table call.
 */
#include <execinfo.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "autograd/backend.h"

typedef struct fence_region {
    unsigned char *p;
    size_t len; /* mapped bytes (a multiple of the page size) */
    size_t bytes;
} fence_region;

enum { FENCE_MAX = 4096 };
static fence_region g_reg[FENCE_MAX];
static int g_n;
static int g_open; /* nesting depth of table calls */
static const ag_backend *g_inner;
static size_t g_live, g_peak; /* bytes of data memory allocated now, and the high-water mark */

static void fence_trace(void) {
    void *bt[48];
    int n = backtrace(bt, 48);
    backtrace_symbols_fd(bt, n, 2);
}

static void fence_segv(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    const unsigned char *a = si->si_addr;
    char msg[256];
    int k = -1;
    for (int i = 0; i < g_n; i++)
        if (a >= g_reg[i].p && a < g_reg[i].p + g_reg[i].len) k = i;
    int len = k >= 0 ? snprintf(msg, sizeof msg,
                                "[cpu-fenced] host code touched backend data memory at %p (offset %zu of a "
                                "%zu-byte allocation) outside the backend table:\n",
                                (void *)a, (size_t)(a - g_reg[k].p), g_reg[k].bytes)
                     : snprintf(msg, sizeof msg, "[cpu-fenced] segmentation fault at %p (not backend memory)\n",
                                (void *)a);
    if (len > 0 && write(2, msg, (size_t)len) < 0) _exit(139);
    fence_trace();
    signal(sig, SIG_DFL);
    raise(sig);
}

static const ag_backend *inner(void) {
    if (!g_inner) {
        g_inner = ag_backend_find("cpu");
        if (!g_inner) g_inner = &ag_backend_cpu_ref;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fence_segv;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGSEGV, &sa, NULL);
    }
    return g_inner;
}

static void protect_all(int prot) {
    for (int i = 0; i < g_n; i++)
        if (mprotect(g_reg[i].p, g_reg[i].len, prot)) {
            perror("[cpu-fenced] mprotect");
            abort();
        }
}

static void fence_open(void) {
    inner();
    if (g_open++ == 0) protect_all(PROT_READ | PROT_WRITE);
}

static void fence_close(void) {
    if (--g_open == 0) protect_all(PROT_NONE);
}

/* p must be backend memory (NULL allowed where the entry allows it: `opt`). */
static void need(const char *entry, const char *arg, const void *p, int opt) {
    if (!p) {
        if (opt) return;
        fprintf(stderr, "[cpu-fenced] %s: %s is NULL\n", entry, arg);
        fence_trace();
        abort();
    }
    const unsigned char *a = p;
    for (int i = 0; i < g_n; i++)
        if (a >= g_reg[i].p && a < g_reg[i].p + g_reg[i].len) return;
    fprintf(stderr, "[cpu-fenced] %s: %s (%p) is not backend memory (a host pointer passed as data)\n", entry, arg, p);
    fence_trace();
    abort();
}

#define NEED(p) need(__func__ + 3, #p, (p), 0)
#define OPT(p) need(__func__ + 3, #p, (p), 1)

/* ------------------------------------------------------------------ memory */

static void offload_flush(uint64_t upto);

static void *fc_alloc(size_t bytes) {
    inner();
    if (g_n == FENCE_MAX) {
        fprintf(stderr, "[cpu-fenced] more than %d live allocations\n", FENCE_MAX);
        abort();
    }
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), len = ((bytes ? bytes : 1) + pg - 1) / pg * pg;
    void *p = mmap(NULL, len, g_open ? PROT_READ | PROT_WRITE : PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    g_reg[g_n++] = (fence_region){p, len, bytes};
    g_live += bytes;
    if (g_live > g_peak) g_peak = g_live;
    return p;
}

static void fc_free(void *p) {
    if (!p) return;
    offload_flush(UINT64_MAX); /* as cudaFree, which waits for the device's work */
    for (int i = 0; i < g_n; i++)
        if (g_reg[i].p == p) {
            munmap(g_reg[i].p, g_reg[i].len);
            g_live -= g_reg[i].bytes;
            g_reg[i] = g_reg[--g_n];
            return;
        }
    fprintf(stderr, "[cpu-fenced] free: %p is not a backend allocation\n", p);
    fence_trace();
    abort();
}

static void fc_copy_h2d(void *dst, const void *src, size_t bytes) {
    NEED(dst);
    fence_open();
    inner()->copy_h2d(dst, src, bytes);
    fence_close();
}

static void fc_copy_d2h(void *dst, const void *src, size_t bytes) {
    NEED(src);
    fence_open();
    inner()->copy_d2h(dst, src, bytes);
    fence_close();
}

static void fc_copy_d2d(void *dst, const void *src, size_t bytes) {
    NEED(dst);
    NEED(src);
    fence_open();
    inner()->copy_d2d(dst, src, bytes);
    fence_close();
}

static void fc_zero(void *dst, size_t bytes) {
    NEED(dst);
    fence_open();
    inner()->zero(dst, bytes);
    fence_close();
}

static void fc_fill_f32(float *dst, int64_t n, float value) {
    NEED(dst);
    fence_open();
    inner()->fill_f32(dst, n, value);
    fence_close();
}

static void fc_sync(void) {
    offload_flush(UINT64_MAX); /* every copy started before it has finished */
    inner()->sync();
}

void ag_backend_fenced_mem(size_t *live, size_t *peak, int reset) {
    if (reset) g_peak = g_live;
    if (live) *live = g_live;
    if (peak) *peak = g_peak;
}

/* ------------------------------------------------------------------ kernels */

static void fc_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const void *A, int64_t lda,
                    const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt) {
    NEED(A);
    NEED(B);
    NEED(C);
    fence_open();
    inner()->gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, dt);
    fence_close();
}

static void fc_lora_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const void *A, int64_t lda,
                         const void *B, int64_t ldb, float beta, float *C, int64_t ldc, gemm_dtype dt) {
    NEED(A);
    NEED(B);
    NEED(C);
    fence_open();
    inner()->lora_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, dt);
    fence_close();
}

static void fc_frozen_rows_f32(const frozen_weight *w, int64_t row0, int64_t n, float *dst) {
    NEED(dst);
    fence_open();
    inner()->frozen_rows_f32(w, row0, n, dst);
    fence_close();
}

static void fc_frozen_rows_bf16(const frozen_weight *w, int64_t row0, int64_t n, bf16 *dst) {
    NEED(dst);
    fence_open();
    inner()->frozen_rows_bf16(w, row0, n, dst);
    fence_close();
}

static void fc_frozen_t_bf16(const frozen_weight *w, bf16 *dst) {
    NEED(dst);
    fence_open();
    inner()->frozen_t_bf16(w, dst);
    fence_close();
}

/* A fenced copy of the weight's host array, made once per array (the host array must not change,
 * as for a device's copy). */
static const void *fc_frozen_data(const frozen_weight *w) {
    static struct {
        const void *host;
        void *copy;
    } cache[256];
    static int n;
    const void *h = inner()->frozen_data(w);
    if (!h) return NULL;
    for (int i = 0; i < n; i++)
        if (cache[i].host == h) return cache[i].copy;
    size_t bytes = (size_t)(w->out * w->in) * (w->kind == FROZEN_BF16 ? sizeof(bf16) : sizeof(float));
    void *d = fc_alloc(bytes);
    if (!d || n == 256) {
        fprintf(stderr, "[cpu-fenced] frozen_data: cannot keep a copy of %zu bytes\n", bytes);
        abort();
    }
    fc_copy_h2d(d, h, bytes);
    cache[n].host = h;
    cache[n++].copy = d;
    return d;
}

static void fc_to_bf16(const float *src, bf16 *dst, int64_t n) {
    NEED(src);
    NEED(dst);
    fence_open();
    inner()->to_bf16(src, dst, n);
    fence_close();
}

static void fc_dropout_fwd(const float *x, float *y, int64_t n, float p, uint64_t seed, uint64_t stream) {
    NEED(x);
    NEED(y);
    fence_open();
    inner()->dropout_fwd(x, y, n, p, seed, stream);
    fence_close();
}

static void fc_dropout_bwd(const float *g, float *dx, int64_t n, float p, uint64_t seed, uint64_t stream) {
    NEED(g);
    NEED(dx);
    fence_open();
    inner()->dropout_bwd(g, dx, n, p, seed, stream);
    fence_close();
}

static void fc_embedding_bwd(const float *dx, const int32_t *ids, int64_t n, int64_t D, float *dtable) {
    NEED(dx);
    NEED(dtable);
    fence_open();
    inner()->embedding_bwd(dx, ids, n, D, dtable);
    fence_close();
}

static void fc_embedding(const frozen_weight *table, const int32_t *ids, int64_t n, float *x) {
    NEED(x);
    fence_open();
    inner()->embedding(table, ids, n, x);
    fence_close();
}

static void fc_rmsnorm_fwd(const float *x, const float *w, float *y, bf16 *yb, float *rstd, int64_t N, int64_t D,
                           float eps) {
    NEED(x);
    NEED(w);
    OPT(y);
    OPT(yb);
    NEED(rstd);
    fence_open();
    inner()->rmsnorm_fwd(x, w, y, yb, rstd, N, D, eps);
    fence_close();
}

static void fc_rmsnorm_bwd(const float *x, const float *w, const float *rstd, const float *dy, float *dx, float *dw,
                           int64_t N, int64_t D) {
    NEED(x);
    NEED(w);
    NEED(rstd);
    NEED(dy);
    OPT(dx);
    OPT(dw);
    fence_open();
    inner()->rmsnorm_bwd(x, w, rstd, dy, dx, dw, N, D);
    fence_close();
}

static void fc_rope_fwd(const float *x, float *y, bf16 *yb, int64_t N, int nh, const rope_table *rt, const int32_t *pos) {
    NEED(x);
    OPT(y);
    OPT(yb);
    fence_open();
    inner()->rope_fwd(x, y, yb, N, nh, rt, pos);
    fence_close();
}

static void fc_rope_bwd(const float *dy, float *dx, int64_t N, int nh, const rope_table *rt, const int32_t *pos,
                        int write) {
    NEED(dy);
    NEED(dx);
    fence_open();
    inner()->rope_bwd(dy, dx, N, nh, rt, pos, write);
    fence_close();
}

static void attn_need(const char *entry, const ag_attn *a) {
    need(entry, "q", a->qb, 0);
    need(entry, "k", a->kb, 0);
    need(entry, "v", a->vb, 0);
    need(entry, "rmax", a->rmax, 0);
    need(entry, "rinv", a->rinv, 0);
    need(entry, "seglo", a->seglo, 0);
    need(entry, "seg_ok", a->seg_ok, 0);
}

static void fc_attention_fwd(struct ag_ctx *ctx, ag_attn *a, float *o, bf16 *ob) {
    attn_need("attention_fwd", a);
    NEED(o);
    OPT(ob);
    fence_open();
    inner()->attention_fwd(ctx, a, o, ob);
    fence_close();
}

static void fc_attention_bwd(struct ag_ctx *ctx, const ag_attn *a, const void *dob, float *dq, float *dk, float *dv,
                             int write) {
    attn_need("attention_bwd", a);
    NEED(dob);
    OPT(dq);
    OPT(dk);
    OPT(dv);
    fence_open();
    inner()->attention_bwd(ctx, a, dob, dq, dk, dv, write);
    fence_close();
}

static void fc_attention_cached(struct ag_ctx *ctx, const ag_attn_cached *a, float *out) {
    need("attention_cached", "q", a->q, 0);
    need("attention_cached", "k", a->k, 0);
    need("attention_cached", "v", a->v, 0);
    NEED(out);
    fence_open();
    inner()->attention_cached(ctx, a, out);
    fence_close();
}

static void fc_swiglu_fwd(const float *g, const float *u, float *y, bf16 *yb, bf16 *gb, bf16 *ub, int64_t n) {
    NEED(g);
    NEED(u);
    OPT(y);
    OPT(yb);
    OPT(gb);
    OPT(ub);
    fence_open();
    inner()->swiglu_fwd(g, u, y, yb, gb, ub, n);
    fence_close();
}

static void fc_swiglu_bwd(const void *g, const void *u, int isb, const float *dy, float *dg, float *du, int64_t n,
                         int write) {
    NEED(g);
    NEED(u);
    NEED(dy);
    OPT(dg);
    OPT(du);
    fence_open();
    inner()->swiglu_bwd(g, u, isb, dy, dg, du, n, write);
    fence_close();
}

static void fc_geglu_fwd(const float *g, const float *u, float *y, bf16 *yb, bf16 *gb, bf16 *ub, int64_t n) {
    NEED(g);
    NEED(u);
    OPT(y);
    OPT(yb);
    OPT(gb);
    OPT(ub);
    fence_open();
    inner()->geglu_fwd(g, u, y, yb, gb, ub, n);
    fence_close();
}

static void fc_geglu_bwd(const void *g, const void *u, int isb, const float *dy, float *dg, float *du, int64_t n,
                         int write) {
    NEED(g);
    NEED(u);
    NEED(dy);
    OPT(dg);
    OPT(du);
    fence_open();
    inner()->geglu_bwd(g, u, isb, dy, dg, du, n, write);
    fence_close();
}

static void fc_add(const float *a, const float *b, float *y, int64_t n) {
    NEED(a);
    NEED(b);
    NEED(y);
    fence_open();
    inner()->add(a, b, y, n);
    fence_close();
}

static void fc_add_bwd(const float *dy, float *da, float *db, int64_t n) {
    NEED(dy);
    OPT(da);
    OPT(db);
    fence_open();
    inner()->add_bwd(dy, da, db, n);
    fence_close();
}

static void fc_axpy(float *y, float alpha, const float *x, int64_t n) {
    NEED(y);
    NEED(x);
    fence_open();
    inner()->axpy(y, alpha, x, n);
    fence_close();
}

static void fc_copy_cols(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols,
                         int accumulate) {
    NEED(dst);
    NEED(src);
    fence_open();
    inner()->copy_cols(dst, ldd, src, lds, rows, cols, accumulate);
    fence_close();
}

static double fc_lm_head_ce(struct ag_ctx *ctx, const ag_ce_args *a, int64_t *count) {
    need("lm_head_ce", "h", a->h, 0);
    need("lm_head_ce", "w", a->w, a->w_shards != NULL); /* a sharded head is gathered into its owner's scratch */
    need("lm_head_ce", "dh", a->dh, 1);
    if (a->dw) need("lm_head_ce", "dw", a->dw, 0);
    fence_open();
    double r = inner()->lm_head_ce(ctx, a, count);
    fence_close();
    return r;
}

static void fc_adamw_update(float *p, const float *g, float *m, float *v, int64_t n, const uint8_t *mask,
                            const ag_adamw_coef *c) {
    NEED(p);
    NEED(g);
    NEED(m);
    NEED(v);
    fence_open();
    inner()->adamw_update(p, g, m, v, n, mask, c);
    fence_close();
}

static int64_t fc_sophia_update(float *p, const float *g, float *m, const float *h, int64_t n, const uint8_t *mask,
                                const ag_sophia_coef *c) {
    NEED(p);
    NEED(g);
    NEED(m);
    NEED(h);
    fence_open();
    int64_t r = inner()->sophia_update(p, g, m, h, n, mask, c);
    fence_close();
    return r;
}

static void fc_adamw8bit_update(float *p, const float *g, uint8_t *q1, uint8_t *q2, float *absmax1, float *absmax2,
                                const float *qmap1, const float *qmap2, const uint8_t *lut1, const uint8_t *lut2,
                                int64_t n, int blocksize, const ag_adamw8bit_coef *c) {
    NEED(p);
    NEED(g);
    NEED(q1);
    NEED(q2);
    NEED(absmax1);
    NEED(absmax2);
    NEED(qmap1);
    NEED(qmap2);
    NEED(lut1);
    NEED(lut2);
    fence_open();
    inner()->adamw8bit_update(p, g, q1, q2, absmax1, absmax2, qmap1, qmap2, lut1, lut2, n, blocksize, c);
    fence_close();
}

static void fc_adamw_bnb32_update(float *p, const float *g, float *m, float *v, int64_t n, const ag_adamw8bit_coef *c) {
    NEED(p);
    NEED(g);
    NEED(m);
    NEED(v);
    fence_open();
    inner()->adamw_bnb32_update(p, g, m, v, n, c);
    fence_close();
}

static void fc_sophia_hessian(float *h, const float *ghat, int64_t n, float b2, float omb2) {
    NEED(h);
    NEED(ghat);
    fence_open();
    inner()->sophia_hessian(h, ghat, n, b2, omb2);
    fence_close();
}

static double fc_sum_squares(const float *x, int64_t n) {
    NEED(x);
    fence_open();
    double r = inner()->sum_squares(x, n);
    fence_close();
    return r;
}

static void fc_scale(float *x, int64_t n, float s) {
    NEED(x);
    fence_open();
    inner()->scale(x, n, s);
    fence_close();
}

static int64_t fc_count_nonfinite(const float *x, int64_t n) {
    NEED(x);
    fence_open();
    int64_t r = inner()->count_nonfinite(x, n);
    fence_close();
    return r;
}

static void fc_round_f16(const float *src, float *dst, int64_t n) {
    NEED(src);
    NEED(dst);
    fence_open();
    inner()->round_f16(src, dst, n);
    fence_close();
}

/* ------------------------------------------------------------------ host offload
 *
 * A device's copy stream may run a started copy at any moment until its wait; the fence runs it at
 * the latest one (offload_wait, sync, host_free), in start order, as a single copy stream would. A
 * caller that writes a d2h source or reads an h2d destination before the wait therefore sees other
 * data (the h2d destination holds NaN until then), and a run that is bit-identical to one without
 * offload shows it waits where it has to. The host side must come from host_alloc (pinned memory on
 * a device: a pageable buffer would make the copy synchronous there). */

enum { FENCE_HOST_MAX = 4096, FENCE_COPIES_MAX = 4096 };
typedef struct fence_host {
    void *p;
    size_t bytes;
} fence_host;
static fence_host g_host[FENCE_HOST_MAX];
static int g_n_host;
typedef struct fence_copy {
    void *dst;
    const void *src;
    size_t bytes;
    int to_host;
    uint64_t ticket;
} fence_copy;
static fence_copy g_copy[FENCE_COPIES_MAX];
static int g_n_copy;
static uint64_t g_ticket;

static void *fc_host_alloc(size_t bytes) {
    if (g_n_host == FENCE_HOST_MAX) {
        fprintf(stderr, "[cpu-fenced] more than %d live host_alloc buffers\n", FENCE_HOST_MAX);
        abort();
    }
    void *p = aligned_alloc(64, bytes ? (bytes + 63) & ~(size_t)63 : 64);
    if (p) g_host[g_n_host++] = (fence_host){p, bytes};
    return p;
}

/* [p, p + bytes) lies in one host_alloc buffer. */
static int is_host_alloc(const void *p, size_t bytes) {
    const unsigned char *a = p;
    for (int i = 0; i < g_n_host; i++) {
        const unsigned char *b = g_host[i].p;
        if (a >= b && a + bytes <= b + g_host[i].bytes) return 1;
    }
    return 0;
}

static void offload_flush(uint64_t upto) {
    int k = 0;
    while (k < g_n_copy && g_copy[k].ticket <= upto) k++;
    if (!k) return;
    fence_open();
    for (int i = 0; i < k; i++) memcpy(g_copy[i].dst, g_copy[i].src, g_copy[i].bytes);
    fence_close();
    memmove(g_copy, g_copy + k, (size_t)(g_n_copy - k) * sizeof g_copy[0]);
    g_n_copy -= k;
}

static void fc_host_free(void *p) {
    if (!p) return;
    offload_flush(UINT64_MAX);
    for (int i = 0; i < g_n_host; i++)
        if (g_host[i].p == p) {
            free(p);
            g_host[i] = g_host[--g_n_host];
            return;
        }
    fprintf(stderr, "[cpu-fenced] host_free: %p is not a host_alloc buffer\n", p);
    fence_trace();
    abort();
}

static uint64_t fc_offload_start(void *dst, const void *src, size_t bytes, int to_host) {
    const void *dev = to_host ? src : dst, *host = to_host ? dst : src;
    need("offload_start", to_host ? "src" : "dst", dev, 0);
    if (!is_host_alloc(host, bytes)) {
        fprintf(stderr, "[cpu-fenced] offload_start: %s (%p, %zu bytes) is not host_alloc memory\n",
                to_host ? "dst" : "src", host, bytes);
        fence_trace();
        abort();
    }
    if (g_n_copy == FENCE_COPIES_MAX) offload_flush(g_copy[0].ticket);
    if (!to_host) { /* the destination is garbage until the wait */
        fence_open();
        memset(dst, 0xff, bytes); /* all-ones: NaN in fp32 and bf16 */
        fence_close();
    }
    g_copy[g_n_copy++] = (fence_copy){dst, src, bytes, to_host, ++g_ticket};
    return g_ticket;
}

static void fc_offload_wait(uint64_t ticket) { offload_flush(ticket); }

const ag_backend ag_backend_cpu_fenced = {
    .name = "cpu-fenced",
    .host_data = 0,
    .alloc = fc_alloc,
    .free = fc_free,
    .copy_h2d = fc_copy_h2d,
    .copy_d2h = fc_copy_d2h,
    .copy_d2d = fc_copy_d2d,
    .zero = fc_zero,
    .fill_f32 = fc_fill_f32,
    .sync = fc_sync,
    .gemm = fc_gemm,
    .lora_gemm = fc_lora_gemm,
    .frozen_rows_f32 = fc_frozen_rows_f32,
    .frozen_rows_bf16 = fc_frozen_rows_bf16,
    .frozen_t_bf16 = fc_frozen_t_bf16,
    .frozen_data = fc_frozen_data,
    .to_bf16 = fc_to_bf16,
    .dropout_fwd = fc_dropout_fwd,
    .dropout_bwd = fc_dropout_bwd,
    .embedding = fc_embedding,
    .rmsnorm_fwd = fc_rmsnorm_fwd,
    .rmsnorm_bwd = fc_rmsnorm_bwd,
    .rope_fwd = fc_rope_fwd,
    .rope_bwd = fc_rope_bwd,
    .attention_fwd = fc_attention_fwd,
    .attention_bwd = fc_attention_bwd,
    .attention_cached = fc_attention_cached,
    .swiglu_fwd = fc_swiglu_fwd,
    .swiglu_bwd = fc_swiglu_bwd,
    .geglu_fwd = fc_geglu_fwd,
    .geglu_bwd = fc_geglu_bwd,
    .add = fc_add,
    .add_bwd = fc_add_bwd,
    .axpy = fc_axpy,
    .copy_cols = fc_copy_cols,
    .lm_head_ce = fc_lm_head_ce,
    .adamw_update = fc_adamw_update,
    .sophia_update = fc_sophia_update,
    .adamw8bit_update = fc_adamw8bit_update,
    .adamw_bnb32_update = fc_adamw_bnb32_update,
    .sophia_hessian = fc_sophia_hessian,
    .sum_squares = fc_sum_squares,
    .scale = fc_scale,
    .count_nonfinite = fc_count_nonfinite,
    .embedding_bwd = fc_embedding_bwd,
    .host_alloc = fc_host_alloc,
    .host_free = fc_host_free,
    .offload_start = fc_offload_start,
    .offload_wait = fc_offload_wait,
    .round_f16 = fc_round_f16,
};
