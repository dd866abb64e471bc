/* model/hf.c — Hugging Face model directories as a base model (see hf.h).
 *
 * References: transformers configuration_llama.py (config keys, defaults),
 * modeling_rope_utils.py (rope_theta / rope_scaling, and transformers 5's
 * rope_parameters), modeling_utils.py (model.safetensors.index.json:
 * {"metadata": ..., "weight_map": {tensor: shard}}), bitsandbytes
 * QuantState.as_dict(packed=True) / from_dict and transformers
 * quantizer_bnb_4bit.py (the 4-bit checkpoint layout,
 * docs/formats.md §1).
 *
 * Memory: shards are mmap'ed read-only; each tensor is converted on its own
 * (bf16 -> NF4, or adopted as NF4) and its mapped pages are released with
 * madvise(MADV_DONTNEED) right after, so the resident set stays near the
 * converted model plus one tensor.
 */
#include "model/hf.h"
#include "model/llama_fsdp.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/bf16.h"
#include "core/file.h"
#include "data/tokenizer_json.h"
#include "format/safetensors.h"
#include "model/llama_linear.h"
#include "quant/nf4.h"

#define HF_MAX_SHARDS 4096

struct hf_model {
    char *dir;
    llama_hparams hp;
    int n_shards;
    safetensors_file **shards;
    int bnb4;             /* linears stored as bitsandbytes nf4 */
    gguf_file *tok_gguf;  /* tokenizer.json + tokenizer_config.json as GGUF tokenizer metadata */
    char lm_head_name[64]; /* "lm_head.weight" or the embedding when tied */
};

/* ------------------------------------------------------------------ config.json */

static int cfg_int(const cJSON *c, const char *key, int def, int *out, const char *path, qerr *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c, key);
    if (!v || cJSON_IsNull(v)) {
        if (def < 0) return qerr_set(e, "%s: \"%s\" missing", path, key);
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 || v->valuedouble > 1e9)
        return qerr_set(e, "%s: \"%s\" must be a non-negative integer", path, key);
    *out = (int)v->valuedouble;
    return 0;
}

/* rope_scaling (transformers 4) or rope_parameters (5): modeling_rope_utils.py ROPE_INIT_FUNCTIONS. "default",
 * "linear" (factor) and "llama3" (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
 * are implemented; every other type changes the frequencies (dynamic, yarn, longrope) or more, and is refused. */
static int parse_rope_scaling(const cJSON *rs, llama_hparams *hp, const char *path, qerr *e) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!ty) ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
    if (!ty) return 0; /* rope_parameters with rope_theta only */
    if (!cJSON_IsString(ty)) return qerr_set(e, "%s: rope_scaling.rope_type: expected a string", path);
    llama_rope_scaling *sc = &hp->rope_scaling;
    if (!strcmp(ty->valuestring, "default")) return 0;
    int llama3 = !strcmp(ty->valuestring, "llama3");
    if (!llama3 && strcmp(ty->valuestring, "linear"))
        return qerr_set(e, "%s: rope_scaling: rope_type \"%s\" is not implemented (default, linear and llama3 are); "
                           "refusing rather than training with different RoPE frequencies", path, ty->valuestring);
    static const char *const keys[] = {"factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings"};
    double v[4];
    for (int i = 0; i < (llama3 ? 4 : 1); i++) {
        const cJSON *it = cJSON_GetObjectItemCaseSensitive(rs, keys[i]);
        if (!cJSON_IsNumber(it))
            return qerr_set(e, "%s: rope_scaling.%s: expected a number for rope_type \"%s\"", path, keys[i],
                            ty->valuestring);
        v[i] = it->valuedouble;
    }
    const cJSON *af = cJSON_GetObjectItemCaseSensitive(rs, "attention_factor");
    if (af && !(cJSON_IsNumber(af) && af->valuedouble == 1.0) && !cJSON_IsNull(af))
        return qerr_set(e, "%s: rope_scaling.attention_factor: only 1 is implemented", path);
    sc->type = llama3 ? LLAMA_ROPE_LLAMA3 : LLAMA_ROPE_LINEAR;
    sc->factor = (float)v[0];
    if (llama3) {
        sc->low_freq_factor = (float)v[1];
        sc->high_freq_factor = (float)v[2];
        if (!(v[3] >= 1 && v[3] <= 1e9 && v[3] == floor(v[3])))
            return qerr_set(e, "%s: rope_scaling.original_max_position_embeddings: expected a positive integer", path);
        sc->original_context = (int)v[3];
    }
    return 0;
}

static int parse_config(hf_model *h, qerr *e) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", h->dir);
    cJSON *c = file_read_json_object(path, e);
    if (!c) return -1;
    int rc = -1;
    llama_hparams *hp = &h->hp;
    memset(hp, 0, sizeof *hp);
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(c, "model_type");
    if (!cJSON_IsString(mt) || (strcmp(mt->valuestring, "llama") && strcmp(mt->valuestring, "mistral") &&
                                strcmp(mt->valuestring, "qwen2") && strcmp(mt->valuestring, "phi3"))) {
        qerr_set(e, "%s: model_type \"%s\" is not supported (\"llama\", \"mistral\", \"qwen2\", \"phi3\")", path,
                 cJSON_IsString(mt) ? mt->valuestring : "?");
        goto done;
    }
    const int phi3 = !strcmp(mt->valuestring, "phi3");
    if (phi3) hp->arch = LLAMA_ARCH_PHI3; /* modeling_phi3.py: fused qkv_proj and gate_up_proj, no biases */
    /* dropout inside the network (Phi-3's residual and embedding dropout; attention dropout of any of these
     * configs): transformers applies it in training, qlora implements LoRA dropout only */
    static const char *const dropouts[] = {"attention_dropout", "resid_pdrop", "embd_pdrop"};
    for (size_t i = 0; i < sizeof dropouts / sizeof *dropouts; i++) {
        const cJSON *it = cJSON_GetObjectItemCaseSensitive(c, dropouts[i]);
        if (it && !cJSON_IsNull(it) && !(cJSON_IsNumber(it) && it->valuedouble == 0.0)) {
            qerr_set(e, "%s: %s: only 0 is implemented (dropout inside the network changes the training maths; "
                        "qlora has LoRA dropout only)", path, dropouts[i]);
            goto done;
        }
    }
    if (!strcmp(mt->valuestring, "qwen2")) { /* modeling_qwen2.py: q/k/v_proj bias=True, o_proj and the MLP none */
        hp->arch = LLAMA_ARCH_QWEN2;
        hp->qkv_bias = 1;
    }
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(c, "layer_types");
    for (int i = 0; cJSON_IsArray(lt) && i < cJSON_GetArraySize(lt); i++) {
        const cJSON *t = cJSON_GetArrayItem(lt, i);
        if (!cJSON_IsString(t) || (strcmp(t->valuestring, "full_attention") &&
                                   strcmp(t->valuestring, "sliding_attention"))) {
            qerr_set(e, "%s: layer_types[%d]: \"%s\" attention is not implemented (full_attention, and "
                        "sliding_attention up to its window, are)", path, i, cJSON_IsString(t) ? t->valuestring : "?");
            goto done;
        }
    }
    /* keys of other architectures' configs that change the maths when present in one of these */
    static const char *const foreign[] = {"attn_logit_softcapping", "final_logit_softcapping", "qk_layernorm",
                                          "use_qk_norm", "query_pre_attn_scalar"};
    for (size_t i = 0; i < sizeof foreign / sizeof *foreign; i++) {
        const cJSON *it = cJSON_GetObjectItemCaseSensitive(c, foreign[i]);
        if (it && !cJSON_IsNull(it) && !cJSON_IsFalse(it)) {
            qerr_set(e, "%s: %s: not implemented (refusing rather than training a different model)", path, foreign[i]);
            goto done;
        }
    }
    /* sliding window: Mistral's sliding_window (null: none); Qwen2's only with use_sliding_window */
    const cJSON *sw = cJSON_GetObjectItemCaseSensitive(c, "sliding_window");
    const cJSON *usw = cJSON_GetObjectItemCaseSensitive(c, "use_sliding_window");
    int sw_applies = !strcmp(mt->valuestring, "mistral") || phi3 || cJSON_IsTrue(usw);
    if (sw && !cJSON_IsNull(sw) && sw_applies) {
        if (!cJSON_IsNumber(sw) || sw->valuedouble < 1 || sw->valuedouble > 1e9 ||
            sw->valuedouble != floor(sw->valuedouble)) {
            qerr_set(e, "%s: sliding_window: expected a positive integer or null", path);
            goto done;
        }
        hp->sliding_window = (int)sw->valuedouble;
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(c, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu"))) {
        qerr_set(e, "%s: hidden_act must be \"silu\"", path);
        goto done;
    }
    static const char *const biases[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++)
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, biases[i]))) {
            qerr_set(e, "%s: %s = true is not supported (Llama without biases only)", path, biases[i]);
            goto done;
        }
    if (cfg_int(c, "hidden_size", -1, &hp->d_model, path, e) || cfg_int(c, "intermediate_size", -1, &hp->d_ff, path, e) ||
        cfg_int(c, "num_hidden_layers", -1, &hp->n_layer, path, e) ||
        cfg_int(c, "num_attention_heads", -1, &hp->n_head, path, e) ||
        cfg_int(c, "num_key_value_heads", hp->n_head, &hp->n_kv_head, path, e) ||
        cfg_int(c, "vocab_size", -1, &hp->vocab, path, e) ||
        cfg_int(c, "max_position_embeddings", 2048, &hp->context_length, path, e))
        goto done;
    if (hp->n_head <= 0 || hp->d_model % hp->n_head) {
        qerr_set(e, "%s: hidden_size %d is not a multiple of num_attention_heads %d", path, hp->d_model, hp->n_head);
        goto done;
    }
    if (cfg_int(c, "head_dim", hp->d_model / hp->n_head, &hp->head_dim, path, e)) goto done;
    const cJSON *eps = cJSON_GetObjectItemCaseSensitive(c, "rms_norm_eps");
    if (eps && !cJSON_IsNumber(eps)) {
        qerr_set(e, "%s: rms_norm_eps: expected a number", path);
        goto done;
    }
    hp->rms_eps = eps ? (float)eps->valuedouble : 1e-6f;
    hp->tied_embeddings = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "tie_word_embeddings"));

    /* RoPE: rope_theta + rope_scaling (transformers 4) or rope_parameters (5) */
    hp->rope_theta = 10000.0f;
    const cJSON *rt = cJSON_GetObjectItemCaseSensitive(c, "rope_theta");
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(c, "rope_scaling");
    const cJSON *rpar = cJSON_GetObjectItemCaseSensitive(c, "rope_parameters");
    if (cJSON_IsObject(rpar)) {
        const cJSON *t2 = cJSON_GetObjectItemCaseSensitive(rpar, "rope_theta");
        if (cJSON_IsNumber(t2)) rt = t2;
        if (!rs || cJSON_IsNull(rs)) rs = rpar;
    }
    if (rt && !cJSON_IsNumber(rt)) {
        qerr_set(e, "%s: rope_theta: expected a number", path);
        goto done;
    }
    if (rt) hp->rope_theta = (float)rt->valuedouble;
    if (rs && !cJSON_IsNull(rs) && !cJSON_IsObject(rs)) {
        qerr_set(e, "%s: rope_scaling: expected an object or null", path);
        goto done;
    }
    if (cJSON_IsObject(rs) && parse_rope_scaling(rs, hp, path, e)) goto done;
    if (phi3 && hp->rope_scaling.type != LLAMA_ROPE_DEFAULT) { /* Phi3Config accepts default and longrope only */
        qerr_set(e, "%s: rope_scaling: a phi3 model with RoPE scaling other than \"default\" is not implemented "
                    "(longrope / su / yarn: Phi-3 128k)", path);
        goto done;
    }
    const cJSON *prf = cJSON_GetObjectItemCaseSensitive(c, "partial_rotary_factor");
    if (!prf && cJSON_IsObject(rpar)) prf = cJSON_GetObjectItemCaseSensitive(rpar, "partial_rotary_factor");
    if (prf && !(cJSON_IsNumber(prf) && prf->valuedouble == 1.0)) {
        qerr_set(e, "%s: partial_rotary_factor: only 1 (RoPE on the whole head) is implemented", path);
        goto done;
    }
    if (hp->n_layer <= 0 || hp->n_kv_head <= 0 || hp->n_head % hp->n_kv_head || hp->head_dim <= 0 ||
        hp->head_dim % 2 || hp->d_ff <= 0 || hp->vocab <= 0) {
        qerr_set(e, "%s: inconsistent hyper-parameters", path);
        goto done;
    }
    if (llama_hparams_check(hp, "rope_theta", "rms_norm_eps", e)) {
        qerr_prefix(e, "%s", path);
        goto done;
    }

    const cJSON *q = cJSON_GetObjectItemCaseSensitive(c, "quantization_config");
    if (cJSON_IsObject(q)) {
        const cJSON *qm = cJSON_GetObjectItemCaseSensitive(q, "quant_method");
        const cJSON *l4 = cJSON_GetObjectItemCaseSensitive(q, "load_in_4bit");
        const cJSON *qt = cJSON_GetObjectItemCaseSensitive(q, "bnb_4bit_quant_type");
        const cJSON *l8 = cJSON_GetObjectItemCaseSensitive(q, "load_in_8bit");
        if (cJSON_IsString(qm) && !strcmp(qm->valuestring, "bitsandbytes") && cJSON_IsTrue(l8)) {
            qerr_set(e, "%s: quantization_config: a bitsandbytes load_in_8bit checkpoint (int8 weight + SCB) is not "
                        "read; give the bf16/f16/f32 checkpoint it was made from: load_in_8bit: true quantizes it on "
                        "load exactly as bitsandbytes does", path);
            goto done;
        }
        if (!cJSON_IsString(qm) || strcmp(qm->valuestring, "bitsandbytes") || !cJSON_IsTrue(l4)) {
            qerr_set(e, "%s: quantization_config: only bitsandbytes load_in_4bit checkpoints are supported", path);
            goto done;
        }
        if (!cJSON_IsString(qt) || strcmp(qt->valuestring, "nf4")) {
            qerr_set(e, "%s: quantization_config: bnb_4bit_quant_type \"%s\" is not supported (nf4 only)", path,
                     cJSON_IsString(qt) ? qt->valuestring : "fp4 (the default)");
            goto done;
        }
        h->bnb4 = 1;
    }
    rc = 0;
done:
    cJSON_Delete(c);
    return rc;
}

/* ------------------------------------------------------------------ shards */

static int open_shards(hf_model *h, qerr *e) {
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", h->dir);
    if (access(path, R_OK) == 0) {
        cJSON *idx = file_read_json_object(path, e);
        if (!idx) return -1;
        const cJSON *wm = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
        if (!cJSON_IsObject(wm)) {
            cJSON_Delete(idx);
            return qerr_set(e, "%s: no \"weight_map\"", path);
        }
        /* distinct shard names, in first-use order */
        const char **names = calloc(HF_MAX_SHARDS, sizeof *names);
        if (!names) {
            cJSON_Delete(idx);
            return qerr_set(e, "out of memory");
        }
        int n = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, wm) {
            /* a shard is a file beside the index: no path, no "." / "..", nothing empty */
            const char *v = cJSON_IsString(it) ? it->valuestring : NULL;
            if (!v || !v[0] || strchr(v, '/') || !strcmp(v, ".") || !strcmp(v, "..")) {
                /* the message is written before the tree (which owns it->string) is freed */
                qerr_set(e, "%s: weight_map[\"%.200s\"]: expected the file name of a shard in the same directory",
                         path, it->string ? it->string : "");
                free(names);
                cJSON_Delete(idx);
                return -1;
            }
            int seen = 0;
            for (int i = 0; i < n && !seen; i++) seen = !strcmp(names[i], v);
            if (seen) continue;
            if (n == HF_MAX_SHARDS) {
                qerr_set(e, "%s: weight_map names more than %d shard files", path, HF_MAX_SHARDS);
                free(names);
                cJSON_Delete(idx);
                return -1;
            }
            names[n++] = v;
        }
        h->shards = calloc((size_t)n + 1, sizeof *h->shards);
        int rc = h->shards ? 0 : qerr_set(e, "out of memory");
        for (int i = 0; i < n && !rc; i++) {
            char sp[4096];
            snprintf(sp, sizeof sp, "%s/%s", h->dir, names[i]);
            rc = safetensors_open(sp, &h->shards[i], e);
            if (!rc) h->n_shards++;
        }
        free(names);
        cJSON_Delete(idx);
        if (rc) return -1;
        if (h->n_shards == 0) return qerr_set(e, "%s: empty weight_map", path);
        return 0;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", h->dir);
    if (access(path, R_OK))
        return qerr_set(e, "%s: neither model.safetensors nor model.safetensors.index.json (only safetensors "
                           "checkpoints are supported, not pytorch_model.bin)", h->dir);
    h->shards = calloc(1, sizeof *h->shards);
    if (!h->shards || safetensors_open(path, &h->shards[0], e)) return -1;
    h->n_shards = 1;
    return 0;
}

static int find(const hf_model *h, const char *name, st_tensor *t) {
    for (int i = 0; i < h->n_shards; i++)
        if (safetensors_find(h->shards[i], name, t, NULL) == 0) return 0;
    return -1;
}

/* Give the tensor's mapped pages back (they are re-read from the page cache if touched again). */
static void release(const st_tensor *t) {
    if (!t->nbytes) return;
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)t->data, b = a + t->nbytes;
    uintptr_t a0 = (a + (uintptr_t)pg - 1) & ~((uintptr_t)pg - 1), b0 = b & ~((uintptr_t)pg - 1);
    if (b0 > a0) madvise((void *)a0, b0 - a0, MADV_DONTNEED);
}

int hf_model_open(const char *dir, hf_model **out, qerr *e) {
    *out = NULL;
    hf_model *h = qcalloc(1, sizeof *h, e);
    if (!h) return -1;
    if (!(h->dir = strdup(dir))) {
        free(h);
        return qerr_set(e, "out of memory");
    }
    if (parse_config(h, e) || open_shards(h, e)) goto fail;
    char tj[4096], tc[4096];
    snprintf(tj, sizeof tj, "%s/tokenizer.json", dir);
    snprintf(tc, sizeof tc, "%s/tokenizer_config.json", dir);
    if (access(tj, R_OK)) {
        qerr_set(e, "%s: no tokenizer.json (only fast-tokenizer checkpoints are supported; a SentencePiece "
                    "tokenizer.model alone is not)", dir);
        goto fail;
    }
    if (tokenizer_hf_to_gguf(tj, access(tc, R_OK) ? NULL : tc, &h->tok_gguf, e)) goto fail;
    st_tensor t;
    if (find(h, "model.embed_tokens.weight", &t)) {
        qerr_set(e, "%s: tensor model.embed_tokens.weight missing (a LlamaForCausalLM checkpoint is expected)", dir);
        goto fail;
    }
    if (t.n_dims != 2 || t.shape[0] != h->hp.vocab || t.shape[1] != h->hp.d_model) {
        qerr_set(e, "%s: model.embed_tokens.weight has shape [%lld, %lld], config says [%d, %d]", dir,
                 (long long)t.shape[0], (long long)(t.n_dims > 1 ? t.shape[1] : 0), h->hp.vocab, h->hp.d_model);
        goto fail;
    }
    /* a layer beyond num_hidden_layers: the model would be trained truncated */
    char extra[96];
    snprintf(extra, sizeof extra, "model.layers.%d.input_layernorm.weight", h->hp.n_layer);
    if (find(h, extra, &t) == 0) {
        qerr_set(e, "%s: tensor %s exists, but config.json num_hidden_layers is %d (the checkpoint holds more layers "
                    "than its config declares)", dir, extra, h->hp.n_layer);
        goto fail;
    }
    /* an untied head wins over the flag: some exports keep lm_head.weight even when tied */
    if (find(h, "lm_head.weight", &t) == 0) h->hp.tied_embeddings = 0;
    else h->hp.tied_embeddings = 1;
    *out = h;
    return 0;
fail:
    hf_model_close(h);
    return -1;
}

void hf_model_close(hf_model *h) {
    if (!h) return;
    for (int i = 0; i < h->n_shards; i++) safetensors_close(h->shards[i]);
    free(h->shards);
    gguf_close(h->tok_gguf);
    free(h->dir);
    free(h);
}

const llama_hparams *hf_model_hparams(const hf_model *h) { return &h->hp; }
int hf_model_prequantized(const hf_model *h) { return h->bnb4; }

int hf_model_tokenizer(const hf_model *h, tokenizer **out, qerr *e) {
    if (tokenizer_load_gguf(h->tok_gguf, out, e)) return qerr_prefix(e, "%s/tokenizer.json", h->dir);
    return 0;
}

const gguf_file *hf_model_tokenizer_gguf(const hf_model *h) { return h->tok_gguf; }

/* ------------------------------------------------------------------ tensors */

static void role_name(const llama_hparams *hp, llama_role role, int layer, int module, char *name, size_t n) {
    const llama_linear_name *lin = llama_hparams_linears(hp);
    switch (role) {
    case LLAMA_T_EMBED: snprintf(name, n, "model.embed_tokens.weight"); return;
    case LLAMA_T_LM_HEAD: snprintf(name, n, "lm_head.weight"); return;
    case LLAMA_T_OUT_NORM: snprintf(name, n, "model.norm.weight"); return;
    case LLAMA_T_ATTN_NORM: snprintf(name, n, "model.layers.%d.input_layernorm.weight", layer); return;
    case LLAMA_T_FFN_NORM: snprintf(name, n, "model.layers.%d.post_attention_layernorm.weight", layer); return;
    case LLAMA_T_LINEAR:
        if (!lin[module].peft) break;
        snprintf(name, n, "model.layers.%d.%s.%s.weight", layer, lin[module].parent, lin[module].peft);
        return;
    case LLAMA_T_BIAS:
        if (!lin[module].peft) break;
        snprintf(name, n, "model.layers.%d.%s.%s.bias", layer, lin[module].parent, lin[module].peft);
        return;
    }
    name[0] = 0;
}

/* A plain (bf16 / f16 / f32) tensor of n elements into fp32. */
static int plain_to_f32(const hf_model *h, const st_tensor *t, int64_t n, float *dst, qerr *e) {
    int64_t have = 1;
    for (int d = 0; d < t->n_dims; d++) have *= t->shape[d];
    if (have != n) return qerr_set(e, "%s: tensor %s has %lld elements, expected %lld", h->dir, t->name,
                                   (long long)have, (long long)n);
    const uint8_t *s = t->data;
    if (!strcmp(t->dtype, "F32")) {
        memcpy(dst, s, (size_t)n * 4);
    } else if (!strcmp(t->dtype, "BF16")) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, 2);
            dst[i] = bf16_to_f32(v);
        }
    } else if (!strcmp(t->dtype, "F16")) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, 2);
            dst[i] = f16_to_f32(v);
        }
    } else {
        return qerr_set(e, "%s: tensor %s: dtype %s (expected BF16, F16 or F32)", h->dir, t->name, t->dtype);
    }
    return 0;
}

/* The quant_state of a bitsandbytes nf4 linear (its
 * .quant_state.bitsandbytes__nf4 JSON): the blocksize, whether the absmax is
 * double-quantized and then the nested offset. Checks that it is nf4 of shape
 * (rows, cols), not fp4. */
static int bnb4_state(const hf_model *h, const char *wname, int64_t rows, int64_t cols, int *blocksize, int *dq,
                      float *offset, qerr *e) {
    char name[256];
    st_tensor w, qs;
    if (find(h, wname, &w)) return qerr_set(e, "%s: tensor %s missing", h->dir, wname);
    snprintf(name, sizeof name, "%s.quant_state.bitsandbytes__nf4", wname);
    if (find(h, name, &qs)) {
        snprintf(name, sizeof name, "%s.quant_state.bitsandbytes__fp4", wname);
        if (find(h, name, &qs) == 0) return qerr_set(e, "%s: %s is fp4; only nf4 is supported", h->dir, wname);
        return qerr_set(e, "%s: %s.quant_state.bitsandbytes__nf4 missing (not a bnb 4-bit checkpoint?)", h->dir,
                        wname);
    }
    char *js = malloc(qs.nbytes + 1);
    if (!js) return qerr_set(e, "out of memory");
    memcpy(js, qs.data, qs.nbytes);
    js[qs.nbytes] = 0;
    cJSON *st = cJSON_Parse(js);
    free(js);
    int rc = 0;
    const cJSON *bs = cJSON_GetObjectItemCaseSensitive(st, "blocksize");
    const cJSON *shp = cJSON_GetObjectItemCaseSensitive(st, "shape");
    const cJSON *qt = cJSON_GetObjectItemCaseSensitive(st, "quant_type");
    const cJSON *nbs = cJSON_GetObjectItemCaseSensitive(st, "nested_blocksize");
    const cJSON *noff = cJSON_GetObjectItemCaseSensitive(st, "nested_offset");
    *dq = nbs != NULL;
    if (!cJSON_IsString(qt) || strcmp(qt->valuestring, "nf4") || !cJSON_IsNumber(bs) || !cJSON_IsArray(shp) ||
        cJSON_GetArraySize(shp) != 2 || cJSON_GetArrayItem(shp, 0)->valuedouble != (double)rows ||
        cJSON_GetArrayItem(shp, 1)->valuedouble != (double)cols ||
        (*dq && (!cJSON_IsNumber(nbs) || nbs->valueint != NF4_NESTED_BLOCKSIZE || !cJSON_IsNumber(noff)))) {
        rc = qerr_set(e, "%s: %s: quant_state is not nf4 of shape [%lld, %lld] with blocksize and (nested) offset",
                      h->dir, wname, (long long)rows, (long long)cols);
    } else {
        *blocksize = bs->valueint;
        *offset = *dq ? (float)noff->valuedouble : 0.0f;
    }
    cJSON_Delete(st);
    return rc;
}

/* Adopt the bytes of a bitsandbytes nf4 linear (weight + .absmax + .quant_map
 * [+ nested]) as they are into t, whose geometry and buffers are set (nf4_alloc
 * or a layer view) from its bnb4_state; offset is the state's nested offset. */
static int bnb4_fill(const hf_model *h, const char *wname, float offset, nf4_tensor *t, qerr *e) {
    char name[256];
    st_tensor w, am, qm;
    if (find(h, wname, &w)) return qerr_set(e, "%s: tensor %s missing", h->dir, wname);
    if (strcmp(w.dtype, "U8") || w.nbytes != (size_t)((t->n + 1) / 2))
        return qerr_set(e, "%s: %s: expected U8 packed nibbles of %lld bytes, got %s of %zu", h->dir, wname,
                        (long long)((t->n + 1) / 2), w.dtype, w.nbytes);
    memcpy(t->packed, w.data, w.nbytes);
    release(&w);
    snprintf(name, sizeof name, "%s.quant_map", wname);
    if (find(h, name, &qm) || strcmp(qm.dtype, "F32") || qm.nbytes != 16 * 4)
        return qerr_set(e, "%s: %s missing or not F32[16]", h->dir, name);
    for (int i = 0; i < 16; i++) {
        float v;
        memcpy(&v, (const uint8_t *)qm.data + 4 * i, 4);
        if (v != nf4_code[i])
            return qerr_set(e, "%s: %s[%d] = %g is not the NF4 code value %g", h->dir, name, i, v, nf4_code[i]);
    }
    snprintf(name, sizeof name, "%s.absmax", wname);
    if (find(h, name, &am)) return qerr_set(e, "%s: %s missing", h->dir, name);
    if (t->double_quant) {
        st_tensor na, nq;
        if (strcmp(am.dtype, "U8") || am.nbytes != (size_t)t->nblocks)
            return qerr_set(e, "%s: %s: expected U8[%lld]", h->dir, name, (long long)t->nblocks);
        memcpy(t->absmax_q, am.data, am.nbytes);
        int64_t ng = (t->nblocks + NF4_NESTED_BLOCKSIZE - 1) / NF4_NESTED_BLOCKSIZE;
        snprintf(name, sizeof name, "%s.nested_absmax", wname);
        if (find(h, name, &na) || strcmp(na.dtype, "F32") || na.nbytes != (size_t)ng * 4)
            return qerr_set(e, "%s: %s missing or not F32[%lld]", h->dir, name, (long long)ng);
        memcpy(t->nested_absmax, na.data, na.nbytes);
        snprintf(name, sizeof name, "%s.nested_quant_map", wname);
        if (find(h, name, &nq) || strcmp(nq.dtype, "F32") || nq.nbytes != 256 * 4)
            return qerr_set(e, "%s: %s missing or not F32[256]", h->dir, name);
        memcpy(t->nested_code, nq.data, nq.nbytes);
        t->offset = offset;
    } else {
        if (strcmp(am.dtype, "F32") || am.nbytes != (size_t)t->nblocks * 4)
            return qerr_set(e, "%s: %s: expected F32[%lld]", h->dir, name, (long long)t->nblocks);
        memcpy(t->absmax, am.data, am.nbytes);
    }
    return 0;
}

/* A bitsandbytes nf4 linear adopted into a new tensor *out (nf4_free it). */
static int load_bnb4(const hf_model *h, const char *wname, int64_t rows, int64_t cols, nf4_tensor *out, qerr *e) {
    int bs, dq;
    float offset;
    if (bnb4_state(h, wname, rows, cols, &bs, &dq, &offset, e)) return -1;
    if (nf4_alloc(out, rows, cols, bs, dq, e)) return -1;
    if (bnb4_fill(h, wname, offset, out, e)) {
        nf4_free(out);
        return -1;
    }
    return 0;
}

int hf_model_tensor_f32(const hf_model *h, int role, int layer, int module, float *dst, qerr *e) {
    char name[128];
    if (role == LLAMA_T_LM_HEAD && h->hp.tied_embeddings) role = LLAMA_T_EMBED;
    if ((role == LLAMA_T_LINEAR || role == LLAMA_T_BIAS) && !llama_linear_present(&h->hp, module))
        return qerr_set(e, "%s: the %s architecture has no linear in slot %d (fused)", h->dir,
                        llama_arch_name(h->hp.arch), module);
    role_name(&h->hp, (llama_role)role, layer, module, name, sizeof name);
    int64_t rows, cols;
    llama_tensor_shape(&h->hp, (llama_role)role, module, &rows, &cols);
    if (role == LLAMA_T_LINEAR && h->bnb4) {
        nf4_tensor t;
        if (load_bnb4(h, name, rows, cols, &t, e)) return -1;
        nf4_dequantize_rows_f32(&t, 0, rows, dst);
        nf4_free(&t);
        return 0;
    }
    st_tensor t;
    if (find(h, name, &t)) return qerr_set(e, "%s: tensor %s missing", h->dir, name);
    int rc = plain_to_f32(h, &t, rows * cols, dst, e);
    release(&t);
    return rc;
}

/* ------------------------------------------------------------------ the model */

static int load_bf16(const hf_model *h, llama_role role, bf16 **out, qerr *e) {
    char name[128];
    role_name(&h->hp, role, 0, 0, name, sizeof name);
    int64_t rows, cols;
    llama_tensor_shape(&h->hp, role, 0, &rows, &cols);
    st_tensor t;
    if (find(h, name, &t)) return qerr_set(e, "%s: tensor %s missing", h->dir, name);
    if (!(*out = qmalloc((size_t)(rows * cols) * sizeof(bf16), e))) return -1;
    if (!strcmp(t.dtype, "BF16") && t.nbytes == (size_t)(rows * cols) * 2) {
        memcpy(*out, t.data, t.nbytes);
    } else {
        int64_t chunk = 4096 * 64;
        float *tmp = qmalloc((size_t)(rows * cols < chunk ? rows * cols : chunk) * sizeof(float), e);
        if (!tmp) return -1;
        /* whole-tensor conversion through a bounded buffer */
        st_tensor part = t;
        size_t es = safetensors_dtype_size(t.dtype);
        for (int64_t i0 = 0; i0 < rows * cols; i0 += chunk) {
            int64_t n = rows * cols - i0 < chunk ? rows * cols - i0 : chunk;
            part.data = (const uint8_t *)t.data + (size_t)i0 * es;
            part.nbytes = (size_t)n * es;
            part.n_dims = 1;
            part.shape[0] = n;
            if (plain_to_f32(h, &part, n, tmp, e)) {
                free(tmp);
                return -1;
            }
            for (int64_t i = 0; i < n; i++) (*out)[i0 + i] = f32_to_bf16(tmp[i]);
        }
        free(tmp);
    }
    release(&t);
    return 0;
}

static int load_norm(const hf_model *h, llama_role role, int layer, float **out, qerr *e) {
    if (!(*out = qmalloc((size_t)h->hp.d_model * sizeof(float), e))) return -1;
    return hf_model_tensor_f32(h, role, layer, 0, *out, e);
}

/* FULL_SHARD loading: rows [row0, row0 + nrows) of a plain (bf16 / f16 / f32) linear (llama_rows_fn). */
static int hf_rows(void *arg, int l, int k, int64_t row0, int64_t nrows, float *dst, qerr *e) {
    const hf_model *h = arg;
    char name[128];
    role_name(&h->hp, LLAMA_T_LINEAR, l, k, name, sizeof name);
    int64_t rows, cols;
    llama_tensor_shape(&h->hp, LLAMA_T_LINEAR, k, &rows, &cols);
    st_tensor t;
    if (find(h, name, &t)) return qerr_set(e, "%s: tensor %s missing", h->dir, name);
    int64_t have = 1;
    for (int d = 0; d < t.n_dims; d++) have *= t.shape[d];
    const size_t es = safetensors_dtype_size(t.dtype);
    if (have != rows * cols || !es) {
        release(&t);
        return qerr_set(e, "%s: tensor %s: expected %lld x %lld elements of BF16, F16 or F32", h->dir, name,
                        (long long)rows, (long long)cols);
    }
    st_tensor part = t;
    part.data = (const uint8_t *)t.data + (size_t)(row0 * cols) * es;
    part.nbytes = (size_t)(nrows * cols) * es;
    part.n_dims = 1;
    part.shape[0] = nrows * cols;
    int rc = plain_to_f32(h, &part, nrows * cols, dst, e);
    release(&t);
    return rc;
}

int hf_model_load(const hf_model *h, int load_in_4bit, int double_quant, int max_pos, llama_model *m, qerr *e) {
    return hf_model_load_sharded(h, load_in_4bit, double_quant, max_pos, NULL, m, e);
}

int hf_model_load_sharded(const hf_model *h, int load_in_4bit, int double_quant, int max_pos, comm *cm,
                          llama_model *m, qerr *e) {
    memset(m, 0, sizeof *m);
    const int adopt0 = h->bnb4 && load_in_4bit == LLAMA_BASE_NF4;
    if (h->bnb4 && load_in_4bit == LLAMA_BASE_INT8)
        return qerr_set(e, "%s: load_in_8bit with a bitsandbytes 4-bit checkpoint: its linears are NF4 already; use "
                           "load_in_4bit: true, or the bf16/f16/f32 checkpoint", h->dir);
    if (cm && load_in_4bit == LLAMA_BASE_INT8)
        return qerr_set(e, "FULL_SHARD of an int8 base (load_in_8bit) is not implemented; use load_in_4bit (NF4), "
                           "or SHARD_GRAD_OP / NO_SHARD");
    if (cm && h->hp.arch == LLAMA_ARCH_PHI3)
        return qerr_set(e, "%s: FULL_SHARD of a Phi-3 base (fused qkv_proj / gate_up_proj) is not implemented yet; "
                           "use SHARD_GRAD_OP or NO_SHARD", h->dir);
    if (cm && adopt0)
        return qerr_set(e, "%s: FULL_SHARD of a bitsandbytes 4-bit checkpoint is not implemented (its NF4 bytes are "
                           "adopted whole); use SHARD_GRAD_OP or NO_SHARD, or a bf16/f16/f32 checkpoint", h->dir);
    m->hp = h->hp;
    const llama_hparams *hp = &m->hp;
    int64_t D = hp->d_model, V = hp->vocab;
    m->load_in_4bit = load_in_4bit == LLAMA_BASE_NF4;
    m->load_in_8bit = load_in_4bit == LLAMA_BASE_INT8;
    m->double_quant = double_quant;
    if (load_bf16(h, LLAMA_T_EMBED, &m->tok_embd, e)) goto fail;
    m->n_params += V * D;
    if (hp->tied_embeddings) {
        m->lm_head_w = m->tok_embd;
    } else {
        if (load_bf16(h, LLAMA_T_LM_HEAD, &m->lm_head_w, e)) goto fail;
        m->n_params += V * D;
    }
    m->embed = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = m->tok_embd};
    m->lm_head = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = m->lm_head_w};
    if (load_norm(h, LLAMA_T_OUT_NORM, 0, &m->out_norm, e)) goto fail;
    m->n_params += D;
    if (!(m->layers = qcalloc((size_t)hp->n_layer, sizeof *m->layers, e))) goto fail;
    int64_t max_el = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        int64_t r, c;
        llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &r, &c);
        if (r * c > max_el) max_el = r * c;
    }
    llama_fsdp *fs = NULL;
    if (cm) { /* FULL_SHARD: this rank's ranges only, never a whole linear */
        llama_layer_layout lo0;
        if (llama_layer_layout_init(&lo0, hp, llama_base_kind(load_in_4bit), NF4_DEFAULT_BLOCKSIZE,
                                    double_quant, e))
            goto fail;
        if (!(fs = qcalloc(1, sizeof *fs, e))) goto fail;
        if (llama_fsdp_init(fs, cm, &lo0, hp->n_layer, e)) {
            free(fs);
            goto fail;
        }
        m->fsdp = fs; /* freed with the model */
        max_el = 1;
    }
    float *tmp = qmalloc((size_t)max_el * sizeof(float), e);
    if (!tmp) goto fail;
    char name[128];
    const int adopt = adopt0; /* bnb nf4 bytes adopted as stored: no re-quantization */
    for (int l = 0; l < hp->n_layer; l++) {
        llama_layer *L = &m->layers[l];
        if (load_norm(h, LLAMA_T_ATTN_NORM, l, &L->attn_norm, e) || load_norm(h, LLAMA_T_FFN_NORM, l, &L->ffn_norm, e)) {
            free(tmp);
            goto fail;
        }
        m->n_params += 2 * D;
        /* the layer's storage layout: blocksize 64 and the configured double
         * quant, or for an adopted checkpoint those its linears were saved with
         * (one blob holds one blocksize and one double-quant choice) */
        int bs = NF4_DEFAULT_BLOCKSIZE, dq = double_quant;
        float offsets[LLAMA_N_LINEAR] = {0};
        int rc = 0;
        int first = 1;
        for (int k = 0; adopt && k < LLAMA_N_LINEAR && !rc; k++) {
            int64_t rows, cols;
            int kbs, kdq;
            if (!llama_linear_present(hp, k)) continue;
            llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &rows, &cols);
            role_name(hp, LLAMA_T_LINEAR, l, k, name, sizeof name);
            rc = bnb4_state(h, name, rows, cols, &kbs, &kdq, &offsets[k], e);
            if (!rc && first) {
                first = 0;
                bs = kbs;
                dq = kdq;
            } else if (!rc && (kbs != bs || kdq != dq)) {
                rc = qerr_set(e, "%s: %s: blocksize %d%s, but the layer's first linear has %d%s (a layer's linears "
                                 "share one storage layout)",
                              h->dir, name, kbs, kdq ? " with double quant" : "", bs, dq ? " with double quant" : "");
            }
        }
        llama_layer_layout lo;
        if (!rc) rc = llama_layer_layout_init(&lo, hp, llama_base_kind(load_in_4bit), bs, dq, e);
        if (!rc && fs) {
            rc = llama_fsdp_load_layer(fs, l, hf_rows, (void *)h, e);
            for (int k = 0; !rc && k < LLAMA_N_LINEAR; k++) {
                m->n_quantized_params += lo.rows[k] * lo.cols[k];
                if (hp->qkv_bias && k <= LLAMA_V) {
                    if (!(L->bias[k] = qmalloc((size_t)lo.rows[k] * sizeof(float), e)) ||
                        hf_model_tensor_f32(h, LLAMA_T_BIAS, l, k, L->bias[k], e))
                        rc = -1;
                    m->n_params += lo.rows[k];
                }
            }
            if (rc) {
                free(tmp);
                goto fail;
            }
            m->quantized_bytes += (int64_t)lo.nbytes;
            continue;
        }
        if (!rc) rc = llama_layer_alloc(L, &lo, e);
        if (rc) {
            free(tmp);
            qerr_prefix(e, "layer %d", l);
            goto fail;
        }
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const int64_t rows = lo.rows[k], cols = lo.cols[k];
            if (!llama_linear_present(hp, k)) continue; /* a slot a fused linear took over (Phi-3) */
            role_name(hp, LLAMA_T_LINEAR, l, k, name, sizeof name);
            if (adopt) {
                rc = bnb4_fill(h, name, offsets[k], &L->nf4[k], e);
            } else if (load_in_4bit == LLAMA_BASE_INT8) { /* bf16/f16/f32 -> f32 (exact) -> bnb's fp16 -> int8 */
                rc = hf_model_tensor_f32(h, LLAMA_T_LINEAR, l, k, tmp, e) ||
                     int8_quantize_rows(tmp, rows, cols, (int8_t *)L->lin[k].cb, (float *)L->lin[k].scb, e);
            } else if (load_in_4bit) {
                st_tensor t;
                if (find(h, name, &t)) {
                    rc = qerr_set(e, "%s: tensor %s missing", h->dir, name);
                } else if (!strcmp(t.dtype, "BF16") && t.nbytes == (size_t)(rows * cols) * 2) {
                    rc = nf4_quantize_bf16_into((const uint16_t *)t.data, &L->nf4[k], e);
                    release(&t);
                } else {
                    rc = hf_model_tensor_f32(h, LLAMA_T_LINEAR, l, k, tmp, e) ||
                         nf4_quantize_into(tmp, &L->nf4[k], e);
                }
            } else {
                rc = hf_model_tensor_f32(h, LLAMA_T_LINEAR, l, k, tmp, e);
                if (!rc)
                    for (int64_t i = 0; i < rows * cols; i++) L->w_bf16[k][i] = f32_to_bf16(tmp[i]);
            }
            if (rc) {
                free(tmp);
                qerr_prefix(e, "%s", name);
                goto fail;
            }
            m->n_quantized_params += rows * cols;
            if (hp->qkv_bias && k <= LLAMA_V) { /* Qwen2: frozen fp32 bias, beside the blob as the norms */
                if (!(L->bias[k] = qmalloc((size_t)rows * sizeof(float), e)) ||
                    hf_model_tensor_f32(h, LLAMA_T_BIAS, l, k, L->bias[k], e)) {
                    free(tmp);
                    goto fail;
                }
                L->lin[k].bias = L->bias[k];
                m->n_params += rows;
            }
        }
        llama_layer_seal(L);
        m->quantized_bytes += (int64_t)lo.nbytes;
    }
    free(tmp);
    if (adopt) {
        m->double_quant = m->layers[0].nf4[0].double_quant;
    }
    m->n_params += m->n_quantized_params;
    if (fs) {
        m->fsdp = NULL;
        if (llama_fsdp_attach(fs, m, e)) {
            llama_fsdp_free(fs);
            free(fs);
            goto fail;
        }
        for (int l = 0; l < hp->n_layer; l++)
            for (int k = 0; k <= LLAMA_V; k++) m->layers[l].lin[k].bias = m->layers[l].bias[k];
    }
    if (llama_rope_init(&m->rope, hp, max_pos, e)) goto fail;
    return 0;
fail:
    llama_free(m);
    return -1;
}
