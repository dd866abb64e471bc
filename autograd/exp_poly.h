/* autograd/exp_poly.h — expf for softmax-like loops: Cephes' single-precision
 * polynomial (Moshier, cephes/single/expf.c) after range reduction
 * x = n·ln2 + r; max relative error ≈ 2e-7 on [-87, 88].
 *
 * Written branch-free so `omp simd` loops vectorize it (glibc's expf only
 * vectorizes under -ffast-math, which we do not use). The softmax of the LM
 * head (autograd/ops.c) and the label sampling of Sophia's estimator
 * (autograd/ce_sampled.c) use this one function, so they agree to the last bit
 * on the same logits; ops.c's AVX-512 exp_poly16 is it lane by lane.
 *
 * Evaluated with fused multiply-adds (fmaf: one rounding each): the range
 * reduction n = floor(x·log2e + 0.5), r = x − n·C1 + n·C2, the five Horner
 * steps and y = (p·r)·r + r, then + 1: 24 → 15 vector instructions per 16
 * lanes at the same accuracy (largest relative error against double exp over
 * [-80, 80]: 8.5e-8, with separate multiply and add 8.2e-8), which is
 * what the softmax rows of attention and the LM head, SwiGLU's sigmoid and
 * Sophia's sampling spend most of their arithmetic on. fmaf is exact
 * (correctly rounded) on every target: the FMA instruction where the
 * compiler has it, glibc's correctly rounded fmaf otherwise, __fmaf_rn on a
 * CUDA device (autograd/backend_cuda_elem.h's qe_exp_poly, the same steps),
 * so the scalar, AVX-512 and CUDA versions still agree bit for bit.
 */
#ifndef QLORA_AUTOGRAD_EXP_POLY_H
#define QLORA_AUTOGRAD_EXP_POLY_H

#include <math.h>
#include <stdint.h>

static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    float r = fmaf(-n, 0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    float y = fmaf(p * r, r, r) + 1.0f;
    union {
        uint32_t u;
        float f;
    } sc;
    sc.u = (uint32_t)((int32_t)n + 127) << 23;
    return y * sc.f;
}

#endif
