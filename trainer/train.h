/* trainer/train.h — the QLoRA training run behind `qlora-train config.yaml`. */
#ifndef QLORA_TRAINER_TRAIN_H
#define QLORA_TRAINER_TRAIN_H

#include <stdint.h>

#include "core/status.h"
#include "trainer/config.h"

/* Summary of a finished run (for the CLI's last lines and the tests). */
typedef struct train_result {
    double eval_loss_start, eval_loss_end; /* mean CE per held-out target token (nats) */
    double eval_ppl_start, eval_ppl_end;
    double base_loss_check;   /* held-out loss of the base model alone (no adapter), if computed */
    int steps;
    double train_tokens_per_sec;
    double wall_seconds;
    double peak_rss_mib;
    int64_t quantized_bytes, n_quantized_params;
} train_result;

/* Run the whole job described by a validated config: load model, tokenizer
 * and data; evaluate; train; evaluate; write the PEFT adapter, metrics.jsonl,
 * loss_curve.png and config.resolved.yaml into c->output_dir. Progress goes to
 * stderr, one line per logging step. Returns 0, or -1 with a one-line message
 * (file, field, what was expected) and no partial adapter left behind. */
int train_run(const train_config *c, train_result *res, qerr *e);

#endif
