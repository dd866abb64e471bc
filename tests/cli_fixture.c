/* tests/cli_fixture.c — see cli_fixture.h. */
#include "tests/cli_fixture.h"

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

void cli_write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (n) assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

void cli_write_text(const char *path, const char *s) { cli_write_bytes(path, s, strlen(s)); }

char *cli_snapshot(const char *dir) {
    char *s = dir_snapshot(dir);
    assert_non_null(s);
    return s;
}

void cli_fixture_earlier_outputs(const char *out) {
    char p[512];
    mkdir(out, 0755);
    snprintf(p, sizeof p, "%s/metrics.jsonl", out);
    cli_write_text(p, "{\"step\": 1, \"loss\": 2.5, \"lr\": 0.0002, \"grad_norm\": 1, \"tokens_per_sec\": 1, \"epoch\": 0.1}\n");
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", out);
    cli_write_text(p, "an adapter from an earlier run");
    snprintf(p, sizeof p, "%s/adapter_config.json", out);
    cli_write_text(p, "{\"r\": 8}");
    snprintf(p, sizeof p, "%s/config.resolved.yaml", out);
    cli_write_text(p, "lora_r: 8\n");
    snprintf(p, sizeof p, "%s/.qlora-train.lock", out); /* every run takes the lock file; it holds no data */
    cli_write_text(p, "");
    snprintf(p, sizeof p, "%s/checkpoint-5", out);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/checkpoint-5/state.h5", out);
    cli_write_text(p, "half a checkpoint (no COMPLETE marker)");
}

int cli_fixture_init(cli_fixture *fx, const char *tmpl, const char *docs) {
    if (access(CLI_FIXTURE_MODEL, R_OK)) {
        fprintf(stderr, "%s missing: run `make model`\n", CLI_FIXTURE_MODEL);
        return -1;
    }
    snprintf(fx->dir, sizeof fx->dir, "%s", tmpl);
    if (!mkdtemp(fx->dir)) {
        perror(fx->dir);
        return -1;
    }
    char p[512];
    snprintf(p, sizeof p, "%s/train.jsonl", fx->dir);
    cli_write_text(p, docs);
    snprintf(fx->out, sizeof fx->out, "%s/out", fx->dir);
    cli_fixture_earlier_outputs(fx->out);
    snprintf(fx->cfg, sizeof fx->cfg, "%s/config.yaml", fx->dir);
    char cfg[2048];
    snprintf(cfg, sizeof cfg,
             "base_model: " CLI_FIXTURE_MODEL "\nadapter: qlora\n"
             "lora_r: 2\nlora_alpha: 4\nlora_target_modules: [q_proj]\n"
             "datasets:\n  - path: %s/train.jsonl\n    type: completion\n"
             "sequence_len: 32\nmicro_batch_size: 1\nmax_steps: 1\nnum_threads: 1\n"
             "output_dir: %s\n",
             fx->dir, fx->out);
    cli_write_text(fx->cfg, cfg);
    return 0;
}

int cli_fixture_free(cli_fixture *fx) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx->dir);
    return system(cmd) == 0 ? 0 : -1;
}

char *cli_last_line(char *err) {
    size_t len = strlen(err);
    while (len && err[len - 1] == '\n') err[--len] = 0;
    char *last = strrchr(err, '\n');
    return last ? last + 1 : err;
}

void cli_expect_failure(char *const argv[], int timeout_s, int want_code, const char *tool,
                        const char *const *want, const char *keep_dir) {
    char *before = cli_snapshot(keep_dir);
    char *err = NULL;
    int code = subproc_run(argv, NULL, timeout_s, &err);
    assert_non_null(err);
    const char *last = cli_last_line(err);
    print_message("exit %d: %s\n", code, last);
    int code_ok = want_code >= 0 ? code == want_code : code != 0 && code < 128;
    if (!code_ok) print_error("stderr:\n%s\n", err);
    if (want_code >= 0) assert_int_equal(code, want_code);
    assert_true(code_ok);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "%s: ", tool);
    if (strncmp(last, prefix, strlen(prefix))) print_error("last line does not start with \"%s\": %s\n", prefix, last);
    assert_true(!strncmp(last, prefix, strlen(prefix)));
    for (int i = 0; want && want[i]; i++) {
        if (!strstr(last, want[i])) print_error("missing \"%s\" in: %s\n", want[i], last);
        assert_non_null(strstr(last, want[i]));
    }
    assert_null(strstr(err, "AddressSanitizer"));
    assert_null(strstr(err, "runtime error"));
    char *after = cli_snapshot(keep_dir);
    if (strcmp(before, after)) print_error("output_dir changed:\nbefore:\n%s\nafter:\n%s\n", before, after);
    assert_string_equal(before, after);
    free(before);
    free(after);
    free(err);
}
