/* trainer/plot.c — loss-curve PNG: a tiny raster plotter on an RGB buffer and
 * libpng for the file. Lines and discs are antialiased by coverage (distance
 * of the pixel centre to the segment / centre, as in signed-distance
 * rendering); tick spacing is the classic 1-2-5 "nice numbers" rule
 * (Heckbert, Graphics Gems I, 1990). The font is our own 5x7 bitmap. */
#include "trainer/plot.h"

#include <png.h>

#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trainer/metrics.h"

typedef struct rgb {
    uint8_t r, g, b;
} rgb;

static const rgb C_BG = {255, 255, 255}, C_AXIS = {40, 40, 40}, C_TEXT = {30, 30, 30}, C_GRID = {228, 228, 228},
                 C_TRAIN = {31, 119, 180}, C_EVAL = {255, 127, 14}, C_LEGEND_EDGE = {190, 190, 190};

typedef struct canvas {
    uint8_t *px; /* (H, W, 3) */
    int w, h;
} canvas;

/* ------------------------------------------------------------------------ */
/* 5x7 font: each row is 5 bits, bit 4 = leftmost column. */

typedef struct glyph {
    char ch;
    uint8_t rows[7];
} glyph;

static const glyph FONT[] = {
    {'0', {0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e}}, {'1', {0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e}},
    {'2', {0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f}}, {'3', {0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e}},
    {'4', {0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02}}, {'5', {0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e}},
    {'6', {0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e}}, {'7', {0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e}}, {'9', {0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c}}, {'-', {0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00}},
    {'+', {0x00, 0x04, 0x04, 0x1f, 0x04, 0x04, 0x00}}, {'e', {0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e}},
    {'a', {0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f}}, {'d', {0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f}},
    {'h', {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11}}, {'i', {0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e}},
    {'l', {0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}}, {'n', {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11}},
    {'o', {0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e}}, {'p', {0x00, 0x00, 0x1e, 0x11, 0x1e, 0x10, 0x10}},
    {'r', {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10}}, {'s', {0x00, 0x00, 0x0e, 0x10, 0x0e, 0x01, 0x1e}},
    {'t', {0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06}}, {'u', {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d}},
    {'v', {0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04}}, {' ', {0, 0, 0, 0, 0, 0, 0}},
    /* the rest of the lower-case alphabet and some punctuation, for legends (plot_curves_png) */
    {'b', {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e}}, {'c', {0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e}},
    {'f', {0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08}}, {'g', {0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e}},
    {'j', {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c}}, {'k', {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12}},
    {'m', {0x00, 0x00, 0x1a, 0x15, 0x15, 0x11, 0x11}}, {'q', {0x00, 0x00, 0x0d, 0x13, 0x0f, 0x01, 0x01}},
    {'w', {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a}}, {'x', {0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11}},
    {'y', {0x00, 0x00, 0x11, 0x11, 0x0f, 0x01, 0x0e}}, {'z', {0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f}},
    {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}}, {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
    {'=', {0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00}}, {',', {0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08}},
    {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}}, {':', {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00}},
    {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1f}}, {'%', {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}},
};

#define FONT_SCALE 2
#define CHAR_W (6 * FONT_SCALE) /* 5 columns + 1 spacing */
#define CHAR_H (7 * FONT_SCALE)

static const glyph *find_glyph(char ch) {
    for (size_t i = 0; i < sizeof FONT / sizeof FONT[0]; i++)
        if (FONT[i].ch == ch) return &FONT[i];
    return NULL; /* unknown characters draw as blanks */
}

/* ------------------------------------------------------------------------ */
/* Raster primitives                                                          */

static void blend(canvas *cv, int x, int y, rgb c, float a) {
    if (x < 0 || y < 0 || x >= cv->w || y >= cv->h || a <= 0.0f) return;
    if (a > 1.0f) a = 1.0f;
    uint8_t *p = cv->px + ((size_t)y * (size_t)cv->w + (size_t)x) * 3;
    p[0] = (uint8_t)lrintf((float)p[0] + ((float)c.r - (float)p[0]) * a);
    p[1] = (uint8_t)lrintf((float)p[1] + ((float)c.g - (float)p[1]) * a);
    p[2] = (uint8_t)lrintf((float)p[2] + ((float)c.b - (float)p[2]) * a);
}

static void fill_rect(canvas *cv, int x0, int y0, int x1, int y1, rgb c) {
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++) blend(cv, x, y, c, 1.0f);
}

/* Antialiased segment of width `wd` px, clipped to [cx0,cx1) x [cy0,cy1). */
static void draw_segment(canvas *cv, float x0, float y0, float x1, float y1, float wd, rgb c, int cx0, int cy0,
                         int cx1, int cy1) {
    float r = wd * 0.5f;
    int bx0 = (int)floorf(fminf(x0, x1) - r - 1), bx1 = (int)ceilf(fmaxf(x0, x1) + r + 1);
    int by0 = (int)floorf(fminf(y0, y1) - r - 1), by1 = (int)ceilf(fmaxf(y0, y1) + r + 1);
    if (bx0 < cx0) bx0 = cx0;
    if (by0 < cy0) by0 = cy0;
    if (bx1 > cx1) bx1 = cx1;
    if (by1 > cy1) by1 = cy1;
    float dx = x1 - x0, dy = y1 - y0, len2 = dx * dx + dy * dy;
    for (int y = by0; y < by1; y++) {
        for (int x = bx0; x < bx1; x++) {
            float px = (float)x + 0.5f, py = (float)y + 0.5f;
            float t = len2 > 0 ? ((px - x0) * dx + (py - y0) * dy) / len2 : 0.0f;
            t = t < 0 ? 0 : t > 1 ? 1 : t;
            float ex = px - (x0 + t * dx), ey = py - (y0 + t * dy);
            float cov = r + 0.5f - sqrtf(ex * ex + ey * ey);
            if (cov > 0) blend(cv, x, y, c, cov);
        }
    }
}

static void draw_disc(canvas *cv, float cx, float cy, float rad, rgb c) {
    for (int y = (int)floorf(cy - rad - 1); y <= (int)ceilf(cy + rad + 1); y++)
        for (int x = (int)floorf(cx - rad - 1); x <= (int)ceilf(cx + rad + 1); x++) {
            float dx = (float)x + 0.5f - cx, dy = (float)y + 0.5f - cy;
            float cov = rad + 0.5f - sqrtf(dx * dx + dy * dy);
            if (cov > 0) blend(cv, x, y, c, cov);
        }
}

static void draw_text(canvas *cv, int x, int y, const char *s, rgb c) {
    for (; *s; s++, x += CHAR_W) {
        const glyph *g = find_glyph(*s);
        if (!g) continue;
        for (int row = 0; row < 7; row++)
            for (int col = 0; col < 5; col++)
                if (g->rows[row] & (0x10 >> col))
                    fill_rect(cv, x + col * FONT_SCALE, y + row * FONT_SCALE, x + (col + 1) * FONT_SCALE,
                              y + (row + 1) * FONT_SCALE, c);
    }
}

static int text_width(const char *s) { return s[0] ? (int)strlen(s) * CHAR_W - FONT_SCALE : 0; }

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

/* Widest tick label of an axis, in pixels. */
static int axis_label_width(const axis *a) {
    char lab[48];
    int w = 0;
    double maxabs = fmax(fabs(a->lo), fabs(a->hi));
    for (int i = 0;; i++) {
        double v = a->lo + i * a->step;
        if (v > a->hi + a->step * 1e-6) break;
        fmt_tick(lab, sizeof lab, v, a->step, maxabs);
        int tw = (int)strlen(lab) * CHAR_W;
        if (tw > w) w = tw;
    }
    return w;
}

static void minmax(const float *v, int n, double *mn, double *mx) {
    for (int i = 0; i < n; i++)
        if (isfinite(v[i])) {
            if (v[i] < *mn) *mn = v[i];
            if (v[i] > *mx) *mx = v[i];
        }
}

static int point_ok(const float *xs, const float *ys, int i) { return isfinite(xs[i]) && isfinite(ys[i]); }

/* ------------------------------------------------------------------------ */
/* PNG                                                                        */

typedef struct png_err {
    char msg[256];
} png_err;

static void on_png_error(png_structp png, png_const_charp msg) {
    png_err *pe = png_get_error_ptr(png);
    snprintf(pe->msg, sizeof pe->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void on_png_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg; /* library code never prints */
}

static int write_png(const char *path, const canvas *cv, qerr *e) {
    size_t n = strlen(path);
    char *tmp = qmalloc(n + 5, e);
    if (!tmp) return -1;
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp", 5);
    png_bytep *rows = qmalloc((size_t)cv->h * sizeof *rows, e);
    if (!rows) {
        free(tmp);
        return -1;
    }
    for (int y = 0; y < cv->h; y++) rows[y] = cv->px + (size_t)y * (size_t)cv->w * 3;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        qerr_set(e, "cannot create %s: %s", tmp, strerror(errno));
        free(rows);
        free(tmp);
        return -1;
    }
    png_err pe = {{0}};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &pe, on_png_error, on_png_warning);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    volatile int ok = 0; /* set after setjmp, read after a longjmp */
    if (png && info) {
        if (setjmp(png_jmpbuf(png)) == 0) {
            png_init_io(png, f);
            png_set_IHDR(png, info, (png_uint_32)cv->w, (png_uint_32)cv->h, 8, PNG_COLOR_TYPE_RGB,
                         PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
            png_write_info(png, info);
            png_write_image(png, rows);
            png_write_end(png, NULL);
            ok = 1;
        }
    } else {
        snprintf(pe.msg, sizeof pe.msg, "out of memory");
    }
    png_destroy_write_struct(png ? &png : NULL, info ? &info : NULL);
    int werr = 0;
    if (fflush(f) || fsync(fileno(f))) werr = errno;
    if (fclose(f) && !werr) werr = errno;
    int rc = 0;
    if (!ok) {
        rc = qerr_set(e, "cannot write %s: libpng: %s", path, pe.msg);
    } else if (werr) {
        rc = qerr_set(e, "cannot write %s: %s", path, strerror(werr));
    } else if (rename(tmp, path)) {
        rc = qerr_set(e, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    }
    if (rc) unlink(tmp);
    free(rows);
    free(tmp);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* The plot                                                                   */

/* The plot rectangle [L, R) x [T, B) in pixels and the axes drawn on it. */
typedef struct frame {
    int L, R, T, B;
    axis ax, ay;
} frame;

/* Axes for data in [xmn, xmx] x [ymn, ymx] (an empty range, mn > mx, becomes
 * [0, 1]): x starts at 0 when the data start close to it, y gets a 4 % margin,
 * the left margin fits the y labels, and x gets as many ticks as fit without
 * labels touching. */
static frame frame_fit(double xmn, double xmx, double ymn, double ymx) {
    frame f;
    if (!(xmn <= xmx)) xmn = 0, xmx = 1;
    if (!(ymn <= ymx)) ymn = 0, ymx = 1;
    if (xmn > 0 && xmn <= 0.2 * xmx) xmn = 0; /* start at step 0 when it is close */
    double ypad = (ymx - ymn) * 0.04;
    f.ay = nice_axis(ymn - ypad, ymx + ypad, 6);
    f.L = axis_label_width(&f.ay) + 20;
    if (f.L < 60) f.L = 60;
    f.R = PLOT_WIDTH - 24, f.T = 40, f.B = PLOT_HEIGHT - 60;
    f.ax = nice_axis(xmn, xmx, 8);
    for (int target = 7; target >= 2; target--) {
        double n_int = (f.ax.hi - f.ax.lo) / f.ax.step;
        if ((double)(f.R - f.L) / n_int >= axis_label_width(&f.ax) + 2 * CHAR_W) break;
        f.ax = nice_axis(xmn, xmx, target);
    }
    return f;
}

/* Data coordinates to pixels. */
static float frame_x(const frame *f, double v) {
    return (float)(f->L + (v - f->ax.lo) / (f->ax.hi - f->ax.lo) * (f->R - 1 - f->L));
}
static float frame_y(const frame *f, double v) {
    return (float)(f->B - 1 - (v - f->ay.lo) / (f->ay.hi - f->ay.lo) * (f->B - 1 - f->T));
}

/* A white PLOT_WIDTH x PLOT_HEIGHT canvas; -1 (e set) when out of memory. */
static int canvas_init(canvas *cv, qerr *e) {
    *cv = (canvas){NULL, PLOT_WIDTH, PLOT_HEIGHT};
    cv->px = qmalloc((size_t)cv->w * (size_t)cv->h * 3, e);
    if (!cv->px) return -1;
    memset(cv->px, 255, (size_t)cv->w * (size_t)cv->h * 3);
    return 0;
}

/* Grid, ticks and their labels, the frame, and the axis names. */
static void draw_axes(canvas *cv, const frame *f, const char *xlabel, const char *ylabel) {
    const int L = f->L, R = f->R, T = f->T, B = f->B;
    const axis *ax = &f->ax, *ay = &f->ay;
    double xmaxabs = fmax(fabs(ax->lo), fabs(ax->hi)), ymaxabs = fmax(fabs(ay->lo), fabs(ay->hi));
    char lab[48];
    for (int i = 0;; i++) {
        double v = ax->lo + i * ax->step;
        if (v > ax->hi + ax->step * 1e-6) break;
        int x = (int)lrintf(frame_x(f, v));
        fill_rect(cv, x, T, x + 1, B, C_GRID);
        fill_rect(cv, x, B, x + 1, B + 6, C_AXIS);
        fmt_tick(lab, sizeof lab, v, ax->step, xmaxabs);
        draw_text(cv, x - text_width(lab) / 2, B + 10, lab, C_TEXT);
    }
    for (int i = 0;; i++) {
        double v = ay->lo + i * ay->step;
        if (v > ay->hi + ay->step * 1e-6) break;
        int y = (int)lrintf(frame_y(f, v));
        fill_rect(cv, L, y, R, y + 1, C_GRID);
        fill_rect(cv, L - 6, y, L, y + 1, C_AXIS);
        fmt_tick(lab, sizeof lab, v, ay->step, ymaxabs);
        draw_text(cv, L - 10 - text_width(lab), y - CHAR_H / 2, lab, C_TEXT);
    }
    fill_rect(cv, L - 1, T, L + 1, B + 1, C_AXIS);
    fill_rect(cv, L - 1, B - 1, R, B + 1, C_AXIS);
    draw_text(cv, (L + R) / 2 - text_width(xlabel) / 2, B + 10 + CHAR_H + 8, xlabel, C_TEXT);
    draw_text(cv, L - text_width(ylabel) / 2 > 4 ? L - text_width(ylabel) / 2 : 4, T - CHAR_H - 10, ylabel, C_TEXT);
}

/* The legend's box, w x h at (x, y): background and a 1-pixel border. */
static void draw_legend_box(canvas *cv, int x, int y, int w, int h) {
    fill_rect(cv, x, y, x + w, y + h, C_BG);
    fill_rect(cv, x, y, x + w, y + 1, C_LEGEND_EDGE);
    fill_rect(cv, x, y + h - 1, x + w, y + h, C_LEGEND_EDGE);
    fill_rect(cv, x, y, x + 1, y + h, C_LEGEND_EDGE);
    fill_rect(cv, x + w - 1, y, x + w, y + h, C_LEGEND_EDGE);
}

int plot_loss_png(const char *path, const float *train_steps, const float *train_loss, int n_train,
                  const float *eval_steps, const float *eval_loss, int n_eval, qerr *e) {
    if (n_train < 0 || n_eval < 0 || (n_train && (!train_steps || !train_loss)) ||
        (n_eval && (!eval_steps || !eval_loss)))
        return qerr_set(e, "plot %s: invalid series arguments", path);
    canvas cv;
    if (canvas_init(&cv, e)) return -1;
    double xmn = INFINITY, xmx = -INFINITY, ymn = INFINITY, ymx = -INFINITY;
    minmax(train_steps, n_train, &xmn, &xmx);
    minmax(eval_steps, n_eval, &xmn, &xmx);
    minmax(train_loss, n_train, &ymn, &ymx);
    minmax(eval_loss, n_eval, &ymn, &ymx);
    const frame f = frame_fit(xmn, xmx, ymn, ymx);
    const int L = f.L, R = f.R, T = f.T, B = f.B;
    draw_axes(&cv, &f, "step", "loss");

    /* series: train line, then eval line + markers on top */
    for (int i = 1; i < n_train; i++)
        if (point_ok(train_steps, train_loss, i - 1) && point_ok(train_steps, train_loss, i))
            draw_segment(&cv, frame_x(&f, train_steps[i - 1]), frame_y(&f, train_loss[i - 1]),
                         frame_x(&f, train_steps[i]), frame_y(&f, train_loss[i]), 2.0f, C_TRAIN, L + 1, T, R, B - 1);
    for (int i = 0; i < n_train; i++) /* isolated points stay visible */
        if (point_ok(train_steps, train_loss, i) && (i == 0 || !point_ok(train_steps, train_loss, i - 1)) &&
            (i == n_train - 1 || !point_ok(train_steps, train_loss, i + 1)))
            draw_disc(&cv, frame_x(&f, train_steps[i]), frame_y(&f, train_loss[i]), 2.0f, C_TRAIN);
    for (int i = 1; i < n_eval; i++)
        if (point_ok(eval_steps, eval_loss, i - 1) && point_ok(eval_steps, eval_loss, i))
            draw_segment(&cv, frame_x(&f, eval_steps[i - 1]), frame_y(&f, eval_loss[i - 1]),
                         frame_x(&f, eval_steps[i]), frame_y(&f, eval_loss[i]), 2.0f, C_EVAL, L + 1, T, R, B - 1);
    for (int i = 0; i < n_eval; i++)
        if (point_ok(eval_steps, eval_loss, i))
            draw_disc(&cv, frame_x(&f, eval_steps[i]), frame_y(&f, eval_loss[i]), 4.0f, C_EVAL);

    /* legend, top right inside the plot */
    const char *names[2] = {"train loss", "held-out loss"};
    int show[2] = {n_train > 0, n_eval > 0}, rows = show[0] + show[1];
    if (rows) {
        int lw = 12 + 28 + 8 + text_width(names[1]) + 12, lh = 10 + rows * (CHAR_H + 8) + 2;
        int lx = R - lw - 10, ly = T + 10, yy = ly + 10;
        draw_legend_box(&cv, lx, ly, lw, lh);
        for (int s = 0; s < 2; s++) {
            if (!show[s]) continue;
            rgb c = s ? C_EVAL : C_TRAIN;
            float cy = (float)yy + CHAR_H / 2.0f;
            draw_segment(&cv, (float)lx + 12, cy, (float)lx + 40, cy, 2.0f, c, 0, 0, cv.w, cv.h);
            if (s) draw_disc(&cv, (float)lx + 26, cy, 4.0f, c);
            draw_text(&cv, lx + 48, yy, names[s], C_TEXT);
            yy += CHAR_H + 8;
        }
    }
    int rc = write_png(path, &cv, e);
    free(cv.px);
    return rc;
}

int plot_metrics_png(const char *metrics_path, const char *png_path, qerr *e) {
    metrics_series s;
    if (metrics_read(metrics_path, &s, e)) return -1;
    int rc = plot_loss_png(png_path, s.train_step, s.train_loss, s.n_train, s.eval_step, s.eval_loss, s.n_eval, e);
    metrics_series_free(&s);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Several curves on one set of axes (optimizer comparisons)                  */

static const rgb TAB10[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44}, {214, 39, 40}, {148, 103, 189},
                            {140, 86, 75},  {227, 119, 194}, {127, 127, 127}};

int plot_curves_png(const char *path, const plot_series *series, int n_series, const char *xlabel,
                    const char *ylabel, qerr *e) {
    if (n_series < 0 || n_series > (int)(sizeof TAB10 / sizeof TAB10[0]) || (n_series && !series))
        return qerr_set(e, "plot %s: invalid series arguments (at most %d series)", path,
                        (int)(sizeof TAB10 / sizeof TAB10[0]));
    for (int k = 0; k < n_series; k++)
        if (series[k].n < 0 || (series[k].n && (!series[k].x || !series[k].y)))
            return qerr_set(e, "plot %s: invalid series %d", path, k);
    canvas cv;
    if (canvas_init(&cv, e)) return -1;
    double xmn = INFINITY, xmx = -INFINITY, ymn = INFINITY, ymx = -INFINITY;
    for (int k = 0; k < n_series; k++) {
        minmax(series[k].x, series[k].n, &xmn, &xmx);
        minmax(series[k].y, series[k].n, &ymn, &ymx);
    }
    const frame f = frame_fit(xmn, xmx, ymn, ymx);
    const int L = f.L, R = f.R, T = f.T, B = f.B;
    draw_axes(&cv, &f, xlabel ? xlabel : "step", ylabel ? ylabel : "loss");

    for (int k = 0; k < n_series; k++) {
        const plot_series *s = &series[k];
        const rgb c = TAB10[k];
        for (int i = 1; i < s->n; i++)
            if (point_ok(s->x, s->y, i - 1) && point_ok(s->x, s->y, i))
                draw_segment(&cv, frame_x(&f, s->x[i - 1]), frame_y(&f, s->y[i - 1]), frame_x(&f, s->x[i]),
                             frame_y(&f, s->y[i]), 2.0f, c, L + 1, T, R, B - 1);
        for (int i = 0; i < s->n; i++)
            if (point_ok(s->x, s->y, i) &&
                (s->markers || ((i == 0 || !point_ok(s->x, s->y, i - 1)) && (i == s->n - 1 || !point_ok(s->x, s->y, i + 1)))))
                draw_disc(&cv, frame_x(&f, s->x[i]), frame_y(&f, s->y[i]), s->markers ? 3.5f : 2.0f, c);
    }

    /* legend, top right inside the plot */
    int wmax = 0;
    for (int k = 0; k < n_series; k++) {
        int w = text_width(series[k].label ? series[k].label : "");
        if (w > wmax) wmax = w;
    }
    if (n_series) {
        int lw = 12 + 28 + 8 + wmax + 12, lh = 10 + n_series * (CHAR_H + 8) + 2;
        int lx = R - lw - 10, ly = T + 10, yy = ly + 10;
        draw_legend_box(&cv, lx, ly, lw, lh);
        for (int k = 0; k < n_series; k++) {
            float cy = (float)yy + CHAR_H / 2.0f;
            draw_segment(&cv, (float)lx + 12, cy, (float)lx + 40, cy, 2.0f, TAB10[k], 0, 0, cv.w, cv.h);
            if (series[k].markers) draw_disc(&cv, (float)lx + 26, cy, 3.5f, TAB10[k]);
            draw_text(&cv, lx + 48, yy, series[k].label ? series[k].label : "", C_TEXT);
            yy += CHAR_H + 8;
        }
    }
    int rc = write_png(path, &cv, e);
    free(cv.px);
    return rc;
}
