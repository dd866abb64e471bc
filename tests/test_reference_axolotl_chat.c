/* tests/test_reference_axolotl_chat.c — axolotl's named chat templates and its
 * label masks, against axolotl's own code.
 *
 * Fixture tests/fixtures/ref_axolotl_chat.qref.gz
 * (scripts/make_axolotl_chat_fixtures.py, axolotl 0.19.0's sdist):
 *  - for axolotl's templates of the families qlora runs (chatml, qwen_25,
 *    llama3, llama3_2_vision, mistral_v1, mistral_v2v3, mistral_v3_tekken,
 *    phi_3, phi_35): the .jinja text and, for 14 conversations x
 *    add_generation_prompt, transformers' apply_chat_template string and ids
 *    (or the template's rejection);
 *  - for those and the models' own templates qlora renders: the input_ids and
 *    labels axolotl's ChatTemplateStrategy gives for 17 records (the
 *    conversations, a record's top-level "system" field, two leading system
 *    messages) under 11 settings of roles_to_train / train_on_eos /
 *    train_on_eot / eot_tokens / train_on_inputs / drop_system_message.
 * Checked: every accepted name resolves to the template its text hashes to;
 * chat_render gives the string byte for byte and tokenizer_encode the ids; a
 * rejected conversation is refused; dataset_read_jsonl (chat_template: <name>,
 * or jinja + chat_template_jinja for the models' texts) gives the same ids and
 * the same trained tokens as axolotl; llama3_2_vision is refused by name.
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

#include "core/strbuf.h"
#include "data/chat.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "format/gguf.h"
#include "tests/ref_fixture.h"

#define FIXTURE "tests/fixtures/ref_axolotl_chat.qref.gz"
#define FIXTURE_GEMMA3 "tests/fixtures/ref_axolotl_chat_gemma3.qref.gz"
#define GEMMA3_GGUF "models/gemma-3-270m-q4_k_m.gguf"

/* The vocabulary of a fixture's shape: models/vocab's, or the real Gemma 3 270M's ("gemma3"). */
static tokenizer *load_vocab(const char *shape) {
    char p[256];
    if (!strcmp(shape, "gemma3")) snprintf(p, sizeof p, GEMMA3_GGUF);
    else snprintf(p, sizeof p, "models/vocab/ggml-vocab-%s.gguf", shape);
    gguf_file *g;
    tokenizer *t;
    qerr e = {{0}};
    if (gguf_open(p, &g, &e) || tokenizer_load_gguf(g, &t, &e)) fail_msg("%s", e.msg);
    gguf_close(g);
    return t;
}

static int load_conv(cJSON *conv, chat_message *m, int cap) {
    int nm = cJSON_GetArraySize(conv);
    assert_true(nm <= cap);
    for (int k = 0; k < nm; k++) {
        cJSON *it = cJSON_GetArrayItem(conv, k);
        m[k].role = cJSON_GetObjectItem(it, "role")->valuestring;
        m[k].content = cJSON_GetObjectItem(it, "content")->valuestring;
    }
    return nm;
}

/* Rendering: axolotl's named templates against apply_chat_template. */
static void check_render(const char *name, const chat_template *ct, tokenizer *t, cJSON *convs, cJSON *rend,
                         int *n_ok, int *n_rej) {
    int nconv = cJSON_GetArraySize(convs);
    qerr e = {{0}};
    for (int c = 0; c < nconv; c++) {
        chat_message m[16];
        int nm = load_conv(cJSON_GetArrayItem(convs, c), m, 16);
        for (int gen = 0; gen < 2; gen++) {
            cJSON *want = cJSON_GetArrayItem(rend, 2 * c + gen);
            strbuf b = {0};
            int rc = chat_render(ct, t, m, nm, gen, &b, NULL, &e);
            if (cJSON_GetObjectItem(want, "error")) {
                if (rc == 0) fail_msg("%s: conversation %d (gen %d): axolotl's template rejects it, qlora rendered \"%s\"",
                                      name, c, gen, b.p ? b.p : "");
                (*n_rej)++;
                free(b.p);
                continue;
            }
            if (rc) fail_msg("%s: conversation %d: %s", name, c, e.msg);
            const char *ws = cJSON_GetObjectItem(want, "text")->valuestring;
            if (strcmp(b.p ? b.p : "", ws))
                fail_msg("%s: conversation %d (gen %d):\n  transformers \"%s\"\n  qlora        \"%s\"", name, c, gen, ws,
                         b.p ? b.p : "");
            tokenizer_ids got = {0};
            if (tokenizer_encode_offsets(t, b.p ? b.p : "", b.n, 1, 0, &got, &e)) fail_msg("%s", e.msg);
            cJSON *wi = cJSON_GetObjectItem(want, "ids");
            if ((int)got.n != cJSON_GetArraySize(wi)) fail_msg("%s: conversation %d: %zu ids, transformers %d", name, c, got.n, cJSON_GetArraySize(wi));
            for (size_t i = 0; i < got.n; i++)
                if (got.ids[i] != cJSON_GetArrayItem(wi, (int)i)->valueint) fail_msg("%s: conversation %d: id %zu differs", name, c, i);
            tokenizer_ids_free(&got);
            free(b.p);
            (*n_ok)++;
        }
    }
}

/* Labels: dataset_read_jsonl against axolotl's ChatTemplateStrategy, per setting and record. A record
 * axolotl's template rejects is refused; with the Mistral templates, training a leading system message
 * (which axolotl finds or not depending on the model's name) is refused by design and counted. */
static void check_masks(const char *name, const char *kind, const char *src, const chat_template *ct, tokenizer *t,
                        cJSON *records, cJSON *settings, cJSON *masks, int *n_ok, int *n_refused) {
    char jl[] = "/tmp/qlora_axochat_XXXXXX.jsonl";
    int fd = mkstemps(jl, 6);
    assert_true(fd >= 0);
    close(fd);
    cJSON *mk;
    cJSON_ArrayForEach(mk, masks) {
        int s = cJSON_GetObjectItem(mk, "setting")->valueint, c = cJSON_GetObjectItem(mk, "rec")->valueint;
        cJSON *st = cJSON_GetArrayItem(settings, s);
        FILE *fp = fopen(jl, "w");
        assert_non_null(fp);
        char *line = cJSON_PrintUnformatted(cJSON_GetArrayItem(records, c));
        fprintf(fp, "%s\n", line);
        free(line);
        fclose(fp);
        cJSON *rl = cJSON_GetObjectItem(st, "roles_to_train");
        char *roles[8];
        int nr = cJSON_GetArraySize(rl);
        for (int i = 0; i < nr; i++) roles[i] = cJSON_GetArrayItem(rl, i)->valuestring;
        char *eot[1] = {(char *)chat_template_eot(ct, t)};
        int has_eot = !cJSON_IsNull(cJSON_GetObjectItem(st, "eot_tokens")); /* "T": the template's end-of-turn token */
        cJSON *teot = cJSON_GetObjectItem(st, "train_on_eot");
        dataset_spec sp = {.path = jl, .type = "chat_template", .roles_to_train = roles, .n_roles_to_train = nr,
                           .train_on_eos = cJSON_GetObjectItem(st, "train_on_eos")->valuestring,
                           .train_on_eot = cJSON_IsString(teot) ? teot->valuestring : NULL,
                           .drop_system_message = cJSON_IsTrue(cJSON_GetObjectItem(st, "drop_system_message")),
                           .eot_tokens = has_eot ? eot : NULL, .n_eot_tokens = has_eot ? 1 : 0};
        if (!strcmp(kind, "axolotl")) {
            sp.chat_template = name;
        } else {
            sp.chat_template = "jinja";
            sp.chat_template_jinja = src;
        }
        dataset_examples docs = {0};
        qerr e = {{0}};
        int tin = cJSON_IsTrue(cJSON_GetObjectItem(st, "train_on_inputs"));
        int rc = dataset_read_jsonl(t, &sp, tin, &docs, &e);
        if (cJSON_GetObjectItem(mk, "error")) {
            if (rc == 0) fail_msg("%s setting %d record %d: axolotl rejects it, qlora took it", name, s, c);
            continue;
        }
        if (rc && chat_template_system_in_user_turn(ct) && strstr(e.msg, "inside a user turn")) {
            (*n_refused)++;
            continue;
        }
        if (rc) fail_msg("%s setting %d record %d: %s", name, s, c, e.msg);
        assert_int_equal(docs.n, 1);
        const dataset_example *ex = &docs.v[0];
        cJSON *ids = cJSON_GetObjectItem(mk, "ids"), *lab = cJSON_GetObjectItem(mk, "labels");
        if (ex->n != cJSON_GetArraySize(ids))
            fail_msg("%s setting %d record %d: %d ids, axolotl %d", name, s, c, ex->n, cJSON_GetArraySize(ids));
        for (int i = 0; i < ex->n; i++) {
            if (ex->ids[i] != cJSON_GetArrayItem(ids, i)->valueint)
                fail_msg("%s setting %d record %d: id %d differs", name, s, c, i);
            int lw = cJSON_GetArrayItem(lab, i)->valueint != -100;
            if (lw != ex->mask[i]) {
                char *d = NULL;
                size_t dl = 0;
                tokenizer_decode(t, &ex->ids[i], 1, &d, &dl, &e);
                fail_msg("%s setting %d record %d: token %d (\"%s\") is %s by axolotl, %s by qlora", name, s, c, i,
                         d ? d : "?", lw ? "trained" : "not trained", ex->mask[i] ? "trained" : "not trained");
            }
        }
        (*n_ok)++;
        dataset_examples_free(&docs);
    }
    unlink(jl);
}

/* Every case of one fixture: rendering against apply_chat_template, labels against axolotl's. */
static void check_fixture(const char *fixture) {
    ref_file rf;
    ref_open_or_fail(fixture, &rf);
    char *cs_s = ref_str(&rf, "cases"), *cv_s = ref_str(&rf, "conversations"), *st_s = ref_str(&rf, "settings");
    char *rc_s = ref_str(&rf, "records");
    cJSON *cases = cJSON_Parse(cs_s), *convs = cJSON_Parse(cv_s), *settings = cJSON_Parse(st_s);
    cJSON *records = cJSON_Parse(rc_s);
    free(cs_s);
    free(cv_s);
    free(st_s);
    free(rc_s);
    assert_non_null(records);
    assert_non_null(cases);
    assert_non_null(convs);
    assert_non_null(settings);
    int n_render = 0, n_rej = 0, n_masks = 0, n_refused = 0;
    for (int i = 0; i < cJSON_GetArraySize(cases); i++) {
        cJSON *cs = cJSON_GetArrayItem(cases, i);
        const char *name = cJSON_GetObjectItem(cs, "name")->valuestring;
        const char *kind = cJSON_GetObjectItem(cs, "kind")->valuestring;
        const char *shape = cJSON_GetObjectItem(cs, "shape")->valuestring;
        char key[64];
        snprintf(key, sizeof key, "c%d/source", i);
        char *src = ref_str(&rf, key);
        const chat_template *ct = NULL, *by_name = NULL;
        qerr e = {{0}};
        int found = chat_template_find(src, &ct, &e);
        if (!strcmp(name, "llama3_2_vision")) { /* refused: the day's date in the header */
            assert_int_equal(found, -1);
            assert_int_equal(chat_template_named(name, &by_name, &e), -1);
            assert_non_null(strstr(e.msg, "date"));
            print_message("%-18s refused: %s\n", name, e.msg);
            free(src);
            continue;
        }
        if (found) fail_msg("%s: %s", name, e.msg);
        if (!strcmp(kind, "axolotl")) {
            if (chat_template_named(name, &by_name, &e)) fail_msg("%s: %s", name, e.msg);
            assert_ptr_equal(by_name, ct);
        }
        tokenizer *t = load_vocab(shape);
        int r0 = n_render, m0 = n_masks;
        if (!strcmp(kind, "axolotl")) {
            snprintf(key, sizeof key, "c%d/render", i);
            char *rs = ref_str(&rf, key);
            cJSON *rend = cJSON_Parse(rs);
            free(rs);
            check_render(name, ct, t, convs, rend, &n_render, &n_rej);
            cJSON_Delete(rend);
        }
        snprintf(key, sizeof key, "c%d/masks", i);
        char *ms = ref_str(&rf, key);
        cJSON *masks = cJSON_Parse(ms);
        free(ms);
        check_masks(name, kind, src, ct, t, records, settings, masks, &n_masks, &n_refused);
        cJSON_Delete(masks);
        print_message("%-7s %-18s (%s, rendered as %s): %d renderings, %d label sets as axolotl's\n", kind, name, shape,
                      chat_template_name(ct), n_render - r0, n_masks - m0);
        tokenizer_free(t);
        free(src);
    }
    print_message("axolotl chat: %d renderings equal (%d rejections), %d label sets equal, %d refused (a Mistral "
                  "system turn)\n", n_render, n_rej, n_masks, n_refused);
    cJSON_Delete(cases);
    cJSON_Delete(convs);
    cJSON_Delete(settings);
    cJSON_Delete(records);
    ref_close(&rf);
}

static void test_axolotl_templates_and_labels(void **state) {
    (void)state;
    if (access("models/vocab/ggml-vocab-llama-spm.gguf", R_OK) != 0) {
        printf("SKIPPED: models/vocab is missing (run scripts/fetch_vocab.sh)\n");
        skip();
    }
    check_fixture(FIXTURE);
}

/* axolotl's gemma3 with the real Gemma 3 tokenizer (tests/fixtures/ref_axolotl_chat_gemma3.qref.gz,
 * scripts/make_axolotl_chat_fixtures.py --gemma3: transformers' apply_chat_template over the GGUF's
 * vocabulary, ids also equal to llama.cpp's): system messages folded into the first user turn,
 * multi-turn, alternation rejections, every label setting. */
static void test_axolotl_gemma3(void **state) {
    (void)state;
    if (access(GEMMA3_GGUF, R_OK) != 0) {
        printf("SKIPPED: " GEMMA3_GGUF " is missing (make gemma3-model)\n");
        skip();
    }
    check_fixture(FIXTURE_GEMMA3);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_axolotl_templates_and_labels),
        cmocka_unit_test(test_axolotl_gemma3),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
