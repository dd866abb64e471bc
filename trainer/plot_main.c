/* trainer/plot_main.c — `qlora-plot`: curves of several runs in one figure, and
 * a summary table of each run, from their metrics.jsonl files.
 *
 *   qlora-plot OUT.png|OUT.svg [--x step|time] [--y eval|train] LABEL=RUN ...
 *
 * OUT's extension picks the format (trainer/plot.h): ".svg" SVG, else PNG.
 * RUN is an output_dir (its metrics.jsonl is read) or a metrics.jsonl path.
 * --y eval (default): held-out loss at each evaluation; --y train: training
 * loss per step. --x step (default): optimizer step; --x time: seconds of
 * optimizer steps ("train_seconds", evaluation and checkpoint time excluded),
 * so runs are compared at equal compute. The table (stdout) gives per run the
 * steps, first and last held-out loss, train seconds, Sophia's Hessian seconds
 * and mean win rate. Used by scripts/compare_optimizers.sh.
 */
#include <cjson/cJSON.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/status.h"
#include "trainer/plot.h"

enum { MAX_RUNS = 8, MAX_POINTS = 100000 };

typedef struct run {
    char label[64];
    int n_train, n_eval;
    float *tstep, *tloss, *tsec; /* per train line */
    float *estep, *eloss;        /* per eval line */
    double hess_sec, win_sum, last_sec;
    int n_win, n_hess;
} run;

static double num(const cJSON *o, const char *k) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(it) ? it->valuedouble : NAN;
}

static int run_read(run *r, const char *where) {
    char path[4096];
    struct stat st;
    if (!stat(where, &st) && S_ISDIR(st.st_mode)) snprintf(path, sizeof path, "%s/metrics.jsonl", where);
    else snprintf(path, sizeof path, "%s", where);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "qlora-plot: cannot open %s\n", path);
        return -1;
    }
    r->tstep = calloc(MAX_POINTS, sizeof(float));
    r->tloss = calloc(MAX_POINTS, sizeof(float));
    r->tsec = calloc(MAX_POINTS, sizeof(float));
    r->estep = calloc(MAX_POINTS, sizeof(float));
    r->eloss = calloc(MAX_POINTS, sizeof(float));
    if (!r->tstep || !r->tloss || !r->tsec || !r->estep || !r->eloss) {
        fclose(f);
        return -1;
    }
    static char line[1 << 16];
    while (fgets(line, sizeof line, f)) {
        cJSON *o = cJSON_Parse(line);
        if (!o) continue; /* a partial last line */
        double step = num(o, "step");
        if (isfinite(num(o, "eval_loss")) && r->n_eval < MAX_POINTS) {
            r->estep[r->n_eval] = (float)step;
            r->eloss[r->n_eval++] = (float)num(o, "eval_loss");
        } else if (cJSON_GetObjectItemCaseSensitive(o, "loss") && r->n_train < MAX_POINTS) {
            r->tstep[r->n_train] = (float)step;
            r->tloss[r->n_train] = (float)num(o, "loss");
            r->tsec[r->n_train++] = (float)num(o, "train_seconds");
            if (isfinite(num(o, "train_seconds"))) r->last_sec = num(o, "train_seconds");
            double w = num(o, "sophia_win_rate"), h = num(o, "sophia_hessian_seconds");
            if (isfinite(w)) r->win_sum += w, r->n_win++;
            if (isfinite(h)) r->hess_sec += h, r->n_hess++;
        }
        cJSON_Delete(o);
    }
    fclose(f);
    return 0;
}

/* train_seconds at the end of `step` (0 at step 0; NAN if unknown). */
static float seconds_at(const run *r, float step) {
    if (step <= 0) return 0.0f;
    for (int i = r->n_train - 1; i >= 0; i--)
        if (r->tstep[i] == step) return r->tsec[i];
    return NAN;
}

int main(int argc, char **argv) {
    const char *out = NULL, *xmode = "step", *ymode = "eval";
    run runs[MAX_RUNS];
    int n = 0;
    memset(runs, 0, sizeof runs);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--x") && i + 1 < argc) xmode = argv[++i];
        else if (!strcmp(argv[i], "--y") && i + 1 < argc) ymode = argv[++i];
        else if (!out) out = argv[i];
        else {
            const char *eq = strchr(argv[i], '=');
            if (!eq || n == MAX_RUNS) {
                fprintf(stderr, "qlora-plot: expected LABEL=RUN (at most %d), got \"%s\"\n", MAX_RUNS, argv[i]);
                return 2;
            }
            snprintf(runs[n].label, sizeof runs[n].label, "%.*s", (int)(eq - argv[i]), argv[i]);
            if (run_read(&runs[n], eq + 1)) return 1;
            n++;
        }
    }
    int time_x = !strcmp(xmode, "time"), train_y = !strcmp(ymode, "train");
    if (!out || !n || (!time_x && strcmp(xmode, "step")) || (!train_y && strcmp(ymode, "eval"))) {
        fprintf(stderr, "usage: qlora-plot OUT.png|OUT.svg [--x step|time] [--y eval|train] LABEL=RUN ...\n"
                        "  OUT: a .svg name gives SVG, any other a PNG; RUN: an output_dir or a metrics.jsonl\n");
        return 2;
    }
    plot_series ps[MAX_RUNS];
    float *xs[MAX_RUNS];
    for (int k = 0; k < n; k++) {
        run *r = &runs[k];
        int np = train_y ? r->n_train : r->n_eval;
        const float *st = train_y ? r->tstep : r->estep;
        xs[k] = malloc(((size_t)np + 1) * sizeof(float));
        for (int i = 0; i < np; i++) xs[k][i] = time_x ? (train_y ? r->tsec[i] : seconds_at(r, st[i])) : st[i];
        ps[k] = (plot_series){.label = r->label, .x = xs[k], .y = train_y ? r->tloss : r->eloss, .n = np,
                              .markers = !train_y};
    }
    qerr e;
    int rc = plot_curves(out, ps, n, time_x ? "seconds of optimizer steps" : "step",
                             train_y ? "train loss" : "held-out loss", &e);
    if (rc) fprintf(stderr, "qlora-plot: %s\n", e.msg);
    printf("%-24s %6s %12s %12s %10s %12s %10s\n", "run", "steps", "eval_first", "eval_last", "train_s", "hessian_s",
           "win_mean");
    for (int k = 0; k < n; k++) {
        const run *r = &runs[k];
        printf("%-24s %6.0f %12.4f %12.4f %10.1f %12.1f %10.4f\n", r->label,
               r->n_train ? (double)r->tstep[r->n_train - 1] : 0.0, r->n_eval ? (double)r->eloss[0] : NAN,
               r->n_eval ? (double)r->eloss[r->n_eval - 1] : NAN, r->last_sec, r->n_hess ? r->hess_sec : NAN,
               r->n_win ? r->win_sum / r->n_win : NAN);
    }
    for (int k = 0; k < n; k++) {
        free(xs[k]);
        free(runs[k].tstep);
        free(runs[k].tloss);
        free(runs[k].tsec);
        free(runs[k].estep);
        free(runs[k].eloss);
    }
    return rc ? 1 : 0;
}
