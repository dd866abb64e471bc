/* autograd/tensor.c — arenas, tape, backward, segments and checkpointing (see tensor.h). */
#include "autograd/tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/backend.h"
#include "autograd/prof.h"
#include "core/bf16.h"

/* ------------------------------------------------------------------ arenas */

/* Chunk memory: the backend's (data arenas) or the host's. */
static void *chunk_mem_alloc(const ag_backend *be, size_t size) {
    return be ? be->alloc(size) : aligned_alloc(64, (size + 63) & ~(size_t)63);
}

static void chunk_mem_free(const ag_backend *be, void *p) {
    if (be) be->free(p);
    else free(p);
}

static ag_arena_chunk *arena_chunk_new(const ag_backend *be, size_t size) {
    ag_arena_chunk *c = malloc(sizeof *c);
    if (!c) return NULL;
    c->mem = chunk_mem_alloc(be, size);
    if (!c->mem) {
        free(c);
        return NULL;
    }
    c->size = size;
    c->used = 0;
    c->prev = c->next = NULL;
    return c;
}

static int arena_init(ag_arena *a, const ag_backend *be, size_t chunk_bytes) {
    memset(a, 0, sizeof *a);
    a->be = be;
    a->chunk_size = chunk_bytes < (1u << 20) ? (1u << 20) : chunk_bytes;
    a->head = arena_chunk_new(be, a->chunk_size);
    a->reserved = a->chunk_size;
    return a->head ? 0 : -1;
}

static void arena_free(ag_arena *a) {
    ag_arena_chunk *c = a->head;
    while (c && c->next) c = c->next;
    while (c) {
        ag_arena_chunk *p = c->prev;
        chunk_mem_free(a->be, c->mem);
        free(c);
        c = p;
    }
    memset(a, 0, sizeof *a);
}

static void *arena_alloc(ag_ctx *ctx, ag_arena *a, size_t bytes) {
    size_t need = (bytes + 63) & ~(size_t)63;
    if (need == 0) need = 64;
    while (a->head->used + need > a->head->size) {
        /* chunks kept after a reset are reused in order; a too-small one is
         * skipped by inserting a new chunk in front of it */
        ag_arena_chunk *nx = a->head->next;
        if (nx && nx->size >= need) {
            nx->used = 0;
            a->head = nx;
            continue;
        }
        size_t sz = need > a->chunk_size ? need : a->chunk_size;
        ag_arena_chunk *c = arena_chunk_new(a->be, sz);
        if (!c) {
            fprintf(stderr, "[autograd] out of memory: %s arena needs %zu more bytes (in use %zu + %zu)\n",
                    a->be ? "activation" : "host", need, ctx->arena.in_use, ctx->keep.in_use);
            abort();
        }
        a->reserved += sz;
        c->prev = a->head;
        c->next = nx;
        if (nx) nx->prev = c;
        a->head->next = c;
        a->head = c;
    }
    void *p = a->head->mem + a->head->used;
    a->head->used += need;
    a->in_use += need;
    size_t total = ctx->arena.in_use + ctx->keep.in_use + ctx->host.in_use + ctx->host_keep.in_use;
    if (total > ctx->arena.peak) ctx->arena.peak = total;
    size_t data = ctx->arena.in_use + ctx->keep.in_use;
    if (data > ctx->keep.peak) ctx->keep.peak = data;
    if (a != &ctx->arena && a != &ctx->keep && a->in_use > a->peak) a->peak = a->in_use;
    return p;
}

static ag_arena_pos arena_pos(const ag_arena *a) {
    ag_arena_pos p = {a->head, a->head->used, a->in_use};
    return p;
}

static void arena_reset(ag_arena *a, ag_arena_pos p) {
    /* later chunks stay linked (head->next ...) for reuse: no malloc churn */
    a->head = p.chunk;
    a->head->used = p.used;
    a->in_use = p.in_use;
}

typedef struct ag_offload ag_offload;
static void offload_free(ag_ctx *ctx);
static void offload_on_reset(ag_ctx *ctx, size_t host_keep_in_use);

int ag_ctx_init(ag_ctx *ctx, size_t chunk_bytes, qerr *e) {
    return ag_ctx_init_backend(ctx, ag_backend_default(), chunk_bytes, e);
}

int ag_ctx_init_backend(ag_ctx *ctx, const ag_backend *be, size_t chunk_bytes, qerr *e) {
    memset(ctx, 0, sizeof *ctx);
    ctx->be = be;
    /* host arenas hold headers and small structs: the 1 MiB minimum chunk */
    if (arena_init(&ctx->arena, be, chunk_bytes) || arena_init(&ctx->keep, be, chunk_bytes / 4) ||
        arena_init(&ctx->host, NULL, 0) || arena_init(&ctx->host_keep, NULL, 0)) {
        ag_ctx_free(ctx);
        return qerr_set(e, "[autograd] cannot allocate an arena of %zu bytes", chunk_bytes);
    }
    ctx->cap_nodes = 1024;
    ctx->nodes = malloc((size_t)ctx->cap_nodes * sizeof *ctx->nodes);
    if (!ctx->nodes) return qerr_set(e, "[autograd] out of memory");
    ctx->recording = 1;
    ctx->bf16 = 1;
    return 0;
}

void ag_ctx_free(ag_ctx *ctx) {
    if (ctx->arena.head) arena_free(&ctx->arena);
    if (ctx->keep.head) arena_free(&ctx->keep);
    if (ctx->host.head) arena_free(&ctx->host);
    if (ctx->host_keep.head) arena_free(&ctx->host_keep);
    free(ctx->nodes);
    if (ctx->be) {
        ctx->be->free(ctx->wscratch);
        ctx->be->free(ctx->ascratch);
    }
    offload_free(ctx);
    memset(ctx, 0, sizeof *ctx);
}

void *ag_alloc(ag_ctx *ctx, size_t bytes) { return arena_alloc(ctx, &ctx->arena, bytes); }

void *ag_alloc_keep(ag_ctx *ctx, size_t bytes) { return arena_alloc(ctx, &ctx->keep, bytes); }

const void *ag_stage(ag_ctx *ctx, const void *host, size_t bytes) {
    if (ctx->be->host_data) return host;
    void *d = ag_alloc_keep(ctx, bytes);
    ctx->be->copy_h2d(d, host, bytes);
    return d;
}

void *ag_alloc_host(ag_ctx *ctx, size_t bytes) { return arena_alloc(ctx, &ctx->host, bytes); }

void *ag_alloc_host_keep(ag_ctx *ctx, size_t bytes) { return arena_alloc(ctx, &ctx->host_keep, bytes); }

ag_mark ag_arena_mark(const ag_ctx *ctx) {
    ag_mark m = {arena_pos(&ctx->arena), arena_pos(&ctx->keep), arena_pos(&ctx->host), arena_pos(&ctx->host_keep)};
    return m;
}

void ag_arena_reset(ag_ctx *ctx, ag_mark m) {
    arena_reset(&ctx->arena, m.main);
    arena_reset(&ctx->keep, m.keep);
    arena_reset(&ctx->host, m.host);
    arena_reset(&ctx->host_keep, m.host_keep);
    if (ctx->off) offload_on_reset(ctx, m.host_keep.in_use);
}

/* Release the transient arenas to m, keeping both keep arenas as they are. */
static void arena_reset_transient(ag_ctx *ctx, ag_mark m) {
    ag_mark now = ag_arena_mark(ctx);
    now.main = m.main;
    now.host = m.host;
    ag_arena_reset(ctx, now);
}

static size_t dtype_size(ag_dtype dt) { return dt == AG_BF16 ? 2 : 4; }

void *ag_keep(ag_ctx *ctx, tensor *t) {
    if (!ctx->saving) return t->data;
    if (!t->kept) {
        int pc = ag_prof_push(AG_PROF_CKPT);
        size_t bytes = (size_t)t->numel * dtype_size(t->dtype);
        t->kept = ag_alloc_keep(ctx, bytes);
        ctx->be->copy_d2d(t->kept, t->data, bytes);
        ag_prof_pop(pc);
    }
    return t->kept;
}

const void *ag_bf16_of(ag_ctx *ctx, tensor *t, int keep) {
    if (t->dtype == AG_BF16) return keep ? ag_keep(ctx, t) : t->data;
    if (!t->kept_bf16) {
        int pc = ag_prof_push(AG_PROF_CONVERT);
        /* inside a segment every memo goes to the keep arena: a main-arena copy
         * would dangle after the segment's reset */
        size_t bytes = (size_t)t->numel * sizeof(bf16);
        bf16 *b = ctx->saving || keep ? ag_alloc_keep(ctx, bytes) : ag_alloc(ctx, bytes);
        ctx->be->to_bf16(t->data, b, t->numel);
        t->kept_bf16 = b;
        ag_prof_pop(pc);
    }
    return t->kept_bf16;
}

const float *ag_f16_of(ag_ctx *ctx, tensor *t, int keep) {
    if (!t->kept_f16) {
        int pc = ag_prof_push(AG_PROF_CONVERT);
        size_t bytes = (size_t)t->numel * sizeof(float);
        float *b = ctx->saving || keep ? ag_alloc_keep(ctx, bytes) : ag_alloc(ctx, bytes);
        ctx->be->round_f16(t->data, b, t->numel);
        t->kept_f16 = b;
        ag_prof_pop(pc);
    }
    return t->kept_f16;
}

/* ------------------------------------------------------------------ tensors */

tensor *ag_tensor(ag_ctx *ctx, ag_dtype dt, int ndim, const int64_t *shape) {
    tensor *t = ag_alloc_host_keep(ctx, sizeof *t);
    memset(t, 0, sizeof *t);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= shape[i];
    }
    t->dtype = dt;
    t->data = ag_alloc(ctx, (size_t)t->numel * dtype_size(dt));
    return t;
}

tensor *ag_tensor2(ag_ctx *ctx, ag_dtype dt, int64_t d0, int64_t d1) {
    int64_t s[2] = {d0, d1};
    return ag_tensor(ctx, dt, 2, s);
}

tensor *ag_wrap(ag_ctx *ctx, ag_dtype dt, int64_t d0, int64_t d1, void *data, float *grad) {
    tensor *t = ag_alloc_host_keep(ctx, sizeof *t);
    memset(t, 0, sizeof *t);
    t->ndim = 2;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->numel = d0 * d1;
    t->dtype = dt;
    t->data = data;
    t->kept = data; /* caller-owned: outlives every segment */
    t->grad = grad;
    t->requires_grad = grad != NULL;
    return t;
}

float *ag_grad(ag_ctx *ctx, tensor *t) {
    if (!t->grad) {
        t->grad = ag_alloc(ctx, (size_t)t->numel * sizeof(float));
        int pc = ag_prof_push(AG_PROF_GRAD_ZERO);
        ctx->be->zero(t->grad, (size_t)t->numel * sizeof(float));
        ag_prof_pop(pc);
    }
    return t->grad;
}

float *ag_grad_fresh(ag_ctx *ctx, tensor *t, int *fresh) {
    *fresh = !t->grad;
    if (!t->grad) t->grad = ag_alloc(ctx, (size_t)t->numel * sizeof(float));
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
        if (n.out->grad || n.out->grad_bf16) n.backward(ctx, &n);
    }
    ctx->n_nodes = from_node;
}

void ag_backward(ag_ctx *ctx, tensor *loss) {
    float *g = ag_grad(ctx, loss);
    ctx->be->fill_f32(g, loss->numel, 1.0f);
    ag_backward_from(ctx, 0);
}

/* ------------------------------------------------------------------ block helpers */

/* Keep a block's output: copy it to a reusable buffer, release everything
 * after mark m, and put it back into a fresh arena tensor (keep arena when
 * `to_keep`). */
static tensor *block_output(ag_ctx *ctx, tensor *y, ag_mark m, int to_keep) {
    int pc = ag_prof_push(AG_PROF_CKPT);
    size_t ybytes = (size_t)y->numel * dtype_size(y->dtype);
    if (ctx->ascratch_size < ybytes) {
        ctx->be->free(ctx->ascratch);
        ctx->ascratch = ctx->be->alloc(ybytes);
        if (!ctx->ascratch) {
            fprintf(stderr, "[autograd] out of memory keeping a block output\n");
            abort();
        }
        ctx->ascratch_size = ybytes;
    }
    ctx->be->copy_d2d(ctx->ascratch, y->data, ybytes);
    tensor yshape = *y;
    ag_arena_reset(ctx, m);
    tensor *out = ag_alloc_host_keep(ctx, sizeof *out);
    memset(out, 0, sizeof *out);
    out->ndim = yshape.ndim;
    memcpy(out->shape, yshape.shape, sizeof out->shape);
    out->numel = yshape.numel;
    out->dtype = yshape.dtype;
    out->data = to_keep ? ag_alloc_keep(ctx, ybytes) : ag_alloc(ctx, ybytes);
    if (to_keep) out->kept = out->data;
    ctx->be->copy_d2d(out->data, ctx->ascratch, ybytes);
    ag_prof_pop(pc);
    return out;
}

static tensor *run_discard(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x, int to_keep) {
    int rec = ctx->recording;
    ag_mark m = ag_arena_mark(ctx);
    ctx->recording = 0;
    tensor *y = fn(ctx, arg, x);
    ctx->recording = rec;
    return block_output(ctx, y, m, to_keep);
}

tensor *ag_run_discard(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x) { return run_discard(ctx, fn, arg, x, 0); }

/* ---- segments (no recompute, intermediates released) ----
 *
 * Gradients of block boundaries do not pile up: when a block's backward is
 * done, the gradient of its output is dead, so the gradient of its input is
 * copied into that buffer and its own allocation (the last one before the
 * block's mark) is popped. Memory for boundary gradients is then one buffer,
 * not one per layer. */

typedef struct seg_saved {
    tensor *x, *y;      /* block input and output */
    ag_mark before_gx;  /* position before x's gradient was allocated */
    ag_mark mark;       /* taken in backward after x's gradient exists */
    int armed, fresh_gx;
} seg_saved;

static int can_handover(const tensor *x, const tensor *y) {
    return y && y->grad && x->numel == y->numel;
}

/* Recorded after the block: runs first in backward. */
static void seg_end_backward(ag_ctx *ctx, const ag_node *n) {
    seg_saved *s = n->saved;
    s->before_gx = ag_arena_mark(ctx);
    s->fresh_gx = s->x->requires_grad && !s->x->grad && can_handover(s->x, s->y);
    /* a fresh x's gradient is left to the block: its residual adds usually pass y's gradient buffer
     * down to x unchanged (op_add's backward), so x's gradient ends in that buffer, which lies below
     * the release point; otherwise x's gradient survives the release below */
    if (s->x->requires_grad && !s->fresh_gx) (void)ag_grad(ctx, s->x);
    s->mark = ag_arena_mark(ctx);
    s->armed = 1;
}

/* x's fresh gradient into y's dead gradient buffer once the block's backward is done, and everything
 * allocated since `before` released: already there when the residual adds passed the buffer down
 * (op_add's backward), else copied there, or zeros when no gradient reached x. */
static void grad_settle(ag_ctx *ctx, tensor *x, tensor *y, ag_mark before) {
    float *yg = y->grad;
    if (x->grad && x->grad != yg) ctx->be->copy_d2d(yg, x->grad, (size_t)x->numel * sizeof(float));
    else if (!x->grad) ctx->be->zero(yg, (size_t)x->numel * sizeof(float));
    ag_arena_reset(ctx, before);
    x->grad = yg;
    y->grad = NULL;
}

/* Recorded before the block: runs after the block's own nodes in backward. */
static void seg_start_backward(ag_ctx *ctx, const ag_node *n) {
    seg_saved *s = n->saved;
    if (s->armed) {
        if (s->fresh_gx) grad_settle(ctx, s->x, s->y, s->before_gx);
        else ag_arena_reset(ctx, s->mark);
    }
    s->armed = 0;
}

tensor *ag_segment(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x) {
    if (!ctx->recording) return ag_run_discard(ctx, fn, arg, x);
    seg_saved *s = ag_alloc_host_keep(ctx, sizeof *s);
    memset(s, 0, sizeof *s);
    s->x = x;
    /* the markers hang off a dummy tensor with a grad so backward always visits them */
    int64_t one = 1;
    tensor *dummy = ag_alloc_host_keep(ctx, sizeof *dummy);
    memset(dummy, 0, sizeof *dummy);
    dummy->ndim = 1;
    dummy->shape[0] = one;
    dummy->numel = 1;
    dummy->grad = ag_alloc_keep(ctx, sizeof(float));
    ag_node *n0 = ag_record(ctx, seg_start_backward, dummy, NULL, NULL, NULL, NULL);
    n0->saved = s;
    int64_t n_before = ctx->n_nodes;
    ag_mark m = ag_arena_mark(ctx);
    int sv = ctx->saving;
    ctx->saving = 1;
    tensor *y = fn(ctx, arg, x);
    ctx->saving = sv;
    if (ctx->n_nodes == n_before) { /* nothing recorded: plain output */
        ctx->n_nodes = n_before - 1;
        return block_output(ctx, y, m, 0);
    }
    /* keep y: its header (keep arena) stays, its data moves to the keep arena */
    int pc = ag_prof_push(AG_PROF_CKPT);
    size_t ybytes = (size_t)y->numel * dtype_size(y->dtype);
    void *yk = y->kept;
    if (!yk) {
        yk = ag_alloc_keep(ctx, ybytes);
        ctx->be->copy_d2d(yk, y->data, ybytes);
    }
    y->data = yk;
    y->kept = yk;
    y->grad = NULL;
    s->y = y;
    arena_reset_transient(ctx, m);
    ag_prof_pop(pc);
    ag_node *n1 = ag_record(ctx, seg_end_backward, dummy, NULL, NULL, NULL, NULL);
    n1->saved = s;
    return y;
}

/* ---- checkpointing ---- */
typedef struct ckpt_saved {
    ag_block_fn fn;
    void *arg;
    uint64_t seed;
    int training;
    int off_idx; /* ag_checkpoint_offload: the input's entry in ctx->off->ent, or -1 (input in place) */
} ckpt_saved;

static const void *offload_fetch(ag_ctx *ctx, int idx, tensor *x);
static void offload_prefetch(ag_ctx *ctx, int idx);

static void ckpt_backward(ag_ctx *ctx, const ag_node *n) {
    const ckpt_saved *s = n->saved;
    tensor *x = n->in[0], *y = n->out;
    /* x's gradient: fresh -> handed over into y's dead gradient buffer at the
     * end (see the segments above); already there -> accumulated into */
    int fresh = x->requires_grad && !x->grad && can_handover(x, y);
    float *gx = x->requires_grad && !fresh ? ag_grad(ctx, x) : NULL; /* allocated before the mark */
    ag_mark m = ag_arena_mark(ctx);
    int64_t from = ctx->n_nodes;
    int rec = ctx->recording, tr = ctx->training, sv = ctx->saving;
    uint64_t seed = ctx->seed;
    ctx->recording = 1;
    ctx->saving = 0;
    ctx->training = s->training;
    ctx->seed = s->seed;

    int pc = ag_prof_push(AG_PROF_CKPT);
    /* The recompute's input is a header over data that is not copied into the arena: an offloaded input is
     * read straight from its slot (copied back from host memory if it is not there any more), which nothing
     * overwrites before this block's backward is done (the prefetch below takes the other slot); any other
     * input in place (ops never write their inputs, and x's data lies below the mark, kept until this node
     * is done). */
    tensor *x2 = ag_alloc_host_keep(ctx, sizeof *x2);
    memset(x2, 0, sizeof *x2);
    x2->ndim = x->ndim;
    memcpy(x2->shape, x->shape, sizeof x2->shape);
    x2->numel = x->numel;
    x2->dtype = x->dtype;
    x2->data = s->off_idx >= 0 ? (void *)offload_fetch(ctx, s->off_idx, x) : x->data;
    x2->requires_grad = x->requires_grad;
    /* the block before this one: its input on its way back while this block is recomputed */
    if (s->off_idx > 0) offload_prefetch(ctx, s->off_idx - 1);
    ag_prof_pop(pc);
    int rc = ctx->recomputing;
    ctx->recomputing = 1;
    tensor *y2 = s->fn(ctx, s->arg, x2);
    ctx->recomputing = rc;
    if (y2->requires_grad) {
        /* the recomputed output's gradient is y's: only this node reads y's, so y2 takes the buffer itself */
        y2->grad = y->grad;
        ag_backward_from(ctx, from);
    } else {
        ctx->n_nodes = from;
    }
    ctx->recording = rec;
    ctx->training = tr;
    ctx->saving = sv;
    ctx->seed = seed;
    if (fresh) {
        x->grad = x2->grad;
        grad_settle(ctx, x, y, m);
        return;
    }
    if (gx && x2->grad) ctx->be->axpy(gx, 1.0f, x2->grad, x->numel);
    ag_arena_reset(ctx, m);
}

static tensor *checkpoint(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x, int to_keep) {
    tensor *out = run_discard(ctx, fn, arg, x, to_keep && ctx->recording);
    if (!ctx->recording) return out;
    /* The block depends on trainable parameters even if x does not. */
    ag_node *n = ag_record(ctx, ckpt_backward, out, x, NULL, NULL, NULL);
    ckpt_saved *s = ag_alloc_host(ctx, sizeof *s);
    s->fn = fn;
    s->arg = arg;
    s->seed = ctx->seed;
    s->training = ctx->training;
    s->off_idx = -1;
    n->saved = s;
    return out;
}

tensor *ag_checkpoint(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x) { return checkpoint(ctx, fn, arg, x, 0); }

tensor *ag_checkpoint_kept(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x) { return checkpoint(ctx, fn, arg, x, 1); }

/* ---- offloaded checkpointing (tensor.h ag_checkpoint_offload) ---- */

typedef struct off_ent {
    tensor *t;    /* the offloaded block input (header in host_keep) */
    void *host;   /* its host copy (host_alloc), kept for the next micro-batch's entry at this index */
    size_t cap;   /* bytes of host */
    size_t pos;   /* host_keep in_use when it was pushed (t's header lies below) */
} off_ent;

struct ag_offload {
    void *slot[2];
    size_t slot_bytes;    /* bytes of each slot */
    tensor *owner[2];     /* the tensor whose data the slot holds, or NULL */
    size_t owner_pos[2];  /* host_keep in_use with owner's header below it */
    uint64_t ticket[2];   /* the last copy started on the slot (0: none) */
    off_ent *ent;         /* this chain's offloaded inputs in forward order: [0, n) */
    int n, cap;           /* cap: entries allocated (host buffers of [n, cap) wait for reuse) */
    size_t host_bytes;
    int64_t n_d2h, n_h2d, offloaded_bytes;
};

static ag_offload *offload_get(ag_ctx *ctx) {
    if (!ctx->off) {
        ctx->off = calloc(1, sizeof *ctx->off);
        if (!ctx->off) {
            fprintf(stderr, "[autograd] out of memory (offload state)\n");
            abort();
        }
    }
    return ctx->off;
}

static void offload_free(ag_ctx *ctx) {
    ag_offload *o = ctx->off;
    if (!o) return;
    if (ctx->be) {
        ctx->be->sync();
        for (int i = 0; i < 2; i++) ctx->be->free(o->slot[i]);
        for (int i = 0; i < o->cap; i++) ctx->be->host_free(o->ent[i].host);
    }
    free(o->ent);
    free(o);
    ctx->off = NULL;
}

/* A reset of the host_keep arena to in_use releases the headers above it: entries pushed after it
 * and slot owners allocated after it are forgotten (their tensors are gone). */
static void offload_on_reset(ag_ctx *ctx, size_t in_use) {
    ag_offload *o = ctx->off;
    while (o->n > 0 && o->ent[o->n - 1].pos > in_use) o->ent[--o->n].t = NULL;
    for (int i = 0; i < 2; i++)
        if (o->owner[i] && o->owner_pos[i] > in_use) o->owner[i] = NULL;
}

static int slot_of(const ag_offload *o, const tensor *x) {
    for (int i = 0; i < 2; i++)
        if (o->owner[i] == x && x->data == o->slot[i] && x->data) return i;
    return -1;
}

/* Slot k is about to be overwritten: its owner loses its data (a later read of it is a NULL
 * pointer, never stale numbers; an offloaded owner is fetched back from host memory). */
static void slot_evict(ag_offload *o, int k) {
    if (o->owner[k] && o->owner[k]->data == o->slot[k]) o->owner[k]->data = NULL;
    o->owner[k] = NULL;
}

/* Both slots hold at least `bytes`. Growing them waits for every copy and evicts both. */
static void slot_reserve(ag_ctx *ctx, ag_offload *o, size_t bytes) {
    if (o->slot_bytes >= bytes) return;
    ctx->be->sync();
    for (int i = 0; i < 2; i++) {
        slot_evict(o, i);
        ctx->be->free(o->slot[i]);
        o->slot[i] = ctx->be->alloc(bytes);
        if (!o->slot[i]) {
            fprintf(stderr, "[autograd] out of memory: an offload slot of %zu bytes\n", bytes);
            abort();
        }
        o->ticket[i] = 0;
    }
    o->slot_bytes = bytes;
}

/* A new entry for x with a host buffer of `bytes`. */
static int offload_push(ag_ctx *ctx, ag_offload *o, tensor *x, size_t bytes) {
    if (o->n == o->cap) {
        int nc = o->cap ? 2 * o->cap : 64;
        off_ent *ne = realloc(o->ent, (size_t)nc * sizeof *ne);
        if (!ne) {
            fprintf(stderr, "[autograd] out of memory (offload entries)\n");
            abort();
        }
        memset(ne + o->cap, 0, (size_t)(nc - o->cap) * sizeof *ne);
        o->ent = ne;
        o->cap = nc;
    }
    off_ent *e = &o->ent[o->n];
    if (e->cap < bytes) {
        ctx->be->host_free(e->host); /* waits for the copies that used it */
        o->host_bytes -= e->cap;
        e->host = ctx->be->host_alloc(bytes);
        if (!e->host) {
            fprintf(stderr, "[autograd] out of host memory: offloading a block input of %zu bytes (%zu held)\n", bytes,
                    o->host_bytes);
            abort();
        }
        e->cap = bytes;
        o->host_bytes += bytes;
    }
    e->t = x;
    e->pos = ctx->host_keep.in_use;
    return o->n++;
}

tensor *ag_checkpoint_offload(ag_ctx *ctx, ag_block_fn fn, void *arg, tensor *x) {
    if (ctx->be->host_data || !ctx->recording) return ag_checkpoint(ctx, fn, arg, x);
    const ag_backend *be = ctx->be;
    ag_offload *o = offload_get(ctx);
    int pc = ag_prof_push(AG_PROF_CKPT);
    size_t xb = (size_t)x->numel * dtype_size(x->dtype);
    int k = slot_of(o, x), idx = -1;
    if (k >= 0) { /* the previous block's output: to host memory while this block runs */
        idx = offload_push(ctx, o, x, xb);
        o->ticket[k] = be->offload_start(o->ent[idx].host, o->slot[k], xb, 1);
        o->n_d2h++;
        o->offloaded_bytes += (int64_t)xb;
    }
    ag_prof_pop(pc);
    int j = k >= 0 ? 1 - k : 0;
    ag_mark m = ag_arena_mark(ctx);
    ctx->recording = 0;
    tensor *y = fn(ctx, arg, x);
    ctx->recording = 1;
    pc = ag_prof_push(AG_PROF_CKPT);
    size_t yb = (size_t)y->numel * dtype_size(y->dtype);
    if (o->slot_bytes < yb) { /* first use (or a wider output): new slots, after every copy is done */
        slot_reserve(ctx, o, yb);
        j = 0;
    }
    if (o->ticket[j]) be->offload_wait(o->ticket[j]); /* the copy reading slot j (two blocks back) is done */
    slot_evict(o, j);
    be->copy_d2d(o->slot[j], y->data, yb);
    tensor yshape = *y;
    ag_arena_reset(ctx, m);
    tensor *out = ag_alloc_host_keep(ctx, sizeof *out);
    memset(out, 0, sizeof *out);
    out->ndim = yshape.ndim;
    memcpy(out->shape, yshape.shape, sizeof out->shape);
    out->numel = yshape.numel;
    out->dtype = yshape.dtype;
    out->data = o->slot[j];
    o->owner[j] = out;
    o->owner_pos[j] = ctx->host_keep.in_use;
    ag_prof_pop(pc);
    ag_node *n = ag_record(ctx, ckpt_backward, out, x, NULL, NULL, NULL);
    ckpt_saved *s = ag_alloc_host(ctx, sizeof *s);
    s->fn = fn;
    s->arg = arg;
    s->seed = ctx->seed;
    s->training = ctx->training;
    s->off_idx = idx;
    n->saved = s;
    return out;
}

tensor *ag_offload_settle(ag_ctx *ctx, tensor *x) {
    ag_offload *o = ctx->off;
    int k = o ? slot_of(o, x) : -1;
    if (k < 0) return x;
    size_t bytes = (size_t)x->numel * dtype_size(x->dtype);
    void *d = ag_alloc(ctx, bytes);
    ctx->be->copy_d2d(d, o->slot[k], bytes);
    x->data = d;
    o->owner[k] = NULL;
    return x;
}

/* The data of entry idx (tensor x) on the device: its slot, after the copy that put it there. */
static const void *offload_fetch(ag_ctx *ctx, int idx, tensor *x) {
    ag_offload *o = ctx->off;
    if (!o || idx >= o->n || o->ent[idx].t != x) {
        fprintf(stderr, "[autograd] an offloaded block input is gone (the arena was reset between the forward "
                        "pass and its backward)\n");
        abort();
    }
    int k = slot_of(o, x);
    if (k < 0) { /* not prefetched (the first block of a backward pass after another chain): fetch now */
        offload_prefetch(ctx, idx);
        k = slot_of(o, x);
    }
    if (o->ticket[k]) ctx->be->offload_wait(o->ticket[k]);
    return o->slot[k];
}

/* Start copying entry idx's host copy into a slot, unless it is in one already. The slot taken is the
 * one not holding the entry after it (whose block is being recomputed now). */
static void offload_prefetch(ag_ctx *ctx, int idx) {
    ag_offload *o = ctx->off;
    off_ent *e = &o->ent[idx];
    if (!e->t || slot_of(o, e->t) >= 0) return;
    int k = idx + 1 < o->n && o->ent[idx + 1].t && slot_of(o, o->ent[idx + 1].t) == 0 ? 1 : 0;
    size_t bytes = (size_t)e->t->numel * dtype_size(e->t->dtype);
    slot_evict(o, k);
    o->ticket[k] = ctx->be->offload_start(o->slot[k], e->host, bytes, 0);
    o->n_h2d++;
    o->owner[k] = e->t;
    o->owner_pos[k] = e->pos;
    e->t->data = o->slot[k];
}

void ag_offload_get_info(const ag_ctx *ctx, ag_offload_info *info) {
    memset(info, 0, sizeof *info);
    const ag_offload *o = ctx->off;
    if (!o) return;
    info->slot_bytes = 2 * o->slot_bytes;
    info->host_bytes = o->host_bytes;
    info->n_d2h = o->n_d2h;
    info->n_h2d = o->n_h2d;
    info->offloaded_bytes = o->offloaded_bytes;
}
