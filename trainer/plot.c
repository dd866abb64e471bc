/* trainer/plot.c — loss curves drawn with cairo (cairographics.org: an image
 * surface written as PNG, or the SVG surface), text in DejaVu Sans through
 * cairo's toy font API (fontconfig). Tick spacing is the classic 1-2-5 "nice
 * numbers" rule (Heckbert, Graphics Gems I, 1990); the look follows
 * matplotlib's defaults (tab10 colours, light grid, legend top right). */
#include "trainer/plot.h"

#include <cairo-svg.h>
#include <cairo.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/file.h"
#include "core/strbuf.h"
#include "trainer/metrics.h"

/* matplotlib's tab10, in order */
static const unsigned char TAB10[PLOT_MAX_SERIES][3] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},
                                                        {214, 39, 40},  {148, 103, 189}, {140, 86, 75},
                                                        {227, 119, 194}, {127, 127, 127}};

#define FONT_FAMILY "DejaVu Sans"
#define FONT_TICK 12.0   /* px */
#define FONT_LABEL 14.0
#define FONT_LEGEND 13.0
#define LINE_WIDTH 2.0
#define MARKER_RADIUS 4.0

/* ------------------------------------------------------------------------ */
/* Axes                                                                       */

typedef struct axis {
    double lo, hi, step; /* range [lo, hi] on tick multiples of step */
} axis;

/* 1-2-5 tick spacing giving about `target` intervals over [mn, mx]. */
static axis nice_axis(double mn, double mx, int target) {
    axis a;
    if (!(mx > mn)) {
        double pad = fabs(mn) > 0 ? fabs(mn) * 0.1 : 1.0;
        mn -= pad;
        mx += pad;
    }
    double raw = (mx - mn) / target, mag = pow(10.0, floor(log10(raw))), norm = raw / mag;
    a.step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
    a.lo = floor(mn / a.step + 1e-9) * a.step;
    a.hi = ceil(mx / a.step - 1e-9) * a.step;
    if (a.hi <= a.lo) a.hi = a.lo + a.step;
    return a;
}

/* Tick label: fixed notation with as many decimals as the spacing needs, or
 * compact scientific ("1.2e6", "8e-5") for very large or small values. */
static void fmt_tick(char *buf, size_t n, double v, double step, double maxabs) {
    if (fabs(v) < step * 1e-6) v = 0; /* no "-0" */
    if (maxabs >= 1e6 || step < 1e-3) {
        if (v == 0) {
            snprintf(buf, n, "0");
            return;
        }
        int digits = (int)floor(log10(fabs(v)) + 1e-9) - (int)floor(log10(step) + 1e-9);
        if (digits < 0) digits = 0;
        char tmp[48];
        snprintf(tmp, sizeof tmp, "%.*e", digits, v);
        /* drop trailing mantissa zeros, the '+' and leading exponent zeros */
        char *ep = strchr(tmp, 'e'), mant[32];
        int exp10 = atoi(ep + 1);
        size_t ml = (size_t)(ep - tmp);
        memcpy(mant, tmp, ml);
        mant[ml] = 0;
        if (strchr(mant, '.')) {
            while (ml > 0 && mant[ml - 1] == '0') mant[--ml] = 0;
            if (ml > 0 && mant[ml - 1] == '.') mant[--ml] = 0;
        }
        snprintf(buf, n, "%se%d", mant, exp10);
        return;
    }
    int dec = (int)ceil(-log10(step) - 1e-9);
    if (dec < 0) dec = 0;
    snprintf(buf, n, "%.*f", dec, v);
}

static int point_ok(const float *xs, const float *ys, int i) { return isfinite(xs[i]) && isfinite(ys[i]); }

/* ------------------------------------------------------------------------ */
/* Text                                                                       */

static void set_font(cairo_t *cr, double size) {
    cairo_select_font_face(cr, FONT_FAMILY, CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
    cairo_set_font_size(cr, size);
}

static double text_width(cairo_t *cr, const char *s) {
    cairo_text_extents_t t;
    cairo_text_extents(cr, s, &t);
    return t.x_advance;
}

/* Draw s with its left edge at x - ax * width (ax: 0 left, 0.5 centre, 1
 * right) and its x-height centred on y (so labels line up with tick marks). */
static void draw_text(cairo_t *cr, double x, double y, const char *s, double ax) {
    cairo_font_extents_t f;
    cairo_font_extents(cr, &f);
    cairo_move_to(cr, x - ax * text_width(cr, s), y + (f.ascent - f.descent) / 2.0);
    cairo_show_text(cr, s);
}

/* A tick label with a true minus sign (U+2212), as typeset axes have it. */
static void tick_label(char *buf, size_t n, double v, double step, double maxabs) {
    char t[48];
    fmt_tick(t, sizeof t, v, step, maxabs);
    char *m = strchr(t, '-');
    if (m) {
        *m = 0;
        snprintf(buf, n, "%s\xe2\x88\x92%s", t, m + 1); /* U+2212 in UTF-8 */
    } else {
        snprintf(buf, n, "%s", t);
    }
}

/* Widest tick label of an axis (current font). */
static double axis_label_width(cairo_t *cr, const axis *a) {
    char lab[64];
    double w = 0, maxabs = fmax(fabs(a->lo), fabs(a->hi));
    for (int i = 0;; i++) {
        double v = a->lo + i * a->step;
        if (v > a->hi + a->step * 1e-6) break;
        tick_label(lab, sizeof lab, v, a->step, maxabs);
        w = fmax(w, text_width(cr, lab));
    }
    return w;
}

/* ------------------------------------------------------------------------ */
/* The figure                                                                 */

/* One curve and its colour (a TAB10 index). */
typedef struct curve {
    plot_series s;
    int colour;
} curve;

/* The plot rectangle [L, R] x [T, B] and the axes drawn on it. */
typedef struct frame {
    double L, R, T, B;
    axis ax, ay;
} frame;

/* Axes for data in [xmn, xmx] x [ymn, ymx] (an empty range, mn > mx, becomes
 * [0, 1]): x starts at 0 when the data start close to it, y gets a 4 % margin,
 * the left margin fits the rotated y name and the y tick labels, and x gets as
 * many ticks as fit without labels touching. */
static frame frame_fit(cairo_t *cr, double xmn, double xmx, double ymn, double ymx) {
    frame f;
    if (!(xmn <= xmx)) xmn = 0, xmx = 1;
    if (!(ymn <= ymx)) ymn = 0, ymx = 1;
    if (xmn > 0 && xmn <= 0.2 * xmx) xmn = 0; /* start at step 0 when it is close */
    double ypad = (ymx - ymn) * 0.04;
    f.ay = nice_axis(ymn - ypad, ymx + ypad, 6);
    set_font(cr, FONT_TICK);
    f.L = 16 + FONT_LABEL + 14 + axis_label_width(cr, &f.ay) + 6 + 6;
    f.R = PLOT_WIDTH - 28, f.T = 20, f.B = PLOT_HEIGHT - 58;
    f.ax = nice_axis(xmn, xmx, 8);
    for (int target = 7; target >= 2; target--) {
        double n_int = (f.ax.hi - f.ax.lo) / f.ax.step;
        if ((f.R - f.L) / n_int >= axis_label_width(cr, &f.ax) + 2 * FONT_TICK) break;
        f.ax = nice_axis(xmn, xmx, target);
    }
    return f;
}

/* Data coordinates to device coordinates. */
static double frame_x(const frame *f, double v) { return f->L + (v - f->ax.lo) / (f->ax.hi - f->ax.lo) * (f->R - f->L); }
static double frame_y(const frame *f, double v) { return f->B - (v - f->ay.lo) / (f->ay.hi - f->ay.lo) * (f->B - f->T); }

/* The centre of the pixel holding v: 1-unit lines drawn there are crisp. */
static double crisp(double v) { return floor(v) + 0.5; }

static void set_grey(cairo_t *cr, double g) { cairo_set_source_rgb(cr, g, g, g); }

static void set_colour(cairo_t *cr, int k) {
    cairo_set_source_rgb(cr, TAB10[k][0] / 255.0, TAB10[k][1] / 255.0, TAB10[k][2] / 255.0);
}

/* Grid, ticks and their labels, the left and bottom spines, the axis names. */
static void draw_axes(cairo_t *cr, const frame *f, const char *xlabel, const char *ylabel) {
    const axis *ax = &f->ax, *ay = &f->ay;
    double xmaxabs = fmax(fabs(ax->lo), fabs(ax->hi)), ymaxabs = fmax(fabs(ay->lo), fabs(ay->hi));
    char lab[64];
    cairo_set_line_width(cr, 1.0);
    set_font(cr, FONT_TICK);
    for (int i = 0;; i++) {
        double v = ax->lo + i * ax->step;
        if (v > ax->hi + ax->step * 1e-6) break;
        double x = crisp(frame_x(f, v));
        set_grey(cr, 0.90);
        cairo_move_to(cr, x, f->T);
        cairo_line_to(cr, x, f->B);
        cairo_stroke(cr);
        set_grey(cr, 0.25);
        cairo_move_to(cr, x, f->B);
        cairo_line_to(cr, x, f->B + 5);
        cairo_stroke(cr);
        tick_label(lab, sizeof lab, v, ax->step, xmaxabs);
        set_grey(cr, 0.15);
        draw_text(cr, x, f->B + 8 + FONT_TICK / 2, lab, 0.5);
    }
    for (int i = 0;; i++) {
        double v = ay->lo + i * ay->step;
        if (v > ay->hi + ay->step * 1e-6) break;
        double y = crisp(frame_y(f, v));
        set_grey(cr, 0.90);
        cairo_move_to(cr, f->L, y);
        cairo_line_to(cr, f->R, y);
        cairo_stroke(cr);
        set_grey(cr, 0.25);
        cairo_move_to(cr, f->L - 5, y);
        cairo_line_to(cr, f->L, y);
        cairo_stroke(cr);
        tick_label(lab, sizeof lab, v, ay->step, ymaxabs);
        set_grey(cr, 0.15);
        draw_text(cr, f->L - 8, y, lab, 1.0);
    }
    set_grey(cr, 0.25);
    cairo_set_line_width(cr, 1.2);
    cairo_move_to(cr, crisp(f->L), f->T);
    cairo_line_to(cr, crisp(f->L), crisp(f->B));
    cairo_line_to(cr, f->R, crisp(f->B));
    cairo_stroke(cr);
    set_grey(cr, 0.15);
    set_font(cr, FONT_LABEL);
    draw_text(cr, (f->L + f->R) / 2, f->B + 8 + FONT_TICK + 10 + FONT_LABEL / 2, xlabel, 0.5);
    cairo_save(cr);
    cairo_translate(cr, 16 + FONT_LABEL / 2, (f->T + f->B) / 2);
    cairo_rotate(cr, -M_PI / 2);
    draw_text(cr, 0, 0, ylabel, 0.5);
    cairo_restore(cr);
}

static void draw_marker(cairo_t *cr, double x, double y, double r) {
    cairo_new_sub_path(cr);
    cairo_arc(cr, x, y, r, 0, 2 * M_PI);
    cairo_fill(cr);
}

/* A curve inside the plot rectangle: its line (broken at non-finite points;
 * a point with no finite neighbour drawn as a dot), then its markers. */
static void draw_curve(cairo_t *cr, const frame *f, const curve *c) {
    const plot_series *s = &c->s;
    cairo_save(cr);
    const double m = MARKER_RADIUS + 1; /* markers at the ends of the range stay whole */
    cairo_rectangle(cr, f->L - m, f->T - m, f->R - f->L + 2 * m, f->B - f->T + 2 * m);
    cairo_clip(cr);
    set_colour(cr, c->colour);
    cairo_set_line_width(cr, LINE_WIDTH);
    cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
    cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
    for (int i = 0; i < s->n; i++) {
        if (!point_ok(s->x, s->y, i)) continue;
        double x = frame_x(f, s->x[i]), y = frame_y(f, s->y[i]);
        int prev = i > 0 && point_ok(s->x, s->y, i - 1), next = i + 1 < s->n && point_ok(s->x, s->y, i + 1);
        if (prev)
            cairo_line_to(cr, x, y);
        else
            cairo_move_to(cr, x, y);
        if (!prev && !next) {
            cairo_stroke(cr);
            if (!s->markers) draw_marker(cr, x, y, LINE_WIDTH);
        }
    }
    cairo_stroke(cr);
    if (s->markers)
        for (int i = 0; i < s->n; i++)
            if (point_ok(s->x, s->y, i)) draw_marker(cr, frame_x(f, s->x[i]), frame_y(f, s->y[i]), MARKER_RADIUS);
    cairo_restore(cr);
}

/* The legend, top right inside the plot: a sample of each labelled curve. */
static void draw_legend(cairo_t *cr, const frame *f, const curve *c, int n) {
    set_font(cr, FONT_LEGEND);
    double wmax = 0;
    int rows = 0;
    for (int k = 0; k < n; k++)
        if (c[k].s.label) wmax = fmax(wmax, text_width(cr, c[k].s.label)), rows++;
    if (!rows) return;
    const double row_h = FONT_LEGEND + 9, pad = 9, sample = 28;
    double w = pad + sample + 8 + wmax + pad, h = 2 * pad + rows * row_h - 9;
    double x = f->R - w - 10, y = f->T + 10, r = 4;
    cairo_new_sub_path(cr);
    cairo_arc(cr, x + w - r, y + r, r, -M_PI / 2, 0);
    cairo_arc(cr, x + w - r, y + h - r, r, 0, M_PI / 2);
    cairo_arc(cr, x + r, y + h - r, r, M_PI / 2, M_PI);
    cairo_arc(cr, x + r, y + r, r, M_PI, 3 * M_PI / 2);
    cairo_close_path(cr);
    cairo_set_source_rgba(cr, 1, 1, 1, 0.9);
    cairo_fill_preserve(cr);
    set_grey(cr, 0.80);
    cairo_set_line_width(cr, 1.0);
    cairo_stroke(cr);
    double cy = y + pad + (FONT_LEGEND) / 2;
    for (int k = 0; k < n; k++) {
        if (!c[k].s.label) continue;
        set_colour(cr, c[k].colour);
        cairo_set_line_width(cr, LINE_WIDTH);
        cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
        cairo_move_to(cr, x + pad, cy);
        cairo_line_to(cr, x + pad + sample, cy);
        cairo_stroke(cr);
        if (c[k].s.markers) draw_marker(cr, x + pad + sample / 2, cy, MARKER_RADIUS);
        set_grey(cr, 0.15);
        draw_text(cr, x + pad + sample + 8, cy, c[k].s.label, 0.0);
        cy += row_h;
    }
}

static void draw_figure(cairo_t *cr, const curve *c, int n, const char *xlabel, const char *ylabel) {
    cairo_font_options_t *fo = cairo_font_options_create();
    cairo_font_options_set_hint_metrics(fo, CAIRO_HINT_METRICS_OFF); /* the same layout in PNG and SVG */
    cairo_font_options_set_antialias(fo, CAIRO_ANTIALIAS_GRAY);
    cairo_set_font_options(cr, fo);
    cairo_font_options_destroy(fo);
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    double xmn = INFINITY, xmx = -INFINITY, ymn = INFINITY, ymx = -INFINITY;
    for (int k = 0; k < n; k++)
        for (int i = 0; i < c[k].s.n; i++)
            if (point_ok(c[k].s.x, c[k].s.y, i)) { /* the range of the points that are drawn */
                xmn = fmin(xmn, c[k].s.x[i]), xmx = fmax(xmx, c[k].s.x[i]);
                ymn = fmin(ymn, c[k].s.y[i]), ymx = fmax(ymx, c[k].s.y[i]);
            }
    const frame f = frame_fit(cr, xmn, xmx, ymn, ymx);
    draw_axes(cr, &f, xlabel, ylabel);
    for (int k = 0; k < n; k++) draw_curve(cr, &f, &c[k]);
    draw_legend(cr, &f, c, n);
}

/* ------------------------------------------------------------------------ */
/* Files                                                                      */

static cairo_status_t put_bytes(void *closure, const unsigned char *data, unsigned int len) {
    strbuf *b = closure;
    strbuf_put(b, (const char *)data, len);
    return b->oom ? CAIRO_STATUS_NO_MEMORY : CAIRO_STATUS_SUCCESS;
}

static int is_svg(const char *path) {
    size_t n = strlen(path);
    return n >= 4 && !strcasecmp(path + n - 4, ".svg");
}

/* Draw the figure into an SVG or PNG (by path's extension) in memory, then
 * write it atomically. */
static int render(const char *path, const curve *c, int n, const char *xlabel, const char *ylabel, qerr *e) {
    strbuf out = {0};
    int svg = is_svg(path);
    cairo_surface_t *sf = svg ? cairo_svg_surface_create_for_stream(put_bytes, &out, PLOT_WIDTH, PLOT_HEIGHT)
                              : cairo_image_surface_create(CAIRO_FORMAT_RGB24, PLOT_WIDTH, PLOT_HEIGHT);
    cairo_t *cr = cairo_create(sf);
    draw_figure(cr, c, n, xlabel, ylabel);
    cairo_status_t st = cairo_status(cr);
    cairo_destroy(cr);
    if (st == CAIRO_STATUS_SUCCESS && !svg) st = cairo_surface_write_to_png_stream(sf, put_bytes, &out);
    cairo_surface_finish(sf); /* the SVG surface writes its document here */
    if (st == CAIRO_STATUS_SUCCESS) st = cairo_surface_status(sf);
    cairo_surface_destroy(sf);
    int rc;
    if (st != CAIRO_STATUS_SUCCESS || out.oom)
        rc = qerr_set(e, "plot %s: cairo: %s", path, cairo_status_to_string(out.oom ? CAIRO_STATUS_NO_MEMORY : st));
    else
        rc = file_write_atomic(path, out.p, out.n, e);
    free(out.p);
    return rc;
}

int plot_loss(const char *path, const float *train_steps, const float *train_loss, int n_train,
              const float *eval_steps, const float *eval_loss, int n_eval, qerr *e) {
    if (n_train < 0 || n_eval < 0 || (n_train && (!train_steps || !train_loss)) ||
        (n_eval && (!eval_steps || !eval_loss)))
        return qerr_set(e, "plot %s: invalid series arguments", path);
    const curve c[2] = {
        {{n_train ? "train loss" : NULL, train_steps, train_loss, n_train, 0}, 0},
        {{n_eval ? "held-out loss" : NULL, eval_steps, eval_loss, n_eval, 1}, 1},
    };
    return render(path, c, 2, "step", "loss", e);
}

int plot_metrics(const char *metrics_path, const char *path, qerr *e) {
    metrics_series s;
    if (metrics_read(metrics_path, &s, e)) return -1;
    int rc = plot_loss(path, s.train_step, s.train_loss, s.n_train, s.eval_step, s.eval_loss, s.n_eval, e);
    metrics_series_free(&s);
    return rc;
}

int plot_run_loss_curves(const char *metrics_path, const char *out_dir, qerr *e) {
    static const char *const names[] = {"loss_curve.png", "loss_curve.svg"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/%s", out_dir, names[i]);
        if (plot_metrics(metrics_path, path, e)) return -1;
    }
    return 0;
}

int plot_curves(const char *path, const plot_series *series, int n_series, const char *xlabel, const char *ylabel,
                qerr *e) {
    if (n_series < 0 || n_series > PLOT_MAX_SERIES || (n_series && !series))
        return qerr_set(e, "plot %s: invalid series arguments (at most %d series)", path, PLOT_MAX_SERIES);
    curve c[PLOT_MAX_SERIES];
    for (int k = 0; k < n_series; k++) {
        if (series[k].n < 0 || (series[k].n && (!series[k].x || !series[k].y)))
            return qerr_set(e, "plot %s: invalid series %d", path, k);
        c[k] = (curve){series[k], k};
    }
    return render(path, c, n_series, xlabel ? xlabel : "step", ylabel ? ylabel : "loss", e);
}
