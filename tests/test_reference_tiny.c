/* tests/test_reference_tiny.c — a whole training step of a tiny Llama against
 * transformers + PEFT + torch.optim.AdamW (fixture tests/fixtures/ref_tiny.qref.gz,
 * scripts/make_reference.py make_tiny).
 *
 * The reference: LlamaForCausalLM (2 layers, d 64, 4 heads / 2 kv heads of 16,
 * d_ff 128, vocab 96, rms_eps 1e-6, rope_theta 500, tied embeddings, eager
 * attention, fp32) with PEFT LoRA r 4, alpha 8 (scaling 2), dropout 0 on all
 * seven linears, B drawn non-zero so every gradient is informative; a batch
 * of 2 × 16 tokens, row 1 at positions 5..20, 7 of the 30 shifted labels
 * -100 (HF shifts labels inside its loss; here targets[t] = labels[t+1] and
 * the last position is ignored; HF's mean over 23 tokens = scale 1/23). The
 * fixture holds the weights, the batch, logits, loss, every LoRA gradient,
 * the same under torch.autocast(bfloat16), and 10 AdamW steps (lr 1e-2,
 * betas 0.9/0.999, eps 1e-8, weight decay 0.01, clip_grad_norm_ 1.0: active
 * in the first 7 steps, inactive after) as losses, pre-clip norms and the
 * final adapter. qlora builds the same model with FROZEN_F32 weights.
 *
 * ---- Error model and tolerances (fixed before the first run, not tuned) ----
 *
 * fp32 mode (ctx.bf16 = 0). Both sides compute every value in fp32 (u = 2^-24
 * ≈ 6e-8) but sum in different orders (oneDNN vs PyTorch's CPU GEMM), qlora
 * accumulates RMSNorm sums of squares and the CE loss in double and uses a
 * polynomial expf (relative error 2e-7). A dot product of K ≤ 128 terms then
 * differs by ≲ sqrt(K)·u ≈ 1e-6 relative to the magnitude of its terms; the
 * forward pass chains about 10 such ops per layer plus softmax (a condition
 * number of a few), so the logits may differ by ~1e-5 of their magnitude.
 *   logits:   max|Δ| ≤ 1e-4 · max|logit_ref|              (10× margin)
 *   loss:     |Δ| ≤ 1e-5 · loss_ref
 *   grads:    for every one of the 28 LoRA tensors, max|Δ| ≤ 1e-4 · max|g_ref|
 *             of that tensor (backward is about twice as long as forward;
 *             elementwise errors are measured against the tensor's scale
 *             because single elements can be sums that cancel to ~0)
 *   checkpointing on vs off (same code, recomputed from the same block
 *             input): identical up to max|Δ| ≤ 1e-6 · max|g| per tensor, and
 *             each within the tolerance above of the reference.
 *   AdamW:    per-step losses |Δ| ≤ 1e-4 · loss_ref + 1e-6 (grads agree to
 *             ~1e-6; Adam normalizes updates, so relative update errors stay
 *             ~1e-5 per step and add up over 10 steps); pre-clip norms
 *             ≤ 1e-4 relative; final adapter ||Δ||₂ ≤ 1e-3 · ||p_ref − p_0||₂
 *             (a single Adam sign flip on an element whose gradient is ~0
 *             would show as one outlier, printed).
 *
 * bf16 mode (ctx.bf16 = 1): every GEMM operand rounded to bf16 (u = 2^-9 ≈
 * 2e-3 relative), fp32 accumulation and fp32 everything else. A product of
 * two rounded operands carries ~2u relative error; about 20 GEMMs in series
 * (with the attention probabilities and values also rounded) give errors of
 * order sqrt(20)·2u ≈ 2e-2 relative to the typical activation, logits
 * included.
 *   logits:   max|Δ| ≤ 5e-2 · max|logit_ref|
 *   loss:     |Δ| ≤ 1e-2 · loss_ref (an average over 23 tokens)
 *   grads:    per tensor ||Δ||₂ ≤ 5e-2 · ||g_ref||₂
 * and, so that "bf16 tolerance" is not a blank cheque, each metric must also
 * be within 3× (+ a floor of 1e-3 of the scale) of the same metric for
 * torch.autocast(bfloat16) on the same model against the same fp32
 * reference: qlora's bf16 must be no worse than PyTorch's own bf16 by more
 * than a small factor. (autocast also rounds GEMM outputs to bf16; qlora does
 * not, so qlora is expected to be the more accurate of the two.)
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "autograd/gemm.h"
#include "model/llama.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "optim/grad_scaler.h"
#include "core/bf16.h"
#include "autograd/backend.h"
#include "tests/ref_fixture.h"
#include "tests/ref_metrics.h"

#define TINY_FIXTURE "tests/fixtures/ref_tiny.qref.gz"
/* the same model and batch with PEFT modules_to_save = [embed_tokens, lm_head] (make_tiny mts=True):
 * two independent fp32 copies of the tied table, trained with the adapters; same tolerances, the
 * copies being two more tensors of the table */
#define TINY_MTS_FIXTURE "tests/fixtures/ref_tiny_mts.qref.gz"

typedef struct tiny {
    ref_file rf;
    llama_model m;
    lora_set ls;
    const float *p0;     /* (n_params) initial adapter, qlora's flat layout */
    int32_t *targets;    /* (B*T) shifted labels */
    int32_t *seq_ids;    /* (B*T) all 0 */
    llama_batch b;
    int64_t n_tok;
    double lr, wd, beta1, beta2, adam_eps, max_norm;
    int steps;
    char names[LLAMA_N_LINEAR * 64][48]; /* tensor names in flat order */
    int n_tensors;
    int64_t t_off[LLAMA_N_LINEAR * 64], t_len[LLAMA_N_LINEAR * 64];
} tiny;

static tiny g_t;
static int g_mts; /* the group under way: 0 plain LoRA, 1 modules_to_save */

static double jnum(const cJSON *o, const char *k) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!cJSON_IsNumber(it)) fail_msg("fixture config: %s missing", k);
    return it->valuedouble;
}

static int setup(void **state) {
    (void)state;
    tiny *t = &g_t;
    memset(t, 0, sizeof *t);
    ref_open_or_fail(g_mts ? TINY_MTS_FIXTURE : TINY_FIXTURE, &t->rf);
    char *cfg_s = ref_str(&t->rf, "config");
    cJSON *cfg = cJSON_Parse(cfg_s);
    assert_non_null(cfg);
    llama_hparams *hp = &t->m.hp;
    *hp = (llama_hparams){.n_layer = (int)jnum(cfg, "layers"), .d_model = (int)jnum(cfg, "d"),
                          .n_head = (int)jnum(cfg, "heads"), .n_kv_head = (int)jnum(cfg, "kv_heads"),
                          .head_dim = (int)jnum(cfg, "head_dim"), .d_ff = (int)jnum(cfg, "ff"),
                          .vocab = (int)jnum(cfg, "vocab"), .context_length = 64,
                          .rope_theta = (float)jnum(cfg, "theta"), .rms_eps = (float)jnum(cfg, "eps"),
                          .tied_embeddings = 1};
    int r = (int)jnum(cfg, "r");
    float alpha = (float)jnum(cfg, "alpha");
    int B = (int)jnum(cfg, "B"), T = (int)jnum(cfg, "T");
    t->lr = jnum(cfg, "lr");
    t->wd = jnum(cfg, "wd");
    t->adam_eps = jnum(cfg, "adam_eps");
    t->max_norm = jnum(cfg, "max_norm");
    t->steps = (int)jnum(cfg, "steps");
    const cJSON *betas = cJSON_GetObjectItemCaseSensitive(cfg, "betas");
    t->beta1 = cJSON_GetArrayItem(betas, 0)->valuedouble;
    t->beta2 = cJSON_GetArrayItem(betas, 1)->valuedouble;
    cJSON_Delete(cfg);
    free(cfg_s);

    int64_t D = hp->d_model, F = hp->d_ff, V = hp->vocab;
    int64_t qd = (int64_t)hp->n_head * hp->head_dim, kd = (int64_t)hp->n_kv_head * hp->head_dim;
    int64_t outs[LLAMA_N_LINEAR] = {qd, kd, kd, D, F, F, D}, ins[LLAMA_N_LINEAR] = {D, D, D, qd, D, D, F};
    const float *emb = ref_f32(&t->rf, "w.embed", V * D);
    t->m.embed = (frozen_weight){.out = V, .in = D, .kind = FROZEN_F32, .w_f32 = emb};
    t->m.lm_head = t->m.embed; /* tied, as SmolLM2 */
    t->m.out_norm = (float *)ref_f32(&t->rf, "w.norm", D);
    t->m.layers = calloc((size_t)hp->n_layer, sizeof *t->m.layers);
    char key[96];
    for (int l = 0; l < hp->n_layer; l++) {
        llama_layer *L = &t->m.layers[l];
        snprintf(key, sizeof key, "w.l%d.attn_norm", l);
        L->attn_norm = (float *)ref_f32(&t->rf, key, D);
        snprintf(key, sizeof key, "w.l%d.ffn_norm", l);
        L->ffn_norm = (float *)ref_f32(&t->rf, key, D);
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            snprintf(key, sizeof key, "w.l%d.%s", l, llama_linears[k].peft);
            L->lin[k] = (frozen_weight){.out = outs[k], .in = ins[k], .kind = FROZEN_F32,
                                        .w_f32 = ref_f32(&t->rf, key, outs[k] * ins[k])};
        }
    }
    qerr e = {{0}};
    if (llama_rope_init(&t->m.rope, hp, 64, &e)) fail_msg("%s", e.msg);
    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
    const int save[LORA_N_SAVE] = {g_mts, g_mts};
    if (lora_set_init_saved(&t->ls, NULL, &t->m, r, alpha, 0.0f, 0, target, save, 1, &e)) fail_msg("%s", e.msg);
    if (g_mts) /* the copies start as the base table, as PEFT's deep copies */
        for (int k = 0; k < LORA_N_SAVE; k++)
            assert_memory_equal(t->ls.params + t->ls.save_offset[k], emb, (size_t)(V * D) * sizeof(float));
    assert_true(fabsf(t->ls.scaling - 2.0f) == 0.0f);
    t->p0 = ref_f32(&t->rf, "lora_params", t->ls.n_params);
    memcpy(t->ls.params, t->p0, (size_t)t->ls.n_params * sizeof(float));
    /* flat tensor table: per layer, per module, A then B (PEFT lora_A (r, in), lora_B (out, r)) */
    char *names = ref_str(&t->rf, "lora_names");
    char *save_p = NULL, *nm = strtok_r(names, ",", &save_p);
    for (int l = 0; l < hp->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            int64_t off = t->ls.offset[l * LLAMA_N_LINEAR + k];
            for (int ab = 0; ab < 2; ab++) {
                assert_non_null(nm);
                snprintf(t->names[t->n_tensors], sizeof t->names[0], "%s", nm);
                t->t_off[t->n_tensors] = ab ? off + (int64_t)r * ins[k] : off;
                t->t_len[t->n_tensors] = ab ? outs[k] * r : (int64_t)r * ins[k];
                t->n_tensors++;
                nm = strtok_r(NULL, ",", &save_p);
            }
        }
    for (int k = 0; g_mts && k < LORA_N_SAVE; k++) {
        assert_non_null(nm);
        assert_string_equal(nm, k == LORA_SAVE_EMBED ? "embed_tokens" : "lm_head");
        snprintf(t->names[t->n_tensors], sizeof t->names[0], "%s", nm);
        t->t_off[t->n_tensors] = t->ls.save_offset[k];
        t->t_len[t->n_tensors] = V * D;
        t->n_tensors++;
        nm = strtok_r(NULL, ",", &save_p);
    }
    assert_null(nm);
    free(names);

    const int32_t *ids = ref_i32(&t->rf, "input_ids", (int64_t)B * T);
    const int32_t *labels = ref_i32(&t->rf, "labels", (int64_t)B * T);
    const int32_t *pos = ref_i32(&t->rf, "position_ids", (int64_t)B * T);
    t->targets = malloc((size_t)B * T * sizeof(int32_t));
    t->seq_ids = calloc((size_t)B * T, sizeof(int32_t));
    t->n_tok = 0;
    for (int i = 0; i < B; i++)
        for (int j = 0; j < T; j++) {
            t->targets[i * T + j] = j + 1 < T ? labels[i * T + j + 1] : -100; /* HF's shift */
            t->n_tok += t->targets[i * T + j] != -100;
        }
    assert_int_equal(t->n_tok, (int64_t)ref_scalar(&t->rf, "n_tokens"));
    t->b = (llama_batch){.B = B, .T = T, .input_ids = ids, .targets = t->targets, .position_ids = pos,
                         .seq_ids = t->seq_ids};
    return 0;
}

static int teardown(void **state) {
    (void)state;
    tiny *t = &g_t;
    lora_set_free(&t->ls);
    rope_table_free(&t->m.rope);
    free(t->m.layers);
    free(t->targets);
    free(t->seq_ids);
    ref_close(&t->rf);
    gemm_shutdown();
    return 0;
}

/* ---- qlora runs ---- */

static void qlora_logits(tiny *t, int use_bf16, float *out) {
    ag_ctx ctx;
    qerr e = {{0}};
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    ctx.bf16 = use_bf16;
    ctx.training = 0;
    tensor *h = llama_forward_hidden(&ctx, &t->m, &t->ls, &t->b);
    llama_logits_rows_ls(&ctx, &t->m, &t->ls, h, 0, (int64_t)t->b.B * t->b.T, out);
    ag_ctx_free(&ctx);
}

/* Loss (mean over target tokens, double) and LoRA grads into ls.grads; fp16 mode (ctx.fp16) when fp16, with
 * the loss's gradient multiplied by loss_scale (GradScaler.scale(loss)), the gradients left scaled. */
static double qlora_loss_grads_mode(tiny *t, int use_bf16, int fp16, float loss_scale, int ck) {
    ag_ctx ctx;
    qerr e = {{0}};
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    ctx.bf16 = use_bf16;
    ctx.fp16 = fp16;
    ctx.training = 1;
    ctx.seed = 5;
    memset(t->ls.grads, 0, (size_t)t->ls.n_params * sizeof(float));
    double lsum = 0;
    int64_t nt = 0;
    tensor *L = llama_forward_loss(&ctx, &t->m, &t->ls, &t->b, 1.0f / (float)t->n_tok * loss_scale, ck, &lsum, &nt);
    assert_int_equal(nt, t->n_tok);
    ag_backward(&ctx, L);
    ag_ctx_free(&ctx);
    return lsum / (double)nt;
}

/* Loss (mean over target tokens, double) and LoRA grads into ls.grads. */
static double qlora_loss_grads(tiny *t, int use_bf16, int ck) {
    ag_ctx ctx;
    qerr e = {{0}};
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    ctx.bf16 = use_bf16;
    ctx.training = 1;
    ctx.seed = 5;
    memset(t->ls.grads, 0, (size_t)t->ls.n_params * sizeof(float));
    double lsum = 0;
    int64_t nt = 0;
    tensor *L = llama_forward_loss(&ctx, &t->m, &t->ls, &t->b, 1.0f / (float)t->n_tok, ck, &lsum, &nt);
    assert_int_equal(nt, t->n_tok);
    ag_backward(&ctx, L);
    ag_ctx_free(&ctx);
    return lsum / (double)nt;
}

/* ---- metrics ---- */

/* Worst over the LoRA tensors of max|Δ| / max|ref| (rel_l2 = 0) or ||Δ|| / ||ref|| (rel_l2 = 1). */
static double worst_tensor_err(const tiny *t, const float *ref, const float *got, int rel_l2, int *worst_idx) {
    double w = 0;
    for (int i = 0; i < t->n_tensors; i++) {
        const float *a = ref + t->t_off[i], *b = got + t->t_off[i];
        int64_t n = t->t_len[i];
        double err = rel_l2 ? ref_l2_diff(a, b, n) / ref_l2(a, n) : ref_max_abs_diff(a, b, n) / ref_max_abs(a, n);
        if (err > w) {
            w = err;
            if (worst_idx) *worst_idx = i;
        }
    }
    return w;
}

/* ---- fp32 ---- */

static void test_fp32_logits(void **state) {
    (void)state;
    tiny *t = &g_t;
    int64_t n = (int64_t)t->b.B * t->b.T * t->m.hp.vocab;
    const float *ref = ref_f32(&t->rf, "logits", n);
    float *got = malloc((size_t)n * sizeof(float));
    qlora_logits(t, 0, got);
    double scale = ref_max_abs(ref, n), err = ref_max_abs_diff(ref, got, n);
    print_message("[ref] tiny fp32 logits: max|Δ| %.3e, max|logit| %.3f, relative %.3e (tol 1e-4)\n", err, scale,
                  err / scale);
    assert_true(err <= 1e-4 * scale);
    free(got);
}

static void test_fp32_loss_grads_checkpointing(void **state) {
    (void)state;
    tiny *t = &g_t;
    int64_t np = t->ls.n_params;
    const float *gref = ref_f32(&t->rf, "grads", np);
    double lref = ref_scalar(&t->rf, "loss");
    float *g0 = malloc((size_t)np * sizeof(float));
    double loss[2];
    for (int ck = 0; ck < 2; ck++) {
        loss[ck] = qlora_loss_grads(t, 0, ck);
        int wi = 0;
        double gerr = worst_tensor_err(t, gref, t->ls.grads, 0, &wi);
        print_message("[ref] tiny fp32 checkpointing %s: loss %.7f vs HF %.7f (|Δ| %.2e, tol %.2e); worst grad "
                      "tensor %s max|Δ|/max|g| %.3e (tol 1e-4); ||g|| %.4f vs %.4f\n",
                      ck ? "on " : "off", loss[ck], lref, fabs(loss[ck] - lref), 1e-5 * lref, t->names[wi], gerr,
                      ref_l2(t->ls.grads, np), ref_l2(gref, np));
        assert_true(fabs(loss[ck] - lref) <= 1e-5 * lref);
        assert_true(gerr <= 1e-4);
        for (int i = 0; i < t->n_tensors; i++) assert_true(ref_max_abs(t->ls.grads + t->t_off[i], t->t_len[i]) > 0);
        if (ck == 0) {
            memcpy(g0, t->ls.grads, (size_t)np * sizeof(float));
        } else {
            double d = worst_tensor_err(t, g0, t->ls.grads, 0, NULL);
            print_message("[ref] tiny fp32 checkpointing on vs off: worst max|Δ|/max|g| %.3e (tol 1e-6), loss |Δ| "
                          "%.2e\n", d, fabs(loss[1] - loss[0]));
            assert_true(d <= 1e-6);
        }
    }
    free(g0);
}

static void test_fp32_adamw_10_steps(void **state) {
    (void)state;
    tiny *t = &g_t;
    int64_t np = t->ls.n_params;
    const double *lref = ref_f64(&t->rf, "adamw.losses", t->steps + 1);
    const double *nref = ref_f64(&t->rf, "adamw.grad_norms", t->steps);
    const float *pref = ref_f32(&t->rf, "adamw.final_params", np);
    adamw_config cfg = {.lr = t->lr, .beta1 = t->beta1, .beta2 = t->beta2, .eps = t->adam_eps, .weight_decay = t->wd};
    adamw_state st;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&st, np, &e), 0);
    memcpy(t->ls.params, t->p0, (size_t)np * sizeof(float));
    double worst_l = 0, worst_n = 0;
    for (int s = 0; s <= t->steps; s++) {
        double loss;
        if (s < t->steps) {
            loss = qlora_loss_grads(t, 0, 1); /* the trainer's default: checkpointing on */
            float norm = clip_grad_norm(t->ls.grads, np, (float)t->max_norm);
            double nrel = fabs(norm - nref[s]) / nref[s];
            worst_n = fmax(worst_n, nrel);
            adamw_step(&st, &cfg, t->lr, t->ls.params, t->ls.grads, NULL);
            print_message("[ref] tiny adamw step %2d: loss %.6f vs %.6f, pre-clip norm %.5f vs %.5f\n", s + 1, loss,
                          lref[s], norm, nref[s]);
        } else {
            ag_ctx ctx;
            assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
            ctx.bf16 = 0;
            ctx.recording = 0;
            double lsum;
            llama_forward_loss(&ctx, &t->m, &t->ls, &t->b, 1.0f, 0, &lsum, NULL);
            ag_ctx_free(&ctx);
            loss = lsum / (double)t->n_tok;
            print_message("[ref] tiny after %d steps: loss %.6f vs %.6f\n", t->steps, loss, lref[s]);
        }
        double d = fabs(loss - lref[s]);
        worst_l = fmax(worst_l, d / lref[s]);
        assert_true(d <= 1e-4 * lref[s] + 1e-6);
    }
    assert_true(worst_n <= 1e-4);
    /* final adapter */
    float *delta_ref = malloc((size_t)np * sizeof(float));
    for (int64_t i = 0; i < np; i++) delta_ref[i] = pref[i] - t->p0[i];
    double num = ref_l2_diff(pref, t->ls.params, np), den = ref_l2(delta_ref, np);
    int64_t worst_i = 0;
    double worst_e = 0;
    for (int64_t i = 0; i < np; i++) {
        double d = fabs((double)pref[i] - t->ls.params[i]);
        if (d > worst_e) {
            worst_e = d;
            worst_i = i;
        }
    }
    print_message("[ref] tiny adamw: worst loss rel err %.3e (tol 1e-4), worst norm rel err %.3e; final adapter "
                  "||Δ|| / ||p_ref - p_0|| = %.3e (tol 1e-3), worst element %lld: %.3e (ref %.6f)\n",
                  worst_l, worst_n, num / den, (long long)worst_i, worst_e, (double)pref[worst_i]);
    assert_true(num <= 1e-3 * den);
    free(delta_ref);
    adamw_state_free(&st);
    memcpy(t->ls.params, t->p0, (size_t)np * sizeof(float));
}

/* ---- bf16 ---- */

static void test_bf16_within_bf16_error(void **state) {
    (void)state;
    tiny *t = &g_t;
    int64_t n = (int64_t)t->b.B * t->b.T * t->m.hp.vocab, np = t->ls.n_params;
    memcpy(t->ls.params, t->p0, (size_t)np * sizeof(float));
    const float *lref = ref_f32(&t->rf, "logits", n), *lbf = ref_f32(&t->rf, "bf16.logits", n);
    const float *gref = ref_f32(&t->rf, "grads", np), *gbf = ref_f32(&t->rf, "bf16.grads", np);
    double loss_ref = ref_scalar(&t->rf, "loss"), loss_torch_bf = ref_scalar(&t->rf, "bf16.loss");
    float *got = malloc((size_t)n * sizeof(float));
    qlora_logits(t, 1, got);
    double scale = ref_max_abs(lref, n);
    double e_q = ref_max_abs_diff(lref, got, n) / scale, e_t = ref_max_abs_diff(lref, lbf, n) / scale;
    print_message("[ref] tiny bf16 logits: max|Δ|/max|logit| qlora %.3e, torch autocast %.3e (tol 5e-2 and "
                  "3x torch + 1e-3)\n", e_q, e_t);
    assert_true(e_q <= 5e-2);
    assert_true(e_q <= 3 * e_t + 1e-3);
    for (int ck = 0; ck < 2; ck++) {
        double loss = qlora_loss_grads(t, 1, ck);
        double le_q = fabs(loss - loss_ref) / loss_ref, le_t = fabs(loss_torch_bf - loss_ref) / loss_ref;
        int wi = 0, wt = 0;
        double ge_q = worst_tensor_err(t, gref, t->ls.grads, 1, &wi);
        double ge_t = worst_tensor_err(t, gref, gbf, 1, &wt);
        print_message("[ref] tiny bf16 (checkpointing %s): loss rel err qlora %.3e, torch %.3e (tol 1e-2, 3x torch "
                      "+ 1e-3); worst grad tensor ||Δ||/||g|| qlora %.3e (%s), torch %.3e (%s) (tol 5e-2, 3x torch "
                      "+ 1e-3)\n", ck ? "on" : "off", le_q, le_t, ge_q, t->names[wi], ge_t, t->names[wt]);
        assert_true(le_q <= 1e-2);
        assert_true(le_q <= 3 * le_t + 1e-3);
        assert_true(ge_q <= 5e-2);
        assert_true(ge_q <= 3 * ge_t + 1e-3);
    }
    free(got);
}

/* ---- fp16 (axolotl's fp16: true; fixture tests/fixtures/ref_fp16.qref.gz, scripts/make_fp16_reference.py) ----
 *
 * fp16 mode (ctx.bf16 = 0, ctx.fp16 = 1): every GEMM operand rounded to fp16 (u = 2^-11 ≈ 4.9e-4), fp32
 * accumulation and fp32 activations; backward's GEMM outputs (each linear's grad input, the adapters'
 * gradients, attention's dP/dq/dk/dv, the LM head's dh) rounded to fp16 as autocast makes them; the loss gradient multiplied by GradScaler's scale S and the
 * gradients multiplied by 1/S afterwards (exact: S is a power of 2). The reference is the same model under
 * torch.autocast("cpu", float16) + torch.amp.GradScaler, which also rounds the forward GEMM outputs to fp16
 * (qlora keeps activations fp32). The two therefore differ by about one extra rounding per GEMM (~u) plus the different
 * roundings that follow from it: about 20 GEMMs in series give ~sqrt(20)·2u ≈ 4.4e-3 relative to the typical
 * activation. Tolerances (fixed before the first run, 2-5x that estimate):
 *   logits: max|Δ| ≤ 1e-2 · max|logit|;  loss: |Δ| ≤ 2e-3 · loss;  grads: per tensor ||Δ||₂ ≤ 2e-2 · ||g||₂
 * and, as in the bf16 test, each must be within 3× (+ 1e-3) of torch's own fp16 error against the fp32
 * reference (ref_tiny's logits / loss / grads): qlora's fp16 no worse than PyTorch's.
 * GradScaler (optim/grad_scaler.h, trainer/step.c's order: scale the loss, unscale, clip, skip on a non-finite
 * norm): over 10 AdamW steps from init_scale 2^16 and over 20 steps from 2^24 with growth_interval 3 (7
 * overflows backing off to 2^17, growth every 3 clean steps, one more overflow at 2^19), the scale used at
 * each step and which steps were skipped must equal torch's exactly — an overflow is decided by whether
 * S · (the largest gradient-path value) exceeds 65504, and the two sides' largest values differ by ~1e-2
 * relative, far from the factor 2 between neighbouring scales. Losses |Δ| ≤ 5e-3 · loss + 1e-4, pre-clip norms
 * ≤ 2e-2 relative, final adapter ||p − p_ref|| ≤ 5e-2 · ||p_ref − p_0|| (Adam normalizes each update, so
 * the gradients' ~1e-2 relative differences become ~1e-2 relative update differences, adding over 10 steps). */
#define FP16_FIXTURE "tests/fixtures/ref_fp16.qref.gz"

static void fp16_logits(tiny *t, float *out) {
    ag_ctx ctx;
    qerr e = {{0}};
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    ctx.bf16 = 0;
    ctx.fp16 = 1;
    ctx.training = 0;
    tensor *h = llama_forward_hidden(&ctx, &t->m, &t->ls, &t->b);
    /* the LM head's operands as op_lm_head_ce's fp16 mode rounds them: h rows and the head, fp16 values */
    int64_t N = (int64_t)t->b.B * t->b.T, D = t->m.hp.d_model, V = t->m.hp.vocab;
    float *hr = malloc((size_t)(N * D) * sizeof(float)), *wr = malloc((size_t)(V * D) * sizeof(float));
    for (int64_t i = 0; i < N * D; i++) hr[i] = f32_round_f16(((const float *)h->data)[i]);
    for (int64_t i = 0; i < V * D; i++) wr[i] = f32_round_f16(t->m.lm_head.w_f32[i]);
    gemm(0, 1, N, V, D, 1.0f, hr, D, wr, D, 0.0f, out, V, GEMM_F32);
    free(hr);
    free(wr);
    ag_ctx_free(&ctx);
}

static void test_fp16_loss_grads(void **state) {
    (void)state;
    tiny *t = &g_t;
    ref_file rf;
    ref_open_or_fail(FP16_FIXTURE, &rf);
    int64_t n = (int64_t)t->b.B * t->b.T * t->m.hp.vocab, np = t->ls.n_params;
    memcpy(t->ls.params, t->p0, (size_t)np * sizeof(float));
    const float *l32 = ref_f32(&t->rf, "logits", n), *l16 = ref_f32(&rf, "fp16.logits", n);
    const float *g32 = ref_f32(&t->rf, "grads", np), *g16 = ref_f32(&rf, "fp16.grads", np);
    double loss32 = ref_scalar(&t->rf, "loss"), loss16 = ref_scalar(&rf, "fp16.loss");
    float S = (float)ref_scalar(&rf, "fp16.init_scale");
    assert_true(S == 65536.0f);
    float *got = malloc((size_t)n * sizeof(float));
    fp16_logits(t, got);
    double sc = ref_max_abs(l16, n);
    double e_q = ref_max_abs_diff(l16, got, n) / sc, e_q32 = ref_max_abs_diff(l32, got, n) / sc,
           e_t32 = ref_max_abs_diff(l32, l16, n) / sc;
    print_message("[ref] tiny fp16 logits: max|Δ|/max|logit| vs torch fp16 %.3e (tol 1e-2); vs fp32: qlora %.3e, "
                  "torch %.3e (tol 3x + 1e-3)\n", e_q, e_q32, e_t32);
    assert_true(e_q <= 1e-2);
    assert_true(e_q32 <= 3 * e_t32 + 1e-3);
    for (int ck = 0; ck < 2; ck++) {
        double loss = qlora_loss_grads_mode(t, 0, 1, S, ck);
        for (int64_t i = 0; i < np; i++) t->ls.grads[i] *= 1.0f / S; /* unscale_ */
        int wi = 0, wq = 0, wt = 0;
        double ge = worst_tensor_err(t, g16, t->ls.grads, 1, &wi);
        double ge_q32 = worst_tensor_err(t, g32, t->ls.grads, 1, &wq), ge_t32 = worst_tensor_err(t, g32, g16, 1, &wt);
        double le = fabs(loss - loss16) / loss16, le_q32 = fabs(loss - loss32) / loss32,
               le_t32 = fabs(loss16 - loss32) / loss32;
        print_message("[ref] tiny fp16 (checkpointing %s): loss %.6f vs torch fp16 %.6f, rel %.3e (tol 2e-3); vs "
                      "fp32 qlora %.3e torch %.3e; worst grad tensor ||Δ||/||g|| vs torch fp16 %.3e (%s, tol 2e-2); "
                      "vs fp32 qlora %.3e (%s) torch %.3e (%s)\n",
                      ck ? "on" : "off", loss, loss16, le, le_q32, le_t32, ge, t->names[wi], ge_q32, t->names[wq],
                      ge_t32, t->names[wt]);
        assert_true(le <= 2e-3);
        assert_true(le_q32 <= 3 * le_t32 + 1e-3);
        assert_true(ge <= 2e-2);
        assert_true(ge_q32 <= 3 * ge_t32 + 1e-3);
    }
    free(got);
    ref_close(&rf);
}

/* The trainer's step (trainer/step.c train_step) on the tiny model: scale, backward, unscale, clip, skip or
 * AdamW, update the scale; against torch's GradScaler loop. */
static void fp16_train_case(const char *prefix, double init_scale, int64_t growth_interval, int steps) {
    tiny *t = &g_t;
    ref_file rf;
    ref_open_or_fail(FP16_FIXTURE, &rf);
    int64_t np = t->ls.n_params;
    char key[64];
    snprintf(key, sizeof key, "%s.losses", prefix);
    const double *lref = ref_f64(&rf, key, steps + 1);
    snprintf(key, sizeof key, "%s.grad_norms", prefix);
    const double *nref = ref_f64(&rf, key, steps);
    snprintf(key, sizeof key, "%s.scales", prefix);
    const double *sref = ref_f64(&rf, key, steps);
    snprintf(key, sizeof key, "%s.skipped", prefix);
    const int32_t *kref = ref_i32(&rf, key, steps);
    snprintf(key, sizeof key, "%s.final_params", prefix);
    const float *pref = ref_f32(&rf, key, np);
    snprintf(key, sizeof key, "%s.final_scale", prefix);
    double final_scale = ref_scalar(&rf, key);
    adamw_config cfg = {.lr = t->lr, .beta1 = t->beta1, .beta2 = t->beta2, .eps = t->adam_eps, .weight_decay = t->wd};
    adamw_state st;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&st, np, &e), 0);
    memcpy(t->ls.params, t->p0, (size_t)np * sizeof(float));
    grad_scaler gs;
    grad_scaler_init(&gs, init_scale);
    gs.growth_interval = growth_interval;
    double worst_l = 0, worst_n = 0;
    int n_skipped = 0;
    for (int s = 0; s <= steps; s++) {
        double loss;
        if (s < steps) {
            const double used = gs.scale;
            loss = qlora_loss_grads_mode(t, 0, 1, (float)used, 1);
            grad_scaler_unscale(&gs, ag_backend_default(), t->ls.grads, np);
            float norm = clip_grad_norm(t->ls.grads, np, (float)t->max_norm);
            int skip = grad_scaler_update(&gs, !isfinite(norm));
            if (!skip) adamw_step(&st, &cfg, t->lr, t->ls.params, t->ls.grads, NULL);
            n_skipped += skip;
            print_message("[ref] tiny %s step %2d: scale %g vs %g, skipped %d vs %d, loss %.6f vs %.6f, pre-clip norm "
                          "%.5f vs %.5f\n", prefix, s + 1, used, sref[s], skip, kref[s], loss, lref[s], norm, nref[s]);
            assert_true(used == sref[s]);
            assert_int_equal(skip, kref[s]);
            if (!skip) {
                double nrel = fabs(norm - nref[s]) / nref[s];
                worst_n = fmax(worst_n, nrel);
                assert_true(nrel <= 2e-2);
            }
        } else {
            ag_ctx ctx;
            assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
            ctx.bf16 = 0;
            ctx.fp16 = 1;
            ctx.recording = 0;
            double lsum;
            llama_forward_loss(&ctx, &t->m, &t->ls, &t->b, 1.0f, 0, &lsum, NULL);
            ag_ctx_free(&ctx);
            loss = lsum / (double)t->n_tok;
            print_message("[ref] tiny %s after %d steps: loss %.6f vs %.6f\n", prefix, steps, loss, lref[s]);
        }
        double d = fabs(loss - lref[s]);
        worst_l = fmax(worst_l, d / lref[s]);
        assert_true(d <= 5e-3 * lref[s] + 1e-4);
    }
    assert_true(gs.scale == final_scale);
    float *delta_ref = malloc((size_t)np * sizeof(float));
    for (int64_t i = 0; i < np; i++) delta_ref[i] = pref[i] - t->p0[i];
    double num = ref_l2_diff(pref, t->ls.params, np), den = ref_l2(delta_ref, np);
    print_message("[ref] tiny %s: %d of %d steps skipped as torch's, final scale %g; worst loss rel err %.3e (tol "
                  "5e-3), worst norm rel err %.3e (tol 2e-2); final adapter ||Δ|| / ||p_ref - p_0|| = %.3e (tol "
                  "5e-2)\n", prefix, n_skipped, steps, gs.scale, worst_l, worst_n, num / den);
    assert_true(num <= 5e-2 * den);
    free(delta_ref);
    adamw_state_free(&st);
    memcpy(t->ls.params, t->p0, (size_t)np * sizeof(float));
    ref_close(&rf);
}

static void test_fp16_gradscaler_adamw(void **state) {
    (void)state;
    fp16_train_case("amp", 65536.0, 2000, g_t.steps);
}

static void test_fp16_gradscaler_overflow(void **state) {
    (void)state;
    ref_file rf;
    ref_open_or_fail(FP16_FIXTURE, &rf);
    int64_t gi = (int64_t)ref_scalar(&rf, "ovf.growth_interval"), steps = (int64_t)ref_scalar(&rf, "ovf.steps");
    ref_close(&rf);
    fp16_train_case("ovf", 16777216.0, gi, (int)steps);
}

int main(void) {
    const struct CMUnitTest fp16_tests[] = {
        cmocka_unit_test(test_fp16_loss_grads),
        cmocka_unit_test(test_fp16_gradscaler_adamw),
        cmocka_unit_test(test_fp16_gradscaler_overflow),
    };
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp32_logits),
        cmocka_unit_test(test_fp32_loss_grads_checkpointing),
        cmocka_unit_test(test_fp32_adamw_10_steps),
        cmocka_unit_test(test_bf16_within_bf16_error),
    };
    int rc = cmocka_run_group_tests_name("tiny", tests, setup, teardown);
    g_mts = 1;
    rc += cmocka_run_group_tests_name("tiny_modules_to_save", tests, setup, teardown);
    g_mts = 0;
    rc += cmocka_run_group_tests_name("tiny_fp16", fp16_tests, setup, teardown);
    return rc;
}
