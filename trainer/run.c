/* trainer/run.c — the training run's set-up, start, finish and teardown (see run.h).
 *
 * Set-up goes phase by phase, each a function returning 0 or -1 with the
 * one-line message: output_dir and its lock; the inputs exist; the checkpoint
 * to resume from; the base model's file and tokenizer; the data; the model's
 * weights and adapters; the schedule and optimizer; the outputs. Nothing in
 * output_dir changes before the outputs phase, i.e. before every input has
 * loaded. run_free releases whatever the phases reached.
 */
#include "trainer/run.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/file.h"
#include "core/hash.h"
#include "trainer/plot.h"

/* ------------------------------------------------------------------------ */
/* stop signals                                                               */

/* SIGINT / SIGTERM: finish the step, save a checkpoint, stop. SA_RESETHAND
 * makes a second signal act as the default (immediate exit); the marker-last
 * protocol keeps the previous checkpoint loadable even then. */
static volatile sig_atomic_t g_stop_signal = 0;

static void on_stop_signal(int sig) { g_stop_signal = sig; }

int run_stop_signal(void) { return (int)g_stop_signal; }

static void stop_handlers_install(struct sigaction old[2]) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | SA_RESETHAND;
    g_stop_signal = 0;
    sigaction(SIGINT, &sa, &old[0]);
    sigaction(SIGTERM, &sa, &old[1]);
}

static void stop_handlers_restore(const struct sigaction old[2]) {
    sigaction(SIGINT, &old[0], NULL);
    sigaction(SIGTERM, &old[1], NULL);
}

/* ------------------------------------------------------------------------ */
/* set-up phases                                                              */

/* output_dir first: it must be writable before anything heavy is loaded, and
 * one trainer at a time may use it. */
static int setup_output_dir(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    char path[4096];
    if (file_mkdir_p(c->output_dir, e)) return qerr_prefix(e, "%s: output_dir", r->cfgname);
    snprintf(path, sizeof path, "%s/.qlora-train.lock", c->output_dir);
    r->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (r->lock_fd < 0)
        return qerr_set(e, "%s: output_dir: cannot write in \"%s\": %s", r->cfgname, c->output_dir, strerror(errno));
    if (flock(r->lock_fd, LOCK_EX | LOCK_NB))
        return qerr_set(e, "%s: output_dir: \"%s\" is in use by another qlora-train (%s is locked)", r->cfgname,
                        c->output_dir, path);
    int n_stale = 0;
    if (ckpt_clean_stale(c->output_dir, &n_stale, e)) return qerr_prefix(e, "%s: output_dir", r->cfgname);
    if (n_stale) fprintf(stderr, "[checkpoint] removed %d unfinished checkpoint save(s) of an interrupted run\n", n_stale);
    return 0;
}

/* The input files exist (cheap, before loading anything). */
static int setup_check_inputs(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    if (access(c->base_model, R_OK))
        return qerr_set(e, "%s: base_model: cannot read \"%s\": %s", r->cfgname, c->base_model, strerror(errno));
    for (int pass = 0; pass < 2; pass++) {
        const dataset_cfg *d = pass ? c->test_datasets : c->datasets;
        int nd = pass ? c->n_test_datasets : c->n_datasets;
        for (int i = 0; i < nd; i++)
            if (access(d[i].path, R_OK))
                return qerr_set(e, "%s: %s[%d].path: cannot read \"%s\": %s", r->cfgname,
                                pass ? "test_datasets" : "datasets", i, d[i].path, strerror(errno));
    }
    return 0;
}

/* The checkpoint to resume from: resume_from_checkpoint, else the newest
 * complete one in output_dir (when auto_resume_from_checkpoints). */
static int setup_resume_choice(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    if (c->resume_from_checkpoint) {
        if (ckpt_load(c->resume_from_checkpoint, &r->ck, e))
            return qerr_prefix(e, "%s: resume_from_checkpoint", r->cfgname);
        snprintf(r->ck_dir, sizeof r->ck_dir, "%s", c->resume_from_checkpoint);
        r->resuming = 1;
    } else {
        ckpt_entry *ents = NULL;
        int n_ents = 0;
        if (ckpt_list(c->output_dir, &ents, &n_ents, e)) return qerr_prefix(e, "%s: output_dir", r->cfgname);
        for (int i = 0; i < n_ents && !r->resuming; i++) {
            qerr why;
            if (ckpt_load(ents[i].path, &r->ck, &why)) {
                fprintf(stderr, "[checkpoint] skipping %s\n", why.msg);
                continue;
            }
            if (!c->auto_resume_from_checkpoints) {
                qerr_set(e,
                         "%s: output_dir \"%s\" already holds %s and auto_resume_from_checkpoints is false: delete "
                         "its checkpoint-* directories or choose another output_dir",
                         r->cfgname, c->output_dir, ents[i].path);
                free(ents);
                return -1;
            }
            snprintf(r->ck_dir, sizeof r->ck_dir, "%s", ents[i].path);
            r->resuming = 1;
        }
        free(ents);
    }
    if (r->resuming)
        fprintf(stderr, "[checkpoint] resuming from %s: step %lld, epoch %lld, row %lld of %lld\n", r->ck_dir,
                (long long)r->ck.step, (long long)(r->ck.rows_consumed / r->ck.n_rows),
                (long long)(r->ck.rows_consumed % r->ck.n_rows), (long long)r->ck.n_rows);
    return 0;
}

/* The base model's file: open it, fingerprint it and its tokenizer (checked
 * against a resumed checkpoint), check sequence_len, load the tokenizer. */
static int setup_base_model(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    const ckpt_state *ck = &r->ck;
    double t0 = clock_now_sec();
    if (base_model_open(c->base_model, &r->bm, e)) return qerr_prefix(e, "%s: base_model", r->cfgname);
    r->gf = base_model_tokenizer_gguf(r->bm);
    r->tok_fp = ckpt_fingerprint_tokenizer(r->gf);
    if (ckpt_fingerprint_model(c->base_model, &r->model_fp, e)) return qerr_prefix(e, "%s: base_model", r->cfgname);
    if (r->resuming && ck->tokenizer_fingerprint != r->tok_fp)
        return qerr_set(e,
                        "%s: base_model: %s was made with another tokenizer (checkpoint: %s, tokenizer fingerprint "
                        "%016llx; %s has %016llx); resume with the same base_model, or choose another output_dir",
                        r->cfgname, r->ck_dir, ck->base_model[0] ? ck->base_model : "?",
                        (unsigned long long)ck->tokenizer_fingerprint, c->base_model, (unsigned long long)r->tok_fp);
    if (r->resuming && ck->model_fingerprint != r->model_fp)
        return qerr_set(e,
                        "%s: base_model: %s was trained on a different base model (%s, fingerprint %016llx; %s has "
                        "%016llx); resume with the same base_model, or choose another output_dir",
                        r->cfgname, r->ck_dir, ck->base_model[0] ? ck->base_model : "?",
                        (unsigned long long)ck->model_fingerprint, c->base_model, (unsigned long long)r->model_fp);
    const llama_hparams *hp0 = base_model_hparams(r->bm);
    if (hp0->context_length > 0 && c->sequence_len > hp0->context_length)
        return qerr_set(e,
                        "%s: sequence_len: %d exceeds the model's context length %d (llama.context_length in %s); "
                        "expected at most %d",
                        r->cfgname, c->sequence_len, hp0->context_length, c->base_model, hp0->context_length);
    fprintf(stderr, "[model] fingerprint %016llx, tokenizer %016llx (%.1fs)\n", (unsigned long long)r->model_fp,
            (unsigned long long)r->tok_fp, clock_now_sec() - t0);
    if (tokenizer_load_gguf(r->gf, &r->tok, e)) return qerr_prefix(e, "%s: base_model %s", r->cfgname, c->base_model);
    return 0;
}

/* XXH64 of the packed training rows: a changed dataset (or tokenizer,
 * sequence_len, packing, seed) makes the saved data position meaningless. */
static uint64_t packed_fingerprint(const packed_set *ps) {
    xxh64_state st;
    xxh64_init(&st, 0);
    int64_t hdr[2] = {ps->n_rows, ps->seq_len};
    xxh64_update(&st, hdr, sizeof hdr);
    size_t n = (size_t)ps->n_rows * (size_t)ps->seq_len * sizeof(int32_t);
    xxh64_update(&st, ps->input_ids, n);
    xxh64_update(&st, ps->targets, n);
    xxh64_update(&st, ps->position_ids, n);
    xxh64_update(&st, ps->seq_ids, n);
    return xxh64_digest(&st);
}

/* Tokenize and pack datasets and test_datasets; fingerprint the training
 * rows (checked against a resumed checkpoint). */
static int setup_data(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    dataset_spec *specs = calloc((size_t)c->n_datasets + 1, sizeof *specs);
    dataset_spec *tspecs = calloc((size_t)c->n_test_datasets + 1, sizeof *tspecs);
    if (!specs || !tspecs) {
        free(specs);
        free(tspecs);
        return qerr_set(e, "out of memory");
    }
    dataset_skip_log skipped = {0}, tskipped = {0};
    for (int i = 0; i < c->n_datasets; i++)
        specs[i] = (dataset_spec){.path = c->datasets[i].path, .type = c->datasets[i].type,
                                  .field = c->datasets[i].field, .field_messages = c->datasets[i].field_messages,
                                  .skip_bad_lines = c->skip_bad_lines, .skipped = &skipped};
    for (int i = 0; i < c->n_test_datasets; i++)
        tspecs[i] = (dataset_spec){.path = c->test_datasets[i].path, .type = c->test_datasets[i].type,
                                   .field = c->test_datasets[i].field,
                                   .field_messages = c->test_datasets[i].field_messages,
                                   .skip_bad_lines = c->skip_bad_lines, .skipped = &tskipped};
    double t0 = clock_now_sec();
    dataset_stats st;
    int rc = dataset_build(r->tok, specs, c->n_datasets, tspecs, c->n_test_datasets, c->val_set_size,
                           c->sequence_len, c->sample_packing, c->train_on_inputs, (uint64_t)c->seed, &r->train_set,
                           &r->eval_set, &st, e);
    free(specs);
    free(tspecs);
    if (rc) {
        qerr_prefix(e, "%s: datasets", r->cfgname);
        static const char *const line_errors[] = {"invalid JSON", "expected a JSON object", "unexpected text after",
                                                  "missing or not", "must be a string", "is an empty list"};
        for (size_t i = 0; !c->skip_bad_lines && i < sizeof line_errors / sizeof *line_errors; i++)
            if (strstr(e->msg, line_errors[i]) && strlen(e->msg) + 64 < sizeof e->msg) {
                strcat(e->msg, " (or set skip_bad_lines: true to skip malformed lines)");
                break;
            }
        return -1;
    }
    if (skipped.n_lines)
        fprintf(stderr, "[data] skipped %lld malformed line(s) of datasets (skip_bad_lines); the first: %s\n",
                (long long)skipped.n_lines, skipped.first);
    if (tskipped.n_lines)
        fprintf(stderr, "[data] skipped %lld malformed line(s) of test_datasets (skip_bad_lines); the first: %s\n",
                (long long)tskipped.n_lines, tskipped.first);
    const packed_set *tr = &r->train_set, *ev = &r->eval_set;
    fprintf(stderr,
            "[data] train: %lld examples -> %lld rows of %d tokens (%lld target tokens); held-out: %lld examples "
            "-> %lld rows (%lld target tokens); %.1fs\n",
            (long long)st.train.n_examples, (long long)tr->n_rows, tr->seq_len, (long long)tr->n_target_tokens,
            (long long)st.eval.n_examples, (long long)ev->n_rows, (long long)ev->n_target_tokens,
            clock_now_sec() - t0);
    if (tr->n_rows == 0) return qerr_set(e, "%s: datasets: no training rows after tokenization", r->cfgname);
    r->data_fp = packed_fingerprint(tr);
    if (r->resuming && (r->ck.n_rows != tr->n_rows || r->ck.data_fingerprint != r->data_fp))
        return qerr_set(e,
                        "%s: datasets: the training data differs from the data %s was trained on (%lld rows, "
                        "fingerprint %016llx; now %lld rows, %016llx: datasets, sequence_len, sample_packing, "
                        "train_on_inputs or seed changed); resume with the same data, or choose another output_dir",
                        r->cfgname, r->ck_dir, (long long)r->ck.n_rows, (unsigned long long)r->ck.data_fingerprint,
                        (long long)tr->n_rows, (unsigned long long)r->data_fp);
    return 0;
}

/* The adapter's tensors in arena order, with their PEFT names: the one table
 * behind the adapter files and the checkpoints. *out malloc'd. */
static int adapter_table(const lora_set *ls, peft_tensor **out, int *n_out, qerr *e) {
    int n = 0;
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) n += lora_set_get(ls, l, k) ? 2 : 0;
    peft_tensor *t = calloc((size_t)(n ? n : 1), sizeof *t);
    if (!t) return qerr_set(e, "out of memory");
    int i = 0;
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const lora_adapter *a = lora_set_get(ls, l, k);
            if (!a) continue;
            for (int ab = 0; ab < 2; ab++) {
                const tensor *x = ab ? a->B : a->A;
                peft_tensor_name(t[i].name, sizeof t[i].name, l, llama_linears[k].parent, llama_linears[k].peft,
                                 ab ? 'B' : 'A');
                t[i].offset = (int64_t)((const float *)x->data - ls->params);
                t[i].rows = x->shape[0];
                t[i].cols = x->shape[1];
                i++;
            }
        }
    *out = t;
    *n_out = n;
    return 0;
}

/* A resumed checkpoint must hold the adapter layout this config gives. */
static int check_resume_adapter(const run_ctx *r, qerr *e) {
    const ckpt_state *ck = &r->ck;
    if (ck->n_tensors != r->n_tensors || ck->n_params != r->ls.n_params)
        return qerr_set(e,
                        "%s: %s holds a LoRA adapter of %d tensors / %lld parameters, but this config gives %d / "
                        "%lld (lora_r, lora_target_modules or lora_target_linear changed); resume with the config "
                        "it was made with, or choose another output_dir",
                        r->cfgname, r->ck_dir, ck->n_tensors, (long long)ck->n_params, r->n_tensors,
                        (long long)r->ls.n_params);
    for (int i = 0; i < r->n_tensors; i++) {
        const peft_tensor *a = &ck->tensors[i], *b = &r->tensors[i];
        if (strcmp(a->name, b->name) || a->offset != b->offset || a->rows != b->rows || a->cols != b->cols)
            return qerr_set(e,
                            "%s: %s holds tensor %s [%lld, %lld] where this config gives %s [%lld, %lld]; resume "
                            "with the config it was made with, or choose another output_dir",
                            r->cfgname, r->ck_dir, a->name, (long long)a->rows, (long long)a->cols, b->name,
                            (long long)b->rows, (long long)b->cols);
    }
    return 0;
}

/* The frozen weights (NF4 or bf16) and the LoRA adapters over them. */
static int setup_model(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    double t0 = clock_now_sec();
    if (base_model_load(r->bm, c->load_in_4bit, c->bnb_4bit_use_double_quant, c->sequence_len, &r->model, e))
        return qerr_prefix(e, "%s: base_model %s", r->cfgname, c->base_model);
    const llama_model *m = &r->model;
    const llama_hparams *hp = &m->hp;
    fprintf(stderr, "[model] %s: llama, %d layers, d_model %d, heads %d/%d (head_dim %d), ffn %d, vocab %d, %s embeddings; %.1fs\n",
            c->base_model, hp->n_layer, hp->d_model, hp->n_head, hp->n_kv_head, hp->head_dim, hp->d_ff, hp->vocab,
            hp->tied_embeddings ? "tied" : "untied", clock_now_sec() - t0);
    fprintf(stderr, "[model] frozen linears: %.1fM params held %s in %.1f MiB = %.4f bytes/param; embeddings bf16 %.1f MiB\n",
            m->n_quantized_params / 1e6,
            c->load_in_4bit ? (c->bnb_4bit_use_double_quant ? "as NF4 (blocksize 64, double-quant)" : "as NF4 (blocksize 64)") : "as bf16",
            m->quantized_bytes / 1048576.0, (double)m->quantized_bytes / (double)m->n_quantized_params,
            (double)hp->vocab * hp->d_model * 2 * (hp->tied_embeddings ? 1 : 2) / 1048576.0);
    r->res->quantized_bytes = m->quantized_bytes;
    r->res->n_quantized_params = m->n_quantized_params;

    unsigned mask = train_config_target_mask(c);
    int target[LLAMA_N_LINEAR];
    for (int k = 0; k < LLAMA_N_LINEAR; k++) target[k] = (mask >> k) & 1;
    lora_set *ls = &r->ls;
    if (lora_set_init(ls, m, c->lora_r, c->lora_alpha, c->lora_dropout, c->use_rslora, target, (uint64_t)c->seed, e))
        return -1;
    fprintf(stderr, "[lora] r %d, alpha %g, scaling %g%s, dropout %g; %lld trainable params (%.3f%% of %.1fM)\n",
            ls->r, ls->alpha, ls->scaling, c->use_rslora ? " (rsLoRA)" : "", ls->dropout, (long long)ls->n_params,
            100.0 * ls->n_params / (double)(m->n_params + ls->n_params), m->n_params / 1e6);
    if (adapter_table(ls, &r->tensors, &r->n_tensors, e)) return -1;
    if (r->resuming && check_resume_adapter(r, e)) return -1;
    return 0;
}

/* The schedule, the memory plan, the autograd context, the optimizer state
 * and the batch buffers. */
static int setup_optimizer(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    r->mbs = c->micro_batch_size;
    r->gas = c->gradient_accumulation_steps;
    r->rows_per_step = (int64_t)r->mbs * r->gas;
    r->steps_per_epoch = (int)((r->train_set.n_rows + r->rows_per_step - 1) / r->rows_per_step);
    r->total_steps = c->max_steps > 0 ? c->max_steps : r->steps_per_epoch * c->num_epochs;
    r->warmup = train_config_warmup_steps(c, r->total_steps);
    r->eval_every = train_config_eval_interval(c, r->steps_per_epoch);
    r->save_every = train_config_save_interval(c, r->steps_per_epoch);
    if (lr_schedule_parse(c->lr_scheduler, &r->sk, e)) return -1;

    /* memory prediction (trainer/memplan.c) */
    struct stat model_st;
    memplan_input mpi = {.hp = r->model.hp, .B = r->mbs, .T = c->sequence_len,
                         .checkpointing = c->gradient_checkpointing, .bf16 = c->bf16, .lora_r = c->lora_r,
                         .lora_dropout = c->lora_dropout, .lora_params = r->ls.n_params,
                         .frozen_bytes = r->model.quantized_bytes,
                         .extra_bytes = stat(c->base_model, &model_st) == 0 ? (int64_t)model_st.st_size : 0,
                         .n_threads = r->n_threads};
    memplan_predict(&mpi, &r->plan);
    memplan_print(stderr, &r->plan);

    if (ag_ctx_init(&r->ctx, memplan_arena_chunk(&r->plan), e)) return -1;
    r->ctx.bf16 = c->bf16;
    if (r->resuming && (strcmp(r->ck.optimizer, "sophia") == 0) != r->use_sophia)
        return qerr_set(e, "%s: optimizer: %s holds %s state but this config says %s; resume with the optimizer it "
                           "was made with, or choose another output_dir",
                        r->cfgname, r->ck_dir, r->ck.optimizer, c->optimizer);
    if (r->use_sophia ? sophia_state_init_backend(&r->sop, r->ctx.be, r->ls.n_params, e)
                      : adamw_state_init_backend(&r->opt, r->ctx.be, r->ls.n_params, e))
        return -1;
    r->soc = (sophia_config){.lr = c->learning_rate, .beta1 = c->sophia_beta1, .beta2 = c->sophia_beta2,
                             .rho = c->sophia_rho, .weight_decay = c->weight_decay, .k = c->sophia_k};
    if (r->use_sophia)
        fprintf(stderr, "[sophia] SophiaG: betas (%g, %g), rho %g, weight_decay %g, Hessian (GNB) every %d steps; bs = "
                        "%s\n", c->sophia_beta1, c->sophia_beta2, c->sophia_rho, c->weight_decay, c->sophia_k,
                c->sophia_bs > 0 ? "sophia_bs (fixed)" : "target tokens of each step");
    r->ac = (adamw_config){.lr = c->learning_rate, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2,
                           .eps = c->adam_epsilon, .weight_decay = c->weight_decay};
    int64_t bb_n = (int64_t)(r->mbs > 0 ? r->mbs : 1) * c->sequence_len;
    r->bb.ids = malloc((size_t)bb_n * 4);
    r->bb.tgt = malloc((size_t)bb_n * 4);
    r->bb.pos = malloc((size_t)bb_n * 4);
    r->bb.sid = malloc((size_t)bb_n * 4);
    r->perm = malloc((size_t)r->train_set.n_rows * sizeof(int64_t));
    r->rows = malloc((size_t)r->rows_per_step * sizeof(int64_t));
    if (!r->bb.ids || !r->bb.tgt || !r->bb.pos || !r->bb.sid || !r->perm || !r->rows)
        return qerr_set(e, "out of memory");
    return 0;
}

/* Every input is good: now output_dir may change. config.resolved.yaml, the
 * resumed state (run_resume), metrics.jsonl opened. */
static int setup_outputs(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    char path[4096];
    snprintf(path, sizeof path, "%s/config.resolved.yaml", c->output_dir);
    if (train_config_write_yaml(c, path, e)) return -1;
    size_t cy_len = 0;
    if (!(r->config_yaml = file_read_all(path, &cy_len, e))) return -1;
    if (r->resuming) {
        int rc = run_resume(r, &r->ck, e);
        ckpt_state_free(&r->ck);
        if (rc) return -1;
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->output_dir);
    if (metrics_open(path, r->resuming, &r->mw, e)) return -1;
    fprintf(stderr, "[train] %d steps (%d per epoch) x %d micro-batches x %d rows x %d tokens; lr %g %s, warmup %d; "
                    "%d threads; %s GEMMs; checkpoint every %d steps%s\n",
            r->total_steps, r->steps_per_epoch, r->gas, r->mbs, c->sequence_len, c->learning_rate, c->lr_scheduler,
            r->warmup, r->n_threads, c->bf16 ? "bf16" : "fp32", r->save_every,
            c->save_total_limit > 0 ? " (keeping the newest save_total_limit)" : "");
    return 0;
}

int run_setup(run_ctx *r, const train_config *c, train_result *res, qerr *e) {
    memset(r, 0, sizeof *r);
    memset(res, 0, sizeof *res);
    r->c = c;
    r->res = res;
    r->t_start = clock_now_sec();
    r->cfgname = c->config_path ? c->config_path : "config";
    r->lock_fd = -1;
    r->use_sophia = !strcmp(c->optimizer, "sophia");
    /* the state of a run that starts from step 0 (run_resume replaces it) */
    r->last_saved = -1;
    r->eval_loss_start = NAN;
    r->last_eval = NAN;
    r->last_eval_step = -1;
    r->epoch = -1;
    snprintf(r->last_ckpt, sizeof r->last_ckpt, "(none)");
    if (c->num_threads > 0) omp_set_num_threads(c->num_threads);
    r->n_threads = omp_get_max_threads();
    if (setup_output_dir(r, e) || setup_check_inputs(r, e) || setup_resume_choice(r, e) || setup_base_model(r, e) ||
        setup_data(r, e) || setup_model(r, e) || setup_optimizer(r, e) || setup_outputs(r, e))
        return -1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* start, finish, teardown                                                    */

void run_start(run_ctx *r, qerr *e) {
    train_result *res = r->res;
    if (r->resuming) {
        res->eval_loss_start = r->eval_loss_start;
        res->eval_ppl_start = exp(r->eval_loss_start);
    } else if (r->eval_set.n_rows > 0) {
        r->eval_loss_start = run_eval(r, 0, e);
        res->eval_loss_start = r->eval_loss_start;
        res->eval_ppl_start = exp(r->eval_loss_start);
    } else {
        res->eval_loss_start = NAN;
        fprintf(stderr, "[eval] no held-out set (val_set_size 0 and no test_datasets): skipping evaluation\n");
    }
    if (r->start_step > r->total_steps)
        fprintf(stderr, "[checkpoint] the checkpoint is at step %d, past the %d steps of this config: nothing to "
                        "train\n", r->start_step, r->total_steps);
    r->final_step = r->start_step > r->total_steps ? r->start_step : r->total_steps;
    r->train_sec_at_start = r->train_sec;
    stop_handlers_install(r->old_sa);
    r->handlers = 1;
    r->t_train = clock_now_sec();
}

int run_finish(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    train_result *res = r->res;
    if (r->use_sophia && r->steps_run > 0)
        fprintf(stderr, "[sophia] %lld Hessian updates in total; those of this run took %.1fs = %.1f%% of its %.1fs of "
                        "optimizer steps\n", (long long)r->sop.hessian_updates, r->sophia_hess_sec,
                r->train_sec > r->train_sec_at_start
                    ? 100.0 * r->sophia_hess_sec / (r->train_sec - r->train_sec_at_start) : 0.0,
                r->train_sec - r->train_sec_at_start);
    res->steps = r->steps_run;
    res->train_tokens_per_sec = r->steps_run ? r->tok_trained / (clock_now_sec() - r->t_train) : 0.0;
    if (!g_stop_signal && r->last_saved != r->final_step && r->start_step < r->total_steps &&
        run_checkpoint_save(r, r->final_step, e))
        return -1;
    if (g_stop_signal) {
        res->interrupted = (int)g_stop_signal;
        res->interrupted_step = (int)r->last_saved;
        snprintf(res->checkpoint, sizeof res->checkpoint, "%s", r->last_ckpt);
        fprintf(stderr, "[checkpoint] stopped by %s after step %lld; state saved in %s\n",
                g_stop_signal == SIGINT ? "SIGINT" : "SIGTERM", (long long)r->last_saved, r->last_ckpt);
        return 0;
    }

    /* held-out loss after training */
    if (r->eval_set.n_rows > 0) {
        double el = r->last_eval_step != r->final_step ? run_eval(r, r->final_step, e) : r->last_eval;
        res->eval_loss_end = el;
        res->eval_ppl_end = exp(el);
    }
    if (r->nan_skipped)
        fprintf(stderr, "[train] %lld step(s) had NaN/Inf loss or gradients and were skipped\n",
                (long long)r->nan_skipped);
    metrics_writer *mw = r->mw;
    r->mw = NULL;
    if (metrics_close(mw, e)) return -1;

    /* outputs */
    if (run_write_adapter(r, c->output_dir, e)) return -1;
    char mpath[4096];
    snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", c->output_dir);
    if (plot_run_loss_curves(mpath, c->output_dir, e)) return -1;
    res->wall_seconds = clock_now_sec() - r->t_start;
    res->peak_rss_mib = proc_peak_rss_mib();
    fprintf(stderr, "[memory] peak RSS %.0f MiB (predicted %.0f MiB, %+.1f%%); activation arena peak %.0f MiB\n",
            res->peak_rss_mib, r->plan.total / 1048576.0,
            100.0 * (r->plan.total / 1048576.0 - res->peak_rss_mib) / res->peak_rss_mib,
            r->ctx.arena.peak / 1048576.0);
    return 0;
}

void run_free(run_ctx *r) {
    if (r->handlers) stop_handlers_restore(r->old_sa);
    r->handlers = 0;
    if (r->mw) metrics_close(r->mw, NULL);
    r->mw = NULL;
    ckpt_state_free(&r->ck);
    free(r->tensors);
    free(r->config_yaml);
    free(r->perm);
    free(r->rows);
    free(r->bb.ids);
    free(r->bb.tgt);
    free(r->bb.pos);
    free(r->bb.sid);
    adamw_state_free(&r->opt);
    sophia_state_free(&r->sop);
    ag_ctx_free(&r->ctx);
    lora_set_free(&r->ls);
    llama_free(&r->model);
    packed_set_free(&r->train_set);
    packed_set_free(&r->eval_set);
    tokenizer_free(r->tok);
    base_model_close(r->bm);
    if (r->lock_fd >= 0) close(r->lock_fd);
    memset(r, 0, sizeof *r);
    r->lock_fd = -1;
}
