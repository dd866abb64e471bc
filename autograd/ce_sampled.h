/* autograd/ce_sampled.h — LM head + cross-entropy with labels sampled from the
 * model's own softmax: the loss of Sophia's Gauss-Newton-Bartlett (GNB)
 * Hessian estimator (Liu et al. 2023, arXiv 2305.14342, Algorithm 2; the
 * official train_sophiag.py samples ŷ ~ Categorical(logits) and takes the mean
 * cross-entropy with ŷ). Its gradient ĝ has mean zero; E[B·ĝ⊙ĝ] is the
 * diagonal of the Gauss-Newton matrix of the mean loss over B tokens.
 *
 * Like op_lm_head_ce (autograd/ops.h) the logits exist only `chunk` rows at a
 * time, and the gradient w.r.t. the hidden states is produced in the same
 * pass. Sampling is deterministic: row n draws one 53-bit uniform u from the
 * counter-based RNG (core/rng.h) at (seed, CE_SAMPLE_STREAM (autograd/backend.h), n) and takes the
 * smallest label whose softmax prefix sum (fp32 terms, summed in double)
 * exceeds u·Σp — the inverse CDF — so labels depend on the seed and the
 * logits only (not on thread count or chunking).
 */
#ifndef QLORA_AUTOGRAD_CE_SAMPLED_H
#define QLORA_AUTOGRAD_CE_SAMPLED_H

#include <stdint.h>

#include "autograd/ops.h"
#include "autograd/tensor.h"

/* Sampled-label LM head + cross-entropy:
 *   ŷ[n] ~ Categorical(softmax(h[n] Wᵀ))              for each row with mask[n] != -100
 *   loss = scale · Σ_{n: mask[n] != -100} −log softmax(h[n] Wᵀ)[ŷ[n]]
 * h (N, D) fp32 (N = B·T rows), W the frozen (V, D) head. mask (N) or NULL (=
 * every row): the training targets, used only to choose which positions are
 * sampled (the positions the training loss covers). The pass is
 * op_lm_head_ce's own (op_lm_head_ce_pick): the softmax, the sampling and the
 * gradient come from the same fp32 logits and log-sum-exp, so with the labels
 * drawn, loss and gradient equal op_lm_head_ce's bit for bit. The gradient
 * w.r.t. h is scale·(softmax − onehot(ŷ)) W, recorded as a leaf node. labels (N) or NULL receives ŷ (−100 where masked);
 * *loss_sum / *n_tokens (or NULL) the unscaled summed loss and the number of
 * sampled rows. Returns a 1-element tensor. */
tensor *op_lm_head_ce_sampled(ag_ctx *ctx, tensor *h, const frozen_weight *w, const int32_t *mask,
                              uint64_t seed, float scale, int32_t *labels, double *loss_sum, int64_t *n_tokens);

#endif
