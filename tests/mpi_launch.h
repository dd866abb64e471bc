/* tests/mpi_launch.h — run a program as N ranks under mpirun from a test,
 * with the command line `qlora-train --nproc N` uses (comm_mpirun_argv). */
#ifndef QLORA_TESTS_MPI_LAUNCH_H
#define QLORA_TESTS_MPI_LAUNCH_H

#include <stddef.h>

#include "tests/subproc.h"

/* 1 when this build has MPI and `mpirun` is on PATH; else 0 with the reason
 * in why (n bytes) for the test's "SKIPPED: <why>" line. */
int mpi_launch_available(char *why, size_t n);

/* For a test's first line: 0 when mpi_launch_available, else prints "SKIPPED: <why>" and returns 1. */
int mpi_launch_skip(void);

/* `mpirun -np <np> <trainer> cfg output_dir=out extra...` (the trainer of tests/subproc.h subproc_trainer;
 * extra: NULL or NULL-terminated key=value overrides, at most 12) run as mpi_launch_run does, env_extra
 * NULL meaning OMP_NUM_THREADS=1, at most 600 s. Returns the exit code; *err (malloc'd) gets stderr. */
int mpi_launch_trainer(int np, const char *cfg, const char *out, const char *const *extra,
                       const char *const *env_extra, char **err);

/* Runs `mpirun -np <np> <flags> prog_argv...` (env_extra: NULL or
 * NULL-terminated "NAME=value" added to mpirun's environment, which local
 * ranks inherit) to completion, at most timeout_s seconds (then SIGKILL, exit
 * 137). Returns the exit code; *err (malloc'd) gets stderr. */
int mpi_launch_run(int np, char *const *prog_argv, const char *const *env_extra, int timeout_s, char **err);

/* Starts `mpirun -np <np> <flags> prog_argv...` as mpi_launch_run does,
 * without waiting (tests/subproc.h). Returns 0, or -1 (message on stderr). */
int mpi_launch_start(subproc *p, int np, char *const *prog_argv, const char *const *env_extra);

/* Runs the mpirun command line argv (argv[0] "mpirun", looked up on PATH)
 * as mpi_launch_run does. */
int mpi_launch_argv(char **argv, const char *const *env_extra, int timeout_s, char **err);

#endif
