/* optim/clip.h — gradient clipping by global L2 norm over a flat fp32 arena.
 *
 * Semantics of torch.nn.utils.clip_grad_norm_ (norm_type 2): total = ||g||_2
 * over all trainable gradients; clip_coef = max_norm / (total + 1e-6);
 * gradients are multiplied by min(clip_coef, 1). Since all LoRA gradients live
 * in one arena, the "norm of per-tensor norms" torch computes is the norm of
 * the arena.
 */
#ifndef QLORA_OPTIM_CLIP_H
#define QLORA_OPTIM_CLIP_H

#include <stdint.h>

#include "autograd/backend.h"

/* grad_norm_l2: ||grad||_2 of grad (n,) fp32, accumulated in double over a
 * fixed chunking (a function of n only) with the chunk sums added in order, so
 * the result is bit-identical for any number of OpenMP threads. n <= 0 -> 0.
 * Runs on the default backend (ag_backend_default); grad is its memory. */
double grad_norm_l2(const float *grad, int64_t n);
/* The same on backend be (grad is be's memory). */
double grad_norm_l2_backend(const ag_backend *be, const float *grad, int64_t n);

/* clip_grad_norm: returns the pre-clip global norm (as float, like torch's
 * total_norm) and, when max_norm > 0 and coef = max_norm / (norm + 1e-6) < 1
 * (both fp32 as in torch), scales grad (n,) in place by coef.
 * max_norm <= 0 disables clipping (HF's max_grad_norm 0). A non-finite norm is
 * returned as is and grad is left untouched (torch would multiply by 0 or NaN;
 * the caller should skip the step instead). */
float clip_grad_norm(float *grad, int64_t n, float max_norm);
/* The same on backend be (grad is be's memory); clip_grad_norm uses the default backend. */
float clip_grad_norm_backend(const ag_backend *be, float *grad, int64_t n, float max_norm);

/* The clipping of clip_grad_norm_backend for a total norm computed elsewhere
 * (a sharded gradient: the ranks' sums of squares added, then sqrt): grad (n)
 * fp32 scaled by max_norm / (total + 1e-6) when that is < 1; nothing when
 * max_norm <= 0 or total is not finite. */
void clip_grad_by_norm_backend(const ag_backend *be, float *grad, int64_t n, float total, float max_norm);

#endif
