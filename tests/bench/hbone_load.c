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
 * where seconds run from the first connect to the last tunnel's close. With --sent-is-done a
 * tunnel is done once all its bytes and its END_STREAM are queued (for relays that never pass
 * the half-close on, e.g. nghttpx's CONNECT tunnels): seconds then end at the last tunnel's
 * last write, and the connections are closed right after (the caller checks what arrived).
 *
 * Idle mode (--idle): opens the N tunnels, prints "READY <ok>" on stdout once every tunnel got
 * its answer, then holds them without traffic until SIGTERM/SIGINT or --hold-seconds, closes and
 * prints the JSON line. Exit status 0 when every tunnel succeeded, 1 otherwise, 2 on usage.
 *
 * Other options (loadkit.h): --trust-domain TD, --io-backend uring|epoll|auto,
 * --timeout-seconds S (whole run, default 600), --max-per-connection K (cap on streams per
 * connection, default: the peer's limit), -v (library debug logs on stderr).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/bench/loadkit.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"

#define CHUNK (64 * 1024)

struct tunnel {
        struct lk_tunnel k; /* first */
        uint64_t sent;
        bool shut, success, done;
};

static struct {
        uint64_t bytes;
        bool idle, sent_is_done;
        double hold_s;
        struct tunnel *tunnels;
        unsigned finished;
        uint64_t bytes_sent, bytes_recv;
        uint64_t t0, t_ready, t_end;
} G = {.bytes = 1 << 20};

static uint8_t chunk[CHUNK];

static void tunnel_fill(struct tunnel *t)
{
        while (t->sent < G.bytes) {
                uint64_t left = G.bytes - t->sent;
                ssize_t n = hbone_stream_write(t->k.st, chunk, left < CHUNK ? (size_t)left : CHUNK);

                if (n == -EAGAIN)
                        break; /* on_tunnel_writable follows */
                if (n < 0) {
                        lk_note_error("stream write failed");
                        hbone_stream_reset(t->k.st, HBONE_H2_CANCEL);
                        goto kick;
                }
                t->sent += (uint64_t)n;
                G.bytes_sent += (uint64_t)n;
        }
        if (t->sent == G.bytes && !t->shut) {
                t->shut = true;
                if (hbone_stream_shutdown(t->k.st) < 0)
                        lk_note_error("stream shutdown failed");
                else if (G.sent_is_done && !t->done) {
                        t->done = t->success = true;
                        G.finished++;
                        G.t_end = wp_now_ns();
                }
        }
kick:
        hbone_conn_kick(t->k.lc->c);
}

static int cb_request(struct hbone_session *s, struct hbone_stream *st,
                      const struct hbone_request *req, void *session_user)
{
        return -EPROTO; /* we are the client */
}

static void cb_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct tunnel *t = user;

        if (!lk_tunnel_answered(&t->k, status))
                return;
        if (LK.ok200 == 1 && !G.idle)
                G.t_ready = wp_now_ns();
        if (!G.idle)
                tunnel_fill(t);
}

static int cb_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user)
{
        struct tunnel *t = user;

        G.bytes_recv += len;
        hbone_stream_consume(st, len);
        hbone_conn_kick(t->k.lc->c);
        return 0;
}

static void cb_eof(struct hbone_stream *st, void *user)
{
        /* the far side half-closed; the stream closes once our END_STREAM is out too */
}

static void cb_writable(struct hbone_stream *st, void *user)
{
        struct tunnel *t = user;

        if (!G.idle && t->k.status == 200 && !t->shut)
                tunnel_fill(t);
}

static void cb_close(struct hbone_stream *st, uint32_t h2_error, void *user)
{
        struct tunnel *t = user;

        if (t->k.closed)
                return;
        t->k.closed = true;
        t->k.st = NULL;
        if (!t->k.status)
                LK.answered++; /* reset before any answer */
        if (t->done)
                return; /* --sent-is-done: counted when the last byte was queued */
        t->done = true;
        if (G.idle)
                t->success = t->k.status == 200;
        else
                t->success = t->k.status == 200 && h2_error == 0 && t->shut && t->sent == G.bytes;
        if (!t->success && !(G.idle && lk_signal))
                lk_note_error(h2_error ? "tunnel reset" : "tunnel ended early");
        G.finished++;
        G.t_end = wp_now_ns();
        if (st && !t->k.lc->closed && !hbone_conn_closing(t->k.lc->c) &&
            hbone_conn_session(t->k.lc->c))
                lk_open_more(t->k.lc);
}

/* a connection ended (or an open failed) with this tunnel still open: it failed */
static void tunnel_lost(struct lk_tunnel *k)
{
        cb_close(NULL, 0, k);
}

static void cb_goaway(struct hbone_session *s, uint32_t h2_error, void *session_user)
{
        if (h2_error)
                lk_note_error("GOAWAY received");
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

static void usage(FILE *f)
{
        fputs("usage: hbone_load --server IP:PORT --authority HOST:PORT --cert F --key F --root F\n"
              "         [--bytes B[k|m|g] [--sent-is-done] | --idle [--hold-seconds "
              "S]]\n" LK_COMMON_USAGE,
              f);
}

static bool all_answered(void)
{
        return LK.answered >= LK.ntunnels || lk_signal;
}

static bool all_finished(void)
{
        return G.finished >= LK.ntunnels;
}

static bool never(void)
{
        return lk_signal != 0;
}

static bool hold_over(void)
{
        return lk_signal || G.finished >= LK.ntunnels;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"bytes", required_argument, NULL, 'B'},
                {"idle", no_argument, NULL, 'I'},
                {"hold-seconds", required_argument, NULL, 'H'},
                {"sent-is-done", no_argument, NULL, 'E'},
                {"help", no_argument, NULL, 'h'},
                LK_OPTIONS,
                {NULL, 0, NULL, 0},
        };
        bool bad = false;
        int c, r;

        LK.prog = "hbone_load";
        LK.timeout_s = 600;
        LK.on_tunnel_lost = tunnel_lost;
        wp_log_set_level(WP_LOG_WARN);
        while ((c = getopt_long(argc, argv, "vh", opts, NULL)) != -1) {
                switch (c) {
                case 'B':
                        if (lk_parse_size(optarg, &G.bytes) < 0)
                                bad = true;
                        break;
                case 'I':
                        G.idle = true;
                        break;
                case 'E':
                        G.sent_is_done = true;
                        break;
                case 'H':
                        G.hold_s = lk_parse_num(optarg, &bad);
                        break;
                case 'h':
                        usage(stdout);
                        return 0;
                default:
                        if (lk_option(c, optarg) <= 0)
                                bad = true;
                }
        }
        if (bad || optind != argc) {
                usage(stderr);
                return 2;
        }
        r = lk_setup(true);
        if (r == -2)
                usage(stderr);
        if (r < 0)
                return r == -2 ? 2 : 1;
        for (size_t i = 0; i < sizeof(chunk); i++)
                chunk[i] = (uint8_t)(i * 131 + 7);
        G.tunnels = wp_xcalloc(LK.ntunnels, sizeof(*G.tunnels));
        lk_assign(G.tunnels, sizeof(*G.tunnels), LK.ntunnels);

        G.t0 = wp_now_ns();
        uint64_t deadline = G.t0 + (uint64_t)(LK.timeout_s * 1e9);

        if (lk_connect_all(&callbacks) < 0)
                return 1;
        double held = 0;

        if (G.idle) {
                lk_run_until(all_answered, deadline);
                G.t_ready = wp_now_ns();
                printf("READY %u\n", LK.ok200);
                fflush(stdout);
                if (LK.ok200 < LK.ntunnels)
                        fprintf(stderr, "hbone_load: only %u of %u tunnels established (%s)\n",
                                LK.ok200, LK.ntunnels, LK.first_error ? LK.first_error : "timeout");
                uint64_t until = G.hold_s > 0 ? G.t_ready + (uint64_t)(G.hold_s * 1e9) : deadline;
                lk_run_until(hold_over, until < deadline ? until : deadline);
                held = lk_secs(G.t_ready, wp_now_ns());
                /* count what is still open as successful before tearing down */
                for (unsigned i = 0; i < LK.ntunnels; i++) {
                        struct tunnel *t = &G.tunnels[i];

                        if (!t->k.closed && t->k.status == 200)
                                t->success = true;
                }
                lk_close_all(10);
        } else {
                lk_run_until(all_finished, deadline);
                if (!all_finished())
                        lk_note_error("timeout");
                else if (G.sent_is_done) /* let the queued tail go out before closing */
                        lk_run_until(never, wp_now_ns() + 300 * WP_NSEC_PER_MSEC);
                for (unsigned i = 0; i < LK.nconns; i++)
                        if (!LK.conns[i].closed) {
                                if (all_finished() && !G.sent_is_done)
                                        hbone_conn_drain(LK.conns[i].c);
                                else
                                        hbone_conn_close(LK.conns[i].c, -ETIMEDOUT, "timeout");
                        }
                lk_close_all(10);
        }

        unsigned ok = 0;

        for (unsigned i = 0; i < LK.ntunnels; i++)
                ok += G.tunnels[i].success;
        if (G.idle) {
                printf("{\"mode\":\"idle\",\"connections\":%u,\"tunnels\":%u,\"ok\":%u,"
                       "\"failed\":%u,\"setup_seconds\":%.3f,\"held_seconds\":%.3f,"
                       "\"error\":\"%s\"}\n",
                       LK.nconns, LK.ntunnels, ok, LK.ntunnels - ok, lk_secs(G.t0, G.t_ready), held,
                       LK.first_error ? LK.first_error : "");
        } else {
                double s = lk_secs(G.t0, G.t_end ? G.t_end : wp_now_ns());

                printf("{\"mode\":\"bulk\",\"connections\":%u,\"tunnels\":%u,\"bytes_per_tunnel\":"
                       "%llu,\"ok\":%u,\"failed\":%u,\"bytes_sent\":%llu,\"bytes_received\":%llu,"
                       "\"seconds\":%.3f,\"gbps\":%.3f,\"error\":\"%s\"}\n",
                       LK.nconns, LK.ntunnels, (unsigned long long)G.bytes, ok, LK.ntunnels - ok,
                       (unsigned long long)G.bytes_sent, (unsigned long long)G.bytes_recv, s,
                       s > 0 ? (double)G.bytes_sent * 8 / s / 1e9 : 0.0,
                       LK.first_error ? LK.first_error : "");
        }
        fflush(stdout);
        lk_free();
        if (LK.conns == NULL)
                wp_free(G.tunnels);
        return ok == LK.ntunnels ? 0 : 1;
}
