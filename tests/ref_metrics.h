/* tests/ref_metrics.h — the error measures the reference tests share
 * (tests/test_reference_tiny.c, tests/test_reference_family.c): all in
 * double over fp32 arrays of n elements. */
#ifndef QLORA_TESTS_REF_METRICS_H
#define QLORA_TESTS_REF_METRICS_H

#include <stdint.h>

/* max |a_i| */
double ref_max_abs(const float *a, int64_t n);
/* max |a_i - b_i| */
double ref_max_abs_diff(const float *a, const float *b, int64_t n);
/* ||a||_2 */
double ref_l2(const float *a, int64_t n);
/* ||a - b||_2 */
double ref_l2_diff(const float *a, const float *b, int64_t n);

#endif
