/* model/adapter.c — PEFT LoRA adapter directory → lora_set (see adapter.h).
 * Config keys: peft/tuners/lora/config.py; tensor names:
 * peft/utils/save_and_load.py (adapter name removed on save). */
#include "model/adapter.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/bf16.h"
#include "core/file.h"
#include "format/peft.h"
#include "format/safetensors.h"

/* A Llama LoRA tensor name (format/peft.h): layer, module (model/llama_linear.h) and
 * ab (0 = A, 1 = B); -1 unless the parent is the module's own (self_attn / mlp). */
static int parse_name(const llama_hparams *hp, const char *name, int *layer, int *module, int *ab) {
    peft_name_parts n;
    if (peft_tensor_name_parse(name, &n)) return -1;
    const llama_linear_name *lin = llama_hparams_linears(hp);
    int k = llama_linear_from_peft_in(lin, n.module, n.module_len);
    if (k < 0 || strlen(lin[k].parent) != n.parent_len || memcmp(lin[k].parent, n.parent, n.parent_len))
        return -1;
    *layer = n.layer;
    *module = k;
    *ab = n.ab == 'B';
    return 0;
}

static int to_f32(const st_tensor *t, float *dst, const char *path, qerr *e) {
    int64_t n = t->shape[0] * t->shape[1];
    if (!strcmp(t->dtype, "F32")) {
        memcpy(dst, t->data, (size_t)n * 4);
    } else if (!strcmp(t->dtype, "BF16") || !strcmp(t->dtype, "F16")) {
        int isbf = t->dtype[0] == 'B';
        const uint8_t *s = t->data;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = isbf ? bf16_to_f32(h) : f16_to_f32(h);
        }
    } else {
        return qerr_set(e, "%s: tensor %s: dtype %s (expected F32, BF16 or F16)", path, t->name, t->dtype);
    }
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(dst[i])) return qerr_set(e, "%s: tensor %s: non-finite value at %lld", path, t->name, (long long)i);
    return 0;
}

void adapter_info_free(adapter_info *info) {
    free(info->present);
    memset(info, 0, sizeof *info);
}

int adapter_load_peft(const char *dir, const llama_hparams *hp, lora_set *ls, adapter_info *info, qerr *e) {
    memset(ls, 0, sizeof *ls);
    memset(info, 0, sizeof *info);
    char path[4096], spath[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    snprintf(spath, sizeof spath, "%s/adapter_model.safetensors", dir);
    peft_adapter_config pc;
    if (peft_read_adapter_config(path, &pc, e)) return -1;
    info->r = pc.r;
    info->lora_alpha = pc.lora_alpha;
    info->lora_dropout = pc.lora_dropout;
    info->use_rslora = pc.use_rslora;
    snprintf(info->base_model_name_or_path, sizeof info->base_model_name_or_path, "%s", pc.base_model_name_or_path);
    int rc = -1;
    safetensors_file *sf = NULL;
    llama_model skel;
    memset(&skel, 0, sizeof skel);
    float *buf = NULL;

    if (safetensors_open(spath, &sf, e)) goto done;
    int n = safetensors_count(sf);
    int target[LLAMA_N_LINEAR] = {0};
    int saved_seen[LORA_N_SAVE] = {0};
    for (int i = 0; i < n; i++) {
        st_tensor t;
        safetensors_get(sf, i, &t);
        int l, k, ab;
        if (!strcmp(t.name, peft_saved_module_name(0)) || !strcmp(t.name, peft_saved_module_name(1))) {
            const int head = !strcmp(t.name, peft_saved_module_name(1));
            if (!(head ? pc.save_lm_head : pc.save_embed)) {
                qerr_set(e, "%s: tensor %s, but %s/adapter_config.json's modules_to_save does not list %s", spath,
                         t.name, dir, head ? "lm_head" : "embed_tokens");
                goto done;
            }
            if (t.n_dims != 2 || t.shape[0] != hp->vocab || t.shape[1] != hp->d_model) {
                qerr_set(e, "%s: tensor %s: shape [%lld, %lld], expected [%d, %d] (vocab, d_model of the base)", spath,
                         t.name, (long long)t.shape[0], (long long)(t.n_dims > 1 ? t.shape[1] : 0), hp->vocab,
                         hp->d_model);
                goto done;
            }
            saved_seen[head] = 1;
            continue;
        }
        if (parse_name(hp, t.name, &l, &k, &ab)) {
            if (strstr(t.name, "lora_magnitude_vector")) qerr_set(e, "%s: %s: DoRA adapters are not supported", spath, t.name);
            else if (strstr(t.name, "lora_embedding")) qerr_set(e, "%s: %s: embedding adapters are not supported", spath, t.name);
            else qerr_set(e, "%s: tensor %s is not a LoRA A/B of a linear of this %s model (%s); "
                             "modules_to_save and other extras are not supported", spath, t.name,
                          llama_arch_name(hp->arch),
                          hp->arch == LLAMA_ARCH_PHI3 ? "qkv_proj, o_proj, gate_up_proj, down_proj"
                                                      : "q/k/v/o/gate/up/down_proj");
            goto done;
        }
        if (l >= hp->n_layer) {
            qerr_set(e, "%s: tensor %s: layer %d, but the base model has %d layers", spath, t.name, l, hp->n_layer);
            goto done;
        }
        target[k] = 1;
    }
    if (n == 0) {
        qerr_set(e, "%s: no tensors", spath);
        goto done;
    }
    if (pc.save_embed != saved_seen[LORA_SAVE_EMBED] || pc.save_lm_head != saved_seen[LORA_SAVE_LM_HEAD]) {
        qerr_set(e, "%s: adapter_config.json's modules_to_save lists %s, but the file has no tensor %s", spath,
                 pc.save_embed != saved_seen[LORA_SAVE_EMBED] ? "embed_tokens" : "lm_head",
                 peft_saved_module_name(pc.save_embed == saved_seen[LORA_SAVE_EMBED]));
        goto done;
    }

    /* a skeleton model (dims only) is all lora_set_init needs */
    skel.hp = *hp;
    skel.layers = qcalloc((size_t)hp->n_layer, sizeof *skel.layers, e);
    if (!skel.layers) goto done;
    for (int l = 0; l < hp->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            int64_t rows, cols;
            llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &rows, &cols);
            skel.layers[l].lin[k].out = rows;
            skel.layers[l].lin[k].in = cols;
        }
    /* the copies' tables are not in the skeleton (w_f32 NULL): lora_set_init_saved leaves them zero, the
     * file's values follow */
    skel.embed = skel.lm_head = (frozen_weight){.out = hp->vocab, .in = hp->d_model, .kind = FROZEN_F32};
    if (lora_set_init_saved(ls, NULL, &skel, info->r, info->lora_alpha, info->lora_dropout, info->use_rslora, target,
                            saved_seen, 0, e))
        goto done;
    memset(ls->params, 0, (size_t)ls->n_params * sizeof(float));
    info->present = qcalloc((size_t)hp->n_layer * LLAMA_N_LINEAR, 1, e);
    if (!info->present) goto done;
    unsigned char *seen = qcalloc((size_t)hp->n_layer * LLAMA_N_LINEAR, 1, e);
    if (!seen) goto done;
    for (int i = 0; i < n; i++) {
        st_tensor t;
        safetensors_get(sf, i, &t);
        int l = 0, k = 0, ab = 0;
        if (!strcmp(t.name, peft_saved_module_name(0)) || !strcmp(t.name, peft_saved_module_name(1))) {
            const int kk = !strcmp(t.name, peft_saved_module_name(1)) ? LORA_SAVE_LM_HEAD : LORA_SAVE_EMBED;
            if (to_f32(&t, ls->save_t[kk].data, spath, e)) {
                free(seen);
                goto done;
            }
            continue;
        }
        parse_name(hp, t.name, &l, &k, &ab);
        int idx = l * LLAMA_N_LINEAR + k;
        const lora_adapter *a = lora_set_get(ls, l, k);
        const tensor *dst = ab ? a->B : a->A;
        if (t.n_dims != 2 || t.shape[0] != dst->shape[0] || t.shape[1] != dst->shape[1]) {
            qerr_set(e, "%s: tensor %s: shape [%lld, %lld], expected [%lld, %lld] (r %d)", spath, t.name,
                     (long long)t.shape[0], (long long)(t.n_dims > 1 ? t.shape[1] : 0), (long long)dst->shape[0],
                     (long long)dst->shape[1], info->r);
            free(seen);
            goto done;
        }
        if (to_f32(&t, dst->data, spath, e)) {
            free(seen);
            goto done;
        }
        seen[idx] |= (unsigned char)(1u << ab);
    }
    for (int idx = 0; idx < hp->n_layer * LLAMA_N_LINEAR; idx++) {
        if (seen[idx] == 1 || seen[idx] == 2) {
            qerr_set(e, "%s: layer %d %s has lora_%c but not lora_%c", spath, idx / LLAMA_N_LINEAR,
                     llama_hparams_linears(hp)[idx % LLAMA_N_LINEAR].peft, seen[idx] == 1 ? 'A' : 'B', seen[idx] == 1 ? 'B' : 'A');
            free(seen);
            goto done;
        }
        info->present[idx] = seen[idx] == 3;
        info->n_present += seen[idx] == 3;
    }
    free(seen);
    rc = 0;
done:
    if (rc) {
        lora_set_free(ls);
        adapter_info_free(info);
    }
    free(buf);
    free(skel.layers);
    safetensors_close(sf);
    return rc;
}

int adapter_peek_base(const char *dir, char *buf, size_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    return peft_adapter_base_model(path, buf, n);
}
