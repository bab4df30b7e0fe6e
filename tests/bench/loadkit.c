/* loadkit: see loadkit.h */
#include "tests/bench/loadkit.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/base/tls.h"

struct lk_state LK = {
        .nconns = 1, .ntunnels = 1, .timeout_s = 120, .trust_domain = "cluster.local"};
volatile sig_atomic_t lk_signal;

static void on_signal(int sig)
{
        lk_signal = sig;
}

void lk_note_error(const char *what)
{
        if (!LK.first_error)
                LK.first_error = what;
}

double lk_secs(uint64_t a, uint64_t b)
{
        return b > a ? (double)(b - a) / 1e9 : 0.0;
}

int lk_parse_size(const char *s, uint64_t *ret)
{
        char *end;
        unsigned long long v;
        unsigned shift = 0;

        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno || end == s || strchr(s, '-')) /* strtoull would negate */
                return -EINVAL;
        switch (*end) {
        case 'k':
        case 'K':
                shift = 10;
                end++;
                break;
        case 'm':
        case 'M':
                shift = 20;
                end++;
                break;
        case 'g':
        case 'G':
                shift = 30;
                end++;
                break;
        default:
                break;
        }
        if (*end || v > (UINT64_MAX >> shift))
                return -EINVAL;
        *ret = (uint64_t)v << shift;
        return 0;
}

double lk_parse_num(const char *s, bool *bad)
{
        char *end;
        double v = strtod(s, &end);

        if (end == s || *end || !(v >= 0)) /* !(v >= 0): also NaN */
                *bad = true;
        return v;
}

static int parse_uint(const char *s, unsigned *ret)
{
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || end == s || *end || v > 10000000)
                return -1;
        *ret = (unsigned)v;
        return 1;
}

int lk_option(int c, const char *arg)
{
        int b;
        bool bad = false;
        const char **str[] = {&LK.server, &LK.authority, &LK.cert,
                              &LK.key,    &LK.root,      &LK.trust_domain}; /* 0x101.. */

        if (c >= 0x101 && c <= 0x106) {
                *str[c - 0x101] = arg;
                return 1;
        }
        switch (c) {
        case 0x107:
                return parse_uint(arg, &LK.nconns);
        case 0x108:
                return parse_uint(arg, &LK.ntunnels);
        case 0x109:
                LK.timeout_s = lk_parse_num(arg, &bad);
                return bad || LK.timeout_s <= 0 ? -1 : 1;
        case 0x10a:
                b = wp_io_backend_parse(arg);
                if (b < 0)
                        return -1;
                LK.backend = (enum wp_io_backend)b;
                return 1;
        case 0x10b:
                return parse_uint(arg, &LK.max_per_conn);
        case 'v':
                wp_log_set_level(WP_LOG_DEBUG);
                return 1;
        default:
                return 0;
        }
}

int lk_setup(bool need_authority)
{
        struct hbone_target auth;
        struct rlimit rl;
        const char *note = NULL;
        char err[256];

        if (!LK.server || hbone_target_parse(LK.server, strlen(LK.server), &LK.srv) < 0 ||
            !LK.srv.is_ip || !LK.cert || !LK.key || !LK.root || LK.nconns == 0 || LK.ntunnels == 0)
                return -2;
        if (need_authority &&
            (!LK.authority || hbone_target_parse(LK.authority, strlen(LK.authority), &auth) < 0))
                return -2;
        if (LK.nconns > LK.ntunnels)
                LK.nconns = LK.ntunnels;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                setrlimit(RLIMIT_NOFILE, &rl);
        }
        struct sigaction sa = {.sa_handler = on_signal};
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
        if (wp_tls_ctx_new_from_files(false, LK.cert, LK.key, LK.root, LK.trust_domain, &LK.tls,
                                      err, sizeof(err)) < 0) {
                fprintf(stderr, "%s: TLS: %s\n", LK.prog, err);
                return -1;
        }
        if (wp_loop_new(LK.backend, 4096, &LK.loop, &note) < 0) {
                fprintf(stderr, "%s: cannot create event loop: %s\n", LK.prog, note ? note : "");
                return -1;
        }
        hbone_limits_default(&LK.lim);
        return 0;
}

void lk_assign(void *tunnels, size_t stride, unsigned n)
{
        LK.conns = wp_xcalloc(LK.nconns, sizeof(*LK.conns));
        for (unsigned i = 0; i < LK.nconns; i++) {
                LK.conns[i].idx = i;
                LK.conns[i].tunnels = wp_xcalloc(n / LK.nconns + 1, sizeof(void *));
        }
        for (unsigned i = 0; i < n; i++) {
                struct lk_conn *lc = &LK.conns[i % LK.nconns];
                struct lk_tunnel *t = (struct lk_tunnel *)((char *)tunnels + i * stride);

                t->lc = lc;
                lc->tunnels[lc->ntunnels++] = t;
        }
}

void lk_open_more(struct lk_conn *lc)
{
        struct hbone_session *s = hbone_conn_session(lc->c);
        unsigned cap = LK.max_per_conn;

        while (s && lc->next < lc->ntunnels && hbone_session_streams_available(s) > 0 &&
               (!cap || hbone_session_open_streams(s) < cap)) {
                struct lk_tunnel *t = lc->tunnels[lc->next];
                int r = hbone_session_open(s, LK.authority, NULL, 0, t, &t->st);

                if (r == -EAGAIN)
                        break;
                lc->next++;
                if (r < 0) {
                        lk_note_error("hbone_session_open failed");
                        t->st = NULL;
                        LK.on_tunnel_lost(t);
                        continue;
                }
                t->opened = true;
                if (LK.on_tunnel_opened)
                        LK.on_tunnel_opened(t);
        }
        hbone_conn_kick(lc->c);
}

bool lk_tunnel_answered(struct lk_tunnel *t, unsigned status)
{
        t->status = status;
        LK.answered++;
        if (status != 200) {
                lk_note_error("tunnel refused (non-200)");
                return false; /* on_tunnel_close follows */
        }
        LK.ok200++;
        return true;
}

static void conn_established(struct hbone_conn *c, void *user)
{
        lk_open_more(user);
}

static void conn_closed(struct hbone_conn *c, int err, const char *why, void *user)
{
        struct lk_conn *lc = user;

        lc->closed = true;
        LK.conns_closed++;
        if (err && !lk_signal) {
                fprintf(stderr, "%s: connection %u closed: %s\n", LK.prog, lc->idx,
                        why ? why : strerror(-err));
                lk_note_error("connection failed");
        }
        for (unsigned i = 0; i < lc->ntunnels; i++)
                if (!lc->tunnels[i]->closed)
                        LK.on_tunnel_lost(lc->tunnels[i]);
        lc->next = lc->ntunnels;
}

static const struct hbone_conn_ops conn_ops = {
        .on_established = conn_established,
        .on_closed = conn_closed,
};

int lk_connect_all(const struct hbone_callbacks *cb)
{
        for (unsigned i = 0; i < LK.nconns; i++) {
                struct hbone_conn_config cfg = {
                        .loop = LK.loop,
                        .tls_ctx = LK.tls,
                        .lim = &LK.lim,
                        .cb = cb,
                        .ops = &conn_ops,
                        .user = &LK.conns[i],
                        .handshake_timeout_ms = 30000,
                        .connect_timeout_ms = 30000,
                        .id = i,
                };
                int r = hbone_conn_connect(&cfg, (const struct sockaddr *)&LK.srv.addr,
                                           LK.srv.addrlen, &LK.conns[i].c);
                if (r < 0) {
                        fprintf(stderr, "%s: connect: %s\n", LK.prog, strerror(-r));
                        return -1;
                }
        }
        return 0;
}

static bool all_conns_closed(void)
{
        return LK.conns_closed >= LK.nconns;
}

void lk_run_until(bool (*done)(void), uint64_t deadline_ns)
{
        while (!done() && wp_now_ns() < deadline_ns)
                wp_loop_run_once(LK.loop, 100 * WP_NSEC_PER_MSEC);
}

void lk_close_all(double grace_s)
{
        lk_signal = lk_signal ? lk_signal : SIGTERM; /* teardown is not a failure */
        for (unsigned i = 0; i < LK.nconns; i++)
                if (LK.conns && LK.conns[i].c && !LK.conns[i].closed)
                        hbone_conn_close(LK.conns[i].c, 0, "done");
        lk_run_until(all_conns_closed, wp_now_ns() + (uint64_t)(grace_s * 1e9));
}

void lk_free(void)
{
        if (!all_conns_closed())
                return; /* ops may still be in flight: leave it to exit() */
        for (unsigned i = 0; LK.conns && i < LK.nconns; i++) {
                hbone_conn_free(LK.conns[i].c);
                wp_free(LK.conns[i].tunnels);
        }
        wp_free(LK.conns);
        LK.conns = NULL;
        wp_tls_ctx_unref(LK.tls);
        wp_loop_free(LK.loop);
}

/* ---- histogram ---- */

static unsigned bucket_of(uint64_t v)
{
        if (v < 128)
                return (unsigned)v;
        unsigned e = 63 - (unsigned)__builtin_clzll(v); /* >= 7 */
        unsigned sub = (unsigned)(v >> (e - 6)) & 63;

        return 128 + (e - 7) * 64 + sub;
}

static uint64_t bucket_mid(unsigned b)
{
        if (b < 128)
                return b;
        unsigned e = (b - 128) / 64 + 7, sub = (b - 128) % 64;
        uint64_t lo = ((uint64_t)(64 + sub)) << (e - 6);

        return lo + ((1ULL << (e - 6)) >> 1);
}

void lk_hist_add(struct lk_hist *h, uint64_t ns)
{
        h->b[bucket_of(ns)]++;
        h->n++;
        h->sum_ns += ns;
        if (ns > h->max_ns)
                h->max_ns = ns;
}

double lk_hist_us(const struct lk_hist *h, double q)
{
        if (!h->n)
                return 0;
        uint64_t rank = (uint64_t)(q * (double)h->n), seen = 0;

        if (rank >= h->n)
                rank = h->n - 1;
        for (unsigned b = 0; b < LK_HIST_BUCKETS; b++) {
                seen += h->b[b];
                if (seen > rank) {
                        uint64_t v = bucket_mid(b);

                        return (double)(v < h->max_ns ? v : h->max_ns) / 1e3;
                }
        }
        return (double)h->max_ns / 1e3;
}
