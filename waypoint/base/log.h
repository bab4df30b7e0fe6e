/*
 * Logging with levels, changeable at run time from any thread. Lines go to stderr as
 * "<RFC3339 time> <level> <component> <message>". Only the daemon (waypoint/) logs at info and
 * above; libraries log at debug at most.
 */
#ifndef WP_LOG_H
#define WP_LOG_H

enum wp_log_level {
        WP_LOG_TRACE,
        WP_LOG_DEBUG,
        WP_LOG_INFO,
        WP_LOG_WARN,
        WP_LOG_ERROR,
        WP_LOG_OFF,
        _WP_LOG_LEVEL_MAX
};

void wp_log_set_level(enum wp_log_level lvl);
enum wp_log_level wp_log_get_level(void);
/* Parses "trace|debug|info|warn|warning|error|off|critical". Returns level or -EINVAL. */
int wp_log_level_parse(const char *s);
const char *wp_log_level_name(enum wp_log_level lvl);
void wp_log_write(enum wp_log_level lvl, const char *component, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

#define wp_log_enabled(lvl) ((lvl) >= wp_log_get_level())
#define wp_log(lvl, comp, ...)                                                                     \
        do {                                                                                       \
                if (wp_log_enabled(lvl))                                                           \
                        wp_log_write(lvl, comp, __VA_ARGS__);                                      \
        } while (0)
#define wp_trace(comp, ...) wp_log(WP_LOG_TRACE, comp, __VA_ARGS__)
#define wp_debug(comp, ...) wp_log(WP_LOG_DEBUG, comp, __VA_ARGS__)
#define wp_info(comp, ...) wp_log(WP_LOG_INFO, comp, __VA_ARGS__)
#define wp_warn(comp, ...) wp_log(WP_LOG_WARN, comp, __VA_ARGS__)
#define wp_error(comp, ...) wp_log(WP_LOG_ERROR, comp, __VA_ARGS__)

#endif
