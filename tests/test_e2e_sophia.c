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

#include <cmocka.h>

#include "tests/e2e_run.h"
#include "tests/tmpdir.h"
#include "trainer/checkpoint.h"

static char g_dir[64], g_cfg[128];

/* A few short man pages as training data (the held-out file's first documents). */
static int setup(void **st) {
    (void)st;
    return e2e_setup(g_dir, sizeof g_dir, g_cfg, sizeof g_cfg, "qlora-sophia-", 0,
                     "max_steps: 4\nlearning_rate: 2e-3\nwarmup_steps: 1\nweight_decay: 0.1\nlr_scheduler: cosine\n"
                     "optimizer: sophia\nsophia_k: 2\nsophia_rho: 0.5\n"
                     "eval_steps: 0\neval_max_tokens: 64\nsave_steps: 3\nseed: 11\n");
}

static int teardown(void **st) {
    (void)st;
    return tmpdir_remove(g_dir);
}

static int run_trainer(const char *out_dir, const char *const *env, char **err) {
    return e2e_run_trainer(g_cfg, out_dir, NULL, env, err);
}

/* metrics.jsonl without the timing fields (they differ run to run). */
static char *metrics_canonical(const char *dir) {
    static const char *const timings[] = {"tokens_per_sec", "train_seconds", "sophia_hessian_seconds", NULL};
    return e2e_metrics_canonical(dir, NULL, timings);
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
    e2e_assert_same_file(a, b);
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
    const char *adamw[] = {"optimizer=adamw", "max_steps=5", NULL};
    code = e2e_run_trainer(g_cfg, killed, adamw, NULL, &err);
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
