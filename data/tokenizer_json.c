/* data/tokenizer_json.c — tokenizer.json <-> GGUF tokenizer metadata (see
 * tokenizer_json.h). Structures as the `tokenizers` library serializes them
 * (pre_tokenizers/{sequence,digits,byte_level,split}.rs, models/bpe/
 * serialization.rs, processors/template.rs, tokenizer/added_vocabulary.rs);
 * the SmolLM2 layout is the one scripts/make_tokenizer_fixtures.py builds as
 * the tokenizer oracle.
 */
#include "data/tokenizer_json.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/file.h"
#include "format/gguf_write.h"

/* Llama 3's pre-tokenizer regex as tokenizer.json spells it. */
static const char LLAMA3_REGEX[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Qwen2's, as transformers' Qwen2Tokenizer (PRETOKENIZE_REGEX) and Qwen2's tokenizer.json spell it. */
static const char QWEN2_REGEX[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

typedef enum pre_kind { PRE_GPT2, PRE_SMOLLM, PRE_LLAMA3, PRE_QWEN2 } pre_kind;

static int pre_from_name(const char *s, size_t n, pre_kind *out) {
    char name[64];
    snprintf(name, sizeof name, "%.*s", (int)(n < 63 ? n : 63), s);
    if (!strcmp(name, "smollm") || !strcmp(name, "starcoder") || !strcmp(name, "refact")) *out = PRE_SMOLLM;
    else if (!strcmp(name, "gpt2") || !strcmp(name, "default") || !strcmp(name, "gpt-2")) *out = PRE_GPT2;
    else if (!strcmp(name, "llama-bpe") || !strcmp(name, "llama3") || !strcmp(name, "llama-v3")) *out = PRE_LLAMA3;
    else if (!strcmp(name, "qwen2")) *out = PRE_QWEN2;
    else return -1;
    return 0;
}

static cJSON *byte_level(int add_prefix_space, int trim_offsets, int use_regex) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", "ByteLevel");
    cJSON_AddBoolToObject(o, "add_prefix_space", add_prefix_space);
    cJSON_AddBoolToObject(o, "trim_offsets", trim_offsets);
    cJSON_AddBoolToObject(o, "use_regex", use_regex);
    return o;
}

static cJSON *pre_tokenizer_json(pre_kind k) {
    if (k == PRE_GPT2) return byte_level(0, 1, 1);
    cJSON *seq = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    cJSON_AddStringToObject(seq, "type", "Sequence");
    cJSON_AddItemToObject(seq, "pretokenizers", arr);
    if (k == PRE_SMOLLM) {
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "type", "Digits");
        cJSON_AddTrueToObject(d, "individual_digits");
        cJSON_AddItemToArray(arr, d);
        cJSON_AddItemToArray(arr, byte_level(0, 1, 1));
    } else {
        cJSON *s = cJSON_CreateObject(), *pat = cJSON_CreateObject();
        cJSON_AddStringToObject(s, "type", "Split");
        cJSON_AddStringToObject(pat, "Regex", k == PRE_QWEN2 ? QWEN2_REGEX : LLAMA3_REGEX);
        cJSON_AddItemToObject(s, "pattern", pat);
        cJSON_AddStringToObject(s, "behavior", "Isolated");
        cJSON_AddFalseToObject(s, "invert");
        cJSON_AddItemToArray(arr, s);
        cJSON_AddItemToArray(arr, byte_level(0, 1, 0));
    }
    return seq;
}

static cJSON *special_piece(const char *tok) {
    cJSON *o = cJSON_CreateObject(), *st = cJSON_CreateObject();
    cJSON_AddStringToObject(st, "id", tok);
    cJSON_AddNumberToObject(st, "type_id", 0);
    cJSON_AddItemToObject(o, "SpecialToken", st);
    return o;
}

static cJSON *seq_piece(const char *id, int type_id) {
    cJSON *o = cJSON_CreateObject(), *st = cJSON_CreateObject();
    cJSON_AddStringToObject(st, "id", id);
    cJSON_AddNumberToObject(st, "type_id", type_id);
    cJSON_AddItemToObject(o, "Sequence", st);
    return o;
}

/* TemplateProcessing that prepends bos ("$A" -> "bos $A", pairs "bos $A bos $B"),
 * as Llama 3's tokenizer.json has it. */
static cJSON *bos_template(const char *bos, int32_t bos_id) {
    cJSON *o = cJSON_CreateObject(), *single = cJSON_CreateArray(), *pair = cJSON_CreateArray(),
          *sp = cJSON_CreateObject(), *ent = cJSON_CreateObject(), *ids = cJSON_CreateArray(),
          *toks = cJSON_CreateArray();
    cJSON_AddStringToObject(o, "type", "TemplateProcessing");
    cJSON_AddItemToArray(single, special_piece(bos));
    cJSON_AddItemToArray(single, seq_piece("A", 0));
    cJSON_AddItemToArray(pair, special_piece(bos));
    cJSON_AddItemToArray(pair, seq_piece("A", 0));
    cJSON_AddItemToArray(pair, special_piece(bos));
    cJSON_AddItemToArray(pair, seq_piece("B", 1));
    cJSON_AddItemToObject(o, "single", single);
    cJSON_AddItemToObject(o, "pair", pair);
    cJSON_AddStringToObject(ent, "id", bos);
    cJSON_AddItemToArray(ids, cJSON_CreateNumber(bos_id));
    cJSON_AddItemToArray(toks, cJSON_CreateString(bos));
    cJSON_AddItemToObject(ent, "ids", ids);
    cJSON_AddItemToObject(ent, "tokens", toks);
    cJSON_AddItemToObject(sp, bos, ent);
    cJSON_AddItemToObject(o, "special_tokens", sp);
    return o;
}

/* A set of strings (open addressing) to keep the first id of a duplicated
 * token text, as HF's vocab map does, without a quadratic lookup. */
typedef struct str_set {
    char **slot;
    uint64_t mask;
} str_set;

static uint64_t str_hash(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* 1 if s was new (and is now in the set, owned by it), 0 if present, -1 on OOM. */
static int str_set_add(str_set *st, const char *s) {
    uint64_t i = str_hash(s) & st->mask;
    while (st->slot[i]) {
        if (!strcmp(st->slot[i], s)) return 0;
        i = (i + 1) & st->mask;
    }
    return (st->slot[i] = strdup(s)) ? 1 : -1;
}

static char *dupn(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

static cJSON *typed(const char *type) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "type", type);
    return o;
}

static cJSON *replace_obj(const char *from, const char *to) {
    cJSON *o = typed("Replace"), *pat = cJSON_CreateObject();
    cJSON_AddStringToObject(pat, "String", from);
    cJSON_AddItemToObject(o, "pattern", pat);
    cJSON_AddStringToObject(o, "content", to);
    return o;
}

#define SPM_SPACE "\xe2\x96\x81" /* U+2581, sentencepiece's escaped space */

/* Llama 2's tokenizer.json normalizer: Sequence[Prepend(U+2581), Replace(" ", U+2581)]. */
static cJSON *spm_normalizer(int add_space_prefix) {
    cJSON *seq = typed("Sequence"), *arr = cJSON_CreateArray();
    if (add_space_prefix) {
        cJSON *p = typed("Prepend");
        cJSON_AddStringToObject(p, "prepend", SPM_SPACE);
        cJSON_AddItemToArray(arr, p);
    }
    cJSON_AddItemToArray(arr, replace_obj(" ", SPM_SPACE));
    cJSON_AddItemToObject(seq, "normalizers", arr);
    return seq;
}

/* Llama 2's decoder: Sequence[Replace(U+2581, " "), ByteFallback, Fuse, Strip(" ", 1, 0)]. */
static cJSON *spm_decoder(int add_space_prefix) {
    cJSON *seq = typed("Sequence"), *arr = cJSON_CreateArray();
    cJSON_AddItemToArray(arr, replace_obj(SPM_SPACE, " "));
    cJSON_AddItemToArray(arr, typed("ByteFallback"));
    cJSON_AddItemToArray(arr, typed("Fuse"));
    if (add_space_prefix) {
        cJSON *st = typed("Strip");
        cJSON_AddStringToObject(st, "content", " ");
        cJSON_AddNumberToObject(st, "start", 1);
        cJSON_AddNumberToObject(st, "stop", 0);
        cJSON_AddItemToArray(arr, st);
    }
    cJSON_AddItemToObject(seq, "decoders", arr);
    return seq;
}

int tokenizer_json_write_from_gguf(const gguf_file *f, const char *path, qerr *e) {
    const char *s;
    size_t n;
    if (gguf_get_str(f, "tokenizer.ggml.model", &s, &n, e)) return -1;
    int spm = n == 5 && !memcmp(s, "llama", 5);
    if (!spm && (n != 4 || memcmp(s, "gpt2", 4)))
        return qerr_set(e, "tokenizer.json: tokenizer.ggml.model \"%.*s\" is neither byte-level BPE (\"gpt2\") nor "
                           "SentencePiece BPE (\"llama\"); not supported",
                        (int)(n > 64 ? 64 : n), s);
    pre_kind pk = PRE_GPT2;
    if (!spm && gguf_has_key(f, "tokenizer.ggml.pre")) {
        if (gguf_get_str(f, "tokenizer.ggml.pre", &s, &n, e)) return -1;
        if (pre_from_name(s, n, &pk))
            return qerr_set(e, "tokenizer.json: tokenizer.ggml.pre \"%.*s\" has no tokenizer.json equivalent here",
                            (int)(n > 64 ? 64 : n), s);
    }
    /* the tokenizer itself: it validates the metadata and, for SentencePiece, derives the merges */
    tokenizer *tk = NULL;
    if (tokenizer_load_gguf(f, &tk, e)) return -1;
    int asp = tokenizer_add_space_prefix(tk);
    const int32_t *dml, *dmr;
    int64_t ndm = tokenizer_derived_merges(tk, &dml, &dmr);
    gguf_vtype et;
    uint64_t nv, nm = 0;
    if (gguf_get_arr_info(f, "tokenizer.ggml.tokens", &et, &nv, e)) return -1;
    const void *types = NULL;
    if (gguf_has_key(f, "tokenizer.ggml.token_type") && gguf_get_arr_data(f, "tokenizer.ggml.token_type", &types, e))
        return -1;
    if (gguf_has_key(f, "tokenizer.ggml.merges") && gguf_get_arr_info(f, "tokenizer.ggml.merges", &et, &nm, e))
        return -1;
    int add_bos = 0;
    if (gguf_has_key(f, "tokenizer.ggml.add_bos_token") && gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &add_bos, e))
        return -1;
    uint32_t bos_id = 0;
    if (add_bos && gguf_get_u32(f, "tokenizer.ggml.bos_token_id", &bos_id, e)) return -1;

    cJSON *root = cJSON_CreateObject(), *added = cJSON_CreateArray(), *model = cJSON_CreateObject(),
          *vocab = cJSON_CreateObject(), *merges = cJSON_CreateArray();
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON_AddNullToObject(root, "truncation");
    cJSON_AddNullToObject(root, "padding");
    cJSON_AddItemToObject(root, "added_tokens", added);
    if (spm) cJSON_AddItemToObject(root, "normalizer", spm_normalizer(asp));
    else if (pk == PRE_QWEN2) cJSON_AddItemToObject(root, "normalizer", typed("NFC"));
    else cJSON_AddNullToObject(root, "normalizer");
    if (spm) cJSON_AddNullToObject(root, "pre_tokenizer");
    else cJSON_AddItemToObject(root, "pre_tokenizer", pre_tokenizer_json(pk));
    int rc = -1;
    char *bos_text = NULL;
    str_set seen = {0};
    uint64_t cap = 16;
    while (cap < 2 * nv) cap *= 2;
    seen.mask = cap - 1;
    if (!(seen.slot = calloc(cap, sizeof *seen.slot))) {
        qerr_set(e, "out of memory");
        goto done;
    }
    for (uint64_t i = 0; i < nv; i++) {
        if (gguf_get_arr_str(f, "tokenizer.ggml.tokens", i, &s, &n, e)) goto done;
        char *tok = dupn(s, n);
        if (!tok) {
            qerr_set(e, "out of memory");
            goto done;
        }
        int32_t ty = 1;
        if (types) memcpy(&ty, (const uint8_t *)types + 4 * i, 4);
        if (spm && ty == TOKENIZER_TOKEN_UNKNOWN) ty = TOKENIZER_TOKEN_CONTROL; /* <unk>: special, as in Llama 2's */
        if (ty == TOKENIZER_TOKEN_CONTROL || ty == TOKENIZER_TOKEN_USER_DEFINED) {
            cJSON *a = cJSON_CreateObject();
            cJSON_AddNumberToObject(a, "id", (double)i);
            cJSON_AddStringToObject(a, "content", tok);
            cJSON_AddFalseToObject(a, "single_word");
            int strip = tokenizer_token_strip(tk, (int32_t)i);
            cJSON_AddBoolToObject(a, "lstrip", strip & 1);
            cJSON_AddBoolToObject(a, "rstrip", (strip & 2) != 0);
            /* matched on the raw text, before any normalizer (qlora's and llama.cpp's semantics; transformers'
             * GGUF loader adds user-defined tokens with normalized=False too) */
            cJSON_AddFalseToObject(a, "normalized");
            cJSON_AddBoolToObject(a, "special", ty == TOKENIZER_TOKEN_CONTROL);
            cJSON_AddItemToArray(added, a);
        }
        if (add_bos && i == bos_id) bos_text = strdup(tok);
        int fresh = str_set_add(&seen, tok);
        if (fresh > 0) cJSON_AddNumberToObject(vocab, tok, (double)i);
        free(tok);
        if (fresh < 0) {
            qerr_set(e, "out of memory");
            goto done;
        }
    }
    if (add_bos && bos_text) cJSON_AddItemToObject(root, "post_processor", bos_template(bos_text, (int32_t)bos_id));
    else cJSON_AddNullToObject(root, "post_processor");
    cJSON_AddItemToObject(root, "decoder", spm ? spm_decoder(asp) : byte_level(1, 1, 1));
    cJSON_AddItemToObject(root, "model", model);
    model = NULL;
    cJSON *mo = cJSON_GetObjectItemCaseSensitive(root, "model");
    cJSON_AddStringToObject(mo, "type", "BPE");
    cJSON_AddNullToObject(mo, "dropout");
    int32_t unk = tokenizer_unk_id(tk);
    if (spm && unk >= 0) cJSON_AddStringToObject(mo, "unk_token", tokenizer_token_text(tk, unk));
    else cJSON_AddNullToObject(mo, "unk_token");
    cJSON_AddNullToObject(mo, "continuing_subword_prefix");
    cJSON_AddNullToObject(mo, "end_of_word_suffix");
    cJSON_AddBoolToObject(mo, "fuse_unk", spm);
    cJSON_AddBoolToObject(mo, "byte_fallback", spm);
    cJSON_AddBoolToObject(mo, "ignore_merges", pk == PRE_LLAMA3);
    cJSON_AddItemToObject(mo, "vocab", vocab);
    vocab = NULL;
    for (int64_t i = 0; i < ndm; i++) { /* SentencePiece: the merges its scores imply */
        cJSON *pair = cJSON_CreateArray();
        cJSON_AddItemToArray(pair, cJSON_CreateString(tokenizer_token_text(tk, dml[i])));
        cJSON_AddItemToArray(pair, cJSON_CreateString(tokenizer_token_text(tk, dmr[i])));
        cJSON_AddItemToArray(merges, pair);
    }
    for (uint64_t i = 0; i < nm; i++) {
        if (gguf_get_arr_str(f, "tokenizer.ggml.merges", i, &s, &n, e)) goto done;
        char *m = dupn(s, n);
        if (!m) {
            qerr_set(e, "out of memory");
            goto done;
        }
        cJSON_AddItemToArray(merges, cJSON_CreateString(m));
        free(m);
    }
    cJSON_AddItemToObject(mo, "merges", merges);
    merges = NULL;
    char *text = cJSON_PrintUnformatted(root);
    if (!text) {
        qerr_set(e, "out of memory printing %s", path);
        goto done;
    }
    rc = file_write_atomic(path, text, strlen(text), e);
    free(text);
done:
    tokenizer_free(tk);
    free(bos_text);
    if (seen.slot)
        for (uint64_t i = 0; i <= seen.mask; i++) free(seen.slot[i]);
    free(seen.slot);
    cJSON_Delete(model);
    cJSON_Delete(vocab);
    cJSON_Delete(merges);
    cJSON_Delete(root);
    return rc;
}

/* ------------------------------------------------------------------ loading */

static const char *json_type_name(const cJSON *o);

static int is_type(const cJSON *o, const char *type) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(t) && !strcmp(t->valuestring, type);
}

static int flag(const cJSON *o, const char *key, int def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return v ? cJSON_IsTrue(v) : def;
}

/* The pre-tokenizer structure -> llama.cpp's pre name, or NULL. */
static const char *detect_pre(const cJSON *pre) {
    if (!pre || cJSON_IsNull(pre)) return NULL;
    if (is_type(pre, "ByteLevel")) return flag(pre, "use_regex", 1) ? "gpt2" : NULL;
    if (!is_type(pre, "Sequence")) return NULL;
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) != 2) return NULL;
    const cJSON *a = cJSON_GetArrayItem(arr, 0), *b = cJSON_GetArrayItem(arr, 1);
    if (is_type(a, "Digits") && flag(a, "individual_digits", 0) && is_type(b, "ByteLevel") && flag(b, "use_regex", 1))
        return "smollm";
    if (is_type(a, "Split") && is_type(b, "ByteLevel") && !flag(b, "use_regex", 1)) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(a, "pattern");
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(a, "behavior");
        int iso = cJSON_IsString(beh) && !strcmp(beh->valuestring, "Isolated") && !flag(a, "invert", 0);
        if (iso && cJSON_IsString(re) && !strcmp(re->valuestring, LLAMA3_REGEX)) return "llama-bpe";
        if (iso && cJSON_IsString(re) && !strcmp(re->valuestring, QWEN2_REGEX)) return "qwen2";
    }
    return NULL;
}

/* A tokenizer.json component's "type" for messages ("null" when absent). */
static const char *json_type_name(const cJSON *o) {
    if (!o || cJSON_IsNull(o)) return "null";
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(t) ? t->valuestring : "(no type)";
}

static int is_replace(const cJSON *o, const char *from, const char *to) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(o, "pattern");
    const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(o, "content");
    return is_type(o, "Replace") && cJSON_IsString(str) && !strcmp(str->valuestring, from) && cJSON_IsString(ct) &&
           !strcmp(ct->valuestring, to);
}

/* The two SentencePiece layouts of tokenizer.json (tokenizers normalizers/prepend.rs, replace.rs,
 * pre_tokenizers/metaspace.rs):
 *   legacy: normalizer Sequence[Prepend(U+2581)?, Replace(" ", U+2581)], no pre-tokenizer: every segment
 *           between added tokens gets the prefix (*scheme NULL = "legacy");
 *   Metaspace(replacement U+2581, split false, prepend_scheme always|first|never), no normalizer: the
 *           prefix only where the segment does not start with a space, and for "first" only at the start
 *           of the text. Older files say add_prefix_space instead of prepend_scheme (= "always").
 * Returns -1 for anything else. */
static int spm_shape(const cJSON *norm, const cJSON *pre, int *asp, const char **scheme) {
    *asp = 0;
    *scheme = NULL;
    if (norm && !cJSON_IsNull(norm)) {
        if (pre && !cJSON_IsNull(pre)) return -1;
        if (!is_type(norm, "Sequence")) return -1;
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(norm, "normalizers");
        int k = cJSON_GetArraySize(arr);
        if (k == 2) {
            const cJSON *p = cJSON_GetArrayItem(arr, 0);
            const cJSON *pp = cJSON_GetObjectItemCaseSensitive(p, "prepend");
            if (!is_type(p, "Prepend") || !cJSON_IsString(pp) || strcmp(pp->valuestring, SPM_SPACE)) return -1;
            *asp = 1;
        } else if (k != 1) {
            return -1;
        }
        return is_replace(cJSON_GetArrayItem(arr, k - 1), " ", SPM_SPACE) ? 0 : -1;
    }
    if (!is_type(pre, "Metaspace")) return -1;
    const cJSON *rep = cJSON_GetObjectItemCaseSensitive(pre, "replacement");
    if (!cJSON_IsString(rep) || strcmp(rep->valuestring, SPM_SPACE) || flag(pre, "split", 1)) return -1;
    const cJSON *ps = cJSON_GetObjectItemCaseSensitive(pre, "prepend_scheme");
    if (cJSON_IsString(ps)) {
        if (!strcmp(ps->valuestring, "first")) *scheme = "first";
        else if (!strcmp(ps->valuestring, "always")) *scheme = "always";
        else if (strcmp(ps->valuestring, "never")) return -1;
        *asp = *scheme != NULL;
    } else {
        *asp = flag(pre, "add_prefix_space", 1);
        *scheme = *asp ? "always" : NULL;
    }
    return 0;
}

/* tokenizer_config.json special token: a string or an AddedToken dict. */
static const char *special_text(const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsString(v)) return v->valuestring;
    if (cJSON_IsObject(v)) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (cJSON_IsString(c)) return c->valuestring;
    }
    return NULL;
}

/* bos prepended by a TemplateProcessing post-processor (Llama 3), or NULL. */
static const char *template_bos(const cJSON *pp) {
    if (!pp) return NULL;
    if (is_type(pp, "Sequence")) {
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(pp, "processors")) {
            const char *b = template_bos(it);
            if (b) return b;
        }
        return NULL;
    }
    if (!is_type(pp, "TemplateProcessing")) return NULL;
    const cJSON *first = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(pp, "single"), 0);
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(first, "SpecialToken");
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(st, "id");
    return cJSON_IsString(id) ? id->valuestring : NULL;
}

int tokenizer_load_hf(const char *json_path, const char *config_path, tokenizer **out, qerr *e) {
    *out = NULL;
    gguf_file *g;
    if (tokenizer_hf_to_gguf(json_path, config_path, &g, e)) return -1;
    int rc = tokenizer_load_gguf(g, out, e);
    if (rc) qerr_prefix(e, "%s", json_path);
    gguf_close(g);
    return rc;
}

int tokenizer_hf_to_gguf(const char *json_path, const char *config_path, gguf_file **out, qerr *e) {
    *out = NULL;
    cJSON *tj = file_read_json_object(json_path, e), *cfg = NULL;
    if (!tj) return -1;
    if (config_path && !(cfg = file_read_json_object(config_path, e))) {
        cJSON_Delete(tj);
        return -1;
    }
    int rc = -1, fd = -1;
    char **toks = NULL, **merges = NULL, *tmpl_file = NULL;
    int32_t *types = NULL;
    int64_t nv = 0, nm = 0;
    gguf_writer *w = NULL;
    gguf_file *gf = NULL;

    const cJSON *model = cJSON_GetObjectItemCaseSensitive(tj, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *mj = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(model) || !is_type(model, "BPE") || !cJSON_IsObject(vocab) || !cJSON_IsArray(mj)) {
        qerr_set(e, "%s: model.type is %s; only BPE with vocab and merges is supported (WordPiece, Unigram and "
                    "WordLevel are not)",
                 json_path, json_type_name(model));
        goto done;
    }
    int spm = flag(model, "byte_fallback", 0);
    const char *pre = NULL, *scheme = NULL;
    int nfc = 0, asp = 0;
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(tj, "normalizer");
    const cJSON *prej = cJSON_GetObjectItemCaseSensitive(tj, "pre_tokenizer");
    if (spm) {
        /* SentencePiece-style BPE: Llama 2 / Mistral v0.1 / Phi-3 (legacy normalizer) or transformers 5 /
         * Mistral v0.3 (Metaspace pre-tokenizer) */
        pre = "default";
        if (flag(model, "ignore_merges", 0)) {
            qerr_set(e, "%s: model.ignore_merges = true with byte_fallback is not supported", json_path);
            goto done;
        }
        if (!flag(model, "fuse_unk", 0)) {
            qerr_set(e, "%s: model.fuse_unk = false with byte_fallback is not supported (SentencePiece fuses)",
                     json_path);
            goto done;
        }
        if (spm_shape(norm, prej, &asp, &scheme)) {
            qerr_set(e, "%s: normalizer %s with pre_tokenizer %s is not supported for byte_fallback BPE (supported: "
                        "Sequence[Prepend(U+2581), Replace(\" \", U+2581)] with no pre_tokenizer, or no normalizer with "
                        "Metaspace(U+2581, split false)",
                     json_path, json_type_name(norm), json_type_name(prej));
            goto done;
        }
    } else {
        if (norm && !cJSON_IsNull(norm)) {
            if (!is_type(norm, "NFC")) {
                qerr_set(e, "%s: normalizer %s is not supported for byte-level BPE (supported: none, NFC)", json_path,
                         json_type_name(norm));
                goto done;
            }
            nfc = 1;
        }
        pre = detect_pre(prej);
        if (!pre) {
            qerr_set(e, "%s: pre_tokenizer %s not supported (supported: ByteLevel; Digits+ByteLevel as SmolLM; "
                        "Split(Llama 3 regex)+ByteLevel as Llama 3; Split(Qwen2 regex)+ByteLevel as Qwen2)",
                     json_path, json_type_name(prej));
            goto done;
        }
        if (flag(model, "ignore_merges", 0) != !strcmp(pre, "llama-bpe")) {
            qerr_set(e, "%s: model.ignore_merges does not match the pre-tokenizer (%s)", json_path, pre);
            goto done;
        }
    }
    for (const char *const *k = (const char *const[]){"dropout", "continuing_subword_prefix", "end_of_word_suffix", NULL};
         *k; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, *k);
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0])) {
            qerr_set(e, "%s: model.%s is set; not supported", json_path, *k);
            goto done;
        }
    }

    /* vocabulary: model.vocab plus added_tokens (which may extend it) */
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > 1e8) {
            qerr_set(e, "%s: vocab[\"%s\"] is not a token id", json_path, it->string);
            goto done;
        }
        if ((int64_t)it->valuedouble + 1 > nv) nv = (int64_t)it->valuedouble + 1;
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(tj, "added_tokens");
    cJSON_ArrayForEach(it, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > 1e8 || !cJSON_IsString(ct)) {
            qerr_set(e, "%s: added_tokens entry without id/content", json_path);
            goto done;
        }
        if (flag(it, "single_word", 0)) {
            qerr_set(e, "%s: added token \"%s\" has single_word = true; not supported", json_path, ct->valuestring);
            goto done;
        }
        /* HF matches a normalized added token after the normalizer ran, so with the legacy Prepend normalizer
         * the text after it gets no U+2581 prefix; qlora splits every added token first: refuse that case */
        if (spm && !scheme && asp && flag(it, "normalized", !flag(it, "special", 0))) {
            qerr_set(e, "%s: added token \"%s\" has normalized = true with the Prepend normalizer; not supported",
                     json_path, ct->valuestring);
            goto done;
        }
        if ((int64_t)id->valuedouble + 1 > nv) nv = (int64_t)id->valuedouble + 1;
    }
    toks = calloc((size_t)nv, sizeof *toks);
    types = calloc((size_t)nv, sizeof *types);
    if (!toks || !types) {
        qerr_set(e, "out of memory");
        goto done;
    }
    cJSON_ArrayForEach(it, vocab) {
        int64_t id = (int64_t)it->valuedouble;
        if (toks[id]) continue;
        toks[id] = it->string;
        types[id] = TOKENIZER_TOKEN_NORMAL;
    }
    cJSON_ArrayForEach(it, added) {
        int64_t id = (int64_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        toks[id] = cJSON_GetObjectItemCaseSensitive(it, "content")->valuestring;
        types[id] = flag(it, "special", 0) ? TOKENIZER_TOKEN_CONTROL : TOKENIZER_TOKEN_USER_DEFINED;
    }
    /* ids nobody uses (holes) get unmatchable placeholders, as convert_hf_to_gguf's [PADi] */
    char **holes = calloc((size_t)nv, sizeof *holes);
    if (!holes) {
        qerr_set(e, "out of memory");
        goto done;
    }
    for (int64_t i = 0; i < nv; i++)
        if (!toks[i]) {
            char b[32];
            snprintf(b, sizeof b, "[PAD%lld]", (long long)i);
            toks[i] = holes[i] = strdup(b);
            types[i] = TOKENIZER_TOKEN_UNUSED;
        }

    nm = cJSON_GetArraySize(mj);
    merges = calloc((size_t)nm + 1, sizeof *merges);
    if (!merges) {
        qerr_set(e, "out of memory");
        goto done_holes;
    }
    int64_t k = 0;
    cJSON_ArrayForEach(it, mj) {
        if (cJSON_IsString(it)) {
            merges[k++] = strdup(it->valuestring);
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            const char *a = cJSON_GetArrayItem(it, 0)->valuestring, *b = cJSON_GetArrayItem(it, 1)->valuestring;
            size_t n = strlen(a) + strlen(b) + 2;
            if ((merges[k] = malloc(n))) snprintf(merges[k], n, "%s %s", a, b);
            k++;
        } else {
            qerr_set(e, "%s: merges[%lld] is neither \"a b\" nor [\"a\", \"b\"]", json_path, (long long)k);
            goto done_holes;
        }
        if (!merges[k - 1]) {
            qerr_set(e, "out of memory");
            goto done_holes;
        }
    }

    if (gguf_writer_init(&w, e)) goto done_holes;
    gguf_writer_add_str(w, "tokenizer.ggml.model", spm ? "llama" : "gpt2");
    gguf_writer_add_str(w, "tokenizer.ggml.pre", pre);
    if (spm) {
        gguf_writer_add_bool(w, "tokenizer.ggml.add_space_prefix", asp);
        if (scheme) gguf_writer_add_str(w, "tokenizer.qlora.prepend_scheme", scheme);
    }
    if (nfc) gguf_writer_add_bool(w, "tokenizer.qlora.nfc", 1);
    /* added tokens that absorb white space (HF AddedToken lstrip / rstrip, e.g. Phi-3's) */
    for (int sk = 0; sk < 2; sk++) {
        int32_t *v = malloc((size_t)cJSON_GetArraySize(added) * sizeof *v + 1);
        if (!v) {
            qerr_set(e, "out of memory");
            goto done_holes;
        }
        uint64_t c = 0;
        cJSON_ArrayForEach(it, added) {
            if (flag(it, sk == 0 ? "lstrip" : "rstrip", 0))
                v[c++] = (int32_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        }
        if (c) gguf_writer_add_arr_i32(w, sk == 0 ? "tokenizer.qlora.lstrip" : "tokenizer.qlora.rstrip", v, c);
        free(v);
    }
    gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)toks, NULL, (uint64_t)nv);
    gguf_writer_add_arr_i32(w, "tokenizer.ggml.token_type", types, (uint64_t)nv);
    gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", (const char *const *)merges, NULL, (uint64_t)nm);
    static const char *const keys[4] = {"bos_token", "eos_token", "pad_token", "unk_token"};
    static const char *const gkeys[4] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                         "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"};
    const char *tbos = template_bos(cJSON_GetObjectItemCaseSensitive(tj, "post_processor"));
    for (int s = 0; s < 4; s++) {
        const char *txt = cfg ? special_text(cfg, keys[s]) : NULL;
        if (s == 0 && !txt) txt = tbos;
        if (!txt) continue;
        int64_t id = -1;
        for (int64_t i = 0; i < nv && id < 0; i++)
            if (!strcmp(toks[i], txt)) id = i;
        if (id < 0) {
            qerr_set(e, "%s: %s \"%s\" is not in the vocabulary", config_path ? config_path : json_path, keys[s], txt);
            goto done_holes;
        }
        gguf_writer_add_u32(w, gkeys[s], (uint32_t)id);
    }
    int add_bos = cfg && cJSON_GetObjectItemCaseSensitive(cfg, "add_bos_token") ? flag(cfg, "add_bos_token", 0)
                                                                                 : tbos != NULL;
    gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", add_bos);
    gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", cfg ? flag(cfg, "add_eos_token", 0) : 0);
    const cJSON *ct = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "chat_template") : NULL;
    const char *tmpl = cJSON_IsString(ct) ? ct->valuestring : NULL;
    if (cJSON_IsArray(ct)) { /* [{"name": "default", "template": ...}, ...] */
        cJSON_ArrayForEach(it, ct) {
            const cJSON *nmj = cJSON_GetObjectItemCaseSensitive(it, "name");
            const cJSON *tt = cJSON_GetObjectItemCaseSensitive(it, "template");
            if (cJSON_IsString(nmj) && !strcmp(nmj->valuestring, "default") && cJSON_IsString(tt)) tmpl = tt->valuestring;
        }
    }
    if (!tmpl) { /* transformers 5 keeps it beside: chat_template.jinja */
        char jp[4096];
        snprintf(jp, sizeof jp, "%s", json_path);
        char *slash = strrchr(jp, '/');
        if (slash) {
            snprintf(slash + 1, sizeof jp - (size_t)(slash + 1 - jp), "chat_template.jinja");
            tmpl_file = file_read_all(jp, NULL, NULL); /* optional: absent or unreadable, no template */
            tmpl = tmpl_file;
        }
    }
    if (tmpl) gguf_writer_add_str(w, "tokenizer.chat_template", tmpl);

    /* through GGUF metadata in memory: one tokenizer implementation for both sources */
    fd = memfd_create("qlora-tokenizer", MFD_CLOEXEC);
    if (fd < 0) {
        qerr_set(e, "memfd_create: %s", strerror(errno));
        goto done_holes;
    }
    if (gguf_writer_write_fd(w, fd, "tokenizer metadata", e)) goto done_holes;
    char fdp[64];
    snprintf(fdp, sizeof fdp, "/proc/self/fd/%d", fd);
    if (gguf_open(fdp, &gf, e)) goto done_holes;
    *out = gf;
    gf = NULL;
    rc = 0;
done_holes:
    for (int64_t i = 0; i < nv; i++) free(holes[i]);
    free(holes);
done:
    gguf_close(gf);
    if (fd >= 0) close(fd);
    gguf_writer_free(w);
    if (merges)
        for (int64_t i = 0; i < nm; i++) free(merges[i]);
    free(merges);
    free(toks);
    free(types);
    free(tmpl_file);
    cJSON_Delete(tj);
    cJSON_Delete(cfg);
    return rc;
}
