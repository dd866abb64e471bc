/* trainer/export.c — GGUF LoRA and merged-model exports (see export.h).
 *
 * References: llama.cpp convert_lora_to_gguf.py (tensor names, orientation,
 * F32, adapter.* keys) and src/llama-adapter.cpp (the shape checks and
 * scale = alpha / r it applies); convert_hf_to_gguf.py LlamaModel.permute
 * (Q/K row order); PEFT tuners/lora/layer.py get_delta_weight
 * (ΔW = (B @ A) · scaling); transformers configuration_llama.py and
 * modeling_utils.py save_pretrained (config.json, generation_config.json,
 * shard naming model-0000i-of-0000n.safetensors + model.safetensors.index.json).
 */
#include "trainer/export.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/bf16.h"
#include "core/file.h"
#include "core/pyrepr.h"
#include "core/strbuf.h"
#include "data/chat.h"
#include "data/tokenizer_json.h"
#include "format/gguf_write.h"
#include "format/safetensors.h"

void export_permute_rows_to_gguf(const float *src, float *dst, int n_head, int head_dim, int64_t cols) {
    int half = head_dim / 2;
    for (int h = 0; h < n_head; h++)
        for (int i = 0; i < half; i++)
            for (int j = 0; j < 2; j++)
                memcpy(dst + ((size_t)h * head_dim + 2 * i + j) * cols,
                       src + ((size_t)h * head_dim + (size_t)j * half + i) * cols, (size_t)cols * sizeof(float));
}

/* ------------------------------------------------------------------ GGUF LoRA */

int export_gguf_lora(const base_model *b, const lora_set *ls, const adapter_info *info, const char *path, qerr *e) {
    const llama_hparams *hp = base_model_hparams(b);
    gguf_writer *w;
    if (gguf_writer_init(&w, e)) return -1;
    /* llama.cpp: scale = alpha / r (b->ne[0]); rsLoRA wants alpha / sqrt(r) */
    float alpha = ls->use_rslora ? ls->alpha * sqrtf((float)ls->r) : ls->alpha;
    gguf_writer_add_str(w, "general.architecture", llama_arch_name(hp->arch));
    gguf_writer_add_str(w, "general.type", "adapter");
    gguf_writer_add_str(w, "general.name", "qlora adapter");
    if (info && info->base_model_name_or_path[0])
        gguf_writer_add_str(w, "general.base_model.0.name", info->base_model_name_or_path);
    gguf_writer_add_u32(w, "general.file_type", 0); /* ALL_F32 */
    gguf_writer_add_u32(w, "general.quantization_version", 2);
    gguf_writer_add_str(w, "adapter.type", "lora");
    gguf_writer_add_f32(w, "adapter.lora.alpha", alpha);

    /* q/k B matrices need a permuted copy; everything else is referenced in place */
    float **perm = calloc((size_t)ls->n_layer * 2, sizeof *perm);
    if (!perm) {
        gguf_writer_free(w);
        return qerr_set(e, "out of memory");
    }
    int rc = -1, n_written = 0;
    char name[96];
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const lora_adapter *a = lora_set_get(ls, l, k);
            if (!a || (info && info->present && !info->present[l * LLAMA_N_LINEAR + k])) continue;
            int64_t r = a->r, in = a->A->shape[1], out = a->B->shape[0];
            const float *B = a->B->data;
            if ((k == LLAMA_Q || k == LLAMA_K) && hp->arch == LLAMA_ARCH_LLAMA) { /* qwen2: HF row order */
                float *pb = malloc((size_t)(out * r) * sizeof(float));
                if (!pb) {
                    qerr_set(e, "out of memory");
                    goto done;
                }
                perm[l * 2 + (k == LLAMA_K)] = pb;
                export_permute_rows_to_gguf(B, pb, k == LLAMA_Q ? hp->n_head : hp->n_kv_head, hp->head_dim, r);
                B = pb;
            }
            uint64_t ne_a[2] = {(uint64_t)in, (uint64_t)r}, ne_b[2] = {(uint64_t)r, (uint64_t)out};
            snprintf(name, sizeof name, "blk.%d.%s.weight.lora_a", l, llama_hparams_linears(hp)[k].gguf);
            gguf_writer_add_tensor(w, name, GGML_TYPE_F32, 2, ne_a, a->A->data, (size_t)(in * r) * sizeof(float));
            snprintf(name, sizeof name, "blk.%d.%s.weight.lora_b", l, llama_hparams_linears(hp)[k].gguf);
            gguf_writer_add_tensor(w, name, GGML_TYPE_F32, 2, ne_b, B, (size_t)(out * r) * sizeof(float));
            n_written++;
        }
    if (n_written == 0) {
        qerr_set(e, "%s: the adapter has no LoRA modules to export", path);
        goto done;
    }
    rc = gguf_writer_write(w, path, e);
done:
    for (int i = 0; i < ls->n_layer * 2; i++) free(perm[i]);
    free(perm);
    gguf_writer_free(w);
    return rc;
}

/* ------------------------------------------------------------------ files */

/* dir/name holding `text` and a final newline (cJSON_Print's text has none). */
static int write_file(const char *dir, const char *name, const char *text, qerr *e) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    strbuf b = {0};
    strbuf_puts(&b, text);
    strbuf_puts(&b, "\n");
    int rc = b.oom ? qerr_set(e, "out of memory writing %s", path) : file_write_atomic(path, b.p, b.n, e);
    free(b.p);
    return rc;
}

static int write_json(const char *dir, const char *name, cJSON *o, qerr *e) {
    char *text = cJSON_Print(o);
    if (!text) return qerr_set(e, "out of memory printing %s", name);
    int rc = write_file(dir, name, text, e);
    free(text);
    return rc;
}

/* The tokenizer files are small (a few MB at most): read whole, written atomically. */
static int copy_file(const char *src, const char *dst, qerr *e) {
    size_t n = 0;
    char *b = file_read_all(src, &n, e);
    if (!b) return -1;
    int rc = file_write_atomic(dst, b, n, e);
    free(b);
    return rc;
}

static void add_raw_float(cJSON *o, const char *key, float v) {
    char b[64];
    py_float_repr(b, sizeof b, v);
    cJSON_AddRawToObject(o, key, b);
}

static void add_id_or_null(cJSON *o, const char *key, int32_t id) {
    if (id >= 0) cJSON_AddNumberToObject(o, key, id);
    else cJSON_AddNullToObject(o, key);
}

/* generation_config.json: eos = [eos, end-of-turn] (one int when they coincide). */
static int write_generation_config(const tokenizer *tok, const char *dir, qerr *e) {
    int32_t stop[4];
    int ns = chat_stop_ids(tok, stop, 4);
    cJSON *g = cJSON_CreateObject();
    add_id_or_null(g, "bos_token_id", tokenizer_bos_id(tok));
    if (ns == 1) cJSON_AddNumberToObject(g, "eos_token_id", stop[0]);
    else if (ns > 1) cJSON_AddItemToObject(g, "eos_token_id", cJSON_CreateIntArray(stop, ns));
    add_id_or_null(g, "pad_token_id", tokenizer_pad_id(tok));
    int rc = write_json(dir, "generation_config.json", g, e);
    cJSON_Delete(g);
    return rc;
}

/* "rope_scaling" as transformers writes it for the model's RoPE (modeling_rope_utils.py): null, linear, or
 * llama3 (recovered from a GGUF's rope_freqs.weight, llama_rope_llama3_of_factors). Errors: rope_freqs that no
 * rope_scaling of transformers reproduces (a merged model must compute what was trained). */
static int add_rope_scaling(cJSON *c, const llama_hparams *hp, qerr *e) {
    llama_rope_scaling rs = hp->rope_scaling;
    if (rs.type == LLAMA_ROPE_DEFAULT) {
        cJSON_AddNullToObject(c, "rope_scaling");
        return 0;
    }
    if (rs.type == LLAMA_ROPE_FREQ_FACTORS && llama_rope_llama3_of_factors(hp, &rs, e))
        return qerr_prefix(e, "merged config.json: rope_scaling");
    cJSON *o = cJSON_CreateObject();
    add_raw_float(o, "factor", rs.factor);
    if (rs.type == LLAMA_ROPE_LLAMA3) {
        add_raw_float(o, "high_freq_factor", rs.high_freq_factor);
        add_raw_float(o, "low_freq_factor", rs.low_freq_factor);
        cJSON_AddNumberToObject(o, "original_max_position_embeddings", rs.original_context);
    }
    cJSON_AddStringToObject(o, "rope_type", rs.type == LLAMA_ROPE_LLAMA3 ? "llama3" : "linear");
    cJSON_AddItemToObject(c, "rope_scaling", o);
    return 0;
}

/* config.json for a GGUF base: every Llama hyper-parameter transformers reads. */
static int write_config_from_hparams(const base_model *b, const tokenizer *tok, const char *dir, qerr *e) {
    const llama_hparams *hp = base_model_hparams(b);
    cJSON *c = cJSON_CreateObject();
    int qwen2 = hp->arch == LLAMA_ARCH_QWEN2, phi3 = hp->arch == LLAMA_ARCH_PHI3;
    cJSON_AddItemToObject(c, "architectures",
                          cJSON_CreateStringArray((const char *[]){qwen2  ? "Qwen2ForCausalLM"
                                                                   : phi3 ? "Phi3ForCausalLM"
                                                                          : "LlamaForCausalLM"}, 1));
    if (!qwen2 && !phi3) cJSON_AddFalseToObject(c, "attention_bias"); /* Qwen2's q/k/v biases are implied by its model_type */
    cJSON_AddRawToObject(c, "attention_dropout", "0.0");
    add_id_or_null(c, "bos_token_id", tokenizer_bos_id(tok));
    add_id_or_null(c, "eos_token_id", tokenizer_eos_id(tok));
    cJSON_AddNumberToObject(c, "head_dim", hp->head_dim);
    cJSON_AddStringToObject(c, "hidden_act", "silu");
    cJSON_AddNumberToObject(c, "hidden_size", hp->d_model);
    cJSON_AddRawToObject(c, "initializer_range", "0.02");
    cJSON_AddNumberToObject(c, "intermediate_size", hp->d_ff);
    cJSON_AddNumberToObject(c, "max_position_embeddings", hp->context_length);
    if (!qwen2 && !phi3) cJSON_AddFalseToObject(c, "mlp_bias");
    cJSON_AddStringToObject(c, "model_type", llama_arch_name(hp->arch));
    cJSON_AddNumberToObject(c, "num_attention_heads", hp->n_head);
    cJSON_AddNumberToObject(c, "num_hidden_layers", hp->n_layer);
    cJSON_AddNumberToObject(c, "num_key_value_heads", hp->n_kv_head);
    add_id_or_null(c, "pad_token_id", tokenizer_pad_id(tok));
    if (!qwen2 && !phi3) cJSON_AddNumberToObject(c, "pretraining_tp", 1);
    if (phi3) { /* Phi3Config: no dropout; original_max_position_embeddings matters only to longrope (refused) */
        cJSON_AddNumberToObject(c, "original_max_position_embeddings", hp->context_length);
        cJSON_AddRawToObject(c, "resid_pdrop", "0.0");
        cJSON_AddRawToObject(c, "embd_pdrop", "0.0");
    }
    if (hp->sliding_window > 0) cJSON_AddNumberToObject(c, "sliding_window", hp->sliding_window);
    else if (phi3) cJSON_AddNullToObject(c, "sliding_window"); /* Phi3Config: null = no window */
    if (hp->sliding_window > 0 && qwen2) cJSON_AddTrueToObject(c, "use_sliding_window");
    add_raw_float(c, "rms_norm_eps", hp->rms_eps);
    if (add_rope_scaling(c, hp, e)) {
        cJSON_Delete(c);
        return -1;
    }
    add_raw_float(c, "rope_theta", hp->rope_theta);
    cJSON_AddBoolToObject(c, "tie_word_embeddings", hp->tied_embeddings);
    cJSON_AddStringToObject(c, "torch_dtype", "bfloat16");
    cJSON_AddTrueToObject(c, "use_cache");
    cJSON_AddNumberToObject(c, "vocab_size", hp->vocab);
    int rc = write_json(dir, "config.json", c, e);
    cJSON_Delete(c);
    return rc;
}

/* config.json for an HF base: the original, minus quantization_config, bf16. */
static int write_config_from_hf(const base_model *b, const char *dir, qerr *e) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", base_model_path(b));
    cJSON *c = file_read_json_object(path, e);
    if (!c) return -1;
    cJSON_DeleteItemFromObjectCaseSensitive(c, "quantization_config");
    cJSON_DeleteItemFromObjectCaseSensitive(c, "torch_dtype");
    cJSON_DeleteItemFromObjectCaseSensitive(c, "dtype");
    cJSON_AddStringToObject(c, "torch_dtype", "bfloat16");
    int rc = write_json(dir, "config.json", c, e);
    cJSON_Delete(c);
    return rc;
}

int export_tokenizer_files(const base_model *b, const tokenizer *tok, const char *dir, qerr *e) {
    char src[4096], dst[4096];
    if (base_model_kind(b) == BASE_HF) {
        static const char *const files[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                            "chat_template.jinja", "vocab.json", "merges.txt"};
        for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
            snprintf(src, sizeof src, "%s/%s", base_model_path(b), files[i]);
            if (access(src, R_OK)) continue;
            snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
            if (copy_file(src, dst, e)) return -1;
        }
        return 0;
    }
    snprintf(dst, sizeof dst, "%s/tokenizer.json", dir);
    if (tokenizer_json_write_from_gguf(base_model_gguf(b), dst, e)) return -1;

    /* tokenizer_config.json: special tokens, the chat template, added tokens */
    cJSON *c = cJSON_CreateObject(), *dec = cJSON_CreateObject();
    int32_t nv = tokenizer_n_vocab(tok);
    char idbuf[16];
    for (int32_t id = 0; id < nv; id++) {
        int ty = tokenizer_token_type_of(tok, id);
        if (ty != TOKENIZER_TOKEN_CONTROL && ty != TOKENIZER_TOKEN_USER_DEFINED) continue;
        cJSON *a = cJSON_CreateObject();
        cJSON_AddStringToObject(a, "content", tokenizer_token_text(tok, id));
        cJSON_AddFalseToObject(a, "lstrip");
        cJSON_AddBoolToObject(a, "normalized", ty != TOKENIZER_TOKEN_CONTROL);
        cJSON_AddFalseToObject(a, "rstrip");
        cJSON_AddFalseToObject(a, "single_word");
        cJSON_AddBoolToObject(a, "special", ty == TOKENIZER_TOKEN_CONTROL);
        snprintf(idbuf, sizeof idbuf, "%d", id);
        cJSON_AddItemToObject(dec, idbuf, a);
    }
    cJSON_AddBoolToObject(c, "add_bos_token", tokenizer_add_bos(tok));
    cJSON_AddBoolToObject(c, "add_eos_token", tokenizer_add_eos(tok));
    cJSON_AddFalseToObject(c, "add_prefix_space");
    cJSON_AddItemToObject(c, "added_tokens_decoder", dec);
    int32_t sp[4] = {tokenizer_bos_id(tok), tokenizer_eos_id(tok), tokenizer_pad_id(tok), tokenizer_unk_id(tok)};
    static const char *const spk[4] = {"bos_token", "eos_token", "pad_token", "unk_token"};
    for (int i = 0; i < 4; i++) {
        if (sp[i] >= 0) cJSON_AddStringToObject(c, spk[i], tokenizer_token_text(tok, sp[i]));
        else cJSON_AddNullToObject(c, spk[i]);
    }
    if (tokenizer_chat_template(tok)) cJSON_AddStringToObject(c, "chat_template", tokenizer_chat_template(tok));
    cJSON_AddFalseToObject(c, "clean_up_tokenization_spaces");
    cJSON_AddNumberToObject(c, "model_max_length", base_model_hparams(b)->context_length);
    /* the generic fast tokenizer: it runs tokenizer.json as written (pre-tokenizer included) */
    cJSON_AddStringToObject(c, "tokenizer_class", "PreTrainedTokenizerFast");
    int rc = write_json(dir, "tokenizer_config.json", c, e);
    cJSON_Delete(c);
    if (rc) return -1;

    cJSON *m = cJSON_CreateObject();
    for (int i = 0; i < 4; i++)
        if (sp[i] >= 0) cJSON_AddStringToObject(m, spk[i], tokenizer_token_text(tok, sp[i]));
    rc = write_json(dir, "special_tokens_map.json", m, e);
    cJSON_Delete(m);
    return rc;
}

int export_run_chat_template(const char *choice, const char *jinja, const tokenizer *tok, char **out, qerr *e) {
    *out = NULL;
    static const char fb[] = "tokenizer_default_fallback_";
    if (!choice || !strcmp(choice, "tokenizer_default")) return 0;
    if (!strncmp(choice, fb, sizeof fb - 1) && tokenizer_chat_template(tok)) return 0;
    if (!strcmp(choice, "jinja")) {
        if (!jinja) return qerr_set(e, "chat_template: jinja needs chat_template_jinja (the template text or a file)");
        size_t len;
        /* axolotl: a path to an existing file is read, anything else is the text */
        char *text = access(jinja, R_OK) == 0 ? file_read_regular(jinja, 0, &len, e) : strdup(jinja);
        if (!text) return access(jinja, R_OK) == 0 ? -1 : qerr_set(e, "out of memory");
        const chat_template *ct;
        if (chat_template_find(text, &ct, e)) { /* the run refused it too: never export what was not trained */
            free(text);
            return qerr_prefix(e, "chat_template_jinja");
        }
        *out = text;
        return 0;
    }
    const chat_template *ct;
    if (chat_template_named(!strncmp(choice, fb, sizeof fb - 1) ? choice + sizeof fb - 1 : choice, &ct, e)) return -1;
    const char *src = chat_template_axolotl_source(ct);
    if (!src) return qerr_set(e, "chat_template: \"%s\": internal error: no text for axolotl's template", choice);
    if (!(*out = strdup(src))) return qerr_set(e, "out of memory");
    return 0;
}

int export_write_chat_template(const char *dir, const char *text, qerr *e) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    cJSON *c = file_read_json_object(path, e);
    if (!c) return -1;
    cJSON_DeleteItemFromObjectCaseSensitive(c, "chat_template");
    int rc = write_json(dir, "tokenizer_config.json", c, e);
    cJSON_Delete(c);
    if (rc) return -1;
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    return file_write_atomic(path, text, strlen(text), e); /* as transformers writes it: f.write(chat_template) */
}

/* ------------------------------------------------------------------ merged model */

typedef struct merged_entry {
    char name[128];
    llama_role role;
    int layer, module;
    int64_t rows, cols;
} merged_entry;

/* W (rows, cols) += scaling · (B @ A), fp32; A (r, cols), B (rows, r). */
static void add_lora_delta(float *W, const float *A, const float *B, int64_t rows, int64_t cols, int r, float scaling) {
#pragma omp parallel
    {
        float *acc = malloc((size_t)cols * sizeof(float));
        if (acc) {
#pragma omp for schedule(static)
            for (int64_t o = 0; o < rows; o++) {
                memset(acc, 0, (size_t)cols * sizeof(float));
                for (int j = 0; j < r; j++) {
                    float bj = B[o * r + j];
                    const float *a = A + (int64_t)j * cols;
                    for (int64_t i = 0; i < cols; i++) acc[i] += bj * a[i];
                }
                float *w = W + o * cols;
                for (int64_t i = 0; i < cols; i++) w[i] += acc[i] * scaling;
            }
            free(acc);
        }
    }
}

static int merged_tensor(const base_model *b, const llama_model *m, const lora_set *ls, const adapter_info *info,
                         const merged_entry *me, float *tmp, bf16 *dst, qerr *e) {
    if (me->role == LLAMA_T_LINEAR && m) {
        frozen_rows_f32(&m->layers[me->layer].lin[me->module], 0, me->rows, tmp);
    } else if (base_model_tensor_f32(b, me->role, me->layer, me->module, tmp, e)) {
        return -1;
    }
    if (me->role == LLAMA_T_LINEAR && ls) {
        const lora_adapter *a = lora_set_get(ls, me->layer, me->module);
        int present = !info || !info->present || info->present[me->layer * LLAMA_N_LINEAR + me->module];
        if (a && present) add_lora_delta(tmp, a->A->data, a->B->data, me->rows, me->cols, a->r, a->scaling);
    }
    int64_t n = me->rows * me->cols;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(tmp[i])) return qerr_set(e, "%s: non-finite value after merging", me->name);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(tmp[i]);
    return 0;
}

/* After a merged export of n_shards files into dir: delete the weight files of an earlier export there
 * that are not part of this one — "model.safetensors" when this export is sharded, and every
 * "model-NNNNN-of-MMMMM.safetensors" whose MMMMM differs from n_shards (or any, when it is a single file).
 * transformers loads model.safetensors before an index, so a stale single file beside new shards would
 * be loaded instead of them. Runs only after every new file and the index are in place. */
static int remove_stale_weights(const char *dir, int n_shards, qerr *e) {
    DIR *d = opendir(dir);
    if (!d) return qerr_set(e, "cannot list %s: %s", dir, strerror(errno));
    struct dirent *de;
    int rc = 0;
    while ((de = readdir(d)) && !rc) {
        unsigned a, b;
        char tail[32];
        int stale = 0;
        if (!strcmp(de->d_name, "model.safetensors")) stale = n_shards > 1;
        else if (sscanf(de->d_name, "model-%5u-of-%5u%31s", &a, &b, tail) == 3 && !strcmp(tail, ".safetensors") &&
                 strlen(de->d_name) == strlen("model-00001-of-00001.safetensors"))
            stale = n_shards == 1 || (int)b != n_shards;
        if (!stale) continue;
        char p[4096];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (unlink(p) && errno != ENOENT) rc = qerr_set(e, "cannot remove the earlier export's %s: %s", p, strerror(errno));
        else fprintf(stderr, "[export] removed %s of an earlier export (not part of this one)\n", p);
    }
    closedir(d);
    return rc;
}

int export_merged(const base_model *b, const llama_model *m, const tokenizer *tok, const lora_set *ls,
                  const adapter_info *info, const char *dir, size_t max_shard_bytes, qerr *e) {
    const llama_hparams *hp = base_model_hparams(b);
    if (max_shard_bytes == 0) max_shard_bytes = (size_t)2 << 30;
    if (file_mkdir_p(dir, e)) return -1;

    /* tensors in transformers' state_dict order */
    int n = 1 + hp->n_layer * (2 + LLAMA_N_LINEAR + (hp->qkv_bias ? 3 : 0)) + 1 + (hp->tied_embeddings ? 0 : 1);
    const llama_linear_name *lin = llama_hparams_linears(hp); /* Phi-3: the fused qkv_proj and gate_up_proj */
    merged_entry *ent = calloc((size_t)n, sizeof *ent);
    if (!ent) return qerr_set(e, "out of memory");
    int k = 0;
    ent[k++] = (merged_entry){.name = "model.embed_tokens.weight", .role = LLAMA_T_EMBED};
    for (int l = 0; l < hp->n_layer; l++) {
        for (int j = 0; j < LLAMA_N_LINEAR; j++) {
            if (!lin[j].peft) continue;
            ent[k] = (merged_entry){.role = LLAMA_T_LINEAR, .layer = l, .module = j};
            snprintf(ent[k].name, sizeof ent[k].name, "model.layers.%d.%s.%s.weight", l, lin[j].parent, lin[j].peft);
            k++;
            if (hp->qkv_bias && j <= LLAMA_V) { /* the frozen bias, unchanged by the merge */
                ent[k] = (merged_entry){.role = LLAMA_T_BIAS, .layer = l, .module = j};
                snprintf(ent[k].name, sizeof ent[k].name, "model.layers.%d.%s.%s.bias", l, lin[j].parent,
                         lin[j].peft);
                k++;
            }
        }
        ent[k] = (merged_entry){.role = LLAMA_T_ATTN_NORM, .layer = l};
        snprintf(ent[k++].name, sizeof ent[0].name, "model.layers.%d.input_layernorm.weight", l);
        ent[k] = (merged_entry){.role = LLAMA_T_FFN_NORM, .layer = l};
        snprintf(ent[k++].name, sizeof ent[0].name, "model.layers.%d.post_attention_layernorm.weight", l);
    }
    ent[k++] = (merged_entry){.name = "model.norm.weight", .role = LLAMA_T_OUT_NORM};
    if (!hp->tied_embeddings) ent[k++] = (merged_entry){.name = "lm_head.weight", .role = LLAMA_T_LM_HEAD};
    n = k; /* fewer when linears are fused */
    int64_t max_el = 0;
    for (int i = 0; i < n; i++) {
        llama_tensor_shape(hp, ent[i].role, ent[i].module, &ent[i].rows, &ent[i].cols);
        if (ent[i].rows * ent[i].cols > max_el) max_el = ent[i].rows * ent[i].cols;
    }

    /* plan shards: consecutive tensors up to max_shard_bytes each */
    int *shard_of = calloc((size_t)n, sizeof *shard_of);
    if (!shard_of) {
        free(ent);
        return qerr_set(e, "out of memory");
    }
    int n_shards = 1;
    size_t cur = 0, total = 0;
    for (int i = 0; i < n; i++) {
        size_t nb = (size_t)(ent[i].rows * ent[i].cols) * 2;
        if (cur > 0 && cur + nb > max_shard_bytes) {
            n_shards++;
            cur = 0;
        }
        cur += nb;
        total += nb;
        shard_of[i] = n_shards - 1;
    }

    int rc = -1;
    float *tmp = malloc((size_t)max_el * sizeof(float));
    st_tensor *ts = calloc((size_t)n, sizeof *ts);
    bf16 **bufs = calloc((size_t)n, sizeof *bufs);
    cJSON *wmap = cJSON_CreateObject();
    char path[4096], fname[64];
    if (!tmp || !ts || !bufs || !wmap) {
        qerr_set(e, "out of memory");
        goto done;
    }
    for (int s = 0, i = 0; s < n_shards; s++) {
        if (n_shards == 1) snprintf(fname, sizeof fname, "model.safetensors");
        else snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        int first = i, cnt = 0;
        for (; i < n && shard_of[i] == s; i++, cnt++) {
            const merged_entry *me = &ent[i];
            int64_t rows = me->rows, cols = me->cols;
            if (!(bufs[i] = malloc((size_t)(rows * cols) * sizeof(bf16)))) {
                qerr_set(e, "out of memory (shard of %zu bytes; lower --max-shard-size)", max_shard_bytes);
                goto done;
            }
            if (merged_tensor(b, m, ls, info, me, tmp, bufs[i], e)) goto done;
            ts[i] = (st_tensor){.name = me->name, .dtype = "BF16", .n_dims = cols == 1 ? 1 : 2,
                                .shape = {rows, cols}, .data = bufs[i],
                                .nbytes = (size_t)(rows * cols) * sizeof(bf16)};
            cJSON_AddStringToObject(wmap, me->name, fname);
        }
        snprintf(path, sizeof path, "%s/%s", dir, fname);
        if (safetensors_write(path, ts + first, cnt, NULL, e)) goto done;
        for (int j = first; j < first + cnt; j++) {
            free(bufs[j]);
            bufs[j] = NULL;
        }
    }
    if (n_shards > 1) {
        cJSON *idx = cJSON_CreateObject(), *meta = cJSON_CreateObject();
        cJSON_AddNumberToObject(meta, "total_size", (double)total);
        cJSON_AddItemToObject(idx, "metadata", meta);
        cJSON_AddItemToObject(idx, "weight_map", wmap);
        wmap = NULL;
        int r2 = write_json(dir, "model.safetensors.index.json", idx, e);
        cJSON_Delete(idx);
        if (r2) goto done;
    } else {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        unlink(path); /* a stale index from an earlier sharded export would shadow model.safetensors */
    }
    if (remove_stale_weights(dir, n_shards, e)) goto done;
    if (base_model_kind(b) == BASE_HF ? write_config_from_hf(b, dir, e) : write_config_from_hparams(b, tok, dir, e))
        goto done;
    if (write_generation_config(tok, dir, e)) goto done;
    if (export_tokenizer_files(b, tok, dir, e)) goto done;
    rc = 0;
done:
    if (bufs)
        for (int i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(ts);
    free(tmp);
    free(shard_of);
    free(ent);
    cJSON_Delete(wmap);
    return rc;
}
