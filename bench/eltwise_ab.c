/* bench/eltwise_ab.c — `build/eltwise_ab`: within-process A/B of the CPU elementwise kernels (issue 15
 * item 2: the non-GEMM, non-attention time of a step).
 *
 * A (old): the kernels as they were at 785ea2c, copied here verbatim (old_*). B (new): the `cpu`
 * backend's kernels as built (autograd/backend_cpu_nn.inc, included below as in bench/attn_ab.c). Each
 * pair runs on the same inputs, alternately, `reps` times; printed are the median and minimum CPU time
 * per call (CLOCK_PROCESS_CPUTIME_ID, all threads: the figure to read on a loaded machine), the CPU
 * seconds per training step they amount to (calls per step of the SmolLM2-135M shape, checkpointing
 * off), and whether A and B wrote the same bits.
 *
 *   OMP_NUM_THREADS=1 build/eltwise_ab [N D F layers reps]   default: 2048 576 1536 30 41
 *                                                          (SmolLM2-135M at seq 512 x batch 4)
 * Cases:
 *   rmsnorm_fwd  y, its bf16 copy and rstd (2·layers + 1 calls per step): old one row's double sum of
 *                squares as one dependent chain; new 16 rows' chains in vector lanes, y and bf16 in one pass
 *   rmsnorm_bwd  dx (2·layers + 1 per step): the same for the row dot
 *   swiglu_fwd   y and the bf16 copies of y, g, u (layers per step): old a second pass over each
 *                4096-element chunk per copy; new the copies stored from registers
 *   swiglu_bwd   dg, du from bf16 g, u into gradients not yet started (layers per step): old ag_grad's zero
 *                fill of both, then dg += .., du += ..; new written at once (write 1, op_glu with ag_grad_fresh)
 *   add_bwd      a residual add's backward into two gradients not yet started (2·layers per step): old
 *                ag_grad's zero fill of both, then da += dy, db += dy; new two copies of dy
 *                (op_add's backward with ag_grad_fresh)
 *
 * Not a test: prints numbers, exits 0 (1 on bad arguments). */
#define CPU_VECTOR 1
#define CPU_GEMM gemm
#define CPU_NF4_ROWS_F32 nf4_dequantize_rows_f32
#define CPU_NF4_ROWS_BF16 nf4_dequantize_rows_bf16
#define CPU_INT8_ROWS_F32 int8_dequantize_rows_f32
#define CPU_INT8_ROWS_BF16 int8_dequantize_rows_bf16
#define CPU_TABLE eltwise_ab_backend
#define CPU_NAME "cpu-eltwise-ab"
#include "autograd/backend_cpu_kernels.inc"

#include <time.h>

#include "autograd/gemm.h"
#include "quant/int8.h"
#include "quant/nf4.h"

/* ------------------------------------------------------------------ the old kernels (785ea2c) */

static void old_rmsnorm_fwd(const float *xd, const float *wd, float *yd, bf16 *yb, float *rstd, int64_t N, int64_t D,
                            float eps) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *xi = xd + i * D;
        double ss = 0.0;
        for (int64_t j = 0; j < D; j++) ss += (double)xi[j] * xi[j];
        float r = 1.0f / sqrtf((float)(ss / (double)D) + eps);
        rstd[i] = r;
        for (int64_t j = 0; j < D; j++) yd[i * D + j] = wd[j] * (xi[j] * r);
        if (yb) row_to_bf16(yd + i * D, yb + i * D, D);
    }
}

static void old_rmsnorm_bwd(const float *xd, const float *wd, const float *rstd, const float *dy, float *dx, float *dw,
                            int64_t N, int64_t D) {
    if (dx) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            const float *xi = xd + i * D, *gi = dy + i * D;
            float r = rstd[i];
            double dot = 0.0;
            for (int64_t j = 0; j < D; j++) dot += (double)gi[j] * wd[j] * xi[j];
            float c = (float)(dot / (double)D) * r * r * r;
            float *dxi = dx + i * D;
            for (int64_t j = 0; j < D; j++) dxi[j] += r * wd[j] * gi[j] - c * xi[j];
        }
    }
    if (dw) {
        for (int64_t i = 0; i < N; i++) {
            const float *xi = xd + i * D, *gi = dy + i * D;
            float r = rstd[i];
            for (int64_t j = 0; j < D; j++) dw[j] += gi[j] * xi[j] * r;
        }
    }
}

static void old_swiglu_fwd(const float *gd, const float *ud, float *yd, bf16 *yb, bf16 *gb, bf16 *ubf, int64_t n) {
    int64_t nchunk = (n + 4095) / 4096;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunk; c++) {
        int64_t i0 = c * 4096, i1 = n - i0 < 4096 ? n : i0 + 4096, i = i0;
#ifdef OPS_AVX512
        for (; i < i1; i += 16) {
            __mmask16 k = tail_mask(i1 - i);
            __m512 gv = _mm512_maskz_loadu_ps(k, gd + i), uv = _mm512_maskz_loadu_ps(k, ud + i);
            __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_poly16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
            _mm512_mask_storeu_ps(yd + i, k, _mm512_mul_ps(_mm512_div_ps(gv, den), uv));
        }
#endif
        for (; i < i1; i++) yd[i] = gd[i] / (1.0f + exp_poly(-gd[i])) * ud[i];
        if (yb) row_to_bf16(yd + i0, yb + i0, i1 - i0);
        if (gb) row_to_bf16(gd + i0, gb + i0, i1 - i0);
        if (ubf) row_to_bf16(ud + i0, ubf + i0, i1 - i0);
    }
}

/* ------------------------------------------------------------------ harness */

static double cpu_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static float *rand_f32(int64_t n, uint64_t stream, float amp) {
    float *x = cpu_alloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) x[i] = amp * (2.0f * rng_uniform(7, stream, (uint64_t)i) - 1.0f);
    return x;
}

enum { CASE_NORM_FWD, CASE_NORM_BWD, CASE_SWIGLU_FWD, CASE_SWIGLU_BWD, CASE_ADD_BWD, N_CASES };
static const char *const case_names[N_CASES] = {"rmsnorm_fwd", "rmsnorm_bwd", "swiglu_fwd", "swiglu_bwd", "add_bwd"};

typedef struct bufs { /* one side's outputs */
    float *y, *r, *dx, *da, *db, *dg, *du;
    bf16 *yb, *gb, *ub;
} bufs;

/* One call of case c, side x (0 old, 1 new). */
static const bf16 *gbf, *ubf; /* g, u as the saved bf16 inputs of SwiGLU's backward */

static void run_case(int c, int x, bufs *o, const float *in_x, const float *w, const float *dy, const float *dx0,
                     const float *g, const float *u, int64_t N, int64_t D, int64_t F) {
    switch (c) {
    case CASE_NORM_FWD:
        (x ? cpu_rmsnorm_fwd : old_rmsnorm_fwd)(in_x, w, o->y, o->yb, o->r, N, D, 1e-5f);
        break;
    case CASE_NORM_BWD:
        memcpy(o->dx, dx0, (size_t)(N * D) * 4); /* the gradient so far (outside the timed call: see main) */
        break;
    case CASE_SWIGLU_FWD:
        (x ? cpu_swiglu_fwd : old_swiglu_fwd)(g, u, o->y, o->yb, o->gb, o->ub, N * F);
        break;
    case CASE_SWIGLU_BWD:
        if (!x) {
            cpu_zero(o->dg, (size_t)(N * F) * 4);
            cpu_zero(o->du, (size_t)(N * F) * 4);
        }
        cpu_swiglu_bwd(gbf, ubf, 1, dy, o->dg, o->du, N * F, x);
        break;
    case CASE_ADD_BWD:
        if (x) {
            cpu_copy(o->da, dy, (size_t)(N * D) * 4);
            cpu_copy(o->db, dy, (size_t)(N * D) * 4);
        } else {
            cpu_zero(o->da, (size_t)(N * D) * 4);
            cpu_zero(o->db, (size_t)(N * D) * 4);
            cpu_add_bwd(dy, o->da, o->db, N * D);
        }
        break;
    }
}

int main(int argc, char **argv) {
    int64_t N = 2048, D = 576, F = 1536;
    int layers = 30, reps = 41;
    if (argc == 6) {
        N = atoll(argv[1]), D = atoll(argv[2]), F = atoll(argv[3]), layers = atoi(argv[4]), reps = atoi(argv[5]);
    } else if (argc != 1) {
        fprintf(stderr, "usage: eltwise_ab [N D F layers reps]\n");
        return 1;
    }
    if (N < 1 || D < 1 || F < 1 || layers < 1 || reps < 1) {
        fprintf(stderr, "eltwise_ab: need N, D, F, layers, reps >= 1\n");
        return 1;
    }
    const double calls[N_CASES] = {2.0 * layers + 1, 2.0 * layers + 1, layers, layers, 2.0 * layers};
    float *in_x = rand_f32(N * D, 1, 3.0f), *w = rand_f32(D, 2, 1.0f), *dy = rand_f32(N * F, 3, 1.0f);
    float *dx0 = rand_f32(N * D, 4, 0.5f), *g = rand_f32(N * F, 5, 6.0f), *u = rand_f32(N * F, 6, 2.0f);
    bufs o[2];
    for (int x = 0; x < 2; x++) {
        o[x].y = cpu_alloc((size_t)(N * F) * 4), o[x].r = cpu_alloc((size_t)N * 4);
        o[x].dx = cpu_alloc((size_t)(N * D) * 4), o[x].da = cpu_alloc((size_t)(N * D) * 4);
        o[x].db = cpu_alloc((size_t)(N * D) * 4);
        o[x].dg = cpu_alloc((size_t)(N * F) * 4), o[x].du = cpu_alloc((size_t)(N * F) * 4);
        o[x].yb = cpu_alloc((size_t)(N * F) * 2), o[x].gb = cpu_alloc((size_t)(N * F) * 2);
        o[x].ub = cpu_alloc((size_t)(N * F) * 2);
    }
    float *rstd = cpu_alloc((size_t)N * 4);
    bf16 *gb16 = cpu_alloc((size_t)(N * F) * 2), *ub16 = cpu_alloc((size_t)(N * F) * 2);
    row_to_bf16(g, gb16, N * F);
    row_to_bf16(u, ub16, N * F);
    gbf = gb16;
    ubf = ub16;
    cpu_rmsnorm_fwd(in_x, w, o[0].y, NULL, rstd, N, D, 1e-5f);
    double *cs[2];
    for (int x = 0; x < 2; x++) cs[x] = malloc(sizeof(double) * (size_t)reps);
    printf("eltwise A/B: N %lld, D %lld, F %lld, %d layers; %d reps alternating, %d threads; CPU s per call "
           "(median, min) and per step\n",
           (long long)N, (long long)D, (long long)F, layers, reps, omp_get_max_threads());
    double step[2] = {0, 0};
    for (int c = 0; c < N_CASES; c++) {
        for (int it = -1; it < reps; it++) /* it = -1: warm-up, not counted */
            for (int x = 0; x < 2; x++) {
                double c0;
                if (c == CASE_NORM_BWD) {
                    run_case(c, x, &o[x], in_x, w, dy, dx0, g, u, N, D, F);
                    c0 = cpu_sec();
                    (x ? cpu_rmsnorm_bwd : old_rmsnorm_bwd)(in_x, w, rstd, dy, o[x].dx, NULL, N, D);
                } else {
                    c0 = cpu_sec();
                    run_case(c, x, &o[x], in_x, w, dy, dx0, g, u, N, D, F);
                }
                if (it >= 0) cs[x][it] = cpu_sec() - c0;
            }
        double med[2];
        for (int x = 0; x < 2; x++) {
            qsort(cs[x], (size_t)reps, sizeof(double), cmp_d);
            med[x] = cs[x][reps / 2];
            step[x] += med[x] * calls[c];
        }
        int same = 1;
        switch (c) {
        case CASE_NORM_FWD:
            same = !memcmp(o[0].y, o[1].y, (size_t)(N * D) * 4) && !memcmp(o[0].yb, o[1].yb, (size_t)(N * D) * 2) &&
                   !memcmp(o[0].r, o[1].r, (size_t)N * 4);
            break;
        case CASE_NORM_BWD:
            same = !memcmp(o[0].dx, o[1].dx, (size_t)(N * D) * 4);
            break;
        case CASE_SWIGLU_FWD:
            same = !memcmp(o[0].y, o[1].y, (size_t)(N * F) * 4) && !memcmp(o[0].yb, o[1].yb, (size_t)(N * F) * 2) &&
                   !memcmp(o[0].gb, o[1].gb, (size_t)(N * F) * 2) && !memcmp(o[0].ub, o[1].ub, (size_t)(N * F) * 2);
            break;
        case CASE_SWIGLU_BWD: /* 0 + v = v except a −0: compare as values */
            for (int64_t i = 0; i < N * F && same; i++) same = o[0].dg[i] == o[1].dg[i] && o[0].du[i] == o[1].du[i];
            break;
        case CASE_ADD_BWD: /* 0 + dy = dy except a −0 (kept by the copy): compare as values */
            for (int64_t i = 0; i < N * D && same; i++) same = o[0].da[i] == o[1].da[i] && o[0].db[i] == o[1].db[i];
            break;
        }
        printf("  %-12s old %.5f (min %.5f)  new %.5f (min %.5f)  %.2fx  per step %.3f -> %.3f s  %s\n",
               case_names[c], med[0], cs[0][0], med[1], cs[1][0], med[0] / med[1], med[0] * calls[c],
               med[1] * calls[c], same ? (c >= CASE_SWIGLU_BWD ? "same values" : "same bits") : "DIFFER");
    }
    printf("  total of these cases per step: old %.3f s, new %.3f s of CPU time\n", step[0], step[1]);
    return 0;
}
