/* tests/test_offload_e2e.c — gradient_checkpointing: offload through the whole trainer on the
 * `cpu-fenced` backend (QLORA_BACKEND=cpu-fenced, device: cpu keeps it): data memory the host cannot
 * read, offload copies run at the latest moment a device's copy stream may (autograd/backend_fenced.c).
 * The tiny random Llama (tests/tiny_model.h) with 6 blocks, packed rows, LoRA dropout 0.1, gradient accumulation 2
 * (the arena reset between micro-batches, the host buffers reused), an evaluation and a checkpoint:
 * `true` and `offload` write the same metrics (timings aside) and the same adapter bytes, and the
 * [config] line says the block inputs go to pinned host memory. tests/test_offload.c has the unit
 * checks (bit-identical gradients, the device-memory drop against the planner).
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
#include "tests/tiny_model.h"
#include "tests/tmpdir.h"

static char g_dir[64], g_cfg[128];

static int setup(void **st) {
    if (tmpdir_setup(st, "qlora-offload-")) return -1;
    snprintf(g_dir, sizeof g_dir, "%s", ((const tmpdir *)*st)->dir);
    char p[256];
    snprintf(p, sizeof p, "%s/tiny.gguf", g_dir);
    if (tiny_model_write_layers(p, 13, 6)) return -1; /* 6 blocks: inputs offloaded and prefetched back */
    snprintf(p, sizeof p, "%s/train.jsonl", g_dir);
    FILE *f = fopen(p, "w");
    if (!f) return -1;
    static const char *const words[] = {"hello", "shell", "help", "yellow", "cell", "the", "of", "and",
                                        "hell", "tell", "well", "spell", "ls -l", "man page", "open(2)", "read"};
    for (int d = 0; d < 40; d++) {
        fprintf(f, "{\"text\": \"");
        for (int w = 0; w < 5 + d % 9; w++) fprintf(f, "%s%s", w ? " " : "", words[(d * 5 + w * 3) % 16]);
        fprintf(f, ".\"}\n");
    }
    fclose(f);
    snprintf(g_cfg, sizeof g_cfg, "%s/config.yaml", g_dir);
    f = fopen(g_cfg, "w");
    if (!f) return -1;
    fprintf(f,
            "base_model: %s/tiny.gguf\nadapter: qlora\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\n"
            "lora_target_linear: true\ndatasets:\n  - path: %s/train.jsonl\n    type: completion\nval_set_size: 4\n"
            "sequence_len: 48\nsample_packing: true\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\n"
            "max_steps: 3\nlearning_rate: 1e-2\nwarmup_steps: 1\neval_steps: 3\nsave_steps: 3\nseed: 5\n"
            "num_threads: 1\ndevice: cpu\n",
            g_dir, g_dir);
    fclose(f);
    return 0;
}

static int teardown(void **st) { return tmpdir_teardown(st); }

static void test_offload_matches_true_fenced(void **st) {
    (void)st;
    static const char *const env[] = {"QLORA_BACKEND=cpu-fenced", "OMP_NUM_THREADS=1", NULL};
    static const char *const timings[] = {"tokens_per_sec", "train_seconds", NULL};
    static const char *const modes[] = {"true", "offload"};
    char out[2][128];
    char *metrics[2];
    for (int i = 0; i < 2; i++) {
        char arg[64], *err = NULL;
        snprintf(out[i], sizeof out[i], "%s/%s", g_dir, modes[i]);
        snprintf(arg, sizeof arg, "gradient_checkpointing=%s", modes[i]);
        const char *const extra[] = {arg, NULL};
        int code = e2e_run_trainer(g_cfg, out[i], extra, env, &err);
        if (code) print_error("%s\n", err);
        assert_int_equal(code, 0);
        assert_non_null(strstr(err, "[device] cpu-fenced") ? err : strstr(err, "backend cpu-fenced"));
        const char *note = strstr(err, "[config] gradient_checkpointing: offload: each block recomputed, its input "
                                       "kept in pinned host memory (backend cpu-fenced");
        if (i == 1) assert_non_null(note);
        else assert_null(note);
        /* 3 steps x 2 micro-batches x 5 inputs out (blocks 1-5) and 4 back (blocks 1-4; block 5's stays) */
        const char *moved = strstr(err, "[memory] gradient_checkpointing: offload: ");
        if (i == 1) {
            assert_non_null(moved);
            print_message("%.*s\n", (int)strcspn(moved, "\n"), moved);
            assert_non_null(strstr(moved, ": 30 block inputs to host memory"));
            assert_non_null(strstr(moved, "), 24 back ahead of their recompute"));
        } else {
            assert_null(moved);
        }
        free(err);
        metrics[i] = e2e_metrics_canonical(out[i], NULL, timings);
        assert_non_null(strstr(metrics[i], "\"eval_loss\""));
    }
    if (strcmp(metrics[0], metrics[1])) print_error("metrics differ:\ntrue:\n%s\noffload:\n%s\n", metrics[0], metrics[1]);
    assert_string_equal(metrics[0], metrics[1]);
    char a[256], b[256];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", out[0]);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", out[1]);
    e2e_assert_same_file(a, b);
    print_message("cpu-fenced, 3 steps x 2 micro-batches: offload's metrics and adapter identical to true\n");
    free(metrics[0]);
    free(metrics[1]);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_offload_matches_true_fenced)};
    return cmocka_run_group_tests_name("offload_e2e", tests, setup, teardown);
}
