/* comm/comm_mpi.c — the MPI communicator (see comm.h), for CPU ranks.
 *
 * Every collective is MPI-3's non-blocking form (MPI_Iallreduce,
 * MPI_Ireduce_scatter_block, MPI_Ireduce_scatter, MPI_Iallgather, MPI_Ibcast,
 * MPI_Ibarrier)
 * completed by polling MPI_Test against a deadline of timeout_sec: a peer that
 * hangs turns into an error naming this rank and the collective, and the
 * caller aborts the job (MPI cannot cancel a collective). The poll spins
 * briefly, then sleeps 20 µs growing to 1 ms, so that a waiting rank leaves
 * its core to the others when ranks outnumber cores (mpirun --oversubscribe).
 *
 * bf16 has no MPI datatype: it travels as a committed 2-byte contiguous type
 * with a user-defined commutative sum (float add, round to nearest even).
 * Errors return (MPI_ERRORS_RETURN on MPI_COMM_WORLD) and are reported with
 * MPI_Error_string.
 *
 * Built only when the Makefile finds MPI (QLORA_HAVE_MPI); otherwise
 * comm_mpi_init refuses with one line and comm_have_mpi() is 0.
 */
#include "comm/comm.h"

#ifdef QLORA_HAVE_MPI

#include <mpi.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/bf16.h"
#include "core/clock.h"

typedef struct mpi_impl {
    MPI_Datatype bf16_type;
    MPI_Op bf16_sum;
    int we_initialized; /* MPI_Init_thread was ours: finalize it */
} mpi_impl;

int comm_have_mpi(void) { return 1; }

static void bf16_sum_fn(void *in, void *inout, int *len, MPI_Datatype *dt) {
    const bf16 *a = in;
    bf16 *b = inout;
    for (int i = 0; i < *len; i++) b[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

static MPI_Datatype mpi_type(const mpi_impl *m, comm_dtype t) {
    switch (t) {
    case COMM_F32: return MPI_FLOAT;
    case COMM_BF16: return m->bf16_type;
    case COMM_U8: return MPI_UINT8_T;
    case COMM_F64: return MPI_DOUBLE;
    case COMM_I64: return MPI_INT64_T;
    }
    return MPI_DATATYPE_NULL;
}

static MPI_Op mpi_sum(const mpi_impl *m, comm_dtype t) { return t == COMM_BF16 ? m->bf16_sum : MPI_SUM; }

static int mpi_fail(const comm *c, int rc, const char *what, qerr *e) {
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS) snprintf(s, sizeof s, "MPI error %d", rc);
    return qerr_set(e, "rank %d: %s: %s", c->rank, what, s);
}

/* Complete *req by polling until the deadline. */
static int mpi_wait(const comm *c, MPI_Request *req, const char *what, size_t count, comm_dtype t, qerr *e) {
    const double t0 = clock_now_sec(), deadline = t0 + c->timeout_sec;
    long sleep_ns = 20000;
    for (unsigned polls = 0;; polls++) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) return mpi_fail(c, rc, what, e);
        if (done) return 0;
        if (clock_now_sec() > deadline)
            return qerr_set(e,
                            "rank %d of %d: %s of %zu %s did not complete within ddp_timeout %g s: another rank "
                            "died or hangs",
                            c->rank, c->world_size, what, count, comm_dtype_name(t), c->timeout_sec);
        if (polls < 256) continue;
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 1000000) sleep_ns += sleep_ns / 4;
    }
}

static int mpi_all_reduce(comm *c, void *buf, size_t count, comm_dtype t, qerr *e) {
    const mpi_impl *m = c->impl;
    MPI_Request req;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)count, mpi_type(m, t), mpi_sum(m, t), MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "all_reduce", e);
    return mpi_wait(c, &req, "all_reduce", count, t, e);
}

static int mpi_reduce_scatter(comm *c, const void *send, void *recv, size_t recvcount, comm_dtype t, qerr *e) {
    const mpi_impl *m = c->impl;
    const size_t es = comm_dtype_size(t);
    const int in_place = (const char *)recv == (const char *)send + (size_t)c->rank * recvcount * es;
    MPI_Request req;
    /* MPI's in-place form takes the whole input in recvbuf and leaves the result at its start */
    int rc = in_place ? MPI_Ireduce_scatter_block(MPI_IN_PLACE, (void *)send, (int)recvcount, mpi_type(m, t),
                                                  mpi_sum(m, t), MPI_COMM_WORLD, &req)
                      : MPI_Ireduce_scatter_block(send, recv, (int)recvcount, mpi_type(m, t), mpi_sum(m, t),
                                                  MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "reduce_scatter", e);
    if (mpi_wait(c, &req, "reduce_scatter", recvcount, t, e)) return -1;
    if (in_place && c->rank) memmove(recv, send, recvcount * es);
    return 0;
}

static int mpi_all_gather(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t, qerr *e) {
    const mpi_impl *m = c->impl;
    const size_t es = comm_dtype_size(t);
    const int in_place = (const char *)send == (const char *)recv + (size_t)c->rank * sendcount * es;
    MPI_Request req;
    int rc = MPI_Iallgather(in_place ? MPI_IN_PLACE : send, (int)sendcount, mpi_type(m, t), recv, (int)sendcount,
                            mpi_type(m, t), MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "all_gather", e);
    return mpi_wait(c, &req, "all_gather", sendcount, t, e);
}

struct comm_request {
    MPI_Request req;
    size_t count;
    comm_dtype t;
    const char *what;
    int *recvcounts;          /* reduce_scatter_start: MPI's counts, valid until completion */
    void *move_dst;           /* reduce_scatter_start: the result lands at the buffer's start and is moved here */
    const void *move_src;
    size_t move_bytes;
};

static int mpi_all_gather_start(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t,
                                comm_request **out, qerr *e) {
    const mpi_impl *m = c->impl;
    const size_t es = comm_dtype_size(t);
    const int in_place = (const char *)send == (const char *)recv + (size_t)c->rank * sendcount * es;
    comm_request *r = calloc(1, sizeof *r);
    if (!r) return qerr_set(e, "rank %d: all_gather: out of memory", c->rank);
    r->count = sendcount;
    r->t = t;
    r->what = "all_gather";
    int rc = MPI_Iallgather(in_place ? MPI_IN_PLACE : send, (int)sendcount, mpi_type(m, t), recv, (int)sendcount,
                            mpi_type(m, t), MPI_COMM_WORLD, &r->req);
    if (rc != MPI_SUCCESS) {
        free(r);
        return mpi_fail(c, rc, "all_gather", e);
    }
    *out = r;
    return 0;
}

static int mpi_all_reduce_start(comm *c, void *buf, size_t count, comm_dtype t, comm_request **out, qerr *e) {
    const mpi_impl *m = c->impl;
    comm_request *r = calloc(1, sizeof *r);
    if (!r) return qerr_set(e, "rank %d: all_reduce: out of memory", c->rank);
    r->count = count;
    r->t = t;
    r->what = "all_reduce";
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)count, mpi_type(m, t), mpi_sum(m, t), MPI_COMM_WORLD, &r->req);
    if (rc != MPI_SUCCESS) {
        free(r);
        return mpi_fail(c, rc, "all_reduce", e);
    }
    *out = r;
    return 0;
}

static int mpi_reduce_scatter_start(comm *c, void *buf, const size_t *counts, comm_dtype t, comm_request **out,
                                    qerr *e) {
    const mpi_impl *m = c->impl;
    const size_t es = comm_dtype_size(t);
    comm_request *r = calloc(1, sizeof *r);
    int *rc_counts = malloc((size_t)c->world_size * sizeof *rc_counts);
    if (!r || !rc_counts) {
        free(r);
        free(rc_counts);
        return qerr_set(e, "rank %d: reduce_scatter: out of memory", c->rank);
    }
    size_t displ = 0;
    for (int q = 0; q < c->world_size; q++) {
        rc_counts[q] = (int)counts[q];
        if (q < c->rank) displ += counts[q];
    }
    *r = (comm_request){.count = counts[c->rank], .t = t, .what = "reduce_scatter", .recvcounts = rc_counts,
                        .move_dst = (char *)buf + displ * es, .move_src = buf, .move_bytes = counts[c->rank] * es};
    /* MPI's in-place form takes the whole input in recvbuf and leaves this rank's sum at its start */
    int rc = MPI_Ireduce_scatter(MPI_IN_PLACE, buf, rc_counts, mpi_type(m, t), mpi_sum(m, t), MPI_COMM_WORLD, &r->req);
    if (rc != MPI_SUCCESS) {
        free(rc_counts);
        free(r);
        return mpi_fail(c, rc, "reduce_scatter", e);
    }
    *out = r;
    return 0;
}

static int mpi_request_wait(comm *c, comm_request *r, qerr *e) {
    int rc = mpi_wait(c, &r->req, r->what, r->count, r->t, e);
    if (!rc && r->move_bytes && r->move_dst != r->move_src) memmove(r->move_dst, r->move_src, r->move_bytes);
    free(r->recvcounts);
    free(r);
    return rc;
}

static int mpi_broadcast(comm *c, void *buf, size_t count, comm_dtype t, int root, qerr *e) {
    const mpi_impl *m = c->impl;
    MPI_Request req;
    int rc = MPI_Ibcast(buf, (int)count, mpi_type(m, t), root, MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "broadcast", e);
    return mpi_wait(c, &req, "broadcast", count, t, e);
}

static int mpi_barrier(comm *c, qerr *e) {
    MPI_Request req;
    int rc = MPI_Ibarrier(MPI_COMM_WORLD, &req);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "barrier", e);
    return mpi_wait(c, &req, "barrier", 0, COMM_U8, e);
}

static void mpi_abort(comm *c, int code) {
    fflush(NULL);
    MPI_Abort(MPI_COMM_WORLD, code);
}

static void mpi_finalize(comm *c) {
    mpi_impl *m = c->impl;
    if (!m) return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
        MPI_Op_free(&m->bf16_sum);
        MPI_Type_free(&m->bf16_type);
        if (m->we_initialized) MPI_Finalize();
    }
    free(m);
    c->impl = NULL;
}

static const comm_ops mpi_ops = {.name = "mpi", .memory = "host", .all_reduce_sum = mpi_all_reduce,
                                 .reduce_scatter_sum = mpi_reduce_scatter, .all_gather = mpi_all_gather,
                                 .all_gather_start = mpi_all_gather_start, .wait = mpi_request_wait,
                                 .all_reduce_start = mpi_all_reduce_start,
                                 .reduce_scatter_start = mpi_reduce_scatter_start,
                                 .broadcast = mpi_broadcast, .barrier = mpi_barrier, .abort = mpi_abort,
                                 .finalize = mpi_finalize};

int comm_mpi_init(comm **out, qerr *e) {
    *out = NULL;
    comm *c = qcalloc(1, sizeof *c, e);
    mpi_impl *m = qcalloc(1, sizeof *m, e);
    if (!c || !m) {
        free(c);
        free(m);
        return -1;
    }
    int inited = 0, provided = 0, rc;
    MPI_Initialized(&inited);
    if (!inited) {
        /* FUNNELED: only the main thread calls MPI; OpenMP threads compute between the calls */
        if ((rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided)) != MPI_SUCCESS) {
            free(c);
            free(m);
            return qerr_set(e, "MPI_Init_thread failed (error %d)", rc);
        }
        m->we_initialized = 1;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    *c = (comm){.ops = &mpi_ops, .timeout_sec = COMM_DEFAULT_TIMEOUT_SEC, .err_fd = 2, .impl = m};
    MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->world_size);
    MPI_Comm shm;
    if ((rc = MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &shm)) !=
        MPI_SUCCESS) {
        mpi_fail(c, rc, "MPI_Comm_split_type (local rank)", e);
        comm_free(c);
        return -1;
    }
    MPI_Comm_rank(shm, &c->local_rank);
    MPI_Comm_size(shm, &c->local_world_size);
    MPI_Comm_free(&shm);
    MPI_Type_contiguous(2, MPI_BYTE, &m->bf16_type);
    MPI_Type_commit(&m->bf16_type);
    MPI_Op_create(bf16_sum_fn, 1, &m->bf16_sum);
    *out = c;
    return 0;
}

#else /* built without MPI */

int comm_have_mpi(void) { return 0; }

int comm_mpi_init(comm **out, qerr *e) {
    *out = NULL;
    return qerr_set(e, "this qlora-train was built without MPI (install libopenmpi-dev and rebuild: make)");
}

#endif
