/* trainer/step.c — one optimizer step (train_step, see run.h).
 *
 * One optimizer step = gradient_accumulation_steps micro-batches of
 * micro_batch_size packed rows. The loss of a micro-batch is its summed
 * token cross-entropy divided by the number of target tokens of the whole
 * step, so accumulated gradients equal those of one big batch (the fix
 * transformers made with num_items_in_batch). Then: clip by global norm,
 * schedule the learning rate, AdamW over the flat adapter arena — or SophiaG
 * (optim/sophia.h), which after every sophia_k-th step also runs its
 * Gauss-Newton-Bartlett Hessian estimate on that step's rows
 * (sophia_hessian_pass below). During training the adapter's gradients and
 * parameters are touched only here: step_gradients zeroes and fills
 * ls.grads, train_step and sophia_hessian_pass clip and apply them.
 *
 * Several ranks (data parallel, train_run_comm in train.h): the step's rows
 * are the next mbs · gas · world_size of the one global order; rank r takes
 * the global micro-batches r·gas … r·gas + gas − 1, with dropout masks and
 * sampled labels keyed by (step, global micro-batch), never by rank. Every
 * micro-batch's gradient is computed into a zeroed buffer (β = 0) and then
 * added to the sum explicitly — also in one process — and the ranks' sums are
 * reduced before the norm, layer by layer as the last micro-batch's backward
 * completes each layer (model/llama_fsdp.h llama_grad_buckets: all-reduced,
 * or reduce-scattered onto the shards under SHARD_GRAD_OP / FULL_SHARD, the
 * communication overlapping the rest of backward). World 2 × accumulation 1 thus
 * computes g0 + g1 exactly as world 1 × accumulation 2 does (a two-term fp32
 * sum has one result whatever its order). (With accumulation > 1 the sum
 * now rounds once per micro-batch outside the GEMM, where backward's β = 1
 * GEMMs used to add into the running gradient; this may change the last bits
 * of such runs. Measured with oneDNN on the default config, accumulation 2,
 * 3 steps: metrics and adapter identical to before; accumulation 1 is
 * unchanged by construction.)
 *
 * SHARD_GRAD_OP / FULL_SHARD (r->sgo): the sum is reduce-scattered instead (per layer bucket, in
 * place), rank r's interval [shard_cuts[r], shard_cuts[r + 1]) of ls.grads holding its part; the
 * optimizer (AdamW, SophiaG or 8-bit AdamW) updates that interval with the state of that interval
 * only, and each rank's interval of the parameters is broadcast from it. Sophia's Hessian-estimate gradient is reduce-scattered the same way and h updated on
 * the shard; adamw_8bit's intervals lie on bitsandbytes' block grid (trainer/checkpoint.h
 * ckpt_shard_cuts), so every rank quantizes exactly the blocks one process does.
 */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/rng.h"
#include "optim/clip.h"
#include "trainer/checkpoint.h"
#include "trainer/run.h"

void run_batch_fill(const packed_set *ps, const int64_t *rows, int nb, batch_buf *bb, llama_batch *b) {
    int T = ps->seq_len;
    for (int i = 0; i < nb; i++) {
        size_t src = (size_t)rows[i] * T, dst = (size_t)i * T;
        memcpy(bb->ids + dst, ps->input_ids + src, (size_t)T * 4);
        memcpy(bb->tgt + dst, ps->targets + src, (size_t)T * 4);
        memcpy(bb->pos + dst, ps->position_ids + src, (size_t)T * 4);
        memcpy(bb->sid + dst, ps->seq_ids + src, (size_t)T * 4);
    }
    *b = (llama_batch){.B = nb, .T = T, .input_ids = bb->ids, .targets = bb->tgt, .position_ids = bb->pos,
                       .seq_ids = bb->sid};
}

/* The step's rows_per_step rows into r->rows: the next ones of the global
 * order (epoch by epoch, each epoch's permutation from dataset_epoch_order);
 * advances r->cursor. Returns their target tokens. */
static int64_t step_rows(run_ctx *r, qerr *e) {
    const packed_set *ps = &r->train_set;
    int64_t n_targets = 0;
    if (r->stream) { /* pretraining_dataset: the stream's next rows are the step's */
        if (pretrain_stream_next(r->stream, r->rows_per_step, &r->train_set, e)) return -1;
        for (int64_t i = 0; i < r->rows_per_step; i++) r->rows[i] = i;
        r->cursor += r->rows_per_step;
        r->epoch = pretrain_stream_epoch(r->stream);
        r->data_fp = pretrain_stream_fingerprint(r->stream);
        return r->train_set.n_target_tokens;
    }
    for (int64_t i = 0; i < r->rows_per_step; i++) {
        int ep = (int)(r->cursor / ps->n_rows);
        if (ep != r->epoch) {
            r->epoch = ep;
            dataset_rows_order(ps, train_config_data_seed(r->c), r->epoch, r->perm);
        }
        r->rows[i] = r->perm[r->cursor % ps->n_rows];
        r->cursor++;
    }
    for (int64_t i = 0; i < r->rows_per_step; i++) {
        const int32_t *t = ps->targets + (size_t)r->rows[i] * ps->seq_len;
        for (int j = 0; j < ps->seq_len; j++) n_targets += t[j] != -100;
    }
    return n_targets;
}

/* Forward and backward over the step's micro-batches, gradients accumulated
 * into ls.grads (zeroed first): the loss is scale · Σ CE over target tokens,
 * with the data's targets, or (sampled) with labels drawn from the model's
 * own softmax for Sophia's Hessian estimate. loss_sum / n_tokens (may be NULL)
 * receive the summed CE and its tokens. Dropout masks and sampled labels are
 * a pure function of (seed, step, micro-batch). */
static void step_gradients(run_ctx *r, int step, int sampled, float scale, double *loss_sum, int64_t *n_tokens) {
    const train_config *c = r->c;
    const ag_backend *be = r->ctx.be;
    const size_t gbytes = (size_t)r->ls.n_params * sizeof(float);
    r->ctx.training = 1;
    llama_grad_buckets *gb = r->model.grad_buckets; /* several ranks: reduced per layer in the last backward */
    for (int mb = 0; mb < r->gas; mb++) {
        const int gmb = r->rank * r->gas + mb; /* the global micro-batch */
        if (gb) llama_grad_buckets_zero(gb); /* this micro-batch's gradient alone */
        else be->zero(r->ls.grads, gbytes);
        if (gb && mb == r->gas - 1) llama_grad_buckets_arm(gb, r->gas > 1 ? r->grad_acc : NULL);
        llama_batch b;
        run_batch_fill(&r->train_set, r->rows + (size_t)gmb * r->mbs, r->mbs, &r->bb, &b);
        const uint64_t ctr = (uint64_t)step * 4096u + (uint64_t)gmb;
        r->ctx.seed = rng_u64((uint64_t)c->seed, sampled ? 0x5e55u : 0xd509u, ctr);
        ag_mark mk = ag_arena_mark(&r->ctx);
        double lsum = 0.0;
        int64_t nt = 0;
        tensor *L = sampled ? llama_forward_sampled_loss(&r->ctx, &r->model, &r->ls, &b, scale,
                                                         c->gradient_checkpointing,
                                                         rng_u64((uint64_t)c->seed, 0x5a3bu, ctr), NULL, NULL, NULL)
                            : llama_forward_loss(&r->ctx, &r->model, &r->ls, &b, scale, c->gradient_checkpointing,
                                                 &lsum, &nt);
        if (L->requires_grad) ag_backward(&r->ctx, L);
        ag_arena_reset(&r->ctx, mk);
        if (loss_sum) *loss_sum += lsum;
        if (n_tokens) *n_tokens += nt;
        if (gb && mb == r->gas - 1) break; /* the buckets added grad_acc, layer by layer */
        if (r->gas > 1) {
            if (mb == 0) be->copy_d2d(r->grad_acc, r->ls.grads, gbytes);
            else be->add(r->grad_acc, r->ls.grads, r->grad_acc, r->ls.n_params);
        }
    }
    if (gb) { /* the buckets still in flight (and any no backward reached): ls.grads summed, or its shard */
        qerr ce;
        if (llama_grad_buckets_finish(gb, &ce)) run_comm_fail(r, &ce);
        return;
    }
    if (r->gas > 1) be->copy_d2d(r->ls.grads, r->grad_acc, gbytes);
}

/* SHARD_GRAD_OP: the global norm of the sharded gradient g (this rank's
 * n_own elements): the ranks' fp64 sums of squares added, then sqrt, as
 * clip_grad_norm_backend takes it of the whole gradient; clips g. (The fp64
 * sum is associated by shard instead of by the backend's chunks; the two
 * differ by ~1e-16 relative, which the float norm rounds away unless it
 * falls on a rounding boundary.) */
static float sgo_clip(run_ctx *r, float *g, int64_t n_own) {
    double ss = n_own > 0 ? r->ctx.be->sum_squares(g, n_own) : 0.0;
    qerr ce;
    if (r->world > 1 && comm_all_reduce_sum(r->comm, &ss, 1, COMM_F64, &ce)) run_comm_fail(r, &ce);
    const float total = (float)sqrt(ss);
    clip_grad_by_norm_backend(r->ctx.be, g, n_own, total, r->c->max_grad_norm);
    return total;
}

/* SHARD_GRAD_OP: every rank's updated shard of the parameters to every rank, in place: rank q's interval
 * broadcast from q (the intervals are uneven at the end, and a broadcast needs no buffer). */
static void sgo_gather_params(run_ctx *r) {
    qerr ce;
    r->ctx.be->sync();
    for (int q = 0; q < r->world; q++) {
        const int64_t lo = r->shard_cuts[q], hi = r->shard_cuts[q + 1];
        if (hi > lo && comm_broadcast(r->comm, r->ls.params + lo, (size_t)(hi - lo), COMM_F32, q, &ce))
            run_comm_fail(r, &ce);
    }
}

/* SHARD_GRAD_OP: a count over each rank's shard summed over the ranks (exact: integers in f64). */
static int64_t sgo_sum_count(run_ctx *r, int64_t n) {
    double v = (double)n;
    qerr ce;
    if (r->world > 1 && comm_all_reduce_sum(r->comm, &v, 1, COMM_F64, &ce)) run_comm_fail(r, &ce);
    return (int64_t)v;
}

/* The step's loss sum and target tokens from every rank, added in rank order
 * (the order of the global micro-batches, as one process adds them), the
 * largest RSS, and the first stop request in rank order (run_stop): one
 * all_gather of four f64 per rank. */
static void step_agree(run_ctx *r, double *loss_sum, int64_t *n_tokens) {
    r->rss_max_mib = proc_rss_mib();
    if (r->world == 1) return;
    double mine[4] = {*loss_sum, (double)*n_tokens, r->rss_max_mib, (double)run_stop_signal()};
    double *all = malloc((size_t)r->world * 4 * sizeof *all);
    qerr ce;
    if (!all) {
        qerr_set(&ce, "rank %d: out of memory", r->rank);
        run_comm_fail(r, &ce);
    }
    if (comm_all_gather(r->comm, mine, all, 4, COMM_F64, &ce)) run_comm_fail(r, &ce);
    double ls = 0.0;
    int64_t nt = 0;
    r->stop_agreed = 0;
    for (int k = 0; k < r->world; k++) {
        ls += all[4 * k];
        nt += (int64_t)all[4 * k + 1];
        if (all[4 * k + 2] > r->rss_max_mib) r->rss_max_mib = all[4 * k + 2];
        if (!r->stop_agreed) r->stop_agreed = (int)all[4 * k + 3];
    }
    free(all);
    *loss_sum = ls;
    *n_tokens = nt;
}

/* Sophia's Gauss-Newton-Bartlett Hessian estimate (optim/sophia.h), run after
 * the update of step `step` on that step's rows: at every target position a
 * label is sampled from the model's own softmax (autograd/ce_sampled.h), the
 * loss is the mean cross-entropy with those labels over the step's target
 * tokens (micro-batches accumulate, as in the normal step), ĝ is clipped to
 * max_grad_norm as train_sophiag.py clips it, and h ← β2·h + (1−β2)·ĝ⊙ĝ.
 * Leaves ĝ in ls.grads. Returns ||ĝ|| before clipping; a non-finite ĝ leaves h
 * unchanged. (train_sophiag.py takes one micro-batch per GPU for this — its X
 * has already advanced to the next batch — while bs counts the whole step's
 * tokens; we use the step's own rows, all of them, so the estimate averages
 * over exactly the bs tokens the clipping threshold assumes.) */
static float sophia_hessian_pass(run_ctx *r, int step, int64_t step_targets) {
    const float scale = step_targets > 0 ? 1.0f / (float)step_targets : 0.0f;
    /* fp16: the sampled loss scaled by the step's loss scale and ĝ unscaled, as the loss gradient is */
    step_gradients(r, step, 1, r->fp16 ? scale * (float)r->scaler.scale : scale, NULL, NULL);
    /* SHARD_GRAD_OP / FULL_SHARD: ĝ was reduce-scattered like the loss gradient; h is this rank's shard */
    float *gh = r->sgo ? r->ls.grads + r->shard_lo : r->ls.grads;
    if (r->fp16) grad_scaler_unscale(&r->scaler, r->ctx.be, gh, r->sgo ? r->shard_hi - r->shard_lo : r->ls.n_params);
    const float gn = r->sgo ? sgo_clip(r, gh, r->shard_hi - r->shard_lo)
                            : clip_grad_norm_backend(r->ctx.be, r->ls.grads, r->ls.n_params, r->c->max_grad_norm);
    if (isfinite(gn)) sophia_update_hessian(&r->sop, &r->soc, gh);
    return gn;
}

/* fp16: true — dynamic loss scaling (optim/grad_scaler.h, torch.amp.GradScaler's rules): the CE seed's
 * gradient is scale · S, the gradients are unscaled before clipping, an inf/NaN gradient skips the optimizer
 * step and halves S. HF Trainer does not step the LR scheduler after a skipped step
 * (transformers/trainer.py: optimizer_step_was_skipped), so the schedule's index is the number of optimizer
 * steps taken (step − 1 − skipped). Several ranks: the decision reads the global gradient norm, which every
 * rank computes alike (NO_SHARD all-reduces the gradients; the sharded strategies are refused with fp16). */
void scaler_init(run_ctx *r) {
    r->fp16 = r->c->fp16;
    const char *init = getenv("QLORA_TEST_LOSS_SCALE"); /* test hook: torch's init_scale (e.g. 2^40: overflow) */
    grad_scaler_init(&r->scaler, init && *init ? strtod(init, NULL) : 65536.0);
}

/* Steps listed in QLORA_TEST_NAN_STEPS ("3,4,5") get a NaN gradient: the test
 * hook for the non-finite-step path. */
static int test_nan_step(int step) {
    const char *s = getenv("QLORA_TEST_NAN_STEPS");
    if (!s) return 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) return 0;
        if (v == step) return 1;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return 0;
    }
    return 0;
}

/* QLORA_TEST_RANK_FAULT="R:S:kill", "R:S:hang" or "R:S:pause": rank R kills
 * itself (SIGKILL), stops answering (sleeps for an hour) or pauses for 5 s at
 * the start of step S — the test hook for a dead or hung rank, and a window
 * for a signal to arrive mid-step (tests/test_ranks_e2e.c). */
static void test_rank_fault(const run_ctx *r, int step) {
    const char *s = getenv("QLORA_TEST_RANK_FAULT");
    int rank, at;
    char how[8];
    if (!s || sscanf(s, "%d:%d:%7s", &rank, &at, how) != 3 || rank != r->rank || at != step) return;
    if (!strcmp(how, "kill")) raise(SIGKILL);
    if (!strcmp(how, "hang")) sleep(3600);
    if (!strcmp(how, "pause")) sleep(5);
}

static void fmt_duration(double s, char *buf, size_t n) {
    if (s < 0 || !isfinite(s)) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
}

/* What one step did, for its metrics and log lines. */
typedef struct step_stats {
    double loss, lr;
    float gnorm;
    int finite;
    double win_rate, hess_sec, hess_gnorm; /* Sophia; NAN when not run */
    double dt;                             /* seconds of the step */
    double loss_scale;                     /* fp16: the loss scale this step used */
    int overflow;                          /* fp16: inf/NaN gradients with a finite loss: step skipped */
} step_stats;

/* The step's metrics.jsonl line and [train] line; the max_nan_steps stop. */
static int step_report(run_ctx *r, int step, const step_stats *s, qerr *e) {
    const train_config *c = r->c;
    double elapsed = clock_now_sec() - r->t_train;
    double tps = r->tok_trained / elapsed;
    if (r->mw) {
        /* train_seconds: optimizer-step time so far (no evaluation / checkpoint time), for wall-clock comparisons */
        metrics_field xf[6] = {{"train_seconds", r->train_sec}, {"sophia_win_rate", s->win_rate},
                               {"sophia_hessian_seconds", s->hess_sec}, {"sophia_hessian_grad_norm", s->hess_gnorm}};
        int nxf = r->use_sophia ? (isfinite(s->hess_sec) ? 4 : 2) : 1;
        if (r->fp16) { /* the scale this step used, and the optimizer steps GradScaler has skipped so far */
            xf[nxf++] = (metrics_field){"loss_scale", s->loss_scale};
            xf[nxf++] = (metrics_field){"fp16_skipped_steps", (double)r->scaler.skipped};
        }
        metrics_log_train_fields(r->mw, step, s->loss, s->lr, s->gnorm, tps,
                                 r->stream ? (double)step / (double)r->steps_per_epoch
                                           : (double)r->cursor / (double)r->train_set.n_rows,
                                 xf, nxf, e);
    }
    if (s->overflow) {
        fprintf(stderr, "[train] step %d/%d | loss %.4f | fp16 gradient overflow at loss_scale %g: update skipped, "
                        "loss_scale now %g (%lld skipped so far)\n",
                step, r->total_steps, s->loss, s->loss_scale, r->scaler.scale, (long long)r->scaler.skipped);
    } else if (!s->finite) {
        fprintf(stderr, "[train] step %d/%d | loss %.4f | grad_norm %.3f | non-finite: update skipped (%lld in a "
                        "row; max_nan_steps %d)\n",
                step, r->total_steps, s->loss, s->gnorm, (long long)r->nan_streak, c->max_nan_steps);
        if (r->nan_streak >= c->max_nan_steps)
            return qerr_set(e,
                            "step %d: the loss or the gradients were NaN/Inf in %lld optimizer steps in a row "
                            "(max_nan_steps %d); stopping. Training diverged: lower learning_rate (%g) or "
                            "max_grad_norm, then resume from the newest checkpoint (%s) or start over",
                            step, (long long)r->nan_streak, c->max_nan_steps, c->learning_rate, r->last_ckpt);
    } else if (c->loss_watchdog_threshold > 0 &&
               (r->watchdog_streak = s->loss > c->loss_watchdog_threshold ? r->watchdog_streak + 1 : 0) >=
                   c->loss_watchdog_patience) {
        /* axolotl's LossWatchDogCallback: the run stops; train_run saves a checkpoint first */
        r->watchdog_stop = step;
        fprintf(stderr, "[train] step %d/%d | loss %.4f above loss_watchdog_threshold %g for %d steps in a row "
                        "(loss_watchdog_patience): stopping\n",
                step, r->total_steps, s->loss, c->loss_watchdog_threshold, r->watchdog_streak);
    }
    if (!s->finite || s->overflow || r->watchdog_stop) {
        /* reported above */
    } else if (step % (c->logging_steps > 0 ? c->logging_steps : 1) == 0 || step == r->total_steps) {
        char eta[32];
        fmt_duration(elapsed / r->steps_run * (r->total_steps - step), eta, sizeof eta);
        char opt_note[96] = "";
        if (r->use_sophia)
            snprintf(opt_note, sizeof opt_note, isfinite(s->hess_sec) ? " | win %.3f | hessian %.2fs" : " | win %.3f",
                     s->win_rate, s->hess_sec);
        char world_note[48] = "";
        if (r->world > 1) snprintf(world_note, sizeof world_note, " | world %d", r->world);
        if (r->fp16) { /* appended to the optimizer note */
            size_t l = strlen(opt_note);
            snprintf(opt_note + l, sizeof opt_note - l, " | loss_scale %g", s->loss_scale);
        }
        fprintf(stderr, "[train] step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f%s | %.0f tok/s | %.2fs/step | "
                        "ETA %s%s | RSS %.0f MiB%s\n",
                step, r->total_steps, s->loss, s->lr, s->gnorm, opt_note, tps, s->dt, eta, world_note,
                r->rss_max_mib, r->world > 1 ? " (largest rank)" : "");
    }
    return 0;
}

int train_step(run_ctx *r, int step, qerr *e) {
    const train_config *c = r->c;
    double ts0 = clock_now_sec();
    test_rank_fault(r, step);
    const int64_t step_targets = step_rows(r, e);
    if (step_targets < 0) return -1;
    const float scale = step_targets > 0 ? 1.0f / (float)step_targets : 0.0f;
    double step_loss = 0.0;
    int64_t step_tok = 0;
    const double used_scale = r->scaler.scale; /* fp16: this step's loss scale (before its update) */
    step_gradients(r, step, 0, r->fp16 ? scale * (float)used_scale : scale, &step_loss, &step_tok);
    step_agree(r, &step_loss, &step_tok);
    /* the gradient the optimizer sees: all of it, or (SHARD_GRAD_OP) this rank's shard */
    float *g = r->sgo ? r->ls.grads + r->shard_lo : r->ls.grads;
    const int64_t n_g = r->sgo ? r->shard_hi - r->shard_lo : r->ls.n_params;
    if (test_nan_step(step) && n_g > 0) r->ctx.be->fill_f32(g, 1, NAN);
    if (r->fp16) grad_scaler_unscale(&r->scaler, r->ctx.be, g, n_g); /* GradScaler.unscale_, before clipping */
    step_stats s = {.loss = step_tok ? step_loss / (double)step_tok : NAN,
                    .lr = schedule_lr(r->sk, step - 1 - (int)r->scaler.skipped, r->total_steps, r->warmup,
                                      c->learning_rate),
                    .win_rate = NAN, .hess_sec = NAN, .hess_gnorm = NAN, .loss_scale = used_scale};
    s.gnorm = r->sgo ? sgo_clip(r, g, n_g) : clip_grad_norm_backend(r->ctx.be, r->ls.grads, r->ls.n_params,
                                                                   c->max_grad_norm);
    s.finite = isfinite(s.loss) && isfinite(s.gnorm);
    if (r->fp16) {
        /* an inf/NaN gradient with a finite loss is a loss-scale overflow: skipped and backed off, not a
         * divergence (max_nan_steps counts a non-finite loss only) */
        s.overflow = isfinite(s.loss) && !isfinite(s.gnorm);
        grad_scaler_update(&r->scaler, !isfinite(s.gnorm)); /* counts the skip in r->scaler.skipped */
    }
    if (s.finite && r->use_sophia) {
        const double bs = c->sophia_bs > 0 ? (double)c->sophia_bs : (double)step_targets;
        /* SHARD_GRAD_OP / FULL_SHARD: the update of this rank's shard (g), then every shard to every rank */
        int64_t unclipped = sophia_step(&r->sop, &r->soc, s.lr, bs, r->ls.params + r->shard_lo, g, NULL);
        if (r->sgo) {
            unclipped = sgo_sum_count(r, unclipped);
            sgo_gather_params(r);
        }
        s.win_rate = (double)unclipped / (double)r->ls.n_params;
        r->nan_streak = 0;
        if (sophia_hessian_due(&r->soc, step)) {
            double th = clock_now_sec();
            s.hess_gnorm = sophia_hessian_pass(r, step, step_targets);
            s.hess_sec = clock_now_sec() - th;
            r->sophia_hess_sec += s.hess_sec;
            if (!isfinite(s.hess_gnorm))
                fprintf(stderr, "[sophia] step %d: the Hessian-estimate gradient is NaN/Inf; h left unchanged\n", step);
        }
    } else if (s.finite && r->use_adamw8bit) {
        adamw8bit_step(&r->opt8, &r->ac, s.lr, r->ls.params + r->shard_lo, g); /* the shard's blocks only */
        if (r->sgo) sgo_gather_params(r);
        r->nan_streak = 0;
    } else if (s.finite) {
        adamw_step(&r->opt, &r->ac, s.lr, r->ls.params + r->shard_lo, g, NULL);
        if (r->sgo) sgo_gather_params(r);
        r->nan_streak = 0;
    } else if (s.overflow) {
        /* fp16: GradScaler skipped the optimizer step (counted by grad_scaler_update); the schedule waits, the
         * data moves on */
    } else {
        /* As torch's GradScaler does with inf/NaN gradients: no update,
         * no optimizer step; the schedule and the data move on. */
        r->nan_streak++;
        r->nan_skipped++;
    }
    r->last_lr = s.lr;
    r->steps_run++;
    s.dt = clock_now_sec() - ts0;
    r->train_sec += s.dt;
    r->tok_trained += (double)r->rows_per_step * c->sequence_len;
    return step_report(r, step, &s, e);
}
