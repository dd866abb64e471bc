/* trainer/run_state.c — the run's checkpoint state: written from the run
 * context by run_checkpoint_save, read back into it by run_resume (see
 * run.h; the file layout is trainer/checkpoint.h's), and the PEFT adapter
 * both checkpoints and the final output carry (format/peft.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/file.h"
#include "model/llama_linear.h"
#include "trainer/run.h"

int run_write_adapter(const run_ctx *r, const char *dir, qerr *e) {
    const lora_set *ls = &r->ls;
    const char *targets[LLAMA_N_LINEAR];
    int nt = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        if (ls->target[k]) targets[nt++] = llama_hparams_linears(&r->model.hp)[k].peft;
    peft_lora_config pc = {.r = ls->r, .lora_alpha = ls->alpha, .lora_dropout = ls->dropout,
                           .use_rslora = ls->use_rslora, .target_modules = targets, .n_target_modules = nt,
                           .base_model_name_or_path = r->c->base_model,
                           .modules_to_save = (const char **)r->c->lora_modules_to_save,
                           .n_modules_to_save = r->c->n_lora_modules_to_save};
    const float *params = lora_set_params_host(ls, ls->params, e); /* a host copy on a device backend */
    if (!params) return -1;
    int rc = peft_write_adapter(dir, r->tensors, r->n_tensors, params, &pc, e);
    lora_set_host_release(ls, ls->params, params);
    return rc;
}

/* ckpt_save's callback: the adapter and the config go into the checkpoint's
 * directory before it is committed. */
static int save_extra(const char *dir, void *arg, qerr *e) {
    const run_ctx *r = arg;
    if (run_write_adapter(r, dir, e)) return -1;
    char p[4200];
    snprintf(p, sizeof p, "%s/config.resolved.yaml", dir);
    return file_write_atomic(p, r->config_yaml, strlen(r->config_yaml), e);
}

/* SHARD_GRAD_OP: a whole optimizer moment from every rank's shard (collective). malloc'd host array of
 * shard_len * world floats; the first n_params are the moment. */
static float *sgo_gather_moment(run_ctx *r, const float *own) {
    const ag_backend *be = r->ctx.be;
    const int64_t n_own = r->shard_hi - r->shard_lo;
    float *all = calloc((size_t)(r->shard_len * r->world), sizeof(float));
    qerr ce;
    if (!all) {
        qerr_set(&ce, "rank %d: out of memory gathering the optimizer state for a checkpoint", r->rank);
        run_comm_fail(r, &ce);
    }
    float *mine = all + (size_t)r->rank * r->shard_len;
    if (n_own > 0) be->copy_d2h(mine, own, (size_t)n_own * sizeof(float));
    if (comm_all_gather(r->comm, mine, all, (size_t)r->shard_len, COMM_F32, &ce)) run_comm_fail(r, &ce);
    return all;
}

/* SHARDED_STATE_DICT: every rank writes its interval of the parameters and of the optimizer state
 * (trainer/checkpoint.h ckpt_save_sharded); rank 0 also the run state. Collective. */
static int checkpoint_save_sharded(run_ctx *r, int step, char *lh, size_t lh_len, int failed, qerr *e) {
    const train_config *c = r->c;
    const ag_backend *be = r->ctx.be;
    ckpt_state cs = {
        .step = step, .total_steps = r->total_steps, .rows_consumed = r->cursor, .n_rows = r->train_set.n_rows,
        .rows_per_step = r->rows_per_step, .shuffle_seed = (uint64_t)c->seed, .data_fingerprint = r->data_fp,
        .seed = (uint64_t)c->seed, .base_lr = c->learning_rate, .last_lr = r->last_lr, .warmup_steps = r->warmup,
        .opt_step = r->opt.step, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2, .eps = c->adam_epsilon,
        .weight_decay = c->weight_decay, .nan_streak = r->nan_streak, .nan_skipped = r->nan_skipped,
        .eval_loss_start = r->eval_loss_start, .last_eval_loss = r->last_eval, .last_eval_step = r->last_eval_step,
        .train_seconds = r->train_sec, .loss_watchdog_streak = r->watchdog_streak, .model_fingerprint = r->model_fp, .tokenizer_fingerprint = r->tok_fp,
        .n_params = r->ls.n_params, .params = r->ls.params, .exp_avg = r->opt.m, .exp_avg_sq = r->opt.v,
        .opt_lo = r->shard_lo, .opt_hi = r->shard_hi,
        .n_tensors = r->n_tensors, .tensors = r->tensors, .config_yaml = r->config_yaml, .log_history = lh,
        .log_history_len = (int64_t)lh_len};
    snprintf(cs.lr_scheduler, sizeof cs.lr_scheduler, "%s", lr_schedule_name(r->sk));
    snprintf(cs.optimizer, sizeof cs.optimizer, "adamw");
    if (r->use_sophia) { /* NO_SHARD only (SHARD_GRAD_OP with Sophia is refused): the whole arrays */
        snprintf(cs.optimizer, sizeof cs.optimizer, "sophia");
        cs.opt_step = r->sop.step, cs.exp_avg = r->sop.m, cs.exp_avg_sq = NULL, cs.hessian = r->sop.h;
        cs.beta1 = c->sophia_beta1, cs.beta2 = c->sophia_beta2, cs.rho = c->sophia_rho;
        cs.hessian_interval = c->sophia_k, cs.hessian_updates = r->sop.hessian_updates;
        cs.opt_lo = 0, cs.opt_hi = r->ls.n_params;
    }
    snprintf(cs.base_model, sizeof cs.base_model, "%s", c->base_model);
    /* host copies where the backend's memory is not host memory */
    const size_t np = (size_t)r->ls.n_params * sizeof(float), no = (size_t)(cs.opt_hi - cs.opt_lo) * sizeof(float);
    float *staged[3] = {NULL, NULL, NULL};
    float **slot[3] = {(float **)&cs.params, (float **)&cs.exp_avg, r->use_sophia ? (float **)&cs.hessian : (float **)&cs.exp_avg_sq};
    const size_t bytes[3] = {np, no, no};
    int rc = 0;
    if (!be->host_data) {
        be->sync();
        for (int i = 0; i < 3 && !rc; i++) {
            if (!(staged[i] = malloc(bytes[i] ? bytes[i] : 1))) {
                rc = qerr_set(e, "rank %d: out of memory staging the optimizer state for the checkpoint", r->rank);
                break;
            }
            be->copy_d2h(staged[i], *slot[i], bytes[i]);
            *slot[i] = staged[i];
        }
    }
    if (!r->rank) fprintf(stderr, "[checkpoint] saving step %d (sharded: %d shard files)\n", step, r->world);
    /* every rank enters the collective save, also one whose staging failed (it reports it there) */
    if (rc || failed) /* an interval that cannot hold the shard: the save fails on every rank, naming this one */
        cs.opt_lo = cs.opt_hi = r->ls.n_params + 1;
    qerr se;
    int src = ckpt_save_sharded(r->comm, c->output_dir, &cs, r->rank ? NULL : save_extra, r, r->last_ckpt,
                                sizeof r->last_ckpt, &se);
    for (int i = 0; i < 3; i++) free(staged[i]);
    if (src == -2) run_comm_fail(r, &se);
    if (src && !rc && !failed) *e = se;
    return src || rc || failed ? -1 : 0;
}

int run_checkpoint_save(run_ctx *r, int step, qerr *e) {
    const train_config *c = r->c;
    double ts = clock_now_sec();
    if (train_config_sharded_state_dict(c)) {
        size_t lh_len = 0;
        char *lh = NULL;
        if (!r->rank) {
            char mp[4200];
            snprintf(mp, sizeof mp, "%s/metrics.jsonl", c->output_dir);
            lh = file_read_all(mp, &lh_len, e);
        }
        /* a rank 0 that cannot read metrics.jsonl still enters the collective save, which then fails */
        const int failed = !r->rank && !lh;
        int rc = checkpoint_save_sharded(r, step, lh, lh_len, failed, e);
        free(lh);
        if (rc) return qerr_prefix(e, "checkpoint at step %d", step);
        r->last_saved = step;
        if (r->rank) return 0;
        goto prune;
    }
    /* SHARD_GRAD_OP: every rank sends its shard of the moments; rank 0 writes the whole state */
    float *full_m = r->sgo ? sgo_gather_moment(r, r->opt.m) : NULL;
    float *full_v = r->sgo ? sgo_gather_moment(r, r->opt.v) : NULL;
    if (r->rank) { /* data parallel: every rank holds the same state; rank 0 writes it */
        free(full_m);
        free(full_v);
        r->last_saved = step;
        snprintf(r->last_ckpt, sizeof r->last_ckpt, "%s/checkpoint-%d", c->output_dir, step);
        return 0;
    }
    size_t lh_len = 0;
    char mp[4200];
    snprintf(mp, sizeof mp, "%s/metrics.jsonl", c->output_dir);
    char *lh = file_read_all(mp, &lh_len, e);
    if (!lh) {
        free(full_m);
        free(full_v);
        return -1;
    }
    ckpt_state cs = {
        .step = step, .total_steps = r->total_steps, .rows_consumed = r->cursor, .n_rows = r->train_set.n_rows,
        .rows_per_step = r->rows_per_step, .shuffle_seed = (uint64_t)c->seed, .data_fingerprint = r->data_fp,
        .seed = (uint64_t)c->seed, .base_lr = c->learning_rate, .last_lr = r->last_lr, .warmup_steps = r->warmup,
        .opt_step = r->opt.step, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2, .eps = c->adam_epsilon,
        .weight_decay = c->weight_decay, .nan_streak = r->nan_streak, .nan_skipped = r->nan_skipped,
        .eval_loss_start = r->eval_loss_start, .last_eval_loss = r->last_eval, .last_eval_step = r->last_eval_step,
        .train_seconds = r->train_sec, .loss_watchdog_streak = r->watchdog_streak, .model_fingerprint = r->model_fp, .tokenizer_fingerprint = r->tok_fp,
        .n_params = r->ls.n_params, .params = r->ls.params, .exp_avg = full_m ? full_m : r->opt.m,
        .exp_avg_sq = full_v ? full_v : r->opt.v,
        .n_tensors = r->n_tensors, .tensors = r->tensors, .config_yaml = r->config_yaml, .log_history = lh,
        .log_history_len = (int64_t)lh_len};
    snprintf(cs.lr_scheduler, sizeof cs.lr_scheduler, "%s", lr_schedule_name(r->sk));
    if (r->use_sophia) {
        snprintf(cs.optimizer, sizeof cs.optimizer, "sophia");
        cs.opt_step = r->sop.step, cs.exp_avg = r->sop.m, cs.exp_avg_sq = NULL, cs.hessian = r->sop.h;
        cs.beta1 = c->sophia_beta1, cs.beta2 = c->sophia_beta2, cs.rho = c->sophia_rho;
        cs.hessian_interval = c->sophia_k, cs.hessian_updates = r->sop.hessian_updates;
    } else if (r->use_adamw8bit) {
        snprintf(cs.optimizer, sizeof cs.optimizer, "adamw_8bit");
        cs.opt_step = r->opt8.step, cs.exp_avg = r->opt8.m32, cs.exp_avg_sq = r->opt8.v32;
        cs.state1 = r->opt8.state1, cs.state2 = r->opt8.state2, cs.absmax1 = r->opt8.absmax1;
        cs.absmax2 = r->opt8.absmax2, cs.n_blocks = r->opt8.n_blocks, cs.n32 = r->opt8.n32;
    }
    snprintf(cs.base_model, sizeof cs.base_model, "%s", c->base_model);
    /* the arrays are the backend's memory: host copies where that is not host memory */
    const ag_backend *be = r->ctx.be;
    const size_t nf = (size_t)r->ls.n_params * sizeof(float);
    const size_t mom = r->use_adamw8bit ? (size_t)cs.n32 * sizeof(float) : nf;
    void **slot[8] = {(void **)&cs.params, (void **)&cs.exp_avg, (void **)&cs.exp_avg_sq, (void **)&cs.hessian,
                      (void **)&cs.state1, (void **)&cs.state2, (void **)&cs.absmax1, (void **)&cs.absmax2};
    const size_t bytes[8] = {nf, mom, mom, nf, (size_t)r->ls.n_params, (size_t)r->ls.n_params,
                             (size_t)cs.n_blocks * sizeof(float), (size_t)cs.n_blocks * sizeof(float)};
    void *staged[8] = {NULL};
    int stage_failed = 0;
    if (!be->host_data) {
        be->sync();
        for (int i = 0; i < 8; i++) {
            if (!*slot[i]) continue;
            if (!(staged[i] = malloc(bytes[i] ? bytes[i] : 1))) {
                stage_failed = 1;
                break;
            }
            be->copy_d2h(staged[i], *slot[i], bytes[i]);
            *slot[i] = staged[i];
        }
    }
    int rc = -1;
    if (stage_failed) qerr_set(e, "out of memory staging the optimizer state for the checkpoint");
    else {
        fprintf(stderr, "[checkpoint] saving step %d\n", step);
        rc = ckpt_save(c->output_dir, &cs, save_extra, r, r->last_ckpt, sizeof r->last_ckpt, e);
    }
    for (int i = 0; i < 8; i++) free(staged[i]);
    free(lh);
    free(full_m);
    free(full_v);
    if (rc) return qerr_prefix(e, "checkpoint at step %d", step);
    r->last_saved = step;
prune:;
    int ndel = 0;
    qerr why;
    /* The new checkpoint is committed: an old one that cannot be deleted costs disk space, not the run. */
    int prune_failed = c->save_total_limit > 0 && ckpt_prune(c->output_dir, c->save_total_limit, &ndel, &why);
    fprintf(stderr, "[checkpoint] saved %s (%.1fs)%s\n", r->last_ckpt, clock_now_sec() - ts,
            ndel ? "; older checkpoints beyond save_total_limit deleted" : "");
    if (prune_failed)
        fprintf(stderr, "[checkpoint] warning: could not delete an older checkpoint beyond save_total_limit %d (%s); "
                        "training goes on, delete it by hand\n",
                c->save_total_limit, why.msg);
    return 0;
}

/* Names of the top-level keys whose YAML text differs between two resolved
 * configs (config.resolved.yaml form: one "key: value" line per key, nested
 * lines indented), comma-separated into out. */
static void config_diff_keys(const char *a, const char *b, char *out, size_t n) {
    out[0] = 0;
    const char *srcs[2] = {a, b};
    /* Walk keys of a, then keys of b missing in a. */
    for (int pass = 0; pass < 2; pass++) {
        const char *x = srcs[pass], *y = srcs[1 - pass];
        for (const char *p = x; p && *p;) {
            const char *eol = strchr(p, '\n');
            size_t ll = eol ? (size_t)(eol - p) : strlen(p);
            if (*p == '#' || *p == ' ' || *p == '-' || ll == 0 || !memchr(p, ':', ll)) {
                p = eol ? eol + 1 : NULL;
                continue;
            }
            size_t kl = (size_t)((const char *)memchr(p, ':', ll) - p);
            /* this key's block: its line and the indented lines after it */
            const char *end = eol ? eol + 1 : p + ll;
            while (*end == ' ' || *end == '-') {
                const char *e2 = strchr(end, '\n');
                end = e2 ? e2 + 1 : end + strlen(end);
            }
            /* the same key in y */
            const char *q = y, *qb = NULL, *qe = NULL;
            while (q && *q) {
                const char *qeol = strchr(q, '\n');
                if (!strncmp(q, p, kl) && q[kl] == ':') {
                    qb = q;
                    qe = qeol ? qeol + 1 : q + strlen(q);
                    while (*qe == ' ' || *qe == '-') {
                        const char *e2 = strchr(qe, '\n');
                        qe = e2 ? e2 + 1 : qe + strlen(qe);
                    }
                    break;
                }
                q = qeol ? qeol + 1 : NULL;
            }
            int differs = pass == 0 ? (!qb || (size_t)(qe - qb) != (size_t)(end - p) || memcmp(qb, p, (size_t)(end - p)))
                                    : !qb;
            /* keys that cannot change what is computed */
            if (kl == strlen("memory_check") && !strncmp(p, "memory_check", kl)) differs = 0;
            if (kl == strlen("ddp_timeout") && !strncmp(p, "ddp_timeout", kl)) differs = 0;
            if (differs && strlen(out) + kl + 3 < n) {
                if (out[0]) strcat(out, ", ");
                strncat(out, p, kl);
            }
            p = *end ? end : NULL;
        }
    }
}

int run_resume(run_ctx *r, const ckpt_state *ck, qerr *e) {
    const train_config *c = r->c;
    const size_t n = (size_t)r->ls.n_params * sizeof(float);
    const ag_backend *be = r->ctx.be; /* parameters and optimizer state are the backend's memory */
    be->copy_h2d(r->ls.params, ck->params, n);
    if (r->use_adamw8bit) {
        adamw8bit_state *o = &r->opt8;
        if (ck->n_blocks != o->n_blocks || ck->n32 != o->n32)
            return qerr_set(e, "%s: the 8-bit optimizer state has %lld blocks and %lld fp32 elements, this adapter "
                               "needs %lld and %lld", r->ck_dir, (long long)ck->n_blocks, (long long)ck->n32,
                            (long long)o->n_blocks, (long long)o->n32);
        be->copy_h2d(o->state1, ck->state1, (size_t)r->ls.n_params);
        be->copy_h2d(o->state2, ck->state2, (size_t)r->ls.n_params);
        be->copy_h2d(o->absmax1, ck->absmax1, (size_t)o->n_blocks * sizeof(float));
        be->copy_h2d(o->absmax2, ck->absmax2, (size_t)o->n_blocks * sizeof(float));
        be->copy_h2d(o->m32, ck->exp_avg, (size_t)o->n32 * sizeof(float));
        be->copy_h2d(o->v32, ck->exp_avg_sq, (size_t)o->n32 * sizeof(float));
        o->step = ck->opt_step;
    } else if (r->use_sophia) {
        be->copy_h2d(r->sop.m, ck->exp_avg, n);
        be->copy_h2d(r->sop.h, ck->hessian, n);
        r->sop.step = ck->opt_step;
        r->sop.hessian_updates = ck->hessian_updates;
    } else {
        /* this rank's shard (SHARD_GRAD_OP), else all of it, from the interval the checkpoint was read for */
        const size_t own = (size_t)r->opt.n * sizeof(float);
        if (r->shard_lo < ck->opt_lo || r->shard_lo + r->opt.n > ck->opt_hi)
            return qerr_set(e, "rank %d: %s was read for the optimizer interval [%lld, %lld), this rank holds "
                               "[%lld, %lld)", r->rank, r->ck_dir, (long long)ck->opt_lo, (long long)ck->opt_hi,
                            (long long)r->shard_lo, (long long)(r->shard_lo + r->opt.n));
        be->copy_h2d(r->opt.m, ck->exp_avg + (r->shard_lo - ck->opt_lo), own);
        be->copy_h2d(r->opt.v, ck->exp_avg_sq + (r->shard_lo - ck->opt_lo), own);
        r->opt.step = ck->opt_step;
    }
    r->start_step = (int)ck->step;
    r->cursor = ck->rows_consumed;
    r->last_lr = ck->last_lr;
    r->nan_streak = ck->nan_streak;
    r->nan_skipped = ck->nan_skipped;
    r->watchdog_streak = (int)ck->loss_watchdog_streak;
    r->eval_loss_start = ck->eval_loss_start;
    r->last_eval = ck->last_eval_loss;
    r->last_eval_step = (int)ck->last_eval_step;
    r->train_sec = ck->train_seconds; /* train_seconds continues across resumes */
    r->last_saved = ck->step;
    snprintf(r->last_ckpt, sizeof r->last_ckpt, "%s", r->ck_dir);
    if (r->rank) return 0; /* rank 0 speaks and writes */
    if (ck->rows_per_step != r->rows_per_step)
        fprintf(stderr, "[checkpoint] note: %s was trained with a global batch of %lld rows per step, this run takes "
                        "%lld (micro_batch_size x gradient_accumulation_steps x world_size); the data position is "
                        "global, so it continues where that run stopped\n",
                r->ck_dir, (long long)ck->rows_per_step, (long long)r->rows_per_step);

    char diff[512];
    config_diff_keys(ck->config_yaml, r->config_yaml, diff, sizeof diff);
    if (diff[0])
        fprintf(stderr, "[checkpoint] note: the config differs from the one %s was made with in: %s (the run "
                        "continues with the new values, so it will not match an uninterrupted run)\n",
                r->ck_dir, diff);
    char path[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->output_dir);
    return file_write_atomic(path, ck->log_history, (size_t)ck->log_history_len, e);
}
