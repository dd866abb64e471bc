/* fuzz/fuzz_config.c — libFuzzer target for the YAML config (trainer/config.c).
 * The input is a config file; if its first line starts with "#override "
 * the rest of that line is also applied as a command-line override. A config
 * that loads is validated, written with train_config_write_yaml and loaded
 * again: the rewrite must load, and write back to the same text (the
 * round-trip the header promises). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fuzz/fuzz_common.h"
#include "trainer/config.h"

/* The file without its '#' comment lines. */
static char *strip_comments(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *out = calloc(cap, 1);
    char line[8192];
    while (out && fgets(line, sizeof line, f)) {
        if (line[0] == '#') continue;
        size_t l = strlen(line);
        if (n + l + 1 > cap) break;
        memcpy(out + n, line, l + 1);
        n += l;
    }
    fclose(f);
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    train_config c;
    qerr e;
    if (train_config_load(fuzz_file(data, size), &c, &e)) return 0;
    if (size > 10 && !memcmp(data, "#override ", 10)) {
        const uint8_t *nl = memchr(data, '\n', size);
        size_t len = (size_t)((nl ? nl : data + size) - (data + 10));
        char *ov = malloc(len + 1);
        memcpy(ov, data + 10, len);
        ov[len] = 0;
        (void)train_config_apply_override(&c, ov, &e);
        free(ov);
    }
    (void)train_config_validate(&c, &e);
    (void)train_config_target_mask(&c);
    (void)train_config_eval_interval(&c, 100);
    (void)train_config_save_interval(&c, 100);
    (void)train_config_warmup_steps(&c, 100);
    char p1[64], p2[64];
    /* tmpfs when there is one: train_config_write_yaml fsyncs */
    const char *tmpd = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(p1, sizeof p1, "%s/qlora-fuzz-config-%d-a.yaml", tmpd, (int)getpid());
    snprintf(p2, sizeof p2, "%s/qlora-fuzz-config-%d-b.yaml", tmpd, (int)getpid());
    if (train_config_write_yaml(&c, p1, &e) == 0) {
        train_config c2;
        if (train_config_load(p1, &c2, &e)) {
            fprintf(stderr, "config round trip: the rewritten config does not load: %s\n", e.msg);
            __builtin_trap();
        }
        if (train_config_write_yaml(&c2, p2, &e)) __builtin_trap();
        char *a = strip_comments(p1), *b = strip_comments(p2);
        if (!a || !b || strcmp(a, b)) {
            fprintf(stderr, "config round trip differs:\n%s\n---\n%s\n", a ? a : "", b ? b : "");
            __builtin_trap();
        }
        free(a);
        free(b);
        train_config_free(&c2);
        unlink(p2);
        unlink(p1);
    }
    train_config_free(&c);
    return 0;
}
