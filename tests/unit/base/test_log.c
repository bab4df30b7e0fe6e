#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "waypoint/base/log.h"

/* Captures what is written to stderr (fd 2) into a temporary file. */
struct capture {
        int saved_fd, file_fd;
        char path[64];
};

static void capture_start(struct capture *c)
{
        strcpy(c->path, "/tmp/wp-test-log-XXXXXX");
        c->file_fd = mkstemp(c->path);
        if (c->file_fd < 0)
                exit(99);
        unlink(c->path);
        fflush(stderr);
        c->saved_fd = dup(STDERR_FILENO);
        dup2(c->file_fd, STDERR_FILENO);
}

/* Restores stderr and returns what was captured (caller frees). */
static char *capture_end(struct capture *c, size_t *ret_len)
{
        off_t n;
        char *buf;

        dup2(c->saved_fd, STDERR_FILENO);
        close(c->saved_fd);
        n = lseek(c->file_fd, 0, SEEK_END);
        buf = malloc((size_t)n + 1);
        if (!buf || pread(c->file_fd, buf, (size_t)n, 0) != n)
                exit(99);
        buf[n] = 0;
        close(c->file_fd);
        if (ret_len)
                *ret_len = (size_t)n;
        return buf;
}

/* "2026-11-26T22:36:53.123Z " */
static int is_timestamp(const char *s)
{
        static const char shape[] = "dddd-dd-ddTdd:dd:dd.dddZ ";

        for (size_t i = 0; i < sizeof(shape) - 1; i++) {
                if (shape[i] == 'd' ? (s[i] < '0' || s[i] > '9') : s[i] != shape[i])
                        return 0;
        }
        return 1;
}

static void test_log_level_parse_accepts_known_names(void)
{
        CHECK_INT_EQ(wp_log_level_parse("trace"), WP_LOG_TRACE);
        CHECK_INT_EQ(wp_log_level_parse("debug"), WP_LOG_DEBUG);
        CHECK_INT_EQ(wp_log_level_parse("info"), WP_LOG_INFO);
        CHECK_INT_EQ(wp_log_level_parse("warn"), WP_LOG_WARN);
        CHECK_INT_EQ(wp_log_level_parse("warning"), WP_LOG_WARN);
        CHECK_INT_EQ(wp_log_level_parse("error"), WP_LOG_ERROR);
        CHECK_INT_EQ(wp_log_level_parse("critical"), WP_LOG_ERROR);
        CHECK_INT_EQ(wp_log_level_parse("off"), WP_LOG_OFF);
        CHECK_INT_EQ(wp_log_level_parse("INFO"), WP_LOG_INFO);
}

static void test_log_level_parse_rejects_unknown(void)
{
        CHECK_INT_EQ(wp_log_level_parse(""), -EINVAL);
        CHECK_INT_EQ(wp_log_level_parse("verbose"), -EINVAL);
        CHECK_INT_EQ(wp_log_level_parse("info "), -EINVAL);
        CHECK_INT_EQ(wp_log_level_parse("inf"), -EINVAL);
        CHECK_INT_EQ(wp_log_level_parse(NULL), -EINVAL);
}

static void test_log_level_names(void)
{
        CHECK_STR_EQ(wp_log_level_name(WP_LOG_TRACE), "trace");
        CHECK_STR_EQ(wp_log_level_name(WP_LOG_WARN), "warn");
        CHECK_STR_EQ(wp_log_level_name(WP_LOG_OFF), "off");
        for (int l = 0; l < _WP_LOG_LEVEL_MAX; l++)
                CHECK_INT_EQ(wp_log_level_parse(wp_log_level_name(l)), l);
}

static void test_log_filters_below_level(void)
{
        struct capture c;
        char *out;

        wp_log_set_level(WP_LOG_WARN);
        CHECK_INT_EQ(wp_log_get_level(), WP_LOG_WARN);
        capture_start(&c);
        wp_debug("comp", "hidden %d", 1);
        wp_info("comp", "hidden %d", 2);
        wp_warn("comp", "shown %d", 3);
        wp_error("comp", "shown %d", 4);
        out = capture_end(&c, NULL);
        CHECK(strstr(out, "hidden") == NULL);
        CHECK(strstr(out, " warn comp shown 3\n") != NULL);
        CHECK(strstr(out, " error comp shown 4\n") != NULL);
        free(out);

        wp_log_set_level(WP_LOG_OFF);
        capture_start(&c);
        wp_error("comp", "nothing");
        wp_log_write(WP_LOG_ERROR, "comp", "nothing either");
        out = capture_end(&c, NULL);
        CHECK_STR_EQ(out, "");
        free(out);
        wp_log_set_level(WP_LOG_INFO);
}

static void test_log_line_format(void)
{
        struct capture c;
        size_t n;
        char *out;

        wp_log_set_level(WP_LOG_TRACE);
        capture_start(&c);
        errno = EPIPE;
        wp_info("hbone", "stream %u closed", 7u);
        CHECK_INT_EQ(errno, EPIPE); /* logging preserves errno */
        out = capture_end(&c, &n);
        REQUIRE(n > 25);
        CHECK(is_timestamp(out));
        CHECK_STR_EQ(out + 25, "info hbone stream 7 closed\n");
        free(out);
        wp_log_set_level(WP_LOG_INFO);
}

static void test_log_neutralises_control_characters(void)
{
        struct capture c;
        char *out;

        capture_start(&c);
        wp_warn("x", "peer said \"a\nfake 2026-01-01T00:00:00.000Z error line\x1b[0m\"\n");
        out = capture_end(&c, NULL);
        /* one line only, ending in exactly one newline */
        CHECK(strchr(out, '\n') == out + strlen(out) - 1);
        CHECK(strchr(out, 0x1b) == NULL);
        CHECK(strstr(out, "peer said \"a?fake") != NULL);
        free(out);
}

static void test_log_truncates_long_messages(void)
{
        struct capture c;
        char *big = malloc(10000), *out;
        size_t n;

        memset(big, 'a', 9999);
        big[9999] = 0;
        capture_start(&c);
        wp_warn("x", "%s", big);
        out = capture_end(&c, &n);
        CHECK(n <= 4096);
        CHECK(n > 4000);
        CHECK(n >= 4 && memcmp(out + n - 4, "...\n", 4) == 0);
        free(out);
        free(big);
}

#define THREADS 4
#define LINES   300

static void *log_thread(void *arg)
{
        long id = (long)arg;

        for (int i = 0; i < LINES; i++)
                wp_info("t", "thread %ld line %d %s", id, i,
                        "padding-padding-padding-padding-padding-padding-padding-padding");
        return NULL;
}

static void *set_level_thread(void *arg)
{
        for (int i = 0; i < 1000; i++)
                wp_log_set_level(i % 2 ? WP_LOG_INFO : WP_LOG_DEBUG);
        wp_log_set_level(WP_LOG_INFO);
        return NULL;
}

static void test_log_lines_from_threads_do_not_interleave(void)
{
        pthread_t th[THREADS + 1];
        struct capture c;
        char *out, *line, *save;
        int count = 0;

        wp_log_set_level(WP_LOG_INFO);
        capture_start(&c);
        for (long i = 0; i < THREADS; i++)
                pthread_create(&th[i], NULL, log_thread, (void *)i);
        pthread_create(&th[THREADS], NULL, set_level_thread, NULL);
        for (int i = 0; i <= THREADS; i++)
                pthread_join(th[i], NULL);
        out = capture_end(&c, NULL);
        for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                long id;
                int k;
                char tail[80];
                count++;
                if (!is_timestamp(line) ||
                    sscanf(line + 25, "info t thread %ld line %d %79s", &id, &k, tail) != 3 ||
                    strcmp(tail,
                           "padding-padding-padding-padding-padding-padding-padding-padding")) {
                        CHECK(!"malformed line");
                        break;
                }
        }
        CHECK_INT_EQ(count, THREADS * LINES);
        free(out);
}

int main(void)
{
        RUN(test_log_level_parse_accepts_known_names);
        RUN(test_log_level_parse_rejects_unknown);
        RUN(test_log_level_names);
        RUN(test_log_filters_below_level);
        RUN(test_log_line_format);
        RUN(test_log_neutralises_control_characters);
        RUN(test_log_truncates_long_messages);
        RUN(test_log_lines_from_threads_do_not_interleave);
        return check_exit();
}
