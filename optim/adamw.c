/* optim/adamw.c — AdamW, reproducing torch.optim.AdamW's fp32 arithmetic.
 *
 * Source: torch/optim/adam.py::_single_tensor_adam (decoupled_weight_decay=True;
 * torch.optim.AdamW on CPU tensors takes this path: foreach defaults to False
 * off-GPU). The Python body is, per parameter tensor:
 *
 *     step_t += 1
 *     param.mul_(1 - lr * weight_decay)                       # if weight_decay != 0
 *     exp_avg.lerp_(grad, 1 - beta1)
 *     exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
 *     bias_correction1 = 1 - beta1 ** step                    # Python floats: double
 *     bias_correction2 = 1 - beta2 ** step
 *     step_size = lr / bias_correction1
 *     bias_correction2_sqrt = bias_correction2 ** 0.5
 *     denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
 *     param.addcdiv_(exp_avg, denom, value=-step_size)
 *
 * Every scalar is a double that the fp32 kernel receives rounded to float, and
 * every tensor op rounds to fp32. The ATen CPU kernels used (vectorized path):
 *   - mul_(scalar):   a * s
 *   - lerp_(end, w):  |w| < 0.5 ? fmadd(w, end - self, self)
 *                               : fmadd(w - 1, end - self, end)   (LerpKernel.cpp lerp_vec)
 *   - addcmul_(t1, t2, value): self + value * t1 * t2 = self + ((value*t1)*t2)
 *   - sqrt, / scalar (a true division for fp32, BinaryOpsKernel.cpp), + scalar
 *   - addcdiv_(t1, t2, value): self + (value * t1) / t2           (PointwiseOpsKernel.cpp)
 * The element loop is the backend's adamw_update (autograd/backend_cpu_kernels.inc
 * on the CPU); this file computes its scalars.
 * We write each as its own statement (and the lerp as fmaf) so the compiler
 * neither fuses nor reorders them (GCC -std=c11 does not contract; see also
 * the note in quant/nf4.c). Torch's scalar tail loop (the last n % 16
 * elements of a tensor) is plain C++ that its compiler may or may not contract;
 * we use the vectorized formula for every element.
 */
#include "optim/adamw.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

adamw_config adamw_config_default(void) {
    adamw_config c = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 1e-2};
    return c;
}

int adamw_state_init(adamw_state *s, int64_t n, qerr *e) {
    return adamw_state_init_backend(s, ag_backend_default(), n, e);
}

int adamw_state_init_backend(adamw_state *s, const ag_backend *be, int64_t n, qerr *e) {
    memset(s, 0, sizeof *s);
    if (n < 0) return qerr_set(e, "adamw: parameter count %lld must be >= 0", (long long)n);
    s->be = be;
    const size_t bytes = (size_t)n * sizeof(float);
    s->m = be->alloc(bytes);
    s->v = be->alloc(bytes);
    if (!s->m || !s->v) {
        adamw_state_free(s);
        return qerr_set(e, "adamw: out of memory for the optimizer state of %lld parameters", (long long)n);
    }
    be->zero(s->m, bytes);
    be->zero(s->v, bytes);
    s->n = n;
    return 0;
}

void adamw_state_free(adamw_state *s) {
    if (!s) return;
    if (s->be) {
        s->be->free(s->m);
        s->be->free(s->v);
    }
    memset(s, 0, sizeof *s);
}

void adamw_step(adamw_state *s, const adamw_config *c, double lr, float *param, const float *grad,
                const uint8_t *decay_mask) {
    s->step += 1;
    const double stepd = (double)s->step;
    const double bias_correction1 = 1.0 - pow(c->beta1, stepd);
    const double bias_correction2 = 1.0 - pow(c->beta2, stepd);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = pow(bias_correction2, 0.5);

    const int decay = c->weight_decay != 0.0;
    const float decay_f = (float)(1.0 - lr * c->weight_decay);
    const float lerp_w = (float)(1.0 - c->beta1);
    const int lerp_small = fabsf(lerp_w) < 0.5f;
    const float lerp_coeff = lerp_small ? lerp_w : lerp_w - 1.0f;
    const float beta2_f = (float)c->beta2;
    const float one_minus_beta2_f = (float)(1.0 - c->beta2);
    const float bc2_sqrt_f = (float)bias_correction2_sqrt;
    const float eps_f = (float)c->eps;
    const float neg_step_f = (float)(-step_size);
    const ag_adamw_coef co = {.decay = decay, .lerp_small = lerp_small, .decay_f = decay_f, .lerp_coeff = lerp_coeff,
                              .beta2_f = beta2_f, .one_minus_beta2_f = one_minus_beta2_f, .bc2_sqrt_f = bc2_sqrt_f,
                              .eps_f = eps_f, .neg_step_f = neg_step_f};
    s->be->adamw_update(param, grad, s->m, s->v, s->n, decay_mask, &co);
}
