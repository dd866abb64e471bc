/* tests/test_ranks_e2e.c — training on several processes (data parallel over
 * MPI; trainer/train.h train_run_comm), bin/qlora-train run under mpirun.
 *
 * 1. Bit identity on a tiny random model (tests/tiny_model.h), 12 steps with
 *    LoRA dropout, evaluation every 3 steps over 6 held-out rows: world 1 ×
 *    accumulation 2 (one process) against world 2 × accumulation 1 (mpirun
 *    -np 2) and against `qlora-train --nproc 2`: every train and eval line of
 *    metrics.jsonl (loss, lr, grad_norm, epoch, eval_loss, eval_tokens),
 *    the adapter's bytes, and the final checkpoint's parameters and AdamW
 *    moments, bit for bit. (Why they can be equal: each micro-batch's
 *    gradient is computed alone and added; with two terms a + b has one result
 *    whatever the order; evaluation sums are reduced per batch and added in
 *    batch order.) One voice: one "[train] step 1/" line, the "[ranks]" line
 *    with the global batch, "world 2" in the progress lines.
 *    SHARD_GRAD_OP (fsdp: [shard_grad_op]) on 2 ranks: the same bits, also
 *    resumed from a one-process checkpoint; on 3 ranks (a padded shard)
 *    within the world-3 tolerance.
 *    FULL_SHARD (the frozen base sharded, each layer gathered before use) on
 *    2 ranks: the same bits with gradient checkpointing on and off, each rank
 *    holding half of the frozen linears, also resumed from a one-process
 *    checkpoint and its checkpoint resumed by one process; on 3 ranks (uneven shards) within the world-3 tolerance.
 * 2. The same on SmolLM2-135M, 3 steps (tests/e2e_run.h's data and config),
 *    NO_SHARD, SHARD_GRAD_OP and FULL_SHARD.
 *    Also: Open MPI over TCP (loopback) instead of shared memory; resuming a
 *    world-2 checkpoint with one process and a one-process checkpoint with
 *    two ranks; SophiaG (Hessian every 2 steps) — each the same bits.
 *    World 3 (oversubscribed) against world 1 x accumulation 3: within the
 *    tolerance written at test_world3_close, with its reasoning.
 * 3. SIGTERM to `qlora-train --nproc 2` mid-step: every rank stops after the
 *    same step, rank 0 saves, the launcher exits 143 (SIGINT: 130), the same
 *    command resumes to the uninterrupted run's adapter; a plain mpirun stops
 *    the same way (exit 1); a rank dying during the stop is never 130/143.
 * 4. Faults: rank 1 killed at step 3 → the job ends non-zero within 60 s and
 *    mpirun names rank 1; rank 1 hung at step 3 with ddp_timeout 3 → rank 0's
 *    collective times out and the job ends non-zero, the line naming rank 0,
 *    the collective and ddp_timeout; ranks started with different configs
 *    (an MPMD launch, seed differs on rank 1) → refused with one line naming
 *    rank 1 and the config.
 * Without MPI or mpirun every case prints "SKIPPED: <why>" and is skipped.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "comm/comm.h"
#include "core/clock.h"
#include "tests/e2e_run.h"
#include "tests/mpi_launch.h"
#include "tests/subproc.h"
#include "tests/tiny_model.h"
#include "tests/tmpdir.h"
#include "trainer/checkpoint.h"

#define STEPS 12

static char g_dir[64], g_cfg[128];
static const char *const THREADS1[] = {"OMP_NUM_THREADS=1", NULL};

static int skip_without_mpi(void) { return mpi_launch_skip(); }

/* Tiny model, ~60 short documents, the config of case 1. */
static int setup(void **st) {
    if (tmpdir_setup(st, "qlora-ranks-")) return -1;
    snprintf(g_dir, sizeof g_dir, "%s", ((const tmpdir *)*st)->dir);
    char tail[512];
    snprintf(tail, sizeof tail,
             "val_set_size: 6\nsequence_len: 32\nsample_packing: true\nmicro_batch_size: 1\ngradient_accumulation_steps: 2\n"
             "max_steps: %d\nlearning_rate: 1e-2\nwarmup_steps: 2\nlr_scheduler: cosine\nweight_decay: 0.01\neval_steps: 3\n"
             "save_steps: 6\nseed: 5\nnum_threads: 1\n",
             STEPS);
    return tiny_world_write(g_dir, 11, 60, 16, 7, 7, tail, g_cfg, sizeof g_cfg);
}

static int teardown(void **st) { return tmpdir_teardown(st); }

/* `mpirun -np np trainer cfg output_dir=out extra...`; exit code, stderr into *err. */
static int run_ranks(int np, const char *cfg, const char *out, const char *const *extra, const char *const *env,
                     char **err) {
    return mpi_launch_trainer(np, cfg, out, extra, env, err);
}

static const char *const KEEP[] = {"step", "loss", "lr", "grad_norm", "epoch", "eval_loss", "eval_ppl",
                                   "eval_tokens", NULL};

/* a and b (output dirs) hold the same metrics, adapter and final state, bit for bit. */
static void assert_same_run(const char *a, const char *b, int final_step) {
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
    snprintf(pa, sizeof pa, "%s/checkpoint-%d", a, final_step);
    snprintf(pb, sizeof pb, "%s/checkpoint-%d", b, final_step);
    ckpt_state sa, sb;
    qerr e;
    assert_int_equal(ckpt_load(pa, &sa, &e), 0);
    assert_int_equal(ckpt_load(pb, &sb, &e), 0);
    assert_int_equal(sa.n_params, sb.n_params);
    assert_int_equal(sa.opt_step, sb.opt_step);
    assert_int_equal(sa.rows_consumed, sb.rows_consumed);
    assert_string_equal(sa.optimizer, sb.optimizer);
    assert_int_equal(sa.hessian_updates, sb.hessian_updates);
    const size_t n = (size_t)sa.n_params * sizeof(float);
    assert_memory_equal(sa.params, sb.params, n);
    if (!strcmp(sa.optimizer, "adamw_8bit")) { /* codes, absmax per block, the fp32 moments of the small tensors */
        assert_int_equal(sa.n_blocks, sb.n_blocks);
        assert_int_equal(sa.n32, sb.n32);
        assert_memory_equal(sa.state1, sb.state1, (size_t)sa.n_params);
        assert_memory_equal(sa.state2, sb.state2, (size_t)sa.n_params);
        assert_memory_equal(sa.absmax1, sb.absmax1, (size_t)sa.n_blocks * sizeof(float));
        assert_memory_equal(sa.absmax2, sb.absmax2, (size_t)sa.n_blocks * sizeof(float));
        assert_memory_equal(sa.exp_avg, sb.exp_avg, (size_t)sa.n32 * sizeof(float));
        assert_memory_equal(sa.exp_avg_sq, sb.exp_avg_sq, (size_t)sa.n32 * sizeof(float));
        ckpt_state_free(&sa);
        ckpt_state_free(&sb);
        return;
    }
    assert_memory_equal(sa.exp_avg, sb.exp_avg, n);
    assert_true(!sa.exp_avg_sq == !sb.exp_avg_sq && !sa.hessian == !sb.hessian);
    if (sa.exp_avg_sq) assert_memory_equal(sa.exp_avg_sq, sb.exp_avg_sq, n);
    if (sa.hessian) assert_memory_equal(sa.hessian, sb.hessian, n);
    ckpt_state_free(&sa);
    ckpt_state_free(&sb);
}

static int count_of(const char *s, const char *needle) {
    int n = 0;
    for (const char *p = s; (p = strstr(p, needle)); p++) n++;
    return n;
}

static void test_tiny_bit_identical(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], c[256], od[300];
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(b, sizeof b, "%s/w2-acc1", g_dir);
    snprintf(c, sizeof c, "%s/nproc2", g_dir);
    char *err = NULL;
    int rc = e2e_run_trainer(g_cfg, a, NULL, THREADS1, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    const char *const acc1[] = {"gradient_accumulation_steps=1", NULL};
    rc = run_ranks(2, g_cfg, b, acc1, NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    /* one voice: rank 0's lines only */
    assert_int_equal(count_of(err, "[train] step 1/"), 1);
    assert_int_equal(count_of(err, "[model] fingerprint"), 1);
    assert_non_null(strstr(err, "[ranks] 2 ranks (mpi, data parallel, NO_SHARD): global batch = micro_batch_size 1 "
                                "x gradient_accumulation_steps 1 x world_size 2 = 2 rows"));
    assert_non_null(strstr(err, "| world 2 |"));
    free(err);
    assert_same_run(a, b, STEPS);
    /* the launcher of qlora-train itself */
    snprintf(od, sizeof od, "output_dir=%s", c);
    char *argv[] = {(char *)subproc_trainer(), "--nproc", "2", g_cfg, od, "gradient_accumulation_steps=1", NULL};
    rc = subproc_run(argv, THREADS1, 600, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, c, STEPS);
}

/* Start the job into out, rank 0 pausing 5 s at the start of step 5 (plus fault, a second
 * QLORA_TEST_RANK_FAULT, when given), and send sig to the launcher — `qlora-train --nproc 2` (nproc) or
 * a plain mpirun — once step 4 is logged. The exit code. */
static int signal_job(const char *out, int nproc, int sig, const char *fault) {
    char od[300];
    snprintf(od, sizeof od, "output_dir=%s", out);
    char *prog[] = {(char *)subproc_trainer(), g_cfg, od, "gradient_accumulation_steps=1", NULL};
    char *launcher[] = {(char *)subproc_trainer(), "--nproc", "2", g_cfg, od, "gradient_accumulation_steps=1", NULL};
    const char *const env[] = {"OMP_NUM_THREADS=1", fault ? fault : "QLORA_TEST_RANK_FAULT=0:5:pause", NULL};
    subproc p;
    assert_int_equal(nproc ? subproc_start(&p, launcher, env) : mpi_launch_start(&p, 2, prog, env), 0);
    double t0 = clock_now_sec();
    while (!subproc_poll(&p, 100) && !strstr(p.err ? p.err : "", "[train] step 4/") && clock_now_sec() - t0 < 120) {
    }
    assert_non_null(strstr(p.err ? p.err : "", "[train] step 4/"));
    kill(p.pid, sig);
    subproc_wait(&p, 60);
    const int rc = subproc_exit_code(&p);
    if (!fault && !strstr(p.err ? p.err : "", "[checkpoint] stopped by")) fprintf(stderr, "exit %d:\n%s", rc, p.err);
    if (!fault) /* the resume hint: the command typed, --nproc 2 included */
        assert_non_null(strstr(p.err ? p.err : "",
                               nproc ? " --nproc 2 " : "Resume with the same command under the same launcher"));
    subproc_free(&p);
    return rc;
}

/* SIGTERM to `qlora-train --nproc 2` (its launcher passes it to mpirun, Open MPI forwards it to every rank)
 * while rank 0 pauses in step 5: the ranks agree on the stop, finish the step, rank 0 saves checkpoint-5, every
 * rank reports the clean stop and the launcher exits 143; re-running resumes on both ranks and ends at the
 * uninterrupted world-2 run's adapter, bit for bit. SIGINT the same with 130. SIGTERM to a plain mpirun stops
 * the same way, but Open MPI's mpirun exits 1. A rank that dies while the launcher stops the job: non-zero,
 * never 130/143. (Runs after test_tiny_bit_identical, whose w2-acc1 it compares with.) */
static void test_sigterm_and_resume(void **st) {
    if (skip_without_mpi()) skip();
    static const struct {
        const char *name;
        int nproc, sig, want; /* want: the exit code; -1 any non-zero */
    } cases[] = {{"sigterm", 1, SIGTERM, 143}, {"sigint", 1, SIGINT, 130}, {"sigterm-mpirun", 0, SIGTERM, -1}};
    char out[256], ck[320], ref[256], pa[512], pb[512];
    snprintf(ref, sizeof ref, "%s/w2-acc1", g_dir);
    for (int i = 0; i < 3; i++) {
        snprintf(out, sizeof out, "%s/%s", g_dir, cases[i].name);
        const int rc = signal_job(out, cases[i].nproc, cases[i].sig, NULL);
        print_message("%s: exit %d\n", cases[i].name, rc);
        if (cases[i].want >= 0) assert_int_equal(rc, cases[i].want);
        else assert_int_not_equal(rc, 0); /* Open MPI's mpirun exits 1 after forwarding a signal */
        snprintf(ck, sizeof ck, "%s/checkpoint-5/COMPLETE", out);
        assert_int_equal(access(ck, F_OK), 0);
        snprintf(ck, sizeof ck, "%s/checkpoint-6", out);
        assert_int_not_equal(access(ck, F_OK), 0); /* stopped after step 5 */
        if (i) continue;
        char *err = NULL;
        int rr = run_ranks(2, g_cfg, out, (const char *const[]){"gradient_accumulation_steps=1", NULL}, NULL, &err);
        if (rr || !strstr(err, "resuming from")) fprintf(stderr, "%s", err);
        assert_int_equal(rr, 0);
        assert_non_null(strstr(err, "[checkpoint] resuming from"));
        free(err);
        snprintf(pa, sizeof pa, "%s/adapter_model.safetensors", ref);
        snprintf(pb, sizeof pb, "%s/adapter_model.safetensors", out);
        e2e_assert_same_file(pa, pb);
    }
    /* rank 1 dies at the start of step 5 while the launcher passes SIGTERM on: a failure, not a clean stop */
    snprintf(out, sizeof out, "%s/sigterm-dead", g_dir);
    const int rc = signal_job(out, 1, SIGTERM, "QLORA_TEST_RANK_FAULT=1:5:kill");
    print_message("sigterm-dead: exit %d\n", rc);
    assert_true(rc != 0 && rc != 130 && rc != 143);
}

/* SHARD_GRAD_OP (fsdp: [shard_grad_op]): gradients reduce-scattered, AdamW
 * on each rank's half, parameters all-gathered: the same bits as world 1 x
 * accumulation 2, the whole optimizer state gathered into the checkpoint;
 * and resumed from a one-process checkpoint (each rank takes its shard). */
static void test_shard_grad_op(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], c[256], cmd[1024], *err = NULL;
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(b, sizeof b, "%s/w2-sgo", g_dir);
    snprintf(c, sizeof c, "%s/w1-to-w2-sgo", g_dir);
    const char *const sgo[] = {"gradient_accumulation_steps=1", "fsdp=[shard_grad_op]", NULL};
    int rc = run_ranks(2, g_cfg, b, sgo, NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(err, "[ranks] 2 ranks (mpi, SHARD_GRAD_OP)"));
    free(err);
    assert_same_run(a, b, STEPS);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp -r '%s/checkpoint-6' '%s/'", c, a, c);
    assert_int_equal(system(cmd), 0);
    rc = run_ranks(2, g_cfg, c, sgo, NULL, &err);
    if (rc || !strstr(err, "resuming from")) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, c, STEPS);
}

/* The "[fsdp] ... bytes held per rank a (x), b (y), ... of N unsharded" line: every rank holds about
 * 1/np of the frozen linears (its ranges' bytes, each section padded to 64 bytes in the shard: a few
 * hundred bytes a layer above an even share, 2 % of the tiny model's 19 KB layers) and together at least
 * all of them. */
static void assert_shard_bytes(const char *err, int np) {
    const char *p = strstr(err, "bytes held per rank ");
    assert_non_null(p);
    p += strlen("bytes held per rank ");
    long long held[8], total = 0;
    for (int k = 0; k < np; k++) {
        double frac;
        assert_int_equal(sscanf(p, "%lld (%lf)", &held[k], &frac), 2);
        p = strchr(p, ')') + 1;
        if (*p == ',') p += 2;
    }
    assert_int_equal(sscanf(p, " of %lld unsharded", &total), 1);
    long long sum = 0;
    for (int k = 0; k < np; k++) {
        print_message("rank %d of %d holds %lld of %lld bytes of the frozen linears (%.3f)\n", k, np, held[k], total,
                      (double)held[k] / (double)total);
        assert_true((double)held[k] <= 1.02 * (double)total / np + 1024);
        sum += held[k];
    }
    assert_true(sum >= total);
}

/* FULL_SHARD (fsdp: [full_shard]): the frozen base sharded over the ranks and gathered per layer, the
 * adapters as SHARD_GRAD_OP: world 2 x accumulation 1 is world 1 x accumulation 2 bit for bit, with
 * gradient checkpointing (the default: gathered before the forward and before each recompute) and
 * without (gathered before the forward and before the backward); each rank holds half of the frozen
 * linears; resumed from a one-process checkpoint (FULL_STATE_DICT), the same bits. */
static void test_full_shard(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], a0[256], b[256], b0[256], c[256], cmd[1024], *err = NULL;
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(a0, sizeof a0, "%s/w1-acc2-nockpt", g_dir);
    snprintf(b, sizeof b, "%s/w2-fs", g_dir);
    snprintf(b0, sizeof b0, "%s/w2-fs-nockpt", g_dir);
    snprintf(c, sizeof c, "%s/w1-to-w2-fs", g_dir);
    const char *const fs[] = {"gradient_accumulation_steps=1", "fsdp_config={fsdp_sharding_strategy: FULL_SHARD}",
                              NULL};
    int rc = run_ranks(2, g_cfg, b, fs, NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(err, "[ranks] 2 ranks (mpi, FULL_SHARD)"));
    assert_non_null(strstr(err, "per-rank memory predicted"));
    assert_shard_bytes(err, 2);
    free(err);
    assert_same_run(a, b, STEPS);
    /* without checkpointing */
    rc = e2e_run_trainer(g_cfg, a0, (const char *const[]){"gradient_checkpointing=false", NULL}, THREADS1, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    rc = run_ranks(2, g_cfg, b0,
                   (const char *const[]){"gradient_accumulation_steps=1", "fsdp=[full_shard]",
                                         "gradient_checkpointing=false", NULL},
                   NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a0, b0, STEPS);
    /* resumed from one process's checkpoint */
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp -r '%s/checkpoint-6' '%s/'", c, a, c);
    assert_int_equal(system(cmd), 0);
    rc = run_ranks(2, g_cfg, c, fs, NULL, &err);
    if (rc || !strstr(err, "resuming from")) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, c, STEPS);
    /* and a FULL_SHARD checkpoint continued by one process (accumulation 2, no strategy) */
    char d[256];
    snprintf(d, sizeof d, "%s/w2-fs-to-w1", g_dir);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp -r '%s/checkpoint-6' '%s/'", d, b, d);
    assert_int_equal(system(cmd), 0);
    rc = e2e_run_trainer(g_cfg, d, NULL, THREADS1, &err);
    if (rc || !strstr(err, "resuming from")) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, d, STEPS);
}

/* Open MPI over TCP (loopback) instead of shared memory: the same bits. */
static void test_tcp_transport(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], *err = NULL;
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(b, sizeof b, "%s/w2-tcp", g_dir);
    /* pml ob1: the BTLs carry the data (the UCX pml, where present, would bring its own shared memory) */
    const char *const env[] = {"OMP_NUM_THREADS=1", "OMPI_MCA_pml=ob1", "OMPI_MCA_btl=tcp,self", "OMPI_MCA_btl_tcp_if_include=lo",
                               NULL};
    int rc = run_ranks(2, g_cfg, b, (const char *const[]){"gradient_accumulation_steps=1", NULL}, env, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, b, STEPS);
}

/* Resume at another world size: checkpoint-6 of the world-2 run continued by
 * one process (accumulation 2), and checkpoint-6 of the one-process run
 * continued by two ranks; the data position is global and the state whole,
 * so both end at the uninterrupted runs' bits. */
static void test_resume_other_world_size(void **st) {
    if (skip_without_mpi()) skip();
    static const char *const from[2] = {"w2-acc1", "w1-acc2"}, *const to[2] = {"w2-to-w1", "w1-to-w2"};
    for (int k = 0; k < 2; k++) {
        char src[256], dst[256], cmd[800], ref[256], *err = NULL;
        snprintf(src, sizeof src, "%s/%s/checkpoint-6", g_dir, from[k]);
        snprintf(dst, sizeof dst, "%s/%s", g_dir, to[k]);
        snprintf(ref, sizeof ref, "%s/w1-acc2", g_dir);
        snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp -r '%s' '%s/'", dst, src, dst);
        assert_int_equal(system(cmd), 0);
        int rc = k == 0 ? e2e_run_trainer(g_cfg, dst, NULL, THREADS1, &err)
                        : run_ranks(2, g_cfg, dst, (const char *const[]){"gradient_accumulation_steps=1", NULL},
                                    NULL, &err);
        if (rc || !strstr(err, "resuming from")) fprintf(stderr, "%s", err);
        assert_int_equal(rc, 0);
        assert_non_null(strstr(err, "[checkpoint] resuming from"));
        free(err);
        assert_same_run(ref, dst, STEPS);
    }
}

/* SophiaG (Hessian estimate every 2 steps: sampled labels keyed by the global micro-batch, a second
 * all-reduce): world 2 x accumulation 1 against world 1 x accumulation 2. */
static void test_sophia_bit_identical(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], *err = NULL;
    snprintf(a, sizeof a, "%s/sophia-w1", g_dir);
    snprintf(b, sizeof b, "%s/sophia-w2", g_dir);
    int rc = e2e_run_trainer(g_cfg, a, (const char *const[]){"optimizer=sophia", "sophia_k=2", NULL}, THREADS1,
                             &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    rc = run_ranks(2, g_cfg, b,
                   (const char *const[]){"optimizer=sophia", "sophia_k=2", "gradient_accumulation_steps=1", NULL},
                   NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, b, STEPS);
}

/* Run the trainer in one process into out unless out already holds a finished run (another case made it). */
static void run_one_process_once(const char *out, const char *const *extra) {
    char p[512], *err = NULL;
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", out);
    if (!access(p, F_OK)) return;
    int rc = e2e_run_trainer(g_cfg, out, extra, THREADS1, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
}

/* The optimizer state and update on each rank's shard, for SophiaG and bitsandbytes' 8-bit AdamW:
 * SHARD_GRAD_OP and FULL_SHARD on 2 ranks x accumulation 1 against 1 process x accumulation 2, every
 * train and eval loss, the adapter bytes and the final optimizer state (Sophia's m and h; the 8-bit
 * codes, absmax and the fp32 moments) bit for bit. Sophia: the Hessian-estimate gradient is
 * reduce-scattered like the loss gradient and h updated on the shard. adamw_8bit with lora_r 32 keeps 8-bit
 * moments for the 4096-element tensors (gate/up lora_B, down lora_A) and fp32 ones for the rest; the
 * shards are cut on the 256-element block grid (here the halves meet at the layer boundary; off-grid cuts:
 * tests/test_adamw8bit.c and test_ckpt_sharded_e2e's world 3). */
static void test_sharded_optimizers(void **st) {
    if (skip_without_mpi()) skip();
    static const char *const strategies[2][2] = {{"fsdp=[shard_grad_op]", "SHARD_GRAD_OP"},
                                                 {"fsdp=[full_shard]", "FULL_SHARD"}};
    char a[256], b[256], line[128], *err = NULL;
    snprintf(a, sizeof a, "%s/sophia-w1", g_dir);
    run_one_process_once(a, (const char *const[]){"optimizer=sophia", "sophia_k=2", NULL});
    for (int k = 0; k < 2; k++) {
        snprintf(b, sizeof b, "%s/sophia-w2-%d", g_dir, k);
        int rc = run_ranks(2, g_cfg, b,
                           (const char *const[]){"optimizer=sophia", "sophia_k=2", "gradient_accumulation_steps=1",
                                                 strategies[k][0], NULL},
                           NULL, &err);
        if (rc) fprintf(stderr, "%s", err);
        assert_int_equal(rc, 0);
        snprintf(line, sizeof line, "[ranks] 2 ranks (mpi, %s)", strategies[k][1]);
        assert_non_null(strstr(err, line));
        assert_non_null(strstr(err, "the optimizer state and update (1/world_size"));
        free(err);
        assert_same_run(a, b, STEPS);
    }
    snprintf(a, sizeof a, "%s/adamw8bit-w1", g_dir);
    const char *const a8[] = {"optimizer=adamw_8bit", "lora_r=32", "lora_alpha=64", NULL};
    run_one_process_once(a, a8);
    for (int k = 0; k < 2; k++) {
        snprintf(b, sizeof b, "%s/adamw8bit-w2-%d", g_dir, k);
        int rc = run_ranks(2, g_cfg, b,
                           (const char *const[]){a8[0], a8[1], a8[2], "gradient_accumulation_steps=1",
                                                 strategies[k][0], NULL},
                           NULL, &err);
        if (rc) fprintf(stderr, "%s", err);
        assert_int_equal(rc, 0);
        assert_non_null(strstr(err, "8-bit blockwise moments (blocksize 256) for 6 of 28 tensors"));
        assert_non_null(strstr(err, "per rank (its shard, on the block grid)"));
        /* the planner's per-rank optimizer state is the state this rank allocated (both printed in MiB, .1f) */
        const char *pm = strstr(err, "+ optimizer "), *po = strstr(err, "fp32 for the rest; state ");
        assert_true(pm && po);
        assert_true(fabs(atof(pm + strlen("+ optimizer ")) - atof(po + strlen("fp32 for the rest; state "))) < 0.05);
        free(err);
        assert_same_run(a, b, STEPS);
    }
}

/* World 3 (oversubscribed on this 2-core machine) against world 1 x
 * accumulation 3: the same global batch, but three fp32 gradients associate
 * as MPI's algorithm chooses (recursive doubling pairs them (g0 + g2) + g1,
 * one process adds (g0 + g1) + g2), so an element may differ by one rounding,
 * |dg| <= 2^-24 (|g0| + |g1| + |g2|). Tolerances, fixed before the first
 * run: the first step's loss is computed before any update and must be equal;
 * AdamW's update lr * m/(sqrt(v) + eps) changes by about the same relative
 * 1e-7 per step, so after 12 steps every train and eval loss within a
 * relative 1e-4 and the final parameters within ||dp||_2 <= 1e-3 ||p||_2 (about
 * 100x the estimate; an element whose gradient is ~0 may flip its update's
 * sign, which the L2 bound absorbs). */
static void world3_compare(const char *a, const char *b);

static void test_world3_close(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], c[256], *err = NULL;
    snprintf(a, sizeof a, "%s/w1-acc3", g_dir);
    snprintf(b, sizeof b, "%s/w3-acc1", g_dir);
    snprintf(c, sizeof c, "%s/w3-sgo", g_dir);
    int rc = e2e_run_trainer(g_cfg, a, (const char *const[]){"gradient_accumulation_steps=3", NULL}, THREADS1, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    rc = run_ranks(3, g_cfg, b, (const char *const[]){"gradient_accumulation_steps=1", NULL}, NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    world3_compare(a, b);
    /* SHARD_GRAD_OP over 3 ranks: 8192 parameters in shards of 2731, the last one padded */
    rc = run_ranks(3, g_cfg, c, (const char *const[]){"gradient_accumulation_steps=1", "fsdp=[shard_grad_op]", NULL},
                   NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    world3_compare(a, c);
    /* FULL_SHARD over 3 ranks: uneven shards of each layer (a padded last one), the held-out batches split
     * 3 ways (a rank without a batch makes the gathers of one) */
    char d[256];
    snprintf(d, sizeof d, "%s/w3-fs", g_dir);
    rc = run_ranks(3, g_cfg, d, (const char *const[]){"gradient_accumulation_steps=1", "fsdp=[full_shard]", NULL},
                   NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    assert_shard_bytes(err, 3);
    free(err);
    world3_compare(a, d);
}

static void world3_compare(const char *a, const char *b) {
    static const char *const keep[] = {"step", "loss", "eval_loss", NULL};
    char *ma = e2e_metrics_canonical(a, keep, NULL), *mb = e2e_metrics_canonical(b, keep, NULL);
    char *sa, *sb, *la = strtok_r(ma, "\n", &sa), *lb = strtok_r(mb, "\n", &sb);
    int lines = 0;
    for (; la && lb; la = strtok_r(NULL, "\n", &sa), lb = strtok_r(NULL, "\n", &sb), lines++) {
        cJSON *ja = cJSON_Parse(la), *jb = cJSON_Parse(lb);
        assert_non_null(ja);
        assert_non_null(jb);
        assert_int_equal(cJSON_GetObjectItem(ja, "step")->valueint, cJSON_GetObjectItem(jb, "step")->valueint);
        const char *key = cJSON_GetObjectItem(ja, "loss") ? "loss" : "eval_loss";
        const double x = cJSON_GetObjectItem(ja, key)->valuedouble, y = cJSON_GetObjectItem(jb, key)->valuedouble;
        const int step = cJSON_GetObjectItem(ja, "step")->valueint;
        if (step <= 1) assert_true(x == y);
        if (!(fabs(x - y) <= 1e-4 * fabs(x))) fail_msg("step %d %s: %.9g vs %.9g", step, key, x, y);
        cJSON_Delete(ja);
        cJSON_Delete(jb);
    }
    assert_null(la);
    assert_null(lb);
    assert_true(lines >= STEPS + 2);
    free(ma);
    free(mb);
    char pa[320], pb[320];
    snprintf(pa, sizeof pa, "%s/checkpoint-%d", a, STEPS);
    snprintf(pb, sizeof pb, "%s/checkpoint-%d", b, STEPS);
    ckpt_state ca, cb;
    qerr e;
    assert_int_equal(ckpt_load(pa, &ca, &e), 0);
    assert_int_equal(ckpt_load(pb, &cb, &e), 0);
    assert_int_equal(ca.n_params, cb.n_params);
    double d2 = 0, p2 = 0;
    for (int64_t i = 0; i < ca.n_params; i++) {
        const double d = (double)ca.params[i] - cb.params[i];
        d2 += d * d;
        p2 += (double)ca.params[i] * ca.params[i];
    }
    print_message("world 3 vs world 1 x acc 3: ||dp|| / ||p|| = %.3g\n", sqrt(d2 / p2));
    assert_true(sqrt(d2) <= 1e-3 * sqrt(p2));
    ckpt_state_free(&ca);
    ckpt_state_free(&cb);
}

static void test_smollm2_bit_identical(void **st) {
    if (skip_without_mpi()) skip();
    char dir[64], cfg[128], a[256], b[256];
    if (e2e_setup(dir, sizeof dir, cfg, sizeof cfg, "qlora-ranks-smol-", 0,
                  "max_steps: 3\nlearning_rate: 2e-3\nseed: 3\nsave_steps: 3\n")) {
        printf("SKIPPED: the real model or data is missing (make model dataset)\n");
        skip();
    }
    snprintf(a, sizeof a, "%s/w1-acc2", dir);
    snprintf(b, sizeof b, "%s/w2-acc1", dir);
    const char *const w1[] = {"micro_batch_size=1", "gradient_accumulation_steps=2", NULL};
    const char *const w2[] = {"micro_batch_size=1", NULL};
    char *err = NULL;
    int rc = e2e_run_trainer(cfg, a, w1, THREADS1, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    rc = run_ranks(2, cfg, b, w2, NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, b, 3);
    /* SHARD_GRAD_OP on the real model: each rank updates half of the adapters */
    char c[256];
    snprintf(c, sizeof c, "%s/w2-sgo", dir);
    rc = run_ranks(2, cfg, c, (const char *const[]){"micro_batch_size=1", "fsdp=[shard_grad_op]", NULL}, NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    free(err);
    assert_same_run(a, c, 3);
    /* FULL_SHARD on the real model: each rank loads, quantizes and keeps half of every layer */
    char d[256];
    snprintf(d, sizeof d, "%s/w2-fs", dir);
    rc = run_ranks(2, cfg, d, (const char *const[]){"micro_batch_size=1", "fsdp=[full_shard]", NULL}, NULL, &err);
    if (rc) fprintf(stderr, "%s", err);
    assert_int_equal(rc, 0);
    assert_shard_bytes(err, 2);
    free(err);
    assert_same_run(a, d, 3);
    tmpdir_remove(dir);
}

static void test_dead_rank(void **st) {
    if (skip_without_mpi()) skip();
    char out[256], *err = NULL;
    snprintf(out, sizeof out, "%s/dead", g_dir);
    const char *const env[] = {"OMP_NUM_THREADS=1", "QLORA_TEST_RANK_FAULT=1:3:kill", NULL};
    const char *const acc1[] = {"gradient_accumulation_steps=1", NULL};
    double t0 = clock_now_sec();
    int rc = run_ranks(2, g_cfg, out, acc1, env, &err);
    double dt = clock_now_sec() - t0;
    if (rc == 0 || !strstr(err, "rank 1")) fprintf(stderr, "exit %d after %.1fs:\n%s", rc, dt, err);
    assert_int_not_equal(rc, 0);
    assert_non_null(strstr(err, "rank 1")); /* mpirun: "process rank 1 with PID ... exited on signal 9 (Killed)" */
    assert_true(dt < 60.0);
    free(err);
}

static void test_hung_rank_times_out(void **st) {
    if (skip_without_mpi()) skip();
    char out[256], *err = NULL;
    snprintf(out, sizeof out, "%s/hung", g_dir);
    const char *const env[] = {"OMP_NUM_THREADS=1", "QLORA_TEST_RANK_FAULT=1:3:hang", NULL};
    const char *const extra[] = {"gradient_accumulation_steps=1", "ddp_timeout=3", NULL};
    double t0 = clock_now_sec();
    int rc = run_ranks(2, g_cfg, out, extra, env, &err);
    double dt = clock_now_sec() - t0;
    const char *want = "qlora-train: rank 0 of 2: all_reduce of";
    if (rc == 0 || !strstr(err, want)) fprintf(stderr, "exit %d after %.1fs:\n%s", rc, dt, err);
    assert_int_not_equal(rc, 0);
    assert_non_null(strstr(err, want));
    assert_non_null(strstr(err, "did not complete within ddp_timeout 3 s"));
    assert_true(dt < 60.0);
    free(err);
}

static void test_ranks_disagree(void **st) {
    if (skip_without_mpi()) skip();
    char out[256], od[300], *err = NULL;
    snprintf(out, sizeof out, "%s/disagree", g_dir);
    snprintf(od, sizeof od, "output_dir=%s", out);
    /* an MPMD launch: rank 0 and rank 1 get different command lines */
    char *prog[] = {(char *)subproc_trainer(), g_cfg, od, NULL};
    char **mv;
    qerr e;
    assert_int_equal(comm_mpirun_argv(1, prog, &mv, &e), 0);
    char *argv[32];
    int n = 0;
    for (; mv[n]; n++) argv[n] = mv[n];
    assert_string_equal(argv[n - 3], prog[0]);
    { /* append ": -np 1 trainer cfg od seed=6" */
        argv[n++] = ":";
        argv[n++] = "-np";
        argv[n++] = "1";
        argv[n++] = prog[0];
        argv[n++] = g_cfg;
        argv[n++] = od;
        argv[n++] = "seed=6";
    }
    argv[n] = NULL;
    int rc = mpi_launch_argv(argv, THREADS1, 600, &err);
    free(mv);
    if (rc == 0 || !strstr(err, "rank 1 of 2 has another config")) fprintf(stderr, "exit %d:\n%s", rc, err);
    assert_int_not_equal(rc, 0);
    assert_non_null(strstr(err, "rank 1 of 2 has another config (file and overrides) than rank 0"));
    free(err);
}

int main(void) {
    if (getenv("QLORA_TEST_FILTER")) cmocka_set_test_filter(getenv("QLORA_TEST_FILTER")); /* e.g. "test_sharded*" */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_bit_identical),
        cmocka_unit_test(test_sigterm_and_resume),
        cmocka_unit_test(test_tcp_transport),
        cmocka_unit_test(test_resume_other_world_size),
        cmocka_unit_test(test_sophia_bit_identical),
        cmocka_unit_test(test_shard_grad_op),
        cmocka_unit_test(test_sharded_optimizers),
        cmocka_unit_test(test_full_shard),
        cmocka_unit_test(test_world3_close),
        cmocka_unit_test(test_dead_rank),
        cmocka_unit_test(test_hung_rank_times_out),
        cmocka_unit_test(test_ranks_disagree),
        cmocka_unit_test(test_smollm2_bit_identical),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
