/* tests/test_reference_family.c — the tiny model of each supported family
 * (fixtures tests/fixtures/ref_<family>.qref.gz, scripts/make_reference.py
 * make_family) loaded the way a user loads it, as an HF directory and as a
 * GGUF, against transformers + PEFT + torch.optim.AdamW.
 *
 * Each fixture holds the model as transformers' save_pretrained wrote it
 * (config.json, model.safetensors in bf16) and as llama.cpp's own
 * convert_hf_to_gguf.py wrote it (bf16 GGUF: Q/K rows permuted, rope_freqs
 * for llama3 scaling, its hyper-parameter keys); the weights were rounded to
 * bf16 before the reference ran in fp32, so `load_in_4bit: false` (bf16
 * linears) holds exactly the reference's weights and the comparison is the
 * fp32 one of tests/test_reference_tiny.c, with its tolerances and its error
 * model (see there): logits max|Δ| ≤ 1e-4·max|logit|, loss ≤ 1e-5 relative,
 * every LoRA gradient tensor max|Δ| ≤ 1e-4·max|g| (checkpointing on and off),
 * 10 AdamW steps: losses ≤ 1e-4 relative + 1e-6, pre-clip norms ≤ 1e-4
 * relative, final adapter ||Δ|| ≤ 1e-3·||p_ref − p_0||.
 *
 * Every family also: KV-cached generation (prefill + single tokens) of the
 * GGUF form against the reference logits (fp32, same tolerance), and the
 * exports of the GGUF form (merged HF directory, GGUF LoRA).
 *
 * Families:
 *   llama3  LlamaConfig with rope_scaling llama3 (factor 8, low 1, high 8,
 *           original_max_position_embeddings 128, head_dim 16, theta 500):
 *           two pairs unchanged, two smoothed, four divided by 8. Also: the
 *           RoPE frequencies of both forms against transformers' inv_freq, and
 *           a control: the same GGUF with the default RoPE (what qlora did
 *           before rope_freqs was read) must miss the reference logits by far.
 *   mistral MistralConfig (model_type "mistral", sliding_window 4096: longer
 *           than the rows, so full attention; the window is read).
 *   qwen2   Qwen2Config (q/k/v biases drawn at 0.5, tied embeddings, theta
 *           1e6); GGUF arch qwen2, whose Q/K rows are not permuted. Also: the
 *           model without its biases must miss the reference by far.
 *   phi3    Phi3Config (model_type "phi3": fused qkv_proj and gate_up_proj,
 *           one LoRA pair on each as PEFT puts it; untied; sliding_window 2047
 *           as Phi-3-mini-4k; theta 1e4); GGUF arch phi3 (attn_qkv, ffn_up
 *           holding gate then up, no Q/K permutation). Also: the fused weights
 *           of both forms are the same bits, and the model read as if the
 *           halves of gate_up_proj were (up, gate) misses the reference by far.
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

#include "autograd/gemm.h"
#include "core/file.h"
#include "model/base.h"
#include "model/hf.h"
#include "model/llama_infer.h"
#include "model/llama.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "tests/ref_fixture.h"
#include "tests/ref_metrics.h"
#include "tests/tmpdir.h"
#include "trainer/export.h"

#define MAX_POS 64

typedef struct family {
    const char *name;
    ref_file rf;
    hf_model *hf;
    gguf_file *gf;
    llama_model m_hf, m_gguf;
    lora_set ls;             /* on m_hf */
    const float *p0;
    int32_t *targets, *seq_ids;
    llama_batch b;
    int64_t n_tok;
    int n_tensors;
    int64_t t_off[LLAMA_N_LINEAR * 16], t_len[LLAMA_N_LINEAR * 16];
    int gguf_only;           /* gemma3: no HF form (refused); m_hf is a second load of the GGUF */
    char dir[64];            /* last: the compiler bounds its string by what follows it */
} family;

static family g_f;
static const char *g_name;

static void write_blob(const family *f, const char *rel, const char *array) {
    const ref_array *a = ref_find(&f->rf, array);
    if (!a || a->dtype != REF_U8) fail_msg("%s: array %s missing", f->name, array);
    char path[4096];
    qerr e = {{0}};
    snprintf(path, sizeof path, "%s/%s", f->dir, rel);
    if (file_write_atomic(path, a->data, (size_t)a->numel, &e)) fail_msg("%s", e.msg);
}

static int setup(void **state) {
    (void)state;
    family *f = &g_f;
    memset(f, 0, sizeof *f);
    f->name = g_name;
    char path[4096];
    snprintf(path, sizeof path, "tests/fixtures/ref_%s.qref.gz", f->name);
    ref_open_or_fail(path, &f->rf);
    snprintf(f->dir, sizeof f->dir, "/tmp/qlora_family_XXXXXX");
    if (!mkdtemp(f->dir)) fail_msg("mkdtemp");
    qerr e = {{0}};
    snprintf(path, sizeof path, "%.63s/hf", f->dir);
    if (file_mkdir_p(path, &e)) fail_msg("%s", e.msg);
    write_blob(f, "hf/config.json", "hf.config_json");
    write_blob(f, "hf/tokenizer.json", "hf.tokenizer_json");
    write_blob(f, "hf/tokenizer_config.json", "hf.tokenizer_config_json");
    write_blob(f, "hf/model.safetensors", "hf.safetensors");
    write_blob(f, "model.gguf", "gguf");
    f->gguf_only = !strcmp(f->name, "gemma3");
    if (f->gguf_only) { /* HF gemma3 directories are refused (model_type); the GGUF form is the model here */
        if (hf_model_open(path, &f->hf, &e) == 0) fail_msg("%s: the HF form was not refused", f->name);
        print_message("[ref] %s: HF form refused as it should be: %s\n", f->name, e.msg);
        f->hf = NULL;
    } else if (hf_model_open(path, &f->hf, &e) || hf_model_load(f->hf, 0, 0, MAX_POS, &f->m_hf, &e)) {
        fail_msg("%s: HF form: %s", f->name, e.msg);
    }
    snprintf(path, sizeof path, "%.63s/model.gguf", f->dir);
    if (gguf_open(path, &f->gf, &e) || llama_load_gguf(f->gf, 0, 0, MAX_POS, &f->m_gguf, &e))
        fail_msg("%s: GGUF form: %s", f->name, e.msg);
    if (f->gguf_only && llama_load_gguf(f->gf, 0, 0, MAX_POS, &f->m_hf, &e)) /* the LoRA set's model */
        fail_msg("%s: GGUF form: %s", f->name, e.msg);

    /* the LoRA set in qlora's flat order: per layer, per module, A (r, in) then B (out, r) */
    int r = 4;
    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
    if (lora_set_init(&f->ls, &f->m_hf, r, 8.0f, 0.0f, 0, target, 1, &e)) fail_msg("%s", e.msg);
    f->p0 = ref_f32(&f->rf, "lora_params", f->ls.n_params);
    memcpy(f->ls.params, f->p0, (size_t)f->ls.n_params * sizeof(float));
    const llama_hparams *hp = &f->m_hf.hp;
    for (int l = 0; l < hp->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            int64_t out, in, off = f->ls.offset[l * LLAMA_N_LINEAR + k];
            if (!llama_linear_present(hp, k)) { /* Phi-3: k, v, up are inside the fused qkv_proj, gate_up_proj */
                assert_true(off < 0);
                continue;
            }
            llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &out, &in);
            assert_true(f->n_tensors + 2 <= LLAMA_N_LINEAR * 16);
            f->t_off[f->n_tensors] = off, f->t_len[f->n_tensors++] = r * in;
            f->t_off[f->n_tensors] = off + r * in, f->t_len[f->n_tensors++] = out * r;
        }
    const ref_array *ids_a = ref_find(&f->rf, "input_ids");
    assert_non_null(ids_a);
    int B = (int)ids_a->shape[0], T = (int)ids_a->shape[1];
    const int32_t *labels = ref_i32(&f->rf, "labels", (int64_t)B * T);
    f->targets = malloc((size_t)B * T * sizeof(int32_t));
    f->seq_ids = calloc((size_t)B * T, sizeof(int32_t));
    for (int i = 0; i < B; i++)
        for (int j = 0; j < T; j++) {
            f->targets[i * T + j] = j + 1 < T ? labels[i * T + j + 1] : -100; /* HF's shift */
            f->n_tok += f->targets[i * T + j] != -100;
        }
    assert_int_equal(f->n_tok, (int64_t)ref_scalar(&f->rf, "n_tokens"));
    f->b = (llama_batch){.B = B, .T = T, .input_ids = ref_i32(&f->rf, "input_ids", (int64_t)B * T),
                         .targets = f->targets, .position_ids = ref_i32(&f->rf, "position_ids", (int64_t)B * T),
                         .seq_ids = f->seq_ids};
    return 0;
}

static int teardown(void **state) {
    (void)state;
    family *f = &g_f;
    lora_set_free(&f->ls);
    llama_free(&f->m_hf);
    llama_free(&f->m_gguf);
    hf_model_close(f->hf);
    gguf_close(f->gf);
    free(f->targets);
    free(f->seq_ids);
    ref_close(&f->rf);
    tmpdir_remove(f->dir);
    gemm_shutdown();
    return 0;
}

static void logits_of(const llama_model *m, const lora_set *ls, const llama_batch *b, float *out) {
    ag_ctx ctx;
    qerr e = {{0}};
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    ctx.bf16 = 0;
    ctx.training = 0;
    tensor *h = llama_forward_hidden(&ctx, m, ls, b);
    llama_logits_rows(&ctx, m, h, 0, (int64_t)b->B * b->T, out);
    ag_ctx_free(&ctx);
}

static double loss_grads(family *f, int ck) {
    ag_ctx ctx;
    qerr e = {{0}};
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    ctx.bf16 = 0;
    ctx.training = 1;
    ctx.seed = 5;
    memset(f->ls.grads, 0, (size_t)f->ls.n_params * sizeof(float));
    double lsum = 0;
    int64_t nt = 0;
    tensor *L = llama_forward_loss(&ctx, &f->m_hf, &f->ls, &f->b, 1.0f / (float)f->n_tok, ck, &lsum, &nt);
    assert_int_equal(nt, f->n_tok);
    ag_backward(&ctx, L);
    ag_ctx_free(&ctx);
    return lsum / (double)nt;
}

static double worst_tensor_err(const family *f, const float *ref, const float *got) {
    double w = 0;
    for (int i = 0; i < f->n_tensors; i++) {
        const float *a = ref + f->t_off[i], *b = got + f->t_off[i];
        w = fmax(w, ref_max_abs_diff(a, b, f->t_len[i]) / ref_max_abs(a, f->t_len[i]));
    }
    return w;
}

/* The RoPE frequencies of both forms against transformers' rotary_emb.inv_freq. */
static void test_rope_frequencies(void **state) {
    (void)state;
    family *f = &g_f;
    int half = f->m_hf.hp.head_dim / 2;
    const float *ref = ref_f32(&f->rf, "rope.inv_freq", half);
    float a[LLAMA_ROPE_MAX_PAIRS], b[LLAMA_ROPE_MAX_PAIRS];
    llama_rope_inv_freq(&f->m_hf.hp, a);
    llama_rope_inv_freq(&f->m_gguf.hp, b);
    double wa = 0, wb = 0;
    for (int i = 0; i < half; i++) {
        wa = fmax(wa, fabs((double)a[i] - ref[i]) / ref[i]);
        wb = fmax(wb, fabs((double)b[i] - ref[i]) / ref[i]);
    }
    print_message("[ref] %s inv_freq: HF form max rel err %.2e (tol 1e-6), GGUF rope_freqs form %.2e (tol 1e-5)\n",
                  f->name, wa, wb);
    assert_true(wa <= 1e-6);
    assert_true(wb <= 1e-5);
    /* a merged export's config.json must state the GGUF's scaling as transformers' rope_scaling: the llama3
     * parameters recovered from the converter's rope_freqs are the HF config's */
    const llama_rope_scaling *want = &f->m_hf.hp.rope_scaling;
    if (want->type == LLAMA_ROPE_LLAMA3 && want->low_freq_factor == 1.0f) {
        llama_rope_scaling got;
        qerr e = {{0}};
        assert_int_equal(f->m_gguf.hp.rope_scaling.type, LLAMA_ROPE_FREQ_FACTORS);
        if (llama_rope_llama3_of_factors(&f->m_gguf.hp, &got, &e)) fail_msg("%s", e.msg);
        print_message("[ref] %s llama3 parameters recovered from rope_freqs: factor %g, low %g, high %g, original %d "
                      "(config.json: %g, %g, %g, %d)\n", f->name, (double)got.factor, (double)got.low_freq_factor,
                      (double)got.high_freq_factor, got.original_context, (double)want->factor,
                      (double)want->low_freq_factor, (double)want->high_freq_factor, want->original_context);
        assert_true(got.type == LLAMA_ROPE_LLAMA3 && got.factor == want->factor &&
                    got.low_freq_factor == want->low_freq_factor && got.high_freq_factor == want->high_freq_factor &&
                    got.original_context == want->original_context);
    }
}

static void test_logits_both_forms(void **state) {
    (void)state;
    family *f = &g_f;
    int64_t n = (int64_t)f->b.B * f->b.T * f->m_hf.hp.vocab;
    const float *ref = ref_f32(&f->rf, "logits", n);
    float *got = malloc((size_t)n * sizeof(float));
    double scale = ref_max_abs(ref, n);
    const llama_model *ms[2] = {&f->m_hf, &f->m_gguf};
    const char *forms[2] = {"HF directory", "GGUF (llama.cpp converter)"};
    for (int i = f->gguf_only; i < 2; i++) {
        /* the reference's adapter sits on the HF form's LoRA set; both forms have the same shapes */
        logits_of(ms[i], &f->ls, &f->b, got);
        double err = ref_max_abs_diff(ref, got, n);
        print_message("[ref] %s fp32 logits, %s: max|Δ| %.3e, max|logit| %.3f, relative %.3e (tol 1e-4)\n", f->name,
                      forms[i], err, scale, err / scale);
        assert_true(err <= 1e-4 * scale);
    }
    free(got);
}

/* What the old code did with a Llama-3.1-style GGUF (before rope_freqs was
 * read): the default RoPE. It must be far from the reference, or this
 * fixture would not tell the two apart. */
static void test_default_rope_is_wrong(void **state) {
    (void)state;
    family *f = &g_f;
    assert_int_not_equal(f->m_gguf.hp.rope_scaling.type, LLAMA_ROPE_DEFAULT);
    int64_t n = (int64_t)f->b.B * f->b.T * f->m_hf.hp.vocab;
    const float *ref = ref_f32(&f->rf, "logits", n);
    float *got = malloc((size_t)n * sizeof(float));
    llama_model m = f->m_gguf;
    llama_hparams hp = m.hp;
    hp.rope_scaling.type = LLAMA_ROPE_DEFAULT;
    qerr e = {{0}};
    assert_int_equal(llama_rope_init(&m.rope, &hp, MAX_POS, &e), 0);
    logits_of(&m, &f->ls, &f->b, got);
    double err = ref_max_abs_diff(ref, got, n) / ref_max_abs(ref, n);
    print_message("[ref] %s with the default RoPE instead: logits relative error %.3e (must exceed 1e-2)\n", f->name,
                  err);
    assert_true(err > 1e-2);
    rope_table_free(&m.rope);
    free(got);
}

static void test_loss_grads(void **state) {
    (void)state;
    family *f = &g_f;
    int64_t np = f->ls.n_params;
    memcpy(f->ls.params, f->p0, (size_t)np * sizeof(float));
    const float *gref = ref_f32(&f->rf, "grads", np);
    double lref = ref_scalar(&f->rf, "loss");
    for (int ck = LLAMA_CKPT_OFF; ck <= LLAMA_CKPT_SELECTIVE; ck++) { /* off, full, selective recomputation */
        double loss = loss_grads(f, ck), gerr = worst_tensor_err(f, gref, f->ls.grads);
        print_message("[ref] %s fp32 checkpointing %s: loss %.7f vs HF %.7f (tol %.1e); worst grad tensor "
                      "max|Δ|/max|g| %.3e (tol 1e-4)\n", f->name, ck == 2 ? "selective" : ck ? "on " : "off", loss,
                      lref, 1e-5 * lref, gerr);
        assert_true(fabs(loss - lref) <= 1e-5 * lref);
        assert_true(gerr <= 1e-4);
        for (int i = 0; i < f->n_tensors; i++) assert_true(ref_max_abs(f->ls.grads + f->t_off[i], f->t_len[i]) > 0);
    }
}

static void test_adamw_10_steps(void **state) {
    (void)state;
    family *f = &g_f;
    int64_t np = f->ls.n_params;
    const ref_array *la = ref_find(&f->rf, "adamw.losses");
    assert_non_null(la);
    int steps = (int)la->numel - 1;
    const double *lref = ref_f64(&f->rf, "adamw.losses", steps + 1);
    const double *nref = ref_f64(&f->rf, "adamw.grad_norms", steps);
    const float *pref = ref_f32(&f->rf, "adamw.final_params", np);
    /* scripts/make_reference.py TINY: lr 1e-2, betas 0.9/0.999, eps 1e-8, weight decay 0.01, max_norm 1 */
    adamw_config cfg = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    adamw_state st;
    qerr e = {{0}};
    assert_int_equal(adamw_state_init(&st, np, &e), 0);
    memcpy(f->ls.params, f->p0, (size_t)np * sizeof(float));
    double worst_l = 0, worst_n = 0;
    for (int s = 0; s <= steps; s++) {
        double loss = loss_grads(f, 1);
        if (s < steps) {
            float norm = clip_grad_norm(f->ls.grads, np, 1.0f);
            worst_n = fmax(worst_n, fabs(norm - nref[s]) / nref[s]);
            adamw_step(&st, &cfg, cfg.lr, f->ls.params, f->ls.grads, NULL);
        }
        worst_l = fmax(worst_l, fabs(loss - lref[s]) / lref[s]);
        assert_true(fabs(loss - lref[s]) <= 1e-4 * lref[s] + 1e-6);
    }
    float *delta_ref = malloc((size_t)np * sizeof(float));
    for (int64_t i = 0; i < np; i++) delta_ref[i] = pref[i] - f->p0[i];
    double num = ref_l2_diff(pref, f->ls.params, np), den = ref_l2(delta_ref, np);
    print_message("[ref] %s adamw %d steps: worst loss rel err %.3e (tol 1e-4), worst pre-clip norm rel err %.3e "
                  "(tol 1e-4), final adapter ||Δ||/||p_ref - p_0|| %.3e (tol 1e-3)\n", f->name, steps, worst_l,
                  worst_n, num / den);
    assert_true(worst_n <= 1e-4);
    assert_true(num <= 1e-3 * den);
    free(delta_ref);
    adamw_state_free(&st);
    memcpy(f->ls.params, f->p0, (size_t)np * sizeof(float));
}

/* Qwen2's q/k/v biases are loaded from both forms and change the logits well beyond the tolerance: the
 * model without them (what a loader that dropped them would train) misses the reference by far. */
static void test_biases_matter(void **state) {
    (void)state;
    family *f = &g_f;
    assert_true(f->m_hf.hp.qkv_bias && f->m_gguf.hp.qkv_bias);
    int64_t n = (int64_t)f->b.B * f->b.T * f->m_hf.hp.vocab;
    const float *ref = ref_f32(&f->rf, "logits", n);
    float *got = malloc((size_t)n * sizeof(float));
    for (int l = 0; l < f->m_gguf.hp.n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            assert_true((f->m_gguf.layers[l].bias[k] != NULL) == (k <= LLAMA_V));
            f->m_gguf.layers[l].lin[k].bias = NULL;
        }
    logits_of(&f->m_gguf, &f->ls, &f->b, got);
    for (int l = 0; l < f->m_gguf.hp.n_layer; l++)
        for (int k = 0; k <= LLAMA_V; k++) f->m_gguf.layers[l].lin[k].bias = f->m_gguf.layers[l].bias[k];
    double err = ref_max_abs_diff(ref, got, n) / ref_max_abs(ref, n);
    print_message("[ref] %s without its q/k/v biases: logits relative error %.3e (must exceed 1e-2)\n", f->name, err);
    assert_true(err > 1e-2);
    free(got);
}

/* Generation (model/llama_infer.c, qlora-generate): row 0 of the batch (positions 0..T-1) through the KV cache
 * of the GGUF form with the adapter, a prefill of T-4 tokens then one token at a time, against the
 * reference's logits of those positions: the same RoPE table (scaling included) and biases as training. */
static void test_generation_cached(void **state) {
    (void)state;
    family *f = &g_f;
    int T = f->b.T, V = f->m_gguf.hp.vocab;
    const float *ref = ref_f32(&f->rf, "logits", (int64_t)f->b.B * T * V); /* row 0 first */
    const int32_t *pos = f->b.position_ids;
    for (int t = 0; t < T; t++) assert_int_equal(pos[t], t);
    memcpy(f->ls.params, f->p0, (size_t)f->ls.n_params * sizeof(float));
    float *got = malloc((size_t)T * V * sizeof(float));
    qerr e = {{0}};
    llama_kv_cache c;
    assert_int_equal(llama_kv_init(&c, &f->m_gguf, T, &e), 0);
    int done = 0;
    while (done < T) {
        int n = done == 0 ? T - 4 : 1;
        ag_ctx ctx;
        assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
        ctx.bf16 = 0;
        ctx.training = 0;
        ctx.recording = 0;
        tensor *h = llama_forward_cached(&ctx, &f->m_gguf, &f->ls, &c, f->b.input_ids + done, n);
        assert_non_null(h);
        llama_logits_rows(&ctx, &f->m_gguf, h, 0, n, got + (size_t)done * V);
        ag_ctx_free(&ctx);
        done += n;
    }
    llama_kv_free(&c);
    double scale = ref_max_abs(ref, (int64_t)T * V), err = ref_max_abs_diff(ref, got, (int64_t)T * V);
    print_message("[ref] %s KV-cached generation (GGUF form, prefill %d + 4 single steps) vs reference logits: "
                  "relative %.3e (tol 1e-4)\n", f->name, T - 4, err / scale);
    assert_true(err <= 1e-4 * scale);
    free(got);
}

/* The exports from the GGUF form, with the reference's adapter: the merged HF directory (its config.json
 * must state the architecture, the RoPE scaling and the window; its weights W + s·BA rounded once to bf16, the
 * biases kept) computes the adapted model's logits within bf16 rounding of the merged weights; the GGUF LoRA
 * names the architecture and keeps HF row order where the architecture's converter does (qwen2). */
static void test_exports(void **state) {
    (void)state;
    family *f = &g_f;
    char path[4096], mdir[4096];
    qerr e = {{0}};
    base_model *b = NULL, *mb = NULL;
    tokenizer *tok = NULL;
    snprintf(path, sizeof path, "%.63s/model.gguf", f->dir);
    if (base_model_open(path, &b, &e) || tokenizer_load_gguf(base_model_gguf(b), &tok, &e)) fail_msg("%s", e.msg);
    memcpy(f->ls.params, f->p0, (size_t)f->ls.n_params * sizeof(float));
    snprintf(mdir, sizeof mdir, "%.63s/merged", f->dir);
    if (export_merged(b, &f->m_gguf, tok, &f->ls, NULL, mdir, 0, &e)) fail_msg("merged export: %s", e.msg);
    llama_model mm;
    if (base_model_open(mdir, &mb, &e) || base_model_load(mb, 0, 0, MAX_POS, &mm, &e))
        fail_msg("the merged export does not load: %s", e.msg);
    const llama_hparams *a = &f->m_hf.hp, *h = &mm.hp;
    assert_int_equal(h->arch, a->arch);
    assert_int_equal(h->qkv_bias, a->qkv_bias);
    /* llama.cpp's converter drops Mistral's sliding_window (llama arch): the GGUF form, and so its merged
     * export, has none; qlora-train bounds sequence_len only by what the file says */
    assert_int_equal(h->sliding_window, f->m_gguf.hp.sliding_window);
    assert_int_equal(h->rope_scaling.type, a->rope_scaling.type);
    assert_true(h->rope_scaling.type != LLAMA_ROPE_LLAMA3 ||
                (h->rope_scaling.factor == a->rope_scaling.factor &&
                 h->rope_scaling.high_freq_factor == a->rope_scaling.high_freq_factor &&
                 h->rope_scaling.original_context == a->rope_scaling.original_context));
    int64_t n = (int64_t)f->b.B * f->b.T * f->m_hf.hp.vocab;
    const float *ref = ref_f32(&f->rf, "logits", n);
    float *got = malloc((size_t)n * sizeof(float));
    logits_of(&mm, NULL, &f->b, got);
    double err = ref_max_abs_diff(ref, got, n) / ref_max_abs(ref, n);
    print_message("[ref] %s merged export (bf16 weights) logits vs the adapted reference: relative %.3e (tol 2e-2, "
                  "bf16 rounding of W + s·BA)\n", f->name, err);
    assert_true(err <= 2e-2);
    /* GGUF LoRA */
    snprintf(path, sizeof path, "%.63s/adapter.gguf", f->dir);
    if (export_gguf_lora(b, &f->ls, NULL, path, &e)) fail_msg("GGUF LoRA: %s", e.msg);
    gguf_file *g;
    const char *arch;
    size_t al;
    if (gguf_open(path, &g, &e) || gguf_get_str(g, "general.architecture", &arch, &al, &e)) fail_msg("%s", e.msg);
    assert_true(al == strlen(llama_arch_name(a->arch)) && !memcmp(arch, llama_arch_name(a->arch), al));
    char qname[64];
    snprintf(qname, sizeof qname, "blk.0.%s.weight.lora_b", llama_hparams_linears(a)[LLAMA_Q].gguf);
    const gguf_tensor *qb = gguf_find_tensor(g, qname); /* attn_q, or Phi-3's fused attn_qkv */
    assert_non_null(qb);
    const lora_adapter *ad = lora_set_get(&f->ls, 0, LLAMA_Q);
    float *qbf = malloc((size_t)qb->nelements * sizeof(float));
    assert_int_equal(gguf_tensor_to_f32(qb, qbf, &e), 0);
    int same = !memcmp(qbf, ad->B->data, (size_t)qb->nelements * sizeof(float));
    assert_int_equal(same, a->arch != LLAMA_ARCH_LLAMA); /* llama: rows permuted as the converter permutes W_q */
    if (a->arch == LLAMA_ARCH_PHI3) { /* llama.cpp's phi3 names: no attn_q/k/v, ffn_gate; fused attn_qkv, ffn_up */
        assert_null(gguf_find_tensor(g, "blk.0.attn_q.weight.lora_a"));
        assert_null(gguf_find_tensor(g, "blk.0.ffn_gate.weight.lora_a"));
        const gguf_tensor *ub = gguf_find_tensor(g, "blk.1.ffn_up.weight.lora_b");
        assert_non_null(ub);
        assert_int_equal(ub->ne[1], 2 * a->d_ff); /* gate and up rows */
        assert_int_equal(qb->ne[1], (a->n_head + 2 * a->n_kv_head) * a->head_dim);
    }
    free(qbf);
    gguf_close(g);
    free(got);
    llama_free(&mm);
    base_model_close(mb);
    tokenizer_free(tok);
    base_model_close(b);
}

/* Mistral's and Phi-3's sliding_window is read (and bounds sequence_len, trainer/run.c); 4096 and 2047 are
 * longer than the rows. Phi-3's GGUF keeps it (phi3.attention.sliding_window). */
static void test_sliding_window_read(void **state) {
    (void)state;
    int want = g_f.m_hf.hp.arch == LLAMA_ARCH_PHI3 ? 2047 : 4096;
    assert_int_equal(g_f.m_hf.hp.sliding_window, want);
    if (g_f.m_hf.hp.arch == LLAMA_ARCH_PHI3) assert_int_equal(g_f.m_gguf.hp.sliding_window, want);
}

/* Phi-3's fused linears: both forms hold the same bits in slots q (qkv_proj / attn_qkv, rows q, k, v) and gate
 * (gate_up_proj / ffn_up, rows gate, up), the slots they took over hold nothing, and a control: the model with
 * the two halves of every gate_up_proj swapped (up read as gate) misses the reference logits by far, so the
 * logits test does tell the order apart. */
static void test_phi3_fused(void **state) {
    (void)state;
    family *f = &g_f;
    const llama_hparams *hp = &f->m_hf.hp;
    assert_int_equal(hp->arch, LLAMA_ARCH_PHI3);
    assert_int_equal(f->m_gguf.hp.arch, LLAMA_ARCH_PHI3);
    for (int l = 0; l < hp->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const frozen_weight *a = &f->m_hf.layers[l].lin[k], *b = &f->m_gguf.layers[l].lin[k];
            assert_int_equal(a->out, b->out);
            assert_int_equal(a->in, b->in);
            if (!llama_linear_present(hp, k)) {
                assert_int_equal(a->out, 0);
                continue;
            }
            assert_memory_equal(a->w_bf16, b->w_bf16, (size_t)(a->out * a->in) * sizeof(bf16));
        }
    assert_int_equal(f->m_hf.layers[0].lin[LLAMA_Q].out, (hp->n_head + 2 * hp->n_kv_head) * hp->head_dim);
    assert_int_equal(f->m_hf.layers[0].lin[LLAMA_GATE].out, 2 * hp->d_ff);
    int64_t n = (int64_t)f->b.B * f->b.T * hp->vocab, half = (int64_t)hp->d_ff * hp->d_model;
    const float *ref = ref_f32(&f->rf, "logits", n);
    float *got = malloc((size_t)n * sizeof(float));
    bf16 *tmp = malloc((size_t)half * sizeof(bf16));
    for (int l = 0; l < hp->n_layer; l++) { /* swap the gate and up rows of the GGUF form, in place */
        bf16 *w = f->m_gguf.layers[l].w_bf16[LLAMA_GATE];
        memcpy(tmp, w, (size_t)half * sizeof(bf16));
        memmove(w, w + half, (size_t)half * sizeof(bf16));
        memcpy(w + half, tmp, (size_t)half * sizeof(bf16));
    }
    memcpy(f->ls.params, f->p0, (size_t)f->ls.n_params * sizeof(float)); /* the reference's adapter */
    logits_of(&f->m_gguf, &f->ls, &f->b, got);
    for (int l = 0; l < hp->n_layer; l++) { /* and back */
        bf16 *w = f->m_gguf.layers[l].w_bf16[LLAMA_GATE];
        memcpy(tmp, w, (size_t)half * sizeof(bf16));
        memmove(w, w + half, (size_t)half * sizeof(bf16));
        memcpy(w + half, tmp, (size_t)half * sizeof(bf16));
    }
    double err = ref_max_abs_diff(ref, got, n) / ref_max_abs(ref, n);
    print_message("[ref] %s with gate_up_proj read as (up, gate): logits relative error %.3e (must exceed 1e-2)\n",
                  f->name, err);
    assert_true(err > 1e-2);
    free(tmp);
    free(got);
}

/* Gemma 3: what the GGUF says (window 4, pattern 6: layers 0-4 sliding, 5 full; RoPE bases 1e6 and 10000 against
 * transformers' two tables), and controls: the model without the window mask (every layer full attention), or
 * with SwiGLU in place of the tanh GeGLU, must miss the reference by far. */
static void test_gemma3(void **state) {
    (void)state;
    family *f = &g_f;
    const llama_hparams *hp = &f->m_gguf.hp;
    assert_int_equal(hp->arch, LLAMA_ARCH_GEMMA3);
    assert_int_equal(hp->sliding_window, 4);
    for (int l = 0; l < hp->n_layer; l++) assert_int_equal(llama_layer_window(hp, l), l == 5 ? 0 : 4);
    int half = hp->head_dim / 2;
    const float *ref_g = ref_f32(&f->rf, "rope.inv_freq", half), *ref_l = ref_f32(&f->rf, "rope.inv_freq_local", half);
    float g[LLAMA_ROPE_MAX_PAIRS], lo[LLAMA_ROPE_MAX_PAIRS];
    llama_rope_inv_freq(hp, g);
    rope_default_inv_freq(hp->head_dim, hp->rope_theta_local, lo);
    double wg = 0, wl = 0;
    for (int i = 0; i < half; i++) {
        wg = fmax(wg, fabs((double)g[i] - ref_g[i]) / ref_g[i]);
        wl = fmax(wl, fabs((double)lo[i] - ref_l[i]) / ref_l[i]);
    }
    print_message("[ref] gemma3 inv_freq vs transformers: full layers %.2e, sliding layers %.2e (tol 1e-6)\n", wg, wl);
    assert_true(wg <= 1e-6 && wl <= 1e-6);
    assert_non_null(f->m_gguf.rope_local.cos);
    assert_true(llama_layer_rope(&f->m_gguf, 0) == &f->m_gguf.rope_local);
    assert_true(llama_layer_rope(&f->m_gguf, 5) == &f->m_gguf.rope);
    int64_t n = (int64_t)f->b.B * f->b.T * hp->vocab;
    const float *ref = ref_f32(&f->rf, "logits", n);
    float *got = malloc((size_t)n * sizeof(float));
    memcpy(f->ls.params, f->p0, (size_t)f->ls.n_params * sizeof(float));
    for (int c = 0; c < 2; c++) {
        llama_model m = f->m_gguf;
        if (c == 0) m.hp.sliding_window = 1 << 30; /* full attention; the local layers keep their RoPE base */
        else m.hp.act_geglu = 0;          /* silu instead of the tanh GELU */
        logits_of(&m, &f->ls, &f->b, got);
        double err = ref_max_abs_diff(ref, got, n) / ref_max_abs(ref, n);
        print_message("[ref] gemma3 %s: logits relative error %.3e (must exceed 1e-2)\n",
                      c == 0 ? "without the sliding-window mask" : "with SwiGLU instead of GeGLU", err);
        assert_true(err > 1e-2);
    }
    free(got);
    /* exports: the GGUF LoRA (llama.cpp's gemma3 names, HF row order: no Q/K permutation); merged refused */
    char path[4096];
    qerr e = {{0}};
    base_model *b = NULL;
    tokenizer *tok = NULL;
    snprintf(path, sizeof path, "%s/model.gguf", f->dir);
    if (base_model_open(path, &b, &e) || tokenizer_load_gguf(base_model_gguf(b), &tok, &e)) fail_msg("%s", e.msg);
    snprintf(path, sizeof path, "%s/merged", f->dir);
    assert_int_equal(export_merged(b, &f->m_gguf, tok, &f->ls, NULL, path, 0, &e), -1);
    assert_non_null(strstr(e.msg, "gemma3"));
    snprintf(path, sizeof path, "%s/adapter.gguf", f->dir);
    if (export_gguf_lora(b, &f->ls, NULL, path, &e)) fail_msg("GGUF LoRA: %s", e.msg);
    gguf_file *gg;
    const char *arch;
    size_t al;
    if (gguf_open(path, &gg, &e) || gguf_get_str(gg, "general.architecture", &arch, &al, &e)) fail_msg("%s", e.msg);
    assert_true(al == 6 && !memcmp(arch, "gemma3", 6));
    const gguf_tensor *qb = gguf_find_tensor(gg, "blk.0.attn_q.weight.lora_b");
    assert_non_null(qb);
    float *qbf = malloc((size_t)qb->nelements * sizeof(float));
    assert_int_equal(gguf_tensor_to_f32(qb, qbf, &e), 0);
    assert_memory_equal(qbf, lora_set_get(&f->ls, 0, LLAMA_Q)->B->data, (size_t)qb->nelements * sizeof(float));
    free(qbf);
    gguf_close(gg);
    tokenizer_free(tok);
    base_model_close(b);
}

int main(int argc, char **argv) {
    static const char *const all[] = {"llama3", "mistral", "qwen2", "phi3", "gemma3"};
    const struct CMUnitTest common[] = {
        cmocka_unit_test(test_rope_frequencies), cmocka_unit_test(test_logits_both_forms),
        cmocka_unit_test(test_loss_grads),       cmocka_unit_test(test_adamw_10_steps),
    };
    const struct CMUnitTest scaled[] = {
        cmocka_unit_test(test_rope_frequencies), cmocka_unit_test(test_logits_both_forms),
        cmocka_unit_test(test_default_rope_is_wrong), cmocka_unit_test(test_loss_grads),
        cmocka_unit_test(test_adamw_10_steps),   cmocka_unit_test(test_exports),
        cmocka_unit_test(test_generation_cached),
    };
    const struct CMUnitTest windowed[] = {
        cmocka_unit_test(test_sliding_window_read), cmocka_unit_test(test_rope_frequencies),
        cmocka_unit_test(test_logits_both_forms),   cmocka_unit_test(test_loss_grads),
        cmocka_unit_test(test_adamw_10_steps),   cmocka_unit_test(test_exports),
        cmocka_unit_test(test_generation_cached),
    };
    const struct CMUnitTest biased[] = {
        cmocka_unit_test(test_rope_frequencies), cmocka_unit_test(test_logits_both_forms),
        cmocka_unit_test(test_biases_matter),    cmocka_unit_test(test_loss_grads),
        cmocka_unit_test(test_adamw_10_steps),   cmocka_unit_test(test_exports),
        cmocka_unit_test(test_generation_cached),
    };
    const struct CMUnitTest fused[] = {
        cmocka_unit_test(test_sliding_window_read), cmocka_unit_test(test_phi3_fused),
        cmocka_unit_test(test_rope_frequencies),   cmocka_unit_test(test_logits_both_forms),
        cmocka_unit_test(test_loss_grads),         cmocka_unit_test(test_adamw_10_steps),
        cmocka_unit_test(test_exports),            cmocka_unit_test(test_generation_cached),
    };
    const struct CMUnitTest gemma[] = {
        cmocka_unit_test(test_gemma3),     cmocka_unit_test(test_logits_both_forms),
        cmocka_unit_test(test_loss_grads), cmocka_unit_test(test_adamw_10_steps),
        cmocka_unit_test(test_generation_cached),
    };
    int fails = 0;
    int n = argc > 1 ? argc - 1 : (int)(sizeof all / sizeof *all);
    for (int i = 0; i < n; i++) {
        g_name = argc > 1 ? argv[i + 1] : all[i];
        fprintf(stderr, "[ref] family %s\n", g_name);
        if (!strcmp(g_name, "llama3")) fails += cmocka_run_group_tests_name(g_name, scaled, setup, teardown);
        else if (!strcmp(g_name, "mistral")) fails += cmocka_run_group_tests_name(g_name, windowed, setup, teardown);
        else if (!strcmp(g_name, "qwen2")) fails += cmocka_run_group_tests_name(g_name, biased, setup, teardown);
        else if (!strcmp(g_name, "phi3")) fails += cmocka_run_group_tests_name(g_name, fused, setup, teardown);
        else if (!strcmp(g_name, "gemma3")) fails += cmocka_run_group_tests_name(g_name, gemma, setup, teardown);
        else fails += cmocka_run_group_tests_name(g_name, common, setup, teardown);
    }
    return fails != 0;
}
