/* optim/adamw.h — AdamW over one flat fp32 parameter arena.
 *
 * The trainable parameters (LoRA A and B of every layer), their gradients and
 * the two moment buffers are each one contiguous fp32 array of n elements, so
 * an optimizer step is a single loop and a checkpoint is one write per buffer
 * (docs/design.md). Sharding later means giving each rank a sub-range. The
 * element loop runs in a backend (autograd/backend.h adamw_update) on the
 * backend's memory: the state remembers the backend it was created on.
 *
 * Maths and order of operations: torch.optim.AdamW as PyTorch runs it on CPU
 * (foreach=False there: torch/optim/adam.py::_single_tensor_adam with
 * decoupled_weight_decay=True; older releases: adamw.py::_single_tensor_adamw,
 * same operations). See adamw.c for the exact fp32 sequence.
 */
#ifndef QLORA_OPTIM_ADAMW_H
#define QLORA_OPTIM_ADAMW_H

#include <stdint.h>

#include "autograd/backend.h"
#include "core/status.h"

/* Hyper-parameters. Doubles because torch keeps them as Python floats and
 * computes the bias corrections (beta^step) in double. `lr` is the base
 * learning rate for reference; adamw_step takes the scheduled lr explicitly. */
typedef struct adamw_config {
    double lr;           /* base learning rate */
    double beta1, beta2; /* moment decay rates, in [0, 1) */
    double eps;          /* added to sqrt(v_hat) */
    double weight_decay; /* decoupled: param *= 1 - lr * weight_decay */
} adamw_config;

/* torch.optim.AdamW defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
 * weight_decay 0.01. (HF Trainer passes weight_decay 0.0 unless configured.) */
adamw_config adamw_config_default(void);

/* Optimizer state for n parameters. m and v are (n,) fp32, zero at init;
 * step counts completed adamw_step calls (torch's state["step"]). */
typedef struct adamw_state {
    const ag_backend *be; /* where m, v live and the update runs */
    int64_t n;
    int64_t step;
    float *m; /* (n,) first moment  (torch exp_avg) */
    float *v; /* (n,) second moment (torch exp_avg_sq) */
} adamw_state;

/* adamw_state_init: allocate zeroed moments for n >= 0 parameters in the
 * default backend's memory (ag_backend_default).
 * Errors: n < 0, out of memory (-1, *e filled, *s zeroed). */
int adamw_state_init(adamw_state *s, int64_t n, qerr *e);
/* The same in backend be's memory; adamw_step then runs there. */
int adamw_state_init_backend(adamw_state *s, const ag_backend *be, int64_t n, qerr *e);

/* adamw_state_free: release m, v and zero *s. Safe on a zeroed state. */
void adamw_state_free(adamw_state *s);

/* adamw_step: one AdamW update of param (n,) fp32 in place from grad (n,)
 * fp32 (both memory of s->be), with learning rate lr (the scheduled value, a double as torch's
 * param_group["lr"]). decay_mask: NULL = decay every element, else (n,) u8
 * where 0 exempts that element from weight decay (torch's no-decay param
 * group). Per element, with t = ++s->step:
 *     p = p * (1 - lr*wd)                          (if wd != 0 and mask)
 *     m = m + (1-b1) * (g - m)                     (torch lerp_, one FMA)
 *     v = v*b2 + ((1-b2)*g)*g                      (mul_ then addcmul_)
 *     p = p + (-(lr / bc1) * m) / (sqrt(v) / sqrt(bc2) + eps)
 * with bc1 = 1 - b1^t, bc2 = 1 - b2^t in double. OpenMP-parallel over
 * elements; the result does not depend on the number of threads. */
void adamw_step(adamw_state *s, const adamw_config *c, double lr, float *param, const float *grad,
                const uint8_t *decay_mask);

#endif
