/*
 * hbone_conn: socket <-> TLS (memory BIOs) <-> hbone_session, on a wp_loop.
 *
 * Receive: recv op -> wp_tls_feed -> handshake or wp_tls_read -> hbone_session_feed.
 * Send: hbone_session_pull -> wp_tls_write -> wp_tls_output -> send op. One recv and one send op
 * are in flight at most; output is flushed from a deferred task so that many stream writes in one
 * loop iteration become one send.
 *
 * Memory: an idle connection holds no 64 KiB I/O buffer. Receives go into a small buffer inside
 * the connection until one fills it; then a large buffer is borrowed from a per-thread cache and
 * kept while reads stay large, and given back after a small read. The send buffer is borrowed
 * only while there is output. (Each pending receive needs its buffer: that is io_uring's model.)
 */
#include "hbone/conn.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/time.h"
#include "waypoint/base/util.h"

#define BIG_BUF    (64 * 1024)
#define RBUF_SMALL 4096
/* Large buffers kept per thread for reuse (beyond this they are freed). */
#define BIG_CACHE_MAX 8
/* Stop pulling from the session while this much ciphertext already waits in the TLS BIO. */
#define TLS_OUT_HIGH (256 * 1024)
/* How long a connection that is closing gets to flush its last frames (GOAWAY, alert). */
#define LINGER_MS 2000

enum conn_state {
        CONN_CONNECTING,
        CONN_HANDSHAKE,
        CONN_ESTABLISHED,
        CONN_LINGER,  /* flushing final output before closing */
        CONN_CLOSING, /* waiting for in-flight ops */
        CONN_CLOSED,
};

struct hbone_conn {
        struct hbone_conn_config cfg;
        struct hbone_limits lim;
        struct hbone_callbacks cb;
        struct hbone_conn_ops ops;
        enum conn_state state;
        bool server;
        bool draining;
        bool shut_wr;
        bool in_recv;  /* processing input: defer the flush */
        unsigned busy; /* inside one of our callbacks: on_closed waits until it returns */
        int fd;
        struct wp_tls *tls;
        struct hbone_session *sess;
        struct wp_op recv_op, send_op, connect_op;
        struct wp_timer timer;
        struct wp_task flush_task;
        uint8_t *rbig; /* borrowed large receive buffer, or NULL: receive into rsmall */
        uint8_t *sbuf; /* borrowed while output is queued, else NULL */
        size_t soff, slen;
        int close_err;
        const char *close_why;
        char why_buf[160];
        struct sockaddr_storage peer, local;
        uint8_t rsmall[RBUF_SMALL];
};

/* ---- per-thread cache of large buffers ---- */

struct big_cache {
        unsigned n;
        uint8_t *b[BIG_CACHE_MAX];
};

static __thread struct big_cache *big_cache;
static pthread_key_t big_cache_key;
static pthread_once_t big_cache_once = PTHREAD_ONCE_INIT;

static void big_cache_destroy(void *p)
{
        struct big_cache *bc = p;

        while (bc->n)
                wp_free(bc->b[--bc->n]);
        wp_free(bc);
}

static void big_cache_init(void)
{
        pthread_key_create(&big_cache_key, big_cache_destroy);
}

static uint8_t *big_get(void)
{
        if (big_cache && big_cache->n)
                return big_cache->b[--big_cache->n];
        return wp_malloc(BIG_BUF);
}

static void big_put(uint8_t *b)
{
        if (!b)
                return;
        if (!big_cache) {
                pthread_once(&big_cache_once, big_cache_init);
                big_cache = wp_calloc(1, sizeof(*big_cache));
                if (big_cache)
                        pthread_setspecific(big_cache_key, big_cache); /* freed at thread exit */
        }
        if (big_cache && big_cache->n < BIG_CACHE_MAX)
                big_cache->b[big_cache->n++] = b;
        else
                wp_free(b);
}

static __thread uint8_t plain_scratch[64 * 1024];

static void conn_flush(struct hbone_conn *c);
static void arm_recv(struct hbone_conn *c);
static void conn_try_finalize(struct hbone_conn *c);

static void set_why(struct hbone_conn *c, int err, const char *why)
{
        if (c->close_why)
                return;
        c->close_err = err;
        if (why) {
                snprintf(c->why_buf, sizeof(c->why_buf), "%s", why);
                c->close_why = c->why_buf;
        } else {
                c->close_why = err ? strerror(-err) : "closed";
        }
}

static void conn_hard_close(struct hbone_conn *c)
{
        if (c->state >= CONN_CLOSING)
                return;
        c->state = CONN_CLOSING;
        wp_timer_disarm(c->cfg.loop, &c->timer);
        /* Streams learn about the close now, while the tunnels can still reach their peers. */
        c->sess = hbone_session_abort(c->sess);
        wp_loop_cancel(c->cfg.loop, &c->recv_op);
        wp_loop_cancel(c->cfg.loop, &c->send_op);
        wp_loop_cancel(c->cfg.loop, &c->connect_op);
        conn_try_finalize(c);
}

static void conn_try_finalize(struct hbone_conn *c)
{
        if (c->state != CONN_CLOSING || c->busy)
                return;
        if (wp_op_inflight(&c->recv_op) || wp_op_inflight(&c->send_op) ||
            wp_op_inflight(&c->connect_op) || c->flush_task.queued)
                return;
        c->state = CONN_CLOSED;
        if (c->fd >= 0) {
                close(c->fd);
                c->fd = -1;
        }
        c->ops.on_closed(c, c->close_err, c->close_why ? c->close_why : "closed", c->cfg.user);
}

void hbone_conn_close(struct hbone_conn *c, int err, const char *why)
{
        set_why(c, err, why);
        conn_hard_close(c);
}

/* Flush what is queued (GOAWAY, TLS alert), then close; bounded by LINGER_MS. */
static void conn_linger_close(struct hbone_conn *c, int err, const char *why)
{
        if (c->state >= CONN_LINGER)
                return;
        set_why(c, err, why);
        c->state = CONN_LINGER;
        /* keep reading (and discarding): closing with unread input would make the kernel send
         * a TCP RST, and the peer could lose the GOAWAY or alert we are flushing */
        arm_recv(c);
        wp_timer_arm(c->cfg.loop, &c->timer, wp_now_ns() + LINGER_MS * WP_NSEC_PER_MSEC);
        conn_flush(c);
}

static void arm_recv(struct hbone_conn *c)
{
        if (c->state >= CONN_CLOSING || wp_op_inflight(&c->recv_op))
                return;
        if (c->rbig)
                wp_loop_recv(c->cfg.loop, &c->recv_op, c->fd, c->rbig, BIG_BUF);
        else
                wp_loop_recv(c->cfg.loop, &c->recv_op, c->fd, c->rsmall, RBUF_SMALL);
}

static void schedule_tick(struct hbone_conn *c)
{
        uint64_t next = 0;
        int r;

        if (!c->sess)
                return;
        r = hbone_session_tick(c->sess, wp_now_ns(), &next);
        if (r < 0) {
                set_why(c, r, "keepalive timeout: no PING ack");
                conn_hard_close(c);
                return;
        }
        if (next)
                wp_timer_arm(c->cfg.loop, &c->timer, next);
}

static void on_timer_body(struct wp_timer *t)
{
        struct hbone_conn *c = container_of(t, struct hbone_conn, timer);

        switch (c->state) {
        case CONN_CONNECTING:
                hbone_conn_close(c, -ETIMEDOUT, "connect timeout");
                return;
        case CONN_HANDSHAKE:
                hbone_conn_close(c, -ETIMEDOUT, "TLS handshake timeout");
                return;
        case CONN_LINGER:
                conn_hard_close(c);
                return;
        case CONN_ESTABLISHED:
                schedule_tick(c);
                conn_flush(c);
                return;
        default:
                return;
        }
}

static int establish(struct hbone_conn *c)
{
        int r;

        r = hbone_session_new(&c->cb, &c->lim, c->server, c, &c->sess);
        if (r < 0) {
                hbone_conn_close(c, r, "cannot create HTTP/2 session");
                return r;
        }
        c->state = CONN_ESTABLISHED;
        wp_timer_disarm(c->cfg.loop, &c->timer);
        schedule_tick(c);
        if (c->ops.on_established)
                c->ops.on_established(c, c->cfg.user);
        return 0;
}

/* Processes buffered ciphertext: handshake, then plaintext into the session. */
static void process_input(struct hbone_conn *c)
{
        ssize_t n;
        int r;

        if (c->state == CONN_HANDSHAKE) {
                r = wp_tls_handshake(c->tls);
                if (r == -EAGAIN)
                        return;
                if (r < 0) {
                        char why[160];

                        snprintf(why, sizeof(why), "TLS handshake failed: %s",
                                 wp_tls_error(c->tls));
                        conn_linger_close(c, -EPROTO, why);
                        return;
                }
                if (establish(c) < 0)
                        return;
        }
        while (c->state == CONN_ESTABLISHED) {
                n = wp_tls_read(c->tls, plain_scratch, sizeof(plain_scratch));
                if (n == -EAGAIN)
                        break;
                if (n == 0) {
                        conn_linger_close(c, 0, "peer sent close_notify");
                        return;
                }
                if (n < 0) {
                        char why[160];

                        snprintf(why, sizeof(why), "TLS error: %s", wp_tls_error(c->tls));
                        set_why(c, -EPROTO, why);
                        conn_hard_close(c);
                        return;
                }
                if (hbone_session_feed(c->sess, plain_scratch, (size_t)n) < 0) {
                        char why[160];

                        snprintf(why, sizeof(why), "HTTP/2 error: %s",
                                 hbone_session_error(c->sess));
                        conn_linger_close(c, -EPROTO, why);
                        return;
                }
        }
}

static void on_recv_body(struct wp_op *op, int res)
{
        struct hbone_conn *c = container_of(op, struct hbone_conn, recv_op);

        if (c->state == CONN_LINGER) {
                if (res <= 0)
                        conn_hard_close(c); /* peer saw our FIN and closed, or gave up */
                else
                        arm_recv(c); /* discard */
                return;
        }
        if (c->state >= CONN_CLOSING) {
                conn_try_finalize(c);
                return;
        }
        if (res <= 0) {
                if (res == 0)
                        hbone_conn_close(c, 0, "peer closed the connection");
                else
                        hbone_conn_close(c, res, NULL);
                return;
        }
        if (wp_tls_feed(c->tls, c->rbig ? c->rbig : c->rsmall, (size_t)res) < 0) {
                hbone_conn_close(c, -ENOMEM, "out of memory");
                return;
        }
        /* the bytes are in the TLS BIO now: pick the buffer for the next read */
        if (!c->rbig && res == RBUF_SMALL) {
                c->rbig = big_get(); /* stays small if that fails */
        } else if (c->rbig && res <= RBUF_SMALL) {
                big_put(c->rbig);
                c->rbig = NULL;
        }
        c->in_recv = true;
        process_input(c);
        c->in_recv = false;
        if (c->state >= CONN_CLOSING)
                return;
        conn_flush(c);
        arm_recv(c);
}

#define STAGE_MAX    16384 /* a TLS record's plaintext */
#define STAGE_DIRECT 4096
static __thread uint8_t stage_buf[STAGE_MAX];

/* Encrypts plaintext into one record and moves what fits of the ciphertext to sbuf. */
static int seal(struct hbone_conn *c, const uint8_t *p, size_t n)
{
        if (wp_tls_write(c->tls, p, n) < 0)
                return -1;
        c->slen += wp_tls_output(c->tls, c->sbuf + c->slen, BIG_BUF - c->slen);
        return 0;
}

static void fill_sbuf(struct hbone_conn *c)
{
        c->soff = c->slen = 0;
        if (!c->sbuf) {
                if (!wp_tls_output_pending(c->tls) &&
                    (!c->sess || !hbone_session_want_write(c->sess)))
                        return;
                c->sbuf = big_get();
                if (!c->sbuf)
                        return; /* retried at the next flush */
        }
        c->slen = wp_tls_output(c->tls, c->sbuf, BIG_BUF);
        if (c->state != CONN_ESTABLISHED && c->state != CONN_LINGER)
                return;
        if (!c->sess || !wp_tls_handshake_done(c->tls))
                return;
        /* nghttp2 hands out one frame per pull. Small frames (HEADERS, WINDOW_UPDATE, PING,
         * small DATA) are staged and sealed together, one TLS record for all of them instead
         * of one each: OpenSSL's per-record cost dominates small exchanges. Frames of
         * STAGE_DIRECT bytes or more are sealed as they are (no copy), in order. */
        size_t staged = 0;

        while (c->slen < BIG_BUF && wp_tls_output_pending(c->tls) + staged < TLS_OUT_HIGH) {
                const uint8_t *data;
                ssize_t n = hbone_session_pull(c->sess, &data);

                if (n <= 0)
                        break;
                if (staged && (staged + (size_t)n > STAGE_MAX || (size_t)n >= STAGE_DIRECT)) {
                        if (seal(c, stage_buf, staged) < 0)
                                return;
                        staged = 0;
                }
                if ((size_t)n >= STAGE_DIRECT) {
                        if (seal(c, data, (size_t)n) < 0)
                                return;
                } else {
                        memcpy(stage_buf + staged, data, (size_t)n);
                        staged += (size_t)n;
                }
        }
        if (staged)
                (void)seal(c, stage_buf, staged);
}

static void conn_flush(struct hbone_conn *c)
{
        if (c->state >= CONN_CLOSING || c->state == CONN_CONNECTING)
                return;
        if (wp_op_inflight(&c->send_op))
                return;
        if (c->soff >= c->slen)
                fill_sbuf(c);
        if (c->slen > c->soff) {
                wp_loop_send(c->cfg.loop, &c->send_op, c->fd, c->sbuf + c->soff, c->slen - c->soff);
                return;
        }
        /* Nothing left to send: give the buffer back. */
        big_put(c->sbuf);
        c->sbuf = NULL;
        if (c->state == CONN_LINGER) {
                if (!c->shut_wr) {
                        c->shut_wr = true;
                        shutdown(c->fd, SHUT_WR); /* then wait for the peer's FIN or the timer */
                }
                return;
        }
        if (c->state == CONN_ESTABLISHED && hbone_session_finished(c->sess))
                hbone_conn_close(c, 0, c->draining ? "drained" : "session finished");
}

static void on_send_body(struct wp_op *op, int res)
{
        struct hbone_conn *c = container_of(op, struct hbone_conn, send_op);

        if (c->state >= CONN_CLOSING) {
                conn_try_finalize(c);
                return;
        }
        if (res < 0) {
                hbone_conn_close(c, res, NULL);
                return;
        }
        c->soff += (size_t)res;
        if (c->soff >= c->slen)
                c->soff = c->slen = 0;
        conn_flush(c);
}

static void on_flush_task_body(struct wp_task *t)
{
        struct hbone_conn *c = container_of(t, struct hbone_conn, flush_task);

        if (c->state >= CONN_CLOSING) {
                conn_try_finalize(c);
                return;
        }
        conn_flush(c);
}

void hbone_conn_kick(struct hbone_conn *c)
{
        if (c->state >= CONN_CLOSING || c->in_recv)
                return;
        wp_loop_defer(c->cfg.loop, &c->flush_task);
}

void hbone_conn_drain(struct hbone_conn *c)
{
        if (c->draining || c->state >= CONN_LINGER)
                return;
        c->draining = true;
        if (c->state != CONN_ESTABLISHED) {
                hbone_conn_close(c, 0, "drained before established");
                return;
        }
        hbone_session_drain(c->sess);
        hbone_conn_kick(c);
}

static void start_handshake(struct hbone_conn *c)
{
        int r;

        c->state = CONN_HANDSHAKE;
        r = wp_tls_handshake(c->tls); /* client: queues ClientHello */
        if (r < 0 && r != -EAGAIN) {
                hbone_conn_close(c, r, wp_tls_error(c->tls));
                return;
        }
        conn_flush(c);
        arm_recv(c);
}

static void on_connect_body(struct wp_op *op, int res)
{
        struct hbone_conn *c = container_of(op, struct hbone_conn, connect_op);
        socklen_t len = sizeof(c->local);

        if (c->state >= CONN_CLOSING) {
                conn_try_finalize(c);
                return;
        }
        if (res < 0) {
                char why[96];

                snprintf(why, sizeof(why), "connect failed: %s", strerror(-res));
                hbone_conn_close(c, res, why);
                return;
        }
        getsockname(c->fd, (struct sockaddr *)&c->local, &len);
        start_handshake(c);
}

/* Every entry from the loop goes through enter/leave: a callback may close the connection, and
 * the owner's on_closed (which frees it) must only run once we no longer touch it. */
static void conn_leave(struct hbone_conn *c)
{
        if (--c->busy == 0 && c->state == CONN_CLOSING)
                conn_try_finalize(c);
}

static void on_timer(struct wp_timer *t)
{
        struct hbone_conn *c = container_of(t, struct hbone_conn, timer);

        c->busy++;
        on_timer_body(t);
        conn_leave(c);
}

static void on_recv(struct wp_op *op, int res)
{
        struct hbone_conn *c = container_of(op, struct hbone_conn, recv_op);

        c->busy++;
        on_recv_body(op, res);
        conn_leave(c);
}

static void on_send(struct wp_op *op, int res)
{
        struct hbone_conn *c = container_of(op, struct hbone_conn, send_op);

        c->busy++;
        on_send_body(op, res);
        conn_leave(c);
}

static void on_connect(struct wp_op *op, int res)
{
        struct hbone_conn *c = container_of(op, struct hbone_conn, connect_op);

        c->busy++;
        on_connect_body(op, res);
        conn_leave(c);
}

static void on_flush_task(struct wp_task *t)
{
        struct hbone_conn *c = container_of(t, struct hbone_conn, flush_task);

        c->busy++;
        on_flush_task_body(t);
        conn_leave(c);
}

static int conn_alloc(const struct hbone_conn_config *cfg, bool server, struct hbone_conn **ret)
{
        struct hbone_conn *c;
        int r;

        c = wp_calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->cfg = *cfg;
        c->lim = *cfg->lim;
        c->cb = *cfg->cb;
        c->ops = *cfg->ops;
        c->server = server;
        c->fd = -1;
        wp_op_init(&c->recv_op, on_recv);
        wp_op_init(&c->send_op, on_send);
        wp_op_init(&c->connect_op, on_connect);
        c->timer.on_fire = on_timer;
        c->flush_task.run = on_flush_task;
        r = wp_tls_new(cfg->tls_ctx, &c->tls);
        if (r < 0) {
                wp_free(c);
                return r;
        }
        *ret = c;
        return 0;
}

static void set_nodelay(int fd)
{
        int one = 1;

        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int hbone_conn_accept(const struct hbone_conn_config *cfg, int fd, struct hbone_conn **ret)
{
        struct hbone_conn *c;
        socklen_t len;
        int r;

        r = conn_alloc(cfg, true, &c);
        if (r < 0) {
                close(fd);
                return r;
        }
        c->fd = fd;
        set_nodelay(fd);
        len = sizeof(c->peer);
        getpeername(fd, (struct sockaddr *)&c->peer, &len);
        len = sizeof(c->local);
        getsockname(fd, (struct sockaddr *)&c->local, &len);
        c->state = CONN_HANDSHAKE;
        if (cfg->handshake_timeout_ms)
                wp_timer_arm(cfg->loop, &c->timer,
                             wp_now_ns() + cfg->handshake_timeout_ms * WP_NSEC_PER_MSEC);
        arm_recv(c);
        *ret = c;
        return 0;
}

int hbone_conn_connect(const struct hbone_conn_config *cfg, const struct sockaddr *addr,
                       socklen_t addrlen, struct hbone_conn **ret)
{
        struct hbone_conn *c;
        int r, fd;

        if (addrlen > sizeof(c->peer))
                return -EINVAL;
        fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        r = conn_alloc(cfg, false, &c);
        if (r < 0) {
                close(fd);
                return r;
        }
        c->fd = fd;
        set_nodelay(fd);
        memcpy(&c->peer, addr, addrlen);
        c->state = CONN_CONNECTING;
        if (cfg->connect_timeout_ms)
                wp_timer_arm(cfg->loop, &c->timer,
                             wp_now_ns() + cfg->connect_timeout_ms * WP_NSEC_PER_MSEC);
        wp_loop_connect(cfg->loop, &c->connect_op, fd, (const struct sockaddr *)&c->peer, addrlen);
        *ret = c;
        return 0;
}

struct hbone_conn *hbone_conn_free(struct hbone_conn *c)
{
        if (!c)
                return NULL;
        wp_timer_disarm(c->cfg.loop, &c->timer);
        hbone_session_free(c->sess);
        wp_tls_free(c->tls);
        if (c->fd >= 0)
                close(c->fd);
        big_put(c->rbig);
        big_put(c->sbuf);
        wp_free(c);
        return NULL;
}

struct hbone_session *hbone_conn_session(const struct hbone_conn *c)
{
        return c->state == CONN_ESTABLISHED || c->state == CONN_LINGER ? c->sess : NULL;
}

void *hbone_conn_user(const struct hbone_conn *c)
{
        return c->cfg.user;
}

uint64_t hbone_conn_id(const struct hbone_conn *c)
{
        return c->cfg.id;
}

const char *hbone_conn_peer_uri(const struct hbone_conn *c)
{
        return wp_tls_peer_uri(c->tls);
}

const struct sockaddr_storage *hbone_conn_peer_addr(const struct hbone_conn *c)
{
        return &c->peer;
}

const struct sockaddr_storage *hbone_conn_local_addr(const struct hbone_conn *c)
{
        return &c->local;
}

bool hbone_conn_established(const struct hbone_conn *c)
{
        return c->state == CONN_ESTABLISHED;
}

bool hbone_conn_closing(const struct hbone_conn *c)
{
        return c->state >= CONN_LINGER;
}
