/* tests/subproc.h — run bin/qlora-train (or any program) as a child process
 * from a test: capture its stderr, kill it at a chosen moment, collect the
 * exit status. For the CLI fault and kill/resume tests. */
#ifndef QLORA_TESTS_SUBPROC_H
#define QLORA_TESTS_SUBPROC_H

#include <stddef.h>
#include <sys/types.h>

/* The trainer binary under test: $QLORA_TRAIN_BIN, else "bin/qlora-train"
 * (make test-asan points it at the sanitizer build). */
const char *subproc_trainer(void);

/* A side tool ("generate", "export", "preprocess"): "$QLORA_BIN_DIR/qlora-<name>", else
 * "bin/qlora-<name>" (make test-asan points QLORA_BIN_DIR at the sanitizer builds). The string is valid
 * until four more calls. */
const char *subproc_tool(const char *name);

typedef struct subproc {
    pid_t pid;
    int err_fd;      /* read end of the child's stderr (non-blocking) */
    char *err;       /* everything read so far, NUL-terminated */
    size_t err_len, err_cap;
    int status;      /* waitpid status once reaped */
    int done;
} subproc;

/* Start argv[0] with argv; env_extra: NULL or a NULL-terminated list of
 * "NAME=value" added to the environment. stdout goes to /dev/null. */
int subproc_start(subproc *p, char *const argv[], const char *const *env_extra);

/* Read available stderr, waiting at most timeout_ms; reap the child if it
 * exited (p->done). Returns 1 if the child is done. */
int subproc_poll(subproc *p, int timeout_ms);

/* Wait for exit (reading stderr); SIGKILL after timeout_s. */
void subproc_wait(subproc *p, int timeout_s);

/* Exit code (0-255), or 128 + signal if killed by a signal. */
int subproc_exit_code(const subproc *p);

void subproc_free(subproc *p);

/* Run to completion and return the exit code; *err (malloc'd) gets stderr. */
int subproc_run(char *const argv[], const char *const *env_extra, int timeout_s, char **err);

#endif
