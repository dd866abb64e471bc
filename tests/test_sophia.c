/* tests/test_sophia.c — SophiaG against a PyTorch reference, and the sampled-label
 * cross-entropy of its Gauss-Newton-Bartlett Hessian estimate.
 *
 *  - exact: one SophiaG step and one Hessian update on 4099 elements equal
 *    torch's fp32 kernels bit for bit (tests/fixtures/sophia_ref.qref.gz,
 *    written by scripts/make_sophia_fixture.py from the documented official update);
 *  - tiny: 20 steps with 2 Hessian updates of a tiny LoRA problem through the
 *    real ops (op_linear with LoRA, op_lm_head_ce, clipping), in the official
 *    loop order, with the fixture's sampled labels: parameters, m and h after
 *    every step within fp32 tolerance;
 *  - sampled CE: labels follow the softmax (chi-square over many draws), do not
 *    depend on the thread count, masked rows are skipped, and the gradient equals
 *    op_lm_head_ce's with the sampled labels as targets;
 *  - checkpoint: Sophia's m, h and counters round-trip through state.h5 bit for
 *    bit (tests/test_e2e_sophia.c resumes a real run).
 */
#include <math.h>
#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "autograd/ce_sampled.h"
#include "autograd/ops.h"
#include "autograd/tensor.h"
#include "core/rng.h"
#include "optim/clip.h"
#include "optim/sophia.h"
#include "tests/ref_fixture.h"
#include "trainer/checkpoint.h"

#define FIXTURE "tests/fixtures/sophia_ref.qref.gz"

/* ------------------------------------------------------------------ exact step */

static void test_sophia_exact_step(void **st) {
    (void)st;
    ref_file f;
    ref_open_or_fail(FIXTURE, &f);
    const int64_t n = ref_find(&f, "exact_p0")->numel;
    const double *hy = ref_f64(&f, "exact_hyper", 6);
    sophia_config c = {.lr = hy[0], .rho = hy[2], .weight_decay = hy[3], .beta1 = hy[4], .beta2 = hy[5], .k = 10};
    sophia_state s;
    qerr e;
    assert_int_equal(sophia_state_init(&s, n, &e), 0);
    float *p = malloc((size_t)n * sizeof(float));
    memcpy(p, ref_f32(&f, "exact_p0", n), (size_t)n * sizeof(float));
    memcpy(s.m, ref_f32(&f, "exact_m0", n), (size_t)n * sizeof(float));
    memcpy(s.h, ref_f32(&f, "exact_h0", n), (size_t)n * sizeof(float));
    int64_t wins = sophia_step(&s, &c, hy[0], hy[1], p, ref_f32(&f, "exact_grad", n), NULL);
    sophia_update_hessian(&s, &c, ref_f32(&f, "exact_ghat", n));
    const float *p1 = ref_f32(&f, "exact_p1", n), *m1 = ref_f32(&f, "exact_m1", n), *h1 = ref_f32(&f, "exact_h1", n);
    int64_t bad_p = 0, bad_m = 0, bad_h = 0;
    for (int64_t i = 0; i < n; i++) {
        bad_p += memcmp(&p[i], &p1[i], 4) != 0;
        bad_m += memcmp(&s.m[i], &m1[i], 4) != 0;
        bad_h += memcmp(&s.h[i], &h1[i], 4) != 0;
    }
    print_message("exact: %lld elements, %lld wins; bit mismatches p %lld, m %lld, h %lld\n", (long long)n,
                  (long long)wins, (long long)bad_p, (long long)bad_m, (long long)bad_h);
    assert_int_equal(bad_p, 0);
    assert_int_equal(bad_m, 0);
    assert_int_equal(bad_h, 0);
    assert_int_equal(wins, ref_i64(&f, "exact_wins", 1)[0]);
    assert_int_equal(s.step, 1);
    assert_int_equal(s.hessian_updates, 1);

    /* before any Hessian update (h = 0) the step is lr·sign(m): every coordinate
     * with m != 0 is clipped; no weight decay on masked elements */
    sophia_state z;
    assert_int_equal(sophia_state_init(&z, 4, &e), 0);
    float pz[4] = {1.0f, -1.0f, 0.5f, 2.0f}, gz[4] = {0.3f, -2.0f, 0.0f, 1e-9f};
    uint8_t mask[4] = {1, 1, 1, 0};
    sophia_config cz = sophia_config_default();
    int64_t wz = sophia_step(&z, &cz, 0.01, 100.0, pz, gz, mask);
    assert_int_equal(wz, 0); /* h = 0: nothing is a win (the m = 0 element just does not move) */
    assert_true(pz[0] == (float)(1.0f * (float)(1.0 - 0.01 * 0.1)) - 0.01f);
    assert_true(pz[2] == 0.5f * (float)(1.0 - 0.01 * 0.1));
    assert_true(pz[3] == 2.0f - 0.01f);
    assert_true(sophia_hessian_due(&cz, 10) && !sophia_hessian_due(&cz, 9) && sophia_hessian_due(&cz, 20));
    sophia_state_free(&z);
    sophia_state_free(&s);
    sophia_state_free(&s); /* harmless twice */
    free(p);
    ref_close(&f);
}

/* ------------------------------------------------------------------ tiny trajectory */

typedef struct tiny {
    int64_t N, DIN, D, V, R;
    const float *x;
    frozen_weight W0, Wh;
    float *params, *grads; /* A (R, DIN) then B (D, R) */
    tensor A, B;
    lora_adapter lora;
} tiny;

/* Forward + backward of scale · Σ CE(targets) into t->grads (zeroed first). */
static double tiny_grad(ag_ctx *ctx, tiny *t, const int32_t *targets, int64_t *n_tok) {
    memset(t->grads, 0, (size_t)(t->A.numel + t->B.numel) * sizeof(float));
    int64_t cnt = 0;
    for (int64_t i = 0; i < t->N; i++) cnt += targets[i] != -100;
    ag_mark mk = ag_arena_mark(ctx);
    tensor *x = ag_wrap(ctx, AG_F32, t->N, t->DIN, (void *)t->x, NULL);
    tensor *h = op_linear(ctx, x, &t->W0, &t->lora);
    double lsum = 0.0;
    tensor *L = op_lm_head_ce(ctx, h, &t->Wh, targets, 1.0f / (float)cnt, &lsum, n_tok);
    ag_backward(ctx, L);
    ag_arena_reset(ctx, mk);
    return lsum / (double)cnt;
}

static void test_sophia_tiny_vs_torch(void **st) {
    (void)st;
    ref_file f;
    ref_open_or_fail(FIXTURE, &f);
    tiny t = {.N = 24, .DIN = 16, .D = 16, .V = 11, .R = 4};
    const double *hy = ref_f64(&f, "tiny_hyper", 6); /* scaling, rho, wd, beta1, beta2, clip */
    const int steps = (int)ref_scalar(&f, "tiny_steps");
    sophia_config c = {.lr = 0, .rho = hy[1], .weight_decay = hy[2], .beta1 = hy[3], .beta2 = hy[4],
                       .k = (int)ref_scalar(&f, "tiny_k")};
    const float clip = (float)hy[5];
    const int64_t nA = t.R * t.DIN, nB = t.D * t.R, n = nA + nB;
    t.x = ref_f32(&f, "tiny_x", t.N * t.DIN);
    t.W0 = (frozen_weight){.out = t.D, .in = t.DIN, .kind = FROZEN_F32, .w_f32 = ref_f32(&f, "tiny_W0", t.D * t.DIN)};
    t.Wh = (frozen_weight){.out = t.V, .in = t.D, .kind = FROZEN_F32, .w_f32 = ref_f32(&f, "tiny_Wh", t.V * t.D)};
    t.params = malloc((size_t)n * sizeof(float));
    t.grads = malloc((size_t)n * sizeof(float));
    memcpy(t.params, ref_f32(&f, "tiny_A0", nA), (size_t)nA * sizeof(float));
    memcpy(t.params + nA, ref_f32(&f, "tiny_B0", nB), (size_t)nB * sizeof(float));
    t.A = (tensor){.ndim = 2, .shape = {t.R, t.DIN}, .numel = nA, .dtype = AG_F32, .data = t.params,
                   .grad = t.grads, .requires_grad = 1};
    t.B = (tensor){.ndim = 2, .shape = {t.D, t.R}, .numel = nB, .dtype = AG_F32, .data = t.params + nA,
                   .grad = t.grads + nA, .requires_grad = 1};
    t.lora = (lora_adapter){.A = &t.A, .B = &t.B, .r = (int)t.R, .scaling = (float)hy[0], .dropout = 0.0f};
    const int32_t *targets = ref_i32(&f, "tiny_targets", 3 * t.N);
    const int32_t *labels = ref_i32(&f, "tiny_hess_labels", 2 * t.N);
    const int64_t *hess_steps = ref_i64(&f, "tiny_hess_steps", 2);
    const double *lrs = ref_f64(&f, "tiny_lr", steps), *bss = ref_f64(&f, "tiny_bs", steps);
    const double *losses = ref_f64(&f, "tiny_loss", steps), *gnorms = ref_f64(&f, "tiny_gnorm", steps);
    const int64_t *wins_ref = ref_i64(&f, "tiny_wins", steps);
    const float *P = ref_f32(&f, "tiny_params", steps * n), *M = ref_f32(&f, "tiny_m", steps * n);
    const float *H = ref_f32(&f, "tiny_h", steps * n);

    ag_ctx ctx;
    qerr e;
    assert_int_equal(ag_ctx_init(&ctx, 1 << 20, &e), 0);
    ctx.bf16 = 0;
    ctx.training = 0;
    ctx.recording = 1;
    sophia_state s;
    assert_int_equal(sophia_state_init(&s, n, &e), 0);
    double max_abs_p = 0, max_rel_p = 0, max_rel_m = 0, max_rel_h = 0, max_loss = 0;
    int n_hess = 0, win_diff = 0;
    for (int step = 1; step <= steps; step++) {
        const int32_t *tg = targets + (size_t)((step - 1) % 3) * t.N;
        int64_t nt = 0;
        double loss = tiny_grad(&ctx, &t, tg, &nt);
        assert_int_equal(nt, (int64_t)bss[step - 1]);
        float gn = clip_grad_norm(t.grads, n, clip);
        max_loss = fmax(max_loss, fabs(loss - losses[step - 1]) / losses[step - 1]);
        assert_true(fabs(gn - gnorms[step - 1]) <= 1e-5 * gnorms[step - 1]);
        int64_t w = sophia_step(&s, &c, lrs[step - 1], bss[step - 1], t.params, t.grads, NULL);
        if (sophia_hessian_due(&c, step)) {
            assert_true(n_hess < 2 && hess_steps[n_hess] == step);
            tiny_grad(&ctx, &t, labels + (size_t)n_hess * t.N, NULL);
            clip_grad_norm(t.grads, n, clip);
            sophia_update_hessian(&s, &c, t.grads);
            n_hess++;
        }
        /* a coordinate exactly at the clipping boundary could flip; none does here */
        win_diff += w != wins_ref[step - 1];
        const float *pr = P + (size_t)(step - 1) * n, *mr = M + (size_t)(step - 1) * n, *hr = H + (size_t)(step - 1) * n;
        double mscale = 0, hscale = 0;
        for (int64_t i = 0; i < n; i++) mscale = fmax(mscale, fabs(mr[i])), hscale = fmax(hscale, fabs(hr[i]));
        for (int64_t i = 0; i < n; i++) {
            double dp = fabs((double)t.params[i] - pr[i]);
            max_abs_p = fmax(max_abs_p, dp);
            max_rel_p = fmax(max_rel_p, dp / fmax(fabs(pr[i]), 1e-2));
            max_rel_m = fmax(max_rel_m, fabs((double)s.m[i] - mr[i]) / mscale);
            if (hscale > 0) max_rel_h = fmax(max_rel_h, fabs((double)s.h[i] - hr[i]) / hscale);
        }
    }
    print_message("tiny: %d steps, %d Hessian updates; params max abs err %.3e, max rel err %.3e; "
                  "m max err %.3e, h max err %.3e (relative to max |m|, |h|); loss rel err %.3e; "
                  "win-count mismatches %d\n",
                  steps, n_hess, max_abs_p, max_rel_p, max_rel_m, max_rel_h, max_loss, win_diff);
    assert_int_equal(n_hess, 2);
    assert_int_equal(s.hessian_updates, 2);
    assert_int_equal(win_diff, 0);
    assert_true(max_abs_p < 2e-6);
    assert_true(max_rel_p < 1e-4);
    assert_true(max_rel_m < 1e-5);
    assert_true(max_rel_h < 1e-5);
    assert_true(max_loss < 1e-5);
    sophia_state_free(&s);
    ag_ctx_free(&ctx);
    free(t.params);
    free(t.grads);
    ref_close(&f);
}

/* ------------------------------------------------------------------ sampled CE */

static void fill_uniform(float *x, int64_t n, float amp, uint64_t stream) {
    for (int64_t i = 0; i < n; i++) x[i] = amp * (2.0f * rng_uniform(99, stream, (uint64_t)i) - 1.0f);
}

/* softmax(h[n] Wᵀ) in double, (V) */
static void softmax_row(const float *h, const float *W, int64_t D, int64_t V, double *p) {
    double mx = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        double z = 0;
        for (int64_t d = 0; d < D; d++) z += (double)h[d] * W[v * D + d];
        p[v] = z;
        mx = fmax(mx, z);
    }
    double s = 0;
    for (int64_t v = 0; v < V; v++) s += (p[v] = exp(p[v] - mx));
    for (int64_t v = 0; v < V; v++) p[v] /= s;
}

/* Draw labels for N rows of hidden states h (fp32 GEMMs, no grad). */
static void draw(const float *h, int64_t N, int64_t D, const frozen_weight *w, const int32_t *mask, uint64_t seed,
                 int32_t *labels, int64_t *n_tok) {
    ag_ctx ctx;
    qerr e;
    assert_int_equal(ag_ctx_init(&ctx, 1 << 22, &e), 0);
    ctx.bf16 = 0;
    ctx.recording = 0;
    tensor *th = ag_wrap(&ctx, AG_F32, N, D, (void *)h, NULL);
    op_lm_head_ce_sampled(&ctx, th, w, mask, seed, 1.0f, labels, NULL, n_tok);
    ag_ctx_free(&ctx);
}

static void test_sampled_ce_follows_softmax(void **st) {
    (void)st;
    /* (a) one row repeated: counts against its softmax */
    enum { D = 8, V = 7, N = 40000 };
    float *W = malloc(V * D * sizeof(float)), *h = malloc((size_t)N * D * sizeof(float));
    int32_t *lab = malloc(N * sizeof(int32_t));
    fill_uniform(W, V * D, 1.0f, 1);
    fill_uniform(h, D, 1.0f, 2);
    for (int64_t i = 1; i < N; i++) memcpy(h + i * D, h, D * sizeof(float));
    frozen_weight w = {.out = V, .in = D, .kind = FROZEN_F32, .w_f32 = W};
    int64_t nt = 0;
    draw(h, N, D, &w, NULL, 2024, lab, &nt);
    assert_int_equal(nt, N);
    double p[V], cnt[V] = {0};
    softmax_row(h, W, D, V, p);
    for (int64_t i = 0; i < N; i++) {
        assert_true(lab[i] >= 0 && lab[i] < V);
        cnt[lab[i]] += 1;
    }
    double chi2 = 0;
    for (int v = 0; v < V; v++) chi2 += (cnt[v] - N * p[v]) * (cnt[v] - N * p[v]) / (N * p[v]);
    print_message("sampled CE, one row x %d draws: p = [%.3f %.3f %.3f %.3f %.3f %.3f %.3f], chi2 %.2f (df 6; "
                  "0.1%% critical value 22.46)\n",
                  N, p[0], p[1], p[2], p[3], p[4], p[5], p[6], chi2);
    assert_true(chi2 < 22.46);

    /* (b) many different rows (each its own distribution), larger vocabulary:
     * expected counts are sums of per-row probabilities; masked rows skipped */
    enum { D2 = 16, V2 = 50, N2 = 20000 };
    float *W2 = malloc(V2 * D2 * sizeof(float)), *h2 = malloc((size_t)N2 * D2 * sizeof(float));
    int32_t *lab2 = malloc(N2 * sizeof(int32_t)), *mask = malloc(N2 * sizeof(int32_t));
    fill_uniform(W2, V2 * D2, 1.0f, 3);
    fill_uniform(h2, (int64_t)N2 * D2, 1.0f, 4);
    for (int64_t i = 0; i < N2; i++) mask[i] = i % 5 == 0 ? -100 : 0;
    frozen_weight w2 = {.out = V2, .in = D2, .kind = FROZEN_F32, .w_f32 = W2};
    draw(h2, N2, D2, &w2, mask, 77, lab2, &nt);
    assert_int_equal(nt, N2 - N2 / 5);
    double exp2v[V2] = {0}, cnt2[V2] = {0}, pr[V2], mean_p_label = 0, mean_p2 = 0;
    for (int64_t i = 0; i < N2; i++) {
        if (mask[i] == -100) {
            assert_int_equal(lab2[i], -100);
            continue;
        }
        softmax_row(h2 + i * D2, W2, D2, V2, pr);
        for (int v = 0; v < V2; v++) exp2v[v] += pr[v], mean_p2 += pr[v] * pr[v];
        cnt2[lab2[i]] += 1;
        mean_p_label += pr[lab2[i]];
    }
    chi2 = 0;
    for (int v = 0; v < V2; v++) chi2 += (cnt2[v] - exp2v[v]) * (cnt2[v] - exp2v[v]) / exp2v[v];
    /* E[p(ŷ)] = Σ p² for ŷ ~ p: the sampled labels' own probability, averaged */
    mean_p_label /= (double)nt;
    mean_p2 /= (double)nt;
    print_message("sampled CE, %lld rows x %d classes: chi2 %.2f (df 49; 0.1%% critical value 85.35); "
                  "mean p(label) %.5f vs E = mean sum p^2 %.5f\n",
                  (long long)nt, V2, chi2, mean_p_label, mean_p2);
    assert_true(chi2 < 85.35);
    assert_true(fabs(mean_p_label - mean_p2) < 4.0 * sqrt(mean_p2 / (double)nt));

    /* (c) deterministic: same seed same labels, for any thread count; another seed differs */
    int32_t *lab3 = malloc(N2 * sizeof(int32_t));
    int nth = omp_get_max_threads();
    omp_set_num_threads(1);
    draw(h2, N2, D2, &w2, mask, 77, lab3, NULL);
    omp_set_num_threads(nth);
    assert_memory_equal(lab2, lab3, N2 * sizeof(int32_t));
    draw(h2, N2, D2, &w2, mask, 78, lab3, NULL);
    int64_t same = 0;
    for (int64_t i = 0; i < N2; i++) same += lab3[i] == lab2[i] && mask[i] != -100;
    assert_true(same < nt / 2);
    free(W);
    free(h);
    free(lab);
    free(W2);
    free(h2);
    free(lab2);
    free(lab3);
    free(mask);
}

/* The gradient of the sampled loss is op_lm_head_ce's with the sampled labels. */
static void sampled_vs_ordinary(int bf16_mode) {
    enum { N = 300, D = 16, V = 50 }; /* N spans several 128-row chunks */
    float *W = malloc(V * D * sizeof(float)), *h = malloc(N * D * sizeof(float));
    int32_t *mask = malloc(N * sizeof(int32_t)), *lab = malloc(N * sizeof(int32_t));
    fill_uniform(W, V * D, 1.0f, 5);
    fill_uniform(h, N * D, 1.5f, 6);
    for (int i = 0; i < N; i++) mask[i] = i % 7 == 3 || (i >= 130 && i < 260) ? -100 : 1; /* a whole masked chunk too */
    frozen_weight w = {.out = V, .in = D, .kind = FROZEN_F32, .w_f32 = W};
    float *g[2];
    double ls[2];
    int64_t nt[2];
    for (int pass = 0; pass < 2; pass++) {
        ag_ctx ctx;
        qerr e;
        assert_int_equal(ag_ctx_init(&ctx, 1 << 22, &e), 0);
        ctx.bf16 = bf16_mode;
        ctx.recording = 1;
        tensor *th = ag_wrap(&ctx, AG_F32, N, D, h, NULL);
        th->requires_grad = 1;
        tensor *L = pass == 0 ? op_lm_head_ce_sampled(&ctx, th, &w, mask, 5, 1.0f / 100, lab, &ls[0], &nt[0])
                              : op_lm_head_ce(&ctx, th, &w, lab, 1.0f / 100, &ls[1], &nt[1]);
        ag_backward(&ctx, L);
        g[pass] = malloc(N * D * sizeof(float));
        memcpy(g[pass], th->grad, N * D * sizeof(float));
        ag_ctx_free(&ctx);
    }
    assert_int_equal(nt[0], nt[1]);
    double md = 0, mg = 0;
    for (int i = 0; i < N * D; i++) md = fmax(md, fabs((double)g[0][i] - g[1][i])), mg = fmax(mg, fabs(g[1][i]));
    print_message("sampled CE vs op_lm_head_ce with the sampled labels (%s): %lld tokens, loss %.9g vs %.9g, "
                  "max |dh diff| %.3e (max |dh| %.3e)\n",
                  bf16_mode ? "bf16 GEMMs" : "fp32", (long long)nt[0], ls[0], ls[1], md, mg);
    assert_true(fabs(ls[0] - ls[1]) <= 1e-6 * fabs(ls[1])); /* same maths; ops.c may evolve its exp/lse */
    /* fp32: the same up to summation order; bf16: a logit gradient may round to
     * the neighbouring bf16 value when ops.c sums its softmax in another order */
    assert_true(md <= (bf16_mode ? 1e-4 : 1e-6) * mg);
    for (int i = 0; i < N; i++) assert_true(mask[i] == -100 ? lab[i] == -100 : lab[i] >= 0 && lab[i] < V);
    free(g[0]);
    free(g[1]);
    free(W);
    free(h);
    free(mask);
    free(lab);
}

static void test_sampled_ce_gradient(void **st) {
    (void)st;
    sampled_vs_ordinary(0);
    sampled_vs_ordinary(1);
}

/* ------------------------------------------------------------------ checkpoint */

/* Sophia's state in state.h5: m as /optimizer/exp_avg, h as /optimizer/hessian,
 * the step and Hessian-update counts and hyper-parameters as attributes;
 * bit-exact round trip, and an AdamW state still reads as before. */
static void test_sophia_checkpoint_round_trip(void **st) {
    (void)st;
    enum { N = 10 };
    float params[N], m[N], h[N], v[N];
    for (int i = 0; i < N; i++) {
        params[i] = 0.1f * (float)i - 0.3f;
        m[i] = i % 3 ? 1e-3f / (float)(i + 1) : -0.0f;
        h[i] = i % 4 ? 1e-9f * (float)(i * i) : 0.0f;
        v[i] = 1e-6f * (float)i;
    }
    ckpt_tensor t = {.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", .offset = 0,
                     .rows = 2, .cols = 5};
    char yaml[] = "optimizer: sophia\n", hist[] = "{\"step\": 1}\n";
    ckpt_state s = {.step = 7, .total_steps = 20, .rows_consumed = 28, .n_rows = 100, .rows_per_step = 4,
                    .seed = 42, .base_lr = 1e-4, .last_lr = 9e-5, .warmup_steps = 2, .opt_step = 7,
                    .beta1 = 0.965, .beta2 = 0.99, .weight_decay = 0.1, .rho = 0.04, .hessian_interval = 3,
                    .hessian_updates = 2, .last_eval_step = -1, .eval_loss_start = NAN, .last_eval_loss = NAN,
                    .n_params = N, .params = params, .exp_avg = m, .hessian = h, .n_tensors = 1, .tensors = &t,
                    .config_yaml = yaml, .log_history = hist, .log_history_len = (int64_t)strlen(hist)};
    snprintf(s.optimizer, sizeof s.optimizer, "sophia");
    snprintf(s.lr_scheduler, sizeof s.lr_scheduler, "cosine");
    char path[] = "/tmp/qlora-sophia-ckpt-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    qerr e;
    assert_int_equal(ckpt_write_state(path, &s, &e), 0);
    ckpt_state r;
    int rc = ckpt_read_state(path, &r, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_string_equal(r.optimizer, "sophia");
    assert_int_equal(r.opt_step, 7);
    assert_int_equal(r.hessian_interval, 3);
    assert_int_equal(r.hessian_updates, 2);
    assert_true(r.beta1 == 0.965 && r.beta2 == 0.99 && r.rho == 0.04 && r.weight_decay == 0.1);
    assert_null(r.exp_avg_sq);
    assert_memory_equal(r.params, params, sizeof params);
    assert_memory_equal(r.exp_avg, m, sizeof m);
    assert_memory_equal(r.hessian, h, sizeof h);
    ckpt_state_free(&r);

    /* the same file layout for AdamW: exp_avg_sq, eps, no hessian */
    memset(s.optimizer, 0, sizeof s.optimizer);
    s.hessian = NULL;
    s.exp_avg_sq = v;
    s.eps = 1e-8;
    assert_int_equal(ckpt_write_state(path, &s, &e), 0);
    assert_int_equal(ckpt_read_state(path, &r, &e), 0);
    assert_string_equal(r.optimizer, "adamw");
    assert_null(r.hessian);
    assert_memory_equal(r.exp_avg_sq, v, sizeof v);
    assert_true(r.eps == 1e-8);
    ckpt_state_free(&r);
    unlink(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sophia_exact_step),
        cmocka_unit_test(test_sophia_tiny_vs_torch),
        cmocka_unit_test(test_sampled_ce_follows_softmax),
        cmocka_unit_test(test_sampled_ce_gradient),
        cmocka_unit_test(test_sophia_checkpoint_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
