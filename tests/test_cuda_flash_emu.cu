/* tests/test_cuda_flash_emu.cu — the tensor-core attention kernels (autograd/backend_cuda_flash.h)
 * run on the CPU, in an emulation of their launch, against the CPU backend.
 *
 * The kernels' source is compiled here as host code (FA_EMULATE): each block runs as one fiber
 * per CUDA thread, __syncthreads is a barrier of those fibers (resumed in a freshly shuffled order
 * after each), the block's shared memory is a host buffer filled with NaN before each block (a
 * read of anything the kernel did not write shows up in the outputs), and each warp's 16×16 WMMA
 * tiles are summed by a scalar loop in the same warp-to-tile assignment. So the tiling, the masks (packed examples, the general mask,
 * the sliding window), the skipped tiles, the shared-memory layout, the row arithmetic and the
 * accumulation into dq/dk/dv run here, for every tile size the launcher may pick, and are
 * compared with `cpu-ref` under test_backend_ops's bf16 attention bound (NMSE 3e-5, reasoned
 * there). What this cannot show: the tensor cores' own summation order and rounding of the
 * products' sums (fp32 either way), and the device's timing; `make test-gpu` runs the real ones.
 */
extern "C" {
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "autograd/backend.h"
#include "autograd/tensor.h"
#include "core/bf16.h"
#include "core/rng.h"
}

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <vector>

/* The emulated block: nt CUDA threads as nt fibers (ucontext) on this one host thread. A fiber
 * runs until its FA_SYNC (__syncthreads) and hands back to the scheduler; when every fiber has
 * arrived, the next epoch resumes them all, in an order drawn afresh per epoch (a seeded shuffle),
 * so a read of shared memory that another thread writes without a barrier between them sees the
 * write or not depending on the draw (and NaN where nothing was written yet): a missing barrier
 * shows up as a wrong or NaN output. */
static int fa_emu_tid, fa_emu_nt, fa_emu_bx, fa_emu_by, fa_emu_bz;
static unsigned char *fa_emu_smem;
static ucontext_t fa_emu_sched;
static std::vector<ucontext_t> fa_emu_fib;
static void fa_emu_sync(void) {
    int me = fa_emu_tid;
    swapcontext(&fa_emu_fib[(size_t)me], &fa_emu_sched);
    fa_emu_tid = me;
}

#define FA_EMULATE 1
#include "autograd/backend_cuda_elem.h"
#include "autograd/backend_cuda_flash.h"

static const std::function<void()> *fa_emu_body;
static std::vector<char> fa_emu_done;
static void fa_emu_entry(int t) {
    fa_emu_tid = t;
    (*fa_emu_body)();
    fa_emu_done[(size_t)t] = 1;
} /* returns through uc_link to the scheduler */

/* fiber t of the block, on its own stack, ending into the scheduler (getcontext kept out of
 * emu_launch: it returns twice) */
__attribute__((noinline)) static void fa_emu_make(int t, char *stack, size_t size) {
    ucontext_t *f = &fa_emu_fib[(size_t)t];
    assert_int_equal(getcontext(f), 0);
    f->uc_stack.ss_sp = stack;
    f->uc_stack.ss_size = size;
    f->uc_link = &fa_emu_sched;
    makecontext(f, (void (*)(void))fa_emu_entry, 1, t);
}

/* Runs body() as a grid (gx, gy, gz) of blocks of nt threads with shm bytes of shared memory,
 * the blocks in turn, the shared memory filled with NaN before each block. */
static void emu_launch(int gx, int gy, int gz, int nt, size_t shm, const std::function<void()> &body) {
    static uint64_t draw;
    const size_t stack = 64u << 10;
    std::vector<float> buf(shm / 4 + 64);
    std::vector<char> stacks((size_t)nt * stack);
    std::vector<int> order((size_t)nt);
    unsigned char *base = (unsigned char *)buf.data();
    fa_emu_smem = base + ((128 - ((uintptr_t)base & 127)) & 127);
    fa_emu_nt = nt;
    fa_emu_body = &body;
    fa_emu_fib.assign((size_t)nt, ucontext_t());
    for (int bz = 0; bz < gz; bz++)
        for (int by = 0; by < gy; by++)
            for (int bx = 0; bx < gx; bx++) {
                for (size_t i = 0; i < shm / 4; i++) ((float *)fa_emu_smem)[i] = NAN;
                fa_emu_bx = bx, fa_emu_by = by, fa_emu_bz = bz;
                fa_emu_done.assign((size_t)nt, 0);
                for (int t = 0; t < nt; t++) fa_emu_make(t, stacks.data() + (size_t)t * stack, stack);
                for (int live = nt; live;) {
                    for (int t = 0; t < nt; t++) order[(size_t)t] = t;
                    for (int t = nt - 1; t > 0; t--) { /* Fisher-Yates, seeded */
                        int r = (int)(rng_uniform(0x5eed, 11, draw++) * (float)(t + 1));
                        if (r > t) r = t;
                        int x = order[(size_t)t];
                        order[(size_t)t] = order[(size_t)r];
                        order[(size_t)r] = x;
                    }
                    int ended = 0;
                    for (int t : order) {
                        assert_int_equal(fa_emu_done[(size_t)t], 0);
                        fa_emu_tid = t;
                        assert_int_equal(swapcontext(&fa_emu_sched, &fa_emu_fib[(size_t)t]), 0);
                        ended += fa_emu_done[(size_t)t];
                    }
                    /* __syncthreads in uniform control flow: all threads end in the same epoch */
                    if (ended && ended != nt) fail_msg("emulated block: %d of %d threads ended, the rest wait at a barrier", ended, nt);
                    live -= ended;
                }
            }
}

static float *host_rand(int64_t n, uint64_t seed, float amp) {
    float *x = (float *)malloc((size_t)n * sizeof(float));
    assert_non_null(x);
    for (int64_t i = 0; i < n; i++) x[i] = amp * (2.0f * rng_uniform(seed, 7, (uint64_t)i) - 1.0f);
    return x;
}

static double nmse(const float *x, const float *r, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)x[i] - (double)r[i];
        num += d * d;
        den += (double)r[i] * r[i];
    }
    return den > 0 ? num / den : num;
}

#define NMSE_CUDA_ATTN_BF16 3e-5 /* tests/test_backend_ops.c, where its reasoning is */

static void check(const char *what, const float *x, const float *r, int64_t n, int BQ, int BK) {
    double e = nmse(x, r, n);
    if (!(e <= NMSE_CUDA_ATTN_BF16)) fail_msg("%s (tiles %dx%d): NMSE %.3g exceeds %.3g", what, BQ, BK, e, NMSE_CUDA_ATTN_BF16);
}

/* One configuration: its bf16 inputs, the incoming gradients dq/dk/dv add to, and cpu-ref's
 * outputs (computed once, then compared with every tile size the kernels run with). */
struct fa_case {
    int B, T, H, KVH, hd, window;
    const int32_t *seq_ids;
    int64_t nq, nk, nst;
    std::vector<uint16_t> qb, kb, vb, db;
    std::vector<float> dq0, dk0, dv0;                 /* gradients before the backward */
    std::vector<float> rmax, rinv, o, dq, dk, dv;     /* cpu-ref */
    std::vector<int32_t> lo;                          /* per-token first allowed key (the launcher's) */
    std::vector<unsigned char> ok;
};

static std::vector<uint16_t> bf16_rand(int64_t n, uint64_t seed, float amp) {
    float *x = host_rand(n, seed, amp);
    std::vector<uint16_t> r((size_t)n);
    for (int64_t i = 0; i < n; i++) r[(size_t)i] = f32_to_bf16(x[i]);
    free(x);
    return r;
}

static std::vector<float> f32_rand(int64_t n, uint64_t seed, float amp) {
    float *x = host_rand(n, seed, amp);
    std::vector<float> r(x, x + n);
    free(x);
    return r;
}

static fa_case make_case(int B, int T, int H, int KVH, int hd, const int32_t *seq_ids, int window, uint64_t seed) {
    fa_case c;
    c.B = B, c.T = T, c.H = H, c.KVH = KVH, c.hd = hd, c.window = window, c.seq_ids = seq_ids;
    c.nq = (int64_t)B * T * H * hd, c.nk = (int64_t)B * T * KVH * hd, c.nst = (int64_t)B * H * T;
    c.qb = bf16_rand(c.nq, seed, 2.0f), c.kb = bf16_rand(c.nk, seed + 1, 2.0f), c.vb = bf16_rand(c.nk, seed + 2, 1.0f);
    c.db = bf16_rand(c.nq, seed + 3, 1.0f);
    c.dq0 = f32_rand(c.nq, seed + 4, 0.5f), c.dk0 = f32_rand(c.nk, seed + 5, 0.5f), c.dv0 = f32_rand(c.nk, seed + 6, 0.5f);
    /* the reference: cpu-ref, bf16 operands */
    const ag_backend *ref = ag_backend_find("cpu-ref");
    assert_non_null(ref);
    ag_ctx ctx;
    qerr e;
    memset(&e, 0, sizeof e);
    assert_int_equal(ag_ctx_init_backend(&ctx, ref, 64u << 20, &e), 0);
    c.rmax.assign((size_t)c.nst, 0.0f), c.rinv.assign((size_t)c.nst, 0.0f), c.o.assign((size_t)c.nq, 0.0f);
    c.dq = c.dq0, c.dk = c.dk0, c.dv = c.dv0;
    std::vector<int32_t> seglo((size_t)B * T);
    std::vector<unsigned char> segok((size_t)B);
    ag_attn a;
    memset(&a, 0, sizeof a);
    a.qb = c.qb.data();
    a.kb = c.kb.data();
    a.vb = c.vb.data();
    a.rmax = c.rmax.data();
    a.rinv = c.rinv.data();
    a.seq_ids = seq_ids;
    a.seglo = seglo.data();
    a.seg_ok = segok.data();
    a.B = B, a.T = T, a.H = H, a.KVH = KVH, a.hd = hd, a.bf16 = 1, a.window = window;
    ref->attention_fwd(&ctx, &a, c.o.data(), NULL);
    ref->attention_bwd(&ctx, &a, c.db.data(), c.dq.data(), c.dk.data(), c.dv.data(), 0);
    ag_ctx_free(&ctx);
    /* the launcher's bookkeeping (cu_attention_fwd uploads the same), checked against the CPU's */
    c.lo.assign((size_t)B * T, 0), c.ok.assign((size_t)B, 0);
    for (int b = 0; b < B; b++)
        c.ok[(size_t)b] = (unsigned char)qe_attn_seg_lo(seq_ids ? seq_ids + (size_t)b * T : NULL, T, window,
                                                        c.lo.data() + (size_t)b * T);
    for (size_t i = 0; i < c.lo.size(); i++) assert_int_equal(c.lo[i], seglo[i]);
    return c;
}

/* The three kernels with tiles <BQ, BK>, launched as cu_attention_fwd / cu_attention_bwd launch
 * them (grids, block size, shared memory), against cpu-ref. */
template <int BQ, int BK> static void run_tiles(const fa_case &c) {
    const int B = c.B, T = c.T, H = c.H, KVH = c.KVH, hd = c.hd, window = c.window;
    const int64_t nq = c.nq, nk = c.nk, nst = c.nst;
    std::vector<float> xrmax((size_t)nst, NAN), xrinv((size_t)nst, NAN), xo((size_t)nq, NAN), arow((size_t)nst, NAN);
    std::vector<float> xdq = c.dq0, xdk = c.dk0, xdv = c.dv0;
    std::vector<uint16_t> xob((size_t)nq);
    const float scale = 1.0f / sqrtf((float)hd);
    const uint16_t *Q = c.qb.data(), *K = c.kb.data(), *V = c.vb.data(), *D = c.db.data();
    const int32_t *S = c.seq_ids, *LO = c.lo.data();
    const unsigned char *OK = c.ok.data();
    int gq = (T + BQ - 1) / BQ, gk = (T + BK - 1) / BK;
    float *pm = xrmax.data(), *pi = xrinv.data(), *po = xo.data(), *pa = arow.data(), *pq = xdq.data(),
          *pk = xdk.data(), *pv = xdv.data();
    uint16_t *pob = xob.data();
    emu_launch(gq, H, B, 2 * BQ, fa_layout(0, BQ, BK, hd).total, [=]() {
        k_flash_fwd<BQ, BK>(Q, K, V, S, LO, OK, pm, pi, po, pob, T, H, KVH, hd, window, scale);
    });
    emu_launch(gq, H, B, 2 * BQ, fa_layout(1, BQ, BK, hd).total, [=]() {
        k_flash_bwd_q<BQ, BK>(Q, K, V, D, S, LO, OK, pm, pi, pa, pq, T, H, KVH, hd, window, scale);
    });
    emu_launch(gk, KVH, B, 2 * BQ, fa_layout(2, BQ, BK, hd).total, [=]() {
        k_flash_bwd_kv<BQ, BK>(Q, K, V, D, S, LO, OK, pm, pi, pa, pk, pv, T, H, KVH, hd, window, scale);
    });
    check("flash o", xo.data(), c.o.data(), nq, BQ, BK);
    check("flash row max", xrmax.data(), c.rmax.data(), nst, BQ, BK);
    check("flash row 1/sum", xrinv.data(), c.rinv.data(), nst, BQ, BK);
    check("flash dq", xdq.data(), c.dq.data(), nq, BQ, BK);
    check("flash dk", xdk.data(), c.dk.data(), nk, BQ, BK);
    check("flash dv", xdv.data(), c.dv.data(), nk, BQ, BK);
    for (int64_t i = 0; i < nq; i++) assert_int_equal(xob[(size_t)i], f32_to_bf16(xo[(size_t)i])); /* ob: o in bf16 */
}

/* every tile size the launcher may pick (fa_run: 64x64, 64x32, 32x32, 16x16) */
static void all_tiles(int B, int T, int H, int KVH, int hd, const int32_t *seq_ids, int window, uint64_t seed) {
    fa_case c = make_case(B, T, H, KVH, hd, seq_ids, window, seed);
    run_tiles<64, 64>(c);
    run_tiles<64, 32>(c);
    run_tiles<32, 32>(c);
    run_tiles<16, 16>(c);
}

static void test_flash_masks(void **st) {
    (void)st;
    enum { B = 2, T = 150 };
    int32_t packed[B * T], scattered[B * T];
    for (int i = 0; i < B * T; i++) {
        int t = i % T;
        packed[i] = t < 37 ? 0 : (t < 120 ? 1 : 2); /* contiguous examples: tiles before an example skipped */
        scattered[i] = (t / 5) % 3;                 /* ids that recur: the general mask */
    }
    all_tiles(B, T, 6, 2, 64, NULL, 0, 100);  /* causal, GQA 6:2, hd 64 (SmolLM2), a tail tile */
    all_tiles(B, T, 6, 2, 64, packed, 0, 101);
    all_tiles(B, T, 4, 2, 32, scattered, 0, 103);
}

static void test_flash_window(void **st) {
    (void)st;
    enum { B = 2, T = 150 };
    int32_t packed[B * T], scattered[B * T];
    for (int i = 0; i < B * T; i++) {
        int t = i % T;
        packed[i] = t < 37 ? 0 : (t < 120 ? 1 : 2);
        scattered[i] = (t / 5) % 3;
    }
    all_tiles(B, T, 6, 2, 64, NULL, 40, 106); /* tiles outside the window skipped */
    all_tiles(B, T, 6, 2, 64, packed, 33, 107);
    all_tiles(B, T, 4, 2, 16, scattered, 29, 108);
    all_tiles(1, T, 2, 2, 64, NULL, 1, 109); /* window 1: each token sees itself only */
}

static void test_flash_wide_heads(void **st) {
    (void)st;
    enum { T = 101 };
    int32_t packed[T];
    for (int t = 0; t < T; t++) packed[t] = t < 70 ? 0 : (t < 77 ? 1 : 2);
    fa_case c = make_case(1, T, 4, 1, 128, packed, 0, 104); /* hd 128 (Llama), runs not tile-aligned */
    run_tiles<32, 32>(c);
    run_tiles<16, 16>(c);
    c = make_case(1, T, 4, 1, 256, NULL, 70, 110); /* hd 256 (Gemma 3 270M: 4 heads, 1 KV head) */
    run_tiles<32, 32>(c);
    run_tiles<16, 16>(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_flash_masks), cmocka_unit_test(test_flash_window),
                                       cmocka_unit_test(test_flash_wide_heads)};
    return cmocka_run_group_tests_name("cuda_flash_emu", tests, NULL, NULL);
}
