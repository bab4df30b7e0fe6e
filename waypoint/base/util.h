/* Small helpers shared by every module. No dependencies. */
#ifndef WP_UTIL_H
#define WP_UTIL_H

#include <stddef.h>

#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))
#define WP_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define WP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define WP_MAX(a, b) ((a) > (b) ? (a) : (b))
#define WP_UNUSED __attribute__((unused))
#define WP_MUST_CHECK __attribute__((warn_unused_result))

#endif
