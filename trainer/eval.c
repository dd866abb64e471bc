/* trainer/eval.c — the held-out loss of the run's model (see run.h): mean
 * token cross-entropy over eval_set, forward only (no tape, no dropout), in
 * micro-batches of micro_batch_size rows, capped at eval_max_tokens.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/clock.h"
#include "trainer/run.h"

double run_eval_loss(run_ctx *r) {
    ag_ctx *ctx = &r->ctx;
    const packed_set *ev = &r->eval_set;
    const int mbs = r->mbs;
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
        run_batch_fill(ev, rows, nb, &r->bb, &b);
        ag_mark mk = ag_arena_mark(ctx);
        double ls_sum = 0.0;
        int64_t nt = 0;
        llama_forward_loss(ctx, &r->model, &r->ls, &b, 1.0f, 0, &ls_sum, &nt);
        ag_arena_reset(ctx, mk);
        total += ls_sum;
        ntok += nt;
        if (r->c->eval_max_tokens > 0 && ntok >= r->c->eval_max_tokens) break;
    }
    free(rows);
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
    metrics_log_eval(r->mw, step, el, exp(el), r->ev_tok, e);
    r->last_eval = el;
    r->last_eval_step = step;
    return el;
}
