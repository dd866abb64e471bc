/* trainer/unfreeze.c — axolotl's unfrozen_parameters under an adapter (trainer/unfreeze.h). */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "trainer/unfreeze.h"

#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/strbuf.h"

/* LayerNamePattern._parse_pattern: a trailing "[start:end]" / "[index]" range
 * (re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")); returns the length of the name part. */
static size_t range_split(const char *p, int *has_range) {
    size_t n = strlen(p);
    *has_range = 0;
    if (n < 3 || p[n - 1] != ']') return n;
    const char *lb = strrchr(p, '[');
    if (!lb || lb == p) return n;
    int colons = 0;
    for (const char *q = lb + 1; q < p + n - 1; q++) {
        if (*q == ':') colons++;
        else if (*q < '0' || *q > '9') return n;
    }
    if (colons > 1) return n;
    *has_range = 1;
    return (size_t)(lb - p);
}

/* re.sub(r"\.(?!\+)", "\\.", name_pattern), compiled anchored (re.match). */
static pcre2_code *compile(const char *p, size_t n, qerr *e) {
    strbuf s = {0};
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '.' && !(i + 1 < n && p[i + 1] == '+')) strbuf_puts(&s, "\\.");
        else strbuf_put(&s, p + i, 1);
    }
    if (s.oom || !s.p) {
        free(s.p);
        qerr_set(e, s.oom ? "out of memory" : "unfrozen_parameters: an empty pattern");
        return NULL;
    }
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)s.p, s.n, PCRE2_ANCHORED | PCRE2_UTF, &err, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof msg);
        qerr_set(e, "unfrozen_parameters: \"%.80s\" is not a regular expression (as axolotl compiles it: \"%.80s\"): "
                    "%s at offset %zu", p, s.p, (const char *)msg, (size_t)off);
    }
    free(s.p);
    return re;
}

int unfreeze_pattern_check(const char *pattern, qerr *e) {
    int has_range;
    pcre2_code *re = compile(pattern, range_split(pattern, &has_range), e);
    if (!re) return -1;
    pcre2_code_free(re);
    return 0;
}

typedef struct nlist {
    char **v;
    unsigned char *tr;
    int n, cap, oom;
} nlist;

static void add(nlist *l, int trainable, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void add(nlist *l, int trainable, const char *fmt, ...) {
    if (l->oom) return;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 256;
        char **nv = realloc(l->v, (size_t)cap * sizeof *nv);
        if (nv) l->v = nv;
        unsigned char *nt = nv ? realloc(l->tr, (size_t)cap) : NULL;
        if (nt) l->tr = nt;
        if (!nv || !nt) {
            l->oom = 1;
            return;
        }
        l->cap = cap;
    }
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char *s = strdup(buf);
    if (!s) {
        l->oom = 1;
        return;
    }
    l->v[l->n] = s;
    l->tr[l->n++] = (unsigned char)trainable;
}

#define P "base_model.model."

int unfreeze_peft_names(const llama_hparams *hp, const int target[LLAMA_N_LINEAR], const int save[LORA_N_SAVE],
                        char ***names, unsigned char **trainable, int *n, qerr *e) {
    nlist l = {0};
    const llama_linear_name *lin = llama_hparams_linears(hp);
    /* PEFT ModulesToSaveWrapper: original_module (frozen) and modules_to_save.default (trained) */
    if (save[LORA_SAVE_EMBED]) {
        add(&l, 0, P "model.embed_tokens.original_module.weight");
        add(&l, 1, P "model.embed_tokens.modules_to_save.default.weight");
    } else {
        add(&l, 0, P "model.embed_tokens.weight");
    }
    for (int i = 0; i < hp->n_layer; i++) {
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            if (!lin[k].peft) continue;
            const char *par = lin[k].parent, *mod = lin[k].peft;
            int bias = hp->qkv_bias && (k == LLAMA_Q || k == LLAMA_K || k == LLAMA_V);
            if (target[k]) {
                add(&l, 0, P "model.layers.%d.%s.%s.base_layer.weight", i, par, mod);
                if (bias) add(&l, 0, P "model.layers.%d.%s.%s.base_layer.bias", i, par, mod);
                add(&l, 1, P "model.layers.%d.%s.%s.lora_A.default.weight", i, par, mod);
                add(&l, 1, P "model.layers.%d.%s.%s.lora_B.default.weight", i, par, mod);
            } else {
                add(&l, 0, P "model.layers.%d.%s.%s.weight", i, par, mod);
                if (bias) add(&l, 0, P "model.layers.%d.%s.%s.bias", i, par, mod);
            }
            if (k == LLAMA_O && hp->qk_norm) { /* Gemma3Attention: q_norm, k_norm after o_proj */
                add(&l, 0, P "model.layers.%d.self_attn.q_norm.weight", i);
                add(&l, 0, P "model.layers.%d.self_attn.k_norm.weight", i);
            }
        }
        add(&l, 0, P "model.layers.%d.input_layernorm.weight", i);
        add(&l, 0, P "model.layers.%d.post_attention_layernorm.weight", i);
        if (hp->post_norms) { /* Gemma3DecoderLayer */
            add(&l, 0, P "model.layers.%d.pre_feedforward_layernorm.weight", i);
            add(&l, 0, P "model.layers.%d.post_feedforward_layernorm.weight", i);
        }
    }
    add(&l, 0, P "model.norm.weight");
    if (save[LORA_SAVE_LM_HEAD]) {
        if (!hp->tied_embeddings) add(&l, 0, P "lm_head.original_module.weight"); /* tied: embed_tokens' own */
        add(&l, 1, P "lm_head.modules_to_save.default.weight");
    } else if (!hp->tied_embeddings) {
        add(&l, 0, P "lm_head.weight"); /* tied: the same Parameter as embed_tokens, listed once */
    }
    if (l.oom) {
        for (int i = 0; i < l.n; i++) free(l.v[i]);
        free(l.v);
        free(l.tr);
        return qerr_set(e, "out of memory");
    }
    *names = l.v;
    *trainable = l.tr;
    *n = l.n;
    return 0;
}

/* "a, b, c and N more" of the names with flag[i] == want && match[i] == m. */
static void list_names(char *const *names, const unsigned char *flag, const unsigned char *match, int n, int want, int m,
                       char *out, size_t cap, int *count) {
    size_t k = 0;
    int c = 0;
    out[0] = 0;
    for (int i = 0; i < n; i++) {
        if (flag[i] != want || match[i] != m) continue;
        if (c < 3 && k < cap) k += (size_t)snprintf(out + k, cap - k, "%s%s", c ? ", " : "", names[i]);
        c++;
    }
    if (c > 3 && k < cap) snprintf(out + k, cap - k, " and %d more", c - 3);
    *count = c;
}

int unfreeze_match(char *const *patterns, int n_patterns, char *const *names, int n, unsigned char *match, qerr *e) {
    memset(match, 0, (size_t)n);
    for (int p = 0; p < n_patterns; p++) {
        int has_range;
        size_t len = range_split(patterns[p], &has_range);
        if (has_range)
            return qerr_set(e, "unfrozen_parameters: \"%.80s\": a row range (axolotl zeroes the gradient outside it "
                               "with a hook) is not implemented", patterns[p]);
        pcre2_code *re = compile(patterns[p], len, e);
        if (!re) return -1;
        pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
        if (!md) {
            pcre2_code_free(re);
            return qerr_set(e, "out of memory");
        }
        for (int i = 0; i < n; i++)
            if (pcre2_match(re, (PCRE2_SPTR)names[i], PCRE2_ZERO_TERMINATED, 0, PCRE2_ANCHORED, md, NULL) >= 0)
                match[i] = 1;
        pcre2_match_data_free(md);
        pcre2_code_free(re);
    }
    return 0;
}

int unfreeze_decide(char *const *patterns, int n_patterns, const llama_hparams *hp, const int target[LLAMA_N_LINEAR],
                    const int save[LORA_N_SAVE], char *note, size_t note_len, qerr *e) {
    note[0] = 0;
    char **names;
    unsigned char *tr;
    int n;
    if (unfreeze_peft_names(hp, target, save, &names, &tr, &n, e)) return -1;
    unsigned char *match = calloc((size_t)n + 1, 1);
    int rc = match ? unfreeze_match(patterns, n_patterns, names, n, match, e) : qerr_set(e, "out of memory");
    int n_match = 0, n_tr = 0;
    for (int i = 0; i < n; i++) n_tr += tr[i];
    for (int i = 0; i < n && !rc; i++) n_match += match[i];
    if (!rc) {
        char base[600], left[600];
        int n_base, n_left;
        list_names(names, tr, match, n, 0, 1, base, sizeof base, &n_base);
        list_names(names, tr, match, n, 1, 0, left, sizeof left, &n_left);
        if (n_match == 0) {
            snprintf(note, note_len,
                     "unfrozen_parameters: under an adapter axolotl 0.19.0 matches these patterns against the PEFT "
                     "model's names (\"%s\", ...), after PEFT has wrapped it; none of its %d parameters matches, so "
                     "axolotl would freeze every one, the %d LoRA weights too, and train nothing (its warning \"All "
                     "parameters are frozen. Model will not be trained.\"). The patterns name the unwrapped model "
                     "(the examples' comment: freeze a vision tower, which this text model does not have); qlora "
                     "trains the LoRA adapters the adapter keys ask for", names[n > 1 ? 1 : 0], n, n_tr);
        } else if (n_base == 0 && n_left == 0) {
            snprintf(note, note_len,
                     "unfrozen_parameters: the patterns match exactly the %d parameters qlora trains (the LoRA "
                     "weights%s) among the PEFT model's %d names; axolotl freezes all others, which are frozen here "
                     "too: nothing changes", n_tr, save[0] || save[1] ? " and the modules_to_save copies" : "", n);
        } else if (n_base) {
            rc = qerr_set(e, "unfrozen_parameters: refused: the patterns match %d base parameter%s of the PEFT model "
                             "(%s), which axolotl would train in full; training base weights is not implemented "
                             "(LoRA adapters only; lora_modules_to_save: [embed_tokens, lm_head] trains copies of "
                             "those two, as PEFT's modules_to_save)", n_base, n_base > 1 ? "s" : "", base);
        } else {
            rc = qerr_set(e, "unfrozen_parameters: refused: the patterns leave %d of the %d trained parameters "
                             "unmatched (%s), which axolotl would freeze; freezing some adapters is not implemented "
                             "(lora_target_modules chooses the linears)", n_left, n_tr, left);
        }
    }
    free(match);
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    free(tr);
    return rc;
}
