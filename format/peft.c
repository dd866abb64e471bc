/* format/peft.c — PEFT adapter_config.json writer and tensor names.
 *
 * The config is built as a cJSON tree and printed by a small printer that
 * reproduces Python's json.dumps(obj, indent=2, sort_keys=True): keys sorted by
 * code point, items separated by "," + newline, key and value by ": ",
 * empty containers as {} / [], ensure_ascii escapes, ints without a dot and
 * floats in repr() form ("0.05", "0.0", "1e-05"). Numbers go in as cJSON raw
 * items carrying their final text, so int vs float survives. */
#include "format/peft.h"

#include <cjson/cJSON.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/pyrepr.h"
#include "core/strbuf.h"
#include "format/safetensors.h"

#define PEFT_LAYER_PREFIX "base_model.model.model.layers."

static int plain_part(const char *s) { return s && *s && !strchr(s, '.'); }

int peft_tensor_name(char *buf, size_t n, int layer, const char *parent, const char *module, char ab) {
    if (n) buf[0] = 0;
    char AB = ab == 'a' ? 'A' : ab == 'b' ? 'B' : ab;
    if (!plain_part(parent) || !plain_part(module) || layer < 0 || (AB != 'A' && AB != 'B')) return -1;
    int w = snprintf(buf, n, PEFT_LAYER_PREFIX "%d.%s.%s.lora_%c.weight", layer, parent, module, AB);
    if (w < 0 || (size_t)w >= n) {
        if (n) buf[0] = 0;
        return -1;
    }
    return 0;
}

int peft_tensor_name_parse(const char *name, peft_name_parts *out) {
    static const char pre[] = PEFT_LAYER_PREFIX;
    if (strncmp(name, pre, sizeof pre - 1)) return -1;
    const char *p = name + sizeof pre - 1;
    if (*p < '0' || *p > '9') return -1;
    char *end;
    long l = strtol(p, &end, 10);
    if (*end != '.' || l < 0 || l > 100000) return -1;
    const char *parent = end + 1, *dot1 = strchr(parent, '.');
    if (!dot1 || dot1 == parent) return -1;
    const char *module = dot1 + 1, *dot2 = strchr(module, '.');
    if (!dot2 || dot2 == module) return -1;
    if (!strcmp(dot2, ".lora_A.weight"))
        out->ab = 'A';
    else if (!strcmp(dot2, ".lora_B.weight"))
        out->ab = 'B';
    else
        return -1;
    out->layer = (int)l;
    out->parent = parent;
    out->parent_len = (size_t)(dot1 - parent);
    out->module = module;
    out->module_len = (size_t)(dot2 - module);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Python-compatible JSON text                                                */

static void sb_u16(strbuf *b, unsigned v) {
    char t[8];
    snprintf(t, sizeof t, "\\u%04x", v & 0xffffu);
    strbuf_puts(b, t);
}

/* json.dumps string with ensure_ascii=True: " \ \n \r \t \b \f escaped by name,
 * everything outside 0x20..0x7e as \uXXXX (lowercase; surrogate pairs above
 * U+FFFF). Bytes that are not valid UTF-8 become \ufffd. */
static void sb_py_str(strbuf *b, const char *s) {
    const unsigned char *q = (const unsigned char *)s;
    strbuf_put(b, "\"", 1);
    while (*q) {
        unsigned c = *q;
        if (c < 0x80) {
            switch (c) {
            case '"': strbuf_puts(b, "\\\""); break;
            case '\\': strbuf_puts(b, "\\\\"); break;
            case '\n': strbuf_puts(b, "\\n"); break;
            case '\r': strbuf_puts(b, "\\r"); break;
            case '\t': strbuf_puts(b, "\\t"); break;
            case '\b': strbuf_puts(b, "\\b"); break;
            case '\f': strbuf_puts(b, "\\f"); break;
            default:
                if (c < 0x20 || c == 0x7f)
                    sb_u16(b, c);
                else
                    strbuf_put(b, (const char *)q, 1);
            }
            q++;
            continue;
        }
        int len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
        uint32_t cp = len == 4 ? c & 0x07 : len == 3 ? c & 0x0f : c & 0x1f;
        int ok = len > 0;
        for (int k = 1; ok && k < len; k++) {
            if ((q[k] & 0xc0) != 0x80)
                ok = 0;
            else
                cp = (cp << 6) | (q[k] & 0x3f);
        }
        if (ok && ((len == 2 && cp < 0x80) || (len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
                   (len == 4 && (cp < 0x10000 || cp > 0x10ffff))))
            ok = 0;
        if (!ok) {
            sb_u16(b, 0xfffd);
            q++;
            continue;
        }
        if (cp >= 0x10000) {
            cp -= 0x10000;
            sb_u16(b, 0xd800 + (cp >> 10));
            sb_u16(b, 0xdc00 + (cp & 0x3ff));
        } else {
            sb_u16(b, cp);
        }
        q += len;
    }
    strbuf_put(b, "\"", 1);
}

static int cmp_item_keys(const void *a, const void *b) {
    return strcmp((*(const cJSON *const *)a)->string, (*(const cJSON *const *)b)->string);
}

static void sb_indent(strbuf *b, int level) {
    for (int i = 0; i < 2 * level; i++) strbuf_put(b, " ", 1);
}

/* json.dumps(x, indent=2, sort_keys=True) of a cJSON tree (raw items verbatim). */
static void sb_py_json(strbuf *b, const cJSON *x, int level) {
    if (cJSON_IsObject(x) || cJSON_IsArray(x)) {
        int obj = cJSON_IsObject(x), n = cJSON_GetArraySize(x);
        if (n == 0) {
            strbuf_puts(b, obj ? "{}" : "[]");
            return;
        }
        const cJSON **items = malloc((size_t)n * sizeof *items);
        if (!items) {
            b->oom = 1;
            return;
        }
        int i = 0;
        for (const cJSON *it = x->child; it; it = it->next) items[i++] = it;
        if (obj) qsort(items, (size_t)n, sizeof *items, cmp_item_keys);
        strbuf_puts(b, obj ? "{\n" : "[\n");
        for (i = 0; i < n; i++) {
            sb_indent(b, level + 1);
            if (obj) {
                sb_py_str(b, items[i]->string);
                strbuf_puts(b, ": ");
            }
            sb_py_json(b, items[i], level + 1);
            strbuf_puts(b, i + 1 < n ? ",\n" : "\n");
        }
        sb_indent(b, level);
        strbuf_puts(b, obj ? "}" : "]");
        free(items);
    } else if (cJSON_IsString(x)) {
        sb_py_str(b, x->valuestring);
    } else if (cJSON_IsRaw(x)) {
        strbuf_puts(b, x->valuestring);
    } else if (cJSON_IsBool(x)) {
        strbuf_puts(b, cJSON_IsTrue(x) ? "true" : "false");
    } else if (cJSON_IsNull(x)) {
        strbuf_puts(b, "null");
    } else { /* plain numbers are not used by this writer; print as Python would an int-valued float */
        char t[64];
        snprintf(t, sizeof t, "%.17g", x->valuedouble);
        strbuf_puts(b, t);
    }
}

/* A config value that must be empty (null, false, {}, [], or ok_str) for the
 * adapter to be a plain LoRA A/B pair. */
static int config_must_be_empty(const cJSON *cfg, const char *key, const char *ok_str, const char *path, qerr *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v)) return 0;
    if ((cJSON_IsObject(v) || cJSON_IsArray(v)) && cJSON_GetArraySize(v) == 0) return 0;
    if (ok_str && cJSON_IsString(v) && !strcmp(v->valuestring, ok_str)) return 0;
    return qerr_set(e, "%s: \"%s\" is set; adapters with %s are not supported", path, key, key);
}

int peft_adapter_base_model(const char *path, char *buf, size_t n) {
    cJSON *cfg = file_read_json_object(path, NULL);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "base_model_name_or_path");
    int rc = -1;
    if (cJSON_IsString(v) && v->valuestring[0]) {
        snprintf(buf, n, "%s", v->valuestring);
        rc = 0;
    }
    cJSON_Delete(cfg);
    return rc;
}

int peft_read_adapter_config(const char *path, peft_adapter_config *out, qerr *e) {
    memset(out, 0, sizeof *out);
    cJSON *cfg = file_read_json_object(path, e);
    if (!cfg) return -1;
    int rc = -1;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "peft_type");
    if (!cJSON_IsString(v) || strcmp(v->valuestring, "LORA")) {
        qerr_set(e, "%s: peft_type must be \"LORA\"", path);
        goto done;
    }
    v = cJSON_GetObjectItemCaseSensitive(cfg, "r");
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble != floor(v->valuedouble) || v->valuedouble > 1e9) {
        qerr_set(e, "%s: \"r\" must be a positive integer", path);
        goto done;
    }
    out->r = (int)v->valuedouble;
    v = cJSON_GetObjectItemCaseSensitive(cfg, "lora_alpha");
    out->lora_alpha = cJSON_IsNumber(v) ? (float)v->valuedouble : 8.0f; /* PEFT's default */
    v = cJSON_GetObjectItemCaseSensitive(cfg, "lora_dropout");
    out->lora_dropout = cJSON_IsNumber(v) ? (float)v->valuedouble : 0.0f;
    out->use_rslora = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cfg, "use_rslora"));
    v = cJSON_GetObjectItemCaseSensitive(cfg, "base_model_name_or_path");
    if (cJSON_IsString(v))
        snprintf(out->base_model_name_or_path, sizeof out->base_model_name_or_path, "%s", v->valuestring);
    if (config_must_be_empty(cfg, "use_dora", NULL, path, e) || config_must_be_empty(cfg, "rank_pattern", NULL, path, e) ||
        config_must_be_empty(cfg, "alpha_pattern", NULL, path, e) ||
        config_must_be_empty(cfg, "fan_in_fan_out", NULL, path, e) ||
        config_must_be_empty(cfg, "lora_bias", NULL, path, e) ||
        config_must_be_empty(cfg, "layer_replication", NULL, path, e) ||
        config_must_be_empty(cfg, "bias", "none", path, e))
        goto done;
    v = cJSON_GetObjectItemCaseSensitive(cfg, "modules_to_save");
    if (v && !cJSON_IsNull(v)) {
        if (!cJSON_IsArray(v)) {
            qerr_set(e, "%s: \"modules_to_save\": expected a list of module names or null", path);
            goto done;
        }
        const cJSON *it;
        cJSON_ArrayForEach(it, v) {
            if (cJSON_IsString(it) && !strcmp(it->valuestring, "embed_tokens")) out->save_embed = 1;
            else if (cJSON_IsString(it) && !strcmp(it->valuestring, "lm_head")) out->save_lm_head = 1;
            else {
                qerr_set(e, "%s: \"modules_to_save\": %s%s%s is not supported (embed_tokens and lm_head are)", path,
                         cJSON_IsString(it) ? "\"" : "", cJSON_IsString(it) ? it->valuestring : "an entry that is not a string",
                         cJSON_IsString(it) ? "\"" : "");
                goto done;
            }
        }
    }
    rc = 0;
done:
    cJSON_Delete(cfg);
    return rc;
}

const char *peft_saved_module_name(int lm_head) {
    return lm_head ? "base_model.model.lm_head.weight" : "base_model.model.model.embed_tokens.weight";
}

/* ------------------------------------------------------------------------ */

int peft_write_adapter_config(const char *path, const peft_lora_config *c, qerr *e) {
    if (c->r <= 0) return qerr_set(e, "%s: r must be positive, got %d", path, c->r);
    if (!(c->lora_alpha > 0) || !isfinite(c->lora_alpha))
        return qerr_set(e, "%s: lora_alpha must be a positive number", path);
    if (!(c->lora_dropout >= 0 && c->lora_dropout < 1))
        return qerr_set(e, "%s: lora_dropout must be in [0, 1)", path);
    if (c->n_target_modules < 1 || !c->target_modules)
        return qerr_set(e, "%s: at least one target module is needed", path);
    for (int i = 0; i < c->n_target_modules; i++)
        if (!c->target_modules[i] || !*c->target_modules[i])
            return qerr_set(e, "%s: target module %d is empty", path, i);

    char alpha[48], dropout[48];
    if (c->lora_alpha == floorf(c->lora_alpha) && c->lora_alpha < 2147483648.0f)
        snprintf(alpha, sizeof alpha, "%ld", (long)c->lora_alpha); /* PEFT types lora_alpha as int */
    else
        py_float_repr(alpha, sizeof alpha, c->lora_alpha);
    py_float_repr(dropout, sizeof dropout, c->lora_dropout);
    char r[24];
    snprintf(r, sizeof r, "%d", c->r);

    cJSON *o = cJSON_CreateObject(), *tm = cJSON_CreateArray();
    if (!o || !tm) {
        cJSON_Delete(o);
        cJSON_Delete(tm);
        return qerr_set(e, "out of memory");
    }
    cJSON_AddItemToObject(o, "target_modules", tm);
    for (int i = 0; i < c->n_target_modules; i++) cJSON_AddItemToArray(tm, cJSON_CreateString(c->target_modules[i]));
    cJSON_AddItemToObject(o, "alpha_pattern", cJSON_CreateObject());
    cJSON_AddNullToObject(o, "auto_mapping");
    if (c->base_model_name_or_path)
        cJSON_AddStringToObject(o, "base_model_name_or_path", c->base_model_name_or_path);
    else
        cJSON_AddNullToObject(o, "base_model_name_or_path");
    cJSON_AddStringToObject(o, "bias", "none");
    cJSON_AddNullToObject(o, "exclude_modules");
    cJSON_AddFalseToObject(o, "fan_in_fan_out");
    cJSON_AddTrueToObject(o, "inference_mode");
    cJSON_AddTrueToObject(o, "init_lora_weights");
    cJSON_AddNullToObject(o, "layer_replication");
    cJSON_AddNullToObject(o, "layers_pattern");
    cJSON_AddNullToObject(o, "layers_to_transform");
    cJSON_AddItemToObject(o, "loftq_config", cJSON_CreateObject());
    cJSON_AddRawToObject(o, "lora_alpha", alpha);
    cJSON_AddFalseToObject(o, "lora_bias");
    cJSON_AddRawToObject(o, "lora_dropout", dropout);
    cJSON_AddNullToObject(o, "megatron_config");
    cJSON_AddStringToObject(o, "megatron_core", "megatron.core");
    if (c->n_modules_to_save > 0) {
        cJSON *ms = cJSON_AddArrayToObject(o, "modules_to_save");
        for (int i = 0; ms && i < c->n_modules_to_save; i++)
            cJSON_AddItemToArray(ms, cJSON_CreateString(c->modules_to_save[i]));
        if (!ms || cJSON_GetArraySize(ms) != c->n_modules_to_save) {
            cJSON_Delete(o);
            return qerr_set(e, "out of memory writing %s", path);
        }
    } else {
        cJSON_AddNullToObject(o, "modules_to_save");
    }
    cJSON_AddStringToObject(o, "peft_type", "LORA");
    cJSON_AddRawToObject(o, "r", r);
    cJSON_AddItemToObject(o, "rank_pattern", cJSON_CreateObject());
    cJSON_AddNullToObject(o, "revision");
    cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM");
    cJSON_AddFalseToObject(o, "use_dora");
    cJSON_AddBoolToObject(o, "use_rslora", c->use_rslora != 0);

    /* every Add* above allocates; a failed one leaves the key missing */
    int expect = 26, have = cJSON_GetArraySize(o);
    strbuf b = {0};
    if (have == expect && cJSON_GetArraySize(tm) == c->n_target_modules) sb_py_json(&b, o, 0);
    cJSON_Delete(o);
    if (have != expect || b.oom || !b.p) {
        free(b.p);
        return qerr_set(e, "out of memory writing %s", path);
    }
    int rc = file_write_atomic(path, b.p, b.n, e);
    free(b.p);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* the adapter directory                                                      */

int peft_write_adapter(const char *dir, const peft_tensor *tensors, int n, const float *arena,
                       const peft_lora_config *c, qerr *e) {
    st_tensor *ts = calloc((size_t)(n > 0 ? n : 1), sizeof *ts);
    if (!ts) return qerr_set(e, "out of memory writing the adapter");
    for (int i = 0; i < n; i++) {
        const peft_tensor *t = &tensors[i];
        ts[i] = (st_tensor){.name = t->name, .dtype = "F32", .n_dims = 2, .shape = {t->rows, t->cols},
                            .data = arena + t->offset, .nbytes = (size_t)(t->rows * t->cols) * sizeof(float)};
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    int rc = safetensors_write(path, ts, n, NULL, e);
    free(ts);
    if (rc) return -1;
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    return peft_write_adapter_config(path, c, e);
}
