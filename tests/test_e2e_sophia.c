/* tests/test_e2e_sophia.c — Sophia on the real model: it trains, logs its win
 * rate and Hessian updates, and its state (m, h, step, Hessian-update count)
 * resumes exactly from a checkpoint.
 *
 * 1. A reference run: 4 steps, Hessian (GNB) update after steps 2 and 4.
 * 2. The same run killed (SIGKILL, QLORA_TEST_CRASH_AT=committed) right after
 *    its first checkpoint (step 3: m and h already hold a Hessian update),
 *    then re-run: it resumes and crosses the step-4 Hessian update.
 * 3. Adapter byte-identical, metrics identical (timings aside), and the step-4
 *    checkpoints hold bit-identical m and h.
 *
 * Env: QLORA_TEST_THREADS (default 1).
 */
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "tests/subproc.h"
#include "trainer/checkpoint.h"

#define MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define HELDOUT "datasets/manpages/heldout.jsonl"

static char g_dir[64], g_cfg[128];

static unsigned char *slurp(const char *path, size_t *n) {
    *n = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)sz + 1);
    *n = fread(b, 1, (size_t)sz, f);
    b[*n] = 0;
    fclose(f);
    return b;
}

/* A few short man pages as training data (the held-out file's first documents). */
static int setup(void **st) {
    (void)st;
    if (access(MODEL, R_OK) || access(HELDOUT, R_OK)) {
        fprintf(stderr, "%s or %s missing: run `make model dataset`\n", MODEL, HELDOUT);
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/qlora-sophia-XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    FILE *in = fopen(HELDOUT, "r");
    char p[256];
    snprintf(p, sizeof p, "%s/train.jsonl", g_dir);
    FILE *out = fopen(p, "w");
    if (!in || !out) return -1;
    static char line[1 << 20];
    for (int k = 0; k < 4 && fgets(line, sizeof line, in); k++) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *t = cJSON_GetObjectItem(j, "text");
        if (!cJSON_IsString(t)) return -1;
        char text[700];
        snprintf(text, sizeof text, "%s", t->valuestring);
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "text", text);
        char *s = cJSON_PrintUnformatted(o);
        fprintf(out, "%s\n", s);
        free(s);
        cJSON_Delete(o);
        cJSON_Delete(j);
    }
    fclose(in);
    fclose(out);
    const char *thr = getenv("QLORA_TEST_THREADS");
    snprintf(g_cfg, sizeof g_cfg, "%s/config.yaml", g_dir);
    out = fopen(g_cfg, "w");
    fprintf(out,
            "base_model: " MODEL "\n"
            "lora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlora_target_modules: [q_proj, v_proj]\n"
            "datasets:\n  - path: %s/train.jsonl\n    type: completion\n"
            "val_set_size: 1\nsequence_len: 64\nmicro_batch_size: 2\ngradient_accumulation_steps: 1\n"
            "max_steps: 4\nlearning_rate: 2e-3\nwarmup_steps: 1\nweight_decay: 0.1\nlr_scheduler: cosine\n"
            "optimizer: sophia\nsophia_k: 2\nsophia_rho: 0.5\n"
            "eval_steps: 0\neval_max_tokens: 64\nsave_steps: 3\nseed: 11\nnum_threads: %s\n",
            g_dir, thr && *thr ? thr : "1");
    fclose(out);
    return 0;
}

static int teardown(void **st) {
    (void)st;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static int run_trainer(const char *out_dir, const char *const *env, char **err) {
    char od[256];
    snprintf(od, sizeof od, "output_dir=%s", out_dir);
    char *argv[] = {(char *)subproc_trainer(), g_cfg, od, NULL};
    return subproc_run(argv, env, 900, err);
}

/* metrics.jsonl without the timing fields (they differ run to run). */
static char *metrics_canonical(const char *dir) {
    char p[256];
    snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
    size_t n = 0;
    char *s = (char *)slurp(p, &n);
    assert_non_null(s);
    char *out = calloc(2 * n + 4096, 1);
    for (char *line = strtok(s, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *j = cJSON_Parse(line);
        assert_non_null(j);
        cJSON_DeleteItemFromObject(j, "tokens_per_sec");
        cJSON_DeleteItemFromObject(j, "train_seconds");
        cJSON_DeleteItemFromObject(j, "sophia_hessian_seconds");
        char *c = cJSON_PrintUnformatted(j);
        strcat(out, c);
        strcat(out, "\n");
        free(c);
        cJSON_Delete(j);
    }
    free(s);
    return out;
}

static void test_sophia_trains_and_resumes_exactly(void **st) {
    (void)st;
    char ref[128], killed[128], *err = NULL;
    snprintf(ref, sizeof ref, "%s/ref", g_dir);
    snprintf(killed, sizeof killed, "%s/killed", g_dir);

    int code = run_trainer(ref, NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[sophia] SophiaG: betas (0.965, 0.99), rho 0.5"));
    assert_non_null(strstr(err, "| win "));
    assert_non_null(strstr(err, "[sophia] 2 Hessian updates in total"));
    free(err);
    char *mr = metrics_canonical(ref);
    assert_non_null(strstr(mr, "\"sophia_win_rate\""));
    assert_non_null(strstr(mr, "\"sophia_hessian_grad_norm\""));

    /* killed right after the step-3 checkpoint is committed, then resumed */
    const char *env[] = {"QLORA_TEST_CRASH_AT=committed", NULL};
    code = run_trainer(killed, env, &err);
    if (code != 128 + SIGKILL) print_error("%s\n", err);
    assert_int_equal(code, 128 + SIGKILL);
    free(err);
    code = run_trainer(killed, NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[checkpoint] resuming from"));
    assert_non_null(strstr(err, "step 3"));
    assert_non_null(strstr(err, "[sophia] 2 Hessian updates in total"));
    free(err);

    char a[256], b[256];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", ref);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", killed);
    size_t na, nb;
    unsigned char *x = slurp(a, &na), *y = slurp(b, &nb);
    assert_non_null(x);
    assert_non_null(y);
    assert_int_equal(na, nb);
    assert_memory_equal(x, y, na);
    free(x);
    free(y);
    char *mk = metrics_canonical(killed);
    if (strcmp(mr, mk)) print_error("metrics differ:\nreference:\n%s\nresumed:\n%s\n", mr, mk);
    assert_string_equal(mr, mk);
    free(mk);
    free(mr);

    /* the saved Sophia state itself */
    ckpt_state s1, s2;
    qerr e;
    snprintf(a, sizeof a, "%s/checkpoint-4", ref);
    snprintf(b, sizeof b, "%s/checkpoint-4", killed);
    assert_int_equal(ckpt_load(a, &s1, &e), 0);
    assert_int_equal(ckpt_load(b, &s2, &e), 0);
    assert_string_equal(s1.optimizer, "sophia");
    assert_string_equal(s2.optimizer, "sophia");
    assert_int_equal(s1.opt_step, 4);
    assert_int_equal(s1.hessian_updates, 2);
    assert_int_equal(s2.hessian_updates, 2);
    assert_int_equal(s1.hessian_interval, 2);
    assert_null(s1.exp_avg_sq);
    assert_true(s1.beta1 == (double)0.965f && s1.beta2 == (double)0.99f && s1.rho == 0.5);
    assert_int_equal(s1.n_params, s2.n_params);
    assert_memory_equal(s1.exp_avg, s2.exp_avg, (size_t)s1.n_params * sizeof(float));
    assert_memory_equal(s1.hessian, s2.hessian, (size_t)s1.n_params * sizeof(float));
    int64_t nz = 0;
    for (int64_t i = 0; i < s1.n_params; i++) nz += s1.hessian[i] != 0.0f;
    assert_true(nz > s1.n_params / 2); /* h really holds an estimate */
    print_message("sophia resume: adapter, metrics, m and h (%lld params, %lld non-zero h) identical\n",
                  (long long)s1.n_params, (long long)nz);
    ckpt_state_free(&s1);
    ckpt_state_free(&s2);

    /* an AdamW config cannot resume Sophia state */
    char od[256];
    snprintf(od, sizeof od, "output_dir=%s", killed);
    char *argv[] = {(char *)subproc_trainer(), g_cfg, od, "optimizer=adamw", "max_steps=5", NULL};
    code = subproc_run(argv, NULL, 900, &err);
    assert_int_equal(code, 1);
    assert_non_null(strstr(err, "holds sophia state but this config says adamw"));
    free(err);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sophia_trains_and_resumes_exactly),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
