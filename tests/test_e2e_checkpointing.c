/* tests/test_e2e_checkpointing.c — the checkpointing modes on the real model: the same
 * config trained 2 steps with gradient_checkpointing false, selective, true and offload (LoRA on all
 * 7 linears; e2e_setup's lora_dropout 0.1, so recomputation must regenerate the dropout masks) gives the
 * same metrics.jsonl (timings aside) and a byte-identical adapter. Recomputation runs the same
 * kernels on the same inputs (model/llama.h LLAMA_CKPT_*), so nothing may differ; the [memory]
 * line names the mode.
 *
 * Env: QLORA_TEST_THREADS (default 1).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/e2e_run.h"
#include "tests/tmpdir.h"

static char g_dir[64], g_cfg[128];

static int setup(void **st) {
    (void)st;
    return e2e_setup(g_dir, sizeof g_dir, g_cfg, sizeof g_cfg, "qlora-ckptmodes-", 0,
                     "max_steps: 2\nlearning_rate: 1e-3\nlora_target_linear: true\n"
                     "eval_steps: 0\neval_max_tokens: 64\nseed: 5\n");
}

static int teardown(void **st) {
    (void)st;
    return tmpdir_remove(g_dir);
}

static void test_modes_agree(void **st) {
    (void)st;
    /* offload: on the CPU backend nothing is offloaded, one [config] line says so (autograd/tensor.h
     * ag_checkpoint_offload; tests/test_offload.c proves the device path on cpu-fenced) */
    static const char *const modes[] = {"false", "selective", "true", "offload"};
    static const char *const memline[] = {"activations", "(selective recomputation)", "(gradient checkpointing)",
                                          "(gradient checkpointing)"};
    static const char *const timings[] = {"tokens_per_sec", "train_seconds", NULL};
    char *ref = NULL, refdir[128];
    for (int i = 0; i < 4; i++) {
        char out[128], arg[64], *err = NULL;
        snprintf(out, sizeof out, "%s/%s", g_dir, modes[i]);
        snprintf(arg, sizeof arg, "gradient_checkpointing=%s", modes[i]);
        const char *const extra[] = {arg, NULL};
        int code = e2e_run_trainer(g_cfg, out, extra, NULL, &err);
        if (code) print_error("%s\n", err);
        assert_int_equal(code, 0);
        const char *mem = strstr(err, "[memory] predicted peak");
        assert_non_null(mem);
        assert_non_null(strstr(mem, memline[i]));
        const char *note = strstr(err, "[config] gradient_checkpointing: offload: the cpu backend keeps every "
                                       "activation in host memory already");
        if (i == 3) {
            assert_non_null(note);
            assert_null(strstr(note + 1, "[config] gradient_checkpointing: offload")); /* one line */
        } else {
            assert_null(note);
        }
        free(err);
        char *m = e2e_metrics_canonical(out, NULL, timings);
        assert_non_null(strstr(m, "\"loss\""));
        if (i == 0) {
            ref = m;
            snprintf(refdir, sizeof refdir, "%s", out);
            continue;
        }
        if (strcmp(ref, m)) print_error("metrics differ:\nfalse:\n%s\n%s:\n%s\n", ref, modes[i], m);
        assert_string_equal(ref, m);
        free(m);
        char a[256], b[256];
        snprintf(a, sizeof a, "%s/adapter_model.safetensors", refdir);
        snprintf(b, sizeof b, "%s/adapter_model.safetensors", out);
        e2e_assert_same_file(a, b);
        print_message("gradient_checkpointing %s: metrics and adapter identical to false\n", modes[i]);
    }
    free(ref);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_modes_agree)};
    return cmocka_run_group_tests_name("e2e_checkpointing", tests, setup, teardown);
}
