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
} chat_kind;

struct chat_template {
    uint64_t hash; /* chat_template_hash of the source */
    const char *name;
    chat_kind kind;
    const char *system; /* default system message, if the template has one */
};

static const chat_template KNOWN[] = {
    {0x406244e5f006a13aull, "SmolLM2", CHAT_CHATML, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
    {0x999a8f7ad39e713dull, "Qwen2", CHAT_CHATML, "You are a helpful assistant"},
    {0x14f39dfcc63bcdcbull, "Qwen2.5", CHAT_QWEN25, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
    {0xc0e2a829a7f6e18aull, "Llama 3.1", CHAT_LLAMA31, NULL},
    {0x9bc3084ee9b2cf55ull, "Llama 2", CHAT_LLAMA2, NULL},
    {0xea6074b922d3f96dull, "Mistral v3 (Nemo)", CHAT_MISTRAL_V3, NULL},
    {0x26b23770dd3f6de9ull, "Phi-3", CHAT_PHI3, NULL},
    {0x36a72d821e8ac96full, "Phi-3.5", CHAT_PHI35, NULL},
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

static void put_stripped(strbuf *b, const char *s) {
    size_t x, y;
    py_strip(s, &x, &y);
    strbuf_put(b, s + x, y - x);
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
                    "Phi-3.5); it is not approximated",
                    h, head);
}

int chat_template_of(const tokenizer *t, const chat_template **out, qerr *e) {
    return chat_template_find(tokenizer_chat_template(t), out, e);
}

const char *chat_template_name(const chat_template *ct) { return ct->name; }

/* ------------------------------------------------------------------------ */

static int role_is(const chat_message *m, const char *r) { return !strcmp(m->role, r); }

/* The roles a template renders as chat_render does: SmolLM2's and Qwen2's
 * ChatML, and Llama 3.1, print any role name (Llama 3.1 renders "tool" and
 * "ipython" differently: refused); the others know system, user and
 * assistant only. */
static int check_roles(const chat_template *ct, const chat_message *msgs, int n, qerr *e) {
    for (int i = 0; i < n; i++) {
        const chat_message *m = &msgs[i];
        int ok = role_is(m, "system") || role_is(m, "user") || role_is(m, "assistant");
        if (ct->kind == CHAT_CHATML) ok = 1;
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

/* "<|im_start|>" role "\n" content "<|im_end|>" "\n", trained: content + <|im_end|> for the assistant. */
static int chatml_turn(strbuf *b, const chat_message *m, chat_spans *sp, qerr *e) {
    strbuf_puts(b, "<|im_start|>");
    strbuf_puts(b, m->role);
    strbuf_puts(b, "\n");
    size_t a = b->n;
    strbuf_puts(b, m->content);
    strbuf_puts(b, "<|im_end|>");
    if (role_is(m, "assistant") && span_add(sp, a, b->n, e)) return -1;
    strbuf_puts(b, "\n");
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

int chat_render(const chat_template *ct, const tokenizer *t, const chat_message *msgs, int n,
                int add_generation_prompt, strbuf *b, chat_spans *sp, qerr *e) {
    if (check_roles(ct, msgs, n, e)) return -1;
    size_t sp0 = sp ? sp->n : 0;
    const char *bos = NULL, *eos = NULL;
    int rc = 0;
    switch (ct->kind) {
    case CHAT_CHATML:
        for (int i = 0; i < n && !rc; i++) {
            if (i == 0 && !role_is(&msgs[0], "system")) {
                strbuf_puts(b, "<|im_start|>system\n");
                strbuf_puts(b, ct->system);
                strbuf_puts(b, "<|im_end|>\n");
            }
            rc = chatml_turn(b, &msgs[i], sp, e);
        }
        if (add_generation_prompt) strbuf_puts(b, "<|im_start|>assistant\n");
        break;
    case CHAT_QWEN25:
        /* {%- if messages[0]['role'] == 'system' %} the system turn {%- else %} the default one */
        strbuf_puts(b, "<|im_start|>system\n");
        strbuf_puts(b, n > 0 && role_is(&msgs[0], "system") ? msgs[0].content : ct->system);
        strbuf_puts(b, "<|im_end|>\n");
        for (int i = 0; i < n && !rc; i++)
            if (!(i == 0 && role_is(&msgs[i], "system"))) rc = chatml_turn(b, &msgs[i], sp, e);
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
            put_stripped(b, msgs[0].content);
            first = 1;
        }
        strbuf_puts(b, "<|eot_id|>");
        for (int i = first; i < n && !rc; i++) {
            strbuf_puts(b, "<|start_header_id|>");
            strbuf_puts(b, msgs[i].role);
            strbuf_puts(b, "<|end_header_id|>\n\n");
            size_t a = b->n;
            put_stripped(b, msgs[i].content);
            strbuf_puts(b, "<|eot_id|>");
            if (role_is(&msgs[i], "assistant")) rc = span_add(sp, a, b->n, e);
        }
        if (add_generation_prompt) strbuf_puts(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    }
    case CHAT_LLAMA2: {
        const chat_message *loop = msgs;
        int nl = n;
        const char *system = NULL;
        if (n > 0 && role_is(&msgs[0], "system")) {
            system = msgs[0].content;
            loop++;
            nl--;
        }
        if (check_alternation(ct, loop, nl, e)) return -1;
        if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, e)) ||
            !(eos = special_text(t, tokenizer_eos_id(t), "eos_token", ct, e)))
            return -1;
        strbuf content = {0};
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
            if (role_is(&loop[i], "user")) {
                strbuf_puts(b, bos);
                strbuf_puts(b, "[INST] ");
                put_stripped(b, content.p);
                strbuf_puts(b, " [/INST]");
            } else { /* assistant (alternation checked) */
                strbuf_puts(b, " ");
                size_t a = b->n;
                put_stripped(b, content.p);
                strbuf_puts(b, " ");
                strbuf_puts(b, eos);
                rc = span_add(sp, a, b->n, e);
            }
        }
        if (content.oom) rc = qerr_set(e, "out of memory");
        free(content.p);
        break;
    }
    case CHAT_MISTRAL_V3: {
        const chat_message *loop = msgs;
        int nl = n;
        const char *system = NULL;
        if (n > 0 && role_is(&msgs[0], "system")) {
            system = msgs[0].content;
            loop++;
            nl--;
        }
        for (int i = 0; i < nl; i++)
            if (role_is(&loop[i], "system"))
                return qerr_set(e, "the %s chat template rejects this conversation: only user and assistant roles, "
                                   "with an optional first system message (message %d is \"system\")",
                                ct->name, i + (system != NULL));
        if (check_alternation(ct, loop, nl, e)) return -1;
        if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, e)) ||
            !(eos = special_text(t, tokenizer_eos_id(t), "eos_token", ct, e)))
            return -1;
        strbuf_puts(b, bos);
        for (int i = 0; i < nl && !rc; i++) {
            if (role_is(&loop[i], "user")) {
                strbuf_puts(b, "[INST]");
                if (i == nl - 1 && system) { /* {%- if loop.last and system_message is defined %} */
                    strbuf_puts(b, system);
                    strbuf_puts(b, "\n\n");
                }
                strbuf_puts(b, loop[i].content);
                strbuf_puts(b, "[/INST]");
            } else {
                size_t a = b->n;
                strbuf_puts(b, loop[i].content);
                strbuf_puts(b, eos);
                rc = span_add(sp, a, b->n, e);
            }
        }
        break; /* the template ignores add_generation_prompt */
    }
    case CHAT_PHI3:
        if (!(bos = special_text(t, tokenizer_bos_id(t), "bos_token", ct, e))) return -1;
        strbuf_puts(b, bos);
        for (int i = 0; i < n && !rc; i++) {
            if (role_is(&msgs[i], "user")) {
                strbuf_puts(b, "<|user|>\n");
                strbuf_puts(b, msgs[i].content);
                strbuf_puts(b, "<|end|>\n<|assistant|>\n");
            } else if (role_is(&msgs[i], "assistant")) {
                size_t a = b->n;
                strbuf_puts(b, msgs[i].content);
                strbuf_puts(b, "<|end|>");
                rc = span_add(sp, a, b->n, e);
                strbuf_puts(b, "\n");
            } /* system: the template renders nothing */
        }
        break; /* no add_generation_prompt: every user turn ends with <|assistant|>\n */
    case CHAT_PHI35:
        for (int i = 0; i < n && !rc; i++) {
            const chat_message *m = &msgs[i];
            if (role_is(m, "system") && !m->content[0]) continue; /* {% if ... and message['content'] %} */
            strbuf_puts(b, role_is(m, "system") ? "<|system|>\n" : role_is(m, "user") ? "<|user|>\n" : "<|assistant|>\n");
            size_t a = b->n;
            strbuf_puts(b, m->content);
            strbuf_puts(b, "<|end|>");
            if (role_is(m, "assistant")) rc = span_add(sp, a, b->n, e);
            strbuf_puts(b, "\n");
        }
        if (add_generation_prompt) {
            strbuf_puts(b, "<|assistant|>\n");
        } else {
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
