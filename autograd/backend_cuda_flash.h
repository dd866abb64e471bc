/* autograd/backend_cuda_flash.h — attention on bf16 tensor cores: the flash kernels of the CUDA
 * backend (included by autograd/backend_cuda.cu, which launches them).
 *
 * Written once for two compilations: device code (nvcc, nvcuda::wmma on tensor cores), and with
 * FA_EMULATE defined a host emulation of the same kernels (tests/test_cuda_flash_emu.cu): one
 * fiber per CUDA thread of a block, a barrier of the fibers for __syncthreads, the block's shared
 * memory a host buffer, and each warp's 16×16 tiles summed by a scalar loop. The emulation runs the kernels'
 * tiling, masks, tile skipping, shared-memory layout and row arithmetic on the CPU against the CPU
 * backend; what it cannot show is the tensor cores' own summation order and the device's timing.
 *
 * Only included by CUDA translation units (nvcc); it is C++. Needs backend_cuda_elem.h first.
 * Anything written here runs in both: device-only code goes under #ifndef FA_EMULATE with its
 * emulated form beside it (today only fa_mma, the WMMA tile product).
 */
#ifndef QLORA_AUTOGRAD_BACKEND_CUDA_FLASH_H
#define QLORA_AUTOGRAD_BACKEND_CUDA_FLASH_H

#ifndef FA_EMULATE
#include <mma.h>
#include <cuda_bf16.h>
#define FA_HD __host__ __device__
#define FA_DEV __device__ __forceinline__
#define FA_GLOBAL __global__
#define FA_BOUNDS(n) __launch_bounds__(n)
#define FA_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define FA_SYNC() __syncthreads()
#define FA_TID ((int)threadIdx.x)
#define FA_NT ((int)blockDim.x)
#define FA_BX ((int)blockIdx.x)
#define FA_BY ((int)blockIdx.y)
#define FA_BZ ((int)blockIdx.z)
#else
/* the emulator defines fa_emu_tid, fa_emu_nt, fa_emu_bx/by/bz, fa_emu_smem and fa_emu_sync() */
#define FA_HD
#define FA_DEV static inline
#define FA_GLOBAL static
#define FA_BOUNDS(n)
#define FA_SMEM(name) unsigned char *name = fa_emu_smem
#define FA_SYNC() fa_emu_sync()
#define FA_TID fa_emu_tid
#define FA_NT fa_emu_nt
#define FA_BX fa_emu_bx
#define FA_BY fa_emu_by
#define FA_BZ fa_emu_bz
#endif

FA_HD inline int fa_min(int a, int b) { return a < b ? a : b; }

/* ------------------------------------------------------------------ attention on tensor cores (flash) */

/* bf16 WMMA (nvcuda::wmma, 16x16x16, fp32 accumulation) forms of backend_cuda.cu's three simple
 * attention kernels (k_attn_fwd, k_attn_bwd_q, k_attn_bwd_kv),
 * FlashAttention-2's blocking (Dao 2023): a block holds a tile of BQ query rows (forward, query-side
 * backward) or BK key rows (key-side backward) with the operand tiles in shared memory. Scores
 * S = scale·Q Kᵀ, O += P V, dP = dO Vᵀ, dQ += dS K, dV += Pᵀ dO and dK += dSᵀ Q run on tensor
 * cores; the row arithmetic between them is the per-element functions of backend_cuda_elem.h
 * (qe_flash_row_update, qe_attn_p, qe_attn_a_term, qe_attn_ds, the mask rule qe_attn_allowed with
 * qe_attn_lo bounding the key tiles). P and dS are rounded to bf16 as the CPU rounds its GEMM
 * operands. Every output element has one owner (one warp's accumulator tile) and every sum a fixed
 * order: no atomics, a run repeats bit for bit on the same GPU. Tiles wholly above the causal
 * diagonal, before the first key of a packed example or outside the sliding window are skipped.
 * Selected for bf16 operands with head_dim a multiple of 16 (≤ 256); QLORA_CUDA_ATTN=simple keeps
 * the one-thread-per-row kernels above (the second oracle of `make test-gpu`). */

FA_HD inline size_t fa_al(size_t x) { return (x + 127) & ~(size_t)127; }
FA_HD inline int fa_ldh(int n) { return n + 8; } /* bf16 row stride (16-byte multiple, WMMA ldm) */
FA_HD inline int fa_ldf(int n) { return n + 4; } /* fp32 row stride */

/* Shared-memory layout, computed alike on the host (launch size) and in the kernels. Arrays that a
 * kernel does not use have size 0. */
struct fa_lay {
    size_t q, d, k, v, s, dp, p, ds, acc, acc2, st, total;
};

FA_HD inline fa_lay fa_layout(int kind, int BQ, int BK, int hd) {
    /* kind 0: forward; 1: query-side backward; 2: key-side backward */
    fa_lay L;
    size_t t = 0, qh = (size_t)BQ * fa_ldh(hd) * 2, kh = (size_t)BK * fa_ldh(hd) * 2;
    size_t sf = (size_t)BQ * fa_ldf(BK) * 4, ph = (size_t)BQ * fa_ldh(BK) * 2;
    L.q = t; t = fa_al(t + qh);
    L.d = t; t = fa_al(t + (kind ? qh : 0));
    L.k = t; t = fa_al(t + kh);
    L.v = t; t = fa_al(t + kh);
    L.s = t; t = fa_al(t + sf);
    L.dp = t; t = fa_al(t + (kind ? sf : 0));
    L.p = t; t = fa_al(t + (kind != 1 ? ph : 0));
    L.ds = t; t = fa_al(t + (kind ? ph : 0));
    L.acc = t; t = fa_al(t + (size_t)(kind == 2 ? BK : BQ) * fa_ldf(hd) * 4);
    L.acc2 = t; t = fa_al(t + (kind == 2 ? (size_t)BK * fa_ldf(hd) * 4 : 0));
    L.st = t; t = fa_al(t + (size_t)3 * BQ * 4);
    L.total = t;
    return L;
}

#ifndef FA_EMULATE
/* element (r, c) of a matrix stored row- or column-major with leading dimension ld */
template <typename LAY> FA_DEV size_t fa_off(int r, int c, int ld);
template <> FA_DEV size_t fa_off<nvcuda::wmma::row_major>(int r, int c, int ld) {
    return (size_t)r * ld + c;
}
template <> FA_DEV size_t fa_off<nvcuda::wmma::col_major>(int r, int c, int ld) {
    return (size_t)c * ld + r;
}

/* C (M×N fp32, row-major, ldc) = or += A (M×K bf16) · B (K×N bf16) on tensor cores: the block's
 * warps take C's 16×16 tiles in turn, each tile summed over K in order by its one warp. */
template <typename LA, typename LB>
FA_DEV void fa_mma(float *C, int ldc, const uint16_t *A, int lda, const uint16_t *B, int ldb, int M, int N, int K,
                       int acc) {
    using namespace nvcuda;
    int warp = (FA_TID >> 5), nw = (FA_NT >> 5), tn_n = N / 16;
    for (int t = warp; t < (M / 16) * tn_n; t += nw) {
        int tm = t / tn_n, tn = t % tn_n;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
        float *cp = C + (size_t)tm * 16 * ldc + (size_t)tn * 16;
        if (acc) wmma::load_matrix_sync(c, cp, (unsigned)ldc, wmma::mem_row_major);
        else wmma::fill_fragment(c, 0.0f);
        for (int kk = 0; kk < K; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LA> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LB> fb;
            wmma::load_matrix_sync(fa, (const __nv_bfloat16 *)(A + fa_off<LA>(tm * 16, kk, lda)), (unsigned)lda);
            wmma::load_matrix_sync(fb, (const __nv_bfloat16 *)(B + fa_off<LB>(kk, tn * 16, ldb)), (unsigned)ldb);
            wmma::mma_sync(c, fa, fb, c);
        }
        wmma::store_matrix_sync(cp, c, (unsigned)ldc, wmma::mem_row_major);
    }
}
using fa_row = nvcuda::wmma::row_major;
using fa_col = nvcuda::wmma::col_major;
#else
/* The host emulation (tests/test_cuda_flash_emu.cu): the same tiles, in the same warp-to-tile
 * assignment, summed by lane 0 of each warp in fp32 (k order); layouts as WMMA reads them. */
struct fa_row {};
struct fa_col {};
template <typename LAY> static inline size_t fa_off(int r, int c, int ld);
template <> inline size_t fa_off<fa_row>(int r, int c, int ld) { return (size_t)r * ld + c; }
template <> inline size_t fa_off<fa_col>(int r, int c, int ld) { return (size_t)c * ld + r; }
template <typename LA, typename LB>
static void fa_mma(float *C, int ldc, const uint16_t *A, int lda, const uint16_t *B, int ldb, int M, int N, int K,
                   int acc) {
    if (FA_TID % 32) return;
    int warp = FA_TID >> 5, nw = FA_NT >> 5, tn_n = N / 16;
    for (int t = warp; t < (M / 16) * tn_n; t += nw) {
        int tm = t / tn_n, tn = t % tn_n;
        for (int r = tm * 16; r < tm * 16 + 16; r++) {
            float sum[16]; /* each element summed in k order; the 16 of a row side by side */
            for (int c = 0; c < 16; c++) sum[c] = acc ? C[(size_t)r * ldc + tn * 16 + c] : 0.0f;
            for (int k = 0; k < K; k++) {
                const float a = qe_bf16_to_f32(A[fa_off<LA>(r, k, lda)]);
                for (int c = 0; c < 16; c++) sum[c] += a * qe_bf16_to_f32(B[fa_off<LB>(k, tn * 16 + c, ldb)]);
            }
            for (int c = 0; c < 16; c++) C[(size_t)r * ldc + tn * 16 + c] = sum[c];
        }
    }
}
#endif

/* dst[r][0..hd) = src[base + (r0 + r)·stride + 0..hd) for r < n (zeros past T), 8 bf16 per load */
FA_DEV void fa_load(uint16_t *dst, int ld, const uint16_t *src, int64_t stride, int64_t base, int r0, int n, int T,
                        int hd) {
    int per = hd / 8;
    for (int t = FA_TID; t < n * per; t += FA_NT) {
        int r = t / per, c = (t % per) * 8;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (r0 + r < T) val = *(const uint4 *)(src + base + (int64_t)(r0 + r) * stride + c);
        *(uint4 *)(dst + (size_t)r * ld + c) = val;
    }
}

/* may query i see key j (both in [0, T)); sid NULL: one example */
FA_DEV int fa_allowed(const int32_t *sid, int i, int j, int T, int window) {
    return i < T && j < T && qe_attn_allowed(i, j, sid ? sid[i] : 0, sid ? sid[j] : 0, window);
}

/* Forward: block (query tile of BQ rows, head h, batch row b), BQ/16 warps (2·BQ threads). */
template <int BQ, int BK>
FA_GLOBAL void FA_BOUNDS(2 * BQ) k_flash_fwd(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                      const int32_t *seq, const int32_t *seglo,
                                                      const unsigned char *seg_ok, float *rmax, float *rinv, float *o,
                                                      uint16_t *ob, int T, int H, int KVH, int hd, int window,
                                                      float scale) {
    FA_SMEM(fsm);
    const fa_lay L = fa_layout(0, BQ, BK, hd);
    uint16_t *Qs = (uint16_t *)(fsm + L.q), *Ks = (uint16_t *)(fsm + L.k), *Vs = (uint16_t *)(fsm + L.v),
             *Ps = (uint16_t *)(fsm + L.p);
    float *Ss = (float *)(fsm + L.s), *Os = (float *)(fsm + L.acc), *Ms = (float *)(fsm + L.st), *Ls = Ms + BQ,
          *Cs = Ms + 2 * BQ;
    const int b = FA_BZ, h = FA_BY, g = h / (H / KVH), i0 = FA_BX * BQ, iend = fa_min(T, i0 + BQ);
    const int ldh = fa_ldh(hd), ldo = fa_ldf(hd), lds = fa_ldf(BK), ldp = fa_ldh(BK), tid = FA_TID;
    const int64_t qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    const int32_t *sid = seq ? seq + (int64_t)b * T : NULL;
    fa_load(Qs, ldh, q, qs, (int64_t)b * T * qs + (int64_t)h * hd, i0, BQ, T, hd);
    for (int t = tid; t < BQ * ldo; t += FA_NT) Os[t] = 0.0f;
    if (tid < BQ) {
        Ms[tid] = -INFINITY;
        Ls[tid] = 0.0f;
    }
    const int klo = qe_attn_lo(seg_ok[b], seglo[(int64_t)b * T + i0], window, i0); /* the tile's first key */
    for (int j0 = (klo / BK) * BK; j0 < iend; j0 += BK) {
        FA_SYNC();
        fa_load(Ks, ldh, k, ks, (int64_t)b * T * ks + (int64_t)g * hd, j0, BK, T, hd);
        fa_load(Vs, ldh, v, ks, (int64_t)b * T * ks + (int64_t)g * hd, j0, BK, T, hd);
        FA_SYNC();
        fa_mma<fa_row, fa_col>(Ss, lds, Qs, ldh, Ks, ldh, BQ, BK, hd, 0); /* S = Q Kᵀ */
        FA_SYNC();
        if (tid < BQ) {
            const int i = i0 + tid;
            float *srow = Ss + (size_t)tid * lds;
            for (int jj = 0; jj < BK; jj++)
                srow[jj] = fa_allowed(sid, i, j0 + jj, T, window) ? srow[jj] * scale : -INFINITY;
            float m = Ms[tid], l = Ls[tid];
            Cs[tid] = qe_flash_row_update(srow, BK, &m, &l);
            Ms[tid] = m;
            Ls[tid] = l;
            for (int jj = 0; jj < BK; jj++) Ps[(size_t)tid * ldp + jj] = qe_f32_to_bf16(srow[jj]);
        }
        FA_SYNC();
        for (int t = tid; t < BQ * hd; t += FA_NT) Os[(size_t)(t / hd) * ldo + t % hd] *= Cs[t / hd];
        FA_SYNC();
        fa_mma<fa_row, fa_row>(Os, ldo, Ps, ldp, Vs, ldh, BQ, hd, BK, 1); /* O += P V */
    }
    FA_SYNC();
    if (tid < BQ) Cs[tid] = tid < iend - i0 ? 1.0f / Ls[tid] : 0.0f;
    FA_SYNC();
    if (tid < iend - i0) {
        int64_t st = ((int64_t)b * H + h) * T + i0 + tid;
        rmax[st] = Ms[tid];
        rinv[st] = Cs[tid];
    }
    for (int t = tid; t < (iend - i0) * hd; t += FA_NT) {
        int r = t / hd, d = t % hd;
        int64_t oo = ((int64_t)b * T + i0 + r) * qs + (int64_t)h * hd + d;
        float val = Os[(size_t)r * ldo + d] * Cs[r];
        o[oo] = val;
        if (ob) ob[oo] = qe_f32_to_bf16(val);
    }
}

/* Backward, query side: block (query tile, head, batch row). Pass 0 sums a_i = Σ_j p_ij dP_ij
 * (double, key order), pass 1 forms dS and dQ += dS K; a_i is saved for the key side. */
template <int BQ, int BK>
FA_GLOBAL void FA_BOUNDS(2 * BQ) k_flash_bwd_q(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                        const uint16_t *dob, const int32_t *seq, const int32_t *seglo,
                                                        const unsigned char *seg_ok, const float *rmax,
                                                        const float *rinv, float *arow, float *dq, int T, int H,
                                                        int KVH, int hd, int window, float scale) {
    FA_SMEM(fsm);
    const fa_lay L = fa_layout(1, BQ, BK, hd);
    uint16_t *Qs = (uint16_t *)(fsm + L.q), *Ds = (uint16_t *)(fsm + L.d), *Ks = (uint16_t *)(fsm + L.k),
             *Vs = (uint16_t *)(fsm + L.v), *dSs = (uint16_t *)(fsm + L.ds);
    float *Ss = (float *)(fsm + L.s), *dPs = (float *)(fsm + L.dp), *dQs = (float *)(fsm + L.acc),
          *Ms = (float *)(fsm + L.st), *Is = Ms + BQ, *As = Ms + 2 * BQ;
    const int b = FA_BZ, h = FA_BY, g = h / (H / KVH), i0 = FA_BX * BQ, iend = fa_min(T, i0 + BQ);
    const int ldh = fa_ldh(hd), ldo = fa_ldf(hd), lds = fa_ldf(BK), ldp = fa_ldh(BK), tid = FA_TID;
    const int64_t qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    const int32_t *sid = seq ? seq + (int64_t)b * T : NULL;
    fa_load(Qs, ldh, q, qs, (int64_t)b * T * qs + (int64_t)h * hd, i0, BQ, T, hd);
    fa_load(Ds, ldh, dob, qs, (int64_t)b * T * qs + (int64_t)h * hd, i0, BQ, T, hd);
    for (int t = tid; t < BQ * ldo; t += FA_NT) dQs[t] = 0.0f;
    if (tid < BQ) {
        int live = i0 + tid < T;
        int64_t st = ((int64_t)b * H + h) * T + i0 + tid;
        Ms[tid] = live ? rmax[st] : 0.0f;
        Is[tid] = live ? rinv[st] : 0.0f;
    }
    const int klo = qe_attn_lo(seg_ok[b], seglo[(int64_t)b * T + i0], window, i0);
    double a = 0.0;
    for (int pass = 0; pass < 2; pass++) {
        FA_SYNC();
        if (pass == 1 && tid < BQ) As[tid] = (float)a;
        for (int j0 = (klo / BK) * BK; j0 < iend; j0 += BK) {
            FA_SYNC();
            fa_load(Ks, ldh, k, ks, (int64_t)b * T * ks + (int64_t)g * hd, j0, BK, T, hd);
            fa_load(Vs, ldh, v, ks, (int64_t)b * T * ks + (int64_t)g * hd, j0, BK, T, hd);
            FA_SYNC();
            fa_mma<fa_row, fa_col>(Ss, lds, Qs, ldh, Ks, ldh, BQ, BK, hd, 0);  /* S = Q Kᵀ */
            fa_mma<fa_row, fa_col>(dPs, lds, Ds, ldh, Vs, ldh, BQ, BK, hd, 0); /* dP = dO Vᵀ */
            FA_SYNC();
            if (tid < BQ) {
                const int i = i0 + tid;
                const float *srow = Ss + (size_t)tid * lds, *drow = dPs + (size_t)tid * lds;
                for (int jj = 0; jj < BK; jj++) {
                    int al = fa_allowed(sid, i, j0 + jj, T, window);
                    float p = al ? qe_attn_p(srow[jj] * scale, Ms[tid], Is[tid]) : 0.0f;
                    if (pass == 0) {
                        if (al) a += qe_attn_a_term(p, drow[jj]);
                    } else {
                        dSs[(size_t)tid * ldp + jj] = qe_f32_to_bf16(al ? qe_attn_ds(p, drow[jj], As[tid], scale) : 0.0f);
                    }
                }
            }
            if (pass == 1) {
                FA_SYNC();
                fa_mma<fa_row, fa_row>(dQs, ldo, dSs, ldp, Ks, ldh, BQ, hd, BK, 1); /* dQ += dS K */
            }
        }
    }
    FA_SYNC();
    if (tid < iend - i0) arow[((int64_t)b * H + h) * T + i0 + tid] = As[tid];
    if (dq)
        for (int t = tid; t < (iend - i0) * hd; t += FA_NT) {
            int r = t / hd, d = t % hd;
            dq[((int64_t)b * T + i0 + r) * qs + (int64_t)h * hd + d] += dQs[(size_t)r * ldo + d];
        }
}

/* Backward, key side: block (key tile of BK rows, kv group g, batch row b), over the group's heads
 * and the query tiles that see the key tile, in order: dV += Pᵀ dO, dK += dSᵀ Q. */
template <int BQ, int BK>
FA_GLOBAL void FA_BOUNDS(2 * BQ) k_flash_bwd_kv(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                         const uint16_t *dob, const int32_t *seq,
                                                         const int32_t *seglo, const unsigned char *seg_ok,
                                                         const float *rmax, const float *rinv, const float *arow,
                                                         float *dk, float *dv, int T, int H, int KVH, int hd,
                                                         int window, float scale) {
    FA_SMEM(fsm);
    const fa_lay L = fa_layout(2, BQ, BK, hd);
    uint16_t *Qs = (uint16_t *)(fsm + L.q), *Ds = (uint16_t *)(fsm + L.d), *Ks = (uint16_t *)(fsm + L.k),
             *Vs = (uint16_t *)(fsm + L.v), *Ps = (uint16_t *)(fsm + L.p), *dSs = (uint16_t *)(fsm + L.ds);
    float *Ss = (float *)(fsm + L.s), *dPs = (float *)(fsm + L.dp), *dKs = (float *)(fsm + L.acc),
          *dVs = (float *)(fsm + L.acc2), *Ms = (float *)(fsm + L.st), *Is = Ms + BQ, *As = Ms + 2 * BQ;
    const int b = FA_BZ, g = FA_BY, grp = H / KVH, j0 = FA_BX * BK, jend = fa_min(T, j0 + BK);
    const int ldh = fa_ldh(hd), ldo = fa_ldf(hd), lds = fa_ldf(BK), ldp = fa_ldh(BK), tid = FA_TID;
    const int64_t qs = (int64_t)H * hd, ks = (int64_t)KVH * hd;
    const int32_t *sid = seq ? seq + (int64_t)b * T : NULL;
    const int ok = seg_ok[b];
    fa_load(Ks, ldh, k, ks, (int64_t)b * T * ks + (int64_t)g * hd, j0, BK, T, hd);
    fa_load(Vs, ldh, v, ks, (int64_t)b * T * ks + (int64_t)g * hd, j0, BK, T, hd);
    for (int t = tid; t < BK * ldo; t += FA_NT) {
        dKs[t] = 0.0f;
        dVs[t] = 0.0f;
    }
    for (int h = g * grp; h < (g + 1) * grp; h++) {
        for (int i0 = (j0 / BQ) * BQ; i0 < T; i0 += BQ) {
            /* the first query of the tile sees no key before its lower bound; later queries' bounds are no lower */
            if (qe_attn_lo(ok, seglo[(int64_t)b * T + i0], window, i0) > jend - 1) break;
            FA_SYNC();
            fa_load(Qs, ldh, q, qs, (int64_t)b * T * qs + (int64_t)h * hd, i0, BQ, T, hd);
            fa_load(Ds, ldh, dob, qs, (int64_t)b * T * qs + (int64_t)h * hd, i0, BQ, T, hd);
            if (tid < BQ) {
                int live = i0 + tid < T;
                int64_t st = ((int64_t)b * H + h) * T + i0 + tid;
                Ms[tid] = live ? rmax[st] : 0.0f;
                Is[tid] = live ? rinv[st] : 0.0f;
                As[tid] = live ? arow[st] : 0.0f;
            }
            FA_SYNC();
            fa_mma<fa_row, fa_col>(Ss, lds, Qs, ldh, Ks, ldh, BQ, BK, hd, 0);  /* S = Q Kᵀ */
            fa_mma<fa_row, fa_col>(dPs, lds, Ds, ldh, Vs, ldh, BQ, BK, hd, 0); /* dP = dO Vᵀ */
            FA_SYNC();
            if (tid < BQ) {
                const int i = i0 + tid;
                const float *srow = Ss + (size_t)tid * lds, *drow = dPs + (size_t)tid * lds;
                for (int jj = 0; jj < BK; jj++) {
                    float p = 0.0f, ds = 0.0f;
                    if (fa_allowed(sid, i, j0 + jj, T, window)) {
                        p = qe_attn_p(srow[jj] * scale, Ms[tid], Is[tid]);
                        ds = qe_attn_ds(p, drow[jj], As[tid], scale);
                    }
                    Ps[(size_t)tid * ldp + jj] = qe_f32_to_bf16(p);
                    dSs[(size_t)tid * ldp + jj] = qe_f32_to_bf16(ds);
                }
            }
            FA_SYNC();
            fa_mma<fa_col, fa_row>(dVs, ldo, Ps, ldp, Ds, ldh, BK, hd, BQ, 1);  /* dV += Pᵀ dO */
            fa_mma<fa_col, fa_row>(dKs, ldo, dSs, ldp, Qs, ldh, BK, hd, BQ, 1); /* dK += dSᵀ Q */
        }
    }
    FA_SYNC();
    for (int t = tid; t < (jend - j0) * hd; t += FA_NT) {
        int r = t / hd, d = t % hd;
        int64_t ko = ((int64_t)b * T + j0 + r) * ks + (int64_t)g * hd + d;
        if (dk) dk[ko] += dKs[(size_t)r * ldo + d];
        if (dv) dv[ko] += dVs[(size_t)r * ldo + d];
    }
}


#endif
