/*
 * http_load: HTTP/1.1-inside-HBONE load generator for the L7 benchmark (client ztunnel + client
 * app stand-in). One thread, libhbone: opens C tunnels over M HBONE connections (tunnel i on
 * connection i % M) to --authority, then sends keep-alive GET requests on them, one request in
 * flight per tunnel, and parses each response (status line, headers, Content-Length body).
 *
 *   http_load --server IP:PORT --authority HOST:PORT --cert F --key F --root F
 *             [--connections M] [--tunnels C] [--duration S] [--warmup S] [--rate R]
 *             [--path P] [--host H] [--header 'name: value']...
 *
 * Closed loop (default, --rate 0): every tunnel sends its next request as soon as the previous
 * response is complete (saturation).
 * Open loop (--rate R): request k is scheduled at t0 + k/R and sent on the first idle tunnel;
 * latency runs from the scheduled time, not from the actual send, so a stalled server is charged
 * for the requests that queued behind it (no coordinated omission). Requests that find no idle
 * tunnel wait in order.
 *
 * The first --warmup seconds (default 0.5) are excluded from the rate and latency figures; the
 * requests they complete are still in requests_total (what the server side did during the run).
 * Prints one JSON line:
 *   {"mode":"closed"|"open",...,"requests":N,"requests_total":N,"errors":E,"non200":K,
 *    "rps":..,"p50_us":..,"p90_us":..,"p99_us":..,"p999_us":..,"max_us":..,"mean_us":..}
 * Latency buckets are log-linear (64 per power of two: <= 1.6% error).
 * Exit status 0 when every tunnel opened and no request failed, 1 otherwise, 2 on usage.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>

#include "hbone/conn.h"
#include "hbone/hbone.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/base/x509.h"

#define MAX_HEAD 8192
#define MAX_HEADERS 16
#define SUB_BITS 6
#define NBUCKETS (128 + (64 - 7) * 64)

struct lconn;

enum rstate { R_IDLE, R_HEAD, R_BODY };

struct tunnel {
        struct lconn *lc;
        struct hbone_stream *st;
        unsigned status;   /* CONNECT answer */
        enum rstate rs;
        uint64_t sched_ns; /* latency origin of the request in flight */
        size_t hlen;
        uint64_t body_left;
        unsigned http_status;
        bool opened, closed, in_idle_list;
        char head[MAX_HEAD];
};

struct lconn {
        struct hbone_conn *c;
        unsigned idx;
        struct tunnel **tunnels;
        unsigned ntunnels, next;
        bool closed;
};

static struct {
        const char *server, *authority, *cert, *key, *root, *trust_domain, *path, *host;
        const char *headers[MAX_HEADERS];
        unsigned nheaders;
        unsigned nconns, ntunnels;
        double duration_s, warmup_s, rate, timeout_s;
        enum wp_io_backend backend;

        struct wp_loop *loop;
        struct wp_tls_ctx *tls;
        struct hbone_limits lim;
        struct lconn *conns;
        struct tunnel *tunnels;
        char *req;
        size_t req_len;

        unsigned answered, ok200, conns_closed;
        struct tunnel **idle; /* stack of tunnels with no request in flight */
        unsigned nidle;
        bool sending;         /* inside [t_start, t_stop) */
        uint64_t t_start, t_measure, t_stop;
        uint64_t next_due, interval_ns;
        uint64_t in_flight, sent, done_total, done_measured, errors, non200;
        uint64_t lat_sum_ns, lat_max_ns, lag_sum_ns;
        uint64_t hist[NBUCKETS];
        const char *first_error;
} G = {.nconns = 1, .ntunnels = 1, .duration_s = 5, .warmup_s = 0.5, .timeout_s = 120,
       .trust_domain = "cluster.local", .path = "/bench/get", .host = "bench"};

static volatile sig_atomic_t got_signal;

static void on_signal(int sig)
{
        got_signal = sig;
}

static void note_error(const char *what)
{
        if (!G.first_error)
                G.first_error = what;
}

/* ---- histogram ---- */

static unsigned bucket_of(uint64_t v)
{
        if (v < 128)
                return (unsigned)v;
        unsigned e = 63 - (unsigned)__builtin_clzll(v); /* >= 7 */
        unsigned sub = (unsigned)(v >> (e - SUB_BITS)) & ((1u << SUB_BITS) - 1);

        return 128 + (e - 7) * 64 + sub;
}

static uint64_t bucket_mid(unsigned b)
{
        if (b < 128)
                return b;
        unsigned e = (b - 128) / 64 + 7, sub = (b - 128) % 64;
        uint64_t lo = ((uint64_t)(64 + sub)) << (e - SUB_BITS);

        return lo + ((1ULL << (e - SUB_BITS)) >> 1);
}

static double percentile_us(double q)
{
        if (!G.done_measured)
                return 0;
        uint64_t rank = (uint64_t)(q * (double)G.done_measured);
        uint64_t seen = 0;

        if (rank >= G.done_measured)
                rank = G.done_measured - 1;
        for (unsigned b = 0; b < NBUCKETS; b++) {
                seen += G.hist[b];
                if (seen > rank) {
                        uint64_t v = bucket_mid(b);

                        return (double)(v < G.lat_max_ns ? v : G.lat_max_ns) / 1e3;
                }
        }
        return (double)G.lat_max_ns / 1e3;
}

/* ---- requests ---- */

static void push_idle(struct tunnel *t)
{
        if (!t->in_idle_list && !t->closed && t->status == 200) {
                t->in_idle_list = true;
                G.idle[G.nidle++] = t;
        }
}

static int send_request(struct tunnel *t, uint64_t sched)
{
        ssize_t n = hbone_stream_write(t->st, (const uint8_t *)G.req, G.req_len);

        if (n != (ssize_t)G.req_len) {
                /* the queue holds far more than one small request: a short write is a failure */
                note_error("request write failed");
                G.errors++;
                hbone_stream_reset(t->st, HBONE_H2_CANCEL);
                hbone_conn_kick(t->lc->c);
                return -EIO;
        }
        uint64_t now = wp_now_ns();

        t->rs = R_HEAD;
        t->hlen = 0;
        t->sched_ns = sched ? sched : now;
        if (sched && now > sched)
                G.lag_sum_ns += now - sched;
        G.in_flight++;
        G.sent++;
        hbone_conn_kick(t->lc->c);
        return 0;
}

/* open loop: send every due request that finds an idle tunnel */
static void pump_open(void)
{
        uint64_t now = wp_now_ns();

        while (G.sending && G.next_due <= now && G.next_due < G.t_stop && G.nidle > 0) {
                struct tunnel *t = G.idle[--G.nidle];

                t->in_idle_list = false;
                if (send_request(t, G.next_due) == 0)
                        G.next_due += G.interval_ns;
        }
}

static void response_done(struct tunnel *t)
{
        uint64_t now = wp_now_ns();

        G.in_flight--;
        G.done_total++;
        t->rs = R_IDLE;
        if (t->http_status != 200) {
                G.non200++;
                note_error("non-200 response");
        } else if (t->sched_ns >= G.t_measure && t->sched_ns < G.t_stop) {
                uint64_t lat = now - t->sched_ns;

                G.done_measured++;
                G.hist[bucket_of(lat)]++;
                G.lat_sum_ns += lat;
                if (lat > G.lat_max_ns)
                        G.lat_max_ns = lat;
        }
        if (G.rate > 0) {
                push_idle(t);
                pump_open();
        } else if (G.sending && now < G.t_stop) {
                send_request(t, 0);
        } else {
                push_idle(t);
        }
}

/* parses the response head in t->head[0..hlen); returns 0 or -EPROTO */
static int parse_head(struct tunnel *t)
{
        const char *p = t->head, *end = t->head + t->hlen;

        if (t->hlen < 12 || memcmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ')
                return -EPROTO;
        t->http_status = (unsigned)((p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0'));
        t->body_left = 0;
        bool have_len = false;
        const char *line = memchr(p, '\n', (size_t)(end - p));

        while (line && ++line < end) {
                const char *eol = memchr(line, '\n', (size_t)(end - line));

                if (!eol)
                        break;
                size_t len = (size_t)(eol - line);

                if (len > 15 && strncasecmp(line, "content-length:", 15) == 0) {
                        char *e;

                        t->body_left = strtoull(line + 15, &e, 10);
                        have_len = true;
                } else if (len > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0) {
                        return -EPROTO; /* our backend never chunks; neither should the path */
                }
                line = eol;
        }
        if (!have_len && t->http_status != 204 && t->http_status != 304)
                return -EPROTO;
        return 0;
}

static int feed(struct tunnel *t, const uint8_t *data, size_t len)
{
        while (len > 0) {
                if (t->rs == R_IDLE)
                        return -EPROTO; /* bytes with no request in flight */
                if (t->rs == R_HEAD) {
                        size_t room = MAX_HEAD - t->hlen, take = len < room ? len : room;
                        size_t old = t->hlen;

                        memcpy(t->head + old, data, take);
                        t->hlen += take;
                        /* look for the blank line, starting a little before the new bytes */
                        size_t from = old > 3 ? old - 3 : 0;
                        char *hit = memmem(t->head + from, t->hlen - from, "\r\n\r\n", 4);

                        if (!hit) {
                                if (t->hlen == MAX_HEAD)
                                        return -E2BIG;
                                return 0;
                        }
                        size_t head_len = (size_t)(hit - t->head) + 4;
                        size_t used = head_len - old;

                        t->hlen = head_len;
                        if (parse_head(t) < 0)
                                return -EPROTO;
                        data += used;
                        len -= used;
                        t->rs = R_BODY;
                }
                if (t->rs == R_BODY) {
                        size_t take = t->body_left < len ? (size_t)t->body_left : len;

                        t->body_left -= take;
                        data += take;
                        len -= take;
                        if (t->body_left == 0)
                                response_done(t);
                }
        }
        return 0;
}

/* ---- tunnels ---- */

static void open_more(struct lconn *lc)
{
        struct hbone_session *s = hbone_conn_session(lc->c);

        while (s && lc->next < lc->ntunnels && hbone_session_streams_available(s) > 0) {
                struct tunnel *t = lc->tunnels[lc->next];
                int r = hbone_session_open(s, G.authority, NULL, 0, t, &t->st);

                if (r == -EAGAIN)
                        break;
                lc->next++;
                if (r < 0) {
                        note_error("hbone_session_open failed");
                        t->closed = true;
                        G.answered++;
                        continue;
                }
                t->opened = true;
        }
        hbone_conn_kick(lc->c);
}

static int cb_request(struct hbone_session *s, struct hbone_stream *st,
                      const struct hbone_request *req, void *session_user)
{
        return -EPROTO; /* we are the client */
}

static void cb_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct tunnel *t = user;

        t->status = status;
        G.answered++;
        if (status != 200) {
                note_error("tunnel refused (non-200)");
                return;
        }
        G.ok200++;
        push_idle(t);
}

static int cb_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user)
{
        struct tunnel *t = user;
        int r = feed(t, data, len);

        hbone_stream_consume(st, len);
        hbone_conn_kick(t->lc->c);
        if (r < 0) {
                note_error(r == -E2BIG ? "response head too large" : "bad response");
                return r; /* resets the stream */
        }
        return 0;
}

static void cb_eof(struct hbone_stream *st, void *user)
{
        struct tunnel *t = user;

        if (t->rs != R_IDLE)
                note_error("tunnel ended mid-response");
        hbone_stream_shutdown(st);
        hbone_conn_kick(t->lc->c);
}

static void cb_writable(struct hbone_stream *st, void *user)
{
}

static void cb_close(struct hbone_stream *st, uint32_t h2_error, void *user)
{
        struct tunnel *t = user;

        if (t->closed)
                return;
        t->closed = true;
        t->st = NULL;
        if (!t->status)
                G.answered++;
        if (t->rs != R_IDLE) {
                G.in_flight--;
                G.errors++;
                note_error(h2_error ? "tunnel reset mid-request" : "tunnel closed mid-request");
        } else if (G.sending) {
                note_error("tunnel closed during the run");
        }
        if (t->in_idle_list) {
                for (unsigned i = 0; i < G.nidle; i++)
                        if (G.idle[i] == t) {
                                G.idle[i] = G.idle[--G.nidle];
                                break;
                        }
                t->in_idle_list = false;
        }
}

static void cb_goaway(struct hbone_session *s, uint32_t h2_error, void *session_user)
{
        if (h2_error)
                note_error("GOAWAY received");
}

static const struct hbone_callbacks callbacks = {
        .on_tunnel_request = cb_request,
        .on_tunnel_response = cb_response,
        .on_tunnel_data = cb_data,
        .on_tunnel_eof = cb_eof,
        .on_tunnel_writable = cb_writable,
        .on_tunnel_close = cb_close,
        .on_goaway = cb_goaway,
};

/* ---- connections ---- */

static void conn_established(struct hbone_conn *c, void *user)
{
        open_more(user);
}

static void conn_closed(struct hbone_conn *c, int err, const char *why, void *user)
{
        struct lconn *lc = user;

        lc->closed = true;
        G.conns_closed++;
        if (err && !got_signal) {
                fprintf(stderr, "http_load: connection %u closed: %s\n", lc->idx,
                        why ? why : strerror(-err));
                note_error("connection failed");
        }
        for (unsigned i = 0; i < lc->ntunnels; i++) {
                struct tunnel *t = lc->tunnels[i];

                if (!t->closed) {
                        if (t->st)
                                cb_close(t->st, 0, t);
                        else {
                                t->closed = true;
                                G.answered++;
                        }
                }
        }
        lc->next = lc->ntunnels;
}

static const struct hbone_conn_ops conn_ops = {
        .on_established = conn_established,
        .on_closed = conn_closed,
};

/* ---- setup ---- */

static int load_tls(void)
{
        char err[256];
        int r = wp_tls_ctx_new_from_files(false, G.cert, G.key, G.root, G.trust_domain, &G.tls,
                                          err, sizeof(err));

        if (r < 0)
                fprintf(stderr, "http_load: TLS: %s\n", err);
        return r;
}

static void build_request(void)
{
        size_t cap = 512 + strlen(G.path) + strlen(G.host);

        for (unsigned i = 0; i < G.nheaders; i++)
                cap += strlen(G.headers[i]) + 2;
        G.req = wp_xmalloc(cap);
        int n = snprintf(G.req, cap, "GET %s HTTP/1.1\r\nHost: %s\r\nuser-agent: http_load\r\n"
                         "accept: */*\r\n", G.path, G.host);

        for (unsigned i = 0; i < G.nheaders; i++)
                n += snprintf(G.req + n, cap - (size_t)n, "%s\r\n", G.headers[i]);
        n += snprintf(G.req + n, cap - (size_t)n, "\r\n");
        G.req_len = (size_t)n;
}

static void usage(FILE *f)
{
        fputs("usage: http_load --server IP:PORT --authority HOST:PORT --cert F --key F --root F\n"
              "         [--connections M] [--tunnels C] [--duration S] [--warmup S]\n"
              "         [--rate R (0 = closed loop)] [--path P] [--host H]\n"
              "         [--header 'name: value']... [--trust-domain TD]\n"
              "         [--io-backend uring|epoll|auto] [--timeout-seconds S] [-v]\n",
              f);
}

static double secs(uint64_t a, uint64_t b)
{
        return b > a ? (double)(b - a) / 1e9 : 0.0;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"server", required_argument, NULL, 's'},
                {"authority", required_argument, NULL, 'a'},
                {"cert", required_argument, NULL, 'c'},
                {"key", required_argument, NULL, 'k'},
                {"root", required_argument, NULL, 'r'},
                {"trust-domain", required_argument, NULL, 't'},
                {"connections", required_argument, NULL, 'M'},
                {"tunnels", required_argument, NULL, 'N'},
                {"duration", required_argument, NULL, 'D'},
                {"warmup", required_argument, NULL, 'W'},
                {"rate", required_argument, NULL, 'R'},
                {"path", required_argument, NULL, 'p'},
                {"host", required_argument, NULL, 'H'},
                {"header", required_argument, NULL, 'x'},
                {"timeout-seconds", required_argument, NULL, 'T'},
                {"io-backend", required_argument, NULL, 'b'},
                {"help", no_argument, NULL, 'h'},
                {NULL, 0, NULL, 0},
        };
        struct hbone_target srv, auth;
        const char *note = NULL;
        struct rlimit rl;
        int c, b;

        signal(SIGPIPE, SIG_IGN);
        wp_log_set_level(WP_LOG_WARN);
        while ((c = getopt_long(argc, argv, "vh", opts, NULL)) != -1) {
                switch (c) {
                case 's': G.server = optarg; break;
                case 'a': G.authority = optarg; break;
                case 'c': G.cert = optarg; break;
                case 'k': G.key = optarg; break;
                case 'r': G.root = optarg; break;
                case 't': G.trust_domain = optarg; break;
                case 'M': G.nconns = (unsigned)strtoul(optarg, NULL, 10); break;
                case 'N': G.ntunnels = (unsigned)strtoul(optarg, NULL, 10); break;
                case 'D': G.duration_s = strtod(optarg, NULL); break;
                case 'W': G.warmup_s = strtod(optarg, NULL); break;
                case 'R': G.rate = strtod(optarg, NULL); break;
                case 'p': G.path = optarg; break;
                case 'H': G.host = optarg; break;
                case 'x':
                        if (G.nheaders == MAX_HEADERS || strpbrk(optarg, "\r\n")) {
                                usage(stderr);
                                return 2;
                        }
                        G.headers[G.nheaders++] = optarg;
                        break;
                case 'T': G.timeout_s = strtod(optarg, NULL); break;
                case 'b':
                        b = wp_io_backend_parse(optarg);
                        if (b < 0) {
                                usage(stderr);
                                return 2;
                        }
                        G.backend = (enum wp_io_backend)b;
                        break;
                case 'v': wp_log_set_level(WP_LOG_DEBUG); break;
                case 'h': usage(stdout); return 0;
                default: usage(stderr); return 2;
                }
        }
        if (!G.server || hbone_target_parse(G.server, strlen(G.server), &srv) < 0 || !srv.is_ip ||
            !G.authority || hbone_target_parse(G.authority, strlen(G.authority), &auth) < 0 ||
            !G.cert || !G.key || !G.root || G.nconns == 0 || G.ntunnels == 0 ||
            G.duration_s <= 0 || G.warmup_s < 0 || G.warmup_s >= G.duration_s || G.rate < 0 ||
            strpbrk(G.path, " \r\n") || strpbrk(G.host, " \r\n") || optind != argc) {
                usage(stderr);
                return 2;
        }
        if (G.nconns > G.ntunnels)
                G.nconns = G.ntunnels;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                setrlimit(RLIMIT_NOFILE, &rl);
        }
        struct sigaction sa = {.sa_handler = on_signal};
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        build_request();
        if (load_tls() < 0)
                return 1;
        if (wp_loop_new(G.backend, 4096, &G.loop, &note) < 0) {
                fprintf(stderr, "http_load: cannot create event loop: %s\n", note ? note : "");
                return 1;
        }
        hbone_limits_default(&G.lim);

        G.conns = wp_xcalloc(G.nconns, sizeof(*G.conns));
        G.tunnels = wp_xcalloc(G.ntunnels, sizeof(*G.tunnels));
        G.idle = wp_xcalloc(G.ntunnels, sizeof(*G.idle));
        for (unsigned i = 0; i < G.nconns; i++) {
                G.conns[i].idx = i;
                G.conns[i].tunnels = wp_xcalloc(G.ntunnels / G.nconns + 1, sizeof(void *));
        }
        for (unsigned i = 0; i < G.ntunnels; i++) {
                struct lconn *lc = &G.conns[i % G.nconns];

                G.tunnels[i].lc = lc;
                lc->tunnels[lc->ntunnels++] = &G.tunnels[i];
        }

        uint64_t t0 = wp_now_ns();
        uint64_t deadline = t0 + (uint64_t)(G.timeout_s * 1e9);

        for (unsigned i = 0; i < G.nconns; i++) {
                struct hbone_conn_config cfg = {
                        .loop = G.loop,
                        .tls_ctx = G.tls,
                        .lim = &G.lim,
                        .cb = &callbacks,
                        .ops = &conn_ops,
                        .user = &G.conns[i],
                        .handshake_timeout_ms = 30000,
                        .connect_timeout_ms = 30000,
                        .id = i,
                };
                int r = hbone_conn_connect(&cfg, (const struct sockaddr *)&srv.addr, srv.addrlen,
                                           &G.conns[i].c);
                if (r < 0) {
                        fprintf(stderr, "http_load: connect: %s\n", strerror(-r));
                        return 1;
                }
        }

        /* 1. every tunnel answered */
        while (G.answered < G.ntunnels && !got_signal && wp_now_ns() < deadline)
                wp_loop_run_once(G.loop, 100 * WP_NSEC_PER_MSEC);
        double setup_s = secs(t0, wp_now_ns());

        if (G.ok200 < G.ntunnels)
                fprintf(stderr, "http_load: only %u of %u tunnels established (%s)\n", G.ok200,
                        G.ntunnels, G.first_error ? G.first_error : "timeout");

        /* 2. the run */
        G.t_start = wp_now_ns();
        G.t_measure = G.t_start + (uint64_t)(G.warmup_s * 1e9);
        G.t_stop = G.t_start + (uint64_t)(G.duration_s * 1e9);
        G.sending = G.ok200 > 0 && !got_signal;
        if (G.rate > 0) {
                G.interval_ns = (uint64_t)(1e9 / G.rate);
                if (!G.interval_ns)
                        G.interval_ns = 1;
                G.next_due = G.t_start;
        } else {
                while (G.sending && G.nidle > 0) {
                        struct tunnel *t = G.idle[--G.nidle];

                        t->in_idle_list = false;
                        send_request(t, 0);
                }
        }
        while (G.sending && !got_signal) {
                uint64_t now, wait = 100 * WP_NSEC_PER_MSEC;

                if (G.rate > 0)
                        pump_open(); /* also the requests due just before t_stop */
                now = wp_now_ns();
                if (now >= G.t_stop)
                        break;
                if (G.rate > 0) {
                        if (G.nidle > 0 && G.next_due > now && G.next_due - now < wait)
                                wait = G.next_due - now;
                        else if (G.nidle > 0 && G.next_due <= now)
                                wait = 0;
                }
                if (G.t_stop - now < wait)
                        wait = G.t_stop - now;
                wp_loop_run_once(G.loop, wait);
                if (G.conns_closed == G.nconns)
                        break;
        }
        G.sending = false;
        uint64_t t_end = wp_now_ns();
        /* scheduled requests never sent are failures of the path (open loop only) */
        uint64_t unsent = 0;

        if (G.rate > 0 && G.next_due < G.t_stop)
                unsent = (G.t_stop - G.next_due + G.interval_ns - 1) / G.interval_ns;

        /* 3. let the requests in flight finish (they count in requests_total only) */
        uint64_t drain_until = wp_now_ns() + 5 * WP_NSEC_PER_SEC;

        while (G.in_flight > 0 && G.conns_closed < G.nconns && wp_now_ns() < drain_until)
                wp_loop_run_once(G.loop, 50 * WP_NSEC_PER_MSEC);
        if (G.in_flight > 0) {
                note_error("requests still in flight at the end");
                G.errors += G.in_flight;
        }
        got_signal = got_signal ? got_signal : SIGTERM; /* teardown is not a failure */
        for (unsigned i = 0; i < G.nconns; i++)
                if (!G.conns[i].closed)
                        hbone_conn_close(G.conns[i].c, 0, "done");
        uint64_t close_until = wp_now_ns() + 5 * WP_NSEC_PER_SEC;

        while (G.conns_closed < G.nconns && wp_now_ns() < close_until)
                wp_loop_run_once(G.loop, 50 * WP_NSEC_PER_MSEC);

        double measured_s = secs(G.t_measure, t_end);
        double rps = measured_s > 0 ? (double)G.done_measured / measured_s : 0;

        printf("{\"mode\":\"%s\",\"connections\":%u,\"tunnels\":%u,\"tunnels_ok\":%u,"
               "\"rate\":%.1f,\"duration\":%.3f,\"warmup\":%.3f,\"setup_seconds\":%.3f,"
               "\"requests\":%llu,\"requests_total\":%llu,\"errors\":%llu,\"non200\":%llu,"
               "\"unsent\":%llu,\"rps\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
               "\"p999_us\":%.1f,\"max_us\":%.1f,\"mean_us\":%.1f,\"mean_send_lag_us\":%.1f,"
               "\"error\":\"%s\"}\n",
               G.rate > 0 ? "open" : "closed", G.nconns, G.ntunnels, G.ok200, G.rate,
               secs(G.t_start, t_end), G.warmup_s, setup_s,
               (unsigned long long)G.done_measured, (unsigned long long)G.done_total,
               (unsigned long long)G.errors, (unsigned long long)G.non200,
               (unsigned long long)unsent, rps, percentile_us(0.50), percentile_us(0.90),
               percentile_us(0.99), percentile_us(0.999), (double)G.lat_max_ns / 1e3,
               G.done_measured ? (double)G.lat_sum_ns / (double)G.done_measured / 1e3 : 0.0,
               G.sent ? (double)G.lag_sum_ns / (double)G.sent / 1e3 : 0.0,
               G.first_error ? G.first_error : "");
        fflush(stdout);
        if (G.conns_closed == G.nconns) {
                for (unsigned i = 0; i < G.nconns; i++) {
                        hbone_conn_free(G.conns[i].c);
                        wp_free(G.conns[i].tunnels);
                }
                wp_free(G.conns);
                wp_free(G.tunnels);
                wp_free(G.idle);
                wp_free(G.req);
                wp_tls_ctx_unref(G.tls);
                wp_loop_free(G.loop);
        }
        bool ok = G.ok200 == G.ntunnels && !G.errors && !G.non200 && !unsent;

        return ok ? 0 : 1;
}
