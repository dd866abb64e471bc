/* optim/sophia.h — SophiaG over one flat fp32 parameter arena.
 *
 * Sophia (Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic
 * Second-order Optimizer for Language Model Pre-training", arXiv 2305.14342),
 * the SophiaG variant: a momentum step clipped elementwise by a diagonal
 * Hessian estimate that the Gauss-Newton-Bartlett (GNB) estimator refreshes
 * every k steps. The update and its order of operations are those of the
 * official implementation (Liuhong99/Sophia, sophia.py: SophiaG.step ->
 * _single_tensor_sophiag, and SophiaG.update_hessian), as summarised in
 * docs/formats.md:
 *
 *   step:            t += 1
 *                    θ ← θ·(1 − lr·wd)                        (decoupled weight decay)
 *                    m ← β1·m + (1−β1)·g
 *                    ratio = min(|m| / (ρ·bs·h + 1e-15), 1)
 *                    θ ← θ − lr·sign(m)·ratio                 (no bias correction)
 *   update_hessian:  h ← β2·h + (1−β2)·ĝ⊙ĝ                     (ĝ: gradient of the CE with
 *                                                               labels sampled from the model)
 *
 * h starts at 0, so until the first Hessian update every coordinate moves by
 * lr·sign(m). The "win rate" (the authors' tuning signal for ρ; their README
 * advises 0.1–0.5) is the fraction of coordinates whose update is not
 * clipped, |m| < ρ·bs·h (fp32, without the 1e-15); sophia_step returns that
 * count. Before the first Hessian update it is 0.
 *
 * The state (m, h, step) lives in flat arrays like AdamW's, so a checkpoint
 * is one write per buffer; the arrays are memory of the backend the state was
 * created on, and the element loops run there (autograd/backend.h
 * sophia_update, sophia_hessian). Producing ĝ (the sampled-label forward/backward)
 * is the trainer's job: autograd/ce_sampled.h gives the loss,
 * trainer/train.c runs it every k steps.
 */
#ifndef QLORA_OPTIM_SOPHIA_H
#define QLORA_OPTIM_SOPHIA_H

#include <stdint.h>

#include "autograd/backend.h"
#include "core/status.h"

/* Hyper-parameters, doubles as the Python floats of torch param_groups. */
typedef struct sophia_config {
    double lr;           /* base learning rate (sophia_step takes the scheduled value) */
    double beta1, beta2; /* momentum and Hessian-EMA decay, in [0, 1) */
    double rho;          /* clipping scale ρ (> 0) */
    double weight_decay; /* decoupled: θ *= 1 − lr·wd */
    int k;               /* Hessian update interval in optimizer steps (>= 1) */
} sophia_config;

/* The official defaults: SophiaG(lr=1e-4, betas=(0.965, 0.99), rho=0.04,
 * weight_decay=0.1) and k = 10 (train_sophiag.py hess_interval). */
sophia_config sophia_config_default(void);

/* Optimizer state for n parameters; m and h are (n,) fp32, zero at init. */
typedef struct sophia_state {
    const ag_backend *be;    /* where m, h live and the updates run */
    int64_t n;
    int64_t step;            /* completed sophia_step calls (torch state["step"]) */
    int64_t hessian_updates; /* completed sophia_update_hessian calls */
    float *m;                /* (n,) momentum (torch exp_avg) */
    float *h;                /* (n,) Hessian EMA (torch hessian) */
} sophia_state;

/* Allocate zeroed m, h for n >= 0 parameters in the default backend's memory
 * (ag_backend_default). Errors: n < 0, out of memory (-1, *e filled, *s zeroed). */
int sophia_state_init(sophia_state *s, int64_t n, qerr *e);
/* The same in backend be's memory; the updates then run there. */
int sophia_state_init_backend(sophia_state *s, const ag_backend *be, int64_t n, qerr *e);

/* Release m, h and zero *s. Safe on a zeroed state. */
void sophia_state_free(sophia_state *s);

/* One SophiaG update of param (n,) in place from grad (n,) with the scheduled
 * learning rate lr and bs (the official step(bs=...): tokens per optimizer
 * step). decay_mask: NULL = decay all, else (n,) u8, 0 exempts an element.
 * fp32 operations in torch's order (see sophia.c). Returns the number of
 * coordinates with |m| < ρ·bs·h (not clipped: the win-rate numerator). OpenMP
 * over elements; the result does not depend on the thread count. */
int64_t sophia_step(sophia_state *s, const sophia_config *c, double lr, double bs, float *param,
                    const float *grad, const uint8_t *decay_mask);

/* h ← β2·h + (1−β2)·ĝ⊙ĝ from ghat (n,) fp32 (already clipped by the caller,
 * as train_sophiag.py clips it to grad_clip before update_hessian). */
void sophia_update_hessian(sophia_state *s, const sophia_config *c, const float *ghat);

/* Is a Hessian update due after 1-based optimizer step `step`? Official:
 * iter_num % k == k − 1 with 0-based iter_num, i.e. after steps k, 2k, ... */
int sophia_hessian_due(const sophia_config *c, int64_t step);

#endif
