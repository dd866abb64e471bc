/* data/jsonl.c — JSONL records → tokenized, label-masked documents.
 *
 * Prompt formats follow axolotl: `completion` (prompt_strategies/completion.py),
 * `alpaca` (prompters.py AlpacaPrompter, the "### Instruction:" format) and
 * `chat_template` (prompt_strategies/chat_template.py) through the model's
 * own chat template as data/chat.h renders it (known templates only,
 * recognised by hash; the others refused), instead of a Jinja engine.
 *
 * Masking works on the rendered text: each format records the byte spans it
 * trains on, the text is tokenized once with byte offsets, and a token is a
 * label if it overlaps a trained span. Tokenizing the whole text once (not
 * piece by piece) keeps the ids identical to what HF produces for the same
 * rendered string even when a BPE token straddles a span boundary.
 */
#include "data/dataset.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/file.h"
#include "core/strbuf.h"
#include "data/chat.h"

static const char ALPACA_PROMPT_INPUT[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n%s\n\n### Input:\n%s\n\n### Response:\n";
static const char ALPACA_PROMPT_NO_INPUT[] =
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n%s\n\n### Response:\n";

typedef enum ds_type { DS_COMPLETION, DS_ALPACA, DS_CHAT, DS_IO } ds_type;

/* A record that is malformed (invalid JSON, wrong shape, missing field), as
 * opposed to a failure of the machine (out of memory): only these may be
 * skipped when the spec asks for it (dataset_spec.skip_bad_lines). */
#define DS_BAD (-2)

static int ds_bad(qerr *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int ds_bad(qerr *e, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return DS_BAD;
}

/* One message of a conversation: its content's bytes in the text (a == b: not rendered / empty) and
 * whether it is trained (roles_to_train, or train_on_inputs). */
typedef struct ds_turn {
    size_t a, b;
    int train;
} ds_turn;

/* Growable rendered text plus the byte spans that are trained on; conversations give turns instead,
 * labelled by axolotl's rule (ds_chat_labels). */
typedef struct ds_render {
    strbuf text;   /* the rendered example */
    int64_t *span; /* (n_span, 2) [start, end) */
    size_t n_span, span_cap;
    ds_turn *turn; /* chat: one per message */
    size_t n_turn, turn_cap;
    int chat;                /* 1: label by turns */
    const char *opt[2];      /* chat: train_on_eot, train_on_eos */
    int32_t eot_ids[8];      /* chat: axolotl's eot_tokens as ids */
    int n_eot;
} ds_render;

/* axolotl's ChatTemplateStrategy._tokenize_single_prompt (prompt_strategies/chat_template.py, 0.19.0) on
 * a rendering tokenized into ids[0..n) with byte offsets off[] (token i is [off[i], end[i])):
 *   for each turn that is trained (or every turn under train_on_eos: all): its tokens are those that
 *   overlap its content (find_turn, by a placeholder diff; -1 when the content was not rendered); a
 *   trained turn's tokens are labels; then the first end-of-turn token (eot_tokens) and the first eos
 *   at or after the turn's end, each when at most 3 tokens away, are labels under "all", under "turn"
 *   for a trained turn, and under "last" only the last one found. find_first_*_token starts at
 *   index -1 for a turn not found (Python's range(-1, n): the last token first, where a match reads as
 *   "not found"), reproduced here. */
static void ds_chat_labels(const ds_render *r, const int32_t *ids, const int64_t *off, size_t n, int train_all,
                           int32_t eos_id, uint8_t *mask) {
    memset(mask, 0, n);
    if (n == 0) return;
    int all[2], turn[2], last[2];
    for (int k = 0; k < 2; k++) {
        const char *o = r->opt[k] ? r->opt[k] : "turn";
        all[k] = !strcmp(o, "all"), turn[k] = !strcmp(o, "turn"), last[k] = !strcmp(o, "last");
    }
    long last_idx[2] = {-1, -1};
    for (size_t t = 0; t < r->n_turn; t++) {
        int should = train_all || r->turn[t].train;
        if (!should && !all[0] && !all[1]) continue;
        long s = -1, e = -1;
        if (r->turn[t].b > r->turn[t].a) {
            size_t i = 0;
            while (i < n && (i + 1 < n ? off[i + 1] : (int64_t)r->text.n) <= (int64_t)r->turn[t].a) i++;
            size_t j = i;
            while (j < n && off[j] < (int64_t)r->turn[t].b) j++;
            if (i < n && j > i) s = (long)i, e = (long)j;
        }
        if (should && s >= 0)
            for (long i = s; i < e; i++) mask[i] = 1;
        for (int k = 0; k < 2; k++) { /* 0: EOT (eot_tokens), 1: EOS */
            long idx = -1;
            for (long i = e; i < (long)n; i++) {
                int32_t id = ids[i < 0 ? (long)n + i : i];
                int hit = 0;
                if (k == 1) hit = id == eos_id;
                else
                    for (int q = 0; q < r->n_eot && !hit; q++) hit = id == r->eot_ids[q];
                if (hit) {
                    idx = i;
                    break;
                }
            }
            if (idx == -1 || labs(idx - e) > 3) continue;
            last_idx[k] = idx;
            if (all[k] || (turn[k] && should)) mask[idx] = 1;
        }
    }
    for (int k = 0; k < 2; k++)
        if (last[k] && last_idx[k] != -1) mask[last_idx[k]] = 1;
}

static int ds_puts(ds_render *r, const char *s, qerr *e) {
    strbuf_puts(&r->text, s);
    return r->text.oom ? qerr_set(e, "out of memory rendering an example (%zu bytes)", r->text.n + strlen(s)) : 0;
}

static int ds_add_span(ds_render *r, size_t start, size_t end, qerr *e) {
    if (r->n_span == r->span_cap) {
        size_t cap = r->span_cap ? 2 * r->span_cap : 8;
        int64_t *ns = realloc(r->span, cap * 2 * sizeof *ns);
        if (!ns) return qerr_set(e, "out of memory rendering an example");
        r->span = ns;
        r->span_cap = cap;
    }
    r->span[2 * r->n_span] = (int64_t)start;
    r->span[2 * r->n_span + 1] = (int64_t)end;
    r->n_span++;
    return 0;
}

/* Tokenize the rendered text (parse_special = 1) into one document:
 * [bos] tokens [eos]; bos is never a label, eos always is. */
static int ds_render_to_example(const tokenizer *tok, const ds_render *r, int train_all, int add_bos, int add_eos,
                                int chunkable, dataset_example *ex, qerr *e) {
    tokenizer_ids v = {0};
    if (tokenizer_encode_offsets(tok, r->text.p ? r->text.p : "", r->text.n, 1, 0, &v, e)) {
        tokenizer_ids_free(&v);
        return -1;
    }
    size_t n = v.n + (add_bos ? 1 : 0) + (add_eos ? 1 : 0);
    if (n > INT32_MAX) {
        tokenizer_ids_free(&v);
        return qerr_set(e, "example of %zu tokens is too long", n);
    }
    memset(ex, 0, sizeof *ex);
    ex->ids = malloc((n ? n : 1) * sizeof *ex->ids);
    ex->mask = malloc(n ? n : 1);
    if (!ex->ids || !ex->mask) {
        free(ex->ids);
        free(ex->mask);
        tokenizer_ids_free(&v);
        return qerr_set(e, "out of memory (example of %zu tokens)", n);
    }
    size_t k = 0, sp = 0;
    if (add_bos) {
        ex->ids[k] = tokenizer_bos_id(tok);
        ex->mask[k++] = 0;
    }
    if (r->chat) ds_chat_labels(r, v.ids, v.offsets, v.n, train_all, tokenizer_eos_id(tok), ex->mask + k);
    for (size_t i = 0; i < v.n; i++) {
        int64_t s = v.offsets[i], end = i + 1 < v.n ? v.offsets[i + 1] : (int64_t)r->text.n;
        while (sp < r->n_span && r->span[2 * sp + 1] <= s) sp++;
        int trained = train_all || (sp < r->n_span && r->span[2 * sp] < end);
        ex->ids[k] = v.ids[i];
        if (r->chat) k++;
        else ex->mask[k++] = (uint8_t)trained;
    }
    if (add_eos) {
        ex->ids[k] = tokenizer_eos_id(tok);
        ex->mask[k++] = 1;
    }
    ex->n = (int32_t)n;
    ex->chunkable = chunkable;
    tokenizer_ids_free(&v);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* record formats                                                            */

static const char *ds_get_str(const cJSON *obj, const char *name) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, name);
    return cJSON_IsString(it) ? it->valuestring : NULL;
}

static int ds_render_completion(const cJSON *obj, const char *field, const char *path, long line,
                                ds_render *r, qerr *e) {
    const char *text = ds_get_str(obj, field);
    if (!text) return ds_bad(e, "%s:%ld: field \"%s\" missing or not a string", path, line, field);
    if (ds_puts(r, text, e)) return -1;
    return ds_add_span(r, 0, r->text.n, e);
}

static int ds_render_alpaca(const cJSON *obj, const char *path, long line, ds_render *r, qerr *e) {
    const char *ins = ds_get_str(obj, "instruction"), *out = ds_get_str(obj, "output");
    if (!ins) return ds_bad(e, "%s:%ld: field \"instruction\" missing or not a string", path, line);
    if (!out) return ds_bad(e, "%s:%ld: field \"output\" missing or not a string", path, line);
    const cJSON *in_it = cJSON_GetObjectItemCaseSensitive(obj, "input");
    if (in_it && !cJSON_IsString(in_it) && !cJSON_IsNull(in_it))
        return ds_bad(e, "%s:%ld: field \"input\" must be a string or null", path, line);
    const char *in = cJSON_IsString(in_it) ? in_it->valuestring : "";
    /* axolotl: an empty input selects the no-input prompt. */
    size_t cap = strlen(ALPACA_PROMPT_INPUT) + strlen(ins) + strlen(in) + 1;
    char *prompt = malloc(cap);
    if (!prompt) return qerr_set(e, "out of memory");
    if (in[0])
        snprintf(prompt, cap, ALPACA_PROMPT_INPUT, ins, in);
    else
        snprintf(prompt, cap, ALPACA_PROMPT_NO_INPUT, ins);
    int rc = ds_puts(r, prompt, e);
    free(prompt);
    if (rc) return -1;
    size_t start = r->text.n;
    if (ds_puts(r, out, e)) return -1;
    return ds_add_span(r, start, r->text.n, e);
}

/* axolotl's default role map (prompt_strategies/chat_template.py ChatTemplatePrompter.roles):
 * the role a message's role value renders as, or NULL for a role outside it. */
static const char *ds_map_role(const char *r) {
    static const char *const map[][2] = {{"human", "user"}, {"user", "user"},     {"gpt", "assistant"},
                                         {"assistant", "assistant"}, {"system", "system"}, {"tool", "tool"}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(map[i][0], r)) return map[i][1];
    return NULL;
}

/* Is (mapped) role one of spec->roles_to_train (each mapped too; default assistant)? */
static int ds_role_trained(const dataset_spec *spec, const char *role) {
    if (!spec->roles_to_train) return !strcmp(role, "assistant");
    for (int i = 0; i < spec->n_roles_to_train; i++) {
        const char *t = ds_map_role(spec->roles_to_train[i]);
        if (!strcmp(t ? t : spec->roles_to_train[i], role)) return 1;
    }
    return 0;
}

static int ds_turn_add(ds_render *r, size_t a, size_t b, int train, qerr *e) {
    if (r->n_turn == r->turn_cap) {
        size_t cap = r->turn_cap ? 2 * r->turn_cap : 16;
        ds_turn *nt = realloc(r->turn, cap * sizeof *nt);
        if (!nt) return qerr_set(e, "out of memory rendering an example");
        r->turn = nt;
        r->turn_cap = cap;
    }
    r->turn[r->n_turn++] = (ds_turn){a, b, train};
    return 0;
}

/* A conversation. Messages are read through message_property_mappings (role/content field names)
 * and axolotl's role map, a leading system message dropped under drop_system_message, rendered by ct
 * exactly as apply_chat_template renders it (data/chat.h); each message becomes a turn (its content's
 * bytes, trained when its role is in roles_to_train) labelled by ds_chat_labels. */
static int ds_render_chat(const cJSON *obj, const dataset_spec *spec, const char *field, const chat_template *ct,
                          const tokenizer *tok, int train_all, const char *path, long line, ds_render *r, qerr *e) {
    const char *frole = spec->message_field_role ? spec->message_field_role : "role";
    const char *fcontent = spec->message_field_content ? spec->message_field_content : "content";
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(obj, field);
    if (!cJSON_IsArray(msgs)) return ds_bad(e, "%s:%ld: field \"%s\" missing or not an array", path, line, field);
    int n = cJSON_GetArraySize(msgs);
    if (n == 0) return ds_bad(e, "%s:%ld: field \"%s\" is an empty list", path, line, field);
    chat_message *m = malloc((size_t)(n + 1) * sizeof *m);
    ds_turn *turns = malloc((size_t)(n + 1) * sizeof *turns);
    if (!m || !turns) {
        free(m);
        free(turns);
        return qerr_set(e, "out of memory");
    }
    int i = 0, kept = 0;
    /* axolotl's field_system ("system"): a record's top-level "system" becomes the first message when the
     * conversation does not start with one (ChatTemplateStrategy.get_conversation_thread) */
    const cJSON *first = cJSON_GetArrayItem(msgs, 0), *sys = cJSON_GetObjectItemCaseSensitive(obj, "system");
    const char *first_raw = cJSON_IsObject(first) ? ds_get_str(first, frole) : NULL;
    const char *first_role = first_raw ? ds_map_role(first_raw) : NULL;
    if (sys && !cJSON_IsNull(sys) && !(first_role && !strcmp(first_role, "system"))) {
        if (!cJSON_IsString(sys)) {
            free(m);
            free(turns);
            return ds_bad(e, "%s:%ld: field \"system\" (axolotl's field_system) is not a string", path, line);
        }
        if (!spec->drop_system_message) m[kept++] = (chat_message){"system", sys->valuestring};
        else i = -1; /* marks the leading system message as dropped */
    }
    int dropped = i < 0;
    i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, msgs) {
        const char *raw = cJSON_IsObject(it) ? ds_get_str(it, frole) : NULL;
        const char *content = cJSON_IsObject(it) ? ds_get_str(it, fcontent) : NULL;
        const char *role = raw ? ds_map_role(raw) : NULL;
        if (!raw || !content || !role) {
            free(m);
            free(turns);
            if (!raw) return ds_bad(e, "%s:%ld: %s[%d]: field \"%s\" missing or not a string", path, line, field, i, frole);
            if (!content)
                return ds_bad(e, "%s:%ld: %s[%d]: field \"%s\" missing or not a string", path, line, field, i, fcontent);
            return ds_bad(e, "%s:%ld: %s[%d]: role \"%.60s\" is not in axolotl's role map (human, user -> user; gpt, "
                             "assistant -> assistant; system; tool)", path, line, field, i, raw);
        }
        i++;
        if (kept == 0 && !dropped && spec->drop_system_message && !strcmp(role, "system")) {
            dropped = 1;
            continue;
        }
        m[kept++] = (chat_message){role, content};
    }
    int rc = 0;
    if (kept == 0)
        rc = ds_bad(e, "%s:%ld: field \"%s\": no message left after drop_system_message", path, line, field);
    else if (!strcmp(m[0].role, "system") && chat_template_system_in_user_turn(ct) &&
             (ds_role_trained(spec, "system") || train_all || (spec->train_on_eos && !strcmp(spec->train_on_eos, "all"))))
        rc = ds_bad(e, "%s:%ld: the %s chat template renders the system message inside a user turn, where axolotl "
                       "finds it or not depending on the model's name (it skips it when the name contains "
                       "\"mistral\"), and roles_to_train / train_on_inputs / train_on_eos: all would use that turn; "
                       "refused (drop_system_message: true, or train on assistant turns)", path, line,
                    chat_template_name(ct));
    size_t base = r->text.n;
    if (!rc) {
        rc = chat_render(ct, tok, m, kept, 0, &r->text, NULL, e);
        if (rc && !r->text.oom) {
            char msg[sizeof e->msg];
            snprintf(msg, sizeof msg, "%s", e->msg);
            rc = ds_bad(e, "%s:%ld: %s", path, line, msg);
        }
    }
    /* axolotl's find_turn: render the conversation again with the turn's content replaced by each of two
     * placeholders and take the widest byte span where the renderings differ (_diff_char_span) */
    static const char *const sentinel[2] = {"[[dummy_message]]", "zzdummymessagezz"};
    strbuf d = {0};
    for (int j = 0; j < kept && !rc; j++) {
        const char *keep = m[j].content;
        size_t lo = SIZE_MAX, hi = 0;
        for (int k = 0; k < 2 && !rc; k++) {
            m[j].content = sentinel[k];
            strbuf_clear(&d);
            rc = chat_render(ct, tok, m, kept, 0, &d, NULL, e);
            if (!rc && d.oom) rc = qerr_set(e, "out of memory");
            if (rc) break;
            const char *full = r->text.p + base;
            size_t nf = r->text.n - base, lim = nf < d.n ? nf : d.n, st = 0, suf = 0;
            while (st < lim && full[st] == d.p[st]) st++;
            while (suf < lim - st && full[nf - 1 - suf] == d.p[d.n - 1 - suf]) suf++;
            if (st < lo) lo = st;
            if (nf - suf > hi) hi = nf - suf;
        }
        m[j].content = keep;
        turns[j] = hi > lo ? (ds_turn){base + lo, base + hi, 0} : (ds_turn){0, 0, 0};
    }
    free(d.p);
    for (int j = 0; j < kept && !rc; j++) rc = ds_turn_add(r, turns[j].a, turns[j].b, ds_role_trained(spec, m[j].role), e);
    free(m);
    free(turns);
    return rc;
}

/* The template a chat_template dataset renders with: axolotl's get_chat_template
 * (utils/chat_templates/base.py) over the templates qlora renders. */
static int ds_chat_template(const tokenizer *tok, const dataset_spec *spec, const chat_template **ct, qerr *e) {
    const char *c = spec->chat_template ? spec->chat_template : "tokenizer_default";
    static const char fb[] = "tokenizer_default_fallback_";
    if (!strcmp(c, "tokenizer_default")) return chat_template_of(tok, ct, e);
    if (!strncmp(c, fb, sizeof fb - 1)) {
        if (tokenizer_chat_template(tok)) return chat_template_of(tok, ct, e);
        return chat_template_named(c + sizeof fb - 1, ct, e);
    }
    if (strcmp(c, "jinja")) return chat_template_named(c, ct, e);
    const char *j = spec->chat_template_jinja;
    if (!j) return qerr_set(e, "chat_template: jinja needs chat_template_jinja (the template text or a file)");
    struct stat sb;
    if (!stat(j, &sb) && S_ISREG(sb.st_mode)) { /* axolotl: a path to an existing file is read */
        size_t len;
        char *text = file_read_regular(j, 0, &len, e);
        if (!text) return -1;
        int rc = chat_template_find(text, ct, e);
        free(text);
        return rc ? qerr_prefix(e, "chat_template_jinja (%s)", j) : 0;
    }
    return chat_template_find(j, ct, e) ? qerr_prefix(e, "chat_template_jinja") : 0;
}

/* eot_tokens as ids (axolotl's default: [eos_token]); given, it must be [the template's end-of-turn
 * token], one token of the vocabulary. *note gets the line axolotl warns with when the default leaves the
 * template's end-of-turn token untrained. */
static int ds_eot_ids(const tokenizer *tok, const dataset_spec *spec, const chat_template *ct, ds_render *r,
                      char *note, size_t note_len, qerr *e) {
    const char *eot = chat_template_eot(ct, tok);
    int32_t eos = tokenizer_eos_id(tok);
    const char *eos_text = eos >= 0 ? tokenizer_token_text(tok, eos) : NULL;
    r->n_eot = 0;
    if (!spec->eot_tokens) {
        if (eos >= 0) r->eot_ids[r->n_eot++] = eos;
        if (note && eot && eos_text && strcmp(eot, eos_text))
            snprintf(note, note_len,
                     "eot_tokens is not set, so axolotl's default [eos_token] = [\"%s\"] applies: the %s template "
                     "ends turns with \"%s\", which is not trained (as in axolotl); set eot_tokens: [\"%s\"] to "
                     "train it", eos_text, chat_template_name(ct), eot, eot);
        return 0;
    }
    /* [the template's end-of-turn token] only: axolotl keeps a listed token only when the template's text
     * contains it (a [eos_token] list excepted) and refuses eos listed with train_on_eot != train_on_eos;
     * with this one list neither depends on the text (the token is literal in every template whose
     * end-of-turn token is not eos) */
    const char *t = spec->n_eot_tokens > 0 ? spec->eot_tokens[0] : "";
    if (spec->n_eot_tokens != 1 || !eot || strcmp(t, eot))
        return qerr_set(e, "eot_tokens: refused: only [\"%s\"], the end-of-turn token of the %s template, is "
                           "implemented (got %d token(s), the first \"%.60s\"; axolotl keeps or drops others "
                           "depending on the template's text)", eot ? eot : "eos", chat_template_name(ct),
                        spec->n_eot_tokens, t);
    int32_t id = tokenizer_find_token(tok, t);
    if (id < 0) return qerr_set(e, "eot_tokens: \"%.60s\" is not one token of the vocabulary", t);
    r->eot_ids[r->n_eot++] = id;
    return 0;
}

/* input_output (axolotl input_output.py): each segment's text tokenized on its own, without special
 * tokens added, and appended; its tokens are labels iff the segment's label (or train_all). */
static int ds_input_output(const tokenizer *tok, const cJSON *obj, int train_all, const char *path, long line,
                           dataset_example *ex, qerr *e) {
    const cJSON *segs = cJSON_GetObjectItemCaseSensitive(obj, "segments");
    if (!cJSON_IsArray(segs)) return ds_bad(e, "%s:%ld: field \"segments\" missing or not an array", path, line);
    memset(ex, 0, sizeof *ex);
    size_t n = 0, cap = 0;
    int i = 0;
    const cJSON *sg;
    cJSON_ArrayForEach(sg, segs) {
        const cJSON *lab = cJSON_IsObject(sg) ? cJSON_GetObjectItemCaseSensitive(sg, "label") : NULL;
        const char *text = cJSON_IsObject(sg) ? ds_get_str(sg, "text") : NULL;
        int rc = 0;
        if (!text) rc = ds_bad(e, "%s:%ld: segments[%d]: field \"text\" missing or not a string", path, line, i);
        else if (!cJSON_IsBool(lab)) rc = ds_bad(e, "%s:%ld: segments[%d]: field \"label\" missing or not true/false", path, line, i);
        tokenizer_ids v = {0};
        if (!rc && tokenizer_encode_offsets(tok, text, strlen(text), 1, 0, &v, e)) rc = -1;
        if (!rc && n + v.n > INT32_MAX) rc = qerr_set(e, "%s:%ld: example too long", path, line);
        if (!rc && n + v.n > cap) {
            size_t nc = (n + v.n) * 2 + 16;
            int32_t *ni = realloc(ex->ids, nc * sizeof *ni);
            if (ni) ex->ids = ni;
            uint8_t *nm = ni ? realloc(ex->mask, nc) : NULL;
            if (nm) ex->mask = nm;
            if (!ni || !nm) rc = qerr_set(e, "out of memory (example of %zu tokens)", nc);
            else cap = nc;
        }
        if (!rc) {
            for (size_t j = 0; j < v.n; j++) {
                ex->ids[n + j] = v.ids[j];
                ex->mask[n + j] = (uint8_t)(train_all || cJSON_IsTrue(lab));
            }
            n += v.n;
        }
        tokenizer_ids_free(&v);
        if (rc) {
            free(ex->ids);
            free(ex->mask);
            memset(ex, 0, sizeof *ex);
            return rc;
        }
        i++;
    }
    if (n == 0) {
        free(ex->ids);
        free(ex->mask);
        memset(ex, 0, sizeof *ex);
        return ds_bad(e, "%s:%ld: field \"segments\" has no text", path, line);
    }
    ex->n = (int32_t)n;
    ex->chunkable = 0;
    return 0;
}

int dataset_parse_split(const char *s, dataset_slice *sl, qerr *e) {
    memset(sl, 0, sizeof *sl);
    if (!strcmp(s, "train")) return 0;
    const char *q = s;
    if (strncmp(q, "train[", 6)) goto bad;
    q += 6;
    for (int side = 0; side < 2; side++) {
        char *end;
        double v = strtod(q, &end);
        int has = end != q;
        if (has && (v != (double)(long long)v || !isfinite(v))) goto bad;
        q = end;
        int pct = 0;
        if (has && *q == '%') pct = 1, q++;
        if (side == 0) {
            sl->has_lo = has, sl->lo = v, sl->lo_pct = pct;
            if (*q++ != ':') goto bad;
        } else {
            sl->has_hi = has, sl->hi = v, sl->hi_pct = pct;
            if (*q++ != ']' || *q) goto bad;
        }
        if (pct && (v < -100 || v > 100)) goto bad;
    }
    return 0;
bad:
    return qerr_set(e, "expected train or a slice of it (train[A:B], train[:N], train[:N%%], train[A%%:B%%]), got \"%.80s\"",
                    s);
}

/* A bound of a slice over n records, as an index in [0, n]. */
static int64_t ds_slice_bound(double v, int pct, int64_t n) {
    double x = pct ? nearbyint(v * (double)n / 100.0) : v; /* ties to even, as Python's round */
    if (x < 0) x += (double)n;
    if (x < 0) x = 0;
    if (x > (double)n) x = (double)n;
    return (int64_t)x;
}

/* ------------------------------------------------------------------------ */

/* Byte offset of the first invalid UTF-8 sequence in s[0..n) (RFC 3629:
 * no overlongs, no surrogates, nothing above U+10FFFF), or -1 if valid. */
static long ds_utf8_invalid_at(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t k;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            return (long)i;
        }
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n) return (long)i;
            unsigned b = u[i + j];
            unsigned l = j == 1 ? lo : 0x80, h = j == 1 ? hi : 0xBF;
            if (b < l || b > h) return (long)i;
        }
        i += k + 1;
    }
    return -1;
}

/* Offset of a JSON "\u0000" escape in line[0..n) (a backslash that is not
 * itself escaped, then u0000), or -1. cJSON's strings end at the first NUL,
 * so such text would be cut there without a word. */
static long ds_nul_escape_at(const char *s, size_t n) {
    for (size_t i = 0; i + 6 <= n; i++) {
        if (s[i] != '\\') continue;
        if (s[i + 1] == 'u' && !memcmp(s + i + 2, "0000", 4)) return (long)i;
        i++; /* skip the escaped character (also a second backslash) */
    }
    return -1;
}

static int ds_is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n' && s[i] != '\f' && s[i] != '\v') return 0;
    return 1;
}

static const char *ds_json_kind(const cJSON *j) {
    if (cJSON_IsArray(j)) return "an array";
    if (cJSON_IsString(j)) return "a string";
    if (cJSON_IsNumber(j)) return "a number";
    if (cJSON_IsBool(j)) return "a boolean";
    if (cJSON_IsNull(j)) return "null";
    return "something else";
}

int dataset_read_jsonl(const tokenizer *tok, const dataset_spec *spec, int train_on_inputs, dataset_examples *docs,
                       qerr *e) {
    const char *path = spec->path ? spec->path : "(no path)";
    if (!spec->path) return qerr_set(e, "dataset entry has no path");
    ds_type type;
    if (!spec->type)
        return qerr_set(e, "%s: dataset type missing (expected completion, alpaca or chat_template)", path);
    if (!strcmp(spec->type, "completion"))
        type = DS_COMPLETION;
    else if (!strcmp(spec->type, "alpaca"))
        type = DS_ALPACA;
    else if (!strcmp(spec->type, "chat_template"))
        type = DS_CHAT;
    else if (!strcmp(spec->type, "input_output"))
        type = DS_IO;
    else
        return qerr_set(e, "%s: unknown dataset type \"%s\" (expected completion, alpaca, chat_template or input_output)", path,
                        spec->type);
    const char *field = spec->field ? spec->field : "text";
    const char *field_messages = spec->field_messages ? spec->field_messages : "messages";

    const chat_template *ct = NULL;
    dataset_slice slice;
    if (spec->split && dataset_parse_split(spec->split, &slice, e)) return qerr_prefix(e, "%s: split", path);
    if (!spec->split) memset(&slice, 0, sizeof slice);
    ds_render r = {0};
    if (type == DS_CHAT) {
        char *note = spec->skipped && !spec->skipped->note[0] ? spec->skipped->note : NULL;
        if (ds_chat_template(tok, spec, &ct, e) ||
            ds_eot_ids(tok, spec, ct, &r, note, note ? sizeof spec->skipped->note : 0, e))
            return qerr_prefix(e, "%s: type chat_template", path);
        r.chat = 1;
        r.opt[1] = spec->train_on_eos;
        r.opt[0] = spec->train_on_eot ? spec->train_on_eot : spec->train_on_eos;
    }

    size_t len = 0;
    char *buf = file_read_regular(path, 0, &len, e);
    if (!buf) return -1;
    int64_t n0 = docs->n;
    int rc = 0;
    long line = 0;
    int64_t n_skipped = 0;
    for (size_t pos = 0; pos < len && rc == 0;) {
        const char *ls = buf + pos;
        const char *nl = memchr(ls, '\n', len - pos);
        size_t ll = nl ? (size_t)(nl - ls) : len - pos;
        pos += ll + 1;
        line++;
        if (ds_is_blank(ls, ll)) continue;
        const char *end = NULL;
        const char *nul = memchr(ls, 0, ll);
        long bad_utf8 = nul ? -1 : ds_utf8_invalid_at(ls, ll), nul_esc = -1;
        cJSON *obj = NULL;
        if (nul)
            rc = ds_bad(e, "%s:%ld: a NUL byte at column %ld (not valid JSON text)", path, line, (long)(nul - ls) + 1);
        else if (bad_utf8 >= 0)
            rc = ds_bad(e, "%s:%ld: invalid UTF-8 at column %ld (JSON text must be UTF-8)", path, line, bad_utf8 + 1);
        else if ((nul_esc = ds_nul_escape_at(ls, ll)) >= 0)
            rc = ds_bad(e, "%s:%ld: \\u0000 at column %ld: text with a NUL character is not supported (it would be "
                           "cut there)", path, line, nul_esc + 1);
        else
            obj = cJSON_ParseWithLengthOpts(ls, ll, &end, 0);
        if (rc) {
            /* refused above, before parsing */
        } else if (!obj) {
            long col = end && end >= ls ? (long)(end - ls) + 1 : 1;
            rc = ds_bad(e, "%s:%ld: invalid JSON near column %ld (expected one JSON object per line)", path, line,
                        col);
        } else if (end && !ds_is_blank(end, ll - (size_t)(end - ls))) {
            rc = ds_bad(e, "%s:%ld: unexpected text after the JSON object at column %ld (one object per line)",
                        path, line, (long)(end - ls) + 1);
        } else if (!cJSON_IsObject(obj)) {
            rc = ds_bad(e, "%s:%ld: expected a JSON object, got %s", path, line, ds_json_kind(obj));
        } else {
            strbuf_clear(&r.text);
            r.n_span = 0;
            r.n_turn = 0;
            if (type == DS_COMPLETION)
                rc = ds_render_completion(obj, field, path, line, &r, e);
            else if (type == DS_ALPACA)
                rc = ds_render_alpaca(obj, path, line, &r, e);
            else if (type == DS_CHAT)
                rc = ds_render_chat(obj, spec, field_messages, ct, tok, train_on_inputs, path, line, &r, e);
            dataset_example ex;
            if (type == DS_IO) {
                rc = ds_input_output(tok, obj, train_on_inputs, path, line, &ex, e);
                if (rc == 0) {
                    ex.doc = docs->n;
                    if ((rc = dataset_examples_push(docs, &ex, e))) {
                        free(ex.ids);
                        free(ex.mask);
                    }
                }
                goto record_done;
            }
            int add_bos = type != DS_CHAT && tokenizer_add_bos(tok) && tokenizer_bos_id(tok) >= 0;
            int add_eos = type != DS_CHAT;
            if (rc == 0 && add_eos && tokenizer_eos_id(tok) < 0)
                rc = qerr_set(e, "%s: type %s appends eos, but the tokenizer has no eos id", path, spec->type);
            if (rc == 0) {
                rc = ds_render_to_example(tok, &r, train_on_inputs, add_bos, add_eos, type == DS_COMPLETION, &ex, e);
                if (rc == 0) {
                    ex.doc = docs->n;
                    rc = dataset_examples_push(docs, &ex, e);
                    if (rc) {
                        free(ex.ids);
                        free(ex.mask);
                    }
                }
                if (rc) qerr_prefix(e, "%s:%ld", path, line);
            }
        }
    record_done:
        cJSON_Delete(obj);
        if (rc == DS_BAD && spec->skip_bad_lines) {
            n_skipped++;
            if (spec->skipped) {
                if (spec->skipped->n_lines == 0)
                    snprintf(spec->skipped->first, sizeof spec->skipped->first, "%.500s", e ? e->msg : "");
                spec->skipped->n_lines++;
            }
            rc = 0;
        }
    }
    if (rc == 0 && docs->n == n0) {
        if (n_skipped)
            rc = qerr_set(e, "%s: no valid records (all %lld non-blank lines are malformed and were skipped)", path,
                          (long long)n_skipped);
        else
            rc = qerr_set(e, "%s: no records (the file is empty or has only blank lines)", path);
    }
    if (rc == 0 && (slice.has_lo || slice.has_hi)) { /* split: keep the slice of this file's records */
        int64_t n = docs->n - n0;
        int64_t lo = slice.has_lo ? ds_slice_bound(slice.lo, slice.lo_pct, n) : 0;
        int64_t hi = slice.has_hi ? ds_slice_bound(slice.hi, slice.hi_pct, n) : n;
        if (hi <= lo) {
            rc = qerr_set(e, "%s: split \"%s\" selects no record of the %lld", path, spec->split, (long long)n);
        } else {
            for (int64_t i = 0; i < n; i++) {
                if (i >= lo && i < hi) continue;
                free(docs->v[n0 + i].ids);
                free(docs->v[n0 + i].mask);
            }
            memmove(docs->v + n0, docs->v + n0 + lo, (size_t)(hi - lo) * sizeof *docs->v);
            docs->n = n0 + (hi - lo);
            for (int64_t i = n0; i < docs->n; i++) docs->v[i].doc = i;
        }
    }
    if (rc) {
        rc = -1;
        /* leave `docs` as it was */
        for (int64_t i = n0; i < docs->n; i++) {
            free(docs->v[i].ids);
            free(docs->v[i].mask);
        }
        docs->n = n0;
    }
    free(r.text.p);
    free(r.span);
    free(r.turn);
    free(buf);
    return rc;
}
