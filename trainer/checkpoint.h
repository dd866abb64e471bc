/* trainer/checkpoint.h — training checkpoints: HDF5 state, crash-safe directories.
 *
 * A checkpoint is a directory output_dir/checkpoint-<step>/ holding
 *   state.h5                   everything needed to continue bit-exactly (layout below)
 *   adapter_model.safetensors  the PEFT adapter at that step (a convenience copy,
 *   adapter_config.json        as HF Trainer / PEFT write into their checkpoints)
 *   config.resolved.yaml       the configuration that was running
 *   COMPLETE                   the completion marker, written last
 *
 * Crash safety (marker-last protocol). A save writes everything into
 * checkpoint-<step>.tmp-<pid>/, fsyncs every file and the directory, renames
 * it to checkpoint-<step> (after moving an existing directory of that name
 * aside to .old-<pid>), fsyncs output_dir, and only then writes COMPLETE
 * (through COMPLETE.tmp + fsync + rename). COMPLETE records the size and
 * XXH64 of state.h5; a checkpoint counts only if COMPLETE parses and matches,
 * so a kill at any moment, also in the middle of a save, leaves the previous
 * complete checkpoint as the newest one that loads.
 *
 * state.h5 layout (format_version 1; read it with h5dump or h5py):
 *   /                       attrs format="qlora-checkpoint", format_version=1, step, created_by
 *   /config                 string: the resolved YAML config
 *   /lora/params            float32 (n_params): the flat adapter arena (chunked, shuffle + zlib)
 *   /lora/tensor_names      string[128] (n_tensors): PEFT names, in arena order
 *   /lora/tensor_offsets    int64 (n_tensors): first element of each tensor in the arena
 *   /lora/tensor_shapes     int64 (n_tensors, 2): [rows, cols] row-major (A [r, in], B [out, r])
 *   /optimizer/exp_avg      float32 (n_params): AdamW first moment / Sophia momentum m (torch's name)
 *   /optimizer/exp_avg_sq   float32 (n_params): AdamW second moment (adamw only)
 *   /optimizer/hessian      float32 (n_params): Sophia's Hessian EMA h (sophia only; the official name)
 *   adamw_8bit instead (bitsandbytes' AdamW8bit state, optim/adamw8bit.h):
 *   /optimizer/state1, state2    uint8 (n_params): codes of m and v (0 over the fp32 tensors)
 *   /optimizer/absmax1, absmax2  float32 (n_blocks): one per block of 256 of each 8-bit tensor
 *   /optimizer/exp_avg, exp_avg_sq float32 (n32): m and v of the tensors below min_8bit_size, in order
 *     attrs name="adamw" | "sophia" | "adamw_8bit", step (completed updates), beta1, beta2,
 *     weight_decay; adamw, adamw_8bit: eps; adamw_8bit: blocksize, min_8bit_size; sophia: rho,
 *     hessian_interval (k), hessian_updates
 *   /scheduler              attrs name, base_lr, warmup_steps, total_steps, last_step, last_lr
 *   /rng                    attrs seed, scheme (counter-based: see below)
 *   /data                   attrs epoch, index (into the epoch permutation), rows_consumed,
 *                           n_rows, rows_per_step, shuffle_seed, fingerprint (XXH64 hex)
 *   /fingerprint            attrs base_model (path), model_xxh64, tokenizer_xxh64, method, base_format
 *                           (absent in checkpoints written before it)
 *   /trainer_state          attrs nan_streak, nan_skipped, eval_loss_start, last_eval_loss,
 *                           last_eval_step, train_seconds, loss_watchdog_streak (absent in
 *                           checkpoints written before it: read as 0); fp16 runs only: loss_scale,
 *                           scaler_growth_tracker, scaler_skipped (GradScaler's state; absent: a
 *                           fp16 resume starts from init_scale 2^16, as torch does without it)
 *   /log_history            uint8 (n): metrics.jsonl as it was at this step (restored on resume)
 * In this single-file layout (FULL_STATE_DICT, the default of one process and of
 * NO_SHARD) adapters and optimizer state are saved whole, so the format does not
 * depend on how many workers wrote it; the sharded layout (ckpt_save_sharded)
 * resumes at any world size too, by reading intervals. Randomness is counter-based (core/rng.h): dropout
 * masks are a pure function of (seed, step, micro-batch) and the data order of
 * (seed, epoch), so seed + step + rows_consumed are the whole RNG state.
 */
#ifndef QLORA_TRAINER_CHECKPOINT_H
#define QLORA_TRAINER_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"
#include "core/status.h"
#include "format/gguf.h"
#include "format/peft.h"

#define CKPT_FORMAT_VERSION 1
#define CKPT_STATE_FILE "state.h5"
#define CKPT_MARKER "COMPLETE"
#define CKPT_RUN_STATE_FILE "run_state.h5"   /* sharded layout: the scalar run state, written once */
#define CKPT_INDEX_FILE "index.json"         /* sharded layout: global array -> (file, offset, length) */
#define CKPT_SHARD_FORMAT "qlora-checkpoint-shard"
#define CKPT_INDEX_FORMAT "qlora-sharded-checkpoint"
#define CKPT_NAME_MAX PEFT_NAME_MAX

/* One tensor inside the flat adapter arena: {name (PEFT), offset, rows, cols},
 * the same table the adapter writer takes (format/peft.h). */
typedef peft_tensor ckpt_tensor;

/* Everything in state.h5. On write the caller owns every pointer; after
 * ckpt_read_state they are malloc'd and released by ckpt_state_free. */
typedef struct ckpt_state {
    int64_t step;          /* optimizer steps completed (HF global_step) */
    int64_t total_steps;   /* of the run that wrote it */
    /* data position */
    int64_t rows_consumed; /* training rows consumed since step 0, over all epochs */
    int64_t n_rows;        /* rows per epoch */
    int64_t rows_per_step; /* micro_batch_size * gradient_accumulation_steps */
    uint64_t shuffle_seed;
    uint64_t data_fingerprint;  /* XXH64 of the packed training rows */
    /* randomness */
    uint64_t seed;
    /* learning-rate schedule */
    char lr_scheduler[32];
    double base_lr, last_lr;
    int64_t warmup_steps;
    /* optimizer */
    char optimizer[16];    /* "adamw" ("" on write = "adamw") | "sophia" | "adamw_8bit" */
    int64_t opt_step;      /* optimizer updates applied (skipped NaN steps do not count) */
    double beta1, beta2, eps, weight_decay;
    double rho;                              /* sophia */
    int64_t hessian_interval, hessian_updates; /* sophia: k, Hessian EMA updates applied */
    /* trainer */
    int64_t nan_streak, nan_skipped;
    double loss_scale;                       /* fp16: GradScaler's scale; 0 = none (not fp16, or written before) */
    int64_t scaler_growth_tracker, scaler_skipped; /* fp16: clean steps since the scale changed; steps skipped */
    double eval_loss_start, last_eval_loss; /* NAN when none */
    int64_t last_eval_step;                 /* -1 when none */
    double train_seconds;                   /* optimizer-step time so far (metrics' train_seconds) */
    int64_t loss_watchdog_streak;           /* optimizer steps in a row above loss_watchdog_threshold */
    /* what it was trained on */
    uint64_t model_fingerprint, tokenizer_fingerprint;
    char base_model[1024];
    char base_format[32]; /* how the frozen base was held (run_base_format: "nf4 double_quant", "nf4", "int8",
                             "bf16"); "" in a checkpoint written before the field (not checked on resume) */
    /* payload */
    int64_t n_params;
    float *params, *exp_avg, *exp_avg_sq; /* (n_params) each; exp_avg_sq NULL for sophia */
    float *hessian;                       /* (n_params) sophia's h, else NULL */
    /* adamw_8bit: exp_avg, exp_avg_sq hold n32 elements (the fp32 tensors' moments) and these the rest */
    uint8_t *state1, *state2;             /* (n_params) codes */
    float *absmax1, *absmax2;             /* (n_blocks) */
    int64_t n_blocks, n32;                /* of the whole arena */
    /* adamw_8bit's arrays hold: state1, state2 the codes of [opt_lo, opt_hi); absmax1, absmax2 the blocks
     * [blk_lo, blk_hi); exp_avg, exp_avg_sq the fp32-moment elements [n32_lo, n32_hi) (all of them: 0,
     * n_blocks, 0, n32 — always so in the single-file layout) */
    int64_t blk_lo, blk_hi, n32_lo, n32_hi;
    /* The optimizer arrays (exp_avg, exp_avg_sq, hessian; not the 8-bit ones) hold elements
     * [opt_lo, opt_hi) of the flat arrays: on read 0, n_params unless ckpt_load_part asked for one
     * rank's interval; on write by ckpt_save_sharded the interval this rank holds (opt_hi 0 = all). */
    int64_t opt_lo, opt_hi;
    /* write: 1 = ckpt_write_state writes the run state alone (no /lora/params, no optimizer arrays:
     * the run_state.h5 of a sharded checkpoint). read: the world size that wrote the sharded
     * checkpoint it came from (0: a single-file checkpoint). */
    int sharded;
    int n_tensors;
    ckpt_tensor *tensors;                 /* (n_tensors) */
    char *config_yaml;                    /* NUL-terminated */
    char *log_history;                    /* log_history_len bytes (+ NUL after read) */
    int64_t log_history_len;
} ckpt_state;

/* Write state.h5 at `path` (created or truncated), then fsync it. */
int ckpt_write_state(const char *path, const ckpt_state *s, qerr *e);

/* Read state.h5: checks the format, version, every dataset's shape against
 * n_params / n_tensors, and tensor offsets/shapes against the arena. *s is
 * zeroed first and owns its buffers on success (nothing on failure). */
int ckpt_read_state(const char *path, ckpt_state *s, qerr *e);
void ckpt_state_free(ckpt_state *s);

/* ckpt_verify(dir) then ckpt_read_state(dir/state.h5). */
int ckpt_load(const char *dir, ckpt_state *s, qerr *e);

/* The interval [*lo, *hi) of a flat array of n elements that rank `rank` of `world` holds in the
 * sharded layouts (SHARD_GRAD_OP's optimizer state, a sharded checkpoint's shard files): shards of
 * ceil(n / world) elements in rank order, the last ones shorter or empty. The one source of this
 * rule (trainer/run.c takes it too). */
void ckpt_shard_interval(int64_t n, int world, int rank, int64_t *lo, int64_t *hi);

/* The shard boundaries of world ranks over a flat arena of n elements: cuts (world + 1), rank k holds
 * [cuts[k], cuts[k + 1]). block_aligned 0: ckpt_shard_interval's. block_aligned 1 (optimizer adamw_8bit):
 * each of those boundaries moved up onto bitsandbytes' quantization block grid
 * (optim/adamw8bit.h adamw8bit_shard_cut over the tensors offset[i], numel[i], arena order), so every
 * rank's 256-element blocks are exactly blocks of one process's state; a shard is then at most 255
 * elements longer than ceil(n / world), and may be empty. */
void ckpt_shard_cuts(int64_t n, int world, int block_aligned, const int64_t *offset, const int64_t *numel,
                     int n_tensors, int64_t *cuts);

/* As ckpt_load, for a sharded checkpoint (or a single-file one) resumed by rank `rank` of `world`
 * ranks that holds only its interval (ckpt_shard_interval; adamw_8bit: ckpt_shard_cuts on the block
 * grid) of the optimizer state: the optimizer arrays then hold [s->opt_lo, s->opt_hi) = that interval
 * (adamw_8bit also blk_lo.., n32_lo.. of its blocks and fp32 moments), read from whichever shard files hold it
 * (resharding on load, as torch.distributed.checkpoint does). world 0: the whole arrays. The
 * parameters are always read whole (every rank holds them). */
int ckpt_load_part(const char *dir, int world, int rank, ckpt_state *s, qerr *e);

/* Called by ckpt_save with the temporary directory, to add files (the PEFT
 * adapter, the config) before the checkpoint is committed. */
typedef int (*ckpt_extra_fn)(const char *dir, void *arg, qerr *e);

/* Save a checkpoint for s->step with the marker-last protocol above. On
 * success out_dir (may be NULL) receives the final directory path. On failure
 * the temporary directory is removed and no existing checkpoint is touched
 * (except an existing directory of the same step, which is restored). */
int ckpt_save(const char *output_dir, const ckpt_state *s, ckpt_extra_fn extra, void *arg, char *out_dir,
              size_t out_n, qerr *e);

/* The sharded layout (fsdp_state_dict_type: SHARDED_STATE_DICT; collective, every rank of cm calls it
 * with its own s). checkpoint-<step>/ then holds
 *   shard-RRRRR-of-WWWWW.h5    one per rank: its interval [lo, hi) = ckpt_shard_interval(n_params, world,
 *                              rank) of /lora/params and of the optimizer's flat arrays (/optimizer/exp_avg,
 *                              exp_avg_sq | hessian), attrs format="qlora-checkpoint-shard", format_version,
 *                              step, rank, world_size, n_params, offset (= lo), length (= hi - lo);
 *                              adamw_8bit: [lo, hi) on the block grid (ckpt_shard_cuts with the tensor
 *                              table), /optimizer/state1, state2 (uint8, [lo, hi)), absmax1, absmax2 (the
 *                              blocks [blk_lo, blk_hi) it holds) and exp_avg, exp_avg_sq (the fp32-moment
 *                              elements [n32_lo, n32_hi)), the last four with a dataset attr offset
 *   run_state.h5               the state.h5 layout without the arrays (root attr layout="sharded",
 *                              /lora attr n_params): step, data position, RNG, scheduler, optimizer
 *                              scalars, the tensor table, config, log_history — written once, by rank 0
 *   index.json                 each global array ("lora/params", "optimizer/exp_avg", ...) -> the list of
 *                              {file, offset, length} that tile it, in order (docs/formats.md)
 *   adapter files, config.resolved.yaml, COMPLETE (every file above with its size and XXH64)
 * Commit: rank 0 makes checkpoint-<step>.tmp-<pid>/; every rank writes and fsyncs its shard file
 * there; the ranks exchange (ok, size, XXH64) — the barrier; rank 0 writes run_state.h5, index.json,
 * the extra files, fsyncs, renames the directory into place and writes COMPLETE last, as ckpt_save.
 * s->params holds all n_params parameters (replicated), the optimizer arrays [s->opt_lo, s->opt_hi)
 * (which must contain this rank's interval; adamw_8bit's also [blk_lo, blk_hi), [n32_lo, n32_hi) with
 * n_blocks, n32 the whole arena's); rank 0's s also the scalar state. 0 on every rank when
 * the checkpoint committed; -1 with e when it did not (a failing rank names itself, the others name
 * it); -2 when a collective failed (e: the communicator's message; the caller ends the job). */
int ckpt_save_sharded(comm *cm, const char *output_dir, const ckpt_state *s, ckpt_extra_fn extra, void *arg,
                      char *out_dir, size_t out_n, qerr *e);

/* Consolidate a checkpoint (sharded or not) into a single-file checkpoint at dst (a new directory:
 * state.h5 with the whole arrays, the adapter files and config.resolved.yaml copied, COMPLETE),
 * resumable by one process (resume_from_checkpoint: dst) and exportable (qlora-export dst).
 * Crash-safe as ckpt_save (dst.tmp-<pid>, fsync, rename, COMPLETE last); dst must not exist. */
int ckpt_consolidate(const char *src, const char *dst, qerr *e);

/* Is `dir` a complete checkpoint? Checks COMPLETE and the size and XXH64 of
 * every file it lists (state.h5; or run_state.h5, index.json and every shard file). Both must be regular files (core/file.h file_open_regular: a FIFO
 * or a device such as a symlink to /dev/zero is refused before it is read),
 * and state.h5's size is compared with the marker's before its bytes are
 * hashed. Returns 0 and its step, or -1 with the reason. */
int ckpt_verify(const char *dir, int64_t *step, qerr *e);

/* The directories named checkpoint-<digits> in output_dir, by step, newest
 * first. *out is malloc'd (free it); n = 0 and *out = NULL when there are
 * none or output_dir does not exist. Incomplete ones are listed too. */
typedef struct ckpt_entry {
    int64_t step;
    char path[4096];
    int complete; /* its COMPLETE marker exists: a save that committed (whether it still verifies or not) */
} ckpt_entry;
int ckpt_list(const char *output_dir, ckpt_entry **out, int *n, qerr *e);

/* Keep the newest `keep` complete checkpoints (keep > 0) and delete older
 * ones (marker first, so a half-deleted checkpoint never looks complete);
 * also delete incomplete checkpoint directories older than the newest complete
 * one. `*n_deleted` counts the directories removed. A directory that cannot
 * be deleted does not stop the others: -1 then reports the first failure
 * (nothing newer than `keep` is ever touched). */
int ckpt_prune(const char *output_dir, int keep, int *n_deleted, qerr *e);

/* Clean up after interrupted saves: delete checkpoint-*.tmp-* directories;
 * a complete checkpoint-N.old-* (moved aside by a save of the same step that
 * did not complete) is renamed back over an incomplete checkpoint-N, else
 * deleted. `*n_deleted` counts directories removed or restored. Call only
 * while holding the output_dir lock. */
int ckpt_clean_stale(const char *output_dir, int *n_deleted, qerr *e);

/* Fingerprint of the base model file (or directory) at `path`: XXH64 over the
 * file size and its bytes, all of them for files up to 256 MiB; for larger
 * files the first 16 MiB (GGUF metadata, tokenizer and tensor infos), then 64
 * KiB every 4 MiB and the last 64 KiB. A directory hashes each regular file's
 * name and fingerprint in name order. */
int ckpt_fingerprint_model(const char *path, uint64_t *fp, qerr *e);

/* Fingerprint of a GGUF's tokenizer: XXH64 over every `tokenizer.*` key, its
 * type and value, in file order. */
uint64_t ckpt_fingerprint_tokenizer(const gguf_file *f);

/* Delete a directory tree (no symlinks followed). Missing is fine. */
int ckpt_remove_tree(const char *path, qerr *e);

/* Test hooks (environment; used by tests/test_e2e_resume.c, never needed otherwise):
 *   QLORA_TEST_SAVE_DELAY_MS=N   sleep N ms between the stages of a save, so that
 *                                 a kill at a random moment often lands inside one;
 *   QLORA_TEST_CRASH_AT=STAGE    raise SIGKILL at STAGE of the process's first save:
 *                                 "begin" (temporary directory made), "state"
 *                                 (state.h5 half written), "extra" (before the
 *                                 adapter files), "rename" (before the directory
 *                                 rename), "marker" (renamed, before COMPLETE),
 *                                 "committed" (COMPLETE written, before cleanup).
 *                                 Sharded saves (ckpt_save_sharded) also: "shard_begin" (before
 *                                 the rank's shard file), "shard_mid" (its file half written),
 *                                 "shard_synced" (fsynced, before the barrier), "barrier" (after
 *                                 it, before COMPLETE); "state" is then rank 0's run_state.h5;
 *   QLORA_TEST_CRASH_RANK=R      only rank R crashes (sharded saves; default: any rank);
 *   QLORA_TEST_CRASH_STEP=N      only the save of step N crashes (default: any). */
void ckpt_test_point(const char *stage);

#endif
