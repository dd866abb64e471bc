/* optim/sophia.c — SophiaG, reproducing the official sophia.py's fp32 arithmetic.
 *
 * The update of _single_tensor_sophiag (Liuhong99/Sophia, sophia.py), per
 * parameter tensor, as documented in docs/formats.md (written here from that
 * description, not copied):
 *
 *     step_t += 1
 *     param.mul_(1 - lr * weight_decay)
 *     exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
 *     ratio = (exp_avg.abs() / (rho * bs * hess + 1e-15)).clamp(None, 1)
 *     param.addcmul_(exp_avg.sign(), ratio, value=-lr)
 *
 * and update_hessian: hess.mul_(beta2).addcmul_(grad, grad, value=1 - beta2).
 *
 * Every Python scalar is a double that the fp32 kernel receives rounded to
 * float: (float)(1 - lr*wd), (float)beta1, (float)(1 - beta1), (float)(rho*bs)
 * (Python evaluates rho*bs first, then the tensor product), (float)1e-15,
 * (float)(-lr). The ATen CPU kernels, checked element for element against
 * torch 2.15 on this machine's AVX-512 build (scripts/make_sophia_fixture.py
 * stores a bit-exact case, tests/test_sophia.c checks it):
 *   - add_(other, alpha):        fma(other, alpha, self)       (ufunc/add.h, vec::fmadd)
 *   - addcmul_(t1, t2, value):   fma(value * t1, t2, self)     (PointwiseOpsKernel.cpp)
 *   - mul_, abs, /, + scalar, clamp(max=1) = min(x, 1), sign: one rounding each
 * including the tail elements (n % 16), so every element uses the same formula.
 * fmaf() is the exact fused multiply-add, so the compiler cannot change it.
 * The element loops are the backend's sophia_update and sophia_hessian
 * (autograd/backend_cpu_kernels.inc on the CPU); this file computes their scalars.
 */
#include "optim/sophia.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

sophia_config sophia_config_default(void) {
    sophia_config c = {.lr = 1e-4, .beta1 = 0.965, .beta2 = 0.99, .rho = 0.04, .weight_decay = 0.1, .k = 10};
    return c;
}

int sophia_state_init(sophia_state *s, int64_t n, qerr *e) {
    return sophia_state_init_backend(s, ag_backend_default(), n, e);
}

int sophia_state_init_backend(sophia_state *s, const ag_backend *be, int64_t n, qerr *e) {
    memset(s, 0, sizeof *s);
    if (n < 0) return qerr_set(e, "sophia: parameter count %lld must be >= 0", (long long)n);
    s->be = be;
    const size_t bytes = (size_t)n * sizeof(float);
    s->m = be->alloc(bytes);
    s->h = be->alloc(bytes);
    if (!s->m || !s->h) {
        sophia_state_free(s);
        return qerr_set(e, "sophia: out of memory for the optimizer state of %lld parameters", (long long)n);
    }
    be->zero(s->m, bytes);
    be->zero(s->h, bytes);
    s->n = n;
    return 0;
}

void sophia_state_free(sophia_state *s) {
    if (!s) return;
    if (s->be) {
        s->be->free(s->m);
        s->be->free(s->h);
    }
    memset(s, 0, sizeof *s);
}

int64_t sophia_step(sophia_state *s, const sophia_config *c, double lr, double bs, float *param,
                    const float *grad, const uint8_t *decay_mask) {
    s->step += 1;
    const ag_sophia_coef co = {.decay_f = (float)(1.0 - lr * c->weight_decay),
                               .beta1_f = (float)c->beta1,
                               .one_minus_beta1_f = (float)(1.0 - c->beta1),
                               .rho_bs_f = (float)(c->rho * bs),
                               .eps_f = (float)1e-15,
                               .neg_lr_f = (float)(-lr)};
    return s->be->sophia_update(param, grad, s->m, s->h, s->n, decay_mask, &co);
}

void sophia_update_hessian(sophia_state *s, const sophia_config *c, const float *ghat) {
    s->be->sophia_hessian(s->h, ghat, s->n, (float)c->beta2, (float)(1.0 - c->beta2));
    s->hessian_updates += 1;
}

int sophia_hessian_due(const sophia_config *c, int64_t step) {
    return c->k > 0 && step > 0 && step % c->k == 0;
}
