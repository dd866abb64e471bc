/* tests/mpi_launch.c — see mpi_launch.h. */
#include "tests/mpi_launch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm/comm.h"
#include "tests/subproc.h"

/* mpirun's path from PATH into buf, or 0. */
static int find_mpirun(char *buf, size_t n) {
    const char *path = getenv("PATH");
    for (const char *p = path ? path : ""; *p;) {
        const char *end = strchr(p, ':');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        snprintf(buf, n, "%.*s/mpirun", (int)len, p);
        if (len && access(buf, X_OK) == 0) return 1;
        p += len + (end ? 1 : 0);
    }
    return 0;
}

int mpi_launch_available(char *why, size_t n) {
    char path[4096];
    if (!comm_have_mpi()) {
        snprintf(why, n, "this build has no MPI (libopenmpi-dev not found by pkg-config at build time)");
        return 0;
    }
    if (!find_mpirun(path, sizeof path)) {
        snprintf(why, n, "mpirun not found on PATH (apt-get install openmpi-bin)");
        return 0;
    }
    return 1;
}

int mpi_launch_skip(void) {
    char why[256];
    if (mpi_launch_available(why, sizeof why)) return 0;
    printf("SKIPPED: %s\n", why);
    return 1;
}

int mpi_launch_trainer(int np, const char *cfg, const char *out, const char *const *extra,
                       const char *const *env_extra, char **err) {
    static const char *const threads1[] = {"OMP_NUM_THREADS=1", NULL};
    char od[600];
    snprintf(od, sizeof od, "output_dir=%s", out);
    char *prog[16];
    int n = 0;
    prog[n++] = (char *)subproc_trainer();
    prog[n++] = (char *)cfg;
    prog[n++] = od;
    for (int i = 0; extra && extra[i] && n < 15; i++) prog[n++] = (char *)extra[i];
    prog[n] = NULL;
    return mpi_launch_run(np, prog, env_extra ? env_extra : threads1, 600, err);
}

int mpi_launch_run(int np, char *const *prog_argv, const char *const *env_extra, int timeout_s, char **err) {
    char **argv;
    qerr e;
    if (comm_mpirun_argv(np, prog_argv, &argv, &e)) {
        *err = strdup(e.msg);
        return -1;
    }
    int rc = mpi_launch_argv(argv, env_extra, timeout_s, err);
    free(argv);
    return rc;
}

int mpi_launch_argv(char **argv, const char *const *env_extra, int timeout_s, char **err) {
    char path[4096];
    char *saved = argv[0];
    if (find_mpirun(path, sizeof path)) argv[0] = path; /* subproc_run execs without a PATH search */
    int rc = subproc_run(argv, env_extra, timeout_s, err);
    argv[0] = saved;
    return rc;
}

int mpi_launch_start(subproc *p, int np, char *const *prog_argv, const char *const *env_extra) {
    char **argv;
    qerr e;
    if (comm_mpirun_argv(np, prog_argv, &argv, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return -1;
    }
    char path[4096];
    if (find_mpirun(path, sizeof path)) argv[0] = path;
    int rc = subproc_start(p, argv, env_extra);
    free(argv);
    return rc;
}
