/* core/pyrepr.h — numbers printed as Python prints them, for the JSON files
 * that must match transformers' and PEFT's byte for byte (format/peft.c
 * adapter_config.json, trainer/export.c config.json).
 */
#ifndef QLORA_CORE_PYREPR_H
#define QLORA_CORE_PYREPR_H

#include <stddef.h>

/* repr() of the Python float holding the value the user wrote as float32 v:
 * the shortest digits that give back v under strtof (at most 9 significant),
 * laid out by Python's float_repr rules: positional for 1e-4 <= |v| < 1e16
 * with at least one decimal ("100000.0", "0.02"), else d.ddde[+-]XX
 * ("1e-05", "1e+16"); "0.0" / "-0.0"; "NaN", "Infinity", "-Infinity" as
 * json.dumps writes them. buf gets at most n bytes (32 always suffice). */
void py_float_repr(char *buf, size_t n, float v);

#endif
