/* tests/test_autograd.c — finite-difference gradient checks for every op, the
 * tape, and gradient checkpointing (grads must match with it on and off).
 *
 * Each check builds L = Σ out ⊙ R for a fixed random R, takes the analytic
 * gradient from the tape, and compares it with central differences
 * (L(x+ε) − L(x−ε)) / 2ε evaluated in double over the fp32 forward. GEMMs run
 * in fp32 here (ctx.bf16 = 0) so differences measure the maths, not rounding.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <omp.h>

#include "autograd/backend.h"
#include "autograd/gemm.h"
#include "autograd/lora_gemm.h"
#include "autograd/ops.h"
#include "autograd/prof.h"
#include "autograd/tensor.h"
#include "core/rng.h"
#include "model/llama.h"

static float frand(uint64_t *s) {
    *s += 1;
    return 2.0f * rng_uniform(1234, 99, *s) - 1.0f;
}

static void fill(float *x, int64_t n, float amp, uint64_t *s) {
    for (int64_t i = 0; i < n; i++) x[i] = amp * frand(s);
}

/* An op under test: builds its output from the persistent input buffers. */
typedef struct gc_case {
    int n_in;
    float *in[4];
    int64_t in_rows[4], in_cols[4];
    int in_grad[4]; /* check the gradient of this input */
    tensor *(*build)(ag_ctx *ctx, tensor **ins, void *arg);
    void *arg;
    int64_t out_numel;
} gc_case;

static double gc_eval(ag_ctx *ctx, gc_case *c, const float *R, int record, tensor ***ins_out, tensor **out_out) {
    tensor **ins = ag_alloc(ctx, 4 * sizeof(tensor *));
    for (int i = 0; i < c->n_in; i++) {
        ins[i] = ag_wrap(ctx, AG_F32, c->in_rows[i], c->in_cols[i], c->in[i], NULL);
        ins[i]->requires_grad = record && c->in_grad[i];
    }
    ctx->recording = record;
    tensor *out = c->build(ctx, ins, c->arg);
    ctx->recording = 1;
    double L = 0.0;
    const float *od = out->data;
    for (int64_t i = 0; i < out->numel; i++) L += (double)od[i] * R[i];
    if (ins_out) *ins_out = ins;
    if (out_out) *out_out = out;
    return L;
}

/* Returns the worst relative error over sampled elements of every checked input. */
static double gradcheck(gc_case *c, float eps, int samples) {
    ag_ctx ctx;
    qerr e;
    assert_int_equal(ag_ctx_init(&ctx, 64 << 20, &e), 0);
    ctx.bf16 = 0;
    ctx.training = 1;
    ctx.seed = 7;
    uint64_t s = 42;
    /* output size: one dry run */
    float *R0 = NULL;
    {
        ag_mark m = ag_arena_mark(&ctx);
        float dummyR[1] = {0};
        (void)dummyR;
        tensor **ins;
        tensor *out;
        ctx.recording = 0;
        for (int i = 0; i < c->n_in; i++) (void)i;
        ins = ag_alloc(&ctx, 4 * sizeof(tensor *));
        for (int i = 0; i < c->n_in; i++) ins[i] = ag_wrap(&ctx, AG_F32, c->in_rows[i], c->in_cols[i], c->in[i], NULL);
        out = c->build(&ctx, ins, c->arg);
        c->out_numel = out->numel;
        ctx.recording = 1;
        ag_arena_reset(&ctx, m);
    }
    R0 = malloc((size_t)c->out_numel * sizeof(float));
    fill(R0, c->out_numel, 1.0f, &s);

    tensor **ins, *out;
    ag_mark m = ag_arena_mark(&ctx);
    gc_eval(&ctx, c, R0, 1, &ins, &out);
    float *g = ag_grad(&ctx, out);
    memcpy(g, R0, (size_t)out->numel * sizeof(float));
    ag_backward_from(&ctx, 0);
    float *analytic[4] = {0};
    for (int i = 0; i < c->n_in; i++) {
        if (!c->in_grad[i]) continue;
        int64_t n = c->in_rows[i] * c->in_cols[i];
        analytic[i] = malloc((size_t)n * sizeof(float));
        if (ins[i]->grad) memcpy(analytic[i], ins[i]->grad, (size_t)n * sizeof(float));
        else memset(analytic[i], 0, (size_t)n * sizeof(float));
    }
    ag_arena_reset(&ctx, m);

    double worst = 0.0;
    for (int i = 0; i < c->n_in; i++) {
        if (!c->in_grad[i]) continue;
        int64_t n = c->in_rows[i] * c->in_cols[i];
        double gmax = 1e-12;
        for (int64_t j = 0; j < n; j++) gmax = fmax(gmax, fabs(analytic[i][j]));
        for (int k = 0; k < samples; k++) {
            int64_t j = (int64_t)(rng_u64(5, (uint64_t)i, (uint64_t)k) % (uint64_t)n);
            float orig = c->in[i][j];
            c->in[i][j] = orig + eps;
            ag_mark m1 = ag_arena_mark(&ctx);
            double Lp = gc_eval(&ctx, c, R0, 0, NULL, NULL);
            ag_arena_reset(&ctx, m1);
            c->in[i][j] = orig - eps;
            double Lm = gc_eval(&ctx, c, R0, 0, NULL, NULL);
            ag_arena_reset(&ctx, m1);
            c->in[i][j] = orig;
            double num = (Lp - Lm) / (2.0 * eps);
            double err = fabs(num - analytic[i][j]) / (gmax + fabs(num));
            if (err > worst) worst = err;
            if (err > 2e-2)
                print_message("input %d elem %lld: analytic %.6g numeric %.6g (max |g| %.3g)\n", i, (long long)j,
                              analytic[i][j], num, gmax);
        }
        free(analytic[i]);
    }
    free(R0);
    ag_ctx_free(&ctx);
    return worst;
}

/* ---- ops under test ---- */

static tensor *build_rmsnorm(ag_ctx *ctx, tensor **in, void *arg) {
    (void)arg;
    in[1]->ndim = 1;
    in[1]->shape[0] = in[1]->shape[1];
    return op_rmsnorm(ctx, in[0], in[1], 1e-5f);
}

static void test_rmsnorm(void **st) {
    (void)st;
    uint64_t s = 1;
    int64_t N = 6, D = 32;
    float *x = malloc(N * D * 4), *w = malloc(D * 4);
    fill(x, N * D, 1.0f, &s);
    fill(w, D, 1.0f, &s);
    gc_case c = {.n_in = 2, .in = {x, w}, .in_rows = {N, 1}, .in_cols = {D, D}, .in_grad = {1, 1},
                 .build = build_rmsnorm};
    double err = gradcheck(&c, 1e-2f, 40);
    print_message("rmsnorm worst rel err %.2e\n", err);
    assert_true(err < 1e-2);
    free(x);
    free(w);
}

typedef struct lin_arg {
    frozen_weight w;
    int r;
    float scaling, dropout;
    int with_lora;
} lin_arg;

static tensor *build_linear(ag_ctx *ctx, tensor **in, void *argp) {
    lin_arg *a = argp;
    if (!a->with_lora) return op_linear(ctx, in[0], &a->w, NULL);
    lora_adapter *lo = ag_alloc(ctx, sizeof *lo);
    *lo = (lora_adapter){.A = in[1], .B = in[2], .r = a->r, .scaling = a->scaling, .dropout = a->dropout, .stream = 3};
    return op_linear(ctx, in[0], &a->w, lo);
}

static void run_linear_case(frozen_kind kind, float dropout) {
    uint64_t s = 2;
    int64_t N = 5, in = 64, out = 24, r = 4;
    float *x = malloc(N * in * 4), *W = malloc(out * in * 4), *A = malloc(r * in * 4), *B = malloc(out * r * 4);
    fill(x, N * in, 1.0f, &s);
    fill(W, out * in, 0.2f, &s);
    fill(A, r * in, 0.3f, &s);
    fill(B, out * r, 0.3f, &s);
    lin_arg a = {.r = (int)r, .scaling = 2.0f, .dropout = dropout, .with_lora = 1};
    nf4_tensor q;
    qerr e;
    a.w = (frozen_weight){.out = out, .in = in, .kind = FROZEN_F32, .w_f32 = W};
    if (kind == FROZEN_NF4) {
        assert_int_equal(nf4_quantize(W, out, in, 64, 1, &q, &e), 0);
        a.w.kind = FROZEN_NF4;
        a.w.nf4 = &q;
    }
    gc_case c = {.n_in = 3, .in = {x, A, B}, .in_rows = {N, r, out}, .in_cols = {in, in, r}, .in_grad = {1, 1, 1},
                 .build = build_linear, .arg = &a};
    double err = gradcheck(&c, 1e-2f, 40);
    print_message("linear(kind %d, dropout %.2f) worst rel err %.2e\n", (int)kind, dropout, err);
    assert_true(err < 1e-2);
    a.with_lora = 0;
    gc_case c2 = {.n_in = 1, .in = {x}, .in_rows = {N}, .in_cols = {in}, .in_grad = {1}, .build = build_linear, .arg = &a};
    err = gradcheck(&c2, 1e-2f, 30);
    assert_true(err < 1e-2);
    if (kind == FROZEN_NF4) nf4_free(&q);
    free(x);
    free(W);
    free(A);
    free(B);
}

static void test_linear_f32(void **st) { (void)st; run_linear_case(FROZEN_F32, 0.0f); }
static void test_linear_nf4(void **st) { (void)st; run_linear_case(FROZEN_NF4, 0.0f); }
static void test_linear_dropout(void **st) { (void)st; run_linear_case(FROZEN_NF4, 0.25f); }

/* op_linear_group (q/k/v-style grouped LoRA A products): finite differences through two linears of
 * one input (x, A0, B0, A1 checked; B1 frozen), and equality with one op_linear per linear (three
 * linears of different widths, NF4 and fp32 bases, fp32 and bf16 modes): values and every gradient. */
typedef struct group_arg {
    frozen_weight w[3];
    float *B1;
    int r;
} group_arg;

static tensor *build_group2(ag_ctx *ctx, tensor **in, void *argp) {
    group_arg *a = argp;
    lora_adapter *lo = ag_alloc(ctx, 2 * sizeof *lo);
    tensor *B1 = ag_wrap(ctx, AG_F32, a->w[1].out, a->r, a->B1, NULL);
    lo[0] = (lora_adapter){.A = in[1], .B = in[2], .r = a->r, .scaling = 2.0f, .stream = 3};
    lo[1] = (lora_adapter){.A = in[3], .B = B1, .r = a->r, .scaling = 0.5f, .stream = 4};
    const frozen_weight *const w[2] = {&a->w[0], &a->w[1]};
    const lora_adapter *const l2[2] = {&lo[0], &lo[1]};
    tensor *y[2];
    op_linear_group(ctx, in[0], 2, w, l2, y);
    return op_add(ctx, y[0], y[1]);
}

static void test_linear_group_gradcheck(void **st) {
    (void)st;
    uint64_t s = 11;
    int64_t N = 5, in = 64, out = 24, r = 4;
    float *x = malloc(N * in * 4), *W0 = malloc(out * in * 4), *W1 = malloc(out * in * 4);
    float *A0 = malloc(r * in * 4), *B0 = malloc(out * r * 4), *A1 = malloc(r * in * 4), *B1 = malloc(out * r * 4);
    fill(x, N * in, 1.0f, &s);
    fill(W0, out * in, 0.2f, &s);
    fill(W1, out * in, 0.2f, &s);
    fill(A0, r * in, 0.3f, &s);
    fill(B0, out * r, 0.3f, &s);
    fill(A1, r * in, 0.3f, &s);
    fill(B1, out * r, 0.3f, &s);
    group_arg a = {.w = {{.out = out, .in = in, .kind = FROZEN_F32, .w_f32 = W0},
                         {.out = out, .in = in, .kind = FROZEN_F32, .w_f32 = W1}},
                   .B1 = B1, .r = (int)r};
    gc_case c = {.n_in = 4, .in = {x, A0, B0, A1}, .in_rows = {N, r, out, r}, .in_cols = {in, in, r, in},
                 .in_grad = {1, 1, 1, 1}, .build = build_group2, .arg = &a};
    double err = gradcheck(&c, 1e-2f, 40);
    print_message("linear group worst rel err %.2e\n", err);
    assert_true(err < 1e-2);
    free(x), free(W0), free(W1), free(A0), free(B0), free(A1), free(B1);
}

static double rel_diff(const float *a, const float *b, int64_t n) {
    double num = 0, den = 1e-30;
    for (int64_t i = 0; i < n; i++) {
        num = fmax(num, fabs((double)a[i] - b[i]));
        den = fmax(den, fabs((double)b[i]));
    }
    return num / den;
}

static void test_linear_group_equals_separate(void **st) {
    (void)st;
    enum { NL = 3 };
    const int64_t N = 37, in = 128, r = 8, outs[NL] = {64, 16, 16};
    uint64_t s = 21;
    float *x = malloc(N * in * 4), *W[NL], *A[NL], *B[NL], *R[NL];
    fill(x, N * in, 1.0f, &s);
    nf4_tensor q;
    qerr e;
    frozen_weight fw[NL];
    for (int i = 0; i < NL; i++) {
        W[i] = malloc(outs[i] * in * 4), A[i] = malloc(r * in * 4), B[i] = malloc(outs[i] * r * 4);
        R[i] = malloc(N * outs[i] * 4);
        fill(W[i], outs[i] * in, 0.2f, &s);
        fill(A[i], r * in, 0.3f, &s);
        fill(B[i], outs[i] * r, 0.3f, &s);
        fill(R[i], N * outs[i], 1.0f, &s);
        fw[i] = (frozen_weight){.out = outs[i], .in = in, .kind = FROZEN_F32, .w_f32 = W[i]};
    }
    assert_int_equal(nf4_quantize(W[0], outs[0], in, 64, 1, &q, &e), 0);
    fw[0].kind = FROZEN_NF4;
    fw[0].nf4 = &q;
    for (int bf = 0; bf <= 1; bf++) {
        float *got[2][1 + 2 * NL], *val[2][NL];
        for (int grouped = 0; grouped <= 1; grouped++) {
            ag_ctx ctx;
            assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
            ctx.bf16 = bf;
            ctx.training = 1;
            ctx.recording = 1;
            float *gx = calloc(N * in, 4), *gA[NL], *gB[NL];
            tensor *xt = ag_wrap(&ctx, AG_F32, N, in, x, NULL);
            xt->requires_grad = 1;
            lora_adapter lo[NL];
            const lora_adapter *lp[NL];
            const frozen_weight *wp[NL];
            for (int i = 0; i < NL; i++) {
                gA[i] = calloc(r * in, 4), gB[i] = calloc(outs[i] * r, 4);
                lo[i] = (lora_adapter){.A = ag_wrap(&ctx, AG_F32, r, in, A[i], gA[i]),
                                       .B = ag_wrap(&ctx, AG_F32, outs[i], r, B[i], gB[i]), .r = (int)r,
                                       .scaling = 0.5f + (float)i, .stream = (uint64_t)i};
                lo[i].A->requires_grad = lo[i].B->requires_grad = 1;
                lp[i] = &lo[i];
                wp[i] = &fw[i];
            }
            tensor *y[NL];
            if (grouped) op_linear_group(&ctx, xt, NL, wp, lp, y);
            else for (int i = 0; i < NL; i++) y[i] = op_linear(&ctx, xt, wp[i], lp[i]);
            for (int i = 0; i < NL; i++) {
                memcpy(ag_grad(&ctx, y[i]), R[i], (size_t)(N * outs[i]) * 4);
                val[grouped][i] = malloc(N * outs[i] * 4);
                memcpy(val[grouped][i], y[i]->data, (size_t)(N * outs[i]) * 4);
            }
            ag_backward_from(&ctx, 0);
            memcpy(gx, xt->grad, (size_t)(N * in) * 4);
            got[grouped][0] = gx;
            for (int i = 0; i < NL; i++) got[grouped][1 + i] = gA[i], got[grouped][1 + NL + i] = gB[i];
            ag_ctx_free(&ctx);
        }
        double worst = 0;
        for (int i = 0; i < NL; i++) {
            worst = fmax(worst, rel_diff(val[1][i], val[0][i], N * outs[i]));
            worst = fmax(worst, rel_diff(got[1][1 + i], got[0][1 + i], r * in));
            worst = fmax(worst, rel_diff(got[1][1 + NL + i], got[0][1 + NL + i], outs[i] * r));
        }
        worst = fmax(worst, rel_diff(got[1][0], got[0][0], N * in));
        print_message("linear group vs separate (%s): worst rel diff %.2e\n", bf ? "bf16" : "fp32", worst);
        assert_true(worst < 1e-5);
        for (int g = 0; g < 2; g++) {
            for (int i = 0; i < 1 + 2 * NL; i++) free(got[g][i]);
            for (int i = 0; i < NL; i++) free(val[g][i]);
        }
    }
    nf4_free(&q);
    for (int i = 0; i < NL; i++) free(W[i]), free(A[i]), free(B[i]), free(R[i]);
    free(x);
}

/* The profile's GEMM classes (qlora-bench's "lora_gemm" apart from "gemm"): one linear with LoRA, then a group
 * of three, forward and backward. Every GEMM FLOP lands in the class of its role, counted exactly (2·M·N·K per
 * call), and gemm_shape_stats sees each product's shape with its number of calls. */
static void test_prof_gemm_classes(void **st) {
    (void)st;
    enum { NL = 3 };
    const int64_t N = 40, in = 96, r = 8, outs[NL] = {64, 32, 32};
    uint64_t s = 5;
    qerr e;
    float *x = malloc(N * in * 4), *W[NL], *A[NL], *B[NL];
    fill(x, N * in, 1.0f, &s);
    frozen_weight fw[NL];
    for (int i = 0; i < NL; i++) {
        W[i] = malloc(outs[i] * in * 4), A[i] = malloc(r * in * 4), B[i] = malloc(outs[i] * r * 4);
        fill(W[i], outs[i] * in, 0.2f, &s);
        fill(A[i], r * in, 0.3f, &s);
        fill(B[i], outs[i] * r, 0.3f, &s);
        fw[i] = (frozen_weight){.out = outs[i], .in = in, .kind = FROZEN_F32, .w_f32 = W[i]};
    }
    for (int grouped = 0; grouped <= 1; grouped++) {
        ag_ctx ctx;
        assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
        ctx.bf16 = 1;
        ctx.training = 1;
        ctx.recording = 1;
        tensor *xt = ag_wrap(&ctx, AG_F32, N, in, x, NULL);
        xt->requires_grad = 1;
        lora_adapter lo[NL];
        const lora_adapter *lp[NL];
        const frozen_weight *wp[NL];
        float *gA[NL], *gB[NL];
        for (int i = 0; i < NL; i++) {
            gA[i] = calloc(r * in, 4), gB[i] = calloc(outs[i] * r, 4);
            lo[i] = (lora_adapter){.A = ag_wrap(&ctx, AG_F32, r, in, A[i], gA[i]),
                                   .B = ag_wrap(&ctx, AG_F32, outs[i], r, B[i], gB[i]), .r = (int)r, .scaling = 2.0f};
            lo[i].A->requires_grad = lo[i].B->requires_grad = 1;
            lp[i] = &lo[i];
            wp[i] = &fw[i];
        }
        const int n = grouped ? NL : 1;
        ag_prof_reset();
        gemm_shape_stats_reset();
        lora_gemm_amx_stats_reset();
        tensor *y[NL];
        if (grouped) op_linear_group(&ctx, xt, NL, wp, lp, y);
        else y[0] = op_linear(&ctx, xt, wp[0], lp[0]);
        for (int i = 0; i < n; i++) {
            float *g = ag_grad(&ctx, y[i]);
            for (int64_t k = 0; k < N * outs[i]; k++) g[k] = 0.01f * (float)(k % 7);
        }
        ag_backward_from(&ctx, 0);
        double fl[AG_PROF_N], total;
        double secs[AG_PROF_N];
        ag_prof_read(secs, &total);
        ag_prof_read_gemm_flops(fl);
        double frozen = 0, lora = 0;
        for (int i = 0; i < n; i++) {
            frozen += 2.0 * (2.0 * N * outs[i] * in);   /* y += x Wᵀ; dx += dy W */
            lora += 2.0 * N * r * in                    /* u = x Aᵀ */
                    + 2.0 * N * outs[i] * r             /* y = s u Bᵀ */
                    + 2.0 * outs[i] * r * N             /* dB += s dyᵀ u */
                    + 2.0 * N * r * outs[i]             /* du = s dy B */
                    + 2.0 * r * in * N                  /* dA += duᵀ x */
                    + 2.0 * N * in * r;                 /* dx += du A */
        }
        print_message("prof classes (%s): gemm %.0f (expected %.0f), lora_gemm %.0f (expected %.0f) FLOPs\n",
                      grouped ? "group of 3" : "one linear", fl[AG_PROF_GEMM], frozen, fl[AG_PROF_LORA_GEMM], lora);
        assert_true(fl[AG_PROF_GEMM] == frozen);
        assert_true(fl[AG_PROF_LORA_GEMM] == lora);
        assert_true(fl[AG_PROF_LM_HEAD_GEMM] == 0.0);
        assert_true(total == frozen + lora);
        gemm_shape_stat shp[64];
        const int ns = gemm_shape_stats(shp, 64);
        int64_t calls = 0;
        double sflops = 0;
        for (int k = 0; k < ns; k++) {
            calls += shp[k].calls;
            sflops += 2.0 * (double)shp[k].M * (double)shp[k].N * (double)shp[k].K * (double)shp[k].calls;
            if (k) assert_true(shp[k].seconds <= shp[k - 1].seconds); /* slowest first */
        }
        /* the calls lora_gemm ran on its AMX kernels (where this processor has AMX) are not oneDNN's */
        int64_t amx_calls = 0;
        double amx_flops = 0;
        lora_gemm_amx_stats(&amx_calls, NULL, &amx_flops);
        if (!lora_gemm_amx_active()) assert_int_equal(amx_calls, 0);
        else assert_true(amx_calls > 0);
        /* calls: single 2 frozen + 6 LoRA; group: 2 per frozen weight + u, 3 B products, 3 dB, 3 du, dA, dx */
        assert_int_equal(calls + amx_calls, grouped ? 2 * NL + 1 + 3 * NL + 2 : 8);
        assert_true(sflops + amx_flops == total);
        ag_ctx_free(&ctx);
        for (int i = 0; i < NL; i++) free(gA[i]), free(gB[i]);
    }
    for (int i = 0; i < NL; i++) free(W[i]), free(A[i]), free(B[i]);
    free(x);
}

typedef struct rope_arg {
    rope_table rt;
    int32_t pos[8];
    int heads;
} rope_arg;

static tensor *build_rope(ag_ctx *ctx, tensor **in, void *argp) {
    rope_arg *a = argp;
    return op_rope(ctx, in[0], a->heads, &a->rt, a->pos);
}

static void test_rope(void **st) {
    (void)st;
    uint64_t s = 3;
    rope_arg a = {.pos = {0, 1, 2, 7, 3, 0, 5, 11}, .heads = 3};
    qerr e;
    assert_int_equal(rope_table_init(&a.rt, 16, 8, 10000.0f, &e), 0);
    float *x = malloc(8 * 24 * 4);
    fill(x, 8 * 24, 1.0f, &s);
    gc_case c = {.n_in = 1, .in = {x}, .in_rows = {8}, .in_cols = {24}, .in_grad = {1}, .build = build_rope, .arg = &a};
    double err = gradcheck(&c, 1e-2f, 40);
    print_message("rope worst rel err %.2e\n", err);
    assert_true(err < 1e-2);
    /* position 0 is the identity */
    ag_ctx ctx;
    assert_int_equal(ag_ctx_init(&ctx, 1 << 20, &e), 0);
    tensor *t = ag_wrap(&ctx, AG_F32, 8, 24, x, NULL);
    tensor *y = op_rope(&ctx, t, 3, &a.rt, a.pos);
    for (int j = 0; j < 24; j++) assert_float_equal(((float *)y->data)[j], x[j], 0.0f);
    ag_ctx_free(&ctx);
    rope_table_free(&a.rt);
    free(x);
}

typedef struct attn_arg {
    int B, T, H, KVH;
    int32_t *sid;
} attn_arg;

static tensor *build_attn(ag_ctx *ctx, tensor **in, void *argp) {
    attn_arg *a = argp;
    return op_attention(ctx, in[0], in[1], in[2], a->B, a->T, a->H, a->KVH, a->sid);
}

static void test_attention(void **st) {
    (void)st;
    uint64_t s = 4;
    int B = 2, T = 7, H = 4, KVH = 2, hd = 8;
    int32_t sid[14] = {0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
    attn_arg a = {B, T, H, KVH, sid};
    float *q = malloc(B * T * H * hd * 4), *k = malloc(B * T * KVH * hd * 4), *v = malloc(B * T * KVH * hd * 4);
    fill(q, B * T * H * hd, 1.0f, &s);
    fill(k, B * T * KVH * hd, 1.0f, &s);
    fill(v, B * T * KVH * hd, 1.0f, &s);
    gc_case c = {.n_in = 3, .in = {q, k, v}, .in_rows = {B * T, B * T, B * T},
                 .in_cols = {H * hd, KVH * hd, KVH * hd}, .in_grad = {1, 1, 1}, .build = build_attn, .arg = &a};
    double err = gradcheck(&c, 1e-2f, 60);
    print_message("attention worst rel err %.2e\n", err);
    assert_true(err < 1e-2);

    /* packed rows: token 3 of row 0 starts a new example and must not see tokens 0..2 */
    ag_ctx ctx;
    qerr e;
    assert_int_equal(ag_ctx_init(&ctx, 1 << 20, &e), 0);
    ctx.bf16 = 0;
    tensor *tq = ag_wrap(&ctx, AG_F32, B * T, H * hd, q, NULL), *tk = ag_wrap(&ctx, AG_F32, B * T, KVH * hd, k, NULL);
    tensor *tv = ag_wrap(&ctx, AG_F32, B * T, KVH * hd, v, NULL);
    tensor *o1 = op_attention(&ctx, tq, tk, tv, B, T, H, KVH, sid);
    /* the first token of each example attends only to itself: output = its own v (head group) */
    const float *od = o1->data;
    for (int h = 0; h < H; h++)
        for (int d = 0; d < hd; d++) {
            int g = h / (H / KVH);
            assert_float_equal(od[3 * H * hd + h * hd + d], v[3 * KVH * hd + g * hd + d], 1e-6);
        }
    ag_ctx_free(&ctx);
    free(q);
    free(k);
    free(v);
}

/* Longer rows than one query block of the attention kernel (several causal
 * blocks, a partial last one), packed examples as contiguous runs and as an
 * arbitrary (non-contiguous) id pattern: gradients by finite differences and
 * the forward output against a naive double-precision softmax attention. */
static void attn_long_case(int32_t *sid) {
    uint64_t s = 11;
    int B = 1, T = 300, H = 2, KVH = 1, hd = 8;
    attn_arg a = {B, T, H, KVH, sid};
    float *q = malloc(B * T * H * hd * 4), *k = malloc(B * T * KVH * hd * 4), *v = malloc(B * T * KVH * hd * 4);
    fill(q, B * T * H * hd, 1.0f, &s);
    fill(k, B * T * KVH * hd, 1.0f, &s);
    fill(v, B * T * KVH * hd, 1.0f, &s);
    gc_case c = {.n_in = 3, .in = {q, k, v}, .in_rows = {B * T, B * T, B * T},
                 .in_cols = {H * hd, KVH * hd, KVH * hd}, .in_grad = {1, 1, 1}, .build = build_attn, .arg = &a};
    double err = gradcheck(&c, 1e-2f, 40);
    print_message("attention T=%d worst rel err %.2e\n", T, err);
    assert_true(err < 1e-2);

    ag_ctx ctx;
    qerr e;
    assert_int_equal(ag_ctx_init(&ctx, 4 << 20, &e), 0);
    ctx.bf16 = 0;
    tensor *tq = ag_wrap(&ctx, AG_F32, B * T, H * hd, q, NULL), *tk = ag_wrap(&ctx, AG_F32, B * T, KVH * hd, k, NULL);
    tensor *tv = ag_wrap(&ctx, AG_F32, B * T, KVH * hd, v, NULL);
    const float *od = op_attention(&ctx, tq, tk, tv, B, T, H, KVH, sid)->data;
    double worst = 0, *p = malloc(T * sizeof(double));
    for (int h = 0; h < H; h++)
        for (int i = 0; i < T; i++) {
            double mx = -1e300, sum = 0;
            for (int j = 0; j <= i; j++) {
                p[j] = -1e300;
                if (sid && sid[j] != sid[i]) continue;
                double d = 0;
                for (int x = 0; x < hd; x++) d += (double)q[i * H * hd + h * hd + x] * k[j * KVH * hd + x];
                p[j] = d / sqrt((double)hd);
                if (p[j] > mx) mx = p[j];
            }
            for (int j = 0; j <= i; j++) sum += p[j] > -1e299 ? exp(p[j] - mx) : 0;
            for (int x = 0; x < hd; x++) {
                double o = 0;
                for (int j = 0; j <= i; j++)
                    if (p[j] > -1e299) o += exp(p[j] - mx) / sum * v[j * KVH * hd + x];
                worst = fmax(worst, fabs(o - od[i * H * hd + h * hd + x]));
            }
        }
    print_message("attention T=%d forward max abs err vs naive %.2e\n", T, worst);
    assert_true(worst < 1e-5);
    free(p);
    ag_ctx_free(&ctx);
    free(q);
    free(k);
    free(v);
}

static void test_attention_long(void **st) {
    (void)st;
    int32_t sid[300];
    attn_long_case(NULL);
    for (int i = 0; i < 300; i++) sid[i] = i < 140 ? 0 : (i < 141 ? 1 : 2); /* runs, one of length 1 */
    attn_long_case(sid);
    for (int i = 0; i < 300; i++) sid[i] = (i * 7) % 3; /* interleaved ids: the general mask */
    attn_long_case(sid);
}

static tensor *build_swiglu(ag_ctx *ctx, tensor **in, void *arg) {
    (void)arg;
    return op_glu(ctx, in[0], in[1], AG_GLU_SILU);
}

static tensor *build_add(ag_ctx *ctx, tensor **in, void *arg) {
    (void)arg;
    return op_add(ctx, in[0], in[1]);
}

static void test_swiglu_add(void **st) {
    (void)st;
    uint64_t s = 5;
    float *g = malloc(4 * 16 * 4), *u = malloc(4 * 16 * 4);
    fill(g, 64, 3.0f, &s);
    fill(u, 64, 1.0f, &s);
    gc_case c = {.n_in = 2, .in = {g, u}, .in_rows = {4, 4}, .in_cols = {16, 16}, .in_grad = {1, 1}, .build = build_swiglu};
    double err = gradcheck(&c, 1e-2f, 40);
    print_message("swiglu worst rel err %.2e\n", err);
    assert_true(err < 1e-2);
    c.build = build_add;
    err = gradcheck(&c, 1e-2f, 20);
    assert_true(err < 1e-3);
    free(g);
    free(u);
}

typedef struct ce_arg {
    frozen_weight w;
    int32_t *targets;
    float scale;
} ce_arg;

static tensor *build_ce(ag_ctx *ctx, tensor **in, void *argp) {
    ce_arg *a = argp;
    return op_lm_head_ce(ctx, in[0], &a->w, a->targets, a->scale, NULL, NULL);
}

static void test_cross_entropy(void **st) {
    (void)st;
    uint64_t s = 6;
    int64_t N = 300, D = 16, V = 50; /* N > the internal chunk of 256 rows */
    float *h = malloc(N * D * 4), *W = malloc(V * D * 4);
    int32_t *tg = malloc(N * 4);
    fill(h, N * D, 1.0f, &s);
    fill(W, V * D, 1.0f, &s);
    for (int64_t i = 0; i < N; i++) tg[i] = (i % 7 == 3) ? -100 : (int32_t)(rng_u64(1, 2, (uint64_t)i) % V);
    ce_arg a = {.w = {.out = V, .in = D, .kind = FROZEN_F32, .w_f32 = W}, .targets = tg, .scale = 1.0f / 200};
    gc_case c = {.n_in = 1, .in = {h}, .in_rows = {N}, .in_cols = {D}, .in_grad = {1}, .build = build_ce, .arg = &a};
    double err = gradcheck(&c, 1e-2f, 60);
    print_message("lm_head_ce worst rel err %.2e\n", err);
    assert_true(err < 2e-2);

    /* loss value against a direct double-precision computation; ignored rows excluded */
    ag_ctx ctx;
    qerr e;
    assert_int_equal(ag_ctx_init(&ctx, 1 << 20, &e), 0);
    ctx.bf16 = 0;
    ctx.recording = 0;
    double lsum;
    int64_t nt;
    tensor *th = ag_wrap(&ctx, AG_F32, N, D, h, NULL);
    op_lm_head_ce(&ctx, th, &a.w, tg, 1.0f, &lsum, &nt);
    double ref = 0.0;
    int64_t cnt = 0;
    for (int64_t i = 0; i < N; i++) {
        if (tg[i] == -100) continue;
        double mx = -1e300, lg[50];
        for (int64_t v = 0; v < V; v++) {
            double z = 0;
            for (int64_t d = 0; d < D; d++) z += (double)h[i * D + d] * W[v * D + d];
            lg[v] = z;
            mx = fmax(mx, z);
        }
        double se = 0;
        for (int64_t v = 0; v < V; v++) se += exp(lg[v] - mx);
        ref += mx + log(se) - lg[tg[i]];
        cnt++;
    }
    assert_int_equal(nt, cnt);
    assert_true(fabs(lsum - ref) < 1e-4 * fabs(ref));
    ag_ctx_free(&ctx);
    free(h);
    free(W);
    free(tg);
}

typedef struct emb_arg {
    const int32_t *ids;
    int64_t n;
} emb_arg;

static tensor *build_embed_train(ag_ctx *ctx, tensor **in, void *argp) {
    emb_arg *a = argp;
    return op_embedding_train(ctx, in[0], a->ids, a->n);
}

/* op_embedding_train: finite differences (repeated ids accumulate), and the scatter-add the same
 * bits for 1 and 2 threads (columns split, tokens in order). */
static void test_embedding_train(void **st) {
    (void)st;
    uint64_t s = 11;
    int64_t V = 40, D = 130, n = 300; /* D not a multiple of the 64-column blocks */
    float *W = malloc(V * D * 4);
    fill(W, V * D, 1.0f, &s);
    int32_t *ids = malloc(n * 4);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(rng_u64(3, 3, (uint64_t)i) % (uint64_t)(V - 3)); /* 3 unused rows */
    emb_arg a = {.ids = ids, .n = n};
    gc_case c = {.n_in = 1, .in = {W}, .in_rows = {V}, .in_cols = {D}, .in_grad = {1}, .build = build_embed_train,
                 .arg = &a};
    double err = gradcheck(&c, 1e-2f, 80);
    print_message("embedding_train worst rel err %.2e\n", err);
    assert_true(err < 1e-3);
    /* determinism across thread counts, and exactly the sequential sums */
    float *dx = malloc(n * D * 4), *g1 = calloc(V * D, 4), *g2 = calloc(V * D, 4), *gr = calloc(V * D, 4);
    fill(dx, n * D, 1.0f, &s);
    const ag_backend *be = ag_backend_default();
    int nth = omp_get_max_threads();
    omp_set_num_threads(1);
    be->embedding_bwd(dx, ids, n, D, g1);
    omp_set_num_threads(2);
    be->embedding_bwd(dx, ids, n, D, g2);
    omp_set_num_threads(nth);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < D; j++) gr[ids[i] * D + j] += dx[i * D + j];
    assert_memory_equal(g1, g2, V * D * 4);
    assert_memory_equal(g1, gr, V * D * 4);
    for (int64_t j = 0; j < D; j++) assert_true(g1[(V - 1) * D + j] == 0.0f);
    free(dx), free(g1), free(g2), free(gr), free(W), free(ids);
}

/* op_lm_head_ce_train: the trainable head's gradient (accumulated in the chunked pass) and h's, by
 * finite differences of the loss (fp32 GEMMs), over more rows than one chunk; bf16 GEMMs: dW
 * against the fp32 one within bf16 operand rounding. */
static void test_lm_head_train(void **st) {
    (void)st;
    uint64_t s = 21;
    int64_t N = 300, D = 24, V = 70;
    float *h = malloc(N * D * 4), *W = malloc(V * D * 4), *dW = calloc(V * D, 4), *dWb = calloc(V * D, 4);
    float *dh = calloc(N * D, 4);
    int32_t *tg = malloc(N * 4);
    fill(h, N * D, 1.0f, &s);
    fill(W, V * D, 1.0f, &s);
    for (int64_t i = 0; i < N; i++) tg[i] = (i % 7 == 3) ? -100 : (int32_t)(rng_u64(1, 2, (uint64_t)i) % V);
    const float scale = 1.0f / 200;
    qerr e;
    for (int bf = 0; bf < 2; bf++) {
        ag_ctx ctx;
        assert_int_equal(ag_ctx_init(&ctx, 4 << 20, &e), 0);
        ctx.bf16 = bf;
        ctx.recording = 1;
        tensor *th = ag_wrap(&ctx, AG_F32, N, D, h, bf ? NULL : dh);
        if (bf) th->requires_grad = 1;
        tensor *tw = ag_wrap(&ctx, AG_F32, V, D, W, bf ? dWb : dW);
        frozen_weight view = {.out = V, .in = D, .kind = FROZEN_F32, .w_f32 = W};
        tensor *L = op_lm_head_ce_train(&ctx, th, &view, tw, tg, AG_CE_TARGETS, 0, scale, NULL, NULL, NULL);
        ag_backward(&ctx, L);
        ag_ctx_free(&ctx);
    }
    double worst = 0, gmax = 1e-12;
    for (int64_t j = 0; j < V * D; j++) gmax = fmax(gmax, fabs(dW[j]));
    for (int k = 0; k < 60; k++) {
        int which = k & 1; /* W, h */
        float *x = which ? h : W;
        int64_t j = (int64_t)(rng_u64(6, 6, (uint64_t)k) % (uint64_t)(which ? N * D : V * D));
        float orig = x[j];
        double Lpm[2];
        for (int sg = 0; sg < 2; sg++) {
            x[j] = orig + (sg ? -1e-2f : 1e-2f);
            ag_ctx ctx;
            assert_int_equal(ag_ctx_init(&ctx, 4 << 20, &e), 0);
            ctx.bf16 = 0;
            ctx.recording = 0;
            tensor *th = ag_wrap(&ctx, AG_F32, N, D, h, NULL);
            frozen_weight view = {.out = V, .in = D, .kind = FROZEN_F32, .w_f32 = W};
            double lsum;
            op_lm_head_ce(&ctx, th, &view, tg, 1.0f, &lsum, NULL);
            Lpm[sg] = lsum * scale;
            ag_ctx_free(&ctx);
        }
        x[j] = orig;
        double num = (Lpm[0] - Lpm[1]) / 2e-2, ana = which ? dh[j] : dW[j];
        double err = fabs(num - ana) / (gmax + fabs(num));
        if (err > worst) worst = err;
    }
    print_message("lm_head_train worst rel err %.2e\n", worst);
    assert_true(worst < 2e-3);
    double num2 = 0, den2 = 0;
    for (int64_t j = 0; j < V * D; j++) num2 += (dWb[j] - dW[j]) * (double)(dWb[j] - dW[j]), den2 += (double)dW[j] * dW[j];
    print_message("lm_head_train bf16 operands: |dW_bf16 - dW_fp32| / |dW| = %.2e\n", sqrt(num2 / den2));
    assert_true(sqrt(num2 / den2) < 2e-2);
    free(h), free(W), free(dW), free(dWb), free(dh), free(tg);
}

/* A tiny random Llama, forward+backward with and without checkpointing: the
 * LoRA gradients must be identical (the peft/transformers "silently zero
 * grads under checkpointing" trap), and non-zero. */
static void checkpointing_case(int save_both) {
    /* build a tiny model by hand */
    llama_model m;
    memset(&m, 0, sizeof m);
    llama_hparams *hp = &m.hp;
    *hp = (llama_hparams){.n_layer = 2, .d_model = 64, .n_head = 4, .n_kv_head = 2, .head_dim = 16, .d_ff = 96,
                          .vocab = 101, .context_length = 64, .rope_theta = 10000.0f, .rms_eps = 1e-5f,
                          .tied_embeddings = 1};
    qerr e;
    uint64_t s = 9;
    int64_t D = 64, F = 96, V = 101;
    float *emb = malloc(V * D * 4);
    fill(emb, V * D, 0.5f, &s);
    m.tok_embd = malloc(V * D * 2);
    for (int64_t i = 0; i < V * D; i++) m.tok_embd[i] = f32_to_bf16(emb[i]);
    m.lm_head_w = m.tok_embd;
    m.embed = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = m.tok_embd};
    m.lm_head = m.embed;
    m.out_norm = malloc(D * 4);
    for (int i = 0; i < D; i++) m.out_norm[i] = 1.0f;
    m.layers = calloc(2, sizeof *m.layers);
    int64_t outs[7] = {64, 32, 32, 64, F, F, 64}, ins[7] = {64, 64, 64, 64, 64, 64, F};
    for (int l = 0; l < 2; l++) {
        m.layers[l].attn_norm = malloc(D * 4);
        m.layers[l].ffn_norm = malloc(D * 4);
        for (int i = 0; i < D; i++) m.layers[l].attn_norm[i] = m.layers[l].ffn_norm[i] = 1.0f;
        for (int k = 0; k < 7; k++) {
            float *w = malloc(outs[k] * ins[k] * 4);
            fill(w, outs[k] * ins[k], 0.15f, &s);
            assert_int_equal(nf4_quantize(w, outs[k], ins[k], 64, 1, &m.layers[l].nf4[k], &e), 0);
            m.layers[l].lin[k] = (frozen_weight){.out = outs[k], .in = ins[k], .kind = FROZEN_NF4, .nf4 = &m.layers[l].nf4[k]};
            free(w);
        }
    }
    assert_int_equal(rope_table_init(&m.rope, 64, 16, 10000.0f, &e), 0);
    int target[7] = {1, 1, 1, 1, 1, 1, 1};
    lora_set ls;
    /* save_both: PEFT modules_to_save [embed_tokens, lm_head] on this tied model: two independent
     * trainable copies after the layers' adapters */
    const int save[LORA_N_SAVE] = {save_both, save_both};
    assert_int_equal(lora_set_init_saved(&ls, NULL, &m, 4, 8.0f, 0.1f, 0, target, save, 3, &e), 0);
    for (int64_t i = 0; i < ls.n_params; i++) ls.params[i] += 0.05f * frand(&s); /* B != 0 */
    if (save_both) {
        assert_int_equal(ls.save_offset[LORA_SAVE_EMBED], ls.layer_offset[2]);
        assert_int_equal(ls.save_offset[LORA_SAVE_LM_HEAD], ls.layer_offset[2] + V * D);
        assert_int_equal(ls.n_params, ls.layer_offset[2] + 2 * V * D);
    }

    int B = 2, T = 16;
    int32_t ids[32], tg[32], pos[32], sid[32];
    for (int i = 0; i < 32; i++) {
        ids[i] = (int32_t)(rng_u64(4, 4, (uint64_t)i) % V);
        tg[i] = i % 5 == 0 ? -100 : (int32_t)(rng_u64(4, 5, (uint64_t)i) % V);
        pos[i] = i % T;
        sid[i] = (i % T) < 9 ? 0 : 1;
        if (sid[i] == 1) pos[i] = (i % T) - 9;
    }
    llama_batch b = {.B = B, .T = T, .input_ids = ids, .targets = tg, .position_ids = pos, .seq_ids = sid};
    /* ck: LLAMA_CKPT_OFF, _FULL, _SELECTIVE; fp32 and bf16 GEMMs, dropout on. Recomputation runs
     * the same kernels on the same inputs with the same dropout counters, so the three modes
     * must give the same loss and the same gradients bit for bit. */
    float *g0 = malloc(ls.n_params * 4), *gb0 = malloc(ls.n_params * 4);
    double loss[3][2];
    size_t peak[3];
    for (int ck = 0; ck < 3; ck++) {
        for (int bf = 0; bf < 2; bf++) {
            ag_ctx ctx;
            assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
            ctx.bf16 = bf;
            ctx.training = 1;
            ctx.seed = 77;
            memset(ls.grads, 0, ls.n_params * 4);
            double lsum;
            int64_t nt;
            tensor *L = llama_forward_loss(&ctx, &m, &ls, &b, 1.0f / 26, ck, &lsum, &nt);
            ag_backward(&ctx, L);
            if (bf) peak[ck] = ctx.arena.peak;
            ag_ctx_free(&ctx);
            loss[ck][bf] = lsum;
            float *ref = bf ? gb0 : g0;
            if (ck == 0) {
                memcpy(ref, ls.grads, ls.n_params * 4);
                double nrm = 0;
                for (int64_t i = 0; i < ls.n_params; i++) nrm += (double)ref[i] * ref[i];
                assert_true(nrm > 0);
            } else {
                int64_t diff = 0;
                for (int64_t i = 0; i < ls.n_params; i++) diff += memcmp(&ls.grads[i], &ref[i], 4) != 0;
                print_message("checkpointing %d (%s GEMMs): %lld of %lld gradients differ from no checkpointing\n",
                              ck, bf ? "bf16" : "fp32", (long long)diff, (long long)ls.n_params);
                assert_memory_equal(ls.grads, ref, ls.n_params * 4);
                assert_memory_equal(&loss[ck][bf], &loss[0][bf], sizeof(double));
            }
        }
    }
    /* the arenas' high-water mark, for the record only: at 2 tiny layers one recomputed block
     * outweighs what checkpointing saves (qlora-bench compares the modes at real shapes) */
    print_message("arena peak: off %zu, selective %zu, full %zu bytes\n", peak[0], peak[2], peak[1]);

    /* Determinism: the same seed and thread count give bit-identical gradients
     * (bf16 GEMMs, dropout on, checkpointing on). */
    float *g1 = malloc(ls.n_params * 4);
    for (int rep = 0; rep < 2; rep++) {
        ag_ctx ctx;
        assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
        ctx.bf16 = 1;
        ctx.training = 1;
        ctx.seed = 1234;
        memset(ls.grads, 0, ls.n_params * 4);
        tensor *L = llama_forward_loss(&ctx, &m, &ls, &b, 1.0f / 26, 1, NULL, NULL);
        ag_backward(&ctx, L);
        ag_ctx_free(&ctx);
        if (rep == 0) memcpy(g1, ls.grads, ls.n_params * 4);
        else assert_memory_equal(g1, ls.grads, ls.n_params * 4);
    }
    free(g1);

    /* finite differences through the whole model for a few LoRA params (fp32 GEMMs) */
    for (int k = 0; k < (save_both ? 16 : 8); k++) {
        int64_t j = (int64_t)(rng_u64(8, 8, (uint64_t)k) % (uint64_t)ls.layer_offset[2]);
        if (save_both && k >= 8 && k < 12) /* the embedding copy: rows the batch looks up */
            j = ls.save_offset[LORA_SAVE_EMBED] + (int64_t)ids[(k * 5) % 32] * D + (int64_t)((k * 13) % D);
        else if (save_both && k >= 12) /* the LM head copy */
            j = ls.save_offset[LORA_SAVE_LM_HEAD] + (int64_t)(rng_u64(8, 9, (uint64_t)k) % (uint64_t)(V * D));
        float orig = ls.params[j];
        double Lpm[2];
        for (int sg = 0; sg < 2; sg++) {
            ls.params[j] = orig + (sg ? -1e-2f : 1e-2f);
            ag_ctx ctx;
            assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
            ctx.bf16 = 0;
            ctx.training = 1;
            ctx.seed = 77;
            ctx.recording = 0;
            double lsum;
            llama_forward_loss(&ctx, &m, &ls, &b, 1.0f / 26, 0, &lsum, NULL);
            Lpm[sg] = lsum / 26;
            ag_ctx_free(&ctx);
        }
        ls.params[j] = orig;
        double num = (Lpm[0] - Lpm[1]) / 2e-2;
        print_message("param %lld: analytic %.6g numeric %.6g\n", (long long)j, g0[j], num);
        assert_true(fabs(num - g0[j]) <= 2e-3 + 3e-2 * fabs(num));
    }

    free(g0);
    free(gb0);
    lora_set_free(&ls);
    for (int l = 0; l < 2; l++) {
        for (int k = 0; k < 7; k++) nf4_free(&m.layers[l].nf4[k]);
        free(m.layers[l].attn_norm);
        free(m.layers[l].ffn_norm);
    }
    free(m.layers);
    free(m.tok_embd);
    free(m.out_norm);
    free(emb);
    rope_table_free(&m.rope);
}

static void test_checkpointing_matches(void **st) {
    (void)st;
    checkpointing_case(0);
}

/* lora_modules_to_save: the same model with trainable embedding and LM head copies: the three
 * checkpointing modes bit-identical, repeatable, and finite differences through the whole model
 * for LoRA, embedding-copy and head-copy elements. */
static void test_modules_to_save_model(void **st) {
    (void)st;
    checkpointing_case(1);
}

/* B = 0 at init: the adapter leaves the base model's loss exactly unchanged. */
static void test_unpermute(void **st) {
    (void)st;
    /* one head of hd = 4, in = 1: GGUF rows [a0 b0 a1 b1] hold HF rows [a0 a1 b0 b1] */
    float w[4] = {10, 20, 11, 21};
    llama_unpermute_rows(w, 1, 4, 1);
    assert_float_equal(w[0], 10, 0);
    assert_float_equal(w[1], 11, 0);
    assert_float_equal(w[2], 20, 0);
    assert_float_equal(w[3], 21, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm),          cmocka_unit_test(test_linear_f32),
        cmocka_unit_test(test_linear_nf4),       cmocka_unit_test(test_linear_dropout),
        cmocka_unit_test(test_linear_group_gradcheck), cmocka_unit_test(test_linear_group_equals_separate),
        cmocka_unit_test(test_rope),             cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_long),
        cmocka_unit_test(test_swiglu_add),       cmocka_unit_test(test_cross_entropy),
        cmocka_unit_test(test_checkpointing_matches), cmocka_unit_test(test_unpermute),
        cmocka_unit_test(test_embedding_train),  cmocka_unit_test(test_lm_head_train),
        cmocka_unit_test(test_modules_to_save_model), cmocka_unit_test(test_prof_gemm_classes),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    gemm_shutdown();
    return rc;
}
