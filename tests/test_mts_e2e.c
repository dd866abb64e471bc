/* tests/test_mts_e2e.c — lora_modules_to_save through bin/qlora-train on the tiny model
 * (tests/tiny_model.h; tied embeddings, as SmolLM2):
 *
 * 1. [embed_tokens, lm_head] over 6 steps (2 micro-batches each, checkpoints every 3): the adapter
 *    holds PEFT's modules_to_save keys, [vocab, d_model] F32, both moved away from the base table and
 *    apart from each other (independent copies of the tied table), adapter_config.json lists them.
 * 2. Resume: the same run stopped after its step-3 checkpoint (the newer ones deleted) and run again
 *    ends with the same adapter bytes, the same metrics and the same optimizer state (copies included).
 * 3. Refusals, one line each, nothing written: SHARD_GRAD_OP, embed_tokens with adamw_8bit, a module
 *    name other than embed_tokens / lm_head.
 * 4. What follows from one parameter set: Sophia and adamw_8bit (lm_head) train the copies; two
 *    processes (NO_SHARD, mpirun) x 1 micro-batch give the adapter bytes of one x 2.
 * 5. SmolLM2-135M (tied, vocab 49152), kept short (2 steps of 2 x 64 tokens): both copies train, the
 *    held-out loss is finite, the plan's prediction and the peak RSS are printed.
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

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "core/file.h"
#include "core/bf16.h"
#include "format/gguf.h"
#include "format/safetensors.h"
#include "tests/e2e_run.h"
#include "tests/mpi_launch.h"
#include "tests/tiny_model.h"
#include "tests/tmpdir.h"
#include "trainer/checkpoint.h"

static char g_dir[64], g_cfg[128];
static const char *const THREADS1[] = {"OMP_NUM_THREADS=1", NULL};
static const char *const KEEP[] = {"step", "loss", "lr", "grad_norm", "eval_loss", NULL};

static int setup(void **st) {
    if (tmpdir_setup(st, "qlora-mts-")) return -1;
    snprintf(g_dir, sizeof g_dir, "%s", ((const tmpdir *)*st)->dir);
    const char *tail = "lora_modules_to_save: [embed_tokens, lm_head]\nval_set_size: 6\nsequence_len: 32\n"
                       "sample_packing: true\nmicro_batch_size: 1\ngradient_accumulation_steps: 2\nmax_steps: 6\n"
                       "learning_rate: 1e-2\nwarmup_steps: 2\nlr_scheduler: cosine\nweight_decay: 0.01\n"
                       "eval_steps: 3\nsave_steps: 3\nseed: 5\nnum_threads: 1\n";
    return tiny_world_write(g_dir, 11, 60, 16, 7, 7, tail, g_cfg, sizeof g_cfg);
}

static int teardown(void **st) { return tmpdir_teardown(st); }

static void must(int rc, char *err) {
    if (rc) fprintf(stderr, "exit %d:\n%s", rc, err ? err : "");
    assert_int_equal(rc, 0);
    free(err);
}

static double max_abs_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

static void test_train_and_resume(void **st) {
    (void)st;
    char a[128], b[128], p[256], q[256];
    snprintf(a, sizeof a, "%s/a", g_dir);
    snprintf(b, sizeof b, "%s/b", g_dir);
    char *err = NULL;
    int rc = e2e_run_trainer(g_cfg, a, NULL, THREADS1, &err);
    if (!rc && !strstr(err, "[config] lora_modules_to_save on tied embeddings")) fail_msg("no tied [config] line:\n%s", err);
    must(rc, err);

    /* 1. the adapter */
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", a);
    safetensors_file *sf;
    qerr e;
    if (safetensors_open(p, &sf, &e)) fail_msg("%s", e.msg);
    const float *cp[2] = {NULL, NULL};
    int64_t V = 0, D = 0;
    for (int i = 0; i < safetensors_count(sf); i++) {
        st_tensor t;
        safetensors_get(sf, i, &t);
        int k = !strcmp(t.name, "base_model.model.model.embed_tokens.weight") ? 0
              : !strcmp(t.name, "base_model.model.lm_head.weight")            ? 1
                                                                              : -1;
        if (k < 0) continue;
        assert_string_equal(t.dtype, "F32");
        assert_int_equal(t.n_dims, 2);
        V = t.shape[0], D = t.shape[1];
        cp[k] = t.data;
    }
    assert_non_null(cp[0]);
    assert_non_null(cp[1]);
    assert_int_equal(D, 64);
    double apart = max_abs_diff(cp[0], cp[1], V * D);
    print_message("embed_tokens vs lm_head copies after 6 steps: max|Δ| %.3g (independent copies of the tied table)\n",
                  apart);
    assert_true(apart > 1e-3);
    safetensors_close(sf);
    snprintf(p, sizeof p, "%s/adapter_config.json", a);
    cJSON *cfg = file_read_json_object(p, &e);
    assert_non_null(cfg);
    const cJSON *ms = cJSON_GetObjectItemCaseSensitive(cfg, "modules_to_save");
    assert_true(cJSON_IsArray(ms) && cJSON_GetArraySize(ms) == 2);
    assert_string_equal(cJSON_GetArrayItem(ms, 0)->valuestring, "embed_tokens");
    assert_string_equal(cJSON_GetArrayItem(ms, 1)->valuestring, "lm_head");
    cJSON_Delete(cfg);

    /* 2. resume from step 3: run b, keep only its checkpoint-3, run again */
    err = NULL;
    rc = e2e_run_trainer(g_cfg, b, NULL, THREADS1, &err);
    must(rc, err);
    snprintf(p, sizeof p, "%s/checkpoint-6", b);
    assert_int_equal(tmpdir_remove(p), 0);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", b);
    unlink(p);
    err = NULL;
    rc = e2e_run_trainer(g_cfg, b, NULL, THREADS1, &err);
    if (!rc && !strstr(err, "checkpoint-3")) fail_msg("did not resume from checkpoint-3:\n%s", err);
    must(rc, err);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", a);
    snprintf(q, sizeof q, "%s/adapter_model.safetensors", b);
    e2e_assert_same_file(p, q);
    char *ma = e2e_metrics_canonical(a, KEEP, NULL), *mb = e2e_metrics_canonical(b, KEEP, NULL);
    /* a resumed run keeps metrics.jsonl up to its checkpoint's step: every step once */
    if (strcmp(ma, mb)) fprintf(stderr, "metrics differ:\n--- a\n%s--- b\n%s", ma, mb);
    assert_string_equal(ma, mb);
    free(ma);
    free(mb);
    ckpt_state sa, sb;
    snprintf(p, sizeof p, "%s/checkpoint-6", a);
    snprintf(q, sizeof q, "%s/checkpoint-6", b);
    if (ckpt_load(p, &sa, &e)) fail_msg("%s", e.msg);
    if (ckpt_load(q, &sb, &e)) fail_msg("%s", e.msg);
    assert_int_equal(sa.n_params, sb.n_params);
    assert_true(sa.n_params > 2 * V * D);
    const size_t n = (size_t)sa.n_params * sizeof(float);
    assert_memory_equal(sa.params, sb.params, n);
    assert_memory_equal(sa.exp_avg, sb.exp_avg, n);
    assert_memory_equal(sa.exp_avg_sq, sb.exp_avg_sq, n);
    ckpt_state_free(&sa);
    ckpt_state_free(&sb);
}

static void refused(const char *const *extra, const char *want) {
    char out[128], p[200];
    snprintf(out, sizeof out, "%s/refused", g_dir);
    char *err = NULL;
    int rc = e2e_run_trainer(g_cfg, out, extra, THREADS1, &err);
    if (rc == 0 || !strstr(err, want)) fail_msg("expected a refusal naming \"%s\", exit %d:\n%s", want, rc, err);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", out);
    assert_int_not_equal(access(p, F_OK), 0);
    free(err);
}

static void test_refusals(void **st) {
    (void)st;
    refused((const char *const[]){"fsdp=[shard_grad_op]", NULL}, "lora_modules_to_save with SHARD_GRAD_OP");
    refused((const char *const[]){"optimizer=adamw_8bit", NULL}, "embed_tokens with optimizer adamw_8bit");
    refused((const char *const[]){"lora_modules_to_save=[embed_tokens, norm]", NULL},
            "lora_modules_to_save[1]: expected one of embed_tokens, lm_head");
}

/* max |Δ| of the lm_head copy of dir's adapter from the tied base table (token_embd.weight of the tiny
 * GGUF, as qlora holds it: bf16) */
static double head_moved(const char *dir) {
    char g[128];
    snprintf(g, sizeof g, "%s/tiny.gguf", g_dir);
    gguf_file *gf;
    qerr ge;
    if (gguf_open(g, &gf, &ge)) fail_msg("%s", ge.msg);
    const gguf_tensor *te = gguf_find_tensor(gf, "token_embd.weight");
    assert_non_null(te);
    int64_t nb = 1;
    for (uint32_t d = 0; d < te->n_dims; d++) nb *= (int64_t)te->ne[d];
    float *base = malloc((size_t)nb * sizeof(float));
    if (gguf_tensor_to_f32(te, base, &ge)) fail_msg("%s", ge.msg);
    gguf_close(gf);
    char p[256];
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    safetensors_file *sf;
    qerr e;
    if (safetensors_open(p, &sf, &e)) fail_msg("%s", e.msg);
    const float *head = NULL;
    int64_t n = 0;
    for (int i = 0; i < safetensors_count(sf); i++) {
        st_tensor t;
        safetensors_get(sf, i, &t);
        if (!strcmp(t.name, "base_model.model.lm_head.weight")) head = t.data, n = t.shape[0] * t.shape[1];
    }
    assert_non_null(head);
    assert_int_equal(n, nb);
    double s = 0;
    for (int64_t i = 0; i < n; i++) {
        assert_true(isfinite(head[i]));
        s = fmax(s, fabs((double)head[i] - bf16_to_f32(f32_to_bf16(base[i]))));
    }
    safetensors_close(sf);
    free(base);
    return s;
}

static void test_optimizers_and_ranks(void **st) {
    (void)st;
    const char *const *cases[] = {(const char *const[]){"optimizer=sophia", "lora_modules_to_save=[lm_head]", NULL},
                                  (const char *const[]){"optimizer=adamw_8bit", "lora_modules_to_save=[lm_head]", NULL}};
    for (int i = 0; i < 2; i++) {
        char out[128];
        snprintf(out, sizeof out, "%s/opt%d", g_dir, i);
        char *err = NULL;
        int rc = e2e_run_trainer(g_cfg, out, cases[i], THREADS1, &err);
        must(rc, err);
        double s = head_moved(out);
        print_message("%s: lm_head copy moved from the base table by max|Δ| %.4g\n", cases[i][0], s);
        assert_true(s > 1e-3);
    }
    if (mpi_launch_skip()) skip();
    char one[128], two[128], p[256], q[256];
    snprintf(one, sizeof one, "%s/world1", g_dir);
    snprintf(two, sizeof two, "%s/world2", g_dir);
    char *err = NULL;
    int rc = e2e_run_trainer(g_cfg, one, NULL, THREADS1, &err);
    must(rc, err);
    err = NULL;
    rc = mpi_launch_trainer(2, g_cfg, two, (const char *const[]){"gradient_accumulation_steps=1", NULL}, NULL, &err);
    must(rc, err);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", one);
    snprintf(q, sizeof q, "%s/adapter_model.safetensors", two);
    e2e_assert_same_file(p, q);
}

static void test_smollm2(void **st) {
    (void)st;
    char dir[64], cfg[128], out[128];
    if (e2e_setup(dir, sizeof dir, cfg, sizeof cfg, "qlora-mts-real-", 0,
                  "lora_modules_to_save: [embed_tokens, lm_head]\nmax_steps: 2\nlearning_rate: 1e-3\n"))
        fail_msg("e2e_setup failed (model or data missing?)");
    snprintf(out, sizeof out, "%s/out", dir);
    char *err = NULL;
    int rc = e2e_run_trainer(cfg, out, NULL, THREADS1, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    const char *mem = strstr(err, "[memory] peak RSS");
    assert_non_null(mem);
    const char *nl = strchr(mem, '\n');
    print_message("SmolLM2-135M with both copies: %.*s\n", (int)(nl ? nl - mem : 80), mem);
    assert_non_null(strstr(err, "[config] lora_modules_to_save on tied embeddings"));
    free(err);
    char *m = e2e_metrics_canonical(out, (const char *const[]){"step", "loss", "eval_loss", NULL}, NULL);
    print_message("%s", m);
    assert_null(strstr(m, "nan"));
    assert_non_null(strstr(m, "\"step\":2,\"loss\""));
    free(m);
    char p[256];
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", out);
    safetensors_file *sf;
    qerr e;
    if (safetensors_open(p, &sf, &e)) fail_msg("%s", e.msg);
    int found = 0;
    for (int i = 0; i < safetensors_count(sf); i++) {
        st_tensor t;
        safetensors_get(sf, i, &t);
        if (!strcmp(t.name, "base_model.model.model.embed_tokens.weight") ||
            !strcmp(t.name, "base_model.model.lm_head.weight")) {
            assert_int_equal(t.shape[0], 49152);
            assert_int_equal(t.shape[1], 576);
            found++;
        }
    }
    safetensors_close(sf);
    assert_int_equal(found, 2);
    assert_int_equal(tmpdir_remove(dir), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_and_resume),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_optimizers_and_ranks),
        cmocka_unit_test(test_smollm2),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
