/* tests/test_e2e_resume.c — checkpoints that always resume, on the real model.
 *
 * 1. An uninterrupted reference run (bin/qlora-train as a subprocess).
 * 2. The same run in another output_dir, killed again and again and re-run
 *    (the same command) until it finishes by itself: first a deterministic
 *    SIGKILL at each stage of a checkpoint save (QLORA_TEST_CRASH_AT), one
 *    SIGTERM and one SIGINT (graceful: finish the step, save, exit 143/130),
 *    then SIGKILL at random moments, half of them aimed inside a save (saves
 *    are slowed down with QLORA_TEST_SAVE_DELAY_MS). After every kill the
 *    newest complete checkpoint must load.
 * 3. The final adapter must be byte-identical to the reference, metrics.jsonl
 *    must hold every step once with identical losses, lr and grad norms, and
 *    save_total_limit must have left exactly the newest checkpoints.
 * 4. Re-running a finished run, and resuming past a corrupted newest
 *    checkpoint, give the same adapter again.
 * 5. NaN/Inf gradients: skipped and logged; abort after max_nan_steps in a row.
 *
 * Env: QLORA_TEST_KILL_SEED (default: time) makes the random kills repeatable;
 * QLORA_TEST_THREADS (default 1) the thread count of every run.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/clock.h"
#include "core/file.h"
#include "core/rng.h"
#include "tests/e2e_run.h"
#include "tests/subproc.h"
#include "tests/tmpdir.h"
#include "trainer/checkpoint.h"

#define MAX_STEPS 6

static char g_dir[64], g_cfg[128];

/* The training data: the first documents of the held-out man pages, cut short,
 * so that MAX_STEPS steps cross an epoch boundary. */
static int setup(void **st) {
    (void)st;
    char keys[512];
    snprintf(keys, sizeof keys,
             "max_steps: %d\nlearning_rate: 2e-3\nwarmup_steps: 2\nweight_decay: 0.01\nlr_scheduler: cosine\n"
             "eval_steps: 3\neval_max_tokens: 64\nsave_steps: 1\nsave_total_limit: 3\nseed: 7\n",
             MAX_STEPS);
    return e2e_setup(g_dir, sizeof g_dir, g_cfg, sizeof g_cfg, "qlora-resume-", 1, keys);
}

static int teardown(void **st) {
    (void)st;
    return tmpdir_remove(g_dir);
}

/* Run the trainer to completion into output_dir; returns the exit code. */
static int run_trainer(const char *out_dir, const char *const *extra_args, const char *const *env, char **err) {
    return e2e_run_trainer(g_cfg, out_dir, extra_args, env, err);
}

/* metrics.jsonl as comparable lines: everything but the timings. */
static char *metrics_canonical(const char *dir) {
    /* keep what must be reproducible; timings (tokens_per_sec, train_seconds, ...) are not */
    static const char *const keep[] = {"step", "loss", "lr", "grad_norm", "epoch", "eval_loss", "eval_ppl",
                                       "eval_tokens", NULL};
    return e2e_metrics_canonical(dir, keep, NULL);
}

/* Every step 1..MAX_STEPS exactly once, in order. */
static void assert_steps_once(const char *canon) {
    int expect = 1;
    const char *p = canon;
    while ((p = strstr(p, "{\"step\":"))) {
        int step = atoi(p + 8);
        const char *eol = strchr(p, '\n');
        if (memmem(p, (size_t)(eol - p), "\"loss\":", 7) && !memmem(p, (size_t)(eol - p), "eval_loss", 9)) {
            if (step != expect) print_error("train line for step %d where %d was expected:\n%s\n", step, expect, canon);
            assert_int_equal(step, expect);
            expect++;
        }
        p = eol;
    }
    assert_int_equal(expect, MAX_STEPS + 1);
}

/* The newest complete checkpoint (if any) loads; returns its step or -1. */
static int64_t newest_loads(const char *dir) {
    ckpt_entry *v;
    int n;
    qerr e;
    assert_int_equal(ckpt_list(dir, &v, &n, &e), 0);
    int64_t step = -1;
    for (int i = 0; i < n && step < 0; i++) {
        char m[4200];
        snprintf(m, sizeof m, "%s/COMPLETE", v[i].path);
        if (access(m, F_OK)) continue;
        ckpt_state s;
        int rc = ckpt_load(v[i].path, &s, &e);
        if (rc) print_error("newest complete checkpoint does not load: %s\n", e.msg);
        assert_int_equal(rc, 0);
        step = s.step;
        ckpt_state_free(&s);
    }
    free(v);
    return step;
}

static int count_lines_with(const char *s, const char *needle) {
    int k = 0;
    for (const char *p = s; (p = strstr(p, needle)); p += strlen(needle)) k++;
    return k;
}

static char g_ref[128];

static void test_reference_run(void **st) {
    (void)st;
    snprintf(g_ref, sizeof g_ref, "%s/ref", g_dir);
    char *err = NULL;
    double t0 = clock_now_sec();
    int code = run_trainer(g_ref, NULL, NULL, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    print_message("reference run: %.1fs\n", clock_now_sec() - t0);
    free(err);
    char *m = metrics_canonical(g_ref);
    assert_steps_once(m);
    free(m);
}

static void test_kill_and_resume(void **st) {
    (void)st;
    char kdir[128];
    snprintf(kdir, sizeof kdir, "%s/killed", g_dir);
    const char *seed_env = getenv("QLORA_TEST_KILL_SEED");
    uint64_t seed = seed_env && *seed_env ? strtoull(seed_env, NULL, 10) : (uint64_t)time(NULL);
    print_message("random kills with QLORA_TEST_KILL_SEED=%llu\n", (unsigned long long)seed);
    static const char *const stages[] = {"begin", "state", "extra", "rename", "marker", "committed"};
    const int n_stages = 6;
    int attempts = 0, kills = 0, kills_in_save = 0, graceful = 0, done = 0;
    double t0 = clock_now_sec();
    char od[160];
    snprintf(od, sizeof od, "output_dir=%s", kdir);
    int64_t newest = -1;
    for (attempts = 0; attempts < 60 && !done; attempts++) {
        char crash_env[64] = "";
        const char *env[4] = {"QLORA_TEST_SAVE_DELAY_MS=100", NULL, NULL, NULL};
        /* 0 crash at a save stage, 1 SIGTERM, 2 SIGINT, 3 SIGKILL at a random
         * time, 4 SIGKILL inside a save */
        int mode;
        if (attempts == 0) {
            mode = 1;
        } else if (attempts == 1) {
            mode = 2;
        } else if (attempts < 2 + n_stages) {
            mode = 0;
            snprintf(crash_env, sizeof crash_env, "QLORA_TEST_CRASH_AT=%s", stages[attempts - 2]);
            env[1] = crash_env;
        } else {
            mode = rng_u64(seed, 1, (uint64_t)attempts) & 1 ? 4 : 3;
        }
        char *argv[] = {(char *)subproc_trainer(), g_cfg, od, NULL};
        subproc p;
        assert_int_equal(subproc_start(&p, argv, env), 0);
        double start = clock_now_sec();
        /* Random kills: a quarter during start-up (loading), the rest after
         * the first or second step of this run plus a random delay, so that
         * most runs make progress and the moments cover steps and saves. */
        double u = rng_uniform(seed, 2, (uint64_t)attempts);
        int early = u < 0.25;
        double kill_delay = early ? 0.1 + 6.0 * u : 3.0 * rng_uniform(seed, 3, (uint64_t)attempts);
        int after_steps = 1 + (int)(rng_u64(seed, 4, (uint64_t)attempts) & 1);
        /* Kills inside a save: the second save of this run when there is room
         * (so the first one makes progress), else the first. */
        int target_save = newest + 2 <= MAX_STEPS ? 2 : 1;
        double save_delay = 0.5 * rng_uniform(seed, 5, (uint64_t)attempts);
        int sent = 0, steps_seen = 0, saves_seen = 0;
        double step_seen_at = 0, save_seen_at = 0;
        while (!subproc_poll(&p, 10)) {
            double t = clock_now_sec() - start;
            int k = count_lines_with(p.err, "[train] step");
            if (k > steps_seen) steps_seen = k, step_seen_at = t;
            k = count_lines_with(p.err, "[checkpoint] saving step");
            if (k > saves_seen) saves_seen = k, save_seen_at = t;
            if (sent) {
                if (t > 600) fail_msg("attempt %d: the trainer did not stop", attempts);
                continue;
            }
            if ((mode == 1 || mode == 2) && steps_seen > 0) {
                kill(p.pid, mode == 1 ? SIGTERM : SIGINT);
                sent = 1;
            } else if (mode == 3 && ((early && t >= kill_delay) ||
                                     (!early && steps_seen >= after_steps && t >= step_seen_at + kill_delay))) {
                kill(p.pid, SIGKILL);
                sent = 1;
            } else if (mode == 4 && saves_seen >= target_save && t >= save_seen_at + save_delay) {
                /* inside the save when the last "[checkpoint]" line is "saving" */
                const char *last_ck = NULL;
                for (const char *q = p.err; (q = strstr(q, "[checkpoint] sav")); q++) last_ck = q;
                if (last_ck && !strncmp(last_ck, "[checkpoint] saving", 19)) kills_in_save++;
                kill(p.pid, SIGKILL);
                sent = 1;
            } else if (t > 600) {
                kill(p.pid, SIGKILL);
                fail_msg("attempt %d: the trainer ran for 10 minutes", attempts);
            }
        }
        int code = subproc_exit_code(&p);
        if (code == 0) {
            done = 1;
        } else if (mode == 0) {
            if (code != 128 + SIGKILL) print_error("attempt %d (crash at %s): exit %d\n%s\n", attempts, env[1], code, p.err);
            assert_int_equal(code, 128 + SIGKILL);
            kills++;
            kills_in_save++;
        } else if (mode == 1 || mode == 2) {
            int want = 128 + (mode == 1 ? SIGTERM : SIGINT);
            if (code != want) print_error("attempt %d: exit %d, expected %d\n%s\n", attempts, code, want, p.err);
            assert_int_equal(code, want);
            assert_non_null(strstr(p.err, "Resume with the same command"));
            assert_non_null(strstr(p.err, "checkpoint-"));
            graceful++;
        } else {
            if (code != 128 + SIGKILL) print_error("attempt %d: exit %d\n%s\n", attempts, code, p.err);
            assert_int_equal(code, 128 + SIGKILL);
            kills++;
        }
        newest = newest_loads(kdir);
        print_message("attempt %2d: %-26s -> exit %3d after %5.1fs; newest complete checkpoint: step %lld\n", attempts,
                      mode == 0 ? env[1] + 20 : mode == 1 ? "SIGTERM" : mode == 2 ? "SIGINT" :
                      mode == 3 ? (early ? "SIGKILL during start-up" : "SIGKILL at a random time") :
                      "SIGKILL inside a save",
                      code, clock_now_sec() - start, (long long)newest);
        subproc_free(&p);
    }
    print_message("%d runs: %d SIGKILLs (%d inside a save), %d SIGTERM/SIGINT; %.0fs\n", attempts, kills,
                  kills_in_save, graceful, clock_now_sec() - t0);
    assert_true(done);
    assert_true(kills_in_save >= n_stages);

    /* bit-identical to the uninterrupted run */
    char a[256], b[256];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", g_ref);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", kdir);
    e2e_assert_same_file(a, b);
    snprintf(b, sizeof b, "%s/checkpoint-%d/adapter_model.safetensors", kdir, MAX_STEPS);
    e2e_assert_same_file(a, b);
    char *mr = metrics_canonical(g_ref), *mk = metrics_canonical(kdir);
    if (strcmp(mr, mk)) print_error("metrics differ:\nreference:\n%s\nkilled:\n%s\n", mr, mk);
    assert_string_equal(mr, mk);
    assert_steps_once(mk);
    free(mk);

    /* save_total_limit 3: the newest three, nothing half-written left */
    ckpt_entry *v;
    int n;
    qerr e;
    assert_int_equal(ckpt_list(kdir, &v, &n, &e), 0);
    assert_int_equal(n, 3);
    for (int i = 0; i < n; i++) assert_int_equal(v[i].step, MAX_STEPS - i);
    free(v);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "ls -a %s | grep -q -e '\\.tmp-' -e '\\.old-'", kdir);
    assert_int_not_equal(system(cmd), 0);
    /* readable by the HDF5 tools, when they are installed */
    if (system("command -v h5dump >/dev/null 2>&1") == 0) {
        snprintf(cmd, sizeof cmd, "h5dump -H %s/checkpoint-%d/state.h5 >/dev/null", kdir, MAX_STEPS);
        assert_int_equal(system(cmd), 0);
        snprintf(cmd, sizeof cmd, "h5dump -d /lora/tensor_names %s/checkpoint-%d/state.h5 | grep -q lora_A", kdir,
                 MAX_STEPS);
        assert_int_equal(system(cmd), 0);
    }

    /* re-running the finished run changes nothing */
    char *err = NULL;
    assert_int_equal(run_trainer(kdir, NULL, NULL, &err), 0);
    assert_non_null(strstr(err, "[checkpoint] resuming from"));
    free(err);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", kdir);
    e2e_assert_same_file(a, b);
    mk = metrics_canonical(kdir);
    assert_string_equal(mr, mk);
    free(mk);

    /* a corrupted newest checkpoint is skipped; the older one resumes to the same result */
    char p[256];
    snprintf(p, sizeof p, "%s/checkpoint-%d/state.h5", kdir, MAX_STEPS);
    size_t len = 0;
    char *buf = file_read_all(p, &len, NULL);
    assert_non_null(buf);
    buf[len / 3] ^= 1;
    FILE *f = fopen(p, "wb");
    fwrite(buf, 1, len, f);
    fclose(f);
    free(buf);
    assert_int_equal(run_trainer(kdir, NULL, NULL, &err), 0);
    assert_non_null(strstr(err, "[checkpoint] skipping"));
    assert_non_null(strstr(err, "is corrupt"));
    char want[64];
    snprintf(want, sizeof want, "checkpoint-%d: step %d", MAX_STEPS - 1, MAX_STEPS - 1);
    assert_non_null(strstr(err, want));
    free(err);
    e2e_assert_same_file(a, b);
    mk = metrics_canonical(kdir);
    assert_string_equal(mr, mk);
    free(mk);

    /* another base format than the checkpoint's (nf4 with double quant): refused in one line naming both,
     * nothing written */
    const char *other[] = {"bnb_4bit_use_double_quant=false", NULL};
    assert_int_not_equal(run_trainer(kdir, other, NULL, &err), 0);
    if (!strstr(err, "held as nf4 double_quant, this config holds it as nf4;")) print_error("%s\n", err);
    assert_non_null(strstr(err, "held as nf4 double_quant, this config holds it as nf4;"));
    free(err);
    e2e_assert_same_file(a, b);
    mk = metrics_canonical(kdir);
    assert_string_equal(mr, mk);
    free(mk);
    free(mr);
}

static void test_nan_steps(void **st) {
    (void)st;
    char dir[128];
    snprintf(dir, sizeof dir, "%s/nan", g_dir);
    char *err = NULL;
    /* one bad step: skipped, logged, training goes on */
    const char *env1[] = {"QLORA_TEST_NAN_STEPS=2", NULL};
    const char *args[] = {"max_steps=3", "save_steps=100", "eval_steps=0", NULL};
    int code = run_trainer(dir, args, env1, &err);
    if (code) print_error("%s\n", err);
    assert_int_equal(code, 0);
    assert_non_null(strstr(err, "[train] step 2/3"));
    assert_non_null(strstr(err, "non-finite: update skipped (1 in a row"));
    assert_non_null(strstr(err, "1 step(s) had NaN/Inf"));
    free(err);
    char p[256];
    snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
    char *m = file_read_all(p, NULL, NULL);
    assert_non_null(strstr(m, "{\"step\": 2, \"loss\":"));
    assert_non_null(strstr(m, "\"grad_norm\": null"));
    free(m);
    /* max_nan_steps in a row: a clear stop */
    snprintf(dir, sizeof dir, "%s/nan2", g_dir);
    const char *env2[] = {"QLORA_TEST_NAN_STEPS=2,3", NULL};
    const char *args2[] = {"max_steps=4", "save_steps=1", "eval_steps=0", "max_nan_steps=2", NULL};
    code = run_trainer(dir, args2, env2, &err);
    assert_int_equal(code, 1);
    assert_non_null(strstr(err, "qlora-train: step 3: the loss or the gradients were NaN/Inf in 2 optimizer steps in a "
                                "row (max_nan_steps 2)"));
    assert_non_null(strstr(err, "checkpoint-2"));
    free(err);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_run),
        cmocka_unit_test(test_kill_and_resume),
        cmocka_unit_test(test_nan_steps),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
