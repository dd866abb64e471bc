/* tests/test_comm_nccl.c — the NCCL communicator (comm/comm_nccl.c) on GPUs,
 * against sums computed here on the host. Runs in `make test-gpu`
 * (scripts/test_gpu.sh); in `make test` on a machine without a GPU every case
 * prints "SKIPPED: <why>" and counts as skipped.
 *
 *   one_gpu        this process alone (a single communicator turned into
 *                  NCCL: world 1): every collective on device buffers and on
 *                  host buffers (staged), each dtype, in place and out of
 *                  place, the async gather, barrier — needs 1 GPU;
 *   mpirun         2 ranks on 2 GPUs under mpirun (the id over MPI): the same
 *                  checks with world 2, f32 sums bitwise a + b — needs 2 GPUs;
 *   torchrun       2 ranks started here with torchrun's environment (RANK,
 *                  WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK): the id
 *                  over the TCP rendezvous, the same checks — needs 2 GPUs;
 *   hang           2 ranks, rank 1 sleeps: rank 0's all_reduce fails within
 *                  its 3 s timeout naming itself, the collective and the
 *                  timeout (ncclCommAbort), and the job ends non-zero well
 *                  before the sleep would — needs 2 GPUs and mpirun.
 * The rank side is this binary re-run with QLORA_NCCL_TEST=<mode>.
 */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "autograd/backend.h"
#include "comm/comm.h"
#include "core/bf16.h"
#include "core/clock.h"
#include "tests/mpi_launch.h"
#include "tests/subproc.h"

/* ---- the rank side ------------------------------------------------------------- */

static int g_fail;
#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "rank check failed (%s:%d): ", __FILE__, __LINE__);            \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, "\n");                                                         \
            g_fail = 1;                                                                    \
        }                                                                                  \
    } while (0)

static const ag_backend *g_be;

static void *dev_copy(const void *host, size_t bytes) {
    void *d = g_be->alloc(bytes);
    g_be->copy_h2d(d, host, bytes);
    g_be->sync();
    return d;
}

static void host_copy(void *host, const void *d, size_t bytes) {
    g_be->sync();
    g_be->copy_d2h(host, d, bytes);
}

static float val_f32(int r, size_t i) { return (float)(r + 1) * 0.1f + (float)i * 1.37e-3f; }

/* Every collective, on device memory (dev = 1) or host memory (dev = 0), against the host's sums. */
static void check_collectives(comm *c, int dev) {
    qerr e;
    const int W = c->world_size, R = c->rank;
    const char *where = dev ? "device" : "host";
    /* all_reduce f32 (n odd and large enough for several NCCL chunks): with two ranks exactly a + b */
    const size_t n = 1000003;
    float *f = malloc(n * sizeof *f);
    for (size_t i = 0; i < n; i++) f[i] = val_f32(R, i);
    void *d = dev ? dev_copy(f, n * 4) : f;
    CHECK(!comm_all_reduce_sum(c, d, n, COMM_F32, &e), "%s", e.msg);
    if (dev) host_copy(f, d, n * 4);
    for (size_t i = 0; i < n; i++) {
        float want = val_f32(0, i);
        for (int r = 1; r < W; r++) want += val_f32(r, i);
        if (memcmp(&f[i], &want, 4)) {
            CHECK(0, "%s f32 all_reduce [%zu] %a != %a", where, i, f[i], want);
            break;
        }
    }
    if (dev) g_be->free(d);
    /* f64, i64, u8 (wraps), bf16 */
    double dd[3] = {R + 0.5, -R, 1e300};
    d = dev ? dev_copy(dd, sizeof dd) : dd;
    CHECK(!comm_all_reduce_sum(c, d, 3, COMM_F64, &e), "%s", e.msg);
    if (dev) host_copy(dd, d, sizeof dd), g_be->free(d);
    CHECK(dd[0] == W * (W - 1) / 2.0 + 0.5 * W && dd[1] == -(W * (W - 1) / 2.0) && dd[2] == 1e300 * W,
          "%s f64 sums", where);
    int64_t q[2] = {(int64_t)1 << 40, R};
    d = dev ? dev_copy(q, sizeof q) : q;
    CHECK(!comm_all_reduce_sum(c, d, 2, COMM_I64, &e), "%s", e.msg);
    if (dev) host_copy(q, d, sizeof q), g_be->free(d);
    CHECK(q[0] == ((int64_t)W << 40) && q[1] == W * (W - 1) / 2, "%s i64 sums", where);
    uint8_t u[2] = {200, (uint8_t)R};
    d = dev ? dev_copy(u, sizeof u) : u;
    CHECK(!comm_all_reduce_sum(c, d, 2, COMM_U8, &e), "%s", e.msg);
    if (dev) host_copy(u, d, sizeof u), g_be->free(d);
    CHECK(u[0] == (uint8_t)(200 * W) && u[1] == (uint8_t)(W * (W - 1) / 2), "%s u8 sums (wrap)", where);
    bf16 h[2] = {f32_to_bf16(1.0f), f32_to_bf16(0.00390625f * (float)(R + 1))};
    d = dev ? dev_copy(h, sizeof h) : h;
    CHECK(!comm_all_reduce_sum(c, d, 2, COMM_BF16, &e), "%s", e.msg);
    if (dev) host_copy(h, d, sizeof h), g_be->free(d);
    CHECK(bf16_to_f32(h[0]) == (float)W && bf16_to_f32(h[1]) == 0.00390625f * (float)(W * (W + 1) / 2),
          "%s bf16 sums %g %g", where, bf16_to_f32(h[0]), bf16_to_f32(h[1]));
    /* reduce_scatter f32: out of place, then in place (recv = send + rank·recvcount, NCCL's convention) */
    const size_t rc = 4099;
    float *s = malloc(rc * W * sizeof *s), *rv = malloc(rc * sizeof *rv), *rv2 = malloc(rc * sizeof *rv2);
    for (size_t i = 0; i < rc * W; i++) s[i] = val_f32(R, i);
    void *ds = dev ? dev_copy(s, rc * W * 4) : s, *dr = dev ? g_be->alloc(rc * 4) : rv;
    CHECK(!comm_reduce_scatter_sum(c, ds, dr, rc, COMM_F32, &e), "%s", e.msg);
    if (dev) host_copy(rv, dr, rc * 4);
    for (size_t i = 0; i < rc; i++) {
        float want = val_f32(0, R * rc + i);
        for (int r = 1; r < W; r++) want += val_f32(r, R * rc + i);
        if (memcmp(&rv[i], &want, 4)) {
            CHECK(0, "%s reduce_scatter [%zu] %a != %a", where, i, rv[i], want);
            break;
        }
    }
    float *in_place = dev ? (float *)ds + (size_t)R * rc : s + (size_t)R * rc;
    CHECK(!comm_reduce_scatter_sum(c, ds, in_place, rc, COMM_F32, &e), "%s", e.msg);
    if (dev) host_copy(rv2, in_place, rc * 4);
    else memcpy(rv2, in_place, rc * 4);
    CHECK(!memcmp(rv, rv2, rc * 4), "%s in-place reduce_scatter differs from out of place", where);
    if (dev) g_be->free(ds), g_be->free(dr);
    /* all_gather bf16 out of place, f32 in place (send = recv + rank·sendcount) */
    bf16 mine[5], *all = malloc(5 * (size_t)W * sizeof *all);
    for (int i = 0; i < 5; i++) mine[i] = f32_to_bf16((float)(10 * R + i));
    void *dm = dev ? dev_copy(mine, sizeof mine) : mine, *da = dev ? g_be->alloc(5 * (size_t)W * 2) : all;
    CHECK(!comm_all_gather(c, dm, da, 5, COMM_BF16, &e), "%s", e.msg);
    if (dev) host_copy(all, da, 5 * (size_t)W * 2), g_be->free(dm), g_be->free(da);
    for (int r = 0; r < W; r++)
        for (int i = 0; i < 5; i++)
            CHECK(bf16_to_f32(all[r * 5 + i]) == (float)(10 * r + i), "%s bf16 all_gather", where);
    float *g = calloc(4 * (size_t)W, sizeof *g);
    for (int i = 0; i < 4; i++) g[R * 4 + i] = (float)(R * 100 + i);
    void *dg = dev ? dev_copy(g, 16 * (size_t)W) : g;
    CHECK(!comm_all_gather(c, (float *)dg + (size_t)R * 4, dg, 4, COMM_F32, &e), "%s", e.msg);
    if (dev) host_copy(g, dg, 16 * (size_t)W);
    for (int r = 0; r < W; r++)
        for (int i = 0; i < 4; i++) CHECK(g[r * 4 + i] == (float)(r * 100 + i), "%s in-place all_gather", where);
    /* the async pair: started, other work, waited */
    memset(g, 0, 16 * (size_t)W);
    for (int i = 0; i < 4; i++) g[R * 4 + i] = (float)(R * 1000 + i);
    if (dev) g_be->copy_h2d(dg, g, 16 * (size_t)W), g_be->sync();
    comm_request *req = NULL;
    CHECK(!comm_all_gather_start(c, (float *)dg + (size_t)R * 4, dg, 4, COMM_F32, &req, &e), "%s", e.msg);
    void *other = dev ? g_be->alloc(1 << 20) : NULL; /* the caller's own work meanwhile */
    if (other) g_be->zero(other, 1 << 20), g_be->free(other);
    CHECK(req && !comm_wait(c, req, &e), "%s", e.msg);
    if (dev) host_copy(g, dg, 16 * (size_t)W), g_be->free(dg);
    for (int r = 0; r < W; r++)
        for (int i = 0; i < 4; i++) CHECK(g[r * 4 + i] == (float)(r * 1000 + i), "%s all_gather_start/wait", where);
    /* broadcast from the last rank; barrier */
    char msg[32], want_msg[32];
    snprintf(msg, sizeof msg, "from rank %d", R);
    snprintf(want_msg, sizeof want_msg, "from rank %d", W - 1);
    void *db = dev ? dev_copy(msg, sizeof msg) : msg;
    CHECK(!comm_broadcast(c, db, sizeof msg, COMM_U8, W - 1, &e), "%s", e.msg);
    if (dev) host_copy(msg, db, sizeof msg), g_be->free(db);
    CHECK(!strcmp(msg, want_msg), "%s broadcast: got \"%s\"", where, msg);
    CHECK(!comm_barrier(c, &e), "%s", e.msg);
    free(f);
    free(s);
    free(rv);
    free(rv2);
    free(all);
    free(g);
}

/* c (single, mpi or torchrun) onto its GPU and NCCL; the backend of the device. */
static int to_nccl(comm *c) {
    qerr e;
    if (comm_cuda_select_device(c, &e) || !(g_be = ag_backend_find("cuda")) || comm_nccl_upgrade(c, &e)) {
        fprintf(stderr, "rank %d: %s\n", c->rank, g_be ? e.msg : "no CUDA backend/device");
        return -1;
    }
    if (strcmp(c->ops->name, "nccl")) {
        fprintf(stderr, "rank %d: expected the nccl communicator, got %s\n", c->rank, c->ops->name);
        return -1;
    }
    return 0;
}

static int rank_main(const char *mode) {
    comm *c;
    qerr e;
    if (comm_init(&c, &e)) {
        fprintf(stderr, "comm_init: %s\n", e.msg);
        return 1;
    }
    if (to_nccl(c)) comm_abort(c, 1);
    int rc = 0;
    if (!strcmp(mode, "collectives")) {
        check_collectives(c, 1);
        check_collectives(c, 0);
        int64_t bad = g_fail; /* every rank's verdict (host-staged) */
        rc = comm_all_reduce_sum(c, &bad, 1, COMM_I64, &e) || bad;
        if (c->rank == 0) printf("nccl collectives world %d: %s\n", c->world_size, rc ? "FAILED" : "ok");
    } else if (!strcmp(mode, "hang")) {
        c->timeout_sec = 3.0;
        if (c->rank == 1) sleep(90);
        float x = 1.0f;
        if (comm_all_reduce_sum(c, &x, 1, COMM_F32, &e)) {
            fprintf(stderr, "qlora-test: %s\n", e.msg);
            comm_abort(c, 3);
        }
        rc = 1; /* must not complete */
    }
    comm_free(c);
    return rc;
}

/* ---- the test side --------------------------------------------------------------- */

static const char *g_self;

static int skip_below(int gpus) {
    if (!comm_have_nccl()) {
        printf("SKIPPED: this build has no NCCL (make CUDA=1 with nccl.h installed)\n");
        return 1;
    }
    const int n = comm_cuda_device_count();
    if (n < gpus) {
        if (n == 0) printf("SKIPPED: no CUDA device\n");
        else printf("SKIPPED: needs %d GPUs (this machine shows %d)\n", gpus, n);
        return 1;
    }
    return 0;
}

static void test_one_gpu(void **st) {
    if (skip_below(1)) skip();
    comm *c;
    qerr e;
    assert_int_equal(comm_single(&c, &e), 0);
    assert_int_equal(to_nccl(c), 0);
    check_collectives(c, 1);
    check_collectives(c, 0);
    assert_int_equal(g_fail, 0);
    comm_free(c);
}

static const char *asan_env(void) {
    static char asan[512];
    const char *ao = getenv("ASAN_OPTIONS");
    snprintf(asan, sizeof asan, "ASAN_OPTIONS=%s%sdetect_leaks=0", ao ? ao : "", ao && *ao ? ":" : "");
    return asan;
}

static void test_mpirun(void **st) {
    char why[256];
    if (skip_below(2)) skip();
    if (!mpi_launch_available(why, sizeof why)) {
        printf("SKIPPED: %s\n", why);
        skip();
    }
    char *prog[] = {(char *)g_self, NULL}, *err = NULL;
    const char *env[] = {"QLORA_NCCL_TEST=collectives", "OMP_NUM_THREADS=1", asan_env(), NULL};
    int rc = mpi_launch_run(2, prog, env, 300, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
}

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) return 29517;
    close(fd);
    return ntohs(a.sin_port);
}

static void test_torchrun(void **st) {
    if (skip_below(2)) skip();
    char port[32];
    snprintf(port, sizeof port, "MASTER_PORT=%d", free_port());
    subproc p[2];
    for (int r = 0; r < 2; r++) {
        char rank[32], local[32];
        snprintf(rank, sizeof rank, "RANK=%d", r);
        snprintf(local, sizeof local, "LOCAL_RANK=%d", r);
        const char *env[] = {"QLORA_NCCL_TEST=collectives", "WORLD_SIZE=2", "LOCAL_WORLD_SIZE=2",
                             "MASTER_ADDR=127.0.0.1", port, rank, local, asan_env(), NULL};
        char *argv[] = {(char *)g_self, NULL};
        assert_int_equal(subproc_start(&p[r], argv, env), 0);
    }
    for (int r = 0; r < 2; r++) {
        subproc_wait(&p[r], 300);
        if (subproc_exit_code(&p[r])) fprintf(stderr, "rank %d: exit %d\n%s", r, subproc_exit_code(&p[r]), p[r].err);
        assert_int_equal(subproc_exit_code(&p[r]), 0);
        subproc_free(&p[r]);
    }
}

static void test_hang(void **st) {
    char why[256];
    if (skip_below(2)) skip();
    if (!mpi_launch_available(why, sizeof why)) {
        printf("SKIPPED: %s\n", why);
        skip();
    }
    char *prog[] = {(char *)g_self, NULL}, *err = NULL;
    const char *env[] = {"QLORA_NCCL_TEST=hang", "OMP_NUM_THREADS=1", asan_env(), NULL};
    const double t0 = clock_now_sec();
    int rc = mpi_launch_run(2, prog, env, 80, &err);
    const double secs = clock_now_sec() - t0;
    const char *want = "rank 0 of 2: all_reduce of 1 f32: did not complete within ddp_timeout 3 s";
    if (rc == 0 || !strstr(err, want)) fprintf(stderr, "exit %d after %.1fs:\n%s", rc, secs, err);
    assert_int_not_equal(rc, 0);
    assert_int_not_equal(rc, 137); /* ended by the timeout + abort, not by the test's limit */
    assert_non_null(strstr(err, want));
    assert_true(secs < 60.0);
    free(err);
}

int main(int argc, char **argv) {
    const char *mode = getenv("QLORA_NCCL_TEST");
    if (mode) return rank_main(mode);
    g_self = argv[0];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_gpu),
        cmocka_unit_test(test_mpirun),
        cmocka_unit_test(test_torchrun),
        cmocka_unit_test(test_hang),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
