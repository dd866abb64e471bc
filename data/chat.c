/* data/chat.c — prompt rendering and stop tokens (see chat.h). The ChatML
 * layout is the SmolLM2 template (docs/formats.md §6); the
 * Llama 3 one is Meta's tokenizer_config.json template. */
#include "data/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/strbuf.h"
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

int chat_render_prompt(const tokenizer *t, const char *system, const char *user, char **out, qerr *e) {
    *out = NULL;
    const char *tmpl = tokenizer_chat_template(t);
    if (!tmpl) return qerr_set(e, "the model has no chat template");
    strbuf b = {0};
    if (strstr(tmpl, "<|im_start|>") && strstr(tmpl, "<|im_end|>")) {
        if (system) {
            strbuf_puts(&b, "<|im_start|>system\n");
            strbuf_puts(&b, system);
            strbuf_puts(&b, "<|im_end|>\n");
        } else {
            char *def = NULL;
            if (dataset_chatml_default_system(tmpl, &def, e)) return -1;
            if (def) strbuf_puts(&b, def);
            free(def);
        }
        strbuf_puts(&b, "<|im_start|>user\n");
        strbuf_puts(&b, user);
        strbuf_puts(&b, "<|im_end|>\n<|im_start|>assistant\n");
    } else if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|eot_id|>")) {
        int32_t bos = tokenizer_bos_id(t);
        if (bos >= 0) strbuf_puts(&b, tokenizer_token_text(t, bos));
        if (system) {
            strbuf_puts(&b, "<|start_header_id|>system<|end_header_id|>\n\n");
            strbuf_puts(&b, system);
            strbuf_puts(&b, "<|eot_id|>");
        }
        strbuf_puts(&b, "<|start_header_id|>user<|end_header_id|>\n\n");
        strbuf_puts(&b, user);
        strbuf_puts(&b, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    } else {
        return qerr_set(e, "the model's chat template is neither ChatML nor Llama 3; not supported "
                           "(use --raw to give the prompt text as it is)");
    }
    if (b.oom) {
        free(b.p);
        return qerr_set(e, "out of memory");
    }
    *out = b.p;
    return 0;
}
