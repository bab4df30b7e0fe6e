/*
 * Admin and status listeners: a small HTTP/1.1 server on its own thread (one per listener),
 * so that nothing here can stall a worker. It talks to the data plane only through atomics in
 * struct wp_runtime and a snapshot reference taken under snap_lock (the lock is held for the
 * pointer copy, never while a document is built).
 *
 * The server: poll() over the listener and up to CLIENTS_MAX non-blocking clients. One request
 * per connection (Connection: close). Request line at most LINE_MAX bytes (414), request head at
 * most HEAD_MAX bytes and HEADERS_MAX fields (431), request bodies (Content-Length only, 501
 * for Transfer-Encoding) at most BODY_MAX bytes (413) and discarded. The whole request must
 * arrive within READ_MS (408); the response must make progress every WRITE_IDLE_MS. When every
 * slot is taken, the slowest client still sending its request is dropped for the new one, or
 * else the writing client that has made no progress for the longest (at least STALL_EVICT_MS:
 * a stalled scraper cannot keep the others out). After
 * the response the server half-closes and discards what the client still sends (lingering
 * close) so that unread request bytes do not turn the close into a reset that loses the reply.
 * Unknown method: 501; unknown path: 404; known path, wrong method: 405 with Allow. HEAD is
 * GET without the body.
 *
 * Both listeners:
 *   GET /ready, /healthz/ready     200 "LIVE"; 503 with the state (PRE_INITIALIZING before the
 *                                  first config, DRAINING once draining, listeners drained or
 *                                  /healthcheck/fail)
 * Admin and metrics (15020, 15090) listeners:
 *   GET /stats/prometheus          Istio standard metrics, streamed as the socket drains
 *                                  (chunked for HTTP/1.1, close-delimited for HTTP/1.0): one
 *                                  page cursor and one STREAM_BUF buffer per client
 * Admin listener only:
 *   GET /                          this list
 *   GET /server_info               JSON: version, state, command_line_options, node, uptime,
 *                                  io_backend
 *   GET /stats                     "name: value" lines summed over workers; ?format=json,
 *                                  ?filter=<POSIX ERE>
 *   GET /config_dump               Envoy's ConfigDump JSON (admin_dump.c); ?include_eds,
 *                                  ?include_addresses, ?resource=<repeated field>, ?mask=<paths>
 *   GET /clusters                  endpoints with health, weight, priority; ?format=json
 *   GET /listeners                 name::address; ?format=json
 *   GET|POST /logging[?level=L]    without level: the current level; with: sets it
 *   POST /drain_listeners          stop accepting, GOAWAY downstream connections; tunnels in
 *                                  flight go on; the process stays up (?graceful and
 *                                  ?inboundonly accepted, same behaviour)
 *   POST /healthcheck/fail, /healthcheck/ok   readiness forced to 503 / back
 *   POST /quitquitquit             starts the drain, like SIGTERM
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <regex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "hbone/hbone.h"
#include "waypoint/accesslog.h"
#include "waypoint/admin.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/daemon.h"
#include "waypoint/metrics.h"
#include "waypoint/snapshot.h"
#include "xds-client/resources.h"

#define CLIENTS_MAX    32
#define LINE_MAX_      4096 /* request line */
#define HEAD_MAX       8192 /* request line + header fields */
#define HEADERS_MAX    64
#define BODY_MAX       65536
#define READ_MS        5000
#define WRITE_IDLE_MS  10000
#define LINGER_MS      1000
#define STALL_EVICT_MS 500 /* a writing client without progress this long may lose its slot */
#define QUERY_MAX      16
#define STREAM_BUF     (64 * 1024) /* per client streaming a page */
#define STREAM_ROUNDS  4           /* STREAM_BUF refills per client per poll round */

/* /healthcheck/fail: shared by the admin and status listeners of the process */
static _Atomic bool health_failed;

enum client_state { C_READ, C_BODY, C_WRITE, C_LINGER };

struct client {
        int fd;
        enum client_state state;
        char buf[HEAD_MAX + 1];
        size_t len;
        size_t body_left;
        char head[512]; /* response head */
        size_t headlen;
        char *body; /* response body (owned), sent after head */
        size_t bodylen;
        size_t off; /* bytes of head + body sent */
        /* a streamed body (after head, instead of body): rendered into sbuf as the socket
         * drains, framed as chunks when chunked, else delimited by the close */
        struct wp_metrics_page *page;
        bool chunked;
        bool stream_end; /* page complete and its last bytes (0-chunk) are in sbuf */
        char *sbuf;
        size_t sstart, send;
        int64_t deadline_ms;
        int64_t started_ms;
};

struct admin {
        struct wp_runtime *rt;
        int fd;
        enum wp_admin_kind kind;
        struct client *clients[CLIENTS_MAX];
};

struct query {
        char *key[QUERY_MAX];
        char *val[QUERY_MAX]; /* NULL when the parameter has no '=' */
        size_t n;
};

struct request {
        char *method;
        char *path;
        struct query q;
        int minor;
        bool has_cl;
        bool has_host;
        size_t content_length;
        bool head; /* HEAD: no body in the response */
};

static int64_t now_ms(void)
{
        return (int64_t)(wp_now_ns() / WP_NSEC_PER_MSEC);
}

/* ---- responses ---- */

static const char *reason(int status)
{
        switch (status) {
        case 200:
                return "OK";
        case 400:
                return "Bad Request";
        case 404:
                return "Not Found";
        case 405:
                return "Method Not Allowed";
        case 408:
                return "Request Timeout";
        case 413:
                return "Content Too Large";
        case 414:
                return "URI Too Long";
        case 431:
                return "Request Header Fields Too Large";
        case 500:
                return "Internal Server Error";
        case 501:
                return "Not Implemented";
        case 503:
                return "Service Unavailable";
        case 505:
                return "HTTP Version Not Supported";
        default:
                return "Unknown";
        }
}

/* Formats the response head. framing: the Content-Length or Transfer-Encoding field with its
 * CRLF, or "" (close-delimited). allow: value of an Allow header or NULL. */
static void format_head(struct client *c, int status, const char *ctype, const char *framing,
                        const char *allow)
{
        int n = snprintf(c->head, sizeof(c->head),
                         "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s"
                         "Cache-Control: no-cache, max-age=0\r\nX-Content-Type-Options: nosniff\r\n"
                         "%s%s%sConnection: close\r\n\r\n",
                         status, reason(status), ctype, framing, allow ? "Allow: " : "",
                         allow ? allow : "", allow ? "\r\n" : "");

        c->headlen = (size_t)n < sizeof(c->head) ? (size_t)n : sizeof(c->head) - 1;
}

/* Queues the response and switches the client to writing; takes ownership of body (heap, may
 * be NULL when len is 0). allow: value of an Allow header or NULL. with_body false: HEAD
 * (Content-Length still says the body's size). */
static void respond_take(struct client *c, int status, const char *ctype, char *body, size_t len,
                         const char *allow, bool with_body)
{
        char framing[48];

        snprintf(framing, sizeof(framing), "Content-Length: %zu\r\n", len);
        format_head(c, status, ctype, framing, allow);
        wp_free(c->body);
        c->body = NULL;
        c->bodylen = 0;
        if (with_body) {
                c->body = body;
                c->bodylen = len;
        } else {
                wp_free(body);
        }
        c->off = 0;
        c->state = C_WRITE;
        c->deadline_ms = now_ms() + WRITE_IDLE_MS;
}

/* Same with a borrowed body (copied). */
static void respond(struct client *c, int status, const char *ctype, const char *body, size_t len,
                    const char *allow, bool with_body)
{
        char *copy = NULL;

        if (with_body && len) {
                copy = wp_malloc(len);
                if (!copy) {
                        /* no memory for the reply: close without one */
                        c->state = C_LINGER;
                        c->deadline_ms = 0;
                        return;
                }
                memcpy(copy, body, len);
        }
        respond_take(c, status, ctype, copy, len, allow, with_body);
}

static void respond_text(struct client *c, const struct request *rq, int status, const char *text)
{
        respond(c, status, "text/plain; charset=utf-8", text, strlen(text), NULL, !rq || !rq->head);
}

/* ---- request parsing (pure: buffer in, request or status out) ---- */

static bool is_tchar(unsigned char ch)
{
        return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
               strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int hexval(char ch)
{
        if (ch >= '0' && ch <= '9')
                return ch - '0';
        if (ch >= 'a' && ch <= 'f')
                return ch - 'a' + 10;
        if (ch >= 'A' && ch <= 'F')
                return ch - 'A' + 10;
        return -1;
}

/* Percent-decodes s in place ('+' is a space in query strings). Returns 0 or -EINVAL (bad
 * escape or a decoded NUL). */
static int pct_decode(char *s)
{
        char *o = s;

        for (; *s; s++) {
                if (*s == '+') {
                        *o++ = ' ';
                } else if (*s == '%') {
                        int h = hexval(s[1]), l = h < 0 ? -1 : hexval(s[2]);

                        if (h < 0 || l < 0 || (h == 0 && l == 0))
                                return -EINVAL;
                        *o++ = (char)(h << 4 | l);
                        s += 2;
                } else {
                        *o++ = *s;
                }
        }
        *o = 0;
        return 0;
}

static int parse_query(char *qs, struct query *q)
{
        char *save = NULL, *tok;

        q->n = 0;
        for (tok = strtok_r(qs, "&", &save); tok; tok = strtok_r(NULL, "&", &save)) {
                char *eq = strchr(tok, '=');

                if (q->n == QUERY_MAX)
                        return -E2BIG;
                if (eq)
                        *eq++ = 0;
                if (pct_decode(tok) < 0 || (eq && pct_decode(eq) < 0))
                        return -EINVAL;
                q->key[q->n] = tok;
                q->val[q->n] = eq;
                q->n++;
        }
        return 0;
}

static const char *param(const struct query *q, const char *k)
{
        for (size_t i = 0; i < q->n; i++)
                if (!strcmp(q->key[i], k))
                        return q->val[i] ? q->val[i] : "";
        return NULL;
}

/* Length of the line starting at p within [p, end) including its LF, or 0 when incomplete.
 * *ret_eol: where the line's content ends (before CR LF or LF). */
static size_t line_len(char *p, char *end, char **ret_eol)
{
        char *lf = memchr(p, '\n', (size_t)(end - p));

        if (!lf)
                return 0;
        *ret_eol = lf > p && lf[-1] == '\r' ? lf - 1 : lf;
        return (size_t)(lf - p) + 1;
}

/*
 * Parses the request head in buf[0, len). Returns the head's length (> 0) when complete, 0 when
 * more bytes are needed, or -status (400, 414, 431, 501, 505) for a request that can never be
 * valid. The request points into buf (which gets NULs written into it).
 */
static int parse_head(char *buf, size_t len, struct request *rq)
{
        char *end = buf + len, *p = buf, *eol, *sp1, *sp2, *target, *qs;
        size_t n, nfields = 0;

        memset(rq, 0, sizeof(*rq));
        /* a method must come first: say no early to TLS hellos and other binary noise */
        for (size_t i = 0; i < len && buf[i] != ' '; i++)
                if (i >= 16 || !is_tchar((unsigned char)buf[i]))
                        return -400;
        n = line_len(p, end, &eol);
        if (n == 0)
                return len >= LINE_MAX_ ? -414 : 0;
        if (n > LINE_MAX_)
                return -414;
        /* the whole head must be there before we look further */
        {
                char *q = p + n;
                size_t m;
                char *e2;

                for (;;) {
                        m = line_len(q, end, &e2);
                        if (m == 0)
                                return len >= HEAD_MAX ? -431 : 0;
                        if (e2 == q)
                                break; /* empty line: end of the head */
                        q += m;
                }
                if ((size_t)(q + m - buf) > HEAD_MAX)
                        return -431;
                if (memchr(buf, 0, (size_t)(q + m - buf)))
                        return -400;
        }

        /* request line: method SP request-target SP HTTP-version */
        *eol = 0;
        sp1 = strchr(p, ' ');
        if (!sp1)
                return -400;
        *sp1 = 0;
        target = sp1 + 1;
        sp2 = strchr(target, ' ');
        if (!sp2 || sp1 == p)
                return -400;
        *sp2 = 0;
        for (char *m = p; *m; m++)
                if (!is_tchar((unsigned char)*m))
                        return -400;
        if (target[0] != '/')
                return -400;
        for (char *t = target; *t; t++)
                if ((unsigned char)*t <= 0x20 || (unsigned char)*t >= 0x7f)
                        return -400;
        if (strncmp(sp2 + 1, "HTTP/", 5) || !(sp2[6] >= '0' && sp2[6] <= '9') || sp2[7] != '.' ||
            !(sp2[8] >= '0' && sp2[8] <= '9') || sp2[9])
                return -400;
        if (sp2[6] != '1')
                return -505;
        rq->minor = sp2[8] - '0';
        rq->method = p;
        rq->path = target;
        qs = strchr(target, '?');
        if (qs) {
                *qs++ = 0;
                if (parse_query(qs, &rq->q) < 0)
                        return -400;
        }
        if (strchr(rq->path, '#'))
                return -400;
        p += n;

        /* header fields */
        for (;;) {
                char *colon, *v, *ve;

                n = line_len(p, end, &eol);
                if (eol == p) {
                        /* RFC 9112 3.2: an HTTP/1.1 request without Host is a 400 */
                        if (rq->minor >= 1 && !rq->has_host)
                                return -400;
                        return (int)(p + n - buf);
                }
                if (++nfields > HEADERS_MAX)
                        return -431;
                if (*p == ' ' || *p == '\t')
                        return -400; /* obsolete line folding */
                *eol = 0;
                colon = strchr(p, ':');
                if (!colon || colon == p)
                        return -400;
                for (char *k = p; k < colon; k++) {
                        if (!is_tchar((unsigned char)*k))
                                return -400;
                        if (*k >= 'A' && *k <= 'Z')
                                *k = (char)(*k - 'A' + 'a');
                }
                *colon = 0;
                for (v = colon + 1; *v == ' ' || *v == '\t'; v++)
                        ;
                for (ve = v + strlen(v); ve > v && (ve[-1] == ' ' || ve[-1] == '\t'); ve--)
                        ;
                *ve = 0;
                for (char *x = v; *x; x++)
                        if ((unsigned char)*x < 0x20 && *x != '\t')
                                return -400;
                if (!strcmp(p, "host")) {
                        if (rq->has_host)
                                return -400;
                        rq->has_host = true;
                } else if (!strcmp(p, "transfer-encoding")) {
                        return -501;
                } else if (!strcmp(p, "content-length")) {
                        size_t cl = 0;

                        if (!*v || strlen(v) > 18)
                                return -400;
                        for (char *d = v; *d; d++) {
                                if (*d < '0' || *d > '9')
                                        return -400;
                                cl = cl * 10 + (size_t)(*d - '0');
                        }
                        if (rq->has_cl && cl != rq->content_length)
                                return -400;
                        rq->has_cl = true;
                        rq->content_length = cl;
                }
                p += n;
        }
}

/* ---- handlers ---- */

static const char *server_state(struct wp_runtime *rt)
{
        if (atomic_load(&rt->draining) || atomic_load(&rt->listeners_stopped) ||
            atomic_load(&health_failed))
                return "DRAINING";
        return atomic_load(&rt->ready) ? "LIVE" : "PRE_INITIALIZING";
}

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

static uint64_t sum_counter(struct wp_runtime *rt, enum wp_counter c)
{
        uint64_t v = 0;

        for (unsigned i = 0; i < rt->nworkers; i++)
                v += wp_worker_counter(rt->workers[i], c);
        return v;
}

static void respond_owned(struct client *c, const struct request *rq, int status, const char *ctype,
                          char *body, size_t len)
{
        respond_take(c, status, ctype, body, len, NULL, !rq->head);
}

static void respond_json(struct client *c, const struct request *rq, struct json_object *o)
{
        size_t n = 0;
        const char *t = o ? json_object_to_json_string_length(o, WP_ADMIN_JSON_FLAGS, &n) : NULL;

        if (!t)
                respond_text(c, rq, 500, "out of memory\n");
        else
                respond(c, 200, "application/json", t, n, NULL, !rq->head);
        json_object_put(o);
}

static void on_ready(struct admin *a, struct client *c, struct request *rq)
{
        const char *st = server_state(a->rt);
        char body[32];

        snprintf(body, sizeof(body), "%s\n", st);
        respond_text(c, rq, strcmp(st, "LIVE") ? 503 : 200, body);
}

struct stat_line {
        char name[96];
        uint64_t v;
};

/* Appends "waypoint.<name>" = v to st[*n]. */
static void add_stat(struct stat_line *st, size_t *n, const char *name, uint64_t v)
{
        snprintf(st[*n].name, sizeof(st[*n].name), "waypoint.%s", name);
        st[(*n)++].v = v;
}

static void on_stats(struct admin *a, struct client *c, struct request *rq)
{
        const char *fmt = param(&rq->q, "format"), *filter = param(&rq->q, "filter");
        bool json = fmt && !strcmp(fmt, "json");
        struct wp_snapshot *s = wp_runtime_snapshot(a->rt);
        struct stat_line st[_WP_COUNTER_MAX + 7];
        struct wp_al_writer_stats al;
        size_t n = 0;
        regex_t re;
        bool use_re = filter && filter[0];

        if (fmt && !json && strcmp(fmt, "text")) {
                wp_snapshot_unref(s);
                respond_text(c, rq, 400, "format: text or json\n");
                return;
        }
        if (use_re && regcomp(&re, filter, REG_EXTENDED | REG_NOSUB) != 0) {
                wp_snapshot_unref(s);
                respond_text(c, rq, 400, "filter: invalid regular expression\n");
                return;
        }
        for (int i = 0; i < _WP_COUNTER_MAX; i++)
                add_stat(st, &n, wp_counter_names[i], sum_counter(a->rt, (enum wp_counter)i));
        /* access log lines to stdout/stderr: queued per worker, written by the writer thread,
         * dropped when a worker's queue is full (stdout not drained) */
        wp_al_default_writer_stats(&al);
        add_stat(st, &n, "access_log.queued", al.queued);
        add_stat(st, &n, "access_log.written", al.written);
        add_stat(st, &n, "access_log.dropped", al.dropped);
        add_stat(st, &n, "access_log.write_errors", al.write_errors);
        add_stat(st, &n, "rss_bytes", (uint64_t)rss_bytes());
        add_stat(st, &n, "config.chains", s ? s->nchains : 0);
        add_stat(st, &n, "config.clusters", s ? s->nclusters : 0);
        wp_snapshot_unref(s);

        if (json) {
                struct json_object *root = json_object_new_object(), *arr = json_object_new_array();

                if (!root || !arr || json_object_object_add(root, "stats", arr) < 0) {
                        json_object_put(arr);
                        json_object_put(root);
                        root = NULL;
                }
                for (size_t i = 0; root && i < n; i++) {
                        struct json_object *e;

                        if (use_re && regexec(&re, st[i].name, 0, NULL, 0) != 0)
                                continue;
                        e = json_object_new_object();
                        if (!e || json_object_array_add(arr, e) < 0) {
                                json_object_put(e);
                                break;
                        }
                        json_object_object_add(e, "name", json_object_new_string(st[i].name));
                        json_object_object_add(e, "value", json_object_new_uint64(st[i].v));
                }
                if (use_re)
                        regfree(&re);
                respond_json(c, rq, root);
                return;
        }
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);

        if (!f) {
                if (use_re)
                        regfree(&re);
                respond_text(c, rq, 500, "out of memory\n");
                return;
        }
        for (size_t i = 0; i < n; i++)
                if (!use_re || regexec(&re, st[i].name, 0, NULL, 0) == 0)
                        fprintf(f, "%s: %lu\n", st[i].name, (unsigned long)st[i].v);
        fclose(f);
        if (use_re)
                regfree(&re);
        respond(c, 200, "text/plain; charset=utf-8", buf, len, NULL, !rq->head);
        free(buf);
}

static void on_server_info(struct admin *a, struct client *c, struct request *rq)
{
        struct wp_runtime *rt = a->rt;
        const struct wp_options *o = &rt->opts;
        struct json_object *root = json_object_new_object(), *cl = json_object_new_object(),
                           *node = json_object_new_object();
        struct wp_snapshot *s = wp_runtime_snapshot(rt);
        const char *node_id = o->node_id;
        char buf[64];
        long up = (long)(time(NULL) - rt->start_time);

        if (!node_id && s && s->res)
                node_id = s->res->node_id;
        if (!root || !cl || !node) {
                json_object_put(cl);
                json_object_put(node);
                json_object_put(root);
                wp_snapshot_unref(s);
                respond_text(c, rq, 500, "out of memory\n");
                return;
        }
        json_object_object_add(root, "version", json_object_new_string("waypoint/0.1.0"));
        json_object_object_add(root, "state", json_object_new_string(server_state(rt)));
        json_object_object_add(root, "hot_restart_version", json_object_new_string("disabled"));
        json_object_object_add(cl, "concurrency", json_object_new_int((int)rt->nworkers));
        json_object_object_add(cl, "log_level",
                               json_object_new_string(wp_log_level_name(wp_log_get_level())));
        snprintf(buf, sizeof(buf), "%us", o->drain_ms / 1000);
        json_object_object_add(cl, "drain_time", json_object_new_string(buf));
        json_object_object_add(cl, "mode", json_object_new_string("Serve"));
        if (o->config_file)
                json_object_object_add(cl, "config_path", json_object_new_string(o->config_file));
        if (o->service_cluster)
                json_object_object_add(cl, "service_cluster",
                                       json_object_new_string(o->service_cluster));
        if (node_id)
                json_object_object_add(cl, "service_node", json_object_new_string(node_id));
        json_object_object_add(root, "command_line_options", cl);
        if (node_id)
                json_object_object_add(node, "id", json_object_new_string(node_id));
        if (o->service_cluster)
                json_object_object_add(node, "cluster", json_object_new_string(o->service_cluster));
        json_object_object_add(node, "user_agent_name", json_object_new_string("waypoint"));
        json_object_object_add(root, "node", node);
        snprintf(buf, sizeof(buf), "%lds", up);
        json_object_object_add(root, "uptime_current_epoch", json_object_new_string(buf));
        json_object_object_add(root, "uptime_all_epochs", json_object_new_string(buf));
        json_object_object_add(root, "io_backend",
                               json_object_new_string(wp_io_backend_name(rt->backend)));
        json_object_object_add(root, "io_backend_note",
                               json_object_new_string(rt->backend_note ? rt->backend_note : ""));
        json_object_object_add(root, "concurrency", json_object_new_int((int)rt->nworkers));
        json_object_object_add(root, "config_version", json_object_new_uint64(s ? s->version : 0));
        json_object_object_add(root, "listeners_drained",
                               json_object_new_boolean(atomic_load(&rt->listeners_stopped)));
        wp_snapshot_unref(s);
        respond_json(c, rq, root);
}

static void on_config_dump(struct admin *a, struct client *c, struct request *rq)
{
        const struct wp_options *o = &a->rt->opts;
        struct wp_admin_dump_req dr = {
                .resource = param(&rq->q, "resource"),
                .mask = param(&rq->q, "mask"),
                .include_eds = param(&rq->q, "include_eds") != NULL,
                .include_addresses = param(&rq->q, "include_addresses") != NULL,
                .node_id = o->node_id,
                .node_cluster = o->service_cluster,
                .last_updated_ms = atomic_load(&a->rt->snap_published_ms),
        };
        struct wp_snapshot *s = wp_runtime_snapshot(a->rt);
        const char *err = NULL;
        char *body = NULL, msg[512];
        size_t len = 0;
        int r;

        r = wp_admin_config_dump(s, &dr, &body, &len, &err);
        wp_snapshot_unref(s);
        if (r < 0) {
                snprintf(msg, sizeof(msg), "%s\n", err ? err : strerror(-r));
                respond_text(c, rq, r == -ENOENT ? 404 : r == -EINVAL ? 400 : 500, msg);
                return;
        }
        respond_owned(c, rq, 200, "application/json", body, len);
}

static bool want_json(struct client *c, struct request *rq, bool *ret_json)
{
        const char *fmt = param(&rq->q, "format");

        *ret_json = fmt && !strcmp(fmt, "json");
        if (fmt && !*ret_json && strcmp(fmt, "text")) {
                respond_text(c, rq, 400, "format: text or json\n");
                return false;
        }
        return true;
}

static void on_clusters(struct admin *a, struct client *c, struct request *rq)
{
        struct wp_snapshot *s;
        char *body = NULL;
        size_t len = 0;
        bool json;

        if (!want_json(c, rq, &json))
                return;
        s = wp_runtime_snapshot(a->rt);
        if (wp_admin_clusters(s, json, &body, &len) < 0)
                respond_text(c, rq, 500, "out of memory\n");
        else
                respond_owned(c, rq, 200, json ? "application/json" : "text/plain; charset=utf-8",
                              body, len);
        wp_snapshot_unref(s);
}

static void on_listeners(struct admin *a, struct client *c, struct request *rq)
{
        struct wp_snapshot *s;
        char hb[WP_AUTHORITY_MAX], *body = NULL;
        size_t len = 0;
        bool json;

        if (!want_json(c, rq, &json))
                return;
        if (hbone_target_format((const struct sockaddr *)&a->rt->opts.hbone_addr.ss, hb,
                                sizeof(hb)) < 0)
                hb[0] = 0;
        s = wp_runtime_snapshot(a->rt);
        if (wp_admin_listeners(s, hb[0] ? hb : NULL, json, &body, &len) < 0)
                respond_text(c, rq, 500, "out of memory\n");
        else
                respond_owned(c, rq, 200, json ? "application/json" : "text/plain; charset=utf-8",
                              body, len);
        wp_snapshot_unref(s);
}

static void on_logging(struct admin *a, struct client *c, struct request *rq)
{
        const char *lv = param(&rq->q, "level");
        char body[128];
        int lvl;

        if (rq->q.n > (lv ? 1u : 0u)) {
                respond_text(c, rq, 400,
                             "usage: /logging?level=<trace|debug|info|warning|error|critical|off>"
                             " (one level for every component)\n");
                return;
        }
        if (lv) {
                lvl = wp_log_level_parse(lv);
                if (lvl < 0) {
                        respond_text(c, rq, 400, "unknown level\n");
                        return;
                }
                wp_log_set_level((enum wp_log_level)lvl);
                wp_info("admin", "log level set to %s", wp_log_level_name(lvl));
        }
        snprintf(body, sizeof(body), "active loggers:\n  waypoint: %s\n",
                 wp_log_level_name(wp_log_get_level()));
        respond_text(c, rq, 200, body);
}

static void on_drain_listeners(struct admin *a, struct client *c, struct request *rq)
{
        struct wp_runtime *rt = a->rt;

        if (!atomic_exchange(&rt->listeners_stopped, true)) {
                wp_info("admin", "drain_listeners: no new connections, GOAWAY on existing ones");
                for (unsigned i = 0; i < rt->nworkers; i++)
                        wp_worker_wake(rt->workers[i]);
        }
        respond_text(c, rq, 200, "OK\n");
}

static void on_healthcheck(struct admin *a, struct client *c, struct request *rq)
{
        bool fail = !strcmp(rq->path, "/healthcheck/fail");

        if (atomic_exchange(&health_failed, fail) != fail)
                wp_info("admin", "health check %s", fail ? "failed by admin" : "restored");
        respond_text(c, rq, 200, "OK\n");
}

static void on_quit(struct admin *a, struct client *c, struct request *rq)
{
        respond_text(c, rq, 200, "OK\n");
        kill(getpid(), SIGTERM);
}

static void on_help(struct admin *a, struct client *c, struct request *rq);

enum { M_GET = 1, M_POST = 2 }; /* M_GET includes HEAD */
#define K_FULL (1u << WP_ADMIN_FULL)
#define K_ALL  ((1u << WP_ADMIN_FULL) | (1u << WP_ADMIN_STATUS) | (1u << WP_ADMIN_METRICS))
#define K_PROM ((1u << WP_ADMIN_FULL) | (1u << WP_ADMIN_METRICS) | (1u << WP_ADMIN_PROMETHEUS))

/* /stats/prometheus: Istio's standard metrics, merged over the workers' shards, streamed:
 * client_write renders the next STREAM_BUF bytes each time the socket has drained the last
 * ones, so a page of any length costs one page cursor and one buffer per client, and a slow
 * scraper holds only that (until WRITE_IDLE_MS without progress drops it). HTTP/1.1 gets
 * chunked framing (a truncated page is detectable); HTTP/1.0 a close-delimited body. No gzip:
 * zlib is not a dependency. */
static void on_prometheus(struct admin *a, struct client *c, struct request *rq)
{
        struct wp_metrics_page *pg = NULL;

        if (!a->rt->metrics || (!rq->head && (wp_metrics_page_new(a->rt->metrics, &pg) < 0 ||
                                              !(c->sbuf = wp_malloc(STREAM_BUF))))) {
                wp_metrics_page_free(pg);
                respond_text(c, rq, 503, "metrics unavailable\n");
                return;
        }
        c->chunked = rq->minor >= 1;
        format_head(c, 200, "text/plain; version=0.0.4; charset=utf-8",
                    c->chunked ? "Transfer-Encoding: chunked\r\n" : "", NULL);
        c->page = pg;
        c->stream_end = rq->head;
        c->sstart = c->send = 0;
        c->off = 0;
        c->state = C_WRITE;
        c->deadline_ms = now_ms() + WRITE_IDLE_MS;
}

static const struct route {
        const char *path;
        unsigned methods;
        unsigned kinds; /* listeners serving it: 1 << enum wp_admin_kind */
        void (*fn)(struct admin *a, struct client *c, struct request *rq);
        const char *help;
} routes[] = {
        {"/ready", M_GET, K_ALL, on_ready, "200 LIVE when serving, else 503 and the state"},
        {"/healthz/ready", M_GET, K_ALL, on_ready, "same as /ready"},
        {"/", M_GET, K_FULL, on_help, "this list"},
        {"/server_info", M_GET, K_FULL, on_server_info, "version, state, options, node, uptime"},
        {"/stats/prometheus", M_GET, K_PROM, on_prometheus, "Istio standard metrics (Prometheus)"},
        {"/stats", M_GET, K_FULL, on_stats, "counters; ?format=json, ?filter=<regex>"},
        {"/config_dump", M_GET, K_FULL, on_config_dump,
         "Envoy ConfigDump JSON; ?include_eds, ?include_addresses, ?resource=, ?mask="},
        {"/clusters", M_GET, K_FULL, on_clusters, "endpoints with health; ?format=json"},
        {"/listeners", M_GET, K_FULL, on_listeners, "listener names and addresses; ?format=json"},
        {"/logging", M_GET | M_POST, K_FULL, on_logging, "log level; ?level=<level> sets it"},
        {"/drain_listeners", M_POST, K_FULL, on_drain_listeners,
         "stop accepting, GOAWAY existing connections"},
        {"/healthcheck/fail", M_POST, K_FULL, on_healthcheck,
         "readiness 503 until /healthcheck/ok"},
        {"/healthcheck/ok", M_POST, K_FULL, on_healthcheck, "undo /healthcheck/fail"},
        {"/quitquitquit", M_POST, K_FULL, on_quit, "drain and exit, like SIGTERM"},
};

#define NROUTES (sizeof(routes) / sizeof(routes[0]))

static void on_help(struct admin *a, struct client *c, struct request *rq)
{
        char body[4096];
        size_t n = 0;

        for (size_t i = 0; i < NROUTES && n < sizeof(body); i++)
                n += (size_t)snprintf(body + n, sizeof(body) - n, "  %-4s %-18s %s\n",
                                      routes[i].methods & M_POST
                                              ? (routes[i].methods & M_GET ? "GET|POST" : "POST")
                                              : "GET",
                                      routes[i].path, routes[i].help);
        respond(c, 200, "text/plain; charset=utf-8", body, n < sizeof(body) ? n : sizeof(body) - 1,
                NULL, !rq->head);
}

static void dispatch(struct admin *a, struct client *c, struct request *rq)
{
        static const char *const known[] = {"GET",     "HEAD",  "POST",    "PUT",  "DELETE",
                                            "OPTIONS", "PATCH", "CONNECT", "TRACE"};
        unsigned m = 0;
        bool method_known = false;

        for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
                if (!strcmp(rq->method, known[i]))
                        method_known = true;
        rq->head = !strcmp(rq->method, "HEAD");
        if (!method_known) {
                respond_text(c, rq, 501, "method not implemented\n");
                return;
        }
        if (!strcmp(rq->method, "GET") || rq->head)
                m = M_GET;
        else if (!strcmp(rq->method, "POST"))
                m = M_POST;
        for (size_t i = 0; i < NROUTES; i++) {
                const struct route *r = &routes[i];

                if (strcmp(r->path, rq->path) || !(r->kinds & (1u << a->kind)))
                        continue;
                if (!(r->methods & m)) {
                        const char *allow = r->methods == M_POST  ? "POST"
                                            : r->methods == M_GET ? "GET, HEAD"
                                                                  : "GET, HEAD, POST";
                        const char *t = "method not allowed\n";

                        respond(c, 405, "text/plain; charset=utf-8", t, strlen(t), allow,
                                !rq->head);
                        return;
                }
                r->fn(a, c, rq);
                return;
        }
        respond_text(c, rq, 404, "not found\n");
}

/* ---- connection handling ---- */

static void client_free(struct admin *a, size_t i)
{
        struct client *c = a->clients[i];

        close(c->fd);
        wp_free(c->body);
        wp_metrics_page_free(c->page);
        wp_free(c->sbuf);
        wp_free(c);
        a->clients[i] = NULL;
}

static void fail_request(struct client *c, int status)
{
        char text[64];

        snprintf(text, sizeof(text), "%s\n", reason(status));
        respond_text(c, NULL, status, text);
}

static void handle_complete(struct admin *a, struct client *c)
{
        struct request rq;
        int r = parse_head(c->buf, c->len, &rq);

        if (r <= 0) { /* cannot happen: parsed before */
                fail_request(c, 400);
                return;
        }
        dispatch(a, c, &rq);
}

/* New bytes are in c->buf: decide what comes next. */
static void on_request_bytes(struct admin *a, struct client *c)
{
        struct request rq;
        char copy[HEAD_MAX + 1];
        int r;

        /* parse a copy: parse_head writes NULs and we may need the bytes again */
        memcpy(copy, c->buf, c->len);
        copy[c->len] = 0;
        r = parse_head(copy, c->len, &rq);
        if (r < 0) {
                fail_request(c, -r);
                return;
        }
        if (r == 0)
                return;
        if (rq.has_cl && rq.content_length > BODY_MAX) {
                fail_request(c, 413);
                return;
        }
        size_t extra = c->len - (size_t)r, cl = rq.has_cl ? rq.content_length : 0;

        if (extra >= cl) {
                /* body (if any) fully here; anything after it is ignored (one request) */
                c->len = (size_t)r;
                handle_complete(a, c);
                return;
        }
        c->body_left = cl - extra;
        c->len = (size_t)r;
        c->state = C_BODY;
}

static void client_read(struct admin *a, struct client *c)
{
        char scratch[4096];
        ssize_t n;

        if (c->state == C_READ) {
                n = recv(c->fd, c->buf + c->len, HEAD_MAX - c->len, 0);
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                        c->state = C_LINGER;
                        c->deadline_ms = 0; /* gone: close now */
                        return;
                }
                if (n < 0)
                        return;
                c->len += (size_t)n;
                on_request_bytes(a, c);
                return;
        }
        n = recv(c->fd, scratch, sizeof(scratch), 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
        if (c->state == C_BODY) {
                if (n <= 0) {
                        c->state = C_LINGER;
                        c->deadline_ms = 0;
                        return;
                }
                c->body_left -= (size_t)n < c->body_left ? (size_t)n : c->body_left;
                if (c->body_left == 0)
                        handle_complete(a, c);
                return;
        }
        /* C_LINGER: discard until EOF */
        if (n <= 0)
                c->deadline_ms = 0;
}

/* Renders the next bytes of a streamed page into c->sbuf (sstart..send), framed. Returns
 * false when the stream has nothing more to send. */
static bool stream_refill(struct client *c)
{
        /* chunk: size line (at most "10000\r\n") before the data, CRLF after it, and room for
         * the last chunk "0\r\n\r\n" after the final data chunk */
        const size_t pre = 8, post = 2 + 5;
        char hex[16];
        size_t n, k;

        if (c->stream_end)
                return false;
        c->sstart = c->send = pre;
        n = wp_metrics_page_read(c->page, c->sbuf + pre, STREAM_BUF - pre - post);
        c->send = pre + n;
        if (c->chunked && n) {
                k = (size_t)snprintf(hex, sizeof(hex), "%zx\r\n", n);
                c->sstart = pre - k;
                memcpy(c->sbuf + c->sstart, hex, k);
                memcpy(c->sbuf + c->send, "\r\n", 2);
                c->send += 2;
        }
        if (n < STREAM_BUF - pre - post) { /* the page is complete */
                c->stream_end = true;
                c->page = wp_metrics_page_free(c->page);
                if (c->chunked) {
                        memcpy(c->sbuf + c->send, "0\r\n\r\n", 5);
                        c->send += 5;
                }
        }
        return c->send > c->sstart;
}

static void client_write(struct client *c)
{
        unsigned refills = 0;

        for (;;) {
                struct iovec iov[2];
                struct msghdr mh = {.msg_iov = iov};
                bool streaming = c->off >= c->headlen + c->bodylen;
                ssize_t n;

                if (streaming && c->sstart == c->send) {
                        if (!c->sbuf || refills == STREAM_ROUNDS || !stream_refill(c))
                                break;
                        refills++;
                }
                if (streaming) {
                        iov[mh.msg_iovlen++] =
                                (struct iovec){c->sbuf + c->sstart, c->send - c->sstart};
                } else if (c->off < c->headlen) {
                        iov[mh.msg_iovlen++] =
                                (struct iovec){c->head + c->off, c->headlen - c->off};
                        if (c->bodylen)
                                iov[mh.msg_iovlen++] = (struct iovec){c->body, c->bodylen};
                } else {
                        iov[mh.msg_iovlen++] = (struct iovec){c->body + (c->off - c->headlen),
                                                              c->bodylen - (c->off - c->headlen)};
                }
                n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);

                if (n < 0) {
                        if (errno == EAGAIN || errno == EINTR)
                                return;
                        c->state = C_LINGER;
                        c->deadline_ms = 0;
                        return;
                }
                if (streaming)
                        c->sstart += (size_t)n;
                else
                        c->off += (size_t)n;
                c->deadline_ms = now_ms() + WRITE_IDLE_MS;
        }
        if (c->sbuf && !c->stream_end)
                return; /* more of the page after the next poll round */
        /* all sent: half-close, then let the client read it before we close */
        shutdown(c->fd, SHUT_WR);
        c->state = C_LINGER;
        c->deadline_ms = now_ms() + LINGER_MS;
}

static void accept_one(struct admin *a)
{
        int fd = accept4(a->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        size_t slot = CLIENTS_MAX, victim = CLIENTS_MAX, stalled = CLIENTS_MAX;
        int64_t now = now_ms();
        struct client *c;

        if (fd < 0)
                return;
        for (size_t i = 0; i < CLIENTS_MAX; i++) {
                struct client *o = a->clients[i];

                if (!o) {
                        slot = i;
                        break;
                }
                /* the oldest client still sending its request, or lingering */
                if ((o->state == C_READ || o->state == C_BODY || o->state == C_LINGER) &&
                    (victim == CLIENTS_MAX || o->started_ms < a->clients[victim]->started_ms))
                        victim = i;
                /* the writing client whose socket has not drained for the longest (its
                 * deadline is its last progress + WRITE_IDLE_MS), e.g. a stalled scraper */
                if (o->state == C_WRITE &&
                    now - (o->deadline_ms - WRITE_IDLE_MS) >= STALL_EVICT_MS &&
                    (stalled == CLIENTS_MAX || o->deadline_ms < a->clients[stalled]->deadline_ms))
                        stalled = i;
        }
        if (slot == CLIENTS_MAX) {
                if (victim == CLIENTS_MAX)
                        victim = stalled;
                if (victim == CLIENTS_MAX) {
                        close(fd); /* every slot is busy writing, all making progress */
                        return;
                }
                client_free(a, victim);
                slot = victim;
        }
        c = wp_calloc(1, sizeof(*c));
        if (!c) {
                close(fd);
                return;
        }
        c->fd = fd;
        c->state = C_READ;
        c->started_ms = now_ms();
        c->deadline_ms = c->started_ms + READ_MS;
        a->clients[slot] = c;
}

static void *admin_main(void *arg)
{
        struct admin *a = arg;
        struct pollfd pfd[CLIENTS_MAX + 1];
        size_t idx[CLIENTS_MAX + 1];

        for (;;) {
                int64_t now = now_ms(), wait = -1;
                nfds_t n = 0;

                pfd[n++] = (struct pollfd){.fd = a->fd, .events = POLLIN};
                for (size_t i = 0; i < CLIENTS_MAX; i++) {
                        struct client *c = a->clients[i];

                        if (!c)
                                continue;
                        if (now >= c->deadline_ms) {
                                if (c->state == C_READ || c->state == C_BODY) {
                                        if (c->state == C_READ && c->len == 0) {
                                                client_free(a, i);
                                                continue;
                                        }
                                        fail_request(c, 408);
                                        client_write(c);
                                        if (c->state != C_LINGER || c->deadline_ms > now)
                                                goto poll_it;
                                }
                                client_free(a, i);
                                continue;
                        }
                poll_it:
                        if (wait < 0 || c->deadline_ms - now < wait)
                                wait = c->deadline_ms - now;
                        idx[n] = i;
                        pfd[n++] = (struct pollfd){
                                .fd = c->fd,
                                .events = c->state == C_WRITE ? POLLOUT : POLLIN,
                        };
                }
                if (poll(pfd, n, wait < 0 ? -1 : (int)(wait > 0 ? wait : 1)) < 0) {
                        if (errno != EINTR)
                                usleep(10000);
                        continue;
                }
                for (nfds_t k = 1; k < n; k++) {
                        struct client *c = a->clients[idx[k]];

                        if (!c || !pfd[k].revents)
                                continue;
                        if (c->state == C_WRITE) {
                                client_write(c);
                        } else {
                                client_read(a, c);
                                if (c->state == C_WRITE)
                                        client_write(c); /* usually completes at once */
                        }
                        if (c->state == C_LINGER && c->deadline_ms == 0)
                                client_free(a, idx[k]);
                }
                if (pfd[0].revents & POLLIN)
                        accept_one(a);
        }
        return NULL;
}

int wp_admin_start(struct wp_runtime *rt, const struct wp_addr *addr, enum wp_admin_kind kind)
{
        struct admin *a = wp_xcalloc(1, sizeof(*a));
        pthread_t th;
        int one = 1, r;

        a->rt = rt;
        a->kind = kind;
        a->fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (a->fd < 0)
                goto err;
        setsockopt(a->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(a->fd, (const struct sockaddr *)&addr->ss, addr->len) < 0 ||
            listen(a->fd, 128) < 0)
                goto err;
        if (pthread_create(&th, NULL, admin_main, a) != 0)
                goto err;
        pthread_detach(th);
        return 0;
err:
        r = -errno;
        wp_error("admin", "cannot serve on the %s address: %s",
                 kind == WP_ADMIN_FULL     ? "admin"
                 : kind == WP_ADMIN_STATUS ? "status"
                                           : "metrics",
                 strerror(errno));
        if (a->fd >= 0)
                close(a->fd);
        wp_free(a);
        return r;
}
