/* tests/tmpdir.h — a scratch directory under /tmp for a group of cmocka tests:
 * made by the group set-up, removed with everything in it by the tear-down. */
#ifndef QLORA_TESTS_TMPDIR_H
#define QLORA_TESTS_TMPDIR_H

/* The group state: the directory's path. */
typedef struct tmpdir {
    char dir[64];
} tmpdir;

/* For a group set-up: a new tmpdir "/tmp/<prefix>_XXXXXX" (mkdtemp) as
 * *state. prefix: at most 40 characters. Returns 0, or -1 when it cannot be
 * made. */
int tmpdir_setup(void **state, const char *prefix);

/* A cmocka group tear-down for tmpdir_setup: removes the directory and its
 * contents and frees the state. Returns 0, or -1 when `rm -rf` fails. */
int tmpdir_teardown(void **state);

/* rm -rf `dir` (a mkdtemp path: no quote characters). Returns 0 or -1. */
int tmpdir_remove(const char *dir);

#endif
