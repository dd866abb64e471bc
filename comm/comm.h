/* comm/comm.h — the ranks of a job and the collectives between them.
 *
 * A communicator (`comm`) is a rank's view of the job: its rank, the world
 * size, its rank among the processes of its own machine (local_rank), and a
 * table of collectives (`comm_ops`) in the manner of the backend table
 * (autograd/backend.h): callers never name an implementation. Three carry
 * data (and a fourth, torchrun, only knows the ranks):
 *
 *   single  one process, no launcher, no MPI initialised (comm_single);
 *   mpi     Open MPI (or any MPI-3 library) for CPU ranks: comm/comm_mpi.c,
 *           chosen by comm_init when the process was started by mpirun, srun
 *           (--mpi=pmix) or another MPI launcher;
 *   nccl    GPU ranks (comm/comm_nccl.c, CUDA builds): a non-blocking NCCL
 *           communicator (ncclCommInitRankConfig, blocking = 0) whose every
 *           call is polled with ncclCommGetAsyncError and the stream's event
 *           against the same deadline and ends with ncclCommAbort on a failure
 *           or timeout (never ncclCommDestroy, which can hang on a dead peer).
 *           It replaces, in place, the communicator the process started with
 *           (comm_nccl_upgrade) once the run knows it trains on CUDA: the
 *           unique id travels over that one — MPI under mpirun/srun, or the
 *           TCP rendezvous (comm_tcp_rendezvous) under torchrun, whose
 *           communicator ("torchrun", comm_init) carries no data itself.
 *           `memory` says where an implementation's buffers live: nccl takes
 *           device memory as it is (the caller has synchronised the stream
 *           that wrote it; results are complete on return) and stages host
 *           memory through a device buffer.
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

/* An all-gather in flight (comm_all_gather_start .. comm_wait): opaque, owned
 * by the implementation, freed by comm_wait. */
typedef struct comm_request comm_request;

/* The collectives of one implementation. Each returns 0, or -1 with e set
 * (the communicator is then unusable: comm_abort). */
typedef struct comm_ops {
    const char *name;   /* "single", "mpi", "torchrun" (no data: only until comm_nccl_upgrade), "nccl" */
    const char *memory; /* where buffers live: "host" (single, mpi) or "device" (nccl: device memory, or host
                         * memory staged through a device buffer — the small control messages) */
    /* buf[0..count) ← Σ over ranks of buf[0..count), in place, on every rank. */
    int (*all_reduce_sum)(comm *c, void *buf, size_t count, comm_dtype t, qerr *e);
    /* send holds world_size·recvcount elements; recv[0..recvcount) ← Σ over
     * ranks of send[rank·recvcount .. (rank+1)·recvcount). In place when
     * recv == send + rank·recvcount (NCCL's convention). */
    int (*reduce_scatter_sum)(comm *c, const void *send, void *recv, size_t recvcount, comm_dtype t, qerr *e);
    /* recv[r·sendcount .. (r+1)·sendcount) ← rank r's send[0..sendcount), on
     * every rank. In place when send == recv + rank·sendcount. */
    int (*all_gather)(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, qerr *e);
    /* all_gather started, not waited for: *req receives the request; send and
     * recv must stay valid and untouched until wait. Completes at once in the
     * single implementation (*req then says so). */
    int (*all_gather_start)(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t,
                            comm_request **req, qerr *e);
    /* all_reduce_sum started, not waited for (in place on buf[0..count)), as
     * all_gather_start: buf stays untouched by the caller until wait. */
    int (*all_reduce_start)(comm *c, void *buf, size_t count, comm_dtype t, comm_request **req, qerr *e);
    /* The uneven reduce-scatter, in place, started: buf holds Σ counts[r]
     * elements, rank r's segment at displ_r = Σ_{q<r} counts[q]; after wait,
     * buf[displ_rank .. displ_rank + counts[rank]) holds the sum over ranks of
     * that segment and the rest of buf is undefined. counts (world_size
     * entries) may be freed after the call returns. */
    int (*reduce_scatter_start)(comm *c, void *buf, const size_t *counts, comm_dtype t, comm_request **req,
                                qerr *e);
    /* Completes req within timeout_sec (from the call to wait) or fails as the
     * other collectives do; frees req in both cases. */
    int (*wait)(comm *c, comm_request *req, qerr *e);
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
 * PMIX_RANK; MPICH-style and srun --mpi=pmi2: PMI_RANK); torchrun (rank,
 * world size and local rank from the environment, no collectives until
 * comm_nccl_upgrade) when torchrun's RANK, WORLD_SIZE, MASTER_ADDR,
 * MASTER_PORT and LOCAL_RANK are set with WORLD_SIZE > 1 (a malformed one is
 * refused naming the variable); else single. Refuses
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

/* comm_all_gather_start / comm_wait: all_gather (same semantics, in-place
 * form included) split in two, so that computation runs while the bytes
 * travel (FULL_SHARD prefetches the next layer's frozen base with it,
 * model/llama_fsdp.c). *req is set (possibly to a request that is already
 * complete, e.g. for sendcount 0 or the single implementation) and must be
 * passed to comm_wait exactly once; send and recv stay valid and unmodified by
 * the caller until then. Every rank starts its gathers in the same order.
 * Errors: as comm_all_gather (-1, e set; *req NULL after a failed start; the
 * communicator is unusable after a failed wait: comm_abort). */
int comm_all_gather_start(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, comm_request **req,
                          qerr *e);
int comm_wait(comm *c, comm_request *req, qerr *e);

/* comm_all_reduce_start: comm_all_reduce_sum (in place on buf[0..count))
 * started, completed by comm_wait, as comm_all_gather_start. The per-layer
 * gradient buckets of NO_SHARD (model/llama.h llama_grad_buckets) start one
 * as soon as a layer's backward is done. With two ranks each element is one
 * a + b, the same as the blocking form's. Errors: as comm_all_reduce_sum. */
int comm_all_reduce_start(comm *c, void *buf, size_t count, comm_dtype t, comm_request **req, qerr *e);

/* comm_reduce_scatter_start: an uneven reduce-scatter (MPI_Reduce_scatter's
 * recvcounts) in place, started, completed by comm_wait: buf holds
 * Σ counts[r] elements (counts: world_size entries), rank r's segment
 * starting at Σ_{q<r} counts[q]; once waited for, this rank's segment holds
 * the sum over the ranks of that segment (the other segments' contents are
 * undefined). SHARD_GRAD_OP and FULL_SHARD reduce each layer's gradient
 * bucket so: the part of the bucket inside rank r's contiguous shard of the
 * flat adapter arena is rank r's segment. MPI: MPI_Ireduce_scatter with
 * MPI_IN_PLACE (the result moved into place by wait); NCCL: one ncclReduce
 * per segment (root r) in a group; single: nothing to do. Errors: as
 * comm_reduce_scatter_sum. */
int comm_reduce_scatter_start(comm *c, void *buf, const size_t *counts, comm_dtype t, comm_request **req, qerr *e);

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

/* torchrun's view of this rank (torchrun / torch.distributed.run sets these
 * in every worker's environment). */
typedef struct comm_torchrun {
    int rank, world_size, local_rank, local_world_size; /* RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE */
    char master_addr[256];                              /* MASTER_ADDR: where rank 0 runs */
    int master_port;                                    /* MASTER_PORT */
    /* the port rank 0's rendezvous listens on: QLORA_RDZV_PORT when set, else MASTER_PORT, or MASTER_PORT + 1
     * when torchrun's agent serves its own TCPStore there (TORCHELASTIC_USE_AGENT_STORE=True) */
    int rdzv_port;
} comm_torchrun;

/* Reads torchrun's environment: 1 and *out when RANK, WORLD_SIZE,
 * MASTER_ADDR, MASTER_PORT and LOCAL_RANK are all set and valid (0 <= RANK <
 * WORLD_SIZE, 1 <= port <= 65535; LOCAL_WORLD_SIZE optional); 0 when none of
 * them is set; -1 with e naming the variable when some are missing or
 * malformed. */
int comm_torchrun_env(comm_torchrun *out, qerr *e);

/* The rendezvous of a torchrun launch (comm/comm_tcp.c): rank 0 listens on
 * `port` and sends id[0..id_len) (id_len <= 4096; NCCL's unique id is 128
 * bytes) to each of the world_size − 1 other ranks, which connect to
 * master_addr:port (retrying until rank 0 listens) and receive it into id.
 * Rank 0 answers only when every rank has arrived, with the same world size
 * and distinct ranks. All waits end by timeout_sec. Errors (-1, e): a rank
 * missing at the deadline (rank 0 names which), rank 0 unreachable, a
 * WORLD_SIZE or RANK that disagrees (rank 0 and the rank concerned both name
 * it), the port taken. world_size 1: returns 0 at once. */
int comm_tcp_rendezvous(const char *master_addr, int port, int rank, int world_size, void *id, size_t id_len,
                        double timeout_sec, qerr *e);

/* The communicator of a torchrun launch (comm_init builds it): rank, world and
 * local rank from t; every collective fails with a line saying that a torchrun
 * launch needs device: cuda (NCCL) — CPU ranks communicate over MPI. abort
 * exits (torchrun's agent ends the other workers), finalize does nothing. */
int comm_torchrun_init(comm **out, const comm_torchrun *t, qerr *e);

/* Whether this build has the nccl implementation (a CUDA build that found
 * nccl.h; libnccl.so.2 itself is loaded with dlopen when a run needs it). */
int comm_have_nccl(void);

/* The CUDA devices this process sees (cudaGetDeviceCount); 0 without a device or in a build without CUDA. */
int comm_cuda_device_count(void);

/* Several ranks on CUDA: makes this rank's GPU current (cudaSetDevice) before
 * anything else touches CUDA in the process — device local_rank when this
 * machine shows at least local_world_size devices, device 0 when it shows
 * exactly one (the launcher gave each rank its own, CUDA_VISIBLE_DEVICES).
 * No device, or a build without CUDA: does nothing (0). -1 with e when the
 * machine's ranks outnumber its devices. */
int comm_cuda_select_device(comm *c, qerr *e);

/* Turns c (mpi, torchrun, or single for a one-GPU check) into the nccl
 * communicator over the same ranks, in place (c keeps its address; its old
 * implementation stays underneath for finalize and abort): loads
 * libnccl.so.2, rank 0 makes the unique id and sends it over c (MPI
 * broadcast) or the TCP rendezvous (torchrun), ncclCommInitRankConfig with
 * blocking = 0 polled against c->timeout_sec, logs peer-to-peer availability
 * and an all-reduce bandwidth probe (on stderr, "[nccl] ..."). Call after
 * comm_cuda_select_device and with the CUDA device current. -1 with e (one
 * line naming this rank) when NCCL is missing or its initialisation fails or
 * times out (the communicator is aborted; c then stays what it was). */
int comm_nccl_upgrade(comm *c, qerr *e);

#endif
