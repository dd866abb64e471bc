/* trainer/main.c — `qlora-train config.yaml [key=value ...]`.
 *
 * Exit status: 0 success, 1 the run failed (message on stderr), 2 bad usage
 * or an invalid config, 128 + signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP, 141
 * when stdout or stderr was closed) when training stopped after saving a
 * checkpoint (re-running resumes). Every error
 * is one line naming the file and field.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/gemm.h"
#include "trainer/config.h"
#include "trainer/run.h"
#include "trainer/train.h"

#define QLORA_VERSION "0.1.0"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora-train CONFIG.yaml [key=value ...]\n"
            "  Fine-tune a LoRA/QLoRA adapter on a GGUF Llama-family model (axolotl config keys).\n"
            "  key=value overrides a config key, e.g. max_steps=20 lora_r=16 'lora_target_modules=[q_proj,v_proj]'\n"
            "  Checkpoints go to output_dir/checkpoint-<step>/; re-running the same command resumes from the\n"
            "  newest complete one. Ctrl-C (SIGINT), SIGTERM, SIGHUP or a closed output finishes the step, saves a\n"
            "  checkpoint and stops (exit 130, 143, 129, 141).\n"
            "  --help, --version\n");
}

int main(int argc, char **argv) {
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        usage(stdout);
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("qlora-train %s\n", QLORA_VERSION);
        return 0;
    }
    if (argc < 2 || strchr(argv[1], '=')) {
        usage(stderr);
        return 2;
    }
    qerr e = {{0}};
    train_config c;
    train_config_refusals refused;
    if (train_config_load_all(argv[1], &c, &refused, &e)) {
        /* every refused key of the file, each on its line, then how many */
        for (int i = 0; refused.n > 1 && i < refused.n; i++) fprintf(stderr, "qlora-train: %s\n", refused.lines[i]);
        fprintf(stderr, "qlora-train: %s\n", e.msg);
        train_config_refusals_free(&refused);
        return 2;
    }
    train_config_refusals_free(&refused);
    for (int i = 2; i < argc; i++) {
        if (train_config_apply_override(&c, argv[i], &e)) {
            fprintf(stderr, "qlora-train: %s\n", e.msg);
            train_config_free(&c);
            return 2;
        }
    }
    if (train_config_validate(&c, &e)) {
        fprintf(stderr, "qlora-train: %s\n", e.msg);
        train_config_free(&c);
        return 2;
    }
    for (int i = 0; i < c.n_warnings; i++) fprintf(stderr, "[config] %s\n", c.warnings[i]);

    train_result r;
    int rc = train_run(&c, &r, &e);
    if (rc) {
        fprintf(stderr, "qlora-train: %s\n", e.msg);
        train_config_free(&c);
        gemm_shutdown();
        return 1;
    }
    if (r.interrupted) {
        /* 128 + signal, the shell's convention for "stopped by that signal":
         * the run did not finish, and scripts must not mistake it for done. */
        char cmd[2048] = "";
        for (int i = 0; i < argc; i++) {
            size_t l = strlen(cmd);
            int quote = strpbrk(argv[i], " \t'\"[]{}$*?;&|<>()") != NULL;
            snprintf(cmd + l, sizeof cmd - l, i ? (quote ? " '%s'" : " %s") : (quote ? "'%s'" : "%s"), argv[i]);
        }
        fprintf(stderr,
                "qlora-train: stopped by %s after step %d; checkpoint %s is complete. Resume with the same "
                "command:\n  %s\n",
                run_stop_signal_name(r.interrupted),
                r.interrupted_step, r.checkpoint, cmd);
        train_config_free(&c);
        gemm_shutdown();
        return 128 + r.interrupted;
    }
    if (r.eval_loss_start > 0)
        fprintf(stderr, "[done] held-out loss %.4f -> %.4f (perplexity %.2f -> %.2f)\n", r.eval_loss_start,
                r.eval_loss_end, r.eval_ppl_start, r.eval_ppl_end);
    fprintf(stderr, "[done] %d steps, %.0f train tok/s, wall %.0fs, peak RSS %.0f MiB; adapter in %s\n", r.steps,
            r.train_tokens_per_sec, r.wall_seconds, r.peak_rss_mib, c.output_dir);
    train_config_free(&c);
    gemm_shutdown();
    return 0;
}
