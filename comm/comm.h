/* comm/comm.h — the ranks of a job and the collectives between them.
 *
 * A communicator (`comm`) is a rank's view of the job: its rank, the world
 * size, its rank among the processes of its own machine (local_rank), and a
 * table of collectives (`comm_ops`) in the manner of the backend table
 * (autograd/backend.h): callers never name an implementation. Three exist or
 * are planned:
 *
 *   single  one process, no launcher, no MPI initialised (comm_single);
 *   mpi     Open MPI (or any MPI-3 library) for CPU ranks: comm/comm_mpi.c,
 *           chosen by comm_init when the process was started by mpirun, srun
 *           (--mpi=pmix) or another MPI launcher;
 *   nccl    (not written yet) GPU ranks: buffers in device memory, a
 *           non-blocking communicator whose waits poll ncclCommGetAsyncError
 *           against the same deadline and end with ncclCommAbort (never
 *           ncclCommDestroy, which can hang on a dead peer); the unique id
 *           bootstrapped over the mpi communicator. `memory` says where an
 *           implementation's buffers live.
 *
 * Semantics (those of NCCL, so that the nccl implementation is a
 * translation): counts are elements, not bytes; every call is collective (all
 * ranks call it with the same count, dtype and root) and complete on return;
 * sums are plain sums — there is no average: scale afterwards (NCCL's ncclAvg
 * pre-multiplies by 1/n, inexact unless n is a power of two;
 * docs/design.md "Known traps"). With exactly two ranks a sum is one a + b
 * and therefore bitwise independent of the order the library picks.
 *
 * Faults: every collective completes within the communicator's timeout_sec
 * (the config's ddp_timeout) or returns -1 with a message naming this rank,
 * the collective and the timeout; after a failure the communicator is unusable
 * and the caller ends the job with comm_abort (with MPI a collective cannot
 * be cancelled, only the job aborted). A rank that dies is noticed by the
 * launcher (mpirun names the rank and its signal and kills the others) or, if
 * it hangs, by the timeout of the ranks waiting for it.
 */
#ifndef QLORA_COMM_COMM_H
#define QLORA_COMM_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

/* Element types of collective buffers. Sums: F32, F64 in their own precision;
 * BF16 as bf16(float(a) + float(b)) (round to nearest even, core/bf16.h) per
 * pairwise addition; U8 and I64 as integers (U8 wraps modulo 256). */
typedef enum comm_dtype { COMM_F32, COMM_BF16, COMM_U8, COMM_F64, COMM_I64 } comm_dtype;

/* Bytes per element of t (4, 2, 1, 8, 8). */
size_t comm_dtype_size(comm_dtype t);

/* "f32", "bf16", "u8", "f64", "i64". */
const char *comm_dtype_name(comm_dtype t);

typedef struct comm comm;

/* The collectives of one implementation. Each returns 0, or -1 with e set
 * (the communicator is then unusable: comm_abort). */
typedef struct comm_ops {
    const char *name;   /* "single", "mpi" (later "nccl") */
    const char *memory; /* where buffers live: "host" (single, mpi) or "device" (nccl) */
    /* buf[0..count) ← Σ over ranks of buf[0..count), in place, on every rank. */
    int (*all_reduce_sum)(comm *c, void *buf, size_t count, comm_dtype t, qerr *e);
    /* send holds world_size·recvcount elements; recv[0..recvcount) ← Σ over
     * ranks of send[rank·recvcount .. (rank+1)·recvcount). In place when
     * recv == send + rank·recvcount (NCCL's convention). */
    int (*reduce_scatter_sum)(comm *c, const void *send, void *recv, size_t recvcount, comm_dtype t, qerr *e);
    /* recv[r·sendcount .. (r+1)·sendcount) ← rank r's send[0..sendcount), on
     * every rank. In place when send == recv + rank·sendcount. */
    int (*all_gather)(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, qerr *e);
    /* buf[0..count) ← root's buf[0..count), on every rank. */
    int (*broadcast)(comm *c, void *buf, size_t count, comm_dtype t, int root, qerr *e);
    /* Returns when every rank has called it. */
    int (*barrier)(comm *c, qerr *e);
    /* Ends every rank of the job now with exit status `code` (MPI_Abort; a
     * single process exits). Does not return. */
    void (*abort)(comm *c, int code);
    /* Releases the communicator's library state (MPI_Finalize). */
    void (*finalize)(comm *c);
} comm_ops;

struct comm {
    const comm_ops *ops;
    int rank, world_size;   /* 0 <= rank < world_size */
    int local_rank;         /* rank among the ranks of this machine (shared memory) */
    int local_world_size;   /* ranks on this machine */
    double timeout_sec;     /* how long one collective may take (ddp_timeout); default 1800 */
    int err_fd;             /* where this rank speaks when it fails: 2, or the saved stderr of a rank whose
                             * ordinary output the program silenced (only rank 0 logs) */
    void *impl;             /* the implementation's state */
};

/* The default of timeout_sec: 1800 s, HF TrainingArguments' ddp_timeout. */
#define COMM_DEFAULT_TIMEOUT_SEC 1800.0

/* Set *out to the communicator of this process: mpi when it was started by an
 * MPI launcher (Open MPI's mpirun / prterun: OMPI_COMM_WORLD_SIZE or
 * PMIX_RANK; MPICH-style and srun --mpi=pmi2: PMI_RANK), else single. Refuses
 * (-1, one line) a launcher this build cannot join (built without MPI) and
 * srun tasks started without an MPI plugin (SLURM_NTASKS > 1 but no PMI
 * variables: each task would train alone, the same data N times). Free with
 * comm_free. */
int comm_init(comm **out, qerr *e);

/* A one-process communicator (rank 0 of 1), whatever the environment. */
int comm_single(comm **out, qerr *e);

/* Whether this build has the mpi implementation. */
int comm_have_mpi(void);

/* The environment variable that says this process was started by an MPI
 * launcher (e.g. "OMPI_COMM_WORLD_SIZE"), or NULL. */
const char *comm_launcher_env(void);

/* The collectives of c->ops, checked: counts that overflow the
 * implementation (MPI counts are int) are refused, root out of range is
 * refused. 0 or -1 with e set. */
int comm_all_reduce_sum(comm *c, void *buf, size_t count, comm_dtype t, qerr *e);
int comm_reduce_scatter_sum(comm *c, const void *send, void *recv, size_t recvcount, comm_dtype t, qerr *e);
int comm_all_gather(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, qerr *e);
int comm_broadcast(comm *c, void *buf, size_t count, comm_dtype t, int root, qerr *e);
int comm_barrier(comm *c, qerr *e);

/* End the whole job with exit status code (>= 1). Does not return. */
void comm_abort(comm *c, int code) __attribute__((noreturn));

/* Finalize and free (NULL is fine). */
void comm_free(comm *c);

/* The command that starts nproc local ranks of prog_argv (NULL-terminated)
 * under Open MPI: `mpirun -np N --bind-to none --use-hwthread-cpus
 * [--oversubscribe] [--allow-run-as-root] prog args...`. --bind-to none
 * because each rank runs OpenMP threads (Open MPI binds a rank to one core by
 * default when N <= 2); slots are hardware threads, --oversubscribe when N
 * exceeds the online CPUs; --allow-run-as-root when running as root (Open
 * MPI refuses root otherwise; containers and CI run as root). The one source
 * of these flags: `qlora-train --nproc N` runs it as its child and the tests run it.
 * *out: malloc'd array of pointers into static or argv strings, plus the
 * numbers formatted into it (free the array with free). 0, or -1 with e. */
int comm_mpirun_argv(int nproc, char *const *prog_argv, char ***out, qerr *e);

/* The mpi implementation's constructor (comm/comm_mpi.c): MPI_Init_thread
 * (MPI_THREAD_FUNNELED), rank, size, local rank from MPI_Comm_split_type
 * (MPI_COMM_TYPE_SHARED). -1 with e set when built without MPI. */
int comm_mpi_init(comm **out, qerr *e);

#endif
