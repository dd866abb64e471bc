/* model/base.c — GGUF file or HF directory behind one interface (see base.h). */
#include "model/base.h"

#include "comm/comm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/hf.h"

struct base_model {
    base_kind kind;
    char *path;
    gguf_file *gguf;
    hf_model *hf;
    llama_hparams hp;
};

int base_model_open(const char *path, base_model **out, qerr *e) {
    *out = NULL;
    struct stat st;
    if (stat(path, &st)) return qerr_set(e, "%s: no such file or directory", path);
    base_model *b = qcalloc(1, sizeof *b, e);
    if (!b) return -1;
    if (!(b->path = strdup(path))) {
        free(b);
        return qerr_set(e, "out of memory");
    }
    if (S_ISDIR(st.st_mode)) {
        b->kind = BASE_HF;
        if (hf_model_open(path, &b->hf, e)) goto fail;
        b->hp = *hf_model_hparams(b->hf);
    } else {
        b->kind = BASE_GGUF;
        if (gguf_open(path, &b->gguf, e)) goto fail;
        if (llama_hparams_from_gguf(b->gguf, &b->hp, e)) {
            qerr_prefix(e, "%s", path);
            goto fail;
        }
    }
    *out = b;
    return 0;
fail:
    base_model_close(b);
    return -1;
}

void base_model_close(base_model *b) {
    if (!b) return;
    gguf_close(b->gguf);
    hf_model_close(b->hf);
    free(b->path);
    free(b);
}

base_kind base_model_kind(const base_model *b) { return b->kind; }
const char *base_model_path(const base_model *b) { return b->path; }
const gguf_file *base_model_gguf(const base_model *b) { return b->gguf; }
const gguf_file *base_model_tokenizer_gguf(const base_model *b) {
    return b->kind == BASE_HF ? hf_model_tokenizer_gguf(b->hf) : b->gguf;
}
int base_model_prequantized(const base_model *b) { return b->hf ? hf_model_prequantized(b->hf) : 0; }
const llama_hparams *base_model_hparams(const base_model *b) { return &b->hp; }

int base_model_tokenizer(const base_model *b, tokenizer **out, qerr *e) {
    if (b->kind == BASE_HF) return hf_model_tokenizer(b->hf, out, e);
    if (tokenizer_load_gguf(b->gguf, out, e)) return qerr_prefix(e, "%s", b->path);
    return 0;
}

int base_model_load(const base_model *b, int load_in_4bit, int double_quant, int max_pos, llama_model *m, qerr *e) {
    if (b->kind == BASE_HF) return hf_model_load(b->hf, load_in_4bit, double_quant, max_pos, m, e);
    return llama_load_gguf(b->gguf, load_in_4bit, double_quant, max_pos, m, e);
}

int base_model_load_sharded(const base_model *b, int load_in_4bit, int double_quant, int max_pos, comm *c,
                            llama_model *m, qerr *e) {
    if (b->kind == BASE_HF) return hf_model_load_sharded(b->hf, load_in_4bit, double_quant, max_pos, c, m, e);
    return llama_load_gguf_sharded(b->gguf, load_in_4bit, double_quant, max_pos, c, m, e);
}

static int gguf_name_of(const llama_hparams *hp, llama_role role, int layer, int module, char *name, size_t n) {
    switch (role) {
    case LLAMA_T_EMBED: snprintf(name, n, "token_embd.weight"); return 0;
    case LLAMA_T_LM_HEAD: snprintf(name, n, hp->tied_embeddings ? "token_embd.weight" : "output.weight"); return 0;
    case LLAMA_T_OUT_NORM: snprintf(name, n, "output_norm.weight"); return 0;
    case LLAMA_T_ATTN_NORM: snprintf(name, n, "blk.%d.attn_norm.weight", layer); return 0;
    case LLAMA_T_FFN_NORM: snprintf(name, n, "blk.%d.ffn_norm.weight", layer); return 0;
    case LLAMA_T_LINEAR:
        if (!llama_linear_present(hp, module)) return -1;
        snprintf(name, n, "blk.%d.%s.weight", layer, llama_hparams_linears(hp)[module].gguf);
        return 0;
    case LLAMA_T_BIAS:
        if (module < 0 || module > LLAMA_V || !hp->qkv_bias) return -1;
        snprintf(name, n, "blk.%d.%s.bias", layer, llama_hparams_linears(hp)[module].gguf);
        return 0;
    }
    return -1;
}

int base_model_tensor_f32(const base_model *b, llama_role role, int layer, int module, float *dst, qerr *e) {
    if (layer < 0 || layer >= b->hp.n_layer) return qerr_set(e, "%s: layer %d out of range", b->path, layer);
    if (b->kind == BASE_HF) return hf_model_tensor_f32(b->hf, role, layer, module, dst, e);
    char name[96];
    if (gguf_name_of(&b->hp, role, layer, module, name, sizeof name))
        return qerr_set(e, "%s: unknown tensor role", b->path);
    int64_t rows, cols;
    llama_tensor_shape(&b->hp, role, module, &rows, &cols);
    if (cols == 1) {
        cols = rows;
        rows = 1;
    }
    const gguf_tensor *t = gguf_find_tensor(b->gguf, name);
    if (!t) return qerr_set(e, "%s: tensor %s missing", b->path, name);
    if ((int64_t)t->ne[0] != cols || (int64_t)(t->nelements / t->ne[0]) != rows)
        return qerr_set(e, "%s: tensor %s: expected %lld x %lld elements", b->path, name, (long long)rows,
                        (long long)cols);
    if (gguf_tensor_to_f32(t, dst, e)) return qerr_prefix(e, "%s: tensor %s", b->path, name);
    int permuted = role == LLAMA_T_LINEAR && b->hp.arch == LLAMA_ARCH_LLAMA; /* qwen2's GGUF keeps HF order */
    if (permuted && module == LLAMA_Q) llama_unpermute_rows(dst, b->hp.n_head, b->hp.head_dim, cols);
    if (permuted && module == LLAMA_K) llama_unpermute_rows(dst, b->hp.n_kv_head, b->hp.head_dim, cols);
    return 0;
}
