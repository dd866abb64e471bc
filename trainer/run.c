/* trainer/run.c — the training run's set-up, start, finish and teardown (see run.h).
 *
 * Set-up goes phase by phase, each a function returning 0 or -1 with the
 * one-line message: output_dir and its lock; the inputs exist; the checkpoint
 * to resume from; the base model's file and tokenizer; the data; the model's
 * weights and adapters; the schedule and optimizer; the outputs. Nothing in
 * output_dir changes before the outputs phase, i.e. before every input has
 * loaded. run_free releases whatever the phases reached.
 */
#include "trainer/run.h"
#include "trainer/unfreeze.h"

#include "model/llama_fsdp.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/file.h"
#include "core/hash.h"
#include "trainer/plot.h"

/* ------------------------------------------------------------------------ */
/* stop signals                                                               */

/* SIGINT, SIGTERM and SIGHUP (a closed terminal; unless SIGHUP was ignored
 * when the run started, as nohup does) ask the run to stop: the step
 * finishes, a checkpoint is saved, the run ends with 128 + signal. A second
 * one of any of them (say Ctrl-C again while the checkpoint is being written)
 * ends the process at once, by that signal's default action; the marker-last
 * protocol (trainer/checkpoint.h) keeps the previous checkpoint loadable even
 * then. The handlers are installed when the run's set-up starts (run_setup)
 * and restored by run_free. SIGPIPE is ignored, so that a write to a pipe
 * whose reader is gone (`qlora-train ... | head`) fails with EPIPE instead of killing the run;
 * run_check_outputs turns such a closed output into a stop request, recorded
 * as SIGPIPE (exit 141, the shell's code for a writer stopped by a closed
 * pipe). */
static volatile sig_atomic_t g_stop_signal = 0;

static const int stop_signals[RUN_N_STOP_SIGNALS] = {SIGINT, SIGTERM, SIGHUP};

static void on_stop_signal(int sig) {
    if (g_stop_signal) {
        /* the second stop request: now, by the default action (sigaction and raise are async-signal-safe) */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL);
        raise(sig); /* pending while this handler runs (sig is blocked in it); delivered on return */
        return;
    }
    g_stop_signal = sig;
}

int run_stop_signal(void) { return (int)g_stop_signal; }

int run_stop(const run_ctx *r) { return r->world > 1 ? r->stop_agreed : (int)g_stop_signal; }

void run_comm_fail(const run_ctx *r, const qerr *e) {
    dprintf(r->comm->err_fd, "qlora-train: %s\n", e->msg);
    comm_abort(r->comm, 1);
}

const char *run_stop_signal_name(int sig) {
    switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGHUP: return "SIGHUP";
    case SIGPIPE: return "a closed output (stdout or stderr)";
    default: return "a signal";
    }
}

void run_check_outputs(void) {
    if (g_stop_signal) return;
    /* A pipe whose reader has exited polls POLLERR, a hung-up terminal or socket POLLHUP; a regular file or
     * /dev/null never does, and a descriptor the caller closed (POLLNVAL) is not an output that went away. */
    struct pollfd pf[2] = {{.fd = 1, .events = POLLOUT}, {.fd = 2, .events = POLLOUT}};
    if (poll(pf, 2, 0) > 0 && ((pf[0].revents | pf[1].revents) & (POLLERR | POLLHUP))) g_stop_signal = SIGPIPE;
}

static void stop_handlers_install(struct sigaction old[RUN_N_STOP_SIGNALS + 1]) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < RUN_N_STOP_SIGNALS; i++) sigaddset(&sa.sa_mask, stop_signals[i]);
    sa.sa_flags = SA_RESTART;
    g_stop_signal = 0;
    for (int i = 0; i < RUN_N_STOP_SIGNALS; i++) {
        sigaction(stop_signals[i], NULL, &old[i]);
        /* `nohup qlora-train ...`: an ignored SIGHUP stays ignored, the run outlives the terminal */
        if (stop_signals[i] == SIGHUP && old[i].sa_handler == SIG_IGN) continue;
        sigaction(stop_signals[i], &sa, NULL);
    }
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, &old[RUN_N_STOP_SIGNALS]);
}

static void stop_handlers_restore(const struct sigaction old[RUN_N_STOP_SIGNALS + 1]) {
    for (int i = 0; i < RUN_N_STOP_SIGNALS; i++) sigaction(stop_signals[i], &old[i], NULL);
    /* After a closed output SIGPIPE stays ignored: the caller's last lines to it then fail quietly instead of
     * killing the process after the checkpoint was saved. */
    if (g_stop_signal != SIGPIPE) sigaction(SIGPIPE, &old[RUN_N_STOP_SIGNALS], NULL);
}

/* ------------------------------------------------------------------------ */
/* set-up phases                                                              */

/* output_dir first: it must be writable before anything heavy is loaded, and
 * one trainer at a time may use it. */
/* device: (trainer/config.h). The run's memory goes through the backend (the adapters,
 * lora_set_init_backend; the contexts and optimizer state; the RMSNorm weights, ag_stage; frozen
 * weights as operands are copied by the backend; checkpoints and adapters are written from
 * copy_d2h staging), which `QLORA_BACKEND=cpu-fenced` checks on the CPU: its data memory faults on
 * any host access outside the table (autograd/backend_fenced.c; tests/test_cli_faults.c runs a
 * training step on it). The CUDA backend has not run on a GPU yet: the line says so. */
static int setup_device_choose(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    /* device: cpu first: nothing probes CUDA then (a CUDA build's CPU ranks never touch a GPU) */
    if (!strcmp(c->device, "cpu")) {
        if (ag_backend_default()->host_data == 0 && strcmp(ag_backend_default()->name, "cpu-fenced"))
            ag_backend_set_default(ag_backend_find("cpu") ? ag_backend_find("cpu") : ag_backend_find("cpu-ref"));
        fprintf(stderr, "[device] cpu (device: cpu; backend %s)\n", ag_backend_default()->name);
        return 0;
    }
    char name[256] = "";
    int built = ag_backend_cuda_built();
    const ag_backend *cuda = built ? ag_backend_find("cuda") : NULL;
    if (cuda) ag_backend_cuda_device_name(name, sizeof name, NULL);
    const char *env = getenv("QLORA_BACKEND");
    static const char unvalidated[] =
        "compiled and host-tested, not yet validated on a GPU: `make test-gpu` checks it; device: cpu runs the CPU "
        "engine";
    if (!strcmp(c->device, "cuda")) {
        if (!built)
            return qerr_set(e, "%s: device: cuda: this binary was built without the CUDA backend (build with make "
                               "CUDA=1 where nvcc is installed); use device: cpu",
                            r->cfgname);
        if (!cuda) return qerr_set(e, "%s: device: cuda: no CUDA device is visible to this process", r->cfgname);
        ag_backend_set_default(cuda);
        fprintf(stderr, "[device] cuda: %s (device: cuda; the CUDA backend is %s)\n", name, unvalidated);
        return 0;
    }
    if (env && *env) /* auto: an explicit QLORA_BACKEND wins */
        fprintf(stderr, "[device] %s (device: auto; QLORA_BACKEND=%s)\n", ag_backend_default()->name, env);
    else if (!built) fprintf(stderr, "[device] cpu (device: auto; this binary has no CUDA backend)\n");
    else if (!cuda) fprintf(stderr, "[device] cpu (device: auto; CUDA backend built, no CUDA device)\n");
    else {
        ag_backend_set_default(cuda);
        fprintf(stderr, "[device] cuda: %s (device: auto; the CUDA backend is %s)\n", name, unvalidated);
    }
    (void)e;
    return 0;
}

/* With several ranks the device decides the communicator: CUDA ranks move to NCCL (the communicator the process
 * started with — MPI, or torchrun's — carries only NCCL's unique id; comm_nccl_upgrade), CPU ranks stay on MPI.
 * Each rank's GPU (local_rank) is made current before anything touches CUDA. A torchrun launch has no CPU
 * transport: refused. */
static int setup_device(run_ctx *r, qerr *e) {
    if (r->world > 1 && strcmp(r->c->device, "cpu") && comm_cuda_select_device(r->comm, e)) return -1;
    if (setup_device_choose(r, e)) return -1;
    if (r->c->fp16 && !strcmp(ag_backend_default()->name, "cuda"))
        return qerr_set(e,
                        "%s: fp16: true on device cuda: the CUDA kernels take bf16 operands, fp16 is implemented on "
                        "the CPU engine only; set device: cpu, or bf16: true (fp16: false) on the GPU",
                        r->cfgname);
    if (r->c->gradient_checkpointing == LLAMA_CKPT_OFFLOAD && r->rank == 0) {
        const ag_backend *be = ag_backend_default();
        if (be->host_data)
            fprintf(stderr, "[config] gradient_checkpointing: offload: the %s backend keeps every activation in host "
                            "memory already, nothing to offload: runs as true (each block recomputed; the same "
                            "numbers)\n", be->name);
        else
            fprintf(stderr, "[config] gradient_checkpointing: offload: each block recomputed, its input kept in "
                            "pinned host memory (backend %s; copied out after its forward and back ahead of its "
                            "recompute on a copy stream; the same numbers)\n", be->name);
    }
    if (r->c->fsdp_offload_params && !strcmp(ag_backend_default()->name, "cuda"))
        return qerr_set(e,
                        "%s: fsdp_offload_params (fsdp: offload): keeping the parameters in host memory is not "
                        "implemented for device cuda; remove it, or train on CPU ranks (device: cpu), where "
                        "everything is in host memory already",
                        r->cfgname);
    if (r->world == 1) return 0;
    if (!strcmp(ag_backend_default()->name, "cuda")) return comm_nccl_upgrade(r->comm, e);
    if (!strcmp(r->comm->ops->name, "torchrun"))
        return qerr_set(e,
                        "%s: device: %s: %d ranks started by torchrun train on CUDA only (NCCL); CPU ranks "
                        "communicate over MPI: launch them with mpirun -np %d qlora-train ... or qlora-train --nproc "
                        "%d ...",
                        r->cfgname, r->c->device, r->world, r->world, r->world);
    return 0;
}

static int setup_output_dir(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    char path[4096];
    if (r->rank) return 0; /* rank 0 alone writes output_dir */
    if (file_mkdir_p(c->output_dir, e)) return qerr_prefix(e, "%s: output_dir", r->cfgname);
    snprintf(path, sizeof path, "%s/.qlora-train.lock", c->output_dir);
    r->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (r->lock_fd < 0)
        return qerr_set(e, "%s: output_dir: cannot write in \"%s\": %s", r->cfgname, c->output_dir, strerror(errno));
    if (flock(r->lock_fd, LOCK_EX | LOCK_NB))
        return qerr_set(e, "%s: output_dir: \"%s\" is in use by another qlora-train (%s is locked)", r->cfgname,
                        c->output_dir, path);
    int n_stale = 0;
    if (ckpt_clean_stale(c->output_dir, &n_stale, e)) return qerr_prefix(e, "%s: output_dir", r->cfgname);
    if (n_stale) fprintf(stderr, "[checkpoint] removed %d unfinished checkpoint save(s) of an interrupted run\n", n_stale);
    return 0;
}

/* The input files exist (cheap, before loading anything). */
static int setup_check_inputs(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    if (access(c->base_model, R_OK))
        return qerr_set(e, "%s: base_model: cannot read \"%s\": %s", r->cfgname, c->base_model, strerror(errno));
    if (c->pretraining_path && access(c->pretraining_path, R_OK))
        return qerr_set(e, "%s: pretraining_dataset.path: cannot read \"%s\": %s", r->cfgname, c->pretraining_path,
                        strerror(errno));
    for (int pass = 0; pass < 2; pass++) {
        const dataset_cfg *d = pass ? c->test_datasets : c->datasets;
        int nd = pass ? c->n_test_datasets : c->n_datasets;
        for (int i = 0; i < nd; i++)
            if (access(d[i].path, R_OK))
                return qerr_set(e, "%s: %s[%d].path: cannot read \"%s\": %s", r->cfgname,
                                pass ? "test_datasets" : "datasets", i, d[i].path, strerror(errno));
    }
    return 0;
}

/* The checkpoint to resume from: resume_from_checkpoint, else the newest
 * complete one in output_dir (when auto_resume_from_checkpoints). */
static int setup_resume_choice_rank0(run_ctx *r, qerr *e);

/* Load checkpoint dir for this rank: under SHARD_GRAD_OP and FULL_SHARD (both shard the optimizer state
 * on the same cuts, setup_optimizer) only its interval of the optimizer state (read from whichever shard
 * files hold it when the checkpoint is sharded), else all of it. */
static int resume_load(const run_ctx *r, const char *dir, ckpt_state *ck, qerr *e) {
    const int sharded_state = r->c->fsdp_shard_grad_op || r->c->fsdp_full_shard;
    return ckpt_load_part(dir, sharded_state ? r->world : 0, r->rank, ck, e);
}

/* With several ranks rank 0 chooses (it holds output_dir's lock and has
 * removed unfinished saves) and sends the choice; the others load that
 * checkpoint (output_dir must be on a filesystem every rank sees). */
static int setup_resume_choice(run_ctx *r, qerr *e) {
    if (r->world == 1) return setup_resume_choice_rank0(r, e);
    if (!r->rank && setup_resume_choice_rank0(r, e)) return -1;
    int64_t resuming = r->resuming;
    qerr ce;
    if (comm_broadcast(r->comm, &resuming, 1, COMM_I64, 0, &ce) ||
        comm_broadcast(r->comm, r->ck_dir, sizeof r->ck_dir, COMM_U8, 0, &ce))
        run_comm_fail(r, &ce);
    if (!r->rank || !resuming) return 0;
    r->ck_dir[sizeof r->ck_dir - 1] = 0;
    if (resume_load(r, r->ck_dir, &r->ck, e)) return qerr_prefix(e, "rank %d: %s", r->rank, r->cfgname);
    r->resuming = 1;
    return 0;
}

static int setup_resume_choice_rank0(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    if (c->resume_from_checkpoint) {
        if (resume_load(r, c->resume_from_checkpoint, &r->ck, e))
            return qerr_prefix(e, "%s: resume_from_checkpoint", r->cfgname);
        snprintf(r->ck_dir, sizeof r->ck_dir, "%s", c->resume_from_checkpoint);
        r->resuming = 1;
    } else {
        ckpt_entry *ents = NULL;
        int n_ents = 0, n_committed = 0, n_interrupted = 0;
        qerr newest_why = {{0}}; /* why the newest committed checkpoint cannot be used */
        if (ckpt_list(c->output_dir, &ents, &n_ents, e)) return qerr_prefix(e, "%s: output_dir", r->cfgname);
        for (int i = 0; i < n_ents && !r->resuming; i++) {
            qerr why;
            if (resume_load(r, ents[i].path, &r->ck, &why)) {
                fprintf(stderr, "[checkpoint] skipping %s\n", why.msg);
                if (ents[i].complete && !n_committed++) newest_why = why;
                n_interrupted += !ents[i].complete;
                continue;
            }
            if (!c->auto_resume_from_checkpoints) {
                qerr_set(e,
                         "%s: output_dir \"%s\" already holds %s and auto_resume_from_checkpoints is false: delete "
                         "its checkpoint-* directories or choose another output_dir",
                         r->cfgname, c->output_dir, ents[i].path);
                free(ents);
                return -1;
            }
            snprintf(r->ck_dir, sizeof r->ck_dir, "%s", ents[i].path);
            r->resuming = 1;
        }
        free(ents);
        /* A save that committed (its COMPLETE marker exists) but cannot be loaded now is damage, not an
         * interrupted save: starting over would overwrite that run's outputs. Only saves interrupted before
         * their marker (the crash-safe protocol's leftovers) are passed over for a start from step 0. */
        if (!r->resuming && n_committed)
            return qerr_set(e,
                            "%s: output_dir \"%s\" holds %d complete checkpoint(s) and none can be resumed; the "
                            "newest: %s. Delete its checkpoint-* directories to start over, or choose another "
                            "output_dir (or resume_from_checkpoint)",
                            r->cfgname, c->output_dir, n_committed, newest_why.msg);
        char mp[4200];
        snprintf(mp, sizeof mp, "%s/metrics.jsonl", c->output_dir);
        if (!r->resuming && (n_interrupted || access(mp, F_OK) == 0))
            fprintf(stderr, "[checkpoint] starting over from step 0: output_dir %s holds no complete checkpoint "
                            "(%d interrupted save(s) skipped); the outputs of the run before are overwritten\n",
                    c->output_dir, n_interrupted);
    }
    if (r->resuming && c->pretraining_path)
        fprintf(stderr, "[checkpoint] resuming from %s: step %lld, streamed row %lld\n", r->ck_dir,
                (long long)r->ck.step, (long long)r->ck.rows_consumed);
    else if (r->resuming)
        fprintf(stderr, "[checkpoint] resuming from %s: step %lld, epoch %lld, row %lld of %lld\n", r->ck_dir,
                (long long)r->ck.step, (long long)(r->ck.rows_consumed / r->ck.n_rows),
                (long long)(r->ck.rows_consumed % r->ck.n_rows), (long long)r->ck.n_rows);
    return 0;
}

/* The linears LoRA targets, by slot, from lora_target_linear (every linear the
 * model has) and lora_target_modules, whose names must be the model's own
 * (HF's module names: Phi-3 has qkv_proj and gate_up_proj, not q/k/v_proj and
 * gate/up_proj; the others the reverse). */
static int resolve_targets(const run_ctx *r, const llama_hparams *hp, int target[LLAMA_N_LINEAR], qerr *e) {
    const train_config *c = r->c;
    const llama_linear_name *lin = llama_hparams_linears(hp);
    for (int k = 0; k < LLAMA_N_LINEAR; k++) target[k] = c->lora_target_linear && lin[k].peft != NULL;
    for (int i = 0; i < c->n_lora_target_modules; i++) {
        const char *name = c->lora_target_modules[i];
        int k = name ? llama_linear_from_peft_in(lin, name, strlen(name)) : -1;
        if (k >= 0) {
            target[k] = 1;
            continue;
        }
        char have[160] = "";
        for (int j = 0; j < LLAMA_N_LINEAR; j++)
            if (lin[j].peft)
                snprintf(have + strlen(have), sizeof have - strlen(have), "%s%s", have[0] ? ", " : "", lin[j].peft);
        return qerr_set(e, "%s: lora_target_modules: \"%s\" is not a linear of %s (a %s model; its linears: %s%s)",
                        r->cfgname, name ? name : "?", c->base_model, llama_arch_name(hp->arch), have,
                        hp->arch == LLAMA_ARCH_PHI3 ? "; Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj"
                                                    : "");
    }
    return 0;
}

/* lora_modules_to_save (PEFT modules_to_save: trainable full copies of embed_tokens / lm_head, in
 * the flat adapter arrays): what follows from that design runs (AdamW, Sophia, adamw_8bit for
 * lm_head, NO_SHARD, checkpoints); what does not is refused here, before output_dir changes. The
 * tied-embedding decision is PEFT 0.21's default and is said in one [config] line. */
static int check_modules_to_save(const run_ctx *r, const llama_hparams *hp, qerr *e) {
    const train_config *c = r->c;
    int save[LORA_N_SAVE];
    train_config_modules_to_save(c, save);
    if (!save[LORA_SAVE_EMBED] && !save[LORA_SAVE_LM_HEAD]) return 0;
    if (!ag_backend_default()->embedding_bwd || !ag_backend_default()->host_data)
        return qerr_set(e, "%s: lora_modules_to_save on the %s backend is not implemented (the trainable "
                           "LM head's gradient is a CPU kernel); use device: cpu", r->cfgname, ag_backend_default()->name);
    if (c->fsdp_shard_grad_op || c->fsdp_full_shard)
        return qerr_set(e, "%s: lora_modules_to_save with %s is not implemented (the full copies are not sharded); "
                           "use NO_SHARD (data parallel) or one process",
                        r->cfgname, c->fsdp_full_shard ? "FULL_SHARD" : "SHARD_GRAD_OP");
    if (save[LORA_SAVE_EMBED] && r->use_adamw8bit)
        return qerr_set(e, "%s: lora_modules_to_save: embed_tokens with optimizer %s is not implemented: HF's Trainer "
                           "keeps an nn.Embedding's bitsandbytes states in 32 bits (register_module_override "
                           "optim_bits 32), which qlora's adamw_8bit does not do; use adamw_torch, or save only lm_head",
                        r->cfgname, c->optimizer);
    fprintf(stderr, "[config] lora_modules_to_save: %s%s%s trained as full fp32 copies (PEFT modules_to_save; "
                    "%.1fM parameters each, bf16 GEMM operands)\n",
            save[LORA_SAVE_EMBED] ? "embed_tokens" : "", save[0] && save[1] ? " and " : "",
            save[LORA_SAVE_LM_HEAD] ? "lm_head" : "", (double)hp->vocab * hp->d_model / 1e6);
    if (hp->tied_embeddings)
        fprintf(stderr, "[config] lora_modules_to_save on tied embeddings: as PEFT 0.21 by default "
                        "(ensure_weight_tying: false) the copies are independent: %s; the adapter and a merged "
                        "export hold embed_tokens and lm_head untied\n",
                save[0] && save[1] ? "embed_tokens and lm_head each train their own copy"
                : save[0]          ? "embed_tokens trains a copy, lm_head stays the frozen base table"
                                   : "lm_head trains a copy, embed_tokens stays the frozen base table");
    return 0;
}

/* lora_r against the targeted linears: the update B·A of a linear with `in`
 * inputs and `out` outputs has rank at most min(in, out), so a larger r adds
 * parameters (and memory) that cannot change what it can learn. */
static int check_lora_rank(const run_ctx *r, const llama_hparams *hp, const int target[LLAMA_N_LINEAR], qerr *e) {
    const train_config *c = r->c;
    int worst = -1;
    int64_t w_out = 0, w_in = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        if (!target[k]) continue;
        int64_t out, in;
        llama_tensor_shape(hp, LLAMA_T_LINEAR, k, &out, &in);
        if (worst < 0 || (out < in ? out : in) < (w_out < w_in ? w_out : w_in)) worst = k, w_out = out, w_in = in;
    }
    const int64_t max_r = w_out < w_in ? w_out : w_in;
    if (worst >= 0 && c->lora_r > max_r)
        return qerr_set(e,
                        "%s: lora_r: %d exceeds the rank a LoRA update of %s can have: its weight is [%lld, %lld] "
                        "(out, in) in the %d layers of %s; expected lora_r <= %lld, min(in, out) of every targeted "
                        "linear",
                        r->cfgname, c->lora_r, llama_hparams_linears(hp)[worst].peft, (long long)w_out, (long long)w_in,
                        hp->n_layer, c->base_model, (long long)max_r);
    return 0;
}

/* The base model's file: open it, fingerprint it and its tokenizer (checked
 * against a resumed checkpoint), check sequence_len, load the tokenizer. */
static int setup_base_model(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    const ckpt_state *ck = &r->ck;
    double t0 = clock_now_sec();
    if (base_model_open(c->base_model, &r->bm, e)) return qerr_prefix(e, "%s: base_model", r->cfgname);
    r->gf = base_model_tokenizer_gguf(r->bm);
    r->tok_fp = ckpt_fingerprint_tokenizer(r->gf);
    if (ckpt_fingerprint_model(c->base_model, &r->model_fp, e)) return qerr_prefix(e, "%s: base_model", r->cfgname);
    if (r->resuming && ck->tokenizer_fingerprint != r->tok_fp)
        return qerr_set(e,
                        "%s: base_model: %s was made with another tokenizer (checkpoint: %s, tokenizer fingerprint "
                        "%016llx; %s has %016llx); resume with the same base_model, or choose another output_dir",
                        r->cfgname, r->ck_dir, ck->base_model[0] ? ck->base_model : "?",
                        (unsigned long long)ck->tokenizer_fingerprint, c->base_model, (unsigned long long)r->tok_fp);
    if (r->resuming && ck->model_fingerprint != r->model_fp)
        return qerr_set(e,
                        "%s: base_model: %s was trained on a different base model (%s, fingerprint %016llx; %s has "
                        "%016llx); resume with the same base_model, or choose another output_dir",
                        r->cfgname, r->ck_dir, ck->base_model[0] ? ck->base_model : "?",
                        (unsigned long long)ck->model_fingerprint, c->base_model, (unsigned long long)r->model_fp);
    if (r->resuming && ck->base_format[0] && strcmp(ck->base_format, run_base_format(c)))
        return qerr_set(e,
                        "%s: load_in_4bit / load_in_8bit / bnb_4bit_use_double_quant: %s was trained on the base held "
                        "as %s, this config holds it as %s; resume with the same base format, or choose another "
                        "output_dir",
                        r->cfgname, r->ck_dir, ck->base_format, run_base_format(c));
    const llama_hparams *hp0 = base_model_hparams(r->bm);
    if (hp0->context_length > 0 && c->sequence_len > hp0->context_length)
        return qerr_set(e,
                        "%s: sequence_len: %d exceeds the model's context length %d (llama.context_length in %s); "
                        "expected at most %d",
                        r->cfgname, c->sequence_len, hp0->context_length, c->base_model, hp0->context_length);
    if (hp0->sliding_window > 0 && !hp0->window_mask && c->sequence_len > hp0->sliding_window)
        return qerr_set(e,
                        "%s: sequence_len: %d exceeds the sliding_window of %d tokens of %s: sliding-window attention "
                        "is not implemented (identical to full attention only up to the window); expected at most %d",
                        r->cfgname, c->sequence_len, hp0->sliding_window, c->base_model, hp0->sliding_window);
    fprintf(stderr, "[model] fingerprint %016llx, tokenizer %016llx (%.1fs)\n", (unsigned long long)r->model_fp,
            (unsigned long long)r->tok_fp, clock_now_sec() - t0);
    if (tokenizer_load_gguf(r->gf, &r->tok, e)) return qerr_prefix(e, "%s: base_model %s", r->cfgname, c->base_model);
    /* Token ids index the embedding's rows (and the LM head's, which has as many): every id the tokenizer can
     * produce needs one, or the embedding reads past its end. Padded vocabularies (more rows) are fine. */
    const int n_tok = tokenizer_n_vocab(r->tok);
    if (n_tok > hp0->vocab)
        return qerr_set(e,
                        "%s: base_model %s: the tokenizer has %d tokens but %s has %d rows: token ids %d..%d would "
                        "index past the embedding; expected at least %d rows (a tokenizer of at most %d tokens)",
                        r->cfgname, c->base_model, n_tok,
                        base_model_kind(r->bm) == BASE_HF ? "model.embed_tokens.weight" : "token_embd.weight",
                        hp0->vocab, hp0->vocab, n_tok - 1, n_tok, hp0->vocab);
    int target[LLAMA_N_LINEAR];
    return resolve_targets(r, hp0, target, e) || check_lora_rank(r, hp0, target, e) ? -1 : 0;
}

/* XXH64 of the packed training rows: a changed dataset (or tokenizer,
 * sequence_len, packing, seed) makes the saved data position meaningless. */
static uint64_t packed_fingerprint(const packed_set *ps) {
    xxh64_state st;
    xxh64_init(&st, 0);
    int64_t hdr[2] = {ps->n_rows, ps->seq_len};
    xxh64_update(&st, hdr, sizeof hdr);
    size_t n = (size_t)ps->n_rows * (size_t)ps->seq_len * sizeof(int32_t);
    xxh64_update(&st, ps->input_ids, n);
    xxh64_update(&st, ps->targets, n);
    xxh64_update(&st, ps->position_ids, n);
    xxh64_update(&st, ps->seq_ids, n);
    return xxh64_digest(&st);
}

/* Tokenize and pack datasets and test_datasets; fingerprint the training
 * rows (checked against a resumed checkpoint). */
static const char *tok_text(const void *ctx, int id) { return tokenizer_token_text((const tokenizer *)ctx, id); }

/* pretraining_dataset (data/stream.h): the training rows are streamed step by step; test_datasets,
 * if any, are the held-out set (axolotl refuses val_set_size here). On resume the stream is read again
 * up to the checkpoint's rows_consumed, and the fingerprint of those rows must be the one saved. */
static int setup_stream(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    dataset_spec *tspecs = NULL;
    int nts = 0;
    if (train_config_dataset_specs(c, 1, &tspecs, &nts, e)) return -1;
    double t0 = clock_now_sec();
    if (nts > 0) {
        dataset_stats st;
        packed_set none;
        int rc = dataset_build(r->tok, tspecs, nts, NULL, 0, 0.0, c->sequence_len,
                               train_config_pack_mode(c) | DATASET_PACK_IN_ORDER, c->train_on_inputs,
                               train_config_data_seed(c), &r->eval_set, &none, &st, e);
        packed_set_free(&none);
        if (rc) {
            train_config_dataset_specs_free(tspecs, nts);
            return qerr_prefix(e, "%s: test_datasets", r->cfgname);
        }
    }
    train_config_dataset_specs_free(tspecs, nts);
    pretrain_spec sp = {c->pretraining_path, c->pretraining_text_column, c->pretraining_skip};
    if (pretrain_stream_open(r->tok, &sp, c->sequence_len, c->streaming_multipack_buffer_size, 200,
                             train_config_data_seed(c), &r->stream, e))
        return qerr_prefix(e, "%s", r->cfgname);
    const int64_t rows_per_step = (int64_t)c->micro_batch_size * c->gradient_accumulation_steps * r->world;
    r->train_set.n_rows = rows_per_step; /* the step's rows; allocated by the first pretrain_stream_next */
    r->train_set.seq_len = c->sequence_len;
    int W = c->sequence_len - 1, S = 256 < (W - 1) / 2 ? 256 : (W - 1) / 2;
    fprintf(stderr, "[data] train: streamed from %s (pretraining_dataset%s): windows of up to %d tokens (stride "
                    "%d, eos), packed first-fit per %d records into rows of %d, at most 200 windows a row; "
                    "held-out: %lld rows (test_datasets); %.1fs\n",
            c->pretraining_path, c->pretraining_skip ? ", skip" : "", c->sequence_len, S,
            c->streaming_multipack_buffer_size, c->sequence_len, (long long)r->eval_set.n_rows,
            clock_now_sec() - t0);
    if (r->resuming) {
        packed_set tmp = {0};
        int64_t left = r->ck.rows_consumed;
        double t1 = clock_now_sec();
        while (left > 0) {
            int64_t n = left < rows_per_step ? left : rows_per_step;
            if (n != tmp.n_rows && tmp.input_ids) packed_set_free(&tmp);
            if (pretrain_stream_next(r->stream, n, &tmp, e)) {
                packed_set_free(&tmp);
                return qerr_prefix(e, "%s: resuming", r->cfgname);
            }
            left -= n;
        }
        packed_set_free(&tmp);
        if (pretrain_stream_fingerprint(r->stream) != r->ck.data_fingerprint)
            return qerr_set(e, "%s: pretraining_dataset: the %lld rows %s was trained on are not what the stream gives "
                               "now (fingerprint %016llx, now %016llx: the file, sequence_len, "
                               "streaming_multipack_buffer_size, skip or seed changed); resume with the same data, or "
                               "choose another output_dir",
                            r->cfgname, (long long)r->ck.rows_consumed, r->ck_dir,
                            (unsigned long long)r->ck.data_fingerprint,
                            (unsigned long long)pretrain_stream_fingerprint(r->stream));
        fprintf(stderr, "[data] resumed the stream at row %lld (pass %d; read again and checked in %.1fs)\n",
                (long long)r->ck.rows_consumed, pretrain_stream_epoch(r->stream), clock_now_sec() - t1);
    }
    r->data_fp = pretrain_stream_fingerprint(r->stream);
    return 0;
}

static int setup_data(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    if (c->pretraining_path) {
        if (train_config_check_special_tokens(c, tokenizer_bos_id(r->tok), tokenizer_eos_id(r->tok),
                                              tokenizer_unk_id(r->tok), tok_text, r->tok, e))
            return -1;
        return setup_stream(r, e);
    }
    if (train_config_check_special_tokens(c, tokenizer_bos_id(r->tok), tokenizer_eos_id(r->tok),
                                          tokenizer_unk_id(r->tok), tok_text, r->tok, e))
        return -1;
    dataset_spec *specs = NULL, *tspecs = NULL;
    int ns = 0, nts = 0;
    if (train_config_dataset_specs(c, 0, &specs, &ns, e) || train_config_dataset_specs(c, 1, &tspecs, &nts, e)) {
        train_config_dataset_specs_free(specs, ns);
        return -1;
    }
    dataset_skip_log skipped = {0}, tskipped = {0};
    for (int i = 0; i < ns; i++) specs[i].skipped = &skipped;
    for (int i = 0; i < nts; i++) tspecs[i].skipped = &tskipped;
    double t0 = clock_now_sec();
    dataset_stats st;
    int rc = dataset_build(r->tok, specs, ns, tspecs, nts, c->val_set_size,
                           c->sequence_len, train_config_pack_mode(c), c->train_on_inputs, train_config_data_seed(c), &r->train_set,
                           &r->eval_set, &st, e);
    train_config_dataset_specs_free(specs, ns);
    train_config_dataset_specs_free(tspecs, nts);
    if (rc) {
        qerr_prefix(e, "%s: datasets", r->cfgname);
        static const char *const line_errors[] = {"invalid JSON", "expected a JSON object", "unexpected text after",
                                                  "missing or not", "must be a string", "is an empty list"};
        for (size_t i = 0; !c->skip_bad_lines && i < sizeof line_errors / sizeof *line_errors; i++)
            if (strstr(e->msg, line_errors[i]) && strlen(e->msg) + 64 < sizeof e->msg) {
                strcat(e->msg, " (or set skip_bad_lines: true to skip malformed lines)");
                break;
            }
        return -1;
    }
    if (skipped.note[0]) fprintf(stderr, "[data] datasets: %s\n", skipped.note);
    if (tskipped.note[0]) fprintf(stderr, "[data] test_datasets: %s\n", tskipped.note);
    if (skipped.n_lines)
        fprintf(stderr, "[data] skipped %lld malformed line(s) of datasets (skip_bad_lines); the first: %s\n",
                (long long)skipped.n_lines, skipped.first);
    if (tskipped.n_lines)
        fprintf(stderr, "[data] skipped %lld malformed line(s) of test_datasets (skip_bad_lines); the first: %s\n",
                (long long)tskipped.n_lines, tskipped.first);
    const packed_set *tr = &r->train_set, *ev = &r->eval_set;
    fprintf(stderr,
            "[data] train: %lld examples -> %lld rows of %d tokens (%lld target tokens); held-out: %lld examples "
            "-> %lld rows (%lld target tokens); %.1fs\n",
            (long long)st.train.n_examples, (long long)tr->n_rows, tr->seq_len, (long long)tr->n_target_tokens,
            (long long)st.eval.n_examples, (long long)ev->n_rows, (long long)ev->n_target_tokens,
            clock_now_sec() - t0);
    if (tr->n_rows == 0) return qerr_set(e, "%s: datasets: no training rows after tokenization", r->cfgname);
    r->data_fp = packed_fingerprint(tr);
    if (r->resuming && (r->ck.n_rows != tr->n_rows || r->ck.data_fingerprint != r->data_fp))
        return qerr_set(e,
                        "%s: datasets: the training data differs from the data %s was trained on (%lld rows, "
                        "fingerprint %016llx; now %lld rows, %016llx: datasets, sequence_len, sample_packing, "
                        "train_on_inputs or seed changed); resume with the same data, or choose another output_dir",
                        r->cfgname, r->ck_dir, (long long)r->ck.n_rows, (unsigned long long)r->ck.data_fingerprint,
                        (long long)tr->n_rows, (unsigned long long)r->data_fp);
    return 0;
}

/* XXH64 of what decides the maths besides the model and the data: the config
 * file's bytes and the command-line overrides. */
static uint64_t config_fingerprint(const train_config *c) {
    xxh64_state st;
    xxh64_init(&st, 0);
    size_t n = 0;
    qerr ignore;
    char *text = c->config_path ? file_read_all(c->config_path, &n, &ignore) : NULL;
    if (text) xxh64_update(&st, text, n);
    free(text);
    for (int i = 0; i < c->n_overrides; i++) xxh64_update(&st, c->overrides[i], strlen(c->overrides[i]) + 1);
    return xxh64_digest(&st);
}

/* Several ranks must run the same job: the config, the base model, its
 * tokenizer and the packed training rows are fingerprinted on every rank and
 * compared with rank 0's. On a difference rank 0 fails with one line naming
 * the first rank and what differs; the others wait for the abort that
 * follows. */
static int setup_agree(run_ctx *r, qerr *e) {
    if (r->world == 1) return 0;
    enum { N_FP = 4 };
    static const char *const what[N_FP] = {"config (file and overrides)", "base_model", "tokenizer",
                                           "training data (datasets, sequence_len, packing, seed)"};
    const uint64_t mine[N_FP] = {config_fingerprint(r->c), r->model_fp, r->tok_fp, r->data_fp};
    uint64_t *all = malloc((size_t)r->world * N_FP * sizeof *all);
    if (!all) return qerr_set(e, "out of memory");
    qerr ce;
    if (comm_all_gather(r->comm, mine, all, N_FP, COMM_I64, &ce)) run_comm_fail(r, &ce);
    for (int k = 1; k < r->world; k++)
        for (int i = 0; i < N_FP; i++)
            if (all[k * N_FP + i] != all[i]) {
                if (r->rank) {
                    free(all);
                    comm_barrier(r->comm, &ce); /* rank 0 fails and aborts the job */
                    return qerr_set(e, "rank %d: the ranks disagree (rank 0 reports it)", r->rank);
                }
                qerr_set(e,
                         "%s: rank %d of %d has another %s than rank 0 (fingerprint %016llx, rank 0 %016llx): "
                         "every rank must run the same config on the same files",
                         r->cfgname, k, r->world, what[i], (unsigned long long)all[k * N_FP + i],
                         (unsigned long long)all[i]);
                free(all);
                return -1;
            }
    free(all);
    return 0;
}

/* The adapter's tensors in arena order, with their PEFT names: the one table
 * behind the adapter files and the checkpoints. *out malloc'd. */
static int adapter_table(const lora_set *ls, const llama_hparams *hp, peft_tensor **out, int *n_out, qerr *e) {
    const llama_linear_name *lin = llama_hparams_linears(hp);
    int n = 0;
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) n += lora_set_get(ls, l, k) ? 2 : 0;
    for (int k = 0; k < LORA_N_SAVE; k++) n += ls->save[k];
    peft_tensor *t = calloc((size_t)(n ? n : 1), sizeof *t);
    if (!t) return qerr_set(e, "out of memory");
    int i = 0;
    for (int l = 0; l < ls->n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const lora_adapter *a = lora_set_get(ls, l, k);
            if (!a) continue;
            for (int ab = 0; ab < 2; ab++) {
                const tensor *x = ab ? a->B : a->A;
                peft_tensor_name(t[i].name, sizeof t[i].name, l, lin[k].parent, lin[k].peft,
                                 ab ? 'B' : 'A');
                t[i].offset = (int64_t)((const float *)x->data - ls->params);
                t[i].rows = x->shape[0];
                t[i].cols = x->shape[1];
                i++;
            }
        }
    for (int k = 0; k < LORA_N_SAVE; k++) /* modules_to_save, after the layers as in the arena */
        if (ls->save[k]) {
            snprintf(t[i].name, sizeof t[i].name, "%s", peft_saved_module_name(k == LORA_SAVE_LM_HEAD));
            t[i].offset = ls->save_offset[k];
            t[i].rows = hp->vocab;
            t[i].cols = hp->d_model;
            i++;
        }
    *out = t;
    *n_out = n;
    return 0;
}

/* A resumed checkpoint must hold the adapter layout this config gives. */
static int check_resume_adapter(const run_ctx *r, qerr *e) {
    const ckpt_state *ck = &r->ck;
    if (ck->n_tensors != r->n_tensors || ck->n_params != r->ls.n_params)
        return qerr_set(e,
                        "%s: %s holds a LoRA adapter of %d tensors / %lld parameters, but this config gives %d / "
                        "%lld (lora_r, lora_target_modules, lora_target_linear or lora_modules_to_save changed); resume with the config "
                        "it was made with, or choose another output_dir",
                        r->cfgname, r->ck_dir, ck->n_tensors, (long long)ck->n_params, r->n_tensors,
                        (long long)r->ls.n_params);
    for (int i = 0; i < r->n_tensors; i++) {
        const peft_tensor *a = &ck->tensors[i], *b = &r->tensors[i];
        if (strcmp(a->name, b->name) || a->offset != b->offset || a->rows != b->rows || a->cols != b->cols)
            return qerr_set(e,
                            "%s: %s holds tensor %s [%lld, %lld] where this config gives %s [%lld, %lld]; resume "
                            "with the config it was made with, or choose another output_dir",
                            r->cfgname, r->ck_dir, a->name, (long long)a->rows, (long long)a->cols, b->name,
                            (long long)b->rows, (long long)b->cols);
    }
    return 0;
}

/* The keys that drive the largest part of plan p, for a refusal: one phrase into why. */
static void plan_why(const run_ctx *r, const memplan *p, char *why, size_t n) {
    const train_config *c = r->c;
    const double M = 1048576.0;
    const double ad = p->adapters + p->optimizer;
    if (p->data >= ad && p->data >= p->base && p->data >= p->activations)
        snprintf(why, n,
                 "the dataset's packed rows %.0f MiB (%lld training and %lld held-out rows of sequence_len %d): "
                 "train on a smaller dataset or on parts of it",
                 p->data / M, (long long)r->train_set.n_rows, (long long)r->eval_set.n_rows, c->sequence_len);
    else if (p->activations >= ad && p->activations >= p->base)
        snprintf(why, n,
                 "activations %.0f MiB for micro_batch_size %d x sequence_len %d%s: lower micro_batch_size "
                 "(raise gradient_accumulation_steps to keep the batch) or sequence_len%s",
                 p->activations / M, c->micro_batch_size, c->sequence_len,
                 c->gradient_checkpointing == 2 ? " (with gradient_checkpointing: selective)"
                 : c->gradient_checkpointing    ? " (with gradient_checkpointing)"
                                                : "",
                 c->gradient_checkpointing == 2 ? ", or set gradient_checkpointing: true"
                 : c->gradient_checkpointing    ? ""
                                                : ", or set gradient_checkpointing: selective or true");
    else if (ad >= p->base)
        snprintf(why, n,
                 "LoRA adapters, gradients and optimizer state %.0f MiB for lora_r %d: lower lora_r or target "
                 "fewer modules (lora_target_modules, lora_target_linear)",
                 ad / M, c->lora_r);
    else
        snprintf(why, n, "the frozen base_model %.0f MiB: use a smaller base_model%s", p->base / M,
                 c->load_in_4bit ? "" : c->load_in_8bit ? " or load_in_4bit: true (NF4, half the bytes of int8)"
                                                        : " or load_in_4bit: true");
}

/* The memory plan (trainer/memplan.c), once the frozen weights are loaded and
 * before the adapters, their gradients and the optimizer state are allocated:
 * a run whose predicted peak exceeds the machine's memory is refused here,
 * with the numbers and the keys that drive them, before output_dir changes
 * (unless memory_check: false). */
static int setup_memory_plan(run_ctx *r, const int target[LLAMA_N_LINEAR], qerr *e) {
    const train_config *c = r->c;
    const llama_model *m = &r->model;
    int64_t lora_params = 0; /* what lora_set_init will allocate: r·(in + out) per adapted linear */
    int64_t *numel = malloc(((size_t)m->hp.n_layer * LLAMA_N_LINEAR * 2 + 1 + LORA_N_SAVE) * sizeof *numel);
    if (!numel) return qerr_set(e, "out of memory");
    int nt = 0;
    int64_t max_layer = 0; /* the largest layer's adapter elements: one gradient bucket */
    for (int l = 0; l < m->hp.n_layer; l++) {
        const int64_t before = lora_params;
        for (int k = 0; k < LLAMA_N_LINEAR; k++)
            if (target[k]) {
                lora_params += (int64_t)c->lora_r * (m->layers[l].lin[k].in + m->layers[l].lin[k].out);
                numel[nt++] = (int64_t)c->lora_r * m->layers[l].lin[k].in;  /* lora_A (r, in) */
                numel[nt++] = (int64_t)m->layers[l].lin[k].out * c->lora_r; /* lora_B (out, r) */
            }
        if (lora_params - before > max_layer) max_layer = lora_params - before;
    }
    int save[LORA_N_SAVE];
    train_config_modules_to_save(c, save);
    for (int k = 0; k < LORA_N_SAVE; k++) /* modules_to_save: a (V, D) fp32 copy each, in the same arrays */
        if (save[k]) {
            lora_params += (int64_t)m->hp.vocab * m->hp.d_model;
            numel[nt++] = (int64_t)m->hp.vocab * m->hp.d_model;
        }
    int64_t opt_bytes = r->use_adamw8bit ? adamw8bit_state_bytes(numel, nt) : 0;
    if (r->use_adamw8bit && (c->fsdp_shard_grad_op || c->fsdp_full_shard) && r->world > 1) {
        /* this rank's part: its shard of the arena (A then B of each adapted linear, layer by layer) on the
         * block grid, as setup_optimizer cuts it */
        int64_t *off = malloc(((size_t)nt + 1) * sizeof *off), *cuts = malloc(((size_t)r->world + 1) * sizeof *cuts);
        if (!off || !cuts) {
            free(off);
            free(cuts);
            free(numel);
            return qerr_set(e, "out of memory");
        }
        for (int i = 0, at = 0; i < nt; at += (int)numel[i], i++) off[i] = at;
        ckpt_shard_cuts(lora_params, r->world, 1, off, numel, nt, cuts);
        opt_bytes = adamw8bit_state_bytes_range(off, numel, nt, cuts[r->rank], cuts[r->rank + 1]);
        free(off);
        free(cuts);
    }
    free(numel);
    struct stat model_st;
    memplan_input mpi = {.hp = m->hp, .B = c->micro_batch_size, .T = c->sequence_len,
                         .checkpointing = c->gradient_checkpointing, .bf16 = c->bf16 && !c->fp16, .lora_r = c->lora_r,
                         .lora_dropout = c->lora_dropout, .lora_params = lora_params, .optimizer_bytes = opt_bytes,
                         .frozen_bytes = m->quantized_bytes,
                         /* the mapped model file; FULL_SHARD gives its pages back after loading */
                         .extra_bytes = (!m->fsdp && stat(c->base_model, &model_st) == 0 ? (int64_t)model_st.st_size
                                                                                        : 0) +
                                        /* a trainable LM head: its GEMM operand (bf16, or an fp32 copy) */
                                        (save[LORA_SAVE_LM_HEAD] ? (int64_t)m->hp.vocab * m->hp.d_model *
                                                                       (c->bf16 && !c->fp16 ? 2 : 4)
                                                                 : 0),
                         /* four int32 arrays per position (ids, targets, positions, sequence ids), an int64
                          * permutation entry per training row */
                         .data_bytes = 16 * (r->train_set.n_rows * r->train_set.seq_len +
                                             r->eval_set.n_rows * r->eval_set.seq_len) +
                                       8 * r->train_set.n_rows,
                         .n_threads = r->n_threads,
                         .grad_accumulation = c->gradient_accumulation_steps,
                         .world = r->world,
                         .shard_optimizer = c->fsdp_shard_grad_op || c->fsdp_full_shard,
                         .shard_grads = c->fsdp_full_shard && r->world > 1 && ag_backend_default()->host_data,
                         .max_layer_params = max_layer,
                         .frozen_shard_bytes = m->fsdp ? (int64_t)llama_fsdp_resident_bytes(m->fsdp) : 0,
                         .table_shard_bytes = m->fsdp ? (int64_t)llama_fsdp_table_bytes(m->fsdp) : 0,
                         .gather_bytes = m->fsdp ? (int64_t)(llama_fsdp_scratch_bytes(m->fsdp) +
                                                             llama_fsdp_table_chunk_bytes(m->fsdp))
                                                 : 0};
    memplan_predict(&mpi, &r->plan);
    r->plan_on_device = !strcmp(ag_backend_default()->name, "cuda");
    if (r->plan_on_device) { /* the device's plan (as qlora-bench --device cuda --plan-only), and the host side */
        mpi.device_cuda = 1;
        memplan_predict(&mpi, &r->plan);
        memplan_predict_host_of_device(&mpi, &r->plan_host);
        double dfree = 0, dtotal = 0;
        if (ag_backend_cuda_mem_info(&dfree, &dtotal) == 0 && r->plan.total > dtotal) {
            char why[512];
            plan_why(r, &r->plan, why, sizeof why);
            if (!c->memory_check)
                fprintf(stderr, "[memory] memory_check: false: the predicted device peak %.0f MiB exceeds the "
                                "device's %.0f MiB; running anyway\n", r->plan.total / 1048576.0, dtotal / 1048576.0);
            else
                return qerr_set(e,
                                "%s: memory: the planner predicts a device peak of %.0f MiB, more than the CUDA "
                                "device's %.0f MiB; most of it is %s (or set memory_check: false to run anyway)",
                                r->cfgname, r->plan.total / 1048576.0, dtotal / 1048576.0, why);
        }
    }
    const memplan *p = r->plan_on_device ? &r->plan_host : &r->plan;
    const double M = 1048576.0;
    const char *what = NULL;
    const double have = memplan_machine_bytes(&what);
    /* ranks on this machine each hold a whole replica (data parallel) */
    const int nloc = r->comm->local_world_size > 1 ? r->comm->local_world_size : 1;
    const double need = p->total * nloc;
    char ranks_note[96] = "";
    if (nloc > 1) snprintf(ranks_note, sizeof ranks_note, " (%d ranks on this machine x %.0f MiB)", nloc, p->total / M);
    if (have > 0 && need > have) {
        if (!c->memory_check) {
            fprintf(stderr, "[memory] memory_check: false: the predicted peak %.0f MiB%s exceeds this machine's %.0f "
                            "MiB of %s; running anyway\n", need / M, ranks_note, have / M, what);
            return 0;
        }
        char why[512];
        plan_why(r, p, why, sizeof why);
        return qerr_set(e,
                        "%s: memory: the planner predicts a peak of %.0f MiB%s, more than this machine's %.0f MiB of "
                        "%s; most of it is %s (or set memory_check: false to run anyway)",
                        r->cfgname, need / M, ranks_note, have / M, what, why);
    }
    const double avail = memplan_available_bytes();
    if (avail >= 0 && need > avail)
        fprintf(stderr, "[memory] note: the predicted peak %.0f MiB%s is more than the %.0f MiB available now "
                        "(MemAvailable): the run may swap, or be killed if other processes keep their memory\n",
                need / M, ranks_note, avail / M);
    return 0;
}

/* FULL_SHARD: every rank's resident bytes of the frozen linears (a collective),
 * printed by rank 0: each is about 1/world of the whole. */
static int setup_fsdp_report(run_ctx *r, qerr *e) {
    const llama_fsdp *f = r->model.fsdp;
    int64_t mine = (int64_t)llama_fsdp_resident_bytes(f);
    int64_t *all = calloc((size_t)r->world, sizeof *all);
    if (!all) return qerr_set(e, "out of memory");
    if (comm_all_gather(r->comm, &mine, all, 1, COMM_I64, e)) {
        free(all);
        run_comm_fail(r, e);
    }
    const double whole = (double)r->model.quantized_bytes;
    char buf[512];
    int n = 0;
    for (int k = 0; k < r->world && n < (int)sizeof buf - 32; k++)
        n += snprintf(buf + n, sizeof buf - (size_t)n, "%s%lld (%.3f)", k ? ", " : "", (long long)all[k],
                      (double)all[k] / whole);
    char tables[200];
    if (f->tab_embd)
        snprintf(tables, sizeof tables, "embedding and LM head sharded too (%.1f MiB of rows on this rank, the head "
                 "gathered whole into the scratch when used); norms replicated", llama_fsdp_table_bytes(f) / 1048576.0);
    else
        snprintf(tables, sizeof tables, "embeddings, LM head, norms replicated (sharding the tables would free less "
                 "than the scratch would grow)");
    fprintf(stderr, "[fsdp] frozen linears sharded: bytes held per rank %s of %lld unsharded; %.0f MiB gather "
                    "scratch per rank (a layer of %zu bytes + the receive buffer of the next); %s\n",
            buf, (long long)r->model.quantized_bytes, llama_fsdp_scratch_bytes(f) / 1048576.0, f->lo.nbytes, tables);
    free(all);
    return 0;
}

/* The frozen weights (NF4 or bf16) and the LoRA adapters over them. */
static int setup_model(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    double t0 = clock_now_sec();
    if (c->fsdp_full_shard && !ag_backend_default()->host_data)
        return qerr_set(e, "%s: FULL_SHARD on the %s backend is not implemented (the device mirrors the frozen base "
                           "once; the sharded base is gathered into host scratches); use device: cpu, or "
                           "SHARD_GRAD_OP / NO_SHARD",
                        r->cfgname, ag_backend_default()->name);
    if (c->load_in_8bit && c->fsdp_full_shard)
        return qerr_set(e, "%s: FULL_SHARD of an int8 base (load_in_8bit) is not implemented; use load_in_4bit (NF4), "
                           "or SHARD_GRAD_OP / NO_SHARD",
                        r->cfgname);
    if (base_model_load_sharded(r->bm, c->load_in_8bit ? LLAMA_BASE_INT8 : c->load_in_4bit,
                                c->bnb_4bit_use_double_quant, c->sequence_len,
                                c->fsdp_full_shard ? r->comm : NULL, &r->model, e))
        return qerr_prefix(e, "%s: base_model %s", r->cfgname, c->base_model);
    if (r->model.fsdp && setup_fsdp_report(r, e)) return -1;
    const llama_model *m = &r->model;
    const llama_hparams *hp = &m->hp;
    fprintf(stderr, "[model] %s: %s, %d layers, d_model %d, heads %d/%d (head_dim %d), ffn %d, vocab %d, %s embeddings; %.1fs\n",
            c->base_model, llama_arch_name(hp->arch), hp->n_layer, hp->d_model, hp->n_head, hp->n_kv_head, hp->head_dim, hp->d_ff, hp->vocab,
            hp->tied_embeddings ? "tied" : "untied", clock_now_sec() - t0);
    fprintf(stderr, "[model] frozen linears: %.1fM params held %s in %.1f MiB = %.4f bytes/param; embeddings bf16 %.1f MiB\n",
            m->n_quantized_params / 1e6,
            c->load_in_8bit  ? "as int8 (bitsandbytes Int8Params: codes + fp32 row absmax)"
            : c->load_in_4bit ? (c->bnb_4bit_use_double_quant ? "as NF4 (blocksize 64, double-quant)" : "as NF4 (blocksize 64)") : "as bf16",
            m->quantized_bytes / 1048576.0, (double)m->quantized_bytes / (double)m->n_quantized_params,
            (double)hp->vocab * hp->d_model * 2 * (hp->tied_embeddings ? 1 : 2) / 1048576.0);
    r->res->quantized_bytes = m->quantized_bytes;
    r->res->n_quantized_params = m->n_quantized_params;

    int target[LLAMA_N_LINEAR];
    if (resolve_targets(r, hp, target, e)) return -1;
    if (check_modules_to_save(r, hp, e)) return -1;
    if (c->n_unfrozen_parameters > 0) { /* axolotl's freeze_layers_except over the PEFT names (trainer/unfreeze.h) */
        int save_u[LORA_N_SAVE];
        char note[1024];
        train_config_modules_to_save(c, save_u);
        if (unfreeze_decide(c->unfrozen_parameters, c->n_unfrozen_parameters, hp, target, save_u, note, sizeof note, e))
            return qerr_prefix(e, "%s", r->cfgname);
        fprintf(stderr, "[config] %s\n", note);
    }
    if (setup_memory_plan(r, target, e)) return -1;
    lora_set *ls = &r->ls;
    /* the adapters live in the memory of the backend the training context will use (ag_ctx_init) */
    int save[LORA_N_SAVE];
    train_config_modules_to_save(c, save);
    if (lora_set_init_saved(ls, ag_backend_default(), m, c->lora_r, c->lora_alpha, c->lora_dropout, c->use_rslora,
                            target, save, (uint64_t)c->seed, e))
        return -1;
    fprintf(stderr, "[lora] r %d, alpha %g, scaling %g%s, dropout %g; %lld trainable params (%.3f%% of %.1fM)\n",
            ls->r, ls->alpha, ls->scaling, c->use_rslora ? " (rsLoRA)" : "", ls->dropout, (long long)ls->n_params,
            100.0 * ls->n_params / (double)(m->n_params + ls->n_params), m->n_params / 1e6);
    if (adapter_table(ls, hp, &r->tensors, &r->n_tensors, e)) return -1;
    if (r->resuming && check_resume_adapter(r, e)) return -1;
    return 0;
}

/* The schedule, the memory plan, the autograd context, the optimizer state
 * and the batch buffers. */
static int setup_optimizer(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    r->mbs = c->micro_batch_size;
    r->gas = c->gradient_accumulation_steps;
    r->rows_per_step = (int64_t)r->mbs * r->gas * r->world;
    r->steps_per_epoch = (int)((r->train_set.n_rows + r->rows_per_step - 1) / r->rows_per_step);
    if (r->stream) /* axolotl: saves/evals_per_epoch are fractions of max_steps / num_epochs (no length) */
        r->steps_per_epoch = c->max_steps / c->num_epochs > 0 ? c->max_steps / c->num_epochs : 1;
    r->total_steps = c->max_steps > 0 ? c->max_steps : r->steps_per_epoch * c->num_epochs;
    r->warmup = train_config_warmup_steps(c, r->total_steps);
    r->eval_every = train_config_eval_interval(c, r->steps_per_epoch);
    r->save_every = train_config_save_interval(c, r->steps_per_epoch);
    if (lr_schedule_parse(c->lr_scheduler, &r->sk, e)) return -1;
    /* the resolved plan: strategy, what is sharded, the global batch, the per-rank memory */
    if (r->world > 1 || c->fsdp_full_shard || c->fsdp_shard_grad_op || c->fsdp_no_shard)
        fprintf(stderr, "[ranks] %d rank%s (%s, %s): global batch = micro_batch_size %d x "
                        "gradient_accumulation_steps %d x world_size %d = %lld rows of %d tokens; %s; per-rank "
                        "memory predicted %.0f MiB (the [memory] line); ddp_timeout %gs\n",
                r->world, r->world > 1 ? "s" : "", r->comm->ops->name,
                c->fsdp_full_shard      ? "FULL_SHARD"
                : c->fsdp_shard_grad_op ? "SHARD_GRAD_OP"
                                        : "data parallel, NO_SHARD",
                r->mbs, r->gas, r->world, (long long)r->rows_per_step, c->sequence_len,
                c->fsdp_full_shard
                    ? "sharded: the frozen linears (each rank loads and keeps 1/world_size of every layer, gathered "
                      "per layer before its forward, recompute and backward, the next layer's gather overlapped), "
                      "the gradients (reduce-scattered), the optimizer state and update (1/world_size of the adapters, "
                      "parameters all-gathered after it); replicated: embeddings, LM head, norms, adapters"
                : c->fsdp_shard_grad_op
                    ? "sharded: the gradients (reduce-scattered), the optimizer state and update (1/world_size of the "
                      "adapters, parameters all-gathered after it); replicated: the base and the adapters"
                    : "nothing sharded (each rank holds the base, the adapters and the optimizer state)",
                r->plan.total / 1048576.0, r->comm->timeout_sec);

    if (r->plan_on_device) { /* device: cuda: the device's plan as qlora-bench --device cuda --plan-only prints it, then the host side */
        char dname[256] = "?";
        double dmem = 0;
        ag_backend_cuda_device_name(dname, sizeof dname, &dmem);
        fprintf(stderr, "[memory] device (cuda: %s, %.0f MiB): predicted peak %.0f MiB\n", dname, dmem / 1048576.0,
                r->plan.total / 1048576.0);
        memplan_print_table(stderr, &r->plan);
        const memplan *h = &r->plan_host;
        fprintf(stderr,
                "[memory] host: predicted peak %.0f MiB = base %.0f (the frozen weights as loaded; the device mirrors "
                "them) + runtime %.0f (with the mapped model file and pinned staging) + data %.0f\n",
                h->total / 1048576.0, h->base / 1048576.0, h->runtime / 1048576.0, h->data / 1048576.0);
        if (h->host_offload > 0)
            fprintf(stderr, "[memory] host: + %.0f MiB pinned for gradient_checkpointing: offload's block inputs "
                            "(in the host peak)\n", h->host_offload / 1048576.0);
    } else
        memplan_print(stderr, &r->plan); /* predicted and checked in setup_model */

    if (ag_ctx_init(&r->ctx, memplan_arena_chunk(&r->plan), e)) return -1;
    r->ctx.bf16 = c->bf16 && !c->fp16; /* fp16: true: fp32 GEMMs over fp16-rounded operands */
    r->ctx.fp16 = c->fp16;
    scaler_init(r);
    if (r->resuming && strcmp(r->ck.optimizer, c->optimizer))
        return qerr_set(e, "%s: optimizer: %s holds %s state but this config says %s; resume with the optimizer it "
                           "was made with, or choose another output_dir",
                        r->cfgname, r->ck_dir, r->ck.optimizer, c->optimizer);
    /* an fp16 run's LR schedule counts the optimizer steps taken (steps minus GradScaler's skips): without
     * fp16 its skips would be forgotten and the schedule would jump */
    if (r->resuming && !c->fp16 && r->ck.loss_scale > 0 && r->ck.scaler_skipped > 0)
        return qerr_set(e, "%s: fp16: %s was made with fp16: true (GradScaler skipped %lld steps, which its LR "
                           "schedule does not count) and this config has fp16 off; resume with fp16: true, or "
                           "choose another output_dir",
                        r->cfgname, r->ck_dir, (long long)r->ck.scaler_skipped);
    /* SHARD_GRAD_OP: this rank's part of the flat arrays (the optimizer state covers only it) */
    r->sgo = c->fsdp_shard_grad_op != 0 || c->fsdp_full_shard != 0; /* FULL_SHARD: the same for the adapters */
    r->shard_len = (r->ls.n_params + r->world - 1) / r->world;
    r->shard_lo = 0, r->shard_hi = r->ls.n_params;
    /* the tensors of the arena (adamw_8bit's per-tensor state and block grid) */
    int64_t *off = malloc(((size_t)r->n_tensors + 1) * sizeof *off);
    int64_t *num = malloc(((size_t)r->n_tensors + 1) * sizeof *num);
    if (!off || !num) {
        free(off);
        free(num);
        return qerr_set(e, "out of memory");
    }
    for (int i = 0; i < r->n_tensors; i++) {
        off[i] = r->tensors[i].offset;
        num[i] = r->tensors[i].rows * r->tensors[i].cols;
    }
    if (r->sgo) {
        if (!(r->shard_cuts = malloc(((size_t)r->world + 1) * sizeof *r->shard_cuts))) {
            free(off);
            free(num);
            return qerr_set(e, "out of memory");
        }
        ckpt_shard_cuts(r->ls.n_params, r->world, r->use_adamw8bit, off, num, r->n_tensors, r->shard_cuts);
        r->shard_len = 0;
        for (int k = 0; k < r->world; k++)
            if (r->shard_cuts[k + 1] - r->shard_cuts[k] > r->shard_len) r->shard_len = r->shard_cuts[k + 1] - r->shard_cuts[k];
        if (r->shard_len < 1) r->shard_len = 1;
        r->shard_lo = r->shard_cuts[r->rank], r->shard_hi = r->shard_cuts[r->rank + 1];
    }
    const int64_t n_opt = r->shard_hi - r->shard_lo;
    /* several ranks: each layer's gradient reduced as soon as its backward is done (trainer/step.c), onto
     * [shard_cuts[k], shard_cuts[k + 1]) under SHARD_GRAD_OP / FULL_SHARD */
    if (r->world > 1 && llama_grad_buckets_init(&r->buckets, r->comm, &r->ls, r->ctx.be, r->sgo ? r->shard_cuts : NULL,
                                                c->fsdp_full_shard && r->ctx.be->host_data, e)) {
        free(off);
        free(num);
        return -1;
    }
    if (r->world > 1) r->model.grad_buckets = &r->buckets;
    if (r->use_adamw8bit) {
        int rc = r->sgo ? adamw8bit_state_init_range(&r->opt8, r->ctx.be, r->shard_lo, r->shard_hi, off, num,
                                                     r->n_tensors, e)
                        : adamw8bit_state_init(&r->opt8, r->ctx.be, r->ls.n_params, off, num, r->n_tensors, e);
        if (!rc) {
            int n8 = 0;
            for (int i = 0; i < r->n_tensors; i++) n8 += num[i] >= ADAMW8BIT_MIN_8BIT_SIZE;
            fprintf(stderr, "[optim] adamw_8bit (bitsandbytes' AdamW8bit): 8-bit blockwise moments (blocksize %d) for "
                            "%d of %d tensors (>= %d elements), fp32 for the rest; state %.1f MiB (fp32 AdamW: %.1f "
                            "MiB)%s\n", ADAMW8BIT_BLOCKSIZE, n8, r->n_tensors, ADAMW8BIT_MIN_8BIT_SIZE,
                    adamw8bit_state_bytes_range(off, num, r->n_tensors, r->shard_lo, r->shard_hi) / 1048576.0,
                    8.0 * (double)n_opt / 1048576.0, r->sgo ? " per rank (its shard, on the block grid)" : "");
        }
        free(off);
        free(num);
        if (rc) return -1;
    } else {
        free(off);
        free(num);
        /* SHARD_GRAD_OP / FULL_SHARD: the state of this rank's interval only */
        const int64_t n_state = r->sgo ? (n_opt > 0 ? n_opt : 1) : r->ls.n_params;
        if (r->use_sophia ? sophia_state_init_backend(&r->sop, r->ctx.be, n_state, e)
                          : adamw_state_init_backend(&r->opt, r->ctx.be, n_opt > 0 ? n_opt : 1, e))
            return -1;
        if (r->sgo && r->use_sophia) r->sop.n = n_opt;
    }
    if (r->sgo) r->opt.n = n_opt;
    r->soc = (sophia_config){.lr = c->learning_rate, .beta1 = c->sophia_beta1, .beta2 = c->sophia_beta2,
                             .rho = c->sophia_rho, .weight_decay = c->weight_decay, .k = c->sophia_k};
    if (r->use_sophia)
        fprintf(stderr, "[sophia] SophiaG: betas (%g, %g), rho %g, weight_decay %g, Hessian (GNB) every %d steps; bs = "
                        "%s\n", c->sophia_beta1, c->sophia_beta2, c->sophia_rho, c->weight_decay, c->sophia_k,
                c->sophia_bs > 0 ? "sophia_bs (fixed)" : "target tokens of each step");
    r->ac = (adamw_config){.lr = c->learning_rate, .beta1 = c->adam_beta1, .beta2 = c->adam_beta2,
                           .eps = c->adam_epsilon, .weight_decay = c->weight_decay};
    int64_t bb_n = (int64_t)(r->mbs > 0 ? r->mbs : 1) * c->sequence_len;
    r->bb.ids = malloc((size_t)bb_n * 4);
    r->bb.tgt = malloc((size_t)bb_n * 4);
    r->bb.pos = malloc((size_t)bb_n * 4);
    r->bb.sid = malloc((size_t)bb_n * 4);
    r->perm = malloc((size_t)r->train_set.n_rows * sizeof(int64_t));
    r->rows = malloc((size_t)r->rows_per_step * sizeof(int64_t));
    if (!r->bb.ids || !r->bb.tgt || !r->bb.pos || !r->bb.sid || !r->perm || !r->rows)
        return qerr_set(e, "out of memory");
    /* gradient accumulation adds whole micro-batch gradients (trainer/step.c) */
    if (r->gas > 1 && !(r->grad_acc = r->ctx.be->alloc((size_t)r->ls.n_params * sizeof(float))))
        return qerr_set(e, "out of memory (gradient accumulation buffer, %lld floats)", (long long)r->ls.n_params);
    return 0;
}

/* Every input is good: now output_dir may change. config.resolved.yaml, the
 * resumed state (run_resume), metrics.jsonl opened. */
static int setup_outputs(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    char path[4096];
    if (r->rank) { /* the other ranks restore the state and write nothing */
        int rc = r->resuming ? run_resume(r, &r->ck, e) : 0;
        ckpt_state_free(&r->ck);
        return rc;
    }
    snprintf(path, sizeof path, "%s/config.resolved.yaml", c->output_dir);
    if (train_config_write_yaml(c, path, e)) return -1;
    size_t cy_len = 0;
    if (!(r->config_yaml = file_read_all(path, &cy_len, e))) return -1;
    if (r->resuming) {
        int rc = run_resume(r, &r->ck, e);
        ckpt_state_free(&r->ck);
        if (rc) return -1;
    }
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->output_dir);
    if (metrics_open(path, r->resuming, &r->mw, e)) return -1;
    fprintf(stderr, "[train] %d steps (%d per epoch) x %d micro-batches x %d rows x %d tokens; lr %g %s, warmup %d; "
                    "%d threads; %s GEMMs; checkpoint every %d steps%s\n",
            r->total_steps, r->steps_per_epoch, r->gas, r->mbs, c->sequence_len, c->learning_rate, c->lr_scheduler,
            r->warmup, r->n_threads, c->fp16 ? "fp16-operand (fp32 accumulate, loss scaling)" : c->bf16 ? "bf16" : "fp32",
            r->save_every,
            c->save_total_limit > 0 ? " (keeping the newest save_total_limit)" : "");
    return 0;
}

int run_setup(run_ctx *r, const train_config *c, comm *cm, train_result *res, qerr *e) {
    memset(r, 0, sizeof *r);
    memset(res, 0, sizeof *res);
    r->c = c;
    r->comm = cm;
    r->rank = cm->rank;
    r->world = cm->world_size;
    r->res = res;
    r->t_start = clock_now_sec();
    r->cfgname = c->config_path ? c->config_path : "config";
    r->lock_fd = -1;
    r->use_sophia = !strcmp(c->optimizer, "sophia");
    r->use_adamw8bit = !strcmp(c->optimizer, "adamw_8bit");
    /* the state of a run that starts from step 0 (run_resume replaces it) */
    r->last_saved = -1;
    r->eval_loss_start = NAN;
    r->last_eval = NAN;
    r->last_eval_step = -1;
    r->epoch = -1;
    snprintf(r->last_ckpt, sizeof r->last_ckpt, "(none)");
    if (c->num_threads > 0) omp_set_num_threads(c->num_threads);
    r->n_threads = omp_get_max_threads();
    /* From the first line on: a SIGHUP or a closed output during the set-up (the model load, the starting
     * evaluation) once ended the run silently by the default action, right after its [train] line. Now it
     * is a stop request like any other: the first step runs, a checkpoint is saved, the run says so. */
    stop_handlers_install(r->old_sa);
    r->handlers = 1;
    if (setup_device(r, e) || setup_output_dir(r, e) || setup_check_inputs(r, e) || setup_resume_choice(r, e) ||
        setup_base_model(r, e) || setup_data(r, e) || setup_agree(r, e) || setup_model(r, e) || setup_optimizer(r, e) ||
        setup_outputs(r, e))
        return -1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* start, finish, teardown                                                    */

void run_start(run_ctx *r, qerr *e) {
    train_result *res = r->res;
    if (r->resuming) {
        res->eval_loss_start = r->eval_loss_start;
        res->eval_ppl_start = exp(r->eval_loss_start);
    } else if (r->eval_set.n_rows > 0) {
        r->eval_loss_start = run_eval(r, 0, e);
        res->eval_loss_start = r->eval_loss_start;
        res->eval_ppl_start = exp(r->eval_loss_start);
    } else {
        res->eval_loss_start = NAN;
        fprintf(stderr, "[eval] no held-out set (val_set_size 0 and no test_datasets): skipping evaluation\n");
    }
    if (r->start_step > r->total_steps)
        fprintf(stderr, "[checkpoint] the checkpoint is at step %d, past the %d steps of this config: nothing to "
                        "train\n", r->start_step, r->total_steps);
    r->final_step = r->start_step > r->total_steps ? r->start_step : r->total_steps;
    r->train_sec_at_start = r->train_sec;
    r->t_train = clock_now_sec();
}

int run_finish(run_ctx *r, qerr *e) {
    const train_config *c = r->c;
    train_result *res = r->res;
    if (r->use_sophia && r->steps_run > 0)
        fprintf(stderr, "[sophia] %lld Hessian updates in total; those of this run took %.1fs = %.1f%% of its %.1fs of "
                        "optimizer steps\n", (long long)r->sop.hessian_updates, r->sophia_hess_sec,
                r->train_sec > r->train_sec_at_start
                    ? 100.0 * r->sophia_hess_sec / (r->train_sec - r->train_sec_at_start) : 0.0,
                r->train_sec - r->train_sec_at_start);
    res->steps = r->steps_run;
    res->train_tokens_per_sec = r->steps_run ? r->tok_trained / (clock_now_sec() - r->t_train) : 0.0;
    if (!run_stop(r) && r->last_saved != r->final_step && r->start_step < r->total_steps &&
        run_checkpoint_save(r, r->final_step, e))
        return -1;
    /* read again: a stop request during that last save also ends the run here (as before several ranks) */
    const int stop = run_stop(r);
    if (stop) {
        res->interrupted = stop;
        res->interrupted_step = (int)r->last_saved;
        snprintf(res->checkpoint, sizeof res->checkpoint, "%s", r->last_ckpt);
        fprintf(stderr, "[checkpoint] stopped by %s after step %lld; state saved in %s\n",
                run_stop_signal_name(stop), (long long)r->last_saved, r->last_ckpt);
        return 0;
    }
    /* max_nan_steps stops a streak that long; a run shorter than that whose every step was skipped would
     * otherwise end as if it had trained */
    const int64_t applied = r->use_sophia ? r->sop.step : r->use_adamw8bit ? r->opt8.step : r->opt.step;
    if (r->final_step > 0 && applied == 0 && r->fp16 && r->scaler.skipped > 0)
        return qerr_set(e,
                        "no optimizer update was applied: %lld of the %d steps overflowed fp16 (GradScaler skipped "
                        "them, loss_scale now %g; any other had a NaN/Inf loss), so nothing was trained and no "
                        "adapter was written; train more steps (the scale halves at each overflow) or use bf16",
                        (long long)r->scaler.skipped, r->final_step, r->scaler.scale);
    if (r->final_step > 0 && applied == 0)
        return qerr_set(e,
                        "no optimizer update was applied: all %d steps had a NaN/Inf loss or gradient and were "
                        "skipped (max_nan_steps %d stops only that many in a row), so nothing was trained and no "
                        "adapter was written; base_model %s or the data give non-finite values",
                        r->final_step, c->max_nan_steps, c->base_model);

    /* held-out loss after training */
    if (r->eval_set.n_rows > 0) {
        double el = r->last_eval_step != r->final_step ? run_eval(r, r->final_step, e) : r->last_eval;
        res->eval_loss_end = el;
        res->eval_ppl_end = exp(el);
    }
    if (r->nan_skipped)
        fprintf(stderr, "[train] %lld step(s) had NaN/Inf loss or gradients and were skipped\n",
                (long long)r->nan_skipped);
    if (r->rank) return 0; /* rank 0 writes the outputs */
    metrics_writer *mw = r->mw;
    r->mw = NULL;
    if (metrics_close(mw, e)) return -1;

    /* outputs */
    if (run_write_adapter(r, c->output_dir, e)) return -1;
    /* save_total_limit also when this run saved nothing: a run killed between committing its last checkpoint
     * and rotating the old ones left one too many, and its re-run resumes at the end without saving */
    int ndel = 0;
    qerr why;
    if (c->save_total_limit > 0 && ckpt_prune(c->output_dir, c->save_total_limit, &ndel, &why))
        fprintf(stderr, "[checkpoint] warning: could not delete an older checkpoint beyond save_total_limit %d (%s); "
                        "delete it by hand\n", c->save_total_limit, why.msg);
    else if (ndel)
        fprintf(stderr, "[checkpoint] deleted %d older checkpoint%s beyond save_total_limit %d\n", ndel,
                ndel == 1 ? "" : "s", c->save_total_limit);
    char mpath[4096];
    snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", c->output_dir);
    if (plot_run_loss_curves(mpath, c->output_dir, e)) return -1;
    res->wall_seconds = clock_now_sec() - r->t_start;
    res->peak_rss_mib = proc_peak_rss_mib();
    const memplan *hp = r->plan_on_device ? &r->plan_host : &r->plan;
    fprintf(stderr, "[memory] peak RSS %.0f MiB (predicted %.0f MiB, %+.1f%%); activation arena peak %.0f MiB\n",
            res->peak_rss_mib, hp->total / 1048576.0,
            100.0 * (hp->total / 1048576.0 - res->peak_rss_mib) / res->peak_rss_mib,
            r->ctx.arena.peak / 1048576.0);
    double dfree = 0, dtotal = 0;
    if (r->plan_on_device && ag_backend_cuda_mem_info(&dfree, &dtotal) == 0)
        fprintf(stderr, "[memory] device: %.0f MiB in use at the end (cudaMemGetInfo: total - free, every process on "
                        "it; predicted peak %.0f MiB)\n", (dtotal - dfree) / 1048576.0, r->plan.total / 1048576.0);
    ag_offload_info oi;
    ag_offload_get_info(&r->ctx, &oi);
    if (oi.n_d2h > 0)
        fprintf(stderr, "[memory] gradient_checkpointing: offload: %lld block inputs to host memory (%.1f MiB), %lld "
                        "back ahead of their recompute; %.1f MiB pinned host, %.1f MiB device slots\n",
                (long long)oi.n_d2h, (double)oi.offloaded_bytes / 1048576.0, (long long)oi.n_h2d,
                (double)oi.host_bytes / 1048576.0, (double)oi.slot_bytes / 1048576.0);
    return 0;
}

void run_free(run_ctx *r) {
    if (r->handlers) stop_handlers_restore(r->old_sa);
    r->handlers = 0;
    if (r->mw) metrics_close(r->mw, NULL);
    r->mw = NULL;
    ckpt_state_free(&r->ck);
    free(r->tensors);
    free(r->config_yaml);
    free(r->perm);
    free(r->rows);
    free(r->bb.ids);
    free(r->bb.tgt);
    free(r->bb.pos);
    free(r->bb.sid);
    if (r->grad_acc) r->ctx.be->free(r->grad_acc);
    if (r->model.grad_buckets) {
        llama_grad_buckets_free(&r->buckets);
        r->model.grad_buckets = NULL;
    }
    free(r->shard_cuts);
    adamw_state_free(&r->opt);
    adamw8bit_state_free(&r->opt8);
    sophia_state_free(&r->sop);
    ag_ctx_free(&r->ctx);
    lora_set_free(&r->ls);
    llama_free(&r->model);
    packed_set_free(&r->train_set);
    packed_set_free(&r->eval_set);
    pretrain_stream_close(r->stream);
    tokenizer_free(r->tok);
    base_model_close(r->bm);
    if (r->lock_fd >= 0) close(r->lock_fd);
    memset(r, 0, sizeof *r);
    r->lock_fd = -1;
}
