/* tests/test_hostile_input.c — hostile input, tried as an attacker would (issue 17), kept as a probe so
 * the class stays closed. Every case runs a real CLI (bin/qlora-train, or $QLORA_TRAIN_BIN; the side
 * tools from bin/) as a subprocess under a memory limit (RLIMIT_AS, HOSTILE_MEM_MIB) and a time limit
 * (HOSTILE_SECONDS, then SIGKILL; under ASan only the time limit), and asserts:
 *   - a non-zero exit that is not a signal (no crash, no abort, no kill by the limits);
 *   - the last stderr line is one "<tool>: ..." line naming the file / key / option (the `want` strings);
 *   - no sanitizer report;
 *   - an output_dir holding an earlier run's outputs is byte-for-byte untouched.
 * One function per item of issue 17 (its number in the name). Needs the default model (make model). */
#include <errno.h>
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

#include "tests/dir_snapshot.h"
#include "tests/subproc.h"

#define MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define HOSTILE_MEM_MIB 4096 /* address space of one case: the trainer needs ~0.5 GiB here */
#define HOSTILE_SECONDS 120  /* a case that has not failed by then is a hang */

static char g_dir[256], g_cfg[320], g_out[320];

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void write_text(const char *path, const char *s) { write_bytes(path, s, strlen(s)); }

static char *snapshot(const char *dir) {
    char *s = dir_snapshot(dir);
    assert_non_null(s);
    return s;
}

/* output_dir with an earlier run's outputs (content arbitrary: it must come out unchanged). */
static void make_earlier_outputs(const char *out) {
    char p[512];
    mkdir(out, 0755);
    snprintf(p, sizeof p, "%s/metrics.jsonl", out);
    write_text(p, "{\"step\": 1, \"loss\": 2.5, \"lr\": 0.0002, \"grad_norm\": 1, \"tokens_per_sec\": 1, \"epoch\": 0.1}\n");
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", out);
    write_text(p, "an adapter from an earlier run");
    snprintf(p, sizeof p, "%s/config.resolved.yaml", out);
    write_text(p, "lora_r: 8\n");
    snprintf(p, sizeof p, "%s/.qlora-train.lock", out); /* every run takes the lock file; it holds no data */
    write_text(p, "");
}

static int setup(void **st) {
    (void)st;
    if (access(MODEL, R_OK)) {
        fprintf(stderr, "%s missing: run `make model`\n", MODEL);
        return -1;
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/qlora-hostile-XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    char p[512];
    snprintf(p, sizeof p, "%s/train.jsonl", g_dir);
    write_text(p, "{\"text\": \"The open() system call opens the file specified by pathname.\"}\n"
                  "{\"text\": \"If the specified file does not exist, it may optionally be created by open().\"}\n");
    snprintf(g_out, sizeof g_out, "%s/out", g_dir);
    make_earlier_outputs(g_out);
    snprintf(g_cfg, sizeof g_cfg, "%s/config.yaml", g_dir);
    char cfg[2048];
    snprintf(cfg, sizeof cfg,
             "base_model: " MODEL "\n"
             "lora_r: 2\nlora_alpha: 4\nlora_target_modules: [q_proj]\n"
             "datasets:\n  - path: %s/train.jsonl\n    type: completion\n"
             "sequence_len: 32\nmicro_batch_size: 1\nmax_steps: 1\nnum_threads: 1\n"
             "output_dir: %s\n",
             g_dir, g_out);
    write_text(g_cfg, cfg);
    return 0;
}

static int teardown(void **st) {
    (void)st;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Run `tool args...` under the limits (sh: ulimit -v, then exec); check what the header promises.
 * tool: a path; its basename (e.g. "qlora-train") must start the last stderr line. want: NULL-terminated. */
static void expect_refusal_of(const char *tool, const char *const *args, const char *const *want) {
    char *before = snapshot(g_out);
    char *argv[40];
    int n = 0;
    char script[128];
    /* ASan reserves terabytes of address space for its shadow memory: under the sanitizers (make test-asan
     * sets ASAN_OPTIONS) only the time limit applies */
    if (getenv("ASAN_OPTIONS"))
        snprintf(script, sizeof script, "exec \"$0\" \"$@\"");
    else
        snprintf(script, sizeof script, "ulimit -v %d && exec \"$0\" \"$@\"", HOSTILE_MEM_MIB * 1024);
    argv[n++] = (char *)"/bin/sh";
    argv[n++] = (char *)"-c";
    argv[n++] = script;
    argv[n++] = (char *)tool;
    for (int i = 0; args && args[i] && n < 39; i++) argv[n++] = (char *)args[i];
    argv[n] = NULL;
    char *err = NULL;
    int code = subproc_run(argv, NULL, HOSTILE_SECONDS, &err);
    assert_non_null(err);
    size_t len = strlen(err);
    while (len && err[len - 1] == '\n') err[--len] = 0;
    char *last = strrchr(err, '\n');
    last = last ? last + 1 : err;
    print_message("exit %d: %s\n", code, last);
    if (code == 0 || code >= 128) print_error("stderr:\n%s\n", err);
    assert_true(code != 0);
    assert_true(code < 128); /* not killed by a signal: no crash, no abort, no limit hit */
    const char *base = strrchr(tool, '/');
    base = base ? base + 1 : tool;
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s: ", base);
    if (strncmp(last, prefix, strlen(prefix))) print_error("last line does not start with \"%s\": %s\n", prefix, last);
    assert_true(!strncmp(last, prefix, strlen(prefix)));
    for (int i = 0; want && want[i]; i++) {
        if (!strstr(last, want[i])) print_error("missing \"%s\" in: %s\n", want[i], last);
        assert_non_null(strstr(last, want[i]));
    }
    assert_null(strstr(err, "AddressSanitizer"));
    assert_null(strstr(err, "runtime error"));
    char *after = snapshot(g_out);
    if (strcmp(before, after)) print_error("output_dir changed:\nbefore:\n%s\nafter:\n%s\n", before, after);
    assert_string_equal(before, after);
    free(before);
    free(after);
    free(err);
}

/* qlora-train g_cfg args... */
static void expect_train_refusal(const char *const *args, const char *const *want) {
    const char *a[40];
    int n = 0;
    a[n++] = g_cfg;
    for (int i = 0; args && args[i] && n < 39; i++) a[n++] = args[i];
    a[n] = NULL;
    expect_refusal_of(subproc_trainer(), a, want);
}

#define ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})
#define WANT(...) ((const char *const[]){__VA_ARGS__, NULL})

/* 1. An HF index whose weight_map names "../x": the error printed freed memory (ASan). */
static void test_01_hf_index_shard_outside(void **st) {
    (void)st;
    char hd[400], p[500], a[600];
    snprintf(hd, sizeof hd, "%s/hf_index", g_dir);
    mkdir(hd, 0755);
    snprintf(p, sizeof p, "%s/config.json", hd);
    write_text(p, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
                  "\"num_attention_heads\": 4, \"vocab_size\": 10}");
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", hd);
    write_text(p, "{\"metadata\": {}, \"weight_map\": {\"model.norm.weight\": \"../x\"}}");
    snprintf(a, sizeof a, "base_model=%s", hd);
    expect_train_refusal(ARGS(a), WANT("weight_map[\"model.norm.weight\"]", "file name of a shard"));
}

/* 4. Only regular files are read as data: /dev/zero and /dev/urandom grew without bound, a FIFO hung. */
static void test_04_dataset_not_a_file(void **st) {
    (void)st;
    char fifo[400], a[600];
    snprintf(fifo, sizeof fifo, "%s/fifo.jsonl", g_dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    const char *paths[] = {"/dev/zero", "/dev/urandom", fifo, g_dir};
    const char *kinds[] = {"character device", "character device", "FIFO", "directory"};
    for (int i = 0; i < 4; i++) {
        snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", paths[i]);
        expect_train_refusal(ARGS(a), WANT(paths[i], "not a regular file", kinds[i]));
    }
}

/* 5. Text that would be trained on in part: a \u0000 escape cut the text there; a raw NUL and invalid
 * UTF-8 were accepted and dropped without a word. */
static void test_05_text_cut_or_dropped(void **st) {
    (void)st;
    char p[400], a[600];
    snprintf(p, sizeof p, "%s/nul_escape.jsonl", g_dir);
    write_text(p, "{\"text\": \"abc\\u0000def\"}\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_train_refusal(ARGS(a), WANT("nul_escape.jsonl:1", "\\u0000"));
    snprintf(p, sizeof p, "%s/raw_nul.jsonl", g_dir);
    static const char raw[] = "{\"text\": \"abc\0def\"}\n";
    write_bytes(p, raw, sizeof raw - 1);
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_train_refusal(ARGS(a), WANT("raw_nul.jsonl:1", "NUL byte"));
    snprintf(p, sizeof p, "%s/latin1.jsonl", g_dir);
    write_text(p, "{\"text\": \"caf\xe9 au lait\"}\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_train_refusal(ARGS(a), WANT("latin1.jsonl:1", "invalid UTF-8"));
}

/* 8. A model that is another model: a GGUF with rope_freqs (llama3 scaling) trained with the default
 * RoPE; an HF rope_theta "abc" became 10000. */
static void test_08_model_metadata(void **st) {
    (void)st;
    char hd[400], p[500], a[600];
    snprintf(hd, sizeof hd, "%s/hf_theta", g_dir);
    mkdir(hd, 0755);
    snprintf(p, sizeof p, "%s/config.json", hd);
    write_text(p, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
                  "\"num_attention_heads\": 4, \"vocab_size\": 10, \"rope_theta\": \"abc\"}");
    snprintf(a, sizeof a, "base_model=%s", hd);
    expect_train_refusal(ARGS(a), WANT("config.json", "rope_theta", "expected a number"));
    snprintf(p, sizeof p, "%s/config.json", hd);
    write_text(p, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
                  "\"num_attention_heads\": 4, \"vocab_size\": 10, \"rms_norm_eps\": -1}");
    expect_train_refusal(ARGS(a), WANT("config.json", "rms_norm_eps"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_01_hf_index_shard_outside),
        cmocka_unit_test(test_04_dataset_not_a_file),
        cmocka_unit_test(test_05_text_cut_or_dropped),
        cmocka_unit_test(test_08_model_metadata),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
