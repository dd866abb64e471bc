/* tests/test_metrics_plot.c — trainer/metrics (write, flush, read back, the
 * partial-last-line rule) and trainer/plot: the PNG read back with cairo (size,
 * the curves where the data put them: a falling train line with its gap, a
 * flat held-out line with one marker per evaluation) and the SVG (a complete
 * SVG 1.1 document whose train path has one vertex per finite point, each of
 * them on the PNG's train line). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cairo.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/file.h"
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

/* An RGB PNG read back with cairo: (h, w, 3) bytes, malloc'd; NULL if it is not a PNG. */
static uint8_t *read_png_rgb(const char *path, int *w, int *h) {
    cairo_surface_t *sf = cairo_image_surface_create_from_png(path);
    if (cairo_surface_status(sf) != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(sf);
        return NULL;
    }
    cairo_surface_flush(sf);
    *w = cairo_image_surface_get_width(sf);
    *h = cairo_image_surface_get_height(sf);
    int stride = cairo_image_surface_get_stride(sf);
    const uint8_t *d = cairo_image_surface_get_data(sf);
    uint8_t *px = malloc((size_t)*w * (size_t)*h * 3);
    assert_non_null(px);
    for (int y = 0; y < *h; y++)
        for (int x = 0; x < *w; x++) { /* RGB24 / ARGB32: one native-endian 0xAARRGGBB word a pixel */
            uint32_t v;
            memcpy(&v, d + (size_t)y * stride + 4 * (size_t)x, 4);
            uint8_t *q = px + ((size_t)y * *w + x) * 3;
            q[0] = (uint8_t)(v >> 16), q[1] = (uint8_t)(v >> 8), q[2] = (uint8_t)v;
        }
    cairo_surface_destroy(sf);
    return px;
}

static const uint8_t BLUE[3] = {31, 119, 180}, ORANGE[3] = {255, 127, 14};

/* Pixel (x, y) within `tol` (sum of channel differences) of colour c. */
static int near(const uint8_t *px, int w, int x, int y, const uint8_t c[3], int tol) {
    const uint8_t *q = px + ((size_t)y * w + x) * 3;
    return abs(q[0] - c[0]) + abs(q[1] - c[1]) + abs(q[2] - c[2]) <= tol;
}

static long count_near(const uint8_t *px, int w, int h, const uint8_t c[3]) {
    long n = 0;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) n += near(px, w, x, y, c, 40);
    return n;
}

/* The legend sits top right inside the plot: curve checks skip that corner. */
static int in_legend(int x, int y) { return x > PLOT_WIDTH / 2 && y < 120; }

/* Mean row of the pixels of colour c in columns [x0, x1), outside the legend; -1 if none. */
static double mean_row(const uint8_t *px, int w, int h, const uint8_t c[3], int x0, int x1) {
    double sum = 0;
    long n = 0;
    for (int y = 0; y < h; y++)
        for (int x = x0; x < x1; x++)
            if (!in_legend(x, y) && near(px, w, x, y, c, 40)) sum += y, n++;
    return n ? sum / (double)n : -1;
}

/* Does column x hold a pixel of colour c (outside the legend)? */
static int column_has(const uint8_t *px, int w, int h, const uint8_t c[3], int x) {
    for (int y = 0; y < h; y++)
        if (!in_legend(x, y) && near(px, w, x, y, c, 40)) return 1;
    return 0;
}

/* The vertices of the first path stroked in `rgb` (cairo's SVG: a style with
 * "stroke:rgb(...)", then d="M x y L x y ..."), at most max; returns the count
 * and *moves the number of sub-paths (M). cairo merges consecutive collinear
 * segments, so a straight run of points may give fewer vertices. */
static int svg_path_vertices(const char *svg, const char *rgb, double *xy, int max, int *moves) {
    char key[96];
    snprintf(key, sizeof key, "stroke:%s;", rgb);
    const char *p = strstr(svg, key);
    *moves = 0;
    if (!p || !(p = strstr(p, "d=\""))) return 0;
    p += 3;
    int n = 0;
    while (*p && *p != '"' && n < max) {
        char op;
        double x, y;
        int used = 0;
        if (sscanf(p, " %c %lf %lf%n", &op, &x, &y, &used) != 3 || (op != 'M' && op != 'L')) break;
        *moves += op == 'M';
        xy[2 * n] = x, xy[2 * n + 1] = y;
        n++;
        p += used;
    }
    return n;
}

static void test_plot_png_svg(void **state) {
    const tmpdir *t = *state;
    char path[128], svg_path[128], tmp[160];
    snprintf(path, sizeof path, "%s/loss.png", t->dir);
    snprintf(svg_path, sizeof svg_path, "%s/loss.svg", t->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    /* train loss falls in a straight line from 4 to 2 with a gap (NaN) over
     * steps 141..160; held-out loss is flat at 3, evaluated 7 times */
    enum { NT = 300, NE = 7, GAP0 = 140, GAP1 = 160 };
    float ts[NT], tl[NT], es[NE], el[NE];
    for (int i = 0; i < NT; i++) {
        ts[i] = (float)(i + 1);
        tl[i] = (i >= GAP0 && i < GAP1) ? NAN : 4.0f - 2.0f * (float)i / (NT - 1);
    }
    for (int i = 0; i < NE; i++) {
        es[i] = (float)(i * 50);
        el[i] = 3.0f;
    }
    qerr e = {{0}};
    if (plot_loss(path, ts, tl, NT, es, el, NE, &e) || plot_loss(svg_path, ts, tl, NT, es, el, NE, &e)) {
        print_error("%s\n", e.msg);
        fail();
    }
    assert_int_equal(access(tmp, F_OK), -1);
    int w = 0, h = 0;
    uint8_t *px = read_png_rgb(path, &w, &h);
    assert_non_null(px);
    assert_int_equal(w, PLOT_WIDTH);
    assert_int_equal(h, PLOT_HEIGHT);
    long white = 0, dark = 0;
    for (long i = 0; i < (long)w * h; i++) {
        int sum = px[3 * i] + px[3 * i + 1] + px[3 * i + 2];
        white += sum == 3 * 255, dark += sum < 3 * 80;
    }
    assert_true(white > (long)w * h / 2);
    assert_true(dark > 300); /* axes, ticks and their labels */
    assert_true(count_near(px, w, h, BLUE) > 600); /* a 2-px line across ~650 px */

    /* the train line falls from left to right */
    double left = mean_row(px, w, h, BLUE, 0, w / 4), right = mean_row(px, w, h, BLUE, 3 * w / 4, w);
    assert_true(left > 0 && right > 0);
    assert_true(right - left > 0.5 * (h / 2));
    /* ... and breaks at the gap: a run of empty columns between drawn ones */
    int run = 0, best = 0, seen = 0;
    for (int x = 0; x < w; x++) {
        int has = column_has(px, w, h, BLUE, x);
        if (has && run > best) best = run; /* an empty run closed by a drawn column */
        if (has) seen = 1, run = 0;
        else if (seen) run++;
    }
    assert_true(best >= 30 && best <= 60); /* 20 steps of 300 over ~650 px, less the round caps */
    /* the held-out line is flat at 3 (between the train line's ends), with 7 markers */
    long lo = h, hi = -1;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            if (!in_legend(x, y) && near(px, w, x, y, ORANGE, 40)) lo = y < lo ? y : lo, hi = y > hi ? y : hi;
    assert_true(hi >= 0 && hi - lo <= 10);
    assert_true(lo > left && hi < right);
    int markers = 0, in_marker = 0;
    for (int x = 0; x < w; x++) {
        int tall = 0;
        for (int y = (int)lo; y <= hi; y++) tall += near(px, w, x, y, ORANGE, 40);
        if (tall >= 5 && !in_marker) markers++;
        in_marker = tall >= 5;
    }
    assert_int_equal(markers, NE);

    /* the SVG: a whole document of the same size whose train path has two
     * sub-paths (the gap), going right and down, every vertex on the PNG's line */
    size_t n = 0;
    char *svg = file_read_all(svg_path, &n, NULL);
    assert_non_null(svg);
    assert_int_equal(strncmp(svg, "<?xml", 5), 0);
    assert_non_null(strstr(svg, "<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert_non_null(strstr(svg, "width=\"800pt\" height=\"500pt\""));
    assert_non_null(strstr(svg + n - 10, "</svg>"));
    assert_non_null(strstr(svg, "stroke:rgb(100%,49.803922%,5.490196%);")); /* orange */
    static double xy[2 * NT];
    int moves = 0, nv = svg_path_vertices(svg, "rgb(12.156863%,46.666667%,70.588235%)", xy, NT, &moves);
    assert_int_equal(moves, 2);
    assert_true(nv >= 4 && xy[2 * nv - 2] - xy[0] > w / 2.0);
    for (int i = 0; i < nv; i++) {
        int x = (int)floor(xy[2 * i]), y = (int)floor(xy[2 * i + 1]);
        if (i) assert_true(xy[2 * i] > xy[2 * i - 2] && xy[2 * i + 1] > xy[2 * i - 1]); /* right and down */
        assert_true(x >= 0 && x < w && y >= 0 && y < h);
        assert_true(near(px, w, x, y, BLUE, 60));
    }
    free(svg);
    free(px);

    /* empty series still give a valid (axes-only) image */
    assert_int_equal(plot_loss(path, NULL, NULL, 0, NULL, NULL, 0, &e), 0);
    px = read_png_rgb(path, &w, &h);
    assert_non_null(px);
    assert_int_equal(count_near(px, w, h, BLUE), 0);
    free(px);
    /* one point of each */
    assert_int_equal(plot_loss(path, ts, tl, 1, es, el, 1, &e), 0);
    px = read_png_rgb(path, &w, &h);
    assert_non_null(px);
    assert_true(count_near(px, w, h, BLUE) > 0);
    free(px);

    assert_int_equal(plot_loss("/nonexistent/dir/x.png", ts, tl, NT, es, el, NE, &e), -1);
    assert_non_null(strstr(e.msg, "cannot create /nonexistent/dir/x.png.tmp"));
    assert_int_equal(plot_loss(path, NULL, tl, 3, NULL, NULL, 0, &e), -1);
    assert_non_null(strstr(e.msg, "invalid series"));
}

static void test_plot_from_metrics(void **state) {
    const tmpdir *t = *state;
    char mpath[128], ppath[160], spath[160];
    snprintf(mpath, sizeof mpath, "%s/m2.jsonl", t->dir);
    snprintf(ppath, sizeof ppath, "%s/loss_curve.png", t->dir);
    snprintf(spath, sizeof spath, "%s/loss_curve.svg", t->dir);
    metrics_writer *w;
    qerr e = {{0}};
    assert_int_equal(metrics_open(mpath, 0, &w, &e), 0);
    metrics_log_eval(w, 0, 2.9, exp(2.9), 1000, &e);
    for (int s = 1; s <= 40; s++) metrics_log_train(w, s, 3.0 - 0.02 * s, 2e-4, 1.0, 100, s / 40.0, &e);
    metrics_log_eval(w, 40, 2.3, exp(2.3), 1000, &e);
    assert_int_equal(metrics_close(w, &e), 0);
    assert_int_equal(plot_run_loss_curves(mpath, t->dir, &e), 0);
    int pw, ph;
    uint8_t *px = read_png_rgb(ppath, &pw, &ph);
    assert_non_null(px);
    assert_true(count_near(px, pw, ph, BLUE) > 100);
    assert_true(count_near(px, pw, ph, ORANGE) > 40);
    free(px);
    char *svg = file_read_all(spath, NULL, NULL);
    assert_non_null(svg);
    double xy[2 * 64];
    int moves = 0;
    assert_true(svg_path_vertices(svg, "rgb(12.156863%,46.666667%,70.588235%)", xy, 64, &moves) >= 2);
    assert_int_equal(moves, 1);
    assert_int_equal(svg_path_vertices(svg, "rgb(100%,49.803922%,5.490196%)", xy, 64, &moves), 2);
    assert_true(xy[1] < xy[3]); /* held-out loss 2.9 at step 0 above 2.3 at step 40 */
    free(svg);
}

/* qlora-plot's figure: up to PLOT_MAX_SERIES curves in tab10 order, with any
 * UTF-8 legend text; one more is refused. */
static void test_plot_curves(void **state) {
    const tmpdir *t = *state;
    char path[128];
    snprintf(path, sizeof path, "%s/curves.svg", t->dir);
    float x[3] = {0, 10, 20}, y[PLOT_MAX_SERIES + 1][3];
    plot_series s[PLOT_MAX_SERIES + 1];
    for (int k = 0; k <= PLOT_MAX_SERIES; k++) {
        for (int i = 0; i < 3; i++) y[k][i] = 3.0f - 0.1f * (float)(k + i);
        s[k] = (plot_series){"sophia \xcf\x81=0.04", x, y[k], 3, k % 2};
    }
    qerr e = {{0}};
    assert_int_equal(plot_curves(path, s, PLOT_MAX_SERIES, "seconds", "held-out loss", &e), 0);
    char *svg = file_read_all(path, NULL, NULL);
    assert_non_null(svg);
    assert_non_null(strstr(svg, "stroke:rgb(12.156863%,46.666667%,70.588235%);"));   /* tab10[0] */
    assert_non_null(strstr(svg, "stroke:rgb(49.803922%,49.803922%,49.803922%);")); /* tab10[7] */
    free(svg);
    assert_int_equal(plot_curves(path, s, PLOT_MAX_SERIES + 1, NULL, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "at most 8 series"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_round_trip),
        cmocka_unit_test(test_plot_png_svg),
        cmocka_unit_test(test_plot_from_metrics),
        cmocka_unit_test(test_plot_curves),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
