/* optim/clip.c — global-norm gradient clipping (torch/nn/utils/clip_grad.py
 * clip_grad_norm_: total_norm, clip_coef = max_norm / (total_norm + 1e-6),
 * clamp(max=1), grads.mul_(coef)).
 *
 * Determinism: the sum of squares is split into at most CLIP_MAX_CHUNKS chunks
 * whose boundaries depend only on n; each chunk is summed by one thread with 8
 * interleaved double accumulators (fixed order, vectorizable), and the chunk
 * sums are added in chunk order. So the norm is the same bits whatever
 * OMP_NUM_THREADS is.
 */
#include "optim/clip.h"

#include <math.h>

#define CLIP_MAX_CHUNKS 256
#define CLIP_MIN_CHUNK 8192

static double sumsq_chunk(const float *g, int64_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += (double)g[i + l] * (double)g[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += (double)g[i] * (double)g[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

double grad_norm_l2(const float *grad, int64_t n) {
    if (n <= 0) return 0.0;
    int64_t nchunks = (n + CLIP_MIN_CHUNK - 1) / CLIP_MIN_CHUNK;
    if (nchunks > CLIP_MAX_CHUNKS) nchunks = CLIP_MAX_CHUNKS;
    const int64_t chunk = (n + nchunks - 1) / nchunks;
    double partial[CLIP_MAX_CHUNKS];
#pragma omp parallel for schedule(static) if (nchunks > 1)
    for (int64_t c = 0; c < nchunks; c++) {
        const int64_t i0 = c * chunk;
        const int64_t len = i0 >= n ? 0 : (n - i0 < chunk ? n - i0 : chunk);
        partial[c] = sumsq_chunk(grad + i0, len);
    }
    double total = 0.0;
    for (int64_t c = 0; c < nchunks; c++) total += partial[c];
    return sqrt(total);
}

float clip_grad_norm(float *grad, int64_t n, float max_norm) {
    const float total = (float)grad_norm_l2(grad, n);
    if (!(max_norm > 0.0f) || !isfinite(total)) return total;
    const float denom = total + 1e-6f;
    const float coef = max_norm / denom;
    if (coef < 1.0f) {
#pragma omp parallel for schedule(static) if (n >= 65536)
        for (int64_t i = 0; i < n; i++) grad[i] = grad[i] * coef;
    }
    return total;
}
