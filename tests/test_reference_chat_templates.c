/* tests/test_reference_chat_templates.c — data/chat against transformers'
 * apply_chat_template over the real Jinja templates of Llama 3.1, Qwen2.5,
 * Qwen2, Phi-3.5, Phi-3, Mistral v3 (Nemo) and Llama 2.
 *
 * Fixture tests/fixtures/ref_chat_templates.qref.gz
 * (scripts/make_chat_fixtures.py): per template its source, the vocabulary
 * it is paired with, and for 12 conversations (with and without system,
 * multi-turn, empty and white-space contents, non-Latin text; two that
 * templates requiring alternation reject) × add_generation_prompt in
 * (False, True): the rendered string and its ids, or "rejected".
 * Checked: the template is recognised under its name; chat_render gives the
 * string byte for byte; tokenizer_encode (parse_special = 1, as transformers
 * tokenizes the rendering) gives the ids; a rejected conversation is refused;
 * the trained spans (train_on_inputs: false) end with the template's
 * end-of-turn token, which is trained, and the token after it is not.
 * Also: roles a template does not render and an edited template are refused.
 *
 * Needs models/vocab/ (scripts/fetch_vocab.sh); "SKIPPED: ..." without it.
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

#include "core/file.h"
#include "core/strbuf.h"
#include "data/chat.h"
#include "data/dataset.h"
#include "data/tokenizer_json.h"
#include "data/tokenizer.h"
#include "format/gguf.h"
#include "tests/ref_fixture.h"

#define FIXTURE "tests/fixtures/ref_chat_templates.qref.gz"

static tokenizer *load_vocab(const char *shape) {
    char p[256];
    snprintf(p, sizeof p, "models/vocab/ggml-vocab-%s.gguf", shape);
    if (access(p, R_OK) != 0) {
        printf("SKIPPED: %s is missing (run scripts/fetch_vocab.sh)\n", p);
        return NULL;
    }
    gguf_file *g;
    tokenizer *t;
    qerr e = {{0}};
    if (gguf_open(p, &g, &e) || tokenizer_load_gguf(g, &t, &e)) fail_msg("%s", e.msg);
    gguf_close(g);
    return t;
}

static const char *eot_of(const char *name, const tokenizer *t) {
    if (!strncmp(name, "Qwen", 4)) return "<|im_end|>";
    if (!strncmp(name, "Llama 3", 7)) return "<|eot_id|>";
    if (!strncmp(name, "Phi", 3)) return "<|end|>";
    return tokenizer_token_text(t, tokenizer_eos_id(t)); /* Llama 2, Mistral: eos */
}

static void test_templates_equal_transformers(void **state) {
    (void)state;
    if (access("models/vocab/ggml-vocab-llama-spm.gguf", R_OK) != 0) {
        printf("SKIPPED: models/vocab is missing (run scripts/fetch_vocab.sh)\n");
        skip();
    }
    ref_file rf;
    ref_open_or_fail(FIXTURE, &rf);
    char *names_s = ref_str(&rf, "names"), *convs_s = ref_str(&rf, "conversations");
    cJSON *names = cJSON_Parse(names_s), *convs = cJSON_Parse(convs_s);
    assert_non_null(names);
    assert_non_null(convs);
    int nconv = cJSON_GetArraySize(convs), total = 0, rejected = 0;
    for (int ti = 0; ti < cJSON_GetArraySize(names); ti++) {
        const char *name = cJSON_GetArrayItem(names, ti)->valuestring;
        char key[64];
        snprintf(key, sizeof key, "t%d/source", ti);
        char *src = ref_str(&rf, key);
        snprintf(key, sizeof key, "t%d/shape", ti);
        char *shape = ref_str(&rf, key);
        snprintf(key, sizeof key, "t%d/rendered", ti);
        char *rend_s = ref_str(&rf, key);
        cJSON *rend = cJSON_Parse(rend_s);
        snprintf(key, sizeof key, "t%d/ids_off", ti);
        const int64_t *io = ref_i64(&rf, key, 2 * nconv + 1);
        snprintf(key, sizeof key, "t%d/ids", ti);
        const int32_t *ids = ref_i32(&rf, key, io[2 * nconv]);
        snprintf(key, sizeof key, "t%d/error", ti);
        const uint8_t *err = ref_u8(&rf, key, 2 * nconv);
        tokenizer *t = load_vocab(shape);
        assert_non_null(t);
        const chat_template *ct;
        qerr e = {{0}};
        if (chat_template_find(src, &ct, &e)) fail_msg("%s: %s", name, e.msg);
        assert_string_equal(chat_template_name(ct), name);
        int32_t eot = tokenizer_find_token(t, eot_of(name, t));
        assert_true(eot >= 0);
        for (int c = 0; c < nconv; c++) {
            cJSON *conv = cJSON_GetArrayItem(convs, c);
            int nm = cJSON_GetArraySize(conv), n_asst = 0;
            chat_message m[16];
            for (int k = 0; k < nm; k++) {
                cJSON *it = cJSON_GetArrayItem(conv, k);
                m[k].role = cJSON_GetObjectItem(it, "role")->valuestring;
                m[k].content = cJSON_GetObjectItem(it, "content")->valuestring;
                n_asst += !strcmp(m[k].role, "assistant");
            }
            for (int gen = 0; gen < 2; gen++) {
                int r = 2 * c + gen;
                strbuf b = {0};
                chat_spans sp = {0};
                int rc = chat_render(ct, t, m, nm, gen, &b, &sp, &e);
                total++;
                if (err[r]) {
                    rejected++;
                    if (rc == 0) fail_msg("%s: conversation %d (generation prompt %d): transformers rejects it, qlora "
                                          "rendered \"%s\"", name, c, gen, b.p);
                    assert_non_null(strstr(e.msg, name));
                    free(b.p);
                    free(sp.v);
                    continue;
                }
                if (rc) fail_msg("%s: conversation %d: %s", name, c, e.msg);
                const char *want = cJSON_GetArrayItem(rend, r)->valuestring;
                if (strcmp(b.p ? b.p : "", want))
                    fail_msg("%s: conversation %d (generation prompt %d):\n  transformers \"%s\"\n  qlora        \"%s\"",
                             name, c, gen, want, b.p ? b.p : "");
                tokenizer_ids got = {0};
                if (tokenizer_encode_offsets(t, b.p ? b.p : "", b.n, 1, 0, &got, &e)) fail_msg("%s", e.msg);
                int64_t nw = io[r + 1] - io[r];
                if ((int64_t)got.n != nw || memcmp(got.ids, ids + io[r], got.n * sizeof(int32_t)))
                    fail_msg("%s: conversation %d (generation prompt %d): %zu ids, transformers %lld (ids differ)",
                             name, c, gen, got.n, (long long)nw);
                /* masks: a token is trained if it overlaps a span (data/jsonl.c) */
                for (size_t s = 0; s < sp.n; s++) {
                    size_t a = sp.v[2 * s], z = sp.v[2 * s + 1];
                    size_t last = SIZE_MAX;
                    for (size_t j = 0; j < got.n; j++) {
                        int64_t ts = got.offsets[j], te = j + 1 < got.n ? got.offsets[j + 1] : (int64_t)b.n;
                        if (ts < (int64_t)z && te > (int64_t)a) last = j;
                    }
                    assert_true(last != SIZE_MAX);
                    if (got.ids[last] != eot)
                        fail_msg("%s: conversation %d: trained span %zu ends with id %d, not the end-of-turn token %d",
                                 name, c, s, got.ids[last], eot);
                    if (last + 1 < got.n) assert_true(got.offsets[last + 1] >= (int64_t)z); /* the next is not trained */
                }
                assert_int_equal((int)sp.n, n_asst);
                tokenizer_ids_free(&got);
                free(b.p);
                free(sp.v);
            }
        }
        /* roles the template does not render, and an edited template, are refused */
        chat_message tool[2] = {{"user", "x"}, {"tool", "{\"r\": 1}"}};
        strbuf b = {0};
        int rc = chat_render(ct, t, tool, 2, 0, &b, NULL, &e);
        free(b.p);
        if (strcmp(name, "Qwen2")) { /* Qwen2's ChatML prints any role */
            assert_int_equal(rc, -1);
            assert_non_null(strstr(e.msg, "\"tool\""));
        }
        size_t L = strlen(src);
        char *edited = malloc(L + 2);
        memcpy(edited, src, L / 2); /* one extra space in the middle: renders the same in Jinja, still refused */
        edited[L / 2] = ' ';
        memcpy(edited + L / 2 + 1, src + L / 2, L - L / 2 + 1);
        assert_int_equal(chat_template_find(edited, &ct, &e), -1);
        assert_non_null(strstr(e.msg, "not supported"));
        free(edited);
        tokenizer_free(t);
        cJSON_Delete(rend);
        free(rend_s);
        free(src);
        free(shape);
    }
    print_message("[chat] %d renderings equal to apply_chat_template (strings and ids), %d rejected as transformers "
                  "rejects them\n", total - rejected, rejected);
    cJSON_Delete(names);
    cJSON_Delete(convs);
    free(names_s);
    free(convs_s);
    ref_close(&rf);
}


/* The dataset path (type chat_template, train_on_inputs false) for every template: an HF tokenizer
 * directory (qlora's tokenizer.json of the vocabulary + a tokenizer_config.json carrying the template),
 * the non-rejected conversations as JSONL; the ids must be transformers', the labels exactly the tokens
 * of the assistant turns through their end-of-turn token; a rejected conversation names file and line. */
static void test_dataset_path(void **state) {
    (void)state;
    if (access("models/vocab/ggml-vocab-llama-spm.gguf", R_OK) != 0) {
        printf("SKIPPED: models/vocab is missing (run scripts/fetch_vocab.sh)\n");
        skip();
    }
    ref_file rf;
    ref_open_or_fail(FIXTURE, &rf);
    char *names_s = ref_str(&rf, "names"), *convs_s = ref_str(&rf, "conversations");
    cJSON *names = cJSON_Parse(names_s), *convs = cJSON_Parse(convs_s);
    int nconv = cJSON_GetArraySize(convs);
    char dir[] = "/tmp/qlora_chat_ds_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char tj[256], tc[256], jl[256];
    snprintf(tj, sizeof tj, "%s/tokenizer.json", dir);
    snprintf(tc, sizeof tc, "%s/tokenizer_config.json", dir);
    snprintf(jl, sizeof jl, "%s/data.jsonl", dir);
    for (int ti = 0; ti < cJSON_GetArraySize(names); ti++) {
        const char *name = cJSON_GetArrayItem(names, ti)->valuestring;
        char key[64], gp[256];
        snprintf(key, sizeof key, "t%d/source", ti);
        char *src = ref_str(&rf, key);
        snprintf(key, sizeof key, "t%d/shape", ti);
        char *shape = ref_str(&rf, key);
        snprintf(key, sizeof key, "t%d/ids_off", ti);
        const int64_t *io = ref_i64(&rf, key, 2 * nconv + 1);
        snprintf(key, sizeof key, "t%d/ids", ti);
        const int32_t *ids = ref_i32(&rf, key, io[2 * nconv]);
        snprintf(key, sizeof key, "t%d/error", ti);
        const uint8_t *err = ref_u8(&rf, key, 2 * nconv);
        snprintf(gp, sizeof gp, "models/vocab/ggml-vocab-%s.gguf", shape);
        qerr e = {{0}};
        gguf_file *g;
        tokenizer *gt;
        if (gguf_open(gp, &g, &e) || tokenizer_load_gguf(g, &gt, &e)) fail_msg("%s", e.msg);
        if (tokenizer_json_write_from_gguf(g, tj, &e)) fail_msg("%s", e.msg);
        gguf_close(g);
        cJSON *cfg = cJSON_CreateObject();
        cJSON_AddStringToObject(cfg, "chat_template", src);
        if (tokenizer_bos_id(gt) >= 0) cJSON_AddStringToObject(cfg, "bos_token", tokenizer_token_text(gt, tokenizer_bos_id(gt)));
        cJSON_AddStringToObject(cfg, "eos_token", tokenizer_token_text(gt, tokenizer_eos_id(gt)));
        char *ct = cJSON_PrintUnformatted(cfg);
        if (file_write_atomic(tc, ct, strlen(ct), &e)) fail_msg("%s", e.msg);
        free(ct);
        cJSON_Delete(cfg);
        tokenizer *t;
        if (tokenizer_load_hf(tj, tc, &t, &e)) fail_msg("%s: %s", name, e.msg);
        FILE *fp = fopen(jl, "w");
        int kept[32], nk = 0, first_rejected = -1;
        for (int c = 0; c < nconv; c++) {
            if (err[2 * c]) {
                if (first_rejected < 0) first_rejected = c;
                continue;
            }
            cJSON *rec = cJSON_CreateObject();
            cJSON_AddItemToObject(rec, "messages", cJSON_Duplicate(cJSON_GetArrayItem(convs, c), 1));
            char *line = cJSON_PrintUnformatted(rec);
            fprintf(fp, "%s\n", line);
            free(line);
            cJSON_Delete(rec);
            kept[nk++] = c;
        }
        fclose(fp);
        /* eot_tokens: [the template's end-of-turn token] (axolotl's default is [eos_token], which these
         * vocabularies' eos is not for every template) */
        char *eot_s = (char *)(!strncmp(name, "Qwen", 4)      ? "<|im_end|>"
                               : !strncmp(name, "Llama 3", 7) ? "<|eot_id|>"
                               : !strncmp(name, "Phi", 3)     ? "<|end|>"
                                                             : "</s>");
        char *const eot_list[1] = {eot_s};
        dataset_spec sp = {.path = jl, .type = "chat_template", .eot_tokens = eot_list, .n_eot_tokens = 1};
        dataset_examples docs = {0};
        if (dataset_read_jsonl(t, &sp, 0, &docs, &e)) fail_msg("%s: %s", name, e.msg);
        assert_int_equal(docs.n, nk);
        int32_t eot = tokenizer_find_token(t, eot_s);
        assert_true(eot >= 0);
        for (int k = 0; k < nk; k++) {
            int c = kept[k], r = 2 * c;
            const dataset_example *ex = &docs.v[k];
            if ((int64_t)ex->n != io[r + 1] - io[r] || memcmp(ex->ids, ids + io[r], (size_t)ex->n * sizeof(int32_t)))
                fail_msg("%s: conversation %d: dataset ids differ from apply_chat_template's", name, c);
            /* labels (axolotl's, checked in full by tests/test_reference_axolotl_chat.c): one trained
             * end-of-turn token per non-empty assistant message, each closing a run of trained content that
             * ends at most 3 tokens before it (Llama 2's " </s>": the space is not trained) */
            int n_asst = 0, runs = 0;
            cJSON *m;
            /* an empty assistant message is no turn for axolotl (find_turn finds nothing): nothing trained */
            cJSON_ArrayForEach(m, cJSON_GetArrayItem(convs, c)) n_asst +=
                !strcmp(cJSON_GetObjectItem(m, "role")->valuestring, "assistant") &&
                cJSON_GetObjectItem(m, "content")->valuestring[0];
            int32_t last_content = -100;
            for (int32_t j = 0; j < ex->n; j++) {
                if (!ex->mask[j]) continue;
                if (ex->ids[j] == eot) {
                    if (j - last_content > 4) fail_msg("%s: conversation %d: trained end-of-turn at %d without content before it", name, c, j);
                    runs++;
                } else if (!(j + 1 == ex->n && ex->ids[j] == tokenizer_eos_id(t) && !strcmp(name, "Phi-3.5"))) {
                    /* (Phi-3.5 ends with eos 2 tokens after the last <|end|>: axolotl trains it too) */
                    last_content = j;
                }
            }
            if (runs != n_asst) fail_msg("%s: conversation %d: %d trained runs, %d assistant turns", name, c, runs, n_asst);
        }
        dataset_examples_free(&docs);
        if (first_rejected >= 0) { /* the template's own refusal, as a bad line naming file and line */
            fp = fopen(jl, "w");
            cJSON *rec = cJSON_CreateObject();
            cJSON_AddItemToObject(rec, "messages", cJSON_Duplicate(cJSON_GetArrayItem(convs, first_rejected), 1));
            char *line = cJSON_PrintUnformatted(rec);
            fprintf(fp, "%s\n", line);
            free(line);
            cJSON_Delete(rec);
            fclose(fp);
            assert_int_equal(dataset_read_jsonl(t, &sp, 0, &docs, &e), -1);
            assert_non_null(strstr(e.msg, "data.jsonl:1"));
            assert_non_null(strstr(e.msg, name));
        }
        print_message("[chat] %-18s dataset path: %d conversations, ids and labels as expected\n", name, nk);
        tokenizer_free(t);
        tokenizer_free(gt);
        free(src);
        free(shape);
    }
    unlink(tj);
    unlink(tc);
    unlink(jl);
    rmdir(dir);
    cJSON_Delete(names);
    cJSON_Delete(convs);
    free(names_s);
    free(convs_s);
    ref_close(&rf);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_templates_equal_transformers),
                                       cmocka_unit_test(test_dataset_path)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
