/* tests/test_metrics_plot.c — trainer/metrics (write, flush, read back, the
 * partial-last-line rule) and trainer/plot (a PNG read back with libpng: size
 * and the series colours present). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/tmpdir.h"
#include "trainer/metrics.h"
#include "trainer/plot.h"

static int group_setup(void **state) { return tmpdir_setup(state, "qlora_test_metrics"); }

static long count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long n = 0;
    int ch;
    while ((ch = fgetc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

static void test_metrics_round_trip(void **state) {
    const tmpdir *t = *state;
    char path[128];
    snprintf(path, sizeof path, "%s/metrics.jsonl", t->dir);
    metrics_writer *w;
    qerr e = {{0}};
    assert_int_equal(metrics_open(path, 0, &w, &e), 0);
    assert_int_equal(metrics_log_eval(w, 0, 3.25, exp(3.25), 40960, &e), 0);
    for (int s = 1; s <= 10; s++) {
        float loss = 3.0f - 0.1f * (float)s;
        assert_int_equal(metrics_log_train(w, s, loss, 2e-4f * (float)s / 10.0f, 0.5 + s, 1234.5, s / 10.0, &e), 0);
        assert_int_equal(count_lines(path), s + 1); /* flushed per line */
    }
    assert_int_equal(metrics_log_train(w, 11, NAN, 1e-4, INFINITY, 0, 1.1, &e), 0);
    assert_int_equal(metrics_log_eval(w, 11, 2.5, exp(2.5), 40960, &e), 0);
    assert_int_equal(metrics_close(w, &e), 0);

    /* the exact text of one line */
    FILE *f = fopen(path, "r");
    char line[512];
    assert_non_null(fgets(line, sizeof line, f));
    assert_non_null(fgets(line, sizeof line, f));
    fclose(f);
    assert_string_equal(line, "{\"step\": 1, \"loss\": 2.9, \"lr\": 2e-05, \"grad_norm\": 1.5, "
                              "\"tokens_per_sec\": 1234.5, \"epoch\": 0.1}\n");

    /* append keeps what is there */
    assert_int_equal(metrics_open(path, 1, &w, &e), 0);
    assert_int_equal(metrics_log_train(w, 12, 1.5, 1e-4, 0.25, 1000, 1.2, &e), 0);
    assert_int_equal(metrics_close(w, &e), 0);

    metrics_series s;
    assert_int_equal(metrics_read(path, &s, &e), 0);
    assert_int_equal(s.n_train, 12);
    assert_int_equal(s.n_eval, 2);
    for (int i = 0; i < 10; i++) {
        assert_true(s.train_step[i] == (float)(i + 1));
        assert_true(s.train_loss[i] == 3.0f - 0.1f * (float)(i + 1)); /* exact float round trip */
        assert_true(s.train_lr[i] == 2e-4f * (float)(i + 1) / 10.0f);
        assert_true(s.train_grad_norm[i] == 0.5f + (float)(i + 1));
        assert_true(s.train_tokens_per_sec[i] == 1234.5f);
        assert_true(s.train_epoch[i] == (float)((i + 1) / 10.0));
    }
    assert_true(isnan(s.train_loss[10]));
    assert_true(isnan(s.train_grad_norm[10]));
    assert_true(s.train_step[11] == 12.0f && s.train_loss[11] == 1.5f);
    assert_true(s.eval_step[0] == 0.0f && s.eval_loss[0] == 3.25f);
    assert_true(fabsf(s.eval_ppl[1] - (float)exp(2.5)) < 1e-4f);
    assert_true(s.eval_tokens[1] == 40960.0);
    metrics_series_free(&s);

    /* an interrupted last line (no newline) is dropped... */
    f = fopen(path, "a");
    fputs("{\"step\": 13, \"loss\": 1.4, \"l", f);
    fclose(f);
    assert_int_equal(metrics_read(path, &s, &e), 0);
    assert_int_equal(s.n_train, 12);
    metrics_series_free(&s);
    /* ...but a malformed complete line is an error naming the line */
    f = fopen(path, "a");
    fputs("r\": oops}\n{\"step\": 14, \"loss\": 1.3}\n", f);
    fclose(f);
    assert_int_equal(metrics_read(path, &s, &e), -1);
    assert_non_null(strstr(e.msg, "metrics.jsonl:15: not a JSON object"));
    assert_int_equal(s.n_train, 0);
    f = fopen(path, "w");
    fputs("{\"step\": 1, \"loss\": \"high\"}\n", f);
    fclose(f);
    assert_int_equal(metrics_read(path, &s, &e), -1);
    assert_non_null(strstr(e.msg, "metrics.jsonl:1: a metrics field is not a number"));
    assert_int_equal(metrics_read("/nonexistent/m.jsonl", &s, &e), -1);
    assert_int_equal(metrics_open("/nonexistent/m.jsonl", 0, &w, &e), -1);
    assert_non_null(strstr(e.msg, "cannot open /nonexistent/m.jsonl for writing"));
}

/* Read an RGB PNG with libpng's simplified API. */
static uint8_t *read_png_rgb(const char *path, int *w, int *h) {
    png_image img;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_file(&img, path)) return NULL;
    img.format = PNG_FORMAT_RGB;
    uint8_t *buf = malloc(PNG_IMAGE_SIZE(img));
    if (!buf || !png_image_finish_read(&img, NULL, buf, 0, NULL)) {
        free(buf);
        png_image_free(&img);
        return NULL;
    }
    *w = (int)img.width;
    *h = (int)img.height;
    return buf;
}

static long count_colour(const uint8_t *px, int w, int h, int r, int g, int b) {
    long n = 0;
    for (long i = 0; i < (long)w * h; i++) n += px[3 * i] == r && px[3 * i + 1] == g && px[3 * i + 2] == b;
    return n;
}

static void test_plot_png(void **state) {
    const tmpdir *t = *state;
    char path[128], tmp[160];
    snprintf(path, sizeof path, "%s/loss.png", t->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    enum { NT = 300, NE = 7 };
    float ts[NT], tl[NT], es[NE], el[NE];
    for (int i = 0; i < NT; i++) {
        ts[i] = (float)(i + 1);
        tl[i] = 2.0f + 1.5f * expf(-(float)i / 60.0f) + 0.08f * sinf((float)i * 0.7f);
    }
    tl[150] = NAN; /* a gap */
    for (int i = 0; i < NE; i++) {
        es[i] = (float)(i * 50);
        el[i] = 2.1f + 1.4f * expf(-(float)(i * 50) / 70.0f);
    }
    qerr e = {{0}};
    if (plot_loss_png(path, ts, tl, NT, es, el, NE, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    assert_int_equal(access(tmp, F_OK), -1);
    int w = 0, h = 0;
    uint8_t *px = read_png_rgb(path, &w, &h);
    assert_non_null(px);
    assert_int_equal(w, PLOT_WIDTH);
    assert_int_equal(h, PLOT_HEIGHT);
    long n_train = count_colour(px, w, h, 31, 119, 180), n_eval = count_colour(px, w, h, 255, 127, 14);
    long n_white = count_colour(px, w, h, 255, 255, 255), n_text = count_colour(px, w, h, 30, 30, 30);
    assert_true(n_train > 500); /* a 2-px line across ~680 px */
    assert_true(n_eval > 7 * 20); /* 7 markers of radius 4 + line */
    assert_true(n_white > w * h / 2);
    assert_true(n_text > 200); /* tick labels */
    free(px);

    /* empty series still give a valid (axes-only) image */
    assert_int_equal(plot_loss_png(path, NULL, NULL, 0, NULL, NULL, 0, &e), 0);
    px = read_png_rgb(path, &w, &h);
    assert_non_null(px);
    assert_int_equal(count_colour(px, w, h, 31, 119, 180), 0);
    free(px);
    /* one point of each */
    assert_int_equal(plot_loss_png(path, ts, tl, 1, es, el, 1, &e), 0);

    assert_int_equal(plot_loss_png("/nonexistent/dir/x.png", ts, tl, NT, es, el, NE, &e), -1);
    assert_non_null(strstr(e.msg, "cannot create /nonexistent/dir/x.png.tmp"));
}

static void test_plot_from_metrics(void **state) {
    const tmpdir *t = *state;
    char mpath[128], ppath[128];
    snprintf(mpath, sizeof mpath, "%s/m2.jsonl", t->dir);
    snprintf(ppath, sizeof ppath, "%s/m2.png", t->dir);
    metrics_writer *w;
    qerr e = {{0}};
    assert_int_equal(metrics_open(mpath, 0, &w, &e), 0);
    metrics_log_eval(w, 0, 2.9, exp(2.9), 1000, &e);
    for (int s = 1; s <= 40; s++) metrics_log_train(w, s, 3.0 - 0.02 * s, 2e-4, 1.0, 100, s / 40.0, &e);
    metrics_log_eval(w, 40, 2.3, exp(2.3), 1000, &e);
    assert_int_equal(metrics_close(w, &e), 0);
    assert_int_equal(plot_metrics_png(mpath, ppath, &e), 0);
    int pw, ph;
    uint8_t *px = read_png_rgb(ppath, &pw, &ph);
    assert_non_null(px);
    assert_true(count_colour(px, pw, ph, 31, 119, 180) > 100);
    assert_true(count_colour(px, pw, ph, 255, 127, 14) > 40);
    free(px);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_round_trip),
        cmocka_unit_test(test_plot_png),
        cmocka_unit_test(test_plot_from_metrics),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
