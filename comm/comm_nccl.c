/* comm/comm_nccl.c — the NCCL communicator (see comm.h), for GPU ranks.
 *
 * Status: compiled in the CUDA build (`make CUDA=1`, nccl.h found) and linked;
 * not yet run on a GPU (README "Several processes, GPUs and machines");
 * `make test-gpu` runs its checks on a machine with two GPUs.
 *
 * Loading. libnccl.so.2 is loaded with dlopen by comm_nccl_upgrade, the way
 * autograd/backend_cuda.cu loads cuBLASLt: a CPU run of a CUDA build neither
 * needs the library nor pays for mapping it.
 *
 * Bootstrap. The 128-byte ncclUniqueId is made by rank 0 and travels over the
 * communicator the process started with: an MPI broadcast under mpirun/srun
 * (MPI carries the id only, NCCL the data), or the TCP rendezvous of
 * comm/comm_tcp.c under torchrun. Before that, comm_cuda_select_device made
 * device local_rank current (cudaSetDevice before any other CUDA call).
 *
 * Faults. The communicator is non-blocking (ncclConfig_t.blocking = 0): every
 * NCCL call may return ncclInProgress, and is then polled with
 * ncclCommGetAsyncError until it leaves that state; a collective's completion
 * is an event recorded after it on the communicator's stream, polled with
 * cudaEventQuery while ncclCommGetAsyncError is watched for a remote or system
 * error. All of it against one deadline, timeout_sec (ddp_timeout) from the
 * call. A failure or the deadline ends in ncclCommAbort (never
 * ncclCommDestroy, which waits for peers that may be dead) and an error
 * naming this rank and the collective; the caller then ends the job
 * (comm_abort: the communicator underneath aborts — MPI_Abort under mpirun,
 * exit under torchrun, whose agent ends the other workers).
 *
 * Buffers. Device memory (cudaMalloc'd: the cuda backend's arrays) goes to
 * NCCL as it is. The caller has synchronised the stream that wrote it (the
 * trainer's be->sync() before its collectives); results are complete on
 * return, so later kernels on any stream see them. Host memory — the small
 * control messages (fingerprints, loss sums, evaluation slots, a checkpoint's
 * optimizer state in host staging) — is copied to a device staging buffer,
 * reduced there, and copied back: the trainer's calls stay the same for MPI
 * (host) and NCCL. Semantics are the ones of comm.h, which are NCCL's: counts
 * in elements, sums only (never ncclAvg: 1/n premultiplied is inexact unless
 * n is a power of two; callers scale afterwards), in-place reduce-scatter when
 * recv == send + rank·recvcount, in-place all-gather when send == recv +
 * rank·sendcount. NCCL has no barrier: a one-element all-reduce serves.
 */
#include "comm/comm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"

#if defined(QLORA_CUDA)
#include <cuda_runtime_api.h>

int comm_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

int comm_cuda_select_device(comm *c, qerr *e) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
        cudaGetLastError(); /* "no device": nothing to select (a CPU run) */
        return 0;
    }
    const int lws = c->local_world_size > 0 ? c->local_world_size : 1;
    int dev;
    if (n >= lws) dev = c->local_rank;
    else if (n == 1) dev = 0; /* the launcher gave each rank its own GPU */
    else
        return qerr_set(e,
                        "rank %d: %d ranks run on this machine but it shows %d CUDA devices: one GPU per rank (start "
                        "at most %d ranks per machine, or give each rank one GPU with CUDA_VISIBLE_DEVICES)",
                        c->rank, lws, n, n);
    cudaError_t rc = cudaSetDevice(dev);
    if (rc != cudaSuccess)
        return qerr_set(e, "rank %d (local rank %d): cudaSetDevice(%d): %s", c->rank, c->local_rank, dev,
                        cudaGetErrorString(rc));
    return 0;
}
#else
int comm_cuda_device_count(void) { return 0; }
int comm_cuda_select_device(comm *c, qerr *e) { return 0; }
#endif

#if defined(QLORA_HAVE_NCCL) && defined(QLORA_CUDA)

#include <dlfcn.h>
#include <nccl.h>

int comm_have_nccl(void) { return 1; }

/* the NCCL entry points, from dlopen */
static struct {
    int tried, ok;
    char why[512];
    int version;
    __typeof__(&ncclGetVersion) GetVersion;
    __typeof__(&ncclGetUniqueId) GetUniqueId;
    __typeof__(&ncclCommInitRankConfig) CommInitRankConfig;
    __typeof__(&ncclCommGetAsyncError) CommGetAsyncError;
    __typeof__(&ncclCommAbort) CommAbort;
    __typeof__(&ncclCommFinalize) CommFinalize;
    __typeof__(&ncclCommDestroy) CommDestroy;
    __typeof__(&ncclGetErrorString) GetErrorString;
    __typeof__(&ncclGetLastError) GetLastError;
    __typeof__(&ncclAllReduce) AllReduce;
    __typeof__(&ncclReduceScatter) ReduceScatter;
    __typeof__(&ncclAllGather) AllGather;
    __typeof__(&ncclBroadcast) Broadcast;
    __typeof__(&ncclReduce) Reduce;
    __typeof__(&ncclGroupStart) GroupStart;
    __typeof__(&ncclGroupEnd) GroupEnd;
} NF;

/* non-blocking communicators, ncclCommGetAsyncError and ncclCommFinalize: NCCL 2.14 */
#define NCCL_MIN_VERSION 21400

static int load_nccl(void) {
    if (NF.tried) return NF.ok;
    NF.tried = 1;
    static const char *const names[] = {"libnccl.so.2", "libnccl.so"};
    void *h = NULL;
    for (size_t i = 0; i < sizeof names / sizeof *names && !h; i++) h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(NF.why, sizeof NF.why, "cannot load NCCL (libnccl.so.2: %s); install NVIDIA's libnccl2 (Debian: "
                                        "libnccl2 libnccl-dev from the CUDA repository)", dlerror());
        return 0;
    }
#define NSYM(field, sym)                                                                          \
    if (!(*(void **)&NF.field = dlsym(h, #sym))) {                                                \
        snprintf(NF.why, sizeof NF.why, "libnccl.so.2 has no %s (NCCL older than 2.14?)", #sym); \
        return 0;                                                                                 \
    }
    NSYM(GetVersion, ncclGetVersion)
    NSYM(GetUniqueId, ncclGetUniqueId)
    NSYM(CommInitRankConfig, ncclCommInitRankConfig)
    NSYM(CommGetAsyncError, ncclCommGetAsyncError)
    NSYM(CommAbort, ncclCommAbort)
    NSYM(CommFinalize, ncclCommFinalize)
    NSYM(CommDestroy, ncclCommDestroy)
    NSYM(GetErrorString, ncclGetErrorString)
    NSYM(GetLastError, ncclGetLastError)
    NSYM(AllReduce, ncclAllReduce)
    NSYM(ReduceScatter, ncclReduceScatter)
    NSYM(AllGather, ncclAllGather)
    NSYM(Broadcast, ncclBroadcast)
    NSYM(Reduce, ncclReduce)
    NSYM(GroupStart, ncclGroupStart)
    NSYM(GroupEnd, ncclGroupEnd)
#undef NSYM
    if (NF.GetVersion(&NF.version) != ncclSuccess || NF.version < NCCL_MIN_VERSION) {
        snprintf(NF.why, sizeof NF.why, "NCCL %d is older than 2.14 (non-blocking communicators)", NF.version);
        return 0;
    }
    NF.ok = 1;
    return 1;
}

typedef struct nccl_impl {
    ncclComm_t nc;
    cudaStream_t stream;
    cudaEvent_t ev;
    int dead;           /* aborted: no NCCL call any more */
    void *stage;        /* device staging for host buffers */
    size_t stage_bytes;
    float *one;         /* the barrier's element */
    const comm_ops *boot_ops; /* the communicator underneath (mpi, torchrun, single) */
    void *boot_impl;
} nccl_impl;

struct comm_request {
    cudaEvent_t ev; /* NULL: complete already (a host-staged collective) */
    size_t count;
    comm_dtype t;
    const char *what;
};

static ncclDataType_t nccl_type(comm_dtype t) {
    switch (t) {
    case COMM_F32: return ncclFloat32;
    case COMM_BF16: return ncclBfloat16;
    case COMM_U8: return ncclUint8;
    case COMM_F64: return ncclFloat64;
    case COMM_I64: return ncclInt64;
    }
    return ncclFloat32;
}

/* After a failure: abort the communicator once, and say why. */
static int nccl_fail(comm *c, const char *what, size_t count, comm_dtype t, const char *why, qerr *e) {
    nccl_impl *m = c->impl;
    if (!m->dead) {
        m->dead = 1;
        NF.CommAbort(m->nc);
    }
    return qerr_set(e, "rank %d of %d: %s of %zu %s: %s (NCCL communicator aborted)", c->rank, c->world_size, what,
                    count, comm_dtype_name(t), why);
}

static int nccl_fail_rc(comm *c, const char *what, size_t count, comm_dtype t, ncclResult_t rc, qerr *e) {
    nccl_impl *m = c->impl;
    char why[512];
    const char *last = NF.GetLastError(m->nc);
    snprintf(why, sizeof why, "%s%s%s", NF.GetErrorString(rc), last && *last ? ": " : "", last ? last : "");
    return nccl_fail(c, what, count, t, why, e);
}

static void poll_sleep(unsigned polls, long *sleep_ns) {
    if (polls < 256) return;
    struct timespec ts = {0, *sleep_ns};
    nanosleep(&ts, NULL);
    if (*sleep_ns < 1000000) *sleep_ns += *sleep_ns / 4;
}

static int timed_out(comm *c, const char *what, size_t count, comm_dtype t, qerr *e) {
    char why[200];
    snprintf(why, sizeof why, "did not complete within ddp_timeout %g s: another rank died or hangs", c->timeout_sec);
    return nccl_fail(c, what, count, t, why, e);
}

/* The state after a non-blocking NCCL call that returned rc: wait while it is ncclInProgress. */
static int nccl_settle(comm *c, ncclResult_t rc, const char *what, size_t count, comm_dtype t, double deadline,
                       qerr *e) {
    nccl_impl *m = c->impl;
    long sleep_ns = 20000;
    for (unsigned polls = 0; rc == ncclInProgress; polls++) {
        if (clock_now_sec() > deadline) return timed_out(c, what, count, t, e);
        poll_sleep(polls, &sleep_ns);
        ncclResult_t st = ncclSuccess;
        rc = NF.CommGetAsyncError(m->nc, &st);
        if (rc == ncclSuccess) rc = st;
    }
    return rc == ncclSuccess ? 0 : nccl_fail_rc(c, what, count, t, rc, e);
}

/* Wait for ev (recorded after the collective on the stream), watching NCCL's async error. */
static int nccl_wait_event(comm *c, cudaEvent_t ev, const char *what, size_t count, comm_dtype t, double deadline,
                           qerr *e) {
    nccl_impl *m = c->impl;
    long sleep_ns = 20000;
    for (unsigned polls = 0;; polls++) {
        cudaError_t q = cudaEventQuery(ev);
        if (q == cudaSuccess) return 0;
        if (q != cudaErrorNotReady) return nccl_fail(c, what, count, t, cudaGetErrorString(q), e);
        ncclResult_t st = ncclSuccess, rc = NF.CommGetAsyncError(m->nc, &st);
        if (rc == ncclSuccess) rc = st;
        if (rc != ncclSuccess && rc != ncclInProgress) return nccl_fail_rc(c, what, count, t, rc, e);
        if (clock_now_sec() > deadline) return timed_out(c, what, count, t, e);
        poll_sleep(polls, &sleep_ns);
    }
}

static int is_device(const void *p) {
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

static int stage_reserve(comm *c, size_t bytes, qerr *e) {
    nccl_impl *m = c->impl;
    if (bytes <= m->stage_bytes) return 0;
    if (m->stage) cudaFree(m->stage);
    m->stage = NULL;
    m->stage_bytes = 0;
    cudaError_t rc = cudaMalloc(&m->stage, bytes);
    if (rc != cudaSuccess)
        return qerr_set(e, "rank %d: NCCL staging of %zu bytes of host memory: cudaMalloc: %s", c->rank, bytes,
                        cudaGetErrorString(rc));
    m->stage_bytes = bytes;
    return 0;
}

/* The one way every collective runs: host buffers staged (send at the stage's start, recv after it), the call
 * issued by `issue` on the stream, settled, completed (event), results copied back to host recv. */
typedef ncclResult_t (*issue_fn)(comm *c, const void *send, void *recv, size_t count, comm_dtype t, int root);

static int run_coll(comm *c, const char *what, issue_fn issue, const void *send, size_t send_bytes, void *recv,
                    size_t recv_bytes, size_t count, comm_dtype t, int root, qerr *e) {
    nccl_impl *m = c->impl;
    if (m->dead) return qerr_set(e, "rank %d: %s: the NCCL communicator was aborted", c->rank, what);
    const double deadline = clock_now_sec() + c->timeout_sec;
    const int same = send == recv;
    const int send_dev = is_device(send), recv_dev = same ? send_dev : is_device(recv);
    const void *s = send;
    void *r = recv;
    if (!send_dev || !recv_dev) {
        const size_t sb = send_dev ? 0 : (send_bytes + 255) / 256 * 256, rb = recv_dev || same ? 0 : recv_bytes;
        if (stage_reserve(c, sb + rb, e)) return -1;
        if (!send_dev) {
            cudaError_t ce = cudaMemcpyAsync(m->stage, send, send_bytes, cudaMemcpyHostToDevice, m->stream);
            if (ce != cudaSuccess) return nccl_fail(c, what, count, t, cudaGetErrorString(ce), e);
            s = m->stage;
        }
        if (same) r = (void *)s; /* in place stays in place */
        else if (!recv_dev) r = (char *)m->stage + sb;
    }
    if (nccl_settle(c, issue(c, s, r, count, t, root), what, count, t, deadline, e)) return -1;
    cudaError_t ce = cudaEventRecord(m->ev, m->stream);
    if (ce != cudaSuccess) return nccl_fail(c, what, count, t, cudaGetErrorString(ce), e);
    if (nccl_wait_event(c, m->ev, what, count, t, deadline, e)) return -1;
    if (!recv_dev) { /* the stream is idle now: a plain copy cannot wait on a peer */
        ce = cudaMemcpy(recv, r, recv_bytes, cudaMemcpyDeviceToHost);
        if (ce != cudaSuccess) return nccl_fail(c, what, count, t, cudaGetErrorString(ce), e);
    }
    return 0;
}

static ncclResult_t issue_all_reduce(comm *c, const void *s, void *r, size_t n, comm_dtype t, int root) {
    nccl_impl *m = c->impl;
    return NF.AllReduce(s, r, n, nccl_type(t), ncclSum, m->nc, m->stream);
}
static ncclResult_t issue_reduce_scatter(comm *c, const void *s, void *r, size_t n, comm_dtype t, int root) {
    nccl_impl *m = c->impl;
    return NF.ReduceScatter(s, r, n, nccl_type(t), ncclSum, m->nc, m->stream);
}
static ncclResult_t issue_all_gather(comm *c, const void *s, void *r, size_t n, comm_dtype t, int root) {
    nccl_impl *m = c->impl;
    return NF.AllGather(s, r, n, nccl_type(t), m->nc, m->stream);
}
static ncclResult_t issue_broadcast(comm *c, const void *s, void *r, size_t n, comm_dtype t, int root) {
    nccl_impl *m = c->impl;
    return NF.Broadcast(s, r, n, nccl_type(t), root, m->nc, m->stream);
}

static int nccl_all_reduce(comm *c, void *buf, size_t count, comm_dtype t, qerr *e) {
    const size_t b = count * comm_dtype_size(t);
    return run_coll(c, "all_reduce", issue_all_reduce, buf, b, buf, b, count, t, 0, e);
}

static int nccl_reduce_scatter(comm *c, const void *send, void *recv, size_t recvcount, comm_dtype t, qerr *e) {
    const size_t b = recvcount * comm_dtype_size(t);
    /* in place (recv == send + rank·recvcount) is NCCL's own convention: passed as it is; staged host buffers go
     * out of place (same result) */
    if (!is_device(send) && (const char *)recv == (const char *)send + (size_t)c->rank * b) {
        char *tmp = malloc(b ? b : 1);
        if (!tmp) return qerr_set(e, "rank %d: reduce_scatter: out of memory", c->rank);
        int rc = run_coll(c, "reduce_scatter", issue_reduce_scatter, send, b * (size_t)c->world_size, tmp, b,
                          recvcount, t, 0, e);
        if (!rc) memcpy(recv, tmp, b);
        free(tmp);
        return rc;
    }
    return run_coll(c, "reduce_scatter", issue_reduce_scatter, send, b * (size_t)c->world_size, recv, b, recvcount,
                    t, 0, e);
}

static int nccl_all_gather(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, qerr *e) {
    const size_t b = sendcount * comm_dtype_size(t);
    if (!is_device(recv) && (const char *)send == (const char *)recv + (size_t)c->rank * b) {
        char *tmp = malloc(b ? b : 1); /* host in place: the own part copied out first */
        if (!tmp) return qerr_set(e, "rank %d: all_gather: out of memory", c->rank);
        memcpy(tmp, send, b);
        int rc = run_coll(c, "all_gather", issue_all_gather, tmp, b, recv, b * (size_t)c->world_size, sendcount, t,
                          0, e);
        free(tmp);
        return rc;
    }
    return run_coll(c, "all_gather", issue_all_gather, send, b, recv, b * (size_t)c->world_size, sendcount, t, 0, e);
}

static int nccl_broadcast(comm *c, void *buf, size_t count, comm_dtype t, int root, qerr *e) {
    const size_t b = count * comm_dtype_size(t);
    return run_coll(c, "broadcast", issue_broadcast, buf, b, buf, b, count, t, root, e);
}

static int nccl_barrier(comm *c, qerr *e) {
    nccl_impl *m = c->impl;
    return run_coll(c, "barrier", issue_all_reduce, m->one, 4, m->one, 4, 1, COMM_F32, 0, e);
}

static int nccl_all_gather_start(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t,
                                 comm_request **out, qerr *e) {
    nccl_impl *m = c->impl;
    *out = NULL;
    comm_request *q = calloc(1, sizeof *q);
    if (!q) return qerr_set(e, "rank %d: all_gather: out of memory", c->rank);
    q->count = sendcount;
    q->t = t;
    q->what = "all_gather";
    if (!is_device(send) || !is_device(recv)) { /* host buffers: done now, through the staging */
        if (nccl_all_gather(c, send, recv, sendcount, t, e)) {
            free(q);
            return -1;
        }
        *out = q;
        return 0;
    }
    if (m->dead) {
        free(q);
        return qerr_set(e, "rank %d: all_gather: the NCCL communicator was aborted", c->rank);
    }
    const double deadline = clock_now_sec() + c->timeout_sec;
    cudaError_t ce = cudaEventCreateWithFlags(&q->ev, cudaEventDisableTiming);
    if (ce != cudaSuccess) {
        free(q);
        return nccl_fail(c, "all_gather", sendcount, t, cudaGetErrorString(ce), e);
    }
    if (nccl_settle(c, issue_all_gather(c, send, recv, sendcount, t, 0), "all_gather", sendcount, t, deadline, e) ||
        (ce = cudaEventRecord(q->ev, m->stream)) != cudaSuccess) {
        int rc = ce != cudaSuccess ? nccl_fail(c, "all_gather", sendcount, t, cudaGetErrorString(ce), e) : -1;
        cudaEventDestroy(q->ev);
        free(q);
        return rc;
    }
    *out = q;
    return 0;
}

static ncclResult_t issue_reduce(comm *c, const void *s, void *r, size_t n, comm_dtype t, int root) {
    nccl_impl *m = c->impl;
    return NF.Reduce(s, r, n, nccl_type(t), ncclSum, root, m->nc, m->stream);
}

/* A request for a device-buffer collective issued by `issue_group` on the stream: settled, then an event recorded
 * after it; wait polls the event. */
typedef ncclResult_t (*issue_group_fn)(comm *c, void *buf, const size_t *counts, size_t count, comm_dtype t);

static int start_on_stream(comm *c, const char *what, issue_group_fn issue, void *buf, const size_t *counts,
                           size_t count, comm_dtype t, comm_request **out, qerr *e) {
    nccl_impl *m = c->impl;
    comm_request *q = calloc(1, sizeof *q);
    if (!q) return qerr_set(e, "rank %d: %s: out of memory", c->rank, what);
    q->count = count;
    q->t = t;
    q->what = what;
    if (m->dead) {
        free(q);
        return qerr_set(e, "rank %d: %s: the NCCL communicator was aborted", c->rank, what);
    }
    const double deadline = clock_now_sec() + c->timeout_sec;
    cudaError_t ce = cudaEventCreateWithFlags(&q->ev, cudaEventDisableTiming);
    if (ce != cudaSuccess) {
        free(q);
        return nccl_fail(c, what, count, t, cudaGetErrorString(ce), e);
    }
    if (nccl_settle(c, issue(c, buf, counts, count, t), what, count, t, deadline, e) ||
        (ce = cudaEventRecord(q->ev, m->stream)) != cudaSuccess) {
        int rc = ce != cudaSuccess ? nccl_fail(c, what, count, t, cudaGetErrorString(ce), e) : -1;
        cudaEventDestroy(q->ev);
        free(q);
        return rc;
    }
    *out = q;
    return 0;
}

static ncclResult_t issue_all_reduce_group(comm *c, void *buf, const size_t *counts, size_t count, comm_dtype t) {
    return issue_all_reduce(c, buf, buf, count, t, 0);
}

/* one ncclReduce per rank's segment (root r, in place), fused in a group */
static ncclResult_t issue_reduce_scatter_group(comm *c, void *buf, const size_t *counts, size_t count,
                                               comm_dtype t) {
    const size_t es = comm_dtype_size(t);
    ncclResult_t rc = NF.GroupStart(), rc2;
    if (rc != ncclSuccess) return rc;
    size_t displ = 0;
    for (int r = 0; r < c->world_size && rc == ncclSuccess; r++) {
        char *seg = (char *)buf + displ * es;
        if (counts[r]) rc = issue_reduce(c, seg, seg, counts[r], t, r);
        displ += counts[r];
    }
    rc2 = NF.GroupEnd();
    return rc != ncclSuccess ? rc : rc2;
}

static int nccl_all_reduce_start(comm *c, void *buf, size_t count, comm_dtype t, comm_request **out, qerr *e) {
    *out = NULL;
    if (is_device(buf)) return start_on_stream(c, "all_reduce", issue_all_reduce_group, buf, NULL, count, t, out, e);
    comm_request *q = calloc(1, sizeof *q); /* host buffer: done now, through the staging */
    if (!q) return qerr_set(e, "rank %d: all_reduce: out of memory", c->rank);
    *q = (comm_request){.count = count, .t = t, .what = "all_reduce"};
    if (nccl_all_reduce(c, buf, count, t, e)) {
        free(q);
        return -1;
    }
    *out = q;
    return 0;
}

static int nccl_reduce_scatter_start(comm *c, void *buf, const size_t *counts, comm_dtype t, comm_request **out,
                                     qerr *e) {
    *out = NULL;
    const size_t es = comm_dtype_size(t);
    if (is_device(buf))
        return start_on_stream(c, "reduce_scatter", issue_reduce_scatter_group, buf, counts, counts[c->rank], t, out,
                               e);
    comm_request *q = calloc(1, sizeof *q); /* host buffer: segment by segment now, through the staging */
    if (!q) return qerr_set(e, "rank %d: reduce_scatter: out of memory", c->rank);
    *q = (comm_request){.count = counts[c->rank], .t = t, .what = "reduce_scatter"};
    size_t displ = 0;
    for (int r = 0; r < c->world_size; r++) {
        char *seg = (char *)buf + displ * es;
        /* the staged result comes back on every rank; only root r's is the sum (the others' segments are
         * undefined by the contract) */
        if (counts[r] && run_coll(c, "reduce_scatter", issue_reduce, seg, counts[r] * es, seg, counts[r] * es,
                                  counts[r], t, r, e)) {
            free(q);
            return -1;
        }
        displ += counts[r];
    }
    *out = q;
    return 0;
}

static int nccl_request_wait(comm *c, comm_request *q, qerr *e) {
    int rc = 0;
    if (q->ev) {
        rc = nccl_wait_event(c, q->ev, q->what, q->count, q->t, clock_now_sec() + c->timeout_sec, e);
        cudaEventDestroy(q->ev);
    }
    free(q);
    return rc;
}

/* The communicator underneath takes over c for its own abort / finalize. */
static void restore_boot(comm *c) {
    nccl_impl *m = c->impl;
    c->ops = m->boot_ops;
    c->impl = m->boot_impl;
}

static void nccl_abort(comm *c, int code) {
    nccl_impl *m = c->impl;
    fflush(NULL);
    if (!m->dead) {
        m->dead = 1;
        NF.CommAbort(m->nc);
    }
    restore_boot(c);
    c->ops->abort(c, code);
}

static void nccl_release(nccl_impl *m) {
    if (m->stage) cudaFree(m->stage);
    if (m->one) cudaFree(m->one);
    if (m->ev) cudaEventDestroy(m->ev);
    if (m->stream) cudaStreamDestroy(m->stream);
}

static void nccl_finalize(comm *c) {
    nccl_impl *m = c->impl;
    if (!m->dead) {
        /* ncclCommFinalize flushes and settles (polled against the timeout); a peer that is gone turns it into
         * an abort, never a hang in ncclCommDestroy */
        qerr e;
        if (nccl_settle(c, NF.CommFinalize(m->nc), "finalize", 0, COMM_U8, clock_now_sec() + c->timeout_sec, &e))
            dprintf(c->err_fd, "qlora-train: %s\n", e.msg); /* aborted by nccl_fail */
        else NF.CommDestroy(m->nc);
    }
    nccl_release(m);
    restore_boot(c);
    free(m);
    c->ops->finalize(c);
}

static const comm_ops nccl_ops = {.name = "nccl", .memory = "device", .all_reduce_sum = nccl_all_reduce,
                                  .reduce_scatter_sum = nccl_reduce_scatter, .all_gather = nccl_all_gather,
                                  .all_gather_start = nccl_all_gather_start, .wait = nccl_request_wait,
                                  .all_reduce_start = nccl_all_reduce_start,
                                  .reduce_scatter_start = nccl_reduce_scatter_start,
                                  .broadcast = nccl_broadcast, .barrier = nccl_barrier, .abort = nccl_abort,
                                  .finalize = nccl_finalize};

/* The log lines of a new communicator (stderr: only rank 0's is open in qlora-train): where each rank runs,
 * peer-to-peer access from this rank's GPU, and an all-reduce bandwidth probe. */
static void nccl_report(comm *c, const char *boot) {
    int dev = 0, n = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceCount(&n);
    struct cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, dev) != cudaSuccess) snprintf(p.name, sizeof p.name, "?");
    fprintf(stderr, "[nccl] NCCL %d.%d.%d, %d ranks, id over %s; rank %d on GPU %d (%s), local rank %d of %d\n",
            NF.version / 10000, NF.version / 100 % 100, NF.version % 100, c->world_size, boot, c->rank, dev, p.name,
            c->local_rank, c->local_world_size);
    char line[1024];
    size_t len = (size_t)snprintf(line, sizeof line, "[nccl] peer-to-peer from GPU %d:", dev);
    for (int d = 0; d < n && len + 32 < sizeof line; d++) {
        if (d == dev) continue;
        int ok = 0;
        if (cudaDeviceCanAccessPeer(&ok, dev, d) != cudaSuccess) {
            cudaGetLastError();
            ok = -1;
        }
        len += (size_t)snprintf(line + len, sizeof line - len, " GPU %d %s", d, ok > 0 ? "yes" : ok ? "?" : "no");
    }
    fprintf(stderr, "%s%s\n", line,
            n < 2 ? " (no other GPU on this machine)"
                  : " (no: NCCL goes through host memory or the network — e.g. RTX 4090s)");
    /* the probe: 64 MiB of f32 all-reduced, 2 warm-up runs and 5 timed (every rank takes part) */
    const size_t count = 16u << 20, bytes = count * 4;
    void *buf = NULL;
    if (cudaMalloc(&buf, bytes) != cudaSuccess) {
        cudaGetLastError();
        fprintf(stderr, "[nccl] all_reduce probe skipped: no 64 MiB of device memory free\n");
        return;
    }
    cudaMemset(buf, 0, bytes);
    cudaDeviceSynchronize();
    qerr e;
    double t0 = 0;
    int rc = 0;
    for (int i = 0; i < 7 && !rc; i++) {
        if (i == 2) t0 = clock_now_sec();
        rc = nccl_all_reduce(c, buf, count, COMM_F32, &e);
    }
    cudaFree(buf);
    if (rc) {
        fprintf(stderr, "[nccl] all_reduce probe failed: %s\n", e.msg);
        return;
    }
    const double dt = (clock_now_sec() - t0) / 5, algbw = (double)bytes / dt / 1e9;
    fprintf(stderr, "[nccl] all_reduce probe, 64 MiB f32: %.2f ms, algbw %.1f GB/s, busbw %.1f GB/s "
                    "(algbw x 2(n-1)/n, nccl-tests' measure)\n",
            dt * 1e3, algbw, algbw * 2.0 * (c->world_size - 1) / c->world_size);
}

int comm_nccl_upgrade(comm *c, qerr *e) {
    const char *boot = c->ops->name;
    if (!strcmp(boot, "nccl")) return 0;
    if (!load_nccl())
        return qerr_set(e, "rank %d: device: cuda with %d ranks needs NCCL: %s", c->rank, c->world_size, NF.why);
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    ncclResult_t rc = ncclSuccess;
    if (c->rank == 0 && (rc = NF.GetUniqueId(&id)) != ncclSuccess)
        return qerr_set(e, "rank 0: ncclGetUniqueId: %s: %s", NF.GetErrorString(rc), NF.GetLastError(NULL));
    char how[300];
    if (!strcmp(boot, "mpi")) {
        if (comm_broadcast(c, &id, sizeof id, COMM_U8, 0, e)) return qerr_prefix(e, "NCCL's unique id over MPI");
        snprintf(how, sizeof how, "MPI");
    } else if (!strcmp(boot, "torchrun")) {
        const comm_torchrun *t = c->impl;
        if (comm_tcp_rendezvous(t->master_addr, t->rdzv_port, c->rank, c->world_size, &id, sizeof id,
                                c->timeout_sec, e))
            return -1;
        snprintf(how, sizeof how, "the TCP rendezvous at %s:%d", t->master_addr, t->rdzv_port);
    } else if (!strcmp(boot, "single")) {
        snprintf(how, sizeof how, "none (one rank)");
    } else
        return qerr_set(e, "rank %d: NCCL cannot start over the %s communicator", c->rank, boot);

    nccl_impl *m = calloc(1, sizeof *m);
    if (!m) return qerr_set(e, "rank %d: out of memory", c->rank);
    cudaError_t ce;
    if ((ce = cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (ce = cudaEventCreateWithFlags(&m->ev, cudaEventDisableTiming)) != cudaSuccess ||
        (ce = cudaMalloc((void **)&m->one, 4)) != cudaSuccess || (ce = cudaMemset(m->one, 0, 4)) != cudaSuccess) {
        nccl_release(m);
        free(m);
        return qerr_set(e, "rank %d: NCCL set-up: %s", c->rank, cudaGetErrorString(ce));
    }
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    const double deadline = clock_now_sec() + c->timeout_sec;
    rc = NF.CommInitRankConfig(&m->nc, c->world_size, id, c->rank, &cfg);
    long sleep_ns = 20000;
    for (unsigned polls = 0; rc == ncclInProgress && m->nc; polls++) {
        if (clock_now_sec() > deadline) break;
        poll_sleep(polls, &sleep_ns);
        ncclResult_t st = ncclSuccess;
        rc = NF.CommGetAsyncError(m->nc, &st);
        if (rc == ncclSuccess) rc = st;
    }
    if (rc != ncclSuccess) {
        const char *last = m->nc ? NF.GetLastError(m->nc) : "";
        if (m->nc) NF.CommAbort(m->nc);
        nccl_release(m);
        free(m);
        if (rc == ncclInProgress)
            return qerr_set(e,
                            "rank %d of %d: ncclCommInitRankConfig did not complete within ddp_timeout %g s: "
                            "another rank did not join (NCCL communicator aborted)",
                            c->rank, c->world_size, c->timeout_sec);
        return qerr_set(e, "rank %d of %d: ncclCommInitRankConfig: %s%s%s", c->rank, c->world_size,
                        NF.GetErrorString(rc), last && *last ? ": " : "", last ? last : "");
    }
    m->boot_ops = c->ops;
    m->boot_impl = c->impl;
    c->ops = &nccl_ops;
    c->impl = m;
    nccl_report(c, how);
    return m->dead ? qerr_set(e, "rank %d: the NCCL bandwidth probe failed (see above)", c->rank) : 0;
}

#else /* no NCCL in this build */

int comm_have_nccl(void) { return 0; }

int comm_nccl_upgrade(comm *c, qerr *e) {
#if defined(QLORA_CUDA)
    return qerr_set(e, "rank %d: device: cuda with %d ranks needs NCCL, and this CUDA build found no nccl.h "
                       "(install libnccl-dev, or set NCCL_HOME, and rebuild: make CUDA=1)",
                    c->rank, c->world_size);
#else
    return qerr_set(e, "rank %d: device: cuda with %d ranks needs NCCL: this build has no CUDA (make CUDA=1)",
                    c->rank, c->world_size);
#endif
}

#endif
