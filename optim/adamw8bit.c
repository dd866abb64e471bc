/* optim/adamw8bit.c — bitsandbytes' 8-bit AdamW (see adamw8bit.h).
 *
 * Reproduced from bitsandbytes 0.50.2 as it runs without a GPU (optim/optimizer.py Optimizer2State
 * with optimizer_name "adam", the CPU kernels of backends/cpu/ops.py and the native quantizer),
 * checked against the library by tests/test_adamw8bit.c (fixture: scripts/make_adamw8bit_fixture.py):
 *   - state per parameter tensor: 8-bit (uint8 state1/state2, fp32 absmax1/absmax2 per block of 256)
 *     when numel >= min_8bit_size (4096), else fp32 state1/state2;
 *   - maps: qmap1 = create_dynamic_map(signed=True), qmap2 = create_dynamic_map(signed=False),
 *     unchanged by 0.50.2's quantizer;
 *   - one update: step += 1, then for 8-bit tensors the sequence of _optimizer_update_8bit_blockwise_cpu
 *     (dequantize, the torch fp32 ops, quantize), for the others _optimizer_update_32bit_cpu
 *     (autograd/backend_cpu_optim.inc has both, op by op). The Python scalars are doubles and each
 *     reaches the fp32 kernels as a float, so the constants below are computed in double and cast.
 */
#include "optim/adamw8bit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quant/blockwise8.h"

void adamw8bit_dynamic_map(int is_signed, float code[256]) { bw8_dynamic_map(is_signed, code); }

static int64_t blocks_of(int64_t numel) { return (numel + ADAMW8BIT_BLOCKSIZE - 1) / ADAMW8BIT_BLOCKSIZE; }

int64_t adamw8bit_state_bytes(const int64_t *numel, int n_tensors) {
    int64_t b = 0;
    for (int i = 0; i < n_tensors; i++)
        b += 2 * numel[i] + (numel[i] >= ADAMW8BIT_MIN_8BIT_SIZE ? 8 * blocks_of(numel[i]) : 8 * numel[i]);
    return b + 2 * (256 * 4 + BW8_LUT_SIZE);
}

void adamw8bit_state_free(adamw8bit_state *s) {
    if (!s) return;
    if (s->be) {
        s->be->free(s->state1);
        s->be->free(s->state2);
        s->be->free(s->absmax1);
        s->be->free(s->absmax2);
        s->be->free(s->m32);
        s->be->free(s->v32);
        s->be->free(s->dev_qmap1);
        s->be->free(s->dev_qmap2);
        s->be->free(s->lut1);
        s->be->free(s->lut2);
    }
    free(s->tensors);
    memset(s, 0, sizeof *s);
}

/* be->alloc, then zero; NULL on out of memory (n == 0 gets a 1-byte buffer so NULL means failure). */
static void *zalloc(const ag_backend *be, size_t bytes) {
    void *p = be->alloc(bytes ? bytes : 1);
    if (p) be->zero(p, bytes ? bytes : 1);
    return p;
}

static int init_part(adamw8bit_state *s, const ag_backend *be, int64_t lo, int64_t hi, const int64_t *offset,
                     const int64_t *numel, int n_tensors, int ranged, qerr *e);

int64_t adamw8bit_shard_cut(const int64_t *offset, const int64_t *numel, int n_tensors, int64_t x) {
    for (int i = 0; i < n_tensors; i++) {
        if (numel[i] < ADAMW8BIT_MIN_8BIT_SIZE || x <= offset[i] || x >= offset[i] + numel[i]) continue;
        const int64_t r = (x - offset[i]) % ADAMW8BIT_BLOCKSIZE;
        if (!r) return x;
        const int64_t y = x + ADAMW8BIT_BLOCKSIZE - r;
        return y < offset[i] + numel[i] ? y : offset[i] + numel[i];
    }
    return x;
}

/* Elements of tensor (off, num) before x, clamped to [0, num]. */
static int64_t before(int64_t off, int64_t num, int64_t x) {
    const int64_t k = x - off;
    return k < 0 ? 0 : k > num ? num : k;
}

void adamw8bit_range_index(const int64_t *offset, const int64_t *numel, int n_tensors, int64_t lo, int64_t hi,
                           int64_t *block_lo, int64_t *block_hi, int64_t *n32_lo, int64_t *n32_hi) {
    int64_t b0 = 0, b1 = 0, c0 = 0, c1 = 0;
    for (int i = 0; i < n_tensors; i++) {
        if (numel[i] >= ADAMW8BIT_MIN_8BIT_SIZE) {
            b0 += blocks_of(before(offset[i], numel[i], lo));
            b1 += blocks_of(before(offset[i], numel[i], hi));
        } else {
            c0 += before(offset[i], numel[i], lo);
            c1 += before(offset[i], numel[i], hi);
        }
    }
    *block_lo = b0, *block_hi = b1, *n32_lo = c0, *n32_hi = c1;
}

int64_t adamw8bit_state_bytes_range(const int64_t *offset, const int64_t *numel, int n_tensors, int64_t lo,
                                    int64_t hi) {
    int64_t b0, b1, c0, c1;
    adamw8bit_range_index(offset, numel, n_tensors, lo, hi, &b0, &b1, &c0, &c1);
    return 2 * (hi - lo) + 8 * (b1 - b0) + 8 * (c1 - c0) + 2 * (256 * 4 + BW8_LUT_SIZE);
}

int adamw8bit_state_init(adamw8bit_state *s, const ag_backend *be, int64_t n, const int64_t *offset,
                         const int64_t *numel, int n_tensors, qerr *e) {
    memset(s, 0, sizeof *s);
    if (n < 0 || n_tensors < 0) return qerr_set(e, "adamw_8bit: negative parameter or tensor count");
    for (int i = 0; i < n_tensors; i++)
        if (offset[i] < 0 || numel[i] < 0 || offset[i] > n - numel[i])
            return qerr_set(e, "adamw_8bit: tensor %d [%lld, +%lld) lies outside the %lld parameters", i,
                            (long long)offset[i], (long long)numel[i], (long long)n);
    return init_part(s, be, 0, n, offset, numel, n_tensors, 0, e);
}

int adamw8bit_state_init_range(adamw8bit_state *s, const ag_backend *be, int64_t lo, int64_t hi,
                               const int64_t *offset, const int64_t *numel, int n_tensors, qerr *e) {
    memset(s, 0, sizeof *s);
    if (lo < 0 || hi < lo || n_tensors < 0) return qerr_set(e, "adamw_8bit: bad range [%lld, %lld)", (long long)lo, (long long)hi);
    for (int i = 0; i < n_tensors; i++)
        if (offset[i] < 0 || numel[i] < 0 || (i && offset[i] < offset[i - 1] + numel[i - 1]))
            return qerr_set(e, "adamw_8bit: tensor %d [%lld, +%lld) is not after the one before it (arena order "
                               "expected)", i, (long long)offset[i], (long long)numel[i]);
    if (adamw8bit_shard_cut(offset, numel, n_tensors, lo) != lo || adamw8bit_shard_cut(offset, numel, n_tensors, hi) != hi)
        return qerr_set(e, "adamw_8bit: the range [%lld, %lld) splits a quantization block of %d elements",
                        (long long)lo, (long long)hi, ADAMW8BIT_BLOCKSIZE);
    return init_part(s, be, lo, hi, offset, numel, n_tensors, 1, e);
}

/* The state of the elements [lo, hi) (ranged: only the pieces of the tensors that intersect it, offsets
 * relative to lo; else every tensor as given). Arguments checked by the callers. */
static int init_part(adamw8bit_state *s, const ag_backend *be, int64_t lo, int64_t hi, const int64_t *offset,
                     const int64_t *numel, int n_tensors, int ranged, qerr *e) {
    const int64_t n = hi - lo;
    if (!be->adamw8bit_update || !be->adamw_bnb32_update)
        return qerr_set(e, "optimizer adamw_8bit: the %s backend has no 8-bit AdamW kernel", be->name);
    s->be = be;
    s->n = n;
    s->lo = lo;
    if (ranged) {
        int64_t b1, c1;
        adamw8bit_range_index(offset, numel, n_tensors, lo, hi, &s->block_lo, &b1, &s->n32_lo, &c1);
    }
    for (int i = 0; i < n_tensors; i++) {
        if (numel[i] >= ADAMW8BIT_MIN_8BIT_SIZE) s->n_blocks_all += blocks_of(numel[i]);
        else s->n32_all += numel[i];
    }
    s->tensors = calloc((size_t)n_tensors + 1, sizeof *s->tensors);
    if (!s->tensors) {
        adamw8bit_state_free(s);
        return qerr_set(e, "adamw_8bit: out of memory");
    }
    for (int i = 0; i < n_tensors; i++) {
        /* the piece [a, b) of tensor i inside [lo, hi) (all of it when not ranged) */
        const int64_t a = ranged && offset[i] < lo ? lo : offset[i];
        const int64_t b = ranged && offset[i] + numel[i] > hi ? hi : offset[i] + numel[i];
        if (ranged && a >= b) continue;
        adamw8bit_tensor *t = &s->tensors[s->n_tensors++];
        t->offset = a - lo;
        t->numel = b - a;
        t->eight_bit = numel[i] >= ADAMW8BIT_MIN_8BIT_SIZE;
        if (t->eight_bit) {
            t->block0 = s->n_blocks;
            s->n_blocks += blocks_of(t->numel);
        } else {
            t->off32 = s->n32;
            s->n32 += t->numel;
        }
    }
    bw8_dynamic_map(1, s->qmap1);
    bw8_dynamic_map(0, s->qmap2);
    uint8_t *lut = malloc(BW8_LUT_SIZE);
    s->state1 = zalloc(be, (size_t)n);
    s->state2 = zalloc(be, (size_t)n);
    s->absmax1 = zalloc(be, (size_t)s->n_blocks * sizeof(float));
    s->absmax2 = zalloc(be, (size_t)s->n_blocks * sizeof(float));
    s->m32 = zalloc(be, (size_t)s->n32 * sizeof(float));
    s->v32 = zalloc(be, (size_t)s->n32 * sizeof(float));
    s->dev_qmap1 = be->alloc(sizeof s->qmap1);
    s->dev_qmap2 = be->alloc(sizeof s->qmap2);
    s->lut1 = be->alloc(BW8_LUT_SIZE);
    s->lut2 = be->alloc(BW8_LUT_SIZE);
    if (!lut || !s->state1 || !s->state2 || !s->absmax1 || !s->absmax2 || !s->m32 || !s->v32 || !s->dev_qmap1 ||
        !s->dev_qmap2 || !s->lut1 || !s->lut2) {
        free(lut);
        adamw8bit_state_free(s);
        return qerr_set(e, "adamw_8bit: out of memory for the optimizer state of %lld parameters", (long long)n);
    }
    be->copy_h2d(s->dev_qmap1, s->qmap1, sizeof s->qmap1);
    be->copy_h2d(s->dev_qmap2, s->qmap2, sizeof s->qmap2);
    bw8_build_lut(s->qmap1, lut);
    be->copy_h2d(s->lut1, lut, BW8_LUT_SIZE);
    bw8_build_lut(s->qmap2, lut);
    be->copy_h2d(s->lut2, lut, BW8_LUT_SIZE);
    free(lut);
    return 0;
}

void adamw8bit_step(adamw8bit_state *s, const adamw_config *c, double lr, float *param, const float *grad) {
    s->step += 1;
    const double t = (double)s->step;
    const double correction1 = 1.0 - pow(c->beta1, t);
    const double correction2 = sqrt(1.0 - pow(c->beta2, t));
    const ag_adamw8bit_coef co = {
        .decay = c->weight_decay > 0.0,
        .decay_f = (float)(1.0 - lr * c->weight_decay),
        .beta1_f = (float)c->beta1,
        .one_minus_beta1_f = (float)(1.0 - c->beta1),
        .beta2_f = (float)c->beta2,
        .one_minus_beta2_f = (float)(1.0 - c->beta2),
        .correction2_f = (float)correction2,
        .eps_f = (float)c->eps,
        .step8_f = (float)(-lr / correction1),
        .eps_c2_f = (float)(c->eps * correction2),
        .step32_f = (float)(-lr * correction2 / correction1),
    };
    for (int i = 0; i < s->n_tensors; i++) {
        const adamw8bit_tensor *tn = &s->tensors[i];
        if (!tn->numel) continue;
        float *p = param + tn->offset;
        const float *g = grad + tn->offset;
        if (tn->eight_bit)
            s->be->adamw8bit_update(p, g, s->state1 + tn->offset, s->state2 + tn->offset, s->absmax1 + tn->block0,
                                    s->absmax2 + tn->block0, s->dev_qmap1, s->dev_qmap2, s->lut1, s->lut2,
                                    tn->numel, ADAMW8BIT_BLOCKSIZE, &co);
        else
            s->be->adamw_bnb32_update(p, g, s->m32 + tn->off32, s->v32 + tn->off32, tn->numel, &co);
    }
}
