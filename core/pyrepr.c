/* core/pyrepr.c — Python's repr() of a float32 value (see pyrepr.h). */
#include "core/pyrepr.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

void py_float_repr(char *buf, size_t n, float v) {
    if (isnan(v)) {
        snprintf(buf, n, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, n, v > 0 ? "Infinity" : "-Infinity");
        return;
    }
    if (v == 0.0f) {
        snprintf(buf, n, signbit(v) ? "-0.0" : "0.0");
        return;
    }
    char e[40];
    for (int p = 0; p <= 8; p++) {
        snprintf(e, sizeof e, "%.*e", p, (double)v);
        if (strtof(e, NULL) == v) break;
    }
    /* e = "[-]d[.ddd]e[+-]XX" -> sign, digits, exponent */
    const char *s = e;
    int neg = *s == '-';
    if (neg) s++;
    char dig[24];
    int nd = 0;
    for (; *s && *s != 'e'; s++)
        if (*s != '.') dig[nd++] = *s;
    int x = atoi(s + 1);
    while (nd > 1 && dig[nd - 1] == '0') nd--;
    dig[nd] = 0;
    char out[64];
    int o = 0;
    if (neg) out[o++] = '-';
    if (x >= -4 && x < 16) {
        if (x >= 0) {
            for (int i = 0; i <= x; i++) out[o++] = i < nd ? dig[i] : '0';
            out[o++] = '.';
            if (nd > x + 1)
                for (int i = x + 1; i < nd; i++) out[o++] = dig[i];
            else
                out[o++] = '0';
        } else {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -x - 1; i++) out[o++] = '0';
            for (int i = 0; i < nd; i++) out[o++] = dig[i];
        }
        out[o] = 0;
    } else {
        out[o++] = dig[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++) out[o++] = dig[i];
        }
        snprintf(out + o, sizeof out - (size_t)o, "e%c%02d", x < 0 ? '-' : '+', x < 0 ? -x : x);
    }
    snprintf(buf, n, "%s", out);
}
