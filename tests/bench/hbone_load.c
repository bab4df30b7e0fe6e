/*
 * hbone_load: HBONE load generator for the benchmark (client ztunnel stand-in). Opens N tunnels
 * spread over M HBONE connections (tunnel i on connection i % M) with libhbone, one thread.
 *
 *   hbone_load --server IP:PORT --authority HOST:PORT --cert F --key F --root F
 *              [--connections M] [--tunnels N] [--bytes B | --idle [--hold-seconds S]]
 *
 * Bulk mode (default): each tunnel sends B bytes (suffixes k/m/g = KiB/MiB/GiB) and half-closes;
 * received bytes are counted and discarded. A tunnel succeeds when it got 200, all its bytes were
 * written and the stream then closed cleanly (the far side closes after reading our EOF, so a
 * clean close means the destination read everything). Prints one JSON line:
 *   {"mode":"bulk",...,"ok":N,"failed":0,"bytes_sent":..,"seconds":..,"gbps":..}
 * where seconds run from the first connect to the last tunnel's close.
 *
 * Idle mode (--idle): opens the N tunnels, prints "READY <ok>" on stdout once every tunnel got
 * its answer, then holds them without traffic until SIGTERM/SIGINT or --hold-seconds, closes and
 * prints the JSON line. Exit status 0 when every tunnel succeeded, 1 otherwise, 2 on usage.
 *
 * Other options: --trust-domain TD, --io-backend uring|epoll|auto, --timeout-seconds S (whole
 * run, default 600), --max-per-connection K (cap on streams per connection, default: the
 * peer's limit), -v (library debug logs on stderr).
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "hbone/conn.h"
#include "hbone/hbone.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/base/x509.h"

#define CHUNK (64 * 1024)

struct lconn;

struct tunnel {
        struct lconn *lc;
        struct hbone_stream *st;
        uint64_t sent;
        unsigned status;
        bool opened, shut, closed, success;
};

struct lconn {
        struct hbone_conn *c;
        unsigned idx;
        struct tunnel **tunnels; /* assigned to this connection, opened in order */
        unsigned ntunnels, next;
        bool closed;
};

static struct {
        const char *server, *authority, *cert, *key, *root, *trust_domain;
        unsigned nconns, ntunnels, max_per_conn;
        uint64_t bytes;
        bool idle;
        double hold_s, timeout_s;
        enum wp_io_backend backend;

        struct wp_loop *loop;
        struct wp_tls_ctx *tls;
        struct hbone_limits lim;
        struct lconn *conns;
        struct tunnel *tunnels;
        unsigned answered, ok200, finished, conns_closed;
        uint64_t bytes_sent, bytes_recv;
        uint64_t t0, t_ready, t_end;
        const char *first_error;
} G = {.nconns = 1, .ntunnels = 1, .bytes = 1 << 20, .timeout_s = 600,
       .trust_domain = "cluster.local"};

static uint8_t chunk[CHUNK];
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

/* ---- tunnels ---- */

static void tunnel_fill(struct tunnel *t)
{
        while (t->sent < G.bytes) {
                uint64_t left = G.bytes - t->sent;
                ssize_t n = hbone_stream_write(t->st, chunk, left < CHUNK ? (size_t)left : CHUNK);

                if (n == -EAGAIN)
                        break; /* on_tunnel_writable follows */
                if (n < 0) {
                        note_error("stream write failed");
                        hbone_stream_reset(t->st, HBONE_H2_CANCEL);
                        goto kick;
                }
                t->sent += (uint64_t)n;
                G.bytes_sent += (uint64_t)n;
        }
        if (t->sent == G.bytes && !t->shut) {
                t->shut = true;
                if (hbone_stream_shutdown(t->st) < 0)
                        note_error("stream shutdown failed");
        }
kick:
        hbone_conn_kick(t->lc->c);
}

static void open_more(struct lconn *lc)
{
        struct hbone_session *s = hbone_conn_session(lc->c);
        unsigned cap = G.max_per_conn;

        while (s && lc->next < lc->ntunnels && hbone_session_streams_available(s) > 0 &&
               (!cap || hbone_session_open_streams(s) < cap)) {
                struct tunnel *t = lc->tunnels[lc->next];
                int r = hbone_session_open(s, G.authority, NULL, 0, t, &t->st);

                if (r == -EAGAIN)
                        break;
                lc->next++;
                if (r < 0) {
                        note_error("hbone_session_open failed");
                        t->closed = true;
                        G.answered++;
                        G.finished++;
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
                return; /* on_tunnel_close follows */
        }
        G.ok200++;
        if (G.ok200 == 1 && !G.idle)
                G.t_ready = wp_now_ns();
        if (!G.idle)
                tunnel_fill(t);
}

static int cb_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user)
{
        struct tunnel *t = user;

        G.bytes_recv += len;
        hbone_stream_consume(st, len);
        hbone_conn_kick(t->lc->c);
        return 0;
}

static void cb_eof(struct hbone_stream *st, void *user)
{
        /* the far side half-closed; the stream closes once our END_STREAM is out too */
}

static void cb_writable(struct hbone_stream *st, void *user)
{
        struct tunnel *t = user;

        if (!G.idle && t->status == 200 && !t->shut)
                tunnel_fill(t);
}

static void cb_close(struct hbone_stream *st, uint32_t h2_error, void *user)
{
        struct tunnel *t = user;

        if (t->closed)
                return;
        t->closed = true;
        t->st = NULL;
        if (!t->status)
                G.answered++; /* reset before any answer */
        if (G.idle)
                t->success = t->status == 200;
        else
                t->success = t->status == 200 && h2_error == 0 && t->shut && t->sent == G.bytes;
        if (!t->success && !(G.idle && got_signal))
                note_error(h2_error ? "tunnel reset" : "tunnel ended early");
        G.finished++;
        G.t_end = wp_now_ns();
        if (!t->lc->closed && !hbone_conn_closing(t->lc->c) && hbone_conn_session(t->lc->c))
                open_more(t->lc);
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
                fprintf(stderr, "hbone_load: connection %u closed: %s\n", lc->idx,
                        why ? why : strerror(-err));
                note_error("connection failed");
        }
        /* tunnels never opened (or never closed) on this connection fail */
        for (unsigned i = 0; i < lc->ntunnels; i++) {
                struct tunnel *t = lc->tunnels[i];

                if (!t->closed) {
                        t->closed = true;
                        if (!t->status)
                                G.answered++;
                        G.finished++;
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
                fprintf(stderr, "hbone_load: TLS: %s\n", err);
        return r;
}

static int parse_size(const char *s, uint64_t *ret)
{
        char *end;
        unsigned long long v;

        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno || end == s)
                return -EINVAL;
        switch (*end) {
        case 'k': case 'K': v <<= 10; end++; break;
        case 'm': case 'M': v <<= 20; end++; break;
        case 'g': case 'G': v <<= 30; end++; break;
        default: break;
        }
        if (*end)
                return -EINVAL;
        *ret = v;
        return 0;
}

static void usage(FILE *f)
{
        fputs("usage: hbone_load --server IP:PORT --authority HOST:PORT --cert F --key F --root F\n"
              "         [--connections M] [--tunnels N] [--bytes B[k|m|g]]\n"
              "         [--idle [--hold-seconds S]] [--max-per-connection K]\n"
              "         [--trust-domain TD] [--io-backend uring|epoll|auto]\n"
              "         [--timeout-seconds S] [-v]\n",
              f);
}

static void run_until(bool (*done)(void), uint64_t deadline)
{
        while (!done() && wp_now_ns() < deadline)
                wp_loop_run_once(G.loop, 100 * WP_NSEC_PER_MSEC);
}

static bool all_answered(void)
{
        return G.answered >= G.ntunnels || got_signal;
}

static bool all_finished(void)
{
        return G.finished >= G.ntunnels;
}

static bool all_conns_closed(void)
{
        return G.conns_closed >= G.nconns;
}

static bool hold_over(void)
{
        return got_signal || G.finished >= G.ntunnels;
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
                {"bytes", required_argument, NULL, 'B'},
                {"idle", no_argument, NULL, 'I'},
                {"hold-seconds", required_argument, NULL, 'H'},
                {"timeout-seconds", required_argument, NULL, 'T'},
                {"max-per-connection", required_argument, NULL, 'K'},
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
                case 'K': G.max_per_conn = (unsigned)strtoul(optarg, NULL, 10); break;
                case 'B':
                        if (parse_size(optarg, &G.bytes) < 0) {
                                usage(stderr);
                                return 2;
                        }
                        break;
                case 'I': G.idle = true; break;
                case 'H': G.hold_s = strtod(optarg, NULL); break;
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
            !G.cert || !G.key || !G.root || G.nconns == 0 || G.ntunnels == 0 || optind != argc) {
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
        for (size_t i = 0; i < sizeof(chunk); i++)
                chunk[i] = (uint8_t)(i * 131 + 7);
        if (load_tls() < 0)
                return 1;
        if (wp_loop_new(G.backend, 4096, &G.loop, &note) < 0) {
                fprintf(stderr, "hbone_load: cannot create event loop: %s\n", note ? note : "");
                return 1;
        }
        hbone_limits_default(&G.lim);

        G.conns = wp_xcalloc(G.nconns, sizeof(*G.conns));
        G.tunnels = wp_xcalloc(G.ntunnels, sizeof(*G.tunnels));
        for (unsigned i = 0; i < G.nconns; i++) {
                G.conns[i].idx = i;
                G.conns[i].tunnels = wp_xcalloc(G.ntunnels / G.nconns + 1, sizeof(void *));
        }
        for (unsigned i = 0; i < G.ntunnels; i++) {
                struct lconn *lc = &G.conns[i % G.nconns];

                G.tunnels[i].lc = lc;
                lc->tunnels[lc->ntunnels++] = &G.tunnels[i];
        }

        G.t0 = wp_now_ns();
        uint64_t deadline = G.t0 + (uint64_t)(G.timeout_s * 1e9);
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
                        fprintf(stderr, "hbone_load: connect: %s\n", strerror(-r));
                        return 1;
                }
        }

        double held = 0;
        if (G.idle) {
                run_until(all_answered, deadline);
                G.t_ready = wp_now_ns();
                printf("READY %u\n", G.ok200);
                fflush(stdout);
                if (G.ok200 < G.ntunnels)
                        fprintf(stderr, "hbone_load: only %u of %u tunnels established (%s)\n",
                                G.ok200, G.ntunnels, G.first_error ? G.first_error : "timeout");
                uint64_t until = G.hold_s > 0 ? G.t_ready + (uint64_t)(G.hold_s * 1e9) : deadline;
                run_until(hold_over, until < deadline ? until : deadline);
                held = secs(G.t_ready, wp_now_ns());
                /* count what is still open as successful before tearing down */
                for (unsigned i = 0; i < G.ntunnels; i++) {
                        struct tunnel *t = &G.tunnels[i];

                        if (!t->closed && t->status == 200)
                                t->success = true;
                }
                got_signal = got_signal ? got_signal : SIGTERM; /* teardown is not a failure */
                for (unsigned i = 0; i < G.nconns; i++)
                        if (!G.conns[i].closed)
                                hbone_conn_close(G.conns[i].c, 0, "done");
        } else {
                run_until(all_finished, deadline);
                if (!all_finished())
                        note_error("timeout");
                for (unsigned i = 0; i < G.nconns; i++)
                        if (!G.conns[i].closed) {
                                if (all_finished())
                                        hbone_conn_drain(G.conns[i].c);
                                else
                                        hbone_conn_close(G.conns[i].c, -ETIMEDOUT, "timeout");
                        }
        }
        run_until(all_conns_closed, wp_now_ns() + 10 * WP_NSEC_PER_SEC);

        unsigned ok = 0;
        for (unsigned i = 0; i < G.ntunnels; i++)
                ok += G.tunnels[i].success;
        if (G.idle) {
                printf("{\"mode\":\"idle\",\"connections\":%u,\"tunnels\":%u,\"ok\":%u,"
                       "\"failed\":%u,\"setup_seconds\":%.3f,\"held_seconds\":%.3f,"
                       "\"error\":\"%s\"}\n",
                       G.nconns, G.ntunnels, ok, G.ntunnels - ok, secs(G.t0, G.t_ready), held,
                       G.first_error ? G.first_error : "");
        } else {
                double s = secs(G.t0, G.t_end ? G.t_end : wp_now_ns());

                printf("{\"mode\":\"bulk\",\"connections\":%u,\"tunnels\":%u,\"bytes_per_tunnel\":"
                       "%llu,\"ok\":%u,\"failed\":%u,\"bytes_sent\":%llu,\"bytes_received\":%llu,"
                       "\"seconds\":%.3f,\"gbps\":%.3f,\"error\":\"%s\"}\n",
                       G.nconns, G.ntunnels, (unsigned long long)G.bytes, ok, G.ntunnels - ok,
                       (unsigned long long)G.bytes_sent, (unsigned long long)G.bytes_recv, s,
                       s > 0 ? (double)G.bytes_sent * 8 / s / 1e9 : 0.0,
                       G.first_error ? G.first_error : "");
        }
        fflush(stdout);
        if (all_conns_closed()) {
                for (unsigned i = 0; i < G.nconns; i++) {
                        hbone_conn_free(G.conns[i].c);
                        wp_free(G.conns[i].tunnels);
                }
                wp_free(G.conns);
                wp_free(G.tunnels);
                wp_tls_ctx_unref(G.tls);
                wp_loop_free(G.loop);
        }
        return ok == G.ntunnels ? 0 : 1;
}
