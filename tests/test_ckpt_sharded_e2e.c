/* tests/test_ckpt_sharded_e2e.c — sharded checkpoints (fsdp_state_dict_type: SHARDED_STATE_DICT,
 * trainer/checkpoint.h ckpt_save_sharded) that resume at any world size, on the tiny random model
 * (tests/tiny_model.h), 2 ranks x OMP_NUM_THREADS=1 under mpirun.
 *
 * The rule for bit identity: world x gradient_accumulation_steps constant keeps the global batch and
 * (with two terms per sum, a + b whatever the order) every bit, so world 2 x acc 1 = world 1 x acc 2.
 *  1. Layout: SHARD_GRAD_OP writes checkpoint-N/ with run_state.h5, index.json, one shard file per
 *     rank and COMPLETE listing them (no state.h5); NO_SHARD with SHARDED_STATE_DICT the same; the
 *     run equals world 1 x acc 2 bit for bit (metrics, adapter bytes, parameters and AdamW moments
 *     read back from the shards); FULL_STATE_DICT under SHARD_GRAD_OP writes one state.h5.
 *  2. Resume 2 -> 1 (a sharded checkpoint continued by one process, acc 2) and 1 -> 2 (a one-process
 *     state.h5 continued by 2 SHARD_GRAD_OP ranks, which then save sharded): the same bits.
 *  3. SIGKILL of one rank at each stage of a sharded save (rank 1 before its file, mid-file, after
 *     fsync before the barrier, after the barrier; rank 0 after the rename before COMPLETE, after
 *     COMPLETE before rotation): the job ends non-zero within 60 s naming the killed rank; the same
 *     command resumes from the newest complete checkpoint and ends at the uninterrupted run's
 *     adapter bit for bit, with save_total_limit's two checkpoints left.
 *  4. 2 -> 3 and 3 -> 2: world 2 x acc 3 and world 3 x acc 2 have the same global batch of 6 rows,
 *     but three ranks' sums associate differently, so within test_ranks_e2e's world-3 tolerance
 *     (the reasoning is written there and at world3_close below).
 *  5. qlora-export --consolidate: the sharded checkpoint as one state.h5 with the same arrays, which
 *     one process resumes to the same bits; an existing OUT is refused.
 *  6. A corrupted or missing shard file: resume_from_checkpoint is refused with one line naming it.
 *  Also SophiaG (NO_SHARD + SHARDED_STATE_DICT): m and h sharded, the same bits, resumed 2 -> 1.
 *  8. SophiaG and 8-bit AdamW with their state sharded (SHARD_GRAD_OP / FULL_SHARD): world 2 writes
 *     shard files; 2 -> 1, 1 -> 2 bit for bit; adamw_8bit also 2 -> 3 (absmax read back by block) within
 *     the world-3 tolerance, and its consolidated checkpoint equal to one process's.
 *  7. The loss watchdog's streak (trainer_state loss_watchdog_streak) survives a SIGTERM and resume: the
 *     resumed run stops at the uninterrupted run's step with the same state (one process, then 2 ranks).
 * Without MPI or mpirun every case prints "SKIPPED: <why>" and is skipped (7's one-process half runs).
 */
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
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "core/clock.h"
#include "core/file.h"
#include "tests/e2e_run.h"
#include "tests/mpi_launch.h"
#include "tests/subproc.h"
#include "tests/tiny_model.h"
#include "tests/tmpdir.h"
#include "trainer/checkpoint.h"

#define STEPS 12

static char g_dir[64], g_cfg[128];
static const char *const THREADS1[] = {"OMP_NUM_THREADS=1", NULL};
static const char *const SGO2[] = {"gradient_accumulation_steps=1", "fsdp=[shard_grad_op]", NULL};
static const char *const SGO2_LIMIT[] = {"gradient_accumulation_steps=1", "fsdp=[shard_grad_op]", "save_total_limit=2",
                                         NULL};

static int skip_without_mpi(void) { return mpi_launch_skip(); }

static int setup(void **st) {
    if (tmpdir_setup(st, "qlora-ckshard-")) return -1;
    snprintf(g_dir, sizeof g_dir, "%s", ((const tmpdir *)*st)->dir);
    char tail[512];
    snprintf(tail, sizeof tail,
             "val_set_size: 6\nsequence_len: 32\nsample_packing: true\nmicro_batch_size: 1\ngradient_accumulation_steps: 2\n"
             "max_steps: %d\nlearning_rate: 1e-2\nwarmup_steps: 2\nlr_scheduler: cosine\nweight_decay: 0.01\neval_steps: 6\n"
             "save_steps: 3\nseed: 5\nnum_threads: 1\n",
             STEPS);
    return tiny_world_write(g_dir, 11, 60, 16, 7, 7, tail, g_cfg, sizeof g_cfg);
}

static int teardown(void **st) { return tmpdir_teardown(st); }

static int run_ranks(int np, const char *out, const char *const *extra, const char *const *env, char **err) {
    return mpi_launch_trainer(np, g_cfg, out, extra, env, err);
}

static void must(int rc, char *err) {
    if (rc) fprintf(stderr, "exit %d:\n%s", rc, err ? err : "");
    assert_int_equal(rc, 0);
    free(err);
}

static void path_of(char *buf, size_t n, const char *a, const char *b) { snprintf(buf, n, "%s/%s", a, b); }

static int exists(const char *dir, const char *name) {
    char p[600];
    path_of(p, sizeof p, dir, name);
    return access(p, F_OK) == 0;
}

static const char *const KEEP[] = {"step", "loss", "lr", "grad_norm", "epoch", "eval_loss", "eval_tokens", NULL};

/* The whole state of two checkpoints, bit for bit (either layout). */
static void assert_same_state(const char *pa, const char *pb) {
    ckpt_state sa, sb;
    qerr e;
    if (ckpt_load(pa, &sa, &e)) fail_msg("%s", e.msg);
    if (ckpt_load(pb, &sb, &e)) fail_msg("%s", e.msg);
    assert_int_equal(sa.step, sb.step);
    assert_int_equal(sa.n_params, sb.n_params);
    assert_int_equal(sa.opt_step, sb.opt_step);
    assert_int_equal(sa.rows_consumed, sb.rows_consumed);
    assert_true(sa.opt_lo == 0 && sa.opt_hi == sa.n_params && sb.opt_lo == 0 && sb.opt_hi == sb.n_params);
    assert_string_equal(sa.optimizer, sb.optimizer);
    const size_t n = (size_t)sa.n_params * sizeof(float);
    assert_memory_equal(sa.params, sb.params, n);
    if (!strcmp(sa.optimizer, "adamw_8bit")) { /* codes, absmax per block, the fp32 moments of the small tensors */
        assert_true(sa.n_blocks > 0 && sa.n_blocks == sb.n_blocks && sa.n32 == sb.n32);
        assert_true(sa.blk_lo == 0 && sa.blk_hi == sa.n_blocks && sb.n32_lo == 0 && sb.n32_hi == sb.n32);
        assert_memory_equal(sa.state1, sb.state1, (size_t)sa.n_params);
        assert_memory_equal(sa.state2, sb.state2, (size_t)sa.n_params);
        assert_memory_equal(sa.absmax1, sb.absmax1, (size_t)sa.n_blocks * sizeof(float));
        assert_memory_equal(sa.absmax2, sb.absmax2, (size_t)sa.n_blocks * sizeof(float));
        assert_memory_equal(sa.exp_avg, sb.exp_avg, (size_t)sa.n32 * sizeof(float));
        assert_memory_equal(sa.exp_avg_sq, sb.exp_avg_sq, (size_t)sa.n32 * sizeof(float));
    } else {
        assert_memory_equal(sa.exp_avg, sb.exp_avg, n);
        assert_true(!sa.hessian == !sb.hessian && !sa.exp_avg_sq == !sb.exp_avg_sq);
        if (sa.hessian) assert_memory_equal(sa.hessian, sb.hessian, n);
        if (sa.exp_avg_sq) assert_memory_equal(sa.exp_avg_sq, sb.exp_avg_sq, n);
    }
    ckpt_state_free(&sa);
    ckpt_state_free(&sb);
}

/* a and b (output dirs): the same metrics, adapter bytes and final state. */
static void assert_same_run(const char *a, const char *b) {
    char *ma = e2e_metrics_canonical(a, KEEP, NULL), *mb = e2e_metrics_canonical(b, KEEP, NULL);
    if (strcmp(ma, mb)) fprintf(stderr, "metrics differ:\n--- %s\n%s--- %s\n%s", a, ma, b, mb);
    assert_string_equal(ma, mb);
    free(ma);
    free(mb);
    char pa[512], pb[512];
    path_of(pa, sizeof pa, a, "adapter_model.safetensors");
    path_of(pb, sizeof pb, b, "adapter_model.safetensors");
    e2e_assert_same_file(pa, pb);
    snprintf(pa, sizeof pa, "%s/checkpoint-%d", a, STEPS);
    snprintf(pb, sizeof pb, "%s/checkpoint-%d", b, STEPS);
    assert_same_state(pa, pb);
}

static void assert_sharded_layout(const char *ck, int world) {
    assert_true(exists(ck, CKPT_RUN_STATE_FILE) && exists(ck, CKPT_INDEX_FILE) && exists(ck, CKPT_MARKER));
    assert_false(exists(ck, CKPT_STATE_FILE));
    for (int r = 0; r < world; r++) {
        char fn[64];
        snprintf(fn, sizeof fn, "shard-%05d-of-%05d.h5", r, world);
        assert_true(exists(ck, fn));
    }
    char fn[64];
    snprintf(fn, sizeof fn, "shard-%05d-of-%05d.h5", world, world);
    assert_false(exists(ck, fn));
}

static void copy_ckpt(const char *src_run, int step, const char *dst) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s' && cp -r '%s/checkpoint-%d' '%s/'", dst, dst, src_run,
             step, dst);
    assert_int_equal(system(cmd), 0);
}

/* 1. the reference runs and the layout */
static void test_layout_and_bits(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], c[256], d[256], ck[320], *err = NULL;
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(b, sizeof b, "%s/w2-sgo", g_dir);
    snprintf(c, sizeof c, "%s/w2-noshard-sharded", g_dir);
    snprintf(d, sizeof d, "%s/w2-sgo-full", g_dir);
    must(e2e_run_trainer(g_cfg, a, NULL, THREADS1, &err), err);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", a, STEPS);
    assert_true(exists(ck, CKPT_STATE_FILE) && !exists(ck, CKPT_INDEX_FILE)); /* one process: one state.h5 */
    must(run_ranks(2, b, SGO2, NULL, &err), err);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", b, STEPS);
    assert_sharded_layout(ck, 2);
    assert_same_run(a, b);
    /* NO_SHARD with SHARDED_STATE_DICT: each rank writes its half of the replicated state */
    must(run_ranks(2, c,
                   (const char *const[]){"gradient_accumulation_steps=1",
                                         "fsdp_config={fsdp_sharding_strategy: NO_SHARD, fsdp_state_dict_type: "
                                         "SHARDED_STATE_DICT}", NULL},
                   NULL, &err),
         err);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", c, STEPS);
    assert_sharded_layout(ck, 2);
    assert_same_run(a, c);
    /* FULL_STATE_DICT under SHARD_GRAD_OP: rank 0 gathers and writes one state.h5, as before */
    must(run_ranks(2, d,
                   (const char *const[]){"gradient_accumulation_steps=1",
                                         "fsdp_config={fsdp_sharding_strategy: SHARD_GRAD_OP, fsdp_state_dict_type: "
                                         "FULL_STATE_DICT}", NULL},
                   NULL, &err),
         err);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", d, STEPS);
    assert_true(exists(ck, CKPT_STATE_FILE) && !exists(ck, CKPT_INDEX_FILE));
    assert_same_run(a, d);
}

/* 2. 2 -> 1 and 1 -> 2 */
static void test_resume_2to1_1to2(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], x[256], y[256], *err = NULL;
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(b, sizeof b, "%s/w2-sgo", g_dir);
    snprintf(x, sizeof x, "%s/2to1", g_dir);
    snprintf(y, sizeof y, "%s/1to2", g_dir);
    copy_ckpt(b, 6, x);
    int rc = e2e_run_trainer(g_cfg, x, NULL, THREADS1, &err);
    if (!rc) assert_non_null(strstr(err, "[checkpoint] resuming from"));
    must(rc, err);
    assert_same_run(a, x);
    copy_ckpt(a, 6, y);
    rc = run_ranks(2, y, SGO2, NULL, &err);
    if (!rc) assert_non_null(strstr(err, "[checkpoint] resuming from"));
    must(rc, err);
    char ck[320];
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", y, STEPS);
    assert_sharded_layout(ck, 2);
    assert_same_run(a, y);
}

/* 3. SIGKILL of one rank at each stage of the save of step 9 */
static void test_kill_each_stage(void **st) {
    if (skip_without_mpi()) skip();
    static const struct {
        const char *stage;
        int rank, resumes_from;
    } cases[] = {{"shard_begin", 1, 6}, {"shard_mid", 1, 6}, {"shard_synced", 1, 6},
                 {"barrier", 1, -1}, {"marker", 0, 6}, {"committed", 0, 9}};
    char ref[256];
    snprintf(ref, sizeof ref, "%s/w2-sgo", g_dir);
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        char out[256], at[64], rk[64], want[64], *err = NULL;
        snprintf(out, sizeof out, "%s/kill-%s", g_dir, cases[k].stage);
        snprintf(at, sizeof at, "QLORA_TEST_CRASH_AT=%s", cases[k].stage);
        snprintf(rk, sizeof rk, "QLORA_TEST_CRASH_RANK=%d", cases[k].rank);
        const char *const env[] = {"OMP_NUM_THREADS=1", at, rk, "QLORA_TEST_CRASH_STEP=9", NULL};
        double t0 = clock_now_sec();
        int rc = run_ranks(2, out, SGO2_LIMIT, env, &err);
        double dt = clock_now_sec() - t0;
        snprintf(want, sizeof want, "rank %d", cases[k].rank);
        if (rc == 0 || !strstr(err, want)) fprintf(stderr, "%s: exit %d after %.1fs:\n%s", cases[k].stage, rc, dt, err);
        assert_int_not_equal(rc, 0);
        assert_non_null(strstr(err, want)); /* mpirun: "process rank R ... exited on signal 9" */
        assert_true(dt < 60.0);
        free(err);
        /* after the barrier rank 0 may finish the commit before the job is ended: 6 or 9 */
        rc = run_ranks(2, out, SGO2_LIMIT, NULL, &err);
        if (rc) fprintf(stderr, "%s: resume exit %d:\n%s", cases[k].stage, rc, err);
        assert_int_equal(rc, 0);
        char from[64];
        int f = cases[k].resumes_from;
        snprintf(from, sizeof from, "checkpoint-%d: step %d", f, f);
        if (f > 0 && !strstr(err, from)) fprintf(stderr, "%s: expected to resume from %s:\n%s", cases[k].stage, from, err);
        assert_true(f < 0 ? strstr(err, "[checkpoint] resuming from") != NULL : strstr(err, from) != NULL);
        free(err);
        print_message("kill rank %d at %s: job ended in %.1fs; resumed\n", cases[k].rank, cases[k].stage, dt);
        assert_same_run(ref, out);
        /* save_total_limit 2: the newest two, both complete */
        ckpt_entry *v;
        int n;
        qerr e;
        assert_int_equal(ckpt_list(out, &v, &n, &e), 0);
        assert_int_equal(n, 2);
        assert_true(v[0].complete && v[1].complete && v[0].step == STEPS && v[1].step == 9);
        free(v);
    }
}

/* Within the world-3 tolerance of tests/test_ranks_e2e.c test_world3_close: three fp32 gradients
 * associate as MPI chooses, an element may differ by one rounding per step; the first step's loss is
 * exact only when no resume came before it, so: every loss within 1e-4 relative and the final
 * parameters within ||dp||_2 <= 1e-3 ||p||_2. */
static void world3_close(const char *a, const char *b) {
    static const char *const keep[] = {"step", "loss", "eval_loss", NULL};
    char *ma = e2e_metrics_canonical(a, keep, NULL), *mb = e2e_metrics_canonical(b, keep, NULL);
    char *sa, *sb, *la = strtok_r(ma, "\n", &sa), *lb = strtok_r(mb, "\n", &sb);
    int lines = 0;
    for (; la && lb; la = strtok_r(NULL, "\n", &sa), lb = strtok_r(NULL, "\n", &sb), lines++) {
        cJSON *ja = cJSON_Parse(la), *jb = cJSON_Parse(lb);
        assert_true(ja && jb);
        const char *key = cJSON_GetObjectItem(ja, "loss") ? "loss" : "eval_loss";
        const double x = cJSON_GetObjectItem(ja, key)->valuedouble, y = cJSON_GetObjectItem(jb, key)->valuedouble;
        if (!(fabs(x - y) <= 1e-4 * fabs(x))) fail_msg("%s: %.9g vs %.9g", la, x, y);
        cJSON_Delete(ja);
        cJSON_Delete(jb);
    }
    assert_null(la);
    assert_null(lb);
    assert_true(lines >= STEPS);
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
    print_message("%s vs %s: ||dp|| / ||p|| = %.3g\n", a, b, sqrt(d2 / p2));
    assert_true(sqrt(d2) <= 1e-3 * sqrt(p2));
    ckpt_state_free(&ca);
    ckpt_state_free(&cb);
}

/* 4. 2 -> 3 and 3 -> 2 at a constant global batch of 6 rows */
static void test_resume_2to3_3to2(void **st) {
    if (skip_without_mpi()) skip();
    char r[256], x[256], y[256], ck[320], *err = NULL;
    snprintf(r, sizeof r, "%s/w2-acc3", g_dir);
    snprintf(x, sizeof x, "%s/2to3", g_dir);
    snprintf(y, sizeof y, "%s/3to2", g_dir);
    const char *const w2[] = {"gradient_accumulation_steps=3", "fsdp=[shard_grad_op]", NULL};
    const char *const w3[] = {"gradient_accumulation_steps=2", "fsdp=[shard_grad_op]", NULL};
    must(run_ranks(2, r, w2, NULL, &err), err);
    copy_ckpt(r, 6, x);
    must(run_ranks(3, x, w3, NULL, &err), err);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", x, STEPS);
    assert_sharded_layout(ck, 3);
    world3_close(r, x);
    /* the world-3 run's checkpoint-9 (3 shards of 2731, the last one short) continued by 2 ranks */
    copy_ckpt(x, 9, y);
    must(run_ranks(2, y, w2, NULL, &err), err);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", y, STEPS);
    assert_sharded_layout(ck, 2);
    world3_close(r, y);
}

/* SophiaG under NO_SHARD with SHARDED_STATE_DICT: m and h in the shard files; world 2 x acc 1 =
 * world 1 x acc 2, and the world-2 run's sharded checkpoint-6 continued by one process. */
static void test_sophia_sharded(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], b[256], x[256], ck[320], *err = NULL;
    snprintf(a, sizeof a, "%s/sophia-w1", g_dir);
    snprintf(b, sizeof b, "%s/sophia-w2", g_dir);
    snprintf(x, sizeof x, "%s/sophia-2to1", g_dir);
    const char *const sophia[] = {"optimizer=sophia", "sophia_k=2", NULL};
    must(e2e_run_trainer(g_cfg, a, sophia, THREADS1, &err), err);
    must(run_ranks(2, b,
                   (const char *const[]){"optimizer=sophia", "sophia_k=2", "gradient_accumulation_steps=1",
                                         "fsdp_config={fsdp_state_dict_type: SHARDED_STATE_DICT}", NULL},
                   NULL, &err),
         err);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", b, STEPS);
    assert_sharded_layout(ck, 2);
    ckpt_state sa, sb;
    qerr e;
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", a, STEPS);
    assert_int_equal(ckpt_load(ck, &sa, &e), 0);
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", b, STEPS);
    assert_int_equal(ckpt_load(ck, &sb, &e), 0);
    assert_string_equal(sb.optimizer, "sophia");
    assert_int_equal(sa.hessian_updates, sb.hessian_updates);
    assert_true(sa.hessian && sb.hessian && !sb.exp_avg_sq);
    assert_memory_equal(sa.params, sb.params, (size_t)sa.n_params * sizeof(float));
    assert_memory_equal(sa.exp_avg, sb.exp_avg, (size_t)sa.n_params * sizeof(float));
    assert_memory_equal(sa.hessian, sb.hessian, (size_t)sa.n_params * sizeof(float));
    ckpt_state_free(&sa);
    ckpt_state_free(&sb);
    copy_ckpt(b, 6, x);
    must(e2e_run_trainer(g_cfg, x, sophia, THREADS1, &err), err);
    char pa[320], pb[320];
    path_of(pa, sizeof pa, a, "adapter_model.safetensors");
    path_of(pb, sizeof pb, x, "adapter_model.safetensors");
    e2e_assert_same_file(pa, pb);
}

/* 8. The optimizer state sharded with the update (SHARD_GRAD_OP / FULL_SHARD) for SophiaG (m, h) and
 * bitsandbytes' 8-bit AdamW (lora_r 32 on q, gate, up, down: codes state1/state2 by element,
 * absmax1/absmax2 by block, the fp32 moments of the 2048-element tensors; each rank's interval on the
 * 256-element block grid):
 * world 2 writes one shard file per rank; 2 -> 1 and 1 -> 2 end with world 1 x acc 2's bits; for
 * adamw_8bit also 2 -> 3 (three shards cut off the plain n/3 boundaries, read back by block) within the
 * world-3 tolerance, and --consolidate gives world 1's checkpoint-6 bit for bit. */
static void test_sharded_optimizers(void **st) {
    if (skip_without_mpi()) skip();
    static const char *const opt[2][7] = {
        {"sophia", "optimizer=sophia", "sophia_k=2", "lora_r=4", "lora_alpha=8", "lora_dropout=0.1", "fsdp=[shard_grad_op]"},
        {"adamw8bit", "optimizer=adamw_8bit", "lora_r=32", "lora_target_linear=false",
         "lora_target_modules=[q_proj,gate_proj,up_proj,down_proj]", "lora_alpha=64", "fsdp=[full_shard]"}};
    for (int o = 0; o < 2; o++) {
        char a[256], b[256], x[256], y[256], ck[320], ck2[320], *err = NULL;
        snprintf(a, sizeof a, "%s/%s-opt-w1", g_dir, opt[o][0]);
        snprintf(b, sizeof b, "%s/%s-opt-w2", g_dir, opt[o][0]);
        snprintf(x, sizeof x, "%s/%s-opt-2to1", g_dir, opt[o][0]);
        snprintf(y, sizeof y, "%s/%s-opt-1to2", g_dir, opt[o][0]);
        const char *const one[] = {opt[o][1], opt[o][2], opt[o][3], opt[o][4], opt[o][5], NULL};
        const char *const two[] = {opt[o][1], opt[o][2], opt[o][3], opt[o][4], opt[o][5], opt[o][6],
                                   "gradient_accumulation_steps=1", NULL};
        must(e2e_run_trainer(g_cfg, a, one, THREADS1, &err), err);
        must(run_ranks(2, b, two, NULL, &err), err);
        snprintf(ck, sizeof ck, "%s/checkpoint-%d", b, STEPS);
        assert_sharded_layout(ck, 2);
        assert_same_run(a, b);
        copy_ckpt(b, 6, x);
        must(e2e_run_trainer(g_cfg, x, one, THREADS1, &err), err);
        assert_same_run(a, x);
        copy_ckpt(a, 6, y);
        must(run_ranks(2, y, two, NULL, &err), err);
        assert_same_run(a, y);
        if (o == 0) continue;
        /* consolidated: world 1's checkpoint-6 */
        snprintf(ck, sizeof ck, "%s/checkpoint-6", b);
        snprintf(ck2, sizeof ck2, "%s/%s-consolidated-6", g_dir, opt[o][0]);
        char *argv[] = {(char *)subproc_tool("export"), "--consolidate", ck, ck2, NULL};
        must(subproc_run(argv, THREADS1, 60, &err), err);
        assert_true(exists(ck2, CKPT_STATE_FILE));
        snprintf(ck, sizeof ck, "%s/checkpoint-6", a);
        assert_same_state(ck, ck2);
        /* 2 -> 3 at a global batch of 6 rows */
        char r[256], z[256];
        snprintf(r, sizeof r, "%s/%s-opt-w2-acc3", g_dir, opt[o][0]);
        snprintf(z, sizeof z, "%s/%s-opt-2to3", g_dir, opt[o][0]);
        must(run_ranks(2, r, (const char *const[]){opt[o][1], opt[o][2], opt[o][3], opt[o][4], opt[o][5], opt[o][6],
                                                   "gradient_accumulation_steps=3", NULL},
                       NULL, &err),
             err);
        copy_ckpt(r, 6, z);
        must(run_ranks(3, z, (const char *const[]){opt[o][1], opt[o][2], opt[o][3], opt[o][4], opt[o][5], opt[o][6],
                                                   "gradient_accumulation_steps=2", NULL},
                       NULL, &err),
             err);
        snprintf(ck, sizeof ck, "%s/checkpoint-%d", z, STEPS);
        assert_sharded_layout(ck, 3);
        /* 45056 parameters (22528 a layer: q 2048 + 2048, gate 2048 + 4096, up 2048 + 4096, down 4096 +
         * 2048, lora_A then lora_B, the 4096-element ones 8-bit): the plain cuts 15019 and 30038 fall
         * inside up_proj.lora_B of layer 0 (from 12288) and gate_proj.lora_B of layer 1 (from 22528 +
         * 6144), 171 and 86 elements past a block start: on the grid they are 15104 and 30208 */
        char ip[400];
        snprintf(ip, sizeof ip, "%s/%s", ck, CKPT_INDEX_FILE);
        char *idx = file_read_all(ip, NULL, NULL);
        assert_non_null(idx);
        cJSON *j = cJSON_Parse(idx), *pc = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "tensors"), "lora/params");
        assert_int_equal(cJSON_GetArraySize(pc), 3);
        assert_int_equal((int64_t)cJSON_GetObjectItem(cJSON_GetArrayItem(pc, 1), "offset")->valuedouble, 15104);
        assert_int_equal((int64_t)cJSON_GetObjectItem(cJSON_GetArrayItem(pc, 2), "offset")->valuedouble, 30208);
        assert_non_null(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "tensors"), "optimizer/absmax1"));
        cJSON_Delete(j);
        free(idx);
        world3_close(r, z);
    }
}

/* 5. consolidate */
static void test_consolidate(void **st) {
    if (skip_without_mpi()) skip();
    char a[256], src[320], out[256], ck[320], ov[400], *err = NULL;
    snprintf(a, sizeof a, "%s/w1-acc2", g_dir);
    snprintf(src, sizeof src, "%s/w2-sgo/checkpoint-6", g_dir);
    snprintf(ck, sizeof ck, "%s/consolidated-6", g_dir);
    char *argv[] = {(char *)subproc_tool("export"), "--consolidate", src, ck, NULL};
    must(subproc_run(argv, THREADS1, 60, &err), err);
    assert_true(exists(ck, CKPT_STATE_FILE) && exists(ck, CKPT_MARKER) && exists(ck, "adapter_model.safetensors"));
    assert_false(exists(ck, CKPT_INDEX_FILE));
    assert_same_state(src, ck);
    /* an existing OUT is refused */
    assert_int_equal(subproc_run(argv, THREADS1, 60, &err), 1);
    assert_non_null(strstr(err, "already exists"));
    free(err);
    /* one process resumes it to the same bits */
    snprintf(out, sizeof out, "%s/from-consolidated", g_dir);
    snprintf(ov, sizeof ov, "resume_from_checkpoint=%s", ck);
    must(e2e_run_trainer(g_cfg, out, (const char *const[]){ov, NULL}, THREADS1, &err), err);
    assert_same_run(a, out);
}

/* 6. a corrupted or missing shard file */
static void test_bad_shard_refused(void **st) {
    if (skip_without_mpi()) skip();
    char src[256], ck[320], ov[400], out[256], p[400], *err = NULL;
    snprintf(src, sizeof src, "%s/w2-sgo", g_dir);
    snprintf(out, sizeof out, "%s/bad-shard", g_dir);
    for (int k = 0; k < 2; k++) {
        copy_ckpt(src, STEPS, out);
        snprintf(ck, sizeof ck, "%s/checkpoint-%d", out, STEPS);
        snprintf(p, sizeof p, "%s/shard-00001-of-00002.h5", ck);
        if (k == 0) {
            FILE *f = fopen(p, "r+b");
            assert_non_null(f);
            fseek(f, 3000, SEEK_SET);
            int c = fgetc(f);
            fseek(f, 3000, SEEK_SET);
            fputc(c ^ 0x5a, f);
            fclose(f);
        } else {
            assert_int_equal(unlink(p), 0);
        }
        snprintf(ov, sizeof ov, "resume_from_checkpoint=%s", ck);
        int rc = e2e_run_trainer(g_cfg, out, (const char *const[]){ov, NULL}, THREADS1, &err);
        const char *want = k == 0 ? "shard-00001-of-00002.h5 is corrupt" : "shard-00001-of-00002.h5";
        if (rc == 0 || !strstr(err, want)) fprintf(stderr, "exit %d:\n%s", rc, err);
        assert_int_not_equal(rc, 0);
        const char *line = strstr(err, want);
        assert_non_null(line);
        while (line > err && line[-1] != '\n') line--;
        print_message("refused: %.*s\n", (int)(strchr(line, '\n') ? strchr(line, '\n') - line : (long)strlen(line)), line);
        free(err);
    }
}

/* loss_watchdog_* across a resume (trainer_state loss_watchdog_streak): threshold 0.001 (the loss stays
 * above it), patience 4, save_steps 2. The uninterrupted run stops at step 4 with checkpoint-4; the same run
 * stopped by SIGTERM after step 3 (checkpoint-3, streak 3) and re-run must stop at step 4 too, with the same
 * metrics and checkpoint-4 (a streak restarted at 0 ran on to step 7). One process (state.h5), then two
 * SHARD_GRAD_OP ranks (run_state.h5 of the sharded layout). */
static const char *const WATCHDOG[] = {"loss_watchdog_threshold=0.001", "loss_watchdog_patience=4", "save_steps=2",
                                       NULL};

/* The watchdog run into out on np ranks (2: SHARD_GRAD_OP); stop3: rank 0 pauses at the start of step 3 and
 * the trainer (np 1) or mpirun (np 2) gets SIGTERM then. Exit code; stderr into *err. */
static int watchdog_run(int np, const char *out, int stop3, char **err) {
    char od[300];
    snprintf(od, sizeof od, "output_dir=%s", out);
    char *prog[16];
    int n = 0;
    prog[n++] = (char *)subproc_trainer();
    prog[n++] = g_cfg;
    prog[n++] = od;
    for (int i = 0; WATCHDOG[i]; i++) prog[n++] = (char *)WATCHDOG[i];
    for (int i = 0; np > 1 && SGO2[i]; i++) prog[n++] = (char *)SGO2[i];
    prog[n] = NULL;
    const char *const env[] = {"OMP_NUM_THREADS=1", stop3 ? "QLORA_TEST_RANK_FAULT=0:3:pause" : NULL, NULL};
    subproc p;
    assert_int_equal(np > 1 ? mpi_launch_start(&p, np, prog, env) : subproc_start(&p, prog, env), 0);
    double t0 = clock_now_sec();
    if (stop3) {
        /* after checkpoint-2 is saved, inside rank 0's 5 s pause at the start of step 3 */
        while (!subproc_poll(&p, 100) && !strstr(p.err ? p.err : "", "/checkpoint-2 (") && clock_now_sec() - t0 < 120) {
        }
        assert_non_null(strstr(p.err ? p.err : "", "/checkpoint-2 ("));
        subproc_poll(&p, 1000);
        kill(p.pid, SIGTERM);
    }
    subproc_wait(&p, 300);
    int rc = subproc_exit_code(&p);
    *err = strdup(p.err ? p.err : "");
    subproc_free(&p);
    return rc;
}

static int64_t watchdog_streak_of(const char *run, int step) {
    char ck[320];
    snprintf(ck, sizeof ck, "%s/checkpoint-%d", run, step);
    ckpt_state s;
    qerr e;
    if (ckpt_load(ck, &s, &e)) fail_msg("%s", e.msg);
    int64_t v = s.loss_watchdog_streak;
    ckpt_state_free(&s);
    return v;
}

static void watchdog_case(int np) {
    char ref[256], out[256], pa[320], pb[320], *err = NULL;
    snprintf(ref, sizeof ref, "%s/watchdog-w%d", g_dir, np);
    snprintf(out, sizeof out, "%s/watchdog-w%d-resumed", g_dir, np);
    int rc = watchdog_run(np, ref, 0, &err);
    if (rc != 1) fprintf(stderr, "exit %d:\n%s", rc, err);
    assert_int_equal(rc, 1);
    assert_non_null(strstr(err, "step 4: the training loss stayed above loss_watchdog_threshold"));
    free(err);
    assert_true(exists(ref, "checkpoint-4") && !exists(ref, "checkpoint-5"));
    rc = watchdog_run(np, out, 1, &err);
    if (rc != 143 && np == 1) fprintf(stderr, "exit %d:\n%s", rc, err);
    if (np == 1) assert_int_equal(rc, 143);
    else assert_int_not_equal(rc, 0);
    free(err);
    assert_true(exists(out, "checkpoint-3/" CKPT_MARKER) && !exists(out, "checkpoint-4"));
    snprintf(pa, sizeof pa, "%s/checkpoint-3", out);
    if (np > 1) assert_sharded_layout(pa, 2);
    else assert_true(exists(pa, CKPT_STATE_FILE));
    rc = watchdog_run(np, out, 0, &err);
    if (rc != 1 || !strstr(err, "[checkpoint] resuming from")) fprintf(stderr, "exit %d:\n%s", rc, err);
    assert_int_equal(rc, 1);
    assert_non_null(strstr(err, "[checkpoint] resuming from"));
    assert_non_null(strstr(err, "step 4: the training loss stayed above loss_watchdog_threshold"));
    free(err);
    assert_true(exists(out, "checkpoint-4") && !exists(out, "checkpoint-5"));
    char *ma = e2e_metrics_canonical(ref, KEEP, NULL), *mb = e2e_metrics_canonical(out, KEEP, NULL);
    if (strcmp(ma, mb)) fprintf(stderr, "metrics differ:\n--- %s\n%s--- %s\n%s", ref, ma, out, mb);
    assert_string_equal(ma, mb);
    free(ma);
    free(mb);
    snprintf(pa, sizeof pa, "%s/checkpoint-4", ref);
    snprintf(pb, sizeof pb, "%s/checkpoint-4", out);
    assert_same_state(pa, pb);
    assert_int_equal(watchdog_streak_of(ref, 4), 4);
    assert_int_equal(watchdog_streak_of(out, 4), 4);
    assert_int_equal(watchdog_streak_of(out, 3), 3);
}

static void test_watchdog_streak_resumes(void **st) {
    (void)st;
    watchdog_case(1);
    if (skip_without_mpi()) skip();
    watchdog_case(2);
}

int main(void) {
    if (getenv("QLORA_TEST_FILTER")) cmocka_set_test_filter(getenv("QLORA_TEST_FILTER")); /* e.g. "test_sharded*" */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_and_bits),       cmocka_unit_test(test_resume_2to1_1to2),
        cmocka_unit_test(test_kill_each_stage),       cmocka_unit_test(test_resume_2to3_3to2),
        cmocka_unit_test(test_sophia_sharded),        cmocka_unit_test(test_consolidate),
        cmocka_unit_test(test_bad_shard_refused),     cmocka_unit_test(test_watchdog_streak_resumes),
        cmocka_unit_test(test_sharded_optimizers),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
