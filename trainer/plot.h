/* trainer/plot.h — a loss-curve PNG (800 x 500 RGB) written with libpng.
 *
 * Train loss is a blue line (RGB 31,119,180), held-out loss an orange line
 * with round markers (RGB 255,127,14) — matplotlib's first two tab10 colours.
 * Axes with "nice" 1/2/5 x 10^k ticks, numeric tick labels, light grid, axis
 * names and a legend, all text in an embedded 5x7 bitmap font. Non-finite
 * points are skipped (the line breaks there). Lines and markers are
 * antialiased by pixel coverage.
 */
#ifndef QLORA_TRAINER_PLOT_H
#define QLORA_TRAINER_PLOT_H

#include "core/status.h"

#define PLOT_WIDTH 800
#define PLOT_HEIGHT 500

/* Write the plot to `path` (via path.tmp + rename, so an existing file is
 * never left half-written). x = optimizer step, y = loss in nats. Either
 * series may be empty (n = 0, pointers may then be NULL). */
int plot_loss_png(const char *path, const float *train_steps, const float *train_loss, int n_train,
                  const float *eval_steps, const float *eval_loss, int n_eval, qerr *e);

/* Convenience: metrics_read(metrics_path) then plot_loss_png(png_path). */
int plot_metrics_png(const char *metrics_path, const char *png_path, qerr *e);

/* One curve of plot_curves_png. */
typedef struct plot_series {
    const char *label;  /* legend text: lower case, digits, space and . - + ( ) = , / : _ % */
    const float *x, *y; /* (n) each; non-finite points break the line */
    int n;
    int markers;        /* 1: a round marker at every point */
} plot_series;

/* Up to 8 curves on one set of axes, in matplotlib's tab10 colours in order,
 * with a legend; axis names xlabel / ylabel (NULL: "step" / "loss"). Used to
 * compare runs (scripts/compare_optimizers.sh via bin/qlora-plot). */
int plot_curves_png(const char *path, const plot_series *series, int n_series, const char *xlabel,
                    const char *ylabel, qerr *e);

#endif
