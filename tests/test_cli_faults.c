/* tests/test_cli_faults.c — bad input never hurts: one test per class of bad
 * input, each running the real CLI (bin/qlora-train, or $QLORA_TRAIN_BIN) as
 * a subprocess and asserting the exit code, the one-line message (file, field,
 * what was expected) and that an output_dir holding the outputs of an earlier
 * run is byte-for-byte untouched. Plus the parsers' own checks on corrupt
 * safetensors and checkpoint files. Needs the default model (make model). */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "core/file.h"
#include "core/strbuf.h"
#include "tests/cli_fixture.h"
#include "tests/ref_fixture.h"
#include "tests/subproc.h"
#include "trainer/checkpoint.h"

#define MODEL CLI_FIXTURE_MODEL

static cli_fixture g_fx; /* scratch directory, config, output_dir with an earlier run's outputs */
#define g_dir g_fx.dir
#define g_cfg g_fx.cfg
#define g_out g_fx.out

static int setup(void **st) {
    (void)st;
    return cli_fixture_init(
        &g_fx, "/tmp/qlora-faults-XXXXXX",
        "{\"text\": \"The open() system call opens the file specified by pathname.\"}\n"
        "{\"text\": \"If the specified file does not exist, it may optionally be created by open().\"}\n"
        "{\"text\": \"The return value of open() is a file descriptor, a small, nonnegative integer.\"}\n");
}

static int teardown(void **st) {
    (void)st;
    return cli_fixture_free(&g_fx);
}

static unsigned char *read_bytes(const char *path, size_t max, size_t *n) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    unsigned char *buf = malloc(max);
    assert_non_null(buf);
    *n = fread(buf, 1, max, f);
    fclose(f);
    return buf;
}

/* Run `qlora-train cfg args...`; check the exit code, that the last stderr
 * line is one "qlora-train: ..." line holding every `want` substring, and that
 * g_out is unchanged. `want` is NULL-terminated. */
static void expect_failure(const char *cfg, const char *const *args, int want_code, const char *const *want) {
    char *argv[32];
    int n = 0;
    argv[n++] = (char *)subproc_trainer();
    argv[n++] = (char *)cfg;
    for (int i = 0; args && args[i] && n < 31; i++) argv[n++] = (char *)args[i];
    argv[n] = NULL;
    cli_expect_failure(argv, 120, want_code, "qlora-train", want, g_out);
}

#define ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})
#define WANT(...) ((const char *const[]){__VA_ARGS__, NULL})

static void test_yaml_errors(void **st) {
    (void)st;
    char p[512];
    snprintf(p, sizeof p, "%s/syntax.yaml", g_dir);
    cli_write_text(p, "base_model: x.gguf\nlora_target_modules: [q_proj,\ndatasets: []\n");
    expect_failure(p, NULL, 2, WANT("syntax.yaml:", "YAML syntax error"));
    snprintf(p, sizeof p, "%s/notamapping.yaml", g_dir);
    cli_write_text(p, "- just\n- a list\n");
    expect_failure(p, NULL, 2, WANT("notamapping.yaml", "expected a mapping"));
    snprintf(p, sizeof p, "%s/empty.yaml", g_dir);
    cli_write_text(p, "");
    expect_failure(p, NULL, 2, WANT("empty.yaml", "empty"));
    snprintf(p, sizeof p, "%s/missing.yaml", g_dir);
    expect_failure(p, NULL, 2, WANT("missing.yaml", "No such file"));
}

static void test_wrong_types_and_ranges(void **st) {
    (void)st;
    char p[512];
    snprintf(p, sizeof p, "%s/types.yaml", g_dir);
    cli_write_text(p, "base_model: " MODEL "\nadapter: qlora\nlora_r: abc\n");
    expect_failure(p, NULL, 2, WANT("types.yaml", "lora_r", "expected a positive integer", "\"abc\"", "line 3"));
    expect_failure(g_cfg, ARGS("lora_dropout=1.5"), 2, WANT("lora_dropout", "[0, 1)", "1.5"));
    expect_failure(g_cfg, ARGS("learning_rate=-1"), 2, WANT("learning_rate", "positive"));
    expect_failure(g_cfg, ARGS("sequence_len=1"), 2, WANT("sequence_len", ">= 2"));
    expect_failure(g_cfg, ARGS("max_nan_steps=0"), 2, WANT("max_nan_steps", "positive"));
    expect_failure(g_cfg, ARGS("save_total_limit=-3"), 2, WANT("save_total_limit", ">= 0"));
    expect_failure(g_cfg, ARGS("skip_bad_lines=maybe"), 2, WANT("skip_bad_lines", "true or false"));
    expect_failure(g_cfg, ARGS("datasets=[{path: a.jsonl, type: sharegpt}]"), 2,
                   WANT("datasets[0].type", "completion, alpaca, chat_template"));
    expect_failure(g_cfg, ARGS("save_steps=5", "saves_per_epoch=2"), 2, WANT("save_steps", "saves_per_epoch"));
}

/* device: cuda is refused before anything is written (no backend in this binary, no device, or
 * the trainer's host-memory data the kernels cannot read yet: trainer/run.c setup_device). */
static void test_device(void **st) {
    (void)st;
    expect_failure(g_cfg, ARGS("device=cuda"), 1, WANT("config.yaml", "device: cuda"));
    expect_failure(g_cfg, ARGS("device=gpu"), 2, WANT("device", "auto, cpu, cuda", "\"gpu\""));
}

static void test_unknown_keys(void **st) {
    (void)st;
    char p[512];
    snprintf(p, sizeof p, "%s/unknown.yaml", g_dir);
    cli_write_text(p, "base_model: " MODEL "\nadapter: qlora\nlora_rank: 8\n");
    expect_failure(p, NULL, 2, WANT("unknown.yaml", "unknown key \"lora_rank\"", "did you mean \"lora_r\""));
    expect_failure(g_cfg, ARGS("save_step=10"), 2, WANT("command line", "unknown key \"save_step\"", "save_steps"));
}

static void test_missing_files(void **st) {
    (void)st;
    char a[600];
    snprintf(a, sizeof a, "base_model=%s/nope.gguf", g_dir);
    expect_failure(g_cfg, ARGS(a), 1, WANT("base_model", "nope.gguf", "No such file"));
    snprintf(a, sizeof a, "datasets=[{path: %s/none.jsonl, type: completion}]", g_dir);
    expect_failure(g_cfg, ARGS(a), 1, WANT("datasets[0].path", "none.jsonl", "No such file"));
    snprintf(a, sizeof a, "test_datasets=[{path: %s/none2.jsonl, type: completion}]", g_dir);
    expect_failure(g_cfg, ARGS(a), 1, WANT("test_datasets[0].path", "none2.jsonl"));
    snprintf(a, sizeof a, "resume_from_checkpoint=%s/no-such-checkpoint", g_dir);
    expect_failure(g_cfg, ARGS(a), 1, WANT("resume_from_checkpoint", "no-such-checkpoint", "No such file"));
}

static void test_corrupt_gguf(void **st) {
    (void)st;
    size_t n = 0;
    unsigned char *b = read_bytes(MODEL, 4u << 20, &n);
    assert_int_equal(n, 4u << 20);
    char p[512], a[600];
    /* truncated: tensor data (and most tensor infos) past the end of the file */
    snprintf(p, sizeof p, "%s/truncated.gguf", g_dir);
    cli_write_bytes(p, b, 2u << 20);
    snprintf(a, sizeof a, "base_model=%s", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("base_model", "truncated.gguf", "truncated or corrupt"));
    /* header only */
    cli_write_bytes(p, b, 20);
    expect_failure(g_cfg, ARGS(a), 1, WANT("truncated.gguf", "too small for a GGUF header"));
    /* wrong magic */
    unsigned char save[8];
    memcpy(save, b, 8);
    memcpy(b, "GGUX", 4);
    snprintf(p, sizeof p, "%s/magic.gguf", g_dir);
    cli_write_bytes(p, b, 1u << 20);
    snprintf(a, sizeof a, "base_model=%s", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("magic.gguf", "not a GGUF file"));
    memcpy(b, save, 8);
    /* a count past anything the file can hold */
    uint64_t huge = (uint64_t)1 << 19;
    memcpy(b + 8, &huge, 8);
    snprintf(p, sizeof p, "%s/count.gguf", g_dir);
    cli_write_bytes(p, b, 1u << 20);
    snprintf(a, sizeof a, "base_model=%s", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("count.gguf", "truncated or corrupt"));
    /* a string length that overflows (u64 max) in the first KV */
    memcpy(b, save, 8);
    memset(b + 8, 0, 8);
    b[8] = 1;
    uint64_t big = UINT64_MAX;
    memcpy(b + 24, &big, 8);
    snprintf(p, sizeof p, "%s/strlen.gguf", g_dir);
    cli_write_bytes(p, b, 1u << 20);
    snprintf(a, sizeof a, "base_model=%s", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("strlen.gguf", "truncated or corrupt"));
    free(b);
}

static void test_bad_jsonl(void **st) {
    (void)st;
    char p[512], a[700];
    snprintf(p, sizeof p, "%s/bad.jsonl", g_dir);
    cli_write_text(p, "{\"text\": \"fine line\"}\n{\"text\": \"cut off\n{\"text\": \"fine again\"}\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("bad.jsonl:2", "invalid JSON", "skip_bad_lines"));
    snprintf(p, sizeof p, "%s/field.jsonl", g_dir);
    cli_write_text(p, "{\"txt\": \"wrong field name\"}\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("field.jsonl:1", "field \"text\" missing or not a string"));
    snprintf(p, sizeof p, "%s/array.jsonl", g_dir);
    cli_write_text(p, "[1, 2, 3]\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: alpaca}]", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("array.jsonl:1", "expected a JSON object, got an array"));
    /* skipping cannot make an all-bad file valid */
    snprintf(p, sizeof p, "%s/allbad.jsonl", g_dir);
    cli_write_text(p, "not json\n{\"nope\": 1}\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_failure(g_cfg, ARGS(a, "skip_bad_lines=true"), 1, WANT("allbad.jsonl", "no valid records", "2"));
}

static void test_empty_dataset(void **st) {
    (void)st;
    char p[512], a[700];
    snprintf(p, sizeof p, "%s/empty.jsonl", g_dir);
    cli_write_text(p, "\n  \n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("datasets", "empty.jsonl", "no records"));
    expect_failure(g_cfg, ARGS("val_set_size=3"), 1, WANT("val_set_size", "at least one must remain"));
}

static void test_sequence_len_beyond_context(void **st) {
    (void)st;
    expect_failure(g_cfg, ARGS("sequence_len=9000"), 1,
                   WANT("sequence_len", "9000", "context length 8192", "llama.context_length"));
}

/* Mistral v0.1's sliding window: full attention equals it only within the window, so a longer sequence_len is
 * refused by name (the tiny Mistral of tests/fixtures/ref_mistral.qref.gz, its window cut to 16 tokens). */
static void test_sequence_len_beyond_sliding_window(void **st) {
    (void)st;
    ref_file rf;
    ref_open_or_fail("tests/fixtures/ref_mistral.qref.gz", &rf);
    char dir[512], p[600], a[700];
    qerr e = {{0}};
    snprintf(dir, sizeof dir, "%s/mistral_hf", g_dir);
    assert_int_equal(file_mkdir_p(dir, &e), 0);
    static const char *const files[][2] = {{"model.safetensors", "hf.safetensors"},
                                           {"tokenizer.json", "hf.tokenizer_json"},
                                           {"tokenizer_config.json", "hf.tokenizer_config_json"}};
    for (int i = 0; i < 3; i++) {
        const ref_array *arr = ref_find(&rf, files[i][1]);
        assert_non_null(arr);
        snprintf(p, sizeof p, "%s/%s", dir, files[i][0]);
        assert_int_equal(file_write_atomic(p, arr->data, (size_t)arr->numel, &e), 0);
    }
    char *cfg = ref_str(&rf, "hf.config_json");
    char *w = strstr(cfg, "\"sliding_window\": 4096");
    assert_non_null(w);
    memcpy(w, "\"sliding_window\":   16", strlen("\"sliding_window\": 4096"));
    snprintf(p, sizeof p, "%s/config.json", dir);
    cli_write_text(p, cfg);
    free(cfg);
    ref_close(&rf);
    snprintf(a, sizeof a, "base_model=%s", dir);
    expect_failure(g_cfg, ARGS(a, "sequence_len=32"), 1, WANT("sequence_len", "32", "sliding_window of 16"));
}

/* The tiny Phi-3 of tests/fixtures/ref_phi3.qref.gz as an HF directory under g_dir/<sub>, its config.json with
 * `from` replaced by `to` (both NULL: as saved). */
static void write_phi3(const char *sub, const char *from, const char *to, char *dir, size_t dn) {
    ref_file rf;
    ref_open_or_fail("tests/fixtures/ref_phi3.qref.gz", &rf);
    char p[700];
    qerr e = {{0}};
    snprintf(dir, dn, "%s/%s", g_dir, sub);
    assert_int_equal(file_mkdir_p(dir, &e), 0);
    static const char *const files[][2] = {{"model.safetensors", "hf.safetensors"},
                                           {"tokenizer.json", "hf.tokenizer_json"},
                                           {"tokenizer_config.json", "hf.tokenizer_config_json"}};
    for (int i = 0; i < 3; i++) {
        const ref_array *arr = ref_find(&rf, files[i][1]);
        assert_non_null(arr);
        snprintf(p, sizeof p, "%s/%s", dir, files[i][0]);
        assert_int_equal(file_write_atomic(p, arr->data, (size_t)arr->numel, &e), 0);
    }
    char *cfg = ref_str(&rf, "hf.config_json");
    strbuf b = {0};
    const char *w = from ? strstr(cfg, from) : NULL;
    if (from) assert_non_null(w);
    if (w) {
        strbuf_put(&b, cfg, (size_t)(w - cfg));
        strbuf_puts(&b, to);
        strbuf_puts(&b, w + strlen(from));
    } else {
        strbuf_puts(&b, cfg);
    }
    snprintf(p, sizeof p, "%s/config.json", dir);
    cli_write_text(p, b.p);
    free(b.p);
    free(cfg);
    ref_close(&rf);
}

/* Phi-3 (fused qkv_proj / gate_up_proj): LoRA targets are its own module names, and what its config holds that
 * changes the maths and is not implemented is refused by name: longrope, dropout inside the network, partial
 * rotary embeddings, and a sequence_len beyond its sliding_window (2047 as Phi-3-mini-4k; cut to 16 here). */
static void test_phi3_refusals(void **st) {
    (void)st;
    char dir[512], a[700];
    write_phi3("phi3_hf", NULL, NULL, dir, sizeof dir);
    snprintf(a, sizeof a, "base_model=%s", dir);
    expect_failure(g_cfg, ARGS(a, "lora_target_linear=false", "lora_target_modules=[q_proj, v_proj]"), 1,
                   WANT("lora_target_modules", "\"q_proj\"", "phi3", "qkv_proj, o_proj, gate_up_proj, down_proj"));
    write_phi3("phi3_window", "\"sliding_window\": 2047", "\"sliding_window\": 16", dir, sizeof dir);
    snprintf(a, sizeof a, "base_model=%s", dir); /* the window cut to 16 tokens: the tiny model has 256 positions */
    expect_failure(g_cfg, ARGS(a, "sequence_len=32"), 1, WANT("sequence_len", "32", "sliding_window of 16"));
    write_phi3("phi3_longrope", "\"rope_type\": \"default\"",
               "\"rope_type\": \"longrope\", \"short_factor\": [1,1,1,1,1,1,1,1], "
               "\"long_factor\": [2,2,2,2,2,2,2,2]", dir, sizeof dir);
    snprintf(a, sizeof a, "base_model=%s", dir);
    expect_failure(g_cfg, ARGS(a), 1, WANT("config.json", "rope_type \"longrope\"", "not implemented"));
    write_phi3("phi3_dropout", "\"resid_pdrop\": 0.0", "\"resid_pdrop\": 0.1", dir, sizeof dir);
    snprintf(a, sizeof a, "base_model=%s", dir);
    expect_failure(g_cfg, ARGS(a), 1, WANT("config.json", "resid_pdrop", "only 0"));
    write_phi3("phi3_partial", "\"partial_rotary_factor\": 1.0", "\"partial_rotary_factor\": 0.5", dir, sizeof dir);
    snprintf(a, sizeof a, "base_model=%s", dir);
    expect_failure(g_cfg, ARGS(a), 1, WANT("config.json", "partial_rotary_factor"));
}

static void test_output_dir_unwritable(void **st) {
    (void)st;
    char p[512], a[600];
    snprintf(p, sizeof p, "%s/a-file", g_dir);
    cli_write_text(p, "a file where a directory should be");
    snprintf(a, sizeof a, "output_dir=%s", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("output_dir", "a-file"));
    snprintf(a, sizeof a, "output_dir=%s/sub", p);
    expect_failure(g_cfg, ARGS(a), 1, WANT("output_dir", "a-file"));
    expect_failure(g_cfg, ARGS("output_dir=/proc/qlora-out"), 1, WANT("output_dir", "/proc/qlora-out"));
    /* another trainer holds the directory */
    snprintf(p, sizeof p, "%s/.qlora-train.lock", g_out);
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    assert_int_equal(flock(fd, LOCK_EX | LOCK_NB), 0);
    expect_failure(g_cfg, NULL, 1, WANT("output_dir", "in use by another qlora-train"));
    close(fd);
}

/* A checkpoint in g_dir/ck/checkpoint-3 made with ckpt_save, for the given
 * fingerprints. */
static void make_checkpoint(const char *root, uint64_t model_fp, uint64_t tok_fp) {
    mkdir(root, 0755);
    float params[6] = {1, 2, 3, 4, 5, 6}, m[6] = {0}, v[6] = {0};
    ckpt_tensor t[2] = {{"a", 0, 1, 2}, {"b", 2, 2, 2}};
    ckpt_state s = {.step = 3, .total_steps = 10, .rows_consumed = 3, .n_rows = 10, .rows_per_step = 1,
                    .n_params = 6, .params = params, .exp_avg = m, .exp_avg_sq = v, .n_tensors = 2, .tensors = t,
                    .config_yaml = "lora_r: 2\n", .log_history = "", .log_history_len = 0, .opt_step = 3,
                    .model_fingerprint = model_fp, .tokenizer_fingerprint = tok_fp, .last_eval_step = -1};
    snprintf(s.lr_scheduler, sizeof s.lr_scheduler, "cosine");
    qerr e;
    int rc = ckpt_save(root, &s, NULL, NULL, NULL, 0, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
}

static void test_bad_checkpoints(void **st) {
    (void)st;
    char root[512], ck[600], a[700], p[700];
    gguf_file *gf;
    qerr e;
    assert_int_equal(gguf_open(MODEL, &gf, &e), 0);
    uint64_t tok_fp = ckpt_fingerprint_tokenizer(gf), model_fp = 0;
    gguf_close(gf);
    assert_int_equal(ckpt_fingerprint_model(MODEL, &model_fp, &e), 0);

    /* a different base model */
    snprintf(root, sizeof root, "%s/ck-other", g_dir);
    make_checkpoint(root, model_fp ^ 1, tok_fp);
    snprintf(ck, sizeof ck, "%s/checkpoint-3", root);
    snprintf(a, sizeof a, "resume_from_checkpoint=%s", ck);
    expect_failure(g_cfg, ARGS(a), 1, WANT("base_model", "different base model", "another output_dir"));
    /* a different tokenizer */
    snprintf(root, sizeof root, "%s/ck-tok", g_dir);
    make_checkpoint(root, model_fp, tok_fp ^ 1);
    snprintf(ck, sizeof ck, "%s/checkpoint-3", root);
    snprintf(a, sizeof a, "resume_from_checkpoint=%s", ck);
    expect_failure(g_cfg, ARGS(a), 1, WANT("base_model", "another tokenizer"));
    /* the same model, different training data */
    snprintf(root, sizeof root, "%s/ck-data", g_dir);
    make_checkpoint(root, model_fp, tok_fp);
    snprintf(ck, sizeof ck, "%s/checkpoint-3", root);
    snprintf(a, sizeof a, "resume_from_checkpoint=%s", ck);
    expect_failure(g_cfg, ARGS(a), 1, WANT("datasets", "training data differs"));
    /* corrupt state.h5: the marker's hash catches it before HDF5 parses it */
    snprintf(p, sizeof p, "%s/state.h5", ck);
    size_t n;
    unsigned char *b = read_bytes(p, 1 << 20, &n);
    b[n / 2] ^= 0x40;
    cli_write_bytes(p, b, n);
    expect_failure(g_cfg, ARGS(a), 1, WANT("resume_from_checkpoint", "state.h5 is corrupt"));
    cli_write_bytes(p, b, n / 2);
    expect_failure(g_cfg, ARGS(a), 1, WANT("resume_from_checkpoint", "truncated or replaced"));
    free(b);
    /* an incomplete one (no marker) */
    snprintf(a, sizeof a, "resume_from_checkpoint=%s/checkpoint-5", g_out);
    expect_failure(g_cfg, ARGS(a), 1, WANT("resume_from_checkpoint", "incomplete checkpoint"));
    /* checkpoints present but auto_resume_from_checkpoints: false */
    char cfg2[600];
    snprintf(cfg2, sizeof cfg2, "output_dir=%s/ck-tok", g_dir);
    /* (ck-tok's checkpoint is complete and verifies; refuse to start over on it) */
    expect_failure(g_cfg, ARGS(cfg2, "auto_resume_from_checkpoints=false"), 1,
                   WANT("auto_resume_from_checkpoints is false", "checkpoint-3"));
}

/* The parsers reject corrupt safetensors files with one line naming the file. */
static void test_corrupt_safetensors(void **st) {
    (void)st;
    char p[512];
    snprintf(p, sizeof p, "%s/good.safetensors", g_dir);
    float x[4] = {1, 2, 3, 4};
    st_tensor t = {.name = "w", .dtype = "F32", .n_dims = 2, .shape = {2, 2}, .data = x, .nbytes = sizeof x};
    qerr e;
    assert_int_equal(safetensors_write(p, &t, 1, NULL, &e), 0);
    size_t n;
    unsigned char *good = read_bytes(p, 4096, &n);
    safetensors_file *sf;
    assert_int_equal(safetensors_open(p, &sf, &e), 0);
    safetensors_close(sf);
    struct {
        const char *what;
        void (*mutate)(unsigned char *b, size_t *n);
    } cases[] = {
        {"truncated", NULL},
        {"header size past the end", NULL},
        {"header size 2^64-1", NULL},
        {"not JSON", NULL},
        {"offsets past the end", NULL},
        {"shape/size mismatch", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        unsigned char b[4096];
        memcpy(b, good, n);
        size_t m = n;
        uint64_t hl;
        memcpy(&hl, b, 8);
        char *hdr = (char *)b + 8;
        switch (i) {
        case 0: m = n - 5; break;
        case 1: hl = (uint64_t)n; memcpy(b, &hl, 8); break;
        case 2: hl = UINT64_MAX; memcpy(b, &hl, 8); break;
        case 3: hdr[0] = '['; break;
        case 4: {
            char *q = strstr(hdr, "16]");
            assert_non_null(q);
            memcpy(q, "99]", 3);
            break;
        }
        case 5: {
            char *q = strstr(hdr, "[2,2]");
            assert_non_null(q);
            memcpy(q, "[2,3]", 5);
            break;
        }
        }
        snprintf(p, sizeof p, "%s/bad%zu.safetensors", g_dir, i);
        cli_write_bytes(p, b, m);
        int rc = safetensors_open(p, &sf, &e);
        print_message("%s: %s\n", cases[i].what, rc ? e.msg : "(opened!)");
        assert_int_equal(rc, -1);
        assert_non_null(strstr(e.msg, p));
    }
    free(good);
}

/* A file with good and bad lines trains when skip_bad_lines is set, and says
 * how many lines it skipped. (This one runs a real, 1-step training.) */
static void test_skip_bad_lines_trains(void **st) {
    (void)st;
    char p[512], a[700], o[600];
    snprintf(p, sizeof p, "%s/mixed.jsonl", g_dir);
    cli_write_text(p,
               "{\"text\": \"The read() system call reads up to count bytes from a file descriptor.\"}\n"
               "{\"text\": broken}\n"
               "{\"text\": \"On success, the number of bytes read is returned.\"}\n"
               "{\"body\": \"wrong field\"}\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    snprintf(o, sizeof o, "output_dir=%s/out-skip", g_dir);
    char *argv[] = {(char *)subproc_trainer(), g_cfg, a, o, "skip_bad_lines=true", NULL};
    char *err = NULL;
    int code = subproc_run(argv, NULL, 600, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[data] skipped 2 malformed line(s)"));
    assert_non_null(strstr(err, "mixed.jsonl:2"));
    free(err);
}

/* An axolotl config with several refused keys: one run lists each with its line (the missing adapter
 * first), then the count, exit 2; qlora-preprocess prints the same [config] lines as qlora-train. */
static void test_axolotl_refusals_and_config_lines(void **st) {
    (void)st;
    char p[512];
    snprintf(p, sizeof p, "%s/axo.yaml", g_dir);
    cli_write_text(p, "base_model: " MODEL "\nneftune_noise_alpha: 5\noptimizer: adafactor\nfsdp: [hybrid_shard]\n");
    char *argv[] = {(char *)subproc_trainer(), p, NULL};
    char *err = NULL;
    int code = subproc_run(argv, NULL, 120, &err);
    print_message("exit %d:\n%s", code, err);
    assert_int_equal(code, 2);
    const char *want[] = {"axo.yaml: no \"adapter:\"", "neftune_noise_alpha: refused", "(line 2)", "optimizer: \"adafactor\"",
                          "(line 3)", "fsdp: HYBRID_SHARD is not implemented yet", "(line 4)",
                          "axo.yaml: 4 refused keys"};
    const char *at = err;
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) { /* in this order */
        const char *q = strstr(at, want[i]);
        if (!q) fail_msg("missing \"%s\" (in order) in:\n%s", want[i], err);
        at = q;
    }
    free(err);
    /* the [config] lines: the same from both tools */
    snprintf(p, sizeof p, "%s/axo_ok.yaml", g_dir);
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "base_model: " MODEL "\nadapter: qlora\nlora_target_linear: true\nattn_implementation: flash_attention_2\n"
             "tf32: true\ndatasets:\n  - path: %s/train.jsonl\n    type: completion\nsequence_len: 32\nmax_steps: 1\n"
             "output_dir: %s/axo_out\n",
             g_dir, g_dir);
    cli_write_text(p, cfg);
    char *pre[] = {(char *)subproc_tool("preprocess"), p, "--show-samples", "0", NULL};
    code = subproc_run(pre, NULL, 120, &err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[config] "));
    assert_non_null(strstr(err, "ignoring \"attn_implementation\" (qlora's attention is exact"));
    assert_non_null(strstr(err, "ignoring \"tf32\""));
    free(err);
    /* load_in_8bit: one [config] line says what it means here, and what of LLM.int8 is not applied */
    snprintf(p, sizeof p, "%s/axo_i8.yaml", g_dir);
    snprintf(cfg, sizeof cfg,
             "base_model: " MODEL "\nadapter: lora\nload_in_8bit: true\nlora_target_linear: true\n"
             "datasets:\n  - path: %s/train.jsonl\n    type: completion\nsequence_len: 32\nmax_steps: 1\n"
             "output_dir: %s/axo_out\n",
             g_dir, g_dir);
    cli_write_text(p, cfg);
    pre[1] = p;
    code = subproc_run(pre, NULL, 120, &err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[config] load_in_8bit: true: the frozen linears are stored as bitsandbytes' "
                                "Int8Params"));
    assert_non_null(strstr(err, "(llm_int8_threshold 6.0) are not applied"));
    free(err);
}

/* loss_watchdog_*: a loss above the threshold for patience steps stops the run with a checkpoint and
 * exit 1; special_tokens that are not the model's own are refused when the model is loaded. */
static void test_loss_watchdog_and_special_tokens(void **st) {
    (void)st;
    char od[600], a1[700], ck[700];
    snprintf(od, sizeof od, "%s/watchdog", g_dir);
    snprintf(a1, sizeof a1, "output_dir=%s", od);
    char *argv[] = {(char *)subproc_trainer(), g_cfg, a1, "max_steps=4", "loss_watchdog_threshold=0.001",
                    "loss_watchdog_patience=2", "save_steps=100", NULL};
    char *err = NULL;
    int code = subproc_run(argv, NULL, 300, &err);
    print_message("exit %d:\n%s", code, err);
    assert_int_equal(code, 1);
    assert_non_null(strstr(err, "above loss_watchdog_threshold 0.001 for 2 steps in a row"));
    assert_non_null(strstr(err, "stopped with a checkpoint in"));
    snprintf(ck, sizeof ck, "%s/checkpoint-2", od);
    assert_int_equal(access(ck, F_OK), 0); /* saved at the stop, not at save_steps */
    snprintf(ck, sizeof ck, "%s/checkpoint-3", od);
    assert_int_equal(access(ck, F_OK), -1);
    free(err);
    /* special_tokens: the model's own eos is accepted, another is refused naming both */
    char *pre_ok[] = {(char *)subproc_tool("preprocess"), g_cfg, "special_tokens={eos_token: \"<|im_end|>\"}",
                      "--show-samples", "0", NULL};
    assert_int_equal(subproc_run(pre_ok, NULL, 120, &err), 0);
    free(err);
    char *pre_bad[] = {(char *)subproc_tool("preprocess"), g_cfg, "special_tokens={eos_token: \"</s>\"}", NULL};
    assert_int_equal(subproc_run(pre_bad, NULL, 120, &err), 1);
    assert_non_null(strstr(err, "special_tokens.eos_token: \"</s>\" is not this model's eos token (\"<|im_end|>\")"));
    free(err);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_yaml_errors),
        cmocka_unit_test(test_wrong_types_and_ranges),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_device),
        cmocka_unit_test(test_missing_files),
        cmocka_unit_test(test_corrupt_gguf),
        cmocka_unit_test(test_bad_jsonl),
        cmocka_unit_test(test_empty_dataset),
        cmocka_unit_test(test_sequence_len_beyond_context),
        cmocka_unit_test(test_sequence_len_beyond_sliding_window),
        cmocka_unit_test(test_phi3_refusals),
        cmocka_unit_test(test_output_dir_unwritable),
        cmocka_unit_test(test_bad_checkpoints),
        cmocka_unit_test(test_corrupt_safetensors),
        cmocka_unit_test(test_skip_bad_lines_trains),
        cmocka_unit_test(test_axolotl_refusals_and_config_lines),
        cmocka_unit_test(test_loss_watchdog_and_special_tokens),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
