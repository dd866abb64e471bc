/* trainer/eval.c — the held-out loss of the run's model (see run.h): mean
 * token cross-entropy over eval_set, forward only (no tape, no dropout), in
 * micro-batches of micro_batch_size rows, capped at eval_max_tokens; with
 * several ranks the batches are split over them (run_eval_loss).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/clock.h"
#include "model/llama_fsdp.h"
#include "trainer/run.h"

/* The batches one process evaluates: all, or up to the one whose targets
 * reach eval_max_tokens (counted as the loss counts them: targets other than -100). */
static int64_t eval_n_batches(const run_ctx *r) {
    const packed_set *ev = &r->eval_set;
    const int64_t nb = (ev->n_rows + r->mbs - 1) / r->mbs;
    if (r->c->eval_max_tokens <= 0) return nb;
    int64_t ntok = 0;
    for (int64_t b = 0; b < nb; b++) {
        const int64_t r1 = (b + 1) * r->mbs < ev->n_rows ? (b + 1) * r->mbs : ev->n_rows;
        for (const int32_t *t = ev->targets + (size_t)(b * r->mbs) * ev->seq_len,
                           *te = ev->targets + (size_t)r1 * ev->seq_len;
             t < te; t++)
            ntok += *t != -100;
        if (ntok >= r->c->eval_max_tokens) return b + 1;
    }
    return nb;
}

/* Batch b of the held-out set goes to rank b mod world_size; each batch's
 * loss sum and token count land in their own slot (zero elsewhere), the slots
 * are all-reduced (x + 0 is exact) and added in batch order, so the mean is
 * the one process's to the last bit, at any world size. */
double run_eval_loss(run_ctx *r) {
    ag_ctx *ctx = &r->ctx;
    const packed_set *ev = &r->eval_set;
    const int mbs = r->mbs;
    const int64_t n_b = eval_n_batches(r);
    int rec = ctx->recording, tr = ctx->training;
    ctx->recording = 0;
    ctx->training = 0;
    int64_t *rows = malloc((size_t)mbs * sizeof(int64_t));
    double *slot = calloc((size_t)(n_b > 0 ? n_b : 1) * 2, sizeof(double)); /* (n_b, 2): loss sum, tokens */
    if (!rows || !slot) {
        free(rows);
        free(slot);
        return NAN;
    }
    for (int64_t b = r->rank; b < n_b; b += r->world) {
        const int64_t r0 = b * mbs;
        int nb = (int)(ev->n_rows - r0 < mbs ? ev->n_rows - r0 : mbs);
        for (int i = 0; i < nb; i++) rows[i] = r0 + i;
        llama_batch bt;
        run_batch_fill(ev, rows, nb, &r->bb, &bt);
        ag_mark mk = ag_arena_mark(ctx);
        double ls_sum = 0.0;
        int64_t nt = 0;
        llama_forward_loss(ctx, &r->model, &r->ls, &bt, 1.0f, 0, &ls_sum, &nt);
        ag_arena_reset(ctx, mk);
        slot[2 * b] = ls_sum;
        slot[2 * b + 1] = (double)nt;
    }
    if (r->model.fsdp) {
        /* FULL_SHARD: every forward gathers every layer, collectively; a rank with fewer batches than rank 0
         * makes the same gathers without computing, so that all ranks run the same sequence */
        const int64_t mine = n_b > r->rank ? (n_b - r->rank + r->world - 1) / r->world : 0;
        for (int64_t i = mine; i < (n_b + r->world - 1) / r->world; i++) llama_fsdp_idle_forward(r->model.fsdp);
    }
    qerr ce;
    if (r->world > 1 && comm_all_reduce_sum(r->comm, slot, (size_t)n_b * 2, COMM_F64, &ce)) run_comm_fail(r, &ce);
    double total = 0.0;
    int64_t ntok = 0;
    for (int64_t b = 0; b < n_b; b++) {
        total += slot[2 * b];
        ntok += (int64_t)slot[2 * b + 1];
    }
    free(rows);
    free(slot);
    ctx->recording = rec;
    ctx->training = tr;
    r->ev_tok = ntok;
    return ntok ? total / (double)ntok : NAN;
}

double run_eval(run_ctx *r, int step, qerr *e) {
    double t0 = clock_now_sec();
    double el = run_eval_loss(r);
    if (step == 0) /* the first evaluation also says how many tokens every evaluation covers */
        fprintf(stderr, "[eval] step 0: held-out loss %.4f, perplexity %.2f (%lld tokens, %.1fs)\n", el, exp(el),
                (long long)r->ev_tok, clock_now_sec() - t0);
    else
        fprintf(stderr, "[eval] step %d: held-out loss %.4f, perplexity %.2f (%.1fs)\n", step, el, exp(el),
                clock_now_sec() - t0);
    if (r->mw) metrics_log_eval(r->mw, step, el, exp(el), r->ev_tok, e);
    r->last_eval = el;
    r->last_eval_step = step;
    return el;
}
