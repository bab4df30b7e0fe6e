/*
 * Admin and status listeners: a small blocking HTTP/1.1 server on its own thread, so that
 * nothing here can stall a worker. One request per connection (Connection: close), requests
 * bounded to 8 KiB, 2 s read deadline per client.
 *
 *   GET /ready, /healthz/ready   200 "LIVE" when serving, 503 before/while draining
 *   GET /server_info             JSON: version, state, io_backend, concurrency, uptime
 *   GET /stats                   "name: value" lines, summed over workers, plus rss
 *   POST|GET /logging?level=L    changes the log level at run time
 *   POST /quitquitquit           starts the drain, like SIGTERM
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/daemon.h"
#include "waypoint/snapshot.h"

#define REQ_MAX 8192

struct admin {
        struct wp_runtime *rt;
        int fd;
        bool full;
};

static long rss_bytes(void)
{
        FILE *f = fopen("/proc/self/statm", "r");
        long pages = 0, rss = 0;

        if (!f)
                return -1;
        if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
                rss = 0;
        fclose(f);
        return rss * sysconf(_SC_PAGESIZE);
}

static void reply(int fd, int status, const char *ctype, const char *body, size_t len)
{
        char head[256];
        const char *reason = status == 200   ? "OK"
                             : status == 404 ? "Not Found"
                             : status == 400 ? "Bad Request"
                             : status == 405 ? "Method Not Allowed"
                             : status == 431 ? "Request Header Fields Too Large"
                                             : "Service Unavailable";
        int n = snprintf(head, sizeof(head),
                         "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                         "Connection: close\r\n\r\n",
                         status, reason, ctype, len);

        if (send(fd, head, (size_t)n, MSG_NOSIGNAL) < 0)
                return;
        while (len > 0) {
                ssize_t w = send(fd, body, len, MSG_NOSIGNAL);

                if (w <= 0)
                        return;
                body += w;
                len -= (size_t)w;
        }
}

static uint64_t sum_counter(struct wp_runtime *rt, enum wp_counter c)
{
        uint64_t v = 0;

        for (unsigned i = 0; i < rt->nworkers; i++)
                v += wp_worker_counter(rt->workers[i], c);
        return v;
}

static void handle_stats(struct admin *a, int fd)
{
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        struct wp_snapshot *s = wp_runtime_snapshot(a->rt);

        if (!f) {
                wp_snapshot_unref(s);
                reply(fd, 503, "text/plain", "out of memory\n", 14);
                return;
        }
        for (int c = 0; c < _WP_COUNTER_MAX; c++)
                fprintf(f, "waypoint.%s: %lu\n", wp_counter_names[c],
                        (unsigned long)sum_counter(a->rt, (enum wp_counter)c));
        fprintf(f, "waypoint.rss_bytes: %ld\n", rss_bytes());
        fprintf(f, "waypoint.config.chains: %zu\n", s ? s->nchains : 0);
        fprintf(f, "waypoint.config.clusters: %zu\n", s ? s->nclusters : 0);
        fclose(f);
        wp_snapshot_unref(s);
        reply(fd, 200, "text/plain", buf, len);
        free(buf);
}

static void handle_server_info(struct admin *a, int fd)
{
        struct wp_runtime *rt = a->rt;
        char body[1024];
        const char *state = atomic_load(&rt->draining) ? "DRAINING"
                            : atomic_load(&rt->ready)  ? "LIVE"
                                                       : "PRE_INITIALIZING";
        int n = snprintf(body, sizeof(body),
                         "{\"version\": \"waypoint/0.1.0\", \"state\": \"%s\", "
                         "\"io_backend\": \"%s\", \"io_backend_note\": \"%s\", "
                         "\"concurrency\": %u, \"uptime_current_epoch\": \"%lds\"}\n",
                         state, wp_io_backend_name(rt->backend),
                         rt->backend_note ? rt->backend_note : "", rt->nworkers,
                         (long)(time(NULL) - rt->start_time));

        reply(fd, 200, "application/json", body, (size_t)n);
}

static void handle(struct admin *a, int fd, char *req)
{
        char *method = req, *path, *sp, *q;

        sp = strchr(req, ' ');
        if (!sp) {
                reply(fd, 400, "text/plain", "bad request\n", 12);
                return;
        }
        *sp = 0;
        path = sp + 1;
        sp = strchr(path, ' ');
        if (!sp) {
                reply(fd, 400, "text/plain", "bad request\n", 12);
                return;
        }
        *sp = 0;
        q = strchr(path, '?');
        if (q)
                *q++ = 0;

        if (!strcmp(path, "/ready") || !strcmp(path, "/healthz/ready")) {
                bool ok = atomic_load(&a->rt->ready) && !atomic_load(&a->rt->draining);

                if (ok)
                        reply(fd, 200, "text/plain", "LIVE\n", 5);
                else
                        reply(fd, 503, "text/plain", "NOT READY\n", 10);
                return;
        }
        if (!a->full) {
                reply(fd, 404, "text/plain", "not found\n", 10);
                return;
        }
        if (!strcmp(path, "/server_info")) {
                handle_server_info(a, fd);
        } else if (!strcmp(path, "/stats")) {
                handle_stats(a, fd);
        } else if (!strcmp(path, "/logging")) {
                int lvl = -EINVAL;

                if (q && !strncmp(q, "level=", 6))
                        lvl = wp_log_level_parse(q + 6);
                if (lvl < 0) {
                        reply(fd, 400, "text/plain", "usage: /logging?level=<level>\n", 30);
                        return;
                }
                wp_log_set_level((enum wp_log_level)lvl);
                wp_info("admin", "log level set to %s", wp_log_level_name(lvl));
                reply(fd, 200, "text/plain", "ok\n", 3);
        } else if (!strcmp(path, "/quitquitquit")) {
                if (strcmp(method, "POST")) {
                        reply(fd, 405, "text/plain", "use POST\n", 9);
                        return;
                }
                reply(fd, 200, "text/plain", "OK\n", 3);
                kill(getpid(), SIGTERM);
        } else {
                reply(fd, 404, "text/plain", "not found\n", 10);
        }
}

static void serve_client(struct admin *a, int fd)
{
        char req[REQ_MAX + 1];
        size_t len = 0;
        struct timeval tv = {.tv_sec = 2};

        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        while (len < REQ_MAX) {
                ssize_t n = recv(fd, req + len, REQ_MAX - len, 0);

                if (n <= 0)
                        return;
                len += (size_t)n;
                req[len] = 0;
                if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n")) {
                        handle(a, fd, req);
                        return;
                }
        }
        reply(fd, 431, "text/plain", "request too large\n", 18);
}

static void *admin_main(void *arg)
{
        struct admin *a = arg;

        for (;;) {
                int fd = accept4(a->fd, NULL, NULL, SOCK_CLOEXEC);

                if (fd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED)
                                continue;
                        usleep(10000);
                        continue;
                }
                serve_client(a, fd);
                close(fd);
        }
        return NULL;
}

int wp_admin_start(struct wp_runtime *rt, const struct wp_addr *addr, bool full_admin)
{
        struct admin *a = wp_xcalloc(1, sizeof(*a));
        pthread_t th;
        int one = 1;

        a->rt = rt;
        a->full = full_admin;
        a->fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (a->fd < 0)
                goto err;
        setsockopt(a->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(a->fd, (const struct sockaddr *)&addr->ss, addr->len) < 0 ||
            listen(a->fd, 64) < 0)
                goto err;
        if (pthread_create(&th, NULL, admin_main, a) != 0)
                goto err;
        pthread_detach(th);
        return 0;
err:
        wp_error("admin", "cannot serve on the %s address: %s", full_admin ? "admin" : "status",
                 strerror(errno));
        if (a->fd >= 0)
                close(a->fd);
        wp_free(a);
        return -errno;
}
