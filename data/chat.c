/* data/chat.c — prompt rendering and stop tokens (see chat.h). The ChatML
 * layout is the SmolLM2 template (../shared/reference/formats.md §6); the
 * Llama 3 one is Meta's tokenizer_config.json template. */
#include "data/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/dataset.h"

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

static int cat(char **buf, size_t *n, size_t *cap, const char *s) {
    size_t l = strlen(s);
    if (*n + l + 1 > *cap) {
        size_t c = (*cap ? *cap : 256);
        while (c < *n + l + 1) c *= 2;
        char *nb = realloc(*buf, c);
        if (!nb) return -1;
        *buf = nb;
        *cap = c;
    }
    memcpy(*buf + *n, s, l + 1);
    *n += l;
    return 0;
}

int chat_render_prompt(const tokenizer *t, const char *system, const char *user, char **out, qerr *e) {
    *out = NULL;
    const char *tmpl = tokenizer_chat_template(t);
    if (!tmpl) return qerr_set(e, "the model has no chat template");
    char *buf = NULL;
    size_t n = 0, cap = 0;
    int bad = 0;
    if (strstr(tmpl, "<|im_start|>") && strstr(tmpl, "<|im_end|>")) {
        if (system) {
            bad |= cat(&buf, &n, &cap, "<|im_start|>system\n") || cat(&buf, &n, &cap, system) ||
                   cat(&buf, &n, &cap, "<|im_end|>\n");
        } else {
            char *def = NULL;
            if (dataset_chatml_default_system(tmpl, &def, e)) return -1;
            if (def) bad |= cat(&buf, &n, &cap, def);
            free(def);
        }
        bad |= cat(&buf, &n, &cap, "<|im_start|>user\n") || cat(&buf, &n, &cap, user) ||
               cat(&buf, &n, &cap, "<|im_end|>\n<|im_start|>assistant\n");
    } else if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|eot_id|>")) {
        int32_t bos = tokenizer_bos_id(t);
        if (bos >= 0) bad |= cat(&buf, &n, &cap, tokenizer_token_text(t, bos));
        if (system)
            bad |= cat(&buf, &n, &cap, "<|start_header_id|>system<|end_header_id|>\n\n") ||
                   cat(&buf, &n, &cap, system) || cat(&buf, &n, &cap, "<|eot_id|>");
        bad |= cat(&buf, &n, &cap, "<|start_header_id|>user<|end_header_id|>\n\n") || cat(&buf, &n, &cap, user) ||
               cat(&buf, &n, &cap, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    } else {
        return qerr_set(e, "the model's chat template is neither ChatML nor Llama 3; not supported "
                           "(use --raw to give the prompt text as it is)");
    }
    if (bad) {
        free(buf);
        return qerr_set(e, "out of memory");
    }
    *out = buf;
    return 0;
}
