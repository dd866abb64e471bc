/* data/chat.c — known chat templates, rendered in C (see chat.h). Each
 * renderer below follows its Jinja source line by line; the sources are the
 * model repositories' own (llama.cpp's models/templates copies, fetched by
 * scripts/fetch_vocab.sh, the GGUFs' tokenizer.chat_template, and Llama-2-chat's
 * tokenizer_config.json in tests/fixtures/templates/). transformers renders
 * with trim_blocks and lstrip_blocks; these templates put all their output in
 * {{ }} expressions with whitespace control, so only the expressions matter.
 */
#include "data/chat.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"

typedef enum chat_kind {
    CHAT_CHATML,     /* SmolLM2 / Qwen2: default system turn when messages[0] is not system */
    CHAT_QWEN25,     /* Qwen2.5: system header always; later system messages are turns */
    CHAT_LLAMA31,    /* Llama 3.1 */
    CHAT_LLAMA2,     /* Llama-2-chat */
    CHAT_MISTRAL_V3, /* Mistral Nemo / v3 */
    CHAT_PHI3,       /* Phi-3 mini (GGUF) */
    CHAT_PHI35,      /* Phi-3.5 mini */
    /* axolotl's own templates (src/axolotl/utils/chat_templates/templates/<name>.jinja, 0.19.0) */
    CHAT_AXO_LLAMA3,     /* llama3: bos once, headers, content|trim, <|eot_id|>; no system header */
    CHAT_AXO_MISTRAL_V1, /* mistral_v1: " [INST] " .. " [/INST]", " " content eos; system before the first user */
    CHAT_AXO_MISTRAL_V2V3, /* mistral_v2v3: "[INST] " .. "[/INST]", " " content|trim eos; system before the last user */
    CHAT_AXO_PHI3,       /* phi_3: bos, <|system|> rendered, user turns end with <|assistant|>\n */
    CHAT_AXO_PHI35,      /* phi_35: Phi-3.5 without the final eos */
    CHAT_AXO_GEMMA3,     /* gemma3: bos, <start_of_turn>user|model, system folded into the first user turn */
} chat_kind;

struct chat_template {
    uint64_t hash; /* chat_template_hash of the source */
    const char *name;
    chat_kind kind;
    const char *system; /* default system message, if the template has one */
    const char *axolotl; /* axolotl's name for this text (chat_template: <name>), or NULL */
};

static const chat_template KNOWN[] = {
    {0x406244e5f006a13aull, "SmolLM2", CHAT_CHATML, "You are a helpful AI assistant named SmolLM, trained by Hugging Face", NULL},
    {0x999a8f7ad39e713dull, "Qwen2", CHAT_CHATML, "You are a helpful assistant", NULL},
    {0x14f39dfcc63bcdcbull, "Qwen2.5", CHAT_QWEN25, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "qwen_25"},
    {0xc0e2a829a7f6e18aull, "Llama 3.1", CHAT_LLAMA31, NULL, NULL},
    {0x9bc3084ee9b2cf55ull, "Llama 2", CHAT_LLAMA2, NULL, NULL},
    {0xea6074b922d3f96dull, "Mistral v3 (Nemo)", CHAT_MISTRAL_V3, NULL, NULL},
    {0x26b23770dd3f6de9ull, "Phi-3", CHAT_PHI3, NULL, NULL},
    {0x36a72d821e8ac96full, "Phi-3.5", CHAT_PHI35, NULL, NULL},
    /* axolotl 0.19.0's templates (tests/test_reference_axolotl_chat.c) */
    {0xb885985d8b9a5a01ull, "axolotl chatml", CHAT_CHATML, NULL, "chatml"},
    {0x7ffb9eb98a911ae6ull, "axolotl llama3", CHAT_AXO_LLAMA3, NULL, "llama3"},
    {0x2eac381236faee93ull, "axolotl mistral_v1", CHAT_AXO_MISTRAL_V1, NULL, "mistral_v1"},
    {0x7ef8efd1ba56fc70ull, "axolotl mistral_v2v3", CHAT_AXO_MISTRAL_V2V3, NULL, "mistral_v2v3"},
    {0x925240bde6082d37ull, "axolotl mistral_v3_tekken", CHAT_MISTRAL_V3, NULL, "mistral_v3_tekken"},
    {0x7a1ff230c05aacf4ull, "axolotl phi_3", CHAT_AXO_PHI3, NULL, "phi_3"},
    {0x23dbb0a81bf1a077ull, "axolotl phi_35", CHAT_AXO_PHI35, NULL, "phi_35"},
    {0x55bf04d289ba85d7ull, "axolotl gemma3", CHAT_AXO_GEMMA3, NULL, "gemma3"},
};
#define N_KNOWN (sizeof KNOWN / sizeof KNOWN[0])

/* ------------------------------------------------------------------------ */

/* Python's str.isspace() for one code point (what Jinja's trim and str.strip() remove). */
static int py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Decode the code point at s[i] (valid UTF-8: the dataset reader checks it); returns its length. */
static size_t utf8_at(const char *s, size_t i, uint32_t *cp) {
    const unsigned char *u = (const unsigned char *)s + i;
    if (u[0] < 0x80) { *cp = u[0]; return 1; }
    if ((u[0] & 0xE0) == 0xC0 && u[1]) { *cp = ((u[0] & 0x1Fu) << 6) | (u[1] & 0x3Fu); return 2; }
    if ((u[0] & 0xF0) == 0xE0 && u[1] && u[2]) {
        *cp = ((u[0] & 0x0Fu) << 12) | ((u[1] & 0x3Fu) << 6) | (u[2] & 0x3Fu);
        return 3;
    }
    if ((u[0] & 0xF8) == 0xF0 && u[1] && u[2] && u[3]) {
        *cp = ((u[0] & 0x07u) << 18) | ((u[1] & 0x3Fu) << 12) | ((u[2] & 0x3Fu) << 6) | (u[3] & 0x3Fu);
        return 4;
    }
    *cp = u[0];
    return 1;
}

/* Python str.strip(): [*a, *b) of s without leading/trailing white space. */
static void py_strip(const char *s, size_t *a, size_t *b) {
    size_t n = strlen(s), i = 0;
    while (i < n) {
        uint32_t c;
        size_t l = utf8_at(s, i, &c);
        if (!py_space(c)) break;
        i += l;
    }
    size_t end = i, j = i;
    while (j < n) {
        uint32_t c;
        size_t l = utf8_at(s, j, &c);
        j += l;
        if (!py_space(c)) end = j;
    }
    *a = i;
    *b = end;
}

static int span_add(chat_spans *sp, size_t a, size_t b, qerr *e) {
    if (!sp) return 0;
    if (sp->n == sp->cap) {
        size_t cap = sp->cap ? 2 * sp->cap : 16;
        size_t *nv = realloc(sp->v, 2 * cap * sizeof *nv);
        if (!nv) return qerr_set(e, "out of memory");
        sp->v = nv;
        sp->cap = cap;
    }
    sp->v[2 * sp->n] = a;
    sp->v[2 * sp->n + 1] = b;
    sp->n++;
    return 0;
}

uint64_t chat_template_hash(const char *source) {
    size_t a, b;
    py_strip(source, &a, &b);
    return xxh64(source + a, b - a, 0);
}

int chat_template_find(const char *source, const chat_template **out, qerr *e) {
    *out = NULL;
    if (!source) return qerr_set(e, "the model has no chat template (tokenizer.chat_template)");
    uint64_t h = chat_template_hash(source);
    for (size_t i = 0; i < N_KNOWN; i++)
        if (KNOWN[i].hash == h) {
            *out = &KNOWN[i];
            return 0;
        }
    char head[64];
    size_t k = 0;
    for (const char *p = source; *p && k + 1 < sizeof head; p++) head[k++] = *p == '\n' ? ' ' : *p;
    head[k] = 0;
    return qerr_set(e,
                    "chat template not supported: XXH64 %016" PRIx64 " (\"%s...\") is none of the templates qlora "
                    "renders exactly (SmolLM2, Qwen2, Qwen2.5, Llama 3.1, Llama 2, Mistral v3 (Nemo), Phi-3, "
                    "Phi-3.5, and axolotl's chatml, qwen_25, llama3, mistral_v1, mistral_v2v3, mistral_v3_tekken, "
                    "phi_3, phi_35, gemma3); it is not approximated",
                    h, head);
}

int chat_template_of(const tokenizer *t, const chat_template **out, qerr *e) {
    return chat_template_find(tokenizer_chat_template(t), out, e);
}

const char *chat_template_name(const chat_template *ct) { return ct->name; }

/* ------------------------------------------------------------------------ */

/* axolotl's named templates that qlora does not render, each with the reason (chat_template_named). */
static const struct {
    const char *name, *why;
} AXO_REFUSED[] = {
    {"llama3_2_vision", "its system header carries the day's date (strftime_now: \"Today Date: 07 Dec 2026\" "
                        "today), so the same data renders differently from day to day; use llama3, or the "
                        "model's own template (tokenizer_default: Llama 3.1's fixed \"26 Jul 2024\")"},
    {"alpaca", "not rendered here; use type: alpaca for instruction / input / output records"},
    {"gemma", "the template of Gemma 1 and Gemma 2, model families qlora does not run (it runs Gemma 3: "
              "chat_template: gemma3 renders the same turns and folds a system message into the first user turn)"},
};

int chat_template_named(const char *name, const chat_template **out, qerr *e) {
    *out = NULL;
    for (size_t i = 0; i < N_KNOWN; i++)
        if (KNOWN[i].axolotl && !strcmp(KNOWN[i].axolotl, name)) {
            *out = &KNOWN[i];
            return 0;
        }
    for (size_t i = 0; i < sizeof AXO_REFUSED / sizeof AXO_REFUSED[0]; i++)
        if (!strcmp(AXO_REFUSED[i].name, name))
            return qerr_set(e, "chat_template: \"%s\": refused: %s", name, AXO_REFUSED[i].why);
    return qerr_set(e, "chat_template: \"%s\" is not one of axolotl's templates qlora renders exactly (chatml, "
                       "qwen_25, llama3, mistral_v1, mistral_v2v3, mistral_v3_tekken, phi_3, phi_35, gemma3; their "
                       "model families are the ones qlora runs)", name);
}

const char *chat_template_axolotl_name(const chat_template *ct) { return ct->axolotl; }

/* The texts of axolotl's named templates (scripts/axolotl_chat_jinja.py), for exports only. */
static const struct {
    const char *name, *text;
} AXO_JINJA[] = {
#include "data/chat_axolotl_jinja.inc"
};

const char *chat_template_axolotl_source(const chat_template *ct) {
    if (!ct->axolotl) return NULL;
    for (size_t i = 0; i < sizeof AXO_JINJA / sizeof AXO_JINJA[0]; i++)
        if (!strcmp(AXO_JINJA[i].name, ct->axolotl)) return AXO_JINJA[i].text;
    return NULL;
}

int chat_template_system_in_user_turn(const chat_template *ct) {
    return ct->kind == CHAT_MISTRAL_V3 || ct->kind == CHAT_AXO_MISTRAL_V1 || ct->kind == CHAT_AXO_MISTRAL_V2V3;
}

const char *chat_template_eot(const chat_template *ct, const tokenizer *t) {
    switch (ct->kind) {
    case CHAT_CHATML:
    case CHAT_QWEN25: return "<|im_end|>";
    case CHAT_LLAMA31:
    case CHAT_AXO_LLAMA3: return "<|eot_id|>";
    case CHAT_PHI3:
    case CHAT_AXO_PHI3:
    case CHAT_PHI35:
    case CHAT_AXO_PHI35: return "<|end|>";
    case CHAT_AXO_GEMMA3: return "<end_of_turn>";
    default: return tokenizer_eos_id(t) >= 0 ? tokenizer_token_text(t, tokenizer_eos_id(t)) : NULL;
    }
}

static int role_is(const chat_message *m, const char *r) { return !strcmp(m->role, r); }

/* The roles a template renders as chat_render does: ChatML (the models' and axolotl's) and the llama3
 * templates print any role name (Llama 3.1 renders "tool" and "ipython" differently: refused); the
 * others know system, user and assistant only (axolotl's phi_3 / phi_35 would drop other roles
 * silently: refused here). */
static int check_roles(const chat_template *ct, const chat_message *msgs, int n, qerr *e) {
    for (int i = 0; i < n; i++) {
        const chat_message *m = &msgs[i];
        int ok = role_is(m, "system") || role_is(m, "user") || role_is(m, "assistant");
        if (ct->kind == CHAT_CHATML || ct->kind == CHAT_AXO_LLAMA3) ok = 1;
        if (ct->kind == CHAT_LLAMA31) ok = !role_is(m, "tool") && !role_is(m, "ipython");
        if (!ok)
            return qerr_set(e, "message %d: role \"%s\" is not supported with the %s chat template", i, m->role,
                            ct->name);
    }
    return 0;
}

static const char *special_text(const tokenizer *t, int32_t id, const char *what, const chat_template *ct, qerr *e) {
    const char *s = id >= 0 ? tokenizer_token_text(t, id) : NULL;
    if (!s) qerr_set(e, "the %s chat template uses %s, and the tokenizer has none", ct->name, what);
    return s;
}

/* The renderer's output: the text and the trained spans of chat_render. */
typedef struct rctx {
    strbuf *b;
    chat_spans *sp;
    qerr *e;
} rctx;

/* Append a message's content (Python strip() applied when `strip`); returns where it starts. */
static size_t put_content(rctx *r, const char *s, int strip) {
    size_t x = 0, y = strlen(s);
    if (strip) py_strip(s, &x, &y);
    size_t a = r->b->n;
    strbuf_put(r->b, s + x, y - x);
    return a;
}

/* An assistant turn's trained span (chat_render): from its content through the end-of-turn text. */
static int trained(rctx *r, size_t a) { return span_add(r->sp, a, r->b->n, r->e); }

/* "<|im_start|>" role "\n" content "<|im_end|>" "\n", trained: content + <|im_end|> for the assistant. */
static int chatml_turn(rctx *r, const chat_message *msgs, int i) {
    strbuf_puts(r->b, "<|im_start|>");
    strbuf_puts(r->b, msgs[i].role);
    strbuf_puts(r->b, "\n");
    size_t a = put_content(r, msgs[i].content, 0);
    strbuf_puts(r->b, "<|im_end|>");
    if (role_is(&msgs[i], "assistant") && trained(r, a)) return -1;
    strbuf_puts(r->b, "\n");
    return 0;
}

/* Llama 2 and Mistral reject what their templates' raise_exception rejects. */
static int check_alternation(const chat_template *ct, const chat_message *loop, int n, qerr *e) {
    for (int i = 0; i < n; i++) {
        if (role_is(&loop[i], "user") != (i % 2 == 0))
            return qerr_set(e, "the %s chat template rejects this conversation: after the optional system message, "
                               "roles must alternate user/assistant/user/... (message %d is \"%s\")",
                            ct->name, i, loop[i].role);
    }
    return 0;
}

/* Mistral templates: no system message after the first. */
static int check_no_later_system(const chat_template *ct, const chat_message *loop, int nl, int off, qerr *e) {
    for (int i = 0; i < nl; i++)
        if (role_is(&loop[i], "system"))
            return qerr_set(e, "the %s chat template rejects this conversation: only user and assistant roles, "
                               "with an optional first system message (message %d is \"system\")",
                            ct->name, i + off);
    return 0;
}

static int render_llama2(const chat_template *ct, const tokenizer *t, const chat_message *msgs, int n, rctx *r) {
    const chat_message *loop = msgs;
    int nl = n;
    const char *system = NULL, *bos, *eos;
    if (n > 0 && role_is(&msgs[0], "system")) {
        system = msgs[0].content;
        loop++, nl--;
    }
    if (check_alternation(ct, loop, nl, r->e)) return -1;
    if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, r->e)) ||
        !(eos = special_text(t, tokenizer_eos_id(t), "eos_token", ct, r->e)))
        return -1;
    strbuf content = {0};
    int rc = 0;
    for (int i = 0; i < nl && !rc; i++) {
        strbuf_clear(&content);
        if (i == 0 && system) {
            strbuf_puts(&content, "<<SYS>>\n");
            strbuf_puts(&content, system);
            strbuf_puts(&content, "\n<</SYS>>\n\n");
        }
        strbuf_puts(&content, loop[i].content);
        if (content.oom) break;
        if (role_is(&loop[i], "system")) continue; /* passes the alternation check at an odd index; rendered as nothing */
        size_t x, y;
        py_strip(content.p, &x, &y);
        if (role_is(&loop[i], "user")) {
            strbuf_puts(r->b, bos);
            strbuf_puts(r->b, "[INST] ");
        } else {
            strbuf_puts(r->b, " ");
        }
        size_t base = r->b->n; /* content.p[x] lands here */
        strbuf_put(r->b, content.p + x, y - x);
        if (role_is(&loop[i], "user")) {
            strbuf_puts(r->b, " [/INST]");
        } else { /* assistant (alternation checked) */
            strbuf_puts(r->b, " ");
            strbuf_puts(r->b, eos);
            rc = trained(r, base);
        }
    }
    if (content.oom) rc = qerr_set(r->e, "out of memory");
    free(content.p);
    return rc;
}

/* Mistral: v3 (Nemo, axolotl's mistral_v3_tekken), axolotl's mistral_v2v3 and mistral_v1. */
static int render_mistral(const chat_template *ct, const tokenizer *t, const chat_message *msgs, int n, rctx *r) {
    const chat_message *loop = msgs;
    int nl = n, off = 0;
    const char *system = NULL, *bos, *eos;
    if (n > 0 && role_is(&msgs[0], "system")) {
        system = msgs[0].content;
        loop++, nl--, off = 1;
    }
    if (check_no_later_system(ct, loop, nl, off, r->e) || check_alternation(ct, loop, nl, r->e)) return -1;
    if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, r->e)) ||
        !(eos = special_text(t, tokenizer_eos_id(t), "eos_token", ct, r->e)))
        return -1;
    int v1 = ct->kind == CHAT_AXO_MISTRAL_V1, v2 = ct->kind == CHAT_AXO_MISTRAL_V2V3;
    strbuf_puts(r->b, bos);
    int rc = 0;
    for (int i = 0; i < nl && !rc; i++) {
        if (role_is(&loop[i], "user")) {
            strbuf_puts(r->b, v1 ? " [INST] " : v2 ? "[INST] " : "[INST]");
            /* v1: {%- if loop.first and system_message is defined %}; v2v3 / v3: loop.last */
            if (system && (v1 ? i == 0 : i == nl - 1)) {
                put_content(r, system, 0);
                strbuf_puts(r->b, "\n\n");
            }
            put_content(r, loop[i].content, 0);
            strbuf_puts(r->b, v1 ? " [/INST]" : "[/INST]");
        } else {
            if (v1 || v2) strbuf_puts(r->b, " ");
            size_t a = put_content(r, loop[i].content, v2);
            strbuf_puts(r->b, eos);
            rc = trained(r, a);
        }
    }
    return rc; /* the templates ignore add_generation_prompt */
}

/* axolotl's gemma3 (templates/gemma3.jinja, Gemma 3's own template): {{ bos_token }}; a leading system
 * message becomes first_user_prefix = content + "\n\n" (not trimmed) and leaves the loop; roles must
 * alternate user/model from there (raise_exception); each turn is "<start_of_turn>" + (assistant ->
 * "model", else the role) + "\n" + first_user_prefix on the first turn + content|trim + "<end_of_turn>\n";
 * add_generation_prompt: "<start_of_turn>model\n". A system message at an odd position passes the
 * alternation check and renders as a "system" turn, as the template does. */
static int render_gemma3(const chat_template *ct, const tokenizer *t, const chat_message *msgs, int n,
                         int add_generation_prompt, rctx *r) {
    const chat_message *loop = msgs;
    int nl = n;
    const char *system = NULL, *bos;
    if (n > 0 && role_is(&msgs[0], "system")) {
        system = msgs[0].content;
        loop++, nl--;
    }
    if (check_alternation(ct, loop, nl, r->e)) return -1;
    if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, r->e))) return -1;
    strbuf_puts(r->b, bos);
    for (int i = 0; i < nl; i++) {
        strbuf_puts(r->b, "<start_of_turn>");
        strbuf_puts(r->b, role_is(&loop[i], "assistant") ? "model" : loop[i].role);
        strbuf_puts(r->b, "\n");
        if (i == 0 && system) {
            put_content(r, system, 0);
            strbuf_puts(r->b, "\n\n");
        }
        size_t a = put_content(r, loop[i].content, 1);
        strbuf_puts(r->b, "<end_of_turn>");
        if (role_is(&loop[i], "assistant") && trained(r, a)) return -1;
        strbuf_puts(r->b, "\n");
    }
    if (add_generation_prompt) strbuf_puts(r->b, "<start_of_turn>model\n");
    return 0;
}

int chat_render(const chat_template *ct, const tokenizer *t, const chat_message *msgs, int n,
                int add_generation_prompt, strbuf *b, chat_spans *sp, qerr *e) {
    if (check_roles(ct, msgs, n, e)) return -1;
    size_t sp0 = sp ? sp->n : 0;
    rctx r = {b, sp, e};
    const char *bos = NULL, *eos = NULL;
    int rc = 0;
    switch (ct->kind) {
    case CHAT_CHATML:
        for (int i = 0; i < n && !rc; i++) {
            if (i == 0 && !role_is(&msgs[0], "system") && ct->system) {
                strbuf_puts(b, "<|im_start|>system\n");
                strbuf_puts(b, ct->system);
                strbuf_puts(b, "<|im_end|>\n");
            }
            rc = chatml_turn(&r, msgs, i);
        }
        if (add_generation_prompt) strbuf_puts(b, "<|im_start|>assistant\n");
        break;
    case CHAT_QWEN25:
        /* {%- if messages[0]['role'] == 'system' %} the system turn {%- else %} the default one */
        strbuf_puts(b, "<|im_start|>system\n");
        if (n > 0 && role_is(&msgs[0], "system"))
            put_content(&r, msgs[0].content, 0);
        else
            strbuf_puts(b, ct->system);
        strbuf_puts(b, "<|im_end|>\n");
        for (int i = 0; i < n && !rc; i++)
            if (!(i == 0 && role_is(&msgs[i], "system"))) rc = chatml_turn(&r, msgs, i);
        if (add_generation_prompt) strbuf_puts(b, "<|im_start|>assistant\n");
        break;
    case CHAT_LLAMA31: {
        if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, e))) return -1;
        strbuf_puts(b, bos);
        int first = 0;
        strbuf_puts(b, "<|start_header_id|>system<|end_header_id|>\n\n");
        strbuf_puts(b, "Cutting Knowledge Date: December 2023\n");
        strbuf_puts(b, "Today Date: 26 Jul 2024\n\n");
        if (n > 0 && role_is(&msgs[0], "system")) {
            put_content(&r, msgs[0].content, 1);
            first = 1;
        }
        strbuf_puts(b, "<|eot_id|>");
        for (int i = first; i < n && !rc; i++) {
            strbuf_puts(b, "<|start_header_id|>");
            strbuf_puts(b, msgs[i].role);
            strbuf_puts(b, "<|end_header_id|>\n\n");
            size_t a = put_content(&r, msgs[i].content, 1);
            strbuf_puts(b, "<|eot_id|>");
            if (role_is(&msgs[i], "assistant")) rc = trained(&r, a);
        }
        if (add_generation_prompt) strbuf_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    }
    case CHAT_AXO_LLAMA3:
        if (n > 0 && !(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, e))) return -1;
        for (int i = 0; i < n && !rc; i++) {
            if (i == 0) strbuf_puts(b, bos); /* {% if loop.index0 == 0 %}{% set content = bos_token + content %} */
            strbuf_puts(b, "<|start_header_id|>");
            strbuf_puts(b, msgs[i].role);
            strbuf_puts(b, "<|end_header_id|>\n\n");
            size_t a = put_content(&r, msgs[i].content, 1);
            strbuf_puts(b, "<|eot_id|>");
            if (role_is(&msgs[i], "assistant")) rc = trained(&r, a);
        }
        if (add_generation_prompt) strbuf_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case CHAT_LLAMA2:
        rc = render_llama2(ct, t, msgs, n, &r);
        break;
    case CHAT_AXO_GEMMA3:
        rc = render_gemma3(ct, t, msgs, n, add_generation_prompt, &r);
        break;
    case CHAT_MISTRAL_V3:
    case CHAT_AXO_MISTRAL_V1:
    case CHAT_AXO_MISTRAL_V2V3:
        rc = render_mistral(ct, t, msgs, n, &r);
        break;
    case CHAT_PHI3:
    case CHAT_AXO_PHI3:
        if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, e))) return -1;
        strbuf_puts(b, bos);
        for (int i = 0; i < n && !rc; i++) {
            if (role_is(&msgs[i], "user")) {
                strbuf_puts(b, "<|user|>\n");
                put_content(&r, msgs[i].content, 0);
                strbuf_puts(b, "<|end|>\n<|assistant|>\n");
            } else if (role_is(&msgs[i], "assistant")) {
                size_t a = put_content(&r, msgs[i].content, 0);
                strbuf_puts(b, "<|end|>");
                rc = trained(&r, a);
                strbuf_puts(b, "\n");
            } else if (ct->kind == CHAT_AXO_PHI3) { /* system; Phi-3's own template renders nothing for it */
                strbuf_puts(b, "<|system|>\n");
                put_content(&r, msgs[i].content, 0);
                strbuf_puts(b, "<|end|>\n");
            }
        }
        break; /* no add_generation_prompt: every user turn ends with <|assistant|>\n */
    case CHAT_PHI35:
    case CHAT_AXO_PHI35:
        for (int i = 0; i < n && !rc; i++) {
            const chat_message *m = &msgs[i];
            if (role_is(m, "system") && !m->content[0]) continue; /* {% if ... and message['content'] %} */
            strbuf_puts(b, role_is(m, "system") ? "<|system|>\n" : role_is(m, "user") ? "<|user|>\n" : "<|assistant|>\n");
            size_t a = put_content(&r, m->content, 0);
            strbuf_puts(b, "<|end|>");
            if (role_is(m, "assistant")) rc = trained(&r, a);
            strbuf_puts(b, "\n");
        }
        if (add_generation_prompt) {
            strbuf_puts(b, "<|assistant|>\n");
        } else if (ct->kind == CHAT_PHI35) {
            if (!(eos = special_text(t, tokenizer_eos_id(t), "eos_token", ct, e))) return -1;
            strbuf_puts(b, eos);
        }
        break;
    }
    if (!rc && b->oom) rc = qerr_set(e, "out of memory rendering a conversation");
    if (rc && sp) sp->n = sp0;
    return rc;
}

/* ------------------------------------------------------------------------ */

int chat_stop_ids(const tokenizer *t, int32_t *out, int max) {
    int n = 0;
    int32_t eos = tokenizer_eos_id(t);
    if (eos >= 0 && n < max) out[n++] = eos;
    static const char *const eot[] = {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"};
    const char *tmpl = tokenizer_chat_template(t);
    for (size_t i = 0; i < sizeof eot / sizeof eot[0] && n < max; i++) {
        int32_t id = tokenizer_find_token(t, eot[i]);
        if (id < 0 || id == eos) continue;
        /* the turn terminator of the template in use (any of them when there is no template) */
        if (tmpl && !strstr(tmpl, eot[i])) continue;
        out[n++] = id;
        break;
    }
    return n;
}

int chat_render_prompt(const tokenizer *t, const char *system, const char *user, char **out, qerr *e) {
    *out = NULL;
    const chat_template *ct;
    if (chat_template_of(t, &ct, e)) {
        qerr_prefix(e, "(use --raw to give the prompt text as it is)");
        return -1;
    }
    chat_message m[2];
    int n = 0;
    if (system) m[n++] = (chat_message){"system", system};
    m[n++] = (chat_message){"user", user};
    strbuf b = {0};
    if (chat_render(ct, t, m, n, 1, &b, NULL, e)) {
        free(b.p);
        return -1;
    }
    if (!b.p) strbuf_puts(&b, "");
    if (b.oom) {
        free(b.p);
        return qerr_set(e, "out of memory");
    }
    *out = b.p;
    return 0;
}
