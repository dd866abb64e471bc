/* autograd/backend_cuda_elem.h — the per-element maths of the CUDA backend
 * (autograd/backend_cuda.cu) as `__host__ __device__` functions, so that the
 * very functions the kernels run are also run on the CPU by
 * tests/test_cuda_elem.cu (compiled by nvcc, run in `make test` without a
 * GPU) and checked bit for bit against the CPU backend (autograd/backend_cpu*).
 *
 * Each function repeats the CPU kernel's operations in the CPU kernel's order
 * (the scalar `cpu-ref` branch where the `cpu` table has an AVX-512 path; the
 * vector paths are bit-identical to it, tests/test_backend_ops.c). The device
 * code is compiled with --fmad=false (no contraction of a·b + c into an FMA,
 * as GCC in ISO C mode, -ffp-contract=off, does not contract), IEEE division
 * and square root (nvcc's default -prec-div=true -prec-sqrt=true), so these
 * operations round exactly as on the CPU.
 *
 * Only included by CUDA translation units (nvcc); it is C++.
 */
#ifndef QLORA_AUTOGRAD_BACKEND_CUDA_ELEM_H
#define QLORA_AUTOGRAD_BACKEND_CUDA_ELEM_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define QE __host__ __device__ __forceinline__
#else
#define QE static inline
#endif

/* ---- bit casts ---- */
QE uint32_t qe_f2u(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}

QE float qe_u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* core/bf16.h f32_to_bf16: round to nearest even, NaN kept quiet. */
QE uint16_t qe_f32_to_bf16(float f) {
    uint32_t u = qe_f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

QE float qe_bf16_to_f32(uint16_t h) { return qe_u2f((uint32_t)h << 16); }

/* ---- autograd/exp_poly.h exp_poly, the same operations ---- */
QE float qe_exp_poly(float x) {
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
    return y * qe_u2f((uint32_t)((int32_t)n + 127) << 23);
}

/* ---- core/rng.h: splitmix64 counter-based draws ---- */
QE uint64_t qe_mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

QE uint64_t qe_rng_u64(uint64_t seed, uint64_t stream, uint64_t counter) {
    return qe_mix64(qe_mix64(seed ^ qe_mix64(stream)) ^ counter);
}

QE float qe_rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
    return (float)(qe_rng_u64(seed, stream, counter) >> 40) * (1.0f / 16777216.0f);
}

/* Dropout keep bit of element i (backend_cpu_kernels.inc dropout_keep). */
QE int qe_dropout_keep(uint64_t seed, uint64_t stream, int64_t i, float p) {
    return qe_rng_uniform(seed, stream, (uint64_t)i) >= p;
}

/* The sampled label's 53-bit uniform of row n (backend_cpu_nn.inc uniform53). */
QE double qe_uniform53(uint64_t seed, uint64_t stream, uint64_t n) {
    return (double)(qe_rng_u64(seed, stream, n) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- NF4 (quant/nf4.c nf4_block_absmax, nf4_dequantize_rows_*_ref) ---- */

/* Block scale: fp32 absmax, or with double quantization fl(fl(code[q]·nested) + offset). */
QE float qe_nf4_absmax(int double_quant, const float *absmax, const uint8_t *absmax_q, const float *nested_code,
                       const float *nested_absmax, float offset, int64_t b) {
    if (!double_quant) return absmax[b];
    const float s = nested_code[absmax_q[b]] * nested_absmax[b / 256];
    return s + offset;
}

/* Element i of the flattened weight: code[nibble] · absmax (even element in the high nibble). */
QE float qe_nf4_value(const float *code16, const uint8_t *packed, int64_t i, float absmax) {
    const uint8_t byte = packed[i >> 1];
    const uint8_t q = (i & 1) ? (uint8_t)(byte & 0x0f) : (uint8_t)(byte >> 4);
    return code16[q] * absmax;
}

/* ---- int8 (quant/int8.c int8_dequantize_rows_*_ref: bitsandbytes MatMul8bitFp) ---- */

/* Element i of the flattened (., cols) weight: (float)cb[i] · (scb[row] · (float)(1/127)). */
QE float qe_int8_value(const int8_t *cb, const float *scb, int64_t i, int64_t cols) {
    const float rs = scb[i / cols] * 7.874015718698502e-3f;
    return (float)cb[i] * rs;
}

/* ---- RMSNorm (backend_cpu_nn.inc cpu_rmsnorm_fwd/bwd) ---- */

/* rstd from the row's sum of squares (double) */
QE float qe_rmsnorm_rstd(double ss, int64_t D, float eps) { return 1.0f / sqrtf((float)(ss / (double)D) + eps); }
QE float qe_rmsnorm_y(float w, float x, float r) { return w * (x * r); }
/* c = (Σ dy·w·x / D)·r³ from the row dot (double) */
QE float qe_rmsnorm_c(double dot, int64_t D, float r) { return (float)(dot / (double)D) * r * r * r; }
/* dx increment r·w·g − c·x */
QE float qe_rmsnorm_dx(float r, float w, float g, float c, float x) { return r * w * g - c * x; }
/* the term of the row dot: (double)g·w·x in the CPU's order ((double)g · w) · x */
QE double qe_rmsnorm_dot_term(float g, float w, float x) { return (double)g * w * x; }
/* dw increment g·x·r */
QE float qe_rmsnorm_dw(float g, float x, float r) { return g * x * r; }

/* ---- RoPE pair rotation (backend_cpu_nn.inc rope_apply): sign +1 forward, −1 backward ---- */
QE void qe_rope_pair(float x1, float x2, float c, float s, float sign, float *a, float *b) {
    float sn = sign * s;
    *a = x1 * c - x2 * sn;
    *b = x2 * c + x1 * sn;
}

/* ---- SwiGLU (backend_cpu_nn.inc, the scalar loop) ---- */
QE float qe_swiglu_y(float g, float u) { return g / (1.0f + qe_exp_poly(-g)) * u; }
/* dg and du increments: dy·u·(σ + gσ(1−σ)) and dy·gσ */
QE void qe_swiglu_bwd(float g, float u, float dy, float *dg_inc, float *du_inc) {
    float sg = 1.0f / (1.0f + qe_exp_poly(-g));
    float silu = g * sg;
    *du_inc = dy * silu;
    *dg_inc = dy * u * (sg + g * sg * (1.0f - sg));
}

/* GeGLU's tanh GELU (torch's gelu(approximate="tanh") formulas; backend_cpu_nn.inc cpu_geglu_*) */
QE float qe_gelu_tanh(float x) {
    float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
}

QE void qe_geglu_bwd(float x, float u, float dy, float *dg_inc, float *du_inc) {
    float x_sq = x * x, x_cube = x_sq * x;
    float t = tanhf(0.7978845608028654f * (x + 0.044715f * x_cube));
    float left = 0.5f * x, right = 1.0f + t;
    float dgelu = 0.5f * right + left * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x_sq);
    *du_inc = dy * (left * right);
    *dg_inc = dy * u * dgelu;
}

/* ---- AdamW element (backend_cpu_optim.inc cpu_adamw_update, torch's sequence) ---- */
typedef struct qe_adamw_c {
    int decay, lerp_small;
    float decay_f, lerp_coeff, beta2_f, one_minus_beta2_f, bc2_sqrt_f, eps_f, neg_step_f;
} qe_adamw_c;

QE void qe_adamw(float *pp, float g, float *mp, float *vp, int masked_in, const qe_adamw_c *c) {
    float p = *pp;
    if (c->decay && masked_in) p = p * c->decay_f;
    const float mi = *mp;
    const float diff = g - mi;
    const float mn = fmaf(c->lerp_coeff, diff, c->lerp_small ? mi : g);
    float vn = *vp * c->beta2_f;
    float t = c->one_minus_beta2_f * g;
    t = t * g;
    vn = vn + t;
    float denom = sqrtf(vn);
    denom = denom / c->bc2_sqrt_f;
    denom = denom + c->eps_f;
    float u = c->neg_step_f * mn;
    u = u / denom;
    p = p + u;
    *mp = mn;
    *vp = vn;
    *pp = p;
}

/* ---- bitsandbytes' 8-bit blockwise AdamW and its 32-bit update (backend_cpu_optim.inc
 * cpu_adamw8bit_update / cpu_adamw_bnb32_update, bitsandbytes' CPU sequence) ----
 * The CPU takes torch.sqrt as torch 2.15's AVX-512 kernel does (rsqrt14 refined by one Newton step:
 * one ulp from the IEEE root for ~0.7 % of inputs); a GPU has no rsqrt14, so the root is an argument:
 * the kernels pass IEEE sqrtf (what bitsandbytes' own CUDA kernels take), the host test both roots.
 * The moments do not depend on the root, so moments, absmax and codes are the CPU's bit for bit. */
typedef struct qe_adamw8bit_c {
    int decay;
    float decay_f, beta1_f, one_minus_beta1_f, beta2_f, one_minus_beta2_f, correction2_f, eps_f, step8_f, eps_c2_f,
        step32_f;
} qe_adamw8bit_c;

/* m.mul_(b1).add_(g, alpha=1-b1) and v.mul_(b2).addcmul_(g, g, value=1-b2): one FMA each. */
QE void qe_bnb_moments(float g, float *mp, float *vp, const qe_adamw8bit_c *c) {
    *mp = fmaf(g, c->one_minus_beta1_f, *mp * c->beta1_f);
    *vp = fmaf(c->one_minus_beta2_f * g, g, *vp * c->beta2_f);
}

/* 8-bit: denom = sqrt(v)/c2 + eps; p.mul_(1-lr*wd); p.addcdiv_(m, denom, value=-lr/c1). */
QE float qe_adamw8bit_param(float p, float m, float sqrt_v, const qe_adamw8bit_c *c) {
    float denom = sqrt_v / c->correction2_f;
    denom = denom + c->eps_f;
    if (c->decay) p = p * c->decay_f;
    const float u = (c->step8_f * m) / denom;
    return p + u;
}

/* 32-bit: p.mul_(1-lr*wd); p.add_(m / (sqrt(v) + eps*c2), alpha=-lr*c2/c1) (one FMA). */
QE float qe_adamw_bnb32_param(float p, float m, float sqrt_v, const qe_adamw8bit_c *c) {
    if (c->decay) p = p * c->decay_f;
    const float u = m / (sqrt_v + c->eps_c2_f);
    return fmaf(u, c->step32_f, p);
}

/* quant/blockwise8.h bw8_index: the code index of x in a block of reciprocal absmax inv (65536-bin
 * table `lut`, BW8_LUT_SIZE entries); NaN clamps to -1 as there. */
QE uint8_t qe_bw8_index(const uint8_t *lut, float x, float inv_absmax) {
    float v = x * inv_absmax;
    v = v > -1.0f ? v : -1.0f;
    v = v < 1.0f ? v : 1.0f;
    float t = v + 1.0f;
    t = t * 0.5f;
    t = t * 65535.0f;
    t = t + 0.5f;
    return lut[(int)t];
}

/* ---- SophiaG element (backend_cpu_optim.inc cpu_sophia_update); returns |m| < ρ·bs·h ---- */
typedef struct qe_sophia_c {
    float decay_f, beta1_f, one_minus_beta1_f, rho_bs_f, eps_f, neg_lr_f;
} qe_sophia_c;

QE float qe_sign(float x) { return (float)((0.0f < x) - (x < 0.0f)); }

QE int qe_sophia(float *pp, float g, float *mp, float h, int masked_in, const qe_sophia_c *c) {
    float p = *pp;
    if (masked_in) p = p * c->decay_f;
    const float mn = fmaf(g, c->one_minus_beta1_f, *mp * c->beta1_f);
    float denom = h * c->rho_bs_f;
    denom = denom + c->eps_f;
    float ratio = fabsf(mn) / denom;
    ratio = ratio > 1.0f ? 1.0f : ratio;
    int win = fabsf(mn) < h * c->rho_bs_f;
    p = fmaf(c->neg_lr_f * qe_sign(mn), ratio, p);
    *mp = mn;
    *pp = p;
    return win;
}

QE float qe_sophia_hessian(float h, float g, float beta2_f, float one_minus_beta2_f) {
    return fmaf(one_minus_beta2_f * g, g, h * beta2_f);
}

/* ---- softmax / cross-entropy row statistics ---- */

/* logf as glibc (and musl) compute it: Arm's optimized-routines logf (Szabolcs Nagy 2017,
 * MIT licence; glibc sysdeps/ieee754/flt-32/e_logf.c and e_logf_data.c), its table and
 * polynomial in double, rounded once to fp32, so that the device's log-sum-exp equals the CPU's
 * (CUDA's own logf differs from glibc's in the last place for ~0.1 % of inputs).
 * tests/test_cuda_elem.cu compares it with the host's logf over 1.2e7 values. Positive normal
 * finite x (a softmax sum is >= 1); anything else takes a double log. */
QE float qe_logf(float x) {
    const double T[16][2] = {
        {0x1.661ec79f8f3bep+0, -0x1.57bf7808caadep-2}, {0x1.571ed4aaf883dp+0, -0x1.2bef0a7c06ddbp-2},
        {0x1.49539f0f010bp+0, -0x1.01eae7f513a67p-2},  {0x1.3c995b0b80385p+0, -0x1.b31d8a68224e9p-3},
        {0x1.30d190c8864a5p+0, -0x1.6574f0ac07758p-3}, {0x1.25e227b0b8eap+0, -0x1.1aa2bc79c81p-3},
        {0x1.1bb4a4a1a343fp+0, -0x1.a4e76ce8c0e5ep-4}, {0x1.12358f08ae5bap+0, -0x1.1973c5a611cccp-4},
        {0x1.0953f419900a7p+0, -0x1.252f438e10c1ep-5}, {0x1p+0, 0x0p+0},
        {0x1.e608cfd9a47acp-1, 0x1.aa5aa5df25984p-5},  {0x1.ca4b31f026aap-1, 0x1.c5e53aa362eb4p-4},
        {0x1.b2036576afce6p-1, 0x1.526e57720db08p-3},  {0x1.9c2d163a1aa2dp-1, 0x1.bc2860d22477p-3},
        {0x1.886e6037841edp-1, 0x1.1058bc8a07ee1p-2},  {0x1.767dcf5534862p-1, 0x1.4043057b6ee09p-2}};
    const double Ln2 = 0x1.62e42fefa39efp-1;
    const double A0 = -0x1.00ea348b88334p-2, A1 = 0x1.5575b0be00b6ap-2, A2 = -0x1.ffffef20a4123p-2;
    uint32_t ix = qe_f2u(x);
    if (ix == 0x3f800000u) return 0.0f;
    if (ix - 0x00800000u >= 0x7f800000u - 0x00800000u) return (float)log((double)x);
    uint32_t tmp = ix - 0x3f330000u;
    int i = (int)((tmp >> 19) % 16);
    int k = (int32_t)tmp >> 23;
    uint32_t iz = ix - (tmp & 0x1ffu << 23);
    double z = (double)qe_u2f(iz);
    double r = z * T[i][0] - 1.0;
    double y0 = T[i][1] + (double)k * Ln2;
    double r2 = r * r;
    double y = A1 * r + A2;
    y = A0 * r2 + y;
    y = y * r2 + (y0 + r);
    return (float)y;
}
QE float qe_lse(float mx, float sum) { return mx + qe_logf(sum); }
/* gradient of the logit j: scale·(p − [j = target]) as the CPU writes it */
QE float qe_ce_grad(float logit, float lse, float scale) { return qe_exp_poly(logit - lse) * scale; }
QE float qe_ce_grad_target(float logit, float lse, float scale) { return qe_exp_poly(logit - lse) * scale - scale; }

/* Inverse CDF of softmax(li − lse) at u (backend_cpu_nn.inc sample_row): the smallest j whose
 * prefix sum of p_j = exp_poly(li[j] − lse) (fp32 terms, double sums in j order) exceeds u·Σp. */
QE int32_t qe_sample_row(const float *li, int64_t V, float lse, double u) {
    double total = 0.0;
    for (int64_t j = 0; j < V; j++) total += (double)qe_exp_poly(li[j] - lse);
    const double target = u * total;
    double cum = 0.0;
    for (int64_t j = 0; j < V; j++) {
        const float pj = qe_exp_poly(li[j] - lse);
        if (!(pj > 0.0f)) continue;
        cum += (double)pj;
        if (cum > target) return (int32_t)j;
    }
    for (int64_t j = V - 1; j > 0; j--)
        if (qe_exp_poly(li[j] - lse) > 0.0f) return (int32_t)j;
    return 0;
}

/* ---- sum of squares (backend_cpu_optim.inc cpu_sum_squares): fixed chunking ---- */
#define QE_CLIP_MAX_CHUNKS 256
#define QE_CLIP_MIN_CHUNK 8192

QE int64_t qe_sumsq_nchunks(int64_t n) {
    int64_t nc = (n + QE_CLIP_MIN_CHUNK - 1) / QE_CLIP_MIN_CHUNK;
    return nc > QE_CLIP_MAX_CHUNKS ? QE_CLIP_MAX_CHUNKS : nc;
}

/* Lane l's accumulator of a chunk (elements i0 + l, i0 + l + 8, ...), in order. */
QE double qe_sumsq_lane(const float *g, int64_t len, int l) {
    double acc = 0.0;
    for (int64_t i = l; i < len; i += 8) acc += (double)g[i] * (double)g[i];
    return acc;
}

QE double qe_sumsq_combine(const double a[8]) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

/* ---- attention: the mask rule, the online softmax of the flash kernels, the backward's p and dS ----
 * (backend_cpu_nn.inc attn_seg_lo / attn_window_lo / attn_range / attn_allowed, cpu_attention_bwd) */

/* attn_seg_lo then attn_window_lo for one batch row of T seq ids (sid NULL: one example): lo[i] is
 * the first key token i may see when the row's examples are contiguous runs; returns that flag
 * (seg_ok). The window narrows [lo, i] to [max(lo, i − window + 1), i]. */
QE int qe_attn_seg_lo(const int32_t *sid, int T, int window, int32_t *lo) {
    int ok = 1;
    for (int i = 0; i < T; i++) {
        if (!sid) lo[i] = 0;
        else if (i > 0 && sid[i] == sid[i - 1]) lo[i] = lo[i - 1];
        else {
            lo[i] = i;
            for (int j = 0; j < i && ok; j++)
                if (sid[j] == sid[i]) ok = 0;
        }
    }
    if (window > 0)
        for (int i = 0; i < T; i++)
            if (lo[i] < i - window + 1) lo[i] = i - window + 1;
    return ok;
}

/* attn_range's lower end: keys of query i lie in [lo, i]; every key there is allowed when seg_ok. */
QE int qe_attn_lo(int seg_ok, int32_t seglo_i, int window, int i) {
    if (seg_ok) return seglo_i;
    return window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
}

/* attn_allowed: query i sees key j (causal, same example id, inside the window). sid_i, sid_j are
 * the two tokens' seq ids (equal values when the row has none). */
QE int qe_attn_allowed(int i, int j, int32_t sid_i, int32_t sid_j, int window) {
    return j <= i && sid_j == sid_i && (!window || i - j < window);
}

/* One query row's step of the flash forward over a key tile (online softmax: Milakov & Gimelshein
 * 2018, Dao et al. 2022). s[0..n): the tile's scores scale·q·k, −INFINITY where the mask forbids
 * the key; *m, *l: the running max and sum (−INFINITY and 0 before the first tile). Overwrites s
 * with p_j = exp_poly(s_j − m_new) (0 where masked), sets *l = *l·c + Σ_j p_j (j order, fp32) and
 * *m = m_new, and returns c = exp_poly(m_old − m_new), the factor the row's output accumulator is
 * rescaled by (0 before the first allowed key, 1 while the max stays). A row whose keys all fall
 * in one tile gets the CPU's max and sum bit for bit (the general mask path's j-order loops). */
QE float qe_flash_row_update(float *s, int n, float *m, float *l) {
    float tmax = -INFINITY;
    for (int j = 0; j < n; j++)
        if (s[j] > tmax) tmax = s[j];
    float mn = tmax > *m ? tmax : *m;
    if (mn == -INFINITY) { /* nothing allowed so far */
        for (int j = 0; j < n; j++) s[j] = 0.0f;
        return 1.0f;
    }
    float c = *m == -INFINITY ? 0.0f : qe_exp_poly(*m - mn);
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        float p = s[j] == -INFINITY ? 0.0f : qe_exp_poly(s[j] - mn);
        s[j] = p;
        sum += p;
    }
    *l = *l * c + sum;
    *m = mn;
    return c;
}

/* The backward's probability again from the saved row statistics (rmax, rinv = 1/sum), as
 * cpu_attention_bwd recomputes it: s = scale·q·k. */
QE float qe_attn_p(float s, float rmax, float rinv) { return qe_exp_poly(s - rmax) * rinv; }
/* one term of a_i = Σ_j p_ij·dP_ij (row_dot_f64: double products, summed in j order) */
QE double qe_attn_a_term(float p, float dp) { return (double)p * (double)dp; }
/* dS_ij = p_ij·(dP_ij − a_i)·scale (row_dsoftmax) */
QE float qe_attn_ds(float p, float dp, float a, float scale) { return p * (dp - a) * scale; }

#endif
