/* optim/grad_scaler.c — torch.amp.GradScaler's update rule (see grad_scaler.h). */
#include "optim/grad_scaler.h"

#include <math.h>

void grad_scaler_init(grad_scaler *s, double init_scale) {
    s->scale = (double)(float)init_scale;
    s->growth_tracker = 0;
    s->skipped = 0;
    s->growth_factor = 2.0;
    s->backoff_factor = 0.5;
    s->growth_interval = 2000;
}

float grad_scaler_inv_scale(const grad_scaler *s) { return (float)(1.0 / s->scale); }

void grad_scaler_unscale(const grad_scaler *s, const ag_backend *be, float *g, int64_t n) {
    if (n > 0) be->scale(g, n, grad_scaler_inv_scale(s));
}

int grad_scaler_update(grad_scaler *s, int found_inf) {
    /* _amp_update_scale_cpu_: the products in fp32 (the scale tensor's dtype) */
    if (found_inf) {
        s->scale = (double)((float)s->scale * (float)s->backoff_factor);
        s->growth_tracker = 0;
        s->skipped++;
        return 1;
    }
    if (++s->growth_tracker == s->growth_interval) {
        const float grown = (float)s->scale * (float)s->growth_factor;
        if (isfinite(grown)) s->scale = grown;
        s->growth_tracker = 0;
    }
    return 0;
}
