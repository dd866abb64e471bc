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
            /* OpenLLaMA's two examples say fp16: true (and bf16: false): they load in fp16 mode */
            if (!strncmp(names[i], "openllama-3b__", 14)) assert_int_equal(c.fp16, 1);
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
                /* lora_modules_to_save [embed_tokens, lm_head] (llama-3/lora-8b.yml) is implemented */
                if (strstr(r.lines[j], "lora_modules_to_save")) fail_msg("lora_modules_to_save refused: %s", r.lines[j]);
            }
            if (full_ft && !strstr(r.lines[0], "no \"adapter:\"")) fail_msg("full fine-tune not refused first");
        }
        train_config_refusals_free(&r);
        free(names[i]);
    }
    print_message("axolotl examples: %d of %d load as they are (%d LoRA/QLoRA, %d full fine-tune)\n", loaded, nn,
                  lora, nn - lora);
    assert_true(loaded >= 30); /* 15 before load_in_8bit, lora_modules_to_save, sequential packing; 26 before gemma3 and fp16 */
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
          "float16: true\n"                        /* 8 */
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
    assert_int_equal(r.n, 6); /* "xyz" is far from every key: ignored, as axolotl ignores it */
    assert_non_null(strstr(r.lines[0], "no \"adapter:\""));
    assert_non_null(strstr(r.lines[1], "neftune_noise_alpha: refused"));
    assert_non_null(strstr(r.lines[1], "(line 2)"));
    assert_non_null(strstr(r.lines[2], "4-bit AdamW"));
    assert_non_null(strstr(r.lines[3], "datasets[0].conversation: refused"));
    assert_non_null(strstr(r.lines[4], "float16: refused"));
    assert_non_null(strstr(r.lines[5], "did you mean \"lora_r\""));
    assert_non_null(strstr(e.msg, "6 refused keys"));
    train_config_refusals_free(&r);
    remove(path);
}

/* Write `text` to a fresh temporary .yaml file; path gets its name. */
static void write_yaml(char *path, const char *text) {
    int fd = mkstemps(path, 5);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs(text, f);
    fclose(f);
}

static int has_warning(const train_config *c, const char *needle) {
    for (int i = 0; i < c->n_warnings; i++)
        if (strstr(c->warnings[i], needle)) return 1;
    return 0;
}

/* axolotl 0.19.0 drops a key its schema lacks (pydantic extra="ignore"): a key far from every key is
 * accepted with one [config] line; a likely typo (close to a key) stays refused with "did you mean";
 * the same in a datasets entry; on the command line an unknown key is still refused. */
static void test_unknown_keys(void **state) {
    (void)state;
    char path[] = "/tmp/qlora_axo_XXXXXX.yaml";
    write_yaml(path, "base_model: m.gguf\n"
                     "adapter: qlora\n"
                     "datasets:\n"
                     "  - path: a.jsonl\n"
                     "    type: completion\n"
                     "    my_note: hello\n"
                     "test_value: true\n"
                     "xyz: 1\n");
    train_config c;
    train_config_refusals r;
    qerr e = {{0}};
    assert_int_equal(train_config_load_all(path, &c, &r, &e), 0);
    assert_int_equal(r.n, 0);
    assert_true(has_warning(&c, "ignoring \"test_value\": not a key of axolotl 0.19.0's config schema"));
    assert_true(has_warning(&c, "ignoring \"xyz\""));
    assert_true(has_warning(&c, "datasets[0]: ignoring \"my_note\""));
    assert_int_equal(train_config_apply_override(&c, "test_value=1", &e), -1);
    assert_non_null(strstr(e.msg, "unknown key \"test_value\""));
    train_config_free(&c);
    remove(path);

    char p2[] = "/tmp/qlora_axo_XXXXXX.yaml";
    write_yaml(p2, "base_model: m.gguf\n"
                   "adapter: qlora\n"
                   "datasets:\n"
                   "  - path: a.jsonl\n"
                   "    type: completion\n"
                   "    feild: text\n"
                   "lora_rnk: 8\n"
                   "sample_pakcing: true\n"
                   "learnig_rate: 0.001\n");
    assert_int_equal(train_config_load_all(p2, &c, &r, &e), -1);
    for (int i = 0; i < r.n; i++) print_message("%s\n", r.lines[i]);
    assert_int_equal(r.n, 4);
    assert_non_null(strstr(r.lines[0], "datasets[0]: unknown key \"feild\"; did you mean \"field\"?"));
    assert_non_null(strstr(r.lines[1], "unknown key \"lora_rnk\"; did you mean \"lora_r\"?"));
    assert_non_null(strstr(r.lines[2], "did you mean \"sample_packing\"?"));
    assert_non_null(strstr(r.lines[3], "did you mean \"learning_rate\"?"));
    train_config_refusals_free(&r);
    remove(p2);
}

/* axolotl's selective_checkpointing (SAC, save: [attention]) runs as gradient_checkpointing:
 * selective; it requires gradient_checkpointing (axolotl's rule, in either order in the file);
 * other save entries and offload are refused by name. */
static void test_selective_checkpointing(void **state) {
    (void)state;
    static const char *const base = "base_model: m.gguf\nadapter: qlora\nlora_target_linear: true\n"
                                    "datasets:\n  - path: a.jsonl\n    type: completion\n";
    static const struct {
        const char *extra;
        int ok, ckpt;
        const char *needle;
    } cases[] = {
        {"selective_checkpointing: true\ngradient_checkpointing: true\n", 1, 2, "runs as gradient_checkpointing: selective"},
        {"gradient_checkpointing: true\nselective_checkpointing:\n  save: [attention]\n", 1, 2, "selective"},
        {"selective_checkpointing: {save_sliding_window: true}\n", 1, 2, "selective"}, /* default gc: true */
        {"selective_checkpointing: true\ngradient_checkpointing: selective\n", 1, 2, NULL},
        {"selective_checkpointing: false\ngradient_checkpointing: false\n", 1, 0, NULL},
        {"selective_checkpointing: true\ngradient_checkpointing: false\n", 0, 0,
         "selective_checkpointing: refused: it requires gradient_checkpointing"},
        {"selective_checkpointing:\n  save: [attention, \"aten::mm\"]\n", 0, 0,
         "selective_checkpointing.save: \"aten::mm\": refused"},
        {"selective_checkpointing: {offload: true}\n", 0, 0, "selective_checkpointing.offload: refused"},
        {"selective_checkpointing: {saev: [attention]}\n", 0, 0, "selective_checkpointing.saev: unknown key"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[] = "/tmp/qlora_axo_XXXXXX.yaml", text[512];
        snprintf(text, sizeof text, "%s%s", base, cases[i].extra);
        write_yaml(path, text);
        train_config c;
        train_config_refusals r;
        qerr e = {{0}};
        int rc = train_config_load_all(path, &c, &r, &e);
        print_message("case %zu: rc %d %s\n", i, rc, rc ? e.msg : "");
        assert_int_equal(rc, cases[i].ok ? 0 : -1);
        if (cases[i].ok) {
            assert_int_equal(c.gradient_checkpointing, cases[i].ckpt);
            if (cases[i].needle) assert_true(has_warning(&c, cases[i].needle));
            if (train_config_validate(&c, &e)) print_message("validate: %s\n", e.msg);
            assert_int_equal(train_config_validate(&c, &e), 0);
            train_config_free(&c);
        } else {
            assert_non_null(strstr(e.msg, cases[i].needle));
            train_config_refusals_free(&r);
        }
        remove(path);
    }
}

/* pretraining_dataset: axolotl's rules (max_steps required, val_set_size refused, only the first entry
 * read) and what qlora adds (sample_packing required, streaming only with it), each refused in one line. */
static void test_pretraining_dataset_config(void **state) {
    (void)state;
    static const char *const base = "base_model: m.gguf\nadapter: qlora\nlora_target_linear: true\n";
    static const struct {
        const char *extra;
        int load_ok, valid;
        const char *needle;
    } cases[] = {
        {"pretraining_dataset:\n  - path: c4.jsonl\n    name: en\n    type: pretrain\nmax_steps: 10\n"
         "sample_packing: true\nstreaming: true\nstreaming_multipack_buffer_size: 100\n", 1, 1,
         "ignoring \"pretraining_dataset.name\""},
        {"pretraining_dataset: c4.jsonl\nmax_steps: 10\nsample_packing: true\n", 1, 1, NULL},
        {"pretraining_dataset:\n  - path: c4.jsonl\nsample_packing: true\n", 1, 0, "max_steps must be set"},
        {"pretraining_dataset:\n  - path: c4.jsonl\nmax_steps: 3\nsample_packing: true\nval_set_size: 0.1\n", 1, 0,
         "val_set_size is not supported"},
        {"pretraining_dataset:\n  - path: c4.jsonl\nmax_steps: 3\n", 1, 0, "without sample_packing"},
        {"pretraining_dataset:\n  - path: c4.jsonl\nmax_steps: 3\nsample_packing: true\n"
         "datasets:\n  - path: a.jsonl\n    type: completion\n", 1, 0, "pretraining_dataset and datasets are both set"},
        {"pretraining_dataset:\n  - path: c4.jsonl\nmax_steps: 3\nsample_packing: true\npretrain_multipack_attn: false\n",
         1, 0, "pretrain_multipack_attn: false"},
        {"datasets:\n  - path: a.jsonl\n    type: completion\nstreaming: true\n", 1, 0,
         "streaming: true without pretraining_dataset"},
        {"pretraining_dataset:\n  - path: a.jsonl\n  - path: b.jsonl\n", 0, 0, "axolotl reads only the first"},
        {"pretraining_dataset:\n  - path: a.jsonl\n    split: train[:10%]\n", 0, 0, "pretraining_dataset.split"},
        {"pretraining_dataset:\n  - path: a.jsonl\n    type: completion\n", 0, 0,
         "pretraining_dataset.type: expected pretrain"},
        {"pretraining_dataset:\n  - text_column: body\n", 0, 0, "missing \"path\""},
        {"pretraining_dataset:\n  - path: a.jsonl\n    columns: [x]\n", 0, 0, "pretraining_dataset.columns: unknown key"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[] = "/tmp/qlora_axo_XXXXXX.yaml", text[1024];
        snprintf(text, sizeof text, "%s%s", base, cases[i].extra);
        write_yaml(path, text);
        train_config c;
        train_config_refusals r;
        qerr e = {{0}};
        int rc = train_config_load_all(path, &c, &r, &e);
        if (rc == 0) {
            int v = train_config_validate(&c, &e);
            print_message("case %zu: loads, validate %d %s\n", i, v, v ? e.msg : "");
            assert_true(cases[i].load_ok);
            assert_int_equal(v == 0, cases[i].valid);
            if (cases[i].needle && cases[i].valid) assert_true(has_warning(&c, cases[i].needle));
            if (cases[i].needle && !cases[i].valid) assert_non_null(strstr(e.msg, cases[i].needle));
            if (cases[i].valid) assert_non_null(c.pretraining_path);
            train_config_free(&c);
        } else {
            print_message("case %zu: %s\n", i, e.msg);
            assert_false(cases[i].load_ok);
            assert_non_null(strstr(e.msg, cases[i].needle));
            train_config_refusals_free(&r);
        }
        remove(path);
    }
}

/* fp16: true with the other precision keys: bf16: true refused (as axolotl), auto / false / unset yield to
 * it, an empty value is false (axolotl's None), the sharded strategies refused in one line. */
static void test_fp16_config(void **state) {
    (void)state;
    static const char *const base = "base_model: m.gguf\nadapter: qlora\nload_in_4bit: true\nlora_target_linear: true\n"
                                    "datasets:\n  - path: a.jsonl\n    type: completion\n";
    static const struct {
        const char *extra;
        int valid, fp16, bf16;
        const char *needle;
    } cases[] = {
        {"fp16: true\n", 1, 1, 1, NULL},
        {"bf16: auto\nfp16: true\n", 1, 1, 1, NULL},
        {"bf16: false\nfp16: true\n", 1, 1, 0, NULL},
        {"fp16:\n", 1, 0, 1, NULL},
        {"fp16: false\nbf16: true\n", 1, 0, 1, NULL},
        {"bf16: true\nfp16: true\n", 0, 1, 1, "bf16: true and fp16: true are both set"},
        {"fp16: true\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n", 0, 1, 1, "fp16: true with FULL_SHARD"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[] = "/tmp/qlora_axo_XXXXXX.yaml", text[1024];
        snprintf(text, sizeof text, "%s%s", base, cases[i].extra);
        write_yaml(path, text);
        train_config c;
        train_config_refusals r;
        qerr e = {{0}};
        int rc = train_config_load_all(path, &c, &r, &e);
        if (rc) print_message("case %zu: %s\n", i, e.msg);
        assert_int_equal(rc, 0);
        int v = train_config_validate(&c, &e);
        print_message("case %zu: fp16 %d bf16 %d, validate %d %s\n", i, c.fp16, c.bf16, v, v ? e.msg : "");
        assert_int_equal(c.fp16, cases[i].fp16);
        assert_int_equal(c.bf16, cases[i].bf16);
        assert_int_equal(v == 0, cases[i].valid);
        if (cases[i].needle) assert_non_null(strstr(e.msg, cases[i].needle));
        train_config_free(&c);
        remove(path);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_schema_key_decided),
        cmocka_unit_test(test_readme_lists_every_key),
        cmocka_unit_test(test_example_configs),
        cmocka_unit_test(test_all_refusals_at_once),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_selective_checkpointing),
        cmocka_unit_test(test_pretraining_dataset_config),
        cmocka_unit_test(test_fp16_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
