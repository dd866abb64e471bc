/* tests/test_stream.c — data/stream: axolotl's pretraining_dataset windows and
 * packing against axolotl's own code (tests/fixtures/ref_pretrain.json.gz,
 * scripts/make_pretrain_fixture.py), and the stream: lazy buffers, passes,
 * determinism, replay.
 *
 * Uses the real SmolLM2 tokenizer (models/SmolLM2-135M-Instruct.Q4_1.gguf,
 * `make model`).
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

#include "data/stream.h"
#include "format/gguf.h"
#include "tests/ref_fixture.h"

#define MODEL_PATH "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define FIXTURE "tests/fixtures/ref_pretrain.json.gz"

typedef struct fixture {
    tokenizer *tok;
    cJSON *ref;
    char dir[64];
} fixture;


static int setup(void **state) {
    fixture *fx = calloc(1, sizeof *fx);
    if (!fx) return -1;
    snprintf(fx->dir, sizeof fx->dir, "/tmp/qlora_st_XXXXXX");
    if (!mkdtemp(fx->dir)) {
        free(fx);
        return -1;
    }
    *state = fx;
    fx->ref = ref_read_gz_json(FIXTURE);
    if (access(MODEL_PATH, R_OK) != 0) return 0;
    gguf_file *f = NULL;
    qerr e = {{0}};
    if (gguf_open(MODEL_PATH, &f, &e) || tokenizer_load_gguf(f, &fx->tok, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        fx->tok = NULL;
    }
    gguf_close(f);
    return 0;
}

static int teardown(void **state) {
    fixture *fx = *state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx->dir);
    int rc = system(cmd);
    (void)rc;
    tokenizer_free(fx->tok);
    cJSON_Delete(fx->ref);
    free(fx);
    return 0;
}

static fixture *need(void **state) {
    fixture *fx = *state;
    if (!fx->tok) fail_msg("%s is missing or unreadable: run `make model` first", MODEL_PATH);
    if (!fx->ref) fail_msg("%s is missing or unreadable", FIXTURE);
    return fx;
}

/* Windows of every text and the packed rows for a given order equal axolotl's. */
static void test_windows_and_rows_match_axolotl(void **state) {
    fixture *fx = need(state);
    const cJSON *texts = cJSON_GetObjectItem(fx->ref, "texts"), *c;
    int32_t pad = (int32_t)cJSON_GetObjectItem(fx->ref, "pad")->valueint;
    int n_cases = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(fx->ref, "cases")) {
        int L = cJSON_GetObjectItem(c, "sequence_len")->valueint;
        dataset_examples all = {0};
        qerr e = {{0}};
        int ti = 0;
        const cJSON *per = cJSON_GetObjectItem(c, "windows_per_text");
        for (const cJSON *t = texts->child; t; t = t->next, ti++) {
            dataset_examples w = {0};
            assert_int_equal(pretrain_windows(fx->tok, t->valuestring, strlen(t->valuestring), L, &w, &e), 0);
            const cJSON *want = cJSON_GetArrayItem(per, ti);
            assert_int_equal(w.n, cJSON_GetArraySize(want));
            for (int64_t k = 0; k < w.n; k++) {
                const cJSON *ids = cJSON_GetArrayItem(want, (int)k);
                assert_int_equal(w.v[k].n, cJSON_GetArraySize(ids));
                for (int j = 0; j < w.v[k].n; j++)
                    assert_int_equal(w.v[k].ids[j], cJSON_GetArrayItem(ids, j)->valueint);
            }
            assert_int_equal(pretrain_windows(fx->tok, t->valuestring, strlen(t->valuestring), L, &all, &e), 0);
            dataset_examples_free(&w);
        }
        const cJSON *ord = cJSON_GetObjectItem(c, "order");
        int64_t *order = malloc(sizeof(int64_t) * (size_t)(all.n + 1));
        assert_int_equal(cJSON_GetArraySize(ord), all.n);
        for (int64_t k = 0; k < all.n; k++) order[k] = cJSON_GetArrayItem(ord, (int)k)->valueint;
        packed_set ps;
        assert_int_equal(pretrain_pack(&all, order, L, 200, pad, &ps, &e), 0);
        const cJSON *rows = cJSON_GetObjectItem(c, "rows");
        assert_int_equal(ps.n_rows, cJSON_GetArraySize(rows));
        int64_t n_tgt = 0;
        for (int64_t r = 0; r < ps.n_rows; r++) {
            const cJSON *row = cJSON_GetArrayItem(rows, (int)r);
            const cJSON *ids = cJSON_GetObjectItem(row, "input_ids"), *lab = cJSON_GetObjectItem(row, "labels");
            const cJSON *pos = cJSON_GetObjectItem(row, "position_ids");
            int filled = cJSON_GetObjectItem(row, "n")->valueint;
            for (int t = 0; t < L; t++) {
                size_t i = (size_t)r * L + (size_t)t;
                assert_int_equal(ps.input_ids[i], cJSON_GetArrayItem(ids, t)->valueint);
                assert_int_equal(ps.position_ids[i], cJSON_GetArrayItem(pos, t)->valueint);
                /* HF's loss: the label of position t is labels[t + 1] (the last position has none) */
                int want = t + 1 < L ? cJSON_GetArrayItem(lab, t + 1)->valueint : -100;
                assert_int_equal(ps.targets[i], want);
                n_tgt += want != -100;
                /* a window starts where the position restarts; padding is seq -1 */
                if (t >= filled) assert_int_equal(ps.seq_ids[i], -1);
                else if (t > 0) assert_int_equal(ps.seq_ids[i] != ps.seq_ids[i - 1], ps.position_ids[i] == 0);
            }
        }
        assert_int_equal(ps.n_target_tokens, n_tgt);
        print_message("[stream] sequence_len %d: %lld windows -> %lld rows, as axolotl's\n", L, (long long)all.n,
                      (long long)ps.n_rows);
        packed_set_free(&ps);
        free(order);
        dataset_examples_free(&all);
        n_cases++;
    }
    assert_int_equal(n_cases, 2);
}

/* Write the fixture's texts `reps` times as JSON lines (plus blank lines) to dir/name. */
static void write_texts(const fixture *fx, const char *name, int reps, char *path, size_t n) {
    snprintf(path, n, "%s/%s", fx->dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (int r = 0; r < reps; r++) {
        const cJSON *t;
        cJSON_ArrayForEach(t, cJSON_GetObjectItem(fx->ref, "texts")) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "body", t->valuestring);
            cJSON_AddNumberToObject(o, "rep", r);
            char *s = cJSON_PrintUnformatted(o);
            fprintf(f, "%s\n%s", s, r == 1 ? "\n" : "");
            free(s);
            cJSON_Delete(o);
        }
    }
    fclose(f);
}

/* The stream: deterministic, passes restart, every row a packed row of the buffer, a replay of n rows
 * gives the same fingerprint, skip drops records, errors name file and line. */
static void test_stream(void **state) {
    fixture *fx = need(state);
    char path[256];
    write_texts(fx, "p.jsonl", 3, path, sizeof path);
    pretrain_spec sp = {path, "body", 0};
    pretrain_stream *a, *b;
    qerr e = {{0}};
    assert_int_equal(pretrain_stream_open(fx->tok, &sp, 32, 4, 200, 7, &a, &e), 0);
    assert_int_equal(pretrain_stream_open(fx->tok, &sp, 32, 4, 200, 7, &b, &e), 0);
    packed_set pa = {0}, pb = {0}, pc = {0};
    /* a draws 3 rows at a time, b 1 at a time: the same rows */
    for (int step = 0; step < 30; step++) {
        assert_int_equal(pretrain_stream_next(a, 3, &pa, &e), 0);
        for (int i = 0; i < 3; i++) {
            assert_int_equal(pretrain_stream_next(b, 1, &pb, &e), 0);
            assert_memory_equal(pb.input_ids, pa.input_ids + i * 32, 32 * 4);
            assert_memory_equal(pb.targets, pa.targets + i * 32, 32 * 4);
            assert_memory_equal(pb.seq_ids, pa.seq_ids + i * 32, 32 * 4);
        }
        assert_true(pa.n_target_tokens > 0);
    }
    assert_int_equal(pretrain_stream_rows(a), 90);
    assert_true(pretrain_stream_epoch(a) >= 1); /* the file gives about 57 rows a pass */
    assert_true(pretrain_stream_fingerprint(a) == pretrain_stream_fingerprint(b));
    pretrain_stream_close(b);
    /* another seed: other rows */
    assert_int_equal(pretrain_stream_open(fx->tok, &sp, 32, 4, 200, 8, &b, &e), 0);
    assert_int_equal(pretrain_stream_next(b, 90, &pc, &e), 0);
    assert_true(pretrain_stream_fingerprint(a) != pretrain_stream_fingerprint(b));
    pretrain_stream_close(b);
    packed_set_free(&pc);
    /* a replay of the first 90 rows in one call: the same fingerprint */
    assert_int_equal(pretrain_stream_open(fx->tok, &sp, 32, 4, 200, 7, &b, &e), 0);
    assert_int_equal(pretrain_stream_next(b, 90, &pc, &e), 0);
    assert_true(pretrain_stream_fingerprint(a) == pretrain_stream_fingerprint(b));
    pretrain_stream_close(b);
    packed_set_free(&pc);
    /* one pass gives every window of the file exactly once: count the tokens of pass 0 */
    assert_int_equal(pretrain_stream_open(fx->tok, &sp, 32, 4, 200, 7, &b, &e), 0);
    int64_t tokens = 0, rows = 0;
    while (pretrain_stream_epoch(b) == 0) {
        assert_int_equal(pretrain_stream_next(b, 1, &pb, &e), 0);
        if (pretrain_stream_epoch(b) != 0) break;
        for (int t = 0; t < 32; t++) tokens += pb.seq_ids[t] >= 0;
        rows++;
    }
    dataset_examples w = {0};
    const cJSON *t;
    for (int r = 0; r < 3; r++)
        cJSON_ArrayForEach(t, cJSON_GetObjectItem(fx->ref, "texts"))
            assert_int_equal(pretrain_windows(fx->tok, t->valuestring, strlen(t->valuestring), 32, &w, &e), 0);
    int64_t want = 0;
    for (int64_t k = 0; k < w.n; k++) want += w.v[k].n;
    assert_int_equal(tokens, want);
    print_message("[stream] one pass: %lld rows, %lld tokens in %lld windows\n", (long long)rows, (long long)tokens,
                  (long long)w.n);
    dataset_examples_free(&w);
    pretrain_stream_close(b);
    /* skip: the first 10 records (one repetition of the texts) dropped from every pass */
    pretrain_spec sk = {path, "body", 10};
    assert_int_equal(pretrain_stream_open(fx->tok, &sk, 32, 4, 200, 7, &b, &e), 0);
    tokens = 0;
    while (1) {
        assert_int_equal(pretrain_stream_next(b, 1, &pb, &e), 0);
        if (pretrain_stream_epoch(b) != 0) break;
        for (int k = 0; k < 32; k++) tokens += pb.seq_ids[k] >= 0;
    }
    assert_int_equal(tokens, want * 2 / 3);
    pretrain_stream_close(b);
    pretrain_stream_close(a);
    packed_set_free(&pa);
    packed_set_free(&pb);

    /* errors: a bad line names file and line; a file without rows; a missing file */
    char bad[256];
    snprintf(bad, sizeof bad, "%s/bad.jsonl", fx->dir);
    FILE *f = fopen(bad, "w");
    fputs("{\"body\": \"fine\"}\n{\"body\": 3}\n", f);
    fclose(f);
    pretrain_spec sb = {bad, "body", 0};
    assert_int_equal(pretrain_stream_open(fx->tok, &sb, 32, 4, 200, 7, &b, &e), 0);
    assert_int_equal(pretrain_stream_next(b, 1, &pb, &e), -1);
    assert_non_null(strstr(e.msg, "bad.jsonl:2: \"body\" is missing or not a string"));
    pretrain_stream_close(b);
    packed_set_free(&pb);
    f = fopen(bad, "w");
    fputs("{\"body\": \"\"}\n\n", f);
    fclose(f);
    assert_int_equal(pretrain_stream_open(fx->tok, &sb, 32, 4, 200, 7, &b, &e), 0);
    assert_int_equal(pretrain_stream_next(b, 1, &pb, &e), -1);
    assert_non_null(strstr(e.msg, "gives no training row"));
    pretrain_stream_close(b);
    packed_set_free(&pb);
    pretrain_spec sm = {"/nonexistent/x.jsonl", NULL, 0};
    assert_int_equal(pretrain_stream_open(fx->tok, &sm, 32, 4, 200, 7, &b, &e), -1);
    assert_non_null(strstr(e.msg, "cannot open /nonexistent/x.jsonl"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_windows_and_rows_match_axolotl),
        cmocka_unit_test(test_stream),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
