/* bench/attn_ab.c — `build/attn_ab`: within-process A/B of the CPU attention kernels.
 *
 * A (old): the GEMM-call attention (autograd/backend_cpu_nn.inc built with ATT_GEMM_ONLY, as it
 * was before the register-tiled path: per (batch, head) 128-row blocks through oneDNN). B (new):
 * the `cpu` backend as built (the AVX512_BF16 register-tiled kernels where the compiler has them).
 * Both run forward + backward on the same bf16 inputs, alternately, `reps` times; printed are the
 * median and minimum of the process CPU time (CLOCK_PROCESS_CPUTIME_ID, all threads) and of the
 * wall time per call, the largest relative difference of o, dq, dk, dv between A and B, and a hash of
 * B's outputs (two builds with equal hashes computed bit-identical results).
 * CPU time is the figure to read on a loaded machine (wall time moves with the other load).
 *
 *   build/attn_ab [B T H KVH hd reps]     default: 4 512 9 3 64 15 (SmolLM2-135M at seq 512 x 4)
 *
 * Not a test: prints numbers, exits 0 (1 on bad arguments). */
#define CPU_VECTOR 1
#define CPU_GEMM gemm
#define CPU_NF4_ROWS_F32 nf4_dequantize_rows_f32
#define CPU_NF4_ROWS_BF16 nf4_dequantize_rows_bf16
#define CPU_INT8_ROWS_F32 int8_dequantize_rows_f32
#define CPU_INT8_ROWS_BF16 int8_dequantize_rows_bf16
#define CPU_TABLE attn_ab_gemm_backend
#define CPU_NAME "cpu-attention-gemm"
#define ATT_GEMM_ONLY 1
#include "autograd/backend_cpu_kernels.inc"

#include <time.h>

#include "autograd/gemm.h"
#include "core/clock.h"
#include "quant/int8.h"
#include "quant/nf4.h"

static double cpu_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct run {
    float *o, *dq, *dk, *dv, *rmax, *rinv;
    bf16 *ob;
    int32_t *seglo;
    unsigned char *seg_ok;
} run;

static double max_rel(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        num = d > num ? d : num;
        den = fabs((double)b[i]) > den ? fabs((double)b[i]) : den;
    }
    return den > 0 ? num / den : num;
}

int main(int argc, char **argv) {
    int B = 4, T = 512, H = 9, KVH = 3, hd = 64, reps = 15;
    if (argc == 7) {
        B = atoi(argv[1]), T = atoi(argv[2]), H = atoi(argv[3]), KVH = atoi(argv[4]), hd = atoi(argv[5]);
        reps = atoi(argv[6]);
    } else if (argc != 1) {
        fprintf(stderr, "usage: attn_ab [B T H KVH hd reps]\n");
        return 1;
    }
    if (B < 1 || T < 1 || H < 1 || KVH < 1 || H % KVH || hd < 2 || hd % 2 || reps < 1) {
        fprintf(stderr, "attn_ab: need B, T, H, KVH, hd, reps >= 1, H a multiple of KVH, hd even\n");
        return 1;
    }
    const int64_t nq = (int64_t)B * T * H * hd, nk = (int64_t)B * T * KVH * hd, nst = (int64_t)B * H * T;
    bf16 *q = malloc((size_t)nq * 2), *k = malloc((size_t)nk * 2), *v = malloc((size_t)nk * 2), *dob = malloc((size_t)nq * 2);
    for (int64_t i = 0; i < nq; i++) {
        q[i] = f32_to_bf16(2.0f * (float)(rng_uniform(1, 1, (uint64_t)i) - 0.5));
        dob[i] = f32_to_bf16((float)(rng_uniform(1, 4, (uint64_t)i) - 0.5));
    }
    for (int64_t i = 0; i < nk; i++) {
        k[i] = f32_to_bf16(2.0f * (float)(rng_uniform(1, 2, (uint64_t)i) - 0.5));
        v[i] = f32_to_bf16((float)(rng_uniform(1, 3, (uint64_t)i) - 0.5));
    }
    const ag_backend *be[2] = {&attn_ab_gemm_backend, &ag_backend_cpu};
    run r[2];
    ag_ctx ctx;
    qerr e = {0};
    if (ag_ctx_init_backend(&ctx, &ag_backend_cpu, 64u << 20, &e)) {
        fprintf(stderr, "attn_ab: %s\n", e.msg);
        return 1;
    }
    for (int x = 0; x < 2; x++) {
        r[x].o = malloc((size_t)nq * 4), r[x].dq = malloc((size_t)nq * 4);
        r[x].dk = malloc((size_t)nk * 4), r[x].dv = malloc((size_t)nk * 4);
        r[x].rmax = malloc((size_t)nst * 4), r[x].rinv = malloc((size_t)nst * 4);
        r[x].ob = malloc((size_t)nq * 2);
        r[x].seglo = malloc((size_t)B * T * 4);
        r[x].seg_ok = malloc((size_t)B);
    }
    double *cs[2], *ws[2];
    for (int x = 0; x < 2; x++) {
        cs[x] = malloc(sizeof(double) * (size_t)reps);
        ws[x] = malloc(sizeof(double) * (size_t)reps);
    }
    for (int it = -1; it < reps; it++) /* it = -1: warm-up, not counted */
        for (int x = 0; x < 2; x++) {
            ag_attn a = {.qb = q, .kb = k, .vb = v, .rmax = r[x].rmax, .rinv = r[x].rinv, .seq_ids = NULL,
                         .seglo = r[x].seglo, .seg_ok = r[x].seg_ok, .B = B, .T = T, .H = H, .KVH = KVH,
                         .hd = hd, .bf16 = 1};
            memset(r[x].dq, 0, (size_t)nq * 4);
            memset(r[x].dk, 0, (size_t)nk * 4);
            memset(r[x].dv, 0, (size_t)nk * 4);
            double c0 = cpu_sec(), w0 = clock_now_sec();
            be[x]->attention_fwd(&ctx, &a, r[x].o, r[x].ob);
            be[x]->attention_bwd(&ctx, &a, dob, r[x].dq, r[x].dk, r[x].dv, 0);
            if (it >= 0) {
                cs[x][it] = cpu_sec() - c0;
                ws[x][it] = clock_now_sec() - w0;
            }
        }
    double flops = 0; /* causal: 7 GEMMs of T²/2·hd multiply-adds per head (fwd 2, bwd 5) */
    flops = 7.0 * 2.0 * (double)B * H * ((double)T * (T + 1) / 2.0) * hd;
    printf("attention fwd+bwd B=%d T=%d H=%d KVH=%d hd=%d bf16, %d reps alternating, %d threads\n", B, T, H, KVH,
           hd, reps, omp_get_max_threads());
    double med[2];
    for (int x = 0; x < 2; x++) {
        qsort(cs[x], (size_t)reps, sizeof(double), cmp_d);
        qsort(ws[x], (size_t)reps, sizeof(double), cmp_d);
        med[x] = cs[x][reps / 2];
        printf("  %-22s cpu s/call median %.4f min %.4f | wall median %.4f min %.4f | %.1f GFLOP/cpu-s\n",
               x ? "new (cpu backend)" : "old (GEMM calls)", cs[x][reps / 2], cs[x][0], ws[x][reps / 2], ws[x][0],
               flops / cs[x][reps / 2] * 1e-9);
    }
    printf("  speedup (cpu time, median): %.2fx\n", med[0] / med[1]);
    printf("  max |new-old|/max|old|: o %.2e dq %.2e dk %.2e dv %.2e rinv %.2e\n", max_rel(r[1].o, r[0].o, nq),
           max_rel(r[1].dq, r[0].dq, nq), max_rel(r[1].dk, r[0].dk, nk), max_rel(r[1].dv, r[0].dv, nk),
           max_rel(r[1].rinv, r[0].rinv, nst));
    /* the new kernel's outputs as one hash: equal hashes from two builds = bit-identical results */
    uint64_t hsh = 1469598103934665603ull;
    const void *outs[5] = {r[1].o, r[1].dq, r[1].dk, r[1].dv, r[1].rinv};
    const int64_t nb[5] = {nq * 4, nq * 4, nk * 4, nk * 4, nst * 4};
    for (int x = 0; x < 5; x++)
        for (int64_t i = 0; i < nb[x]; i++) hsh = (hsh ^ ((const unsigned char *)outs[x])[i]) * 1099511628211ull;
    printf("  new kernel's o, dq, dk, dv, rinv hash (FNV-1a): %016llx\n", (unsigned long long)hsh);
    ag_ctx_free(&ctx);
    return 0;
}
