/* optim/grad_scaler.h — dynamic loss scaling for fp16 compute (axolotl's fp16: true), torch.amp.GradScaler's
 * rules (torch/amp/grad_scaler.py and _amp_update_scale_, torch 2.15):
 *
 *   - the loss is multiplied by `scale` before backward (here: the gradient of the loss's seed), so gradients
 *     too small for fp16 survive the fp16 rounding of backward's GEMM operands;
 *   - before clipping, every gradient is multiplied by inv_scale = float(1 / double(scale)) (unscale_);
 *   - when any gradient is inf/NaN the optimizer step is skipped and scale *= backoff_factor (0.5), the growth
 *     tracker reset to 0; otherwise the tracker counts the clean step and, at growth_interval (2000), scale *=
 *     growth_factor (2) and the tracker restarts (a growth that would make scale non-finite is not applied).
 *
 * Defaults as torch's: init_scale 2^16, growth 2, backoff 0.5, interval 2000. The scale is an fp32 value (torch
 * keeps it in a float32 tensor), held here in a double that always holds a float32 value.
 */
#ifndef QLORA_OPTIM_GRAD_SCALER_H
#define QLORA_OPTIM_GRAD_SCALER_H

#include <stdint.h>

#include "autograd/backend.h"

typedef struct grad_scaler {
    double scale;           /* the current loss scale (an fp32 value) */
    int64_t growth_tracker; /* clean steps since the scale last changed */
    int64_t skipped;        /* optimizer steps skipped so far (inf/NaN gradients) */
    double growth_factor, backoff_factor;
    int64_t growth_interval;
} grad_scaler;

/* torch's defaults, the scale set to init_scale (rounded to fp32). */
void grad_scaler_init(grad_scaler *s, double init_scale);

/* 1 / scale rounded to fp32, as torch's unscale_ computes it (in double, then cast). */
float grad_scaler_inv_scale(const grad_scaler *s);

/* unscale_: g (n fp32, be's memory) *= grad_scaler_inv_scale(s). */
void grad_scaler_unscale(const grad_scaler *s, const ag_backend *be, float *g, int64_t n);

/* update(): found_inf → the step was skipped (s->skipped + 1), scale · backoff, tracker 0; else tracker + 1 and,
 * at growth_interval, scale · growth (when finite) and tracker 0. Returns found_inf. */
int grad_scaler_update(grad_scaler *s, int found_inf);

#endif
