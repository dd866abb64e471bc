/* trainer/run.h — the training run as a context and a step (inside trainer/).
 *
 * train_run (trainer/train.c) is: run_setup, run_start, then per step
 * train_step (trainer/step.c) with run_eval (trainer/eval.c) and
 * run_checkpoint_save when due, then run_finish, then run_free. Everything the
 * run owns lives in one run_ctx; the checkpoint state is written from it by
 * run_checkpoint_save and read back into it by run_resume, and by nothing else.
 */
#ifndef QLORA_TRAINER_RUN_H
#define QLORA_TRAINER_RUN_H

#include <signal.h>
#include <stdint.h>

#include "autograd/tensor.h"
#include "comm/comm.h"
#include "core/status.h"
#include "data/dataset.h"
#include "data/stream.h"
#include "data/tokenizer.h"
#include "format/peft.h"
#include "model/base.h"
#include "model/llama.h"
#include "model/llama_fsdp.h"
#include "optim/adamw.h"
#include "optim/grad_scaler.h"
#include "optim/adamw8bit.h"
#include "optim/schedule.h"
#include "optim/sophia.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/memplan.h"
#include "trainer/metrics.h"
#include "trainer/train.h"

/* SIGINT, SIGTERM, SIGHUP: the signals that stop a run after a checkpoint (trainer/run.c). */
#define RUN_N_STOP_SIGNALS 3

/* The rows of one micro-batch, gathered contiguously: each (micro_batch_size * sequence_len) int32. */
typedef struct batch_buf {
    int32_t *ids, *tgt, *pos, *sid;
} batch_buf;

typedef struct run_ctx {
    const train_config *c;
    const char *cfgname;  /* c->config_path or "config", the prefix of every error */
    train_result *res;
    double t_start;       /* clock_now_sec() at train_run's start */
    int n_threads;
    int lock_fd;          /* output_dir/.qlora-train.lock, held with flock; -1 when not open */

    /* the ranks (comm/comm.h): rank 0 alone writes output_dir (lock, checkpoints, metrics, adapter, plot)
     * and logs; every rank computes */
    comm *comm;
    int rank, world;       /* comm->rank, comm->world_size */
    int stop_agreed;       /* world > 1: the stop request every rank saw at the latest step (run_stop) */
    double rss_max_mib;    /* the largest RSS over ranks at the latest step */

    /* the checkpoint resumed from (released by run_resume) */
    int resuming;
    ckpt_state ck;
    char ck_dir[4096];

    /* model, tokenizer, adapters */
    base_model *bm;       /* GGUF file or HF directory (model/base.h) */
    const gguf_file *gf;  /* its tokenizer metadata */
    tokenizer *tok;
    llama_model model;
    lora_set ls;
    peft_tensor *tensors; /* (n_tensors) the adapter's lora_A/lora_B in arena order: adapter files and checkpoints */
    int n_tensors;
    uint64_t model_fp, tok_fp, data_fp;

    /* data */
    packed_set train_set, eval_set; /* with pretraining_dataset, train_set holds the current step's rows */
    pretrain_stream *stream;        /* pretraining_dataset (data/stream.h), or NULL */

    /* schedule */
    int mbs, gas;          /* micro_batch_size, gradient_accumulation_steps */
    int64_t rows_per_step; /* mbs * gas * world: the global batch in rows */
    int steps_per_epoch, total_steps, warmup, eval_every, save_every;
    lr_schedule_kind sk;
    memplan plan;          /* the memory plan of where the run computes: host memory, or on device: cuda the device's */
    memplan plan_host;     /* device: cuda: the host side of the run (memplan_predict_host_of_device) */
    int plan_on_device;    /* 1 when plan is a device plan (the default backend is cuda) */

    /* engine and optimizer */
    ag_ctx ctx;
    int use_sophia;
    float *grad_acc;       /* (ls.n_params) when gas > 1: the sum of the micro-batches' gradients (backend memory) */
    /* SHARD_GRAD_OP (c->fsdp_shard_grad_op): rank r owns [shard_lo, shard_hi) of the flat arrays, at most
     * shard_len = ceil(n_params / world) elements; its optimizer state covers only that range */
    int sgo;
    int64_t shard_lo, shard_hi, shard_len;
    /* several ranks: the per-layer gradient buckets (model/llama_fsdp.h), reduced in backward as each layer
     * completes — all-reduced (NO_SHARD) or reduce-scattered onto [shard_lo, shard_hi) of ls.grads (SHARD_GRAD_OP,
     * FULL_SHARD; FULL_SHARD also gives the pages outside the shard back) */
    llama_grad_buckets buckets;
    /* (world + 1) rank k owns [shard_cuts[k], shard_cuts[k + 1]): ckpt_shard_interval's, or for adamw_8bit
     * those moved onto its quantization block grid (adamw8bit_shard_cut); shard_len is the longest. NULL
     * unless sgo */
    int64_t *shard_cuts;
    int use_adamw8bit; /* optimizer: adamw_8bit (bitsandbytes' AdamW8bit, opt8; r->ac holds its betas) */
    adamw_state opt;
    adamw8bit_state opt8;
    adamw_config ac;
    sophia_state sop;
    sophia_config soc;

    /* buffers and the data order */
    batch_buf bb;
    int64_t *perm;  /* (train_set.n_rows) the permutation of epoch `epoch` */
    int64_t *rows;  /* (rows_per_step) the current step's rows */
    int epoch;      /* whose permutation perm holds; -1 before the first step */

    /* outputs */
    char *config_yaml; /* config.resolved.yaml's text */
    metrics_writer *mw;

    /* counters (the checkpoint state) */
    int start_step, final_step, steps_run;
    int64_t cursor;                 /* training rows consumed since step 0, over all epochs */
    int64_t nan_streak, nan_skipped;
    /* fp16: true (trainer/step.c): torch.amp.GradScaler's state — the loss scale (2^16 at start), clean steps
     * since the last change (growth tracker), and the optimizer steps it skipped (the LR schedule does not
     * advance on them, as HF Trainer's optimizer_step_was_skipped) */
    int fp16;
    grad_scaler scaler; /* optim/grad_scaler.h */
    int watchdog_streak, watchdog_stop; /* loss_watchdog_*: steps in a row above the threshold; the stop step */
    int64_t last_saved;             /* step of the newest checkpoint; -1 when none */
    double last_lr;
    double eval_loss_start, last_eval; /* NAN when none */
    int last_eval_step;                /* -1 when none */
    int64_t ev_tok;                    /* target tokens of the latest evaluation */
    char last_ckpt[4096];              /* its directory, or "(none)" */

    /* timers */
    double train_sec;          /* optimizer-step time, over resumes (metrics' train_seconds) */
    double train_sec_at_start; /* train_sec when this process started training */
    double sophia_hess_sec;    /* Hessian-pass time of this process */
    double t_train;            /* clock_now_sec() when this process started training */
    double tok_trained;        /* tokens trained by this process */

    /* SIGINT / SIGTERM / SIGHUP handlers and SIGPIPE ignored (trainer/run.c): the dispositions they replaced */
    int handlers;
    struct sigaction old_sa[RUN_N_STOP_SIGNALS + 1];
} run_ctx;

/* The stop request the run acts on: with several ranks the one all ranks
 * agreed on at the latest step (a signal seen by any rank, the first in rank
 * order), so that every rank saves and stops after the same step; alone,
 * run_stop_signal(). */
int run_stop(const run_ctx *r);

/* A collective failed (e: the communicator's message naming this rank): the
 * message on this rank's error output, then the whole job ends with exit
 * status 1 (comm_abort). Does not return. */
void run_comm_fail(const run_ctx *r, const qerr *e) __attribute__((noreturn));

/* Set the run up, phase by phase (the stop-signal handlers first: SIGINT,
 * SIGTERM, SIGHUP; SIGPIPE ignored; a stop requested during the set-up is
 * honoured after the first step): output_dir and its lock, the inputs exist,
 * the checkpoint to resume from, the base model's file and tokenizer, the
 * data, the model's weights and adapters, the schedule and optimizer, and
 * (once every input has loaded) the outputs, restoring a resumed checkpoint
 * with run_resume. Returns 0, or -1 with the one-line message; either way
 * release with run_free. */
int run_setup(run_ctx *r, const train_config *c, comm *cm, train_result *res, qerr *e);

/* Before the first step: the held-out loss before training (or the one the
 * resumed checkpoint holds), the note when the checkpoint is past
 * total_steps, the training clock. e receives a metrics line's write error
 * (which does not stop the run). */
void run_start(run_ctx *r, qerr *e);

/* One optimizer step, number `step` (1-based): its rows_per_step rows from
 * the global data order, gradient_accumulation_steps micro-batches with the
 * loss scaled by 1 / (the step's target tokens), clip, learning-rate schedule,
 * AdamW or SophiaG (with its Hessian pass when due), the NaN policy (a
 * non-finite loss or gradient skips the update; max_nan_steps in a row stop
 * the run), the metrics line and the [train] log line. Returns 0, or -1 when
 * the run must stop. (trainer/step.c) */
int train_step(run_ctx *r, int step, qerr *e);
/* fp16: true's GradScaler (trainer/step.c): sets r->fp16 from the config and the scale to torch's
 * init_scale 2^16 (QLORA_TEST_LOSS_SCALE overrides it, a test hook), before any resume restores it. */
void scaler_init(run_ctx *r);

/* Evaluate the held-out set at `step` and log it ([eval] line, metrics.jsonl);
 * sets last_eval / last_eval_step. Returns the mean loss (nats per target
 * token). A metrics line that cannot be written leaves its message in e but
 * does not stop the run (nor does a train line's, in train_step).
 * (trainer/eval.c) */
double run_eval(run_ctx *r, int step, qerr *e);

/* Mean held-out cross-entropy (nats per target token) over eval_set, forward
 * only, stopping after eval_max_tokens target tokens (0: all); r->ev_tok
 * receives the tokens counted. NAN when there are none. (trainer/eval.c) */
double run_eval_loss(run_ctx *r);

/* Save the run's state after step `step` as output_dir/checkpoint-<step>
 * (trainer/checkpoint.h), with the PEFT adapter and config.resolved.yaml,
 * then prune to save_total_limit. The inverse of run_resume.
 * (trainer/run_state.c) */
int run_checkpoint_save(run_ctx *r, int step, qerr *e);

/* Continue from checkpoint ck: the adapter, the optimizer state and the
 * counters, metrics.jsonl as it was, and a note when the config changed. The
 * inverse of run_checkpoint_save. Called once every input has loaded (it
 * writes output_dir/metrics.jsonl). (trainer/run_state.c) */
int run_resume(run_ctx *r, const ckpt_state *ck, qerr *e);

/* How the config holds the frozen base, as saved in a checkpoint's /fingerprint base_format and checked on
 * resume: "int8" (load_in_8bit), "nf4 double_quant" / "nf4" (load_in_4bit, bnb_4bit_use_double_quant),
 * "bf16" (neither). A static string. */
const char *run_base_format(const train_config *c);

/* Write the run's adapter into dir (adapter_model.safetensors,
 * adapter_config.json; format/peft.h peft_write_adapter) from the one tensor
 * table r->tensors. (trainer/run_state.c) */
int run_write_adapter(const run_ctx *r, const char *dir, qerr *e);

/* After the loop: the Sophia summary, the final checkpoint, the stop-signal
 * result, the held-out loss after training, the adapter and the loss curve.
 * A run in which no optimizer update was ever applied (every step had a
 * non-finite loss or gradient and was skipped) fails with -1 instead: nothing
 * was trained, so no adapter is written. */
int run_finish(run_ctx *r, qerr *e);

/* What asked the run to stop: SIGINT, SIGTERM or SIGHUP, SIGPIPE when stdout
 * or stderr was closed (run_check_outputs), or 0. Set from run_start on. */
int run_stop_signal(void);

/* The stop request `sig` in words for log lines ("SIGHUP", "a closed output
 * (stdout or stderr)"). */
const char *run_stop_signal_name(int sig);

/* A closed stdout or stderr (the reader of a pipe gone: `| head`, a dropped
 * connection) is a stop request like SIGTERM: when poll reports either as
 * gone, run_stop_signal() becomes SIGPIPE. Called after every step (a write
 * to the closed pipe only fails with EPIPE: SIGPIPE is ignored from
 * run_start on). */
void run_check_outputs(void);

/* Release everything the run holds (any state run_setup left it in). */
void run_free(run_ctx *r);

/* Gather rows[0..nb) of ps into bb and describe them as a batch in *b. */
void run_batch_fill(const packed_set *ps, const int64_t *rows, int nb, batch_buf *bb, llama_batch *b);

#endif
