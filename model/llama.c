/* model/llama.c — load a Llama GGUF into the QLoRA layout and run its forward
 * pass on the autograd tape (see llama.h). */
#include "model/llama.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "autograd/ce_sampled.h"
#include "autograd/gemm.h"
#include "core/rng.h"
#include "model/llama_fsdp.h"

void llama_tensor_shape(const llama_hparams *hp, llama_role role, int module, int64_t *rows, int64_t *cols) {
    int64_t D = hp->d_model, F = hp->d_ff, qd = (int64_t)hp->n_head * hp->head_dim,
            kd = (int64_t)hp->n_kv_head * hp->head_dim;
    switch (role) {
    case LLAMA_T_EMBED:
    case LLAMA_T_LM_HEAD: *rows = hp->vocab; *cols = D; return;
    case LLAMA_T_OUT_NORM:
    case LLAMA_T_ATTN_NORM:
    case LLAMA_T_FFN_NORM: *rows = D; *cols = 1; return;
    case LLAMA_T_LINEAR:
    case LLAMA_T_BIAS: {
        if (!llama_linear_present(hp, module)) {
            *rows = *cols = 0;
            return;
        }
        const int fused = hp->arch == LLAMA_ARCH_PHI3; /* qkv_proj in slot Q, gate_up_proj in slot GATE */
        const int64_t outs[LLAMA_N_LINEAR] = {fused ? qd + 2 * kd : qd, kd, kd, D, fused ? 2 * F : F, F, D};
        const int64_t ins[LLAMA_N_LINEAR] = {D, D, D, qd, D, D, F};
        *rows = outs[module];
        *cols = role == LLAMA_T_BIAS ? 1 : ins[module];
        return;
    }
    }
    *rows = *cols = 0;
}

static int llama_gguf_refuse_unimplemented(const gguf_file *f, const llama_hparams *hp, qerr *e);

/* "<arch>.<suffix>": a GGUF key of hp's architecture (llama.cpp's LLM_KV names: "llama.block_count",
 * "qwen2.block_count", ...). A small ring of buffers, so that one expression may hold several keys. */
static const char *K(const llama_hparams *hp, const char *suffix) {
    static _Thread_local char ring[8][96];
    static _Thread_local unsigned next;
    char *b = ring[next++ % 8];
    snprintf(b, sizeof ring[0], "%s.%s", llama_arch_name(hp->arch), suffix);
    return b;
}

const char *llama_arch_name(llama_arch arch) {
    return arch == LLAMA_ARCH_QWEN2 ? "qwen2" : arch == LLAMA_ARCH_PHI3 ? "phi3" : arch == LLAMA_ARCH_GEMMA3 ? "gemma3"
                                                                                                            : "llama";
}

int llama_layer_window(const llama_hparams *hp, int l) {
    if (hp->sliding_window <= 0 || !hp->window_mask) return 0;
    if (hp->swa_pattern > 0 && l % hp->swa_pattern >= hp->swa_pattern - 1) return 0; /* a global layer */
    return hp->sliding_window;
}

/* The Gemma 3 block's switches (llama.cpp src/models/gemma3.cpp, transformers Gemma3DecoderLayer) and the
 * defaults llama.cpp takes for keys a GGUF may omit: window pattern 6, local RoPE base 10000. */
static void llama_hparams_gemma3(llama_hparams *hp) {
    hp->qk_norm = 1;
    hp->post_norms = 1;
    hp->act_geglu = 1;
    hp->embed_scale = sqrtf((float)hp->d_model);
    hp->swa_pattern = 6;
    hp->rope_theta_local = 10000.0f;
    hp->window_mask = 1;
}

const llama_linear_name *llama_hparams_linears(const llama_hparams *hp) {
    return hp->arch == LLAMA_ARCH_PHI3 ? llama_linears_phi3 : llama_linears;
}

int llama_linear_present(const llama_hparams *hp, int k) {
    return k >= 0 && k < LLAMA_N_LINEAR && llama_hparams_linears(hp)[k].peft != NULL;
}

/* RoPE scaling of a GGUF (llama.cpp llama-model.cpp): freq_scale = 1 / rope.scaling.factor (or the older
 * rope.scale_linear), 0 meaning 1, for type none or linear alike; rope_freqs.weight divides each pair's
 * frequency (ggml_rope_ext's freq_factors). */
static int llama_gguf_rope_scaling(const gguf_file *f, llama_hparams *hp, qerr *e) {
    llama_rope_scaling *rs = &hp->rope_scaling;
    rs->type = LLAMA_ROPE_DEFAULT;
    rs->factor = 1.0f;
    static const char *const factor_keys[] = {"rope.scaling.factor", "rope.scale_linear"};
    for (int i = 0; i < 2; i++) {
        if (!gguf_has_key(f, K(hp, factor_keys[i]))) continue;
        float factor;
        if (gguf_get_f32(f, K(hp, factor_keys[i]), &factor, e)) return -1;
        if (!isfinite(factor) || factor < 0.0f)
            return qerr_set(e, "%s: expected a finite RoPE scaling factor >= 0, got %g", K(hp, factor_keys[i]),
                            (double)factor);
        if (factor != 0.0f && factor != 1.0f) {
            rs->type = LLAMA_ROPE_LINEAR;
            rs->factor = factor;
        }
        break;
    }
    const gguf_tensor *t = gguf_find_tensor(f, "rope_freqs.weight");
    if (!t) return 0;
    int half = hp->head_dim / 2;
    if (t->n_dims != 1 || (int64_t)t->ne[0] != half || t->type != GGML_TYPE_F32)
        return qerr_set(e, "tensor rope_freqs.weight: expected F32 of %d elements (head_dim / 2), got type %u with "
                           "%llu elements", half, (unsigned)t->type, (unsigned long long)t->nelements);
    if (half > LLAMA_ROPE_MAX_PAIRS)
        return qerr_set(e, "tensor rope_freqs.weight: head_dim %d exceeds the %d pairs supported", hp->head_dim,
                        LLAMA_ROPE_MAX_PAIRS);
    if (gguf_tensor_to_f32(t, rs->freq_factors, e)) return qerr_prefix(e, "tensor rope_freqs.weight");
    for (int i = 0; i < half; i++)
        if (!isfinite(rs->freq_factors[i]) || rs->freq_factors[i] <= 0.0f)
            return qerr_set(e, "tensor rope_freqs.weight: element %d: expected a finite factor > 0, got %g", i,
                            (double)rs->freq_factors[i]);
    rs->type = LLAMA_ROPE_FREQ_FACTORS;
    return 0;
}

int llama_hparams_from_gguf(const gguf_file *f, llama_hparams *hp, qerr *e) {
    memset(hp, 0, sizeof *hp);
    const char *arch;
    size_t alen;
    if (gguf_get_str(f, "general.architecture", &arch, &alen, e)) return -1;
    if (alen == 5 && !memcmp(arch, "llama", 5)) {
        hp->arch = LLAMA_ARCH_LLAMA;
    } else if (alen == 5 && !memcmp(arch, "qwen2", 5)) {
        hp->arch = LLAMA_ARCH_QWEN2;
        hp->qkv_bias = 1;
    } else if (alen == 4 && !memcmp(arch, "phi3", 4)) {
        hp->arch = LLAMA_ARCH_PHI3;
    } else if (alen == 6 && !memcmp(arch, "gemma3", 6)) {
        hp->arch = LLAMA_ARCH_GEMMA3;
    } else {
        return qerr_set(e, "general.architecture: \"%.*s\" is not supported (llama: Llama 1-3, Mistral, SmolLM; "
                           "qwen2: Qwen2 / Qwen2.5; phi3: Phi-3 mini; gemma3: Gemma 3 text)", (int)alen, arch);
    }
    uint32_t v;
    if (gguf_get_u32(f, K(hp, "block_count"), &v, e)) return -1;
    hp->n_layer = (int)v;
    if (gguf_get_u32(f, K(hp, "embedding_length"), &v, e)) return -1;
    hp->d_model = (int)v;
    if (gguf_get_u32(f, K(hp, "attention.head_count"), &v, e)) return -1;
    hp->n_head = (int)v;
    hp->n_kv_head = hp->n_head;
    if (gguf_has_key(f, K(hp, "attention.head_count_kv"))) {
        if (gguf_get_u32(f, K(hp, "attention.head_count_kv"), &v, e)) return -1;
        hp->n_kv_head = (int)v;
    }
    if (gguf_get_u32(f, K(hp, "feed_forward_length"), &v, e)) return -1;
    hp->d_ff = (int)v;
    hp->context_length = 2048;
    if (gguf_has_key(f, K(hp, "context_length"))) {
        if (gguf_get_u32(f, K(hp, "context_length"), &v, e)) return -1;
        hp->context_length = (int)v;
    }
    hp->head_dim = hp->n_head ? hp->d_model / hp->n_head : 0;
    if (gguf_has_key(f, K(hp, "attention.key_length"))) {
        if (gguf_get_u32(f, K(hp, "attention.key_length"), &v, e)) return -1;
        hp->head_dim = (int)v;
    }
    hp->rope_theta = 10000.0f;
    if (gguf_has_key(f, K(hp, "rope.freq_base")) && gguf_get_f32(f, K(hp, "rope.freq_base"), &hp->rope_theta, e))
        return -1;
    hp->rms_eps = 1e-5f;
    if (gguf_has_key(f, K(hp, "attention.layer_norm_rms_epsilon")) &&
        gguf_get_f32(f, K(hp, "attention.layer_norm_rms_epsilon"), &hp->rms_eps, e))
        return -1;
    const gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (!emb) return qerr_set(e, "tensor token_embd.weight missing");
    hp->vocab = (int)emb->ne[1];
    hp->tied_embeddings = gguf_find_tensor(f, "output.weight") == NULL;
    if (hp->n_layer <= 0 || hp->d_model <= 0 || hp->n_head <= 0 || hp->n_kv_head <= 0 ||
        hp->n_head % hp->n_kv_head != 0 || hp->head_dim <= 0 || hp->head_dim % 2 != 0 || hp->d_ff <= 0)
        return qerr_set(e, "inconsistent llama hyper-parameters (layers %d, d_model %d, heads %d/%d, head_dim %d, ff %d)",
                        hp->n_layer, hp->d_model, hp->n_head, hp->n_kv_head, hp->head_dim, hp->d_ff);
    if ((int64_t)emb->ne[0] != hp->d_model)
        return qerr_set(e, "token_embd.weight: expected ne0 = %d, got %llu", hp->d_model,
                        (unsigned long long)emb->ne[0]);
    if (hp->arch == LLAMA_ARCH_GEMMA3) {
        llama_hparams_gemma3(hp);
        if (hp->n_layer == 62) /* llama.cpp gemma3.cpp: 27B scales queries by 1/√(d_model/n_head), not 1/√head_dim */
            return qerr_set(e, "%s: 62 (Gemma 3 27B): its attention scale 1/sqrt(d_model / n_head) is not implemented "
                               "(qlora scales by 1/sqrt(head_dim))", K(hp, "block_count"));
        if (gguf_has_key(f, K(hp, "attention.sliding_window_pattern"))) {
            if (gguf_get_u32(f, K(hp, "attention.sliding_window_pattern"), &v, e))
                return qerr_prefix(e, "%s (only the integer form is implemented)",
                                   K(hp, "attention.sliding_window_pattern"));
            hp->swa_pattern = (int)v;
        }
        if (gguf_has_key(f, K(hp, "rope.freq_base_swa")) &&
            gguf_get_f32(f, K(hp, "rope.freq_base_swa"), &hp->rope_theta_local, e))
            return -1;
        if (!isfinite(hp->rope_theta_local) || hp->rope_theta_local <= 1.0f)
            return qerr_set(e, "%s: expected a finite RoPE base > 1, got %g", K(hp, "rope.freq_base_swa"),
                            (double)hp->rope_theta_local);
    }
    if (llama_gguf_refuse_unimplemented(f, hp, e) || llama_gguf_rope_scaling(f, hp, e)) return -1;
    if (hp->arch == LLAMA_ARCH_GEMMA3 && hp->rope_scaling.type != LLAMA_ROPE_DEFAULT)
        return qerr_set(e, "%s: RoPE scaling of a gemma3 model (Gemma 3 4B+ scale only their global layers) is not "
                           "implemented", K(hp, "rope.scaling.factor"));
    if (gguf_has_key(f, K(hp, "attention.sliding_window"))) {
        if (gguf_get_u32(f, K(hp, "attention.sliding_window"), &v, e)) return -1;
        if (v > 1000000000u) return qerr_set(e, "%s: %u is out of range", K(hp, "attention.sliding_window"), v);
        hp->sliding_window = (int)v; /* 0: none (llama.cpp writes 0 for "no window") */
    }
    return llama_hparams_check(hp, K(hp, "rope.freq_base"), K(hp, "attention.layer_norm_rms_epsilon"), e);
}

int llama_hparams_check(const llama_hparams *hp, const char *theta_key, const char *eps_key, qerr *e) {
    /* rope_theta: the base of the frequencies 1/theta^(2i/d); <= 1 makes every pair rotate at least once per
     * token (no model is trained so), NaN/Inf makes every angle NaN */
    if (!isfinite(hp->rope_theta) || hp->rope_theta <= 1.0f)
        return qerr_set(e, "%s: expected a finite RoPE base > 1, got %g", theta_key, (double)hp->rope_theta);
    /* rms_eps: added to mean(x^2) under the square root; <= 0 or NaN divides by zero or poisons every row */
    if (!isfinite(hp->rms_eps) || hp->rms_eps <= 0.0f || hp->rms_eps >= 1.0f)
        return qerr_set(e, "%s: expected a finite RMSNorm epsilon in (0, 1), got %g", eps_key, (double)hp->rms_eps);
    const llama_rope_scaling *rs = &hp->rope_scaling;
    if (rs->type != LLAMA_ROPE_DEFAULT && (!isfinite(rs->factor) || rs->factor <= 0.0f))
        return qerr_set(e, "RoPE scaling factor: expected a finite number > 0, got %g", (double)rs->factor);
    if (rs->type == LLAMA_ROPE_LLAMA3 &&
        (!isfinite(rs->low_freq_factor) || !isfinite(rs->high_freq_factor) || rs->low_freq_factor <= 0.0f ||
         rs->high_freq_factor <= rs->low_freq_factor || rs->original_context <= 0))
        return qerr_set(e, "llama3 RoPE scaling: expected 0 < low_freq_factor < high_freq_factor and "
                           "original_max_position_embeddings > 0, got %g, %g, %d", (double)rs->low_freq_factor,
                        (double)rs->high_freq_factor, rs->original_context);
    if (rs->type != LLAMA_ROPE_DEFAULT && hp->head_dim / 2 > LLAMA_ROPE_MAX_PAIRS)
        return qerr_set(e, "RoPE scaling: head_dim %d exceeds the %d pairs supported", hp->head_dim,
                        LLAMA_ROPE_MAX_PAIRS);
    if (hp->context_length <= 0)
        return qerr_set(e, "context length: expected a positive number of positions, got %d", hp->context_length);
    return 0;
}

/* Tensors and keys of a GGUF that change the maths and that this loader does
 * not implement: refused by name, so a model is never trained as a different
 * one (docs/formats.md §3). */
static int llama_gguf_refuse_unimplemented(const gguf_file *f, const llama_hparams *hp, qerr *e) {
    const char *type = NULL;
    size_t tl = 0;
    if (gguf_has_key(f, K(hp, "rope.scaling.type"))) {
        if (gguf_get_str(f, K(hp, "rope.scaling.type"), &type, &tl, e)) return -1;
        if (!(tl == 4 && !memcmp(type, "none", 4)) && !(tl == 6 && !memcmp(type, "linear", 6)))
            return qerr_set(e, "%s: \"%.*s\" RoPE scaling is not implemented (none, linear, and llama3 as the "
                               "rope_freqs.weight tensor are)", K(hp, "rope.scaling.type"), (int)tl, type);
    }
    if (gguf_has_key(f, K(hp, "rope.scaling.attn_factor"))) {
        float af;
        if (gguf_get_f32(f, K(hp, "rope.scaling.attn_factor"), &af, e)) return -1;
        if (af != 1.0f)
            return qerr_set(e, "%s: %g: a RoPE attention factor other than 1 is not implemented",
                            K(hp, "rope.scaling.attn_factor"), (double)af);
    }
    if (gguf_has_key(f, K(hp, "expert_count"))) { /* Mixtral is general.architecture llama with expert tensors */
        uint32_t n;
        if (gguf_get_u32(f, K(hp, "expert_count"), &n, e)) return -1;
        if (n > 0)
            return qerr_set(e, "%s: %u: mixture-of-experts layers are not implemented", K(hp, "expert_count"), n);
    }
    static const char *const refused[] = {"attn_logit_softcapping", "final_logit_softcapping",
                                          "rope.dimension_sections", "attention.sliding_window_pattern"};
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++)
        if (gguf_has_key(f, K(hp, refused[i])) &&
            !(hp->arch == LLAMA_ARCH_GEMMA3 && !strcmp(refused[i], "attention.sliding_window_pattern")))
            return qerr_set(e, "%s: not implemented for the %s architecture here; refusing rather than training "
                               "a different model", K(hp, refused[i]), llama_arch_name(hp->arch));
    if (gguf_has_key(f, K(hp, "rope.dimension_count"))) {
        uint32_t n;
        if (gguf_get_u32(f, K(hp, "rope.dimension_count"), &n, e)) return -1;
        if ((int)n != hp->head_dim)
            return qerr_set(e, "%s: %u, but head_dim is %d: partial rotary embeddings are not implemented",
                            K(hp, "rope.dimension_count"), n, hp->head_dim);
    }
    /* every blk.N tensor must belong to one of the block_count layers: fewer layers than the file holds would train
     * a truncated model without a word */
    for (uint64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        long blk;
        char *end;
        if (strncmp(t->name, "blk.", 4)) continue;
        blk = strtol(t->name + 4, &end, 10);
        if (end != t->name + 4 && *end == '.' && blk >= hp->n_layer)
            return qerr_set(e, "tensor %s: block %ld, but %s is %d (the file holds more layers than its metadata "
                               "declares)", t->name, blk, K(hp, "block_count"), hp->n_layer);
        int qkv_bias = !strcmp(end, ".attn_q.bias") || !strcmp(end, ".attn_k.bias") || !strcmp(end, ".attn_v.bias");
        if (qkv_bias && !hp->qkv_bias)
            return qerr_set(e, "tensor %s: linear biases are not implemented for the %s architecture (Qwen2's q/k/v "
                               "biases are, under general.architecture \"qwen2\")", t->name, llama_arch_name(hp->arch));
        if (!strcmp(end, ".attn_output.bias") || !strcmp(end, ".ffn_up.bias") || !strcmp(end, ".ffn_down.bias") ||
            !strcmp(end, ".ffn_gate.bias"))
            return qerr_set(e, "tensor %s: a bias on this linear is not implemented (only Qwen2's q/k/v biases are)",
                            t->name);
        if ((!strcmp(end, ".attn_q_norm.weight") || !strcmp(end, ".attn_k_norm.weight")) && !hp->qk_norm)
            return qerr_set(e, "tensor %s: QK-norm is not implemented for the %s architecture (gemma3's is)", t->name,
                            llama_arch_name(hp->arch));
        if ((!strcmp(end, ".post_attention_norm.weight") || !strcmp(end, ".post_ffw_norm.weight")) && !hp->post_norms)
            return qerr_set(e, "tensor %s: post-attention / post-feed-forward norms are not implemented for the %s "
                               "architecture (gemma3's are)", t->name, llama_arch_name(hp->arch));
        if (!strcmp(end, ".attn_qkv.bias"))
            return qerr_set(e, "tensor %s: a bias on the fused qkv linear is not implemented", t->name);
        /* a fused linear in a file of an architecture whose loader reads separate ones, or the reverse: the
         * unread tensor would be a silently dropped part of the model */
        int fused_t = !strcmp(end, ".attn_qkv.weight");
        int split_t = !strcmp(end, ".attn_q.weight") || !strcmp(end, ".attn_k.weight") ||
                      !strcmp(end, ".attn_v.weight") || !strcmp(end, ".ffn_gate.weight");
        if ((fused_t && hp->arch != LLAMA_ARCH_PHI3) || (split_t && hp->arch == LLAMA_ARCH_PHI3))
            return qerr_set(e, "tensor %s: %s linears are not how the %s architecture is read here (phi3: fused "
                               "attn_qkv and ffn_up holding gate and up; the others: attn_q/k/v, ffn_gate, ffn_up)",
                            t->name, fused_t ? "fused" : "separate", llama_arch_name(hp->arch));
    }
    /* Phi-3 128k (longrope / su): per-pair frequency factors that llama.cpp switches between by context */
    static const char *const longrope[] = {"rope_factors_long.weight", "rope_factors_short.weight"};
    for (int i = 0; i < 2; i++)
        if (gguf_find_tensor(f, longrope[i]))
            return qerr_set(e, "tensor %s: longrope (Phi-3 128k) RoPE scaling is not implemented; refusing rather "
                               "than training with different RoPE frequencies", longrope[i]);
    return 0;
}

void llama_unpermute_rows(float *w, int n_head, int head_dim, int64_t in) {
    int half = head_dim / 2;
    float *tmp = malloc((size_t)head_dim * in * sizeof(float));
    if (!tmp) abort();
    for (int h = 0; h < n_head; h++) {
        float *blk = w + (size_t)h * head_dim * in;
        memcpy(tmp, blk, (size_t)head_dim * in * sizeof(float));
        for (int i = 0; i < half; i++)
            for (int j = 0; j < 2; j++)
                memcpy(blk + (size_t)(j * half + i) * in, tmp + (size_t)(2 * i + j) * in, (size_t)in * sizeof(float));
    }
    free(tmp);
}

/* ------------------------------------------------------------------ RoPE frequencies */

void llama_rope_inv_freq(const llama_hparams *hp, float *inv_freq) {
    const llama_rope_scaling *rs = &hp->rope_scaling;
    int half = hp->head_dim / 2;
    rope_default_inv_freq(hp->head_dim, hp->rope_theta, inv_freq);
    switch (rs->type) {
    case LLAMA_ROPE_DEFAULT: return;
    case LLAMA_ROPE_LINEAR:
        for (int i = 0; i < half; i++) inv_freq[i] /= rs->factor;
        return;
    case LLAMA_ROPE_FREQ_FACTORS:
        for (int i = 0; i < half; i++) inv_freq[i] = inv_freq[i] / rs->freq_factors[i] / rs->factor;
        return;
    case LLAMA_ROPE_LLAMA3: {
        /* modeling_rope_utils.py _compute_llama3_parameters: fp32 tensors against Python scalars (which torch
         * rounds to fp32); the wavelength bounds are Python floats compared in fp32 */
        float L = (float)rs->original_context, lo = rs->low_freq_factor, hi = rs->high_freq_factor;
        float lo_wavelen = (float)((double)rs->original_context / lo), hi_wavelen = (float)((double)rs->original_context / hi);
        float span = (float)((double)hi - (double)lo), two_pi = (float)(2.0 * M_PI);
        for (int i = 0; i < half; i++) {
            float inv = inv_freq[i], wavelen = two_pi / inv;
            float llama = wavelen > lo_wavelen ? inv / rs->factor : inv;
            if (!(wavelen < hi_wavelen) && !(wavelen > lo_wavelen)) {
                float smooth = (L / wavelen - lo) / span;
                llama = (1.0f - smooth) * llama / rs->factor + smooth * llama;
            }
            inv_freq[i] = llama;
        }
        return;
    }
    }
}

int llama_rope_local_init(rope_table *t, const llama_hparams *hp, int max_pos, qerr *e) {
    memset(t, 0, sizeof *t);
    if (hp->rope_theta_local <= 0.0f || hp->rope_theta_local == hp->rope_theta) return 0;
    return rope_table_init(t, max_pos, hp->head_dim, hp->rope_theta_local, e);
}

int llama_rope_init(rope_table *t, const llama_hparams *hp, int max_pos, qerr *e) {
    float inv_freq[LLAMA_ROPE_MAX_PAIRS];
    if (hp->head_dim / 2 > LLAMA_ROPE_MAX_PAIRS || hp->head_dim <= 0)
        return qerr_set(e, "RoPE: head_dim %d out of range (2 .. %d)", hp->head_dim, 2 * LLAMA_ROPE_MAX_PAIRS);
    llama_rope_inv_freq(hp, inv_freq);
    return rope_table_init_freqs(t, max_pos, hp->head_dim, inv_freq, e);
}

/* convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: the factor of one pair of wavelength wavelen */
static double llama3_factor(double wavelen, double factor, double lo, double hi, double L) {
    if (wavelen < L / hi) return 1.0;
    if (wavelen > L / lo) return factor;
    double smooth = (L / wavelen - lo) / (hi - lo);
    return 1.0 / ((1.0 - smooth) / factor + smooth);
}

int llama_rope_llama3_of_factors(const llama_hparams *hp, llama_rope_scaling *out, qerr *e) {
    const llama_rope_scaling *rs = &hp->rope_scaling;
    int half = hp->head_dim / 2;
    float inv[LLAMA_ROPE_MAX_PAIRS];
    if (rs->type != LLAMA_ROPE_FREQ_FACTORS || rs->factor != 1.0f)
        return qerr_set(e, "RoPE: not a rope_freqs (llama3) model");
    rope_default_inv_freq(hp->head_dim, hp->rope_theta, inv);
    double factor = 1.0;
    for (int i = 0; i < half; i++) factor = fmax(factor, rs->freq_factors[i]);
    /* smoothed pairs: 1/f_i = (1 - s)/factor + s, s = L/(hi - lo) · (1/wavelen) - lo/(hi - lo): a line in 1/wavelen */
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    int n = 0;
    for (int i = 0; i < half; i++) {
        double f = rs->freq_factors[i];
        if (f <= 1.0 + 1e-6 || f >= factor * (1.0 - 1e-6)) continue;
        double s = (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor), x = (double)inv[i] / (2.0 * M_PI);
        sx += x, sy += s, sxx += x * x, sxy += x * s, n++;
    }
    if (n < 2 || factor <= 1.0)
        return qerr_set(e, "tensor rope_freqs.weight: %d pair(s) in the smoothed band, too few to recover llama3 "
                           "rope_scaling parameters", n);
    double a = (n * sxy - sx * sy) / (n * sxx - sx * sx), b = (sy - a * sx) / n;
    /* low_freq_factor 1: b = -1/(hi - 1), a = L/(hi - 1) */
    double hi = 1.0 - 1.0 / b, L = round(-a / b);
    if (!(b < 0) || !(hi > 1.0) || !(L >= 1.0) || L > 1e9)
        return qerr_set(e, "tensor rope_freqs.weight: the factors are not those of llama3 RoPE scaling");
    hi = round(hi * 1e4) / 1e4; /* high_freq_factor is a round number in every config */
    for (int i = 0; i < half; i++) {
        double want = llama3_factor(2.0 * M_PI / (double)inv[i], factor, 1.0, hi, L), got = rs->freq_factors[i];
        if (fabs(want - got) > 1e-5 * want)
            return qerr_set(e, "tensor rope_freqs.weight: pair %d: factor %.7g, but the llama3 parameters fitted to "
                               "the file (factor %g, low 1, high %g, original %g) give %.7g: not llama3 scaling",
                            i, got, factor, hi, L, want);
    }
    memset(out, 0, sizeof *out);
    out->type = LLAMA_ROPE_LLAMA3;
    out->factor = (float)factor;
    out->low_freq_factor = 1.0f;
    out->high_freq_factor = (float)hi;
    out->original_context = (int)L;
    return 0;
}

static int load_matrix_f32(const gguf_file *f, const char *name, int64_t rows, int64_t cols, float *dst, qerr *e) {
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) return qerr_set(e, "tensor %s missing", name);
    if ((int64_t)t->ne[0] != cols || (int64_t)(t->nelements / t->ne[0]) != rows)
        return qerr_set(e, "tensor %s: expected shape [%lld, %lld] (HF order), got ne = {%llu, %llu}", name,
                        (long long)rows, (long long)cols, (unsigned long long)t->ne[0],
                        (unsigned long long)t->ne[1]);
    if (gguf_tensor_to_f32(t, dst, e)) return qerr_prefix(e, "tensor %s", name);
    return 0;
}

/* A block's norm weights in a GGUF file (llama.cpp's tensor names, blk.N.<gguf>.weight): length D,
 * or head_dim for the per-head q/k norms; where the fp32 vector goes in llama_layer; which models have
 * it (Qwen3 / Gemma 3 qk-norm, Gemma's sandwich post-norms). */
enum { LLAMA_NORM_ALWAYS, LLAMA_NORM_QK, LLAMA_NORM_POST };
typedef struct llama_block_norm {
    const char *gguf;
    int per_head; /* 1: length head_dim, 0: n_embd */
    int when;     /* LLAMA_NORM_*: hp->qk_norm / hp->post_norms */
    size_t offset; /* offsetof(llama_layer, <float * field>) */
} llama_block_norm;
static const llama_block_norm llama_block_norms[] = {
    {"attn_norm", 0, LLAMA_NORM_ALWAYS, offsetof(llama_layer, attn_norm)},
    {"ffn_norm", 0, LLAMA_NORM_ALWAYS, offsetof(llama_layer, ffn_norm)},
    {"attn_q_norm", 1, LLAMA_NORM_QK, offsetof(llama_layer, q_norm)},
    {"attn_k_norm", 1, LLAMA_NORM_QK, offsetof(llama_layer, k_norm)},
    {"post_attention_norm", 0, LLAMA_NORM_POST, offsetof(llama_layer, post_attn_norm)},
    {"post_ffw_norm", 0, LLAMA_NORM_POST, offsetof(llama_layer, post_ffn_norm)},
};

static int load_vector_f32(const gguf_file *f, const char *name, int64_t n, float **out, qerr *e) {
    *out = qmalloc((size_t)n * sizeof(float), e);
    if (!*out) return -1;
    return load_matrix_f32(f, name, 1, n, *out, e);
}

static int load_bf16_matrix(const gguf_file *f, const char *name, int64_t rows, int64_t cols, bf16 **out, qerr *e) {
    *out = qmalloc((size_t)(rows * cols) * sizeof(bf16), e);
    if (!*out) return -1;
    int64_t chunk = 1024;
    float *tmp = qmalloc((size_t)(chunk * cols) * sizeof(float), e);
    if (!tmp) return -1;
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (!t) {
        free(tmp);
        return qerr_set(e, "tensor %s missing", name);
    }
    if ((int64_t)t->ne[0] != cols || (int64_t)(t->nelements / t->ne[0]) != rows) {
        free(tmp);
        return qerr_set(e, "tensor %s: unexpected shape", name);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        int64_t n = rows - r0 < chunk ? rows - r0 : chunk;
        if (gguf_tensor_rows_to_f32(t, (uint64_t)r0, (uint64_t)n, tmp, e)) {
            free(tmp);
            return qerr_prefix(e, "tensor %s", name);
        }
        bf16 *d = *out + r0 * cols;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n * cols; i++) d[i] = f32_to_bf16(tmp[i]);
    }
    free(tmp);
    return 0;
}

/* ------------------------------------------------------------ layer blob */

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

int llama_layer_layout_init(llama_layer_layout *lo, const llama_hparams *hp, frozen_kind kind, int blocksize,
                            int double_quant, qerr *e) {
    memset(lo, 0, sizeof *lo);
    if (kind != FROZEN_NF4 && kind != FROZEN_BF16 && kind != FROZEN_INT8)
        return qerr_set(e, "layer layout: linears are stored NF4, bf16 or int8, not kind %d", (int)kind);
    const int64_t bs = blocksize;
    int64_t nblocks = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &lo->rows[k], &lo->cols[k]);
        if (!llama_linear_present(hp, k)) { /* Phi-3's k, v, up: no elements, no blocks, no groups */
            lo->elem[k + 1] = lo->elem[k];
            lo->group[k + 1] = lo->group[k];
            lo->row[k + 1] = lo->row[k];
            continue;
        }
        lo->row[k + 1] = lo->row[k] + lo->rows[k];
        /* nf4_check_geometry also vets the bf16 padding unit: the same power of two */
        if (nf4_check_geometry(lo->rows[k], lo->cols[k], blocksize, e))
            return qerr_prefix(e, "layer layout, %s", llama_hparams_linears(hp)[k].peft);
        const int64_t nb = (lo->rows[k] * lo->cols[k] + bs - 1) / bs;
        lo->elem[k + 1] = lo->elem[k] + nb * bs;
        lo->group[k + 1] = lo->group[k] + (double_quant && kind == FROZEN_NF4
                                               ? (nb + NF4_NESTED_BLOCKSIZE - 1) / NF4_NESTED_BLOCKSIZE
                                               : 0);
        nblocks += nb;
    }
    lo->kind = kind;
    lo->blocksize = blocksize;
    lo->double_quant = kind == FROZEN_NF4 && double_quant ? 1 : 0;
    const int64_t n = lo->elem[LLAMA_N_LINEAR];
    if (kind == FROZEN_BF16) {
        lo->len[LLAMA_BLOB_DATA] = (size_t)n * sizeof(bf16);
        lo->nbytes = lo->len[LLAMA_BLOB_DATA];
        return 0;
    }
    if (kind == FROZEN_INT8) { /* CB codes, then each linear's SCB */
        lo->len[LLAMA_BLOB_DATA] = (size_t)n;
        lo->off[LLAMA_BLOB_SCALES] = align_up(lo->len[LLAMA_BLOB_DATA], LLAMA_BLOB_ALIGN);
        lo->len[LLAMA_BLOB_SCALES] = (size_t)lo->row[LLAMA_N_LINEAR] * sizeof(float);
        lo->nbytes = lo->off[LLAMA_BLOB_SCALES] + lo->len[LLAMA_BLOB_SCALES];
        lo->off[LLAMA_BLOB_NESTED] = lo->off[LLAMA_BLOB_OFFSETS] = lo->nbytes;
        return 0;
    }
    lo->len[LLAMA_BLOB_DATA] = (size_t)(n / 2);
    lo->off[LLAMA_BLOB_SCALES] = align_up(lo->len[LLAMA_BLOB_DATA], LLAMA_BLOB_ALIGN);
    lo->len[LLAMA_BLOB_SCALES] = (size_t)nblocks * (lo->double_quant ? 1 : sizeof(float));
    lo->nbytes = lo->off[LLAMA_BLOB_SCALES] + lo->len[LLAMA_BLOB_SCALES];
    if (lo->double_quant) {
        lo->off[LLAMA_BLOB_NESTED] = align_up(lo->nbytes, LLAMA_BLOB_ALIGN);
        lo->len[LLAMA_BLOB_NESTED] = (size_t)lo->group[LLAMA_N_LINEAR] * sizeof(float);
        lo->off[LLAMA_BLOB_OFFSETS] = lo->off[LLAMA_BLOB_NESTED] + lo->len[LLAMA_BLOB_NESTED];
        lo->len[LLAMA_BLOB_OFFSETS] = LLAMA_N_LINEAR * sizeof(float);
        lo->nbytes = lo->off[LLAMA_BLOB_OFFSETS] + lo->len[LLAMA_BLOB_OFFSETS];
    } else {
        lo->off[LLAMA_BLOB_NESTED] = lo->off[LLAMA_BLOB_OFFSETS] = lo->nbytes;
    }
    return 0;
}

/* Where linear k's buffers start in a blob laid out as lo. */
static void layer_linear_ptrs(const llama_layer_layout *lo, uint8_t *blob, int k, uint8_t **data, void **scales,
                              float **nested) {
    const int64_t b0 = lo->elem[k] / lo->blocksize;
    if (lo->kind == FROZEN_BF16) {
        *data = blob + lo->off[LLAMA_BLOB_DATA] + (size_t)lo->elem[k] * sizeof(bf16);
        *scales = NULL;
        *nested = NULL;
        return;
    }
    if (lo->kind == FROZEN_INT8) {
        *data = blob + lo->off[LLAMA_BLOB_DATA] + (size_t)lo->elem[k];
        *scales = blob + lo->off[LLAMA_BLOB_SCALES] + (size_t)lo->row[k] * sizeof(float);
        *nested = NULL;
        return;
    }
    *data = blob + lo->off[LLAMA_BLOB_DATA] + (size_t)(lo->elem[k] / 2);
    *scales = blob + lo->off[LLAMA_BLOB_SCALES] + (size_t)b0 * (lo->double_quant ? 1 : sizeof(float));
    *nested = lo->double_quant ? (float *)(blob + lo->off[LLAMA_BLOB_NESTED]) + lo->group[k] : NULL;
}

int llama_layer_alloc(llama_layer *L, const llama_layer_layout *lo, qerr *e) {
    L->blob = NULL;
    const size_t cap = align_up(lo->nbytes > 0 ? lo->nbytes : 1, LLAMA_BLOB_ALIGN);
    uint8_t *blob = aligned_alloc(LLAMA_BLOB_ALIGN, cap);
    if (!blob) {
        memset(L->nf4, 0, sizeof L->nf4);
        memset(L->lin, 0, sizeof L->lin);
        return qerr_set(e, "out of memory (a %zu-byte layer)", lo->nbytes);
    }
    memset(blob, 0, cap);
    if (llama_layer_views(L, lo, blob, e)) {
        free(blob);
        return -1;
    }
    return 0;
}

int llama_layer_views(llama_layer *L, const llama_layer_layout *lo, uint8_t *blob, qerr *e) {
    L->blob = NULL;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        uint8_t *data;
        void *scales;
        float *nested;
        layer_linear_ptrs(lo, blob, k, &data, &scales, &nested);
        frozen_weight *w = &L->lin[k];
        *w = (frozen_weight){.out = lo->rows[k], .in = lo->cols[k], .kind = lo->kind};
        if (lo->rows[k] == 0) { /* an absent slot (Phi-3's k, v, up): out = 0, no storage */
            memset(&L->nf4[k], 0, sizeof L->nf4[k]);
            L->w_bf16[k] = NULL;
            continue;
        }
        if (lo->kind == FROZEN_NF4) {
            if (nf4_view(&L->nf4[k], lo->rows[k], lo->cols[k], lo->blocksize, lo->double_quant, data, scales,
                         nested, e)) {
                memset(L->nf4, 0, sizeof L->nf4); /* no view into the blob survives */
                memset(L->lin, 0, sizeof L->lin);
                return -1;
            }
            w->nf4 = &L->nf4[k];
        } else if (lo->kind == FROZEN_INT8) {
            memset(&L->nf4[k], 0, sizeof L->nf4[k]);
            L->w_bf16[k] = NULL;
            w->cb = (const int8_t *)data;
            w->scb = scales;
        } else {
            L->w_bf16[k] = (bf16 *)data;
            w->w_bf16 = L->w_bf16[k];
        }
    }
    L->blob = blob;
    L->layout = *lo;
    return 0;
}

void llama_layer_seal(llama_layer *L) {
    const llama_layer_layout *lo = &L->layout;
    if (lo->kind != FROZEN_NF4 || !lo->double_quant) return;
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        memcpy(L->blob + lo->off[LLAMA_BLOB_OFFSETS] + (size_t)k * sizeof(float), &L->nf4[k].offset, sizeof(float));
}

void llama_layer_bind(llama_layer *L, uint8_t *blob) {
    const llama_layer_layout *lo = &L->layout;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        uint8_t *data;
        void *scales;
        float *nested;
        layer_linear_ptrs(lo, blob, k, &data, &scales, &nested);
        if (lo->rows[k] == 0) continue; /* an absent slot */
        if (lo->kind == FROZEN_NF4) {
            nf4_tensor *t = &L->nf4[k];
            t->packed = data;
            if (lo->double_quant) {
                t->absmax_q = scales;
                t->nested_absmax = nested;
                memcpy(&t->offset, blob + lo->off[LLAMA_BLOB_OFFSETS] + (size_t)k * sizeof(float), sizeof(float));
            } else {
                t->absmax = scales;
            }
            t->is_view = 1;
            L->lin[k].nf4 = t;
        } else if (lo->kind == FROZEN_INT8) {
            L->lin[k].cb = (const int8_t *)data;
            L->lin[k].scb = scales;
        } else {
            L->w_bf16[k] = (bf16 *)data;
            L->lin[k].w_bf16 = L->w_bf16[k];
        }
    }
    L->blob = blob;
}

/* The linear holding layer element x (0 <= x < elem[7]). */
static int layer_linear_of(const llama_layer_layout *lo, int64_t x) {
    int k = 0;
    while (k + 1 < LLAMA_N_LINEAR && x >= lo->elem[k + 1]) k++;
    return k;
}

/* The NESTED group (index into the section) holding layer element x. */
static int64_t layer_group_of(const llama_layer_layout *lo, int64_t x) {
    const int k = layer_linear_of(lo, x);
    return lo->group[k] + (x - lo->elem[k]) / lo->blocksize / NF4_NESTED_BLOCKSIZE;
}

int llama_layer_range_bytes(const llama_layer_layout *lo, int64_t x0, int64_t x1,
                            llama_byte_range out[LLAMA_BLOB_N_SECTIONS], qerr *e) {
    const int64_t bs = lo->blocksize, n = lo->elem[LLAMA_N_LINEAR];
    if (x0 < 0 || x0 > x1 || x1 > n || x0 % bs || x1 % bs)
        return qerr_set(e, "layer range [%lld, %lld): expected block boundaries (multiples of %lld) within [0, %lld]",
                        (long long)x0, (long long)x1, (long long)bs, (long long)n);
    if (lo->kind == FROZEN_INT8)
        return qerr_set(e, "FULL_SHARD of an int8 base (load_in_8bit) is not implemented; use load_in_4bit (NF4), "
                           "or SHARD_GRAD_OP / NO_SHARD");
    for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++) out[s] = (llama_byte_range){.off = lo->off[s], .len = 0};
    if (x0 == x1) return 0;
    if (lo->kind == FROZEN_BF16) {
        out[LLAMA_BLOB_DATA] = (llama_byte_range){lo->off[LLAMA_BLOB_DATA] + (size_t)x0 * sizeof(bf16),
                                                  (size_t)(x1 - x0) * sizeof(bf16)};
        return 0;
    }
    const size_t s = lo->double_quant ? 1 : sizeof(float);
    out[LLAMA_BLOB_DATA] = (llama_byte_range){lo->off[LLAMA_BLOB_DATA] + (size_t)(x0 / 2), (size_t)((x1 - x0) / 2)};
    out[LLAMA_BLOB_SCALES] = (llama_byte_range){lo->off[LLAMA_BLOB_SCALES] + (size_t)(x0 / bs) * s,
                                                (size_t)((x1 - x0) / bs) * s};
    if (lo->double_quant) {
        const int64_t g0 = layer_group_of(lo, x0), g1 = layer_group_of(lo, x1 - 1) + 1;
        out[LLAMA_BLOB_NESTED] = (llama_byte_range){lo->off[LLAMA_BLOB_NESTED] + (size_t)g0 * sizeof(float),
                                                    (size_t)(g1 - g0) * sizeof(float)};
        const int k0 = layer_linear_of(lo, x0);
        int k1 = layer_linear_of(lo, x1 - 1) + 1;
        /* a range ending at a linear's edge also carries the empty slots right after it (Phi-3's k, v after its
         * fused qkv, up after gate_up), so that the OFFSETS ranges of cuts still tile the section */
        if (x1 == lo->elem[k1])
            while (k1 < LLAMA_N_LINEAR && lo->elem[k1 + 1] == lo->elem[k1]) k1++;
        out[LLAMA_BLOB_OFFSETS] = (llama_byte_range){lo->off[LLAMA_BLOB_OFFSETS] + (size_t)k0 * sizeof(float),
                                                     (size_t)(k1 - k0) * sizeof(float)};
    }
    return 0;
}

/* FULL_SHARD loading: rows of a GGUF linear in HF order (llama_rows_fn). Q and K of
 * the llama architecture are read in whole heads and un-permuted. */
typedef struct gguf_rows_arg {
    const gguf_file *f;
    const llama_hparams *hp;
} gguf_rows_arg;

/* Give a tensor's mapped pages back (MADV_DONTNEED on a read-only file mapping: touched again, they are
 * re-read from the page cache), so that a FULL_SHARD rank that streamed a linear through does not keep it
 * resident: mapped pages count in the rank's RSS. */
static void release_pages(const gguf_tensor *t) {
    if (!t || !t->nbytes) return;
    const uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)t->data, b = a + t->nbytes;
    const uintptr_t a0 = (a + pg - 1) & ~(pg - 1), b0 = b & ~(pg - 1);
    if (b0 > a0) madvise((void *)a0, b0 - a0, MADV_DONTNEED);
}

static int gguf_rows(void *argp, int l, int k, int64_t row0, int64_t nrows, float *dst, qerr *e) {
    const gguf_rows_arg *a = argp;
    const llama_hparams *hp = a->hp;
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s.weight", l, llama_linears[k].gguf);
    const gguf_tensor *t = gguf_find_tensor(a->f, name);
    int64_t rows, cols;
    llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &rows, &cols);
    if (!t) return qerr_set(e, "tensor %s missing", name);
    if ((int64_t)t->ne[0] != cols || (int64_t)(t->nelements / t->ne[0]) != rows)
        return qerr_set(e, "tensor %s: expected shape [%lld, %lld] (HF order), got ne = {%llu, %llu}", name,
                        (long long)rows, (long long)cols, (unsigned long long)t->ne[0],
                        (unsigned long long)t->ne[1]);
    const int permuted = (k == LLAMA_Q || k == LLAMA_K) && hp->arch == LLAMA_ARCH_LLAMA;
    if (!permuted) {
        int rc = gguf_tensor_rows_to_f32(t, (uint64_t)row0, (uint64_t)nrows, dst, e);
        release_pages(t);
        return rc ? qerr_prefix(e, "tensor %s", name) : 0;
    }
    const int64_t hd = hp->head_dim, h0 = row0 / hd, h1 = (row0 + nrows + hd - 1) / hd;
    float *tmp = qmalloc((size_t)((h1 - h0) * hd * cols) * sizeof(float), e);
    if (!tmp) return -1;
    if (gguf_tensor_rows_to_f32(t, (uint64_t)(h0 * hd), (uint64_t)((h1 - h0) * hd), tmp, e)) {
        free(tmp);
        return qerr_prefix(e, "tensor %s", name);
    }
    release_pages(t);
    llama_unpermute_rows(tmp, (int)(h1 - h0), (int)hd, cols);
    memcpy(dst, tmp + (row0 - h0 * hd) * cols, (size_t)(nrows * cols) * sizeof(float));
    free(tmp);
    return 0;
}

int llama_load_gguf(const gguf_file *f, int load_in_4bit, int double_quant, int max_pos, llama_model *m, qerr *e) {
    return llama_load_gguf_sharded(f, load_in_4bit, double_quant, max_pos, NULL, m, e);
}

int llama_load_gguf_sharded(const gguf_file *f, int load_in_4bit, int double_quant, int max_pos, comm *c,
                            llama_model *m, qerr *e) {
    memset(m, 0, sizeof *m);
    if (llama_hparams_from_gguf(f, &m->hp, e)) return -1;
    if (c && m->hp.arch == LLAMA_ARCH_PHI3)
        return qerr_set(e, "FULL_SHARD of a Phi-3 base (fused qkv_proj / gate_up_proj) is not implemented yet; use "
                           "SHARD_GRAD_OP or NO_SHARD");
    if (c && m->hp.arch == LLAMA_ARCH_GEMMA3)
        return qerr_set(e, "FULL_SHARD of a gemma3 base is not implemented yet; use SHARD_GRAD_OP or NO_SHARD");
    const llama_hparams *hp = &m->hp;
    int64_t D = hp->d_model, V = hp->vocab, hd = hp->head_dim;
    m->load_in_4bit = load_in_4bit == LLAMA_BASE_NF4;
    m->load_in_8bit = load_in_4bit == LLAMA_BASE_INT8;
    m->double_quant = double_quant;
    if (c && m->load_in_8bit)
        return qerr_set(e, "FULL_SHARD of an int8 base (load_in_8bit) is not implemented; use load_in_4bit (NF4), "
                           "or SHARD_GRAD_OP / NO_SHARD");

    if (load_bf16_matrix(f, "token_embd.weight", V, D, &m->tok_embd, e)) return -1;
    m->n_params += V * D;
    if (hp->tied_embeddings) {
        m->lm_head_w = m->tok_embd;
    } else {
        if (load_bf16_matrix(f, "output.weight", V, D, &m->lm_head_w, e)) return -1;
        m->n_params += V * D;
    }
    m->embed = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = m->tok_embd};
    m->lm_head = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = m->lm_head_w};
    if (load_vector_f32(f, "output_norm.weight", D, &m->out_norm, e)) return -1;
    m->n_params += D;

    m->layers = qcalloc((size_t)hp->n_layer, sizeof *m->layers, e);
    if (!m->layers) return -1;
    llama_layer_layout lo;
    if (llama_layer_layout_init(&lo, hp, llama_base_kind(load_in_4bit), NF4_DEFAULT_BLOCKSIZE, double_quant, e))
        return -1;
    int64_t max_el = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) max_el = lo.rows[k] * lo.cols[k] > max_el ? lo.rows[k] * lo.cols[k] : max_el;
    llama_fsdp *fs = NULL;
    if (c) { /* FULL_SHARD: this rank's ranges only, never a whole linear */
        if (!(fs = qcalloc(1, sizeof *fs, e))) return -1;
        if (llama_fsdp_init(fs, c, &lo, hp->n_layer, e)) {
            free(fs);
            return -1;
        }
        m->fsdp = fs; /* freed with the model */
        max_el = 0;
    }
    gguf_rows_arg ra = {.f = f, .hp = hp};
    float *tmp = qmalloc((size_t)(max_el ? max_el : 1) * sizeof(float), e);
    if (!tmp) return -1;
    char name[96];
    for (int l = 0; l < hp->n_layer; l++) {
        llama_layer *L = &m->layers[l];
        for (size_t j = 0; j < sizeof llama_block_norms / sizeof *llama_block_norms; j++) {
            const llama_block_norm *bn = &llama_block_norms[j];
            if ((bn->when == LLAMA_NORM_QK && !hp->qk_norm) || (bn->when == LLAMA_NORM_POST && !hp->post_norms))
                continue;
            const int64_t len = bn->per_head ? hd : D;
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, bn->gguf);
            if (load_vector_f32(f, name, len, (float **)((char *)L + bn->offset), e)) goto fail;
            m->n_params += len;
        }
        if (fs) {
            if (llama_fsdp_load_layer(fs, l, gguf_rows, &ra, e)) goto fail;
            for (int k = 0; k < LLAMA_N_LINEAR; k++) {
                m->n_quantized_params += lo.rows[k] * lo.cols[k];
                if (hp->qkv_bias && k <= LLAMA_V) {
                    snprintf(name, sizeof name, "blk.%d.%s.bias", l, llama_linears[k].gguf);
                    if (load_vector_f32(f, name, lo.rows[k], &L->bias[k], e)) goto fail;
                    m->n_params += lo.rows[k];
                }
            }
            m->quantized_bytes += (int64_t)lo.nbytes;
            continue;
        }
        if (llama_layer_alloc(L, &lo, e)) goto fail;
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const int64_t rows = lo.rows[k], cols = lo.cols[k];
            if (!llama_linear_present(hp, k)) continue; /* a slot a fused linear took over */
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, llama_hparams_linears(hp)[k].gguf);
            if (load_matrix_f32(f, name, rows, cols, tmp, e)) goto fail;
            /* llama's converter permutes Q/K for ggml's interleaved RoPE; qwen2's (NEOX RoPE) does not */
            if (k == LLAMA_Q && hp->arch == LLAMA_ARCH_LLAMA) llama_unpermute_rows(tmp, hp->n_head, (int)hd, cols);
            if (k == LLAMA_K && hp->arch == LLAMA_ARCH_LLAMA) llama_unpermute_rows(tmp, hp->n_kv_head, (int)hd, cols);
            if (hp->qkv_bias && k <= LLAMA_V) {
                snprintf(name, sizeof name, "blk.%d.%s.bias", l, llama_hparams_linears(hp)[k].gguf);
                if (load_vector_f32(f, name, rows, &L->bias[k], e)) goto fail;
                L->lin[k].bias = L->bias[k];
                m->n_params += rows;
            }
            if (m->load_in_8bit) {
                if (int8_quantize_rows(tmp, rows, cols, (int8_t *)L->lin[k].cb, (float *)L->lin[k].scb, e)) {
                    qerr_prefix(e, "%s", name);
                    goto fail;
                }
            } else if (load_in_4bit) {
                if (nf4_quantize_into(tmp, &L->nf4[k], e)) goto fail;
            } else {
                for (int64_t i = 0; i < rows * cols; i++) L->w_bf16[k][i] = f32_to_bf16(tmp[i]);
            }
            m->n_quantized_params += rows * cols;
        }
        llama_layer_seal(L);
        m->quantized_bytes += (int64_t)lo.nbytes;
    }
    free(tmp);
    m->n_params += m->n_quantized_params;
    if (fs) {
        /* nothing of the file stays resident: the tables and norms were copied, the linears sharded */
        for (uint64_t i = 0; i < gguf_n_tensors(f); i++) release_pages(gguf_tensor_at(f, i));
        m->fsdp = NULL;
        if (llama_fsdp_attach(fs, m, e)) {
            llama_fsdp_free(fs);
            free(fs);
            return -1;
        }
        for (int l = 0; l < hp->n_layer; l++)
            for (int k = 0; k <= LLAMA_V; k++) m->layers[l].lin[k].bias = m->layers[l].bias[k];
    }
    if (llama_rope_init(&m->rope, hp, max_pos, e) || llama_rope_local_init(&m->rope_local, hp, max_pos, e)) return -1;
    return 0;
fail:
    free(tmp);
    return -1;
}

void llama_free(llama_model *m) {
    const int sharded = m->fsdp != NULL;
    if (m->fsdp) { /* the layers' blobs are its scratches */
        llama_fsdp_free(m->fsdp);
        free(m->fsdp);
        m->fsdp = NULL;
    }
    if (m->layers) {
        for (int l = 0; l < m->hp.n_layer; l++) {
            llama_layer *L = &m->layers[l];
            free(L->attn_norm);
            free(L->ffn_norm);
            free(L->q_norm);
            free(L->k_norm);
            free(L->post_attn_norm);
            free(L->post_ffn_norm);
            for (int k = 0; k < LLAMA_N_LINEAR; k++) {
                free(L->bias[k]);
                nf4_free(&L->nf4[k]); /* a view into the blob: forgotten; owned (no blob): freed */
                if (!L->blob && !sharded) free(L->w_bf16[k]); /* owned only in a layer built by hand */
            }
            free(L->blob);
        }
        free(m->layers);
    }
    if (m->lm_head_w != m->tok_embd) free(m->lm_head_w);
    free(m->tok_embd);
    free(m->out_norm);
    rope_table_free(&m->rope);
    rope_table_free(&m->rope_local);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------ LoRA */

int lora_set_init(lora_set *ls, const llama_model *m, int r, float alpha, float dropout, int use_rslora,
                  const int target[LLAMA_N_LINEAR], uint64_t seed, qerr *e) {
    return lora_set_init_backend(ls, NULL, m, r, alpha, dropout, use_rslora, target, seed, e);
}

const float *lora_set_params_host(const lora_set *ls, const float *arr, qerr *e) {
    if (!ls->be || ls->be->host_data) return arr;
    float *h = qmalloc((size_t)(ls->n_params ? ls->n_params : 1) * sizeof(float), e);
    if (!h) return NULL;
    ls->be->sync();
    ls->be->copy_d2h(h, arr, (size_t)ls->n_params * sizeof(float));
    return h;
}

void lora_set_host_release(const lora_set *ls, const float *arr, const float *host) {
    if (host && host != arr) free((void *)host);
    (void)ls;
}

int lora_set_init_backend(lora_set *ls, const ag_backend *be, const llama_model *m, int r, float alpha,
                          float dropout, int use_rslora, const int target[LLAMA_N_LINEAR], uint64_t seed, qerr *e) {
    return lora_set_init_saved(ls, be, m, r, alpha, dropout, use_rslora, target, NULL, seed, e);
}

const frozen_weight *lora_set_embed(const lora_set *ls, const llama_model *m) {
    return ls && ls->save[LORA_SAVE_EMBED] ? &ls->save_w[LORA_SAVE_EMBED] : &m->embed;
}

const frozen_weight *lora_set_lm_head(const lora_set *ls, const llama_model *m) {
    return ls && ls->save[LORA_SAVE_LM_HEAD] ? &ls->save_w[LORA_SAVE_LM_HEAD] : &m->lm_head;
}

int lora_set_init_saved(lora_set *ls, const ag_backend *be, const llama_model *m, int r, float alpha,
                        float dropout, int use_rslora, const int target[LLAMA_N_LINEAR],
                        const int save[LORA_N_SAVE], uint64_t seed, qerr *e) {
    memset(ls, 0, sizeof *ls);
    if (save && save[LORA_SAVE_EMBED] && m->hp.embed_scale != 0.0f)
        return qerr_set(e, "lora_modules_to_save: embed_tokens of a model that scales its embedding (gemma3: "
                           "x sqrt(d)) is not implemented; train lm_head only, or no saved module");
    ls->be = be;
    int nl = m->hp.n_layer;
    ls->r = r;
    ls->alpha = alpha;
    ls->dropout = dropout;
    ls->use_rslora = use_rslora;
    ls->scaling = use_rslora ? alpha / sqrtf((float)r) : alpha / (float)r;
    ls->n_layer = nl;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) ls->target[k] = target[k] && llama_linear_present(&m->hp, k);
    int64_t total = 0;
    ls->offset = qmalloc((size_t)nl * LLAMA_N_LINEAR * sizeof(int64_t), e);
    ls->A = qcalloc((size_t)nl * LLAMA_N_LINEAR, sizeof(tensor), e);
    ls->B = qcalloc((size_t)nl * LLAMA_N_LINEAR, sizeof(tensor), e);
    ls->ad = qcalloc((size_t)nl * LLAMA_N_LINEAR, sizeof(lora_adapter), e);
    ls->layer_offset = qmalloc((size_t)(nl + 1) * sizeof(int64_t), e);
    if (!ls->offset || !ls->A || !ls->B || !ls->ad || !ls->layer_offset) return -1;
    for (int l = 0; l < nl; l++) {
        ls->layer_offset[l] = total;
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const frozen_weight *w = &m->layers[l].lin[k];
            const int on = target[k] && w->out > 0; /* never on a slot a fused linear took over */
            ls->offset[l * LLAMA_N_LINEAR + k] = on ? total : -1;
            if (on) total += (int64_t)r * w->in + w->out * (int64_t)r;
        }
    }
    ls->layer_offset[nl] = total;
    const int64_t V = m->hp.vocab, D = m->hp.d_model;
    for (int k = 0; k < LORA_N_SAVE; k++) {
        ls->save[k] = save && save[k];
        ls->save_offset[k] = ls->save[k] ? total : -1;
        if (ls->save[k]) total += V * D;
    }
    ls->n_params = total;
    /* the initial values are computed in host memory (hp), then uploaded when the backend's is not */
    float *hp = qcalloc((size_t)(total ? total : 1), sizeof(float), e);
    if (!hp) return -1;
    if (be) {
        ls->params = be->alloc((size_t)total * sizeof(float));
        ls->grads = be->alloc((size_t)total * sizeof(float));
        if (!ls->params || !ls->grads) {
            free(hp);
            return qerr_set(e, "[lora] out of %s memory for %lld adapter parameters", be->name, (long long)total);
        }
        be->zero(ls->grads, (size_t)total * sizeof(float));
    } else {
        ls->params = hp;
        ls->grads = qcalloc((size_t)(total ? total : 1), sizeof(float), e);
        if (!ls->grads) return -1;
    }
    for (int l = 0; l < nl; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            int idx = l * LLAMA_N_LINEAR + k;
            int64_t off = ls->offset[idx];
            if (off < 0) continue;
            const frozen_weight *w = &m->layers[l].lin[k];
            float *A = ls->params + off, *B = A + (int64_t)r * w->in, *Ah = hp + off;
            float bound = 1.0f / sqrtf((float)w->in);
            uint64_t stream = (uint64_t)idx + 1;
            for (int64_t i = 0; i < (int64_t)r * w->in; i++)
                Ah[i] = (2.0f * rng_uniform(seed, stream, (uint64_t)i) - 1.0f) * bound;
            /* B = 0 (calloc) */
            tensor *tA = &ls->A[idx], *tB = &ls->B[idx];
            *tA = (tensor){.ndim = 2, .shape = {r, w->in}, .numel = (int64_t)r * w->in, .dtype = AG_F32,
                           .data = A, .grad = ls->grads + off, .requires_grad = 1};
            *tB = (tensor){.ndim = 2, .shape = {w->out, r}, .numel = w->out * (int64_t)r, .dtype = AG_F32,
                           .data = B, .grad = ls->grads + off + (int64_t)r * w->in, .requires_grad = 1};
            ls->ad[idx] = (lora_adapter){.A = tA, .B = tB, .r = r, .scaling = ls->scaling,
                                         .dropout = dropout, .stream = 0x10000u + (uint64_t)idx};
        }
    for (int k = 0; k < LORA_N_SAVE; k++) {
        if (!ls->save[k]) continue;
        const int64_t off = ls->save_offset[k];
        const frozen_weight *src = k == LORA_SAVE_EMBED ? &m->embed : &m->lm_head;
        if (src->kind != FROZEN_F32 || src->w_f32) frozen_rows_f32(src, 0, V, hp + off); /* else: zeros */
        ls->save_t[k] = (tensor){.ndim = 2, .shape = {V, D}, .numel = V * D, .dtype = AG_F32,
                                 .data = ls->params + off, .grad = ls->grads + off, .requires_grad = 1};
        ls->save_w[k] = (frozen_weight){.out = V, .in = D, .kind = FROZEN_F32, .w_f32 = ls->params + off};
    }
    if (be) {
        be->copy_h2d(ls->params, hp, (size_t)total * sizeof(float));
        free(hp);
    }
    return 0;
}

void lora_set_free(lora_set *ls) {
    if (ls->be) {
        ls->be->free(ls->params);
        ls->be->free(ls->grads);
        ls->params = ls->grads = NULL;
    }
    free(ls->params);
    free(ls->grads);
    free(ls->offset);
    free(ls->layer_offset);
    free(ls->A);
    free(ls->B);
    free(ls->ad);
    memset(ls, 0, sizeof *ls);
}

const lora_adapter *lora_set_get(const lora_set *ls, int layer, int module) {
    if (!ls) return NULL;
    int idx = layer * LLAMA_N_LINEAR + module;
    return ls->offset[idx] >= 0 ? &ls->ad[idx] : NULL;
}

/* ------------------------------------------------------------------ forward */

/* A (n) fp32 host vector (a norm weight) as a 1-D tensor of the backend's memory (ag_stage). */
static tensor *wrap_vector(ag_ctx *ctx, int64_t n, float *w) {
    tensor *t = ag_wrap(ctx, AG_F32, 1, n, (void *)ag_stage(ctx, w, (size_t)n * sizeof(float)), NULL);
    t->ndim = 1;
    t->shape[0] = n;
    return t;
}

const rope_table *llama_layer_rope(const llama_model *m, int l) {
    return llama_layer_window(&m->hp, l) > 0 && m->rope_local.cos ? &m->rope_local : &m->rope;
}

tensor *llama_embed(ag_ctx *ctx, const llama_model *m, const int32_t *ids, int64_t n) {
    tensor *x = op_embedding(ctx, &m->embed, ids, n);
    if (m->hp.embed_scale != 0.0f) ctx->be->scale(x->data, x->numel, m->hp.embed_scale); /* no gradient flows here */
    return x;
}

/* Dropout on the input of layer l's `module` in this pass: its linear reads the input's fp32 values. */
static int lora_input_dropout(const ag_ctx *ctx, const lora_set *ls, int l, int module) {
    const lora_adapter *lo = lora_set_get(ls, l, module);
    return lo && lo->dropout > 0.0f && ctx->training;
}

static tensor *batch_attention(ag_ctx *ctx, const void *argp, tensor *q, tensor *k, tensor *v);

/* The two halves of a block: x -> x + attention(norm(x)) and h -> h + MLP(norm(h)).
 * A pre-norm's output is read only by its projections, as their bf16 operand, unless one of them applies
 * LoRA dropout to it; RoPE's outputs only by the batch attention, as bf16: those ops are told so
 * (ctx->f32_unread) and skip their fp32 output in bf16 mode (autograd/ops.c memo_output). */
static tensor *layer_attention_half(ag_ctx *ctx, const llama_model *m, const lora_set *ls, int l, tensor *x,
                                    const int32_t *pos, llama_attention_fn attention, const void *arg) {
    const llama_hparams *hp = &m->hp;
    const llama_layer *L = &m->layers[l];
    tensor *an = wrap_vector(ctx, hp->d_model, L->attn_norm);
    ctx->f32_unread = !lora_input_dropout(ctx, ls, l, LLAMA_Q) && !lora_input_dropout(ctx, ls, l, LLAMA_K) &&
                      !lora_input_dropout(ctx, ls, l, LLAMA_V);
    tensor *h = op_rmsnorm(ctx, x, an, hp->rms_eps);
    tensor *q, *k, *v;
    if (hp->arch == LLAMA_ARCH_PHI3) {
        /* modeling_phi3.py Phi3Attention: qkv = qkv_proj(h); q, k, v = its first H*hd, next KVH*hd, last KVH*hd
         * columns (one linear, one adapter; the three are column views copied out) */
        const int64_t qd = (int64_t)hp->n_head * hp->head_dim, kd = (int64_t)hp->n_kv_head * hp->head_dim;
        tensor *qkv = op_linear(ctx, h, &L->lin[LLAMA_Q], lora_set_get(ls, l, LLAMA_Q));
        q = op_cols(ctx, qkv, 0, qd);
        k = op_cols(ctx, qkv, qd, kd);
        v = op_cols(ctx, qkv, qd + kd, kd);
    } else { /* q, k, v read the same h: their LoRA A products run as one GEMM (op_linear_group) */
        const frozen_weight *const w[3] = {&L->lin[LLAMA_Q], &L->lin[LLAMA_K], &L->lin[LLAMA_V]};
        const lora_adapter *const lo[3] = {lora_set_get(ls, l, LLAMA_Q), lora_set_get(ls, l, LLAMA_K),
                                           lora_set_get(ls, l, LLAMA_V)};
        tensor *y[3];
        op_linear_group(ctx, h, 3, w, lo, y);
        q = y[0], k = y[1], v = y[2];
    }
    if (hp->qk_norm) { /* Gemma3Attention: q_norm / k_norm over each head's head_dim, before RoPE */
        const int64_t N = q->shape[0], hd = hp->head_dim;
        q = op_reshape(ctx, op_rmsnorm(ctx, op_reshape(ctx, q, N * hp->n_head, hd), wrap_vector(ctx, hd, L->q_norm),
                                       hp->rms_eps), N, hd * hp->n_head);
        k = op_reshape(ctx, op_rmsnorm(ctx, op_reshape(ctx, k, N * hp->n_kv_head, hd), wrap_vector(ctx, hd, L->k_norm),
                                       hp->rms_eps), N, hd * hp->n_kv_head);
    }
    const rope_table *rt = llama_layer_rope(m, l);
    ctx->f32_unread = attention == batch_attention;
    q = op_rope(ctx, q, hp->n_head, rt, pos);
    ctx->f32_unread = attention == batch_attention;
    k = op_rope(ctx, k, hp->n_kv_head, rt, pos);
    tensor *att = attention(ctx, arg, q, k, v);
    tensor *o = op_linear(ctx, att, &L->lin[LLAMA_O], lora_set_get(ls, l, LLAMA_O));
    if (hp->post_norms) o = op_rmsnorm(ctx, o, wrap_vector(ctx, hp->d_model, L->post_attn_norm), hp->rms_eps);
    return op_add_residual(ctx, x, o);
}

/* out_unread: the half runs again in backward and its output's value is not read (selective
 * mode's recompute): the down projection records its node without computing its output. */
static tensor *layer_mlp_half(ag_ctx *ctx, const llama_model *m, const lora_set *ls, int l, tensor *x,
                              int out_unread) {
    const llama_hparams *hp = &m->hp;
    const llama_layer *L = &m->layers[l];
    tensor *fn = wrap_vector(ctx, hp->d_model, L->ffn_norm);
    ctx->f32_unread = !lora_input_dropout(ctx, ls, l, LLAMA_GATE) && !lora_input_dropout(ctx, ls, l, LLAMA_UP);
    tensor *h2 = op_rmsnorm(ctx, x, fn, hp->rms_eps);
    tensor *g, *u;
    if (hp->arch == LLAMA_ARCH_PHI3) { /* Phi3MLP: gate, up = gate_up_proj(h2).chunk(2, dim=-1) */
        tensor *gu = op_linear(ctx, h2, &L->lin[LLAMA_GATE], lora_set_get(ls, l, LLAMA_GATE));
        g = op_cols(ctx, gu, 0, hp->d_ff);
        u = op_cols(ctx, gu, hp->d_ff, hp->d_ff);
    } else { /* gate and up read the same h2 (op_linear_group, as q/k/v) */
        const frozen_weight *const w[2] = {&L->lin[LLAMA_GATE], &L->lin[LLAMA_UP]};
        const lora_adapter *const lo[2] = {lora_set_get(ls, l, LLAMA_GATE), lora_set_get(ls, l, LLAMA_UP)};
        tensor *y[2];
        op_linear_group(ctx, h2, 2, w, lo, y);
        g = y[0], u = y[1];
    }
    ctx->f32_unread = !lora_input_dropout(ctx, ls, l, LLAMA_DOWN);
    tensor *mm = op_glu(ctx, g, u, hp->act_geglu ? AG_GLU_GELU_TANH : AG_GLU_SILU);
    const lora_adapter *ld = lora_set_get(ls, l, LLAMA_DOWN);
    /* a post-feed-forward norm reads the down projection's output: it must be computed */
    tensor *d = out_unread && !hp->post_norms ? op_linear_unread_output(ctx, mm, &L->lin[LLAMA_DOWN], ld)
                                              : op_linear(ctx, mm, &L->lin[LLAMA_DOWN], ld);
    if (hp->post_norms) d = op_rmsnorm(ctx, d, wrap_vector(ctx, hp->d_model, L->post_ffn_norm), hp->rms_eps);
    return op_add_residual(ctx, x, d);
}

tensor *llama_layer_forward(ag_ctx *ctx, const llama_model *m, const lora_set *ls, int l, tensor *x,
                            const int32_t *pos, llama_attention_fn attention, const void *arg) {
    x = layer_attention_half(ctx, m, ls, l, x, pos, attention, arg);
    return layer_mlp_half(ctx, m, ls, l, x, 0);
}

tensor *llama_output_norm(ag_ctx *ctx, const llama_model *m, tensor *x) {
    return op_rmsnorm(ctx, x, wrap_vector(ctx, m->hp.d_model, m->out_norm), m->hp.rms_eps);
}

typedef struct block_arg {
    const llama_model *m;
    const lora_set *ls;
    const llama_batch *b;
    int layer;
} block_arg;

/* Causal attention within the batch's rows and packed sequences. */
static tensor *batch_attention(ag_ctx *ctx, const void *argp, tensor *q, tensor *k, tensor *v) {
    const block_arg *a = argp;
    const llama_hparams *hp = &a->m->hp;
    return op_attention_window(ctx, q, k, v, a->b->B, a->b->T, hp->n_head, hp->n_kv_head, a->b->seq_ids,
                               llama_layer_window(hp, a->layer));
}

/* One block. Run again by a checkpoint's backward (ctx->recomputing), the block's output value is
 * not read, only its tape: the down projection then skips its frozen GEMM, as selective's MLP half
 * does (out_unread), 2·T·d_ff·d_model FLOPs per sequence and layer. */
static tensor *llama_block(ag_ctx *ctx, void *argp, tensor *x) {
    const block_arg *a = argp;
    x = layer_attention_half(ctx, a->m, a->ls, a->layer, x, a->b->position_ids, batch_attention, a);
    return layer_mlp_half(ctx, a->m, a->ls, a->layer, x, ctx->recomputing);
}

/* FULL_SHARD in backward: a node recorded after block l runs just before the
 * block's backward (and its recompute under checkpointing): it gathers layer
 * l, or waits for its prefetch, binds it, and starts gathering l − 1. It hangs
 * off a dummy tensor with a gradient so that backward always visits it. */
typedef struct fsdp_mark_saved {
    llama_fsdp *f;
    int layer;
} fsdp_mark_saved;

static void fsdp_mark_backward(ag_ctx *ctx, const ag_node *n) {
    const fsdp_mark_saved *s = n->saved;
    llama_fsdp_acquire(s->f, s->layer);
    llama_fsdp_prefetch(s->f, s->layer - 1);
}

static void fsdp_mark(ag_ctx *ctx, llama_fsdp *f, int l) {
    fsdp_mark_saved *s = ag_alloc_host_keep(ctx, sizeof *s);
    tensor *dummy = ag_alloc_host_keep(ctx, sizeof *dummy);
    memset(dummy, 0, sizeof *dummy);
    dummy->ndim = 1;
    dummy->shape[0] = 1;
    dummy->numel = 1;
    dummy->grad = ag_alloc_keep(ctx, sizeof(float));
    *s = (fsdp_mark_saved){.f = f, .layer = l};
    ag_record(ctx, fsdp_mark_backward, dummy, NULL, NULL, NULL, NULL)->saved = s;
}

/* Per-layer gradient buckets in backward: a node recorded before block l
 * runs just after the block's backward (recompute included), when every
 * gradient of layer l's adapters is final: it starts the bucket's reduction
 * (llama_grad_buckets_layer_done). */
typedef struct bucket_mark_saved {
    llama_grad_buckets *g;
    int layer;
} bucket_mark_saved;

static void bucket_mark_backward(ag_ctx *ctx, const ag_node *n) {
    const bucket_mark_saved *s = n->saved;
    llama_grad_buckets_layer_done(s->g, s->layer);
}

static void bucket_mark(ag_ctx *ctx, llama_grad_buckets *g, int l) {
    bucket_mark_saved *s = ag_alloc_host_keep(ctx, sizeof *s);
    tensor *dummy = ag_alloc_host_keep(ctx, sizeof *dummy);
    memset(dummy, 0, sizeof *dummy);
    dummy->ndim = 1;
    dummy->shape[0] = 1;
    dummy->numel = 1;
    dummy->grad = ag_alloc_keep(ctx, sizeof(float));
    *s = (bucket_mark_saved){.g = g, .layer = l};
    ag_record(ctx, bucket_mark_backward, dummy, NULL, NULL, NULL, NULL)->saved = s;
}

static tensor *llama_block_attention(ag_ctx *ctx, void *argp, tensor *x) {
    const block_arg *a = argp;
    return layer_attention_half(ctx, a->m, a->ls, a->layer, x, a->b->position_ids, batch_attention, a);
}

static tensor *llama_block_mlp(ag_ctx *ctx, void *argp, tensor *x) {
    const block_arg *a = argp;
    return layer_mlp_half(ctx, a->m, a->ls, a->layer, x, ctx->recomputing);
}

/* embed → blocks → final RMSNorm: the hidden states (B*T, D) the LM head reads,
 * recorded on the tape when ctx->recording. */
static tensor *llama_forward_trunk(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const llama_batch *b,
                                   int checkpointing) {
    const llama_hparams *hp = &m->hp;
    int64_t N = (int64_t)b->B * b->T;
    /* a trained embedding copy (lora_modules_to_save) is never scaled: lora_set_init_saved refuses it for gemma3 */
    tensor *x = ls && ls->save[LORA_SAVE_EMBED]
                    ? op_embedding_train(ctx, (tensor *)&ls->save_t[LORA_SAVE_EMBED], b->input_ids, N)
                    : llama_embed(ctx, m, b->input_ids, N);
    block_arg *args = ag_alloc_host(ctx, (size_t)hp->n_layer * sizeof *args);
    for (int l = 0; l < hp->n_layer; l++) {
        args[l] = (block_arg){.m = m, .ls = ls, .b = b, .layer = l};
        if (m->fsdp) { /* FULL_SHARD: layer l whole in a scratch, l + 1 on its way */
            llama_fsdp_acquire(m->fsdp, l);
            llama_fsdp_prefetch(m->fsdp, l + 1);
        }
        if (m->grad_buckets && ctx->recording) bucket_mark(ctx, m->grad_buckets, l); /* after the block's backward */
        if (!ctx->recording) {
            x = ag_run_discard(ctx, llama_block, &args[l], x);
        } else if (checkpointing == LLAMA_CKPT_SELECTIVE) {
            /* attention half kept (its GEMMs and the O(T) attention are not redone), MLP half
             * recomputed from its kept input: see llama.h and docs/design.md */
            x = ag_segment(ctx, llama_block_attention, &args[l], x);
            x = ag_checkpoint_kept(ctx, llama_block_mlp, &args[l], x);
        } else if (checkpointing == LLAMA_CKPT_OFFLOAD) {
            x = ag_checkpoint_offload(ctx, llama_block, &args[l], x); /* input to host memory on a device */
        } else if (checkpointing) {
            x = ag_checkpoint(ctx, llama_block, &args[l], x);
        } else {
            x = ag_segment(ctx, llama_block, &args[l], x); /* releases the block's intermediates */
        }
        if (m->fsdp && ctx->recording) fsdp_mark(ctx, m->fsdp, l); /* before both halves' backward */
    }
    if (checkpointing == LLAMA_CKPT_OFFLOAD) x = ag_offload_settle(ctx, x); /* the last output out of its slot */
    return llama_output_norm(ctx, m, x);
}

tensor *llama_forward_loss(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const llama_batch *b,
                           float scale, int checkpointing, double *loss_sum, int64_t *n_tokens) {
    tensor *h = llama_forward_trunk(ctx, m, ls, b, checkpointing);
    if (ls && ls->save[LORA_SAVE_LM_HEAD])
        return op_lm_head_ce_train(ctx, h, &ls->save_w[LORA_SAVE_LM_HEAD], (tensor *)&ls->save_t[LORA_SAVE_LM_HEAD],
                                   b->targets, AG_CE_TARGETS, 0, scale, NULL, loss_sum, n_tokens);
    return op_lm_head_ce(ctx, h, &m->lm_head, b->targets, scale, loss_sum, n_tokens);
}

tensor *llama_forward_sampled_loss(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const llama_batch *b,
                                   float scale, int checkpointing, uint64_t sample_seed, int32_t *labels,
                                   double *loss_sum, int64_t *n_tokens) {
    tensor *h = llama_forward_trunk(ctx, m, ls, b, checkpointing);
    if (ls && ls->save[LORA_SAVE_LM_HEAD])
        return op_lm_head_ce_train(ctx, h, &ls->save_w[LORA_SAVE_LM_HEAD], (tensor *)&ls->save_t[LORA_SAVE_LM_HEAD],
                                   b->targets, AG_CE_SAMPLED, sample_seed, scale, labels, loss_sum, n_tokens);
    return op_lm_head_ce_sampled(ctx, h, &m->lm_head, b->targets, sample_seed, scale, labels, loss_sum, n_tokens);
}

tensor *llama_forward_hidden(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const llama_batch *b) {
    int rec = ctx->recording;
    ctx->recording = 0;
    tensor *h = llama_forward_trunk(ctx, m, ls, b, 0);
    ctx->recording = rec;
    return h;
}

void llama_logits_rows(ag_ctx *ctx, const llama_model *m, const tensor *h, int64_t row0, int64_t n, float *out) {
    llama_logits_rows_ls(ctx, m, NULL, h, row0, n, out);
}

void llama_logits_rows_ls(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const tensor *h, int64_t row0,
                          int64_t n, float *out) {
    const frozen_weight *head = lora_set_lm_head(ls, m);
    int64_t D = m->hp.d_model, V = m->hp.vocab;
    const float *hd = (const float *)h->data + row0 * D;
    const ag_backend *be = ctx->be;
    ag_mark mk = ag_arena_mark(ctx);
    if (ctx->bf16) {
        bf16 *hb = ag_alloc(ctx, (size_t)(n * D) * sizeof(bf16));
        be->to_bf16(hd, hb, n * D);
        /* a bf16 head is read in place (the backend's copy of it); others are converted */
        const void *wb = head->kind == FROZEN_BF16 ? be->frozen_data(head) : NULL;
        if (!wb) {
            bf16 *w2 = ag_alloc(ctx, (size_t)(V * D) * sizeof(bf16));
            be->frozen_rows_bf16(head, 0, V, w2);
            wb = w2;
        }
        be->gemm(0, 1, n, V, D, 1.0f, hb, D, wb, D, 0.0f, out, V, GEMM_BF16);
    } else {
        float *wf = ag_alloc(ctx, (size_t)(V * D) * sizeof(float));
        be->frozen_rows_f32(head, 0, V, wf);
        be->gemm(0, 1, n, V, D, 1.0f, hd, D, wf, D, 0.0f, out, V, GEMM_F32);
    }
    ag_arena_reset(ctx, mk);
}
