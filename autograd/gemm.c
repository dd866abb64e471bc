/* autograd/gemm.c — oneDNN (v2.x C API) matmul behind a BLAS-like call.
 *
 * oneDNN runs bf16 matmul on AVX512_BF16 CPUs at about twice its fp32 rate
 * (DESIGN.md). Results are deterministic for a fixed thread count.
 */
#include "autograd/gemm.h"

#include <oneapi/dnnl/dnnl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct gemm_key {
    int64_t M, N, K, sa0, sa1, sb0, sb1, ldc;
    float alpha, beta;
    int dt;
} gemm_key;

typedef struct gemm_entry {
    gemm_key key;
    dnnl_primitive_t prim;
    dnnl_memory_t mA, mB, mC;
} gemm_entry;

static dnnl_engine_t g_engine;
static dnnl_stream_t g_stream;
static gemm_entry *g_cache;
static int g_n, g_cap;

#define DNNL_CHECK(call)                                                                   \
    do {                                                                                   \
        dnnl_status_t s_ = (call);                                                         \
        if (s_ != dnnl_success) {                                                          \
            fprintf(stderr, "[gemm] oneDNN call failed (%d) at %s:%d: %s\n", (int)s_,      \
                    __FILE__, __LINE__, #call);                                            \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

static void gemm_init_engine(void) {
    if (g_engine) return;
    DNNL_CHECK(dnnl_engine_create(&g_engine, dnnl_cpu, 0));
    DNNL_CHECK(dnnl_stream_create(&g_stream, g_engine, dnnl_stream_default_flags));
}

static gemm_entry *gemm_lookup(const gemm_key *k) {
    for (int i = 0; i < g_n; i++)
        if (memcmp(&g_cache[i].key, k, sizeof *k) == 0) return &g_cache[i];
    return NULL;
}

static gemm_entry *gemm_create(const gemm_key *k) {
    gemm_init_engine();
    dnnl_data_type_t ab = k->dt == GEMM_BF16 ? dnnl_bf16 : dnnl_f32;
    dnnl_memory_desc_t da, db, dc;
    dnnl_dims_t dims_a = {k->M, k->K}, str_a = {k->sa0, k->sa1};
    dnnl_dims_t dims_b = {k->K, k->N}, str_b = {k->sb0, k->sb1};
    dnnl_dims_t dims_c = {k->M, k->N}, str_c = {k->ldc, 1};
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(&da, 2, dims_a, ab, str_a));
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(&db, 2, dims_b, ab, str_b));
    DNNL_CHECK(dnnl_memory_desc_init_by_strides(&dc, 2, dims_c, dnnl_f32, str_c));
    dnnl_matmul_desc_t md;
    DNNL_CHECK(dnnl_matmul_desc_init(&md, &da, &db, NULL, &dc));

    dnnl_primitive_attr_t attr;
    DNNL_CHECK(dnnl_primitive_attr_create(&attr));
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

    if (g_n == g_cap) {
        g_cap = g_cap ? 2 * g_cap : 64;
        g_cache = realloc(g_cache, (size_t)g_cap * sizeof *g_cache);
        if (!g_cache) { fprintf(stderr, "[gemm] out of memory\n"); abort(); }
    }
    gemm_entry *en = &g_cache[g_n++];
    en->key = *k;
    DNNL_CHECK(dnnl_primitive_create(&en->prim, pd));
    DNNL_CHECK(dnnl_memory_create(&en->mA, &da, g_engine, DNNL_MEMORY_NONE));
    DNNL_CHECK(dnnl_memory_create(&en->mB, &db, g_engine, DNNL_MEMORY_NONE));
    DNNL_CHECK(dnnl_memory_create(&en->mC, &dc, g_engine, DNNL_MEMORY_NONE));
    dnnl_primitive_desc_destroy(pd);
    return en;
}

void gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void *A, int64_t lda, const void *B, int64_t ldb, float beta,
          float *C, int64_t ldc, gemm_dtype dt) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) C[i * ldc + j] = beta == 0.0f ? 0.0f : C[i * ldc + j];
        return;
    }
    gemm_key k;
    memset(&k, 0, sizeof k);
    k.M = M; k.N = N; k.K = K;
    k.sa0 = trans_a ? 1 : lda;  k.sa1 = trans_a ? lda : 1;
    k.sb0 = trans_b ? 1 : ldb;  k.sb1 = trans_b ? ldb : 1;
    k.ldc = ldc; k.alpha = alpha; k.beta = beta; k.dt = dt;
    gemm_entry *en = gemm_lookup(&k);
    if (!en) en = gemm_create(&k);
    DNNL_CHECK(dnnl_memory_set_data_handle(en->mA, (void *)A));
    DNNL_CHECK(dnnl_memory_set_data_handle(en->mB, (void *)B));
    DNNL_CHECK(dnnl_memory_set_data_handle(en->mC, C));
    dnnl_exec_arg_t args[3] = {
        {DNNL_ARG_SRC, en->mA}, {DNNL_ARG_WEIGHTS, en->mB}, {DNNL_ARG_DST, en->mC}};
    DNNL_CHECK(dnnl_primitive_execute(en->prim, g_stream, 3, args));
    DNNL_CHECK(dnnl_stream_wait(g_stream));
}

void gemm_shutdown(void) {
    for (int i = 0; i < g_n; i++) {
        dnnl_primitive_destroy(g_cache[i].prim);
        dnnl_memory_destroy(g_cache[i].mA);
        dnnl_memory_destroy(g_cache[i].mB);
        dnnl_memory_destroy(g_cache[i].mC);
    }
    free(g_cache);
    g_cache = NULL;
    g_n = g_cap = 0;
    if (g_stream) dnnl_stream_destroy(g_stream);
    if (g_engine) dnnl_engine_destroy(g_engine);
    g_stream = NULL;
    g_engine = NULL;
}
