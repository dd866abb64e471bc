/* comm/comm.c — choosing the communicator, the single-process one, and the
 * checked entry points over comm_ops (see comm.h).
 */
#include "comm/comm.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

size_t comm_dtype_size(comm_dtype t) {
    switch (t) {
    case COMM_F32: return 4;
    case COMM_BF16: return 2;
    case COMM_U8: return 1;
    case COMM_F64: return 8;
    case COMM_I64: return 8;
    }
    return 0;
}

const char *comm_dtype_name(comm_dtype t) {
    switch (t) {
    case COMM_F32: return "f32";
    case COMM_BF16: return "bf16";
    case COMM_U8: return "u8";
    case COMM_F64: return "f64";
    case COMM_I64: return "i64";
    }
    return "?";
}

/* ------------------------------------------------------------------------ */
/* single process                                                             */

static int single_all_reduce(comm *c, void *buf, size_t count, comm_dtype t, qerr *e) { return 0; }

static int single_reduce_scatter(comm *c, const void *send, void *recv, size_t recvcount, comm_dtype t, qerr *e) {
    if (send != recv) memmove(recv, send, recvcount * comm_dtype_size(t));
    return 0;
}

static int single_all_gather(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, qerr *e) {
    if (send != recv) memmove(recv, send, sendcount * comm_dtype_size(t));
    return 0;
}

/* single: the gather is done when it starts; the request only marks that */
struct comm_request {
    int done;
};
static comm_request single_done = {1};

static int single_all_gather_start(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t,
                                   comm_request **req, qerr *e) {
    if (single_all_gather(c, send, recv, sendcount, t, e)) return -1;
    *req = &single_done;
    return 0;
}

static int single_wait(comm *c, comm_request *req, qerr *e) { return 0; }

static int single_all_reduce_start(comm *c, void *buf, size_t count, comm_dtype t, comm_request **req, qerr *e) {
    *req = &single_done;
    return 0;
}

static int single_reduce_scatter_start(comm *c, void *buf, const size_t *counts, comm_dtype t, comm_request **req,
                                       qerr *e) {
    *req = &single_done; /* the one segment is the sum already */
    return 0;
}

static int single_broadcast(comm *c, void *buf, size_t count, comm_dtype t, int root, qerr *e) { return 0; }

static int single_barrier(comm *c, qerr *e) { return 0; }

static void single_abort(comm *c, int code) {
    fflush(NULL);
    _Exit(code);
}

static void single_finalize(comm *c) {}

static const comm_ops single_ops = {.name = "single", .memory = "host", .all_reduce_sum = single_all_reduce,
                                    .reduce_scatter_sum = single_reduce_scatter, .all_gather = single_all_gather,
                                    .all_gather_start = single_all_gather_start, .wait = single_wait,
                                    .all_reduce_start = single_all_reduce_start,
                                    .reduce_scatter_start = single_reduce_scatter_start,
                                    .broadcast = single_broadcast, .barrier = single_barrier,
                                    .abort = single_abort, .finalize = single_finalize};

int comm_single(comm **out, qerr *e) {
    comm *c = qcalloc(1, sizeof *c, e);
    if (!c) return -1;
    *c = (comm){.ops = &single_ops, .rank = 0, .world_size = 1, .local_rank = 0, .local_world_size = 1,
                .timeout_sec = COMM_DEFAULT_TIMEOUT_SEC, .err_fd = 2};
    *out = c;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* torchrun: rank, world and local rank, no data (until comm_nccl_upgrade)   */

static int torchrun_refuse(comm *c, const char *what, qerr *e) {
    return qerr_set(e,
                    "rank %d: %s: a torchrun launch carries data only over NCCL (device: cuda); CPU ranks "
                    "communicate over MPI: launch them with mpirun -np %d qlora-train ... or qlora-train --nproc %d",
                    c->rank, what, c->world_size, c->world_size);
}
static int torchrun_all_reduce(comm *c, void *buf, size_t count, comm_dtype t, qerr *e) {
    return torchrun_refuse(c, "all_reduce", e);
}
static int torchrun_reduce_scatter(comm *c, const void *send, void *recv, size_t n, comm_dtype t, qerr *e) {
    return torchrun_refuse(c, "reduce_scatter", e);
}
static int torchrun_all_gather(comm *c, const void *send, void *recv, size_t n, comm_dtype t, qerr *e) {
    return torchrun_refuse(c, "all_gather", e);
}
static int torchrun_all_gather_start(comm *c, const void *send, void *recv, size_t n, comm_dtype t,
                                     comm_request **req, qerr *e) {
    *req = NULL;
    return torchrun_refuse(c, "all_gather", e);
}
static int torchrun_all_reduce_start(comm *c, void *buf, size_t n, comm_dtype t, comm_request **req, qerr *e) {
    *req = NULL;
    return torchrun_refuse(c, "all_reduce", e);
}
static int torchrun_reduce_scatter_start(comm *c, void *buf, const size_t *counts, comm_dtype t, comm_request **req,
                                         qerr *e) {
    *req = NULL;
    return torchrun_refuse(c, "reduce_scatter", e);
}
static int torchrun_wait(comm *c, comm_request *req, qerr *e) { return torchrun_refuse(c, "wait", e); }
static int torchrun_broadcast(comm *c, void *buf, size_t count, comm_dtype t, int root, qerr *e) {
    return torchrun_refuse(c, "broadcast", e);
}
static int torchrun_barrier(comm *c, qerr *e) { return torchrun_refuse(c, "barrier", e); }

static const comm_ops torchrun_ops = {.name = "torchrun", .memory = "device", .all_reduce_sum = torchrun_all_reduce,
                                      .reduce_scatter_sum = torchrun_reduce_scatter,
                                      .all_gather = torchrun_all_gather,
                                      .all_gather_start = torchrun_all_gather_start, .wait = torchrun_wait,
                                      .all_reduce_start = torchrun_all_reduce_start,
                                      .reduce_scatter_start = torchrun_reduce_scatter_start,
                                      .broadcast = torchrun_broadcast, .barrier = torchrun_barrier,
                                      .abort = single_abort, /* torchrun's agent ends the other workers */
                                      .finalize = single_finalize};

int comm_torchrun_init(comm **out, const comm_torchrun *t, qerr *e) {
    comm *c = qcalloc(1, sizeof *c + sizeof *t, e);
    if (!c) return -1;
    comm_torchrun *keep = (comm_torchrun *)(c + 1); /* the rendezvous address, for comm_nccl_upgrade */
    *keep = *t;
    *c = (comm){.ops = &torchrun_ops, .rank = t->rank, .world_size = t->world_size, .local_rank = t->local_rank,
                .local_world_size = t->local_world_size, .timeout_sec = COMM_DEFAULT_TIMEOUT_SEC, .err_fd = 2,
                .impl = keep};
    *out = c;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* choosing                                                                   */

const char *comm_launcher_env(void) {
    /* Open MPI's mpirun (ORTE) and prterun/srun --mpi=pmix (PMIx); MPICH's hydra and srun --mpi=pmi2 (PMI) */
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++)
        if (getenv(vars[i])) return vars[i];
    return NULL;
}

int comm_init(comm **out, qerr *e) {
    *out = NULL;
    const char *var = comm_launcher_env();
    if (var) {
        if (!comm_have_mpi())
            return qerr_set(e,
                            "started by an MPI launcher (%s=%s) but this qlora-train was built without MPI "
                            "(install libopenmpi-dev and rebuild: make)",
                            var, getenv(var));
        return comm_mpi_init(out, e);
    }
    comm_torchrun tr;
    int t = comm_torchrun_env(&tr, e);
    if (t < 0) return -1;
    if (t > 0 && tr.world_size > 1) return comm_torchrun_init(out, &tr, e);
    const char *nt = getenv("SLURM_NTASKS"), *step = getenv("SLURM_STEP_ID");
    if (nt && step && atoi(nt) > 1)
        return qerr_set(e,
                        "srun started %s tasks but no MPI plugin (no PMIX_RANK or PMI_RANK in the environment): "
                        "each task would train alone on the same data; launch with `srun --mpi=pmix ...` (see "
                        "`srun --mpi=list`)",
                        nt);
    return comm_single(out, e);
}

/* ------------------------------------------------------------------------ */
/* checked entry points                                                       */

static int count_ok(const comm *c, size_t count, const char *what, qerr *e) {
    if (count > (size_t)INT_MAX)
        return qerr_set(e, "rank %d: %s of %zu elements: more than the %d a single %s collective takes", c->rank,
                        what, count, INT_MAX, c->ops->name);
    return 0;
}

int comm_all_reduce_sum(comm *c, void *buf, size_t count, comm_dtype t, qerr *e) {
    if (count_ok(c, count, "all_reduce", e)) return -1;
    return count ? c->ops->all_reduce_sum(c, buf, count, t, e) : 0;
}

int comm_reduce_scatter_sum(comm *c, const void *send, void *recv, size_t recvcount, comm_dtype t, qerr *e) {
    if (count_ok(c, recvcount * (size_t)c->world_size, "reduce_scatter", e)) return -1;
    return recvcount ? c->ops->reduce_scatter_sum(c, send, recv, recvcount, t, e) : 0;
}

int comm_all_gather(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, qerr *e) {
    if (count_ok(c, sendcount * (size_t)c->world_size, "all_gather", e)) return -1;
    return sendcount ? c->ops->all_gather(c, send, recv, sendcount, t, e) : 0;
}

/* A zero-count gather: nothing to move on any rank; comm_wait knows it by this address. */
static char empty_request;

int comm_all_gather_start(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, comm_request **req,
                          qerr *e) {
    *req = NULL;
    if (count_ok(c, sendcount * (size_t)c->world_size, "all_gather", e)) return -1;
    if (!sendcount) {
        *req = (comm_request *)(void *)&empty_request;
        return 0;
    }
    return c->ops->all_gather_start(c, send, recv, sendcount, t, req, e);
}

int comm_all_reduce_start(comm *c, void *buf, size_t count, comm_dtype t, comm_request **req, qerr *e) {
    *req = NULL;
    if (count_ok(c, count, "all_reduce", e)) return -1;
    if (!count) {
        *req = (comm_request *)(void *)&empty_request;
        return 0;
    }
    return c->ops->all_reduce_start(c, buf, count, t, req, e);
}

int comm_reduce_scatter_start(comm *c, void *buf, const size_t *counts, comm_dtype t, comm_request **req, qerr *e) {
    *req = NULL;
    size_t total = 0;
    for (int r = 0; r < c->world_size; r++) total += counts[r];
    if (count_ok(c, total, "reduce_scatter", e)) return -1;
    if (!total) {
        *req = (comm_request *)(void *)&empty_request;
        return 0;
    }
    return c->ops->reduce_scatter_start(c, buf, counts, t, req, e);
}

int comm_wait(comm *c, comm_request *req, qerr *e) {
    if (!req) return qerr_set(e, "rank %d: wait on no request", c->rank);
    if ((void *)req == (void *)&empty_request) return 0;
    return c->ops->wait(c, req, e);
}

int comm_broadcast(comm *c, void *buf, size_t count, comm_dtype t, int root, qerr *e) {
    if (root < 0 || root >= c->world_size)
        return qerr_set(e, "rank %d: broadcast from root %d: expected a rank in [0, %d)", c->rank, root,
                        c->world_size);
    if (count_ok(c, count, "broadcast", e)) return -1;
    return count ? c->ops->broadcast(c, buf, count, t, root, e) : 0;
}

int comm_barrier(comm *c, qerr *e) { return c->ops->barrier(c, e); }

void comm_abort(comm *c, int code) {
    c->ops->abort(c, code > 0 ? code : 1);
    _Exit(code > 0 ? code : 1); /* an implementation's abort does not return; this keeps the promise if it did */
}

void comm_free(comm *c) {
    if (!c) return;
    c->ops->finalize(c);
    free(c);
}

int comm_mpirun_argv(int nproc, char *const *prog_argv, char ***out, qerr *e) {
    *out = NULL;
    if (nproc < 1) return qerr_set(e, "--nproc: expected a positive number of ranks, got %d", nproc);
    size_t n_prog = 0;
    while (prog_argv[n_prog]) n_prog++;
    /* the array and, after it, the rank count as text */
    const size_t n_max = 10 + n_prog + 1;
    char **v = qmalloc(n_max * sizeof *v + 16, e);
    if (!v) return -1;
    char *num = (char *)(v + n_max);
    snprintf(num, 16, "%d", nproc);
    size_t i = 0;
    v[i++] = "mpirun";
    v[i++] = "-np";
    v[i++] = num;
    v[i++] = "--bind-to";
    v[i++] = "none";
    v[i++] = "--use-hwthread-cpus";
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu > 0 && nproc > ncpu) v[i++] = "--oversubscribe";
    if (geteuid() == 0) v[i++] = "--allow-run-as-root";
    for (size_t k = 0; k < n_prog; k++) v[i++] = prog_argv[k];
    v[i] = NULL;
    *out = v;
    return 0;
}
