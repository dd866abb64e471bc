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
#include <signal.h>
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

/* 9. An empty value trained with the default: `learning_rate=` at 2e-4, `max_steps=` a whole epoch,
 * `learning_rate:` in the file the same. Refused naming the key and where it came from. */
static void test_09_empty_value(void **st) {
    (void)st;
    expect_train_refusal(ARGS("learning_rate="), WANT("command line: learning_rate: no value", "positive number"));
    expect_train_refusal(ARGS("max_steps="), WANT("command line: max_steps: no value"));
    char p[400], cfg[2048];
    snprintf(p, sizeof p, "%s/empty_lr.yaml", g_dir);
    snprintf(cfg, sizeof cfg,
             "base_model: " MODEL "\nlora_target_modules: [q_proj]\n"
             "datasets:\n  - path: %s/train.jsonl\n    type: completion\n"
             "learning_rate:\nsequence_len: 32\nmax_steps: 1\noutput_dir: %s\n",
             g_dir, g_out);
    write_text(p, cfg);
    expect_refusal_of(subproc_trainer(), ARGS(p), WANT("empty_lr.yaml: learning_rate: no value", "(line 6)"));
}

/* 12. qlora-generate, -export, -preprocess read numbers with atoi: "12abc" was 12, "1e99" 1, "abc" 0,
 * nan a temperature; 2147483647 new tokens overflowed n + max_new (UBSan) and 1e9 asked for a 128 GB
 * KV cache; a prompt over the context ran for minutes. */
static void test_12_tool_numbers(void **st) {
    (void)st;
    static const char *const gen_bad[][2] = {
        {"--max-new-tokens", "12abc"}, {"--max-new-tokens", "1e99"}, {"--max-new-tokens", "2147483648"},
        {"--max-new-tokens", "0"},     {"--seed", "abc"},            {"--seed", "-1"},
        {"--temperature", "nan"},      {"--temperature", "inf"},     {"--top-p", "0"},
        {"--top-k", "5x"},             {"--bf16", "2"},
    };
    for (size_t i = 0; i < sizeof gen_bad / sizeof gen_bad[0]; i++)
        expect_refusal_of("bin/qlora-generate",
                          ARGS("--base", MODEL, "--prompt", "hi", gen_bad[i][0], gen_bad[i][1]),
                          WANT(gen_bad[i][0], gen_bad[i][1]));
    expect_refusal_of("bin/qlora-generate", ARGS("--base", MODEL, "--ids", "1,2x,3"), WANT("--ids", "2x"));

    /* 20,000 tokens of prompt against SmolLM2's 8192: refused before the model loads */
    char p[400];
    snprintf(p, sizeof p, "%s/long_prompt.txt", g_dir);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    for (int i = 0; i < 20000; i++) fputs(" hello", f);
    assert_int_equal(fclose(f), 0);
    expect_refusal_of("bin/qlora-generate", ARGS("--base", MODEL, "--raw", "--prompt-file", p),
                      WANT("the prompt is", "tokens, more than", "context length of 8192"));

    /* 2147483647 new tokens: clamped to what the context holds, said on stderr, no overflow */
    char *argv[] = {"bin/qlora-generate", "--base", MODEL, "--prompt", "hi", "--max-new-tokens", "2147483647", NULL};
    subproc sp;
    assert_int_equal(subproc_start(&sp, argv, NULL), 0);
    for (int t = 0; t < HOSTILE_SECONDS * 10 && !subproc_poll(&sp, 100) && !strstr(sp.err, "clamped"); t++) {
    }
    if (!sp.done) kill(sp.pid, SIGKILL);
    subproc_wait(&sp, HOSTILE_SECONDS);
    print_message("%s", sp.err);
    assert_non_null(strstr(sp.err, "[generate] --max-new-tokens 2147483647 clamped to"));
    assert_non_null(strstr(sp.err, "context length 8192"));
    assert_null(strstr(sp.err, "runtime error"));
    subproc_free(&sp);

    /* the other tools' numeric options */
    expect_refusal_of("bin/qlora-preprocess", ARGS(g_cfg, "--show-samples", "-5"), WANT("--show-samples", "-5"));
    expect_refusal_of("bin/qlora-preprocess", ARGS(g_cfg, "--show-samples", "3x"), WANT("--show-samples", "3x"));
    expect_refusal_of("bin/qlora-export", ARGS(g_out, "--max-shard-size", "12abc"), WANT("--max-shard-size", "12abc"));
    expect_refusal_of("bin/qlora-export", ARGS(g_out, "--load-in-4bit", "yes"), WANT("--load-in-4bit", "yes"));
}

/* 13. A 400 KB config of nested "[[[…" took more than 60 s inside libyaml; any size was read. */
static void test_13_config_size_and_depth(void **st) {
    (void)st;
    char p[400];
    snprintf(p, sizeof p, "%s/deep.yaml", g_dir);
    size_t n = 400000;
    char *text = malloc(n + 32);
    assert_non_null(text);
    memcpy(text, "lora_target_modules: ", 21);
    memset(text + 21, '[', n);
    text[21 + n] = 0;
    write_text(p, text);
    expect_refusal_of(subproc_trainer(), ARGS(p), WANT("deep.yaml", "nested deeper than 64 levels", "(line 1)"));
    /* the same as an override */
    memcpy(text, "lora_target_modules=", 20);
    memset(text + 20, '[', 100000);
    text[20 + 100000] = 0;
    expect_train_refusal(ARGS(text), WANT("command line: lora_target_modules: nested deeper than 64 levels"));
    free(text);
    /* 2 MiB: a comment, then a valid config */
    snprintf(p, sizeof p, "%s/big.yaml", g_dir);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    for (int i = 0; i < 2 * 1024; i++) fprintf(f, "#%01022d\n", 0);
    fprintf(f, "base_model: %s\ndatasets:\n  - path: %s/train.jsonl\n    type: completion\nlora_r: 2\n"
               "lora_target_modules: [q_proj]\nsequence_len: 32\nmax_steps: 1\noutput_dir: %s\n",
            MODEL, g_dir, g_out);
    assert_int_equal(fclose(f), 0);
    expect_refusal_of(subproc_trainer(), ARGS(p), WANT("big.yaml", "bytes, more than the 1048576-byte (1 MiB) limit"));
}

/* 14 (config). A directory as the config said "input error at byte 0"; a cross-key error set by an
 * override blamed the config file; an unknown short key got "did you mean \"rl\"". */
static void test_14_config_messages(void **st) {
    (void)st;
    char want[400];
    snprintf(want, sizeof want, "%s: is a directory, expected a YAML file", g_dir);
    expect_refusal_of(subproc_trainer(), ARGS(g_dir), WANT(want));
    expect_train_refusal(ARGS("lora_target_modules=[]"),
                         WANT("command line (lora_target_modules=[]): lora_target_modules: no LoRA target"));
    expect_train_refusal(ARGS("warmup_ratio=0.1", "warmup_steps=3"),
                         WANT("command line (warmup_steps=3)", "warmup_steps and warmup_ratio are both set"));
    expect_train_refusal(ARGS("xy=1"), WANT("command line: unknown key \"xy\" (trainer/config.h lists"));
    expect_train_refusal(ARGS("lr=1e-4"), WANT("command line: unknown key \"lr\" (trainer/config.h lists"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_01_hf_index_shard_outside),
        cmocka_unit_test(test_04_dataset_not_a_file),
        cmocka_unit_test(test_05_text_cut_or_dropped),
        cmocka_unit_test(test_08_model_metadata),
        cmocka_unit_test(test_09_empty_value),
        cmocka_unit_test(test_12_tool_numbers),
        cmocka_unit_test(test_13_config_size_and_depth),
        cmocka_unit_test(test_14_config_messages),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
