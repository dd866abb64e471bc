/* tests/test_reference_vocabs.c — data/tokenizer and data/tokenizer_json on the
 * real vocabularies of Llama 2 (llama-spm), Phi-3, Qwen2 and Llama 3
 * (llama-bpe), against Hugging Face `tokenizers`.
 *
 * Fixture tests/fixtures/ref_vocabs.qref.gz (scripts/make_vocab_fixtures.py,
 * which says how each HF tokenizer was built from the vocabulary by
 * transformers alone): per tokenizer shape, for every segment of the >= 1 MB
 * corpus of tests/fixtures/ref_tokenizer.qref.gz, the number of ids and the
 * FNV-1a-64 of the ids (int32 little-endian), and the full ids of the edge
 * cases (text right after special tokens, leading and repeated spaces, bytes
 * missing from the vocabulary, NFD input). Tolerance: none.
 *
 * Shapes: "llama-spm", "phi-3", "qwen2", "llama-bpe" load the GGUF
 * (tokenizer_load_gguf). "llama-spm-ms", "phi-3-json", "phi-3-strip" go through
 * tokenizer.json: qlora writes it from the GGUF (tokenizer_json_write_from_gguf,
 * whose merges must hash equal to HF's), the normalizer and pre-tokenizer are
 * replaced by HF's JSON from the fixture (Metaspace prepend_scheme "first" for
 * llama-spm-ms; the legacy Prepend+Replace for phi-3-json; for phi-3-strip
 * also HF's added tokens with lstrip / rstrip flags), and tokenizer_load_hf
 * reads it back.
 *
 * Needs models/vocab/ (scripts/fetch_vocab.sh, run by scripts/setup.sh); prints
 * "SKIPPED: ..." and skips when it is absent.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "core/clock.h"
#include "core/file.h"
#include "data/tokenizer.h"
#include "data/tokenizer_json.h"
#include "tests/ref_fixture.h"

#define VOCAB_DIR "models/vocab"
#define FIXTURE "tests/fixtures/ref_vocabs.qref.gz"
#define CORPUS "tests/fixtures/ref_tokenizer.qref.gz"

static uint64_t fnv64(const int32_t *ids, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)ids[i];
        for (int k = 0; k < 4; k++) h = (h ^ ((v >> (8 * k)) & 0xFF)) * 0x100000001b3ull;
    }
    return h;
}

static uint64_t fnv64_bytes(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
    return h;
}

static const char *file_of(const char *shape) {
    if (!strncmp(shape, "llama-spm", 9)) return "llama-spm";
    if (!strncmp(shape, "phi-3", 5)) return "phi-3";
    return shape;
}

static int have_vocab(const char *name) {
    char p[256];
    snprintf(p, sizeof p, VOCAB_DIR "/ggml-vocab-%s.gguf", name);
    if (access(p, R_OK) == 0) return 1;
    printf("SKIPPED: %s is missing (run scripts/fetch_vocab.sh)\n", p);
    return 0;
}

/* tokenizer.json from qlora's writer with HF's normalizer and pre-tokenizer put in; checks the merges. */
static tokenizer *load_via_json(const char *shape, const gguf_file *g, const ref_file *rf) {
    char path[] = "/tmp/qlora_vocab_json_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    qerr e = {{0}};
    if (tokenizer_json_write_from_gguf(g, path, &e)) fail_msg("%s: %s", shape, e.msg);
    cJSON *root = file_read_json_object(path, &e);
    if (!root) fail_msg("%s", e.msg);
    char key[128];
    snprintf(key, sizeof key, "%s/normalizer", shape);
    char *norm = ref_str(rf, key);
    snprintf(key, sizeof key, "%s/pre_tokenizer", shape);
    char *pre = ref_str(rf, key);
    cJSON_ReplaceItemInObjectCaseSensitive(root, "normalizer", cJSON_Parse(norm));
    cJSON_ReplaceItemInObjectCaseSensitive(root, "pre_tokenizer", cJSON_Parse(pre));
    if (!strcmp(shape, "phi-3-strip")) { /* HF's added tokens with their lstrip / rstrip flags */
        snprintf(key, sizeof key, "%s/added_tokens", shape);
        char *added = ref_str(rf, key);
        cJSON_ReplaceItemInObjectCaseSensitive(root, "added_tokens", cJSON_Parse(added));
        free(added);
    }
    /* merges: "a b" joined by "\n", hashed as the fixture script does */
    const cJSON *m, *merges = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "model"), "merges");
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap);
    int64_t nm = 0;
    cJSON_ArrayForEach(m, merges) {
        const char *a = cJSON_GetArrayItem(m, 0)->valuestring, *b = cJSON_GetArrayItem(m, 1)->valuestring;
        size_t need = strlen(a) + strlen(b) + 2;
        if (n + need > cap) buf = realloc(buf, cap = 2 * (n + need));
        n += (size_t)sprintf(buf + n, "%s%s %s", nm ? "\n" : "", a, b);
        nm++;
    }
    snprintf(key, sizeof key, "%s/n_merges", shape);
    assert_int_equal(nm, (int64_t)ref_scalar(rf, key));
    snprintf(key, sizeof key, "%s/merges_hash", shape);
    const int64_t *mh = ref_i64(rf, key, 1);
    if (fnv64_bytes(buf, n) != (uint64_t)mh[0]) fail_msg("%s: qlora's merges differ from HF's (%lld merges)", shape, (long long)nm);
    free(buf);
    char *text = cJSON_PrintUnformatted(root);
    if (file_write_atomic(path, text, strlen(text), &e)) fail_msg("%s", e.msg);
    free(text);
    cJSON_Delete(root);
    free(norm);
    free(pre);
    tokenizer *t = NULL;
    if (tokenizer_load_hf(path, NULL, &t, &e)) fail_msg("%s: %s", shape, e.msg);
    unlink(path);
    return t;
}

static void check_shape(const char *shape) {
    if (!have_vocab(file_of(shape))) skip();
    ref_file rf, rc;
    ref_open_or_fail(FIXTURE, &rf);
    ref_open_or_fail(CORPUS, &rc);
    char p[256], key[128];
    snprintf(p, sizeof p, VOCAB_DIR "/ggml-vocab-%s.gguf", file_of(shape));
    qerr e = {{0}};
    gguf_file *g = NULL;
    if (gguf_open(p, &g, &e)) fail_msg("%s", e.msg);
    tokenizer *t = NULL;
    double t0 = clock_now_sec();
    if (!strcmp(shape, "llama-spm-ms") || !strcmp(shape, "phi-3-json") || !strcmp(shape, "phi-3-strip")) {
        t = load_via_json(shape, g, &rf);
    } else if (tokenizer_load_gguf(g, &t, &e)) {
        fail_msg("%s: %s", shape, e.msg);
    }
    double t_load = clock_now_sec() - t0;
    gguf_close(g);
    /* BOS: Llama 2 and Phi-3 add it (tokenizer.ggml.add_bos_token), Qwen2 does not */
    if (!strcmp(shape, "qwen2")) assert_int_equal(tokenizer_add_bos(t), 0);
    if (!strcmp(shape, "llama-spm") || !strcmp(shape, "phi-3")) assert_int_equal(tokenizer_add_bos(t), 1);
    assert_int_equal(tokenizer_is_spm(t), !!strstr(shape, "spm") || !strncmp(shape, "phi-3", 5));

    /* corpus: hashes */
    const ref_array *corpus_a = ref_find(&rc, "corpus");
    assert_non_null(corpus_a);
    const char *corpus = corpus_a->data;
    int64_t nseg = ref_find(&rc, "seg_off")->numel - 1;
    const int64_t *seg_off = ref_i64(&rc, "seg_off", nseg + 1);
    const uint8_t *special = ref_u8(&rc, "seg_special", nseg);
    assert_true(seg_off[nseg] >= 1000000);
    snprintf(key, sizeof key, "%s/seg_hash", shape);
    const int64_t *hash = ref_i64(&rf, key, nseg);
    snprintf(key, sizeof key, "%s/seg_ntok", shape);
    const int32_t *ntok = ref_i32(&rf, key, nseg);
    int64_t bad = 0, total = 0;
    t0 = clock_now_sec();
    for (int64_t s = 0; s < nseg; s++) {
        tokenizer_ids got = {0};
        size_t len = (size_t)(seg_off[s + 1] - seg_off[s]);
        if (tokenizer_encode(t, corpus + seg_off[s], len, special[s], &got, &e)) fail_msg("%s", e.msg);
        total += ntok[s];
        if ((int64_t)got.n != ntok[s] || fnv64(got.ids, got.n) != (uint64_t)hash[s]) {
            if (bad < 3)
                print_error("%s: corpus segment %lld (bytes [%lld, %lld), parse_special %d): %zu ids, HF %d%s\n",
                            shape, (long long)s, (long long)seg_off[s], (long long)seg_off[s + 1], special[s], got.n,
                            ntok[s], (int64_t)got.n == ntok[s] ? " (hash differs)" : "");
            bad++;
        }
        tokenizer_ids_free(&got);
    }
    double t_enc = clock_now_sec() - t0;

    /* edge cases: full ids */
    const ref_array *et = ref_find(&rf, "edge_text");
    assert_non_null(et);
    int64_t ne = ref_find(&rf, "edge_off")->numel - 1;
    const int64_t *eo = ref_i64(&rf, "edge_off", ne + 1);
    const uint8_t *es = ref_u8(&rf, "edge_special", ne);
    snprintf(key, sizeof key, "%s/edge_ids_off", shape);
    const int64_t *io = ref_i64(&rf, key, ne + 1);
    snprintf(key, sizeof key, "%s/edge_ids", shape);
    const int32_t *ids = ref_i32(&rf, key, io[ne]);
    int64_t ebad = 0;
    for (int64_t c = 0; c < ne; c++) {
        tokenizer_ids got = {0};
        const char *text = (const char *)et->data + eo[c];
        size_t len = (size_t)(eo[c + 1] - eo[c]);
        if (tokenizer_encode_offsets(t, text, len, es[c], 0, &got, &e)) fail_msg("%s", e.msg);
        int64_t nw = io[c + 1] - io[c];
        int same = (int64_t)got.n == nw;
        for (int64_t j = 0; same && j < nw; j++) same = got.ids[j] == ids[io[c] + j];
        if (!same) {
            ebad++;
            print_error("%s: edge case %lld \"%.*s\" (parse_special %d):\n  hf   ", shape, (long long)c, (int)len, text,
                        es[c]);
            for (int64_t j = 0; j < nw; j++) print_error(" %d", ids[io[c] + j]);
            print_error("\n  ours ");
            for (size_t j = 0; j < got.n; j++) print_error(" %d", got.ids[j]);
            print_error("\n");
        }
        /* offsets: strictly increasing... except inside a character NFC or byte fallback split */
        for (size_t j = 1; j < got.n; j++) assert_true(got.offsets[j] >= got.offsets[j - 1]);
        tokenizer_ids_free(&got);
    }
    print_message("[vocab] %-12s %lld segments, %lld bytes, %lld tokens: %lld differ; %lld edge cases: %lld differ "
                  "(load %.2fs, encode %.2fs)\n",
                  shape, (long long)nseg, (long long)seg_off[nseg], (long long)total, (long long)bad, (long long)ne,
                  (long long)ebad, t_load, t_enc);
    tokenizer_free(t);
    ref_close(&rf);
    ref_close(&rc);
    if (bad || ebad) fail_msg("%s: %lld corpus segments and %lld edge cases differ from HF tokenizers", shape,
                              (long long)bad, (long long)ebad);
}

static void test_llama_spm(void **s) { (void)s; check_shape("llama-spm"); }
static void test_llama_spm_metaspace_json(void **s) { (void)s; check_shape("llama-spm-ms"); }
static void test_phi3(void **s) { (void)s; check_shape("phi-3"); }
static void test_phi3_json(void **s) { (void)s; check_shape("phi-3-json"); }
static void test_phi3_strip_json(void **s) { (void)s; check_shape("phi-3-strip"); }
static void test_qwen2(void **s) { (void)s; check_shape("qwen2"); }
static void test_llama_bpe(void **s) { (void)s; check_shape("llama-bpe"); }

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_spm), cmocka_unit_test(test_llama_spm_metaspace_json),
        cmocka_unit_test(test_phi3),      cmocka_unit_test(test_phi3_json), cmocka_unit_test(test_phi3_strip_json),
        cmocka_unit_test(test_qwen2),     cmocka_unit_test(test_llama_bpe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
