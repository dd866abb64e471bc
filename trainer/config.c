/* trainer/config.c — YAML config loading, overrides, validation and writing.
 *
 * Parsing uses libyaml's document API (yaml_parser_load): the whole file becomes
 * a node tree whose marks give line numbers for messages. Every implemented key
 * is a row of `KEYS` (kind, struct offset, range, accepted values), so loading,
 * validating and writing walk the same table. Key names and meanings follow
 * axolotl (src/axolotl/utils/schemas/ config.py, peft.py, training.py,
 * datasets.py); see config.h for the policy on keys
 * axolotl has and we do not.
 */
#include "trainer/config.h"

#include <yaml.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file.h"
#include "model/llama_linear.h"


/* ------------------------------------------------------------------------ */
/* Key tables                                                                 */

typedef enum key_kind {
    K_STR,      /* char *, non-empty */
    K_BOOL,     /* int 0/1 */
    K_BF16,     /* int 0/1, also "auto" = 1 */
    K_INT,      /* int with range */
    K_FLOAT,    /* float with range */
    K_DOUBLE,   /* double with range */
    K_ENUM,     /* char *, one of `values` (after `aliases`) */
    K_MODULES,  /* char ** + int count: PEFT names of model/llama_linear.h */
    K_DATASETS, /* dataset_cfg * + int count */
} key_kind;

enum {
    F_LO_OPEN = 1u,       /* v > lo instead of v >= lo */
    F_HI_OPEN = 2u,       /* v < hi instead of v <= hi */
    F_ALSO_MINUS1 = 4u,   /* -1 is also accepted (max_steps) */
    F_WHOLE_IF_GE1 = 8u,  /* values >= 1 must be whole numbers (val_set_size) */
    F_OPTIONAL = 16u,     /* null is the key's documented "none" (trainer/config.h); every other key
                             refuses an empty value */
};

typedef struct value_alias {
    const char *from, *to;
    const char *note; /* warning text, or NULL for a silent alias */
} value_alias;

typedef struct value_later {
    const char *value;
    const char *status; /* "not implemented yet" | "not supported yet" */
} value_later;

typedef struct key_spec {
    const char *name;
    key_kind kind;
    size_t off;   /* offsetof(train_config, field) */
    size_t off_n; /* count field for lists */
    double lo, hi;
    unsigned flags;
    const char *expect;                /* "a positive integer" */
    const char *const *values;         /* K_ENUM: canonical values, NULL-terminated */
    const value_alias *aliases;        /* K_ENUM: {NULL} terminated */
    const value_later *later;          /* K_ENUM: known values we do not do yet */
    const char *alias_of;              /* another spelling of this key */
} key_spec;

static const char *const V_QUANT[] = {"nf4", NULL};
static const value_later L_QUANT[] = {{"fp4", "not supported yet"}, {NULL, NULL}};
static const char *const V_ADAPTER[] = {"qlora", "lora", NULL};
static const char *const V_SCHED[] = {"cosine", "linear", "constant", NULL};
static const value_alias A_SCHED[] = {{"constant_with_warmup", "constant", NULL}, {NULL, NULL, NULL}};
static const value_later L_SCHED[] = {
    {"cosine_with_restarts", "not supported yet"}, {"polynomial", "not supported yet"},
    {"inverse_sqrt", "not supported yet"}, {"reduce_lr_on_plateau", "not supported yet"},
    {"cosine_with_min_lr", "not supported yet"}, {"warmup_stable_decay", "not supported yet"},
    {"one_cycle", "not supported yet"}, {"rex", "not supported yet"}, {NULL, NULL}};
static const char *const V_OPTIM[] = {"adamw", "sophia", "adamw_8bit", NULL};
static const value_alias A_OPTIM[] = {
    {"adamw_torch", "adamw", NULL},
    {"adamw_torch_fused", "adamw", NULL},
    {"paged_adamw_32bit", "adamw",
     "optimizer: \"paged_adamw_32bit\" runs as \"adamw\" (paging is a CUDA memory feature; the update is the same)"},
    {"sophiag", "sophia", NULL},
    {"adamw_bnb_8bit", "adamw_8bit", NULL},
    {"paged_adamw_8bit", "adamw_8bit",
     "optimizer: \"paged_adamw_8bit\" runs as \"adamw_8bit\" (bitsandbytes' 8-bit AdamW; paging is a CUDA memory "
     "feature, the update is the same)"},
    {NULL, NULL, NULL}};
static const value_later L_OPTIM[] = {
    {"adamw_torch_8bit", "not supported yet"},
    {"adafactor", "not supported yet"}, {"sgd", "not supported yet"}, {"adagrad", "not supported yet"},
    {"lion_8bit", "not supported yet"}, {"lion_32bit", "not supported yet"},
    {"paged_lion_8bit", "not supported yet"}, {"paged_lion_32bit", "not supported yet"},
    {"ademamix", "not supported yet"}, {"ademamix_8bit", "not supported yet"},
    {"galore_adamw", "not supported yet"}, {"adopt_adamw", "not supported yet"},
    {"muon", "not supported yet"}, {"schedule_free_adamw", "not supported yet"},
    {"optimi_adamw", "not supported yet"}, {"ao_adamw_8bit", "not supported yet"},
    {NULL, NULL}};
static const char *const V_DSTYPE[] = {"completion", "alpaca", "chat_template", NULL};

/* The values lora_target_modules accepts: the PEFT names of model/llama_linear.h,
 * NULL-terminated (the shape the enum helpers below take). */
static const char *const *module_values(void) {
    static const char *v[LLAMA_N_LINEAR + 1];
    for (int k = 0; k < LLAMA_N_LINEAR; k++) v[k] = llama_linears[k].peft;
    return v;
}

#define OFF(f) offsetof(train_config, f)
#define INTMAX_D ((double)INT_MAX)

/* The implemented keys, in the order train_config_write_yaml writes them. */
static const key_spec KEYS[] = {
    {.name = "base_model", .kind = K_STR, .off = OFF(base_model), .expect = "a path to a .gguf file or a Hugging Face model directory"},
    {.name = "load_in_4bit", .kind = K_BOOL, .off = OFF(load_in_4bit)},
    {.name = "bnb_4bit_use_double_quant", .kind = K_BOOL, .off = OFF(bnb_4bit_use_double_quant)},
    {.name = "bnb_4bit_quant_type", .kind = K_ENUM, .off = OFF(bnb_4bit_quant_type), .values = V_QUANT, .later = L_QUANT},
    {.name = "adapter", .kind = K_ENUM, .off = OFF(adapter), .values = V_ADAPTER},
    {.name = "lora_r", .kind = K_INT, .off = OFF(lora_r), .lo = 1, .hi = INTMAX_D, .expect = "a positive integer"},
    {.name = "lora_alpha", .kind = K_FLOAT, .off = OFF(lora_alpha), .lo = 0, .hi = HUGE_VAL, .flags = F_LO_OPEN,
     .expect = "a positive number"},
    {.name = "lora_dropout", .kind = K_FLOAT, .off = OFF(lora_dropout), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "peft_use_rslora", .kind = K_BOOL, .off = OFF(use_rslora)},
    {.name = "use_rslora", .kind = K_BOOL, .off = OFF(use_rslora), .alias_of = "peft_use_rslora"},
    {.name = "lora_target_modules", .kind = K_MODULES, .off = OFF(lora_target_modules),
     .off_n = OFF(n_lora_target_modules), .flags = F_OPTIONAL},
    {.name = "lora_target_linear", .kind = K_BOOL, .off = OFF(lora_target_linear)},
    {.name = "datasets", .kind = K_DATASETS, .off = OFF(datasets), .off_n = OFF(n_datasets)},
    {.name = "test_datasets", .kind = K_DATASETS, .off = OFF(test_datasets), .off_n = OFF(n_test_datasets),
     .flags = F_OPTIONAL},
    {.name = "val_set_size", .kind = K_DOUBLE, .off = OFF(val_set_size), .lo = 0, .hi = 2147483647.0,
     .flags = F_WHOLE_IF_GE1, .expect = "a fraction in [0, 1) or a whole number of examples >= 1"},
    {.name = "sequence_len", .kind = K_INT, .off = OFF(sequence_len), .lo = 2, .hi = INTMAX_D,
     .expect = "an integer >= 2"},
    {.name = "sample_packing", .kind = K_BOOL, .off = OFF(sample_packing)},
    {.name = "micro_batch_size", .kind = K_INT, .off = OFF(micro_batch_size), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "gradient_accumulation_steps", .kind = K_INT, .off = OFF(gradient_accumulation_steps), .lo = 1,
     .hi = INTMAX_D, .expect = "a positive integer"},
    {.name = "num_epochs", .kind = K_INT, .off = OFF(num_epochs), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "max_steps", .kind = K_INT, .off = OFF(max_steps), .lo = 1, .hi = INTMAX_D, .flags = F_ALSO_MINUS1,
     .expect = "a positive integer, or -1 for num_epochs"},
    {.name = "learning_rate", .kind = K_FLOAT, .off = OFF(learning_rate), .lo = 0, .hi = HUGE_VAL,
     .flags = F_LO_OPEN, .expect = "a positive number"},
    {.name = "lr_scheduler", .kind = K_ENUM, .off = OFF(lr_scheduler), .values = V_SCHED, .aliases = A_SCHED,
     .later = L_SCHED},
    {.name = "warmup_steps", .kind = K_INT, .off = OFF(warmup_steps), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0"},
    {.name = "warmup_ratio", .kind = K_FLOAT, .off = OFF(warmup_ratio), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "weight_decay", .kind = K_FLOAT, .off = OFF(weight_decay), .lo = 0, .hi = HUGE_VAL,
     .expect = "a number >= 0"},
    {.name = "max_grad_norm", .kind = K_FLOAT, .off = OFF(max_grad_norm), .lo = 0, .hi = HUGE_VAL,
     .expect = "a number >= 0 (0 = no clipping)"},
    {.name = "optimizer", .kind = K_ENUM, .off = OFF(optimizer), .values = V_OPTIM, .aliases = A_OPTIM,
     .later = L_OPTIM},
    {.name = "adam_beta1", .kind = K_FLOAT, .off = OFF(adam_beta1), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "adam_beta2", .kind = K_FLOAT, .off = OFF(adam_beta2), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "adam_epsilon", .kind = K_FLOAT, .off = OFF(adam_epsilon), .lo = 0, .hi = HUGE_VAL,
     .flags = F_LO_OPEN, .expect = "a positive number"},
    {.name = "sophia_beta1", .kind = K_FLOAT, .off = OFF(sophia_beta1), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "sophia_beta2", .kind = K_FLOAT, .off = OFF(sophia_beta2), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "sophia_rho", .kind = K_FLOAT, .off = OFF(sophia_rho), .lo = 0, .hi = HUGE_VAL, .flags = F_LO_OPEN,
     .expect = "a positive number"},
    {.name = "sophia_k", .kind = K_INT, .off = OFF(sophia_k), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer (optimizer steps between Hessian updates)"},
    {.name = "sophia_bs", .kind = K_INT, .off = OFF(sophia_bs), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = the target tokens of each step)"},
    {.name = "seed", .kind = K_INT, .off = OFF(seed), .lo = 0, .hi = INTMAX_D, .expect = "an integer >= 0"},
    {.name = "output_dir", .kind = K_STR, .off = OFF(output_dir), .expect = "a directory path"},
    {.name = "logging_steps", .kind = K_INT, .off = OFF(logging_steps), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "eval_steps", .kind = K_INT, .off = OFF(eval_steps), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = only at start and end)"},
    {.name = "evals_per_epoch", .kind = K_INT, .off = OFF(evals_per_epoch), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0"},
    {.name = "eval_max_tokens", .kind = K_INT, .off = OFF(eval_max_tokens), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = all)"},
    {.name = "train_on_inputs", .kind = K_BOOL, .off = OFF(train_on_inputs)},
    {.name = "bf16", .kind = K_BF16, .off = OFF(bf16)},
    {.name = "gradient_checkpointing", .kind = K_BOOL, .off = OFF(gradient_checkpointing)},
    {.name = "num_threads", .kind = K_INT, .off = OFF(num_threads), .lo = 0, .hi = 65536,
     .expect = "an integer in [0, 65536] (0 = all cores)"},
    {.name = "save_steps", .kind = K_INT, .off = OFF(save_steps), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = unset: saves_per_epoch, else every 500 steps)"},
    {.name = "saves_per_epoch", .kind = K_INT, .off = OFF(saves_per_epoch), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0"},
    {.name = "save_total_limit", .kind = K_INT, .off = OFF(save_total_limit), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = keep every checkpoint)"},
    {.name = "resume_from_checkpoint", .kind = K_STR, .off = OFF(resume_from_checkpoint), .flags = F_OPTIONAL,
     .expect = "a path to a checkpoint-<step> directory"},
    {.name = "auto_resume_from_checkpoints", .kind = K_BOOL, .off = OFF(auto_resume_from_checkpoints)},
    {.name = "max_nan_steps", .kind = K_INT, .off = OFF(max_nan_steps), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "skip_bad_lines", .kind = K_BOOL, .off = OFF(skip_bad_lines)},
    {.name = "memory_check", .kind = K_BOOL, .off = OFF(memory_check)},
};
#define N_KEYS ((int)(sizeof KEYS / sizeof KEYS[0]))
_Static_assert(N_KEYS <= TRAIN_CONFIG_MAX_KEYS, "train_config.key_origin needs a slot per key");

/* Accepted and ignored: they cannot change what this trainer computes. */
typedef struct ignored_key {
    const char *name, *reason;
} ignored_key;

static const ignored_key IGNORED[] = {
    {"strict", "axolotl's schema strictness; unknown keys are always errors here"},
    {"base_model_config", "the architecture is read from the base_model file"},
    {"model_type", "the architecture is read from the base_model file"},
    {"tokenizer_type", "the tokenizer is read from the base_model file"},
    {"tokenizer_use_fast", "the tokenizer is read from the base_model file"},
    {"tokenizer_legacy", "the tokenizer is read from the base_model file"},
    {"is_llama_derived_model", "the architecture is read from the base_model file"},
    {"trust_remote_code", "no Python code is ever run"},
    {"hf_use_auth_token", "models and data are local files; nothing is downloaded"},
    {"dataset_prepared_path", "datasets are tokenized in memory at start-up; nothing is cached"},
    {"dataset_processes", "pre-processing runs in this process; there are no worker processes"},
    {"gradient_checkpointing_kwargs", "PyTorch-specific (use_reentrant); recomputation here is exact"},
    {"pad_to_sequence_len", "padded positions are masked, so padding never changes the loss"},
    {"local_rank", "set by PyTorch launchers"},
    {"dataloader_num_workers", "PyTorch DataLoader setting"},
    {"dataloader_pin_memory", "PyTorch DataLoader setting"},
    {"dataloader_prefetch_factor", "PyTorch DataLoader setting"},
};
#define N_IGNORED ((int)(sizeof IGNORED / sizeof IGNORED[0]))

/* Known to axolotl, not done here yet: fine when null/false/empty (axolotl's
 * examples list many of them empty), an error otherwise. `allowed` is one
 * extra harmless value. */
typedef struct later_key {
    const char *name, *allowed, *hint;
} later_key;

static const later_key LATER[] = {
    {"load_in_8bit", NULL, "the frozen base is NF4 (load_in_4bit: true) or bf16"},
    {"gptq", NULL, NULL},
    {"fp16", NULL, "compute is bf16 (bf16: true) or fp32 (bf16: false)"},
    {"tf32", NULL, "TF32 is a CUDA matmul mode"},
    {"flash_attention", NULL, NULL},
    {"sdp_attention", NULL, NULL},
    {"xformers_attention", NULL, NULL},
    {"flex_attention", NULL, NULL},
    {"s2_attention", NULL, NULL},
    {"attn_implementation", NULL, NULL},
    {"eval_sample_packing", NULL, NULL},
    {"group_by_length", NULL, NULL},
    {"deepspeed", NULL, NULL},
    {"fsdp", NULL, NULL},
    {"fsdp_config", NULL, NULL},
    {"fsdp_version", NULL, NULL},
    {"sequence_parallel_degree", NULL, NULL},
    {"context_parallel_size", NULL, NULL},
    {"tensor_parallel_size", NULL, NULL},
    {"ddp_timeout", NULL, NULL},
    {"ddp_bucket_cap_mb", NULL, NULL},
    {"ddp_broadcast_buffers", NULL, NULL},
    {"wandb_project", NULL, "metrics go to <output_dir>/metrics.jsonl"},
    {"wandb_entity", NULL, NULL},
    {"wandb_watch", NULL, NULL},
    {"wandb_name", NULL, NULL},
    {"wandb_run_id", NULL, NULL},
    {"wandb_log_model", NULL, NULL},
    {"wandb_mode", NULL, NULL},
    {"use_wandb", NULL, NULL},
    {"mlflow_tracking_uri", NULL, NULL},
    {"mlflow_experiment_name", NULL, NULL},
    {"use_tensorboard", NULL, NULL},
    {"hub_model_id", NULL, NULL},
    {"hub_strategy", NULL, NULL},
    {"push_dataset_to_hub", NULL, NULL},
    {"lora_model_dir", NULL, NULL},
    {"save_strategy", NULL, NULL},
    {"save_first_step", NULL, NULL},
    {"save_safetensors", "true", NULL},
    {"early_stopping_patience", NULL, NULL},
    {"loss_watchdog_threshold", NULL, NULL},
    {"loss_watchdog_patience", NULL, NULL},
    {"eval_strategy", NULL, "use eval_steps or evals_per_epoch"},
    {"evaluation_strategy", NULL, "use eval_steps or evals_per_epoch"},
    {"eval_table_size", NULL, NULL},
    {"eval_max_new_tokens", NULL, NULL},
    {"eval_batch_size", NULL, NULL},
    {"eval_causal_lm_metrics", NULL, NULL},
    {"do_causal_lm_eval", NULL, NULL},
    {"lora_fan_in_fan_out", NULL, NULL},
    {"lora_modules_to_save", NULL, NULL},
    {"lora_target_parameters", NULL, NULL},
    {"peft_use_dora", NULL, NULL},
    {"peft_layers_to_transform", NULL, NULL},
    {"peft_layers_pattern", NULL, NULL},
    {"peft_init_lora_weights", "true", NULL},
    {"peft_layer_replication", NULL, NULL},
    {"peft", NULL, NULL},
    {"loraplus_lr_ratio", NULL, NULL},
    {"loraplus_lr_embedding", NULL, NULL},
    {"relora", NULL, NULL},
    {"merge_lora", NULL, NULL},
    {"bnb_config_kwargs", NULL, NULL},
    {"qlora_sharded_model_loading", NULL, NULL},
    {"lora_on_cpu", NULL, NULL},
    {"gpu_memory_limit", NULL, NULL},
    {"max_memory", NULL, NULL},
    {"special_tokens", NULL, "bos/eos/unk come from the base_model file"},
    {"tokens", NULL, NULL},
    {"added_tokens_overrides", NULL, NULL},
    {"chat_template", "tokenizer_default", "the base_model file's own template is always used"},
    {"chat_template_jinja", NULL, NULL},
    {"default_system_message", NULL, NULL},
    {"tokenizer_config", NULL, "the tokenizer is read from the base_model file"},
    {"neftune_noise_alpha", NULL, NULL},
    {"noisy_embedding_alpha", NULL, NULL},
    {"lr_scheduler_kwargs", NULL, NULL},
    {"cosine_min_lr_ratio", NULL, NULL},
    {"cosine_constant_lr_ratio", NULL, NULL},
    {"lr_quadratic_warmup", NULL, NULL},
    {"lr_div_factor", NULL, NULL},
    {"lr_groups", NULL, NULL},
    {"embedding_lr", NULL, NULL},
    {"embedding_lr_scale", NULL, NULL},
    {"optim_args", NULL, NULL},
    {"optim_target_modules", NULL, NULL},
    {"adam_beta3", NULL, NULL},
    {"adam_epsilon2", NULL, NULL},
    {"batch_size", NULL, "use micro_batch_size and gradient_accumulation_steps"},
    {"auto_find_batch_size", NULL, NULL},
    {"torch_compile", NULL, NULL},
    {"unfrozen_parameters", NULL, NULL},
    {"plugins", NULL, NULL},
    {"rl", NULL, NULL},
    {"pretraining_dataset", NULL, NULL},
    {"debug", NULL, NULL},
    {"liger_rms_norm", NULL, NULL},
    {"liger_glu_activation", NULL, NULL},
    {"liger_cross_entropy", NULL, NULL},
    {"liger_fused_linear_cross_entropy", NULL, NULL},
    {"lora_mlp_kernel", NULL, NULL},
    {"lora_qkv_kernel", NULL, NULL},
    {"lora_o_kernel", NULL, NULL},
    {"unsloth_lora_mlp", NULL, NULL},
    {"unsloth_lora_qkv", NULL, NULL},
    {"unsloth_lora_o", NULL, NULL},
};
#define N_LATER ((int)(sizeof LATER / sizeof LATER[0]))

/* Keys inside one datasets / test_datasets entry. */
static const char *const DS_KEYS[] = {"path", "type", "field", "field_messages"};
#define N_DS_KEYS 4
static const later_key DS_LATER[] = {
    {"ds_type", "json", "dataset files are JSON lines"},
    {"split", NULL, NULL},
    {"data_files", NULL, NULL},
    {"name", NULL, NULL},
    {"revision", NULL, NULL},
    {"shards", NULL, NULL},
    {"shards_idx", NULL, NULL},
    {"preprocess_shards", NULL, NULL},
    {"chat_template", "tokenizer_default", "the base_model file's own template is always used"},
    {"chat_template_jinja", NULL, NULL},
    {"roles_to_train", NULL, NULL},
    {"train_on_eos", NULL, NULL},
    {"roles", NULL, NULL},
    {"message_property_mappings", NULL, NULL},
    {"message_field_role", NULL, NULL},
    {"message_field_content", NULL, NULL},
    {"message_field_training", NULL, NULL},
    {"message_field_training_detail", NULL, NULL},
    {"field_system", NULL, NULL},
    {"field_instruction", NULL, NULL},
    {"field_input", NULL, NULL},
    {"field_output", NULL, NULL},
    {"field_human", NULL, NULL},
    {"field_model", NULL, NULL},
    {"field_tools", NULL, NULL},
    {"field_thinking", NULL, NULL},
    {"conversation", NULL, NULL},
    {"drop_system_message", NULL, NULL},
    {"input_transform", NULL, NULL},
    {"trust_remote_code", NULL, NULL},
};
#define N_DS_LATER ((int)(sizeof DS_LATER / sizeof DS_LATER[0]))

/* ------------------------------------------------------------------------ */
/* Small helpers                                                              */

#define FIELD(c, off, T) ((T *)(void *)((char *)(c) + (off)))
#define CFIELD(c, off, T) ((const T *)(const void *)((const char *)(c) + (off)))
typedef char **strv_t; /* so CFIELD(c, off, strv_t) is char **const * */

static char *dup_str(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s);
    char *p = malloc(n + 1);
    if (p) memcpy(p, s, n + 1);
    return p;
}

/* Optimal-string-alignment (restricted Damerau-Levenshtein) distance,
 * case-insensitive; strings longer than 63 bytes compare as far apart. */
static int edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 1000;
    int d[64][64];
    for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            int ca = tolower((unsigned char)a[i - 1]), cb = tolower((unsigned char)b[j - 1]);
            int cost = ca != cb;
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best) best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == cb && d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

/* Track the closest candidate for a "did you mean" hint. */
typedef struct suggest {
    const char *best;
    int dist;
} suggest;

/* Is cand a plausible meaning of the typo `word`, d edits away? A third of
 * the shorter length in edits (so nothing for words or candidates of 1-2
 * bytes: any two of those are two edits apart, and "did you mean \"rl\"" for
 * every short key helped nobody), or, from 4 common bytes on, one being a
 * prefix or suffix of the other ("lora_rank" -> "lora_r", "epochs" ->
 * "num_epochs"). */
static int suggest_close(const char *word, const char *cand, int d) {
    size_t lw = strlen(word), lc = strlen(cand), m = lw < lc ? lw : lc;
    if ((size_t)d <= m / 3) return 1;
    if (m < 4) return 0;
    size_t diff = lw > lc ? lw - lc : lc - lw;
    if ((size_t)d > diff) return 0;
    return !strncasecmp(word, cand, m) || !strncasecmp(word + lw - m, cand + lc - m, m);
}

static void suggest_try(suggest *s, const char *word, const char *cand) {
    int d = edit_distance(word, cand);
    if (d < s->dist && suggest_close(word, cand, d)) {
        s->dist = d;
        s->best = cand;
    }
}

/* Shortest decimal form that parses back to exactly v (as a float if
 * is_float, else as a double). A bare exponent form gets ".0" inserted so
 * PyYAML also reads it as a number ("1e-08" -> "1.0e-08"). */
static void fmt_shortest(char *buf, size_t n, double v, int is_float) {
    int maxp = is_float ? 9 : 17;
    for (int p = 1; p <= maxp; p++) {
        snprintf(buf, n, "%.*g", p, v);
        if (is_float ? (strtof(buf, NULL) == (float)v) : (strtod(buf, NULL) == v)) break;
    }
    char *ep = strchr(buf, 'e');
    if (ep && !strchr(buf, '.') && strlen(buf) + 3 < n) {
        memmove(ep + 2, ep, strlen(ep) + 1);
        ep[0] = '.';
        ep[1] = '0';
    }
}

static int parse_bool_str(const char *s, int *out) {
    static const char *const T[] = {"true", "yes", "on", "1"};
    static const char *const F[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < sizeof T / sizeof T[0]; i++) {
        if (!strcasecmp(s, T[i])) return *out = 1, 0;
        if (!strcasecmp(s, F[i])) return *out = 0, 0;
    }
    return -1;
}

/* Parse a whole string as a finite double (surrounding blanks allowed). */
static int parse_double_str(const char *s, double *out) {
    while (isspace((unsigned char)*s)) s++;
    if (!*s) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    while (isspace((unsigned char)*end)) end++;
    if (*end || errno == ERANGE || !isfinite(v)) return -1;
    /* strtod also takes hex floats and "nan"/"inf": YAML numbers are decimal. */
    for (const char *q = s; q < end; q++)
        if (isalpha((unsigned char)*q) && *q != 'e' && *q != 'E') return -1;
    *out = v;
    return 0;
}

/* A whole number (decimal, or a float with no fractional part, e.g. "3.0"). */
static int parse_int_str(const char *s, long long *out) {
    double v;
    if (parse_double_str(s, &v)) return -1;
    if (v != floor(v) || fabs(v) > 9.0e15) return -1;
    *out = (long long)v;
    return 0;
}

static int range_ok(const key_spec *k, double v) {
    if ((k->flags & F_ALSO_MINUS1) && v == -1) return 1;
    if ((k->flags & F_LO_OPEN) ? !(v > k->lo) : !(v >= k->lo)) return 0;
    if ((k->flags & F_HI_OPEN) ? !(v < k->hi) : !(v <= k->hi)) return 0;
    if ((k->flags & F_WHOLE_IF_GE1) && v >= 1 && v != floor(v)) return 0;
    return 1;
}

static int add_warning(train_config *c, qerr *e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int add_warning(train_config *c, qerr *e, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char **w = realloc(c->warnings, (size_t)(c->n_warnings + 1) * sizeof *w);
    if (!w) return qerr_set(e, "out of memory");
    c->warnings = w;
    if (!(w[c->n_warnings] = dup_str(buf))) return qerr_set(e, "out of memory");
    c->n_warnings++;
    return 0;
}

static void free_str_list(char **v, int n) {
    for (int i = 0; i < n; i++) free(v[i]);
    free(v);
}

static void free_datasets(dataset_cfg *d, int n) {
    for (int i = 0; i < n; i++) {
        free(d[i].path);
        free(d[i].type);
        free(d[i].field);
        free(d[i].field_messages);
    }
    free(d);
}

static const key_spec *find_key(const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].name, name)) return &KEYS[i];
    return NULL;
}

static int enum_index(const char *const *values, const char *s) {
    for (int i = 0; values[i]; i++)
        if (!strcmp(values[i], s)) return i;
    return -1;
}

static void join_values(char *buf, size_t n, const char *const *values) {
    buf[0] = 0;
    for (int i = 0; values[i]; i++) {
        size_t l = strlen(buf);
        snprintf(buf + l, n - l, "%s%s", i ? ", " : "", values[i]);
    }
}

/* ------------------------------------------------------------------------ */
/* Defaults / free                                                            */

int train_config_defaults(train_config *c) {
    memset(c, 0, sizeof *c);
    c->load_in_4bit = 1;
    c->bnb_4bit_use_double_quant = 1;
    c->lora_r = 8;
    c->lora_alpha = 16.0f;
    c->lora_dropout = 0.05f;
    c->val_set_size = 0.0;
    c->sequence_len = 512;
    c->sample_packing = 0;
    c->micro_batch_size = 1;
    c->gradient_accumulation_steps = 1;
    c->num_epochs = 1;
    c->max_steps = -1;
    c->learning_rate = 2e-4f;
    c->warmup_steps = 0;
    c->warmup_ratio = 0.0f;
    c->weight_decay = 0.0f;
    c->max_grad_norm = 1.0f;
    c->adam_beta1 = 0.9f;
    c->adam_beta2 = 0.999f;
    c->adam_epsilon = 1e-8f;
    c->sophia_beta1 = 0.965f;
    c->sophia_beta2 = 0.99f;
    c->sophia_rho = 0.04f;
    c->sophia_k = 10;
    c->sophia_bs = 0;
    c->seed = 42;
    c->logging_steps = 1;
    c->bf16 = 1;
    c->gradient_checkpointing = 1;
    c->auto_resume_from_checkpoints = 1;
    c->max_nan_steps = 5;
    c->memory_check = 1;
    c->bnb_4bit_quant_type = dup_str("nf4");
    c->adapter = dup_str("qlora");
    c->lr_scheduler = dup_str("cosine");
    c->optimizer = dup_str("adamw");
    c->output_dir = dup_str("./outputs/lora-out");
    if (!c->bnb_4bit_quant_type || !c->adapter || !c->lr_scheduler || !c->optimizer || !c->output_dir) return -1;
    return 0;
}

void train_config_free(train_config *c) {
    if (!c) return;
    free(c->base_model);
    free(c->bnb_4bit_quant_type);
    free(c->adapter);
    free_str_list(c->lora_target_modules, c->n_lora_target_modules);
    free_datasets(c->datasets, c->n_datasets);
    free_datasets(c->test_datasets, c->n_test_datasets);
    free(c->lr_scheduler);
    free(c->optimizer);
    free(c->output_dir);
    free(c->resume_from_checkpoint);
    free(c->config_path);
    free_str_list(c->warnings, c->n_warnings);
    free_str_list(c->overrides, c->n_overrides);
    memset(c, 0, sizeof *c);
}

/* ------------------------------------------------------------------------ */
/* Parsing one value                                                          */

typedef struct pctx {
    const char *src;          /* file name or "command line" */
    int lines;                /* append " (line N)" to messages */
    yaml_document_t *doc;
    train_config *c;
    const train_config *def;  /* defaults, for null values */
    qerr *e;
    int origin;               /* command line: the key_origin of what it sets (-1 - override index) */
} pctx;

static int perr(const pctx *p, const yaml_node_t *at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int perr(const pctx *p, const yaml_node_t *at, const char *fmt, ...) {
    char msg[800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (p->lines && at)
        return qerr_set(p->e, "%s: %s (line %lu)", p->src, msg, (unsigned long)at->start_mark.line + 1);
    return qerr_set(p->e, "%s: %s", p->src, msg);
}

static const char *sval(const yaml_node_t *n) { return (const char *)n->data.scalar.value; }

static int is_null(const yaml_node_t *n) {
    if (!n) return 1;
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *s = sval(n);
    return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

/* "Unset" in the sense of axolotl, which tests these keys for Python
 * truthiness: null, false, 0, "" or an empty collection. */
static int is_unset(const yaml_node_t *n) {
    if (is_null(n)) return 1;
    int b;
    double d;
    switch (n->type) {
    case YAML_SCALAR_NODE:
        return !*sval(n) || (parse_bool_str(sval(n), &b) == 0 && b == 0) ||
               (parse_double_str(sval(n), &d) == 0 && d == 0);
    case YAML_SEQUENCE_NODE:
        return n->data.sequence.items.top == n->data.sequence.items.start;
    case YAML_MAPPING_NODE:
        return n->data.mapping.pairs.top == n->data.mapping.pairs.start;
    default:
        return 0;
    }
}

/* Describe a value for "got ..." in messages. */
static void describe(const yaml_node_t *n, char *buf, size_t len) {
    if (!n) {
        snprintf(buf, len, "nothing");
    } else if (n->type == YAML_SEQUENCE_NODE) {
        snprintf(buf, len, "a list");
    } else if (n->type == YAML_MAPPING_NODE) {
        snprintf(buf, len, "a mapping");
    } else if (is_null(n)) {
        snprintf(buf, len, "null");
    } else {
        const char *s = sval(n);
        size_t l = strlen(s);
        if (l > 60)
            snprintf(buf, len, "\"%.57s...\"", s);
        else
            snprintf(buf, len, "\"%s\"", s);
    }
}

/* Value of a harmless-when-unset key: accepted iff unset or == allowed. */
static int later_ok(const yaml_node_t *v, const char *allowed) {
    if (is_unset(v)) return 1;
    if (!allowed || v->type != YAML_SCALAR_NODE) return 0;
    int a, b;
    if (parse_bool_str(allowed, &a) == 0) return parse_bool_str(sval(v), &b) == 0 && a == b;
    return !strcmp(sval(v), allowed);
}

static int later_err(const pctx *p, const yaml_node_t *at, const char *prefix, const later_key *lk) {
    char extra[256] = "";
    if (lk->allowed)
        snprintf(extra, sizeof extra, "; the only accepted value is %s", lk->allowed);
    return perr(p, at, "%s%s: not supported yet%s%s%s (delete the line, or leave it empty)", prefix, lk->name,
                extra, lk->hint ? "; " : "", lk->hint ? lk->hint : "");
}

/* Parse a scalar string for K_STR / dataset strings into a fresh copy. */
static int get_string(const pctx *p, const char *what, const yaml_node_t *v, char **out) {
    char got[96];
    if (v->type != YAML_SCALAR_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected a string, got %s", what, got);
    }
    if (!*sval(v)) return perr(p, v, "%s: expected a non-empty string", what);
    if (!(*out = dup_str(sval(v)))) return qerr_set(p->e, "out of memory");
    return 0;
}

/* Resolve an enum value (aliases, not-yet values, suggestions). On success
 * *out points into the static tables. */
static int get_enum(const pctx *p, const char *what, const yaml_node_t *v, const char *const *values,
                    const value_alias *aliases, const value_later *later, const char **out) {
    char got[96], list[256];
    join_values(list, sizeof list, values);
    if (v->type != YAML_SCALAR_NODE || !*sval(v)) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected one of %s, got %s", what, list, got);
    }
    const char *s = sval(v);
    int i = enum_index(values, s);
    if (i >= 0) return *out = values[i], 0;
    for (int a = 0; aliases && aliases[a].from; a++) {
        if (!strcmp(aliases[a].from, s)) {
            if (aliases[a].note && add_warning(p->c, p->e, "%s: %s", p->src, aliases[a].note)) return -1;
            *out = values[enum_index(values, aliases[a].to)];
            return 0;
        }
    }
    for (int l = 0; later && later[l].value; l++)
        if (!strcmp(later[l].value, s))
            return perr(p, v, "%s: \"%s\" is %s (accepted: %s)", what, s, later[l].status, list);
    suggest sg = {NULL, 1000};
    for (int j = 0; values[j]; j++) suggest_try(&sg, s, values[j]);
    for (int a = 0; aliases && aliases[a].from; a++) suggest_try(&sg, s, aliases[a].from);
    const char *hint = sg.best;
    describe(v, got, sizeof got);
    if (hint) return perr(p, v, "%s: expected one of %s, got %s; did you mean \"%s\"?", what, list, got, hint);
    return perr(p, v, "%s: expected one of %s, got %s", what, list, got);
}

static yaml_node_t *node_at(yaml_document_t *doc, int id) { return yaml_document_get_node(doc, id); }

/* One datasets entry (a mapping) into *d (fully owned on success). */
static int parse_dataset(const pctx *p, const char *what, const yaml_node_t *m, dataset_cfg *d) {
    char got[96];
    memset(d, 0, sizeof *d);
    if (m->type != YAML_MAPPING_NODE) {
        describe(m, got, sizeof got);
        return perr(p, m, "%s: expected a mapping with path and type, got %s", what, got);
    }
    char *vals[N_DS_KEYS] = {NULL, NULL, NULL, NULL};
    int seen[N_DS_KEYS] = {0, 0, 0, 0};
    int rc = -1;
    for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(p->doc, pr->key), *v = node_at(p->doc, pr->value);
        if (k->type != YAML_SCALAR_NODE) {
            perr(p, k, "%s: keys must be plain strings", what);
            goto out;
        }
        const char *name = sval(k);
        int ki = -1;
        for (int j = 0; j < N_DS_KEYS; j++)
            if (!strcmp(DS_KEYS[j], name)) ki = j;
        if (ki >= 0) {
            if (seen[ki]) {
                perr(p, k, "%s: key \"%s\" given twice", what, name);
                goto out;
            }
            seen[ki] = 1;
            char sub[160];
            snprintf(sub, sizeof sub, "%s.%s", what, name);
            if (is_null(v)) { /* a value that went missing is not the default (trainer/config.h) */
                static const char *const expect[N_DS_KEYS] = {
                    "a path to a JSONL file", "one of completion, alpaca, chat_template",
                    "a JSON key (delete the line for the default, \"text\")",
                    "a JSON key (delete the line for the default, \"messages\")"};
                perr(p, k, "%s: no value; expected %s", sub, expect[ki]);
                goto out;
            }
            if (ki == 1) {
                const char *t;
                if (get_enum(p, sub, v, V_DSTYPE, NULL, NULL, &t)) goto out;
                if (!(vals[ki] = dup_str(t))) {
                    qerr_set(p->e, "out of memory");
                    goto out;
                }
            } else if (get_string(p, sub, v, &vals[ki])) {
                goto out;
            }
            continue;
        }
        const later_key *lk = NULL;
        for (int j = 0; j < N_DS_LATER; j++)
            if (!strcmp(DS_LATER[j].name, name)) lk = &DS_LATER[j];
        if (lk) {
            if (!later_ok(v, lk->allowed)) {
                char pre[160];
                snprintf(pre, sizeof pre, "%s.", what);
                later_err(p, v, pre, lk);
                goto out;
            }
            continue;
        }
        suggest sg = {NULL, 1000};
        for (int j = 0; j < N_DS_KEYS; j++) suggest_try(&sg, name, DS_KEYS[j]);
        for (int j = 0; j < N_DS_LATER; j++) suggest_try(&sg, name, DS_LATER[j].name);
        const char *hint = sg.best;
        if (hint)
            perr(p, k, "%s: unknown key \"%s\"; did you mean \"%s\"?", what, name, hint);
        else
            perr(p, k, "%s: unknown key \"%s\" (accepted: path, type, field, field_messages)", what, name);
        goto out;
    }
    if (!vals[0]) {
        perr(p, m, "%s: missing required key \"path\"", what);
        goto out;
    }
    if (!vals[1]) {
        perr(p, m, "%s: missing required key \"type\" (one of completion, alpaca, chat_template)", what);
        goto out;
    }
    if (!vals[2] && !(vals[2] = dup_str("text"))) goto oom;
    if (!vals[3] && !(vals[3] = dup_str("messages"))) goto oom;
    d->path = vals[0];
    d->type = vals[1];
    d->field = vals[2];
    d->field_messages = vals[3];
    return 0;
oom:
    qerr_set(p->e, "out of memory");
out:
    for (int j = 0; j < N_DS_KEYS; j++) free(vals[j]);
    return rc;
}

static int parse_datasets(const pctx *p, const char *key, const yaml_node_t *v, dataset_cfg **out, int *n_out) {
    char got[96];
    *out = NULL;
    *n_out = 0;
    if (is_null(v)) return 0;
    if (v->type != YAML_SEQUENCE_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected a list of {path, type} entries, got %s", key, got);
    }
    int n = (int)(v->data.sequence.items.top - v->data.sequence.items.start);
    dataset_cfg *d = calloc((size_t)(n ? n : 1), sizeof *d);
    if (!d) return qerr_set(p->e, "out of memory");
    for (int i = 0; i < n; i++) {
        char what[64];
        snprintf(what, sizeof what, "%s[%d]", key, i);
        if (parse_dataset(p, what, node_at(p->doc, v->data.sequence.items.start[i]), &d[i])) {
            free_datasets(d, i);
            return -1;
        }
    }
    *out = d;
    *n_out = n;
    return 0;
}

static int parse_modules(const pctx *p, const char *key, const yaml_node_t *v, char ***out, int *n_out) {
    char got[96], list[160];
    join_values(list, sizeof list, module_values());
    *out = NULL;
    *n_out = 0;
    if (is_null(v)) return 0;
    if (v->type != YAML_SEQUENCE_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected a list of module names (%s), got %s", key, list, got);
    }
    int n = (int)(v->data.sequence.items.top - v->data.sequence.items.start);
    char **m = calloc((size_t)(n ? n : 1), sizeof *m);
    if (!m) return qerr_set(p->e, "out of memory");
    for (int i = 0; i < n; i++) {
        yaml_node_t *it = node_at(p->doc, v->data.sequence.items.start[i]);
        char what[64];
        snprintf(what, sizeof what, "%s[%d]", key, i);
        const char *name;
        if (get_enum(p, what, it, module_values(), NULL, NULL, &name)) goto fail;
        for (int j = 0; j < i; j++)
            if (!strcmp(m[j], name)) {
                perr(p, it, "%s: \"%s\" is listed twice", key, name);
                goto fail;
            }
        if (!(m[i] = dup_str(name))) {
            qerr_set(p->e, "out of memory");
            goto fail;
        }
    }
    *out = m;
    *n_out = n;
    return 0;
fail:
    free_str_list(m, n);
    return -1;
}

/* An empty value (null) for a key that needs one: every key but the F_OPTIONAL
 * ones, whose null is a documented "none" (trainer/config.h). A missing value
 * must not quietly become the default: `learning_rate=` from an unset shell
 * variable trained at 2e-4. at: the key's node (the empty value's own mark
 * can be on the next line). */
static int no_value(const pctx *p, const key_spec *k, const char *kname, const yaml_node_t *at) {
    char expect[300], def[160] = "", list[256];
    switch (k->kind) {
    case K_BOOL: snprintf(expect, sizeof expect, "true or false"); break;
    case K_BF16: snprintf(expect, sizeof expect, "true, false or auto"); break;
    case K_ENUM:
        join_values(list, sizeof list, k->values);
        snprintf(expect, sizeof expect, "one of %s", list);
        break;
    case K_DATASETS: snprintf(expect, sizeof expect, "a list of {path, type} entries"); break;
    case K_MODULES: snprintf(expect, sizeof expect, "a list of module names"); break;
    default: snprintf(expect, sizeof expect, "%s", k->expect); break;
    }
    if (p->def) {
        switch (k->kind) {
        case K_STR:
        case K_ENUM: {
            const char *d = *CFIELD(p->def, k->off, char *);
            if (d) snprintf(def, sizeof def, "\"%.100s\"", d);
            break;
        }
        case K_BOOL:
        case K_BF16: snprintf(def, sizeof def, "%s", *CFIELD(p->def, k->off, int) ? "true" : "false"); break;
        case K_INT: snprintf(def, sizeof def, "%d", *CFIELD(p->def, k->off, int)); break;
        case K_FLOAT: fmt_shortest(def, sizeof def, (double)*CFIELD(p->def, k->off, float), 1); break;
        case K_DOUBLE: fmt_shortest(def, sizeof def, *CFIELD(p->def, k->off, double), 0); break;
        default: break;
        }
    }
    if (!p->lines)
        return perr(p, at, "%s: no value; expected %s (leave the override out to keep the config file's value)",
                    kname, expect);
    if (def[0]) return perr(p, at, "%s: no value; expected %s (delete the line for the default, %s)", kname, expect, def);
    return perr(p, at, "%s: no value; expected %s (the key is required)", kname, expect);
}

/* Apply one implemented key. Atomic: on failure p->c is unchanged. */
static int apply_key(const pctx *p, const key_spec *k, const char *kname, const yaml_node_t *v) {
    train_config *c = p->c;
    char got[96];
    describe(v, got, sizeof got);
    switch (k->kind) {
    case K_STR:
    case K_ENUM: {
        char *s = NULL;
        if (is_null(v)) {
            const char *d = *CFIELD(p->def, k->off, char *);
            if (d && !(s = dup_str(d))) return qerr_set(p->e, "out of memory");
        } else if (k->kind == K_STR) {
            if (get_string(p, kname, v, &s)) return -1;
        } else {
            const char *t;
            if (get_enum(p, kname, v, k->values, k->aliases, k->later, &t)) return -1;
            if (!(s = dup_str(t))) return qerr_set(p->e, "out of memory");
        }
        char **f = FIELD(c, k->off, char *);
        free(*f);
        *f = s;
        return 0;
    }
    case K_BOOL:
    case K_BF16: {
        int b = *CFIELD(p->def, k->off, int);
        if (!is_null(v)) {
            if (v->type == YAML_SCALAR_NODE && parse_bool_str(sval(v), &b) == 0) {
                /* ok */
            } else if (k->kind == K_BF16 && v->type == YAML_SCALAR_NODE && !strcmp(sval(v), "auto")) {
                b = 1;
            } else {
                return perr(p, v, "%s: expected %s, got %s", kname,
                            k->kind == K_BF16 ? "true, false or auto" : "true or false", got);
            }
        }
        *FIELD(c, k->off, int) = b;
        return 0;
    }
    case K_INT: {
        long long x = *CFIELD(p->def, k->off, int);
        if (!is_null(v) &&
            (v->type != YAML_SCALAR_NODE || parse_int_str(sval(v), &x) || !range_ok(k, (double)x)))
            return perr(p, v, "%s: expected %s, got %s", kname, k->expect, got);
        *FIELD(c, k->off, int) = (int)x;
        return 0;
    }
    case K_FLOAT:
    case K_DOUBLE: {
        double x = k->kind == K_FLOAT ? (double)*CFIELD(p->def, k->off, float) : *CFIELD(p->def, k->off, double);
        if (!is_null(v)) {
            int bad = v->type != YAML_SCALAR_NODE || parse_double_str(sval(v), &x);
            if (!bad && k->kind == K_FLOAT) {
                bad = !isfinite((float)x);
                if (!bad) x = (double)(float)x;
            }
            if (bad || !range_ok(k, x)) return perr(p, v, "%s: expected %s, got %s", kname, k->expect, got);
        }
        if (k->kind == K_FLOAT)
            *FIELD(c, k->off, float) = (float)x;
        else
            *FIELD(c, k->off, double) = x;
        return 0;
    }
    case K_MODULES: {
        char **m;
        int n;
        if (parse_modules(p, kname, v, &m, &n)) return -1;
        free_str_list(*FIELD(c, k->off, char **), *FIELD(c, k->off_n, int));
        *FIELD(c, k->off, char **) = m;
        *FIELD(c, k->off_n, int) = n;
        return 0;
    }
    case K_DATASETS: {
        dataset_cfg *d;
        int n;
        if (parse_datasets(p, kname, v, &d, &n)) return -1;
        free_datasets(*FIELD(c, k->off, dataset_cfg *), *FIELD(c, k->off_n, int));
        *FIELD(c, k->off, dataset_cfg *) = d;
        *FIELD(c, k->off_n, int) = n;
        return 0;
    }
    }
    return qerr_set(p->e, "internal error: unhandled key kind");
}

static const ignored_key *find_ignored(const char *name) {
    for (int i = 0; i < N_IGNORED; i++)
        if (!strcmp(IGNORED[i].name, name)) return &IGNORED[i];
    return NULL;
}

static const later_key *find_later(const char *name) {
    for (int i = 0; i < N_LATER; i++)
        if (!strcmp(LATER[i].name, name)) return &LATER[i];
    return NULL;
}

/* Suggestions prefer implemented keys: "lora_rank" is closer to the ignored
 * "local_rank" (2 edits) than to "lora_r" (3), but means the latter. */
static int unknown_key(const pctx *p, const yaml_node_t *at, const char *name) {
    suggest sg = {NULL, 1000};
    for (int i = 0; i < N_KEYS; i++) suggest_try(&sg, name, KEYS[i].name);
    const char *hint = sg.best;
    if (!hint) {
        for (int i = 0; i < N_IGNORED; i++) suggest_try(&sg, name, IGNORED[i].name);
        for (int i = 0; i < N_LATER; i++) suggest_try(&sg, name, LATER[i].name);
        hint = sg.best;
    }
    if (hint) return perr(p, at, "unknown key \"%s\"; did you mean \"%s\"?", name, hint);
    return perr(p, at, "unknown key \"%s\" (trainer/config.h lists the accepted keys)", name);
}

/* `special_tokens` holding only pad_token is harmless: padded positions are
 * masked out of attention and loss, so the pad id never matters. */
static int special_tokens_pad_only(const pctx *p, const yaml_node_t *v) {
    if (v->type != YAML_MAPPING_NODE) return 0;
    for (yaml_node_pair_t *pr = v->data.mapping.pairs.start; pr < v->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(p->doc, pr->key);
        if (k->type != YAML_SCALAR_NODE || strcmp(sval(k), "pad_token")) return 0;
    }
    return 1;
}

/* One top-level key: value. `seen` (N_KEYS entries, indexed by the canonical
 * key) detects duplicates in a file, also across the two spellings of a key. */
static int apply_pair(const pctx *p, const char *name, const yaml_node_t *knode, const yaml_node_t *v,
                      const key_spec **seen) {
    const key_spec *k = find_key(name);
    if (k) {
        const key_spec *canon = k->alias_of ? find_key(k->alias_of) : k;
        if (seen) {
            int idx = (int)(canon - KEYS);
            if (seen[idx] && seen[idx] != k)
                return perr(p, knode, "key \"%s\" given twice (also as \"%s\", another name for the same setting)",
                            name, seen[idx]->name);
            if (seen[idx]) return perr(p, knode, "key \"%s\" given twice", name);
            seen[idx] = k;
        }
        if (is_null(v) && !(k->flags & F_OPTIONAL)) return no_value(p, k, name, knode ? knode : v);
        if (apply_key(p, k, name, v)) return -1;
        p->c->key_origin[canon - KEYS] = p->lines && knode ? (int)knode->start_mark.line + 1 : p->origin;
        return 0;
    }
    const ignored_key *ig = find_ignored(name);
    if (ig) {
        if (!is_unset(v)) return add_warning(p->c, p->e, "%s: ignoring \"%s\" (%s)", p->src, name, ig->reason);
        return 0;
    }
    if (!strcmp(name, "special_tokens") && special_tokens_pad_only(p, v))
        return add_warning(p->c, p->e,
                           "%s: ignoring \"special_tokens.pad_token\" (padded positions are masked, so the pad "
                           "token never matters)",
                           p->src);
    const later_key *lk = find_later(name);
    if (lk) return later_ok(v, lk->allowed) ? 0 : later_err(p, knode ? knode : v, "", lk);
    return unknown_key(p, knode, name);
}

static int yaml_error(qerr *e, const char *src, const yaml_parser_t *ps) {
    switch (ps->error) {
    case YAML_MEMORY_ERROR:
        return qerr_set(e, "%s: out of memory while parsing YAML", src);
    case YAML_READER_ERROR:
        return qerr_set(e, "%s: YAML read error: %s at byte %zu", src, ps->problem ? ps->problem : "?",
                        ps->problem_offset);
    default:
        if (ps->context)
            return qerr_set(e, "%s:%lu:%lu: YAML syntax error: %s (%s at line %lu)", src,
                            (unsigned long)ps->problem_mark.line + 1, (unsigned long)ps->problem_mark.column + 1,
                            ps->problem ? ps->problem : "?", ps->context,
                            (unsigned long)ps->context_mark.line + 1);
        return qerr_set(e, "%s:%lu:%lu: YAML syntax error: %s", src, (unsigned long)ps->problem_mark.line + 1,
                        (unsigned long)ps->problem_mark.column + 1, ps->problem ? ps->problem : "?");
    }
}

/* ------------------------------------------------------------------------ */
/* Input limits                                                               */

/* The text of a config file: a regular file (a directory used to fail as "input error at byte 0", a
 * FIFO without a writer blocked, /dev/zero never ended) of at most TRAIN_CONFIG_MAX_BYTES, with a NUL
 * after the last byte. The open is O_NONBLOCK, so a FIFO cannot block it. */
static unsigned char *config_read(const char *path, size_t *len, qerr *e) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        qerr_set(e, "cannot open config %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat sb;
    unsigned char *buf = NULL;
    if (fstat(fd, &sb)) {
        qerr_set(e, "cannot open config %s: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        qerr_set(e, "%s: is %s, expected a YAML file", path, file_kind_name(sb.st_mode));
        goto fail;
    }
    if (sb.st_size > (off_t)TRAIN_CONFIG_MAX_BYTES) {
        qerr_set(e, "%s: %lld bytes, more than the %u-byte (1 MiB) limit of a config file", path,
                 (long long)sb.st_size, TRAIN_CONFIG_MAX_BYTES);
        goto fail;
    }
    size_t want = (size_t)sb.st_size, n = 0;
    if (!(buf = malloc(want + 1))) {
        qerr_set(e, "%s: out of memory", path);
        goto fail;
    }
    while (n < want) { /* exactly st_size bytes: a file that grows meanwhile is not read on */
        ssize_t got = read(fd, buf + n, want - n);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            qerr_set(e, "%s: read error: %s", path, strerror(errno));
            goto fail;
        }
        if (got == 0) break;
        n += (size_t)got;
    }
    close(fd);
    buf[n] = 0;
    *len = n;
    return buf;
fail:
    free(buf);
    close(fd);
    return NULL;
}

/* Refuse YAML nested deeper than TRAIN_CONFIG_MAX_DEPTH or with more than TRAIN_CONFIG_MAX_ANCHORS
 * anchors and aliases, before libyaml builds a document of it: its scanner walks one saved
 * "simple key" per open flow collection for every token (quadratic in the depth: 400 KB of "[" took
 * minutes), and its loader looks every anchor and alias up in a list (quadratic in their number).
 * Events are pulled one at a time, so the scan stops within one line of the limit. A syntax error is
 * left to the loader, which reports it with its position. what: the message prefix ("x.yaml", or
 * "command line: key"); lines: append the line. */
static int yaml_check_limits(qerr *e, const char *what, int lines, const unsigned char *text, size_t n) {
    yaml_parser_t ps;
    yaml_event_t ev;
    if (!yaml_parser_initialize(&ps)) return qerr_set(e, "%s: out of memory", what);
    yaml_parser_set_input_string(&ps, text, n);
    int depth = 0, anchors = 0, rc = 0;
    while (yaml_parser_parse(&ps, &ev)) {
        yaml_event_type_t t = ev.type;
        unsigned long line = (unsigned long)ev.start_mark.line + 1;
        const unsigned char *anchor = t == YAML_ALIAS_EVENT            ? ev.data.alias.anchor
                                      : t == YAML_SCALAR_EVENT         ? ev.data.scalar.anchor
                                      : t == YAML_SEQUENCE_START_EVENT ? ev.data.sequence_start.anchor
                                      : t == YAML_MAPPING_START_EVENT  ? ev.data.mapping_start.anchor
                                                                       : NULL;
        yaml_event_delete(&ev);
        if (t == YAML_SEQUENCE_START_EVENT || t == YAML_MAPPING_START_EVENT) depth++;
        if (t == YAML_SEQUENCE_END_EVENT || t == YAML_MAPPING_END_EVENT) depth--;
        if (anchor) anchors++;
        char at[48] = "";
        if (lines) snprintf(at, sizeof at, " (line %lu)", line);
        if (depth > TRAIN_CONFIG_MAX_DEPTH) {
            rc = qerr_set(e, "%s: nested deeper than %d levels, the limit of a config%s", what,
                          TRAIN_CONFIG_MAX_DEPTH, at);
            break;
        }
        if (anchors > TRAIN_CONFIG_MAX_ANCHORS) {
            rc = qerr_set(e, "%s: more than %d anchors and aliases (&name, *name), the limit of a config%s", what,
                          TRAIN_CONFIG_MAX_ANCHORS, at);
            break;
        }
        if (t == YAML_STREAM_END_EVENT) break;
    }
    yaml_parser_delete(&ps);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Public: load / override                                                    */

int train_config_load(const char *path, train_config *out, qerr *e) {
    memset(out, 0, sizeof *out);
    size_t len;
    unsigned char *text = config_read(path, &len, e);
    if (!text) return -1;
    if (yaml_check_limits(e, path, 1, text, len)) {
        free(text);
        return -1;
    }
    yaml_parser_t ps;
    yaml_document_t doc;
    train_config c, def;
    int rc = -1, have_doc = 0;
    memset(&c, 0, sizeof c);
    memset(&def, 0, sizeof def);
    if (!yaml_parser_initialize(&ps)) {
        free(text);
        return qerr_set(e, "%s: out of memory", path);
    }
    yaml_parser_set_input_string(&ps, text, len);
    if (!yaml_parser_load(&ps, &doc)) {
        yaml_error(e, path, &ps);
        goto done;
    }
    have_doc = 1;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root || is_null(root)) {
        qerr_set(e, "%s: the file is empty; expected a mapping with at least base_model and datasets", path);
        goto done;
    }
    {
        yaml_document_t doc2;
        if (!yaml_parser_load(&ps, &doc2)) {
            yaml_error(e, path, &ps);
            goto done;
        }
        yaml_node_t *root2 = yaml_document_get_root_node(&doc2);
        unsigned long line2 = root2 ? (unsigned long)root2->start_mark.line + 1 : 0;
        yaml_document_delete(&doc2);
        if (root2) {
            qerr_set(e, "%s: more than one YAML document (the second starts at line %lu)", path, line2);
            goto done;
        }
    }
    if (root->type != YAML_MAPPING_NODE) {
        qerr_set(e, "%s: expected a mapping of key: value pairs at the top level (line %lu)", path,
                 (unsigned long)root->start_mark.line + 1);
        goto done;
    }
    if (train_config_defaults(&c) || train_config_defaults(&def)) {
        qerr_set(e, "out of memory");
        goto done;
    }
    pctx p = {path, 1, &doc, &c, &def, e, 0};
    const key_spec *seen[N_KEYS];
    memset(seen, 0, sizeof seen);
    for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(&doc, pr->key), *v = node_at(&doc, pr->value);
        if (k->type != YAML_SCALAR_NODE) {
            perr(&p, k, "top-level keys must be plain strings");
            goto done;
        }
        if (apply_pair(&p, sval(k), k, v, seen)) goto done;
    }
    if (!(c.config_path = dup_str(path))) {
        qerr_set(e, "out of memory");
        goto done;
    }
    *out = c;
    memset(&c, 0, sizeof c);
    rc = 0;
done:
    train_config_free(&c);
    train_config_free(&def);
    if (have_doc) yaml_document_delete(&doc);
    yaml_parser_delete(&ps);
    free(text);
    return rc;
}

int train_config_apply_override(train_config *c, const char *kv, qerr *e) {
    static const char *const src = "command line";
    const char *eq = strchr(kv, '=');
    if (!eq) return qerr_set(e, "%s: expected key=value, got \"%s\"", src, kv);
    const char *kb = kv, *ke = eq;
    while (kb < ke && isspace((unsigned char)*kb)) kb++;
    while (ke > kb && isspace((unsigned char)ke[-1])) ke--;
    char key[128];
    if (ke == kb) return qerr_set(e, "%s: expected key=value, got \"%s\"", src, kv);
    if ((size_t)(ke - kb) >= sizeof key) return qerr_set(e, "%s: unknown key \"%.*s\"", src, (int)(ke - kb), kb);
    memcpy(key, kb, (size_t)(ke - kb));
    key[ke - kb] = 0;

    pctx p = {src, 0, NULL, c, NULL, e, -1 - c->n_overrides};
    if (!find_key(key) && !find_ignored(key) && !find_later(key)) return unknown_key(&p, NULL, key);

    const char *val = eq + 1;
    while (isspace((unsigned char)*val)) val++;
    if (!*val) val = "~";
    char what[160];
    snprintf(what, sizeof what, "%s: %s", src, key);
    if (yaml_check_limits(e, what, 0, (const unsigned char *)val, strlen(val))) return -1;
    /* the slot for this override, so that once applied it is remembered without a failure */
    char **ov = realloc(c->overrides, (size_t)(c->n_overrides + 1) * sizeof *ov);
    if (!ov) return qerr_set(e, "out of memory");
    c->overrides = ov;
    if (!(ov[c->n_overrides] = dup_str(kv))) return qerr_set(e, "out of memory");

    yaml_parser_t ps;
    yaml_document_t doc;
    train_config def;
    int rc = -1;
    memset(&def, 0, sizeof def);
    if (!yaml_parser_initialize(&ps)) {
        free(ov[c->n_overrides]);
        return qerr_set(e, "out of memory");
    }
    yaml_parser_set_input_string(&ps, (const unsigned char *)val, strlen(val));
    if (!yaml_parser_load(&ps, &doc)) {
        if (ps.error == YAML_MEMORY_ERROR)
            qerr_set(e, "out of memory");
        else
            qerr_set(e, "%s: %s: cannot parse \"%s\" as a YAML value: %s at column %lu", src, key, val,
                     ps.problem ? ps.problem : "?", (unsigned long)ps.problem_mark.column + 1);
        yaml_parser_delete(&ps);
        free(ov[c->n_overrides]);
        return -1;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        qerr_set(e, "%s: %s: empty value", src, key);
        goto done;
    }
    if (train_config_defaults(&def)) {
        qerr_set(e, "out of memory");
        goto done;
    }
    p.doc = &doc;
    p.def = &def;
    rc = apply_pair(&p, key, NULL, root, NULL);
done:
    if (rc == 0)
        c->n_overrides++;
    else
        free(ov[c->n_overrides]);
    train_config_free(&def);
    yaml_document_delete(&doc);
    yaml_parser_delete(&ps);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Public: validate                                                           */

static int check_datasets(const char *src, const char *key, const dataset_cfg *d, int n, qerr *e) {
    char list[128];
    join_values(list, sizeof list, V_DSTYPE);
    for (int i = 0; i < n; i++) {
        if (!d[i].path || !*d[i].path) return qerr_set(e, "%s: %s[%d]: missing required key \"path\"", src, key, i);
        if (!d[i].type) return qerr_set(e, "%s: %s[%d]: missing required key \"type\" (one of %s)", src, key, i, list);
        if (enum_index(V_DSTYPE, d[i].type) < 0)
            return qerr_set(e, "%s: %s[%d].type: expected one of %s, got \"%s\"", src, key, i, list, d[i].type);
        if (!d[i].field || !*d[i].field)
            return qerr_set(e, "%s: %s[%d].field: expected a non-empty string", src, key, i);
        if (!d[i].field_messages || !*d[i].field_messages)
            return qerr_set(e, "%s: %s[%d].field_messages: expected a non-empty string", src, key, i);
    }
    return 0;
}

const char *train_config_source(const train_config *c, const char *key, int *line, char *buf, size_t n) {
    const key_spec *k = find_key(key);
    if (k && k->alias_of) k = find_key(k->alias_of);
    int o = k ? c->key_origin[k - KEYS] : 0;
    if (line) *line = o > 0 ? o : 0;
    if (o < 0 && -1 - o < c->n_overrides) {
        const char *ov = c->overrides[-1 - o];
        if (strlen(ov) > 80)
            snprintf(buf, n, "command line (%.77s...)", ov);
        else
            snprintf(buf, n, "command line (%s)", ov);
    } else {
        snprintf(buf, n, "%s", c->config_path ? c->config_path : "config");
    }
    return buf;
}

/* Where a key's value came from, as validate's messages show it: "<source>: key: ...<at>". */
typedef struct where {
    char src[128];
    char at[32]; /* " (line N)" or "" */
} where;

static const where *where_of(const train_config *c, const char *key, where *w) {
    int line;
    train_config_source(c, key, &line, w->src, sizeof w->src);
    w->at[0] = 0;
    if (line > 0) snprintf(w->at, sizeof w->at, " (line %d)", line);
    return w;
}

/* Two keys that cannot go together: the message names the later setting (an override beats the file,
 * a later override an earlier one), and the file lines of both. */
static int conflict(const train_config *c, qerr *e, const char *ka, const char *kb, const char *msg) {
    int oa = c->key_origin[find_key(ka) - KEYS], ob = c->key_origin[find_key(kb) - KEYS];
    const char *blame = ob < 0 && (oa >= 0 || ob < oa) ? kb : ka;
    where w;
    where_of(c, blame, &w);
    char tail[96] = "";
    const char *names[2] = {ka, kb};
    int origins[2] = {oa, ob};
    for (int i = 0; i < 2; i++) {
        size_t l = strlen(tail);
        if (origins[i] > 0)
            snprintf(tail + l, sizeof tail - l, "%s%s: line %d", l ? ", " : " (", names[i], origins[i]);
        else if (origins[i] < 0 && names[i] != blame)
            snprintf(tail + l, sizeof tail - l, "%s%s: command line", l ? ", " : " (", names[i]);
    }
    if (tail[0]) strncat(tail, ")", sizeof tail - strlen(tail) - 1);
    return qerr_set(e, "%s: %s%s", w.src, msg, tail);
}

int train_config_validate(const train_config *c, qerr *e) {
    char list[256], num[64];
    where w;
    if (!c->base_model || !*c->base_model)
        return qerr_set(e, "%s: missing required key \"base_model\" (a .gguf file or a Hugging Face model directory)",
                        where_of(c, "base_model", &w)->src);
    if (c->n_datasets < 1) {
        where_of(c, "datasets", &w);
        return qerr_set(e, "%s: missing required key \"datasets\" (a list of {path, type} entries)%s", w.src, w.at);
    }
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &KEYS[i];
        if (k->alias_of) continue;
        where_of(c, k->name, &w);
        const char *src = w.src, *at = w.at;
        switch (k->kind) {
        case K_STR: {
            const char *s = *CFIELD(c, k->off, char *);
            if (!s && (k->flags & F_OPTIONAL)) break;
            if (!s || !*s) return qerr_set(e, "%s: %s: expected %s%s", src, k->name, k->expect, at);
            break;
        }
        case K_ENUM: {
            const char *s = *CFIELD(c, k->off, char *);
            join_values(list, sizeof list, k->values);
            if (!s || enum_index(k->values, s) < 0)
                return qerr_set(e, "%s: %s: expected one of %s, got \"%s\"%s", src, k->name, list, s ? s : "null", at);
            break;
        }
        case K_BOOL:
        case K_BF16: {
            int b = *CFIELD(c, k->off, int);
            if (b != 0 && b != 1) return qerr_set(e, "%s: %s: expected true or false, got %d%s", src, k->name, b, at);
            break;
        }
        case K_INT: {
            int x = *CFIELD(c, k->off, int);
            if (!range_ok(k, x)) return qerr_set(e, "%s: %s: expected %s, got %d%s", src, k->name, k->expect, x, at);
            break;
        }
        case K_FLOAT:
        case K_DOUBLE: {
            double x = k->kind == K_FLOAT ? (double)*CFIELD(c, k->off, float) : *CFIELD(c, k->off, double);
            if (!isfinite(x) || !range_ok(k, x)) {
                fmt_shortest(num, sizeof num, x, k->kind == K_FLOAT);
                return qerr_set(e, "%s: %s: expected %s, got %s%s", src, k->name, k->expect, num, at);
            }
            break;
        }
        case K_MODULES: {
            char *const *m = *CFIELD(c, k->off, strv_t);
            int n = *CFIELD(c, k->off_n, int);
            join_values(list, sizeof list, module_values());
            for (int j = 0; j < n; j++) {
                if (!m[j] || enum_index(module_values(), m[j]) < 0)
                    return qerr_set(e, "%s: %s[%d]: expected one of %s, got \"%s\"%s", src, k->name, j, list,
                                    m[j] ? m[j] : "null", at);
                for (int q = 0; q < j; q++)
                    if (!strcmp(m[q], m[j]))
                        return qerr_set(e, "%s: %s: \"%s\" is listed twice%s", src, k->name, m[j], at);
            }
            break;
        }
        case K_DATASETS:
            if (check_datasets(src, k->name, *CFIELD(c, k->off, dataset_cfg *), *CFIELD(c, k->off_n, int), e))
                return -1;
            break;
        }
    }
    if (!strcmp(c->adapter, "qlora") && !c->load_in_4bit)
        return conflict(c, e, "adapter", "load_in_4bit",
                        "adapter: \"qlora\" requires load_in_4bit: true (use adapter: lora to keep the base in bf16)");
    if (train_config_target_mask(c) == 0) {
        char msg[400];
        join_values(list, sizeof list, module_values());
        snprintf(msg, sizeof msg,
                 "lora_target_modules: no LoRA target; list some of %s, or set lora_target_linear: true", list);
        return conflict(c, e, "lora_target_modules", "lora_target_linear", msg);
    }
    if (c->warmup_steps > 0 && c->warmup_ratio > 0)
        return conflict(c, e, "warmup_steps", "warmup_ratio",
                        "warmup_steps and warmup_ratio are both set; use one of them");
    if (c->val_set_size > 0 && c->n_test_datasets > 0)
        return conflict(c, e, "val_set_size", "test_datasets",
                        "val_set_size and test_datasets are both set; use one held-out source");
    if (c->eval_steps > 0 && c->evals_per_epoch > 0)
        return conflict(c, e, "eval_steps", "evals_per_epoch",
                        "eval_steps and evals_per_epoch are both set; use one of them");
    if (c->save_steps > 0 && c->saves_per_epoch > 0)
        return conflict(c, e, "save_steps", "saves_per_epoch",
                        "save_steps and saves_per_epoch are both set; use one of them");
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Public: write                                                              */

/* YAML double-quoted scalar (escapes \ " and control bytes; UTF-8 passes). */
static void put_yaml_str(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *q = (const unsigned char *)s; *q; q++) {
        switch (*q) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\t': fputs("\\t", f); break;
        case '\r': fputs("\\r", f); break;
        default:
            if (*q < 0x20 || *q == 0x7f)
                fprintf(f, "\\x%02x", *q);
            else
                fputc(*q, f);
        }
    }
    fputc('"', f);
}

static void put_datasets(FILE *f, const char *key, const dataset_cfg *d, int n) {
    if (n == 0) {
        fprintf(f, "%s: []\n", key);
        return;
    }
    fprintf(f, "%s:\n", key);
    for (int i = 0; i < n; i++) {
        const char *names[4] = {"path", "type", "field", "field_messages"};
        const char *vals[4] = {d[i].path, d[i].type, d[i].field, d[i].field_messages};
        for (int j = 0; j < 4; j++) {
            fprintf(f, "  %s %s: ", j ? " " : "-", names[j]);
            if (vals[j])
                put_yaml_str(f, vals[j]);
            else
                fputs("null", f);
            fputc('\n', f);
        }
    }
}

int train_config_write_yaml(const train_config *c, const char *path, qerr *e) {
    /* printed into memory, then written in one piece by core/file */
    char *text = NULL;
    size_t text_len = 0;
    FILE *f = open_memstream(&text, &text_len);
    if (!f) return qerr_set(e, "out of memory writing %s", path);
    char num[64];
    fprintf(f, "# Resolved qlora-train configuration: every key with its final value.\n");
    if (c->config_path) {
        fputs("# Loaded from: ", f);
        for (const char *q = c->config_path; *q; q++) fputc(*q == '\n' ? ' ' : *q, f);
        fputc('\n', f);
    }
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &KEYS[i];
        if (k->alias_of) continue;
        switch (k->kind) {
        case K_STR:
        case K_ENUM: {
            const char *s = *CFIELD(c, k->off, char *);
            if (!s && !(k->flags & F_OPTIONAL)) {
                /* never set (a required key of a config that has not been validated): null would be refused
                 * on reading, and an absent key reads back as this same unset state */
                fprintf(f, "# %s: not set\n", k->name);
                break;
            }
            fprintf(f, "%s: ", k->name);
            if (s)
                put_yaml_str(f, s);
            else
                fputs("null", f);
            fputc('\n', f);
            break;
        }
        case K_BOOL:
        case K_BF16:
            fprintf(f, "%s: %s\n", k->name, *CFIELD(c, k->off, int) ? "true" : "false");
            break;
        case K_INT:
            fprintf(f, "%s: %d\n", k->name, *CFIELD(c, k->off, int));
            break;
        case K_FLOAT:
            fmt_shortest(num, sizeof num, (double)*CFIELD(c, k->off, float), 1);
            fprintf(f, "%s: %s\n", k->name, num);
            break;
        case K_DOUBLE:
            fmt_shortest(num, sizeof num, *CFIELD(c, k->off, double), 0);
            fprintf(f, "%s: %s\n", k->name, num);
            break;
        case K_MODULES: {
            char *const *m = *CFIELD(c, k->off, strv_t);
            int cnt = *CFIELD(c, k->off_n, int);
            fprintf(f, "%s: [", k->name);
            for (int j = 0; j < cnt; j++) {
                if (j) fputs(", ", f);
                put_yaml_str(f, m[j]);
            }
            fputs("]\n", f);
            break;
        }
        case K_DATASETS:
            put_datasets(f, k->name, *CFIELD(c, k->off, dataset_cfg *), *CFIELD(c, k->off_n, int));
            break;
        }
    }
    int bad = ferror(f);
    if (fclose(f)) bad = 1;
    int rc = bad ? qerr_set(e, "out of memory writing %s", path) : file_write_atomic(path, text, text_len, e);
    free(text);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Public: derived values                                                     */

unsigned train_config_target_mask(const train_config *c) {
    unsigned m = 0;
    if (c->lora_target_linear) m = (1u << LLAMA_N_LINEAR) - 1u;
    for (int i = 0; i < c->n_lora_target_modules; i++) {
        const char *name = c->lora_target_modules[i];
        int k = name ? llama_linear_from_peft(name, strlen(name)) : -1;
        if (k >= 0) m |= 1u << k;
    }
    return m;
}

int train_config_eval_interval(const train_config *c, int steps_per_epoch) {
    if (c->eval_steps > 0) return c->eval_steps;
    if (c->evals_per_epoch > 0) {
        int k = steps_per_epoch / c->evals_per_epoch;
        return k > 1 ? k : 1;
    }
    return 0;
}

int train_config_save_interval(const train_config *c, int steps_per_epoch) {
    if (c->save_steps > 0) return c->save_steps;
    if (c->saves_per_epoch > 0) {
        int k = steps_per_epoch / c->saves_per_epoch;
        return k > 1 ? k : 1;
    }
    return 500;
}

int train_config_warmup_steps(const train_config *c, int total_steps) {
    if (c->warmup_steps > 0) return c->warmup_steps;
    if (c->warmup_ratio > 0 && total_steps > 0) return (int)ceil((double)c->warmup_ratio * (double)total_steps);
    return 0;
}
