/* tests/e2e_run.c — see e2e_run.h. */
#include "tests/e2e_run.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "core/file.h"
#include "core/strbuf.h"
#include "tests/subproc.h"

int e2e_setup(char *dir, size_t dn, char *cfg, size_t cn, const char *prefix, int drop_last_word, const char *keys) {
    if (access(E2E_MODEL, R_OK) || access(E2E_HELDOUT, R_OK)) {
        fprintf(stderr, "%s or %s missing: run `make model dataset`\n", E2E_MODEL, E2E_HELDOUT);
        return -1;
    }
    snprintf(dir, dn, "/tmp/%sXXXXXX", prefix);
    if (!mkdtemp(dir)) return -1;
    FILE *in = fopen(E2E_HELDOUT, "r");
    char p[256];
    snprintf(p, sizeof p, "%s/train.jsonl", dir);
    FILE *out = fopen(p, "w");
    if (!in || !out) return -1;
    static char line[1 << 20];
    for (int k = 0; k < 4 && fgets(line, sizeof line, in); k++) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *t = cJSON_GetObjectItem(j, "text");
        if (!cJSON_IsString(t)) return -1;
        char text[700];
        snprintf(text, sizeof text, "%s", t->valuestring);
        char *sp = drop_last_word ? strrchr(text, ' ') : NULL;
        if (sp) *sp = 0;
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "text", text);
        char *s = cJSON_PrintUnformatted(o);
        fprintf(out, "%s\n", s);
        free(s);
        cJSON_Delete(o);
        cJSON_Delete(j);
    }
    fclose(in);
    fclose(out);
    const char *thr = getenv("QLORA_TEST_THREADS");
    snprintf(cfg, cn, "%s/config.yaml", dir);
    out = fopen(cfg, "w");
    if (!out) return -1;
    fprintf(out,
            "base_model: " E2E_MODEL "\nadapter: qlora\n"
            "lora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlora_target_modules: [q_proj, v_proj]\n"
            "datasets:\n  - path: %s/train.jsonl\n    type: completion\n"
            "val_set_size: 1\nsequence_len: 64\nmicro_batch_size: 2\ngradient_accumulation_steps: 1\n"
            "%snum_threads: %s\n",
            dir, keys, thr && *thr ? thr : "1");
    fclose(out);
    return 0;
}

int e2e_run_trainer(const char *cfg, const char *out_dir, const char *const *extra_args,
                    const char *const *env_extra, char **err) {
    char od[256];
    snprintf(od, sizeof od, "output_dir=%s", out_dir);
    char *argv[16];
    int n = 0;
    argv[n++] = (char *)subproc_trainer();
    argv[n++] = (char *)cfg;
    argv[n++] = od;
    for (int i = 0; extra_args && extra_args[i] && n < 15; i++) argv[n++] = (char *)extra_args[i];
    argv[n] = NULL;
    return subproc_run(argv, env_extra, 900, err);
}

char *e2e_metrics_canonical(const char *dir, const char *const *keep, const char *const *drop) {
    char p[256];
    snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
    char *s = file_read_all(p, NULL, NULL);
    assert_non_null(s);
    strbuf out = {0};
    strbuf_puts(&out, ""); /* an empty file still gives a string */
    for (char *line = strtok(s, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *j = cJSON_Parse(line);
        assert_non_null(j);
        if (keep) {
            cJSON *o = cJSON_CreateObject();
            for (size_t k = 0; keep[k]; k++) {
                cJSON *it = cJSON_GetObjectItemCaseSensitive(j, keep[k]);
                if (it) cJSON_AddItemToObject(o, keep[k], cJSON_Duplicate(it, 1));
            }
            cJSON_Delete(j);
            j = o;
        }
        for (size_t k = 0; drop && drop[k]; k++) cJSON_DeleteItemFromObject(j, drop[k]);
        char *c = cJSON_PrintUnformatted(j);
        strbuf_puts(&out, c);
        strbuf_puts(&out, "\n");
        free(c);
        cJSON_Delete(j);
    }
    free(s);
    assert_false(out.oom);
    return out.p;
}

void e2e_assert_same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    char *x = file_read_all(a, &na, NULL), *y = file_read_all(b, &nb, NULL);
    if (!x || !y || na != nb || memcmp(x, y, na)) print_error("%s and %s differ\n", a, b);
    assert_non_null(x);
    assert_non_null(y);
    assert_int_equal(na, nb);
    assert_memory_equal(x, y, na);
    free(x);
    free(y);
}
