/* optim/sophia.c — SophiaG, reproducing the official sophia.py's fp32 arithmetic.
 *
 * The update of _single_tensor_sophiag (Liuhong99/Sophia, sophia.py), per
 * parameter tensor, as documented in formats.md §5 (written here from that
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
    memset(s, 0, sizeof *s);
    if (n < 0) return qerr_set(e, "sophia: parameter count %lld must be >= 0", (long long)n);
    s->m = qcalloc((size_t)n, sizeof(float), e);
    s->h = qcalloc((size_t)n, sizeof(float), e);
    if (!s->m || !s->h) {
        sophia_state_free(s);
        return qerr_prefix(e, "sophia: optimizer state for %lld parameters", (long long)n);
    }
    s->n = n;
    return 0;
}

void sophia_state_free(sophia_state *s) {
    if (!s) return;
    free(s->m);
    free(s->h);
    memset(s, 0, sizeof *s);
}

/* torch.sign for floats: (0 < x) - (x < 0); NaN gives 0. */
static inline float sign_f(float x) { return (float)((0.0f < x) - (x < 0.0f)); }

int64_t sophia_step(sophia_state *s, const sophia_config *c, double lr, double bs, float *param,
                    const float *grad, const uint8_t *decay_mask) {
    s->step += 1;
    const float decay_f = (float)(1.0 - lr * c->weight_decay);
    const float beta1_f = (float)c->beta1;
    const float one_minus_beta1_f = (float)(1.0 - c->beta1);
    const float rho_bs_f = (float)(c->rho * bs);
    const float eps_f = (float)1e-15;
    const float neg_lr_f = (float)(-lr);
    float *restrict m = s->m;
    const float *restrict h = s->h;
    const int64_t n = s->n;
    int64_t unclipped = 0;

#pragma omp parallel for schedule(static) reduction(+ : unclipped) if (n >= 16384)
    for (int64_t i = 0; i < n; i++) {
        float p = param[i];
        /* the official code always multiplies (by exactly 1 when wd = 0); a
         * masked element skips it, as a no-decay param group would */
        if (!decay_mask || decay_mask[i]) p = p * decay_f;
        const float mn = fmaf(grad[i], one_minus_beta1_f, m[i] * beta1_f);
        float denom = h[i] * rho_bs_f;
        denom = denom + eps_f;
        float ratio = fabsf(mn) / denom;
        ratio = ratio > 1.0f ? 1.0f : ratio; /* clamp(max=1); NaN stays NaN */
        unclipped += fabsf(mn) < h[i] * rho_bs_f; /* the README's win_rate: |m| < rho·bs·h */
        p = fmaf(neg_lr_f * sign_f(mn), ratio, p);
        m[i] = mn;
        param[i] = p;
    }
    return unclipped;
}

void sophia_update_hessian(sophia_state *s, const sophia_config *c, const float *ghat) {
    const float beta2_f = (float)c->beta2;
    const float one_minus_beta2_f = (float)(1.0 - c->beta2);
    float *restrict h = s->h;
    const int64_t n = s->n;
#pragma omp parallel for schedule(static) if (n >= 16384)
    for (int64_t i = 0; i < n; i++) {
        const float g = ghat[i];
        h[i] = fmaf(one_minus_beta2_f * g, g, h[i] * beta2_f);
    }
    s->hessian_updates += 1;
}

int sophia_hessian_due(const sophia_config *c, int64_t step) {
    return c->k > 0 && step > 0 && step % c->k == 0;
}
