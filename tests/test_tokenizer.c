/* tests/test_tokenizer.c — data/tokenizer against Hugging Face `tokenizers`.
 *
 * tests/fixtures/tokenizer_cases.json holds ids that HF produced for the
 * SmolLM2 vocabulary (scripts/make_tokenizer_fixtures.py); every case must
 * match exactly and round-trip through decode. Error paths use tiny GGUF
 * files written by the test itself. Needs models/SmolLM2-135M-Instruct.Q4_1.gguf
 * (`make model`); without it the real-model tests fail.
 */
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
#include <cjson/cJSON.h>

#include "core/clock.h"
#include "core/file.h"
#include "data/tokenizer.h"
#include "data/tokenizer_json.h"
#include "format/gguf_write.h"
#include "tests/tiny_model.h"

#define MODEL_PATH "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define FIXTURE_PATH "tests/fixtures/tokenizer_cases.json"

static tokenizer *load_real(void) {
    if (access(MODEL_PATH, R_OK) != 0) fail_msg("%s is missing: run `make model` first", MODEL_PATH);
    gguf_file *f = NULL;
    tokenizer *t = NULL;
    qerr e = {{0}};
    if (gguf_open(MODEL_PATH, &f, &e)) fail_msg("%s", e.msg);
    if (tokenizer_load_gguf(f, &t, &e)) fail_msg("%s", e.msg);
    gguf_close(f);
    return t;
}

static void test_real_metadata(void **state) {
    (void)state;
    tokenizer *t = load_real();
    assert_int_equal(tokenizer_n_vocab(t), 49152);
    assert_int_equal(tokenizer_bos_id(t), 1);
    assert_int_equal(tokenizer_eos_id(t), 2);
    assert_int_equal(tokenizer_pad_id(t), 2);
    assert_int_equal(tokenizer_add_bos(t), 0);
    assert_string_equal(tokenizer_pre_name(t), "smollm");
    assert_int_equal(tokenizer_find_token(t, "<|im_start|>"), 1);
    assert_int_equal(tokenizer_find_token(t, "<|im_end|>"), 2);
    assert_int_equal(tokenizer_find_token(t, "<|endoftext|>"), 0);
    assert_int_equal(tokenizer_find_token(t, "no such token, surely"), -1);
    assert_int_equal(tokenizer_token_type_of(t, 1), TOKENIZER_TOKEN_CONTROL);
    assert_non_null(tokenizer_chat_template(t));
    assert_non_null(strstr(tokenizer_chat_template(t), "<|im_start|>"));
    tokenizer_free(t);
}

/* Every fixture case: ids equal HF's, decode(encode(x)) == x (or HF's own
 * decode for the cases with bytes the vocabulary lacks). */
static void test_real_fixture_cases(void **state) {
    (void)state;
    tokenizer *t = load_real();
    size_t len = 0;
    char *json = file_read_all(FIXTURE_PATH, &len, NULL);
    if (!json) fail_msg("%s is missing (scripts/make_tokenizer_fixtures.py writes it)", FIXTURE_PATH);
    cJSON *doc = cJSON_ParseWithLength(json, len);
    assert_non_null(doc);
    cJSON *cases = cJSON_GetObjectItemCaseSensitive(doc, "cases");
    assert_true(cJSON_IsArray(cases));
    int n_cases = 0, n_match = 0, n_roundtrip = 0;
    cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const char *text = cJSON_GetObjectItemCaseSensitive(c, "text")->valuestring;
        int ps = cJSON_GetObjectItemCaseSensitive(c, "parse_special")->valueint;
        cJSON *want = cJSON_GetObjectItemCaseSensitive(c, "ids");
        tokenizer_ids ids = {0};
        qerr e = {{0}};
        if (tokenizer_encode(t, text, strlen(text), ps, &ids, &e)) fail_msg("encode: %s", e.msg);
        int ok = (size_t)cJSON_GetArraySize(want) == ids.n;
        for (size_t i = 0; ok && i < ids.n; i++) ok = cJSON_GetArrayItem(want, (int)i)->valueint == ids.ids[i];
        if (!ok) {
            fprintf(stderr, "MISMATCH (parse_special=%d) \"%s\"\n  want:", ps, text);
            cJSON *w;
            cJSON_ArrayForEach(w, want) fprintf(stderr, " %d", w->valueint);
            fprintf(stderr, "\n  got: ");
            for (size_t i = 0; i < ids.n; i++) fprintf(stderr, " %d", ids.ids[i]);
            fprintf(stderr, "\n");
        }
        n_match += ok;
        char *back;
        size_t blen;
        if (tokenizer_decode(t, ids.ids, ids.n, &back, &blen, &e)) fail_msg("decode: %s", e.msg);
        /* Cases with bytes the vocabulary lacks carry HF's decoded bytes. */
        cJSON *dec = cJSON_GetObjectItemCaseSensitive(c, "decoded_hex");
        char expect_buf[256];
        const char *expect = text;
        if (cJSON_IsString(dec)) {
            size_t nh = strlen(dec->valuestring) / 2;
            assert_true(nh < sizeof expect_buf);
            for (size_t i = 0; i < nh; i++) {
                unsigned v;
                sscanf(dec->valuestring + 2 * i, "%2x", &v);
                expect_buf[i] = (char)v;
            }
            expect_buf[nh] = 0;
            expect = expect_buf;
        }
        int rt = blen == strlen(expect) && memcmp(back, expect, blen) == 0;
        if (!rt) fprintf(stderr, "ROUNDTRIP FAIL \"%s\" -> \"%s\"\n", text, back);
        n_roundtrip += rt;
        free(back);
        tokenizer_ids_free(&ids);
        n_cases++;
    }
    printf("[tokenizer] %d/%d cases match HF tokenizers, %d/%d round-trip\n", n_match, n_cases, n_roundtrip,
           n_cases);
    assert_true(n_cases >= 30);
    assert_int_equal(n_match, n_cases);
    assert_int_equal(n_roundtrip, n_cases);
    cJSON_Delete(doc);
    free(json);
    tokenizer_free(t);
}

/* Offsets cover the text contiguously and each token decodes to its span. */
static void test_real_offsets(void **state) {
    (void)state;
    tokenizer *t = load_real();
    const char *text = "<|im_start|>user\nNumbers 12345, caf\xc3\xa9 \xf0\x9f\x98\x80<|im_end|>\n  x";
    size_t n = strlen(text);
    tokenizer_ids ids = {0};
    qerr e = {{0}};
    assert_int_equal(tokenizer_encode_offsets(t, text, n, 1, 100, &ids, &e), 0);
    assert_int_equal(ids.offsets[0], 100);
    for (size_t i = 0; i < ids.n; i++) {
        int64_t end = i + 1 < ids.n ? ids.offsets[i + 1] : 100 + (int64_t)n;
        assert_true(end > ids.offsets[i]);
        char *piece;
        size_t plen;
        assert_int_equal(tokenizer_decode(t, &ids.ids[i], 1, &piece, &plen, &e), 0);
        assert_int_equal((int64_t)plen, end - ids.offsets[i]);
        assert_memory_equal(piece, text + (ids.offsets[i] - 100), plen);
        free(piece);
    }
    tokenizer_ids_free(&ids);
    tokenizer_free(t);
}

/* Invalid UTF-8 is encoded byte by byte and round-trips. */
static void test_real_invalid_utf8(void **state) {
    (void)state;
    tokenizer *t = load_real();
    const char text[] = "ok \xe9t\xe9 bad \xc3 end \x80\x80";
    tokenizer_ids ids = {0};
    qerr e = {{0}};
    assert_int_equal(tokenizer_encode(t, text, sizeof text - 1, 1, &ids, &e), 0);
    char *back;
    size_t blen;
    assert_int_equal(tokenizer_decode(t, ids.ids, ids.n, &back, &blen, &e), 0);
    assert_int_equal(blen, sizeof text - 1);
    assert_memory_equal(back, text, blen);
    free(back);
    int32_t bad = 49152;
    assert_int_equal(tokenizer_decode(t, &bad, 1, &back, &blen, &e), -1);
    assert_non_null(strstr(e.msg, "49152"));
    tokenizer_ids_free(&ids);
    tokenizer_free(t);
}

/* Long runs of one character class are single pre-tokens (one regex match,
 * one BPE word): they must not exhaust the PCRE2 JIT stack and must round-trip. */
static void test_real_pathological_runs(void **state) {
    (void)state;
    tokenizer *t = load_real();
    const char *pats[] = {" ", "a", "=", "ab", "\n", "\xc3\xa9", "1", " \t", "\xe4\xb8\xad"};
    size_t n = 256 * 1024;
    char *buf = malloc(n);
    for (size_t p = 0; p < sizeof pats / sizeof pats[0]; p++) {
        size_t pl = strlen(pats[p]), m = n - n % pl;
        for (size_t i = 0; i < m; i++) buf[i] = pats[p][i % pl];
        tokenizer_ids v = {0};
        qerr e = {{0}};
        if (tokenizer_encode(t, buf, m, 1, &v, &e)) fail_msg("pattern %zu: %s", p, e.msg);
        char *back;
        size_t blen;
        assert_int_equal(tokenizer_decode(t, v.ids, v.n, &back, &blen, &e), 0);
        assert_int_equal(blen, m);
        assert_memory_equal(back, buf, m);
        free(back);
        tokenizer_ids_free(&v);
    }
    free(buf);
    tokenizer_free(t);
}

/* ---- tiny GGUF files for error paths and a synthetic vocabulary ---- */

typedef struct gbuf {
    unsigned char *p;
    size_t n, cap;
} gbuf;

static void gb_put(gbuf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 256;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void gb_u32(gbuf *b, uint32_t v) { gb_put(b, &v, 4); }
static void gb_u64(gbuf *b, uint64_t v) { gb_put(b, &v, 8); }
static void gb_str(gbuf *b, const char *s, size_t n) {
    gb_u64(b, n);
    gb_put(b, s, n);
}
static void gb_kv_str(gbuf *b, const char *key, const char *val) {
    gb_str(b, key, strlen(key));
    gb_u32(b, 8);
    gb_str(b, val, strlen(val));
}
static void gb_kv_u32(gbuf *b, const char *key, uint32_t v) {
    gb_str(b, key, strlen(key));
    gb_u32(b, 4);
    gb_u32(b, v);
}
static void gb_kv_arr_str(gbuf *b, const char *key, char **vals, size_t n) {
    gb_str(b, key, strlen(key));
    gb_u32(b, 9);
    gb_u32(b, 8);
    gb_u64(b, n);
    for (size_t i = 0; i < n; i++) gb_str(b, vals[i], strlen(vals[i]));
}
static void gb_kv_arr_i32(gbuf *b, const char *key, const int32_t *vals, size_t n) {
    gb_str(b, key, strlen(key));
    gb_u32(b, 9);
    gb_u32(b, 5);
    gb_u64(b, n);
    gb_put(b, vals, 4 * n);
}

/* Writes a GGUF with a synthetic vocabulary: <eos>, <ctl>, the 256 byte
 * tokens, then merges  "a b" -> ab, "b c" -> bc, "ab c" -> abc, "Ġ a" -> Ġa.
 * `model`/`pre` NULL omit the key. Returns the path (static buffer). */
static const char *write_tiny_gguf(const char *dir, const char *name, const char *model, const char *pre) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *toks[264];
    int32_t types[264];
    size_t nt = 0;
    toks[nt] = strdup("<eos>");
    types[nt++] = 3;
    toks[nt] = strdup("<ctl>");
    types[nt++] = 3;
    for (int b = 0; b < 256; b++) {
        char s[3];
        tiny_byte_sym(b, s);
        toks[nt] = strdup(s);
        types[nt++] = 1;
    }
    const char *extra[] = {"ab", "bc", "abc", "\xc4\xa0" "a"};
    for (int i = 0; i < 4; i++) {
        toks[nt] = strdup(extra[i]);
        types[nt++] = 1;
    }
    char *merges[] = {"a b", "b c", "ab c", "\xc4\xa0 a"};
    gbuf b = {0};
    gb_u32(&b, 0x46554747u);
    gb_u32(&b, 3);
    gb_u64(&b, 0);
    uint64_t n_kv = 4 + (model != NULL) + (pre != NULL);
    gb_u64(&b, n_kv);
    if (model) gb_kv_str(&b, "tokenizer.ggml.model", model);
    if (pre) gb_kv_str(&b, "tokenizer.ggml.pre", pre);
    gb_kv_arr_str(&b, "tokenizer.ggml.tokens", toks, nt);
    gb_kv_arr_i32(&b, "tokenizer.ggml.token_type", types, nt);
    gb_kv_arr_str(&b, "tokenizer.ggml.merges", merges, 4);
    gb_kv_u32(&b, "tokenizer.ggml.eos_token_id", 0);
    while (b.n % 32) gb_put(&b, "", 1);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(b.p, 1, b.n, fp), b.n);
    fclose(fp);
    free(b.p);
    for (size_t i = 0; i < nt; i++) free(toks[i]);
    return path;
}

static int load_tiny(const char *path, tokenizer **t, qerr *e) {
    gguf_file *f = NULL;
    if (gguf_open(path, &f, e)) fail_msg("gguf_open(%s): %s", path, e->msg);
    int rc = tokenizer_load_gguf(f, t, e);
    gguf_close(f);
    return rc;
}

static void test_errors(void **state) {
    (void)state;
    char dir[] = "/tmp/qlora_tok_XXXXXX";
    assert_non_null(mkdtemp(dir));
    tokenizer *t = NULL;
    qerr e = {{0}};

    /* tokenizer types that are not implemented: refused by name */
    static const char *const models[] = {"bert", "t5", "rwkv", "gemma4", "plamo2"};
    for (int i = 0; i < 5; i++) {
        char name[32], want[40];
        snprintf(name, sizeof name, "m%d.gguf", i);
        assert_int_equal(load_tiny(write_tiny_gguf(dir, name, models[i], "default"), &t, &e), -1);
        assert_null(t);
        snprintf(want, sizeof want, "\"%s\"", models[i]);
        assert_non_null(strstr(e.msg, "tokenizer.ggml.model"));
        assert_non_null(strstr(e.msg, want));
    }
    /* SentencePiece has no pre-tokenizer: any other pre is refused */
    assert_int_equal(load_tiny(write_tiny_gguf(dir, "spmpre.gguf", "llama", "qwen2"), &t, &e), -1);
    assert_non_null(strstr(e.msg, "tokenizer.ggml.pre"));
    assert_non_null(strstr(e.msg, "\"qwen2\""));
    /* pre-tokenizers llama.cpp knows and qlora does not */
    static const char *const pres[] = {"tekken", "deepseek-llm", "gpt-4o", "qwen35", "chatglm-bpe"};
    for (int i = 0; i < 5; i++) {
        char name[32];
        snprintf(name, sizeof name, "p%d.gguf", i);
        assert_int_equal(load_tiny(write_tiny_gguf(dir, name, "gpt2", pres[i]), &t, &e), -1);
        assert_non_null(strstr(e.msg, "tokenizer.ggml.pre"));
        assert_non_null(strstr(e.msg, pres[i]));
    }

    assert_int_equal(load_tiny(write_tiny_gguf(dir, "nomodel.gguf", NULL, "default"), &t, &e), -1);
    assert_non_null(strstr(e.msg, "tokenizer.ggml.model"));

    assert_int_equal(load_tiny(write_tiny_gguf(dir, "pre.gguf", "gpt2", "qwen-unknown"), &t, &e), -1);
    assert_non_null(strstr(e.msg, "tokenizer.ggml.pre"));
    assert_non_null(strstr(e.msg, "qwen-unknown"));

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* tokenizer.json components that are not implemented: each refused with one line naming it. */
static void test_json_refusals(void **state) {
    (void)state;
    static const char *const base_spm = "\"model\":{\"type\":\"BPE\",\"vocab\":{\"<unk>\":0,\"a\":1,\"b\":2,\"ab\":3},"
                                        "\"merges\":[\"a b\"],\"byte_fallback\":true,\"fuse_unk\":true%s}";
    static const char *const base_bl = "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},"
                                       "\"merges\":[\"a b\"]%s}";
    static const char *const bl_pre = "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}";
    static const char *const legacy = "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":"
                                      "\"\\u2581\"},{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},"
                                      "\"content\":\"\\u2581\"}]}";
    struct {
        int spm;
        const char *model_extra, *normalizer, *pre, *added, *want;
    } cases[] = {
        {0, "", "null", "null", "[]", "pre_tokenizer null"},
        {0, "", "{\"type\":\"NFKC\"}", bl_pre, "[]", "normalizer NFKC"},
        {0, "", "{\"type\":\"Lowercase\"}", bl_pre, "[]", "normalizer Lowercase"},
        {0, "", "null", "{\"type\":\"Whitespace\"}", "[]", "pre_tokenizer Whitespace"},
        {0, "", "null", "{\"type\":\"BertPreTokenizer\"}", "[]", "pre_tokenizer BertPreTokenizer"},
        {0, ",\"dropout\":0.1", "null", bl_pre, "[]", "model.dropout"},
        {0, ",\"continuing_subword_prefix\":\"##\"", "null", bl_pre, "[]", "model.continuing_subword_prefix"},
        {0, "", "null", bl_pre, "[{\"id\":2,\"content\":\"ab\",\"single_word\":true}]", "single_word"},
        {1, "", "{\"type\":\"NFKC\"}", "null", "[]", "normalizer NFKC"},
        {1, "", "null", "{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\",\"prepend_scheme\":\"first\","
                        "\"split\":true}", "[]", "pre_tokenizer Metaspace"},
        {1, "", legacy, "{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\",\"split\":false}", "[]",
         "normalizer Sequence with pre_tokenizer Metaspace"},
        {1, "", "null", "null", "[]", "normalizer null with pre_tokenizer null"},
        {1, ",\"ignore_merges\":true", legacy, "null", "[]", "ignore_merges"},
        {1, ",\"fuse_unk\":false", legacy, "null", "[]", "fuse_unk"},
        {1, "", legacy, "null", "[{\"id\":3,\"content\":\"ab\",\"special\":false}]", "normalized = true"},
        {1, "", legacy, "null", "[{\"id\":3,\"content\":\"ab\",\"normalized\":true,\"special\":true}]",
         "normalized = true"},
    };
    char dir[] = "/tmp/qlora_tokjson_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char model[512], doc[2048];
        snprintf(model, sizeof model, cases[i].spm ? base_spm : base_bl, cases[i].model_extra);
        if (cases[i].spm && strstr(cases[i].model_extra, "fuse_unk")) { /* the case overrides fuse_unk */
            char *p = strstr(model, ",\"fuse_unk\":true");
            memmove(p, p + 16, strlen(p + 16) + 1);
        }
        snprintf(doc, sizeof doc, "{%s,\"normalizer\":%s,\"pre_tokenizer\":%s,\"added_tokens\":%s}", model,
                 cases[i].normalizer, cases[i].pre, cases[i].added);
        FILE *fp = fopen(path, "w");
        assert_non_null(fp);
        fputs(doc, fp);
        fclose(fp);
        tokenizer *t = NULL;
        qerr e = {{0}};
        int rc = tokenizer_load_hf(path, NULL, &t, &e);
        if (rc != -1 || !strstr(e.msg, cases[i].want))
            fail_msg("case %zu: rc %d, message \"%s\", expected it to name \"%s\"", i, rc, e.msg, cases[i].want);
        assert_null(t);
        assert_null(strchr(e.msg, '\n'));
    }
    /* a model that is not BPE: named */
    FILE *fp = fopen(path, "w");
    fputs("{\"model\":{\"type\":\"Unigram\",\"vocab\":[[\"a\",0.0]]},\"normalizer\":null,\"pre_tokenizer\":null}", fp);
    fclose(fp);
    tokenizer *t = NULL;
    qerr e = {{0}};
    assert_int_equal(tokenizer_load_hf(path, NULL, &t, &e), -1);
    assert_non_null(strstr(e.msg, "Unigram"));
    unlink(path);
    rmdir(dir);
}

/* SentencePiece BPE mechanics on a tiny vocabulary (always runs; the real
 * vocabularies are in test_reference_vocabs): merges derived from scores,
 * the U+2581 prefix in each prepend scheme, byte fallback, <unk> split out. */
#define SP "\xe2\x96\x81"
static tokenizer *tiny_spm(const char *dir, const char *scheme, qerr *e) {
    enum { NB = 256 };
    static const char *const words[] = {SP, "a", "b", "c", SP "a", "ab", SP "ab", "bc", SP SP};
    static const float wscore[] = {-1, -2, -3, -4, -6, -5, -7, -8, -9};
    int nw = 9, nv = 3 + NB + nw;
    char **toks = calloc((size_t)nv, sizeof *toks);
    int32_t *types = calloc((size_t)nv, sizeof *types);
    float *scores = calloc((size_t)nv, sizeof *scores);
    toks[0] = strdup("<unk>"), types[0] = 2;
    toks[1] = strdup("<s>"), types[1] = 3;
    toks[2] = strdup("</s>"), types[2] = 3;
    for (int b = 0; b < NB; b++) {
        toks[3 + b] = malloc(8);
        snprintf(toks[3 + b], 8, "<0x%02X>", b);
        types[3 + b] = 6;
    }
    for (int i = 0; i < nw; i++) {
        toks[3 + NB + i] = strdup(words[i]);
        types[3 + NB + i] = 1;
        scores[3 + NB + i] = wscore[i];
    }
    gguf_writer *w;
    assert_int_equal(gguf_writer_init(&w, e), 0);
    gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    gguf_writer_add_str(w, "tokenizer.ggml.pre", "default");
    gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)toks, NULL, (uint64_t)nv);
    gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)nv);
    gguf_writer_add_arr_f32(w, "tokenizer.ggml.scores", scores, (uint64_t)nv);
    gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
    gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2);
    if (scheme && !strcmp(scheme, "charsmap")) gguf_writer_add_arr_i32(w, "tokenizer.ggml.precompiled_charsmap", types, 4);
    else if (scheme && !strcmp(scheme, "rew")) gguf_writer_add_bool(w, "tokenizer.ggml.remove_extra_whitespaces", 1);
    else if (scheme) gguf_writer_add_str(w, "tokenizer.qlora.prepend_scheme", scheme);
    char path[512];
    snprintf(path, sizeof path, "%s/spm_%s.gguf", dir, scheme ? scheme : "legacy");
    assert_int_equal(gguf_writer_write(w, path, e), 0);
    gguf_writer_free(w);
    for (int i = 0; i < nv; i++) free(toks[i]);
    free(toks);
    free(types);
    free(scores);
    tokenizer *t = NULL;
    if (load_tiny(path, &t, e)) return NULL;
    return t;
}

static void expect_ids(const tokenizer *t, const char *text, int parse_special, const char *want) {
    tokenizer_ids v = {0};
    qerr e = {{0}};
    assert_int_equal(tokenizer_encode(t, text, strlen(text), parse_special, &v, &e), 0);
    char got[512];
    size_t n = 0;
    got[0] = 0;
    for (size_t i = 0; i < v.n; i++) n += (size_t)snprintf(got + n, sizeof got - n, "%s%s", i ? " " : "",
                                                           tokenizer_token_text(t, v.ids[i]));
    if (strcmp(got, want)) fail_msg("\"%s\": got [%s], expected [%s]", text, got, want);
    tokenizer_ids_free(&v);
}

static void test_synthetic_spm(void **state) {
    (void)state;
    char dir[] = "/tmp/qlora_spm_XXXXXX";
    assert_non_null(mkdtemp(dir));
    qerr e = {{0}};
    /* SentencePiece normalization rules that are not implemented: refused by name */
    assert_null(tiny_spm(dir, "charsmap", &e));
    assert_non_null(strstr(e.msg, "tokenizer.ggml.precompiled_charsmap"));
    assert_null(tiny_spm(dir, "rew", &e));
    assert_non_null(strstr(e.msg, "tokenizer.ggml.remove_extra_whitespaces"));
    assert_null(tiny_spm(dir, "bogus", &e));
    assert_non_null(strstr(e.msg, "tokenizer.qlora.prepend_scheme"));
    tokenizer *t = tiny_spm(dir, NULL, &e);
    if (!t) fail_msg("%s", e.msg);
    assert_int_equal(tokenizer_is_spm(t), 1);
    /* "ab" (score -5) merges before SP+"a" (-6): SP ab -> SPab */
    expect_ids(t, "ab", 1, SP "ab");
    /* "abc": ab (-5) before bc (-8); SP+ab (-7) next; c stays */
    expect_ids(t, "abc", 1, SP "ab c");
    /* bytes missing from the vocabulary fall back to <0xNN> */
    expect_ids(t, "x\xc3\xa9", 1, SP " <0x78> <0xC3> <0xA9>");
    /* legacy: the prefix on every segment, also after a special token and before a leading space */
    /* SP SP a: SP+a (-6) before SP+SP (-9) */
    expect_ids(t, "<s>ab</s> a", 1, "<s> " SP "ab </s> " SP " " SP "a");
    expect_ids(t, " ab", 1, SP " " SP "ab");
    expect_ids(t, "<s>ab", 0, SP " <0x3C> <0x73> <0x3E> ab");
    expect_ids(t, "<unk>", 1, "<unk>");
    tokenizer_free(t);
    /* Metaspace "first": only at the start of the text, and not when it starts with a space */
    t = tiny_spm(dir, "first", &e);
    assert_non_null(t);
    expect_ids(t, "<s>ab</s> a", 1, "<s> ab </s> " SP "a");
    expect_ids(t, " ab", 1, SP "ab");
    expect_ids(t, "ab", 1, SP "ab");
    tokenizer_free(t);
    /* Metaspace "always": every segment not starting with a space */
    t = tiny_spm(dir, "always", &e);
    assert_non_null(t);
    expect_ids(t, "<s>ab</s> a", 1, "<s> " SP "ab </s> " SP "a");
    tokenizer_free(t);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* BPE mechanics on the synthetic vocabulary: rank order, leftmost ties,
 * control tokens with and without parse_special, a missing pre key. */
static void test_synthetic_bpe(void **state) {
    (void)state;
    char dir[] = "/tmp/qlora_tok_XXXXXX";
    assert_non_null(mkdtemp(dir));
    tokenizer *t = NULL;
    qerr e = {{0}};
    assert_int_equal(load_tiny(write_tiny_gguf(dir, "ok.gguf", "gpt2", NULL), &t, &e), 0);
    assert_string_equal(tokenizer_pre_name(t), "default");
    int32_t id_ab = tokenizer_find_token(t, "ab"), id_bc = tokenizer_find_token(t, "bc");
    int32_t id_abc = tokenizer_find_token(t, "abc"), id_c = tokenizer_find_token(t, "c");
    int32_t id_sa = tokenizer_find_token(t, "\xc4\xa0" "a"), id_ctl = tokenizer_find_token(t, "<ctl>");
    assert_true(id_ab > 0 && id_bc > 0 && id_abc > 0 && id_sa > 0 && id_ctl == 1);

    tokenizer_ids v = {0};
    /* "abc": a+b (rank 0) first, then ab+c (rank 2) -> abc */
    assert_int_equal(tokenizer_encode(t, "abc", 3, 1, &v, &e), 0);
    assert_int_equal(v.n, 1);
    assert_int_equal(v.ids[0], id_abc);
    /* "bcab": b+c and a+b both apply; a+b has the lower rank */
    v.n = 0;
    assert_int_equal(tokenizer_encode(t, "bcab", 4, 1, &v, &e), 0);
    assert_int_equal(v.n, 2);
    assert_int_equal(v.ids[0], id_bc);
    assert_int_equal(v.ids[1], id_ab);
    /* " a<ctl>c" with parse_special -> [Ġa, <ctl>, c]; without -> plain bytes */
    v.n = 0;
    assert_int_equal(tokenizer_encode(t, " a<ctl>c", 8, 1, &v, &e), 0);
    assert_int_equal(v.n, 3);
    assert_int_equal(v.ids[0], id_sa);
    assert_int_equal(v.ids[1], id_ctl);
    assert_int_equal(v.ids[2], id_c);
    v.n = 0;
    assert_int_equal(tokenizer_encode(t, " a<ctl>c", 8, 0, &v, &e), 0);
    assert_true(v.n > 3);
    for (size_t i = 0; i < v.n; i++) assert_int_not_equal(v.ids[i], id_ctl);
    tokenizer_ids_free(&v);
    tokenizer_free(t);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* Throughput on ~1 MB of mixed text (informational; fails only if absurdly slow). */
static void test_real_throughput(void **state) {
    (void)state;
    tokenizer *t = load_real();
    const char *para =
        "The open() system call opens the file specified by pathname. If the specified file does not exist, "
        "it may optionally (if O_CREAT is specified in flags) be created by open().\n"
        "       int fd = open(\"/tmp/x\", O_RDWR | O_CREAT, 0644); /* returns -1 on error, errno = 13 */\n\n";
    size_t plen = strlen(para), reps = (1u << 20) / plen, n = plen * reps;
    char *text = malloc(n + 1);
    for (size_t i = 0; i < reps; i++) memcpy(text + i * plen, para, plen);
    text[n] = 0;
    tokenizer_ids v = {0};
    qerr e = {{0}};
    double t0 = clock_now_sec();
    assert_int_equal(tokenizer_encode(t, text, n, 0, &v, &e), 0);
    double s = clock_now_sec() - t0;
    printf("[tokenizer] %.2f MB -> %zu tokens in %.3f s (%.2f M tokens/s, %.1f MB/s)\n", (double)n / 1e6, v.n, s,
           (double)v.n / s / 1e6, (double)n / s / 1e6);
    assert_true(s < 10.0);
    tokenizer_ids_free(&v);
    free(text);
    tokenizer_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors), cmocka_unit_test(test_json_refusals), cmocka_unit_test(test_synthetic_spm),
        cmocka_unit_test(test_synthetic_bpe),
        cmocka_unit_test(test_real_metadata),
        cmocka_unit_test(test_real_fixture_cases),
        cmocka_unit_test(test_real_offsets),
        cmocka_unit_test(test_real_invalid_utf8),
        cmocka_unit_test(test_real_pathological_runs),
        cmocka_unit_test(test_real_throughput),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
