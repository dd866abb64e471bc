/* tests/test_e2e.c — end to end on the real model (SmolLM2-135M-Instruct GGUF)
 * and the real data (man pages): loading, the B = 0 identity, the bf16 base
 * path, and a few training steps through `train_run` with every output file.
 * Needs `make model dataset` (make test does it first). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <cjson/cJSON.h>

#include "autograd/gemm.h"
#include "core/file.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "format/gguf.h"
#include "model/llama.h"
#include "format/safetensors.h"
#include "trainer/config.h"
#include "trainer/metrics.h"
#include "trainer/train.h"
#include "tests/subproc.h"

#define MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define HELDOUT "datasets/manpages/heldout.jsonl"

static int have_inputs(void) {
    if (access(MODEL, R_OK) != 0) {
        print_error("%s missing: run `make model`\n", MODEL);
        return 0;
    }
    if (access(HELDOUT, R_OK) != 0) {
        print_error("%s missing: run `make dataset`\n", HELDOUT);
        return 0;
    }
    return 1;
}

/* A few held-out rows of 128 tokens. */
static void load_rows(gguf_file **gf, tokenizer **tok, packed_set *ps) {
    qerr e;
    assert_int_equal(gguf_open(MODEL, gf, &e), 0);
    assert_int_equal(tokenizer_load_gguf(*gf, tok, &e), 0);
    dataset_spec sp = {.path = HELDOUT, .type = "completion"};
    packed_set ev;
    dataset_stats st;
    int rc = dataset_build(*tok, &sp, 1, NULL, 0, 0.0, 128, 1, 0, 1, ps, &ev, &st, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    packed_set_free(&ev);
    assert_true(ps->n_rows >= 4);
}

static double model_loss(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const packed_set *ps, int nrows) {
    llama_batch b = {.B = nrows, .T = ps->seq_len, .input_ids = ps->input_ids, .targets = ps->targets,
                     .position_ids = ps->position_ids, .seq_ids = ps->seq_ids};
    ag_mark mk = ag_arena_mark(ctx);
    double sum;
    int64_t n;
    int rec = ctx->recording;
    ctx->recording = 0;
    llama_forward_loss(ctx, m, ls, &b, 1.0f, 0, &sum, &n);
    ctx->recording = rec;
    ag_arena_reset(ctx, mk);
    return sum / (double)n;
}

static void test_base_model_and_identity(void **st) {
    (void)st;
    if (!have_inputs()) fail();
    gguf_file *gf;
    tokenizer *tok;
    packed_set ps;
    load_rows(&gf, &tok, &ps);
    qerr e;
    llama_model m;
    assert_int_equal(llama_load_gguf(gf, 1, 1, 128, &m, &e), 0);
    /* ≈ 0.52 bytes per quantized parameter (4 bits + 8-bit scales per 64 + fp32 per 16384) */
    double bpp = (double)m.quantized_bytes / (double)m.n_quantized_params;
    print_message("NF4 base: %lld params, %.4f bytes/param\n", (long long)m.n_quantized_params, bpp);
    assert_true(bpp > 0.50 && bpp < 0.53);
    assert_int_equal(m.n_quantized_params, 30LL * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536));

    ag_ctx ctx;
    assert_int_equal(ag_ctx_init(&ctx, 64 << 20, &e), 0);
    ctx.bf16 = 1;
    double base = model_loss(&ctx, &m, NULL, &ps, 4);
    print_message("base model held-out loss (NF4, bf16 GEMMs): %.4f\n", base);
    /* a correctly loaded 135M instruct model predicts man-page text far better than chance (ln 49152 = 10.8) */
    assert_true(base > 0.5 && base < 3.5);

    /* B = 0 at init: exactly the base model's loss */
    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
    lora_set ls;
    assert_int_equal(lora_set_init(&ls, &m, 8, 16.0f, 0.0f, 0, target, 42, &e), 0);
    double with_adapter = model_loss(&ctx, &m, &ls, &ps, 4);
    print_message("with fresh adapter: %.6f (base %.6f)\n", with_adapter, base);
    assert_true(with_adapter == base);

    /* fp32 GEMMs agree with bf16 ones to within bf16 rounding */
    ctx.bf16 = 0;
    double f32 = model_loss(&ctx, &m, NULL, &ps, 4);
    print_message("fp32 GEMMs: %.4f\n", f32);
    assert_true(fabs(f32 - base) < 0.05);
    lora_set_free(&ls);
    llama_free(&m);

    /* load_in_4bit: false keeps the base in bf16 through the same code path. The GGUF
     * holds Q4_1 weights, so NF4 here re-quantizes already 4-bit values onto a
     * different grid (uniform 16 levels per 32 → normal quantiles per 64): on
     * these rows it costs ≈ 0.2 nats (measured 2.63 bf16 vs 2.84 NF4). The
     * bound only guards against a broken path (a wrong permutation or scale
     * costs several nats), not against the re-quantization itself. */
    assert_int_equal(llama_load_gguf(gf, 0, 0, 128, &m, &e), 0);
    ctx.bf16 = 1;
    double bf = model_loss(&ctx, &m, NULL, &ps, 4);
    print_message("bf16 base: %.4f  (NF4 base %.4f)\n", bf, base);
    assert_true(m.layers[0].lin[0].kind == FROZEN_BF16);
    assert_true(fabs(bf - base) < 0.35);
    llama_free(&m);

    /* load_in_8bit: the base as bitsandbytes' Int8Params (codes + fp32 row absmax: 1 + 4/in bytes per
     * parameter), dequantized per layer to bf16. Row-wise 8-bit steps are far finer than the Q4_1 grid the
     * GGUF already holds, so the int8 base must stay close to the bf16 one: 0.05 nats bounds a broken path
     * (a wrong row scale costs several), not the rounding. */
    assert_int_equal(llama_load_gguf(gf, LLAMA_BASE_INT8, 0, 128, &m, &e), 0);
    assert_true(m.layers[0].lin[0].kind == FROZEN_INT8 && m.load_in_8bit && !m.load_in_4bit);
    const double bpp8 = (double)m.quantized_bytes / (double)m.n_quantized_params;
    double i8 = model_loss(&ctx, &m, NULL, &ps, 4);
    print_message("int8 base: %.4f (bf16 base %.4f), %.4f bytes/param\n", i8, bf, bpp8);
    assert_true(bpp8 > 1.0 && bpp8 < 1.01);
    assert_true(fabs(i8 - bf) < 0.05);
    llama_free(&m);
    ag_ctx_free(&ctx);
    packed_set_free(&ps);
    tokenizer_free(tok);
    gguf_close(gf);
}

static void test_train_few_steps(void **st) {
    (void)st;
    if (!have_inputs()) fail();
    /* The output stays in build/e2e-out so CI can check the adapter with the
     * real consumer libraries (scripts/check_peft_adapter.py). */
    char dir[] = "/tmp/qlora-e2e-XXXXXX";
    assert_int_equal(system("rm -rf build/e2e-out"), 0);
    assert_non_null(mkdtemp(dir));
    char cfgpath[256];
    snprintf(cfgpath, sizeof cfgpath, "%s/config.yaml", dir);
    FILE *f = fopen(cfgpath, "w");
    assert_non_null(f);
    fprintf(f,
            "base_model: " MODEL "\n"
            "adapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\nlora_dropout: 0.05\n"
            "lora_target_linear: true\n"
            "datasets:\n  - path: " HELDOUT "\n    type: completion\n"
            "val_set_size: 4\nsequence_len: 128\nsample_packing: true\nmicro_batch_size: 2\n"
            "gradient_accumulation_steps: 2\nmax_steps: 4\nlearning_rate: 1e-3\nwarmup_steps: 1\n"
            "eval_steps: 2\neval_max_tokens: 1024\nlogging_steps: 1\noutput_dir: build/e2e-out\n");
    fclose(f);
    train_config c;
    qerr e;
    assert_int_equal(train_config_load(cfgpath, &c, &e), 0);
    assert_int_equal(train_config_validate(&c, &e), 0);
    train_result r;
    int rc = train_run(&c, &r, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(r.steps, 4);
    assert_true(isfinite(r.eval_loss_start) && isfinite(r.eval_loss_end));
    print_message("held-out %.4f -> %.4f, %.0f tok/s\n", r.eval_loss_start, r.eval_loss_end, r.train_tokens_per_sec);

    char p[512];
    /* metrics.jsonl: 4 train lines, evals at 0, 2, 4 */
    snprintf(p, sizeof p, "build/e2e-out/metrics.jsonl");
    metrics_series ms;
    assert_int_equal(metrics_read(p, &ms, &e), 0);
    assert_int_equal(ms.n_train, 4);
    assert_int_equal(ms.n_eval, 3);
    for (int i = 0; i < 4; i++) assert_true(isfinite(ms.train_loss[i]) && ms.train_loss[i] > 0);
    metrics_series_free(&ms);

    /* the adapter: PEFT names, A [r, in], B [out, r], F32, 30 layers x 7 modules x 2 */
    snprintf(p, sizeof p, "build/e2e-out/adapter_model.safetensors");
    safetensors_file *sf;
    assert_int_equal(safetensors_open(p, &sf, &e), 0);
    assert_int_equal(safetensors_count(sf), 30 * 7 * 2);
    st_tensor ta, tb;
    assert_int_equal(safetensors_find(sf, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", &ta, &e), 0);
    assert_int_equal(safetensors_find(sf, "base_model.model.model.layers.29.mlp.down_proj.lora_B.weight", &tb, &e), 0);
    assert_string_equal(ta.dtype, "F32");
    assert_int_equal(ta.shape[0], 8);
    assert_int_equal(ta.shape[1], 576);
    assert_int_equal(tb.shape[0], 576);
    assert_int_equal(tb.shape[1], 8);
    /* B moved away from zero: training happened */
    const float *bd = tb.data;
    double nb = 0;
    for (int i = 0; i < 576 * 8; i++) nb += fabs(bd[i]);
    assert_true(nb > 0);
    safetensors_close(sf);

    snprintf(p, sizeof p, "build/e2e-out/adapter_config.json");
    f = fopen(p, "r");
    assert_non_null(f);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    cJSON *j = cJSON_Parse(buf);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "peft_type")->valuestring, "LORA");
    assert_int_equal(cJSON_GetObjectItem(j, "r")->valueint, 8);
    cJSON_Delete(j);

    struct stat sb;
    snprintf(p, sizeof p, "build/e2e-out/loss_curve.png");
    assert_int_equal(stat(p, &sb), 0);
    assert_true(sb.st_size > 1000);
    snprintf(p, sizeof p, "build/e2e-out/loss_curve.svg");
    assert_int_equal(stat(p, &sb), 0);
    assert_true(sb.st_size > 1000);
    snprintf(p, sizeof p, "build/e2e-out/config.resolved.yaml");
    assert_int_equal(stat(p, &sb), 0);
    train_config_free(&c);
}

/* load_in_8bit: true with adapter: lora through train_run: three short steps on the real model, the
 * memory it predicted and used. */
static void test_train_int8_few_steps(void **st) {
    (void)st;
    if (!have_inputs()) fail();
    char dir[] = "/tmp/qlora-e2e-i8-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char cfgpath[256], out[320];
    snprintf(cfgpath, sizeof cfgpath, "%s/config.yaml", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    FILE *f = fopen(cfgpath, "w");
    assert_non_null(f);
    fprintf(f,
            "base_model: " MODEL "\n"
            "adapter: lora\nload_in_8bit: true\nlora_r: 8\nlora_alpha: 16\nlora_dropout: 0.0\n"
            "lora_target_linear: true\n"
            "datasets:\n  - path: " HELDOUT "\n    type: completion\n"
            "sequence_len: 64\nmicro_batch_size: 1\nmax_steps: 3\nlearning_rate: 1e-3\n"
            "logging_steps: 1\noutput_dir: %s\n",
            out);
    fclose(f);
    train_config c;
    qerr e;
    assert_int_equal(train_config_load(cfgpath, &c, &e), 0);
    assert_int_equal(train_config_validate(&c, &e), 0);
    assert_int_equal(c.load_in_4bit, 0);
    train_result r;
    int rc = train_run(&c, &r, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(r.steps, 3);
    char p[512];
    snprintf(p, sizeof p, "%s/metrics.jsonl", out);
    metrics_series ms;
    assert_int_equal(metrics_read(p, &ms, &e), 0);
    assert_int_equal(ms.n_train, 3);
    for (int i = 0; i < 3; i++) {
        print_message("int8 base, step %d: loss %.4f\n", i + 1, ms.train_loss[i]);
        assert_true(isfinite(ms.train_loss[i]) && ms.train_loss[i] > 0.5 && ms.train_loss[i] < 6.0);
    }
    metrics_series_free(&ms);
    print_message("int8 base: frozen linears %.1f MiB (%lld params), peak RSS %.0f MiB\n",
                  r.quantized_bytes / 1048576.0, (long long)r.n_quantized_params, r.peak_rss_mib);
    assert_true(r.quantized_bytes >= r.n_quantized_params && r.quantized_bytes < r.n_quantized_params * 101 / 100);
    train_config_free(&c);

    /* qlora-generate on the run: its int8 base by default (config.resolved.yaml); --load-in-8bit 0 gives NF4
     * (other logits), --load-in-8bit 1 with --load-in-4bit 0 the int8 base again (the same logits, bit for bit) */
    static const char *const flags[3][4] = {{NULL}, {"--load-in-8bit", "0", NULL}, {"--load-in-4bit", "0", "--load-in-8bit", "1"}};
    static const char *const said[3] = {"(int8, ", "(NF4, ", "(int8, "};
    char lg[3][400];
    for (int k = 0; k < 3; k++) {
        snprintf(lg[k], sizeof lg[k], "%s/logits%d.safetensors", dir, k);
        char *argv[16] = {(char *)subproc_tool("generate"), out, "--ids", "1,2,3", "--dump-logits", lg[k]};
        int n = 6;
        for (int j = 0; j < 4 && flags[k][j]; j++) argv[n++] = (char *)flags[k][j];
        argv[n] = NULL;
        char *err = NULL;
        int code = subproc_run(argv, NULL, 120, &err);
        if (code || !strstr(err, said[k])) print_error("qlora-generate %d: exit %d\n%s\n", k, code, err);
        assert_int_equal(code, 0);
        assert_non_null(strstr(err, said[k]));
        free(err);
    }
    size_t n0 = 0, n1 = 0, n2 = 0;
    char *l0 = file_read_all(lg[0], &n0, NULL), *l1 = file_read_all(lg[1], &n1, NULL), *l2 = file_read_all(lg[2], &n2, NULL);
    assert_true(l0 && l1 && l2 && n0 == n1 && n0 == n2);
    assert_memory_not_equal(l0, l1, n0);
    assert_memory_equal(l0, l2, n0);
    free(l0), free(l1), free(l2);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base_model_and_identity),
        cmocka_unit_test(test_train_few_steps),
        cmocka_unit_test(test_train_int8_few_steps),
    };
    if (getenv("QLORA_TEST_FILTER")) cmocka_set_test_filter(getenv("QLORA_TEST_FILTER")); /* e.g. "test_train_int8*" */
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    gemm_shutdown();
    return rc;
}
