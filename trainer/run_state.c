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

const char *run_base_format(const train_config *c) {
    if (c->load_in_8bit) return "int8";
    if (c->load_in_4bit) return c->bnb_4bit_use_double_quant ? "nf4 double_quant" : "nf4";
    return "bf16";
}

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

/* SHARD_GRAD_OP / FULL_SHARD: a whole array from every rank's part of it (collective): own holds count
 * elements of esz bytes (backend memory), the ranks' parts follow each other in rank order. One
 * all_gather of the counts, one of the parts padded to the longest. malloc'd host array of the total
 * (+1 element) in *total. */
static void *sgo_gather_var(run_ctx *r, const void *own, int64_t count, size_t esz, int64_t *total) {
    const ag_backend *be = r->ctx.be;
    qerr ce;
    int64_t *counts = calloc((size_t)r->world, sizeof *counts);
    if (!counts) {
        qerr_set(&ce, "rank %d: out of memory gathering the optimizer state for a checkpoint", r->rank);
        run_comm_fail(r, &ce);
    }
    if (comm_all_gather(r->comm, &count, counts, 1, COMM_I64, &ce)) run_comm_fail(r, &ce);
    int64_t max = 1, sum = 0;
    for (int k = 0; k < r->world; k++) {
        if (counts[k] > max) max = counts[k];
        sum += counts[k];
    }
    unsigned char *all = calloc((size_t)(max * r->world), esz), *out = malloc((size_t)(sum + 1) * esz);
    if (!all || !out) {
        qerr_set(&ce, "rank %d: out of memory gathering the optimizer state for a checkpoint", r->rank);
        run_comm_fail(r, &ce);
    }
    unsigned char *mine = all + (size_t)r->rank * (size_t)max * esz;
    if (count > 0) be->copy_d2h(mine, own, (size_t)count * esz);
    if (comm_all_gather(r->comm, mine, all, (size_t)max * esz, COMM_U8, &ce)) run_comm_fail(r, &ce);
    int64_t at = 0;
    for (int k = 0; k < r->world; k++) {
        memcpy(out + (size_t)at * esz, all + (size_t)k * (size_t)max * esz, (size_t)counts[k] * esz);
        at += counts[k];
    }
    free(all);
    free(counts);
    *total = sum;
    return out;
}

/* SHARD_GRAD_OP: a whole optimizer moment (fp32, n_params) from every rank's shard (collective). */
static float *sgo_gather_moment(run_ctx *r, const float *own) {
    int64_t total;
    return sgo_gather_var(r, own, r->shard_hi - r->shard_lo, sizeof(float), &total);
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
        .loss_scale = r->fp16 ? r->scaler.scale : 0.0, .scaler_growth_tracker = r->scaler.growth_tracker,
        .scaler_skipped = r->scaler.skipped,
        .eval_loss_start = r->eval_loss_start, .last_eval_loss = r->last_eval, .last_eval_step = r->last_eval_step,
        .train_seconds = r->train_sec, .loss_watchdog_streak = r->watchdog_streak, .model_fingerprint = r->model_fp, .tokenizer_fingerprint = r->tok_fp,
        .n_params = r->ls.n_params, .params = r->ls.params, .exp_avg = r->opt.m, .exp_avg_sq = r->opt.v,
        .opt_lo = r->shard_lo, .opt_hi = r->shard_hi,
        .n_tensors = r->n_tensors, .tensors = r->tensors, .config_yaml = r->config_yaml, .log_history = lh,
        .log_history_len = (int64_t)lh_len};
    snprintf(cs.lr_scheduler, sizeof cs.lr_scheduler, "%s", lr_schedule_name(r->sk));
    snprintf(cs.optimizer, sizeof cs.optimizer, "adamw");
    if (r->use_sophia) { /* NO_SHARD: the whole arrays; SHARD_GRAD_OP / FULL_SHARD: this rank's shard */
        snprintf(cs.optimizer, sizeof cs.optimizer, "sophia");
        cs.opt_step = r->sop.step, cs.exp_avg = r->sop.m, cs.exp_avg_sq = NULL, cs.hessian = r->sop.h;
        cs.beta1 = c->sophia_beta1, cs.beta2 = c->sophia_beta2, cs.rho = c->sophia_rho;
        cs.hessian_interval = c->sophia_k, cs.hessian_updates = r->sop.hessian_updates;
        if (!r->sgo) cs.opt_lo = 0, cs.opt_hi = r->ls.n_params;
    } else if (r->use_adamw8bit) { /* this rank's part (on the block grid), or all of it */
        const adamw8bit_state *o = &r->opt8;
        snprintf(cs.optimizer, sizeof cs.optimizer, "adamw_8bit");
        cs.opt_step = o->step, cs.exp_avg = o->m32, cs.exp_avg_sq = o->v32;
        cs.state1 = o->state1, cs.state2 = o->state2, cs.absmax1 = o->absmax1, cs.absmax2 = o->absmax2;
        cs.n_blocks = o->n_blocks_all, cs.n32 = o->n32_all;
        cs.opt_lo = o->lo, cs.opt_hi = o->lo + o->n;
        cs.blk_lo = o->block_lo, cs.blk_hi = o->block_lo + o->n_blocks;
        cs.n32_lo = o->n32_lo, cs.n32_hi = o->n32_lo + o->n32;
    }
    snprintf(cs.base_model, sizeof cs.base_model, "%s", c->base_model);
    snprintf(cs.base_format, sizeof cs.base_format, "%s", run_base_format(c));
    /* host copies where the backend's memory is not host memory */
    const size_t np = (size_t)r->ls.n_params * sizeof(float), no = (size_t)(cs.opt_hi - cs.opt_lo) * sizeof(float);
    enum { NS = 7 };
    void *staged[NS] = {NULL};
    void **slot[NS] = {(void **)&cs.params, (void **)&cs.exp_avg,
                       r->use_sophia ? (void **)&cs.hessian : (void **)&cs.exp_avg_sq, NULL, NULL, NULL, NULL};
    size_t bytes[NS] = {np, no, no, 0, 0, 0, 0};
    if (r->use_adamw8bit) {
        const adamw8bit_state *o = &r->opt8;
        slot[3] = (void **)&cs.state1, slot[4] = (void **)&cs.state2;
        slot[5] = (void **)&cs.absmax1, slot[6] = (void **)&cs.absmax2;
        bytes[1] = bytes[2] = (size_t)o->n32 * sizeof(float);
        bytes[3] = bytes[4] = (size_t)o->n;
        bytes[5] = bytes[6] = (size_t)o->n_blocks * sizeof(float);
    }
    int rc = 0;
    if (!be->host_data) {
        be->sync();
        for (int i = 0; i < NS && !rc; i++) {
            if (!slot[i]) continue;
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
    for (int i = 0; i < NS; i++) free(staged[i]);
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
    /* SHARD_GRAD_OP / FULL_SHARD: every rank sends its part of the optimizer state; rank 0 writes it whole
     * (full[]: AdamW m, v; Sophia m, h; adamw_8bit state1, state2, absmax1, absmax2, and the fp32 m, v) */
    void *full[6] = {NULL};
    if (r->sgo) {
        int64_t t;
        if (r->use_adamw8bit) {
            const adamw8bit_state *o = &r->opt8;
            full[0] = sgo_gather_var(r, o->state1, o->n, 1, &t);
            full[1] = sgo_gather_var(r, o->state2, o->n, 1, &t);
            full[2] = sgo_gather_var(r, o->absmax1, o->n_blocks, sizeof(float), &t);
            full[3] = sgo_gather_var(r, o->absmax2, o->n_blocks, sizeof(float), &t);
            full[4] = sgo_gather_var(r, o->m32, o->n32, sizeof(float), &t);
            full[5] = sgo_gather_var(r, o->v32, o->n32, sizeof(float), &t);
        } else {
            full[0] = sgo_gather_moment(r, r->use_sophia ? r->sop.m : r->opt.m);
            full[1] = sgo_gather_moment(r, r->use_sophia ? r->sop.h : r->opt.v);
        }
    }
    float *full_m = r->sgo && !r->use_sophia && !r->use_adamw8bit ? full[0] : NULL;
    float *full_v = r->sgo && !r->use_sophia && !r->use_adamw8bit ? full[1] : NULL;
    if (r->rank) { /* data parallel: every rank holds the same state; rank 0 writes it */
        for (int i = 0; i < 6; i++) free(full[i]);
        r->last_saved = step;
        snprintf(r->last_ckpt, sizeof r->last_ckpt, "%s/checkpoint-%d", c->output_dir, step);
        return 0;
    }
    size_t lh_len = 0;
    char mp[4200];
    snprintf(mp, sizeof mp, "%s/metrics.jsonl", c->output_dir);
    char *lh = file_read_all(mp, &lh_len, e);
    if (!lh) {
        for (int i = 0; i < 6; i++) free(full[i]);
        return -1;
    }
    ckpt_state cs = {
        .step = step, .total_steps = r->total_steps, .rows_consumed = r->cursor, .n_rows = r->train_set.n_rows,
        .rows_per_step = r->rows_per_step, .shuffle_seed = (uint64_t)c->seed, .data_fingerprint = r->data_fp,
        .seed = (uint64_t)c->seed, .base_lr = c->learning_rate, .last_lr = r->last_lr, .warmup_steps = r->warmup,
        .opt_step = r->opt.step, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2, .eps = c->adam_epsilon,
        .weight_decay = c->weight_decay, .nan_streak = r->nan_streak, .nan_skipped = r->nan_skipped,
        .loss_scale = r->fp16 ? r->scaler.scale : 0.0, .scaler_growth_tracker = r->scaler.growth_tracker,
        .scaler_skipped = r->scaler.skipped,
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
        if (r->sgo) cs.exp_avg = full[0], cs.hessian = full[1];
    } else if (r->use_adamw8bit) {
        snprintf(cs.optimizer, sizeof cs.optimizer, "adamw_8bit");
        cs.opt_step = r->opt8.step, cs.exp_avg = r->opt8.m32, cs.exp_avg_sq = r->opt8.v32;
        cs.state1 = r->opt8.state1, cs.state2 = r->opt8.state2, cs.absmax1 = r->opt8.absmax1;
        cs.absmax2 = r->opt8.absmax2, cs.n_blocks = r->opt8.n_blocks_all, cs.n32 = r->opt8.n32_all;
        if (r->sgo)
            cs.state1 = full[0], cs.state2 = full[1], cs.absmax1 = full[2], cs.absmax2 = full[3],
            cs.exp_avg = full[4], cs.exp_avg_sq = full[5];
    }
    snprintf(cs.base_model, sizeof cs.base_model, "%s", c->base_model);
    snprintf(cs.base_format, sizeof cs.base_format, "%s", run_base_format(c));
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
            int gathered = 0; /* already a host array */
            for (int k = 0; k < 6; k++) gathered |= full[k] && *slot[i] == full[k];
            if (!*slot[i] || gathered) continue;
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
    for (int i = 0; i < 6; i++) free(full[i]);
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
        if (ck->n_blocks != o->n_blocks_all || ck->n32 != o->n32_all)
            return qerr_set(e, "%s: the 8-bit optimizer state has %lld blocks and %lld fp32 elements, this adapter "
                               "needs %lld and %lld", r->ck_dir, (long long)ck->n_blocks, (long long)ck->n32,
                            (long long)o->n_blocks_all, (long long)o->n32_all);
        /* this rank's part (SHARD_GRAD_OP / FULL_SHARD: its shard on the block grid), else all of it, from
         * the intervals the checkpoint was read for */
        if (o->lo < ck->opt_lo || o->lo + o->n > ck->opt_hi || o->block_lo < ck->blk_lo ||
            o->block_lo + o->n_blocks > ck->blk_hi || o->n32_lo < ck->n32_lo || o->n32_lo + o->n32 > ck->n32_hi)
            return qerr_set(e, "rank %d: %s was read for the elements [%lld, %lld), blocks [%lld, %lld) and fp32 "
                               "moments [%lld, %lld); this rank holds [%lld, %lld), [%lld, %lld), [%lld, %lld)",
                            r->rank, r->ck_dir, (long long)ck->opt_lo, (long long)ck->opt_hi, (long long)ck->blk_lo,
                            (long long)ck->blk_hi, (long long)ck->n32_lo, (long long)ck->n32_hi, (long long)o->lo,
                            (long long)(o->lo + o->n), (long long)o->block_lo, (long long)(o->block_lo + o->n_blocks),
                            (long long)o->n32_lo, (long long)(o->n32_lo + o->n32));
        be->copy_h2d(o->state1, ck->state1 + (o->lo - ck->opt_lo), (size_t)o->n);
        be->copy_h2d(o->state2, ck->state2 + (o->lo - ck->opt_lo), (size_t)o->n);
        be->copy_h2d(o->absmax1, ck->absmax1 + (o->block_lo - ck->blk_lo), (size_t)o->n_blocks * sizeof(float));
        be->copy_h2d(o->absmax2, ck->absmax2 + (o->block_lo - ck->blk_lo), (size_t)o->n_blocks * sizeof(float));
        be->copy_h2d(o->m32, ck->exp_avg + (o->n32_lo - ck->n32_lo), (size_t)o->n32 * sizeof(float));
        be->copy_h2d(o->v32, ck->exp_avg_sq + (o->n32_lo - ck->n32_lo), (size_t)o->n32 * sizeof(float));
        o->step = ck->opt_step;
    } else if (r->use_sophia) {
        /* this rank's shard (SHARD_GRAD_OP / FULL_SHARD), else all of it */
        const int64_t lo = r->sgo ? r->shard_lo : 0, len = r->sop.n;
        if (lo < ck->opt_lo || lo + len > ck->opt_hi)
            return qerr_set(e, "rank %d: %s was read for the optimizer interval [%lld, %lld), this rank holds "
                               "[%lld, %lld)", r->rank, r->ck_dir, (long long)ck->opt_lo, (long long)ck->opt_hi,
                            (long long)lo, (long long)(lo + len));
        be->copy_h2d(r->sop.m, ck->exp_avg + (lo - ck->opt_lo), (size_t)len * sizeof(float));
        be->copy_h2d(r->sop.h, ck->hessian + (lo - ck->opt_lo), (size_t)len * sizeof(float));
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
    if (r->fp16 && ck->loss_scale > 0) { /* GradScaler's state; an fp16 checkpoint without it keeps init_scale */
        r->scaler.scale = ck->loss_scale;
        r->scaler.growth_tracker = ck->scaler_growth_tracker;
        r->scaler.skipped = ck->scaler_skipped;
    }
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
