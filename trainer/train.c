/* trainer/train.c — the training loop (see train.h).
 *
 * One optimizer step = gradient_accumulation_steps micro-batches of
 * micro_batch_size packed rows. The loss of a micro-batch is its summed
 * token cross-entropy divided by the number of target tokens of the whole
 * step, so accumulated gradients equal those of one big batch (the fix
 * transformers made with num_items_in_batch). Then: clip by global norm,
 * schedule the learning rate, AdamW over the flat adapter arena.
 */
#include "trainer/train.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "autograd/gemm.h"
#include "autograd/tensor.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "model/gguf.h"
#include "model/llama.h"
#include "model/peft.h"
#include "model/safetensors.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "optim/schedule.h"
#include "trainer/metrics.h"
#include "trainer/plot.h"

static double now_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double rss_mib(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0.0;
    long pages = 0, rss = 0;
    if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
    fclose(f);
    return (double)rss * (double)sysconf(_SC_PAGESIZE) / (1024.0 * 1024.0);
}

static double peak_rss_mib(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0;
}

static void fmt_duration(double s, char *buf, size_t n) {
    if (s < 0 || !isfinite(s)) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
}

static int mkdir_p(const char *path, qerr *e) {
    char tmp[4096];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof tmp) return qerr_set(e, "output_dir: invalid path \"%s\"", path);
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) && errno != EEXIST)
                return qerr_set(e, "output_dir: cannot create \"%s\": %s", tmp, strerror(errno));
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) && errno != EEXIST)
        return qerr_set(e, "output_dir: cannot create \"%s\": %s", tmp, strerror(errno));
    return 0;
}

/* Gather rows into a batch (contiguous copies). */
typedef struct batch_buf {
    int32_t *ids, *tgt, *pos, *sid;
} batch_buf;

static void batch_fill(const packed_set *ps, const int64_t *rows, int nb, batch_buf *bb, llama_batch *b) {
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

static int64_t count_targets(const packed_set *ps, int64_t row) {
    int64_t n = 0;
    const int32_t *t = ps->targets + (size_t)row * ps->seq_len;
    for (int i = 0; i < ps->seq_len; i++) n += t[i] != -100;
    return n;
}

/* Mean held-out cross-entropy (nats per target token), forward only. */
static double evaluate(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const packed_set *ev, int mbs,
                       int64_t max_tokens, batch_buf *bb, int64_t *n_tok_out) {
    double total = 0.0;
    int64_t ntok = 0;
    int rec = ctx->recording, tr = ctx->training;
    ctx->recording = 0;
    ctx->training = 0;
    int64_t *rows = malloc((size_t)mbs * sizeof(int64_t));
    if (!rows) return NAN;
    for (int64_t r0 = 0; r0 < ev->n_rows; r0 += mbs) {
        int nb = (int)(ev->n_rows - r0 < mbs ? ev->n_rows - r0 : mbs);
        for (int i = 0; i < nb; i++) rows[i] = r0 + i;
        llama_batch b;
        batch_fill(ev, rows, nb, bb, &b);
        ag_mark mk = ag_arena_mark(ctx);
        double ls_sum = 0.0;
        int64_t nt = 0;
        llama_forward_loss(ctx, m, ls, &b, 1.0f, 0, &ls_sum, &nt);
        ag_arena_reset(ctx, mk);
        total += ls_sum;
        ntok += nt;
        if (max_tokens > 0 && ntok >= max_tokens) break;
    }
    free(rows);
    ctx->recording = rec;
    ctx->training = tr;
    if (n_tok_out) *n_tok_out = ntok;
    return ntok ? total / (double)ntok : NAN;
}

static int write_adapter(const train_config *c, const llama_model *m, const lora_set *ls, qerr *e) {
    int n = 0;
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) n += lora_set_get(ls, l, k) ? 2 : 0;
    st_tensor *ts = calloc((size_t)n, sizeof *ts);
    char (*names)[128] = calloc((size_t)n, 128);
    if (!ts || !names) {
        free(ts);
        free(names);
        return qerr_set(e, "out of memory writing the adapter");
    }
    int i = 0;
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const lora_adapter *a = lora_set_get(ls, l, k);
            if (!a) continue;
            for (int ab = 0; ab < 2; ab++) {
                const tensor *t = ab ? a->B : a->A;
                peft_tensor_name(names[i], 128, l, llama_linear_names[k], ab ? 'B' : 'A');
                ts[i] = (st_tensor){.name = names[i], .dtype = "F32", .n_dims = 2,
                                    .shape = {t->shape[0], t->shape[1]}, .data = t->data,
                                    .nbytes = (size_t)t->numel * sizeof(float)};
                i++;
            }
        }
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", c->output_dir);
    int rc = safetensors_write(path, ts, n, NULL, e);
    free(ts);
    free(names);
    if (rc) return -1;
    const char *targets[LLAMA_N_LINEAR];
    int nt = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        if (ls->target[k]) targets[nt++] = llama_linear_names[k];
    peft_lora_config pc = {.r = ls->r, .lora_alpha = ls->alpha, .lora_dropout = ls->dropout,
                           .use_rslora = ls->use_rslora, .target_modules = targets, .n_target_modules = nt,
                           .base_model_name_or_path = c->base_model};
    (void)m;
    snprintf(path, sizeof path, "%s/adapter_config.json", c->output_dir);
    return peft_write_adapter_config(path, &pc, e);
}

int train_run(const train_config *c, train_result *res, qerr *e) {
    memset(res, 0, sizeof *res);
    double t_start = now_sec();
    const char *cfgname = c->config_path ? c->config_path : "config";
    if (c->num_threads > 0) omp_set_num_threads(c->num_threads);
    int n_threads = omp_get_max_threads();

    if (mkdir_p(c->output_dir, e)) return qerr_prefix(e, "%s", cfgname);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.resolved.yaml", c->output_dir);
    if (train_config_write_yaml(c, path, e)) return -1;

    /* ---- model file, tokenizer, data ---- */
    gguf_file *gf = NULL;
    if (gguf_open(c->base_model, &gf, e)) return qerr_prefix(e, "%s: base_model", cfgname);
    tokenizer *tok = NULL;
    if (tokenizer_load_gguf(gf, &tok, e)) {
        gguf_close(gf);
        return qerr_prefix(e, "%s: base_model %s", cfgname, c->base_model);
    }
    int rc = -1;
    llama_model model;
    memset(&model, 0, sizeof model);
    lora_set ls;
    memset(&ls, 0, sizeof ls);
    packed_set train_set, eval_set;
    memset(&train_set, 0, sizeof train_set);
    memset(&eval_set, 0, sizeof eval_set);
    ag_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    adamw_state opt;
    memset(&opt, 0, sizeof opt);
    metrics_writer *mw = NULL;
    batch_buf bb = {0};

    dataset_spec *specs = calloc((size_t)c->n_datasets + 1, sizeof *specs);
    dataset_spec *tspecs = calloc((size_t)c->n_test_datasets + 1, sizeof *tspecs);
    if (!specs || !tspecs) {
        qerr_set(e, "out of memory");
        goto done;
    }
    for (int i = 0; i < c->n_datasets; i++)
        specs[i] = (dataset_spec){.path = c->datasets[i].path, .type = c->datasets[i].type,
                                  .field = c->datasets[i].field, .field_messages = c->datasets[i].field_messages};
    for (int i = 0; i < c->n_test_datasets; i++)
        tspecs[i] = (dataset_spec){.path = c->test_datasets[i].path, .type = c->test_datasets[i].type,
                                   .field = c->test_datasets[i].field,
                                   .field_messages = c->test_datasets[i].field_messages};
    double t0 = now_sec();
    dataset_stats st;
    if (dataset_build(tok, specs, c->n_datasets, tspecs, c->n_test_datasets, c->val_set_size, c->sequence_len,
                      c->sample_packing, c->train_on_inputs, (uint64_t)c->seed, &train_set, &eval_set, &st, e)) {
        qerr_prefix(e, "%s: datasets", cfgname);
        goto done;
    }
    fprintf(stderr,
            "[data] train: %lld examples -> %lld rows of %d tokens (%lld target tokens); held-out: %lld examples "
            "-> %lld rows (%lld target tokens); %.1fs\n",
            (long long)st.train.n_examples, (long long)train_set.n_rows, train_set.seq_len,
            (long long)train_set.n_target_tokens, (long long)st.eval.n_examples, (long long)eval_set.n_rows,
            (long long)eval_set.n_target_tokens, now_sec() - t0);
    if (train_set.n_rows == 0) {
        qerr_set(e, "%s: datasets: no training rows after tokenization", cfgname);
        goto done;
    }

    t0 = now_sec();
    if (llama_load_gguf(gf, c->load_in_4bit, c->bnb_4bit_use_double_quant, c->sequence_len, &model, e)) {
        qerr_prefix(e, "%s: base_model %s", cfgname, c->base_model);
        goto done;
    }
    const llama_hparams *hp = &model.hp;
    fprintf(stderr, "[model] %s: llama, %d layers, d_model %d, heads %d/%d (head_dim %d), ffn %d, vocab %d, %s embeddings; %.1fs\n",
            c->base_model, hp->n_layer, hp->d_model, hp->n_head, hp->n_kv_head, hp->head_dim, hp->d_ff, hp->vocab,
            hp->tied_embeddings ? "tied" : "untied", now_sec() - t0);
    fprintf(stderr, "[model] frozen linears: %.1fM params held %s in %.1f MiB = %.4f bytes/param; embeddings bf16 %.1f MiB\n",
            model.n_quantized_params / 1e6,
            c->load_in_4bit ? (c->bnb_4bit_use_double_quant ? "as NF4 (blocksize 64, double-quant)" : "as NF4 (blocksize 64)") : "as bf16",
            model.quantized_bytes / 1048576.0, (double)model.quantized_bytes / (double)model.n_quantized_params,
            (double)hp->vocab * hp->d_model * 2 * (hp->tied_embeddings ? 1 : 2) / 1048576.0);
    res->quantized_bytes = model.quantized_bytes;
    res->n_quantized_params = model.n_quantized_params;

    unsigned mask = train_config_target_mask(c);
    int target[LLAMA_N_LINEAR];
    for (int k = 0; k < LLAMA_N_LINEAR; k++) target[k] = (mask >> k) & 1;
    if (lora_set_init(&ls, &model, c->lora_r, c->lora_alpha, c->lora_dropout, c->use_rslora, target,
                      (uint64_t)c->seed, e))
        goto done;
    fprintf(stderr, "[lora] r %d, alpha %g, scaling %g%s, dropout %g; %lld trainable params (%.3f%% of %.1fM)\n",
            ls.r, ls.alpha, ls.scaling, c->use_rslora ? " (rsLoRA)" : "", ls.dropout, (long long)ls.n_params,
            100.0 * ls.n_params / (double)(model.n_params + ls.n_params), model.n_params / 1e6);

    /* ---- schedule ---- */
    int mbs = c->micro_batch_size, gas = c->gradient_accumulation_steps;
    int64_t rows_per_step = (int64_t)mbs * gas;
    int steps_per_epoch = (int)((train_set.n_rows + rows_per_step - 1) / rows_per_step);
    int total_steps = c->max_steps > 0 ? c->max_steps : steps_per_epoch * c->num_epochs;
    int warmup = train_config_warmup_steps(c, total_steps);
    int eval_every = train_config_eval_interval(c, steps_per_epoch);
    lr_schedule_kind sk;
    if (lr_schedule_parse(c->lr_scheduler, &sk, e)) goto done;

    /* ---- memory prediction ---- */
    int64_t N = (int64_t)mbs * c->sequence_len, D = hp->d_model, F = hp->d_ff, T = c->sequence_len;
    double act_layer = 4.0 * N * (6.0 * D + 3.0 * F + 2.0 * (hp->n_head + 2 * hp->n_kv_head) * hp->head_dim) +
                       4.0 * mbs * hp->n_head * (double)T * T;
    double act = c->gradient_checkpointing ? 4.0 * N * D * hp->n_layer + 2.0 * act_layer : act_layer * hp->n_layer;
    act += 4.0 * 256 * hp->vocab * 2 + 4.0 * N * D * 3; /* CE chunk + its grads */
    double fixed = (double)model.quantized_bytes + (double)hp->vocab * D * 2 * (hp->tied_embeddings ? 1 : 2) +
                   16.0 * ls.n_params + 4.0 * F * D * 2;
    fprintf(stderr, "[memory] predicted peak: base %.0f MiB + adapters/optimizer %.1f MiB + activations %.0f MiB%s "
                    "≈ %.0f MiB (+ runtime)\n",
            ((double)model.quantized_bytes + (double)hp->vocab * D * 2) / 1048576.0, 16.0 * ls.n_params / 1048576.0,
            act / 1048576.0, c->gradient_checkpointing ? " (gradient checkpointing)" : "", (fixed + act) / 1048576.0);

    if (ag_ctx_init(&ctx, (size_t)256 << 20, e)) goto done;
    ctx.bf16 = c->bf16;
    if (adamw_state_init(&opt, ls.n_params, e)) goto done;
    adamw_config ac = {.lr = c->learning_rate, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2,
                       .eps = c->adam_epsilon, .weight_decay = c->weight_decay};
    int64_t bb_n = (int64_t)(mbs > 0 ? mbs : 1) * c->sequence_len;
    bb.ids = malloc((size_t)bb_n * 4);
    bb.tgt = malloc((size_t)bb_n * 4);
    bb.pos = malloc((size_t)bb_n * 4);
    bb.sid = malloc((size_t)bb_n * 4);
    int64_t *perm = malloc((size_t)train_set.n_rows * sizeof(int64_t));
    int64_t *rows = malloc((size_t)rows_per_step * sizeof(int64_t));
    if (!bb.ids || !bb.tgt || !bb.pos || !bb.sid || !perm || !rows) {
        free(perm);
        free(rows);
        qerr_set(e, "out of memory");
        goto done;
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->output_dir);
    if (metrics_open(path, 0, &mw, e)) {
        free(perm);
        free(rows);
        goto done;
    }

    fprintf(stderr, "[train] %d steps (%d per epoch) x %d micro-batches x %d rows x %d tokens; lr %g %s, warmup %d; "
                    "%d threads; %s GEMMs\n",
            total_steps, steps_per_epoch, gas, mbs, c->sequence_len, c->learning_rate, c->lr_scheduler, warmup,
            n_threads, c->bf16 ? "bf16" : "fp32");

    /* ---- held-out loss before training ---- */
    int64_t ev_tok = 0;
    if (eval_set.n_rows > 0) {
        t0 = now_sec();
        double el = evaluate(&ctx, &model, &ls, &eval_set, mbs, c->eval_max_tokens, &bb, &ev_tok);
        res->eval_loss_start = el;
        res->eval_ppl_start = exp(el);
        fprintf(stderr, "[eval] step 0: held-out loss %.4f, perplexity %.2f (%lld tokens, %.1fs)\n", el, exp(el),
                (long long)ev_tok, now_sec() - t0);
        metrics_log_eval(mw, 0, el, exp(el), ev_tok, e);
    } else {
        fprintf(stderr, "[eval] no held-out set (val_set_size 0 and no test_datasets): skipping evaluation\n");
    }

    /* ---- training ---- */
    double t_train = now_sec(), tok_trained = 0;
    int64_t cursor = 0;
    int epoch = -1;
    double last_eval = res->eval_loss_start;
    int last_eval_step = 0;
    for (int step = 1; step <= total_steps; step++) {
        double ts0 = now_sec();
        /* rows of this step, in epoch order */
        int nrows = (int)rows_per_step;
        for (int i = 0; i < nrows; i++) {
            int ep = (int)(cursor / train_set.n_rows);
            if (ep != epoch) {
                epoch = ep;
                dataset_epoch_order((uint64_t)c->seed, epoch, train_set.n_rows, perm);
            }
            rows[i] = perm[cursor % train_set.n_rows];
            cursor++;
        }
        int64_t step_targets = 0;
        for (int i = 0; i < nrows; i++) step_targets += count_targets(&train_set, rows[i]);
        float scale = step_targets > 0 ? 1.0f / (float)step_targets : 0.0f;
        memset(ls.grads, 0, (size_t)ls.n_params * sizeof(float));
        double step_loss = 0.0;
        int64_t step_tok = 0;
        ctx.training = 1;
        for (int mb = 0; mb < gas; mb++) {
            llama_batch b;
            batch_fill(&train_set, rows + (size_t)mb * mbs, mbs, &bb, &b);
            ctx.seed = rng_u64((uint64_t)c->seed, 0xd509u, (uint64_t)step * 4096u + (uint64_t)mb);
            ag_mark mk = ag_arena_mark(&ctx);
            double lsum = 0.0;
            int64_t nt = 0;
            tensor *L = llama_forward_loss(&ctx, &model, &ls, &b, scale, c->gradient_checkpointing, &lsum, &nt);
            if (L->requires_grad) ag_backward(&ctx, L);
            ag_arena_reset(&ctx, mk);
            step_loss += lsum;
            step_tok += nt;
        }
        double loss = step_tok ? step_loss / (double)step_tok : NAN;
        float gnorm = clip_grad_norm(ls.grads, ls.n_params, c->max_grad_norm);
        double lr = schedule_lr(sk, step - 1, total_steps, warmup, c->learning_rate);
        adamw_step(&opt, &ac, lr, ls.params, ls.grads, NULL);
        double dt = now_sec() - ts0;
        tok_trained += (double)rows_per_step * c->sequence_len;
        double elapsed = now_sec() - t_train;
        double tps = tok_trained / elapsed;
        if (!isfinite(loss)) {
            qerr_set(e, "step %d: training loss is %f (diverged); lower learning_rate", step, loss);
            goto done_perm;
        }
        metrics_log_train(mw, step, loss, lr, gnorm, tps, (double)cursor / (double)train_set.n_rows, e);
        if (step % (c->logging_steps > 0 ? c->logging_steps : 1) == 0 || step == total_steps) {
            char eta[32];
            fmt_duration(elapsed / step * (total_steps - step), eta, sizeof eta);
            fprintf(stderr, "[train] step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | %.0f tok/s | %.2fs/step | "
                            "ETA %s | RSS %.0f MiB\n",
                    step, total_steps, loss, lr, gnorm, tps, dt, eta, rss_mib());
        }
        if (eval_set.n_rows > 0 && eval_every > 0 && step % eval_every == 0 && step != total_steps) {
            t0 = now_sec();
            double el = evaluate(&ctx, &model, &ls, &eval_set, mbs, c->eval_max_tokens, &bb, &ev_tok);
            fprintf(stderr, "[eval] step %d: held-out loss %.4f, perplexity %.2f (%.1fs)\n", step, el, exp(el),
                    now_sec() - t0);
            metrics_log_eval(mw, step, el, exp(el), ev_tok, e);
            last_eval = el;
            last_eval_step = step;
        }
    }
    res->steps = total_steps;
    res->train_tokens_per_sec = tok_trained / (now_sec() - t_train);

    /* ---- held-out loss after training ---- */
    if (eval_set.n_rows > 0) {
        double el = last_eval;
        if (last_eval_step != total_steps) {
            t0 = now_sec();
            el = evaluate(&ctx, &model, &ls, &eval_set, mbs, c->eval_max_tokens, &bb, &ev_tok);
            fprintf(stderr, "[eval] step %d: held-out loss %.4f, perplexity %.2f (%.1fs)\n", total_steps, el, exp(el),
                    now_sec() - t0);
            metrics_log_eval(mw, total_steps, el, exp(el), ev_tok, e);
        }
        res->eval_loss_end = el;
        res->eval_ppl_end = exp(el);
    }
    if (metrics_close(mw, e)) {
        mw = NULL;
        goto done_perm;
    }
    mw = NULL;

    /* ---- outputs ---- */
    if (write_adapter(c, &model, &ls, e)) goto done_perm;
    {
        char mpath[4096];
        snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", c->output_dir);
        snprintf(path, sizeof path, "%s/loss_curve.png", c->output_dir);
        if (plot_metrics_png(mpath, path, e)) goto done_perm;
    }
    res->wall_seconds = now_sec() - t_start;
    res->peak_rss_mib = peak_rss_mib();
    fprintf(stderr, "[memory] peak RSS %.0f MiB; activation arena peak %.0f MiB\n", res->peak_rss_mib,
            ctx.arena.peak / 1048576.0);
    rc = 0;
done_perm:
    free(perm);
    free(rows);
done:
    if (mw) metrics_close(mw, NULL);
    free(bb.ids);
    free(bb.tgt);
    free(bb.pos);
    free(bb.sid);
    adamw_state_free(&opt);
    ag_ctx_free(&ctx);
    lora_set_free(&ls);
    llama_free(&model);
    packed_set_free(&train_set);
    packed_set_free(&eval_set);
    free(specs);
    free(tspecs);
    tokenizer_free(tok);
    gguf_close(gf);
    return rc;
}
