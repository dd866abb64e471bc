/* trainer/preprocess_main.c — `qlora-preprocess CONFIG.yaml [key=value ...]
 * [--show-samples N] [--tokens] [--eval] [--color]`: the data exactly as
 * qlora-train will see it, with the label mask (trainer/preprocess.h).
 * Exit status: 0 success, 1 failure, 2 bad usage or config.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/parse.h"
#include "trainer/config.h"
#include "trainer/preprocess.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora-preprocess CONFIG.yaml [key=value ...] [--show-samples N] [--tokens] [--eval] [--color]\n"
            "  Tokenize, mask and pack the config's datasets as qlora-train does; print the statistics\n"
            "  and the first N rows (default 3) in training order.\n"
            "  default view: decoded text, tokens NOT trained on inside [[ ]]\n"
            "  --tokens      one entry per token: text(id, label), label -100 = masked (axolotl's debug view)\n"
            "  --eval        show held-out rows instead\n"
            "  --color       ANSI colours in the --tokens view (masked red, trained green)\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    int n = 3, eval = 0, color = 0;
    preprocess_view view = PREPROCESS_TEXT;
    qerr e = {{0}};
    train_config c;
    train_config_refusals refused;
    if (train_config_load_all(argv[1], &c, &refused, &e)) {
        /* every refused key of the file, each on its line, then how many */
        for (int i = 0; refused.n > 1 && i < refused.n; i++) fprintf(stderr, "qlora-preprocess: %s\n", refused.lines[i]);
        fprintf(stderr, "qlora-preprocess: %s\n", e.msg);
        train_config_refusals_free(&refused);
        return 2;
    }
    train_config_refusals_free(&refused);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--show-samples") && i + 1 < argc) {
            int64_t v;
            if (parse_int_range(a, argv[++i], 0, INT32_MAX, &v, &e)) {
                fprintf(stderr, "qlora-preprocess: %s\n", e.msg);
                train_config_free(&c);
                return 2;
            }
            n = (int)v;
        } else if (!strcmp(a, "--tokens")) {
            view = PREPROCESS_TOKENS;
        } else if (!strcmp(a, "--eval")) {
            eval = 1;
        } else if (!strcmp(a, "--color")) {
            color = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "qlora-preprocess: unknown option \"%s\"\n", a);
            usage(stderr);
            train_config_free(&c);
            return 2;
        } else if (train_config_apply_override(&c, a, &e)) {
            fprintf(stderr, "qlora-preprocess: %s\n", e.msg);
            train_config_free(&c);
            return 2;
        }
    }
    if (train_config_validate(&c, &e)) {
        fprintf(stderr, "qlora-preprocess: %s\n", e.msg);
        train_config_free(&c);
        return 2;
    }
    /* the same [config] lines as qlora-train */
    for (int i = 0; i < c.n_warnings; i++) fprintf(stderr, "[config] %s\n", c.warnings[i]);
    int rc = preprocess_show(&c, n, eval, view, color, stdout, &e);
    if (rc) fprintf(stderr, "qlora-preprocess: %s\n", e.msg);
    train_config_free(&c);
    return rc ? 1 : 0;
}
