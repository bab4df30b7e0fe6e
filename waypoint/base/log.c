#include "waypoint/base/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "waypoint/base/util.h"

static _Atomic int log_level = WP_LOG_INFO;

static const char *const level_names[_WP_LOG_LEVEL_MAX] = {
    [WP_LOG_TRACE] = "trace", [WP_LOG_DEBUG] = "debug", [WP_LOG_INFO] = "info",
    [WP_LOG_WARN] = "warn",   [WP_LOG_ERROR] = "error", [WP_LOG_OFF] = "off",
};

void wp_log_set_level(enum wp_log_level lvl)
{
        if ((unsigned)lvl >= _WP_LOG_LEVEL_MAX)
                lvl = WP_LOG_OFF;
        atomic_store_explicit(&log_level, (int)lvl, memory_order_relaxed);
}

enum wp_log_level wp_log_get_level(void)
{
        return (enum wp_log_level)atomic_load_explicit(&log_level, memory_order_relaxed);
}

int wp_log_level_parse(const char *s)
{
        static const struct {
                const char *name;
                enum wp_log_level lvl;
        } table[] = {
            {"trace", WP_LOG_TRACE}, {"debug", WP_LOG_DEBUG},    {"info", WP_LOG_INFO},
            {"warn", WP_LOG_WARN},   {"warning", WP_LOG_WARN},   {"error", WP_LOG_ERROR},
            {"off", WP_LOG_OFF},     {"critical", WP_LOG_ERROR},
        };

        if (!s)
                return -EINVAL;
        for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
                if (strcasecmp(s, table[i].name) == 0)
                        return (int)table[i].lvl;
        return -EINVAL;
}

const char *wp_log_level_name(enum wp_log_level lvl)
{
        if ((unsigned)lvl >= _WP_LOG_LEVEL_MAX)
                return "?";
        return level_names[lvl];
}

/* Longest line written; longer messages are cut and end with "...". */
#define LOG_LINE_MAX 4096

void wp_log_write(enum wp_log_level lvl, const char *component, const char *fmt, ...)
{
        char line[LOG_LINE_MAX];
        struct timespec ts;
        struct tm tm;
        size_t n, start;
        int saved_errno = errno, k;
        va_list ap;

        if ((unsigned)lvl >= WP_LOG_OFF || (int)lvl < atomic_load(&log_level))
                return;

        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        k = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s %s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000L, level_names[lvl], component ? component : "-");
        if (k < 0)
                goto out;
        n = WP_MIN((size_t)k, sizeof(line) - 1);
        start = n;

        errno = saved_errno; /* so %m works */
        va_start(ap, fmt);
        k = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
        va_end(ap);
        if (k < 0)
                k = 0;
        if ((size_t)k >= sizeof(line) - n) {
                n = sizeof(line) - 1;
                memcpy(line + n - 3, "...", 3);
        } else {
                n += (size_t)k;
        }
        /* Drop trailing newlines, then neutralise control characters: messages often carry
         * peer-controlled strings, and one line must stay one line. */
        while (n > start && line[n - 1] == '\n')
                n--;
        for (size_t i = start; i < n; i++)
                if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f)
                        if (line[i] != '\t')
                                line[i] = '?';
        line[n++] = '\n';

        /* One write() per line so that lines from different threads never interleave. */
        for (size_t off = 0; off < n;) {
                ssize_t w = write(STDERR_FILENO, line + off, n - off);
                if (w < 0) {
                        if (errno == EINTR)
                                continue;
                        break;
                }
                off += (size_t)w;
        }
out:
        errno = saved_errno;
}
