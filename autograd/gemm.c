/* autograd/gemm.c — oneDNN (v2.x C API) matmul behind a BLAS-like call.
 *
 * oneDNN runs bf16 matmul on AVX512_BF16 CPUs at about twice its fp32 rate
 * (docs/design.md "Decisions"). Results are deterministic for a fixed thread count.
 *
 * gemm() may also be called from inside an OpenMP parallel region (attention
 * runs one small GEMM per thread): oneDNN then runs the primitive on the
 * calling thread only, with that thread's stream and memory objects.
 */
#include "autograd/gemm.h"

#include "autograd/prof.h"
#include "core/clock.h"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct gemm_key {
    int64_t M, N, K, sa0, sa1, sb0, sb1, ldc;
    float alpha, beta;
    int dt;
} gemm_key;

/* One cached primitive. Memory objects are per calling thread so that gemm()
 * can run concurrently from inside an OpenMP region (each thread then executes
 * the primitive single-threaded: oneDNN does not nest parallelism). */
enum { GEMM_MAX_THREADS = 256, GEMM_HASH = 4096 };

typedef struct gemm_entry {
    gemm_key key;
    dnnl_primitive_t prim;
    dnnl_memory_desc_t da, db, dc, dsp;
    size_t sp_bytes; /* the primitive's scratchpad (user mode), 0 when it needs none */
    dnnl_memory_t mA[GEMM_MAX_THREADS], mB[GEMM_MAX_THREADS], mC[GEMM_MAX_THREADS], mS[GEMM_MAX_THREADS];
    int64_t calls;  /* calls from outside a parallel region since the last gemm_shape_stats_reset */
    double seconds; /* their wall time (the host's clock around execute + wait) */
} gemm_entry;

/* Products with K at most this and B transposed go through a plain copy of B. */
enum { GEMM_SHORT_K = 64 };

static dnnl_engine_t g_engine;
typedef struct gemm_buf { void *p; size_t n; } gemm_buf;
static gemm_buf g_scratch_a[GEMM_MAX_THREADS], g_scratch_b[GEMM_MAX_THREADS], g_scratch_sp[GEMM_MAX_THREADS];

/* A per-thread packing buffer, grown to at least n bytes (aborts on OOM). */
static void *gemm_scratch(gemm_buf *b, size_t n) {
    if (b->n < n) {
        free(b->p);
        b->p = aligned_alloc(64, (n + 63) / 64 * 64);
        if (!b->p) { fprintf(stderr, "[gemm] out of memory (%zu bytes)\n", n); abort(); }
        b->n = n;
    }
    return b->p;
}
static dnnl_stream_t g_stream[GEMM_MAX_THREADS];
static gemm_entry *g_table[GEMM_HASH]; /* open addressing on the key hash */
static int g_n;

#define DNNL_CHECK(call)                                                                   \
    do {                                                                                   \
        dnnl_status_t s_ = (call);                                                         \
        if (s_ != dnnl_success) {                                                          \
            fprintf(stderr, "[gemm] oneDNN call failed (%d) at %s:%d: %s\n", (int)s_,      \
                    __FILE__, __LINE__, #call);                                            \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

static uint64_t gemm_hash(const gemm_key *k) {
    const unsigned char *p = (const unsigned char *)k;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof *k; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static gemm_entry *gemm_create(const gemm_key *k) {
    if (!g_engine) DNNL_CHECK(dnnl_engine_create(&g_engine, dnnl_cpu, 0));
    gemm_entry *en = calloc(1, sizeof *en);
    if (!en) { fprintf(stderr, "[gemm] out of memory\n"); abort(); }
    en->key = *k;
    dnnl_data_type_t ab = k->dt == GEMM_BF16 ? dnnl_bf16 : dnnl_f32;
    dnnl_dims_t dims_a = {k->M, k->K}, str_a = {k->sa0, k->sa1};
    dnnl_dims_t dims_b = {k->K, k->N}, str_b = {k->sb0, k->sb1};
    dnnl_dims_t dims_c = {k->M, k->N}, str_c = {k->ldc, 1};
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(&en->da, 2, dims_a, ab, str_a));
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(&en->db, 2, dims_b, ab, str_b));
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(&en->dc, 2, dims_c, dnnl_f32, str_c));
    dnnl_matmul_desc_t md;
    DNNL_CHECK(dnnl_matmul_desc_init(&md, &en->da, &en->db, NULL, &en->dc));

    dnnl_primitive_attr_t attr;
    DNNL_CHECK(dnnl_primitive_attr_create(&attr));
    /* The scratchpad is ours, one per thread: in oneDNN's default (library) mode
     * it is one buffer for the process unless oneDNN was built for concurrent
     * execution (Debian's 2.6 is not), and two threads running brgemm primitives
     * at once (attention's per-thread GEMMs) corrupted each other's packed B. */
    DNNL_CHECK(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    if (k->alpha != 1.0f) DNNL_CHECK(dnnl_primitive_attr_set_output_scales(attr, 1, 0, &k->alpha));
    if (k->beta != 0.0f) {
        dnnl_post_ops_t po;
        DNNL_CHECK(dnnl_post_ops_create(&po));
        DNNL_CHECK(dnnl_post_ops_append_sum(po, k->beta));
        DNNL_CHECK(dnnl_primitive_attr_set_post_ops(attr, po));
        dnnl_post_ops_destroy(po);
    }
    dnnl_primitive_desc_t pd;
    DNNL_CHECK(dnnl_primitive_desc_create(&pd, &md, attr, g_engine, NULL));
    dnnl_primitive_attr_destroy(attr);
    DNNL_CHECK(dnnl_primitive_create(&en->prim, pd));
    en->dsp = *dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    en->sp_bytes = dnnl_memory_desc_get_size(&en->dsp);
    dnnl_primitive_desc_destroy(pd);
    return en;
}

/* The cache entry for k and this thread's stream and memory objects. */
static gemm_entry *gemm_get(const gemm_key *k, int tid, dnnl_stream_t *st) {
    gemm_entry *en = NULL;
#pragma omp critical(qlora_gemm_cache)
    {
        uint64_t h = gemm_hash(k);
        for (uint64_t i = 0;; i++) {
            gemm_entry **slot = &g_table[(h + i) & (GEMM_HASH - 1)];
            if (!*slot) {
                if (g_n >= GEMM_HASH / 2) {
                    fprintf(stderr, "[gemm] more than %d distinct GEMM shapes\n", GEMM_HASH / 2);
                    abort();
                }
                *slot = gemm_create(k);
                g_n++;
            }
            if (memcmp(&(*slot)->key, k, sizeof *k) == 0) {
                en = *slot;
                break;
            }
        }
        if (!en->mA[tid]) {
            DNNL_CHECK(dnnl_memory_create(&en->mA[tid], &en->da, g_engine, DNNL_MEMORY_NONE));
            DNNL_CHECK(dnnl_memory_create(&en->mB[tid], &en->db, g_engine, DNNL_MEMORY_NONE));
            DNNL_CHECK(dnnl_memory_create(&en->mC[tid], &en->dc, g_engine, DNNL_MEMORY_NONE));
            if (en->sp_bytes) DNNL_CHECK(dnnl_memory_create(&en->mS[tid], &en->dsp, g_engine, DNNL_MEMORY_NONE));
        }
        if (!g_stream[tid]) DNNL_CHECK(dnnl_stream_create(&g_stream[tid], g_engine, dnnl_stream_default_flags));
        *st = g_stream[tid];
    }
    return en;
}

/* dst (K, N) = the (N, K) matrix src (row stride ld) transposed, es bytes per element. */
static inline __attribute__((always_inline)) void gemm_transpose(char *dst, const char *src, int64_t N, int64_t K,
                                                                 int64_t ld, size_t es) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) memcpy(dst + (size_t)(k * N + n) * es, src + (size_t)(n * ld + k) * es, es);
}

void gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void *A, int64_t lda, const void *B, int64_t ldb, float beta,
          float *C, int64_t ldc, gemm_dtype dt) {
    if (M <= 0 || N <= 0) return;
    int nested = omp_in_parallel();
    int pc = nested ? 0 : ag_prof_push(AG_PROF_GEMM);
    if (!nested) ag_prof_add_gemm_flops(2.0 * (double)M * (double)N * (double)K);
    if (K <= 0) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) C[i * ldc + j] = beta == 0.0f ? 0.0f : C[i * ldc + j];
        if (!nested) ag_prof_pop(pc);
        return;
    }
    int tid = nested ? omp_get_thread_num() : 0;
    if (tid >= GEMM_MAX_THREADS) {
        fprintf(stderr, "[gemm] thread %d: at most %d threads supported\n", tid, GEMM_MAX_THREADS);
        abort();
    }
    /* A short K (a LoRA B product: y += s·u·Bᵀ, K = r) with B transposed or A
     * strided sends oneDNN 2.6 to its gemm:jit path, measured 5–6× slower on those
     * shapes than the brgemm (AMX / AVX512_BF16) path it takes with both operands
     * dense and B plain (docs/design.md "GEMM layouts"). Both operands are then
     * small (K·N and M·K elements): copy them into per-thread buffers first. The
     * sums are the same products in an implementation-defined order, as before. */
    size_t es = dt == GEMM_BF16 ? 2 : 4;
    /* a dense A: a column slice of a wider u (the grouped LoRA A products'
     * output, lda = 3r for q/k/v) */
    if (!trans_a && K <= GEMM_SHORT_K && lda != K) {
        char *ad = gemm_scratch(&g_scratch_a[tid], (size_t)(M * K) * es);
        for (int64_t i = 0; i < M; i++) memcpy(ad + (size_t)(i * K) * es, (const char *)A + (size_t)(i * lda) * es, (size_t)K * es);
        A = ad;
        lda = K;
    }
    if (trans_b && K <= GEMM_SHORT_K) {
        char *bt = gemm_scratch(&g_scratch_b[tid], (size_t)(K * N) * es);
        if (es == 2) /* a constant element size per call site: the copies compile to plain moves */
            gemm_transpose(bt, B, N, K, ldb, 2);
        else
            gemm_transpose(bt, B, N, K, ldb, 4);
        B = bt;
        ldb = N;
        trans_b = 0;
    }
    gemm_key k;
    memset(&k, 0, sizeof k);
    k.M = M; k.N = N; k.K = K;
    k.sa0 = trans_a ? 1 : lda;  k.sa1 = trans_a ? lda : 1;
    k.sb0 = trans_b ? 1 : ldb;  k.sb1 = trans_b ? ldb : 1;
    k.ldc = ldc; k.alpha = alpha; k.beta = beta; k.dt = dt;
    dnnl_stream_t st;
    gemm_entry *en = gemm_get(&k, tid, &st);
    DNNL_CHECK(dnnl_memory_set_data_handle(en->mA[tid], (void *)A));
    DNNL_CHECK(dnnl_memory_set_data_handle(en->mB[tid], (void *)B));
    DNNL_CHECK(dnnl_memory_set_data_handle(en->mC[tid], C));
    dnnl_exec_arg_t args[4] = {
        {DNNL_ARG_SRC, en->mA[tid]}, {DNNL_ARG_WEIGHTS, en->mB[tid]}, {DNNL_ARG_DST, en->mC[tid]}, {0, NULL}};
    int nargs = 3;
    if (en->sp_bytes) {
        DNNL_CHECK(dnnl_memory_set_data_handle(en->mS[tid], gemm_scratch(&g_scratch_sp[tid], en->sp_bytes)));
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, en->mS[tid]};
    }
    const double t0 = nested ? 0.0 : clock_now_sec();
    DNNL_CHECK(dnnl_primitive_execute(en->prim, st, nargs, args));
    DNNL_CHECK(dnnl_stream_wait(st));
    if (!nested) {
        en->calls++;
        en->seconds += clock_now_sec() - t0;
        ag_prof_pop(pc);
    }
}

static int gemm_stat_cmp(const void *a, const void *b) {
    const double x = ((const gemm_shape_stat *)a)->seconds, y = ((const gemm_shape_stat *)b)->seconds;
    return x < y ? 1 : x > y ? -1 : 0;
}

int gemm_shape_stats(gemm_shape_stat *out, int max) {
    int n = 0;
#pragma omp critical(qlora_gemm_cache)
    {
        for (int i = 0; i < GEMM_HASH; i++) {
            const gemm_entry *en = g_table[i];
            if (!en || !en->calls) continue;
            gemm_shape_stat st = {.M = en->key.M, .N = en->key.N, .K = en->key.K,
                                  .trans_a = en->key.sa0 == 1 && en->key.sa1 != 1,
                                  .trans_b = en->key.sb0 == 1 && en->key.sb1 != 1,
                                  .beta = en->key.beta, .calls = en->calls, .seconds = en->seconds};
            if (n < max) {
                out[n++] = st;
            } else { /* keep the max slowest: replace the fastest kept one when this one took longer */
                int lo = 0;
                for (int j = 1; j < n; j++)
                    if (out[j].seconds < out[lo].seconds) lo = j;
                if (n > 0 && st.seconds > out[lo].seconds) out[lo] = st;
            }
        }
    }
    qsort(out, (size_t)n, sizeof *out, gemm_stat_cmp);
    return n;
}

void gemm_shape_stats_reset(void) {
#pragma omp critical(qlora_gemm_cache)
    for (int i = 0; i < GEMM_HASH; i++)
        if (g_table[i]) {
            g_table[i]->calls = 0;
            g_table[i]->seconds = 0.0;
        }
}

void gemm_shutdown(void) {
    for (int i = 0; i < GEMM_HASH; i++) {
        gemm_entry *en = g_table[i];
        if (!en) continue;
        dnnl_primitive_destroy(en->prim);
        for (int t = 0; t < GEMM_MAX_THREADS; t++) {
            if (en->mA[t]) dnnl_memory_destroy(en->mA[t]);
            if (en->mB[t]) dnnl_memory_destroy(en->mB[t]);
            if (en->mC[t]) dnnl_memory_destroy(en->mC[t]);
            if (en->mS[t]) dnnl_memory_destroy(en->mS[t]);
        }
        free(en);
        g_table[i] = NULL;
    }
    g_n = 0;
    for (int t = 0; t < GEMM_MAX_THREADS; t++) {
        if (g_stream[t]) dnnl_stream_destroy(g_stream[t]);
        g_stream[t] = NULL;
    }
    for (int t = 0; t < GEMM_MAX_THREADS; t++) {
        free(g_scratch_a[t].p);
        free(g_scratch_b[t].p);
        free(g_scratch_sp[t].p);
        g_scratch_sp[t] = (gemm_buf){0};
        g_scratch_a[t] = (gemm_buf){0};
        g_scratch_b[t] = (gemm_buf){0};
    }
    if (g_engine) dnnl_engine_destroy(g_engine);
    g_engine = NULL;
}
