/* tests/test_adamw8bit.c — qlora's 8-bit AdamW (optim/adamw8bit.c) against bitsandbytes' own
 * bnb.optim.AdamW8bit (0.50.2, CPU), fixture tests/fixtures/adamw8bit_ref.qref.gz from
 * scripts/make_adamw8bit_fixture.py: three LoRA-shaped tensors (two with 8-bit blockwise states, one
 * below min_8bit_size with fp32 states), 10 steps with a changing learning rate, one tensor's first
 * gradient all zeros.
 *
 *  - maps: both dynamic maps equal bitsandbytes' bit for bit;
 *  - steps 1, 2, 3 and 10: parameters, the 8-bit codes and absmax of both moments, and the fp32
 *    moments of the small tensor are bit-identical to bitsandbytes' on an AVX-512 machine (the
 *    project's machines and CI): the C sequence rounds where torch's fp32 kernels round, including
 *    torch's FMAs and its Newton-refined sqrt (autograd/backend_cpu_optim.inc), and the quantizer is
 *    the library's. Without AVX-512 qlora uses IEEE sqrt, which differs from torch's for ~0.7 % of
 *    values by one ulp; the bound allowed there: parameters within 256 ulp (a one-ulp change of a
 *    denominator moves a parameter near zero by many of its own ulps, ~1e-10 in absolute terms) and
 *    a code at most one step away (a moment next to a bin edge of the 65536-bin quantizer).
 *  - memory: the state takes about a quarter of fp32 AdamW's 8 bytes per parameter.
 *  - checkpoint: the state round-trips through state.h5, and steps after a restore continue bit for
 *    bit as the uninterrupted run.
 *  - shards (SHARD_GRAD_OP / FULL_SHARD): the arena cut into 2, 3 and 7 ranks' shards on the block
 *    grid (ckpt_shard_cuts: ckpt_shard_interval's boundaries moved by adamw8bit_shard_cut, here falling
 *    inside 8-bit tensors off the grid), each shard's ranged state stepped alone: parameters, codes,
 *    absmax and fp32 moments equal the whole state's bit for bit, its blocks are the whole state's
 *    [block_lo, +n_blocks); a range that splits a block is refused.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "optim/adamw8bit.h"
#include "quant/blockwise8.h"
#include "tests/ref_fixture.h"
#include "trainer/checkpoint.h"

#define FIXTURE "tests/fixtures/adamw8bit_ref.qref.gz"

static const char *const names[3] = {"a", "b", "c"};

/* distance in units in the last place between two finite floats of the same sign region */
static int64_t ulp_diff(float a, float b) {
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    if (ia < 0) ia = INT32_MIN - ia;
    if (ib < 0) ib = INT32_MIN - ib;
    return ia > ib ? (int64_t)ia - ib : (int64_t)ib - ia;
}

static void test_maps(void **st) {
    (void)st;
    ref_file f;
    ref_open_or_fail(FIXTURE, &f);
    float m[256];
    adamw8bit_dynamic_map(1, m);
    assert_memory_equal(m, ref_f32(&f, "qmap_signed", 256), sizeof m);
    assert_memory_equal(m, ref_f32(&f, "qmap1_after", 256), sizeof m); /* 0.50.2 leaves code[0] alone */
    adamw8bit_dynamic_map(0, m);
    assert_memory_equal(m, ref_f32(&f, "qmap_unsigned", 256), sizeof m);
    assert_memory_equal(m, ref_f32(&f, "qmap2_after", 256), sizeof m);
    ref_close(&f);
}

static void test_ten_steps_against_bitsandbytes(void **st) {
    (void)st;
    ref_file f;
    ref_open_or_fail(FIXTURE, &f);
    int64_t off[3], num[3], n = 0;
    for (int k = 0; k < 3; k++) {
        char nm[32];
        snprintf(nm, sizeof nm, "p0_%s", names[k]);
        num[k] = ref_find(&f, nm)->numel;
        off[k] = n;
        n += num[k];
    }
    assert_true(num[0] >= ADAMW8BIT_MIN_8BIT_SIZE && num[1] >= ADAMW8BIT_MIN_8BIT_SIZE);
    assert_true(num[2] < ADAMW8BIT_MIN_8BIT_SIZE);
    float *p = malloc((size_t)n * sizeof(float)), *g = malloc((size_t)n * sizeof(float));
    assert_non_null(p);
    assert_non_null(g);
    for (int k = 0; k < 3; k++) {
        char nm[32];
        snprintf(nm, sizeof nm, "p0_%s", names[k]);
        memcpy(p + off[k], ref_f32(&f, nm, num[k]), (size_t)num[k] * sizeof(float));
    }
    adamw8bit_state s;
    qerr e;
    assert_int_equal(adamw8bit_state_init(&s, ag_backend_default(), n, off, num, 3, &e), 0);
    const adamw_config c = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    const float *scales = ref_f32(&f, "scales", 10);
    const double *lrs = ref_f64(&f, "lrs", 10);
    int64_t p_off = 0, p_max_ulp = 0, code_off = 0, absmax_off = 0, m32_off = 0;
    for (int t = 1; t <= 10; t++) {
        for (int k = 0; k < 3; k++) {
            char nm[32];
            snprintf(nm, sizeof nm, "g%d_%s", (t - 1) % 3, names[k]);
            const float *gk = ref_f32(&f, nm, num[k]);
            for (int64_t i = 0; i < num[k]; i++) g[off[k] + i] = gk[i] * scales[t - 1];
        }
        adamw8bit_step(&s, &c, lrs[t - 1], p, g);
        if (t != 1 && t != 2 && t != 3 && t != 10) continue;
        for (int k = 0; k < 3; k++) {
            char nm[48];
            snprintf(nm, sizeof nm, "p%d_%s", t, names[k]);
            const float *want = ref_f32(&f, nm, num[k]);
            for (int64_t i = 0; i < num[k]; i++) {
                const int64_t d = ulp_diff(p[off[k] + i], want[i]);
                p_off += d != 0;
                if (d > p_max_ulp) p_max_ulp = d;
            }
            const adamw8bit_tensor *tn = &s.tensors[k];
            if (tn->eight_bit) {
                const int64_t nb = (num[k] + ADAMW8BIT_BLOCKSIZE - 1) / ADAMW8BIT_BLOCKSIZE;
                for (int which = 1; which <= 2; which++) {
                    snprintf(nm, sizeof nm, "state%d_%d_%s", which, t, names[k]);
                    const uint8_t *qw = ref_u8(&f, nm, num[k]);
                    snprintf(nm, sizeof nm, "absmax%d_%d_%s", which, t, names[k]);
                    const float *aw = ref_f32(&f, nm, nb);
                    const uint8_t *q = (which == 1 ? s.state1 : s.state2) + tn->offset;
                    const float *am = (which == 1 ? s.absmax1 : s.absmax2) + tn->block0;
                    for (int64_t b = 0; b < nb; b++) {
                        absmax_off += memcmp(&am[b], &aw[b], 4) != 0;
                        if (aw[b] == 0.0f) continue; /* codes of an all-zero block carry nothing */
                        for (int64_t i = b * ADAMW8BIT_BLOCKSIZE; i < num[k] && i < (b + 1) * ADAMW8BIT_BLOCKSIZE;
                             i++) {
                            const int d = abs((int)q[i] - (int)qw[i]);
                            code_off += d != 0;
                            assert_true(d <= 1);
                        }
                    }
                }
            } else {
                snprintf(nm, sizeof nm, "m_%d_%s", t, names[k]);
                const float *mw = ref_f32(&f, nm, num[k]);
                snprintf(nm, sizeof nm, "v_%d_%s", t, names[k]);
                const float *vw = ref_f32(&f, nm, num[k]);
                for (int64_t i = 0; i < num[k]; i++)
                    m32_off += ulp_diff(s.m32[tn->off32 + i], mw[i]) + ulp_diff(s.v32[tn->off32 + i], vw[i]) != 0;
            }
        }
    }
    print_message("vs bitsandbytes over steps 1, 2, 3, 10: %lld parameters differ (max %lld ulp), %lld codes "
                  "one step away, %lld absmax differ, %lld fp32 moments differ\n",
                  (long long)p_off, (long long)p_max_ulp, (long long)code_off, (long long)absmax_off,
                  (long long)m32_off);
#if defined(__AVX512F__)
    assert_int_equal(p_off, 0);
    assert_int_equal(code_off, 0);
    assert_int_equal(absmax_off, 0);
    assert_int_equal(m32_off, 0);
#else
    assert_true(p_max_ulp <= 256);
#endif
    adamw8bit_state_free(&s);
    free(p);
    free(g);
    ref_close(&f);
}

static void test_state_is_a_quarter(void **st) {
    (void)st;
    /* SmolLM2-135M, r 16 on all seven linears: lora_A (16, in), lora_B (out, 16) per linear */
    const int64_t dims[7][2] = {{576, 576}, {576, 192}, {576, 192}, {576, 576}, {576, 1536}, {576, 1536}, {1536, 576}};
    int64_t numel[14 * 30];
    int nt = 0;
    int64_t n = 0;
    for (int l = 0; l < 30; l++)
        for (int k = 0; k < 7; k++) {
            numel[nt++] = 16 * dims[k][0];
            numel[nt++] = dims[k][1] * 16;
            n += 16 * (dims[k][0] + dims[k][1]);
        }
    const double ratio = (double)adamw8bit_state_bytes(numel, nt) / (8.0 * (double)n);
    print_message("8-bit AdamW state / fp32 AdamW state: %.3f (%lld parameters)\n", ratio, (long long)n);
    assert_true(ratio > 0.25 && ratio < 0.30);
}

/* A state saved after 3 steps and read back continues exactly as the uninterrupted one: steps 4..6
 * from the restored state give the same parameters and states bit for bit. */
static void test_checkpoint_resume_is_exact(void **st) {
    (void)st;
    enum { NT = 3 };
    const int64_t rows[NT] = {16, 576, 8}, cols[NT] = {576, 16, 64}; /* 9216, 9216 (8-bit), 512 (fp32) */
    int64_t off[NT], num[NT], n = 0;
    ckpt_tensor t[NT];
    for (int k = 0; k < NT; k++) {
        off[k] = n;
        num[k] = rows[k] * cols[k];
        n += num[k];
        t[k] = (ckpt_tensor){.offset = off[k], .rows = rows[k], .cols = cols[k]};
        snprintf(t[k].name, sizeof t[k].name, "base_model.model.model.layers.0.mlp.t%d.weight", k);
    }
    float *p = malloc((size_t)n * 4), *g = malloc((size_t)n * 4), *q = malloc((size_t)n * 4);
    assert_non_null(p);
    assert_non_null(g);
    assert_non_null(q);
    for (int64_t i = 0; i < n; i++) p[i] = 0.01f * (float)((i * 7919) % 201 - 100) / 100.0f;
    const adamw_config c = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    adamw8bit_state a, b;
    qerr e;
    assert_int_equal(adamw8bit_state_init(&a, ag_backend_default(), n, off, num, NT, &e), 0);
    for (int step = 1; step <= 6; step++) {
        for (int64_t i = 0; i < n; i++) g[i] = 1e-3f * (float)(((i + 31 * step) * 2654435761u) % 2001 - 1000) / 1000.0f;
        adamw8bit_step(&a, &c, 1e-3 / step, p, g);
        if (step != 3) continue;
        /* save after step 3 */
        char yaml[] = "optimizer: adamw_8bit\n", hist[] = "";
        ckpt_state s = {.step = 3, .total_steps = 6, .n_rows = 10, .rows_per_step = 1, .opt_step = a.step,
                        .beta1 = c.beta1, .beta2 = c.beta2, .eps = c.eps, .weight_decay = c.weight_decay,
                        .last_eval_step = -1, .eval_loss_start = NAN, .last_eval_loss = NAN, .n_params = n,
                        .params = p, .exp_avg = a.m32, .exp_avg_sq = a.v32, .state1 = a.state1, .state2 = a.state2,
                        .absmax1 = a.absmax1, .absmax2 = a.absmax2, .n_blocks = a.n_blocks, .n32 = a.n32,
                        .n_tensors = NT, .tensors = t, .config_yaml = yaml, .log_history = hist};
        snprintf(s.optimizer, sizeof s.optimizer, "adamw_8bit");
        snprintf(s.lr_scheduler, sizeof s.lr_scheduler, "cosine");
        char path[] = "/tmp/qlora-adamw8bit-ckpt-XXXXXX";
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(ckpt_write_state(path, &s, &e), 0);
        ckpt_state r;
        int rc = ckpt_read_state(path, &r, &e);
        if (rc) print_error("%s\n", e.msg);
        assert_int_equal(rc, 0);
        unlink(path);
        assert_string_equal(r.optimizer, "adamw_8bit");
        assert_int_equal(r.opt_step, 3);
        assert_int_equal(r.n_blocks, a.n_blocks);
        assert_int_equal(r.n32, a.n32);
        assert_true(r.eps == 1e-8);
        assert_int_equal(adamw8bit_state_init(&b, ag_backend_default(), n, off, num, NT, &e), 0);
        memcpy(q, r.params, (size_t)n * 4);
        memcpy(b.state1, r.state1, (size_t)n);
        memcpy(b.state2, r.state2, (size_t)n);
        memcpy(b.absmax1, r.absmax1, (size_t)b.n_blocks * 4);
        memcpy(b.absmax2, r.absmax2, (size_t)b.n_blocks * 4);
        memcpy(b.m32, r.exp_avg, (size_t)b.n32 * 4);
        memcpy(b.v32, r.exp_avg_sq, (size_t)b.n32 * 4);
        b.step = r.opt_step;
        ckpt_state_free(&r);
    }
    /* the resumed copy: steps 4..6 again from the restored state */
    for (int step = 4; step <= 6; step++) {
        for (int64_t i = 0; i < n; i++) g[i] = 1e-3f * (float)(((i + 31 * step) * 2654435761u) % 2001 - 1000) / 1000.0f;
        adamw8bit_step(&b, &c, 1e-3 / step, q, g);
    }
    assert_memory_equal(p, q, (size_t)n * 4);
    assert_memory_equal(a.state1, b.state1, (size_t)n);
    assert_memory_equal(a.state2, b.state2, (size_t)n);
    assert_memory_equal(a.absmax1, b.absmax1, (size_t)a.n_blocks * 4);
    assert_memory_equal(a.m32, b.m32, (size_t)a.n32 * 4);
    adamw8bit_state_free(&a);
    adamw8bit_state_free(&b);
    free(p);
    free(g);
    free(q);
}

static void test_shards_on_the_block_grid(void **st) {
    (void)st;
    enum { NT = 4 };
    const int64_t rows[NT] = {16, 576, 8, 40}, cols[NT] = {576, 16, 64, 130}; /* 8-bit, 8-bit, fp32, 8-bit (5200) */
    int64_t off[NT], num[NT], n = 0;
    for (int k = 0; k < NT; k++) off[k] = n, num[k] = rows[k] * cols[k], n += num[k];
    float *p = malloc((size_t)n * 4), *g = malloc((size_t)n * 4), *q = malloc((size_t)n * 4);
    assert_non_null(p);
    assert_non_null(g);
    assert_non_null(q);
    const adamw_config c = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    adamw8bit_state whole, part[7];
    qerr e;
    /* a range that splits a block is refused */
    assert_int_equal(adamw8bit_state_init_range(&part[0], ag_backend_default(), 100, n, off, num, NT, &e), -1);
    assert_non_null(strstr(e.msg, "splits a quantization block of 256"));
    static const int worlds[3] = {2, 3, 7};
    for (int w = 0; w < 3; w++) {
        const int W = worlds[w];
        int64_t cuts[8], off_grid = 0;
        for (int64_t i = 0; i < n; i++) p[i] = q[i] = 0.01f * (float)((i * 7919) % 201 - 100) / 100.0f;
        assert_int_equal(adamw8bit_state_init(&whole, ag_backend_default(), n, off, num, NT, &e), 0);
        ckpt_shard_cuts(n, W, 1, off, num, NT, cuts);
        for (int k = 1; k < W; k++) {
            int64_t lo, hi;
            ckpt_shard_interval(n, W, k, &lo, &hi);
            off_grid += cuts[k] != lo; /* the plain boundary lay inside a block */
            assert_true(cuts[k] >= lo && cuts[k] - lo < 256);
        }
        assert_true(off_grid > 0);
        assert_int_equal(cuts[0], 0);
        assert_int_equal(cuts[W], n);
        for (int k = 0; k < W; k++)
            assert_int_equal(adamw8bit_state_init_range(&part[k], ag_backend_default(), cuts[k], cuts[k + 1], off, num,
                                                        NT, &e), 0);
        for (int step = 1; step <= 4; step++) {
            for (int64_t i = 0; i < n; i++)
                g[i] = 1e-3f * (float)(((i + 31 * step + 7 * W) * 2654435761u) % 2001 - 1000) / 1000.0f;
            adamw8bit_step(&whole, &c, 1e-3 / step, p, g);
            for (int k = 0; k < W; k++) adamw8bit_step(&part[k], &c, 1e-3 / step, q + cuts[k], g + cuts[k]);
        }
        assert_memory_equal(p, q, (size_t)n * 4);
        int64_t blocks = 0, n32 = 0;
        for (int k = 0; k < W; k++) {
            const adamw8bit_state *s = &part[k];
            assert_int_equal(s->block_lo, blocks);
            assert_int_equal(s->n32_lo, n32);
            assert_memory_equal(s->state1, whole.state1 + cuts[k], (size_t)s->n);
            assert_memory_equal(s->state2, whole.state2 + cuts[k], (size_t)s->n);
            assert_memory_equal(s->absmax1, whole.absmax1 + s->block_lo, (size_t)s->n_blocks * 4);
            assert_memory_equal(s->absmax2, whole.absmax2 + s->block_lo, (size_t)s->n_blocks * 4);
            assert_memory_equal(s->m32, whole.m32 + s->n32_lo, (size_t)s->n32 * 4);
            assert_memory_equal(s->v32, whole.v32 + s->n32_lo, (size_t)s->n32 * 4);
            assert_int_equal(adamw8bit_state_bytes_range(off, num, NT, cuts[k], cuts[k + 1]) -
                                 2 * (256 * 4 + BW8_LUT_SIZE),
                             2 * s->n + 8 * s->n_blocks + 8 * s->n32);
            blocks += s->n_blocks;
            n32 += s->n32;
            adamw8bit_state_free(&part[k]);
        }
        assert_int_equal(blocks, whole.n_blocks);
        assert_int_equal(n32, whole.n32);
        adamw8bit_state_free(&whole);
    }
    free(p);
    free(g);
    free(q);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_maps),
        cmocka_unit_test(test_ten_steps_against_bitsandbytes),
        cmocka_unit_test(test_state_is_a_quarter),
        cmocka_unit_test(test_checkpoint_resume_is_exact),
        cmocka_unit_test(test_shards_on_the_block_grid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
