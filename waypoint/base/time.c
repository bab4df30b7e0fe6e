#include "waypoint/base/time.h"

#include <time.h>

uint64_t wp_now_ns(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * WP_NSEC_PER_SEC + (uint64_t)ts.tv_nsec;
}
