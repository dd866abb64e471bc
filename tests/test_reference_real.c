/* tests/test_reference_real.c — SmolLM2-135M-Instruct from the GGUF: qlora's
 * logits against transformers (and transformers + bitsandbytes NF4) on a fixed
 * batch (tests/fixtures/ref_real.qref.gz, scripts/make_reference.py make_real).
 *
 * The batch: 2 rows × 32 tokens of real text (a man page, a ChatML chat with
 * special tokens), positions 0..31. For every position the fixture keeps the
 * log-sum-exp over the whole vocabulary (49152), the top-16 ids and logits,
 * and the logits of a fixed random subset of 256 vocabulary ids. References:
 *   f32        transformers loading the GGUF (it dequantizes Q4_1 / Q8_0 to
 *              fp32 and un-permutes Q/K as qlora does), computing in fp32;
 *   f32_bf16w  the same model with the embedding (= tied LM head) and all
 *              linear weights rounded to bf16 — the weights qlora's bf16 base
 *              holds — still computing in fp32;
 *   bf16       transformers loading the GGUF with torch_dtype=bfloat16: the
 *              bf16 yardstick (how far PyTorch's own bf16 is from f32);
 *   nf4_bf16   transformers + bitsandbytes on CPU, BitsAndBytesConfig(nf4,
 *              double quant, compute bfloat16), non-quantized parts fp32, the
 *              weights quantized from the same fp32 dequantized GGUF weights;
 *   nf4_f32    the same with compute dtype float32 and the (tied) embedding
 *              rounded to bf16 as qlora holds it.
 *   (For both NF4 references, Linear4bit's eval-mode inference path on
 *   AVX512-BF16 CPUs — weights repacked with bf16 block scales, activations
 *   cast to bf16 whatever the compute dtype — is switched off: training, which
 *   is what qlora does, never takes it; it dequantizes and runs F.linear in
 *   the compute dtype. With that path on, "compute float32" differs from
 *   dequantize + fp32 matmul by ~0.17 on a single q_proj output.)
 *
 * ---- Error model and tolerances (fixed before the first run, not tuned) ----
 * err = the largest of: |Δ| over the stored subset logits, |Δ| at the
 * reference's top-16 ids, |Δ log-sum-exp|; scale = max |logit| of the
 * reference over the stored ones (about 36).
 *
 * Same weights, fp32 compute (qlora ctx.bf16 = 0):
 *   bf16 base vs f32_bf16w, and NF4 vs nf4_f32. The weights are identical
 *   bits (the NF4 ones because quantization is bit-exact with bitsandbytes,
 *   tests/test_reference_nf4.c), so only summation order differs: ≲ sqrt(K)·u
 *   ≈ 2.4e-6 relative per GEMM (K ≤ 1536, u = 6e-8), about 300 dependent ops
 *   over 30 layers → ~4e-5 relative in quadrature, a few times more where the
 *   first position's large activations amplify it.
 *     err ≤ 1e-3 · scale, and the top-1 token equal at every position (unless
 *     the reference's top two are within 2·tol of each other).
 *
 * bf16 compute (qlora ctx.bf16 = 1, the training configuration):
 *   bf16 base vs f32 (transformers as it loads the GGUF): weights rounded to
 *   bf16 (2^-9 relative) plus every GEMM operand rounded (~3e-3 relative per
 *   GEMM output), ~210 GEMMs in 30 layers whose errors enter the residual
 *   stream as relative errors of each layer's update → a few 1e-2 relative.
 *   NF4 vs nf4_bf16: bnb rounds its linear outputs to bf16 and keeps
 *   attention, embedding and LM head in fp32 where qlora rounds GEMM operands,
 *   the same order of error.
 *     err ≤ 5e-2 · scale, and err ≤ 3 × yardstick + 1e-3 · scale, where the
 *     yardstick is the same framework's own bf16-vs-fp32 difference over the
 *     subset logits and log-sum-exp: |bf16 − f32| for the bf16 base,
 *     |nf4_bf16 − nf4_f32| for NF4 (bnb compute bf16 vs fp32).
 *
 * One forward of 64 tokens per configuration; the two model loads (bf16 and
 * NF4) dominate the run time. Needs models/SmolLM2-135M-Instruct.Q4_1.gguf.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "autograd/gemm.h"
#include "core/clock.h"
#include "format/gguf.h"
#include "model/llama.h"
#include "tests/ref_fixture.h"

#define MODEL_PATH "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define REAL_FIXTURE "tests/fixtures/ref_real.qref.gz"

static ref_file g_rf;
static int g_B, g_T, g_K, g_S;
static int64_t g_V;
static const int32_t *g_ids, *g_subset;
static int32_t *g_pos, *g_sid, *g_tgt;

static int setup(void **state) {
    (void)state;
    if (access(MODEL_PATH, R_OK) != 0) fail_msg("%s is missing: run `make model` first", MODEL_PATH);
    ref_open_or_fail(REAL_FIXTURE, &g_rf);
    const ref_array *ids = ref_find(&g_rf, "input_ids");
    assert_non_null(ids);
    assert_int_equal(ids->ndim, 2);
    g_B = (int)ids->shape[0];
    g_T = (int)ids->shape[1];
    g_ids = ids->data;
    g_K = (int)ref_scalar(&g_rf, "topk");
    const ref_array *sub = ref_find(&g_rf, "subset");
    assert_non_null(sub);
    g_S = (int)sub->numel;
    g_subset = sub->data;
    g_pos = malloc((size_t)g_B * g_T * sizeof(int32_t));
    g_sid = calloc((size_t)g_B * g_T, sizeof(int32_t));
    g_tgt = malloc((size_t)g_B * g_T * sizeof(int32_t));
    for (int i = 0; i < g_B * g_T; i++) {
        g_pos[i] = i % g_T;
        g_tgt[i] = -100;
    }
    return 0;
}

static int teardown(void **state) {
    (void)state;
    free(g_pos);
    free(g_sid);
    free(g_tgt);
    ref_close(&g_rf);
    gemm_shutdown();
    return 0;
}

/* Full logits (B*T, V) of the model in the given precision. */
static float *qlora_logits(const llama_model *m, int use_bf16) {
    ag_ctx ctx;
    qerr e = {{0}};
    assert_int_equal(ag_ctx_init(&ctx, 64 << 20, &e), 0);
    ctx.bf16 = use_bf16;
    ctx.training = 0;
    llama_batch b = {.B = g_B, .T = g_T, .input_ids = g_ids, .targets = g_tgt, .position_ids = g_pos,
                     .seq_ids = g_sid};
    int64_t n = (int64_t)g_B * g_T;
    float *out = malloc((size_t)(n * g_V) * sizeof(float));
    assert_non_null(out);
    double t0 = clock_now_sec();
    tensor *h = llama_forward_hidden(&ctx, m, NULL, &b);
    llama_logits_rows(&ctx, m, h, 0, n, out);
    ag_ctx_free(&ctx);
    print_message("[ref] real: forward + logits (%s compute) in %.1fs\n", use_bf16 ? "bf16" : "fp32", clock_now_sec() - t0);
    return out;
}

static double lse_row(const float *l, int64_t V) {
    double mx = -INFINITY, s = 0;
    for (int64_t j = 0; j < V; j++) mx = fmax(mx, l[j]);
    for (int64_t j = 0; j < V; j++) s += exp((double)l[j] - mx);
    return mx + log(s);
}

typedef struct cmp_result {
    double err, e_sub, e_top, e_lse, scale;
    int top1_agree, top1_tie, n;
} cmp_result;

/* qlora logits vs one stored reference. */
static cmp_result compare(const float *q, const char *ref, double tol_abs) {
    char key[64];
    int64_t n = (int64_t)g_B * g_T;
    snprintf(key, sizeof key, "%s.lse", ref);
    const double *lse = ref_f64(&g_rf, key, n);
    snprintf(key, sizeof key, "%s.top_ids", ref);
    const int32_t *tid = ref_i32(&g_rf, key, n * g_K);
    snprintf(key, sizeof key, "%s.top_vals", ref);
    const float *tv = ref_f32(&g_rf, key, n * g_K);
    snprintf(key, sizeof key, "%s.subset_logits", ref);
    const float *sl = ref_f32(&g_rf, key, n * g_S);
    cmp_result r = {0};
    r.n = (int)n;
    for (int64_t i = 0; i < n * g_K; i++) r.scale = fmax(r.scale, fabs(tv[i]));
    for (int64_t i = 0; i < n * g_S; i++) r.scale = fmax(r.scale, fabs(sl[i]));
    for (int64_t p = 0; p < n; p++) {
        const float *row = q + p * g_V;
        for (int s = 0; s < g_S; s++) r.e_sub = fmax(r.e_sub, fabs((double)row[g_subset[s]] - sl[p * g_S + s]));
        for (int k = 0; k < g_K; k++) r.e_top = fmax(r.e_top, fabs((double)row[tid[p * g_K + k]] - tv[p * g_K + k]));
        r.e_lse = fmax(r.e_lse, fabs(lse_row(row, g_V) - lse[p]));
        int64_t am = 0;
        for (int64_t j = 1; j < g_V; j++)
            if (row[j] > row[am]) am = j;
        if (am == tid[p * g_K]) {
            r.top1_agree++;
        } else {
            /* a near tie in the reference is not a disagreement */
            double ref_at_am = NAN;
            for (int k = 0; k < g_K; k++)
                if (tid[p * g_K + k] == am) ref_at_am = tv[p * g_K + k];
            if (!isnan(ref_at_am) && tv[p * g_K] - ref_at_am <= 2 * tol_abs) r.top1_tie++;
        }
    }
    r.err = fmax(r.e_sub, fmax(r.e_top, r.e_lse));
    return r;
}

/* The framework's own bf16-vs-fp32 difference over subset logits and lse. */
static double yardstick(const char *a, const char *b) {
    char ka[64], kb[64];
    int64_t n = (int64_t)g_B * g_T;
    double y = 0;
    snprintf(ka, sizeof ka, "%s.subset_logits", a);
    snprintf(kb, sizeof kb, "%s.subset_logits", b);
    const float *x = ref_f32(&g_rf, ka, n * g_S), *z = ref_f32(&g_rf, kb, n * g_S);
    for (int64_t i = 0; i < n * g_S; i++) y = fmax(y, fabs((double)x[i] - z[i]));
    snprintf(ka, sizeof ka, "%s.lse", a);
    snprintf(kb, sizeof kb, "%s.lse", b);
    const double *la = ref_f64(&g_rf, ka, n), *lb = ref_f64(&g_rf, kb, n);
    for (int64_t i = 0; i < n; i++) y = fmax(y, fabs(la[i] - lb[i]));
    return y;
}

static void check_tight(const char *what, const float *q, const char *ref) {
    cmp_result r0 = compare(q, ref, 0);
    double tol = 1e-3 * r0.scale;
    cmp_result r = compare(q, ref, tol);
    print_message("[ref] real %s vs %s: max|Δ| subset %.3e, top-16 %.3e, lse %.3e → %.3e = %.2e of scale %.2f "
                  "(tol 1e-3); top-1 equal at %d/%d positions (+%d near ties)\n",
                  what, ref, r.e_sub, r.e_top, r.e_lse, r.err, r.err / r.scale, r.scale, r.top1_agree, r.n,
                  r.top1_tie);
    assert_true(r.err <= tol);
    assert_int_equal(r.top1_agree + r.top1_tie, r.n);
}

static void check_bf16(const char *what, const float *q, const char *ref, const char *yard_a, const char *yard_b) {
    cmp_result r0 = compare(q, ref, 0);
    double tol = 5e-2 * r0.scale;
    cmp_result r = compare(q, ref, tol);
    double y = yardstick(yard_a, yard_b);
    print_message("[ref] real %s vs %s: max|Δ| subset %.3e, top-16 %.3e, lse %.3e → %.3e = %.2e of scale %.2f "
                  "(tol 5e-2); yardstick |%s − %s| = %.3e (tol 3x + 1e-3·scale = %.3e); top-1 equal at %d/%d\n",
                  what, ref, r.e_sub, r.e_top, r.e_lse, r.err, r.err / r.scale, r.scale, yard_a, yard_b, y,
                  3 * y + 1e-3 * r.scale, r.top1_agree, r.n);
    assert_true(r.err <= tol);
    assert_true(r.err <= 3 * y + 1e-3 * r.scale);
}

static void load_model(int load_in_4bit, llama_model *m) {
    gguf_file *f = NULL;
    qerr e = {{0}};
    double t0 = clock_now_sec();
    if (gguf_open(MODEL_PATH, &f, &e)) fail_msg("%s", e.msg);
    if (llama_load_gguf(f, load_in_4bit, 1, g_T, m, &e)) fail_msg("%s", e.msg);
    gguf_close(f);
    g_V = m->hp.vocab;
    print_message("[ref] real: loaded the %s base in %.1fs\n", load_in_4bit ? "NF4" : "bf16", clock_now_sec() - t0);
}

static void test_bf16_base(void **state) {
    (void)state;
    llama_model m;
    load_model(0, &m);
    float *q32 = qlora_logits(&m, 0);
    check_tight("bf16 base, fp32 compute", q32, "f32_bf16w");
    free(q32);
    float *q16 = qlora_logits(&m, 1);
    check_bf16("bf16 base, bf16 compute", q16, "f32", "bf16", "f32");
    free(q16);
    llama_free(&m);
}

static void test_nf4_base(void **state) {
    (void)state;
    llama_model m;
    load_model(1, &m);
    float *q32 = qlora_logits(&m, 0);
    check_tight("NF4, fp32 compute", q32, "nf4_f32");
    free(q32);
    float *q16 = qlora_logits(&m, 1);
    check_bf16("NF4, bf16 compute", q16, "nf4_bf16", "nf4_bf16", "nf4_f32");
    free(q16);
    llama_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_base),
        cmocka_unit_test(test_nf4_base),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
