/* optim/clip.c — global-norm gradient clipping (torch/nn/utils/clip_grad.py
 * clip_grad_norm_: total_norm, clip_coef = max_norm / (total_norm + 1e-6),
 * clamp(max=1), grads.mul_(coef)).
 *
 * The sum of squares and the scaling run in a backend (autograd/backend.h
 * sum_squares, scale). Determinism: the CPU's sum of squares is split into
 * chunks whose boundaries depend only on n, each summed with 8 interleaved
 * double accumulators, the chunk sums added in chunk order
 * (autograd/backend_cpu_kernels.inc), so the norm is the same bits whatever
 * OMP_NUM_THREADS is.
 */
#include "optim/clip.h"

#include <math.h>

double grad_norm_l2_backend(const ag_backend *be, const float *grad, int64_t n) {
    if (n <= 0) return 0.0;
    return sqrt(be->sum_squares(grad, n));
}

void clip_grad_by_norm_backend(const ag_backend *be, float *grad, int64_t n, float total, float max_norm) {
    if (!(max_norm > 0.0f) || !isfinite(total)) return;
    const float denom = total + 1e-6f;
    const float coef = max_norm / denom;
    if (coef < 1.0f) be->scale(grad, n, coef);
}

float clip_grad_norm_backend(const ag_backend *be, float *grad, int64_t n, float max_norm) {
    const float total = (float)grad_norm_l2_backend(be, grad, n);
    clip_grad_by_norm_backend(be, grad, n, total, max_norm);
    return total;
}

double grad_norm_l2(const float *grad, int64_t n) { return grad_norm_l2_backend(ag_backend_default(), grad, n); }

float clip_grad_norm(float *grad, int64_t n, float max_norm) {
    return clip_grad_norm_backend(ag_backend_default(), grad, n, max_norm);
}
