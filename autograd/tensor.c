/* autograd/tensor.c — arena, tape, backward and checkpointing (see tensor.h). */
#include "autograd/tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ag_arena_chunk *arena_chunk_new(size_t size, ag_arena_chunk *prev) {
    ag_arena_chunk *c = malloc(sizeof *c);
    if (!c) return NULL;
    c->mem = aligned_alloc(64, (size + 63) & ~(size_t)63);
    if (!c->mem) {
        free(c);
        return NULL;
    }
    c->size = size;
    c->used = 0;
    c->prev = prev;
    return c;
}

int ag_ctx_init(ag_ctx *ctx, size_t chunk_bytes, qerr *e) {
    memset(ctx, 0, sizeof *ctx);
    ctx->arena.chunk_size = chunk_bytes < (1u << 20) ? (1u << 20) : chunk_bytes;
    ctx->arena.head = arena_chunk_new(ctx->arena.chunk_size, NULL);
    if (!ctx->arena.head) return qerr_set(e, "[autograd] cannot allocate an arena of %zu bytes", chunk_bytes);
    ctx->cap_nodes = 1024;
    ctx->nodes = malloc((size_t)ctx->cap_nodes * sizeof *ctx->nodes);
    if (!ctx->nodes) return qerr_set(e, "[autograd] out of memory");
    ctx->recording = 1;
    ctx->bf16 = 1;
    return 0;
}

void ag_ctx_free(ag_ctx *ctx) {
    ag_arena_chunk *c = ctx->arena.head;
    while (c) {
        ag_arena_chunk *p = c->prev;
        free(c->mem);
        free(c);
        c = p;
    }
    free(ctx->nodes);
    free(ctx->wscratch);
    free(ctx->ascratch);
    memset(ctx, 0, sizeof *ctx);
}

void *ag_alloc(ag_ctx *ctx, size_t bytes) {
    ag_arena *a = &ctx->arena;
    size_t need = (bytes + 63) & ~(size_t)63;
    if (need == 0) need = 64;
    if (a->head->used + need > a->head->size) {
        /* reuse a following chunk is not possible (singly linked backwards); allocate a new one */
        size_t sz = need > a->chunk_size ? need : a->chunk_size;
        ag_arena_chunk *c = arena_chunk_new(sz, a->head);
        if (!c) {
            fprintf(stderr, "[autograd] out of memory: activation arena needs %zu more bytes (in use %zu)\n",
                    need, a->in_use);
            abort();
        }
        a->head = c;
    }
    void *p = a->head->mem + a->head->used;
    a->head->used += need;
    a->in_use += need;
    if (a->in_use > a->peak) a->peak = a->in_use;
    return p;
}

ag_mark ag_arena_mark(const ag_ctx *ctx) {
    ag_mark m = {ctx->arena.head, ctx->arena.head->used, ctx->arena.in_use};
    return m;
}

void ag_arena_reset(ag_ctx *ctx, ag_mark m) {
    ag_arena *a = &ctx->arena;
    /* free chunks allocated after the mark, but keep one spare of the default
     * size to avoid malloc churn every micro-batch */
    while (a->head != m.chunk) {
        ag_arena_chunk *p = a->head->prev;
        free(a->head->mem);
        free(a->head);
        a->head = p;
    }
    a->head->used = m.used;
    a->in_use = m.in_use;
}

tensor *ag_tensor(ag_ctx *ctx, ag_dtype dt, int ndim, const int64_t *shape) {
    tensor *t = ag_alloc(ctx, sizeof *t);
    memset(t, 0, sizeof *t);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= shape[i];
    }
    t->dtype = dt;
    size_t es = dt == AG_BF16 ? 2 : 4;
    t->data = ag_alloc(ctx, (size_t)t->numel * es);
    return t;
}

tensor *ag_tensor2(ag_ctx *ctx, ag_dtype dt, int64_t d0, int64_t d1) {
    int64_t s[2] = {d0, d1};
    return ag_tensor(ctx, dt, 2, s);
}

tensor *ag_wrap(ag_ctx *ctx, ag_dtype dt, int64_t d0, int64_t d1, void *data, float *grad) {
    tensor *t = ag_alloc(ctx, sizeof *t);
    memset(t, 0, sizeof *t);
    t->ndim = 2;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->numel = d0 * d1;
    t->dtype = dt;
    t->data = data;
    t->grad = grad;
    t->requires_grad = grad != NULL;
    return t;
}

float *ag_grad(ag_ctx *ctx, tensor *t) {
    if (!t->grad) {
        t->grad = ag_alloc(ctx, (size_t)t->numel * sizeof(float));
        memset(t->grad, 0, (size_t)t->numel * sizeof(float));
    }
    return t->grad;
}

int ag_needs_grad(const ag_ctx *ctx, const tensor *a, const tensor *b, const tensor *c) {
    if (!ctx->recording) return 0;
    return (a && a->requires_grad) || (b && b->requires_grad) || (c && c->requires_grad);
}

ag_node *ag_record(ag_ctx *ctx, ag_backward_fn fn, tensor *out, tensor *a, tensor *b, tensor *c,
                   tensor *d) {
    if (ctx->n_nodes == ctx->cap_nodes) {
        ctx->cap_nodes *= 2;
        ag_node *nn = realloc(ctx->nodes, (size_t)ctx->cap_nodes * sizeof *nn);
        if (!nn) {
            fprintf(stderr, "[autograd] out of memory growing the tape\n");
            abort();
        }
        ctx->nodes = nn;
    }
    ag_node *n = &ctx->nodes[ctx->n_nodes++];
    n->backward = fn;
    n->out = out;
    n->in[0] = a;
    n->in[1] = b;
    n->in[2] = c;
    n->in[3] = d;
    n->saved = NULL;
    out->requires_grad = 1;
    return n;
}

void ag_backward_from(ag_ctx *ctx, int64_t from_node) {
    for (int64_t i = ctx->n_nodes - 1; i >= from_node; i--) {
        ag_node n = ctx->nodes[i]; /* copy: backward may grow (realloc) the tape */
        if (n.out->grad) n.backward(ctx, &n);
    }
    ctx->n_nodes = from_node;
}

void ag_backward(ag_ctx *ctx, tensor *loss) {
    float *g = ag_grad(ctx, loss);
    for (int64_t i = 0; i < loss->numel; i++) g[i] = 1.0f;
    ag_backward_from(ctx, 0);
}

/* ---- checkpointing ---- */
typedef struct ckpt_saved {
    ag_block_fn fn;
    void *arg;
    uint64_t seed;
    int training;
} ckpt_saved;

static void ckpt_backward(ag_ctx *ctx, const ag_node *n) {
    const ckpt_saved *s = n->saved;
    tensor *x = n->in[0], *y = n->out;
    float *gx = x->requires_grad ? ag_grad(ctx, x) : NULL; /* allocated before the mark */
    ag_mark m = ag_arena_mark(ctx);
    int64_t from = ctx->n_nodes;
    int rec = ctx->recording, tr = ctx->training;
    uint64_t seed = ctx->seed;
    ctx->recording = 1;
    ctx->training = s->training;
    ctx->seed = s->seed;

    tensor *x2 = ag_tensor(ctx, x->dtype, x->ndim, x->shape);
    memcpy(x2->data, x->data, (size_t)x->numel * (x->dtype == AG_BF16 ? 2 : 4));
    x2->requires_grad = x->requires_grad;
    tensor *y2 = s->fn(ctx, s->arg, x2);
    if (y2->requires_grad) {
        float *g2 = ag_grad(ctx, y2);
        memcpy(g2, y->grad, (size_t)y->numel * sizeof(float));
        ag_backward_from(ctx, from);
    } else {
        ctx->n_nodes = from;
    }
    if (gx && x2->grad)
        for (int64_t i = 0; i < x->numel; i++) gx[i] += x2->grad[i];
    ctx->recording = rec;
    ctx->training = tr;
    ctx->seed = seed;
    ag_arena_reset(ctx, m);
}

tensor *ag_run_discard(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x) {
    int rec = ctx->recording;
    ag_mark m = ag_arena_mark(ctx);
    ctx->recording = 0;
    tensor *y = fn(ctx, arg, x);
    ctx->recording = rec;
    /* keep the output, drop the intermediates */
    size_t ybytes = (size_t)y->numel * (y->dtype == AG_BF16 ? 2 : 4);
    void *tmp = malloc(ybytes);
    if (!tmp) {
        fprintf(stderr, "[autograd] out of memory keeping a block output\n");
        abort();
    }
    memcpy(tmp, y->data, ybytes);
    tensor yshape = *y;
    ag_arena_reset(ctx, m);
    tensor *out = ag_tensor(ctx, yshape.dtype, yshape.ndim, yshape.shape);
    memcpy(out->data, tmp, ybytes);
    free(tmp);
    return out;
}

tensor *ag_checkpoint(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x) {
    tensor *out = ag_run_discard(ctx, fn, arg, x);
    if (!ctx->recording) return out;
    /* The block depends on trainable parameters even if x does not. */
    ag_node *n = ag_record(ctx, ckpt_backward, out, x, NULL, NULL, NULL);
    ckpt_saved *s = ag_alloc(ctx, sizeof *s);
    s->fn = fn;
    s->arg = arg;
    s->seed = ctx->seed;
    s->training = ctx->training;
    n->saved = s;
    return out;
}
