/* tests/tiny_model.c — see tiny_model.h. (tests/test_hf.c writes a smaller
 * relative of this model for the interchange tests.) */
#include "tests/tiny_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "format/gguf.h"
#include "format/gguf_write.h"

#define TM_NL 2
#define TM_DM 64
#define TM_NH 4
#define TM_NKV 2
#define TM_HD 16
#define TM_FF 128
#define TM_VOCAB 262

void tiny_byte_sym(int b, char out[3]) {
    int n = 0, cp = -1;
    for (int x = 0; x < 256; x++) {
        int printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
        int c = printable ? x : 256 + n++;
        if (x == b) cp = c;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = 0;
    }
}

void tiny_vocab_add(struct gguf_writer *w, const char *pre, const char *special0, const char *special1,
                    const char *special2) {
    static char toks[TM_VOCAB][16];
    const char *tp[TM_VOCAB];
    int32_t types[TM_VOCAB];
    gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2");
    gguf_writer_add_str(w, "tokenizer.ggml.pre", pre);
    snprintf(toks[0], sizeof toks[0], "%s", special0);
    snprintf(toks[1], sizeof toks[1], "%s", special1);
    snprintf(toks[2], sizeof toks[2], "%s", special2);
    for (int i = 0; i < 3; i++) types[i] = 3;
    for (int b = 0; b < 256; b++) {
        tiny_byte_sym(b, toks[3 + b]);
        types[3 + b] = 1;
    }
    strcpy(toks[259], "he");
    strcpy(toks[260], "ll");
    strcpy(toks[261], "hell");
    for (int i = 259; i < TM_VOCAB; i++) types[i] = 1;
    for (int i = 0; i < TM_VOCAB; i++) tp[i] = toks[i];
    gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", tp, NULL, TM_VOCAB);
    gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", types, TM_VOCAB);
    const char *merges[3] = {"h e", "l l", "he ll"};
    gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", merges, NULL, 3);
}

int tiny_model_write(const char *path, uint64_t seed) {
    gguf_writer *w;
    qerr e;
    if (gguf_writer_init(&w, &e)) {
        fprintf(stderr, "tiny_model_write: %s\n", e.msg);
        return -1;
    }
    gguf_writer_add_str(w, "general.architecture", "llama");
    gguf_writer_add_u32(w, "llama.block_count", TM_NL);
    gguf_writer_add_u32(w, "llama.context_length", 256);
    gguf_writer_add_u32(w, "llama.embedding_length", TM_DM);
    gguf_writer_add_u32(w, "llama.feed_forward_length", TM_FF);
    gguf_writer_add_u32(w, "llama.attention.head_count", TM_NH);
    gguf_writer_add_u32(w, "llama.attention.head_count_kv", TM_NKV);
    gguf_writer_add_f32(w, "llama.rope.freq_base", 10000.0f);
    gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    tiny_vocab_add(w, "smollm", "<|endoftext|>", "<|im_start|>", "<|im_end|>");
    gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
    gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2);
    gguf_writer_add_u32(w, "tokenizer.ggml.padding_token_id", 2);
    gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", 0);

    float *keep[4 + 9 * TM_NL];
    int nk = 0, bad = 0;
    char name[64];
    /* one tensor: rows x cols uniform in [-scale, scale) (norm weights around 1) */
#define ADD(nm, rows, cols, scale, center)                                                            \
    do {                                                                                              \
        const int64_t n_ = (int64_t)(rows) * (cols);                                                  \
        float *d_ = malloc((size_t)n_ * sizeof(float));                                               \
        if (!d_) {                                                                                    \
            bad = 1;                                                                                  \
            break;                                                                                    \
        }                                                                                             \
        for (int64_t i_ = 0; i_ < n_; i_++)                                                           \
            d_[i_] = (center) + (2.0f * rng_uniform(seed, (uint64_t)nk, (uint64_t)i_) - 1.0f) * (scale); \
        keep[nk++] = d_;                                                                              \
        uint64_t ne_[2] = {(uint64_t)(cols), (uint64_t)(rows)};                                       \
        gguf_writer_add_tensor(w, nm, GGML_TYPE_F32, (rows) == 1 ? 1 : 2, ne_, d_, (size_t)n_ * sizeof(float)); \
    } while (0)
    ADD("token_embd.weight", TM_VOCAB, TM_DM, 1.0f, 0.0f);
    ADD("output_norm.weight", 1, TM_DM, 0.1f, 1.0f);
    for (int l = 0; l < TM_NL && !bad; l++) {
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        ADD(name, 1, TM_DM, 0.1f, 1.0f);
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        ADD(name, 1, TM_DM, 0.1f, 1.0f);
        snprintf(name, sizeof name, "blk.%d.attn_q.weight", l);
        ADD(name, TM_NH * TM_HD, TM_DM, 0.2f, 0.0f);
        snprintf(name, sizeof name, "blk.%d.attn_k.weight", l);
        ADD(name, TM_NKV * TM_HD, TM_DM, 0.2f, 0.0f);
        snprintf(name, sizeof name, "blk.%d.attn_v.weight", l);
        ADD(name, TM_NKV * TM_HD, TM_DM, 0.2f, 0.0f);
        snprintf(name, sizeof name, "blk.%d.attn_output.weight", l);
        ADD(name, TM_DM, TM_NH * TM_HD, 0.2f, 0.0f);
        snprintf(name, sizeof name, "blk.%d.ffn_gate.weight", l);
        ADD(name, TM_FF, TM_DM, 0.2f, 0.0f);
        snprintf(name, sizeof name, "blk.%d.ffn_up.weight", l);
        ADD(name, TM_FF, TM_DM, 0.2f, 0.0f);
        snprintf(name, sizeof name, "blk.%d.ffn_down.weight", l);
        ADD(name, TM_DM, TM_FF, 0.2f, 0.0f);
    }
#undef ADD
    int rc = bad ? -1 : gguf_writer_write(w, path, &e);
    if (rc) fprintf(stderr, "tiny_model_write: %s\n", bad ? "out of memory" : e.msg);
    gguf_writer_free(w);
    for (int i = 0; i < nk; i++) free(keep[i]);
    return rc;
}

int tiny_corpus_write(const char *path, int docs, int nwords, int mul, int span) {
    static const char *const words[] = {"hello", "shell", "help", "yellow", "cell", "the", "of", "and", "hell",
                                        "tell", "well", "spell", "ls -l", "man page", "open(2)", "read"};
    if (nwords < 1 || nwords > 16 || span < 1) {
        fprintf(stderr, "tiny_corpus_write: nwords %d (1..16), span %d (>= 1)\n", nwords, span);
        return -1;
    }
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "tiny_corpus_write: cannot create %s\n", path);
        return -1;
    }
    for (int d = 0; d < docs; d++) {
        fprintf(f, "{\"text\": \"");
        for (int w = 0; w < 4 + d % span; w++) fprintf(f, "%s%s", w ? " " : "", words[(d * mul + w * 3) % nwords]);
        fprintf(f, ".\"}\n");
    }
    return fclose(f) ? -1 : 0;
}

int tiny_world_write(const char *dir, uint64_t seed, int docs, int nwords, int mul, int span, const char *config_tail,
                     char *cfg, size_t cfg_n) {
    char p[512];
    snprintf(p, sizeof p, "%s/tiny.gguf", dir);
    if (tiny_model_write(p, seed)) return -1;
    snprintf(p, sizeof p, "%s/train.jsonl", dir);
    if (tiny_corpus_write(p, docs, nwords, mul, span)) return -1;
    snprintf(cfg, cfg_n, "%s/config.yaml", dir);
    FILE *f = fopen(cfg, "w");
    if (!f) {
        fprintf(stderr, "tiny_world_write: cannot create %s\n", cfg);
        return -1;
    }
    fprintf(f,
            "base_model: %s/tiny.gguf\nadapter: qlora\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\n"
            "lora_target_linear: true\ndatasets:\n  - path: %s/train.jsonl\n    type: completion\n%s",
            dir, dir, config_tail);
    return fclose(f) ? -1 : 0;
}
