/* data/tokenizer.c — byte-level BPE (GPT-2 family) from GGUF metadata.
 *
 * References: OpenAI gpt-2 encoder.py (bytes_to_unicode, the pre-tokenizer
 * regex, BPE by merge rank); Hugging Face tokenizers
 * (pre_tokenizers/byte_level.rs, pre_tokenizers/digits.rs,
 * models/bpe/word.rs `merge_all`, added_vocabulary.rs), which is the oracle
 * tests/test_tokenizer.c compares against; llama.cpp llama-vocab.cpp for the
 * GGUF keys and the per-`pre` regex lists.
 *
 * Layout: the token texts live in one arena; a string→id open-addressing
 * table serves lookups; a (left id, right id)→(rank, merged id) table serves
 * BPE. Merging uses a binary heap ordered by (rank, position), which is what
 * HF does, so ties resolve identically and long words stay O(n log n).
 */
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "core/rng.h"

typedef enum tok_pre {
    TOK_PRE_GPT2 = 0,   /* GPT-2 regex */
    TOK_PRE_DIGITS_GPT2, /* \p{N} isolated, then GPT-2 regex (smollm, starcoder, refact) */
    TOK_PRE_LLAMA3,     /* Llama 3 regex, ignore_merges */
    TOK_PRE_QWEN2,      /* Qwen2 regex (\p{N} one by one), NFC */
    TOK_PRE_NONE,       /* SentencePiece BPE: no pre-tokenizer, one word per segment */
} tok_pre;

/* Where SentencePiece BPE puts its "\xe2\x96\x81" (U+2581) prefix on a segment
 * of text between added tokens (see tokenizer.h). */
/* Added-token flags of tokenizer.json (HF AddedToken lstrip / rstrip): the token
 * absorbs the white space on its left / right. */
enum { TOK_LSTRIP = 1, TOK_RSTRIP = 2 };

typedef enum tok_prepend {
    TOK_PREPEND_NEVER = 0,
    TOK_PREPEND_LEGACY, /* every non-empty segment (HF Prepend normalizer, llama.cpp, sentencepiece) */
    TOK_PREPEND_ALWAYS, /* every segment not already starting with U+2581 (HF Metaspace "always") */
    TOK_PREPEND_FIRST,  /* only the segment at offset 0 of the text, same condition (Metaspace "first") */
} tok_prepend;

struct tokenizer {
    int32_t n_vocab;
    char *arena;          /* all token texts, each NUL-terminated */
    size_t *tok_off;      /* (n_vocab) offset of token i in arena */
    uint32_t *tok_len;    /* (n_vocab) bytes */
    uint8_t *tok_type;    /* (n_vocab) tokenizer_token_type */

    int32_t *vhash;       /* open addressing: token id or -1 */
    uint64_t vmask;

    uint64_t *mkey;       /* open addressing: (left << 32 | right), UINT64_MAX = empty */
    int32_t *mrank;
    int32_t *mres;
    uint64_t mmask;

    int32_t byte_tok[256];     /* id of the single-byte token for each byte */
    char byte_utf8[256][3];    /* bytes_to_unicode(b) as UTF-8 */
    uint8_t byte_utf8_len[256];
    int16_t cp_byte[512];      /* inverse: code point -> byte, -1 if none */

    tok_pre pre;
    int spm;                   /* tokenizer.ggml.model "llama": SentencePiece BPE with byte fallback */
    tok_prepend prepend;       /* spm only */
    int32_t space_id;          /* spm: id of U+2581 (the escaped space), -1 if absent */
    int nfc;                   /* NFC-normalize each segment first (qwen2) */
    int ignore_merges;
    pcre2_code *re_digit;      /* \p{N} (TOK_PRE_DIGITS_GPT2 only) */
    pcre2_code *re_main;

    int32_t *sp_ids;           /* added tokens split out before BPE, by first byte, then longest first */
    int n_sp;
    int sp_start[257];         /* tokens starting with byte b: sp_ids[sp_start[b] .. sp_start[b + 1]) (Gemma's
                                * thousands of added tokens are not all scanned at every space) */
    uint8_t sp_first[256];     /* 1 if some added token starts with this byte */
    uint8_t *strip;            /* (n_vocab) TOK_LSTRIP | TOK_RSTRIP per added token, or NULL */

    int32_t *dm_left, *dm_right; /* spm without stored merges: the derived merges in rank order */
    int64_t n_dm;

    int32_t bos, eos, pad, unk;
    int add_bos, add_eos;
    char *chat_template;
    char pre_name[64];
};

/* White space is spelled out instead of \s: HF runs these regexes in
 * Oniguruma, whose \s is exactly this list (Oniguruma doc/RE, "\s" for
 * Unicode), while PCRE2 10.42's UCP \s also holds U+180E MONGOLIAN VOWEL
 * SEPARATOR (kept in its \h list; not White_Space since Unicode 6.3).
 * PCRE2's set was enumerated over all code points: the two differ only
 * there (found by fuzzing against HF). A single class, unlike an
 * alternation, also repeats without using JIT stack, so a megabyte of
 * punctuation is one match. \p{L} and \p{N} come from PCRE2's tables;
 * remaining difference: numerals added in Unicode 15/16 (e.g. U+10D40 Garay
 * digits) are \p{N} to HF's Rust tables but not to PCRE2 10.42's Unicode 14. */
#define RE_SPACE_LIST "\\t\\n\\x0B\\f\\r\\x20\\x85\\xA0\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
#define RE_WS "[" RE_SPACE_LIST "]"
#define RE_NWS "[^" RE_SPACE_LIST "]"
#define RE_OTHER "[^" RE_SPACE_LIST "\\p{L}\\p{N}]"
static const char RE_GPT2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?" RE_OTHER "+|" RE_WS "+(?!" RE_NWS ")|" RE_WS "+";
static const char RE_LLAMA3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?" RE_OTHER "+[\\r\\n]*|" RE_WS "*[\\r\\n]+|" RE_WS "+(?!" RE_NWS ")|" RE_WS "+";
static const char RE_QWEN2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?" RE_OTHER "+[\\r\\n]*|" RE_WS "*[\\r\\n]+|" RE_WS "+(?!" RE_NWS ")|" RE_WS "+";
static const char RE_DIGIT[] = "\\p{N}";

/* ------------------------------------------------------------------------ */
/* hashing                                                                   */

static uint64_t tok_hash_bytes(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 0x100000001b3ull;
    }
    return rng_mix64(h);
}

static const char *tok_text(const tokenizer *t, int32_t id) { return t->arena + t->tok_off[id]; }

static int32_t tok_vocab_lookup(const tokenizer *t, const char *s, size_t n) {
    uint64_t i = tok_hash_bytes(s, n) & t->vmask;
    for (;;) {
        int32_t id = t->vhash[i];
        if (id < 0) return -1;
        if (t->tok_len[id] == n && memcmp(tok_text(t, id), s, n) == 0) return id;
        i = (i + 1) & t->vmask;
    }
}

/* Returns the slot for a pair: either its entry or the empty slot where it
 * would go. */
static uint64_t tok_merge_slot(const tokenizer *t, uint64_t key) {
    uint64_t i = rng_mix64(key) & t->mmask;
    while (t->mkey[i] != UINT64_MAX && t->mkey[i] != key) i = (i + 1) & t->mmask;
    return i;
}

static uint64_t tok_pow2_at_least(uint64_t n) {
    uint64_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

/* ------------------------------------------------------------------------ */
/* loading                                                                   */

/* GPT-2 encoder.py bytes_to_unicode: printable Latin-1 bytes map to
 * themselves, the other 68 to U+0100.. in byte order. */
static void tok_init_byte_alphabet(tokenizer *t) {
    int n = 0;
    for (int i = 0; i < 512; i++) t->cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        int cp = printable ? b : 256 + n++;
        t->cp_byte[cp] = (int16_t)b;
        if (cp < 0x80) {
            t->byte_utf8[b][0] = (char)cp;
            t->byte_utf8_len[b] = 1;
        } else {
            t->byte_utf8[b][0] = (char)(0xC0 | (cp >> 6));
            t->byte_utf8[b][1] = (char)(0x80 | (cp & 0x3F));
            t->byte_utf8_len[b] = 2;
        }
    }
}

static int tok_compile(const char *pattern, pcre2_code **out, qerr *e) {
    int err;
    PCRE2_SIZE erroff;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &erroff, NULL);
    if (!re) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(err, buf, sizeof buf);
        return qerr_set(e, "tokenizer: PCRE2 cannot compile the pre-tokenizer regex at %zu: %s",
                        (size_t)erroff, (const char *)buf);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter */
    *out = re;
    return 0;
}

static int tok_get_special_id(const gguf_file *f, const char *key, int32_t n_vocab, int32_t *out, qerr *e) {
    *out = -1;
    if (!gguf_has_key(f, key)) return 0;
    uint32_t v;
    if (gguf_get_u32(f, key, &v, e)) return -1;
    if (v >= (uint32_t)n_vocab)
        return qerr_set(e, "tokenizer: %s = %u is outside the vocabulary (%d tokens)", key, v, n_vocab);
    *out = (int32_t)v;
    return 0;
}

static int tok_get_flag(const gguf_file *f, const char *key, int *out, qerr *e) {
    *out = 0;
    if (!gguf_has_key(f, key)) return 0;
    return gguf_get_bool(f, key, out, e);
}

static int tok_sp_cmp_len_desc(const void *a, const void *b, void *ctx) {
    const tokenizer *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint8_t fx = (uint8_t)tok_text(t, x)[0], fy = (uint8_t)tok_text(t, y)[0];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (t->tok_len[x] != t->tok_len[y]) return t->tok_len[x] > t->tok_len[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

static int tok_load_vocab(const gguf_file *f, tokenizer *t, qerr *e) {
    gguf_vtype et;
    uint64_t count;
    if (gguf_get_arr_info(f, "tokenizer.ggml.tokens", &et, &count, e)) return -1;
    if (et != GGUF_VTYPE_STRING)
        return qerr_set(e, "tokenizer: tokenizer.ggml.tokens must be an array of strings (element type %d)", (int)et);
    if (count == 0 || count > INT32_MAX)
        return qerr_set(e, "tokenizer: tokenizer.ggml.tokens has %llu entries", (unsigned long long)count);
    t->n_vocab = (int32_t)count;
    size_t total = 0;
    for (uint64_t i = 0; i < count; i++) {
        const char *s;
        size_t n;
        if (gguf_get_arr_str(f, "tokenizer.ggml.tokens", i, &s, &n, e)) return -1;
        total += n + 1;
    }
    t->arena = qmalloc(total, e);
    t->tok_off = qmalloc(count * sizeof *t->tok_off, e);
    t->tok_len = qmalloc(count * sizeof *t->tok_len, e);
    t->tok_type = qmalloc(count, e);
    if (!t->arena || !t->tok_off || !t->tok_len || !t->tok_type) return -1;
    size_t off = 0;
    for (uint64_t i = 0; i < count; i++) {
        const char *s;
        size_t n;
        if (gguf_get_arr_str(f, "tokenizer.ggml.tokens", i, &s, &n, e)) return -1;
        memcpy(t->arena + off, s, n);
        t->arena[off + n] = 0;
        t->tok_off[i] = off;
        t->tok_len[i] = (uint32_t)n;
        t->tok_type[i] = TOKENIZER_TOKEN_NORMAL;
        off += n + 1;
    }

    if (gguf_has_key(f, "tokenizer.ggml.token_type")) {
        uint64_t tc;
        const void *data;
        if (gguf_get_arr_info(f, "tokenizer.ggml.token_type", &et, &tc, e)) return -1;
        if (et != GGUF_VTYPE_INT32 && et != GGUF_VTYPE_UINT32)
            return qerr_set(e, "tokenizer: tokenizer.ggml.token_type must be an int32 array (element type %d)",
                            (int)et);
        if (tc != count)
            return qerr_set(e, "tokenizer: tokenizer.ggml.token_type has %llu entries, tokens has %llu",
                            (unsigned long long)tc, (unsigned long long)count);
        if (gguf_get_arr_data(f, "tokenizer.ggml.token_type", &data, e)) return -1;
        for (uint64_t i = 0; i < count; i++) {
            int32_t v;
            memcpy(&v, (const uint8_t *)data + 4 * i, 4);
            if (v < 0 || v > TOKENIZER_TOKEN_BYTE)
                return qerr_set(e, "tokenizer: tokenizer.ggml.token_type[%llu] = %d is not a known token type",
                                (unsigned long long)i, v);
            t->tok_type[i] = (uint8_t)v;
        }
    }

    t->vmask = tok_pow2_at_least(2 * count) - 1;
    t->vhash = qmalloc((t->vmask + 1) * sizeof *t->vhash, e);
    if (!t->vhash) return -1;
    memset(t->vhash, 0xff, (t->vmask + 1) * sizeof *t->vhash);
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const char *s = tok_text(t, id);
        uint64_t i = tok_hash_bytes(s, t->tok_len[id]) & t->vmask;
        int dup = 0;
        while (t->vhash[i] >= 0) {
            int32_t o = t->vhash[i];
            if (t->tok_len[o] == t->tok_len[id] && memcmp(tok_text(t, o), s, t->tok_len[id]) == 0) {
                dup = 1; /* duplicate text: the first id wins, as in HF's vocab map */
                break;
            }
            i = (i + 1) & t->vmask;
        }
        if (!dup) t->vhash[i] = id;
    }
    return 0;
}

static int tok_load_merges(const gguf_file *f, tokenizer *t, qerr *e) {
    gguf_vtype et;
    uint64_t count;
    if (!gguf_has_key(f, "tokenizer.ggml.merges"))
        return qerr_set(e, "tokenizer: tokenizer.ggml.merges is missing (required for a gpt2 BPE vocabulary)");
    if (gguf_get_arr_info(f, "tokenizer.ggml.merges", &et, &count, e)) return -1;
    if (et != GGUF_VTYPE_STRING)
        return qerr_set(e, "tokenizer: tokenizer.ggml.merges must be an array of strings (element type %d)", (int)et);
    if (count > INT32_MAX) return qerr_set(e, "tokenizer: too many merges (%llu)", (unsigned long long)count);
    t->mmask = tok_pow2_at_least(2 * count + 2) - 1;
    t->mkey = qmalloc((t->mmask + 1) * sizeof *t->mkey, e);
    t->mrank = qmalloc((t->mmask + 1) * sizeof *t->mrank, e);
    t->mres = qmalloc((t->mmask + 1) * sizeof *t->mres, e);
    if (!t->mkey || !t->mrank || !t->mres) return -1;
    memset(t->mkey, 0xff, (t->mmask + 1) * sizeof *t->mkey);
    char *buf = NULL;
    size_t cap = 0;
    for (uint64_t r = 0; r < count; r++) {
        const char *s;
        size_t n;
        if (gguf_get_arr_str(f, "tokenizer.ggml.merges", r, &s, &n, e)) {
            free(buf);
            return -1;
        }
        /* "left right": the separator is the first space after position 0
         * (a token in the byte alphabet never contains a real space). */
        const char *sp = n > 1 ? memchr(s + 1, ' ', n - 1) : NULL;
        if (!sp) {
            free(buf);
            return qerr_set(e, "tokenizer: tokenizer.ggml.merges[%llu] = \"%.*s\" is not \"left right\"",
                            (unsigned long long)r, (int)(n > 64 ? 64 : n), s);
        }
        size_t nl = (size_t)(sp - s), nr = n - nl - 1;
        int32_t a = tok_vocab_lookup(t, s, nl), b = tok_vocab_lookup(t, sp + 1, nr);
        if (nl + nr > cap) {
            cap = 2 * (nl + nr) + 64;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                return qerr_set(e, "out of memory reading merges");
            }
            buf = nb;
        }
        memcpy(buf, s, nl);
        memcpy(buf + nl, sp + 1, nr);
        int32_t res = tok_vocab_lookup(t, buf, nl + nr);
        if (a < 0 || b < 0 || res < 0) continue; /* unusable merge: HF/llama.cpp never produce it either */
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        uint64_t slot = tok_merge_slot(t, key);
        if (t->mkey[slot] == key) continue; /* duplicate: the lower rank stays */
        t->mkey[slot] = key;
        t->mrank[slot] = (int32_t)r;
        t->mres[slot] = res;
    }
    free(buf);
    return 0;
}

/* One merge recovered from a SentencePiece vocabulary: left + right = res. */
typedef struct tok_spm_merge {
    float score;        /* score of res */
    int32_t lchars, rchars; /* code points of left / right */
    int32_t res, left, right;
} tok_spm_merge;

static int tok_spm_merge_cmp(const void *pa, const void *pb) {
    const tok_spm_merge *a = pa, *b = pb;
    if (a->score != b->score) return a->score > b->score ? -1 : 1;
    if (a->lchars != b->lchars) return a->lchars > b->lchars ? -1 : 1;
    if (a->rchars != b->rchars) return a->rchars > b->rchars ? -1 : 1;
    if (a->res != b->res) return a->res < b->res ? -1 : 1;
    if (a->left != b->left) return a->left < b->left ? -1 : 1;
    return a->right < b->right ? -1 : a->right > b->right;
}

static int32_t tok_utf8_chars(const char *s, size_t n) {
    int32_t c = 0;
    for (size_t i = 0; i < n; i++) c += ((uint8_t)s[i] & 0xC0) != 0x80;
    return c;
}

/* SentencePiece BPE stores scores, not merges. The merges are recovered as
 * transformers does for every sentencepiece vocabulary
 * (tokenization_utils_base.py generate_merges, used by its GGUF loader and
 * by convert_slow_tokenizer's SentencePieceExtractor): every split of a
 * token's text at a code-point boundary into two tokens of the vocabulary is
 * a merge; merges are ranked by the merged token's score (higher first),
 * then by the code points of the left part (more first), of the right part,
 * then by vocabulary order. This is also the order in which sentencepiece
 * and llama.cpp's llm_tokenizer_spm apply them (highest score first). */
static int tok_derive_merges(const gguf_file *f, tokenizer *t, qerr *e) {
    gguf_vtype et;
    uint64_t count;
    const void *data;
    if (!gguf_has_key(f, "tokenizer.ggml.scores"))
        return qerr_set(e, "tokenizer: tokenizer.ggml.scores is missing (required for a SentencePiece vocabulary "
                           "without tokenizer.ggml.merges)");
    if (gguf_get_arr_info(f, "tokenizer.ggml.scores", &et, &count, e)) return -1;
    if (et != GGUF_VTYPE_FLOAT32)
        return qerr_set(e, "tokenizer: tokenizer.ggml.scores must be a float32 array (element type %d)", (int)et);
    if (count != (uint64_t)t->n_vocab)
        return qerr_set(e, "tokenizer: tokenizer.ggml.scores has %llu entries, tokens has %d", (unsigned long long)count,
                        t->n_vocab);
    if (gguf_get_arr_data(f, "tokenizer.ggml.scores", &data, e)) return -1;
    size_t cap = 1024, n = 0;
    tok_spm_merge *m = qmalloc(cap * sizeof *m, e);
    if (!m) return -1;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const char *s = tok_text(t, id);
        uint32_t len = t->tok_len[id];
        if (tok_vocab_lookup(t, s, len) != id) continue; /* a duplicate text: the first id stands for it */
        if (len > 1024) { /* each split hashes both halves: quadratic in the length */
            free(m);
            return qerr_set(e, "tokenizer: tokenizer.ggml.tokens[%d] is %u bytes; SentencePiece tokens longer than 1024 "
                               "bytes are not supported (real vocabularies stay under 100)", id, len);
        }
        float score;
        memcpy(&score, (const uint8_t *)data + 4 * (size_t)id, 4);
        int32_t lchars = 0, total = tok_utf8_chars(s, len);
        for (uint32_t k = 1; k < len; k++) {
            if (((uint8_t)s[k - 1] & 0xC0) != 0x80) lchars++;
            if (((uint8_t)s[k] & 0xC0) == 0x80) continue; /* not a code-point boundary */
            int32_t l = tok_vocab_lookup(t, s, k), r = tok_vocab_lookup(t, s + k, len - k);
            if (l < 0 || r < 0) continue;
            if (n == cap) {
                cap *= 2;
                tok_spm_merge *nm = realloc(m, cap * sizeof *nm);
                if (!nm) {
                    free(m);
                    return qerr_set(e, "out of memory deriving merges");
                }
                m = nm;
            }
            m[n++] = (tok_spm_merge){score, lchars, total - lchars, id, l, r};
        }
    }
    qsort(m, n, sizeof *m, tok_spm_merge_cmp);
    t->mmask = tok_pow2_at_least(2 * n + 2) - 1;
    t->mkey = qmalloc((t->mmask + 1) * sizeof *t->mkey, e);
    t->mrank = qmalloc((t->mmask + 1) * sizeof *t->mrank, e);
    t->mres = qmalloc((t->mmask + 1) * sizeof *t->mres, e);
    if (!t->mkey || !t->mrank || !t->mres) {
        free(m);
        return -1;
    }
    memset(t->mkey, 0xff, (t->mmask + 1) * sizeof *t->mkey);
    t->dm_left = qmalloc((n ? n : 1) * sizeof *t->dm_left, e);
    t->dm_right = qmalloc((n ? n : 1) * sizeof *t->dm_right, e);
    if (!t->dm_left || !t->dm_right) {
        free(m);
        return -1;
    }
    t->n_dm = (int64_t)n;
    for (size_t r = 0; r < n; r++) {
        t->dm_left[r] = m[r].left;
        t->dm_right[r] = m[r].right;
        uint64_t key = ((uint64_t)(uint32_t)m[r].left << 32) | (uint32_t)m[r].right;
        uint64_t slot = tok_merge_slot(t, key);
        if (t->mkey[slot] == key) continue;
        t->mkey[slot] = key;
        t->mrank[slot] = (int32_t)r;
        t->mres[slot] = m[r].res;
    }
    free(m);
    return 0;
}

int tokenizer_load_gguf(const gguf_file *f, tokenizer **out, qerr *e) {
    *out = NULL;
    const char *s;
    size_t n;
    if (!gguf_has_key(f, "tokenizer.ggml.model"))
        return qerr_set(e, "tokenizer: the GGUF has no tokenizer.ggml.model (no tokenizer stored)");
    if (gguf_get_str(f, "tokenizer.ggml.model", &s, &n, e)) return -1;
    int spm = n == 5 && !memcmp(s, "llama", 5);
    if (!spm && (n != 4 || memcmp(s, "gpt2", 4) != 0))
        return qerr_set(e,
                        "tokenizer: tokenizer.ggml.model is \"%.*s\"; supported: \"gpt2\" (byte-level BPE) and "
                        "\"llama\" (SentencePiece BPE with byte fallback)",
                        (int)(n > 64 ? 64 : n), s);

    tokenizer *t = calloc(1, sizeof *t);
    if (!t) return qerr_set(e, "out of memory");
    tok_init_byte_alphabet(t);
    t->spm = spm;
    t->space_id = -1;

    const char *pre = "default";
    size_t npre = strlen(pre);
    if (gguf_has_key(f, "tokenizer.ggml.pre")) {
        if (gguf_get_str(f, "tokenizer.ggml.pre", &pre, &npre, e)) goto fail;
    }
    snprintf(t->pre_name, sizeof t->pre_name, "%.*s", (int)npre, pre);
    if (spm) {
        /* convert_hf_to_gguf.py writes "default" for every sentencepiece vocabulary */
        if (strcmp(t->pre_name, "default") != 0) {
            qerr_set(e, "tokenizer: tokenizer.ggml.pre = \"%s\" with tokenizer.ggml.model \"llama\" is not supported "
                        "(expected \"default\": SentencePiece has no pre-tokenizer)", t->pre_name);
            goto fail;
        }
        t->pre = TOK_PRE_NONE;
        /* sentencepiece normalization rules qlora does not apply: refused, not ignored */
        int rew = 0;
        if (gguf_has_key(f, "tokenizer.ggml.precompiled_charsmap")) {
            qerr_set(e, "tokenizer: tokenizer.ggml.precompiled_charsmap is set (a SentencePiece normalizer such as "
                        "nmt_nfkc); not supported");
            goto fail;
        }
        if (gguf_has_key(f, "tokenizer.ggml.remove_extra_whitespaces") &&
            (tok_get_flag(f, "tokenizer.ggml.remove_extra_whitespaces", &rew, e) || rew)) {
            if (rew) qerr_set(e, "tokenizer: tokenizer.ggml.remove_extra_whitespaces = true is not supported");
            goto fail;
        }
    } else if (!strcmp(t->pre_name, "smollm") || !strcmp(t->pre_name, "starcoder") || !strcmp(t->pre_name, "refact")) {
        t->pre = TOK_PRE_DIGITS_GPT2;
    } else if (!strcmp(t->pre_name, "gpt2") || !strcmp(t->pre_name, "default") ||
               !strcmp(t->pre_name, "gpt-2")) {
        t->pre = TOK_PRE_GPT2;
    } else if (!strcmp(t->pre_name, "llama-bpe") || !strcmp(t->pre_name, "llama3") ||
               !strcmp(t->pre_name, "llama-v3")) {
        t->pre = TOK_PRE_LLAMA3;
        t->ignore_merges = 1;
    } else if (!strcmp(t->pre_name, "qwen2")) {
        /* Qwen2's tokenizer.json: NFC normalizer, Split(regex) + ByteLevel, ignore_merges false */
        t->pre = TOK_PRE_QWEN2;
        t->nfc = 1;
    } else {
        qerr_set(e,
                 "tokenizer: tokenizer.ggml.pre = \"%s\" is not supported (supported: smollm, starcoder, refact, "
                 "gpt2, default, llama-bpe, llama3, qwen2)",
                 t->pre_name);
        goto fail;
    }
    if (gguf_has_key(f, "tokenizer.qlora.nfc")) { /* written by tokenizer_json for an NFC normalizer */
        if (tok_get_flag(f, "tokenizer.qlora.nfc", &t->nfc, e)) goto fail;
    }
    if (!spm) {
        const char *re = t->pre == TOK_PRE_LLAMA3 ? RE_LLAMA3 : t->pre == TOK_PRE_QWEN2 ? RE_QWEN2 : RE_GPT2;
        if (tok_compile(re, &t->re_main, e)) goto fail;
        if (t->pre == TOK_PRE_DIGITS_GPT2 && tok_compile(RE_DIGIT, &t->re_digit, e)) goto fail;
    }

    if (tok_load_vocab(f, t, e)) goto fail;
    if (spm && !gguf_has_key(f, "tokenizer.ggml.merges")) {
        if (tok_derive_merges(f, t, e)) goto fail;
    } else if (tok_load_merges(f, t, e)) {
        goto fail;
    }
    if (spm) {
        int asp = 1; /* llama.cpp's default for a sentencepiece vocabulary */
        if (gguf_has_key(f, "tokenizer.ggml.add_space_prefix") &&
            gguf_get_bool(f, "tokenizer.ggml.add_space_prefix", &asp, e))
            goto fail;
        t->prepend = asp ? TOK_PREPEND_LEGACY : TOK_PREPEND_NEVER;
        if (asp && gguf_has_key(f, "tokenizer.qlora.prepend_scheme")) {
            if (gguf_get_str(f, "tokenizer.qlora.prepend_scheme", &s, &n, e)) goto fail;
            if (n == 6 && !memcmp(s, "legacy", 6)) t->prepend = TOK_PREPEND_LEGACY;
            else if (n == 6 && !memcmp(s, "always", 6)) t->prepend = TOK_PREPEND_ALWAYS;
            else if (n == 5 && !memcmp(s, "first", 5)) t->prepend = TOK_PREPEND_FIRST;
            else {
                qerr_set(e, "tokenizer: tokenizer.qlora.prepend_scheme = \"%.*s\" (expected legacy, always or first)",
                         (int)(n > 64 ? 64 : n), s);
                goto fail;
            }
        }
        t->space_id = tok_vocab_lookup(t, "\xe2\x96\x81", 3);
    }

    if (tok_get_special_id(f, "tokenizer.ggml.bos_token_id", t->n_vocab, &t->bos, e) ||
        tok_get_special_id(f, "tokenizer.ggml.eos_token_id", t->n_vocab, &t->eos, e) ||
        tok_get_special_id(f, "tokenizer.ggml.padding_token_id", t->n_vocab, &t->pad, e) ||
        tok_get_special_id(f, "tokenizer.ggml.unknown_token_id", t->n_vocab, &t->unk, e) ||
        tok_get_flag(f, "tokenizer.ggml.add_bos_token", &t->add_bos, e) ||
        tok_get_flag(f, "tokenizer.ggml.add_eos_token", &t->add_eos, e))
        goto fail;
    if (t->pad < 0) t->pad = t->eos;

    /* A byte the vocabulary cannot spell is dropped, as HF's BPE does with
     * unk_token = null (SmolLM2's tokenizer.json); SmolLM2 lacks 21 of them,
     * e.g. 0x04 and 0xF5..0xFF. */
    for (int b = 0; b < 256; b++) {
        if (spm) { /* byte fallback: <0xNN>, as sentencepiece and HF's BPE(byte_fallback) spell it */
            char hex[8];
            snprintf(hex, sizeof hex, "<0x%02X>", b);
            t->byte_tok[b] = tok_vocab_lookup(t, hex, 6);
        } else {
            t->byte_tok[b] = tok_vocab_lookup(t, t->byte_utf8[b], t->byte_utf8_len[b]);
        }
    }

    /* Added tokens split out before pre-tokenization. */
    t->sp_ids = malloc((size_t)t->n_vocab * sizeof *t->sp_ids);
    if (!t->sp_ids) {
        qerr_set(e, "out of memory");
        goto fail;
    }
    for (int32_t id = 0; id < t->n_vocab; id++) {
        int ty = t->tok_type[id];
        /* sentencepiece's unknown piece (<unk>) is a special added token in HF's Llama tokenizers */
        int special = ty == TOKENIZER_TOKEN_CONTROL || (spm && ty == TOKENIZER_TOKEN_UNKNOWN);
        if ((special || ty == TOKENIZER_TOKEN_USER_DEFINED) && t->tok_len[id] > 0) {
            t->sp_ids[t->n_sp++] = id;
            t->sp_first[(uint8_t)tok_text(t, id)[0]] = 1;
        }
    }
    qsort_r(t->sp_ids, (size_t)t->n_sp, sizeof *t->sp_ids, tok_sp_cmp_len_desc, t);
    for (int b = 0, k = 0; b <= 256; b++) {
        while (b < 256 && k < t->n_sp && (uint8_t)tok_text(t, t->sp_ids[k])[0] < b) k++;
        t->sp_start[b] = b < 256 ? k : t->n_sp;
    }
    static const char *const strip_keys[2] = {"tokenizer.qlora.lstrip", "tokenizer.qlora.rstrip"};
    for (int k = 0; k < 2; k++) {
        if (!gguf_has_key(f, strip_keys[k])) continue;
        gguf_vtype et;
        uint64_t cnt;
        const void *data;
        if (gguf_get_arr_info(f, strip_keys[k], &et, &cnt, e) || gguf_get_arr_data(f, strip_keys[k], &data, e)) goto fail;
        if (et != GGUF_VTYPE_INT32) {
            qerr_set(e, "tokenizer: %s must be an int32 array of token ids", strip_keys[k]);
            goto fail;
        }
        if (!t->strip && !(t->strip = calloc((size_t)t->n_vocab, 1))) {
            qerr_set(e, "out of memory");
            goto fail;
        }
        for (uint64_t i = 0; i < cnt; i++) {
            int32_t id;
            memcpy(&id, (const uint8_t *)data + 4 * i, 4);
            if (id < 0 || id >= t->n_vocab) {
                qerr_set(e, "tokenizer: %s[%llu] = %d is outside the vocabulary", strip_keys[k], (unsigned long long)i, id);
                goto fail;
            }
            t->strip[id] |= (uint8_t)(k == 0 ? TOK_LSTRIP : TOK_RSTRIP);
        }
    }

    if (gguf_has_key(f, "tokenizer.chat_template")) {
        if (gguf_get_str(f, "tokenizer.chat_template", &s, &n, e)) goto fail;
        t->chat_template = malloc(n + 1);
        if (!t->chat_template) {
            qerr_set(e, "out of memory");
            goto fail;
        }
        memcpy(t->chat_template, s, n);
        t->chat_template[n] = 0;
    }
    *out = t;
    return 0;
fail:
    tokenizer_free(t);
    return -1;
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    free(t->arena);
    free(t->tok_off);
    free(t->tok_len);
    free(t->tok_type);
    free(t->vhash);
    free(t->mkey);
    free(t->mrank);
    free(t->mres);
    pcre2_code_free(t->re_digit);
    pcre2_code_free(t->re_main);
    free(t->sp_ids);
    free(t->strip);
    free(t->dm_left);
    free(t->dm_right);
    free(t->chat_template);
    free(t);
}

/* ------------------------------------------------------------------------ */
/* id lists                                                                  */

static int tok_ids_reserve(tokenizer_ids *v, size_t extra, int with_offsets, qerr *e) {
    size_t need = v->n + extra;
    if (need <= v->cap && v->ids && (!with_offsets || v->offsets)) return 0;
    size_t cap = v->cap > 64 ? v->cap : 64;
    while (cap < need) cap *= 2;
    int32_t *ni = realloc(v->ids, cap * sizeof *ni);
    if (!ni) return qerr_set(e, "out of memory growing a token list to %zu ids", cap);
    v->ids = ni;
    if (with_offsets || v->offsets) {
        int64_t *no = realloc(v->offsets, cap * sizeof *no);
        if (!no) return qerr_set(e, "out of memory growing a token list to %zu ids", cap);
        if (!v->offsets)
            for (size_t i = 0; i < v->n; i++) no[i] = -1;
        v->offsets = no;
    }
    v->cap = cap;
    return 0;
}

int tokenizer_ids_push(tokenizer_ids *v, int32_t id, qerr *e) {
    if (tok_ids_reserve(v, 1, 0, e)) return -1;
    if (v->offsets) v->offsets[v->n] = -1;
    v->ids[v->n++] = id;
    return 0;
}

void tokenizer_ids_free(tokenizer_ids *v) {
    if (!v) return;
    free(v->ids);
    free(v->offsets);
    memset(v, 0, sizeof *v);
}

/* ------------------------------------------------------------------------ */
/* BPE on one pre-token                                                      */

typedef struct tok_sym {
    int32_t id;
    int32_t prev, next; /* -1 at the ends */
    int32_t nbytes;     /* bytes of the original text covered */
    int32_t dead;       /* merged into its left neighbour */
} tok_sym;

typedef struct tok_cand {
    int32_t rank, pos, left, right;
} tok_cand;

/* Scratch owned by one encode call. */
typedef struct tok_work {
    tok_sym *sym;
    tok_cand *heap;
    size_t sym_cap, heap_cap, heap_n;
    char *spell;
    size_t spell_cap;
    pcre2_match_data *md;
} tok_work;

static int tok_cand_less(const tok_cand *a, const tok_cand *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void tok_heap_push(tok_work *w, tok_cand c) {
    size_t i = w->heap_n++;
    w->heap[i] = c;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!tok_cand_less(&w->heap[i], &w->heap[p])) break;
        tok_cand tmp = w->heap[p];
        w->heap[p] = w->heap[i];
        w->heap[i] = tmp;
        i = p;
    }
}

static tok_cand tok_heap_pop(tok_work *w) {
    tok_cand top = w->heap[0];
    w->heap[0] = w->heap[--w->heap_n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < w->heap_n && tok_cand_less(&w->heap[l], &w->heap[m])) m = l;
        if (r < w->heap_n && tok_cand_less(&w->heap[r], &w->heap[m])) m = r;
        if (m == i) break;
        tok_cand tmp = w->heap[m];
        w->heap[m] = w->heap[i];
        w->heap[i] = tmp;
        i = m;
    }
    return top;
}

static void tok_try_pair(const tokenizer *t, tok_work *w, int32_t pos) {
    int32_t nx = w->sym[pos].next;
    if (nx < 0) return;
    uint64_t key = ((uint64_t)(uint32_t)w->sym[pos].id << 32) | (uint32_t)w->sym[nx].id;
    uint64_t slot = tok_merge_slot(t, key);
    if (t->mkey[slot] != key) return;
    tok_cand c = {t->mrank[slot], pos, w->sym[pos].id, w->sym[nx].id};
    tok_heap_push(w, c);
}

static int tok_emit(tokenizer_ids *out, int32_t id, int64_t off, int with_offsets, qerr *e) {
    if (out->n == out->cap && tok_ids_reserve(out, 1, with_offsets, e)) return -1;
    if (with_offsets) out->offsets[out->n] = off;
    out->ids[out->n++] = id;
    return 0;
}

static int tok_merge_emit(const tokenizer *t, tok_work *w, int32_t nsym, int64_t off, tokenizer_ids *out,
                          int with_offsets, qerr *e);

static int tok_work_reserve(tok_work *w, size_t nsym, qerr *e) {
    if (w->sym_cap < nsym) {
        size_t cap = nsym + 64;
        tok_sym *ns = realloc(w->sym, cap * sizeof *ns);
        if (!ns) return qerr_set(e, "out of memory in BPE");
        w->sym = ns;
        w->sym_cap = cap;
    }
    /* Each merge adds at most 2 candidates; nsym-1 initial ones. */
    if (w->heap_cap < 3 * nsym) {
        size_t cap = 3 * nsym + 64;
        tok_cand *nh = realloc(w->heap, cap * sizeof *nh);
        if (!nh) return qerr_set(e, "out of memory in BPE");
        w->heap = nh;
        w->heap_cap = cap;
    }
    return 0;
}

static void tok_sym_push(tok_work *w, int32_t *nsym, int32_t id, int32_t nbytes) {
    tok_sym *y = &w->sym[*nsym];
    y->id = id;
    y->prev = *nsym - 1;
    y->next = -1;
    y->nbytes = nbytes;
    y->dead = 0;
    if (*nsym > 0) w->sym[*nsym - 1].next = *nsym;
    (*nsym)++;
}

/* SentencePiece BPE on one segment s[0..n) (text between added tokens):
 * the segment is one word (no pre-tokenizer); spaces are escaped as U+2581,
 * `prefix` puts one U+2581 in front (covering no text bytes). Initial
 * symbols are code points; one missing from the vocabulary becomes its
 * UTF-8 bytes as <0xNN> tokens (byte fallback; HF BPE `byte_fallback`), or
 * <unk> when a byte token is missing too (consecutive ones fused, HF
 * `fuse_unk`). Bytes that are not valid UTF-8 are treated as one-byte code
 * points (they have no vocabulary entry, so they fall back to bytes). */
static int tok_spm_word(const tokenizer *t, tok_work *w, const char *s, size_t n, int prefix, int64_t off,
                        tokenizer_ids *out, int with_offsets, qerr *e) {
    if (tok_work_reserve(w, 4 * n + 1, e)) return -1;
    int32_t nsym = 0;
    int last_unk = 0;
    if (prefix) {
        if (t->space_id >= 0) tok_sym_push(w, &nsym, t->space_id, 0);
        else {
            for (int k = 0; k < 3; k++) tok_sym_push(w, &nsym, t->byte_tok[(uint8_t)"\xe2\x96\x81"[k]], 0);
        }
    }
    size_t i = 0;
    while (i < n) {
        size_t l = 1;
        uint8_t c = (uint8_t)s[i];
        if (c >= 0xC0) {
            utf8proc_int32_t cp;
            utf8proc_ssize_t r = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
            if (r > 0) l = (size_t)r;
        }
        int32_t id = c == ' ' ? t->space_id : tok_vocab_lookup(t, s + i, l);
        if (id >= 0) {
            tok_sym_push(w, &nsym, id, (int32_t)l);
            last_unk = 0;
        } else {
            const char *bs = c == ' ' ? "\xe2\x96\x81" : s + i;
            size_t bl = c == ' ' ? 3 : l;
            int all = 1;
            for (size_t k = 0; k < bl; k++) all &= t->byte_tok[(uint8_t)bs[k]] >= 0;
            if (all) {
                for (size_t k = 0; k < bl; k++) tok_sym_push(w, &nsym, t->byte_tok[(uint8_t)bs[k]], k < l ? 1 : 0);
                last_unk = 0;
            } else if (t->unk >= 0) {
                if (last_unk) w->sym[nsym - 1].nbytes += (int32_t)l;
                else tok_sym_push(w, &nsym, t->unk, (int32_t)l);
                last_unk = 1;
            } else if (nsym > 0) {
                w->sym[nsym - 1].nbytes += (int32_t)l; /* dropped, as HF without unk_token */
            } else {
                off += (int64_t)l;
            }
        }
        i += l;
    }
    return tok_merge_emit(t, w, nsym, off, out, with_offsets, e);
}

/* BPE-encode bytes w[0..n) (one pre-token) and append the ids; `off` is the
 * absolute offset of w[0] for the offsets list. */
static int tok_bpe_word(const tokenizer *t, tok_work *w, const char *s, size_t n, int64_t off,
                        tokenizer_ids *out, int with_offsets, qerr *e) {
    if (n == 0) return 0;
    if (n == 1) return t->byte_tok[(uint8_t)s[0]] < 0 ? 0 : tok_emit(out, t->byte_tok[(uint8_t)s[0]], off, with_offsets, e);
    if (t->ignore_merges) {
        if (w->spell_cap < 2 * n) {
            size_t cap = 2 * n + 64;
            char *ns = realloc(w->spell, cap);
            if (!ns) return qerr_set(e, "out of memory in BPE");
            w->spell = ns;
            w->spell_cap = cap;
        }
        size_t k = 0;
        for (size_t i = 0; i < n; i++) {
            uint8_t b = (uint8_t)s[i];
            memcpy(w->spell + k, t->byte_utf8[b], t->byte_utf8_len[b]);
            k += t->byte_utf8_len[b];
        }
        int32_t id = tok_vocab_lookup(t, w->spell, k);
        if (id >= 0) return tok_emit(out, id, off, with_offsets, e);
    }
    if (tok_work_reserve(w, n, e)) return -1;
    /* Initial symbols: one per byte; bytes without a token are dropped
     * before merging (HF Word::from), their bytes counted into the previous
     * symbol's span so offsets stay in text order. */
    int32_t nsym = 0;
    int64_t lead = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_tok[(uint8_t)s[i]];
        if (id < 0) {
            if (nsym > 0) w->sym[nsym - 1].nbytes++;
            else lead++;
            continue;
        }
        w->sym[nsym].id = id;
        w->sym[nsym].prev = nsym - 1;
        w->sym[nsym].next = -1;
        if (nsym > 0) w->sym[nsym - 1].next = nsym;
        w->sym[nsym].nbytes = 1;
        w->sym[nsym].dead = 0;
        nsym++;
    }
    return tok_merge_emit(t, w, nsym, off + lead, out, with_offsets, e);
}

/* Merge w->sym[0..nsym) (linked in order) lowest rank first, as HF's
 * Word::merge_all, and append the resulting ids; the first symbol starts at
 * text offset `off`, each covers nbytes of the text. */
static int tok_merge_emit(const tokenizer *t, tok_work *w, int32_t nsym, int64_t off, tokenizer_ids *out,
                          int with_offsets, qerr *e) {
    if (nsym == 0) return 0;
    w->heap_n = 0;
    for (int32_t i = 0; i + 1 < nsym; i++) tok_try_pair(t, w, i);
    while (w->heap_n > 0) {
        tok_cand c = tok_heap_pop(w);
        tok_sym *a = &w->sym[c.pos];
        if (a->dead || a->id != c.left || a->next < 0) continue; /* stale */
        tok_sym *b = &w->sym[a->next];
        if (b->id != c.right) continue;
        uint64_t key = ((uint64_t)(uint32_t)c.left << 32) | (uint32_t)c.right;
        a->id = t->mres[tok_merge_slot(t, key)];
        a->nbytes += b->nbytes;
        b->nbytes = 0;
        b->dead = 1;
        a->next = b->next;
        if (b->next >= 0) w->sym[b->next].prev = c.pos;
        if (a->prev >= 0) tok_try_pair(t, w, a->prev);
        tok_try_pair(t, w, c.pos);
    }
    int64_t o = off;
    for (int32_t i = 0; i >= 0; i = w->sym[i].next) {
        if (tok_emit(out, w->sym[i].id, o, with_offsets, e)) return -1;
        o += w->sym[i].nbytes;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* pre-tokenization                                                          */

/* Split s[0..n) with the main regex; every match, and every gap between
 * matches (only possible on invalid UTF-8), is one BPE word. The subject is
 * exactly this stretch, so (?!\S) sees its end as HF's does. */
static int tok_split_main(const tokenizer *t, tok_work *w, const char *s, size_t n, int64_t off,
                          tokenizer_ids *out, int with_offsets, qerr *e) {
    size_t pos = 0;
    while (pos < n) {
        int rc = pcre2_match(t->re_main, (PCRE2_SPTR)s, n, pos, 0, w->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR buf[256];
            pcre2_get_error_message(rc, buf, sizeof buf);
            return qerr_set(e, "tokenizer: PCRE2 match failed: %s", (const char *)buf);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > pos && tok_bpe_word(t, w, s + pos, ms - pos, off + (int64_t)pos, out, with_offsets, e)) return -1;
        if (me == ms) me = ms + 1; /* cannot happen with these patterns; never loop */
        if (tok_bpe_word(t, w, s + ms, me - ms, off + (int64_t)ms, out, with_offsets, e)) return -1;
        pos = me;
    }
    if (pos < n) return tok_bpe_word(t, w, s + pos, n - pos, off + (int64_t)pos, out, with_offsets, e);
    return 0;
}

static int tok_encode_nfc(const tokenizer *t, tok_work *w, const char *s, size_t n, int64_t off,
                          tokenizer_ids *out, int with_offsets, qerr *e);
static int tok_encode_normalized(const tokenizer *t, tok_work *w, const char *s, size_t n, int64_t off,
                                 tokenizer_ids *out, int with_offsets, qerr *e);

/* One stretch of text without added tokens. */
static int tok_encode_plain(const tokenizer *t, tok_work *w, const char *s, size_t n, int64_t off,
                            tokenizer_ids *out, int with_offsets, qerr *e) {
    if (t->nfc) return tok_encode_nfc(t, w, s, n, off, out, with_offsets, e);
    return tok_encode_normalized(t, w, s, n, off, out, with_offsets, e);
}

static int tok_encode_normalized(const tokenizer *t, tok_work *w, const char *s, size_t n, int64_t off,
                                 tokenizer_ids *out, int with_offsets, qerr *e) {
    if (t->spm) {
        int prefix = 0;
        int starts_escaped = n > 0 && (s[0] == ' ' || (n >= 3 && !memcmp(s, "\xe2\x96\x81", 3)));
        switch (t->prepend) {
        case TOK_PREPEND_NEVER: break;
        case TOK_PREPEND_LEGACY: prefix = n > 0; break;
        case TOK_PREPEND_ALWAYS: prefix = !starts_escaped; break;
        case TOK_PREPEND_FIRST: prefix = !starts_escaped && off == 0; break;
        }
        return tok_spm_word(t, w, s, n, prefix, off, out, with_offsets, e);
    }
    if (t->pre != TOK_PRE_DIGITS_GPT2) return tok_split_main(t, w, s, n, off, out, with_offsets, e);
    /* HF Digits(individual_digits=True): each \p{N} character isolated. */
    size_t pos = 0;
    while (pos < n) {
        int rc = pcre2_match(t->re_digit, (PCRE2_SPTR)s, n, pos, 0, w->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR buf[256];
            pcre2_get_error_message(rc, buf, sizeof buf);
            return qerr_set(e, "tokenizer: PCRE2 match failed: %s", (const char *)buf);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > pos && tok_split_main(t, w, s + pos, ms - pos, off + (int64_t)pos, out, with_offsets, e))
            return -1;
        if (tok_bpe_word(t, w, s + ms, me - ms, off + (int64_t)ms, out, with_offsets, e)) return -1;
        pos = me;
    }
    if (pos < n) return tok_split_main(t, w, s + pos, n - pos, off + (int64_t)pos, out, with_offsets, e);
    return 0;
}

/* NFC (Unicode normalization form C, utf8proc) of one segment before
 * pre-tokenization, as HF's NFC normalizer. Each extended grapheme cluster
 * is normalized on its own (canonical composition and reordering never cross
 * a cluster boundary), which also gives the offsets: a token starting inside
 * a cluster that NFC changed gets the cluster's start plus its position in
 * the normalized cluster, clamped to the cluster. Text that is already NFC
 * (the common case, checked first) is encoded as it is. */
static int tok_encode_nfc(const tokenizer *t, tok_work *w, const char *s, size_t n, int64_t off,
                          tokenizer_ids *out, int with_offsets, qerr *e) {
    size_t i = 0;
    while (i < n && (uint8_t)s[i] < 0x80) i++;
    if (i == n) return tok_encode_normalized(t, w, s, n, off, out, with_offsets, e);
    utf8proc_uint8_t *whole = NULL;
    utf8proc_ssize_t wl = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &whole,
                                       UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (wl < 0 || ((size_t)wl == n && !memcmp(whole, s, n))) {
        /* already NFC, or not valid UTF-8 (HF never sees that: its input is a str) */
        free(whole);
        return tok_encode_normalized(t, w, s, n, off, out, with_offsets, e);
    }
    free(whole);
    /* cluster by cluster: normalized text and (normalized start, original start, original length) per cluster */
    size_t cap = 2 * n + 16, k = 0, nc = 0, ccap = 64;
    char *norm = malloc(cap);
    int64_t(*cl)[4] = malloc(ccap * sizeof *cl);
    if (!norm || !cl) {
        free(norm);
        free(cl);
        return qerr_set(e, "out of memory normalizing text");
    }
    int rc = 0;
    utf8proc_int32_t state = 0, prev = -1;
    size_t start = 0;
    for (size_t p = 0; p <= n;) {
        utf8proc_int32_t cp = -1;
        utf8proc_ssize_t l = 0;
        if (p < n) {
            l = utf8proc_iterate((const utf8proc_uint8_t *)s + p, (utf8proc_ssize_t)(n - p), &cp);
            if (l <= 0) { l = 1; cp = 0xFFFD; } /* unreachable: the whole text mapped */
        }
        int brk = p == n || (prev >= 0 && utf8proc_grapheme_break_stateful(prev, cp, &state));
        if (brk && p > start) {
            utf8proc_uint8_t *c = NULL;
            utf8proc_ssize_t cn = utf8proc_map((const utf8proc_uint8_t *)s + start, (utf8proc_ssize_t)(p - start), &c,
                                               UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            if (cn < 0) {
                rc = qerr_set(e, "tokenizer: NFC failed: %s", utf8proc_errmsg(cn));
                goto out;
            }
            if (k + (size_t)cn > cap) {
                cap = 2 * (k + (size_t)cn);
                char *nn = realloc(norm, cap);
                if (!nn) { free(c); rc = qerr_set(e, "out of memory normalizing text"); goto out; }
                norm = nn;
            }
            if (nc == ccap) {
                ccap *= 2;
                int64_t(*ncl)[4] = realloc(cl, ccap * sizeof *cl);
                if (!ncl) { free(c); rc = qerr_set(e, "out of memory normalizing text"); goto out; }
                cl = ncl;
            }
            memcpy(norm + k, c, (size_t)cn);
            cl[nc][0] = (int64_t)k;
            cl[nc][1] = (int64_t)start;
            cl[nc][2] = (int64_t)(p - start);
            cl[nc][3] = (size_t)cn != p - start || memcmp(c, s + start, (size_t)cn); /* changed */
            nc++;
            k += (size_t)cn;
            free(c);
            start = p;
        }
        if (p == n) break;
        prev = cp;
        p += (size_t)l;
    }
    size_t first = out->n;
    rc = tok_encode_normalized(t, w, norm, k, 0, out, with_offsets, e);
    if (rc || !with_offsets) goto out;
    size_t c = 0;
    for (size_t j = first; j < out->n; j++) {
        int64_t q = out->offsets[j];
        while (c + 1 < nc && cl[c + 1][0] <= q) c++;
        int64_t rel = q - cl[c][0];
        if (cl[c][3] && rel >= cl[c][2]) rel = cl[c][2] - 1;
        out->offsets[j] = off + cl[c][1] + rel;
    }
out:
    free(norm);
    free(cl);
    return rc;
}

/* Bytes of the UTF-8 character at s[0..n) (1 for an invalid byte). */
static size_t tok_char_len(const char *s, size_t n) {
    utf8proc_int32_t cp;
    utf8proc_ssize_t r = utf8proc_iterate((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &cp);
    return r > 0 ? (size_t)r : 1;
}

/* s[0..n) is one character with Unicode's White_Space property (Rust char::is_whitespace, which HF's
 * lstrip / rstrip use). */
static int tok_rust_space(const char *s, size_t n) {
    utf8proc_int32_t c;
    if (utf8proc_iterate((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &c) != (utf8proc_ssize_t)n) return 0;
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* The added token starting at s[0..n), longest first, or -1. */
static int32_t tok_match_added(const tokenizer *t, const char *s, size_t n, int parse_special) {
    const uint8_t b = (uint8_t)s[0];
    for (int k = t->sp_start[b]; k < t->sp_start[b + 1]; k++) {
        int32_t id = t->sp_ids[k];
        if (!parse_special && t->tok_type[id] != TOKENIZER_TOKEN_USER_DEFINED) continue;
        uint32_t l = t->tok_len[id];
        if (l <= n && memcmp(s, tok_text(t, id), l) == 0) return id;
    }
    return -1;
}

static int tok_encode_impl(const tokenizer *t, const char *text, size_t len, int parse_special, int64_t base,
                           tokenizer_ids *out, int with_offsets, qerr *e) {
    if (tok_ids_reserve(out, len / 3 + 8, with_offsets, e)) return -1;
    tok_work w = {0};
    w.md = pcre2_match_data_create(1, NULL);
    if (!w.md) return qerr_set(e, "out of memory (PCRE2 match data)");
    int rc = 0;
    size_t pos = 0, i = 0;
    while (i < len) {
        if (t->sp_first[(uint8_t)text[i]]) {
            int32_t id = tok_match_added(t, text + i, len - i, parse_special);
            if (id >= 0) {
                size_t start = i, stop = i + t->tok_len[id];
                uint8_t fl = t->strip ? t->strip[id] : 0;
                if (fl & TOK_LSTRIP) /* HF find_matches: back over white space, not before the previous match */
                    while (start > pos) {
                        size_t k = start - 1;
                        while (k > pos && ((uint8_t)text[k] & 0xC0) == 0x80) k--;
                        if (!tok_rust_space(text + k, start - k)) break;
                        start = k;
                    }
                if (fl & TOK_RSTRIP)
                    while (stop < len) {
                        size_t l = tok_char_len(text + stop, len - stop);
                        if (!tok_rust_space(text + stop, l)) break;
                        stop += l;
                    }
                if (start > pos && (rc = tok_encode_plain(t, &w, text + pos, start - pos, base + (int64_t)pos, out,
                                                          with_offsets, e)))
                    goto done;
                if ((rc = tok_emit(out, id, base + (int64_t)start, with_offsets, e))) goto done;
                i = stop;
                pos = i;
                continue;
            }
        }
        i++;
    }
    if (pos < len) rc = tok_encode_plain(t, &w, text + pos, len - pos, base + (int64_t)pos, out, with_offsets, e);
done:
    pcre2_match_data_free(w.md);
    free(w.sym);
    free(w.heap);
    free(w.spell);
    return rc;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int parse_special, tokenizer_ids *out,
                     qerr *e) {
    return tok_encode_impl(t, text, len, parse_special, 0, out, out->offsets != NULL, e);
}

int tokenizer_encode_offsets(const tokenizer *t, const char *text, size_t len, int parse_special, int64_t base,
                             tokenizer_ids *out, qerr *e) {
    return tok_encode_impl(t, text, len, parse_special, base, out, 1, e);
}

/* ------------------------------------------------------------------------ */
/* decoding and accessors                                                    */

int tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len, qerr *e) {
    *text = NULL;
    *len = 0;
    size_t cap = 1;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return qerr_set(e, "tokenizer_decode: id %d at position %zu is outside [0, %d)", ids[i], i, t->n_vocab);
        cap += t->tok_len[ids[i]];
    }
    char *buf = qmalloc(cap, e);
    if (!buf) return -1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *s = (const uint8_t *)tok_text(t, ids[i]);
        uint32_t l = t->tok_len[ids[i]];
        int ty = t->tok_type[ids[i]];
        if (ty == TOKENIZER_TOKEN_CONTROL || ty == TOKENIZER_TOKEN_USER_DEFINED) {
            memcpy(buf + k, s, l);
            k += l;
            continue;
        }
        if (t->spm) { /* HF decoders Replace(U+2581, " ") + ByteFallback (the leading space is kept) */
            unsigned v;
            if (ty == TOKENIZER_TOKEN_BYTE && l == 6 && sscanf((const char *)s, "<0x%2X>", &v) == 1) {
                buf[k++] = (char)v;
                continue;
            }
            for (uint32_t j = 0; j < l;) {
                if (j + 3 <= l && !memcmp(s + j, "\xe2\x96\x81", 3)) {
                    buf[k++] = ' ';
                    j += 3;
                } else {
                    buf[k++] = (char)s[j++];
                }
            }
            continue;
        }
        for (uint32_t j = 0; j < l;) {
            /* Byte-alphabet code points are < 0x200: one or two UTF-8 bytes. */
            int cp = -1, w = 1;
            if (s[j] < 0x80) {
                cp = s[j];
            } else if ((s[j] & 0xE0) == 0xC0 && j + 1 < l && (s[j + 1] & 0xC0) == 0x80) {
                cp = ((s[j] & 0x1F) << 6) | (s[j + 1] & 0x3F);
                w = 2;
            }
            if (cp >= 0 && cp < 512 && t->cp_byte[cp] >= 0) {
                buf[k++] = (char)t->cp_byte[cp];
            } else {
                buf[k++] = (char)s[j]; /* not in the alphabet: keep the raw byte */
                w = 1;
            }
            j += (uint32_t)w;
        }
    }
    buf[k] = 0;
    *text = buf;
    *len = k;
    return 0;
}

int32_t tokenizer_n_vocab(const tokenizer *t) { return t->n_vocab; }
int32_t tokenizer_bos_id(const tokenizer *t) { return t->bos; }
int32_t tokenizer_eos_id(const tokenizer *t) { return t->eos; }
int32_t tokenizer_pad_id(const tokenizer *t) { return t->pad; }
int32_t tokenizer_unk_id(const tokenizer *t) { return t->unk; }
int tokenizer_add_bos(const tokenizer *t) { return t->add_bos; }
int tokenizer_add_eos(const tokenizer *t) { return t->add_eos; }
const char *tokenizer_chat_template(const tokenizer *t) { return t->chat_template; }
const char *tokenizer_pre_name(const tokenizer *t) { return t->pre_name; }

int32_t tokenizer_find_token(const tokenizer *t, const char *text) {
    return tok_vocab_lookup(t, text, strlen(text));
}

const char *tokenizer_token_text(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab ? tok_text(t, id) : NULL;
}

int tokenizer_token_type_of(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab ? t->tok_type[id] : -1;
}

int tokenizer_is_spm(const tokenizer *t) { return t->spm; }

int tokenizer_add_space_prefix(const tokenizer *t) { return t->spm && t->prepend != TOK_PREPEND_NEVER; }

int64_t tokenizer_derived_merges(const tokenizer *t, const int32_t **left, const int32_t **right) {
    *left = t->dm_left;
    *right = t->dm_right;
    return t->n_dm;
}

int tokenizer_token_strip(const tokenizer *t, int32_t id) {
    return t->strip && id >= 0 && id < t->n_vocab ? t->strip[id] : 0;
}
