/* tests/test_checkpoint.c — core/hash.c (XXH64 reference vectors) and
 * trainer/checkpoint.c: state.h5 round trip, the marker-last directory
 * protocol, corruption and truncation detection, listing, pruning and
 * clean-up of interrupted saves, the model / tokenizer fingerprints, and a
 * checkpoint written by the hand-written XXH64 of before libxxhash
 * (tests/fixtures/ckpt_pre_xxhash/README.md), which must still verify and load.
 * The last test needs the default model (make model). */
#include <math.h>
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

#include "comm/comm.h"
#include "core/hash.h"
#include "format/gguf.h"
#include "trainer/checkpoint.h"

static void test_xxh64_vectors(void **st) {
    (void)st;
    /* published XXH64 values (xxHash's sanity tests and its ports) */
    assert_true(xxh64("", 0, 0) == 0xEF46DB3751D8E999ull);
    assert_true(xxh64("a", 1, 0) == 0xD24EC4F1A98C6E5Bull);
    assert_true(xxh64("abc", 3, 0) == 0x44BC2CF5AD770999ull);
    assert_true(xxh64("hello", 5, 0) == 0x26C7827D889F6DA3ull);
    assert_true(xxh64("Hello, World!", 13, 0) == 0xC49AACF8080FE47Full);
    assert_true(xxh64("Hello, World!", 13, 42) == 0xC2E0FE28B2512846ull);
    const char *fox = "The quick brown fox jumps over the lazy dog";
    assert_true(xxh64(fox, strlen(fox), 0) == 0x0B242D361FDA71BCull);
    const char *num = "1234567890123456789012345678901234567890";
    assert_true(xxh64(num, strlen(num), 0) == 0x5F3AF5E23EEB431Dull);
    /* any split into updates gives the one-shot digest */
    unsigned char buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (unsigned char)(i * 131 + 7);
    for (size_t len = 0; len <= 1000; len += 37) {
        uint64_t whole = xxh64(buf, len, 5);
        for (size_t step = 1; step <= 70; step += 23) {
            xxh64_state s;
            xxh64_init(&s, 5);
            for (size_t o = 0; o < len; o += step) xxh64_update(&s, buf + o, len - o < step ? len - o : step);
            assert_true(xxh64_digest(&s) == whole);
        }
    }
}

static char g_dir[64];

static int setup(void **st) {
    (void)st;
    snprintf(g_dir, sizeof g_dir, "/tmp/qlora-ckpt-XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **st) {
    (void)st;
    qerr e;
    return ckpt_remove_tree(g_dir, &e);
}

/* A synthetic state with n params in two tensors. */
typedef struct fake {
    float *p, *m, *v;
    ckpt_tensor t[2];
    ckpt_state s;
} fake;

static void fake_init(fake *f, int64_t step, int64_t n) {
    f->p = malloc((size_t)n * sizeof(float));
    f->m = malloc((size_t)n * sizeof(float));
    f->v = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        f->p[i] = sinf((float)i) * 0.01f;
        f->m[i] = (float)i * 1e-6f;
        f->v[i] = (float)(i % 7) * 1e-9f;
    }
    int64_t a = n / 4;
    f->t[0] = (ckpt_tensor){"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 0, 1, a};
    f->t[1] = (ckpt_tensor){"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", a, n - a, 1};
    memset(&f->s, 0, sizeof f->s);
    f->s = (ckpt_state){.step = step, .total_steps = 100, .rows_consumed = step * 4, .n_rows = 37, .rows_per_step = 4,
                        .shuffle_seed = 42, .data_fingerprint = 0x1234567890abcdefull, .seed = 42, .base_lr = 2e-4,
                        .last_lr = 1.5e-4, .warmup_steps = 5, .opt_step = step - 1, .beta1 = 0.9, .beta2 = 0.999,
                        .eps = 1e-8, .weight_decay = 0.01, .nan_streak = 1, .nan_skipped = 1, .loss_watchdog_streak = 3,
                        .eval_loss_start = 2.5, .last_eval_loss = NAN, .last_eval_step = -1,
                        .model_fingerprint = 0xfedcba9876543210ull, .tokenizer_fingerprint = 7, .n_params = n,
                        .params = f->p, .exp_avg = f->m, .exp_avg_sq = f->v, .n_tensors = 2, .tensors = f->t,
                        .config_yaml = "lora_r: 8\nseed: 42\n",
                        .log_history = "{\"step\": 1, \"loss\": 2}\n", .log_history_len = 24};
    snprintf(f->s.lr_scheduler, sizeof f->s.lr_scheduler, "cosine");
    snprintf(f->s.base_model, sizeof f->s.base_model, "models/x.gguf");
    snprintf(f->s.base_format, sizeof f->s.base_format, "nf4 double_quant");
}

static void fake_free(fake *f) {
    free(f->p);
    free(f->m);
    free(f->v);
}

static int extra_writes_file(const char *dir, void *arg, qerr *e) {
    (void)e;
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, (const char *)arg);
    FILE *f = fopen(p, "w");
    if (!f) return -1;
    fputs("extra", f);
    fclose(f);
    return 0;
}

static void test_roundtrip(void **st) {
    (void)st;
    char out[128];
    snprintf(out, sizeof out, "%s/rt", g_dir);
    mkdir(out, 0755);
    fake f;
    fake_init(&f, 12, 300000); /* > one chunk (2^18 elements) */
    qerr e;
    char dir[4096];
    int rc = ckpt_save(out, &f.s, extra_writes_file, "adapter_model.safetensors", dir, sizeof dir, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    char want[256];
    snprintf(want, sizeof want, "%s/checkpoint-12", out);
    assert_string_equal(dir, want);
    char p[4200];
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    assert_int_equal(access(p, F_OK), 0);
    int64_t step = -1;
    assert_int_equal(ckpt_verify(dir, &step, &e), 0);
    assert_int_equal(step, 12);

    ckpt_state r;
    rc = ckpt_load(dir, &r, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(r.step, 12);
    assert_int_equal(r.rows_consumed, 48);
    assert_int_equal(r.n_rows, 37);
    assert_int_equal(r.rows_per_step, 4);
    assert_true(r.data_fingerprint == 0x1234567890abcdefull);
    assert_true(r.model_fingerprint == 0xfedcba9876543210ull);
    assert_true(r.tokenizer_fingerprint == 7);
    assert_int_equal(r.opt_step, 11);
    assert_true(r.beta2 == 0.999 && r.eps == 1e-8 && r.weight_decay == 0.01);
    assert_true(r.base_lr == 2e-4 && r.last_lr == 1.5e-4);
    assert_int_equal(r.warmup_steps, 5);
    assert_string_equal(r.lr_scheduler, "cosine");
    assert_string_equal(r.base_model, "models/x.gguf");
    assert_string_equal(r.base_format, "nf4 double_quant");
    assert_int_equal(r.nan_streak, 1);
    assert_int_equal(r.loss_watchdog_streak, 3);
    assert_true(r.eval_loss_start == 2.5 && isnan(r.last_eval_loss));
    assert_int_equal(r.last_eval_step, -1);
    assert_string_equal(r.config_yaml, "lora_r: 8\nseed: 42\n");
    assert_int_equal(r.log_history_len, 24);
    assert_memory_equal(r.log_history, f.s.log_history, 24);
    assert_int_equal(r.n_params, 300000);
    assert_memory_equal(r.params, f.p, 300000 * sizeof(float));
    assert_memory_equal(r.exp_avg, f.m, 300000 * sizeof(float));
    assert_memory_equal(r.exp_avg_sq, f.v, 300000 * sizeof(float));
    assert_int_equal(r.n_tensors, 2);
    for (int i = 0; i < 2; i++) {
        assert_string_equal(r.tensors[i].name, f.t[i].name);
        assert_int_equal(r.tensors[i].offset, f.t[i].offset);
        assert_int_equal(r.tensors[i].rows, f.t[i].rows);
        assert_int_equal(r.tensors[i].cols, f.t[i].cols);
    }
    ckpt_state_free(&r);

    /* saving the same step again replaces it */
    f.p[0] = 42.0f;
    assert_int_equal(ckpt_save(out, &f.s, NULL, NULL, NULL, 0, &e), 0);
    assert_int_equal(ckpt_load(dir, &r, &e), 0);
    assert_true(r.params[0] == 42.0f);
    ckpt_state_free(&r);
    fake_free(&f);
}

static void flip_byte(const char *path, long at) {
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    fseek(f, at, SEEK_SET);
    int c = fgetc(f);
    fseek(f, at, SEEK_SET);
    fputc(c ^ 0x10, f);
    fclose(f);
}

static void test_corruption_detected(void **st) {
    (void)st;
    char out[128], dir[4096], p[4200];
    snprintf(out, sizeof out, "%s/bad", g_dir);
    mkdir(out, 0755);
    fake f;
    fake_init(&f, 3, 1000);
    qerr e;
    assert_int_equal(ckpt_save(out, &f.s, NULL, NULL, dir, sizeof dir, &e), 0);
    snprintf(p, sizeof p, "%s/state.h5", dir);
    struct stat sb;
    assert_int_equal(stat(p, &sb), 0);
    /* a flipped bit anywhere */
    for (long at = 0; at < sb.st_size; at += sb.st_size / 7 + 1) {
        flip_byte(p, at);
        assert_int_equal(ckpt_verify(dir, NULL, &e), -1);
        assert_non_null(strstr(e.msg, "corrupt"));
        flip_byte(p, at);
        assert_int_equal(ckpt_verify(dir, NULL, &e), 0);
    }
    /* truncated */
    assert_int_equal(truncate(p, sb.st_size - 1), 0);
    assert_int_equal(ckpt_verify(dir, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "truncated"));
    /* no marker: incomplete */
    snprintf(p, sizeof p, "%s/COMPLETE", dir);
    assert_int_equal(unlink(p), 0);
    assert_int_equal(ckpt_verify(dir, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "incomplete"));
    /* garbage marker */
    FILE *m = fopen(p, "w");
    fputs("qlora-checkpoint 1\nstep x\n", m);
    fclose(m);
    assert_int_equal(ckpt_verify(dir, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "malformed"));
    /* not HDF5 at all, with a marker that matches it: the reader says so */
    snprintf(p, sizeof p, "%s/state.h5", dir);
    m = fopen(p, "w");
    fputs("not an HDF5 file", m);
    fclose(m);
    ckpt_state r;
    assert_int_equal(ckpt_read_state(p, &r, &e), -1);
    assert_non_null(strstr(e.msg, "HDF5"));
    fake_free(&f);
}

static void test_list_prune_clean(void **st) {
    (void)st;
    char out[128], p[4300];
    snprintf(out, sizeof out, "%s/prune", g_dir);
    mkdir(out, 0755);
    fake f;
    fake_init(&f, 1, 64);
    qerr e;
    for (int s = 1; s <= 5; s++) {
        f.s.step = s * 10;
        assert_int_equal(ckpt_save(out, &f.s, NULL, NULL, NULL, 0, &e), 0);
    }
    /* an interrupted save, an incomplete older one, an unrelated directory */
    snprintf(p, sizeof p, "%s/checkpoint-60.tmp-123", out);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/checkpoint-7", out);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/checkpoint-final", out);
    mkdir(p, 0755);
    ckpt_entry *v;
    int n;
    assert_int_equal(ckpt_list(out, &v, &n, &e), 0);
    assert_int_equal(n, 6); /* 50 40 30 20 10 7 */
    assert_int_equal(v[0].step, 50);
    assert_int_equal(v[5].step, 7);
    free(v);
    int nd = 0;
    assert_int_equal(ckpt_clean_stale(out, &nd, &e), 0);
    assert_int_equal(nd, 1);
    snprintf(p, sizeof p, "%s/checkpoint-60.tmp-123", out);
    assert_int_not_equal(access(p, F_OK), 0);
    assert_int_equal(ckpt_prune(out, 2, &nd, &e), 0);
    assert_int_equal(nd, 4); /* 30 20 10 and the incomplete 7 */
    assert_int_equal(ckpt_list(out, &v, &n, &e), 0);
    assert_int_equal(n, 2);
    assert_int_equal(v[0].step, 50);
    assert_int_equal(v[1].step, 40);
    free(v);
    snprintf(p, sizeof p, "%s/checkpoint-final", out);
    assert_int_equal(access(p, F_OK), 0);
    /* a save of step 50 killed after moving the complete one aside: it comes back */
    char old50[4300], ck50[4300];
    snprintf(ck50, sizeof ck50, "%s/checkpoint-50", out);
    snprintf(old50, sizeof old50, "%s/checkpoint-50.old-77", out);
    assert_int_equal(rename(ck50, old50), 0);
    mkdir(ck50, 0755); /* the new one, renamed into place, no marker yet */
    assert_int_not_equal(ckpt_verify(ck50, NULL, &e), 0);
    assert_int_equal(ckpt_clean_stale(out, &nd, &e), 0);
    assert_int_equal(nd, 1);
    assert_int_equal(ckpt_verify(ck50, NULL, &e), 0);
    assert_int_not_equal(access(old50, F_OK), 0);
    /* a missing output_dir lists nothing */
    snprintf(p, sizeof p, "%s/nope", g_dir);
    assert_int_equal(ckpt_list(p, &v, &n, &e), 0);
    assert_int_equal(n, 0);
    fake_free(&f);
}

/* Checkpoint files that are not regular files (a state.h5 symlinked to /dev/zero, a FIFO) are refused before
 * a byte is read, instead of hanging the resume (issue 17 item 4); an old checkpoint that cannot be deleted does
 * not keep ckpt_prune from the others (item 14). */
static void test_not_regular_and_undeletable(void **st) {
    (void)st;
    char out[128], ck[4200], p[4300], q[4400];
    snprintf(out, sizeof out, "%s/irregular", g_dir);
    mkdir(out, 0755);
    fake f;
    fake_init(&f, 1, 64);
    qerr e;
    for (int s = 1; s <= 3; s++) {
        f.s.step = s;
        assert_int_equal(ckpt_save(out, &f.s, NULL, NULL, NULL, 0, &e), 0);
    }
    snprintf(ck, sizeof ck, "%s/checkpoint-3", out);
    snprintf(p, sizeof p, "%s/state.h5", ck);
    snprintf(q, sizeof q, "%s/state.h5.real", ck);
    assert_int_equal(rename(p, q), 0);
    assert_int_equal(symlink("/dev/zero", p), 0);
    assert_int_equal(ckpt_verify(ck, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "not a regular file (a character device)"));
    ckpt_state r;
    assert_int_equal(ckpt_read_state(p, &r, &e), -1);
    assert_non_null(strstr(e.msg, "not a regular file"));
    assert_int_equal(unlink(p), 0);
    assert_int_equal(mkfifo(p, 0600), 0);
    assert_int_equal(ckpt_verify(ck, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "not a regular file (a FIFO)"));
    assert_int_equal(ckpt_read_state(p, &r, &e), -1);
    assert_non_null(strstr(e.msg, "not a regular file (a FIFO)"));
    assert_int_equal(unlink(p), 0);
    assert_int_equal(rename(q, p), 0);
    assert_int_equal(ckpt_verify(ck, NULL, &e), 0);
    /* the marker as a FIFO */
    snprintf(p, sizeof p, "%s/COMPLETE", ck);
    snprintf(q, sizeof q, "%s/COMPLETE.real", ck);
    assert_int_equal(rename(p, q), 0);
    assert_int_equal(mkfifo(p, 0600), 0);
    assert_int_equal(ckpt_verify(ck, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "COMPLETE: not a regular file (a FIFO)"));
    assert_int_equal(unlink(p), 0);
    assert_int_equal(rename(q, p), 0);

    /* checkpoint-2's marker cannot be unlinked (a directory): prune still deletes checkpoint-1 and says why */
    ckpt_entry *v;
    int n, nd = 0;
    snprintf(p, sizeof p, "%s/checkpoint-2/COMPLETE", out);
    assert_int_equal(unlink(p), 0);
    assert_int_equal(mkdir(p, 0755), 0);
    snprintf(q, sizeof q, "%s/x", p);
    FILE *x = fopen(q, "w");
    assert_non_null(x);
    fclose(x);
    assert_int_equal(ckpt_list(out, &v, &n, &e), 0);
    assert_int_equal(n, 3);
    assert_true(v[0].complete && v[1].complete && v[2].complete); /* a marker exists in each */
    free(v);
    assert_int_equal(ckpt_prune(out, 1, &nd, &e), -1);
    assert_non_null(strstr(e.msg, "checkpoint-2/COMPLETE"));
    assert_int_equal(nd, 1);
    snprintf(p, sizeof p, "%s/checkpoint-1", out);
    assert_int_not_equal(access(p, F_OK), 0);
    assert_int_equal(ckpt_verify(ck, NULL, &e), 0); /* the newest untouched */
    fake_free(&f);
}

static void test_fingerprints(void **st) {
    (void)st;
    char p[128];
    snprintf(p, sizeof p, "%s/model.bin", g_dir);
    FILE *f = fopen(p, "wb");
    for (int i = 0; i < 100000; i++) fputc(i & 0xff, f);
    fclose(f);
    qerr e;
    uint64_t a, b;
    assert_int_equal(ckpt_fingerprint_model(p, &a, &e), 0);
    assert_int_equal(ckpt_fingerprint_model(p, &b, &e), 0);
    assert_true(a == b);
    flip_byte(p, 99999);
    assert_int_equal(ckpt_fingerprint_model(p, &b, &e), 0);
    assert_true(a != b);
    assert_int_equal(ckpt_fingerprint_model("/nonexistent/model.gguf", &b, &e), -1);
    /* the tokenizer fingerprint of a GGUF fixture is stable and not the empty hash */
    gguf_file *g;
    if (gguf_open("tests/fixtures/smollm2_expected.gguf", &g, &e) == 0) {
        uint64_t t1 = ckpt_fingerprint_tokenizer(g), t2 = ckpt_fingerprint_tokenizer(g);
        assert_true(t1 == t2);
        gguf_close(g);
    }
}

/* A checkpoint written by bin/qlora-train at commit 1099942 (our own XXH64):
 * its COMPLETE marker (size and XXH64 of state.h5) verifies, state.h5 loads,
 * and the fingerprints it recorded are those computed now from the same model. */
#define PRE_XXHASH_DIR "tests/fixtures/ckpt_pre_xxhash"
#define PRE_XXHASH_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

static void test_pre_xxhash_checkpoint(void **st) {
    (void)st;
    qerr e;
    int64_t step = -1;
    int rc = ckpt_verify(PRE_XXHASH_DIR, &step, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(step, 1);
    /* the digest in COMPLETE, recomputed here through core/hash */
    FILE *f = fopen(PRE_XXHASH_DIR "/" CKPT_STATE_FILE, "rb");
    assert_non_null(f);
    unsigned char buf[1 << 16];
    xxh64_state hs;
    xxh64_init(&hs, 0);
    size_t got, total = 0;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) xxh64_update(&hs, buf, got), total += got;
    fclose(f);
    assert_int_equal(total, 254880);
    assert_true(xxh64_digest(&hs) == 0x81043daf54c160a0ull);

    ckpt_state s;
    rc = ckpt_load(PRE_XXHASH_DIR, &s, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    assert_int_equal(s.step, 1);
    assert_int_equal(s.opt_step, 1);
    assert_int_equal(s.n_params, 34560); /* r 1 on q_proj: 30 layers x (576 + 576) */
    assert_int_equal(s.n_tensors, 60);
    assert_string_equal(s.tensors[0].name, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_string_equal(s.optimizer, "adamw");
    assert_string_equal(s.base_model, PRE_XXHASH_MODEL);
    assert_non_null(strstr(s.config_yaml, "lora_r: 1\n"));
    assert_true(s.model_fingerprint == 0x920196a6e641e6d3ull);
    assert_true(s.tokenizer_fingerprint == 0x1d25318e1cb00e84ull);
    assert_int_equal(s.loss_watchdog_streak, 0); /* written before the attribute existed */
    assert_string_equal(s.base_format, "");      /* likewise: resume does not check it */
    /* the same fingerprints computed now (sampled model hash, tokenizer keys) */
    uint64_t fp = 0;
    rc = ckpt_fingerprint_model(PRE_XXHASH_MODEL, &fp, &e);
    if (rc) print_error("%s (run `make model`)\n", e.msg);
    assert_int_equal(rc, 0);
    assert_true(fp == s.model_fingerprint);
    gguf_file *g;
    assert_int_equal(gguf_open(PRE_XXHASH_MODEL, &g, &e), 0);
    assert_true(ckpt_fingerprint_tokenizer(g) == s.tokenizer_fingerprint);
    gguf_close(g);
    ckpt_state_free(&s);
}


/* The sharded layout in one process (comm_single: world 1, one shard file): the layout, a full load
 * equal to what was saved, loads of one rank's interval at world 3 (resharding on load: rank 1 of 3
 * of 300001 elements is [100001, 200002)), consolidation into state.h5, and a missing shard file
 * refused naming it. (Several ranks: tests/test_ckpt_sharded_e2e.c.) */
static void test_sharded_single_rank(void **st) {
    (void)st;
    char out[128], dir[4096], p[4400], cons[256];
    snprintf(out, sizeof out, "%s/sharded", g_dir);
    mkdir(out, 0755);
    fake f;
    const int64_t n = 300001;
    fake_init(&f, 7, n);
    comm *cm;
    qerr e;
    assert_int_equal(comm_single(&cm, &e), 0);
    int rc = ckpt_save_sharded(cm, out, &f.s, extra_writes_file, "adapter_model.safetensors", dir, sizeof dir, &e);
    if (rc) print_error("%s\n", e.msg);
    assert_int_equal(rc, 0);
    static const char *const files[] = {CKPT_RUN_STATE_FILE, CKPT_INDEX_FILE, "shard-00000-of-00001.h5", CKPT_MARKER,
                                        "adapter_model.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        assert_int_equal(access(p, F_OK), 0);
    }
    snprintf(p, sizeof p, "%s/" CKPT_STATE_FILE, dir);
    assert_int_not_equal(access(p, F_OK), 0);
    ckpt_state r;
    assert_int_equal(ckpt_load(dir, &r, &e), 0);
    assert_int_equal(r.step, 7);
    assert_int_equal(r.n_params, n);
    assert_int_equal(r.sharded, 1);
    assert_true(r.opt_lo == 0 && r.opt_hi == n);
    assert_memory_equal(r.params, f.p, (size_t)n * sizeof(float));
    assert_memory_equal(r.exp_avg, f.m, (size_t)n * sizeof(float));
    assert_memory_equal(r.exp_avg_sq, f.v, (size_t)n * sizeof(float));
    assert_string_equal(r.log_history, f.s.log_history);
    assert_int_equal(r.n_tensors, 2);
    ckpt_state_free(&r);
    for (int rank = 0; rank < 3; rank++) {
        int64_t lo, hi;
        ckpt_shard_interval(n, 3, rank, &lo, &hi);
        assert_int_equal(ckpt_load_part(dir, 3, rank, &r, &e), 0);
        assert_true(r.opt_lo == lo && r.opt_hi == hi && hi - lo == (rank < 2 ? 100001 : 99999));
        assert_memory_equal(r.params, f.p, (size_t)n * sizeof(float));
        assert_memory_equal(r.exp_avg, f.m + lo, (size_t)(hi - lo) * sizeof(float));
        assert_memory_equal(r.exp_avg_sq, f.v + lo, (size_t)(hi - lo) * sizeof(float));
        ckpt_state_free(&r);
    }
    /* consolidate: one state.h5 with the same arrays; an existing destination is refused */
    snprintf(cons, sizeof cons, "%s/whole", g_dir);
    assert_int_equal(ckpt_consolidate(dir, cons, &e), 0);
    snprintf(p, sizeof p, "%s/" CKPT_STATE_FILE, cons);
    assert_int_equal(access(p, F_OK), 0);
    assert_int_equal(ckpt_load(cons, &r, &e), 0);
    assert_int_equal(r.sharded, 0);
    assert_memory_equal(r.exp_avg_sq, f.v, (size_t)n * sizeof(float));
    ckpt_state_free(&r);
    assert_int_equal(ckpt_consolidate(dir, cons, &e), -1);
    assert_non_null(strstr(e.msg, "already exists"));
    /* a missing shard: refused, naming it */
    snprintf(p, sizeof p, "%s/shard-00000-of-00001.h5", dir);
    assert_int_equal(unlink(p), 0);
    assert_int_equal(ckpt_load(dir, &r, &e), -1);
    assert_non_null(strstr(e.msg, "shard-00000-of-00001.h5"));
    assert_null(strchr(e.msg, '\n'));
    comm_free(cm);
    fake_free(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_xxh64_vectors),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_sharded_single_rank),
        cmocka_unit_test(test_corruption_detected),
        cmocka_unit_test(test_list_prune_clean),
        cmocka_unit_test(test_not_regular_and_undeletable),
        cmocka_unit_test(test_fingerprints),
        cmocka_unit_test(test_pre_xxhash_checkpoint),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
