/*
 * hbone_relay: one tunnel spliced between two ends. See relay.h.
 *
 * Each end keeps `pending`: bytes received from it that the other end has not accepted yet.
 * forward(from, to) moves pending bytes into `to` and returns flow-control credit to `from`
 * (stream: hbone_stream_consume; TCP: the next recv is armed only once pending is empty).
 */
#include "hbone/relay.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/bufq.h"
#include "waypoint/base/time.h"
#include "waypoint/base/util.h"

#define TCP_RBUF_SIZE (64 * 1024)
#define PENDING_CHUNK (16 * 1024)
/* pending is bounded by what the peer may legally send: its stream window (at most 2^31-1) */
#define PENDING_MAX_CHUNKS ((size_t)(1u << 31) / PENDING_CHUNK)
#define DEFAULT_TCP_QUEUE  (256 * 1024)

enum end_kind { END_NONE, END_STREAM, END_TCP };

struct end {
        struct hbone_relay *r;
        enum end_kind kind;
        /* END_STREAM */
        struct hbone_stream *st;
        struct hbone_conn *conn;
        /* END_TCP */
        int fd;
        bool connecting;
        bool recv_paused;
        bool shut_wr_pending;
        bool linger_rst;
        struct wp_op recv_op, send_op, connect_op;
        struct wp_timer timer;
        uint8_t *rbuf;
        struct wp_bufq sq;
        /* common */
        struct wp_bufq pending;
        bool eof_in;  /* this end sent EOF */
        bool eof_out; /* we sent EOF to this end */
        bool closed;  /* finished, resources released */
        bool failed;  /* closed abnormally */
        uint64_t bytes_in;
};

struct hbone_relay {
        struct hbone_relay_config cfg;
        struct hbone_relay_ops ops;
        struct end down, up;
        bool answered;
        bool established;
        bool done;
        bool in_dispatch;
};

static struct end *other(struct end *e)
{
        return e == &e->r->down ? &e->r->up : &e->r->down;
}

static void check_done(struct hbone_relay *r);
static void end_reset(struct end *e);
static void tcp_arm_recv(struct end *e);
static void tcp_try_close(struct end *e);

static void report(struct hbone_relay *r, enum hbone_relay_result res, unsigned status)
{
        if (r->ops.on_upstream_result)
                r->ops.on_upstream_result(r, res, status, r->cfg.user);
}

static void respond_down(struct hbone_relay *r, unsigned status, const char *reason)
{
        struct hbone_header h = {r->cfg.error_header, reason};

        if (r->answered || !r->down.st)
                return;
        r->answered = true;
        hbone_stream_respond(r->down.st, status, &h, reason && r->cfg.error_header ? 1 : 0);
        hbone_conn_kick(r->down.conn);
}

static ssize_t end_write(struct end *e, const uint8_t *data, size_t len)
{
        ssize_t n;

        if (e->closed || e->eof_out)
                return -EPIPE;
        if (e->kind == END_STREAM) {
                n = hbone_stream_write(e->st, data, len);
                if (n > 0)
                        hbone_conn_kick(e->conn);
                return n;
        }
        if (e->kind == END_TCP) {
                bool was_empty = wp_bufq_empty(&e->sq);

                n = wp_bufq_write(&e->sq, data, len);
                if (n > 0 && was_empty && !wp_op_inflight(&e->send_op)) {
                        const uint8_t *p;
                        size_t plen = wp_bufq_peek(&e->sq, &p);

                        wp_loop_send(e->r->cfg.loop, &e->send_op, e->fd, p, plen);
                }
                return n;
        }
        return -EAGAIN;
}

static void end_shutdown(struct end *e)
{
        if (e->eof_out || e->closed)
                return;
        e->eof_out = true;
        if (e->kind == END_STREAM) {
                hbone_stream_shutdown(e->st);
                hbone_conn_kick(e->conn);
        } else if (e->kind == END_TCP) {
                if (wp_bufq_empty(&e->sq) && !wp_op_inflight(&e->send_op))
                        shutdown(e->fd, SHUT_WR);
                else
                        e->shut_wr_pending = true;
                tcp_try_close(e);
        }
}

/* Moves from->pending into to; returns credit to from. */
static void forward(struct end *from, struct end *to)
{
        const uint8_t *p;
        size_t len;
        ssize_t n;

        if (!from->r->established)
                return;
        while ((len = wp_bufq_peek(&from->pending, &p)) > 0) {
                n = end_write(to, p, len);
                if (n == -EPIPE) {
                        /* the receiver is gone: drop what it can no longer take */
                        size_t all = wp_bufq_len(&from->pending);

                        wp_bufq_skip(&from->pending, all);
                        if (from->kind == END_STREAM && from->st)
                                hbone_stream_consume(from->st, all);
                        break;
                }
                if (n <= 0)
                        break;
                wp_bufq_skip(&from->pending, (size_t)n);
                if (from->kind == END_STREAM && from->st) {
                        hbone_stream_consume(from->st, (size_t)n);
                        hbone_conn_kick(from->conn);
                }
        }
        if (!wp_bufq_empty(&from->pending))
                return;
        if (from->eof_in)
                end_shutdown(to);
        else if (from->kind == END_TCP && from->recv_paused) {
                from->recv_paused = false;
                tcp_arm_recv(from);
        }
}

/* Bytes received from end e. */
static int end_received(struct end *e, const uint8_t *data, size_t len)
{
        struct end *o = other(e);
        ssize_t n = 0;

        e->bytes_in += len;
        if (wp_bufq_empty(&e->pending) && e->r->established) {
                n = end_write(o, data, len);
                if (n == -EPIPE)
                        n = (ssize_t)len; /* receiver gone: discard */
                if (n < 0)
                        n = 0;
                if (n > 0 && e->kind == END_STREAM) {
                        hbone_stream_consume(e->st, (size_t)n);
                        hbone_conn_kick(e->conn);
                }
        }
        if ((size_t)n < len) {
                ssize_t w = wp_bufq_write(&e->pending, data + n, len - (size_t)n);

                if (w < 0 || (size_t)w != len - (size_t)n)
                        return -ENOBUFS;
        }
        return 0;
}

/* ---- TCP end ---- */

static void tcp_try_close(struct end *e)
{
        if (e->closed || e->fd < 0)
                return;
        bool finished = e->eof_in && e->eof_out && !e->shut_wr_pending && wp_bufq_empty(&e->sq);

        if (!finished && !e->failed)
                return;
        if (!e->failed && wp_op_inflight(&e->recv_op))
                return;
        wp_loop_cancel(e->r->cfg.loop, &e->recv_op);
        wp_loop_cancel(e->r->cfg.loop, &e->send_op);
        wp_loop_cancel(e->r->cfg.loop, &e->connect_op);
        if (wp_op_inflight(&e->recv_op) || wp_op_inflight(&e->send_op) ||
            wp_op_inflight(&e->connect_op))
                return;
        wp_timer_disarm(e->r->cfg.loop, &e->timer);
        if (e->linger_rst) {
                struct linger lg = {.l_onoff = 1, .l_linger = 0};

                setsockopt(e->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        }
        close(e->fd);
        e->fd = -1;
        e->closed = true;
        wp_bufq_done(&e->sq);
}

static void tcp_fail(struct end *e)
{
        e->failed = true;
        e->linger_rst = true;
        tcp_try_close(e);
}

static void tcp_arm_recv(struct end *e)
{
        if (e->closed || e->eof_in || e->failed || wp_op_inflight(&e->recv_op) || e->connecting)
                return;
        wp_loop_recv(e->r->cfg.loop, &e->recv_op, e->fd, e->rbuf, TCP_RBUF_SIZE);
}

static void on_tcp_recv(struct wp_op *op, int res)
{
        struct end *e = container_of(op, struct end, recv_op);
        struct hbone_relay *r = e->r;

        if (e->failed || e->closed) {
                tcp_try_close(e);
                check_done(r);
                return;
        }
        if (res < 0) {
                tcp_fail(e);
                end_reset(other(e));
                check_done(r);
                return;
        }
        if (res == 0) {
                e->eof_in = true;
                forward(e, other(e));
                tcp_try_close(e);
                check_done(r);
                return;
        }
        if (end_received(e, e->rbuf, (size_t)res) < 0) {
                tcp_fail(e);
                end_reset(other(e));
                check_done(r);
                return;
        }
        if (wp_bufq_empty(&e->pending))
                tcp_arm_recv(e);
        else
                e->recv_paused = true;
}

static void on_tcp_send(struct wp_op *op, int res)
{
        struct end *e = container_of(op, struct end, send_op);
        struct hbone_relay *r = e->r;
        const uint8_t *p;
        size_t len;

        if (e->failed || e->closed) {
                tcp_try_close(e);
                check_done(r);
                return;
        }
        if (res < 0) {
                tcp_fail(e);
                end_reset(other(e));
                check_done(r);
                return;
        }
        wp_bufq_skip(&e->sq, (size_t)res);
        len = wp_bufq_peek(&e->sq, &p);
        if (len) {
                wp_loop_send(r->cfg.loop, &e->send_op, e->fd, p, len);
        } else if (e->shut_wr_pending) {
                e->shut_wr_pending = false;
                shutdown(e->fd, SHUT_WR);
        }
        /* room again: pull what the other end has pending */
        forward(other(e), e);
        tcp_try_close(e);
        check_done(r);
}

static void upstream_ready(struct hbone_relay *r)
{
        wp_timer_disarm(r->cfg.loop, &r->up.timer);
        r->established = true;
        respond_down(r, 200, NULL);
        report(r, HBONE_RELAY_OK, 200);
        forward(&r->down, &r->up);
        forward(&r->up, &r->down);
}

static void up_failed(struct hbone_relay *r, enum hbone_relay_result res, unsigned status)
{
        char reason[48];
        unsigned answer = 502;

        switch (res) {
        case HBONE_RELAY_UPSTREAM_TIMEOUT:
                answer = 504;
                snprintf(reason, sizeof(reason), "upstream_timeout");
                break;
        case HBONE_RELAY_UPSTREAM_STATUS:
                snprintf(reason, sizeof(reason), "upstream_status_%u", status);
                break;
        case HBONE_RELAY_UPSTREAM_RESET:
                snprintf(reason, sizeof(reason), "upstream_reset");
                break;
        default:
                snprintf(reason, sizeof(reason), "upstream_refused");
                break;
        }
        report(r, res, status);
        if (!r->answered)
                respond_down(r, answer, reason);
        else
                end_reset(&r->down);
}

static void on_tcp_connect(struct wp_op *op, int res)
{
        struct end *e = container_of(op, struct end, connect_op);
        struct hbone_relay *r = e->r;

        e->connecting = false;
        if (e->failed || e->closed) {
                tcp_try_close(e);
                check_done(r);
                return;
        }
        wp_timer_disarm(r->cfg.loop, &e->timer);
        if (res < 0) {
                e->failed = true;
                tcp_try_close(e);
                up_failed(r, HBONE_RELAY_UPSTREAM_REFUSED, 0);
                check_done(r);
                return;
        }
        tcp_arm_recv(e);
        upstream_ready(r);
        check_done(r);
}

static void on_end_timer(struct wp_timer *t)
{
        struct end *e = container_of(t, struct end, timer);
        struct hbone_relay *r = e->r;

        if (e->kind == END_STREAM) {
                /* the upstream HBONE peer did not answer the CONNECT in time */
                if (r->established || e->closed || !e->st)
                        return;
                hbone_stream_reset(e->st, HBONE_H2_CANCEL);
                hbone_conn_kick(e->conn);
                up_failed(r, HBONE_RELAY_UPSTREAM_TIMEOUT, 0);
                check_done(r);
                return;
        }
        if (!e->connecting)
                return;
        e->failed = true;
        tcp_try_close(e); /* cancels the connect; closes once it completes */
        up_failed(r, HBONE_RELAY_UPSTREAM_TIMEOUT, 0);
        check_done(r);
}

static int tcp_end_init(struct end *e, int fd)
{
        e->rbuf = wp_malloc(TCP_RBUF_SIZE);
        if (!e->rbuf)
                return -ENOMEM;
        e->kind = END_TCP;
        e->fd = fd;
        wp_op_init(&e->recv_op, on_tcp_recv);
        wp_op_init(&e->send_op, on_tcp_send);
        wp_op_init(&e->connect_op, on_tcp_connect);
        e->timer.on_fire = on_end_timer;
        wp_bufq_init(&e->sq, PENDING_CHUNK,
                     (e->r->cfg.tcp_send_queue + PENDING_CHUNK - 1) / PENDING_CHUNK);
        return 0;
}

int hbone_relay_connect_tcp(struct hbone_relay *r, const struct sockaddr *addr, socklen_t len)
{
        struct end *e = &r->up;
        int fd, r2;

        if (e->kind != END_NONE || len > sizeof(struct sockaddr_storage))
                return -EINVAL;
        fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        r2 = tcp_end_init(e, fd);
        if (r2 < 0) {
                close(fd);
                e->fd = -1;
                return r2;
        }
        e->connecting = true;
        if (r->cfg.connect_timeout_ms)
                wp_timer_arm(r->cfg.loop, &e->timer,
                             wp_now_ns() + r->cfg.connect_timeout_ms * WP_NSEC_PER_MSEC);
        /* the address must outlive the op: rbuf is unused until the connect completes */
        memcpy(e->rbuf, addr, len);
        wp_loop_connect(r->cfg.loop, &e->connect_op, fd, (const struct sockaddr *)e->rbuf, len);
        return 0;
}

int hbone_relay_attach_tcp(struct hbone_relay *r, int fd)
{
        int r2;

        if (r->up.kind != END_NONE)
                return -EINVAL;
        r2 = tcp_end_init(&r->up, fd);
        if (r2 < 0)
                return r2;
        tcp_arm_recv(&r->up);
        upstream_ready(r);
        return 0;
}

/* ---- stream ends ---- */

int hbone_relay_open_hbone(struct hbone_relay *r, struct hbone_conn *up_conn, const char *authority,
                           const struct hbone_header *extra, size_t nextra)
{
        struct hbone_session *s = hbone_conn_session(up_conn);
        struct hbone_stream *st;
        int ret;

        if (r->up.kind != END_NONE)
                return -EINVAL;
        if (!s)
                return -ENOTCONN;
        ret = hbone_session_open(s, authority, extra, nextra, &r->up, &st);
        if (ret < 0)
                return ret;
        r->up.kind = END_STREAM;
        r->up.st = st;
        r->up.conn = up_conn;
        if (r->cfg.connect_timeout_ms)
                wp_timer_arm(r->cfg.loop, &r->up.timer,
                             wp_now_ns() + r->cfg.connect_timeout_ms * WP_NSEC_PER_MSEC);
        hbone_conn_kick(up_conn);
        return 0;
}

static void end_reset(struct end *e)
{
        if (e->closed)
                return;
        if (e->kind == END_STREAM) {
                if (e->st) {
                        hbone_stream_reset(e->st, HBONE_H2_CANCEL);
                        hbone_conn_kick(e->conn);
                }
        } else if (e->kind == END_TCP) {
                tcp_fail(e);
        } else {
                e->closed = true;
        }
}

int hbone_relay_on_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user)
{
        struct end *e = user;

        if (end_received(e, data, len) < 0)
                return -ENOBUFS;
        return 0;
}

void hbone_relay_on_eof(struct hbone_stream *st, void *user)
{
        struct end *e = user;

        e->eof_in = true;
        forward(e, other(e));
        check_done(e->r);
}

void hbone_relay_on_writable(struct hbone_stream *st, void *user)
{
        struct end *e = user;

        forward(other(e), e);
        check_done(e->r);
}

void hbone_relay_on_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct end *e = user;
        struct hbone_relay *r = e->r;

        if (e != &r->up)
                return;
        if (status == 200) {
                upstream_ready(r);
        } else {
                up_failed(r, HBONE_RELAY_UPSTREAM_STATUS, status);
        }
        check_done(r);
}

void hbone_relay_on_close(struct hbone_stream *st, uint32_t h2_error, void *user)
{
        struct end *e = user;
        struct hbone_relay *r = e->r;
        bool clean = h2_error == 0 && e->eof_in && e->eof_out;

        e->st = NULL;
        e->closed = true;
        wp_timer_disarm(r->cfg.loop, &e->timer);
        if (!clean) {
                e->failed = true;
                /* what this end sent and was never forwarded is lost with the reset */
                wp_bufq_done(&e->pending);
        }
        if (!r->established) {
                if (e == &r->up) {
                        /* no 200 from upstream: answer the downstream unless already done */
                        if (!r->answered)
                                up_failed(r, HBONE_RELAY_UPSTREAM_RESET, 0);
                } else {
                        if (!r->answered)
                                report(r, HBONE_RELAY_DOWNSTREAM_GONE, 0);
                        end_reset(&r->up);
                }
        } else if (!clean) {
                end_reset(other(e));
        } else {
                /* clean close: deliver what is still pending, then EOF */
                forward(e, other(e));
        }
        check_done(r);
}

/* ---- lifecycle ---- */

static void check_done(struct hbone_relay *r)
{
        if (r->done || !r->down.closed)
                return;
        if (r->up.kind == END_TCP)
                tcp_try_close(&r->up);
        if (r->up.kind != END_NONE && !r->up.closed)
                return;
        r->done = true;
        r->ops.on_done(r, r->cfg.user);
}

void hbone_relay_fail(struct hbone_relay *r, unsigned status, const char *reason)
{
        if (r->answered)
                end_reset(&r->down); /* too late for a status: the tunnel is reset */
        else
                respond_down(r, status, reason);
        if (r->up.kind == END_NONE)
                r->up.closed = true;
        check_done(r);
}

int hbone_relay_new(const struct hbone_relay_config *cfg, struct hbone_conn *down_conn,
                    struct hbone_stream *down, bool down_answered, struct hbone_relay **ret)
{
        struct hbone_relay *r;

        r = wp_calloc(1, sizeof(*r));
        if (!r)
                return -ENOMEM;
        r->cfg = *cfg;
        r->ops = *cfg->ops;
        if (!r->cfg.tcp_send_queue)
                r->cfg.tcp_send_queue = DEFAULT_TCP_QUEUE;
        r->down.r = r->up.r = r;
        r->down.fd = r->up.fd = -1;
        r->down.kind = END_STREAM;
        r->down.st = down;
        r->down.conn = down_conn;
        r->answered = down_answered;
        wp_bufq_init(&r->down.pending, PENDING_CHUNK, PENDING_MAX_CHUNKS);
        wp_bufq_init(&r->up.pending, PENDING_CHUNK, PENDING_MAX_CHUNKS);
        r->up.timer.on_fire = on_end_timer;
        hbone_stream_set_user(down, &r->down);
        *ret = r;
        return 0;
}

struct hbone_relay *hbone_relay_free(struct hbone_relay *r)
{
        if (!r)
                return NULL;
        wp_timer_disarm(r->cfg.loop, &r->up.timer);
        if (r->down.st)
                hbone_stream_set_user(r->down.st, NULL);
        if (r->up.kind == END_STREAM && r->up.st)
                hbone_stream_set_user(r->up.st, NULL);
        wp_bufq_done(&r->down.pending);
        wp_bufq_done(&r->up.pending);
        wp_bufq_done(&r->up.sq);
        wp_free(r->up.rbuf);
        wp_free(r);
        return NULL;
}

bool hbone_relay_waiting(const struct hbone_relay *r)
{
        return !r->established && !r->answered && !r->down.closed;
}

bool hbone_relay_down_closed(const struct hbone_relay *r)
{
        return r->down.closed;
}

uint64_t hbone_relay_bytes_sent_up(const struct hbone_relay *r)
{
        return r->down.bytes_in;
}

uint64_t hbone_relay_bytes_sent_down(const struct hbone_relay *r)
{
        return r->up.bytes_in;
}

void *hbone_relay_user(const struct hbone_relay *r)
{
        return r->cfg.user;
}
