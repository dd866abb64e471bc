/* trainer/metrics.c — metrics.jsonl writer (fprintf, one line per record,
 * flushed) and reader (cJSON). See metrics.h for the line formats. */
#include "trainer/metrics.h"

#include <cjson/cJSON.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct metrics_writer {
    FILE *f;
    char *path;
};

int metrics_open(const char *path, int append, metrics_writer **out, qerr *e) {
    *out = NULL;
    metrics_writer *w = qcalloc(1, sizeof *w, e);
    if (!w) return -1;
    size_t n = strlen(path);
    if (!(w->path = qmalloc(n + 1, e))) {
        free(w);
        return -1;
    }
    memcpy(w->path, path, n + 1);
    if (!(w->f = fopen(path, append ? "a" : "w"))) {
        qerr_set(e, "cannot open %s for writing: %s", path, strerror(errno));
        free(w->path);
        free(w);
        return -1;
    }
    *out = w;
    return 0;
}

/* Shortest JSON number that reads back to v: as a float32 if v is exactly a
 * float32 (losses and lrs usually are), else as a double; null if non-finite. */
static void fmt_num(char *buf, size_t n, double v) {
    if (!isfinite(v)) {
        snprintf(buf, n, "null");
        return;
    }
    int is_f32 = fabs(v) <= 3.4028234663852886e38 && (double)(float)v == v;
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, n, "%.*g", p, v);
        if (is_f32 ? strtof(buf, NULL) == (float)v : strtod(buf, NULL) == v) return;
    }
}

static int write_line(metrics_writer *w, const char *line, qerr *e) {
    size_t n = strlen(line);
    if (fwrite(line, 1, n, w->f) != n || fflush(w->f))
        return qerr_set(e, "cannot write %s: %s", w->path, strerror(errno));
    return 0;
}

int metrics_log_train_fields(metrics_writer *w, int64_t step, double loss, double lr, double grad_norm,
                             double tokens_per_sec, double epoch, const metrics_field *extra, int n_extra, qerr *e) {
    char a[40], b[40], c[40], d[40], f[40], line[320 + 16 * 80];
    fmt_num(a, sizeof a, loss);
    fmt_num(b, sizeof b, lr);
    fmt_num(c, sizeof c, grad_norm);
    fmt_num(d, sizeof d, tokens_per_sec);
    fmt_num(f, sizeof f, epoch);
    int len = snprintf(line, sizeof line,
                       "{\"step\": %lld, \"loss\": %s, \"lr\": %s, \"grad_norm\": %s, \"tokens_per_sec\": %s, \"epoch\": %s",
                       (long long)step, a, b, c, d, f);
    if (n_extra > 16) n_extra = 16;
    for (int i = 0; i < n_extra; i++) {
        char v[40];
        fmt_num(v, sizeof v, extra[i].value);
        len += snprintf(line + len, sizeof line - (size_t)len, ", \"%.40s\": %s", extra[i].name, v);
    }
    snprintf(line + len, sizeof line - (size_t)len, "}\n");
    return write_line(w, line, e);
}

int metrics_log_train(metrics_writer *w, int64_t step, double loss, double lr, double grad_norm,
                      double tokens_per_sec, double epoch, qerr *e) {
    return metrics_log_train_fields(w, step, loss, lr, grad_norm, tokens_per_sec, epoch, NULL, 0, e);
}

int metrics_log_eval(metrics_writer *w, int64_t step, double eval_loss, double eval_ppl, int64_t eval_tokens,
                     qerr *e) {
    char a[40], b[40], line[200];
    fmt_num(a, sizeof a, eval_loss);
    fmt_num(b, sizeof b, eval_ppl);
    snprintf(line, sizeof line, "{\"step\": %lld, \"eval_loss\": %s, \"eval_ppl\": %s, \"eval_tokens\": %lld}\n",
             (long long)step, a, b, (long long)eval_tokens);
    return write_line(w, line, e);
}

int metrics_close(metrics_writer *w, qerr *e) {
    if (!w) return 0;
    int rc = 0;
    if (fclose(w->f)) rc = qerr_set(e, "cannot close %s: %s", w->path, strerror(errno));
    free(w->path);
    free(w);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Reader                                                                    */

void metrics_series_free(metrics_series *s) {
    if (!s) return;
    free(s->train_step);
    free(s->train_loss);
    free(s->train_lr);
    free(s->train_grad_norm);
    free(s->train_tokens_per_sec);
    free(s->train_epoch);
    free(s->eval_step);
    free(s->eval_loss);
    free(s->eval_ppl);
    free(s->eval_tokens);
    memset(s, 0, sizeof *s);
}

/* Number field, NAN if missing or null; -1 if present with a non-number. */
static int get_num(const cJSON *o, const char *key, double *out) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    *out = NAN;
    if (!it || cJSON_IsNull(it)) return 0;
    if (!cJSON_IsNumber(it)) return -1;
    *out = it->valuedouble;
    return 0;
}

static int grow(void **p, size_t elem, int cap, qerr *e) {
    void *q = realloc(*p, (size_t)cap * elem);
    if (!q) return qerr_set(e, "out of memory");
    *p = q;
    return 0;
}

int metrics_read(const char *path, metrics_series *out, qerr *e) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "r");
    if (!f) return qerr_set(e, "cannot open %s: %s", path, strerror(errno));
    metrics_series s;
    memset(&s, 0, sizeof s);
    int cap_t = 0, cap_e = 0, rc = -1;
    long lineno = 0;
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    while ((len = getline(&line, &lcap, f)) >= 0) {
        lineno++;
        int complete = len > 0 && line[len - 1] == '\n';
        const char *q = line;
        while (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n') q++;
        if (!*q) continue;
        cJSON *o = cJSON_ParseWithLength(line, (size_t)len);
        if (!o || !cJSON_IsObject(o)) {
            cJSON_Delete(o);
            if (!complete) break; /* interrupted last write */
            qerr_set(e, "%s:%ld: not a JSON object", path, lineno);
            goto done;
        }
        double step, v[6];
        int bad = get_num(o, "step", &step);
        if (cJSON_GetObjectItemCaseSensitive(o, "eval_loss")) {
            bad |= get_num(o, "eval_loss", &v[0]) | get_num(o, "eval_ppl", &v[1]) | get_num(o, "eval_tokens", &v[2]);
            if (!bad) {
                if (s.n_eval == cap_e) {
                    cap_e = cap_e ? 2 * cap_e : 64;
                    if (grow((void **)&s.eval_step, sizeof(float), cap_e, e) ||
                        grow((void **)&s.eval_loss, sizeof(float), cap_e, e) ||
                        grow((void **)&s.eval_ppl, sizeof(float), cap_e, e) ||
                        grow((void **)&s.eval_tokens, sizeof(double), cap_e, e)) {
                        cJSON_Delete(o);
                        goto done;
                    }
                }
                s.eval_step[s.n_eval] = (float)step;
                s.eval_loss[s.n_eval] = (float)v[0];
                s.eval_ppl[s.n_eval] = (float)v[1];
                s.eval_tokens[s.n_eval] = v[2];
                s.n_eval++;
            }
        } else if (cJSON_GetObjectItemCaseSensitive(o, "loss")) {
            static const char *const K[6] = {"loss", "lr", "grad_norm", "tokens_per_sec", "epoch", NULL};
            for (int i = 0; K[i]; i++) bad |= get_num(o, K[i], &v[i]);
            if (!bad) {
                if (s.n_train == cap_t) {
                    cap_t = cap_t ? 2 * cap_t : 256;
                    float **cols[6] = {&s.train_step, &s.train_loss, &s.train_lr, &s.train_grad_norm,
                                       &s.train_tokens_per_sec, &s.train_epoch};
                    for (int i = 0; i < 6; i++)
                        if (grow((void **)cols[i], sizeof(float), cap_t, e)) {
                            cJSON_Delete(o);
                            goto done;
                        }
                }
                s.train_step[s.n_train] = (float)step;
                s.train_loss[s.n_train] = (float)v[0];
                s.train_lr[s.n_train] = (float)v[1];
                s.train_grad_norm[s.n_train] = (float)v[2];
                s.train_tokens_per_sec[s.n_train] = (float)v[3];
                s.train_epoch[s.n_train] = (float)v[4];
                s.n_train++;
            }
        }
        cJSON_Delete(o);
        if (bad) {
            qerr_set(e, "%s:%ld: a metrics field is not a number", path, lineno);
            goto done;
        }
    }
    if (ferror(f)) {
        qerr_set(e, "cannot read %s: %s", path, strerror(errno));
        goto done;
    }
    *out = s;
    memset(&s, 0, sizeof s);
    rc = 0;
done:
    free(line);
    fclose(f);
    metrics_series_free(&s);
    return rc;
}
