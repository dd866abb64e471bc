/* autograd/ce_sampled.c — sampled-label LM head + cross-entropy for Sophia's
 * Gauss-Newton-Bartlett estimator (see ce_sampled.h).
 *
 * The pass itself is op_lm_head_ce's (op_lm_head_ce_pick in ops.c: chunks of
 * 128 rows of logits, max / log-sum-exp in fp32 with the Cephes expf
 * polynomial, the logit gradient scale·(p − onehot) written straight into the
 * GEMM operand); this file adds the label of each row: once the softmax is
 * known, a draw by inverting its CDF with one counter-based uniform.
 */
#include "autograd/ce_sampled.h"

#include "autograd/exp_poly.h"
#include "core/rng.h"

/* Inverse CDF of softmax(li − lse) at u: the smallest j whose prefix sum of
 * p_j = exp(li[j] − lse) (fp32 terms, summed in double) exceeds u·Σ p. */
static int32_t sample_row(const float *li, int64_t V, float lse, double u) {
    double total = 0.0;
    for (int64_t j = 0; j < V; j++) total += (double)exp_poly(li[j] - lse);
    const double target = u * total;
    double cum = 0.0;
    for (int64_t j = 0; j < V; j++) {
        const float pj = exp_poly(li[j] - lse);
        if (!(pj > 0.0f)) continue;
        cum += (double)pj;
        if (cum > target) return (int32_t)j;
    }
    for (int64_t j = V - 1; j > 0; j--) /* u·total rounded up to the total */
        if (exp_poly(li[j] - lse) > 0.0f) return (int32_t)j;
    return 0;
}

/* Uniform double in [0, 1) with 53 random bits (row n of a draw). */
static inline double uniform53(uint64_t seed, uint64_t n) {
    return (double)(rng_u64(seed, CE_SAMPLE_STREAM, n) >> 11) * (1.0 / 9007199254740992.0);
}

/* ce_target_fn: the label of `row` drawn from its softmax; arg is the seed. */
static int32_t sample_target(const float *logits, int64_t V, float lse, int64_t row, const void *arg) {
    const uint64_t seed = *(const uint64_t *)arg;
    return sample_row(logits, V, lse, uniform53(seed, (uint64_t)row));
}

tensor *op_lm_head_ce_sampled(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *mask,
                              uint64_t seed, float scale, int32_t *labels, double *loss_sum, int64_t *n_tokens) {
    return op_lm_head_ce_pick(ctx, h, w, mask, sample_target, &seed, scale, labels, loss_sum, n_tokens);
}
