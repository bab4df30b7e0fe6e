/*
 * hbone: a small HBONE client and server for debugging and demos.
 *
 *   hbone connect --server IP:PORT --authority IP:PORT --cert F --key F --root F
 *       one tunnel: stdin -> tunnel, tunnel -> stdout (like nc). Exit 0 after a clean close,
 *       1 on failure (the HTTP status or error is printed on stderr).
 *   hbone serve --listen IP:PORT --cert F --key F --root F
 *       a destination-ztunnel stand-in: terminates HBONE and forwards each tunnel to its
 *       :authority over plain TCP; logs each tunnel with the peer's SPIFFE identity.
 *   hbone forward --listen IP:PORT --server IP:PORT --authority HOST:PORT --cert F --key F --root F
 *       a source-ztunnel stand-in for stock TCP clients: each accepted TCP connection becomes one
 *       tunnel (see run_forward). --connections N (1), --header 'name: value' (e.g. baggage).
 *
 * Common: --trust-domain TD (cluster.local), --io-backend uring|epoll|auto,
 *         --connect-timeout-ms MS (10000), -v (debug logs).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hbone/conn.h"
#include "hbone/relay.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/list.h"
#include "waypoint/base/log.h"
#include "waypoint/base/util.h"
#include "waypoint/base/x509.h"

struct tool {
        const char *mode;
        const char *server, *authority, *listen_addr;
        const char *cert, *key, *root, *trust_domain;
        enum wp_io_backend backend;
        uint32_t connect_timeout_ms;
        struct wp_loop *loop;
        struct wp_tls_ctx *tls;
        struct hbone_limits lim;
        bool done;
        int exit_code;
        /* connect mode */
        struct hbone_conn *conn;
        int sp[2];
        pthread_t in_thread, out_thread;
};

static struct tool T = {.exit_code = 1, .sp = {-1, -1}};

static int parse_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
        struct hbone_target t;

        if (hbone_target_parse(s, strlen(s), &t) < 0 || !t.is_ip)
                return -EINVAL;
        memcpy(ss, &t.addr, t.addrlen);
        *len = t.addrlen;
        return 0;
}

static int load_tls(bool server)
{
        char err[256];
        int r;

        if (!T.cert || !T.key || !T.root) {
                fprintf(stderr, "hbone: --cert, --key and --root are required\n");
                return -EINVAL;
        }
        r = wp_tls_ctx_new_from_files(server, T.cert, T.key, T.root, T.trust_domain, &T.tls, err,
                                      sizeof(err));
        if (r < 0)
                fprintf(stderr, "hbone: TLS: %s\n", err);
        return r;
}

/* ---- connect ---- */

static void *pump_stdin(void *arg)
{
        char buf[65536];
        ssize_t n;

        while ((n = read(0, buf, sizeof(buf))) > 0) {
                char *p = buf;

                while (n > 0) {
                        ssize_t w = send(T.sp[1], p, (size_t)n, MSG_NOSIGNAL);

                        if (w < 0)
                                return NULL;
                        p += w;
                        n -= w;
                }
        }
        shutdown(T.sp[1], SHUT_WR);
        return NULL;
}

static void *pump_stdout(void *arg)
{
        char buf[65536];
        ssize_t n;

        while ((n = recv(T.sp[1], buf, sizeof(buf), 0)) > 0) {
                char *p = buf;

                while (n > 0) {
                        ssize_t w = write(1, p, (size_t)n);

                        if (w < 0)
                                return NULL;
                        p += w;
                        n -= w;
                }
        }
        return NULL;
}

static void relay_result(struct hbone_relay *r, enum hbone_relay_result res, unsigned status,
                         void *user)
{
}

static void relay_done(struct hbone_relay *r, void *user)
{
        bool serve = user != NULL;

        hbone_relay_free(r);
        if (!serve) {
                T.exit_code = 0;
                hbone_conn_drain(T.conn);
        }
}

static const struct hbone_relay_ops relay_ops = {
        .on_upstream_result = relay_result,
        .on_done = relay_done,
};

static void connect_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct hbone_relay_config rc = {.loop = T.loop, .ops = &relay_ops};
        struct hbone_relay *r;

        if (status != 200) {
                fprintf(stderr, "hbone: tunnel refused: HTTP %u\n", status);
                T.exit_code = 1;
                return; /* the stream ends; on_tunnel_close follows */
        }
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, T.sp) < 0 ||
            fcntl(T.sp[0], F_SETFL, O_NONBLOCK) < 0 ||
            hbone_relay_new(&rc, T.conn, st, true, &r) < 0) {
                hbone_stream_reset(st, HBONE_H2_INTERNAL_ERROR);
                return;
        }
        if (hbone_relay_attach_tcp(r, T.sp[0]) < 0) {
                hbone_stream_reset(st, HBONE_H2_INTERNAL_ERROR);
                return;
        }
        /* the relay owns sp[0]; the pump threads use sp[1] with blocking I/O */
        pthread_create(&T.in_thread, NULL, pump_stdin, NULL);
        pthread_create(&T.out_thread, NULL, pump_stdout, NULL);
        pthread_detach(T.in_thread);
}

/* Before the relay exists (the stream's user is NULL) only the response and close matter. */
static void connect_close(struct hbone_stream *st, uint32_t err, void *user)
{
        if (user) {
                hbone_relay_on_close(st, err, user);
                return;
        }
        if (T.exit_code != 0)
                fprintf(stderr, "hbone: tunnel closed (HTTP/2 error %u)\n", err);
        hbone_conn_drain(T.conn);
}

static int no_requests(struct hbone_session *s, struct hbone_stream *st,
                       const struct hbone_request *req, void *su)
{
        return -EPROTO;
}

static const struct hbone_callbacks connect_cb = {
        .on_tunnel_request = no_requests,
        .on_tunnel_response = connect_response,
        .on_tunnel_data = hbone_relay_on_data,
        .on_tunnel_eof = hbone_relay_on_eof,
        .on_tunnel_writable = hbone_relay_on_writable,
        .on_tunnel_close = connect_close,
};

static void connect_established(struct hbone_conn *c, void *user)
{
        struct hbone_stream *st;
        int r = hbone_session_open(hbone_conn_session(c), T.authority, NULL, 0, NULL, &st);

        if (r < 0) {
                fprintf(stderr, "hbone: cannot open tunnel: %s\n", strerror(-r));
                hbone_conn_close(c, r, "open failed");
                return;
        }
        hbone_conn_kick(c);
}

static void connect_closed(struct hbone_conn *c, int err, const char *why, void *user)
{
        if (err && T.exit_code != 0)
                fprintf(stderr, "hbone: connection closed: %s\n", why);
        T.done = true;
}

static const struct hbone_conn_ops connect_ops = {
        .on_established = connect_established,
        .on_closed = connect_closed,
};

static int run_connect(void)
{
        struct sockaddr_storage ss;
        socklen_t len;
        struct hbone_target t;

        if (!T.server || parse_addr(T.server, &ss, &len) < 0) {
                fprintf(stderr, "hbone connect: --server IP:PORT is required\n");
                return 2;
        }
        if (!T.authority || hbone_target_parse(T.authority, strlen(T.authority), &t) < 0) {
                fprintf(stderr, "hbone connect: --authority HOST:PORT is required\n");
                return 2;
        }
        if (load_tls(false) < 0)
                return 1;
        struct hbone_conn_config cfg = {
                .loop = T.loop,
                .tls_ctx = T.tls,
                .lim = &T.lim,
                .cb = &connect_cb,
                .ops = &connect_ops,
                .connect_timeout_ms = T.connect_timeout_ms,
                .handshake_timeout_ms = T.connect_timeout_ms,
        };
        if (hbone_conn_connect(&cfg, (struct sockaddr *)&ss, len, &T.conn) < 0)
                return 1;
        while (!T.done)
                wp_loop_run_once(T.loop, 1000000000ULL);
        hbone_conn_free(T.conn);
        if (T.exit_code == 0)
                pthread_join(T.out_thread, NULL);
        return T.exit_code;
}

/* ---- serve ---- */

struct serve_conn {
        struct hbone_conn *conn;
};

static int serve_request(struct hbone_session *s, struct hbone_stream *st,
                         const struct hbone_request *req, void *session_user)
{
        struct hbone_conn *c = session_user;
        struct hbone_relay_config rc = {
                .loop = T.loop,
                .ops = &relay_ops,
                .user = &T, /* non-NULL: serve mode */
                .connect_timeout_ms = T.connect_timeout_ms,
                .error_header = "x-hbone-error",
        };
        struct hbone_relay *r;

        wp_info("serve", "tunnel to %s from %s", req->authority, hbone_conn_peer_uri(c));
        if (hbone_relay_new(&rc, c, st, false, &r) < 0)
                return -ENOMEM;
        if (!req->target.is_ip) {
                hbone_relay_fail(r, 400, "hostname_not_supported");
                return 0;
        }
        if (hbone_relay_connect_tcp(r, (const struct sockaddr *)&req->target.addr,
                                    req->target.addrlen) < 0)
                hbone_relay_fail(r, 503, "connect_failed");
        return 0;
}

static const struct hbone_callbacks serve_cb = {
        .on_tunnel_request = serve_request,
        .on_tunnel_response = hbone_relay_on_response,
        .on_tunnel_data = hbone_relay_on_data,
        .on_tunnel_eof = hbone_relay_on_eof,
        .on_tunnel_writable = hbone_relay_on_writable,
        .on_tunnel_close = hbone_relay_on_close,
};

static void serve_closed(struct hbone_conn *c, int err, const char *why, void *user)
{
        if (err)
                wp_info("serve", "connection closed: %s", why);
        hbone_conn_free(c);
}

static const struct hbone_conn_ops serve_ops = {.on_closed = serve_closed};

static int listen_fd = -1;
static struct wp_op accept_op;

static void on_accept(struct wp_op *op, int res)
{
        struct hbone_conn *c;

        if (res >= 0) {
                struct hbone_conn_config cfg = {
                        .loop = T.loop,
                        .tls_ctx = T.tls,
                        .lim = &T.lim,
                        .cb = &serve_cb,
                        .ops = &serve_ops,
                        .handshake_timeout_ms = 10000,
                };
                hbone_conn_accept(&cfg, res, &c);
        }
        wp_loop_accept(T.loop, &accept_op, listen_fd);
}

/* Listens on --listen and runs the loop forever, accepting with on_acc. Returns on failure. */
static int listen_and_run(wp_op_cb on_acc)
{
        struct sockaddr_storage ss;
        socklen_t len;
        int one = 1;

        if (!T.listen_addr || parse_addr(T.listen_addr, &ss, &len) < 0) {
                fprintf(stderr, "hbone %s: --listen IP:PORT is required\n", T.mode);
                return 2;
        }
        listen_fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (listen_fd < 0 ||
            setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
            bind(listen_fd, (struct sockaddr *)&ss, len) < 0 || listen(listen_fd, 1024) < 0) {
                fprintf(stderr, "hbone %s: cannot listen on %s: %s\n", T.mode, T.listen_addr,
                        strerror(errno));
                return 1;
        }
        wp_op_init(&accept_op, on_acc);
        wp_loop_accept(T.loop, &accept_op, listen_fd);
        for (;;)
                wp_loop_run_once(T.loop, 1000000000ULL);
        return 0;
}

static int run_serve(void)
{
        if (load_tls(true) < 0)
                return 1;
        return listen_and_run(on_accept);
}

/* ---- forward ---- */

/*
 * forward: a TCP listener whose every accepted connection becomes one tunnel to --authority on
 * the HBONE server, so stock TCP tools (curl, nghttp, iperf3, h2load, grpc clients) can talk
 * through HBONE. Tunnels are spread round robin over --connections HBONE connections (more are
 * opened when those are full or going away). A refused tunnel resets its TCP connection.
 */

struct fwd_conn {
        struct hbone_conn *conn;
        struct wp_list link;  /* T.fwd_conns */
        struct wp_list queue; /* struct fwd_tunnel waiting for the handshake */
        bool established;
};

struct fwd_tunnel {
        int fd;
        struct fwd_conn *fc;
        struct hbone_stream *st;
        struct wp_list link; /* conn queue, or T.fwd_pending while the CONNECT is unanswered */
};

static struct wp_list fwd_conns = {&fwd_conns, &fwd_conns};
static struct wp_list fwd_pending = {&fwd_pending, &fwd_pending};
static unsigned fwd_nconns, fwd_want = 1, fwd_rr;
static struct hbone_header fwd_headers[8];
static size_t fwd_nheaders;
static struct sockaddr_storage fwd_server;
static socklen_t fwd_server_len;

static void fwd_tunnel_drop(struct fwd_tunnel *t)
{
        struct linger lg = {.l_onoff = 1, .l_linger = 0};

        wp_list_del(&t->link);
        /* an RST tells the TCP client the tunnel could not be made */
        setsockopt(t->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(t->fd);
        wp_free(t);
}

static struct fwd_tunnel *fwd_pending_find(const struct hbone_stream *st)
{
        for (struct wp_list *l = fwd_pending.next; l != &fwd_pending; l = l->next) {
                struct fwd_tunnel *t = container_of(l, struct fwd_tunnel, link);

                if (t->st == st)
                        return t;
        }
        return NULL;
}

static void fwd_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct fwd_tunnel *t = fwd_pending_find(st);
        struct hbone_relay_config rc = {.loop = T.loop, .ops = &relay_ops, .user = &T};
        struct hbone_relay *r;

        if (!t)
                return;
        if (status != 200) {
                wp_warn("forward", "tunnel to %s refused: HTTP %u", T.authority, status);
                return; /* on_tunnel_close follows and drops the TCP connection */
        }
        hbone_stream_set_user(st, NULL);
        if (hbone_relay_new(&rc, t->fc->conn, st, true, &r) < 0) {
                hbone_stream_reset(st, HBONE_H2_INTERNAL_ERROR);
                return;
        }
        wp_list_del(&t->link);
        if (hbone_relay_attach_tcp(r, t->fd) < 0)
                hbone_stream_reset(st, HBONE_H2_INTERNAL_ERROR);
        wp_free(t);
}

static void fwd_close(struct hbone_stream *st, uint32_t err, void *user)
{
        struct fwd_tunnel *t = fwd_pending_find(st);

        if (t) {
                fwd_tunnel_drop(t);
                return;
        }
        if (user)
                hbone_relay_on_close(st, err, user);
}

static const struct hbone_callbacks fwd_cb = {
        .on_tunnel_request = no_requests,
        .on_tunnel_response = fwd_response,
        .on_tunnel_data = hbone_relay_on_data,
        .on_tunnel_eof = hbone_relay_on_eof,
        .on_tunnel_writable = hbone_relay_on_writable,
        .on_tunnel_close = fwd_close,
};

static void fwd_open(struct fwd_conn *fc, struct fwd_tunnel *t)
{
        int r = hbone_session_open(hbone_conn_session(fc->conn), T.authority, fwd_headers,
                                   fwd_nheaders, NULL, &t->st);

        t->fc = fc;
        if (r < 0) {
                wp_warn("forward", "cannot open a tunnel: %s", strerror(-r));
                wp_list_init(&t->link);
                fwd_tunnel_drop(t);
                return;
        }
        wp_list_add_tail(&fwd_pending, &t->link);
        hbone_conn_kick(fc->conn);
}

static void fwd_established(struct hbone_conn *c, void *user)
{
        struct fwd_conn *fc = user;

        fc->established = true;
        while (!wp_list_empty(&fc->queue)) {
                struct fwd_tunnel *t = container_of(fc->queue.next, struct fwd_tunnel, link);

                wp_list_del(&t->link);
                fwd_open(fc, t);
        }
}

static void fwd_closed(struct hbone_conn *c, int err, const char *why, void *user)
{
        struct fwd_conn *fc = user;

        if (err)
                wp_warn("forward", "HBONE connection to %s closed: %s", T.server, why);
        while (!wp_list_empty(&fc->queue))
                fwd_tunnel_drop(container_of(fc->queue.next, struct fwd_tunnel, link));
        wp_list_del(&fc->link);
        fwd_nconns--;
        hbone_conn_free(c);
        wp_free(fc);
}

static const struct hbone_conn_ops fwd_ops = {
        .on_established = fwd_established,
        .on_closed = fwd_closed,
};

static struct fwd_conn *fwd_conn_new(void)
{
        struct fwd_conn *fc = wp_calloc(1, sizeof(*fc));
        struct hbone_conn_config cfg = {
                .loop = T.loop,
                .tls_ctx = T.tls,
                .lim = &T.lim,
                .cb = &fwd_cb,
                .ops = &fwd_ops,
                .connect_timeout_ms = T.connect_timeout_ms,
                .handshake_timeout_ms = T.connect_timeout_ms,
        };

        if (!fc)
                return NULL;
        cfg.user = fc;
        wp_list_init(&fc->queue);
        if (hbone_conn_connect(&cfg, (struct sockaddr *)&fwd_server, fwd_server_len, &fc->conn) <
            0) {
                wp_free(fc);
                return NULL;
        }
        wp_list_add_tail(&fwd_conns, &fc->link);
        fwd_nconns++;
        return fc;
}

/* A connection that can take one more tunnel now (round robin), or one still handshaking. */
static struct fwd_conn *fwd_pick(void)
{
        struct fwd_conn *first = NULL;
        unsigned i = 0, start;

        if (fwd_nconns < fwd_want)
                return fwd_conn_new();
        start = fwd_rr++ % fwd_nconns;
        for (struct wp_list *l = fwd_conns.next; l != &fwd_conns; l = l->next) {
                struct fwd_conn *fc = container_of(l, struct fwd_conn, link);

                if (fc->established &&
                    hbone_session_streams_available(hbone_conn_session(fc->conn)) == 0) {
                        i++;
                        continue; /* full, or going away */
                }
                if (i++ >= start)
                        return fc;
                if (!first)
                        first = fc;
        }
        return first ? first : fwd_conn_new();
}

static void fwd_accept(struct wp_op *op, int res)
{
        if (res >= 0) {
                struct fwd_tunnel *t = wp_calloc(1, sizeof(*t));
                struct fwd_conn *fc = t ? fwd_pick() : NULL;
                int one = 1;

                setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                if (!t || !fc || fcntl(res, F_SETFL, O_NONBLOCK) < 0) {
                        close(res);
                        wp_free(t);
                } else {
                        t->fd = res;
                        wp_list_init(&t->link);
                        if (fc->established) {
                                fwd_open(fc, t);
                        } else {
                                wp_list_add_tail(&fc->queue, &t->link);
                        }
                }
        } else if (res != -EAGAIN && res != -EINTR && res != -ECONNABORTED) {
                wp_warn("forward", "accept: %s", strerror(-res));
        }
        wp_loop_accept(T.loop, &accept_op, listen_fd);
}

static int run_forward(void)
{
        struct hbone_target t;

        if (!T.server || parse_addr(T.server, &fwd_server, &fwd_server_len) < 0) {
                fprintf(stderr, "hbone forward: --server IP:PORT is required\n");
                return 2;
        }
        if (!T.authority || hbone_target_parse(T.authority, strlen(T.authority), &t) < 0) {
                fprintf(stderr, "hbone forward: --authority HOST:PORT is required\n");
                return 2;
        }
        if (load_tls(false) < 0)
                return 1;
        return listen_and_run(fwd_accept);
}

/* "name: value" (name lower-cased) for --header. */
static int add_header(char *arg)
{
        char *colon = strchr(arg, ':');

        if (!colon || colon == arg || fwd_nheaders == sizeof(fwd_headers) / sizeof(fwd_headers[0]))
                return -EINVAL;
        *colon = '\0';
        for (char *p = arg; *p; p++)
                *p = (char)(*p >= 'A' && *p <= 'Z' ? *p + 32 : *p);
        colon++;
        while (*colon == ' ')
                colon++;
        fwd_headers[fwd_nheaders].name = arg;
        fwd_headers[fwd_nheaders].value = colon;
        fwd_nheaders++;
        return 0;
}

static void usage(FILE *f)
{
        fputs("usage: hbone connect --server IP:PORT --authority HOST:PORT --cert F --key F --root "
              "F\n"
              "       hbone serve --listen IP:PORT --cert F --key F --root F\n"
              "       hbone forward --listen IP:PORT --server IP:PORT --authority HOST:PORT --cert "
              "F\n"
              "                     --key F --root F [--connections N] [--header 'name: "
              "value']...\n"
              "options: --trust-domain TD, --io-backend uring|epoll|auto, --connect-timeout-ms MS, "
              "-v\n",
              f);
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"server", required_argument, NULL, 's'},
                {"authority", required_argument, NULL, 'a'},
                {"listen", required_argument, NULL, 'l'},
                {"cert", required_argument, NULL, 'c'},
                {"key", required_argument, NULL, 'k'},
                {"root", required_argument, NULL, 'r'},
                {"trust-domain", required_argument, NULL, 't'},
                {"io-backend", required_argument, NULL, 'b'},
                {"connect-timeout-ms", required_argument, NULL, 'T'},
                {"connections", required_argument, NULL, 'n'},
                {"header", required_argument, NULL, 'H'},
                {"help", no_argument, NULL, 'h'},
                {NULL, 0, NULL, 0},
        };
        const char *note = NULL;
        int c, b;

        signal(SIGPIPE, SIG_IGN);
        wp_log_set_level(WP_LOG_WARN);
        T.trust_domain = "cluster.local";
        T.connect_timeout_ms = 10000;
        hbone_limits_default(&T.lim);
        if (argc < 2) {
                usage(stderr);
                return 2;
        }
        T.mode = argv[1];
        optind = 2;
        while ((c = getopt_long(argc, argv, "vh", opts, NULL)) != -1) {
                switch (c) {
                case 's':
                        T.server = optarg;
                        break;
                case 'a':
                        T.authority = optarg;
                        break;
                case 'l':
                        T.listen_addr = optarg;
                        break;
                case 'c':
                        T.cert = optarg;
                        break;
                case 'k':
                        T.key = optarg;
                        break;
                case 'r':
                        T.root = optarg;
                        break;
                case 't':
                        T.trust_domain = optarg;
                        break;
                case 'T':
                        T.connect_timeout_ms = (uint32_t)strtoul(optarg, NULL, 10);
                        break;
                case 'b':
                        b = wp_io_backend_parse(optarg);
                        if (b < 0) {
                                usage(stderr);
                                return 2;
                        }
                        T.backend = (enum wp_io_backend)b;
                        break;
                case 'n':
                        fwd_want = (unsigned)strtoul(optarg, NULL, 10);
                        if (fwd_want < 1 || fwd_want > 1024) {
                                fprintf(stderr, "hbone: --connections must be 1..1024\n");
                                return 2;
                        }
                        break;
                case 'H':
                        if (add_header(optarg) < 0) {
                                fprintf(stderr, "hbone: --header 'name: value' (at most 8)\n");
                                return 2;
                        }
                        break;
                case 'v':
                        wp_log_set_level(WP_LOG_DEBUG);
                        break;
                case 'h':
                        usage(stdout);
                        return 0;
                default:
                        usage(stderr);
                        return 2;
                }
        }
        if (strcmp(T.mode, "serve") == 0)
                wp_log_set_level(wp_log_get_level() < WP_LOG_INFO ? wp_log_get_level()
                                                                  : WP_LOG_INFO);
        if (wp_loop_new(T.backend, 1024, &T.loop, &note) < 0) {
                fprintf(stderr, "hbone: cannot create event loop: %s\n", note ? note : "");
                return 1;
        }
        if (strcmp(T.mode, "connect") == 0)
                return run_connect();
        if (strcmp(T.mode, "serve") == 0)
                return run_serve();
        if (strcmp(T.mode, "forward") == 0)
                return run_forward();
        usage(stderr);
        return 2;
}
