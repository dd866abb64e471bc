/* tests/test_config.c — trainer/config: defaults, a full file, an axolotl-style
 * example, every error class (message substrings), command-line overrides and
 * the write -> load round trip. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/tmpdir.h"
#include "model/llama.h"
#include "trainer/config.h"

static int group_setup(void **state) { return tmpdir_setup(state, "qlora_test_config"); }

/* Write `text` to <dir>/<name> and return the path (static buffer per call site). */
static void write_file(const tmpdir *t, const char *name, const char *text, char *path, size_t n) {
    snprintf(path, n, "%s/%s", t->dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* Load `text` as <name>; expect failure with `substr` in the message. */
static void expect_load_error(const tmpdir *t, const char *name, const char *text, const char *substr) {
    char path[256];
    write_file(t, name, text, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    int rc = train_config_load(path, &c, &e);
    if (rc == 0 || !strstr(e.msg, substr)) {
        print_error("load %s: rc=%d msg=[%s], expected substring [%s]\n", name, rc, e.msg, substr);
        if (rc == 0) train_config_free(&c);
        fail();
    }
}

/* Load `text` (must succeed) with a [config] line saying that `key` is ignored (a key far from every
 * key: axolotl 0.19.0 drops it, pydantic extra="ignore"). */
static void expect_ignored_key(const tmpdir *t, const char *name, const char *text, const char *key) {
    char path[256], want[160];
    write_file(t, name, text, path, sizeof path);
    snprintf(want, sizeof want, "ignoring \"%s\": not a key of axolotl 0.19.0's config schema", key);
    train_config c;
    qerr e = {{0}};
    if (train_config_load(path, &c, &e)) {
        print_error("load %s failed: %s\n", name, e.msg);
        fail();
    }
    int found = 0;
    for (int i = 0; i < c.n_warnings; i++) found += strstr(c.warnings[i], want) != NULL;
    train_config_free(&c);
    if (found != 1) {
        print_error("load %s: expected one [config] line with [%s]\n", name, want);
        fail();
    }
}

/* Load `text` (must succeed), validate; expect failure with `substr`. */
static void expect_validate_error(const tmpdir *t, const char *name, const char *text, const char *substr) {
    char path[256];
    write_file(t, name, text, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    if (train_config_load(path, &c, &e)) {
        print_error("load %s failed: %s\n", name, e.msg);
        fail();
    }
    int rc = train_config_validate(&c, &e);
    train_config_free(&c);
    if (rc == 0 || !strstr(e.msg, substr)) {
        print_error("validate %s: rc=%d msg=[%s], expected substring [%s]\n", name, rc, e.msg, substr);
        fail();
    }
}

static const char *MINIMAL = "base_model: m.gguf\n"
                             "adapter: qlora\n"
                             "datasets:\n"
                             "  - path: train.jsonl\n"
                             "    type: completion\n"
                             "lora_target_linear: true\n";

static const char *FULL =
    "# every implemented key, none at its default\n"
    "base_model: models/SmolLM2-135M-Instruct.Q4_1.gguf\n"
    "load_in_4bit: true\n"
    "bnb_4bit_use_double_quant: false\n"
    "bnb_4bit_quant_type: nf4\n"
    "adapter: qlora\n"
    "lora_r: 16\n"
    "lora_alpha: 32.5\n"
    "lora_dropout: 0.1\n"
    "peft_use_rslora: true\n"
    "lora_target_modules:\n"
    "  - q_proj\n"
    "  - v_proj\n"
    "  - down_proj\n"
    "lora_target_linear: false\n"
    "datasets:\n"
    "  - path: data/a.jsonl\n"
    "    type: completion\n"
    "    field: content\n"
    "  - path: \"data/b \\\"quoted\\\" \\\\ é.jsonl\"\n"
    "    type: chat_template\n"
    "    field_messages: conversation\n"
    "test_datasets:\n"
    "  - path: data/held.jsonl\n"
    "    type: alpaca\n"
    "val_set_size: 0\n"
    "sequence_len: 1024\n"
    "sample_packing: yes\n"
    "micro_batch_size: 4\n"
    "gradient_accumulation_steps: 8\n"
    "num_epochs: 3\n"
    "max_steps: 500\n"
    "learning_rate: 1e-4\n"
    "lr_scheduler: linear\n"
    "warmup_steps: 0\n"
    "warmup_ratio: 0.03\n"
    "weight_decay: 0.01\n"
    "max_grad_norm: 0.5\n"
    "optimizer: adamw_torch\n"
    "adam_beta1: 0.85\n"
    "adam_beta2: 0.95\n"
    "adam_epsilon: 1e-6\n"
    "seed: 7\n"
    "output_dir: ./runs/full\n"
    "logging_steps: 5\n"
    "eval_steps: 50\n"
    "evals_per_epoch: 0\n"
    "eval_max_tokens: 20000\n"
    "train_on_inputs: true\n"
    "bf16: false\n"
    "gradient_checkpointing: off\n"
    "num_threads: 2\n";

static void check_full(const train_config *c) {
    assert_string_equal(c->base_model, "models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_int_equal(c->load_in_4bit, 1);
    assert_int_equal(c->bnb_4bit_use_double_quant, 0);
    assert_string_equal(c->bnb_4bit_quant_type, "nf4");
    assert_string_equal(c->adapter, "qlora");
    assert_int_equal(c->lora_r, 16);
    assert_true(c->lora_alpha == 32.5f);
    assert_true(c->lora_dropout == 0.1f);
    assert_int_equal(c->use_rslora, 1);
    assert_int_equal(c->n_lora_target_modules, 3);
    assert_string_equal(c->lora_target_modules[0], "q_proj");
    assert_string_equal(c->lora_target_modules[1], "v_proj");
    assert_string_equal(c->lora_target_modules[2], "down_proj");
    assert_int_equal(c->lora_target_linear, 0);
    assert_int_equal(c->n_datasets, 2);
    assert_string_equal(c->datasets[0].path, "data/a.jsonl");
    assert_string_equal(c->datasets[0].type, "completion");
    assert_string_equal(c->datasets[0].field, "content");
    assert_string_equal(c->datasets[0].field_messages, "messages");
    assert_string_equal(c->datasets[1].path, "data/b \"quoted\" \\ é.jsonl");
    assert_string_equal(c->datasets[1].type, "chat_template");
    assert_string_equal(c->datasets[1].field, "text");
    assert_string_equal(c->datasets[1].field_messages, "conversation");
    assert_int_equal(c->n_test_datasets, 1);
    assert_string_equal(c->test_datasets[0].path, "data/held.jsonl");
    assert_string_equal(c->test_datasets[0].type, "alpaca");
    assert_true(c->val_set_size == 0.0);
    assert_int_equal(c->sequence_len, 1024);
    assert_int_equal(c->sample_packing, 1);
    assert_int_equal(c->micro_batch_size, 4);
    assert_int_equal(c->gradient_accumulation_steps, 8);
    assert_int_equal(c->num_epochs, 3);
    assert_int_equal(c->max_steps, 500);
    assert_true(c->learning_rate == 1e-4f);
    assert_string_equal(c->lr_scheduler, "linear");
    assert_int_equal(c->warmup_steps, 0);
    assert_true(c->warmup_ratio == 0.03f);
    assert_true(c->weight_decay == 0.01f);
    assert_true(c->max_grad_norm == 0.5f);
    assert_string_equal(c->optimizer, "adamw");
    assert_true(c->adam_beta1 == 0.85f);
    assert_true(c->adam_beta2 == 0.95f);
    assert_true(c->adam_epsilon == 1e-6f);
    assert_int_equal(c->seed, 7);
    assert_string_equal(c->output_dir, "./runs/full");
    assert_int_equal(c->logging_steps, 5);
    assert_int_equal(c->eval_steps, 50);
    assert_int_equal(c->evals_per_epoch, 0);
    assert_int_equal(c->eval_max_tokens, 20000);
    assert_int_equal(c->train_on_inputs, 1);
    assert_int_equal(c->bf16, 0);
    assert_int_equal(c->gradient_checkpointing, 0);
    assert_int_equal(c->num_threads, 2);
}

static void assert_datasets_equal(const dataset_cfg *a, int na, const dataset_cfg *b, int nb) {
    assert_int_equal(na, nb);
    for (int i = 0; i < na; i++) {
        assert_string_equal(a[i].path, b[i].path);
        assert_string_equal(a[i].type, b[i].type);
        assert_string_equal(a[i].field, b[i].field);
        assert_string_equal(a[i].field_messages, b[i].field_messages);
        assert_string_equal(a[i].message_field_role, b[i].message_field_role);
        assert_string_equal(a[i].message_field_content, b[i].message_field_content);
        assert_string_equal(a[i].train_on_eos, b[i].train_on_eos);
        assert_string_equal(a[i].split, b[i].split);
        assert_int_equal(a[i].drop_system_message, b[i].drop_system_message);
        assert_int_equal(a[i].n_roles_to_train, b[i].n_roles_to_train);
        for (int j = 0; j < a[i].n_roles_to_train; j++) assert_string_equal(a[i].roles_to_train[j], b[i].roles_to_train[j]);
        assert_true((a[i].data_files == NULL) == (b[i].data_files == NULL));
        if (a[i].data_files) assert_string_equal(a[i].data_files, b[i].data_files);
        assert_true((a[i].chat_template == NULL) == (b[i].chat_template == NULL));
        if (a[i].chat_template) assert_string_equal(a[i].chat_template, b[i].chat_template);
        assert_true((a[i].train_on_eot == NULL) == (b[i].train_on_eot == NULL));
        if (a[i].train_on_eot) assert_string_equal(a[i].train_on_eot, b[i].train_on_eot);
        assert_true((a[i].chat_template_jinja == NULL) == (b[i].chat_template_jinja == NULL));
        if (a[i].chat_template_jinja) assert_string_equal(a[i].chat_template_jinja, b[i].chat_template_jinja);
    }
}

static void assert_configs_equal(const train_config *a, const train_config *b) {
    assert_string_equal(a->base_model, b->base_model);
    assert_int_equal(a->load_in_4bit, b->load_in_4bit);
    assert_int_equal(a->bnb_4bit_use_double_quant, b->bnb_4bit_use_double_quant);
    assert_string_equal(a->bnb_4bit_quant_type, b->bnb_4bit_quant_type);
    assert_string_equal(a->adapter, b->adapter);
    assert_int_equal(a->data_seed, b->data_seed);
    assert_true(a->loss_watchdog_threshold == b->loss_watchdog_threshold);
    assert_int_equal(a->loss_watchdog_patience, b->loss_watchdog_patience);
    assert_string_equal(a->chat_template, b->chat_template);
    const char *sa[3] = {a->special_bos, a->special_eos, a->special_unk}, *sb[3] = {b->special_bos, b->special_eos, b->special_unk};
    for (int i = 0; i < 3; i++) {
        assert_true((sa[i] == NULL) == (sb[i] == NULL));
        if (sa[i]) assert_string_equal(sa[i], sb[i]);
    }
    assert_int_equal(a->lora_r, b->lora_r);
    assert_memory_equal(&a->lora_alpha, &b->lora_alpha, sizeof(float));
    assert_memory_equal(&a->lora_dropout, &b->lora_dropout, sizeof(float));
    assert_int_equal(a->use_rslora, b->use_rslora);
    assert_int_equal(a->n_lora_target_modules, b->n_lora_target_modules);
    for (int i = 0; i < a->n_lora_target_modules; i++)
        assert_string_equal(a->lora_target_modules[i], b->lora_target_modules[i]);
    assert_int_equal(a->lora_target_linear, b->lora_target_linear);
    assert_datasets_equal(a->datasets, a->n_datasets, b->datasets, b->n_datasets);
    assert_datasets_equal(a->test_datasets, a->n_test_datasets, b->test_datasets, b->n_test_datasets);
    assert_memory_equal(&a->val_set_size, &b->val_set_size, sizeof(double));
    assert_int_equal(a->sequence_len, b->sequence_len);
    assert_int_equal(a->sample_packing, b->sample_packing);
    assert_int_equal(a->micro_batch_size, b->micro_batch_size);
    assert_int_equal(a->gradient_accumulation_steps, b->gradient_accumulation_steps);
    assert_int_equal(a->num_epochs, b->num_epochs);
    assert_int_equal(a->max_steps, b->max_steps);
    assert_memory_equal(&a->learning_rate, &b->learning_rate, sizeof(float));
    assert_string_equal(a->lr_scheduler, b->lr_scheduler);
    assert_int_equal(a->warmup_steps, b->warmup_steps);
    assert_memory_equal(&a->warmup_ratio, &b->warmup_ratio, sizeof(float));
    assert_memory_equal(&a->weight_decay, &b->weight_decay, sizeof(float));
    assert_memory_equal(&a->max_grad_norm, &b->max_grad_norm, sizeof(float));
    assert_string_equal(a->optimizer, b->optimizer);
    assert_memory_equal(&a->adam_beta1, &b->adam_beta1, sizeof(float));
    assert_memory_equal(&a->adam_beta2, &b->adam_beta2, sizeof(float));
    assert_memory_equal(&a->adam_epsilon, &b->adam_epsilon, sizeof(float));
    assert_memory_equal(&a->sophia_beta1, &b->sophia_beta1, sizeof(float));
    assert_memory_equal(&a->sophia_beta2, &b->sophia_beta2, sizeof(float));
    assert_memory_equal(&a->sophia_rho, &b->sophia_rho, sizeof(float));
    assert_int_equal(a->sophia_k, b->sophia_k);
    assert_int_equal(a->sophia_bs, b->sophia_bs);
    assert_int_equal(a->seed, b->seed);
    assert_string_equal(a->output_dir, b->output_dir);
    assert_int_equal(a->logging_steps, b->logging_steps);
    assert_int_equal(a->eval_steps, b->eval_steps);
    assert_int_equal(a->evals_per_epoch, b->evals_per_epoch);
    assert_int_equal(a->eval_max_tokens, b->eval_max_tokens);
    assert_int_equal(a->train_on_inputs, b->train_on_inputs);
    assert_int_equal(a->bf16, b->bf16);
    assert_int_equal(a->gradient_checkpointing, b->gradient_checkpointing);
    assert_int_equal(a->num_threads, b->num_threads);
}

static void test_defaults(void **state) {
    (void)state;
    train_config c;
    assert_int_equal(train_config_defaults(&c), 0);
    assert_null(c.base_model);
    assert_int_equal(c.load_in_4bit, 1);
    assert_int_equal(c.bnb_4bit_use_double_quant, 1);
    assert_string_equal(c.bnb_4bit_quant_type, "nf4");
    assert_string_equal(c.adapter, "qlora");
    assert_int_equal(c.lora_r, 8);
    assert_true(c.lora_alpha == 16.0f);
    assert_true(c.lora_dropout == 0.05f);
    assert_int_equal(c.use_rslora, 0);
    assert_int_equal(c.n_lora_target_modules, 0);
    assert_int_equal(c.lora_target_linear, 0);
    assert_int_equal(c.n_datasets, 0);
    assert_int_equal(c.n_test_datasets, 0);
    assert_true(c.val_set_size == 0.0);
    assert_int_equal(c.sequence_len, 512);
    assert_int_equal(c.sample_packing, 0);
    assert_int_equal(c.micro_batch_size, 1);
    assert_int_equal(c.gradient_accumulation_steps, 1);
    assert_int_equal(c.num_epochs, 1);
    assert_int_equal(c.max_steps, -1);
    assert_true(c.learning_rate == 2e-4f);
    assert_string_equal(c.lr_scheduler, "cosine");
    assert_int_equal(c.warmup_steps, 0);
    assert_true(c.warmup_ratio == 0.0f);
    assert_true(c.weight_decay == 0.0f);
    assert_true(c.max_grad_norm == 1.0f);
    assert_string_equal(c.optimizer, "adamw");
    assert_true(c.adam_beta1 == 0.9f);
    assert_true(c.adam_beta2 == 0.999f);
    assert_true(c.adam_epsilon == 1e-8f);
    assert_int_equal(c.seed, 42);
    assert_string_equal(c.output_dir, "./outputs/lora-out");
    assert_int_equal(c.logging_steps, 1);
    assert_int_equal(c.eval_steps, 0);
    assert_int_equal(c.evals_per_epoch, 0);
    assert_int_equal(c.eval_max_tokens, 0);
    assert_int_equal(c.train_on_inputs, 0);
    assert_int_equal(c.bf16, 1);
    assert_int_equal(c.gradient_checkpointing, 1);
    assert_int_equal(c.num_threads, 0);
    assert_null(c.config_path);
    assert_int_equal(c.n_warnings, 0);
    /* defaults alone are not a runnable config */
    qerr e = {{0}};
    assert_int_equal(train_config_validate(&c, &e), -1);
    assert_non_null(strstr(e.msg, "config: missing required key \"base_model\""));
    train_config_free(&c);
    train_config_free(&c); /* idempotent on a zeroed struct */
}

static void test_minimal_and_full(void **state) {
    const tmpdir *t = *state;
    char path[256];
    train_config c;
    qerr e = {{0}};

    write_file(t, "minimal.yaml", MINIMAL, path, sizeof path);
    assert_int_equal(train_config_load(path, &c, &e), 0);
    assert_int_equal(train_config_validate(&c, &e), 0);
    assert_string_equal(c.config_path, path);
    assert_string_equal(c.datasets[0].field, "text");
    assert_string_equal(c.datasets[0].field_messages, "messages");
    assert_int_equal(train_config_target_mask(&c), 0x7f);
    assert_int_equal(c.n_warnings, 0);
    train_config_free(&c);

    write_file(t, "full.yaml", FULL, path, sizeof path);
    if (train_config_load(path, &c, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    check_full(&c);
    /* FULL sets test_datasets and warmup_ratio but neither val_set_size nor warmup_steps: valid. */
    if (train_config_validate(&c, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    assert_int_equal(train_config_target_mask(&c), (1u << 0) | (1u << 2) | (1u << 6));
    assert_int_equal(train_config_eval_interval(&c, 1000), 50);
    assert_int_equal(train_config_warmup_steps(&c, 1000), 30);
    assert_int_equal(train_config_warmup_steps(&c, 1001), 31); /* ceil, as HF */
    train_config_free(&c);
}

/* What a user copying an axolotl example gets: empty keys are fine, harmless
 * keys are ignored with a warning, aliases resolve. */
static void test_axolotl_style(void **state) {
    const tmpdir *t = *state;
    const char *yaml = "base_model: m.gguf\n"
                       "model_type: AutoModelForCausalLM\n"
                       "tokenizer_type: AutoTokenizer\n"
                       "load_in_8bit: false\n"
                       "load_in_4bit: true\n"
                       "strict: false\n"
                       "datasets:\n"
                       "  - path: train.jsonl\n"
                       "    type: alpaca\n"
                       "    ds_type: json\n"
                       "dataset_prepared_path:\n"
                       "val_set_size: 0.05\n"
                       "output_dir: ./outputs/qlora-out\n"
                       "adapter: qlora\n"
                       "lora_model_dir:\n"
                       "sequence_len: 4096\n"
                       "sample_packing: true\n"
                       "pad_to_sequence_len: true\n"
                       "lora_r: 32\n"
                       "lora_alpha: 16\n"
                       "lora_dropout: 0.05\n"
                       "lora_target_modules:\n"
                       "lora_target_linear: true\n"
                       "lora_fan_in_fan_out:\n"
                       "wandb_project:\n"
                       "wandb_entity:\n"
                       "gradient_accumulation_steps: 4\n"
                       "micro_batch_size: 2\n"
                       "num_epochs: 4\n"
                       "optimizer: paged_adamw_32bit\n"
                       "lr_scheduler: cosine\n"
                       "learning_rate: 0.0002\n"
                       "train_on_inputs: false\n"
                       "group_by_length: false\n"
                       "bf16: auto\n"
                       "fp16:\n"
                       "tf32: false\n"
                       "gradient_checkpointing: true\n"
                       "early_stopping_patience:\n"
                       "resume_from_checkpoint:\n"
                       "local_rank:\n"
                       "logging_steps: 1\n"
                       "xformers_attention:\n"
                       "flash_attention: false\n"
                       "warmup_steps: 10\n"
                       "evals_per_epoch: 4\n"
                       "eval_table_size:\n"
                       "saves_per_epoch: 0\n"
                       "debug:\n"
                       "deepspeed:\n"
                       "weight_decay: 0.0\n"
                       "fsdp:\n"
                       "fsdp_config:\n"
                       "special_tokens:\n"
                       "  pad_token: \"<|end_of_text|>\"\n";
    char path[256];
    write_file(t, "axolotl.yaml", yaml, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    if (train_config_load(path, &c, &e) || train_config_validate(&c, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    assert_string_equal(c.optimizer, "adamw");
    assert_int_equal(c.bf16, 1);
    assert_int_equal(c.n_lora_target_modules, 0);
    assert_int_equal(train_config_target_mask(&c), 0x7f);
    assert_true(fabs(c.val_set_size - 0.05) < 1e-15);
    assert_int_equal(train_config_eval_interval(&c, 100), 25);
    assert_int_equal(train_config_eval_interval(&c, 3), 1);
    /* warnings: model_type, tokenizer_type, pad_to_sequence_len, paged optimizer, special_tokens */
    int saw_model_type = 0, saw_paged = 0, saw_pad = 0, saw_special = 0;
    for (int i = 0; i < c.n_warnings; i++) {
        if (strstr(c.warnings[i], "ignoring \"model_type\"")) saw_model_type = 1;
        if (strstr(c.warnings[i], "paged_adamw_32bit")) saw_paged = 1;
        if (strstr(c.warnings[i], "ignoring \"pad_to_sequence_len\"")) saw_pad = 1;
        if (strstr(c.warnings[i], "special_tokens.pad_token")) saw_special = 1;
        assert_non_null(strstr(c.warnings[i], "axolotl.yaml: "));
    }
    assert_true(saw_model_type && saw_paged && saw_pad && saw_special);
    assert_int_equal(c.n_warnings, 5);
    train_config_free(&c);
}

static void test_errors_per_key(void **state) {
    const tmpdir *t = *state;
    /* the exact message shape from the brief, plus the line */
    expect_load_error(t, "x.yaml", "base_model: m.gguf\nlora_r: abc\n",
                      "x.yaml: lora_r: expected a positive integer, got \"abc\" (line 2)");
    expect_load_error(t, "x.yaml", "lora_r: -2\n", "x.yaml: lora_r: expected a positive integer, got \"-2\"");
    expect_load_error(t, "x.yaml", "lora_r: 2.5\n", "lora_r: expected a positive integer, got \"2.5\"");
    expect_load_error(t, "x.yaml", "lora_r: 99999999999\n", "lora_r: expected a positive integer");
    /* unknown key with suggestion */
    expect_load_error(t, "x.yaml", "base_model: m.gguf\n\nlora_rank: 8\n",
                      "x.yaml: unknown key \"lora_rank\"; did you mean \"lora_r\"? (line 3)");
    expect_load_error(t, "x.yaml", "learning_rat: 1e-4\n", "unknown key \"learning_rat\"; did you mean \"learning_rate\"?");
    expect_load_error(t, "x.yaml", "micro_batchsize: 2\n", "did you mean \"micro_batch_size\"?");
    expect_ignored_key(t, "x.yaml", "zzzzzz_qqqq: 1\n", "zzzzzz_qqqq");
    /* list vs scalar */
    expect_load_error(t, "x.yaml", "lora_r: [1, 2]\n", "lora_r: expected a positive integer, got a list");
    expect_load_error(t, "x.yaml", "lora_target_modules: q_proj\n",
                      "lora_target_modules: expected a list of module names (q_proj, k_proj, v_proj, o_proj, "
                      "gate_proj, up_proj, down_proj, qkv_proj, gate_up_proj), got \"q_proj\"");
    expect_load_error(t, "x.yaml", "base_model: [a, b]\n", "base_model: expected a string, got a list");
    expect_load_error(t, "x.yaml", "datasets: train.jsonl\n", "datasets: expected a list of {path, type} entries");
    expect_load_error(t, "x.yaml", "datasets: [train.jsonl]\n",
                      "datasets[0]: expected a mapping with path and type, got \"train.jsonl\"");
    expect_load_error(t, "x.yaml", "sample_packing: maybe\n", "sample_packing: expected true or false, got \"maybe\"");
    expect_load_error(t, "x.yaml", "bf16: full\n", "bf16: expected true, false or auto, got \"full\"");
    /* out of range */
    expect_load_error(t, "x.yaml", "lora_dropout: 1.5\n", "lora_dropout: expected a number in [0, 1), got \"1.5\"");
    expect_load_error(t, "x.yaml", "learning_rate: 0\n", "learning_rate: expected a positive number, got \"0\"");
    expect_load_error(t, "x.yaml", "learning_rate: nan\n", "learning_rate: expected a positive number");
    expect_load_error(t, "x.yaml", "val_set_size: 2.5\n", "val_set_size: expected a fraction in [0, 1) or a whole");
    expect_load_error(t, "x.yaml", "max_steps: 0\n", "max_steps: expected a positive integer, or -1");
    expect_load_error(t, "x.yaml", "sequence_len: 1\n", "sequence_len: expected an integer >= 2");
    /* enums */
    expect_load_error(t, "x.yaml", "lr_scheduler: cosin\n",
                      "lr_scheduler: expected one of cosine, linear, constant, got \"cosin\"; did you mean \"cosine\"?");
    expect_load_error(t, "x.yaml", "optimizer: adafactor\n",
                      "x.yaml: optimizer: \"adafactor\" is not supported yet (accepted: adamw, sophia, adamw_8bit)");
    expect_load_error(t, "x.yaml", "sophia_rho: 0\n", "sophia_rho: expected a positive number, got \"0\"");
    expect_load_error(t, "x.yaml", "sophia_k: 0\n", "sophia_k: expected a positive integer");
    expect_load_error(t, "x.yaml", "sophia_beta2: 1\n", "sophia_beta2: expected a number in [0, 1)");
    expect_load_error(t, "x.yaml", "optimizer: adamw_torch_8bit\n",
                      "optimizer: \"adamw_torch_8bit\" is torchao's 8-bit AdamW, not implemented here; optimizer: "
                      "adamw_8bit is bitsandbytes' (blockwise 8-bit states)");
    /* HF Trainer's names of bitsandbytes' 8-bit AdamW resolve to adamw_8bit (the paged one with a note) */
    static const char *const names8[] = {"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"};
    for (int i = 0; i < 3; i++) {
        char y[128], path[256];
        snprintf(y, sizeof y, "base_model: m.gguf\ndatasets:\n  - path: d.jsonl\n    type: completion\noptimizer: %s\n",
                 names8[i]);
        write_file(t, "o8.yaml", y, path, sizeof path);
        train_config c;
        qerr e = {{0}};
        if (train_config_load(path, &c, &e)) {
            print_error("%s\n", e.msg);
            fail();
        }
        assert_string_equal(c.optimizer, "adamw_8bit");
        assert_int_equal(c.n_warnings, i == 2 ? 1 : 0);
        train_config_free(&c);
    }
    expect_load_error(t, "x.yaml", "bnb_4bit_quant_type: fp4\n", "bnb_4bit_quant_type: \"fp4\" is not supported yet");
    expect_load_error(t, "x.yaml", "adapter: ia3\n", "adapter: expected one of qlora, lora, got \"ia3\"");
    expect_load_error(t, "x.yaml", "lora_target_modules: [q_proj, lm_head]\n",
                      "lora_target_modules[1]: expected one of q_proj, k_proj");
    expect_load_error(t, "x.yaml", "lora_target_modules: [q_proj, q_proj]\n",
                      "lora_target_modules: \"q_proj\" is listed twice");
    /* refused with the reason (trainer/config_axolotl.c); a file without adapter: has that line first */
    /* deepspeed is read now (its ZeRO stages: tests/test_config_parallel.c); a missing file is named */
    expect_load_error(t, "x.yaml", "deepspeed: deepspeed_configs/zero2.json\n",
                      "deepspeed: deepspeed_configs/zero2.json: cannot open");
    expect_load_error(t, "x.yaml", "float16: true\n", "float16: refused: a float16 base");
    expect_load_error(t, "x.yaml", "chat_template: gemma\n",
                      "chat_template: \"gemma\" is the template of Gemma 1 and Gemma 2, model families qlora "
                      "does not run");
    expect_load_error(t, "x.yaml", "chat_template: llama3_2_vision\n", "the day's date");
    expect_load_error(t, "x.yaml", "special_tokens:\n  additional_special_tokens: [\"<x>\"]\n",
                      "special_tokens.additional_special_tokens: refused");
    expect_load_error(t, "x.yaml", "plugins: [my.Plugin]\n", "plugins: refused: \"my.Plugin\"");
    /* dataset entries */
    expect_load_error(t, "x.yaml", "datasets:\n  - path: a.jsonl\n    type: completion\n    feild: body\n",
                      "x.yaml: datasets[0]: unknown key \"feild\"; did you mean \"field\"? (line 4)");
    expect_load_error(t, "x.yaml", "datasets:\n  - path: a.jsonl\n", "datasets[0]: missing required key \"type\"");
    expect_load_error(t, "x.yaml", "datasets:\n  - type: completion\n", "datasets[0]: missing required key \"path\"");
    expect_load_error(t, "x.yaml", "test_datasets:\n  - path: a.jsonl\n    type: sharegpt\n",
                      "test_datasets[0].type: expected one of completion, alpaca, chat_template, input_output, got \"sharegpt\"");
    expect_load_error(t, "x.yaml", "datasets:\n  - path: a.jsonl\n    type: completion\n    split: test[:5]\n",
                      "datasets[0].split: expected train or a slice of it");
    expect_load_error(t, "x.yaml", "datasets:\n  - path: a.jsonl\n    type: completion\n    ds_type: parquet\n",
                      "datasets[0].ds_type: refused: json only");
    /* structure */
    expect_load_error(t, "x.yaml", "lora_r: 8\nlora_r: 16\n", "key \"lora_r\" given twice (line 2)");
    expect_load_error(t, "x.yaml", "use_rslora: true\npeft_use_rslora: true\n",
                      "key \"peft_use_rslora\" given twice (also as \"use_rslora\", another name for the same setting)");
    expect_load_error(t, "x.yaml", "", "x.yaml: the file is empty");
    expect_load_error(t, "x.yaml", "- a\n- b\n", "expected a mapping of key: value pairs at the top level");
    expect_load_error(t, "x.yaml", "lora_r: 8\n---\nlora_r: 9\n", "more than one YAML document");

    train_config c;
    qerr e = {{0}};
    assert_int_equal(train_config_load("/nonexistent/dir/none.yaml", &c, &e), -1);
    assert_non_null(strstr(e.msg, "cannot open config /nonexistent/dir/none.yaml: No such file"));
}

static void test_syntax_error_line(void **state) {
    const tmpdir *t = *state;
    /* unclosed flow sequence starting on line 3 */
    expect_load_error(t, "syn.yaml", "base_model: m.gguf\nlora_r: 8\nlora_target_modules: [q_proj, v_proj\nseed: 1\n",
                      "syn.yaml:4:");
    expect_load_error(t, "syn.yaml", "base_model: m.gguf\nlora_r: 8\nlora_target_modules: [q_proj, v_proj\nseed: 1\n",
                      "YAML syntax error: ");
    /* bad indentation on line 2 */
    expect_load_error(t, "syn2.yaml", "base_model: m.gguf\n  lora_r: 8\n", "syn2.yaml:2:");
    expect_load_error(t, "syn3.yaml", "a: \"unterminated\n", "syn3.yaml:");
}

static void test_validate_rules(void **state) {
    const tmpdir *t = *state;
    expect_validate_error(t, "v.yaml", "datasets: [{path: a.jsonl, type: completion}]\nlora_target_linear: true\n",
                          "v.yaml: missing required key \"base_model\"");
    expect_validate_error(t, "v.yaml", "base_model: m.gguf\nlora_target_linear: true\n",
                          "v.yaml: missing required key \"datasets\"");
    expect_validate_error(t, "v.yaml", "base_model: m.gguf\ndatasets: []\nlora_target_linear: true\n",
                          "missing required key \"datasets\"");
    char buf[1024];
    snprintf(buf, sizeof buf, "%sload_in_4bit: false\n", MINIMAL);
    expect_validate_error(t, "v.yaml", buf, "v.yaml: adapter: \"qlora\" requires load_in_4bit: true");
    /* load_in_8bit (issue 16 item 4): both formats at once, or with adapter: qlora, are refused in one line */
    snprintf(buf, sizeof buf, "%sload_in_4bit: true\nload_in_8bit: true\n", MINIMAL);
    expect_validate_error(t, "v.yaml", buf,
                          "v.yaml: load_in_4bit and load_in_8bit are both true; choose one frozen-base format (NF4 "
                          "or int8) (load_in_4bit: line ");
    snprintf(buf, sizeof buf, "%sload_in_8bit: true\n", MINIMAL);
    expect_validate_error(t, "v.yaml", buf,
                          "v.yaml: adapter: \"qlora\" is LoRA over an NF4 base; with load_in_8bit: true use adapter: "
                          "lora");
    {
        /* with adapter: lora it loads: load_in_4bit (not given) follows as false, and one [config] line says
         * what load_in_8bit means here */
        char path[256];
        snprintf(buf, sizeof buf, "base_model: m.gguf\nadapter: lora\nload_in_8bit: true\nlora_target_linear: true\n"
                                  "datasets: [{path: a.jsonl, type: completion}]\n");
        write_file(t, "i8.yaml", buf, path, sizeof path);
        train_config c;
        qerr e = {{0}};
        assert_int_equal(train_config_load(path, &c, &e), 0);
        assert_int_equal(train_config_validate(&c, &e), 0);
        assert_int_equal(c.load_in_8bit, 1);
        assert_int_equal(c.load_in_4bit, 0);
        int said = 0;
        for (int i = 0; i < c.n_warnings; i++)
            said += strstr(c.warnings[i], "load_in_8bit: true") && strstr(c.warnings[i], "not applied") &&
                    strstr(c.warnings[i], "llm_int8_threshold");
        assert_int_equal(said, 1);
        /* qlora-export / qlora-generate's flags over this run's config: its int8, or what a flag says */
        int base = -1;
        static const int flags[][3] = {/* --load-in-4bit, --load-in-8bit, base */
                                       {-1, -1, LLAMA_BASE_INT8}, {-1, 1, LLAMA_BASE_INT8}, {0, 1, LLAMA_BASE_INT8},
                                       {-1, 0, LLAMA_BASE_NF4},   {1, -1, LLAMA_BASE_NF4},  {1, 0, LLAMA_BASE_NF4},
                                       {0, -1, LLAMA_BASE_BF16},  {0, 0, LLAMA_BASE_BF16}};
        for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
            assert_int_equal(train_config_base_choice(flags[i][0], flags[i][1], &c, &base, &e), 0);
            assert_int_equal(base, flags[i][2]);
        }
        assert_int_equal(train_config_base_choice(1, 1, &c, &base, &e), -1);
        assert_string_equal(e.msg, "--load-in-4bit 1 and --load-in-8bit 1: choose one frozen-base format (NF4 or int8)");
        /* without a config: NF4 unless a flag says otherwise */
        assert_int_equal(train_config_base_choice(-1, -1, NULL, &base, &e), 0);
        assert_int_equal(base, LLAMA_BASE_NF4);
        assert_int_equal(train_config_base_choice(-1, 1, NULL, &base, &e), 0);
        assert_int_equal(base, LLAMA_BASE_INT8);
        /* a command-line load_in_8bit=false gives the default NF4 back */
        assert_int_equal(train_config_apply_override(&c, "load_in_8bit=false", &e), 0);
        assert_int_equal(c.load_in_4bit, 1);
        /* and the flags over a config without load_in_8bit */
        assert_int_equal(train_config_base_choice(-1, -1, &c, &base, &e), 0);
        assert_int_equal(base, LLAMA_BASE_NF4);
        assert_int_equal(train_config_base_choice(-1, 1, &c, &base, &e), 0);
        assert_int_equal(base, LLAMA_BASE_INT8);
        train_config_free(&c);
    }
    snprintf(buf, sizeof buf, "%swarmup_steps: 10\nwarmup_ratio: 0.1\n", MINIMAL);
    expect_validate_error(t, "v.yaml", buf, "warmup_steps and warmup_ratio are both set");
    snprintf(buf, sizeof buf, "%sval_set_size: 0.1\ntest_datasets: [{path: t.jsonl, type: completion}]\n", MINIMAL);
    expect_validate_error(t, "v.yaml", buf, "val_set_size and test_datasets are both set");
    snprintf(buf, sizeof buf, "%seval_steps: 10\nevals_per_epoch: 2\n", MINIMAL);
    expect_validate_error(t, "v.yaml", buf, "eval_steps and evals_per_epoch are both set");
    expect_validate_error(t, "v.yaml", "base_model: m.gguf\nadapter: lora\ndatasets: [{path: a.jsonl, type: completion}]\n",
                          "lora_target_modules: no LoRA target; list some of q_proj");
    /* axolotl without adapter: is a full fine-tune: refused for that, also when the rest is fine */
    expect_validate_error(t, "v.yaml", "base_model: m.gguf\nlora_target_linear: true\ndatasets: [{path: a.jsonl, type: completion}]\n",
                          "v.yaml: no \"adapter:\": axolotl then trains every weight of the model (a full fine-tune)");

    /* lora + bf16 base is valid; values set from code are range-checked too */
    char path[256];
    snprintf(buf, sizeof buf, "base_model: m.gguf\nadapter: lora\ndatasets: [{path: t.jsonl, type: completion}]\n"
                              "lora_target_linear: true\nload_in_4bit: false\nval_set_size: 100\n");
    write_file(t, "ok.yaml", buf, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    assert_int_equal(train_config_load(path, &c, &e), 0);
    assert_int_equal(train_config_validate(&c, &e), 0);
    assert_true(c.val_set_size == 100.0);
    c.lora_r = 0;
    assert_int_equal(train_config_validate(&c, &e), -1);
    assert_non_null(strstr(e.msg, "ok.yaml: lora_r: expected a positive integer, got 0"));
    c.lora_r = 8;
    c.adam_beta2 = 1.0f;
    assert_int_equal(train_config_validate(&c, &e), -1);
    assert_non_null(strstr(e.msg, "adam_beta2: expected a number in [0, 1), got 1"));
    train_config_free(&c);
}

/* The checkpoint / fault keys (issue 4): defaults, parsing, ranges, the
 * save interval, and that resume_from_checkpoint is optional. */
static void test_checkpoint_keys(void **state) {
    const tmpdir *t = *state;
    char path[256], buf[1024];
    write_file(t, "ck.yaml", MINIMAL, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    assert_int_equal(train_config_load(path, &c, &e), 0);
    assert_int_equal(train_config_validate(&c, &e), 0);
    assert_int_equal(c.save_steps, 0);
    assert_int_equal(c.saves_per_epoch, 0);
    assert_int_equal(c.save_total_limit, 0);
    assert_null(c.resume_from_checkpoint);
    assert_int_equal(c.auto_resume_from_checkpoints, 1);
    assert_int_equal(c.max_nan_steps, 5);
    assert_int_equal(c.skip_bad_lines, 0);
    assert_int_equal(train_config_save_interval(&c, 100), 500); /* HF's default */
    train_config_free(&c);

    snprintf(buf, sizeof buf,
             "%ssave_steps: 25\nsave_total_limit: 3\nresume_from_checkpoint: out/checkpoint-50\n"
             "auto_resume_from_checkpoints: false\nmax_nan_steps: 2\nskip_bad_lines: yes\n",
             MINIMAL);
    write_file(t, "ck2.yaml", buf, path, sizeof path);
    assert_int_equal(train_config_load(path, &c, &e), 0);
    assert_int_equal(train_config_validate(&c, &e), 0);
    assert_int_equal(train_config_save_interval(&c, 100), 25);
    assert_int_equal(c.save_total_limit, 3);
    assert_string_equal(c.resume_from_checkpoint, "out/checkpoint-50");
    assert_int_equal(c.auto_resume_from_checkpoints, 0);
    assert_int_equal(c.max_nan_steps, 2);
    assert_int_equal(c.skip_bad_lines, 1);
    /* written and read back */
    char out[256];
    snprintf(out, sizeof out, "%s/ck2.resolved.yaml", t->dir);
    assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
    train_config c2;
    assert_int_equal(train_config_load(out, &c2, &e), 0);
    assert_string_equal(c2.resume_from_checkpoint, "out/checkpoint-50");
    assert_int_equal(c2.save_steps, 25);
    assert_int_equal(c2.skip_bad_lines, 1);
    /* null resets an override to the default */
    assert_int_equal(train_config_apply_override(&c2, "resume_from_checkpoint=", &e), 0);
    assert_null(c2.resume_from_checkpoint);
    assert_int_equal(train_config_apply_override(&c2, "saves_per_epoch=4", &e), 0);
    assert_int_equal(train_config_validate(&c2, &e), -1);
    assert_non_null(strstr(e.msg, "save_steps and saves_per_epoch are both set"));
    assert_int_equal(train_config_apply_override(&c2, "save_steps=0", &e), 0);
    assert_int_equal(train_config_validate(&c2, &e), 0);
    assert_int_equal(train_config_save_interval(&c2, 100), 25);
    assert_int_equal(train_config_save_interval(&c2, 3), 1);
    train_config_free(&c2);
    train_config_free(&c);

    snprintf(buf, sizeof buf, "%smax_nan_steps: 0\n", MINIMAL);
    expect_load_error(t, "ck3.yaml", buf, "max_nan_steps: expected a positive integer, got \"0\"");
    snprintf(buf, sizeof buf, "%ssave_steps: -1\n", MINIMAL);
    expect_load_error(t, "ck3.yaml", buf, "save_steps: expected an integer >= 0");
    snprintf(buf, sizeof buf, "%sresume_from_checkpoint: [a, b]\n", MINIMAL);
    expect_load_error(t, "ck3.yaml", buf, "resume_from_checkpoint: expected a string, got a list");
    snprintf(buf, sizeof buf, "%ssave_strategy: epoch\n", MINIMAL);
    expect_load_error(t, "ck3.yaml", buf, "save_strategy: refused: use save_steps or saves_per_epoch");
}

static void test_overrides(void **state) {
    const tmpdir *t = *state;
    char path[256];
    write_file(t, "o.yaml", MINIMAL, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    assert_int_equal(train_config_load(path, &c, &e), 0);

    /* scalars */
    assert_int_equal(train_config_apply_override(&c, "lora_r=16", &e), 0);
    assert_int_equal(c.lora_r, 16);
    assert_int_equal(train_config_apply_override(&c, " learning_rate = 3e-5 ", &e), 0);
    assert_true(c.learning_rate == 3e-5f);
    assert_int_equal(train_config_apply_override(&c, "output_dir=runs/x y", &e), 0);
    assert_string_equal(c.output_dir, "runs/x y");
    assert_int_equal(train_config_apply_override(&c, "bf16=auto", &e), 0);
    assert_int_equal(c.bf16, 1);
    /* list */
    assert_int_equal(train_config_apply_override(&c, "lora_target_modules=[q_proj,v_proj]", &e), 0);
    assert_int_equal(c.n_lora_target_modules, 2);
    assert_string_equal(c.lora_target_modules[0], "q_proj");
    assert_string_equal(c.lora_target_modules[1], "v_proj");
    /* nested datasets list replaces the file's list */
    assert_int_equal(train_config_apply_override(&c, "datasets=[{path: x.jsonl, type: completion}, "
                                                     "{path: y.jsonl, type: chat_template, field_messages: conv}]",
                                                 &e),
                     0);
    assert_int_equal(c.n_datasets, 2);
    assert_string_equal(c.datasets[0].path, "x.jsonl");
    assert_string_equal(c.datasets[1].type, "chat_template");
    assert_string_equal(c.datasets[1].field_messages, "conv");
    /* an empty value is refused (issue 17 item 9: it used to mean "the default"), naming the key */
    assert_int_equal(train_config_apply_override(&c, "lora_r=", &e), -1);
    assert_non_null(strstr(e.msg, "command line: lora_r: no value; expected a positive integer"));
    assert_int_equal(c.lora_r, 16);
    assert_int_equal(train_config_apply_override(&c, "lora_r=8", &e), 0);
    assert_int_equal(train_config_apply_override(&c, "use_rslora=true", &e), 0);
    assert_int_equal(c.use_rslora, 1);

    /* errors leave the config unchanged */
    assert_int_equal(train_config_apply_override(&c, "lora_rank=4", &e), -1);
    assert_string_equal(e.msg, "command line: unknown key \"lora_rank\"; did you mean \"lora_r\"?");
    assert_int_equal(train_config_apply_override(&c, "lora_r=abc", &e), -1);
    assert_string_equal(e.msg, "command line: lora_r: expected a positive integer, got \"abc\"");
    assert_int_equal(c.lora_r, 8);
    assert_int_equal(train_config_apply_override(&c, "lora_target_modules=[q_proj,", &e), -1);
    assert_non_null(strstr(e.msg, "command line: lora_target_modules: cannot parse \"[q_proj,\" as a YAML value"));
    assert_int_equal(c.n_lora_target_modules, 2);
    assert_int_equal(train_config_apply_override(&c, "datasets=[{path: z.jsonl, type: completion, feild: t}]", &e),
                     -1);
    assert_non_null(strstr(e.msg, "datasets[0]: unknown key \"feild\"; did you mean \"field\"?"));
    assert_int_equal(c.n_datasets, 2);
    assert_string_equal(c.datasets[0].path, "x.jsonl");
    assert_int_equal(train_config_apply_override(&c, "lora_r", &e), -1);
    assert_string_equal(e.msg, "command line: expected key=value, got \"lora_r\"");
    assert_int_equal(train_config_apply_override(&c, "=8", &e), -1);
    assert_int_equal(train_config_apply_override(&c, "flash_attention=true", &e), 0); /* exact attention: accepted */
    assert_int_equal(train_config_apply_override(&c, "fp16=true", &e), 0); /* axolotl's fp16 (README "fp16") */
    assert_int_equal(c.fp16, 1);
    assert_int_equal(train_config_apply_override(&c, "fp16=false", &e), 0);
    assert_int_equal(c.fp16, 0);
    assert_int_equal(train_config_apply_override(&c, "float16=true", &e), -1);
    assert_non_null(strstr(e.msg, "command line: float16: refused: a float16 base"));
    assert_int_equal(train_config_apply_override(&c, "optimizer=sgd", &e), -1);
    assert_non_null(strstr(e.msg, "optimizer: \"sgd\" is not supported yet"));
    /* Sophia: the official defaults, then overrides; "sophiag" is an alias */
    assert_string_equal(c.optimizer, "adamw");
    assert_true(c.sophia_beta1 == 0.965f && c.sophia_beta2 == 0.99f && c.sophia_rho == 0.04f);
    assert_int_equal(c.sophia_k, 10);
    assert_int_equal(c.sophia_bs, 0);
    assert_int_equal(train_config_apply_override(&c, "optimizer=sophiag", &e), 0);
    assert_string_equal(c.optimizer, "sophia");
    assert_int_equal(train_config_apply_override(&c, "sophia_rho=0.05", &e), 0);
    assert_int_equal(train_config_apply_override(&c, "sophia_k=5", &e), 0);
    assert_true(c.sophia_rho == 0.05f);
    assert_int_equal(c.sophia_k, 5);
    assert_int_equal(train_config_apply_override(&c, "flash_attention=false", &e), 0);

    assert_int_equal(train_config_validate(&c, &e), 0);
    train_config_free(&c);
}

/* Issue 17 item 9: an empty value is refused naming the key, in a file (with
 * its line) and on the command line; only the three keys whose null is a
 * documented "none" keep it. */
static void test_empty_values(void **state) {
    const tmpdir *t = *state;
    char buf[1024];
    snprintf(buf, sizeof buf, "%slearning_rate:\nseed: 1\n", MINIMAL);
    expect_load_error(t, "nv.yaml", buf,
                      "nv.yaml: learning_rate: no value; expected a positive number (delete the line for the "
                      "default, 0.0002) (line 7)");
    snprintf(buf, sizeof buf, "%smax_steps: ~\n", MINIMAL);
    expect_load_error(t, "nv.yaml", buf, "nv.yaml: max_steps: no value; expected a positive integer, or -1");
    snprintf(buf, sizeof buf, "%ssample_packing: null\n", MINIMAL);
    expect_load_error(t, "nv.yaml", buf, "sample_packing: no value; expected true or false (delete the line for "
                                         "the default, false)");
    snprintf(buf, sizeof buf, "%soptimizer:\n", MINIMAL);
    expect_load_error(t, "nv.yaml", buf, "optimizer: no value; expected one of adamw, sophia");
    snprintf(buf, sizeof buf, "%soutput_dir:\n", MINIMAL);
    expect_load_error(t, "nv.yaml", buf, "output_dir: no value; expected a directory path (delete the line for the "
                                         "default, \"./outputs/lora-out\")");
    expect_load_error(t, "nv.yaml", "base_model:\n", "nv.yaml: base_model: no value; expected a path to a .gguf "
                                                     "file or a Hugging Face model directory (the key is required) "
                                                     "(line 1)");
    expect_load_error(t, "nv.yaml", "datasets:\n", "datasets: no value; expected a list of {path, type} entries");
    expect_load_error(t, "nv.yaml", "datasets:\n  - path: a.jsonl\n    type: completion\n    field:\n",
                      "nv.yaml: datasets[0].field: no value; expected a JSON key (delete the line for the default, "
                      "\"text\") (line 4)");
    expect_load_error(t, "nv.yaml", "datasets:\n  - path:\n    type: completion\n",
                      "datasets[0].path: no value; expected a path to a JSONL file (line 2)");

    /* null keeps its documented meaning for these three */
    snprintf(buf, sizeof buf, "%sresume_from_checkpoint:\ntest_datasets:\nlora_target_modules: ~\n", MINIMAL);
    char path[256];
    write_file(t, "nv_ok.yaml", buf, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    assert_int_equal(train_config_load(path, &c, &e), 0);
    assert_null(c.resume_from_checkpoint);
    assert_int_equal(c.n_test_datasets, 0);
    assert_int_equal(c.n_lora_target_modules, 0);
    assert_int_equal(train_config_validate(&c, &e), 0);

    /* the command line: refused, the config unchanged */
    assert_int_equal(train_config_apply_override(&c, "learning_rate=", &e), -1);
    assert_string_equal(e.msg, "command line: learning_rate: no value; expected a positive number (leave the "
                               "override out to keep the config file's value)");
    assert_true(c.learning_rate == 2e-4f);
    assert_int_equal(train_config_apply_override(&c, "max_steps= ", &e), -1);
    assert_non_null(strstr(e.msg, "command line: max_steps: no value"));
    assert_int_equal(c.max_steps, -1);
    assert_int_equal(train_config_apply_override(&c, "base_model=", &e), -1);
    assert_string_equal(c.base_model, "m.gguf");
    assert_int_equal(train_config_apply_override(&c, "datasets=null", &e), -1);
    assert_int_equal(c.n_datasets, 1);
    assert_int_equal(train_config_apply_override(&c, "lora_target_modules=", &e), 0);
    assert_int_equal(train_config_apply_override(&c, "flash_attention=", &e), 0); /* not-yet keys: empty = off */
    assert_int_equal(c.n_overrides, 2);
    train_config_free(&c);
}

/* Issue 17 items 13 and 14: what is not a YAML file, too large, too deep or
 * too many anchors is refused before libyaml builds a document of it. */
static void test_input_limits(void **state) {
    const tmpdir *t = *state;
    train_config c;
    qerr e = {{0}};
    assert_int_equal(train_config_load(t->dir, &c, &e), -1);
    char want[512];
    snprintf(want, sizeof want, "%s: is a directory, expected a YAML file", t->dir);
    assert_string_equal(e.msg, want);
    assert_int_equal(train_config_load("/dev/null", &c, &e), -1);
    assert_string_equal(e.msg, "/dev/null: is a character device, expected a YAML file");

    /* 1 MiB + 1 bytes of comment */
    size_t big = TRAIN_CONFIG_MAX_BYTES + 1;
    char *text = malloc(big + 1);
    assert_non_null(text);
    memset(text, ' ', big);
    text[0] = '#';
    text[big - 1] = '\n';
    text[big] = 0;
    expect_load_error(t, "big.yaml", text, "big.yaml: 1048577 bytes, more than the 1048576-byte (1 MiB) limit");
    /* exactly 1 MiB loads */
    text[big - 2] = '\n';
    text[big - 1] = 0;
    char path[256];
    memcpy(text + big - 40, "\nlora_r: 4\n", 11);
    write_file(t, "mib.yaml", text, path, sizeof path);
    assert_int_equal(train_config_load(path, &c, &e), 0);
    assert_int_equal(c.lora_r, 4);
    train_config_free(&c);

    /* 400 KB of "[": refused at depth 65 at once (libyaml alone took minutes) */
    size_t deep = 400000;
    memcpy(text, "lora_target_modules: ", 21);
    memset(text + 21, '[', deep);
    text[21 + deep] = 0;
    expect_load_error(t, "deep.yaml", text,
                      "deep.yaml: nested deeper than 64 levels, the limit of a config (line 1)");
    /* block nesting counts the same */
    size_t n = 0;
    for (int d = 0; d < 70; d++) n += (size_t)snprintf(text + n, 256, "%*sk%d:\n", 2 * d, "", d);
    snprintf(text + n, 256, "%*sv\n", 140, "");
    expect_load_error(t, "deep2.yaml", text, "nested deeper than 64 levels");
    /* 64 levels are fine as YAML (the schema then refuses the shape) */
    memcpy(text, "lora_target_modules: ", 21);
    memset(text + 21, '[', 63);
    memset(text + 21 + 63, ']', 63);
    text[21 + 126] = 0;
    expect_load_error(t, "deep3.yaml", text, "lora_target_modules[0]: expected one of");
    /* anchors and aliases */
    n = (size_t)snprintf(text, 64, "x: [");
    for (int i = 0; i < 300; i++) n += (size_t)snprintf(text + n, 64, "&a%d 1, ", i);
    snprintf(text + n, 64, "]\n");
    expect_load_error(t, "anch.yaml", text, "more than 256 anchors and aliases");

    /* an override gets the same limits */
    write_file(t, "ok.yaml", MINIMAL, path, sizeof path);
    assert_int_equal(train_config_load(path, &c, &e), 0);
    memcpy(text, "lora_target_modules=", 20);
    memset(text + 20, '[', 100000);
    text[20 + 100000] = 0;
    assert_int_equal(train_config_apply_override(&c, text, &e), -1);
    assert_string_equal(e.msg, "command line: lora_target_modules: nested deeper than 64 levels, the limit of a config");
    assert_int_equal(c.n_overrides, 0);
    train_config_free(&c);
    free(text);
}

/* Issue 17 item 14: suggestions only for keys that are really close, and
 * validation names the command line when an override set the value. */
static void test_suggestions_and_sources(void **state) {
    const tmpdir *t = *state;
    expect_ignored_key(t, "s.yaml", "xy: 1\n", "xy");
    expect_ignored_key(t, "s.yaml", "lr: 1\n", "lr");
    expect_ignored_key(t, "s.yaml", "qq: 1\n", "qq");
    expect_ignored_key(t, "s.yaml", "foo: 1\n", "foo");
    expect_load_error(t, "s.yaml", "seeed: 1\n", "did you mean \"seed\"?");
    expect_load_error(t, "s.yaml", "epochs: 1\n", "did you mean \"num_epochs\"?");
    expect_load_error(t, "s.yaml", "lora_rnak: 1\n", "did you mean \"lora_r\"?");

    char path[256], buf[1024];
    snprintf(buf, sizeof buf, "%swarmup_ratio: 0.1\n", MINIMAL);
    write_file(t, "src.yaml", buf, path, sizeof path);
    train_config c;
    qerr e = {{0}};
    assert_int_equal(train_config_load(path, &c, &e), 0);
    assert_int_equal(train_config_apply_override(&c, "seed=3", &e), 0);
    assert_int_equal(train_config_apply_override(&c, "warmup_steps=5", &e), 0);
    assert_int_equal(train_config_validate(&c, &e), -1);
    assert_string_equal(e.msg, "command line (warmup_steps=5): warmup_steps and warmup_ratio are both set; use one "
                               "of them (warmup_ratio: line 7)");
    char src[128];
    int line = -1;
    assert_string_equal(train_config_source(&c, "warmup_steps", &line, src, sizeof src),
                        "command line (warmup_steps=5)");
    assert_int_equal(line, 0);
    assert_string_equal(train_config_source(&c, "warmup_ratio", &line, src, sizeof src), path);
    assert_int_equal(line, 7);
    assert_string_equal(train_config_source(&c, "lora_r", &line, src, sizeof src), path);
    assert_int_equal(line, 0);
    assert_int_equal(train_config_apply_override(&c, "warmup_steps=0", &e), 0);
    assert_int_equal(train_config_validate(&c, &e), 0);
    assert_int_equal(train_config_apply_override(&c, "lora_target_linear=false", &e), 0);
    assert_int_equal(train_config_validate(&c, &e), -1);
    assert_non_null(strstr(e.msg, "command line (lora_target_linear=false): lora_target_modules: no LoRA target"));
    assert_int_equal(train_config_apply_override(&c, "lora_target_linear=true", &e), 0);
    c.lora_r = 0; /* set from code: blamed on where lora_r came from (the default: the file) */
    assert_int_equal(train_config_validate(&c, &e), -1);
    snprintf(buf, sizeof buf, "%s: lora_r: expected a positive integer, got 0", path);
    assert_string_equal(e.msg, buf);
    train_config_free(&c);
}

static void test_round_trip(void **state) {
    const tmpdir *t = *state;
    char path[256], out[256], out2[300];
    train_config a, b;
    qerr e = {{0}};
    write_file(t, "rt.yaml", FULL, path, sizeof path);
    assert_int_equal(train_config_load(path, &a, &e), 0);
    /* awkward values: exact float round trip, odd strings */
    a.learning_rate = 1.0f / 3.0f * 1e-4f;
    a.sophia_rho = 1.0f / 3.0f;
    a.sophia_k = 7;
    a.sophia_bs = 5120;
    a.val_set_size = 0.1234567890123;
    a.adam_epsilon = 1e-8f;
    free(a.output_dir);
    a.output_dir = strdup("out dir/with: colon #hash 'q' \"dq\" \\ tab\there\nnewline");
    snprintf(out, sizeof out, "%s/resolved.yaml", t->dir);
    if (train_config_write_yaml(&a, out, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    snprintf(out2, sizeof out2, "%s.tmp", out);
    assert_int_equal(access(out2, F_OK), -1); /* temp file renamed away */
    if (train_config_load(out, &b, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    assert_configs_equal(&a, &b);
    assert_int_equal(b.n_warnings, 0);
    train_config_free(&b);

    /* axolotl's keys round-trip too */
    train_config_free(&a);
    write_file(t, "rt3.yaml",
               "base_model: m.gguf\nadapter: lora\nlora_target_linear: true\ndata_seed: 7\n"
               "loss_watchdog_threshold: 5.0\nloss_watchdog_patience: 2\nchat_template: chatml\n"
               "special_tokens:\n  eos_token: \"<|im_end|>\"\n  pad_token: \"<|im_end|>\"\n"
               "gradient_checkpointing: offload\n"
               "datasets:\n  - path: d\n    type: chat_template\n    field_messages: conversations\n"
               "    message_property_mappings:\n      role: from\n      content: value\n"
               "    roles_to_train: [gpt, human]\n    train_on_eos: all\n    train_on_eot: last\n"
               "    drop_system_message: true\n"
               "    split: train[:20%]\n    data_files: a.jsonl\n    ds_type: json\n    chat_template: jinja\n"
               "    chat_template_jinja: \"{{ x }}\\n\"\n"
               "eot_tokens: [\"<|im_end|>\"]\nchat_template_jinja: t.jinja\n",
               path, sizeof path);
    assert_int_equal(train_config_load(path, &a, &e), 0);
    assert_int_equal(a.data_seed, 7);
    assert_int_equal(a.gradient_checkpointing, 3); /* LLAMA_CKPT_OFFLOAD */
    assert_string_equal(a.datasets[0].message_field_role, "from");
    assert_string_equal(a.datasets[0].split, "train[:20%]");
    assert_int_equal(a.datasets[0].n_roles_to_train, 2);
    assert_string_equal(a.special_eos, "<|im_end|>");
    assert_string_equal(a.datasets[0].train_on_eot, "last");
    assert_string_equal(a.datasets[0].chat_template_jinja, "{{ x }}\n");
    assert_int_equal(a.n_eot_tokens, 1);
    assert_int_equal(train_config_write_yaml(&a, out, &e), 0);
    assert_int_equal(train_config_load(out, &b, &e), 0);
    assert_configs_equal(&a, &b);
    assert_int_equal(b.n_eot_tokens, 1);
    assert_string_equal(b.eot_tokens[0], "<|im_end|>");
    assert_string_equal(b.chat_template_jinja, "t.jinja");
    train_config_free(&b);

    /* defaults + required keys also round-trip (empty lists, -1, null-ish values) */
    train_config_free(&a);
    write_file(t, "rt2.yaml", MINIMAL, path, sizeof path);
    assert_int_equal(train_config_load(path, &a, &e), 0);
    assert_int_equal(train_config_write_yaml(&a, out, &e), 0);
    assert_int_equal(train_config_load(out, &b, &e), 0);
    assert_configs_equal(&a, &b);
    train_config_free(&a);
    train_config_free(&b);

    /* writing into a missing directory fails with a message */
    assert_int_equal(train_config_write_yaml(&b, "/nonexistent/dir/x.yaml", &e), -1);
    assert_non_null(strstr(e.msg, "cannot create /nonexistent/dir/x.yaml.tmp"));
}

/* The three checkpointing modes: axolotl's gradient_checkpointing (true, false, offload, and
 * selective), torchtitan's activation_checkpoint table; validated and written back as given. */
static void test_checkpointing_modes(void **state) {
    const tmpdir *t = *state;
    static const struct {
        const char *yaml;
        int want;
    } ok[] = {
        {"gradient_checkpointing: false\n", 0},
        {"gradient_checkpointing: true\n", 1},
        {"gradient_checkpointing: selective\n", 2},
        {"gradient_checkpointing: offload\n", 3},
        {"activation_checkpoint:\n  mode: selective\n  selective_ac_option: op\n", 2},
        {"activation_checkpoint: {mode: full}\n", 1},
        {"activation_checkpoint: {mode: none}\n", 0},
        {"activation_checkpoint: {mode: selective, preserve_rng_state: true}\n", 2},
    };
    char path[256], text[512], out[300];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        snprintf(text, sizeof text, "%s%s", MINIMAL, ok[i].yaml);
        write_file(t, "ck.yaml", text, path, sizeof path);
        train_config c, d;
        qerr e = {{0}};
        if (train_config_load(path, &c, &e)) {
            print_error("%s: %s\n", ok[i].yaml, e.msg);
            fail();
        }
        assert_int_equal(c.gradient_checkpointing, ok[i].want);
        assert_int_equal(train_config_validate(&c, &e), 0);
        snprintf(out, sizeof out, "%s/ck_out.yaml", t->dir);
        assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
        assert_int_equal(train_config_load(out, &d, &e), 0);
        assert_int_equal(d.gradient_checkpointing, ok[i].want);
        train_config_free(&c);
        train_config_free(&d);
    }
    expect_load_error(t, "x.yaml", "gradient_checkpointing: some\n",
                      "gradient_checkpointing: expected true, false, selective or offload, got \"some\"");
    expect_load_error(t, "x.yaml", "activation_checkpoint: selective\n",
                      "activation_checkpoint: expected a mapping {mode: none|full|selective");
    expect_load_error(t, "x.yaml", "activation_checkpoint: {mode: selective, selective_ac_option: 2}\n",
                      "activation_checkpoint.selective_ac_option: expected op (the per-op policy; an integer, "
                      "every n-th layer, is not implemented), got \"2\"");
    expect_load_error(t, "x.yaml", "activation_checkpoint: {mode: partial}\n",
                      "activation_checkpoint.mode: expected none, full or selective, got \"partial\"");
    expect_load_error(t, "x.yaml", "activation_checkpoint: {selective_ac_option: op}\n",
                      "activation_checkpoint: mode is missing");
    expect_load_error(t, "x.yaml", "activation_checkpoint: {mode: full, selective_ac_option: op}\n",
                      "selective_ac_option: only with mode: selective");
    expect_load_error(t, "x.yaml", "activation_checkpoint: {mode: full, offload: true}\n",
                      "activation_checkpoint.offload: unknown key");
    expect_load_error(t, "x.yaml", "gradient_checkpointing: true\nactivation_checkpoint: {mode: full}\n",
                      "key \"activation_checkpoint\" given twice (also as \"gradient_checkpointing\"");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_minimal_and_full),
        cmocka_unit_test(test_axolotl_style),
        cmocka_unit_test(test_errors_per_key),
        cmocka_unit_test(test_syntax_error_line),
        cmocka_unit_test(test_validate_rules),
        cmocka_unit_test(test_checkpoint_keys),
        cmocka_unit_test(test_overrides),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_checkpointing_modes),
        cmocka_unit_test(test_empty_values),
        cmocka_unit_test(test_input_limits),
        cmocka_unit_test(test_suggestions_and_sources),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
