/* tests/cli_fixture.h — the scratch world of the tests that run the real CLI on the real model
 * (tests/test_cli_faults.c, tests/test_hostile_input.c): a temporary directory with a tiny training
 * file, an output_dir holding an earlier run's outputs (which a failed run must leave byte-for-byte as
 * they were) and a config for a one-step run (lora_r 2 on q_proj, 32 tokens, one thread). */
#ifndef QLORA_TESTS_CLI_FIXTURE_H
#define QLORA_TESTS_CLI_FIXTURE_H

#include <stddef.h>

#define CLI_FIXTURE_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

typedef struct cli_fixture {
    char dir[256]; /* the scratch directory */
    char cfg[320]; /* dir/config.yaml */
    char out[320]; /* dir/out: the output_dir of cfg, with an earlier run's outputs */
} cli_fixture;

/* Make the scratch world under a fresh directory from `tmpl` (mkdtemp, e.g. "/tmp/qlora-x-XXXXXX"):
 * dir/train.jsonl holding `docs` (JSONL text), dir/out with cli_fixture_earlier_outputs, dir/config.yaml.
 * Returns 0, or -1 (with a line on stderr) when the model is missing or the directory cannot be made. */
int cli_fixture_init(cli_fixture *fx, const char *tmpl, const char *docs);

/* Remove the scratch directory and everything in it. Returns 0, -1 when rm fails. */
int cli_fixture_free(cli_fixture *fx);

/* An output_dir holding an earlier run's outputs (metrics.jsonl, an adapter, adapter_config.json,
 * config.resolved.yaml, the lock file, a checkpoint-5 without its COMPLETE marker); the content is
 * arbitrary: it must come out unchanged. */
void cli_fixture_earlier_outputs(const char *out);

/* Write a whole file (cmocka assertion on failure). */
void cli_write_bytes(const char *path, const void *p, size_t n);
void cli_write_text(const char *path, const char *s);

/* The last non-empty line of a process's stderr (trailing newlines are cut off `err` in place). */
char *cli_last_line(char *err);

/* Run argv (NULL-terminated, argv[0] a path) under a time limit of timeout_s (then SIGKILL), and check
 * what every refusal must be: the exit code want_code (or, when want_code < 0, any non-zero code below
 * 128: not a signal, so no crash, abort or kill by a limit); the last stderr line starts with
 * "<tool>: " and holds every string of `want` (NULL-terminated); no sanitizer report; and `keep_dir`
 * byte-for-byte as it was (dir_snapshot). cmocka assertions on failure, with the stderr printed. */
void cli_expect_failure(char *const argv[], int timeout_s, int want_code, const char *tool,
                        const char *const *want, const char *keep_dir);

/* dir_snapshot with an assertion that it succeeded; the caller frees the string. */
char *cli_snapshot(const char *dir);

#endif
