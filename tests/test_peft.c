/* tests/test_peft.c — format/peft's adapter writer, peft_write_adapter: the
 * tensors of a peft_tensor table read back from adapter_model.safetensors
 * (names, F32 shapes, the bytes at arena + offset, whatever the table's
 * order), adapter_config.json byte-identical to peft_write_adapter_config's,
 * and the failures: a missing directory, a bad table (no config written).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/file.h"
#include "format/peft.h"
#include "format/safetensors.h"
#include "tests/tmpdir.h"

static int group_setup(void **state) { return tmpdir_setup(state, "qlora_test_peft"); }

static const char *const TARGETS[2] = {"q_proj", "v_proj"};

static peft_lora_config config(void) {
    return (peft_lora_config){.r = 2, .lora_alpha = 16.0f, .lora_dropout = 0.05f, .use_rslora = 0,
                              .target_modules = (const char **)TARGETS, .n_target_modules = 2,
                              .base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"};
}

/* Layer 1's q_proj (in 3, out 4) and v_proj (in 3, out 2) at rank 2, laid out
 * in the arena A_q, B_q, A_v, B_v; the table lists them in `order`. */
enum { N_T = 4, ARENA = 2 * 3 + 4 * 2 + 2 * 3 + 2 * 2 };
static void make_table(peft_tensor t[N_T], const int order[N_T]) {
    static const char *const mod[N_T] = {"q_proj", "q_proj", "v_proj", "v_proj"};
    static const int64_t rows[N_T] = {2, 4, 2, 2}, cols[N_T] = {3, 2, 3, 2};
    int64_t off[N_T], o = 0;
    for (int i = 0; i < N_T; i++) off[i] = o, o += rows[i] * cols[i];
    for (int k = 0; k < N_T; k++) {
        int i = order[k];
        assert_int_equal(peft_tensor_name(t[k].name, sizeof t[k].name, 1, "self_attn", mod[i], i % 2 ? 'B' : 'A'), 0);
        t[k].offset = off[i];
        t[k].rows = rows[i];
        t[k].cols = cols[i];
    }
}

static void check_adapter(const char *dir, const peft_tensor *t, const float *arena) {
    char path[256];
    qerr e = {{0}};
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    safetensors_file *f;
    if (safetensors_open(path, &f, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    assert_int_equal(safetensors_count(f), N_T);
    assert_string_equal(safetensors_metadata(f, "format"), "pt");
    for (int k = 0; k < N_T; k++) {
        st_tensor g;
        assert_int_equal(safetensors_find(f, t[k].name, &g, &e), 0);
        assert_string_equal(g.dtype, "F32");
        assert_int_equal(g.n_dims, 2);
        assert_int_equal(g.shape[0], t[k].rows);
        assert_int_equal(g.shape[1], t[k].cols);
        assert_int_equal(g.nbytes, (size_t)(t[k].rows * t[k].cols) * sizeof(float));
        assert_memory_equal(g.data, arena + t[k].offset, g.nbytes);
    }
    safetensors_close(f);

    /* adapter_config.json: exactly what peft_write_adapter_config writes */
    char want[256];
    snprintf(want, sizeof want, "%s/want_config.json", dir);
    peft_lora_config c = config();
    assert_int_equal(peft_write_adapter_config(want, &c, &e), 0);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    size_t n_got = 0, n_want = 0;
    char *got = file_read_all(path, &n_got, &e), *exp = file_read_all(want, &n_want, &e);
    assert_non_null(got);
    assert_non_null(exp);
    assert_int_equal(n_got, n_want);
    assert_memory_equal(got, exp, n_got);
    assert_non_null(strstr(got, "\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ]"));
    free(got);
    free(exp);
    unlink(want);
}

static void test_write_in_arena_order(void **state) {
    const tmpdir *td = *state;
    float arena[ARENA];
    for (int i = 0; i < ARENA; i++) arena[i] = 0.25f * (float)i - 3.0f;
    peft_tensor t[N_T];
    make_table(t, (const int[N_T]){0, 1, 2, 3});
    peft_lora_config c = config();
    qerr e = {{0}};
    if (peft_write_adapter(td->dir, t, N_T, arena, &c, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    check_adapter(td->dir, t, arena);
}

/* The bytes come from each entry's offset, not from the table's order. */
static void test_write_any_table_order(void **state) {
    const tmpdir *td = *state;
    float arena[ARENA];
    for (int i = 0; i < ARENA; i++) arena[i] = (float)(i * i) - 7.5f;
    peft_tensor t[N_T];
    make_table(t, (const int[N_T]){3, 0, 2, 1});
    char dir[128];
    snprintf(dir, sizeof dir, "%s/shuffled", td->dir);
    qerr e = {{0}};
    assert_int_equal(file_mkdir_p(dir, &e), 0);
    peft_lora_config c = config();
    assert_int_equal(peft_write_adapter(dir, t, N_T, arena, &c, &e), 0);
    check_adapter(dir, t, arena);
}

static void test_write_errors(void **state) {
    const tmpdir *td = *state;
    float arena[ARENA] = {0};
    peft_tensor t[N_T];
    make_table(t, (const int[N_T]){0, 1, 2, 3});
    peft_lora_config c = config();
    qerr e = {{0}};
    char dir[128], path[256];

    /* a directory that does not exist: the safetensors file's error */
    snprintf(dir, sizeof dir, "%s/missing", td->dir);
    assert_int_equal(peft_write_adapter(dir, t, N_T, arena, &c, &e), -1);
    assert_non_null(strstr(e.msg, "missing/adapter_model.safetensors"));

    /* a bad table (two tensors of one name): refused, and no config written */
    snprintf(dir, sizeof dir, "%s/dup", td->dir);
    assert_int_equal(file_mkdir_p(dir, &e), 0);
    memcpy(t[1].name, t[0].name, sizeof t[0].name);
    e.msg[0] = 0;
    assert_int_equal(peft_write_adapter(dir, t, N_T, arena, &c, &e), -1);
    assert_true(e.msg[0] != 0);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    assert_int_equal(access(path, F_OK), -1);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    assert_int_equal(access(path, F_OK), -1);
}

/* The reader is the writer's inverse for what a trainer needs, and refuses every option a plain LoRA A/B
 * pair cannot represent, naming the key. */
static void test_read_adapter_config(void **state) {
    const tmpdir *td = *state;
    char path[256];
    snprintf(path, sizeof path, "%s/adapter_config.json", td->dir);
    const char *targets[] = {"q_proj", "v_proj"};
    peft_lora_config w = {.r = 4, .lora_alpha = 8, .lora_dropout = 0.05f, .use_rslora = 1, .target_modules = targets,
                          .n_target_modules = 2, .base_model_name_or_path = "models/base.gguf"};
    qerr e;
    assert_int_equal(peft_write_adapter_config(path, &w, &e), 0);
    peft_adapter_config r;
    if (peft_read_adapter_config(path, &r, &e)) fail_msg("%s", e.msg);
    assert_int_equal(r.r, 4);
    assert_true(r.lora_alpha == 8.0f && r.lora_dropout == 0.05f && r.use_rslora == 1);
    assert_string_equal(r.base_model_name_or_path, "models/base.gguf");
    char base[64];
    assert_int_equal(peft_adapter_base_model(path, base, sizeof base), 0);
    assert_string_equal(base, "models/base.gguf");
    static const char *const bad[][2] = {
        {"{\"peft_type\": \"IA3\", \"r\": 4}", "peft_type"},
        {"{\"peft_type\": \"LORA\", \"r\": 0}", "\"r\""},
        {"{\"peft_type\": \"LORA\", \"r\": 2.5}", "\"r\""},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"use_dora\": true}", "use_dora"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"rank_pattern\": {\"q_proj\": 8}}", "rank_pattern"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"modules_to_save\": [\"score\"]}", "modules_to_save"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"modules_to_save\": \"lm_head\"}", "modules_to_save"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"bias\": \"all\"}", "bias"},
        {"[1, 2]", "not a JSON object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        fputs(bad[i][0], f);
        fclose(f);
        assert_int_equal(peft_read_adapter_config(path, &r, &e), -1);
        if (!strstr(e.msg, bad[i][1]) || !strstr(e.msg, path)) fail_msg("%s: expected \"%s\": %s", bad[i][0], bad[i][1], e.msg);
    }
    /* modules_to_save: embed_tokens and lm_head are read (trainable full copies) */
    {
        FILE *fm = fopen(path, "w");
        fputs("{\"peft_type\": \"LORA\", \"r\": 4, \"modules_to_save\": [\"lm_head\", \"embed_tokens\"]}", fm);
        fclose(fm);
        if (peft_read_adapter_config(path, &r, &e)) fail_msg("%s", e.msg);
        assert_int_equal(r.save_embed, 1);
        assert_int_equal(r.save_lm_head, 1);
    }
    /* defaults: lora_alpha 8 (PEFT's), dropout 0, no base */
    FILE *f = fopen(path, "w");
    fputs("{\"peft_type\": \"LORA\", \"r\": 2, \"bias\": \"none\", \"use_dora\": false, \"rank_pattern\": {}}", f);
    fclose(f);
    if (peft_read_adapter_config(path, &r, &e)) fail_msg("%s", e.msg);
    assert_true(r.r == 2 && r.lora_alpha == 8.0f && r.lora_dropout == 0.0f && !r.use_rslora);
    assert_string_equal(r.base_model_name_or_path, "");
    assert_int_equal(peft_adapter_base_model(path, base, sizeof base), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_write_in_arena_order),
        cmocka_unit_test(test_write_any_table_order),
        cmocka_unit_test(test_write_errors),
        cmocka_unit_test(test_read_adapter_config),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
