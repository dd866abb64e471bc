/* tests/test_unfreeze.c — axolotl's unfrozen_parameters under an adapter
 * (trainer/unfreeze.h) against axolotl's and PEFT's own code.
 *
 * Fixture tests/fixtures/ref_unfreeze.json.gz (scripts/make_unfreeze_fixture.py): tiny Gemma 3, Llama
 * (untied, LoRA on q/v, lm_head saved; tied, embed_tokens saved), Qwen2 and Phi-3 models wrapped by PEFT
 * 0.21: their named_parameters() with requires_grad, and for 8 pattern lists the names axolotl 0.19.0's
 * freeze_layers_except leaves trainable. Checked: unfreeze_peft_names gives the same names and the same
 * trainable set; unfreeze_match matches the names axolotl does; unfreeze_decide accepts exactly when
 * axolotl trains what qlora trains or nothing (the Gemma 3 examples), refuses otherwise naming a
 * parameter; ranges and bad regexes are refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "model/llama.h"
#include "model/llama_linear.h"
#include "trainer/unfreeze.h"
#include "tests/ref_fixture.h"

#define FIXTURE "tests/fixtures/ref_unfreeze.json.gz"


static int index_of(char **names, int n, const char *s) {
    for (int i = 0; i < n; i++)
        if (!strcmp(names[i], s)) return i;
    return -1;
}

/* The hyper-parameters, targets and saved modules of a fixture case. */
static void case_setup(cJSON *cs, llama_hparams *hp, int target[LLAMA_N_LINEAR], int save[LORA_N_SAVE]) {
    memset(hp, 0, sizeof *hp);
    const char *arch = cJSON_GetObjectItem(cs, "arch")->valuestring;
    hp->arch = !strcmp(arch, "gemma3") ? LLAMA_ARCH_GEMMA3
               : !strcmp(arch, "qwen2") ? LLAMA_ARCH_QWEN2
               : !strcmp(arch, "phi3")  ? LLAMA_ARCH_PHI3
                                        : LLAMA_ARCH_LLAMA;
    hp->n_layer = cJSON_GetObjectItem(cs, "n_layer")->valueint;
    hp->tied_embeddings = cJSON_GetObjectItem(cs, "tied")->valueint;
    hp->qkv_bias = hp->arch == LLAMA_ARCH_QWEN2;
    hp->qk_norm = hp->post_norms = hp->arch == LLAMA_ARCH_GEMMA3;
    const llama_linear_name *lin = llama_hparams_linears(hp);
    memset(target, 0, LLAMA_N_LINEAR * sizeof *target);
    cJSON *t;
    cJSON_ArrayForEach(t, cJSON_GetObjectItem(cs, "targets")) {
        int k = llama_linear_from_peft_in(lin, t->valuestring, strlen(t->valuestring));
        assert_true(k >= 0);
        target[k] = 1;
    }
    save[LORA_SAVE_EMBED] = save[LORA_SAVE_LM_HEAD] = 0;
    cJSON_ArrayForEach(t, cJSON_GetObjectItem(cs, "modules_to_save")) {
        if (!strcmp(t->valuestring, "embed_tokens")) save[LORA_SAVE_EMBED] = 1;
        if (!strcmp(t->valuestring, "lm_head")) save[LORA_SAVE_LM_HEAD] = 1;
    }
}

static void test_against_axolotl(void **state) {
    (void)state;
    cJSON *fx = ref_read_gz_json(FIXTURE);
    assert_non_null(fx);
    int n_cases = 0, n_results = 0, n_accept = 0, n_refuse = 0;
    cJSON *cs;
    cJSON_ArrayForEach(cs, cJSON_GetObjectItem(fx, "cases")) {
        const char *cname = cJSON_GetObjectItem(cs, "name")->valuestring;
        llama_hparams hp;
        int target[LLAMA_N_LINEAR], save[LORA_N_SAVE];
        case_setup(cs, &hp, target, save);
        char **names;
        unsigned char *tr;
        int n;
        qerr e = {{0}};
        assert_int_equal(unfreeze_peft_names(&hp, target, save, &names, &tr, &n, &e), 0);
        /* the same names (as a set: PyTorch lists Phi-3's o_proj before qkv_proj) and trainable flags */
        cJSON *want = cJSON_GetObjectItem(cs, "names"), *wtr = cJSON_GetObjectItem(cs, "trainable");
        if (cJSON_GetArraySize(want) != n) fail_msg("%s: %d names, PEFT %d", cname, n, cJSON_GetArraySize(want));
        for (int i = 0; i < n; i++) {
            const char *w = cJSON_GetArrayItem(want, i)->valuestring;
            int j = index_of(names, n, w);
            if (j < 0) fail_msg("%s: PEFT's \"%s\" is not among qlora's names", cname, w);
            if (tr[j] != cJSON_GetArrayItem(wtr, i)->valueint) fail_msg("%s: %s trainable differs", cname, w);
        }
        int n_tr = 0;
        for (int i = 0; i < n; i++) n_tr += tr[i];
        unsigned char *match = malloc((size_t)n);
        cJSON *res;
        cJSON_ArrayForEach(res, cJSON_GetObjectItem(cs, "results")) {
            cJSON *pj = cJSON_GetObjectItem(res, "patterns"), *tj = cJSON_GetObjectItem(res, "trainable");
            assert_non_null(tj);
            char *pats[8];
            int np = 0;
            cJSON *p;
            cJSON_ArrayForEach(p, pj) pats[np++] = p->valuestring;
            assert_int_equal(unfreeze_match(pats, np, names, n, match, &e), 0);
            int n_match = 0;
            for (int i = 0; i < n; i++) n_match += match[i];
            if (n_match != cJSON_GetArraySize(tj))
                fail_msg("%s %s: qlora matches %d names, axolotl leaves %d trainable", cname, pats[0], n_match,
                         cJSON_GetArraySize(tj));
            int same = n_match == n_tr;
            cJSON *t;
            cJSON_ArrayForEach(t, tj) {
                int j = index_of(names, n, t->valuestring);
                if (j < 0 || !match[j]) fail_msg("%s %s: axolotl unfreezes %s, qlora does not match it", cname, pats[0],
                                                 t->valuestring);
                if (!tr[j]) same = 0;
            }
            /* accepted iff axolotl trains exactly what qlora trains, or nothing */
            char note[1024];
            qerr de = {{0}};
            int rc = unfreeze_decide(pats, np, &hp, target, save, note, sizeof note, &de);
            int accept = same || n_match == 0;
            if (accept != (rc == 0))
                fail_msg("%s %s: %s (axolotl trains %d, qlora %d)", cname, pats[0], rc ? de.msg : note, n_match, n_tr);
            if (rc == 0) {
                assert_non_null(strstr(note, n_match ? "nothing changes" : "train nothing"));
                n_accept++;
            } else {
                assert_non_null(strstr(de.msg, "base_model.model.")); /* names a parameter */
                n_refuse++;
            }
            n_results++;
        }
        free(match);
        for (int i = 0; i < n; i++) free(names[i]);
        free(names);
        free(tr);
        n_cases++;
    }
    print_message("unfreeze: %d models, %d pattern lists as axolotl's freeze_layers_except (%d accepted, %d refused)\n",
                  n_cases, n_results, n_accept, n_refuse);
    assert_int_equal(n_cases, 5);
    cJSON_Delete(fx);
}

/* Ranges and bad regexes: refused in one line naming the pattern. */
static void test_refusals(void **state) {
    (void)state;
    qerr e = {{0}};
    assert_int_equal(unfreeze_pattern_check("^model.embed_tokens.weight$[:32000]", &e), 0);
    assert_int_equal(unfreeze_pattern_check("layers.(1", &e), -1);
    assert_non_null(strstr(e.msg, "layers.(1"));
    llama_hparams hp = {.arch = LLAMA_ARCH_LLAMA, .n_layer = 2, .tied_embeddings = 1};
    int target[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1}, save[LORA_N_SAVE] = {0, 0};
    char *r1[] = {"^base_model.model.model.embed_tokens.weight$[:32000]"};
    char note[1024];
    assert_int_equal(unfreeze_decide(r1, 1, &hp, target, save, note, sizeof note, &e), -1);
    assert_non_null(strstr(e.msg, "range"));
    print_message("%s\n", e.msg);
    char *r2[] = {".+lora_.+", "^.+layers.1.mlp.down_proj.base_layer.weight$"};
    assert_int_equal(unfreeze_decide(r2, 2, &hp, target, save, note, sizeof note, &e), -1);
    assert_non_null(strstr(e.msg, "base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"));
    print_message("%s\n", e.msg);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_against_axolotl),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
