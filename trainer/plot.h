/* trainer/plot.h — loss curves drawn with cairo, as PNG or SVG.
 *
 * An 800 x 500 figure: the curves on axes with "nice" 1/2/5 x 10^k ticks,
 * numeric tick labels, a light grid, axis names and a legend, text in DejaVu
 * Sans (fontconfig's fallback when it is missing). Curves take matplotlib's
 * tab10 colours in order: train loss blue (31,119,180), held-out loss orange
 * (255,127,14) with round markers. Non-finite points are skipped (the line
 * breaks there; a point with no finite neighbour is drawn as a dot).
 *
 * The file format follows the path's extension: ".svg" (any case) gives SVG
 * 1.1 (text as glyph outlines, so it looks the same everywhere), anything else
 * a PNG (RGB, 8 bit). Files are written through core/file's atomic write, so
 * an existing file is never left half-written.
 */
#ifndef QLORA_TRAINER_PLOT_H
#define QLORA_TRAINER_PLOT_H

#include "core/status.h"

#define PLOT_WIDTH 800  /* pixels (PNG) or points (SVG) */
#define PLOT_HEIGHT 500
#define PLOT_MAX_SERIES 8

/* Train and held-out loss against the optimizer step (x = step, y = loss in
 * nats). Either series may be empty (n = 0, pointers may then be NULL); an
 * empty one has no legend entry. Errors: "plot <path>: invalid series
 * arguments", "plot <path>: cairo: <reason>", those of file_write_atomic. */
int plot_loss(const char *path, const float *train_steps, const float *train_loss, int n_train,
              const float *eval_steps, const float *eval_loss, int n_eval, qerr *e);

/* metrics_read(metrics_path) (trainer/metrics.h), then plot_loss(path). */
int plot_metrics(const char *metrics_path, const char *path, qerr *e);

/* A finished run's figures: plot_metrics(metrics_path) into
 * out_dir/loss_curve.png and out_dir/loss_curve.svg. */
int plot_run_loss_curves(const char *metrics_path, const char *out_dir, qerr *e);

/* One curve of plot_curves. */
typedef struct plot_series {
    const char *label;  /* legend text (UTF-8); NULL: no legend entry */
    const float *x, *y; /* (n) each; non-finite points break the line */
    int n;
    int markers;        /* 1: a round marker at every point */
} plot_series;

/* Up to PLOT_MAX_SERIES curves on one set of axes, in tab10 order, with a
 * legend; axis names xlabel / ylabel (NULL: "step" / "loss"). Used to compare
 * runs (scripts/compare_optimizers.sh via bin/qlora-plot). Errors as
 * plot_loss, and "plot <path>: invalid series <k>". */
int plot_curves(const char *path, const plot_series *series, int n_series, const char *xlabel, const char *ylabel,
                qerr *e);

#endif
