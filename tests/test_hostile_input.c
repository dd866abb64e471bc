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
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/cli_fixture.h"
#include "tests/subproc.h"
#include "trainer/checkpoint.h"

#define MODEL CLI_FIXTURE_MODEL
#define HOSTILE_MEM_MIB 4096 /* address space of one case: the trainer needs ~0.5 GiB here */
#define HOSTILE_SECONDS 120  /* a case that has not failed by then is a hang */

static cli_fixture g_fx; /* scratch directory, config, output_dir with an earlier run's outputs */
#define g_dir g_fx.dir
#define g_cfg g_fx.cfg
#define g_out g_fx.out

static int setup(void **st) {
    (void)st;
    return cli_fixture_init(
        &g_fx, "/tmp/qlora-hostile-XXXXXX",
        "{\"text\": \"The open() system call opens the file specified by pathname.\"}\n"
        "{\"text\": \"If the specified file does not exist, it may optionally be created by open().\"}\n");
}

static int teardown(void **st) {
    (void)st;
    return cli_fixture_free(&g_fx);
}






/* Run `tool args...` under the limits (sh: ulimit -v, then exec); check what the header promises.
 * tool: a path; its basename (e.g. "qlora-train") must start the last stderr line. want: NULL-terminated. */
static void expect_refusal_of(const char *tool, const char *const *args, const char *const *want) {
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
    const char *base = strrchr(tool, '/');
    cli_expect_failure(argv, HOSTILE_SECONDS, -1, base ? base + 1 : tool, want, g_out);
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
    cli_write_text(p, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
                  "\"num_attention_heads\": 4, \"vocab_size\": 10}");
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", hd);
    cli_write_text(p, "{\"metadata\": {}, \"weight_map\": {\"model.norm.weight\": \"../x\"}}");
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
    cli_write_text(p, "{\"text\": \"abc\\u0000def\"}\n");
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_train_refusal(ARGS(a), WANT("nul_escape.jsonl:1", "\\u0000"));
    snprintf(p, sizeof p, "%s/raw_nul.jsonl", g_dir);
    static const char raw[] = "{\"text\": \"abc\0def\"}\n";
    cli_write_bytes(p, raw, sizeof raw - 1);
    snprintf(a, sizeof a, "datasets=[{path: %s, type: completion}]", p);
    expect_train_refusal(ARGS(a), WANT("raw_nul.jsonl:1", "NUL byte"));
    snprintf(p, sizeof p, "%s/latin1.jsonl", g_dir);
    cli_write_text(p, "{\"text\": \"caf\xe9 au lait\"}\n");
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
    cli_write_text(p, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
                  "\"num_attention_heads\": 4, \"vocab_size\": 10, \"rope_theta\": \"abc\"}");
    snprintf(a, sizeof a, "base_model=%s", hd);
    expect_train_refusal(ARGS(a), WANT("config.json", "rope_theta", "expected a number"));
    snprintf(p, sizeof p, "%s/config.json", hd);
    cli_write_text(p, "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 96, \"num_hidden_layers\": 2, "
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
             "base_model: " MODEL "\nadapter: qlora\nlora_target_modules: [q_proj]\n"
             "datasets:\n  - path: %s/train.jsonl\n    type: completion\n"
             "learning_rate:\nsequence_len: 32\nmax_steps: 1\noutput_dir: %s\n",
             g_dir, g_out);
    cli_write_text(p, cfg);
    expect_refusal_of(subproc_trainer(), ARGS(p), WANT("empty_lr.yaml: learning_rate: no value", "(line 7)"));
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
        {"--top-k", "5x"},             {"--bf16", "2"},             {"--load-in-8bit", "2"},
    };
    for (size_t i = 0; i < sizeof gen_bad / sizeof gen_bad[0]; i++)
        expect_refusal_of(subproc_tool("generate"),
                          ARGS("--base", MODEL, "--prompt", "hi", gen_bad[i][0], gen_bad[i][1]),
                          WANT(gen_bad[i][0], gen_bad[i][1]));
    expect_refusal_of(subproc_tool("generate"), ARGS("--base", MODEL, "--ids", "1,2x,3"), WANT("--ids", "2x"));

    /* 20,000 tokens of prompt against SmolLM2's 8192: refused before the model loads */
    char p[400];
    snprintf(p, sizeof p, "%s/long_prompt.txt", g_dir);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    for (int i = 0; i < 20000; i++) fputs(" hello", f);
    assert_int_equal(fclose(f), 0);
    expect_refusal_of(subproc_tool("generate"), ARGS("--base", MODEL, "--raw", "--prompt-file", p),
                      WANT("the prompt is", "tokens, more than", "context length of 8192"));

    /* 2147483647 new tokens: clamped to what the context holds, said on stderr, no overflow */
    char *argv[] = {(char *)subproc_tool("generate"), "--base", MODEL, "--prompt", "hi", "--max-new-tokens", "2147483647", NULL};
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
    expect_refusal_of(subproc_tool("preprocess"), ARGS(g_cfg, "--show-samples", "-5"), WANT("--show-samples", "-5"));
    expect_refusal_of(subproc_tool("preprocess"), ARGS(g_cfg, "--show-samples", "3x"), WANT("--show-samples", "3x"));
    expect_refusal_of(subproc_tool("export"), ARGS(g_out, "--max-shard-size", "12abc"), WANT("--max-shard-size", "12abc"));
    expect_refusal_of(subproc_tool("export"), ARGS(g_out, "--load-in-4bit", "yes"), WANT("--load-in-4bit", "yes"));
    expect_refusal_of(subproc_tool("export"), ARGS(g_out, "--load-in-8bit", "yes"), WANT("--load-in-8bit", "yes"));
    /* both formats at once: one line naming both flags (qlora-generate and qlora-export alike) */
    expect_refusal_of(subproc_tool("export"), ARGS(g_out, "--load-in-4bit", "1", "--load-in-8bit", "1"),
                      WANT("--load-in-4bit 1 and --load-in-8bit 1", "choose one"));
    expect_refusal_of(subproc_tool("generate"),
                      ARGS("--base", MODEL, "--prompt", "hi", "--load-in-4bit", "1", "--load-in-8bit", "1"),
                      WANT("--load-in-4bit 1 and --load-in-8bit 1", "choose one"));
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
    cli_write_text(p, text);
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
    fprintf(f, "base_model: %s\nadapter: qlora\ndatasets:\n  - path: %s/train.jsonl\n    type: completion\nlora_r: 2\n"
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
    expect_train_refusal(ARGS("xy=1"), WANT("command line: unknown key \"xy\" (not a key of axolotl's config schema"));
    expect_train_refusal(ARGS("lr=1e-4"), WANT("command line: unknown key \"lr\" (not a key of axolotl's config schema"));
}

/* ------------------------------------------------------------------------ */
/* The run's items (trainer/run.c, run_state.c, checkpoint.c, memplan.c): helpers for the cases that are not
 * refusals, which run qlora-train to a signal or to the end. */

#define RUN_SECONDS 300 /* a run of these cases that has not ended by then is a hang */

/* Start qlora-train g_cfg args... (env_extra as subproc_start). */
static void run_start_cli(subproc *p, const char *const *args, const char *const *env) {
    char *argv[40];
    int n = 0;
    argv[n++] = (char *)subproc_trainer();
    argv[n++] = g_cfg;
    for (int i = 0; args && args[i] && n < 39; i++) argv[n++] = (char *)args[i];
    argv[n] = NULL;
    assert_int_equal(subproc_start(p, argv, env), 0);
}

/* Read p's stderr until it holds `s`; 1 when it does, 0 when the process ended or timeout_s passed first. */
static int run_wait_for(subproc *p, const char *s, int timeout_s) {
    time_t t0 = time(NULL);
    while (!strstr(p->err, s)) {
        if (subproc_poll(p, 100) || time(NULL) - t0 > timeout_s) return strstr(p->err, s) != NULL;
    }
    return 1;
}

/* qlora-train g_cfg args... to its end; the exit code (128 + signal when killed), *err its stderr. */
static int run_cli(const char *const *args, const char *const *env, char **err) {
    subproc p;
    run_start_cli(&p, args, env);
    subproc_wait(&p, RUN_SECONDS);
    int code = subproc_exit_code(&p);
    *err = p.err;
    p.err = NULL;
    subproc_free(&p);
    return code;
}

/* The step of the newest checkpoint in dir that verifies (marker, size, hash), or -1. */
static int64_t newest_complete(const char *dir) {
    ckpt_entry *v = NULL;
    int n = 0;
    qerr e;
    assert_int_equal(ckpt_list(dir, &v, &n, &e), 0);
    int64_t step = -1;
    for (int i = 0; i < n && step < 0; i++)
        if (ckpt_verify(v[i].path, NULL, &e) == 0) step = v[i].step;
    free(v);
    return step;
}

/* A checkpoint directory dir/checkpoint-<step> whose COMPLETE marker is well formed and claims a state.h5
 * of `size` bytes (state.h5 itself is the caller's). */
static void fake_checkpoint(const char *dir, int step, long long size, char *ck, size_t ck_n) {
    char p[700], text[200];
    mkdir(dir, 0755);
    snprintf(ck, ck_n, "%s/checkpoint-%d", dir, step);
    mkdir(ck, 0755);
    snprintf(p, sizeof p, "%s/COMPLETE", ck);
    snprintf(text, sizeof text, "qlora-checkpoint 1\nstep %d\nstate.h5 %lld 0123456789abcdef\n", step, size);
    cli_write_text(p, text);
}

/* 2. token ids are checked against the embedding: a GGUF whose token_embd.weight has 1000 rows while its
 * tokenizer has 49152 tokens trained with NaN loss and exit 0 (ASan: out-of-bounds read in op_embedding). */
static void test_02_vocab_beyond_embedding(void **st) {
    (void)st;
    FILE *f = fopen(MODEL, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    rewind(f);
    unsigned char *b = malloc((size_t)n);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    /* the tensor info: u64 name length 17, "token_embd.weight", u32 n_dims 2, u64 ne0, u64 ne1 */
    static const char name[] = "token_embd.weight";
    unsigned char pat[8 + sizeof name - 1 + 4];
    uint64_t len = sizeof name - 1;
    uint32_t nd = 2;
    memcpy(pat, &len, 8);
    memcpy(pat + 8, name, sizeof name - 1);
    memcpy(pat + 8 + sizeof name - 1, &nd, 4);
    unsigned char *hit = NULL;
    for (long i = 0; i + (long)sizeof pat + 16 <= n && !hit; i++)
        if (!memcmp(b + i, pat, sizeof pat)) hit = b + i + sizeof pat;
    assert_non_null(hit);
    uint64_t ne1;
    memcpy(&ne1, hit + 8, 8);
    assert_int_equal(ne1, 49152);
    ne1 = 1000;
    memcpy(hit + 8, &ne1, 8);
    char p[400], a[600];
    snprintf(p, sizeof p, "%s/embd1000.gguf", g_dir);
    cli_write_bytes(p, b, (size_t)n);
    free(b);
    snprintf(a, sizeof a, "base_model=%s", p);
    expect_train_refusal(ARGS(a), WANT("embd1000.gguf", "tokenizer has 49152 tokens", "token_embd.weight has 1000 rows"));
    unlink(p);
}

/* 3. micro_batch_size=100000: the planner predicted 1,090,811 MiB and the run went on to abort() (exit 134); a
 * resumed run had first rewritten config.resolved.yaml and metrics.jsonl. Now refused before output_dir changes,
 * fresh or resumed, naming the key. */
static void test_03_memory_beyond_machine(void **st) {
    (void)st;
    expect_train_refusal(ARGS("micro_batch_size=100000"),
                         WANT("memory", "predicts a peak of", "micro_batch_size 100000", "memory_check: false"));
    /* a resumed run: its output_dir byte-for-byte as it was */
    char out[400], a[500], *err = NULL;
    snprintf(out, sizeof out, "%s/out3", g_dir);
    snprintf(a, sizeof a, "output_dir=%s", out);
    int code = run_cli(ARGS(a, "save_steps=1", "max_steps=2", "val_set_size=1"), NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    free(err);
    char *before = cli_snapshot(out);
    expect_train_refusal(ARGS(a, "micro_batch_size=100000", "max_steps=3", "val_set_size=1"),
                         WANT("micro_batch_size 100000", "MiB"));
    char *after = cli_snapshot(out);
    assert_string_equal(before, after);
    free(before);
    free(after);
}

/* 4 (checkpoints). A state.h5 symlinked to /dev/zero, or a FIFO, hung the resume (the marker's hash read it to
 * an end that never came). Checkpoint files must be regular files of the size the marker records. */
static void test_04_checkpoint_not_a_file(void **st) {
    (void)st;
    char dir[400], ck[500], p[600], a[700];
    snprintf(dir, sizeof dir, "%s/out4", g_dir);
    fake_checkpoint(dir, 3, 4096, ck, sizeof ck);
    snprintf(p, sizeof p, "%s/state.h5", ck);
    assert_int_equal(symlink("/dev/zero", p), 0);
    snprintf(a, sizeof a, "resume_from_checkpoint=%s", ck);
    expect_train_refusal(ARGS(a), WANT("resume_from_checkpoint", "state.h5", "not a regular file", "character device"));
    unlink(p);
    assert_int_equal(mkfifo(p, 0600), 0);
    expect_train_refusal(ARGS(a), WANT("resume_from_checkpoint", "state.h5", "not a regular file", "FIFO"));
    /* the marker itself as a FIFO */
    unlink(p);
    cli_write_text(p, "not hdf5");
    snprintf(p, sizeof p, "%s/COMPLETE", ck);
    unlink(p);
    assert_int_equal(mkfifo(p, 0600), 0);
    expect_train_refusal(ARGS(a), WANT("resume_from_checkpoint", "COMPLETE", "not a regular file", "FIFO"));
}

/* 6. Every checkpoint unusable: the run started over from step 0 without a word and overwrote the earlier
 * run's outputs. A committed checkpoint (its COMPLETE marker exists) that cannot be loaded is now a refusal naming
 * why and what to do; only saves interrupted before their marker are passed over, with a "starting over" line. */
static void test_06_no_usable_checkpoint(void **st) {
    (void)st;
    char dir[400], ck[500], p[600], a[700];
    snprintf(dir, sizeof dir, "%s/out6", g_dir);
    cli_fixture_earlier_outputs(dir);
    snprintf(p, sizeof p, "%s/.qlora-train.lock", dir); /* as a run leaves it */
    cli_write_text(p, "");
    fake_checkpoint(dir, 3, 4096, ck, sizeof ck);
    snprintf(p, sizeof p, "%s/state.h5", ck);
    cli_write_text(p, "a state.h5 that is not the one the marker describes");
    snprintf(p, sizeof p, "%s/checkpoint-5", dir); /* a newer save interrupted before its marker */
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/checkpoint-5/state.h5", dir);
    cli_write_text(p, "half a checkpoint");
    char *before = cli_snapshot(dir);
    snprintf(a, sizeof a, "output_dir=%s", dir);
    expect_train_refusal(ARGS(a), WANT("out6", "none can be resumed", "checkpoint-3", "truncated or replaced",
                                       "Delete its checkpoint-*"));
    char *after = cli_snapshot(dir);
    assert_string_equal(before, after);
    free(before);
    free(after);
    /* only an interrupted save: the run starts over, and says so */
    snprintf(dir, sizeof dir, "%s/out6b", g_dir);
    cli_fixture_earlier_outputs(dir);
    snprintf(p, sizeof p, "%s/checkpoint-5", dir);
    mkdir(p, 0755);
    snprintf(a, sizeof a, "output_dir=%s", dir);
    char *err = NULL;
    int code = run_cli(ARGS(a), NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[checkpoint] starting over from step 0"));
    free(err);
}

/* 7. SIGHUP (a closed terminal) and a closed stdout/stderr (`| head`) killed the run and lost every step since
 * the last checkpoint. SIGHUP now acts as SIGTERM (finish the step, save, exit 129); a closed output is a stop
 * request (save, exit 141 = 128 + SIGPIPE, by exit(), not by the signal). Modes 2 and 3: the same during the
 * set-up (after the [model] line, while the model loads): the handlers were installed only when training
 * started, so a run in the background stopped there silently, killed by the signal's default action (SIGHUP,
 * or SIGPIPE at its next line). Now the first step runs and is saved. */
static void test_07_sighup_and_closed_output(void **st) {
    (void)st;
    char dir[400], a[500];
    signal(SIGHUP, SIG_DFL); /* not inherited as ignored (nohup make test): the trainer keeps an ignored SIGHUP */
    for (int mode = 0; mode < 4; mode++) {
        const int hup = mode % 2 == 0;
        snprintf(dir, sizeof dir, "%s/out7-%d", g_dir, mode);
        snprintf(a, sizeof a, "output_dir=%s", dir);
        subproc p;
        run_start_cli(&p, ARGS(a, "max_steps=100000", "save_steps=100000"), NULL);
        int seen = run_wait_for(&p, mode < 2 ? "[train] step 1/" : "[model] ", RUN_SECONDS);
        if (!seen) print_error("%s\n", p.err);
        assert_true(seen);
        if (mode >= 2) assert_null(strstr(p.err, "[train] step 1/")); /* still in the set-up */
        if (hup) {
            kill(p.pid, SIGHUP);
        } else {
            close(p.err_fd); /* the reader of its stderr goes away */
            p.err_fd = -1;
        }
        subproc_wait(&p, RUN_SECONDS);
        if (!WIFEXITED(p.status)) print_error("mode %d, %s: killed by signal %d\n%s\n", mode,
                                              hup ? "SIGHUP" : "closed stderr",
                                              WIFSIGNALED(p.status) ? WTERMSIG(p.status) : -1, p.err);
        assert_true(WIFEXITED(p.status));
        assert_int_equal(WEXITSTATUS(p.status), 128 + (hup ? SIGHUP : SIGPIPE));
        if (hup) assert_non_null(strstr(p.err, "[checkpoint] stopped by SIGHUP after step"));
        subproc_free(&p);
        int64_t step = newest_complete(dir);
        assert_true(step >= 1);
        /* the same command resumes from it */
        char ms[64], *err = NULL;
        snprintf(ms, sizeof ms, "max_steps=%lld", (long long)step + 1);
        int code = run_cli(ARGS(a, ms, "save_steps=100000"), NULL, &err);
        if (code) print_error("%s\n", err);
        assert_int_equal(code, 0);
        char want[128];
        snprintf(want, sizeof want, "checkpoint-%lld: step %lld", (long long)step, (long long)step);
        assert_non_null(strstr(err, want));
        free(err);
    }
}

/* 8 (the run). A run whose every step had a non-finite loss or gradient (a broken model; max_steps below
 * max_nan_steps) ended "[done]" with exit 0. Now it fails with one line: nothing was trained. */
static void test_08_every_step_skipped(void **st) {
    (void)st;
    char a[500];
    snprintf(a, sizeof a, "output_dir=%s/out8", g_dir);
    setenv("QLORA_TEST_NAN_STEPS", "1,2", 1); /* trainer/step.c's hook: these steps' gradients are NaN */
    expect_train_refusal(ARGS(a, "max_steps=2"), WANT("no optimizer update was applied", "all 2 steps",
                                                      "max_nan_steps 5"));
    unsetenv("QLORA_TEST_NAN_STEPS");
}

/* 10. lora_r: 100000 failed with "out of memory allocating 5760000000 x 4 bytes", no key named; r above
 * min(in, out) of a linear was never refused. */
static void test_10_lora_r_beyond_rank(void **st) {
    (void)st;
    expect_train_refusal(ARGS("lora_r=100000"), WANT("lora_r: 100000", "q_proj", "[576, 576]", "lora_r <= 576"));
    expect_train_refusal(ARGS("lora_r=193", "lora_target_modules=[q_proj, k_proj]"),
                         WANT("lora_r: 193", "k_proj", "[192, 576]", "lora_r <= 192"));
}

/* 14 (the run). A second signal during a save waited for the save to end (SIGINT after SIGTERM); a failed
 * deletion of an old checkpoint (save_total_limit) killed the run. */
static void test_14_run_second_signal_and_rotation(void **st) {
    (void)st;
    char dir[400], a[500], *err = NULL;
    snprintf(dir, sizeof dir, "%s/out14", g_dir);
    snprintf(a, sizeof a, "output_dir=%s", dir);
    int code = run_cli(ARGS(a, "max_steps=2", "save_steps=1"), NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    free(err);
    /* SIGTERM, then SIGINT while the checkpoint is being written (each stage of the save slowed to 3 s) */
    subproc p;
    const char *slow[] = {"QLORA_TEST_SAVE_DELAY_MS=3000", NULL};
    run_start_cli(&p, ARGS(a, "max_steps=100000", "save_steps=100000"), slow);
    assert_true(run_wait_for(&p, "[train] step 3/", RUN_SECONDS));
    kill(p.pid, SIGTERM);
    assert_true(run_wait_for(&p, "[checkpoint] saving step", RUN_SECONDS));
    time_t t0 = time(NULL);
    kill(p.pid, SIGINT);
    subproc_wait(&p, RUN_SECONDS);
    long waited = (long)(time(NULL) - t0);
    print_message("second signal: %s %d after %ld s\n", WIFSIGNALED(p.status) ? "killed by" : "exit",
                  WIFSIGNALED(p.status) ? WTERMSIG(p.status) : WEXITSTATUS(p.status), waited);
    assert_true(WIFSIGNALED(p.status) && WTERMSIG(p.status) == SIGINT);
    assert_true(waited < 3); /* at once: not after the slowed save */
    subproc_free(&p);
    assert_int_equal(newest_complete(dir), 2); /* the previous checkpoint, still valid */

    /* an old checkpoint that cannot be deleted: a warning, the run goes on */
    char p1[600], p2[700];
    snprintf(p1, sizeof p1, "%s/checkpoint-1/COMPLETE", dir);
    assert_int_equal(unlink(p1), 0);
    assert_int_equal(mkdir(p1, 0755), 0); /* unlink(2) of it fails (EISDIR), also for root */
    snprintf(p2, sizeof p2, "%s/x", p1);
    cli_write_text(p2, "x");
    code = run_cli(ARGS(a, "max_steps=3", "save_steps=1", "save_total_limit=1"), NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "warning: could not delete an older checkpoint beyond save_total_limit 1"));
    free(err);
    assert_int_equal(newest_complete(dir), 3);
}

/* 14 (disk full). A checkpoint that does not fit said "HDF5 error at /lora/params". The output_dir is a
 * 1 MiB tmpfs mounted in a private mount namespace (unshare -rm: also without root); the first save cannot
 * fit, and the line must say the disk is full and name the file. Skipped where namespaces are not allowed. */
static void test_14_disk_full_during_save(void **st) {
    (void)st;
    if (system("/usr/bin/unshare -rm true >/dev/null 2>&1") != 0) {
        print_message("SKIPPED: unshare -rm (a private mount namespace for a small tmpfs) is not permitted here\n");
        skip();
    }
    char dir[400], a[500];
    snprintf(dir, sizeof dir, "%s/out14full", g_dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(a, sizeof a, "output_dir=%s", dir);
    /* sh -c SCRIPT sh DIR TRAINER CONFIG OVERRIDES...: mount, then exec the trainer in the namespace */
    char *argv[] = {(char *)"/usr/bin/unshare", (char *)"-rm", (char *)"/bin/sh", (char *)"-c",
                    (char *)"d=$1; shift; mount -t tmpfs -o size=1m qlora-full \"$d\" || exit 77; exec \"$@\"",
                    (char *)"sh", dir, (char *)subproc_trainer(), g_cfg, a, (char *)"max_steps=1",
                    (char *)"save_steps=1", (char *)"lora_r=64", NULL}; /* state.h5 ≈ 13 MiB */
    char *err = NULL;
    int code = subproc_run(argv, NULL, HOSTILE_SECONDS, &err);
    assert_non_null(err);
    const char *last = cli_last_line(err);
    print_message("exit %d: %s\n", code, last);
    if (code == 77) {
        print_message("SKIPPED: mounting a tmpfs in the namespace failed\n");
        free(err);
        skip();
    }
    assert_true(code != 0 && code < 128);
    assert_non_null(strstr(last, "qlora-train: "));
    assert_non_null(strstr(last, "state.h5"));
    assert_non_null(strstr(last, "no space left on device"));
    assert_null(strstr(err, "AddressSanitizer"));
    free(err);
}

/* 14 (the planner and the data). The planner left the dataset out: 1,472 MiB measured against 271 MiB
 * predicted on a large dataset. The tokenized rows are now a component of the plan ("data"). Here the data
 * is ~6 M tokens of real man-page text (the training file five times): without the component the
 * prediction was ~40 % under the measured peak; the bound below (20 %) is the planner's usual accuracy
 * (README: within 15 % on the default run). Under ASan the RSS is the sanitizer's, so only the component
 * is checked there. */
static void test_14_planner_counts_the_data(void **st) {
    (void)st;
    const char *src = "datasets/manpages/train.jsonl";
    FILE *in = fopen(src, "rb");
    if (!in) {
        print_message("SKIPPED: %s missing (make dataset)\n", src);
        skip();
    }
    char path[400], a[500], d[600];
    snprintf(path, sizeof path, "%s/big.jsonl", g_dir);
    FILE *out = fopen(path, "wb");
    assert_non_null(out);
    static char buf[1 << 16];
    for (int k = 0; k < 5; k++) {
        rewind(in);
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, in)) > 0) assert_int_equal(fwrite(buf, 1, n, out), n);
    }
    fclose(in);
    assert_int_equal(fclose(out), 0);
    snprintf(a, sizeof a, "output_dir=%s/out14data", g_dir);
    snprintf(d, sizeof d, "datasets=[{path: %s, type: completion}]", path);
    char *err = NULL;
    int code = run_cli(ARGS(a, d, "sequence_len=64", "max_steps=1", "save_steps=100"), NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    const char *plan = strstr(err, "[memory] predicted peak");
    assert_non_null(plan);
    const char *dp = strstr(plan, "+ data ");
    assert_non_null(dp);
    int data_mib = atoi(dp + strlen("+ data "));
    print_message("data component %d MiB\n", data_mib);
    assert_true(data_mib >= 80); /* 16 bytes per position of ~6 M tokens */
    const char *pk = strstr(err, "[memory] peak RSS ");
    assert_non_null(pk);
    int measured = 0, predicted = 0;
    assert_int_equal(sscanf(pk, "[memory] peak RSS %d MiB (predicted %d MiB", &measured, &predicted), 2);
    print_message("peak RSS %d MiB, predicted %d MiB\n", measured, predicted);
    if (!getenv("ASAN_OPTIONS")) assert_true(abs(predicted - measured) <= measured / 5);
    free(err);
    unlink(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_01_hf_index_shard_outside),
        cmocka_unit_test(test_02_vocab_beyond_embedding),
        cmocka_unit_test(test_03_memory_beyond_machine),
        cmocka_unit_test(test_04_dataset_not_a_file),
        cmocka_unit_test(test_04_checkpoint_not_a_file),
        cmocka_unit_test(test_05_text_cut_or_dropped),
        cmocka_unit_test(test_06_no_usable_checkpoint),
        cmocka_unit_test(test_07_sighup_and_closed_output),
        cmocka_unit_test(test_08_model_metadata),
        cmocka_unit_test(test_08_every_step_skipped),
        cmocka_unit_test(test_09_empty_value),
        cmocka_unit_test(test_10_lora_r_beyond_rank),
        cmocka_unit_test(test_12_tool_numbers),
        cmocka_unit_test(test_13_config_size_and_depth),
        cmocka_unit_test(test_14_config_messages),
        cmocka_unit_test(test_14_run_second_signal_and_rotation),
        cmocka_unit_test(test_14_disk_full_during_save),
        cmocka_unit_test(test_14_planner_counts_the_data),
    };
    if (getenv("QLORA_TEST_FILTER")) cmocka_set_test_filter(getenv("QLORA_TEST_FILTER")); /* e.g. "test_07*" */
    return cmocka_run_group_tests(tests, setup, teardown);
}
