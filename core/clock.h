/* core/clock.h — time and process memory for progress lines and benchmarks:
 * the monotonic clock and the resident set size, read in one place
 * (docs/design.md, "One source of truth").
 */
#ifndef QLORA_CORE_CLOCK_H
#define QLORA_CORE_CLOCK_H

/* Seconds on CLOCK_MONOTONIC (arbitrary origin; differences are wall time,
 * unaffected by changes of the system clock), nanosecond resolution. */
double clock_now_sec(void);

/* Resident set size of this process now, MiB (/proc/self/statm; 0 when it
 * cannot be read). */
double proc_rss_mib(void);

/* Peak resident set size of this process so far, MiB (getrusage ru_maxrss). */
double proc_peak_rss_mib(void);

#endif
