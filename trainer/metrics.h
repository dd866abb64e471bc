/* trainer/metrics.h — metrics.jsonl: one JSON object per line, flushed per line.
 *
 * Train lines:  {"step": 12, "loss": 2.31, "lr": 0.0002, "grad_norm": 0.91, "tokens_per_sec": 5120.5, "epoch": 0.25}
 * Eval lines:   {"step": 12, "eval_loss": 2.05, "eval_ppl": 7.77, "eval_tokens": 40960}
 *
 * A train line may carry extra numbers after these (metrics_log_train_fields),
 * e.g. Sophia's {"..., "epoch": 0.25, "train_seconds": 41.2, "sophia_win_rate": 0.31}.
 *
 * `step` is the optimizer step (0 = before the first update), losses are mean
 * token cross-entropy in nats, lr is the value used for that step, grad_norm
 * is the global L2 norm before clipping, epoch is fractional. Numbers are
 * written in their shortest round-trip form (as float32 when the value is
 * exactly a float32, else as double). JSON has no NaN/Inf: non-finite values
 * are written as null and read back as NAN. A line is written with a single
 * fwrite and flushed, so a crash leaves at most one partial last line, which
 * metrics_read tolerates.
 */
#ifndef QLORA_TRAINER_METRICS_H
#define QLORA_TRAINER_METRICS_H

#include <stdint.h>

#include "core/status.h"

typedef struct metrics_writer metrics_writer; /* opaque */

/* Open `path` for writing (append != 0: keep existing lines, e.g. on resume;
 * else truncate). */
int metrics_open(const char *path, int append, metrics_writer **out, qerr *e);

/* One train line (see above). */
int metrics_log_train(metrics_writer *w, int64_t step, double loss, double lr, double grad_norm,
                      double tokens_per_sec, double epoch, qerr *e);

/* An extra named number of a train line (name: a JSON-safe identifier). */
typedef struct metrics_field {
    const char *name;
    double value;
} metrics_field;

/* A train line with n_extra fields appended after "epoch" (n_extra <= 16). */
int metrics_log_train_fields(metrics_writer *w, int64_t step, double loss, double lr, double grad_norm,
                             double tokens_per_sec, double epoch, const metrics_field *extra, int n_extra, qerr *e);

/* One eval line; eval_ppl = exp(eval_loss) is the caller's to compute. */
int metrics_log_eval(metrics_writer *w, int64_t step, double eval_loss, double eval_ppl, int64_t eval_tokens,
                     qerr *e);

/* Close (flushes). Returns 0, or -1 if the final flush/close failed. NULL is fine. */
int metrics_close(metrics_writer *w, qerr *e);

/* A metrics.jsonl read back into columns. Steps are floats (exact up to 2^24)
 * so they can go straight to plot_loss (trainer/plot.h). Missing fields read as NAN. */
typedef struct metrics_series {
    int n_train;
    float *train_step, *train_loss, *train_lr, *train_grad_norm, *train_tokens_per_sec, *train_epoch;
    int n_eval;
    float *eval_step, *eval_loss, *eval_ppl;
    double *eval_tokens;
} metrics_series;

/* Parse `path`. A line with "eval_loss" is an eval line; one with "loss" a
 * train line; other objects (future event lines) are skipped; blank lines are
 * skipped; a malformed line is an error "<path>:<line>: ..." except a final
 * line without its newline (an interrupted write), which is dropped.
 * On failure *out is zeroed. */
int metrics_read(const char *path, metrics_series *out, qerr *e);
void metrics_series_free(metrics_series *s);

#endif
