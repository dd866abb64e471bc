/* trainer/train.c — the training loop (see train.h).
 *
 * One optimizer step = gradient_accumulation_steps micro-batches of
 * micro_batch_size packed rows. The loss of a micro-batch is its summed
 * token cross-entropy divided by the number of target tokens of the whole
 * step, so accumulated gradients equal those of one big batch (the fix
 * transformers made with num_items_in_batch). Then: clip by global norm,
 * schedule the learning rate, AdamW over the flat adapter arena — or SophiaG
 * (optim/sophia.h), which after every sophia_k-th step also runs its
 * Gauss-Newton-Bartlett Hessian estimate on that step's rows
 * (sophia_hessian_pass below).
 */
#include "trainer/train.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "autograd/gemm.h"
#include "autograd/tensor.h"
#include "core/clock.h"
#include "core/file.h"
#include "core/hash.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "data/tokenizer.h"
#include "model/base.h"
#include "format/gguf.h"
#include "model/llama.h"
#include "format/peft.h"
#include "format/safetensors.h"
#include "optim/adamw.h"
#include "optim/clip.h"
#include "optim/schedule.h"
#include "optim/sophia.h"
#include "trainer/checkpoint.h"
#include "trainer/memplan.h"
#include "trainer/metrics.h"
#include "trainer/plot.h"

static void fmt_duration(double s, char *buf, size_t n) {
    if (s < 0 || !isfinite(s)) s = 0;
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
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

static int write_adapter(const train_config *c, const char *dir, const lora_set *ls, qerr *e) {
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
                peft_tensor_name(names[i], 128, l, llama_linears[k].parent, llama_linears[k].peft,
                                 ab ? 'B' : 'A');
                ts[i] = (st_tensor){.name = names[i], .dtype = "F32", .n_dims = 2,
                                    .shape = {t->shape[0], t->shape[1]}, .data = t->data,
                                    .nbytes = (size_t)t->numel * sizeof(float)};
                i++;
            }
        }
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    int rc = safetensors_write(path, ts, n, NULL, e);
    free(ts);
    free(names);
    if (rc) return -1;
    const char *targets[LLAMA_N_LINEAR];
    int nt = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        if (ls->target[k]) targets[nt++] = llama_linears[k].peft;
    peft_lora_config pc = {.r = ls->r, .lora_alpha = ls->alpha, .lora_dropout = ls->dropout,
                           .use_rslora = ls->use_rslora, .target_modules = targets, .n_target_modules = nt,
                           .base_model_name_or_path = c->base_model};
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    return peft_write_adapter_config(path, &pc, e);
}

/* ------------------------------------------------------------------------ */
/* checkpoints, resume, faults                                                */

/* SIGINT / SIGTERM: finish the step, save a checkpoint, stop. SA_RESETHAND
 * makes a second signal act as the default (immediate exit); the marker-last
 * protocol keeps the previous checkpoint loadable even then. */
static volatile sig_atomic_t g_stop_signal = 0;

static void on_stop_signal(int sig) { g_stop_signal = sig; }

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

/* The adapter's tensors in arena order (PEFT names). *out malloc'd. */
static int lora_tensor_table(const lora_set *ls, ckpt_tensor **out, int *n_out, qerr *e) {
    int n = 0;
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) n += lora_set_get(ls, l, k) ? 2 : 0;
    ckpt_tensor *t = calloc((size_t)(n ? n : 1), sizeof *t);
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
            if (differs && strlen(out) + kl + 3 < n) {
                if (out[0]) strcat(out, ", ");
                strncat(out, p, kl);
            }
            p = *end ? end : NULL;
        }
    }
}

/* Everything a checkpoint save needs from the loop. */
typedef struct save_ctx {
    const train_config *c;
    const lora_set *ls;
    const char *config_yaml;
} save_ctx;

static int save_extra(const char *dir, void *arg, qerr *e) {
    const save_ctx *sc = arg;
    if (write_adapter(sc->c, dir, sc->ls, e)) return -1;
    char p[4200];
    snprintf(p, sizeof p, "%s/config.resolved.yaml", dir);
    return file_write_atomic(p, sc->config_yaml, strlen(sc->config_yaml), e);
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

/* Check that a checkpoint belongs to this model, data and adapter layout. */
static int check_resume_compat(const train_config *c, const char *cfgname, const char *dir, const ckpt_state *ck,
                               const ckpt_tensor *tt, int n_tt, int64_t n_params, qerr *e) {
    if (ck->n_tensors != n_tt || ck->n_params != n_params) {
        return qerr_set(e,
                        "%s: %s holds a LoRA adapter of %d tensors / %lld parameters, but this config gives %d / "
                        "%lld (lora_r, lora_target_modules or lora_target_linear changed); resume with the config "
                        "it was made with, or choose another output_dir",
                        cfgname, dir, ck->n_tensors, (long long)ck->n_params, n_tt, (long long)n_params);
    }
    for (int i = 0; i < n_tt; i++) {
        const ckpt_tensor *a = &ck->tensors[i], *b = &tt[i];
        if (strcmp(a->name, b->name) || a->offset != b->offset || a->rows != b->rows || a->cols != b->cols)
            return qerr_set(e,
                            "%s: %s holds tensor %s [%lld, %lld] where this config gives %s [%lld, %lld]; resume "
                            "with the config it was made with, or choose another output_dir",
                            cfgname, dir, a->name, (long long)a->rows, (long long)a->cols, b->name,
                            (long long)b->rows, (long long)b->cols);
    }
    (void)c;
    return 0;
}

/* Sophia's Gauss-Newton-Bartlett Hessian estimate (optim/sophia.h), run after
 * the update of step `step` on that step's rows: at every target position a
 * label is sampled from the model's own softmax (autograd/ce_sampled.h), the
 * loss is the mean cross-entropy with those labels over the step's target
 * tokens (micro-batches accumulate, as in the normal step), ĝ is clipped to
 * max_grad_norm as train_sophiag.py clips it, and h ← β2·h + (1−β2)·ĝ⊙ĝ.
 * Leaves ĝ in ls->grads. Returns ||ĝ|| before clipping; a non-finite ĝ leaves h
 * unchanged. (train_sophiag.py takes one micro-batch per GPU for this — its X
 * has already advanced to the next batch — while bs counts the whole step's
 * tokens; we use the step's own rows, all of them, so the estimate averages
 * over exactly the bs tokens the clipping threshold assumes.) */
static float sophia_hessian_pass(ag_ctx *ctx, const train_config *c, const llama_model *m, lora_set *ls,
                                 const packed_set *ps, const int64_t *rows, int64_t step_targets, int step,
                                 batch_buf *bb, sophia_state *s, const sophia_config *sc) {
    const int mbs = c->micro_batch_size;
    const float scale = step_targets > 0 ? 1.0f / (float)step_targets : 0.0f;
    memset(ls->grads, 0, (size_t)ls->n_params * sizeof(float));
    ctx->training = 1;
    for (int mb = 0; mb < c->gradient_accumulation_steps; mb++) {
        llama_batch b;
        batch_fill(ps, rows + (size_t)mb * mbs, mbs, bb, &b);
        const uint64_t ctr = (uint64_t)step * 4096u + (uint64_t)mb;
        ctx->seed = rng_u64((uint64_t)c->seed, 0x5e55u, ctr); /* dropout masks of this pass */
        ag_mark mk = ag_arena_mark(ctx);
        tensor *L = llama_forward_sampled_loss(ctx, m, ls, &b, scale, c->gradient_checkpointing,
                                               rng_u64((uint64_t)c->seed, 0x5a3bu, ctr), NULL, NULL, NULL);
        if (L->requires_grad) ag_backward(ctx, L);
        ag_arena_reset(ctx, mk);
    }
    const float gn = clip_grad_norm(ls->grads, ls->n_params, c->max_grad_norm);
    if (isfinite(gn)) sophia_update_hessian(s, sc, ls->grads);
    return gn;
}

int train_run(const train_config *c, train_result *res, qerr *e) {
    memset(res, 0, sizeof *res);
    double t_start = clock_now_sec();
    const char *cfgname = c->config_path ? c->config_path : "config";
    if (c->num_threads > 0) omp_set_num_threads(c->num_threads);
    int n_threads = omp_get_max_threads();
    char path[4096];

    /* ---- output_dir first: it must be writable before anything heavy is
     * loaded, and one trainer at a time may use it. Nothing in it is modified
     * until every input has been read successfully. ---- */
    if (file_mkdir_p(c->output_dir, e)) return qerr_prefix(e, "%s: output_dir", cfgname);
    snprintf(path, sizeof path, "%s/.qlora-train.lock", c->output_dir);
    int lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd < 0)
        return qerr_set(e, "%s: output_dir: cannot write in \"%s\": %s", cfgname, c->output_dir, strerror(errno));
    if (flock(lock_fd, LOCK_EX | LOCK_NB)) {
        close(lock_fd);
        return qerr_set(e, "%s: output_dir: \"%s\" is in use by another qlora-train (%s is locked)", cfgname,
                        c->output_dir, path);
    }
    int n_stale = 0;
    if (ckpt_clean_stale(c->output_dir, &n_stale, e)) {
        close(lock_fd);
        return qerr_prefix(e, "%s: output_dir", cfgname);
    }
    if (n_stale) fprintf(stderr, "[checkpoint] removed %d unfinished checkpoint save(s) of an interrupted run\n", n_stale);

    /* ---- inputs exist (cheap, before loading anything) ---- */
    if (access(c->base_model, R_OK)) {
        close(lock_fd);
        return qerr_set(e, "%s: base_model: cannot read \"%s\": %s", cfgname, c->base_model, strerror(errno));
    }
    for (int pass = 0; pass < 2; pass++) {
        const dataset_cfg *d = pass ? c->test_datasets : c->datasets;
        int nd = pass ? c->n_test_datasets : c->n_datasets;
        for (int i = 0; i < nd; i++)
            if (access(d[i].path, R_OK)) {
                qerr_set(e, "%s: %s[%d].path: cannot read \"%s\": %s", cfgname, pass ? "test_datasets" : "datasets", i,
                         d[i].path, strerror(errno));
                close(lock_fd);
                return -1;
            }
    }

    /* ---- the checkpoint to resume from ---- */
    ckpt_state ck;
    memset(&ck, 0, sizeof ck);
    int resuming = 0;
    char ck_dir[4096] = "";
    if (c->resume_from_checkpoint) {
        if (ckpt_load(c->resume_from_checkpoint, &ck, e)) {
            close(lock_fd);
            return qerr_prefix(e, "%s: resume_from_checkpoint", cfgname);
        }
        snprintf(ck_dir, sizeof ck_dir, "%s", c->resume_from_checkpoint);
        resuming = 1;
    } else {
        ckpt_entry *ents = NULL;
        int n_ents = 0;
        if (ckpt_list(c->output_dir, &ents, &n_ents, e)) {
            close(lock_fd);
            return qerr_prefix(e, "%s: output_dir", cfgname);
        }
        for (int i = 0; i < n_ents && !resuming; i++) {
            qerr why;
            if (ckpt_load(ents[i].path, &ck, &why)) {
                fprintf(stderr, "[checkpoint] skipping %s\n", why.msg);
                continue;
            }
            if (!c->auto_resume_from_checkpoints) {
                qerr_set(e,
                         "%s: output_dir \"%s\" already holds %s and auto_resume_from_checkpoints is false: delete "
                         "its checkpoint-* directories or choose another output_dir",
                         cfgname, c->output_dir, ents[i].path);
                ckpt_state_free(&ck);
                free(ents);
                close(lock_fd);
                return -1;
            }
            snprintf(ck_dir, sizeof ck_dir, "%s", ents[i].path);
            resuming = 1;
        }
        free(ents);
    }
    if (resuming)
        fprintf(stderr, "[checkpoint] resuming from %s: step %lld, epoch %lld, row %lld of %lld\n", ck_dir,
                (long long)ck.step, (long long)(ck.rows_consumed / ck.n_rows), (long long)(ck.rows_consumed % ck.n_rows),
                (long long)ck.n_rows);

    /* ---- model file, tokenizer, data ---- */
    int rc = -1;
    base_model *bm = NULL;      /* GGUF file or HF directory (model/base.h) */
    const gguf_file *gf = NULL; /* its tokenizer metadata */
    tokenizer *tok = NULL;
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
    sophia_state sop;
    memset(&sop, 0, sizeof sop);
    const int use_sophia = !strcmp(c->optimizer, "sophia");
    metrics_writer *mw = NULL;
    batch_buf bb = {0};
    dataset_spec *specs = NULL, *tspecs = NULL;
    int64_t *perm = NULL, *rows = NULL;
    ckpt_tensor *ttab = NULL;
    int n_ttab = 0;
    char *config_yaml = NULL;
    int handlers = 0;
    struct sigaction old_sa[2];

    double t0 = clock_now_sec();
    if (base_model_open(c->base_model, &bm, e)) {
        qerr_prefix(e, "%s: base_model", cfgname);
        goto done;
    }
    gf = base_model_tokenizer_gguf(bm);
    uint64_t model_fp = 0, tok_fp = ckpt_fingerprint_tokenizer(gf);
    if (ckpt_fingerprint_model(c->base_model, &model_fp, e)) {
        qerr_prefix(e, "%s: base_model", cfgname);
        goto done;
    }
    if (resuming && ck.tokenizer_fingerprint != tok_fp) {
        qerr_set(e,
                 "%s: base_model: %s was made with another tokenizer (checkpoint: %s, tokenizer fingerprint %016llx; "
                 "%s has %016llx); resume with the same base_model, or choose another output_dir",
                 cfgname, ck_dir, ck.base_model[0] ? ck.base_model : "?", (unsigned long long)ck.tokenizer_fingerprint,
                 c->base_model,
                 (unsigned long long)tok_fp);
        goto done;
    }
    if (resuming && ck.model_fingerprint != model_fp) {
        qerr_set(e,
                 "%s: base_model: %s was trained on a different base model (%s, fingerprint %016llx; %s has "
                 "%016llx); resume with the same base_model, or choose another output_dir",
                 cfgname, ck_dir, ck.base_model[0] ? ck.base_model : "?", (unsigned long long)ck.model_fingerprint,
                 c->base_model,
                 (unsigned long long)model_fp);
        goto done;
    }
    {
        llama_hparams hp0 = *base_model_hparams(bm);
        if (hp0.context_length > 0 && c->sequence_len > hp0.context_length) {
            qerr_set(e,
                     "%s: sequence_len: %d exceeds the model's context length %d (llama.context_length in %s); "
                     "expected at most %d",
                     cfgname, c->sequence_len, hp0.context_length, c->base_model, hp0.context_length);
            goto done;
        }
    }
    fprintf(stderr, "[model] fingerprint %016llx, tokenizer %016llx (%.1fs)\n", (unsigned long long)model_fp,
            (unsigned long long)tok_fp, clock_now_sec() - t0);
    if (tokenizer_load_gguf(gf, &tok, e)) {
        qerr_prefix(e, "%s: base_model %s", cfgname, c->base_model);
        goto done;
    }

    specs = calloc((size_t)c->n_datasets + 1, sizeof *specs);
    tspecs = calloc((size_t)c->n_test_datasets + 1, sizeof *tspecs);
    if (!specs || !tspecs) {
        qerr_set(e, "out of memory");
        goto done;
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
    t0 = clock_now_sec();
    dataset_stats st;
    if (dataset_build(tok, specs, c->n_datasets, tspecs, c->n_test_datasets, c->val_set_size, c->sequence_len,
                      c->sample_packing, c->train_on_inputs, (uint64_t)c->seed, &train_set, &eval_set, &st, e)) {
        qerr_prefix(e, "%s: datasets", cfgname);
        static const char *const line_errors[] = {"invalid JSON", "expected a JSON object", "unexpected text after",
                                                  "missing or not", "must be a string", "is an empty list"};
        for (size_t i = 0; !c->skip_bad_lines && i < sizeof line_errors / sizeof *line_errors; i++)
            if (strstr(e->msg, line_errors[i]) && strlen(e->msg) + 64 < sizeof e->msg) {
                strcat(e->msg, " (or set skip_bad_lines: true to skip malformed lines)");
                break;
            }
        goto done;
    }
    if (skipped.n_lines)
        fprintf(stderr, "[data] skipped %lld malformed line(s) of datasets (skip_bad_lines); the first: %s\n",
                (long long)skipped.n_lines, skipped.first);
    if (tskipped.n_lines)
        fprintf(stderr, "[data] skipped %lld malformed line(s) of test_datasets (skip_bad_lines); the first: %s\n",
                (long long)tskipped.n_lines, tskipped.first);
    fprintf(stderr,
            "[data] train: %lld examples -> %lld rows of %d tokens (%lld target tokens); held-out: %lld examples "
            "-> %lld rows (%lld target tokens); %.1fs\n",
            (long long)st.train.n_examples, (long long)train_set.n_rows, train_set.seq_len,
            (long long)train_set.n_target_tokens, (long long)st.eval.n_examples, (long long)eval_set.n_rows,
            (long long)eval_set.n_target_tokens, clock_now_sec() - t0);
    if (train_set.n_rows == 0) {
        qerr_set(e, "%s: datasets: no training rows after tokenization", cfgname);
        goto done;
    }
    uint64_t data_fp = packed_fingerprint(&train_set);
    if (resuming && (ck.n_rows != train_set.n_rows || ck.data_fingerprint != data_fp)) {
        qerr_set(e,
                 "%s: datasets: the training data differs from the data %s was trained on (%lld rows, fingerprint "
                 "%016llx; now %lld rows, %016llx: datasets, sequence_len, sample_packing, train_on_inputs or seed "
                 "changed); resume with the same data, or choose another output_dir",
                 cfgname, ck_dir, (long long)ck.n_rows, (unsigned long long)ck.data_fingerprint,
                 (long long)train_set.n_rows, (unsigned long long)data_fp);
        goto done;
    }

    t0 = clock_now_sec();
    if (base_model_load(bm, c->load_in_4bit, c->bnb_4bit_use_double_quant, c->sequence_len, &model, e)) {
        qerr_prefix(e, "%s: base_model %s", cfgname, c->base_model);
        goto done;
    }
    const llama_hparams *hp = &model.hp;
    fprintf(stderr, "[model] %s: llama, %d layers, d_model %d, heads %d/%d (head_dim %d), ffn %d, vocab %d, %s embeddings; %.1fs\n",
            c->base_model, hp->n_layer, hp->d_model, hp->n_head, hp->n_kv_head, hp->head_dim, hp->d_ff, hp->vocab,
            hp->tied_embeddings ? "tied" : "untied", clock_now_sec() - t0);
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
    if (lora_tensor_table(&ls, &ttab, &n_ttab, e)) goto done;
    if (resuming) {
        if (check_resume_compat(c, cfgname, ck_dir, &ck, ttab, n_ttab, ls.n_params, e)) goto done;
        memcpy(ls.params, ck.params, (size_t)ls.n_params * sizeof(float));
    }

    /* ---- schedule ---- */
    int mbs = c->micro_batch_size, gas = c->gradient_accumulation_steps;
    int64_t rows_per_step = (int64_t)mbs * gas;
    int steps_per_epoch = (int)((train_set.n_rows + rows_per_step - 1) / rows_per_step);
    int total_steps = c->max_steps > 0 ? c->max_steps : steps_per_epoch * c->num_epochs;
    int warmup = train_config_warmup_steps(c, total_steps);
    int eval_every = train_config_eval_interval(c, steps_per_epoch);
    int save_every = train_config_save_interval(c, steps_per_epoch);
    lr_schedule_kind sk;
    if (lr_schedule_parse(c->lr_scheduler, &sk, e)) goto done;

    /* ---- memory prediction (trainer/memplan.c) ---- */
    struct stat model_st;
    memplan_input mpi = {.hp = *hp, .B = mbs, .T = c->sequence_len, .checkpointing = c->gradient_checkpointing,
                         .bf16 = c->bf16, .lora_r = c->lora_r, .lora_dropout = c->lora_dropout,
                         .lora_params = ls.n_params, .frozen_bytes = model.quantized_bytes,
                         .extra_bytes = stat(c->base_model, &model_st) == 0 ? (int64_t)model_st.st_size : 0,
                         .n_threads = n_threads};
    memplan plan;
    memplan_predict(&mpi, &plan);
    memplan_print(stderr, &plan);

    if (ag_ctx_init(&ctx, memplan_arena_chunk(&plan), e)) goto done;
    ctx.bf16 = c->bf16;
    if (resuming && (strcmp(ck.optimizer, "sophia") == 0) != use_sophia) {
        qerr_set(e, "%s: optimizer: %s holds %s state but this config says %s; resume with the optimizer it was "
                    "made with, or choose another output_dir", cfgname, ck_dir, ck.optimizer, c->optimizer);
        goto done;
    }
    if (use_sophia) {
        if (sophia_state_init(&sop, ls.n_params, e)) goto done;
        if (resuming) {
            memcpy(sop.m, ck.exp_avg, (size_t)ls.n_params * sizeof(float));
            memcpy(sop.h, ck.hessian, (size_t)ls.n_params * sizeof(float));
            sop.step = ck.opt_step;
            sop.hessian_updates = ck.hessian_updates;
        }
    } else {
        if (adamw_state_init(&opt, ls.n_params, e)) goto done;
        if (resuming) {
            memcpy(opt.m, ck.exp_avg, (size_t)ls.n_params * sizeof(float));
            memcpy(opt.v, ck.exp_avg_sq, (size_t)ls.n_params * sizeof(float));
            opt.step = ck.opt_step;
        }
    }
    sophia_config soc = {.lr = c->learning_rate, .beta1 = c->sophia_beta1, .beta2 = c->sophia_beta2,
                         .rho = c->sophia_rho, .weight_decay = c->weight_decay, .k = c->sophia_k};
    double sophia_hess_sec = 0.0, train_sec = 0.0;
    if (resuming) train_sec = ck.train_seconds; /* train_seconds continues across resumes */
    const double train_sec_at_start = train_sec;
    if (use_sophia)
        fprintf(stderr, "[sophia] SophiaG: betas (%g, %g), rho %g, weight_decay %g, Hessian (GNB) every %d steps; bs = "
                        "%s\n", c->sophia_beta1, c->sophia_beta2, c->sophia_rho, c->weight_decay, c->sophia_k,
                c->sophia_bs > 0 ? "sophia_bs (fixed)" : "target tokens of each step");
    adamw_config ac = {.lr = c->learning_rate, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2,
                       .eps = c->adam_epsilon, .weight_decay = c->weight_decay};
    int64_t bb_n = (int64_t)(mbs > 0 ? mbs : 1) * c->sequence_len;
    bb.ids = malloc((size_t)bb_n * 4);
    bb.tgt = malloc((size_t)bb_n * 4);
    bb.pos = malloc((size_t)bb_n * 4);
    bb.sid = malloc((size_t)bb_n * 4);
    perm = malloc((size_t)train_set.n_rows * sizeof(int64_t));
    rows = malloc((size_t)rows_per_step * sizeof(int64_t));
    if (!bb.ids || !bb.tgt || !bb.pos || !bb.sid || !perm || !rows) {
        qerr_set(e, "out of memory");
        goto done;
    }

    /* ---- every input is good: now output_dir may change ---- */
    snprintf(path, sizeof path, "%s/config.resolved.yaml", c->output_dir);
    if (train_config_write_yaml(c, path, e)) goto done;
    size_t cy_len = 0;
    if (!(config_yaml = file_read_all(path, &cy_len, e))) goto done;
    if (resuming) {
        char diff[512];
        config_diff_keys(ck.config_yaml, config_yaml, diff, sizeof diff);
        if (diff[0])
            fprintf(stderr, "[checkpoint] note: the config differs from the one %s was made with in: %s (the run "
                            "continues with the new values, so it will not match an uninterrupted run)\n",
                    ck_dir, diff);
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->output_dir);
    if (resuming && file_write_atomic(path, ck.log_history, (size_t)ck.log_history_len, e)) goto done;
    if (metrics_open(path, resuming, &mw, e)) goto done;

    fprintf(stderr, "[train] %d steps (%d per epoch) x %d micro-batches x %d rows x %d tokens; lr %g %s, warmup %d; "
                    "%d threads; %s GEMMs; checkpoint every %d steps%s\n",
            total_steps, steps_per_epoch, gas, mbs, c->sequence_len, c->learning_rate, c->lr_scheduler, warmup,
            n_threads, c->bf16 ? "bf16" : "fp32", save_every,
            c->save_total_limit > 0 ? " (keeping the newest save_total_limit)" : "");

    /* ---- held-out loss before training ---- */
    int64_t ev_tok = 0;
    double last_eval = NAN;
    int last_eval_step = -1;
    if (resuming) {
        res->eval_loss_start = ck.eval_loss_start;
        res->eval_ppl_start = exp(ck.eval_loss_start);
        last_eval = ck.last_eval_loss;
        last_eval_step = (int)ck.last_eval_step;
    } else if (eval_set.n_rows > 0) {
        t0 = clock_now_sec();
        double el = evaluate(&ctx, &model, &ls, &eval_set, mbs, c->eval_max_tokens, &bb, &ev_tok);
        res->eval_loss_start = el;
        res->eval_ppl_start = exp(el);
        fprintf(stderr, "[eval] step 0: held-out loss %.4f, perplexity %.2f (%lld tokens, %.1fs)\n", el, exp(el),
                (long long)ev_tok, clock_now_sec() - t0);
        metrics_log_eval(mw, 0, el, exp(el), ev_tok, e);
        last_eval = el;
        last_eval_step = 0;
    } else {
        res->eval_loss_start = NAN;
        fprintf(stderr, "[eval] no held-out set (val_set_size 0 and no test_datasets): skipping evaluation\n");
    }

    /* ---- training ---- */
    int start_step = resuming ? (int)ck.step : 0;
    int64_t cursor = resuming ? ck.rows_consumed : 0;
    int64_t nan_streak = resuming ? ck.nan_streak : 0, nan_skipped = resuming ? ck.nan_skipped : 0;
    int64_t last_saved = resuming ? ck.step : -1;
    double last_lr = resuming ? ck.last_lr : 0.0;
    char last_ckpt[4096];
    snprintf(last_ckpt, sizeof last_ckpt, "%s", resuming ? ck_dir : "(none)");
    ckpt_state_free(&ck);
    if (start_step > total_steps)
        fprintf(stderr, "[checkpoint] the checkpoint is at step %d, past the %d steps of this config: nothing to "
                        "train\n", start_step, total_steps);
    int final_step = start_step > total_steps ? start_step : total_steps;
    save_ctx sc = {.c = c, .ls = &ls, .config_yaml = config_yaml};
    /* A checkpoint of the current state (step `step`). */
#define SAVE_CHECKPOINT(step_)                                                                                    \
    do {                                                                                                          \
        double ts_ = clock_now_sec();                                                                                   \
        size_t lh_len_ = 0;                                                                                       \
        char mp_[4200];                                                                                           \
        snprintf(mp_, sizeof mp_, "%s/metrics.jsonl", c->output_dir);                                             \
        char *lh_ = file_read_all(mp_, &lh_len_, e);                                                              \
        if (!lh_) goto done;                                                                                      \
        ckpt_state cs_ = {                                                                                        \
            .step = (step_), .total_steps = total_steps, .rows_consumed = cursor, .n_rows = train_set.n_rows,     \
            .rows_per_step = rows_per_step, .shuffle_seed = (uint64_t)c->seed, .data_fingerprint = data_fp,       \
            .seed = (uint64_t)c->seed, .base_lr = c->learning_rate, .last_lr = last_lr,                           \
            .warmup_steps = warmup, .opt_step = opt.step, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2,         \
            .eps = c->adam_epsilon, .weight_decay = c->weight_decay, .nan_streak = nan_streak,                    \
            .nan_skipped = nan_skipped, .eval_loss_start = res->eval_loss_start, .last_eval_loss = last_eval,     \
            .last_eval_step = last_eval_step, .train_seconds = train_sec, .model_fingerprint = model_fp,          \
            .tokenizer_fingerprint = tok_fp,                                                                      \
            .n_params = ls.n_params, .params = ls.params, .exp_avg = opt.m, .exp_avg_sq = opt.v,                  \
            .n_tensors = n_ttab, .tensors = ttab, .config_yaml = config_yaml, .log_history = lh_,                 \
            .log_history_len = (int64_t)lh_len_};                                                                          \
        snprintf(cs_.lr_scheduler, sizeof cs_.lr_scheduler, "%s", lr_schedule_name(sk));                          \
        if (use_sophia) {                                                                                         \
            snprintf(cs_.optimizer, sizeof cs_.optimizer, "sophia");                                              \
            cs_.opt_step = sop.step, cs_.exp_avg = sop.m, cs_.exp_avg_sq = NULL, cs_.hessian = sop.h;             \
            cs_.beta1 = c->sophia_beta1, cs_.beta2 = c->sophia_beta2, cs_.rho = c->sophia_rho;                    \
            cs_.hessian_interval = c->sophia_k, cs_.hessian_updates = sop.hessian_updates;                        \
        }                                                                                                         \
        snprintf(cs_.base_model, sizeof cs_.base_model, "%s", c->base_model);                                     \
        fprintf(stderr, "[checkpoint] saving step %d\n", (int)(step_));                                          \
        int src_ = ckpt_save(c->output_dir, &cs_, save_extra, &sc, last_ckpt, sizeof last_ckpt, e);               \
        free(lh_);                                                                                                \
        if (src_) {                                                                                               \
            qerr_prefix(e, "checkpoint at step %d", (int)(step_));                                                \
            goto done;                                                                                            \
        }                                                                                                         \
        last_saved = (step_);                                                                                     \
        int ndel_ = 0;                                                                                            \
        if (c->save_total_limit > 0 && ckpt_prune(c->output_dir, c->save_total_limit, &ndel_, e)) goto done;     \
        fprintf(stderr, "[checkpoint] saved %s (%.1fs)%s\n", last_ckpt, clock_now_sec() - ts_,                          \
                ndel_ ? "; older checkpoints beyond save_total_limit deleted" : "");                              \
    } while (0)

    stop_handlers_install(old_sa);
    handlers = 1;
    double t_train = clock_now_sec(), tok_trained = 0;
    int epoch = -1, steps_run = 0;
    for (int step = start_step + 1; step <= total_steps; step++) {
        double ts0 = clock_now_sec();
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
        if (test_nan_step(step)) ls.grads[0] = NAN;
        double loss = step_tok ? step_loss / (double)step_tok : NAN;
        float gnorm = clip_grad_norm(ls.grads, ls.n_params, c->max_grad_norm);
        double lr = schedule_lr(sk, step - 1, total_steps, warmup, c->learning_rate);
        int finite = isfinite(loss) && isfinite(gnorm);
        double win_rate = NAN, hess_sec = NAN, hess_gnorm = NAN;
        if (finite && use_sophia) {
            const double bs = c->sophia_bs > 0 ? (double)c->sophia_bs : (double)step_targets;
            win_rate = (double)sophia_step(&sop, &soc, lr, bs, ls.params, ls.grads, NULL) / (double)ls.n_params;
            nan_streak = 0;
            if (sophia_hessian_due(&soc, step)) {
                double th = clock_now_sec();
                hess_gnorm = sophia_hessian_pass(&ctx, c, &model, &ls, &train_set, rows, step_targets, step, &bb,
                                                 &sop, &soc);
                hess_sec = clock_now_sec() - th;
                sophia_hess_sec += hess_sec;
                if (!isfinite(hess_gnorm))
                    fprintf(stderr, "[sophia] step %d: the Hessian-estimate gradient is NaN/Inf; h left unchanged\n",
                            step);
            }
        } else if (finite) {
            adamw_step(&opt, &ac, lr, ls.params, ls.grads, NULL);
            nan_streak = 0;
        } else {
            /* As torch's GradScaler does with inf/NaN gradients: no update,
             * no optimizer step; the schedule and the data move on. */
            nan_streak++;
            nan_skipped++;
        }
        last_lr = lr;
        steps_run++;
        double dt = clock_now_sec() - ts0;
        train_sec += dt;
        tok_trained += (double)rows_per_step * c->sequence_len;
        double elapsed = clock_now_sec() - t_train;
        double tps = tok_trained / elapsed;
        {
            /* train_seconds: optimizer-step time so far (no evaluation / checkpoint time), for wall-clock comparisons */
            metrics_field xf[4] = {{"train_seconds", train_sec}, {"sophia_win_rate", win_rate},
                                   {"sophia_hessian_seconds", hess_sec}, {"sophia_hessian_grad_norm", hess_gnorm}};
            int nxf = use_sophia ? (isfinite(hess_sec) ? 4 : 2) : 1;
            metrics_log_train_fields(mw, step, loss, lr, gnorm, tps, (double)cursor / (double)train_set.n_rows, xf,
                                     nxf, e);
        }
        if (!finite) {
            fprintf(stderr, "[train] step %d/%d | loss %.4f | grad_norm %.3f | non-finite: update skipped (%lld in a "
                            "row; max_nan_steps %d)\n",
                    step, total_steps, loss, gnorm, (long long)nan_streak, c->max_nan_steps);
            if (nan_streak >= c->max_nan_steps) {
                qerr_set(e,
                         "step %d: the loss or the gradients were NaN/Inf in %lld optimizer steps in a row "
                         "(max_nan_steps %d); stopping. Training diverged: lower learning_rate (%g) or "
                         "max_grad_norm, then resume from the newest checkpoint (%s) or start over",
                         step, (long long)nan_streak, c->max_nan_steps, c->learning_rate, last_ckpt);
                goto done;
            }
        } else if (step % (c->logging_steps > 0 ? c->logging_steps : 1) == 0 || step == total_steps) {
            char eta[32];
            fmt_duration(elapsed / steps_run * (total_steps - step), eta, sizeof eta);
            char opt_note[96] = "";
            if (use_sophia)
                snprintf(opt_note, sizeof opt_note, isfinite(hess_sec) ? " | win %.3f | hessian %.2fs" : " | win %.3f",
                         win_rate, hess_sec);
            fprintf(stderr, "[train] step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f%s | %.0f tok/s | %.2fs/step | "
                            "ETA %s | RSS %.0f MiB\n",
                    step, total_steps, loss, lr, gnorm, opt_note, tps, dt, eta, proc_rss_mib());
        }
        /* a stop signal saves first: the periodic evaluation would delay it (and a second signal kills) */
        if (eval_set.n_rows > 0 && eval_every > 0 && step % eval_every == 0 && step != total_steps && !g_stop_signal) {
            t0 = clock_now_sec();
            double el = evaluate(&ctx, &model, &ls, &eval_set, mbs, c->eval_max_tokens, &bb, &ev_tok);
            fprintf(stderr, "[eval] step %d: held-out loss %.4f, perplexity %.2f (%.1fs)\n", step, el, exp(el),
                    clock_now_sec() - t0);
            metrics_log_eval(mw, step, el, exp(el), ev_tok, e);
            last_eval = el;
            last_eval_step = step;
        }
        if (step == total_steps || step % save_every == 0 || g_stop_signal) SAVE_CHECKPOINT(step);
        if (g_stop_signal) break;
    }
    if (use_sophia && steps_run > 0)
        fprintf(stderr, "[sophia] %lld Hessian updates in total; those of this run took %.1fs = %.1f%% of its %.1fs of "
                        "optimizer steps\n", (long long)sop.hessian_updates, sophia_hess_sec,
                train_sec > train_sec_at_start ? 100.0 * sophia_hess_sec / (train_sec - train_sec_at_start) : 0.0,
                train_sec - train_sec_at_start);
    res->steps = steps_run;
    res->train_tokens_per_sec = steps_run ? tok_trained / (clock_now_sec() - t_train) : 0.0;
    if (!g_stop_signal && last_saved != final_step && start_step < total_steps) SAVE_CHECKPOINT(final_step);
    if (g_stop_signal) {
        res->interrupted = (int)g_stop_signal;
        res->interrupted_step = (int)last_saved;
        snprintf(res->checkpoint, sizeof res->checkpoint, "%s", last_ckpt);
        fprintf(stderr, "[checkpoint] stopped by %s after step %lld; state saved in %s\n",
                g_stop_signal == SIGINT ? "SIGINT" : "SIGTERM", (long long)last_saved, last_ckpt);
        rc = 0;
        goto done;
    }
#undef SAVE_CHECKPOINT

    /* ---- held-out loss after training ---- */
    if (eval_set.n_rows > 0) {
        double el = last_eval;
        if (last_eval_step != final_step) {
            t0 = clock_now_sec();
            el = evaluate(&ctx, &model, &ls, &eval_set, mbs, c->eval_max_tokens, &bb, &ev_tok);
            fprintf(stderr, "[eval] step %d: held-out loss %.4f, perplexity %.2f (%.1fs)\n", final_step, el, exp(el),
                    clock_now_sec() - t0);
            metrics_log_eval(mw, final_step, el, exp(el), ev_tok, e);
        }
        res->eval_loss_end = el;
        res->eval_ppl_end = exp(el);
    }
    if (nan_skipped)
        fprintf(stderr, "[train] %lld step(s) had NaN/Inf loss or gradients and were skipped\n",
                (long long)nan_skipped);
    if (metrics_close(mw, e)) {
        mw = NULL;
        goto done;
    }
    mw = NULL;

    /* ---- outputs ---- */
    if (write_adapter(c, c->output_dir, &ls, e)) goto done;
    {
        char mpath[4096];
        snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", c->output_dir);
        if (plot_run_loss_curves(mpath, c->output_dir, e)) goto done;
    }
    res->wall_seconds = clock_now_sec() - t_start;
    res->peak_rss_mib = proc_peak_rss_mib();
    fprintf(stderr, "[memory] peak RSS %.0f MiB (predicted %.0f MiB, %+.1f%%); activation arena peak %.0f MiB\n",
            res->peak_rss_mib, plan.total / 1048576.0, 100.0 * (plan.total / 1048576.0 - res->peak_rss_mib) / res->peak_rss_mib,
            ctx.arena.peak / 1048576.0);
    rc = 0;
done:
    if (handlers) stop_handlers_restore(old_sa);
    if (mw) metrics_close(mw, NULL);
    ckpt_state_free(&ck);
    free(ttab);
    free(config_yaml);
    free(perm);
    free(rows);
    free(bb.ids);
    free(bb.tgt);
    free(bb.pos);
    free(bb.sid);
    adamw_state_free(&opt);
    sophia_state_free(&sop);
    ag_ctx_free(&ctx);
    lora_set_free(&ls);
    llama_free(&model);
    packed_set_free(&train_set);
    packed_set_free(&eval_set);
    free(specs);
    free(tspecs);
    tokenizer_free(tok);
    base_model_close(bm);
    close(lock_fd);
    return rc;
}
