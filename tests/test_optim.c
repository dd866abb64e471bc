/* tests/test_optim.c — AdamW against an independent long-double reference,
 * bias correction at step 1, weight-decay masking, thread independence;
 * LR schedules against their closed forms; global-norm clipping. */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "optim/adamw.h"
#include "optim/clip.h"
#include "optim/schedule.h"

static uint64_t rng_state = 12345;
static double rng_uniform(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------ AdamW */

/* The AdamW update written from the paper / torch docs, in long double. */
typedef struct ref_adam {
    long double p, m, v;
} ref_adam;

static void ref_adam_step(ref_adam *r, long double g, long double lr, const adamw_config *c, int64_t t, int decay) {
    if (decay) r->p *= 1.0L - lr * (long double)c->weight_decay;
    r->m = (long double)c->beta1 * r->m + (1.0L - (long double)c->beta1) * g;
    r->v = (long double)c->beta2 * r->v + (1.0L - (long double)c->beta2) * g * g;
    const long double bc1 = 1.0L - powl((long double)c->beta1, (long double)t);
    const long double bc2 = 1.0L - powl((long double)c->beta2, (long double)t);
    const long double denom = sqrtl(r->v) / sqrtl(bc2) + (long double)c->eps;
    r->p -= (lr / bc1) * r->m / denom;
}

static void test_adamw_vs_long_double(void **state) {
    (void)state;
    enum { N = 9, STEPS = 12 };
    adamw_config c = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1};
    float p[N], g[N];
    uint8_t mask[N];
    ref_adam r[N];
    for (int i = 0; i < N; i++) {
        p[i] = (float)(2.0 * rng_uniform() - 1.0);
        r[i] = (ref_adam){p[i], 0, 0};
        mask[i] = i != 3 && i != 7; /* two no-decay elements */
    }
    adamw_state s;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&s, N, &e), 0);
    for (int t = 1; t <= STEPS; t++) {
        const double lr = schedule_lr(LR_SCHEDULE_COSINE, t - 1, STEPS, 3, 5e-3);
        for (int i = 0; i < N; i++) g[i] = (float)((2.0 * rng_uniform() - 1.0) * (i == 5 ? 1e-3 : 1.0));
        g[8] = 0.0f; /* a parameter without gradient still decays */
        adamw_step(&s, &c, lr, p, g, mask);
        for (int i = 0; i < N; i++) ref_adam_step(&r[i], g[i], lr, &c, t, mask[i]);
        assert_int_equal(s.step, t);
        for (int i = 0; i < N; i++) {
            assert_true(fabsl((long double)p[i] - r[i].p) <= 2e-6L * (1.0L + fabsl(r[i].p)));
            /* m can cancel towards 0: bound the error by the gradient scale */
            const long double gscale = i == 5 ? 1e-3L : 1.0L;
            assert_true(fabsl((long double)s.m[i] - r[i].m) <= 1e-6L * (fabsl(r[i].m) + gscale));
            assert_true(fabsl((long double)s.v[i] - r[i].v) <= 1e-5L * fabsl(r[i].v) + 1e-15L);
        }
    }
    adamw_state_free(&s);
    adamw_state_free(&s); /* second free is harmless */
    assert_null(s.m);
}

static void test_adamw_mask_exact(void **state) {
    (void)state;
    enum { N = 4 };
    adamw_config c = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.5};
    adamw_config c0 = c;
    c0.weight_decay = 0.0;
    float pa[N] = {0.5f, -0.25f, 1.5f, 2.0f}, pb[N];
    memcpy(pb, pa, sizeof pa);
    const uint8_t mask[N] = {1, 0, 1, 0};
    adamw_state a, b;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&a, N, &e), 0);
    assert_int_equal(adamw_state_init(&b, N, &e), 0);
    for (int t = 0; t < 5; t++) {
        float g[N] = {0.1f * (float)t, -0.3f, 0.7f, 0.01f};
        adamw_step(&a, &c, 1e-2, pa, g, mask);
        adamw_step(&b, &c0, 1e-2, pb, g, NULL);
    }
    assert_true(pa[1] == pb[1] && pa[3] == pb[3]); /* exempt: identical to no decay */
    assert_true(pa[0] != pb[0] && pa[2] != pb[2]); /* decayed */
    assert_true(fabsf(pa[2]) < fabsf(pb[2]));
    adamw_state_free(&a);
    adamw_state_free(&b);
}

/* At step 1: m = (1-b1) g, v = (1-b2) g^2, so m/bc1 = g and sqrt(v/bc2) = |g|:
 * the update is lr * g / (|g| + eps) ~= lr * sign(g). */
static void test_adamw_first_step_is_lr_sign(void **state) {
    (void)state;
    enum { N = 6 };
    const float g[N] = {3.0f, -2e-3f, 1e-2f, -100.0f, 0.0f, 0.25f};
    float p[N] = {1.0f, 1.0f, -1.0f, 0.5f, 0.75f, 0.0f}, p0[N];
    memcpy(p0, p, sizeof p);
    adamw_config c = adamw_config_default();
    c.weight_decay = 0.0;
    const double lr = 1e-3;
    adamw_state s;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&s, N, &e), 0);
    adamw_step(&s, &c, lr, p, g, NULL);
    for (int i = 0; i < N; i++) {
        const double step = (double)p[i] - (double)p0[i];
        if (g[i] == 0.0f) {
            assert_true(p[i] == p0[i]);
            continue;
        }
        const double expect = -lr * (g[i] > 0 ? 1.0 : -1.0) * fabs(g[i]) / (fabs(g[i]) + 1e-8);
        /* fp32 parameter: the difference is exact to one ulp of p */
        assert_true(fabs(step - expect) <= 1e-4 * lr + 2.0 * FLT_EPSILON * fabs(p0[i]));
    }
    adamw_state_free(&s);
}

static void test_adamw_defaults_and_errors(void **state) {
    (void)state;
    adamw_config c = adamw_config_default();
    assert_true(c.lr == 1e-3 && c.beta1 == 0.9 && c.beta2 == 0.999 && c.eps == 1e-8 && c.weight_decay == 0.01);
    adamw_state s;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&s, -1, &e), -1);
    assert_non_null(strstr(e.msg, "adamw"));
    assert_null(s.m);
    assert_int_equal(adamw_state_init(&s, 0, &e), 0);
    adamw_step(&s, &c, 1e-3, NULL, NULL, NULL); /* n = 0: only the step count moves */
    assert_int_equal(s.step, 1);
    adamw_state_free(&s);
}

static void test_adamw_threads(void **state) {
    (void)state;
    const int64_t n = 100003;
    float *p1 = malloc((size_t)n * 4), *p2 = malloc((size_t)n * 4), *g = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) {
        p1[i] = p2[i] = (float)(rng_uniform() - 0.5);
        g[i] = (float)(rng_uniform() - 0.5) * 1e-2f;
    }
    adamw_config c = adamw_config_default();
    adamw_state s1, s2;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&s1, n, &e), 0);
    assert_int_equal(adamw_state_init(&s2, n, &e), 0);
    const int saved = omp_get_max_threads();
    for (int t = 0; t < 3; t++) {
        omp_set_num_threads(1);
        adamw_step(&s1, &c, 1e-3, p1, g, NULL);
        omp_set_num_threads(2);
        adamw_step(&s2, &c, 1e-3, p2, g, NULL);
    }
    omp_set_num_threads(saved);
    assert_memory_equal(p1, p2, (size_t)n * 4);
    assert_memory_equal(s1.m, s2.m, (size_t)n * 4);
    assert_memory_equal(s1.v, s2.v, (size_t)n * 4);
    adamw_state_free(&s1);
    adamw_state_free(&s2);
    free(p1);
    free(p2);
    free(g);
}

/* -------------------------------------------------------------- schedules */

static void assert_close(double a, long double b) { assert_true(fabsl((long double)a - b) <= 1e-15L * (1.0L + fabsl(b))); }

static void test_schedules(void **state) {
    (void)state;
    const double base = 2e-4;
    const int64_t total = 110, warm = 10;
    const long double pi = 3.14159265358979323846264338327950288L;
    /* warmup is common to all three: step / warmup, starting at exactly 0 */
    for (int k = 0; k < 3; k++) {
        lr_schedule_kind kind = (lr_schedule_kind)k;
        assert_true(schedule_lr(kind, 0, total, warm, base) == 0.0);
        assert_close(schedule_lr(kind, 5, total, warm, base), base * 0.5L);
        assert_close(schedule_lr(kind, 9, total, warm, base), base * 0.9L);
        assert_close(schedule_lr(kind, warm, total, warm, base), base);
    }
    /* cosine: 0.5 (1 + cos(pi progress)) */
    assert_close(schedule_lr(LR_SCHEDULE_COSINE, 60, total, warm, base), base * 0.5L);
    assert_close(schedule_lr(LR_SCHEDULE_COSINE, 35, total, warm, base), base * 0.5L * (1.0L + cosl(pi * 0.25L)));
    assert_true(fabs(schedule_lr(LR_SCHEDULE_COSINE, total, total, warm, base)) <= 1e-20);
    assert_close(schedule_lr(LR_SCHEDULE_COSINE, 0, total, 0, base), base); /* no warmup: full lr first */
    /* linear: (total - step) / (total - warmup) */
    assert_close(schedule_lr(LR_SCHEDULE_LINEAR, 60, total, warm, base), base * 0.5L);
    assert_close(schedule_lr(LR_SCHEDULE_LINEAR, 85, total, warm, base), base * 0.25L);
    assert_true(schedule_lr(LR_SCHEDULE_LINEAR, total, total, warm, base) == 0.0);
    assert_true(schedule_lr(LR_SCHEDULE_LINEAR, total + 5, total, warm, base) == 0.0);
    /* constant after warmup */
    assert_true(schedule_lr(LR_SCHEDULE_CONSTANT, 11, total, warm, base) == base);
    assert_true(schedule_lr(LR_SCHEDULE_CONSTANT, total, total, warm, base) == base);
    assert_true(schedule_lr(LR_SCHEDULE_CONSTANT, 0, total, 0, base) == base);
    /* degenerate: warmup 1, total equal to warmup */
    assert_true(schedule_lr_lambda(LR_SCHEDULE_COSINE, 0, 1, 1) == 0.0);
    assert_true(schedule_lr_lambda(LR_SCHEDULE_COSINE, 1, 1, 1) == 1.0);
    /* monotone decay after warmup */
    for (int64_t s = warm; s < total; s++) {
        assert_true(schedule_lr(LR_SCHEDULE_COSINE, s + 1, total, warm, base) <=
                    schedule_lr(LR_SCHEDULE_COSINE, s, total, warm, base));
        assert_true(schedule_lr(LR_SCHEDULE_LINEAR, s + 1, total, warm, base) <
                    schedule_lr(LR_SCHEDULE_LINEAR, s, total, warm, base));
    }
}

static void test_schedule_parse(void **state) {
    (void)state;
    lr_schedule_kind k;
    qerr e = {{0}};
    assert_int_equal(lr_schedule_parse("cosine", &k, &e), 0);
    assert_int_equal(k, LR_SCHEDULE_COSINE);
    assert_int_equal(lr_schedule_parse("linear", &k, &e), 0);
    assert_int_equal(k, LR_SCHEDULE_LINEAR);
    assert_int_equal(lr_schedule_parse("constant", &k, &e), 0);
    assert_int_equal(k, LR_SCHEDULE_CONSTANT);
    assert_int_equal(lr_schedule_parse("constant_with_warmup", &k, &e), 0);
    assert_int_equal(k, LR_SCHEDULE_CONSTANT);
    for (int i = 0; i < 3; i++) {
        lr_schedule_kind back;
        assert_int_equal(lr_schedule_parse(lr_schedule_name((lr_schedule_kind)i), &back, &e), 0);
        assert_int_equal(back, i);
    }
    assert_int_equal(lr_schedule_parse("cosine_with_restarts", &k, &e), -1);
    assert_non_null(strstr(e.msg, "\"cosine_with_restarts\""));
    assert_non_null(strstr(e.msg, "cosine, linear, constant"));
    assert_int_equal(lr_schedule_parse("Cosine", &k, &e), -1);
    assert_int_equal(lr_schedule_parse("", &k, &e), -1);
    assert_int_equal(lr_schedule_parse(NULL, &k, &e), -1);
}

/* --------------------------------------------------------------- clipping */

static void test_clip_small(void **state) {
    (void)state;
    float g[2] = {3.0f, 4.0f};
    assert_true(clip_grad_norm(g, 2, 10.0f) == 5.0f);
    assert_true(g[0] == 3.0f && g[1] == 4.0f); /* coef > 1: untouched */
    float coef = 1.0f / (5.0f + 1e-6f);
    assert_true(clip_grad_norm(g, 2, 1.0f) == 5.0f);
    assert_true(g[0] == 3.0f * coef && g[1] == 4.0f * coef);
    assert_true(fabsf(sqrtf(g[0] * g[0] + g[1] * g[1]) - 1.0f) < 1e-6f);
    float h[2] = {3.0f, 4.0f};
    assert_true(clip_grad_norm(h, 2, 0.0f) == 5.0f); /* disabled */
    assert_true(h[0] == 3.0f);
    float z[3] = {0, 0, 0};
    assert_true(clip_grad_norm(z, 3, 1.0f) == 0.0f);
    assert_true(clip_grad_norm(NULL, 0, 1.0f) == 0.0f);
    float bad[3] = {1.0f, NAN, 2.0f};
    assert_true(isnan(clip_grad_norm(bad, 3, 1.0f)));
    assert_true(bad[0] == 1.0f && bad[2] == 2.0f);
    float inf[2] = {INFINITY, 1.0f};
    assert_true(isinf(clip_grad_norm(inf, 2, 1.0f)));
    assert_true(inf[1] == 1.0f);
}

static void test_clip_large_and_threads(void **state) {
    (void)state;
    const int64_t n = 1234567;
    float *g1 = malloc((size_t)n * 4), *g2 = malloc((size_t)n * 4);
    long double ref = 0.0L;
    for (int64_t i = 0; i < n; i++) {
        g1[i] = g2[i] = (float)((rng_uniform() - 0.5) * 0.01);
        ref += (long double)g1[i] * g1[i];
    }
    ref = sqrtl(ref);
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const double n1 = grad_norm_l2(g1, n);
    const float c1 = clip_grad_norm(g1, n, 0.1f);
    omp_set_num_threads(2);
    const double n2 = grad_norm_l2(g2, n);
    const float c2 = clip_grad_norm(g2, n, 0.1f);
    omp_set_num_threads(saved);
    assert_true(n1 == n2 && c1 == c2);
    assert_true(fabsl((long double)n1 - ref) <= 1e-13L * ref);
    assert_true(c1 == (float)n1);
    assert_memory_equal(g1, g2, (size_t)n * 4);
    assert_true(fabs(grad_norm_l2(g1, n) - 0.1) < 1e-6); /* clipped to max_norm */
    free(g1);
    free(g2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adamw_vs_long_double),
        cmocka_unit_test(test_adamw_mask_exact),
        cmocka_unit_test(test_adamw_first_step_is_lr_sign),
        cmocka_unit_test(test_adamw_defaults_and_errors),
        cmocka_unit_test(test_adamw_threads),
        cmocka_unit_test(test_schedules),
        cmocka_unit_test(test_schedule_parse),
        cmocka_unit_test(test_clip_small),
        cmocka_unit_test(test_clip_large_and_threads),
    };
    return cmocka_run_group_tests_name("optim", tests, NULL, NULL);
}
