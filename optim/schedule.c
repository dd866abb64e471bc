/* optim/schedule.c — LR schedules; formulas from transformers/optimization.py
 * (_get_cosine_schedule_with_warmup_lr_lambda, _get_linear_schedule_with_warmup_lr_lambda,
 * _get_constant_schedule_with_warmup_lr_lambda), evaluated in double in the same
 * order as the Python so the values agree to the last bit. */
#include "optim/schedule.h"

#include <math.h>
#include <string.h>

int lr_schedule_parse(const char *name, lr_schedule_kind *out, qerr *e) {
    if (!name) return qerr_set(e, "lr_scheduler: missing; expected one of cosine, linear, constant");
    if (!strcmp(name, "cosine")) {
        *out = LR_SCHEDULE_COSINE;
    } else if (!strcmp(name, "linear")) {
        *out = LR_SCHEDULE_LINEAR;
    } else if (!strcmp(name, "constant") || !strcmp(name, "constant_with_warmup")) {
        *out = LR_SCHEDULE_CONSTANT;
    } else {
        return qerr_set(e, "lr_scheduler: unknown schedule \"%s\"; expected one of cosine, linear, constant", name);
    }
    return 0;
}

const char *lr_schedule_name(lr_schedule_kind kind) {
    switch (kind) {
    case LR_SCHEDULE_COSINE: return "cosine";
    case LR_SCHEDULE_LINEAR: return "linear";
    case LR_SCHEDULE_CONSTANT: return "constant";
    }
    return "unknown";
}

/* Python's math.pi (the double nearest pi; M_PI needs _GNU_SOURCE) */
static const double SCHEDULE_PI = 3.141592653589793;

static double dmax(double a, double b) { return a > b ? a : b; }

double schedule_lr_lambda(lr_schedule_kind kind, int64_t step, int64_t total_steps, int64_t warmup_steps) {
    if (step < 0) step = 0;
    if (total_steps < 0) total_steps = 0;
    if (warmup_steps < 0) warmup_steps = 0;
    if (step < warmup_steps) return (double)step / dmax(1.0, (double)warmup_steps);
    switch (kind) {
    case LR_SCHEDULE_COSINE: {
        const double num_cycles = 0.5;
        const double progress = (double)(step - warmup_steps) / dmax(1.0, (double)(total_steps - warmup_steps));
        /* Python: math.pi * float(num_cycles) * 2.0 * progress, left to right */
        double arg = SCHEDULE_PI * num_cycles;
        arg = arg * 2.0;
        arg = arg * progress;
        return dmax(0.0, 0.5 * (1.0 + cos(arg)));
    }
    case LR_SCHEDULE_LINEAR:
        return dmax(0.0, (double)(total_steps - step) / dmax(1.0, (double)(total_steps - warmup_steps)));
    case LR_SCHEDULE_CONSTANT: return 1.0;
    }
    return 1.0;
}

double schedule_lr(lr_schedule_kind kind, int64_t step, int64_t total_steps, int64_t warmup_steps, double base_lr) {
    return base_lr * schedule_lr_lambda(kind, step, total_steps, warmup_steps);
}
