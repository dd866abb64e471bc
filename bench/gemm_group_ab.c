/* bench/gemm_group_ab.c — `build/gemm_group_ab`: within-process A/B of grouped GEMMs.
 *
 * For the linears of a block that read the same input (q/k/v, gate/up), runs the products the
 * separate path makes (A: one oneDNN call per linear) and the grouped path's (B: one call over the
 * stacked weights / LoRA A matrices / output gradients), alternately (which runs first alternating
 * too), `reps` times, and prints per
 * product class the median process CPU time (CLOCK_PROCESS_CPUTIME_ID, all threads) of A and B.
 * CPU time is the figure to read on a loaded machine (wall time moves with the other load).
 *
 *   build/gemm_group_ab [N d_model q_out kv_out d_ff r reps]
 *       default: 2048 576 576 192 1536 16 15 (SmolLM2-135M at seq 512 x 4, r 16)
 *
 * Not a test: prints numbers, exits 0 (1 on bad arguments). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "autograd/gemm.h"
#include "core/bf16.h"

static double cpu_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static bf16 *rnd_bf16(int64_t n, unsigned *s) {
    bf16 *p = malloc((size_t)n * sizeof *p);
    for (int64_t i = 0; i < n; i++) {
        *s = *s * 1664525u + 1013904223u;
        p[i] = f32_to_bf16(((float)(*s >> 8) / 16777216.0f - 0.5f) * 0.1f);
    }
    return p;
}

typedef struct prod { int ta, tb; int64_t M, N, K; float beta; } prod;

/* One class: the separate calls (n_sep products) and the grouped one. */
typedef struct klass { const char *name; int n_sep; prod sep[3]; prod grp; } klass;

static void run_prod(const prod *p, const bf16 *A, const bf16 *B, float *C) {
    int64_t lda = p->ta ? p->M : p->K, ldb = p->tb ? p->K : p->N;
    gemm(p->ta, p->tb, p->M, p->N, p->K, 1.0f, A, lda, B, ldb, p->beta, C, p->N, GEMM_BF16);
}

int main(int argc, char **argv) {
    int64_t N = 2048, D = 576, QO = 576, KVO = 192, F = 1536, r = 16;
    int reps = 15;
    if (argc == 8) {
        N = atoll(argv[1]), D = atoll(argv[2]), QO = atoll(argv[3]), KVO = atoll(argv[4]), F = atoll(argv[5]);
        r = atoll(argv[6]), reps = atoi(argv[7]);
    } else if (argc != 1) {
        fprintf(stderr, "usage: %s [N d_model q_out kv_out d_ff r reps]\n", argv[0]);
        return 1;
    }
    if (N < 1 || D < 1 || QO < 1 || KVO < 1 || F < 1 || r < 1 || reps < 1) {
        fprintf(stderr, "%s: every argument must be positive\n", argv[0]);
        return 1;
    }
    const int64_t QKV = QO + 2 * KVO;
    klass ks[] = {
        {"qkv base fwd  y=xW^T", 3, {{0, 1, N, QO, D, 0}, {0, 1, N, KVO, D, 0}, {0, 1, N, KVO, D, 0}}, {0, 1, N, QKV, D, 0}},
        {"qkv base bwd  dx+=dyW", 3, {{0, 0, N, D, QO, 1}, {0, 0, N, D, KVO, 1}, {0, 0, N, D, KVO, 1}}, {0, 0, N, D, QKV, 1}},
        {"qkv loraA fwd u=xA^T", 3, {{0, 1, N, r, D, 0}, {0, 1, N, r, D, 0}, {0, 1, N, r, D, 0}}, {0, 1, N, 3 * r, D, 0}},
        {"qkv loraA dA+=du^Tx", 3, {{1, 0, r, D, N, 1}, {1, 0, r, D, N, 1}, {1, 0, r, D, N, 1}}, {1, 0, 3 * r, D, N, 1}},
        {"qkv loraA dx+=duA", 3, {{0, 0, N, D, r, 1}, {0, 0, N, D, r, 1}, {0, 0, N, D, r, 1}}, {0, 0, N, D, 3 * r, 1}},
        {"gu base fwd   y=xW^T", 2, {{0, 1, N, F, D, 0}, {0, 1, N, F, D, 0}}, {0, 1, N, 2 * F, D, 0}},
        {"gu base bwd   dx+=dyW", 2, {{0, 0, N, D, F, 1}, {0, 0, N, D, F, 1}}, {0, 0, N, D, 2 * F, 1}},
        {"gu loraA fwd  u=xA^T", 2, {{0, 1, N, r, D, 0}, {0, 1, N, r, D, 0}}, {0, 1, N, 2 * r, D, 0}},
        {"gu loraA dA+=du^Tx", 2, {{1, 0, r, D, N, 1}, {1, 0, r, D, N, 1}}, {1, 0, 2 * r, D, N, 1}},
        {"gu loraA dx+=duA", 2, {{0, 0, N, D, r, 1}, {0, 0, N, D, r, 1}}, {0, 0, N, D, 2 * r, 1}},
    };
    const int nk = (int)(sizeof ks / sizeof ks[0]);
    int64_t big = N * (2 * F > QKV ? 2 * F : QKV);
    if (N * D > big) big = N * D;
    unsigned seed = 12345;
    bf16 *A = rnd_bf16(big, &seed), *B = rnd_bf16(big, &seed);
    float *C = calloc((size_t)big, sizeof(float));
    double *ta = malloc((size_t)reps * sizeof(double)), *tb = malloc((size_t)reps * sizeof(double));
    double sum_a = 0, sum_b = 0;
    printf("%-22s %10s %10s %7s   (median CPU ms per class, %d reps, N=%lld)\n", "class", "separate", "grouped",
           "ratio", reps, (long long)N);
    for (int c = 0; c < nk; c++) {
        const klass *k = &ks[c];
        for (int i = 0; i < k->n_sep; i++) run_prod(&k->sep[i], A, B, C); /* warm: create the primitives */
        run_prod(&k->grp, A, B, C);
        for (int rep = 0; rep < reps; rep++) {
            for (int o = 0; o < 2; o++) { /* the order alternates with rep: no first-call bias */
                const int grouped = (o + rep) % 2;
                double t0 = cpu_sec();
                if (grouped) run_prod(&k->grp, A, B, C);
                else
                    for (int i = 0; i < k->n_sep; i++) run_prod(&k->sep[i], A, B, C);
                (grouped ? tb : ta)[rep] = cpu_sec() - t0;
            }
        }
        qsort(ta, (size_t)reps, sizeof(double), cmp_d);
        qsort(tb, (size_t)reps, sizeof(double), cmp_d);
        double ma = ta[reps / 2] * 1e3, mb = tb[reps / 2] * 1e3;
        sum_a += ma;
        sum_b += mb;
        printf("%-22s %10.3f %10.3f %7.3f\n", k->name, ma, mb, ma / mb);
    }
    printf("%-22s %10.3f %10.3f %7.3f\n", "all (one layer)", sum_a, sum_b, sum_a / sum_b);
    gemm_shutdown();
    free(A), free(B), free(C), free(ta), free(tb);
    return 0;
}
