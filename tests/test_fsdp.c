/* tests/test_fsdp.c — FULL_SHARD's pieces without a launcher
 * (model/llama_fsdp.h, quant/nf4.h nf4_quantize_range, comm's async gather).
 *
 * 1. nf4_quantize_range writes, for any block-aligned range, exactly the bytes
 *    nf4_quantize_into writes at those places (packed nibbles, absmax codes or
 *    fp32 absmax, the nested absmax of every group the range touches, the
 *    offset), with and without double quantization, ranges cutting groups.
 * 2. Sharded loading: the tiny GGUF model (tests/tiny_model.h) loaded by every
 *    rank r of W (W = 1, 2, 3, 7; a communicator faked in this file, whose
 *    gather copies the W ranks' shards) holds ~1/W of each layer, and the
 *    gathered layers are llama_load_gguf's blobs byte for byte — NF4 with and
 *    without double quantization and bf16; the same from the model written as
 *    an HF directory (bf16 safetensors: each rank converts only its rows; W =
 *    3 NF4, W = 2 bf16).
 * 3. comm_single's comm_all_gather_start completes at once; comm_wait on it
 *    returns 0 (the MPI form is tested over ranks in tests/test_comm.c and
 *    through the trainer in tests/test_ranks_e2e.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "autograd/backend.h"
#include "comm/comm.h"
#include "format/gguf.h"
#include "model/base.h"
#include "model/llama.h"
#include "model/llama_fsdp.h"
#include "quant/nf4.h"
#include "tests/tiny_model.h"
#include "tests/tmpdir.h"
#include "trainer/export.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_uniform(void) { return (float)((rng_next() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }

/* ---- 1. range quantization ---------------------------------------------------------------------- */

static void check_range_quant(int64_t rows, int64_t cols, int dq) {
    const int bs = 64;
    const int64_t n = rows * cols;
    float *w = malloc((size_t)n * sizeof(float));
    assert_non_null(w);
    for (int64_t i = 0; i < n; i++) w[i] = rng_uniform() * (1.0f + (float)(i % 977) / 100.0f);
    nf4_tensor full;
    qerr e;
    assert_int_equal(nf4_quantize(w, rows, cols, bs, dq, &full, &e), 0);
    float *absmax = malloc((size_t)full.nblocks * sizeof(float));
    assert_non_null(absmax);
    nf4_absmax_blocks(w, n, bs, absmax);
    const int64_t nb = full.nblocks, ng = (nb + 255) / 256;
    uint8_t *packed = malloc((size_t)(nb * bs / 2));
    uint8_t *scales = malloc((size_t)nb * 4);
    float *nested = malloc((size_t)ng * sizeof(float));
    assert_true(packed && scales && nested);
    for (int trial = 0; trial < 40; trial++) {
        int64_t b0 = (int64_t)(rng_next() % (uint64_t)nb), b1 = (int64_t)(rng_next() % (uint64_t)nb) + 1;
        if (trial == 0) b0 = 0, b1 = nb;
        if (b0 >= b1) {
            int64_t t = b0;
            b0 = b1 - 1;
            b1 = t + 1;
        }
        float off = -1;
        assert_int_equal(nf4_quantize_range(w + b0 * bs, b0 * bs, b1 * bs, &full, dq ? absmax : NULL, packed, scales,
                                            nested, &off, &e),
                         0);
        assert_memory_equal(packed, full.packed + b0 * bs / 2, (size_t)((b1 - b0) * bs / 2));
        if (dq) {
            assert_memory_equal(scales, full.absmax_q + b0, (size_t)(b1 - b0));
            const int64_t g0 = b0 / 256, g1 = (b1 - 1) / 256 + 1;
            assert_memory_equal(nested, full.nested_absmax + g0, (size_t)(g1 - g0) * sizeof(float));
            assert_memory_equal(&off, &full.offset, sizeof off);
        } else {
            assert_memory_equal(scales, full.absmax + b0, (size_t)(b1 - b0) * sizeof(float));
        }
    }
    /* a range off the block grid is refused */
    float off;
    assert_int_equal(nf4_quantize_range(w, 32, 128, &full, absmax, packed, scales, nested, &off, &e), -1);
    free(w);
    free(absmax);
    free(packed);
    free(scales);
    free(nested);
    nf4_free(&full);
}

static void test_range_quant(void **st) {
    check_range_quant(37, 128, 1);   /* 74 blocks, one nested group */
    check_range_quant(300, 256, 1);  /* 1200 blocks, 5 groups (the last partial) */
    check_range_quant(300, 256, 0);  /* fp32 absmax */
    check_range_quant(129, 192, 1);  /* 387 blocks */
}

/* ---- 2. sharded loading ------------------------------------------------------------------------- */

/* A fake W-rank job in one process: the gather copies each rank's shard of the layer whose shard
 * rank `me` sends (found by address). */
#define MAX_W 8
static llama_fsdp *g_ranks[MAX_W];
static int g_world;

struct comm_request {
    int done;
};
static struct comm_request g_done = {1};

static int fake_all_gather_start(comm *c, const void *send, void *recv, size_t sendcount, comm_dtype t,
                                 comm_request **req, qerr *e) {
    const llama_fsdp *me = g_ranks[c->rank];
    int l = -1;
    for (int k = 0; k < me->n_layer; k++)
        if (send == me->shard[k]) l = k;
    if (l < 0) return qerr_set(e, "fake gather: not a shard");
    for (int r = 0; r < g_world; r++) memcpy((uint8_t *)recv + (size_t)r * sendcount, g_ranks[r]->shard[l], sendcount);
    *req = &g_done;
    return 0;
}
static int fake_wait(comm *c, comm_request *req, qerr *e) { return 0; }
static const comm_ops fake_ops = {.name = "fake", .memory = "host", .all_gather_start = fake_all_gather_start,
                                  .wait = fake_wait};

static void check_sharded_load(const char *path, int W, int load_in_4bit, int dq) {
    base_model *f;
    qerr e;
    assert_int_equal(base_model_open(path, &f, &e), 0);
    llama_model ref;
    assert_int_equal(base_model_load(f, load_in_4bit, dq, 64, &ref, &e), 0);
    comm cs[MAX_W];
    llama_model ms[MAX_W];
    g_world = W;
    for (int r = 0; r < W; r++) {
        cs[r] = (comm){.ops = &fake_ops, .rank = r, .world_size = W, .local_world_size = W, .timeout_sec = 10,
                       .err_fd = 2};
        if (base_model_load_sharded(f, load_in_4bit, dq, 64, &cs[r], &ms[r], &e)) fail_msg("%s", e.msg);
        assert_non_null(ms[r].fsdp);
        g_ranks[r] = ms[r].fsdp;
    }
    const llama_layer_layout *lo = &ref.layers[0].layout;
    int64_t held = 0;
    for (int r = 0; r < W; r++) {
        const llama_fsdp *fs = ms[r].fsdp;
        assert_int_equal(fs->lo.nbytes, lo->nbytes);
        /* about 1/W: the rank's ranges, each section padded to 64 bytes */
        assert_true(fs->own_bytes <= lo->nbytes / (size_t)W + 4 * 64 + 64);
        held += (int64_t)fs->own_bytes;
        assert_int_equal(ms[r].quantized_bytes, ref.quantized_bytes);
        assert_int_equal(ms[r].n_params, ref.n_params);
    }
    assert_true(held >= (int64_t)lo->nbytes - 64 * W);
    uint8_t *blob = malloc(lo->nbytes);
    assert_non_null(blob);
    for (int l = 0; l < ref.hp.n_layer; l++)
        for (int r = 0; r < W; r++) {
            memset(blob, 0xab, lo->nbytes);
            assert_int_equal(llama_fsdp_gather_into(ms[r].fsdp, l, blob, &e), 0);
            assert_memory_equal(blob, ref.layers[l].blob, lo->nbytes);
            /* acquire binds the layer's views to the same bytes */
            llama_fsdp_acquire(ms[r].fsdp, l);
            assert_memory_equal(ms[r].layers[l].lin[LLAMA_DOWN].nf4 ? (const void *)ms[r].layers[l].nf4[LLAMA_DOWN].packed
                                                                      : (const void *)ms[r].layers[l].w_bf16[LLAMA_DOWN],
                                load_in_4bit ? (const void *)ref.layers[l].nf4[LLAMA_DOWN].packed
                                             : (const void *)ref.layers[l].w_bf16[LLAMA_DOWN],
                                16);
            if (load_in_4bit && dq)
                assert_memory_equal(&ms[r].layers[l].nf4[LLAMA_GATE].offset, &ref.layers[l].nf4[LLAMA_GATE].offset,
                                    sizeof(float));
        }
    free(blob);
    for (int r = 0; r < W; r++) llama_free(&ms[r]);
    llama_free(&ref);
    base_model_close(f);
}

static void test_sharded_load(void **st) {
    const tmpdir *t = *st;
    char path[256];
    snprintf(path, sizeof path, "%s/tiny.gguf", t->dir);
    assert_int_equal(tiny_model_write(path, 7), 0);
    /* the same model as an HF directory (bf16 safetensors, written by the merged export) */
    char hf[256];
    snprintf(hf, sizeof hf, "%s/tiny-hf", t->dir);
    base_model *g;
    tokenizer *tok;
    qerr e;
    assert_int_equal(base_model_open(path, &g, &e), 0);
    assert_int_equal(base_model_tokenizer(g, &tok, &e), 0);
    assert_int_equal(export_merged(g, NULL, tok, NULL, NULL, hf, 0, &e), 0);
    tokenizer_free(tok);
    base_model_close(g);
    static const int worlds[] = {1, 2, 3, 7};
    for (size_t i = 0; i < sizeof worlds / sizeof *worlds; i++) {
        check_sharded_load(path, worlds[i], 1, 1);
        check_sharded_load(path, worlds[i], 1, 0);
        check_sharded_load(path, worlds[i], 0, 0);
    }
    check_sharded_load(hf, 3, 1, 1);
    check_sharded_load(hf, 2, 0, 0);
}

/* ---- 3. the single process's async gather ------------------------------------------------------- */

static void test_single_gather_start(void **st) {
    comm *c;
    qerr e;
    assert_int_equal(comm_single(&c, &e), 0);
    uint8_t send[5] = {1, 2, 3, 4, 5}, recv[5] = {0};
    comm_request *rq = NULL;
    assert_int_equal(comm_all_gather_start(c, send, recv, 5, COMM_U8, &rq, &e), 0);
    assert_non_null(rq);
    assert_memory_equal(recv, send, 5); /* complete at once */
    assert_int_equal(comm_wait(c, rq, &e), 0);
    assert_int_equal(comm_all_gather_start(c, send, recv, 0, COMM_U8, &rq, &e), 0);
    assert_int_equal(comm_wait(c, rq, &e), 0);
    comm_free(c);
}

/* Per-layer gradient buckets on one process (model/llama_fsdp.h): every bucket reduced (a sum over one rank is
 * itself), an empty layer, the one no backward reached started by finish, the accumulation buffer added per
 * bucket exactly as the whole-arena path adds it, and the FULL_SHARD zeroing that gives pages back. */
static void test_grad_buckets_single(void **st) {
    comm *c;
    qerr e;
    assert_int_equal(comm_single(&c, &e), 0);
    enum { N = 12000 };
    int64_t off[4] = {0, 5000, 5000, N};
    float *g = aligned_alloc(4096, (N * sizeof(float) + 4095) / 4096 * 4096), *acc = malloc(N * sizeof(float)),
          *want = malloc(N * sizeof(float));
    lora_set ls;
    memset(&ls, 0, sizeof ls);
    ls.n_layer = 3;
    ls.n_params = N;
    ls.grads = g;
    ls.layer_offset = off;
    for (int rs = 0; rs < 2; rs++) {
        llama_grad_buckets b;
        const int64_t cuts[2] = {0, N};
        assert_int_equal(llama_grad_buckets_init(&b, c, &ls, ag_backend_default(), rs ? cuts : NULL, rs, &e), 0);
        for (int i = 0; i < N; i++) {
            g[i] = 0.25f * (float)(i % 97) - 3.0f;
            acc[i] = 1e-3f * (float)(i % 13) + 0.1f;
            want[i] = acc[i] + g[i];
        }
        llama_grad_buckets_layer_done(&b, 2); /* not armed: nothing */
        assert_int_equal((int)b.n_buckets, 0);
        llama_grad_buckets_arm(&b, acc);
        llama_grad_buckets_layer_done(&b, 2);
        llama_grad_buckets_layer_done(&b, 1);
        /* layer 0 never reached by backward: finish starts it */
        assert_int_equal(llama_grad_buckets_finish(&b, &e), 0);
        assert_int_equal((int)b.n_buckets, 3);
        assert_memory_equal(g, want, N * sizeof(float));
        llama_grad_buckets_zero(&b);
        for (int i = 0; i < N; i++) assert_true(g[i] == 0.0f);
        llama_grad_buckets_free(&b);
    }
    /* release-zero of an unaligned range: whole pages given back, the edges set, the bytes around untouched */
    unsigned char *p = aligned_alloc(4096, 5 * 4096);
    memset(p, 0xab, 5 * 4096);
    llama_release_zero(p + 100, 3 * 4096 + 7);
    for (int i = 0; i < 5 * 4096; i++)
        assert_int_equal(p[i], i >= 100 && i < 100 + 3 * 4096 + 7 ? 0 : 0xab);
    free(p);
    free(g);
    free(acc);
    free(want);
    comm_free(c);
}

static int group_setup(void **state) { return tmpdir_setup(state, "qlora_test_fsdp"); }

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_range_quant),
        cmocka_unit_test(test_sharded_load),
        cmocka_unit_test(test_single_gather_start),
        cmocka_unit_test(test_grad_buckets_single),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
