/* tests/test_e2e_pretrain.c — axolotl's pretraining_dataset end to end
 * (bin/qlora-train as a subprocess, the tiny random model of
 * tests/tiny_model.h): the stream crosses buffers and passes, a run resumed
 * from a mid-run checkpoint ends with a byte-identical adapter and the same
 * losses, and a resume over changed data is refused. */
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

#include "tests/e2e_run.h"
#include "tests/tiny_model.h"
#include "tests/tmpdir.h"

#define MAX_STEPS 6

static char g_dir[64], g_cfg[160], g_data[160];

/* 5 man pages cut to 100 bytes as {"body": ...} records, the tiny model, and a config streaming them. */
static int setup(void **st) {
    (void)st;
    if (access(E2E_HELDOUT, R_OK)) {
        fprintf(stderr, "%s missing: run `make dataset`\n", E2E_HELDOUT);
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/qlora-pretrain-XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    char model[160];
    snprintf(model, sizeof model, "%s/tiny.gguf", g_dir);
    if (tiny_model_write(model, 11)) return -1;
    snprintf(g_data, sizeof g_data, "%s/pt.jsonl", g_dir);
    FILE *in = fopen(E2E_HELDOUT, "r"), *out = fopen(g_data, "w");
    if (!in || !out) return -1;
    static char line[1 << 20];
    for (int k = 0; k < 5 && fgets(line, sizeof line, in); k++) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *t = cJSON_GetObjectItem(j, "text");
        if (!cJSON_IsString(t)) return -1;
        char text[101];
        snprintf(text, sizeof text, "%s", t->valuestring);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "body", text);
        char *s = cJSON_PrintUnformatted(o);
        fprintf(out, "%s\n", s);
        free(s);
        cJSON_Delete(o);
        cJSON_Delete(j);
    }
    fclose(in);
    fclose(out);
    snprintf(g_cfg, sizeof g_cfg, "%s/config.yaml", g_dir);
    out = fopen(g_cfg, "w");
    if (!out) return -1;
    fprintf(out,
            "base_model: %s\nadapter: qlora\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlora_target_linear: true\n"
            "pretraining_dataset:\n  - path: %s\n    name: en\n    text_column: body\n    type: pretrain\n"
            "streaming_multipack_buffer_size: 3\nsequence_len: 64\nsample_packing: true\nmicro_batch_size: 2\n"
            "gradient_accumulation_steps: 2\nmax_steps: %d\nlearning_rate: 2e-3\nwarmup_steps: 1\n"
            "save_steps: 2\nseed: 5\nnum_threads: 1\n",
            model, g_data, MAX_STEPS);
    fclose(out);
    return 0;
}

static int teardown(void **st) {
    (void)st;
    return tmpdir_remove(g_dir);
}

static char *canon(const char *dir) {
    static const char *const keep[] = {"step", "loss", "lr", "grad_norm", "epoch", NULL};
    return e2e_metrics_canonical(dir, keep, NULL);
}

static void test_resume_exact(void **st) {
    (void)st;
    char a[200], b[200], c[200], cmd[1200];
    snprintf(a, sizeof a, "%s/a", g_dir);
    snprintf(b, sizeof b, "%s/b", g_dir);
    snprintf(c, sizeof c, "%s/c", g_dir);
    char *err = NULL;
    int rc = e2e_run_trainer(g_cfg, a, NULL, NULL, &err);
    if (rc) print_error("%s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(err, "[data] train: streamed from"));
    free(err);
    /* the file gives fewer rows than 6 steps x 4 rows: the stream starts a second pass (checked below) */
    char *ca = canon(a);
    print_message("%s", ca);
    /* resume from checkpoint-2 in another output_dir: the stream is read again up to row 8 */
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp -r '%s/checkpoint-2' '%s/'", b, a, b);
    assert_int_equal(system(cmd), 0);
    rc = e2e_run_trainer(g_cfg, b, NULL, NULL, &err);
    if (rc) print_error("%s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(err, "[data] resumed the stream at row 8"));
    free(err);
    char pa[256], pb[256];
    snprintf(pa, sizeof pa, "%s/adapter_model.safetensors", a);
    snprintf(pb, sizeof pb, "%s/adapter_model.safetensors", b);
    e2e_assert_same_file(pa, pb);
    char *cb = canon(b);
    /* b's metrics hold steps 3..6; they are a's last four lines */
    const char *tail = strstr(ca, "{\"step\":3,");
    assert_non_null(tail);
    assert_string_equal(strstr(cb, "{\"step\":3,"), tail);
    free(ca);
    free(cb);
    /* resume from checkpoint-4 (row 16): the replay crosses the end of the file into the second pass */
    char d[200];
    snprintf(d, sizeof d, "%s/d", g_dir);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp -r '%s/checkpoint-4' '%s/'", d, a, d);
    assert_int_equal(system(cmd), 0);
    rc = e2e_run_trainer(g_cfg, d, NULL, NULL, &err);
    if (rc) print_error("%s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(err, "[data] resumed the stream at row 16 (pass 1;"));
    free(err);
    snprintf(pb, sizeof pb, "%s/adapter_model.safetensors", d);
    e2e_assert_same_file(pa, pb);
    /* changed data: the rows the checkpoint consumed are not what the stream gives now */
    snprintf(cmd, sizeof cmd,
             "mkdir -p '%s' && cp -r '%s/checkpoint-2' '%s/' && sed -i '1s/a/A/g' '%s'", c, a, c, g_data);
    assert_int_equal(system(cmd), 0);
    rc = e2e_run_trainer(g_cfg, c, NULL, NULL, &err);
    assert_int_not_equal(rc, 0);
    print_message("%s", err);
    assert_non_null(strstr(err, "are not what the stream gives now"));
    free(err);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_exact),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
