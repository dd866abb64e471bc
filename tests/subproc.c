/* tests/subproc.c — see subproc.h. POSIX fork/exec with a stderr pipe. */
#include "tests/subproc.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"

const char *subproc_trainer(void) {
    const char *b = getenv("QLORA_TRAIN_BIN");
    return b && *b ? b : "bin/qlora-train";
}

const char *subproc_tool(const char *name) {
    static char paths[4][512];
    static int k;
    char *p = paths[k++ % 4];
    const char *dir = getenv("QLORA_BIN_DIR");
    snprintf(p, sizeof paths[0], "%s/qlora-%s", dir && *dir ? dir : "bin", name);
    return p;
}

int subproc_start(subproc *p, char *const argv[], const char *const *env_extra) {
    memset(p, 0, sizeof *p);
    int fds[2];
    if (pipe(fds)) return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        close(fds[1]);
        int dn = open("/dev/null", O_WRONLY);
        if (dn >= 0) dup2(dn, 1);
        for (int i = 0; env_extra && env_extra[i]; i++) putenv((char *)env_extra[i]);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        execv(argv[0], argv);
        fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fds[1]);
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    p->pid = pid;
    p->err_fd = fds[0];
    p->err_cap = 4096;
    p->err = calloc(p->err_cap, 1);
    return p->err ? 0 : -1;
}

static void drain(subproc *p) {
    for (;;) {
        if (p->err_len + 4097 > p->err_cap) {
            size_t cap = p->err_cap * 2;
            char *n = realloc(p->err, cap);
            if (!n) return;
            p->err = n;
            p->err_cap = cap;
        }
        ssize_t r = read(p->err_fd, p->err + p->err_len, 4096);
        if (r <= 0) break;
        p->err_len += (size_t)r;
        p->err[p->err_len] = 0;
    }
}

int subproc_poll(subproc *p, int timeout_ms) {
    if (p->done) return 1;
    struct pollfd pf = {.fd = p->err_fd, .events = POLLIN};
    poll(&pf, 1, timeout_ms);
    drain(p);
    int st;
    if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
        drain(p);
        p->status = st;
        p->done = 1;
    }
    return p->done;
}

void subproc_wait(subproc *p, int timeout_s) {
    double t0 = clock_now_sec();
    while (!subproc_poll(p, 100)) {
        if (timeout_s > 0 && clock_now_sec() - t0 > timeout_s) {
            fprintf(stderr, "[subproc] pid %d still running after %d s: killing it\n", (int)p->pid, timeout_s);
            kill(p->pid, SIGKILL);
            timeout_s = 0;
        }
    }
}

int subproc_exit_code(const subproc *p) {
    if (WIFEXITED(p->status)) return WEXITSTATUS(p->status);
    if (WIFSIGNALED(p->status)) return 128 + WTERMSIG(p->status);
    return -1;
}

void subproc_free(subproc *p) {
    if (p->err_fd > 0) close(p->err_fd);
    free(p->err);
    memset(p, 0, sizeof *p);
}

int subproc_run(char *const argv[], const char *const *env_extra, int timeout_s, char **err) {
    subproc p;
    if (subproc_start(&p, argv, env_extra)) return -1;
    subproc_wait(&p, timeout_s);
    int rc = subproc_exit_code(&p);
    if (err) {
        *err = p.err;
        p.err = NULL;
    }
    subproc_free(&p);
    return rc;
}
