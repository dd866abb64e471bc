/* trainer/config.h — the training configuration: YAML with axolotl's key names.
 *
 * A config file is one YAML mapping (libyaml document API). Keys, meanings and
 * most defaults follow axolotl (src/axolotl/utils/schemas/{config,peft,training,
 * datasets}.py), so an axolotl example config mostly runs after deleting the
 * lines this trainer does not implement. Values may be overridden on the
 * command line with `key=value`, where value is any YAML flow value:
 *   lora_r=16   lora_target_modules=[q_proj,v_proj]
 *   datasets=[{path: train.jsonl, type: completion}]
 *
 * Typical use:
 *   train_config c;
 *   if (train_config_load(path, &c, &e)) fail(e);             // c is freshly filled
 *   for each argv override: train_config_apply_override(&c, arg, &e)
 *   if (train_config_validate(&c, &e)) fail(e);
 *   for (i < c.n_warnings) print c.warnings[i]
 *   ...; train_config_write_yaml(&c, "<output_dir>/config.resolved.yaml", &e);
 *   train_config_free(&c);
 *
 * Key policy — there is no silent acceptance:
 *  - Implemented keys: every field of train_config below (YAML key = field name,
 *    except `use_rslora`, whose axolotl key is `peft_use_rslora`; the PEFT
 *    spelling `use_rslora` is accepted as an alias).
 *    An empty value (`key:` in the file, `key=` on the command line, or `null`)
 *    is refused naming the key, because a value that went missing (an unset
 *    shell variable, a half-edited line) must not silently become the
 *    default (`learning_rate=` used to train at 2e-4, `max_steps=` a whole
 *    epoch). Three keys keep null as their documented "none":
 *    resume_from_checkpoint (none = the newest checkpoint in output_dir),
 *    test_datasets (none = no separate held-out set) and lora_target_modules
 *    (none = no listed module; axolotl's examples leave it empty beside
 *    lora_target_linear: true). Delete a line to get a key's default.
 *  - Every other key of axolotl's schema has its decision in trainer/config_axolotl.c
 *    (README "Coming from axolotl"): accepted with a warning in `warnings` when given a
 *    value (null/false/0/empty gives none) because it cannot change what this trainer
 *    computes (strict, model_type, attention kernels, logging, ...); or accepted only
 *    when null/false/0/empty ("off" by axolotl's own truthiness tests, and how axolotl's
 *    example files list them) and otherwise refused with its reason. Values checked
 *    here: chat_template (tokenizer_default, axolotl's templates qlora renders exactly,
 *    jinja; other names refused by name with the reason), special_tokens (pad_token ignored;
 *    bos/eos/unk must be the model's own: train_config_check_special_tokens), eot_tokens
 *    (checked against the template when the data is read),
 *    plugins (the liger and cut_cross_entropy plugins only), gradient_checkpointing:
 *    offload (= true here).
 *  - A file is read whole: every refused key is listed with its line
 *    (train_config_load_all); a file without `adapter:` (axolotl's full fine-tune) is
 *    refused for that first, and validate refuses a config whose adapter was never set.
 *  - Anything else is an error `unknown key "x"; did you mean "y"?`.
 *
 * Decisions (differences from axolotl noted):
 *  - sample_packing defaults to false, as in axolotl.
 *  - lora_dropout defaults to 0.05 (axolotl: 0.0; every axolotl example sets it).
 *  - load_in_4bit defaults to true (axolotl: false) because QLoRA is the product.
 *    `adapter: lora` + `load_in_4bit: true` is the same computation as qlora;
 *    `adapter: qlora` requires load_in_4bit (as axolotl); `adapter: lora` +
 *    `load_in_4bit: false` keeps the frozen base in bf16.
 *  - load_in_8bit: true (with adapter: lora) holds the frozen base as
 *    bitsandbytes' Int8Params (quant/int8.h) and dequantizes it per layer;
 *    load_in_4bit then defaults to false; both true is refused.
 *  - optimizer: "adamw" | "sophia"; the aliases adamw_torch, adamw_torch_fused
 *    (axolotl's default) and paged_adamw_32bit resolve to "adamw" (paging is a
 *    CUDA memory feature, the update is identical; a warning says so for the
 *    paged one); "sophiag" resolves to "sophia"; "adamw_8bit" is bitsandbytes'
 *    8-bit AdamW (optim/adamw8bit.h), with the aliases adamw_bnb_8bit and
 *    paged_adamw_8bit (HF Trainer's names for the same bnb optimizer). Other
 *    optimizers are refused with the reason. The field always holds the resolved name.
 *  - Sophia (SophiaG, optim/sophia.h; ours, named after the official code):
 *    sophia_beta1 / sophia_beta2 (0.965 / 0.99), sophia_rho (0.04), sophia_k
 *    (10: Hessian update after every k-th step), sophia_bs (0 = the number of
 *    target tokens of each optimizer step, the official total_bs·block_size;
 *    > 0 a fixed value) — the official defaults. learning_rate, weight_decay
 *    (decoupled, the same formula as AdamW's; default 0.0, official Sophia
 *    0.1) and max_grad_norm (also applied to the Hessian-estimate gradient, as
 *    train_sophiag.py does) are shared with AdamW; adam_* apply to AdamW only.
 *  - lr_scheduler: cosine | linear | constant (+ alias constant_with_warmup).
 *    Warmup (warmup_steps or warmup_ratio) applies to every schedule, so
 *    "constant" is HF's constant_with_warmup.
 *  - eval_max_tokens (ours): cap on held-out tokens per evaluation, 0 = all.
 *  - evals_per_epoch (axolotl): alternative to eval_steps; see
 *    train_config_eval_interval(). The two are mutually exclusive.
 *  - num_threads (ours): 0 = OMP_NUM_THREADS, else all cores.
 *  - memory_check (ours): refuse a run whose predicted peak memory exceeds the machine's.
 *  - Checkpoints: save_steps / saves_per_epoch / save_total_limit /
 *    resume_from_checkpoint / auto_resume_from_checkpoints as axolotl and HF,
 *    except that resuming from the newest checkpoint in output_dir is the
 *    default (auto_resume_from_checkpoints: true). max_nan_steps and
 *    skip_bad_lines are ours.
 *  - max_grad_norm 0 disables clipping (as HF).
 *  - bf16: true | false | auto (= true). fp16: true (axolotl's) = fp16 GEMM operands with fp32
 *    accumulation and a GradScaler (README "fp16"); with bf16: true refused, bf16: auto yields to it.
 *  - device: auto | cpu | cuda (qlora's own key). auto: cuda when the binary has the CUDA backend
 *    and a device is present, else cpu; the choice is logged (trainer/run.c setup_device); an
 *    explicit QLORA_BACKEND wins over auto. device: cuda without the backend or a device is refused.
 *  - Booleans: true/false, yes/no, on/off (YAML 1.1 as PyYAML), and 1/0.
 *  - Numbers may be quoted ("2e-4") and floats may omit the dot (2e-4), which
 *    PyYAML would read as a string but axolotl converts anyway.
 *  - Input limits: a config file is a regular file of at most 1 MiB
 *    (TRAIN_CONFIG_MAX_BYTES) whose collections nest at most 64 deep
 *    (TRAIN_CONFIG_MAX_DEPTH), with at most 256 anchors and aliases
 *    (TRAIN_CONFIG_MAX_ANCHORS); an override value has the same depth and
 *    anchor limits. Checked before libyaml builds the document, whose scanner
 *    is quadratic in the nesting depth ("[[[[…" of 400 KB took minutes).
 *  - Paths (base_model, dataset paths, output_dir) are kept verbatim, relative
 *    to the working directory as in axolotl. This module never touches them:
 *    the caller reports missing or unreadable files.
 */
#ifndef QLORA_TRAINER_CONFIG_H
#define QLORA_TRAINER_CONFIG_H

#include "core/status.h"

#define TRAIN_CONFIG_MAX_BYTES (1u << 20) /* a config file's size limit */
#define TRAIN_CONFIG_MAX_DEPTH 64         /* nesting of collections */
#define TRAIN_CONFIG_MAX_ANCHORS 256      /* anchors + aliases (libyaml resolves each in linear time) */
#define TRAIN_CONFIG_MAX_KEYS 96          /* rows of the key table in trainer/config.c */

typedef struct dataset_cfg {
    char *path;           /* JSONL file (required) */
    char *type;           /* "completion" | "alpaca" | "chat_template" (required) */
    char *field;          /* completion: JSON key holding the text; default "text" */
    char *field_messages; /* chat_template: JSON key holding the message list; default "messages" */
    /* axolotl's dataset keys beyond those (README "Coming from axolotl"; data/dataset.h) */
    char *message_field_role;    /* chat_template: a message's role key (message_property_mappings.role); "role" */
    char *message_field_content; /* chat_template: a message's content key; default "content" */
    char **roles_to_train;       /* chat_template: roles whose content is trained on; default [assistant] */
    int n_roles_to_train;
    char *train_on_eos;          /* chat_template: "turn" (default) | "all" | "last" | "none" */
    char *train_on_eot;          /* chat_template: the same values for eot_tokens; NULL = as train_on_eos */
    int drop_system_message;     /* chat_template: drop a leading system message; default 0 */
    char *split;                 /* "train" (default: every record) or a slice: train[:N], train[:N%], train[A:B] */
    char *data_files;            /* NULL, or the file to read (joined to path when path is a directory) */
    char *chat_template;         /* NULL = the top-level chat_template; else one of its values */
    char *chat_template_jinja;   /* with chat_template: jinja; NULL = none */
} dataset_cfg;

/* Every char* is heap-owned (or NULL) and released by train_config_free. */
typedef struct train_config {
    char *base_model;                 /* path to the .gguf (required) */
    int load_in_4bit;                 /* default 1: frozen base held as NF4 */
    int load_in_8bit;                 /* default 0; 1: frozen base held as bitsandbytes int8 (then
                                       * load_in_4bit follows as 0 unless given; both true is refused) */
    int bnb_4bit_use_double_quant;    /* default 1 */
    char *bnb_4bit_quant_type;        /* only "nf4" */
    char *adapter;                    /* "qlora" (default) | "lora"; see the header comment */
    int lora_r;                       /* default 8, > 0 */
    float lora_alpha;                 /* default 16, > 0 */
    float lora_dropout;               /* default 0.05, in [0, 1) */
    int use_rslora;                   /* key peft_use_rslora (alias use_rslora); default 0:
                                         scaling alpha/r, 1: alpha/sqrt(r) */
    char **lora_target_modules;       /* PEFT names of model/llama_linear.h, no duplicates */
    int n_lora_target_modules;
    int lora_target_linear;           /* default 0; 1 adds all 7 linears to the list */
    char **lora_modules_to_save;      /* PEFT modules_to_save: "embed_tokens", "lm_head" (trainable copies) */
    int n_lora_modules_to_save;
    dataset_cfg *datasets;            /* required, >= 1 */
    int n_datasets;
    dataset_cfg *test_datasets;       /* optional held-out set (excludes val_set_size > 0) */
    int n_test_datasets;
    double val_set_size;              /* fraction in [0,1) or whole count >= 1; default 0 */
    int sequence_len;                 /* default 512, >= 2 (tokens) */
    int sample_packing;               /* default 0 (axolotl's default) */
    int sample_packing_sequentially;  /* default 0; 1: next-fit packing in order (axolotl's) */
    int curriculum_sampling;          /* default 0; 1: no shuffle, rows in file order every epoch */
    char *pretraining_path;           /* axolotl's pretraining_dataset[0]: the JSON lines file (path, joined
                                         with data_files when path is a directory); NULL = none */
    char *pretraining_text_column;    /* its text_column; NULL = "text" */
    long long pretraining_skip;       /* its skip: records dropped at the start of every pass */
    int streaming;                    /* axolotl's streaming: true (implied by pretraining_dataset) */
    int streaming_multipack_buffer_size; /* default 10000: records packed together (pretraining_dataset) */
    int pretrain_multipack_attn;      /* default 1: attention stays inside each packed window */
    int micro_batch_size;             /* default 1 (sequences per forward) */
    int gradient_accumulation_steps;  /* default 1 */
    int num_epochs;                   /* default 1 */
    int max_steps;                    /* default -1 = derived from num_epochs; else >= 1
                                         optimizer steps (then num_epochs is ignored) */
    float learning_rate;              /* default 2e-4, > 0 */
    char *lr_scheduler;               /* "cosine" (default) | "linear" | "constant" */
    int warmup_steps;                 /* default 0 */
    float warmup_ratio;               /* default 0, in [0,1); exclusive with warmup_steps > 0 */
    float weight_decay;               /* default 0.0 (decoupled, AdamW) */
    float max_grad_norm;              /* default 1.0; 0 = no clipping */
    char *optimizer;                  /* "adamw" | "sophia" | "adamw_8bit" (resolved; see aliases above) */
    float adam_beta1, adam_beta2, adam_epsilon; /* 0.9, 0.999, 1e-8 */
    float sophia_beta1, sophia_beta2; /* 0.965, 0.99: momentum, Hessian EMA (optimizer: sophia) */
    float sophia_rho;                 /* 0.04: clipping scale rho, > 0 */
    int sophia_k;                     /* 10: Hessian estimate after every k-th optimizer step */
    int sophia_bs;                    /* 0: bs = target tokens of each step; > 0: fixed bs */
    int seed;                         /* default 42, >= 0 */
    char *output_dir;                 /* default "./outputs/lora-out" */
    int logging_steps;                /* default 1 (optimizer steps between train log lines) */
    int eval_steps;                   /* default 0 = evaluate only at start and end;
                                         > 0: every N optimizer steps */
    int evals_per_epoch;              /* default 0 = unused; see train_config_eval_interval */
    int eval_max_tokens;              /* default 0 = evaluate all held-out tokens */
    int train_on_inputs;              /* default 0: prompt tokens are masked from the loss */
    int bf16;                         /* default 1 ("auto" = 1); 0 = fp32 compute */
    int bf16_auto;                    /* 1: bf16 was "auto" (or not given): fp16: true may take the mode */
    int fp16;                         /* default 0; 1: axolotl's fp16: true — GEMM operands rounded to fp16
                                         (fp32 accumulation, fp32 activations), frozen weights as float16, and
                                         dynamic loss scaling (torch.amp.GradScaler's rules, trainer/step.c);
                                         bf16: true with it is refused; bf16 auto/unset yields to it. CPU only */
    char *device;                     /* "auto" (default) | "cpu" | "cuda": where the step runs; auto = cuda
                                         when the binary has the backend and a device is present, else cpu
                                         (trainer/run.c setup_device; README "GPU") */
    int gradient_checkpointing;       /* default 1; 0 off, 1 full, 2 selective, 3 offload (LLAMA_CKPT_*, model/llama.h) */
    int selective_checkpointing;      /* axolotl's SAC (save: [attention]) was asked for: it runs as
                                         gradient_checkpointing 2 and requires gradient_checkpointing */
    int num_threads;                  /* default 0 = OMP_NUM_THREADS / all cores */
    /* checkpoints and faults (README "Checkpoints, resume and faults") */
    int save_steps;                   /* default 0 = unset; > 0: checkpoint every N optimizer steps
                                         (see train_config_save_interval) */
    int saves_per_epoch;              /* default 0 = unset (axolotl); exclusive with save_steps */
    int save_total_limit;             /* default 0 = keep every checkpoint; N > 0 keeps the newest N */
    char *resume_from_checkpoint;     /* default NULL = the newest complete checkpoint in output_dir;
                                         else a checkpoint-<step> directory to resume from */
    int auto_resume_from_checkpoints; /* default 1: re-running resumes; 0: refuse to start over
                                         checkpoints already in output_dir */
    int max_nan_steps;                /* default 5: abort after this many optimizer steps in a row
                                         with NaN/Inf loss or gradients (each one is skipped) */
    int skip_bad_lines;               /* default 0: a malformed JSONL line is an error naming file
                                         and line; 1: skip it and count it */
    int memory_check;                 /* default 1: refuse a run whose predicted peak memory
                                         (trainer/memplan.h) exceeds the machine's; 0: run anyway */
    /* axolotl keys (README "Coming from axolotl", trainer/config_axolotl.h) */
    int data_seed;                    /* default -1 = seed: the data order and held-out split */
    float loss_watchdog_threshold;    /* default 0 = off; > 0: stop (with a checkpoint) when the
                                         training loss stays above it for loss_watchdog_patience steps */
    int loss_watchdog_patience;       /* default 3 (axolotl): optimizer steps in a row */
    char *chat_template;              /* "tokenizer_default" (default), one of axolotl's template names
                                         qlora renders (chatml, qwen_25, llama3, mistral_v1, ...; data/chat.h),
                                         "jinja", or tokenizer_default_fallback_{chatml,llama3} */
    char *chat_template_jinja;        /* chat_template: jinja: a template text (or file) qlora recognises */
    char **eot_tokens;                /* axolotl's eot_tokens; NULL = its default [eos_token] */
    int n_eot_tokens;
    char **unfrozen_parameters;       /* axolotl's regex patterns (trainer/unfreeze.h decides them once the
                                         model is loaded); NULL = not given */
    int n_unfrozen_parameters;
    char *special_bos, *special_eos, *special_unk; /* special_tokens: must equal the model's own
                                         (train_config_check_special_tokens); NULL = not given */
    /* ---- several processes (README "Several processes"; trainer/train.h train_run_comm) ---- */
    int ddp_timeout;                  /* default 1800 (HF TrainingArguments): seconds one collective may
                                         take before the job is aborted */
    int fsdp_no_shard;                /* default 0; 1: fsdp / fsdp_config asked for NO_SHARD (data
                                         parallel, the only strategy implemented; every other one is
                                         refused at load) */
    int fsdp_shard_grad_op;           /* default 0; 1: fsdp / fsdp_config asked for SHARD_GRAD_OP (gradients
                                         reduce-scattered, optimizer state and update on each rank's
                                         shard); 2: the same from DeepSpeed zero_optimization.stage 2 */
    int fsdp_full_shard;              /* default 0; 1: fsdp / fsdp_config asked for FULL_SHARD (as
                                         SHARD_GRAD_OP, and the frozen base sharded over the ranks and
                                         gathered per layer, model/llama_fsdp.h); 2: the same from
                                         DeepSpeed zero_optimization.stage 3 */
    int fsdp_state_dict_type;         /* fsdp_config.fsdp_state_dict_type: 0 not given = the strategy's
                                         default (SHARDED_STATE_DICT for SHARD_GRAD_OP and FULL_SHARD, else
                                         FULL_STATE_DICT: train_config_sharded_state_dict); 1
                                         FULL_STATE_DICT (one state.h5 written by rank 0); 2
                                         SHARDED_STATE_DICT (one shard file per rank) */
    int fsdp_offload_params;          /* default 0; 1: fsdp_config.fsdp_offload_params: true or fsdp: [..., offload]:
                                         parameters, gradients and optimizer state in host memory — where CPU
                                         ranks keep them anyway (accepted with a [config] line); refused on
                                         device cuda (trainer/run.c setup_device) until implemented */
    char *deepspeed;                  /* default NULL; a DeepSpeed JSON whose zero_optimization.stage is 0,
                                         2 or 3 (stage 1 is refused at load) */
    /* ---- end of several processes ---- */
    char *config_path;                /* file the config came from (for messages); NULL if none */
    char **warnings;                  /* one-line notes for the caller to print ("[config] ..."
                                         is the caller's prefix); ignored keys, aliases */
    int n_warnings;
    /* where each implemented key's value came from, for messages (train_config_source);
       indexed by the key's row in trainer/config.c: > 0 a line of config_path, 0 the default,
       < 0 the command-line override overrides[-1 - v] */
    int key_origin[TRAIN_CONFIG_MAX_KEYS];
    char **overrides;                 /* the key=value overrides applied, in order */
    int n_overrides;
} train_config;

/* Every key refused by train_config_load_all: one line each ("x.yaml: key: why (line N)"). */
typedef struct train_config_refusals {
    char **lines;
    int n;
} train_config_refusals;

/* Release the lines of *r and zero it. */
void train_config_refusals_free(train_config_refusals *r);

/* Fill *c with the defaults above (all strings heap-allocated; base_model and
 * datasets empty). Does not free previous contents. Returns 0, or -1 if out of
 * memory (then *c is safe to pass to train_config_free). */
int train_config_defaults(train_config *c);

/* Parse the YAML file `path` into *out (previous contents are NOT freed; out
 * is fully initialised, defaults first). Checks syntax, key names, value types
 * and per-key ranges; cross-key rules and required keys are left to
 * train_config_validate, because command-line overrides come in between.
 * Errors (one line): "<path>: is a directory, expected a YAML file" (also a
 * FIFO, a device, ...), "<path>: 2097152 bytes, more than the 1048576-byte (1 MiB) limit of a
 * config file", "<path>: nested deeper than 64 levels, the limit of a config
 * (line 1)", "<path>: learning_rate: no value; expected a positive number
 * (delete the line for the default, 0.0002) (line 3)",
 * "<path>:<line>:<col>: YAML syntax error: ...",
 * "<path>: unknown key \"lora_rank\"; did you mean \"lora_r\"? (line 7)",
 * "<path>: lora_r: expected a positive integer, got \"abc\" (line 7)",
 * "<path>: fp16: refused: <why>; delete the line, or leave it empty (line 9)", "cannot open <path>: ...".
 * On failure *out holds nothing that needs freeing (it is zeroed). */
int train_config_load(const char *path, train_config *out, qerr *e);

/* train_config_load, but a file with refused keys is reported whole: every refused key (and every
 * refused key of a datasets entry) gets its line in r->lines, in file order, except that a file
 * without `adapter:` (axolotl's full fine-tune) has that reason first; e then says how many
 * ("x.yaml: 3 refused keys (each listed above)"), or holds the one line when there is one. Errors
 * that end the reading (YAML syntax, limits, not a mapping) come alone, in e, as from
 * train_config_load. r is filled (or zeroed) in every case; free it with train_config_refusals_free. */
int train_config_load_all(const char *path, train_config *out, train_config_refusals *r, qerr *e);

/* The model's own special tokens against `special_tokens` of the config: each of bos_token,
 * eos_token, unk_token that the config gives must be the text of the model's id (axolotl would add
 * or replace a token, which changes the vocabulary). bos/eos/unk: the model's ids (-1 = none), text:
 * returns the text of an id (NULL if none). Error: "special_tokens.eos_token: "</s>" is not this
 * model's eos token ("<|im_end|>"); delete it (the model's own is used)". */
int train_config_check_special_tokens(const train_config *c, int bos, int eos, int unk,
                                      const char *(*text)(const void *ctx, int id), const void *ctx, qerr *e);

/* The seed of the data order and held-out split: data_seed if >= 0, else seed. */
unsigned long long train_config_data_seed(const train_config *c);

/* dataset_build's `sample_packing` argument (data/dataset.h DATASET_PACK_* bits) from
 * sample_packing, sample_packing_sequentially and curriculum_sampling. */
int train_config_pack_mode(const train_config *c);

/* The data/dataset.h specs of datasets (test = 0) or test_datasets (test = 1): every field of each
 * entry, with the file resolved (data_files, joined to path when path is a directory), the
 * top-level chat_template where the entry has none, skip_bad_lines. *out gets a malloc'd array of
 * *n specs (at least one slot) whose path strings are malloc'd; free with
 * train_config_dataset_specs_free. Error: out of memory. */
struct dataset_spec;
int train_config_dataset_specs(const train_config *c, int test, struct dataset_spec **out, int *n, qerr *e);
void train_config_dataset_specs_free(struct dataset_spec *s, int n);

/* Apply one command-line override "key=value"; value is parsed as a YAML
 * scalar or flow collection. The same key rules as in a file apply (an empty
 * value is refused where the file refuses it); errors are prefixed
 * "command line: ". The override is remembered for later messages about the
 * key (train_config_source). On failure *c is unchanged. */
int train_config_apply_override(train_config *c, const char *key_eq_value, qerr *e);

/* Check required keys, every range, and the cross-key rules (qlora needs
 * load_in_4bit, at least one LoRA target, warmup_steps vs warmup_ratio,
 * val_set_size vs test_datasets, eval_steps vs evals_per_epoch, ...).
 * Messages name where the value came from (train_config_source) and the key:
 * "x.yaml: lora_r: expected ... (line 7)", "command line (warmup_steps=5):
 * warmup_steps and warmup_ratio are both set; ... (warmup_ratio: line 9)". */
int train_config_validate(const train_config *c, qerr *e);

/* Where the value of `key` (an implemented key, any spelling) came from, for a
 * message about it: "command line (key=value)" (the override, shortened to 80
 * bytes) if an override set it, else config_path (or "config"). *line gets the
 * line in config_path (0: an override or the default). Writes into buf (n
 * bytes) and returns buf. */
const char *train_config_source(const train_config *c, const char *key, int *line, char *buf, size_t n);

/* Write the resolved config (every implemented key with its final value) as
 * YAML that train_config_load reads back to an identical struct (floats are
 * written in their shortest round-trip form). Written to path.tmp, then renamed. */
int train_config_write_yaml(const train_config *c, const char *path, qerr *e);

/* Release everything owned by *c and zero it. Safe on a zeroed struct. */
void train_config_free(train_config *c);

/* How qlora-export / qlora-generate hold the frozen base: a LLAMA_BASE_* value (model/llama.h: 0 bf16,
 * 1 NF4, 2 int8) in *base, from their flags --load-in-4bit / --load-in-8bit (0, 1, or -1 when not given)
 * over the run's config c (NULL when there is none), as train_config does with the keys: --load-in-8bit 1
 * is int8; a given --load-in-4bit is NF4 or bf16; else the config's choice (load_in_8bit: int8, or NF4 with
 * --load-in-8bit 0 as the override load_in_8bit=false gives; else load_in_4bit), else NF4. Error: both flags 1 (one line naming both). */
int train_config_base_choice(int flag_4bit, int flag_8bit, const train_config *c, int *base, qerr *e);

/* Bit k set <=> module LLAMA_Q + k (model/llama_linear.h, whose order
 * contract this is) gets a LoRA adapter: the union of lora_target_modules and,
 * if lora_target_linear, all seven. */
unsigned train_config_target_mask(const train_config *c);

/* save[0] (embed_tokens) and save[1] (lm_head): 1 when lora_modules_to_save lists it (the
 * LORA_SAVE_EMBED / LORA_SAVE_LM_HEAD order of model/llama.h). */
void train_config_modules_to_save(const train_config *c, int save[2]);

/* Whether checkpoints use the sharded layout (trainer/checkpoint.h ckpt_save_sharded): an explicit
 * fsdp_state_dict_type, else SHARDED_STATE_DICT for the sharded strategies (SHARD_GRAD_OP and
 * FULL_SHARD; each rank holds only its interval of the optimizer state, so each writes it, as
 * accelerate's FSDP2 default)
 * and FULL_STATE_DICT otherwise (one process, NO_SHARD: one state.h5, as before). */
int train_config_sharded_state_dict(const train_config *c);

/* Evaluation interval in optimizer steps: eval_steps if > 0; else, if
 * evals_per_epoch > 0, max(1, steps_per_epoch / evals_per_epoch) (axolotl);
 * else 0 (= only at start and end). */
int train_config_eval_interval(const train_config *c, int steps_per_epoch);

/* Checkpoint interval in optimizer steps: save_steps if > 0; else, if
 * saves_per_epoch > 0, max(1, steps_per_epoch / saves_per_epoch); else 500
 * (HF TrainingArguments' default save_steps). A checkpoint is also written
 * after the last step and on SIGINT/SIGTERM. */
int train_config_save_interval(const train_config *c, int steps_per_epoch);

/* Warmup length in optimizer steps: warmup_steps if > 0, else
 * ceil(warmup_ratio * total_steps) (HF TrainingArguments.get_warmup_steps). */
int train_config_warmup_steps(const train_config *c, int total_steps);

#endif
