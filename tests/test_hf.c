/* tests/test_hf.c — model interchange: GGUF writer, PEFT adapter reader, GGUF
 * LoRA and merged-model exports, the KV-cached inference path, tokenizer.json,
 * and Hugging Face model directories as a base (model/hf.c).
 *
 * Everything runs on a tiny random Llama written here as a GGUF with
 * format/gguf_write.c (2 layers, d 64, 4/2 heads, byte-level vocabulary with
 * ChatML specials), so no download is needed. The consumers' side (PEFT,
 * transformers, llama.cpp) is checked by `make test-interop`.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "autograd/gemm.h"
#include "core/bf16.h"
#include "core/file.h"
#include "core/pyrepr.h"
#include "core/rng.h"
#include "data/chat.h"
#include "data/tokenizer_json.h"
#include "model/adapter.h"
#include "model/base.h"
#include "format/gguf.h"
#include "format/gguf_write.h"
#include "model/llama_infer.h"
#include "format/peft.h"
#include "format/safetensors.h"
#include "tests/tiny_model.h"
#include "trainer/export.h"

#define NL 2
#define DM 64
#define NH 4
#define NKV 2
#define HD 16
#define FF 96

static char g_dir[64];

static void path_in(char *buf, size_t n, const char *name) { snprintf(buf, n, "%s/%s", g_dir, name); }

static float *rand_f32(int64_t n, uint64_t seed, float scale) {
    float *p = malloc((size_t)n * sizeof(float));
    assert_non_null(p);
    for (int64_t i = 0; i < n; i++) p[i] = (2.0f * rng_uniform(seed, 7, (uint64_t)i) - 1.0f) * scale;
    return p;
}

/* Qwen2's template (as its GGUF stores it: real newlines in the literals), one of data/chat.h's known ones */
static const char CHATML[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
    "assistant\n' }}{% endif %}";

#define VOCAB 262
/* The tiny model: random F32 weights, a byte-level vocabulary (3 specials,
 * 256 bytes, 3 merges). */
static void write_tiny_gguf(const char *path) {
    gguf_writer *w;
    qerr e;
    assert_int_equal(gguf_writer_init(&w, &e), 0);
    gguf_writer_add_str(w, "general.architecture", "llama");
    gguf_writer_add_u32(w, "llama.block_count", NL);
    gguf_writer_add_u32(w, "llama.context_length", 256);
    gguf_writer_add_u32(w, "llama.embedding_length", DM);
    gguf_writer_add_u32(w, "llama.feed_forward_length", FF);
    gguf_writer_add_u32(w, "llama.attention.head_count", NH);
    gguf_writer_add_u32(w, "llama.attention.head_count_kv", NKV);
    gguf_writer_add_f32(w, "llama.rope.freq_base", 10000.0f);
    gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    tiny_vocab_add(w, "smollm", "<|endoftext|>", "<|im_start|>", "<|im_end|>");
    gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
    gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2);
    gguf_writer_add_u32(w, "tokenizer.ggml.padding_token_id", 2);
    gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", 0);
    gguf_writer_add_str(w, "tokenizer.chat_template", CHATML);

    static float *keep[64];
    int nk = 0;
    uint64_t seed = 100;
    char name[64];
#define ADD(nm, rows, cols, scale)                                                              \
    do {                                                                                        \
        uint64_t ne[2] = {(uint64_t)(cols), (uint64_t)(rows)};                                  \
        float *d = rand_f32((int64_t)(rows) * (cols), seed++, scale);                           \
        keep[nk++] = d;                                                                         \
        gguf_writer_add_tensor(w, nm, GGML_TYPE_F32, (rows) == 1 ? 1 : 2, ne, d,                \
                               (size_t)((int64_t)(rows) * (cols)) * sizeof(float));             \
    } while (0)
    ADD("token_embd.weight", VOCAB, DM, 1.0f);
    ADD("output_norm.weight", 1, DM, 1.0f);
    for (int l = 0; l < NL; l++) {
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        ADD(name, 1, DM, 1.0f);
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        ADD(name, 1, DM, 1.0f);
        snprintf(name, sizeof name, "blk.%d.attn_q.weight", l);
        ADD(name, NH * HD, DM, 0.2f);
        snprintf(name, sizeof name, "blk.%d.attn_k.weight", l);
        ADD(name, NKV * HD, DM, 0.2f);
        snprintf(name, sizeof name, "blk.%d.attn_v.weight", l);
        ADD(name, NKV * HD, DM, 0.2f);
        snprintf(name, sizeof name, "blk.%d.attn_output.weight", l);
        ADD(name, DM, NH * HD, 0.2f);
        snprintf(name, sizeof name, "blk.%d.ffn_gate.weight", l);
        ADD(name, FF, DM, 0.2f);
        snprintf(name, sizeof name, "blk.%d.ffn_up.weight", l);
        ADD(name, FF, DM, 0.2f);
        snprintf(name, sizeof name, "blk.%d.ffn_down.weight", l);
        ADD(name, DM, FF, 0.2f);
    }
#undef ADD
    for (int i = 0; i < nk; i++) keep[i][0] += 0.0f; /* norms stay random; fine for the tests */
    assert_int_equal(gguf_writer_write(w, path, &e), 0);
    gguf_writer_free(w);
    for (int i = 0; i < nk; i++) free(keep[i]);
}

/* A PEFT adapter with random A and B (both non-zero) on the given modules. */
static void write_tiny_adapter(const char *dir, int r, float alpha, int rslora, const int *target) {
    mkdir(dir, 0755);
    const int64_t outs[LLAMA_N_LINEAR] = {NH * HD, NKV * HD, NKV * HD, DM, FF, FF, DM};
    const int64_t ins[LLAMA_N_LINEAR] = {DM, DM, DM, NH * HD, DM, DM, FF};
    st_tensor ts[NL * LLAMA_N_LINEAR * 2];
    static char names[NL * LLAMA_N_LINEAR * 2][128];
    float *bufs[NL * LLAMA_N_LINEAR * 2];
    int n = 0;
    const char *tm[LLAMA_N_LINEAR];
    int ntm = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        if (target[k]) tm[ntm++] = llama_linears[k].peft;
    for (int l = 0; l < NL; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            if (!target[k]) continue;
            for (int ab = 0; ab < 2; ab++) {
                int64_t rows = ab ? outs[k] : r, cols = ab ? r : ins[k];
                bufs[n] = rand_f32(rows * cols, 1000 + (uint64_t)n, ab ? 0.3f : 0.2f);
                peft_tensor_name(names[n], 128, l, llama_linears[k].parent, llama_linears[k].peft, ab ? 'B' : 'A');
                ts[n] = (st_tensor){.name = names[n], .dtype = "F32", .n_dims = 2, .shape = {rows, cols},
                                    .data = bufs[n], .nbytes = (size_t)(rows * cols) * sizeof(float)};
                n++;
            }
        }
    char p[256];
    qerr e;
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    assert_int_equal(safetensors_write(p, ts, n, NULL, &e), 0);
    peft_lora_config pc = {.r = r, .lora_alpha = alpha, .lora_dropout = 0.0f, .use_rslora = rslora,
                           .target_modules = tm, .n_target_modules = ntm};
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    assert_int_equal(peft_write_adapter_config(p, &pc, &e), 0);
    for (int i = 0; i < n; i++) free(bufs[i]);
}

static int group_setup(void **state) {
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/qlora_test_hf_XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    gemm_shutdown();
    return system(cmd) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------------ GGUF writer */

static void test_gguf_writer_roundtrip(void **state) {
    (void)state;
    char p[256];
    path_in(p, sizeof p, "w.gguf");
    gguf_writer *w;
    qerr e;
    assert_int_equal(gguf_writer_init(&w, &e), 0);
    gguf_writer_add_u32(w, "a.u32", 7);
    gguf_writer_add_i32(w, "a.i32", -5);
    gguf_writer_add_f32(w, "a.f32", 1.5f);
    gguf_writer_add_bool(w, "a.bool", 1);
    gguf_writer_add_str(w, "a.str", "héllo");
    const char *arr[3] = {"x", "", "zz"};
    gguf_writer_add_arr_str(w, "a.arr", arr, NULL, 3);
    int32_t iv[4] = {1, -2, 3, 2000000000};
    gguf_writer_add_arr_i32(w, "a.iarr", iv, 4);
    float t1[6] = {1, 2, 3, 4, 5, 6};
    uint16_t t2[5] = {1, 2, 3, 4, 5};
    uint64_t ne1[2] = {3, 2}, ne2[1] = {5};
    gguf_writer_add_tensor(w, "t1", GGML_TYPE_F32, 2, ne1, t1, sizeof t1);
    gguf_writer_add_tensor(w, "t2", GGML_TYPE_F16, 1, ne2, t2, sizeof t2);
    assert_int_equal(gguf_writer_write(w, p, &e), 0);
    gguf_writer_free(w);

    gguf_file *f;
    int rc = gguf_open(p, &f, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    uint32_t u;
    float fv;
    int b;
    const char *s;
    size_t n;
    assert_int_equal(gguf_version(f), 3);
    assert_int_equal(gguf_get_u32(f, "a.u32", &u, &e), 0);
    assert_int_equal(u, 7);
    int64_t i64;
    assert_int_equal(gguf_get_i64(f, "a.i32", &i64, &e), 0);
    assert_int_equal(i64, -5);
    assert_int_equal(gguf_get_f32(f, "a.f32", &fv, &e), 0);
    assert_true(fv == 1.5f);
    assert_int_equal(gguf_get_bool(f, "a.bool", &b, &e), 0);
    assert_int_equal(b, 1);
    assert_int_equal(gguf_get_str(f, "a.str", &s, &n, &e), 0);
    assert_int_equal(n, strlen("héllo"));
    assert_memory_equal(s, "héllo", n);
    gguf_vtype et;
    uint64_t cnt;
    assert_int_equal(gguf_get_arr_info(f, "a.arr", &et, &cnt, &e), 0);
    assert_int_equal(cnt, 3);
    assert_int_equal(gguf_get_arr_str(f, "a.arr", 2, &s, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_int_equal(gguf_get_arr_str(f, "a.arr", 1, &s, &n, &e), 0);
    assert_int_equal(n, 0);
    const void *d;
    assert_int_equal(gguf_get_arr_data(f, "a.iarr", &d, &e), 0);
    assert_memory_equal(d, iv, sizeof iv);
    const gguf_tensor *t = gguf_find_tensor(f, "t1");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 3);
    assert_int_equal(t->ne[1], 2);
    assert_memory_equal(t->data, t1, sizeof t1);
    assert_int_equal(t->offset % 32, 0);
    t = gguf_find_tensor(f, "t2");
    assert_non_null(t);
    assert_int_equal(t->offset % 32, 0);
    assert_memory_equal(t->data, t2, sizeof t2);
    gguf_close(f);

    /* errors are sticky and reported by the write */
    assert_int_equal(gguf_writer_init(&w, &e), 0);
    gguf_writer_add_u32(w, "k", 1);
    gguf_writer_add_u32(w, "k", 2);
    assert_int_equal(gguf_writer_write(w, p, &e), -1);
    assert_non_null(strstr(e.msg, "added twice"));
    gguf_writer_free(w);
    assert_int_equal(gguf_writer_init(&w, &e), 0);
    gguf_writer_add_tensor(w, "bad", GGML_TYPE_F32, 2, ne1, t1, sizeof t1 - 4);
    assert_int_equal(gguf_writer_write(w, p, &e), -1);
    assert_non_null(strstr(e.msg, "bad"));
    gguf_writer_free(w);
}

static void test_permute_and_floats(void **state) {
    (void)state;
    const int H = 3, hd = 8, cols = 5;
    float *x = rand_f32(H * hd * cols, 5, 1.0f), *y = malloc(sizeof(float) * H * hd * cols);
    assert_non_null(y);
    export_permute_rows_to_gguf(x, y, H, hd, cols);
    /* GGUF row h*hd + 2i + j == HF row h*hd + j*hd/2 + i */
    for (int h = 0; h < H; h++)
        for (int i = 0; i < hd / 2; i++)
            for (int j = 0; j < 2; j++)
                assert_memory_equal(y + (h * hd + 2 * i + j) * cols, x + (h * hd + j * hd / 2 + i) * cols,
                                    sizeof(float) * cols);
    llama_unpermute_rows(y, H, hd, cols);
    assert_memory_equal(x, y, sizeof(float) * H * hd * cols);
    free(x);
    free(y);

    char b[64];
    struct { float v; const char *s; } cases[] = {
        {1e-5f, "1e-05"}, {1e-6f, "1e-06"}, {100000.0f, "100000.0"}, {0.02f, "0.02"}, {10000.0f, "10000.0"},
        {1.0f, "1.0"}, {-2.5f, "-2.5"}, {1e16f, "1e+16"}, {0.0001f, "0.0001"}, {500000.0f, "500000.0"},
        {0.0417f, "0.0417"}, {123.456f, "123.456"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        py_float_repr(b, sizeof b, cases[i].v);
        assert_string_equal(b, cases[i].s);
    }
}

/* ------------------------------------------------------------------ tiny model */

static void load_tiny(base_model **b, llama_model *m, int nf4, int max_pos) {
    char p[256];
    path_in(p, sizeof p, "tiny.gguf");
    if (access(p, R_OK)) write_tiny_gguf(p);
    qerr e;
    int rc = base_model_open(p, b, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    if (m) {
        rc = base_model_load(*b, nf4, 1, max_pos, m, &e);
        if (rc) print_error("%s\n", e.msg);
        assert_int_equal(rc, 0);
    }
}

static void full_logits(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const int32_t *ids, int n, float *out) {
    int32_t pos[64], sid[64];
    for (int i = 0; i < n; i++) {
        pos[i] = i;
        sid[i] = 0;
    }
    llama_batch bt = {.B = 1, .T = n, .input_ids = ids, .position_ids = pos, .seq_ids = sid};
    ag_mark mk = ag_arena_mark(ctx);
    tensor *h = llama_forward_hidden(ctx, m, ls, &bt);
    llama_logits_rows(ctx, m, h, 0, n, out);
    ag_arena_reset(ctx, mk);
}

static void test_kv_cache_matches_full_forward(void **state) {
    (void)state;
    base_model *b;
    llama_model m;
    load_tiny(&b, &m, 0, 64);
    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
    char ad[256];
    path_in(ad, sizeof ad, "ad_all");
    write_tiny_adapter(ad, 4, 8.0f, 0, target);
    lora_set ls;
    adapter_info info;
    qerr e;
    assert_int_equal(adapter_load_peft(ad, &m.hp, &ls, &info, &e), 0);
    ag_ctx ctx;
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    int32_t ids[24];
    for (int i = 0; i < 24; i++) ids[i] = (int32_t)(rng_u64(9, 9, (uint64_t)i) % VOCAB);
    float *full = malloc(sizeof(float) * 24 * VOCAB), *step = malloc(sizeof(float) * VOCAB);
    assert_non_null(full);
    assert_non_null(step);
    for (int bf = 0; bf < 2; bf++) {
        ctx.bf16 = bf;
        full_logits(&ctx, &m, &ls, ids, 24, full);
        llama_kv_cache c;
        assert_int_equal(llama_kv_init(&c, &m, 32, &e), 0);
        /* prefill 10, then 14 single steps; every position's logits must match */
        double maxd = 0;
        int done = 0;
        while (done < 24) {
            int n = done == 0 ? 10 : 1;
            ag_mark mk = ag_arena_mark(&ctx);
            tensor *h = llama_forward_cached(&ctx, &m, &ls, &c, ids + done, n);
            assert_non_null(h);
            for (int i = 0; i < n; i++) {
                llama_logits_rows(&ctx, &m, h, i, 1, step);
                for (int v = 0; v < VOCAB; v++) {
                    double d = fabs((double)step[v] - full[(done + i) * VOCAB + v]);
                    if (d > maxd) maxd = d;
                }
            }
            ag_arena_reset(&ctx, mk);
            done += n;
        }
        print_message("KV cache vs full forward (%s): max |d logit| = %.3g\n", bf ? "bf16" : "fp32", maxd);
        assert_true(maxd < (bf ? 5e-2 : 1e-4));
        /* full cache: NULL, no overflow */
        llama_kv_free(&c);
        assert_int_equal(llama_kv_init(&c, &m, 4, &e), 0);
        ag_mark mk = ag_arena_mark(&ctx);
        assert_null(llama_forward_cached(&ctx, &m, &ls, &c, ids, 5));
        ag_arena_reset(&ctx, mk);
        llama_kv_free(&c);
    }
    free(full);
    free(step);
    ag_ctx_free(&ctx);
    lora_set_free(&ls);
    adapter_info_free(&info);
    llama_free(&m);
    base_model_close(b);
}

static void test_adapter_load_and_gguf_lora(void **state) {
    (void)state;
    base_model *b;
    load_tiny(&b, NULL, 0, 0);
    const llama_hparams *hp = base_model_hparams(b);
    int target[LLAMA_N_LINEAR] = {1, 1, 0, 1, 0, 0, 1};
    char ad[256], gp[256];
    path_in(ad, sizeof ad, "ad_rs");
    write_tiny_adapter(ad, 4, 16.0f, 1, target);
    lora_set ls;
    adapter_info info;
    qerr e;
    int rc = adapter_load_peft(ad, hp, &ls, &info, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(ls.r, 4);
    assert_true(ls.use_rslora);
    assert_true(fabsf(ls.scaling - 8.0f) < 1e-6f); /* 16 / sqrt(4) */
    assert_int_equal(info.n_present, NL * 4);
    assert_null(lora_set_get(&ls, 0, LLAMA_V));
    /* values as in the file */
    safetensors_file *sf;
    char sp[300];
    snprintf(sp, sizeof sp, "%s/adapter_model.safetensors", ad);
    assert_int_equal(safetensors_open(sp, &sf, &e), 0);
    st_tensor t;
    assert_int_equal(safetensors_find(sf, "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", &t, &e), 0);
    const lora_adapter *a = lora_set_get(&ls, 1, LLAMA_Q);
    assert_memory_equal(a->B->data, t.data, t.nbytes);

    path_in(gp, sizeof gp, "ad_rs.gguf");
    rc = export_gguf_lora(b, &ls, &info, gp, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    gguf_file *g;
    assert_int_equal(gguf_open(gp, &g, &e), 0);
    float alpha;
    assert_int_equal(gguf_get_f32(g, "adapter.lora.alpha", &alpha, &e), 0);
    assert_true(fabsf(alpha - 32.0f) < 1e-4f); /* rsLoRA: alpha * sqrt(r), so llama.cpp's alpha / r = 8 */
    const char *s;
    size_t n;
    assert_int_equal(gguf_get_str(g, "general.type", &s, &n, &e), 0);
    assert_memory_equal(s, "adapter", n);
    assert_int_equal(gguf_get_str(g, "adapter.type", &s, &n, &e), 0);
    assert_memory_equal(s, "lora", n);
    assert_int_equal(gguf_n_tensors(g), NL * 4 * 2);
    const gguf_tensor *gb = gguf_find_tensor(g, "blk.1.attn_q.weight.lora_b");
    const gguf_tensor *ga = gguf_find_tensor(g, "blk.1.attn_q.weight.lora_a");
    assert_non_null(gb);
    assert_non_null(ga);
    assert_int_equal(ga->ne[0], DM);
    assert_int_equal(ga->ne[1], 4);
    assert_int_equal(gb->ne[0], 4);
    assert_int_equal(gb->ne[1], NH * HD);
    assert_memory_equal(ga->data, a->A->data, ga->nbytes);
    /* B rows in GGUF order: un-permuting gives PEFT's B back */
    float *bb = malloc(gb->nbytes);
    assert_non_null(bb);
    memcpy(bb, gb->data, gb->nbytes);
    assert_memory_not_equal(bb, a->B->data, gb->nbytes);
    llama_unpermute_rows(bb, NH, HD, 4);
    assert_memory_equal(bb, a->B->data, gb->nbytes);
    free(bb);
    /* k uses the kv head count; o is not permuted */
    gb = gguf_find_tensor(g, "blk.0.attn_k.weight.lora_b");
    bb = malloc(gb->nbytes);
    memcpy(bb, gb->data, gb->nbytes);
    llama_unpermute_rows(bb, NKV, HD, 4);
    assert_memory_equal(bb, lora_set_get(&ls, 0, LLAMA_K)->B->data, gb->nbytes);
    free(bb);
    gb = gguf_find_tensor(g, "blk.0.attn_output.weight.lora_b");
    assert_memory_equal(gb->data, lora_set_get(&ls, 0, LLAMA_O)->B->data, gb->nbytes);
    assert_null(gguf_find_tensor(g, "blk.0.attn_v.weight.lora_a"));
    gguf_close(g);
    safetensors_close(sf);
    lora_set_free(&ls);
    adapter_info_free(&info);

    /* what qlora cannot represent is refused, not dropped */
    char cfg[300];
    snprintf(cfg, sizeof cfg, "%s/adapter_config.json", ad);
    FILE *f = fopen(cfg, "r");
    char text[8192];
    size_t tn = fread(text, 1, sizeof text - 1, f);
    text[tn] = 0;
    fclose(f);
    char *dora = strstr(text, "\"use_dora\": false");
    assert_non_null(dora);
    memcpy(dora, "\"use_dora\": true ", 17);
    f = fopen(cfg, "w");
    fputs(text, f);
    fclose(f);
    assert_int_equal(adapter_load_peft(ad, hp, &ls, &info, &e), -1);
    assert_non_null(strstr(e.msg, "use_dora"));
    base_model_close(b);
}

static void test_merged_export(void **state) {
    (void)state;
    base_model *b;
    llama_model m;
    load_tiny(&b, &m, 1, 32); /* NF4: merge into the dequantized NF4 weights */
    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
    char ad[256], md[256];
    path_in(ad, sizeof ad, "ad_all");
    write_tiny_adapter(ad, 4, 8.0f, 0, target);
    lora_set ls;
    adapter_info info;
    qerr e;
    assert_int_equal(adapter_load_peft(ad, &m.hp, &ls, &info, &e), 0);
    tokenizer *tok;
    assert_int_equal(base_model_tokenizer(b, &tok, &e), 0);
    path_in(md, sizeof md, "merged");
    /* tiny shards: force the index */
    int rc = export_merged(b, &m, tok, &ls, &info, md, 40000, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    char p[300];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", md);
    FILE *f = fopen(p, "r");
    assert_non_null(f);
    static char text[1 << 16];
    size_t tn = fread(text, 1, sizeof text - 1, f);
    text[tn] = 0;
    fclose(f);
    cJSON *idx = cJSON_Parse(text);
    assert_non_null(idx);
    cJSON *wm = cJSON_GetObjectItem(idx, "weight_map");
    assert_int_equal(cJSON_GetArraySize(wm), 1 + NL * 9 + 1);
    char shard[40]; /* copied: the index tree is freed before the re-export checks below */
    snprintf(shard, sizeof shard, "%s", cJSON_GetObjectItem(wm, "model.layers.1.self_attn.q_proj.weight")->valuestring);
    snprintf(p, sizeof p, "%s/%s", md, shard);
    safetensors_file *sf;
    assert_int_equal(safetensors_open(p, &sf, &e), 0);
    st_tensor t;
    assert_int_equal(safetensors_find(sf, "model.layers.1.self_attn.q_proj.weight", &t, &e), 0);
    assert_string_equal(t.dtype, "BF16");
    assert_int_equal(t.shape[0], NH * HD);
    assert_int_equal(t.shape[1], DM);
    /* merged = bf16(W_nf4 + scaling * B A), recomputed here in double */
    float *W = malloc(sizeof(float) * NH * HD * DM);
    frozen_rows_f32(&m.layers[1].lin[LLAMA_Q], 0, NH * HD, W);
    const lora_adapter *a = lora_set_get(&ls, 1, LLAMA_Q);
    const float *A = a->A->data, *B = a->B->data;
    int off_by_more = 0;
    for (int o = 0; o < NH * HD; o++)
        for (int i = 0; i < DM; i++) {
            double acc = 0;
            for (int j = 0; j < 4; j++) acc += (double)B[o * 4 + j] * A[j * DM + i];
            float ref = (float)(W[o * DM + i] + acc * a->scaling);
            uint16_t got;
            memcpy(&got, (const uint8_t *)t.data + 2 * (o * DM + i), 2);
            int d = abs((int)got - (int)f32_to_bf16(ref));
            off_by_more += d > 1;
        }
    assert_int_equal(off_by_more, 0);
    free(W);
    safetensors_close(sf);
    cJSON_Delete(idx);

    snprintf(p, sizeof p, "%s/config.json", md);
    f = fopen(p, "r");
    tn = fread(text, 1, sizeof text - 1, f);
    text[tn] = 0;
    fclose(f);
    cJSON *c = cJSON_Parse(text);
    assert_non_null(c);
    assert_int_equal(cJSON_GetObjectItem(c, "num_key_value_heads")->valueint, NKV);
    assert_int_equal(cJSON_GetObjectItem(c, "head_dim")->valueint, HD);
    assert_int_equal(cJSON_GetObjectItem(c, "eos_token_id")->valueint, 2);
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(c, "tie_word_embeddings")) ||
                cJSON_IsTrue(cJSON_GetObjectItem(c, "tie_word_embeddings")));
    assert_non_null(strstr(text, "\"rms_norm_eps\":\t1e-05"));
    cJSON_Delete(c);
    snprintf(p, sizeof p, "%s/generation_config.json", md);
    assert_int_equal(access(p, R_OK), 0);
    snprintf(p, sizeof p, "%s/tokenizer.json", md);
    assert_int_equal(access(p, R_OK), 0);
    snprintf(p, sizeof p, "%s/tokenizer_config.json", md);
    f = fopen(p, "r");
    tn = fread(text, 1, sizeof text - 1, f);
    text[tn] = 0;
    fclose(f);
    c = cJSON_Parse(text);
    assert_string_equal(cJSON_GetObjectItem(c, "eos_token")->valuestring, "<|im_end|>");
    assert_string_equal(cJSON_GetObjectItem(c, "chat_template")->valuestring, tokenizer_chat_template(tok));
    cJSON_Delete(c);

    /* re-export into the same directory (issue 17 item 11): the weight files of the earlier export that are
     * not part of the new one are gone — a single model.safetensors beside new shards would be what
     * transformers loads */
    char shard1[300], single[300];
    snprintf(shard1, sizeof shard1, "%s/%s", md, shard);
    snprintf(single, sizeof single, "%s/model.safetensors", md);
    assert_int_equal(access(shard1, F_OK), 0);
    rc = export_merged(b, &m, tok, &ls, &info, md, 0, &e); /* one file now */
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(access(single, F_OK), 0);
    assert_int_equal(access(shard1, F_OK), -1);
    assert_int_equal(access(p, F_OK), 0); /* tokenizer_config.json stays */
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", md);
    assert_int_equal(access(p, F_OK), -1);
    rc = export_merged(b, &m, tok, &ls, &info, md, 40000, &e); /* sharded again */
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(access(single, F_OK), -1);
    assert_int_equal(access(p, F_OK), 0);

    /* load_in_8bit: the merge adds the delta to the int8 base dequantized as PEFT's merge does it
     * (bitsandbytes int8_vectorwise_dequant: (CB * SCB) / 127, quant/int8.h) */
    {
        llama_model m8;
        assert_int_equal(base_model_load(b, LLAMA_BASE_INT8, 1, 32, &m8, &e), 0);
        char md8[256], p8[300];
        path_in(md8, sizeof md8, "merged8");
        rc = export_merged(b, &m8, tok, &ls, &info, md8, 0, &e);
        if (rc) print_error("%s\n", e.msg);
        assert_int_equal(rc, 0);
        snprintf(p8, sizeof p8, "%s/model.safetensors", md8);
        safetensors_file *sf8;
        assert_int_equal(safetensors_open(p8, &sf8, &e), 0);
        st_tensor t8;
        assert_int_equal(safetensors_find(sf8, "model.layers.1.self_attn.q_proj.weight", &t8, &e), 0);
        const frozen_weight *fw = &m8.layers[1].lin[LLAMA_Q];
        float *W8 = malloc(sizeof(float) * NH * HD * DM);
        int8_dequantize_f32(fw->cb, fw->scb, fw->out, fw->in, W8);
        const lora_adapter *a8 = lora_set_get(&ls, 1, LLAMA_Q);
        const float *A8 = a8->A->data, *B8 = a8->B->data;
        int off8 = 0;
        for (int o = 0; o < NH * HD; o++)
            for (int i = 0; i < DM; i++) {
                double acc = 0;
                for (int j = 0; j < 4; j++) acc += (double)B8[o * 4 + j] * A8[j * DM + i];
                uint16_t got;
                memcpy(&got, (const uint8_t *)t8.data + 2 * (o * DM + i), 2);
                off8 += abs((int)got - (int)f32_to_bf16((float)(W8[o * DM + i] + acc * a8->scaling))) > 1;
            }
        assert_int_equal(off8, 0);
        free(W8);
        safetensors_close(sf8);
        llama_free(&m8);
    }

    tokenizer_free(tok);
    lora_set_free(&ls);
    adapter_info_free(&info);
    llama_free(&m);
    base_model_close(b);
}

static void test_chat_prompt_and_stop(void **state) {
    (void)state;
    base_model *b;
    load_tiny(&b, NULL, 0, 0);
    tokenizer *tok;
    qerr e;
    assert_int_equal(base_model_tokenizer(b, &tok, &e), 0);
    char *s;
    if (chat_render_prompt(tok, NULL, "hi", &s, &e)) fail_msg("%s", e.msg);
    assert_string_equal(s, "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                           "<|im_start|>assistant\n");
    free(s);
    assert_int_equal(chat_render_prompt(tok, "S", "hi", &s, &e), 0);
    assert_string_equal(s, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    free(s);
    int32_t stop[4];
    /* eos is <|im_end|> itself: one stop id */
    assert_int_equal(chat_stop_ids(tok, stop, 4), 1);
    assert_int_equal(stop[0], 2);
    tokenizer_free(tok);
    base_model_close(b);
}


/* ------------------------------------------------------------------ HF directories */

static void logits_of(const llama_model *m, const lora_set *ls, int bf, const int32_t *ids, int n, float *out) {
    ag_ctx ctx;
    qerr e;
    assert_int_equal(ag_ctx_init(&ctx, 16 << 20, &e), 0);
    ctx.bf16 = bf;
    full_logits(&ctx, m, ls, ids, n, out);
    ag_ctx_free(&ctx);
}

static double max_abs_diff(const float *a, const float *b, int64_t n) {
    double d = 0;
    for (int64_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d;
}

/* The tiny GGUF as an HF directory (bf16 safetensors, config, tokenizer files),
 * then loaded back: same tokenizer, same bf16 weights, same logits. */
/* qlora-export --merged writes the chat template the run trained with (chat_template: <name> or
 * chat_template_jinja), as axolotl saves the tokenizer with tokenizer.chat_template set to it:
 * axolotl's template text byte for byte (each hashes to its entry of data/chat.c's table, the
 * hashes tests/test_reference_axolotl_chat.c checks against axolotl's files), in chat_template.jinja
 * (transformers 5's layout), and a reload of the directory sees it. */
static void test_export_run_chat_template(void **state) {
    (void)state;
    base_model *g;
    llama_model mg;
    load_tiny(&g, &mg, 0, 32);
    tokenizer *tg;
    qerr e;
    assert_int_equal(base_model_tokenizer(g, &tg, &e), 0);
    assert_non_null(tokenizer_chat_template(tg));
    static const char *const names[] = {"chatml", "qwen_25", "llama3", "mistral_v1", "mistral_v2v3",
                                        "mistral_v3_tekken", "phi_3", "phi_35", "gemma3"};
    char *text = NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const chat_template *want, *got;
        assert_int_equal(chat_template_named(names[i], &want, &e), 0);
        assert_int_equal(export_run_chat_template(names[i], NULL, tg, &text, &e), 0);
        assert_non_null(text);
        assert_int_equal(chat_template_find(text, &got, &e), 0);
        assert_ptr_equal(got, want);
        free(text);
    }
    /* the model's own: nothing to write */
    assert_int_equal(export_run_chat_template("tokenizer_default", NULL, tg, &text, &e), 0);
    assert_null(text);
    assert_int_equal(export_run_chat_template(NULL, NULL, tg, &text, &e), 0);
    assert_null(text);
    assert_int_equal(export_run_chat_template("tokenizer_default_fallback_llama3", NULL, tg, &text, &e), 0);
    assert_null(text); /* the tiny model has a template */
    /* jinja: the text itself, or a file */
    assert_int_equal(export_run_chat_template("jinja", tokenizer_chat_template(tg), tg, &text, &e), 0);
    assert_string_equal(text, tokenizer_chat_template(tg));
    free(text);
    assert_int_equal(export_run_chat_template("jinja", "{{ messages }}", tg, &text, &e), -1);
    assert_null(text);
    assert_int_equal(export_run_chat_template("gemma", NULL, tg, &text, &e), -1); /* Gemma 1 / 2: not run */

    char hd[256];
    path_in(hd, sizeof hd, "hf_ct");
    assert_int_equal(export_merged(g, NULL, tg, NULL, NULL, hd, 0, &e), 0);
    assert_int_equal(export_run_chat_template("llama3", NULL, tg, &text, &e), 0);
    assert_int_equal(export_write_chat_template(hd, text, &e), 0);
    char p[300];
    snprintf(p, sizeof p, "%s/tokenizer_config.json", hd);
    cJSON *c = file_read_json_object(p, &e);
    assert_non_null(c);
    assert_null(cJSON_GetObjectItem(c, "chat_template"));
    cJSON_Delete(c);
    snprintf(p, sizeof p, "%s/chat_template.jinja", hd);
    size_t n;
    char *back = file_read_all(p, &n, &e);
    assert_non_null(back);
    assert_int_equal(n, strlen(text));
    assert_memory_equal(back, text, n);
    free(back);
    base_model *h;
    assert_int_equal(base_model_open(hd, &h, &e), 0);
    tokenizer *th;
    assert_int_equal(base_model_tokenizer(h, &th, &e), 0);
    assert_string_equal(tokenizer_chat_template(th), text);
    free(text);
    tokenizer_free(th);
    base_model_close(h);
    tokenizer_free(tg);
    llama_free(&mg);
    base_model_close(g);
}

static void test_hf_dir_roundtrip(void **state) {
    (void)state;
    base_model *g;
    llama_model mg;
    load_tiny(&g, &mg, 0, 32);
    tokenizer *tg;
    qerr e;
    assert_int_equal(base_model_tokenizer(g, &tg, &e), 0);
    char hd[256];
    path_in(hd, sizeof hd, "hf_tiny");
    assert_int_equal(export_merged(g, NULL, tg, NULL, NULL, hd, 0, &e), 0);

    base_model *h;
    int rc = base_model_open(hd, &h, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(base_model_kind(h), BASE_HF);
    const llama_hparams *a = base_model_hparams(g), *b = base_model_hparams(h);
    assert_int_equal(a->n_layer, b->n_layer);
    assert_int_equal(a->n_kv_head, b->n_kv_head);
    assert_int_equal(a->head_dim, b->head_dim);
    assert_int_equal(a->vocab, b->vocab);
    assert_int_equal(a->tied_embeddings, b->tied_embeddings);
    assert_true(a->rope_theta == b->rope_theta && a->rms_eps == b->rms_eps);

    /* tokenizer.json + tokenizer_config.json give the same tokenizer */
    tokenizer *th;
    rc = base_model_tokenizer(h, &th, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(tokenizer_n_vocab(th), tokenizer_n_vocab(tg));
    assert_int_equal(tokenizer_eos_id(th), tokenizer_eos_id(tg));
    assert_int_equal(tokenizer_bos_id(th), tokenizer_bos_id(tg));
    assert_string_equal(tokenizer_chat_template(th), tokenizer_chat_template(tg));
    const char *texts[] = {"hello hell 12345 <|im_start|>user\nhi<|im_end|>", "  \t\xc3\xa9t\xc3\xa9 99 bottles"};
    for (int i = 0; i < 2; i++) {
        tokenizer_ids x = {0}, y = {0};
        assert_int_equal(tokenizer_encode(tg, texts[i], strlen(texts[i]), 1, &x, &e), 0);
        assert_int_equal(tokenizer_encode(th, texts[i], strlen(texts[i]), 1, &y, &e), 0);
        assert_int_equal(x.n, y.n);
        assert_memory_equal(x.ids, y.ids, x.n * sizeof(int32_t));
        tokenizer_ids_free(&x);
        tokenizer_ids_free(&y);
    }

    /* bf16 weights both ways: identical logits; NF4 from bf16 vs from fp32: close */
    llama_model mh;
    assert_int_equal(base_model_load(h, 0, 1, 32, &mh, &e), 0);
    int32_t ids[12];
    for (int i = 0; i < 12; i++) ids[i] = (int32_t)(rng_u64(3, 3, (uint64_t)i) % VOCAB);
    float *lg = malloc(sizeof(float) * 12 * VOCAB), *lh = malloc(sizeof(float) * 12 * VOCAB);
    /* identical bf16 linears and embeddings; the norms are fp32 in the GGUF and
     * bf16 in the HF directory (as transformers saves them), hence a small difference */
    assert_memory_equal(mg.tok_embd, mh.tok_embd, (size_t)VOCAB * DM * sizeof(bf16));
    for (int l = 0; l < NL; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++)
            assert_memory_equal(mg.layers[l].w_bf16[k], mh.layers[l].w_bf16[k],
                                (size_t)(mg.layers[l].lin[k].out * mg.layers[l].lin[k].in) * sizeof(bf16));
    for (int i = 0; i < DM; i++)
        assert_true(mh.layers[1].ffn_norm[i] == bf16_to_f32(f32_to_bf16(mg.layers[1].ffn_norm[i])));
    logits_of(&mg, NULL, 0, ids, 12, lg);
    logits_of(&mh, NULL, 0, ids, 12, lh);
    print_message("HF directory vs GGUF (bf16 norms): max |d logit| %.3g\n", max_abs_diff(lg, lh, 12 * VOCAB));
    assert_true(max_abs_diff(lg, lh, 12 * VOCAB) < 0.05);
    llama_free(&mh);

    /* load_in_8bit from the HF directory (bf16 safetensors): the loader's int8 blob holds exactly what
     * int8_quantize_rows (bitsandbytes' Int8Params, tests/test_reference_int8.c) gives for the bf16
     * weights, in HF row order; its logits stay close to the bf16 base's */
    llama_model m8;
    assert_int_equal(base_model_load(h, LLAMA_BASE_INT8, 1, 32, &m8, &e), 0);
    assert_true(m8.load_in_8bit && !m8.load_in_4bit);
    int64_t bad8 = 0;
    for (int l = 0; l < NL; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const frozen_weight *w = &m8.layers[l].lin[k];
            assert_int_equal(w->kind, FROZEN_INT8);
            const int64_t rows = w->out, cols = w->in;
            float *tmp = malloc((size_t)(rows * cols) * sizeof(float)), *scb = malloc((size_t)rows * sizeof(float));
            int8_t *cb = malloc((size_t)(rows * cols));
            for (int64_t i = 0; i < rows * cols; i++) tmp[i] = bf16_to_f32(mg.layers[l].w_bf16[k][i]);
            assert_int_equal(int8_quantize_rows(tmp, rows, cols, cb, scb, &e), 0);
            bad8 += memcmp(cb, w->cb, (size_t)(rows * cols)) != 0;
            bad8 += memcmp(scb, w->scb, (size_t)rows * sizeof(float)) != 0;
            free(tmp);
            free(scb);
            free(cb);
        }
    assert_int_equal(bad8, 0);
    logits_of(&m8, NULL, 0, ids, 12, lh);
    print_message("HF directory as int8 vs GGUF bf16: max |d logit| %.3g\n", max_abs_diff(lg, lh, 12 * VOCAB));
    assert_true(max_abs_diff(lg, lh, 12 * VOCAB) < 0.1);
    llama_free(&m8);

    /* a merged model used as a base reproduces base + adapter (up to one bf16 rounding of W) */
    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
    char ad[256], md[256];
    path_in(ad, sizeof ad, "ad_all");
    write_tiny_adapter(ad, 4, 8.0f, 0, target);
    lora_set ls;
    adapter_info info;
    assert_int_equal(adapter_load_peft(ad, &mg.hp, &ls, &info, &e), 0);
    path_in(md, sizeof md, "hf_tiny_merged");
    assert_int_equal(export_merged(g, &mg, tg, &ls, &info, md, 0, &e), 0);
    base_model *hm;
    assert_int_equal(base_model_open(md, &hm, &e), 0);
    assert_int_equal(base_model_load(hm, 0, 1, 32, &mh, &e), 0);
    logits_of(&mg, &ls, 0, ids, 12, lg);
    logits_of(&mh, NULL, 0, ids, 12, lh);
    double d = max_abs_diff(lg, lh, 12 * VOCAB), span = 0;
    for (int i = 0; i < 12 * VOCAB; i++) span = fmax(span, fabs(lg[i]));
    print_message("merged model as base vs base + adapter: max |d logit| %.3g (logits up to %.3g)\n", d, span);
    assert_true(d < 0.02 * span);
    llama_free(&mh);
    base_model_close(hm);
    lora_set_free(&ls);
    adapter_info_free(&info);

    free(lg);
    free(lh);
    tokenizer_free(th);
    tokenizer_free(tg);
    llama_free(&mg);
    base_model_close(h);
    base_model_close(g);
}

/* Write a file the way transformers saves a bitsandbytes 4-bit model, from
 * qlora's own NF4 tensors: loading it must adopt them bit for bit. */
static void write_bnb_dir(const char *src, const char *dst, const llama_model *m) {
    char cmd[1600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && cp '%s'/tokenizer.json '%s'/tokenizer_config.json '%s'/",
             dst, dst, src, src, dst);
    assert_int_equal(system(cmd), 0);
    /* config.json with quantization_config */
    char p[400];
    snprintf(p, sizeof p, "%s/config.json", src);
    FILE *f = fopen(p, "r");
    static char text[1 << 16];
    size_t tn = fread(text, 1, sizeof text - 1, f);
    text[tn] = 0;
    fclose(f);
    cJSON *c = cJSON_Parse(text);
    cJSON *q = cJSON_CreateObject();
    cJSON_AddStringToObject(q, "quant_method", "bitsandbytes");
    cJSON_AddTrueToObject(q, "load_in_4bit");
    cJSON_AddStringToObject(q, "bnb_4bit_quant_type", "nf4");
    cJSON_AddTrueToObject(q, "bnb_4bit_use_double_quant");
    cJSON_AddItemToObject(c, "quantization_config", q);
    char *out = cJSON_Print(c);
    snprintf(p, sizeof p, "%s/config.json", dst);
    f = fopen(p, "w");
    fputs(out, f);
    fclose(f);
    free(out);
    cJSON_Delete(c);

    /* tensors: the bf16 ones from the source, the linears in bnb layout */
    safetensors_file *sf;
    qerr e;
    snprintf(p, sizeof p, "%s/model.safetensors", src);
    assert_int_equal(safetensors_open(p, &sf, &e), 0);
    int n = safetensors_count(sf);
    st_tensor *ts = calloc((size_t)n * 6, sizeof *ts);
    static char names[2000][128];
    static char states[200][512];
    int k = 0, ns = 0;
    for (int i = 0; i < n; i++) {
        st_tensor t;
        safetensors_get(sf, i, &t);
        int l = -1, mod = -1;
        for (int ll = 0; ll < NL && mod < 0; ll++)
            for (int mm = 0; mm < LLAMA_N_LINEAR; mm++) {
                char nm[128];
                static const char *const hf[LLAMA_N_LINEAR] = {"self_attn.q_proj", "self_attn.k_proj",
                                                               "self_attn.v_proj", "self_attn.o_proj",
                                                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
                snprintf(nm, sizeof nm, "model.layers.%d.%s.weight", ll, hf[mm]);
                if (!strcmp(nm, t.name)) {
                    l = ll;
                    mod = mm;
                    break;
                }
            }
        if (mod < 0) {
            ts[k++] = t;
            continue;
        }
        const nf4_tensor *q4 = m->layers[l].lin[mod].nf4;
        int64_t ng = (q4->nblocks + 255) / 256;
        snprintf(states[ns], sizeof states[ns],
                 "{\"quant_type\": \"nf4\", \"blocksize\": %d, \"dtype\": \"bfloat16\", \"shape\": [%lld, %lld], "
                 "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": %.9g}",
                 q4->blocksize, (long long)q4->rows, (long long)q4->cols, (double)q4->offset);
#define T(suffix, dt, nd, s0, s1, ptr, nb)                                                          \
    do {                                                                                            \
        snprintf(names[k], 128, "%s%s", t.name, suffix);                                            \
        ts[k] = (st_tensor){.name = names[k], .dtype = dt, .n_dims = nd, .shape = {s0, s1},         \
                            .data = ptr, .nbytes = nb};                                             \
        k++;                                                                                        \
    } while (0)
        T("", "U8", 2, (q4->n + 1) / 2, 1, q4->packed, (size_t)((q4->n + 1) / 2));
        T(".absmax", "U8", 1, q4->nblocks, 0, q4->absmax_q, (size_t)q4->nblocks);
        T(".quant_map", "F32", 1, 16, 0, nf4_code, 64);
        T(".nested_absmax", "F32", 1, ng, 0, q4->nested_absmax, (size_t)ng * 4);
        T(".nested_quant_map", "F32", 1, 256, 0, q4->nested_code, 1024);
        T(".quant_state.bitsandbytes__nf4", "U8", 1, (int64_t)strlen(states[ns]), 0, states[ns], strlen(states[ns]));
#undef T
        ns++;
    }
    snprintf(p, sizeof p, "%s/model.safetensors", dst);
    int rc = safetensors_write(p, ts, k, NULL, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    free(ts);
    safetensors_close(sf);
}

static void test_bnb4_checkpoint_adopted(void **state) {
    (void)state;
    char hd[256], bd[256];
    path_in(hd, sizeof hd, "hf_tiny");
    path_in(bd, sizeof bd, "hf_tiny_bnb4");
    base_model *h;
    qerr e;
    int rc = base_model_open(hd, &h, &e);
    if (rc) print_error("%s (run test_hf_dir_roundtrip first)\n", e.msg);
    assert_int_equal(rc, 0);
    llama_model m;
    assert_int_equal(base_model_load(h, 1, 1, 32, &m, &e), 0);
    write_bnb_dir(hd, bd, &m);
    base_model *b;
    rc = base_model_open(bd, &b, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_true(base_model_prequantized(b));
    llama_model mb;
    rc = base_model_load(b, 1, 0, 32, &mb, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    for (int l = 0; l < NL; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const nf4_tensor *x = &m.layers[l].nf4[k], *y = &mb.layers[l].nf4[k];
            assert_int_equal(y->double_quant, 1);
            assert_memory_equal(x->packed, y->packed, (size_t)(x->n + 1) / 2);
            assert_memory_equal(x->absmax_q, y->absmax_q, (size_t)x->nblocks);
            assert_true(x->offset == y->offset);
        }
    /* the adopted bytes sit in each layer's one allocation (model/llama.h layer
     * blob), whose OFFSETS section holds the checkpoint's nested offsets */
    int64_t blob_bytes = 0;
    for (int l = 0; l < NL; l++) {
        const llama_layer *L = &mb.layers[l];
        assert_non_null(L->blob);
        assert_int_equal(L->layout.kind, FROZEN_NF4);
        assert_int_equal(L->layout.double_quant, 1);
        blob_bytes += (int64_t)L->layout.nbytes;
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            float o;
            memcpy(&o, L->blob + L->layout.off[LLAMA_BLOB_OFFSETS] + 4 * k, 4);
            assert_true(o == m.layers[l].nf4[k].offset);
            assert_ptr_equal(L->nf4[k].packed, L->blob + L->layout.off[LLAMA_BLOB_DATA] + L->layout.elem[k] / 2);
            assert_ptr_equal(L->lin[k].nf4, &L->nf4[k]);
        }
    }
    assert_int_equal(mb.quantized_bytes, blob_bytes);
    assert_int_equal(mb.quantized_bytes, m.quantized_bytes);
    int32_t ids[8] = {5, 70, 200, 1, 3, 99, 150, 261};
    float *la = malloc(sizeof(float) * 8 * VOCAB), *lb = malloc(sizeof(float) * 8 * VOCAB);
    logits_of(&m, NULL, 1, ids, 8, la);
    logits_of(&mb, NULL, 1, ids, 8, lb);
    assert_true(max_abs_diff(la, lb, 8 * VOCAB) == 0.0);
    /* load_in_4bit: false dequantizes the checkpoint to bf16 */
    llama_model md;
    assert_int_equal(base_model_load(b, 0, 0, 32, &md, &e), 0);
    assert_int_equal(md.layers[0].lin[0].kind, FROZEN_BF16);
    float w1[FF], w2[FF]; /* one row of down_proj (DM, FF) holds FF elements */
    assert_int_equal(md.layers[1].lin[LLAMA_DOWN].in, FF);
    frozen_rows_f32(&md.layers[1].lin[LLAMA_DOWN], 3, 1, w1);
    frozen_rows_f32(&m.layers[1].lin[LLAMA_DOWN], 3, 1, w2);
    for (int i = 0; i < FF; i++) assert_true(w1[i] == bf16_to_f32(f32_to_bf16(w2[i])));
    llama_free(&md);
    free(la);
    free(lb);
    llama_free(&mb);
    llama_free(&m);
    base_model_close(b);
    base_model_close(h);
}

static void test_hf_errors(void **state) {
    (void)state;
    char hd[256], p[300];
    path_in(hd, sizeof hd, "hf_bad");
    mkdir(hd, 0755);
    base_model *b;
    qerr e;
    snprintf(p, sizeof p, "%s/config.json", hd);
    FILE *f = fopen(p, "w");
    fputs("{\"model_type\": \"gpt2\"}", f);
    fclose(f);
    assert_int_equal(base_model_open(hd, &b, &e), -1);
    assert_non_null(strstr(e.msg, "model_type"));
    f = fopen(p, "w");
    fputs("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
          "\"num_attention_heads\": 4, \"vocab_size\": 10, \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8}}",
          f);
    fclose(f);
    assert_int_equal(base_model_open(hd, &b, &e), -1);
    assert_non_null(strstr(e.msg, "llama3"));
    f = fopen(p, "w");
    fputs("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
          "\"num_attention_heads\": 4, \"vocab_size\": 10, \"rope_parameters\": {\"rope_type\": \"default\", "
          "\"rope_theta\": 500000.0}}",
          f);
    fclose(f);
    assert_int_equal(base_model_open(hd, &b, &e), -1); /* no weights */
    assert_non_null(strstr(e.msg, "model.safetensors"));
    /* a bitsandbytes 8-bit checkpoint (int8 weight + SCB) is refused by name, with the alternative */
    f = fopen(p, "w");
    fputs("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
          "\"num_attention_heads\": 4, \"vocab_size\": 10, \"quantization_config\": {\"quant_method\": "
          "\"bitsandbytes\", \"load_in_8bit\": true, \"load_in_4bit\": false}}",
          f);
    fclose(f);
    assert_int_equal(base_model_open(hd, &b, &e), -1);
    print_message("%s\n", e.msg);
    assert_non_null(strstr(e.msg, "a bitsandbytes load_in_8bit checkpoint (int8 weight + SCB) is not read"));
    /* llama3 and linear scaling are read (as far as the weights, which are missing here) */
    static const char *const scalings[] = {
        "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
        "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}",
        "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}"};
    for (int i = 0; i < 2; i++) {
        f = fopen(p, "w");
        fprintf(f, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, "
                   "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 10, %s}", scalings[i]);
        fclose(f);
        assert_int_equal(base_model_open(hd, &b, &e), -1);
        if (!strstr(e.msg, "model.safetensors")) fail_msg("%s: %s", scalings[i], e.msg);
    }
    /* hostile values (issue 17 item 8): a rope_theta that is not a number was silently 10000 */
    static const char *const bad_values[][2] = {
        {"\"rope_theta\": \"abc\"", "rope_theta: expected a number"},
        {"\"rope_theta\": 0", "rope_theta: expected a finite RoPE base > 1"},
        {"\"rms_norm_eps\": \"x\"", "rms_norm_eps: expected a number"},
        {"\"rms_norm_eps\": -1", "rms_norm_eps: expected a finite RMSNorm epsilon"},
        /* RoPE that is not implemented: refused by type or key, never trained with the default frequencies */
        {"\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4}", "rope_type \"yarn\" is not implemented"},
        {"\"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2}", "rope_type \"dynamic\" is not implemented"},
        {"\"rope_parameters\": {\"rope_type\": \"longrope\", \"rope_theta\": 10000.0}",
         "rope_type \"longrope\" is not implemented"},
        {"\"rope_scaling\": {\"rope_type\": \"linear\"}", "rope_scaling.factor: expected a number"},
        {"\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 4, "
         "\"high_freq_factor\": 1, \"original_max_position_embeddings\": 8192}", "low_freq_factor < high_freq_factor"},
        {"\"rope_scaling\": 3", "rope_scaling: expected an object or null"},
        {"\"partial_rotary_factor\": 0.5", "partial_rotary_factor"},
        {"\"final_logit_softcapping\": 30.0", "final_logit_softcapping: not implemented"},
        {"\"attn_logit_softcapping\": 50.0", "attn_logit_softcapping: not implemented"},
        {"\"use_qk_norm\": true", "use_qk_norm: not implemented"},
        {"\"layer_types\": [\"full_attention\", \"chunked_attention\"]", "layer_types[1]: \"chunked_attention\""},
        {"\"attention_bias\": true", "attention_bias"},
        {"\"head_dim\": 15", "inconsistent"}, /* RoPE rotates pairs */
    };
    for (size_t i = 0; i < sizeof bad_values / sizeof *bad_values; i++) {
        f = fopen(p, "w");
        fprintf(f, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, "
                   "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"vocab_size\": 10, %s}", bad_values[i][0]);
        fclose(f);
        assert_int_equal(base_model_open(hd, &b, &e), -1);
        if (!strstr(e.msg, bad_values[i][1])) fail_msg("%s: expected \"%s\" in: %s", bad_values[i][0], bad_values[i][1], e.msg);
    }
    /* a shard name that leaves the directory (issue 17 item 1: the message printed freed memory, ASan) */
    f = fopen(p, "w");
    fputs("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
          "\"num_attention_heads\": 4, \"vocab_size\": 10}", f);
    fclose(f);
    static const char *const bad_shards[] = {"../x", "..", "", "a/b.safetensors"};
    for (size_t i = 0; i < sizeof bad_shards / sizeof *bad_shards; i++) {
        char ip[300];
        snprintf(ip, sizeof ip, "%s/model.safetensors.index.json", hd);
        f = fopen(ip, "w");
        fprintf(f, "{\"metadata\": {}, \"weight_map\": {\"model.norm.weight\": \"%s\"}}", bad_shards[i]);
        fclose(f);
        assert_int_equal(base_model_open(hd, &b, &e), -1);
        if (!strstr(e.msg, "weight_map[\"model.norm.weight\"]: expected the file name of a shard"))
            fail_msg("shard \"%s\": %s", bad_shards[i], e.msg);
        unlink(ip);
    }
}

/* tokenizer.json written from a Llama-3-style GGUF tokenizer (llama-bpe pre-tokenizer,
 * ignore_merges, bos added by a TemplateProcessing post-processor) and read back
 * without a tokenizer_config.json: same ids, same bos. */
static void test_tokenizer_json_llama3_roundtrip(void **state) {
    (void)state;
    char gp[256], jp[256];
    path_in(gp, sizeof gp, "tok_l3.gguf");
    path_in(jp, sizeof jp, "tok_l3.json");
    gguf_writer *w;
    qerr e;
    assert_int_equal(gguf_writer_init(&w, &e), 0);
    tiny_vocab_add(w, "llama-bpe", "<|begin_of_text|>", "<|eot_id|>", "<|reserved_0|>");
    gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 0);
    gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 1);
    gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", 1);
    assert_int_equal(gguf_writer_write(w, gp, &e), 0);
    gguf_writer_free(w);
    gguf_file *g;
    assert_int_equal(gguf_open(gp, &g, &e), 0);
    tokenizer *a, *b;
    assert_int_equal(tokenizer_load_gguf(g, &a, &e), 0);
    assert_int_equal(tokenizer_json_write_from_gguf(g, jp, &e), 0);
    int rc = tokenizer_load_hf(jp, NULL, &b, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_string_equal(tokenizer_pre_name(b), "llama-bpe");
    assert_int_equal(tokenizer_add_bos(b), 1);
    assert_int_equal(tokenizer_bos_id(b), 0);
    const char *texts[] = {"hello hell 12345 world<|eot_id|>", "I'M here\n\n  x", "hell"};
    for (int i = 0; i < 3; i++) {
        tokenizer_ids x = {0}, y = {0};
        assert_int_equal(tokenizer_encode(a, texts[i], strlen(texts[i]), 1, &x, &e), 0);
        assert_int_equal(tokenizer_encode(b, texts[i], strlen(texts[i]), 1, &y, &e), 0);
        assert_int_equal(x.n, y.n);
        assert_memory_equal(x.ids, y.ids, x.n * sizeof(int32_t));
        tokenizer_ids_free(&x);
        tokenizer_ids_free(&y);
    }
    tokenizer_free(a);
    tokenizer_free(b);
    gguf_close(g);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gguf_writer_roundtrip),
        cmocka_unit_test(test_permute_and_floats),
        cmocka_unit_test(test_kv_cache_matches_full_forward),
        cmocka_unit_test(test_adapter_load_and_gguf_lora),
        cmocka_unit_test(test_merged_export),
        cmocka_unit_test(test_chat_prompt_and_stop),
        cmocka_unit_test(test_hf_dir_roundtrip), cmocka_unit_test(test_export_run_chat_template),
        cmocka_unit_test(test_bnb4_checkpoint_adopted),
        cmocka_unit_test(test_hf_errors),
        cmocka_unit_test(test_tokenizer_json_llama3_roundtrip),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
