/* core/parse.h — strict numbers from command-line options: the whole string is
 * the number (no "12abc" -> 12, no "1e99" -> 1, no "abc" -> 0), decimal only,
 * finite, within the caller's range. One source for the numeric options of
 * qlora-generate, qlora-export and qlora-preprocess (trainer/generate_main.c,
 * trainer/export_main.c, trainer/preprocess_main.c), so each fails the same
 * way, in one line naming the option and the value:
 *   "--max-new-tokens: expected an integer in [1, 2147483647], got \"12abc\""
 */
#ifndef QLORA_CORE_PARSE_H
#define QLORA_CORE_PARSE_H

#include <stdint.h>

#include "core/status.h"

/* parse_int_range: s as a decimal integer (optional sign, digits, nothing
 * else: no blanks, no exponent, no hex) in [lo, hi] into *out. what names the
 * option in the message ("--top-k"). Returns 0, or -1 with
 * "<what>: expected an integer in [lo, hi], got \"<s>\"" (or ">= lo" when
 * hi == INT64_MAX). */
int parse_int_range(const char *what, const char *s, int64_t lo, int64_t hi, int64_t *out, qerr *e);

/* parse_u64: s as a decimal integer in [0, UINT64_MAX] (digits only: "-1" is
 * refused, not wrapped). Returns 0, or -1 with "<what>: expected an integer in
 * [0, 18446744073709551615], got \"<s>\"". */
int parse_u64(const char *what, const char *s, uint64_t *out, qerr *e);

/* parse_double_range: s as a finite decimal number (strtod's syntax without
 * blanks, hex, "nan" or "inf") in [lo, hi] into *out; lo_open makes the lower
 * bound exclusive, (lo, hi]. hi may be HUGE_VAL. Returns 0, or -1 with
 * "<what>: expected a number in [lo, hi], got \"<s>\"" (or "> lo" / ">= lo"
 * when hi is infinite). */
int parse_double_range(const char *what, const char *s, double lo, double hi, int lo_open, double *out, qerr *e);

/* env_switch_off: 1 when the environment variable `name` is set to exactly "0". The A/B switches of the fast
 * paths (QLORA_CPU_AMX, QLORA_LORA_AMX, QLORA_LORA_SHORTK, QLORA_LINEAR_GROUP, QLORA_FROZEN_T) turn one path off
 * in the same binary this way; anything else (unset, "1") leaves it on. */
int env_switch_off(const char *name);

#endif
