/* optim/schedule.h — learning-rate schedules with linear warmup.
 *
 * The multipliers of Hugging Face transformers' optimization.py:
 *   get_cosine_schedule_with_warmup (num_cycles 0.5),
 *   get_linear_schedule_with_warmup,
 *   get_constant_schedule_with_warmup,
 * applied as torch's LambdaLR does: lr = base_lr * lambda(step).
 *
 * Step numbering (HF Trainer): `step` is the number of optimizer steps already
 * taken. LambdaLR sets lr = base_lr * lambda(0) at construction and the
 * Trainer calls scheduler.step() after each optimizer.step(), so the FIRST
 * optimizer step uses lambda(0) — which is 0 when warmup_steps > 0 (that step
 * still updates AdamW's moments and step count) — and optimizer step k
 * (1-based) uses lambda(k - 1).
 */
#ifndef QLORA_OPTIM_SCHEDULE_H
#define QLORA_OPTIM_SCHEDULE_H

#include <stdint.h>

#include "core/status.h"

typedef enum lr_schedule_kind {
    LR_SCHEDULE_COSINE,   /* "cosine": warmup, then 0.5 * (1 + cos(pi * progress)) */
    LR_SCHEDULE_LINEAR,   /* "linear": warmup, then linear decay to 0 at total_steps */
    LR_SCHEDULE_CONSTANT, /* "constant" / "constant_with_warmup": warmup, then 1 */
} lr_schedule_kind;

/* lr_schedule_parse: "cosine" | "linear" | "constant" | "constant_with_warmup"
 * (exact, lower case). Note HF's own "constant" ignores warmup_steps; here
 * "constant" honours them like "constant_with_warmup" (with warmup 0 the two
 * agree). Errors: NULL or any other name (the message lists the valid ones). */
int lr_schedule_parse(const char *name, lr_schedule_kind *out, qerr *e);

/* lr_schedule_name: the canonical name ("cosine", "linear", "constant"). */
const char *lr_schedule_name(lr_schedule_kind kind);

/* schedule_lr_lambda: the multiplier for 0-based `step` (optimizer steps
 * already taken), as HF computes it in double:
 *   step < warmup:  step / max(1, warmup)
 *   cosine:   max(0, 0.5 * (1 + cos(pi * 2 * 0.5 * progress))),
 *             progress = (step - warmup) / max(1, total - warmup)
 *   linear:   max(0, (total - step) / max(1, total - warmup))
 *   constant: 1
 * Past total_steps the formulas apply unchanged, as in HF: linear stays at 0,
 * cosine rises again (cos beyond pi); a trainer never asks for those steps.
 * Negative step or total are treated as 0. */
double schedule_lr_lambda(lr_schedule_kind kind, int64_t step, int64_t total_steps, int64_t warmup_steps);

/* schedule_lr: base_lr * schedule_lr_lambda(...), the lr for the optimizer
 * step that follows `step` completed steps. */
double schedule_lr(lr_schedule_kind kind, int64_t step, int64_t total_steps, int64_t warmup_steps, double base_lr);

#endif
