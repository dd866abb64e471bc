/* tests/dir_snapshot.h — what a directory holds, as text: every file under it (recursively, names
 * sorted) with its size and the XXH64 of its first 1 MiB, one line each. Two snapshots compared with
 * strcmp show whether a failed run left an earlier run's outputs untouched (tests/test_cli_faults.c,
 * tests/test_hostile_input.c). */
#ifndef QLORA_TESTS_DIR_SNAPSHOT_H
#define QLORA_TESTS_DIR_SNAPSHOT_H

/* The listing of `dir` in one malloc'd string (the caller frees it); a missing directory gives
 * "<dir>: (missing)". At most 256 entries per directory and 64 KiB of text are listed. Returns NULL
 * only when memory runs out. */
char *dir_snapshot(const char *dir);

#endif
