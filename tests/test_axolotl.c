/* tests/test_axolotl.c — axolotl's own configs (tests/fixtures/axolotl, copied from
 * the axolotl 0.19.0 sdist; SOURCE there) and the decision table of
 * trainer/config_axolotl.c: every key of axolotl's schema has a decision, no
 * real axolotl key is "unknown", every refusal of a file comes in one run with
 * its line, a config without adapter: is refused for that first, and the README
 * table lists every key. Prints how many example configs load as they are and
 * each refusal with its reason. Paths (base_model, datasets) are left as in the
 * files: reading a config never opens them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trainer/config.h"
#include "trainer/config_axolotl.h"

#define FIX "tests/fixtures/axolotl"

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

/* Every key of axolotl's schema (and of one datasets entry) has a row; applying any of them is never
 * "unknown key". */
static void test_every_schema_key_decided(void **state) {
    (void)state;
    static const char *const lists[2] = {FIX "/schema_keys.txt", FIX "/dataset_keys.txt"};
    for (int l = 0; l < 2; l++) {
        char *text = slurp(lists[l]);
        assert_non_null(text);
        int n = 0;
        for (char *tok = strtok(text, "\n"); tok; tok = strtok(NULL, "\n")) {
            const ax_key *k = l ? axolotl_dataset_key(tok) : axolotl_key(tok);
            if (!k) fail_msg("%s: \"%s\" has no row in trainer/config_axolotl.c", lists[l], tok);
            if ((k->decision == AX_SAFE || k->decision == AX_REFUSE) && !k->why) fail_msg("\"%s\": a refused or accepted key needs its reason", tok);
            if (l == 0) {
                train_config c;
                qerr e = {{0}};
                assert_int_equal(train_config_defaults(&c), 0);
                char kv[160];
                snprintf(kv, sizeof kv, "%s=~", tok);
                train_config_apply_override(&c, kv, &e);
                if (strstr(e.msg, "unknown key")) fail_msg("%s: %s", tok, e.msg);
                train_config_free(&c);
            }
            n++;
        }
        print_message("%s: %d keys, each decided\n", lists[l], n);
        assert_true(n > (l ? 30 : 390));
        free(text);
    }
}

/* README "Coming from axolotl" names every row. */
static void test_readme_lists_every_key(void **state) {
    (void)state;
    char *readme = slurp("README.md");
    assert_non_null(readme);
    char *sec = strstr(readme, "## Coming from axolotl");
    assert_non_null(sec);
    char *end = strstr(sec + 3, "\n## ");
    if (end) *end = 0;
    for (int l = 0; l < 2; l++) {
        int n;
        const ax_key *t = l ? axolotl_dataset_keys(&n) : axolotl_keys(&n);
        for (int i = 0; i < n; i++) {
            char pat[128];
            snprintf(pat, sizeof pat, "`%s`", t[i].name);
            if (!strstr(sec, pat)) fail_msg("README \"Coming from axolotl\" does not list %s", pat);
        }
    }
    free(readme);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The example configs: every one either loads and validates as it is, or lists all its refusals at
 * once, each naming its line; never an unknown key other than the one the example invents. */
static void test_example_configs(void **state) {
    (void)state;
    DIR *d = opendir(FIX);
    assert_non_null(d);
    char *names[128];
    int nn = 0;
    struct dirent *de;
    while ((de = readdir(d)) && nn < 128) {
        size_t l = strlen(de->d_name);
        if ((l > 4 && !strcmp(de->d_name + l - 4, ".yml")) || (l > 5 && !strcmp(de->d_name + l - 5, ".yaml")))
            names[nn++] = strdup(de->d_name);
    }
    closedir(d);
    qsort(names, (size_t)nn, sizeof *names, cmp_str);
    int loaded = 0, lora = 0;
    for (int i = 0; i < nn; i++) {
        char path[512];
        snprintf(path, sizeof path, FIX "/%s", names[i]);
        char *text = slurp(path);
        assert_non_null(text);
        int full_ft = !strstr(text, "\nadapter:");
        free(text);
        lora += !full_ft;
        train_config c;
        train_config_refusals r;
        qerr e = {{0}};
        int rc = train_config_load_all(path, &c, &r, &e);
        if (rc == 0) {
            rc = train_config_validate(&c, &e);
            if (rc) {
                r.lines = malloc(sizeof *r.lines);
                r.lines[0] = strdup(e.msg);
                r.n = 1;
            }
            train_config_free(&c);
        }
        if (rc == 0) {
            loaded++;
            print_message("LOADS   %s\n", names[i]);
        } else {
            print_message("REFUSED %s (%d)\n", names[i], r.n);
            assert_true(r.n >= 1);
            for (int j = 0; j < r.n; j++) {
                print_message("    %s\n", r.lines[j]);
                /* every line names the file; a key's refusal its line */
                assert_non_null(strstr(r.lines[j], names[i]));
                if (!strstr(r.lines[j], "no \"adapter:\"") && !strstr(r.lines[j], "(line "))
                    fail_msg("no line number: %s", r.lines[j]);
                if (strstr(r.lines[j], "unknown key") && !strstr(r.lines[j], "\"test_value\""))
                    fail_msg("a real axolotl key reported unknown: %s", r.lines[j]);
            }
            if (full_ft && !strstr(r.lines[0], "no \"adapter:\"")) fail_msg("full fine-tune not refused first");
        }
        train_config_refusals_free(&r);
        free(names[i]);
    }
    print_message("axolotl examples: %d of %d load as they are (%d LoRA/QLoRA, %d full fine-tune)\n", loaded, nn,
                  lora, nn - lora);
    assert_true(loaded >= 24); /* 15 before load_in_8bit was implemented (README "Coming from axolotl") */
}

/* One run lists every refused key; suggestions only for close keys. */
static void test_all_refusals_at_once(void **state) {
    (void)state;
    char path[] = "/tmp/qlora_axo_XXXXXX.yaml";
    int fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs("base_model: m.gguf\n"                   /* 1 */
          "neftune_noise_alpha: 5\n"              /* 2 */
          "optimizer: adamw_torch_4bit\n"          /* 3 */
          "datasets:\n"                            /* 4 */
          "  - path: a.jsonl\n"                    /* 5 */
          "    type: chat_template\n"              /* 6 */
          "    conversation: chatml\n"             /* 7 */
          "fp16: true\n"                           /* 8 */
          "lora_rnk: 8\n"                          /* 9 */
          "xyz: 1\n"                               /* 10 */
          "attn_implementation: flash_attention_2\n" /* 11 */
          "tf32: true\n",                          /* 12 */
          f);
    fclose(f);
    train_config c;
    train_config_refusals r;
    qerr e = {{0}};
    assert_int_equal(train_config_load_all(path, &c, &r, &e), -1);
    for (int i = 0; i < r.n; i++) print_message("%s\n", r.lines[i]);
    assert_int_equal(r.n, 7);
    assert_non_null(strstr(r.lines[0], "no \"adapter:\""));
    assert_non_null(strstr(r.lines[1], "neftune_noise_alpha: refused"));
    assert_non_null(strstr(r.lines[1], "(line 2)"));
    assert_non_null(strstr(r.lines[2], "4-bit AdamW"));
    assert_non_null(strstr(r.lines[3], "datasets[0].conversation: refused"));
    assert_non_null(strstr(r.lines[4], "fp16: refused"));
    assert_non_null(strstr(r.lines[5], "did you mean \"lora_r\""));
    assert_non_null(strstr(r.lines[6], "unknown key \"xyz\" (not a key"));
    assert_non_null(strstr(e.msg, "7 refused keys"));
    train_config_refusals_free(&r);
    remove(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_schema_key_decided),
        cmocka_unit_test(test_readme_lists_every_key),
        cmocka_unit_test(test_example_configs),
        cmocka_unit_test(test_all_refusals_at_once),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
