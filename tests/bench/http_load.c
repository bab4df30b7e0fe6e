/*
 * http_load: open-loop / closed-loop HTTP request generator for the L7 benchmarks (client ztunnel
 * + client app stand-in). One thread. Two transports:
 *
 *  - HBONE (default): C tunnels over M HBONE connections (tunnel i on connection i % M, mTLS
 *    client certificate) to --authority; inside each tunnel one HTTP connection: HTTP/1.1
 *    keep-alive (--proto h1, one request in flight per tunnel) or cleartext HTTP/2 with prior
 *    knowledge (--proto h2, up to --streams requests in flight per tunnel).
 *  - TLS (--tls): M direct TLS 1.3 connections (ALPN h2, same client certificate; the server's
 *    SPIFFE identity is verified against --root) speaking HTTP/2, --streams in flight each: the
 *    way into an L7 proxy that does not speak HBONE.
 *
 *   http_load --server IP:PORT [--authority HOST:PORT] --cert F --key F --root F
 *             [--tls] [--proto h1|h2] [--streams S] [--connections M] [--tunnels C]
 *             [--duration S] [--warmup S] [--rate R] [--path P] [--host H]
 *             [--header 'name: value']...
 *
 * Closed loop (default, --rate 0): every slot sends its next request as soon as the previous
 * response is complete (saturation).
 * Open loop (--rate R): request k is scheduled at t0 + k/R and sent on the next HTTP connection
 * with a free slot (round robin); latency runs from the scheduled time, not from the actual send,
 * so a stalled server is charged for the requests that queued behind it (no coordinated
 * omission). Requests that find no free slot wait in order; those still waiting at the end count
 * as "unsent" (failures).
 *
 * The first --warmup seconds (default 0.5) are excluded from the rate and latency figures; the
 * requests they complete are still in requests_total (what the server side did during the run).
 * Prints one JSON line:
 *   {"mode":"closed"|"open",...,"requests":N,"requests_total":N,"errors":E,"non200":K,
 *    "rps":..,"p50_us":..,"p90_us":..,"p99_us":..,"p999_us":..,"max_us":..,"mean_us":..}
 * Exit status 0 when every connection/tunnel opened and no request failed, 1 otherwise, 2 on
 * usage.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#include "tests/bench/loadkit.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/base/tls.h"
#include "waypoint/base/util.h"

#define MAX_HEAD    8192
#define MAX_HEADERS 16
#define TLS_RBUF    (32 * 1024)
#define TLS_WBUF    (64 * 1024)

enum proto { P_H1, P_H2 };
enum rstate { R_IDLE, R_HEAD, R_BODY };

struct sess;

struct h2req {
        uint64_t sched_ns;
        unsigned status;
};

/* one HTTP connection, over a tunnel or over TLS */
struct sess {
        struct tunnel *tun; /* HBONE carrier, or */
        struct tconn *tc;   /* TLS carrier */
        bool ready, dead, queued;
        unsigned inflight, cap;
        /* HTTP/1.1 */
        enum rstate rs;
        uint64_t sched_ns;
        size_t hlen;
        uint64_t body_left;
        unsigned http_status;
        char *head;
        /* HTTP/2 */
        nghttp2_session *ng;
        struct h2req *reqs;
        unsigned *free_reqs, nfree;
        uint8_t *pend; /* output the tunnel did not take yet */
        size_t pend_len, pend_cap;
        struct wp_task flush_task;
};

struct tunnel {
        struct lk_tunnel k; /* first */
        struct sess s;
};

struct tconn {
        int fd;
        unsigned idx;
        struct wp_tls *tls;
        struct wp_op cop, rop, wop;
        size_t wlen, woff;
        bool hs_done, closing, counted;
        struct sess s;
        uint8_t rbuf[TLS_RBUF];
        uint8_t wbuf[TLS_WBUF];
        uint8_t pbuf[TLS_RBUF];
};

static struct {
        const char *path, *host;
        const char *headers[MAX_HEADERS];
        unsigned nheaders;
        enum proto proto;
        bool tls;
        unsigned streams;
        double duration_s, warmup_s, rate;

        struct tunnel *tunnels;
        struct tconn *tconns;
        unsigned nsess, sess_ok, sess_answered, tconns_done;
        char *req;
        size_t req_len;
        nghttp2_nv nva[6 + MAX_HEADERS];
        size_t nnv;
        nghttp2_session_callbacks *ngcb;

        struct sess **ring; /* FIFO of HTTP connections with a free slot */
        unsigned ring_head, ring_len;
        bool sending; /* inside [t_start, t_stop) */
        uint64_t t_start, t_measure, t_stop;
        uint64_t next_due, nscheduled;
        uint64_t in_flight, sent, done_total, errors, non200;
        uint64_t lag_sum_ns;
        struct lk_hist hist;
} G = {.duration_s = 5, .warmup_s = 0.5, .path = "/bench/get", .host = "bench", .streams = 1};

/* ---- slots ---- */

static void enqueue(struct sess *s)
{
        if (s->queued || s->dead || !s->ready || s->inflight >= s->cap)
                return;
        s->queued = true;
        G.ring[(G.ring_head + G.ring_len++) % G.nsess] = s;
}

static struct sess *dequeue(void)
{
        while (G.ring_len > 0) {
                struct sess *s = G.ring[G.ring_head];

                G.ring_head = (G.ring_head + 1) % G.nsess;
                G.ring_len--;
                s->queued = false;
                if (!s->dead && s->ready && s->inflight < s->cap)
                        return s;
        }
        return NULL;
}

static void schedule_flush(struct sess *s)
{
        wp_loop_defer(LK.loop, &s->flush_task);
}

static void sess_fail(struct sess *s, const char *why)
{
        if (s->dead)
                return;
        s->dead = true;
        if (s->inflight) {
                G.in_flight -= s->inflight;
                G.errors += s->inflight;
                s->inflight = 0;
                lk_note_error(why);
        } else if (G.sending) {
                lk_note_error(why);
        }
}

static int send_request(struct sess *s, uint64_t sched);

static void response_done(struct sess *s, uint64_t sched, unsigned status)
{
        uint64_t now = wp_now_ns();

        s->inflight--;
        G.in_flight--;
        G.done_total++;
        if (status != 200) {
                G.non200++;
                lk_note_error("non-200 response");
        } else if (sched >= G.t_measure && sched < G.t_stop) {
                lk_hist_add(&G.hist, now - sched);
        }
        if (G.rate > 0)
                enqueue(s); /* the caller pumps (pump_open after the input is processed) */
        else if (G.sending && now < G.t_stop)
                send_request(s, 0);
}

static void h2_flush(struct sess *s);

/* open loop: send every due request that finds a free slot. Request k is due at
 * t_start + k / rate. From the main loop (not a callback), HTTP/2 output is flushed right away:
 * a deferred flush would wait for the loop's next wake-up. */
static void pump_open(bool from_main)
{
        uint64_t now = wp_now_ns();

        while (G.sending && G.next_due <= now && G.next_due < G.t_stop) {
                struct sess *s = dequeue();

                if (!s)
                        break;
                if (send_request(s, G.next_due) == 0) {
                        G.nscheduled++;
                        G.next_due = G.t_start + (uint64_t)((double)G.nscheduled * 1e9 / G.rate);
                        if (from_main && G.proto == P_H2)
                                h2_flush(s);
                }
                enqueue(s);
        }
}

/* ---- HTTP/1.1 inside a tunnel ---- */

static int h1_send(struct sess *s)
{
        struct tunnel *t = s->tun;
        ssize_t n = hbone_stream_write(t->k.st, (const uint8_t *)G.req, G.req_len);

        if (n != (ssize_t)G.req_len) {
                /* the queue holds far more than one small request: a short write is a failure */
                hbone_stream_reset(t->k.st, HBONE_H2_CANCEL);
                hbone_conn_kick(t->k.lc->c);
                sess_fail(s, "request write failed");
                G.errors++;
                return -EIO;
        }
        s->rs = R_HEAD;
        s->hlen = 0;
        hbone_conn_kick(t->k.lc->c);
        return 0;
}

/* parses the response head in s->head[0..hlen); returns 0 or -EPROTO */
static int h1_parse_head(struct sess *s)
{
        const char *p = s->head, *end = s->head + s->hlen;

        if (s->hlen < 12 || memcmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ')
                return -EPROTO;
        s->http_status = (unsigned)((p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0'));
        s->body_left = 0;
        bool have_len = false;
        const char *line = memchr(p, '\n', (size_t)(end - p));

        while (line && ++line < end) {
                const char *eol = memchr(line, '\n', (size_t)(end - line));

                if (!eol)
                        break;
                size_t len = (size_t)(eol - line);

                if (len > 15 && strncasecmp(line, "content-length:", 15) == 0) {
                        char *e;

                        s->body_left = strtoull(line + 15, &e, 10);
                        have_len = true;
                } else if (len > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0) {
                        return -EPROTO; /* our backend never chunks; neither should the path */
                }
                line = eol;
        }
        if (!have_len && s->http_status != 204 && s->http_status != 304)
                return -EPROTO;
        return 0;
}

static int h1_feed(struct sess *s, const uint8_t *data, size_t len)
{
        while (len > 0) {
                if (s->rs == R_IDLE)
                        return -EPROTO; /* bytes with no request in flight */
                if (s->rs == R_HEAD) {
                        size_t room = MAX_HEAD - s->hlen, take = len < room ? len : room;
                        size_t old = s->hlen;

                        memcpy(s->head + old, data, take);
                        s->hlen += take;
                        /* look for the blank line, starting a little before the new bytes */
                        size_t from = old > 3 ? old - 3 : 0;
                        char *hit = memmem(s->head + from, s->hlen - from, "\r\n\r\n", 4);

                        if (!hit)
                                return s->hlen == MAX_HEAD ? -E2BIG : 0;
                        size_t head_len = (size_t)(hit - s->head) + 4;
                        size_t used = head_len - old;

                        s->hlen = head_len;
                        if (h1_parse_head(s) < 0)
                                return -EPROTO;
                        data += used;
                        len -= used;
                        s->rs = R_BODY;
                }
                if (s->rs == R_BODY) {
                        size_t take = s->body_left < len ? (size_t)s->body_left : len;

                        s->body_left -= take;
                        data += take;
                        len -= take;
                        if (s->body_left == 0) {
                                s->rs = R_IDLE;
                                response_done(s, s->sched_ns, s->http_status);
                        }
                }
        }
        return 0;
}

/* ---- HTTP/2 (inside a tunnel or over TLS) ---- */

static int h2_on_header(nghttp2_session *ng, const nghttp2_frame *frame, const uint8_t *name,
                        size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                        void *user)
{
        struct h2req *r = nghttp2_session_get_stream_user_data(ng, frame->hd.stream_id);

        if (r && namelen == 7 && memcmp(name, ":status", 7) == 0 && valuelen == 3)
                r->status = (unsigned)((value[0] - '0') * 100 + (value[1] - '0') * 10 +
                                       (value[2] - '0'));
        return 0;
}

static int h2_on_data(nghttp2_session *ng, uint8_t flags, int32_t stream_id, const uint8_t *data,
                      size_t len, void *user)
{
        return 0; /* bodies are discarded; nghttp2 returns the flow-control credit */
}

static int h2_on_close(nghttp2_session *ng, int32_t stream_id, uint32_t error_code, void *user)
{
        struct sess *s = user;
        struct h2req *r = nghttp2_session_get_stream_user_data(ng, stream_id);

        if (!r)
                return 0;
        s->free_reqs[s->nfree++] = (unsigned)(r - s->reqs);
        if (s->dead)
                return 0;
        if (error_code || !r->status) {
                s->inflight--;
                G.in_flight--;
                G.errors++;
                lk_note_error("stream reset");
                enqueue(s);
                return 0;
        }
        response_done(s, r->sched_ns, r->status);
        return 0;
}

static int h2_send(struct sess *s, uint64_t sched)
{
        if (!s->nfree)
                return -EBUSY;
        unsigned i = s->free_reqs[--s->nfree];
        struct h2req *r = &s->reqs[i];

        *r = (struct h2req){.sched_ns = sched};
        int32_t id = nghttp2_submit_request(s->ng, NULL, G.nva, G.nnv, NULL, r);

        if (id < 0) {
                s->nfree++;
                sess_fail(s, "nghttp2_submit_request failed");
                G.errors++;
                return -EIO;
        }
        schedule_flush(s);
        return 0;
}

static void tconn_send(struct tconn *tc);

/* moves nghttp2's output into the carrier */
static void h2_flush(struct sess *s)
{
        if (s->dead || !s->ng)
                return;
        if (s->tc) {
                for (;;) {
                        const uint8_t *data;
                        ssize_t n = nghttp2_session_mem_send(s->ng, &data);

                        if (n <= 0) {
                                if (n < 0)
                                        sess_fail(s, "nghttp2 send failed");
                                break;
                        }
                        if (wp_tls_write(s->tc->tls, data, (size_t)n) < 0) {
                                sess_fail(s, "TLS write failed");
                                break;
                        }
                }
                tconn_send(s->tc);
                return;
        }
        struct hbone_stream *st = s->tun->k.st;

        if (!st)
                return;
        while (s->pend_len > 0) {
                ssize_t w = hbone_stream_write(st, s->pend, s->pend_len);

                if (w == -EAGAIN)
                        goto out; /* on_tunnel_writable calls us again */
                if (w < 0) {
                        sess_fail(s, "stream write failed");
                        goto out;
                }
                memmove(s->pend, s->pend + w, s->pend_len - (size_t)w);
                s->pend_len -= (size_t)w;
        }
        for (;;) {
                const uint8_t *data;
                ssize_t n = nghttp2_session_mem_send(s->ng, &data), w;

                if (n <= 0) {
                        if (n < 0)
                                sess_fail(s, "nghttp2 send failed");
                        break;
                }
                w = hbone_stream_write(st, data, (size_t)n);
                if (w == -EAGAIN)
                        w = 0;
                if (w < 0) {
                        sess_fail(s, "stream write failed");
                        break;
                }
                if (w < n) {
                        size_t rest = (size_t)(n - w);

                        if (s->pend_cap < rest) {
                                s->pend = wp_xmalloc(rest); /* pend_len is 0 here */
                                s->pend_cap = rest;
                        }
                        memcpy(s->pend, data + w, rest);
                        s->pend_len = rest;
                        break;
                }
        }
out:
        hbone_conn_kick(s->tun->k.lc->c);
}

static void flush_task(struct wp_task *t)
{
        h2_flush(container_of(t, struct sess, flush_task));
}

static int h2_init(struct sess *s)
{
        nghttp2_settings_entry iv[] = {
                {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 1000},
                {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20},
        };

        if (nghttp2_session_client_new(&s->ng, G.ngcb, s) != 0)
                return -ENOMEM;
        nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, iv, 2);
        nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0, 16 << 20);
        s->reqs = wp_xcalloc(s->cap, sizeof(*s->reqs));
        s->free_reqs = wp_xcalloc(s->cap, sizeof(unsigned));
        for (unsigned i = 0; i < s->cap; i++)
                s->free_reqs[s->nfree++] = s->cap - 1 - i;
        schedule_flush(s);
        return 0;
}

static int h2_feed(struct sess *s, const uint8_t *data, size_t len)
{
        ssize_t n = nghttp2_session_mem_recv(s->ng, data, len);

        if (n < 0 || (size_t)n != len)
                return -EPROTO;
        schedule_flush(s);
        return 0;
}

static void sess_init(struct sess *s)
{
        s->cap = G.proto == P_H2 ? G.streams : 1;
        s->flush_task.run = flush_task;
        if (G.proto == P_H1)
                s->head = wp_xmalloc(MAX_HEAD);
}

static void sess_ready(struct sess *s)
{
        if (G.proto == P_H2 && h2_init(s) < 0) {
                sess_fail(s, "nghttp2 session");
                return;
        }
        s->ready = true;
        G.sess_ok++;
        enqueue(s);
}

static void sess_free(struct sess *s)
{
        nghttp2_session_del(s->ng);
        s->ng = NULL;
        wp_free(s->reqs);
        wp_free(s->free_reqs);
        wp_free(s->pend);
        wp_free(s->head);
}

static int send_request(struct sess *s, uint64_t sched)
{
        uint64_t now = wp_now_ns();

        if (!sched)
                sched = now;
        else if (now > sched)
                G.lag_sum_ns += now - sched;
        int r = G.proto == P_H2 ? h2_send(s, sched) : h1_send(s);

        if (r < 0)
                return r;
        s->sched_ns = sched;
        s->inflight++;
        G.in_flight++;
        G.sent++;
        return 0;
}

static int sess_feed(struct sess *s, const uint8_t *data, size_t len)
{
        int r = G.proto == P_H2 ? h2_feed(s, data, len) : h1_feed(s, data, len);

        if (G.rate > 0)
                pump_open(false);
        return r;
}

/* ---- HBONE carrier ---- */

static int cb_request(struct hbone_session *hs, struct hbone_stream *st,
                      const struct hbone_request *req, void *session_user)
{
        return -EPROTO; /* we are the client */
}

static void cb_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct tunnel *t = user;

        G.sess_answered++;
        if (lk_tunnel_answered(&t->k, status))
                sess_ready(&t->s);
}

static int cb_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user)
{
        struct tunnel *t = user;
        int r = sess_feed(&t->s, data, len);

        hbone_stream_consume(st, len);
        hbone_conn_kick(t->k.lc->c);
        if (r < 0) {
                sess_fail(&t->s, r == -E2BIG ? "response head too large" : "bad response");
                return r; /* resets the stream */
        }
        return 0;
}

static void cb_eof(struct hbone_stream *st, void *user)
{
        struct tunnel *t = user;

        sess_fail(&t->s, "tunnel ended mid-run");
        hbone_stream_shutdown(st);
        hbone_conn_kick(t->k.lc->c);
}

static void cb_writable(struct hbone_stream *st, void *user)
{
        struct tunnel *t = user;

        if (G.proto == P_H2)
                h2_flush(&t->s);
}

static void cb_close(struct hbone_stream *st, uint32_t h2_error, void *user)
{
        struct tunnel *t = user;

        if (t->k.closed)
                return;
        t->k.closed = true;
        t->k.st = NULL;
        if (!t->k.status) {
                LK.answered++;
                G.sess_answered++;
        }
        sess_fail(&t->s, h2_error ? "tunnel reset" : "tunnel closed during the run");
}

static void tunnel_lost(struct lk_tunnel *k)
{
        cb_close(NULL, 0, k);
}

static void cb_goaway(struct hbone_session *hs, uint32_t h2_error, void *session_user)
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

/* ---- TLS carrier ---- */

static void tconn_maybe_done(struct tconn *tc)
{
        if (!tc->closing || wp_op_inflight(&tc->cop) || wp_op_inflight(&tc->rop) ||
            wp_op_inflight(&tc->wop) || tc->counted)
                return;
        tc->counted = true;
        close(tc->fd);
        tc->fd = -1;
        G.tconns_done++;
}

static void tconn_close(struct tconn *tc, const char *why)
{
        if (!tc->hs_done && !tc->closing)
                G.sess_answered++;
        if (why)
                sess_fail(&tc->s, why);
        tc->s.dead = true;
        if (tc->closing)
                return;
        tc->closing = true;
        if (why && !lk_signal) {
                fprintf(stderr, "http_load: TLS connection %u: %s\n", tc->idx, why);
                lk_note_error(why);
        }
        shutdown(tc->fd, SHUT_RDWR);
        wp_loop_cancel(LK.loop, &tc->cop);
        wp_loop_cancel(LK.loop, &tc->rop);
        wp_loop_cancel(LK.loop, &tc->wop);
        tconn_maybe_done(tc);
}

static void tconn_send(struct tconn *tc)
{
        if (tc->closing || wp_op_inflight(&tc->wop))
                return;
        if (tc->woff == tc->wlen) {
                tc->woff = 0;
                tc->wlen = wp_tls_output(tc->tls, tc->wbuf, sizeof(tc->wbuf));
        }
        if (tc->woff < tc->wlen)
                wp_loop_send(LK.loop, &tc->wop, tc->fd, tc->wbuf + tc->woff, tc->wlen - tc->woff);
}

static void on_sent(struct wp_op *op, int res)
{
        struct tconn *tc = container_of(op, struct tconn, wop);

        if (res < 0) {
                tconn_close(tc, res == -ECANCELED ? NULL : "send failed");
                tconn_maybe_done(tc);
                return;
        }
        tc->woff += (size_t)res;
        tconn_send(tc);
}

static void on_recv(struct wp_op *op, int res)
{
        struct tconn *tc = container_of(op, struct tconn, rop);
        ssize_t n;

        if (tc->closing) {
                tconn_maybe_done(tc);
                return;
        }
        if (res <= 0) {
                tconn_close(tc, res == 0 ? "peer closed" : "recv failed");
                return;
        }
        if (wp_tls_feed(tc->tls, tc->rbuf, (size_t)res) < 0) {
                tconn_close(tc, "TLS feed");
                return;
        }
        if (!tc->hs_done) {
                int r = wp_tls_handshake(tc->tls);

                if (r == 0) {
                        tc->hs_done = true;
                        G.sess_answered++;
                        sess_ready(&tc->s);
                } else if (r != -EAGAIN) {
                        tconn_send(tc); /* the alert */
                        tconn_close(tc, wp_tls_error(tc->tls));
                        return;
                }
        }
        while (tc->hs_done && !tc->s.dead &&
               (n = wp_tls_read(tc->tls, tc->pbuf, sizeof(tc->pbuf))) != -EAGAIN) {
                if (n <= 0) {
                        tconn_close(tc, n == 0 ? "peer sent close_notify" : "TLS read");
                        return;
                }
                if (sess_feed(&tc->s, tc->pbuf, (size_t)n) < 0) {
                        tconn_close(tc, "bad HTTP/2 input");
                        return;
                }
        }
        tconn_send(tc);
        if (!tc->closing)
                wp_loop_recv(LK.loop, &tc->rop, tc->fd, tc->rbuf, sizeof(tc->rbuf));
}

static void on_connected(struct wp_op *op, int res)
{
        struct tconn *tc = container_of(op, struct tconn, cop);

        if (res < 0) {
                tconn_close(tc, res == -ECANCELED ? NULL : strerror(-res));
                tconn_maybe_done(tc);
                return;
        }
        if (wp_tls_new(LK.tls, &tc->tls) < 0) {
                tconn_close(tc, "TLS object");
                return;
        }
        if (wp_tls_handshake(tc->tls) != -EAGAIN) {
                tconn_close(tc, wp_tls_error(tc->tls));
                return;
        }
        tconn_send(tc);
        wp_loop_recv(LK.loop, &tc->rop, tc->fd, tc->rbuf, sizeof(tc->rbuf));
}

static int tconn_start(struct tconn *tc)
{
        int one = 1;

        tc->fd = socket(LK.srv.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (tc->fd < 0)
                return -errno;
        setsockopt(tc->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        wp_op_init(&tc->cop, on_connected);
        wp_op_init(&tc->rop, on_recv);
        wp_op_init(&tc->wop, on_sent);
        tc->s.tc = tc;
        wp_loop_connect(LK.loop, &tc->cop, tc->fd, (const struct sockaddr *)&LK.srv.addr,
                        LK.srv.addrlen);
        return 0;
}

/* ---- setup ---- */

static void build_request(void)
{
        size_t cap = 512 + strlen(G.path) + strlen(G.host);

        for (unsigned i = 0; i < G.nheaders; i++)
                cap += strlen(G.headers[i]) + 2;
        G.req = wp_xmalloc(cap);
        int n = snprintf(G.req, cap,
                         "GET %s HTTP/1.1\r\nHost: %s\r\nuser-agent: http_load\r\n"
                         "accept: */*\r\n",
                         G.path, G.host);

        for (unsigned i = 0; i < G.nheaders; i++)
                n += snprintf(G.req + n, cap - (size_t)n, "%s\r\n", G.headers[i]);
        n += snprintf(G.req + n, cap - (size_t)n, "\r\n");
        G.req_len = (size_t)n;

#define NV(n, v)                                                                                   \
        ((nghttp2_nv){(uint8_t *)(n), (uint8_t *)(v), strlen(n), strlen(v),                        \
                      NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE})
        G.nva[G.nnv++] = NV(":method", "GET");
        G.nva[G.nnv++] = NV(":scheme", G.tls ? "https" : "http");
        G.nva[G.nnv++] = NV(":authority", G.host);
        G.nva[G.nnv++] = NV(":path", G.path);
        G.nva[G.nnv++] = NV("user-agent", "http_load");
        for (unsigned i = 0; i < G.nheaders; i++) {
                /* "name: value" was checked in main; the name is lowercased in place */
                char *h = (char *)G.headers[i], *colon = strchr(h, ':'), *v = colon + 1;

                for (char *p = h; p < colon; p++)
                        *p = (char)(*p >= 'A' && *p <= 'Z' ? *p + 32 : *p);
                while (*v == ' ')
                        v++;
                G.nva[G.nnv++] =
                        (nghttp2_nv){(uint8_t *)h, (uint8_t *)v, (size_t)(colon - h), strlen(v),
                                     NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE};
        }
#undef NV
        nghttp2_session_callbacks_new(&G.ngcb);
        nghttp2_session_callbacks_set_on_header_callback(G.ngcb, h2_on_header);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(G.ngcb, h2_on_data);
        nghttp2_session_callbacks_set_on_stream_close_callback(G.ngcb, h2_on_close);
}

static void usage(FILE *f)
{
        fputs("usage: http_load --server IP:PORT [--authority HOST:PORT] --cert F --key F "
              "--root F\n"
              "         [--tls] [--proto h1|h2] [--streams S] [--duration S] [--warmup S]\n"
              "         [--rate R (0 = closed loop)] [--path P] [--host H]\n"
              "         [--header 'name: value']...\n" LK_COMMON_USAGE,
              f);
}

static bool all_answered(void)
{
        return G.sess_answered >= G.nsess || lk_signal;
}

static bool tconns_done(void)
{
        return G.tconns_done >= G.nsess;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"duration", required_argument, NULL, 'D'},
                {"warmup", required_argument, NULL, 'W'},
                {"rate", required_argument, NULL, 'R'},
                {"path", required_argument, NULL, 'p'},
                {"host", required_argument, NULL, 'H'},
                {"header", required_argument, NULL, 'x'},
                {"proto", required_argument, NULL, 'P'},
                {"streams", required_argument, NULL, 'S'},
                {"tls", no_argument, NULL, 'L'},
                {"help", no_argument, NULL, 'h'},
                LK_OPTIONS,
                {NULL, 0, NULL, 0},
        };
        bool bad = false, proto_set = false;
        int c, r;

        LK.prog = "http_load";
        LK.on_tunnel_lost = tunnel_lost;
        wp_log_set_level(WP_LOG_WARN);
        while ((c = getopt_long(argc, argv, "vh", opts, NULL)) != -1) {
                switch (c) {
                case 'D':
                        G.duration_s = lk_parse_num(optarg, &bad);
                        break;
                case 'W':
                        G.warmup_s = lk_parse_num(optarg, &bad);
                        break;
                case 'R':
                        G.rate = lk_parse_num(optarg, &bad);
                        break;
                case 'p':
                        G.path = optarg;
                        break;
                case 'H':
                        G.host = optarg;
                        break;
                case 'x':
                        if (G.nheaders == MAX_HEADERS || strpbrk(optarg, "\r\n") ||
                            !strchr(optarg, ':') || optarg[0] == ':')
                                bad = true;
                        else
                                G.headers[G.nheaders++] = optarg;
                        break;
                case 'P':
                        proto_set = true;
                        if (strcmp(optarg, "h1") == 0)
                                G.proto = P_H1;
                        else if (strcmp(optarg, "h2") == 0)
                                G.proto = P_H2;
                        else
                                bad = true;
                        break;
                case 'S':
                        G.streams = (unsigned)lk_parse_num(optarg, &bad);
                        break;
                case 'L':
                        G.tls = true;
                        break;
                case 'h':
                        usage(stdout);
                        return 0;
                default:
                        if (lk_option(c, optarg) <= 0)
                                bad = true;
                }
        }
        if (G.tls && G.proto == P_H1 && proto_set)
                bad = true; /* --tls speaks HTTP/2 only */
        if (G.tls) {
                G.proto = P_H2;
                LK.ntunnels = LK.nconns; /* one HTTP/2 connection each, no tunnels */
        }
        if (bad || optind != argc || G.duration_s <= 0 || G.warmup_s >= G.duration_s ||
            G.streams == 0 || G.streams > 1000 || (G.proto == P_H1 && G.streams != 1) ||
            strpbrk(G.path, " \r\n") || strpbrk(G.host, " \r\n")) {
                usage(stderr);
                return 2;
        }
        r = lk_setup(!G.tls);
        if (r == -2)
                usage(stderr);
        if (r < 0)
                return r == -2 ? 2 : 1;
        build_request();

        G.nsess = G.tls ? LK.nconns : LK.ntunnels;
        G.ring = wp_xcalloc(G.nsess, sizeof(*G.ring));
        uint64_t t0 = wp_now_ns();
        uint64_t deadline = t0 + (uint64_t)(LK.timeout_s * 1e9);

        if (G.tls) {
                G.tconns = wp_xcalloc(G.nsess, sizeof(*G.tconns));
                for (unsigned i = 0; i < G.nsess; i++) {
                        G.tconns[i].idx = i;
                        sess_init(&G.tconns[i].s);
                        if ((r = tconn_start(&G.tconns[i])) < 0) {
                                fprintf(stderr, "http_load: socket: %s\n", strerror(-r));
                                return 1;
                        }
                }
        } else {
                G.tunnels = wp_xcalloc(G.nsess, sizeof(*G.tunnels));
                for (unsigned i = 0; i < G.nsess; i++) {
                        G.tunnels[i].s.tun = &G.tunnels[i];
                        sess_init(&G.tunnels[i].s);
                }
                lk_assign(G.tunnels, sizeof(*G.tunnels), G.nsess);
                if (lk_connect_all(&callbacks) < 0)
                        return 1;
        }

        /* 1. every tunnel / connection answered */
        lk_run_until(all_answered, deadline);
        double setup_s = lk_secs(t0, wp_now_ns());

        if (G.sess_ok < G.nsess)
                fprintf(stderr, "http_load: only %u of %u %s established (%s)\n", G.sess_ok,
                        G.nsess, G.tls ? "connections" : "tunnels",
                        LK.first_error ? LK.first_error : "timeout");

        /* 2. the run */
        G.t_start = wp_now_ns();
        G.t_measure = G.t_start + (uint64_t)(G.warmup_s * 1e9);
        G.t_stop = G.t_start + (uint64_t)(G.duration_s * 1e9);
        G.sending = G.sess_ok > 0 && !lk_signal;
        if (G.rate > 0) {
                G.next_due = G.t_start;
        } else {
                struct sess *s;

                while (G.sending && (s = dequeue()) != NULL)
                        while (s->inflight < s->cap && !s->dead && send_request(s, 0) == 0)
                                ;
        }
        while (G.sending && !lk_signal) {
                uint64_t now, wait = 100 * WP_NSEC_PER_MSEC;

                if (G.rate > 0)
                        pump_open(true); /* also the requests due just before t_stop */
                now = wp_now_ns();
                if (now >= G.t_stop)
                        break;
                if (G.rate > 0 && G.ring_len > 0)
                        wait = G.next_due > now ? G.next_due - now : 0;
                if (G.t_stop - now < wait)
                        wait = G.t_stop - now;
                wp_loop_run_once(LK.loop, wait);
                if (G.sess_ok && G.in_flight == 0 && G.ring_len == 0 && G.rate <= 0)
                        break; /* every HTTP connection failed */
        }
        G.sending = false;
        uint64_t t_end = wp_now_ns();
        /* scheduled requests never sent are failures of the path (open loop only) */
        uint64_t unsent = 0;

        if (G.rate > 0) {
                uint64_t due = (uint64_t)(G.duration_s * G.rate + 0.999999);

                unsent = due > G.nscheduled ? due - G.nscheduled : 0;
        }

        /* 3. let the requests in flight finish (they count in requests_total only) */
        uint64_t drain_until = wp_now_ns() + 5 * WP_NSEC_PER_SEC;

        while (G.in_flight > 0 && wp_now_ns() < drain_until)
                wp_loop_run_once(LK.loop, 50 * WP_NSEC_PER_MSEC);
        if (G.in_flight > 0) {
                lk_note_error("requests still in flight at the end");
                G.errors += G.in_flight;
        }
        if (G.tls) {
                lk_signal = lk_signal ? lk_signal : SIGTERM;
                for (unsigned i = 0; i < G.nsess; i++)
                        tconn_close(&G.tconns[i], NULL);
                lk_run_until(tconns_done, wp_now_ns() + 5 * WP_NSEC_PER_SEC);
        } else {
                lk_close_all(5);
        }

        double measured_s = lk_secs(G.t_measure, t_end);
        double rps = measured_s > 0 ? (double)G.hist.n / measured_s : 0;

        printf("{\"mode\":\"%s\",\"transport\":\"%s\",\"proto\":\"%s\",\"connections\":%u,"
               "\"tunnels\":%u,\"streams\":%u,\"sessions_ok\":%u,"
               "\"rate\":%.1f,\"duration\":%.3f,\"warmup\":%.3f,\"setup_seconds\":%.3f,"
               "\"requests\":%llu,\"requests_total\":%llu,\"errors\":%llu,\"non200\":%llu,"
               "\"unsent\":%llu,\"rps\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
               "\"p999_us\":%.1f,\"max_us\":%.1f,\"mean_us\":%.1f,\"mean_send_lag_us\":%.1f,"
               "\"error\":\"%s\"}\n",
               G.rate > 0 ? "open" : "closed", G.tls ? "tls" : "hbone",
               G.proto == P_H2 ? "h2" : "h1", LK.nconns, G.tls ? 0 : LK.ntunnels, G.streams,
               G.sess_ok, G.rate, lk_secs(G.t_start, t_end), G.warmup_s, setup_s,
               (unsigned long long)G.hist.n, (unsigned long long)G.done_total,
               (unsigned long long)G.errors, (unsigned long long)G.non200,
               (unsigned long long)unsent, rps, lk_hist_us(&G.hist, 0.50),
               lk_hist_us(&G.hist, 0.90), lk_hist_us(&G.hist, 0.99), lk_hist_us(&G.hist, 0.999),
               (double)G.hist.max_ns / 1e3,
               G.hist.n ? (double)G.hist.sum_ns / (double)G.hist.n / 1e3 : 0.0,
               G.sent ? (double)G.lag_sum_ns / (double)G.sent / 1e3 : 0.0,
               LK.first_error ? LK.first_error : "");
        fflush(stdout);
        bool ok = G.sess_ok == G.nsess && !G.errors && !G.non200 && !unsent;

        if (G.tls && tconns_done()) {
                for (unsigned i = 0; i < G.nsess; i++) {
                        sess_free(&G.tconns[i].s);
                        wp_tls_free(G.tconns[i].tls);
                }
                wp_free(G.tconns);
                wp_tls_ctx_unref(LK.tls);
                wp_loop_free(LK.loop);
        } else if (!G.tls) {
                for (unsigned i = 0; i < G.nsess; i++)
                        sess_free(&G.tunnels[i].s);
                lk_free();
                if (!LK.conns)
                        wp_free(G.tunnels);
        }
        wp_free(G.ring);
        wp_free(G.req);
        nghttp2_session_callbacks_del(G.ngcb);
        return ok ? 0 : 1;
}
