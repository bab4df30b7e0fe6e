/*
 * loadkit: the skeleton shared by the benchmark load generators (hbone_load, http_load): common
 * options, process setup (signals, fd limit, TLS context, event loop), M HBONE client connections
 * carrying N tunnels (tunnel i on connection i % M, opened in order as the peer's stream limit
 * allows), and a log-linear latency histogram (HDR-style: 64 sub-buckets per power of two,
 * <= 1.6% error, nanoseconds).
 *
 * A tool embeds struct lk_tunnel as the first member of its tunnel type, fills LK (options through
 * lk_option(), then lk_setup()), assigns its tunnels with lk_assign() and calls lk_connect_all()
 * with its hbone callbacks. When a connection dies, LK.on_tunnel_lost runs for each of its tunnels
 * not closed yet (the tool's close handler, so its counters stay right).
 */
#ifndef BENCH_LOADKIT_H
#define BENCH_LOADKIT_H

#include <getopt.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hbone/conn.h"
#include "hbone/hbone.h"
#include "waypoint/base/loop.h"

struct lk_conn;

struct lk_tunnel {
        struct lk_conn *lc;
        struct hbone_stream *st;
        unsigned status; /* CONNECT answer, 0 until then */
        bool opened, closed;
};

struct lk_conn {
        struct hbone_conn *c;
        unsigned idx;
        struct lk_tunnel **tunnels; /* assigned to this connection, opened in order */
        unsigned ntunnels, next;
        bool closed;
};

struct lk_state {
        const char *prog;
        const char *server, *authority, *cert, *key, *root, *trust_domain;
        unsigned nconns, ntunnels, max_per_conn;
        double timeout_s;
        enum wp_io_backend backend;
        struct hbone_target srv;

        struct wp_loop *loop;
        struct wp_tls_ctx *tls;
        struct hbone_limits lim;
        struct lk_conn *conns;
        unsigned answered, ok200, conns_closed;
        const char *first_error;
        /* a tunnel of a connection that closed before the tunnel did (tunnel->st may be NULL) */
        void (*on_tunnel_lost)(struct lk_tunnel *t);
        /* a tunnel opened (hbone_session_open succeeded), e.g. to start a timer; optional */
        void (*on_tunnel_opened)(struct lk_tunnel *t);
};

extern struct lk_state LK;
extern volatile sig_atomic_t lk_signal;

/* getopt_long entries for the common options; end a tool's table with LK_OPTIONS, {0}. */
/* clang-format off */
#define LK_OPTIONS                                                                                 \
        {"server", required_argument, NULL, 0x101},                                               \
        {"authority", required_argument, NULL, 0x102},                                            \
        {"cert", required_argument, NULL, 0x103},                                                 \
        {"key", required_argument, NULL, 0x104},                                                  \
        {"root", required_argument, NULL, 0x105},                                                 \
        {"trust-domain", required_argument, NULL, 0x106},                                         \
        {"connections", required_argument, NULL, 0x107},                                          \
        {"tunnels", required_argument, NULL, 0x108},                                              \
        {"timeout-seconds", required_argument, NULL, 0x109},                                      \
        {"io-backend", required_argument, NULL, 0x10a},                                           \
        {"max-per-connection", required_argument, NULL, 0x10b}
/* clang-format on */
#define LK_COMMON_USAGE                                                                            \
        "         [--connections M] [--tunnels N] [--max-per-connection K]\n"                      \
        "         [--trust-domain TD] [--io-backend uring|epoll|auto]\n"                           \
        "         [--timeout-seconds S] [-v]\n"

/* Handles a common option (getopt value c). Returns 1 if handled, 0 if not ours, -1 if bad. */
int lk_option(int c, const char *arg);
/* Validates the common options (authority required when need_authority), raises the fd limit,
 * installs SIGTERM/SIGINT handlers (lk_signal), builds the client TLS context and the loop.
 * Returns 0, -1 on a setup failure (printed), -2 on a usage error (not printed). */
int lk_setup(bool need_authority);
/* Assigns n tunnels (each starts with struct lk_tunnel; stride = sizeof the tool's type). */
void lk_assign(void *tunnels, size_t stride, unsigned n);
/* Starts every connection; tunnels open once each is established. Returns 0 or -1 (printed). */
int lk_connect_all(const struct hbone_callbacks *cb);
/* Opens the next tunnels of lc while the peer's stream limit (and --max-per-connection) allow. */
void lk_open_more(struct lk_conn *lc);
/* on_tunnel_response bookkeeping: counts the answer; returns true for 200. */
bool lk_tunnel_answered(struct lk_tunnel *t, unsigned status);
/* Closes every connection still open (teardown: lk_signal is set so closes are not errors) and
 * runs the loop until they are gone or grace_s passes. */
void lk_close_all(double grace_s);
/* Runs the loop until done() or the absolute deadline. */
void lk_run_until(bool (*done)(void), uint64_t deadline_ns);
/* Frees what lk_setup and lk_connect_all made, if every connection has closed. */
void lk_free(void);
void lk_note_error(const char *what);
double lk_secs(uint64_t a, uint64_t b);
/* Parses a byte count with an optional k/m/g (KiB/MiB/GiB) suffix. Returns 0 or -EINVAL (also
 * when the count does not fit 64 bits). */
int lk_parse_size(const char *s, uint64_t *ret);
/* Parses a number >= 0 (seconds, a rate); sets *bad when s is not one (bad stays as it was
 * otherwise, so one flag can collect a whole command line). */
double lk_parse_num(const char *s, bool *bad);

/* ---- latency histogram ---- */

#define LK_HIST_BUCKETS (128 + (64 - 7) * 64)

struct lk_hist {
        uint64_t n, sum_ns, max_ns;
        uint64_t b[LK_HIST_BUCKETS];
};

void lk_hist_add(struct lk_hist *h, uint64_t ns);
/* The q-quantile (0..1) in microseconds (bucket midpoint, capped at the maximum); 0 if empty. */
double lk_hist_us(const struct lk_hist *h, double q);

#endif
