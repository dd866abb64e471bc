/* comm/comm_tcp.c — torchrun's environment and the TCP rendezvous that hands
 * NCCL's unique id from rank 0 to the other ranks (see comm.h).
 *
 * Protocol (version 1, all integers little-endian u32):
 *   rank r > 0 → rank 0:  "QLRZ", version, r, world_size, id length
 *   rank 0 → rank r:      status (0 ok, 1 refused), then either the id bytes
 *                         (ok) or a length and that many bytes of the reason.
 * Rank 0 listens (IPv6 dual-stack, else IPv4; SO_REUSEADDR) and answers only
 * when all world_size − 1 ranks have said hello and agree with it (world size,
 * id length, distinct ranks in range); a disagreement is answered with the
 * reason to the rank that disagrees and fails rank 0 with the same line (the
 * others then read the closed connection and fail too). Other ranks connect
 * again every 100 ms until the deadline (rank 0 may not listen yet). Every
 * wait — connect, accept, each read and write — is bounded by the one
 * deadline (poll), so a rank that never comes ends every rank's wait with a
 * line naming what was missing.
 */
#include "comm/comm.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"

#define RDZV_MAGIC 0x5a524c51u /* "QLRZ" read as a little-endian u32 */
#define RDZV_VERSION 1u
#define RDZV_MAX_ID 4096u

/* ------------------------------------------------------------------------ */
/* torchrun's environment                                                     */

static int env_int(const char *name, long lo, long hi, long *out, qerr *e) {
    const char *s = getenv(name);
    char *end;
    errno = 0;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || !*s || *end || errno || v < lo || v > hi)
        return qerr_set(e, "torchrun environment: %s=\"%s\": expected an integer in [%ld, %ld]", name, s ? s : "",
                        lo, hi);
    *out = v;
    return 0;
}

int comm_torchrun_env(comm_torchrun *out, qerr *e) {
    static const char *const need[] = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"};
    int n = 0;
    for (size_t i = 0; i < sizeof need / sizeof *need; i++) n += getenv(need[i]) != NULL;
    if (n == 0) return 0;
    if (n < 5) {
        for (size_t i = 0; i < sizeof need / sizeof *need; i++)
            if (!getenv(need[i]))
                return qerr_set(e,
                                "torchrun environment: %s is not set (a torchrun launch sets RANK, WORLD_SIZE, "
                                "MASTER_ADDR, MASTER_PORT and LOCAL_RANK; unset the others to run one process)",
                                need[i]);
    }
    memset(out, 0, sizeof *out);
    long world, rank, local, port, lws = 1;
    if (env_int("WORLD_SIZE", 1, 1 << 20, &world, e) || env_int("RANK", 0, world - 1, &rank, e) ||
        env_int("LOCAL_RANK", 0, world - 1, &local, e) || env_int("MASTER_PORT", 1, 65535, &port, e))
        return -1;
    if (getenv("LOCAL_WORLD_SIZE") && env_int("LOCAL_WORLD_SIZE", local + 1, world, &lws, e)) return -1;
    if (!getenv("LOCAL_WORLD_SIZE")) lws = local + 1; /* at least; torchrun always sets it */
    const char *addr = getenv("MASTER_ADDR");
    if (!*addr || strlen(addr) >= sizeof out->master_addr)
        return qerr_set(e, "torchrun environment: MASTER_ADDR=\"%s\": expected a host name or address", addr);
    snprintf(out->master_addr, sizeof out->master_addr, "%s", addr);
    out->rank = (int)rank;
    out->world_size = (int)world;
    out->local_rank = (int)local;
    out->local_world_size = (int)lws;
    out->master_port = (int)port;
    /* torchrun's agent serves its own TCPStore on MASTER_PORT when it tells the workers to use it
     * (TORCHELASTIC_USE_AGENT_STORE=True): then the rendezvous takes the next port */
    const char *agent = getenv("TORCHELASTIC_USE_AGENT_STORE");
    int agent_store = agent && (!strcmp(agent, "True") || !strcmp(agent, "true") || !strcmp(agent, "1"));
    out->rdzv_port = agent_store ? (int)(port < 65535 ? port + 1 : port - 1) : (int)port;
    if (getenv("QLORA_RDZV_PORT")) {
        long p;
        if (env_int("QLORA_RDZV_PORT", 1, 65535, &p, e)) return -1;
        out->rdzv_port = (int)p;
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* bounded socket I/O                                                         */

static int ms_left(double deadline) {
    double s = deadline - clock_now_sec();
    if (s <= 0) return 0;
    return s > 1e6 ? 1000000000 : (int)(s * 1000.0) + 1;
}

/* Wait until fd is readable (POLLIN) or writable (POLLOUT): 1 ready, 0 deadline, -1 error (errno). */
static int wait_fd(int fd, short what, double deadline) {
    for (;;) {
        int ms = ms_left(deadline);
        if (ms == 0) return 0;
        struct pollfd p = {.fd = fd, .events = what};
        int rc = poll(&p, 1, ms);
        if (rc < 0 && errno == EINTR) continue;
        if (rc < 0) return -1;
        if (rc == 0) continue; /* the loop rechecks the deadline */
        return 1;
    }
}

/* Read exactly n bytes: 1 done, 0 deadline, -1 error or the peer closed (errno 0 then). */
static int read_full(int fd, void *buf, size_t n, double deadline) {
    char *p = buf;
    while (n) {
        int w = wait_fd(fd, POLLIN, deadline);
        if (w <= 0) return w;
        ssize_t k = recv(fd, p, n, 0);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k <= 0) {
            if (k == 0) errno = 0;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 1;
}

static int write_full(int fd, const void *buf, size_t n, double deadline) {
    const char *p = buf;
    while (n) {
        int w = wait_fd(fd, POLLOUT, deadline);
        if (w <= 0) return w;
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (k < 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 1;
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static const char *io_why(int rc) {
    if (rc == 0) return "timed out";
    return errno ? strerror(errno) : "connection closed";
}

/* ------------------------------------------------------------------------ */
/* rank 0                                                                     */

static int listen_on(int port, qerr *e) {
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), one = 1, zero = 0;
    if (fd >= 0) {
        struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port), .sin6_addr = in6addr_any};
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, (struct sockaddr *)&a6, sizeof a6) == 0 && listen(fd, 128) == 0) return fd;
        int err = errno;
        close(fd);
        fd = -1;
        if (err != EAFNOSUPPORT && err != EADDRNOTAVAIL) {
            errno = err;
            goto fail;
        }
    }
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) goto fail;
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a4, sizeof a4) == 0 && listen(fd, 128) == 0) return fd;
    close(fd);
fail:
    return qerr_set(e, "rank 0: rendezvous: cannot listen on port %d: %s%s", port, strerror(errno),
                    errno == EADDRINUSE ? " (another program holds it; choose another with QLORA_RDZV_PORT, the "
                                          "same on every rank)"
                                        : "");
}

/* Answer one rank: status 1 and the reason. */
static void refuse(int fd, const char *why, double deadline) {
    unsigned char h[8];
    const size_t n = strlen(why);
    put_u32(h, 1);
    put_u32(h + 4, (uint32_t)n);
    if (write_full(fd, h, 8, deadline) == 1) write_full(fd, why, n, deadline);
}

static int rdzv_root(int port, int world, const void *id, size_t id_len, double deadline, double timeout_sec,
                     qerr *e) {
    int lfd = listen_on(port, e);
    if (lfd < 0) return -1;
    int *fds = malloc((size_t)world * sizeof *fds);
    if (!fds) {
        close(lfd);
        return qerr_set(e, "rank 0: rendezvous: out of memory");
    }
    for (int r = 0; r < world; r++) fds[r] = -1;
    int have = 1, rc = 0;
    while (have < world && !rc) {
        int w = wait_fd(lfd, POLLIN, deadline);
        if (w == 0) {
            char missing[256] = "";
            size_t len = 0;
            for (int r = 1; r < world && len + 16 < sizeof missing; r++)
                if (fds[r] < 0) len += (size_t)snprintf(missing + len, sizeof missing - len, "%s%d", len ? ", " : "", r);
            rc = qerr_set(e,
                          "rank 0: rendezvous on port %d: %d of the %d other ranks arrived within %g s (missing "
                          "rank%s %s): a rank did not start or died, or it has another MASTER_ADDR/MASTER_PORT",
                          port, have - 1, world - 1, timeout_sec, world - have > 1 ? "s" : "",
                          missing);
            break;
        }
        if (w < 0) {
            rc = qerr_set(e, "rank 0: rendezvous: poll: %s", strerror(errno));
            break;
        }
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) continue;
            rc = qerr_set(e, "rank 0: rendezvous: accept: %s", strerror(errno));
            break;
        }
        unsigned char h[20];
        /* a rank says hello at once; a stray connection that says nothing holds the wait 5 s at most */
        const double hello_by = clock_now_sec() + 5.0;
        int rr = read_full(fd, h, sizeof h, hello_by < deadline ? hello_by : deadline);
        if (rr != 1) { /* a stray connection (a port scanner, a rank that died): not a rank; wait on */
            close(fd);
            continue;
        }
        const uint32_t magic = get_u32(h), ver = get_u32(h + 4), rank = get_u32(h + 8), w_peer = get_u32(h + 12),
                       n_peer = get_u32(h + 16);
        char why[256] = "";
        if (magic != RDZV_MAGIC || ver != RDZV_VERSION) {
            close(fd); /* not one of ours */
            continue;
        }
        if (w_peer != (uint32_t)world)
            snprintf(why, sizeof why, "rank %u has WORLD_SIZE=%u but rank 0 has WORLD_SIZE=%d: every rank of a job "
                                      "must see the same WORLD_SIZE", rank, w_peer, world);
        else if (rank < 1 || rank >= (uint32_t)world)
            snprintf(why, sizeof why, "a rank says RANK=%u, outside [1, %d)", rank, world);
        else if (fds[rank] >= 0)
            snprintf(why, sizeof why, "two ranks say RANK=%u: every rank of a job needs its own RANK", rank);
        else if (n_peer != (uint32_t)id_len)
            snprintf(why, sizeof why, "rank %u expects a %u-byte id, rank 0 sends %zu (another qlora build?)", rank,
                     n_peer, id_len);
        if (*why) {
            refuse(fd, why, deadline);
            close(fd);
            rc = qerr_set(e, "rank 0: rendezvous: %s", why);
            break;
        }
        fds[rank] = fd;
        have++;
    }
    close(lfd);
    if (!rc) {
        unsigned char h[4];
        put_u32(h, 0);
        for (int r = 1; r < world && !rc; r++) {
            int w = write_full(fds[r], h, 4, deadline);
            if (w == 1) w = write_full(fds[r], id, id_len, deadline);
            if (w != 1) rc = qerr_set(e, "rank 0: rendezvous: sending the id to rank %d: %s", r, io_why(w));
        }
    } else {
        for (int r = 1; r < world; r++)
            if (fds[r] >= 0) refuse(fds[r], "rank 0 failed the rendezvous (its own line says why)", deadline);
    }
    for (int r = 1; r < world; r++)
        if (fds[r] >= 0) close(fds[r]);
    free(fds);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* ranks > 0                                                                  */

/* One connection attempt to addr:port within the deadline: the socket, or -1 with errno. */
static int connect_once(const struct addrinfo *ai, double deadline) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) return -1;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) return fd;
    if (errno != EINPROGRESS) goto fail;
    int w = wait_fd(fd, POLLOUT, deadline);
    if (w <= 0) {
        if (w == 0) errno = ETIMEDOUT;
        goto fail;
    }
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) goto fail;
    if (err) {
        errno = err;
        goto fail;
    }
    return fd;
fail:;
    int keep = errno;
    close(fd);
    errno = keep;
    return -1;
}

static int rdzv_peer(const char *addr, int port, int rank, int world, void *id, size_t id_len, double deadline,
                     double timeout_sec, qerr *e) {
    char ports[16];
    snprintf(ports, sizeof ports, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int fd = -1, last_errno = 0, gai = 0;
    char last_gai[128] = "";
    while (fd < 0) {
        res = NULL;
        gai = getaddrinfo(addr, ports, &hints, &res);
        if (gai) snprintf(last_gai, sizeof last_gai, "%s", gai_strerror(gai));
        for (struct addrinfo *ai = gai ? NULL : res; ai && fd < 0; ai = ai->ai_next)
            if ((fd = connect_once(ai, deadline)) < 0 && (errno != ETIMEDOUT || !last_errno)) last_errno = errno;
        if (res) freeaddrinfo(res);
        if (fd >= 0) break;
        if (!ms_left(deadline))
            return qerr_set(e,
                            "rank %d: rendezvous: cannot reach rank 0 at %s:%d within %g s (%s): rank 0 did not "
                            "start or died, or MASTER_ADDR/MASTER_PORT are wrong",
                            rank, addr, port, timeout_sec, gai ? last_gai : strerror(last_errno));
        struct timespec ts = {0, 100000000};
        nanosleep(&ts, NULL);
    }
    unsigned char h[20];
    put_u32(h, RDZV_MAGIC);
    put_u32(h + 4, RDZV_VERSION);
    put_u32(h + 8, (uint32_t)rank);
    put_u32(h + 12, (uint32_t)world);
    put_u32(h + 16, (uint32_t)id_len);
    int w = write_full(fd, h, sizeof h, deadline);
    unsigned char st[4];
    if (w == 1) w = read_full(fd, st, 4, deadline);
    if (w != 1) {
        close(fd);
        return qerr_set(e,
                        "rank %d: rendezvous with rank 0 at %s:%d: no id within %g s (%s): a rank did not start or "
                        "died, or rank 0 failed",
                        rank, addr, port, timeout_sec, io_why(w));
    }
    if (get_u32(st) != 0) {
        unsigned char nb[4];
        char why[512] = "(no reason given)";
        if (read_full(fd, nb, 4, deadline) == 1) {
            uint32_t n = get_u32(nb);
            if (n >= sizeof why) n = sizeof why - 1;
            if (read_full(fd, why, n, deadline) == 1) why[n] = 0;
        }
        close(fd);
        return qerr_set(e, "rank %d: rendezvous refused by rank 0 at %s:%d: %s", rank, addr, port, why);
    }
    w = read_full(fd, id, id_len, deadline);
    close(fd);
    if (w != 1)
        return qerr_set(e, "rank %d: rendezvous with rank 0 at %s:%d: reading the id: %s", rank, addr, port,
                        io_why(w));
    return 0;
}

int comm_tcp_rendezvous(const char *master_addr, int port, int rank, int world_size, void *id, size_t id_len,
                        double timeout_sec, qerr *e) {
    if (world_size < 1 || rank < 0 || rank >= world_size)
        return qerr_set(e, "rendezvous: RANK %d outside [0, WORLD_SIZE %d)", rank, world_size);
    if (port < 1 || port > 65535) return qerr_set(e, "rank %d: rendezvous: port %d outside [1, 65535]", rank, port);
    if (!id_len || id_len > RDZV_MAX_ID)
        return qerr_set(e, "rank %d: rendezvous: id of %zu bytes (expected 1 to %u)", rank, id_len, RDZV_MAX_ID);
    if (world_size == 1) return 0;
    const double deadline = clock_now_sec() + timeout_sec;
    if (rank == 0) return rdzv_root(port, world_size, id, id_len, deadline, timeout_sec, e);
    return rdzv_peer(master_addr, port, rank, world_size, id, id_len, deadline, timeout_sec, e);
}
