/* tests/tmpdir.c — see tmpdir.h. */
#include "tests/tmpdir.h"

#include <stdio.h>
#include <stdlib.h>

int tmpdir_setup(void **state, const char *prefix) {
    tmpdir *t = calloc(1, sizeof *t);
    if (!t) return -1;
    snprintf(t->dir, sizeof t->dir, "/tmp/%s_XXXXXX", prefix);
    if (!mkdtemp(t->dir)) {
        free(t);
        return -1;
    }
    *state = t;
    return 0;
}

int tmpdir_remove(const char *dir) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

int tmpdir_teardown(void **state) {
    tmpdir *t = *state;
    if (tmpdir_remove(t->dir)) return -1;
    free(t);
    return 0;
}
