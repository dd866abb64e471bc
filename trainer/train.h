/* trainer/train.h — the QLoRA training run behind `qlora-train config.yaml`. */
#ifndef QLORA_TRAINER_TRAIN_H
#define QLORA_TRAINER_TRAIN_H

#include <stdint.h>

#include "comm/comm.h"
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
    int interrupted;          /* the stop request (SIGINT, SIGTERM, SIGHUP, or SIGPIPE for a closed output) that
                               * ended the run after a checkpoint (else 0) */
    int interrupted_step;     /* the step that checkpoint holds */
    char checkpoint[4096];    /* its directory */
} train_result;

/* Run the whole job described by a validated config: load model, tokenizer
 * and data; evaluate; train; evaluate; write the PEFT adapter, metrics.jsonl,
 * loss_curve.png, loss_curve.svg and config.resolved.yaml into c->output_dir.
 * Progress goes to stderr, one line per logging step. Returns 0, or -1 with a one-line message
 * (file, field, what was expected) and no partial adapter left behind.
 *
 * Checkpoints (trainer/checkpoint.h) go to output_dir/checkpoint-<step>/ every
 * train_config_save_interval() steps, after the last step and on
 * SIGINT/SIGTERM/SIGHUP or a closed stdout/stderr; the run resumes from the newest complete one (or
 * c->resume_from_checkpoint) bit-exactly. Such a stop request during training
 * finishes the step, saves, and returns 0 with res->interrupted = the signal.
 * Inputs are checked (output_dir writable and unlocked, files readable,
 * sequence_len within the model's context) before anything heavy is loaded,
 * and nothing in output_dir changes until every input has loaded. */
int train_run(const train_config *c, train_result *res, qerr *e);

/* train_run as one rank of a job (comm/comm.h; train_run is this with a
 * single-process communicator). Data parallel (DDP, NO_SHARD): every rank
 * holds the whole model and adapters; the global batch is micro_batch_size ×
 * gradient_accumulation_steps × world_size rows taken from the one global
 * data order, rank r computing the micro-batches r·gas … r·gas + gas − 1 of
 * each step; each micro-batch's gradient is computed alone (β = 0) and added,
 * the ranks' sums all-reduced once per step, the loss normalised by the
 * step's global target-token count; evaluation batches are split over the
 * ranks and the per-batch sums reduced and added in batch order. World 2 ×
 * accumulation 1 thus equals world 1 × accumulation 2 bit for bit. Rank 0
 * alone writes output_dir and logs. A failed collective ends the job
 * (comm_abort). */
int train_run_comm(const train_config *c, comm *cm, train_result *res, qerr *e);

#endif
