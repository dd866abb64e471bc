/* trainer/main.c — `qlora-train [--nproc N] config.yaml [key=value ...]`.
 *
 * Several processes (README "Several processes"): under an MPI launcher
 * (`mpirun -np N qlora-train ...`, `srun --mpi=pmix ...`) every process is a
 * rank (comm/comm.h); `--nproc N` starts N local ranks itself: it runs
 * mpirun with comm_mpirun_argv's flags as its child, forwards SIGINT, SIGTERM
 * and SIGHUP to it and exits with the ranks' outcome (launch_nproc). Rank 0
 * logs; the other ranks' stdout
 * and stderr go to /dev/null and they speak (on their saved stderr, prefixed
 * with their rank) only when they fail, which ends the whole job
 * (comm_abort).
 *
 * Exit status: 0 success, 1 the run failed (message on stderr), 2 bad usage
 * or an invalid config, 128 + signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP, 141
 * when stdout or stderr was closed) when training stopped after saving a
 * checkpoint (re-running resumes) — also from the `--nproc` launcher when every
 * rank stopped so (a plain mpirun exits 1 then). Every error
 * is one line naming the file and field.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "autograd/gemm.h"
#include "comm/comm.h"
#include "trainer/config.h"
#include "trainer/run.h"
#include "trainer/train.h"

#define QLORA_VERSION "0.1.0"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora-train [--nproc N] CONFIG.yaml [key=value ...]\n"
            "  Fine-tune a LoRA/QLoRA adapter on a GGUF Llama-family model (axolotl config keys).\n"
            "  key=value overrides a config key, e.g. max_steps=20 lora_r=16 'lora_target_modules=[q_proj,v_proj]'\n"
            "  Checkpoints go to output_dir/checkpoint-<step>/; re-running the same command resumes from the\n"
            "  newest complete one. Ctrl-C (SIGINT), SIGTERM, SIGHUP or a closed output finishes the step, saves a\n"
            "  checkpoint and stops (exit 130, 143, 129, 141).\n"
            "  --nproc N: train on N local processes (data parallel over MPI: runs mpirun -np N ...; a stop\n"
            "  signal to it is passed on and gives the same exit codes); or launch with mpirun -np N\n"
            "  qlora-train ... / srun --mpi=pmix qlora-train ... yourself (Open MPI's mpirun then exits 1\n"
            "  after a stop signal).\n"
            "  --help, --version\n");
}

/* --nproc's launcher and its ranks: the ranks of a `--nproc` job that stopped on a signal after saving
 * (train_result.interrupted: the ranks agreed on the stop, rank 0's checkpoint is complete) each append one
 * line "RANK WORLD SIGNAL STEP" to the file named by this variable, before MPI_Finalize; the launcher created
 * it empty and reads it once mpirun has exited. mpirun's own exit status cannot tell that stop from a failure:
 * Open MPI 4's mpirun exits 1 after passing a signal on (measured: Debian 12's 4.1), as after a failed rank.
 * Open MPI turns a SIGINT into SIGTERM for the ranks, so the ranks report 15 after a Ctrl-C; the launcher
 * exits with the signal it received itself. */
#define NPROC_STOP_ENV "QLORA_NPROC_STOP_FILE"

static volatile sig_atomic_t g_child, g_signal;

/* SIGINT/SIGTERM/SIGHUP to the launcher: remember the first and pass it on to mpirun, which forwards it to the
 * ranks. Not when the kernel sent it (the terminal's Ctrl-C goes to the whole foreground process group, mpirun
 * included): a second copy would make Open MPI's mpirun end the ranks at once. */
static void launcher_on_signal(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    if (!g_signal) g_signal = sig;
    if (g_child > 0 && (!si || si->si_code == SI_USER || si->si_code == SI_QUEUE)) kill((pid_t)g_child, sig);
}

/* The stop file: 1 when all `world` ranks wrote the same signal and step (their stop was clean), with *sig. */
static int read_stop_file(const char *path, int world, int *sig) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    unsigned char seen[4096] = {0};
    int n = 0, ok = 1, first_sig = 0, first_step = -1, r, w, sg, st;
    while (fscanf(f, "%d %d %d %d", &r, &w, &sg, &st) == 4) {
        if (r < 0 || r >= world || w != world || seen[r] || sg <= 0 || sg >= 64 || (n && (sg != first_sig ||
                                                                                         st != first_step)))
            ok = 0;
        else seen[r] = 1, first_sig = sg, first_step = st;
        n++;
    }
    fclose(f);
    if (!ok || n != world) return 0;
    *sig = first_sig;
    return 1;
}

/* `--nproc N ...`: run mpirun with N ranks of this program and the rest of the arguments as a child, forward
 * stop signals to it, and return the exit status: 128 + signal when every rank stopped cleanly after saving
 * (the signal the launcher received, else the one the ranks stopped on), mpirun's status otherwise — 1 in
 * place of any status in 128..191, which would read as a clean stop — and 2 when mpirun cannot be started. */
static int launch_nproc(int argc, char **argv) {
    const char *nv = argv[1][7] == '=' ? argv[1] + 8 : (argc > 2 ? argv[2] : "");
    const int skip = argv[1][7] == '=' ? 1 : 2;
    char *end;
    errno = 0;
    long n = strtol(nv, &end, 10);
    if (!*nv || *end || errno || n < 1 || n > 4096) {
        fprintf(stderr, "qlora-train: --nproc: expected a number of processes in [1, 4096], got \"%s\"\n", nv);
        return 2;
    }
    const char *var = comm_launcher_env();
    if (var) {
        fprintf(stderr, "qlora-train: --nproc %ld: this process was already started by an MPI launcher (%s is "
                        "set); use either the launcher or --nproc\n", n, var);
        return 2;
    }
    if (!comm_have_mpi()) {
        fprintf(stderr, "qlora-train: --nproc %ld: this qlora-train was built without MPI (install libopenmpi-dev "
                        "and openmpi-bin, then rebuild: make)\n", n);
        return 2;
    }
    /* the ranks run this very binary */
    static char self[4096];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) snprintf(self, sizeof self, "%s", argv[0]);
    else self[len] = 0;
    char **prog = calloc((size_t)argc + 1, sizeof *prog);
    if (!prog) return 2;
    int k = 0;
    prog[k++] = self;
    for (int i = 1 + skip; i < argc; i++) prog[k++] = argv[i];
    prog[k] = NULL;
    char **mv;
    qerr e;
    if (comm_mpirun_argv((int)n, prog, &mv, &e)) {
        fprintf(stderr, "qlora-train: %s\n", e.msg);
        free(prog);
        return 2;
    }
    /* N ranks share the cores: unless told otherwise, each gets its share of OpenMP threads */
    if (!getenv("OMP_NUM_THREADS")) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        char t[32];
        snprintf(t, sizeof t, "%ld", ncpu > n ? ncpu / n : 1);
        setenv("OMP_NUM_THREADS", t, 1);
    }
    /* where the ranks report a clean stop (local ranks inherit mpirun's environment) */
    const char *tmp = getenv("TMPDIR");
    char stop_file[4200];
    snprintf(stop_file, sizeof stop_file, "%s/qlora-nproc-stop-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int sfd = mkstemp(stop_file);
    if (sfd < 0) {
        fprintf(stderr, "qlora-train: --nproc %ld: cannot create %s: %s (set TMPDIR to a writable directory)\n", n,
                stop_file, strerror(errno));
        free(mv), free(prog);
        return 2;
    }
    close(sfd);
    setenv(NPROC_STOP_ENV, stop_file, 1);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = launcher_on_signal;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    static const int fwd[] = {SIGINT, SIGTERM, SIGHUP};
    sigset_t block, old_mask;
    sigemptyset(&block);
    struct sigaction old_sa[3];
    for (int i = 0; i < 3; i++) {
        sigaction(fwd[i], NULL, &old_sa[i]);
        /* a signal this process ignores (nohup, `&` in a script) stays ignored, also by mpirun */
        if (old_sa[i].sa_handler != SIG_IGN) sigaction(fwd[i], &sa, NULL), sigaddset(&block, fwd[i]);
    }
    /* held until g_child is set: a signal that arrives while mpirun starts is passed on then */
    sigprocmask(SIG_BLOCK, &block, &old_mask);
    fflush(NULL);
    /* a pipe closed on exec tells the parent whether exec failed (errno in it) */
    int ep[2];
    if (pipe2(ep, O_CLOEXEC)) {
        fprintf(stderr, "qlora-train: --nproc %ld: pipe: %s\n", n, strerror(errno));
        sigprocmask(SIG_SETMASK, &old_mask, NULL);
        unlink(stop_file), free(mv), free(prog);
        return 2;
    }
    pid_t child = fork();
    if (child == 0) {
        close(ep[0]);
        for (int i = 0; i < 3; i++) sigaction(fwd[i], &old_sa[i], NULL);
        sigprocmask(SIG_SETMASK, &old_mask, NULL); /* the mask would survive exec */
        execvp(mv[0], mv);
        int err = errno;
        if (write(ep[1], &err, sizeof err) < 0) _exit(127);
        _exit(127);
    }
    close(ep[1]);
    g_child = child > 0 ? child : 0;
    sigprocmask(SIG_SETMASK, &old_mask, NULL);
    if (child < 0) {
        fprintf(stderr, "qlora-train: --nproc %ld: fork: %s\n", n, strerror(errno));
        close(ep[0]), unlink(stop_file), free(mv), free(prog);
        return 2;
    }
    int exec_err = 0;
    ssize_t got;
    while ((got = read(ep[0], &exec_err, sizeof exec_err)) < 0 && errno == EINTR) {
    }
    close(ep[0]);
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    g_child = 0;
    int rc, stop_sig = 0;
    if (got == (ssize_t)sizeof exec_err) {
        fprintf(stderr, "qlora-train: --nproc %ld: cannot run %s: %s (install openmpi-bin, or start the ranks with "
                        "your MPI's launcher: mpirun -np %ld qlora-train ...)\n", n, mv[0], strerror(exec_err), n);
        rc = 2;
    } else if (read_stop_file(stop_file, (int)n, &stop_sig)) {
        rc = 128 + (g_signal ? g_signal : stop_sig);
    } else if (WIFEXITED(status)) {
        rc = WEXITSTATUS(status);
        if (rc >= 128 && rc < 192) rc = 1; /* not a clean stop: never read as one */
    } else {
        fprintf(stderr, "qlora-train: --nproc %ld: %s ended by signal %d\n", n, mv[0], WTERMSIG(status));
        rc = 1;
    }
    unlink(stop_file);
    free(mv);
    free(prog);
    return rc;
}

/* A rank of a --nproc job that stopped cleanly: one line in the launcher's stop file (read_stop_file). */
static void report_stop_to_launcher(int rank, int world, int sig, int step) {
    const char *path = getenv(NPROC_STOP_ENV);
    if (!path || !*path || world < 2) return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) return;
    dprintf(fd, "%d %d %d %d\n", rank, world, sig, step);
    close(fd);
}

/* A failure of this rank: one line ("rank R: " on ranks other than 0, on the stderr saved before it was silenced),
 * then with several ranks the whole job ends (comm_abort), else the exit status. */
static int fail(comm *cm, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(comm *cm, int code, const char *fmt, ...) {
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (cm && cm->rank) dprintf(cm->err_fd, "qlora-train: rank %d: %s\n", cm->rank, msg);
    else fprintf(stderr, "qlora-train: %s\n", msg);
    if (cm && cm->world_size > 1) comm_abort(cm, code);
    gemm_shutdown();
    comm_free(cm);
    return code;
}

int main(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "--nproc") || !strncmp(argv[1], "--nproc=", 8))) return launch_nproc(argc, argv);
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        usage(stdout);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("qlora-train %s\n", QLORA_VERSION);
        return 0;
    }
    if (argc < 2 || strchr(argv[1], '=')) {
        usage(stderr);
        return 2;
    }
    qerr e = {{0}};
    comm *cm = NULL;
    if (comm_init(&cm, &e)) {
        fprintf(stderr, "qlora-train: %s\n", e.msg);
        return 2;
    }
    if (cm->rank) { /* one voice: rank 0 logs; this rank's output is kept for its own failure */
        int saved = fcntl(2, F_DUPFD_CLOEXEC, 3), devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (saved >= 0 && devnull >= 0) {
            fflush(NULL);
            cm->err_fd = saved;
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        if (devnull >= 0) close(devnull);
    }
    train_config c;
    train_config_refusals refused;
    if (train_config_load_all(argv[1], &c, &refused, &e)) {
        /* every refused key of the file, each on its line, then how many */
        for (int i = 0; refused.n > 1 && i < refused.n; i++) {
            if (cm->rank) dprintf(cm->err_fd, "qlora-train: rank %d: %s\n", cm->rank, refused.lines[i]);
            else fprintf(stderr, "qlora-train: %s\n", refused.lines[i]);
        }
        train_config_refusals_free(&refused);
        return fail(cm, 2, "%s", e.msg);
    }
    train_config_refusals_free(&refused);
    for (int i = 2; i < argc; i++) {
        if (train_config_apply_override(&c, argv[i], &e)) {
            train_config_free(&c);
            return fail(cm, 2, "%s", e.msg);
        }
    }
    if (train_config_validate(&c, &e)) {
        train_config_free(&c);
        return fail(cm, 2, "%s", e.msg);
    }
    for (int i = 0; i < c.n_warnings; i++) fprintf(stderr, "[config] %s\n", c.warnings[i]);
    cm->timeout_sec = c.ddp_timeout;

    train_result r;
    int rc = train_run_comm(&c, cm, &r, &e);
    if (rc) {
        train_config_free(&c);
        return fail(cm, 1, "%s", e.msg);
    }
    if (r.interrupted) {
        /* 128 + signal, the shell's convention for "stopped by that signal":
         * the run did not finish, and scripts must not mistake it for done. */
        /* the command the user typed: a rank of `--nproc N` was started by mpirun without --nproc
         * (launch_nproc passes QLORA_NPROC_STOP_FILE), so it is put back */
        char cmd[2048] = "";
        const char *sf = getenv(NPROC_STOP_ENV);
        int by_nproc = sf && *sf;
        for (int i = 0; i < argc; i++) {
            size_t l = strlen(cmd);
            int quote = strpbrk(argv[i], " \t'\"[]{}$*?;&|<>()") != NULL;
            snprintf(cmd + l, sizeof cmd - l, i ? (quote ? " '%s'" : " %s") : (quote ? "'%s'" : "%s"), argv[i]);
            if (i == 0 && by_nproc) {
                l = strlen(cmd);
                snprintf(cmd + l, sizeof cmd - l, " --nproc %d", cm->world_size);
            }
        }
        fprintf(stderr,
                "qlora-train: stopped by %s after step %d; checkpoint %s is complete. Resume with the same "
                "command%s:\n  %s\n",
                run_stop_signal_name(r.interrupted), r.interrupted_step, r.checkpoint,
                cm->world_size > 1 && !by_nproc ? " under the same launcher (mpirun, srun or torchrun)" : "", cmd);
        train_config_free(&c);
        gemm_shutdown();
        /* before MPI_Finalize: once mpirun has passed a signal on, Open MPI may end the ranks in it */
        report_stop_to_launcher(cm->rank, cm->world_size, r.interrupted, r.interrupted_step);
        comm_free(cm);
        return 128 + r.interrupted;
    }
    if (r.eval_loss_start > 0)
        fprintf(stderr, "[done] held-out loss %.4f -> %.4f (perplexity %.2f -> %.2f)\n", r.eval_loss_start,
                r.eval_loss_end, r.eval_ppl_start, r.eval_ppl_end);
    fprintf(stderr, "[done] %d steps, %.0f train tok/s, wall %.0fs, peak RSS %.0f MiB; adapter in %s\n", r.steps,
            r.train_tokens_per_sec, r.wall_seconds, r.peak_rss_mib, c.output_dir);
    train_config_free(&c);
    gemm_shutdown();
    comm_free(cm);
    return 0;
}
