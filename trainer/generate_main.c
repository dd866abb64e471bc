/* trainer/generate_main.c — `qlora-generate [RUN_DIR] --prompt TEXT`: sample from
 * the base model + a trained adapter, with the model's chat template, so the
 * effect of training is one command away. Also the logits oracle of
 * `make test-interop` (--dump-logits).
 *
 * Decoding: the prompt is run once (prefill), then one token per step with a
 * KV cache (model/llama_infer.h). Greedy when temperature is 0, otherwise
 * softmax(logits / temperature) restricted by top-k and top-p (nucleus:
 * the smallest set of most likely tokens whose probability reaches top_p,
 * as HF's TopPLogitsWarper), drawn with the counter-based RNG from --seed.
 * Stops at eos or the template's end-of-turn token (<|im_end|> for ChatML),
 * or after --max-new-tokens.
 * Exit status: 0 success, 1 failure, 2 bad usage.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "autograd/gemm.h"
#include "core/clock.h"
#include "core/file.h"
#include "core/parse.h"
#include "core/rng.h"
#include "data/chat.h"
#include "model/adapter.h"
#include "model/base.h"
#include "model/llama_infer.h"
#include "format/safetensors.h"
#include "trainer/config.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora-generate [RUN_DIR] --prompt TEXT [options]\n"
            "  RUN_DIR: a qlora-train output_dir (or any PEFT LoRA adapter dir); omit it (and give --base)\n"
            "  to sample from the base model alone.\n"
            "  --prompt TEXT         user message, rendered with the model's chat template\n"
            "  --prompt-file FILE    the same, read from a file\n"
            "  --system TEXT         system message (default: the template's own default, if any)\n"
            "  --raw                 use the prompt text as it is (no chat template)\n"
            "  --ids 1,2,3           the prompt as token ids\n"
            "  --max-new-tokens N    default 128 (at most the model's context length less the prompt)\n"
            "  --temperature T       default 0 = greedy, at most 100\n"
            "  --top-p P             default 1.0 (off)\n"
            "  --top-k K             default 0 (off)\n"
            "  --seed S              default 42\n"
            "  --compare             generate with the base model alone too, then with the adapter\n"
            "  --no-adapter          base model only\n"
            "  --base PATH           base model (default: base_model of RUN_DIR/config.resolved.yaml)\n"
            "  --load-in-4bit 0|1    hold the base as NF4, or bf16 (default: as the run did, else 1)\n"
            "  --load-in-8bit 0|1    1: hold the base as int8 (default: as the run did, else 0)\n"
            "  --bf16 0|1            bf16 GEMM operands (default: as the run did, else 1)\n"
            "  --dump-logits FILE    no sampling: write the prompt's logits (safetensors: logits F32\n"
            "                        [T, vocab], input_ids I32 [T]), full forward as in evaluation\n");
}

/* --temperature's upper bound: at 100 the softmax is already all but uniform. */
#define GEN_MAX_TEMPERATURE 100.0

typedef struct gen_opts {
    int max_new;
    float temperature, top_p;
    int top_k;
    uint64_t seed;
} gen_opts;

typedef struct cand {
    float p;
    int32_t id;
} cand;

static int cand_desc(const void *a, const void *b) {
    float x = ((const cand *)a)->p, y = ((const cand *)b)->p;
    if (x != y) return x > y ? -1 : 1;
    return ((const cand *)a)->id - ((const cand *)b)->id;
}

static int32_t sample(const float *logits, int32_t V, const gen_opts *o, uint64_t step, cand *work) {
    int32_t best = 0;
    for (int32_t i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (o->temperature <= 0.0f) return best;
    float mx = logits[best];
    for (int32_t i = 0; i < V; i++) { /* unnormalised softmax(logits / T) */
        work[i].p = expf((logits[i] - mx) / o->temperature);
        work[i].id = i;
    }
    qsort(work, (size_t)V, sizeof *work, cand_desc);
    int32_t keep = V;
    if (o->top_k > 0 && o->top_k < keep) keep = o->top_k;
    double kept = 0.0;
    for (int32_t i = 0; i < keep; i++) kept += work[i].p;
    if (o->top_p < 1.0f) {
        double c = 0.0;
        for (int32_t i = 0; i < keep; i++) {
            c += work[i].p;
            if (c >= o->top_p * kept) {
                keep = i + 1;
                break;
            }
        }
        kept = c;
    }
    double u = (double)rng_uniform(o->seed, 0x9e7e7a7eu, step) * kept, c = 0.0;
    for (int32_t i = 0; i < keep; i++) {
        c += work[i].p;
        if (u < c) return work[i].id;
    }
    return work[keep - 1].id;
}

/* Length of the longest prefix of s[0..n) that does not end inside a UTF-8 sequence. */
static size_t utf8_complete(const char *s, size_t n) {
    size_t i = n;
    int back = 0;
    while (i > 0 && back < 4 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) {
        i--;
        back++;
    }
    if (i == 0) return n;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    return (size_t)back + 1 >= need ? n : i - 1;
}

/* Generate from prompt ids; the text goes to stdout as it is produced. */
static int generate(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const tokenizer *tok, const int32_t *ids,
                    int n, const gen_opts *o, qerr *e) {
    int32_t V = m->hp.vocab;
    llama_kv_cache c;
    if (llama_kv_init(&c, m, n + o->max_new, e)) return -1;
    float *logits = malloc((size_t)V * sizeof(float));
    cand *work = malloc((size_t)V * sizeof *work);
    int32_t *out = malloc((size_t)(o->max_new + 1) * sizeof(int32_t));
    int32_t stop[4];
    int ns = chat_stop_ids(tok, stop, 4);
    int rc = -1, n_out = 0;
    size_t printed = 0;
    double t0 = clock_now_sec(), t_prefill = 0;
    if (!logits || !work || !out) {
        qerr_set(e, "out of memory");
        goto done;
    }
    const int32_t *next = ids;
    int n_next = n;
    const char *why = "max_new_tokens";
    for (int step = 0; step < o->max_new; step++) {
        ag_mark mk = ag_arena_mark(ctx);
        tensor *h = llama_forward_cached(ctx, m, ls, &c, next, n_next);
        if (!h) {
            ag_arena_reset(ctx, mk);
            qerr_set(e, "KV cache full");
            goto done;
        }
        llama_logits_rows_ls(ctx, m, ls, h, n_next - 1, 1, logits);
        ag_arena_reset(ctx, mk);
        if (step == 0) t_prefill = clock_now_sec() - t0;
        int32_t id = sample(logits, V, o, (uint64_t)step, work);
        int is_stop = 0;
        for (int i = 0; i < ns; i++) is_stop |= id == stop[i];
        if (is_stop) {
            why = tokenizer_token_text(tok, id);
            break;
        }
        out[n_out++] = id;
        char *text;
        size_t len;
        if (tokenizer_decode(tok, out, (size_t)n_out, &text, &len, e)) goto done;
        size_t upto = utf8_complete(text, len);
        if (upto > printed) {
            fwrite(text + printed, 1, upto - printed, stdout);
            fflush(stdout);
            printed = upto;
        }
        free(text);
        next = &out[n_out - 1];
        n_next = 1;
    }
    {
        char *text;
        size_t len;
        if (tokenizer_decode(tok, out, (size_t)n_out, &text, &len, e)) goto done;
        if (len > printed) fwrite(text + printed, 1, len - printed, stdout);
        free(text);
    }
    fputc('\n', stdout);
    fflush(stdout);
    double dt = clock_now_sec() - t0;
    fprintf(stderr, "[generate] prompt %d tokens (%.2fs), %d new tokens (%.1f tok/s), stopped at %s\n", n, t_prefill,
            n_out, n_out > 1 ? (n_out - 1) / (dt - t_prefill) : 0.0, why);
    rc = 0;
done:
    free(logits);
    free(work);
    free(out);
    llama_kv_free(&c);
    return rc;
}

static int dump_logits(ag_ctx *ctx, const llama_model *m, const lora_set *ls, const int32_t *ids, int n,
                       const char *path, qerr *e) {
    int32_t V = m->hp.vocab;
    int32_t *zeros = calloc((size_t)n, sizeof(int32_t)), *pos = malloc((size_t)n * sizeof(int32_t));
    float *logits = malloc((size_t)n * V * sizeof(float));
    int rc = -1;
    if (!zeros || !pos || !logits) {
        qerr_set(e, "out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) pos[i] = i;
    llama_batch b = {.B = 1, .T = n, .input_ids = ids, .targets = NULL, .position_ids = pos, .seq_ids = zeros};
    ag_mark mk = ag_arena_mark(ctx);
    int tr = ctx->training;
    ctx->training = 0;
    tensor *h = llama_forward_hidden(ctx, m, ls, &b);
    llama_logits_rows_ls(ctx, m, ls, h, 0, n, logits);
    ctx->training = tr;
    ag_arena_reset(ctx, mk);
    st_tensor ts[2] = {
        {.name = "logits", .dtype = "F32", .n_dims = 2, .shape = {n, V}, .data = logits,
         .nbytes = (size_t)n * V * sizeof(float)},
        {.name = "input_ids", .dtype = "I32", .n_dims = 1, .shape = {n}, .data = ids, .nbytes = (size_t)n * 4},
    };
    rc = safetensors_write(path, ts, 2, NULL, e);
done:
    free(zeros);
    free(pos);
    free(logits);
    return rc;
}

/* One numeric option's value: strict (core/parse.h), so "12abc", "1e99", "abc" and "nan" are refused. */
static int opt_int(const char *opt, const char *s, int64_t lo, int64_t hi, int *out) {
    qerr e;
    int64_t v;
    if (parse_int_range(opt, s, lo, hi, &v, &e)) {
        fprintf(stderr, "qlora-generate: %s\n", e.msg);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int opt_float(const char *opt, const char *s, double lo, double hi, int lo_open, float *out) {
    qerr e;
    double v;
    if (parse_double_range(opt, s, lo, hi, lo_open, &v, &e)) {
        fprintf(stderr, "qlora-generate: %s\n", e.msg);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int main(int argc, char **argv) {
    const char *run = NULL, *prompt = NULL, *prompt_file = NULL, *system = NULL, *ids_arg = NULL, *base_path = NULL,
               *dump = NULL;
    int raw = 0, compare = 0, no_adapter = 0, load_in_4bit = -1, flag_4bit = -1, flag_8bit = -1, use_bf16 = -1;
    gen_opts o = {.max_new = 128, .temperature = 0.0f, .top_p = 1.0f, .top_k = 0, .seed = 42};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int hv = i + 1 < argc, bad = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
#define OPT(name) (!strcmp(a, name) && hv)
        if (OPT("--prompt")) prompt = argv[++i];
        else if (OPT("--prompt-file")) prompt_file = argv[++i];
        else if (OPT("--system")) system = argv[++i];
        else if (OPT("--ids")) ids_arg = argv[++i];
        else if (OPT("--base")) base_path = argv[++i];
        else if (OPT("--dump-logits")) dump = argv[++i];
        /* clamped to the model's context length once the model is known */
        else if (OPT("--max-new-tokens")) bad = opt_int(a, argv[++i], 1, INT32_MAX, &o.max_new);
        else if (OPT("--temperature")) bad = opt_float(a, argv[++i], 0, GEN_MAX_TEMPERATURE, 0, &o.temperature);
        else if (OPT("--top-p")) bad = opt_float(a, argv[++i], 0, 1, 1, &o.top_p);
        else if (OPT("--top-k")) bad = opt_int(a, argv[++i], 0, INT32_MAX, &o.top_k);
        else if (OPT("--seed")) {
            qerr e;
            if ((bad = parse_u64(a, argv[++i], &o.seed, &e))) fprintf(stderr, "qlora-generate: %s\n", e.msg);
        }
        else if (OPT("--load-in-4bit")) bad = opt_int(a, argv[++i], 0, 1, &flag_4bit);
        else if (OPT("--load-in-8bit")) bad = opt_int(a, argv[++i], 0, 1, &flag_8bit);
        else if (OPT("--bf16")) bad = opt_int(a, argv[++i], 0, 1, &use_bf16);
        else if (!strcmp(a, "--raw")) raw = 1;
        else if (!strcmp(a, "--compare")) compare = 1;
        else if (!strcmp(a, "--no-adapter")) no_adapter = 1;
        else if (a[0] == '-' || run) {
            fprintf(stderr, "qlora-generate: unexpected argument \"%s\"\n", a);
            usage(stderr);
            return 2;
        } else run = a;
#undef OPT
        if (bad) return 2;
    }
    if (!!prompt + !!prompt_file + !!ids_arg != 1) {
        fprintf(stderr, "qlora-generate: give exactly one of --prompt, --prompt-file, --ids\n");
        usage(stderr);
        return 2;
    }
    if (!run) no_adapter = 1;
    if (!run && !base_path) {
        fprintf(stderr, "qlora-generate: give RUN_DIR or --base PATH\n");
        return 2;
    }

    qerr e = {{0}};
    train_config c;
    int have_cfg = 0, dq = 1;
    char cfgp[4096], peek[1024];
    if (run) {
        snprintf(cfgp, sizeof cfgp, "%s/config.resolved.yaml", run);
        if (access(cfgp, R_OK) == 0) {
            if (train_config_load(cfgp, &c, &e)) {
                fprintf(stderr, "qlora-generate: %s\n", e.msg);
                return 2;
            }
            have_cfg = 1;
            if (!base_path) base_path = c.base_model;
            if (use_bf16 < 0) use_bf16 = c.bf16;
            dq = c.bnb_4bit_use_double_quant;
        }
        if (!base_path && adapter_peek_base(run, peek, sizeof peek) == 0) base_path = peek;
    }
    if (!base_path) {
        fprintf(stderr, "qlora-generate: no base model known for %s: give --base PATH\n", run);
        return 2;
    }
    if (train_config_base_choice(flag_4bit, flag_8bit, have_cfg ? &c : NULL, &load_in_4bit, &e)) {
        fprintf(stderr, "qlora-generate: %s\n", e.msg);
        if (have_cfg) train_config_free(&c);
        return 2;
    }
    if (use_bf16 < 0) use_bf16 = 1;

    int rc = 1;
    base_model *b = NULL;
    tokenizer *tok = NULL;
    llama_model m;
    lora_set ls;
    adapter_info info;
    ag_ctx ctx;
    tokenizer_ids ids = {0};
    char *text = NULL, *rendered = NULL;
    int have_model = 0;
    memset(&m, 0, sizeof m);
    memset(&ls, 0, sizeof ls);
    memset(&info, 0, sizeof info);
    memset(&ctx, 0, sizeof ctx);

    if (base_model_open(base_path, &b, &e)) goto fail;
    if (base_model_tokenizer(b, &tok, &e)) goto fail;
    if (ids_arg) {
        /* comma-separated ids, each one strict (core/parse.h) */
        for (const char *p = ids_arg;;) {
            const char *comma = strchr(p, ',');
            size_t len = comma ? (size_t)(comma - p) : strlen(p);
            char item[32];
            int64_t v;
            snprintf(item, sizeof item, "%.*s", (int)(len < sizeof item ? len : sizeof item - 1), p);
            if (len >= sizeof item ||
                parse_int_range("--ids", item, 0, (int64_t)tokenizer_n_vocab(tok) - 1, &v, &e)) {
                qerr_set(&e, "--ids: \"%.60s\" is not a comma-separated list of token ids < %d (at \"%.20s\")",
                         ids_arg, tokenizer_n_vocab(tok), p);
                goto fail;
            }
            if (tokenizer_ids_push(&ids, (int32_t)v, &e)) goto fail;
            if (!comma) break;
            p = comma + 1;
        }
    } else {
        if (prompt_file && !(text = file_read_all(prompt_file, NULL, &e))) {
            qerr_prefix(&e, "--prompt-file");
            goto fail;
        }
        const char *user = prompt ? prompt : text;
        const char *ptext = user;
        if (!raw) {
            if (chat_render_prompt(tok, system, user, &rendered, &e)) goto fail;
            ptext = rendered;
        }
        if (tokenizer_encode(tok, ptext, strlen(ptext), 1, &ids, &e)) goto fail;
    }
    if (ids.n == 0) {
        qerr_set(&e, "the prompt is empty");
        goto fail;
    }
    /* the KV cache and RoPE tables are sized by prompt + new tokens: never beyond the model's context */
    int ctx_len = base_model_hparams(b)->context_length;
    int window = base_model_hparams(b)->window_mask ? 0 : base_model_hparams(b)->sliding_window; /* a masked window
                                                                                                  * needs no bound */
    if (window > 0 && window < ctx_len) {
        /* beyond the window a sliding-window KV cache would be needed (not implemented): full attention there
         * would be another model */
        fprintf(stderr, "[generate] context bounded by the model's sliding_window of %d tokens\n", window);
        ctx_len = window;
    }
    if (ids.n > (size_t)ctx_len) {
        qerr_set(&e, "the prompt is %zu tokens, more than %s's context length of %d tokens", ids.n, base_path,
                 ctx_len);
        goto fail;
    }
    if (!dump && (int64_t)ids.n + o.max_new > ctx_len) {
        int fit = ctx_len - (int)ids.n;
        if (fit < 1) {
            qerr_set(&e, "the prompt is %zu tokens, the whole of %s's context length: no room for a new token",
                     ids.n, base_path);
            goto fail;
        }
        fprintf(stderr, "[generate] --max-new-tokens %d clamped to %d (context length %d less the %zu-token prompt)\n",
                o.max_new, fit, ctx_len, ids.n);
        o.max_new = fit;
    }
    int max_pos = (int)ids.n + (dump ? 0 : o.max_new) + 1;
    if (base_model_load(b, load_in_4bit, dq, max_pos, &m, &e)) goto fail;
    have_model = 1;
    if (!no_adapter && adapter_load_peft(run, &m.hp, &ls, &info, &e)) goto fail;
    if (ag_ctx_init(&ctx, (size_t)64 << 20, &e)) goto fail;
    ctx.bf16 = use_bf16;
    fprintf(stderr, "[generate] base %s (%s, %s GEMMs)%s%s\n", base_path,
            load_in_4bit == LLAMA_BASE_INT8 ? "int8" : load_in_4bit ? "NF4" : "bf16",
            use_bf16 ? "bf16" : "fp32", no_adapter ? "" : " + adapter ", no_adapter ? "" : run);

    if (dump) {
        if (dump_logits(&ctx, &m, no_adapter ? NULL : &ls, ids.ids, (int)ids.n, dump, &e)) goto fail;
        fprintf(stderr, "[generate] logits of %zu tokens written to %s\n", ids.n, dump);
    } else {
        if (compare && !no_adapter) {
            fprintf(stdout, "=== base model\n");
            fflush(stdout);
            if (generate(&ctx, &m, NULL, tok, ids.ids, (int)ids.n, &o, &e)) goto fail;
            fprintf(stdout, "=== base model + adapter\n");
            fflush(stdout);
        }
        if (generate(&ctx, &m, no_adapter ? NULL : &ls, tok, ids.ids, (int)ids.n, &o, &e)) goto fail;
    }
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "qlora-generate: %s\n", e.msg);
out:
    free(text);
    free(rendered);
    tokenizer_ids_free(&ids);
    ag_ctx_free(&ctx);
    lora_set_free(&ls);
    adapter_info_free(&info);
    if (have_model) llama_free(&m);
    tokenizer_free(tok);
    base_model_close(b);
    if (have_cfg) train_config_free(&c);
    gemm_shutdown();
    return rc;
}
