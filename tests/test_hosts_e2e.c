/* tests/test_hosts_e2e.c — two "hosts" over TCP: two network namespaces joined
 * by a veth pair stand in for two machines, and Open MPI's mpirun starts one
 * rank in each, as it would with `--host a,b` over ssh.
 *
 * The setup: namespaces qlora-h<pid>a (10.213.0.1/24) and qlora-h<pid>b
 * (10.213.0.2/24), one end of a veth pair in each; every process of a "host"
 * also gets its own UTS namespace and hostname, so Open MPI sees two nodes.
 * mpirun runs in host a; its plm_rsh_agent is a wrapper script that, instead
 * of ssh, enters the namespace of the host it is given and runs the command
 * there (orted, which connects back over the veth). MPI's own traffic goes over
 * the TCP BTL on the veth subnet (pml ob1, btl tcp,self: no shared memory, and
 * the two ranks could not share it anyway).
 *
 * What must hold: world 2 across the two hosts × accumulation 1 is
 * bit-identical to one process × accumulation 2 (tiny random model, 6 steps,
 * LoRA dropout, evaluation every 3 steps): every metrics line and the adapter's
 * bytes. Needs root and a kernel that lets it make network namespaces (CI runs
 * as root); elsewhere "SKIPPED: <why>".
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/e2e_run.h"
#include "tests/mpi_launch.h"
#include "tests/subproc.h"
#include "tests/tiny_model.h"
#include "tests/tmpdir.h"

#define STEPS 6

static char g_dir[64], g_cfg[128], g_ip[64], g_ns[2][32], g_agent[128];
static int g_have_ns;

static const char *find_ip(void) {
    static const char *const c[] = {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"};
    for (size_t i = 0; i < sizeof c / sizeof *c; i++)
        if (access(c[i], X_OK) == 0) return c[i];
    return NULL;
}

/* Run a command (NULL-terminated), quietly: 0 on success, else its stderr into why. */
static int run_quiet(char *const *argv, char *why, size_t n) {
    char *err = NULL;
    int rc = subproc_run(argv, NULL, 30, &err);
    if (rc && why) snprintf(why, n, "%s: exit %d: %s", argv[0], rc, err ? err : "");
    if (why) {
        char *nl = strchr(why, '\n');
        if (nl) *nl = 0;
    }
    free(err);
    return rc;
}

static void ns_remove(void) {
    for (int i = 0; i < 2; i++) {
        char *argv[] = {g_ip, "netns", "del", g_ns[i], NULL};
        if (g_ns[i][0]) run_quiet(argv, NULL, 0);
    }
    g_have_ns = 0;
}

/* The two namespaces and their veth; 0, or -1 with why. */
static int ns_make(char *why, size_t n) {
    const char *ip = find_ip();
    if (!ip) return snprintf(why, n, "the ip command (iproute2) is not installed"), -1;
    snprintf(g_ip, sizeof g_ip, "%s", ip);
    if (geteuid() != 0) return snprintf(why, n, "network namespaces need root (CI runs as root)"), -1;
    if (access("/usr/bin/unshare", X_OK) && access("/bin/unshare", X_OK))
        return snprintf(why, n, "unshare (util-linux) is not installed"), -1;
    const int id = (int)(getpid() % 100000);
    char va[16], vb[16];
    snprintf(g_ns[0], sizeof g_ns[0], "qlora-h%da", id);
    snprintf(g_ns[1], sizeof g_ns[1], "qlora-h%db", id);
    snprintf(va, sizeof va, "qh%da", id);
    snprintf(vb, sizeof vb, "qh%db", id);
    char *cmds[][12] = {
        {g_ip, "netns", "add", g_ns[0], NULL},
        {g_ip, "netns", "add", g_ns[1], NULL},
        {g_ip, "link", "add", va, "type", "veth", "peer", "name", vb, NULL},
        {g_ip, "link", "set", va, "netns", g_ns[0], NULL},
        {g_ip, "link", "set", vb, "netns", g_ns[1], NULL},
        {g_ip, "-n", g_ns[0], "addr", "add", "10.213.0.1/24", "dev", va, NULL},
        {g_ip, "-n", g_ns[1], "addr", "add", "10.213.0.2/24", "dev", vb, NULL},
        {g_ip, "-n", g_ns[0], "link", "set", va, "up", NULL},
        {g_ip, "-n", g_ns[1], "link", "set", vb, "up", NULL},
        {g_ip, "-n", g_ns[0], "link", "set", "lo", "up", NULL},
        {g_ip, "-n", g_ns[1], "link", "set", "lo", "up", NULL},
        {g_ip, "netns", "exec", g_ns[1], "unshare", "--uts", "true", NULL}, /* a hostname of its own */
    };
    g_have_ns = 1;
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++)
        if (run_quiet(cmds[i], why, n)) {
            char tmp[700];
            snprintf(tmp, sizeof tmp, "network namespaces not permitted here (%.600s)", why);
            snprintf(why, n, "%.*s", (int)(n > 0 ? n - 1 : 0), tmp);
            ns_remove();
            return -1;
        }
    /* the rsh agent: "<agent> <host> <command>" runs the command in that host's namespace, with its hostname */
    snprintf(g_agent, sizeof g_agent, "%s/nsrsh", g_dir);
    FILE *f = fopen(g_agent, "w");
    if (!f) return snprintf(why, n, "cannot write %s", g_agent), -1;
    fprintf(f,
            "#!/bin/sh\n# plm_rsh_agent for tests/test_hosts_e2e.c: enter the host's network namespace instead of ssh\n"
            "host=$1; shift\ncase \"$host\" in\n  10.213.0.1) ns=%s ;;\n  10.213.0.2) ns=%s ;;\n"
            "  *) echo \"nsrsh: unknown host $host\" >&2; exit 255 ;;\nesac\n"
            "echo \"$host $ns\" >> \"$(dirname \"$0\")/nsrsh.log\"\n"
            "exec %s netns exec \"$ns\" unshare --uts sh -c \"hostname $ns && $*\"\n",
            g_ns[0], g_ns[1], g_ip);
    fclose(f);
    chmod(g_agent, 0755);
    return 0;
}

static int setup(void **st) {
    if (tmpdir_setup(st, "qlora-hosts-")) return -1;
    snprintf(g_dir, sizeof g_dir, "%s", ((const tmpdir *)*st)->dir);
    char tail[512];
    snprintf(tail, sizeof tail,
             "val_set_size: 4\nsequence_len: 32\nsample_packing: true\nmicro_batch_size: 1\n"
             "gradient_accumulation_steps: 2\nmax_steps: %d\nlearning_rate: 1e-2\nwarmup_steps: 1\n"
             "lr_scheduler: cosine\neval_steps: 3\nsave_steps: %d\nseed: 7\nnum_threads: 1\n",
             STEPS, STEPS);
    return tiny_world_write(g_dir, 11, 40, 8, 5, 5, tail, g_cfg, sizeof g_cfg);
}

static int teardown(void **st) {
    if (g_have_ns) ns_remove();
    return tmpdir_teardown(st);
}

static const char *const KEEP[] = {"step", "loss", "lr", "grad_norm", "epoch", "eval_loss", "eval_tokens", NULL};

static void test_two_hosts(void **st) {
    char why[600];
    if (!mpi_launch_available(why, sizeof why) || ns_make(why, sizeof why)) {
        printf("SKIPPED: %s\n", why);
        skip();
    }
    static const char *const THREADS1[] = {"OMP_NUM_THREADS=1", NULL};
    char a[256], b[256], od[300], trainer[4096];
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(b, sizeof b, "%s/w2-hosts", g_dir);
    char *err = NULL;
    int rc = e2e_run_trainer(g_cfg, a, NULL, THREADS1, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_non_null(realpath(subproc_trainer(), trainer));
    snprintf(od, sizeof od, "output_dir=%s", b);
    char *argv[] = {g_ip, "netns", "exec", g_ns[0], "unshare", "--uts", "sh", "-c", "hostname \"$0\" && exec \"$@\"",
                    g_ns[0], "mpirun", "--allow-run-as-root", "-np", "2", "--host", "10.213.0.1,10.213.0.2",
                    "--bind-to", "none", "--mca", "plm_rsh_agent", g_agent, "--mca", "pml", "ob1", "--mca", "btl",
                    "tcp,self", "--mca", "btl_tcp_if_include", "10.213.0.0/24", "--mca", "oob_tcp_if_include",
                    "10.213.0.0/24", "-x", "OMP_NUM_THREADS=1", trainer, g_cfg, od, "gradient_accumulation_steps=1",
                    NULL};
    rc = subproc_run(argv, THREADS1, 300, &err);
    if (rc || getenv("QLORA_TEST_VERBOSE")) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(err, "[ranks] 2 ranks (mpi,"));
    free(err);
    /* mpirun (in host a) started host b's daemon through the agent, in host b's namespace */
    char logp[256], line[128] = "";
    snprintf(logp, sizeof logp, "%s/nsrsh.log", g_dir);
    FILE *lf = fopen(logp, "r");
    assert_non_null(lf);
    assert_non_null(fgets(line, sizeof line, lf));
    fclose(lf);
    char want[64];
    snprintf(want, sizeof want, "10.213.0.2 %s", g_ns[1]);
    assert_non_null(strstr(line, want));
    char *ma = e2e_metrics_canonical(a, KEEP, NULL), *mb = e2e_metrics_canonical(b, KEEP, NULL);
    if (strcmp(ma, mb)) fprintf(stderr, "metrics differ:\n--- %s\n%s--- %s\n%s", a, ma, b, mb);
    assert_string_equal(ma, mb);
    assert_non_null(strstr(ma, "eval_loss"));
    free(ma);
    free(mb);
    char pa[512], pb[512];
    snprintf(pa, sizeof pa, "%s/adapter_model.safetensors", a);
    snprintf(pb, sizeof pb, "%s/adapter_model.safetensors", b);
    e2e_assert_same_file(pa, pb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_hosts),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
