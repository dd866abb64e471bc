/* tests/test_export.c — format/safetensors + format/peft: the Rust writer's own
 * test vectors byte for byte, a 2-layer PEFT adapter written and read back
 * (bytes, names, shapes, header order and padding), adapter_config.json
 * (exact text of PEFT's json.dumps(indent=2, sort_keys=True), parsed with
 * cJSON), atomic replacement, and the reader's rejection of damaged files.
 *
 * With QLORA_TEST_EXPORT_DIR=<dir> the adapter is left in <dir> so the real
 * consumer can check it:  python3 scripts/check_peft_adapter.py <dir>
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file.h"
#include "core/rng.h"
#include "format/peft.h"
#include "format/safetensors.h"
#include "model/llama_linear.h"
#include "tests/tmpdir.h"

static int group_setup(void **state) { return tmpdir_setup(state, "qlora_test_export"); }

/* The whole file (NUL-terminated), or NULL. */
static uint8_t *read_all(const char *path, size_t *n) { return (uint8_t *)file_read_all(path, n, NULL); }

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Expected file = le64(len(header)) + header + data. */
static void expect_file(const char *path, const char *header, const void *data, size_t nd) {
    size_t hn = strlen(header), n;
    uint8_t *got = read_all(path, &n);
    assert_non_null(got);
    assert_int_equal(n, 8 + hn + nd);
    for (int i = 0; i < 8; i++) assert_int_equal(got[i], (uint8_t)((uint64_t)hn >> (8 * i)));
    assert_memory_equal(got + 8, header, hn);
    if (nd) assert_memory_equal(got + 8 + hn, data, nd);
    free(got);
}

/* The byte-level test vectors of safetensors src/tensor.rs (test_serialization,
 * test_serialization_forced_alignement, test_empty). */
static void test_rust_vectors(void **state) {
    const tmpdir *t = *state;
    char path[128];
    qerr e = {{0}};
    float data[6] = {0, 1, 2, 3, 4, 5};
    snprintf(path, sizeof path, "%s/v.safetensors", t->dir);

    st_tensor a = {"attn.0", "F32", 3, {1, 2, 3, 0}, data, sizeof data};
    assert_int_equal(safetensors_write(path, &a, 1, "{}", &e), 0);
    expect_file(path, "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}", data, 24);

    st_tensor b = {"attn0", "F32", 4, {1, 1, 2, 3}, data, sizeof data};
    assert_int_equal(safetensors_write(path, &b, 1, "{}", &e), 0);
    expect_file(path, "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],\"data_offsets\":[0,24]}}       ", data,
                24);

    assert_int_equal(safetensors_write(path, NULL, 0, "{}", &e), 0);
    expect_file(path, "{}      ", NULL, 0);
    assert_int_equal(safetensors_write(path, NULL, 0, "{\"framework\":\"pt\"}", &e), 0);
    expect_file(path, "{\"__metadata__\":{\"framework\":\"pt\"}}     ", NULL, 0);
    /* NULL metadata = what PyTorch/PEFT write */
    assert_int_equal(safetensors_write(path, NULL, 0, NULL, &e), 0);
    expect_file(path, "{\"__metadata__\":{\"format\":\"pt\"}}", NULL, 0);

    safetensors_file *f;
    assert_int_equal(safetensors_open(path, &f, &e), 0);
    assert_int_equal(safetensors_count(f), 0);
    assert_string_equal(safetensors_metadata(f, "format"), "pt");
    assert_null(safetensors_metadata(f, "framework"));
    safetensors_close(f);
}

/* Mixed dtypes go in the Rust order: dtype descending (enum order), then name. */
static void test_dtype_order(void **state) {
    const tmpdir *t = *state;
    char path[128];
    qerr e = {{0}};
    snprintf(path, sizeof path, "%s/mixed.safetensors", t->dir);
    uint8_t u8[3] = {1, 2, 3};
    uint16_t bf[2] = {0x3f80, 0x4000};
    float f32[2] = {1.5f, -2.0f};
    int64_t i64[1] = {-7};
    st_tensor ts[5] = {
        {"b_u8", "U8", 1, {3}, u8, 3},     {"a_bf16", "BF16", 1, {2}, bf, 4}, {"z_f32", "F32", 1, {2}, f32, 8},
        {"c_i64", "I64", 0, {0}, i64, 8}, {"a_f32", "F32", 2, {1, 2}, f32, 8},
    };
    assert_int_equal(safetensors_write(path, ts, 5, NULL, &e), 0);
    safetensors_file *f;
    assert_int_equal(safetensors_open(path, &f, &e), 0);
    const char *order[5] = {"c_i64", "a_f32", "z_f32", "a_bf16", "b_u8"};
    const uint8_t *prev_end = NULL;
    for (int i = 0; i < 5; i++) {
        st_tensor g;
        safetensors_get(f, i, &g);
        assert_string_equal(g.name, order[i]);
        if (prev_end) assert_ptr_equal(g.data, prev_end);
        prev_end = (const uint8_t *)g.data + g.nbytes;
        assert_int_equal((uintptr_t)g.data % safetensors_dtype_size(g.dtype), 0); /* aligned */
    }
    st_tensor g;
    assert_int_equal(safetensors_find(f, "c_i64", &g, &e), 0);
    assert_int_equal(g.n_dims, 0);
    assert_string_equal(g.dtype, "I64");
    assert_memory_equal(g.data, i64, 8);
    assert_int_equal(safetensors_find(f, "a_bf16", &g, &e), 0);
    assert_memory_equal(g.data, bf, 4);
    assert_int_equal(safetensors_find(f, "nope", &g, &e), -1);
    assert_non_null(strstr(e.msg, "mixed.safetensors: no tensor named \"nope\""));
    safetensors_close(f);
}

/* ------------------------------------------------------------------------ */

enum { N_LAYERS = 2, RANK = 4, HID = 64, KVD = 16, FFN = 96, N_MOD = LLAMA_N_LINEAR };
/* target_modules as PEFT lists them (this test's own copy: it checks the table) */
static const char *const MODS[N_MOD] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const int MOD_IN[N_MOD] = {HID, HID, HID, HID, HID, HID, FFN};
static const int MOD_OUT[N_MOD] = {HID, KVD, KVD, HID, FFN, FFN, HID};

typedef struct adapter {
    char names[N_LAYERS * N_MOD * 2][96];
    float *data[N_LAYERS * N_MOD * 2];
    st_tensor ts[N_LAYERS * N_MOD * 2];
} adapter;

/* Random A [r, in] and B [out, r] (B nonzero, so bytes are checked) for every
 * layer and module, listed in reverse name-unrelated order. */
static void make_adapter(adapter *a) {
    int k = 0;
    for (int l = N_LAYERS - 1; l >= 0; l--)
        for (int m = N_MOD - 1; m >= 0; m--)
            for (int ab = 0; ab < 2; ab++, k++) {
                int rows = ab ? MOD_OUT[m] : RANK, cols = ab ? RANK : MOD_IN[m];
                assert_int_equal(peft_tensor_name(a->names[k], sizeof a->names[k], l, llama_linears[m].parent,
                                                  llama_linears[m].peft, ab ? 'B' : 'A'), 0);
                a->data[k] = malloc((size_t)rows * (size_t)cols * sizeof(float));
                assert_non_null(a->data[k]);
                for (int i = 0; i < rows * cols; i++)
                    a->data[k][i] = rng_uniform(1234, (uint64_t)k, (uint64_t)i) * 2.0f - 1.0f;
                a->ts[k] = (st_tensor){a->names[k], "F32", 2, {rows, cols}, a->data[k],
                                       (size_t)rows * (size_t)cols * sizeof(float)};
            }
}

static void free_adapter(adapter *a) {
    for (int k = 0; k < N_LAYERS * N_MOD * 2; k++) free(a->data[k]);
}

static int cmp_str(const void *x, const void *y) { return strcmp(*(const char *const *)x, *(const char *const *)y); }

static void write_adapter_dir(const char *dir, adapter *a) {
    char p[256];
    qerr e = {{0}};
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    if (safetensors_write(p, a->ts, N_LAYERS * N_MOD * 2, NULL, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    peft_lora_config c = {RANK, 8.0f, 0.05f, 0, (const char **)MODS, N_MOD, "HuggingFaceTB/SmolLM2-135M-Instruct", NULL, 0};
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    if (peft_write_adapter_config(p, &c, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
}

static void test_adapter_round_trip(void **state) {
    const tmpdir *t = *state;
    adapter *a = calloc(1, sizeof *a);
    assert_non_null(a);
    make_adapter(a);
    write_adapter_dir(t->dir, a);
    const char *keep = getenv("QLORA_TEST_EXPORT_DIR");
    if (keep && *keep) {
        mkdir(keep, 0755);
        write_adapter_dir(keep, a);
    }

    char path[256], tmp[300];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", t->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(access(tmp, F_OK), -1);
    qerr e = {{0}};
    safetensors_file *f;
    assert_int_equal(safetensors_open(path, &f, &e), 0);
    assert_int_equal(safetensors_count(f), N_LAYERS * N_MOD * 2);
    assert_string_equal(safetensors_metadata(f, "format"), "pt");
    for (int k = 0; k < N_LAYERS * N_MOD * 2; k++) {
        st_tensor g;
        assert_int_equal(safetensors_find(f, a->names[k], &g, &e), 0);
        assert_string_equal(g.dtype, "F32");
        assert_int_equal(g.n_dims, 2);
        assert_int_equal(g.shape[0], a->ts[k].shape[0]);
        assert_int_equal(g.shape[1], a->ts[k].shape[1]);
        assert_int_equal(g.nbytes, a->ts[k].nbytes);
        assert_memory_equal(g.data, a->data[k], g.nbytes);
    }
    /* file order = sorted names (one dtype), data contiguous */
    const char *sorted[N_LAYERS * N_MOD * 2];
    for (int k = 0; k < N_LAYERS * N_MOD * 2; k++) sorted[k] = a->names[k];
    qsort(sorted, N_LAYERS * N_MOD * 2, sizeof *sorted, cmp_str);
    for (int i = 0; i < N_LAYERS * N_MOD * 2; i++) {
        st_tensor g;
        safetensors_get(f, i, &g);
        assert_string_equal(g.name, sorted[i]);
    }
    safetensors_close(f);

    /* the raw header: padded to 8 with spaces, metadata first, names in order */
    size_t n;
    uint8_t *raw = read_all(path, &n);
    assert_non_null(raw);
    uint64_t hn = 0;
    for (int i = 0; i < 8; i++) hn |= (uint64_t)raw[i] << (8 * i);
    assert_int_equal(hn % 8, 0);
    char *hdr = malloc(hn + 1);
    memcpy(hdr, raw + 8, hn);
    hdr[hn] = 0;
    assert_memory_equal(hdr, "{\"__metadata__\":{\"format\":\"pt\"},\"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight\":{\"dtype\":\"F32\",\"shape\":[4,96],\"data_offsets\":[0,1536]},",
                        strlen("{\"__metadata__\":{\"format\":\"pt\"},\"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight\":{\"dtype\":\"F32\",\"shape\":[4,96],\"data_offsets\":[0,1536]},"));
    char *last = strrchr(hdr, '}');
    assert_non_null(last);
    for (char *q = last + 1; *q; q++) assert_int_equal(*q, ' ');
    assert_true(strlen(last + 1) < 8);
    const char *prev = hdr;
    for (int i = 0; i < N_LAYERS * N_MOD * 2; i++) {
        char quoted[128];
        snprintf(quoted, sizeof quoted, "\"%s\"", sorted[i]);
        const char *at = strstr(hdr, quoted);
        assert_non_null(at);
        assert_true(at > prev);
        prev = at;
    }
    free(hdr);
    free(raw);

    /* adapter_config.json parses and holds the fields */
    snprintf(path, sizeof path, "%s/adapter_config.json", t->dir);
    raw = read_all(path, &n);
    assert_non_null(raw);
    cJSON *j = cJSON_Parse((const char *)raw);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "peft_type")->valuestring, "LORA");
    assert_string_equal(cJSON_GetObjectItem(j, "task_type")->valuestring, "CAUSAL_LM");
    assert_int_equal(cJSON_GetObjectItem(j, "r")->valueint, RANK);
    assert_true(cJSON_GetObjectItem(j, "lora_alpha")->valuedouble == 8.0);
    assert_true(cJSON_GetObjectItem(j, "lora_dropout")->valuedouble == 0.05);
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(j, "use_rslora")));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(j, "inference_mode")));
    assert_string_equal(cJSON_GetObjectItem(j, "bias")->valuestring, "none");
    assert_string_equal(cJSON_GetObjectItem(j, "base_model_name_or_path")->valuestring,
                        "HuggingFaceTB/SmolLM2-135M-Instruct");
    cJSON *tm = cJSON_GetObjectItem(j, "target_modules");
    assert_int_equal(cJSON_GetArraySize(tm), N_MOD);
    for (int m = 0; m < N_MOD; m++) assert_string_equal(cJSON_GetArrayItem(tm, m)->valuestring, MODS[m]);
    const char *nulls[] = {"revision", "modules_to_save", "layers_to_transform", "layers_pattern", "megatron_config",
                           "exclude_modules"};
    for (size_t i = 0; i < sizeof nulls / sizeof nulls[0]; i++) assert_true(cJSON_IsNull(cJSON_GetObjectItem(j, nulls[i])));
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "rank_pattern")), 0);
    assert_int_equal(cJSON_GetArraySize(j), 26);
    cJSON_Delete(j);
    free(raw);
    free_adapter(a);
    free(a);
}

static void test_adapter_config_text(void **state) {
    const tmpdir *t = *state;
    char path[256];
    qerr e = {{0}};
    snprintf(path, sizeof path, "%s/cfg.json", t->dir);
    const char *tm[2] = {"q_proj", "v_proj"};
    peft_lora_config c = {8, 16.0f, 0.05f, 0, tm, 2, "HuggingFaceTB/SmolLM2-135M-Instruct", NULL, 0};
    assert_int_equal(peft_write_adapter_config(path, &c, &e), 0);
    /* exactly Python's json.dumps(asdict(cfg), indent=2, sort_keys=True) */
    const char *want =
        "{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\": "
        "\"HuggingFaceTB/SmolLM2-135M-Instruct\",\n  \"bias\": \"none\",\n  \"exclude_modules\": null,\n  "
        "\"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n  "
        "\"layer_replication\": null,\n  \"layers_pattern\": null,\n  \"layers_to_transform\": null,\n  "
        "\"loftq_config\": {},\n  \"lora_alpha\": 16,\n  \"lora_bias\": false,\n  \"lora_dropout\": 0.05,\n  "
        "\"megatron_config\": null,\n  \"megatron_core\": \"megatron.core\",\n  \"modules_to_save\": null,\n  "
        "\"peft_type\": \"LORA\",\n  \"r\": 8,\n  \"rank_pattern\": {},\n  \"revision\": null,\n  "
        "\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ],\n  \"task_type\": \"CAUSAL_LM\",\n  "
        "\"use_dora\": false,\n  \"use_rslora\": false\n}";
    size_t n;
    char *got = (char *)read_all(path, &n);
    assert_non_null(got);
    assert_string_equal(got, want);
    free(got);

    /* Python float repr, ensure_ascii, null base model, rslora */
    c.lora_alpha = 16.5f;
    c.lora_dropout = 0.0f;
    c.use_rslora = 1;
    c.base_model_name_or_path = "mod\xc3\xa8le/\xf0\x9f\x98\x80 \"q\" \\ \x01\x7f";
    assert_int_equal(peft_write_adapter_config(path, &c, &e), 0);
    got = (char *)read_all(path, &n);
    assert_non_null(strstr(got, "\"lora_alpha\": 16.5,\n"));
    assert_non_null(strstr(got, "\"lora_dropout\": 0.0,\n"));
    assert_non_null(strstr(got, "\"use_rslora\": true\n}"));
    assert_non_null(strstr(got, "\"base_model_name_or_path\": \"mod\\u00e8le/\\ud83d\\ude00 \\\"q\\\" \\\\ "
                                "\\u0001\\u007f\",\n"));
    free(got);
    c.lora_dropout = 1e-5f;
    c.lora_alpha = 1e16f;
    c.base_model_name_or_path = NULL;
    assert_int_equal(peft_write_adapter_config(path, &c, &e), 0);
    got = (char *)read_all(path, &n);
    assert_non_null(strstr(got, "\"lora_dropout\": 1e-05,\n"));
    assert_non_null(strstr(got, "\"base_model_name_or_path\": null,\n"));
    free(got);
    c.lora_dropout = 0.1f;
    c.lora_alpha = 2.5e-7f;
    assert_int_equal(peft_write_adapter_config(path, &c, &e), 0);
    got = (char *)read_all(path, &n);
    assert_non_null(strstr(got, "\"lora_dropout\": 0.1,\n"));
    assert_non_null(strstr(got, "\"lora_alpha\": 2.5e-07,\n"));
    free(got);

    c.r = 0;
    assert_int_equal(peft_write_adapter_config(path, &c, &e), -1);
    assert_non_null(strstr(e.msg, "r must be positive"));
    c.r = 8;
    c.n_target_modules = 0;
    assert_int_equal(peft_write_adapter_config(path, &c, &e), -1);
}

static void test_tensor_names(void **state) {
    (void)state;
    char b[128];
    /* the Llama table (model/llama_linear.h) gives PEFT's names */
    static const char *const want[LLAMA_N_LINEAR] = {
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight",
        "base_model.model.model.layers.3.mlp.gate_proj.lora_A.weight",
        "base_model.model.model.layers.3.mlp.up_proj.lora_A.weight",
        "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"};
    static const char *const gguf[LLAMA_N_LINEAR] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                                      "ffn_gate", "ffn_up", "ffn_down"};
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        assert_int_equal(peft_tensor_name(b, sizeof b, 3, llama_linears[k].parent, llama_linears[k].peft, 'A'), 0);
        assert_string_equal(b, want[k]);
        assert_string_equal(llama_linears[k].gguf, gguf[k]);
        assert_int_equal(llama_linear_from_peft(llama_linears[k].peft, strlen(llama_linears[k].peft)), k);
        peft_name_parts n;
        assert_int_equal(peft_tensor_name_parse(b, &n), 0);
        assert_int_equal(n.layer, 3);
        assert_int_equal(n.ab, 'A');
        assert_int_equal(n.parent_len, strlen(llama_linears[k].parent));
        assert_memory_equal(n.parent, llama_linears[k].parent, n.parent_len);
        assert_int_equal(n.module_len, strlen(llama_linears[k].peft));
        assert_memory_equal(n.module, llama_linears[k].peft, n.module_len);
    }
    assert_int_equal(llama_linear_from_peft("lm_head", 7), -1);
    assert_int_equal(llama_linear_from_peft("q_proj", 5), -1);
    assert_int_equal(peft_tensor_name(b, sizeof b, 29, "self_attn", "o_proj", 'b'), 0);
    assert_string_equal(b, "base_model.model.model.layers.29.self_attn.o_proj.lora_B.weight");
    assert_int_equal(peft_tensor_name(b, sizeof b, 3, "mlp", "down_proj", 'B'), 0);
    assert_string_equal(b, "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight");
    assert_int_equal(peft_tensor_name(b, sizeof b, 3, "", "q_proj", 'A'), -1);
    assert_int_equal(peft_tensor_name(b, sizeof b, 3, "self_attn", "q.proj", 'A'), -1);
    assert_int_equal(peft_tensor_name(b, sizeof b, 3, NULL, "q_proj", 'A'), -1);
    assert_int_equal(peft_tensor_name(b, sizeof b, 3, "self_attn", "q_proj", 'C'), -1);
    assert_int_equal(peft_tensor_name(b, sizeof b, -1, "self_attn", "q_proj", 'A'), -1);
    assert_int_equal(peft_tensor_name(b, 20, 0, "self_attn", "q_proj", 'A'), -1);
    assert_string_equal(b, "");
    /* names that are not LoRA tensor names */
    peft_name_parts n;
    assert_int_equal(peft_tensor_name_parse("base_model.model.model.layers.29.self_attn.o_proj.lora_B.weight", &n), 0);
    assert_int_equal(n.layer, 29);
    assert_int_equal(n.ab, 'B');
    assert_int_equal(peft_tensor_name_parse("base_model.model.model.layers.x.self_attn.o_proj.lora_B.weight", &n), -1);
    assert_int_equal(peft_tensor_name_parse("base_model.model.model.layers.-1.self_attn.o_proj.lora_B.weight", &n), -1);
    assert_int_equal(peft_tensor_name_parse("base_model.model.model.layers.0.o_proj.lora_B.weight", &n), -1);
    assert_int_equal(peft_tensor_name_parse("base_model.model.model.layers.0.self_attn.o_proj.lora_C.weight", &n), -1);
    assert_int_equal(peft_tensor_name_parse("base_model.model.model.layers.0.self_attn..lora_A.weight", &n), -1);
    assert_int_equal(peft_tensor_name_parse("model.layers.0.self_attn.o_proj.lora_A.weight", &n), -1);
}

static void test_write_errors_atomic(void **state) {
    const tmpdir *t = *state;
    char path[128], tmp[160];
    qerr e = {{0}};
    snprintf(path, sizeof path, "%s/keep.safetensors", t->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    float d[4] = {1, 2, 3, 4};
    st_tensor ok = {"w", "F32", 1, {4}, d, 16};
    assert_int_equal(safetensors_write(path, &ok, 1, NULL, &e), 0);
    size_t n0, n1;
    uint8_t *before = read_all(path, &n0);

    st_tensor bad = {"w", "F33", 1, {4}, d, 16};
    assert_int_equal(safetensors_write(path, &bad, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "tensor \"w\": unknown dtype \"F33\""));
    bad = (st_tensor){"w", "F32", 2, {4, 2}, d, 16};
    assert_int_equal(safetensors_write(path, &bad, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "tensor \"w\": nbytes 16 does not match shape x F32 (32 bytes)"));
    st_tensor two[2] = {ok, ok};
    assert_int_equal(safetensors_write(path, two, 2, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "tensor name \"w\" used twice"));
    bad = (st_tensor){"__metadata__", "F32", 1, {4}, d, 16};
    assert_int_equal(safetensors_write(path, &bad, 1, NULL, &e), -1);
    assert_int_equal(safetensors_write(path, &ok, 1, "{\"format\": 3}", &e), -1);
    assert_non_null(strstr(e.msg, "metadata value for \"format\" is not a string"));
    assert_int_equal(safetensors_write(path, &ok, 1, "[1]", &e), -1);

    uint8_t *after = read_all(path, &n1);
    assert_int_equal(n0, n1);
    assert_memory_equal(before, after, n0);
    assert_int_equal(access(tmp, F_OK), -1);
    free(before);
    free(after);

    assert_int_equal(safetensors_write("/nonexistent/dir/a.safetensors", &ok, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "cannot create /nonexistent/dir/a.safetensors.tmp"));
}

/* Write a file from a header text (padded here) and `nd` data bytes. */
static void write_raw(const char *path, const char *header, size_t nd, int pad) {
    size_t hn = strlen(header), pn = pad ? (8 - hn % 8) % 8 : 0;
    size_t total = 8 + hn + pn + nd;
    uint8_t *b = calloc(1, total);
    assert_non_null(b);
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)(hn + pn) >> (8 * i));
    memcpy(b + 8, header, hn);
    memset(b + 8 + hn, ' ', pn);
    write_bytes(path, b, total);
    free(b);
}

static void expect_open_error(const char *path, const char *substr) {
    safetensors_file *f = NULL;
    qerr e = {{0}};
    int rc = safetensors_open(path, &f, &e);
    if (rc == 0 || !strstr(e.msg, substr)) {
        print_error("open: rc=%d msg=[%s], expected [%s]\n", rc, e.msg, substr);
        if (rc == 0) safetensors_close(f);
        fail();
    }
    assert_null(f);
}

static void test_reader_rejects(void **state) {
    const tmpdir *t = *state;
    char p[128];
    snprintf(p, sizeof p, "%s/bad.safetensors", t->dir);
    const char *T2 = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[%d,%d]}}";
    char h[512];

    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 1);
    safetensors_file *f;
    qerr e = {{0}};
    assert_int_equal(safetensors_open(p, &f, &e), 0); /* control: valid */
    safetensors_close(f);

    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, 1);
    expect_open_error(p, "tensors cover 8 bytes but the data section has 4");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12, 1);
    expect_open_error(p, "tensors cover 8 bytes but the data section has 12");
    snprintf(h, sizeof h, T2, 12, 20);
    write_raw(p, h, 20, 1);
    expect_open_error(p, "tensor \"b\" starts at buffer offset 12, expected 8 (a hole)");
    snprintf(h, sizeof h, T2, 4, 12);
    write_raw(p, h, 12, 1);
    expect_open_error(p, "tensor \"b\" starts at buffer offset 4, expected 8 (an overlap)");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, 1);
    expect_open_error(p, "tensor \"a\": data_offsets [0, 4] hold 4 bytes, dtype and shape need 8");
    write_raw(p, "{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, 1);
    expect_open_error(p, "tensor \"a\": missing or unknown dtype");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, 1);
    expect_open_error(p, "shape entries must be integers >= 0");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, 1);
    expect_open_error(p, "data_offsets must be [begin, end] with begin <= end");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
              16, 1);
    expect_open_error(p, "tensor \"a\" appears twice");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}xyz", 8, 1);
    expect_open_error(p, "unexpected bytes after the header JSON");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",", 8, 1);
    expect_open_error(p, "header is not a valid JSON object");
    write_raw(p, " {}", 0, 1);
    expect_open_error(p, "header does not start with '{'");
    write_raw(p, "{\"\xff\":1}", 0, 1);
    expect_open_error(p, "header is not valid UTF-8");
    write_raw(p, "{\"__metadata__\":{\"format\":1}}", 0, 1);
    expect_open_error(p, "__metadata__ value for \"format\" is not a string");
    write_raw(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,2],\"data_offsets\":[0,8]}}", 8, 1);
    expect_open_error(p, "5 dimensions (at most 4 supported)");

    uint8_t small[5] = {1, 2, 3, 4, 5};
    write_bytes(p, small, 5);
    expect_open_error(p, "5 bytes is too small for a safetensors file");
    uint8_t big[16] = {0x00, 0xc2, 0xeb, 0x0b, 0, 0, 0, 0, '{', '}'}; /* 200,000,000 */
    write_bytes(p, big, 16);
    expect_open_error(p, "header size 200000000 exceeds the 100 MB safetensors limit");
    uint8_t past[16] = {64, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_bytes(p, past, 16);
    expect_open_error(p, "header size 64 runs past the end of the file (16 bytes)");
    expect_open_error("/nonexistent/x.safetensors", "cannot open /nonexistent/x.safetensors");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rust_vectors),        cmocka_unit_test(test_dtype_order),
        cmocka_unit_test(test_adapter_round_trip),  cmocka_unit_test(test_adapter_config_text),
        cmocka_unit_test(test_tensor_names),        cmocka_unit_test(test_write_errors_atomic),
        cmocka_unit_test(test_reader_rejects),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
