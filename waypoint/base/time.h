/* Monotonic time in nanoseconds. */
#ifndef WP_TIME_H
#define WP_TIME_H

#include <stdint.h>

#define WP_NSEC_PER_MSEC 1000000ULL
#define WP_NSEC_PER_SEC 1000000000ULL

uint64_t wp_now_ns(void);     /* CLOCK_MONOTONIC */
int64_t wp_unix_now_ns(void); /* CLOCK_REALTIME: nanoseconds since the Unix epoch */

#endif
