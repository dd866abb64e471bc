/* autograd/ce_sampled.c — sampled-label LM head + cross-entropy for Sophia's
 * Gauss-Newton-Bartlett estimator (see ce_sampled.h).
 *
 * The pass is op_lm_head_ce's (op_lm_head_ce_pick in ops.c, the backend's
 * lm_head_ce entry: chunks of 128 rows of logits, max / log-sum-exp in fp32
 * with the Cephes expf polynomial, the logit gradient scale·(p − onehot)
 * written straight into the GEMM operand) in its AG_CE_SAMPLED mode: once the
 * softmax of a row is known, its label is drawn by inverting the CDF with one
 * counter-based uniform (autograd/backend_cpu_kernels.inc sample_row), inside
 * the kernel, with no host callback.
 */
#include "autograd/ce_sampled.h"

tensor *op_lm_head_ce_sampled(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *mask,
                              uint64_t seed, float scale, int32_t *labels, double *loss_sum, int64_t *n_tokens) {
    return op_lm_head_ce_pick(ctx, h, w, mask, AG_CE_SAMPLED, seed, scale, labels, loss_sum, n_tokens);
}
