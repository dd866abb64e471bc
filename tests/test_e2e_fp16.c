/* tests/test_e2e_fp16.c — axolotl's fp16: true on the real model (SmolLM2-135M, NF4 base): it trains, its
 * GradScaler skips and backs off on overflow with the LR schedule held, and its state resumes exactly.
 *
 * 1. bf16 reference: 1 step; its loss is the yardstick of fp16's first loss (the same adapter, the same rows):
 *    |Δ| ≤ 2e-2 · loss. Both round GEMM operands (bf16: u = 2^-9, fp16: u = 2^-12 relative to fp32; the NF4
 *    dequantized weights are exact in both... up to fp16's range), so their difference is bf16's error,
 *    ≲ 1e-2 relative on the tiny model (test_reference_tiny) and smaller on a mean over ~100 tokens.
 * 2. fp16 reference: 4 steps from QLORA_TEST_LOSS_SCALE = 2^19 (torch's init_scale, raised from 2^16 so
 *    that the first steps overflow in fp16; on these rows steps 1 and 2 overflow, 3 and 4 are taken): the
 *    skipped steps log "fp16 gradient overflow", the scale halves at each one and stays put at a taken step
 *    (growth_interval 2000), the LR of the first taken step equals the first step's (HF Trainer: no
 *    scheduler step after a skipped one), metrics.jsonl carries loss_scale and fp16_skipped_steps.
 * 3. The same run killed (SIGKILL, QLORA_TEST_CRASH_AT=committed) right after its step-2 checkpoint (two
 *    skips in its scaler state), then re-run without the init-scale hook: adapter byte-identical, metrics identical (timings aside), the checkpoint's loss_scale,
 *    scaler_growth_tracker and scaler_skipped equal the reference's. Resuming it with fp16 off is refused.
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

#include "tests/e2e_run.h"
#include "tests/tmpdir.h"
#include "trainer/checkpoint.h"

static char g_dir[64], g_cfg[128];

static int setup(void **st) {
    (void)st;
    return e2e_setup(g_dir, sizeof g_dir, g_cfg, sizeof g_cfg, "qlora-fp16-", 0,
                     "max_steps: 4\nlearning_rate: 2e-3\nwarmup_steps: 2\nlr_scheduler: cosine\n"
                     "eval_steps: 0\neval_max_tokens: 64\nsave_steps: 2\nseed: 5\n");
}

static int teardown(void **st) {
    (void)st;
    return tmpdir_remove(g_dir);
}

static char *metrics_canonical(const char *dir) {
    static const char *const timings[] = {"tokens_per_sec", "train_seconds", NULL};
    return e2e_metrics_canonical(dir, NULL, timings);
}

/* The train records of metrics.jsonl in <dir>: loss, lr, loss_scale (NAN when absent), fp16_skipped_steps. */
static int read_steps(const char *dir, double loss[8], double lr[8], double scale[8], double skipped[8]) {
    char *m = metrics_canonical(dir);
    int n = 0;
    for (char *line = strtok(m, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *o = cJSON_Parse(line);
        assert_non_null(o);
        const cJSON *l = cJSON_GetObjectItemCaseSensitive(o, "loss");
        if (cJSON_IsNumber(l) && n < 8) {
            const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "loss_scale");
            const cJSON *k = cJSON_GetObjectItemCaseSensitive(o, "fp16_skipped_steps");
            loss[n] = l->valuedouble;
            lr[n] = cJSON_GetObjectItemCaseSensitive(o, "lr")->valuedouble;
            scale[n] = cJSON_IsNumber(s) ? s->valuedouble : NAN;
            skipped[n] = cJSON_IsNumber(k) ? k->valuedouble : NAN;
            n++;
        }
        cJSON_Delete(o);
    }
    free(m);
    return n;
}

static void test_fp16_trains_skips_and_resumes_exactly(void **st) {
    (void)st;
    char bf[128], ref[128], killed[128], *err = NULL;
    snprintf(bf, sizeof bf, "%s/bf16", g_dir);
    snprintf(ref, sizeof ref, "%s/ref", g_dir);
    snprintf(killed, sizeof killed, "%s/killed", g_dir);
    double loss[8], lr[8], scale[8], skipped[8], bloss[8], blr[8], bscale[8], bsk[8];

    const char *bf_args[] = {"max_steps=1", NULL};
    int code = e2e_run_trainer(g_cfg, bf, bf_args, NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    free(err);
    assert_int_equal(read_steps(bf, bloss, blr, bscale, bsk), 1);
    assert_true(isnan(bscale[0])); /* bf16: no loss scale in the metrics */

    const char *fp16[] = {"fp16=true", NULL};
    const char *env[] = {"QLORA_TEST_LOSS_SCALE=524288", NULL};
    code = e2e_run_trainer(g_cfg, ref, fp16, env, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "fp16-operand (fp32 accumulate, loss scaling) GEMMs"));
    assert_non_null(strstr(err, "fp16 gradient overflow at loss_scale 524288: update skipped"));
    free(err);
    int n = read_steps(ref, loss, lr, scale, skipped);
    assert_int_equal(n, 4);
    print_message("fp16 first loss %.5f vs bf16 %.5f (|Δ| %.2e, tol %.2e)\n", loss[0], bloss[0],
                  fabs(loss[0] - bloss[0]), 2e-2 * bloss[0]);
    assert_true(fabs(loss[0] - bloss[0]) <= 2e-2 * bloss[0]);
    int taken = 0, first_taken = -1;
    for (int i = 0; i < n; i++) {
        int skip = (int)skipped[i] > (i ? (int)skipped[i - 1] : 0);
        print_message("fp16 step %d: loss %.5f, lr %.4e, loss_scale %g, skipped so far %g%s\n", i + 1, loss[i], lr[i],
                      scale[i], skipped[i], skip ? " (this step)" : "");
        if (i + 1 < n) assert_true(scale[i + 1] == (skip ? scale[i] / 2 : scale[i])); /* backoff; no growth yet */
        if (!skip && first_taken < 0) first_taken = i;
        taken += !skip;
        /* the schedule's index is the number of optimizer steps taken before this one: a skipped step's LR is
         * the next step's too */
        if (skip && i + 1 < n) assert_true(lr[i + 1] == lr[i]);
        if (!skip && i + 1 < n) assert_true(lr[i + 1] != lr[i]);
    }
    assert_true(skipped[0] == 1.0);      /* 2^19 overflows at once */
    assert_true(first_taken > 0 && taken >= 1);
    assert_true(lr[first_taken] == lr[0]); /* held while skipping: the first taken step gets the first LR */

    /* killed right after the step-2 checkpoint is committed, then resumed */
    const char *env_kill[] = {"QLORA_TEST_LOSS_SCALE=524288", "QLORA_TEST_CRASH_AT=committed", NULL};
    code = e2e_run_trainer(g_cfg, killed, fp16, env_kill, &err);
    if (code != 128 + SIGKILL) print_error("%s\n", err);
    assert_int_equal(code, 128 + SIGKILL);
    free(err);
    code = e2e_run_trainer(g_cfg, killed, fp16, NULL, &err); /* the scale comes from the checkpoint now */
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[checkpoint] resuming from"));
    free(err);
    char a[256], b[256];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", ref);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", killed);
    e2e_assert_same_file(a, b);
    char *mr = metrics_canonical(ref), *mk = metrics_canonical(killed);
    if (strcmp(mr, mk)) print_error("metrics differ:\nreference:\n%s\nresumed:\n%s\n", mr, mk);
    assert_string_equal(mr, mk);
    free(mr);
    free(mk);
    ckpt_state s1, s2;
    qerr e;
    snprintf(a, sizeof a, "%s/checkpoint-4", ref);
    snprintf(b, sizeof b, "%s/checkpoint-4", killed);
    assert_int_equal(ckpt_load(a, &s1, &e), 0);
    assert_int_equal(ckpt_load(b, &s2, &e), 0);
    print_message("fp16 resume: adapter and metrics identical; checkpoint-4 loss_scale %g / %g, growth tracker %lld, "
                  "skipped %lld\n", s1.loss_scale, s2.loss_scale, (long long)s1.scaler_growth_tracker,
                  (long long)s1.scaler_skipped);
    assert_true(s1.loss_scale > 0 && s1.loss_scale == s2.loss_scale);
    assert_int_equal(s1.scaler_growth_tracker, s2.scaler_growth_tracker);
    assert_int_equal(s1.scaler_skipped, s2.scaler_skipped);
    assert_int_equal(s1.scaler_skipped, (int64_t)skipped[n - 1]);
    ckpt_state_free(&s1);
    ckpt_state_free(&s2);

    /* resuming it with fp16 off is refused: its schedule does not count the skipped steps */
    const char *more[] = {"max_steps=6", NULL};
    code = e2e_run_trainer(g_cfg, ref, more, NULL, &err);
    assert_int_not_equal(code, 0);
    assert_non_null(strstr(err, "was made with fp16: true (GradScaler skipped 2 steps"));
    free(err);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fp16_trains_skips_and_resumes_exactly),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
