/* tests/test_comm_tcp.c — the launch by torchrun without MPI (comm/comm_tcp.c,
 * comm/comm.c): its environment, and the TCP rendezvous that carries NCCL's
 * 128-byte unique id from rank 0 to the other ranks. Plain CPU code: every case
 * runs here, ranks being forked processes on the loopback.
 *
 *   exchange     4 ranks (rank 0 started last, so the others retry their
 *                connect) — every rank ends with rank 0's 128 bytes;
 *   timeout      world 3 with rank 2 never started: rank 0 fails naming the
 *                missing rank, rank 1 fails, both within the 1.5 s timeout
 *                (+ slack), neither hangs; a rank alone, rank 0 never up: it
 *                fails naming MASTER_ADDR:port;
 *   disagree     a rank with WORLD_SIZE 3 against rank 0's 2: both fail, the
 *                line names both world sizes; two ranks with RANK 1: refused;
 *   environment  none of torchrun's variables → not torchrun; some missing or
 *                malformed → one line naming the variable; the agent's store
 *                on MASTER_PORT → the rendezvous takes the next port;
 *                QLORA_RDZV_PORT overrides; comm_init builds the "torchrun"
 *                communicator, whose collectives refuse (no CPU transport);
 *   cli          qlora-train under torchrun's environment with device: cpu →
 *                refused with one line (CPU ranks need MPI), exit 1, the
 *                output_dir untouched;
 *   torchrun     when a real torchrun is on PATH: 3 workers of this binary
 *                (QLORA_TCP_TEST=rank) read torchrun's environment and
 *                exchange the id — past torchrun's own TCPStore, which holds
 *                MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True); else
 *                "SKIPPED: torchrun not on PATH".
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "comm/comm.h"
#include "core/clock.h"
#include "tests/cli_fixture.h"
#include "tests/subproc.h"

#define ID_LEN 128

/* A port free on the loopback now (bound to 0, read back, released). */
static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static void make_id(unsigned char *id) {
    for (int i = 0; i < ID_LEN; i++) id[i] = (unsigned char)(i * 37 + 11);
}

/* One forked rank: runs the rendezvous; exit 0 with the right id, 1 with a failure (message into the pipe),
 * 2 with a wrong id. */
typedef struct rank_proc {
    pid_t pid;
    int fd;          /* read end: the rank's error line */
    int code;        /* exit code after rank_join */
    char msg[1024];
} rank_proc;

static void rank_start(rank_proc *p, int port, int rank, int world, double timeout) {
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    fflush(NULL);
    p->pid = fork();
    assert_true(p->pid >= 0);
    if (p->pid == 0) {
        close(pfd[0]);
        unsigned char id[ID_LEN], want[ID_LEN];
        make_id(want);
        if (rank == 0) memcpy(id, want, ID_LEN);
        else memset(id, 0, ID_LEN);
        qerr e = {{0}};
        int rc = comm_tcp_rendezvous("127.0.0.1", port, rank, world, id, ID_LEN, timeout, &e);
        if (rc) {
            ssize_t w = write(pfd[1], e.msg, strlen(e.msg));
            (void)w;
            _exit(1);
        }
        _exit(memcmp(id, want, ID_LEN) ? 2 : 0);
    }
    close(pfd[1]);
    p->fd = pfd[0];
}

static void rank_join(rank_proc *p) {
    size_t n = 0;
    ssize_t k;
    while ((k = read(p->fd, p->msg + n, sizeof p->msg - 1 - n)) > 0) n += (size_t)k;
    p->msg[n] = 0;
    close(p->fd);
    int st = 0;
    assert_int_equal(waitpid(p->pid, &st, 0), p->pid);
    p->code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void test_exchange(void **st) {
    const int W = 4, port = free_port();
    rank_proc p[4];
    for (int r = W - 1; r >= 1; r--) rank_start(&p[r], port, r, W, 20.0);
    usleep(300000); /* the others knock on a closed port first */
    rank_start(&p[0], port, 0, W, 20.0);
    for (int r = 0; r < W; r++) {
        rank_join(&p[r]);
        if (p[r].code) fprintf(stderr, "rank %d: exit %d: %s\n", r, p[r].code, p[r].msg);
        assert_int_equal(p[r].code, 0);
    }
    /* world 1: nothing to exchange, no socket */
    unsigned char id[ID_LEN];
    qerr e;
    assert_int_equal(comm_tcp_rendezvous("127.0.0.1", port, 0, 1, id, ID_LEN, 1.0, &e), 0);
}

static void test_timeout(void **st) {
    const int port = free_port();
    rank_proc p[2];
    const double t0 = clock_now_sec();
    rank_start(&p[0], port, 0, 3, 1.5);
    rank_start(&p[1], port, 1, 3, 1.5);
    rank_join(&p[0]);
    rank_join(&p[1]);
    const double dt = clock_now_sec() - t0;
    fprintf(stderr, "rank 0: %s\nrank 1: %s\n(%.1f s)\n", p[0].msg, p[1].msg, dt);
    assert_int_equal(p[0].code, 1);
    assert_int_equal(p[1].code, 1);
    assert_non_null(strstr(p[0].msg, "rank 0: rendezvous"));
    assert_non_null(strstr(p[0].msg, "1 of the 2 other ranks arrived within 1.5 s (missing rank 2)"));
    assert_non_null(strstr(p[1].msg, "rank 1: rendezvous"));
    assert_true(dt < 6.0);

    /* rank 0 never comes */
    const int port2 = free_port();
    rank_start(&p[1], port2, 1, 2, 1.0);
    rank_join(&p[1]);
    assert_int_equal(p[1].code, 1);
    char want[128];
    snprintf(want, sizeof want, "rank 1: rendezvous: cannot reach rank 0 at 127.0.0.1:%d within 1 s", port2);
    fprintf(stderr, "%s\n", p[1].msg);
    assert_non_null(strstr(p[1].msg, want));
}

static void test_disagree(void **st) {
    int port = free_port();
    rank_proc p[3];
    rank_start(&p[0], port, 0, 2, 10.0);
    rank_start(&p[1], port, 1, 3, 10.0);
    rank_join(&p[0]);
    rank_join(&p[1]);
    fprintf(stderr, "rank 0: %s\nrank 1: %s\n", p[0].msg, p[1].msg);
    assert_int_equal(p[0].code, 1);
    assert_int_equal(p[1].code, 1);
    assert_non_null(strstr(p[0].msg, "rank 1 has WORLD_SIZE=3 but rank 0 has WORLD_SIZE=2"));
    assert_non_null(strstr(p[1].msg, "refused by rank 0"));
    assert_non_null(strstr(p[1].msg, "WORLD_SIZE=3"));

    port = free_port();
    rank_start(&p[1], port, 1, 3, 10.0);
    rank_start(&p[2], port, 1, 3, 10.0);
    usleep(200000);
    rank_start(&p[0], port, 0, 3, 10.0);
    for (int r = 0; r < 3; r++) rank_join(&p[r]);
    fprintf(stderr, "rank 0: %s\n", p[0].msg);
    assert_int_equal(p[0].code, 1);
    assert_non_null(strstr(p[0].msg, "two ranks say RANK=1"));
    assert_true(p[1].code == 1 && p[2].code == 1);

    /* out of range before any socket */
    unsigned char id[ID_LEN];
    qerr e;
    assert_int_equal(comm_tcp_rendezvous("127.0.0.1", port, 3, 3, id, ID_LEN, 1.0, &e), -1);
    assert_non_null(strstr(e.msg, "RANK 3 outside [0, WORLD_SIZE 3)"));
}

static const char *const TR_VARS[] = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
                                      "LOCAL_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "QLORA_RDZV_PORT", NULL};

static void tr_clear(void) {
    for (int i = 0; TR_VARS[i]; i++) unsetenv(TR_VARS[i]);
}

static void tr_set(int rank, int world, int port) {
    char b[32];
    snprintf(b, sizeof b, "%d", rank);
    setenv("RANK", b, 1);
    setenv("LOCAL_RANK", b, 1);
    snprintf(b, sizeof b, "%d", world);
    setenv("WORLD_SIZE", b, 1);
    setenv("LOCAL_WORLD_SIZE", b, 1);
    snprintf(b, sizeof b, "%d", port);
    setenv("MASTER_PORT", b, 1);
    setenv("MASTER_ADDR", "127.0.0.1", 1);
}

static void test_environment(void **st) {
    comm_torchrun t;
    qerr e;
    tr_clear();
    assert_int_equal(comm_torchrun_env(&t, &e), 0);
    tr_set(1, 2, 29500);
    assert_int_equal(comm_torchrun_env(&t, &e), 1);
    assert_int_equal(t.rank, 1);
    assert_int_equal(t.world_size, 2);
    assert_int_equal(t.local_rank, 1);
    assert_int_equal(t.local_world_size, 2);
    assert_string_equal(t.master_addr, "127.0.0.1");
    assert_int_equal(t.rdzv_port, 29500);
    setenv("TORCHELASTIC_USE_AGENT_STORE", "True", 1); /* torchrun's agent serves its TCPStore on MASTER_PORT */
    assert_int_equal(comm_torchrun_env(&t, &e), 1);
    assert_int_equal(t.rdzv_port, 29501);
    setenv("QLORA_RDZV_PORT", "31000", 1);
    assert_int_equal(comm_torchrun_env(&t, &e), 1);
    assert_int_equal(t.rdzv_port, 31000);
    setenv("QLORA_RDZV_PORT", "70000", 1);
    assert_int_equal(comm_torchrun_env(&t, &e), -1);
    assert_non_null(strstr(e.msg, "QLORA_RDZV_PORT=\"70000\""));
    unsetenv("QLORA_RDZV_PORT");
    setenv("RANK", "2", 1);
    assert_int_equal(comm_torchrun_env(&t, &e), -1);
    assert_non_null(strstr(e.msg, "RANK=\"2\": expected an integer in [0, 1]"));
    setenv("RANK", "1", 1);
    unsetenv("MASTER_ADDR");
    assert_int_equal(comm_torchrun_env(&t, &e), -1);
    assert_non_null(strstr(e.msg, "MASTER_ADDR is not set"));
    setenv("MASTER_ADDR", "127.0.0.1", 1);
    setenv("MASTER_PORT", "http", 1);
    assert_int_equal(comm_torchrun_env(&t, &e), -1);
    assert_non_null(strstr(e.msg, "MASTER_PORT=\"http\""));

    /* comm_init: the torchrun communicator; no data moves over it */
    tr_set(1, 2, 29500);
    comm *c = NULL;
    assert_int_equal(comm_init(&c, &e), 0);
    assert_string_equal(c->ops->name, "torchrun");
    assert_int_equal(c->rank, 1);
    assert_int_equal(c->world_size, 2);
    assert_int_equal(c->local_rank, 1);
    float x = 1.0f;
    assert_int_equal(comm_all_reduce_sum(c, &x, 1, COMM_F32, &e), -1);
    assert_non_null(strstr(e.msg, "rank 1: all_reduce: a torchrun launch carries data only over NCCL"));
    comm_free(c);
    /* WORLD_SIZE 1: one process, nothing to join */
    tr_set(0, 1, 29500);
    assert_int_equal(comm_init(&c, &e), 0);
    assert_string_equal(c->ops->name, "single");
    comm_free(c);
    tr_clear();
}

static void test_cli_torchrun_cpu(void **st) {
    cli_fixture fx;
    if (cli_fixture_init(&fx, "/tmp/qlora-tcp-XXXXXX", "{\"text\": \"hello world\"}\n")) {
        printf("SKIPPED: the default model is missing (make model)\n");
        skip();
    }
    tr_set(0, 2, free_port());
    char *argv[] = {(char *)subproc_trainer(), fx.cfg, "device=cpu", NULL};
    const char *const want[] = {"device: cpu: 2 ranks started by torchrun train on CUDA only (NCCL)",
                                "mpirun -np 2", NULL};
    cli_expect_failure(argv, 60, 1, "qlora-train", want, fx.out);
    tr_clear();
    cli_fixture_free(&fx);
}

/* A worker under a real torchrun: its environment, then the rendezvous. */
static int torchrun_worker(void) {
    comm_torchrun t;
    qerr e = {{0}};
    int rc = comm_torchrun_env(&t, &e);
    if (rc != 1) {
        fprintf(stderr, "worker: comm_torchrun_env: %d %s\n", rc, e.msg);
        return 1;
    }
    unsigned char id[ID_LEN], want[ID_LEN];
    make_id(want);
    if (t.rank == 0) memcpy(id, want, ID_LEN);
    else memset(id, 0, ID_LEN);
    if (comm_tcp_rendezvous(t.master_addr, t.rdzv_port, t.rank, t.world_size, id, ID_LEN, 60.0, &e)) {
        fprintf(stderr, "worker: %s\n", e.msg);
        return 1;
    }
    if (memcmp(id, want, ID_LEN)) {
        fprintf(stderr, "worker %d: wrong id\n", t.rank);
        return 1;
    }
    fprintf(stderr, "worker %d of %d: id received (rendezvous port %d, MASTER_PORT %d)\n", t.rank, t.world_size,
            t.rdzv_port, t.master_port);
    return 0;
}

static const char *g_self;

static void test_real_torchrun(void **st) {
    char path[4096] = "";
    const char *p = getenv("PATH");
    for (const char *q = p ? p : ""; *q;) {
        const char *end = strchr(q, ':');
        size_t len = end ? (size_t)(end - q) : strlen(q);
        snprintf(path, sizeof path, "%.*s/torchrun", (int)len, q);
        if (len && access(path, X_OK) == 0) break;
        path[0] = 0;
        q += len + (end ? 1 : 0);
    }
    if (!path[0]) {
        printf("SKIPPED: torchrun not on PATH (pip install torch)\n");
        skip();
    }
    char port[32], self[4096];
    snprintf(port, sizeof port, "--master_port=%d", free_port());
    assert_non_null(realpath(g_self, self));
    char *argv[] = {path, "--nproc_per_node=3", "--master_addr=127.0.0.1", port, "--no_python", self, NULL};
    const char *const env[] = {"QLORA_TCP_TEST=rank", NULL};
    char *err = NULL;
    int rc = subproc_run(argv, env, 120, &err);
    if (rc || !strstr(err, "worker 2 of 3: id received")) fprintf(stderr, "exit %d:\n%s", rc, err);
    assert_int_equal(rc, 0);
    for (int r = 0; r < 3; r++) {
        char w[64];
        snprintf(w, sizeof w, "worker %d of 3: id received", r);
        assert_non_null(strstr(err, w));
    }
    free(err);
}

int main(int argc, char **argv) {
    if (getenv("QLORA_TCP_TEST")) return torchrun_worker();
    g_self = argv[0];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exchange),   cmocka_unit_test(test_timeout),          cmocka_unit_test(test_disagree),
        cmocka_unit_test(test_environment), cmocka_unit_test(test_cli_torchrun_cpu), cmocka_unit_test(test_real_torchrun),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
